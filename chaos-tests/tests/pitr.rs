//! PostgreSQL continuous archiving through a real node: pgbench writes while PostgreSQL's
//! own archiver runs `exclave-agent wal-push`; a point-in-time restore to T recovers exactly
//! the transactions committed before T; an unreachable cluster makes the archive command
//! fail, PostgreSQL retries, and no segment is lost.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use exclave_chaos_tests::postgres::PgServer;
use exclave_chaos_tests::*;

/// A server whose archive_command pushes WAL to `nodes` as source `pg`.
fn archiving_server(w: &World, nodes: &[std::net::SocketAddr]) -> PgServer {
    archiving_server_with(w, nodes, false)
}

/// As `archiving_server`; with `ahead`, each call also pushes up to three ready segments.
fn archiving_server_with(w: &World, nodes: &[std::net::SocketAddr], ahead: bool) -> PgServer {
    let mut pg = PgServer::init("");
    let (agent, cfg, _, _) = pg.share_client(w, "exclave-agent", nodes);
    let extra = if ahead {
        let spool = pg.dir.path().join("wal-ahead");
        std::fs::create_dir_all(&spool).unwrap();
        pg.own(&spool);
        format!("--ahead 4 --spool {} ", spool.display())
    } else {
        String::new()
    };
    pg.configure(&format!(
        "wal_level = replica\narchive_mode = on\narchive_command = '{} wal-push --config {} --source pg {extra}%p'\n",
        agent.display(),
        cfg.display()
    ));
    pg.start_existing();
    pg
}

/// Every segment from `first` to `last` is in the archive of `pg`.
fn assert_all_archived(w: &World, node: &Node, first: &str, last: &str) {
    let ids = w.snapshot_ids(node, "pg.wal");
    let seg_no = |name: &str| {
        u64::from_str_radix(&name[8..16], 16).unwrap() * 0x100 + u64::from_str_radix(&name[16..24], 16).unwrap()
    };
    let mut have: Vec<u64> =
        ids.iter().filter_map(|i| exclave::wal::file_name(i)).filter(|n| n.len() == 24).map(seg_no).collect();
    have.sort();
    for n in seg_no(first)..=seg_no(last) {
        assert!(have.binary_search(&n).is_ok(), "segment {n:x} missing from the archive: {ids:?}");
    }
}

/// A base backup of `pg` as snapshot source `pg` (its WAL is archived as `pg.wal`).
fn base_backup(w: &World, node: &Node, pg: &PgServer) -> std::process::Output {
    w.backup_as(
        node,
        "rnpp",
        "lux.key",
        "pg",
        &[],
        &["--postgres", &pg.conn("postgres"), "--pg-base", "--pg-bin", pg.bin.to_str().unwrap()],
    )
}

/// Forces a WAL switch and waits until the archiver has stored the switched segment.
fn switch_and_wait_archived(pg: &PgServer, timeout: Duration) -> String {
    let seg = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = pg.psql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.len() == 24 && last >= seg {
            return seg;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "segment {seg} not archived in {timeout:?} (last {last})\n{}",
            pg.log()
        );
        // Nudge the archiver: a switch wakes it at once instead of at its next 60 s cycle.
        pg.psql("postgres", "SELECT pg_switch_wal()");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `exclave-restore pitr --source pg ARGS` into a new server's data directory, run as that
/// server's user would run the restore command it writes; returns the server (not started)
/// and the JSON report.
fn recover(w: &World, node: &Node, args: &[&str]) -> (PgServer, serde_json::Value) {
    let server = PgServer::empty();
    let (restore, _, pki, key) = server.share_client(w, "exclave-restore", &[node.addr]);
    let o = ok(run(Command::new(&restore)
        .args(["pitr", "--json", "--node", &node.addr.to_string(), "--pki"])
        .arg(&pki)
        .args(["--identity", "dr", "--key-file"])
        .arg(&key)
        .args(["--source", "pg"])
        .args(args)
        .arg("--to")
        .arg(server.data())));
    (server, json(&o))
}

fn pgbench(pg: &PgServer, args: &[&str]) {
    ok(run(Command::new(pg.bin.join("pgbench")).arg("-n").args(args).arg(pg.conn("bench"))));
}

#[test]
fn point_in_time_restore_recovers_exactly_what_was_committed_before_t() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = archiving_server(&w, &[node.addr]);
    pg.psql("postgres", "CREATE DATABASE bench");
    ok(run(Command::new(pg.bin.join("pgbench")).args(["-i", "-q", "-s", "1"]).arg(pg.conn("bench"))));

    let base = json(&ok(base_backup(&w, &node, &pg)));
    assert!(base["files"].as_u64().unwrap() > 100, "{base}");

    pgbench(&pg, &["-T", "4", "-c", "2"]);
    std::thread::sleep(Duration::from_millis(1500));
    let t = pg.psql("postgres", "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    let at_t = w.path("facts-at-t.json");
    let facts = ok(run(Command::new(bin("exclave-agent")).args(["facts", "--postgres", &pg.conn("bench")])));
    std::fs::write(&at_t, &facts.stdout).unwrap();
    let history_at_t = pg.psql("bench", "SELECT count(*) FROM pgbench_history");
    assert!(history_at_t.parse::<u64>().unwrap() > 50, "pgbench must have run: {history_at_t}");
    std::thread::sleep(Duration::from_millis(1500));
    pgbench(&pg, &["-T", "3", "-c", "2"]);
    switch_and_wait_archived(&pg, Duration::from_secs(90));
    assert_eq!(pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver"), "0", "{}", pg.log());
    assert!(w.snapshot_ids(&node, "pg.wal").len() >= 3);

    let (mut rec, report) = recover(&w, &node, &["--target-time", &t]);
    assert_eq!(report["base"]["id"], base["snapshot"]);
    assert_eq!(report["archive_reaches_target"], true);
    rec.adopt_data("archive_mode = off\n");
    rec.start_existing();
    rec.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", Duration::from_secs(120));

    assert_eq!(rec.psql("bench", "SELECT count(*) FROM pgbench_history"), history_at_t);
    let cmp = ok(run(Command::new(bin("exclave-agent"))
        .args(["facts", "--postgres", &rec.conn("bench"), "--compare"])
        .arg(&at_t)));
    assert!(stdout(&cmp).contains("OK: 4 tables match"), "{}", stdout(&cmp));
    assert!(rec.log().contains("recovery stopping before commit"), "{}", rec.log());
    // Segments came eight per trip to the cluster, and the spool went when recovery ended.
    assert!(rec.log().contains("restored from the prefetch spool"), "{}", rec.log());
    assert!(!rec.data().join("exclave-wal-prefetch").exists());

    // `latest`: everything archived, i.e. every transaction of both pgbench runs.
    let history_at_end = pg.psql("bench", "SELECT count(*) FROM pgbench_history");
    assert!(history_at_end.parse::<u64>().unwrap() > history_at_t.parse::<u64>().unwrap());
    let (mut last, report) = recover(&w, &node, &[]);
    assert_eq!(report["target_time"], "the end of the archive");
    last.adopt_data("archive_mode = off\n");
    last.start_existing();
    last.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(last.psql("bench", "SELECT count(*) FROM pgbench_history"), history_at_end);
}

#[test]
fn archiving_fails_while_the_cluster_is_unreachable_and_loses_no_segment() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let pg = archiving_server(&w, &[node.addr]);
    pg.psql("postgres", "CREATE TABLE t (i int)");
    let first = switch_and_wait_archived(&pg, Duration::from_secs(60));

    node.stop();
    pg.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000)");
    let held = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(std::time::Instant::now() < deadline, "the archive command never failed\n{}", pg.log());
        std::thread::sleep(Duration::from_millis(300));
    }
    let last = pg.psql("postgres", "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
    assert!(last < held, "{held} must not be reported archived while the cluster is down (last {last})");
    assert!(pg.log().contains("archive command failed"), "{}", pg.log());

    node.restart();
    pg.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000)");
    let last = switch_and_wait_archived(&pg, Duration::from_secs(120));

    // Every segment from the first to the last is in the archive, the held one included.
    assert_all_archived(&w, &node, &first, &last);
    let ids = w.snapshot_ids(&node, "pg.wal");
    let names: Vec<&str> = ids.iter().filter_map(|i| exclave::wal::file_name(i)).collect();
    assert!(names.contains(&held.to_ascii_lowercase().as_str()));

    // wal-fetch gives the archived file back; a name not archived is answered with exit 1.
    let dest = w.path("fetched");
    ok(run(w.restore_cmd(&node, "wal-fetch").args(["--source", "pg", &held]).arg(&dest)));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);

    // Pushing the same file again succeeds; other content under that name is refused; the
    // same name from another database cluster (source) is a different file.
    let push = |source: &str, file: &std::path::Path| {
        run(Command::new(bin("exclave-agent"))
            .args(["wal-push", "--node", &node.addr.to_string(), "--pki"])
            .arg(w.pki())
            .args(["--identity", "rnpp", "--key-file"])
            .arg(w.path("lux.key"))
            .args(["--source", source])
            .arg(file))
    };
    let again = w.path("again");
    std::fs::create_dir_all(&again).unwrap();
    std::fs::copy(&dest, again.join(&held)).unwrap();
    assert!(stdout(&ok(push("pg", &again.join(&held)))).contains(&format!("archived {held}")));
    let other = w.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join(&held), vec![7u8; 16 << 20]).unwrap();
    let o = push("pg", &other.join(&held));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already archived with different content"), "{}", stderr(&o));
    ok(push("pg2", &other.join(&held)));
    let back = w.path("back");
    ok(run(w.restore_cmd(&node, "wal-fetch").args(["--source", "pg", &held]).arg(&back)));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&dest).unwrap());
    let o =
        run(w.restore_cmd(&node, "wal-fetch").args(["--source", "pg", "0000000100000000000000FF"]).arg(w.path("none")));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not in the WAL archive"), "{}", stderr(&o));

    // No node to fetch from is not "not archived": PostgreSQL must stop recovery, not promote.
    node.stop();
    let o = run(w.restore_cmd(&node, "wal-fetch").args(["--source", "pg", &held]).arg(w.path("unreachable")));
    assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
    assert!(stderr(&o).contains("recovery stops here"), "{}", stderr(&o));
}

/// `exclave-restore drill` of the source's base backups, as root, with the drill's own
/// scratch server and WAL spool.
fn drill(w: &World, node: &Node, args: &[&str]) -> std::process::Output {
    run(w.restore_cmd(node, "drill").args(["--source", "pg", "--json", "--no-record"]).args(args))
}

#[test]
fn a_pitr_drill_recovers_to_the_target_and_to_the_end_and_fails_past_the_archive() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = archiving_server(&w, &[node.addr]);
    pg.psql("postgres", "CREATE DATABASE bench");
    ok(run(Command::new(pg.bin.join("pgbench")).args(["-i", "-q", "-s", "1"]).arg(pg.conn("bench"))));
    let base = json(&ok(base_backup(&w, &node, &pg)));
    pgbench(&pg, &["-T", "3", "-c", "2"]);
    std::thread::sleep(Duration::from_millis(1500));
    let t = pg.psql("postgres", "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");
    let t_epoch: f64 = pg.psql("postgres", "SELECT extract(epoch FROM now())").parse().unwrap();
    let history_at_t: u64 = pg.psql("bench", "SELECT count(*) FROM pgbench_history").parse().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    pgbench(&pg, &["-T", "2", "-c", "2"]);
    let history_at_end: u64 = pg.psql("bench", "SELECT count(*) FROM pgbench_history").parse().unwrap();
    assert!(history_at_end > history_at_t && history_at_t > 50, "{history_at_t} then {history_at_end}");
    switch_and_wait_archived(&pg, Duration::from_secs(90));

    // To T: exactly what was committed before T, read back table by table.
    let reports = w.path("reports");
    let o = drill(&w, &node, &["--target-time", &t, "--report", reports.to_str().unwrap()]);
    let r = json(&o);
    assert_eq!(o.status.code(), Some(0), "{r:#}");
    assert_eq!(r["verdict"], "PASS", "{r:#}");
    assert_eq!(r["snapshot"], base["snapshot"]);
    let rec = &r["recovery"];
    assert_eq!(rec["databases"]["bench"]["public.pgbench_history"], history_at_t, "{rec:#}");
    assert_eq!(rec["databases"]["bench"]["public.pgbench_accounts"], 100_000, "{rec:#}");
    assert!(rec["wal_files_fetched"].as_u64().unwrap() >= 1, "{rec:#}");
    let newest = rec["newest_transaction"].as_f64().unwrap();
    assert!(newest <= t_epoch && newest > t_epoch - 5.0, "newest recovered {newest}, target {t_epoch}");
    let md: Vec<_> = std::fs::read_dir(&reports)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "md"))
        .collect();
    let md = std::fs::read_to_string(md[0].path()).unwrap();
    assert!(md.contains("Point-in-time recovery to") && md.contains("| bench | public.pgbench_history |"), "{md}");

    // To the end of the archive: every transaction, and the loss window is measured from the
    // newest of them, not from the base backup.
    let r = json(&ok(drill(&w, &node, &[])));
    assert_eq!(r["verdict"], "PASS", "{r:#}");
    assert_eq!(r["recovery"]["databases"]["bench"]["public.pgbench_history"], history_at_end, "{r:#}");
    assert!(r["rpo_secs"].as_i64().unwrap() < 60, "{r:#}");
    // Replay reached the end of the archive: the newest transaction is within the segment
    // switch that ended it, not minutes before.
    let gap = r["recovery"]["gap_to_archive_secs"].as_f64().unwrap();
    assert!((0.0..30.0).contains(&gap), "{r:#}");

    // A target the archive does not reach: PostgreSQL refuses to promote short of it.
    let o = drill(&w, &node, &["--target-time", "2099-01-01 00:00:00"]);
    let r = json(&o);
    assert_eq!(o.status.code(), Some(1), "{r:#}");
    assert_eq!(r["verdict"], "FAIL");
    assert!(r["reason"].as_str().unwrap().contains("before configured recovery target was reached"), "{r:#}");

    // A target before the first base backup: nothing to start from, said plainly.
    let o = drill(&w, &node, &["--target-time", "2001-01-01 00:00:00"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no base backup was started before the target time"), "{}", stderr(&o));
}

#[test]
fn wal_fetch_prefetches_into_a_spool_serves_from_it_and_refetches_a_damaged_file() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = archiving_server(&w, &[node.addr]);
    pg.psql("postgres", "CREATE TABLE t (i int)");
    let mut segs = Vec::new();
    for _ in 0..3 {
        pg.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000)");
        segs.push(switch_and_wait_archived(&pg, Duration::from_secs(60)));
    }
    // Three switches in a row: consecutive segments, all archived.
    let fetch = |file: &str, dest: &std::path::Path, spool: Option<&std::path::Path>| {
        let mut c = w.restore_cmd(&node, "wal-fetch");
        c.args(["--source", "pg"]);
        if let Some(s) = spool {
            c.args(["--prefetch", "3", "--spool"]).arg(s);
        }
        ok(run(c.arg(file).arg(dest)))
    };
    let plain = |file: &str| {
        let p = w.path(&format!("plain-{file}"));
        fetch(file, &p, None);
        std::fs::read(p).unwrap()
    };
    let spool = w.path("spool");
    fetch(&segs[0], &w.path("a"), Some(&spool));
    assert_eq!(std::fs::read(w.path("a")).unwrap(), plain(&segs[0]));
    for s in &segs[1..] {
        assert!(spool.join(s).is_file() && spool.join(format!("{s}.b3")).is_file(), "{s} prefetched");
    }
    // Served from the spool, without the network, and moved out of it.
    let o = fetch(&segs[1], &w.path("b"), Some(&spool));
    assert!(stderr(&o).contains("restored from the prefetch spool"), "{}", stderr(&o));
    assert_eq!(std::fs::read(w.path("b")).unwrap(), plain(&segs[1]));
    assert!(!spool.join(&segs[1]).exists());
    // Damaged on disk while waiting: dropped and fetched again, never handed to PostgreSQL.
    let mut bytes = std::fs::read(spool.join(&segs[2])).unwrap();
    bytes[4096] ^= 0xff;
    std::fs::write(spool.join(&segs[2]), bytes).unwrap();
    let o = fetch(&segs[2], &w.path("c"), Some(&spool));
    assert!(stderr(&o).contains("is damaged; fetching it again"), "{}", stderr(&o));
    assert_eq!(std::fs::read(w.path("c")).unwrap(), plain(&segs[2]));
}

#[test]
fn a_recovery_follows_a_promoted_timeline_through_its_history_file() {
    let w = World::new();
    let node = w.start_node("n1");
    let mut pg = archiving_server(&w, &[node.addr]);
    pg.psql("postgres", "CREATE TABLE t (i int, tl text)");
    ok(base_backup(&w, &node, &pg));
    pg.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000), 'one'");
    switch_and_wait_archived(&pg, Duration::from_secs(60));
    pg.stop();

    // A first recovery is promoted onto timeline 2 and archives into the same archive.
    let (mut two, _) = recover(&w, &node, &[]);
    let (agent, cfg, _, _) = two.share_client(&w, "exclave-agent", &[node.addr]);
    two.adopt_data(&format!(
        "archive_mode = on\narchive_command = '{} wal-push --config {} --source pg %p'\n",
        agent.display(),
        cfg.display()
    ));
    two.start_existing();
    two.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(two.psql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    two.psql("postgres", "INSERT INTO t SELECT generate_series(1, 500), 'two'");
    switch_and_wait_archived(&two, Duration::from_secs(60));
    assert!(w.snapshot_ids(&node, "pg.wal").iter().any(|i| i.ends_with("00000002.history")), "history archived");
    two.stop();

    // From the same base backup, `latest` follows timeline 1 into timeline 2 and replays it.
    let (mut three, _) = recover(&w, &node, &[]);
    three.adopt_data("archive_mode = off\n");
    three.start_existing();
    three.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", Duration::from_secs(120));
    assert_eq!(three.psql("postgres", "SELECT tl, count(*) FROM t GROUP BY tl ORDER BY tl"), "one|1000\ntwo|500");
    assert_eq!(three.psql("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"), "3");
}

#[test]
fn archiving_pushes_ready_segments_ahead_and_loses_none() {
    let w = World::new();
    let node = w.start_node("n1");
    let pg = archiving_server_with(&w, &[node.addr], true);
    pg.psql("postgres", "CREATE TABLE t (i int)");
    let first = pg.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    // Segments switched faster than one push each: they wait as .ready for the archiver.
    for _ in 0..8 {
        pg.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000); SELECT pg_switch_wal()");
    }
    let last = switch_and_wait_archived(&pg, Duration::from_secs(120));
    assert_eq!(pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver"), "0", "{}", pg.log());
    assert!(pg.log().contains("pushed ahead, unchanged"), "no call was answered from a push ahead:\n{}", pg.log());
    assert_all_archived(&w, &node, &first, &last);
    // What was pushed ahead is the segment itself: a recovery from it is exact.
    let dest = w.path("fetched");
    ok(run(w.restore_cmd(&node, "wal-fetch").args(["--source", "pg", &last]).arg(&dest)));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
}
