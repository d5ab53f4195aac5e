//! Who read what, and when: every connection of a restore or administrator identity is a
//! session, summed up in memory as its requests are served (nothing per chunk goes to disk or
//! through Raft) and recorded through Raft as one `AuditRecord` when it ends (see
//! `catalog::audit`). Agents' and nodes' sessions are not recorded: agents cannot read, and
//! nodes replicate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exclave::identity::Identity;
use exclave::protocol::{AuditRecord, Reply, Request};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::catalog::{self, Command};
use crate::node::Node;

/// Records this node could not get through the cluster yet (no majority: after a loss, the
/// surviving embassy still serves restores), kept in its store's own column family until a
/// leader takes them: `audit-pending/ ‖ ended (u64 BE) ‖ 8 bytes of the record's hash`.
const PENDING: &[u8] = b"audit-pending/";

/// Records a session's records through the cluster; those it cannot are kept on this node
/// and recorded by `worker` once the cluster can (a record is never dropped for want of a
/// majority: the sessions that most need recording happen when embassies are lost).
pub async fn record(node: &Arc<Node>, session: &Session, records: Vec<AuditRecord>) {
    for record in records {
        node.metrics.session(&session.identity().subject(), record.bytes);
        let (tenant, identity, bytes) = (record.tenant.clone(), record.identity.clone(), record.bytes);
        match node.raft.propose(Command::Audit { record: record.clone() }).await {
            Ok(_) => info!(%identity, %tenant, bytes, "session recorded in the audit log"),
            Err(e) => {
                node.metrics.audit_failed();
                let kept = keep(node, &record);
                warn!(%identity, %tenant, bytes, error = %e, kept = kept.is_ok(),
                      "a session could not be recorded through the cluster; kept on this node until it can");
            }
        }
    }
}

fn keep(node: &Node, r: &AuditRecord) -> Result<(), crate::store::StoreError> {
    let body = catalog::encode(r);
    let mut key = PENDING.to_vec();
    key.extend_from_slice(&(r.ended.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&blake3::hash(&body).as_bytes()[..8]);
    node.store.meta_put(&key, &body)
}

/// Every 10 s, records what `record` had to keep, oldest first, while a leader takes them.
pub async fn worker(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let Ok(pending) = node.store.meta_scan(PENDING) else { continue };
        node.metrics.audit_pending(pending.len());
        for (key, body) in pending {
            let Ok(record) = catalog::decode::<AuditRecord>(&body) else {
                warn!("an unreadable kept audit record was dropped");
                let _ = node.store.meta_delete(&key);
                continue;
            };
            if node.raft.propose(Command::Audit { record }).await.is_err() {
                break;
            }
            let _ = node.store.meta_delete(&key);
            info!("a session kept on this node is now recorded in the audit log");
        }
        if let Ok(left) = node.store.meta_scan(PENDING) {
            node.metrics.audit_pending(left.len());
        }
    }
}

/// Requests that neither read a tenant's data nor change anything: not worth a record alone.
/// (A status poll recorded through Raft would itself move the log it reports on.)
const QUIET: &[&str] = &[
    "hello",
    "status",
    "cluster_status",
    "gc_status",
    "history_heads",
    "raft_status",
    "read_barrier",
    "certificates",
    "quotas",
    "known_layout",
];

/// One connection's activity.
pub struct Session {
    /// Subject and certificate serial, as records and changes name the caller.
    pub caller: String,
    identity: Identity,
    started: i64,
    log: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    requests: BTreeMap<&'static str, u64>,
    sources: BTreeSet<String>,
    snapshots: BTreeSet<String>,
    tenants: BTreeSet<String>,
    bytes: u64,
    failures: u64,
}

impl Session {
    pub fn new(identity: Identity, serial: &[u8], started: i64) -> Session {
        let caller = format!("{identity}#{}", hex::encode(serial));
        Session { caller, identity, started, log: Mutex::new(Log::default()) }
    }

    fn audited(&self) -> bool {
        // A build for bench/audit.sh only (see Cargo.toml): what the log costs.
        if cfg!(feature = "bench-unaudited") {
            return false;
        }
        matches!(self.identity, Identity::Restore { .. } | Identity::Admin)
    }

    /// What a request names, noted before it is served (the request is consumed by then).
    pub fn note_request(&self, req: &Request) {
        if !self.audited() {
            return;
        }
        let (source, snapshot, tenant) = named(req);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        *log.requests.entry(req.name()).or_default() += 1;
        log.sources.extend(source);
        log.snapshots.extend(snapshot);
        log.tenants.extend(tenant);
    }

    /// What the reply carried back, or that it failed.
    pub fn note_reply(&self, reply: &Reply) {
        if !self.audited() {
            return;
        }
        let bytes: u64 = match reply {
            Reply::Chunk { envelope } => envelope.len() as u64,
            Reply::Chunks { chunks } => chunks.iter().map(|c| c.as_ref().map_or(0, |b| b.len() as u64)).sum(),
            _ => 0,
        };
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.bytes += bytes;
        if matches!(reply, Reply::Error { .. }) {
            log.failures += 1;
        }
    }

    /// The records of the session, once it ended: one per tenant it touched (a restore
    /// identity's own; for an administrator, each tenant named, or the cluster as ""); none
    /// when it only asked quiet questions.
    pub fn records(&self, node: &str, ended: i64) -> Vec<AuditRecord> {
        if !self.audited() {
            return Vec::new();
        }
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.requests.keys().all(|r| QUIET.contains(r)) {
            return Vec::new();
        }
        let tenants: Vec<String> = match &self.identity {
            Identity::Restore { tenant } => vec![tenant.clone()],
            _ if log.tenants.is_empty() => vec![String::new()],
            _ => log.tenants.iter().cloned().collect(),
        };
        tenants
            .into_iter()
            .map(|tenant| AuditRecord {
                identity: self.caller.clone(),
                tenant,
                node: node.to_string(),
                started: self.started,
                ended,
                requests: log.requests.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                sources: log.sources.iter().cloned().collect(),
                snapshots: log.snapshots.iter().cloned().collect(),
                bytes: log.bytes,
                failures: log.failures,
            })
            .collect()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// The source, snapshot and (for administrators' requests) tenant a request names.
fn named(req: &Request) -> (Option<String>, Option<String>, Option<String>) {
    match req {
        Request::ListSnapshots { source } | Request::Drills { source } => (source.clone(), None, None),
        Request::FindSnapshot { id } => (None, Some(id.clone()), None),
        Request::RecordDrill { record } => (Some(record.source.clone()), Some(record.snapshot.clone()), None),
        Request::SetRetentionFor { tenant, source, .. } => (Some(source.clone()), None, Some(tenant.clone())),
        Request::SetLock { tenant, source, .. } => (source.clone(), None, Some(tenant.clone())),
        Request::SetHold { tenant, target, .. } => match target {
            exclave::protocol::HoldTarget::Source(s) => (Some(s.clone()), None, Some(tenant.clone())),
            exclave::protocol::HoldTarget::Snapshot(id) => (None, Some(id.clone()), Some(tenant.clone())),
        },
        Request::SetProtection { tenant, .. } | Request::RetentionShow { tenant } => (None, None, Some(tenant.clone())),
        Request::SetQuota { tenant, .. } => (None, None, Some(tenant.clone())),
        Request::Audit { tenant, .. } | Request::AuditKeep { tenant } => (None, None, tenant.clone()),
        Request::SetAuditKeep { tenant, .. } => (None, None, Some(tenant.clone())),
        _ => (None, None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::ChunkId;

    #[test]
    fn a_restore_session_is_one_record_of_what_it_named_and_read() {
        let s = Session::new(Identity::Restore { tenant: "lux".into() }, &[0x0a, 0x1b], 100);
        s.note_request(&Request::Hello);
        assert!(s.records("n1", 101).is_empty(), "a hello alone is not worth a record");
        s.note_request(&Request::ListSnapshots { source: Some("rnpp".into()) });
        s.note_reply(&Reply::Ok);
        for _ in 0..3 {
            s.note_request(&Request::GetChunk { id: ChunkId([1; 32]) });
            s.note_reply(&Reply::Chunk { envelope: vec![0; 1000] });
        }
        s.note_request(&Request::FindSnapshot { id: "s1".into() });
        s.note_reply(&Reply::Error {
            code: exclave::protocol::ErrorCode::NotFound,
            message: String::new(),
            missing: vec![],
        });
        let r = s.records("n1", 160);
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!((r.identity.as_str(), r.tenant.as_str(), r.node.as_str()), ("restore:lux#0a1b", "lux", "n1"));
        assert_eq!((r.started, r.ended, r.bytes, r.failures), (100, 160, 3000, 1));
        assert_eq!(r.sources, ["rnpp"]);
        assert_eq!(r.snapshots, ["s1"]);
        assert!(r.requests.contains(&("get_chunk".into(), 3)));
    }

    #[test]
    fn agents_and_nodes_are_not_recorded_and_admins_per_tenant_named() {
        let agent = Session::new(Identity::Agent { tenant: "lux".into(), name: "rnpp".into() }, &[1], 0);
        agent.note_request(&Request::ListSnapshots { source: None });
        assert!(agent.records("n1", 1).is_empty());
        let admin = Session::new(Identity::Admin, &[2], 0);
        admin.note_request(&Request::ClusterStatus);
        admin.note_request(&Request::GcStatus);
        admin.note_request(&Request::HistoryHeads);
        assert!(admin.records("n1", 1).is_empty(), "`cluster status` is not worth a record");
        admin.note_request(&Request::Gc { dry_run: true });
        assert_eq!(admin.records("n1", 1)[0].tenant, "", "a cluster session");
        admin.note_request(&Request::SetProtection { tenant: "est".into(), days: 1 });
        admin.note_request(&Request::RetentionShow { tenant: "lux".into() });
        let tenants: Vec<String> = admin.records("n1", 1).into_iter().map(|r| r.tenant).collect();
        assert_eq!(tenants, ["est", "lux"]);
    }
}
