//! Node settings: from `--config node.toml`, overridden by flags. See deploy/node.example.toml.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Settings file (TOML); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (its certificate is node:<name>).
    #[arg(long)]
    pub name: Option<String>,
    /// Data directory (RocksDB).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// UDP address for QUIC [default: 0.0.0.0:7401].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// PKI directory holding ca.crt and this node's certificate.
    #[arg(long)]
    pub pki: Option<PathBuf>,
    /// Certificate name in the PKI directory [default: the node name].
    #[arg(long)]
    pub identity: Option<String>,
    /// Serve Prometheus metrics on this TCP address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    name: Option<String>,
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    pki: Option<PathBuf>,
    identity: Option<String>,
    metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub pki: PathBuf,
    pub identity: String,
    pub metrics: Option<SocketAddr>,
}

fn load(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl NodeConfig {
    pub fn resolve(a: RunArgs) -> Result<NodeConfig> {
        let f = match &a.config {
            Some(p) => load(p)?,
            None => FileConfig::default(),
        };
        let name = a.name.or(f.name).context("--name (or `name` in the config) is required")?;
        exclave::identity::check_name("node name", &name)?;
        Ok(NodeConfig {
            data: a.data.or(f.data).context("--data (or `data` in the config) is required")?,
            listen: a.listen.or(f.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7401))),
            pki: a.pki.or(f.pki).context("--pki (or `pki` in the config) is required")?,
            identity: a.identity.or(f.identity).unwrap_or_else(|| name.clone()),
            metrics: a.metrics.or(f.metrics),
            name,
        })
    }
}
