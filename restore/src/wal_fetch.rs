//! `exclave-restore wal-fetch`: PostgreSQL's `restore_command`, one archived WAL file per
//! call, with a prefetch spool so that recovery does not pay a process start, a connection
//! and a round trip to an embassy for every 16 MiB segment.
//!
//! With `--prefetch N --spool DIR` (what `pitr` writes), a call that has to go to the
//! cluster fetches the segment asked for and the next N-1 segments of its timeline the
//! archive holds, over the same connection and in parallel, and leaves them in the spool;
//! the calls that follow are served from the spool without touching the network.
//!
//! Spool rules:
//! - a file enters the spool only once fetched and verified like any restored file (every
//!   chunk authenticated, the file's BLAKE3 against the manifest), as `NAME` with its BLAKE3
//!   beside it in `NAME.b3`, both written under temporary names and renamed;
//! - a spooled file is served only if its BLAKE3 still matches `NAME.b3`; one damaged on disk
//!   is dropped and fetched again from the cluster;
//! - a served file leaves the spool (moved to PostgreSQL's path), and segments before the one
//!   asked for are dropped: PostgreSQL asks in order, so the spool holds at most N files;
//! - `pitr` removes the spool at the end of recovery (`recovery_end_command`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use exclave::keys::TenantKeys;
use exclave::protocol::SnapshotInfo;

use crate::engine::restore_into;
use crate::nodes::Nodes;
use crate::writer;

/// The `n` segment names after `name` on its timeline, for segments of `seg_size` bytes.
/// Empty for a name that is not a segment (history, backup label, partial) or a size that is
/// not a valid WAL segment size (a power of two from 1 MiB to 1 GiB).
pub fn next_segments(name: &str, seg_size: u64, n: usize) -> Vec<String> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Vec::new();
    }
    if !seg_size.is_power_of_two() || !((1 << 20)..=(1 << 30)).contains(&seg_size) {
        return Vec::new();
    }
    let per_log = (1u64 << 32) / seg_size;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let (Some(tli), Some(log), Some(seg)) = (hex(&name[..8]), hex(&name[8..16]), hex(&name[16..])) else {
        return Vec::new();
    };
    let mut at = log * per_log + seg;
    (0..n)
        .map(|_| {
            at += 1;
            format!("{tli:08X}{:08X}{:08X}", at / per_log, at % per_log)
        })
        .collect()
}

fn blake3_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Serves `file` from the spool if it is there and intact; drops it when damaged.
fn from_spool(spool: &Path, file: &str, dest: &Path) -> Result<bool> {
    let (data, sum) = (spool.join(file), spool.join(format!("{file}.b3")));
    let Ok(expected) = std::fs::read_to_string(&sum) else { return Ok(false) };
    if !data.is_file() {
        return Ok(false);
    }
    if blake3_file(&data)? == expected.trim() {
        // A spool on another file system than PostgreSQL's cannot rename into it: copy.
        if std::fs::rename(&data, dest).is_err() {
            std::fs::copy(&data, dest).with_context(|| format!("copying {file} to {}", dest.display()))?;
            let _ = std::fs::remove_file(&data);
        }
        let _ = std::fs::remove_file(&sum);
        return Ok(true);
    }
    eprintln!("warning: {file} in the prefetch spool {} is damaged; fetching it again", spool.display());
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&sum);
    Ok(false)
}

/// Drops spooled segments of `file`'s timeline that come before it: already replayed.
fn drop_older(spool: &Path, file: &str) {
    let Ok(rd) = std::fs::read_dir(spool) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let base = name.trim_end_matches(".b3");
        if base.len() == 24 && base[..8] == file[..8.min(file.len())] && base < file {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Fetches the WAL file of `snap` named `name`, verified, into `dir` under a temporary name
/// (returned) for the caller to rename into place.
pub async fn fetch_to(
    nodes: &Arc<Nodes>,
    keys: &TenantKeys,
    snap: &SnapshotInfo,
    name: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let staging = tempfile::Builder::new()
        .prefix(".exclave-wal-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a staging directory in {}", dir.display()))?;
    let w = writer::Writer::new(Some(staging.path().to_path_buf()), false).not_durable();
    let (_, report) = restore_into(nodes, keys, snap, w, 4).await?;
    if let Some(f) = report.failures.first() {
        bail!("WAL file {name} failed verification: {}", f.error);
    }
    let fetched = std::fs::read_dir(staging.path())?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(name))
        .with_context(|| format!("the archived snapshot {} does not hold {name}", snap.id))?;
    // Out of the staging directory before it is removed; the caller renames it into place.
    let keep = dir.join(format!(".{name}.{}.part", std::process::id()));
    std::fs::rename(fetched.path(), &keep)?;
    Ok(keep)
}

/// Prefetches `name` into the spool (a no-op when it is there or not archived).
async fn prefetch_one(
    nodes: Arc<Nodes>,
    keys: TenantKeys,
    wal_source: String,
    name: String,
    spool: PathBuf,
) -> Result<()> {
    if spool.join(format!("{name}.b3")).exists() {
        return Ok(());
    }
    let id = exclave::wal::snapshot_id(&wal_source, &name)?;
    let (found, _) = nodes.primary().find_snapshot(&id).await?;
    let Some(snap) = found.filter(|s| s.source == wal_source) else { return Ok(()) };
    let part = fetch_to(&nodes, &keys, &snap, &name, &spool).await?;
    let sum = blake3_file(&part)?;
    let sum_tmp = spool.join(format!(".{name}.b3.{}", std::process::id()));
    std::fs::write(&sum_tmp, &sum)?;
    // The data first, then its checksum: a spooled file without `.b3` is never served.
    std::fs::rename(&part, spool.join(&name))?;
    std::fs::rename(&sum_tmp, spool.join(format!("{name}.b3")))?;
    Ok(())
}

/// What the command was asked.
pub struct Ask<'a> {
    pub source: &'a str,
    pub file: &'a str,
    pub dest: &'a Path,
    pub prefetch: usize,
    pub spool: Option<&'a Path>,
    pub consistent: bool,
}

/// Serves `ask.file`: from the spool, else from the cluster (then prefetching what follows).
/// `connect` is only called when the spool cannot serve. Exit code 0 delivered, 1 not archived.
pub async fn run<F, Fut>(ask: Ask<'_>, connect: F) -> Result<i32>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(Arc<Nodes>, TenantKeys)>>,
{
    let wal_source = exclave::wal::catalog_source(ask.source)?;
    exclave::wal::check_file_name(ask.file)?;
    if let Some(spool) = ask.spool {
        std::fs::create_dir_all(spool).with_context(|| format!("creating the prefetch spool {}", spool.display()))?;
        drop_older(spool, ask.file);
        match from_spool(spool, ask.file, ask.dest) {
            Ok(true) => {
                eprintln!("{} restored from the prefetch spool", ask.file);
                return Ok(0);
            }
            Ok(false) => {}
            // The spool is only a shortcut: the cluster still has the file.
            Err(e) => {
                eprintln!("warning: the prefetch spool {} failed: {e:#}; fetching from the cluster", spool.display())
            }
        }
    }
    let (nodes, keys) = connect().await?;
    if ask.consistent {
        nodes
            .primary()
            .read_barrier()
            .await
            .context("--consistent: the node could not confirm its catalog is current")?;
    }
    // One lookup by name, not a listing: recovery asks for thousands of files.
    let id = exclave::wal::snapshot_id(&wal_source, ask.file)?;
    let (found, stale) = nodes.primary().find_snapshot(&id).await?;
    if let Some(why) = stale {
        eprintln!("warning: {why}");
    }
    let found = match found.filter(|s| s.source == wal_source) {
        Some(snap) => Some((snap, ask.file.to_string())),
        // The end of the archive: the longest streamed version of a segment still being written.
        None if exclave::wal::is_segment(ask.file) => streamed(&nodes, &wal_source, ask.file).await?,
        None => None,
    };
    let Some((snap, stored)) = found else {
        // PostgreSQL asks for files past the end of the archive: not an error for it.
        eprintln!("{} is not in the WAL archive of {}", ask.file, ask.source);
        close(nodes).await;
        return Ok(1);
    };
    if stored != ask.file {
        eprintln!("{} restored from {stored}, streamed while the segment was being written", ask.file);
    }
    let parent = match ask.dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let ahead: Vec<String> = match ask.spool {
        Some(_) if ask.prefetch > 1 && stored == ask.file => {
            next_segments(ask.file, snap.logical_bytes, ask.prefetch - 1)
        }
        _ => Vec::new(),
    };
    let wanted = async {
        let part = fetch_to(&nodes, &keys, &snap, &stored, &parent).await?;
        std::fs::rename(&part, ask.dest).with_context(|| format!("moving {} to {}", ask.file, ask.dest.display()))
    };
    let prefetched = futures::future::join_all(ahead.iter().map(|name| {
        let spool = ask.spool.map(Path::to_path_buf).unwrap_or_default();
        prefetch_one(nodes.clone(), keys.clone(), wal_source.clone(), name.clone(), spool)
    }));
    let (wanted, prefetched) = futures::join!(wanted, prefetched);
    wanted?;
    for (name, r) in ahead.iter().zip(prefetched) {
        // A failed prefetch costs nothing but a fetch later.
        if let Err(e) = r {
            eprintln!("warning: prefetching {name} failed: {e:#}");
        }
    }
    close(nodes).await;
    Ok(0)
}

/// The longest streamed version of `segment` the archive holds, and its name.
async fn streamed(nodes: &Arc<Nodes>, wal_source: &str, segment: &str) -> Result<Option<(SnapshotInfo, String)>> {
    let (list, _) = nodes.primary().list_snapshots(Some(wal_source)).await?;
    let best = list
        .into_iter()
        .filter_map(|s| {
            let name = exclave::wal::file_name(&s.id)?.to_string();
            let (seg, len) = exclave::wal::parse_streamed(&name)?;
            seg.eq_ignore_ascii_case(segment).then_some((len, s, name))
        })
        .max_by_key(|(len, _, _)| *len);
    Ok(best.map(|(_, s, name)| (s, name)))
}

async fn close(nodes: Arc<Nodes>) {
    if let Ok(n) = Arc::try_unwrap(nodes) {
        n.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_segments_cross_log_boundaries_by_segment_size() {
        assert_eq!(
            next_segments("0000000100000000000000FE", 16 << 20, 3),
            ["0000000100000000000000FF", "000000010000000100000000", "000000010000000100000001"]
        );
        // 64 MiB segments: 64 per log file.
        assert_eq!(next_segments("00000002000000030000003F", 64 << 20, 1), ["000000020000000400000000"]);
        assert!(next_segments("00000002.history", 16 << 20, 3).is_empty());
        assert!(next_segments("000000010000000000000001.partial", 16 << 20, 3).is_empty());
        assert!(next_segments("000000010000000000000001", 1000, 3).is_empty(), "not a segment size");
    }

    #[test]
    fn a_spooled_file_is_served_once_and_a_damaged_one_never() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let name = "000000010000000000000005";
        std::fs::write(spool.join(name), b"wal bytes").unwrap();
        std::fs::write(spool.join(format!("{name}.b3")), blake3::hash(b"wal bytes").to_hex().as_bytes()).unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        assert!(from_spool(&spool, name, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"wal bytes");
        assert!(!from_spool(&spool, name, &dest).unwrap(), "served once, then gone");

        std::fs::write(spool.join(name), b"wal bytez").unwrap();
        std::fs::write(spool.join(format!("{name}.b3")), blake3::hash(b"wal bytes").to_hex().as_bytes()).unwrap();
        assert!(!from_spool(&spool, name, &d.path().join("other")).unwrap());
        assert!(!spool.join(name).exists(), "a damaged file is dropped");

        std::fs::write(spool.join("000000010000000000000003"), b"old").unwrap();
        std::fs::write(spool.join("000000010000000000000009"), b"ahead").unwrap();
        drop_older(&spool, name);
        assert!(!spool.join("000000010000000000000003").exists());
        assert!(spool.join("000000010000000000000009").exists());
    }
}
