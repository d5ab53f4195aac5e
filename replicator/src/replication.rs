//! Chunks travel outside the Raft log: this module owns how they reach every embassy.
//!
//! - **Write quorum**: the node that receives an agent's chunks stores them, sends them to
//!   every other member, and acknowledges once `write_quorum` nodes (itself included) hold
//!   them durably; only then are they proposed for the index. So an indexed chunk is on a
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

use crate::catalog::{self, IndexEntry};
use crate::node::Node;

/// Chunks asked of a peer in one fetch (bounded by the reply's byte limit too).
const FETCH_BATCH: usize = 32;
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

/// How many nodes must hold a chunk before it is acknowledged.
pub fn write_quorum(node: &Node) -> usize {
    let voters = node.raft.view().voters.len().max(1);
    node.write_quorum.unwrap_or(voters / 2 + 1).clamp(1, voters.max(1))
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

/// Runs anti-entropy passes until the node stops.
pub async fn anti_entropy(node: Arc<Node>) {
    loop {
        let started_at = node.raft.view().applied;
        let last = node.backfill.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !pass_needed(&last, started_at) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let t = Instant::now();
        let pause = match pass(&node).await {
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
                node.backfill.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(e);
                Duration::from_secs(5)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// One walk over the index: returns (still missing, fetched, why fetching stopped). Once
/// the disk is at its reserve the walk goes on counting what is missing, fetching nothing.
async fn pass(node: &Arc<Node>) -> Result<(u64, u64, Option<String>), String> {
    let mut cursor: Option<Vec<u8>> = None;
    let (mut missing, mut fetched) = (0u64, 0u64);
    let mut paused: Option<String> = None;
    loop {
        let store = node.store.clone();
        let from = cursor.clone();
        // Page of the index, reduced to what this node lacks, grouped by tenant.
        let (lacking, next) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let view = store.catalog().map_err(|e| e.to_string())?;
            let (page, next) = catalog::index_page(&view, from.as_deref(), PAGE).map_err(|e| e.to_string())?;
            let mut by_tenant: BTreeMap<String, Vec<(ChunkId, IndexEntry)>> = BTreeMap::new();
            for (tenant, id, entry) in page {
                by_tenant.entry(tenant).or_default().push((id, entry));
            }
            let mut lacking = Vec::new();
            for (tenant, entries) in by_tenant {
                let ids: Vec<ChunkId> = entries.iter().map(|(id, _)| *id).collect();
                let gone: std::collections::HashSet<ChunkId> =
                    store.missing(&tenant, &ids).map_err(|e| e.to_string())?.into_iter().collect();
                let want: Vec<(ChunkId, IndexEntry)> =
                    entries.into_iter().filter(|(id, _)| gone.contains(id)).collect();
                if !want.is_empty() {
                    lacking.push((tenant, want));
                }
            }
            Ok((lacking, next))
        })
        .await
        .map_err(|e| e.to_string())??;
        // Several fetches in flight: one at a time, a backfill waits on a round trip and a
        // synced write per batch (over a WAN, far below what the link carries).
        let stop = AtomicBool::new(paused.is_some());
        for (tenant, want) in lacking {
            let groups: Vec<Vec<(ChunkId, IndexEntry)>> = want.chunks(FETCH_BATCH).map(<[_]>::to_vec).collect();
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
                            paused.get_or_insert(why);
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

/// Fetches `want` from whichever peers have them, verifies each against its index entry and
/// stores it. Returns how many were stored, or why it stopped: the disk reaching the node's
/// reserve stops a backfill (it resumes once room is made) rather than filling the disk
/// until RocksDB fails and takes the Raft log with it.
pub async fn fetch_from_peers(node: &Arc<Node>, tenant: &str, want: &[(ChunkId, IndexEntry)]) -> Result<usize, String> {
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
                    good.push(PutChunk { id, checksum: entry.checksum, envelope })
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
            node.check_room(bytes).map_err(|f| format!("backfill paused: {}", f.message()))?;
            let (store, tenant) = (node.store.clone(), tenant.to_string());
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
