//! Certificate lifecycle with the real binaries: a revocation committed through the cluster
//! reaches every node (one that was down, one that joins later), closes open connections and
//! survives restarts; only an administrator may revoke; an expired certificate is refused and
//! a renewed one works; expiry is in `status`, in the metrics and in the programs' warnings.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use exclave::client::NodeClient;
use exclave::protocol::{Reply, Request};
use exclave::transport::TlsIdentity;
use exclave_chaos_tests::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

/// `exclave-replicator pki VERB ARGS --{dir_flag} PKI`.
fn pki_cmd(w: &World, verb: &str, dir_flag: &str, args: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-replicator")).args(["pki", verb]).args(args).arg(dir_flag).arg(w.pki()))
}

fn revoke(w: &World, via: &Node, name: &str, as_identity: &str) -> std::process::Output {
    let via = via.addr.to_string();
    pki_cmd(
        w,
        "revoke",
        "--pki",
        &["--node", &via, "--name", name, "--identity", as_identity, "--reason", "laptop stolen"],
    )
}

#[track_caller]
fn assert_revoked(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(1), "{}", stdout(out));
    assert!(stderr(out).contains("certificate revoked"), "expected a revocation refusal:\n{}", stderr(out));
}

/// Waits until `node` has applied what `leader` has committed.
fn wait_applied(w: &World, node: &Node, leader: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let commit = w.member_status(leader)["commit_index"].as_u64().unwrap();
        if w.cluster_status(node).is_some_and(|s| s["members"][0]["status"]["applied_index"].as_u64() >= Some(commit)) {
            return;
        }
        assert!(Instant::now() < deadline, "{} did not catch up", node.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_revocation_reaches_every_node_closes_open_connections_and_survives_restarts() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 21, 256 << 10);
    ok(w.backup(&nodes[0], "rnpp", &[&src]));
    // n3 is down while the revocation is committed.
    nodes[2].stop().expect("n3 stopped");
    w.wait_leader(&nodes);

    let rt = rt();
    let tls = TlsIdentity::load(&w.pki(), "rnpp").unwrap();
    let open: Vec<NodeClient> =
        nodes[..2].iter().map(|n| rt.block_on(NodeClient::connect(n.addr, &tls)).unwrap()).collect();
    for c in &open {
        assert!(matches!(rt.block_on(c.call(&[Request::Hello])), Ok(Reply::Hello { .. })));
    }

    // Not by an agent, and not by the administrator against its own certificate.
    let out = revoke(&w, &nodes[0], "pop", "rnpp");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change the cluster (revoke)"), "{}", stderr(&out));
    let out = revoke(&w, &nodes[0], "admin", "admin");
    assert!(stderr(&out).contains("revoke it from another administrator's"), "{}", stderr(&out));

    let out = ok(revoke(&w, &nodes[1], "rnpp", "admin"));
    assert!(stdout(&out).contains("revoked agent:lux:rnpp"), "{}", stdout(&out));
    let revoked_at = Instant::now();

    // The open connections are closed within seconds, on both running nodes.
    for (c, n) in open.iter().zip(&nodes) {
        let closed = loop {
            match rt.block_on(c.call(&[Request::Hello])) {
                Ok(_) if revoked_at.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(_) => panic!("{}: the revoked agent's connection is still open after 5 s", n.name),
                Err(e) => break e.to_string(),
            }
        };
        assert!(closed.contains("certificate revoked"), "{}: {closed}", n.name);
    }
    // New connections are refused at the handshake, on every running node.
    for n in &nodes[..2] {
        assert_revoked(&w.backup(n, "rnpp", &[&src]));
    }
    // Other identities are not affected.
    ok(w.backup_as(&nodes[0], "pop", "est.key", "pop", &[&src], &[]));
    ok(run(&mut w.restore_cmd(&nodes[1], "snapshots")));

    // The node that was down learns it from the log once it catches up.
    nodes[2].restart();
    let leader = w.wait_leader(&nodes);
    wait_applied(&w, &nodes[2], &nodes[leader]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_revoked(&w.backup(&nodes[2], "rnpp", &[&src]));

    // Every node restarted: refused from the first handshake (the catalog is on disk).
    for n in nodes.iter_mut() {
        n.stop().expect("stopped");
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    assert_revoked(&w.backup(&nodes[0], "rnpp", &[&src]));

    // A node that joins later refuses it too (it catches up from a catalog snapshot).
    w.wait_leader(&nodes);
    let mut args = vec!["--min-free-mib".to_string(), "64".into(), "--join".into()];
    for n in &nodes {
        args.extend(["--peer".to_string(), format!("{}={}", n.name, n.addr)]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let n4 = w.start_node_with("n4", &w.path("data-n4"), free_port(), &args);
    ok(run(Command::new(bin("exclave-replicator"))
        .args([
            "cluster",
            "add-node",
            "--name",
            "n4",
            "--addr",
            &n4.addr.to_string(),
            "--node",
            &nodes[0].addr.to_string(),
        ])
        .arg("--pki")
        .arg(w.pki())));
    std::thread::sleep(Duration::from_millis(1500));
    assert_revoked(&w.backup(&n4, "rnpp", &[&src]));

    // The record and the cluster both say so.
    let list = json(&ok(pki_cmd(&w, "list", "--dir", &["--json", "--node", &nodes[0].addr.to_string()])));
    let rnpp = list.as_array().unwrap().iter().find(|r| r["name"] == "rnpp").unwrap().clone();
    assert_eq!(rnpp["state"], "revoked");
    assert_eq!(rnpp["revoked"]["reason"], "laptop stolen");
    assert_eq!(rnpp["revoked"]["by"], "admin");
}

#[test]
fn an_expired_certificate_is_refused_and_a_renewed_one_works() {
    let w = World::new();
    let metrics_port = free_tcp_port();
    let node = w.start_node_with(
        "n1",
        &w.path("data-n1"),
        free_port(),
        &["--min-free-mib", "64", "--metrics", &format!("127.0.0.1:{metrics_port}")],
    );
    let src = w.path("src");
    sample_tree(&src, 22, 128 << 10);
    // An agent certificate that expired yesterday.
    let now = exclave::pki::now_secs();
    let req = exclave::pki::IssueRequest {
        identity: exclave::identity::Identity::parse("agent:lux:old").unwrap(),
        name: "old".into(),
        hosts: vec![],
        not_before: now - 30 * 86400,
        not_after: now - 86400,
    };
    exclave::pki::issue(&w.pki(), &req).unwrap();
    // The agent says so before it connects...
    let out = w.backup_as(&node, "old", "lux.key", "rnpp", &[&src], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("certificate old (agent:lux:old) expired on"), "{}", stderr(&out));
    // ...and the node refuses it at the handshake anyway.
    let rt = rt();
    let tls = TlsIdentity::load(&w.pki(), "old").unwrap();
    let err = rt.block_on(NodeClient::connect(node.addr, &tls)).err().expect("an expired certificate is refused");
    assert!(err.to_string().contains("certificate expired"), "{err}");

    // Renewed: same identity, new serial, accepted.
    let out = ok(pki_cmd(&w, "renew", "--dir", &["--name", "old"]));
    assert!(stdout(&out).contains("renewed agent:lux:old"), "{}", stdout(&out));
    ok(w.backup_as(&node, "old", "lux.key", "rnpp", &[&src], &[]));

    // A short certificate works and warns.
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["pki", "issue", "--role", "agent", "--tenant", "lux", "--name", "short", "--days", "10", "--dir"])
        .arg(w.pki())));
    let out = ok(w.backup_as(&node, "short", "lux.key", "rnpp", &[&src], &[]));
    assert!(stderr(&out).contains("certificate short (agent:lux:short) expires in 10 day(s)"), "{}", stderr(&out));

    // The node's status and metrics say when its certificate and the CA expire.
    let st = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["status", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki()))));
    let not_after = st["certificate"]["not_after"].as_i64().unwrap();
    assert!(not_after > now + 700 * 86400, "{st}");
    assert_eq!(st["certificate"]["subject"], "node:n1");
    let m = metrics(metrics_port);
    assert!(
        m.contains(&format!(
            "exclave_certificate_expiry_timestamp_seconds{{identity=\"node:n1\",node=\"n1\"}} {not_after}"
        )),
        "{m}"
    );
    assert!(m.contains("exclave_certificate_expiry_timestamp_seconds{identity=\"ca\""), "{m}");
    let list = json(&ok(pki_cmd(&w, "list", "--dir", &["--json"])));
    let olds: Vec<&serde_json::Value> = list.as_array().unwrap().iter().filter(|r| r["name"] == "old").collect();
    assert_eq!(olds.len(), 2, "the expired and the renewed certificate are both recorded");
    assert_eq!(olds[0]["state"], "expired");
    assert_eq!(olds[1]["state"], "valid");
}
