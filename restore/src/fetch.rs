//! Reading a snapshot back: the manifest, then every chunk, fetched in parallel and
//! delivered in order.
//!
//! Each chunk is fetched from the node, then decrypted, decompressed and checked against its
//! id on the blocking pool (so all cores open envelopes), while up to `parallel` fetches are
//! in flight. Items come out in manifest order, so the consumer writes and hashes each file
//! sequentially. A chunk that fails carries the file and offset it belongs to.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use exclave::ChunkId;
use exclave::keys::TenantKeys;
use exclave::manifest::{ChunkRef, Entry, EntryKind, ManifestReader, ManifestRoot, decode_root};
use futures::{Stream, StreamExt};

use crate::nodes::Nodes;

/// Fetches and opens one chunk.
pub async fn fetch_chunk(nodes: &Nodes, keys: &TenantKeys, id: ChunkId) -> Result<Vec<u8>> {
    nodes.fetch_open(keys, vec![id]).await.pop().unwrap_or_else(|| Err(anyhow!("chunk {} not fetched", id.short())))
}

/// The snapshot's manifest root (header and list of manifest pieces).
pub async fn manifest_root(client: &Nodes, keys: &TenantKeys, root: ChunkId) -> Result<ManifestRoot> {
    let bytes = fetch_chunk(client, keys, root).await.context("reading the snapshot's manifest root")?;
    Ok(decode_root(&bytes)?)
}

/// Calls `f` with every entry of `snap`'s manifest, in order; fetches no file data.
pub async fn each_entry(
    nodes: &Arc<Nodes>,
    keys: &TenantKeys,
    snap: &exclave::protocol::SnapshotInfo,
    mut f: impl FnMut(&Entry),
) -> Result<()> {
    if snap.key_fingerprint != keys.fingerprint {
        anyhow::bail!(
            "wrong key: snapshot {} was sealed with key {}, the key file holds key {}",
            snap.id,
            snap.key_fingerprint,
            keys.fingerprint
        );
    }
    let root = manifest_root(nodes, keys, snap.root).await?;
    let mut pages = std::pin::pin!(pages(nodes.clone(), keys.clone(), root));
    while let Some(page) = pages.next().await {
        page?.iter().for_each(&mut f);
    }
    Ok(())
}

/// Most entries, and chunk references, in one page of the manifest.
const PAGE_ENTRIES: usize = 4096;
const PAGE_CHUNKS: usize = 16 * 1024;

/// The manifest's entries in pages, read piece by piece as they are needed, so that restore
/// memory does not grow with the number of files. The last page checks the stream's end and
/// the entry count against the root.
pub fn pages(client: Arc<Nodes>, keys: TenantKeys, root: ManifestRoot) -> impl Stream<Item = Result<Vec<Entry>>> {
    let expected = root.entries;
    let pieces = futures::stream::iter(root.pieces.into_iter().map(move |p| {
        let (client, keys) = (client.clone(), keys.clone());
        async move { fetch_chunk(&client, &keys, p.id).await.context("reading a manifest piece") }
    }))
    .buffered(4);
    let state = (Box::pin(pieces), ManifestReader::new(), 0u64, false);
    futures::stream::unfold(state, move |(mut pieces, mut reader, mut seen, done)| async move {
        if done {
            return None;
        }
        let mut page = Vec::new();
        let mut refs = 0usize;
        loop {
            loop {
                match reader.next_entry() {
                    Ok(Some(e)) => {
                        if let EntryKind::File { chunks, .. } = &e.kind {
                            refs += chunks.len();
                        }
                        page.push(e);
                        seen += 1;
                    }
                    Ok(None) => break,
                    Err(e) => return Some((Err(e.into()), (pieces, reader, seen, true))),
                }
            }
            if page.len() >= PAGE_ENTRIES || refs >= PAGE_CHUNKS {
                return Some((Ok(page), (pieces, reader, seen, false)));
            }
            match pieces.next().await {
                Some(Ok(bytes)) => reader.push(&bytes),
                Some(Err(e)) => return Some((Err(e), (pieces, reader, seen, true))),
                None => {
                    let end = reader.finish().map_err(anyhow::Error::from).and_then(|_| {
                        if seen == expected {
                            Ok(page)
                        } else {
                            Err(anyhow!("manifest lists {seen} entries, its root says {expected}"))
                        }
                    });
                    return Some((end, (pieces, reader, seen, true)));
                }
            }
        }
    })
}

/// One step of reading a snapshot back, in manifest order.
pub enum Item {
    Begin(Arc<Entry>),
    Data { entry: Arc<Entry>, offset: u64, data: Result<Vec<u8>> },
    End(Arc<Entry>),
}

/// Most chunks, and plaintext bytes, fetched by one request.
const GROUP_CHUNKS: usize = 16;
const GROUP_BYTES: u64 = 2 << 20;

enum Step {
    Begin,
    Chunk(u64, ChunkRef),
    End,
}

/// Every entry's data, fetched in groups of chunks with `parallel` requests in flight,
/// delivered in manifest order.
///
/// Each group's fetch and decryption runs as a task of its own, so requests keep flowing
/// while the consumer writes; a task whose result is no longer wanted is aborted.
pub fn items(client: Arc<Nodes>, keys: TenantKeys, entries: Vec<Entry>, parallel: usize) -> impl Stream<Item = Item> {
    let steps = entries.into_iter().flat_map(|e| {
        let e = Arc::new(e);
        let mut v = vec![(e.clone(), Step::Begin)];
        if let EntryKind::File { chunks, .. } = &e.kind {
            let mut off = 0u64;
            for c in chunks {
                v.push((e.clone(), Step::Chunk(off, *c)));
                off += c.len as u64;
            }
        }
        v.push((e, Step::End));
        v
    });
    futures::stream::iter(Groups { steps, next: None })
        .map(move |group| {
            let ids: Vec<ChunkId> =
                group.iter().filter_map(|(_, s)| if let Step::Chunk(_, c) = s { Some(c.id) } else { None }).collect();
            let n = ids.len();
            let mut task = AbortOnDrop(tokio::spawn(fetch_open(client.clone(), keys.clone(), ids)));
            async move {
                let opened = match (&mut task.0).await {
                    Ok(v) => v,
                    Err(e) => (0..n).map(|_| Err(anyhow!("fetching chunks failed: {e}"))).collect(),
                };
                assemble(group, opened)
            }
        })
        .buffered(parallel.max(1))
        .flat_map(futures::stream::iter)
}

/// A task that is aborted when its handle is dropped unfinished.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cuts the step sequence into groups of at most GROUP_CHUNKS chunks and GROUP_BYTES bytes.
struct Groups<I> {
    steps: I,
    next: Option<(Arc<Entry>, Step)>,
}

impl<I: Iterator<Item = (Arc<Entry>, Step)>> Iterator for Groups<I> {
    type Item = Vec<(Arc<Entry>, Step)>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut group = Vec::new();
        let (mut chunks, mut bytes) = (0usize, 0u64);
        while let Some(step) = self.next.take().or_else(|| self.steps.next()) {
            if let Step::Chunk(_, c) = &step.1 {
                if chunks == GROUP_CHUNKS || (chunks > 0 && bytes + c.len as u64 > GROUP_BYTES) {
                    self.next = Some(step);
                    break;
                }
                chunks += 1;
                bytes += c.len as u64;
            }
            group.push(step);
        }
        (!group.is_empty()).then_some(group)
    }
}

/// Fetches the envelopes of `ids` in one request and opens them on the blocking pool (from
/// other nodes what the first fails to give).
async fn fetch_open(nodes: Arc<Nodes>, keys: TenantKeys, ids: Vec<ChunkId>) -> Vec<Result<Vec<u8>>> {
    nodes.fetch_open(&keys, ids).await
}

/// Puts a group's opened chunks back among its steps, checking each chunk's length.
fn assemble(group: Vec<(Arc<Entry>, Step)>, opened: Vec<Result<Vec<u8>>>) -> Vec<Item> {
    let mut opened = opened.into_iter();
    group
        .into_iter()
        .map(|(entry, step)| match step {
            Step::Begin => Item::Begin(entry),
            Step::End => Item::End(entry),
            Step::Chunk(offset, c) => {
                let data =
                    opened.next().unwrap_or_else(|| Err(anyhow!("chunk missing from the reply"))).and_then(|d| {
                        if d.len() == c.len as usize {
                            Ok(d)
                        } else {
                            Err(anyhow!("chunk is {} bytes, the manifest says {}", d.len(), c.len))
                        }
                    });
                let data = data.with_context(|| format!("chunk {} at offset {offset}", c.id.short()));
                Item::Data { entry, offset, data }
            }
        })
        .collect()
}
