//! The Raft log and its state, persisted in the store's `raft` column family, and the
//! `raft::Storage` view of them that the consensus module reads.
//!
//! Keys:
//!
//! ```text
//! e ‖ index (u64 BE) → protobuf(Entry)
//! t ‖ index (u64 BE) → term (u64 BE)    kept apart so terms load without reading entries
//! hs                 → protobuf(HardState)
//! cs                 → protobuf(ConfState)  the configuration as of the applied index
//! sm                 → index ‖ term (u64 BE each): the last entry compacted away or
//!                      covered by an installed snapshot
//! ap                 → applied index (u64 BE), written in the same batch as what was applied
//! ```
//!
//! Raft snapshots are not stored in the log: a leader asked for one takes a checkpoint of the
//! applied catalog (metadata only, never chunks) and sends a ticket for it; the receiver
//! fetches the catalog page by page into its inactive catalog family and switches to it in
//! one batch with the snapshot's Raft state (see `snapshot`). Without checkpoints (tests), or
//! from an older leader, the catalog travels inline in the message.
//!
//! Every method that writes returns only once RocksDB accepted the write; an error here is
//! fatal to the node (see `consensus`), which then restarts from what is on disk.

use std::collections::VecDeque;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch, WriteOptions};

use crate::catalog::Write;
use crate::snapshot::Checkpoints;
use crate::store::{ACTIVE_CATALOG_KEY, CF_RAFT, CatalogSlot};

const HS: &[u8] = b"hs";
const CS: &[u8] = b"cs";
const SM: &[u8] = b"sm";
const AP: &[u8] = b"ap";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log storage: {0}")]
    Db(String),
    #[error("raft log damaged: {0}")]
    Decode(String),
}

fn db_err(e: rocksdb::Error) -> LogError {
    LogError::Db(e.into_string())
}

fn pb_err(e: protobuf::ProtobufError) -> LogError {
    LogError::Decode(e.to_string())
}

fn key(tag: u8, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn u64_of(v: &[u8]) -> Result<u64, LogError> {
    v.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| LogError::Decode("short integer".into()))
}

pub struct RaftLog {
    db: Arc<DB>,
    catalog: CatalogSlot,
    checkpoints: Option<Arc<Checkpoints>>,
    hs: HardState,
    cs: ConfState,
    /// Index and term of the entry just before the first one held.
    snap_index: u64,
    snap_term: u64,
    /// Terms of the entries held, from `snap_index + 1`.
    terms: VecDeque<u64>,
    applied: u64,
}

impl RaftLog {
    pub fn open(db: Arc<DB>, catalog: CatalogSlot, checkpoints: Option<Arc<Checkpoints>>) -> Result<RaftLog, LogError> {
        let mut log = RaftLog {
            db,
            catalog,
            checkpoints,
            hs: HardState::default(),
            cs: ConfState::default(),
            snap_index: 0,
            snap_term: 0,
            terms: VecDeque::new(),
            applied: 0,
        };
        let db = log.db.clone();
        let cf = db.cf_handle(CF_RAFT).ok_or_else(|| LogError::Db("column family raft missing".into()))?;
        if let Some(v) = log.db.get_cf(cf, HS).map_err(db_err)? {
            log.hs = HardState::parse_from_bytes(&v).map_err(pb_err)?;
        }
        if let Some(v) = log.db.get_cf(cf, CS).map_err(db_err)? {
            log.cs = ConfState::parse_from_bytes(&v).map_err(pb_err)?;
        }
        if let Some(v) = log.db.get_cf(cf, SM).map_err(db_err)? {
            log.snap_index = u64_of(&v)?;
            log.snap_term = u64_of(v.get(8..).unwrap_or_default())?;
        }
        if let Some(v) = log.db.get_cf(cf, AP).map_err(db_err)? {
            log.applied = u64_of(&v)?;
        }
        // The commit index is written after the entries a Ready carries are applied: a node
        // that stopped between holds an applied index ahead of it, which Raft refuses at
        // start. Whatever was applied had been committed, so the commit index is raised to it.
        if log.applied > log.hs.commit {
            log.hs.commit = log.applied;
        }
        let start = key(b't', log.snap_index + 1);
        for (expect, item) in
            (log.snap_index + 1..).zip(db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)))
        {
            let (k, v) = item.map_err(db_err)?;
            if k.first() != Some(&b't') {
                break;
            }
            let index = u64_of(&k[1..])?;
            if index != expect {
                return Err(LogError::Decode(format!("log has a gap: entry {expect} missing, {index} found")));
            }
            log.terms.push_back(u64_of(&v)?);
        }
        Ok(log)
    }

    fn cf(&self) -> Result<&rocksdb::ColumnFamily, LogError> {
        self.db.cf_handle(CF_RAFT).ok_or_else(|| LogError::Db("column family raft missing".into()))
    }

    fn catalog_name(&self) -> &'static str {
        *self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_cf(&self) -> Result<&rocksdb::ColumnFamily, LogError> {
        let name = self.catalog_name();
        self.db.cf_handle(name).ok_or_else(|| LogError::Db(format!("column family {name} missing")))
    }

    /// The catalog's writes, and this node's deletions of swept chunks: in one batch, so that
    /// a sweep's applied index and the deletion of the node's copies are never apart.
    fn add_writes(&self, batch: &mut WriteBatch, writes: Vec<Write>) -> Result<(), LogError> {
        let cat = self.catalog_cf()?;
        for w in writes {
            match w {
                Write::Put(k, v) => batch.put_cf(cat, k, v),
                Write::Delete(k) => batch.delete_cf(cat, k),
                Write::DropChunk { tenant, id } => {
                    let cf = self
                        .db
                        .cf_handle(crate::store::CF_INDEX)
                        .ok_or_else(|| LogError::Db("column family chunk_index missing".into()))?;
                    batch.delete_cf(cf, crate::store::chunk_key(&tenant, &id));
                }
            }
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), LogError> {
        let mut w = WriteOptions::default();
        w.set_sync(sync);
        self.db.write_opt(batch, &w).map_err(db_err)
    }

    /// Whether this node has never been part of a cluster.
    pub fn is_blank(&self) -> bool {
        self.hs == HardState::default() && self.cs == ConfState::default() && self.terms.is_empty()
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.cs
    }

    pub fn first(&self) -> u64 {
        self.snap_index + 1
    }

    pub fn last(&self) -> u64 {
        self.snap_index + self.terms.len() as u64
    }

    /// The first start of a cluster's founding members: every one of them starts from the
    /// same configuration at index 1, so a node added later has no log from index 1 and
    /// catches up through a snapshot that carries the configuration.
    pub fn bootstrap(&mut self, cs: ConfState, founding: Vec<Write>) -> Result<(), LogError> {
        let hs = HardState { term: 1, commit: 1, ..Default::default() };
        let mut batch = WriteBatch::default();
        let cf = self.cf()?;
        batch.put_cf(cf, HS, hs.write_to_bytes().map_err(pb_err)?);
        batch.put_cf(cf, CS, cs.write_to_bytes().map_err(pb_err)?);
        batch.put_cf(cf, SM, [1u64.to_be_bytes(), 1u64.to_be_bytes()].concat());
        batch.put_cf(cf, AP, 1u64.to_be_bytes());
        self.add_writes(&mut batch, founding)?;
        self.write(batch, true)?;
        (self.hs, self.cs, self.snap_index, self.snap_term, self.applied) = (hs, cs, 1, 1, 1);
        Ok(())
    }

    /// Appends entries (replacing any conflicting suffix) and the hard state, in one write.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>, sync: bool) -> Result<(), LogError> {
        let cf = self.cf()?;
        let mut batch = WriteBatch::default();
        if let Some(first) = entries.first() {
            if first.index <= self.snap_index || first.index > self.last() + 1 {
                return Err(LogError::Decode(format!(
                    "append at {} outside the log ({}..={})",
                    first.index,
                    self.first(),
                    self.last()
                )));
            }
            for i in first.index..=self.last() {
                batch.delete_cf(cf, key(b'e', i));
                batch.delete_cf(cf, key(b't', i));
            }
            for e in entries {
                batch.put_cf(cf, key(b'e', e.index), e.write_to_bytes().map_err(pb_err)?);
                batch.put_cf(cf, key(b't', e.index), e.term.to_be_bytes());
            }
        }
        if let Some(hs) = hs {
            batch.put_cf(cf, HS, hs.write_to_bytes().map_err(pb_err)?);
        }
        self.write(batch, sync)?;
        if let Some(first) = entries.first() {
            self.terms.truncate((first.index - self.snap_index - 1) as usize);
            self.terms.extend(entries.iter().map(|e| e.term));
        }
        if let Some(hs) = hs {
            self.hs = hs.clone();
        }
        Ok(())
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<(), LogError> {
        let mut hs = self.hs.clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs), false)
    }

    /// Applies catalog writes and moves the applied index (and configuration) in one write.
    pub fn apply(&mut self, writes: Vec<Write>, applied: u64, cs: Option<&ConfState>) -> Result<(), LogError> {
        let cf = self.cf()?;
        let mut batch = WriteBatch::default();
        self.add_writes(&mut batch, writes)?;
        batch.put_cf(cf, AP, applied.to_be_bytes());
        if let Some(cs) = cs {
            batch.put_cf(cf, CS, cs.write_to_bytes().map_err(pb_err)?);
        }
        // Not synced: the log holds the entry, and a lost tail is applied again on restart.
        self.write(batch, false)?;
        self.applied = applied;
        if let Some(cs) = cs {
            self.cs = cs.clone();
        }
        Ok(())
    }

    /// Replaces the catalog and the log with a snapshot whose catalog travelled inline.
    pub fn install(&mut self, snap: &Snapshot) -> Result<(), LogError> {
        let pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> =
            postcard::from_bytes(&snap.data).map_err(|e| LogError::Decode(format!("snapshot data: {e}")))?;
        let cat = self.catalog_cf()?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cat, [0u8].as_slice(), [0xffu8; 8].as_slice());
        for (k, v) in pairs {
            batch.put_cf(cat, k, v);
        }
        self.install_state(snap, batch)
    }

    /// Empties the catalog family not in use and returns it: a streamed snapshot is written
    /// there, and nothing reads it until `install_streamed` switches to it.
    pub fn prepare_staging(&self) -> Result<&'static str, LogError> {
        let name = crate::snapshot::other_catalog(self.catalog_name());
        let cf = self.db.cf_handle(name).ok_or_else(|| LogError::Db(format!("column family {name} missing")))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 8].as_slice());
        self.write(batch, false)?;
        Ok(name)
    }

    /// Writes one page of a streamed snapshot into the staging family (unsynced: the switch
    /// is synced, and a crash before it leaves the old catalog in use).
    pub fn write_staging(&self, name: &str, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), LogError> {
        let cf = self.db.cf_handle(name).ok_or_else(|| LogError::Db(format!("column family {name} missing")))?;
        let mut batch = WriteBatch::default();
        for (k, v) in pairs {
            batch.put_cf(cf, k, v);
        }
        self.write(batch, false)
    }

    /// Makes the staging family, now holding the whole snapshot, the catalog, with the
    /// snapshot's Raft state, in one synced batch.
    pub fn install_streamed(&mut self, snap: &Snapshot, staging: &'static str) -> Result<(), LogError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf()?, ACTIVE_CATALOG_KEY, staging.as_bytes());
        self.install_state(snap, batch)?;
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = staging;
        Ok(())
    }

    /// The snapshot's Raft state, written with `batch` (the catalog's side of the install).
    fn install_state(&mut self, snap: &Snapshot, mut batch: WriteBatch) -> Result<(), LogError> {
        let meta = snap.get_metadata();
        let cf = self.cf()?;
        batch.delete_range_cf(cf, key(b'e', 0), key(b'e', u64::MAX));
        batch.delete_range_cf(cf, key(b't', 0), key(b't', u64::MAX));
        let mut hs = self.hs.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        batch.put_cf(cf, HS, hs.write_to_bytes().map_err(pb_err)?);
        batch.put_cf(cf, CS, meta.get_conf_state().write_to_bytes().map_err(pb_err)?);
        batch.put_cf(cf, SM, [meta.index.to_be_bytes(), meta.term.to_be_bytes()].concat());
        batch.put_cf(cf, AP, meta.index.to_be_bytes());
        self.write(batch, true)?;
        self.hs = hs;
        self.cs = meta.get_conf_state().clone();
        (self.snap_index, self.snap_term, self.applied) = (meta.index, meta.term, meta.index);
        self.terms.clear();
        Ok(())
    }

    /// Drops entries before `to` (which must be applied).
    pub fn compact(&mut self, to: u64) -> Result<(), LogError> {
        if to <= self.first() || to > self.applied + 1 {
            return Ok(());
        }
        let term = self.term_of(to - 1)?;
        let cf = self.cf()?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, key(b'e', 0), key(b'e', to));
        batch.delete_range_cf(cf, key(b't', 0), key(b't', to));
        batch.put_cf(cf, SM, [(to - 1).to_be_bytes(), term.to_be_bytes()].concat());
        self.write(batch, false)?;
        let drop = (to - 1 - self.snap_index) as usize;
        self.terms.drain(..drop);
        (self.snap_index, self.snap_term) = (to - 1, term);
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Result<u64, LogError> {
        raft::Storage::term(self, idx).map_err(|e| LogError::Decode(e.to_string()))
    }

    /// The applied catalog as snapshot data: postcard list of (key, value).
    fn catalog_dump(&self) -> Result<Vec<u8>, LogError> {
        let cat = self.catalog_cf()?;
        let snap = self.db.snapshot();
        let mut pairs = Vec::new();
        for item in snap.iterator_cf(cat, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            pairs.push((serde_bytes::ByteBuf::from(k.to_vec()), serde_bytes::ByteBuf::from(v.to_vec())));
        }
        postcard::to_allocvec(&pairs).map_err(|e| LogError::Decode(e.to_string()))
    }
}

fn other(e: LogError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hs.clone(), self.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let cf = self.cf().map_err(other)?;
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        let start = key(b'e', low);
        for item in self.db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(|e| other(db_err(e)))?;
            if k.first() != Some(&b'e') || u64_of(&k[1..]).map_err(other)? >= high {
                break;
            }
            size += v.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(Entry::parse_from_bytes(&v).map_err(|e| other(pb_err(e)))?);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index {
            return Ok(self.snap_term);
        }
        if idx < self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.terms.get((idx - self.snap_index - 1) as usize) {
            Some(t) => Ok(*t),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut meta = SnapshotMetadata {
            index: self.applied,
            term: raft::Storage::term(self, self.applied)?,
            ..Default::default()
        };
        meta.set_conf_state(self.cs.clone());
        let data = match &self.checkpoints {
            Some(cps) => cps
                .ticket(&self.db, request_index, meta.index, meta.term, self.catalog_name())
                .map_err(|e| other(LogError::Db(e.to_string())))?
                .encode(),
            None => self.catalog_dump().map_err(other)?,
        };
        let mut snap = Snapshot { data: data.into(), ..Default::default() };
        snap.set_metadata(meta);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
    }

    fn open(dir: &std::path::Path) -> RaftLog {
        let store = crate::store::Store::open(dir).unwrap();
        RaftLog::open(store.db().clone(), store.catalog_slot(), None).unwrap()
    }

    #[test]
    fn log_survives_reopen_truncates_conflicts_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path());
        assert!(log.is_blank());
        let cs = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        log.bootstrap(cs.clone(), vec![Write::Put(b"nx".to_vec(), b"m".to_vec())]).unwrap();
        assert_eq!((log.first(), log.last(), log.term(1).unwrap()), (2, 1, 1));
        log.persist(&[entry(2, 1), entry(3, 1), entry(4, 2)], None, true).unwrap();
        // A new leader overwrites the conflicting tail.
        log.persist(&[entry(4, 3), entry(5, 3)], None, true).unwrap();
        let mut hs = HardState::default();
        (hs.term, hs.vote, hs.commit) = (3, 2, 5);
        log.persist(&[], Some(&hs), true).unwrap();
        log.apply(vec![Write::Put(b"kx".to_vec(), b"v".to_vec())], 4, None).unwrap();
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(log.initial_state().unwrap().hard_state, hs);
        assert_eq!(log.initial_state().unwrap().conf_state, cs);
        assert_eq!((log.first(), log.last(), log.applied()), (2, 5, 4));
        assert_eq!(log.term(4).unwrap(), 3);
        let all = log.entries(2, 6, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(all.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(), vec![(2, 1), (3, 1), (4, 3), (5, 3)]);
        assert_eq!(log.entries(2, 6, Some(1), GetEntriesContext::empty(false)).unwrap().len(), 1, "at least one");

        let snap = log.snapshot(0, 2).unwrap();
        assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (4, 3));
        log.compact(4).unwrap();
        assert!(matches!(
            log.entries(2, 4, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!((log.first(), log.term(3).unwrap()), (4, 1));
        drop(log);
        let mut log = open(dir.path());
        assert_eq!((log.first(), log.last()), (4, 5));
        // Stopped after applying entry 5 and before its commit index was written: the commit
        // index comes back raised to what was applied (Raft refuses applied > committed).
        log.persist(&[], Some(&HardState { commit: 4, ..hs.clone() }), true).unwrap();
        log.apply(vec![], 5, None).unwrap();
        drop(log);
        let log = open(dir.path());
        assert_eq!((log.initial_state().unwrap().hard_state.commit, log.applied()), (5, 5));

        // Another node installs the snapshot: same catalog, log restarts after it.
        let dir2 = tempfile::tempdir().unwrap();
        let mut other = open(dir2.path());
        other.install(&snap).unwrap();
        assert_eq!((other.first(), other.last(), other.applied()), (5, 4, 4));
        assert_eq!(other.conf_state(), &cs);
        drop(other);
        let s2 = crate::store::Store::open(dir2.path()).unwrap();
        let view = s2.catalog().unwrap();
        use crate::catalog::CatalogRead;
        assert_eq!(view.get(b"nx").unwrap(), Some(b"m".to_vec()));
        assert_eq!(view.get(b"kx").unwrap(), Some(b"v".to_vec()));
    }
}
