//! What a node asks of the place its chunk envelopes live, an in-memory twin of it for tests
//! of the layers above, and one test suite that both must pass.
//!
//! The rules every implementation keeps: an envelope is checked (storage checksum, clear
//! header) before it is stored; `put_chunks` is durable when it returns and idempotent; a
//! chunk is scoped by its tenant; a read checks the storage checksum again and never serves a
//! damaged envelope.

#[cfg(test)]
use std::collections::HashMap;
#[cfg(test)]
use std::sync::Mutex;

use exclave::chunk_id::{Checksum, ChunkId};
use exclave::envelope;
use exclave::protocol::PutChunk;

use crate::store::{Store, StoreError};

pub trait ChunkStore: Send + Sync {
    /// Verifies and stores envelopes; returns how many were new. Durable when it returns.
    fn put_chunks(&self, tenant: &str, chunks: &[PutChunk]) -> Result<usize, StoreError>;
    /// Reads an envelope and checks it against its storage checksum.
    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>, StoreError>;
    /// Which of `ids` this store does not hold.
    fn missing(&self, tenant: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError>;
}

/// The checks made before anything is stored.
pub fn check_envelopes(chunks: &[PutChunk]) -> Result<(), StoreError> {
    for c in chunks {
        if Checksum::of(&c.envelope) != c.checksum {
            return Err(StoreError::Corrupt { id: c.id, context: "damaged in transit" });
        }
        envelope::parse_header(&c.envelope).map_err(|e| StoreError::Malformed(c.id, e.to_string()))?;
    }
    Ok(())
}

impl ChunkStore for Store {
    fn put_chunks(&self, tenant: &str, chunks: &[PutChunk]) -> Result<usize, StoreError> {
        Store::put_chunks(self, tenant, chunks)
    }
    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        Store::get_chunk(self, tenant, id)
    }
    fn missing(&self, tenant: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        Store::missing(self, tenant, ids)
    }
}

/// Chunks in memory, keyed by tenant and id: "durable" while the process lives (the twin
/// that tests of the layers above use, held to the same suite).
#[cfg(test)]
#[derive(Default)]
pub struct MemChunkStore {
    chunks: Mutex<HashMap<(String, ChunkId), Stored>>,
}

/// An envelope and the checksum it was stored with.
#[cfg(test)]
type Stored = (Checksum, Vec<u8>);

#[cfg(test)]
impl MemChunkStore {
    /// Flips a byte of a stored envelope, as a failing disk would.
    pub fn damage(&self, tenant: &str, id: &ChunkId) {
        if let Some((_, env)) = self.chunks.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&(tenant.into(), *id)) {
            let n = env.len();
            env[n / 2] ^= 1;
        }
    }
}

#[cfg(test)]
impl ChunkStore for MemChunkStore {
    fn put_chunks(&self, tenant: &str, chunks: &[PutChunk]) -> Result<usize, StoreError> {
        check_envelopes(chunks)?;
        let mut map = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = 0;
        for c in chunks {
            let key = (tenant.to_string(), c.id);
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert((c.checksum, c.envelope.to_vec()));
                new += 1;
            }
        }
        Ok(new)
    }

    fn get_chunk(&self, tenant: &str, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let map = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let (sum, env) = map.get(&(tenant.to_string(), *id)).ok_or(StoreError::NotFound(*id))?;
        if Checksum::of(env) != *sum {
            return Err(StoreError::Corrupt { id: *id, context: "damaged on this node's disk" });
        }
        Ok(env.clone())
    }

    fn missing(&self, tenant: &str, ids: &[ChunkId]) -> Result<Vec<ChunkId>, StoreError> {
        let map = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ids.iter().filter(|id| !map.contains_key(&(tenant.to_string(), **id))).copied().collect())
    }
}

#[cfg(test)]
pub mod suite {
    //! The test suite every `ChunkStore` passes.

    use super::*;

    pub fn put(id: u8, body: &[u8]) -> PutChunk {
        // A syntactically valid raw envelope: a store only checks the clear header.
        let mut env = b"XVE\x01\x00\x00\x00\x00\x00\x00".to_vec();
        env.extend_from_slice(&(body.len() as u32).to_le_bytes());
        env.extend_from_slice(&[0u8; 12]);
        env.extend_from_slice(body);
        env.extend_from_slice(&[0u8; 16]);
        PutChunk { id: ChunkId([id; 32]), checksum: Checksum::of(&env), envelope: env.into() }
    }

    pub fn run(s: &dyn ChunkStore) {
        let c = put(1, b"hello");
        assert_eq!(s.put_chunks("lux", std::slice::from_ref(&c)).unwrap(), 1);
        assert_eq!(s.put_chunks("lux", std::slice::from_ref(&c)).unwrap(), 0, "idempotent");
        assert_eq!(s.get_chunk("lux", &c.id).unwrap(), c.envelope);
        assert!(matches!(s.get_chunk("est", &c.id), Err(StoreError::NotFound(_))), "scoped by tenant");
        assert_eq!(s.missing("est", &[c.id]).unwrap(), vec![c.id]);
        assert!(s.missing("lux", &[c.id]).unwrap().is_empty());

        // A batch with a chunk twice and one already stored counts each new chunk once.
        let (d, e) = (put(2, &[2; 5000]), put(3, &[3; 70_000]));
        assert_eq!(s.put_chunks("lux", &[d.clone(), c.clone(), d.clone(), e.clone()]).unwrap(), 2);
        for x in [&c, &d, &e] {
            assert_eq!(s.get_chunk("lux", &x.id).unwrap(), x.envelope);
        }

        let mut bad = put(4, b"world");
        let mut flipped = bad.envelope.to_vec();
        flipped[20] ^= 1;
        bad.envelope = flipped.into();
        assert!(matches!(s.put_chunks("lux", std::slice::from_ref(&bad)), Err(StoreError::Corrupt { .. })));
        assert_eq!(s.missing("lux", &[bad.id]).unwrap(), vec![bad.id], "nothing of a refused batch is stored");
        let mut garbage = put(5, b"x");
        garbage.envelope = bytes::Bytes::from_static(b"not an envelope at all, really");
        garbage.checksum = Checksum::of(&garbage.envelope);
        assert!(matches!(s.put_chunks("lux", &[garbage]), Err(StoreError::Malformed(..))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pack_store_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        suite::run(&Store::open(dir.path()).unwrap());
    }

    #[test]
    fn the_memory_twin_passes_the_suite() {
        let m = MemChunkStore::default();
        suite::run(&m);
        let c = suite::put(9, b"damaged later");
        m.put_chunks("lux", std::slice::from_ref(&c)).unwrap();
        m.damage("lux", &c.id);
        assert!(matches!(m.get_chunk("lux", &c.id), Err(StoreError::Corrupt { .. })));
    }
}
