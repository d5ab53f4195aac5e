//! The embassy cluster: real `exclave-replicator` processes on loopback, each with its own
//! RocksDB, agreeing through Raft; nodes stopped, killed, added and removed; every scenario
//! ends with a restore compared byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn restore_alone(w: &World, node: &Node, source: &str, src: &Path, to: &str) {
    let out = w.path(to);
    let o = ok(w.restore(node, source, "latest", &out));
    assert_eq!(json(&o)["node"], node.addr.to_string());
    assert_same_tree(src, &out.join(src.file_name().expect("name")));
}

#[test]
fn every_node_alone_restores_everything() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 31, 3 << 20);
    let o = ok(w.backup_to(&[&nodes[1]], "rnpp", &[&src]));
    assert_eq!(json(&o)["attempts"], 1);
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    for i in 0..3 {
        for (j, n) in nodes.iter_mut().enumerate() {
            if j != i {
                n.stop().expect("stopped");
            }
        }
        restore_alone(&w, &nodes[i], "rnpp", &src, &format!("out-{i}"));
        // Cut off from the majority (once it has missed the leader for a few elections): it
        // still serves, and says its catalog may be stale.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = ok(run(w.restore_cmd(&nodes[i], "snapshots").args(["--source", "rnpp"])));
            if stderr(&o).contains("may be stale") {
                break;
            }
            assert!(Instant::now() < deadline, "no staleness warning: {}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
        for (j, n) in nodes.iter_mut().enumerate() {
            if j != i {
                n.restart();
            }
        }
        w.wait_leader(&nodes);
    }
}

#[test]
fn leader_killed_mid_upload_loses_nothing_acknowledged() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let small = w.path("small");
    sample_tree(&small, 1, 256 << 10);
    let first = json(&ok(w.backup_to(&[&nodes[0]], "rnpp", &[&small])))["snapshot"].as_str().unwrap().to_string();

    let big = w.path("big");
    // Large enough that the upload is still under way when the kill lands, even on a fast
    // machine (the status polls below take a few hundred milliseconds).
    sample_tree(&big, 2, 64 << 20);
    let leader = w.wait_leader(&nodes);
    let order: Vec<usize> = std::iter::once(leader).chain((0..3).filter(|i| *i != leader)).collect();
    let mut agent = Command::new(bin("exclave-agent"));
    agent.args(["backup", "--json"]);
    for i in &order {
        agent.args(["--node", &nodes[*i].addr.to_string()]);
    }
    agent.arg("--pki").arg(w.pki()).args(["--identity", "rnpp", "--key-file"]).arg(w.path("lux.key"));
    agent.args(["--source", "rnpp"]).arg(&big);
    let child = agent
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent");
    // Kill the leader once the upload is well under way.
    let status = |n: &Node| {
        let o = run(Command::new(bin("exclave-replicator"))
            .args(["status", "--json", "--node", &n.addr.to_string(), "--pki"])
            .arg(w.pki()));
        json(&o)["chunks"].as_u64().unwrap_or(0)
    };
    let before = status(&nodes[leader]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&nodes[leader]) < before + 5 {
        assert!(Instant::now() < deadline, "upload never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    nodes[leader].kill();
    let o = child.wait_with_output().expect("agent");
    let out = ok(o);
    let summary = json(&out);
    assert_eq!(summary["attempts"], 2, "the agent went on with another node: {}", stderr(&out));
    assert_ne!(summary["node"], nodes[leader].addr.to_string());
    let survivor = &nodes[order[1]];
    let ids = w.snapshot_ids(survivor, "rnpp");
    assert!(ids.contains(&first), "snapshot acknowledged before the kill is still listed: {ids:?}");
    assert_eq!(ids.len(), 2);
    restore_alone(&w, survivor, "rnpp", &big, "out");
}

#[test]
fn a_stopped_follower_backfills_and_then_restores_alone() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let leader = w.wait_leader(&nodes);
    let follower = (0..3).find(|i| *i != leader).unwrap();
    nodes[follower].stop().expect("stopped");
    let (a, b, c) = (w.path("a"), w.path("b"), w.path("c"));
    sample_tree(&a, 3, 2 << 20);
    sample_tree(&b, 4, 1 << 20);
    // Small chunks: more than the anti-entropy pass reads from the index at a time, so the
    // backfill must page through the whole index.
    sample_tree(&c, 5, 8 << 20);
    let up: Vec<&Node> = nodes.iter().filter(|n| n.running()).collect();
    ok(w.backup_to(&up, "rnpp", &[&a]));
    ok(w.backup_to(&up, "cadastre", &[&b]));
    ok(w.backup_to(&up, "rnpp", &[&b]));
    let small = json(&ok(w.backup_as(up[0], "rnpp", "lux.key", "documents", &[&c], &["--chunk-avg", "1024"])));
    assert!(small["chunks_new"].as_u64().unwrap() > 2 * 2048, "{small}");
    nodes[follower].restart();
    let leader = w.wait_leader(&nodes);
    let st = w.wait_backfilled(&nodes[follower], &nodes[leader]);
    assert!(st["chunks_indexed"].as_u64().unwrap() > 2 * 2048, "{st}");
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != follower {
            n.stop().expect("stopped");
        }
    }
    assert_eq!(w.snapshot_ids(&nodes[follower], "rnpp").len(), 2);
    restore_alone(&w, &nodes[follower], "cadastre", &b, "out-b");
    restore_alone(&w, &nodes[follower], "documents", &c, "out-c");
    let out = w.path("out-a");
    let list = json(&ok(run(w.restore_cmd(&nodes[follower], "snapshots").args(["--source", "rnpp", "--json"]))));
    let oldest = list[0]["id"].as_str().unwrap();
    ok(w.restore(&nodes[follower], "rnpp", oldest, &out));
    assert_same_tree(&a, &out.join("a"));
}

#[test]
fn a_node_cut_off_from_the_majority_refuses_commits_and_the_majority_goes_on() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 5, 1 << 20);
    ok(w.backup_to(&[&nodes[0]], "rnpp", &[&src]));
    w.wait_backfilled(&nodes[2], &nodes[w.wait_leader(&nodes)]);

    // n3 alone: its peers are stopped.
    nodes[0].stop().expect("stopped");
    nodes[1].stop().expect("stopped");
    // Until it has missed the leader for a few elections it cannot know it is cut off.
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.member_status(&nodes[2])["stale"].is_null() {
        assert!(Instant::now() < deadline, "n3 never noticed it is cut off");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Known data and new data alike: nothing is committed, and the error says why.
    let more = w.path("more");
    sample_tree(&more, 6, 256 << 10);
    for tree in [&src, &more] {
        let o = w.backup_to(&[&nodes[2]], "rnpp", &[tree]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("cannot reach a majority"), "{}", stderr(&o));
    }
    assert_eq!(w.snapshot_ids(&nodes[2], "rnpp").len(), 1);
    // It still serves restores, saying its catalog may be stale.
    let out = w.path("out");
    let r = ok(w.restore(&nodes[2], "rnpp", "latest", &out));
    assert!(stderr(&r).contains("may be stale"), "{}", stderr(&r));
    assert_same_tree(&src, &out.join("src"));
    let c = run(w.restore_cmd(&nodes[2], "snapshots").args(["--source", "rnpp", "--consistent"]));
    assert!(!c.status.success() && stderr(&c).contains("--consistent"), "{}", stderr(&c));

    // The majority, without n3, keeps committing.
    nodes[2].stop().expect("stopped");
    nodes[0].restart();
    nodes[1].restart();
    w.wait_leader(&nodes);
    let o = ok(w.backup_to(&[&nodes[0], &nodes[1]], "rnpp", &[&more]));
    let id = json(&o)["snapshot"].as_str().unwrap().to_string();
    let c = ok(run(w.restore_cmd(&nodes[1], "snapshots").args(["--source", "rnpp", "--json", "--consistent"])));
    assert!(json(&c).as_array().unwrap().iter().any(|s| s["id"] == id.as_str()));
}

#[test]
fn an_added_node_backfills_restores_alone_and_an_original_is_removed() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 7, 2 << 20);
    ok(w.backup_to(&[&nodes[0]], "rnpp", &[&src]));
    let port = free_port();
    let mut args = vec!["--min-free-mib".to_string(), "64".into(), "--join".into()];
    for n in &nodes {
        args.push("--peer".into());
        args.push(format!("{}={}", n.name, n.addr));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let n4 = w.start_node_with("n4", &w.path("data-n4"), port, &args);
    let via = nodes[1].addr.to_string();
    let admin = |extra: &[&str]| {
        let mut c = Command::new(bin("exclave-replicator"));
        c.args(["cluster"]).args(extra).args(["--node", &via, "--pki"]).arg(w.pki());
        run(&mut c)
    };
    let o = ok(admin(&["add-node", "--name", "n4", "--addr", &n4.addr.to_string()]));
    assert!(stdout(&o).contains("now a voter"), "{}", stdout(&o));
    let st = w.member_status(&n4);
    assert_eq!(st["role"], "follower");
    assert_eq!(st["voters"].as_array().unwrap().len(), 4);
    assert_eq!(st["chunks_missing"], 0);
    assert!(n4.log_text().contains("catalog snapshot installed"), "a new node catches up by snapshot");

    for n in nodes.iter_mut() {
        n.stop().expect("stopped");
    }
    restore_alone(&w, &n4, "rnpp", &src, "out");
    for n in nodes.iter_mut() {
        n.restart();
    }
    let mut all: Vec<Node> = nodes;
    all.push(n4);
    w.wait_leader(&all);
    let o = ok(admin(&["remove-node", "--name", "n1"]));
    assert!(stdout(&o).contains("n1 removed"), "{}", stdout(&o));
    // remove-node returns once the change is committed; n4 applies it a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    let voters = loop {
        let st = w.member_status(&all[3]);
        let mut v: Vec<String> =
            st["voters"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        v.sort();
        if v.len() < 4 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(voters, ["n2", "n3", "n4"]);
    all[0].stop();
    ok(w.backup_to(&[&all[3]], "rnpp", &[&src]));
}

#[test]
fn a_full_restart_keeps_the_catalog_terms_and_indexes() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 8, 1 << 20);
    let id = json(&ok(w.backup_to(&[&nodes[2]], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    let leader = w.wait_leader(&nodes);
    let before = w.member_status(&nodes[leader]);
    for n in nodes.iter_mut() {
        n.stop().expect("stopped");
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    let leader = w.wait_leader(&nodes);
    let after = w.member_status(&nodes[leader]);
    assert!(after["term"].as_u64() > before["term"].as_u64(), "terms continue: {before} → {after}");
    assert!(after["commit_index"].as_u64() >= before["commit_index"].as_u64(), "{before} → {after}");
    for n in &nodes {
        assert_eq!(w.snapshot_ids(n, "rnpp"), vec![id.clone()]);
    }
    restore_alone(&w, &nodes[0], "rnpp", &src, "out");
    ok(w.backup_to(&[&nodes[1]], "rnpp", &[&src]));
    let later = w.member_status(&nodes[w.wait_leader(&nodes)]);
    assert!(later["commit_index"].as_u64() > after["commit_index"].as_u64());
}

#[test]
fn a_joining_node_streams_a_catalog_of_many_pages_and_resumes_after_a_kill() {
    let w = World::new();
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    // Thousands of small chunks: a catalog of several hundred KiB, in 64 KiB pages.
    let src = w.path("src");
    sample_tree(&src, 61, 4 << 20);
    let o = json(&ok(w.backup_as(&nodes[0], "rnpp", "lux.key", "rnpp", &[&src], &["--chunk-avg", "1024"])));
    assert!(o["chunks_new"].as_u64().unwrap() > 2000, "{o}");
    let mut args = vec!["--min-free-mib".to_string(), "64".into(), "--join".into()];
    for n in &nodes {
        args.extend(["--peer".to_string(), format!("{}={}", n.name, n.addr)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut n4 = Node::spawn_with(&w, "n4", &w.path("data-n4"), free_port(), &args);
    n4.env = vec![
        ("EXCLAVE_TEST_SNAPSHOT_PAGE_BYTES".into(), "65536".into()),
        ("EXCLAVE_TEST_CRASH_AT".into(), "snapshot-page".into()),
    ];
    n4.kill();
    n4.restart();
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "add-node", "--learner", "--name", "n4", "--addr", &n4.addr.to_string()])
        .args(["--node", &nodes[0].addr.to_string(), "--pki"])
        .arg(w.pki())));
    // Killed after the first page of the snapshot is written.
    assert!(n4.wait_dead(Duration::from_secs(30)), "n4 did not stop mid-snapshot:\n{}", n4.log_text());
    assert!(n4.log_text().contains("EXCLAVE_TEST_CRASH_AT=snapshot-page"), "{}", n4.log_text());
    // Started again, it is sent a snapshot again and takes it whole.
    n4.env.retain(|(k, _)| k != "EXCLAVE_TEST_CRASH_AT");
    n4.restart();
    let leader = w.wait_leader(&nodes);
    let st = w.wait_backfilled(&n4, &nodes[leader]);
    assert!(st["chunks_indexed"].as_u64().unwrap() > 2000, "{st}");
    let log = n4.log_text();
    let line = log.lines().find(|l| l.contains("catalog snapshot streamed")).unwrap_or_else(|| panic!("{log}"));
    let pages: u64 = line.split("pages=").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert!(pages > 2, "a catalog of several pages: {line}");
    assert!(nodes[leader].log_text().contains("catalog checkpoint taken for a snapshot"));
    let list = ok(run(w.restore_cmd(&n4, "snapshots").args(["--json"])));
    assert_eq!(json(&list).as_array().unwrap().len(), 1);
    restore_alone(&w, &n4, "rnpp", &src, "out-n4");
}
