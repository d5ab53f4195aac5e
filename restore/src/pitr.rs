//! Point-in-time restore of PostgreSQL: a base backup laid out as a data directory that
//! replays archived WAL (fetched by `wal-fetch`) up to a target time.
//!
//! Base backups are snapshots of the `postgres` source (`method = "base"`, one top-level
//! `pgdata/`); WAL files are snapshots of `SOURCE.wal`, one per file, named as
//! `exclave::wal` says. The choice of base backup and
//! the recovery settings are pure functions, tested here; fetching is done by the caller.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use exclave::protocol::SnapshotInfo;

/// Parses `latest` (None: replay everything archived) or `2026-11-23 10:15:00` /
/// `2026-11-23T10:15:00.5Z` (UTC).
pub fn parse_target(text: &str) -> Result<Option<SystemTime>> {
    if text.trim() == "latest" { Ok(None) } else { parse_target_time(text).map(Some) }
}

/// Parses `2026-11-23 10:15:00` / `2026-11-23T10:15:00.5Z` (UTC) into Unix time.
pub fn parse_target_time(text: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim().trim_end_matches('Z').trim_end_matches("+00:00"))
        .with_context(|| format!("--target-time {text:?}: expected YYYY-MM-DD HH:MM:SS[.frac] in UTC"))
}

pub fn pg_time(t: SystemTime) -> String {
    // `YYYY-MM-DD HH:MM:SS.ffffff+00`: recovery_target_time refuses the RFC 3339 `T`/`Z` form.
    let iso = humantime::format_rfc3339_micros(t).to_string();
    format!("{}+00", iso.replacen('T', " ", 1).trim_end_matches('Z'))
}

/// The newest base backup started before `target` (the newest of all without a target),
/// or the one named by `base`.
pub fn select_base<'a>(
    list: &'a [SnapshotInfo],
    target: Option<SystemTime>,
    base: Option<&str>,
) -> Result<&'a SnapshotInfo> {
    if let Some(prefix) = base {
        let m: Vec<&SnapshotInfo> = list.iter().filter(|s| s.id.starts_with(prefix)).collect();
        return match m.as_slice() {
            [one] => Ok(one),
            [] => bail!("no base backup {prefix:?}"),
            _ => bail!("base backup id prefix {prefix:?} is ambiguous"),
        };
    }
    let t = target.map(|t| t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64);
    list.iter().filter(|s| t.is_none_or(|t| s.time < t)).max_by_key(|s| (s.time, s.commit_seq)).with_context(|| {
        match list.iter().map(|s| s.time).min() {
            Some(first) => format!(
                "no base backup was started before the target time; the first started at {}",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(first.max(0) as u64))
            ),
            None => "the source has no base backup (a `postgres` source with method = \"base\")".to_string(),
        }
    })
}

/// A word quoted for /bin/sh (PostgreSQL runs restore_command through the shell).
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Lines appended to postgresql.auto.conf: fetch WAL with `fetch_argv` (+ `%f "%p"`), stop
/// at `target` and promote (without a target PostgreSQL replays all it can fetch, then
/// promotes).
pub fn recovery_settings(fetch_argv: &[String], target: Option<SystemTime>) -> String {
    let mut cmd: Vec<String> = fetch_argv.iter().map(|a| sh_quote(a)).collect();
    cmd.push("%f".into());
    cmd.push("\"%p\"".into());
    // Configuration strings are single-quoted, with '' for a quote.
    let conf_quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut out = format!(
        "\n# Point-in-time restore by exclave-restore pitr\nrestore_command = {}\n",
        conf_quote(&cmd.join(" "))
    );
    if let Some(t) = target {
        out.push_str(&format!(
            "recovery_target_time = {}\nrecovery_target_inclusive = off\nrecovery_target_action = 'promote'\n",
            conf_quote(&pg_time(t))
        ));
    }
    out
}

/// A `recovery_end_command` line that removes `dir` when recovery ends.
pub fn remove_at_end(dir: &Path) -> String {
    let cmd = format!("rm -rf {}", sh_quote(&dir.display().to_string()));
    format!("recovery_end_command = '{}'\n", cmd.replace('\'', "''"))
}

/// Makes a restored base backup start as a recovering server.
pub fn prepare_data_dir(dir: &Path, settings: &str) -> Result<()> {
    if !dir.join("PG_VERSION").is_file() {
        bail!("{} does not hold a PostgreSQL data directory (no PG_VERSION)", dir.display());
    }
    for stale in ["postmaster.pid", "postmaster.opts"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    std::fs::create_dir_all(dir.join("pg_wal")).context("creating pg_wal")?;
    let auto = dir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(settings);
    std::fs::write(&auto, text).with_context(|| format!("writing {}", auto.display()))?;
    std::fs::write(dir.join("recovery.signal"), b"").context("writing recovery.signal")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, time: i64, seq: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            source: "pg".into(),
            time,
            root: exclave::ChunkId([0; 32]),
            key_fingerprint: String::new(),
            agent: String::new(),
            hostname: String::new(),
            files: 0,
            logical_bytes: 0,
            chunks: 0,
            stored_bytes: 0,
            commit_seq: seq,
        }
    }

    #[test]
    fn the_newest_base_before_the_target_is_chosen() {
        let list = [snap("a", 100, 1), snap("b", 200, 2), snap("c", 300, 3)];
        let at = |t: u64| UNIX_EPOCH + Duration::from_secs(t);
        let at = |t| Some(at(t));
        assert_eq!(select_base(&list, at(250), None).unwrap().id, "b");
        assert_eq!(select_base(&list, at(200), None).unwrap().id, "a", "a base started at T cannot reach T");
        assert_eq!(select_base(&list, at(250), Some("c")).unwrap().id, "c");
        assert_eq!(select_base(&list, None, None).unwrap().id, "c", "latest: the newest base");
        let e = select_base(&list, at(50), None).unwrap_err().to_string();
        assert!(e.contains("no base backup was started before"), "{e}");
        assert!(select_base(&[], at(50), None).unwrap_err().to_string().contains("has no base backup"));
    }

    #[test]
    fn target_times_parse_as_utc() {
        let t = parse_target_time("2026-11-23 10:15:00").unwrap();
        assert_eq!(t, parse_target_time("2026-11-23T10:15:00Z").unwrap());
        assert_eq!(pg_time(t), "2026-11-23 10:15:00.000000+00");
        assert!(parse_target_time("yesterday").is_err());
        assert_eq!(parse_target("latest").unwrap(), None);
        assert_eq!(parse_target("2026-11-23 10:15:00").unwrap(), Some(t));
    }

    #[test]
    fn recovery_settings_quote_paths() {
        let s = recovery_settings(
            &["/opt/ex/exclave-restore".into(), "wal-fetch".into(), "--pki".into(), "/etc/my pki/it's".into()],
            parse_target("2026-11-23 10:15:00").unwrap(),
        );
        assert!(
            s.contains(
                "restore_command = '/opt/ex/exclave-restore wal-fetch --pki ''/etc/my pki/it''\\''''s'' %f \"%p\"'"
            ),
            "{s}"
        );
        assert!(s.contains("recovery_target_time = '2026-11-23 10:15:00.000000+00'"));
        assert!(s.contains("recovery_target_action = 'promote'"));
        assert_eq!(remove_at_end(Path::new("/d/spool")), "recovery_end_command = 'rm -rf /d/spool'\n");
        assert_eq!(remove_at_end(Path::new("/d/it's")), "recovery_end_command = 'rm -rf ''/d/it''\\''''s'''\n");
        let latest = recovery_settings(&["/x".into()], None);
        assert!(latest.contains("restore_command = '/x %f \"%p\"'") && !latest.contains("recovery_target"), "{latest}");
    }
}
