//! The node's QUIC service: accepts mutually authenticated connections, authorises every
//! request by the caller's certificate, and answers from the store.
//!
//! Every request is answered: a malformed, oversized or unauthorised one gets an error reply
//! naming the problem and is logged with the caller's identity. Store calls run on the
//! blocking pool, since a synced RocksDB write blocks the thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exclave::identity::{Identity, Permission, check_name};
use exclave::protocol::frame::FrameKind;
use exclave::protocol::{
    ErrorCode, MAX_CHUNKS_REPLY_BYTES, MAX_IDS_PER_MESSAGE, NodeStatus, Reply, Request, SnapshotInfo,
};
use exclave::transport::{self, TransportError};
use tracing::{debug, info, warn};

use crate::metrics::NodeMetrics;
use crate::store::{Store, StoreError};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Most references one commit may carry (32 Mi chunks: about 2 PiB at 64 KiB).
const MAX_COMMIT_BATCHES: u32 = 1024;

pub struct Node {
    pub name: String,
    pub store: Arc<Store>,
    pub metrics: NodeMetrics,
    pub started: Instant,
    pub data_dir: std::path::PathBuf,
    /// Free bytes kept in reserve: RocksDB must never meet a full disk (Debian's build aborts
    /// on a sync after a failed write), and compaction and deletion need room to work.
    pub min_free_bytes: u64,
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>) {
    while let Some(incoming) = endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle_connection(conn, node).await,
                Err(e) => {
                    node.metrics.error("handshake");
                    warn!(%remote, error = %e, "refused connection (TLS handshake failed: unknown CA or bad certificate?)");
                }
            }
        });
    }
}

async fn handle_connection(conn: quinn::Connection, node: Arc<Node>) {
    let remote = conn.remote_address();
    let identity = match transport::peer_identity(&conn) {
        Ok(id) => id,
        Err(e) => {
            node.metrics.error("identity");
            warn!(%remote, error = %e, "refused connection: certificate carries no Exclave identity");
            conn.close(1u32.into(), b"certificate carries no Exclave identity");
            return;
        }
    };
    debug!(%remote, %identity, "connection accepted");
    let identity = Arc::new(identity);
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (node, identity) = (node.clone(), identity.clone());
                tokio::spawn(async move { handle_stream(send, recv, node, identity, remote).await });
            }
            Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => break,
            Err(e) => {
                debug!(%remote, %identity, error = %e, "connection ended");
                break;
            }
        }
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: Arc<Node>,
    identity: Arc<Identity>,
    remote: SocketAddr,
) {
    let started = Instant::now();
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_and_dispatch(&mut recv, &node, &identity)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(ErrorCode::BadRequest, "request not received within 120 s")),
    };
    let (kind, reply) = match reply {
        Ok((kind, reply)) => (kind, reply),
        Err(f) => {
            node.metrics.error(f.kind_label());
            warn!(%remote, %identity, request = f.request, code = ?f.code, "{}", f.message);
            let kind = f.request;
            (kind, Reply::Error { code: f.code, message: f.message, missing: f.missing })
        }
    };
    let ok = !matches!(reply, Reply::Error { .. });
    node.metrics.request(kind, ok, started.elapsed());
    if let Err(e) = transport::write_frame(&mut send, FrameKind::Reply, &reply).await {
        debug!(%remote, error = %e, "reply not delivered");
        return;
    }
    let _ = send.finish();
    // Let the reply drain before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
}

struct Failure {
    request: &'static str,
    code: ErrorCode,
    message: String,
    missing: Vec<exclave::ChunkId>,
}

impl Failure {
    fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure { request: "unknown", code, message: message.into(), missing: Vec::new() }
    }
    fn on(mut self, request: &'static str) -> Failure {
        self.request = request;
        self
    }
    fn kind_label(&self) -> &'static str {
        match self.code {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::MissingChunks => "missing_chunks",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::StorageError => "storage",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let missing = match &e {
            StoreError::Missing(m) => m.clone(),
            _ => Vec::new(),
        };
        Failure { request: "unknown", code: e.code(), message: e.to_string(), missing }
    }
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Failure {
        Failure::new(ErrorCode::BadRequest, format!("malformed request: {e}"))
    }
}

fn authorise(identity: &Identity, p: Permission, request: &'static str) -> Result<String, Failure> {
    if !identity.may(p) {
        let what = match p {
            Permission::WriteTenant => "write",
            Permission::QueryTenant => "query chunks",
            Permission::ReadTenant => "read",
            Permission::Operate => "operate the node",
        };
        return Err(Failure::new(ErrorCode::Unauthorized, format!("identity {identity} may not {what} ({request})"))
            .on(request));
    }
    Ok(identity.tenant().unwrap_or_default().to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Failure::from),
        Err(e) => Err(Failure::new(ErrorCode::Internal, format!("store task failed: {e}"))),
    }
}

async fn read_and_dispatch(
    recv: &mut quinn::RecvStream,
    node: &Arc<Node>,
    identity: &Identity,
) -> Result<(&'static str, Reply), Failure> {
    let req: Request = transport::read_frame(recv, FrameKind::Request)
        .await?
        .ok_or_else(|| Failure::new(ErrorCode::BadRequest, "empty request stream"))?;
    let name = req.name();
    let reply = dispatch(req, recv, node, identity).await.map_err(|f| f.on(name))?;
    Ok((name, reply))
}

async fn dispatch(
    req: Request,
    recv: &mut quinn::RecvStream,
    node: &Arc<Node>,
    identity: &Identity,
) -> Result<Reply, Failure> {
    let store = node.store.clone();
    match req {
        Request::Have { ids } => {
            let tenant = authorise(identity, Permission::QueryTenant, "have")?;
            if ids.len() > MAX_IDS_PER_MESSAGE {
                return Err(Failure::new(ErrorCode::BadRequest, "too many ids in one request"));
            }
            let ids = blocking(move || store.missing(&tenant, &ids)).await?;
            Ok(Reply::Missing { ids })
        }
        Request::PutChunks { chunks } => {
            let tenant = authorise(identity, Permission::WriteTenant, "put_chunks")?;
            let bytes: usize = chunks.iter().map(|c| c.envelope.len()).sum();
            let (_, free) = crate::metrics::disk_usage(&node.data_dir);
            // A write costs about three times its size on disk: WAL, blob file, compaction.
            if free < node.min_free_bytes.saturating_add(3 * bytes as u64) {
                return Err(Failure::new(
                    ErrorCode::StorageFull,
                    format!(
                        "storage is full: {} MiB free, {} MiB are kept in reserve",
                        free >> 20,
                        node.min_free_bytes >> 20
                    ),
                ));
            }
            let new = blocking(move || store.put_chunks(&tenant, &chunks)).await?;
            node.metrics.stored(new, bytes);
            Ok(Reply::Ok)
        }
        Request::Commit { snapshot, ref_batches } => {
            let tenant = authorise(identity, Permission::WriteTenant, "commit")?;
            let Identity::Agent { name, .. } = identity else {
                return Err(Failure::new(ErrorCode::Unauthorized, "only agents commit snapshots"));
            };
            check_name("source", &snapshot.source).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))?;
            check_name("snapshot id", &snapshot.id).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))?;
            if ref_batches > MAX_COMMIT_BATCHES {
                return Err(Failure::new(ErrorCode::BadRequest, "commit carries too many reference batches"));
            }
            let mut refs: Vec<exclave::ChunkId> = Vec::new();
            for _ in 0..ref_batches {
                match transport::read_frame::<Request>(recv, FrameKind::Request).await? {
                    Some(Request::CommitRefs { ids }) if ids.len() <= MAX_IDS_PER_MESSAGE => refs.extend(ids),
                    Some(_) => return Err(Failure::new(ErrorCode::BadRequest, "expected a commit reference batch")),
                    None => return Err(Failure::new(ErrorCode::BadRequest, "commit ended before its references")),
                }
            }
            // The node, not the client, says who committed.
            let snap = SnapshotInfo { agent: name.clone(), ..snapshot };
            let (t, s) = (tenant.clone(), snap.clone());
            let committed = blocking(move || store.commit(&t, &s, &refs)).await?;
            node.metrics.committed(&tenant, &committed);
            info!(%tenant, source = %committed.source, snapshot = %committed.id, files = committed.files,
                  bytes = committed.logical_bytes, "snapshot committed");
            Ok(Reply::Committed { snapshot: committed })
        }
        Request::CommitRefs { .. } => Err(Failure::new(ErrorCode::BadRequest, "reference batch outside a commit")),
        Request::ListSnapshots { source } => {
            let tenant = authorise(identity, Permission::ReadTenant, "list_snapshots")?;
            let snapshots = blocking(move || store.snapshots(&tenant, source.as_deref())).await?;
            Ok(Reply::Snapshots { snapshots })
        }
        Request::GetChunk { id } => {
            let tenant = authorise(identity, Permission::ReadTenant, "get_chunk")?;
            let envelope = blocking(move || store.get_chunk(&tenant, &id)).await?;
            Ok(Reply::Chunk { envelope })
        }
        Request::GetChunks { ids } => {
            let tenant = authorise(identity, Permission::ReadTenant, "get_chunks")?;
            if ids.len() > MAX_IDS_PER_MESSAGE {
                return Err(Failure::new(ErrorCode::BadRequest, "too many ids in one request"));
            }
            let chunks = blocking(move || {
                let mut out = Vec::with_capacity(ids.len());
                let mut bytes = 0usize;
                for id in &ids {
                    if bytes >= MAX_CHUNKS_REPLY_BYTES {
                        out.push(Err((ErrorCode::Unavailable, "reply full; ask again".to_string())));
                        continue;
                    }
                    out.push(match store.get_chunk(&tenant, id) {
                        Ok(env) => {
                            bytes += env.len();
                            Ok(serde_bytes::ByteBuf::from(env))
                        }
                        Err(e) => Err((e.code(), e.to_string())),
                    });
                }
                Ok(out)
            })
            .await?;
            Ok(Reply::Chunks { chunks })
        }
        Request::Hello => Ok(Reply::Hello {
            node: node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            you: identity.subject(),
        }),
        Request::Status => {
            authorise(identity, Permission::Operate, "status")?;
            let (used, free) = crate::metrics::disk_usage(&node.data_dir);
            Ok(Reply::Status(NodeStatus {
                name: node.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: node.started.elapsed().as_secs(),
                chunks: store.chunk_count(),
                snapshots: store.snapshot_count(),
                disk_used_bytes: used,
                disk_free_bytes: free,
            }))
        }
    }
}
