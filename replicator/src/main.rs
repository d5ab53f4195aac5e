//! `exclave-replicator`: the embassy storage node, and the cluster's PKI tooling.

mod audit;
mod audit_cmd;
mod catalog;
mod chunk_store;
mod cluster;
mod config;
mod consensus;
mod gc;
mod gc_cmd;
mod metrics;
mod node;
mod peers;
mod pki_cmd;
mod quota_cmd;
mod raft_log;
mod replication;
mod retention;
mod revocation;
mod scrub;
mod scrub_cmd;
mod server;
mod snapshot;
mod store;
mod test_hooks;
mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use exclave::client::NodeClient;
use exclave::identity::Identity;
use exclave::protocol::Reply;
use exclave::transport::{self, TlsIdentity};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "exclave-replicator", version, about = "Exclave embassy storage node and cluster PKI tooling")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the storage node (QUIC server, RocksDB store, Raft member) until SIGTERM.
    Run(config::RunArgs),
    /// Cluster operations: status of every member, add or remove a node.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Retention policies of the tenants' sources (administrator).
    #[command(subcommand)]
    Retention(retention::RetentionCmd),
    /// Per-tenant storage quotas (administrator): set, clear, show.
    #[command(subcommand)]
    Quota(quota_cmd::QuotaCmd),
    /// The cluster CA and its certificates: init, issue, renew, revoke, list.
    #[command(subcommand)]
    Pki(pki_cmd::PkiCmd),
    /// Ask a node for its status (needs an admin or node identity).
    Status(StatusArgs),
    /// Start a scrub pass on a node now: every chunk re-read and checked, damaged ones
    /// replaced from peers (admin). Exit 1 when chunks are unrepairable.
    Scrub(scrub_cmd::ScrubArgs),
    /// Run a garbage-collection pass now (admin): chunks no snapshot references are condemned
    /// and, past their grace, swept on every node; the node asked also gives its space back.
    Gc(gc_cmd::GcArgs),
    /// Read the audit log: every session of a restore or administrator identity, who, when,
    /// what it named and how much it read (administrators; a restore identity its own tenant).
    Audit(audit_cmd::AuditArgs),
    /// Print a shell completion script: `exclave-replicator completions bash > /etc/bash_completion.d/exclave-replicator`
    /// (or zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: exclave::cli::Shell,
    },
    /// Write man pages for the program and each subcommand (`exclave-replicator.1`, `exclave-replicator-SUBCOMMAND.1`).
    Man {
        /// Where to write them (e.g. /usr/local/share/man/man1).
        #[arg(long, default_value = "man")]
        out: std::path::PathBuf,
    },
}

#[derive(Args)]
struct StatusArgs {
    /// Node address.
    #[arg(long)]
    node: SocketAddr,
    /// PKI directory holding ca.crt and the admin certificate.
    #[arg(long)]
    pki: PathBuf,
    /// Certificate name in the PKI directory (an admin or node identity).
    #[arg(long, default_value = "admin")]
    identity: String,
    /// Print the status as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    exclave::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    exclave::logging::init("info,quinn=warn,rustls=warn");
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.cmd {
        Cmd::Completions { shell } => {
            exclave::cli::completions(<Cli as clap::CommandFactory>::command(), shell);
            Ok(0)
        }
        Cmd::Man { out } => {
            exclave::cli::print_man_pages(<Cli as clap::CommandFactory>::command(), &out)?;
            Ok(0)
        }
        Cmd::Pki(c) => rt.block_on(pki_cmd::run(c)).map(|()| 0),
        Cmd::Run(args) => {
            let cfg = config::NodeConfig::resolve(args)?;
            rt.block_on(run_node(cfg)).map(|()| 0)
        }
        Cmd::Status(a) => rt.block_on(status(a)).map(|()| 0),
        Cmd::Cluster(c) => rt.block_on(cluster::run(c)).map(|()| 0),
        Cmd::Retention(c) => rt.block_on(retention::run(c)).map(|()| 0),
        Cmd::Scrub(a) => rt.block_on(scrub_cmd::run(a)),
        Cmd::Gc(a) => rt.block_on(gc_cmd::run(a)),
        Cmd::Audit(a) => rt.block_on(audit_cmd::run(a)),
        Cmd::Quota(c) => rt.block_on(quota_cmd::run(c)).map(|()| 0),
    }
}

async fn run_node(cfg: config::NodeConfig) -> Result<()> {
    let tls = TlsIdentity::load(&cfg.pki, &cfg.identity)
        .with_context(|| format!("loading identity {:?} from {}", cfg.identity, cfg.pki.display()))?;
    match &tls.identity {
        Identity::Node { id } if *id == cfg.name => {}
        Identity::Node { id } => {
            bail!("certificate {} is for node {id}, but this node is named {}", cfg.identity, cfg.name)
        }
        other => bail!("certificate {} is for {other}, not a node", cfg.identity),
    }
    let tls = Arc::new(tls);
    let store = Arc::new(
        store::Store::open(&cfg.data).with_context(|| format!("opening the store in {}", cfg.data.display()))?,
    );
    let me = catalog::raft_id(&cfg.name);
    let mut founders = vec![(me, catalog::Member { name: cfg.name.clone(), addr: cfg.advertise.to_string() })];
    founders.extend(
        cfg.peers.iter().map(|(n, a)| (catalog::raft_id(n), catalog::Member { name: n.clone(), addr: a.to_string() })),
    );
    let (input, inbox) = std::sync::mpsc::channel();
    let peers = peers::Peers::new(me, tls.clone(), input.clone(), tokio::runtime::Handle::current());
    // Static addresses first; the catalog's membership (applied by the Raft thread) wins.
    peers.set_members(founders.clone());
    let checkpoints = Arc::new(
        snapshot::Checkpoints::new(&cfg.data, me).with_context(|| format!("preparing {}", cfg.data.display()))?,
    );
    let (raft, log) = consensus::start(&cfg.name, &store, checkpoints.clone(), &founders, cfg.join, input)
        .with_context(|| format!("opening the Raft log in {}", cfg.data.display()))?;
    {
        let (h, st, p) = (raft.clone(), store.clone(), peers.clone());
        std::thread::Builder::new().name("raft".into()).spawn(move || {
            // A panic inside raft-rs must not leave a node that serves without consensus.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| consensus::run(&h, log, st, p, inbox))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(error = %e, "the Raft member could not start; stopping");
                    std::process::exit(70);
                }
                Err(_) => {
                    error!("the Raft member failed; stopping so the node restarts from disk");
                    std::process::exit(70);
                }
            }
        })?;
    }
    let metrics = metrics::NodeMetrics::new(&cfg.name)?;
    metrics.update_disk(&cfg.data, cfg.min_free_bytes + store.ballast_owed());
    // Revocations already in the catalog are refused from the first handshake on.
    let revoked = Arc::new(revocation::Revoked::default());
    metrics.revocations(revoked.load(&store).context("reading the revocations from the catalog")?);
    let certificate = exclave::pki::cert_info(&tls.chain[0]).map_err(anyhow::Error::msg)?;
    let ca_certificate = exclave::pki::cert_info(&tls.ca[0]).map_err(anyhow::Error::msg)?;
    metrics.certificate(&certificate.subject, certificate.not_after);
    metrics.certificate("ca", ca_certificate.not_after);
    for (what, c) in [("this node's certificate", &certificate), ("the cluster CA", &ca_certificate)] {
        match exclave::pki::validity(c, exclave::pki::now_secs()) {
            exclave::pki::Validity::ExpiresSoon { in_days } => {
                warn!(certificate = %c.subject, in_days, "{what} expires in {in_days} day(s): renew it (exclave-replicator pki renew)")
            }
            exclave::pki::Validity::Expired => {
                bail!(
                    "{what} ({}) expired on {}: renew it (exclave-replicator pki renew)",
                    c.subject,
                    exclave::pki::format_time(c.not_after)
                )
            }
            _ => {}
        }
    }
    let server_cfg = transport::server_config(&tls, Some(revoked.check()))?;
    let endpoint = transport::endpoint_with(cfg.listen, Some(server_cfg), Some(transport::stateless_reset_key(&tls)))
        .with_context(|| format!("binding {}", cfg.listen))?;
    let node = Arc::new(node::Node {
        name: cfg.name.clone(),
        store: store.clone(),
        chunks: store.clone(),
        metrics: metrics.clone(),
        started: Instant::now(),
        data_dir: cfg.data.clone(),
        min_free_bytes: cfg.min_free_bytes,
        raft: raft.clone(),
        peers: peers.clone(),
        write_quorum: cfg.write_quorum,
        backfill: Default::default(),
        revoked,
        connections: Default::default(),
        scrub: Arc::new(scrub::Scrubber::new(cfg.scrub_bytes_per_s, cfg.scrub_interval)),
        gc: Arc::new(gc::Collector::new(cfg.gc.clone())),
        checkpoints,
        certificate,
        ca_certificate,
        in_flight: Default::default(),
        tenant_in_flight: Default::default(),
    });
    {
        let (m, raft, peers) = (metrics.clone(), raft.clone(), peers.clone());
        metrics.refresh_raft_on_scrape(move || m.raft_state(&raft.view(), raft.id, |id| peers.name_of(id)));
    }
    if let Some(addr) = cfg.metrics {
        let ready_node = node.clone();
        let registries = vec![metrics.registry.clone(), exclave::http::process_registry("exclave-replicator")?];
        exclave::http::serve(addr, registries, Arc::new(move || ready_node.readiness()))
            .await
            .with_context(|| format!("binding the HTTP endpoint on {addr}"))?;
        info!(%addr, "HTTP on /metrics, /healthz, /readyz");
    }
    {
        let (m, d, raft, peers) = (metrics.clone(), cfg.data.clone(), raft.clone(), peers.clone());
        let (st, reserve) = (store.clone(), cfg.min_free_bytes);
        tokio::spawn(async move {
            let mut n = 0u64;
            // Every 5 s from the start: a scrape never finds the Raft gauges missing.
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                m.raft_state(&raft.view(), raft.id, |id| peers.name_of(id));
                n += 1;
                // From the first round on, then every 15 s.
                if n % 3 == 1 {
                    m.update_disk(&d, reserve + st.ballast_owed());
                    let st2 = st.clone();
                    let read = move || -> Result<_, store::StoreError> {
                        let v = st2.catalog()?;
                        let usages = catalog::usages(&v)?;
                        let mut view = Vec::new();
                        for (tenant, _, _) in &usages {
                            let mut newest = std::collections::BTreeMap::<String, i64>::new();
                            for s in catalog::snapshots(&v, tenant, None)? {
                                let t = newest.entry(s.source).or_insert(s.time);
                                *t = (*t).max(s.time);
                            }
                            let head = catalog::history::head(&v, tenant)?.seq;
                            view.push(metrics::TenantView {
                                tenant: tenant.clone(),
                                newest: newest.into_iter().collect(),
                                history_head: head,
                            });
                        }
                        Ok((usages, catalog::drills_latest(&v)?, view))
                    };
                    if let Ok(Ok((usages, drills, view))) = tokio::task::spawn_blocking(read).await {
                        m.tenants(&usages);
                        m.drills(&drills);
                        m.catalog_view(&view);
                    }
                    // A ballast given back to a full disk is laid again once there is room.
                    let st = st.clone();
                    let _ = tokio::task::spawn_blocking(move || st.lay_ballast(reserve)).await;
                }
            }
        });
    }
    info!(name = %cfg.name, listen = %cfg.listen, data = %cfg.data.display(), peers = cfg.peers.len(),
          join = cfg.join, "storage node ready");
    // Background workers stop at SIGTERM, before the store is flushed.
    let (stop_workers, stopping) = tokio::sync::watch::channel(false);
    let workers = [
        tokio::spawn(replication::anti_entropy(node.clone(), stopping.clone())),
        tokio::spawn(revocation::watch(node.clone(), stopping.clone())),
        tokio::spawn(scrub::worker(node.clone(), stopping.clone())),
        tokio::spawn(gc::worker(node.clone(), stopping.clone())),
        tokio::spawn(audit::worker(node.clone(), stopping)),
    ];
    let server = tokio::spawn(server::serve(endpoint.clone(), node));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
    }
    let _ = stop_workers.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    endpoint.close(0u32.into(), b"node shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(10), endpoint.wait_idle()).await;
    server.abort();
    if let Err(e) = tokio::task::spawn_blocking(move || store.flush()).await? {
        error!(error = %e, "flush on shutdown failed; the WAL still holds every acknowledged write");
    }
    info!("stopped");
    Ok(())
}

async fn status(a: StatusArgs) -> Result<()> {
    let tls = TlsIdentity::load(&a.pki, &a.identity)?;
    let own = exclave::pki::cert_info(&tls.chain[0]).map_err(anyhow::Error::msg)?;
    let client = NodeClient::connect(a.node, &tls).await?;
    let Reply::Status(s) = client.call(&[exclave::protocol::Request::Status]).await? else {
        bail!("unexpected reply to status");
    };
    let Reply::RaftStatus(r) = client.call(&[exclave::protocol::Request::RaftStatus]).await? else {
        bail!("unexpected reply to raft status");
    };
    let Reply::Certificates { node: cert, ca, revoked } =
        client.call(&[exclave::protocol::Request::Certificates]).await?
    else {
        bail!("unexpected reply to certificates");
    };
    client.close().await;
    let now = exclave::pki::now_secs();
    let mut warnings: Vec<String> = r.stale.iter().cloned().collect();
    for (what, c) in [("the node's certificate", &cert), ("the cluster CA", &ca), ("this admin certificate", &own)] {
        match exclave::pki::validity(c, now) {
            exclave::pki::Validity::ExpiresSoon { in_days } => {
                warnings.push(format!("{what} ({}) expires in {in_days} day(s): renew it (pki renew)", c.subject))
            }
            exclave::pki::Validity::Expired => warnings.push(format!("{what} ({}) has expired", c.subject)),
            _ => {}
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": s.name, "version": s.version, "uptime_secs": s.uptime_secs, "chunks": s.chunks,
                "snapshots": s.snapshots, "disk_used_bytes": s.disk_used_bytes, "disk_free_bytes": s.disk_free_bytes,
                "raft": serde_json::to_value(&r)?,
                "certificate": cert, "ca": ca, "revoked": revoked.len(), "warnings": warnings,
            })
        );
    } else {
        println!("node        {} (version {}, up {} s)", s.name, s.version, s.uptime_secs);
        println!(
            "raft        {} (term {}, leader {}, commit {}, applied {})",
            r.role,
            r.term,
            r.leader.as_deref().unwrap_or("none"),
            r.commit_index,
            r.applied_index
        );
        println!(
            "certificate {} valid until {}; CA until {}; {} revoked",
            cert.subject,
            exclave::pki::format_time(cert.not_after),
            exclave::pki::format_time(ca.not_after),
            revoked.len()
        );
        for w in &warnings {
            println!("warning     {w}");
        }
        println!(
            "chunks      ~{} held, {} indexed in the cluster, {} missing here",
            s.chunks,
            r.chunks_indexed,
            if r.scanned_at.is_some() { r.chunks_missing.to_string() } else { "?".into() }
        );
        println!("snapshots   ~{}", s.snapshots);
        println!("disk        {} MiB used, {} MiB free", s.disk_used_bytes >> 20, s.disk_free_bytes >> 20);
    }
    Ok(())
}
