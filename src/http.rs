//! The HTTP face of every long-running program (the storage node, the agent daemon):
//!
//! - `GET /metrics`: the program's registry and the process registry, Prometheus text format;
//! - `GET /healthz`: 200 while the process answers at all (a liveness probe: restart if not);
//! - `GET /readyz`: 200 `ready` when the program can do its job, else 503 with one line per
//!   reason (a readiness probe: route around it, page if it lasts).
//!
//! Served by hyper through axum on the program's own tokio runtime. The readiness check is a
//! plain function the program hands in, so what "ready" means stays with the program and is
//! testable without a socket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

/// `Ok` when ready; otherwise every reason, each a sentence an operator can act on.
pub type Readiness = Result<(), Vec<String>>;

/// What `/readyz` asks, on every request; keep it cheap (no I/O beyond a stat).
pub type ReadyCheck = Arc<dyn Fn() -> Readiness + Send + Sync>;

/// A readiness check for programs that are ready once they serve at all.
pub fn always_ready() -> ReadyCheck {
    Arc::new(|| Ok(()))
}

/// The metrics every program exports besides its own: `exclave_build_info{program,version}`
/// and the standard `process_*` family (CPU seconds, resident memory, open files, start time).
pub fn process_registry(program: &str) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    let info = IntGaugeVec::new(
        Opts::new("exclave_build_info", "Always 1: the program and version of this process"),
        &["program", "version"],
    )?;
    info.with_label_values(&[program, env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(info))?;
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(registry)
}

/// Renders registries, in order, in the Prometheus text format.
pub fn render(registries: &[Registry]) -> String {
    let mut families = Vec::new();
    for r in registries {
        families.extend(r.gather());
    }
    let mut buf = Vec::new();
    // Encoding gathered metric families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&families, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The `/readyz` answer for a readiness result.
pub fn ready_response(r: &Readiness) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => {
            let mut body = String::from("not ready:\n");
            for w in why {
                body.push_str("- ");
                body.push_str(w);
                body.push('\n');
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    }
}

#[derive(Clone)]
struct State {
    registries: Arc<Vec<Registry>>,
    ready: ReadyCheck,
}

/// The routes, without a socket (tests drive it directly).
pub fn router(registries: Vec<Registry>, ready: ReadyCheck) -> Router {
    let state = State { registries: Arc::new(registries), ready };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(state)
}

async fn metrics(axum::extract::State(s): axum::extract::State<State>) -> Response {
    let body = render(&s.registries);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn readyz(axum::extract::State(s): axum::extract::State<State>) -> Response {
    let check = s.ready.clone();
    // A check may stat a disk: keep it off the async workers.
    let r = tokio::task::spawn_blocking(move || check())
        .await
        .unwrap_or_else(|_| Err(vec!["the readiness check panicked".into()]));
    ready_response(&r).into_response()
}

/// Binds `addr` (before returning, so a taken port is an error at start) and serves until the
/// returned task is aborted or the runtime stops.
pub async fn serve(
    addr: SocketAddr,
    registries: Vec<Registry>,
    ready: ReadyCheck,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = router(registries, ready);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(%addr, error = %e, "HTTP server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_every_reason() {
        let (code, body) = ready_response(&Err(vec!["no leader".into(), "disk full".into()]));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready:\n- no leader\n- disk full\n");
        assert_eq!(ready_response(&Ok(())).0, StatusCode::OK);
    }

    #[test]
    fn process_registry_names_the_program() {
        let r = process_registry("exclave-test").expect("registry");
        let text = render(&[r]);
        assert!(text.contains("exclave_build_info{program=\"exclave-test\",version=\""), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
    }
}
