//! `exclave-replicator cluster ...`: what a site operator runs against a live cluster:
//! status of every member, adding a node (learner, backfill, then voter) and removing one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use exclave::client::{NodeClient, connect_any};
use exclave::protocol::{GcStatus, MemberReport, MemberStatus, Reply, Request, TenantHead};
use exclave::transport::TlsIdentity;

use crate::gc_cmd::mib;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Every member's role, term, commit and applied index, backfill and last contact.
    Status {
        #[command(flatten)]
        conn: Conn,
        /// Print the status as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Add a node: it joins as a learner, backfills every chunk, then is promoted to voter.
    /// Start it first with `run --join`. Safe to run again if interrupted.
    AddNode {
        #[command(flatten)]
        conn: Conn,
        /// The new node's name (its certificate is node:NAME).
        #[arg(long)]
        name: String,
        /// Address the other members reach it at.
        #[arg(long)]
        addr: SocketAddr,
        /// Leave it a learner: do not wait for backfill nor promote it.
        #[arg(long)]
        learner: bool,
        /// Give up waiting for backfill after this many seconds (it stays a learner).
        #[arg(long, default_value_t = 24 * 3600)]
        timeout: u64,
    },
    /// Remove a member from the cluster's configuration.
    RemoveNode {
        #[command(flatten)]
        conn: Conn,
        /// The member to remove.
        #[arg(long)]
        name: String,
    },
    /// After every node runs this version: let the catalog use the layout it knows (snapshot
    /// references stored as differences; superseded streamed WAL versions forgotten). Refused,
    /// naming the node, while any member does not know the layout or does not answer; no node
    /// may be downgraded past it.
    FinalizeUpgrade {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Args)]
pub struct Conn {
    /// A member's address (repeatable; the first that answers is used).
    #[arg(long = "node", required = true)]
    pub nodes: Vec<SocketAddr>,
    /// PKI directory holding ca.crt and the admin certificate.
    #[arg(long)]
    pub pki: PathBuf,
    /// Certificate name in the PKI directory (an admin identity; a node's may read status).
    #[arg(long, default_value = "admin")]
    pub identity: String,
}

impl Conn {
    pub async fn connect(&self) -> Result<NodeClient> {
        let tls = TlsIdentity::load(&self.pki, &self.identity)
            .with_context(|| format!("loading identity {:?} from {}", self.identity, self.pki.display()))?;
        Ok(connect_any(&self.nodes, &tls).await?)
    }
}

pub async fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Status { conn, json } => {
            let client = conn.connect().await?;
            let members = status(&client).await?;
            // A node of an older version does not know the request: no GC line then.
            let gc = match client.call(&[Request::GcStatus]).await {
                Ok(Reply::GcStatus(g)) => Some(g),
                _ => None,
            };
            let heads = match client.call(&[Request::HistoryHeads]).await {
                Ok(Reply::HistoryHeads(h)) => Some(h),
                _ => None,
            };
            client.close().await;
            if json {
                let mut v = status_json(&members);
                v["gc"] = serde_json::to_value(&gc).unwrap_or_default();
                if let Some(h) = &heads {
                    v["history_heads"] = heads_json(h);
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&members);
                if let Some(g) = &gc {
                    println!("{}", gc_line(g, exclave::pki::now_secs()));
                }
                if let Some(h) = &heads {
                    print!("{}", heads_lines(h));
                }
            }
            Ok(())
        }
        ClusterCmd::AddNode { conn, name, addr, learner, timeout } => {
            exclave::identity::check_name("node name", &name)?;
            let client = conn.connect().await?;
            let before = status(&client).await?;
            let known = before.iter().find(|m| m.name == name);
            if known.is_some_and(|m| m.voter) {
                println!("{name} is already a voter");
                return Ok(());
            }
            if known.is_none() {
                change(&client, Request::AddNode { name: name.clone(), addr: addr.to_string(), voter: false }).await?;
                println!("{name} ({addr}) added as a learner; it now receives the catalog and backfills chunks");
            } else {
                println!("{name} is a learner already; waiting for its backfill");
            }
            if learner {
                client.close().await;
                return Ok(());
            }
            let target = commit_index(&status(&client).await?);
            let started = Instant::now();
            let mut last_line = String::new();
            loop {
                let members = status(&client).await?;
                let Some(report) = members.iter().find(|m| m.name == name) else {
                    bail!("{name} is no longer a member (removed meanwhile?)");
                };
                let line = match &report.status {
                    Ok(s) if caught_up(s, target) => break,
                    Ok(s) => format!(
                        "{name}: applied {}/{target}, {} chunks indexed, {} missing{}",
                        s.applied_index,
                        s.chunks_indexed,
                        s.chunks_missing,
                        if s.scanned_at.is_some_and(|i| i >= target) { "" } else { " (scan pending)" }
                    ),
                    Err(e) => format!("{name}: not answering ({e})"),
                };
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
                if started.elapsed() > Duration::from_secs(timeout) {
                    bail!(
                        "{name} has not finished its backfill within {timeout} s; it stays a learner (run add-node again to resume)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            change(&client, Request::AddNode { name: name.clone(), addr: addr.to_string(), voter: true }).await?;
            println!(
                "{name} holds every indexed chunk and is now a voter (backfill took {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            client.close().await;
            Ok(())
        }
        ClusterCmd::FinalizeUpgrade { conn } => {
            let client = conn.connect().await?;
            let reply = client.call(&[Request::FinalizeUpgrade]).await;
            client.close().await;
            match reply? {
                Reply::Ok => {
                    println!(
                        "upgrade finalised: the catalog uses layout {} (snapshot references stored as \
                         differences); nodes of older versions can no longer serve this cluster",
                        crate::catalog::LAYOUT
                    );
                    Ok(())
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        ClusterCmd::RemoveNode { conn, name } => {
            let client = conn.connect().await?;
            change(&client, Request::RemoveNode { name: name.clone() }).await?;
            println!(
                "{name} removed from the cluster; stop it and keep its data directory until you no longer need it"
            );
            client.close().await;
            Ok(())
        }
    }
}

/// Whether a learner has applied up to `target` and a later anti-entropy pass found nothing missing.
fn caught_up(s: &MemberStatus, target: u64) -> bool {
    s.applied_index >= target && s.scanned_at.is_some_and(|i| i >= target) && s.chunks_missing == 0
}

fn commit_index(members: &[MemberReport]) -> u64 {
    members.iter().filter_map(|m| m.status.as_ref().ok()).map(|s| s.commit_index).max().unwrap_or(0)
}

async fn status(client: &NodeClient) -> Result<Vec<MemberReport>> {
    match client.call(&[Request::ClusterStatus]).await? {
        Reply::ClusterStatus { members } => Ok(members),
        _ => bail!("unexpected reply to cluster status"),
    }
}

async fn change(client: &NodeClient, req: Request) -> Result<()> {
    match client.call(&[req]).await? {
        Reply::Ok => Ok(()),
        _ => bail!("unexpected reply to a membership change"),
    }
}

fn status_json(members: &[MemberReport]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            let mut v = serde_json::json!({ "name": m.name, "addr": m.addr, "voter": m.voter });
            match &m.status {
                Ok(s) => {
                    v["reachable"] = true.into();
                    v["status"] = serde_json::to_value(s).unwrap_or_default();
                }
                Err(e) => {
                    v["reachable"] = false.into();
                    v["error"] = e.clone().into();
                }
            }
            v
        })
        .collect();
    serde_json::json!({ "members": list })
}

fn print_status(members: &[MemberReport]) {
    let Some(Ok(me)) = members.first().map(|m| &m.status) else { return };
    let learners = members.iter().filter(|m| !m.voter).count();
    println!(
        "cluster: {} voters, {learners} learners; leader {}, term {} (as seen by {})",
        me.voters.len(),
        me.leader.as_deref().unwrap_or("none"),
        me.term,
        me.name
    );
    if let Some(why) = &me.stale {
        println!("warning: {why}");
    }
    println!(
        "{:<12} {:<22} {:<13} {:>5} {:>8} {:>8} {:>9} {:>8} {:>9} {:>12}",
        "NAME", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "CHUNKS", "MISSING", "SNAPSHOTS", "LEADER HEARD"
    );
    // Contact as the leader sees it: followers only hear from the leader.
    let seer = members.iter().filter_map(|m| m.status.as_ref().ok()).find(|s| s.role == "leader").unwrap_or(me);
    for m in members {
        match &m.status {
            Ok(s) => {
                let contact = if m.name == seer.name {
                    "-".to_string()
                } else {
                    seer.peers
                        .iter()
                        .find(|p| p.name == m.name)
                        .and_then(|p| p.last_contact_ms)
                        .map(|ms| format!("{:.1} s ago", ms as f64 / 1000.0))
                        .unwrap_or_else(|| "never".into())
                };
                let missing = match s.scanned_at {
                    Some(_) => s.chunks_missing.to_string(),
                    None => "?".into(),
                };
                println!(
                    "{:<12} {:<22} {:<13} {:>5} {:>8} {:>8} {:>9} {:>8} {:>9} {:>12}",
                    m.name,
                    m.addr,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.chunks_indexed,
                    missing,
                    s.snapshots,
                    contact
                );
            }
            Err(e) => println!("{:<12} {:<22} unreachable: {e}", m.name, m.addr),
        }
    }
    for m in members {
        if let Ok(s) = &m.status
            && let Some(why) = &s.backfill_error
        {
            println!("warning: {}: {why}", m.name);
        }
        if let Ok(s) = &m.status
            && s.unrepairable > 0
        {
            println!(
                "ERROR: {}: {} chunk(s) damaged that no peer could replace (exclave-replicator scrub --node {} shows them)",
                m.name, s.unrepairable, m.addr
            );
        }
    }
}

fn ago(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}

/// One line on garbage collection for `cluster status`: the last pass and the schedule.
/// Each tenant's history chain head as `SEQ:HASH`, the form `exclave-restore history verify
/// --expect-head` takes: what a tenant records outside the cluster.
fn heads_lines(heads: &[TenantHead]) -> String {
    let mut out = String::new();
    if !heads.is_empty() {
        out.push_str(
            "history chain heads (record them outside the cluster; `history verify --expect-head` checks one):\n",
        );
    }
    for h in heads {
        out.push_str(&format!("  {:<16} {}:{}\n", h.tenant, h.head.seq, hex::encode(h.head.hash)));
    }
    out
}

fn heads_json(heads: &[TenantHead]) -> serde_json::Value {
    heads
        .iter()
        .map(|h| serde_json::json!({ "tenant": h.tenant, "seq": h.head.seq, "hash": hex::encode(h.head.hash) }))
        .collect()
}

fn gc_line(g: &GcStatus, now: i64) -> String {
    let schedule = match g.interval_secs {
        Some(s) => format!("every {:.1} h", s as f64 / 3600.0),
        None => "only when asked".into(),
    };
    let running = if g.running { "; a pass is running now" } else { "" };
    match &g.last {
        None => format!("garbage collection: no pass yet ({schedule}, grace {} passes){running}", g.grace_passes),
        Some(r) => format!(
            "garbage collection: pass {} by {} ended {}: {} chunks examined, {} condemned ({}), {} swept ({}), \
             {} waiting for their grace ({}); {schedule}, grace {} passes{running}",
            r.pass,
            r.node,
            ago(now - r.finished),
            r.examined,
            r.condemned_chunks,
            mib(r.condemned_bytes),
            r.swept_chunks,
            mib(r.swept_bytes),
            r.pending_chunks,
            mib(r.pending_bytes),
            g.grace_passes
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::protocol::GcReport;

    #[test]
    fn history_heads_are_printed_as_history_verify_takes_them() {
        use exclave::protocol::HistoryHead;
        assert_eq!(heads_lines(&[]), "", "no tenant, no line");
        let heads = [TenantHead { tenant: "lux".into(), head: HistoryHead { seq: 12, hash: [0xab; 32] } }];
        let text = heads_lines(&heads);
        assert!(text.lines().nth(1).unwrap().ends_with(&format!("lux              12:{}", "ab".repeat(32))), "{text}");
        assert_eq!(heads_json(&heads)[0]["hash"], "ab".repeat(32));
        assert_eq!(heads_json(&heads)[0]["seq"], 12);
    }

    #[test]
    fn the_gc_line_says_what_the_last_pass_did_and_when() {
        let never = GcStatus { last: None, running: false, interval_secs: None, grace_passes: 1 };
        assert_eq!(gc_line(&never, 0), "garbage collection: no pass yet (only when asked, grace 1 passes)");
        let r = GcReport {
            pass: 7,
            node: "n2".into(),
            finished: 1000,
            examined: 50,
            condemned_chunks: 3,
            condemned_bytes: 3 << 20,
            swept_chunks: 2,
            swept_bytes: 1 << 19,
            pending_chunks: 3,
            pending_bytes: 3 << 20,
            ..Default::default()
        };
        let g = GcStatus { last: Some(r), running: true, interval_secs: Some(86_400), grace_passes: 1 };
        assert_eq!(
            gc_line(&g, 1000 + 3 * 3600),
            "garbage collection: pass 7 by n2 ended 3 h ago: 50 chunks examined, 3 condemned (3.0 MiB), \
             2 swept (0.5 MiB), 3 waiting for their grace (3.0 MiB); every 24.0 h, grace 1 passes; a pass is running now"
        );
    }
}
