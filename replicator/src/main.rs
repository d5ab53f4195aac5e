//! `exclave-replicator`: the embassy storage node, and the cluster's PKI tooling.

mod config;
mod metrics;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use exclave::client::NodeClient;
use exclave::identity::Identity;
use exclave::pki;
use exclave::protocol::Reply;
use exclave::transport::{self, TlsIdentity};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "exclave-replicator", version, about = "Exclave embassy storage node and cluster PKI tooling")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the storage node (QUIC server, RocksDB store) until SIGTERM.
    Run(config::RunArgs),
    /// Create the cluster CA and issue certificates.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Ask a node for its status (needs an admin or node identity).
    Status(StatusArgs),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key.
    Init {
        /// PKI directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, written into the CA's subject.
        #[arg(long, default_value = "exclave")]
        cluster: String,
    },
    /// Issue a certificate: DIR/NAME.crt and DIR/NAME.key (0600).
    Issue {
        /// PKI directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// What the certificate may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Node id, agent name, or file name of the certificate.
        #[arg(long)]
        name: String,
        /// Tenant (required for agent and restore).
        #[arg(long)]
        tenant: Option<String>,
        /// DNS name or IP address the node is reached at (repeatable; nodes only).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Node,
    Agent,
    Restore,
    Admin,
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
    let cli = Cli::parse();
    exclave::logging::init("info,quinn=warn,rustls=warn");
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pki(PkiCmd::Init { dir, cluster }) => {
            pki::init_ca(&dir, &cluster)?;
            println!("created cluster CA in {}", dir.display());
            println!("keep {} offline once every certificate is issued", dir.join("ca.key").display());
            Ok(())
        }
        Cmd::Pki(PkiCmd::Issue { dir, role, name, tenant, hosts }) => {
            let need_tenant = || tenant.clone().context("--tenant is required for this role");
            let identity = match role {
                Role::Node => Identity::Node { id: name.clone() },
                Role::Agent => Identity::Agent { tenant: need_tenant()?, name: name.clone() },
                Role::Restore => Identity::Restore { tenant: need_tenant()? },
                Role::Admin => Identity::Admin,
            };
            // Validate through the parser so that what is issued can be read back.
            let identity = Identity::parse(&identity.subject())?;
            if !hosts.is_empty() && !matches!(role, Role::Node) {
                bail!("--host applies to node certificates only");
            }
            let (crt, key) = pki::issue(&dir, &pki::IssueRequest { identity: identity.clone(), name, hosts })?;
            println!("issued {identity}: {} and {}", crt.display(), key.display());
            Ok(())
        }
        Cmd::Run(args) => {
            let cfg = config::NodeConfig::resolve(args)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_node(cfg))
        }
        Cmd::Status(a) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(status(a)),
    }
}

async fn run_node(cfg: config::NodeConfig) -> Result<()> {
    let tls = TlsIdentity::load(&cfg.pki, &cfg.identity)
        .with_context(|| format!("loading identity {:?} from {}", cfg.identity, cfg.pki.display()))?;
    if !matches!(tls.identity, Identity::Node { .. }) {
        bail!("certificate {} is for {}, not a node", cfg.identity, tls.identity);
    }
    let store = Arc::new(
        store::Store::open(&cfg.data).with_context(|| format!("opening the store in {}", cfg.data.display()))?,
    );
    let metrics = metrics::NodeMetrics::new(&cfg.name)?;
    metrics.update_disk(&cfg.data);
    let endpoint = transport::endpoint(cfg.listen, Some(transport::server_config(&tls)?))
        .with_context(|| format!("binding {}", cfg.listen))?;
    let node = Arc::new(server::Node {
        name: cfg.name.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        started: Instant::now(),
        data_dir: cfg.data.clone(),
        min_free_bytes: cfg.min_free_bytes,
    });
    if let Some(addr) = cfg.metrics {
        exclave::metrics::serve(addr, metrics.registry.clone())
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        info!(%addr, "metrics on /metrics");
    }
    {
        let (m, d) = (metrics.clone(), cfg.data.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                m.update_disk(&d);
            }
        });
    }
    info!(name = %cfg.name, listen = %cfg.listen, data = %cfg.data.display(), "storage node ready");
    let server = tokio::spawn(server::serve(endpoint.clone(), node));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
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
    let client = NodeClient::connect(a.node, &tls).await?;
    let Reply::Status(s) = client.call(&[exclave::protocol::Request::Status]).await? else {
        bail!("unexpected reply to status");
    };
    client.close().await;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": s.name, "version": s.version, "uptime_secs": s.uptime_secs, "chunks": s.chunks,
                "snapshots": s.snapshots, "disk_used_bytes": s.disk_used_bytes, "disk_free_bytes": s.disk_free_bytes,
            })
        );
    } else {
        println!("node        {} (version {}, up {} s)", s.name, s.version, s.uptime_secs);
        println!("chunks      ~{}", s.chunks);
        println!("snapshots   ~{}", s.snapshots);
        println!("disk        {} MiB used, {} MiB free", s.disk_used_bytes >> 20, s.disk_free_bytes >> 20);
    }
    Ok(())
}
