//! Point-in-time recovery inside a drill: a base backup restored into the drill's scratch
//! space replays the archived WAL in a scratch PostgreSQL server of the drill's own, to a
//! target time or to the end of the archive, and is promoted; the drill then reads every
//! table of every database back and reports the newest recovered transaction.
//!
//! WAL reaches the server through a spool, not through `wal-fetch`: the drill downloads every
//! WAL file the recovery may ask for over its own connection, several in flight and in
//! segment order, while the server's `restore_command` (a shell script in the spool) waits for
//! the file it asks for. So replay runs while later segments are still arriving, no process
//! or connection is started per segment, and the server's user never needs the drill's
//! certificate or key.
//!
//! Spool layout (`SCRATCH/wal/`):
//!
//! ```text
//! archive.list    every name the recovery may get, lower case, one a line; written before
//!                 the server starts. A name not in it is "not found" at once: that is how
//!                 PostgreSQL learns where the archive ends and which timelines exist.
//! NAME            a WAL file, lower case, complete (written as .part-NAME, then renamed)
//! fetch.failed    the first download error: every request not yet served then fails with
//!                 255, which stops recovery (1 would make PostgreSQL promote without it)
//! fetch.sh        the restore_command
//! ```
//!
//! The restored server must never act on the production system: archiving is off, any
//! `primary_conninfo` is cleared, it listens only on a Unix socket in the scratch space with
//! an `hba_file` of its own (trust on that socket), and TLS and the logging collector are off
//! (their files belong to the production host).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::nodes::Nodes;
use anyhow::{Context, Result, bail};
use exclave::keys::TenantKeys;
use exclave::protocol::SnapshotInfo;
use futures::StreamExt;
use serde::Serialize;

use crate::drill::{Check, Phase};
use crate::engine::{format_time, human};
use crate::{pg, pitr};

/// The restore_command: `fetch.sh %f "%p"`.
const FETCH_SCRIPT: &str = r#"#!/bin/sh
# restore_command of an exclave drill: serves the WAL files the drill downloads here.
d=$(dirname "$0")
n=$(printf '%s' "$1" | tr 'A-Z' 'a-z')
grep -qx "$n" "$d/archive.list" || exit 1
while [ ! -f "$d/$n" ]; do
  [ -f "$d/fetch.failed" ] && exit 255
  sleep 0.05
done
exec cp "$d/$n" "$2"
"#;

/// What the recovery part of a drill found, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// `latest` or the target time asked for.
    pub target: String,
    pub wal_files_archived: usize,
    pub wal_files_fetched: u64,
    pub wal_bytes_fetched: u64,
    /// The commit time of the newest transaction replayed (Unix seconds), when any was.
    pub newest_transaction: Option<f64>,
    pub newest_transaction_text: Option<String>,
    /// When the newest WAL file of the archive was stored (Unix seconds).
    pub newest_wal_archived: Option<i64>,
    /// How far the newest recovered transaction lies behind the newest archived WAL file:
    /// near zero when replay reached the end of the archive (at most the archive's own
    /// segment interval); large when it stopped early.
    pub gap_to_archive_secs: Option<f64>,
    /// From the server's start until it was promoted and accepted writes.
    pub replay_secs: f64,
    /// Rows of every table read back, by database and table.
    pub databases: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The WAL segment a base backup starts at (lower case), from its `backup_label`.
pub fn backup_start(pgdata: &Path) -> Result<String> {
    let label = std::fs::read_to_string(pgdata.join("backup_label"))
        .with_context(|| format!("{} has no backup_label: not a base backup", pgdata.display()))?;
    parse_backup_label(&label)
}

fn parse_backup_label(label: &str) -> Result<String> {
    // START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
    label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION:"))
        .and_then(|rest| rest.split_once("(file ")?.1.split_once(')').map(|(f, _)| f.trim().to_ascii_lowercase()))
        .filter(|f| f.len() == 24 && f.bytes().all(|b| b.is_ascii_hexdigit()))
        .context("backup_label has no START WAL LOCATION with a file name")
}

/// The archived WAL names a recovery from a base backup starting at `start` may ask for,
/// in the order to fetch them: timeline history files first, then segments (and partial
/// segments) from `start` on, by position, then timeline. Backup history files are not
/// needed.
pub fn wanted(archived: &[String], start: &str) -> Vec<String> {
    let (start_tli, start_pos) = start.split_at(8);
    let mut history: Vec<&String> = archived.iter().filter(|n| n.ends_with(".history")).collect();
    history.sort();
    let mut segments: Vec<&String> = archived
        .iter()
        .filter(|n| {
            let base = n.strip_suffix(".partial").unwrap_or(n);
            base.len() == 24
                && base.bytes().all(|b| b.is_ascii_hexdigit())
                && &base[..8] >= start_tli
                && &base[8..] >= start_pos
        })
        .collect();
    segments.sort_by(|a, b| (&a[8..24], &a[..8], a.len()).cmp(&(&b[8..24], &b[..8], b.len())));
    history.into_iter().chain(segments).cloned().collect()
}

#[derive(Default)]
struct Fetched {
    files: u64,
    bytes: u64,
    failure: Option<String>,
}

/// Downloads `wal` (in order, `parallel` in flight) into `spool`.
async fn fetch_into(
    client: Arc<Nodes>,
    keys: TenantKeys,
    wal: Vec<(String, String, SnapshotInfo)>,
    spool: PathBuf,
    parallel: usize,
    state: Arc<Mutex<Fetched>>,
) {
    let mut results = futures::stream::iter(wal.into_iter().map(|(name, stored, snap)| {
        let (client, keys, spool) = (client.clone(), keys.clone(), spool.clone());
        async move {
            fetch_one(&client, &keys, &snap, &name, &stored, &spool).await.with_context(|| format!("WAL file {stored}"))
        }
    }))
    .buffered(parallel.max(1));
    while let Some(r) = results.next().await {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(bytes) => {
                s.files += 1;
                s.bytes += bytes;
            }
            Err(e) => {
                let text = format!("{e:#}");
                let _ = std::fs::write(spool.join("fetch.failed"), &text);
                s.failure = Some(text);
                return;
            }
        }
    }
}

/// Fetches the archived file `stored` into the spool as `name`, the name PostgreSQL asks for
/// (they differ for a streamed version of a segment).
async fn fetch_one(
    client: &Arc<Nodes>,
    keys: &TenantKeys,
    snap: &SnapshotInfo,
    name: &str,
    stored: &str,
    spool: &Path,
) -> Result<u64> {
    let part = crate::wal_fetch::fetch_to(client, keys, snap, stored, spool).await?;
    let bytes = std::fs::metadata(&part)?.len();
    // Archived from pg_wal, the file is 0600: the server's user must read it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&part, spool.join(name))?;
    Ok(bytes)
}

/// Settings appended to the restored `postgresql.auto.conf` (they win over postgresql.conf).
fn drill_settings(socket_dir: &Path, hba: &Path, script: &Path, target: Option<SystemTime>) -> String {
    let q = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "''"));
    let mut s = pitr::recovery_settings(&["/bin/sh".into(), script.display().to_string()], target);
    if target.is_none() {
        s.push_str("recovery_target_action = 'promote'\n");
    }
    s.push_str(&format!(
        "# A drill's server never acts on the production system.\narchive_mode = off\nprimary_conninfo = ''\n\
         primary_slot_name = ''\nsynchronous_standby_names = ''\nlisten_addresses = ''\nport = 5432\n\
         unix_socket_directories = {}\nhba_file = {}\nssl = off\nlogging_collector = off\nhot_standby = on\n\
         fsync = off\nsynchronous_commit = off\nmax_wal_size = '2GB'\njit = off\n",
        q(socket_dir),
        q(hba)
    ));
    s
}

/// Replays the archived WAL of `source` into the base backup restored at `pgdata`, promotes,
/// and reads every table back. Returns checks and phases for the report.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Arc<Nodes>,
    keys: &TenantKeys,
    source: &str,
    scratch: &Path,
    pgdata: &Path,
    pg_bin: Option<PathBuf>,
    target: Option<SystemTime>,
    timeout: Duration,
    parallel: usize,
) -> (Recovery, Vec<Check>, Vec<Phase>) {
    let mut rec =
        Recovery { target: target.map(pitr::pg_time).unwrap_or_else(|| "latest".into()), ..Recovery::default() };
    let fail =
        |name: &str, detail: String| Check { name: name.into(), result: "fail".into(), detail, problems: vec![] };
    const WAL: &str = "WAL archive";
    const PITR: &str = "PostgreSQL point-in-time recovery";
    // Which WAL files, written down before the server may ask.
    let t = Instant::now();
    let start = match backup_start(pgdata) {
        Ok(s) => s,
        Err(e) => return (rec, vec![fail(PITR, format!("{e:#}"))], vec![]),
    };
    let wal_source = match exclave::wal::catalog_source(source) {
        Ok(s) => s,
        Err(e) => return (rec, vec![fail(WAL, e.to_string())], vec![]),
    };
    let archived = match client.primary().list_snapshots(Some(&wal_source)).await {
        Ok((list, _)) => list,
        Err(e) => return (rec, vec![fail(WAL, format!("listing the WAL archive: {e}"))], vec![]),
    };
    rec.wal_files_archived = archived.len();
    rec.newest_wal_archived = archived.iter().map(|s| s.time).max();
    let by_name: BTreeMap<String, SnapshotInfo> =
        archived.into_iter().filter_map(|s| Some((exclave::wal::file_name(&s.id)?.to_string(), s))).collect();
    let serves = exclave::wal::serving(&by_name.keys().cloned().collect::<Vec<_>>());
    let names = wanted(&serves.keys().cloned().collect::<Vec<_>>(), &start);
    let spool = scratch.join("wal");
    let script = spool.join("fetch.sh");
    if let Err(e) = write_spool(&spool, &names) {
        return (rec, vec![fail(WAL, format!("{e:#}"))], vec![]);
    }
    let list: Vec<(String, String, SnapshotInfo)> = names
        .iter()
        .filter_map(|n| {
            let stored = serves.get(n)?;
            Some((n.clone(), stored.clone(), by_name.get(stored)?.clone()))
        })
        .collect();
    let listed = t.elapsed().as_secs_f64();
    let state = Arc::new(Mutex::new(Fetched::default()));
    let fetcher =
        tokio::spawn(fetch_into(client, keys.clone(), list, spool.clone(), parallel.clamp(1, 8), state.clone()));

    // The server, on the blocking pool while the fetcher runs.
    let socket_dir = scratch.join("pg");
    let settings = drill_settings(&socket_dir, &socket_dir.join("pg_hba.conf"), &script, target);
    let (pgdata, scratch_dir) = (pgdata.to_path_buf(), scratch.to_path_buf());
    let served =
        tokio::task::spawn_blocking(move || serve(&scratch_dir, &socket_dir, &pgdata, pg_bin, &settings, timeout))
            .await;
    fetcher.abort();
    let _ = fetcher.await;
    let fetched = std::mem::take(&mut *state.lock().unwrap_or_else(|e| e.into_inner()));
    rec.wal_files_fetched = fetched.files;
    rec.wal_bytes_fetched = fetched.bytes;
    let mut checks = vec![match &fetched.failure {
        Some(e) => fail(WAL, format!("{e}; {} file(s) fetched before it", fetched.files)),
        None => Check {
            name: WAL.into(),
            result: "pass".into(),
            detail: format!(
                "{} WAL file(s), {} fetched, each authenticated and checked ({} listed from the base backup's start \
                 segment {start}, {} archived in all)",
                fetched.files,
                human(fetched.bytes),
                names.len(),
                rec.wal_files_archived
            ),
            problems: vec![],
        },
    }];
    let mut phases = Vec::new();
    match served {
        Err(e) => checks.push(fail(PITR, format!("the recovery task failed: {e}"))),
        Ok(Err(e)) => checks.push(fail(PITR, format!("{e:#}"))),
        Ok(Ok(s)) => {
            phases.push(Phase {
                name: "start the server, replay WAL (fetched meanwhile) and promote".into(),
                secs: s.replay_secs,
            });
            phases.push(Phase { name: "read every table back".into(), secs: s.read_secs });
            rec.replay_secs = s.replay_secs;
            rec.newest_transaction = s.newest;
            rec.newest_transaction_text = s.newest.map(|t| format_time(t as i64));
            rec.gap_to_archive_secs = match (s.newest, rec.newest_wal_archived) {
                (Some(t), Some(w)) if target.is_none() => Some((w as f64 - t).max(0.0)),
                _ => None,
            };
            let reached = match (s.newest, target) {
                (Some(n), Some(t)) => {
                    let t = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                    if n > t {
                        checks.push(fail(
                            PITR,
                            format!("a transaction committed at {n:.3} after the target {t:.3} was recovered"),
                        ));
                    }
                    format!("the target {}", rec.target)
                }
                _ => "the end of the archive".into(),
            };
            checks.push(Check {
                name: PITR.into(),
                result: "pass".into(),
                detail: format!(
                    "replayed to {reached} and promoted in {:.1} s; newest recovered transaction committed {}",
                    s.replay_secs,
                    rec.newest_transaction_text.as_deref().unwrap_or("(none replayed)")
                ),
                problems: vec![],
            });
            for (db, tables) in &s.databases {
                match tables {
                    Ok(t) => {
                        checks.push(Check {
                            name: format!("PostgreSQL database {db}"),
                            result: "pass".into(),
                            detail: format!(
                                "{} table(s), {} row(s) read back after recovery",
                                t.len(),
                                t.values().sum::<u64>()
                            ),
                            problems: vec![],
                        });
                        rec.databases.insert(db.clone(), t.clone());
                    }
                    Err(e) => checks.push(fail(&format!("PostgreSQL database {db}"), e.clone())),
                }
            }
        }
    }
    phases.insert(0, Phase { name: "list the WAL archive".into(), secs: listed });
    (rec, checks, phases)
}

fn write_spool(spool: &Path, names: &[String]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(spool).with_context(|| format!("creating {}", spool.display()))?;
    std::fs::set_permissions(spool, std::fs::Permissions::from_mode(0o755))?;
    let mut list = names.join("\n");
    list.push('\n');
    std::fs::write(spool.join("archive.list"), list)?;
    std::fs::write(spool.join("fetch.sh"), FETCH_SCRIPT)?;
    for f in ["archive.list", "fetch.sh"] {
        std::fs::set_permissions(spool.join(f), std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

struct Served {
    replay_secs: f64,
    read_secs: f64,
    newest: Option<f64>,
    databases: BTreeMap<String, std::result::Result<BTreeMap<String, u64>, String>>,
}

/// Starts the recovering server, waits until it is promoted, reads back; stops it.
fn serve(
    scratch: &Path,
    socket_dir: &Path,
    pgdata: &Path,
    bin: Option<PathBuf>,
    settings: &str,
    timeout: Duration,
) -> Result<Served> {
    pitr::prepare_data_dir(pgdata, settings)?;
    let t = Instant::now();
    let server = pg::Scratch::recover(bin, scratch, socket_dir, pgdata, timeout)?;
    let deadline = t + timeout;
    let admin = server.conn("postgres");
    loop {
        match query_bool(&admin, "SELECT pg_is_in_recovery()") {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) if !server.is_running() => {
                bail!("the server stopped during recovery: {}; last connection error: {e}", server.log_problem())
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            bail!("the server was not promoted within {} s: {}", timeout.as_secs(), server.log_problem());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let replay_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut c = exclave::facts::postgres::connect(&admin)?;
    let newest: Option<f64> = c
        .query_one("SELECT extract(epoch FROM pg_last_xact_replay_timestamp())::float8", &[])
        .context("asking for the newest replayed transaction")?
        .get(0);
    let dbs: Vec<String> = c
        .query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(c);
    let mut databases = BTreeMap::new();
    for db in dbs {
        let rows = exclave::facts::postgres::current_facts(
            &server.conn(&db),
            0,
            exclave::facts::postgres::RowHash::HashTextExtended,
        )
        .map(|f| f.tables.into_iter().map(|t| (t.name, t.rows)).collect())
        .map_err(|e| format!("reading it back: {e}"));
        databases.insert(db, rows);
    }
    Ok(Served { replay_secs, read_secs: t.elapsed().as_secs_f64(), newest, databases })
}

fn query_bool(conn: &str, sql: &str) -> Result<bool> {
    let mut c = exclave::facts::postgres::connect(conn)?;
    Ok(c.query_one(sql, &[])?.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_segment_is_read_from_the_backup_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 00000001000000000000000A)\nCHECKPOINT LOCATION: 0/2000060\n";
        assert_eq!(parse_backup_label(label).unwrap(), "00000001000000000000000a");
        assert!(parse_backup_label("LABEL: x\n").is_err());
        assert!(parse_backup_label("START WAL LOCATION: 0/2 (file ../../etc)\n").is_err());
    }

    #[test]
    fn recovery_wants_history_then_segments_from_the_start_in_replay_order() {
        let names: Vec<String> = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000002.00000028.backup",
            "000000010000000000000003",
            "00000002.history",
            "000000020000000000000003",
            "000000020000000000000004.partial",
            "000000020000000000000004",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            wanted(&names, "000000010000000000000002"),
            [
                "00000002.history",
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000003",
                "000000020000000000000004",
                "000000020000000000000004.partial",
            ]
        );
        assert_eq!(wanted(&names, "000000020000000000000004").len(), 3, "older timelines and segments are not needed");
    }

    #[test]
    fn drill_settings_cut_the_server_off_from_production() {
        let s = drill_settings(Path::new("/s/pg"), Path::new("/s/pg/pg_hba.conf"), Path::new("/s/wal/fetch.sh"), None);
        for line in [
            "archive_mode = off",
            "primary_conninfo = ''",
            "listen_addresses = ''",
            "unix_socket_directories = '/s/pg'",
            "hba_file = '/s/pg/pg_hba.conf'",
            "restore_command = '/bin/sh /s/wal/fetch.sh %f \"%p\"'",
            "recovery_target_action = 'promote'",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} missing from\n{s}");
        }
    }
}
