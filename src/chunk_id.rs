//! Chunk identifiers and storage checksums.
//!
//! A `ChunkId` is `blake3::keyed_hash(chunk_id_key, plaintext)`: it names content inside one
//! tenant's key domain. A `Checksum` is the unkeyed `blake3(envelope)`: what a storage node,
//! which never holds a key, verifies on every write, read and scrub.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Checksum(pub [u8; 32]);

impl Checksum {
    pub fn of(envelope: &[u8]) -> Checksum {
        Checksum(*blake3::hash(envelope).as_bytes())
    }
}

macro_rules! hex_display {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", &hex::encode(self.0)[..16])
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let v = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
                let a: [u8; 32] = v.try_into().map_err(|_| "expected 64 hex digits".to_string())?;
                Ok(Self(a))
            }
        }
    };
}
hex_display!(ChunkId);
hex_display!(Checksum);

impl ChunkId {
    /// The short form used in messages to people.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}
