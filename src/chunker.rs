//! Content-defined chunking (FastCDC 2020), push-style.
//!
//! The chunker owns no reader: callers push bytes as they arrive (or let it read once from a
//! reader they hold, straight into its window, saving a copy) and receive every complete
//! chunk through a callback, then call `finish` for the tail. This lets the same code cut
//! files, database dumps and the manifest stream, and bounds its memory to a window of two
//! `max` chunks and 1 MiB.
//!
//! The sizes are chosen per source and recorded in the snapshot manifest, so a change of
//! setting never breaks restore (restore never re-chunks; it only follows chunk lists).

use fastcdc::v2020::{self, Normalization};
use serde::{Deserialize, Serialize};

/// Chunk size bounds for one source. All three must be even; FastCDC's limits apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// 256 KiB / 1 MiB / 4 MiB (restic's average). Chosen by measurement on the shared register
    /// (README, "Benchmark"): a changed chunk travels as a delta on the one it replaced, so
    /// small chunks no longer save day-2 bytes (1 MiB chunks sent 7.1 MiB on day 2 where
    /// 64 KiB ones sent 9.9), while large ones compress better and cost the agent and every
    /// node a sixteenth of the per-chunk work (day 1 2.31 against 2.11x restic's speed).
    fn default() -> Self {
        ChunkerParams { min_size: 256 * 1024, avg_size: 1024 * 1024, max_size: 4 * 1024 * 1024 }
    }
}

/// Default sizes for WAL files (16 KiB / 64 KiB / 256 KiB), where a source sets none: the
/// daemon ships the segment being written every few seconds as it grows, and each ship sends
/// again the last chunk of what it shipped before, cut anew. With these sizes that is up to
/// about 64 KiB of WAL a ship; with the default sizes, about 1 MiB: for a database that writes
/// a little all day, streamed every 3 s, up to 28 GiB a day on the embassy link before
/// compression, instead of under 2.
pub const WAL_CHUNKER: ChunkerParams = ChunkerParams { min_size: 16 * 1024, avg_size: 64 * 1024, max_size: 256 * 1024 };

/// Parameters the manifest stream itself is cut with: small, because a manifest changes in
/// small places (one entry per changed file) and should deduplicate from day to day.
pub const MANIFEST_CHUNKER: ChunkerParams =
    ChunkerParams { min_size: 8 * 1024, avg_size: 32 * 1024, max_size: 128 * 1024 };

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("chunk sizes must satisfy min <= avg <= max (got {0}/{1}/{2})")]
    Order(u32, u32, u32),
    #[error("chunk sizes must be even (got {0}/{1}/{2})")]
    Odd(u32, u32, u32),
    #[error("{what} chunk size {value} is outside FastCDC's range {lo}..={hi}")]
    Range { what: &'static str, value: u32, lo: usize, hi: usize },
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), ParamsError> {
        let (min, avg, max) = (self.min_size, self.avg_size, self.max_size);
        let check = |what, value: u32, lo, hi| {
            if (value as usize) < lo || (value as usize) > hi {
                Err(ParamsError::Range { what, value, lo, hi })
            } else {
                Ok(())
            }
        };
        check("min", min, v2020::MINIMUM_MIN, v2020::MINIMUM_MAX)?;
        check("avg", avg, v2020::AVERAGE_MIN, v2020::AVERAGE_MAX)?;
        check("max", max, v2020::MAXIMUM_MIN, v2020::MAXIMUM_MAX)?;
        if !(min <= avg && avg <= max) {
            return Err(ParamsError::Order(min, avg, max));
        }
        if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            return Err(ParamsError::Odd(min, avg, max));
        }
        Ok(())
    }
}

/// A push-style FastCDC chunker.
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    /// Fixed-size window; the bytes not yet emitted are `buf[start..end]`, always fewer than
    /// `max` between calls.
    buf: Vec<u8>,
    /// Start of the not-yet-emitted bytes in `buf`; compacted lazily to avoid a memmove per chunk.
    start: usize,
    end: usize,
}

/// Room `read_from` reads into at once, beyond one `max` chunk.
const READ_ROOM: usize = 1 << 20;

impl Chunker {
    pub fn new(params: ChunkerParams) -> Result<Self, ParamsError> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg_size as usize, Normalization::Level1);
        let size = 2 * params.max_size as usize + READ_ROOM;
        Ok(Chunker { params, mask_s, mask_l, buf: vec![0; size], start: 0, end: 0 })
    }

    /// Feeds bytes; calls `emit` for every chunk that is complete. A chunk is complete once
    /// `max` bytes past its start are known, because a later byte can never move its cut.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !data.is_empty() {
            let room = self.make_room();
            let take = room.len().min(data.len());
            room[..take].copy_from_slice(&data[..take]);
            self.end += take;
            data = &data[take..];
            self.emit_complete(emit);
        }
    }

    /// Reads once from `src` straight into the chunker's window (no copy through a buffer of
    /// the caller's), shows the bytes read to `seen`, and emits the chunks then complete.
    /// Returns how many bytes were read: 0 at the end of `src`.
    ///
    /// A large read is shown to `seen` on a second thread while this one cuts: cutting and
    /// a whole-file hash each take a core-bound pass over the bytes, and a lone file (one
    /// WAL segment) otherwise waits for both in turn.
    pub fn read_from(
        &mut self,
        src: &mut dyn std::io::Read,
        seen: &mut (impl FnMut(&[u8]) + Send),
        emit: &mut impl FnMut(&[u8]),
    ) -> std::io::Result<usize> {
        self.make_room();
        let from = self.end;
        let n = src.read(&mut self.buf[from..])?;
        self.end += n;
        if n < PARALLEL_SEEN {
            seen(&self.buf[from..from + n]);
            self.emit_complete(emit);
            return Ok(n);
        }
        let (params, mask_s, mask_l, end) = (self.params, self.mask_s, self.mask_l, self.end);
        let (buf, start) = (&self.buf, &mut self.start);
        std::thread::scope(|s| {
            s.spawn(|| seen(&buf[from..end]));
            while end - *start >= params.max_size as usize {
                let cut = cut(params, mask_s, mask_l, &buf[*start..end]);
                emit(&buf[*start..*start + cut]);
                *start += cut;
            }
        });
        Ok(n)
    }

    /// The free end of the window, after moving the pending bytes to its front if fewer than
    /// `max` bytes are left free (never empty: pending bytes are fewer than `max`).
    fn make_room(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < self.params.max_size as usize {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    fn emit_complete(&mut self, emit: &mut impl FnMut(&[u8])) {
        let max = self.params.max_size as usize;
        while self.end - self.start >= max {
            let cut = cut(self.params, self.mask_s, self.mask_l, &self.buf[self.start..self.end]);
            emit(&self.buf[self.start..self.start + cut]);
            self.start += cut;
        }
    }

    /// Emits what remains (possibly several chunks, the last one short). The chunker is
    /// then empty and can cut the next stream.
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        while self.start < self.end {
            let cut = cut(self.params, self.mask_s, self.mask_l, &self.buf[self.start..self.end]);
            emit(&self.buf[self.start..self.start + cut]);
            self.start += cut;
        }
        self.start = 0;
        self.end = 0;
    }
}

/// Reads at least this large are shown to `seen` on a second thread (below it, starting the
/// thread costs more than it saves).
const PARALLEL_SEEN: usize = 256 * 1024;

/// Length of the first chunk of `source`.
fn cut(p: ChunkerParams, mask_s: u64, mask_l: u64, source: &[u8]) -> usize {
    let (_, len) = v2020::cut(
        source,
        p.min_size as usize,
        p.avg_size as usize,
        p.max_size as usize,
        mask_s,
        mask_l,
        mask_s << 1,
        mask_l << 1,
    );
    len.max(1).min(source.len())
}

/// Cuts a whole buffer at once (tests, manifests, small inputs).
pub fn chunk_all(params: ChunkerParams, data: &[u8]) -> Result<Vec<std::ops::Range<usize>>, ParamsError> {
    let mut chunker = Chunker::new(params)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut emit = |c: &[u8]| {
        out.push(pos..pos + c.len());
        pos += c.len();
    };
    chunker.push(data, &mut emit);
    chunker.finish(&mut emit);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a generator defined here, so the goldens never depend on a crate's RNG.
    fn seeded(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        v.truncate(len);
        v
    }

    #[test]
    fn agrees_with_the_reference_fastcdc_iterator() {
        let data = seeded(1 << 20, 5);
        let ours: Vec<usize> = chunk_all(SMALL, &data).unwrap().iter().map(|r| r.end).collect();
        let reference: Vec<usize> = v2020::FastCDC::with_level(&data, 2048, 8192, 32768, Normalization::Level1)
            .map(|c| c.offset + c.length)
            .collect();
        assert_eq!(ours, reference);
    }

    const SMALL: ChunkerParams = ChunkerParams { min_size: 2048, avg_size: 8192, max_size: 32768 };

    #[test]
    fn golden_boundaries_over_seeded_data() {
        // Boundaries are part of the dedup contract between days: if they drift, every
        // chunk of every source changes. Update only with a deliberate format change.
        let data = seeded(256 * 1024, 20250101);
        let cuts: Vec<usize> = chunk_all(SMALL, &data).unwrap().iter().map(|r| r.end).collect();
        assert_eq!(cuts, GOLDEN_CUTS, "chunk boundaries drifted");
    }

    const GOLDEN_CUTS: &[usize] = &[
        9487, 12022, 24490, 34611, 45613, 52489, 58712, 78915, 89431, 111229, 115236, 127576, 136965, 145509, 154085,
        162614, 167796, 180266, 185823, 193197, 201589, 219706, 230346, 239764, 248996, 258286, 262144,
    ];

    #[test]
    fn push_granularity_does_not_move_cuts() {
        let data = seeded(300_000, 7);
        let whole = chunk_all(SMALL, &data).unwrap();
        for step in [1usize, 7, 4096, 65536] {
            let mut c = Chunker::new(SMALL).unwrap();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut emit = |ch: &[u8]| {
                got.push(pos..pos + ch.len());
                pos += ch.len();
            };
            for piece in data.chunks(step) {
                c.push(piece, &mut emit);
            }
            c.finish(&mut emit);
            assert_eq!(got, whole, "step {step}");
        }
    }

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a>(&'a [u8], usize);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(out.len()).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn reading_straight_into_the_window_cuts_the_same_and_shows_every_byte() {
        let data = seeded(3_000_000, 13);
        let whole = chunk_all(SMALL, &data).unwrap();
        for step in [1usize, 4096, 100_000, 1 << 22] {
            let mut c = Chunker::new(SMALL).unwrap();
            let (mut got, mut seen, mut pos) = (Vec::new(), Vec::new(), 0);
            let mut emit = |ch: &[u8]| {
                got.push(pos..pos + ch.len());
                pos += ch.len();
            };
            let mut src = Trickle(&data, step);
            while c.read_from(&mut src, &mut |b: &[u8]| seen.extend_from_slice(b), &mut emit).unwrap() > 0 {}
            c.finish(&mut emit);
            assert_eq!(got, whole, "step {step}");
            assert!(seen == data, "step {step}: the bytes shown differ from those read");
        }
        // Pushing and reading mix, and the chunker cuts a second stream after `finish`.
        let mut c = Chunker::new(SMALL).unwrap();
        c.push(&data[..1000], &mut |_: &[u8]| {});
        c.finish(&mut |_: &[u8]| {});
        let (mut got, mut pos) = (Vec::new(), 0);
        let mut emit = |ch: &[u8]| {
            got.push(pos..pos + ch.len());
            pos += ch.len();
        };
        c.push(&data[..50_000], &mut emit);
        let mut src = Trickle(&data[50_000..], 700_000);
        while c.read_from(&mut src, &mut |_: &[u8]| {}, &mut emit).unwrap() > 0 {}
        c.finish(&mut emit);
        assert_eq!(got, whole);
    }

    #[test]
    fn sizes_respect_bounds_and_cover_input() {
        let data = seeded(1 << 20, 3);
        let ranges = chunk_all(SMALL, &data).unwrap();
        let mut pos = 0;
        for (i, r) in ranges.iter().enumerate() {
            assert_eq!(r.start, pos);
            assert!(r.len() <= SMALL.max_size as usize);
            if i + 1 < ranges.len() {
                assert!(r.len() >= SMALL.min_size as usize);
            }
            pos = r.end;
        }
        assert_eq!(pos, data.len());
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let data = seeded(1 << 20, 11);
        let mut edited = data.clone();
        edited.splice(500_000..500_000, b"a new row in the register".iter().copied());
        let a: std::collections::HashSet<&[u8]> =
            chunk_all(SMALL, &data).unwrap().into_iter().map(|r| &data[r]).collect();
        let b: Vec<&[u8]> = chunk_all(SMALL, &edited).unwrap().into_iter().map(|r| &edited[r]).collect();
        let new = b.iter().filter(|c| !a.contains(*c)).count();
        assert!(new <= 3, "{new} chunks changed for one insertion");
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(matches!(
            Chunker::new(ChunkerParams { min_size: 4096, avg_size: 2048, max_size: 8192 }),
            Err(ParamsError::Order(..))
        ));
        assert!(matches!(
            Chunker::new(ChunkerParams { min_size: 2, avg_size: 2048, max_size: 8192 }),
            Err(ParamsError::Range { .. })
        ));
        assert!(ChunkerParams::default().validate().is_ok());
        assert!(MANIFEST_CHUNKER.validate().is_ok());
    }

    #[test]
    fn empty_input_gives_no_chunk() {
        assert!(chunk_all(SMALL, &[]).unwrap().is_empty());
    }
}
