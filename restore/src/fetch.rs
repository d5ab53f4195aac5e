//! Reading a snapshot back: the manifest, then every chunk, fetched in parallel and
//! delivered in order.
//!
//! Each chunk is fetched from the node, then decrypted, decompressed and checked against its
//! id on the blocking pool (so all cores open envelopes), while up to `parallel` fetches are
//! in flight. Items come out in manifest order, so the consumer writes and hashes each file
//! sequentially. A chunk that fails carries the file and offset it belongs to.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use exclave::ChunkId;
use exclave::client::NodeClient;
use exclave::envelope::Opener;
use exclave::keys::TenantKeys;
use exclave::manifest::{ChunkRef, Entry, EntryKind, ManifestHeader, ManifestReader, decode_root};
use futures::{Stream, StreamExt};

/// Fetches and opens one chunk.
pub async fn fetch_chunk(client: &NodeClient, keys: &TenantKeys, id: ChunkId) -> Result<Vec<u8>> {
    let env = client.get_chunk(&id).await?;
    let keys = keys.clone();
    tokio::task::spawn_blocking(move || {
        let mut o = Opener::new(&keys)?;
        o.open(&id, &env).map_err(anyhow::Error::from)
    })
    .await?
}

/// The manifest's header and entries, read piece by piece.
pub async fn manifest(client: &NodeClient, keys: &TenantKeys, root: ChunkId) -> Result<(ManifestHeader, Vec<Entry>)> {
    let root_bytes = fetch_chunk(client, keys, root).await.context("reading the snapshot's manifest root")?;
    let root = decode_root(&root_bytes)?;
    let mut reader = ManifestReader::new();
    let mut entries = Vec::with_capacity(root.entries.min(1 << 20) as usize);
    let mut pieces = futures::stream::iter(root.pieces.iter().map(|p| fetch_chunk(client, keys, p.id))).buffered(8);
    while let Some(piece) = pieces.next().await {
        reader.push(&piece.context("reading a manifest piece")?);
        while let Some(e) = reader.next_entry()? {
            entries.push(e);
        }
    }
    reader.finish()?;
    if entries.len() as u64 != root.entries {
        bail!("manifest lists {} entries, its root says {}", entries.len(), root.entries);
    }
    Ok((root.header, entries))
}

/// One step of reading a snapshot back, in manifest order.
pub enum Item {
    Begin(Arc<Entry>),
    Data { entry: Arc<Entry>, offset: u64, data: Result<Vec<u8>> },
    End(Arc<Entry>),
}

/// Every entry's data, fetched `parallel` chunks at a time, in order.
pub fn items(
    client: Arc<NodeClient>,
    keys: TenantKeys,
    entries: Vec<Entry>,
    parallel: usize,
) -> impl Stream<Item = Item> {
    enum Step {
        Begin,
        Chunk(u64, ChunkRef),
        End,
    }
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
    futures::stream::iter(steps)
        .map(move |(entry, step)| {
            let (client, keys) = (client.clone(), keys.clone());
            async move {
                match step {
                    Step::Begin => Item::Begin(entry),
                    Step::End => Item::End(entry),
                    Step::Chunk(offset, c) => {
                        let data = fetch_chunk(&client, &keys, c.id).await.and_then(|d| {
                            if d.len() == c.len as usize {
                                Ok(d)
                            } else {
                                Err(anyhow!("chunk is {} bytes, the manifest says {}", d.len(), c.len))
                            }
                        });
                        let data = data.with_context(|| format!("chunk {} at offset {offset}", c.id.short()));
                        Item::Data { entry, offset, data }
                    }
                }
            }
        })
        .buffered(parallel.max(1))
}
