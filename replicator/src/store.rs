//! The node's durable store: chunk envelopes, the chunk index and the snapshot catalog, in
//! RocksDB.
//!
//! Column families and keys (`tenant` never contains a NUL byte, see `identity::check_name`):
//!
//! ```text
//! chunks        tenant ‖ 0 ‖ chunk id (32)                → envelope bytes (BlobDB: large values in blob files)
//! chunk_index   tenant ‖ 0 ‖ chunk id (32)                → postcard(IndexEntry { envelope_len, checksum })
//! snapshots     tenant ‖ 0 ‖ source ‖ 0 ‖ time (i64 BE) ‖ snapshot id → postcard(SnapshotInfo)
//! snapshot_ids  tenant ‖ 0 ‖ snapshot id                  → source ‖ 0 ‖ time (i64 BE)  (lookup by id)
//! snapshot_refs tenant ‖ 0 ‖ snapshot id ‖ 0 ‖ batch (u32 BE) → postcard(Vec<ChunkId>)  (for GC)
//! ```
//!
//! Invariants:
//! - A chunk and its index entry are written in one batch: the index never names a chunk
//!   that is not stored. Every write that is acknowledged is synced (WAL fsync) first.
//! - A snapshot is written only after every chunk it references is in the index, in one
//!   synced batch with its references.
//! - The storage checksum (`blake3(envelope)`) is checked before a chunk is stored and before
//!   it is served; a damaged chunk is reported, never served.

use std::path::Path;

use exclave::chunk_id::{Checksum, ChunkId};
use exclave::envelope;
use exclave::protocol::{ErrorCode, PutChunk, SnapshotInfo};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

const CF_CHUNKS: &str = "chunks";
const CF_INDEX: &str = "chunk_index";
const CF_SNAPSHOTS: &str = "snapshots";
const CF_SNAPSHOT_IDS: &str = "snapshot_ids";
const CF_REFS: &str = "snapshot_refs";
/// Most missing ids listed in one refusal (the agent re-sends those and tries again).
const MAX_MISSING_REPORTED: usize = 32 * 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexEntry {
    pub envelope_len: u32,
    pub checksum: Checksum,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the data directory {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("storage is full: {0}")]
    Full(String),
    #[error("storage error: {0}")]
    Io(String),
    #[error("chunk {id} failed its storage checksum ({context})")]
    Corrupt { id: ChunkId, context: &'static str },
    #[error("chunk {0} is malformed: {1}")]
    Malformed(ChunkId, String),
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    #[error("{} referenced chunks are not stored", .0.len())]
    Missing(Vec<ChunkId>),
    #[error("index entry damaged: {0}")]
    Decode(String),
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Full(_) => ErrorCode::StorageFull,
            StoreError::Io(_) | StoreError::Open { .. } | StoreError::Decode(_) => ErrorCode::StorageError,
            StoreError::Corrupt { .. } => ErrorCode::Corrupt,
            StoreError::Malformed(..) => ErrorCode::BadRequest,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Missing(_) => ErrorCode::MissingChunks,
        }
    }
}

fn db_err(e: rocksdb::Error) -> StoreError {
    let s = e.into_string();
    if s.contains("No space left") || s.contains("ENOSPC") || s.contains("NoSpace") {
        StoreError::Full(s)
    } else {
        StoreError::Io(s)
    }
}

pub struct Store {
    db: DB,
    /// Serialises commits: the commit sequence is read, incremented and written with the snapshot.
    commit_lock: std::sync::Mutex<()>,
}

/// Key of the commit sequence counter in `snapshot_ids` (no tenant name is empty).
const COMMIT_SEQ_KEY: &[u8] = b"\0commit_seq";

fn chunk_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 33);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

fn tenant_prefix(tenant: &str) -> Vec<u8> {
    let mut k = tenant.as_bytes().to_vec();
    k.push(0);
    k
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open { path: path.display().to_string(), reason };
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;
        // Probe writability up front: RocksDB's own message for a read-only directory is obscure.
        let probe = path.join(".write-probe");
        std::fs::write(&probe, b"probe").map_err(|e| open_err(format!("not writable: {e}")))?;
        let _ = std::fs::remove_file(&probe);

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let mut chunks = Options::default();
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(2048);
        chunks.set_blob_file_size(256 * 1024 * 1024);
        chunks.set_enable_blob_gc(true);
        // Envelopes are compressed and encrypted already; compressing again only costs CPU.
        chunks.set_compression_type(rocksdb::DBCompressionType::None);
        chunks.set_blob_compression_type(rocksdb::DBCompressionType::None);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_INDEX, Options::default()),
            ColumnFamilyDescriptor::new(CF_SNAPSHOTS, Options::default()),
            ColumnFamilyDescriptor::new(CF_SNAPSHOT_IDS, Options::default()),
            ColumnFamilyDescriptor::new(CF_REFS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| open_err(e.into_string()))?;
        Ok(Store { db, commit_lock: std::sync::Mutex::new(()) })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::Io(format!("column family {name} missing")))
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// Which of `ids` are not in the index.
    pub fn missing(&self, tenant: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let cf = self.cf(CF_INDEX)?;
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| chunk_key(tenant, id)).collect();
        let mut out = Vec::new();
        for (id, r) in ids.iter().zip(self.db.batched_multi_get_cf(cf, &keys, false)) {
            if r.map_err(db_err)?.is_none() {
                out.push(*id);
            }
        }
        Ok(out)
    }

    /// Verifies and stores envelopes; returns how many were new. Durable when it returns.
    pub fn put_chunks(&self, tenant: &str, chunks: &[PutChunk]) -> Result<usize, StoreError> {
        for c in chunks {
            if Checksum::of(&c.envelope) != c.checksum {
                return Err(StoreError::Corrupt { id: c.id, context: "damaged in transit" });
            }
            envelope::parse_header(&c.envelope).map_err(|e| StoreError::Malformed(c.id, e.to_string()))?;
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let missing: std::collections::HashSet<ChunkId> = self.missing(tenant, &ids)?.into_iter().collect();
        let (cf_chunks, cf_index) = (self.cf(CF_CHUNKS)?, self.cf(CF_INDEX)?);
        let mut batch = WriteBatch::default();
        let mut new = 0;
        for c in chunks.iter().filter(|c| missing.contains(&c.id)) {
            let key = chunk_key(tenant, &c.id);
            let entry = IndexEntry { envelope_len: c.envelope.len() as u32, checksum: c.checksum };
            batch.put_cf(cf_chunks, &key, &c.envelope);
            batch.put_cf(cf_index, &key, encode(&entry));
            new += 1;
        }
        if new > 0 {
            self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        }
        Ok(new)
    }

    pub fn index_entry(&self, tenant: &str, id: &ChunkId) -> Result<Option<IndexEntry>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_INDEX)?, chunk_key(tenant, id)).map_err(db_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Reads an envelope and checks it against its storage checksum.
    pub fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let entry = self.index_entry(tenant, id)?.ok_or(StoreError::NotFound(*id))?;
        let env = self
            .db
            .get_cf(self.cf(CF_CHUNKS)?, chunk_key(tenant, id))
            .map_err(db_err)?
            .ok_or(StoreError::Corrupt { id: *id, context: "indexed but absent on disk" })?;
        if Checksum::of(&env) != entry.checksum {
            return Err(StoreError::Corrupt { id: *id, context: "damaged on this node's disk" });
        }
        Ok(env)
    }

    pub fn snapshot(&self, tenant: &str, snapshot_id: &str) -> Result<Option<SnapshotInfo>, StoreError> {
        let mut k = tenant_prefix(tenant);
        k.extend_from_slice(snapshot_id.as_bytes());
        let Some(loc) = self.db.get_cf(self.cf(CF_SNAPSHOT_IDS)?, &k).map_err(db_err)? else { return Ok(None) };
        let mut sk = tenant_prefix(tenant);
        sk.extend_from_slice(&loc);
        sk.extend_from_slice(snapshot_id.as_bytes());
        match self.db.get_cf(self.cf(CF_SNAPSHOTS)?, &sk).map_err(db_err)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Records a snapshot once every referenced chunk is held. Idempotent by snapshot id.
    /// `stored_bytes` and `chunks` are computed here from the index, not taken from the client.
    pub fn commit(&self, tenant: &str, snap: &SnapshotInfo, refs: &[ChunkId]) -> Result<SnapshotInfo, StoreError> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.snapshot(tenant, &snap.id)? {
            return Ok(existing);
        }
        let mut refs = refs.to_vec();
        refs.push(snap.root);
        refs.sort_unstable();
        refs.dedup();
        let cf = self.cf(CF_INDEX)?;
        let mut missing = Vec::new();
        let mut stored_bytes = 0u64;
        for batch in refs.chunks(4096) {
            let keys: Vec<Vec<u8>> = batch.iter().map(|id| chunk_key(tenant, id)).collect();
            for (id, r) in batch.iter().zip(self.db.batched_multi_get_cf(cf, &keys, false)) {
                match r.map_err(db_err)? {
                    Some(v) => stored_bytes += decode::<IndexEntry>(&v)?.envelope_len as u64,
                    None if missing.len() < MAX_MISSING_REPORTED => missing.push(*id),
                    None => {}
                }
            }
        }
        if !missing.is_empty() {
            return Err(StoreError::Missing(missing));
        }
        let seq = match self.db.get_cf(self.cf(CF_SNAPSHOT_IDS)?, COMMIT_SEQ_KEY).map_err(db_err)? {
            Some(v) => {
                u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Decode("commit seq".into()))?)
            }
            None => 0,
        } + 1;
        let snap = SnapshotInfo { stored_bytes, chunks: refs.len() as u64, commit_seq: seq, ..snap.clone() };
        let mut loc = snap.source.as_bytes().to_vec();
        loc.push(0);
        loc.extend_from_slice(&snap.time.to_be_bytes());
        let mut sk = tenant_prefix(tenant);
        sk.extend_from_slice(&loc);
        sk.extend_from_slice(snap.id.as_bytes());
        let mut idk = tenant_prefix(tenant);
        idk.extend_from_slice(snap.id.as_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SNAPSHOTS)?, &sk, encode(&snap));
        batch.put_cf(self.cf(CF_SNAPSHOT_IDS)?, &idk, &loc);
        batch.put_cf(self.cf(CF_SNAPSHOT_IDS)?, COMMIT_SEQ_KEY, seq.to_be_bytes());
        let cf_refs = self.cf(CF_REFS)?;
        for (i, part) in refs.chunks(16 * 1024).enumerate() {
            let mut rk = idk.clone();
            rk.push(0);
            rk.extend_from_slice(&(i as u32).to_be_bytes());
            batch.put_cf(cf_refs, &rk, encode(&part.to_vec()));
        }
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        Ok(snap)
    }

    /// Snapshots of a tenant (optionally one source), oldest first.
    pub fn snapshots(&self, tenant: &str, source: Option<&str>) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut prefix = tenant_prefix(tenant);
        if let Some(s) = source {
            prefix.extend_from_slice(s.as_bytes());
            prefix.push(0);
        }
        let mut out = Vec::new();
        let it = self.db.iterator_cf(self.cf(CF_SNAPSHOTS)?, IteratorMode::From(&prefix, Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode(&v)?);
        }
        out.sort_by_key(|s: &SnapshotInfo| (s.time, s.commit_seq));
        Ok(out)
    }

    pub fn estimate_keys(&self, cf: &str) -> u64 {
        self.cf(cf)
            .ok()
            .and_then(|h| self.db.property_int_value_cf(h, "rocksdb.estimate-num-keys").ok().flatten())
            .unwrap_or(0)
    }

    pub fn chunk_count(&self) -> u64 {
        self.estimate_keys(CF_INDEX)
    }

    pub fn snapshot_count(&self) -> u64 {
        self.estimate_keys(CF_SNAPSHOT_IDS)
    }

    /// Flushes memtables so that a clean shutdown leaves nothing to replay.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_CHUNKS, CF_INDEX, CF_SNAPSHOTS, CF_SNAPSHOT_IDS, CF_REFS] {
            self.db.flush_cf(self.cf(cf)?).map_err(db_err)?;
        }
        Ok(())
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: u8, body: &[u8]) -> PutChunk {
        // A syntactically valid raw envelope: the node only checks the clear header.
        let mut env = b"XVE\x01\x00\x00\x00\x00\x00\x00".to_vec();
        env.extend_from_slice(&(body.len() as u32).to_le_bytes());
        env.extend_from_slice(&[0u8; 12]);
        env.extend_from_slice(body);
        env.extend_from_slice(&[0u8; 16]);
        PutChunk { id: ChunkId([id; 32]), checksum: Checksum::of(&env), envelope: env }
    }

    fn snap(id: &str, root: u8, time: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            source: "rnpp".into(),
            time,
            root: ChunkId([root; 32]),
            key_fingerprint: "f".into(),
            agent: "a".into(),
            hostname: "h".into(),
            files: 1,
            logical_bytes: 1,
            chunks: 1,
            stored_bytes: 1,
            commit_seq: 0,
        }
    }

    #[test]
    fn chunks_are_scoped_by_tenant_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let c = put(1, b"hello");
        assert_eq!(s.put_chunks("lux", std::slice::from_ref(&c)).unwrap(), 1);
        assert_eq!(s.put_chunks("lux", std::slice::from_ref(&c)).unwrap(), 0, "idempotent");
        assert_eq!(s.get_chunk("lux", &c.id).unwrap(), c.envelope);
        assert!(matches!(s.get_chunk("est", &c.id), Err(StoreError::NotFound(_))));
        assert_eq!(s.missing("est", &[c.id]).unwrap(), vec![c.id]);
        assert!(s.missing("lux", &[c.id]).unwrap().is_empty());

        let mut bad = put(2, b"world");
        bad.envelope[20] ^= 1;
        assert!(matches!(s.put_chunks("lux", &[bad]), Err(StoreError::Corrupt { .. })));
        let mut garbage = put(3, b"x");
        garbage.envelope = b"not an envelope at all, really".to_vec();
        garbage.checksum = Checksum::of(&garbage.envelope);
        assert!(matches!(s.put_chunks("lux", &[garbage]), Err(StoreError::Malformed(..))));
    }

    #[test]
    fn commit_requires_every_chunk_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, root) = (put(1, b"a"), put(9, b"root"));
        s.put_chunks("lux", std::slice::from_ref(&root)).unwrap();
        // Duplicates are allowed: an agent's in-run dedup set is bounded.
        let refs = vec![a.id, root.id, a.id];
        match s.commit("lux", &snap("s1", 9, 10), &refs) {
            Err(StoreError::Missing(m)) => assert_eq!(m, vec![a.id]),
            other => panic!("expected missing, got {other:?}"),
        }
        assert!(s.snapshots("lux", None).unwrap().is_empty());
        s.put_chunks("lux", &[a]).unwrap();
        let committed = s.commit("lux", &snap("s1", 9, 10), &refs).unwrap();
        assert_eq!(committed.chunks, 2, "references are counted once");
        s.commit("lux", &snap("s1", 9, 10), &refs).unwrap();
        s.commit("lux", &snap("s0", 9, 5), &refs).unwrap();
        let list = s.snapshots("lux", Some("rnpp")).unwrap();
        assert_eq!(list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["s0", "s1"]);
        assert!(s.snapshots("est", None).unwrap().is_empty());
        assert!(s.snapshots("lux", Some("rnp")).unwrap().is_empty(), "source prefix must not match");
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.snapshots("lux", None).unwrap().len(), 2, "survives reopen");
        assert!(s.snapshot("lux", "s1").unwrap().is_some());
    }
}
