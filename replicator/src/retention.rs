//! `exclave-replicator retention set`: an administrator sets a source's retention policy,
//! which may shorten it (an agent may only lengthen it). The cluster applies it at once and
//! after every later commit of the source, on commit times (cluster time), never forgetting
//! what was committed within the tenant's protection window (`retention protect`; the rules
//! are at the top of `exclave::retention`). `retention show` lists what governs a tenant.

use anyhow::Result;
use clap::{Args, Subcommand};
use exclave::protocol::{Reply, Request};
use exclave::retention::{MAX_PROTECTION_DAYS, RetentionPolicy};

use crate::cluster::Conn;

#[derive(Subcommand)]
pub enum RetentionCmd {
    /// Set the policy of one tenant's source (snapshots it no longer keeps are forgotten now;
    /// their chunks stay until garbage collection).
    Set {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        source: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Set a tenant's protection window: retention never forgets a snapshot committed less
    /// than this many days ago (cluster time), whatever is committed after it (default 14).
    Protect {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_PROTECTION_DAYS)))]
        days: u32,
    },
    /// Show a tenant's protection window, cluster time and each source's policy.
    Show {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Keep the N newest snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours (UTC) that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

pub async fn run(cmd: RetentionCmd) -> Result<()> {
    let (conn, tenant, source, p) = match cmd {
        RetentionCmd::Set { conn, tenant, source, policy } => (conn, tenant, source, policy),
        RetentionCmd::Protect { conn, tenant, days } => return protect(conn, tenant, days).await,
        RetentionCmd::Show { conn, tenant, json } => return show(conn, tenant, json).await,
    };
    let policy = RetentionPolicy {
        keep_last: p.keep_last,
        keep_hourly: p.keep_hourly,
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
        keep_monthly: p.keep_monthly,
        keep_yearly: p.keep_yearly,
    };
    policy.validate()?;
    let client = conn.connect().await?;
    let reply =
        client.call(&[Request::SetRetentionFor { tenant: tenant.clone(), source: source.clone(), policy }]).await?;
    client.close().await;
    match reply {
        Reply::Ok => {
            println!("retention of {tenant}/{source}: {}", policy.describe());
            Ok(())
        }
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn protect(conn: Conn, tenant: String, days: u32) -> Result<()> {
    let client = conn.connect().await?;
    let reply = client.call(&[Request::SetProtection { tenant: tenant.clone(), days }]).await?;
    client.close().await;
    match reply {
        Reply::Ok => {
            println!("protection window of {tenant}: {days} days of cluster time");
            Ok(())
        }
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn show(conn: Conn, tenant: String, json: bool) -> Result<()> {
    let client = conn.connect().await?;
    let reply = client.call(&[Request::RetentionShow { tenant }]).await?;
    client.close().await;
    let Reply::Retention(v) = reply else { anyhow::bail!("unexpected reply {reply:?}") };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let clock = exclave::pki::format_time(v.cluster_time);
    println!("tenant {}", v.tenant);
    println!("  cluster time       {clock}");
    let set = if v.protection_set { "set by an administrator" } else { "default" };
    println!("  protection window  {} days ({set})", v.protection_days);
    if v.policies.is_empty() {
        println!("  no retention policy: every snapshot is kept");
    }
    for (source, p) in &v.policies {
        println!("  {source:<18} {}", p.describe());
    }
    Ok(())
}
