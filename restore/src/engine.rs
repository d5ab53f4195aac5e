//! The restore engine: what restore, verify, pitr, wal-fetch and drill share. It fetches a
//! snapshot's manifest and chunks from a node, opens and checks every chunk, and hands files
//! to a writer (which writes them, or only checks them); `main.rs` only parses and prints.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use exclave::keys::TenantKeys;
use exclave::protocol::SnapshotInfo;
use futures::StreamExt;

use crate::{fetch, writer};

/// RFC 3339 in UTC; a time an agent claimed outside years 0 to 9999 stays a number.
pub fn format_time(t: i64) -> String {
    const YEAR_10000: i64 = 253_402_300_800;
    if (0..YEAR_10000).contains(&t) {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t as u64)).to_string()
    } else {
        format!("@{t}")
    }
}

pub fn select(list: &[SnapshotInfo], source: &str, which: &str) -> Result<SnapshotInfo> {
    let of_source: Vec<&SnapshotInfo> = list.iter().filter(|s| s.source == source).collect();
    if of_source.is_empty() {
        bail!("no snapshot of source {source:?}");
    }
    if which == "latest" {
        // The last committed: the cluster's order, not the times agents claim.
        return of_source.iter().max_by_key(|s| s.commit_seq).map(|s| (*s).clone()).context("no snapshot");
    }
    let matches: Vec<&&SnapshotInfo> = of_source.iter().filter(|s| s.id.starts_with(which)).collect();
    match matches.as_slice() {
        [one] => Ok((**one).clone()),
        [] => bail!("no snapshot {which:?} of source {source:?}"),
        _ => bail!("snapshot id prefix {which:?} is ambiguous"),
    }
}

/// Asks the node for the chosen snapshot by id: the session's audit record then names what
/// was read, and a snapshot forgotten since the listing is caught before any chunk is fetched.
pub async fn name_snapshot(client: &exclave::client::NodeClient, snap: &SnapshotInfo) -> Result<()> {
    match client.find_snapshot(&snap.id).await? {
        (Some(_), _) => Ok(()),
        (None, _) => bail!("snapshot {} of {} was forgotten by the cluster since it was listed", snap.id, snap.source),
    }
}

pub fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "source": s.source, "time": s.time, "time_utc": format_time(s.time),
        "root": s.root.to_string(), "key_fingerprint": s.key_fingerprint, "agent": s.agent,
        "hostname": s.hostname, "files": s.files, "logical_bytes": s.logical_bytes,
        "chunks": s.chunks, "stored_bytes": s.stored_bytes, "commit_seq": s.commit_seq,
    })
}

pub fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Fetches a snapshot through `w` (which writes it, or only checks it).
pub async fn restore_into(
    client: &Arc<crate::nodes::Nodes>,
    keys: &TenantKeys,
    snap: &SnapshotInfo,
    w: writer::Writer,
    parallel: usize,
) -> Result<(exclave::manifest::ManifestHeader, writer::Report)> {
    restore_filtered(client, keys, snap, w, parallel, &[], false).await
}

/// A bar on stderr (drawn only on a terminal) of the plaintext fetched against the
/// snapshot's size, with rate and ETA.
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("[{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// As `restore_into`, only what `browse::included` keeps of `include` (all when empty).
pub async fn restore_filtered(
    client: &Arc<crate::nodes::Nodes>,
    keys: &TenantKeys,
    snap: &SnapshotInfo,
    mut w: writer::Writer,
    parallel: usize,
    include: &[Vec<u8>],
    progress: bool,
) -> Result<(exclave::manifest::ManifestHeader, writer::Report)> {
    if snap.key_fingerprint != keys.fingerprint {
        bail!(
            "wrong key: snapshot {} was sealed with key {}, the key file holds key {}",
            snap.id,
            snap.key_fingerprint,
            keys.fingerprint
        );
    }
    let root = fetch::manifest_root(client, keys, snap.root).await?;
    let header = root.header.clone();
    // Files are written and hashed on a thread of their own, so that disk writes never hold
    // up the runtime that drives the fetches; the channel bounds what waits in between.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<fetch::Item>(write_queue(header.chunker.max_size));
    let writer = std::thread::Builder::new().name("writer".into()).spawn(move || -> Result<writer::Report> {
        while let Some(item) = rx.blocking_recv() {
            w.item(item)?;
        }
        Ok(w.finish()?.clone())
    })?;
    let mut matched = 0usize;
    // With --include only part is fetched: the bar would never fill.
    let bar = (progress && include.is_empty()).then(|| progress_bar(snap.logical_bytes));
    let fetched: Result<()> = async {
        let mut pages = std::pin::pin!(fetch::pages(client.clone(), keys.clone(), root));
        while let Some(page) = pages.next().await {
            let mut page = page?;
            if !include.is_empty() {
                page.retain(|e| crate::browse::included(e, include));
                matched += page.iter().filter(|e| include.iter().any(|i| crate::browse::is_under(&e.path, i))).count();
            }
            let mut stream = std::pin::pin!(fetch::items(client.clone(), keys.clone(), page, parallel));
            while let Some(item) = stream.next().await {
                if let (Some(bar), fetch::Item::Data { data: Ok(d), .. }) = (&bar, &item) {
                    bar.inc(d.len() as u64);
                }
                if tx.send(item).await.is_err() {
                    // The writer stopped: its error is the one to report.
                    return Ok(());
                }
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let written = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    // A fetch that failed ended the stream early (the writer then saw a cut-off file): its
    // error is the cause.
    fetched?;
    if !include.is_empty() && matched == 0 {
        let paths: Vec<String> = include.iter().map(|i| String::from_utf8_lossy(i).into_owned()).collect();
        bail!("snapshot {} holds nothing under {}", snap.id, paths.join(", "));
    }
    Ok((header, written?))
}

/// Plaintext waiting for the writer, at most: items are chunks, each at most the source's
/// largest chunk size (recorded in its manifest), so the queue's length follows from it.
const WRITE_QUEUE_BYTES: usize = 16 << 20;

/// Items the writer's queue holds for chunks of at most `max_chunk` bytes: 64 for 256 KiB
/// chunks, 4 for 4 MiB ones, never fewer than 4 so that writes and fetches overlap.
fn write_queue(max_chunk: u32) -> usize {
    (WRITE_QUEUE_BYTES / (max_chunk.max(1) as usize)).clamp(4, 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_queue_holds_a_bounded_amount_of_plaintext() {
        assert_eq!(write_queue(256 << 10), 64);
        assert_eq!(write_queue(4 << 20), 4);
        assert_eq!(write_queue(16 << 20), 4, "at least a few items, or writes and fetches stop overlapping");
        assert_eq!(write_queue(16 << 10), 64);
        assert_eq!(write_queue(0), 64);
    }
}
