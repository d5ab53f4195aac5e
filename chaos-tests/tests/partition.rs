//! A real network partition: three embassy nodes on separate hosts (network namespaces),
//! the leader cut off from its peers while it keeps running and stays reachable by clients.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use exclave_chaos_tests::netns::Net;
use exclave_chaos_tests::*;

#[test]
fn a_partitioned_leader_steps_down_the_majority_commits_and_it_catches_up_after_healing() {
    let w = World::new();
    let net = Net::new(3);
    let names = ["p1", "p2", "p3"];
    let addrs: Vec<SocketAddr> = (1..=3).map(|i| format!("{}:7401", net.addr(i)).parse().unwrap()).collect();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| {
            w.issue_node(names[i - 1], &net.addr(i));
            let mut args = vec!["--min-free-mib".to_string(), "64".into()];
            for j in (1..=3).filter(|j| *j != i) {
                args.push("--peer".into());
                args.push(format!("{}={}", names[j - 1], addrs[j - 1]));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let data = w.path(&format!("data-{}", names[i - 1]));
            Node::spawn_in(&w, names[i - 1], &data, addrs[i - 1], Some(&net.ns(i)), &args)
        })
        .collect();
    for n in &nodes {
        n.wait_ready();
    }
    let old = w.wait_leader(&nodes);
    let src = w.path("src");
    sample_tree(&src, 11, 1 << 20);
    let first = json(&ok(w.backup_to(&[&nodes[old]], "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    for n in &nodes {
        w.wait_backfilled(n, &nodes[old]);
    }
    let term_before = w.member_status(&nodes[old])["term"].as_u64().unwrap();

    // Cut the leader off its peers; it keeps running and clients still reach it.
    net.cut(old + 1);
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        let leaders: Vec<Option<String>> =
            others.iter().map(|i| w.member_status(&nodes[*i])["leader"].as_str().map(str::to_string)).collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| x.as_deref() == Some(l.as_str()))
            && l != names[old]
        {
            break names.iter().position(|n| n == l).unwrap();
        }
        assert!(Instant::now() < deadline, "the majority elected no new leader: {leaders:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(w.member_status(&nodes[new])["term"].as_u64().unwrap() > term_before);

    // The old leader notices it is cut off, refuses commits and still serves restores.
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.member_status(&nodes[old])["stale"].is_null() {
        assert!(Instant::now() < deadline, "the partitioned leader never noticed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(w.member_status(&nodes[old])["role"], "leader", "a leader without a quorum must step down");
    let more = w.path("more");
    sample_tree(&more, 12, 512 << 10);
    let o = w.backup_to(&[&nodes[old]], "rnpp", &[&more]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot reach a majority"), "{}", stderr(&o));

    // The majority commits; an agent listing the old leader first fails over to it.
    let o = ok(w.backup_to(&[&nodes[old], &nodes[new]], "rnpp", &[&more]));
    let second = json(&o)["snapshot"].as_str().unwrap().to_string();
    assert_eq!(json(&o)["node"], nodes[new].addr.to_string());
    assert_eq!(
        w.snapshot_ids(&nodes[old], "rnpp"),
        std::slice::from_ref(&first),
        "the cut-off node cannot know of it yet"
    );
    let out = w.path("out-cut");
    let r = ok(w.restore(&nodes[old], "rnpp", &first, &out));
    assert!(stderr(&r).contains("may be stale"), "{}", stderr(&r));
    assert_same_tree(&src, &out.join("src"));

    // Healed: it follows the new leader, catches up the catalog and the chunks, and restores
    // the snapshot committed while it was cut off.
    net.heal(old + 1);
    w.wait_backfilled(&nodes[old], &nodes[new]);
    let st = w.member_status(&nodes[old]);
    assert_eq!(st["role"], "follower");
    assert_eq!(st["leader"], names[new]);
    assert!(st["stale"].is_null(), "{st}");
    assert_eq!(w.snapshot_ids(&nodes[old], "rnpp"), [first, second.clone()]);
    let out = w.path("out-healed");
    ok(w.restore(&nodes[old], "rnpp", &second, &out));
    assert_same_tree(&more, &out.join("more"));
}
