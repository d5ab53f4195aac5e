//! `exclave-replicator quota …`: per-tenant storage quotas (administrator), so that one
//! country cannot fill an embassy it shares with others.

use anyhow::{Result, bail};
use clap::Subcommand;
use exclave::protocol::{Reply, Request};

use crate::cluster::Conn;

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// Set a tenant's quota: its chunks in the cluster (each stored once, after compression
    /// and encryption) may not exceed it; uploads beyond it are refused, naming the quota.
    Set {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        /// The quota, GiB (fractions allowed).
        #[arg(long)]
        max_gib: f64,
    },
    /// Remove a tenant's quota.
    Clear {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
    },
    /// Every tenant's storage and quota.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn gib(b: u64) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

pub async fn run(cmd: QuotaCmd) -> Result<()> {
    let (conn, req) = match &cmd {
        QuotaCmd::Set { conn, tenant, max_gib } => {
            if !max_gib.is_finite() || *max_gib <= 0.0 {
                bail!("--max-gib must be above 0 (to remove a quota: quota clear)");
            }
            let max_bytes = (max_gib * (1u64 << 30) as f64) as u64;
            (conn, Request::SetQuota { tenant: tenant.clone(), max_bytes: Some(max_bytes) })
        }
        QuotaCmd::Clear { conn, tenant } => (conn, Request::SetQuota { tenant: tenant.clone(), max_bytes: None }),
        QuotaCmd::Show { conn, .. } => (conn, Request::Quotas),
    };
    let client = conn.connect().await?;
    let reply = client.call(std::slice::from_ref(&req)).await;
    client.close().await;
    match (cmd, reply?) {
        (QuotaCmd::Set { tenant, max_gib, .. }, Reply::Ok) => println!("quota of {tenant}: {max_gib} GiB"),
        (QuotaCmd::Clear { tenant, .. }, Reply::Ok) => println!("quota of {tenant} removed"),
        (QuotaCmd::Show { json, .. }, Reply::Quotas(list)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<16} {:>14} {:>14} {:>6}", "TENANT", "STORED", "QUOTA", "USED");
                for u in &list {
                    let (quota, used) = match u.quota_bytes {
                        Some(q) => (gib(q), format!("{:.0} %", 100.0 * u.stored_bytes as f64 / q.max(1) as f64)),
                        None => ("none".into(), "-".into()),
                    };
                    println!("{:<16} {:>14} {:>14} {:>6}", u.tenant, gib(u.stored_bytes), quota, used);
                }
            }
        }
        (_, other) => bail!("unexpected reply {other:?}"),
    }
    Ok(())
}
