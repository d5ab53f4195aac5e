//! Backup → restore through a real node, compared byte for byte and by metadata; and the
//! deduplication promises: an unchanged backup uploads no data, a changed one only the change.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use exclave_chaos_tests::*;

#[test]
fn backup_then_restore_is_exact() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 1, 3 << 20);

    let out = ok(w.backup(&node, "rnpp", &[&src]));
    let s = json(&out);
    assert_eq!(s["files"], 24);
    assert!(s["data_chunks_uploaded"].as_u64().unwrap() > 10);
    assert!(s["uploaded_bytes"].as_u64().unwrap() < s["bytes_read"].as_u64().unwrap(), "compression must help");

    let to = w.path("restored");
    let r = json(&ok(w.restore(&node, "rnpp", "latest", &to)));
    assert_eq!(r["ok"], true);
    assert_same_tree(&src, &to.join("src"));

    let v = json(&ok(w.verify(&node, "rnpp", s["snapshot"].as_str().unwrap())));
    assert_eq!(v["files"], 24);
    assert!(!w.path("verify-wrote-nothing").exists());
}

#[test]
fn unchanged_second_backup_uploads_no_data() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 2, 2 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    let second = json(&ok(w.backup(&node, "rnpp", &[&src])));
    assert_eq!(second["data_chunks_uploaded"], 0, "{second}");
    assert_eq!(second["data_bytes_uploaded"], 0);
    // At most the root (which carries the time, so is new unless in the same second) is
    // uploaded; the manifest pieces deduplicate.
    assert!(second["chunks_new"].as_u64().unwrap() <= 1, "{second}");
    assert!(second["uploaded_bytes"].as_u64().unwrap() < 1024);
}

#[test]
fn day_two_backup_uploads_only_new_chunks() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 3, 4 << 20);
    let first = json(&ok(w.backup(&node, "rnpp", &[&src])));

    // Day two: a few rows change in the middle of the register, a document is added.
    let p = src.join("registers/persons/persons.tsv");
    let mut rows = std::fs::read(&p).unwrap();
    let mid = rows.len() / 2;
    let new_row = b"424242\tAada\tKorhonen\t2025-01-02\tTampere\t1\n";
    rows.splice(mid..mid, new_row.iter().copied());
    std::fs::write(&p, &rows).unwrap();
    std::fs::write(src.join("documents/2025/01/new-decision.xml"), b"<decision>new</decision>").unwrap();
    let second = json(&ok(w.backup(&node, "rnpp", &[&src])));

    let (c1, c2) = (first["data_chunks_uploaded"].as_u64().unwrap(), second["data_chunks_uploaded"].as_u64().unwrap());
    assert!((2..=5).contains(&c2), "day two uploaded {c2} data chunks (day one: {c1})");
    let (b1, b2) = (first["data_bytes_uploaded"].as_u64().unwrap(), second["data_bytes_uploaded"].as_u64().unwrap());
    assert!(b2 * 20 < b1, "day two uploaded {b2} bytes, day one {b1}");

    // Both days restore exactly: the older one by id.
    let to2 = w.path("day2");
    ok(w.restore(&node, "rnpp", "latest", &to2));
    assert_same_tree(&src, &to2.join("src"));
    let to1 = w.path("day1");
    ok(w.restore(&node, "rnpp", first["snapshot"].as_str().unwrap(), &to1));
    let restored = std::fs::read(to1.join("src/registers/persons/persons.tsv")).unwrap();
    assert_eq!(restored.len() + new_row.len(), rows.len());
}

#[test]
fn snapshots_lists_each_source() {
    let w = World::new();
    let node = w.start_node("n1");
    let (a, b) = (w.path("a/data"), w.path("b/other"));
    sample_tree(&a, 4, 1 << 20);
    sample_tree(&b, 5, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&a]));
    ok(w.backup(&node, "cadastre", &[&b]));
    let all = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert_eq!(all.as_array().unwrap().len(), 2);
    let one = json(&ok(run(w.restore_cmd(&node, "snapshots").args(["--json", "--source", "cadastre"]))));
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["source"], "cadastre");
    assert_eq!(one[0]["agent"], "rnpp", "the node records who committed");
}

#[test]
fn the_node_is_told_neither_the_host_nor_the_files_and_the_restore_reads_them_from_the_manifest() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 2, 1 << 20);
    let s = json(&ok(w.backup(&node, "rnpp", &[&src])));
    assert!(s["files"].as_u64().unwrap() > 5);

    let listed = json(&ok(run(w.restore_cmd(&node, "snapshots").arg("--json"))));
    assert_eq!(listed[0]["hostname"], "", "the host's name stays in the encrypted manifest");
    assert_eq!(listed[0]["files"], 0, "so does the file count");
    assert_eq!(listed[0]["logical_bytes"], s["bytes_read"], "the size is still known (restore progress, WAL names)");
    let table = stdout(&ok(run(&mut w.restore_cmd(&node, "snapshots"))));
    assert!(table.lines().any(|l| l.contains(" - ") && l.trim_end().ends_with("rnpp")), "{table}");

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let r = json(&ok(w.restore(&node, "rnpp", "latest", &w.path("restored"))));
    assert_eq!(r["ok"], true);
    assert_eq!(r["hostname"], host, "read from the manifest with the key");
    assert_eq!(r["files"], s["files"]);
}

#[test]
fn restore_refuses_a_non_empty_target_unless_overwrite() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 6, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    let to = w.path("busy");
    std::fs::create_dir_all(to.join("src/registers")).unwrap();
    std::fs::write(to.join("src/registers/zero-length"), b"stale").unwrap();
    let refused = w.restore(&node, "rnpp", "latest", &to);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("not empty"), "{}", stderr(&refused));
    ok(run(w.restore_cmd(&node, "restore").args(["--source", "rnpp", "--overwrite", "--to"]).arg(&to)));
    assert_same_tree(&src, &to.join("src"));
}

#[test]
fn status_reports_the_node_to_an_admin_only() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 7, 1 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    let status = |identity: &str| {
        run(std::process::Command::new(bin("exclave-replicator"))
            .args(["status", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", identity]))
    };
    let s = json(&ok(status("admin")));
    assert_eq!(s["name"], "n1");
    assert!(s["chunks"].as_u64().unwrap() > 0, "{s}");
    assert!(s["disk_free_bytes"].as_u64().unwrap() > 0, "{s}");
    let refused = status("rnpp");
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("may not operate the node"), "{}", stderr(&refused));
}

#[test]
fn many_small_files_restore_exactly_across_manifest_pages() {
    // More entries than one manifest page (4096) and many fetch groups of small chunks.
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("many");
    for d in 0..50 {
        let dir = src.join(format!("dir-{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("doc-{f:03}.txt")), format!("document {d}/{f}\n").repeat(f + 1)).unwrap();
        }
    }
    let s = json(&ok(w.backup(&node, "docs", &[&src])));
    assert_eq!(s["files"], 5000);
    let to = w.path("restored");
    let r = json(&ok(w.restore(&node, "docs", "latest", &to)));
    assert_eq!(r["files"], 5000);
    assert_eq!(r["dirs"], 51);
    assert_same_tree(&src, &to.join("many"));
}

#[test]
fn a_snapshot_whose_references_span_several_commit_messages_restores_exactly() {
    // More distinct chunks than one commit-reference message carries (32768): the commit
    // streams them in batches, each staged through Raft before the commit itself.
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("dense");
    std::fs::create_dir_all(&src).unwrap();
    let mut rows = String::new();
    let mut i = 0u64;
    while rows.len() < 12 << 20 {
        rows.push_str(&format!("{i}\t{}\t{}\n", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i % 977));
        i += 1;
    }
    std::fs::write(src.join("register.tsv"), &rows).unwrap();
    let s = json(&ok(w.backup_as(&node, "rnpp", "lux.key", "dense", &[&src], &["--chunk-avg", "256"])));
    assert!(s["chunks"].as_u64().unwrap() > 32 * 1024, "{s}");
    let to = w.path("restored");
    let r = json(&ok(w.restore(&node, "dense", "latest", &to)));
    assert_eq!(r["chunks"], s["chunks"]);
    assert_same_tree(&src, &to.join("dense"));
}
