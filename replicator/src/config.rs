//! Node settings: from `--config node.toml`, overridden by flags. See deploy/node.example.toml.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
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
    /// Another founding member of the cluster, NAME=ADDR (repeatable). Founding members all
    /// list each other; a node with no peer is a cluster of one.
    #[arg(long = "peer", value_name = "NAME=ADDR")]
    pub peers: Vec<String>,
    /// Join an existing cluster instead of founding one: the node waits until an operator
    /// adds it (`cluster add-node`). `--peer` still gives the members' addresses.
    #[arg(long)]
    pub join: bool,
    /// Address the other members reach this node at [default: the listen address].
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Nodes that must hold a chunk durably before an upload is acknowledged
    /// [default: a majority of the voters].
    #[arg(long)]
    pub write_quorum: Option<usize>,
    /// Scrub: MiB per second of stored chunks re-read and checked [default: 64].
    #[arg(long)]
    pub scrub_mib_per_s: Option<u64>,
    /// Scrub: hours between the starts of two full passes; 0 scrubs only on demand
    /// (`exclave-replicator scrub`) [default: 168].
    #[arg(long)]
    pub scrub_interval_hours: Option<u64>,
    /// GC: hours between two garbage-collection passes, run by the leader; 0 collects only
    /// on demand (`exclave-replicator gc`) [default: 24].
    #[arg(long)]
    pub gc_interval_hours: Option<u64>,
    /// GC: passes a chunk stays condemned (out of the index, its copies kept) before it is
    /// swept; a backup that needs it meanwhile puts it back at no cost [default: 1].
    #[arg(long)]
    pub gc_grace_passes: Option<u64>,
    /// GC: a pack file with less than this percentage of live bytes is rewritten to give the
    /// rest back; 0 deletes only packs nothing lives in [default: 50].
    #[arg(long)]
    pub gc_repack_live_percent: Option<u8>,
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
    #[serde(default)]
    peers: std::collections::BTreeMap<String, SocketAddr>,
    #[serde(default)]
    join: bool,
    advertise: Option<SocketAddr>,
    write_quorum: Option<usize>,
    scrub_mib_per_s: Option<u64>,
    scrub_interval_hours: Option<u64>,
    gc_interval_hours: Option<u64>,
    gc_grace_passes: Option<u64>,
    gc_repack_live_percent: Option<u8>,
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
    pub peers: Vec<(String, SocketAddr)>,
    pub join: bool,
    pub advertise: SocketAddr,
    pub write_quorum: Option<usize>,
    pub scrub_bytes_per_s: u64,
    /// `None`: scrub on demand only.
    pub scrub_interval: Option<std::time::Duration>,
    pub gc: crate::gc::Settings,
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
        let mut peers: Vec<(String, SocketAddr)> = f.peers.into_iter().collect();
        for p in &a.peers {
            let (n, addr) = p.split_once('=').with_context(|| format!("--peer {p:?}: expected NAME=ADDR"))?;
            let addr: SocketAddr = addr.parse().with_context(|| format!("--peer {p:?}: bad address"))?;
            exclave::identity::check_name("peer name", n)?;
            peers.retain(|(m, _)| m != n);
            peers.push((n.to_string(), addr));
        }
        if peers.iter().any(|(n, _)| *n == name) {
            bail!("--peer names this node itself ({name})");
        }
        let listen = a.listen.or(f.listen).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7401)));
        let advertise = a.advertise.or(f.advertise).unwrap_or(listen);
        if advertise.ip().is_unspecified() && !peers.is_empty() {
            bail!(
                "--advertise is required when listening on {listen} in a cluster: peers need an address to reach this node"
            );
        }
        let write_quorum = a.write_quorum.or(f.write_quorum);
        if write_quorum == Some(0) {
            bail!("--write-quorum must be at least 1");
        }
        Ok(NodeConfig {
            data: a.data.or(f.data).context("--data (or `data` in the config) is required")?,
            listen,
            peers,
            join: a.join || f.join,
            advertise,
            write_quorum,
            pki: a.pki.or(f.pki).context("--pki (or `pki` in the config) is required")?,
            identity: a.identity.or(f.identity).unwrap_or_else(|| name.clone()),
            metrics: a.metrics.or(f.metrics),
            min_free_bytes: a.min_free_mib.or(f.min_free_mib).unwrap_or(512) << 20,
            scrub_bytes_per_s: a.scrub_mib_per_s.or(f.scrub_mib_per_s).unwrap_or(64).max(1) << 20,
            scrub_interval: match a.scrub_interval_hours.or(f.scrub_interval_hours).unwrap_or(168) {
                0 => None,
                h => Some(std::time::Duration::from_secs(h * 3600)),
            },
            gc: crate::gc::Settings {
                interval: match a.gc_interval_hours.or(f.gc_interval_hours).unwrap_or(24) {
                    0 => None,
                    h => Some(std::time::Duration::from_secs(h * 3600)),
                },
                grace_passes: a.gc_grace_passes.or(f.gc_grace_passes).unwrap_or(1),
                repack_live_below: f64::from(
                    a.gc_repack_live_percent.or(f.gc_repack_live_percent).unwrap_or(50).min(100),
                ) / 100.0,
            },
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
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.advertise.to_string(), "10.1.0.1:7401");
        assert_eq!(cfg.scrub_bytes_per_s, 32 << 20);
        assert_eq!(cfg.scrub_interval, Some(std::time::Duration::from_secs(7 * 24 * 3600)));
        assert_eq!(cfg.gc.interval, Some(std::time::Duration::from_secs(24 * 3600)));
        assert_eq!(cfg.gc.grace_passes, 1);
        assert_eq!(cfg.gc.repack_live_below, 0.5);
    }

    #[test]
    fn peers_from_flags_are_checked() {
        let base = || RunArgs {
            name: Some("n1".into()),
            data: Some("/tmp/x".into()),
            pki: Some("/tmp/p".into()),
            listen: Some("127.0.0.1:7401".parse().unwrap()),
            ..RunArgs::default()
        };
        let ok = NodeConfig::resolve(RunArgs { peers: vec!["n2=127.0.0.1:7402".into()], ..base() }).unwrap();
        assert_eq!(ok.peers, vec![("n2".to_string(), "127.0.0.1:7402".parse().unwrap())]);
        for bad in ["n2", "n2=nowhere", "n1=127.0.0.1:7402", "N2=127.0.0.1:1"] {
            assert!(NodeConfig::resolve(RunArgs { peers: vec![bad.into()], ..base() }).is_err(), "{bad}");
        }
        let wild = RunArgs {
            listen: Some("0.0.0.0:7401".parse().unwrap()),
            peers: vec!["n2=127.0.0.1:7402".into()],
            ..base()
        };
        assert!(NodeConfig::resolve(wild).unwrap_err().to_string().contains("--advertise"));
    }

    #[test]
    fn missing_settings_are_named() {
        let err = NodeConfig::resolve(RunArgs { name: Some("n1".into()), ..RunArgs::default() }).unwrap_err();
        assert!(err.to_string().contains("--data"), "{err}");
    }
}
