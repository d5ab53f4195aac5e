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
