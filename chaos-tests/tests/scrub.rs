//! Scrub and repair with real nodes: a byte flipped in one node's stored data is found by a
//! scrub pass and replaced from a peer, after which that node alone restores byte for byte; a
//! chunk damaged on every node is reported unrepairable, naming the snapshot that needs it; a
//! non-admin cannot start a scrub; a pass killed part way resumes where it was.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use exclave::keys::read_key_file;
use exclave_chaos_tests::*;

fn scrub(w: &World, node: &Node, identity: &str) -> std::process::Output {
    run(Command::new(bin("exclave-replicator"))
        .args(["scrub", "--wait", "--json", "--node", &node.addr.to_string(), "--identity", identity, "--pki"])
        .arg(w.pki()))
}

/// A cluster of three holding one snapshot everywhere; returns the nodes, the source tree,
/// the snapshot id and the id of one chunk of it (a small file is one chunk).
fn cluster_with_a_snapshot(w: &World) -> (Vec<Node>, std::path::PathBuf, String, exclave::ChunkId) {
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 71, 1 << 20);
    let snap = json(&ok(w.backup(&nodes[0], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    let keys = read_key_file(&w.path("lux.key")).unwrap();
    let id = keys.chunk_id(&std::fs::read(src.join("documents/2025/01/decision-007.xml")).unwrap());
    (nodes, src, snap, id)
}

fn flip(env: &mut [u8]) {
    let n = env.len();
    env[n / 2] ^= 0x10;
}

#[test]
fn a_flipped_byte_is_found_repaired_from_a_peer_and_the_node_then_restores_alone() {
    let w = World::new();
    let (mut nodes, src, _, id) = cluster_with_a_snapshot(&w);
    nodes[1].stop().expect("n2 stopped");
    tamper_chunk(&nodes[1].data, &id, false, |e| flip(e));
    nodes[1].restart();
    w.wait_leader(&nodes);

    // Only an administrator starts a scrub.
    let out = scrub(&w, &nodes[1], "rnpp");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change the cluster (scrub)"), "{}", stderr(&out));

    let out = ok(scrub(&w, &nodes[1], "admin"));
    let st = json(&out);
    let last = &st["last"];
    assert_eq!((last["corrupt"].as_u64(), last["repaired"].as_u64()), (Some(1), Some(1)), "{st}");
    assert!(last["chunks"].as_u64().unwrap() > 20, "{st}");
    assert_eq!(st["unrepairable"], serde_json::json!([]));
    assert!(nodes[1].log_text().contains("damaged chunk repaired from a peer"), "{}", nodes[1].log_text());
    // A second pass finds nothing wrong.
    let again = json(&ok(scrub(&w, &nodes[1], "admin")));
    assert_eq!(again["last"]["corrupt"], 0, "{again}");

    // n2 alone restores everything, the repaired file included.
    nodes[0].stop().expect("n1 stopped");
    nodes[2].stop().expect("n3 stopped");
    let to = w.path("restored");
    let r = json(&ok(w.restore(&nodes[1], "rnpp", "latest", &to)));
    assert_eq!(r["ok"], true);
    assert_same_tree(&src, &to.join("src"));
}

#[test]
fn a_chunk_damaged_on_every_node_is_reported_unrepairable_with_its_snapshots() {
    let w = World::new();
    let (mut nodes, _, snap, id) = cluster_with_a_snapshot(&w);
    for n in nodes.iter_mut() {
        n.stop().expect("stopped");
        tamper_chunk(&n.data.clone(), &id, false, |e| flip(e));
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    w.wait_leader(&nodes);
    let out = scrub(&w, &nodes[0], "admin");
    assert_eq!(out.status.code(), Some(1), "unrepairable chunks make the command fail");
    let st = json(&out);
    assert_eq!(st["last"]["corrupt"], 1, "{st}");
    assert_eq!(st["last"]["repaired"], 0, "{st}");
    let lost = &st["unrepairable"][0];
    assert_eq!(lost["tenant"], "lux");
    assert_eq!(lost["chunk"], id.to_string());
    assert_eq!(lost["snapshots"], serde_json::json!([snap]), "{st}");
    assert!(nodes[0].log_text().contains("UNREPAIRABLE"), "{}", nodes[0].log_text());
    let table = ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "status", "--node", &nodes[0].addr.to_string(), "--pki"])
        .arg(w.pki())));
    assert!(stdout(&table).contains("ERROR: n1: 1 chunk(s) damaged that no peer could replace"), "{}", stdout(&table));
}

/// A pass killed after its first page of 1024 chunks resumes from its cursor when the node
/// comes back, checks only what was left, and the next pass checks everything again.
#[test]
fn a_scrub_pass_killed_part_way_resumes_where_it_was() {
    let w = World::new();
    let mut node = w.start_node_with("n1", &w.path("n1"), free_port(), &["--scrub-interval-hours", "0"]);
    // Three pages of chunks (tiny ones, through the real protocol).
    ok(run(Command::new(bin("exclave-scale-load"))
        .arg(node.addr.to_string())
        .arg(w.pki())
        .args(["rnpp", "3000", "1", "3000"])));
    node.restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", "scrub-page")]);
    let out = scrub(&w, &node, "admin");
    assert!(!out.status.success(), "the node dies after its first page");
    assert!(node.wait_dead(std::time::Duration::from_secs(20)), "{}", node.log_text());
    assert!(node.log_text().contains("EXCLAVE_TEST_CRASH_AT=scrub-page"), "{}", node.log_text());

    node.env.clear();
    node.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node.log_text().contains("scrub pass complete") {
        assert!(std::time::Instant::now() < deadline, "the resumed pass never completed:\n{}", node.log_text());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(node.log_text().contains("scrub pass resumed where it was interrupted"), "{}", node.log_text());
    // The resumed pass checked what was after the first page; a pass asked now checks all.
    let log = node.log_text();
    let line = log.lines().find(|l| l.contains("scrub pass complete")).unwrap();
    let resumed: u64 = line.split("chunks=").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    let full = json(&ok(scrub(&w, &node, "admin")));
    let all = full["last"]["chunks"].as_u64().unwrap();
    assert!(all >= 3000, "{full}");
    assert_eq!(resumed, all - 1024, "the resumed pass began after the first page: {line}");
    assert_eq!(full["last"]["corrupt"], 0, "{full}");
}
