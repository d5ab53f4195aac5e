//! The fuzz targets' bodies (`chaos-tests/fuzz/`), run on the stable toolchain in every test
//! run: over valid frames, manifests, envelopes, key files and shares, each damaged many times
//! (bytes flipped, cut, repeated, spliced) by a seeded generator. libFuzzer searches further but
//! needs nightly; this keeps the decoders' one promise checked in CI: input from the network,
//! a disk or a person is refused with an error, never a panic, an abort or a hang.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use exclave::ChunkId;
use exclave::chunker::ChunkerParams;
use exclave::envelope::{Opener, Sealer, parse_header};
use exclave::keys::file::{parse_key_file, raw_text};
use exclave::keys::shares::{parse_share, split};
use exclave::keys::{MasterKey, TenantKeys};
use exclave::manifest::{
    ChunkRef, Entry, EntryKind, MANIFEST_FORMAT, ManifestHeader, ManifestReader, ManifestRoot, ManifestWriter,
    decode_root, encode_root,
};
use exclave::protocol::frame::{FrameHeader, FrameKind, HEADER_LEN, decode_frame, decode_payload, encode_frame};
use exclave::protocol::shared_bytes::decode_shared;
use exclave::protocol::{PutChunk, Reply, Request};

/// Damaged versions of each seed per target.
const ROUNDS: usize = 20_000;

/// splitmix64, so a failure names a seed that reproduces it.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four damages to a copy of `seed`, the kinds libFuzzer's mutator applies.
fn damage(seed: &[u8], other: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        let at = r.below(v.len() + 1);
        match r.below(7) {
            0 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] ^= 1 << r.below(8);
            }
            1 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, 1][r.below(5)];
            }
            2 => v.truncate(at),
            3 => {
                let n = r.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 if !v.is_empty() => {
                let from = r.below(v.len());
                let piece = v[from..(from + r.below(32)).min(v.len())].to_vec();
                v.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let from = r.below(other.len());
                let piece = &other[from..(from + r.below(256)).min(other.len())];
                v.splice(at..at, piece.iter().copied());
            }
            _ => {
                let end = (at + r.below(16)).min(v.len());
                v.drain(at..end);
            }
        }
    }
    v
}

/// Runs `body` over every seed and `ROUNDS` damaged versions of each, named on failure.
fn fuzz(target: &str, seeds: &[Vec<u8>], body: impl Fn(&[u8])) {
    for (n, seed) in seeds.iter().enumerate() {
        body(seed);
        let other = &seeds[(n + 1) % seeds.len()];
        for round in 0..ROUNDS {
            let s = (n as u64) << 32 | round as u64;
            let input = damage(seed, other, &mut Rng(s));
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&input)));
            assert!(ok.is_ok(), "{target}: panicked on seed {n}, round {round} (rng {s:#x}), input {input:02x?}");
        }
    }
}

fn keys() -> TenantKeys {
    TenantKeys::from_master("lux", MasterKey::from_bytes([7; 32]))
}

fn entry(path: &str, size: u64) -> Entry {
    let chunks = vec![ChunkRef { id: ChunkId([3; 32]), len: size as u32 }];
    Entry {
        path: path.as_bytes().to_vec(),
        kind: if size == 0 { EntryKind::Dir } else { EntryKind::File { size, blake3: [9; 32], chunks } },
        mode: 0o640,
        uid: 1000,
        gid: 1000,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
    }
}

/// A committed snapshot's record, as frames and the catalog carry it.
fn snapshot() -> exclave::protocol::SnapshotInfo {
    exclave::protocol::SnapshotInfo {
        id: "s-1".into(),
        source: "rnpp".into(),
        time: 1_700_000_000,
        root: ChunkId([4; 32]),
        key_fingerprint: "ab12".into(),
        agent: "rnpp".into(),
        hostname: String::new(),
        files: 0,
        logical_bytes: 42,
        chunks: 3,
        stored_bytes: 40,
        commit_seq: 1,
    }
}

/// A batch of chunks, as an agent uploads it.
fn put_chunks() -> Request {
    let chunks = (0..3u8)
        .map(|i| PutChunk {
            id: ChunkId([i; 32]),
            checksum: exclave::Checksum([i; 32]),
            envelope: vec![i; 40 * usize::from(i)].into(),
        })
        .collect();
    Request::PutChunks { chunks }
}

#[test]
fn frames_from_the_network_are_refused_never_a_panic() {
    let snapshot = snapshot();
    let seeds = vec![
        encode_frame(FrameKind::Request, &Request::Have { ids: vec![ChunkId([1; 32]), ChunkId([2; 32])] }).unwrap(),
        encode_frame(FrameKind::Request, &Request::Commit { snapshot: snapshot.clone(), ref_batches: 2 }).unwrap(),
        encode_frame(FrameKind::Request, &Request::GetChunks { ids: vec![ChunkId([5; 32])] }).unwrap(),
        encode_frame(FrameKind::Reply, &Reply::Committed { snapshot }).unwrap(),
        encode_frame(FrameKind::Reply, &Reply::Missing { ids: vec![ChunkId([6; 32])] }).unwrap(),
        encode_frame(FrameKind::Request, &put_chunks()).unwrap(),
    ];
    fuzz("frame", &seeds, |data| {
        let _ = FrameHeader::parse(data);
        let _ = decode_frame::<Request>(FrameKind::Request, data);
        let _ = decode_frame::<Reply>(FrameKind::Reply, data);
        // A node decodes requests in place: exactly as a copy would.
        let payload = data.get(HEADER_LEN..).unwrap_or_default();
        let shared = decode_shared::<Request>(payload.to_vec());
        assert_eq!(shared.ok(), decode_payload::<Request>(payload).ok());
    });
}

#[test]
fn manifests_from_the_cluster_are_refused_never_a_panic() {
    let mut stream = Vec::new();
    let mut w = ManifestWriter::new();
    for (i, size) in [0u64, 10, 70_000, 3].iter().enumerate() {
        w.push(&entry(&format!("register/part-{i}"), *size), &mut |p: &[u8]| stream.extend_from_slice(p));
    }
    let (stream_len, entries) = w.finish(&mut |p: &[u8]| stream.extend_from_slice(p));
    let root = encode_root(&ManifestRoot {
        format: MANIFEST_FORMAT,
        header: ManifestHeader {
            format: MANIFEST_FORMAT,
            tenant: "lux".into(),
            source: "rnpp".into(),
            time: 1_700_000_000,
            hostname: "db-1".into(),
            chunker: ChunkerParams::default(),
            roots: vec!["register".into()],
        },
        stream_len,
        entries,
        pieces: vec![ChunkRef { id: ChunkId([8; 32]), len: stream_len as u32 }],
    });
    assert!(decode_root(&root).is_ok(), "the seed itself must decode");
    fuzz("manifest", &[stream, root], |data| {
        let _ = decode_root(data);
        let (a, b) = data.split_at(data.len() / 2);
        let mut r = ManifestReader::new();
        r.push(a);
        while let Ok(Some(_)) = r.next_entry() {}
        r.push(b);
        while let Ok(Some(_)) = r.next_entry() {}
        let _ = r.finish();
    });
}

#[test]
fn envelopes_from_a_node_are_refused_never_a_panic() {
    let keys = keys();
    let mut sealer = Sealer::new(&keys, 1).unwrap();
    let plain: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let (a, b) = (keys.chunk_id(&plain), keys.chunk_id(b"short"));
    let seeds = vec![sealer.seal(&a, &plain).unwrap(), sealer.seal(&b, b"short").unwrap()];
    let mut opener = Opener::new(&keys).unwrap();
    assert_eq!(opener.open(&a, &seeds[0]).unwrap(), plain, "the seed itself must open");
    let opener = std::sync::Mutex::new(opener);
    fuzz("envelope", &seeds, |data| {
        let _ = parse_header(data);
        let mut o = opener.lock().unwrap_or_else(|p| p.into_inner());
        // With the id it was sealed for, so a damage past the header reaches the decryption.
        for id in [&a, &b] {
            if let Ok(opened) = o.open(id, data) {
                assert!(opened == plain || opened == b"short", "a damaged envelope opened to other bytes");
            }
        }
    });
}

#[test]
fn key_files_and_shares_a_person_types_are_refused_never_a_panic() {
    let keys = keys();
    let mut seeds = vec![raw_text(&keys).unwrap().as_bytes().to_vec()];
    for s in split(&keys, 2, 3).unwrap() {
        seeds.push(s.to_text(Some("holder"), "2026-12-07").unwrap().as_bytes().to_vec());
    }
    assert!(parse_share(std::str::from_utf8(&seeds[1]).unwrap()).is_ok(), "the seed itself must parse");
    fuzz("key_text", &seeds, |data| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = parse_share(text);
            let _ = parse_key_file(text);
        }
    });
}

#[test]
fn catalog_records_read_back_from_a_store_are_refused_never_a_panic() {
    use exclave::protocol::{AuditRecord, HistoryEvent, LegalHold, LockMode, RetentionLock};
    let snapshot = snapshot();
    let audit = AuditRecord {
        identity: "restore:lux#0a".into(),
        tenant: "lux".into(),
        node: "n1".into(),
        started: 1,
        ended: 2,
        bytes: 3,
        sources: vec!["rnpp".into()],
        snapshots: vec!["s-1".into()],
        ..Default::default()
    };
    let event = HistoryEvent {
        seq: 1,
        prev: [0; 32],
        time: 5,
        kind: "commit".into(),
        payload: postcard::to_allocvec(&snapshot).unwrap(),
    };
    let lock = RetentionLock { mode: LockMode::Governance, days: 30, by: "admin#1".into(), since: 9 };
    let hold = LegalHold {
        target: exclave::protocol::HoldTarget::Source("rnpp".into()),
        by: "admin#1".into(),
        since: 9,
        reason: "case 17".into(),
    };
    let seeds = vec![
        postcard::to_allocvec(&snapshot).unwrap(),
        postcard::to_allocvec(&vec![ChunkId([1; 32]), ChunkId([2; 32])]).unwrap(),
        postcard::to_allocvec(&audit).unwrap(),
        postcard::to_allocvec(&event).unwrap(),
        postcard::to_allocvec(&lock).unwrap(),
        postcard::to_allocvec(&hold).unwrap(),
    ];
    fuzz("catalog_entry", &seeds, |data| {
        let _ = postcard::from_bytes::<exclave::protocol::SnapshotInfo>(data);
        let _ = postcard::from_bytes::<Vec<ChunkId>>(data);
        let _ = postcard::from_bytes::<AuditRecord>(data);
        let _ = postcard::from_bytes::<RetentionLock>(data);
        let _ = postcard::from_bytes::<LegalHold>(data);
        let _ = postcard::from_bytes::<exclave::protocol::AuditKeepView>(data);
        if let Ok(e) = postcard::from_bytes::<HistoryEvent>(data) {
            let _ = e.hash();
        }
    });
}
