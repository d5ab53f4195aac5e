//! Fills a cluster's catalog at national scale without a register to read: CHUNKS tiny chunks
//! (valid envelopes of one byte; a node checks envelopes, never plaintext) uploaded as an agent
//! through the real protocol, then SNAPSHOTS snapshots each referencing REFS of them (a
//! sliding window, so snapshots overlap as a day-to-day history does).
//!
//! Usage: exclave-scale-load NODE PKI IDENTITY CHUNKS SNAPSHOTS REFS
//!
//! Prints one line per phase with its duration, and JSON at the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use exclave::client::NodeClient;
use exclave::protocol::{PutChunk, Reply, Request, SnapshotInfo};
use exclave::transport::TlsIdentity;
use exclave::{Checksum, ChunkId};
use futures::StreamExt;

const BATCH: usize = 16 * 1024;
const IN_FLIGHT: usize = 4;

fn id(i: u64) -> ChunkId {
    ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// A raw envelope of one plaintext byte: clear header, zero nonce, the byte, a zero tag.
fn envelope(i: u64) -> Vec<u8> {
    let mut e = b"XVE\x01\x00\x00\x00\x00\x00\x00".to_vec();
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&[0u8; 12]);
    e.push(i as u8);
    e.extend_from_slice(&[0u8; 16]);
    e
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!("usage: exclave-scale-load NODE PKI IDENTITY CHUNKS SNAPSHOTS REFS");
        std::process::exit(2);
    }
    let node: SocketAddr = args[1].parse().expect("NODE is an address");
    let tls = TlsIdentity::load(std::path::Path::new(&args[2]), &args[3]).expect("identity");
    let chunks: u64 = args[4].parse().expect("CHUNKS");
    let snapshots: u64 = args[5].parse().expect("SNAPSHOTS");
    let refs: u64 = args[6].parse::<u64>().expect("REFS").min(chunks);
    let client = Arc::new(NodeClient::connect(node, &tls).await.expect("connect"));

    let t = Instant::now();
    let batches: Vec<(u64, u64)> = (0..chunks).step_by(BATCH).map(|s| (s, (s + BATCH as u64).min(chunks))).collect();
    let mut uploads = futures::stream::iter(batches)
        .map(|(from, to)| {
            let client = client.clone();
            async move {
                let put: Vec<PutChunk> = (from..to)
                    .map(|i| {
                        let envelope = envelope(i);
                        PutChunk { id: id(i), checksum: Checksum::of(&envelope), envelope: envelope.into() }
                    })
                    .collect();
                client.call(&[Request::PutChunks { chunks: put }]).await
            }
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some(r) = uploads.next().await {
        match r {
            Ok(Reply::Ok) => {}
            other => panic!("upload refused: {other:?}"),
        }
    }
    drop(uploads);
    let upload_secs = t.elapsed().as_secs_f64();
    println!("uploaded {chunks} chunks in {upload_secs:.1} s");

    let t = Instant::now();
    for s in 0..snapshots {
        let start = if snapshots > 1 { s * (chunks - refs) / (snapshots - 1) } else { 0 };
        let ids: Vec<ChunkId> = (start..start + refs).map(id).collect();
        let snap = SnapshotInfo {
            id: format!("scale{s:04}"),
            source: "scale".into(),
            time: 1_800_000_000 + s as i64 * 86400,
            root: id(start),
            key_fingerprint: "0000000000000000".into(),
            agent: String::new(),
            hostname: "scale".into(),
            files: refs,
            logical_bytes: refs,
            chunks: 0,
            stored_bytes: 0,
            commit_seq: 0,
        };
        client.commit(snap, &ids).await.expect("commit");
    }
    let commit_secs = t.elapsed().as_secs_f64();
    println!("committed {snapshots} snapshots of {refs} references each in {commit_secs:.1} s");
    println!(
        "{}",
        serde_json::json!({"chunks": chunks, "snapshots": snapshots, "refs": refs,
                           "upload_secs": upload_secs, "commit_secs": commit_secs})
    );
    if let Ok(c) = Arc::try_unwrap(client) {
        c.close().await;
    }
}
