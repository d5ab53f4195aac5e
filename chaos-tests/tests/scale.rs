//! The catalog at a scale CI can afford: 10^5 chunks and 30 snapshots loaded through the real
//! protocol, then a fourth node joins. It catches up through a streamed catalog snapshot and
//! anti-entropy, with its memory bounded, and restores alone (`bench/scale.sh` runs the same
//! at 10^7 chunks).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use exclave_chaos_tests::*;

/// Peak resident memory of a process (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn a_node_joins_a_catalog_of_a_hundred_thousand_chunks_with_bounded_memory() {
    let w = World::new();
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let load = ok(run(Command::new(bin("exclave-scale-load"))
        .arg(nodes[0].addr.to_string())
        .arg(w.pki())
        .args(["rnpp", "100000", "30", "20000"])));
    assert!(stdout(&load).contains("committed 30 snapshots"), "{}", stdout(&load));
    // A leader elected during the load (the machine is busy) learns that the last commit is
    // committed only once an entry of its own term is: its catalog shows it moments later.
    let t = std::time::Instant::now();
    let (leader, st) = loop {
        let leader = w.wait_leader(&nodes);
        let st = w.member_status(&nodes[leader]);
        if st["snapshots"] == 30 || t.elapsed() > std::time::Duration::from_secs(20) {
            break (leader, st);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(st["chunks_indexed"], 100_000, "{st}");
    assert_eq!(st["snapshots"], 30, "{st}");

    let mut args = vec!["--min-free-mib".to_string(), "64".into(), "--join".into()];
    for n in &nodes {
        args.extend(["--peer".to_string(), format!("{}={}", n.name, n.addr)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let n4 = w.start_node_with("n4", &w.path("data-n4"), free_port(), &args);
    let started = std::time::Instant::now();
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "add-node", "--name", "n4", "--addr", &n4.addr.to_string()])
        .args(["--node", &nodes[leader].addr.to_string(), "--pki"])
        .arg(w.pki())));
    let st = w.wait_backfilled(&n4, &nodes[leader]);
    assert_eq!(st["chunks_indexed"], 100_000, "{st}");
    assert_eq!(st["snapshots"], 30, "{st}");
    assert!(n4.log_text().contains("catalog snapshot streamed"), "{}", n4.log_text());
    let rss = peak_rss_mib(n4.pid());
    eprintln!("n4 joined in {:.1} s, peak RSS {rss} MiB", started.elapsed().as_secs_f64());
    // The catalog (~20 MiB here) is never held whole: what a node holds is RocksDB's caches
    // and a page in flight.
    assert!(rss < 256, "n4 peak RSS {rss} MiB");
    // Every snapshot is there, listed by the new node.
    let list = ok(run(Command::new(bin("exclave-restore"))
        .args(["snapshots", "--json", "--node", &n4.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--source", "scale"])));
    assert_eq!(json(&list).as_array().unwrap().len(), 30);
}
