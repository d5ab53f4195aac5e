//! Archived PostgreSQL WAL: reading the file `wal-push` is given. Naming is shared with the
//! restore side (`exclave::wal`); a second push of the same file is a no-op because the
//! cluster answers a commit of an existing id with the snapshot already there, and the
//! agent compares roots.

use std::path::Path;

use anyhow::{Context, Result};

/// Opens a WAL file (a segment is 16 MiB by default) to be read as it is cut: reading it
/// whole first cost a fresh `wal-push` ~10 ms of page faults before the first chunk.
pub fn open(path: &Path) -> Result<(String, std::fs::File)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string();
    exclave::wal::check_file_name(&name)?;
    let file = std::fs::File::open(path).with_context(|| format!("reading WAL file {}", path.display()))?;
    Ok((name, file))
}

/// Pushing ahead (`wal-push --ahead N --spool DIR`): while PostgreSQL's archiver asks for one
/// segment at a time, a call also pushes the next segments PostgreSQL has already marked
/// ready (`pg_wal/archive_status/NAME.ready`), in parallel, and leaves a marker for each one
/// the cluster has durably committed. When PostgreSQL then asks for it, the call only checks
/// that the file is still exactly what was committed (size and BLAKE3) and returns at once.
///
/// Rules: a marker (`DIR/NAME.done`: "SIZE BLAKE3") is written only after the commit was
/// acknowledged, so a segment is never reported archived before it is durable; a marker whose
/// file differs is ignored (the segment is pushed as usual, and a different file under an
/// archived name is refused as always); markers of segments before the one asked for are
/// dropped (PostgreSQL asks in order); a lost marker only costs a second, idempotent push.
pub mod ahead {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, Result};

    fn marker(spool: &Path, name: &str) -> PathBuf {
        spool.join(format!("{name}.done"))
    }

    /// "SIZE BLAKE3" of a file.
    pub fn fingerprint(path: &Path) -> Result<String> {
        let mut h = blake3::Hasher::new();
        let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let size = f.metadata()?.len();
        h.update_reader(f)?;
        Ok(format!("{size} {}", h.finalize().to_hex()))
    }

    /// Whether `path` (named `name`) was pushed ahead and is unchanged; the marker is used up.
    pub fn was_pushed(spool: &Path, name: &str, path: &Path) -> Result<bool> {
        let Ok(recorded) = std::fs::read_to_string(marker(spool, name)) else { return Ok(false) };
        let same = recorded.trim() == fingerprint(path)?;
        let _ = std::fs::remove_file(marker(spool, name));
        Ok(same)
    }

    /// Records that `name`, whose content had `fingerprint`, is durable in the cluster.
    pub fn record(spool: &Path, name: &str, fingerprint: &str) -> Result<()> {
        let tmp = spool.join(format!(".{name}.done.{}", std::process::id()));
        std::fs::write(&tmp, fingerprint)?;
        std::fs::rename(&tmp, marker(spool, name))?;
        Ok(())
    }

    /// Drops the markers of segments before `name` on its timeline.
    pub fn drop_older(spool: &Path, name: &str) {
        let Ok(rd) = std::fs::read_dir(spool) else { return };
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(seg) = f.strip_suffix(".done")
                && is_segment(seg)
                && is_segment(name)
                && seg[..8] == name[..8]
                && seg < name
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    use exclave::wal::is_segment;

    /// Up to `n` segments after `name` on its timeline that PostgreSQL has marked ready in
    /// `pg_wal` (the directory of `%p`), oldest first.
    pub fn ready_after(pg_wal: &Path, name: &str, n: usize) -> Vec<PathBuf> {
        if !is_segment(name) || n == 0 {
            return Vec::new();
        }
        let Ok(rd) = std::fs::read_dir(pg_wal.join("archive_status")) else { return Vec::new() };
        let mut ready: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready").map(String::from))
            .filter(|seg| is_segment(seg) && seg[..8] == name[..8] && seg.as_str() > name)
            .collect();
        ready.sort();
        ready.into_iter().take(n).map(|seg| pg_wal.join(seg)).filter(|p| p.is_file()).collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ready_segments_after_the_asked_one_are_pushed_ahead_and_markers_check_content() {
            let d = tempfile::tempdir().unwrap();
            let pg_wal = d.path().join("pg_wal");
            std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
            for (seg, state) in [
                ("000000010000000000000003", "ready"),
                ("000000010000000000000004", "ready"),
                ("000000010000000000000005", "done"),
                ("000000010000000000000006", "ready"),
                ("000000020000000000000007", "ready"),
                ("00000002.history", "ready"),
            ] {
                std::fs::write(pg_wal.join(seg), seg).unwrap();
                std::fs::write(pg_wal.join("archive_status").join(format!("{seg}.{state}")), "").unwrap();
            }
            let names = |v: Vec<PathBuf>| -> Vec<String> {
                v.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
            };
            let got = names(ready_after(&pg_wal, "000000010000000000000003", 3));
            assert_eq!(got, ["000000010000000000000004", "000000010000000000000006"]);
            assert!(ready_after(&pg_wal, "00000002.history", 3).is_empty());

            let spool = d.path().join("spool");
            std::fs::create_dir_all(&spool).unwrap();
            let seg4 = pg_wal.join("000000010000000000000004");
            record(&spool, "000000010000000000000004", &fingerprint(&seg4).unwrap()).unwrap();
            assert!(was_pushed(&spool, "000000010000000000000004", &seg4).unwrap());
            assert!(!was_pushed(&spool, "000000010000000000000004", &seg4).unwrap(), "a marker is used once");
            record(&spool, "000000010000000000000004", &fingerprint(&seg4).unwrap()).unwrap();
            std::fs::write(&seg4, "other content").unwrap();
            assert!(!was_pushed(&spool, "000000010000000000000004", &seg4).unwrap(), "changed content is pushed again");

            record(&spool, "000000010000000000000002", "1 x").unwrap();
            record(&spool, "000000010000000000000009", "1 x").unwrap();
            drop_older(&spool, "000000010000000000000004");
            assert!(!spool.join("000000010000000000000002.done").exists());
            assert!(spool.join("000000010000000000000009.done").exists());
        }
    }
}
