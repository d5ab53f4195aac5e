//! `exclave-restore history verify`: recomputes a tenant's hash-chained history as one node
//! holds it and checks its catalog against it. Any node will do; a tenant that recorded a
//! head earlier (the `--json` output) compares it to prove nothing before it was rewritten.
//!
//! A break is named precisely: the first event whose link or hash is wrong, a snapshot listed
//! but never committed in the history, a snapshot whose record differs from its commit, or a
//! committed snapshot missing from the catalog with no `forget` event.

use std::collections::BTreeMap;

use exclave::protocol::{DrillRecord, HistoryEvent, HistoryHead, SnapshotInfo};
use serde::Serialize;

/// What verifying found.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub events: u64,
    pub head_seq: u64,
    /// The head as recomputed (hex), to record outside the cluster.
    pub head_hash: String,
    pub snapshots_checked: u64,
    /// Snapshots committed before the history chain was kept (not a break).
    pub before_history: u64,
    pub drills_checked: u64,
    /// Drill records kept before drills were chained (not a break).
    pub drills_before_history: u64,
    /// The first break found, in words; `None` when the history holds.
    pub first_break: Option<String>,
}

/// Checks the chain `events` (all of it, oldest first) against the node's `head`, a head the
/// tenant recorded earlier (`expected`: it must still be in the chain), and the node's
/// snapshot listing (`listed`), restricted to `source` when given.
pub fn verify(
    events: &[HistoryEvent],
    head: &HistoryHead,
    expected: Option<&HistoryHead>,
    listed: &[SnapshotInfo],
    drills: &[DrillRecord],
    source: Option<&str>,
) -> Verdict {
    let mut chained_drills: Vec<(u64, DrillRecord)> = Vec::new();
    let mut v = Verdict { events: events.len() as u64, ..Default::default() };
    let mut prev = [0u8; 32];
    let mut live: BTreeMap<String, (u64, SnapshotInfo)> = BTreeMap::new();
    let mut first_chained_seq: Option<u64> = None;
    let breaks = |v: &mut Verdict, why: String| {
        if v.first_break.is_none() {
            v.first_break = Some(why);
        }
    };
    for (i, e) in events.iter().enumerate() {
        if e.seq != i as u64 + 1 {
            breaks(
                &mut v,
                format!("event {} is where event {} should be: events were removed or reordered", e.seq, i + 1),
            );
            break;
        }
        if e.prev != prev {
            breaks(&mut v, format!("event {} does not follow event {}: its link names another hash", e.seq, i));
            break;
        }
        prev = e.hash();
        match e.kind.as_str() {
            "commit" => match postcard::from_bytes::<SnapshotInfo>(&e.payload) {
                Ok(s) => {
                    first_chained_seq.get_or_insert(s.commit_seq);
                    live.insert(s.id.clone(), (e.seq, s));
                }
                Err(err) => breaks(&mut v, format!("event {} (commit) cannot be read: {err}", e.seq)),
            },
            "forget" => {
                live.remove(&String::from_utf8_lossy(&e.payload).into_owned());
            }
            "drill" => match postcard::from_bytes::<DrillRecord>(&e.payload) {
                Ok(d) => chained_drills.push((e.seq, d)),
                Err(err) => breaks(&mut v, format!("event {} (drill) cannot be read: {err}", e.seq)),
            },
            _ => {}
        }
    }
    v.head_seq = events.last().map_or(0, |e| e.seq);
    v.head_hash = hex::encode(prev);
    if v.first_break.is_none() && (head.seq != v.head_seq || head.hash != prev) {
        let why = format!(
            "the node's head (event {}, {}) is not the chain's end (event {}, {})",
            head.seq,
            hex::encode(head.hash),
            v.head_seq,
            hex::encode(prev)
        );
        breaks(&mut v, why);
    }
    if let Some(x) = expected {
        match events.get((x.seq as usize).wrapping_sub(1)) {
            Some(e) if e.seq == x.seq && e.hash() == x.hash => {}
            Some(_) => breaks(
                &mut v,
                format!(
                    "the head recorded earlier (event {}, {}) is not in this history: it was rewritten",
                    x.seq,
                    hex::encode(x.hash)
                ),
            ),
            None => breaks(&mut v, format!("the history ends before the head recorded earlier (event {})", x.seq)),
        }
    }
    let wanted = |s: &SnapshotInfo| source.is_none_or(|src| s.source == src || s.source == format!("{src}.wal"));
    for s in listed.iter().filter(|s| wanted(s)) {
        v.snapshots_checked += 1;
        match live.get(&s.id) {
            Some((_, committed)) if committed == s => {}
            Some((seq, _)) => breaks(
                &mut v,
                format!(
                    "snapshot {} ({}) differs from its commit at event {seq}: its record was edited",
                    s.id, s.source
                ),
            ),
            None if first_chained_seq.is_none_or(|first| s.commit_seq < first) => v.before_history += 1,
            None => breaks(
                &mut v,
                format!("snapshot {} ({}) is listed but was never committed in the history", s.id, s.source),
            ),
        }
    }
    let listed_ids: std::collections::HashSet<&str> = listed.iter().map(|l| l.id.as_str()).collect();
    for (id, (seq, s)) in &live {
        if wanted(s) && !listed_ids.contains(id.as_str()) {
            breaks(
                &mut v,
                format!("snapshot {id} ({}), committed at event {seq}, is missing and was never forgotten", s.source),
            );
        }
    }
    // Drill records are never forgotten: each chained one is listed, each listed one since the
    // first chained was chained, and none was edited.
    let wanted_drill = |d: &DrillRecord| source.is_none_or(|src| d.source == src);
    let same = |a: &DrillRecord, b: &DrillRecord| {
        (a.source.as_str(), a.started, a.recorded) == (b.source.as_str(), b.started, b.recorded)
    };
    let first_chained = chained_drills.iter().map(|(_, d)| (d.recorded, d.started)).min();
    for d in drills.iter().filter(|d| wanted_drill(d)) {
        v.drills_checked += 1;
        if chained_drills.iter().any(|(_, c)| c == d) {
            continue;
        }
        match chained_drills.iter().find(|(_, c)| same(c, d)) {
            Some((seq, _)) => breaks(
                &mut v,
                format!(
                    "the drill of {} started {} differs from its record at event {seq}: it was edited",
                    d.source, d.started
                ),
            ),
            None if first_chained.is_none_or(|first| (d.recorded, d.started) < first) => v.drills_before_history += 1,
            None => breaks(
                &mut v,
                format!(
                    "a drill of {} started {} is listed but was never recorded in the history",
                    d.source, d.started
                ),
            ),
        }
    }
    for (seq, c) in chained_drills.iter().filter(|(_, c)| wanted_drill(c)) {
        if !drills.iter().any(|d| same(d, c)) {
            breaks(
                &mut v,
                format!("the drill of {} started {}, recorded at event {seq}, is missing", c.source, c.started),
            );
        }
    }
    v.ok = v.first_break.is_none();
    v
}

/// Reads a recorded head: `SEQ:HEX`, as `history verify` prints it.
pub fn parse_head(s: &str) -> anyhow::Result<HistoryHead> {
    let (seq, hash) =
        s.split_once(':').ok_or_else(|| anyhow::anyhow!("a head is SEQ:HASH, as history verify prints it"))?;
    let bytes = hex::decode(hash)?;
    let hash: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("a head's hash is 64 hex digits"))?;
    Ok(HistoryHead { seq: seq.parse()?, hash })
}

/// Events after those in `events`, appended; returns the node's head.
pub async fn fetch(
    client: &exclave::client::NodeClient,
    events: &mut Vec<HistoryEvent>,
) -> anyhow::Result<HistoryHead> {
    use exclave::protocol::{MAX_HISTORY_EVENTS, Reply, Request};
    loop {
        let after = events.last().map_or(0, |e| e.seq);
        let Reply::History { events: page, head } = client.call(&[Request::History { tenant: None, after }]).await?
        else {
            anyhow::bail!("unexpected reply to history")
        };
        let full = page.len() >= MAX_HISTORY_EVENTS;
        events.extend(page);
        if !full {
            return Ok(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::ChunkId;

    fn snap(id: &str, seq: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            source: "rnpp".into(),
            time: 100,
            root: ChunkId([1; 32]),
            key_fingerprint: "f".into(),
            agent: "a".into(),
            hostname: "h".into(),
            files: 1,
            logical_bytes: 1,
            chunks: 1,
            stored_bytes: 1,
            commit_seq: seq,
        }
    }

    fn chain(items: &[(&str, Vec<u8>)]) -> (Vec<HistoryEvent>, HistoryHead) {
        let mut prev = [0u8; 32];
        let mut out = Vec::new();
        for (i, (kind, payload)) in items.iter().enumerate() {
            let e = HistoryEvent { seq: i as u64 + 1, prev, time: 1, kind: kind.to_string(), payload: payload.clone() };
            prev = e.hash();
            out.push(e);
        }
        (out.clone(), HistoryHead { seq: out.len() as u64, hash: prev })
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let (a, b, c) = (snap("a", 5), snap("b", 6), snap("c", 7));
        let enc = |s: &SnapshotInfo| postcard::to_allocvec(s).unwrap();
        let (events, head) =
            chain(&[("commit", enc(&a)), ("commit", enc(&b)), ("forget", b"a".to_vec()), ("commit", enc(&c))]);
        let old = snap("old", 2);
        let good = verify(&events, &head, None, &[old.clone(), b.clone(), c.clone()], &[], None);
        assert!(good.ok, "{good:?}");
        assert_eq!((good.snapshots_checked, good.before_history, good.head_seq), (3, 1, 4));

        let removed = verify(&events, &head, None, &[old.clone(), c.clone()], &[], None);
        assert!(removed.first_break.unwrap().contains("snapshot b (rnpp), committed at event 2, is missing"));
        let edited = SnapshotInfo { files: 999, ..b.clone() };
        let v = verify(&events, &head, None, &[edited, c.clone()], &[], None);
        assert!(v.first_break.unwrap().contains("differs from its commit at event 2"));
        let forged = verify(&events, &head, None, &[b.clone(), c.clone(), snap("x", 9)], &[], None);
        assert!(forged.first_break.unwrap().contains("snapshot x (rnpp) is listed but was never committed"));

        let mut cut = events.clone();
        cut.remove(1);
        assert!(
            verify(&cut, &head, None, &[], &[], None)
                .first_break
                .unwrap()
                .contains("event 3 is where event 2 should be")
        );
        let mut changed = events.clone();
        changed[1].payload = enc(&snap("b", 66));
        let v = verify(&changed, &head, None, &[b.clone(), c.clone()], &[], None);
        assert!(
            v.first_break.unwrap().contains("event 3 does not follow event 2"),
            "a changed event breaks the next link"
        );
        let mut rewritten = changed.clone();
        for i in 1..rewritten.len() {
            rewritten[i].prev = rewritten[i - 1].hash();
        }
        let v = verify(&rewritten, &head, None, &[b.clone(), c.clone()], &[], None);
        assert!(v.first_break.unwrap().contains("the node's head"), "a rewritten chain ends elsewhere");
        // A head recorded earlier is found in the chain; in a rewritten one it is not.
        let earlier = HistoryHead { seq: 2, hash: events[1].hash() };
        assert!(verify(&events, &head, Some(&earlier), &[old.clone(), b.clone(), c.clone()], &[], None).ok);
        let rewritten_head = HistoryHead { seq: 4, hash: rewritten[3].hash() };
        let v = verify(&rewritten, &rewritten_head, Some(&earlier), &[b.clone(), c.clone()], &[], None);
        assert!(v.first_break.unwrap().contains("recorded earlier (event 2"), "rewritten, head and all");
        let other = verify(&events, &head, None, &[b.clone(), c.clone()], &[], Some("docs"));
        assert!(other.ok && other.snapshots_checked == 0);
    }

    fn drill(started: i64, verdict: &str) -> DrillRecord {
        DrillRecord {
            source: "rnpp".into(),
            snapshot: "b".into(),
            snapshot_time: 1,
            started,
            verdict: verdict.into(),
            reason: String::new(),
            rto_ms: 1000,
            rpo_secs: 60,
            bytes: 1,
            files: 1,
            identity: "restore:lux".into(),
            node: "n1".into(),
            recorded: started + 5,
        }
    }

    #[test]
    fn drill_records_removed_edited_or_forged_are_named() {
        let enc = |d: &DrillRecord| postcard::to_allocvec(d).unwrap();
        let (d1, d2) = (drill(100, "PASS"), drill(200, "FAIL"));
        let (events, head) = chain(&[("drill", enc(&d1)), ("drill", enc(&d2))]);
        let old = drill(10, "PASS");
        let v = verify(&events, &head, None, &[], &[old.clone(), d1.clone(), d2.clone()], None);
        assert!(v.ok, "{v:?}");
        assert_eq!((v.drills_checked, v.drills_before_history), (3, 1), "one kept before drills were chained");
        let v = verify(&events, &head, None, &[], std::slice::from_ref(&d1), None);
        assert!(v.first_break.unwrap().contains("the drill of rnpp started 200, recorded at event 2, is missing"));
        let passed = DrillRecord { verdict: "PASS".into(), ..d2.clone() };
        let v = verify(&events, &head, None, &[], &[d1.clone(), passed], None);
        assert!(v.first_break.unwrap().contains("differs from its record at event 2: it was edited"));
        let forged = drill(300, "PASS");
        let v = verify(&events, &head, None, &[], &[d1.clone(), d2.clone(), forged], None);
        assert!(v.first_break.unwrap().contains("started 300 is listed but was never recorded"));
        assert!(verify(&events, &head, None, &[], &[d1, d2], Some("docs")).ok);
    }
}
