//! What a site operator's monitoring sees of a storage node: `/healthz`, `/readyz` with its
//! reasons, and `/metrics` that promtool accepts, on three real nodes, through the loss and the
//! return of a majority.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

fn wait_ready_code(port: u16, code: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (c, body) = http_get(port, "/readyz");
        if c == code {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz on {port} answered {c} within {timeout:?}, not {code}: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nodes_answer_health_readiness_and_metrics_through_the_loss_of_a_majority() {
    let w = World::new();
    let names = ["n1", "n2", "n3"];
    let (mut nodes, http) = w.start_cluster_http(&names);
    let src = w.path("src");
    sample_tree(&src, 3, 256 << 10);
    ok(w.backup(&nodes[0], "rnpp", &[&src]));

    for (i, port) in http.iter().enumerate() {
        assert_eq!(http_get(*port, "/healthz"), (200, "ok\n".to_string()));
        assert_eq!(wait_ready_code(*port, 200, Duration::from_secs(20)), "ready\n");
        let (code, body) = http_get(*port, "/nothing");
        assert_eq!(code, 404, "{body}");
        assert!(body.contains("/readyz"), "{body}");
        let m = metrics(*port);
        promtool_check_metrics(&m);
        assert!(m.contains("exclave_build_info{program=\"exclave-replicator\",version=\""), "{m}");
        assert!(m.contains("process_resident_memory_bytes"), "{m}");
        assert!(m.contains("process_cpu_seconds_total"), "{m}");
        assert!(m.contains(&format!("exclave_raft{{field=\"voters\",node=\"{}\"}} 3", names[i])), "{m}");
    }

    // Every node, not only the one the backup went through, reports the source's newest
    // snapshot and the tenant's history from the catalog (refreshed every 15 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    for (i, port) in http.iter().enumerate() {
        loop {
            let m = metrics(*port);
            let node = names[i];
            // A positive sample of `name` carrying every one of `labels`, in any order.
            let has = |name: &str, labels: &[&str]| {
                m.lines().any(|l| {
                    l.starts_with(&format!("{name}{{"))
                        && labels.iter().all(|lb| l.contains(lb))
                        && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
                })
            };
            let on_node = format!("node=\"{node}\"");
            if has("exclave_snapshot_last_time_seconds", &[&on_node, "source=\"rnpp\"", "tenant=\"lux\""])
                && has("exclave_history_head_seq", &[&on_node, "tenant=\"lux\""])
            {
                break;
            }
            assert!(Instant::now() < deadline, "{node} reports the catalog's snapshot and history: {m}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // Two of three gone: the last one is alive but not ready, and says why.
    nodes[1].stop();
    nodes[2].stop();
    let why = wait_ready_code(http[0], 503, Duration::from_secs(30));
    assert!(why.starts_with("not ready:\n- "), "{why}");
    assert!(why.contains("cannot reach a majority"), "{why}");
    assert_eq!(http_get(http[0], "/healthz").0, 200);
    promtool_check_metrics(&metrics(http[0]));

    // Back: ready again.
    nodes[1].restart();
    nodes[2].restart();
    for port in &http {
        wait_http(*port, Duration::from_secs(20));
        wait_ready_code(*port, 200, Duration::from_secs(60));
    }
}
