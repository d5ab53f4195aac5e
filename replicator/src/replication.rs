//! Chunks travel outside the Raft log: this module owns how they reach every embassy.
//!
//! - **Write quorum**: the node that receives an agent's chunks stores them, sends them to
//!   every other member, and acknowledges once `write_quorum` voters (itself included) hold
//!   them durably; only then are they proposed for the index. A learner is sent them too,
//!   but its acknowledgement does not count: it may never become a voter. So an indexed chunk is on a
//!   quorum of sites, and a commit that references only indexed chunks survives the loss of
//!   any minority.
//! - **Anti-entropy**: each node walks the index it has applied, fetches from peers every
//!   chunk it lacks, checks it against the index's storage checksum, and stores it. A node
//!   that was down, or new, backfills completely; every site converges to a full copy.
//! - **Read-through**: a restore asking this node for an indexed chunk it does not hold yet
//!   gets it fetched from a peer on the spot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use exclave::ChunkId;
use exclave::protocol::PutChunk;
use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::catalog::{self, Command, IndexEntry};
use crate::consensus::ConsensusError;
use crate::node::Node;
use crate::store::StoreError;

/// Why chunks could not be stored on a quorum, or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    /// Too few voters hold the chunks (peers unreachable, full, or refusing).
    #[error(
        "only {held} of the {need} nodes needed hold these chunks durably ({why}); they will be indexed once a quorum holds them"
    )]
    Quorum { held: usize, need: usize, why: String },
    /// The node's disk reached its reserve: a backfill stops fetching until room is made.
    #[error("backfill paused: {0}")]
    Paused(StoreError),
    #[error("the node is stopping")]
    Stopping,
    #[error(
        "tenant {tenant} is over its quota: {} MiB stored, this upload needs {} MiB more, the quota is {} MiB \
         (an administrator can raise it: exclave-replicator quota set)",
        used >> 20, (needed >> 20).max(1), quota >> 20
    )]
    Quota { tenant: String, used: u64, needed: u64, quota: u64 },
    /// Deltas whose base garbage collection swept after the agent asked about it: not indexed;
    /// the agent runs again and, seeing the base gone, sends them whole.
    #[error(
        "{} delta chunk(s) were built on a base that garbage collection has since removed (the first: {}); \
         send them again whole",
        chunks.len(), chunks.first().map(|c| c.to_string()).unwrap_or_default()
    )]
    BaseGone { chunks: Vec<ChunkId> },
}

impl From<crate::catalog::CatalogError> for ReplicationError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        ReplicationError::Store(e.into())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
}

/// Envelope bytes asked of a peer in one fetch (the reply carries at most 8 MiB), and at most
/// this many chunks: tiny chunks must not cost a round trip each thirty-two.
const FETCH_BYTES: u64 = 4 << 20;
const FETCH_MAX_CHUNKS: usize = 4096;
/// Fetches of a backfill in flight at once.
const FETCH_PARALLEL: usize = 4;
/// Index entries examined per page of an anti-entropy pass.
const PAGE: usize = 2048;

/// What the last anti-entropy pass found.
#[derive(Debug, Clone, Default)]
pub struct Backfill {
    /// Indexed chunks this node still lacks after the last pass.
    pub missing: u64,
    /// Applied index when the last complete pass began (`None`: no pass completed yet).
    pub scanned_at: Option<u64>,
    pub fetched_total: u64,
    pub last_error: Option<String>,
}

/// Members a chunk should reach, other than this node.
pub fn others(node: &Node) -> Vec<u64> {
    let v = node.raft.view();
    v.voters.iter().chain(v.learners.iter()).copied().filter(|id| *id != node.raft.id).collect()
}

/// The voters other than this node: the members whose acknowledgement counts.
pub fn other_voters(node: &Node) -> Vec<u64> {
    node.raft.view().voters.iter().copied().filter(|id| *id != node.raft.id).collect()
}

/// How many voters must hold a chunk before it is acknowledged.
pub fn write_quorum(node: &Node) -> usize {
    let voters = node.raft.view().voters.len().max(1);
    node.write_quorum.unwrap_or(voters / 2 + 1).clamp(1, voters.max(1))
}

/// Stores an agent's chunks here and on a write quorum of voters, then in the cluster's index.
pub async fn store_on_quorum(node: &Arc<Node>, tenant: String, chunks: Vec<PutChunk>) -> Result<(), ReplicationError> {
    let bytes: usize = chunks.iter().map(|c| c.envelope.len()).sum();
    let _room = node.check_room(bytes)?;
    // The quota is checked against the applied index plus what this node has admitted and not
    // indexed yet; uploads arriving at other nodes at the same moment may pass it by a batch each.
    let (store, t) = (node.store.clone(), tenant.clone());
    let (used, quota) = blocking(move || {
        let view = store.catalog()?;
        Ok((catalog::usage(&view, &t)?, catalog::quota(&view, &t)?))
    })
    .await?;
    let _admitted = match quota {
        Some(q) => Some(node.tenant_in_flight.admit(&tenant, used, bytes as u64, q.max_bytes).map_err(|pending| {
            ReplicationError::Quota {
                tenant: tenant.clone(),
                used: used + pending,
                needed: bytes as u64,
                quota: q.max_bytes,
            }
        })?),
        None => None,
    };
    // A node cut off from the majority could store but never index: say why at once.
    node.require_leader().await?;
    let mut chunks = chunks;
    // A chunk the cluster swept after this node looked is stored again (see `crate::gc`); a
    // sweep is rare, so a second round almost never needs a third.
    for round in 1..=SWEPT_RETRIES {
        let refused = store_round(node, &tenant, chunks).await?;
        if refused.is_empty() {
            return Ok(());
        }
        info!(%tenant, chunks = refused.len(), round, "chunks swept by garbage collection meanwhile: storing them again");
        chunks = refused;
    }
    Err(ReplicationError::Quorum {
        held: 0,
        need: write_quorum(node),
        why: "garbage collection kept sweeping these chunks while they were stored; try again".into(),
    })
}

/// Rounds of storing chunks that a sweep deleted meanwhile.
const SWEPT_RETRIES: usize = 4;

/// One round: here and on a write quorum, then proposed for the index. Returns the chunks the
/// index refused because a sweep after `sweep_seq` deleted them.
async fn store_round(node: &Arc<Node>, tenant: &str, chunks: Vec<PutChunk>) -> Result<Vec<PutChunk>, ReplicationError> {
    // The sweeps this node has applied before it decides what it already holds.
    let store = node.store.clone();
    let sweep_seq = blocking(move || Ok(catalog::gc::state(&store.catalog()?)?.sweep_seq)).await?;
    let bytes: usize = chunks.iter().map(|c| c.envelope.len()).sum();
    let chunks = Arc::new(chunks);
    let (store, t, c) = (node.chunks.clone(), tenant.to_string(), chunks.clone());
    let need = write_quorum(node);
    // Written here and sent to the peers at once: the fsyncs overlap.
    let local = blocking(move || store.put_chunks(&t, &c));
    let remote = async {
        if need > 1 {
            node.peers.replicate(tenant, sweep_seq, chunks.clone(), &others(node), &other_voters(node), need - 1).await
        } else {
            (0, Vec::new())
        }
    };
    let (local, (ok, errors)) = tokio::join!(local, remote);
    let new = local?;
    node.metrics.stored(new, bytes);
    if ok + 1 < need {
        let why = if errors.is_empty() { "no answer".to_string() } else { errors.join("; ") };
        return Err(ReplicationError::Quorum { held: ok + 1, need, why });
    }
    crate::test_hooks::crash_point("chunks-stored");
    // Every chunk is proposed: the agent sends only what the index lacked when it asked, and
    // applying keeps the first entry of a chunk indexed twice.
    let entries: Vec<(ChunkId, IndexEntry)> = chunks
        .iter()
        .map(|p| (p.id, IndexEntry { envelope_len: p.envelope.len() as u32, checksum: p.checksum }))
        .collect();
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    // Before any sweep, the command older nodes know.
    let tenant = tenant.to_string();
    // The envelopes were checked on arrival (`check_envelopes`): their headers parse.
    let bases: Vec<(ChunkId, ChunkId)> = chunks
        .iter()
        .filter_map(|p| match exclave::envelope::parse_header(&p.envelope).map(|h| h.codec) {
            Ok(exclave::envelope::Codec::ZstdDelta(base)) => Some((p.id, base)),
            _ => None,
        })
        .collect();
    let cmd = if !bases.is_empty() {
        Command::IndexChunksV4 { tenant, chunks: entries, sweep_seq, bases }
    } else if sweep_seq == 0 {
        Command::IndexChunks { tenant, chunks: entries }
    } else {
        Command::IndexChunksV2 { tenant, chunks: entries, sweep_seq }
    };
    match node.raft.propose_idempotent(cmd).await? {
        catalog::Outcome::Indexed { base_gone, .. } if !base_gone.is_empty() => {
            Err(ReplicationError::BaseGone { chunks: base_gone })
        }
        catalog::Outcome::Indexed { refused, .. } => {
            let refused: std::collections::HashSet<ChunkId> = refused.into_iter().collect();
            Ok(chunks.iter().filter(|c| refused.contains(&c.id)).cloned().collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// Waits (a few seconds at most) until this node has applied `sweep_seq` sweeps: a node
/// behind could count a copy that a sweep it has yet to apply deletes.
pub async fn caught_up_with_sweeps(node: &Arc<Node>, sweep_seq: u64) -> Result<(), ReplicationError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let store = node.store.clone();
        let have = blocking(move || Ok(catalog::gc::state(&store.catalog()?)?.sweep_seq)).await?;
        if have >= sweep_seq {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ReplicationError::Store(StoreError::Io(format!(
                "{} has applied {have} of the cluster's {sweep_seq} sweeps; it will backfill",
                node.name
            ))));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fetches from peers the indexed chunks among `ids` that this node does not hold yet (a
/// restore asking a node that has not backfilled them).
pub async fn read_through(node: &Arc<Node>, tenant: &str, ids: &[ChunkId]) {
    let (store, chunks, t, ids) = (node.store.clone(), node.chunks.clone(), tenant.to_string(), ids.to_vec());
    let want = blocking(move || {
        let lacking = chunks.missing(&t, &ids)?;
        let view = store.catalog()?;
        let mut want = Vec::new();
        for id in lacking {
            if let Some(e) = catalog::index_entry(&view, &t, &id)? {
                want.push((id, e));
            }
        }
        Ok(want)
    })
    .await
    .unwrap_or_default();
    if !want.is_empty()
        && let Err(e) = fetch_from_peers(node, tenant, &want).await
    {
        warn!(%tenant, error = %e, "read-through fetch stopped");
    }
}

/// Whether another pass can find anything: not when the last one found nothing missing and
/// nothing has been applied since it began (the index, and so what this node lacks, is the
/// same). Chunks damaged on this node's own disk are for scrubbing, not for this walk.
fn pass_needed(last: &Backfill, applied: u64) -> bool {
    !(last.missing == 0 && last.last_error.is_none() && last.scanned_at == Some(applied))
}

/// The wait before the next pass. A walk over a large index costs in proportion to it, so a
/// node that found nothing to fetch spends at most about a tenth of its time walking.
fn pause_after(missing: u64, fetched: u64, disk_full: bool, took: Duration) -> Duration {
    if disk_full {
        // Room is made by an operator, not by waiting: look again now and then.
        Duration::from_secs(10)
    } else if fetched > 0 && missing > 0 {
        Duration::from_millis(100)
    } else if fetched > 0 {
        // Catching up (a new or returning node): confirm soon, the index may have grown.
        Duration::from_secs(2)
    } else {
        (took * 10).clamp(Duration::from_secs(2), Duration::from_secs(300))
    }
}

/// Worker: runs anti-entropy passes until `stop` turns true (a pass under way stops at its
/// next page; what it stored is durable and indexed locally, nothing is half done).
pub async fn anti_entropy(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let started_at = node.raft.view().applied;
        let last = node.backfill.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !pass_needed(&last, started_at) {
            pause = Duration::from_secs(2);
            continue;
        }
        let t = Instant::now();
        let result = pass(&node, &stop).await;
        if *stop.borrow() {
            return;
        }
        pause = match result {
            Ok((missing, fetched, paused)) => {
                if let Some(why) = &paused {
                    warn!(missing, "{why}");
                }
                let mut b = node.backfill.lock().unwrap_or_else(|p| p.into_inner());
                b.missing = missing;
                b.scanned_at = Some(started_at);
                b.fetched_total += fetched;
                let full = paused.is_some();
                b.last_error = paused;
                node.metrics.backfill(missing, fetched);
                if fetched > 0 {
                    info!(fetched, missing, secs = t.elapsed().as_secs_f64(), "anti-entropy pass fetched chunks");
                }
                pause_after(missing, fetched, full, t.elapsed())
            }
            Err(e) => {
                warn!(error = %e, "anti-entropy pass failed");
                node.backfill.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(e.to_string());
                Duration::from_secs(5)
            }
        };
    }
}

/// One walk over the index: returns (still missing, fetched, why fetching stopped). Once
/// the disk is at its reserve the walk goes on counting what is missing, fetching nothing.
async fn pass(
    node: &Arc<Node>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(u64, u64, Option<String>), ReplicationError> {
    let mut cursor: Option<Vec<u8>> = None;
    let (mut missing, mut fetched) = (0u64, 0u64);
    let mut paused: Option<String> = None;
    loop {
        if *stop.borrow() {
            return Err(ReplicationError::Stopping);
        }
        let (store, chunks) = (node.store.clone(), node.chunks.clone());
        let from = cursor.clone();
        // Page of the index, reduced to what this node lacks, grouped by tenant.
        let (lacking, next) = blocking(move || {
            let view = store.catalog()?;
            let (page, next) = catalog::index_page(&view, from.as_deref(), PAGE)?;
            let mut by_tenant: BTreeMap<String, Vec<(ChunkId, IndexEntry)>> = BTreeMap::new();
            for (tenant, id, entry) in page {
                by_tenant.entry(tenant).or_default().push((id, entry));
            }
            let mut lacking = Vec::new();
            for (tenant, entries) in by_tenant {
                let ids: Vec<ChunkId> = entries.iter().map(|(id, _)| *id).collect();
                let gone: std::collections::HashSet<ChunkId> = chunks.missing(&tenant, &ids)?.into_iter().collect();
                let want: Vec<(ChunkId, IndexEntry)> =
                    entries.into_iter().filter(|(id, _)| gone.contains(id)).collect();
                if !want.is_empty() {
                    lacking.push((tenant, want));
                }
            }
            Ok((lacking, next))
        })
        .await?;
        // Several fetches in flight: one at a time, a backfill waits on a round trip and a
        // synced write per batch (over a WAN, far below what the link carries).
        let stop = AtomicBool::new(paused.is_some());
        for (tenant, want) in lacking {
            let groups = fetch_groups(want);
            let mut results = futures::stream::iter(groups)
                .map(|group| {
                    let (stop, tenant) = (&stop, &tenant);
                    async move {
                        if stop.load(Ordering::Relaxed) {
                            return (group.len(), Err(None));
                        }
                        (group.len(), fetch_from_peers(node, tenant, &group).await.map_err(Some))
                    }
                })
                .buffer_unordered(FETCH_PARALLEL);
            while let Some((n, r)) = results.next().await {
                match r {
                    Ok(got) => {
                        fetched += got as u64;
                        missing += (n - got) as u64;
                    }
                    Err(why) => {
                        missing += n as u64;
                        if let Some(why) = why {
                            stop.store(true, Ordering::Relaxed);
                            paused.get_or_insert(why.to_string());
                        }
                    }
                }
            }
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    Ok((missing, fetched, paused))
}

/// Splits what a node lacks into fetches of about `FETCH_BYTES`.
fn fetch_groups(want: Vec<(ChunkId, IndexEntry)>) -> Vec<Vec<(ChunkId, IndexEntry)>> {
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut bytes = 0u64;
    for (id, e) in want {
        if !group.is_empty() && (bytes + u64::from(e.envelope_len) > FETCH_BYTES || group.len() >= FETCH_MAX_CHUNKS) {
            groups.push(std::mem::take(&mut group));
            bytes = 0;
        }
        bytes += u64::from(e.envelope_len);
        group.push((id, e));
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

/// Fetches `want` from whichever peers have them, verifies each against its index entry and
/// stores it. Returns how many were stored, or why it stopped: the disk reaching the node's
/// reserve stops a backfill (it resumes once room is made) rather than filling the disk
/// until RocksDB fails and takes the Raft log with it.
pub async fn fetch_from_peers(
    node: &Arc<Node>,
    tenant: &str,
    want: &[(ChunkId, IndexEntry)],
) -> Result<usize, ReplicationError> {
    let mut left: Vec<(ChunkId, IndexEntry)> = want.to_vec();
    let mut stored = 0;
    let mut peers = others(node);
    // Spread the load: start with a different peer for each batch.
    if !peers.is_empty() {
        let k = (want.first().map(|(id, _)| id.0[0] as usize).unwrap_or(0)) % peers.len();
        peers.rotate_left(k);
    }
    for peer in peers {
        if left.is_empty() {
            break;
        }
        let ids: Vec<ChunkId> = left.iter().map(|(id, _)| *id).collect();
        let envelopes = match node.peers.fetch(peer, tenant, &ids).await {
            Ok(e) => e,
            Err(e) => {
                debug!(peer = %node.peers.name_of(peer), error = %e, "fetch failed");
                continue;
            }
        };
        let mut good = Vec::new();
        let mut still = Vec::new();
        for ((id, entry), env) in left.into_iter().zip(envelopes) {
            match env {
                Some(envelope) if exclave::Checksum::of(&envelope) == entry.checksum => {
                    good.push(PutChunk { id, checksum: entry.checksum, envelope: envelope.into() })
                }
                Some(_) => {
                    warn!(peer = %node.peers.name_of(peer), chunk = %id, "peer served a chunk that fails its checksum");
                    still.push((id, entry));
                }
                None => still.push((id, entry)),
            }
        }
        left = still;
        if !good.is_empty() {
            let bytes: usize = good.iter().map(|c| c.envelope.len()).sum();
            let _room = node.check_room(bytes).map_err(ReplicationError::Paused)?;
            let (store, tenant) = (node.chunks.clone(), tenant.to_string());
            let n = good.len();
            match tokio::task::spawn_blocking(move || store.put_chunks(&tenant, &good)).await {
                Ok(Ok(_)) => stored += n,
                Ok(Err(e)) => warn!(error = %e, "storing fetched chunks failed"),
                Err(e) => warn!(error = %e, "store task failed"),
            }
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_skipped_only_when_the_last_was_clean_and_nothing_was_applied_since() {
        let clean = Backfill { missing: 0, scanned_at: Some(40), fetched_total: 9, last_error: None };
        assert!(!pass_needed(&clean, 40));
        assert!(pass_needed(&clean, 41), "new entries may name chunks this node lacks");
        assert!(pass_needed(&Backfill { missing: 3, ..clean.clone() }, 40));
        assert!(pass_needed(&Backfill { last_error: Some("peer down".into()), ..clean.clone() }, 40));
        assert!(pass_needed(&Backfill::default(), 0), "no pass has completed yet");
    }

    #[test]
    fn fetches_are_grouped_by_bytes() {
        let e = |len: u32| IndexEntry { envelope_len: len, checksum: exclave::Checksum([0; 32]) };
        let big: Vec<_> = (0..100u8).map(|i| (ChunkId([i; 32]), e(1 << 20))).collect();
        let g = fetch_groups(big);
        assert_eq!(g.len(), 25);
        assert!(g.iter().all(|g| g.len() == 4));
        let tiny: Vec<_> = (0..10_000u32).map(|i| (ChunkId([(i % 251) as u8; 32]), e(50))).collect();
        let g = fetch_groups(tiny);
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), vec![4096, 4096, 1808]);
        let odd = vec![(ChunkId([1; 32]), e(16 << 20))];
        assert_eq!(fetch_groups(odd).len(), 1, "a chunk larger than a fetch still goes");
    }

    #[test]
    fn the_pause_grows_with_the_cost_of_a_walk() {
        let s = Duration::from_secs;
        assert_eq!(pause_after(0, 0, false, Duration::from_millis(30)), s(2));
        assert_eq!(pause_after(0, 0, false, s(5)), s(50));
        assert_eq!(pause_after(0, 0, false, s(100)), s(300));
        assert_eq!(pause_after(5, 10, false, s(5)), Duration::from_millis(100), "still fetching: go on");
        assert_eq!(pause_after(0, 10, false, s(5)), s(2), "caught up by fetching: confirm soon");
        assert_eq!(pause_after(5, 0, true, s(5)), s(10));
    }
}
