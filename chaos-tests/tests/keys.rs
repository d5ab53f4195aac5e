//! Tenant keys with the real binaries: sealed key files in backup and restore, rotation with
//! both epochs restorable, k-of-n shares that rebuild the key abroad, and every way a person
//! can get them wrong, each with a clear error and nothing committed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use exclave_chaos_tests::*;

/// Small Argon2 costs: these tests are about behaviour, the benchmark is about cost.
const FAST_KDF: [&str; 4] = ["--kdf-memory-mib", "8", "--kdf-iterations", "1"];

fn agent() -> Command {
    Command::new(bin("exclave-agent"))
}

fn write_secret(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

fn restore_into(w: &World, node: &Node, key: &Path, snapshot: &str, to: &Path, extra: &[&str]) -> std::process::Output {
    run(Command::new(bin("exclave-restore"))
        .args(["restore", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--source", "rnpp", "--snapshot", snapshot, "--key-file"])
        .arg(key)
        .args(extra)
        .arg("--to")
        .arg(to))
}

fn snapshot_count(w: &World, node: &Node) -> usize {
    json(&ok(run(w.restore_cmd(node, "snapshots").arg("--json")))).as_array().unwrap().len()
}

#[test]
fn a_sealed_key_file_backs_up_and_restores_and_refuses_the_wrong_passphrase() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 11, 1 << 20);
    let pass = write_secret(&w.path("lux.pass"), "seven words of the ministry safe\n");
    let sealed = w.path("sealed.key");
    ok(run(agent()
        .args(["keys", "init", "--tenant", "lux", "--out"])
        .arg(&sealed)
        .arg("--passphrase-file")
        .arg(&pass)
        .args(FAST_KDF)));
    let text = std::fs::read_to_string(&sealed).unwrap();
    assert!(text.contains("exclave-sealed-key-v1") && !text.contains("master_key"), "{text}");
    let show = json(&ok(run(agent().args(["keys", "show", "--json"]).arg(&sealed))));
    assert_eq!((show["sealed"].as_bool(), show["current_epoch"].as_u64()), (Some(true), Some(0)));

    // Backup with the passphrase from a flag, restore with it from the environment.
    let backup = |extra: &[&str], env: Option<&Path>| {
        let mut c = agent();
        c.args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", "rnpp", "--key-file"])
            .arg(&sealed)
            .args(["--source", "rnpp"])
            .args(extra)
            .arg(&src);
        c.env_remove("EXCLAVE_PASSPHRASE_FILE");
        if let Some(e) = env {
            c.env("EXCLAVE_PASSPHRASE_FILE", e);
        }
        run(&mut c)
    };
    let first = json(&ok(backup(&["--passphrase-file", pass.to_str().unwrap()], None)));
    assert_eq!(first["files"], 24);
    let to = w.path("restored");
    let mut c = Command::new(bin("exclave-restore"));
    c.args(["restore", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--source", "rnpp", "--key-file"])
        .arg(&sealed)
        .arg("--to")
        .arg(&to)
        .env("EXCLAVE_PASSPHRASE_FILE", &pass);
    assert_eq!(json(&ok(run(&mut c)))["ok"], true);
    assert_same_tree(&src, &to.join("src"));

    // A wrong passphrase: named, and nothing committed.
    let wrong = write_secret(&w.path("wrong.pass"), "seven words of the ministry sofa\n");
    let out = backup(&[], Some(&wrong));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong passphrase for"), "{}", stderr(&out));
    // No passphrase at all, and no terminal to ask on.
    let out = backup(&[], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is sealed under a passphrase: give --passphrase-file"), "{}", stderr(&out));
    // A passphrase file others can read.
    let loose = w.path("loose.pass");
    std::fs::write(&loose, "seven words of the ministry safe\n").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = backup(&["--passphrase-file", loose.to_str().unwrap()], None);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    assert_eq!(snapshot_count(&w, &node), 1, "refused runs committed nothing");

    // Damaged bytes in the sealed file: called damaged, not a wrong passphrase.
    let damaged = w.path("damaged.key");
    let line = text.lines().find(|l| l.starts_with("sealed = ")).unwrap();
    let mut bad = line.to_string();
    let at = bad.len() - 12;
    let c = if &bad[at..at + 1] == "a" { "b" } else { "a" };
    bad.replace_range(at..at + 1, c);
    write_secret(&damaged, &text.replace(line, &bad));
    let out =
        restore_into(&w, &node, &damaged, "latest", &w.path("r2"), &["--passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));

    // seal / unseal convert between the two kinds of file; the key stays the same.
    let raw = w.path("raw.key");
    std::fs::copy(&sealed, &raw).unwrap();
    ok(run(agent().args(["keys", "unseal", "--key-file"]).arg(&raw).arg("--passphrase-file").arg(&pass)));
    assert!(std::fs::read_to_string(&raw).unwrap().contains("master_key"));
    assert_eq!(std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777, 0o600);
    let out = restore_into(&w, &node, &raw, "latest", &w.path("r3"), &[]);
    assert_eq!(json(&ok(out))["ok"], true);
    let pass2 = write_secret(&w.path("other.pass"), "another passphrase");
    ok(run(agent().args(["keys", "seal", "--key-file"]).arg(&raw).arg("--passphrase-file").arg(&pass2).args(FAST_KDF)));
    let out = restore_into(&w, &node, &raw, "latest", &w.path("r4"), &["--passphrase-file", pass2.to_str().unwrap()]);
    assert_eq!(json(&ok(out))["ok"], true);
}

#[test]
fn after_a_rotation_both_epochs_restore_and_deduplication_goes_on() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 12, 2 << 20);
    let pass = write_secret(&w.path("lux.pass"), "rotation passphrase");
    let key = w.path("lux-sealed.key");
    ok(run(agent()
        .args(["keys", "init", "--tenant", "lux", "--out"])
        .arg(&key)
        .arg("--passphrase-file")
        .arg(&pass)
        .args(FAST_KDF)));
    let p = ["--passphrase-file", pass.to_str().unwrap()];
    let key_name = key.file_name().unwrap().to_str().unwrap();
    let epoch0 = json(&ok(w.backup_as(&node, "rnpp", key_name, "rnpp", &[&src], &p)));
    let before = w.path("before-rotation.key");
    std::fs::copy(&key, &before).unwrap();

    // Without its passphrase a sealed file cannot be rotated, and is left as it was.
    let out = run(agent().args(["keys", "rotate", "--key-file"]).arg(&key).env_remove("EXCLAVE_PASSPHRASE_FILE"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is sealed under a passphrase"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&key).unwrap(), std::fs::read(&before).unwrap());

    let out = ok(run(agent().args(["keys", "rotate", "--key-file"]).arg(&key).args(p)));
    assert!(stdout(&out).contains("sealed with epoch 1"), "{}", stdout(&out));
    let show = json(&ok(run(agent().args(["keys", "show", "--json"]).arg(&key))));
    assert_eq!(show["epochs"], serde_json::json!([0, 1]));
    assert_eq!(show["sealed"], true, "a sealed file stays sealed");

    // Day two under epoch 1: the unchanged data is not sent again (ids do not change).
    std::fs::write(src.join("registers/after-rotation.txt"), "a decision taken after the rotation\n".repeat(500))
        .unwrap();
    let epoch1 = json(&ok(w.backup_as(&node, "rnpp", key_name, "rnpp", &[&src], &p)));
    assert!(
        epoch1["data_bytes_uploaded"].as_u64().unwrap() < 64 * 1024,
        "a rotation must not re-upload the register: {epoch1}"
    );
    let (s0, s1) = (epoch0["snapshot"].as_str().unwrap(), epoch1["snapshot"].as_str().unwrap());

    // Both restore with the rotated key.
    for (snap, name) in [(s0, "r0"), (s1, "r1")] {
        let out = restore_into(&w, &node, &key, snap, &w.path(name), &p);
        assert_eq!(json(&ok(out))["ok"], true);
    }
    assert_same_tree(&src, &w.path("r1").join("src"));
    // The key file from before the rotation still opens epoch 0, but not what was sealed
    // after it: the new data key is not derived from anything that file holds.
    let out = restore_into(&w, &node, &before, s0, &w.path("old0"), &p);
    assert_eq!(json(&ok(out))["ok"], true);
    let out = restore_into(&w, &node, &before, s1, &w.path("old1"), &p);
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(all.contains("epoch 1") && all.contains("does not hold"), "{all}");
}

fn split(w: &World, key: &Path, dir: &str, extra: &[&str]) -> PathBuf {
    let out = w.path(dir);
    ok(run(agent()
        .args(["keys", "split", "--shares", "5", "--threshold", "3", "--key-file"])
        .arg(key)
        .arg("--out")
        .arg(&out)
        .args(["--holder", "Minister of Justice", "--holder", "Ambassador in Luxembourg", "--holder", "State CIO"])
        .args(["--holder", "National Archivist", "--holder", "Auditor General"])
        .args(extra)));
    out
}

fn combine(shares: &[PathBuf], out: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new(bin("exclave-restore"));
    c.args(["keys", "combine", "--out"]).arg(out).args(extra);
    for s in shares {
        c.arg("--share").arg(s);
    }
    run(&mut c)
}

#[test]
fn three_of_five_shares_rebuild_the_key_abroad_and_bad_sets_are_named() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 13, 1 << 20);
    let snap = json(&ok(w.backup(&node, "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    let dir = split(&w, &w.path("lux.key"), "shares", &[]);
    let share = |n: u32| dir.join(format!("lux-share-{n}-of-5.txt"));
    let text = std::fs::read_to_string(share(2)).unwrap();
    assert!(text.contains("holder     Ambassador in Luxembourg") && text.contains("share      2 of 5"), "{text}");
    assert_eq!(std::fs::metadata(share(2)).unwrap().permissions().mode() & 0o777, 0o600);
    // The home key is gone; only the shares and the embassy remain.
    let fingerprint =
        json(&ok(run(agent().args(["keys", "show", "--json"]).arg(w.path("lux.key")))))["fingerprint"].clone();
    std::fs::remove_file(w.path("lux.key")).unwrap();

    let rebuilt = w.path("abroad/lux.key");
    std::fs::create_dir_all(w.path("abroad")).unwrap();
    let out = ok(combine(&[share(5), share(2), share(4)], &rebuilt, &["--json"]));
    assert_eq!(json(&out)["fingerprint"], fingerprint);
    let out = restore_into(&w, &node, &rebuilt, &snap, &w.path("restored"), &[]);
    assert_eq!(json(&ok(out))["ok"], true);
    assert_same_tree(&src, &w.path("restored").join("src"));

    let fails = |shares: &[PathBuf], want: &str| {
        let out = combine(shares, &w.path("never.key"), &[]);
        assert_eq!(out.status.code(), Some(1), "{want}");
        assert!(stderr(&out).contains(want), "expected {want:?} in:\n{}", stderr(&out));
        assert!(!w.path("never.key").exists());
    };
    fails(&[share(1), share(3)], "2 share(s) of lux's key given, 3 needed: 1 more");
    let copy = w.path("copy-of-2.txt");
    std::fs::copy(share(2), &copy).unwrap();
    fails(&[share(1), share(2), copy.clone()], "share 2 is given twice");
    // A share of another tenant's key.
    let est = split(&w, &w.path("est.key"), "est-shares", &[]);
    fails(&[share(1), share(2), est.join("est-share-3-of-5.txt")], "are shares of different keys");
    // A share of an earlier split of the same key (before a rotation, say).
    let again = split(&w, &rebuilt, "again", &[]);
    fails(&[share(1), share(2), again.join("lux-share-3-of-5.txt")], "different splits");
    // One group mistyped while copying from paper: the line is named.
    let typed = w.path("typed-3.txt");
    let t3 = std::fs::read_to_string(share(3)).unwrap();
    let line = t3.lines().find(|l| l.starts_with("02 ")).unwrap();
    let mut bad = line.to_string();
    let c = if &bad[4..5] == "7" { "8" } else { "7" };
    bad.replace_range(4..5, c);
    std::fs::write(&typed, t3.replace(line, &bad)).unwrap();
    fails(&[share(1), share(2), typed], "share line 02 does not match its check");
}

#[test]
fn sealed_shares_open_only_with_their_holders_passphrase() {
    let w = World::new();
    let p: Vec<PathBuf> =
        (1..=5).map(|n| write_secret(&w.path(&format!("holder{n}.pass")), &format!("holder {n} says"))).collect();
    let pairs: Vec<String> = p.iter().enumerate().map(|(i, f)| format!("{}={}", i + 1, f.display())).collect();
    let mut extra = vec!["--seal-shares", "--kdf-memory-mib", "8"];
    for pair in &pairs {
        extra.extend(["--share-passphrase-file", pair.as_str()]);
    }
    let dir = split(&w, &w.path("lux.key"), "sealed-shares", &extra);
    let share = |n: u32| dir.join(format!("lux-share-{n}-of-5.txt"));
    assert!(std::fs::read_to_string(share(1)).unwrap().contains("sealed     yes"));
    let arg = |n: u32, pass: usize| format!("{}={}", share(n).display(), p[pass].display());
    let out = w.path("rebuilt.key");
    // Share 3 opened with holder 4's passphrase.
    let (a1, a2, a3) = (arg(1, 0), arg(2, 1), arg(3, 3));
    let bad = combine(
        &[share(1), share(2), share(3)],
        &out,
        &["--share-passphrase-file", &a1, "--share-passphrase-file", &a2, "--share-passphrase-file", &a3],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("wrong passphrase for") && stderr(&bad).contains("lux-share-3-of-5.txt"),
        "{}",
        stderr(&bad)
    );
    // No passphrase for a sealed share, and no terminal.
    let none = combine(
        &[share(1), share(2), share(3)],
        &out,
        &["--share-passphrase-file", &a1, "--share-passphrase-file", &a2],
    );
    assert!(stderr(&none).contains("is sealed under its holder's passphrase"), "{}", stderr(&none));
    let a3 = arg(3, 2);
    let good = combine(
        &[share(1), share(2), share(3)],
        &out,
        &["--share-passphrase-file", &a1, "--share-passphrase-file", &a2, "--share-passphrase-file", &a3],
    );
    ok(good);
    let want = json(&ok(run(agent().args(["keys", "show", "--json"]).arg(w.path("lux.key")))))["fingerprint"].clone();
    assert_eq!(json(&ok(run(agent().args(["keys", "show", "--json"]).arg(&out))))["fingerprint"], want);
}
