//! Streaming WAL (`method = "stream"`): the daemon keeps `pg_receivewal` running for the
//! source and ships what it receives to the cluster, so the loss window (RPO) is seconds of
//! WAL at any write load, idle included, instead of `archive_timeout`.
//!
//! Rules:
//! - `pg_receivewal` holds a physical replication slot (`slot`, default `exclave_SOURCE`), so
//!   the server keeps every WAL file the stream has not received: a stopped agent or daemon
//!   loses nothing, it costs the server disk until the stream is back (watch
//!   `pg_replication_slots`). It writes into `STATE-DIR/wal-stream/SOURCE/` and fsyncs each
//!   write (`--synchronous`), so it can be named in `synchronous_standby_names` (application
//!   name `exclave_SOURCE`).
//! - Shipping: complete segments (and timeline history files) are archived exactly as
//!   `wal-push` archives them; the segment being written (`NAME.partial`) is archived every
//!   `stream-interval-secs` (3) when it grew, as a new file `NAME.streamed.LEN` (naming in
//!   `exclave::wal`). A position counts as shipped only once the cluster acknowledged the
//!   commit that holds it. While the cluster cannot be reached, the stream keeps receiving
//!   into the local directory and ships it all when the cluster answers again.
//! - A local segment is removed only after the cluster holds it complete, and the newest
//!   complete segment is always kept: `pg_receivewal` resumes after the newest file it finds.
//! - Lag: every tick samples the server's position (`pg_current_wal_lsn()`); the lag is the
//!   age of the oldest sample the cluster does not yet hold (`LagTracker`), 0 when the cluster
//!   holds everything the server had written at the last sample.
//! - `pg_receivewal` dies with the daemon (`PR_SET_PDEATHSIG`), stops on SIGTERM after the
//!   daemon shipped what it had, and is restarted with backoff (1 s doubling to 60 s). A full
//!   disk stops it (reported with its own words); nothing is lost, the slot holds the WAL, and
//!   it starts again once there is room (an empty segment file it left is removed first). The
//!   directory needs room for two segments (the newest complete one is kept).
//! - A slot found missing while the directory already holds streamed WAL was dropped by
//!   someone: WAL between the last file and now may be gone. That is logged as an error and
//!   counted (`exclave_agent_wal_slot_lost_total`), and the slot is created again so nothing
//!   more is lost; a new base backup closes the gap.
//! - WAL the server removed before the stream received it (the receiver stops with "has
//!   already been removed") is a gap: once everything in the directory is in the cluster, the
//!   directory is emptied so the receiver starts again at the slot's position, and the gap
//!   (from what the cluster holds to the slot's position) is logged as an error, counted
//!   (`exclave_agent_wal_gaps_total`) and kept in the status. Reported, never hidden; streaming
//!   goes on after it rather than stopping for good.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};

use crate::backup::{WalPusher, now_secs};

/// What the daemon knows of one source's stream, for the status file.
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct StreamStatus {
    pub slot: String,
    /// Whether `pg_receivewal` is running.
    pub receiving: bool,
    pub receiver_pid: Option<u32>,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// The server's newest WAL position at the last sample, and the newest position the
    /// cluster holds (`X/Y`).
    pub server_lsn: Option<String>,
    pub shipped_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_secs: Option<f64>,
    pub last_shipped: Option<String>,
    pub last_shipped_at: Option<i64>,
    pub segments_shipped: u64,
    pub partials_shipped: u64,
    /// WAL the server removed before the stream received it ("FROM to TO (found TIME)").
    #[serde(default)]
    pub gaps: Vec<String>,
}

/// How long the cluster's copy lags the server, from samples of the server's position.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// (time, server position), oldest first; only samples the cluster does not hold yet,
    /// and the newest one it does.
    samples: VecDeque<(f64, u64)>,
    shipped: u64,
}

impl LagTracker {
    pub fn server_at(&mut self, t: f64, lsn: u64) {
        if self.samples.back().is_none_or(|&(_, l)| l != lsn) {
            self.samples.push_back((t, lsn));
        }
        self.trim();
    }

    pub fn shipped_to(&mut self, lsn: u64) {
        self.shipped = self.shipped.max(lsn);
        self.trim();
    }

    fn trim(&mut self) {
        while self.samples.len() > 1 && self.samples[0].1 <= self.shipped && self.samples[1].1 <= self.shipped {
            self.samples.pop_front();
        }
    }

    pub fn shipped(&self) -> u64 {
        self.shipped
    }

    /// Seconds since the oldest server position the cluster does not hold was seen.
    pub fn lag_secs(&self, now: f64) -> f64 {
        self.samples.iter().find(|&&(_, l)| l > self.shipped).map_or(0.0, |&(t, _)| (now - t).max(0.0))
    }

    pub fn lag_bytes(&self) -> u64 {
        self.samples.back().map_or(0, |&(_, l)| l.saturating_sub(self.shipped))
    }
}

/// Parses PostgreSQL's `X/Y` notation of a WAL position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The position where segment `name` starts, for segments of `seg_size` bytes.
pub fn segment_start(name: &str, seg_size: u64) -> Option<u64> {
    if !exclave::wal::is_segment(name) || !seg_size.is_power_of_two() || seg_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((log << 32) + seg * seg_size)
}

/// How many bytes of a segment `pg_receivewal` has written: it pads the file with zeros, and
/// every WAL page begins with a non-zero header, so the data ends at the last non-zero byte
/// (a record ending in zero bytes is under-counted by those bytes, which only errs towards lag).
pub fn received_len(data: &[u8]) -> u64 {
    data.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1)
}

/// `received_len` of a file, read backwards a block at a time: each round of shipping asks it
/// of the segment being written, and reading that whole (16 MiB) took fresh memory each time.
pub fn received_len_of(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; SCAN_BLOCK];
    let mut end = file.metadata()?.len();
    while end > 0 {
        let start = end.saturating_sub(SCAN_BLOCK as u64);
        let block = &mut buf[..(end - start) as usize];
        file.read_exact_at(block, start)?;
        let n = received_len(block);
        if n > 0 {
            return Ok(start + n);
        }
        end = start;
    }
    Ok(0)
}

const SCAN_BLOCK: usize = 64 << 10;

/// What the stream directory holds: complete files to archive (oldest first) and the
/// segment being written.
#[derive(Debug, Default, PartialEq)]
pub struct Spool {
    pub complete: Vec<String>,
    pub partial: Option<String>,
}

pub fn scan(names: impl IntoIterator<Item = String>) -> Spool {
    let mut sp = Spool::default();
    for n in names {
        if let Some(seg) = n.strip_suffix(".partial") {
            if exclave::wal::is_segment(seg) && sp.partial.as_deref().is_none_or(|p| p < n.as_str()) {
                sp.partial = Some(n);
            }
        } else if exclave::wal::is_segment(&n) || (n.ends_with(".history") && exclave::wal::check_file_name(&n).is_ok())
        {
            sp.complete.push(n);
        }
    }
    // History files first (recovery needs them to choose a timeline), then by position.
    sp.complete
        .sort_by(|a, b| (!a.ends_with(".history"), a.get(8..), a).cmp(&(!b.ends_with(".history"), b.get(8..), b)));
    sp
}

/// Segments that may be removed once `shipped` (complete) is in the cluster: every complete
/// segment of the directory before the newest one.
pub fn removable(spool: &Spool, shipped: &std::collections::BTreeSet<String>) -> Vec<String> {
    let newest = spool.complete.iter().filter(|n| exclave::wal::is_segment(n)).max_by_key(|n| (&n[8..], &n[..8]));
    spool
        .complete
        .iter()
        .filter(|n| exclave::wal::is_segment(n) && Some(*n) != newest && shipped.contains(*n))
        .cloned()
        .collect()
}

/// The stream's metrics, registered with the daemon's.
#[derive(Clone)]
pub struct StreamMetrics {
    up: IntGaugeVec,
    lag_secs: GaugeVec,
    lag_bytes: IntGaugeVec,
    restarts: IntCounterVec,
    shipped: IntCounterVec,
    shipped_bytes: IntCounterVec,
    errors: IntCounterVec,
    slot_lost: IntCounterVec,
    gaps: IntCounterVec,
}

impl StreamMetrics {
    pub fn new(registry: &Registry) -> Result<StreamMetrics> {
        let per_source = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["source"]);
        let m = StreamMetrics {
            up: per_source("exclave_agent_wal_stream_up", "1 while pg_receivewal runs for the source")?,
            lag_secs: GaugeVec::new(
                Opts::new(
                    "exclave_agent_wal_lag_seconds",
                    "Age of the oldest WAL the server wrote that the cluster does not hold yet (the RPO now)",
                ),
                &["source"],
            )?,
            lag_bytes: per_source(
                "exclave_agent_wal_lag_bytes",
                "WAL bytes the server wrote that the cluster does not hold yet",
            )?,
            restarts: IntCounterVec::new(
                Opts::new("exclave_agent_wal_stream_restarts_total", "Times pg_receivewal was started again"),
                &["source"],
            )?,
            shipped: IntCounterVec::new(
                Opts::new("exclave_agent_wal_shipped_total", "WAL files archived by the stream, by kind"),
                &["source", "kind"],
            )?,
            shipped_bytes: IntCounterVec::new(
                Opts::new("exclave_agent_wal_shipped_bytes_total", "Envelope bytes uploaded by the stream"),
                &["source"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("exclave_agent_wal_ship_errors_total", "Failed attempts to archive streamed WAL"),
                &["source"],
            )?,
            slot_lost: IntCounterVec::new(
                Opts::new(
                    "exclave_agent_wal_slot_lost_total",
                    "Times the replication slot was found dropped after WAL had been streamed",
                ),
                &["source"],
            )?,
            gaps: IntCounterVec::new(
                Opts::new(
                    "exclave_agent_wal_gaps_total",
                    "Stretches of WAL the server removed before the stream received them (missing from the archive)",
                ),
                &["source"],
            )?,
        };
        let all: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(m.up.clone()),
            Box::new(m.lag_secs.clone()),
            Box::new(m.lag_bytes.clone()),
            Box::new(m.restarts.clone()),
            Box::new(m.shipped.clone()),
            Box::new(m.shipped_bytes.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.slot_lost.clone()),
            Box::new(m.gaps.clone()),
        ];
        for c in all {
            registry.register(c)?;
        }
        Ok(m)
    }

    /// Creates every series of a source from the start.
    pub fn add_source(&self, s: &str) {
        self.up.with_label_values(&[s]).set(0);
        self.lag_secs.with_label_values(&[s]);
        self.lag_bytes.with_label_values(&[s]);
        self.restarts.with_label_values(&[s]);
        for k in ["segment", "partial"] {
            self.shipped.with_label_values(&[s, k]);
        }
        self.shipped_bytes.with_label_values(&[s]);
        self.errors.with_label_values(&[s]);
        self.slot_lost.with_label_values(&[s]);
        self.gaps.with_label_values(&[s]);
    }
}

/// One streamed source.
#[derive(Clone)]
pub struct StreamSpec {
    pub source: String,
    pub config: PathBuf,
    pub connection: String,
    pub pg_bin: Option<PathBuf>,
    pub slot: String,
    pub dir: PathBuf,
    pub interval: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Complete segments archived at once when the stream is behind (each its own connection).
const PARALLEL_PUSHES: usize = 4;

/// Runs the stream of one source until `stop` turns true.
pub async fn run(
    spec: StreamSpec,
    metrics: StreamMetrics,
    status: Arc<Mutex<StreamStatus>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let src = spec.source.clone();
    let set_status = |f: &dyn Fn(&mut StreamStatus)| f(&mut lock(&status));
    set_status(&|s| s.slot = spec.slot.clone());
    if let Err(e) = std::fs::create_dir_all(&spec.dir) {
        tracing::error!(source = %src, dir = %spec.dir.display(), error = %e, "cannot create the WAL stream directory");
    }
    let mut shipper = Shipper::default();
    // What an earlier run had shipped, acknowledged by the cluster then.
    let before = lock(&status).shipped_lsn.clone();
    if let Some(lsn) = before.as_deref().and_then(parse_lsn) {
        lock(&shipper.lag).shipped_to(lsn);
    }
    // The lag is sampled every second on its own, so that it stays true while a round is
    // busy shipping a backlog.
    let sampler = {
        let (lag, metrics, status, mut stop) = (shipper.lag.clone(), metrics.clone(), status.clone(), stop.clone());
        let sspec = StreamSpec { config: PathBuf::new(), dir: PathBuf::new(), ..spec.clone() };
        let probe = Probe::default();
        tokio::spawn(async move {
            loop {
                sample_server(&sspec, &probe, &lag).await;
                report_lag(&sspec.source, &lock(&lag), &metrics, &status);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let probe = Probe::default();
    let mut pusher: Option<WalPusher> = None;
    let mut receiver: Option<Receiver> = None;
    let mut backoff = Duration::from_secs(1);
    let mut retry_at = Instant::now();
    let mut started = 0u64;
    loop {
        // The receiver: (re)started when it is not running and its backoff has passed.
        if receiver.is_none() && Instant::now() >= retry_at {
            match start_receiver(&spec, &metrics).await {
                Ok(r) => {
                    started += 1;
                    if started > 1 {
                        metrics.restarts.with_label_values(&[&src]).inc();
                        set_status(&|s| s.restarts += 1);
                    }
                    tracing::info!(source = %src, slot = %spec.slot, pid = ?r.child.id(), "receiving WAL");
                    metrics.up.with_label_values(&[&src]).set(1);
                    let pid = r.child.id();
                    set_status(&|s| {
                        s.receiving = true;
                        s.receiver_pid = pid;
                    });
                    receiver = Some(r);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    tracing::warn!(source = %src, error = %text, retry_in = ?backoff, "cannot start the WAL stream");
                    set_status(&|s| s.last_error = Some(text.clone()));
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // The cluster's side: credentials once, then whatever the directory holds.
        if pusher.is_none() {
            let (config, source) = (spec.config.clone(), spec.source.clone());
            match tokio::task::spawn_blocking(move || WalPusher::new(&config, &source)).await {
                Ok(Ok(p)) => pusher = Some(p),
                Ok(Err(e)) => {
                    tracing::warn!(source = %src, error = %format!("{e:#}"), "cannot load the agent's settings")
                }
                Err(e) => tracing::warn!(source = %src, error = %e, "cannot load the agent's settings"),
            }
        }
        // The sample comes first: what the receiver had flushed then is in the file read next.
        shipper.flushed = sample_server(&spec, &probe, &shipper.lag).await;
        report_lag(&src, &lock(&shipper.lag), &metrics, &status);
        if let Some(p) = pusher.as_ref() {
            shipper.ship(&spec, p, &metrics, &status).await;
        }
        report_lag(&src, &lock(&shipper.lag), &metrics, &status);

        let wait = match &receiver {
            Some(_) if shipper.backlog => Duration::from_millis(50),
            Some(_) => spec.interval,
            None => {
                retry_at.saturating_duration_since(Instant::now()).min(spec.interval).max(Duration::from_millis(100))
            }
        };
        let exited = async {
            match receiver.as_mut() {
                Some(r) => r.child.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            status_code = exited => {
                let r = receiver.take();
                let removed = r.as_ref().is_some_and(|r| r.said_any("has already been removed"));
                let said = r.map(|r| r.reason()).unwrap_or_default();
                if removed && let Some(p) = pusher.as_ref() {
                    shipper.ship(&spec, p, &metrics, &status).await;
                    match skip_gap(&spec, &shipper).await {
                        Ok(gap) => {
                            tracing::error!(source = %src, gap = %gap,
                                "WAL was removed by the server before it was received: it is missing from the \
                                 archive and point-in-time recovery cannot cross it; streaming resumes after it; \
                                 take a new base backup");
                            metrics.gaps.with_label_values(&[&src]).inc();
                            set_status(&|s| s.gaps.push(format!("{gap} (found {})", now_secs())));
                            backoff = Duration::from_secs(1);
                        }
                        Err(e) => tracing::warn!(source = %src, error = %format!("{e:#}"),
                            "WAL the stream needs was removed by the server; cannot skip the gap yet"),
                    }
                }
                let why = format!("pg_receivewal exited ({}): {said}",
                    status_code.map(|c| c.to_string()).unwrap_or_else(|| "?".into()));
                tracing::warn!(source = %src, error = %why, retry_in = ?backoff, "the WAL stream stopped");
                metrics.up.with_label_values(&[&src]).set(0);
                set_status(&|s| {
                    s.receiving = false;
                    s.receiver_pid = None;
                    s.last_error = Some(why.clone());
                });
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            _ = stop.changed() => {
                if let Some(mut r) = receiver.take() {
                    // pg_receivewal flushes what it has on SIGTERM; then the rest is shipped.
                    if let Some(pid) = r.child.id() {
                        let pid = nix::unistd::Pid::from_raw(pid as i32);
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(10), r.child.wait()).await;
                }
                if let Some(p) = pusher.as_ref() {
                    let _ = tokio::time::timeout(Duration::from_secs(20), shipper.ship(&spec, p, &metrics, &status)).await;
                }
                metrics.up.with_label_values(&[&src]).set(0);
                set_status(&|s| { s.receiving = false; s.receiver_pid = None; });
                if let Some(p) = pusher.as_ref() {
                    p.close().await;
                }
                sampler.abort();
                report_lag(&src, &lock(&shipper.lag), &metrics, &status);
                tracing::info!(source = %src, shipped = %format_lsn(lock(&shipper.lag).shipped()), "WAL stream stopped");
                return;
            }
        }
        if receiver.as_ref().is_some_and(|r| r.since.elapsed() > Duration::from_secs(30)) {
            backoff = Duration::from_secs(1);
        }
    }
}

/// Unix time with its fraction: lags are seconds, whole seconds would hide them.
fn now_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn report_lag(src: &str, lag: &LagTracker, metrics: &StreamMetrics, status: &Mutex<StreamStatus>) {
    let now = now_f64();
    let (lag_s, lag_b, shipped) = (lag.lag_secs(now), lag.lag_bytes(), lag.shipped());
    metrics.lag_secs.with_label_values(&[src]).set(lag_s);
    metrics.lag_bytes.with_label_values(&[src]).set(lag_b as i64);
    let mut s = lock(status);
    s.lag_secs = Some(lag_s);
    s.lag_bytes = Some(lag_b);
    s.shipped_lsn = (shipped > 0).then(|| format_lsn(shipped));
    s.server_lsn = lag.samples.back().map(|&(_, l)| format_lsn(l));
}

/// A running `pg_receivewal`.
struct Receiver {
    child: tokio::process::Child,
    since: Instant,
    said: Arc<Mutex<VecDeque<String>>>,
}

impl Receiver {
    fn said_any(&self, text: &str) -> bool {
        lock(&self.said).iter().any(|l| l.contains(text))
    }

    /// Why it stopped: its last error line other than the "disconnected" that follows every
    /// error, else its last line.
    fn reason(&self) -> String {
        let said = lock(&self.said);
        said.iter()
            .rev()
            .find(|l| l.contains("error:") && !l.trim_end().ends_with("error: disconnected"))
            .cloned()
            .unwrap_or_else(|| said.back().cloned().unwrap_or_default())
    }
}

fn program(spec: &StreamSpec) -> PathBuf {
    crate::source::postgres::program(spec.pg_bin.as_deref(), "pg_receivewal")
}

/// Creates the slot if it is missing (reporting a slot that was dropped), then starts
/// `pg_receivewal` on it.
async fn start_receiver(spec: &StreamSpec, metrics: &StreamMetrics) -> Result<Receiver> {
    let exists = {
        let (conn, slot) = (spec.connection.clone(), spec.slot.clone());
        tokio::task::spawn_blocking(move || -> Result<bool> {
            let mut c = crate::source::postgres::connect(&conn)?;
            let row = c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])?;
            Ok(row.get::<_, i64>(0) > 0)
        })
        .await??
    };
    if !exists {
        let streamed_before = std::fs::read_dir(&spec.dir)
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().len() >= 24))
            .unwrap_or(false);
        if streamed_before {
            metrics.slot_lost.with_label_values(&[&spec.source]).inc();
            tracing::error!(source = %spec.source, slot = %spec.slot,
                "the replication slot was dropped after WAL had been streamed: WAL written since the last file in {} \
                 may be lost; creating the slot again; take a new base backup", spec.dir.display());
        }
        create_slot(spec, false).await?;
        tracing::info!(source = %spec.source, slot = %spec.slot, "replication slot created");
    }
    remove_empty_partials(&spec.dir);
    let mut cmd = tokio::process::Command::new(program(spec));
    cmd.args(["--no-loop", "--synchronous", "--no-password", "--status-interval", "1", "--slot", &spec.slot])
        .arg("--directory")
        .arg(&spec.dir)
        .args(["--dbname", &spec.connection])
        .env("PGAPPNAME", &spec.slot)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure only makes one prctl call, which is async-signal-safe; it asks the
    // kernel to signal the child when the thread that forked it (a runtime worker, alive as
    // long as the daemon) exits, so a killed daemon leaves no receiver holding the slot.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| Ok(nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?));
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", program(spec).display()))?;
    let said = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(err) = child.stderr.take() {
        let (said, source) = (said.clone(), spec.source.clone());
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::info!(source = %source, "pg_receivewal: {l}");
                let mut s = lock(&said);
                s.push_back(l);
                if s.len() > 8 {
                    s.pop_front();
                }
            }
        });
    }
    Ok(Receiver { child, since: Instant::now(), said })
}

/// Creates the slot (after dropping it, with `replace`) reserving WAL at once: the server keeps
/// everything from its last checkpoint on, even before the receiver first connects (a slot
/// made by `pg_receivewal --create-slot` reserves nothing until then, and would take whatever
/// position the receiver asks for, removed or not). Returns its position.
async fn create_slot(spec: &StreamSpec, replace: bool) -> Result<Option<String>> {
    let (conn, slot) = (spec.connection.clone(), spec.slot.clone());
    tokio::task::spawn_blocking(move || -> Result<Option<String>> {
        let mut c = crate::source::postgres::connect(&conn)?;
        if replace {
            c.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .with_context(|| format!("dropping replication slot {slot}"))?;
        }
        let row = c
            .query_one("SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)", &[&slot])
            .with_context(|| format!("creating replication slot {slot} (the role needs REPLICATION)"))?;
        Ok(row.get::<_, Option<String>>(0))
    })
    .await?
}

/// The server removed WAL the stream had not received (its slot was dropped or lost): once
/// everything in the directory is in the cluster, the slot is made again at what the server
/// still has and the directory is emptied, so `pg_receivewal` starts again at the slot. Returns the gap, "FROM to TO", which is reported,
/// never hidden.
async fn skip_gap(spec: &StreamSpec, shipper: &Shipper) -> Result<String> {
    let names: Vec<String> =
        std::fs::read_dir(&spec.dir)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let spool = scan(names);
    if let Some(unshipped) = spool.complete.iter().find(|n| !shipper.complete.contains(*n)) {
        bail!("{unshipped} is not in the cluster yet");
    }
    // The slot points into what was removed: made again, it starts at what the server has.
    let to = create_slot(spec, true).await?;
    let from = format_lsn(lock(&shipper.lag).shipped());
    for n in spool.complete.iter().chain(spool.partial.iter()) {
        std::fs::remove_file(spec.dir.join(n)).with_context(|| format!("removing {n}"))?;
    }
    Ok(format!("{from} to {}", to.as_deref().unwrap_or("the slot's position")))
}

/// Removes `.partial` files that hold no WAL at all: what a receiver leaves when it could not
/// create a segment (a full disk stops it while zero-filling the new file), which would stop
/// every later receiver ("has N bytes, should be 0 or 16777216"). Without WAL in it, the
/// receiver starts the segment again from the same position.
fn remove_empty_partials(dir: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let empty = std::fs::File::open(e.path()).and_then(|f| received_len_of(&f)).is_ok_and(|n| n == 0);
        if name.ends_with(".partial") && empty {
            tracing::info!(file = %name, "removing an empty segment left by a receiver that could not create it");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A kept session with the database server, for the samples.
type Probe = Arc<Mutex<Option<postgres::Client>>>;

/// Samples the server's WAL position into `lag`, and returns how far the receiver had
/// flushed (as it reported to the server: with `--synchronous`, after each fsync). Nothing
/// when the server cannot be asked.
async fn sample_server(spec: &StreamSpec, probe: &Probe, lag: &Mutex<LagTracker>) -> Option<u64> {
    let (conn, app, probe) = (spec.connection.clone(), spec.slot.clone(), probe.clone());
    let got = tokio::task::spawn_blocking(move || -> Result<(Option<u64>, Option<u64>)> {
        // One session kept for the samples (a new one each second would fork a backend each
        // second); a failed query drops it and the next sample connects again.
        let mut kept = lock(&probe);
        let c = match kept.as_mut() {
            Some(c) => c,
            None => kept.insert(crate::source::postgres::connect(&conn)?),
        };
        let row = c.query_one(
            "SELECT pg_current_wal_lsn()::text, (SELECT max(flush_lsn)::text FROM pg_stat_replication \
             WHERE application_name = $1)",
            &[&app],
        );
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                *kept = None;
                return Err(e.into());
            }
        };
        let lsn = |i: usize| row.get::<_, Option<String>>(i).as_deref().and_then(parse_lsn);
        Ok((lsn(0), lsn(1)))
    })
    .await;
    match got {
        Ok(Ok((server, flushed))) => {
            if let Some(lsn) = server {
                lock(lag).server_at(now_f64(), lsn);
            }
            flushed
        }
        Ok(Err(e)) => {
            tracing::debug!(source = %spec.source, error = %format!("{e:#}"), "cannot read the server's WAL position");
            None
        }
        Err(e) => {
            tracing::debug!(source = %spec.source, error = %e, "cannot read the server's WAL position");
            None
        }
    }
}

/// What has been archived, and the lag it leaves.
#[derive(Default)]
struct Shipper {
    complete: std::collections::BTreeSet<String>,
    /// The segment being written and how much of it the cluster holds.
    partial: Option<(String, u64)>,
    /// How far the receiver had flushed before this round read its directory.
    flushed: Option<u64>,
    /// Whether the last round found complete segments to ship: the next starts at once.
    backlog: bool,
    /// Shared with the sampler, which keeps the lag current while a round ships.
    lag: Arc<Mutex<LagTracker>>,
}

impl Shipper {
    async fn ship(&mut self, spec: &StreamSpec, pusher: &WalPusher, m: &StreamMetrics, status: &Mutex<StreamStatus>) {
        let src = spec.source.as_str();
        let names = match std::fs::read_dir(&spec.dir) {
            Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>(),
            Err(_) => return,
        };
        let spool = scan(names);
        let done = |status: &Mutex<StreamStatus>, name: &str, partial: bool| {
            let mut s = lock(status);
            s.last_shipped = Some(name.to_string());
            s.last_shipped_at = Some(now_secs());
            s.last_error = None;
            if partial {
                s.partials_shipped += 1;
            } else {
                s.segments_shipped += 1;
            }
        };
        // Complete files in parallel, their results taken in order: a position counts as held
        // only when every file before it is.
        let todo: Vec<&String> = spool.complete.iter().filter(|n| !self.complete.contains(*n)).collect();
        // A failed round waits the interval before the next: no retry storm on a lasting error.
        self.backlog = false;
        let jobs: Vec<(PathBuf, String)> = todo.iter().map(|n| (spec.dir.join(n), (*n).clone())).collect();
        let mut pushes = futures::stream::iter(jobs.into_iter().map(move |(path, name)| async move {
            let size = std::fs::metadata(&path).map(|md| md.len()).unwrap_or(0);
            let t = Instant::now();
            (pusher.push(&path, &name).await, size, t.elapsed().as_secs_f64())
        }))
        .buffered(PARALLEL_PUSHES);
        let mut i = 0;
        while let Some((result, size, secs)) = pushes.next().await {
            let name = todo[i];
            i += 1;
            match result {
                Ok(bytes) => {
                    m.shipped.with_label_values(&[src, "segment"]).inc();
                    m.shipped_bytes.with_label_values(&[src]).inc_by(bytes);
                    if let Some(start) = segment_start(name, size) {
                        lock(&self.lag).shipped_to(start + size);
                    }
                    tracing::debug!(source = %src, file = %name, secs, "archived streamed WAL");
                    self.complete.insert(name.clone());
                    done(status, name, false);
                }
                Err(e) => return self.failed(src, name, e, m, status),
            }
        }
        drop(pushes);
        self.backlog = !todo.is_empty();
        for old in removable(&spool, &self.complete) {
            let _ = std::fs::remove_file(spec.dir.join(&old));
        }
        let Some(partial) = spool.partial else { return };
        let seg = &partial[..24];
        let path = spec.dir.join(&partial);
        let Ok(file) = std::fs::File::open(&path) else { return };
        let (Ok(md), Ok(received)) = (file.metadata(), received_len_of(&file)) else { return };
        let size = md.len();
        drop(file);
        let start = segment_start(seg, size);
        // Every byte the receiver had flushed before the scan is in the file; past that, the
        // last non-zero byte (records are 8-byte aligned, so the zeros up to that are padding).
        let flushed = match (self.flushed, start) {
            (Some(f), Some(st)) if f > st => (f - st).min(size),
            _ => 0,
        };
        let len = received.next_multiple_of(8).min(size).max(flushed);
        let grew = len > 0 && self.partial.as_ref().is_none_or(|(s, l)| s != seg || *l < len);
        if grew {
            let name = exclave::wal::streamed_name(seg, len);
            let t = Instant::now();
            match pusher.push(&path, &name).await {
                Ok(bytes) => {
                    m.shipped.with_label_values(&[src, "partial"]).inc();
                    m.shipped_bytes.with_label_values(&[src]).inc_by(bytes);
                    self.partial = Some((seg.to_string(), len));
                    let secs = t.elapsed().as_secs_f64();
                    tracing::debug!(source = %src, file = %name, secs, "archived the segment being written");
                    done(status, &name, true);
                }
                Err(e) => return self.failed(src, &name, e, m, status),
            }
        }
        // The cluster now holds every complete segment before this one and this one up to
        // `len`, which covers what the receiver had flushed before the read.
        if let Some(f) = self.flushed {
            lock(&self.lag).shipped_to(f);
        }
    }

    fn failed(&self, src: &str, name: &str, e: anyhow::Error, m: &StreamMetrics, status: &Mutex<StreamStatus>) {
        let text = format!("archiving {name}: {e:#}");
        tracing::warn!(source = %src, error = %text, "streamed WAL not archived yet; kept locally and retried");
        m.errors.with_label_values(&[src]).inc();
        lock(status).last_error = Some(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_position_the_cluster_lacks() {
        let mut l = LagTracker::default();
        assert_eq!(l.lag_secs(100.0), 0.0);
        l.server_at(100.0, 1000);
        assert_eq!((l.lag_secs(103.0), l.lag_bytes()), (3.0, 1000));
        l.server_at(103.0, 5000);
        l.shipped_to(1000);
        assert_eq!((l.lag_secs(104.0), l.lag_bytes()), (1.0, 4000), "the 1000 is held; 5000 seen at 103");
        l.shipped_to(5000);
        assert_eq!((l.lag_secs(200.0), l.lag_bytes()), (0.0, 0), "idle and caught up: no lag however long");
        l.server_at(200.0, 5000);
        assert_eq!(l.lag_secs(300.0), 0.0);
        l.server_at(300.0, 6000);
        l.server_at(303.0, 7000);
        assert_eq!(l.lag_secs(310.0), 10.0, "the cluster stopped taking WAL at 300");
        assert!(l.samples.len() <= 3, "{:?}", l.samples);
    }

    #[test]
    fn positions_segments_and_received_bytes() {
        assert_eq!(parse_lsn("1/2A000060"), Some(0x1_2A00_0060));
        assert_eq!(format_lsn(0x1_2A00_0060), "1/2A000060");
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(segment_start("00000001000000010000002A", 16 << 20), Some(0x1_2A00_0000));
        assert_eq!(segment_start("000000010000000000000003.partial", 16 << 20), None);
        let mut seg = vec![0u8; 64];
        seg[..10].fill(7);
        seg[20] = 1;
        assert_eq!(received_len(&seg), 21);
        assert_eq!(received_len(&[0; 8]), 0);
    }

    #[test]
    fn a_file_read_backwards_by_blocks_gives_the_same_length_as_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let n = 3 * SCAN_BLOCK + 100;
        // Data ending inside, at and around block boundaries, with zeros inside the data.
        for end in [0, 1, 7, SCAN_BLOCK - 1, SCAN_BLOCK, SCAN_BLOCK + 1, 2 * SCAN_BLOCK + 5, n - 1, n] {
            let mut data = vec![0u8; n];
            for (i, b) in data[..end].iter_mut().enumerate() {
                *b = if i % 3 == 0 { 0 } else { (i % 251) as u8 | 1 };
            }
            std::fs::write(&path, &data).unwrap();
            let f = std::fs::File::open(&path).unwrap();
            assert_eq!(received_len_of(&f).unwrap(), received_len(&data), "data ending at {end}");
        }
        std::fs::write(&path, b"").unwrap();
        assert_eq!(received_len_of(&std::fs::File::open(&path).unwrap()).unwrap(), 0);
    }

    #[test]
    fn the_spool_ships_in_order_and_keeps_the_newest_complete_segment() {
        let names = [
            "000000010000000000000005",
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000006.partial",
            "000000010000000000000004",
            ".exclave-tmp",
            "000000010000000000000005.partial.tmp",
        ];
        let sp = scan(names.iter().map(|s| s.to_string()));
        assert_eq!(
            sp.complete,
            ["00000002.history", "000000010000000000000003", "000000010000000000000004", "000000010000000000000005"]
        );
        assert_eq!(sp.partial.as_deref(), Some("000000010000000000000006.partial"));
        let shipped: std::collections::BTreeSet<String> =
            ["000000010000000000000003", "000000010000000000000005"].iter().map(|s| s.to_string()).collect();
        assert_eq!(removable(&sp, &shipped), ["000000010000000000000003"], "not unshipped 4, not the newest 5");
    }
}
