//! The node's context: what every request handler and background worker of a storage node
//! shares (its store, its Raft member, its peers, its limits and counters).

use std::sync::Arc;
use std::time::Instant;

use exclave::protocol::{MemberStatus, PeerContact};

use crate::catalog;
use crate::consensus::{ConsensusError, RaftHandle};
use crate::metrics::NodeMetrics;
use crate::peers::Peers;
use crate::replication::Backfill;
use crate::store::{Store, StoreError};

pub struct Node {
    pub name: String,
    /// RocksDB: the applied catalog and the Raft log (and, behind `chunks`, the pack index).
    pub store: Arc<Store>,
    /// Where chunk envelopes are stored and read (the same store, seen as a `ChunkStore`).
    pub chunks: Arc<dyn crate::chunk_store::ChunkStore>,
    pub metrics: NodeMetrics,
    pub started: Instant,
    pub data_dir: std::path::PathBuf,
    /// Free bytes kept in reserve: RocksDB must never meet a full disk (Debian's build aborts
    /// on a sync after a failed write), and compaction and deletion need room to work.
    pub min_free_bytes: u64,
    pub raft: RaftHandle,
    pub peers: Arc<Peers>,
    /// Nodes that must hold a chunk before it is acknowledged (`None`: a majority of voters).
    pub write_quorum: Option<usize>,
    pub backfill: std::sync::Mutex<Backfill>,
    /// Certificates revoked in the catalog (the handshake consults it) and the open
    /// connections to close when one of theirs is revoked.
    pub revoked: Arc<crate::revocation::Revoked>,
    pub connections: crate::revocation::Connections,
    /// Scrub and repair of this node's chunks.
    pub scrub: Arc<crate::scrub::Scrubber>,
    /// Garbage collection: this node's passes and its share of reclaiming space.
    pub gc: Arc<crate::gc::Collector>,
    /// Checkpoints of the catalog this node offered as Raft snapshots, served page by page.
    pub checkpoints: Arc<crate::snapshot::Checkpoints>,
    /// This node's certificate and the CA's, as `Certificates` reports them.
    pub certificate: exclave::pki::CertInfo,
    pub ca_certificate: exclave::pki::CertInfo,
    /// Bytes of writes admitted by `check_room` and not finished yet: counted against the
    /// free space, so concurrent uploads cannot each see the same room and overshoot the reserve.
    pub in_flight: Arc<std::sync::atomic::AtomicU64>,
    /// Per tenant, bytes admitted against its quota and not indexed yet.
    pub tenant_in_flight: Arc<TenantInFlight>,
}

/// Bytes per tenant admitted against a quota by this node and not yet in the index.
#[derive(Default)]
pub struct TenantInFlight(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl TenantInFlight {
    /// Admits `bytes` for `tenant` if `used` plus what is pending plus them fits in `quota`;
    /// else returns what is pending.
    pub fn admit(self: &Arc<Self>, tenant: &str, used: u64, bytes: u64, quota: u64) -> Result<Admitted, u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let pending = m.get(tenant).copied().unwrap_or(0);
        if used + pending + bytes > quota {
            return Err(pending);
        }
        *m.entry(tenant.to_string()).or_default() += bytes;
        Ok(Admitted { tenant: tenant.to_string(), bytes, of: self.clone() })
    }
}

/// Bytes admitted against a tenant's quota; released when dropped (indexed, or failed).
pub struct Admitted {
    tenant: String,
    bytes: u64,
    of: Arc<TenantInFlight>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get_mut(&self.tenant) {
            *v = v.saturating_sub(self.bytes);
            if *v == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// Room reserved for one write; released when dropped (the write is on disk, or failed).
pub struct Room {
    bytes: u64,
    in_flight: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Node {
    /// Reserves room for a write of `bytes`, or refuses it when it would eat into the
    /// free-space reserve (counting every write admitted and not finished yet).
    pub fn check_room(&self, bytes: usize) -> Result<Room, StoreError> {
        use std::sync::atomic::Ordering;
        // A write costs its size once in a pack, plus ~100 bytes of index per chunk.
        let cost = bytes as u64 + bytes as u64 / 64;
        let before = self.in_flight.fetch_add(cost, Ordering::AcqRel);
        let room = Room { bytes: cost, in_flight: self.in_flight.clone() };
        let (_, free) = crate::metrics::disk_usage(&self.data_dir);
        let reserve = self.min_free_bytes + self.store.ballast_owed();
        if free < reserve.saturating_add(before + cost) {
            return Err(StoreError::Full(format!(
                "on {}: {} MiB free, {} MiB are kept in reserve",
                self.name,
                free >> 20,
                reserve >> 20
            )));
        }
        Ok(room)
    }

    /// Refuses at once (after a short wait for an election) when no leader can be reached.
    pub async fn require_leader(&self) -> Result<(), ConsensusError> {
        self.raft.leader_known().await.map_err(|e| ConsensusError::NoQuorum(format!("{}: {e}", self.name)))
    }

    /// What `/readyz` answers: ready to take uploads and serve restores, or why not.
    pub fn readiness(&self) -> exclave::http::Readiness {
        let (_, free) = crate::metrics::disk_usage(&self.data_dir);
        let store = match self.store.catalog() {
            Ok(v) => catalog::stats(&v).err().map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        readiness_of(&self.raft.view(), self.raft.id, free, self.min_free_bytes + self.store.ballast_owed(), store)
    }

    pub fn member_status(&self) -> Result<MemberStatus, StoreError> {
        let v = self.raft.view();
        let me = self.raft.id;
        let stats = catalog::stats(&self.store.catalog()?)?;
        let b = self.backfill.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let name = |id: u64| self.peers.name_of(id);
        let role = match v.role {
            _ if !v.voters.contains(&me) && !v.learners.contains(&me) => "joining".to_string(),
            _ if v.learners.contains(&me) => "learner".to_string(),
            Some(raft::StateRole::Leader) => "leader".into(),
            Some(raft::StateRole::Candidate) => "candidate".into(),
            Some(raft::StateRole::PreCandidate) => "pre-candidate".into(),
            _ => "follower".into(),
        };
        let peers = v
            .voters
            .iter()
            .chain(v.learners.iter())
            .filter(|id| **id != me)
            .map(|id| PeerContact {
                name: name(*id),
                last_contact_ms: v.last_heard.get(id).map(|t| t.elapsed().as_millis() as u64),
                matched: v.matched.get(id).copied(),
            })
            .collect();
        Ok(MemberStatus {
            name: self.name.clone(),
            raft_id: me,
            role,
            term: v.term,
            leader: (v.leader != 0).then(|| name(v.leader)),
            commit_index: v.commit,
            applied_index: v.applied,
            last_index: v.last_index,
            voters: v.voters.iter().map(|id| name(*id)).collect(),
            learners: v.learners.iter().map(|id| name(*id)).collect(),
            chunks_indexed: stats.chunks,
            chunks_missing: b.missing,
            scanned_at: b.scanned_at,
            snapshots: stats.snapshots,
            peers,
            stale: v.cut_off(me),
            backfill_error: b.last_error.clone(),
            unrepairable: crate::scrub::unrepairable(self)?.len() as u64,
        })
    }
}

/// Readiness from what the node sees: its Raft view, the free bytes of its data file system
/// against the reserve, and an error reading its catalog, if any. Pure, for tests.
pub fn readiness_of(
    v: &crate::consensus::RaftView,
    me: u64,
    free: u64,
    reserve: u64,
    store_error: Option<String>,
) -> exclave::http::Readiness {
    let mut why = Vec::new();
    if let Some(e) = store_error {
        why.push(format!("the catalog cannot be read: {e}"));
    }
    if !v.voters.contains(&me) && !v.learners.contains(&me) {
        why.push(
            "not a member of the cluster yet: joining, or removed (see `exclave-replicator cluster status`)".into(),
        );
    } else if v.learners.contains(&me) {
        why.push("a learner still catching up with the catalog; it votes and acknowledges once promoted".into());
    }
    if let Some(cut) = v.cut_off(me) {
        why.push(cut);
    }
    if free < reserve {
        why.push(format!(
            "{} MiB free on the data file system, below the reserve of {} MiB: uploads are refused",
            free >> 20,
            reserve >> 20
        ));
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::RaftView;

    fn leader_of_three() -> RaftView {
        RaftView { role: Some(raft::StateRole::Leader), leader: 1, voters: vec![1, 2, 3], ..RaftView::default() }
    }

    #[test]
    fn a_leader_with_room_is_ready() {
        assert_eq!(readiness_of(&leader_of_three(), 1, 10 << 30, 1 << 30, None), Ok(()));
    }

    #[test]
    fn every_reason_is_given() {
        let mut v = leader_of_three();
        v.role = Some(raft::StateRole::Follower);
        v.leader = 0;
        let why = readiness_of(&v, 4, 1 << 20, 1 << 30, Some("I/O error".into())).expect_err("not ready");
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(why[0].contains("I/O error"));
        assert!(why[1].contains("not a member"));
        assert!(why[2].contains("majority"));
        assert!(why[3].contains("1 MiB free") && why[3].contains("1024 MiB"), "{}", why[3]);
    }

    #[test]
    fn a_learner_is_not_ready() {
        let mut v = leader_of_three();
        v.learners = vec![4];
        v.last_heard.insert(1, Instant::now());
        let why = readiness_of(&v, 4, 10 << 30, 0, None).expect_err("learner");
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("learner"));
    }
}
