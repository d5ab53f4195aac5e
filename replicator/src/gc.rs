//! Garbage collection: the space of chunks no snapshot references any more is given back,
//! without ever deleting a chunk that a snapshot, or a backup running at that moment, needs.
//!
//! Only retention or an administrator's `forget` releases a snapshot (agents cannot); GC then
//! collects what no remaining snapshot references, and what uploads that never finished left.
//!
//! # The safety rule
//!
//! Everything that decides is a Raft command applied in log order on every node (see
//! `catalog::gc`); no host's clock takes part. Three steps:
//!
//! 1. **Mark and condemn.** A pass reads the commit sequence `as_of`, then walks each
//!    tenant's index alongside the sorted reference lists of its snapshots (`Marker`): an
//!    indexed chunk no list holds is proposed in `GcCondemn { as_of }`. Applying it moves the
//!    chunk from the index (`c`) to the condemned set (`g`), unless a snapshot committed after
//!    `as_of` (which the mark could not see) references it. Copies stay on every node.
//! 2. **Grace.** A condemned chunk is put back as it was by a commit that references it (its
//!    copies are all still there) and by an upload of it. It is swept only by a later pass,
//!    `--gc-grace-passes` after the one that condemned it: the grace is counted in passes
//!    recorded through the log, not in hours.
//! 3. **Sweep.** `GcSweep` deletes, on every node and in the same batch as its applied index,
//!    the copies of the chunks it names that are not in the index at that point of the log
//!    (condemned, or never indexed: orphans). It bumps the sweep sequence and records the ids.
//!
//! Deltas: a delta needs its base to be read. A mark that sees a delta (indexed or condemned)
//! does not condemn its base, no sweep takes a base while such a delta exists
//! (`catalog::gc::delta_bases`, read by the mark and again before the sweep), and `IndexChunksV4` indexes a delta only with its base in the index,
//! putting a condemned base back and refusing a delta whose base was swept since the agent
//! asked about it (the agent then sends that chunk whole). So every delta in the index or
//! condemned has its base in the index or condemned, and a commit that references it puts both
//! back. A base is collected one pass after its last delta was swept.
//!
//! Why nothing needed is lost:
//! - A commit is applied after every sweep before it in the log: a reference to a swept chunk
//!   is absent from both `c` and `g`, so the commit is refused with the chunks to send again
//!   (`MissingChunks`); the agent runs the backup again, uploading what the cluster lacks.
//! - An upload is acknowledged by nodes that either wrote the chunk or already held it. Each
//!   node decides having applied at least the sweeps its uploader had seen (`sweep_seq`,
//!   carried by `ReplicateV2`; a node behind waits). `IndexChunksV2 { sweep_seq }` then refuses
//!   any chunk a sweep after `sweep_seq` deleted: a copy a node counted may be gone. The
//!   uploading node stores those again and retries. So an index entry always has a write
//!   quorum of copies behind it, and a copy is deleted only by a sweep of an id not indexed.
//! - Local orphans (copies the index never named) are proposed for a sweep only when two
//!   consecutive passes of this node found them: an upload in flight at one pass has been
//!   indexed by the next. Even if one were swept, the rule above refuses its index entry.
//!
//! Space: a sweep only drops locations. Each node then walks its locations, deletes packs that
//! nothing lives in, and rewrites packs mostly dead (`--gc-repack-live-percent`): their live
//! records are appended to the active pack and synced, each location is repointed in one
//! synced batch unless it changed meanwhile, and only then is the old pack deleted. A crash
//! between leaves dead copies, never a location without its record. Readers that looked up a
//! location just before a pack was deleted look it up again. Deleting needs no free space, so
//! GC works on a full disk; a rewrite waits until there is room for its live bytes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exclave::ChunkId;
use exclave::protocol::{GcReport, GcResult, PutChunk, ReclaimReport};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::catalog::gc::{self as cgc, IDS_PER_COMMAND, Marker};
use crate::catalog::{self, CatalogError, Command, Outcome};
use crate::consensus::ConsensusError;
use crate::node::Node;
use crate::store::{Location, Store, StoreError};

/// Why a GC pass stopped. Every step can be retried: a pass starts over from the catalog.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("the cluster refused a GC command: {0}")]
    Refused(String),
}

/// Orphans remembered between passes (their ids), at most.
const ORPHANS_REMEMBERED: usize = 1 << 20;
/// Locations read per page.
const PAGE: usize = 4096;
/// Live bytes copied per synced append while rewriting a pack.
const MOVE_BATCH: u64 = 8 << 20;
/// Free space a rewrite leaves besides the live bytes it copies.
const REWRITE_MARGIN: u64 = 16 << 20;
/// The active pack is sealed for a rewrite only if this much of it is dead.
const ACTIVE_DEAD_MIN: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct Settings {
    /// A cluster pass runs on the leader this long after the last (`None`: only when asked).
    pub interval: Option<Duration>,
    /// Passes a condemned chunk waits before it is swept.
    pub grace_passes: u64,
    /// A pack with less than this share of live bytes is rewritten.
    pub repack_live_below: f64,
}

#[derive(Default)]
struct State {
    /// The cluster pass and sweep sequence this node last reclaimed after.
    local_after_pass: u64,
    reclaimed_after_sweep: u64,
}

/// The node's garbage collector: settings, the last reports, and the orphans seen last time.
pub struct Collector {
    pub settings: Settings,
    running: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    orphans_seen: Mutex<HashSet<(String, ChunkId)>>,
}

fn now_secs() -> i64 {
    exclave::pki::now_secs()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, GcError> + Send + 'static) -> Result<T, GcError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| GcError::Store(StoreError::Io(format!("GC task failed: {e}"))))?
}

impl Collector {
    pub fn new(settings: Settings) -> Collector {
        Collector {
            settings,
            running: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            orphans_seen: Mutex::new(HashSet::new()),
        }
    }

    /// Whether a pass (the cluster's or this node's own) is running here now.
    pub fn is_running(&self) -> bool {
        self.running.try_lock().is_err()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A whole pass from this node: the cluster's (condemn, sweep), then this node's own
    /// (orphans, space). One at a time per node.
    pub async fn run_now(&self, node: &Arc<Node>, dry_run: bool) -> Result<GcResult, GcError> {
        let _one = self.running.lock().await;
        let result = async {
            let cluster = cluster_pass(node, self.settings.grace_passes, dry_run).await?;
            let local = local_pass(node, self, dry_run).await?;
            Ok::<_, GcError>(GcResult { cluster, local })
        }
        .await;
        match &result {
            Ok(r) if !dry_run => {
                node.metrics.gc.passes.inc();
                node.metrics.gc.condemned_bytes.inc_by(r.cluster.condemned_bytes);
                node.metrics.gc.swept_bytes.inc_by(r.cluster.swept_bytes);
                self.state().local_after_pass = r.cluster.pass;
            }
            Ok(_) => {}
            Err(e) => {
                node.metrics.gc.errors.inc();
                warn!(error = %e, "garbage collection stopped; the next pass starts over");
            }
        }
        result
    }

    /// This node's share only (after a pass another node ran, or sweeps it applied).
    async fn run_local(&self, node: &Arc<Node>, scan_orphans: bool) -> Result<ReclaimReport, GcError> {
        let _one = self.running.lock().await;
        let r = if scan_orphans { local_pass(node, self, false).await } else { reclaim(node, self, false).await };
        if let Err(e) = &r {
            node.metrics.gc.errors.inc();
            warn!(error = %e, "reclaiming space stopped; it is tried again later");
        }
        r
    }
}

/// Proposes a GC command and returns what it collected.
async fn propose(node: &Arc<Node>, cmd: Command) -> Result<(u64, u64), GcError> {
    match node.raft.propose(cmd).await? {
        Outcome::Collected { chunks, bytes } => Ok((chunks, bytes)),
        Outcome::Done => Ok((0, 0)),
        Outcome::Refused(m) => Err(GcError::Refused(m)),
        other => Err(GcError::Refused(format!("unexpected outcome {other:?}"))),
    }
}

/// The cluster's pass: condemn what no snapshot references, sweep what is past its grace,
/// drop staged references of commits that never finished, and record the pass.
pub async fn cluster_pass(node: &Arc<Node>, grace: u64, dry_run: bool) -> Result<GcReport, GcError> {
    // The mark reads this node's catalog: first apply what the leader has committed, so a pass
    // run on a follower right after a retention change sees it (a stale view is safe, just late).
    node.raft.read_barrier().await?;
    let store = node.store.clone();
    let (as_of, st, tenants) = blocking(move || {
        let view = store.catalog()?;
        Ok((catalog::commit_seq(&view)?, cgc::state(&view)?, cgc::tenants(&view)?))
    })
    .await?;
    let pass = st.pass + 1;
    let mut report = GcReport {
        pass,
        node: node.name.clone(),
        started: now_secs(),
        dry_run,
        grace_passes: grace,
        ..Default::default()
    };
    info!(pass, dry_run, grace, tenants = tenants.len(), "garbage collection: cluster pass begins");
    for tenant in &tenants {
        // Mark and condemn, a page at a time.
        let (store, t) = (node.store.clone(), tenant.clone());
        let mut marker = blocking(move || Ok(Marker::new(&store.catalog()?, &t)?)).await?;
        let mut condemned_now: HashSet<ChunkId> = HashSet::new();
        loop {
            let store = node.store.clone();
            let (m, page) = blocking(move || {
                let page = marker.next_page(&store.catalog()?, IDS_PER_COMMAND)?;
                Ok((marker, page))
            })
            .await?;
            marker = m;
            if page.is_empty() {
                break;
            }
            if dry_run {
                report.condemned_chunks += page.len() as u64;
                report.condemned_bytes += page.iter().map(|(_, e)| u64::from(e.envelope_len)).sum::<u64>();
                condemned_now.extend(page.iter().map(|(id, _)| *id));
                continue;
            }
            let ids: Vec<ChunkId> = page.iter().map(|(id, _)| *id).collect();
            let (n, bytes) =
                propose(node, Command::GcCondemn { tenant: tenant.clone(), ids, as_of_seq: as_of, pass }).await?;
            report.condemned_chunks += n;
            report.condemned_bytes += bytes;
        }
        report.examined += marker.examined;
        // Sweep what is past its grace, except bases of deltas still indexed or condemned (one
        // indexed since its base was condemned: a commit may yet reference it). Read after the
        // condemnations: a delta indexed later puts its condemned base back before the sweep.
        let (store, t) = (node.store.clone(), tenant.clone());
        let kept_bases = blocking(move || Ok(cgc::delta_bases(&store.catalog()?, &t)?)).await?;
        let mut after: Option<ChunkId> = None;
        loop {
            let (store, t, a) = (node.store.clone(), tenant.clone(), after);
            let page =
                blocking(move || Ok(cgc::condemned_page(&store.catalog()?, &t, a.as_ref(), IDS_PER_COMMAND)?)).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            let mut due = Vec::new();
            for (id, c) in &page {
                if c.pass + grace <= pass && kept_bases.binary_search(id).is_err() {
                    due.push(*id);
                    if dry_run {
                        report.swept_bytes += u64::from(c.entry.envelope_len);
                    }
                } else {
                    report.pending_chunks += 1;
                    report.pending_bytes += u64::from(c.entry.envelope_len);
                }
            }
            if dry_run {
                report.swept_chunks += due.len() as u64;
                continue;
            }
            if !due.is_empty() {
                let (n, bytes) = propose(node, Command::GcSweep { tenant: tenant.clone(), ids: due }).await?;
                report.swept_chunks += n;
                report.swept_bytes += bytes;
                crate::test_hooks::crash_point("gc-swept");
            }
        }
        if dry_run && grace == 0 {
            // What this pass would condemn it would also sweep.
            report.swept_chunks += condemned_now.len() as u64;
            report.swept_bytes += report.condemned_bytes;
        }
    }
    // Commits that never finished: staged at the last pass and still staged now.
    let store = node.store.clone();
    let staged = blocking(move || Ok(cgc::staged(&store.catalog()?)?)).await?;
    let mut still = Vec::new();
    for pair in staged {
        if st.staged_seen.contains(&pair) {
            if !dry_run {
                propose(node, Command::GcDropStaged { tenant: pair.0.clone(), snapshot_id: pair.1.clone() }).await?;
            }
            info!(tenant = %pair.0, snapshot = %pair.1, dry_run, "dropped the staged references of a commit that never finished");
            report.staged_dropped += 1;
        } else {
            still.push(pair);
        }
    }
    report.finished = now_secs();
    if !dry_run {
        propose(node, Command::GcPassDone { report: report.clone(), staged_seen: still }).await?;
    }
    info!(
        pass,
        dry_run,
        examined = report.examined,
        condemned = report.condemned_chunks,
        condemned_mib = report.condemned_bytes >> 20,
        swept = report.swept_chunks,
        swept_mib = report.swept_bytes >> 20,
        pending = report.pending_chunks,
        "garbage collection: cluster pass done"
    );
    Ok(report)
}

/// This node's share: sweep its orphans (seen by two passes in a row), then reclaim space.
async fn local_pass(node: &Arc<Node>, gc: &Collector, dry_run: bool) -> Result<ReclaimReport, GcError> {
    // A copy whose index entry this node has not applied yet is not an orphan.
    node.raft.read_barrier().await?;
    let store = node.store.clone();
    let found = blocking(move || find_orphans(&store)).await?;
    let (due, keep) = {
        let mut seen = gc.orphans_seen.lock().unwrap_or_else(|p| p.into_inner());
        let (due, keep): (Vec<_>, Vec<_>) = found.iter().cloned().partition(|o| seen.contains(o));
        if !dry_run {
            *seen = keep.iter().take(ORPHANS_REMEMBERED).cloned().collect();
        }
        (due, keep.len())
    };
    node.metrics.gc.orphans.set(found.len() as i64);
    let mut swept = 0u64;
    if !dry_run && !due.is_empty() {
        let mut by_tenant: HashMap<String, Vec<ChunkId>> = HashMap::new();
        for (t, id) in due {
            by_tenant.entry(t).or_default().push(id);
        }
        for (tenant, ids) in by_tenant {
            for part in ids.chunks(IDS_PER_COMMAND) {
                swept += propose(node, Command::GcSweep { tenant: tenant.clone(), ids: part.to_vec() }).await?.0;
            }
        }
        info!(swept, "swept chunks no upload ever indexed (seen by two passes in a row)");
    } else if dry_run {
        swept = due.len() as u64;
    }
    let mut r = reclaim(node, gc, dry_run).await?;
    r.orphans_found = found.len() as u64;
    r.orphans_swept = swept;
    if keep > 0 {
        info!(orphans = keep, "chunks stored here that the index does not name: swept at the next pass if still so");
    }
    Ok(r)
}

/// Chunks this node holds that the applied catalog neither indexes nor has condemned.
fn find_orphans(store: &Arc<Store>) -> Result<Vec<(String, ChunkId)>, GcError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.locations_page(after.as_deref(), PAGE)?;
        let Some((last, ..)) = page.last() else { break };
        after = Some(last.clone());
        let view = store.catalog()?;
        let ckeys: Vec<Vec<u8>> = page.iter().map(|(_, t, id, _)| catalog::chunk_key(t, id)).collect();
        let gkeys: Vec<Vec<u8>> = page.iter().map(|(_, t, id, _)| cgc::condemned_key(t, id)).collect();
        let (cs, gs) = (catalog::CatalogRead::get_many(&view, &ckeys)?, catalog::CatalogRead::get_many(&view, &gkeys)?);
        for ((_, t, id, _), (c, g)) in page.iter().zip(cs.into_iter().zip(gs)) {
            if c.is_none() && g.is_none() {
                out.push((t.clone(), *id));
            }
        }
    }
    Ok(out)
}

/// Live bytes per pack, by a walk over this node's locations; with `keep`, also the
/// locations that point into those packs.
#[allow(clippy::type_complexity)]
fn walk_live(
    store: &Store,
    keep: &HashSet<u32>,
) -> Result<(HashMap<u32, u64>, HashMap<u32, Vec<(String, ChunkId, Location)>>), GcError> {
    let mut live: HashMap<u32, u64> = HashMap::new();
    let mut entries: HashMap<u32, Vec<(String, ChunkId, Location)>> = HashMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.locations_page(after.as_deref(), PAGE)?;
        let Some((last, ..)) = page.last() else { break };
        after = Some(last.clone());
        for (_, tenant, id, loc) in page {
            *live.entry(loc.pack).or_default() += Store::record_size(&tenant, loc.len);
            if keep.contains(&loc.pack) {
                entries.entry(loc.pack).or_default().push((tenant, id, loc));
            }
        }
    }
    Ok((live, entries))
}

/// Which packs to delete (nothing lives in them) and to rewrite (mostly dead), given their
/// sizes and live bytes; the active pack never (`seal_active` says whether to seal it first).
pub fn plan(
    packs: &[(u32, u64)],
    live: &HashMap<u32, u64>,
    active: Option<u32>,
    live_below: f64,
) -> (Vec<u32>, Vec<u32>, bool) {
    let (mut delete, mut rewrite, mut seal_active) = (Vec::new(), Vec::new(), false);
    for (id, size) in packs {
        let l = live.get(id).copied().unwrap_or(0);
        let body = size.saturating_sub(8);
        if Some(*id) == active {
            let dead = body.saturating_sub(l);
            // Wholly dead, it is sealed whatever its size: it is then deleted without a copy.
            seal_active = (body > 0 && l == 0) || (dead >= ACTIVE_DEAD_MIN && (l as f64) < body as f64 * live_below);
            continue;
        }
        if l == 0 {
            delete.push(*id);
        } else if (l as f64) < body as f64 * live_below {
            rewrite.push(*id);
        }
    }
    rewrite.sort_by_key(|id| live.get(id).copied().unwrap_or(0));
    (delete, rewrite, seal_active)
}

/// Gives space back: deletes the packs nothing lives in, rewrites the mostly dead ones.
async fn reclaim(node: &Arc<Node>, gc: &Collector, dry_run: bool) -> Result<ReclaimReport, GcError> {
    let store = node.store.clone();
    let sweep_seq = {
        let store = store.clone();
        blocking(move || Ok(cgc::state(&store.catalog()?)?.sweep_seq)).await?
    };
    let live_below = gc.settings.repack_live_below;
    let data_dir = node.data_dir.clone();
    let name = node.name.clone();
    let r = blocking(move || {
        let mut r = ReclaimReport { node: name, started: now_secs(), ..Default::default() };
        let packs = store.pack_files()?;
        r.pack_bytes_before = packs.iter().map(|(_, s)| s).sum();
        let (live, _) = walk_live(&store, &HashSet::new())?;
        let active = store.active_pack().map(|(id, _)| id);
        let (_, _, seal_active) = plan(&packs, &live, active, live_below);
        if seal_active && !dry_run {
            store.seal_active_pack()?;
        }
        // Sealed packs gain no location: a second walk gives their exact live bytes, and a
        // third the entries of only the packs to rewrite (holding those of every sealed pack
        // took ~1.2 GiB at 10^7 chunks).
        let active = store.active_pack().map(|(id, _)| id);
        let packs = store.pack_files()?;
        let (live, _) = walk_live(&store, &HashSet::new())?;
        let (delete, rewrite, _) = plan(&packs, &live, active, live_below);
        let to_rewrite: HashSet<u32> = rewrite.iter().copied().collect();
        let mut entries = if to_rewrite.is_empty() { HashMap::new() } else { walk_live(&store, &to_rewrite)?.1 };
        let size_of: HashMap<u32, u64> = packs.iter().copied().collect();
        for id in &delete {
            if !dry_run {
                store.delete_pack(*id)?;
            }
            r.packs_deleted += 1;
        }
        for id in rewrite {
            let list = entries.remove(&id).unwrap_or_default();
            let live_bytes: u64 = list.iter().map(|(t, _, l)| Store::record_size(t, l.len)).sum();
            if dry_run {
                r.packs_rewritten += 1;
                r.bytes_moved += live_bytes;
                continue;
            }
            let free = crate::metrics::disk_usage(&data_dir).1.saturating_sub(store.ballast_owed());
            if free < live_bytes + REWRITE_MARGIN {
                r.skipped.push(format!(
                    "pack {id}: {} MiB live to copy, {} MiB free; rewritten once there is room",
                    live_bytes >> 20,
                    free >> 20
                ));
                continue;
            }
            match rewrite_pack(&store, id, &list) {
                Ok(moved) => {
                    r.packs_rewritten += 1;
                    r.bytes_moved += moved;
                }
                Err(why) => r.skipped.push(format!("pack {id}: {why}")),
            }
        }
        let after = store.pack_files()?;
        r.pack_bytes_after = after.iter().map(|(_, s)| s).sum();
        if dry_run {
            let freed: u64 = delete.iter().filter_map(|id| size_of.get(id)).sum();
            r.pack_bytes_after = r.pack_bytes_before.saturating_sub(freed);
        }
        r.finished = now_secs();
        Ok(r)
    })
    .await?;
    if !dry_run {
        let freed = r.pack_bytes_before.saturating_sub(r.pack_bytes_after);
        node.metrics.gc.reclaimed_bytes.inc_by(freed);
        node.metrics.gc.pack_bytes.set(r.pack_bytes_after as i64);
        gc.state().reclaimed_after_sweep = sweep_seq;
        if r.packs_deleted + r.packs_rewritten > 0 || !r.skipped.is_empty() {
            info!(
                deleted = r.packs_deleted,
                rewritten = r.packs_rewritten,
                moved_mib = r.bytes_moved >> 20,
                freed_mib = freed >> 20,
                skipped = ?r.skipped,
                "space given back to the file system"
            );
        }
    }
    Ok(r)
}

/// Copies a pack's live records to the active pack, then deletes it once no location points
/// into it. Returns the bytes copied; a damaged record stops it (scrub repairs it first).
fn rewrite_pack(store: &Store, id: u32, list: &[(String, ChunkId, Location)]) -> Result<u64, String> {
    let mut moved = 0u64;
    let mut batch: Vec<(String, PutChunk, Location)> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut buf = Vec::new();
    for (tenant, cid, loc) in list {
        match store.check_at(cid, loc, &mut buf) {
            Ok(_) => {}
            // Swept or moved since the walk: nothing to copy.
            Err(_) if store.location(tenant, cid).map_err(|e| e.to_string())?.as_ref() != Some(loc) => continue,
            Err(e) => return Err(format!("{e}; left for scrub to repair first")),
        }
        batch_bytes += u64::from(loc.len);
        batch.push((
            tenant.clone(),
            PutChunk { id: *cid, checksum: loc.checksum, envelope: std::mem::take(&mut buf).into() },
            *loc,
        ));
        if batch_bytes >= MOVE_BATCH {
            store.relocate(&batch).map_err(|e| e.to_string())?;
            moved += batch_bytes;
            batch.clear();
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        store.relocate(&batch).map_err(|e| e.to_string())?;
        moved += batch_bytes;
    }
    crate::test_hooks::crash_point("gc-before-delete");
    for (tenant, cid, _) in list {
        if store.location(tenant, cid).map_err(|e| e.to_string())?.is_some_and(|l| l.pack == id) {
            return Err(format!("chunk {cid} still lives in it"));
        }
    }
    store.delete_pack(id).map_err(|e| e.to_string())?;
    Ok(moved)
}

/// Worker: the leader runs a cluster pass every `interval`; every node reclaims its space
/// after each pass (and after sweeps it applies, once they stop coming), until `stop` turns
/// true.
pub async fn worker(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let gc = node.gc.clone();
    let started = now_secs();
    let mut sweeps_seen = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let store = node.store.clone();
        let Ok(Ok(st)) = tokio::task::spawn_blocking(move || {
            store.catalog().map_err(GcError::from).and_then(|v| Ok(cgc::state(&v)?))
        })
        .await
        else {
            continue;
        };
        if let Some(last) = &st.last {
            node.metrics.gc.last_pass.set(last.finished);
            node.metrics.gc.condemned_pending.set(last.pending_chunks as i64);
        }
        let is_leader = node.raft.view().leader == node.raft.id;
        if let Some(interval) = gc.settings.interval
            && is_leader
        {
            let last = st.last.as_ref().map_or(started, |l| l.finished);
            if now_secs() - last >= interval.as_secs() as i64 {
                let _ = gc.run_now(&node, false).await;
                continue;
            }
        }
        let (after_pass, after_sweep) = {
            let s = gc.state();
            (s.local_after_pass, s.reclaimed_after_sweep)
        };
        if st.pass > after_pass {
            if gc.run_local(&node, true).await.is_ok() {
                gc.state().local_after_pass = st.pass;
            }
        } else if st.sweep_seq > after_sweep && st.sweep_seq == sweeps_seen {
            // Not while a pass is still sweeping (a sweep every second or so): rewriting packs
            // that the next sweeps empty would copy records only to delete them.
            let _ = gc.run_local(&node, false).await;
        }
        sweeps_seen = st.sweep_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_packs_are_deleted_and_mostly_dead_ones_rewritten() {
        let packs = [(1, 1000 + 8), (2, 1000 + 8), (3, 1000 + 8), (4, (4 << 20) + 8)];
        let live: HashMap<u32, u64> = [(2, 100), (3, 900), (4, 10)].into_iter().collect();
        let (delete, rewrite, seal) = plan(&packs, &live, Some(4), 0.5);
        assert_eq!(delete, vec![1]);
        assert_eq!(rewrite, vec![2], "pack 3 is 90 % live: left");
        assert!(seal, "the active pack is mostly dead: sealed to be rewritten next");
        let small: HashMap<u32, u64> = [(4, 100)].into_iter().collect();
        let (_, _, seal) = plan(&[(4, 1000)], &small, Some(4), 0.5);
        assert!(!seal, "too little dead space in the active pack to bother");
        let (_, _, seal) = plan(&[(4, 1000)], &HashMap::new(), Some(4), 0.5);
        assert!(seal, "a wholly dead active pack goes, however small");
        let (_, _, seal) = plan(&[(4, 8)], &HashMap::new(), Some(4), 0.5);
        assert!(!seal, "an empty active pack stays");
        let (delete, rewrite, _) = plan(&packs, &live, None, 0.0);
        assert_eq!((delete, rewrite), (vec![1], vec![]), "repacking off: only empty packs go");
    }
}
