//! The chunk ids a snapshot references, kept on disk rather than in memory.
//!
//! A commit must list every chunk the snapshot references (the cluster needs them for
//! garbage collection), and a large document store has tens of millions of chunks. The ids
//! are appended to an unlinked temporary file (32 bytes each) as they are first seen, and
//! read back in batches at commit, so the agent's memory does not grow with the source.
//! Duplicates are allowed while spooling (the in-run dedup set is bounded).
//!
//! At commit the ids are sent sorted and without duplicates: the cluster applies a commit
//! on its consensus thread, and ascending batches spare it a sort of the whole list
//! (`exclave::sorted_ids`). Up to `RUN_IDS` ids (32 MiB) are sorted in memory; more are
//! sorted in runs of that size written to a second temporary file and merged into a third,
//! so memory stays bounded whatever the source.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use exclave::ChunkId;
use exclave::sorted_ids;

/// Most ids sorted in memory at once (32 MiB).
const RUN_IDS: usize = 1 << 20;

pub struct RefSpool {
    file: BufWriter<File>,
    count: u64,
    run_ids: usize,
}

impl RefSpool {
    pub fn new() -> std::io::Result<RefSpool> {
        Ok(RefSpool { file: BufWriter::with_capacity(1 << 16, tempfile::tempfile()?), count: 0, run_ids: RUN_IDS })
    }

    pub fn push(&mut self, id: &ChunkId) -> std::io::Result<()> {
        self.count += 1;
        self.file.write_all(&id.0)
    }

    /// Reads the ids back sorted and without duplicates, `batch` at a time.
    pub fn into_batches(self, batch: usize) -> std::io::Result<Batches> {
        let batch = batch.max(1);
        let mut f = self.file.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::with_capacity(1 << 16, f);
        if self.count <= self.run_ids as u64 {
            let mut ids = read_ids(&mut reader, self.count as usize)?;
            sorted_ids::sort_unique(&mut ids);
            return Ok(Batches { source: Source::Memory(ids.into_iter()), left: 0, batch });
        }
        // Sorted runs, one after another in `runs`.
        let mut runs = BufWriter::with_capacity(1 << 16, tempfile::tempfile()?);
        let mut bounds = Vec::new();
        let (mut left, mut at) = (self.count, 0u64);
        while left > 0 {
            let n = left.min(self.run_ids as u64) as usize;
            left -= n as u64;
            let mut ids = read_ids(&mut reader, n)?;
            sorted_ids::sort_unique(&mut ids);
            for id in &ids {
                runs.write_all(&id.0)?;
            }
            bounds.push((at, ids.len() as u64));
            at += ids.len() as u64;
        }
        let runs = runs.into_inner().map_err(|e| e.into_error())?;
        let mut out = BufWriter::with_capacity(1 << 16, tempfile::tempfile()?);
        let mut count = 0u64;
        let readers = bounds.into_iter().map(|(start, len)| RunReader::new(&runs, start, len)).collect();
        sorted_ids::merge_ascending(readers, |id| {
            count += 1;
            out.write_all(&id.0)
        })?;
        let mut f = out.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        Ok(Batches { source: Source::File(BufReader::with_capacity(1 << 16, f)), left: count, batch })
    }
}

fn read_ids(reader: &mut impl Read, n: usize) -> std::io::Result<Vec<ChunkId>> {
    let mut out = Vec::with_capacity(n);
    let mut id = [0u8; 32];
    for _ in 0..n {
        reader.read_exact(&mut id)?;
        out.push(ChunkId(id));
    }
    Ok(out)
}

/// One sorted run of the runs file, read through its own buffer.
struct RunReader<'a> {
    file: &'a File,
    next: u64,
    left: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> RunReader<'a> {
    fn new(file: &'a File, start: u64, len: u64) -> RunReader<'a> {
        RunReader { file, next: start * 32, left: len, buf: Vec::new(), at: 0 }
    }
}

impl Iterator for RunReader<'_> {
    type Item = std::io::Result<ChunkId>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.at == self.buf.len() {
            if self.left == 0 {
                return None;
            }
            let n = self.left.min(2048);
            self.buf.resize(n as usize * 32, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buf, self.next) {
                self.left = 0;
                self.buf.clear();
                return Some(Err(e));
            }
            self.next += n * 32;
            self.left -= n;
            self.at = 0;
        }
        let id = ChunkId(self.buf[self.at..self.at + 32].try_into().expect("32 bytes"));
        self.at += 32;
        Some(Ok(id))
    }
}

enum Source {
    Memory(std::vec::IntoIter<ChunkId>),
    File(BufReader<File>),
}

pub struct Batches {
    source: Source,
    /// Ids left in `Source::File`.
    left: u64,
    batch: usize,
}

impl Batches {
    pub fn batch_count(&self) -> u64 {
        let left = match &self.source {
            Source::Memory(ids) => ids.len() as u64,
            Source::File(_) => self.left,
        };
        left.div_ceil(self.batch as u64)
    }
}

impl Iterator for Batches {
    type Item = std::io::Result<Vec<ChunkId>>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.source {
            Source::Memory(ids) => {
                let out: Vec<ChunkId> = ids.take(self.batch).collect();
                (!out.is_empty()).then_some(Ok(out))
            }
            Source::File(reader) => {
                if self.left == 0 {
                    return None;
                }
                let n = (self.left as usize).min(self.batch);
                self.left -= n as u64;
                match read_ids(reader, n) {
                    Ok(ids) => Some(Ok(ids)),
                    Err(e) => {
                        self.left = 0;
                        Some(Err(e))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_back_sorted_once_and_in_batches() {
        let mut s = RefSpool::new().unwrap();
        let ids: Vec<ChunkId> = (0..10u8).rev().map(|i| ChunkId([i; 32])).collect();
        for id in ids.iter().chain(&ids[..3]) {
            s.push(id).unwrap();
        }
        let b = s.into_batches(4).unwrap();
        assert_eq!(b.batch_count(), 3);
        let back: Vec<Vec<ChunkId>> = b.map(Result::unwrap).collect();
        assert_eq!(back.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut want = ids.clone();
        want.sort();
        assert_eq!(back.concat(), want);
        assert_eq!(RefSpool::new().unwrap().into_batches(4).unwrap().batch_count(), 0);
    }

    #[test]
    fn more_ids_than_one_run_are_merged_from_disk() {
        // Runs of 7 ids force the external sort; duplicates cross runs.
        let mut s = RefSpool::new().unwrap();
        s.run_ids = 7;
        let mut x = 12345u64;
        let mut all = Vec::new();
        for _ in 0..200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = ChunkId([(x >> 58) as u8; 32]);
            s.push(&id).unwrap();
            all.push(id);
        }
        all.sort();
        all.dedup();
        let b = s.into_batches(5).unwrap();
        assert_eq!(b.batch_count(), all.len().div_ceil(5) as u64);
        let back: Vec<ChunkId> = b.map(Result::unwrap).collect::<Vec<_>>().concat();
        assert_eq!(back, all);
    }
}
