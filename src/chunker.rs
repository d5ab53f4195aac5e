//! Content-defined chunking (FastCDC 2020), push-style.
//!
//! The chunker owns no reader: callers push bytes as they arrive and receive every complete
//! chunk through a callback, then call `finish` for the tail. This keeps it free of I/O, lets
//! the same code cut files, database dumps and the manifest stream, and bounds its memory to
//! one `max` chunk.
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
    /// 16 KiB / 64 KiB / 256 KiB. Chosen by measurement on the shared register data
    /// (see README, "Chunk size"): register dumps change a few rows everywhere, so smaller
    /// chunks upload far less on day 2, while batching keeps the per-chunk cost low.
    fn default() -> Self {
        ChunkerParams { min_size: 16 * 1024, avg_size: 64 * 1024, max_size: 256 * 1024 }
    }
}

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
    buf: Vec<u8>,
    /// Start of the not-yet-emitted bytes in `buf`; compacted lazily to avoid a memmove per chunk.
    start: usize,
}

impl Chunker {
    pub fn new(params: ChunkerParams) -> Result<Self, ParamsError> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg_size as usize, Normalization::Level1);
        Ok(Chunker { params, mask_s, mask_l, buf: Vec::with_capacity(3 * params.max_size as usize), start: 0 })
    }

    /// Feeds bytes; calls `emit` for every chunk that is complete. A chunk is complete once
    /// `max` bytes past its start are known, because a later byte can never move its cut.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8])) {
        let max = self.params.max_size as usize;
        while !data.is_empty() {
            // Invariant here: fewer than `max` bytes are pending.
            let pending = self.buf.len() - self.start;
            let take = (max - pending).min(data.len());
            if self.start >= max {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            while self.buf.len() - self.start >= max {
                let cut = self.cut(&self.buf[self.start..]);
                emit(&self.buf[self.start..self.start + cut]);
                self.start += cut;
            }
        }
    }

    /// Emits what remains (possibly several chunks, the last one short). The chunker is
    /// then empty and can cut the next stream.
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        while self.start < self.buf.len() {
            let cut = self.cut(&self.buf[self.start..]);
            emit(&self.buf[self.start..self.start + cut]);
            self.start += cut;
        }
        self.buf.clear();
        self.start = 0;
    }

    fn cut(&self, source: &[u8]) -> usize {
        let p = self.params;
        let (_, len) = v2020::cut(
            source,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        len.max(1).min(source.len())
    }
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
