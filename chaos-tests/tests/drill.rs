//! Restore drills with the real binaries: files and a SQLite register verified and checked
//! against their facts (PASS), a database that differs from its facts (FAIL, naming the table),
//! reports written, the results recorded by the cluster and visible from every node and in
//! the metrics after a restart; wrong tenant and missing snapshots refused clearly.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn drill(w: &World, node: &Node, source: &str, extra: &[&str]) -> std::process::Output {
    run(w.restore_cmd(node, "drill").args(["--source", source, "--json"]).args(extra))
}

fn vehicles_db(path: &std::path::Path) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE vehicle (vin TEXT PRIMARY KEY, plate TEXT, km INTEGER);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO vehicle SELECT 'WVW' || i, 'LU-' || i, i * 7 FROM n;",
    )
    .unwrap();
}

#[test]
fn drills_pass_fail_report_and_are_recorded_on_every_node() {
    let w = World::new();
    let metrics_port = free_tcp_port();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let names = ["n1", "n2", "n3"];
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut args = vec!["--min-free-mib".to_string(), "64".into()];
            if i == 1 {
                args.extend(["--metrics".to_string(), format!("127.0.0.1:{metrics_port}")]);
            }
            for j in (0..3).filter(|j| *j != i) {
                args.extend(["--peer".to_string(), format!("{}=127.0.0.1:{}", names[j], ports[j])]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Node::spawn_with(&w, names[i], &w.path(names[i]), ports[i], &args)
        })
        .collect();
    for n in &nodes {
        n.wait_ready();
    }
    w.wait_leader(&nodes);

    // No snapshot yet: a clear error, nothing recorded.
    let out = drill(&w, &nodes[0], "rnpp", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no snapshot of source \"rnpp\""), "{}", stderr(&out));

    let src = w.path("src");
    sample_tree(&src, 101, 1 << 20);
    ok(w.backup(&nodes[0], "rnpp", &[&src]));
    let db = w.path("vehicles.db");
    vehicles_db(&db);
    ok(w.backup_as(&nodes[0], "rnpp", "lux.key", "vehicles", &[], &["--sqlite", db.to_str().unwrap()]));

    // Files: PASS, with a report for people.
    let reports = w.path("reports");
    let out = drill(&w, &nodes[2], "rnpp", &["--report", reports.to_str().unwrap(), "--rto-target", "600"]);
    let r = json(&ok(out));
    assert_eq!(r["verdict"], "PASS", "{r}");
    assert_eq!(r["checks"][0]["name"], "files");
    assert!(r["rto_secs"].as_f64().unwrap() > 0.0 && r["rpo_secs"].as_i64().unwrap() >= 0, "{r}");
    assert_eq!(r["recorded"], true);
    let md: Vec<_> = std::fs::read_dir(&reports).unwrap().map(|e| e.unwrap().path()).collect();
    let md = md.iter().find(|p| p.extension().is_some_and(|e| e == "md")).expect("a .md report");
    let text = std::fs::read_to_string(md).unwrap();
    assert!(text.starts_with("# Restore drill of rnpp (lux): PASS"), "{text}");
    assert!(text.contains("recovery time (RTO)") && text.contains("| files | PASS |"), "{text}");

    // SQLite: integrity and facts checked.
    let r = json(&ok(drill(&w, &nodes[1], "vehicles", &[])));
    assert_eq!(r["verdict"], "PASS", "{r}");
    let sqlite = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "SQLite database vehicles.db").unwrap();
    assert!(sqlite["detail"].as_str().unwrap().contains("2000 row(s) match"), "{sqlite}");

    // A register whose database differs from the facts recorded with it: FAIL, the table named.
    let bad = w.path("bad");
    std::fs::create_dir_all(&bad).unwrap();
    vehicles_db(&bad.join("cars.db"));
    let mut facts = exclave::facts::sqlite::facts(&bad.join("cars.db"), 1).unwrap();
    facts.tables[0].rows += 1;
    std::fs::write(bad.join("cars.db.facts.json"), facts.to_json()).unwrap();
    ok(w.backup(&nodes[0], "cars", &[&bad]));
    let out = drill(&w, &nodes[0], "cars", &[]);
    assert_eq!(out.status.code(), Some(1));
    let r = json(&out);
    assert_eq!(r["verdict"], "FAIL");
    let problems = r["checks"].as_array().unwrap().iter().flat_map(|c| c["problems"].as_array().unwrap().clone());
    assert!(problems.into_iter().any(|p| p.as_str().unwrap().contains("vehicle")), "{r}");

    // A restore identity of another tenant with this tenant's key: refused.
    let out = run(Command::new(bin("exclave-restore"))
        .args(["drill", "--source", "rnpp", "--node", &nodes[0].addr.to_string(), "--identity", "drest", "--pki"])
        .arg(w.pki())
        .arg("--key-file")
        .arg(w.path("lux.key")));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is for tenant \"lux\""), "{}", stderr(&out));

    // Every node lists the three drills.
    for n in &nodes {
        let list = json(&ok(run(w.restore_cmd(n, "drills").arg("--json"))));
        let verdicts: Vec<&str> = list.as_array().unwrap().iter().map(|d| d["verdict"].as_str().unwrap()).collect();
        assert_eq!(verdicts.len(), 3, "{list}");
        assert!(verdicts.contains(&"FAIL") && verdicts.iter().filter(|v| **v == "PASS").count() == 2);
        assert!(list[0]["identity"] == "restore:lux" && list[0]["node"].as_str().unwrap().starts_with('n'));
    }

    // The metrics of a node rebuilt from the catalog after a restart.
    nodes[1].stop().expect("stopped");
    nodes[1].restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(metrics_port);
        if m.contains("exclave_drill_ok{source=\"rnpp\",tenant=\"lux\",node=\"n2\"} 1")
            && m.contains("exclave_drill_ok{source=\"cars\",tenant=\"lux\",node=\"n2\"} 0")
        {
            assert!(m.contains(
                "exclave_drill_last_success_timestamp_seconds{source=\"vehicles\",tenant=\"lux\",node=\"n2\"}"
            ));
            assert!(m.contains("exclave_drill_rto_seconds{source=\"rnpp\",tenant=\"lux\",node=\"n2\"}"));
            break;
        }
        assert!(Instant::now() < deadline, "drill metrics missing:\n{m}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

const SCHEMA: &str = "
CREATE TABLE person (id bigint PRIMARY KEY, name text NOT NULL, born date, income numeric(12,2), photo bytea);
CREATE SCHEMA cadastre;
CREATE TABLE cadastre.\"Parcel\" (id serial PRIMARY KEY, owner bigint REFERENCES person, area double precision, geo jsonb);
INSERT INTO person SELECT i, 'Persoon ' || i || ' Ærø', date '1950-01-01' + i, i * 1.25, decode(md5(i::text), 'hex')
  FROM generate_series(1, 20000) i;
INSERT INTO cadastre.\"Parcel\" (owner, area, geo) SELECT i, i / 7.0, jsonb_build_object('x', i) FROM generate_series(1, 20000, 3) i;
";

#[test]
fn a_postgresql_dump_is_loaded_into_a_scratch_server_and_checked_against_its_facts() {
    use exclave_chaos_tests::postgres::PgServer;
    let w = World::new();
    let node = w.start_node("n1");
    let pg = PgServer::start("");
    pg.psql("postgres", "CREATE DATABASE rnpp");
    pg.psql("rnpp", SCHEMA);
    ok(w.backup_as(&node, "rnpp", "lux.key", "rnpp-db", &[], &["--postgres", &pg.conn("rnpp")]));

    let bin = pg.bin.to_str().unwrap().to_string();
    let r = json(&ok(drill(&w, &node, "rnpp-db", &["--pg-bin", &bin])));
    assert_eq!(r["verdict"], "PASS", "{r}");
    let check = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "PostgreSQL database rnpp").unwrap();
    assert_eq!(check["result"], "pass", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("2 table(s), 26667 row(s) match"), "{check}");
    assert!(r["phases"].as_array().unwrap().iter().any(|p| p["name"] == "database load and checks"));

    // A pg_restore older than the dump's server: the drill fails and says which and why.
    let old = w.path("old-pg");
    std::fs::create_dir_all(&old).unwrap();
    let fake = old.join("pg_restore");
    std::fs::write(&fake, "#!/bin/sh\necho 'pg_restore (PostgreSQL) 11.22'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = drill(&w, &node, "rnpp-db", &["--pg-bin", old.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let r = json(&out);
    assert_eq!(r["verdict"], "FAIL");
    assert!(r["reason"].as_str().unwrap().contains("is PostgreSQL 11, older than the server"), "{r}");
}

/// `exclave-restore VERB` naming every node of `nodes`, the first one first.
fn restore_cmd_all(w: &World, nodes: &[Node], verb: &str) -> Command {
    let mut c = w.restore_cmd(&nodes[0], verb);
    for n in &nodes[1..] {
        c.args(["--node", &n.addr.to_string()]);
    }
    c
}

#[test]
fn restores_and_drills_read_past_a_node_that_serves_damaged_chunks_or_dies() {
    let w = World::new();
    let mut nodes = w.start_cluster(&["n1", "n2", "n3"]);
    let src = w.path("src");
    sample_tree(&src, 2, 1 << 20);
    ok(w.backup(&nodes[0], "rnpp", &[&src]));
    let big = w.path("big");
    sample_tree(&big, 12, 24 << 20);
    ok(w.backup(&nodes[0], "big", &[&big]));
    let leader = w.wait_leader(&nodes);
    for i in 0..3 {
        w.wait_backfilled(&nodes[i], &nodes[leader]);
    }
    // n1's copy of one file is damaged on disk, another's is replaced by a forgery that
    // passes the node's own checksum and fails only the client's authentication.
    let keys = exclave::keys::read_key_file(&w.path("lux.key")).unwrap();
    let victim = "src/documents/2025/01/decision-005.xml";
    let liar = "src/documents/2025/01/decision-011.xml";
    let id = |rel: &str| keys.chunk_id(&std::fs::read(w.path(rel)).unwrap());
    nodes[0].stop().expect("stopped");
    let data = nodes[0].data.clone();
    tamper_chunk(&data, &id(victim), false, |env| {
        let n = env.len();
        env[n / 2] ^= 0x40;
    });
    tamper_chunk(&data, &id(liar), true, |env| {
        let n = env.len();
        env[n - 20] ^= 1;
    });
    nodes[0].restart();
    let n1 = nodes[0].addr.to_string();

    // All three nodes answer: requests are spread over them as they join (a larger snapshot,
    // so that the others have answered long before its end).
    let o = run(restore_cmd_all(&w, &nodes, "verify").args(["--source", "big", "--json"]));
    let r = json(&o);
    let served = r["served"].as_object().unwrap();
    assert!(served.len() >= 2, "requests spread over the nodes: {r:#}");
    // Every chunk read (each file's, and the manifest's) was served good by some node.
    assert!(served.values().map(|v| v.as_u64().unwrap()).sum::<u64>() > r["chunks"].as_u64().unwrap(), "{r:#}");
    assert_eq!(o.status.code(), Some(0), "{r:#}");

    // One request at a time goes to the first node, which serves the damaged chunks.
    let to = w.path("restored");
    let o = run(restore_cmd_all(&w, &nodes, "restore")
        .args(["--source", "rnpp", "--json", "--parallel", "1", "--to"])
        .arg(&to));
    let r = json(&o);
    assert_eq!(o.status.code(), Some(0), "{r:#}\n{}", stderr(&o));
    assert_eq!(r["node"], n1, "read from n1 first");
    let bad = r["bad_serves"].as_array().unwrap();
    assert_eq!(bad.len(), 2, "{r:#}");
    for b in bad {
        assert_eq!(b["node"], n1, "{b}");
        let good = b["recovered_from"].as_str().unwrap();
        assert!(good == nodes[1].addr.to_string() || good == nodes[2].addr.to_string(), "{b}");
    }
    assert!(bad.iter().any(|b| b["chunk"] == id(victim).to_string()), "{bad:?}");
    assert!(bad.iter().any(|b| b["error"].as_str().unwrap().contains("authentication failed")), "{bad:?}");
    for rel in [victim, liar, "src/registers/persons/persons.tsv"] {
        let restored = to.join(rel);
        assert_eq!(std::fs::read(restored).unwrap(), std::fs::read(w.path(rel)).unwrap(), "{rel}");
    }
    assert!(stderr(&o).contains("a good copy came from"), "{}", stderr(&o));

    // A drill passes and its report names the node that served damaged data.
    let o = run(restore_cmd_all(&w, &nodes, "drill").args([
        "--source",
        "rnpp",
        "--json",
        "--no-record",
        "--parallel",
        "1",
    ]));
    let r = json(&o);
    assert_eq!(r["verdict"], "PASS", "{r:#}");
    let check = r["checks"].as_array().unwrap().iter().find(|c| c["name"] == "embassy nodes").expect("nodes check");
    assert!(check["detail"].as_str().unwrap().contains(&format!("2 chunk(s) served damaged by {n1}")), "{check}");

    // With n1 alone there is no good copy: the drill fails and names the files and chunks.
    let o = drill(&w, &nodes[0], "rnpp", &["--no-record", "--parallel", "1"]);
    let r = json(&o);
    assert_eq!((o.status.code(), r["verdict"].as_str()), (Some(1), Some("FAIL")), "{r:#}");
    let problems: Vec<&str> =
        r["checks"][0]["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(problems.len(), 2, "{r:#}");
    assert!(problems.iter().any(|p| p.starts_with(victim) && p.contains("chunk ")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with(liar) && p.contains("authentication failed")), "{problems:?}");

    // n1 dies after its third chunk request: the restore goes on from another node.
    nodes[0].restart_with_env(&[("EXCLAVE_TEST_CRASH_AT", "get-chunks:3")]);
    let to = w.path("restored-2");
    let o = run(restore_cmd_all(&w, &nodes, "restore")
        .args(["--source", "rnpp", "--json", "--parallel", "1", "--to"])
        .arg(&to));
    let r = json(&o);
    assert_eq!(o.status.code(), Some(0), "{r:#}\n{}", stderr(&o));
    assert!(nodes[0].wait_dead(Duration::from_secs(5)), "n1 did not die at its third request");
    let f = &r["failovers"][0];
    assert_eq!(f["node"], n1, "{r:#}");
    assert!(f["continued_from"].is_string(), "{r:#}");
    assert_eq!(
        std::fs::read(to.join("src/registers/persons/persons.tsv")).unwrap(),
        std::fs::read(src.join("registers/persons/persons.tsv")).unwrap()
    );
}

fn drill_status(cfg: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let o = run(Command::new(bin("exclave-restore")).args(["status", "--json", "--config"]).arg(cfg));
    (o.status.code(), json(&o))
}

#[test]
fn the_drill_daemon_runs_scheduled_drills_reports_and_stops_on_sigterm() {
    let w = World::new();
    let node = w.start_node("n1");
    for (source, seed) in [("docs", 3), ("registry", 4)] {
        let src = w.path(source);
        sample_tree(&src, seed, 128 << 10);
        ok(w.backup(&node, source, &[&src]));
    }
    let metrics_port = free_tcp_port();
    let cfg = w.path("drills.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"node = ["{node}"]
pki = "{pki}"
identity = "dr"
key-file = "{key}"
state-dir = "{state}"
retry-secs = 1
metrics-listen = "127.0.0.1:{metrics_port}"

[drill.docs]
schedule = "*/2 * * * * *"
rto-target = 600

[drill.registry]
schedule = "* * * * * *"

[drill.never-backed-up]
schedule = "*/2 * * * * *"

[drill.monthly]
schedule = "0 3 1 * *"
"#,
            node = node.addr,
            pki = w.pki().display(),
            key = w.path("lux.key").display(),
            state = w.path("state").display(),
        ),
    )
    .unwrap();
    assert_eq!(drill_status(&cfg).1["daemon"], "never-ran");
    let log = std::fs::File::create(w.path("daemon.log")).unwrap();
    let mut daemon = Command::new(bin("exclave-restore"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_http(metrics_port, Duration::from_secs(20));

    // Both sources drilled at least twice, never two of one at once; the source with no
    // snapshot cannot run and says why; the monthly one waits.
    let deadline = Instant::now() + Duration::from_secs(90);
    let s = loop {
        let (_, s) = drill_status(&cfg);
        let d = &s["drills"];
        if d["docs"]["runs"].as_u64() >= Some(2)
            && d["registry"]["runs"].as_u64() >= Some(2)
            && d["never-backed-up"]["consecutive_errors"].as_u64() >= Some(1)
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "drills within 90 s: {s:#}\n{}",
            std::fs::read_to_string(w.path("daemon.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let d = &s["drills"];
    assert_eq!(s["daemon"], "running");
    assert_eq!(d["docs"]["last_verdict"], "PASS", "{s:#}");
    assert_eq!(d["registry"]["last_verdict"], "PASS", "{s:#}");
    assert!(d["docs"]["last_rto_secs"].as_f64().unwrap() > 0.0);
    assert!(d["never-backed-up"]["last_error"].as_str().unwrap().contains("no snapshot"), "{s:#}");
    assert_eq!(d["monthly"]["runs"], 0);
    assert!(d["monthly"]["next_run"].as_i64().unwrap() > s["updated"].as_i64().unwrap(), "{s:#}");
    let o = run(Command::new(bin("exclave-restore")).args(["status", "--config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(1), "a drill that cannot run makes status fail");
    assert!(stdout(&o).contains("CANNOT RUN"), "{}", stdout(&o));

    let m = metrics(metrics_port);
    promtool_check_metrics(&m);
    assert!(m.contains("exclave_drill_runs_total{result=\"PASS\",source=\"docs\"}"), "{m}");
    assert!(m.contains("exclave_drill_consecutive_errors{source=\"monthly\"} 0\n"), "{m}");
    assert!(!m.contains("exclave_drill_consecutive_errors{source=\"never-backed-up\"} 0\n"), "{m}");
    assert!(m.contains("exclave_build_info{program=\"exclave-restore\""), "{m}");

    // The drills are the cluster's record, and each left its report.
    let recorded = json(&ok(run(w.restore_cmd(&node, "drills").args(["--json", "--source", "docs"]))));
    assert!(recorded.as_array().unwrap().iter().any(|r| r["verdict"] == "PASS"), "{recorded:#}");
    let reports: Vec<_> = std::fs::read_dir(w.path("state/reports")).unwrap().flatten().collect();
    assert!(reports.iter().any(|e| e.file_name().to_string_lossy().starts_with("drill-registry-")), "{reports:?}");

    // SIGTERM: it stops cleanly, and status says so.
    let code = sigterm_and_wait(&mut daemon, Duration::from_secs(20), "the drill daemon");
    assert_eq!(code, Some(0));
    let (code, s) = drill_status(&cfg);
    assert_eq!((code, s["daemon"].as_str()), (Some(1), Some("stopped")));
    let log = std::fs::read_to_string(w.path("daemon.log")).unwrap();
    assert!(log.contains("drill PASS") && log.contains("drill could not run"), "{log}");
}

#[test]
fn a_drill_whose_scratch_disk_fills_fails_and_the_failure_is_recorded() {
    let w = World::new();
    let node = w.start_node("n1");
    let src = w.path("src");
    sample_tree(&src, 6, 4 << 20);
    ok(w.backup(&node, "rnpp", &[&src]));
    let scratch = w.path("scratch");
    mount_tmpfs(&scratch, "size=1m");
    let _u = Unmount(scratch.clone());
    let o = drill(&w, &node, "rnpp", &["--scratch", scratch.to_str().unwrap()]);
    let r = json(&o);
    assert_eq!(o.status.code(), Some(1), "{r:#}");
    assert_eq!(r["verdict"], "FAIL");
    let files = &r["checks"][0];
    assert_eq!(files["name"], "files");
    assert!(files["detail"].as_str().unwrap().contains("could not be restored"), "{r:#}");
    assert!(
        files["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("No space left on device")),
        "{r:#}"
    );
    assert_eq!(r["recorded"], true);
    let recorded = json(&ok(run(w.restore_cmd(&node, "drills").args(["--json", "--source", "rnpp"]))));
    assert_eq!(recorded[0]["verdict"], "FAIL", "{recorded:#}");
    // The scratch space is given back.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}
