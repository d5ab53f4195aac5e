//! Requests and replies.
//!
//! The tenant is never a field of a request: the node takes it from the client certificate,
//! so an identity can only ever name its own tenant's data.
//!
//! Conversations (one QUIC stream each):
//! - `Have` → `Missing`: which of these chunk ids does the node lack?
//! - `PutChunks` → `Ok`: store envelopes; replied only once durable.
//! - `Commit` then `commit.ref_batches` × `CommitRefs` → `Committed` or `Error(MissingChunks)`.
//! - `Hello` → `Hello` (first, on connect); `ListSnapshots` → `Snapshots`; `GetChunk` → `Chunk`;
//!   `GetChunks` → `Chunks` (each entry an envelope or that chunk's error);
//!   `Status` → `Status`.
//! - Between nodes (node certificates only): `Raft` and `RaftLarge` frames on one ordered
//!   unidirectional stream per peer (no reply); `Replicate` (`ReplicateV2` once chunks have
//!   been swept) → `Ok` once durable;
//!   `Fetch` → `Chunks` (anti-entropy); `RaftStatus` → `RaftStatus`.
//! - Cluster operations: `ClusterStatus` → `ClusterStatus`; `AddNode`, `RemoveNode` → `Ok`
//!   once the configuration change is applied (admin only); `ReadBarrier` → `Ok` once this
//!   node has applied everything the leader had committed when it was asked; `Revoke` → `Ok`
//!   once the revocation is committed (admin only); `Certificates` → `Certificates`;
//!   `Gc` → `Gc` once a garbage-collection pass is done (admin only); `GcStatus` → `GcStatus`;
//!   `HistoryHeads` → `HistoryHeads` (operators).
//!
//! Enum variants are only ever appended, never reordered: postcard encodes the index.

use serde::{Deserialize, Serialize};

use crate::chunk_id::{Checksum, ChunkId};

/// Most ids in one `Have`, `Missing` or `CommitRefs` message (1.1 MiB of ids).
pub const MAX_IDS_PER_MESSAGE: usize = 32 * 1024;
/// Most envelope bytes one `Chunks` reply carries; a `GetChunks` asking for more is served
/// up to this bound and the rest reported as not served (the client asks again).
pub const MAX_CHUNKS_REPLY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutChunk {
    pub id: ChunkId,
    pub checksum: Checksum,
    /// A slice of the frame it arrived in, when a node decodes it (`shared_bytes`).
    #[serde(with = "super::shared_bytes")]
    pub envelope: bytes::Bytes,
}

/// What the cluster knows of a snapshot, in the clear.
///
/// What the embassy learns: only what it needs to keep, order, account for and collect
/// snapshots (tenant by certificate, `source`, `id`, `time`, `root`, the references, the
/// sizes it computes itself) and to name a wrong key (`key_fingerprint`). Agents of this
/// version send `hostname` empty and `files` 0: the host's name is in the encrypted
/// manifest's header and the files are its entries (older snapshots keep what they sent).
/// `logical_bytes` stays: a restore sizes its progress by it and `wal-fetch` computes the
/// next segments' names from a WAL file's size, before any manifest is opened; it tells the
/// node little its stored bytes do not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub source: String,
    /// Unix seconds when the snapshot started.
    pub time: i64,
    pub root: ChunkId,
    /// Fingerprint of the tenant key that sealed it, so a wrong key is named, not guessed.
    pub key_fingerprint: String,
    /// Name of the agent identity that committed it.
    pub agent: String,
    /// Empty from agents of this version (see above).
    pub hostname: String,
    /// 0 from agents of this version (see above).
    pub files: u64,
    /// Plaintext bytes of the source.
    pub logical_bytes: u64,
    /// Distinct chunks referenced (data and manifest).
    pub chunks: u64,
    /// Sum of the envelope sizes of the distinct chunks referenced (computed by the node).
    pub stored_bytes: u64,
    /// Order of commit, assigned by the cluster: orders snapshots taken in the same second.
    pub commit_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Have {
        ids: Vec<ChunkId>,
    },
    PutChunks {
        chunks: Vec<PutChunk>,
    },
    Commit {
        snapshot: SnapshotInfo,
        ref_batches: u32,
    },
    CommitRefs {
        ids: Vec<ChunkId>,
    },
    ListSnapshots {
        source: Option<String>,
    },
    GetChunk {
        id: ChunkId,
    },
    Status,
    /// First request of a connection: confirms the node accepted our certificate.
    Hello,
    /// Several chunks at once (restore): one stream instead of one per chunk.
    GetChunks {
        ids: Vec<ChunkId>,
    },
    /// Raft messages (protobuf-encoded `eraftpb::Message`), in order.
    Raft {
        messages: Vec<serde_bytes::ByteBuf>,
    },
    /// One part of a Raft message too large for a frame (a catalog snapshot): parts follow
    /// each other on the stream until `total` bytes are received.
    RaftLarge {
        total: u64,
        #[serde(with = "serde_bytes")]
        part: Vec<u8>,
    },
    /// Store envelopes received by a peer from an agent (write quorum).
    Replicate {
        tenant: String,
        chunks: Vec<PutChunk>,
    },
    /// Envelopes of any tenant, for a peer that lacks them (anti-entropy).
    Fetch {
        tenant: String,
        ids: Vec<ChunkId>,
    },
    RaftStatus,
    ClusterStatus,
    /// Add a node as a learner (`voter: false`) or promote it to voter.
    AddNode {
        name: String,
        addr: String,
        voter: bool,
    },
    RemoveNode {
        name: String,
    },
    ReadBarrier,
    /// The retention policy of one of the agent's tenant's sources (it may only lengthen
    /// the policy in force).
    SetRetention {
        source: String,
        policy: crate::retention::RetentionPolicy,
    },
    /// An administrator's retention policy for any tenant's source (may shorten it).
    SetRetentionFor {
        tenant: String,
        source: String,
        policy: crate::retention::RetentionPolicy,
    },
    /// One snapshot by its exact id (an archived WAL file by name): answered with
    /// `Snapshots` holding it, or none.
    FindSnapshot {
        id: String,
    },
    /// Shut a certificate out of every node (administrator): committed through Raft, refused
    /// at every handshake from then on, open connections closed.
    Revoke {
        /// Serial number, hex.
        serial: String,
        /// The certificate's subject, for the record and the logs.
        subject: String,
        reason: String,
    },
    /// The node's own certificate, the CA's, and the revocations in force → `Certificates`.
    Certificates,
    /// One page of a catalog snapshot this node offered in a Raft snapshot ticket (nodes
    /// only): the pairs after the key `after`, about `max_bytes` of them → `SnapshotPage`.
    SnapshotPages {
        id: u64,
        after: Option<serde_bytes::ByteBuf>,
        max_bytes: u32,
    },
    /// Start a scrub pass on this node now (admin) → `Scrub` at once, or, with `wait`, once
    /// that pass has ended.
    Scrub {
        wait: bool,
    },
    /// Set (or, with `None`, remove) a tenant's quota (admin) → `Ok` once committed.
    SetQuota {
        tenant: String,
        max_bytes: Option<u64>,
    },
    /// Every tenant's storage and quota → `Quotas`.
    Quotas,
    /// Record a restore drill's result for the caller's tenant (restore identities) → `Ok`
    /// once committed. The node sets `identity`, `node` and `recorded`.
    RecordDrill {
        record: DrillRecord,
    },
    /// The drills recorded for the caller's tenant (optionally one source), oldest first →
    /// `Drills`.
    Drills {
        source: Option<String>,
    },
    /// Run a garbage-collection pass from this node now (admin) → `Gc` once it is done: the
    /// cluster's pass (condemn, sweep) and this node's own (orphans, space returned).
    Gc {
        dry_run: bool,
    },
    /// `Replicate` once the cluster has swept chunks: the receiving node first applies the
    /// sweeps its sender had (`sweep_seq`), so a copy it counts is not one a sweep deletes.
    ReplicateV2 {
        tenant: String,
        sweep_seq: u64,
        chunks: Vec<PutChunk>,
    },
    /// An administrator sets how long, in cluster time, retention may not forget a tenant's
    /// new snapshots → `Ok`.
    SetProtection {
        tenant: String,
        days: u32,
    },
    /// What governs a tenant's retention (administrators) → `Retention`.
    RetentionShow {
        tenant: String,
    },
    /// An administrator sets, lengthens, shortens or (`lock: None`) removes a minimum-retention
    /// lock of a tenant or one of its sources → `Ok`, or `LockPending` when a governance lock
    /// would be weakened and a second administrator must approve.
    SetLock {
        tenant: String,
        source: Option<String>,
        lock: Option<(LockMode, u32)>,
    },
    /// A second administrator approves a pending governance change → `Ok`.
    ApproveLock {
        id: u64,
    },
    /// An administrator places (or releases) a legal hold → `Ok`.
    SetHold {
        tenant: String,
        target: HoldTarget,
        release: bool,
        reason: String,
    },
    /// The audit log: sessions of a tenant (`None`: administrators' sessions on the cluster)
    /// that ended at or after `since`, by identities starting with `who` → `Audit`.
    /// Administrators read any; a restore identity its own tenant's only.
    Audit {
        tenant: Option<String>,
        since: i64,
        who: Option<String>,
    },
    /// A tenant's hash-chained history, events after `after` → `History` (authorised as
    /// `Audit`).
    History {
        tenant: Option<String>,
        after: u64,
    },
    /// Garbage collection as the answering node sees it (operators) → `GcStatus`.
    GcStatus,
    /// Every tenant's history chain head as the answering node holds it (operators) →
    /// `HistoryHeads`: what a tenant records outside the cluster, readable without a record
    /// of its own (a read that moved the head it reports would be no use).
    HistoryHeads,
    /// An administrator sets how long a tenant's audit records are kept (`tenant` empty: the
    /// cluster's own sessions) → `AuditKeep`. Lengthening applies at once; shortening is
    /// recorded, and applies when a second administrator asks for the same days.
    SetAuditKeep {
        tenant: String,
        days: u32,
    },
    /// How long a tenant's audit records are kept → `AuditKeep` (authorised as `Audit`).
    AuditKeep {
        tenant: Option<String>,
    },
    /// An administrator says every node runs this version: the catalog may use the newest
    /// layout the answering node knows → `Ok`. A node of an older version stops at it.
    FinalizeUpgrade,
    /// Which catalog layouts the answering node knows → `KnownLayout`. The leader asks every
    /// member before it finalises an upgrade; a node too old to know this request is taken
    /// as not knowing the new layout.
    KnownLayout,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Have { .. } => "have",
            Request::PutChunks { .. } => "put_chunks",
            Request::Commit { .. } => "commit",
            Request::CommitRefs { .. } => "commit_refs",
            Request::ListSnapshots { .. } => "list_snapshots",
            Request::GetChunk { .. } => "get_chunk",
            Request::Status => "status",
            Request::Hello => "hello",
            Request::GetChunks { .. } => "get_chunks",
            Request::Raft { .. } => "raft",
            Request::RaftLarge { .. } => "raft_large",
            Request::Replicate { .. } => "replicate",
            Request::Fetch { .. } => "fetch",
            Request::RaftStatus => "raft_status",
            Request::ClusterStatus => "cluster_status",
            Request::AddNode { .. } => "add_node",
            Request::RemoveNode { .. } => "remove_node",
            Request::ReadBarrier => "read_barrier",
            Request::SetRetention { .. } => "set_retention",
            Request::SetRetentionFor { .. } => "set_retention_for",
            Request::FindSnapshot { .. } => "find_snapshot",
            Request::Revoke { .. } => "revoke",
            Request::Certificates => "certificates",
            Request::SnapshotPages { .. } => "snapshot_pages",
            Request::Scrub { .. } => "scrub",
            Request::SetQuota { .. } => "set_quota",
            Request::Quotas => "quotas",
            Request::RecordDrill { .. } => "record_drill",
            Request::Drills { .. } => "drills",
            Request::Gc { .. } => "gc",
            Request::ReplicateV2 { .. } => "replicate",
            Request::SetProtection { .. } => "set_protection",
            Request::RetentionShow { .. } => "retention_show",
            Request::SetLock { .. } => "set_lock",
            Request::ApproveLock { .. } => "approve_lock",
            Request::SetHold { .. } => "set_hold",
            Request::Audit { .. } => "audit",
            Request::History { .. } => "history",
            Request::GcStatus => "gc_status",
            Request::HistoryHeads => "history_heads",
            Request::SetAuditKeep { .. } => "set_audit_keep",
            Request::AuditKeep { .. } => "audit_keep",
            Request::FinalizeUpgrade => "finalize_upgrade",
            Request::KnownLayout => "known_layout",
        }
    }
}

/// `Request::Replicate` (no sweep yet: the request older nodes know) or
/// `Request::ReplicateV2`, encoded from borrowed chunks: a leader forwards every batch
/// (megabytes) to its peers, and building the owned request copied every envelope once more.
/// Encodes byte for byte as the owned request (tested); the variant indices are the enum's.
pub struct ReplicateRef<'a> {
    pub tenant: &'a str,
    pub sweep_seq: u64,
    pub chunks: &'a [PutChunk],
}

impl ReplicateRef<'_> {
    const REPLICATE: u32 = 11;
    const REPLICATE_V2: u32 = 30;
}

impl Serialize for ReplicateRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant;
        if self.sweep_seq == 0 {
            let mut v = s.serialize_struct_variant("Request", Self::REPLICATE, "Replicate", 2)?;
            v.serialize_field("tenant", self.tenant)?;
            v.serialize_field("chunks", self.chunks)?;
            v.end()
        } else {
            let mut v = s.serialize_struct_variant("Request", Self::REPLICATE_V2, "ReplicateV2", 3)?;
            v.serialize_field("tenant", self.tenant)?;
            v.serialize_field("sweep_seq", &self.sweep_seq)?;
            v.serialize_field("chunks", self.chunks)?;
            v.end()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    NotFound,
    /// A chunk failed its storage checksum (on write: damaged in transit; on read: on disk).
    Corrupt,
    /// A commit references chunks the node does not hold; `missing` lists them.
    MissingChunks,
    StorageFull,
    StorageError,
    Unavailable,
    Internal,
    /// The node cannot reach a majority of its cluster, so it cannot commit: another node
    /// may (not worth retrying on this one).
    NoQuorum,
    /// The tenant's quota would be exceeded (an administrator must raise it).
    QuotaExceeded,
}

impl ErrorCode {
    /// Whether the same request may succeed if tried again later.
    pub fn retryable(&self) -> bool {
        matches!(self, ErrorCode::StorageError | ErrorCode::Unavailable | ErrorCode::StorageFull)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub version: String,
    pub uptime_secs: u64,
    pub chunks: u64,
    pub snapshots: u64,
    pub disk_used_bytes: u64,
    pub disk_free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Missing {
        ids: Vec<ChunkId>,
    },
    Committed {
        snapshot: SnapshotInfo,
    },
    Snapshots {
        snapshots: Vec<SnapshotInfo>,
        /// Set when the answering node cannot confirm its catalog is current (cut off from
        /// the cluster's majority): the list may lack the latest snapshots.
        stale: Option<String>,
    },
    Chunk {
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
    Status(NodeStatus),
    Error {
        code: ErrorCode,
        message: String,
        missing: Vec<ChunkId>,
    },
    /// The node's name and version, and the identity it sees in our certificate.
    Hello {
        node: String,
        version: String,
        you: String,
    },
    /// Envelopes in the order asked; a chunk that cannot be served carries its error instead.
    Chunks {
        chunks: Vec<Result<serde_bytes::ByteBuf, (ErrorCode, String)>>,
    },
    RaftStatus(MemberStatus),
    ClusterStatus {
        /// The node that answered, then every other member as that node sees it.
        members: Vec<MemberReport>,
    },
    Certificates {
        node: crate::pki::CertInfo,
        ca: crate::pki::CertInfo,
        revoked: Vec<Revocation>,
    },
    SnapshotPage {
        pairs: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
        /// This page is the last.
        done: bool,
    },
    Scrub(ScrubStatus),
    Quotas(Vec<TenantUsage>),
    Drills(Vec<DrillRecord>),
    Gc(GcResult),
    Retention(RetentionView),
    /// A governance change recorded, waiting for a second administrator's approval.
    LockPending(PendingLockChange),
    /// Audit records, oldest first (at most `MAX_AUDIT_RECORDS`; ask again from the last).
    Audit(Vec<AuditRecord>),
    /// History events after the one asked for, oldest first (at most `MAX_HISTORY_EVENTS`), and
    /// the chain's head as the node holds it.
    History {
        events: Vec<HistoryEvent>,
        head: HistoryHead,
    },
    GcStatus(GcStatus),
    HistoryHeads(Vec<TenantHead>),
    AuditKeep(AuditKeepView),
    KnownLayout {
        /// The newest catalog layout this node's version knows.
        known: u32,
    },
}

/// How long a tenant's audit records are kept, and a shortening waiting for its second
/// administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditKeepView {
    /// Empty: the cluster's own sessions (administrators').
    pub tenant: String,
    pub days: u32,
    /// Who set it and when (cluster time); `None`: the default.
    pub set: Option<(String, i64)>,
    pub pending: Option<PendingAuditKeep>,
}

/// A shortening of the audit keeping time, applied when a different administrator asks for
/// the same days before `expires` (cluster time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAuditKeep {
    pub days: u32,
    pub by: String,
    pub requested: i64,
    pub expires: i64,
}

/// One tenant's history chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantHead {
    pub tenant: String,
    pub head: HistoryHead,
}

/// Most history events in one reply.
pub const MAX_HISTORY_EVENTS: usize = 4096;

/// One event of a tenant's history: a snapshot committed or forgotten, a lock, hold,
/// protection window or policy set, a session audited. Each names the hash of the one before,
/// so no event can be removed, changed or reordered without breaking every hash after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// 1, 2, ... per tenant.
    pub seq: u64,
    /// Hash of the previous event (zeros for the first).
    pub prev: [u8; 32],
    /// Cluster time when it was applied.
    pub time: i64,
    /// `commit`, `forget`, `lock`, `hold`, `protect`, `retention`, `audit` or `drill`.
    pub kind: String,
    /// What happened: for `commit` the snapshot's record (postcard `SnapshotInfo`, as the
    /// cluster lists it), for `forget` the snapshot id, for `drill` the drill's record
    /// (postcard `DrillRecord`, as the cluster lists it), for the others the record applied.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl HistoryEvent {
    /// BLAKE3 over a domain, the previous hash, the sequence, the time, the kind and the payload.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"exclave history v1\0");
        h.update(&self.prev);
        h.update(&self.seq.to_be_bytes());
        h.update(&self.time.to_be_bytes());
        h.update(&(self.kind.len() as u32).to_be_bytes());
        h.update(self.kind.as_bytes());
        h.update(&(self.payload.len() as u64).to_be_bytes());
        h.update(&self.payload);
        *h.finalize().as_bytes()
    }
}

/// The newest event of a tenant's history and its hash: what a tenant records outside the
/// cluster to prove later that nothing before it was rewritten.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryHead {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// Most audit records in one reply.
pub const MAX_AUDIT_RECORDS: usize = 10_000;

/// One session (a connection) of a restore or administrator identity, as the cluster records
/// it when the session ends: who, which tenant, what was asked and how much was read. One
/// record per session, never per chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Subject and certificate serial (`restore:lux#0a1b...`).
    pub identity: String,
    /// The tenant read (empty: a session on the cluster itself, by an administrator).
    pub tenant: String,
    /// The node that served it.
    pub node: String,
    /// Unix seconds, by that node's clock.
    pub started: i64,
    pub ended: i64,
    /// Requests by kind, with how many of each.
    pub requests: Vec<(String, u64)>,
    /// Sources and snapshots named by the requests (listings, lookups, drills).
    pub sources: Vec<String>,
    pub snapshots: Vec<String>,
    /// Envelope bytes served.
    pub bytes: u64,
    /// Requests refused or failed.
    pub failures: u64,
}

/// What governs a tenant's retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionView {
    pub tenant: String,
    /// Cluster time (Unix seconds): the newest commit time the cluster applied.
    pub cluster_time: i64,
    /// Snapshots committed less than this many days ago (cluster time) are never forgotten.
    pub protection_days: u32,
    /// Whether an administrator set the window (else it is the default).
    pub protection_set: bool,
    /// Each source with a policy, by name.
    pub policies: Vec<(String, crate::retention::RetentionPolicy)>,
    /// Minimum-retention locks: the tenant's (source `None`) and its sources'.
    pub locks: Vec<(Option<String>, RetentionLock)>,
    pub holds: Vec<LegalHold>,
    /// Governance changes waiting for a second administrator.
    pub pending: Vec<PendingLockChange>,
}

/// How a minimum-retention lock may be weakened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    /// Never, by anyone: it can only be lengthened.
    Compliance,
    /// Shortened or removed only with the approval of a second administrator.
    Governance,
}

/// No snapshot committed less than `days` ago (cluster time) is forgotten while it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionLock {
    pub mode: LockMode,
    pub days: u32,
    /// The administrator certificate that set it (subject and serial).
    pub by: String,
    /// Cluster time when it was set.
    pub since: i64,
}

/// What a legal hold keeps: a whole source (its archived WAL with it) or one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldTarget {
    Source(String),
    Snapshot(String),
}

/// Nothing under a legal hold is forgotten (so nothing it references is collected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegalHold {
    pub target: HoldTarget,
    pub by: String,
    pub since: i64,
    pub reason: String,
}

/// A governance lock's shortening or removal, waiting for a second administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingLockChange {
    pub id: u64,
    pub tenant: String,
    pub source: Option<String>,
    /// The lock asked for (`None`: removed).
    pub lock: Option<(LockMode, u32)>,
    pub by: String,
    pub requested: i64,
    /// Cluster time after which it can no longer be approved.
    pub expires: i64,
}

/// One garbage-collection pass over the cluster's catalog, as recorded there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub pass: u64,
    /// The node that ran it.
    pub node: String,
    /// Unix seconds (that node's clock: for people, never for a decision).
    pub started: i64,
    pub finished: i64,
    pub dry_run: bool,
    /// Index entries examined by the mark.
    pub examined: u64,
    /// Chunks no snapshot references, taken out of the index (kept until swept).
    pub condemned_chunks: u64,
    pub condemned_bytes: u64,
    /// Condemned chunks whose copies every node deleted.
    pub swept_chunks: u64,
    pub swept_bytes: u64,
    /// Condemned chunks waiting for a later pass (the grace).
    pub pending_chunks: u64,
    pub pending_bytes: u64,
    /// Passes a condemned chunk waits before it is swept.
    pub grace_passes: u64,
    /// Unfinished commits whose staged references were dropped.
    pub staged_dropped: u64,
}

/// One node's share of garbage collection: its orphans and the disk space it got back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimReport {
    pub node: String,
    pub started: i64,
    pub finished: i64,
    /// Chunks stored here that the index never named (uploads that failed), seen now.
    pub orphans_found: u64,
    /// Of those, seen by the previous pass too and swept.
    pub orphans_swept: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    /// Live bytes copied out of mostly dead packs.
    pub bytes_moved: u64,
    /// Pack bytes on disk before and after.
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    /// Why some space could not be returned (a damaged record, too little room), if so.
    pub skipped: Vec<String>,
}

/// The answer to `Gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcResult {
    pub cluster: GcReport,
    pub local: ReclaimReport,
}

/// The answer to `GcStatus`: the cluster's last pass (the same on every node: it is in the
/// catalog) and this node's schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcStatus {
    /// The last pass recorded as done (`None`: never).
    pub last: Option<GcReport>,
    /// A pass is running on this node now.
    pub running: bool,
    /// Seconds between passes this node runs when it leads (`None`: only when asked).
    pub interval_secs: Option<u64>,
    pub grace_passes: u64,
}

/// What a restore drill proved, as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub source: String,
    pub snapshot: String,
    /// When the snapshot was taken (Unix seconds).
    pub snapshot_time: i64,
    /// When the drill started (the drill host's clock).
    pub started: i64,
    /// `PASS`, `FAIL` or `INCOMPLETE` (something could not be checked).
    pub verdict: String,
    /// Why, in one line.
    pub reason: String,
    /// Recovery time: from the start until the data was usable and verified.
    pub rto_ms: u64,
    /// Recovery point: the snapshot's age when the drill started, seconds.
    pub rpo_secs: i64,
    pub bytes: u64,
    pub files: u64,
    /// Set by the node: who recorded it, through which node, and when (the node's clock).
    pub identity: String,
    pub node: String,
    pub recorded: i64,
}

/// A tenant's storage in the cluster and its quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantUsage {
    pub tenant: String,
    /// Envelope bytes of its chunks in the cluster's index (each chunk once).
    pub stored_bytes: u64,
    pub quota_bytes: Option<u64>,
}

/// A node's scrub: the pass under way, the last complete one, what could not be repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    pub node: String,
    pub running: Option<ScrubReport>,
    pub last: Option<ScrubReport>,
    /// Complete passes since the node started.
    pub passes: u64,
    /// Chunks of this node damaged or lost that no peer could replace (as of now).
    pub unrepairable: Vec<Damage>,
}

/// One scrub pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Unix seconds.
    pub started: i64,
    pub finished: Option<i64>,
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks found damaged or unreadable.
    pub corrupt: u64,
    /// Of those, replaced by a good copy from a peer.
    pub repaired: u64,
}

/// A chunk no node could supply a good copy of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub tenant: String,
    /// Chunk id, hex.
    pub chunk: String,
    /// The snapshots that reference it (their files are not restorable whole).
    pub snapshots: Vec<String>,
    pub why: String,
}

/// A certificate an administrator shut out of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Serial number, hex (lower case).
    pub serial: String,
    pub subject: String,
    pub reason: String,
    /// The administrator's identity.
    pub by: String,
    /// When it was proposed (Unix seconds, the proposing node's clock).
    pub time: i64,
}

/// One node's view of itself in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub raft_id: u64,
    /// leader, follower, candidate, pre-candidate, learner, or joining (not yet in a configuration).
    pub role: String,
    pub term: u64,
    pub leader: Option<String>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// Chunks in the cluster index (this node's applied state).
    pub chunks_indexed: u64,
    /// Indexed chunks this node lacks, as counted by its last anti-entropy pass.
    pub chunks_missing: u64,
    /// Applied index at the start of the last complete anti-entropy pass (`None`: no pass
    /// completed since the node started). Backfill is complete once this reaches the
    /// cluster's commit index with nothing missing.
    pub scanned_at: Option<u64>,
    pub snapshots: u64,
    /// Milliseconds since this node last heard from each peer (`None`: never since start).
    pub peers: Vec<PeerContact>,
    /// Why this node's catalog may be stale, if it may be.
    pub stale: Option<String>,
    /// Why this node's backfill stopped short (its disk at the reserve...), if it did.
    pub backfill_error: Option<String>,
    /// Chunks of this node damaged that no peer could replace (see `Scrub`).
    pub unrepairable: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerContact {
    pub name: String,
    pub last_contact_ms: Option<u64>,
    /// Log index known replicated on that peer (leader only).
    pub matched: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    pub name: String,
    pub addr: String,
    pub voter: bool,
    pub status: Result<MemberStatus, String>,
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error { code, message: message.into(), missing: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_replicate_request_encodes_as_the_owned_one() {
        let chunks: Vec<PutChunk> = (0..3u8)
            .map(|i| PutChunk {
                id: ChunkId([i; 32]),
                checksum: Checksum([i + 7; 32]),
                envelope: vec![i; 300 * i as usize].into(),
            })
            .collect();
        for sweep_seq in [0, 1, 1 << 40] {
            let borrowed = ReplicateRef { tenant: "est", sweep_seq, chunks: &chunks };
            let owned = if sweep_seq == 0 {
                Request::Replicate { tenant: "est".into(), chunks: chunks.clone() }
            } else {
                Request::ReplicateV2 { tenant: "est".into(), sweep_seq, chunks: chunks.clone() }
            };
            let bytes = postcard::to_stdvec(&borrowed).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&owned).unwrap(), "sweep {sweep_seq}");
            assert_eq!(postcard::from_bytes::<Request>(&bytes).unwrap(), owned);
        }
    }
}
