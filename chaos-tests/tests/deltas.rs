//! Deltas with real binaries: a register changed a little every day travels as deltas on the
//! chunks it replaced, restores exactly for every day from one node after garbage collection
//! took the forgotten days (the bases they were built on stay), and an agent whose delta cache
//! was deleted or damaged sends full chunks and still restores exactly; a damaged base on the
//! node fails the restore of its deltas, naming the delta and the base, and a scrub repairs
//! it from a peer, after which that node alone restores the deltas.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use exclave_chaos_tests::*;

const ROWS: u64 = 30_000;

fn mix(a: u64, b: u64) -> u64 {
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// The register on `day`: about 1 % of the rows change each day, in place, and a few are
/// appended; `rewrite` changes every row from that day on (a migration).
fn register(dir: &Path, day: u64, rewrite: Option<u64>) {
    register_of(dir, day, rewrite, ROWS)
}

/// The register of `rows` rows on `day`.
fn register_of(dir: &Path, day: u64, rewrite: Option<u64>, rows: u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("letters")).unwrap();
    let cities = ["Tallinn", "Tartu", "Narva", "Pärnu", "Kohtla-Järve", "Viljandi", "Rakvere", "Maardu"];
    let mut out = String::with_capacity(2 << 20);
    out.push_str("COPY persons (id, name, born, city, moves) FROM stdin;\n");
    for i in 0..rows + day * 40 {
        let moves = (1..=day).filter(|d| mix(i, *d).is_multiple_of(100)).count() as u64;
        let city = cities[((mix(i, 0) + moves * 3) % cities.len() as u64) as usize];
        let migrated = rewrite.is_some_and(|r| day >= r);
        let name = if migrated {
            format!("PERSON-{:08}", mix(i, 1) % 100_000_000)
        } else {
            format!("person{}", mix(i, 1) % 100_000)
        };
        let (yy, mm, dd) = (mix(i, 2) % 100, 1 + i % 9, i % 10);
        if migrated {
            // Every field rewritten or moved, so that no row matches its old self.
            out.push_str(&format!("{i};{name};1{dd}.0{mm}.19{yy:02};{};{moves}\n", city.to_uppercase()));
        } else {
            out.push_str(&format!("{i}\t{name}\t19{yy:02}-0{mm}-1{dd}\t{city}\t{moves}\n"));
        }
    }
    out.push_str("\\.\n");
    std::fs::write(dir.join("persons.sql"), out).unwrap();
    for d in 0..=day {
        std::fs::write(dir.join("letters").join(format!("{d}.txt")), format!("decision of day {d}\n").repeat(50))
            .unwrap();
    }
}

/// The records of a delta cache's pack: chunk id (32) ‖ length (u32 LE) ‖ envelope; gives
/// (id, where the envelope starts, its length).
fn pack_records(pack: &[u8]) -> Vec<(exclave::ChunkId, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < pack.len() {
        let len = u32::from_le_bytes(pack[at + 32..at + 36].try_into().unwrap()) as usize;
        out.push((exclave::ChunkId(pack[at..at + 32].try_into().unwrap()), at + 36, len));
        at += 36 + len;
    }
    out
}

fn backup(w: &World, node: &Node, src: &Path, cache: &Path) -> serde_json::Value {
    json(&ok(w.backup_as(node, "rnpp", "lux.key", "reg", &[src], &["--delta-cache", cache.to_str().unwrap()])))
}

fn restore_matches(w: &World, node: &Node, snapshot: &str, day: u64, rewrite: Option<u64>) {
    let (to, expect) = (w.path(&format!("restored-{snapshot}")), w.path(&format!("expect-{snapshot}")));
    register(&expect, day, rewrite);
    ok(w.restore(node, "reg", snapshot, &to));
    let restored = to.join("src");
    assert_eq!(
        std::fs::read(restored.join("persons.sql")).unwrap(),
        std::fs::read(expect.join("persons.sql")).unwrap(),
        "day {day}"
    );
    for d in 0..=day {
        let f = format!("letters/{d}.txt");
        assert_eq!(
            std::fs::read(restored.join(&f)).unwrap(),
            std::fs::read(expect.join(&f)).unwrap(),
            "day {day}: {f}"
        );
    }
}

#[test]
fn ten_days_of_change_travel_as_deltas_and_every_kept_day_restores_after_gc() {
    let w = World::new();
    let node =
        w.start_node_with("n1", &w.path("n1"), free_port(), &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    let (src, cache) = (w.path("src"), w.path("cache"));
    let mut snaps = Vec::new();
    let mut uploaded = Vec::new();
    for day in 0..10 {
        register(&src, day, None);
        let s = backup(&w, &node, &src, &cache);
        if day == 0 {
            assert_eq!(s["delta_chunks"], 0, "{s}");
        } else {
            assert!(s["delta_chunks"].as_u64().unwrap() > 3, "day {day}: {s}");
        }
        assert!(s["delta_cache_bytes"].as_u64().unwrap() > 0, "{s}");
        uploaded.push(s["uploaded_bytes"].as_u64().unwrap());
        snaps.push(s["snapshot"].as_str().unwrap().to_string());
    }
    // A day of change costs a small part of the first day. Deltas are built on the full
    // chunk of their region and grow as it drifts; a region re-based (sent full again) makes
    // some days dearer than others.
    for (day, up) in uploaded.iter().enumerate().skip(1) {
        assert!(up * 3 < uploaded[0], "day {day} uploaded {up} against {} on day 0: {uploaded:?}", uploaded[0]);
    }
    let later: u64 = uploaded[1..].iter().sum();
    assert!(later * 6 < uploaded[0] * 9, "nine days of change cost a sixth of a full day each at most: {uploaded:?}");

    // The administrator keeps the last five days; GC takes what only the first five needed,
    // but not the bases (written on day 0) the deltas of the kept days are built on.
    w.protect(&node, "lux", 0);
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["retention", "set", "--tenant", "lux", "--source", "reg", "--keep-last", "5"])
        .args(["--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())));
    register(&src, 10, None);
    snaps.push(backup(&w, &node, &src, &cache)["snapshot"].as_str().unwrap().to_string());
    let gc = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["gc", "--json", "--node", &node.addr.to_string(), "--identity", "admin", "--pki"])
        .arg(w.pki()))));
    assert!(gc["cluster"]["swept_chunks"].as_u64().unwrap() > 0, "the forgotten days' deltas are collected: {gc}");
    let kept = w.snapshot_ids(&node, "reg");
    assert_eq!(kept.len(), 5, "{kept:?}");
    for (day, id) in snaps.iter().enumerate().skip(6) {
        assert!(kept.contains(id), "day {day} was kept: {kept:?}");
        restore_matches(&w, &node, id, day as u64, None);
    }
    assert!(verify_ok(&w, &node, &snaps[10]));
}

/// At the default chunk size (1 MiB, up to 4 MiB) a changed chunk still finds all of its base:
/// day 2 of a ~7 MiB register costs a few percent of day 1, and both days restore exactly.
#[test]
fn day_two_travels_as_deltas_at_the_default_chunk_size() {
    const BIG: u64 = 200_000;
    let w = World::new();
    let node = w.start_node("n1");
    let (src, cache) = (w.path("src"), w.path("cache"));
    let default = ["--delta-cache", cache.to_str().unwrap(), "--chunk-avg", "1048576"];
    let mut days = Vec::new();
    for day in 0..2 {
        register_of(&src, day, None, BIG);
        days.push(json(&ok(w.backup_as(&node, "rnpp", "lux.key", "reg", &[&src], &default))));
    }
    let (d0, d1) = (&days[0], &days[1]);
    assert!(d0["chunks"].as_u64().unwrap() >= 4, "{d0}");
    assert!(d1["delta_chunks"].as_u64().unwrap() >= 3, "{d1}");
    let (up0, up1) = (d0["uploaded_bytes"].as_u64().unwrap(), d1["uploaded_bytes"].as_u64().unwrap());
    assert!(up1 * 20 < up0, "day 2 uploaded {up1} bytes against {up0} on day 1: {d1}");
    for (day, s) in days.iter().enumerate() {
        let (to, expect) = (w.path(&format!("restored-{day}")), w.path(&format!("expect-{day}")));
        register_of(&expect, day as u64, None, BIG);
        ok(w.restore(&node, "reg", s["snapshot"].as_str().unwrap(), &to));
        assert_eq!(
            std::fs::read(to.join("src/persons.sql")).unwrap(),
            std::fs::read(expect.join("persons.sql")).unwrap()
        );
    }
}

/// A backup asked whether its bases exist, then garbage collection swept them before its
/// deltas arrived: the deltas are refused, the agent runs again and sends those chunks whole
/// or on bases it sent again (the node replacing the refused copies), and the snapshot
/// restores exactly. Before the
/// index checked bases, the deltas were indexed on a swept base and every commit was refused.
#[test]
fn deltas_whose_base_was_swept_while_the_backup_ran_are_sent_again_whole() {
    let w = World::new();
    let node =
        w.start_node_with("n1", &w.path("n1"), free_port(), &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    w.protect(&node, "lux", 0);
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["retention", "set", "--tenant", "lux", "--source", "reg", "--new-tenant", "--keep-last", "1"])
        .args(["--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())));
    let (src, cache) = (w.path("src"), w.path("cache"));
    register(&src, 0, None);
    backup(&w, &node, &src, &cache);
    // Another tree in the same source (with a cache of its own) makes day 0 forgotten: its
    // chunks, the bases of day 1's deltas among them, are now garbage.
    let other = w.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("note.txt"), b"a small file").unwrap();
    backup(&w, &node, &other, &w.path("other-cache"));

    register(&src, 1, None);
    let hold = w.path("hold");
    let child = spawn_held(
        Command::new(bin("exclave-agent"))
            .args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", "rnpp", "--key-file"])
            .arg(w.path("lux.key"))
            .args(["--source", "reg", "--chunk-avg", TEST_CHUNK_AVG, "--delta-cache"])
            .arg(&cache)
            .arg(&src),
        "EXCLAVE_TEST_HOLD_UPLOAD",
        &hold,
    );
    // The bases were there when the backup asked; now they are swept.
    let gc = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["gc", "--json", "--node", &node.addr.to_string(), "--identity", "admin", "--pki"])
        .arg(w.pki()))));
    assert!(gc["cluster"]["swept_chunks"].as_u64().unwrap() > 10, "{gc}");
    std::fs::write(&hold, b"").unwrap();
    let s = json(&ok(child.wait_with_output().unwrap()));
    assert!(s["resends"].as_u64().unwrap() >= 1, "the refused deltas made the backup run again: {s}");
    let log = node.log_text();
    assert!(log.contains("built on a base that garbage collection has since removed"), "{log}");
    assert!(log.contains("replacing a copy no index entry names"), "{log}");
    restore_matches(&w, &node, s["snapshot"].as_str().unwrap(), 1, None);
    assert!(verify_ok(&w, &node, s["snapshot"].as_str().unwrap()));

    // The next day has bases again (the ones just sent whole) and goes as deltas.
    register(&src, 2, None);
    let s2 = backup(&w, &node, &src, &cache);
    assert!(s2["delta_chunks"].as_u64().unwrap() > 3, "{s2}");
    restore_matches(&w, &node, s2["snapshot"].as_str().unwrap(), 2, None);
}

fn verify_ok(w: &World, node: &Node, snapshot: &str) -> bool {
    w.verify(node, "reg", snapshot).status.success()
}

#[test]
fn a_lost_or_damaged_cache_and_a_rewritten_register_send_full_chunks_and_restore_exactly() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let (src, cache) = (w.path("src"), w.path("cache"));
    register(&src, 0, None);
    backup(&w, &node, &src, &cache);

    // Deleted: the next backup sends its changed chunks full and rebuilds the cache.
    std::fs::remove_dir_all(&cache).unwrap();
    register(&src, 1, None);
    let s1 = backup(&w, &node, &src, &cache);
    assert_eq!(s1["delta_chunks"], 0, "{s1}");
    restore_matches(&w, &node, s1["snapshot"].as_str().unwrap(), 1, None);

    // Damaged: a byte flipped in every cached base; none is used, nothing wrong is sent.
    let pack = cache.join("bases.pack");
    let mut b = std::fs::read(&pack).unwrap();
    let records = pack_records(&b);
    assert!(records.len() > 3);
    for (_, at, len) in &records {
        b[at + len / 2] ^= 0x40;
    }
    std::fs::write(&pack, b).unwrap();
    register(&src, 2, None);
    let s2 = backup(&w, &node, &src, &cache);
    assert_eq!(s2["delta_chunks"], 0, "{s2}");
    restore_matches(&w, &node, s2["snapshot"].as_str().unwrap(), 2, None);

    // The cache is whole again: the next day goes as deltas.
    register(&src, 3, None);
    let s3 = backup(&w, &node, &src, &cache);
    assert!(s3["delta_chunks"].as_u64().unwrap() > 3, "{s3}");
    restore_matches(&w, &node, s3["snapshot"].as_str().unwrap(), 3, None);

    // A migration rewrites every row: deltas would not be small, the chunks go full and
    // become the new bases, and the day after goes as deltas on them.
    register(&src, 4, Some(4));
    let s4 = backup(&w, &node, &src, &cache);
    assert!(s4["delta_chunks"].as_u64().unwrap() * 10 < s4["chunks"].as_u64().unwrap(), "{s4}");
    restore_matches(&w, &node, s4["snapshot"].as_str().unwrap(), 4, Some(4));
    register(&src, 5, Some(4));
    let s5 = backup(&w, &node, &src, &cache);
    assert!(s5["delta_chunks"].as_u64().unwrap() > 3, "{s5}");
    assert!(s5["uploaded_bytes"].as_u64().unwrap() * 5 < s4["uploaded_bytes"].as_u64().unwrap(), "{s4} {s5}");
    restore_matches(&w, &node, s5["snapshot"].as_str().unwrap(), 5, Some(4));

    // The bases on the node damaged (by a node that even fixed their checksums): the restore
    // fails and names the delta and its base.
    let pack = std::fs::read(cache.join("bases.pack")).unwrap();
    let bases: Vec<exclave::ChunkId> = pack_records(&pack).into_iter().map(|(id, _, _)| id).collect();
    assert!(bases.len() > 3);
    node.stop();
    for b in &bases {
        tamper_chunk(&node.data, b, true, |env| {
            let mid = env.len() / 2;
            env[mid] ^= 1;
        });
    }
    node.restart();
    let out = w.restore(&node, "reg", s5["snapshot"].as_str().unwrap(), &w.path("damaged"));
    assert!(!out.status.success());
    let err = format!("{}{}", stdout(&out), stderr(&out));
    assert!(err.contains("is a delta on base chunk") && err.contains("authentication failed"), "{err}");
}

#[test]
fn a_cache_whose_bases_were_collected_sends_full_chunks() {
    let w = World::new();
    let node =
        w.start_node_with("n1", &w.path("n1"), free_port(), &["--gc-interval-hours", "0", "--gc-grace-passes", "0"]);
    let (src, stale, fresh) = (w.path("src"), w.path("stale"), w.path("fresh"));
    register(&src, 0, None);
    backup(&w, &node, &src, &stale);
    // Another run of the source (a reinstalled agent, say) builds its own cache; retention
    // keeps only its newest snapshot, and GC takes the bases the first cache names.
    w.protect(&node, "lux", 0);
    ok(run(Command::new(bin("exclave-replicator"))
        .args(["retention", "set", "--tenant", "lux", "--source", "reg", "--keep-last", "1"])
        .args(["--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())));
    register(&src, 1, Some(1));
    backup(&w, &node, &src, &fresh);
    let gc = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["gc", "--json", "--node", &node.addr.to_string(), "--identity", "admin", "--pki"])
        .arg(w.pki()))));
    assert!(gc["cluster"]["swept_chunks"].as_u64().unwrap() > 3, "{gc}");
    // The first cache still names day 0's chunks: the cluster says it lacks them, so no delta
    // is built on them, and the snapshot restores.
    register(&src, 2, None);
    let s = backup(&w, &node, &src, &stale);
    assert_eq!(s["delta_chunks"], 0, "{s}");
    restore_matches(&w, &node, s["snapshot"].as_str().unwrap(), 2, None);
}

#[test]
fn a_damaged_base_is_repaired_by_scrub_from_a_peer_and_that_node_alone_restores_the_deltas() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let (src, cache) = (w.path("src"), w.path("cache"));
    register(&src, 0, None);
    backup(&w, &nodes[0], &src, &cache);
    register(&src, 1, None);
    let s1 = backup(&w, &nodes[0], &src, &cache);
    assert!(s1["delta_chunks"].as_u64().unwrap() > 3, "{s1}");
    let leader = w.wait_leader(&nodes);
    for n in &nodes {
        w.wait_backfilled(n, &nodes[leader]);
    }
    // Every base of day 1's deltas damaged on n2 (its storage checksums left as they were).
    let pack = std::fs::read(cache.join("bases.pack")).unwrap();
    let mut bases: Vec<exclave::ChunkId> = pack_records(&pack).into_iter().map(|(id, _, _)| id).collect();
    bases.sort_unstable();
    bases.dedup();
    nodes[1].stop();
    for b in &bases {
        tamper_chunk(&nodes[1].data, b, false, |env| {
            let mid = env.len() / 2;
            env[mid] ^= 0x10;
        });
    }
    nodes[1].restart();
    w.wait_leader(&nodes);
    let st = json(&ok(run(Command::new(bin("exclave-replicator"))
        .args(["scrub", "--wait", "--json", "--node", &nodes[1].addr.to_string(), "--pki"])
        .arg(w.pki()))));
    let n = bases.len() as u64;
    assert_eq!((st["last"]["corrupt"].as_u64(), st["last"]["repaired"].as_u64()), (Some(n), Some(n)), "{st}");
    // n2 alone restores day 1, built of deltas on the repaired bases.
    nodes[0].stop();
    nodes[2].stop();
    restore_matches(&w, &nodes[1], s1["snapshot"].as_str().unwrap(), 1, None);
}
