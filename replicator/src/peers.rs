//! Connections from this node to the other members: Raft messages, chunk replication,
//! anti-entropy fetches and status queries, all over QUIC with this node's certificate.
//!
//! Raft messages to a peer go, in order, on one long-lived unidirectional stream fed by a
//! bounded queue; when the queue is full or the peer unreachable they are dropped and Raft
//! is told (it retransmits). A peer's certificate must name the node expected at its address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc::Sender as InputSender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use exclave::ChunkId;
use exclave::client::{ClientError, NodeClient};
use exclave::identity::Identity;
use exclave::protocol::frame::FrameKind;
use exclave::protocol::{MemberStatus, PutChunk, Reply, Request};
use exclave::transport::{self, TlsIdentity};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::catalog::Member;
use crate::consensus::{Input, is_snapshot};

/// Raft messages queued per peer before new ones are dropped.
const QUEUE: usize = 4096;
/// Raft frames are cut at this size; a larger message (a snapshot) goes in `RaftLarge` parts.
const RAFT_FRAME_BYTES: usize = 8 * 1024 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A peer that did not answer a connection attempt is not tried again for this long.
const DOWN_FOR: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Replications in flight to one peer. Beyond this the peer is skipped for that batch (it
/// backfills later): a dead peer whose connection has not timed out yet must not make this
/// node hold every batch it receives.
const REPLICATIONS_IN_FLIGHT: usize = 8;
/// How long a batch waits for a turn to a peer that has `REPLICATIONS_IN_FLIGHT` already.
const REPLICATION_WAIT: Duration = Duration::from_secs(5);

type Slot = Arc<tokio::sync::Mutex<Option<Arc<NodeClient>>>>;

/// Why a peer could not be reached or did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no address known for node #{0:x}")]
    UnknownMember(u64),
    #[error("address {addr:?} of {name}: {reason}")]
    BadAddress { name: String, addr: String, reason: String },
    #[error("{name} ({addr}) did not answer a moment ago")]
    RecentlyDown { name: String, addr: SocketAddr },
    #[error("{name} did not answer within {secs} s")]
    Timeout { name: String, secs: u64 },
    #[error("the node at {addr} is {identity}, not node:{name} as the configuration says")]
    WrongIdentity { addr: SocketAddr, identity: String, name: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected reply to {0}")]
    Unexpected(&'static str),
    #[error("no connection")]
    NoConnection,
    #[error("Raft message: {0}")]
    Encoding(String),
}

impl PeerError {
    /// Whether asking again, a moment later, may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, PeerError::UnknownMember(_) | PeerError::BadAddress { .. } | PeerError::WrongIdentity { .. })
    }
}

pub struct Peers {
    me: u64,
    tls: Arc<TlsIdentity>,
    members: RwLock<HashMap<u64, Member>>,
    clients: Mutex<HashMap<u64, Slot>>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    input: InputSender<Input>,
    rt: tokio::runtime::Handle,
    down_until: Mutex<HashMap<u64, std::time::Instant>>,
    inflight: Mutex<HashMap<u64, Arc<tokio::sync::Semaphore>>>,
    /// For the sender tasks this struct spawns.
    this: std::sync::Weak<Peers>,
}

impl Peers {
    pub fn new(me: u64, tls: Arc<TlsIdentity>, input: InputSender<Input>, rt: tokio::runtime::Handle) -> Arc<Peers> {
        Arc::new_cyclic(|this| Peers {
            me,
            tls,
            members: RwLock::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            input,
            rt,
            down_until: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            this: this.clone(),
        })
    }

    /// Replaces the address book (the catalog's membership, plus statically configured peers
    /// not yet in it). A changed address drops the old connection.
    pub fn set_members(&self, list: Vec<(u64, Member)>) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        for (id, member) in list {
            if m.get(&id).is_some_and(|old| old.addr != member.addr) {
                self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            m.insert(id, member);
        }
    }

    pub fn member(&self, id: u64) -> Option<Member> {
        self.members.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    pub fn name_of(&self, id: u64) -> String {
        self.member(id).map(|m| m.name).unwrap_or_else(|| format!("#{id:x}"))
    }

    pub fn id_of(&self, name: &str) -> Option<u64> {
        self.members.read().unwrap_or_else(|p| p.into_inner()).iter().find(|(_, m)| m.name == name).map(|(id, _)| *id)
    }

    /// A connection to a peer, made (or remade) on demand.
    pub async fn client(&self, id: u64) -> Result<Arc<NodeClient>, PeerError> {
        let slot: Slot = self.clients.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone();
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref()
            && c.connection().close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let member = self.member(id).ok_or(PeerError::UnknownMember(id))?;
        let addr: SocketAddr = member.addr.parse().map_err(|e: std::net::AddrParseError| PeerError::BadAddress {
            name: member.name.clone(),
            addr: member.addr.clone(),
            reason: e.to_string(),
        })?;
        if self
            .down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|t| *t > std::time::Instant::now())
        {
            return Err(PeerError::RecentlyDown { name: member.name.clone(), addr });
        }
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, NodeClient::connect(addr, &self.tls)).await {
            Ok(r) => r.map_err(PeerError::from),
            Err(_) => Err(PeerError::Timeout { name: member.name.clone(), secs: CONNECT_TIMEOUT.as_secs() }),
        };
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                self.down_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, std::time::Instant::now() + DOWN_FOR);
                return Err(e);
            }
        };
        match transport::peer_identity(client.connection()) {
            Ok(Identity::Node { id: ref n }) if *n == member.name => {}
            Ok(other) => {
                return Err(PeerError::WrongIdentity { addr, identity: other.to_string(), name: member.name.clone() });
            }
            Err(e) => return Err(e.into()),
        }
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    fn forget_client(&self, id: u64) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Sends a request to a peer and returns its reply.
    pub async fn call(&self, id: u64, req: Request) -> Result<Reply, PeerError> {
        let frame = exclave::protocol::frame::encode_frame(FrameKind::Request, &req)
            .map_err(transport::TransportError::from)?;
        self.call_encoded(id, bytes::Bytes::from(frame)).await
    }

    /// Sends a request encoded already (the same frame may go to several peers).
    pub async fn call_encoded(&self, id: u64, frame: bytes::Bytes) -> Result<Reply, PeerError> {
        let client = self.client(id).await?;
        match tokio::time::timeout(CALL_TIMEOUT, client.call_encoded(frame)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                if matches!(e, ClientError::Transport(_)) {
                    self.forget_client(id);
                }
                Err(e.into())
            }
            Err(_) => Err(PeerError::Timeout { name: self.name_of(id), secs: CALL_TIMEOUT.as_secs() }),
        }
    }

    /// Queues Raft messages for their destinations (never blocks the Raft thread).
    pub fn send_raft(&self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let tx = {
                let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(this) = self.this.upgrade() else { return };
                q.entry(to)
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(QUEUE);
                        self.rt.spawn(raft_sender(this, to, rx));
                        tx
                    })
                    .clone()
            };
            if let Err(e) = tx.try_send(m) {
                let m = match e {
                    mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                };
                self.undelivered(&m);
            }
        }
    }

    fn undelivered(&self, m: &Message) {
        let _ = self.input.send(Input::Unreachable(m.to));
        if is_snapshot(m) {
            let _ = self.input.send(Input::SnapshotSent { to: m.to, ok: false });
        }
    }

    /// Stores `chunks` on the peers `to` (having applied `sweep_seq` sweeps, see `crate::gc`)
    /// until `need` of those in `counted` confirmed
    /// (durable), or all answered. Returns how many counted ones confirmed; the remaining
    /// sends carry on in the background.
    pub async fn replicate(
        self: &Arc<Self>,
        tenant: &str,
        sweep_seq: u64,
        chunks: Arc<Vec<PutChunk>>,
        to: &[u64],
        counted: &[u64],
        need: usize,
    ) -> (usize, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(to.len().max(1));
        // Encoded once, for every peer, straight from the batch: it is megabytes.
        let req = exclave::protocol::message::ReplicateRef { tenant, sweep_seq, chunks: &chunks };
        let frame = match exclave::protocol::frame::encode_frame(FrameKind::Request, &req) {
            Ok(f) => bytes::Bytes::from(f),
            Err(e) => return (0, vec![format!("encoding the batch: {e}")]),
        };
        for id in to.iter().copied().filter(|id| *id != self.me) {
            let (peers, tx, frame) = (self.clone(), tx.clone(), frame.clone());
            let sem = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(REPLICATIONS_IN_FLIGHT)))
                .clone();
            tokio::spawn(async move {
                // A busy peer is waited for a moment; a dead one (whose sends have not timed
                // out yet) is given up on, and backfills later.
                let Ok(Ok(_permit)) = tokio::time::timeout(REPLICATION_WAIT, sem.acquire_owned()).await else {
                    let busy = PeerError::Refused("too many replications in flight; it will backfill".into());
                    let _ = tx.send((id, Err(busy))).await;
                    return;
                };
                let r = match peers.call_encoded(id, frame).await {
                    Ok(Reply::Ok) => Ok(()),
                    Ok(Reply::Error { message, .. }) => Err(PeerError::Refused(message)),
                    Ok(_) => Err(PeerError::Unexpected("replicate")),
                    Err(e) => Err(e),
                };
                let _ = tx.send((id, r)).await;
            });
        }
        drop(tx);
        let (mut ok, mut errors) = (0, Vec::new());
        while ok < need {
            match rx.recv().await {
                Some((id, Ok(()))) if counted.contains(&id) => ok += 1,
                Some((_, Ok(()))) => {}
                Some((id, Err(e))) => errors.push(format!("{}: {e}", self.name_of(id))),
                None => break,
            }
        }
        (ok, errors)
    }

    /// Envelopes of `ids` from one peer (each an envelope or that chunk's error).
    pub async fn fetch(&self, id: u64, tenant: &str, ids: &[ChunkId]) -> Result<Vec<Option<Vec<u8>>>, PeerError> {
        match self.call(id, Request::Fetch { tenant: tenant.to_string(), ids: ids.to_vec() }).await? {
            Reply::Chunks { chunks } if chunks.len() == ids.len() => {
                Ok(chunks.into_iter().map(|r| r.ok().map(|b| b.into_vec())).collect())
            }
            Reply::Error { message, .. } => Err(PeerError::Refused(message)),
            _ => Err(PeerError::Unexpected("fetch")),
        }
    }

    /// One page of peer `id`'s snapshot `snapshot`, for the consensus thread (which is not a
    /// runtime thread, so it may wait here).
    #[allow(clippy::type_complexity)]
    pub fn snapshot_page_blocking(
        &self,
        id: u64,
        snapshot: u64,
        after: Option<&[u8]>,
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, bool), PeerError> {
        let req = Request::SnapshotPages {
            id: snapshot,
            after: after.map(|a| serde_bytes::ByteBuf::from(a.to_vec())),
            max_bytes: crate::test_hooks::snapshot_page_bytes(crate::snapshot::PAGE_BYTES) as u32,
        };
        match self.rt.block_on(self.call(id, req))? {
            Reply::SnapshotPage { pairs, done } => {
                Ok((pairs.into_iter().map(|(k, v)| (k.into_vec(), v.into_vec())).collect(), done))
            }
            Reply::Error { message, .. } => Err(PeerError::Refused(message)),
            _ => Err(PeerError::Unexpected("snapshot_pages")),
        }
    }

    pub async fn status(&self, id: u64) -> Result<MemberStatus, PeerError> {
        match tokio::time::timeout(Duration::from_secs(3), self.call(id, Request::RaftStatus)).await {
            Ok(Ok(Reply::RaftStatus(s))) => Ok(s),
            Ok(Ok(Reply::Error { message, .. })) => Err(PeerError::Refused(message)),
            Ok(Ok(_)) => Err(PeerError::Unexpected("raft_status")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PeerError::Timeout { name: self.name_of(id), secs: 3 }),
        }
    }
}

async fn raft_sender(peers: Arc<Peers>, to: u64, mut rx: mpsc::Receiver<Message>) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if stream.is_none() {
            match peers.client(to).await {
                Ok(c) => match c.connection().open_uni().await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        peers.forget_client(to);
                        debug!(peer = %peers.name_of(to), error = %e, "raft stream not opened");
                    }
                },
                Err(e) => debug!(peer = %peers.name_of(to), error = %e, "peer unreachable"),
            }
        }
        let sent = match stream.as_mut() {
            Some(s) => write_batch(s, &batch).await,
            None => Err(PeerError::NoConnection),
        };
        match sent {
            Ok(()) => {
                for m in batch.iter().filter(|m| is_snapshot(m)) {
                    let _ = peers.input.send(Input::SnapshotSent { to: m.to, ok: true });
                }
            }
            Err(e) => {
                if stream.is_some() {
                    warn!(peer = %peers.name_of(to), error = %e, "raft stream broken; reconnecting");
                    peers.forget_client(to);
                }
                stream = None;
                for m in &batch {
                    peers.undelivered(m);
                }
                // Do not spin on a dead peer: Raft retransmits what matters.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
            }
        }
    }
}

async fn write_batch(s: &mut quinn::SendStream, batch: &[Message]) -> Result<(), PeerError> {
    let mut frame: Vec<serde_bytes::ByteBuf> = Vec::new();
    let mut size = 0;
    for m in batch {
        let bytes = m.write_to_bytes().map_err(|e| PeerError::Encoding(e.to_string()))?;
        if bytes.len() > RAFT_FRAME_BYTES {
            flush(s, &mut frame, &mut size).await?;
            let total = bytes.len() as u64;
            for part in bytes.chunks(RAFT_FRAME_BYTES) {
                let req = Request::RaftLarge { total, part: part.to_vec() };
                transport::write_frame(s, FrameKind::Request, &req).await?;
            }
            continue;
        }
        if size + bytes.len() > RAFT_FRAME_BYTES {
            flush(s, &mut frame, &mut size).await?;
        }
        size += bytes.len() + 8;
        frame.push(serde_bytes::ByteBuf::from(bytes));
    }
    flush(s, &mut frame, &mut size).await
}

async fn flush(
    s: &mut quinn::SendStream,
    frame: &mut Vec<serde_bytes::ByteBuf>,
    size: &mut usize,
) -> Result<(), PeerError> {
    if frame.is_empty() {
        return Ok(());
    }
    let req = Request::Raft { messages: std::mem::take(frame) };
    *size = 0;
    Ok(transport::write_frame(s, FrameKind::Request, &req).await?)
}

/// Largest Raft message accepted in parts (a catalog snapshot).
pub const MAX_RAFT_MESSAGE: u64 = 1 << 30;

/// Decodes a Raft message received from a peer.
pub fn decode_message(bytes: &[u8]) -> Result<Message, PeerError> {
    Message::parse_from_bytes(bytes).map_err(|e| PeerError::Encoding(e.to_string()))
}
