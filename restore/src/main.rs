//! `exclave-restore`: lists, restores and verifies snapshots from any embassy node.
//!
//! Exit codes: 0 everything verified; 1 failure (every damaged file is named); 2 usage.

mod browse;
mod daemon;
mod drill;
mod engine;
mod fetch;
mod history;
mod keys;
mod nodes;
mod pg;
mod pitr;
mod recovery;
mod wal_fetch;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use exclave::client::NodeClient;
use exclave::identity::Identity;
use exclave::keys::{Passphrase, TenantKeys, inspect_key_file, load_key_file};
use exclave::protocol::SnapshotInfo;

use engine::{format_time, human, restore_into, select, snapshot_json};
use exclave::transport::TlsIdentity;

#[derive(Parser)]
#[command(name = "exclave-restore", version, about = "Exclave restore: list, restore and verify snapshots")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the snapshots of the tenant (optionally of one source).
    Snapshots {
        #[command(flatten)]
        conn: Conn,
        /// Only the snapshots of this source.
        #[arg(long)]
        source: Option<String>,
        /// Print the list as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot into a directory, verifying every chunk and file.
    Restore {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        pick: Pick,
        /// Target directory (created if absent; must be empty unless --overwrite).
        #[arg(long)]
        to: PathBuf,
        /// Restore into a non-empty directory, replacing what is in the way.
        #[arg(long)]
        overwrite: bool,
        /// Restore only this file or subtree (a path as `ls` prints it; repeatable). The
        /// directories above it are made too.
        #[arg(long = "include", value_name = "PATH")]
        include: Vec<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Fetch and check every chunk and file of a snapshot; write nothing.
    Verify {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        pick: Pick,
        #[command(flatten)]
        out: Out,
    },
    /// List what a snapshot holds (under PATH), reading only its manifest.
    Ls {
        #[command(flatten)]
        conn: Conn,
        /// Source name, as the agent named it.
        #[arg(long)]
        source: String,
        /// `latest`, or a snapshot id (a unique prefix is enough).
        #[arg(long, default_value = "latest")]
        snapshot: String,
        /// Only this file or directory and what is below it.
        path: Option<String>,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Find files by name in every snapshot of a source: shell wildcards (`*`, `?`, `[...]`)
    /// against the name, or against the whole path when PATTERN has a `/`.
    Find {
        #[command(flatten)]
        conn: Conn,
        /// Source name, as the agent named it.
        #[arg(long)]
        source: String,
        /// Search this snapshot only (id or unique prefix, or `latest`).
        #[arg(long)]
        snapshot: Option<String>,
        /// e.g. `decision-2025-*.xml`, or `documents/*/01/*.xml`.
        pattern: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// What changed between two snapshots of a source: paths added, removed, changed (content
    /// or kind) and changed in mode only. Exit 0 either way.
    Diff {
        #[command(flatten)]
        conn: Conn,
        /// Source name, as the agent named it.
        #[arg(long)]
        source: String,
        /// The older snapshot (id or unique prefix).
        from: String,
        /// The newer snapshot (id, unique prefix, or `latest`).
        #[arg(default_value = "latest")]
        to: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Point-in-time restore of PostgreSQL into a new data directory.
    ///
    /// Lays out the newest base backup taken before TIME as a data directory that replays
    /// the archived WAL up to TIME, then promotes (`--target-time latest`, the default: the
    /// newest base, and every archived WAL file).
    Pitr {
        #[command(flatten)]
        conn: Conn,
        /// The `postgres` source (method = "base") whose WAL is archived with wal-push.
        #[arg(long)]
        source: String,
        /// Recover the transactions committed before this time (UTC, `YYYY-MM-DD HH:MM:SS`), or
        /// `latest`: everything archived.
        #[arg(long, default_value = "latest")]
        target_time: String,
        /// Use this base backup (id or unique prefix) instead of the newest before TIME.
        #[arg(long)]
        base: Option<String>,
        /// The data directory to create (absent or empty).
        #[arg(long)]
        to: PathBuf,
        /// Requests in flight (each fetches up to 16 chunks).
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        #[command(flatten)]
        out: Out,
    },
    /// Fetch one archived WAL file (PostgreSQL's restore_command; `pitr` writes it).
    ///
    /// Exits 1 when the archive does not hold FILE (PostgreSQL then ends recovery there), 255
    /// when it could not be fetched (no node, a damaged file: PostgreSQL stops recovery
    /// rather than promote without it).
    WalFetch {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        source: String,
        /// WAL file name (`%f`).
        file: String,
        /// Where to write it (`%p`).
        dest: PathBuf,
        /// When fetching from the cluster, also fetch the next N-1 segments into `--spool`,
        /// from where the following calls are served without the network (`pitr` sets 8).
        #[arg(long, default_value_t = 0)]
        prefetch: usize,
        /// The prefetch spool: a directory the calling server's user can write.
        #[arg(long)]
        spool: Option<PathBuf>,
    },
    /// Tenant keys: rebuild one from its holders' shares, show one.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// Restore drill: restore into scratch space, verify every chunk and file, check the
    /// databases against the facts recorded at snapshot time, measure RTO and RPO, write a
    /// report, and record the result in the cluster.
    ///
    /// Exit code 0 PASS, 1 FAIL, 3 INCOMPLETE (something could not be checked).
    Drill {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        pick: Pick,
        /// Where scratch space is made (removed at the end unless --keep) [default: the temp dir].
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// PostgreSQL's bin directory, for loading dumps into a scratch server [default: the
        /// newest under /usr/lib/postgresql, else PATH].
        #[arg(long)]
        pg_bin: Option<PathBuf>,
        /// Keep the restored data, and say where.
        #[arg(long)]
        keep: bool,
        /// Write the report here: drill-SOURCE-TIME.json and .md.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Fail the drill when recovery takes longer than this, seconds.
        #[arg(long)]
        rto_target: Option<f64>,
        /// Fail the drill when the snapshot is older than this at the start, seconds.
        #[arg(long)]
        rpo_target: Option<i64>,
        /// Do not record the result in the cluster.
        #[arg(long)]
        no_record: bool,
        /// For a base backup (a `postgres` source with method = "base"): replay the archived
        /// WAL up to this time (UTC, `YYYY-MM-DD HH:MM:SS`) instead of to the end of the
        /// archive; with `--snapshot latest`, the newest base backup started before it is used.
        #[arg(long)]
        target_time: Option<String>,
        /// For a base backup: fail the drill when WAL replay has not finished after this many
        /// seconds.
        #[arg(long, default_value_t = 3600)]
        recovery_timeout: u64,
        #[command(flatten)]
        out: Out,
    },
    /// The drill daemon: runs each source's drill of `drills.toml` on its cron schedule (see
    /// deploy/drills.example.toml); stops cleanly on SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// What the drill daemon did: each source's last verdict, RTO, next drill. Exit 0 when the
    /// daemon runs, nothing is overdue or unable to run, and every drill passed; 1 otherwise.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The tenant's hash-chained history (commits, forgets, locks, holds, audited sessions).
    #[command(subcommand)]
    History(HistoryCmd),
    /// The restore drills the cluster has recorded for the tenant.
    Drills {
        #[command(flatten)]
        conn: Conn,
        /// Only the drills of this source.
        #[arg(long)]
        source: Option<String>,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `exclave-restore completions bash > /etc/bash_completion.d/exclave-restore`
    /// (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: exclave::cli::Shell,
    },
    /// Write man pages for the program and each subcommand (`exclave-restore.1`, `exclave-restore-SUBCOMMAND.1`).
    Man {
        /// Where to write them (e.g. /usr/local/share/man/man1).
        #[arg(long, default_value = "man")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum HistoryCmd {
    /// Recompute the chain as this node holds it and check the catalog against it; exit 1
    /// naming the first break. Record the printed head outside the cluster and pass it back
    /// later with --expect-head to prove nothing before it was rewritten.
    Verify {
        #[command(flatten)]
        conn: Conn,
        /// Check only this source's snapshots (and its WAL) against the chain.
        #[arg(long)]
        source: Option<String>,
        /// A head recorded earlier (SEQ:HASH): it must still be in the chain.
        #[arg(long)]
        expect_head: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct Conn {
    /// Storage node address (repeatable: the first that answers is used, and the others serve
    /// what it fails to: a damaged chunk, or everything once it stops answering).
    #[arg(long = "node", required = true)]
    nodes: Vec<SocketAddr>,
    /// PKI directory holding ca.crt and the restore certificate.
    #[arg(long)]
    pki: PathBuf,
    /// Certificate name in the PKI directory (restore:<tenant>).
    #[arg(long)]
    identity: String,
    /// Tenant key file (needed to decrypt; `snapshots` works without it): raw, sealed, or
    /// rebuilt from shares with `keys combine`.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// File holding the passphrase of a sealed key file [env: EXCLAVE_PASSPHRASE_FILE; on a terminal: asked].
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Read the snapshot list only once the node has caught up with everything the cluster's
    /// leader has committed (Raft ReadIndex); fails if no majority is reachable. Without it,
    /// the node answers from its own catalog and warns if that may be stale.
    #[arg(long)]
    consistent: bool,
}

#[derive(Args)]
struct Pick {
    /// Source name, as the agent named it.
    #[arg(long)]
    source: String,
    /// `latest`, or a snapshot id (a unique prefix is enough).
    #[arg(long, default_value = "latest")]
    snapshot: String,
    /// Requests in flight (each fetches up to 16 chunks).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

#[derive(Args)]
struct Out {
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    exclave::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    exclave::logging::init(if matches!(cli.cmd, Cmd::Run { .. }) { "info" } else { "warn" });
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn connect(conn: &Conn) -> Result<(NodeClient, Arc<TlsIdentity>)> {
    let tls = TlsIdentity::load(&conn.pki, &conn.identity)
        .with_context(|| format!("loading identity {:?}", conn.identity))?;
    if !matches!(tls.identity, Identity::Restore { .. }) {
        bail!("certificate {} is {}, not a restore identity", conn.identity, tls.identity);
    }
    if let Some(w) = tls.check_validity(&conn.identity)? {
        eprintln!("warning: {w}");
    }
    let client = exclave::client::connect_any(&conn.nodes, &tls).await?;
    Ok((client, Arc::new(tls)))
}

/// Lists snapshots, after a read barrier with `--consistent`; warns when the node's catalog
/// may be stale.
async fn list(client: &NodeClient, conn: &Conn, source: Option<&str>) -> Result<Vec<SnapshotInfo>> {
    if conn.consistent {
        client.read_barrier().await.context("--consistent: the node could not confirm its catalog is current")?;
    }
    let (list, stale) = client.list_snapshots(source).await?;
    if let Some(why) = stale {
        eprintln!("warning: {why}");
    }
    Ok(list)
}

/// The snapshot to read. One the node does not list may have been committed through another
/// node and not be applied here yet: after a read barrier (the node catches up with what the
/// leader has committed) the list is read once more before giving up.
async fn choose(client: &NodeClient, conn: &Conn, source: &str, which: &str) -> Result<SnapshotInfo> {
    match select(&list(client, conn, Some(source)).await?, source, which) {
        Err(e) if !conn.consistent => {
            if client.read_barrier().await.is_err() {
                return Err(e);
            }
            select(&list(client, conn, Some(source)).await?, source, which)
        }
        r => r,
    }
}

fn keys(conn: &Conn, tls: &TlsIdentity) -> Result<TenantKeys> {
    let path = conn.key_file.as_ref().context("--key-file is required to decrypt the snapshot")?;
    let keys = load_key_file(path, &Passphrase::from_flag(conn.passphrase_file.clone()))?;
    if tls.identity.tenant() != Some(keys.tenant.as_str()) {
        bail!("key file {} is for tenant {:?}, the certificate for {}", path.display(), keys.tenant, tls.identity);
    }
    Ok(keys)
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Completions { shell } => {
            exclave::cli::completions(<Cli as clap::CommandFactory>::command(), shell);
            Ok(0)
        }
        Cmd::Man { out } => {
            exclave::cli::print_man_pages(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(0)
        }
        Cmd::Snapshots { conn, source, json } => {
            let (client, _) = connect(&conn).await?;
            let list = list(&client, &conn, source.as_deref()).await?;
            client.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.iter().map(snapshot_json).collect::<Vec<_>>())?);
            } else {
                println!(
                    "{:<17} {:<21} {:<16} {:>8} {:>12} {:>12}  AGENT",
                    "ID", "TIME (UTC)", "SOURCE", "FILES", "SIZE", "STORED"
                );
                for s in &list {
                    // Snapshots of current agents tell the node neither (they are in the
                    // encrypted manifest: `restore` and `browse` show them).
                    let files =
                        if s.files == 0 && s.hostname.is_empty() { "-".to_string() } else { s.files.to_string() };
                    let host = if s.hostname.is_empty() { String::new() } else { format!("@{}", s.hostname) };
                    println!(
                        "{:<17} {:<21} {:<16} {:>8} {:>12} {:>12}  {}{}",
                        s.id,
                        format_time(s.time),
                        s.source,
                        files,
                        human(s.logical_bytes),
                        human(s.stored_bytes),
                        s.agent,
                        host
                    );
                }
                println!("{} snapshot(s)", list.len());
            }
            Ok(0)
        }
        Cmd::Restore { conn, pick, to, overwrite, include, out } => {
            let guard = writer::check_target(&to, overwrite)?;
            let include: Vec<Vec<u8>> = include.into_iter().map(String::into_bytes).collect();
            let code = read_back(conn, pick, Some(to), overwrite, &include, out).await?;
            guard.keep();
            Ok(code)
        }
        Cmd::Verify { conn, pick, out } => read_back(conn, pick, None, false, &[], out).await,
        Cmd::Ls { conn, source, snapshot, path, json } => ls(conn, &source, &snapshot, path, json).await,
        Cmd::Find { conn, source, snapshot, pattern, json } => find(conn, &source, snapshot, &pattern, json).await,
        Cmd::Diff { conn, source, from, to, json } => diff(conn, &source, &from, &to, json).await,
        Cmd::Pitr { conn, source, target_time, base, to, parallel, out } => {
            run_pitr(conn, &source, &target_time, base.as_deref(), &to, parallel, out).await
        }
        Cmd::WalFetch { conn, source, file, dest, prefetch, spool } => {
            let ask = wal_fetch::Ask {
                source: &source,
                file: &file,
                dest: &dest,
                prefetch,
                spool: spool.as_deref(),
                consistent: conn.consistent,
            };
            match wal_fetch::run(ask, || open(&conn)).await {
                Ok(code) => Ok(code),
                // PostgreSQL takes exit 1 for "not archived" and would end recovery there,
                // promoting without the WAL it could not get; above 125 it stops recovery.
                Err(e) => {
                    eprintln!("error: {e:#}");
                    eprintln!("exit {WAL_FETCH_FAILED}: recovery stops here instead of ending early without this file");
                    Ok(WAL_FETCH_FAILED)
                }
            }
        }
        Cmd::Keys(cmd) => keys::run(cmd),
        Cmd::Drill {
            conn,
            pick,
            scratch,
            pg_bin,
            keep,
            report,
            rto_target,
            rpo_target,
            no_record,
            target_time,
            recovery_timeout,
            out,
        } => {
            let target_time = match target_time.as_deref() {
                Some(t) => pitr::parse_target(t)?,
                None => None,
            };
            let opts = drill::Options {
                target_time,
                recovery_timeout: std::time::Duration::from_secs(recovery_timeout),
                scratch,
                pg_bin,
                report,
                keep,
                parallel: pick.parallel,
                rto_target_secs: rto_target,
                rpo_target_secs: rpo_target,
            };
            run_drill(conn, pick, opts, !no_record, out).await
        }
        Cmd::Drills { conn, source, json } => list_drills(conn, source, json).await,
        Cmd::Run { config } => daemon::run(config).await,
        Cmd::Status { config, json } => daemon::status(&config, json),
        Cmd::History(HistoryCmd::Verify { conn, source, expect_head, json }) => {
            verify_history(conn, source, expect_head, json).await
        }
    }
}

async fn run_drill(conn: Conn, pick: Pick, opts: drill::Options, record: bool, out: Out) -> Result<i32> {
    let started = Instant::now();
    let started_at = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (client, tls) = connect(&conn).await?;
    let keys = keys(&conn, &tls)?;
    let mut phases =
        vec![drill::Phase { name: "connect and open the key".into(), secs: started.elapsed().as_secs_f64() }];
    let t = Instant::now();
    let node = client.addr();
    let snap = match opts.target_time {
        // The newest base backup that can reach the target.
        Some(target) if pick.snapshot == "latest" => {
            pitr::select_base(&list(&client, &conn, Some(&pick.source)).await?, Some(target), None)?.clone()
        }
        _ => choose(&client, &conn, &pick.source, &pick.snapshot).await?,
    };
    engine::name_snapshot(&client, &snap).await?;
    phases.push(drill::Phase { name: "find the snapshot".into(), secs: t.elapsed().as_secs_f64() });
    let nodes = Arc::new(nodes::Nodes::new(client, &conn.nodes, tls.clone()));
    nodes.spread();
    let mut report =
        drill::run(nodes.clone(), node.to_string(), &keys, &snap, started, started_at, phases, &opts).await?;
    if record {
        match drill::record(nodes.primary(), &report, &snap, started_at).await {
            Ok(()) => report.recorded = true,
            Err(e) => eprintln!("warning: the drill's result could not be recorded in the cluster: {e:#}"),
        }
    }
    let files = match &opts.report {
        Some(dir) => Some(drill::write_report(dir, &report, started_at)?),
        None => None,
    };
    if out.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("drill of {} ({}): {}", report.source, report.tenant, report.verdict);
        println!("  {}", report.reason);
        println!("  snapshot   {} taken {}, from {}", report.snapshot, report.snapshot_time, report.node);
        println!(
            "  RTO        {:.1} s{}",
            report.rto_secs,
            report.rto_target_secs.map(|t| format!(" (target {t} s)")).unwrap_or_default()
        );
        println!(
            "  RPO        {} s{}",
            report.rpo_secs,
            report.rpo_target_secs.map(|t| format!(" (target {t} s)")).unwrap_or_default()
        );
        if let Some(rec) = &report.recovery {
            println!(
                "  recovery   to {}: {} WAL file(s), replayed in {:.1} s, newest transaction committed {}",
                rec.target,
                rec.wal_files_fetched,
                rec.replay_secs,
                rec.newest_transaction_text.as_deref().unwrap_or("(none replayed)")
            );
            if let Some(gap) = rec.gap_to_archive_secs {
                println!("             {gap:.0} s before the newest WAL file of the archive was stored");
            }
        }
        for c in &report.checks {
            println!("  {:<8}   {}: {}", c.result.to_uppercase(), c.name, c.detail);
            for p in &c.problems {
                println!("             - {p}");
            }
        }
        if let Some(k) = &report.kept_at {
            println!("  kept at    {k}");
        }
        if let Some((j, m)) = &files {
            println!("  report     {} and {}", m.display(), j.display());
        }
        if report.recorded {
            println!("  recorded in the cluster (exclave-restore drills)");
        }
    }
    if let Ok(n) = Arc::try_unwrap(nodes) {
        n.close().await;
    }
    Ok(match report.verdict.as_str() {
        "PASS" => 0,
        "INCOMPLETE" => 3,
        _ => 1,
    })
}

async fn verify_history(conn: Conn, source: Option<String>, expect: Option<String>, json: bool) -> Result<i32> {
    let expected = expect.as_deref().map(history::parse_head).transpose()?;
    let (client, _) = connect(&conn).await?;
    if conn.consistent {
        client.read_barrier().await.context("--consistent: the node could not confirm its catalog is current")?;
    }
    // The chain, the listing, and the chain again: a commit or forget landing in between would
    // look like a break, so the listing is read again until the chain did not move meanwhile.
    let mut events = Vec::new();
    let mut head = history::fetch(&client, &mut events).await?;
    let mut listed = list(&client, &conn, None).await?;
    let mut drills = drill_records(&client).await?;
    for _ in 0..5 {
        let seen = events.len();
        head = history::fetch(&client, &mut events).await?;
        if events.len() == seen {
            break;
        }
        listed = list(&client, &conn, None).await?;
        drills = drill_records(&client).await?;
    }
    let node = client.addr();
    client.close().await;
    let v = history::verify(&events, &head, expected.as_ref(), &listed, &drills, source.as_deref());
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("history of the tenant on {node}: {} events, head {}:{}", v.events, v.head_seq, v.head_hash);
        println!(
            "  {} snapshots checked against it ({} from before the history was kept)",
            v.snapshots_checked, v.before_history
        );
        println!(
            "  {} drill records checked against it ({} from before drills were chained)",
            v.drills_checked, v.drills_before_history
        );
        match &v.first_break {
            None => println!("  OK: the chain holds and the catalog matches it"),
            Some(why) => println!("  BROKEN: {why}"),
        }
    }
    Ok(if v.ok { 0 } else { 1 })
}

/// Every drill record of the tenant the node holds.
async fn drill_records(client: &exclave::client::NodeClient) -> Result<Vec<exclave::protocol::DrillRecord>> {
    match client.call(&[exclave::protocol::Request::Drills { source: None }]).await? {
        exclave::protocol::Reply::Drills(list) => Ok(list),
        _ => bail!("unexpected reply to drills"),
    }
}

async fn list_drills(conn: Conn, source: Option<String>, json: bool) -> Result<i32> {
    let (client, _) = connect(&conn).await?;
    let reply = client.call(&[exclave::protocol::Request::Drills { source }]).await;
    client.close().await;
    let exclave::protocol::Reply::Drills(list) = reply? else { bail!("unexpected reply to drills") };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<21} {:<16} {:<11} {:>8} {:>10}  {:<17} by",
        "STARTED (UTC)", "SOURCE", "VERDICT", "RTO", "RPO", "SNAPSHOT"
    );
    for d in &list {
        println!(
            "{:<21} {:<16} {:<11} {:>6.1} s {:>8} s  {:<17} {} via {}",
            format_time(d.started),
            d.source,
            d.verdict,
            d.rto_ms as f64 / 1000.0,
            d.rpo_secs,
            d.snapshot,
            d.identity,
            d.node
        );
    }
    println!("{} drill(s)", list.len());
    Ok(0)
}

/// `wal-fetch`'s exit code when it failed (not: the file is not archived, exit 1).
const WAL_FETCH_FAILED: i32 = 255;

/// Segments a `pitr` restore command fetches per trip to the cluster, and where it keeps them.
const PREFETCH: usize = 8;
const PREFETCH_SPOOL: &str = "exclave-wal-prefetch";

async fn run_pitr(
    conn: Conn,
    source: &str,
    target_time: &str,
    base: Option<&str>,
    to: &std::path::Path,
    parallel: usize,
    out: Out,
) -> Result<i32> {
    let started = Instant::now();
    let target = pitr::parse_target(target_time)?;
    let guard = writer::check_target(to, false)?;
    // PostgreSQL runs the restore command with no terminal: a sealed key needs its passphrase
    // in a file the command can name.
    let passphrase_file = Passphrase::from_flag(conn.passphrase_file.clone()).file();
    if let Some(k) = &conn.key_file
        && inspect_key_file(k)?.sealed.is_some()
        && passphrase_file.is_none()
    {
        bail!(
            "{} is sealed, and PostgreSQL's restore_command cannot be asked for a passphrase: give --passphrase-file FILE \
             (it is named in the restore command), or unseal a copy of the key on a private tmpfs",
            k.display()
        );
    }
    let to = std::path::absolute(to)?;
    let (client, tls) = connect(&conn).await?;
    let keys = keys(&conn, &tls)?;
    let node = client.addr();
    let bases = list(&client, &conn, Some(source)).await?;
    let snap = pitr::select_base(&bases, target, base)?.clone();
    let wal = list(&client, &conn, Some(&exclave::wal::catalog_source(source)?)).await?;
    let newest_wal = wal.iter().map(|s| s.time).max();
    let client = Arc::new(nodes::Nodes::new(client, &conn.nodes, tls.clone()));
    client.spread();
    let w = writer::Writer::new(Some(to.clone()), false).strip_root("pgdata");
    let (_, report) = restore_into(&client, &keys, &snap, w, parallel).await?;
    if let Some(f) = report.failures.first() {
        bail!("the base backup {} failed verification at {}: {}", snap.id, f.path, f.error);
    }
    // The restore command repeats this invocation's connection settings, with absolute paths.
    let exe = std::env::current_exe().context("locating exclave-restore")?;
    let mut argv: Vec<String> = vec![exe.display().to_string(), "wal-fetch".into()];
    for n in &conn.nodes {
        argv.extend(["--node".into(), n.to_string()]);
    }
    argv.extend(["--pki".into(), std::path::absolute(&conn.pki)?.display().to_string()]);
    argv.extend(["--identity".into(), conn.identity.clone()]);
    if let Some(k) = &conn.key_file {
        argv.extend(["--key-file".into(), std::path::absolute(k)?.display().to_string()]);
    }
    if let Some(p) = &passphrase_file {
        argv.extend(["--passphrase-file".into(), std::path::absolute(p)?.display().to_string()]);
    }
    argv.extend(["--source".into(), source.to_string()]);
    // Segments are fetched eight at a time into a spool in the data directory, removed when
    // recovery ends.
    let spool = to.join(PREFETCH_SPOOL);
    argv.extend(["--prefetch".into(), PREFETCH.to_string(), "--spool".into(), spool.display().to_string()]);
    let mut settings = pitr::recovery_settings(&argv, target);
    settings.push_str(&pitr::remove_at_end(&spool));
    pitr::prepare_data_dir(&to, &settings)?;
    let secs = started.elapsed().as_secs_f64();
    let target_text = target.map(pitr::pg_time).unwrap_or_else(|| "the end of the archive".into());
    let t = target.map(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0));
    let archive_short = t.is_some_and(|t| newest_wal.is_none_or(|n| n < t));
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "action": "pitr", "node": node.to_string(), "base": snapshot_json(&snap),
                "target_time": target_text, "data_directory": to.display().to_string(),
                "wal_files_archived": wal.len(), "newest_wal_time": newest_wal,
                "archive_reaches_target": !archive_short,
                "files": report.files, "bytes": report.bytes, "duration_secs": secs,
            }))?
        );
    } else {
        println!("prepared {} for point-in-time recovery to {target_text}", to.display());
        println!("  base backup  {} taken {} ({})", snap.id, format_time(snap.time), human(report.bytes));
        println!(
            "  WAL archive  {} file(s), newest stored {}",
            wal.len(),
            newest_wal.map(format_time).unwrap_or_else(|| "never".into())
        );
        println!("  duration     {secs:.2} s");
        println!(
            "next: start PostgreSQL on it (pg_ctl -D {} start); it replays archived WAL to the target, then promotes",
            to.display()
        );
    }
    if archive_short {
        eprintln!(
            "warning: no WAL file was archived after the target time; recovery will stop at the end of the archive, \
             which may be before {target_text}"
        );
    }
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    guard.keep();
    Ok(0)
}

async fn read_back(
    conn: Conn,
    pick: Pick,
    target: Option<PathBuf>,
    overwrite: bool,
    include: &[Vec<u8>],
    out: Out,
) -> Result<i32> {
    let started = Instant::now();
    let (client, tls) = connect(&conn).await?;
    let keys = keys(&conn, &tls)?;
    let node = client.addr();
    let snap = choose(&client, &conn, &pick.source, &pick.snapshot).await?;
    engine::name_snapshot(&client, &snap).await?;
    let client = Arc::new(nodes::Nodes::new(client, &conn.nodes, tls.clone()));
    client.spread();
    let (header, report) = engine::restore_filtered(
        &client,
        &keys,
        &snap,
        writer::Writer::new(target.clone(), overwrite),
        pick.parallel,
        include,
        true,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let verb = if target.is_some() { "restored" } else { "verified" };
    // On stderr in every mode: an operator reads them even when the report goes to a file.
    for b in client.bad_serves() {
        eprintln!(
            "warning: node {} served chunk {} damaged ({}); {}",
            b.node,
            b.chunk,
            b.error,
            b.recovered_from
                .map(|g| format!("a good copy came from {g}"))
                .unwrap_or_else(|| "no other node had one".into())
        );
    }
    for f in client.failovers() {
        eprintln!(
            "warning: node {} stopped answering ({}); {}",
            f.node,
            f.error,
            f.continued_from.map(|n| format!("continued from {n}")).unwrap_or_else(|| "no other node answered".into())
        );
    }
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "action": verb, "node": node.to_string(), "snapshot": snapshot_json(&snap),
                "target": target.as_ref().map(|t| t.display().to_string()),
                "chunker": { "min": header.chunker.min_size, "avg": header.chunker.avg_size, "max": header.chunker.max_size },
                "hostname": header.hostname,
                "files": report.files, "dirs": report.dirs, "symlinks": report.symlinks,
                "bytes": report.bytes, "chunks": report.chunks, "duration_secs": secs,
                "mb_per_s": report.bytes as f64 / 1e6 / secs, "failures": report.failures,
                "ok": report.failures.is_empty(),
                "bad_serves": client.bad_serves(), "failovers": client.failovers(), "served": client.served(),
            }))?
        );
    } else {
        for f in &report.failures {
            eprintln!("FAILED {}: {}", f.path, f.error);
        }
        println!(
            "{verb} snapshot {} of {} ({}) from {node}{}",
            snap.id,
            snap.source,
            format_time(snap.time),
            target.as_ref().map(|t| format!(" into {}", t.display())).unwrap_or_default()
        );
        if !header.hostname.is_empty() {
            println!("  taken on   {} by agent {}", header.hostname, snap.agent);
        }
        println!("  files      {} ({} dirs, {} symlinks)", report.files, report.dirs, report.symlinks);
        println!("  bytes      {}  in {} chunks", human(report.bytes), report.chunks);
        println!("  duration   {secs:.2} s  ({:.1} MB/s)", report.bytes as f64 / 1e6 / secs);
        if report.failures.is_empty() {
            println!("  result     OK: every chunk authenticated, every file's BLAKE3 matches");
        } else {
            println!("  result     FAILED: {} file(s) could not be {verb} (listed above)", report.failures.len());
        }
    }
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
    Ok(if report.failures.is_empty() { 0 } else { 1 })
}

/// Connects, opens the key, and reads from every named node.
async fn open(conn: &Conn) -> Result<(Arc<nodes::Nodes>, TenantKeys)> {
    let (client, tls) = connect(conn).await?;
    let keys = keys(conn, &tls)?;
    Ok((Arc::new(nodes::Nodes::new(client, &conn.nodes, tls)), keys))
}

async fn close(nodes: Arc<nodes::Nodes>) {
    if let Ok(n) = Arc::try_unwrap(nodes) {
        n.close().await;
    }
}

async fn ls(conn: Conn, source: &str, which: &str, path: Option<String>, json: bool) -> Result<i32> {
    let (nodes, keys) = open(&conn).await?;
    let snap = choose(nodes.primary(), &conn, source, which).await?;
    let prefix = path.clone().unwrap_or_default().into_bytes();
    let mut listed = Vec::new();
    fetch::each_entry(&nodes, &keys, &snap, |e| {
        if browse::is_under(&e.path, &prefix) {
            listed.push(browse::Listed::of(e));
        }
    })
    .await?;
    close(nodes).await;
    if listed.is_empty() && path.is_some() {
        bail!("snapshot {} holds nothing under {}", snap.id, path.unwrap_or_default());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(0);
    }
    for l in &listed {
        println!(
            "{:<7} {} {:>12} {}  {}{}",
            l.kind,
            l.mode,
            l.size,
            format_time(l.mtime),
            l.path,
            l.target.as_ref().map(|t| format!(" -> {t}")).unwrap_or_default()
        );
    }
    let files = listed.iter().filter(|l| l.kind == "file").count();
    println!(
        "{} entries ({files} files, {}) in snapshot {} of {} ({})",
        listed.len(),
        human(listed.iter().map(|l| l.size).sum()),
        snap.id,
        snap.source,
        format_time(snap.time)
    );
    Ok(0)
}

async fn find(conn: Conn, source: &str, which: Option<String>, pattern: &str, json: bool) -> Result<i32> {
    let pattern = browse::Pattern::new(pattern).with_context(|| format!("pattern {pattern:?}"))?;
    let (nodes, keys) = open(&conn).await?;
    let mut snaps = match which {
        Some(w) => vec![choose(nodes.primary(), &conn, source, &w).await?],
        None => list(nodes.primary(), &conn, Some(source)).await?,
    };
    snaps.sort_by_key(|s| std::cmp::Reverse((s.time, s.commit_seq)));
    let mut found = Vec::new();
    for snap in &snaps {
        fetch::each_entry(&nodes, &keys, snap, |e| {
            if pattern.matches(e) {
                found.push((snap.id.clone(), snap.time, browse::Listed::of(e)));
            }
        })
        .await?;
    }
    close(nodes).await;
    if json {
        let v: Vec<serde_json::Value> = found
            .iter()
            .map(|(id, t, l)| serde_json::json!({"snapshot": id, "snapshot_time": t, "entry": l}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (id, t, l) in &found {
            println!("{id:<17} {:<21} {:>12}  {}", format_time(*t), l.size, l.path);
        }
        println!("{} match(es) in {} snapshot(s) of {source}", found.len(), snaps.len());
    }
    Ok(if found.is_empty() { 1 } else { 0 })
}

async fn diff(conn: Conn, source: &str, from: &str, to: &str, json: bool) -> Result<i32> {
    let (nodes, keys) = open(&conn).await?;
    let (a, b) =
        (choose(nodes.primary(), &conn, source, from).await?, choose(nodes.primary(), &conn, source, to).await?);
    let mut shapes = [std::collections::BTreeMap::new(), std::collections::BTreeMap::new()];
    for (snap, map) in [&a, &b].into_iter().zip(shapes.iter_mut()) {
        fetch::each_entry(&nodes, &keys, snap, |e| {
            map.insert(e.path.clone(), browse::Shape::of(e));
        })
        .await?;
    }
    close(nodes).await;
    let changes = browse::diff(&shapes[0], &shapes[1]);
    let count = |c: &str| changes.iter().filter(|x| x.change == c).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "from": snapshot_json(&a), "to": snapshot_json(&b), "changes": changes,
                "added": count("added"), "removed": count("removed"), "changed": count("changed"), "mode": count("mode"),
            }))?
        );
    } else {
        for c in &changes {
            let size = |s: Option<u64>| s.map(|s| s.to_string()).unwrap_or_default();
            match c.change {
                "added" => println!("+ {} ({} bytes)", c.path, size(c.new_size)),
                "removed" => println!("- {}", c.path),
                "changed" => println!("M {} ({} -> {} bytes)", c.path, size(c.old_size), size(c.new_size)),
                _ => println!("m {} (mode)", c.path),
            }
        }
        println!(
            "{} -> {}: {} added, {} removed, {} changed, {} mode only",
            a.id,
            b.id,
            count("added"),
            count("removed"),
            count("changed"),
            count("mode")
        );
    }
    Ok(0)
}
