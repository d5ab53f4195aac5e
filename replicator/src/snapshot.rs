//! Raft snapshots of the catalog, streamed: a node that joins or lags too far behind catches
//! up from a catalog of any size with bounded memory on both sides, and the sender's consensus
//! thread only takes a checkpoint.
//!
//! The snapshot a Raft message carries is a ticket (layout below), not the catalog. The
//! sender pins the catalog as it is at the snapshot's index in a RocksDB checkpoint (hard
//! links of its table files, under `DATA/snapshots/`); the receiver asks the sender for it
//! page by page (`SnapshotPages`), writes the pages into its inactive catalog column family,
//! and then, in one synced batch with the Raft state of the snapshot (its index, term and
//! configuration, the log dropped), makes that column family the catalog. A node killed part
//! way keeps its old catalog and Raft state untouched (the switch never happened); the
//! leader sends it a snapshot again and the transfer starts over.
//!
//! Ticket (postcard, after the magic `XVSNAP01`): version 1, sender's Raft id, checkpoint id,
//! index, term, the name of the catalog column family in the checkpoint. Snapshot data that
//! does not begin with the magic is the older inline form (every catalog pair in the message),
//! still accepted from an older leader.
//!
//! A checkpoint is reused for later snapshots while it is at least as new as asked and less
//! than `REUSE_FOR` old; the two newest are kept, older ones deleted, all of them at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocksdb::{DB, Direction, IteratorMode, Options};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub const MAGIC: &[u8; 8] = b"XVSNAP01";
/// Bytes of catalog pairs in one page, as the receiver asks (the frame limit is 17 MiB).
pub const PAGE_BYTES: usize = 4 << 20;
/// What a sender serves at most, and at least, whatever it is asked.
const PAGE_RANGE: std::ops::RangeInclusive<usize> = 4096..=(8 << 20);
const REUSE_FOR: Duration = Duration::from_secs(600);
const KEEP: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub version: u8,
    /// The sender's Raft id: where the pages are asked for.
    pub from: u64,
    pub id: u64,
    pub index: u64,
    pub term: u64,
    /// The catalog's column family in the checkpoint.
    pub cf: String,
}

impl Ticket {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(postcard::to_allocvec(self).unwrap_or_default());
        b
    }

    /// `None` for snapshot data of the older inline form.
    pub fn decode(data: &[u8]) -> Option<Result<Ticket, String>> {
        let rest = data.strip_prefix(MAGIC.as_slice())?;
        Some(postcard::from_bytes(rest).map_err(|e| format!("snapshot ticket: {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} is not held here (it expired, or this node restarted); ask for a new one")]
    Unknown(u64),
    #[error("snapshot storage: {0}")]
    Io(String),
}

struct Checkpoint {
    ticket: Ticket,
    dir: PathBuf,
    created: Instant,
    /// Opened read-only on first use.
    db: Option<Arc<DB>>,
}

/// The checkpoints this node serves snapshots from.
pub struct Checkpoints {
    dir: PathBuf,
    me: u64,
    held: Mutex<Vec<Checkpoint>>,
}

impl Checkpoints {
    /// Removes what an earlier run left: nobody can be reading it.
    pub fn new(data: &Path, me: u64) -> Result<Checkpoints, SnapshotError> {
        let dir = data.join("snapshots");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| SnapshotError::Io(format!("clearing {}: {e}", dir.display())))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| SnapshotError::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(Checkpoints { dir, me, held: Mutex::new(Vec::new()) })
    }

    /// A ticket for the catalog at `index` (at least `want`): a recent checkpoint, or a new one.
    /// Called on the consensus thread, where the catalog does not move.
    pub fn ticket(&self, db: &DB, want: u64, index: u64, term: u64, cf: &str) -> Result<Ticket, SnapshotError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = held.iter().rev().find(|c| c.ticket.index >= want && c.created.elapsed() < REUSE_FOR) {
            return Ok(c.ticket.clone());
        }
        let id = held.last().map_or(1, |c| c.ticket.id + 1);
        let path = self.dir.join(format!("{index:020}-{id}"));
        let started = Instant::now();
        rocksdb::checkpoint::Checkpoint::new(db)
            .and_then(|c| c.create_checkpoint(&path))
            .map_err(|e| SnapshotError::Io(format!("checkpoint {}: {}", path.display(), e.into_string())))?;
        info!(index, id, ms = started.elapsed().as_millis() as u64, "catalog checkpoint taken for a snapshot");
        let ticket = Ticket { version: 1, from: self.me, id, index, term, cf: cf.to_string() };
        held.push(Checkpoint { ticket: ticket.clone(), dir: path, created: Instant::now(), db: None });
        while held.len() > KEEP {
            let old = held.remove(0);
            drop(old.db);
            if let Err(e) = std::fs::remove_dir_all(&old.dir) {
                warn!(dir = %old.dir.display(), error = %e, "cannot remove an old checkpoint");
            }
        }
        Ok(ticket)
    }

    fn open(&self, id: u64) -> Result<(Arc<DB>, String), SnapshotError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let c = held.iter_mut().find(|c| c.ticket.id == id).ok_or(SnapshotError::Unknown(id))?;
        if c.db.is_none() {
            let opts = Options::default();
            let cfs = DB::list_cf(&opts, &c.dir).map_err(|e| SnapshotError::Io(e.into_string()))?;
            let db = DB::open_cf_for_read_only(&opts, &c.dir, cfs, false).map_err(|e| {
                SnapshotError::Io(format!("opening checkpoint {}: {}", c.dir.display(), e.into_string()))
            })?;
            c.db = Some(Arc::new(db));
        }
        let db = c.db.clone().ok_or(SnapshotError::Unknown(id))?;
        Ok((db, c.ticket.cf.clone()))
    }

    /// Catalog pairs of checkpoint `id` after the key `after` (from the start when `None`), about
    /// `max_bytes` of them; `true` when this page is the last.
    #[allow(clippy::type_complexity)]
    pub fn page(
        &self,
        id: u64,
        after: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, bool), SnapshotError> {
        let max_bytes = max_bytes.clamp(*PAGE_RANGE.start(), *PAGE_RANGE.end());
        let (db, cf_name) = self.open(id)?;
        let cf = db.cf_handle(&cf_name).ok_or_else(|| SnapshotError::Io(format!("checkpoint lacks {cf_name}")))?;
        let mode = match after {
            Some(k) => IteratorMode::From(k, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut pairs = Vec::new();
        let mut bytes = 0;
        for item in db.iterator_cf(cf, mode) {
            let (k, v) = item.map_err(|e| SnapshotError::Io(e.into_string()))?;
            if after.is_some_and(|a| *k == *a) {
                continue;
            }
            if bytes >= max_bytes {
                return Ok((pairs, false));
            }
            bytes += k.len() + v.len() + 8;
            pairs.push((k.to_vec(), v.to_vec()));
        }
        Ok((pairs, true))
    }
}

/// Fetches every page of a ticket through `fetch` and hands each to `write`; returns the
/// pairs written. `fetch(after)` returns a page and whether it was the last.
#[allow(clippy::type_complexity)]
pub fn transfer(
    mut fetch: impl FnMut(Option<&[u8]>) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, bool), String>,
    mut write: impl FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), String>,
) -> Result<u64, String> {
    let mut after: Option<Vec<u8>> = None;
    let mut n = 0u64;
    loop {
        let (pairs, done) = fetch(after.as_deref())?;
        if let Some((k, _)) = pairs.last() {
            if after.as_deref().is_some_and(|a| k.as_slice() <= a) {
                return Err("the sender's pages go backwards".into());
            }
            after = Some(k.clone());
        } else if !done {
            return Err("the sender sent an empty page before the end".into());
        }
        n += pairs.len() as u64;
        write(pairs)?;
        if done {
            return Ok(n);
        }
    }
}

/// The inactive catalog's name, given the active one.
pub fn other_catalog(active: &str) -> &'static str {
    if active == crate::store::CF_CATALOG { crate::store::CF_CATALOG_B } else { crate::store::CF_CATALOG }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_inline_data_is_told_apart() {
        let t = Ticket { version: 1, from: 7, id: 3, index: 99, term: 4, cf: "catalog".into() };
        assert_eq!(Ticket::decode(&t.encode()), Some(Ok(t)));
        assert_eq!(Ticket::decode(b"\x05\x01a\x01b"), None);
        assert!(matches!(Ticket::decode(b"XVSNAP01\xff"), Some(Err(_))));
    }

    #[test]
    fn a_checkpoint_is_served_in_pages_as_it_was_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let db = store.db().clone();
        let cf = db.cf_handle(crate::store::CF_CATALOG).unwrap();
        for i in 0..30_000u32 {
            db.put_cf(cf, format!("c{i:08}"), vec![1u8; 300]).unwrap();
        }
        let cps = Checkpoints::new(dir.path(), 1).unwrap();
        let t = cps.ticket(&db, 5, 5, 2, crate::store::CF_CATALOG).unwrap();
        assert_eq!(cps.ticket(&db, 5, 9, 2, crate::store::CF_CATALOG).unwrap(), t, "a recent checkpoint is reused");
        // Written after the checkpoint: not in the snapshot.
        db.put_cf(cf, b"c99999999", b"late").unwrap();
        let mut got = Vec::new();
        let mut pages = 0;
        let n = transfer(
            |after| {
                pages += 1;
                cps.page(t.id, after, PAGE_BYTES).map_err(|e| e.to_string())
            },
            |pairs| {
                got.extend(pairs);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 30_000);
        assert!(pages >= 3, "{pages} pages");
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "every pair once, in order");
        assert!(!got.iter().any(|(k, _)| k == b"c99999999"));
        assert!(matches!(cps.page(t.id + 5, None, PAGE_BYTES), Err(SnapshotError::Unknown(_))));
        // A newer snapshot asked for makes a new checkpoint; two are kept.
        let t2 = cps.ticket(&db, 10, 10, 2, crate::store::CF_CATALOG).unwrap();
        let t3 = cps.ticket(&db, 11, 11, 2, crate::store::CF_CATALOG).unwrap();
        assert!(t2.id != t.id && t3.id != t2.id);
        assert!(matches!(cps.page(t.id, None, PAGE_BYTES), Err(SnapshotError::Unknown(_))), "the oldest is dropped");
        assert_eq!(std::fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 2);
    }
}
