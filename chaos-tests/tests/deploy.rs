//! The operations kit in `deploy/`: the alert rules pass their promtool unit tests, the
//! Prometheus configuration is valid, and the Grafana dashboard and the rules only name
//! metrics the programs export.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use exclave_chaos_tests::*;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root().join("deploy/prometheus"))
        .output()
        .expect("promtool (Debian's `prometheus` package; .ci/run installs it)");
    assert!(out.status.success(), "promtool {args:?}:\n{}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

#[test]
fn alert_rules_pass_their_unit_tests_and_the_config_is_valid() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 24 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml", "alerts-drills.test.yml"]);
    assert_eq!(tested.matches("SUCCESS").count(), 2, "{tested}");
    promtool(&["check", "config", "prometheus.yml"]);
    // Every alert has a runbook entry in the README.
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 24);
    for a in alerts {
        assert!(readme.contains(&format!("**{a}**")), "no runbook entry for {a} in the README");
    }
}

/// The metric names registered in a program's source: the first string of each
/// `Opts::new(`, `IntGauge::new(`, `IntCounter::new(` or `per_source(` call.
fn registered(path: &str, prefix: &str) -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let mut out = BTreeSet::new();
    for call in ["Opts::new(", "IntGauge::new(", "IntCounter::new(", "per_source("] {
        for (i, _) in src.match_indices(call) {
            let rest = src[i + call.len()..].trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                let name = &rest[..rest.find('"').unwrap()];
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    out.insert(format!("{prefix}{name}"));
                }
            }
        }
    }
    out
}

/// The metric names in a PromQL expression: identifiers outside label matchers, ranges and
/// strings that are neither a function or aggregation (followed by `(` or `by`/`without`) nor
/// a keyword; the label lists of `by`, `without`, `on`, `ignoring` and `group_*` are skipped.
fn names_in(expr: &str, out: &mut BTreeSet<String>) {
    const LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: [&str; 5] = ["and", "or", "unless", "bool", "offset"];
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // Skip to the closing character: label matchers, ranges, strings.
            open @ (b'{' | b'[' | b'"') => {
                let close = match open {
                    b'{' => b'}',
                    b'[' => b']',
                    _ => b'"',
                };
                i += 1;
                while i < b.len() && b[i] != close {
                    i += 1;
                }
                i += 1;
            }
            // A number or a duration (`0.9`, `10m`): not a name.
            c if c.is_ascii_digit() => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                    i += 1;
                }
                let word = &expr[start..i];
                let rest = expr[i..].trim_start();
                if LISTS.contains(&word) {
                    // Its label list, if any.
                    if rest.starts_with('(') {
                        i = expr.len() - rest.len() + rest.find(')').map_or(rest.len(), |p| p + 1);
                    }
                } else if !(rest.starts_with('(')
                    || rest.starts_with("by")
                    || rest.starts_with("without")
                    || KEYWORDS.contains(&word))
                {
                    out.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
}

fn exported() -> BTreeSet<String> {
    let mut names = registered("replicator/src/metrics.rs", "exclave_");
    names.extend(registered("agent/src/daemon.rs", ""));
    names.extend(registered("agent/src/stream.rs", ""));
    names.extend(registered("src/http.rs", ""));
    // The process collector's family (the live endpoints are checked in the operations test)
    // and Prometheus's own `up`.
    for p in [
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_threads",
        "up",
    ] {
        names.insert(p.into());
    }
    // Histograms are exported as _bucket, _sum and _count series.
    for h in ["exclave_request_seconds", "exclave_commit_seconds"] {
        assert!(names.contains(h), "{h} registered");
        for s in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{s}"));
        }
    }
    names
}

fn check_names(what: &str, exprs: &[String], exported: &BTreeSet<String>) -> usize {
    let mut used = BTreeSet::new();
    for e in exprs {
        names_in(e, &mut used);
    }
    let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(unknown.is_empty(), "{what} names metrics no program exports: {unknown:?}");
    used.len()
}

#[test]
fn dashboard_and_rules_name_only_exported_metrics() {
    let exported = exported();
    assert!(
        exported.contains("exclave_chunks_missing") && exported.contains("exclave_agent_runs_total"),
        "{exported:?}"
    );

    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("deploy/grafana/exclave.json")).unwrap())
            .expect("the dashboard is valid JSON");
    assert_eq!(dash["uid"], "exclave");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 30, "{} queries", exprs.len());
    let n = check_names("the dashboard", &exprs, &exported);
    assert!(n >= 30, "the dashboard uses {n} metrics");

    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim();
        if let Some(e) = t.strip_prefix("expr: ") {
            if e == ">" {
                let mut folded = String::new();
                while lines.peek().is_some_and(|n| !n.trim().contains(": ") && !n.trim().starts_with('-')) {
                    folded.push_str(lines.next().unwrap().trim());
                    folded.push(' ');
                }
                exprs.push(folded);
            } else {
                exprs.push(e.to_string());
            }
        }
    }
    assert_eq!(exprs.len(), 24);
    check_names("the alert rules", &exprs, &exported);

    // The checker itself: a misspelt name is caught, labels and functions are not names.
    let mut probe = BTreeSet::new();
    names_in(
        r#"max by (tenant, source) (exclave_drill_okk{node="n1"}) > 0.9 and ignoring(result) up offset 10m"#,
        &mut probe,
    );
    assert_eq!(probe.into_iter().collect::<Vec<_>>(), ["exclave_drill_okk", "up"]);
}

const UNITS: [&str; 5] = [
    "exclave-replicator.service",
    "exclave-agent.service",
    "exclave-drill@.service",
    "exclave-drill@.timer",
    "exclave-drills.service",
];

fn systemd_tool(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .current_dir(repo_root().join("deploy/systemd"))
        .output()
        .unwrap_or_else(|e| panic!("{tool} (systemd) is needed to check the units: {e}"))
}

#[test]
fn systemd_units_verify_and_score_ok_in_the_security_review() {
    // Each service is sandboxed to 3.0 ("OK") or better.
    for unit in UNITS.iter().filter(|u| u.ends_with(".service")) {
        let out = systemd_tool("systemd-analyze", &["security", "--offline=yes", "--threshold=30", unit]);
        let text = stdout(&out);
        let score = text.lines().last().unwrap_or_default();
        assert!(out.status.success(), "{unit} exposure above 3.0: {score}\n{}", stderr(&out));
        assert!(score.contains("OK"), "{unit}: {score}");
    }

    // `verify` against a root holding the binaries at their installed paths and systemd's own
    // units: no missing executable, no unknown or misspelt directive.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    for b in ["exclave-replicator", "exclave-agent", "exclave-restore"] {
        std::fs::copy(bin(b), r.join("usr/local/bin").join(b)).unwrap();
    }
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"].into_iter().find(|p| Path::new(p).is_dir());
    let status = Command::new("cp")
        .args(["-r", system.expect("systemd's unit directory")])
        .arg(r.join("usr/lib/systemd/system"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut args = vec![format!("--root={}", r.display())];
    for u in UNITS {
        std::fs::copy(repo_root().join("deploy/systemd").join(u), r.join("etc/systemd/system").join(u)).unwrap();
        args.push(format!("/etc/systemd/system/{u}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut verify = vec!["verify"];
    verify.extend(&args);
    let out = systemd_tool("systemd-analyze", &verify);
    assert!(
        out.status.success() && stderr(&out).is_empty(),
        "systemd-analyze verify:\n{}{}",
        stdout(&out),
        stderr(&out)
    );

    // sysusers.d makes the `exclave` user, tmpfiles.d its directories, private to it.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let root_arg = format!("--root={}", r.display());
    let file = |f: &str| repo_root().join("deploy/systemd").join(f).display().to_string();
    let out = systemd_tool("systemd-sysusers", &[&root_arg, &file("exclave.sysusers")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("exclave:") && l.ends_with(":/usr/sbin/nologin")), "{passwd}");
    let out = systemd_tool("systemd-tmpfiles", &[&root_arg, "--create", &file("exclave.tmpfiles")]);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::MetadataExt;
    let uid: u32 =
        passwd.lines().find(|l| l.starts_with("exclave:")).unwrap().split(':').nth(2).unwrap().parse().unwrap();
    for d in ["var/lib/exclave", "var/lib/exclave-agent", "var/lib/exclave-drill"] {
        let m = std::fs::metadata(r.join(d)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o700), "{d}");
    }
}
