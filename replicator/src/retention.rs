//! `exclave-replicator retention set`: an administrator sets a source's retention policy,
//! which may shorten it (an agent may only lengthen it). The cluster applies it at once and
//! after every later commit of the source.

use anyhow::Result;
use clap::{Args, Subcommand};
use exclave::protocol::{Reply, Request};
use exclave::retention::RetentionPolicy;

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
    let RetentionCmd::Set { conn, tenant, source, policy: p } = cmd;
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
