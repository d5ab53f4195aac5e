//! Prometheus exposition: serves a registry's text format on `GET /metrics`.
//!
//! Deliberately tiny (HTTP/1.0, one response per connection): scraping is the only client,
//! and a full HTTP stack would double the build of every program for one endpoint.

use std::net::SocketAddr;

use prometheus::{Encoder, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding gathered metric families into a Vec cannot fail.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Binds `addr` and serves `/metrics` until the task is dropped.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut req)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let line = String::from_utf8_lossy(&req[..n]);
                let (status, body) = if line.starts_with("GET /metrics") {
                    ("200 OK", render(&registry))
                } else {
                    ("404 Not Found", "try /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                // Close gracefully: dropping a socket with unread input resets the connection,
                // which can cut the response short at the client.
                let _ = sock.shutdown().await;
            });
        }
    }))
}
