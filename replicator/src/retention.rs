//! `exclave-replicator retention set`: an administrator sets a source's retention policy,
//! which may shorten it (an agent may only lengthen it). The cluster applies it at once and
//! after every later commit of the source, on commit times (cluster time), never forgetting
//! what was committed within the tenant's protection window (`retention protect`; the rules
//! are at the top of `exclave::retention`). `retention lock`, `approve` and `hold` keep
//! snapshots against everyone, administrators included (rules in `catalog::locks`).
//! `retention show` lists what governs a tenant; `retention audit-keep` how long its audit
//! records are kept (rules in `catalog::audit`).

use anyhow::Result;
use clap::{Args, Subcommand};
use exclave::protocol::{HoldTarget, LockMode, Reply, Request};
use exclave::retention::{MAX_PROTECTION_DAYS, RetentionPolicy};

use crate::cluster::Conn;

#[derive(Subcommand)]
pub enum RetentionCmd {
    /// Set the policy of one tenant's source (snapshots it no longer keeps are forgotten now;
    /// their chunks stay until garbage collection).
    Set {
        #[command(flatten)]
        conn: Conn,
        /// The tenant (as in its agents' certificates); one the cluster holds no data of is
        /// refused, to catch a typo, unless `--new-tenant`.
        #[arg(long)]
        tenant: String,
        /// The source, as its agent names it.
        #[arg(long)]
        source: String,
        /// Set the policy of a tenant that has not backed anything up yet.
        #[arg(long)]
        new_tenant: bool,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Set a tenant's protection window: retention never forgets a snapshot committed less
    /// than this many days ago (cluster time), whatever is committed after it (default 14).
    Protect {
        #[command(flatten)]
        conn: Conn,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The window, in days (0: none; lowering it is refused while a lock forbids).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_PROTECTION_DAYS)))]
        days: u32,
    },
    /// Set, lengthen, shorten or remove a minimum-retention lock on a tenant or one source:
    /// no snapshot committed less than DAYS ago is forgotten. A compliance lock can never be
    /// shortened or removed; weakening a governance lock needs a second administrator
    /// (`retention approve`).
    Lock {
        #[command(flatten)]
        conn: Conn,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// One source only (default: every source of the tenant).
        #[arg(long)]
        source: Option<String>,
        /// `compliance`: never shortened or removed, by anyone; `governance`: weakened only
        /// with a second administrator's approval.
        #[arg(long, value_enum, required_unless_present = "remove")]
        mode: Option<Mode>,
        /// Minimum age, in days, before a snapshot may be forgotten (1 to 36500).
        #[arg(long, required_unless_present = "remove", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: Option<u32>,
        /// Remove the lock (a governance lock only, with a second administrator's approval).
        #[arg(long, conflicts_with_all = ["mode", "days"])]
        remove: bool,
    },
    /// Approve a governance lock change another administrator asked for (its request id, as
    /// `lock` printed it or `show` lists it).
    Approve {
        #[command(flatten)]
        conn: Conn,
        /// The request id `lock` printed (or `show` lists).
        request: u64,
    },
    /// Place (or release) a legal hold on a source or one snapshot: nothing under hold is
    /// forgotten or collected.
    Hold {
        #[command(flatten)]
        conn: Conn,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Hold every snapshot of this source, present and future.
        #[arg(long, required_unless_present = "snapshot", conflicts_with = "snapshot")]
        source: Option<String>,
        /// Hold this one snapshot (its id).
        #[arg(long)]
        snapshot: Option<String>,
        /// Release the hold instead of placing it.
        #[arg(long)]
        release: bool,
        /// Why (a case number): recorded with the hold.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show a tenant's protection window, cluster time, each source's policy, locks, holds and
    /// governance changes waiting for approval.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set how long a tenant's audit records are kept (default ten years, never less
    /// than its longest lock or protection window). Lengthening applies at once; shortening
    /// applies when a second administrator asks for the same days within a day.
    AuditKeep {
        #[command(flatten)]
        conn: Conn,
        /// The tenant (omit: the cluster's own, administrators' sessions).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Keep records this many days of cluster time (365 to 36500); omit to show.
        #[arg(long, value_parser = clap::value_parser!(u32).range(365..=36_500))]
        days: Option<u32>,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Mode {
    Compliance,
    Governance,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// Keep the N newest snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours (UTC) that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// Keep the newest snapshot of each of the N newest days (UTC) that have one.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest snapshot of each of the N newest ISO weeks that have one.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest snapshot of each of the N newest months that have one.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest snapshot of each of the N newest years that have one.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

pub async fn run(cmd: RetentionCmd) -> Result<()> {
    let (conn, tenant, source, p) = match cmd {
        RetentionCmd::Set { conn, tenant, source, new_tenant, policy } => (conn, tenant, source, (new_tenant, policy)),
        RetentionCmd::Protect { conn, tenant, days } => return protect(conn, tenant, days).await,
        RetentionCmd::Show { conn, tenant, json } => return show(conn, tenant, json).await,
        RetentionCmd::AuditKeep { conn, tenant, days, json } => return audit_keep(conn, tenant, days, json).await,
        RetentionCmd::Lock { conn, tenant, source, mode, days, remove } => {
            let lock = match (remove, mode, days) {
                (false, Some(m), Some(d)) => Some((
                    match m {
                        Mode::Compliance => LockMode::Compliance,
                        Mode::Governance => LockMode::Governance,
                    },
                    d,
                )),
                _ => None,
            };
            let what = format!("{tenant}{}", source.as_ref().map(|s| format!("/{s}")).unwrap_or_default());
            return change(conn, Request::SetLock { tenant, source, lock }, &what).await;
        }
        RetentionCmd::Approve { conn, request } => {
            return change(conn, Request::ApproveLock { id: request }, &format!("request {request}")).await;
        }
        RetentionCmd::Hold { conn, tenant, source, snapshot, release, reason } => {
            let target = match (source, snapshot) {
                (_, Some(id)) => HoldTarget::Snapshot(id),
                (Some(s), None) => HoldTarget::Source(s),
                (None, None) => anyhow::bail!("--source or --snapshot"),
            };
            let what = format!("{tenant}: {target:?}");
            return change(conn, Request::SetHold { tenant, target, release, reason }, &what).await;
        }
    };
    let (new_tenant, p) = p;
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
    // An identity that may not list the tenants may not set a policy either: the node's own
    // refusal of the change below says so.
    if !new_tenant
        && let Ok(Reply::Quotas(known)) = client.call(&[Request::Quotas]).await
        && !known.iter().any(|t| t.tenant == tenant)
    {
        let names: Vec<&str> = known.iter().map(|t| t.tenant.as_str()).collect();
        anyhow::bail!(
            "the cluster holds no data of tenant {tenant:?} (it knows: {}); a typo? \
             Give --new-tenant to set a policy ahead of the tenant's first backup",
            if names.is_empty() { "none".into() } else { names.join(", ") }
        );
    }
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

async fn change(conn: Conn, req: Request, what: &str) -> Result<()> {
    let client = conn.connect().await?;
    let reply = client.call(&[req]).await?;
    client.close().await;
    match reply {
        Reply::Ok => {
            println!("done: {what}");
            Ok(())
        }
        Reply::LockPending(p) => {
            println!(
                "request {} recorded: a different administrator must approve it before {} \
                 (exclave-replicator retention approve {})",
                p.id,
                exclave::pki::format_time(p.expires),
                p.id
            );
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
    for (source, l) in &v.locks {
        println!(
            "  lock {:<13} {:?}, {} days (since {} by {})",
            source.as_deref().unwrap_or("(all)"),
            l.mode,
            l.days,
            exclave::pki::format_time(l.since),
            l.by
        );
    }
    for h in &v.holds {
        println!(
            "  legal hold on {:?} since {} by {}{}",
            h.target,
            exclave::pki::format_time(h.since),
            h.by,
            if h.reason.is_empty() { String::new() } else { format!(": {}", h.reason) }
        );
    }
    for p in &v.pending {
        println!(
            "  request {}: {} lock of {} -> {:?} asked by {}, approvable until {}",
            p.id,
            p.source.as_deref().unwrap_or("(all)"),
            p.tenant,
            p.lock,
            p.by,
            exclave::pki::format_time(p.expires)
        );
    }
    Ok(())
}

async fn audit_keep(conn: Conn, tenant: String, days: Option<u32>, json: bool) -> Result<()> {
    let client = conn.connect().await?;
    let req = match days {
        Some(days) => Request::SetAuditKeep { tenant: tenant.clone(), days },
        None => Request::AuditKeep { tenant: (!tenant.is_empty()).then(|| tenant.clone()) },
    };
    let reply = client.call(&[req]).await?;
    client.close().await;
    let Reply::AuditKeep(view) = reply else { anyhow::bail!("unexpected reply {reply:?}") };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let whose =
        if view.tenant.is_empty() { "the cluster's sessions".to_string() } else { format!("tenant {}", view.tenant) };
    match &view.set {
        Some((by, since)) => println!(
            "audit records of {whose} are kept {} days of cluster time (set {} by {by})",
            view.days,
            exclave::pki::format_time(*since)
        ),
        None => println!("audit records of {whose} are kept {} days of cluster time (the default)", view.days),
    }
    if let Some(p) = &view.pending {
        let flag = if view.tenant.is_empty() { String::new() } else { format!(" --tenant {}", view.tenant) };
        println!(
            "shortening to {} days asked for by {} ({}): it applies when a different administrator runs \
             `exclave-replicator retention audit-keep{flag} --days {}` before {}",
            p.days,
            p.by,
            exclave::pki::format_time(p.requested),
            p.days,
            exclave::pki::format_time(p.expires)
        );
    }
    Ok(())
}
