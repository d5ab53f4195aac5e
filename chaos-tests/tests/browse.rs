//! Looking into snapshots without restoring them, with the real binaries: `ls` lists exactly
//! what is under a path, `find` finds a file in every snapshot that holds it, `diff` names
//! exactly what changed between two days, and `restore --include` restores one file or
//! subtree byte for byte and nothing else.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;

use exclave_chaos_tests::*;

#[test]
fn ls_find_diff_and_include_are_exact() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 5, 256 << 10);
    let day1 = json(&ok(w.backup(&node, "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    // Day 2: one file changed, one removed, one added, one changed in mode only.
    let docs = src.join("documents/2025/01");
    std::fs::write(docs.join("decision-003.xml"), "<decision>amended</decision>").unwrap();
    std::fs::remove_file(docs.join("decision-004.xml")).unwrap();
    std::fs::write(docs.join("decision-100.xml"), "<decision>new</decision>").unwrap();
    std::fs::set_permissions(src.join("registers/repetitive.bin"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let day2 = json(&ok(w.backup(&node, "rnpp", &[&src])))["snapshot"].as_str().unwrap().to_string();
    let cmd = |verb: &str| w.restore_cmd(&node, verb);

    // ls: what is under a path, with sizes; a path the snapshot lacks is an error.
    let listed = json(&ok(run(cmd("ls").args(["--source", "rnpp", "--json", "src/registers"]))));
    let mut paths: Vec<&str> = listed.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "src/registers",
            "src/registers/current",
            "src/registers/persons",
            "src/registers/persons/persons.tsv",
            "src/registers/repetitive.bin",
            "src/registers/zero-length"
        ]
    );
    let tsv = listed.as_array().unwrap().iter().find(|e| e["path"] == "src/registers/persons/persons.tsv").unwrap();
    assert_eq!(tsv["size"], std::fs::metadata(src.join("registers/persons/persons.tsv")).unwrap().len());
    assert_eq!(tsv["mode"], "0640");
    let link = listed.as_array().unwrap().iter().find(|e| e["path"] == "src/registers/current").unwrap();
    assert_eq!(link["target"], "persons/persons.tsv");
    let o = run(cmd("ls").args(["--source", "rnpp", "src/nowhere"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds nothing under src/nowhere"), "{}", stderr(&o));

    // find: decision-004 only in day 1, decision-100 only in day 2, decision-003 in both.
    let found = |pattern: &str| {
        let o = run(cmd("find").args(["--source", "rnpp", "--json", pattern]));
        let mut v: Vec<(String, String)> = json(&o)
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["snapshot"].as_str().unwrap().to_string(), m["entry"]["path"].as_str().unwrap().to_string()))
            .collect();
        v.sort();
        (o.status.code(), v)
    };
    let p = |s: &str| format!("src/documents/2025/01/{s}");
    assert_eq!(found("decision-004.xml"), (Some(0), vec![(day1.clone(), p("decision-004.xml"))]));
    assert_eq!(found("decision-1??.xml"), (Some(0), vec![(day2.clone(), p("decision-100.xml"))]));
    let mut both = vec![(day1.clone(), p("decision-003.xml")), (day2.clone(), p("decision-003.xml"))];
    both.sort();
    assert_eq!(found("src/documents/*/01/decision-003.xml"), (Some(0), both));
    assert_eq!(found("*.docx").0, Some(1), "no match: exit 1");

    // diff: exactly the four changes.
    let d = json(&ok(run(cmd("diff").args(["--source", "rnpp", "--json", &day1, &day2]))));
    let mut changes: Vec<(String, String)> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["change"].as_str().unwrap().to_string(), c["path"].as_str().unwrap().to_string()))
        .collect();
    changes.sort();
    let mut want = vec![
        ("added".to_string(), p("decision-100.xml")),
        ("changed".to_string(), p("decision-003.xml")),
        ("mode".to_string(), "src/registers/repetitive.bin".to_string()),
        ("removed".to_string(), p("decision-004.xml")),
    ];
    want.sort();
    assert_eq!(changes, want, "{d:#}");

    // restore --include: one file of day 1 (the one removed since) and its directories only.
    let to = w.path("one");
    let o = json(&ok(run(cmd("restore")
        .args(["--source", "rnpp", "--snapshot", &day1, "--json", "--include", &p("decision-004.xml"), "--to"])
        .arg(&to))));
    assert_eq!(o["files"], 1, "{o:#}");
    let restored = to.join(p("decision-004.xml"));
    assert!(std::fs::read(&restored).unwrap().starts_with(b"<decision"), "restored");
    let mut all = Vec::new();
    let mut stack = vec![to.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            all.push(e.path().strip_prefix(&to).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    all.sort();
    assert_eq!(all, ["src", "src/documents", "src/documents/2025", "src/documents/2025/01", &p("decision-004.xml")]);
    // A subtree, exact against the source.
    let to = w.path("registers");
    ok(run(cmd("restore").args(["--source", "rnpp", "--include", "src/registers/persons", "--to"]).arg(&to)));
    assert_eq!(
        std::fs::read(to.join("src/registers/persons/persons.tsv")).unwrap(),
        std::fs::read(src.join("registers/persons/persons.tsv")).unwrap()
    );
    assert!(!to.join("src/documents").exists());
    let o = run(cmd("restore").args(["--source", "rnpp", "--include", "src/nowhere", "--to"]).arg(w.path("none")));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds nothing under src/nowhere"), "{}", stderr(&o));
}
