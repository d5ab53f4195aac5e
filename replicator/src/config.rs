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
    /// Free space kept in reserve on the data file system, MiB: uploads that would eat into it
    /// are refused as "storage full" while the store is still healthy [default: 512].
    #[arg(long)]
    pub min_free_mib: Option<u64>,
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
    min_free_mib: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub pki: PathBuf,
    pub identity: String,
    pub metrics: Option<SocketAddr>,
    pub min_free_bytes: u64,
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
            min_free_bytes: a.min_free_mib.or(f.min_free_mib).unwrap_or(512) << 20,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_flags_win() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let args = RunArgs { config: Some(path), name: Some("n7".into()), ..RunArgs::default() };
        let cfg = NodeConfig::resolve(args).unwrap();
        assert_eq!(cfg.name, "n7");
        assert_eq!(cfg.identity, "embassy1");
        assert_eq!(cfg.min_free_bytes, 512 << 20);
        assert_eq!(cfg.listen.port(), 7401);
    }

    #[test]
    fn missing_settings_are_named() {
        let err = NodeConfig::resolve(RunArgs { name: Some("n1".into()), ..RunArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("--data"), "{err}");
    }
}
