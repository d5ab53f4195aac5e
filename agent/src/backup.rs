//! The `backup` command: resolve settings, connect, run the pipeline, commit, report.
//!
//! Exit codes: 0 committed; 3 committed, but some files were skipped (see warnings);
//! 1 nothing committed (the error says why).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;

use exclave::chunker::ChunkerParams;
use exclave::client::ClientError;
use exclave::identity::Identity;
use exclave::keys::{Passphrase, load_key_file};
use exclave::protocol::ErrorCode;
use exclave::protocol::SnapshotInfo;
use exclave::transport::TlsIdentity;
use serde::Serialize;

use crate::BackupArgs;
use crate::config::{AgentConfig, PgMethod, SourceConfig, SourceKind};
use crate::pipeline::{self, Plan, Stats};
use crate::progress::Progress;
use crate::source::{self, Item};

#[derive(Serialize)]
pub struct Summary {
    pub source: String,
    pub kind: &'static str,
    pub snapshot: String,
    pub node: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes_read: u64,
    pub chunks: u64,
    pub chunks_new: u64,
    /// Plaintext bytes of the chunks the node did not have.
    pub new_bytes: u64,
    /// Envelope bytes uploaded (after compression and encryption), manifest included.
    pub uploaded_bytes: u64,
    /// Chunks and envelope bytes of file content uploaded (excluding manifest and root).
    pub data_chunks_uploaded: u64,
    pub data_bytes_uploaded: u64,
    /// Bytes read per new byte.
    pub dedup_ratio: f64,
    /// New plaintext bytes per uploaded byte.
    pub compression_ratio: f64,
    pub duration_secs: f64,
    pub mb_per_s: f64,
    pub warnings: Vec<String>,
    /// Runs needed: more than one when a node failed and another took over.
    pub attempts: usize,
    /// Runs repeated because garbage collection took chunks this backup had been told were
    /// stored (they belonged only to forgotten snapshots) before it committed.
    pub resends: usize,
    /// Changed chunks sent as deltas on the chunks they replaced, and their envelope bytes
    /// (included in `uploaded_bytes`).
    pub delta_chunks: u64,
    pub delta_bytes: u64,
    /// What the source's delta cache holds after this run (bytes on the agent's disk).
    pub delta_cache_bytes: Option<u64>,
    /// Time from sending the commit to its acknowledgement (through Raft in a cluster).
    pub commit_secs: f64,
    /// Tables whose row count and checksum were recorded (database sources).
    pub tables: Option<usize>,
    /// How long taking those facts took (they are taken while the dump streams).
    pub facts_secs: Option<f64>,
    /// The retention policy sent with the snapshot, or why the cluster refused it.
    pub retention: Option<String>,
}

/// Unix seconds now.
pub(crate) fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A snapshot id: 8 hex digits of start time, 8 of randomness; sorts by time.
fn snapshot_id(time: i64) -> String {
    format!("{:08x}{:08x}", time as u32, rand::random::<u32>())
}

struct Resolved {
    /// `wal-push`: the WAL file to archive (the snapshot id is its name).
    wal: Option<std::path::PathBuf>,
    /// Where runs of a configured source take their lock (the daemon's state directory).
    lock_dir: Option<std::path::PathBuf>,
    nodes: Vec<std::net::SocketAddr>,
    tls: TlsIdentity,
    keys: exclave::keys::TenantKeys,
    source: String,
    src: SourceConfig,
    zstd_level: i32,
    budget_mib: usize,
    /// The source's delta cache and its budget (MiB), when changed chunks go as deltas.
    deltas: Option<(std::path::PathBuf, u64)>,
}

/// Loads the agent's certificate and its tenant key and checks that they belong together:
/// the same check for a backup and for the daemon at start. Returns a warning to show when
/// the certificate expires soon.
pub fn load_credentials(
    pki: &std::path::Path,
    ident: &str,
    key_file: &std::path::Path,
    passphrase_file: Option<std::path::PathBuf>,
) -> Result<(TlsIdentity, exclave::keys::TenantKeys, Option<String>)> {
    let tls = TlsIdentity::load(pki, ident).with_context(|| format!("loading identity {ident:?}"))?;
    let warning = tls.check_validity(ident)?;
    let keys = load_key_file(key_file, &Passphrase::from_flag(passphrase_file))?;
    match &tls.identity {
        Identity::Agent { tenant, .. } if *tenant == keys.tenant => {}
        Identity::Agent { tenant, .. } => bail!(
            "key file {} is for tenant {:?} but certificate {ident} is for tenant {tenant:?}",
            key_file.display(),
            keys.tenant
        ),
        other => bail!("certificate {ident} is {other}, not an agent identity"),
    }
    Ok((tls, keys, warning))
}

fn resolve(a: &BackupArgs) -> Result<Resolved> {
    let cfg = match &a.conn.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    let nodes = if a.conn.nodes.is_empty() { cfg.node.clone() } else { a.conn.nodes.clone() };
    if nodes.is_empty() {
        bail!("no storage node given: use --node ADDR (or `node` in the config)");
    }
    let pki = a.conn.pki.clone().or(cfg.pki.clone()).context("--pki (or `pki` in the config) is required")?;
    let ident = a.conn.identity.clone().or(cfg.identity.clone()).context("--identity (or `identity`) is required")?;
    let key_file = a
        .conn
        .key_file
        .clone()
        .or(cfg.key_file.clone())
        .context("--key-file (or `key-file` in the config) is required")?;
    let passphrase_file = a.conn.passphrase_file.clone().or(cfg.passphrase_file.clone());
    let (tls, keys, warning) = load_credentials(&pki, &ident, &key_file, passphrase_file)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let one_shot = if a.wal_file.is_some() { Some(SourceConfig::default()) } else { one_shot_source(a)? };
    let (source, mut src) = match (&a.source, one_shot) {
        (Some(name), Some(src)) => (name.clone(), src),
        (Some(name), None) => match cfg.sources.get(name) {
            Some(s) => (name.clone(), s.clone()),
            None => bail!("no source {name:?} in the config and no PATH given"),
        },
        (None, Some(_)) => bail!("--source NAME is required: it names the snapshots of this source"),
        (None, None) => match cfg.sources.len() {
            1 => cfg.sources.iter().next().map(|(n, s)| (n.clone(), s.clone())).context("no source")?,
            0 => bail!("nothing to back up: give --source NAME PATH..."),
            _ => bail!(
                "the config has several sources; choose one with --source ({})",
                cfg.sources.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
    };
    exclave::identity::check_name("source name", &source)?;
    // Archived WAL is kept apart from the source's base backups.
    let source = if a.wal_file.is_some() { exclave::wal::catalog_source(&source)? } else { source };
    if let Some(avg) = a.chunk_avg {
        src.chunk_avg = Some(avg);
        src.chunk_min = Some(avg / 4);
        src.chunk_max = Some(avg.saturating_mul(4));
    }
    let delta_mib = cfg.delta_cache_mib.unwrap_or(crate::deltas::DEFAULT_CACHE_MIB);
    // WAL files never repeat a name: nothing to build a delta on.
    let deltas = match (&a.delta_cache, &a.conn.config) {
        _ if a.no_deltas || a.wal_file.is_some() => None,
        (Some(dir), _) => Some((dir.clone(), delta_mib)),
        (None, Some(_)) if delta_mib > 0 => Some((cfg.state_dir().join("deltas").join(&source), delta_mib)),
        _ => None,
    };
    Ok(Resolved {
        deltas,
        lock_dir: a.conn.config.as_ref().map(|_| cfg.state_dir().join("locks")),
        wal: a.wal_file.clone(),
        nodes,
        tls,
        keys,
        source,
        src,
        zstd_level: a.zstd_level.or(cfg.zstd_level).unwrap_or(exclave::envelope::DEFAULT_ZSTD_LEVEL),
        budget_mib: a.memory_budget_mib.or(cfg.memory_budget_mib).unwrap_or(32).max(4),
    })
}

/// The source given by flags (PATHs, --postgres, --sqlite or --command), if any.
fn one_shot_source(a: &BackupArgs) -> Result<Option<SourceConfig>> {
    let given = [!a.paths.is_empty(), a.postgres.is_some(), a.sqlite.is_some(), a.command.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        bail!("give one of PATH..., --postgres, --sqlite or --command");
    }
    let mut s = SourceConfig::default();
    if !a.paths.is_empty() {
        s.paths = a.paths.clone();
    } else if let Some(conn) = &a.postgres {
        s.kind = SourceKind::Postgres;
        s.connection = Some(conn.clone());
        s.method = if a.pg_base { PgMethod::Base } else { PgMethod::Dump };
        s.pg_bin = a.pg_bin.clone();
    } else if let Some(db) = &a.sqlite {
        s.kind = SourceKind::Sqlite;
        s.database = Some(db.clone());
    } else if let Some(cmd) = &a.command {
        s.kind = SourceKind::Command;
        s.command = vec!["/bin/sh".into(), "-c".into(), cmd.clone()];
    } else {
        return Ok(None);
    }
    s.validate()?;
    Ok(Some(s))
}

/// Whether a failed run may succeed on another node (the node or the link failed, not the
/// request).
fn fails_over(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<ClientError>() {
        Some(ClientError::Transport(_) | ClientError::NoNode(_)) => true,
        Some(ClientError::Remote { code, .. }) => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::StorageError | ErrorCode::NoQuorum)
        }
        _ => false,
    })
}

/// Test hooks: with `EXCLAVE_TEST_HOLD_COMMIT=FILE` (once the chunks are stored, before the
/// commit) or `EXCLAVE_TEST_HOLD_UPLOAD=FILE` (after the chunks were asked about, before the
/// first upload), the first time through creates `FILE.waiting` and waits (up to two minutes)
/// for `FILE`, so a test can run garbage collection in between. Unset, it costs one lookup.
pub(crate) async fn test_hold(var: &str) {
    static HELD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(file) = std::env::var(var) else { return };
    {
        let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
        if held.iter().any(|v| v == var) {
            return;
        }
        held.push(var.to_string());
    }
    let _ = std::fs::write(format!("{file}.waiting"), b"");
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while !std::path::Path::new(&file).exists() && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Times a backup is run again because its commit found chunks collected meanwhile.
const MISSING_RESENDS: usize = 3;

/// Whether the commit was refused for chunks the cluster no longer has.
fn chunks_went_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<ClientError>(), Some(ClientError::Remote { code: ErrorCode::MissingChunks, .. }))
    })
}

type Attempt = (Arc<exclave::client::NodeClient>, Vec<String>, SnapshotInfo, f64, Option<usize>, Option<String>);

/// Sends the source's retention policy ahead of the commit, which then applies it. A policy
/// the cluster refuses (shorter than the one in force) is reported, not fatal: the snapshot
/// is still worth committing.
async fn send_retention(
    client: &exclave::client::NodeClient,
    source: &str,
    policy: exclave::retention::RetentionPolicy,
) -> Result<String> {
    let req = exclave::protocol::Request::SetRetention { source: source.to_string(), policy };
    match client.call(&[req]).await {
        Ok(_) => Ok(policy.describe()),
        Err(ClientError::Remote { code: ErrorCode::BadRequest, message, .. }) => {
            tracing::warn!(%source, %message, "retention policy refused");
            Ok(format!("refused: {message}"))
        }
        Err(e) => Err(anyhow::Error::from(e).context("sending the retention policy")),
    }
}

/// One run of the backup against the first of `nodes` that answers. On failure, says which
/// node was in use.
async fn attempt(
    r: &Resolved,
    a: &BackupArgs,
    nodes: &[SocketAddr],
    stats: Arc<Stats>,
    wal: Option<WalFile<'_>>,
    reuse: Option<Arc<exclave::client::NodeClient>>,
) -> std::result::Result<Attempt, (Option<SocketAddr>, anyhow::Error)> {
    let defaults = if wal.is_some() { exclave::chunker::WAL_CHUNKER } else { ChunkerParams::default() };
    let chunker: ChunkerParams = r.src.chunker_or(defaults).map_err(|e| (None, e))?;
    // The connection is made once the pipeline's reading has started (`pipeline::run`): for a
    // one-segment `wal-push`, the handshake then costs no time of its own.
    let connected = std::sync::OnceLock::new();
    let client = async {
        let c = match reuse {
            Some(c) => c,
            None => Arc::new(exclave::client::connect_any(nodes, &r.tls).await?),
        };
        let _ = connected.set(c.addr());
        Ok(c)
    };
    let time = now_secs();
    let mut id = snapshot_id(time);
    // The manifest of a WAL file carries no time or host, so the same file always gives the
    // same root and archiving it twice is recognised as such.
    let (manifest_time, manifest_host) = if wal.is_some() { (0, String::new()) } else { (time, hostname()) };
    // Preparing may talk to a database with a blocking client: off the async threads.
    let prepared = if let Some(w) = wal {
        let path = w.path;
        let (name, file) = crate::wal::open(path).map_err(|e| (None, e))?;
        let name = w.name.map(str::to_string).unwrap_or(name);
        id = exclave::wal::snapshot_id(&r.source, &name).map_err(|e| (None, e.into()))?;
        source::Prepared { items: vec![Item::File { name, file, mtime: 0 }], hold: Vec::new() }
    } else {
        let (name, src) = (r.source.clone(), r.src.clone());
        tokio::task::spawn_blocking(move || source::prepare(&name, &src, time))
            .await
            .map_err(|e| (None, anyhow::Error::from(e)))?
            .with_context(|| format!("preparing source {}", r.source))
            .map_err(|e| (None, e))?
    };
    let source::Prepared { items, hold } = prepared;
    let has_facts = items.iter().any(|i| matches!(i, Item::Facts { .. }));
    let trees: Vec<source::Root> =
        items.iter().filter_map(|i| if let Item::Tree(r) = i { Some(r.clone()) } else { None }).collect();
    let deltas = match &r.deltas {
        Some((dir, mib)) => {
            let (dir, mib) = (dir.clone(), *mib);
            let d = tokio::task::spawn_blocking(move || crate::deltas::Deltas::open(&dir, mib))
                .await
                .map_err(|e| (None, anyhow::Error::from(e)))?;
            Some(Arc::new(d))
        }
        None => None,
    };
    let plan = Plan {
        tenant: r.keys.tenant.clone(),
        source: r.source.clone(),
        items,
        chunker,
        zstd_level: r.zstd_level,
        budget_bytes: r.budget_mib << 20,
        seal_workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        upload_streams: 8,
        time: manifest_time,
        hostname: manifest_host,
        deltas: deltas.clone(),
    };
    let progress =
        (!a.quiet && !a.json && std::io::stderr().is_terminal()).then(|| Progress::start(trees, stats.clone()));
    let outcome = pipeline::run(client, r.keys.clone(), plan, stats.clone()).await;
    let used = connected.get().copied();
    // The source's transaction (or staging copy) is released only now that it is read.
    let _ = tokio::task::spawn_blocking(move || drop(hold)).await;
    if let Some(p) = progress {
        p.finish();
    }
    let outcome = outcome
        .context("backup failed; nothing was committed (chunks already stored are reused next time)")
        .map_err(|e| (used, e))?;
    let client = outcome.client;
    let g = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
    let info = SnapshotInfo {
        id: id.clone(),
        source: r.source.clone(),
        time,
        root: outcome.root,
        key_fingerprint: r.keys.fingerprint.clone(),
        agent: String::new(),
        // Kept from the embassy (`SnapshotInfo`): the host's name is in the encrypted
        // manifest, and so are the files.
        hostname: String::new(),
        files: 0,
        logical_bytes: g(&stats.bytes_read),
        chunks: 0,
        stored_bytes: 0,
        commit_seq: 0,
    };
    let warnings = outcome.warnings;
    let info_root = info.root;
    // Sorting a large snapshot's references reads and writes temporary files: not on the
    // runtime's threads.
    let refs = outcome.refs;
    let batches = tokio::task::spawn_blocking(move || refs.into_batches(exclave::protocol::MAX_IDS_PER_MESSAGE))
        .await
        .map_err(|e| (used, anyhow::anyhow!("sorting the references: {e}")))?
        .context("sorting the references")
        .map_err(|e| (used, e))?;
    let retention = match (&r.src.retention, wal) {
        (Some(policy), None) => Some(send_retention(&client, &r.source, *policy).await.map_err(|e| (used, e))?),
        _ => None,
    };
    test_hold("EXCLAVE_TEST_HOLD_COMMIT").await;
    let commit_started = Instant::now();
    let committed = client
        .commit_batches(info, batches.batch_count() as u32, batches)
        .await
        .context("committing the snapshot")
        .map_err(|e| (used, e))?;
    if wal.is_some() && committed.root != info_root {
        return Err((
            used,
            anyhow::anyhow!(
                "WAL file {} is already archived with different content; refusing to replace it",
                exclave::wal::file_name(&committed.id).unwrap_or(&committed.id).to_uppercase()
            ),
        ));
    }
    let tables = has_facts.then(|| Stats::get(&stats.tables) as usize);
    if let Some(d) = deltas {
        // The snapshot is committed: its chunks become the bases of the next run.
        let took = Instant::now();
        match tokio::task::spawn_blocking(move || {
            let r = d.committed();
            (d, r)
        })
        .await
        {
            Ok((d, Ok(bytes))) => {
                tracing::info!(
                    deltas = Stats::get(&d.stats.deltas),
                    delta_bytes = Stats::get(&d.stats.delta_bytes),
                    rebased = Stats::get(&d.stats.rebased),
                    cache_bytes = bytes,
                    ms = took.elapsed().as_millis() as u64,
                    "delta cache updated"
                );
                Stats::add(&stats.deltas, Stats::get(&d.stats.deltas));
                Stats::add(&stats.delta_bytes, Stats::get(&d.stats.delta_bytes));
                Stats::add(&stats.delta_cache_bytes, bytes);
            }
            Ok((_, Err(e))) => {
                tracing::warn!(error = %e, "the delta cache could not be updated; the next run sends more")
            }
            Err(e) => tracing::warn!(error = %e, "the delta cache could not be updated; the next run sends more"),
        }
    }
    Ok((client, warnings, committed, commit_started.elapsed().as_secs_f64(), tables, retention))
}

/// Holds the lock that keeps two snapshots of one source from running at once (a daemon
/// run and a manual one, say). Released when dropped (or when the process dies).
struct SourceLock(#[allow(dead_code)] Option<nix::fcntl::Flock<std::fs::File>>);

fn lock_source(dir: &std::path::Path, source: &str) -> Result<SourceLock> {
    use std::io::{Read, Seek, Write};
    if std::fs::create_dir_all(dir).is_err() {
        // No writable state directory (a one-off run as another user): nothing to guard.
        tracing::debug!(dir = %dir.display(), "no lock directory; running unguarded");
        return Ok(SourceLock(None));
    }
    let path = dir.join(format!("{source}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
            Ok(SourceLock(Some(lock)))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!("a snapshot of source {source} is already running (pid {}); not starting another", pid.trim())
        }
        Err((_, e)) => Err(anyhow::anyhow!("locking {}: {e}", path.display())),
    }
}

/// A WAL file to archive instead of the source, and the name to archive it under when not its
/// file name (a streamed version).
#[derive(Clone, Copy)]
struct WalFile<'a> {
    path: &'a std::path::Path,
    name: Option<&'a str>,
}

/// What a backup that committed gave.
struct Done {
    client: Arc<exclave::client::NodeClient>,
    node: String,
    stats: Arc<Stats>,
    warnings: Vec<String>,
    committed: SnapshotInfo,
    commit_secs: f64,
    tables: Option<usize>,
    retention: Option<String>,
    attempts: usize,
    resends: usize,
}

/// Runs attempts until one commits: on another node when the one in use failed mid-run (the
/// chunks already on a write quorum are not sent twice), and again when garbage collection
/// took chunks this backup had been told were stored.
async fn attempts(
    r: &Resolved,
    a: &BackupArgs,
    wal: Option<WalFile<'_>>,
    mut reuse: Option<Arc<exclave::client::NodeClient>>,
) -> Result<Done> {
    let mut order = r.nodes.clone();
    let mut attempts = 0usize;
    let mut resends = 0usize;
    loop {
        attempts += 1;
        let stats = Arc::new(Stats::default());
        let reused = reuse.is_some();
        match attempt(r, a, &order, stats.clone(), wal, reuse.take()).await {
            Ok((client, warnings, committed, commit_secs, tables, retention)) => {
                let node = client.addr().to_string();
                return Ok(Done {
                    client,
                    node,
                    stats,
                    warnings,
                    committed,
                    commit_secs,
                    tables,
                    retention,
                    attempts,
                    resends,
                });
            }
            // The chunks belonged only to forgotten snapshots: running it again sends what
            // the cluster lacks now.
            Err((_, e)) if resends < MISSING_RESENDS && chunks_went_missing(&e) => {
                resends += 1;
                attempts -= 1;
                tracing::warn!(error = %format!("{e:#}"), "chunks were collected during the backup; sending them again");
                if !a.quiet && !a.json {
                    eprintln!("warning: chunks were collected by the cluster during the backup; sending them again");
                }
            }
            // A kept connection that broke since: a new one, to any node, before counting a failure.
            Err((_, e)) if reused && fails_over(&e) => {
                attempts -= 1;
                tracing::debug!(error = %format!("{e:#}"), "the kept connection failed; connecting again");
            }
            Err((failed, e)) if attempts < r.nodes.len() && fails_over(&e) => {
                tracing::warn!(node = %failed.map(|a| a.to_string()).unwrap_or_default(), error = %format!("{e:#}"),
                    "node failed during the backup; running it again on another node");
                if !a.quiet && !a.json {
                    eprintln!("warning: {e:#}\nretrying the backup on another node");
                }
                if let Some(f) = failed {
                    order.retain(|n| *n != f);
                    order.push(f);
                }
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// The plaintext in flight per WAL push of the daemon's stream, MiB.
const WAL_PUSH_BUDGET_MIB: usize = 8;

/// Archives WAL files for the daemon's WAL stream (`crate::stream`): settings and credentials
/// are resolved once (a sealed key is unsealed once, not per file), and one connection is kept
/// and shared by the pushes in flight (a new one when it breaks); each push is the same commit
/// as `wal-push`'s.
pub struct WalPusher {
    r: Resolved,
    client: std::sync::Mutex<Option<Arc<exclave::client::NodeClient>>>,
}

impl WalPusher {
    pub fn new(config: &std::path::Path, source: &str) -> Result<WalPusher> {
        let a = BackupArgs {
            conn: crate::ConnArgs { config: Some(config.to_path_buf()), ..Default::default() },
            source: Some(source.to_string()),
            quiet: true,
            wal_file: Some(std::path::PathBuf::new()),
            ..BackupArgs::default()
        };
        let mut r = resolve(&a)?;
        // Several files are pushed at once by a daemon that lives beside the database: a
        // small budget each.
        r.budget_mib = r.budget_mib.min(WAL_PUSH_BUDGET_MIB);
        Ok(WalPusher { r, client: std::sync::Mutex::new(None) })
    }

    /// Archives the file at `path` as `name`, durably (acknowledged by the cluster); returns
    /// the envelope bytes uploaded.
    pub async fn push(&self, path: &std::path::Path, name: &str) -> Result<u64> {
        let wal = WalFile { path, name: Some(name) };
        let kept = self.client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let done = attempts(&self.r, &BackupArgs { quiet: true, ..BackupArgs::default() }, Some(wal), kept).await;
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Err(e);
            }
        };
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(done.client.clone());
        Ok(Stats::get(&done.stats.uploaded_bytes))
    }

    /// Closes the kept connection.
    pub async fn close(&self) {
        let kept = self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = kept.and_then(|c| Arc::try_unwrap(c).ok()) {
            c.close().await;
        }
    }
}

pub async fn run(a: BackupArgs) -> Result<i32> {
    let r = resolve(&a)?;
    let _lock = match (&r.lock_dir, &r.wal) {
        (Some(dir), None) => lock_source(dir, &r.source)?,
        _ => SourceLock(None),
    };
    let started = Instant::now();
    let Done { client, node, stats, warnings, committed, commit_secs, tables, retention, attempts, resends } =
        attempts(&r, &a, r.wal.as_deref().map(|path| WalFile { path, name: None }), None).await?;
    let g = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
    let duration = started.elapsed();
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    let secs = duration.as_secs_f64().max(1e-9);
    let (read, new, up) = (g(&stats.bytes_read), g(&stats.new_bytes), g(&stats.uploaded_bytes));
    let summary = Summary {
        source: r.source,
        kind: if r.wal.is_some() { "wal" } else { r.src.kind_name() },
        snapshot: committed.id,
        node,
        files: g(&stats.files),
        dirs: g(&stats.dirs),
        symlinks: g(&stats.symlinks),
        bytes_read: read,
        chunks: g(&stats.chunks),
        chunks_new: g(&stats.chunks_uploaded),
        new_bytes: new,
        uploaded_bytes: up,
        data_chunks_uploaded: g(&stats.data_chunks_uploaded),
        data_bytes_uploaded: g(&stats.data_bytes_uploaded),
        dedup_ratio: read as f64 / new.max(1) as f64,
        compression_ratio: new as f64 / up.max(1) as f64,
        duration_secs: secs,
        mb_per_s: read as f64 / 1e6 / secs,
        warnings,
        attempts,
        resends,
        delta_chunks: g(&stats.deltas),
        delta_bytes: g(&stats.delta_bytes),
        delta_cache_bytes: r.deltas.as_ref().map(|_| g(&stats.delta_cache_bytes)),
        commit_secs,
        facts_secs: tables.map(|_| g(&stats.facts_nanos) as f64 / 1e9),
        tables,
        retention,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if r.wal.is_some() {
        // One line for the PostgreSQL server log.
        println!(
            "archived {} ({}, {} uploaded) on {}",
            exclave::wal::file_name(&summary.snapshot).unwrap_or(&summary.snapshot).to_uppercase(),
            mib(summary.bytes_read),
            mib(summary.uploaded_bytes),
            summary.node
        );
    } else {
        print_summary(&summary);
    }
    Ok(if summary.warnings.is_empty() { 0 } else { 3 })
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn print_summary(s: &Summary) {
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    println!("snapshot {} of source {} committed on {}", s.snapshot, s.source, s.node);
    println!("  files         {} ({} dirs, {} symlinks)", s.files, s.dirs, s.symlinks);
    if let Some(t) = s.tables {
        println!(
            "  tables        {t} (row counts and checksums recorded for restore drills, taken in {:.2} s)",
            s.facts_secs.unwrap_or(0.0)
        );
    }
    println!("  read          {}", mib(s.bytes_read));
    println!("  new           {}  ({} of {} data chunks)", mib(s.new_bytes), s.data_chunks_uploaded, s.chunks);
    println!("  uploaded      {}  (after compression and encryption)", mib(s.uploaded_bytes));
    if let Some(cache) = s.delta_cache_bytes {
        println!(
            "  deltas        {} chunks as deltas, {}  (delta cache {})",
            s.delta_chunks,
            mib(s.delta_bytes),
            mib(cache)
        );
    }
    println!("  dedup ratio   {:.2}x   compression {:.2}x", s.dedup_ratio, s.compression_ratio);
    println!("  duration      {:.2} s  ({:.1} MB/s)", s.duration_secs, s.mb_per_s);
    if let Some(r) = &s.retention {
        println!("  retention     {r} (applied by the cluster)");
    }
    if !s.warnings.is_empty() {
        println!("  warnings      {} (see above; exit code 3)", s.warnings.len());
    }
}
