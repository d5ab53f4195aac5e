//! Agent settings: `agent.toml` with named sources, overridden by flags.
//! See deploy/agent.example.toml for a documented example.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use exclave::chunker::ChunkerParams;
use serde::Deserialize;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// Storage nodes to upload to (the first that answers is used).
    #[serde(default)]
    pub node: Vec<SocketAddr>,
    /// PKI directory with ca.crt and this agent's certificate.
    pub pki: Option<PathBuf>,
    /// Certificate name in the PKI directory.
    pub identity: Option<String>,
    /// Tenant key file.
    pub key_file: Option<PathBuf>,
    /// Most plaintext bytes in flight (memory bound), MiB.
    pub memory_budget_mib: Option<usize>,
    /// zstd level for chunks.
    pub zstd_level: Option<i32>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceConfig {
    /// Source kind; `path` (files and directories) is the one this version knows.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub paths: Vec<PathBuf>,
    /// FastCDC sizes in bytes; defaults in `ChunkerParams::default`.
    pub chunk_min: Option<u32>,
    pub chunk_avg: Option<u32>,
    pub chunk_max: Option<u32>,
}

fn default_kind() -> String {
    "path".into()
}

impl SourceConfig {
    pub fn chunker(&self) -> Result<ChunkerParams> {
        let d = ChunkerParams::default();
        let p = ChunkerParams {
            min_size: self.chunk_min.unwrap_or(d.min_size),
            avg_size: self.chunk_avg.unwrap_or(d.avg_size),
            max_size: self.chunk_max.unwrap_or(d.max_size),
        };
        p.validate()?;
        Ok(p)
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: AgentConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for (name, s) in &cfg.sources {
            exclave::identity::check_name("source name", name)?;
            if s.kind != "path" {
                bail!("source {name}: kind {:?} is not supported by this version (use \"path\")", s.kind);
            }
            if s.paths.is_empty() {
                bail!("source {name}: `paths` is empty");
            }
            s.chunker().with_context(|| format!("source {name}"))?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        let cfg = AgentConfig::load(&path).unwrap();
        assert!(cfg.sources.contains_key("rnpp"));
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.toml");
        std::fs::write(&p, "nodes = []\n").unwrap();
        assert!(AgentConfig::load(&p).is_err());
        std::fs::write(&p, "[sources.x]\nkind = \"tape\"\npaths = [\"/\"]\n").unwrap();
        assert!(format!("{:#}", AgentConfig::load(&p).unwrap_err()).contains("tape"));
    }
}
