//! `exclave-agent`: snapshots register sources and uploads them, encrypted, to embassy nodes.

mod backup;
mod budget;
mod config;
mod daemon;
mod deltas;
mod keys;
mod pipeline;
mod progress;
mod refs;
mod source;
mod stream;
mod wal;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "exclave-agent", version, about = "Exclave backup agent: chunk, deduplicate, encrypt, upload")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tenant keys: create, seal, rotate, split into shares, show.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Take one snapshot of a source and upload it.
    Backup(Box<BackupArgs>),
    /// Run as a daemon, snapshotting each source on its schedule and streaming WAL.
    ///
    /// Takes each source's snapshots on its `schedule`, retrying failures with backoff,
    /// never two of one source at once, and streams the WAL of every `method = "stream"`
    /// PostgreSQL source to the cluster (pg_receivewal on a replication slot; the segment
    /// being written is archived every few seconds). Stops on SIGTERM, after shipping what
    /// the streams hold.
    Run {
        /// Settings file with the sources and their schedules.
        #[arg(long)]
        config: PathBuf,
    },
    /// What the daemon did: per source, last success, next run, failures.
    ///
    /// Exit 0 when the daemon runs and no scheduled source is failing or overdue (due 5 min
    /// ago and not started); 1 otherwise, the daemon being down or never having run included.
    Status {
        /// The daemon's settings file (for `state-dir`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Archive one PostgreSQL WAL file (PostgreSQL's archive_command).
    ///
    /// `archive_command = 'exclave-agent wal-push --config agent.toml --source NAME %p'`.
    /// Exits 0 only once the file is stored on a write quorum and committed, so PostgreSQL
    /// never recycles a segment that is not safe; archiving the same file twice succeeds, a
    /// different file under the same name is refused.
    WalPush {
        #[command(flatten)]
        conn: ConnArgs,
        /// The `postgres` source the WAL belongs to (its base backups are snapshots of it).
        #[arg(long)]
        source: String,
        /// The WAL file (`%p`).
        file: PathBuf,
        /// Also push up to N-1 later segments PostgreSQL has marked ready, in parallel, so
        /// that its next calls return at once (needs `--spool`).
        #[arg(long, default_value_t = 1)]
        ahead: usize,
        /// Where the markers of segments pushed ahead are kept: a directory the server's user
        /// can write (e.g. /var/lib/exclave-agent/wal-ahead).
        #[arg(long)]
        spool: Option<PathBuf>,
    },
    /// Print or compare a database's verification facts (tables, row counts, checksums).
    ///
    /// The same facts are recorded in its snapshots: `--compare` checks a restored database
    /// against them.
    Facts {
        /// A PostgreSQL database (libpq connection string).
        #[arg(long, value_name = "CONNECTION", conflicts_with = "sqlite", required_unless_present = "sqlite")]
        postgres: Option<String>,
        /// A SQLite database file.
        #[arg(long, value_name = "FILE")]
        sqlite: Option<PathBuf>,
        /// Compare with the facts file restored from a snapshot; exit 1 if they differ.
        #[arg(long, value_name = "FACTS.JSON")]
        compare: Option<PathBuf>,
    },
    /// Print a shell completion script: `exclave-agent completions bash > /etc/bash_completion.d/exclave-agent`
    /// (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: exclave::cli::Shell,
    },
    /// Write man pages for the program and each subcommand (`exclave-agent.1`, `exclave-agent-SUBCOMMAND.1`).
    Man {
        /// Where to write them (e.g. /usr/local/share/man/man1).
        #[arg(long, default_value = "man")]
        out: std::path::PathBuf,
    },
}

#[derive(Args, Debug, Default, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Source name (a table of the config, or the name for PATHs given here).
    #[arg(long)]
    pub source: Option<String>,
    /// Paths to back up as the source (instead of the config's).
    pub paths: Vec<PathBuf>,
    /// Back up a PostgreSQL database (libpq connection string) instead of paths.
    #[arg(long, value_name = "CONNECTION")]
    pub postgres: Option<String>,
    /// With --postgres: a base backup for point-in-time restore instead of a pg_dump.
    #[arg(long, requires = "postgres")]
    pub pg_base: bool,
    /// With --postgres: directory holding pg_dump / pg_basebackup [default: PATH].
    #[arg(long, requires = "postgres")]
    pub pg_bin: Option<PathBuf>,
    /// Back up a SQLite database file (copied with the online backup API).
    #[arg(long, value_name = "FILE")]
    pub sqlite: Option<PathBuf>,
    /// Back up the standard output of a shell command.
    #[arg(long, value_name = "SHELL-COMMAND")]
    pub command: Option<String>,
    /// Set by `wal-push`: the WAL file to archive.
    #[arg(skip)]
    pub wal_file: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
    /// FastCDC average chunk size in bytes (min = avg/4, max = avg*4).
    #[arg(long)]
    pub chunk_avg: Option<u32>,
    /// zstd level [default: 2].
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Most plaintext held in memory between read and upload, MiB [default: 32].
    #[arg(long)]
    pub memory_budget_mib: Option<usize>,
    /// Keep delta bases in DIR (one directory per source), so that changed chunks are sent as
    /// deltas on the chunks they replaced [default with --config: STATE-DIR/deltas/SOURCE;
    /// without: no deltas].
    #[arg(long, value_name = "DIR")]
    pub delta_cache: Option<PathBuf>,
    /// Send changed chunks whole (no delta cache is read or written).
    #[arg(long, conflicts_with = "delta_cache")]
    pub no_deltas: bool,
}

/// Where to upload and as whom; the config supplies what the flags do not.
#[derive(Args, Debug, Default, Clone)]
pub struct ConnArgs {
    /// Settings file with named sources (see deploy/agent.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Storage node address (repeatable; the first that answers is used).
    #[arg(long = "node")]
    pub nodes: Vec<SocketAddr>,
    /// PKI directory holding ca.crt and the agent certificate.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Certificate name in the PKI directory (agent:<tenant>:<name>).
    #[arg(long)]
    pub identity: Option<String>,
    /// Tenant key file (raw, or sealed under a passphrase).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// File holding the passphrase of a sealed key file [env: EXCLAVE_PASSPHRASE_FILE; on a terminal: asked].
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

fn main() {
    exclave::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    // The daemon says what it does; one-shot commands only warn.
    exclave::logging::init(if matches!(cli.cmd, Cmd::Run { .. }) { "info" } else { "warn" });
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Completions { shell } => {
            exclave::cli::completions(<Cli as clap::CommandFactory>::command(), shell);
            Ok(0)
        }
        Cmd::Man { out } => {
            exclave::cli::print_man_pages(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(0)
        }
        Cmd::Keys(cmd) => keys::run(cmd),
        Cmd::Run { config } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(daemon::run(config))
        }
        Cmd::Status { config, json } => daemon::status(config.as_deref(), json),
        Cmd::WalPush { conn, source, file, ahead, spool } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(wal_push(conn, source, file, ahead, spool))
        }
        Cmd::Facts { postgres, sqlite, compare } => {
            let now = backup::now_secs();
            // Compared facts are recomputed with the row hash they were recorded with.
            let recorded = match &compare {
                Some(path) => {
                    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                    Some(exclave::facts::DbFacts::from_json(&bytes)?)
                }
                None => None,
            };
            let facts = match (postgres, sqlite) {
                (Some(conn), _) => {
                    let hash = match &recorded {
                        Some(r) => source::postgres::RowHash::from_name(&r.row_hash)?,
                        None => source::postgres::RowHash::HashTextExtended,
                    };
                    source::postgres::current_facts(&conn, now, hash)?
                }
                (None, Some(db)) => source::sqlite::facts(&db, now)?,
                (None, None) => anyhow::bail!("give --postgres or --sqlite"),
            };
            let Some(recorded) = recorded else {
                print!("{}", String::from_utf8_lossy(&facts.to_json()));
                return Ok(0);
            };
            let diffs = recorded.differences(&facts);
            for d in &diffs {
                println!("DIFFERS {d}");
            }
            if diffs.is_empty() {
                println!("OK: {} tables match the facts recorded at snapshot time", recorded.tables.len());
                Ok(0)
            } else {
                println!("FAILED: {} difference(s) from the facts recorded at snapshot time", diffs.len());
                Ok(1)
            }
        }
        Cmd::Backup(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(backup::run(*args))
        }
    }
}

/// `wal-push`: archives `file`, and with `--spool` also pushes ready segments ahead (see
/// `wal::ahead`). The exit code is that of `file`'s push alone.
async fn wal_push(conn: ConnArgs, source: String, file: PathBuf, ahead: usize, spool: Option<PathBuf>) -> Result<i32> {
    let args = |f: PathBuf| BackupArgs {
        conn: conn.clone(),
        source: Some(source.clone()),
        quiet: true,
        wal_file: Some(f),
        ..BackupArgs::default()
    };
    let Some(spool) = spool else { return backup::run(args(file)).await };
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    wal::ahead::drop_older(&spool, &name);
    if wal::ahead::was_pushed(&spool, &name, &file)? {
        println!("archived {name} (pushed ahead, unchanged)");
        return Ok(0);
    }
    let pg_wal = file.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let others = wal::ahead::ready_after(&pg_wal, &name, ahead.saturating_sub(1));
    let pushes = others.into_iter().map(|f| {
        let (a, spool) = (args(f.clone()), spool.clone());
        async move {
            let seg = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let fp = match wal::ahead::fingerprint(&f) {
                Ok(fp) => fp,
                Err(e) => return tracing::debug!(segment = %seg, error = %e, "not pushed ahead"),
            };
            match backup::run(a).await {
                Ok(0) => {
                    if let Err(e) = wal::ahead::record(&spool, &seg, &fp) {
                        tracing::warn!(segment = %seg, error = %e, "pushed ahead, but the marker could not be written");
                    }
                }
                // PostgreSQL will ask for it, and that call reports what is wrong.
                other => tracing::debug!(segment = %seg, result = ?other, "not pushed ahead"),
            }
        }
    });
    let (code, _) = futures::join!(backup::run(args(file)), futures::future::join_all(pushes));
    code
}
