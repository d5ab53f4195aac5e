//! `exclave-agent`: snapshots register sources and uploads them, encrypted, to embassy nodes.

mod backup;
mod budget;
mod config;
mod pipeline;
mod progress;
mod refs;
mod source;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use exclave::keys::{MasterKey, TenantKeys, write_key_file};

#[derive(Parser)]
#[command(name = "exclave-agent", version, about = "Exclave backup agent: chunk, deduplicate, encrypt, upload")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tenant master keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Take one snapshot of a source and upload it.
    Backup(BackupArgs),
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a new tenant master key file (mode 0600). Refuses to overwrite.
    Init {
        /// Tenant (the administration) the key belongs to.
        #[arg(long)]
        tenant: String,
        /// Key file to create.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct BackupArgs {
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
    /// Tenant master key file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Source name (a table of the config, or the name for PATHs given here).
    #[arg(long)]
    pub source: Option<String>,
    /// Paths to back up as the source (instead of the config's).
    pub paths: Vec<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
    /// FastCDC average chunk size in bytes (min = avg/4, max = avg*4).
    #[arg(long)]
    pub chunk_avg: Option<u32>,
    /// zstd level [default: 1].
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// Most plaintext held in memory between read and upload, MiB [default: 32].
    #[arg(long)]
    pub memory_budget_mib: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    exclave::logging::init("warn");
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
        Cmd::Keys(KeysCmd::Init { tenant, out }) => {
            exclave::identity::check_name("tenant", &tenant)?;
            let keys = TenantKeys::new(&tenant, 0, MasterKey::generate());
            write_key_file(&out, &keys).with_context(|| format!("writing {}", out.display()))?;
            println!("created key file {} for tenant {tenant} (fingerprint {})", out.display(), keys.fingerprint);
            println!("keep a copy offline: without it no backup of {tenant} can ever be read");
            Ok(0)
        }
        Cmd::Backup(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(backup::run(args))
        }
    }
}
