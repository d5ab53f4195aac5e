//! Exclave core library: the formats and protocols every Exclave program shares.
//!
//! Pure parts (no I/O): `chunker`, `chunk_id`, `keys` (derivation), `envelope`, `manifest`,
//! `protocol`, `identity`, `facts`, `retention`, `sorted_ids`. Thin I/O edges: `pki` (certificate files), `transport` (QUIC and
//! TLS), `client` (a connection to a storage node), `http` (/metrics, /healthz, /readyz).

pub mod chunk_id;
pub mod chunker;
pub mod cli;
pub mod client;
pub mod envelope;
pub mod facts;
pub mod http;
pub mod identity;
pub mod keys;
pub mod logging;
pub mod manifest;
pub mod memory;
pub mod pki;
pub mod protocol;
pub mod retention;
pub mod schedule;
pub mod sorted_ids;
pub mod status_file;
pub mod transport;
pub mod wal;

pub use chunk_id::{Checksum, ChunkId};
