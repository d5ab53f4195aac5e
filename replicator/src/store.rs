//! The node's durable store: one RocksDB holding this node's chunk envelopes, the applied
//! cluster catalog (see `catalog`) and the Raft log (see `raft_log`).
//!
//! Column families and keys (`tenant` never contains a NUL byte, see `identity::check_name`):
//!
//! ```text
//! chunks        tenant ‖ 0 ‖ chunk id (32)   → envelope bytes (BlobDB: large values in blob files)
//! chunk_index   tenant ‖ 0 ‖ chunk id (32)   → postcard(IndexEntry): the chunks this node holds
//! catalog       see `catalog`                 the replicated state machine, as applied here
//! raft          see `raft_log`                log entries, hard state, conf state, applied index
//! ```
//!
//! Invariants:
//! - A chunk and its local index entry are written in one batch: the local index never names
//!   a chunk that is not stored. Every chunk write is synced (WAL fsync) before it is
//!   acknowledged.
//! - The storage checksum (`blake3(envelope)`) is checked before a chunk is stored and before
//!   it is served; a damaged chunk is reported, never served.

use std::path::Path;

use exclave::chunk_id::{Checksum, ChunkId};
use exclave::envelope;
use std::sync::Arc;

use exclave::protocol::{ErrorCode, PutChunk};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

pub use crate::catalog::IndexEntry;
use crate::catalog::{CatalogError, CatalogRead};

const CF_CHUNKS: &str = "chunks";
const CF_INDEX: &str = "chunk_index";
pub const CF_CATALOG: &str = "catalog";
pub const CF_RAFT: &str = "raft";

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
    #[error("index entry damaged: {0}")]
    Decode(String),
}

impl From<CatalogError> for StoreError {
    fn from(e: CatalogError) -> StoreError {
        match e {
            CatalogError::Storage(s) => StoreError::Io(s),
            CatalogError::Decode(s) => StoreError::Decode(s),
        }
    }
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Full(_) => ErrorCode::StorageFull,
            StoreError::Io(_) | StoreError::Open { .. } | StoreError::Decode(_) => ErrorCode::StorageError,
            StoreError::Corrupt { .. } => ErrorCode::Corrupt,
            StoreError::Malformed(..) => ErrorCode::BadRequest,
            StoreError::NotFound(_) => ErrorCode::NotFound,
        }
    }
}

pub fn db_err(e: rocksdb::Error) -> StoreError {
    let s = e.into_string();
    if s.contains("No space left") || s.contains("ENOSPC") || s.contains("NoSpace") {
        StoreError::Full(s)
    } else {
        StoreError::Io(s)
    }
}

pub struct Store {
    db: Arc<DB>,
}

fn chunk_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 33);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
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
            ColumnFamilyDescriptor::new(CF_CATALOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| open_err(e.into_string()))?;
        Ok(Store { db: Arc::new(db) })
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::Io(format!("column family {name} missing")))
    }

    /// The applied catalog, for reads.
    pub fn catalog(&self) -> Result<CatalogView<'_>, StoreError> {
        Ok(CatalogView { db: &self.db, cf: self.cf(CF_CATALOG)? })
    }

    pub fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    /// Which of `ids` this node does not hold.
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

    pub fn estimate_keys(&self, cf: &str) -> u64 {
        self.cf(cf)
            .ok()
            .and_then(|h| self.db.property_int_value_cf(h, "rocksdb.estimate-num-keys").ok().flatten())
            .unwrap_or(0)
    }

    /// Chunks held by this node (RocksDB's estimate).
    pub fn chunk_count(&self) -> u64 {
        self.estimate_keys(CF_INDEX)
    }

    /// Flushes memtables so that a clean shutdown leaves nothing to replay.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_CHUNKS, CF_INDEX, CF_CATALOG, CF_RAFT] {
            self.db.flush_cf(self.cf(cf)?).map_err(db_err)?;
        }
        Ok(())
    }
}

/// The catalog column family seen through `CatalogRead`.
pub struct CatalogView<'a> {
    db: &'a DB,
    cf: &'a rocksdb::ColumnFamily,
}

fn cat_err(e: rocksdb::Error) -> CatalogError {
    CatalogError::Storage(e.into_string())
}

impl CatalogRead for CatalogView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CatalogError> {
        self.db.get_cf(self.cf, key).map_err(cat_err)
    }

    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), CatalogError> {
        for item in self.db.iterator_cf(self.cf, IteratorMode::From(start.max(prefix), Direction::Forward)) {
            let (k, v) = item.map_err(cat_err)?;
            if !k.starts_with(prefix) || !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, CatalogError> {
        self.db
            .batched_multi_get_cf(self.cf, keys, false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|p| p.to_vec())).map_err(cat_err))
            .collect()
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
}
