//! The node's QUIC service: accepts mutually authenticated connections, authorises every
//! request by the caller's certificate, and answers from the store, the applied catalog and
//! the Raft member.
//!
//! Every request is answered: a malformed, oversized or unauthorised one gets an error reply
//! naming the problem and is logged with the caller's identity. Store calls run on the
//! blocking pool, since a synced RocksDB write blocks the thread. Peers' Raft messages arrive
//! on unidirectional streams and are handed to the consensus thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exclave::identity::{Identity, Permission, check_name};
use exclave::protocol::frame::FrameKind;
use exclave::protocol::{
    ErrorCode, MAX_CHUNKS_REPLY_BYTES, MAX_IDS_PER_MESSAGE, MemberReport, NodeStatus, Reply, Request, SnapshotInfo,
};
use exclave::transport::{self, TransportError};
use raft::eraftpb::ConfChangeType;
use tracing::{debug, info, warn};

use crate::catalog::{self, Command, MAX_COMMIT_BATCHES, Member, Outcome};
use crate::consensus::{ConsensusError, Input};
use crate::node::Node;
use crate::peers;
use crate::replication;
use crate::store::StoreError;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, node: Arc<Node>) {
    while let Some(incoming) = endpoint.accept().await {
        let node = node.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle_connection(conn, node).await,
                Err(e) if e.to_string().contains("Revoked") => {
                    node.metrics.error("revoked");
                    warn!(%remote, error = %e, "refused connection: the certificate is revoked");
                }
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
    let serial = transport::peer_certificate(&conn).ok().and_then(|c| transport::cert_serial(&c)).unwrap_or_default();
    let _registered = node.connections.register(serial.clone(), identity.subject(), conn.clone());
    // Revoked between its handshake and now: the watcher would close it within a second;
    // closing it here keeps even that second from it.
    if node.revoked.contains(&serial) {
        node.metrics.error("revoked");
        warn!(%remote, %identity, "closed a connection: its certificate has been revoked");
        conn.close(crate::revocation::CLOSE_REVOKED.into(), b"certificate revoked");
        return;
    }
    debug!(%remote, %identity, "connection accepted");
    // Who asked, as changes and the audit log record it: the subject names the role, the
    // serial the certificate (administrators approving each other must hold different ones).
    let session = Arc::new(crate::audit::Session::new(identity.clone(), &serial, now_secs()));
    let identity = Arc::new(identity);
    loop {
        let accepted = tokio::select! {
            bi = conn.accept_bi() => bi.map(|(send, recv)| (Some(send), recv)),
            uni = conn.accept_uni() => uni.map(|recv| (None, recv)),
        };
        match accepted {
            Ok((Some(send), recv)) => {
                let (node, identity, session) = (node.clone(), identity.clone(), session.clone());
                tokio::spawn(async move { handle_stream(send, recv, node, identity, session, remote).await });
            }
            Ok((None, recv)) => {
                let (node, identity) = (node.clone(), identity.clone());
                tokio::spawn(async move { raft_stream(recv, node, identity, remote).await });
            }
            Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => break,
            Err(e) => {
                debug!(%remote, %identity, error = %e, "connection ended");
                break;
            }
        }
    }
    record_session(&node, session).await;
}

/// Records an ended session in the audit log, once its last streams are answered.
async fn record_session(node: &Arc<Node>, session: Arc<crate::audit::Session>) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while Arc::strong_count(&session) > 1 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let records = session.records(&node.name, now_secs());
    crate::audit::record(node, &session, records).await;
}

/// A peer's ordered stream of Raft messages. Only nodes may send them, and only as themselves.
async fn raft_stream(mut recv: quinn::RecvStream, node: Arc<Node>, identity: Arc<Identity>, remote: SocketAddr) {
    let Identity::Node { id: ref peer_name } = *identity else {
        node.metrics.error("unauthorized");
        warn!(%remote, %identity, "refused a Raft stream from a non-node identity");
        let _ = recv.stop(1u32.into());
        return;
    };
    let peer_id = catalog::raft_id(peer_name);
    let mut large: Vec<u8> = Vec::new();
    loop {
        let frame = match transport::read_frame::<Request>(&mut recv, FrameKind::Request).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                debug!(%remote, %identity, error = %e, "raft stream ended");
                return;
            }
        };
        let messages = match frame {
            Request::Raft { messages } => messages.into_iter().map(|b| b.into_vec()).collect(),
            Request::RaftLarge { total, part } => {
                if total > peers::MAX_RAFT_MESSAGE || large.len() as u64 + part.len() as u64 > total {
                    warn!(%remote, %identity, total, "refused an oversized Raft message");
                    return;
                }
                large.extend_from_slice(&part);
                if (large.len() as u64) < total {
                    continue;
                }
                vec![std::mem::take(&mut large)]
            }
            other => {
                node.metrics.error("bad_request");
                warn!(%remote, %identity, request = other.name(), "unexpected frame on a Raft stream");
                return;
            }
        };
        for bytes in messages {
            match peers::decode_message(&bytes) {
                Ok(m) if m.from == peer_id => node.raft.send(Input::Step(m)),
                Ok(m) => {
                    node.metrics.error("unauthorized");
                    warn!(%remote, %identity, from = m.from, "refused a Raft message sent in another node's name");
                }
                Err(e) => {
                    node.metrics.error("bad_request");
                    warn!(%remote, %identity, error = %e, "malformed Raft message");
                }
            }
        }
    }
}

async fn handle_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node: Arc<Node>,
    identity: Arc<Identity>,
    session: Arc<crate::audit::Session>,
    remote: SocketAddr,
) {
    let started = Instant::now();
    let reply = read_and_dispatch(&mut recv, &node, &identity, &session).await;
    let (kind, reply) = match reply {
        Ok((kind, reply)) => (kind, reply),
        Err(f) => {
            node.metrics.error(f.kind_label());
            warn!(%remote, %identity, request = f.request, code = ?f.code, "{}", f.message);
            let kind = f.request;
            (kind, Reply::Error { code: f.code, message: f.message, missing: f.missing })
        }
    };
    session.note_reply(&reply);
    drop(session);
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

pub struct Failure {
    request: &'static str,
    code: ErrorCode,
    message: String,
    missing: Vec<exclave::ChunkId>,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Failure {
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
            ErrorCode::NoQuorum => "no_quorum",
            ErrorCode::QuotaExceeded => "quota",
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure { request: "unknown", code: e.code(), message: e.to_string(), missing: Vec::new() }
    }
}

impl From<ConsensusError> for Failure {
    fn from(e: ConsensusError) -> Failure {
        match e {
            ConsensusError::Refused(m) => Failure::new(ErrorCode::BadRequest, m),
            ConsensusError::NoQuorum(m) => Failure::new(ErrorCode::NoQuorum, m),
            other => Failure::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

impl From<catalog::CatalogError> for Failure {
    fn from(e: catalog::CatalogError) -> Failure {
        Failure::from(StoreError::from(e))
    }
}

impl From<replication::ReplicationError> for Failure {
    fn from(e: replication::ReplicationError) -> Failure {
        match e {
            replication::ReplicationError::Store(e) => Failure::from(e),
            replication::ReplicationError::Consensus(e) => Failure::from(e),
            replication::ReplicationError::Paused(e) => Failure::from(e),
            quota @ replication::ReplicationError::Quota { .. } => {
                Failure::new(ErrorCode::QuotaExceeded, quota.to_string())
            }
            replication::ReplicationError::Stopping => Failure::new(ErrorCode::Unavailable, "the node is stopping"),
            quorum @ replication::ReplicationError::Quorum { .. } => {
                Failure::new(ErrorCode::NoQuorum, quorum.to_string())
            }
            replication::ReplicationError::BaseGone { chunks } => {
                let message = replication::ReplicationError::BaseGone { chunks: chunks.clone() }.to_string();
                Failure { missing: chunks, ..Failure::new(ErrorCode::MissingChunks, message) }
            }
        }
    }
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Failure {
        Failure::new(ErrorCode::BadRequest, format!("malformed request: {e}"))
    }
}

fn valid_name(what: &'static str, value: &str) -> Result<(), Failure> {
    check_name(what, value).map_err(|e| Failure::new(ErrorCode::BadRequest, e.to_string()))
}

fn ids_within_limit(ids: &[exclave::ChunkId]) -> Result<(), Failure> {
    if ids.len() > MAX_IDS_PER_MESSAGE {
        return Err(Failure::new(ErrorCode::BadRequest, "too many ids in one request"));
    }
    Ok(())
}

fn authorise(identity: &Identity, p: Permission, request: &'static str) -> Result<String, Failure> {
    if !identity.may(p) {
        let what = match p {
            Permission::WriteTenant => "write",
            Permission::QueryTenant => "query chunks",
            Permission::ReadTenant => "read",
            Permission::Operate => "operate the node",
            Permission::Administer => "change the cluster",
            Permission::Peer => "act as a cluster member",
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

async fn set_retention(
    node: &Arc<Node>,
    tenant: String,
    source: String,
    policy: exclave::retention::RetentionPolicy,
    by_admin: bool,
) -> Result<Reply, Failure> {
    valid_name("source", &source)?;
    node.require_leader().await?;
    let described = policy.describe();
    match node
        .raft
        .propose(Command::SetRetentionV2 { tenant: tenant.clone(), source: source.clone(), policy, by_admin })
        .await?
    {
        Outcome::Done => {
            info!(%tenant, %source, policy = %described, by_admin, "retention set");
            Ok(Reply::Ok)
        }
        Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
        other => Err(Failure::new(ErrorCode::Internal, format!("retention applied with {other:?}"))),
    }
}

/// Unix seconds by this node's clock (what it proposes as cluster time).
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Whose audit log or history `identity` asks for: administrators any tenant's (or, with
/// none, the cluster's); a restore identity its own tenant's only.
fn record_reader(identity: &Identity, tenant: Option<String>, request: &'static str) -> Result<String, Failure> {
    let tenant = match (identity, tenant) {
        (Identity::Admin, t) => t.unwrap_or_default(),
        (Identity::Restore { tenant: own }, None) => own.clone(),
        (Identity::Restore { tenant: own }, Some(t)) if &t == own => t,
        (Identity::Restore { tenant: own }, Some(t)) => {
            return Err(Failure::new(
                ErrorCode::Unauthorized,
                format!("identity {identity} may read the {request} log of tenant {own} only, not {t}"),
            ));
        }
        _ => {
            return Err(Failure::new(
                ErrorCode::Unauthorized,
                format!("identity {identity} may not read the {request} log ({request})"),
            ));
        }
    };
    if !tenant.is_empty() {
        valid_name("tenant", &tenant)?;
    }
    Ok(tenant)
}

/// After a commit, asks the cluster to store the snapshot before it as a difference from this
/// one (`catalog::refs`), in the background: the commit is acknowledged already, and a
/// failure only leaves that list whole. Not for WAL (segments share no chunks) nor for
/// snapshots too small to be worth a command.
fn pack_references(node: &Arc<Node>, tenant: &str, committed: &exclave::protocol::SnapshotInfo) {
    const MIN_REFS: u64 = 64;
    if committed.source.ends_with(".wal") || committed.chunks < MIN_REFS {
        return;
    }
    // An unreadable catalog leaves the lists whole: packing is only ever an economy.
    if !node.store.catalog().ok().and_then(|v| catalog::packs_refs(&v).ok()).unwrap_or(false) {
        return;
    }
    let (node, cmd) =
        (node.clone(), Command::PackRefs { tenant: tenant.to_string(), source: committed.source.clone() });
    tokio::spawn(async move {
        if let Err(e) = node.raft.propose(cmd).await {
            debug!(error = %e, "packing the previous snapshot's references: left whole");
        }
    });
}

/// The reply to an administrator's retention change.
fn change_reply(outcome: Outcome) -> Result<Reply, Failure> {
    match outcome {
        Outcome::Done => Ok(Reply::Ok),
        Outcome::LockPending(p) => Ok(Reply::LockPending(p)),
        Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
        other => Err(Failure::new(ErrorCode::Internal, format!("applied with {other:?}"))),
    }
}

async fn read_and_dispatch(
    recv: &mut quinn::RecvStream,
    node: &Arc<Node>,
    identity: &Identity,
    session: &crate::audit::Session,
) -> Result<(&'static str, Reply), Failure> {
    let req: Request =
        read_request(recv).await?.ok_or_else(|| Failure::new(ErrorCode::BadRequest, "empty request stream"))?;
    let name = req.name();
    session.note_request(&req);
    let caller = session.caller.as_str();
    // Work that takes its time is bounded by what it does (a proposal's own timeout, a scrub
    // pass asked for and waited on); only a client that stops sending is cut off.
    let reply = dispatch(req, recv, node, identity, caller).await.map_err(|f| f.on(name))?;
    Ok((name, reply))
}

/// Reads one request frame, giving up on a client that does not send it within 120 s.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<Option<Request>, Failure> {
    match tokio::time::timeout(REQUEST_TIMEOUT, transport::read_frame(recv, FrameKind::Request)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Failure::new(ErrorCode::BadRequest, "request not received within 120 s")),
    }
}

async fn dispatch(
    req: Request,
    recv: &mut quinn::RecvStream,
    node: &Arc<Node>,
    identity: &Identity,
    caller: &str,
) -> Result<Reply, Failure> {
    let store = node.store.clone();
    match req {
        Request::Have { ids } => {
            let tenant = authorise(identity, Permission::QueryTenant, "have")?;
            ids_within_limit(&ids)?;
            // The cluster's index, not this node's disk: what is indexed is on a write quorum.
            let ids = blocking(move || Ok(catalog::missing(&store.catalog()?, &tenant, &ids)?)).await?;
            Ok(Reply::Missing { ids })
        }
        Request::PutChunks { chunks } => {
            let tenant = authorise(identity, Permission::WriteTenant, "put_chunks")?;
            crate::test_hooks::crash_after("put-chunks");
            replication::store_on_quorum(node, tenant, chunks).await?;
            Ok(Reply::Ok)
        }
        Request::Commit { snapshot, ref_batches } => {
            let tenant = authorise(identity, Permission::WriteTenant, "commit")?;
            let Identity::Agent { name, .. } = identity else {
                return Err(Failure::new(ErrorCode::Unauthorized, "only agents commit snapshots"));
            };
            valid_name("source", &snapshot.source)?;
            valid_name("snapshot id", &snapshot.id)?;
            if ref_batches > MAX_COMMIT_BATCHES {
                return Err(Failure::new(ErrorCode::BadRequest, "commit carries too many reference batches"));
            }
            // Refuse before the client streams its references.
            node.require_leader().await?;
            for batch in 0..ref_batches {
                let mut ids = match read_request(recv).await? {
                    Some(Request::CommitRefs { ids }) if ids.len() <= MAX_IDS_PER_MESSAGE => ids,
                    Some(_) => return Err(Failure::new(ErrorCode::BadRequest, "expected a commit reference batch")),
                    None => return Err(Failure::new(ErrorCode::BadRequest, "commit ended before its references")),
                };
                // Sorted here, per batch, so the commit only merges (`exclave::sorted_ids`).
                exclave::sorted_ids::sort_unique(&mut ids);
                let cmd = Command::StageRefs { tenant: tenant.clone(), snapshot_id: snapshot.id.clone(), batch, ids };
                if let Outcome::Refused(m) = node.raft.propose_idempotent(cmd).await? {
                    return Err(Failure::new(ErrorCode::BadRequest, m));
                }
            }
            // The node, not the client, says who committed.
            let snap = SnapshotInfo { agent: name.clone(), ..snapshot };
            let started = Instant::now();
            // Commit time comes from this node's clock, never the agent's (see `exclave::retention`).
            let cmd =
                Command::CommitV2 { tenant: tenant.clone(), snapshot: snap, batches: ref_batches, now: now_secs() };
            match node.raft.propose_idempotent(cmd).await? {
                Outcome::Committed(committed) => {
                    node.metrics.committed(&tenant, &committed, started.elapsed());
                    pack_references(node, &tenant, &committed);
                    info!(%tenant, source = %committed.source, snapshot = %committed.id, files = committed.files,
                          bytes = committed.logical_bytes, "snapshot committed");
                    Ok(Reply::Committed { snapshot: committed })
                }
                Outcome::Missing(missing) => Err(Failure {
                    request: "commit",
                    code: ErrorCode::MissingChunks,
                    message: format!(
                        "{} referenced chunks are not stored in the cluster (absent from its index, or \
                         collected as garbage since the backup asked); send them and commit again",
                        missing.len()
                    ),
                    missing,
                }),
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                Outcome::Done | Outcome::Indexed { .. } | Outcome::Collected { .. } | Outcome::LockPending(_) => {
                    Err(Failure::new(ErrorCode::Internal, "commit applied without a result"))
                }
            }
        }
        Request::CommitRefs { .. } => Err(Failure::new(ErrorCode::BadRequest, "reference batch outside a commit")),
        Request::SetRetention { source, policy } => {
            let tenant = authorise(identity, Permission::WriteTenant, "set_retention")?;
            set_retention(node, tenant, source, policy, false).await
        }
        Request::SetRetentionFor { tenant, source, policy } => {
            authorise(identity, Permission::Administer, "set_retention_for")?;
            valid_name("tenant", &tenant)?;
            set_retention(node, tenant, source, policy, true).await
        }
        Request::ListSnapshots { source } => {
            let tenant = authorise(identity, Permission::ReadTenant, "list_snapshots")?;
            let stale = node.raft.view().cut_off(node.raft.id).map(|why| format!("{}: {why}", node.name));
            let snapshots =
                blocking(move || Ok(catalog::snapshots(&store.catalog()?, &tenant, source.as_deref())?)).await?;
            Ok(Reply::Snapshots { snapshots, stale })
        }
        Request::FindSnapshot { id } => {
            let tenant = authorise(identity, Permission::ReadTenant, "find_snapshot")?;
            valid_name("snapshot id", &id)?;
            let stale = node.raft.view().cut_off(node.raft.id).map(|why| format!("{}: {why}", node.name));
            let found = blocking(move || Ok(catalog::snapshot(&store.catalog()?, &tenant, &id)?)).await?;
            Ok(Reply::Snapshots { snapshots: found.into_iter().collect(), stale })
        }
        Request::GetChunk { id } => {
            let tenant = authorise(identity, Permission::ReadTenant, "get_chunk")?;
            replication::read_through(node, &tenant, &[id]).await;
            let chunks = node.chunks.clone();
            let envelope = blocking(move || chunks.get_chunk(&tenant, &id)).await?;
            Ok(Reply::Chunk { envelope })
        }
        Request::GetChunks { ids } => {
            let tenant = authorise(identity, Permission::ReadTenant, "get_chunks")?;
            ids_within_limit(&ids)?;
            replication::read_through(node, &tenant, &ids).await;
            crate::test_hooks::crash_after("get-chunks");
            Ok(Reply::Chunks { chunks: serve_chunks(node.chunks.clone(), tenant, ids).await? })
        }
        Request::Hello => Ok(Reply::Hello {
            node: node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            you: identity.subject(),
        }),
        Request::Status => {
            authorise(identity, Permission::Operate, "status")?;
            let (used, free) = crate::metrics::disk_usage(&node.data_dir);
            let snapshots = blocking(move || Ok(catalog::stats(&store.catalog()?)?.snapshots)).await?;
            Ok(Reply::Status(NodeStatus {
                name: node.name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_secs: node.started.elapsed().as_secs(),
                chunks: node.store.chunk_count(),
                snapshots,
                disk_used_bytes: used,
                disk_free_bytes: free,
            }))
        }
        Request::Raft { .. } | Request::RaftLarge { .. } => {
            Err(Failure::new(ErrorCode::BadRequest, "Raft messages travel on a unidirectional stream"))
        }
        Request::Replicate { tenant, chunks } => {
            authorise(identity, Permission::Peer, "replicate")?;
            valid_name("tenant", &tenant)?;
            let bytes: usize = chunks.iter().map(|c| c.envelope.len()).sum();
            let _room = node.check_room(bytes)?;
            let store = node.chunks.clone();
            let new = blocking(move || store.put_chunks(&tenant, &chunks)).await?;
            node.metrics.stored(new, bytes);
            Ok(Reply::Ok)
        }
        Request::ReplicateV2 { tenant, sweep_seq, chunks } => {
            authorise(identity, Permission::Peer, "replicate")?;
            valid_name("tenant", &tenant)?;
            replication::caught_up_with_sweeps(node, sweep_seq).await?;
            let bytes: usize = chunks.iter().map(|c| c.envelope.len()).sum();
            let _room = node.check_room(bytes)?;
            let store = node.chunks.clone();
            let new = blocking(move || store.put_chunks(&tenant, &chunks)).await?;
            node.metrics.stored(new, bytes);
            Ok(Reply::Ok)
        }
        Request::Fetch { tenant, ids } => {
            authorise(identity, Permission::Peer, "fetch")?;
            ids_within_limit(&ids)?;
            Ok(Reply::Chunks { chunks: serve_chunks(node.chunks.clone(), tenant, ids).await? })
        }
        Request::KnownLayout => {
            authorise(identity, Permission::Operate, "known_layout")?;
            Ok(Reply::KnownLayout { known: crate::upgrade::known_layout() })
        }
        Request::RaftStatus => {
            authorise(identity, Permission::Operate, "raft_status")?;
            let n = node.clone();
            Ok(Reply::RaftStatus(blocking(move || n.member_status()).await?))
        }
        Request::ClusterStatus => {
            authorise(identity, Permission::Operate, "cluster_status")?;
            Ok(Reply::ClusterStatus { members: cluster_status(node).await? })
        }
        Request::AddNode { name, addr, voter } => {
            authorise(identity, Permission::Administer, "add_node")?;
            valid_name("node name", &name)?;
            addr.parse::<SocketAddr>()
                .map_err(|e| Failure::new(ErrorCode::BadRequest, format!("address {addr:?}: {e}")))?;
            let change = if voter { ConfChangeType::AddNode } else { ConfChangeType::AddLearnerNode };
            let id = catalog::raft_id(&name);
            match node.raft.change_member(change, id, Member { name: name.clone(), addr }).await? {
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                _ => {
                    info!(%name, voter, by = %identity, "membership changed: node added");
                    Ok(Reply::Ok)
                }
            }
        }
        Request::FinalizeUpgrade => {
            authorise(identity, Permission::Administer, "finalize_upgrade")?;
            node.require_leader().await?;
            crate::upgrade::require_known_everywhere(node, catalog::LAYOUT).await?;
            match node.raft.propose(Command::SetLayout { layout: catalog::LAYOUT }).await? {
                Outcome::Done => {
                    info!(layout = catalog::LAYOUT, by = %identity, "upgrade finalised: catalog layout raised");
                    Ok(Reply::Ok)
                }
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                other => Err(Failure::new(ErrorCode::Internal, format!("layout applied with {other:?}"))),
            }
        }
        Request::RemoveNode { name } => {
            authorise(identity, Permission::Administer, "remove_node")?;
            let Some(id) = node.peers.id_of(&name) else {
                return Err(Failure::new(ErrorCode::NotFound, format!("no member named {name}")));
            };
            let member = node.peers.member(id).unwrap_or(Member { name: name.clone(), addr: String::new() });
            match node.raft.change_member(ConfChangeType::RemoveNode, id, member).await? {
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                _ => {
                    info!(%name, by = %identity, "membership changed: node removed");
                    Ok(Reply::Ok)
                }
            }
        }
        Request::Revoke { serial, subject, reason } => {
            authorise(identity, Permission::Administer, "revoke")?;
            let serial = serial.trim().to_ascii_lowercase();
            match hex::decode(&serial) {
                Ok(b) if !b.is_empty() && b.len() <= 20 => {}
                _ => {
                    return Err(Failure::new(
                        ErrorCode::BadRequest,
                        format!("{serial:?} is not a certificate serial number"),
                    ));
                }
            }
            if reason.len() > 1024 || subject.len() > 256 {
                return Err(Failure::new(ErrorCode::BadRequest, "reason or subject too long"));
            }
            node.require_leader().await?;
            let revocation = exclave::protocol::Revocation {
                serial: serial.clone(),
                subject: subject.clone(),
                reason: reason.clone(),
                by: identity.subject(),
                time: exclave::pki::now_secs(),
            };
            match node.raft.propose(Command::Revoke { revocation }).await? {
                Outcome::Done => {
                    info!(%serial, %subject, %reason, by = %identity, "certificate revoked");
                    Ok(Reply::Ok)
                }
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                other => Err(Failure::new(ErrorCode::Internal, format!("revocation applied with {other:?}"))),
            }
        }
        Request::Certificates => {
            authorise(identity, Permission::Operate, "certificates")?;
            let revoked = blocking(move || Ok(catalog::revocations(&store.catalog()?)?)).await?;
            Ok(Reply::Certificates { node: node.certificate.clone(), ca: node.ca_certificate.clone(), revoked })
        }
        Request::SnapshotPages { id, after, max_bytes } => {
            authorise(identity, Permission::Peer, "snapshot_pages")?;
            let cps = node.checkpoints.clone();
            let (pairs, done) = tokio::task::spawn_blocking(move || {
                cps.page(id, after.as_ref().map(|a| a.as_slice()), max_bytes as usize)
            })
            .await
            .map_err(|e| Failure::new(ErrorCode::Internal, format!("snapshot task failed: {e}")))?
            .map_err(|e| Failure::new(ErrorCode::NotFound, e.to_string()))?;
            let pairs = pairs
                .into_iter()
                .map(|(k, v)| (serde_bytes::ByteBuf::from(k), serde_bytes::ByteBuf::from(v)))
                .collect();
            Ok(Reply::SnapshotPage { pairs, done })
        }
        Request::RecordDrill { record } => {
            let tenant = authorise(identity, Permission::ReadTenant, "record_drill")?;
            valid_name("source", &record.source)?;
            valid_name("snapshot id", &record.snapshot)?;
            if !["PASS", "FAIL", "INCOMPLETE"].contains(&record.verdict.as_str()) || record.reason.len() > 4096 {
                return Err(Failure::new(ErrorCode::BadRequest, "a drill's verdict is PASS, FAIL or INCOMPLETE"));
            }
            node.require_leader().await?;
            // The node, not the client, says who recorded it, where and when.
            let record = exclave::protocol::DrillRecord {
                identity: identity.subject(),
                node: node.name.clone(),
                recorded: exclave::pki::now_secs(),
                ..record
            };
            info!(%tenant, source = %record.source, verdict = %record.verdict, rto_ms = record.rto_ms,
                  rpo_secs = record.rpo_secs, "drill recorded");
            node.raft.propose(Command::RecordDrillV2 { tenant, record }).await?;
            Ok(Reply::Ok)
        }
        Request::Drills { source } => {
            let tenant = authorise(identity, Permission::ReadTenant, "drills")?;
            let list = blocking(move || Ok(catalog::drills(&store.catalog()?, &tenant, source.as_deref())?)).await?;
            Ok(Reply::Drills(list))
        }
        Request::SetQuota { tenant, max_bytes } => {
            authorise(identity, Permission::Administer, "set_quota")?;
            valid_name("tenant", &tenant)?;
            node.require_leader().await?;
            let quota = max_bytes.map(|max_bytes| catalog::Quota {
                max_bytes,
                by: identity.subject(),
                time: exclave::pki::now_secs(),
            });
            node.raft.propose(Command::SetQuota { tenant: tenant.clone(), quota }).await?;
            info!(%tenant, ?max_bytes, by = %identity, "quota set");
            Ok(Reply::Ok)
        }
        Request::Quotas => {
            authorise(identity, Permission::Operate, "quotas")?;
            let list = blocking(move || Ok(catalog::usages(&store.catalog()?)?)).await?;
            Ok(Reply::Quotas(
                list.into_iter()
                    .map(|(tenant, stored_bytes, q)| exclave::protocol::TenantUsage {
                        tenant,
                        stored_bytes,
                        quota_bytes: q.map(|q| q.max_bytes),
                    })
                    .collect(),
            ))
        }
        Request::SetProtection { tenant, days } => {
            authorise(identity, Permission::Administer, "set_protection")?;
            valid_name("tenant", &tenant)?;
            node.require_leader().await?;
            let protection = catalog::Protection { days };
            match node.raft.propose(Command::SetProtection { tenant: tenant.clone(), protection }).await? {
                Outcome::Done => {
                    info!(%tenant, days, by = %identity, "protection window set");
                    Ok(Reply::Ok)
                }
                Outcome::Refused(m) => Err(Failure::new(ErrorCode::BadRequest, m)),
                other => Err(Failure::new(ErrorCode::Internal, format!("protection applied with {other:?}"))),
            }
        }
        Request::SetLock { tenant, source, lock } => {
            authorise(identity, Permission::Administer, "set_lock")?;
            valid_name("tenant", &tenant)?;
            if let Some(s) = &source {
                valid_name("source", s)?;
            }
            node.require_leader().await?;
            let cmd = Command::SetLock {
                tenant: tenant.clone(),
                source: source.clone(),
                lock,
                by: caller.to_string(),
                now: now_secs(),
            };
            let outcome = node.raft.propose(cmd).await?;
            info!(%tenant, source = source.as_deref().unwrap_or("*"), ?lock, by = %caller, ?outcome, "retention lock asked for");
            change_reply(outcome)
        }
        Request::ApproveLock { id } => {
            authorise(identity, Permission::Administer, "approve_lock")?;
            node.require_leader().await?;
            let outcome =
                node.raft.propose(Command::ApproveLock { id, by: caller.to_string(), now: now_secs() }).await?;
            info!(id, by = %caller, ?outcome, "retention lock change approval");
            change_reply(outcome)
        }
        Request::SetHold { tenant, target, release, reason } => {
            authorise(identity, Permission::Administer, "set_hold")?;
            valid_name("tenant", &tenant)?;
            let (exclave::protocol::HoldTarget::Source(name) | exclave::protocol::HoldTarget::Snapshot(name)) = &target;
            valid_name("hold target", name)?;
            node.require_leader().await?;
            let cmd = Command::SetHold {
                tenant: tenant.clone(),
                target: target.clone(),
                release,
                by: caller.to_string(),
                reason: reason.clone(),
                now: now_secs(),
            };
            let outcome = node.raft.propose(cmd).await?;
            info!(%tenant, target = %catalog::locks::describe(&target), release, %reason, by = %caller, ?outcome, "legal hold");
            change_reply(outcome)
        }
        Request::Audit { tenant, since, who } => {
            let tenant = record_reader(identity, tenant, "audit")?;
            let list =
                blocking(move || Ok(catalog::audit::records(&store.catalog()?, &tenant, since, who.as_deref())?))
                    .await?;
            Ok(Reply::Audit(list))
        }
        Request::AuditKeep { tenant } => {
            let tenant = record_reader(identity, tenant, "audit")?;
            Ok(Reply::AuditKeep(blocking(move || Ok(catalog::audit::keep(&store.catalog()?, &tenant)?)).await?))
        }
        Request::SetAuditKeep { tenant, days } => {
            authorise(identity, Permission::Administer, "set_audit_keep")?;
            if !tenant.is_empty() {
                valid_name("tenant", &tenant)?;
            }
            node.require_leader().await?;
            let cmd = Command::SetAuditKeep { tenant: tenant.clone(), days, by: caller.to_string(), now: now_secs() };
            let outcome = node.raft.propose(cmd).await?;
            info!(%tenant, days, by = %caller, ?outcome, "audit keeping time asked for");
            if let Outcome::Refused(m) = outcome {
                return Err(Failure::new(ErrorCode::BadRequest, m));
            }
            Ok(Reply::AuditKeep(blocking(move || Ok(catalog::audit::keep(&store.catalog()?, &tenant)?)).await?))
        }
        Request::History { tenant, after } => {
            let tenant = record_reader(identity, tenant, "history")?;
            let (events, head) = blocking(move || {
                let view = store.catalog()?;
                Ok((catalog::history::events(&view, &tenant, after)?, catalog::history::head(&view, &tenant)?))
            })
            .await?;
            Ok(Reply::History { events, head })
        }
        Request::RetentionShow { tenant } => {
            authorise(identity, Permission::Operate, "retention_show")?;
            valid_name("tenant", &tenant)?;
            let view = blocking(move || Ok(catalog::retention_view(&store.catalog()?, &tenant)?)).await?;
            Ok(Reply::Retention(view))
        }
        Request::Gc { dry_run } => {
            authorise(identity, Permission::Administer, "gc")?;
            info!(by = %identity, dry_run, "garbage collection asked for");
            let result = node.gc.run_now(node, dry_run).await.map_err(|e| {
                Failure::new(ErrorCode::Unavailable, format!("garbage collection stopped: {e}; run it again"))
            })?;
            Ok(Reply::Gc(result))
        }
        Request::GcStatus => {
            authorise(identity, Permission::Operate, "gc_status")?;
            let last = blocking(move || Ok(catalog::gc::state(&store.catalog()?)?.last)).await?;
            let gc = &node.gc;
            Ok(Reply::GcStatus(exclave::protocol::GcStatus {
                last,
                running: gc.is_running(),
                interval_secs: gc.settings.interval.map(|d| d.as_secs()),
                grace_passes: gc.settings.grace_passes,
            }))
        }
        Request::HistoryHeads => {
            authorise(identity, Permission::Operate, "history_heads")?;
            let heads = blocking(move || Ok(catalog::history::heads(&store.catalog()?)?)).await?;
            Ok(Reply::HistoryHeads(
                heads.into_iter().map(|(tenant, head)| exclave::protocol::TenantHead { tenant, head }).collect(),
            ))
        }
        Request::Scrub { wait } => {
            authorise(identity, Permission::Administer, "scrub")?;
            let target = node.scrub.request();
            info!(by = %identity, wait, "scrub pass asked for");
            if wait {
                node.scrub.wait_for(target).await;
            }
            let n = node.clone();
            Ok(Reply::Scrub(blocking(move || Ok(n.scrub.status(&n))).await?))
        }
        Request::ReadBarrier => {
            if !(identity.may(Permission::ReadTenant) || identity.may(Permission::Operate)) {
                authorise(identity, Permission::ReadTenant, "read_barrier")?;
            }
            node.raft.read_barrier().await?;
            Ok(Reply::Ok)
        }
    }
}

async fn serve_chunks(
    store: Arc<dyn crate::chunk_store::ChunkStore>,
    tenant: String,
    ids: Vec<exclave::ChunkId>,
) -> Result<Vec<Result<serde_bytes::ByteBuf, (ErrorCode, String)>>, Failure> {
    blocking(move || {
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
    .await
}

/// This node's status, then every other member's as reported by itself.
async fn cluster_status(node: &Arc<Node>) -> Result<Vec<MemberReport>, Failure> {
    let n = node.clone();
    let me = blocking(move || n.member_status()).await?;
    let v = node.raft.view();
    let mut reports = vec![MemberReport {
        name: node.name.clone(),
        addr: node.peers.member(node.raft.id).map(|m| m.addr).unwrap_or_default(),
        voter: v.voters.contains(&node.raft.id),
        status: Ok(me),
    }];
    let others = replication::others(node);
    let asks = others.iter().map(|id| {
        let node = node.clone();
        let id = *id;
        async move { (id, node.peers.status(id).await.map_err(|e| e.to_string())) }
    });
    for (id, status) in futures::future::join_all(asks).await {
        reports.push(MemberReport {
            name: node.peers.name_of(id),
            addr: node.peers.member(id).map(|m| m.addr).unwrap_or_default(),
            voter: v.voters.contains(&id),
            status,
        });
    }
    Ok(reports)
}
