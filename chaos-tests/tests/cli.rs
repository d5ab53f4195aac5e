//! The command line people expect: completions and man pages for every program, output
//! piped into `head` ends quietly, help that helps, a failed restore leaves no empty target,
//! and a dead node in `--node` costs little.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

const PROGRAMS: [&str; 3] = ["exclave-agent", "exclave-replicator", "exclave-restore"];

#[test]
fn every_program_has_completions_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    for p in PROGRAMS {
        let bash = stdout(&ok(run(Command::new(bin(p)).args(["completions", "bash"]))));
        let line = bash
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("complete -F "))
            .unwrap_or_else(|| panic!("{p}: {bash}"));
        assert!(line.ends_with(&format!(" {p}")), "{p}: {line}");
        let zsh = stdout(&ok(run(Command::new(bin(p)).args(["completions", "zsh"]))));
        assert!(zsh.starts_with(&format!("#compdef {p}")), "{p}: {zsh}");
        let fish = stdout(&ok(run(Command::new(bin(p)).args(["completions", "fish"]))));
        assert!(fish.contains(&format!("complete -c {p}")), "{p}: {fish}");
        let out = dir.path().join(p);
        let listed = stdout(&ok(run(Command::new(bin(p)).args(["man", "--out"]).arg(&out))));
        let top = std::fs::read_to_string(out.join(format!("{p}.1"))).unwrap();
        assert!(top.contains(".TH"), "{p}.1 is a man page: {top}");
        assert!(listed.lines().count() > 5, "{p}: a page per subcommand: {listed}");
    }
    // The pages of subcommands carry their own options.
    let dir = dir.path();
    let backup = std::fs::read_to_string(dir.join("exclave-agent/exclave-agent-backup.1")).unwrap();
    assert!(backup.contains("key\\-file"), "{backup}");
    let set = std::fs::read_to_string(dir.join("exclave-replicator/exclave-replicator-retention-set.1")).unwrap();
    assert!(set.contains("new\\-tenant"), "{set}");
}

#[test]
fn output_closed_early_ends_quietly() {
    let w = World::new();
    for args in [&["pki", "list", "--json", "--dir"][..], &["pki", "list", "--dir"][..]] {
        // The reader is gone before the program writes: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin("exclave-replicator"))
            .args(args)
            .arg(w.pki())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn sample_register_help_and_bad_arguments_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = ok(run(Command::new(bin("exclave-sample-register")).arg("--help").current_dir(dir.path())));
    assert!(stdout(&o).starts_with("usage: exclave-sample-register OUT [SIZE_MIB] [SEED]"), "{}", stdout(&o));
    for args in [&["--size", "3"][..], &["out", "lots"][..], &[][..]] {
        let o = run(Command::new(bin("exclave-sample-register")).args(args).current_dir(dir.path()));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).starts_with("error: "), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn a_restore_that_fails_early_leaves_no_target_and_a_dead_node_costs_little() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 5, 64 << 10);
    ok(w.backup(&node, "rnpp", &[&src]));

    // The key of another tenant: refused before anything is written; no empty directory left.
    let to = w.path("restored");
    let o = run(Command::new(bin("exclave-restore"))
        .args(["restore", "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--key-file"])
        .arg(w.path("est.key"))
        .args(["--source", "rnpp", "--to"])
        .arg(&to));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("est"), "{}", stderr(&o));
    assert!(!to.exists(), "the failed restore left {} behind", to.display());
    // No such snapshot: the same.
    let o = run(w.restore_cmd(&node, "restore").args(["--source", "rnpp", "--snapshot", "nope", "--to"]).arg(&to));
    assert_eq!(o.status.code(), Some(1));
    assert!(!to.exists());
    // An existing empty target the operator made is kept.
    std::fs::create_dir(&to).unwrap();
    let o = run(w.restore_cmd(&node, "restore").args(["--source", "rnpp", "--snapshot", "nope", "--to"]).arg(&to));
    assert_eq!(o.status.code(), Some(1));
    assert!(to.is_dir());

    // A dead node first in --node: the next is tried after 1.5 s of silence, not 10 s.
    let dead = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let o = ok(run(Command::new(bin("exclave-restore"))
        .args(["snapshots", "--node", &dead, "--node", &node.addr.to_string(), "--pki"])
        .arg(w.pki())
        .args(["--identity", "dr", "--key-file"])
        .arg(w.path("lux.key"))
        .args(["--json"])));
    let took = t.elapsed();
    assert_eq!(json(&o).as_array().unwrap().len(), 1);
    assert!(took < Duration::from_secs(5), "failing over past a dead node took {took:?}");
}
