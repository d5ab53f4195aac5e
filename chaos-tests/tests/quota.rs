//! Per-tenant quotas with a real node: only an administrator sets one; a tenant over its quota
//! is refused with a clear error naming it, another tenant is not; clearing it lets uploads in.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use exclave_chaos_tests::*;

fn quota(w: &World, node: &Node, identity: &str, args: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-replicator"))
        .arg("quota")
        .args(args)
        .args(["--node", &node.addr.to_string(), "--identity", identity, "--pki"])
        .arg(w.pki()))
}

fn noise(dir: &std::path::Path, mib: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut b = vec![0u8; mib << 20];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    std::fs::write(dir.join("scans.bin"), &b).unwrap();
}

#[test]
fn a_tenant_over_its_quota_is_refused_and_others_are_not() {
    let w = World::new();
    let node = w.start_node("n1");
    let out = quota(&w, &node, "rnpp", &["set", "--tenant", "lux", "--max-gib", "0.004"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change the cluster (set_quota)"), "{}", stderr(&out));
    ok(quota(&w, &node, "admin", &["set", "--tenant", "lux", "--max-gib", "0.004"]));

    let small = w.path("small");
    sample_tree(&small, 91, 256 << 10);
    ok(w.backup(&node, "rnpp", &[&small]));
    let big = w.path("big");
    noise(&big, 8);
    let out = w.backup(&node, "scans", &[&big]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("tenant lux is over its quota"), "{}", stderr(&out));
    assert!(stderr(&out).contains("the quota is 4 MiB"), "{}", stderr(&out));
    // Another tenant is not held by lux's quota.
    ok(w.backup_as(&node, "pop", "est.key", "scans", &[&big], &[]));

    let shown = json(&ok(quota(&w, &node, "admin", &["show", "--json"])));
    let lux = shown.as_array().unwrap().iter().find(|t| t["tenant"] == "lux").unwrap();
    assert_eq!(lux["quota_bytes"], (0.004 * (1u64 << 30) as f64) as u64);
    // What came in before the quota was reached stays (it is indexed); nothing beyond it.
    let used = lux["stored_bytes"].as_u64().unwrap();
    assert!(used > 0 && used <= lux["quota_bytes"].as_u64().unwrap(), "{lux}");
    let est = shown.as_array().unwrap().iter().find(|t| t["tenant"] == "est").unwrap();
    assert!(est["stored_bytes"].as_u64().unwrap() >= 8 << 20, "{est}");
    assert_eq!(est["quota_bytes"], serde_json::Value::Null);

    ok(quota(&w, &node, "admin", &["clear", "--tenant", "lux"]));
    ok(w.backup(&node, "scans", &[&big]));
}
