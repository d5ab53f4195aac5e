//! A client connection to a storage node, shared by the agent and the restore tool.
//!
//! One QUIC connection; each request runs on its own bidirectional stream, so many can be in
//! flight at once (chunk uploads and fetches use that for parallelism).

use std::net::SocketAddr;

use crate::chunk_id::ChunkId;
use crate::identity::Identity;
use crate::pki::NODE_SERVER_NAME;
use crate::protocol::frame::FrameKind;
use crate::protocol::message::{ErrorCode, MAX_IDS_PER_MESSAGE, Reply, Request, SnapshotInfo};
use crate::transport::{self, TlsIdentity, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("node {addr} refused the request: {message}")]
    Remote { addr: SocketAddr, code: ErrorCode, message: String, missing: Vec<ChunkId> },
    #[error("node {addr} sent an unexpected reply to {request}")]
    Unexpected { addr: SocketAddr, request: &'static str },
    #[error("the peer at {addr} is not a storage node (its certificate says {identity})")]
    NotANode { addr: SocketAddr, identity: Identity },
    #[error("no storage node reachable:\n  {0}")]
    NoNode(String),
    #[error("request abandoned: {0}")]
    Local(String),
}

pub struct NodeClient {
    addr: SocketAddr,
    // Held so the socket lives as long as the client.
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl NodeClient {
    pub async fn connect(addr: SocketAddr, id: &TlsIdentity) -> Result<NodeClient, ClientError> {
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|_| TransportError::Tls("bind address".into()))?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| TransportError::Bind { addr: bind, err: e })?;
        endpoint.set_default_client_config(transport::client_config(id)?);
        let connecting = endpoint
            .connect(addr, NODE_SERVER_NAME)
            .map_err(|e| TransportError::Connect { addr, reason: e.to_string() })?;
        let conn = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
            .await
            .map_err(|_| TransportError::Connect { addr, reason: "no answer within 10 s".into() })?
            .map_err(|e| TransportError::Connect { addr, reason: explain_connect(&e) })?;
        let peer = transport::peer_identity(&conn)?;
        if !matches!(peer, Identity::Node { .. }) {
            return Err(ClientError::NotANode { addr, identity: peer });
        }
        let client = NodeClient { addr, _endpoint: endpoint, conn };
        // TLS 1.3 lets the client finish its handshake before the server has checked the client
        // certificate; one round trip makes a refusal show here, with a clear cause.
        match client.call(&[Request::Hello]).await {
            Ok(Reply::Hello { .. }) => Ok(client),
            Ok(_) => Err(ClientError::Unexpected { addr, request: "hello" }),
            Err(ClientError::Transport(e)) => {
                // The stream error may only say "connection lost"; the connection knows why.
                let why = client.conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| e.to_string());
                Err(TransportError::Connect { addr, reason: explain_connect_str(&why) }.into())
            }
            Err(e) => Err(e),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying connection, for callers that speak the frame codec themselves.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends `frames` on a new stream and reads the single reply.
    pub async fn call(&self, frames: &[Request]) -> Result<Reply, ClientError> {
        // Collected first: an iterator adapter here makes the future not provably Send.
        let frames: Vec<Result<&Request, std::io::Error>> = frames.iter().map(Ok).collect();
        self.call_iter(frames).await
    }

    /// Like `call`, for frames produced as they are sent; an `Err` item abandons the request.
    async fn call_iter<R: std::borrow::Borrow<Request>>(
        &self,
        frames: impl IntoIterator<Item = Result<R, std::io::Error>>,
    ) -> Result<Reply, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| TransportError::Stream(e.to_string()))?;
        for f in frames {
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    let _ = send.reset(1u32.into());
                    return Err(ClientError::Local(e.to_string()));
                }
            };
            transport::write_frame(&mut send, FrameKind::Request, f.borrow()).await?;
        }
        send.finish().map_err(|e| TransportError::Stream(e.to_string()))?;
        let reply: Reply = transport::read_frame(&mut recv, FrameKind::Reply).await?.ok_or(TransportError::Eof)?;
        match reply {
            Reply::Error { code, message, missing } => {
                Err(ClientError::Remote { addr: self.addr, code, message, missing })
            }
            other => Ok(other),
        }
    }

    /// Sends one request encoded already (`frame::encode_frame`) and reads the single reply.
    pub async fn call_encoded(&self, frame: bytes::Bytes) -> Result<Reply, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| TransportError::Stream(e.to_string()))?;
        transport::write_encoded(&mut send, frame).await?;
        send.finish().map_err(|e| TransportError::Stream(e.to_string()))?;
        let reply: Reply = transport::read_frame(&mut recv, FrameKind::Reply).await?.ok_or(TransportError::Eof)?;
        match reply {
            Reply::Error { code, message, missing } => {
                Err(ClientError::Remote { addr: self.addr, code, message, missing })
            }
            other => Ok(other),
        }
    }

    /// Which of `ids` the node lacks.
    pub async fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ClientError> {
        let mut out = Vec::new();
        for batch in ids.chunks(MAX_IDS_PER_MESSAGE) {
            match self.call(&[Request::Have { ids: batch.to_vec() }]).await? {
                Reply::Missing { ids } => out.extend(ids),
                _ => return Err(ClientError::Unexpected { addr: self.addr, request: "have" }),
            }
        }
        Ok(out)
    }

    /// Commits a snapshot referencing `refs` (every chunk: data, manifest and root).
    /// They are sent in ascending order, which spares the cluster a sort (`sorted_ids`).
    pub async fn commit(&self, snapshot: SnapshotInfo, refs: &[ChunkId]) -> Result<SnapshotInfo, ClientError> {
        let mut refs = refs.to_vec();
        crate::sorted_ids::sort_unique(&mut refs);
        let batches: Vec<std::io::Result<Vec<ChunkId>>> =
            refs.chunks(MAX_IDS_PER_MESSAGE).map(|b| Ok(b.to_vec())).collect();
        self.commit_batches(snapshot, batches.len() as u32, batches).await
    }

    /// Commits with the references streamed in `count` batches of at most
    /// `MAX_IDS_PER_MESSAGE` ids (read from disk as they are sent, for very large snapshots).
    /// Batches in ascending order cost the cluster least; any order is accepted.
    pub async fn commit_batches(
        &self,
        snapshot: SnapshotInfo,
        count: u32,
        batches: impl IntoIterator<Item = std::io::Result<Vec<ChunkId>>>,
    ) -> Result<SnapshotInfo, ClientError> {
        let first = std::iter::once(Ok(Request::Commit { snapshot, ref_batches: count }));
        let rest = batches.into_iter().map(|b| b.map(|ids| Request::CommitRefs { ids }));
        match self.call_iter(first.chain(rest)).await? {
            Reply::Committed { snapshot } => Ok(snapshot),
            _ => Err(ClientError::Unexpected { addr: self.addr, request: "commit" }),
        }
    }

    pub async fn snapshots(&self, source: Option<&str>) -> Result<Vec<SnapshotInfo>, ClientError> {
        Ok(self.list_snapshots(source).await?.0)
    }

    /// Snapshots, and the node's warning if its catalog may be stale (cut off from the majority).
    pub async fn list_snapshots(
        &self,
        source: Option<&str>,
    ) -> Result<(Vec<SnapshotInfo>, Option<String>), ClientError> {
        match self.call(&[Request::ListSnapshots { source: source.map(str::to_string) }]).await? {
            Reply::Snapshots { snapshots, stale } => Ok((snapshots, stale)),
            _ => Err(ClientError::Unexpected { addr: self.addr, request: "list_snapshots" }),
        }
    }

    /// The snapshot with exactly this id, if the node's catalog holds it, and the node's
    /// warning if that catalog may be stale.
    pub async fn find_snapshot(&self, id: &str) -> Result<(Option<SnapshotInfo>, Option<String>), ClientError> {
        match self.call(&[Request::FindSnapshot { id: id.to_string() }]).await? {
            Reply::Snapshots { snapshots, stale } => Ok((snapshots.into_iter().next(), stale)),
            _ => Err(ClientError::Unexpected { addr: self.addr, request: "find_snapshot" }),
        }
    }

    /// Returns once the node has applied everything the cluster had committed when asked
    /// (Raft ReadIndex through the leader): reads that follow are not stale.
    pub async fn read_barrier(&self) -> Result<(), ClientError> {
        match self.call(&[Request::ReadBarrier]).await? {
            Reply::Ok => Ok(()),
            _ => Err(ClientError::Unexpected { addr: self.addr, request: "read_barrier" }),
        }
    }

    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, ClientError> {
        match self.call(&[Request::GetChunk { id: *id }]).await? {
            Reply::Chunk { envelope } => Ok(envelope),
            _ => Err(ClientError::Unexpected { addr: self.addr, request: "get_chunk" }),
        }
    }

    /// Fetches several envelopes in one request; each result is that chunk's envelope or error.
    pub async fn get_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Result<Vec<u8>, ClientError>>, ClientError> {
        let Reply::Chunks { chunks } = self.call(&[Request::GetChunks { ids: ids.to_vec() }]).await? else {
            return Err(ClientError::Unexpected { addr: self.addr, request: "get_chunks" });
        };
        if chunks.len() != ids.len() {
            return Err(ClientError::Unexpected { addr: self.addr, request: "get_chunks" });
        }
        let mut out = Vec::with_capacity(ids.len());
        for (id, r) in ids.iter().zip(chunks) {
            out.push(match r {
                Ok(b) => Ok(b.into_vec()),
                // The reply filled up before this chunk: ask for it on its own.
                Err((ErrorCode::Unavailable, _)) => self.get_chunk(id).await,
                Err((code, message)) => Err(ClientError::Remote { addr: self.addr, code, message, missing: vec![] }),
            });
        }
        Ok(out)
    }

    pub async fn close(self) {
        let st = self.conn.stats();
        tracing::debug!(node = %self.addr, mtu = st.path.current_mtu, rtt = ?st.path.rtt, lost = st.path.lost_packets,
            sent = st.path.sent_packets, cwnd = st.path.cwnd, "connection closed");
        let sent_before = st.udp_tx.datagrams;
        self.conn.close(0u32.into(), b"done");
        // Only until the closing packet has left, so the node forgets the connection at once;
        // not the whole draining period (three probe timeouts, ~80 ms on loopback), which
        // protects nothing here: every request has had its reply. A one-segment `wal-push` or
        // `wal-fetch` paid that wait on every call, and then a fixed 5 ms.
        let deadline = std::time::Instant::now() + CLOSE_FLUSH;
        while self.conn.stats().udp_tx.datagrams == sent_before && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        // The datagram is counted when it is built; the driver sends it right after.
        tokio::task::yield_now().await;
    }
}

/// How long `close` waits at most for its closing packet to be sent.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a node may take to answer before the next one is tried beside it. A dead node
/// on a network that drops packets gives no error, only silence; a live one answers a
/// handshake within a few round trips even across continents.
pub const FAILOVER_AFTER: std::time::Duration = std::time::Duration::from_millis(1500);

/// Connects to the first of `nodes` that answers, preferring them in order: each is tried
/// alone until it fails or `FAILOVER_AFTER` passes, then the next is tried beside it (the
/// first connection made wins). The error lists why each one failed.
pub async fn connect_any(nodes: &[SocketAddr], id: &TlsIdentity) -> Result<NodeClient, ClientError> {
    connect_staggered(nodes, FAILOVER_AFTER, |addr| NodeClient::connect(addr, id)).await
}

/// `connect_any` over any connecting function, for tests without sockets.
pub async fn connect_staggered<C, F>(
    nodes: &[SocketAddr],
    stagger: std::time::Duration,
    connect: impl Fn(SocketAddr) -> F,
) -> Result<C, ClientError>
where
    F: std::future::Future<Output = Result<C, ClientError>>,
{
    use futures::StreamExt;
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut errors: Vec<Option<String>> = vec![None; nodes.len()];
    let mut next = 0;
    // Start the next node now: at first, after a failure, and once the stagger has passed.
    let mut start_next = true;
    loop {
        if std::mem::take(&mut start_next) && next < nodes.len() {
            let (i, f) = (next, connect(nodes[next]));
            pending.push(async move { (i, f.await) });
            next += 1;
        }
        if pending.is_empty() {
            break;
        }
        let more = next < nodes.len();
        tokio::select! {
            Some((i, r)) = pending.next() => match r {
                Ok(c) => return Ok(c),
                Err(e) => {
                    errors[i] = Some(e.to_string());
                    start_next = true;
                }
            },
            _ = tokio::time::sleep(stagger), if more => start_next = true,
        }
    }
    let why: Vec<String> =
        nodes.iter().zip(errors).map(|(a, e)| format!("{a}: {}", e.unwrap_or_else(|| "not tried".into()))).collect();
    Err(ClientError::NoNode(why.join("\n  ")))
}

fn explain_connect(e: &quinn::ConnectionError) -> String {
    explain_connect_str(&e.to_string())
}

fn explain_connect_str(s: &str) -> String {
    // TLS alerts travel as QUIC crypto errors: "the cryptographic handshake failed: error N".
    let alert = s.split_once("handshake failed: error ").and_then(|(_, n)| {
        let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u8>().ok()
    });
    match alert {
        Some(44) => {
            return format!("certificate revoked: the cluster's administrator has revoked this certificate ({s})");
        }
        Some(45) => return format!("certificate expired: renew it with exclave-replicator pki renew ({s})"),
        Some(42 | 46) => return format!("the node refused this certificate ({s})"),
        Some(48) => return format!("the node does not know this certificate's CA, another cluster's? ({s})"),
        _ => {}
    }
    if s.contains("certificate") || s.contains("UnknownIssuer") || s.contains("BadSignature") {
        format!("TLS refused: {s} (are both certificates issued by this cluster's CA?)")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 7400 + i))).collect()
    }

    /// Node i: `None` never answers; `Some((ms, ok))` answers after `ms`.
    async fn fake(addr: SocketAddr, plan: &[Option<(u64, bool)>]) -> Result<u16, ClientError> {
        let i = usize::from(addr.port() - 7400);
        match plan[i] {
            None => std::future::pending().await,
            Some((ms, ok)) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ok { Ok(addr.port()) } else { Err(ClientError::NoNode(format!("node {i} refused"))) }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_costs_the_stagger_and_a_failing_one_nothing() {
        let plan = [None, Some((10, false)), Some((100, true))];
        let t = tokio::time::Instant::now();
        let r = connect_staggered(&addrs(3), FAILOVER_AFTER, |a| fake(a, &plan)).await;
        assert_eq!(r.ok(), Some(7402));
        // 1.5 s of silence, 10 ms to a refusal, then the third at once: 100 ms.
        assert_eq!(t.elapsed(), FAILOVER_AFTER + Duration::from_millis(110));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_node_is_preferred_when_it_answers_in_time() {
        let plan = [Some((1400, true)), Some((1, true))];
        let r = connect_staggered(&addrs(2), FAILOVER_AFTER, |a| fake(a, &plan)).await;
        assert_eq!(r.ok(), Some(7400));
        // Slow but alive: the second is tried beside it, and whichever answers first wins.
        let plan = [Some((5000, true)), Some((1, true))];
        let t = tokio::time::Instant::now();
        let r = connect_staggered(&addrs(2), FAILOVER_AFTER, |a| fake(a, &plan)).await;
        assert_eq!(r.ok(), Some(7401));
        assert_eq!(t.elapsed(), FAILOVER_AFTER + Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn all_failing_names_each_node() {
        let plan = [Some((1, false)), Some((2, false))];
        let Err(ClientError::NoNode(why)) = connect_staggered(&addrs(2), FAILOVER_AFTER, |a| fake(a, &plan)).await
        else {
            panic!("no node answers")
        };
        assert!(why.contains("127.0.0.1:7400: ") && why.contains("node 0 refused"), "{why}");
        assert!(why.contains("127.0.0.1:7401: ") && why.contains("node 1 refused"), "{why}");
    }

    #[test]
    fn tls_alerts_are_named() {
        let revoked =
            "aborted by peer: the cryptographic handshake failed: error 44: invalid peer certificate: Revoked";
        assert!(explain_connect_str(revoked).starts_with("certificate revoked: "));
        let expired = "aborted by peer: the cryptographic handshake failed: error 45";
        assert!(explain_connect_str(expired).starts_with("certificate expired: "));
        assert_eq!(explain_connect_str("timed out"), "timed out");
    }
}
