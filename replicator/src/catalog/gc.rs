//! Garbage collection as the catalog decides it: condemning, resurrecting and sweeping chunks
//! in log order. The rule these keep, and why it is safe, is written at the top of `crate::gc`.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! g ‖ tenant ‖ 0 ‖ chunk id (32)   → postcard(Condemned)    out of the index, copies still kept
//! G                                → postcard(GcState)      passes, sweep sequence, last report
//! x ‖ sweep seq (u64 BE)           → postcard(SweepRecord)  the ids a recent sweep deleted
//! ```

use std::collections::{BinaryHeap, HashSet};

use exclave::chunk_id::ChunkId;
use exclave::protocol::GcReport;
use exclave::sorted_ids;
use serde::{Deserialize, Serialize};

use super::{
    CatalogError, CatalogRead, IndexEntry, Outcome, Write, batch_key, batches_prefix, bump_chunks, chunk_key, decode,
    encode, scan_decoded, snapshots, tenant_key, usage, usage_key,
};

/// Sweep records kept: an `IndexChunksV2` based on an older sweep sequence than the oldest
/// kept cannot be checked id by id, and is refused for every chunk it would add.
pub const SWEEP_RECORDS_KEPT: u64 = 64;
/// Most ids in one `GcCondemn` or `GcSweep` command (512 KiB of ids in the log entry).
pub const IDS_PER_COMMAND: usize = 16 * 1024;

const STATE_KEY: &[u8] = b"G";

/// A chunk taken out of the index by GC, with the entry it had: until it is swept, every node
/// still holds its copies, so a commit or an upload can put it back as it was.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Condemned {
    pub entry: IndexEntry,
    /// The GC pass that condemned it.
    pub pass: u64,
}

/// The cluster's GC bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcState {
    /// The last pass recorded as done.
    pub pass: u64,
    /// Sweeps applied so far (each `GcSweep` that deleted anything is one).
    pub sweep_seq: u64,
    /// Sweeps up to this one have no record any more (see `SWEEP_RECORDS_KEPT`).
    pub sweep_floor: u64,
    /// Unfinished commits seen by the last pass (tenant, snapshot id): those still staged at
    /// the next pass are dropped.
    pub staged_seen: Vec<(String, String)>,
    pub last: Option<GcReport>,
}

/// What one sweep deleted on every node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SweepRecord {
    pub tenant: String,
    pub ids: Vec<ChunkId>,
}

pub fn condemned_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = tenant_key(b'g', tenant);
    k.extend_from_slice(&id.0);
    k
}

/// Where a delta's base is recorded (see `add_bases`).
pub fn base_key(tenant: &str, id: &ChunkId) -> Vec<u8> {
    let mut k = tenant_key(b'd', tenant);
    k.extend_from_slice(&id.0);
    k
}

/// How deep a commit follows bases of bases. Agents build deltas on full chunks only (depth
/// 1); deeper chains arise only where two sources share chunks, and restore reads as deep.
pub const MAX_DELTA_DEPTH: usize = 8;

/// Adds to the sorted, deduplicated `refs` the bases of the deltas among them, and theirs.
/// A base referenced this way is kept by GC like any referenced chunk, and is checked to be
/// in the index by the commit like the rest.
pub(super) fn add_bases(view: &dyn CatalogRead, tenant: &str, refs: &mut Vec<ChunkId>) -> Result<(), CatalogError> {
    // Most tenants hold no delta: one seek instead of a lookup per reference.
    if !any_under(view, &tenant_key(b'd', tenant))? {
        return Ok(());
    }
    let mut frontier = refs.clone();
    for _ in 0..MAX_DELTA_DEPTH {
        let mut found = Vec::new();
        for part in frontier.chunks(4096) {
            let keys: Vec<Vec<u8>> = part.iter().map(|id| base_key(tenant, id)).collect();
            for v in view.get_many(&keys)?.into_iter().flatten() {
                let base = ChunkId(v.as_slice().try_into().map_err(|_| CatalogError::Decode("delta base".into()))?);
                if refs.binary_search(&base).is_err() {
                    found.push(base);
                }
            }
        }
        // `found` is one lookup per delta, far fewer than `refs`: sorting it is cheap, and
        // joining it to `refs` is a linear merge.
        found.sort_unstable();
        found.dedup();
        if found.is_empty() {
            break;
        }
        sorted_ids::insert_all(refs, &found);
        frontier = found;
    }
    Ok(())
}

fn sweep_key(seq: u64) -> Vec<u8> {
    let mut k = b"x".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn state(view: &dyn CatalogRead) -> Result<GcState, CatalogError> {
    Ok(match view.get(STATE_KEY)? {
        Some(v) => decode(&v)?,
        None => GcState::default(),
    })
}

/// One page of a tenant's condemned chunks after `after` (from the start when `None`).
pub fn condemned_page(
    view: &dyn CatalogRead,
    tenant: &str,
    after: Option<&ChunkId>,
    limit: usize,
) -> Result<Vec<(ChunkId, Condemned)>, CatalogError> {
    let prefix = tenant_key(b'g', tenant);
    let start = match after {
        Some(id) => {
            let mut k = condemned_key(tenant, id);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    let mut out = Vec::new();
    let mut bad = None;
    view.scan_from(&prefix, &start, &mut |k, v| {
        let id: Result<[u8; 32], _> = k[prefix.len()..].try_into();
        match (id, decode::<Condemned>(v)) {
            (Ok(id), Ok(c)) => out.push((ChunkId(id), c)),
            (Err(_), _) => bad = Some(CatalogError::Decode("malformed condemned key".into())),
            (_, Err(e)) => bad = Some(e),
        }
        bad.is_none() && out.len() < limit
    })?;
    bad.map_or(Ok(out), Err)
}

/// Every tenant that has chunks in the index, condemned chunks, or snapshots.
pub fn tenants(view: &dyn CatalogRead) -> Result<Vec<String>, CatalogError> {
    let mut out = std::collections::BTreeSet::new();
    for tag in [b"b", b"t", b"g"] {
        let mut last: Option<String> = None;
        view.scan(tag, &mut |k, _| {
            let rest = &k[1..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let t = String::from_utf8_lossy(&rest[..end]).into_owned();
            if last.as_ref() != Some(&t) {
                out.insert(t.clone());
                last = Some(t);
            }
            true
        })?;
    }
    Ok(out.into_iter().collect())
}

/// Unfinished commits: (tenant, snapshot id) of every staged reference batch, once each.
pub fn staged(view: &dyn CatalogRead) -> Result<Vec<(String, String)>, CatalogError> {
    let mut out: Vec<(String, String)> = Vec::new();
    view.scan(b"p", &mut |k, _| {
        let rest = &k[1..];
        if let Some(t_end) = rest.iter().position(|b| *b == 0) {
            let after = &rest[t_end + 1..];
            if let Some(s_end) = after.iter().position(|b| *b == 0) {
                let pair = (
                    String::from_utf8_lossy(&rest[..t_end]).into_owned(),
                    String::from_utf8_lossy(&after[..s_end]).into_owned(),
                );
                if out.last() != Some(&pair) {
                    out.push(pair);
                }
            }
        }
        true
    })?;
    Ok(out)
}

/// The ids of `tenant` that sweeps after `since` deleted, or `None` when some of those sweeps
/// have no record any more (then nothing absent from the index may be trusted to exist).
fn swept_since(view: &dyn CatalogRead, tenant: &str, since: u64) -> Result<Option<HashSet<ChunkId>>, CatalogError> {
    let st = state(view)?;
    if since >= st.sweep_seq {
        return Ok(Some(HashSet::new()));
    }
    if since < st.sweep_floor {
        return Ok(None);
    }
    // Records at or before `since` were already seen by the uploader: read only the newer.
    let mut newer = HashSet::new();
    let start = sweep_key(since + 1);
    let mut bad = None;
    view.scan_from(b"x", &start, &mut |_, v| match decode::<SweepRecord>(v) {
        Ok(rec) => {
            if rec.tenant == tenant {
                newer.extend(rec.ids);
            }
            true
        }
        Err(e) => {
            bad = Some(e);
            false
        }
    })?;
    bad.map_or(Ok(Some(newer)), Err)
}

/// Indexes chunks stored by a write quorum whose uploader had seen sweeps up to `since`
/// (`None`: an older node that does not say; no chunk it names may have been swept since).
///
/// A chunk already indexed is left as it is (first writer wins). A condemned one is put back
/// as it was: no sweep has deleted any copy of it. A chunk a sweep deleted after `since` is
/// refused: a node may have counted a copy that sweep then removed; the uploader stores it
/// again and retries. Returns `Indexed` with the refused ids.
///
/// With `check_bases` (`IndexChunksV4`), a delta indexed for the first time needs its base:
/// indexed (or indexed by this same command), or condemned, and then put back as a commit
/// would. A delta whose base is gone is not indexed (`base_gone`): its copies are orphans, and
/// the agent, told the chunks went missing, runs again and sends it whole.
#[allow(clippy::too_many_arguments)]
pub(super) fn index_chunks(
    view: &dyn CatalogRead,
    tenant: &str,
    chunks: &[(ChunkId, IndexEntry)],
    since: Option<u64>,
    bases: &[(ChunkId, ChunkId)],
    check_bases: bool,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let bases: std::collections::HashMap<ChunkId, ChunkId> = bases.iter().copied().collect();
    let keys = chunk_keys(tenant, &ids);
    let mut seen = HashSet::new();
    let absent: Vec<(&Vec<u8>, &(ChunkId, IndexEntry))> = keys
        .iter()
        .zip(chunks)
        .zip(view.get_many(&keys)?)
        .filter(|((_, (id, _)), old)| old.is_none() && seen.insert(*id))
        .map(|(pair, _)| pair)
        .collect();
    let gkeys: Vec<Vec<u8>> = absent.iter().map(|(_, (id, _))| condemned_key(tenant, id)).collect();
    // Most of the time nothing of the tenant is condemned: one seek instead of a lookup each.
    let conds =
        if any_under(view, &tenant_key(b'g', tenant))? { view.get_many(&gkeys)? } else { vec![None; gkeys.len()] };
    let (mut added, mut count) = (0u64, 0u64);
    let mut refused = Vec::new();
    let mut swept: Option<Option<HashSet<ChunkId>>> = None;
    let (mut base_gone, mut put_back) = (Vec::new(), HashSet::new());
    let in_command: HashSet<ChunkId> = if check_bases { ids.iter().copied().collect() } else { HashSet::new() };
    for ((key, (id, entry)), (gkey, cond)) in absent.into_iter().zip(gkeys.iter().zip(conds)) {
        let entry = match cond {
            // Its base, if it had one, was recorded when it was first indexed.
            Some(c) => {
                w.push(Write::Delete(gkey.clone()));
                decode::<Condemned>(&c)?.entry
            }
            None => {
                let gone = match &mut swept {
                    Some(s) => s,
                    None => swept.insert(swept_since(view, tenant, since.unwrap_or(0))?),
                };
                if gone.as_ref().is_none_or(|g| g.contains(id)) {
                    refused.push(*id);
                    continue;
                }
                // Indexed for the first time: the envelope uploaded is the one stored.
                if let Some(base) = bases.get(id) {
                    if check_bases && !in_command.contains(base) && !put_back.contains(base) {
                        match base_state(view, tenant, base)? {
                            BaseState::Indexed => {}
                            BaseState::Condemned(c) => {
                                w.push(Write::Delete(condemned_key(tenant, base)));
                                w.push(Write::Put(chunk_key(tenant, base), encode(&c.entry)));
                                added += u64::from(c.entry.envelope_len);
                                count += 1;
                                put_back.insert(*base);
                            }
                            BaseState::Gone => {
                                base_gone.push(*id);
                                continue;
                            }
                        }
                    }
                    w.push(Write::Put(base_key(tenant, id), base.0.to_vec()));
                }
                *entry
            }
        };
        added += u64::from(entry.envelope_len);
        count += 1;
        w.push(Write::Put(key.clone(), encode(&entry)));
    }
    bump_chunks(view, w, count, 0)?;
    if added > 0 {
        let used = usage(view, tenant)? + added;
        w.push(Write::Put(usage_key(tenant), used.to_be_bytes().to_vec()));
    }
    Ok(if refused.is_empty() && base_gone.is_empty() { Outcome::Done } else { Outcome::Indexed { refused, base_gone } })
}

enum BaseState {
    Indexed,
    Condemned(Condemned),
    Gone,
}

fn base_state(view: &dyn CatalogRead, tenant: &str, base: &ChunkId) -> Result<BaseState, CatalogError> {
    if view.get(&chunk_key(tenant, base))?.is_some() {
        return Ok(BaseState::Indexed);
    }
    Ok(match view.get(&condemned_key(tenant, base))? {
        Some(c) => BaseState::Condemned(decode(&c)?),
        None => BaseState::Gone,
    })
}

/// The bases of the tenant's deltas that are indexed or condemned, sorted: GC neither
/// condemns nor sweeps them (a commit could still need them through such a delta). They are
/// collected a pass after the last delta on them is swept.
pub fn delta_bases(view: &dyn CatalogRead, tenant: &str) -> Result<Vec<ChunkId>, CatalogError> {
    let mut out = Vec::new();
    let mut bad = None;
    view.scan(&tenant_key(b'd', tenant), &mut |_, v| match <[u8; 32]>::try_from(v) {
        Ok(b) => {
            out.push(ChunkId(b));
            true
        }
        Err(_) => {
            bad = Some(CatalogError::Decode("delta base".into()));
            false
        }
    })?;
    if let Some(e) = bad {
        return Err(e);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Whether any key starts with `prefix` (one seek).
fn any_under(view: &dyn CatalogRead, prefix: &[u8]) -> Result<bool, CatalogError> {
    let mut any = false;
    view.scan(prefix, &mut |_, _| {
        any = true;
        false
    })?;
    Ok(any)
}

/// For a commit: puts back the condemned chunks among `absent` (references not in the index)
/// and returns those that are gone, with the writes and the bytes and count put back.
pub(super) fn resurrect(
    view: &dyn CatalogRead,
    tenant: &str,
    absent: &[ChunkId],
    w: &mut Vec<Write>,
) -> Result<(Vec<ChunkId>, u64, u64), CatalogError> {
    let keys: Vec<Vec<u8>> = absent.iter().map(|id| condemned_key(tenant, id)).collect();
    let (mut gone, mut bytes, mut count) = (Vec::new(), 0u64, 0u64);
    for (id, v) in absent.iter().zip(view.get_many(&keys)?) {
        match v {
            Some(v) => {
                let c: Condemned = decode(&v)?;
                w.push(Write::Delete(condemned_key(tenant, id)));
                w.push(Write::Put(chunk_key(tenant, id), encode(&c.entry)));
                bytes += u64::from(c.entry.envelope_len);
                count += 1;
            }
            None => gone.push(*id),
        }
    }
    Ok((gone, bytes, count))
}

/// The ids referenced by the tenant's snapshots committed after `as_of` (their commit sequence
/// is higher), among `ids`.
fn referenced_since(
    view: &dyn CatalogRead,
    tenant: &str,
    as_of: u64,
    ids: &HashSet<ChunkId>,
) -> Result<HashSet<ChunkId>, CatalogError> {
    let mut out = HashSet::new();
    // Whole lists and the references a difference adds: together they hold every reference
    // of these snapshots, whose bases were committed later still (`refs`, rule 3). A list
    // rewritten since the mark began may have been read half old, half new: then every
    // snapshot's lists count, not only the newer snapshots' (`refs::rewritten_since`).
    let all = super::refs::rewritten_since(view, tenant, as_of)?;
    for s in snapshots(view, tenant, None)?.into_iter().filter(|s| all || s.commit_seq > as_of) {
        for tag in [b'r', b'e'] {
            for (_, refs) in scan_decoded::<Vec<ChunkId>>(view, &batches_prefix(tag, tenant, &s.id))? {
                out.extend(refs.into_iter().filter(|r| ids.contains(r)));
            }
        }
    }
    Ok(out)
}

/// Takes `ids` out of the index, keeping them condemned, except those a snapshot committed
/// after `as_of` references (the proposer's mark did not see that snapshot), or any snapshot
/// does when reference lists were rewritten since (the mark may have read them mid-change).
pub(super) fn condemn(
    view: &dyn CatalogRead,
    tenant: &str,
    ids: &[ChunkId],
    as_of: u64,
    pass: u64,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let wanted: HashSet<ChunkId> = ids.iter().copied().collect();
    let keep = referenced_since(view, tenant, as_of, &wanted)?;
    let mut seen = HashSet::new();
    let candidates: Vec<ChunkId> = ids.iter().copied().filter(|id| !keep.contains(id) && seen.insert(*id)).collect();
    let keys = chunk_keys(tenant, &candidates);
    let (mut bytes, mut count) = (0u64, 0u64);
    for ((id, key), v) in candidates.iter().zip(&keys).zip(view.get_many(&keys)?) {
        let Some(v) = v else { continue };
        let entry: IndexEntry = decode(&v)?;
        w.push(Write::Delete(key.clone()));
        w.push(Write::Put(condemned_key(tenant, id), encode(&Condemned { entry, pass })));
        bytes += u64::from(entry.envelope_len);
        count += 1;
    }
    if count > 0 {
        bump_chunks(view, w, 0, count)?;
        let used = usage(view, tenant)?.saturating_sub(bytes);
        w.push(Write::Put(usage_key(tenant), used.to_be_bytes().to_vec()));
    }
    Ok(Outcome::Collected { chunks: count, bytes })
}

fn chunk_keys(tenant: &str, ids: &[ChunkId]) -> Vec<Vec<u8>> {
    ids.iter().map(|id| chunk_key(tenant, id)).collect()
}

/// Deletes, on every node, the copies of those `ids` that are not in the index: condemned ones
/// (their condemnation ends) and ones never indexed (left by uploads that failed). A chunk
/// indexed again since it was proposed is left alone.
pub(super) fn sweep(
    view: &dyn CatalogRead,
    tenant: &str,
    ids: &[ChunkId],
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let mut seen = HashSet::new();
    let ids: Vec<ChunkId> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
    let indexed = view.get_many(&chunk_keys(tenant, &ids))?;
    let gkeys: Vec<Vec<u8>> = ids.iter().map(|id| condemned_key(tenant, id)).collect();
    let cond = view.get_many(&gkeys)?;
    let (mut swept, mut bytes) = (Vec::new(), 0u64);
    for ((id, indexed), (gkey, cond)) in ids.iter().zip(indexed).zip(gkeys.into_iter().zip(cond)) {
        if indexed.is_some() {
            continue;
        }
        if let Some(c) = cond {
            bytes += u64::from(decode::<Condemned>(&c)?.entry.envelope_len);
            w.push(Write::Delete(gkey));
        }
        w.push(Write::DropChunk { tenant: tenant.to_string(), id: *id });
        w.push(Write::Delete(base_key(tenant, id)));
        swept.push(*id);
    }
    if swept.is_empty() {
        return Ok(Outcome::Collected { chunks: 0, bytes: 0 });
    }
    let mut st = state(view)?;
    st.sweep_seq += 1;
    let count = swept.len() as u64;
    w.push(Write::Put(sweep_key(st.sweep_seq), encode(&SweepRecord { tenant: tenant.to_string(), ids: swept })));
    if st.sweep_seq > SWEEP_RECORDS_KEPT {
        let dropped = st.sweep_seq - SWEEP_RECORDS_KEPT;
        w.push(Write::Delete(sweep_key(dropped)));
        st.sweep_floor = st.sweep_floor.max(dropped);
    }
    w.push(Write::Put(STATE_KEY.to_vec(), encode(&st)));
    Ok(Outcome::Collected { chunks: count, bytes })
}

/// Drops the staged references of a commit that never finished.
pub(super) fn drop_staged(
    view: &dyn CatalogRead,
    tenant: &str,
    snapshot_id: &str,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let mut n = 0u64;
    view.scan(&batches_prefix(b'p', tenant, snapshot_id), &mut |k, _| {
        w.push(Write::Delete(k.to_vec()));
        n += 1;
        true
    })?;
    Ok(Outcome::Collected { chunks: n, bytes: 0 })
}

/// Records a pass as done: its report, and the unfinished commits it saw.
pub(super) fn pass_done(
    view: &dyn CatalogRead,
    report: &GcReport,
    staged_seen: &[(String, String)],
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let mut st = state(view)?;
    st.pass = st.pass.max(report.pass);
    st.staged_seen = staged_seen.to_vec();
    st.last = Some(report.clone());
    w.push(Write::Put(STATE_KEY.to_vec(), encode(&st)));
    Ok(Outcome::Done)
}

// ---- The mark: which indexed chunks no snapshot references ----

/// One stored list of a snapshot's references (whole, or what its difference adds), read a
/// batch at a time. Lists are stored sorted and distinct, batch after batch; a list found out
/// of order stops the mark (nothing is condemned on a guess).
struct RefCursor {
    /// `r` (whole) or `e` (added by a difference).
    tag: u8,
    snapshot: String,
    batch: u32,
    ids: Vec<ChunkId>,
    pos: usize,
    last: Option<ChunkId>,
}

impl RefCursor {
    fn head(&self) -> Option<ChunkId> {
        self.ids.get(self.pos).copied()
    }

    /// Moves to the next reference, loading the next batch when this one is done.
    fn advance(&mut self, view: &dyn CatalogRead, tenant: &str) -> Result<(), CatalogError> {
        self.last = self.head();
        self.pos += 1;
        if self.pos >= self.ids.len() {
            self.batch += 1;
            self.ids = match view.get(&batch_key(self.tag, tenant, &self.snapshot, self.batch))? {
                Some(v) => decode(&v)?,
                None => Vec::new(),
            };
            self.pos = 0;
        }
        match (self.last, self.head()) {
            (Some(a), Some(b)) if b <= a => Err(CatalogError::Decode(format!(
                "references of snapshot {} are not in order; garbage collection stopped",
                self.snapshot
            ))),
            _ => Ok(()),
        }
    }
}

/// Walks a tenant's index in id order alongside every snapshot's sorted references (a k-way
/// merge): an indexed chunk that no reference list holds is garbage. Memory is one batch of
/// references per snapshot, whatever the size of the index.
pub struct Marker {
    tenant: String,
    cursors: Vec<RefCursor>,
    /// (head id, cursor), smallest first.
    heap: BinaryHeap<std::cmp::Reverse<(ChunkId, usize)>>,
    /// The next index key to read (`None`: the walk is over).
    next: Option<Vec<u8>>,
    /// Bases of indexed or condemned deltas (`delta_bases`), kept as if referenced.
    bases: Vec<ChunkId>,
    pub examined: u64,
}

impl Marker {
    /// A mark of `tenant` over the snapshots the catalog holds now. Read the commit sequence
    /// (`as_of`) before creating it: snapshots committed later are protected when condemning.
    pub fn new(view: &dyn CatalogRead, tenant: &str) -> Result<Marker, CatalogError> {
        let mut cursors = Vec::new();
        let mut heap = BinaryHeap::new();
        // Every whole list and every list a difference adds: their union is every snapshot's
        // references (`refs`, rule 3).
        for s in snapshots(view, tenant, None)? {
            for tag in [b'r', b'e'] {
                let ids: Vec<ChunkId> = match view.get(&batch_key(tag, tenant, &s.id, 0))? {
                    Some(v) => decode(&v)?,
                    None => continue,
                };
                let c = RefCursor { tag, snapshot: s.id.clone(), batch: 0, ids, pos: 0, last: None };
                if let Some(h) = c.head() {
                    heap.push(std::cmp::Reverse((h, cursors.len())));
                }
                cursors.push(c);
            }
        }
        Ok(Marker {
            tenant: tenant.to_string(),
            cursors,
            heap,
            next: Some(tenant_key(b'c', tenant)),
            bases: delta_bases(view, tenant)?,
            examined: 0,
        })
    }

    /// Up to `limit` more garbage chunks, in id order; an empty page means the walk is over.
    pub fn next_page(
        &mut self,
        view: &dyn CatalogRead,
        limit: usize,
    ) -> Result<Vec<(ChunkId, IndexEntry)>, CatalogError> {
        let prefix = tenant_key(b'c', &self.tenant);
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(start) = self.next.take() else { break };
            let mut page: Vec<(ChunkId, IndexEntry)> = Vec::new();
            let mut bad = None;
            view.scan_from(&prefix, &start, &mut |k, v| {
                match (<[u8; 32]>::try_from(&k[prefix.len()..]), decode::<IndexEntry>(v)) {
                    (Ok(id), Ok(e)) => page.push((ChunkId(id), e)),
                    (Err(_), _) => bad = Some(CatalogError::Decode("malformed index key".into())),
                    (_, Err(e)) => bad = Some(e),
                }
                bad.is_none() && page.len() < 4096
            })?;
            if let Some(e) = bad {
                return Err(e);
            }
            if page.len() >= 4096
                && let Some((last, _)) = page.last()
            {
                let mut k = chunk_key(&self.tenant, last);
                k.push(0);
                self.next = Some(k);
            }
            for (id, e) in page {
                self.examined += 1;
                if !self.referenced(view, &id)? {
                    out.push((id, e));
                }
            }
        }
        Ok(out)
    }

    /// Whether any snapshot references `id`; cursors move past everything smaller (index ids
    /// are asked in increasing order).
    fn referenced(&mut self, view: &dyn CatalogRead, id: &ChunkId) -> Result<bool, CatalogError> {
        if self.bases.binary_search(id).is_ok() {
            return Ok(true);
        }
        while let Some(std::cmp::Reverse((head, i))) = self.heap.peek().copied() {
            if head > *id {
                return Ok(false);
            }
            if head == *id {
                return Ok(true);
            }
            self.heap.pop();
            let c = &mut self.cursors[i];
            c.advance(view, &self.tenant)?;
            if let Some(h) = c.head() {
                self.heap.push(std::cmp::Reverse((h, i)));
            } else {
                // Done with this snapshot: free its batch.
                c.ids = Vec::new();
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Command, MemCatalog, apply, index_entry, snapshot};
    use super::*;
    use exclave::protocol::SnapshotInfo;
    use proptest::prelude::*;

    const T: &str = "lux";

    use crate::catalog::tests::{entry, id};

    fn snap(sid: &str, root: u8) -> SnapshotInfo {
        crate::catalog::tests::snap(sid, root, 1)
    }

    /// The catalog and the chunks physically held (one set standing for every node's copies).
    #[derive(Default)]
    struct World {
        cat: MemCatalog,
        held: HashSet<ChunkId>,
    }

    impl World {
        fn run(&mut self, cmd: &Command) -> Outcome {
            let (outcome, writes) = apply(&self.cat, cmd).unwrap();
            for w in &writes {
                if let Write::DropChunk { id, .. } = w {
                    self.held.remove(id);
                }
            }
            self.cat.write(writes);
            outcome
        }

        /// An upload as a node makes it: copies written now, indexed by `IndexChunksV2` (returned,
        /// to be applied now or later) based on the sweeps applied now.
        fn upload(&mut self, ns: &[u8]) -> Command {
            self.held.extend(ns.iter().map(|n| id(*n)));
            let sweep_seq = state(&self.cat).unwrap().sweep_seq;
            Command::IndexChunksV2 {
                tenant: T.into(),
                chunks: ns.iter().map(|n| (id(*n), entry(*n))).collect(),
                sweep_seq,
            }
        }

        /// An upload where chunk `n` of 8 and above is a delta on chunk `n - 8`.
        fn upload_deltas(&mut self, ns: &[u8]) -> Command {
            let Command::IndexChunksV2 { tenant, chunks, sweep_seq } = self.upload(ns) else { unreachable!() };
            let bases = ns.iter().filter(|n| **n >= 8).map(|n| (id(*n), id(*n - 8))).collect();
            Command::IndexChunksV4 { tenant, chunks, sweep_seq, bases }
        }

        fn commit(&mut self, sid: &str, root: u8, refs: &[u8]) -> Outcome {
            let ids = refs.iter().map(|n| id(*n)).collect();
            self.run(&Command::StageRefs { tenant: T.into(), snapshot_id: sid.into(), batch: 0, ids });
            self.run(&Command::Commit { tenant: T.into(), snapshot: snap(sid, root), batches: 1 })
        }

        /// A mark over the catalog as it is now: the condemn command to apply (now or later).
        fn mark(&self, pass: u64) -> Command {
            let as_of_seq = super::super::commit_seq(&self.cat).unwrap();
            let mut m = Marker::new(&self.cat, T).unwrap();
            let ids = m.next_page(&self.cat, usize::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
            Command::GcCondemn { tenant: T.into(), ids, as_of_seq, pass }
        }

        /// What a cluster pass sweeps: the condemned chunks but the bases of deltas.
        fn sweep_condemned(&mut self) -> Outcome {
            let kept = delta_bases(&self.cat, T).unwrap();
            let ids = condemned_page(&self.cat, T, None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| kept.binary_search(id).is_err())
                .collect();
            self.run(&Command::GcSweep { tenant: T.into(), ids })
        }

        /// Nothing the catalog names is gone: every indexed or condemned chunk is held, and
        /// every reference of every snapshot is indexed.
        fn check(&self) -> Result<(), TestCaseError> {
            for k in self.cat.0.keys() {
                if k[0] == b'c' || k[0] == b'g' {
                    let id = ChunkId(k[k.len() - 32..].try_into().unwrap());
                    prop_assert!(self.held.contains(&id), "{} names a chunk no node holds", k[0] as char);
                }
            }
            for s in snapshots(&self.cat, T, None).unwrap() {
                for r in super::super::refs::references(&self.cat, T, &s.id).unwrap() {
                    prop_assert!(
                        index_entry(&self.cat, T, &r).unwrap().is_some(),
                        "a snapshot's reference left the index"
                    );
                    if let Some(b) = self.cat.get(&base_key(T, &r)).unwrap() {
                        let b = ChunkId(b.try_into().unwrap());
                        prop_assert!(
                            index_entry(&self.cat, T, &b).unwrap().is_some(),
                            "the base of a referenced delta left the index"
                        );
                    }
                }
            }
            Ok(())
        }
    }

    #[test]
    fn unreferenced_chunks_are_condemned_put_back_by_a_commit_and_swept_later() {
        let mut w = World::default();
        let up = w.upload(&[1, 2, 3, 4]);
        assert_eq!(w.run(&up), Outcome::Done);
        assert!(matches!(w.commit("s1", 1, &[2]), Outcome::Committed(_)));
        // 3 and 4 are referenced by nothing.
        let mark = w.mark(1);
        assert_eq!(w.run(&mark), Outcome::Collected { chunks: 2, bytes: 103 + 104 });
        assert_eq!(usage(&w.cat, T).unwrap(), 101 + 102);
        assert!(index_entry(&w.cat, T, &id(3)).unwrap().is_none());
        // A backup told earlier that 3 exists commits: 3 is put back, no upload needed.
        let s2 = w.commit("s2", 1, &[3]);
        assert!(matches!(&s2, Outcome::Committed(s) if s.stored_bytes == 101 + 103), "{s2:?}");
        assert_eq!(usage(&w.cat, T).unwrap(), 101 + 102 + 103);
        // 4 is swept: every node drops it, and a commit needing it is told to send it.
        assert_eq!(w.sweep_condemned(), Outcome::Collected { chunks: 1, bytes: 104 });
        assert!(!w.held.contains(&id(4)));
        assert_eq!(w.commit("s3", 1, &[4]), Outcome::Missing(vec![id(4)]));
        assert_eq!(state(&w.cat).unwrap().sweep_seq, 1);
        w.check().unwrap();
    }

    #[test]
    fn a_commit_keeps_the_bases_of_its_deltas_and_gc_takes_a_base_after_its_last_delta() {
        let mut w = World::default();
        let up = w.upload(&[1, 2]);
        w.run(&up);
        // 9 is a delta on 1, 10 on 2.
        let up = w.upload_deltas(&[9, 10]);
        assert_eq!(w.run(&up), Outcome::Done);
        assert!(w.cat.get(&base_key(T, &id(9))).unwrap().is_some());
        // A snapshot referencing only the deltas keeps their bases too.
        let s1 = w.commit("s1", 9, &[9]);
        assert!(matches!(&s1, Outcome::Committed(s) if s.chunks == 2 && s.stored_bytes == 109 + 101), "{s1:?}");
        // 2 and 10 are garbage, but 2 is the base of a delta the index holds: 10 goes first.
        let mark = w.mark(1);
        assert_eq!(w.run(&mark), Outcome::Collected { chunks: 1, bytes: 110 });
        assert!(index_entry(&w.cat, T, &id(1)).unwrap().is_some(), "a base a snapshot needs was condemned");
        assert!(index_entry(&w.cat, T, &id(2)).unwrap().is_some(), "the base of an indexed delta was condemned");
        assert_eq!(w.sweep_condemned(), Outcome::Collected { chunks: 1, bytes: 110 });
        assert!(w.cat.get(&base_key(T, &id(10))).unwrap().is_none(), "the record of 10's base is swept with it");
        // Its last delta gone, the base is collected by the next pass.
        let mark = w.mark(2);
        assert_eq!(w.run(&mark), Outcome::Collected { chunks: 1, bytes: 102 });
        assert_eq!(w.sweep_condemned(), Outcome::Collected { chunks: 1, bytes: 102 });
        // Forgotten: the delta is condemned, its base kept while the delta may come back.
        w.run(&Command::Forget { tenant: T.into(), snapshot_id: "s1".into() });
        let mark = w.mark(3);
        assert_eq!(w.run(&mark), Outcome::Collected { chunks: 1, bytes: 109 });
        assert!(index_entry(&w.cat, T, &id(1)).unwrap().is_some());
        // A backup told 9 exists commits it: it comes back from condemnation, its base with it.
        assert!(matches!(w.commit("s2", 9, &[9]), Outcome::Committed(s) if s.chunks == 2));
        assert!(index_entry(&w.cat, T, &id(1)).unwrap().is_some());
        w.check().unwrap();
        // Before `IndexChunksV4` a delta was indexed on a swept base, and no commit of it could
        // pass; now it is refused, to be sent again whole.
        let up = w.upload(&[3]);
        w.run(&up);
        let mark = w.mark(5);
        w.run(&mark);
        w.sweep_condemned();
        let Command::IndexChunksV4 { tenant, chunks, sweep_seq, bases } = w.upload_deltas(&[11]) else {
            unreachable!()
        };
        let old = Command::IndexChunksV3 { tenant, chunks, sweep_seq, bases };
        w.run(&old);
        assert_eq!(w.commit("s3", 11, &[11]), Outcome::Missing(vec![id(3)]));
        let Command::IndexChunksV4 { tenant, chunks, sweep_seq, .. } = w.upload_deltas(&[27]) else { unreachable!() };
        let up = Command::IndexChunksV4 { tenant, chunks, sweep_seq, bases: vec![(id(27), id(3))] };
        assert_eq!(w.run(&up), Outcome::Indexed { refused: vec![], base_gone: vec![id(27)] });
        assert!(index_entry(&w.cat, T, &id(27)).unwrap().is_none());
        assert!(w.cat.get(&base_key(T, &id(27))).unwrap().is_none());
    }

    #[test]
    fn a_delta_on_a_condemned_base_puts_it_back_and_one_on_a_base_in_the_same_upload_is_indexed() {
        let mut w = World::default();
        let up = w.upload(&[1, 2]);
        w.run(&up);
        let mark = w.mark(1);
        assert_eq!(w.run(&mark), Outcome::Collected { chunks: 2, bytes: 101 + 102 });
        // 9 on 1 (condemned): 1 is put back, with its count and bytes.
        let up = w.upload_deltas(&[9]);
        assert_eq!(w.run(&up), Outcome::Done);
        assert!(index_entry(&w.cat, T, &id(1)).unwrap().is_some());
        assert!(w.cat.get(&condemned_key(T, &id(1))).unwrap().is_none());
        // A sweep proposed before that upload takes only 2.
        assert_eq!(
            w.run(&Command::GcSweep { tenant: T.into(), ids: vec![id(1), id(2)] }),
            Outcome::Collected { chunks: 1, bytes: 102 }
        );
        // 11 on 3, both in one upload.
        let up = w.upload_deltas(&[3, 11]);
        assert_eq!(w.run(&up), Outcome::Done);
        assert!(index_entry(&w.cat, T, &id(11)).unwrap().is_some());
        assert_eq!(super::super::stats(&w.cat).unwrap().chunks, 4);
        assert_eq!(usage(&w.cat, T).unwrap(), 101 + 103 + 109 + 111);
        w.check().unwrap();
    }

    #[test]
    fn a_chunk_swept_after_an_uploader_looked_is_refused_and_a_new_upload_indexes_it() {
        let mut w = World::default();
        let up = w.upload(&[5]);
        w.run(&up);
        let mark = w.mark(1);
        w.run(&mark);
        // A node looks (it holds 5, so it writes nothing) based on the sweeps so far...
        let late = Command::IndexChunksV2 { tenant: T.into(), chunks: vec![(id(5), entry(5))], sweep_seq: 0 };
        // ...then 5 is swept before its index entry is applied.
        w.sweep_condemned();
        assert!(!w.held.contains(&id(5)));
        assert_eq!(w.run(&late), Outcome::Indexed { refused: vec![id(5)], base_gone: vec![] });
        assert!(index_entry(&w.cat, T, &id(5)).unwrap().is_none(), "an entry with no copy behind it");
        // Stored again after the sweep: indexed.
        let again = w.upload(&[5]);
        assert_eq!(w.run(&again), Outcome::Done);
        // A chunk never swept is indexed whatever sweeps happened.
        let other = Command::IndexChunksV2 { tenant: T.into(), chunks: vec![(id(6), entry(6))], sweep_seq: 0 };
        w.held.insert(id(6));
        assert_eq!(w.run(&other), Outcome::Done);
        w.check().unwrap();
    }

    #[test]
    fn a_snapshot_committed_after_the_mark_keeps_its_chunks() {
        let mut w = World::default();
        let up = w.upload(&[1, 2]);
        w.run(&up);
        let stale = w.mark(1); // sees no snapshot: both look like garbage
        assert!(matches!(w.commit("s1", 1, &[2]), Outcome::Committed(_)));
        assert_eq!(w.run(&stale), Outcome::Collected { chunks: 0, bytes: 0 });
        assert!(snapshot(&w.cat, T, "s1").unwrap().is_some());
        w.check().unwrap();
    }

    #[test]
    fn sweep_records_are_bounded_and_an_uploader_older_than_them_is_refused() {
        let mut w = World::default();
        for n in 0..(SWEEP_RECORDS_KEPT as u8 + 3) {
            w.held.insert(id(n));
            w.run(&Command::GcSweep { tenant: T.into(), ids: vec![id(n)] });
        }
        let st = state(&w.cat).unwrap();
        assert_eq!(st.sweep_seq, SWEEP_RECORDS_KEPT + 3);
        assert_eq!(st.sweep_floor, 3);
        assert_eq!(w.cat.0.keys().filter(|k| k[0] == b'x').count() as u64, SWEEP_RECORDS_KEPT);
        w.held.insert(id(200));
        let old = Command::IndexChunksV2 { tenant: T.into(), chunks: vec![(id(200), entry(200))], sweep_seq: 2 };
        assert_eq!(
            w.run(&old),
            Outcome::Indexed { refused: vec![id(200)], base_gone: vec![] },
            "cannot be checked: refused"
        );
        let recent = Command::IndexChunksV2 { tenant: T.into(), chunks: vec![(id(200), entry(200))], sweep_seq: 3 };
        assert_eq!(w.run(&recent), Outcome::Done);
    }

    #[test]
    fn the_mark_walks_many_batches_of_many_snapshots() {
        // More references than one stored batch holds, and more index entries than one page.
        let n = 40_000u32;
        let big = |i: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            ChunkId(b)
        };
        let mut w = World::default();
        let chunks: Vec<(ChunkId, IndexEntry)> = (0..n).map(|i| (big(i), entry(1))).collect();
        w.held.extend(chunks.iter().map(|(id, _)| *id));
        w.run(&Command::IndexChunks { tenant: T.into(), chunks });
        for (sid, keep) in [("a", 2u32), ("b", 3)] {
            let ids: Vec<ChunkId> = (0..n).filter(|i| i % keep == 0).map(big).collect();
            let mut batches = 0;
            for (b, part) in ids.chunks(10_000).enumerate() {
                w.run(&Command::StageRefs {
                    tenant: T.into(),
                    snapshot_id: sid.into(),
                    batch: b as u32,
                    ids: part.to_vec(),
                });
                batches += 1;
            }
            let out = w.run(&Command::Commit { tenant: T.into(), snapshot: snap(sid, 0), batches });
            assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
        }
        assert!(w.cat.0.keys().filter(|k| k[0] == b'r').count() >= 3, "references stored in several batches");
        let mut m = Marker::new(&w.cat, T).unwrap();
        let mut garbage = Vec::new();
        loop {
            let page = m.next_page(&w.cat, 1000).unwrap();
            if page.is_empty() {
                break;
            }
            garbage.extend(page.into_iter().map(|(id, _)| id));
        }
        let expect: Vec<ChunkId> = (0..n).filter(|i| i % 2 != 0 && i % 3 != 0).map(big).collect();
        assert_eq!(garbage.len(), expect.len());
        assert!(garbage == expect, "exactly the chunks neither snapshot references, in order");
        assert_eq!(m.examined, u64::from(n));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Upload these chunks; the index entry is applied now or queued; chunks from 8 up
        /// as deltas on the chunk 8 below.
        Upload(Vec<u8>, bool, bool),
        /// Apply the oldest queued index entry or condemn.
        ApplyQueued(bool),
        Commit(u8, u8, Vec<u8>),
        /// Store the second newest snapshot as a difference from the newest.
        Pack,
        Forget(u8),
        /// Mark now; condemn now or queue it.
        Mark(bool),
        SweepCondemned,
        /// Sweep any ids (as a node proposing its orphans does).
        Sweep(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let ids = || prop::collection::vec(0u8..16, 0..6);
        prop_oneof![
            (ids(), any::<bool>(), any::<bool>()).prop_map(|(n, now, d)| Op::Upload(n, now, d)),
            any::<bool>().prop_map(Op::ApplyQueued),
            (0u8..4, 0u8..16, ids()).prop_map(|(s, r, n)| Op::Commit(s, r, n)),
            Just(Op::Pack),
            (0u8..4).prop_map(Op::Forget),
            any::<bool>().prop_map(Op::Mark),
            Just(Op::SweepCondemned),
            ids().prop_map(Op::Sweep),
        ]
    }

    proptest! {
        /// Whatever the interleaving of uploads, commits, forgets, marks applied late, and
        /// sweeps: nothing a snapshot references leaves the index, and nothing the index names
        /// (or holds condemned) is deleted from the nodes.
        #[test]
        fn gc_never_loses_what_a_snapshot_or_the_index_needs(ops in prop::collection::vec(op(), 0..80)) {
            let mut w = World::default();
            w.cat.write(crate::catalog::founding_writes());
            let mut queued: std::collections::VecDeque<Command> = Default::default();
            let mut pass = 0;
            for op in ops {
                match op {
                    Op::Upload(ns, now, deltas) => {
                        let cmd = if deltas { w.upload_deltas(&ns) } else { w.upload(&ns) };
                        if now { w.run(&cmd); } else { queued.push_back(cmd); }
                    }
                    Op::ApplyQueued(oldest) => {
                        let cmd = if oldest { queued.pop_front() } else { queued.pop_back() };
                        if let Some(cmd) = cmd { w.run(&cmd); }
                    }
                    Op::Commit(s, root, refs) => { w.commit(&format!("s{s}"), root, &refs); }
                    Op::Pack => { w.run(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }); }
                    Op::Forget(s) => { w.run(&Command::Forget { tenant: T.into(), snapshot_id: format!("s{s}") }); }
                    Op::Mark(now) => {
                        pass += 1;
                        let cmd = w.mark(pass);
                        if now { w.run(&cmd); } else { queued.push_back(cmd); }
                    }
                    Op::SweepCondemned => { w.sweep_condemned(); }
                    Op::Sweep(ns) => { w.run(&Command::GcSweep { tenant: T.into(), ids: ns.iter().map(|n| id(*n)).collect() }); }
                }
                w.check()?;
                prop_assert_eq!(super::super::stats(&w.cat).unwrap().chunks, super::super::count(&w.cat, b"c").unwrap());
                let used: u64 = w.cat.0.iter().filter(|(k, _)| k[0] == b'c').map(|(_, v)| u64::from(decode::<IndexEntry>(v).unwrap().envelope_len)).sum();
                prop_assert_eq!(usage(&w.cat, T).unwrap(), used);
            }
        }
    }
}
