//! Ascending, duplicate-free lists of chunk ids: the form a snapshot's references take.
//!
//! A snapshot's references can run to tens of millions of ids. They are sorted where it is
//! cheap and off the critical path (the agent before it sends them, the receiving node per
//! batch before it proposes them), so that the cluster's state machine, which applies every
//! commit on the consensus thread, only has to check their order and merge runs: linear
//! for batches that continue one another, `n log k` for `k` sorted batches in any order.

use crate::chunk_id::ChunkId;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// True when every id is greater than the one before it (sorted, no duplicates).
pub fn is_strictly_ascending(ids: &[ChunkId]) -> bool {
    ids.windows(2).all(|w| w[0] < w[1])
}

/// Makes `ids` strictly ascending; a list that already is costs one linear check.
pub fn sort_unique(ids: &mut Vec<ChunkId>) {
    if !is_strictly_ascending(ids) {
        ids.sort_unstable();
        ids.dedup();
    }
}

/// Merges strictly ascending runs into one strictly ascending sequence handed to `out`:
/// for runs read from files, a bounded buffer each (the agent's spool of references).
pub fn merge_ascending<E, I>(runs: Vec<I>, mut out: impl FnMut(ChunkId) -> Result<(), E>) -> Result<(), E>
where
    I: Iterator<Item = Result<ChunkId, E>>,
{
    let mut runs = runs;
    let mut heap = BinaryHeap::with_capacity(runs.len());
    for (i, run) in runs.iter_mut().enumerate() {
        if let Some(id) = run.next().transpose()? {
            heap.push(Reverse((id, i)));
        }
    }
    let mut last: Option<ChunkId> = None;
    while let Some(Reverse((id, i))) = heap.pop() {
        if last != Some(id) {
            out(id)?;
            last = Some(id);
        }
        if let Some(next) = runs[i].next().transpose()? {
            heap.push(Reverse((next, i)));
        }
    }
    Ok(())
}

/// The union of the batches as one strictly ascending list, using the order they already
/// have. Each batch is made strictly ascending alone (`sort_unique`, a linear check when it
/// already is); when the batches continue one another, the whole costs one copy and one
/// linear check. Otherwise the batches are sorted runs, and the standard library's stable
/// sort merges runs it finds (`n log k` for `k` batches, not `n log n`).
pub fn union_of_batches(batches: Vec<Vec<ChunkId>>) -> Vec<ChunkId> {
    let mut all = Vec::with_capacity(batches.iter().map(Vec::len).sum());
    for mut batch in batches {
        sort_unique(&mut batch);
        all.extend_from_slice(&batch);
    }
    if !is_strictly_ascending(&all) {
        all.sort();
        all.dedup();
    }
    all
}

/// Inserts `extra` (strictly ascending) into the strictly ascending `ids`, keeping both
/// properties, in one linear pass.
pub fn insert_all(ids: &mut Vec<ChunkId>, extra: &[ChunkId]) {
    if extra.is_empty() {
        return;
    }
    let old = std::mem::take(ids);
    let mut out = Vec::with_capacity(old.len() + extra.len());
    let (mut a, mut b) = (old.into_iter().peekable(), extra.iter().copied().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(x), Some(y)) if x > y => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        out.extend(next);
    }
    *ids = out;
}

/// `a` without the ids of `b` (both strictly ascending), in one linear pass.
pub fn difference(a: &[ChunkId], b: &[ChunkId]) -> Vec<ChunkId> {
    let mut out = Vec::new();
    let mut j = 0;
    for x in a {
        while j < b.len() && b[j] < *x {
            j += 1;
        }
        if j == b.len() || b[j] != *x {
            out.push(*x);
        }
    }
    out
}

/// The ids of `a` or `b` (both strictly ascending), strictly ascending, in one linear pass.
pub fn union(a: &[ChunkId], b: &[ChunkId]) -> Vec<ChunkId> {
    let mut out = a.to_vec();
    insert_all(&mut out, b);
    out
}

/// Whether the strictly ascending `ids` hold `id`.
pub fn contains(ids: &[ChunkId], id: &ChunkId) -> bool {
    ids.binary_search(id).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator: ids drawn from a narrow range so duplicates occur.
    fn ids(seed: u64, n: usize, range: u64) -> Vec<ChunkId> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&((x >> 33) % range).to_be_bytes());
                ChunkId(id)
            })
            .collect()
    }

    fn reference(batches: &[Vec<ChunkId>]) -> Vec<ChunkId> {
        let mut all = batches.concat();
        all.sort_unstable();
        all.dedup();
        all
    }

    #[test]
    fn the_union_equals_sorting_everything_whatever_the_batches() {
        for seed in 0..200u64 {
            let count = (seed % 7) as usize;
            let mut batches: Vec<Vec<ChunkId>> =
                (0..count).map(|b| ids(seed * 31 + b as u64, (seed as usize * 13 + b) % 50, 64)).collect();
            // Some seeds send sorted batches, some globally ascending ones, some raw.
            if seed % 3 == 0 {
                batches.iter_mut().for_each(|b| b.sort_unstable());
            }
            if seed % 3 == 1 {
                let all = reference(&batches);
                batches = all.chunks(7).map(<[ChunkId]>::to_vec).collect();
            }
            let want = reference(&batches);
            assert_eq!(union_of_batches(batches), want, "seed {seed}");
            assert!(is_strictly_ascending(&want));
        }
    }

    #[test]
    fn insert_all_keeps_the_list_strictly_ascending() {
        for seed in 0..100u64 {
            let mut a = reference(&[ids(seed, 40, 100)]);
            let b = reference(&[ids(seed + 1000, 20, 100)]);
            let want = reference(&[a.clone(), b.clone()]);
            insert_all(&mut a, &b);
            assert_eq!(a, want, "seed {seed}");
        }
    }

    #[test]
    fn difference_and_union_are_the_set_operations() {
        for seed in 0..100u64 {
            let a = reference(&[ids(seed, 40, 100)]);
            let b = reference(&[ids(seed + 500, 30, 100)]);
            let want_diff: Vec<ChunkId> = a.iter().copied().filter(|x| !b.contains(x)).collect();
            assert_eq!(difference(&a, &b), want_diff, "seed {seed}");
            assert_eq!(union(&a, &b), reference(&[a.clone(), b.clone()]), "seed {seed}");
        }
    }

    #[test]
    fn merge_stops_at_the_first_error() {
        let good = vec![Ok(ChunkId([1; 32])), Ok(ChunkId([3; 32]))];
        let bad = vec![Ok(ChunkId([2; 32])), Err("disk"), Ok(ChunkId([4; 32]))];
        let mut seen = Vec::new();
        let r = merge_ascending(vec![good.into_iter(), bad.into_iter()], |id| {
            seen.push(id);
            Ok(())
        });
        assert_eq!(r, Err("disk"));
        assert_eq!(seen, [ChunkId([1; 32]), ChunkId([2; 32])]);
    }
}
