//! The node's durable store: chunk envelopes appended to pack files, and one RocksDB holding
//! where each chunk is (the local index), the applied cluster catalog (see `catalog`) and the
//! Raft log (see `raft_log`).
//!
//! Why packs: in RocksDB, every envelope was written twice (WAL, then a blob file at flush)
//! through a software CRC32c, costing the node as much CPU as the agent spent chunking,
//! compressing and encrypting, and holding ~2x the envelopes on disk while it ran. A pack is
//! written once, sequentially, and synced; RocksDB only holds 48-byte locations.
//!
//! Layout of a data directory (format 2):
//!
//! ```text
//! DATA/            RocksDB, column families:
//!   chunk_index    tenant ‖ 0 ‖ chunk id (32)   → location (below): the chunks this node holds
//!   store_meta     b"format"                    → u32 LE = 2
//!                  b"sealed" ‖ pack id (u32 BE) → u64 LE: the pack's whole length, once sealed
//!                  see `scrub`                  the scrub's cursor, passes and unrepairable chunks
//!   catalog        see `catalog`                 the replicated state machine, as applied here
//!   catalog_b      the same, when `raft`'s key `cc` names it: a streamed Raft snapshot is
//!                  written into the family not in use, then made the catalog (see `snapshot`)
//!   raft           see `raft_log`                log entries, hard state, conf state, applied index
//! DATA/packs/NNNNNNNN.pack                       pack files, ids from 1
//! DATA/ballast                                   64 MiB of zeros, given back to a full disk
//! ```
//!
//! Full disk: a node keeps `--min-free-mib` free by refusing writes, but something else may
//! fill the disk while it is down, and RocksDB cannot open without writing. The ballast is
//! deleted at open when the disk has less than `BALLAST` free, so the store opens, serves
//! restores and refuses uploads; it is laid down again once there is room.
//!
//! Location (48 bytes): pack id (u32 LE) ‖ offset of the envelope in the pack (u64 LE) ‖
//! envelope length (u32 LE) ‖ storage checksum (32).
//!
//! Pack file: a header `"XVPACK01"` (8 bytes), then records back to back:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "XVRC"
//! 4       4     envelope length n (u32 LE)
//! 8       32    chunk id
//! 40      32    storage checksum = blake3(envelope)
//! 72      1     tenant length t
//! 73      t     tenant
//! 73+t    n     envelope
//! ```
//!
//! A record says what it holds, so a pack can be read without the index (to check it, to
//! rebuild the index, to collect garbage).
//!
//! Durability (a chunk is durable before it is acknowledged):
//! 1. a batch's records are appended to the active pack (one vectored write), then the pack is
//!    synced (fdatasync); a new pack's directory entry is synced when it is created;
//! 2. only then are their locations written to the index, in one synced RocksDB batch.
//!
//! Crash rules: a crash before 2 leaves records no location names: dead space, never served.
//! A crash during 1 can leave a torn record at the end of the pack being written. Each run of
//! the node appends to fresh packs and seals a pack (records its length) when it is full or
//! the node stops cleanly; at open, a pack that was never sealed is walked record by record,
//! a torn tail is cut off (no location can name it: its batch never reached step 2), and the
//! pack is sealed. Every read checks the storage checksum, so a damaged record is reported,
//! never served.
//!
//! Garbage collection (`crate::gc`) reclaims space pack by pack: the live bytes of a pack are
//! those its index locations name; a pack mostly dead is repacked (its live records appended
//! to the active pack, their locations rewritten in one synced batch) and then deleted.
//!
//! Which copy is kept: an upload of a chunk this node already holds is skipped, unless the
//! copy held is one the catalog neither indexes nor has condemned (left by an upload that
//! failed, or a delta refused because its base was swept) and differs from the upload: it is
//! then replaced, so the copy behind a new index entry is the envelope that entry describes
//! (a refused delta would otherwise stay where the whole chunk was sent again).
//!
//! Migration: a data directory of format 1 (envelopes in a `chunks` column family, BlobDB) is
//! converted when opened: every envelope is appended to packs and its location indexed, then
//! the column family is dropped. A crash part way converts again from the start on the next
//! open (what was appended before is dead space).

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use exclave::chunk_id::{Checksum, ChunkId};
use exclave::protocol::{ErrorCode, PutChunk};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use tracing::{info, warn};

use crate::catalog::{CatalogError, CatalogRead};

const CF_CHUNKS_V1: &str = "chunks";
pub const CF_INDEX: &str = "chunk_index";
const CF_META: &str = "store_meta";
pub const CF_CATALOG: &str = "catalog";
pub const CF_CATALOG_B: &str = "catalog_b";
pub const CF_RAFT: &str = "raft";
/// Key in `raft` naming the catalog family in use (absent: `catalog`).
pub const ACTIVE_CATALOG_KEY: &[u8] = b"cc";

/// Which catalog family is in use: shared by the store's readers and the Raft log.
pub type CatalogSlot = Arc<RwLock<&'static str>>;
const FORMAT: u32 = 2;
const PACK_MAGIC: &[u8; 8] = b"XVPACK01";
const RECORD_MAGIC: &[u8; 4] = b"XVRC";
const RECORD_FIXED: usize = 73;
/// A pack is sealed and a new one begun past this size: the unit of garbage collection.
const PACK_TARGET: u64 = 128 * 1024 * 1024;
/// Space set aside in the data directory, freed to let the store open on a full disk.
const BALLAST: u64 = 64 << 20;
const BALLAST_FILE: &str = "ballast";
/// Pack files kept open for reading at once (a large store has thousands).
const OPEN_READERS: usize = 256;

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

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::Full(format!("{what}: {e}"))
    } else {
        StoreError::Io(format!("{what}: {e}"))
    }
}

/// Where a chunk's envelope is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    pub checksum: Checksum,
}

impl Location {
    fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..4].copy_from_slice(&self.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..].copy_from_slice(&self.checksum.0);
        b
    }

    fn decode(b: &[u8]) -> Result<Location, StoreError> {
        if b.len() != 48 {
            return Err(StoreError::Decode(format!("a location is 48 bytes, not {}", b.len())));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[4..12]);
        let mut sum = [0u8; 32];
        sum.copy_from_slice(&b[16..]);
        Ok(Location { pack: u32_at(0), offset: u64::from_le_bytes(offset), len: u32_at(12), checksum: Checksum(sum) })
    }
}

struct Active {
    id: u32,
    file: Arc<File>,
    len: u64,
}

struct Packs {
    dir: PathBuf,
    /// The pack appended to; `None` until the first write of this run (or after an error).
    active: Mutex<Option<Active>>,
    next_id: Mutex<u32>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
}

fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.pack"))
}

fn sealed_key(id: u32) -> Vec<u8> {
    let mut k = b"sealed".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// One record's header.
fn record_header(tenant: &str, id: &ChunkId, checksum: &Checksum, len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(RECORD_FIXED + tenant.len());
    h.extend_from_slice(RECORD_MAGIC);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&id.0);
    h.extend_from_slice(&checksum.0);
    h.push(tenant.len() as u8);
    h.extend_from_slice(tenant.as_bytes());
    h
}

/// What `Store::append` wrote: the pack, its file, each envelope's location, the byte range.
type Appended = (u32, Arc<File>, Vec<Location>, std::ops::Range<u64>);

/// Drops a synced range of a pack from the page cache. Packs are written once and read
/// rarely (a restore, a scrub pass), so caching them only evicts what is read often (the
/// index, the catalog). And page-cache pages are costly to take: a buffered write into fresh
/// pages cost up to 2.3 CPU-s per GB on a virtual machine that gives freed memory back to its
/// host, against 0.3 when the same pages are released and taken again (measured with 1 GiB
/// of 16 MiB synced writes). Best effort: the cache is never needed for correctness.
fn drop_cached(file: &File, range: std::ops::Range<u64>) {
    let (Ok(start), Ok(len)) = (i64::try_from(range.start), i64::try_from(range.end - range.start)) else { return };
    let _ = nix::fcntl::posix_fadvise(file, start, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Writes every byte of `slices` (the kernel may take fewer than offered in one call).
fn write_all_vectored(file: &File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    let mut f = file;
    while !slices.is_empty() {
        match f.write_vectored(slices) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "pack write returned 0")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The length of the whole records of a pack, walking their headers; `None` if the pack's
/// header itself is not whole.
fn whole_length(file: &File, file_len: u64) -> std::io::Result<Option<u64>> {
    let mut magic = [0u8; 8];
    if file_len < 8 || file.read_exact_at(&mut magic, 0).is_err() || &magic != PACK_MAGIC {
        return Ok(None);
    }
    let mut pos = 8u64;
    let mut h = [0u8; RECORD_FIXED];
    loop {
        if pos + RECORD_FIXED as u64 > file_len {
            return Ok(Some(pos));
        }
        file.read_exact_at(&mut h, pos)?;
        if &h[..4] != RECORD_MAGIC {
            return Ok(Some(pos));
        }
        let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as u64;
        let end = pos + RECORD_FIXED as u64 + u64::from(h[72]) + n;
        if end > file_len {
            return Ok(Some(pos));
        }
        pos = end;
    }
}

pub struct Store {
    db: Arc<DB>,
    packs: Packs,
    catalog: CatalogSlot,
    /// The ballast was given back to a full disk at open and is not laid again yet.
    ballast_released: std::sync::atomic::AtomicBool,
}

/// Memory all column families' memtables may hold together before the largest is flushed.
const MEMTABLE_BUDGET: usize = 128 << 20;

/// Options of the column families asked "is this chunk id here?" for every chunk an agent
/// offers (most answers are no): Bloom filters in the memtable and in every table file, so a
/// miss costs a few hash probes instead of a skip-list or block search.
fn lookups() -> Options {
    let mut o = Options::default();
    o.set_memtable_prefix_bloom_ratio(0.1);
    o.set_memtable_whole_key_filtering(true);
    let mut t = rocksdb::BlockBasedOptions::default();
    t.set_bloom_filter(10.0, false);
    t.set_whole_key_filtering(true);
    o.set_block_based_table_factory(&t);
    o
}

/// Key of a chunk's location in this node's chunk index.
pub fn chunk_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
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
        let ballast = path.join(BALLAST_FILE);
        let released = ballast.exists() && crate::metrics::disk_usage(path).1 < BALLAST;
        if released {
            std::fs::remove_file(&ballast).map_err(|e| open_err(format!("releasing the ballast: {e}")))?;
            warn!(
                "the disk is full: released the {} MiB ballast so the store can open; uploads are refused until room is made",
                BALLAST >> 20
            );
        }
        let probe = path.join(".write-probe");
        std::fs::write(&probe, b"probe").map_err(|e| open_err(format!("not writable: {e}")))?;
        let _ = std::fs::remove_file(&probe);

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // One budget for the memtables of every family (each would otherwise take up to
        // 2 x 64 MiB): a GC pass writes to the chunk index, the catalog and the Raft log at once.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let existing = DB::list_cf(&opts, path).unwrap_or_default();
        let mut cfs = vec![
            ColumnFamilyDescriptor::new(CF_INDEX, lookups()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_CATALOG, lookups()),
            ColumnFamilyDescriptor::new(CF_CATALOG_B, lookups()),
            ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
        ];
        let v1 = existing.iter().any(|c| c == CF_CHUNKS_V1);
        if v1 {
            let mut chunks = Options::default();
            chunks.set_enable_blob_files(true);
            cfs.push(ColumnFamilyDescriptor::new(CF_CHUNKS_V1, chunks));
        }
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| open_err(e.into_string()))?;
        let dir = path.join("packs");
        std::fs::create_dir_all(&dir).map_err(|e| open_err(format!("creating {}: {e}", dir.display())))?;
        let active = match db.cf_handle(CF_RAFT).map(|cf| db.get_cf(cf, ACTIVE_CATALOG_KEY)) {
            Some(Ok(Some(v))) if v.as_slice() == CF_CATALOG_B.as_bytes() => CF_CATALOG_B,
            Some(Err(e)) => return Err(open_err(e.into_string())),
            _ => CF_CATALOG,
        };
        let mut store = Store {
            db: Arc::new(db),
            packs: Packs {
                dir,
                active: Mutex::new(None),
                next_id: Mutex::new(1),
                readers: RwLock::new(HashMap::new()),
            },
            catalog: Arc::new(RwLock::new(active)),
            ballast_released: std::sync::atomic::AtomicBool::new(released),
        };
        store.recover_packs().map_err(|e| open_err(e.to_string()))?;
        if v1 {
            store.migrate_v1().map_err(|e| open_err(format!("converting the store to pack files: {e}")))?;
        }
        let meta = store.cf(CF_META)?;
        match store.db.get_cf(meta, b"format").map_err(db_err)? {
            Some(v) if v.as_slice() == FORMAT.to_le_bytes() => {}
            Some(v) => return Err(open_err(format!("unknown store format {v:?}; this build reads format {FORMAT}"))),
            None => store.db.put_cf_opt(meta, b"format", FORMAT.to_le_bytes(), &Self::synced()).map_err(db_err)?,
        }
        store.count_catalog_once()?;
        store.lay_ballast(BALLAST);
        Ok(store)
    }

    /// Room owed to the ballast: while it is released, writes must leave room to lay it again.
    pub fn ballast_owed(&self) -> u64 {
        if self.ballast_released.load(std::sync::atomic::Ordering::Acquire) { BALLAST } else { 0 }
    }

    /// Lays down the ballast if it is missing and the disk has room for it and `reserve` more.
    /// Best effort: a store without ballast works, it only cannot reopen on a full disk.
    pub fn lay_ballast(&self, reserve: u64) {
        let Some(dir) = self.packs.dir.parent() else { return };
        let path = dir.join(BALLAST_FILE);
        if path.exists() || crate::metrics::disk_usage(dir).1 < BALLAST + reserve {
            return;
        }
        let tmp = dir.join(".ballast.new");
        let written = (|| {
            let mut f = File::create(&tmp)?;
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..(BALLAST >> 20) {
                f.write_all(&zeros)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_ok() {
            self.ballast_released.store(false, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            warn!(error = %e, "cannot lay down the ballast");
        }
    }

    /// A catalog applied before `apply` kept its counts gets them once, by a walk (the same
    /// on every node, since it depends only on the applied state).
    fn count_catalog_once(&self) -> Result<(), StoreError> {
        let view = self.catalog()?;
        let mut empty = true;
        view.scan(b"", &mut |_, _| {
            empty = false;
            false
        })?;
        if empty || view.get(b"z")?.is_some() {
            return Ok(());
        }
        let st = crate::catalog::count_stats(&view)?;
        let cf = self.cf(self.catalog_name())?;
        let mut batch = WriteBatch::default();
        for w in std::iter::once(crate::catalog::stats_write(&st)).chain(crate::catalog::count_usage(&view)?) {
            if let crate::catalog::Write::Put(k, v) = w {
                batch.put_cf(cf, k, v);
            }
        }
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        info!(chunks = st.chunks, snapshots = st.snapshots, "counted the catalog once");
        Ok(())
    }

    /// Finds the packs, cuts off the torn tail of any that a crash left unsealed, seals it.
    fn recover_packs(&self) -> Result<(), StoreError> {
        let mut ids: Vec<u32> = std::fs::read_dir(&self.packs.dir)
            .map_err(|e| io_err("listing packs", e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pack")?.parse().ok())
            .collect();
        ids.sort_unstable();
        *self.packs.next_id.lock().unwrap_or_else(|p| p.into_inner()) = ids.last().map_or(1, |m| m + 1);
        let meta = self.cf(CF_META)?;
        for id in ids {
            if self.db.get_cf(meta, sealed_key(id)).map_err(db_err)?.is_some() {
                continue;
            }
            let path = pack_path(&self.packs.dir, id);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path.display().to_string(), e))?;
            let len = file.metadata().map_err(|e| io_err("pack size", e))?.len();
            let whole = whole_length(&file, len).map_err(|e| io_err("reading a pack", e))?.unwrap_or(0);
            if whole < len {
                warn!(
                    pack = id,
                    torn_bytes = len - whole,
                    "cut off the torn tail a crash left in a pack (never indexed)"
                );
                file.set_len(whole.max(8)).map_err(|e| io_err("truncating a torn pack", e))?;
                if whole < 8 {
                    // Not even its header is whole: rewrite it.
                    file.write_all_at(PACK_MAGIC, 0).map_err(|e| io_err("rewriting a pack header", e))?;
                }
                file.sync_all().map_err(|e| io_err("syncing a pack", e))?;
            }
            let sealed = whole.max(8);
            self.db.put_cf_opt(meta, sealed_key(id), sealed.to_le_bytes(), &Self::synced()).map_err(db_err)?;
        }
        Ok(())
    }

    /// Format 1 → 2: every envelope of the `chunks` column family into packs.
    fn migrate_v1(&mut self) -> Result<(), StoreError> {
        let cf = self.cf(CF_CHUNKS_V1)?;
        info!("converting the store to pack files (format 2)");
        let (mut moved, mut bytes) = (0u64, 0u64);
        let mut batch: Vec<(String, PutChunk)> = Vec::new();
        let mut batch_bytes = 0usize;
        let flush = |batch: &mut Vec<(String, PutChunk)>| -> Result<(), StoreError> {
            let mut by_tenant: HashMap<String, Vec<PutChunk>> = HashMap::new();
            for (t, c) in batch.drain(..) {
                by_tenant.entry(t).or_default().push(c);
            }
            for (t, chunks) in by_tenant {
                let refs: Vec<&PutChunk> = chunks.iter().collect();
                self.store_new(&t, &refs)?;
            }
            Ok(())
        };
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let Some(nul) = k.iter().position(|b| *b == 0) else { continue };
            let (Ok(tenant), Ok(id)) = (std::str::from_utf8(&k[..nul]), <[u8; 32]>::try_from(&k[nul + 1..])) else {
                continue;
            };
            moved += 1;
            bytes += v.len() as u64;
            batch_bytes += v.len();
            batch.push((
                tenant.to_string(),
                PutChunk { id: ChunkId(id), checksum: Checksum::of(&v), envelope: bytes::Bytes::copy_from_slice(&v) },
            ));
            if batch_bytes >= 16 << 20 {
                flush(&mut batch)?;
                batch_bytes = 0;
            }
        }
        flush(&mut batch)?;
        self.seal_active()?;
        // An index entry of format 1 whose envelope was not in `chunks` names nothing.
        let index = self.cf(CF_INDEX)?;
        let mut stale = WriteBatch::default();
        for item in self.db.iterator_cf(index, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            if v.len() != 48 {
                stale.delete_cf(index, k);
            }
        }
        self.db.write_opt(stale, &Self::synced()).map_err(db_err)?;
        Arc::get_mut(&mut self.db)
            .ok_or_else(|| StoreError::Io("the store is in use while it is converted".into()))?
            .drop_cf(CF_CHUNKS_V1)
            .map_err(db_err)?;
        info!(chunks = moved, bytes, "store converted to pack files");
        Ok(())
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::Io(format!("column family {name} missing")))
    }

    /// The applied catalog, for reads.
    pub fn catalog(&self) -> Result<CatalogView<'_>, StoreError> {
        Ok(CatalogView { db: &self.db, cf: self.cf(self.catalog_name())? })
    }

    /// The catalog family in use.
    pub fn catalog_name(&self) -> &'static str {
        *self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared name of the catalog family in use, for the Raft log.
    pub fn catalog_slot(&self) -> CatalogSlot {
        self.catalog.clone()
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
        crate::chunk_store::check_envelopes(chunks)?;
        if tenant.len() > u8::MAX as usize {
            return Err(StoreError::Io(format!("tenant name of {} bytes", tenant.len())));
        }
        let wanted = self.to_store(tenant, chunks)?;
        let mut seen = std::collections::HashSet::new();
        let new: Vec<&PutChunk> = chunks.iter().filter(|c| wanted.contains(&c.id) && seen.insert(c.id)).collect();
        if !new.is_empty() {
            self.store_new(tenant, &new)?;
        }
        Ok(new.len())
    }

    /// The ids of `chunks` to write: those not held, and those held only as an unindexed copy
    /// that differs from the upload (see "Which copy is kept" above).
    fn to_store(&self, tenant: &str, chunks: &[PutChunk]) -> Result<std::collections::HashSet<ChunkId>, StoreError> {
        let cf = self.cf(CF_INDEX)?;
        let keys: Vec<Vec<u8>> = chunks.iter().map(|c| chunk_key(tenant, &c.id)).collect();
        let mut out = std::collections::HashSet::new();
        let mut differing = Vec::new();
        for (c, r) in chunks.iter().zip(self.db.batched_multi_get_cf(cf, &keys, false)) {
            match r.map_err(db_err)? {
                None => {
                    out.insert(c.id);
                }
                Some(v) if Location::decode(&v)?.checksum != c.checksum => differing.push(c.id),
                Some(_) => {}
            }
        }
        // Rare (an agent sends only what the index lacked): two catalog lookups each.
        if !differing.is_empty() {
            let view = self.catalog()?;
            let ckeys: Vec<Vec<u8>> = differing.iter().map(|id| crate::catalog::chunk_key(tenant, id)).collect();
            let gkeys: Vec<Vec<u8>> =
                differing.iter().map(|id| crate::catalog::gc::condemned_key(tenant, id)).collect();
            let (cs, gs) = (view.get_many(&ckeys)?, view.get_many(&gkeys)?);
            for (id, (c, g)) in differing.iter().zip(cs.into_iter().zip(gs)) {
                if c.is_none() && g.is_none() {
                    info!(%tenant, chunk = %id, "replacing a copy no index entry names with the one uploaded");
                    out.insert(*id);
                }
            }
        }
        Ok(out)
    }

    /// Appends `chunks` to the active pack, syncs it, then indexes them (the durability rule).
    fn store_new(&self, tenant: &str, chunks: &[&PutChunk]) -> Result<(), StoreError> {
        let (pack, file, locations, written) = self.append(tenant, chunks)?;
        crate::test_hooks::crash_point("pack-written");
        file.sync_data().map_err(|e| io_err(&format!("syncing pack {pack}"), e))?;
        crate::test_hooks::crash_point("pack-synced");
        drop_cached(&file, written);
        let cf = self.cf(CF_INDEX)?;
        let mut batch = WriteBatch::default();
        for (c, loc) in chunks.iter().zip(&locations) {
            batch.put_cf(cf, chunk_key(tenant, &c.id), loc.encode());
        }
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)
    }

    /// One vectored write of the records to the active pack; returns the pack, where each
    /// envelope landed and the byte range written. On a failed write the pack is cut back to
    /// where it was.
    fn append(&self, tenant: &str, chunks: &[&PutChunk]) -> Result<Appended, StoreError> {
        let headers: Vec<Vec<u8>> =
            chunks.iter().map(|c| record_header(tenant, &c.id, &c.checksum, c.envelope.len())).collect();
        let size: u64 = headers.iter().zip(chunks).map(|(h, c)| (h.len() + c.envelope.len()) as u64).sum();
        let mut guard = self.packs.active.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|a| a.len >= PACK_TARGET) {
            let full = guard.take();
            if let Some(a) = full {
                self.seal(&a)?;
            }
        }
        if guard.is_none() {
            *guard = Some(self.new_pack()?);
        }
        let Some(active) = guard.as_mut() else { return Err(StoreError::Io("no active pack".into())) };
        let start = active.len;
        let mut locations = Vec::with_capacity(chunks.len());
        let mut pos = start;
        for (h, c) in headers.iter().zip(chunks) {
            pos += h.len() as u64;
            locations.push(Location {
                pack: active.id,
                offset: pos,
                len: c.envelope.len() as u32,
                checksum: c.checksum,
            });
            pos += c.envelope.len() as u64;
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * chunks.len());
        for (h, c) in headers.iter().zip(chunks) {
            slices.push(IoSlice::new(h));
            slices.push(IoSlice::new(&c.envelope));
        }
        let written = if crate::test_hooks::crashes_at("mid-record") {
            // Half the batch and then half a record, as a crash in the middle of the write would.
            let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            let _ = (&*active.file).write_all(&bytes[..(bytes.len() / 2).max(1)]);
            crate::test_hooks::crash_point("mid-record");
            Ok(())
        } else {
            write_all_vectored(&active.file, &mut slices)
        };
        if let Err(e) = written {
            let what = format!("writing {}", pack_path(&self.packs.dir, active.id).display());
            // Cut the partial records off; if even that fails, begin a new pack next time
            // (this one is then sealed with its torn tail at the next open).
            if active.file.set_len(start).is_err() {
                *guard = None;
            }
            return Err(io_err(&what, e));
        }
        active.len = start + size;
        Ok((active.id, active.file.clone(), locations, start..active.len))
    }

    fn new_pack(&self) -> Result<Active, StoreError> {
        let mut next = self.packs.next_id.lock().unwrap_or_else(|p| p.into_inner());
        let id = *next;
        let path = pack_path(&self.packs.dir, id);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(&format!("creating {}", path.display()), e))?;
        f.write_all(PACK_MAGIC).map_err(|e| io_err("writing a pack header", e))?;
        f.sync_all().map_err(|e| io_err("syncing a new pack", e))?;
        // The new file's name must survive a crash too.
        File::open(&self.packs.dir).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing the pack directory", e))?;
        *next = id + 1;
        Ok(Active { id, file: Arc::new(f), len: PACK_MAGIC.len() as u64 })
    }

    fn seal(&self, a: &Active) -> Result<(), StoreError> {
        a.file.sync_data().map_err(|e| io_err("syncing a pack", e))?;
        self.db.put_cf_opt(self.cf(CF_META)?, sealed_key(a.id), a.len.to_le_bytes(), &Self::synced()).map_err(db_err)
    }

    fn seal_active(&self) -> Result<(), StoreError> {
        let taken = self.packs.active.lock().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(a) => self.seal(&a),
            None => Ok(()),
        }
    }

    pub fn location(&self, tenant: &str, id: &ChunkId) -> Result<Option<Location>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_INDEX)?, chunk_key(tenant, id)).map_err(db_err)? {
            Some(v) => Ok(Some(Location::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.packs.readers.read().unwrap_or_else(|p| p.into_inner()).get(&pack) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.packs.dir, pack);
        let f = Arc::new(File::open(&path).map_err(|e| io_err(&format!("opening {}", path.display()), e))?);
        let mut readers = self.packs.readers.write().unwrap_or_else(|p| p.into_inner());
        if readers.len() >= OPEN_READERS {
            readers.clear();
        }
        readers.insert(pack, f.clone());
        Ok(f)
    }

    /// Reads an envelope and checks it against its storage checksum.
    pub fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let mut loc = self.location(tenant, id)?.ok_or(StoreError::NotFound(*id))?;
        let mut env = Vec::new();
        loop {
            match self.check_at(id, &loc, &mut env) {
                Ok(_) => return Ok(env),
                // GC may have moved it to another pack (and deleted this one) since it was looked up.
                Err(e) => match self.location(tenant, id)? {
                    Some(now) if now != loc => loc = now,
                    Some(_) => return Err(e),
                    None => return Err(StoreError::NotFound(*id)),
                },
            }
        }
    }

    /// As `check_at`, for a location read earlier: when the check fails, the chunk's current
    /// location is checked instead if GC moved it meanwhile. `Ok(0)` when it was swept.
    pub fn check_current(
        &self,
        tenant: &str,
        id: &ChunkId,
        loc: &Location,
        buf: &mut Vec<u8>,
    ) -> Result<usize, StoreError> {
        let mut loc = *loc;
        loop {
            match self.check_at(id, &loc, buf) {
                Ok(n) => return Ok(n),
                Err(e) => match self.location(tenant, id)? {
                    Some(now) if now != loc => loc = now,
                    Some(_) => return Err(e),
                    None => return Ok(0),
                },
            }
        }
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

    /// Stores `chunk` again even though it is indexed here (its copy was found damaged): a new
    /// record, synced, then its location replaces the old one. The old record is dead space.
    pub fn replace_chunk(&self, tenant: &str, chunk: &PutChunk) -> Result<(), StoreError> {
        crate::chunk_store::check_envelopes(std::slice::from_ref(chunk))?;
        self.store_new(tenant, &[chunk])
    }

    /// A page of this node's chunk index after the key `after` (from the start when `None`):
    /// each chunk's tenant, id and location, in key order; the last key is the next cursor.
    #[allow(clippy::type_complexity)]
    pub fn locations_page(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, String, ChunkId, Location)>, StoreError> {
        let cf = self.cf(CF_INDEX)?;
        let mode = match after {
            Some(k) => IteratorMode::From(k, Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.db.iterator_cf(cf, mode) {
            let (k, v) = item.map_err(db_err)?;
            if after.is_some_and(|a| *k == *a) {
                continue;
            }
            let Some(nul) = k.iter().position(|b| *b == 0) else { continue };
            let (Ok(tenant), Ok(id)) = (std::str::from_utf8(&k[..nul]), <[u8; 32]>::try_from(&k[nul + 1..])) else {
                continue;
            };
            out.push((k.to_vec(), tenant.to_string(), ChunkId(id), Location::decode(&v)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Reads a chunk's envelope at `loc` and checks it; the envelope's size when good.
    pub fn check_at(&self, id: &ChunkId, loc: &Location, buf: &mut Vec<u8>) -> Result<usize, StoreError> {
        let file = self.reader(loc.pack)?;
        buf.resize(loc.len as usize, 0);
        file.read_exact_at(buf, loc.offset)
            .map_err(|_| StoreError::Corrupt { id: *id, context: "indexed but absent on disk" })?;
        if Checksum::of(buf) != loc.checksum {
            return Err(StoreError::Corrupt { id: *id, context: "damaged on this node's disk" });
        }
        Ok(buf.len())
    }

    // ---- For garbage collection (rules in `crate::gc`) ----

    /// The pack being appended to and its length, if any.
    pub fn active_pack(&self) -> Option<(u32, u64)> {
        self.packs.active.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|a| (a.id, a.len))
    }

    /// Seals the active pack now (the next write begins a new one), so GC can rewrite it.
    pub fn seal_active_pack(&self) -> Result<(), StoreError> {
        self.seal_active()
    }

    /// Every pack file and its size.
    pub fn pack_files(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.packs.dir).map_err(|e| io_err("listing packs", e))?;
        for entry in rd {
            let entry = entry.map_err(|e| io_err("listing packs", e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(|e| io_err("reading a pack's size", e))?.len();
            out.push((id, len));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Bytes a record of `tenant` with an envelope of `len` takes in a pack.
    pub fn record_size(tenant: &str, len: u32) -> u64 {
        (RECORD_FIXED + tenant.len()) as u64 + u64::from(len)
    }

    /// Copies live chunks out of packs GC is emptying: appended to the active pack and synced,
    /// then each location is pointed at its copy in one synced batch, unless it changed
    /// meanwhile (swept, or replaced by scrub: the copy is then dead space). Returns how many
    /// locations now point at a copy.
    pub fn relocate(&self, moves: &[(String, PutChunk, Location)]) -> Result<usize, StoreError> {
        let mut by_tenant: std::collections::BTreeMap<&str, Vec<(&PutChunk, &Location)>> = Default::default();
        for (t, c, old) in moves {
            by_tenant.entry(t.as_str()).or_default().push((c, old));
        }
        let cf = self.cf(CF_INDEX)?;
        let mut batch = WriteBatch::default();
        let mut moved = 0;
        for (tenant, group) in by_tenant {
            let chunks: Vec<&PutChunk> = group.iter().map(|(c, _)| *c).collect();
            let (pack, file, locations, written) = self.append(tenant, &chunks)?;
            file.sync_data().map_err(|e| io_err(&format!("syncing pack {pack}"), e))?;
            drop_cached(&file, written);
            for ((c, old), new) in group.iter().zip(locations) {
                let key = chunk_key(tenant, &c.id);
                if self.location(tenant, &c.id)?.as_ref() == Some(*old) {
                    batch.put_cf(cf, key, new.encode());
                    moved += 1;
                }
            }
        }
        crate::test_hooks::crash_point("gc-copied");
        self.db.write_opt(batch, &Self::synced()).map_err(db_err)?;
        Ok(moved)
    }

    /// Deletes a pack no location names any more (GC has checked it): its file, its record,
    /// and its open handle. A read that looked it up just before retries at the chunk's new
    /// location (`get_chunk`).
    pub fn delete_pack(&self, id: u32) -> Result<(), StoreError> {
        if self.active_pack().is_some_and(|(a, _)| a == id) {
            return Err(StoreError::Io(format!("pack {id} is being written")));
        }
        let path = pack_path(&self.packs.dir, id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&format!("deleting {}", path.display()), e)),
        }
        File::open(&self.packs.dir).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing the pack directory", e))?;
        self.packs.readers.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.db.delete_cf_opt(self.cf(CF_META)?, sealed_key(id), &Self::synced()).map_err(db_err)
    }

    /// A value of the store's own bookkeeping (`store_meta`), such as the scrub's cursor.
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get_cf(self.cf(CF_META)?, key).map_err(db_err)
    }

    pub fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.put_cf_opt(self.cf(CF_META)?, key, value, &Self::synced()).map_err(db_err)
    }

    pub fn meta_delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.db.delete_cf_opt(self.cf(CF_META)?, key, &Self::synced()).map_err(db_err)
    }

    /// Every `store_meta` pair under `prefix`.
    #[allow(clippy::type_complexity)]
    pub fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let cf = self.cf(CF_META)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward)) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Seals the active pack and flushes memtables, so that a clean shutdown leaves nothing
    /// to replay or to walk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.seal_active()?;
        for cf in [CF_INDEX, CF_META, CF_CATALOG, CF_CATALOG_B, CF_RAFT] {
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
        // Bounded at the prefix's end: without it, reaching the end of a range means skipping
        // every deleted key after it that compaction has not dropped yet (a commit's staged
        // references, deleted at every commit, made each commit's scan grow with the number
        // of commits).
        let mut opts = rocksdb::ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            opts.set_iterate_upper_bound(end);
        }
        for item in self.db.iterator_cf_opt(self.cf, opts, IteratorMode::From(start.max(prefix), Direction::Forward)) {
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

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::chunk_store::suite::put;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"p\0"), Some(b"p\x01".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn packs_survive_reopening_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<PutChunk> = (0..10).map(|i| put(i, &vec![i; 1000 + i as usize])).collect();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.put_chunks("lux", &chunks[..5]).unwrap(), 5);
            // No clean stop: the pack is left unsealed, as after a crash.
        }
        // Half a record appended after the last whole one, as a crash mid-write leaves it.
        let pack = pack_path(&dir.path().join("packs"), 1);
        let whole = std::fs::metadata(&pack).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&pack).unwrap();
        f.write_all(&record_header("lux", &ChunkId([99; 32]), &Checksum([0; 32]), 5000)).unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        drop(f);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&pack).unwrap().len(), whole, "the torn tail is cut off");
        for c in &chunks[..5] {
            assert_eq!(s.get_chunk("lux", &c.id).unwrap(), c.envelope);
        }
        // This run appends to a new pack.
        assert_eq!(s.put_chunks("lux", &chunks[5..]).unwrap(), 5);
        assert_eq!(s.location("lux", &chunks[7].id).unwrap().unwrap().pack, 2);
        s.flush().unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        for c in &chunks {
            assert_eq!(s.get_chunk("lux", &c.id).unwrap(), c.envelope);
        }
        // A record damaged on disk is reported, never served.
        let loc = s.location("lux", &chunks[2].id).unwrap().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        f.write_all_at(b"\xff", loc.offset + 3).unwrap();
        assert!(matches!(s.get_chunk("lux", &chunks[2].id), Err(StoreError::Corrupt { .. })));
        // The disk holds the envelopes once, plus their record headers.
        let envelopes: u64 = chunks.iter().map(|c| c.envelope.len() as u64).sum();
        let packs: u64 =
            std::fs::read_dir(dir.path().join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(packs < envelopes + 10 * 80 + 2 * 8, "{packs} bytes of packs for {envelopes} of envelopes");
    }

    #[test]
    fn a_catalog_without_counts_is_counted_once_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let cf = s.cf(CF_CATALOG).unwrap();
            let entry = |n: u32| {
                postcard::to_allocvec(&crate::catalog::IndexEntry { envelope_len: n, checksum: Checksum([0; 32]) })
                    .unwrap()
            };
            for (i, t) in [(1u8, "lux"), (2, "lux"), (3, "est")] {
                s.db.put_cf(cf, crate::catalog::chunk_key(t, &ChunkId([i; 32])), entry(100 * u32::from(i))).unwrap();
            }
            for k in [&b"ilux\0s1"[..], b"k-not-counted"] {
                s.db.put_cf(cf, k, b"v").unwrap();
            }
            assert_eq!(crate::catalog::stats(&s.catalog().unwrap()).unwrap().chunks, 0);
        }
        let s = Store::open(dir.path()).unwrap();
        let st = crate::catalog::stats(&s.catalog().unwrap()).unwrap();
        assert_eq!((st.chunks, st.snapshots), (3, 1));
        assert_eq!(crate::catalog::usage(&s.catalog().unwrap(), "lux").unwrap(), 300);
        assert_eq!(crate::catalog::usage(&s.catalog().unwrap(), "est").unwrap(), 300);
    }

    #[test]
    fn a_store_of_format_1_is_converted_to_packs() {
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<PutChunk> = (0..20).map(|i| put(i, &vec![i; 3000])).collect();
        {
            // The layout of format 1: envelopes in a `chunks` column family (BlobDB), postcard
            // index entries in `chunk_index`.
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let mut blob = Options::default();
            blob.set_enable_blob_files(true);
            let cfs = vec![
                ColumnFamilyDescriptor::new(CF_CHUNKS_V1, blob),
                ColumnFamilyDescriptor::new(CF_INDEX, Options::default()),
                ColumnFamilyDescriptor::new(CF_CATALOG, Options::default()),
                ColumnFamilyDescriptor::new(CF_RAFT, Options::default()),
            ];
            let db = DB::open_cf_descriptors(&opts, dir.path(), cfs).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                let tenant = if i % 2 == 0 { "lux" } else { "est" };
                let key = chunk_key(tenant, &c.id);
                db.put_cf(db.cf_handle(CF_CHUNKS_V1).unwrap(), &key, &c.envelope).unwrap();
                let entry = crate::catalog::IndexEntry { envelope_len: c.envelope.len() as u32, checksum: c.checksum };
                db.put_cf(db.cf_handle(CF_INDEX).unwrap(), &key, postcard::to_allocvec(&entry).unwrap()).unwrap();
            }
            db.put_cf(db.cf_handle(CF_CATALOG).unwrap(), b"q", 7u64.to_be_bytes()).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            let tenant = if i % 2 == 0 { "lux" } else { "est" };
            assert_eq!(s.get_chunk(tenant, &c.id).unwrap(), c.envelope);
        }
        assert_eq!(s.catalog().unwrap().get(b"q").unwrap(), Some(7u64.to_be_bytes().to_vec()), "the catalog is kept");
        drop(s);
        let opts = Options::default();
        assert!(!DB::list_cf(&opts, dir.path()).unwrap().contains(&CF_CHUNKS_V1.to_string()), "the old family is gone");
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get_chunk("lux", &chunks[4].id).unwrap(), chunks[4].envelope);
    }
}
