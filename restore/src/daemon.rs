//! `exclave-restore run --config drills.toml`: the drill daemon, which runs each configured
//! source's restore drill on its cron schedule, and `exclave-restore status`, which reports
//! what it did. See deploy/drills.example.toml for a documented example.
//!
//! When to run is decided by `exclave::schedule` (shared with the agent's daemon): cron with
//! jitter, never two drills of one source at once, a drill missed while the daemon was down
//! run at start. Each drill is a child `exclave-restore drill ... --json`, so a drill that
//! crashes or exhausts memory never takes the daemon with it, and it behaves exactly like the
//! command a team would type (its report written to `reports`, its result recorded by the
//! cluster). A drill that gives a verdict (PASS, FAIL, INCOMPLETE) has run: the next one is at
//! the next occurrence, a FAIL is not hidden by retrying it away. A drill that gives no
//! verdict (no node reachable, a wrong key) is retried with backoff from `retry-secs`.
//!
//! Status file (`STATE-DIR/status.json`, replaced atomically after every change):
//! `{ pid, started, updated, drills: { SOURCE: DrillStatus } }`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use exclave::schedule::{self, Scheduler};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::engine::format_time;

/// First retry of a drill that gave no verdict, doubling up to an hour.
const DEFAULT_RETRY_SECS: i64 = 600;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DrillsConfig {
    /// Storage nodes (the first that answers serves; the others stand in for it).
    #[serde(default)]
    pub node: Vec<SocketAddr>,
    pub pki: PathBuf,
    /// Restore certificate name in the PKI directory.
    pub identity: String,
    pub key_file: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    /// Status file here [default: /var/lib/exclave-drill].
    pub state_dir: Option<PathBuf>,
    /// Scratch space for drills [default: STATE-DIR/scratch].
    pub scratch: Option<PathBuf>,
    /// Reports [default: STATE-DIR/reports].
    pub reports: Option<PathBuf>,
    /// PostgreSQL's bin directory for database checks [default: the newest installed].
    pub pg_bin: Option<PathBuf>,
    pub retry_secs: Option<i64>,
    /// Address for the daemon's Prometheus metrics (e.g. "127.0.0.1:9712").
    pub metrics_listen: Option<SocketAddr>,
    /// One table per source to drill, named by the source.
    #[serde(default)]
    pub drill: BTreeMap<String, DrillConfig>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DrillConfig {
    /// Cron expression (5 or 6 fields, local time), e.g. "0 3 1 * *": 03:00 on the 1st.
    pub schedule: String,
    /// Random delay after each occurrence, seconds.
    #[serde(default)]
    pub jitter_secs: u64,
    /// Fail the drill when recovery takes longer, seconds.
    pub rto_target: Option<f64>,
    /// Fail the drill when the recovery point is older, seconds.
    pub rpo_target: Option<i64>,
}

impl DrillsConfig {
    pub fn load(path: &Path) -> Result<DrillsConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: DrillsConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if cfg.node.is_empty() {
            bail!("{}: `node` names no storage node", path.display());
        }
        if cfg.drill.is_empty() {
            bail!("{}: no [drill.SOURCE] table: the daemon would have nothing to do", path.display());
        }
        for (name, d) in &cfg.drill {
            schedule::parse(&d.schedule).with_context(|| format!("[drill.{name}]"))?;
        }
        Ok(cfg)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/exclave-drill"))
    }

    fn scratch(&self) -> PathBuf {
        self.scratch.clone().unwrap_or_else(|| self.state_dir().join("scratch"))
    }

    fn reports(&self) -> PathBuf {
        self.reports.clone().unwrap_or_else(|| self.state_dir().join("reports"))
    }

    /// The child command's arguments for a drill of `source`.
    fn drill_args(&self, source: &str, d: &DrillConfig) -> Vec<String> {
        let mut a: Vec<String> = vec!["drill".into(), "--json".into()];
        for n in &self.node {
            a.extend(["--node".into(), n.to_string()]);
        }
        let path = |p: &Path| p.display().to_string();
        a.extend(["--pki".into(), path(&self.pki), "--identity".into(), self.identity.clone()]);
        a.extend(["--key-file".into(), path(&self.key_file)]);
        if let Some(p) = &self.passphrase_file {
            a.extend(["--passphrase-file".into(), path(p)]);
        }
        a.extend(["--source".into(), source.into(), "--scratch".into(), path(&self.scratch())]);
        a.extend(["--report".into(), path(&self.reports())]);
        if let Some(p) = &self.pg_bin {
            a.extend(["--pg-bin".into(), path(p)]);
        }
        if let Some(t) = d.rto_target {
            a.extend(["--rto-target".into(), t.to_string()]);
        }
        if let Some(t) = d.rpo_target {
            a.extend(["--rpo-target".into(), t.to_string()]);
        }
        a
    }
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct DrillStatus {
    pub schedule: String,
    pub running: bool,
    pub running_since: Option<i64>,
    pub next_run: Option<i64>,
    pub last_attempt: Option<i64>,
    /// PASS, FAIL or INCOMPLETE of the newest drill that gave a verdict.
    pub last_verdict: Option<String>,
    pub last_verdict_time: Option<i64>,
    pub last_reason: Option<String>,
    pub last_rto_secs: Option<f64>,
    pub last_rpo_secs: Option<i64>,
    pub last_pass: Option<i64>,
    /// Why the newest attempt gave no verdict (cleared by one that did).
    pub last_error: Option<String>,
    pub consecutive_errors: u32,
    pub runs: u64,
}

#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Status {
    pub pid: u32,
    pub started: i64,
    pub updated: i64,
    pub drills: BTreeMap<String, DrillStatus>,
}

impl Status {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("status.json")
    }

    fn save(&mut self, state_dir: &Path) -> Result<()> {
        self.updated = now_secs();
        Ok(exclave::status_file::save(&Status::path(state_dir), self)?)
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What one child drill gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: Option<String>,
    pub reason: Option<String>,
    pub rto_secs: Option<f64>,
    pub rpo_secs: Option<i64>,
    /// Why there is no verdict.
    pub error: Option<String>,
}

/// Reads a child drill's result from its exit code, JSON report and stderr.
pub fn outcome(code: Option<i32>, stdout: &[u8], stderr: &str) -> Outcome {
    let report: Option<serde_json::Value> = serde_json::from_slice(stdout).ok();
    let verdict = report.as_ref().and_then(|r| r["verdict"].as_str().map(String::from));
    match verdict {
        Some(v) if matches!(code, Some(0 | 1 | 3)) => Outcome {
            reason: report.as_ref().and_then(|r| r["reason"].as_str().map(String::from)),
            rto_secs: report.as_ref().and_then(|r| r["rto_secs"].as_f64()),
            rpo_secs: report.as_ref().and_then(|r| r["rpo_secs"].as_i64()),
            verdict: Some(v),
            error: None,
        },
        _ => {
            let lines: Vec<&str> =
                stderr.lines().map(|l| l.trim_start_matches("error: ")).filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
            Outcome {
                verdict: None,
                reason: None,
                rto_secs: None,
                rpo_secs: None,
                error: Some(if tail.is_empty() { format!("the drill exited with {code:?}") } else { tail }),
            }
        }
    }
}

async fn run_one(args: Vec<String>) -> Outcome {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("exclave-restore"));
    match tokio::process::Command::new(exe)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
    {
        Ok(o) => outcome(o.status.code(), &o.stdout, &String::from_utf8_lossy(&o.stderr)),
        Err(e) => Outcome {
            verdict: None,
            reason: None,
            rto_secs: None,
            rpo_secs: None,
            error: Some(format!("cannot start the drill: {e}")),
        },
    }
}

/// The daemon's own metrics; the verdicts themselves are recorded by the cluster and
/// exported by every node (`exclave_drill_ok` and the rest), so they survive this host.
struct Metrics {
    registry: Registry,
    runs: IntCounterVec,
    running: IntGaugeVec,
    next_run: IntGaugeVec,
    errors: IntGaugeVec,
}

impl Metrics {
    fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let per_source = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["source"]);
        let runs = IntCounterVec::new(
            Opts::new(
                "exclave_drill_runs_total",
                "Scheduled drills by result (PASS, FAIL, INCOMPLETE, error: no verdict)",
            ),
            &["source", "result"],
        )?;
        let running = per_source("exclave_drill_running", "1 while a source's drill is under way")?;
        let next_run =
            per_source("exclave_drill_next_run_timestamp_seconds", "When the source's next drill is due (Unix time)")?;
        let errors = per_source(
            "exclave_drill_consecutive_errors",
            "Scheduled drills of the source in a row that gave no verdict (could not run)",
        )?;
        for m in [&running, &next_run, &errors] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(runs.clone()))?;
        Ok(Metrics { registry, runs, running, next_run, errors })
    }
}

pub async fn run(config_path: PathBuf) -> Result<i32> {
    let config_path = std::path::absolute(&config_path)?;
    let cfg = DrillsConfig::load(&config_path)?;
    let state_dir = cfg.state_dir();
    for d in [state_dir.clone(), cfg.scratch(), cfg.reports()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Credentials that cannot work fail now, not at the first drill weeks later.
    let tls = exclave::transport::TlsIdentity::load(&cfg.pki, &cfg.identity)
        .with_context(|| format!("loading identity {:?}", cfg.identity))?;
    if let Some(w) = tls.check_validity(&cfg.identity)? {
        tracing::warn!("{w}");
    }
    exclave::keys::load_key_file(&cfg.key_file, &exclave::keys::Passphrase::from_flag(cfg.passphrase_file.clone()))
        .context("opening the tenant key")?;
    let previous: Status = exclave::status_file::load(&Status::path(&state_dir)).ok().flatten().unwrap_or_default();
    let mut sched = Scheduler::new(chrono::Local, Box::new(|n| rand::random_range(0..n)))
        .with_first_retry(cfg.retry_secs.unwrap_or(DEFAULT_RETRY_SECS));
    let mut status = Status { pid: std::process::id(), started: now_secs(), ..Status::default() };
    let metrics = Metrics::new()?;
    for (name, d) in &cfg.drill {
        let before = previous.drills.get(name).cloned().unwrap_or_default();
        // A drill is "done" for the schedule when it gave a verdict.
        sched.add(name, schedule::parse(&d.schedule)?, d.jitter_secs, now_secs(), before.last_verdict_time);
        for result in ["PASS", "FAIL", "INCOMPLETE", "error"] {
            metrics.runs.with_label_values(&[name.as_str(), result]);
        }
        metrics.running.with_label_values(&[name]).set(0);
        metrics.errors.with_label_values(&[name]).set(i64::from(before.consecutive_errors));
        metrics.next_run.with_label_values(&[name]).set(sched.due_of(name).unwrap_or(0));
        let s = DrillStatus {
            schedule: d.schedule.clone(),
            running: false,
            running_since: None,
            next_run: sched.due_of(name),
            ..before
        };
        tracing::info!(source = %name, schedule = %d.schedule, next_run = %fmt(s.next_run), "drill scheduled");
        status.drills.insert(name.clone(), s);
    }
    status.save(&state_dir)?;
    let _http = match cfg.metrics_listen {
        Some(addr) => Some(
            exclave::http::serve(
                addr,
                vec![metrics.registry.clone(), exclave::http::process_registry("exclave-restore")?],
                exclave::http::always_ready(),
            )
            .await
            .with_context(|| format!("serving HTTP on {addr}"))?,
        ),
        None => None,
    };
    eprintln!(
        "exclave-restore drill daemon: {} scheduled drill(s), status in {}",
        status.drills.len(),
        Status::path(&state_dir).display()
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Outcome)>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let t = now_secs();
        for name in sched.take_due(t) {
            tracing::info!(source = %name, "drill started");
            metrics.running.with_label_values(&[&name]).set(1);
            if let Some(s) = status.drills.get_mut(&name) {
                s.running = true;
                s.running_since = Some(t);
                s.next_run = None;
                s.last_attempt = Some(t);
            }
            let args = cfg.drill_args(&name, &cfg.drill[&name]);
            let tx = tx.clone();
            tasks.spawn(async move {
                let o = run_one(args).await;
                let _ = tx.send((name, o));
            });
        }
        status.save(&state_dir)?;
        let wait = sched.next_due().map(|d| (d - now_secs()).clamp(0, 60)).unwrap_or(60) as u64;
        tokio::select! {
            Some((name, o)) = rx.recv() => {
                let t = now_secs();
                sched.finished(&name, t, o.verdict.is_some());
                metrics.running.with_label_values(&[&name]).set(0);
                metrics.runs.with_label_values(&[name.as_str(), o.verdict.as_deref().unwrap_or("error")]).inc();
                metrics.next_run.with_label_values(&[&name]).set(sched.due_of(&name).unwrap_or(0));
                if let Some(s) = status.drills.get_mut(&name) {
                    s.running = false;
                    s.running_since = None;
                    s.runs += 1;
                    s.next_run = sched.due_of(&name);
                    match &o.verdict {
                        Some(v) => {
                            s.last_verdict = Some(v.clone());
                            s.last_verdict_time = Some(t);
                            s.last_reason = o.reason.clone();
                            s.last_rto_secs = o.rto_secs;
                            s.last_rpo_secs = o.rpo_secs;
                            if v == "PASS" {
                                s.last_pass = Some(t);
                            }
                            s.last_error = None;
                            s.consecutive_errors = 0;
                            if v == "PASS" {
                                tracing::info!(source = %name, rto = ?o.rto_secs, next_run = %fmt(s.next_run), "drill PASS");
                            } else {
                                tracing::error!(source = %name, verdict = %v, reason = %o.reason.as_deref().unwrap_or("?"),
                                    next_run = %fmt(s.next_run), "drill did not pass");
                            }
                        }
                        None => {
                            s.consecutive_errors += 1;
                            s.last_error = o.error.clone();
                            tracing::warn!(source = %name, error = %o.error.as_deref().unwrap_or("?"),
                                retry_at = %fmt(s.next_run), "drill could not run; will retry");
                        }
                    }
                    metrics.errors.with_label_values(&[&name]).set(i64::from(s.consecutive_errors));
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(wait.max(1))) => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping; drills under way are stopped and record nothing");
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tasks.shutdown().await;
    for s in status.drills.values_mut() {
        s.running = false;
        s.running_since = None;
    }
    status.pid = 0;
    status.save(&state_dir)?;
    Ok(0)
}

fn fmt(t: Option<i64>) -> String {
    t.map(format_time).unwrap_or_else(|| "-".into())
}

/// A drill is overdue when it is not running and was due this long ago: only a stuck or
/// stopped daemon gets there (it wakes at least every minute).
const OVERDUE_SECS: i64 = 300;

/// Whether all is well: the daemon runs, nothing is overdue or failing to run, and every
/// drill that gave a verdict passed.
pub fn healthy(st: &Status, alive: bool, now: i64) -> (bool, Vec<String>) {
    let late: Vec<String> = st
        .drills
        .iter()
        .filter(|(_, s)| !s.running && s.next_run.is_some_and(|t| t + OVERDUE_SECS < now))
        .map(|(n, _)| n.clone())
        .collect();
    let well = alive
        && late.is_empty()
        && st
            .drills
            .values()
            .all(|s| s.consecutive_errors == 0 && s.last_verdict.as_deref().is_none_or(|v| v == "PASS"));
    (well, late)
}

/// `exclave-restore status`: exit 0 when `healthy`, 1 otherwise.
pub fn status(config: &Path, json: bool) -> Result<i32> {
    let cfg = DrillsConfig::load(config)?;
    let dir = cfg.state_dir();
    let Some(st) = exclave::status_file::load::<Status>(&Status::path(&dir))? else {
        if json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "daemon": "never-ran", "drills": {} }))?);
        } else {
            println!("the drill daemon has not run yet (no {})", Status::path(&dir).display());
        }
        return Ok(1);
    };
    let alive = exclave::status_file::process_alive(st.pid);
    let (well, late) = healthy(&st, alive, now_secs());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "daemon": if alive { "running" } else { "stopped" }, "pid": st.pid, "started": st.started,
                "updated": st.updated, "overdue": late, "healthy": well, "drills": st.drills,
            }))?
        );
    } else {
        if alive {
            println!("drill daemon running (pid {}) since {}", st.pid, format_time(st.started));
        } else {
            println!("drill daemon not running (last update {})", format_time(st.updated));
        }
        println!(
            "{:<16} {:<14} {:<11} {:<21} {:>8} {:<21} STATE",
            "SOURCE", "SCHEDULE", "VERDICT", "AT", "RTO", "NEXT RUN"
        );
        for (name, s) in &st.drills {
            let state = if s.running {
                format!("running since {}", fmt(s.running_since))
            } else if late.contains(name) {
                format!("OVERDUE: due at {}", fmt(s.next_run))
            } else if s.consecutive_errors > 0 {
                format!("CANNOT RUN ({}x): {}", s.consecutive_errors, s.last_error.as_deref().unwrap_or("?"))
            } else if let Some(r) = s.last_reason.as_deref().filter(|_| s.last_verdict.as_deref() != Some("PASS")) {
                r.to_string()
            } else if s.last_verdict.is_none() {
                "waiting for the first drill".into()
            } else {
                "ok".into()
            };
            println!(
                "{:<16} {:<14} {:<11} {:<21} {:>8} {:<21} {}",
                name,
                s.schedule,
                s.last_verdict.as_deref().unwrap_or("-"),
                fmt(s.last_verdict_time),
                s.last_rto_secs.map(|r| format!("{r:.1} s")).unwrap_or_else(|| "-".into()),
                fmt(s.next_run),
                state
            );
        }
    }
    Ok(if well { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_is_a_run_and_no_verdict_is_an_error_to_retry() {
        let pass = outcome(Some(0), br#"{"verdict":"PASS","reason":"ok","rto_secs":2.5,"rpo_secs":60}"#, "");
        assert_eq!(pass.verdict.as_deref(), Some("PASS"));
        assert_eq!((pass.rto_secs, pass.rpo_secs), (Some(2.5), Some(60)));
        let fail = outcome(Some(1), br#"{"verdict":"FAIL","reason":"table t differs"}"#, "");
        assert_eq!((fail.verdict.as_deref(), fail.reason.as_deref()), (Some("FAIL"), Some("table t differs")));
        let down = outcome(Some(1), b"", "warning: x\nerror: no storage node reachable:\n  1.2.3.4:7401: timeout\n");
        assert_eq!(down.verdict, None);
        assert!(down.error.unwrap().contains("no storage node reachable"));
        let killed = outcome(None, b"", "");
        assert!(killed.error.unwrap().contains("exited"));
    }

    #[test]
    fn healthy_means_running_on_time_and_passing() {
        let d = |verdict: Option<&str>, errors: u32, next: Option<i64>| DrillStatus {
            last_verdict: verdict.map(String::from),
            consecutive_errors: errors,
            next_run: next,
            ..Default::default()
        };
        let st = |ds: Vec<DrillStatus>| Status {
            drills: ds.into_iter().enumerate().map(|(i, d)| (format!("s{i}"), d)).collect(),
            ..Default::default()
        };
        let now = 10_000;
        assert!(healthy(&st(vec![d(Some("PASS"), 0, Some(now + 60)), d(None, 0, Some(now))]), true, now).0);
        assert!(!healthy(&st(vec![d(Some("PASS"), 0, Some(now))]), false, now).0, "daemon down");
        assert!(!healthy(&st(vec![d(Some("FAIL"), 0, Some(now + 60))]), true, now).0);
        assert!(!healthy(&st(vec![d(Some("PASS"), 2, Some(now + 60))]), true, now).0);
        let (well, late) = healthy(&st(vec![d(Some("PASS"), 0, Some(now - 600))]), true, now);
        assert!(!well);
        assert_eq!(late, ["s0"]);
    }

    #[test]
    fn the_example_config_parses_and_names_every_flag() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/drills.example.toml");
        let cfg = DrillsConfig::load(&path).unwrap();
        let (name, d) = cfg.drill.iter().next().unwrap();
        let args = cfg.drill_args(name, d).join(" ");
        for flag in ["drill --json", "--node", "--pki", "--identity", "--key-file", "--source", "--scratch", "--report"]
        {
            assert!(args.contains(flag), "{flag} missing from {args}");
        }
    }
}
