//! The audit log: every session of a restore or administrator identity is recorded through
//! the cluster, readable from any node by administrators and by the tenant's own restore
//! identities only, and kept across restarts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn audit(w: &World, node: &Node, identity: &str, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-replicator"))
        .args(["audit", "--json", "--identity", identity, "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(extra))
}

/// Waits until `node`'s log (read as admin) of `tenant` holds a session matching `pred`.
fn wait_record(w: &World, node: &Node, tenant: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let list = json(&ok(audit(w, node, "admin", &["--tenant", tenant])));
        if let Some(r) = list.as_array().unwrap().iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no such session recorded on {}: {list}", node.name);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_read_is_on_the_record_of_every_node_and_only_its_tenant_reads_it() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("registry");
    sample_tree(&src, 9, 1 << 20);
    let snap = json(&ok(w.backup(&nodes[0], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();

    // A restore team reads from n2.
    let to = w.path("restored");
    ok(w.restore(&nodes[1], "rnpp", &snap, &to));
    let r = wait_record(&w, &nodes[2], "lux", |r| r["identity"].as_str().unwrap().starts_with("restore:lux#"));
    assert_eq!(r["node"], "n2", "{r}");
    assert!(r["bytes"].as_u64().unwrap() > 64 << 10, "what was read: {r}");
    assert!(r["ended"].as_i64().unwrap() >= r["started"].as_i64().unwrap(), "{r}");
    assert_eq!((r["sources"][0].as_str(), r["snapshots"][0].as_str()), (Some("rnpp"), Some(snap.as_str())), "{r}");

    // The agent's backup is not a read, and is not in the log.
    let all = json(&ok(audit(&w, &nodes[0], "admin", &["--tenant", "lux"])));
    assert!(all.as_array().unwrap().iter().all(|r| !r["identity"].as_str().unwrap().starts_with("agent:")), "{all}");

    // The tenant's own restore identity reads it; another tenant's and an agent cannot.
    let own = json(&ok(audit(&w, &nodes[0], "dr", &[])));
    assert!(!own.as_array().unwrap().is_empty(), "{own}");
    let o = audit(&w, &nodes[0], "drest", &["--tenant", "lux"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may read the audit log of tenant est only"), "{}", stderr(&o));
    let o = audit(&w, &nodes[0], "rnpp", &["--tenant", "lux"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not read the audit log"), "{}", stderr(&o));

    // An administrator's change to the tenant is on its record too, with the certificate.
    ok(run(Command::new(bin("exclave-replicator"))
        .args([
            "retention",
            "hold",
            "--tenant",
            "lux",
            "--snapshot",
            &snap,
            "--node",
            &nodes[0].addr.to_string(),
            "--pki",
        ])
        .arg(w.pki())));
    let r = wait_record(&w, &nodes[1], "lux", |r| r["requests"].as_array().unwrap().iter().any(|q| q[0] == "set_hold"));
    assert!(r["identity"].as_str().unwrap().starts_with("admin#"), "{r}");
    assert_eq!(r["snapshots"][0], snap.as_str(), "{r}");

    // Kept across a restart of every node.
    for n in nodes.iter_mut() {
        n.stop().expect("stopped");
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    w.wait_leader(&nodes);
    let after = json(&ok(audit(&w, &nodes[2], "admin", &["--tenant", "lux", "--who", "restore:lux"])));
    assert!(!after.as_array().unwrap().is_empty(), "lost in a restart: {after}");
    // `--since` in the future lists nothing.
    let none = json(&ok(audit(&w, &nodes[2], "admin", &["--tenant", "lux", "--since", "2100-01-01"])));
    assert!(none.as_array().unwrap().is_empty(), "{none}");
}

fn history(w: &World, node: &Node, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-restore"))
        .args(["history", "verify", "--json", "--identity", "dr", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(extra))
}

#[test]
fn a_snapshot_record_removed_by_hand_breaks_the_history_on_that_node_only() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("registry");
    sample_tree(&src, 10, 256 << 10);
    let mut made = Vec::new();
    for i in 0..3 {
        std::fs::write(src.join("day.txt"), format!("day {i}")).unwrap();
        made.push(json(&ok(w.backup(&nodes[0], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string());
    }
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    // A drill's result is an event of the history too.
    let drill =
        run(w.restore_cmd(&nodes[0], "drill").args(["--source", "rnpp", "--json", "--scratch"]).arg(w.path("scratch")));
    assert_eq!(json(&drill)["verdict"], "PASS", "{}", stderr(&drill));
    for n in &nodes {
        let t = Instant::now();
        while json(&ok(run(w.restore_cmd(n, "drills").arg("--json")))).as_array().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(20), "the drill record did not reach {}", n.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let before = json(&ok(history(&w, &nodes[2], &[])));
    assert_eq!(before["ok"], true, "{before}");
    assert_eq!(before["snapshots_checked"], 3, "{before}");
    assert_eq!(
        (before["drills_checked"].as_u64(), before["drills_before_history"].as_u64()),
        (Some(1), Some(0)),
        "{before}"
    );
    let recorded = format!("{}:{}", before["head_seq"], before["head_hash"].as_str().unwrap());

    // An administrator reads every tenant's head in `cluster status`, and the tenant finds
    // that head in its chain (on the node that reported it: another may not have applied it yet).
    let st = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "status", "--json", "--node", &nodes[0].addr.to_string(), "--pki"])
        .arg(w.pki()))));
    let lux = st["history_heads"].as_array().unwrap().iter().find(|h| h["tenant"] == "lux").unwrap().clone();
    let (seq, hash) = (lux["seq"].as_u64().unwrap(), lux["hash"].as_str().unwrap());
    assert!(seq > 0, "{st}");
    let v = json(&ok(history(&w, &nodes[0], &["--expect-head", &format!("{seq}:{hash}")])));
    assert_eq!(v["ok"], true, "{v}");

    // Someone with n3's disks removes the middle snapshot's record.
    nodes[2].stop().expect("stopped");
    remove_snapshot_record(&nodes[2].data, &made[1]);
    nodes[2].restart();
    w.wait_sees_leader(&nodes[2]);
    let o = history(&w, &nodes[2], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v = json(&o);
    let why = v["first_break"].as_str().unwrap();
    assert!(why.contains(&made[1]) && why.contains("is missing and was never forgotten"), "{v}");

    // Someone with n2's disks removes the drill's record.
    nodes[1].stop().expect("stopped");
    assert_eq!(remove_drill_records(&nodes[1].data), 1);
    nodes[1].restart();
    w.wait_sees_leader(&nodes[1]);
    let o = history(&w, &nodes[1], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let v = json(&o);
    assert!(v["first_break"].as_str().unwrap().contains("the drill of rnpp started"), "{v}");
    assert!(v["first_break"].as_str().unwrap().contains("is missing"), "{v}");

    // n1 still holds both, and the head the tenant recorded is in its chain.
    let v = json(&ok(history(&w, &nodes[0], &["--expect-head", &recorded])));
    assert_eq!(v["ok"], true, "n1: {v}");
    // A head that was never the chain's is refused.
    let forged = format!("{}:{}", before["head_seq"], "00".repeat(32));
    let o = history(&w, &nodes[0], &["--expect-head", &forged]);
    assert_eq!(o.status.code(), Some(1));
    assert!(json(&o)["first_break"].as_str().unwrap().contains("recorded earlier"), "{}", stdout(&o));
}

#[test]
fn a_restore_at_the_last_embassy_standing_is_recorded_once_the_cluster_is_back() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("registry");
    sample_tree(&src, 11, 256 << 10);
    let snap = json(&ok(w.backup(&nodes[0], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    let leader = w.wait_leader(&nodes);
    w.wait_backfilled(&nodes[2], &nodes[leader]);
    // Two embassies lost: n3 alone serves the restore but has no majority to record it.
    nodes[0].stop().expect("stopped");
    nodes[1].stop().expect("stopped");
    ok(w.restore(&nodes[2], "rnpp", &snap, &w.path("restored")));
    let deadline = Instant::now() + Duration::from_secs(40);
    while !nodes[2].log_text().contains("kept on this node until it can") {
        assert!(Instant::now() < deadline, "{}", nodes[2].log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Kept across a restart of n3 itself, and recorded once the others are back.
    nodes[2].stop().expect("stopped");
    for n in nodes.iter_mut() {
        n.restart();
    }
    let r = wait_record(&w, &nodes[0], "lux", |r| r["node"] == "n3" && r["snapshots"][0] == snap.as_str());
    assert!(r["identity"].as_str().unwrap().starts_with("restore:lux#"), "{r}");
    // n3 logs it once its own proposal returns, which can be after n1 has applied the entry.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !nodes[2].log_text().contains("is now recorded in the audit log") {
        assert!(Instant::now() < deadline, "{}", nodes[2].log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}
