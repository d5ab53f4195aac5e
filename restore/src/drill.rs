//! Restore drills: restore a snapshot into scratch space, verify everything, check the
//! databases in it against the facts recorded when it was taken, measure the recovery time
//! (RTO) and the recovery point (RPO), write a report a minister can read, and record the
//! result in the cluster.
//!
//! By what the snapshot holds:
//! - files: every chunk authenticated and checked against its id, every file against its BLAKE3
//!   (the restore engine does both);
//! - a SQLite database (`FILE` with `FILE.facts.json`): `PRAGMA integrity_check`, then its
//!   tables' row counts and checksums against the recorded facts;
//! - a PostgreSQL dump (`DB.dump` with `DB.facts.json`): a scratch server of the drill's own
//!   (`pg`: initdb in the scratch space, a Unix socket there, stopped at the end), the dump
//!   loaded with `pg_restore --jobs`, then every table's row count and checksum against the
//!   recorded facts (with the row hash they were recorded with). A pg_restore older than the
//!   dump's server, or no PostgreSQL at all, fails the check with the reason;
//! - a PostgreSQL base backup (`pgdata/` with a `backup_label`): point-in-time recovery in a
//!   scratch server (`recovery`): the archived WAL replayed to `--target-time` or to the end
//!   of the archive, promoted, every table of every database read back.
//!
//! Verdict: FAIL when a check failed or a target was missed, INCOMPLETE when a check could not
//! be made, PASS otherwise. RTO runs from the drill's start until the data is usable and
//! verified (for a base backup: promoted and read back); RPO is the snapshot's age at the
//! start, or for a recovered base backup the time since its newest recovered transaction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use exclave::client::NodeClient;
use exclave::facts::DbFacts;
use exclave::keys::TenantKeys;
use exclave::protocol::{DrillRecord, Reply, Request, SnapshotInfo};
use serde::Serialize;

use crate::engine::{format_time, human, restore_filtered};
use crate::writer;

/// What the drill is asked to do.
pub struct Options {
    pub scratch: Option<PathBuf>,
    /// PostgreSQL's bin directory for database checks [default: the newest installed].
    pub pg_bin: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub keep: bool,
    pub parallel: usize,
    pub rto_target_secs: Option<f64>,
    pub rpo_target_secs: Option<i64>,
    /// For a base backup: replay WAL up to this time (None: to the end of the archive).
    pub target_time: Option<SystemTime>,
    /// For a base backup: how long replay may take before the drill fails.
    pub recovery_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// `pass`, `fail` or `skipped`.
    pub result: String,
    pub detail: String,
    /// Each problem found, one line each (a file and its chunk, a table and its counts).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: String,
    pub reason: String,
    pub tenant: String,
    pub source: String,
    pub snapshot: String,
    pub snapshot_time: String,
    pub node: String,
    pub key_fingerprint: String,
    pub key_epoch: u32,
    pub started: String,
    pub rto_secs: f64,
    pub rpo_secs: i64,
    pub rto_target_secs: Option<f64>,
    pub rpo_target_secs: Option<i64>,
    pub phases: Vec<Phase>,
    pub checks: Vec<Check>,
    pub files: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub kept_at: Option<String>,
    pub recorded: bool,
    /// A base backup's point-in-time recovery: WAL fetched, replay time, newest recovered
    /// transaction, rows read back.
    pub recovery: Option<crate::recovery::Recovery>,
    /// Chunks a node served damaged, and where good copies came from.
    pub bad_serves: Vec<crate::nodes::BadServe>,
    /// Nodes that stopped answering during the drill, and which took over.
    pub failovers: Vec<crate::nodes::Failover>,
    /// Chunks each node served good.
    pub served: std::collections::BTreeMap<String, u64>,
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Where database checks may work.
struct DbEnv {
    /// For a scratch PostgreSQL server, made on the first dump.
    scratch: PathBuf,
    pg_bin: Option<PathBuf>,
    jobs: usize,
    server: Option<crate::pg::Scratch>,
}

/// Checks every database of the restored tree against its recorded facts.
fn database_checks(root: &Path, env: &mut DbEnv) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut facts_files: Vec<PathBuf> =
        walk(root).into_iter().filter(|p| p.to_string_lossy().ends_with(".facts.json")).collect();
    facts_files.sort();
    for f in facts_files {
        let rel = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        let recorded = match std::fs::read(&f).map_err(anyhow::Error::from).and_then(|b| Ok(DbFacts::from_json(&b)?)) {
            Ok(r) => r,
            Err(e) => {
                checks.push(Check {
                    name: format!("database facts {rel}"),
                    result: "fail".into(),
                    detail: format!("the recorded facts cannot be read: {e}"),
                    problems: vec![],
                });
                continue;
            }
        };
        let db_path = PathBuf::from(f.to_string_lossy().trim_end_matches(".facts.json"));
        let db_rel = db_path.strip_prefix(root).unwrap_or(&db_path).display().to_string();
        match recorded.engine.as_str() {
            "sqlite" => checks.push(sqlite_check(&db_path, &db_rel, &recorded)),
            "postgresql" => {
                let dump = PathBuf::from(format!("{}.dump", db_path.display()));
                checks.push(postgres_check(&dump, &recorded, env));
            }
            engine => checks.push(Check {
                name: format!("{engine} database {}", recorded.database),
                result: "skipped".into(),
                detail: format!(
                    "{db_rel} was restored and verified as a file; this build cannot load {engine} databases"
                ),
                problems: vec![],
            }),
        }
    }
    checks
}

fn sqlite_check(db: &Path, rel: &str, recorded: &DbFacts) -> Check {
    let name = format!("SQLite database {rel}");
    let fail =
        |detail: String, problems: Vec<String>| Check { name: name.clone(), result: "fail".into(), detail, problems };
    let conn = match exclave::facts::sqlite::open_read_only(db) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string(), vec![]),
    };
    match exclave::facts::sqlite::integrity_check(&conn) {
        Ok(ok) if ok == "ok" => {}
        Ok(other) => return fail(format!("PRAGMA integrity_check: {other}"), vec![]),
        Err(e) => return fail(e.to_string(), vec![]),
    }
    drop(conn);
    match exclave::facts::sqlite::facts(db, now_secs()) {
        Ok(restored) => {
            let diffs = recorded.differences(&restored);
            if diffs.is_empty() {
                Check {
                    name,
                    result: "pass".into(),
                    detail: format!(
                        "integrity_check ok; {} table(s), {} row(s) match the facts recorded at snapshot time",
                        restored.tables.len(),
                        restored.tables.iter().map(|t| t.rows).sum::<u64>()
                    ),
                    problems: vec![],
                }
            } else {
                fail(format!("{} difference(s) from the facts recorded at snapshot time", diffs.len()), diffs)
            }
        }
        Err(e) => fail(e.to_string(), vec![]),
    }
}

fn postgres_check(dump: &Path, recorded: &DbFacts, env: &mut DbEnv) -> Check {
    let name = format!("PostgreSQL database {}", recorded.database);
    let fail =
        |detail: String, problems: Vec<String>| Check { name: name.clone(), result: "fail".into(), detail, problems };
    if !dump.is_file() {
        return fail(
            format!("the snapshot has the facts of {} but no dump {}", recorded.database, dump.display()),
            vec![],
        );
    }
    let bin = crate::pg::bin_dir(env.pg_bin.as_deref());
    let pg_restore = bin.as_deref().map(|b| b.join("pg_restore")).unwrap_or_else(|| PathBuf::from("pg_restore"));
    let dump_major: u32 = recorded.server_version.split(['.', ' ']).next().and_then(|m| m.parse().ok()).unwrap_or(0);
    match crate::pg::major_of(&pg_restore) {
        Ok(m) if m < dump_major => {
            return fail(
                format!(
                    "{} is PostgreSQL {m}, older than the server the dump was taken from ({}): give --pg-bin of PostgreSQL \
                     {dump_major} or later",
                    pg_restore.display(),
                    recorded.server_version
                ),
                vec![],
            );
        }
        Ok(_) => {}
        Err(e) => return fail(format!("{e:#}"), vec![]),
    }
    if env.server.is_none() {
        match crate::pg::Scratch::start(bin.clone(), &env.scratch.join("pg")) {
            Ok(s) => env.server = Some(s),
            Err(e) => return fail(format!("the scratch PostgreSQL server did not start: {e:#}"), vec![]),
        }
    }
    let Some(server) = env.server.as_ref() else { return fail("no scratch server".into(), vec![]) };
    let t = Instant::now();
    if let Err(e) = server.restore_dump(&recorded.database, dump, env.jobs) {
        return fail(format!("{e:#}"), vec![]);
    }
    let load = t.elapsed().as_secs_f64();
    let hash = match exclave::facts::postgres::RowHash::from_name(&recorded.row_hash) {
        Ok(h) => h,
        Err(e) => return fail(e.to_string(), vec![]),
    };
    match exclave::facts::postgres::current_facts(&server.conn(&recorded.database), now_secs(), hash) {
        Ok(restored) => {
            let diffs = recorded.differences(&restored);
            if diffs.is_empty() {
                Check {
                    name,
                    result: "pass".into(),
                    detail: format!(
                        "loaded into a scratch server with pg_restore --jobs {} in {load:.1} s; {} table(s), {} row(s) \
                         match the facts recorded at snapshot time",
                        env.jobs,
                        restored.tables.len(),
                        restored.tables.iter().map(|t| t.rows).sum::<u64>()
                    ),
                    problems: vec![],
                }
            } else {
                fail(format!("{} difference(s) from the facts recorded at snapshot time", diffs.len()), diffs)
            }
        }
        Err(e) => fail(e.to_string(), vec![]),
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// Runs a drill of `snap` through `client` (connected, as `connect_secs` took).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Arc<crate::nodes::Nodes>,
    node_name: String,
    keys: &TenantKeys,
    snap: &SnapshotInfo,
    started: Instant,
    started_at: i64,
    mut phases: Vec<Phase>,
    opts: &Options,
) -> Result<Report> {
    let base = opts.scratch.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating the scratch directory {}", base.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("exclave-drill-{}-", snap.source))
        .tempdir_in(&base)
        .with_context(|| format!("creating scratch space in {}", base.display()))?;
    let target = scratch.path().join("restored");
    // The scratch space is removed as a whole at the end; the target needs no guard of its own.
    writer::check_target(&target, false)?.keep();
    let t = Instant::now();
    // A restore that stops (scratch disk full, every node gone, a key that does not open the
    // snapshot) is the drill's finding, reported and recorded as a FAIL like any other.
    let restored = restore_filtered(
        &client,
        keys,
        snap,
        writer::Writer::new(Some(target.clone()), false),
        opts.parallel,
        &[],
        true,
    )
    .await;
    phases.push(Phase { name: "fetch, decrypt, write and verify files".into(), secs: t.elapsed().as_secs_f64() });
    let (report, stopped) = match restored {
        Ok((_, r)) => (r, None),
        Err(e) => (writer::Report::default(), Some(format!("{e:#}"))),
    };
    let mut checks = vec![match &stopped {
        Some(e) => Check {
            name: "files".into(),
            result: "fail".into(),
            detail: format!("the restore stopped: {e}"),
            problems: vec![],
        },
        None => Check {
            name: "files".into(),
            result: if report.failures.is_empty() { "pass" } else { "fail" }.into(),
            detail: if report.failures.is_empty() {
                format!(
                    "{} file(s), {} in {} chunk(s): every chunk authenticated and checked against its id, every \
                     file's BLAKE3",
                    report.files,
                    human(report.bytes),
                    report.chunks
                )
            } else {
                format!(
                    "{} of {} file(s) could not be restored or failed verification (each named below)",
                    report.failures.len(),
                    report.files
                )
            },
            problems: report.failures.iter().map(|f| format!("{}: {}", f.path, f.error)).collect(),
        },
    }];
    let pgdata = target.join("pgdata");
    let mut recovery = None;
    if stopped.is_some() {
        // Nothing usable to check further.
    } else if pgdata.join("backup_label").is_file() && report.failures.is_empty() {
        // A base backup: it is only usable once WAL has been replayed into it.
        let (rec, rec_checks, rec_phases) = crate::recovery::run(
            client.clone(),
            keys,
            &snap.source,
            scratch.path(),
            &pgdata,
            opts.pg_bin.clone(),
            opts.target_time,
            opts.recovery_timeout,
            opts.parallel,
        )
        .await;
        checks.extend(rec_checks);
        phases.extend(rec_phases);
        recovery = Some(rec);
    } else if opts.target_time.is_some() {
        checks.push(Check {
            name: "point-in-time recovery".into(),
            result: "fail".into(),
            detail: format!(
                "--target-time applies to base backups (a postgres source with method = \"base\"); snapshot {} holds \
                 no pgdata/backup_label",
                snap.id
            ),
            problems: vec![],
        });
    } else {
        let t = Instant::now();
        let root = target.clone();
        let mut env = DbEnv {
            scratch: scratch.path().to_path_buf(),
            pg_bin: opts.pg_bin.clone(),
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            server: None,
        };
        let db_checks = tokio::task::spawn_blocking(move || {
            let checks = database_checks(&root, &mut env);
            drop(env); // stops the scratch server before its directory goes
            checks
        })
        .await?;
        if !db_checks.is_empty() {
            phases.push(Phase { name: "database load and checks".into(), secs: t.elapsed().as_secs_f64() });
        }
        checks.extend(db_checks);
    }
    let (bad_serves, failovers) = (client.bad_serves(), client.failovers());
    if let Some(c) = nodes_check(&bad_serves, &failovers) {
        checks.push(c);
    }
    let rto = started.elapsed().as_secs_f64();
    // A recovered base backup loses what was committed after its newest replayed
    // transaction; any other snapshot, what came after it was taken.
    let rpo = match recovery.as_ref().and_then(|r| r.newest_transaction) {
        Some(t) => started_at.saturating_sub(t.floor() as i64),
        None => started_at.saturating_sub(snap.time),
    };
    let failed: Vec<&Check> = checks.iter().filter(|c| c.result == "fail").collect();
    let skipped: Vec<&Check> = checks.iter().filter(|c| c.result == "skipped").collect();
    let mut missed = Vec::new();
    if let Some(target) = opts.rto_target_secs
        && rto > target
    {
        missed.push(format!("RTO {rto:.1} s is above the {target} s target"));
    }
    if let Some(target) = opts.rpo_target_secs
        && rpo > target
    {
        missed.push(format!("RPO {rpo} s is above the {target} s target"));
    }
    let (verdict, reason) = if !failed.is_empty() || !missed.is_empty() {
        let mut why: Vec<String> = failed.iter().map(|c| format!("{}: {}", c.name, c.detail)).collect();
        why.extend(missed);
        ("FAIL", why.join("; "))
    } else if !skipped.is_empty() {
        ("INCOMPLETE", skipped.iter().map(|c| format!("{} not checked", c.name)).collect::<Vec<_>>().join("; "))
    } else {
        ("PASS", format!("{} check(s) passed; the data was usable and verified after {rto:.1} s", checks.len()))
    };
    let kept_at = if opts.keep {
        let p = scratch.keep();
        Some(p.join("restored").display().to_string())
    } else {
        drop(scratch);
        None
    };
    Ok(Report {
        verdict: verdict.into(),
        reason,
        tenant: keys.tenant.clone(),
        source: snap.source.clone(),
        snapshot: snap.id.clone(),
        snapshot_time: format_time(snap.time),
        node: node_name,
        key_fingerprint: keys.fingerprint.clone(),
        key_epoch: keys.epoch,
        started: format_time(started_at),
        rto_secs: rto,
        rpo_secs: rpo,
        rto_target_secs: opts.rto_target_secs,
        rpo_target_secs: opts.rpo_target_secs,
        phases,
        checks,
        files: report.files,
        bytes: report.bytes,
        chunks: report.chunks,
        kept_at,
        recorded: false,
        recovery,
        bad_serves,
        failovers,
        served: client.served(),
    })
}

/// What the report says of nodes that served bad data or stopped answering. The data a good
/// node gave instead was checked like any other, so this alone fails nothing; a chunk no node
/// could give fails its file in the files check.
fn nodes_check(bad: &[crate::nodes::BadServe], failovers: &[crate::nodes::Failover]) -> Option<Check> {
    if bad.is_empty() && failovers.is_empty() {
        return None;
    }
    let mut problems: Vec<String> = bad
        .iter()
        .map(|b| match &b.recovered_from {
            Some(good) => {
                format!("node {} served chunk {} damaged ({}); a good copy came from {good}", b.node, b.chunk, b.error)
            }
            None => {
                format!("node {} served chunk {} damaged ({}); no other node had a good copy", b.node, b.chunk, b.error)
            }
        })
        .collect();
    problems.extend(failovers.iter().map(|f| match &f.continued_from {
        Some(n) => format!("node {} stopped answering ({}); the drill continued from {n}", f.node, f.error),
        None => format!("node {} stopped answering ({}); no other node answered", f.node, f.error),
    }));
    let mut bad_nodes: Vec<&str> = bad.iter().map(|b| b.node.as_str()).collect();
    bad_nodes.sort();
    bad_nodes.dedup();
    let detail = match (bad.len(), failovers.len()) {
        (0, n) => format!("{n} node(s) stopped answering during the drill; other nodes served the rest"),
        (b, 0) => {
            format!("{b} chunk(s) served damaged by {}; see below where good copies came from", bad_nodes.join(", "))
        }
        (b, n) => format!(
            "{b} chunk(s) served damaged by {}, and {n} node(s) stopped answering; see below",
            bad_nodes.join(", ")
        ),
    };
    let result = if bad.iter().all(|b| b.recovered_from.is_some()) { "pass" } else { "fail" };
    Some(Check { name: "embassy nodes".into(), result: result.into(), detail, problems })
}

/// Commits the drill's result in the cluster.
pub async fn record(client: &NodeClient, r: &Report, snap: &SnapshotInfo, started_at: i64) -> Result<()> {
    let record = DrillRecord {
        source: r.source.clone(),
        snapshot: r.snapshot.clone(),
        snapshot_time: snap.time,
        started: started_at,
        verdict: r.verdict.clone(),
        reason: r.reason.chars().take(4000).collect(),
        rto_ms: (r.rto_secs * 1000.0) as u64,
        rpo_secs: r.rpo_secs,
        bytes: r.bytes,
        files: r.files,
        identity: String::new(),
        node: String::new(),
        recorded: 0,
    };
    match client.call(&[Request::RecordDrill { record }]).await? {
        Reply::Ok => Ok(()),
        other => anyhow::bail!("unexpected reply to record_drill: {other:?}"),
    }
}

/// The readable report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!("# Restore drill of {} ({}): {}\n\n", r.source, r.tenant, r.verdict));
    s.push_str(&format!("{}\n\n", r.reason));
    s.push_str("| | measured | target |\n|---|---|---|\n");
    s.push_str(&format!(
        "| recovery time (RTO) | {:.1} s | {} |\n",
        r.rto_secs,
        r.rto_target_secs.map(|t| format!("{t} s")).unwrap_or_else(|| "none set".into())
    ));
    let rpo_is = if r.recovery.as_ref().is_some_and(|rec| rec.newest_transaction.is_some()) {
        "time since the newest recovered transaction"
    } else {
        "age of the snapshot"
    };
    s.push_str(&format!(
        "| recovery point (RPO): {rpo_is} | {} | {} |\n\n",
        age(r.rpo_secs),
        r.rpo_target_secs.map(age).unwrap_or_else(|| "none set".into())
    ));
    s.push_str(&format!(
        "Snapshot {} taken {}, restored from node {} on {}, key {} (epoch {}); {} file(s), {} in {} chunk(s).\n\n",
        r.snapshot,
        r.snapshot_time,
        r.node,
        r.started,
        r.key_fingerprint,
        r.key_epoch,
        r.files,
        human(r.bytes),
        r.chunks
    ));
    if let Some(rec) = &r.recovery {
        s.push_str(&format!(
            "Point-in-time recovery to {}: {} WAL file(s) ({}) fetched, replayed and promoted in {:.1} s; newest \
             recovered transaction committed {}.\n\n",
            rec.target,
            rec.wal_files_fetched,
            human(rec.wal_bytes_fetched),
            rec.replay_secs,
            rec.newest_transaction_text.as_deref().unwrap_or("(none replayed)")
        ));
        if let Some(gap) = rec.gap_to_archive_secs {
            s.push_str(&format!(
                "The newest WAL file of the archive was stored {}; the newest recovered transaction is {} before it.\n\n",
                rec.newest_wal_archived.map(format_time).unwrap_or_default(),
                age(gap.round() as i64)
            ));
        }
        if !rec.databases.is_empty() {
            s.push_str("| database | table | rows |\n|---|---|---|\n");
            for (db, tables) in &rec.databases {
                for (t, rows) in tables {
                    s.push_str(&format!("| {db} | {t} | {rows} |\n"));
                }
            }
            s.push('\n');
        }
    }
    if r.served.len() > 1 {
        let by: Vec<String> = r.served.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        s.push_str(&format!("Chunks served by node: {}.\n\n", by.join(", ")));
    }
    s.push_str("## Checks\n\n| check | result | detail |\n|---|---|---|\n");
    for c in &r.checks {
        s.push_str(&format!("| {} | {} | {} |\n", c.name, c.result.to_uppercase(), c.detail.replace('|', "/")));
    }
    for c in r.checks.iter().filter(|c| !c.problems.is_empty()) {
        s.push_str(&format!("\n### {}: what differs\n\n", c.name));
        for p in &c.problems {
            s.push_str(&format!("- {p}\n"));
        }
    }
    s.push_str("\n## Phases\n\n| phase | seconds |\n|---|---|\n");
    for p in &r.phases {
        s.push_str(&format!("| {} | {:.2} |\n", p.name, p.secs));
    }
    s
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{:.0} min", s as f64 / 60.0),
        s if s < 172_800 => format!("{:.1} h", s as f64 / 3600.0),
        s => format!("{:.1} days", s as f64 / 86400.0),
    }
}

/// Writes `drill-<source>-<time>.json` and `.md` into `dir`; returns their paths.
pub fn write_report(dir: &Path, r: &Report, started_at: i64) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = chrono::DateTime::from_timestamp(started_at, 0)
        .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|| started_at.to_string());
    let json = dir.join(format!("drill-{}-{stamp}.json", r.source));
    let md = dir.join(format!("drill-{}-{stamp}.md", r.source));
    std::fs::write(&json, serde_json::to_vec_pretty(r)?).with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, markdown(r)).with_context(|| format!("writing {}", md.display()))?;
    Ok((json, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(age(59), "59 s");
        assert_eq!(age(600), "10 min");
        assert_eq!(age(3 * 3600), "3.0 h");
        assert_eq!(age(3 * 86400), "3.0 days");
    }

    #[test]
    fn a_sqlite_database_that_differs_from_its_facts_fails_naming_the_table() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("vehicles.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE vehicle (vin TEXT, km INTEGER); INSERT INTO vehicle VALUES ('a', 1), ('b', 2);")
            .unwrap();
        let facts = exclave::facts::sqlite::facts(&db, 1).unwrap();
        std::fs::write(d.path().join("vehicles.db.facts.json"), facts.to_json()).unwrap();
        let mut env = DbEnv { scratch: d.path().join("scratch"), pg_bin: None, jobs: 1, server: None };
        let checks = database_checks(d.path(), &mut env);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].result, "pass", "{checks:?}");
        c.execute("DELETE FROM vehicle WHERE vin = 'b'", []).unwrap();
        let checks = database_checks(d.path(), &mut env);
        assert_eq!(checks[0].result, "fail");
        assert!(checks[0].problems.iter().any(|p| p.contains("vehicle")), "{checks:?}");
    }
}
