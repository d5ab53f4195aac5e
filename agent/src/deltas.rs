//! Delta bases: what the agent keeps so that a changed chunk travels as a delta on the chunk
//! it replaced, not whole.
//!
//! A register changes by about 1 % of its rows a day, spread everywhere, so nearly every chunk
//! of a dump changes; compressed against the chunk it replaced, a changed chunk shrinks to the
//! rows that changed (`exclave::envelope`, codec 2). The agent may not read from the cluster,
//! so it keeps the bases itself, in `DIR` (the state directory's `deltas/SOURCE`, or
//! `--delta-cache`):
//!
//! ```text
//! DIR/index             version byte (1) ‖ postcard(Layout): the last committed snapshot
//! DIR/bases/<chunk id>  the sealed envelope of a full chunk that deltas are built on
//! ```
//!
//! Rules:
//! - **Bases are full chunks.** A changed chunk is sealed against the base of the chunk it
//!   replaced, never against a delta, so every delta is one step from its data (depth 1) and
//!   restore fetches one base per delta. The delta grows as the region drifts from its base;
//!   when it is no longer under a quarter of the base's envelope, the chunk is sent full and
//!   becomes the region's new base (re-basing).
//! - **Which chunk a changed chunk replaced** is found by its head: the path and its first 64
//!   bytes. Content-defined boundaries come back after a change, so a chunk that changed
//!   inside still starts as the chunk it replaced did.
//! - **Only what the cluster holds is a base.** The index is replaced only after the
//!   snapshot committed, and the backup asks the cluster for every base it means to use
//!   along with its chunks; a base the cluster lacks (collected after a `forget`) is not
//!   used. The cluster, not this cache, keeps bases alive: it records each delta's base and
//!   adds it to the references of every snapshot that references the delta (see the
//!   replicator's catalog), so losing this directory loses nothing stored.
//! - **The cache is advisory.** Base files are opened like any envelope (authenticated,
//!   id-checked), so a damaged or missing file, a lost index or a full disk only means the
//!   chunks concerned are sent full, and become bases again.
//! - **Bounded.** Bases are written while the cache holds less than its budget; the ones the
//!   new index does not name are deleted after each commit. The files are sealed with the
//!   tenant key, like everything the agent sends.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use exclave::ChunkId;
use exclave::envelope::Opener;
use serde::{Deserialize, Serialize};

const INDEX_VERSION: u8 = 1;
/// Bytes of a chunk's start that identify the chunk it replaced.
const HEAD_BYTES: usize = 64;
/// A delta is kept when its envelope is at most this fraction of its base's envelope.
const KEEP_DIVISOR: usize = 4;
/// Default budget of the cache, MiB.
pub const DEFAULT_CACHE_MIB: u64 = 4096;

pub type Head = [u8; 16];

/// The chunk a new chunk's head names in the last snapshot, and its base.
#[derive(Serialize, Deserialize, Default)]
struct Layout {
    /// Head of each chunk of the last snapshot → the base of that chunk (itself when full).
    heads: HashMap<Head, ChunkId>,
    /// Chunk → its base (itself when full), for chunks of the last snapshot.
    bases: HashMap<ChunkId, ChunkId>,
}

/// What this run learned.
#[derive(Default)]
struct Next {
    heads: Vec<(Head, ChunkId)>,
    sealed: HashMap<ChunkId, ChunkId>,
}

/// Counts shown in the backup's summary.
#[derive(Default)]
pub struct DeltaStats {
    pub deltas: AtomicU64,
    pub delta_bytes: AtomicU64,
    /// Changed chunks sent full although a base was known (delta not small enough, base
    /// unreadable or absent from the cluster).
    pub rebased: AtomicU64,
}

pub struct Deltas {
    dir: PathBuf,
    budget: u64,
    prev: Layout,
    next: Mutex<Next>,
    cached: AtomicU64,
    pub stats: DeltaStats,
}

/// The head of a chunk of the file at `path`.
pub fn head(path: &[u8], data: &[u8]) -> Head {
    let mut h = blake3::Hasher::new();
    h.update(&(path.len() as u64).to_le_bytes());
    h.update(path);
    h.update(&data[..data.len().min(HEAD_BYTES)]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Whether a delta of `delta_len` bytes is worth sending instead of a full chunk, whose size
/// the base's envelope (`base_len`) stands for.
pub fn worth_keeping(delta_len: usize, base_len: usize) -> bool {
    delta_len.saturating_mul(KEEP_DIVISOR) <= base_len
}

impl Deltas {
    /// Opens the cache in `dir` (created if absent). An unreadable index is reported and
    /// treated as empty: the run sends changed chunks full.
    pub fn open(dir: &Path, budget_mib: u64) -> Deltas {
        let _ = std::fs::create_dir_all(dir.join("bases"));
        let prev = match std::fs::read(dir.join("index")) {
            Ok(b) if b.first() == Some(&INDEX_VERSION) => postcard::from_bytes(&b[1..]).unwrap_or_else(|e| {
                tracing::warn!(dir = %dir.display(), error = %e, "the delta index is damaged; changed chunks go full this time");
                Layout::default()
            }),
            Ok(_) => {
                tracing::warn!(dir = %dir.display(), "the delta index is of an unknown version; changed chunks go full this time");
                Layout::default()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Layout::default(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the delta index cannot be read; changed chunks go full this time");
                Layout::default()
            }
        };
        let cached = dir_bytes(&dir.join("bases"));
        Deltas {
            dir: dir.to_path_buf(),
            budget: budget_mib << 20,
            prev,
            next: Mutex::new(Next::default()),
            cached: AtomicU64::new(cached),
            stats: DeltaStats::default(),
        }
    }

    fn next(&self) -> std::sync::MutexGuard<'_, Next> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join("bases").join(id.to_string())
    }

    /// Records a chunk of this run, and returns the base a new chunk with this head would be
    /// built on.
    pub fn saw(&self, head: Head, id: &ChunkId) -> Option<ChunkId> {
        self.next().heads.push((head, *id));
        self.prev.heads.get(&head).copied().filter(|b| b != id)
    }

    /// The plaintext of base `id` and the length of its envelope, if the cache holds it intact.
    pub fn load(&self, opener: &mut Opener, id: &ChunkId) -> Option<(Vec<u8>, usize)> {
        let env = std::fs::read(self.base_path(id)).ok()?;
        match opener.open(id, &env) {
            Ok(plain) => Some((plain, env.len())),
            Err(e) => {
                tracing::warn!(base = %id.short(), error = %e, "a cached delta base is damaged; sending the chunk full");
                let _ = std::fs::remove_file(self.base_path(id));
                None
            }
        }
    }

    /// A chunk sent full: it is its own base, kept while the budget allows.
    pub fn sealed_full(&self, id: &ChunkId, envelope: &[u8]) {
        self.next().sealed.insert(*id, *id);
        let len = envelope.len() as u64;
        if self.cached.fetch_add(len, Ordering::Relaxed) + len > self.budget {
            self.cached.fetch_sub(len, Ordering::Relaxed);
            return;
        }
        let (path, tmp) = (self.base_path(id), self.dir.join("bases").join(format!(".{id}.tmp")));
        if let Err(e) = std::fs::write(&tmp, envelope).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::debug!(error = %e, "a delta base could not be cached");
            self.cached.fetch_sub(len, Ordering::Relaxed);
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// A chunk sent as a delta on `base`.
    pub fn sealed_delta(&self, id: &ChunkId, base: &ChunkId, envelope_len: usize) {
        self.next().sealed.insert(*id, *base);
        self.stats.deltas.fetch_add(1, Ordering::Relaxed);
        self.stats.delta_bytes.fetch_add(envelope_len as u64, Ordering::Relaxed);
    }

    /// After the snapshot committed: its layout becomes the index, and the bases it does not
    /// name are deleted. Returns the bytes the cache holds.
    pub fn committed(&self) -> std::io::Result<u64> {
        let next = std::mem::take(&mut *self.next());
        let on_disk: HashSet<ChunkId> = list_bases(&self.dir.join("bases")).into_iter().map(|(id, _)| id).collect();
        let mut layout = Layout::default();
        for (head, id) in next.heads {
            let Some(base) = next.sealed.get(&id).or_else(|| self.prev.bases.get(&id)).copied() else { continue };
            if on_disk.contains(&base) {
                layout.heads.insert(head, base);
                layout.bases.insert(id, base);
            }
        }
        let mut bytes = vec![INDEX_VERSION];
        bytes.extend(postcard::to_allocvec(&layout).map_err(std::io::Error::other)?);
        let tmp = self.dir.join("index.tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, self.dir.join("index"))?;
        let wanted: HashSet<&ChunkId> = layout.bases.values().collect();
        let mut kept = 0u64;
        for (id, len) in list_bases(&self.dir.join("bases")) {
            if wanted.contains(&id) {
                kept += len;
            } else {
                let _ = std::fs::remove_file(self.base_path(&id));
            }
        }
        Ok(kept)
    }
}

fn list_bases(dir: &Path) -> Vec<(ChunkId, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let id: ChunkId = e.file_name().to_str()?.parse().ok()?;
            Some((id, e.metadata().ok()?.len()))
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    list_bases(dir).iter().map(|(_, l)| l).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::envelope::Sealer;
    use exclave::keys::{MasterKey, TenantKeys};

    fn keys() -> TenantKeys {
        TenantKeys::from_master("lux", MasterKey::from_bytes([3; 32]))
    }

    #[test]
    fn a_changed_chunk_finds_the_base_of_the_chunk_it_replaced_after_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let day1 = b"1,Aino,Helsinki\n".repeat(100);
        let mut day2 = day1.clone();
        day2[500..507].copy_from_slice(b"Tallinn");
        let (id1, id2) = (k.chunk_id(&day1), k.chunk_id(&day2));
        let env1 = Sealer::new(&k, 1).unwrap().seal(&id1, &day1).unwrap();

        let d = Deltas::open(dir.path(), 10);
        assert_eq!(d.saw(head(b"persons.sql", &day1), &id1), None, "nothing before the first commit");
        d.sealed_full(&id1, &env1);
        d.committed().unwrap();

        let d = Deltas::open(dir.path(), 10);
        let h = head(b"persons.sql", &day2);
        assert_eq!(h, head(b"persons.sql", &day1), "same start, same head");
        assert_ne!(h, head(b"vehicles.csv", &day2), "the path is part of the head");
        assert_eq!(d.saw(h, &id2), Some(id1));
        let mut o = Opener::new(&k).unwrap();
        assert_eq!(d.load(&mut o, &id1).unwrap(), (day1.clone(), env1.len()));
        d.sealed_delta(&id2, &id1, 40);
        d.committed().unwrap();

        // Day 3 changes the same region: still built on the full chunk of day 1.
        let d = Deltas::open(dir.path(), 10);
        let id3 = k.chunk_id(b"day 3");
        assert_eq!(d.saw(h, &id3), Some(id1));
        // A day whose chunk is unchanged (day 2's, deduplicated) keeps its base.
        let d = Deltas::open(dir.path(), 10);
        d.saw(h, &id2);
        d.committed().unwrap();
        assert!(dir.path().join("bases").join(id1.to_string()).exists());
        assert_eq!(Deltas::open(dir.path(), 10).saw(h, &id3), Some(id1));
    }

    #[test]
    fn damaged_or_lost_cache_means_full_chunks_and_unused_bases_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let a = b"a".repeat(5000);
        let ida = k.chunk_id(&a);
        let env = Sealer::new(&k, 1).unwrap().seal(&ida, &a).unwrap();
        let d = Deltas::open(dir.path(), 10);
        d.saw(head(b"f", &a), &ida);
        d.sealed_full(&ida, &env);
        d.committed().unwrap();
        // A flipped byte in the base: not used, and removed.
        let p = dir.path().join("bases").join(ida.to_string());
        let mut bad = std::fs::read(&p).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&p, bad).unwrap();
        let d = Deltas::open(dir.path(), 10);
        assert!(d.load(&mut Opener::new(&k).unwrap(), &ida).is_none());
        assert!(!p.exists());
        // A damaged index: an empty layout.
        std::fs::write(dir.path().join("index"), b"\x01garbage").unwrap();
        let d = Deltas::open(dir.path(), 10);
        assert_eq!(d.saw(head(b"f", &a), &k.chunk_id(b"x")), None);
        // The next commit names nothing: the cache empties.
        assert_eq!(d.committed().unwrap(), 0);
        assert!(list_bases(&dir.path().join("bases")).is_empty());
    }

    #[test]
    fn the_budget_bounds_what_is_cached_and_the_size_rule_holds() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deltas::open(dir.path(), 0);
        let id = keys().chunk_id(b"x");
        d.sealed_full(&id, &[0u8; 100]);
        assert!(list_bases(&dir.path().join("bases")).is_empty());
        assert!(worth_keeping(25, 100));
        assert!(!worth_keeping(26, 100));
    }
}
