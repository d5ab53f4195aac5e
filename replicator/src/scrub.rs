//! Scrub and repair: every node re-reads the chunks it holds and checks each against its
//! storage checksum (no tenant key is needed), and replaces a damaged or unreadable one with a
//! good copy from a peer.
//!
//! - A pass walks this node's chunk index in key order, reading each envelope where its
//!   location says, at most `scrub_bytes_per_s`. Its cursor is kept in `store_meta`
//!   (`scrub_cursor`) after every page, so a pass interrupted by a stop or a crash resumes where
//!   it was; `scrub_last` holds when the last full pass ended. A full pass starts every
//!   `scrub_interval` (measured from the end of the last), and at once when asked
//!   (`exclave-replicator scrub`).
//! - A damaged chunk the cluster's index names is asked of every peer; a copy whose checksum
//!   matches the index is stored again (`Store::replace_chunk`: a new record, then the location).
//!   When no peer has one, the loss is recorded (`scrub_bad ‖ tenant ‖ 0 ‖ id` in `store_meta`),
//!   logged as an error with the snapshots that reference it, counted in
//!   `exclave_scrub_unrepairable`, and shown by `cluster status`; every later pass tries again.
//!   A damaged chunk the index does not name (left by a backup that never committed) is only
//!   counted: nothing needs it.
//! - A scrub never writes a byte of a good chunk and never deletes one: the worst it can do is
//!   to store a verified copy again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exclave::ChunkId;
use exclave::protocol::{Damage, PutChunk, ScrubReport, ScrubStatus};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::catalog;
use crate::node::Node;
use crate::store::StoreError;

const CURSOR: &[u8] = b"scrub_cursor";
const LAST: &[u8] = b"scrub_last";
const BAD: &[u8] = b"scrub_bad";
/// Chunks read per page (and per cursor update).
const PAGE: usize = 1024;

#[derive(Default)]
struct State {
    running: Option<ScrubReport>,
    last: Option<ScrubReport>,
    passes: u64,
}

/// The node's scrub: its settings, what it is doing, and the way to ask it for a pass.
pub struct Scrubber {
    bytes_per_s: u64,
    interval: Option<Duration>,
    asked: Notify,
    state: Mutex<State>,
    /// Complete passes, for callers waiting on one.
    done: watch::Sender<u64>,
}

impl Scrubber {
    pub fn new(bytes_per_s: u64, interval: Option<Duration>) -> Scrubber {
        Scrubber {
            bytes_per_s: bytes_per_s.max(1),
            interval,
            asked: Notify::new(),
            state: Mutex::new(State::default()),
            done: watch::channel(0).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a pass now (or, when one is under way, the next one as soon as it ends), and
    /// returns the number the pass will have completed as.
    pub fn request(&self) -> u64 {
        let st = self.state();
        let target = st.passes + if st.running.is_some() { 2 } else { 1 };
        drop(st);
        self.asked.notify_one();
        target
    }

    /// Waits until `passes` passes have completed.
    pub async fn wait_for(&self, passes: u64) {
        let mut rx = self.done.subscribe();
        while *rx.borrow_and_update() < passes {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn status(&self, node: &Node) -> ScrubStatus {
        let st = self.state();
        ScrubStatus {
            node: node.name.clone(),
            running: st.running.clone(),
            last: st.last.clone(),
            passes: st.passes,
            unrepairable: unrepairable(node).unwrap_or_default(),
        }
    }
}

fn now_secs() -> i64 {
    exclave::pki::now_secs()
}

fn bad_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = BAD.to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

/// The chunks recorded as unrepairable.
pub fn unrepairable(node: &Node) -> Result<Vec<Damage>, StoreError> {
    node.store
        .meta_scan(BAD)?
        .into_iter()
        .map(|(_, v)| postcard::from_bytes::<Damage>(&v).map_err(|e| StoreError::Decode(e.to_string())))
        .collect()
}

/// How long to wait before the next pass: at once when one was interrupted, else the rest of
/// the interval since the last full pass ended (`None`: only when asked).
fn next_pass_in(interrupted: bool, last_end: Option<i64>, interval: Option<Duration>, now: i64) -> Option<Duration> {
    if interrupted {
        return Some(Duration::ZERO);
    }
    let interval = interval?;
    let due = last_end.map_or(now, |t| t + interval.as_secs() as i64);
    Some(Duration::from_secs(due.saturating_sub(now).max(0) as u64))
}

/// Worker: runs scrub passes on schedule and on demand until `stop` turns true.
pub async fn worker(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let sc = node.scrub.clone();
    loop {
        let cursor = node.store.meta_get(CURSOR).ok().flatten();
        let last_end = node.store.meta_get(LAST).ok().flatten().and_then(|v| v.try_into().ok()).map(i64::from_be_bytes);
        if let Some(t) = last_end {
            node.metrics.scrub_last_pass(t);
        }
        let wait = next_pass_in(cursor.is_some(), last_end, sc.interval, now_secs());
        let sleep = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = sc.asked.notified() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        match pass(&node, cursor, &stop).await {
            Ok(Some(report)) => {
                info!(
                    chunks = report.chunks,
                    bytes = report.bytes,
                    corrupt = report.corrupt,
                    repaired = report.repaired,
                    "scrub pass complete"
                );
                let mut st = sc.state();
                st.running = None;
                st.last = Some(report);
                st.passes += 1;
                let passes = st.passes;
                drop(st);
                sc.done.send_replace(passes);
            }
            Ok(None) => return, // stopping: the cursor says where to resume
            Err(e) => {
                warn!(error = %e, "scrub pass failed; trying again in a minute");
                sc.state().running = None;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// One pass from `cursor` (a resumed pass) or from the start; `None` when the node stops.
async fn pass(
    node: &Arc<Node>,
    mut cursor: Option<Vec<u8>>,
    stop: &watch::Receiver<bool>,
) -> Result<Option<ScrubReport>, StoreError> {
    let sc = node.scrub.clone();
    let report = ScrubReport { started: now_secs(), ..Default::default() };
    sc.state().running = Some(report.clone());
    if cursor.is_some() {
        info!("scrub pass resumed where it was interrupted");
    }
    let started = Instant::now();
    let mut bytes_this_run = 0u64;
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        let (store, from) = (node.store.clone(), cursor.clone());
        // Read and check a page of chunks on the blocking pool.
        type Checked = (Vec<(String, ChunkId, StoreError)>, u64, u64, Option<Vec<u8>>);
        let (damaged, chunks, bytes, last): Checked = tokio::task::spawn_blocking(move || {
            let page = store.locations_page(from.as_deref(), PAGE)?;
            let mut buf = Vec::new();
            let (mut damaged, mut bytes) = (Vec::new(), 0u64);
            for (_, tenant, id, loc) in &page {
                match store.check_current(tenant, id, loc, &mut buf) {
                    Ok(n) => bytes += n as u64,
                    Err(e) => damaged.push((tenant.clone(), *id, e)),
                }
            }
            let last = page.last().map(|(k, ..)| k.clone());
            Ok::<_, StoreError>((damaged, page.len() as u64, bytes, last))
        })
        .await
        .map_err(|e| StoreError::Io(format!("scrub task: {e}")))??;
        let (mut corrupt, mut repaired) = (0u64, 0u64);
        for (tenant, id, why) in damaged {
            corrupt += 1;
            node.metrics.scrub_corrupt();
            if repair(node, &tenant, &id, &why.to_string()).await {
                repaired += 1;
            }
        }
        node.metrics.scrub_checked(bytes);
        {
            let mut st = sc.state();
            if let Some(r) = st.running.as_mut() {
                r.chunks += chunks;
                r.bytes += bytes;
                r.corrupt += corrupt;
                r.repaired += repaired;
            }
        }
        let Some(last) = last else { break };
        node.store.meta_put(CURSOR, &last)?;
        crate::test_hooks::crash_point("scrub-page");
        cursor = Some(last);
        // Rate limit: no faster than `bytes_per_s` on average since this run of the pass began.
        bytes_this_run += bytes;
        let due = Duration::from_secs_f64(bytes_this_run as f64 / sc.bytes_per_s as f64);
        if let Some(rest) = due.checked_sub(started.elapsed()) {
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(rest) => {}
                _ = stop.changed() => {}
            }
        }
    }
    let end = now_secs();
    node.store.meta_put(LAST, &end.to_be_bytes())?;
    node.store.meta_delete(CURSOR)?;
    node.metrics.scrub_last_pass(end);
    node.metrics.scrub_unrepairable(unrepairable(node)?.len());
    let mut report = sc.state().running.clone().unwrap_or_default();
    report.finished = Some(end);
    Ok(Some(report))
}

/// Replaces a damaged chunk with a verified copy from a peer; records it as unrepairable when
/// no peer has one. Returns whether it was repaired.
async fn repair(node: &Arc<Node>, tenant: &str, id: &ChunkId, why: &str) -> bool {
    let (store, t, i) = (node.store.clone(), tenant.to_string(), *id);
    let entry =
        tokio::task::spawn_blocking(move || Ok::<_, StoreError>(catalog::index_entry(&store.catalog()?, &t, &i)?))
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten();
    let Some(entry) = entry else {
        warn!(%tenant, chunk = %id, why, "a damaged chunk no snapshot can reference (never indexed): left for collection");
        return false;
    };
    for peer in crate::replication::others(node) {
        match node.peers.fetch(peer, tenant, &[*id]).await {
            Ok(mut got) => {
                let Some(Some(envelope)) = got.pop() else { continue };
                if exclave::Checksum::of(&envelope) != entry.checksum {
                    warn!(peer = %node.peers.name_of(peer), chunk = %id, "a peer's copy fails its checksum too");
                    continue;
                }
                let chunk = PutChunk { id: *id, checksum: entry.checksum, envelope: envelope.into() };
                let (store, t) = (node.store.clone(), tenant.to_string());
                match tokio::task::spawn_blocking(move || store.replace_chunk(&t, &chunk)).await {
                    Ok(Ok(())) => {
                        info!(%tenant, chunk = %id, peer = %node.peers.name_of(peer), why, "damaged chunk repaired from a peer");
                        node.metrics.scrub_repaired();
                        let _ = node.store.meta_delete(&bad_key(tenant, id));
                        return true;
                    }
                    Ok(Err(e)) => warn!(%tenant, chunk = %id, error = %e, "storing the repaired chunk failed"),
                    Err(e) => warn!(%tenant, chunk = %id, error = %e, "store task failed"),
                }
            }
            Err(e) => warn!(peer = %node.peers.name_of(peer), chunk = %id, error = %e, "no copy from this peer"),
        }
    }
    let (store, t, i) = (node.store.clone(), tenant.to_string(), *id);
    let snapshots = tokio::task::spawn_blocking(move || {
        Ok::<_, StoreError>(catalog::snapshots_referencing(&store.catalog()?, &t, &i)?)
    })
    .await
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or_default();
    error!(%tenant, chunk = %id, ?snapshots, why,
           "UNREPAIRABLE: a chunk damaged here that no peer holds a good copy of; these snapshots cannot be restored whole");
    let damage = Damage { tenant: tenant.to_string(), chunk: id.to_string(), snapshots, why: why.to_string() };
    if let Ok(v) = postcard::to_allocvec(&damage) {
        let _ = node.store.meta_put(&bad_key(tenant, id), &v);
    }
    node.metrics.scrub_unrepairable(unrepairable(node).map(|v| v.len()).unwrap_or(0));
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_scheduled_from_the_end_of_the_last() {
        let day = Duration::from_secs(86400);
        assert_eq!(next_pass_in(true, Some(100), Some(day), 200), Some(Duration::ZERO), "an interrupted pass resumes");
        assert_eq!(next_pass_in(false, None, Some(day), 200), Some(Duration::ZERO), "never scrubbed: now");
        assert_eq!(next_pass_in(false, Some(100), Some(day), 200), Some(Duration::from_secs(86400 - 100)));
        assert_eq!(next_pass_in(false, Some(0), Some(day), 10 * 86400), Some(Duration::ZERO), "overdue: now");
        assert_eq!(next_pass_in(false, Some(100), None, 200), None, "on demand only");
    }
}
