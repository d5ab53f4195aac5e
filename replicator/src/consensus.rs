//! Drives this node's Raft member: one thread owns the `RawNode`, takes proposals, peer
//! messages and ticks from a channel, and handles each `Ready` in the order raft-rs requires
//! (send, install snapshot, apply committed, persist entries and hard state, only then send
//! the persisted messages, advance, apply the rest).
//!
//! Proposals carry their origin (this node's Raft id) and a sequence number: raft-rs forwards
//! a follower's proposal to the leader, and the origin answers its caller when it applies the
//! entry itself, with the outcome `catalog::apply` computed, the same on every node.
//!
//! A storage error while handling a Ready is fatal: the process exits and restarts from what
//! is on disk (continuing could acknowledge what was never persisted).

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::catalog::{self, Command, Member, Outcome};
use crate::peers::Peers;
use crate::raft_log::RaftLog;
use crate::store::Store;

pub const TICK: Duration = Duration::from_millis(100);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// How long a proposal may wait to be applied before its caller is told it failed.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A follower that has not heard from a leader for this long is cut off from the majority.
const LEADER_SILENCE: Duration = Duration::from_millis(TICK.as_millis() as u64 * ELECTION_TICKS as u64 * 3);
/// The log is compacted once this many applied entries precede the applied index.
const COMPACT_AFTER: u64 = 4096;
/// Entries kept behind the applied index, so a briefly slow follower needs no snapshot.
const COMPACT_KEEP: u64 = 512;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConsensusError {
    #[error("{0}")]
    NoQuorum(String),
    #[error("{0}")]
    Refused(String),
    #[error("the consensus module has stopped")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, ConsensusError>>;

pub enum Input {
    Propose { cmd: Command, reply: Reply<Outcome> },
    ChangeMember { change: ConfChangeType, raft_id: u64, member: Member, reply: Reply<Outcome> },
    ReadIndex { reply: Reply<()> },
    Step(Message),
    Unreachable(u64),
    SnapshotSent { to: u64, ok: bool },
}

#[derive(Serialize, Deserialize)]
struct Proposal {
    origin: u64,
    seq: u64,
    cmd: Command,
}

#[derive(Serialize, Deserialize)]
struct ConfContext {
    origin: u64,
    seq: u64,
    member: Member,
}

/// What the rest of the node may know of the Raft member, refreshed after each step.
#[derive(Debug, Clone, Default)]
pub struct RaftView {
    pub role: Option<StateRole>,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Leader only: log index known replicated on each peer.
    pub matched: HashMap<u64, u64>,
    pub last_heard: HashMap<u64, Instant>,
}

impl RaftView {
    /// Why this node cannot currently confirm the cluster's state, if it cannot.
    pub fn cut_off(&self, me: u64) -> Option<String> {
        if self.leader == me && self.role == Some(StateRole::Leader) {
            return None;
        }
        let voters = self.voters.len();
        let heard = self.leader != 0 && self.last_heard.get(&self.leader).is_some_and(|t| t.elapsed() < LEADER_SILENCE);
        if heard {
            None
        } else {
            let reachable = 1 + self
                .last_heard
                .iter()
                .filter(|(id, t)| self.voters.contains(id) && t.elapsed() < LEADER_SILENCE)
                .count();
            Some(format!(
                "this node cannot reach a majority of the cluster ({} of {voters} voters reachable, no leader heard for {} s): \
                 commits are refused; restores are still served, but its catalog may be stale",
                reachable.min(voters.max(1)),
                LEADER_SILENCE.as_secs()
            ))
        }
    }
}

#[derive(Clone)]
pub struct RaftHandle {
    pub id: u64,
    tx: Sender<Input>,
    view: Arc<Mutex<RaftView>>,
}

impl RaftHandle {
    pub fn view(&self) -> RaftView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    /// Waits briefly for a leader (the cluster may be electing one); refuses at once when
    /// this node has been cut off from the majority for longer than an election.
    pub async fn leader_known(&self) -> Result<(), ConsensusError> {
        let deadline = Instant::now() + LEADER_SILENCE;
        loop {
            let why = self.view().cut_off(self.id);
            match why {
                None => return Ok(()),
                Some(why) if Instant::now() >= deadline => return Err(ConsensusError::NoQuorum(why)),
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Proposes a command; returns its outcome once this node has applied it.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, ConsensusError> {
        self.leader_known().await?;
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::Propose { cmd, reply }).map_err(|_| ConsensusError::Stopped)?;
        rx.await.unwrap_or(Err(ConsensusError::Stopped))
    }

    /// `propose` for commands whose second application changes nothing (index entries, staged
    /// references, commits): a proposal lost when the leader it was forwarded to went away is
    /// proposed again to the new one, instead of failing the upload.
    pub async fn propose_idempotent(&self, cmd: Command) -> Result<Outcome, ConsensusError> {
        for lost in 0.. {
            let leader = self.view().leader;
            match self.propose(cmd.clone()).await {
                Err(ConsensusError::NoQuorum(why)) if lost < 2 => {
                    let now = self.view().leader;
                    if now == leader || now == 0 {
                        return Err(ConsensusError::NoQuorum(why));
                    }
                    warn!(old = leader, new = now, "a proposal was lost in a change of leader; proposing it again");
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    pub async fn change_member(
        &self,
        change: ConfChangeType,
        raft_id: u64,
        member: Member,
    ) -> Result<Outcome, ConsensusError> {
        self.leader_known().await?;
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::ChangeMember { change, raft_id, member, reply }).map_err(|_| ConsensusError::Stopped)?;
        rx.await.unwrap_or(Err(ConsensusError::Stopped))
    }

    /// Returns once this node has applied everything the leader had committed when asked.
    pub async fn read_barrier(&self) -> Result<(), ConsensusError> {
        self.leader_known().await?;
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::ReadIndex { reply }).map_err(|_| ConsensusError::Stopped)?;
        rx.await.unwrap_or(Err(ConsensusError::Stopped))
    }
}

struct Driver {
    raw: RawNode<RaftLog>,
    store: Arc<Store>,
    peers: Arc<Peers>,
    view: Arc<Mutex<RaftView>>,
    last_heard: HashMap<u64, Instant>,
    seq: u64,
    pending: HashMap<u64, (Reply<Outcome>, Instant)>,
    reads: HashMap<u64, (Reply<()>, Instant)>,
    /// Read indexes confirmed by the leader, waiting for this node to apply up to them.
    confirmed_reads: Vec<(u64, Reply<()>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

fn fatal(e: impl std::fmt::Display) -> Fatal {
    Fatal(e.to_string())
}

/// Opens the Raft log (and writes the founding configuration on a first start), for `run`.
/// `founders` (this node and its static peers) seed the
/// configuration on the very first start, unless `join` says the node waits to be added.
pub fn start(
    name: &str,
    store: &Store,
    checkpoints: Arc<crate::snapshot::Checkpoints>,
    founders: &[(u64, Member)],
    join: bool,
    tx: Sender<Input>,
) -> anyhow::Result<(RaftHandle, RaftLog)> {
    let id = catalog::raft_id(name);
    let mut log = RaftLog::open(store.db().clone(), store.catalog_slot(), Some(checkpoints))?;
    if log.is_blank() && !join {
        let cs = ConfState { voters: founders.iter().map(|(id, _)| *id).collect(), ..Default::default() };
        let writes = founders
            .iter()
            .flat_map(|(raft_id, member)| {
                let cmd = Command::SetMember { raft_id: *raft_id, member: member.clone() };
                let (_, w) = catalog::apply(&catalog::MemCatalog::default(), &cmd).unwrap_or((Outcome::Done, vec![]));
                w
            })
            .chain(catalog::founding_writes())
            .collect();
        log.bootstrap(cs, writes)?;
        info!(voters = founders.len(), "new cluster configuration written (bootstrap)");
    }
    let view = Arc::new(Mutex::new(RaftView::default()));
    Ok((RaftHandle { id, tx, view }, log))
}

/// Runs the member until the input channel closes; exits the process on a storage error.
/// Bytes of log entries per append message, and append messages unacknowledged per follower.
const MAX_ENTRIES_PER_MSG: u64 = 1024 * 1024;
const MAX_MSGS_IN_FLIGHT: usize = 32;

pub fn run(
    handle: &RaftHandle,
    log: RaftLog,
    store: Arc<Store>,
    peers: Arc<Peers>,
    rx: Receiver<Input>,
) -> anyhow::Result<()> {
    let cfg = raft::Config {
        id: handle.id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied: log.applied(),
        // What a follower that falls behind holds at once, several times over (raft's unstable
        // log, the persisting batch, RocksDB's memtable): with 256 messages in flight, the
        // followers of a GC pass at 10^7 chunks went from ~0.6 to 1.2 GiB. 32 MiB in flight
        // still covers a 100 ms, 1 Gbit/s link.
        max_size_per_msg: MAX_ENTRIES_PER_MSG,
        max_inflight_msgs: MAX_MSGS_IN_FLIGHT,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    cfg.validate()?;
    let single = log.conf_state().voters == [handle.id];
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut raw = RawNode::new(&cfg, log, &logger)?;
    if single {
        // Alone in the configuration: no one to wait for.
        let _ = raw.campaign();
    }
    let mut d = Driver {
        raw,
        store,
        peers,
        view: handle.view.clone(),
        last_heard: HashMap::new(),
        seq: 0,
        pending: HashMap::new(),
        reads: HashMap::new(),
        confirmed_reads: Vec::new(),
    };
    d.refresh_members();
    d.publish();
    let mut next_tick = Instant::now() + TICK;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(input) => {
                d.handle(input);
                // Take what else is queued, so one Ready covers many proposals.
                for input in rx.try_iter().take(1024) {
                    d.handle(input);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        if Instant::now() >= next_tick {
            d.raw.tick();
            d.expire();
            next_tick += TICK;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + TICK;
            }
        }
        if let Err(e) = d.on_ready() {
            error!(error = %e, "storage failed while handling Raft state; stopping so the node restarts from disk");
            std::process::exit(70);
        }
        d.publish();
    }
}

impl Driver {
    fn me(&self) -> u64 {
        self.raw.raft.id
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { cmd, reply } => {
                self.seq += 1;
                let data = catalog::encode(&Proposal { origin: self.me(), seq: self.seq, cmd });
                match self.raw.propose(vec![], data) {
                    Ok(()) => {
                        self.pending.insert(self.seq, (reply, Instant::now() + PROPOSAL_TIMEOUT));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ConsensusError::NoQuorum(format!(
                            "proposal dropped ({e}): no leader is known to this node"
                        ))));
                    }
                }
            }
            Input::ChangeMember { change, raft_id, member, reply } => {
                self.seq += 1;
                let mut cc = ConfChange::default();
                cc.set_change_type(change);
                cc.node_id = raft_id;
                cc.context = catalog::encode(&ConfContext { origin: self.me(), seq: self.seq, member }).into();
                match self.raw.propose_conf_change(vec![], cc) {
                    Ok(()) => {
                        self.pending.insert(self.seq, (reply, Instant::now() + PROPOSAL_TIMEOUT));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ConsensusError::Refused(format!("configuration change refused: {e}"))));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                self.seq += 1;
                self.raw.read_index(self.seq.to_be_bytes().to_vec());
                self.reads.insert(self.seq, (reply, Instant::now() + PROPOSAL_TIMEOUT));
            }
            Input::Step(m) => {
                self.last_heard.insert(m.from, Instant::now());
                if let Err(e) = self.raw.step(m) {
                    warn!(error = %e, "raft message refused");
                }
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotSent { to, ok } => {
                self.raw.report_snapshot(to, if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure })
            }
        }
    }

    fn expire(&mut self) {
        expire(&mut self.pending);
        expire(&mut self.reads);
    }

    /// Streams the catalog of a snapshot ticket from its sender into the staging family and
    /// switches to it. Nothing else can go on until it is installed (Raft may not advance),
    /// so this thread waits; a sender that stops answering is asked again for a while, then
    /// the node stops and restarts from its old state (the leader will send a new ticket).
    fn receive_snapshot(&mut self, snap: &raft::eraftpb::Snapshot, t: &crate::snapshot::Ticket) -> Result<(), Fatal> {
        let started = Instant::now();
        let staging = self.raw.store().prepare_staging().map_err(fatal)?;
        let peers = self.peers.clone();
        let fetch = |after: Option<&[u8]>| {
            let mut tries = 0;
            loop {
                match peers.snapshot_page_blocking(t.from, t.id, after) {
                    Ok(page) => return Ok(page),
                    Err(e) if tries < 10 && e.retryable() => {
                        tries += 1;
                        warn!(error = %e, tries, "snapshot page not received; asking again");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let log = self.raw.store();
        let mut pages = 0u64;
        let write = |page| {
            pages += 1;
            log.write_staging(staging, page).map_err(|e| e.to_string())?;
            crate::test_hooks::crash_point("snapshot-page");
            Ok(())
        };
        let pairs = crate::snapshot::transfer(fetch, write)
            .map_err(|e| fatal(format!("receiving the catalog snapshot from {}: {e}", self.peers.name_of(t.from))))?;
        self.raw.mut_store().install_streamed(snap, staging).map_err(fatal)?;
        info!(pairs, pages, from = %self.peers.name_of(t.from), secs = started.elapsed().as_secs_f64(),
              "catalog snapshot streamed");
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), Fatal> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.peers.send_raft(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            match crate::snapshot::Ticket::decode(&snap.data) {
                None => self.raw.mut_store().install(&snap).map_err(fatal)?,
                Some(ticket) => self.receive_snapshot(&snap, &ticket.map_err(fatal)?)?,
            }
            info!(index = snap.get_metadata().index, "catalog snapshot installed from the leader");
            self.refresh_members();
        }
        self.apply(rd.take_committed_entries())?;
        for rs in rd.take_read_states() {
            let seq = rs.request_ctx.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            if let Some((reply, _)) = seq.and_then(|s| self.reads.remove(&s)) {
                self.confirmed_reads.push((rs.index, reply));
            }
        }
        let must_sync = rd.must_sync();
        self.raw.mut_store().persist(rd.entries(), rd.hs(), must_sync).map_err(fatal)?;
        self.peers.send_raft(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit).map_err(fatal)?;
        }
        self.peers.send_raft(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        let applied = self.raw.store().applied();
        let (ready, waiting): (Vec<_>, Vec<_>) = self.confirmed_reads.drain(..).partition(|(i, _)| *i <= applied);
        self.confirmed_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
        if applied >= self.raw.store().first() + COMPACT_AFTER {
            self.raw.mut_store().compact(applied - COMPACT_KEEP).map_err(fatal)?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Fatal> {
        for entry in entries {
            if entry.data.is_empty() {
                // A new leader's empty entry.
                self.raw.mut_store().apply(vec![], entry.index, None).map_err(fatal)?;
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let p: Proposal = catalog::decode(&entry.data).map_err(|e| {
                        fatal(format!(
                            "entry {} cannot be decoded ({e}): is this node older than the cluster?",
                            entry.index
                        ))
                    })?;
                    let (outcome, writes) = {
                        let view = self.store.catalog().map_err(fatal)?;
                        catalog::apply(&view, &p.cmd).map_err(fatal)?
                    };
                    self.raw.mut_store().apply(writes, entry.index, None).map_err(fatal)?;
                    self.answer(p.origin, p.seq, outcome);
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&entry.data).map_err(fatal)?;
                    let ctx: ConfContext = catalog::decode(&cc.context).map_err(fatal)?;
                    match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            let cmd = match cc.get_change_type() {
                                ConfChangeType::RemoveNode => Command::RemoveMember { raft_id: cc.node_id },
                                _ => Command::SetMember { raft_id: cc.node_id, member: ctx.member.clone() },
                            };
                            let (outcome, writes) = {
                                let view = self.store.catalog().map_err(fatal)?;
                                catalog::apply(&view, &cmd).map_err(fatal)?
                            };
                            self.raw.mut_store().apply(writes, entry.index, Some(&cs)).map_err(fatal)?;
                            info!(change = ?cc.get_change_type(), node = %ctx.member.name, voters = ?cs.voters,
                                  learners = ?cs.learners, "cluster configuration changed");
                            self.refresh_members();
                            self.answer(ctx.origin, ctx.seq, outcome);
                        }
                        Err(e) => {
                            // Refused the same way on every node: the log entry is a no-op.
                            self.raw.mut_store().apply(vec![], entry.index, None).map_err(fatal)?;
                            self.answer(
                                ctx.origin,
                                ctx.seq,
                                Outcome::Refused(format!("configuration change refused: {e}")),
                            );
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(fatal(format!("entry {}: joint configuration changes are not used here", entry.index)));
                }
            }
        }
        Ok(())
    }

    fn answer(&mut self, origin: u64, seq: u64, outcome: Outcome) {
        if origin == self.me()
            && let Some((reply, _)) = self.pending.remove(&seq)
        {
            let _ = reply.send(Ok(outcome));
        }
    }

    fn refresh_members(&mut self) {
        match self
            .store
            .catalog()
            .map_err(|e| e.to_string())
            .and_then(|v| catalog::members(&v).map_err(|e| e.to_string()))
        {
            Ok(members) => self.peers.set_members(members),
            Err(e) => warn!(error = %e, "membership not readable from the catalog"),
        }
    }

    fn publish(&mut self) {
        let r = &self.raw.raft;
        let conf = r.prs().conf().to_conf_state();
        let matched = if r.state == StateRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            HashMap::new()
        };
        let v = RaftView {
            role: Some(r.state),
            term: r.term,
            leader: r.leader_id,
            commit: r.raft_log.committed,
            applied: self.raw.store().applied(),
            last_index: self.raw.store().last(),
            voters: conf.voters.clone(),
            learners: conf.learners.clone(),
            matched,
            last_heard: self.last_heard.clone(),
        };
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// Fails the callers whose proposal or read has waited past its deadline.
fn expire<T>(waiting: &mut HashMap<u64, (Reply<T>, Instant)>) {
    let now = Instant::now();
    let late: Vec<u64> = waiting.iter().filter(|(_, (_, t))| *t <= now).map(|(s, _)| *s).collect();
    for s in late {
        if let Some((reply, _)) = waiting.remove(&s) {
            let _ = reply.send(Err(ConsensusError::NoQuorum(
                "not applied within 10 s: the cluster may have lost its leader or its majority; try again".into(),
            )));
        }
    }
}

/// Whether a message carries a snapshot (its sender reports how the transfer went).
pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
