//! A snapshot's references as the catalog stores them: whole, or as its difference from a
//! newer snapshot of the same source.
//!
//! A register kept a month references nearly the same chunks every day: stored whole, every
//! snapshot would cost 32 bytes per chunk of the whole register, and the catalog (copied to
//! every node, streamed to every node that joins) would grow with chunks × snapshots. Stored
//! as differences, each kept snapshot costs what changed since the next one.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! r ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)   → postcard(Vec<ChunkId>)   the whole list, sorted, distinct
//! B ‖ tenant ‖ 0 ‖ id                        → base snapshot id         stored as a difference from it
//! e ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)   → postcard(Vec<ChunkId>)   references its base lacks
//! f ‖ tenant ‖ 0 ‖ id ‖ 0 ‖ batch (u32 BE)   → postcard(Vec<ChunkId>)   its base's references it lacks
//! ```
//!
//! # Invariants (kept by `pack` and `forget`, relied on by garbage collection)
//!
//! 1. A snapshot's references are stored one way: whole (`r`), or as a difference (`B`, `e`,
//!    `f`): refs(S) = (refs(base) ∖ f) ∪ e, with e disjoint from refs(base) and f within it.
//! 2. A base is a snapshot of the same tenant and source that is in the catalog and was
//!    committed later (higher commit sequence). So every chain ends at a whole list, and no
//!    chain has a cycle.
//! 3. Hence **the union of every snapshot's references is the union of every `r` and `e`
//!    list**: a reference of S that its base lacks is in S's `e`, and one its base has is, by
//!    induction along the chain, in a list of a snapshot committed later. The GC mark reads
//!    exactly those lists and walks no chain (`gc::Marker`). Likewise the references of the
//!    snapshots committed after a mark lie within their own `r` and `e` lists (their bases were
//!    committed later still): what `gc::referenced_since` reads.
//! 4. Only `PackRefs` makes a difference, only in clusters whose catalog allows it
//!    (`catalog::packs_refs`: from the founding of a cluster by nodes that know this layout,
//!    or from `cluster finalize-upgrade`), and only where the difference is at most a quarter
//!    of the whole list.

use std::collections::{HashMap, HashSet};

use exclave::chunk_id::ChunkId;
use exclave::sorted_ids;

use super::{
    CatalogError, CatalogRead, Outcome, REFS_PER_BATCH, Write, batch_key, batches_prefix, encode, scan_decoded,
    snapshots, tenant_key,
};

/// A difference is kept only when it is at most 1/`PACK_RATIO` of the whole list.
///
/// ```text
/// R ‖ tenant ‖ 0   → u64 BE   the commit sequence when a surviving snapshot's lists were last rewritten
/// ```
///
/// A GC mark reads lists page by page while commands apply: one rewritten under it (packed,
/// re-based) may be read half old, half new. Condemning then checks every list
/// (`rewritten_since`), not only those of snapshots committed after the mark began.
const PACK_RATIO: usize = 4;

fn base_key(tenant: &str, id: &str) -> Vec<u8> {
    let mut k = tenant_key(b'B', tenant);
    k.extend_from_slice(id.as_bytes());
    k
}

fn rewritten_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'R', tenant)
}

fn mark_rewritten(view: &dyn CatalogRead, tenant: &str, w: &mut Vec<Write>) -> Result<(), CatalogError> {
    w.push(Write::Put(rewritten_key(tenant), super::commit_seq(view)?.to_be_bytes().to_vec()));
    Ok(())
}

/// Whether a surviving snapshot's lists of `tenant` were rewritten at or after commit sequence
/// `as_of` (when a GC mark began).
pub fn rewritten_since(view: &dyn CatalogRead, tenant: &str, as_of: u64) -> Result<bool, CatalogError> {
    Ok(view
        .get(&rewritten_key(tenant))?
        .and_then(|v| v.try_into().ok())
        .map(u64::from_be_bytes)
        .is_some_and(|r| r >= as_of))
}

/// The snapshot `id` is stored as a difference from, if it is.
pub fn base(view: &dyn CatalogRead, tenant: &str, id: &str) -> Result<Option<String>, CatalogError> {
    Ok(view.get(&base_key(tenant, id))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// One stored list (`r`, `e` or `f`), its batches joined.
fn read_list(view: &dyn CatalogRead, tag: u8, tenant: &str, id: &str) -> Result<Vec<ChunkId>, CatalogError> {
    let batches = scan_decoded::<Vec<ChunkId>>(view, &batches_prefix(tag, tenant, id))?;
    let ids: Vec<ChunkId> = batches.into_iter().flat_map(|(_, ids)| ids).collect();
    if !sorted_ids::is_strictly_ascending(&ids) {
        return Err(CatalogError::Decode(format!("the references of snapshot {id} are not in order")));
    }
    Ok(ids)
}

fn put_list(tag: u8, tenant: &str, id: &str, ids: &[ChunkId], w: &mut Vec<Write>) {
    for (i, part) in ids.chunks(REFS_PER_BATCH).enumerate() {
        w.push(Write::Put(batch_key(tag, tenant, id, i as u32), encode(&part.to_vec())));
    }
}

fn delete_list(
    view: &dyn CatalogRead,
    tag: u8,
    tenant: &str,
    id: &str,
    w: &mut Vec<Write>,
) -> Result<(), CatalogError> {
    view.scan(&batches_prefix(tag, tenant, id), &mut |k, _| {
        w.push(Write::Delete(k.to_vec()));
        true
    })
}

/// Stores a new snapshot's references, whole (`commit`).
pub(super) fn put_whole(tenant: &str, id: &str, refs: &[ChunkId], w: &mut Vec<Write>) {
    put_list(b'r', tenant, id, refs, w);
}

/// refs(S) from refs(base) and S's difference.
fn apply_difference(base: &[ChunkId], extra: &[ChunkId], lacks: &[ChunkId]) -> Vec<ChunkId> {
    sorted_ids::union(&sorted_ids::difference(base, lacks), extra)
}

/// S's difference from C, from S's from B and B's from C.
fn compose((e1, f1): (Vec<ChunkId>, Vec<ChunkId>), (e2, f2): (&[ChunkId], &[ChunkId])) -> (Vec<ChunkId>, Vec<ChunkId>) {
    // x ∈ S ∖ C ⇔ (x ∈ e1, x ∉ f2) or (x ∈ e2, x ∉ f1);
    // x ∈ C ∖ S ⇔ (x ∈ f2, x ∉ e1) or (x ∈ f1, x ∉ e2).
    let extra = sorted_ids::union(&sorted_ids::difference(&e1, f2), &sorted_ids::difference(e2, &f1));
    let lacks = sorted_ids::union(&sorted_ids::difference(f2, &e1), &sorted_ids::difference(&f1, e2));
    (extra, lacks)
}

/// Longest chain followed before the catalog is called damaged (a cycle is impossible by
/// rule 2, unless someone edited the store).
const MAX_CHAIN: usize = 1 << 20;

/// The snapshots from `id` along its chain to the one stored whole (last).
fn chain(view: &dyn CatalogRead, tenant: &str, id: &str) -> Result<Vec<String>, CatalogError> {
    let mut out = vec![id.to_string()];
    let mut at = id.to_string();
    while let Some(b) = base(view, tenant, &at)? {
        if out.len() > MAX_CHAIN {
            return Err(CatalogError::Decode(format!("the reference chain of snapshot {id} does not end")));
        }
        out.push(b.clone());
        at = b;
    }
    Ok(out)
}

/// Every reference of snapshot `id`, sorted (walks its chain; GC never needs it: rule 3).
#[cfg(test)]
pub fn references(view: &dyn CatalogRead, tenant: &str, id: &str) -> Result<Vec<ChunkId>, CatalogError> {
    let chain = chain(view, tenant, id)?;
    let (whole, diffs) = chain.split_last().expect("a chain holds its start");
    let mut refs = read_list(view, b'r', tenant, whole)?;
    for s in diffs.iter().rev() {
        refs = apply_difference(&refs, &read_list(view, b'e', tenant, s)?, &read_list(view, b'f', tenant, s)?);
    }
    Ok(refs)
}

/// Whether snapshot `id` references `chunk`.
pub fn references_chunk(view: &dyn CatalogRead, tenant: &str, id: &str, chunk: &ChunkId) -> Result<bool, CatalogError> {
    let chain = chain(view, tenant, id)?;
    let (whole, diffs) = chain.split_last().expect("a chain holds its start");
    for s in diffs {
        if sorted_ids::contains(&read_list(view, b'e', tenant, s)?, chunk) {
            return Ok(true);
        }
        if sorted_ids::contains(&read_list(view, b'f', tenant, s)?, chunk) {
            return Ok(false);
        }
    }
    Ok(sorted_ids::contains(&read_list(view, b'r', tenant, whole)?, chunk))
}

/// `PackRefs`: the second newest snapshot of `source` (by commit) becomes a difference from
/// the newest, when both are whole and the difference is small (rule 4).
pub(super) fn pack(
    view: &dyn CatalogRead,
    tenant: &str,
    source: &str,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let mut snaps = snapshots(view, tenant, Some(source))?;
    snaps.sort_by_key(|s| s.commit_seq);
    let [.., older, newest] = snaps.as_slice() else { return Ok(Outcome::Done) };
    if base(view, tenant, &older.id)?.is_some() || base(view, tenant, &newest.id)?.is_some() {
        return Ok(Outcome::Done);
    }
    let old = read_list(view, b'r', tenant, &older.id)?;
    let new = read_list(view, b'r', tenant, &newest.id)?;
    let extra = sorted_ids::difference(&old, &new);
    let lacks = sorted_ids::difference(&new, &old);
    if (extra.len() + lacks.len()) * PACK_RATIO > old.len() {
        return Ok(Outcome::Done);
    }
    mark_rewritten(view, tenant, w)?;
    delete_list(view, b'r', tenant, &older.id, w)?;
    put_list(b'e', tenant, &older.id, &extra, w);
    put_list(b'f', tenant, &older.id, &lacks, w);
    w.push(Write::Put(base_key(tenant, &older.id), newest.id.as_bytes().to_vec()));
    Ok(Outcome::Done)
}

/// Drops the references of the snapshots `gone` (forgotten in this same command), and
/// re-bases every surviving snapshot stored as a difference from one of them: onto the first
/// survivor along its chain (composing the differences), or whole when the chain ended among
/// the forgotten. Every list is read from `view`, the state before this command, so forgetting
/// several snapshots of one chain at once is one consistent step.
pub(super) fn forget(
    view: &dyn CatalogRead,
    tenant: &str,
    gone: &[String],
    w: &mut Vec<Write>,
) -> Result<(), CatalogError> {
    if gone.is_empty() {
        return Ok(());
    }
    let prefix = tenant_key(b'B', tenant);
    let mut base_of: HashMap<String, String> = HashMap::new();
    view.scan(&prefix, &mut |k, v| {
        base_of
            .insert(String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), String::from_utf8_lossy(v).into_owned());
        true
    })?;
    let gone_set: HashSet<&str> = gone.iter().map(String::as_str).collect();
    for id in gone {
        for tag in [b'r', b'e', b'f'] {
            delete_list(view, tag, tenant, id, w)?;
        }
        w.push(Write::Delete(base_key(tenant, id)));
    }
    // In a fixed order, so every node writes alike.
    let mut orphans: Vec<(&String, &String)> =
        base_of.iter().filter(|(id, b)| !gone_set.contains(id.as_str()) && gone_set.contains(b.as_str())).collect();
    orphans.sort();
    if !orphans.is_empty() {
        mark_rewritten(view, tenant, w)?;
    }
    for (id, first) in orphans {
        let mut diff = (read_list(view, b'e', tenant, id)?, read_list(view, b'f', tenant, id)?);
        // Rewritten either way: as a difference from another base, or whole.
        for tag in [b'e', b'f'] {
            delete_list(view, tag, tenant, id, w)?;
        }
        let mut b = first.clone();
        let mut steps = 0usize;
        loop {
            if !gone_set.contains(b.as_str()) {
                put_list(b'e', tenant, id, &diff.0, w);
                put_list(b'f', tenant, id, &diff.1, w);
                w.push(Write::Put(base_key(tenant, id), b.as_bytes().to_vec()));
                break;
            }
            match base_of.get(&b) {
                Some(next) => {
                    let (e2, f2) = (read_list(view, b'e', tenant, &b)?, read_list(view, b'f', tenant, &b)?);
                    diff = compose(diff, (&e2, &f2));
                    b = next.clone();
                }
                None => {
                    // The chain ended at a forgotten whole list: this snapshot becomes whole.
                    let whole = apply_difference(&read_list(view, b'r', tenant, &b)?, &diff.0, &diff.1);
                    w.push(Write::Delete(base_key(tenant, id)));
                    put_list(b'r', tenant, id, &whole, w);
                    break;
                }
            }
            steps += 1;
            if steps > base_of.len() {
                return Err(CatalogError::Decode(format!("the reference chain of snapshot {id} does not end")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use exclave::retention::RetentionPolicy;
    use proptest::prelude::*;

    use super::super::tests::{entry, id, snap};
    use super::super::*;
    use super::*;

    const T: &str = "lux";
    const T0: i64 = 1_795_000_000;

    #[derive(Debug, Clone)]
    enum Op {
        /// Commit the register as it is after toggling these chunks in or out of it.
        Commit(Vec<u8>),
        /// Commit a register changed beyond what a difference is worth.
        Rewrite,
        Pack,
        /// Forget the n-th listed snapshot.
        Forget(usize),
        /// An administrator's keep-last policy: forgets several snapshots in one command.
        KeepLast(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(0u8..120, 0..8).prop_map(Op::Commit),
            1 => Just(Op::Rewrite),
            4 => Just(Op::Pack),
            2 => (0usize..8).prop_map(Op::Forget),
            1 => (1u32..5).prop_map(Op::KeepLast),
        ]
    }

    /// Every stored list of the tenant of one tag, joined.
    fn stored(c: &MemCatalog, tag: u8) -> BTreeSet<ChunkId> {
        let prefix = tenant_key(tag, T);
        c.0.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .flat_map(|(_, v)| decode::<Vec<ChunkId>>(v).unwrap())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever is committed, packed and forgotten (several at once included): every listed
        /// snapshot's references are what it committed, a chunk is found in exactly the
        /// snapshots that reference it, the whole and added lists together hold every
        /// reference (what GC reads), and every base is a later snapshot still listed.
        #[test]
        fn every_snapshot_keeps_its_references_whatever_is_packed_or_forgotten(ops in prop::collection::vec(op(), 1..40)) {
            let mut c = MemCatalog::default();
            c.write(founding_writes());
            let chunks = (0..=255u8).map(|n| (id(n), entry(n))).collect();
            c.apply(&Command::IndexChunks { tenant: T.into(), chunks }).unwrap();
            c.apply(&Command::SetProtection { tenant: T.into(), protection: Protection { days: 0 } }).unwrap();
            let mut register: BTreeSet<u8> = (0..100).collect();
            let mut model: BTreeMap<String, BTreeSet<ChunkId>> = BTreeMap::new();
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Commit(_) | Op::Rewrite => {
                        match &op {
                            Op::Commit(toggles) => for t in toggles {
                                if !register.remove(t) { register.insert(*t); }
                            },
                            _ => register = register.iter().map(|x| x.wrapping_add(128)).collect(),
                        }
                        n += 1;
                        let sid = format!("s{n:03}");
                        let ids: Vec<ChunkId> = register.iter().rev().map(|x| id(*x)).collect();
                        let stage = Command::StageRefs { tenant: T.into(), snapshot_id: sid.clone(), batch: 0, ids };
                        c.apply(&stage).unwrap();
                        let s = snap(&sid, 250, T0 + n * 60);
                        let cmd = Command::CommitV2 { tenant: T.into(), snapshot: s, batches: 1, now: T0 + n * 60 };
                        prop_assert!(matches!(c.apply(&cmd).unwrap(), Outcome::Committed(_)));
                        model.insert(sid, register.iter().map(|x| id(*x)).chain([id(250)]).collect());
                    }
                    Op::Pack => {
                        c.apply(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }).unwrap();
                    }
                    Op::Forget(i) => {
                        let listed = snapshots(&c, T, None).unwrap();
                        if let Some(s) = listed.get(i % listed.len().max(1)) {
                            let cmd = Command::Forget { tenant: T.into(), snapshot_id: s.id.clone() };
                            prop_assert_eq!(c.apply(&cmd).unwrap(), Outcome::Done);
                        }
                    }
                    Op::KeepLast(k) => {
                        let policy = RetentionPolicy { keep_last: k, ..Default::default() };
                        let cmd = Command::SetRetentionV2 { tenant: T.into(), source: "rnpp".into(), policy, by_admin: true };
                        c.apply(&cmd).unwrap();
                    }
                }
                let listed: BTreeMap<String, SnapshotInfo> =
                    snapshots(&c, T, None).unwrap().into_iter().map(|s| (s.id.clone(), s)).collect();
                model.retain(|k, _| listed.contains_key(k));
                prop_assert_eq!(model.len(), listed.len());
                let mut all = BTreeSet::new();
                for (sid, want) in &model {
                    let got = references(&c, T, sid).unwrap();
                    prop_assert_eq!(&got.iter().copied().collect::<BTreeSet<_>>(), want, "{}", sid);
                    prop_assert_eq!(got.len(), want.len());
                    for x in [0u8, 7, 50, 99, 100, 119, 128, 200, 250] {
                        prop_assert_eq!(references_chunk(&c, T, sid, &id(x)).unwrap(), want.contains(&id(x)));
                    }
                    if let Some(b) = base(&c, T, sid).unwrap() {
                        let later = listed.get(&b).map(|s| s.commit_seq);
                        prop_assert!(later > Some(listed[sid].commit_seq), "{} is based on {} ({:?})", sid, b, later);
                        prop_assert!(!c.0.keys().any(|k| k.starts_with(&batches_prefix(b'r', T, sid))), "stored both ways");
                    }
                    all.extend(want.iter().copied());
                }
                let mut lists = stored(&c, b'r');
                lists.extend(stored(&c, b'e'));
                prop_assert_eq!(lists, all.clone(), "the lists GC reads are not every reference");
                // And a mark finds garbage exactly what no snapshot references.
                let mut marker = super::super::gc::Marker::new(&c, T).unwrap();
                let garbage: BTreeSet<ChunkId> =
                    marker.next_page(&c, usize::MAX).unwrap().into_iter().map(|(id, _)| id).collect();
                let unreferenced: BTreeSet<ChunkId> = (0..=255u8).map(id).filter(|x| !all.contains(x)).collect();
                prop_assert_eq!(garbage, unreferenced);
            }
        }
    }

    #[test]
    fn a_month_of_daily_snapshots_stores_about_one_whole_list() {
        let mut c = MemCatalog::default();
        c.write(founding_writes());
        let chunks = (0..=255u8).map(|n| (id(n), entry(n))).collect();
        c.apply(&Command::IndexChunks { tenant: T.into(), chunks }).unwrap();
        let mut register: Vec<u8> = (0..200).collect();
        for day in 0..30i64 {
            // About 1 % of the register changes a day: two chunks out, two in.
            register.retain(|x| (*x as i64 + day) % 97 != 0);
            register.extend([200 + (day % 50) as u8]);
            register.sort_unstable();
            register.dedup();
            let sid = format!("d{day:02}");
            let ids = register.iter().map(|x| id(*x)).collect();
            c.apply(&Command::StageRefs { tenant: T.into(), snapshot_id: sid.clone(), batch: 0, ids }).unwrap();
            let now = T0 + day * 86_400;
            let cmd = Command::CommitV2 { tenant: T.into(), snapshot: snap(&sid, 250, now), batches: 1, now };
            assert!(matches!(c.apply(&cmd).unwrap(), Outcome::Committed(_)));
            c.apply(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }).unwrap();
        }
        let ids_stored = |tags: &[u8]| tags.iter().map(|t| stored_count(&c, *t)).sum::<usize>();
        let whole = ids_stored(b"r");
        assert!(whole <= 2 * 201, "whole lists: {whole} ids");
        assert!(ids_stored(b"ref") < 3 * 201, "30 snapshots stored in {} ids", ids_stored(b"ref"));
        assert_eq!(c.0.keys().filter(|k| k[0] == b'B').count(), 29);
    }

    #[test]
    fn a_catalog_of_the_older_layout_packs_only_after_the_upgrade_is_finalised() {
        let mut c = MemCatalog::default();
        assert_eq!(layout(&c).unwrap(), 0);
        let chunks = (0..=255u8).map(|n| (id(n), entry(n))).collect();
        c.apply(&Command::IndexChunks { tenant: T.into(), chunks }).unwrap();
        for (n, sid) in ["s1", "s2", "s3"].iter().enumerate() {
            let ids = (n as u8..100).map(id).collect();
            c.apply(&Command::StageRefs { tenant: T.into(), snapshot_id: (*sid).into(), batch: 0, ids }).unwrap();
            let now = T0 + n as i64;
            let cmd = Command::CommitV2 { tenant: T.into(), snapshot: snap(sid, 250, now), batches: 1, now };
            assert!(matches!(c.apply(&cmd).unwrap(), Outcome::Committed(_)));
            c.apply(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }).unwrap();
        }
        assert!(c.0.keys().all(|k| k[0] != b'B'), "packed in a catalog of the older layout");
        let too_new = Command::SetLayout { layout: LAYOUT + 1 };
        assert!(matches!(c.apply(&too_new).unwrap(), Outcome::Refused(_)));
        assert_eq!(c.apply(&Command::SetLayout { layout: LAYOUT }).unwrap(), Outcome::Done);
        assert!(packs_refs(&c).unwrap());
        // Never lowered.
        assert_eq!(c.apply(&Command::SetLayout { layout: 0 }).unwrap(), Outcome::Done);
        assert_eq!(layout(&c).unwrap(), LAYOUT);
        c.apply(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }).unwrap();
        assert_eq!(base(&c, T, "s2").unwrap().as_deref(), Some("s3"));
        assert_eq!(references(&c, T, "s2").unwrap(), (1..100).map(id).chain([id(250)]).collect::<Vec<_>>());
    }

    #[test]
    fn a_condemnation_from_a_mark_older_than_a_rewrite_checks_every_list() {
        let mut c = MemCatalog::default();
        c.write(founding_writes());
        let chunks = (0..=255u8).map(|n| (id(n), entry(n))).collect();
        c.apply(&Command::IndexChunks { tenant: T.into(), chunks }).unwrap();
        for (n, sid) in ["s1", "s2"].iter().enumerate() {
            // s1 alone holds chunk 0.
            let ids = (u8::from(n == 1)..100).map(id).collect();
            c.apply(&Command::StageRefs { tenant: T.into(), snapshot_id: (*sid).into(), batch: 0, ids }).unwrap();
            let now = T0 + n as i64;
            let cmd = Command::CommitV2 { tenant: T.into(), snapshot: snap(sid, 250, now), batches: 1, now };
            assert!(matches!(c.apply(&cmd).unwrap(), Outcome::Committed(_)));
        }
        // A mark begins, then s1 is packed under it: had the mark read s1's whole list only
        // half, it could name chunk 0 as garbage. The condemnation keeps it.
        let as_of_seq = commit_seq(&c).unwrap();
        c.apply(&Command::PackRefs { tenant: T.into(), source: "rnpp".into() }).unwrap();
        assert_eq!(base(&c, T, "s1").unwrap().as_deref(), Some("s2"));
        let cmd = Command::GcCondemn { tenant: T.into(), ids: vec![id(0), id(200)], as_of_seq, pass: 1 };
        assert_eq!(c.apply(&cmd).unwrap(), Outcome::Collected { chunks: 1, bytes: 300 });
        assert!(index_entry(&c, T, &id(0)).unwrap().is_some(), "a chunk of s1 was condemned");
    }

    fn stored_count(c: &MemCatalog, tag: u8) -> usize {
        let prefix = tenant_key(tag, T);
        c.0.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| decode::<Vec<ChunkId>>(v).unwrap().len())
            .sum()
    }
}
