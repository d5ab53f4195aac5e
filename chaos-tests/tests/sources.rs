//! Register sources through a real node: SQLite under concurrent writes, PostgreSQL dumps
//! restored into a fresh database, command output; and each kind's bad input, which must
//! fail clearly and leave no snapshot that looks complete.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use exclave_chaos_tests::postgres::PgServer;
use exclave_chaos_tests::*;

fn agent_facts(args: &[&str], compare: &std::path::Path) -> std::process::Output {
    run(Command::new(bin("exclave-agent")).arg("facts").args(args).arg("--compare").arg(compare))
}

#[test]
fn sqlite_snapshot_under_concurrent_writes_is_consistent() {
    let w = World::new();
    let node = w.start_node("n1");
    let db = w.path("ledger.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE entry (id INTEGER PRIMARY KEY, tx INTEGER NOT NULL, amount INTEGER NOT NULL, memo TEXT);",
        )
        .unwrap();
    }
    // Every transaction writes a debit and a credit: any consistent view sums to zero.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut c = rusqlite::Connection::open(&db).unwrap();
            c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let tx = c.transaction().unwrap();
                tx.execute("INSERT INTO entry (tx, amount, memo) VALUES (?1, ?2, 'debit')", (n, 100 + n)).unwrap();
                tx.execute("INSERT INTO entry (tx, amount, memo) VALUES (?1, ?2, 'credit')", (n, -100 - n)).unwrap();
                tx.commit().unwrap();
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut snaps = Vec::new();
    for _ in 0..2 {
        let out = ok(w.backup_as(&node, "rnpp", "lux.key", "vehicles", &[], &["--sqlite", db.to_str().unwrap()]));
        let s = json(&out);
        assert_eq!(s["kind"], "sqlite");
        assert_eq!(s["tables"], 1);
        snaps.push(s["snapshot"].as_str().unwrap().to_string());
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 10, "the writer must have been busy during the snapshots ({written} transactions)");

    for (i, snap) in snaps.iter().enumerate() {
        let to = w.path(&format!("restored-{i}"));
        ok(w.restore(&node, "vehicles", snap, &to));
        let restored = to.join("ledger.db");
        let c = rusqlite::Connection::open(&restored).unwrap();
        let check: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let (rows, sum): (i64, i64) = c
            .query_row("SELECT count(*), coalesce(sum(amount), 0) FROM entry", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert!(rows > 0 && rows % 2 == 0 && sum == 0, "torn snapshot: {rows} rows summing to {sum}");
        let facts: serde_json::Value =
            serde_json::from_slice(&std::fs::read(to.join("ledger.db.facts.json")).unwrap()).unwrap();
        assert_eq!(facts["tables"][0]["rows"], rows);
        let cmp = ok(agent_facts(&["--sqlite", restored.to_str().unwrap()], &to.join("ledger.db.facts.json")));
        assert!(stdout(&cmp).contains("OK: 1 tables match"), "{}", stdout(&cmp));
    }
    // A restored database that differs from its facts is caught.
    let restored = w.path("restored-0/ledger.db");
    rusqlite::Connection::open(&restored).unwrap().execute("DELETE FROM entry WHERE id = 1", []).unwrap();
    let cmp = agent_facts(&["--sqlite", restored.to_str().unwrap()], &w.path("restored-0/ledger.db.facts.json"));
    assert_eq!(cmp.status.code(), Some(1), "{}", stdout(&cmp));
    assert!(stdout(&cmp).contains("table entry:"), "{}", stdout(&cmp));
}

#[test]
fn bad_sqlite_and_command_sources_fail_without_a_snapshot() {
    let w = World::new();
    let node = w.start_node("n1");
    let not_db = w.path("notes.db");
    std::fs::write(&not_db, vec![b'x'; 4096]).unwrap();
    let o = w.backup_as(&node, "rnpp", "lux.key", "notes", &[], &["--sqlite", not_db.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not a readable SQLite database"), "{}", stderr(&o));
    assert_eq!(w.snapshot_ids(&node, "notes").len(), 0);

    // Output, then a failure: the partial output must not become a snapshot.
    let o = w.backup_as(
        &node,
        "rnpp",
        "lux.key",
        "ldap",
        &[],
        &["--command", "seq 1 100000; echo 'ldap down' >&2; exit 4"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("exited with status 4") && stderr(&o).contains("ldap down"), "{}", stderr(&o));
    let o = w.backup_as(&node, "rnpp", "lux.key", "ldap", &[], &["--command", "seq 1 1000; kill -9 $$"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("killed by signal 9"), "{}", stderr(&o));
    assert_eq!(w.snapshot_ids(&node, "ldap").len(), 0);

    // And a command that works is restored exactly.
    let s = json(&ok(w.backup_as(&node, "rnpp", "lux.key", "ldap", &[], &["--command", "seq 1 100000"])));
    assert_eq!(s["kind"], "command");
    let to = w.path("restored");
    ok(w.restore(&node, "ldap", "latest", &to));
    let expected: String = (1..=100000).map(|i| format!("{i}\n")).collect();
    assert_eq!(std::fs::read_to_string(to.join("ldap.out")).unwrap(), expected);
}

const SCHEMA: &str = "
CREATE TABLE person (id bigint PRIMARY KEY, name text NOT NULL, born date, updated timestamptz,
                     income numeric(12,2), photo bytea, tags text[]);
CREATE SCHEMA cadastre;
CREATE TABLE cadastre.\"Parcel\" (id serial PRIMARY KEY, owner bigint REFERENCES person, area double precision, geo jsonb);
INSERT INTO person SELECT i, 'Persoon ' || i || ' Ærø', date '1950-01-01' + i, timestamptz '2026-01-01 12:00+02' + i * interval '1 minute',
       i * 1.25, decode(md5(i::text), 'hex'), ARRAY['a' || i, 'b'] FROM generate_series(1, 20000) i;
INSERT INTO cadastre.\"Parcel\" (owner, area, geo) SELECT i, i / 7.0, jsonb_build_object('x', i, 'y', -i) FROM generate_series(1, 20000, 3) i;
";

#[test]
fn postgres_dump_restores_into_a_fresh_database_with_the_same_facts() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = PgServer::start("");
    pg.psql("postgres", "CREATE DATABASE rnpp");
    pg.psql("rnpp", SCHEMA);

    let s = json(&ok(w.backup_as(&node, "rnpp", "lux.key", "rnpp-db", &[], &["--postgres", &pg.conn("rnpp")])));
    assert_eq!(s["kind"], "postgres");
    assert_eq!(s["tables"], 2);
    assert!(s["facts_secs"].as_f64().unwrap() > 0.0, "{s}");
    let first_read = s["bytes_read"].as_u64().unwrap();

    let to = w.path("restored");
    ok(w.restore(&node, "rnpp-db", "latest", &to));
    let facts: serde_json::Value = serde_json::from_slice(&std::fs::read(to.join("rnpp.facts.json")).unwrap()).unwrap();
    assert_eq!(facts["engine"], "postgresql");
    assert_eq!(facts["tables"][0]["name"], "cadastre.\"Parcel\"");
    assert_eq!(facts["tables"][1]["rows"], 20000);

    pg.psql("postgres", "CREATE DATABASE fresh");
    ok(run(Command::new(pg.bin.join("pg_restore"))
        .args(["--exit-on-error", "--no-owner", "-d", &pg.conn("fresh")])
        .arg(to.join("rnpp.dump"))));
    let cmp = ok(agent_facts(&["--postgres", &pg.conn("fresh")], &to.join("rnpp.facts.json")));
    assert!(stdout(&cmp).contains("OK: 2 tables match"), "{}", stdout(&cmp));
    assert_eq!(
        pg.psql("fresh", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM person p"),
        pg.psql("rnpp", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM person p")
    );

    // A change after the snapshot shows up as a difference, and a day-2 dump uploads little.
    pg.psql("rnpp", "UPDATE person SET name = 'Renamed' WHERE id BETWEEN 100 AND 120");
    let cmp = agent_facts(&["--postgres", &pg.conn("rnpp")], &to.join("rnpp.facts.json"));
    assert_eq!(cmp.status.code(), Some(1));
    assert!(
        stdout(&cmp).contains("table public.person: same row count (20000) but the contents differ"),
        "{}",
        stdout(&cmp)
    );
    let day2 = json(&ok(w.backup_as(&node, "rnpp", "lux.key", "rnpp-db", &[], &["--postgres", &pg.conn("rnpp")])));
    let (read, new) = (day2["bytes_read"].as_u64().unwrap(), day2["new_bytes"].as_u64().unwrap());
    assert!(read >= first_read - 4096, "{day2}");
    assert!(new * 4 < read, "a small change must deduplicate: {new} new of {read} read");
}

#[test]
fn bad_postgres_sources_fail_clearly_without_a_snapshot() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = PgServer::start("");
    let backup = |extra: &[&str]| w.backup_as(&node, "rnpp", "lux.key", "pg", &[], extra);

    let nobody = format!("host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5", free_port());
    let o = backup(&["--postgres", &nobody]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("connecting to PostgreSQL"), "{}", stderr(&o));
    let o = backup(&["--postgres", &pg.conn("no_such_db")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no_such_db"), "{}", stderr(&o));

    let o = backup(&["--postgres", &pg.conn("postgres"), "--pg-bin", "/nonexistent/bin"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot run /nonexistent/bin/pg_dump"), "{}", stderr(&o));

    // A pg_dump older than the server is refused before it runs.
    let old = w.path("old-bin");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("pg_dump"), "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    std::fs::set_permissions(old.join("pg_dump"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = backup(&["--postgres", &pg.conn("postgres"), "--pg-bin", old.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is version 9 but the server is PostgreSQL"), "{}", stderr(&o));

    // A pg_dump that dies part way: nothing committed.
    std::fs::write(old.join("pg_dump"), "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 99.0'; exit 0; fi\nhead -c 300000 /dev/zero; kill -9 $$\n").unwrap();
    let o = backup(&["--postgres", &pg.conn("postgres"), "--pg-bin", old.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("killed by signal 9"), "{}", stderr(&o));
    // A base backup whose tar stream breaks off: pg_basebackup's own words are reported.
    std::fs::write(
        old.join("pg_basebackup"),
        "#!/bin/sh\ntar -cf - -C /etc hostname passwd group | head -c 1800\n\
         echo 'pg_basebackup: error: could not read COPY data: server closed the connection' >&2; exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(old.join("pg_basebackup"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = backup(&["--postgres", &pg.conn("postgres"), "--pg-base", "--pg-bin", old.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("server closed the connection"), "{}", stderr(&o));
    assert_eq!(w.snapshot_ids(&node, "pg").len(), 0);
}

#[test]
fn two_snapshots_of_one_source_never_run_at_once() {
    let w = World::new();
    let node = w.start_node("n1");
    let cfg = w.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "node = [\"{}\"]\npki = \"{}\"\nidentity = \"rnpp\"\nkey-file = \"{}\"\nstate-dir = \"{}\"\n\n\
             [sources.slow]\nkind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 3; echo done\"]\n",
            node.addr,
            w.pki().display(),
            w.path("lux.key").display(),
            w.path("state").display()
        ),
    )
    .unwrap();
    let backup = || {
        let mut c = Command::new(bin("exclave-agent"));
        c.args(["backup", "--json", "--source", "slow", "--config"]).arg(&cfg);
        c
    };
    let first = backup().stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let lock = w.path("state/locks/slow.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(&lock).map(|p| p.trim().is_empty()).unwrap_or(true) {
        assert!(std::time::Instant::now() < deadline, "the first run never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = run(&mut backup());
    assert_eq!(second.status.code(), Some(1));
    assert!(stderr(&second).contains("a snapshot of source slow is already running"), "{}", stderr(&second));
    let first = ok(first.wait_with_output().unwrap());
    assert_eq!(json(&first)["kind"], "command");
    // Once it is over, the next run goes ahead.
    ok(run(&mut backup()));
}
