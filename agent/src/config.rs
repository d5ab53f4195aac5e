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
    /// Passphrase of a sealed key file (else `EXCLAVE_PASSPHRASE_FILE`).
    pub passphrase_file: Option<PathBuf>,
    /// Most plaintext bytes in flight (memory bound), MiB.
    pub memory_budget_mib: Option<usize>,
    /// zstd level for chunks.
    pub zstd_level: Option<i32>,
    /// Where the daemon keeps its status file [default: /var/lib/exclave-agent].
    pub state_dir: Option<PathBuf>,
    /// Most disk the delta bases of each source may take (`STATE-DIR/deltas/SOURCE`), MiB;
    /// 0 sends changed chunks whole [default: 4096].
    pub delta_cache_mib: Option<u64>,
    /// The daemon's first retry after a failed run, in seconds (doubling up to 1 h) [default: 30].
    pub retry_secs: Option<i64>,
    /// Address for the daemon's Prometheus metrics (e.g. "127.0.0.1:9711"); none if unset.
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
}

/// What a source is; each kind names the fields it needs (see deploy/agent.example.toml).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Files and directories (`paths`).
    #[default]
    Path,
    /// A PostgreSQL database (`connection`): `method = "dump"` (pg_dump, the default),
    /// `"base"` (a base backup for point-in-time restore with `wal-push`) or `"stream"` (base
    /// backups, and WAL streamed to the cluster continuously by the daemon).
    Postgres,
    /// A SQLite database file (`database`), copied with the online backup API.
    Sqlite,
    /// The standard output of a command (`command`, an argv list; no shell).
    Command,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PgMethod {
    #[default]
    Dump,
    Base,
    /// Base backups on the schedule, and WAL streamed by `exclave-agent run` (`crate::stream`).
    Stream,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceConfig {
    #[serde(default)]
    pub kind: SourceKind,
    /// `path`: files and directories.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// `postgres`: libpq connection string (`host=... dbname=...` or `postgresql://...`).
    pub connection: Option<String>,
    /// `postgres`: `dump` or `base`.
    #[serde(default)]
    pub method: PgMethod,
    /// `postgres`: directory of pg_dump / pg_basebackup / pg_receivewal [default: found on PATH].
    pub pg_bin: Option<PathBuf>,
    /// `method = "stream"`: the physical replication slot that holds the server's WAL until
    /// the stream has it [default: exclave_SOURCE].
    pub slot: Option<String>,
    /// `method = "stream"`: how often the segment being written is shipped when it grew, in
    /// seconds [default: 3].
    pub stream_interval_secs: Option<u64>,
    /// `sqlite`: the database file.
    pub database: Option<PathBuf>,
    /// `command`: program and arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// `command`: name of the file holding the output in the snapshot [default: SOURCE.out].
    pub output_name: Option<String>,
    /// Where database copies are staged (SQLite) [default: the system temporary directory].
    pub spool_dir: Option<PathBuf>,
    /// FastCDC sizes in bytes; defaults in `ChunkerParams::default`.
    pub chunk_min: Option<u32>,
    pub chunk_avg: Option<u32>,
    pub chunk_max: Option<u32>,
    /// When the daemon snapshots this source: a cron expression (minute hour day month
    /// weekday, local time; an optional leading seconds field). Unscheduled sources are only
    /// backed up by `exclave-agent backup`.
    pub schedule: Option<String>,
    /// Each run starts up to this many seconds after its scheduled time (random) [default: 0].
    #[serde(default)]
    pub jitter_secs: u64,
    /// Which snapshots the cluster keeps (`keep-last`, `keep-hourly`, `keep-daily`,
    /// `keep-weekly`, `keep-monthly`, `keep-yearly`); sent with every backup and applied by
    /// the cluster. Without it the cluster keeps every snapshot.
    pub retention: Option<exclave::retention::RetentionPolicy>,
}

impl SourceConfig {
    pub fn chunker(&self) -> Result<ChunkerParams> {
        self.chunker_or(ChunkerParams::default())
    }

    /// The sizes this source sets, `d`'s where it sets none.
    pub fn chunker_or(&self, d: ChunkerParams) -> Result<ChunkerParams> {
        let p = ChunkerParams {
            min_size: self.chunk_min.unwrap_or(d.min_size),
            avg_size: self.chunk_avg.unwrap_or(d.avg_size),
            max_size: self.chunk_max.unwrap_or(d.max_size),
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks that the fields the kind needs are there and no other kind's are.
    pub fn validate(&self) -> Result<()> {
        let has = |b: bool, field: &str, kind: &str| -> Result<()> {
            if b { Ok(()) } else { bail!("`{field}` is required for kind = \"{kind}\"") }
        };
        let stray = |b: bool, field: &str| -> Result<()> {
            if b { bail!("`{field}` does not apply to kind = \"{}\"", self.kind_name()) } else { Ok(()) }
        };
        match self.kind {
            SourceKind::Path => has(!self.paths.is_empty(), "paths", "path")?,
            SourceKind::Postgres => has(self.connection.is_some(), "connection", "postgres")?,
            SourceKind::Sqlite => has(self.database.is_some(), "database", "sqlite")?,
            SourceKind::Command => has(!self.command.is_empty(), "command", "command")?,
        }
        stray(self.kind != SourceKind::Path && !self.paths.is_empty(), "paths")?;
        stray(self.kind != SourceKind::Postgres && self.connection.is_some(), "connection")?;
        stray(self.kind != SourceKind::Postgres && self.pg_bin.is_some(), "pg-bin")?;
        stray(!self.streams_wal() && self.slot.is_some(), "slot")?;
        stray(!self.streams_wal() && self.stream_interval_secs.is_some(), "stream-interval-secs")?;
        if let Some(slot) = &self.slot
            && (slot.is_empty()
                || slot.len() > 63
                || !slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            bail!("slot {slot:?}: a replication slot name is 1 to 63 of a-z, 0-9 and _");
        }
        if self.stream_interval_secs == Some(0) {
            bail!("stream-interval-secs must be at least 1");
        }
        stray(self.kind != SourceKind::Sqlite && self.database.is_some(), "database")?;
        stray(self.kind != SourceKind::Command && !self.command.is_empty(), "command")?;
        stray(self.kind != SourceKind::Command && self.output_name.is_some(), "output-name")?;
        if let Some(r) = &self.retention {
            r.validate()?;
        }
        if let Some(expr) = &self.schedule {
            exclave::schedule::parse(expr)?;
        }
        if let Some(n) = &self.output_name {
            exclave::identity::check_name("output-name", n)?;
        }
        self.chunker()?;
        Ok(())
    }

    /// Whether the daemon streams this source's WAL.
    pub fn streams_wal(&self) -> bool {
        self.kind == SourceKind::Postgres && self.method == PgMethod::Stream
    }

    /// The replication slot of a streamed source.
    pub fn slot_name(&self, source: &str) -> String {
        self.slot.clone().unwrap_or_else(|| {
            let s: String =
                source.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
            format!("exclave_{s}").chars().take(63).collect()
        })
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SourceKind::Path => "path",
            SourceKind::Postgres => "postgres",
            SourceKind::Sqlite => "sqlite",
            SourceKind::Command => "command",
        }
    }
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/exclave-agent";

impl AgentConfig {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: AgentConfig = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for (name, s) in &cfg.sources {
            exclave::identity::check_name("source name", name)?;
            s.validate().with_context(|| format!("source {name}"))?;
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
    fn wal_files_take_small_chunks_unless_the_source_sets_sizes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        let cfg = AgentConfig::load(&path).unwrap();
        let (db, docs) = (&cfg.sources["rnpp-db"], &cfg.sources["documents"]);
        assert_eq!(db.chunker().unwrap(), ChunkerParams::default());
        assert_eq!(db.chunker_or(exclave::chunker::WAL_CHUNKER).unwrap(), exclave::chunker::WAL_CHUNKER);
        let set = ChunkerParams { min_size: 65536, avg_size: 262144, max_size: 1048576 };
        assert_eq!(docs.chunker_or(exclave::chunker::WAL_CHUNKER).unwrap(), set, "what a source sets wins");
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.toml");
        std::fs::write(&p, "nodes = []\n").unwrap();
        assert!(AgentConfig::load(&p).is_err());
        std::fs::write(&p, "[sources.x]\nkind = \"tape\"\npaths = [\"/\"]\n").unwrap();
        assert!(format!("{:#}", AgentConfig::load(&p).unwrap_err()).contains("tape"));
        std::fs::write(&p, "[sources.x]\nkind = \"postgres\"\n").unwrap();
        assert!(format!("{:#}", AgentConfig::load(&p).unwrap_err()).contains("`connection` is required"));
        std::fs::write(&p, "[sources.x]\nkind = \"sqlite\"\ndatabase = \"/d\"\npaths = [\"/\"]\n").unwrap();
        assert!(format!("{:#}", AgentConfig::load(&p).unwrap_err()).contains("`paths` does not apply"));
    }
}
