//! Retention through a real node: the agent sends its source's policy, the cluster applies
//! it on commit; an agent cannot shorten a policy in force, an administrator can.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use exclave_chaos_tests::*;

/// An agent config for source `docs`; `keep_last` 0 sends no retention policy.
fn config(w: &World, node: &Node, docs: &std::path::Path, keep_last: u32) -> std::path::PathBuf {
    let cfg = w.path(&format!("agent-{keep_last}.toml"));
    let retention = if keep_last > 0 { format!("retention = {{ keep-last = {keep_last} }}\n") } else { String::new() };
    std::fs::write(
        &cfg,
        format!(
            "node = [\"{}\"]\npki = \"{}\"\nidentity = \"rnpp\"\nkey-file = \"{}\"\nstate-dir = \"{}\"\n\n[sources.docs]\nkind = \"path\"\n\
             paths = [\"{}\"]\n{retention}",
            node.addr,
            w.pki().display(),
            w.path("lux.key").display(),
            w.path("state").display(),
            docs.display()
        ),
    )
    .unwrap();
    cfg
}

fn backup(cfg: &std::path::Path) -> serde_json::Value {
    json(&ok(run(Command::new(bin("exclave-agent"))
        .args(["backup", "--json", "--source", "docs", "--config"])
        .arg(cfg))))
}

#[test]
fn the_cluster_applies_retention_and_only_an_admin_shortens_it() {
    let w = World::new();
    let node = w.start_node("n1");
    // What a policy releases goes at once (the window has its own test below).
    w.protect(&node, "lux", 0);
    let docs = w.path("docs");
    sample_tree(&docs, 3, 128 << 10);
    // History made without a policy is not the agent's to erase: its first policy may not
    // forget what is already stored.
    let none = config(&w, &node, &docs, 0);
    let mut made = Vec::new();
    for _ in 0..2 {
        let s = backup(&none);
        assert!(s["retention"].is_null());
        made.push(s["snapshot"].as_str().unwrap().to_string());
    }
    let keep2 = config(&w, &node, &docs, 2);
    let s = backup(&config(&w, &node, &docs, 1));
    assert!(s["retention"].as_str().unwrap().contains("would forget 1 snapshot(s) already stored"), "{s}");
    assert_eq!(w.snapshot_ids(&node, "docs").len(), 3);
    // An administrator clears the way; from then on the agent's policy governs new snapshots.
    let o = run(Command::new(bin("exclave-replicator"))
        .args(["retention", "set", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "admin", "--tenant", "lux", "--source", "docs", "--keep-last", "1"]));
    ok(o);
    made.clear();
    for i in 0..4 {
        std::fs::write(docs.join("day.txt"), format!("day {i}")).unwrap();
        let s = backup(&keep2);
        assert_eq!(s["retention"], "keep last 2");
        made.push(s["snapshot"].as_str().unwrap().to_string());
    }
    assert_eq!(w.snapshot_ids(&node, "docs"), made[2..], "the two newest are kept (keep-last 2 lengthened 1)");

    // A shorter policy from the agent is refused; the snapshot still commits under the old one.
    let s = backup(&config(&w, &node, &docs, 1));
    assert!(s["retention"].as_str().unwrap().starts_with("refused:"), "{s}");
    assert!(s["retention"].as_str().unwrap().contains("may lengthen it but not shorten it"), "{s}");
    assert_eq!(w.snapshot_ids(&node, "docs"), [made[3].clone(), s["snapshot"].as_str().unwrap().to_string()]);

    // Only an administrator may shorten it; an agent identity is refused.
    let set = |identity: &str| {
        run(Command::new(bin("exclave-replicator"))
            .args(["retention", "set", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", identity, "--tenant", "lux", "--source", "docs", "--keep-last", "1"]))
    };
    // A tenant the cluster holds nothing of is a typo until said otherwise.
    let o = run(Command::new(bin("exclave-replicator"))
        .args(["retention", "set", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "admin", "--tenant", "lxu", "--source", "docs", "--keep-last", "1"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no data of tenant \"lxu\" (it knows: lux)"), "{}", stderr(&o));
    let o = set("rnpp");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not change the cluster"), "{}", stderr(&o));
    assert!(stdout(&ok(set("admin"))).contains("keep last 1"));
    let left = w.snapshot_ids(&node, "docs");
    assert_eq!(left, [s["snapshot"].as_str().unwrap().to_string()]);
    let to = w.path("restored");
    ok(w.restore(&node, "docs", "latest", &to));
    assert_same_tree(&docs, &to.join("docs"));
}

fn retention_show(w: &World, node: &Node) -> serde_json::Value {
    json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["retention", "show", "--json", "--tenant", "lux", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki()))))
}

#[test]
fn an_agent_flooding_commits_with_forged_times_cannot_push_history_out() {
    let w = World::new();
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let node = &nodes[0];
    let docs = w.path("docs");
    sample_tree(&docs, 5, 256 << 10);
    let keep2 = config(&w, node, &docs, 2);
    let mut honest = Vec::new();
    for i in 0..3 {
        std::fs::write(docs.join("day.txt"), format!("day {i}")).unwrap();
        honest.push(backup(&keep2)["snapshot"].as_str().unwrap().to_string());
    }
    let shown = retention_show(&w, node);
    assert_eq!(shown["protection_days"], 14, "{shown}");
    assert_eq!(shown["protection_set"], false, "{shown}");
    assert_eq!(shown["policies"][0][0], "docs", "{shown}");
    assert!(shown["cluster_time"].as_i64().unwrap() > 1_700_000_000, "{shown}");
    // Inside the window, keep-last 2 has kept all three (they are seconds old).
    assert_eq!(w.snapshot_ids(node, "docs").len(), 3);

    // A stolen agent certificate commits 200 snapshots claiming times from 1970 to past 2100.
    let forged = ok(run(Command::new(bin("exclave-forge-commits"))
        .arg(nodes[1].addr.to_string())
        .arg(w.pki())
        .args(["rnpp", "docs", "200"])));
    assert_eq!(json(&forged)["committed"], 200);
    let left = w.snapshot_ids(node, "docs");
    for h in &honest {
        assert!(left.contains(h), "{h} pushed out by forged commits: {left:?}");
    }
    assert_eq!(left.len(), 203, "nothing is forgotten inside the window");
    // Every node agrees, and the newest real snapshot restores byte for byte.
    for n in &nodes {
        let ids = w.snapshot_ids(n, "docs");
        assert!(honest.iter().all(|h| ids.contains(h)), "{}: {ids:?}", n.name);
    }
    let to = w.path("restored");
    ok(w.restore(&nodes[2], "docs", honest.last().unwrap(), &to));
    assert_same_tree(&docs, &to.join("docs"));

    // Only an administrator sets the window.
    let o = run(Command::new(bin("exclave-replicator"))
        .args(["retention", "protect", "--identity", "rnpp", "--tenant", "lux", "--days", "0"])
        .args(["--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki()));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not change the cluster"), "{}", stderr(&o));
    w.protect(node, "lux", 30);
    let shown = retention_show(&w, node);
    assert_eq!((shown["protection_days"].as_u64(), shown["protection_set"].as_bool()), (Some(30), Some(true)));
}

/// `exclave-replicator retention ...` as `identity`.
fn retention_as(w: &World, node: &Node, identity: &str, args: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-replicator"))
        .arg("retention")
        .args(args)
        .args(["--identity", identity, "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki()))
}

/// A second administrator certificate, `admin2`, for the changes that need two.
fn issue_second_admin(w: &World) {
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["pki", "issue", "--dir"])
        .arg(w.pki())
        .args(["--role", "admin", "--name", "admin2"])));
}

#[test]
fn locks_need_two_administrators_to_weaken_compliance_none_and_holds_keep_snapshots() {
    let w = World::new();
    issue_second_admin(&w);
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let node = &nodes[0];
    w.protect(node, "lux", 0);
    // Nothing backed up yet: a policy set ahead of the first backup says so.
    let o = retention_as(&w, node, "admin", &["set", "--tenant", "lux", "--source", "docs", "--keep-last", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no data of tenant \"lux\" (it knows: none)"), "{}", stderr(&o));
    ok(retention_as(
        &w,
        node,
        "admin",
        &["set", "--tenant", "lux", "--source", "docs", "--keep-last", "1", "--new-tenant"],
    ));
    ok(retention_as(
        &w,
        node,
        "admin",
        &["lock", "--tenant", "lux", "--source", "docs", "--mode", "governance", "--days", "30"],
    ));
    let docs = w.path("docs");
    sample_tree(&docs, 7, 128 << 10);
    let cfg = config(&w, node, &docs, 0);
    let mut made = Vec::new();
    for i in 0..3 {
        std::fs::write(docs.join("day.txt"), format!("day {i}")).unwrap();
        made.push(backup(&cfg)["snapshot"].as_str().unwrap().to_string());
    }
    assert_eq!(w.snapshot_ids(node, "docs"), made, "the lock keeps what keep-last 1 releases");

    // One administrator cannot remove a governance lock; a second one, with another certificate, can.
    let asked =
        stdout(&ok(retention_as(&w, node, "admin", &["lock", "--tenant", "lux", "--source", "docs", "--remove"])));
    assert!(asked.contains("a different administrator must approve"), "{asked}");
    let id = asked.split_whitespace().nth(1).unwrap().to_string();
    let shown = retention_show(&w, node);
    assert_eq!(shown["pending"][0]["id"].to_string(), id, "{shown}");
    assert_eq!(shown["locks"][0][1]["days"], 30, "still in force: {shown}");
    let o = retention_as(&w, &nodes[1], "admin", &["approve", &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("a different administrator must approve it"), "{}", stderr(&o));
    // A legal hold on the oldest snapshot, placed before the lock goes.
    let o = retention_as(&w, node, "rnpp", &["hold", "--tenant", "lux", "--snapshot", &made[0]]);
    assert!(stderr(&o).contains("may not change the cluster"), "{}", stderr(&o));
    ok(retention_as(
        &w,
        node,
        "admin",
        &["hold", "--tenant", "lux", "--snapshot", &made[0], "--reason", "case 2026-17"],
    ));
    ok(retention_as(&w, &nodes[2], "admin2", &["approve", &id]));
    let shown = retention_show(&w, node);
    assert!(shown["locks"].as_array().unwrap().is_empty(), "{shown}");
    assert_eq!(shown["holds"][0]["reason"], "case 2026-17", "{shown}");
    std::fs::write(docs.join("day.txt"), "day 3").unwrap();
    let last = backup(&cfg)["snapshot"].as_str().unwrap().to_string();
    assert_eq!(w.snapshot_ids(node, "docs"), [made[0].clone(), last], "the held one and the newest");

    // A compliance lock on the whole tenant: lengthened by one, shortened or removed by none.
    ok(retention_as(&w, node, "admin", &["lock", "--tenant", "lux", "--mode", "compliance", "--days", "10"]));
    ok(retention_as(&w, node, "admin2", &["lock", "--tenant", "lux", "--mode", "compliance", "--days", "20"]));
    for (who, args) in [
        ("admin", vec!["lock", "--tenant", "lux", "--mode", "compliance", "--days", "5"]),
        ("admin2", vec!["lock", "--tenant", "lux", "--mode", "governance", "--days", "20"]),
        ("admin", vec!["lock", "--tenant", "lux", "--remove"]),
    ] {
        let o = retention_as(&w, node, who, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains("nobody can shorten, weaken or remove it"), "{}", stderr(&o));
    }
    // The held snapshot restores.
    let to = w.path("restored");
    ok(w.restore(&nodes[1], "docs", &made[0], &to));
    assert!(to.join("docs").join("day.txt").exists());
    assert_eq!(std::fs::read_to_string(to.join("docs").join("day.txt")).unwrap(), "day 0");
}

#[test]
fn audit_records_are_kept_as_set_and_one_administrator_cannot_shorten_their_keeping() {
    let w = World::new();
    issue_second_admin(&w);
    let nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let keep = |i: usize, who: &str, extra: &[&str]| {
        retention_as(&w, &nodes[i], who, &[&["audit-keep", "--tenant", "lux"], extra].concat())
    };
    // Ten years unless set; the tenant's own restore identity may read it, another's may not.
    let v = json(&ok(keep(0, "dr", &["--json"])));
    assert_eq!((v["days"].as_u64(), v["set"].is_null(), v["pending"].is_null()), (Some(3660), true, true), "{v}");
    let o = keep(0, "drest", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may read the audit log of tenant est only"), "{}", stderr(&o));
    let o = keep(0, "rnpp", &["--days", "4000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not change the cluster (set_audit_keep)"), "{}", stderr(&o));

    // Lengthening: one administrator, at once.
    assert!(stdout(&ok(keep(0, "admin", &["--days", "4000"]))).contains("are kept 4000 days"));
    // Shortening: recorded; the same certificate again (on another node) is refused.
    let asked = stdout(&ok(keep(0, "admin", &["--days", "400"])));
    assert!(asked.contains("are kept 4000 days") && asked.contains("a different administrator"), "{asked}");
    let o = keep(1, "admin", &["--days", "400"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("a different administrator must ask for the same days"), "{}", stderr(&o));
    // Never shorter than the data it is about: a lock of 500 days forbids 400.
    ok(retention_as(&w, &nodes[0], "admin2", &["lock", "--tenant", "lux", "--mode", "compliance", "--days", "500"]));
    let o = keep(2, "admin2", &["--days", "400"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not be kept less"), "{}", stderr(&o));
    // Two administrators agree on 600 days.
    ok(keep(2, "admin2", &["--days", "600"]));
    assert_eq!(json(&ok(keep(1, "admin", &["--json"])))["days"], 4000);
    assert!(stdout(&ok(keep(1, "admin", &["--days", "600"]))).contains("are kept 600 days"));
    let v = json(&ok(keep(2, "dr", &["--json"])));
    let by = v["set"][0].as_str().unwrap();
    let who: Vec<&str> = by.split(" + ").collect();
    assert!(who.len() == 2 && who[0] != who[1] && who.iter().all(|w| w.starts_with("admin#")), "{v}");
    assert!(v["pending"].is_null(), "{v}");
    // The changes are events of the tenant's history chain (counted in the catalog's unit
    // test), which still verifies from any node.
    let v = json(&ok(run(Command::new(bin("exclave-restore"))
        .args(["history", "verify", "--json", "--identity", "dr", "--node", &nodes[1].addr.to_string(), "--pki"])
        .arg(w.pki()))));
    assert_eq!((v["ok"].as_bool(), v["first_break"].is_null()), (Some(true), true), "{v}");
}
