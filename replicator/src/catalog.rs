//! The cluster catalog: the state machine that Raft replicates on every embassy node.
//!
//! It owns what the cluster must know in the clear: tenants, snapshots and their references,
//! the chunk index (id, envelope size, storage checksum) and the membership. Chunks themselves
//! never pass through here (see `replication`).
//!
//! `apply` is a pure function: it reads the current state through `CatalogRead` and returns
//! the outcome and the writes to make, so every node that applies the same log reaches the
//! same state, and the logic is tested without a disk or a network. Nothing in a command may
//! depend on the applying node (its clock, its disk, its chunks).
//!
//! Keys (`tenant`, `source` and snapshot ids never contain a NUL byte, see `identity::check_name`):
//!
//! ```text
//! c ‖ tenant ‖ 0 ‖ chunk id (32)                      → postcard(IndexEntry)       chunk index
//! s ‖ tenant ‖ 0 ‖ source ‖ 0 ‖ time (i64 BE) ‖ id    → postcard(SnapshotInfo)     snapshots
//! i ‖ tenant ‖ 0 ‖ id                                 → source ‖ 0 ‖ time (i64 BE) lookup by id
//! r ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)             → postcard(Vec<ChunkId>)     references (for GC), whole (`refs`)
//! B ‖ tenant ‖ 0 ‖ id                                 → base snapshot id           references stored as a difference
//! e ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)             → postcard(Vec<ChunkId>)     references the base lacks
//! f ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)             → postcard(Vec<ChunkId>)     the base's references it lacks
//! F                                                   → u32 BE                     catalog layout (`packs_refs`)
//! R ‖ tenant ‖ 0                                      → u64 BE                     when lists were last rewritten (`refs`)
//! p ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)             → postcard(Vec<ChunkId>)     staged by an unfinished commit
//! t ‖ tenant                                          → postcard(TenantInfo)
//! k ‖ tenant ‖ 0 ‖ source                             → postcard(RetentionPolicy)
//! n ‖ raft id (u64 BE)                                → postcard(Member)
//! q                                                   → commit sequence (u64 BE)
//! v ‖ certificate serial (bytes)                      → postcard(Revocation)       revoked certificates
//! z                                                   → postcard(CatalogStats)     counts kept by `apply`
//! b ‖ tenant ‖ 0                                      → u64 BE: envelope bytes the tenant's index names
//! u ‖ tenant ‖ 0                                      → postcard(Quota)            set by an administrator
//! D ‖ tenant ‖ 0 ‖ source ‖ 0 ‖ recorded (i64 BE) ‖ seq → postcard(DrillRecord) every drill recorded
//! L ‖ tenant ‖ 0 ‖ source                             → postcard(DrillLatest)      the newest drill, last success
//! g ‖ tenant ‖ 0 ‖ chunk id (32)                      → postcard(Condemned)        condemned by GC, copies kept
//! G                                                   → postcard(GcState)          GC passes and sweeps
//! x ‖ sweep seq (u64 BE)                              → postcard(SweepRecord)      what a recent sweep deleted
//! C                                                   → i64 BE                     cluster time: newest commit time applied
//! T ‖ tenant ‖ 0 ‖ id                                 → i64 BE                     a snapshot's commit time (cluster time)
//! P ‖ tenant ‖ 0                                      → postcard(Protection)       set by an administrator
//! l ‖ tenant ‖ 0 ‖ source                             → postcard(RetentionLock)    minimum-retention locks (`locks`)
//! h ‖ tenant ‖ 0 ‖ 's'|'n' ‖ source|id                → postcard(LegalHold)        legal holds
//! a ‖ request id (u64 BE)                             → postcard(PendingLockChange) governance changes to approve
//! A                                                   → u64 BE                     last request id
//! Y ‖ tenant ‖ 0 ‖ ended (u64 BE) ‖ seq (u64 BE)       → postcard(AuditRecord)      audit log (`audit`)
//! y                                                   → u64 BE                     last audit sequence
//! K ‖ tenant ‖ 0                                      → postcard(KeepSet)          audit keeping time, if set
//! W ‖ tenant ‖ 0                                      → postcard(PendingAuditKeep) its shortening, asked for
//! H ‖ tenant ‖ 0 ‖ seq (u64 BE)                        → postcard(HistoryEvent)     hash-chained history (`history`)
//! J ‖ tenant                                          → postcard(HistoryHead)      its newest event and hash
//! d ‖ tenant ‖ 0 ‖ chunk id (32)                      → base chunk id (32)         a delta's base (`gc::bases`)
//! ```
//!
//! Deltas: a chunk indexed as a delta (`IndexChunksV3`) records its base, and a commit adds
//! the bases of what it references (and theirs, `MAX_DELTA_DEPTH` deep) to the snapshot's
//! references, so GC keeps a base as long as any delta on it is referenced, whatever the
//! agent remembered, and a snapshot whose bases are gone is refused like one whose chunks are.
//! `IndexChunksV4` indexes a delta only with its base in the index, and GC neither condemns
//! nor sweeps a base while a delta on it is indexed or condemned (`gc::delta_bases`): so a
//! delta the index holds always has its base, even when it raced a collection.
//!
//! Retention reads commit times, never the agent's `time` (rules at the top of
//! `exclave::retention`). Snapshots committed before commit times were kept (no `T`) count
//! with their agent time, capped at the cluster time.
//!
//! Garbage collection (`gc`, rules in `crate::gc`) moves unreferenced chunks from `c` to `g`,
//! puts them back when a commit or an upload needs them, and sweeps them: a sweep is applied
//! by every node deleting its copies (`Write::DropChunk`) in the same batch as the catalog.
//!
//! A revocation is never removed: a revoked certificate stays refused for as long as it
//! could be presented (renewal issues a new certificate with a new serial).

use exclave::chunk_id::{Checksum, ChunkId};
use exclave::protocol::{DrillRecord, Revocation, SnapshotInfo};
use exclave::retention::{Candidate, DEFAULT_PROTECTION_DAYS, MAX_PROTECTION_DAYS, RetentionPolicy};
use exclave::sorted_ids;
use serde::{Deserialize, Serialize};

pub mod audit;
pub mod gc;
pub mod history;
pub mod locks;
pub mod refs;

/// Most missing ids listed in one refusal (the agent re-sends those and tries again).
pub const MAX_MISSING_REPORTED: usize = 32 * 1024;
/// References per stored batch.
const REFS_PER_BATCH: usize = 16 * 1024;
/// Most reference batches one commit may stage (32 Mi chunks: about 2 PiB at 64 KiB).
pub const MAX_COMMIT_BATCHES: u32 = 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexEntry {
    pub envelope_len: u32,
    pub checksum: Checksum,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub addr: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantInfo {
    pub snapshots: u64,
    /// Time of the newest snapshot committed (the agent's clock, as recorded in the snapshot).
    pub last_snapshot_time: i64,
}

/// Counts kept up to date by `apply`, so that status needs no walk over the index.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CatalogStats {
    /// Entries of the chunk index, every tenant's.
    pub chunks: u64,
    /// Snapshots, every tenant's and source's.
    pub snapshots: u64,
}

const STATS_KEY: &[u8] = b"z";

/// A tenant's storage quota (envelope bytes in the cluster's index, each chunk once).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quota {
    pub max_bytes: u64,
    /// The administrator who set it, and when (the proposing node's clock).
    pub by: String,
    pub time: i64,
}

fn usage_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'b', tenant)
}

fn quota_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'u', tenant)
}

/// Envelope bytes of a tenant's chunks in the index.
pub fn usage(view: &dyn CatalogRead, tenant: &str) -> Result<u64, CatalogError> {
    Ok(view.get(&usage_key(tenant))?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0))
}

pub fn quota(view: &dyn CatalogRead, tenant: &str) -> Result<Option<Quota>, CatalogError> {
    view.get(&quota_key(tenant))?.map(|v| decode(&v)).transpose()
}

/// Every tenant with stored chunks or a quota: (tenant, bytes used, quota).
pub fn usages(view: &dyn CatalogRead) -> Result<Vec<(String, u64, Option<Quota>)>, CatalogError> {
    let tenant_of = |k: &[u8]| String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)]).into_owned();
    let mut out: std::collections::BTreeMap<String, (u64, Option<Quota>)> = std::collections::BTreeMap::new();
    view.scan(b"b", &mut |k, v| {
        let used = v.try_into().ok().map(u64::from_be_bytes).unwrap_or(0);
        out.entry(tenant_of(k)).or_default().0 = used;
        true
    })?;
    for (k, q) in scan_decoded::<Quota>(view, b"u")? {
        out.entry(tenant_of(&k)).or_default().1 = Some(q);
    }
    Ok(out.into_iter().map(|(t, (u, q))| (t, u, q)).collect())
}

/// Every tenant's usage by a walk over the index: for a catalog written before usage was kept.
pub fn count_usage(view: &dyn CatalogRead) -> Result<Vec<Write>, CatalogError> {
    let mut sums: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut bad = None;
    view.scan(CHUNK_PREFIX, &mut |k, v| {
        match (parse_chunk_key(k), decode::<IndexEntry>(v)) {
            (Some((tenant, _)), Ok(e)) => *sums.entry(tenant).or_default() += u64::from(e.envelope_len),
            (_, Err(e)) => bad = Some(e),
            _ => {}
        }
        bad.is_none()
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    Ok(sums.into_iter().map(|(t, n)| Write::Put(usage_key(&t), n.to_be_bytes().to_vec())).collect())
}

pub fn stats(view: &dyn CatalogRead) -> Result<CatalogStats, CatalogError> {
    Ok(match view.get(STATS_KEY)? {
        Some(v) => decode(&v)?,
        None => CatalogStats::default(),
    })
}

/// The counts of a catalog, by walking it: for a catalog written before the counts were kept.
pub fn count_stats(view: &dyn CatalogRead) -> Result<CatalogStats, CatalogError> {
    Ok(CatalogStats { chunks: count(view, CHUNK_PREFIX)?, snapshots: count(view, SNAPSHOT_ID_PREFIX)? })
}

/// The write that stores `stats`; whoever has no counts yet (an older catalog) writes them
/// once from `count_stats`.
pub fn stats_write(stats: &CatalogStats) -> Write {
    Write::Put(STATS_KEY.to_vec(), encode(stats))
}

fn bump(
    view: &dyn CatalogRead,
    w: &mut Vec<Write>,
    chunks: u64,
    snapshots_added: u64,
    snapshots_gone: u64,
) -> Result<(), CatalogError> {
    bump_all(view, w, (chunks, 0), (snapshots_added, snapshots_gone))
}

fn bump_chunks(view: &dyn CatalogRead, w: &mut Vec<Write>, added: u64, gone: u64) -> Result<(), CatalogError> {
    bump_all(view, w, (added, gone), (0, 0))
}

/// Updates the kept counts: (added, gone) of chunks and of snapshots. Once per command: the
/// writes of one command are made together, so a second update would read stale counts.
fn bump_all(
    view: &dyn CatalogRead,
    w: &mut Vec<Write>,
    (chunks_added, chunks_gone): (u64, u64),
    (snapshots_added, snapshots_gone): (u64, u64),
) -> Result<(), CatalogError> {
    if chunks_added == 0 && chunks_gone == 0 && snapshots_added == 0 && snapshots_gone == 0 {
        return Ok(());
    }
    let mut st = stats(view)?;
    st.chunks = (st.chunks + chunks_added).saturating_sub(chunks_gone);
    st.snapshots = (st.snapshots + snapshots_added).saturating_sub(snapshots_gone);
    w.push(stats_write(&st));
    Ok(())
}

/// A change to the catalog, as proposed through Raft. Variants are only ever appended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Chunks now held durably by a write quorum of nodes.
    IndexChunks {
        tenant: String,
        chunks: Vec<(ChunkId, IndexEntry)>,
    },
    /// One batch of a snapshot's references, ahead of its `Commit`.
    StageRefs {
        tenant: String,
        snapshot_id: String,
        batch: u32,
        ids: Vec<ChunkId>,
    },
    /// Records the snapshot if every staged reference (and the root) is in the index.
    Commit {
        tenant: String,
        snapshot: SnapshotInfo,
        batches: u32,
    },
    /// Drops a snapshot from the catalog (its chunks stay until garbage collection).
    Forget {
        tenant: String,
        snapshot_id: String,
    },
    SetMember {
        raft_id: u64,
        member: Member,
    },
    RemoveMember {
        raft_id: u64,
    },
    /// The retention policy of a source, applied at once and after every commit of the
    /// source. Unless `by_admin`, a policy may only keep more than the one in force, and a
    /// first policy may not forget anything already stored: an agent governs what comes
    /// next, never what is there.
    SetRetention {
        tenant: String,
        source: String,
        policy: RetentionPolicy,
        by_admin: bool,
    },
    /// Shuts a certificate out of every node. The first revocation of a serial is the one
    /// kept; repeating it changes nothing.
    Revoke {
        revocation: Revocation,
    },
    /// Sets (or, with `None`, removes) a tenant's quota.
    SetQuota {
        tenant: String,
        quota: Option<Quota>,
    },
    /// A restore drill's result.
    RecordDrill {
        tenant: String,
        record: DrillRecord,
    },
    /// `IndexChunks` from an uploader that had applied `sweep_seq` sweeps when it began: a
    /// chunk a later sweep deleted is refused (see `crate::gc`).
    IndexChunksV2 {
        tenant: String,
        chunks: Vec<(ChunkId, IndexEntry)>,
        sweep_seq: u64,
    },
    /// GC: takes these chunks out of the index (kept as condemned) unless a snapshot committed
    /// after the proposer's mark (commit sequence above `as_of_seq`) references them.
    GcCondemn {
        tenant: String,
        ids: Vec<ChunkId>,
        as_of_seq: u64,
        pass: u64,
    },
    /// GC: every node deletes its copies of those of these chunks that are not in the index.
    GcSweep {
        tenant: String,
        ids: Vec<ChunkId>,
    },
    /// GC: drops the staged references of a commit that never finished.
    GcDropStaged {
        tenant: String,
        snapshot_id: String,
    },
    /// GC: a pass is done.
    GcPassDone {
        report: exclave::protocol::GcReport,
        staged_seen: Vec<(String, String)>,
    },
    /// `Commit` stamped with the proposing node's clock: the snapshot's commit time is the
    /// larger of `now` and the cluster time (which never goes back).
    CommitV2 {
        tenant: String,
        snapshot: SnapshotInfo,
        batches: u32,
        now: i64,
    },
    /// `SetRetention` on cluster time, within the tenant's protection window.
    SetRetentionV2 {
        tenant: String,
        source: String,
        policy: RetentionPolicy,
        by_admin: bool,
    },
    /// A tenant's protection window (set by an administrator).
    SetProtection {
        tenant: String,
        protection: Protection,
    },
    /// A minimum-retention lock set, changed or (`None`) removed by administrator `by` (rules
    /// in `locks`); `now` is the proposer's clock, never below cluster time.
    SetLock {
        tenant: String,
        source: Option<String>,
        lock: Option<(exclave::protocol::LockMode, u32)>,
        by: String,
        now: i64,
    },
    /// A second administrator approves a pending governance change.
    ApproveLock {
        id: u64,
        by: String,
        now: i64,
    },
    /// A legal hold placed or released.
    SetHold {
        tenant: String,
        target: exclave::protocol::HoldTarget,
        release: bool,
        by: String,
        reason: String,
        now: i64,
    },
    /// A session of a restore or administrator identity, recorded when it ended.
    Audit {
        record: exclave::protocol::AuditRecord,
    },
    /// `RecordDrill`, and the result is also an event of the tenant's history chain, so a drill
    /// record removed or edited by hand shows.
    RecordDrillV2 {
        tenant: String,
        record: DrillRecord,
    },
    /// `IndexChunksV2`, and the base of each chunk stored as a delta (delta id, base id), read
    /// by the uploading node from the envelopes' clear headers. Sent only when a batch holds a
    /// delta, so clusters that never see one keep the commands every version knows.
    IndexChunksV3 {
        tenant: String,
        chunks: Vec<(ChunkId, IndexEntry)>,
        sweep_seq: u64,
        bases: Vec<(ChunkId, ChunkId)>,
    },
    /// `IndexChunksV3`, and a delta is indexed only with its base in the index: a condemned
    /// base is put back, and a delta whose base was swept since the agent asked is refused
    /// (`Indexed::base_gone`), to be sent again whole.
    IndexChunksV4 {
        tenant: String,
        chunks: Vec<(ChunkId, IndexEntry)>,
        sweep_seq: u64,
        bases: Vec<(ChunkId, ChunkId)>,
    },
    /// How long a tenant's audit records are kept, set by administrator `by` (rules in
    /// `audit`); `now` is the proposer's clock, never below cluster time.
    SetAuditKeep {
        tenant: String,
        days: u32,
        by: String,
        now: i64,
    },
    /// Stores the second newest snapshot of a source as its difference from the newest, when
    /// that is small and the catalog allows it (`refs`).
    PackRefs {
        tenant: String,
        source: String,
    },
    /// An administrator finalised an upgrade: the catalog may use `layout` from now on. A node
    /// of an older version cannot decode this command and stops here, before anything of the
    /// new layout reaches it.
    SetLayout {
        layout: u32,
    },
}

/// How long, in cluster time, retention may not forget a tenant's new snapshots.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Protection {
    pub days: u32,
}

impl Protection {
    pub fn window_secs(&self) -> i64 {
        i64::from(self.days) * 86_400
    }
}

const CLOCK_KEY: &[u8] = b"C";

/// What the catalog's layout may hold beyond what every version reads. A cluster founded by
/// this version starts at `LAYOUT`; one founded earlier stays at 0 until an administrator
/// finalises its upgrade (`SetLayout`), so that a node of an older version, which would read
/// the catalog wrongly, never serves a cluster that uses it.
const LAYOUT_KEY: &[u8] = b"F";
/// Layout 1: snapshot references stored as differences (`refs`).
const LAYOUT_PACKED_REFS: u32 = 1;
/// Layout 2: retention forgets streamed WAL versions another archived file holds in full
/// (`superseded_streams`). A rule of applying commands, not of reading: nodes that applied it
/// and nodes that did not would hold different catalogs, so it waits for every node to know it.
const LAYOUT_SUPERSEDED_STREAMS: u32 = 2;
/// The newest layout this version knows.
pub const LAYOUT: u32 = LAYOUT_SUPERSEDED_STREAMS;

/// The catalog's layout (0: every version reads it).
pub fn layout(view: &dyn CatalogRead) -> Result<u32, CatalogError> {
    Ok(view.get(LAYOUT_KEY)?.and_then(|v| v.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0))
}

/// Whether snapshot references may be stored as differences (`PackRefs` does something).
pub fn packs_refs(view: &dyn CatalogRead) -> Result<bool, CatalogError> {
    Ok(layout(view)? >= LAYOUT_PACKED_REFS)
}

/// The catalog's first writes in a cluster founded by this version (with its members').
pub fn founding_writes() -> Vec<Write> {
    if crate::test_hooks::founds_old_layout() {
        return Vec::new();
    }
    vec![Write::Put(LAYOUT_KEY.to_vec(), LAYOUT.to_be_bytes().to_vec())]
}

/// Cluster time: the newest commit time applied (0 before the first).
pub fn cluster_time(view: &dyn CatalogRead) -> Result<i64, CatalogError> {
    match view.get(CLOCK_KEY)? {
        Some(v) => Ok(i64::from_be_bytes(v.as_slice().try_into().map_err(|_| CatalogError::Decode("clock".into()))?)),
        None => Ok(0),
    }
}

fn commit_time_key(tenant: &str, snapshot_id: &str) -> Vec<u8> {
    let mut k = tenant_key(b'T', tenant);
    k.extend_from_slice(snapshot_id.as_bytes());
    k
}

/// Commit times (cluster time) of `snaps`; a snapshot from before they were kept counts with
/// its agent time, capped at the cluster time `now`.
pub fn commit_times(
    view: &dyn CatalogRead,
    tenant: &str,
    snaps: &[SnapshotInfo],
    now: i64,
) -> Result<Vec<i64>, CatalogError> {
    let keys: Vec<Vec<u8>> = snaps.iter().map(|s| commit_time_key(tenant, &s.id)).collect();
    snaps
        .iter()
        .zip(view.get_many(&keys)?)
        .map(|(s, v)| match v {
            Some(v) => {
                Ok(i64::from_be_bytes(v.as_slice().try_into().map_err(|_| CatalogError::Decode("time".into()))?))
            }
            None => Ok(s.time.min(now)),
        })
        .collect()
}

fn protection_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'P', tenant)
}

/// A tenant's protection window: as set by an administrator, or the default.
pub fn protection(view: &dyn CatalogRead, tenant: &str) -> Result<Protection, CatalogError> {
    Ok(match view.get(&protection_key(tenant))? {
        Some(v) => decode(&v)?,
        None => Protection { days: DEFAULT_PROTECTION_DAYS },
    })
}

/// A source's newest drill, and when one last passed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DrillLatest {
    pub last: DrillRecord,
    pub last_success: Option<i64>,
}

fn drill_key(tenant: &str, source: &str, recorded: i64, seq: u64) -> Vec<u8> {
    let mut k = tenant_key(b'D', tenant);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(&recorded.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn drill_latest_key(tenant: &str, source: &str) -> Vec<u8> {
    let mut k = tenant_key(b'L', tenant);
    k.extend_from_slice(source.as_bytes());
    k
}

/// The drills of a tenant (optionally one source), oldest first per source.
pub fn drills(view: &dyn CatalogRead, tenant: &str, source: Option<&str>) -> Result<Vec<DrillRecord>, CatalogError> {
    let mut prefix = tenant_key(b'D', tenant);
    if let Some(s) = source {
        prefix.extend_from_slice(s.as_bytes());
        prefix.push(0);
    }
    Ok(scan_decoded::<DrillRecord>(view, &prefix)?.into_iter().map(|(_, d)| d).collect())
}

/// Every source's newest drill: (tenant, source, latest).
pub fn drills_latest(view: &dyn CatalogRead) -> Result<Vec<(String, String, DrillLatest)>, CatalogError> {
    Ok(scan_decoded::<DrillLatest>(view, b"L")?
        .into_iter()
        .filter_map(|(k, d)| {
            let rest = &k[1..];
            let nul = rest.iter().position(|b| *b == 0)?;
            let tenant = String::from_utf8_lossy(&rest[..nul]).into_owned();
            let source = String::from_utf8_lossy(&rest[nul + 1..]).into_owned();
            Some((tenant, source, d))
        })
        .collect())
}

/// Archived WAL of a source lives in `SOURCE.wal` (see the agent's `wal` module); WAL
/// archived before the oldest kept base backup started is no longer needed for recovery,
/// and is kept this much longer for clock differences between hosts.
const WAL_MARGIN_SECS: i64 = 3600;

fn retention_key(tenant: &str, source: &str) -> Vec<u8> {
    let mut k = tenant_key(b'k', tenant);
    k.extend_from_slice(source.as_bytes());
    k
}

pub fn retention(view: &dyn CatalogRead, tenant: &str, source: &str) -> Result<Option<RetentionPolicy>, CatalogError> {
    view.get(&retention_key(tenant, source))?.map(|v| decode(&v)).transpose()
}

/// Whether a source is on hold: itself, or (for archived WAL, `SOURCE.wal`) its base source.
fn held_source(view: &dyn CatalogRead, tenant: &str, source: &str) -> Result<bool, CatalogError> {
    Ok(locks::source_held(view, tenant, source)?
        || source.strip_suffix(".wal").map(|b| locks::source_held(view, tenant, b)).transpose()?.unwrap_or(false))
}

/// What governs a tenant's retention: its window and each source's policy.
pub fn retention_view(view: &dyn CatalogRead, tenant: &str) -> Result<exclave::protocol::RetentionView, CatalogError> {
    let prefix = tenant_key(b'k', tenant);
    let policies = scan_decoded::<RetentionPolicy>(view, &prefix)?
        .into_iter()
        .map(|(k, p)| (String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), p))
        .collect();
    Ok(exclave::protocol::RetentionView {
        tenant: tenant.to_string(),
        cluster_time: cluster_time(view)?,
        protection_days: protection(view, tenant)?.days,
        protection_set: view.get(&protection_key(tenant))?.is_some(),
        policies,
        locks: locks::locks(view, tenant)?,
        holds: locks::holds(view, tenant)?,
        pending: locks::pending(view, tenant)?,
    })
}

/// Writes that drop one snapshot (its entry, id lookup and references); returns false if
/// it does not exist.
fn forget_writes(
    view: &dyn CatalogRead,
    tenant: &str,
    snapshot_id: &str,
    w: &mut Vec<Write>,
) -> Result<bool, CatalogError> {
    let Some(loc) = view.get(&id_key(tenant, snapshot_id))? else { return Ok(false) };
    w.push(Write::Delete(snapshot_key(tenant, &loc, snapshot_id)));
    w.push(Write::Delete(id_key(tenant, snapshot_id)));
    w.push(Write::Delete(commit_time_key(tenant, snapshot_id)));
    Ok(true)
}

/// Which clock retention reads. Commands from before commit times were kept (`Commit`,
/// `SetRetention`) still apply as they did, on agent times without a window, so that a log
/// replayed by a newer node gives the state older nodes reached.
#[derive(Debug, Clone, Copy)]
enum RetentionClock {
    Agent,
    /// Cluster time now.
    Cluster(i64),
}

/// Applies `policy` to the snapshots of `source` (plus `new` and its commit time, committed
/// in this same command), and prunes the source's archived WAL older than its oldest kept
/// snapshot. On cluster time, nothing committed within the tenant's protection window is
/// forgotten. Returns how many snapshots were forgotten.
fn apply_retention(
    view: &dyn CatalogRead,
    tenant: &str,
    source: &str,
    policy: &RetentionPolicy,
    new: Option<(&SnapshotInfo, i64)>,
    clock: RetentionClock,
    w: &mut Vec<Write>,
) -> Result<Vec<String>, CatalogError> {
    if held_source(view, tenant, source)? {
        return Ok(Vec::new());
    }
    let mut snaps = snapshots(view, tenant, Some(source))?;
    let (now, window) = match clock {
        RetentionClock::Agent => (i64::MAX, 0),
        RetentionClock::Cluster(now) => {
            (now, protection(view, tenant)?.window_secs().max(locks::lock_secs(view, tenant, source)?))
        }
    };
    let mut times = match clock {
        RetentionClock::Agent => snaps.iter().map(|s| s.time).collect(),
        RetentionClock::Cluster(now) => commit_times(view, tenant, &snaps, now)?,
    };
    if let Some((s, t)) = new {
        snaps.push(s.clone());
        times.push(match clock {
            RetentionClock::Agent => s.time,
            RetentionClock::Cluster(_) => t,
        });
    }
    let candidates: Vec<Candidate> = snaps
        .iter()
        .zip(&times)
        .map(|(s, t)| Candidate { id: s.id.clone(), time: *t, commit_seq: s.commit_seq })
        .collect();
    let mut forget: std::collections::HashSet<String> = match clock {
        RetentionClock::Agent => policy.forget(&candidates),
        RetentionClock::Cluster(now) => policy.forget_at(&candidates, now, window),
    }
    .into_iter()
    .collect();
    let mut held = Vec::new();
    for id in &forget {
        if locks::snapshot_held(view, tenant, id)? {
            held.push(id.clone());
        }
    }
    for id in held {
        forget.remove(&id);
    }
    let mut gone = Vec::new();
    // In the order of the listing, so every node chains them alike.
    for s in &snaps {
        if forget.contains(&s.id) && forget_writes(view, tenant, &s.id, w)? {
            gone.push(s.id.clone());
        }
    }
    // WAL is matched to base backups by the agent's times (both come from the register's
    // host); WAL committed within the window stays whatever those times say.
    let oldest_kept = snaps.iter().filter(|s| !forget.contains(&s.id)).map(|s| s.time).min();
    let wal = format!("{source}.wal");
    let segments = snapshots(view, tenant, Some(&wal))?;
    let floor = now.saturating_sub(window);
    let times = match clock {
        RetentionClock::Agent => vec![i64::MIN; segments.len()],
        RetentionClock::Cluster(now) => commit_times(view, tenant, &segments, now)?,
    };
    let superseded =
        if layout(view)? >= LAYOUT_SUPERSEDED_STREAMS { superseded_streams(&segments) } else { Default::default() };
    for (s, t) in segments.iter().zip(times) {
        if t > floor || locks::snapshot_held(view, tenant, &s.id)? {
            continue;
        }
        let before_bases = oldest_kept.is_some_and(|oldest| s.time < oldest.saturating_sub(WAL_MARGIN_SECS));
        if (before_bases || superseded.contains(&s.id)) && forget_writes(view, tenant, &s.id, w)? {
            gone.push(s.id.clone());
        }
    }
    refs::forget(view, tenant, &gone, w)?;
    Ok(gone)
}

/// The ids of streamed versions of a segment (`exclave::wal`) that another archived file
/// holds in full: the complete segment, or a longer streamed version of it. WAL at a position
/// never changes once written, so they add nothing to recovery; without this rule every
/// shipping round of an agent's WAL stream stayed in the catalog for good.
fn superseded_streams(segments: &[SnapshotInfo]) -> std::collections::HashSet<String> {
    let names: Vec<(&String, &str)> =
        segments.iter().filter_map(|s| Some((&s.id, exclave::wal::file_name(&s.id)?))).collect();
    // Recovery is served one file per segment; a streamed version it is not served is held in
    // full by the one it is.
    let serving = exclave::wal::serving(&names.iter().map(|(_, n)| n.to_string()).collect::<Vec<_>>());
    names
        .iter()
        .filter(|(_, n)| {
            exclave::wal::parse_streamed(n)
                .is_some_and(|(seg, _)| serving.get(&seg.to_ascii_lowercase()).is_some_and(|served| served != n))
        })
        .map(|(id, _)| (*id).clone())
        .collect()
}

/// What applying a command decided; the proposer reports it to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Committed(SnapshotInfo),
    /// The commit references chunks that are not in the index (at most `MAX_MISSING_REPORTED`).
    Missing(Vec<ChunkId>),
    Refused(String),
    /// Chunks indexed, except `refused` (a sweep deleted them after the uploader looked: store
    /// them again) and `base_gone` (deltas whose base was swept: the agent sends them whole).
    Indexed {
        refused: Vec<ChunkId>,
        base_gone: Vec<ChunkId>,
    },
    /// GC: how many chunks (or staged batches) and envelope bytes a command took.
    Collected {
        chunks: u64,
        bytes: u64,
    },
    /// A governance lock change recorded, waiting for a second administrator.
    LockPending(exclave::protocol::PendingLockChange),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Not the catalog: this node deletes its copy of a swept chunk (its location in the
    /// store's chunk index), in the same batch as the catalog's writes.
    DropChunk {
        tenant: String,
        id: ChunkId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog storage error: {0}")]
    Storage(String),
    #[error("catalog entry damaged: {0}")]
    Decode(String),
}

/// Read access to the applied catalog.
pub trait CatalogRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CatalogError>;
    /// Calls `f` for each key starting with `prefix`, in key order, until it returns false.
    fn scan(&self, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), CatalogError> {
        self.scan_from(prefix, prefix, f)
    }
    /// As `scan`, beginning at the first key at or after `start` (for paging: a cursor is
    /// not a prefix of the keys after it).
    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), CatalogError>;
    /// Values of several keys (implementations may batch the lookups).
    fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, CatalogError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
}

fn tenant_key(tag: u8, tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 40);
    k.push(tag);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k
}

pub fn chunk_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = tenant_key(b'c', tenant);
    k.extend_from_slice(&id.0);
    k
}

/// Prefix of every chunk index key.
pub const CHUNK_PREFIX: &[u8] = b"c";

/// Splits a chunk index key into tenant and chunk id.
pub fn parse_chunk_key(key: &[u8]) -> Option<(String, ChunkId)> {
    let rest = key.strip_prefix(CHUNK_PREFIX)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let tenant = std::str::from_utf8(&rest[..nul]).ok()?.to_string();
    let id: [u8; 32] = rest[nul + 1..].try_into().ok()?;
    Some((tenant, ChunkId(id)))
}

/// One page of the chunk index, every tenant's: up to `limit` entries after `cursor` (from
/// the start when `None`), in key order, and the cursor of the next page (`None` at the end).
#[allow(clippy::type_complexity)]
pub fn index_page(
    view: &dyn CatalogRead,
    cursor: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<(String, ChunkId, IndexEntry)>, Option<Vec<u8>>), CatalogError> {
    let limit = limit.max(1);
    let mut page = Vec::with_capacity(limit.min(4096));
    let mut bad = None;
    view.scan_from(CHUNK_PREFIX, cursor.unwrap_or(CHUNK_PREFIX), &mut |k, v| {
        match (parse_chunk_key(k), decode::<IndexEntry>(v)) {
            (Some((tenant, id)), Ok(e)) => page.push((tenant, id, e)),
            (None, _) => bad = Some(CatalogError::Decode(format!("malformed index key {}", hex::encode(k)))),
            (_, Err(e)) => bad = Some(e),
        }
        bad.is_none() && page.len() < limit
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    // The smallest key after the last one seen.
    let next = (page.len() >= limit).then(|| page.last()).flatten().map(|(tenant, id, _)| {
        let mut k = chunk_key(tenant, id);
        k.push(0);
        k
    });
    Ok((page, next))
}

fn id_key(tenant: &str, snapshot_id: &str) -> Vec<u8> {
    let mut k = tenant_key(b'i', tenant);
    k.extend_from_slice(snapshot_id.as_bytes());
    k
}

fn batch_key(tag: u8, tenant: &str, snapshot_id: &str, batch: u32) -> Vec<u8> {
    let mut k = tenant_key(tag, tenant);
    k.extend_from_slice(snapshot_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&batch.to_be_bytes());
    k
}

fn batches_prefix(tag: u8, tenant: &str, snapshot_id: &str) -> Vec<u8> {
    let mut k = tenant_key(tag, tenant);
    k.extend_from_slice(snapshot_id.as_bytes());
    k.push(0);
    k
}

fn location(snap: &SnapshotInfo) -> Vec<u8> {
    let mut loc = snap.source.as_bytes().to_vec();
    loc.push(0);
    loc.extend_from_slice(&snap.time.to_be_bytes());
    loc
}

fn snapshot_key(tenant: &str, loc: &[u8], snapshot_id: &str) -> Vec<u8> {
    let mut k = tenant_key(b's', tenant);
    k.extend_from_slice(loc);
    k.extend_from_slice(snapshot_id.as_bytes());
    k
}

fn member_key(raft_id: u64) -> Vec<u8> {
    let mut k = vec![b'n'];
    k.extend_from_slice(&raft_id.to_be_bytes());
    k
}

const SEQ_KEY: &[u8] = b"q";

/// The commit sequence: the `commit_seq` of the newest snapshot (drills count in it too).
pub fn commit_seq(view: &dyn CatalogRead) -> Result<u64, CatalogError> {
    counter(view, SEQ_KEY)
}

/// A counter kept under `key` (u64 BE; 0 when absent).
fn counter(view: &dyn CatalogRead, key: &[u8]) -> Result<u64, CatalogError> {
    match view.get(key)? {
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| CatalogError::Decode(format!("counter {:?}", String::from_utf8_lossy(key))))?,
        )),
        None => Ok(0),
    }
}

/// The counter under `key` plus one, written back in the same command.
fn next_counter(view: &dyn CatalogRead, key: &[u8], w: &mut Vec<Write>) -> Result<u64, CatalogError> {
    let n = counter(view, key)? + 1;
    w.push(Write::Put(key.to_vec(), n.to_be_bytes().to_vec()));
    Ok(n)
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, CatalogError> {
    postcard::from_bytes(b).map_err(|e| CatalogError::Decode(e.to_string()))
}

/// Applies one command. Pure: the same state and command always give the same result.
pub fn apply(view: &dyn CatalogRead, cmd: &Command) -> Result<(Outcome, Vec<Write>), CatalogError> {
    let mut w = Vec::new();
    let outcome = match cmd {
        Command::IndexChunks { tenant, chunks } => gc::index_chunks(view, tenant, chunks, None, &[], false, &mut w)?,
        Command::IndexChunksV2 { tenant, chunks, sweep_seq } => {
            gc::index_chunks(view, tenant, chunks, Some(*sweep_seq), &[], false, &mut w)?
        }
        Command::IndexChunksV3 { tenant, chunks, sweep_seq, bases } => {
            gc::index_chunks(view, tenant, chunks, Some(*sweep_seq), bases, false, &mut w)?
        }
        Command::IndexChunksV4 { tenant, chunks, sweep_seq, bases } => {
            gc::index_chunks(view, tenant, chunks, Some(*sweep_seq), bases, true, &mut w)?
        }
        Command::GcCondemn { tenant, ids, as_of_seq, pass } => {
            gc::condemn(view, tenant, ids, *as_of_seq, *pass, &mut w)?
        }
        Command::GcSweep { tenant, ids } => gc::sweep(view, tenant, ids, &mut w)?,
        Command::GcDropStaged { tenant, snapshot_id } => gc::drop_staged(view, tenant, snapshot_id, &mut w)?,
        Command::GcPassDone { report, staged_seen } => gc::pass_done(view, report, staged_seen, &mut w)?,
        Command::StageRefs { tenant, snapshot_id, batch, ids } => {
            if *batch >= MAX_COMMIT_BATCHES {
                Outcome::Refused(format!("reference batch {batch} is beyond the limit of {MAX_COMMIT_BATCHES}"))
            } else if view.get(&id_key(tenant, snapshot_id))?.is_some() {
                Outcome::Done
            } else {
                w.push(Write::Put(batch_key(b'p', tenant, snapshot_id, *batch), encode(ids)));
                Outcome::Done
            }
        }
        Command::Commit { tenant, snapshot, batches } => commit(view, tenant, snapshot, *batches, None, &mut w)?,
        Command::CommitV2 { tenant, snapshot, batches, now } => {
            commit(view, tenant, snapshot, *batches, Some(*now), &mut w)?
        }
        Command::SetLock { tenant, source, lock, by, now } => {
            let now = (*now).max(cluster_time(view)?);
            let out = locks::set_lock(view, tenant, source.as_deref(), *lock, by, now, &mut w)?;
            chain_change(view, tenant, now, "lock", cmd, &out, &mut w)?;
            out
        }
        Command::Audit { record } => {
            let out = audit::record(view, record, &mut w)?;
            let mut chain = history::Chain::open(view, &record.tenant, cluster_time(view)?)?;
            chain.push("audit", encode(record), &mut w);
            out
        }
        Command::SetLayout { layout } => {
            if *layout > LAYOUT {
                Outcome::Refused(format!("this node knows catalog layouts up to {LAYOUT}, not {layout}"))
            } else {
                if *layout > self::layout(view)? {
                    w.push(Write::Put(LAYOUT_KEY.to_vec(), layout.to_be_bytes().to_vec()));
                }
                Outcome::Done
            }
        }
        Command::PackRefs { tenant, source } => {
            if packs_refs(view)? {
                refs::pack(view, tenant, source, &mut w)?
            } else {
                Outcome::Done
            }
        }
        Command::SetAuditKeep { tenant, days, by, now } => {
            let now = (*now).max(cluster_time(view)?);
            let out = audit::set_keep(view, tenant, *days, by, now, &mut w)?;
            chain_change(view, tenant, now, "audit-keep", cmd, &out, &mut w)?;
            out
        }
        Command::ApproveLock { id, by, now } => {
            let now = (*now).max(cluster_time(view)?);
            let tenant = locks::request_tenant(view, *id)?;
            let out = locks::approve(view, *id, by, now, &mut w)?;
            if let Some(t) = tenant {
                chain_change(view, &t, now, "lock", cmd, &out, &mut w)?;
            }
            out
        }
        Command::SetHold { tenant, target, release, by, reason, now } => {
            let now = (*now).max(cluster_time(view)?);
            let hold = exclave::protocol::LegalHold {
                target: target.clone(),
                by: by.clone(),
                since: now,
                reason: reason.clone(),
            };
            let out = locks::set_hold(view, tenant, hold, *release, &mut w)?;
            chain_change(view, tenant, now, "hold", cmd, &out, &mut w)?;
            out
        }
        Command::SetProtection { tenant, protection } => {
            if protection.days > MAX_PROTECTION_DAYS {
                Outcome::Refused(format!("a protection window is at most {MAX_PROTECTION_DAYS} days"))
            } else {
                w.push(Write::Put(protection_key(tenant), encode(protection)));
                chain_change(view, tenant, cluster_time(view)?, "protect", cmd, &Outcome::Done, &mut w)?;
                Outcome::Done
            }
        }
        Command::Forget { tenant, snapshot_id } => {
            let held = match snapshot(view, tenant, snapshot_id)? {
                Some(s) => locks::snapshot_held(view, tenant, snapshot_id)? || held_source(view, tenant, &s.source)?,
                None => false,
            };
            if held {
                Outcome::Refused(format!("snapshot {snapshot_id} is under a legal hold"))
            } else if forget_writes(view, tenant, snapshot_id, &mut w)? {
                refs::forget(view, tenant, std::slice::from_ref(snapshot_id), &mut w)?;
                let mut info = tenant_info(view, tenant)?;
                info.snapshots = info.snapshots.saturating_sub(1);
                bump(view, &mut w, 0, 0, 1)?;
                w.push(Write::Put(tenant_key(b't', tenant), encode(&info)));
                Outcome::Done
            } else {
                Outcome::Refused(format!("snapshot {snapshot_id} not found"))
            }
        }
        Command::SetRetention { tenant, source, policy, by_admin } => {
            set_retention(view, tenant, source, policy, *by_admin, 1, &mut w)?
        }
        Command::SetRetentionV2 { tenant, source, policy, by_admin } => {
            set_retention(view, tenant, source, policy, *by_admin, 2, &mut w)?
        }
        Command::SetMember { raft_id, member } => {
            w.push(Write::Put(member_key(*raft_id), encode(member)));
            Outcome::Done
        }
        Command::RemoveMember { raft_id } => {
            w.push(Write::Delete(member_key(*raft_id)));
            Outcome::Done
        }
        Command::RecordDrillV2 { tenant, record } => {
            history::Chain::open(view, tenant, cluster_time(view)?)?.push("drill", encode(record), &mut w);
            record_drill(view, tenant, record, &mut w)?
        }
        Command::RecordDrill { tenant, record } => record_drill(view, tenant, record, &mut w)?,
        Command::SetQuota { tenant, quota } => {
            match quota {
                Some(q) => w.push(Write::Put(quota_key(tenant), encode(q))),
                None => w.push(Write::Delete(quota_key(tenant))),
            }
            Outcome::Done
        }
        Command::Revoke { revocation } => match hex::decode(&revocation.serial) {
            Ok(serial) if !serial.is_empty() && serial.len() <= 20 => {
                let key = revocation_key(&serial);
                if view.get(&key)?.is_none() {
                    w.push(Write::Put(key, encode(revocation)));
                }
                Outcome::Done
            }
            _ => Outcome::Refused(format!("{:?} is not a certificate serial number", revocation.serial)),
        },
    };
    Ok((outcome, w))
}

/// Keeps a drill's result: its record, and the source's newest and last passing drill.
fn record_drill(
    view: &dyn CatalogRead,
    tenant: &str,
    record: &DrillRecord,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let seq = next_counter(view, SEQ_KEY, w)?;
    w.push(Write::Put(drill_key(tenant, &record.source, record.recorded, seq), encode(record)));
    let latest_key = drill_latest_key(tenant, &record.source);
    let before: Option<DrillLatest> = view.get(&latest_key)?.map(|v| decode(&v)).transpose()?;
    let last_success =
        if record.verdict == "PASS" { Some(record.started) } else { before.and_then(|b| b.last_success) };
    w.push(Write::Put(latest_key, encode(&DrillLatest { last: record.clone(), last_success })));
    Ok(Outcome::Done)
}

fn commit(
    view: &dyn CatalogRead,
    tenant: &str,
    snapshot: &SnapshotInfo,
    batches: u32,
    proposed_now: Option<i64>,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    if let Some(existing) = self::snapshot(view, tenant, &snapshot.id)? {
        return Ok(Outcome::Committed(existing));
    }
    let staged_prefix = batches_prefix(b'p', tenant, &snapshot.id);
    let staged: Vec<(Vec<u8>, Vec<ChunkId>)> = scan_decoded(view, &staged_prefix)?;
    let drop_staged = |w: &mut Vec<Write>, keys: &[Vec<u8>]| {
        w.extend(keys.iter().map(|k| Write::Delete(k.clone())));
    };
    let staged_keys: Vec<Vec<u8>> = staged.iter().map(|(k, _)| k.clone()).collect();
    for b in 0..batches {
        if !staged.iter().any(|(k, _)| k == &batch_key(b'p', tenant, &snapshot.id, b)) {
            drop_staged(w, &staged_keys);
            return Ok(Outcome::Refused(format!(
                "reference batch {b} of snapshot {} never reached the cluster; commit again",
                snapshot.id
            )));
        }
    }
    // Staged batches arrive sorted and usually in one ascending order: merging them is a
    // linear check, not a sort of the whole list on the consensus thread (`sorted_ids`).
    let mut refs = sorted_ids::union_of_batches(staged.into_iter().map(|(_, ids)| ids).collect());
    if let Err(at) = refs.binary_search(&snapshot.root) {
        refs.insert(at, snapshot.root);
    }
    gc::add_bases(view, tenant, &mut refs)?;
    let mut absent = Vec::new();
    let mut stored_bytes = 0u64;
    for part in refs.chunks(4096) {
        let keys: Vec<Vec<u8>> = part.iter().map(|id| chunk_key(tenant, id)).collect();
        for (id, v) in part.iter().zip(view.get_many(&keys)?) {
            match v {
                Some(v) => stored_bytes += u64::from(decode::<IndexEntry>(&v)?.envelope_len),
                None => absent.push(*id),
            }
        }
    }
    // Staged references are dropped either way: a retried commit stages them again.
    drop_staged(w, &staged_keys);
    // Condemned chunks still have all their copies: the commit puts them back in the index.
    let mut back = Vec::new();
    let (mut missing, back_bytes, back_count) = gc::resurrect(view, tenant, &absent, &mut back)?;
    if !missing.is_empty() {
        missing.truncate(MAX_MISSING_REPORTED);
        return Ok(Outcome::Missing(missing));
    }
    w.extend(back);
    stored_bytes += back_bytes;
    if back_bytes > 0 {
        let used = usage(view, tenant)? + back_bytes;
        w.push(Write::Put(usage_key(tenant), used.to_be_bytes().to_vec()));
    }
    let seq = next_counter(view, SEQ_KEY, w)?;
    let snap = SnapshotInfo { stored_bytes, chunks: refs.len() as u64, commit_seq: seq, ..snapshot.clone() };
    let loc = location(&snap);
    w.push(Write::Put(snapshot_key(tenant, &loc, &snap.id), encode(&snap)));
    w.push(Write::Put(id_key(tenant, &snap.id), loc));
    refs::put_whole(tenant, &snap.id, &refs, w);
    // Cluster time never goes back. A `Commit` from before commit times were kept records
    // none and applies retention as it did.
    let (clock, now) = match proposed_now {
        Some(t) => {
            let now = t.max(cluster_time(view)?);
            w.push(Write::Put(CLOCK_KEY.to_vec(), now.to_be_bytes().to_vec()));
            w.push(Write::Put(commit_time_key(tenant, &snap.id), now.to_be_bytes().to_vec()));
            (RetentionClock::Cluster(now), now)
        }
        None => (RetentionClock::Agent, snap.time),
    };
    let gone = match retention(view, tenant, &snap.source)? {
        Some(policy) => apply_retention(view, tenant, &snap.source, &policy, Some((&snap, now)), clock, w)?,
        None => Vec::new(),
    };
    if proposed_now.is_some() {
        let mut chain = history::Chain::open(view, tenant, now)?;
        chain.push("commit", encode(&snap), w);
        for id in &gone {
            chain.push("forget", id.as_bytes().to_vec(), w);
        }
    }
    let forgotten = gone.len() as u64;
    let mut info = tenant_info(view, tenant)?;
    info.snapshots = (info.snapshots + 1).saturating_sub(forgotten);
    bump_all(view, w, (back_count, 0), (1, forgotten))?;
    info.last_snapshot_time = info.last_snapshot_time.max(snap.time);
    w.push(Write::Put(tenant_key(b't', tenant), encode(&info)));
    Ok(Outcome::Committed(snap))
}

/// Chains an administrator's change that took effect (or was recorded as a request): the
/// command as applied is the event's payload.
fn chain_change(
    view: &dyn CatalogRead,
    tenant: &str,
    now: i64,
    kind: &str,
    cmd: &Command,
    out: &Outcome,
    w: &mut Vec<Write>,
) -> Result<(), CatalogError> {
    if matches!(out, Outcome::Done | Outcome::LockPending(_)) {
        history::Chain::open(view, tenant, now)?.push(kind, encode(cmd), w);
    }
    Ok(())
}

/// `SetRetention` (version 1: on agent times) and `SetRetentionV2` (on cluster time).
fn set_retention(
    view: &dyn CatalogRead,
    tenant: &str,
    source: &str,
    policy: &RetentionPolicy,
    by_admin: bool,
    version: u8,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let current = retention(view, tenant, source)?;
    Ok(if policy.validate().is_err() {
        Outcome::Refused("a retention policy must keep something (a keep-* above 0)".into())
    } else if let Some(cur) = current.filter(|c| !by_admin && !policy.keeps_at_least(c)) {
        Outcome::Refused(format!(
            "retention of {source} is \"{}\"; an agent may lengthen it but not shorten it to \"{}\" \
             (an administrator can: exclave-replicator retention set)",
            cur.describe(),
            policy.describe()
        ))
    } else {
        let mut changes = vec![Write::Put(retention_key(tenant, source), encode(policy))];
        let clock = match version {
            1 => RetentionClock::Agent,
            _ => RetentionClock::Cluster(cluster_time(view)?),
        };
        let gone = apply_retention(view, tenant, source, policy, None, clock, &mut changes)?;
        let forgotten = gone.len() as u64;
        if let RetentionClock::Cluster(now) = clock {
            let mut chain = history::Chain::open(view, tenant, now)?;
            chain.push("retention", encode(&(source, policy, by_admin)), &mut changes);
            for id in &gone {
                chain.push("forget", id.as_bytes().to_vec(), &mut changes);
            }
        }
        // Without a policy in force the cluster keeps everything; an agent's first
        // policy may not forget what is already stored (a stolen agent certificate
        // must not erase history), only govern what comes next.
        if current.is_none() && !by_admin && forgotten > 0 {
            return Ok(Outcome::Refused(format!(
                "a first retention policy \"{}\" for {source} would forget {forgotten} snapshot(s) already \
                 stored; an administrator must set it (exclave-replicator retention set)",
                policy.describe()
            )));
        }
        w.extend(changes);
        if forgotten > 0 {
            let mut info = tenant_info(view, tenant)?;
            info.snapshots = info.snapshots.saturating_sub(forgotten);
            bump(view, w, 0, 0, forgotten)?;
            w.push(Write::Put(tenant_key(b't', tenant), encode(&info)));
        }
        Outcome::Done
    })
}

fn tenant_info(view: &dyn CatalogRead, tenant: &str) -> Result<TenantInfo, CatalogError> {
    Ok(match view.get(&tenant_key(b't', tenant))? {
        Some(v) => decode(&v)?,
        None => TenantInfo::default(),
    })
}

// ---- Reads over the applied state ----

pub fn index_entry(view: &dyn CatalogRead, tenant: &str, id: &ChunkId) -> Result<Option<IndexEntry>, CatalogError> {
    view.get(&chunk_key(tenant, id))?.map(|v| decode(&v)).transpose()
}

/// Which of `ids` are not in the index.
pub fn missing(view: &dyn CatalogRead, tenant: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, CatalogError> {
    let keys: Vec<Vec<u8>> = ids.iter().map(|id| chunk_key(tenant, id)).collect();
    Ok(ids.iter().zip(view.get_many(&keys)?).filter(|(_, v)| v.is_none()).map(|(id, _)| *id).collect())
}

pub fn snapshot(view: &dyn CatalogRead, tenant: &str, snapshot_id: &str) -> Result<Option<SnapshotInfo>, CatalogError> {
    let Some(loc) = view.get(&id_key(tenant, snapshot_id))? else { return Ok(None) };
    view.get(&snapshot_key(tenant, &loc, snapshot_id))?.map(|v| decode(&v)).transpose()
}

/// Snapshots of a tenant (optionally one source), oldest first.
pub fn snapshots(
    view: &dyn CatalogRead,
    tenant: &str,
    source: Option<&str>,
) -> Result<Vec<SnapshotInfo>, CatalogError> {
    let mut prefix = tenant_key(b's', tenant);
    if let Some(s) = source {
        prefix.extend_from_slice(s.as_bytes());
        prefix.push(0);
    }
    let mut out: Vec<SnapshotInfo> = scan_decoded(view, &prefix)?.into_iter().map(|(_, s)| s).collect();
    out.sort_by_key(|s: &SnapshotInfo| (s.time, s.commit_seq));
    Ok(out)
}

/// The snapshots of `tenant` whose references include `id`, by id (a walk over every
/// snapshot's chain: for reporting a lost chunk, not for any hot path).
pub fn snapshots_referencing(view: &dyn CatalogRead, tenant: &str, id: &ChunkId) -> Result<Vec<String>, CatalogError> {
    let mut found = Vec::new();
    for s in snapshots(view, tenant, None)? {
        if refs::references_chunk(view, tenant, &s.id, id)? {
            found.push(s.id);
        }
    }
    found.sort();
    Ok(found)
}

/// Prefix of the revocation keys.
pub const REVOCATION_PREFIX: &[u8] = b"v";

fn revocation_key(serial: &[u8]) -> Vec<u8> {
    let mut k = REVOCATION_PREFIX.to_vec();
    k.extend_from_slice(serial);
    k
}

/// Every revocation in force, by serial.
pub fn revocations(view: &dyn CatalogRead) -> Result<Vec<Revocation>, CatalogError> {
    Ok(scan_decoded::<Revocation>(view, REVOCATION_PREFIX)?.into_iter().map(|(_, r)| r).collect())
}

pub fn members(view: &dyn CatalogRead) -> Result<Vec<(u64, Member)>, CatalogError> {
    scan_decoded::<Member>(view, b"n")?
        .into_iter()
        .map(|(k, m)| {
            let id = k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            id.map(|id| (id, m)).ok_or_else(|| CatalogError::Decode("member key".into()))
        })
        .collect()
}

/// Every value under `prefix`, decoded, with its key, in key order.
fn scan_decoded<T: for<'de> Deserialize<'de>>(
    view: &dyn CatalogRead,
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, T)>, CatalogError> {
    let mut out = Vec::new();
    let mut bad = None;
    view.scan(prefix, &mut |k, v| match decode(v) {
        Ok(t) => {
            out.push((k.to_vec(), t));
            true
        }
        Err(e) => {
            bad = Some(e);
            false
        }
    })?;
    bad.map_or(Ok(out), Err)
}

/// Counts keys under a prefix (chunks: `CHUNK_PREFIX`; snapshots: `b"i"`).
pub fn count(view: &dyn CatalogRead, prefix: &[u8]) -> Result<u64, CatalogError> {
    let mut n = 0u64;
    view.scan(prefix, &mut |_, _| {
        n += 1;
        true
    })?;
    Ok(n)
}

/// Prefix of the snapshot lookup keys, for counting snapshots.
pub const SNAPSHOT_ID_PREFIX: &[u8] = b"i";

/// The Raft id of a node name: stable, so every node derives the same id from the same name.
pub fn raft_id(name: &str) -> u64 {
    let h = blake3::derive_key("exclave 2026-11 raft node id", name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    // Non-zero (0 means "none" in Raft) and below 2^63 so it prints the same signed or not.
    (u64::from_be_bytes(b) >> 1).max(1)
}

/// An ordered in-memory catalog: tests, and the model the RocksDB catalog must agree with.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemCatalog(pub std::collections::BTreeMap<Vec<u8>, Vec<u8>>);

#[cfg(test)]
impl MemCatalog {
    pub fn write(&mut self, writes: Vec<Write>) {
        for w in writes {
            match w {
                Write::Put(k, v) => {
                    self.0.insert(k, v);
                }
                Write::Delete(k) => {
                    self.0.remove(&k);
                }
                Write::DropChunk { .. } => {}
            }
        }
    }

    /// Applies and writes; returns the outcome.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, CatalogError> {
        let (outcome, writes) = apply(self, cmd)?;
        self.write(writes);
        Ok(outcome)
    }
}

impl CatalogRead for MemCatalog {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CatalogError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan_from(
        &self,
        prefix: &[u8],
        start: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), CatalogError> {
        for (k, v) in self.0.range(start.max(prefix).to_vec()..) {
            if !k.starts_with(prefix) || !f(k, v) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::protocol::LockMode;
    use proptest::prelude::*;

    pub(super) fn entry(n: u8) -> IndexEntry {
        IndexEntry { envelope_len: 100 + u32::from(n), checksum: Checksum([n; 32]) }
    }

    pub(super) fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    pub(super) fn snap(sid: &str, root: u8, time: i64) -> SnapshotInfo {
        SnapshotInfo {
            id: sid.into(),
            source: "rnpp".into(),
            time,
            root: id(root),
            key_fingerprint: "f".into(),
            agent: "a".into(),
            hostname: "h".into(),
            files: 1,
            logical_bytes: 1,
            chunks: 0,
            stored_bytes: 0,
            commit_seq: 0,
        }
    }

    fn index(c: &mut MemCatalog, tenant: &str, ns: &[u8]) {
        let chunks = ns.iter().map(|n| (id(*n), entry(*n))).collect();
        assert_eq!(c.apply(&Command::IndexChunks { tenant: tenant.into(), chunks }).unwrap(), Outcome::Done);
    }

    /// Commits `s` as an honest agent would: the node's clock agrees with the agent's time.
    fn stage_and_commit(c: &mut MemCatalog, tenant: &str, s: &SnapshotInfo, refs: &[u8]) -> Outcome {
        commit_at(c, tenant, s, refs, s.time)
    }

    /// Commits `s` on a node whose clock reads `now` (whatever time the agent claims).
    fn commit_at(c: &mut MemCatalog, tenant: &str, s: &SnapshotInfo, refs: &[u8], now: i64) -> Outcome {
        let ids = refs.iter().map(|n| id(*n)).collect();
        let stage = Command::StageRefs { tenant: tenant.into(), snapshot_id: s.id.clone(), batch: 0, ids };
        assert_eq!(c.apply(&stage).unwrap(), Outcome::Done);
        c.apply(&Command::CommitV2 { tenant: tenant.into(), snapshot: s.clone(), batches: 1, now }).unwrap()
    }

    fn protect(c: &mut MemCatalog, tenant: &str, days: u32) {
        let cmd = Command::SetProtection { tenant: tenant.into(), protection: Protection { days } };
        assert_eq!(c.apply(&cmd).unwrap(), Outcome::Done);
    }

    #[test]
    fn retention_is_applied_by_the_catalog_and_agents_can_only_lengthen_it() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        protect(&mut c, "lux", 0); // the window has its own test

        let day = 86400;
        for d in 0..5 {
            let s = snap(&format!("d{d}"), 1, 1_795_000_000 + d * day);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        // WAL archived over the same days, under SOURCE.wal.
        for d in 0..5 {
            let w =
                SnapshotInfo { source: "rnpp.wal".into(), ..snap(&format!("w{d}"), 1, 1_795_000_000 + d * day + 60) };
            assert!(matches!(stage_and_commit(&mut c, "lux", &w, &[2]), Outcome::Committed(_)));
        }
        let ids = |c: &MemCatalog, src: &str| -> Vec<String> {
            snapshots(c, "lux", Some(src)).unwrap().into_iter().map(|s| s.id).collect()
        };
        let set = |c: &mut MemCatalog, keep_last: u32, by_admin: bool| {
            let policy = RetentionPolicy { keep_last, ..Default::default() };
            c.apply(&Command::SetRetentionV2 { tenant: "lux".into(), source: "rnpp".into(), policy, by_admin }).unwrap()
        };
        let Outcome::Refused(why) = set(&mut c, 3, false) else { panic!("history erased by an agent") };
        assert!(why.contains("would forget 4 snapshot(s) already stored"), "{why}"); // 2 bases, 2 WAL
        assert_eq!(ids(&c, "rnpp").len(), 5);
        assert_eq!(set(&mut c, 3, true), Outcome::Done);
        assert_eq!(ids(&c, "rnpp"), ["d2", "d3", "d4"]);
        // WAL older than the oldest kept base backup (d2), less the margin, is pruned.
        assert_eq!(ids(&c, "rnpp.wal"), ["w2", "w3", "w4"]);
        assert!(c.0.keys().all(|k| !(k[0] == b'r' && k.windows(2).any(|w| w == b"d0"))), "references dropped");
        // A new commit applies the policy in the same step.
        let s = snap("d5", 1, 1_795_000_000 + 5 * day);
        let Outcome::Committed(_) = stage_and_commit(&mut c, "lux", &s, &[2]) else { panic!() };
        assert_eq!(ids(&c, "rnpp"), ["d3", "d4", "d5"]);
        assert_eq!(tenant_info(&c, "lux").unwrap().snapshots, 3 + 2, "w2 went with d2");
        // An agent cannot shorten it; an administrator can.
        let Outcome::Refused(why) = set(&mut c, 1, false) else { panic!("shortened by an agent") };
        assert!(why.contains("may lengthen it but not shorten it"), "{why}");
        assert_eq!(ids(&c, "rnpp").len(), 3);
        assert_eq!(set(&mut c, 5, false), Outcome::Done);
        assert_eq!(set(&mut c, 1, true), Outcome::Done);
        assert_eq!(ids(&c, "rnpp"), ["d5"]);
        assert!(matches!(set(&mut c, 0, true), Outcome::Refused(_)), "an empty policy would forget everything");
    }

    const DAY: i64 = 86_400;
    const T0: i64 = 1_795_000_000;

    #[test]
    fn streamed_versions_another_file_holds_in_full_go_once_outside_the_window() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        protect(&mut c, "lux", 1);
        let (day, t0) = (86400, 1_795_000_000);
        let Outcome::Committed(_) = stage_and_commit(&mut c, "lux", &snap("d0", 1, t0), &[2]) else { panic!() };
        let (a, b) = ("00000001000000000000000A", "00000001000000000000000B");
        let wal_id = |name: &str| exclave::wal::snapshot_id("rnpp", name).unwrap();
        let names = [
            exclave::wal::streamed_name(a, 0x1000),
            exclave::wal::streamed_name(a, 0x8000),
            a.to_string(),
            exclave::wal::streamed_name(b, 0x2000),
            exclave::wal::streamed_name(b, 0x9000),
            exclave::wal::streamed_name(b, 0x3000),
        ];
        for (i, n) in names.iter().enumerate() {
            let w = SnapshotInfo { source: "rnpp.wal".into(), ..snap(&wal_id(n), 1, t0 + 60 + i as i64) };
            let Outcome::Committed(_) = stage_and_commit(&mut c, "lux", &w, &[2]) else { panic!("{n}") };
        }
        let hold = Command::SetHold {
            tenant: "lux".into(),
            target: exclave::protocol::HoldTarget::Snapshot(wal_id(&names[3])),
            release: false,
            by: "admin#01".into(),
            reason: "case 7".into(),
            now: t0 + 120,
        };
        assert!(matches!(c.apply(&hold).unwrap(), Outcome::Done));
        let all: std::collections::BTreeSet<String> = names.iter().map(|n| wal_id(n)).collect();
        admin_policy(&mut c, RetentionPolicy { keep_last: 10, ..Default::default() });
        // Within the protection window nothing goes.
        let Outcome::Committed(_) = commit_at(&mut c, "lux", &snap("d1", 1, t0 + 3600), &[2], t0 + 3600) else {
            panic!()
        };
        assert_eq!(kept(&c, "rnpp.wal"), all);
        // Past it, in a catalog of an older layout (some node may not know the rule): kept.
        let Outcome::Committed(_) = commit_at(&mut c, "lux", &snap("d2", 1, t0 + 2 * day), &[2], t0 + 2 * day) else {
            panic!()
        };
        assert_eq!(kept(&c, "rnpp.wal"), all);
        // Once the upgrade is finalised: the versions the complete segment or a longer version
        // holds, not the held one.
        assert_eq!(c.apply(&Command::SetLayout { layout: LAYOUT }).unwrap(), Outcome::Done);
        let Outcome::Committed(_) = commit_at(&mut c, "lux", &snap("d3", 1, t0 + 3 * day), &[2], t0 + 3 * day) else {
            panic!()
        };
        let left: std::collections::BTreeSet<String> =
            [&names[2], &names[3], &names[4]].iter().map(|n| wal_id(n)).collect();
        assert_eq!(kept(&c, "rnpp.wal"), left, "a's complete segment, b's longest version and the held one");
        let left_names: Vec<String> =
            left.iter().filter_map(|id| exclave::wal::file_name(id).map(str::to_string)).collect();
        let serving = exclave::wal::serving(&left_names);
        assert_eq!(serving[&b.to_ascii_lowercase()], names[4].to_ascii_lowercase(), "b served by its longest version");
        assert_eq!(serving[&a.to_ascii_lowercase()], a.to_ascii_lowercase());
    }

    /// The ids of a tenant's snapshots of `source`.
    fn kept(c: &MemCatalog, source: &str) -> std::collections::BTreeSet<String> {
        snapshots(c, "lux", Some(source)).unwrap().into_iter().map(|s| s.id).collect()
    }

    fn admin_policy(c: &mut MemCatalog, policy: RetentionPolicy) {
        let cmd = Command::SetRetentionV2 { tenant: "lux".into(), source: "rnpp".into(), policy, by_admin: true };
        assert_eq!(c.apply(&cmd).unwrap(), Outcome::Done);
    }

    #[test]
    fn an_agent_flooding_commits_with_any_times_forgets_nothing_promised() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        admin_policy(&mut c, RetentionPolicy { keep_last: 3, keep_daily: 7, ..Default::default() });
        // A month of honest daily backups, committed when they were taken.
        for d in 0..30 {
            let s = snap(&format!("d{d:02}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        let honest: Vec<String> = (16..30).map(|d| format!("d{d:02}")).collect();
        assert_eq!(kept(&c, "rnpp"), honest.iter().cloned().collect(), "14 days of window, 7 daily inside it");
        // A stolen agent certificate: 300 commits within a few minutes, claiming times from
        // the far past to the far future.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let now = T0 + 29 * DAY + 600;
        for i in 0..300 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let claimed = match i % 4 {
                0 => i64::MIN + i,
                1 => i64::MAX - i,
                _ => (rng as i64) / 2,
            };
            let s = snap(&format!("junk{i:03}"), 1, claimed);
            assert!(matches!(commit_at(&mut c, "lux", &s, &[2], now + i), Outcome::Committed(_)));
        }
        let after = kept(&c, "rnpp");
        for h in &honest {
            assert!(after.contains(h), "{h} forgotten by a flood of agent commits");
        }
        assert_eq!(after.len(), 14 + 300);
        // Cluster time goes on with honest daily backups and no more junk: the calendar slots
        // the flood fell in are today's only. Once its window has passed, the flood is gone
        // and the policy keeps what it promises on cluster time.
        for d in 30..60 {
            let s = snap(&format!("d{d:02}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
            let now = T0 + d * DAY;
            let left = kept(&c, "rnpp");
            for k in 0..14 {
                let want = format!("d{:02}", d - k);
                assert!(left.contains(&want), "day {d}: {want}, inside the window, forgotten");
            }
            assert_eq!(cluster_time(&c).unwrap(), now);
        }
        let end = kept(&c, "rnpp");
        assert!(end.iter().all(|id| id.starts_with('d')), "the flood outlived its window: {end:?}");
        assert_eq!(end.len(), 14, "{end:?}");

        // The same flood on agent times (as `Commit` applied before commit times were kept)
        // erases the month: the test above would fail there.
        let mut old = MemCatalog::default();
        index(&mut old, "lux", &[1, 2]);
        admin_policy(&mut old, RetentionPolicy { keep_last: 3, keep_daily: 7, ..Default::default() });
        for d in 0..30 {
            let s = snap(&format!("d{d:02}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut old, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        for i in 0..20 {
            let s = snap(&format!("junk{i:03}"), 1, T0 + (100 + i) * DAY);
            let stage =
                Command::StageRefs { tenant: "lux".into(), snapshot_id: s.id.clone(), batch: 0, ids: vec![id(2)] };
            old.apply(&stage).unwrap();
            old.apply(&Command::Commit { tenant: "lux".into(), snapshot: s, batches: 1 }).unwrap();
        }
        assert!(kept(&old, "rnpp").iter().all(|id| id.starts_with("junk")), "agent times decide there");
    }

    #[test]
    fn extreme_agent_times_neither_overflow_nor_prune_wal() {
        for legacy in [true, false] {
            let mut c = MemCatalog::default();
            index(&mut c, "lux", &[1, 2]);
            admin_policy(&mut c, RetentionPolicy { keep_last: 1, ..Default::default() });
            let wal = SnapshotInfo { source: "rnpp.wal".into(), ..snap("w1", 1, T0) };
            assert!(matches!(stage_and_commit(&mut c, "lux", &wal, &[2]), Outcome::Committed(_)));
            for (i, t) in [i64::MIN, i64::MIN + 1, i64::MAX].into_iter().enumerate() {
                let s = snap(&format!("b{i}"), 1, t);
                let stage =
                    Command::StageRefs { tenant: "lux".into(), snapshot_id: s.id.clone(), batch: 0, ids: vec![id(2)] };
                c.apply(&stage).unwrap();
                let cmd = if legacy {
                    Command::Commit { tenant: "lux".into(), snapshot: s, batches: 1 }
                } else {
                    Command::CommitV2 { tenant: "lux".into(), snapshot: s, batches: 1, now: T0 + 60 }
                };
                assert!(matches!(c.apply(&cmd).unwrap(), Outcome::Committed(_)));
            }
            if !legacy {
                assert!(kept(&c, "rnpp.wal").contains("w1"), "WAL inside the window pruned");
                assert_eq!(kept(&c, "rnpp").len(), 3, "all inside the window");
            }
        }
    }

    proptest! {
        /// Whatever times an agent claims, the cluster keeps the same snapshots: retention reads
        /// only commit times. After every commit, nothing inside the window is forgotten, and
        /// what the policy selects over the whole history (on commit times) is still there.
        #[test]
        fn agent_times_never_decide_and_the_window_holds(
            steps in prop::collection::vec((0i64..3 * DAY, any::<i64>(), any::<i64>()), 1..40),
            keep_last in 1u32..4, keep_daily in 0u32..3, days in 0u32..3,
        ) {
            let policy = RetentionPolicy { keep_last, keep_daily, ..Default::default() };
            let run = |claimed: &dyn Fn(usize) -> i64| {
                let mut c = MemCatalog::default();
                index(&mut c, "lux", &[1, 2]);
                protect(&mut c, "lux", days);
                admin_policy(&mut c, policy);
                let mut now = T0;
                let mut history = Vec::new();
                for (i, (step, ..)) in steps.iter().enumerate() {
                    now += step;
                    let s = snap(&format!("s{i:03}"), 1, claimed(i));
                    let Outcome::Committed(done) = commit_at(&mut c, "lux", &s, &[2], now) else { panic!("refused") };
                    history.push(Candidate { id: done.id.clone(), time: now, commit_seq: done.commit_seq });
                    let left = kept(&c, "rnpp");
                    let floor = now - i64::from(days) * DAY;
                    for h in history.iter().filter(|h| h.time > floor) {
                        assert!(left.contains(&h.id), "{} inside the window forgotten", h.id);
                    }
                    let forgotten = policy.forget(&history);
                    for h in history.iter().filter(|h| !forgotten.contains(&h.id)) {
                        assert!(left.contains(&h.id), "{} selected by the policy forgotten", h.id);
                    }
                }
                kept(&c, "rnpp")
            };
            let a = run(&|i| steps[i].1);
            let b = run(&|i| steps[i].2);
            prop_assert_eq!(a, b);
        }
    }

    fn set_lock(
        c: &mut MemCatalog,
        source: Option<&str>,
        lock: Option<(LockMode, u32)>,
        by: &str,
        now: i64,
    ) -> Outcome {
        let cmd =
            Command::SetLock { tenant: "lux".into(), source: source.map(str::to_string), lock, by: by.into(), now };
        c.apply(&cmd).unwrap()
    }

    #[test]
    fn compliance_locks_only_lengthen_and_governance_needs_a_second_administrator() {
        use exclave::protocol::LockMode::{Compliance, Governance};
        let mut c = MemCatalog::default();
        let (a, b) = ("admin#01", "admin#02");
        assert_eq!(set_lock(&mut c, None, Some((Compliance, 30)), a, T0), Outcome::Done);
        for (wanted, who) in [(Some((Compliance, 29)), a), (Some((Governance, 30)), b), (None, b)] {
            let Outcome::Refused(why) = set_lock(&mut c, None, wanted, who, T0) else { panic!("{wanted:?} accepted") };
            assert!(why.contains("nobody can shorten"), "{why}");
        }
        assert_eq!(set_lock(&mut c, None, Some((Compliance, 60)), a, T0), Outcome::Done, "lengthened by one");
        assert_eq!(locks::lock(&c, "lux", None).unwrap().unwrap().days, 60);

        // Governance on one source: lengthening is immediate, shortening waits for another admin.
        assert_eq!(set_lock(&mut c, Some("rnpp"), Some((Governance, 10)), a, T0), Outcome::Done);
        assert_eq!(set_lock(&mut c, Some("rnpp"), Some((Governance, 20)), a, T0), Outcome::Done);
        let Outcome::LockPending(req) = set_lock(&mut c, Some("rnpp"), None, a, T0) else { panic!("removed at once") };
        assert_eq!(locks::lock(&c, "lux", Some("rnpp")).unwrap().unwrap().days, 20, "still in force");
        assert_eq!(locks::pending(&c, "lux").unwrap(), vec![req.clone()]);
        let approve = |c: &mut MemCatalog, id: u64, by: &str, now: i64| {
            c.apply(&Command::ApproveLock { id, by: by.into(), now }).unwrap()
        };
        let Outcome::Refused(why) = approve(&mut c, req.id, a, T0 + 60) else { panic!("self-approved") };
        assert!(why.contains("different administrator"), "{why}");
        let Outcome::Refused(why) = approve(&mut c, req.id, b, T0 + locks::APPROVAL_SECS + 1) else {
            panic!("approved late")
        };
        assert!(why.contains("expired"), "{why}");
        assert!(locks::pending(&c, "lux").unwrap().is_empty(), "an expired request is dropped");
        let Outcome::LockPending(req) = set_lock(&mut c, Some("rnpp"), Some((Governance, 5)), a, T0 + 100) else {
            panic!()
        };
        assert_eq!(approve(&mut c, req.id, b, T0 + 200), Outcome::Done);
        let l = locks::lock(&c, "lux", Some("rnpp")).unwrap().unwrap();
        assert_eq!((l.days, l.by.as_str()), (5, "admin#01 + admin#02"));
        assert!(matches!(approve(&mut c, req.id, b, T0 + 300), Outcome::Refused(_)), "approved twice");
        // A request made before the lock turned compliance is not applied after.
        let Outcome::LockPending(req) = set_lock(&mut c, Some("rnpp"), None, a, T0 + 400) else { panic!() };
        assert_eq!(set_lock(&mut c, Some("rnpp"), Some((Compliance, 5)), a, T0 + 500), Outcome::Done);
        assert!(matches!(approve(&mut c, req.id, b, T0 + 600), Outcome::Refused(_)));
        assert_eq!(locks::lock(&c, "lux", Some("rnpp")).unwrap().unwrap().mode, Compliance);
        assert!(matches!(set_lock(&mut c, Some("x"), Some((Governance, 0)), a, T0), Outcome::Refused(_)));
        assert!(matches!(set_lock(&mut c, Some("x"), None, a, T0), Outcome::Refused(_)), "nothing to remove");
    }

    #[test]
    fn locks_and_holds_keep_what_retention_and_forget_would_drop() {
        use exclave::protocol::{HoldTarget, LockMode::Governance};
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        protect(&mut c, "lux", 0);
        admin_policy(&mut c, RetentionPolicy { keep_last: 1, ..Default::default() });
        assert_eq!(set_lock(&mut c, Some("rnpp"), Some((Governance, 7)), "admin#01", T0), Outcome::Done);
        for d in 0..10 {
            let s = snap(&format!("d{d}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        let want: std::collections::BTreeSet<String> = (3..10).map(|d| format!("d{d}")).collect();
        assert_eq!(kept(&c, "rnpp"), want, "the lock's 7 days, whatever keep-last says");

        let hold = |c: &mut MemCatalog, target: HoldTarget, release: bool| {
            let cmd = Command::SetHold {
                tenant: "lux".into(),
                target,
                release,
                by: "admin#01".into(),
                reason: "case 7".into(),
                now: T0,
            };
            c.apply(&cmd).unwrap()
        };
        assert_eq!(hold(&mut c, HoldTarget::Snapshot("d3".into()), false), Outcome::Done);
        assert!(matches!(hold(&mut c, HoldTarget::Snapshot("nope".into()), false), Outcome::Refused(_)));
        let Outcome::Refused(why) =
            c.apply(&Command::Forget { tenant: "lux".into(), snapshot_id: "d3".into() }).unwrap()
        else {
            panic!("forgot a held snapshot")
        };
        assert!(why.contains("legal hold"), "{why}");
        for d in [10, 11] {
            let s = snap(&format!("d{d}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        assert!(kept(&c, "rnpp").contains("d3"), "held past its lock");
        assert!(!kept(&c, "rnpp").contains("d4"));
        // A hold on the source keeps all of it, its WAL too.
        assert_eq!(hold(&mut c, HoldTarget::Source("rnpp".into()), false), Outcome::Done);
        let wal = SnapshotInfo { source: "rnpp.wal".into(), ..snap("w1", 1, T0) };
        assert!(matches!(stage_and_commit(&mut c, "lux", &wal, &[2]), Outcome::Committed(_)));
        for d in 12..30 {
            let s = snap(&format!("d{d}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        assert_eq!(kept(&c, "rnpp").len(), 1 + 7 + 18, "d3, d5..d11, and all since the hold");
        assert!(kept(&c, "rnpp.wal").contains("w1"));
        let v = retention_view(&c, "lux").unwrap();
        assert_eq!((v.holds.len(), v.locks.len()), (2, 1));
        assert_eq!(hold(&mut c, HoldTarget::Source("rnpp".into()), true), Outcome::Done);
        assert_eq!(hold(&mut c, HoldTarget::Snapshot("d3".into()), true), Outcome::Done);
        assert!(matches!(hold(&mut c, HoldTarget::Snapshot("d3".into()), true), Outcome::Refused(_)));
        let s = snap("d30", 1, T0 + 30 * DAY);
        assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        let want: std::collections::BTreeSet<String> = (24..31).map(|d| format!("d{d}")).collect();
        assert_eq!(kept(&c, "rnpp"), want, "released: back to the lock's 7 days");
    }

    #[test]
    fn audit_records_are_kept_by_tenant_found_by_time_and_identity_and_pruned_after_ten_years() {
        use exclave::protocol::AuditRecord;
        let mut c = MemCatalog::default();
        let rec = |identity: &str, tenant: &str, ended: i64| AuditRecord {
            identity: identity.into(),
            tenant: tenant.into(),
            node: "n1".into(),
            started: ended - 5,
            ended,
            bytes: 10,
            ..Default::default()
        };
        for (who, tenant, t) in
            [("restore:lux#01", "lux", T0), ("admin#02", "lux", T0 + 10), ("restore:est#03", "est", T0 + 5)]
        {
            assert_eq!(c.apply(&Command::Audit { record: rec(who, tenant, t) }).unwrap(), Outcome::Done);
        }
        let lux = audit::records(&c, "lux", 0, None).unwrap();
        assert_eq!(lux.iter().map(|r| r.identity.as_str()).collect::<Vec<_>>(), ["restore:lux#01", "admin#02"]);
        assert_eq!(audit::records(&c, "lux", T0 + 1, None).unwrap().len(), 1);
        assert_eq!(audit::records(&c, "lux", 0, Some("restore")).unwrap().len(), 1);
        assert_eq!(audit::records(&c, "est", 0, None).unwrap().len(), 1);
        // Ten years of cluster time later, a new record of lux takes the old ones with it.
        let s = snap("later", 1, 0);
        index(&mut c, "lux", &[1]);
        let later = T0 + i64::from(audit::DEFAULT_KEEP_DAYS) * 86_400 + 20;
        assert!(matches!(commit_at(&mut c, "lux", &s, &[1], later), Outcome::Committed(_)));
        c.apply(&Command::Audit { record: rec("restore:lux#01", "lux", later) }).unwrap();
        let lux = audit::records(&c, "lux", 0, None).unwrap();
        assert_eq!(lux.iter().map(|r| r.ended).collect::<Vec<_>>(), [later]);
        assert_eq!(audit::records(&c, "est", 0, None).unwrap().len(), 1, "other tenants' on their own records");
    }

    #[test]
    fn audit_keeping_is_lengthened_by_one_admin_and_shortened_only_by_two() {
        use exclave::protocol::LockMode;
        let mut c = MemCatalog::default();
        let keep = |c: &mut MemCatalog, tenant: &str, days: u32, by: &str, now: i64| {
            c.apply(&Command::SetAuditKeep { tenant: tenant.into(), days, by: by.into(), now }).unwrap()
        };
        let days = |c: &MemCatalog| audit::keep(c, "lux").unwrap().days;
        assert_eq!(days(&c), audit::DEFAULT_KEEP_DAYS);
        // Out of bounds, or shorter than the data it is about: refused.
        assert!(matches!(keep(&mut c, "lux", 30, "admin#1", T0), Outcome::Refused(_)));
        assert!(matches!(keep(&mut c, "lux", 40_000, "admin#1", T0), Outcome::Refused(_)));
        let lock = Command::SetLock {
            tenant: "lux".into(),
            source: None,
            lock: Some((LockMode::Compliance, 2000)),
            by: "admin#1".into(),
            now: T0,
        };
        assert_eq!(c.apply(&lock).unwrap(), Outcome::Done);
        match keep(&mut c, "lux", 1000, "admin#1", T0) {
            Outcome::Refused(m) => assert!(m.contains("2000 days"), "{m}"),
            other => panic!("kept shorter than a lock: {other:?}"),
        }
        // Lengthening: at once, by one.
        assert_eq!(keep(&mut c, "lux", 5000, "admin#1", T0), Outcome::Done);
        assert_eq!(days(&c), 5000);
        // Shortening: recorded; the same admin again is refused; a second one applies it.
        assert_eq!(keep(&mut c, "lux", 2500, "admin#1", T0 + 10), Outcome::Done);
        assert_eq!(days(&c), 5000, "one administrator alone shortened it");
        assert_eq!(audit::keep(&c, "lux").unwrap().pending.map(|p| (p.days, p.by)), Some((2500, "admin#1".into())));
        assert!(matches!(keep(&mut c, "lux", 2500, "admin#1", T0 + 20), Outcome::Refused(_)));
        assert_eq!(days(&c), 5000);
        // Other days, or too late, start a new request instead of approving.
        assert_eq!(keep(&mut c, "lux", 2400, "admin#2", T0 + 30), Outcome::Done);
        assert_eq!(days(&c), 5000);
        let late = T0 + 30 + locks::APPROVAL_SECS + 1;
        assert_eq!(keep(&mut c, "lux", 2400, "admin#1", late), Outcome::Done);
        assert_eq!(days(&c), 5000, "an expired request was approved");
        assert_eq!(keep(&mut c, "lux", 2400, "admin#2", late + 5), Outcome::Done);
        let now = audit::keep(&c, "lux").unwrap();
        assert_eq!((now.days, now.set.map(|s| s.0), now.pending), (2400, Some("admin#1 + admin#2".into()), None));
        // Other tenants keep their own time; every change is on the tenant's chain.
        assert_eq!(audit::keep(&c, "est").unwrap().days, audit::DEFAULT_KEEP_DAYS);
        let kinds: Vec<String> = history::all(&c, "lux").unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds.iter().filter(|k| *k == "audit-keep").count(), 5, "{kinds:?}");
        // Records older than the time set go with the next record.
        let rec = |ended: i64| exclave::protocol::AuditRecord {
            identity: "admin#1".into(),
            tenant: "lux".into(),
            ended,
            ..Default::default()
        };
        c.apply(&Command::Audit { record: rec(T0) }).unwrap();
        let s = snap("later", 1, 0);
        index(&mut c, "lux", &[1]);
        let later = T0 + 2400 * 86_400 + 60;
        assert!(matches!(commit_at(&mut c, "lux", &s, &[1], later), Outcome::Committed(_)));
        c.apply(&Command::Audit { record: rec(later) }).unwrap();
        assert_eq!(audit::records(&c, "lux", 0, None).unwrap().iter().map(|r| r.ended).collect::<Vec<_>>(), [later]);
    }

    #[test]
    fn commits_forgets_and_changes_are_chained_in_order() {
        use exclave::protocol::LockMode::Governance;
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        protect(&mut c, "lux", 0);
        admin_policy(&mut c, RetentionPolicy { keep_last: 1, ..Default::default() });
        for d in 0..3 {
            let s = snap(&format!("d{d}"), 1, T0 + d * DAY);
            assert!(matches!(stage_and_commit(&mut c, "lux", &s, &[2]), Outcome::Committed(_)));
        }
        assert_eq!(set_lock(&mut c, None, Some((Governance, 3)), "admin#01", T0 + 3 * DAY), Outcome::Done);
        let events = history::all(&c, "lux").unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["protect", "retention", "commit", "commit", "forget", "commit", "forget", "lock"]);
        let mut prev = [0u8; 32];
        for (i, e) in events.iter().enumerate() {
            assert_eq!((e.seq, e.prev), (i as u64 + 1, prev));
            prev = e.hash();
        }
        assert_eq!(history::head(&c, "lux").unwrap(), exclave::protocol::HistoryHead { seq: 8, hash: prev });
        assert_eq!(events[4].payload, b"d0");
        let committed: SnapshotInfo = decode(&events[5].payload).unwrap();
        assert_eq!(Some(committed), snapshot(&c, "lux", "d2").unwrap(), "the commit event is the record as listed");
        assert_eq!(history::events(&c, "lux", 6).unwrap().len(), 2);
        assert!(history::all(&c, "est").unwrap().is_empty());
    }

    #[test]
    fn commit_requires_every_chunk_in_the_index_and_is_idempotent() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[9]);
        match stage_and_commit(&mut c, "lux", &snap("s1", 9, 10), &[1, 9, 1]) {
            Outcome::Missing(m) => assert_eq!(m, vec![id(1)]),
            other => panic!("expected missing, got {other:?}"),
        }
        assert!(snapshots(&c, "lux", None).unwrap().is_empty());
        assert!(c.0.keys().all(|k| k[0] != b'p'), "a refused commit leaves no staged references");
        index(&mut c, "lux", &[1]);
        let Outcome::Committed(first) = stage_and_commit(&mut c, "lux", &snap("s1", 9, 10), &[1, 9, 1]) else {
            panic!("commit refused")
        };
        assert_eq!((first.chunks, first.stored_bytes, first.commit_seq), (2, 101 + 109, 1));
        // A retried commit returns the recorded snapshot, unchanged.
        assert_eq!(stage_and_commit(&mut c, "lux", &snap("s1", 9, 10), &[1, 9]), Outcome::Committed(first));
        let Outcome::Committed(second) = stage_and_commit(&mut c, "lux", &snap("s0", 9, 5), &[1]) else { panic!() };
        assert_eq!(second.commit_seq, 2);
        let list = snapshots(&c, "lux", Some("rnpp")).unwrap();
        assert_eq!(list.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), vec!["s0", "s1"]);
        assert!(snapshots(&c, "est", None).unwrap().is_empty());
        assert!(snapshots(&c, "lux", Some("rnp")).unwrap().is_empty(), "source prefix must not match");
        assert_eq!(missing(&c, "est", &[id(1)]).unwrap(), vec![id(1)], "the index is scoped by tenant");
        assert_eq!(count(&c, SNAPSHOT_ID_PREFIX).unwrap(), 2);
    }

    /// What a commit stored as the snapshot's references, batch after batch.
    fn stored_refs(c: &MemCatalog, tenant: &str, id: &str) -> Vec<ChunkId> {
        scan_decoded::<Vec<ChunkId>>(c, &batches_prefix(b'r', tenant, id))
            .unwrap()
            .into_iter()
            .flat_map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn staged_batches_in_any_order_are_stored_sorted_and_once() {
        // Ascending batches (today's agents and nodes), shuffled sorted batches (older agents)
        // and unsorted batches with duplicates (staged before nodes sorted them) all commit
        // to the same references.
        let all: Vec<u8> = (1..=60).collect();
        let ascending: Vec<Vec<u8>> = all.chunks(16).map(<[u8]>::to_vec).collect();
        let shuffled: Vec<Vec<u8>> = vec![all[40..].to_vec(), all[..20].to_vec(), all[20..40].to_vec()];
        let raw: Vec<Vec<u8>> = vec![
            all.iter().rev().step_by(2).copied().collect(),
            all.iter().copied().filter(|n| n % 2 == 1).chain([5, 5, 60]).collect(),
        ];
        let mut want: Vec<ChunkId> = all.iter().map(|n| id(*n)).collect();
        want.sort_unstable();
        for (name, batches) in [("ascending", ascending), ("shuffled", shuffled), ("raw", raw)] {
            let mut c = MemCatalog::default();
            index(&mut c, "lux", &all);
            for (b, ns) in batches.iter().enumerate() {
                let ids = ns.iter().map(|n| id(*n)).collect();
                let stage = Command::StageRefs { tenant: "lux".into(), snapshot_id: "s1".into(), batch: b as u32, ids };
                assert_eq!(c.apply(&stage).unwrap(), Outcome::Done);
            }
            let cmd = Command::CommitV2 {
                tenant: "lux".into(),
                snapshot: snap("s1", 7, 10),
                batches: batches.len() as u32,
                now: 10,
            };
            let Outcome::Committed(s) = c.apply(&cmd).unwrap() else { panic!("{name}: commit refused") };
            assert_eq!(s.chunks, 60, "{name}");
            assert_eq!(stored_refs(&c, "lux", "s1"), want, "{name}");
        }
    }

    #[test]
    fn the_index_pages_through_every_entry_of_every_tenant() {
        let mut c = MemCatalog::default();
        let ids = |t: u8| {
            (0..2500u32).map(move |n| {
                let mut b = [t; 32];
                b[..4].copy_from_slice(&n.to_be_bytes());
                ChunkId(b)
            })
        };
        for (tenant, t) in [("est", 1u8), ("lux", 2)] {
            let chunks: Vec<(ChunkId, IndexEntry)> = ids(t).map(|i| (i, entry(t))).collect();
            c.apply(&Command::IndexChunks { tenant: tenant.into(), chunks }).unwrap();
        }
        // Keys of other kinds on either side of the index are not part of it.
        let _ = stage_and_commit(&mut c, "lux", &snap("s1", 2, 1), &[7]);
        let mut seen = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        let mut pages = 0;
        loop {
            let (page, next) = index_page(&c, cursor.as_deref(), 2048).unwrap();
            assert!(page.len() <= 2048);
            pages += 1;
            seen.extend(page.into_iter().map(|(t, id, _)| (t, id)));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let mut want: Vec<(String, ChunkId)> =
            ids(1).map(|i| ("est".to_string(), i)).chain(ids(2).map(|i| ("lux".to_string(), i))).collect();
        want.sort();
        assert_eq!(seen.len(), 5000);
        assert_eq!(seen, want, "every entry once, in key order");
    }

    #[test]
    fn a_commit_whose_batches_never_arrived_is_refused() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1]);
        let out = c.apply(&Command::Commit { tenant: "lux".into(), snapshot: snap("s1", 1, 1), batches: 2 }).unwrap();
        assert!(matches!(out, Outcome::Refused(m) if m.contains("batch 0")));
    }

    #[test]
    fn index_entries_never_change_once_made() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1]);
        let other = IndexEntry { envelope_len: 1, checksum: Checksum([0; 32]) };
        c.apply(&Command::IndexChunks { tenant: "lux".into(), chunks: vec![(id(1), other)] }).unwrap();
        assert_eq!(index_entry(&c, "lux", &id(1)).unwrap(), Some(entry(1)));
    }

    #[test]
    fn forget_drops_the_snapshot_and_its_references() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        assert!(matches!(stage_and_commit(&mut c, "lux", &snap("s1", 2, 1), &[1]), Outcome::Committed(_)));
        c.apply(&Command::Forget { tenant: "lux".into(), snapshot_id: "s1".into() }).unwrap();
        assert!(snapshot(&c, "lux", "s1").unwrap().is_none());
        assert!(c.0.keys().all(|k| k[0] != b'r' && k[0] != b's' && k[0] != b'i'));
        assert_eq!(count(&c, CHUNK_PREFIX).unwrap(), 2, "chunks stay until garbage collection");
        let again = c.apply(&Command::Forget { tenant: "lux".into(), snapshot_id: "s1".into() }).unwrap();
        assert!(matches!(again, Outcome::Refused(_)));
    }

    #[test]
    fn drills_are_kept_and_the_last_success_remembered() {
        let mut c = MemCatalog::default();
        let rec = |verdict: &str, t: i64| DrillRecord {
            source: "rnpp".into(),
            snapshot: "s1".into(),
            snapshot_time: 1,
            started: t,
            verdict: verdict.into(),
            reason: String::new(),
            rto_ms: 1500,
            rpo_secs: 60,
            bytes: 10,
            files: 1,
            identity: "restore:lux".into(),
            node: "n1".into(),
            recorded: t,
        };
        for (v, t) in [("PASS", 10), ("FAIL", 20), ("PASS", 30), ("FAIL", 40)] {
            c.apply(&Command::RecordDrill { tenant: "lux".into(), record: rec(v, t) }).unwrap();
        }
        let all = drills(&c, "lux", Some("rnpp")).unwrap();
        assert_eq!(all.iter().map(|d| d.started).collect::<Vec<_>>(), [10, 20, 30, 40]);
        assert!(drills(&c, "est", None).unwrap().is_empty());
        let latest = drills_latest(&c).unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!((latest[0].0.as_str(), latest[0].1.as_str()), ("lux", "rnpp"));
        assert_eq!((latest[0].2.last.verdict.as_str(), latest[0].2.last_success), ("FAIL", Some(30)));
        // Old records are not chained; V2 records are kept the same way and chained too.
        assert!(history::all(&c, "lux").unwrap().is_empty());
        c.apply(&Command::RecordDrillV2 { tenant: "lux".into(), record: rec("PASS", 50) }).unwrap();
        assert_eq!(drills(&c, "lux", None).unwrap().len(), 5);
        assert_eq!(drills_latest(&c).unwrap()[0].2.last_success, Some(50));
        let chain = history::all(&c, "lux").unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].kind, "drill");
        assert_eq!(decode::<DrillRecord>(&chain[0].payload).unwrap(), rec("PASS", 50));
    }

    #[test]
    fn usage_counts_each_chunk_once_and_quotas_are_kept() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2]);
        index(&mut c, "lux", &[2, 3]);
        index(&mut c, "est", &[1]);
        assert_eq!(usage(&c, "lux").unwrap(), 101 + 102 + 103, "a chunk indexed twice counts once");
        assert_eq!(usage(&c, "est").unwrap(), 101);
        let q = Quota { max_bytes: 1 << 30, by: "admin".into(), time: 5 };
        c.apply(&Command::SetQuota { tenant: "lux".into(), quota: Some(q.clone()) }).unwrap();
        assert_eq!(quota(&c, "lux").unwrap(), Some(q.clone()));
        assert_eq!(usages(&c).unwrap(), vec![("est".to_string(), 101, None), ("lux".to_string(), 306, Some(q))]);
        c.apply(&Command::SetQuota { tenant: "lux".into(), quota: None }).unwrap();
        assert_eq!(quota(&c, "lux").unwrap(), None);
    }

    #[test]
    fn the_snapshots_referencing_a_chunk_are_found() {
        let mut c = MemCatalog::default();
        index(&mut c, "lux", &[1, 2, 3]);
        assert!(matches!(stage_and_commit(&mut c, "lux", &snap("s1", 3, 1), &[1, 2]), Outcome::Committed(_)));
        assert!(matches!(stage_and_commit(&mut c, "lux", &snap("s2", 3, 2), &[2]), Outcome::Committed(_)));
        assert_eq!(snapshots_referencing(&c, "lux", &id(1)).unwrap(), vec!["s1"]);
        assert_eq!(snapshots_referencing(&c, "lux", &id(2)).unwrap(), vec!["s1", "s2"]);
        assert_eq!(snapshots_referencing(&c, "lux", &id(3)).unwrap(), vec!["s1", "s2"], "roots are references");
        assert!(snapshots_referencing(&c, "est", &id(2)).unwrap().is_empty());
    }

    #[test]
    fn revocations_are_kept_once_and_never_forgotten() {
        let mut c = MemCatalog::default();
        let r = |serial: &str, reason: &str| Revocation {
            serial: serial.into(),
            subject: "agent:lux:rnpp".into(),
            reason: reason.into(),
            by: "admin".into(),
            time: 7,
        };
        assert_eq!(c.apply(&Command::Revoke { revocation: r("0a1b", "laptop stolen") }).unwrap(), Outcome::Done);
        assert_eq!(c.apply(&Command::Revoke { revocation: r("0a1b", "again") }).unwrap(), Outcome::Done);
        assert!(matches!(c.apply(&Command::Revoke { revocation: r("zz", "x") }).unwrap(), Outcome::Refused(_)));
        assert!(matches!(c.apply(&Command::Revoke { revocation: r("", "x") }).unwrap(), Outcome::Refused(_)));
        assert_eq!(revocations(&c).unwrap(), vec![r("0a1b", "laptop stolen")], "the first record is the one kept");
        // Snapshots and chunks of the same tenant are untouched by it.
        index(&mut c, "lux", &[1]);
        assert_eq!(count(&c, CHUNK_PREFIX).unwrap(), 1);
        assert_eq!(revocations(&c).unwrap().len(), 1);
    }

    #[test]
    fn chunk_keys_round_trip_and_raft_ids_are_stable() {
        assert_eq!(parse_chunk_key(&chunk_key("lux", &id(7))), Some(("lux".to_string(), id(7))));
        assert_eq!(raft_id("n1"), raft_id("n1"));
        assert_ne!(raft_id("n1"), raft_id("n2"));
        assert!(raft_id("n1") > 0 && raft_id("n1") < 1 << 63);
    }

    fn command() -> impl Strategy<Value = Command> {
        let tenant = prop::sample::select(vec!["lux", "est"]).prop_map(str::to_string);
        let sid = prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_string);
        prop_oneof![
            (tenant.clone(), prop::collection::vec(0u8..12, 0..6)).prop_map(|(tenant, ns)| Command::IndexChunks {
                tenant,
                chunks: ns.iter().map(|n| (id(*n), entry(*n))).collect()
            }),
            (tenant.clone(), sid.clone(), 0u32..2, prop::collection::vec(0u8..12, 0..6)).prop_map(
                |(tenant, snapshot_id, batch, ns)| Command::StageRefs {
                    tenant,
                    snapshot_id,
                    batch,
                    ids: ns.iter().map(|n| id(*n)).collect()
                }
            ),
            (tenant.clone(), sid.clone(), 0u8..12, 0i64..5, 0u32..3).prop_map(|(tenant, s, root, time, batches)| {
                Command::Commit { tenant, snapshot: snap(&s, root, time), batches }
            }),
            (tenant.clone(), sid.clone(), 0u8..12, any::<i64>(), 0u32..3, 0i64..400_000).prop_map(
                |(tenant, s, root, time, batches, now)| Command::CommitV2 {
                    tenant,
                    snapshot: snap(&s, root, time),
                    batches,
                    now
                }
            ),
            (tenant.clone(), 1u32..3, any::<bool>()).prop_map(|(tenant, keep_last, by_admin)| {
                Command::SetRetentionV2 {
                    tenant,
                    source: "rnpp".into(),
                    policy: RetentionPolicy { keep_last, keep_daily: 1, ..Default::default() },
                    by_admin,
                }
            }),
            (tenant.clone(), 0u32..3)
                .prop_map(|(tenant, days)| Command::SetProtection { tenant, protection: Protection { days } }),
            (
                tenant.clone(),
                prop::option::of((any::<bool>(), 1u32..3)),
                prop::sample::select(vec!["admin#1", "admin#2"])
            )
                .prop_map(|(tenant, lock, by)| Command::SetLock {
                    tenant,
                    source: Some("rnpp".into()),
                    lock: lock.map(|(c, d)| (if c { LockMode::Compliance } else { LockMode::Governance }, d)),
                    by: by.into(),
                    now: 1
                }),
            (1u64..3, prop::sample::select(vec!["admin#1", "admin#2"])).prop_map(|(id, by)| Command::ApproveLock {
                id,
                by: by.into(),
                now: 2
            }),
            (tenant.clone(), sid.clone(), any::<bool>()).prop_map(|(tenant, s, release)| Command::SetHold {
                tenant,
                target: exclave::protocol::HoldTarget::Snapshot(s),
                release,
                by: "admin#1".into(),
                reason: String::new(),
                now: 3
            }),
            (tenant.clone(), sid).prop_map(|(tenant, snapshot_id)| Command::Forget { tenant, snapshot_id }),
            tenant.clone().prop_map(|tenant| Command::PackRefs { tenant, source: "rnpp".into() }),
            (0u32..3).prop_map(|layout| Command::SetLayout { layout }),
            (1u64..4, "[a-z]{1,3}").prop_map(|(raft_id, name)| Command::SetMember {
                raft_id,
                member: Member { name, addr: "127.0.0.1:1".into() }
            }),
            (1u64..4).prop_map(|raft_id| Command::RemoveMember { raft_id }),
            (tenant.clone(), prop::collection::vec(0u8..12, 0..6), 0u64..4).prop_map(|(tenant, ns, sweep_seq)| {
                Command::IndexChunksV2 { tenant, chunks: ns.iter().map(|n| (id(*n), entry(*n))).collect(), sweep_seq }
            }),
            // Ids not from a mark: as of sequence 0, so every snapshot's references are kept
            // (the GC module's own property test runs real marks).
            (tenant.clone(), prop::collection::vec(0u8..12, 0..6)).prop_map(|(tenant, ns)| {
                Command::GcCondemn { tenant, ids: ns.iter().map(|n| id(*n)).collect(), as_of_seq: 0, pass: 1 }
            }),
            (tenant.clone(), prop::collection::vec(0u8..12, 0..6))
                .prop_map(|(tenant, ns)| Command::GcSweep { tenant, ids: ns.iter().map(|n| id(*n)).collect() }),
            (tenant.clone(), prop::sample::select(vec!["PASS", "FAIL"]), 0i64..50).prop_map(|(tenant, v, t)| {
                Command::RecordDrillV2 {
                    tenant,
                    record: DrillRecord {
                        source: "rnpp".into(),
                        snapshot: "a".into(),
                        snapshot_time: t,
                        started: t,
                        verdict: v.into(),
                        reason: String::new(),
                        rto_ms: 1,
                        rpo_secs: 1,
                        bytes: 1,
                        files: 1,
                        identity: "restore:lux".into(),
                        node: "n1".into(),
                        recorded: t,
                    },
                }
            }),
            prop::sample::select(vec!["01", "02", "zz"]).prop_map(|serial| Command::Revoke {
                revocation: Revocation {
                    serial: serial.into(),
                    subject: "agent:lux:a".into(),
                    reason: String::new(),
                    by: "admin".into(),
                    time: 1
                }
            }),
        ]
    }

    proptest! {
        /// Every node applies the same log; one of them joins late from a copy of another's
        /// state taken part way (a Raft snapshot). All end in the same state with the same
        /// outcomes, and the log survives its own encoding.
        #[test]
        fn the_same_log_gives_the_same_state_on_every_node(
            log in prop::collection::vec(command(), 0..60),
            cut in 0usize..60,
        ) {
            let cut = cut.min(log.len());
            let (mut a, mut b) = (MemCatalog::default(), MemCatalog::default());
            a.write(founding_writes());
            b.write(founding_writes());
            let mut outcomes_a = Vec::new();
            for cmd in &log {
                outcomes_a.push(a.apply(cmd).unwrap());
            }
            for cmd in &log[..cut] {
                b.apply(cmd).unwrap();
            }
            let mut late = MemCatalog(b.0.clone());
            for (i, cmd) in log[cut..].iter().enumerate() {
                let decoded: Command = decode(&encode(cmd)).unwrap();
                prop_assert_eq!(&decoded, cmd);
                prop_assert_eq!(&late.apply(&decoded).unwrap(), &outcomes_a[cut + i]);
            }
            prop_assert_eq!(&a, &late);
            // The kept counts agree with a walk over the catalog.
            prop_assert_eq!(stats(&a).unwrap(), count_stats(&a).unwrap());
            let kept: Vec<Write> = usages(&a).unwrap().into_iter().filter(|(_, u, _)| *u > 0)
                .map(|(t, u, _)| Write::Put(usage_key(&t), u.to_be_bytes().to_vec())).collect();
            prop_assert_eq!(kept, count_usage(&a).unwrap());
            // A committed snapshot's every reference is in the index (whole lists and what
            // differences add hold them all, `refs`).
            for (k, v) in &a.0 {
                if k[0] == b'r' || k[0] == b'e' {
                    let tenant_end = k.iter().position(|b| *b == 0).unwrap();
                    let tenant = std::str::from_utf8(&k[1..tenant_end]).unwrap();
                    for r in decode::<Vec<ChunkId>>(v).unwrap() {
                        prop_assert!(index_entry(&a, tenant, &r).unwrap().is_some());
                    }
                }
            }
        }
    }
}
