//! `exclave-replicator audit`: who read what, and when, from any node's copy of the log.

use anyhow::{Context, Result, bail};
use clap::Args;
use exclave::protocol::{AuditRecord, MAX_AUDIT_RECORDS, Reply, Request};

use crate::cluster::Conn;

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    conn: Conn,
    /// The tenant whose log to read (administrators: without it, the sessions on the cluster
    /// itself; a restore identity reads its own tenant's).
    #[arg(long)]
    tenant: Option<String>,
    /// Sessions that ended at or after this time: Unix seconds, `2026-11-27`, or
    /// `2026-11-27T10:00:00Z`.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Sessions of identities starting with this (`restore:lux`, `admin#0a1b`).
    #[arg(long)]
    who: Option<String>,
    #[arg(long)]
    json: bool,
}

fn parse_time(s: &str) -> Result<i64> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let full = if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_string() };
    let t = humantime::parse_rfc3339_weak(&full).with_context(|| format!("{s:?} is not a time"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64))
}

pub async fn run(a: AuditArgs) -> Result<i32> {
    let client = a.conn.connect().await?;
    let mut since = a.since.unwrap_or(0);
    let mut all: Vec<AuditRecord> = Vec::new();
    let mut boundary: Vec<AuditRecord> = Vec::new();
    loop {
        let req = Request::Audit { tenant: a.tenant.clone(), since, who: a.who.clone() };
        let Reply::Audit(page) = client.call(&[req]).await? else { bail!("unexpected reply to audit") };
        let full = page.len() >= MAX_AUDIT_RECORDS;
        // A full page may end inside a second: that second is asked again, and the records of
        // it already listed are skipped.
        let fresh: Vec<AuditRecord> = page.into_iter().filter(|r| !boundary.contains(r)).collect();
        let last = fresh.last().map(|r| r.ended);
        all.extend(fresh);
        match (full, last) {
            (true, Some(t)) if t > since => {
                since = t;
                boundary = all.iter().filter(|r| r.ended == t).cloned().collect();
            }
            _ => break,
        }
    }
    client.close().await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    if all.is_empty() {
        println!("no sessions recorded");
    }
    for r in &all {
        let requests: Vec<String> = r.requests.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        println!(
            "{}  {}  {}  on {}  {}  {} bytes{}{}{}",
            exclave::pki::format_time(r.ended),
            r.identity,
            if r.tenant.is_empty() { "(cluster)" } else { &r.tenant },
            r.node,
            requests.join(" "),
            r.bytes,
            if r.sources.is_empty() { String::new() } else { format!("  sources {}", r.sources.join(",")) },
            if r.snapshots.is_empty() { String::new() } else { format!("  snapshots {}", r.snapshots.join(",")) },
            if r.failures > 0 { format!("  {} failed", r.failures) } else { String::new() },
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_seconds_dates_or_rfc3339() {
        assert_eq!(parse_time("1800000000").unwrap(), 1_800_000_000);
        assert_eq!(parse_time("2026-11-27").unwrap(), 1_795_737_600);
        assert_eq!(parse_time("2026-11-27T00:00:10Z").unwrap(), 1_795_737_610);
        assert!(parse_time("yesterday").is_err());
    }
}
