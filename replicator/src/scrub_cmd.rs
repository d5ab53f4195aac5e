//! `exclave-replicator scrub`: start a scrub pass on one node now, and show its result.

use anyhow::{Result, bail};
use clap::Args;
use exclave::protocol::{Reply, Request, ScrubReport};

use crate::cluster::Conn;

#[derive(Args)]
pub struct ScrubArgs {
    #[command(flatten)]
    conn: Conn,
    /// Return when the pass has ended, with its result (else at once, with the last one).
    #[arg(long)]
    wait: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit code 0, or 1 when chunks are unrepairable.
pub async fn run(a: ScrubArgs) -> Result<i32> {
    let client = a.conn.connect().await?;
    let reply = client.call(&[Request::Scrub { wait: a.wait }]).await;
    client.close().await;
    let Reply::Scrub(st) = reply? else { bail!("unexpected reply to scrub") };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        let show = |what: &str, r: &ScrubReport| {
            println!(
                "{what:<9} {} chunks, {:.1} MiB checked; {} damaged, {} repaired from peers{}",
                r.chunks,
                r.bytes as f64 / (1u64 << 20) as f64,
                r.corrupt,
                r.repaired,
                r.finished.map(|t| format!("; ended {}", exclave::pki::format_time(t))).unwrap_or_default()
            )
        };
        println!("node      {} ({} full pass(es) since it started)", st.node, st.passes);
        if let Some(r) = &st.running {
            show("running", r);
        }
        if let Some(r) = &st.last {
            show("last pass", r);
        }
        if !a.wait {
            println!("a pass was asked for; --wait returns with its result");
        }
        for d in &st.unrepairable {
            println!(
                "UNREPAIRABLE {}/{}: {} (snapshots: {})",
                d.tenant,
                d.chunk,
                d.why,
                if d.snapshots.is_empty() { "none".to_string() } else { d.snapshots.join(", ") }
            );
        }
    }
    Ok(if st.unrepairable.is_empty() { 0 } else { 1 })
}
