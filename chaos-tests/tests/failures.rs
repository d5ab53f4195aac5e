//! Bad input and broken parts: a wrong or missing key, a tampered chunk on the node, an
//! unwritable or full data directory, the node killed during an upload, a missing source.
//! Each gives a clear error, and nothing acknowledged is lost.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use exclave::keys::read_key_file;
use exclave_chaos_tests::*;

fn restore_with_key(w: &World, node: &Node, key: &Path) -> std::process::Output {
    let to = w.path("out-key");
    run(Command::new(bin("exclave-restore"))
        .args(["restore", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--source", "rnpp", "--key-file"])
        .arg(key)
        .arg("--to")
        .arg(&to))
}

#[test]
fn a_wrong_or_missing_key_file_is_named() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 1, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));

    // Same tenant, another key: refused before anything is decrypted, by fingerprint.
    let other = w.path("other-lux.key");
    ok(run(Command::new(bin("exclave-agent")).args(["keys", "init", "--tenant", "lux", "--out"]).arg(&other)));
    let out = restore_with_key(&w, &node, &other);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));

    // Another tenant's key.
    let out = restore_with_key(&w, &node, &w.path("est.key"));
    assert!(stderr(&out).contains("is for tenant \"est\""), "{}", stderr(&out));

    // No key file at all.
    let out = restore_with_key(&w, &node, &w.path("absent.key"));
    assert!(stderr(&out).contains("cannot read key file"), "{}", stderr(&out));

    // A key file others can read.
    use std::os::unix::fs::PermissionsExt;
    let loose = w.path("loose.key");
    std::fs::copy(w.path("lux.key"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = restore_with_key(&w, &node, &loose);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));

    // A damaged key file.
    let damaged = w.path("damaged.key");
    let text = std::fs::read_to_string(w.path("lux.key")).unwrap().replace("master_key = \"", "master_key = \"00");
    std::fs::write(&damaged, text).unwrap();
    std::fs::set_permissions(&damaged, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = restore_with_key(&w, &node, &damaged);
    assert!(stderr(&out).contains("not a valid Exclave key file"), "{}", stderr(&out));

    // An agent with a key of another tenant than its certificate commits nothing.
    let out = w.backup_as(&node, "rnpp", "est.key", "rnpp", &[&src], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is for tenant \"est\""), "{}", stderr(&out));
    let list = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn a_tampered_chunk_is_detected_and_its_file_named() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 2, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    let keys = read_key_file(&w.path("lux.key")).unwrap();
    // Small files are one chunk each, so their chunk id is the keyed hash of their content.
    let victim = "src/documents/2025/01/decision-005.xml";
    let liar = "src/documents/2025/01/decision-011.xml";
    let id = |rel: &str| keys.chunk_id(&std::fs::read(w.path(rel)).unwrap());

    assert_eq!(node.stop().map(|s| s.success()), Some(true), "clean stop on SIGTERM");
    tamper_chunk(&node.data, &id(victim), false, |env| {
        let n = env.len();
        env[n / 2] ^= 0x40;
    });
    tamper_chunk(&node.data, &id(liar), true, |env| {
        let n = env.len();
        env[n - 20] ^= 1;
    });
    let node = w.start_node_at("n1", &node.data.clone(), node.addr.port());

    for out in [w.verify(&node, "rnpp", "latest"), w.restore(&node, "rnpp", "latest", &w.path("restored"))] {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let report = json(&out);
        assert_eq!(report["ok"], false);
        let failures = report["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 2, "{failures:?}");
        let find = |p: &str| failures.iter().find(|f| f["path"] == p).unwrap_or_else(|| panic!("{p} not named"));
        let disk = find(victim)["error"].as_str().unwrap().to_string();
        assert!(disk.contains("damaged on this node's disk") && disk.contains("chunk "), "{disk}");
        let aead = find(liar)["error"].as_str().unwrap().to_string();
        assert!(aead.contains("authentication failed") && aead.contains("at offset 0"), "{aead}");
        // Every other file still verifies.
        assert_eq!(report["files"], 22);
    }
    // The damaged files are not left behind looking complete.
    assert!(!w.path("restored").join(victim).exists());
    assert!(w.path("restored/src/registers/persons/persons.tsv").exists());
}

#[test]
fn an_unwritable_data_directory_is_a_clear_startup_error() {
    let w = World::new();
    let dir = w.path("readonly");
    mount_tmpfs(&dir, "ro,size=1m");
    let _u = Unmount(dir.clone());
    let mut node = Node::spawn(&w, "n1", &dir.join("data"), free_port());
    let st = node.wait_exit(Duration::from_secs(20)).expect("node must exit");
    assert_eq!(st.code(), Some(1));
    let log = node.log_text();
    assert!(log.contains("opening the store") && log.contains("Read-only file system"), "{log}");
}

#[test]
fn a_full_disk_refuses_the_upload_and_keeps_what_was_acknowledged() {
    let w = World::new();
    let dir = w.path("small");
    mount_tmpfs(&dir, "size=64m");
    let _u = Unmount(dir.clone());
    let node = w.start_node_with("n1", &dir.join("data"), free_port(), &["--min-free-mib", "16"]);
    let small = w.path("small-src");
    sample_tree(&small, 3, 1 << 20);
    let first = json(&ok(w.backup(&node, "rnpp", &[&small])));

    let big = w.path("big-src");
    std::fs::create_dir_all(&big).unwrap();
    let mut noise = vec![0u8; 64 << 20];
    rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
    std::fs::write(big.join("scans.bin"), &noise).unwrap();
    let out = w.backup(&node, "scans", &[&big]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("storage is full"), "{}\nnode log:\n{}", stderr(&out), node.log_text());

    // The reserve was not crossed: concurrent batches count each other's room.
    let free = free_bytes(&dir);
    assert!(free >= 15 << 20, "{} MiB free of a 16 MiB reserve", free >> 20);
    // The node is still up, lists only the acknowledged snapshot, and restores it exactly.
    let list = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], first["snapshot"]);
    let to = w.path("restored");
    ok(w.restore(&node, "rnpp", "latest", &to));
    assert_same_tree(&small, &to.join("small-src"));
    assert!(node.log_text().contains("storage is full"), "{}", node.log_text());
}

fn free_bytes(dir: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

#[test]
fn a_node_restarted_on_a_completely_full_disk_starts_and_serves_restores() {
    let w = World::new();
    let dir = w.path("full");
    mount_tmpfs(&dir, "size=256m");
    let _u = Unmount(dir.clone());
    let mut node = w.start_node_with("n1", &dir.join("data"), free_port(), &["--min-free-mib", "32"]);
    let src = w.path("src");
    sample_tree(&src, 81, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    assert!(dir.join("data/ballast").exists(), "a ballast is laid where there is room");
    assert_eq!(node.stop().map(|s| s.success()), Some(true));
    // Something else fills the disk to the last byte while the node is down.
    let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![7u8; 1 << 20];
    loop {
        use std::io::Write;
        if filler.write_all(&block).is_err() {
            break;
        }
    }
    let mut small = vec![7u8; 4096];
    while std::io::Write::write_all(&mut filler, &small).is_ok() {}
    small.truncate(1);
    while std::io::Write::write_all(&mut filler, &small).is_ok() {}
    drop(filler);
    assert!(free_bytes(&dir) < 64 << 10, "{} bytes free", free_bytes(&dir));
    node.restart();
    assert!(node.log_text().contains("released the 64 MiB ballast"), "{}", node.log_text());
    // It serves restores, and refuses uploads with the reason.
    let to = w.path("restored");
    ok(w.restore(&node, "rnpp", "latest", &to));
    assert_same_tree(&src, &to.join("src"));
    let more = w.path("more");
    sample_tree(&more, 82, 1 << 20);
    let out = w.backup(&node, "more", &[&more]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("storage is full"), "{}", stderr(&out));
}

#[test]
fn a_node_killed_during_an_upload_loses_nothing_acknowledged() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let early = w.path("early");
    sample_tree(&early, 4, 1 << 20);
    let acknowledged = json(&ok(w.backup(&node, "rnpp", &[&early])));

    let big = w.path("big");
    sample_tree(&big, 5, 96 << 20);
    let agent = Command::new(bin("exclave-agent"))
        .args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "rnpp", "--key-file"])
        .arg(w.path("lux.key"))
        .args(["--source", "big"])
        .arg(&big)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the node once the upload is under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while du(&node.data.join("packs")) < 4 << 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    node.kill();
    let out = agent.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "the agent must fail, not hang or claim success");
    assert!(stderr(&out).contains("nothing was committed"), "{}", stderr(&out));

    let node = w.start_node_at("n1", &node.data.clone(), node.addr.port());
    let list = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert_eq!(list.as_array().unwrap().len(), 1, "only the acknowledged snapshot");
    assert_eq!(list[0]["id"], acknowledged["snapshot"]);

    let again = json(&ok(w.backup(&node, "big", &[&big])));
    assert!(
        again["chunks_new"].as_u64().unwrap() < again["chunks"].as_u64().unwrap(),
        "chunks stored before the kill are reused: {again}"
    );
    let to = w.path("restored");
    ok(w.restore(&node, "big", "latest", &to));
    assert_same_tree(&big, &to.join("big"));
    let to = w.path("restored-early");
    ok(w.restore(&node, "rnpp", "latest", &to));
    assert_same_tree(&early, &to.join("early"));
}

#[test]
fn an_agent_whose_node_dies_mid_upload_fails_instead_of_waiting_forever() {
    let w = World::new();
    let mut node = w.start_node("n1");
    node.restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", "put-chunks:3")]);
    let big = w.path("big");
    sample_tree(&big, 8, 48 << 20);
    // A small budget: once the uploads in flight fail, nothing more is read or sealed, and
    // the uploader is left waiting for input while its failed uploads hold the budget.
    let mut agent = Command::new(bin("exclave-agent"))
        .args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "rnpp", "--key-file"])
        .arg(w.path("lux.key"))
        .args(["--memory-budget-mib", "4", "--source", "big"])
        .arg(&big)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(node.wait_dead(Duration::from_secs(30)), "the node did not die at its third upload");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while agent.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            panic!("the agent still waits 60 s after its node died");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = agent.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing was committed"), "{}", stderr(&out));
}

#[test]
fn a_node_killed_at_each_step_of_a_chunk_write_serves_every_acknowledged_chunk() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let early = w.path("early");
    sample_tree(&early, 31, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&early]));
    // Records written but not synced; synced but not indexed; a batch cut in the middle of a
    // record (the torn tail a power cut leaves).
    for (i, step) in ["pack-written", "pack-synced", "mid-record"].into_iter().enumerate() {
        node.restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", step)]);
        let src = w.path(&format!("src-{step}"));
        sample_tree(&src, 40 + i as u64, 1 << 20);
        let source = format!("s{i}");
        let out = w.backup(&node, &source, &[&src]);
        assert_eq!(out.status.code(), Some(1), "nothing is acknowledged by a node that dies at {step}");
        assert!(node.wait_dead(Duration::from_secs(10)), "the node did not stop at {step}");
        assert!(node.log_text().contains(&format!("EXCLAVE_TEST_CRASH_AT={step}")), "{}", node.log_text());
        node.env.clear();
        node.restart();
        if step == "mid-record" {
            assert!(node.log_text().contains("cut off the torn tail"), "{}", node.log_text());
        }
        // Everything acknowledged before is served, byte for byte.
        let to = w.path(&format!("early-after-{step}"));
        ok(w.restore(&node, "rnpp", "latest", &to));
        assert_same_tree(&early, &to.join("early"));
        // The interrupted backup goes through now, and restores.
        ok(w.backup(&node, &source, &[&src]));
        let to = w.path(&format!("restored-{step}"));
        ok(w.restore(&node, &source, "latest", &to));
        assert_same_tree(&src, &to.join(src.file_name().unwrap()));
    }
}

fn du(p: &Path) -> u64 {
    walkdir::WalkDir::new(p).into_iter().filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

#[test]
fn a_missing_source_path_is_named_and_nothing_is_committed() {
    let w = World::new();
    let node = w.start_node("n1");
    let out = w.backup(&node, "rnpp", &[&w.path("no-such-dir")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-dir does not exist"), "{}", stderr(&out));
    let list = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert!(list.as_array().unwrap().is_empty());
}

#[test]
fn a_follower_whose_disk_fills_pauses_its_backfill_and_stays_up() {
    let w = World::new();
    let dir = w.path("small");
    mount_tmpfs(&dir, "size=64m");
    let _u = Unmount(dir.clone());
    let names = ["n1", "n2", "n3"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            // n3's data lives on the small disk, with a 16 MiB reserve.
            let (data, reserve) = if i == 2 { (dir.join("data"), "16") } else { (w.path(names[i]), "64") };
            let mut args = vec!["--min-free-mib".to_string(), reserve.into()];
            for j in (0..3).filter(|j| *j != i) {
                args.push("--peer".into());
                args.push(format!("{}=127.0.0.1:{}", names[j], ports[j]));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Node::spawn_with(&w, names[i], &data, ports[i], &args)
        })
        .collect();
    for n in &nodes {
        n.wait_ready();
    }
    let leader = w.wait_leader(&nodes);
    // More than n3 can hold: the write quorum (n1, n2) acknowledges it all the same.
    let big = w.path("big-src");
    std::fs::create_dir_all(&big).unwrap();
    let mut noise = vec![0u8; 64 << 20];
    rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
    std::fs::write(big.join("scans.bin"), &noise).unwrap();
    let via = if leader == 2 { 0 } else { leader };
    ok(w.backup_to(&[&nodes[via]], "scans", &[&big]));

    // n3 backfills up to its reserve, says why it stopped, and stays up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !nodes[2].log_text().contains("backfill paused: storage is full") {
        assert!(std::time::Instant::now() < deadline, "n3 never paused its backfill:\n{}", nodes[2].log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(nodes[2].running(), "n3 must survive a full disk:\n{}", nodes[2].log_text());
    let st = w.member_status(&nodes[2]);
    assert!(st["chunks_missing"].as_u64().unwrap() > 0, "{st}");
    assert!(st["backfill_error"].as_str().unwrap().contains("storage is full"), "{st}");
    let table = ok(run(Command::new(bin("exclave-replicator"))
        .args(["cluster", "status", "--node", &nodes[0].addr.to_string(), "--pki"])
        .arg(w.pki())));
    assert!(stdout(&table).contains("warning: n3: backfill paused: storage is full"), "{}", stdout(&table));
    // And it still takes part in the catalog: a small commit goes through.
    let small = w.path("small-src");
    sample_tree(&small, 3, 64 << 10);
    ok(w.backup_to(&[&nodes[via]], "rnpp", &[&small]));
}
