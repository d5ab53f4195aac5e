//! `exclave-replicator gc`: run a garbage-collection pass from one node now and report it.

use anyhow::{Result, bail};
use clap::Args;
use exclave::protocol::{GcResult, Reply, Request};

use crate::cluster::Conn;

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    conn: Conn,
    /// Report what a pass would condemn, sweep and give back, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Exit code 0 once the pass is done (1 with the error otherwise).
pub async fn run(a: GcArgs) -> Result<i32> {
    let client = a.conn.connect().await?;
    let reply = client.call(&[Request::Gc { dry_run: a.dry_run }]).await;
    client.close().await;
    let Reply::Gc(r) = reply? else { bail!("unexpected reply to gc") };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print(&r);
    }
    Ok(0)
}

fn print(r: &GcResult) {
    let (c, l) = (&r.cluster, &r.local);
    let would = if c.dry_run { "would be " } else { "" };
    println!(
        "garbage collection pass {}{} from {}: {} index entries examined",
        c.pass,
        if c.dry_run { " (dry run: nothing changed)" } else { "" },
        c.node,
        c.examined
    );
    println!(
        "  condemned  {} chunks, {} {}(no snapshot references them)",
        c.condemned_chunks,
        mib(c.condemned_bytes),
        would
    );
    println!("  swept      {} chunks, {} {}(deleted on every node)", c.swept_chunks, mib(c.swept_bytes), would);
    if c.pending_chunks > 0 {
        println!(
            "  waiting    {} chunks, {} condemned, swept after {} more pass(es) unless a backup needs them",
            c.pending_chunks,
            mib(c.pending_bytes),
            c.grace_passes
        );
    }
    if c.staged_dropped > 0 {
        println!("  dropped the staged references of {} commit(s) that never finished", c.staged_dropped);
    }
    println!(
        "node {}: {} orphan chunk(s) found, {} swept; {} pack(s) deleted, {} rewritten ({} copied); packs {} -> {}",
        l.node,
        l.orphans_found,
        l.orphans_swept,
        l.packs_deleted,
        l.packs_rewritten,
        mib(l.bytes_moved),
        mib(l.pack_bytes_before),
        mib(l.pack_bytes_after)
    );
    for s in &l.skipped {
        println!("  not yet: {s}");
    }
    if l.orphans_found > l.orphans_swept && !c.dry_run {
        println!("  orphans are swept when the next pass still finds them (an upload may be finishing)");
    }
    if !c.dry_run {
        println!("the other nodes give their space back within a minute");
    }
}
