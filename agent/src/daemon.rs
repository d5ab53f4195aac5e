//! `exclave-agent run`: the daemon that takes every scheduled source's snapshots and runs
//! the WAL streams of `method = "stream"` sources (`crate::stream`), and `exclave-agent
//! status`, which reports what it did.
//!
//! Each run is a child `exclave-agent backup --config F --source NAME --json`, so a run
//! that fails or crashes never takes the daemon with it, and a run behaves exactly like the
//! command an operator would type. When to run is decided by `schedule` (pure); the
//! daemon only feeds it the clock and the results. A cluster that cannot be reached just
//! makes runs fail; they are retried with backoff until it answers again.
//!
//! Status file (`STATE-DIR/status.json`, replaced atomically after every change):
//! `{ pid, started, updated, sources: { NAME: SourceStatus }, streams: { NAME: StreamStatus } }`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::backup::now_secs;
use crate::config::AgentConfig;
use exclave::schedule::{self, Scheduler};

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct SourceStatus {
    pub kind: String,
    pub schedule: String,
    pub running: bool,
    pub running_since: Option<i64>,
    pub next_run: Option<i64>,
    pub last_attempt: Option<i64>,
    pub last_success: Option<i64>,
    pub last_snapshot: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub last_duration_secs: Option<f64>,
    pub last_uploaded_bytes: Option<u64>,
    pub runs: u64,
    pub failures: u64,
}

#[derive(Serialize, Deserialize, Default, Debug)]
pub struct Status {
    pub pid: u32,
    pub started: i64,
    pub updated: i64,
    pub sources: BTreeMap<String, SourceStatus>,
    /// Sources whose WAL is streamed (`method = "stream"`).
    #[serde(default)]
    pub streams: BTreeMap<String, crate::stream::StreamStatus>,
}

impl Status {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("status.json")
    }

    pub fn load(state_dir: &Path) -> Result<Option<Status>> {
        Ok(exclave::status_file::load(&Status::path(state_dir))?)
    }

    fn save(&mut self, state_dir: &Path) -> Result<()> {
        self.updated = now_secs();
        Ok(exclave::status_file::save(&Status::path(state_dir), self)?)
    }
}

/// What one run (a child backup) gave.
struct RunOutcome {
    ok: bool,
    snapshot: Option<String>,
    error: Option<String>,
    duration_secs: f64,
    uploaded_bytes: Option<u64>,
    read_bytes: Option<u64>,
    delta_chunks: Option<u64>,
    delta_cache_bytes: Option<u64>,
}

async fn run_one(config: &Path, source: &str) -> RunOutcome {
    let started = std::time::Instant::now();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("exclave-agent"));
    let out = tokio::process::Command::new(exe)
        .args(["backup", "--json", "--quiet", "--config"])
        .arg(config)
        .args(["--source", source])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let duration_secs = started.elapsed().as_secs_f64();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return RunOutcome {
                ok: false,
                snapshot: None,
                error: Some(format!("cannot start the backup: {e}")),
                duration_secs,
                uploaded_bytes: None,
                read_bytes: None,
                delta_chunks: None,
                delta_cache_bytes: None,
            };
        }
    };
    // Exit 3: committed, with files skipped (warnings); still a snapshot.
    let committed = matches!(out.status.code(), Some(0 | 3));
    let summary: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = if committed {
        None
    } else {
        let tail: Vec<&str> =
            stderr.lines().map(|l| l.trim_start_matches("error: ")).filter(|l| !l.trim().is_empty()).collect();
        Some(tail[tail.len().saturating_sub(3)..].join(" / "))
            .filter(|s| !s.is_empty())
            .or(Some(format!("backup exited with {}", out.status)))
    };
    RunOutcome {
        ok: committed,
        snapshot: summary.as_ref().and_then(|s| s["snapshot"].as_str().map(String::from)),
        error,
        duration_secs,
        uploaded_bytes: summary.as_ref().and_then(|s| s["uploaded_bytes"].as_u64()),
        read_bytes: summary.as_ref().and_then(|s| s["bytes_read"].as_u64()),
        delta_chunks: summary.as_ref().and_then(|s| s["delta_chunks"].as_u64()),
        delta_cache_bytes: summary.as_ref().and_then(|s| s["delta_cache_bytes"].as_u64()),
    }
}

/// The daemon's metrics. Every scheduled source has each series from the start (a source
/// that has never succeeded shows `last_success` 0), so its absence of success can page.
struct Metrics {
    registry: Registry,
    last_success: IntGaugeVec,
    runs: IntCounterVec,
    running: IntGaugeVec,
    interval: IntGaugeVec,
    duration: prometheus::GaugeVec,
    read_bytes: IntCounterVec,
    uploaded_bytes: IntCounterVec,
    delta_chunks: IntCounterVec,
    delta_cache: IntGaugeVec,
    failures: IntGaugeVec,
    cert_expiry: IntGaugeVec,
    stream: crate::stream::StreamMetrics,
}

impl Metrics {
    fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let per_source = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["source"]);
        let last_success = per_source(
            "exclave_agent_last_success_timestamp_seconds",
            "When the source's last snapshot committed (Unix time; 0: never since this state directory was made)",
        )?;
        let runs = IntCounterVec::new(
            Opts::new("exclave_agent_runs_total", "Scheduled snapshot runs by result"),
            &["source", "result"],
        )?;
        let running = per_source("exclave_agent_running", "1 while a source's run is under way")?;
        let interval = per_source(
            "exclave_agent_schedule_interval_seconds",
            "Longest wait between two scheduled runs of the source, plus its jitter",
        )?;
        let duration = prometheus::GaugeVec::new(
            Opts::new("exclave_agent_last_run_duration_seconds", "How long the source's last run took, ok or not"),
            &["source"],
        )?;
        let read_bytes = IntCounterVec::new(
            Opts::new("exclave_agent_read_bytes_total", "Bytes read from the source by committed runs"),
            &["source"],
        )?;
        let uploaded_bytes = IntCounterVec::new(
            Opts::new("exclave_agent_uploaded_bytes_total", "Envelope bytes uploaded by committed runs"),
            &["source"],
        )?;
        let delta_chunks = IntCounterVec::new(
            Opts::new(
                "exclave_agent_delta_chunks_total",
                "Changed chunks sent as deltas on the chunks they replaced, by committed runs",
            ),
            &["source"],
        )?;
        let delta_cache = per_source(
            "exclave_agent_delta_cache_bytes",
            "Bytes of delta bases the agent keeps for the source, after its last committed run",
        )?;
        let failures =
            per_source("exclave_agent_consecutive_failures", "Failed runs of the source since its last success")?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "exclave_agent_certificate_expiry_timestamp_seconds",
                "When the agent's certificate expires (Unix time)",
            ),
            &["identity"],
        )?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(interval.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(read_bytes.clone()))?;
        registry.register(Box::new(uploaded_bytes.clone()))?;
        registry.register(Box::new(delta_chunks.clone()))?;
        registry.register(Box::new(delta_cache.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        let stream = crate::stream::StreamMetrics::new(&registry)?;
        Ok(Metrics {
            stream,
            registry,
            last_success,
            runs,
            running,
            interval,
            duration,
            read_bytes,
            uploaded_bytes,
            delta_chunks,
            delta_cache,
            failures,
            cert_expiry,
        })
    }

    /// Creates every series of a source, so that "never" is a value and not an absence.
    fn add_source(&self, name: &str, last_success: Option<i64>, interval: Option<i64>, failures: u32) {
        self.last_success.with_label_values(&[name]).set(last_success.unwrap_or(0));
        for result in ["ok", "failed"] {
            self.runs.with_label_values(&[name, result]);
        }
        self.running.with_label_values(&[name]).set(0);
        self.interval.with_label_values(&[name]).set(interval.unwrap_or(0));
        self.duration.with_label_values(&[name]);
        self.read_bytes.with_label_values(&[name]);
        self.uploaded_bytes.with_label_values(&[name]);
        self.delta_chunks.with_label_values(&[name]);
        self.delta_cache.with_label_values(&[name]);
        self.failures.with_label_values(&[name]).set(i64::from(failures));
    }
}

pub async fn run(config_path: PathBuf) -> Result<i32> {
    let config_path = std::path::absolute(&config_path)?;
    let cfg = AgentConfig::load(&config_path)?;
    let state_dir = cfg.state_dir();
    std::fs::create_dir_all(&state_dir).with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let previous = Status::load(&state_dir).ok().flatten().unwrap_or_default();
    let mut sched = Scheduler::new(chrono::Local, Box::new(|n| rand::random_range(0..n)))
        .with_first_retry(cfg.retry_secs.unwrap_or(schedule::FIRST_RETRY_SECS));
    let mut status = Status { pid: std::process::id(), started: now_secs(), ..Status::default() };
    let metrics = Metrics::new()?;
    // A wrong key or certificate fails now, at start, not at the first scheduled run hours later.
    {
        let pki = cfg.pki.as_deref().context("`pki` is required in the daemon's config")?;
        let ident = cfg.identity.as_deref().context("`identity` is required in the daemon's config")?;
        let key_file = cfg.key_file.as_deref().context("`key-file` is required in the daemon's config")?;
        let (tls, _, warning) = crate::backup::load_credentials(pki, ident, key_file, cfg.passphrase_file.clone())
            .context("checking the agent's credentials")?;
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        if let Some(cert) = tls.chain.first()
            && let Ok(info) = exclave::pki::cert_info(cert)
        {
            metrics.cert_expiry.with_label_values(&[ident]).set(info.not_after);
        }
    }
    for (name, src) in &cfg.sources {
        let Some(expr) = &src.schedule else { continue };
        let before = previous.sources.get(name).cloned().unwrap_or_default();
        sched.add(name, schedule::parse(expr)?, src.jitter_secs, now_secs(), before.last_success);
        metrics.add_source(name, before.last_success, sched.interval_of(name, now_secs()), before.consecutive_failures);
        let s = SourceStatus {
            kind: src.kind_name().into(),
            schedule: expr.clone(),
            running: false,
            running_since: None,
            next_run: sched.due_of(name),
            ..before
        };
        tracing::info!(source = %name, schedule = %expr, next_run = %fmt_time(s.next_run), "scheduled");
        status.sources.insert(name.clone(), s);
    }
    // Streamed WAL: one worker per source, stopped through `stop` on SIGTERM.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut streams = BTreeMap::new();
    let mut stream_tasks = tokio::task::JoinSet::new();
    for (name, src) in cfg.sources.iter().filter(|(_, s)| s.streams_wal()) {
        let spec = crate::stream::StreamSpec {
            source: name.clone(),
            config: config_path.clone(),
            connection: src.connection.clone().unwrap_or_default(),
            pg_bin: src.pg_bin.clone(),
            slot: src.slot_name(name),
            dir: state_dir.join("wal-stream").join(name),
            interval: std::time::Duration::from_secs(src.stream_interval_secs.unwrap_or(3)),
        };
        metrics.stream.add_source(name);
        // What the cluster acknowledged and the gaps found carry over from the last run; the
        // rest is live.
        let before = previous.streams.get(name);
        let st = Arc::new(Mutex::new(crate::stream::StreamStatus {
            shipped_lsn: before.and_then(|b| b.shipped_lsn.clone()),
            gaps: before.map(|b| b.gaps.clone()).unwrap_or_default(),
            ..Default::default()
        }));
        tracing::info!(source = %name, slot = %spec.slot, dir = %spec.dir.display(), "streaming WAL");
        stream_tasks.spawn(crate::stream::run(spec, metrics.stream.clone(), st.clone(), stopped.clone()));
        streams.insert(name.clone(), st);
    }
    if status.sources.is_empty() && streams.is_empty() {
        bail!(
            "no source in {} has a `schedule` or streams its WAL: the daemon would have nothing to do",
            config_path.display()
        );
    }
    let copy_streams = |status: &mut Status| {
        for (name, st) in &streams {
            status.streams.insert(name.clone(), st.lock().unwrap_or_else(|e| e.into_inner()).clone());
        }
    };
    copy_streams(&mut status);
    status.save(&state_dir)?;
    let _metrics_server = match cfg.metrics_listen {
        Some(addr) => Some(
            exclave::http::serve(
                addr,
                vec![metrics.registry.clone(), exclave::http::process_registry("exclave-agent")?],
                exclave::http::always_ready(),
            )
            .await
            .with_context(|| format!("serving HTTP on {addr}"))?,
        ),
        None => None,
    };
    eprintln!(
        "exclave-agent daemon: {} scheduled source(s), status in {}",
        status.sources.len(),
        Status::path(&state_dir).display()
    );

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, RunOutcome)>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let t = now_secs();
        for name in sched.take_due(t) {
            tracing::info!(source = %name, "snapshot started");
            metrics.running.with_label_values(&[&name]).set(1);
            if let Some(s) = status.sources.get_mut(&name) {
                s.running = true;
                s.running_since = Some(t);
                s.next_run = None;
                s.last_attempt = Some(t);
            }
            let (tx, cfg) = (tx.clone(), config_path.clone());
            tasks.spawn(async move {
                let outcome = run_one(&cfg, &name).await;
                let _ = tx.send((name, outcome));
            });
        }
        copy_streams(&mut status);
        status.save(&state_dir)?;
        // With streams, the status file follows their lag every few seconds.
        let most = if streams.is_empty() { 60 } else { 1 };
        let wait = sched.next_due().map(|d| (d - now_secs()).clamp(0, most)).unwrap_or(most) as u64;
        tokio::select! {
            Some((name, o)) = rx.recv() => {
                let t = now_secs();
                sched.finished(&name, t, o.ok);
                metrics.running.with_label_values(&[&name]).set(0);
                metrics.runs.with_label_values(&[name.as_str(), if o.ok { "ok" } else { "failed" }]).inc();
                metrics.duration.with_label_values(&[&name]).set(o.duration_secs);
                if o.ok {
                    metrics.read_bytes.with_label_values(&[&name]).inc_by(o.read_bytes.unwrap_or(0));
                    metrics.uploaded_bytes.with_label_values(&[&name]).inc_by(o.uploaded_bytes.unwrap_or(0));
                    metrics.delta_chunks.with_label_values(&[&name]).inc_by(o.delta_chunks.unwrap_or(0));
                    if let Some(b) = o.delta_cache_bytes {
                        metrics.delta_cache.with_label_values(&[&name]).set(b as i64);
                    }
                }
                if let Some(s) = status.sources.get_mut(&name) {
                    s.running = false;
                    s.running_since = None;
                    s.runs += 1;
                    s.last_duration_secs = Some(o.duration_secs);
                    s.next_run = sched.due_of(&name);
                    if o.ok {
                        s.last_success = Some(t);
                        s.last_snapshot = o.snapshot.clone();
                        s.last_error = None;
                        s.consecutive_failures = 0;
                        metrics.failures.with_label_values(&[&name]).set(0);
                        s.last_uploaded_bytes = o.uploaded_bytes;
                        metrics.last_success.with_label_values(&[&name]).set(t);
                        tracing::info!(source = %name, snapshot = ?o.snapshot, secs = o.duration_secs,
                            next_run = %fmt_time(s.next_run), "snapshot committed");
                    } else {
                        s.failures += 1;
                        s.consecutive_failures += 1;
                        metrics.failures.with_label_values(&[&name]).set(i64::from(s.consecutive_failures));
                        s.last_error = o.error.clone();
                        tracing::warn!(source = %name, error = %o.error.as_deref().unwrap_or("?"),
                            retry_at = %fmt_time(s.next_run), "snapshot failed; will retry");
                    }
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(wait.max(1))) => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping; runs under way are cancelled and commit nothing");
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tasks.shutdown().await;
    // Streams stop their receivers and ship what they had before the daemon exits.
    let _ = stop.send(true);
    while stream_tasks.join_next().await.is_some() {}
    copy_streams(&mut status);
    for s in status.sources.values_mut() {
        s.running = false;
        s.running_since = None;
    }
    status.pid = 0;
    status.save(&state_dir)?;
    Ok(0)
}

fn fmt_time(t: Option<i64>) -> String {
    match t {
        Some(t) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64)).to_string()
        }
        None => "-".into(),
    }
}

/// A source is overdue when it is not running and its next run was due this long ago: the
/// daemon wakes at least every minute, so only a stuck or stopped daemon gets there.
const OVERDUE_SECS: i64 = 300;

/// The sources that should have started by `now` and have not.
fn overdue(st: &Status, now: i64) -> Vec<String> {
    st.sources
        .iter()
        .filter(|(_, s)| !s.running && s.next_run.is_some_and(|t| t + OVERDUE_SECS < now))
        .map(|(n, _)| n.clone())
        .collect()
}

/// A streamed source whose lag exceeds this makes `status` exit 1 (the alert rule says the same).
const STREAM_LAG_SECS: f64 = 60.0;

/// `exclave-agent status`: exit 0 when the daemon runs, no scheduled source is failing or
/// overdue, one has committed, and every WAL stream receives and lags less than a minute; 1
/// otherwise (daemon down or never ran included).
pub fn status(config: Option<&Path>, json: bool) -> Result<i32> {
    let cfg = match config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    let dir = cfg.state_dir();
    let Some(st) = Status::load(&dir)? else {
        if json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "daemon": "never-ran", "sources": {} }))?);
        } else {
            println!("the daemon has not run yet (no {})", Status::path(&dir).display());
        }
        return Ok(1);
    };
    let alive = exclave::status_file::process_alive(st.pid);
    let failing = st.sources.values().filter(|s| s.consecutive_failures > 0).count();
    let late = overdue(&st, now_secs());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "daemon": if alive { "running" } else { "stopped" }, "pid": st.pid,
                "started": st.started, "updated": st.updated, "overdue": late, "sources": st.sources,
                "streams": st.streams,
            }))?
        );
    } else {
        if alive {
            println!("daemon running (pid {}) since {}", st.pid, fmt_time(Some(st.started)));
        } else {
            println!("daemon not running (last update {})", fmt_time(Some(st.updated)));
        }
        if !st.sources.is_empty() {
            println!(
                "{:<16} {:<9} {:<14} {:<21} {:<21} {:<18} STATE",
                "SOURCE", "KIND", "SCHEDULE", "LAST SUCCESS", "NEXT RUN", "LAST SNAPSHOT"
            );
        }
        for (name, s) in &st.sources {
            let state = if s.running {
                format!("running since {}", fmt_time(s.running_since))
            } else if late.contains(name) {
                format!("OVERDUE: due at {}", fmt_time(s.next_run))
            } else if s.consecutive_failures > 0 {
                format!("FAILING ({}x): {}", s.consecutive_failures, s.last_error.as_deref().unwrap_or("?"))
            } else if s.last_success.is_some() {
                "ok".into()
            } else {
                "waiting for first run".into()
            };
            println!(
                "{:<16} {:<9} {:<14} {:<21} {:<21} {:<18} {}",
                name,
                s.kind,
                s.schedule,
                fmt_time(s.last_success),
                fmt_time(s.next_run),
                s.last_snapshot.as_deref().unwrap_or("-"),
                state
            );
        }
    }
    let streams_bad: Vec<&String> = st
        .streams
        .iter()
        .filter(|(_, s)| !s.receiving || s.lag_secs.is_none_or(|l| l > STREAM_LAG_SECS))
        .map(|(n, _)| n)
        .collect();
    if !json && !st.streams.is_empty() {
        println!(
            "{}{:<16} {:<20} {:<10} {:<14} {:<14} {:<9} LAST SHIPPED",
            if st.sources.is_empty() { "" } else { "\n" },
            "WAL STREAM",
            "SLOT",
            "RECEIVING",
            "SERVER AT",
            "CLUSTER HOLDS",
            "LAG"
        );
        for (name, s) in &st.streams {
            let lag = s.lag_secs.map(|l| format!("{l:.0} s")).unwrap_or_else(|| "?".into());
            let flag = if streams_bad.contains(&name) { "  <- " } else { "" };
            println!(
                "{:<16} {:<20} {:<10} {:<14} {:<14} {:<9} {}{flag}{}",
                name,
                s.slot,
                if s.receiving { "yes" } else { "NO" },
                s.server_lsn.as_deref().unwrap_or("-"),
                s.shipped_lsn.as_deref().unwrap_or("-"),
                lag,
                s.last_shipped.as_deref().unwrap_or("-"),
                s.last_error.as_deref().unwrap_or("")
            );
        }
    }
    let sources_ok = st.sources.is_empty() || st.sources.values().any(|s| s.last_success.is_some());
    let well = alive && failing == 0 && late.is_empty() && sources_ok && streams_bad.is_empty();
    Ok(if well { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_overdue_only_when_waiting_past_its_time() {
        let source = |next_run: Option<i64>, running: bool| SourceStatus { next_run, running, ..Default::default() };
        let mut st = Status::default();
        st.sources.insert("due-long-ago".into(), source(Some(1_000), false));
        st.sources.insert("due-just-now".into(), source(Some(1_000 + 3_600 - 60), false));
        st.sources.insert("running".into(), source(Some(1_000), true));
        st.sources.insert("unscheduled".into(), source(None, false));
        assert_eq!(overdue(&st, 1_000 + 3_600), ["due-long-ago"]);
    }
}
