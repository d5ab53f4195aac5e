//! The agent daemon against a real node: scheduled snapshots commit, a failing source is
//! reported and retried, a slow source never runs twice at once, the cluster going away
//! and coming back is survived, status and metrics tell the operator, SIGTERM stops it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn status(cfg: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let o = run(Command::new(bin("exclave-agent")).args(["status", "--json", "--config"]).arg(cfg));
    (o.status.code(), json(&o))
}

fn wait_until(
    cfg: &std::path::Path,
    what: &str,
    timeout: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, s) = status(cfg);
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}; status: {s:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn daemon_runs_schedules_retries_and_reports() {
    let w = World::new();
    let mut node = w.start_node("n1");
    let docs = w.path("docs");
    sample_tree(&docs, 7, 256 << 10);
    let lock = w.path("slow.lock");
    let metrics_port = free_tcp_port();
    let cfg = w.path("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"node = ["{node}"]
pki = "{pki}"
identity = "rnpp"
key-file = "{key}"
state-dir = "{state}"
retry-secs = 1
metrics-listen = "127.0.0.1:{metrics_port}"

[sources.docs]
kind = "path"
paths = ["{docs}"]
schedule = "*/2 * * * * *"

[sources.slow]
kind = "command"
command = ["/bin/sh", "-c", "mkdir {lock} || exit 9; sleep 2; rmdir {lock}; echo done"]
schedule = "* * * * * *"

[sources.broken]
kind = "command"
command = ["/bin/sh", "-c", "echo 'export tool crashed' >&2; exit 5"]
schedule = "0 3 * * *"
jitter-secs = 1

[sources.manual]
kind = "path"
paths = ["{docs}"]
"#,
            node = node.addr,
            pki = w.pki().display(),
            key = w.path("lux.key").display(),
            state = w.path("state").display(),
            docs = docs.display(),
            lock = lock.display(),
        ),
    )
    .unwrap();
    let (code, s) = status(&cfg);
    assert_eq!((code, s["daemon"].as_str()), (Some(1), Some("never-ran")));

    let log = std::fs::File::create(w.path("daemon.log")).unwrap();
    let mut daemon = Command::new(bin("exclave-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Up and ready at once, with every source's series before any has run: `broken` (due at
    // 03:00) is alertable as never having succeeded.
    wait_http(metrics_port, Duration::from_secs(20));
    assert_eq!(http_get(metrics_port, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(metrics_port, "/readyz"), (200, "ready\n".to_string()));
    let m = metrics(metrics_port);
    promtool_check_metrics(&m);
    assert!(m.contains("exclave_agent_last_success_timestamp_seconds{source=\"broken\"} 0\n"), "{m}");
    assert!(m.contains("exclave_agent_schedule_interval_seconds{source=\"broken\"} 86401\n"), "{m}");
    assert!(m.contains("exclave_agent_schedule_interval_seconds{source=\"docs\"} 2\n"), "{m}");
    assert!(m.contains("exclave_agent_runs_total{result=\"failed\",source=\"broken\"} 0\n"), "{m}");
    assert!(m.contains("exclave_build_info{program=\"exclave-agent\""), "{m}");
    assert!(m.contains("exclave_agent_certificate_expiry_timestamp_seconds{identity=\"rnpp\"}"), "{m}");
    assert!(m.contains("process_resident_memory_bytes"), "{m}");

    let s = wait_until(&cfg, "docs committed twice and slow ran twice", Duration::from_secs(60), |s| {
        s["sources"]["docs"]["runs"].as_u64() >= Some(2)
            && s["sources"]["slow"]["runs"].as_u64() >= Some(2)
            && s["sources"]["docs"]["last_snapshot"].is_string()
    });
    assert_eq!(s["daemon"], "running");
    assert!(s["sources"].get("manual").is_none(), "an unscheduled source is not the daemon's");
    // A run of `slow` started while another was under way would have failed on the lock.
    assert_eq!(s["sources"]["slow"]["failures"], 0, "{s:#}");
    // `broken` is only due at 03:00; it has not run, so nothing is failing yet.
    assert_eq!(s["sources"]["broken"]["runs"], 0);
    let (code, _) = status(&cfg);
    assert_eq!(code, Some(0));

    // The cluster goes away: runs fail and are retried; it comes back: runs commit again.
    node.stop();
    let s = wait_until(&cfg, "docs failing while the node is down", Duration::from_secs(60), |s| {
        s["sources"]["docs"]["consecutive_failures"].as_u64() >= Some(1)
    });
    let failed_at_runs = s["sources"]["docs"]["runs"].as_u64().unwrap();
    let o = run(Command::new(bin("exclave-agent")).args(["status", "--config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(1), "status exits 1 while a source fails");
    assert!(stdout(&o).contains("FAILING"), "{}", stdout(&o));
    node.restart();
    let s = wait_until(&cfg, "docs committing again after the node returned", Duration::from_secs(90), |s| {
        s["sources"]["docs"]["consecutive_failures"] == 0
            && s["sources"]["docs"]["runs"].as_u64() > Some(failed_at_runs)
    });
    assert!(s["sources"]["docs"]["failures"].as_u64() >= Some(1));

    let m = metrics(metrics_port);
    assert!(m.contains("exclave_agent_runs_total{result=\"ok\",source=\"docs\"}"), "{m}");
    assert!(m.contains("exclave_agent_runs_total{result=\"failed\",source=\"docs\"}"), "{m}");
    assert!(m.contains("exclave_agent_last_success_timestamp_seconds{source=\"slow\"}"), "{m}");
    promtool_check_metrics(&m);
    let value = |name: &str| -> f64 {
        let line = m.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("exclave_agent_read_bytes_total{source=\"docs\"}") >= (2 * (256 << 10)) as f64, "{m}");
    assert!(value("exclave_agent_uploaded_bytes_total{source=\"docs\"}") > 0.0, "{m}");
    assert!(value("exclave_agent_last_run_duration_seconds{source=\"slow\"}") >= 2.0, "{m}");
    assert_eq!(value("exclave_agent_consecutive_failures{source=\"docs\"}"), 0.0, "{m}");

    // The snapshots are real: the latest restores exactly.
    let to = w.path("restored");
    ok(w.restore(&node, "docs", "latest", &to));
    assert_same_tree(&docs, &to.join("docs"));

    // SIGTERM: the daemon stops cleanly and says so.
    let code = sigterm_and_wait(&mut daemon, Duration::from_secs(20), "daemon");
    assert_eq!(code, Some(0));
    let (code, s) = status(&cfg);
    assert_eq!(s["daemon"], "stopped");
    assert_eq!(code, Some(1), "a stopped daemon is not well, whatever its sources did");
    assert!(!lock.exists() || s["sources"]["slow"]["running"] == false);
    let log = std::fs::read_to_string(w.path("daemon.log")).unwrap();
    assert!(log.contains("snapshot committed") && log.contains("snapshot failed"), "{log}");
}

#[test]
fn daemon_refuses_to_start_with_credentials_that_do_not_belong_together() {
    let w = World::new();
    let node = w.start_node("n1");
    // The world's `est.key` is of another tenant than the `rnpp` certificate (tenant lux).
    for (key, expect) in [
        (w.path("est.key"), "is for tenant \"est\" but certificate rnpp is for tenant \"lux\""),
        (w.path("absent.key"), "absent.key"),
    ] {
        let cfg = w.path("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "node = [\"{node}\"]\npki = \"{pki}\"\nidentity = \"rnpp\"\nkey-file = \"{key}\"\nstate-dir = \"{state}\"\n\n\
                 [sources.docs]\nkind = \"path\"\npaths = [\"/nonexistent\"]\nschedule = \"0 3 * * *\"\n",
                node = node.addr,
                pki = w.pki().display(),
                key = key.display(),
                state = w.path("state").display(),
            ),
        )
        .unwrap();
        let o = run(Command::new(bin("exclave-agent")).args(["run", "--config"]).arg(&cfg));
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("checking the agent's credentials"), "{}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{}", stderr(&o));
    }
}
