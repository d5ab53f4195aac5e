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
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

/// What the cluster knows of a snapshot, in the clear.
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
    pub hostname: String,
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
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error { code, message: message.into(), missing: Vec::new() }
    }
}
