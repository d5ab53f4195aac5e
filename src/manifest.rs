//! The snapshot manifest: the tree of a snapshot, encoded, chunked and encrypted like data.
//!
//! Stream layout (version 1); every record is `len: u32 LE ‖ postcard(Entry)`, one per file,
//! directory or symlink, parents before children.
//!
//! The stream is cut with `chunker::MANIFEST_CHUNKER` and every piece sealed as a chunk, so an
//! unchanged part of the tree deduplicates from day to day and memory never holds the whole
//! manifest. A `ManifestRoot` holds the `ManifestHeader` (format, source, time, host, chunker
//! sizes, roots) and lists the pieces; it is sealed as one more chunk, whose id is the
//! snapshot's root, the only manifest fact the cluster sees. Keeping the header (which holds
//! the time) out of the stream means an unchanged tree uploads nothing but its root.
//!
//! postcard is a stable, specified encoding (postcard 1.x wire format). New fields are added
//! only as new record versions (`format`), never by changing these structs in place.

use serde::{Deserialize, Serialize};

use crate::chunk_id::ChunkId;
use crate::chunker::{Chunker, ChunkerParams, MANIFEST_CHUNKER};

pub const MANIFEST_FORMAT: u32 = 1;
/// Largest single manifest record (an entry with a very long chunk list is still far below).
pub const MAX_RECORD: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    pub format: u32,
    pub tenant: String,
    pub source: String,
    /// Unix seconds when the snapshot started.
    pub time: i64,
    pub hostname: String,
    pub chunker: ChunkerParams,
    /// Top-level names in the snapshot (one per backed-up path).
    pub roots: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    /// Plaintext length of the chunk.
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File { size: u64, blake3: [u8; 32], chunks: Vec<ChunkRef> },
    Dir,
    Symlink { target: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, `/`-separated, as raw bytes (Unix paths need not be UTF-8).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl Entry {
    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// The root of a manifest: the pieces of the manifest stream, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRoot {
    pub format: u32,
    pub header: ManifestHeader,
    pub stream_len: u64,
    pub entries: u64,
    pub pieces: Vec<ChunkRef>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest record is malformed: {0}")]
    Malformed(String),
    #[error("manifest format {0} is not supported by this build")]
    UnsupportedFormat(u32),
    #[error("manifest stream ends inside a record")]
    Truncated,
    #[error("manifest path {0:?} is unsafe (absolute, empty or contains '..')")]
    UnsafePath(String),
}

pub fn encode_record<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    // Serialising plain data into a Vec cannot fail.
    #[allow(clippy::expect_used)]
    let body = postcard::to_extend(value, Vec::new()).expect("postcard into Vec");
    out.extend_from_slice(&body);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

pub fn encode_root(root: &ManifestRoot) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    postcard::to_allocvec(root).expect("postcard into Vec")
}

pub fn decode_root(bytes: &[u8]) -> Result<ManifestRoot, ManifestError> {
    let root: ManifestRoot = postcard::from_bytes(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    if root.format != MANIFEST_FORMAT || root.header.format != MANIFEST_FORMAT {
        return Err(ManifestError::UnsupportedFormat(root.format.max(root.header.format)));
    }
    Ok(root)
}

/// Incremental encoder: entries in, manifest pieces out (through `emit`), in bounded memory.
pub struct ManifestWriter {
    chunker: Chunker,
    scratch: Vec<u8>,
    stream_len: u64,
    entries: u64,
}

impl Default for ManifestWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl ManifestWriter {
    pub fn new() -> Self {
        // MANIFEST_CHUNKER is a valid constant (checked by a test).
        #[allow(clippy::expect_used)]
        let chunker = Chunker::new(MANIFEST_CHUNKER).expect("valid manifest chunker");
        ManifestWriter { chunker, scratch: Vec::new(), stream_len: 0, entries: 0 }
    }

    pub fn push(&mut self, entry: &Entry, emit: &mut impl FnMut(&[u8])) {
        self.entries += 1;
        self.scratch.clear();
        encode_record(entry, &mut self.scratch);
        self.stream_len += self.scratch.len() as u64;
        self.chunker.push(&self.scratch, emit);
    }

    /// Flushes the last pieces; returns (stream length, entry count) for the root.
    pub fn finish(mut self, emit: &mut impl FnMut(&[u8])) -> (u64, u64) {
        self.chunker.finish(emit);
        (self.stream_len, self.entries)
    }
}

/// Incremental decoder: push the manifest stream's pieces in order, pull records.
#[derive(Default)]
pub struct ManifestReader {
    buf: Vec<u8>,
    pos: usize,
}

impl ManifestReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete entry, or `None` if more bytes are needed.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ManifestError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_RECORD {
            return Err(ManifestError::Malformed(format!("record of {len} bytes")));
        }
        if rest.len() < 4 + len {
            return Ok(None);
        }
        let body = &rest[4..4 + len];
        let e: Entry = postcard::from_bytes(body).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        check_path(&e.path)?;
        self.pos += 4 + len;
        Ok(Some(e))
    }

    /// Call at the end of the stream: leftover bytes mean it was cut short.
    pub fn finish(&self) -> Result<(), ManifestError> {
        if self.pos != self.buf.len() { Err(ManifestError::Truncated) } else { Ok(()) }
    }
}

/// A manifest path must be relative, non-empty, and free of `.`/`..` components, so that a
/// restore can never write outside its target.
pub fn check_path(path: &[u8]) -> Result<(), ManifestError> {
    let bad = path.is_empty()
        || path[0] == b'/'
        || path.contains(&0)
        || path.split(|b| *b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..");
    if bad { Err(ManifestError::UnsafePath(String::from_utf8_lossy(path).into_owned())) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> ManifestHeader {
        ManifestHeader {
            format: MANIFEST_FORMAT,
            tenant: "lux".into(),
            source: "rnpp".into(),
            time: 1_735_695_000,
            hostname: "rnpp-db1".into(),
            chunker: ChunkerParams::default(),
            roots: vec!["rnpp".into()],
        }
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let kind = prop_oneof![
            Just(EntryKind::Dir),
            proptest::collection::vec(any::<u8>(), 1..40).prop_map(|t| EntryKind::Symlink { target: t }),
            (any::<u64>(), any::<[u8; 32]>(), proptest::collection::vec((any::<[u8; 32]>(), any::<u32>()), 0..20))
                .prop_map(|(size, b, cs)| EntryKind::File {
                    size,
                    blake3: b,
                    chunks: cs.into_iter().map(|(id, len)| ChunkRef { id: ChunkId(id), len }).collect()
                }),
        ];
        (
            "[a-z]{1,8}(/[a-zé ]{1,8}){0,3}",
            kind,
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            0u32..1_000_000_000,
        )
            .prop_map(|(p, kind, mode, uid, gid, s, ns)| Entry {
                path: p.into_bytes(),
                kind,
                mode,
                uid,
                gid,
                mtime_sec: s,
                mtime_nsec: ns,
            })
    }

    proptest! {
        #[test]
        fn stream_round_trips_whatever_the_piece_boundaries(
            entries in proptest::collection::vec(arb_entry(), 0..30),
            cuts in proptest::collection::vec(1usize..200, 1..50),
        ) {
            let mut stream = Vec::new();
            for e in &entries { encode_record(e, &mut stream); }
            let mut r = ManifestReader::new();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - pos);
                r.push(&stream[pos..pos + n]);
                pos += n;
                i += 1;
                while let Some(e) = r.next_entry().unwrap() {
                    got.push(e);
                }
            }
            r.finish().unwrap();
            prop_assert_eq!(got, entries);
        }
    }

    #[test]
    fn root_round_trips() {
        let root = ManifestRoot {
            format: MANIFEST_FORMAT,
            header: header(),
            stream_len: 1234,
            entries: 3,
            pieces: vec![ChunkRef { id: ChunkId([3; 32]), len: 1234 }],
        };
        assert_eq!(decode_root(&encode_root(&root)).unwrap(), root);
        assert!(decode_root(b"\x07garbage").is_err());
    }

    #[test]
    fn truncated_stream_is_detected() {
        let mut stream = Vec::new();
        encode_record(
            &Entry {
                path: b"a".to_vec(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
            },
            &mut stream,
        );
        let mut r = ManifestReader::new();
        r.push(&stream[..stream.len() - 1]);
        assert!(r.next_entry().unwrap().is_none());
        assert_eq!(r.finish(), Err(ManifestError::Truncated));
    }

    #[test]
    fn unsafe_paths_are_refused() {
        for p in ["", "/etc/passwd", "a/../../b", "./a", "a//b", "a/", ".."] {
            assert!(check_path(p.as_bytes()).is_err(), "{p:?}");
        }
        for p in ["a", "rnpp/persons.sql", "documents/2025/01/scan 1.pdf", "a/..b"] {
            assert!(check_path(p.as_bytes()).is_ok(), "{p:?}");
        }
    }
}
