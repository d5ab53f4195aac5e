//! The backup pipeline: bounded stages between the source and the node.
//!
//! ```text
//! reader thread ──jobs──> dedup (async: Have?) ──> seal workers (threads: zstd + AES-GCM) ──> uploader (async, N streams)
//!   walk, read, FastCDC,
//!   keyed BLAKE3, file BLAKE3,
//!   manifest stream
//! ```
//!
//! - Memory: every chunk holds budget from the moment it is read until it is known to be on
//!   the node (deduplicated or uploaded), so plaintext and envelopes in flight never exceed
//!   the budget, whatever the size of the source.
//! - Deduplication: ids already seen in this run are never sent twice; the node is asked
//!   which of the rest it lacks, and only those are compressed, encrypted and uploaded.
//! - Failure: the first error of any stage closes every channel and the budget, so all
//!   stages stop, and is the error reported. Nothing is committed unless every stage ended
//!   cleanly; chunks already uploaded are found by the next run's `Have` and not resent.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use exclave::ChunkId;
use exclave::chunk_id::Checksum;
use exclave::chunker::{Chunker, ChunkerParams};
use exclave::client::NodeClient;
use exclave::envelope::Sealer;
use exclave::keys::TenantKeys;
use exclave::manifest::{
    ChunkRef, Entry, EntryKind, MANIFEST_FORMAT, ManifestHeader, ManifestRoot, ManifestWriter, encode_root,
};
use exclave::protocol::{PutChunk, Request};

use crate::budget::ByteBudget;
use crate::deltas::{self, Deltas};
use crate::refs::RefSpool;
use crate::source::{self, Item};

pub struct Plan {
    pub tenant: String,
    pub source: String,
    pub items: Vec<Item>,
    pub chunker: ChunkerParams,
    pub zstd_level: i32,
    pub budget_bytes: usize,
    pub seal_workers: usize,
    pub upload_streams: usize,
    pub time: i64,
    pub hostname: String,
    /// The delta cache of the source, when changed chunks are to be sent as deltas.
    pub deltas: Option<Arc<Deltas>>,
}

/// Counters shared by the stages (and read by the progress display).
#[derive(Default)]
pub struct Stats {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub symlinks: AtomicU64,
    pub bytes_read: AtomicU64,
    pub chunks: AtomicU64,
    pub chunks_uploaded: AtomicU64,
    pub new_bytes: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    /// Of the above, file content only (not manifest pieces or the root).
    pub data_chunks_uploaded: AtomicU64,
    pub data_bytes_uploaded: AtomicU64,
    /// Tables whose verification facts were recorded (database sources), and the time
    /// taking them took (beside the dump, not added to it).
    pub tables: AtomicU64,
    pub facts_nanos: AtomicU64,
    /// Chunks sent as deltas and their envelope bytes, and what the delta cache holds after
    /// the commit.
    pub deltas: AtomicU64,
    pub delta_bytes: AtomicU64,
    pub delta_cache_bytes: AtomicU64,
    /// Where the stages waited (nanoseconds), to find the bottleneck (logged at debug level).
    pub wait_reader_budget: AtomicU64,
    pub wait_reader_send: AtomicU64,
    pub wait_dedup_have: AtomicU64,
    pub wait_seal_input: AtomicU64,
    pub wait_seal_output: AtomicU64,
    pub wait_upload_input: AtomicU64,
    pub wait_upload_stream: AtomicU64,
}

/// Adds the time `f` took to `counter`.
fn timed<T>(counter: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let r = f();
    counter.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    r
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Outcome {
    pub client: Arc<NodeClient>,
    pub root: ChunkId,
    pub refs: RefSpool,
    pub warnings: Vec<String>,
}

/// Most ids the in-run dedup set holds (~50 MiB); when full it starts afresh, and a chunk
/// seen again after that is only asked about once more (the node answers that it has it).
const SEEN_CAP: usize = 1 << 20;

struct Job {
    id: ChunkId,
    data: Vec<u8>,
    /// File content, as opposed to manifest pieces and the root.
    is_data: bool,
    /// The base to send it as a delta on, if it is new (`crate::deltas`).
    base: Option<ChunkId>,
}

struct Sealed {
    id: ChunkId,
    plain_len: usize,
    envelope: Vec<u8>,
    /// Storage checksum, computed by the seal worker rather than on the async runtime.
    checksum: Checksum,
    is_data: bool,
}

/// The first error wins; every stage is stopped when it is recorded.
struct Abort {
    first: Mutex<Option<anyhow::Error>>,
    budget: Arc<ByteBudget>,
    closers: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl Abort {
    fn fail(&self, e: anyhow::Error) {
        let mut f = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
        drop(f);
        self.budget.close();
        for c in &self.closers {
            c();
        }
    }
    fn take(&self) -> Option<anyhow::Error> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Runs the backup's stages. The connection is awaited only by the stages that talk to the
/// node, so reading, cutting and sealing start while it is being made (for a one-segment
/// `wal-push`, the handshake is a tenth of the call).
pub async fn run(
    client: impl std::future::Future<Output = Result<Arc<NodeClient>>>,
    keys: TenantKeys,
    plan: Plan,
    stats: Arc<Stats>,
) -> Result<Outcome> {
    let budget = Arc::new(ByteBudget::new(plan.budget_bytes));
    let (job_tx, job_rx) = async_channel::bounded::<Job>(1024);
    let (seal_tx, seal_rx) = async_channel::bounded::<Job>(1024);
    let (up_tx, up_rx) = async_channel::bounded::<Sealed>(1024);
    let closers: Vec<Box<dyn Fn() + Send + Sync>> = vec![
        Box::new({
            let c = job_tx.clone();
            move || {
                c.close();
            }
        }),
        Box::new({
            let c = seal_tx.clone();
            move || {
                c.close();
            }
        }),
        Box::new({
            let c = up_tx.clone();
            move || {
                c.close();
            }
        }),
    ];
    let abort = Arc::new(Abort { first: Mutex::new(None), budget: budget.clone(), closers });
    // The closers hold senders, so each stage closes its output explicitly when it ends.
    let up_closer = up_tx.clone();

    let deltas_for_reader = plan.deltas.clone();
    let reader = {
        let (keys, budget, stats, abort) = (keys.clone(), budget.clone(), stats.clone(), abort.clone());
        let header = ManifestHeader {
            format: MANIFEST_FORMAT,
            tenant: plan.tenant.clone(),
            source: plan.source.clone(),
            time: plan.time,
            hostname: plan.hostname.clone(),
            chunker: plan.chunker,
            roots: plan.items.iter().map(|i| i.name().to_string()).collect(),
        };
        let (items, params, time) = (plan.items, plan.chunker, plan.time);
        std::thread::Builder::new().name("reader".into()).spawn(move || {
            let r = RefSpool::new().context("creating the temporary reference list").and_then(|refs| {
                let mut d = Dispatcher {
                    keys,
                    budget,
                    tx: job_tx,
                    stats,
                    seen: HashSet::new(),
                    seen_cap: SEEN_CAP,
                    refs,
                    deltas: deltas_for_reader,
                    path: Vec::new(),
                    offset: 0,
                };
                let r = read_all(items, params, time, header, &mut d);
                d.tx.close();
                r.map(|(root, warnings)| (root, d.refs, warnings))
            });
            if let Err(e) = &r {
                abort.fail(anyhow!("{e:#}"));
            }
            r
        })?
    };

    let mut sealers = Vec::new();
    for i in 0..plan.seal_workers.max(1) {
        let (rx, tx, keys, abort, level, stats, deltas) = (
            seal_rx.clone(),
            up_tx.clone(),
            keys.clone(),
            abort.clone(),
            plan.zstd_level,
            stats.clone(),
            plan.deltas.clone(),
        );
        sealers.push(std::thread::Builder::new().name(format!("seal-{i}")).spawn(move || {
            if let Err(e) = seal_stage(rx, tx, &keys, level, &stats, deltas.as_deref()) {
                abort.fail(e);
            }
        })?);
    }
    drop(seal_rx);

    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            abort.fail(e);
            drop(up_tx);
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
            for s in sealers {
                let _ = tokio::task::spawn_blocking(move || s.join()).await;
            }
            return Err(abort.take().unwrap_or_else(|| anyhow!("backup stopped")));
        }
    };
    let dedup = {
        let (client, budget, stats, abort, tx) =
            (client.clone(), budget.clone(), stats.clone(), abort.clone(), seal_tx);
        tokio::spawn(async move {
            let r = dedup_stage(job_rx, &tx, &client, &budget, &stats).await;
            tx.close();
            if let Err(e) = r {
                abort.fail(e);
            }
        })
    };

    drop(up_tx);

    let uploader = {
        let (client, budget, stats, abort, streams) =
            (client.clone(), budget.clone(), stats.clone(), abort.clone(), plan.upload_streams);
        tokio::spawn(async move {
            if let Err(e) = upload_stage(up_rx, client, budget, stats, streams).await {
                abort.fail(e);
            }
        })
    };

    let reader_result = tokio::task::spawn_blocking(move || reader.join()).await?;
    let _ = dedup.await;
    for s in sealers {
        let _ = tokio::task::spawn_blocking(move || s.join()).await;
    }
    up_closer.close();
    let _ = uploader.await;
    let ms = |c: &AtomicU64| Stats::get(c) / 1_000_000;
    tracing::debug!(
        reader_budget_ms = ms(&stats.wait_reader_budget),
        reader_send_ms = ms(&stats.wait_reader_send),
        dedup_have_ms = ms(&stats.wait_dedup_have),
        seal_input_ms = ms(&stats.wait_seal_input),
        seal_output_ms = ms(&stats.wait_seal_output),
        upload_input_ms = ms(&stats.wait_upload_input),
        upload_stream_ms = ms(&stats.wait_upload_stream),
        "pipeline waits"
    );
    let q = client.connection().stats();
    tracing::debug!(
        rtt_ms = q.path.rtt.as_millis() as u64,
        cwnd = q.path.cwnd,
        congestion_events = q.path.congestion_events,
        lost_packets = q.path.lost_packets,
        sent_packets = q.path.sent_packets,
        "QUIC path"
    );
    if let Some(e) = abort.take() {
        return Err(e);
    }
    let (root, refs, warnings) = reader_result.map_err(|_| anyhow!("the reader thread panicked"))??;
    Ok(Outcome { client, root, refs, warnings })
}

/// Turns chunks into jobs: id, in-run dedup, budget, reference list.
struct Dispatcher {
    keys: TenantKeys,
    budget: Arc<ByteBudget>,
    tx: async_channel::Sender<Job>,
    stats: Arc<Stats>,
    seen: HashSet<ChunkId>,
    seen_cap: usize,
    refs: RefSpool,
    deltas: Option<Arc<Deltas>>,
    /// The path of the file being read and the offset of its next chunk (chunks are matched
    /// to the last snapshot's by them).
    path: Vec<u8>,
    offset: u64,
}

impl Dispatcher {
    fn dispatch(&mut self, data: &[u8], is_data: bool) -> Result<ChunkRef> {
        let id = self.keys.chunk_id(data);
        let mut base = None;
        if is_data {
            Stats::add(&self.stats.chunks, 1);
            if let Some(d) = &self.deltas {
                base = d.saw(&self.path, self.offset, data, &id);
            }
            self.offset += data.len() as u64;
        }
        if self.seen.len() >= self.seen_cap && !self.seen.contains(&id) {
            self.seen.clear();
        }
        if self.seen.insert(id) {
            self.refs.push(&id).context("writing the temporary reference list")?;
            let stats = &self.stats;
            timed(&stats.wait_reader_budget, || self.budget.acquire(data.len()))
                .map_err(|_| anyhow!("backup stopped"))?;
            let job = Job { id, data: data.to_vec(), is_data, base };
            timed(&stats.wait_reader_send, || self.tx.send_blocking(job)).map_err(|_| anyhow!("backup stopped"))?;
        }
        Ok(ChunkRef { id, len: data.len() as u32 })
    }

    /// Dispatches a chunk of file content cut by the chunker, unless an earlier one failed
    /// (the chunker's callback cannot return the error: it is kept in `err`).
    fn dispatch_data(&mut self, c: &[u8], refs: &mut Vec<ChunkRef>, err: &mut Option<anyhow::Error>) {
        if err.is_none() {
            match self.dispatch(c, true) {
                Ok(r) => refs.push(r),
                Err(e) => *err = Some(e),
            }
        }
    }

    /// Reads once from `src` into the chunker and dispatches each chunk then complete.
    fn cut_from(
        &mut self,
        chunker: &mut Chunker,
        src: &mut dyn Read,
        seen: &mut (impl FnMut(&[u8]) + Send),
        refs: &mut Vec<ChunkRef>,
    ) -> Result<usize, ReadError> {
        let mut err = None;
        let mut emit = |c: &[u8]| self.dispatch_data(c, refs, &mut err);
        let n = chunker.read_from(src, seen, &mut emit).map_err(ReadError::Io)?;
        err.map_or(Ok(n), |e| Err(ReadError::Stopped(e)))
    }

    /// Cuts `data` (or, with `finish`, the tail) and dispatches each chunk.
    fn cut(&mut self, chunker: &mut Chunker, data: Option<&[u8]>, refs: &mut Vec<ChunkRef>) -> Result<()> {
        let mut err = None;
        let mut emit = |c: &[u8]| self.dispatch_data(c, refs, &mut err);
        match data {
            Some(d) => chunker.push(d, &mut emit),
            None => chunker.finish(&mut emit),
        }
        err.map_or(Ok(()), Err)
    }
}

fn read_all(
    items: Vec<Item>,
    params: ChunkerParams,
    time: i64,
    header: ManifestHeader,
    d: &mut Dispatcher,
) -> Result<(ChunkId, Vec<String>)> {
    let mut reader = Reader::new(params, d)?;
    for item in items {
        match item {
            Item::Tree(root) => {
                let mut walk_warnings = Vec::new();
                let mut w = |m: String| walk_warnings.push(m);
                for listed in source::walk(&root, &mut w) {
                    reader.entry(listed)?;
                }
                reader.warnings.extend(walk_warnings);
            }
            Item::File { name, mut file, mtime } => {
                let entry = Entry { uid: 0, gid: 0, ..own_entry(name.into_bytes(), 0o600, mtime) };
                reader.stream(entry, &mut file)?;
            }
            Item::Facts { name, mtime, rx } => {
                let (facts, took) = rx.recv().map_err(|_| anyhow!("the verification facts were never taken"))?;
                let facts = facts?;
                Stats::add(&reader.d.stats.tables, facts.tables.len() as u64);
                Stats::add(&reader.d.stats.facts_nanos, took.as_nanos() as u64);
                reader.stream(own_entry(name.into_bytes(), 0o600, mtime), &mut facts.to_json().as_slice())?;
            }
            Item::Output { name, child } => read_child(&child, "the output", |running| {
                reader.stream(own_entry(name.into_bytes(), 0o600, time), running)
            })?,
            Item::Tar { name, child } => read_child(&child, "the tar stream", |running| {
                reader.tar(&name, running, time)?;
                // The archive ends before the stream does (padding): read it out.
                std::io::copy(running, &mut std::io::sink())?;
                Ok(())
            })?,
        }
    }
    reader.finish(header)
}

/// Runs `child` and reads its output with `read`. The output counts only if the child then
/// exits with 0; if reading fails, the child's own failure is reported when it has one (it
/// explains a broken stream better than the reader can).
fn read_child(
    child: &source::ChildSpec,
    what: &str,
    read: impl FnOnce(&mut source::command::RunningChild) -> Result<()>,
) -> Result<()> {
    let mut running = child.spawn()?;
    let what = format!("{what} of {}", running.program());
    match read(&mut running) {
        Ok(()) => Ok(running.finish()?),
        Err(e) => Err(running.abort().map(anyhow::Error::from).unwrap_or(e.context(what))),
    }
}

/// A file entry owned by the agent's user, for content that has no file of its own.
fn own_entry(path: Vec<u8>, mode: u32, mtime: i64) -> Entry {
    // getuid/getgid cannot fail.
    #[allow(unsafe_code)]
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Entry {
        path,
        kind: EntryKind::File { size: 0, blake3: [0; 32], chunks: Vec::new() },
        mode,
        uid,
        gid,
        mtime_sec: mtime,
        mtime_nsec: 0,
    }
}

/// Reads listed entries in order into chunks and the manifest stream.
struct Reader<'a> {
    d: &'a mut Dispatcher,
    chunker: Chunker,
    manifest: ManifestWriter,
    pieces: Vec<ChunkRef>,
    pending: Vec<Vec<u8>>,
    warnings: Vec<String>,
}

impl<'a> Reader<'a> {
    fn new(params: ChunkerParams, d: &'a mut Dispatcher) -> Result<Self> {
        Ok(Reader {
            d,
            chunker: Chunker::new(params)?,
            manifest: ManifestWriter::new(),
            pieces: Vec::new(),
            pending: Vec::new(),
            warnings: Vec::new(),
        })
    }

    /// Backs up one entry. A file that vanished or cannot be read is skipped with a warning
    /// (and left out of the manifest); only a stopped pipeline is an error.
    fn entry(&mut self, mut item: source::Listed) -> Result<()> {
        match &mut item.entry.kind {
            EntryKind::File { size, blake3, chunks } => {
                self.d.path.clone_from(&item.entry.path);
                self.d.offset = 0;
                match read_file(&item.fs_path, &mut self.chunker, self.d, chunks) {
                    Ok((n, h, changed)) => {
                        *size = n;
                        *blake3 = h;
                        if changed {
                            self.warnings
                                .push(format!("{} changed while it was read; kept as read", item.fs_path.display()));
                        }
                        Stats::add(&self.d.stats.files, 1);
                    }
                    Err(ReadError::Stopped(e)) => return Err(e),
                    Err(ReadError::Io(e)) => {
                        let what = if e.kind() == std::io::ErrorKind::NotFound {
                            "vanished before it could be read".to_string()
                        } else {
                            format!("could not be read: {e}")
                        };
                        self.warnings.push(format!("skipped {}: {what}", item.fs_path.display()));
                        return Ok(());
                    }
                }
            }
            EntryKind::Dir => Stats::add(&self.d.stats.dirs, 1),
            EntryKind::Symlink { .. } => Stats::add(&self.d.stats.symlinks, 1),
        }
        self.push(&item.entry)
    }

    /// Backs up one file whose content comes from `src` (a child's output, a tar member, a
    /// buffer). Unlike a file on disk, a read error fails the snapshot: there is no copy
    /// to skip to.
    fn stream(&mut self, mut entry: Entry, src: &mut dyn Read) -> Result<()> {
        let mut chunks = Vec::new();
        self.d.path.clone_from(&entry.path);
        self.d.offset = 0;
        let (size, hash) = match chunk_stream(src, &mut self.chunker, self.d, &mut chunks) {
            Ok(r) => r,
            Err(ReadError::Stopped(e)) => return Err(e),
            Err(ReadError::Io(e)) => return Err(anyhow!(e).context(format!("reading {}", entry.path_lossy()))),
        };
        entry.kind = EntryKind::File { size, blake3: hash, chunks };
        Stats::add(&self.d.stats.files, 1);
        self.push(&entry)
    }

    fn push(&mut self, entry: &Entry) -> Result<()> {
        let pending = &mut self.pending;
        self.manifest.push(entry, &mut |p: &[u8]| pending.push(p.to_vec()));
        self.flush_pieces()
    }

    /// Unpacks a tar stream into entries under `name/`.
    fn tar(&mut self, name: &str, src: &mut dyn Read, time: i64) -> Result<()> {
        let mut top = own_entry(name.as_bytes().to_vec(), 0o700, time);
        top.kind = EntryKind::Dir;
        Stats::add(&self.d.stats.dirs, 1);
        self.push(&top)?;
        let mut archive = tar::Archive::new(src);
        for member in archive.entries()? {
            let mut member = member?;
            let raw = member.path_bytes().into_owned();
            let rel = raw.strip_prefix(b"./").unwrap_or(&raw);
            let rel = rel.strip_suffix(b"/").unwrap_or(rel);
            if rel.is_empty() {
                continue;
            }
            if rel.starts_with(b"/") || rel.split(|b| *b == b'/').any(|c| c == b".." || c.is_empty()) {
                anyhow::bail!("tar member {:?} has an unsafe path", String::from_utf8_lossy(rel));
            }
            let h = member.header();
            let mut entry = Entry {
                path: [name.as_bytes(), b"/", rel].concat(),
                kind: EntryKind::Dir,
                mode: h.mode()? & 0o7777,
                uid: h.uid()? as u32,
                gid: h.gid()? as u32,
                mtime_sec: h.mtime()? as i64,
                mtime_nsec: 0,
            };
            match h.entry_type() {
                tar::EntryType::Directory => {
                    Stats::add(&self.d.stats.dirs, 1);
                    self.push(&entry)?;
                }
                tar::EntryType::Symlink => {
                    let target = member.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                    entry.kind = EntryKind::Symlink { target: target.to_vec() };
                    Stats::add(&self.d.stats.symlinks, 1);
                    self.push(&entry)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => self.stream(entry, &mut member)?,
                other => anyhow::bail!(
                    "tar member {} is of a kind this version cannot store ({other:?})",
                    String::from_utf8_lossy(rel)
                ),
            }
        }
        Ok(())
    }

    fn flush_pieces(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.pending) {
            self.pieces.push(self.d.dispatch(&p, false)?);
        }
        Ok(())
    }

    /// Ends the manifest stream and dispatches the root; returns its id and the warnings.
    fn finish(mut self, header: ManifestHeader) -> Result<(ChunkId, Vec<String>)> {
        let pending = &mut self.pending;
        let manifest = std::mem::take(&mut self.manifest);
        let (stream_len, entries) = manifest.finish(&mut |p: &[u8]| pending.push(p.to_vec()));
        self.flush_pieces()?;
        let pieces = std::mem::take(&mut self.pieces);
        let root = encode_root(&ManifestRoot { format: MANIFEST_FORMAT, header, stream_len, entries, pieces });
        let root_ref = self.d.dispatch(&root, false)?;
        Ok((root_ref.id, self.warnings))
    }
}

enum ReadError {
    Io(std::io::Error),
    Stopped(anyhow::Error),
}

/// Reads one file through the chunker; returns (size, BLAKE3, changed-while-read).
fn read_file(
    path: &std::path::Path,
    chunker: &mut Chunker,
    d: &mut Dispatcher,
    refs: &mut Vec<ChunkRef>,
) -> Result<(u64, [u8; 32], bool), ReadError> {
    let mut f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let before = f.metadata().map_err(ReadError::Io)?;
    let (size, hash) = chunk_stream(&mut f, chunker, d, refs)?;
    let after = std::fs::metadata(path).ok();
    let changed = size != before.len()
        || after.is_none_or(|a| {
            use std::os::unix::fs::MetadataExt;
            a.mtime() != before.mtime() || a.mtime_nsec() != before.mtime_nsec() || a.len() != size
        });
    Ok((size, hash, changed))
}

/// Reads `src` to its end through the chunker; returns (size, BLAKE3).
fn chunk_stream(
    src: &mut dyn Read,
    chunker: &mut Chunker,
    d: &mut Dispatcher,
    refs: &mut Vec<ChunkRef>,
) -> Result<(u64, [u8; 32]), ReadError> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let mut seen = |b: &[u8]| {
            hasher.update(b);
        };
        let n = match d.cut_from(chunker, src, &mut seen, refs) {
            Ok(0) => break,
            Ok(n) => n,
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(ReadError::Io(e)) => {
                // Drop what was cut of this file so far; its chunks stay unreferenced.
                chunker.finish(&mut |_| {});
                refs.clear();
                return Err(ReadError::Io(e));
            }
            Err(stopped) => return Err(stopped),
        };
        size += n as u64;
        Stats::add(&d.stats.bytes_read, n as u64);
    }
    d.cut(chunker, None, refs).map_err(ReadError::Stopped)?;
    Ok((size, *hasher.finalize().as_bytes()))
}

/// How long the dedup stage waits for more chunks before it asks the node about a batch (but
/// the first): a question per handful of chunks cost a one-segment `wal-push` 47 requests and
/// the node ~9 ms of CPU; with this wait, ~5 ms, and the push 8 % less time (alternated A/B).
const HAVE_LINGER: Duration = Duration::from_millis(2);

async fn dedup_stage(
    rx: async_channel::Receiver<Job>,
    tx: &async_channel::Sender<Job>,
    client: &NodeClient,
    budget: &ByteBudget,
    stats: &Stats,
) -> Result<()> {
    let mut asked = false;
    while let Ok(first) = rx.recv().await {
        let mut batch = vec![first];
        // The first question goes at once, so sealing starts; the later ones wait for more.
        let until = tokio::time::Instant::now() + if asked { HAVE_LINGER } else { Duration::ZERO };
        asked = true;
        while batch.len() < 2048 {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(async_channel::TryRecvError::Closed) => break,
                Err(_) if tokio::time::Instant::now() >= until => break,
                Err(_) => match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Ok(j)) => batch.push(j),
                    _ => break,
                },
            }
        }
        // The bases the new chunks would be deltas on are asked about too: one the cluster
        // lacks (collected) is not used.
        let mut ids: Vec<ChunkId> = batch.iter().map(|j| j.id).collect();
        ids.extend(batch.iter().filter_map(|j| j.base));
        let t = std::time::Instant::now();
        let missing: HashSet<ChunkId> = retry(|| client.missing(&ids))
            .await
            .context("asking the node which chunks it lacks")?
            .into_iter()
            .collect();
        Stats::add(&stats.wait_dedup_have, t.elapsed().as_nanos() as u64);
        for mut j in batch {
            if missing.contains(&j.id) {
                if j.base.is_some_and(|b| missing.contains(&b)) {
                    j.base = None;
                }
                tx.send(j).await.map_err(|_| anyhow!("backup stopped"))?;
            } else {
                budget.release(j.data.len());
            }
        }
    }
    Ok(())
}

fn seal_stage(
    rx: async_channel::Receiver<Job>,
    tx: async_channel::Sender<Sealed>,
    keys: &TenantKeys,
    level: i32,
    stats: &Stats,
    deltas: Option<&Deltas>,
) -> Result<()> {
    let mut sealer = Sealer::new(keys, level)?;
    let mut opener = exclave::envelope::Opener::new(keys)?;
    while let Ok(job) = timed(&stats.wait_seal_input, || rx.recv_blocking()) {
        let envelope = match deltas {
            Some(d) => seal_with_deltas(&mut sealer, &mut opener, d, &job)?,
            None => sealer.seal(&job.id, &job.data).with_context(|| format!("sealing chunk {}", job.id.short()))?,
        };
        let checksum = Checksum::of(&envelope);
        let sealed = Sealed { id: job.id, plain_len: job.data.len(), envelope, checksum, is_data: job.is_data };
        timed(&stats.wait_seal_output, || tx.send_blocking(sealed)).map_err(|_| anyhow!("backup stopped"))?;
    }
    Ok(())
}

/// Seals a job as a delta on its base when that is worth it (`crate::deltas` rules), else
/// whole, and tells the delta cache which it was.
fn seal_with_deltas(
    sealer: &mut Sealer,
    opener: &mut exclave::envelope::Opener,
    d: &Deltas,
    job: &Job,
) -> Result<Vec<u8>> {
    let whole = |sealer: &mut Sealer| {
        sealer.seal(&job.id, &job.data).with_context(|| format!("sealing chunk {}", job.id.short()))
    };
    let Some(base) = job.base else {
        let env = whole(sealer)?;
        keep_as_base(d, job, &env);
        return Ok(env);
    };
    let Some((plain, base_len)) = d.load(opener, &base) else {
        tracing::trace!(chunk = %job.id.short(), base = %base.short(), "base not in the delta cache");
        let env = whole(sealer)?;
        keep_as_base(d, job, &env);
        return Ok(env);
    };
    let delta = sealer
        .seal_delta(&job.id, &job.data, &base, &plain)
        .with_context(|| format!("sealing chunk {} as a delta", job.id.short()))?;
    // The quick rule spares a second compression; a delta over it gets a second look
    // against the chunk sealed whole.
    if deltas::worth_keeping(delta.len(), base_len) {
        d.sealed_delta(&job.id, &base, delta.len());
        return Ok(delta);
    }
    let env = whole(sealer)?;
    if deltas::worth_keeping_against_whole(delta.len(), env.len()) {
        d.sealed_delta(&job.id, &base, delta.len());
        return Ok(delta);
    }
    tracing::trace!(chunk = %job.id.short(), delta = delta.len(), whole = env.len(), "delta not worth keeping");
    keep_as_base(d, job, &env);
    Ok(env)
}

/// A chunk of file content sealed whole becomes a base. An incompressible one (a scan, an
/// archive) gives no delta worth sending: it is not kept.
fn keep_as_base(d: &Deltas, job: &Job, env: &[u8]) {
    if !job.is_data {
        return;
    }
    if job.base.is_some() {
        Stats::add(&d.stats.rebased, 1);
    }
    if exclave::envelope::parse_header(env).is_ok_and(|h| h.codec != exclave::envelope::Codec::Raw) {
        d.sealed_full(&job.id, env);
    }
}

const UPLOAD_BATCH_BYTES: usize = 4 << 20;
const UPLOAD_LINGER: Duration = Duration::from_millis(20);

async fn upload_stage(
    rx: async_channel::Receiver<Sealed>,
    client: Arc<NodeClient>,
    budget: Arc<ByteBudget>,
    stats: Arc<Stats>,
    streams: usize,
) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(streams.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let t = std::time::Instant::now();
        // A failed upload must be seen while waiting for input too: its bytes stay taken from
        // the budget, so once uploads fail nothing more may ever come, and a loop that only
        // looked at its tasks when a batch arrived would wait forever (seen with a node killed
        // mid-upload: the reader blocked on the budget, the seal workers idle).
        let first = tokio::select! {
            r = rx.recv() => match r {
                Ok(s) => s,
                Err(_) => break,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                done??;
                continue;
            }
        };
        Stats::add(&stats.wait_upload_input, t.elapsed().as_nanos() as u64);
        let mut bytes = first.envelope.len();
        let mut batch = vec![first];
        // Every batch costs the node one synced write: let it fill for a moment rather than
        // send whatever happens to be ready.
        let deadline = tokio::time::Instant::now() + UPLOAD_LINGER;
        while bytes < UPLOAD_BATCH_BYTES {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(s)) => {
                    bytes += s.envelope.len();
                    batch.push(s);
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let t = std::time::Instant::now();
        let permit = sem.clone().acquire_owned().await?;
        Stats::add(&stats.wait_upload_stream, t.elapsed().as_nanos() as u64);
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
        // Before any upload starts, so that none passes the hold.
        crate::backup::test_hold("EXCLAVE_TEST_HOLD_UPLOAD").await;
        let (client, budget, stats) = (client.clone(), budget.clone(), stats.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let plain: usize = batch.iter().map(|s| s.plain_len).sum();
            let data: Vec<(u64, u64)> =
                batch.iter().filter(|s| s.is_data).map(|s| (1, s.envelope.len() as u64)).collect();
            let chunks: Vec<PutChunk> = batch
                .into_iter()
                .map(|s| PutChunk { id: s.id, checksum: s.checksum, envelope: s.envelope.into() })
                .collect();
            let n = chunks.len() as u64;
            let req = [Request::PutChunks { chunks }];
            retry(|| client.call(&req)).await.context("uploading chunks")?;
            Stats::add(&stats.chunks_uploaded, n);
            Stats::add(&stats.new_bytes, plain as u64);
            Stats::add(&stats.uploaded_bytes, bytes as u64);
            Stats::add(&stats.data_chunks_uploaded, data.iter().map(|d| d.0).sum());
            Stats::add(&stats.data_bytes_uploaded, data.iter().map(|d| d.1).sum());
            budget.release(plain);
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

/// Retries, on the same connection, a request the node refused for a reason that may pass
/// (storage briefly unavailable). A lost connection is not retried here: the run fails and
/// the next one resumes, reusing every chunk already stored.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, exclave::client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, exclave::client::ClientError>>,
{
    let mut delay = Duration::from_millis(200);
    for _ in 0..3 {
        match f().await {
            Err(exclave::client::ClientError::Remote { code, .. }) if code.retryable() => {
                tokio::time::sleep(delay).await;
                delay *= 3;
            }
            other => return other,
        }
    }
    f().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::keys::MasterKey;
    use exclave::manifest::decode_root;

    fn header() -> ManifestHeader {
        ManifestHeader {
            format: MANIFEST_FORMAT,
            tenant: "lux".into(),
            source: "t".into(),
            time: 0,
            hostname: String::new(),
            chunker: ChunkerParams::default(),
            roots: vec!["src".into()],
        }
    }

    #[test]
    fn a_file_that_vanishes_after_listing_is_skipped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("src");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("kept.txt"), b"kept").unwrap();
        std::fs::write(base.join("vanishing.txt"), b"gone soon").unwrap();
        let root = source::roots(std::slice::from_ref(&base)).unwrap().remove(0);
        let mut ignore = |_: String| {};
        let listed: Vec<source::Listed> = source::walk(&root, &mut ignore).collect();
        assert_eq!(listed.len(), 3);
        std::fs::remove_file(base.join("vanishing.txt")).unwrap();

        let keys = TenantKeys::from_master("lux", MasterKey::from_bytes([1; 32]));
        let (tx, rx) = async_channel::bounded(64);
        let budget = Arc::new(ByteBudget::new(1 << 20));
        let stats = Arc::new(Stats::default());
        let refs = RefSpool::new().unwrap();
        let mut d = Dispatcher {
            keys,
            budget: budget.clone(),
            tx,
            stats: stats.clone(),
            seen: HashSet::new(),
            seen_cap: 2,
            refs,
            deltas: None,
            path: Vec::new(),
            offset: 0,
        };
        let drain = std::thread::spawn(move || {
            let mut jobs = Vec::new();
            while let Ok(j) = rx.recv_blocking() {
                budget.release(j.data.len());
                jobs.push(j);
            }
            jobs
        });
        let mut reader = Reader::new(ChunkerParams::default(), &mut d).unwrap();
        for item in listed {
            reader.entry(item).unwrap();
        }
        let (root_id, warnings) = reader.finish(header()).unwrap();
        d.tx.close();
        let jobs = drain.join().unwrap();

        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("vanishing.txt") && warnings[0].contains("vanished"), "{warnings:?}");
        assert_eq!(Stats::get(&stats.files), 1);
        let root_job = jobs.iter().find(|j| j.id == root_id).unwrap();
        let root = decode_root(&root_job.data).unwrap();
        assert_eq!(root.entries, 2, "the root dir and kept.txt; the vanished file is not in the manifest");
    }
}
