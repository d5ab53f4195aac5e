//! Garbage collection with real nodes: space of forgotten snapshots comes back on every node
//! and what remains restores from one node alone; a backup deduplicating against chunks being
//! collected at that moment still commits a restorable snapshot; a node killed at each step of
//! GC resumes and loses nothing; the leftovers of an upload that never finished are swept; only
//! an administrator may run GC.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn gc(w: &World, node: &Node, identity: &str, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-replicator"))
        .args(["gc", "--json", "--node", &node.addr.to_string(), "--identity", identity, "--pki"])
        .arg(w.pki())
        .args(extra))
}

fn keep_last(w: &World, node: &Node, n: u32) {
    w.protect(node, "lux", 0);
    ok(run(Command::new(bin("exclave-replicator"))
        // Some tests set it before the tenant's first backup.
        .args([
            "retention",
            "set",
            "--tenant",
            "lux",
            "--source",
            "rnpp",
            "--new-tenant",
            "--keep-last",
            &n.to_string(),
        ])
        .args(["--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())));
}

/// Bytes of a node's pack files.
fn pack_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("packs"))
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Waits until a node's packs are below `bytes`; returns their size.
fn wait_packs_below(node: &Node, bytes: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let now = pack_bytes(&node.data);
        if now < bytes {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{}: packs still {now} bytes (want < {bytes})\n{}",
            node.name,
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn scrub(w: &World, node: &Node) -> serde_json::Value {
    json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["scrub", "--wait", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki()))))
}

fn snapshot_of(o: &std::process::Output) -> String {
    json(o)["snapshot"].as_str().unwrap().to_string()
}

#[test]
fn forgotten_snapshots_are_collected_on_every_node_and_the_rest_restores_from_one() {
    let w = World::new();
    let mut nodes = w.start_cluster_with(&["n1", "n2", "n3"], &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    let (old, kept) = (w.path("old"), w.path("kept"));
    sample_tree(&old, 11, 12 << 20);
    sample_tree(&kept, 12, 2 << 20);
    ok(w.backup(&nodes[0], "rnpp", &[&old]));
    let s2 = snapshot_of(&ok(w.backup(&nodes[0], "rnpp", &[&kept])));
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    let before: Vec<u64> = nodes.iter().map(|n| pack_bytes(&n.data)).collect();
    assert!(before.iter().all(|b| *b > 4 << 20), "{before:?}");

    // Agents cannot collect anything; nothing is referenced by nothing yet.
    let out = gc(&w, &nodes[0], "rnpp", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change the cluster (gc)"), "{}", stderr(&out));
    let idle = json(&ok(gc(&w, &nodes[0], "admin", &[])));
    assert_eq!(idle["cluster"]["condemned_chunks"], 0, "{idle}");

    // The administrator keeps only the newest snapshot: the old tree's chunks are garbage.
    keep_last(&w, &nodes[0], 1);
    let dry = json(&ok(gc(&w, &nodes[0], "admin", &["--dry-run"])));
    let would = dry["cluster"]["condemned_chunks"].as_u64().unwrap();
    assert!(would > 100, "{dry}");
    assert!(dry["cluster"]["condemned_bytes"].as_u64().unwrap() > 3 << 20, "{dry}");
    assert_eq!(
        json(&ok(gc(&w, &nodes[0], "admin", &["--dry-run"])))["cluster"]["condemned_chunks"],
        would,
        "a dry run changes nothing"
    );
    assert_eq!(pack_bytes(&nodes[0].data), before[0]);

    let r = json(&ok(gc(&w, &nodes[1], "admin", &[])));
    let c = &r["cluster"];
    assert_eq!(c["condemned_chunks"].as_u64(), Some(would), "{r}");
    assert_eq!(c["swept_chunks"].as_u64(), Some(would), "grace 0: swept in the same pass: {r}");
    assert!(r["local"]["pack_bytes_after"].as_u64().unwrap() < before[1] / 3, "{r}");
    // The nodes that did not run the pass give their space back too.
    for (i, n) in nodes.iter().enumerate() {
        wait_packs_below(n, before[i] / 3, Duration::from_secs(30));
    }
    let again = json(&ok(gc(&w, &nodes[0], "admin", &[])));
    assert_eq!(again["cluster"]["condemned_chunks"], 0, "nothing left to collect: {again}");
    // Every node's `cluster status` shows the last pass (it is in the catalog), by its number.
    let status = w.cluster_status(&nodes[2]).expect("cluster status");
    assert_eq!(status["gc"]["last"]["pass"], again["cluster"]["pass"], "{status}");
    assert_eq!(status["gc"]["last"]["node"], "n1", "{status}");
    assert_eq!(status["gc"]["grace_passes"], 0, "{status}");
    let text = ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "status", "--node", &nodes[1].addr.to_string(), "--pki"])
        .arg(w.pki())));
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(&format!("garbage collection: pass {} by n1 ended", again["cluster"]["pass"])), "{text}");

    // n2 alone restores what is kept, byte for byte, and its scrub finds every chunk whole.
    nodes[0].stop().expect("n1 stopped");
    nodes[2].stop().expect("n3 stopped");
    let to = w.path("restored");
    let out = json(&ok(w.restore(&nodes[1], "rnpp", &s2, &to)));
    assert_eq!(out["ok"], true);
    assert_same_tree(&kept, &to.join("kept"));
    let st = scrub(&w, &nodes[1]);
    assert_eq!(st["last"]["corrupt"], 0, "{st}");
}

/// Starts a backup of `tree` that stops before its commit until released; returns the child
/// and the release file.
fn held_backup(w: &World, node: &Node, tree: &Path, name: &str) -> (std::process::Child, std::path::PathBuf) {
    let hold = w.path(name);
    let child = spawn_held(
        Command::new(bin("exclave-agent"))
            .args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", "rnpp", "--key-file"])
            .arg(w.path("lux.key"))
            .args(["--source", "rnpp", "--chunk-avg", TEST_CHUNK_AVG])
            .arg(tree),
        "EXCLAVE_TEST_HOLD_COMMIT",
        &hold,
    );
    (child, hold)
}

fn release(child: std::process::Child, hold: &Path) -> std::process::Output {
    std::fs::write(hold, b"").unwrap();
    ok(child.wait_with_output().unwrap())
}

#[test]
fn a_backup_deduplicating_against_chunks_being_collected_commits_a_restorable_snapshot() {
    let w = World::new();
    let nodes = w.start_cluster_with(&["n1", "n2", "n3"], &["--gc-interval-hours", "0"]);
    let (data, other) = (w.path("data"), w.path("other"));
    sample_tree(&data, 21, 3 << 20);
    sample_tree(&other, 22, 1 << 20);
    keep_last(&w, &nodes[0], 1);

    // Condemned while the backup waits to commit: the commit puts the chunks back, nothing is sent.
    ok(w.backup(&nodes[0], "rnpp", &[&data]));
    ok(w.backup(&nodes[0], "rnpp", &[&other])); // the first snapshot is forgotten
    let (child, hold) = held_backup(&w, &nodes[0], &data, "hold-1");
    let r = json(&ok(gc(&w, &nodes[0], "admin", &[])));
    assert!(r["cluster"]["condemned_chunks"].as_u64().unwrap() > 20, "{r}");
    assert_eq!(r["cluster"]["swept_chunks"], 0, "grace of one pass: {r}");
    let out = release(child, &hold);
    let s = json(&out);
    assert_eq!(s["resends"], 0, "{s}");
    assert!(s["uploaded_bytes"].as_u64().unwrap() < 64 << 10, "the chunks were put back, not sent: {s}");
    let to = w.path("restored-1");
    ok(w.restore(&nodes[1], "rnpp", s["snapshot"].as_str().unwrap(), &to));
    assert_same_tree(&data, &to.join("data"));

    // Swept while the backup waits: its commit is told what is gone, and it sends it again.
    ok(w.backup(&nodes[0], "rnpp", &[&other])); // `data` is forgotten again
    let (child, hold) = held_backup(&w, &nodes[1], &data, "hold-2");
    let first = json(&ok(gc(&w, &nodes[2], "admin", &[])));
    let second = json(&ok(gc(&w, &nodes[2], "admin", &[])));
    assert!(first["cluster"]["condemned_chunks"].as_u64().unwrap() > 20, "{first}");
    assert!(second["cluster"]["swept_chunks"].as_u64().unwrap() > 20, "{second}");
    let out = release(child, &hold);
    let s = json(&out);
    assert_eq!(s["resends"], 1, "{s}");
    assert!(s["uploaded_bytes"].as_u64().unwrap() > 512 << 10, "{s}");
    let to = w.path("restored-2");
    let r = json(&ok(w.restore(&nodes[2], "rnpp", s["snapshot"].as_str().unwrap(), &to)));
    assert_eq!(r["ok"], true);
    assert_same_tree(&data, &to.join("data"));
}

#[test]
fn a_node_killed_at_each_step_of_gc_resumes_and_loses_nothing() {
    let w = World::new();
    let mut nodes = w.start_cluster_with(&["n1", "n2", "n3"], &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    keep_last(&w, &nodes[0], 1);
    // A follower runs the passes (its proposals go through the leader) and is killed.
    let v = (w.wait_leader(&nodes) + 1) % nodes.len();
    let mut latest = (String::new(), w.path("none"));
    for (round, step) in ["gc-swept", "gc-copied", "gc-before-delete"].iter().enumerate() {
        let (gone, kept) = (w.path(&format!("gone-{round}")), w.path(&format!("kept-{round}")));
        sample_tree(&gone, 30 + round as u64, 6 << 20);
        sample_tree(&kept, 40 + round as u64, 1 << 20);
        ok(w.backup(&nodes[0], "rnpp", &[&gone]));
        latest = (snapshot_of(&ok(w.backup(&nodes[0], "rnpp", &[&kept]))), kept.clone());
        // A write quorum is two of three: the node under test may still be storing its copies.
        let leader = w.wait_leader(&nodes);
        w.wait_backfilled(&nodes[v], &nodes[leader]);
        let before = pack_bytes(&nodes[v].data);
        assert!(before > 3 << 19, "{step}: {} holds {before} B of packs before the pass", nodes[v].name);

        nodes[v].restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", step)]);
        w.wait_sees_leader(&nodes[v]);
        let cut = Command::new(bin("exclave-replicator"))
            .args(["gc", "--json", "--node", &nodes[v].addr.to_string(), "--pki"])
            .arg(w.pki())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(nodes[v].wait_dead(Duration::from_secs(20)), "{step}: the node did not abort");
        // Restarted, the node resets the command's connection at once.
        nodes[v].restart_with_env(&[]);
        let out = cut.wait_with_output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{step}: the pass should have been cut short");
        w.wait_sees_leader(&nodes[v]);
        let r = json(&ok(gc(&w, &nodes[v], "admin", &[])));
        assert!(r["local"]["pack_bytes_after"].as_u64().unwrap() < before, "{step}: {r}");
        wait_packs_below(&nodes[v], before - (3 << 19), Duration::from_secs(30));
    }
    // That node alone: the kept snapshot restores byte for byte, every stored chunk is whole.
    for (i, n) in nodes.iter_mut().enumerate() {
        if i != v {
            n.stop().expect("stopped");
        }
    }
    let to = w.path("restored");
    let r = json(&ok(w.restore(&nodes[v], "rnpp", &latest.0, &to)));
    assert_eq!(r["ok"], true);
    assert_same_tree(&latest.1, &to.join(latest.1.file_name().unwrap()));
    let st = scrub(&w, &nodes[v]);
    assert_eq!(st["last"]["corrupt"], 0, "{st}");
}

#[test]
fn leftovers_of_an_upload_that_was_never_indexed_are_swept_after_two_passes() {
    let w = World::new();
    let mut nodes = w.start_cluster_with(&["n1", "n2", "n3"], &["--gc-interval-hours", "0"]);
    let src = w.path("src");
    sample_tree(&src, 51, 6 << 20);
    // A follower stores the upload on a quorum, then dies before it is indexed.
    let v = (w.wait_leader(&nodes) + 1) % nodes.len();
    nodes[v].restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", "chunks-stored")]);
    w.wait_sees_leader(&nodes[v]);
    let out = w.backup(&nodes[v], "rnpp", &[&src]);
    assert_ne!(out.status.code(), Some(0));
    assert!(nodes[v].wait_dead(Duration::from_secs(20)));
    nodes[v].restart_with_env(&[]);
    w.wait_sees_leader(&nodes[v]);
    // How much reached the node before it died depends on the agent's batching.
    let before = pack_bytes(&nodes[v].data);
    let held = |n: &Node| scrub(&w, n)["last"]["chunks"].as_u64().unwrap();
    assert!(held(&nodes[v]) > 0, "it holds chunks the index never named ({before} bytes of packs)");
    let peers: u64 = nodes.iter().enumerate().filter(|(i, _)| *i != v).map(|(_, n)| held(n)).sum();
    assert!(peers > 0, "so does a peer (one batch reached a quorum)");

    let first = json(&ok(gc(&w, &nodes[v], "admin", &[])));
    assert!(first["local"]["orphans_found"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["local"]["orphans_swept"], 0, "an upload may still be finishing: {first}");
    let second = json(&ok(gc(&w, &nodes[v], "admin", &[])));
    assert!(second["local"]["orphans_swept"].as_u64().unwrap() > 0, "{second}");
    // Swept on every node (the sweep goes through the log), and the space given back.
    for n in &nodes {
        assert_eq!(held(n), 0, "{} still holds orphans", n.name);
    }
    for n in &nodes {
        // Nothing else was ever stored: only empty pack headers may stay.
        wait_packs_below(n, 4096, Duration::from_secs(30));
    }
    // The backup, run again, stores everything again and restores.
    let s = json(&ok(w.backup(&nodes[v], "rnpp", &[&src])));
    let to = w.path("restored");
    ok(w.restore(&nodes[2], "rnpp", s["snapshot"].as_str().unwrap(), &to));
    assert_same_tree(&src, &to.join("src"));
}

#[test]
fn snapshots_stored_as_differences_keep_every_chunk_through_collection() {
    let w = World::new();
    let mut nodes = w.start_cluster_with(&["n1", "n2", "n3"], &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    let src = w.path("registry");
    sample_tree(&src, 21, 6 << 20);
    let mut made = Vec::new();
    for day in 0..3u8 {
        // Each day's document is only in that day's snapshot: in the older ones, only in what
        // their difference from the next adds.
        let doc: Vec<u8> = (0..400_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> (day + 3)) as u8).collect();
        std::fs::write(src.join(format!("documents/day-{day}.bin")), doc).unwrap();
        if day > 0 {
            std::fs::remove_file(src.join(format!("documents/day-{}.bin", day - 1))).unwrap();
        }
        let s = snapshot_of(&ok(w.backup(&nodes[0], "rnpp", &[&src])));
        let copy = w.path(&format!("day-{day}"));
        ok(run(Command::new("cp").arg("-a").arg(&src).arg(&copy)));
        made.push((s, copy));
    }
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    // Everything is referenced: a pass condemns nothing, and every day restores from one node.
    let r = json(&ok(gc(&w, &nodes[1], "admin", &[])));
    assert_eq!(r["cluster"]["condemned_chunks"], 0, "{r}");
    for (i, (s, copy)) in made.iter().enumerate() {
        let to = w.path(&format!("restored-{i}"));
        ok(w.restore(&nodes[2], "rnpp", s, &to));
        assert_same_tree(copy, &to.join("registry"));
    }
    // On a node that did not lead, the two older days are stored as differences.
    let follower = (leader + 1) % nodes.len();
    nodes[follower].stop();
    assert_eq!(count_catalog_keys(&nodes[follower].data, b"Blux\0"), 2, "older days stored as differences");
    assert_eq!(count_catalog_keys(&nodes[follower].data, b"rlux\0"), 1, "one whole list (a batch)");
    nodes[follower].restart();
    w.wait_sees_leader(&nodes[follower]);
    // Keeping the newest only: day 0's and day 1's documents are collected, day 2 restores.
    keep_last(&w, &nodes[0], 1);
    let r = json(&ok(gc(&w, &nodes[0], "admin", &[])));
    assert!(r["cluster"]["condemned_chunks"].as_u64().unwrap() >= 2, "{r}");
    let to = w.path("restored-last");
    ok(w.restore(&nodes[1], "rnpp", &made[2].0, &to));
    assert_same_tree(&made[2].1, &to.join("registry"));
    // Forgotten with their snapshots: no difference is left.
    w.wait_backfilled(&nodes[follower], &nodes[leader]);
    nodes[follower].stop();
    for prefix in [&b"Blux\0"[..], b"elux\0", b"flux\0"] {
        assert_eq!(count_catalog_keys(&nodes[follower].data, prefix), 0, "{}", String::from_utf8_lossy(prefix));
    }
    assert!(count_catalog_keys(&nodes[follower].data, b"rlux\0") >= 1);
}

#[test]
fn a_cluster_founded_before_packed_references_packs_them_once_its_upgrade_is_finalised() {
    // A cluster founded with the older layout, as one upgraded in place is. SAFETY: set before
    // this test process starts any thread; the nodes inherit it.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("EXCLAVE_TEST_OLD_LAYOUT", "1")
    };
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("registry");
    sample_tree(&src, 22, 6 << 20);
    let mut made = Vec::new();
    let mut backup_day = |nodes: &[Node], day: usize| {
        std::fs::write(src.join("documents/today.txt"), format!("day {day}")).unwrap();
        made.push(snapshot_of(&ok(w.backup(&nodes[0], "rnpp", &[&src]))));
    };
    backup_day(&nodes, 0);
    backup_day(&nodes, 1);
    let count = |nodes: &mut Vec<Node>, i: usize| {
        let leader = w.wait_leader(nodes);
        w.wait_backfilled(&nodes[i], &nodes[leader]);
        nodes[i].stop();
        let n = count_catalog_keys(&nodes[i].data, b"Blux\0");
        nodes[i].restart();
        w.wait_sees_leader(&nodes[i]);
        n
    };
    assert_eq!(count(&mut nodes, 2), 0, "packed before the upgrade was finalised");

    let at = nodes[1].addr.to_string();
    let finalize = |identity: &str| {
        run(Command::new(bin("exclave-replicator"))
            .args(["cluster", "finalize-upgrade", "--identity", identity, "--node", &at, "--pki"])
            .arg(w.pki()))
    };
    let o = finalize("rnpp");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("may not change the cluster (finalize_upgrade)"), "{}", stderr(&o));
    // A member of an older version holds the finalisation back, and so does one that cannot
    // be asked: either would go on applying commands the old way.
    nodes[2].restart_with_env(&[("EXCLAVE_TEST_KNOWN_LAYOUT", "1")]);
    let o = finalize("admin");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("n3 knows catalog layouts up to 1 (upgrade it first)"), "{}", stderr(&o));
    nodes[2].stop();
    let o = finalize("admin");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("n3 did not say which layouts it knows"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("n1") && !stderr(&o).contains("n2 "), "{}", stderr(&o));
    nodes[2].restart_with_env(&[]);
    w.wait_sees_leader(&nodes[2]);
    assert!(stdout(&ok(finalize("admin"))).contains("upgrade finalised"));
    backup_day(&nodes, 2);
    backup_day(&nodes, 3);
    // Days 1 and 2 are now differences from the day after; day 0 stays whole.
    assert_eq!(count(&mut nodes, 2), 2);
    for (i, s) in made.iter().enumerate() {
        let to = w.path(&format!("restored-{i}"));
        ok(w.restore(&nodes[2], "rnpp", s, &to));
        assert_eq!(std::fs::read_to_string(to.join("registry/documents/today.txt")).unwrap(), format!("day {i}"));
    }
}
