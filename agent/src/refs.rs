//! The chunk ids a snapshot references, kept on disk rather than in memory.
//!
//! A commit must list every chunk the snapshot references (the cluster needs them for
//! garbage collection), and a large document store has tens of millions of chunks. The ids
//! are appended to an unlinked temporary file (32 bytes each) as they are first seen, and
//! read back in batches at commit, so the agent's memory does not grow with the source.
//! Duplicates are allowed (the in-run dedup set is bounded); the node removes them.

use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use exclave::ChunkId;

pub struct RefSpool {
    file: BufWriter<std::fs::File>,
    count: u64,
}

impl RefSpool {
    pub fn new() -> std::io::Result<RefSpool> {
        Ok(RefSpool { file: BufWriter::with_capacity(1 << 16, tempfile::tempfile()?), count: 0 })
    }

    pub fn push(&mut self, id: &ChunkId) -> std::io::Result<()> {
        self.count += 1;
        self.file.write_all(&id.0)
    }

    /// Reads the ids back, `batch` at a time.
    pub fn into_batches(self, batch: usize) -> std::io::Result<Batches> {
        let mut f = self.file.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        Ok(Batches { reader: BufReader::with_capacity(1 << 16, f), left: self.count, batch: batch.max(1) })
    }
}

pub struct Batches {
    reader: BufReader<std::fs::File>,
    left: u64,
    batch: usize,
}

impl Batches {
    pub fn batch_count(&self) -> u64 {
        self.left.div_ceil(self.batch as u64)
    }
}

impl Iterator for Batches {
    type Item = std::io::Result<Vec<ChunkId>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let n = (self.left as usize).min(self.batch);
        self.left -= n as u64;
        let mut out = Vec::with_capacity(n);
        let mut id = [0u8; 32];
        for _ in 0..n {
            if let Err(e) = self.reader.read_exact(&mut id) {
                self.left = 0;
                return Some(Err(e));
            }
            out.push(ChunkId(id));
        }
        Some(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_in_order_and_in_batches() {
        let mut s = RefSpool::new().unwrap();
        let ids: Vec<ChunkId> = (0..10u8).map(|i| ChunkId([i; 32])).collect();
        for id in &ids {
            s.push(id).unwrap();
        }
        let b = s.into_batches(4).unwrap();
        assert_eq!(b.batch_count(), 3);
        let back: Vec<Vec<ChunkId>> = b.map(Result::unwrap).collect();
        assert_eq!(back.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(back.concat(), ids);
        assert_eq!(RefSpool::new().unwrap().into_batches(4).unwrap().batch_count(), 0);
    }
}
