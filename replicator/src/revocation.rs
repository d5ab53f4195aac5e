//! Revoked certificates on one node: the set the TLS handshake consults, kept in step with the
//! catalog, and the open connections closed when their certificate is revoked.
//!
//! The catalog (Raft) holds the truth; `Revoked` is this node's copy of it. It is loaded before
//! the node accepts its first connection, and reloaded by the watcher whenever the applied
//! index has moved (looked at every `WATCH_EVERY`), so a revocation takes effect on a node
//! within about a second of being applied there: on every member, after a restart (the
//! catalog is on disk), and on a node that joins later (it applies the log or a snapshot of
//! it). Then every open connection whose certificate it names is closed. Handshakes consult the
//! set itself, so a refused certificate never reaches a request handler.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use exclave::transport::{RevocationCheck, cert_serial};
use tracing::{info, warn};

use crate::catalog;
use crate::node::Node;
use crate::store::{Store, StoreError};

/// How often the watcher looks for newly applied revocations.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// QUIC application close code of a connection whose certificate was revoked (TLS's alert
/// number for the same thing).
pub const CLOSE_REVOKED: u32 = 44;

#[derive(Default)]
pub struct Revoked {
    serials: RwLock<HashSet<Vec<u8>>>,
}

impl Revoked {
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }

    /// The check the TLS verifier runs on every client certificate.
    pub fn check(self: &Arc<Self>) -> RevocationCheck {
        let me = self.clone();
        Arc::new(move |der| {
            let refused = cert_serial(der).is_some_and(|s| me.contains(&s));
            if refused {
                warn!(serial = %cert_serial(der).map(hex::encode).unwrap_or_default(),
                      "refused a revoked certificate at the handshake");
            }
            refused
        })
    }

    /// Replaces the set with the catalog's; returns how many revocations are in force.
    pub fn load(&self, store: &Store) -> Result<usize, StoreError> {
        let list = catalog::revocations(&store.catalog()?)?;
        let set: HashSet<Vec<u8>> = list.iter().filter_map(|r| hex::decode(&r.serial).ok()).collect();
        let n = set.len();
        *self.serials.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(n)
    }
}

struct Open {
    serial: Vec<u8>,
    identity: String,
    conn: quinn::Connection,
}

/// The node's open client connections, by the serial of the certificate each presented.
#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// Keeps a connection registered while it lives.
pub struct Registered<'a> {
    id: u64,
    connections: &'a Connections,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.connections.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Connections {
    pub fn register(&self, serial: Vec<u8>, identity: String, conn: quinn::Connection) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Open { serial, identity, conn });
        Registered { id, connections: self }
    }

    /// Closes every open connection whose certificate is revoked; returns whose they were.
    pub fn close_revoked(&self, revoked: &Revoked) -> Vec<String> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = Vec::new();
        for o in open.values().filter(|o| revoked.contains(&o.serial)) {
            o.conn.close(CLOSE_REVOKED.into(), b"certificate revoked");
            closed.push(o.identity.clone());
        }
        closed
    }
}

/// Worker: keeps the node's revocation set in step with the applied catalog and closes the
/// connections of revoked certificates, until `stop` turns true.
pub async fn watch(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut loaded_at = node.raft.view().applied;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let applied = node.raft.view().applied;
        if applied != loaded_at {
            let (store, revoked) = (node.store.clone(), node.revoked.clone());
            match tokio::task::spawn_blocking(move || revoked.load(&store)).await {
                Ok(Ok(n)) => {
                    node.metrics.revocations(n);
                    loaded_at = applied;
                }
                Ok(Err(e)) => warn!(error = %e, "cannot read the revocations from the catalog; trying again"),
                Err(e) => warn!(error = %e, "revocation reload failed; trying again"),
            }
        }
        for identity in node.connections.close_revoked(&node.revoked) {
            node.metrics.error("revoked");
            info!(%identity, "closed a connection: its certificate has been revoked");
        }
    }
}
