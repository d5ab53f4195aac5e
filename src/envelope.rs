//! The chunk envelope: how one chunk is compressed, encrypted and stored.
//!
//! Layout, version 1 (all integers little-endian). NEVER change the meaning of an existing
//! version: envelopes written today must open in twenty years. Add a version instead.
//!
//! ```text
//! offset  size  field
//! 0       3     magic "XVE"
//! 3       1     version = 1
//! 4       1     codec: 0 raw, 1 zstd, 2 zstd-delta (zstd with a base chunk's plaintext as prefix)
//! 5       1     flags = 0 (reserved)
//! 6       4     key epoch (which data key encrypted this envelope)
//! 10      4     plaintext length (bytes after decompression)
//! 14      32    base chunk id           (codec 2 only)
//! h       12    nonce
//! h+12    n     ciphertext (AES-256-GCM of the codec's payload)
//! h+12+n  16    tag
//! header = bytes [0, h); AAD = header ‖ chunk id
//! ```
//!
//! The nonce is `keyed_blake3(nonce_key, header ‖ chunk id ‖ payload)[..12]`: derived from
//! the chunk id under its own key, so the same chunk always gives the same envelope, and
//! also from the exact bytes encrypted, so a different payload under the same id (another
//! zstd version, a delta against another base) can never reuse a nonce (a synthetic-IV
//! construction). The AAD binds header and chunk id, so an envelope cannot be replayed
//! under another id or have its codec or epoch swapped.
//!
//! After decryption the plaintext's keyed BLAKE3 must equal the chunk id: a node cannot
//! serve a different chunk even with a valid envelope. The storage checksum
//! (`Checksum::of(envelope)`) is what key-less nodes verify.
//!
//! # Deltas (codec 2)
//!
//! The payload is a zstd frame compressed with the base chunk's plaintext as a raw prefix
//! (`ZSTD_CCtx_refPrefix`, level `DELTA_ZSTD_LEVEL`, a window spanning base and chunk, and
//! long-distance matching above `DELTA_LONG_MATCH_BASE` of base). The base id stands in the
//! clear header, bound by the AAD: the nodes read it to keep a base as long as a delta on it is
//! referenced (they learn which chunk a changed chunk was derived from, never what either
//! holds). Opening is two steps: `open_any` authenticates and gives the base to fetch,
//! `apply_delta` decompresses against the base's plaintext (itself opened and id-checked) and
//! checks the result's id, so a wrong or damaged base can never yield a chunk.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::chunk_id::ChunkId;
use crate::keys::TenantKeys;

pub const MAGIC: &[u8; 3] = b"XVE";
pub const VERSION: u8 = 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
const FIXED_HEADER: usize = 14;
/// Largest plaintext an envelope may declare: FastCDC's largest chunk.
pub const MAX_PLAINTEXT: u32 = 16 * 1024 * 1024;
/// Largest envelope: a raw max-size chunk plus header, base id, nonce and tag.
pub const MAX_ENVELOPE: usize = MAX_PLAINTEXT as usize + FIXED_HEADER + 32 + NONCE_LEN + TAG_LEN;
/// zstd level, chosen by measurement on 1 MiB chunks of the shared register (README,
/// "Benchmark"): level 2 stores 7 % less than level 1 for about a quarter more compression time.
pub const DEFAULT_ZSTD_LEVEL: i32 = 2;
/// zstd level of deltas: on a day of the benchmark register level 3 gave deltas a third the
/// size of level 1's (1.4 against 4.2 MB for 160 MB of changed chunks) for the same time,
/// the base being matched better; only changed chunks pay it.
pub const DELTA_ZSTD_LEVEL: i32 = 3;
/// Above this much base, a delta also uses zstd's long-distance matcher: the level's own
/// tables (2^17 slots at level 3) no longer hold the base's positions, and the deltas of 1 MiB
/// chunks were 22 times larger without it (19.99 MB with the wide window alone against 0.89
/// MB, for 200 MB of a day's changed dump).
const DELTA_LONG_MATCH_BASE: usize = 512 * 1024;

/// zstd parameters of a delta of `len` bytes on a base of `base_len`. The window spans base
/// and chunk, so every byte of the base stays a match candidate (the level alone sizes the
/// window from the chunk); at most 2^25 for two 16 MiB chunks, within the decoder's default
/// limit of 2^27, so frames stay standard and older readers open them.
fn delta_parameters(base_len: usize, len: usize) -> Vec<zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    let span = (base_len + len).max(1);
    let window_log = (usize::BITS - (span - 1).leading_zeros()).clamp(10, 27);
    let mut p = vec![CParameter::CompressionLevel(DELTA_ZSTD_LEVEL), CParameter::WindowLog(window_log)];
    if base_len > DELTA_LONG_MATCH_BASE {
        p.push(CParameter::EnableLongDistanceMatching(true));
    }
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
    /// zstd against the named base chunk's plaintext as prefix.
    ZstdDelta(ChunkId),
}

impl Codec {
    fn tag(&self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::ZstdDelta(_) => 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not an envelope (bad magic)")]
    BadMagic,
    #[error("envelope version {0} is not supported by this build")]
    UnsupportedVersion(u8),
    #[error("envelope codec {0} is not supported by this build")]
    UnsupportedCodec(u8),
    #[error("envelope declares {0} plaintext bytes, over the limit")]
    TooLarge(u32),
    #[error("chunk is larger than an envelope may hold ({0} bytes)")]
    PlaintextTooLarge(usize),
    #[error("authentication failed: the chunk was tampered with, or the key is wrong")]
    Authentication,
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("decompressed length {got} differs from the declared {declared}")]
    Length { got: usize, declared: u32 },
    #[error("content does not match its chunk id")]
    IdMismatch,
    #[error("compression failed: {0}")]
    Compress(String),
    #[error(
        "sealed with key epoch {0}, which this key file does not hold (it was rotated later: use the newest key file)"
    )]
    UnknownEpoch(u32),
    #[error("the chunk is a delta on base chunk {0}, which must be opened first")]
    NeedsBase(ChunkId),
}

/// An opened envelope: the plaintext, or a delta still to be applied to its base.
#[derive(Debug)]
pub enum Opened {
    Plain(Vec<u8>),
    Delta(Delta),
}

/// An authenticated delta payload, waiting for its base's plaintext.
#[derive(Debug)]
pub struct Delta {
    pub base: ChunkId,
    payload: Vec<u8>,
    plaintext_len: u32,
}

/// The parsed clear header of an envelope (readable without a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub epoch: u32,
    pub plaintext_len: u32,
    /// Length of the header in bytes (where the nonce starts).
    pub len: usize,
}

/// Parses and bounds-checks the clear header; used by nodes to refuse garbage early.
pub fn parse_header(env: &[u8]) -> Result<Header, EnvelopeError> {
    if env.len() < FIXED_HEADER {
        return Err(EnvelopeError::Truncated(env.len()));
    }
    if &env[..3] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if env[3] != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(env[3]));
    }
    let epoch = u32::from_le_bytes([env[6], env[7], env[8], env[9]]);
    let plaintext_len = u32::from_le_bytes([env[10], env[11], env[12], env[13]]);
    if plaintext_len > MAX_PLAINTEXT {
        return Err(EnvelopeError::TooLarge(plaintext_len));
    }
    let (codec, len) = match env[4] {
        0 => (Codec::Raw, FIXED_HEADER),
        1 => (Codec::Zstd, FIXED_HEADER),
        2 => {
            if env.len() < FIXED_HEADER + 32 {
                return Err(EnvelopeError::Truncated(env.len()));
            }
            let mut base = [0u8; 32];
            base.copy_from_slice(&env[FIXED_HEADER..FIXED_HEADER + 32]);
            (Codec::ZstdDelta(ChunkId(base)), FIXED_HEADER + 32)
        }
        c => return Err(EnvelopeError::UnsupportedCodec(c)),
    };
    if env.len() < len + NONCE_LEN + TAG_LEN {
        return Err(EnvelopeError::Truncated(env.len()));
    }
    if codec == Codec::Raw && env.len() != len + NONCE_LEN + plaintext_len as usize + TAG_LEN {
        return Err(EnvelopeError::Truncated(env.len()));
    }
    Ok(Header { codec, epoch, plaintext_len, len })
}

/// Seals chunks. Holds a zstd context, so keep one per worker thread.
pub struct Sealer {
    keys: TenantKeys,
    cipher: LessSafeKey,
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Sealer {
    pub fn new(keys: &TenantKeys, level: i32) -> Result<Self, EnvelopeError> {
        let cipher = cipher_for(&keys.data_key(keys.epoch).ok_or(EnvelopeError::UnknownEpoch(keys.epoch))?);
        let compressor = zstd::bulk::Compressor::new(level).map_err(|e| EnvelopeError::Compress(e.to_string()))?;
        Ok(Sealer { keys: keys.clone(), cipher, compressor, scratch: Vec::new() })
    }

    /// Compresses (if that shrinks the chunk) and encrypts `plaintext`, whose id is `id`.
    pub fn seal(&mut self, id: &ChunkId, plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        if plaintext.len() > MAX_PLAINTEXT as usize {
            return Err(EnvelopeError::PlaintextTooLarge(plaintext.len()));
        }
        self.scratch.clear();
        self.scratch.reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
        let compressed = self
            .compressor
            .compress_to_buffer(plaintext, &mut self.scratch)
            .map_err(|e| EnvelopeError::Compress(e.to_string()))?;
        let scratch = std::mem::take(&mut self.scratch);
        let out = if compressed < plaintext.len() {
            self.write(id, Codec::Zstd, plaintext.len(), &scratch[..compressed])
        } else {
            self.write(id, Codec::Raw, plaintext.len(), plaintext)
        };
        self.scratch = scratch;
        out
    }

    /// Seals `plaintext` as a delta on the chunk `base_id`, whose plaintext is `base`. The
    /// caller decides whether the delta is worth keeping (`Header::payload_len`).
    pub fn seal_delta(
        &mut self,
        id: &ChunkId,
        plaintext: &[u8],
        base_id: &ChunkId,
        base: &[u8],
    ) -> Result<Vec<u8>, EnvelopeError> {
        if plaintext.len() > MAX_PLAINTEXT as usize {
            return Err(EnvelopeError::PlaintextTooLarge(plaintext.len()));
        }
        let compress_err = |e: usize| EnvelopeError::Compress(zstd::zstd_safe::get_error_name(e).to_string());
        // A context per delta: a prefix is borrowed for the context's lifetime.
        let mut cctx = zstd::zstd_safe::CCtx::create();
        for p in delta_parameters(base.len(), plaintext.len()) {
            cctx.set_parameter(p).map_err(compress_err)?;
        }
        cctx.ref_prefix(base).map_err(compress_err)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
        let n = cctx.compress2(&mut scratch, plaintext).map_err(compress_err);
        let out = n.and_then(|n| self.write(id, Codec::ZstdDelta(*base_id), plaintext.len(), &scratch[..n]));
        self.scratch = scratch;
        out
    }

    /// Writes the envelope of `payload` (the codec's output for a plaintext of `plain_len`).
    fn write(&self, id: &ChunkId, codec: Codec, plain_len: usize, payload: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::with_capacity(FIXED_HEADER + 32 + NONCE_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(codec.tag());
        out.push(0);
        out.extend_from_slice(&self.keys.epoch.to_le_bytes());
        out.extend_from_slice(&(plain_len as u32).to_le_bytes());
        if let Codec::ZstdDelta(base) = codec {
            out.extend_from_slice(&base.0);
        }
        let header_len = out.len();

        let mut h = blake3::Hasher::new_keyed(self.keys.nonce_key());
        h.update(&out[..header_len]);
        h.update(&id.0);
        h.update(payload);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&h.finalize().as_bytes()[..NONCE_LEN]);
        out.extend_from_slice(&nonce);

        let aad = aad(&out[..header_len], id);
        out.extend_from_slice(payload);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut out[header_len + NONCE_LEN..],
            )
            .map_err(|_| EnvelopeError::Authentication)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }
}

/// Opens envelopes. Caches one cipher per epoch and holds a zstd context.
pub struct Opener {
    keys: TenantKeys,
    ciphers: Vec<(u32, LessSafeKey)>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Opener {
    pub fn new(keys: &TenantKeys) -> Result<Self, EnvelopeError> {
        Ok(Opener {
            keys: keys.clone(),
            ciphers: Vec::new(),
            decompressor: zstd::bulk::Decompressor::new().map_err(|e| EnvelopeError::Decompress(e.to_string()))?,
        })
    }

    /// Decrypts, decompresses and checks the id of one envelope; a delta is refused with the
    /// base it needs (`NeedsBase`): use `open_any` for those.
    pub fn open(&mut self, id: &ChunkId, env: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        match self.open_any(id, env)? {
            Opened::Plain(p) => Ok(p),
            Opened::Delta(d) => Err(EnvelopeError::NeedsBase(d.base)),
        }
    }

    /// Applies an authenticated delta to its base's plaintext and checks the result's id.
    pub fn apply_delta(&mut self, id: &ChunkId, delta: Delta, base: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut dctx = zstd::zstd_safe::DCtx::create();
        let err = |e: usize| EnvelopeError::Decompress(zstd::zstd_safe::get_error_name(e).to_string());
        dctx.ref_prefix(base).map_err(err)?;
        let mut plaintext = Vec::with_capacity(delta.plaintext_len as usize);
        dctx.decompress(&mut plaintext, &delta.payload).map_err(err)?;
        if plaintext.len() != delta.plaintext_len as usize {
            return Err(EnvelopeError::Length { got: plaintext.len(), declared: delta.plaintext_len });
        }
        if self.keys.chunk_id(&plaintext) != *id {
            return Err(EnvelopeError::IdMismatch);
        }
        Ok(plaintext)
    }

    /// Decrypts one envelope; a plain one is decompressed and id-checked, a delta is only
    /// authenticated (its base must be had first).
    pub fn open_any(&mut self, id: &ChunkId, env: &[u8]) -> Result<Opened, EnvelopeError> {
        let hdr = parse_header(env)?;
        let nonce_bytes: [u8; NONCE_LEN] =
            env[hdr.len..hdr.len + NONCE_LEN].try_into().map_err(|_| EnvelopeError::Truncated(env.len()))?;
        let aad = aad(&env[..hdr.len], id);
        let mut body = env[hdr.len + NONCE_LEN..].to_vec();
        let cipher = self.cipher(hdr.epoch)?;
        let payload_len = cipher
            .open_in_place(Nonce::assume_unique_for_key(nonce_bytes), Aad::from(&aad[..]), &mut body)
            .map_err(|_| EnvelopeError::Authentication)?
            .len();
        body.truncate(payload_len);
        let plaintext = match hdr.codec {
            Codec::Raw => body,
            Codec::Zstd => self
                .decompressor
                .decompress(&body, hdr.plaintext_len as usize)
                .map_err(|e| EnvelopeError::Decompress(e.to_string()))?,
            Codec::ZstdDelta(base) => {
                return Ok(Opened::Delta(Delta { base, payload: body, plaintext_len: hdr.plaintext_len }));
            }
        };
        if plaintext.len() != hdr.plaintext_len as usize {
            return Err(EnvelopeError::Length { got: plaintext.len(), declared: hdr.plaintext_len });
        }
        if self.keys.chunk_id(&plaintext) != *id {
            return Err(EnvelopeError::IdMismatch);
        }
        Ok(Opened::Plain(plaintext))
    }

    fn cipher(&mut self, epoch: u32) -> Result<&LessSafeKey, EnvelopeError> {
        let pos = match self.ciphers.iter().position(|(e, _)| *e == epoch) {
            Some(p) => p,
            None => {
                let key = self.keys.data_key(epoch).ok_or(EnvelopeError::UnknownEpoch(epoch))?;
                self.ciphers.push((epoch, cipher_for(&key)));
                self.ciphers.len() - 1
            }
        };
        Ok(&self.ciphers[pos].1)
    }
}

fn cipher_for(key: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"))
}

fn aad(header: &[u8], id: &ChunkId) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + 32);
    a.extend_from_slice(header);
    a.extend_from_slice(&id.0);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    fn keys(b: u8) -> TenantKeys {
        TenantKeys::from_master("lux", MasterKey::from_bytes([b; 32]))
    }

    fn text() -> Vec<u8> {
        b"INSERT INTO persons VALUES (1, 'Aino', 'Virtanen', 'Helsinki');\n".repeat(400)
    }

    #[test]
    fn round_trip_compressible_and_incompressible() {
        let k = keys(1);
        let mut s = Sealer::new(&k, 1).unwrap();
        let mut o = Opener::new(&k).unwrap();
        let t = text();
        let id = k.chunk_id(&t);
        let env = s.seal(&id, &t).unwrap();
        assert!(env.len() < t.len() / 4);
        assert_eq!(parse_header(&env).unwrap().codec, Codec::Zstd);
        assert_eq!(o.open(&id, &env).unwrap(), t);

        let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let nid = k.chunk_id(&noise);
        let env = s.seal(&nid, &noise).unwrap();
        let h = parse_header(&env).unwrap();
        if h.codec == Codec::Raw {
            assert_eq!(env.len(), noise.len() + 14 + 12 + 16);
        }
        assert_eq!(o.open(&nid, &env).unwrap(), noise);

        let empty_id = k.chunk_id(b"");
        let env = s.seal(&empty_id, b"").unwrap();
        assert_eq!(o.open(&empty_id, &env).unwrap(), b"");
    }

    #[test]
    fn sealing_is_deterministic() {
        let k = keys(2);
        let t = text();
        let id = k.chunk_id(&t);
        let a = Sealer::new(&k, 1).unwrap().seal(&id, &t).unwrap();
        let b = Sealer::new(&k, 1).unwrap().seal(&id, &t).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let k = keys(3);
        let t = b"population register row".repeat(3);
        let id = k.chunk_id(&t);
        let env = Sealer::new(&k, 1).unwrap().seal(&id, &t).unwrap();
        let mut o = Opener::new(&k).unwrap();
        for byte in 0..env.len() {
            for bit in 0..8 {
                let mut bad = env.clone();
                bad[byte] ^= 1 << bit;
                assert!(o.open(&id, &bad).is_err(), "flip at byte {byte} bit {bit} not detected");
            }
        }
        for cut in 0..env.len() {
            assert!(o.open(&id, &env[..cut]).is_err());
        }
    }

    #[test]
    fn wrong_key_and_swapped_id_fail_authentication() {
        let k = keys(4);
        let t = text();
        let id = k.chunk_id(&t);
        let env = Sealer::new(&k, 1).unwrap().seal(&id, &t).unwrap();
        assert_eq!(Opener::new(&keys(5)).unwrap().open(&id, &env), Err(EnvelopeError::Authentication));
        let other = k.chunk_id(b"other");
        assert_eq!(Opener::new(&k).unwrap().open(&other, &env), Err(EnvelopeError::Authentication));
    }

    #[test]
    fn other_epochs_stay_readable() {
        let mut m = crate::keys::KeyMaterial::from_master(MasterKey::from_bytes([6; 32]));
        let old = TenantKeys::new("lux", m.clone());
        m.rotate().unwrap();
        let new = TenantKeys::new("lux", m);
        let t = text();
        let id = old.chunk_id(&t);
        assert_eq!(id, new.chunk_id(&t), "rotation must not break dedup");
        let env = Sealer::new(&old, 1).unwrap().seal(&id, &t).unwrap();
        assert_eq!(parse_header(&env).unwrap().epoch, 0);
        assert_eq!(Opener::new(&new).unwrap().open(&id, &env).unwrap(), t);
        // Sealed after the rotation: the old key file cannot open it, and says why.
        let env1 = Sealer::new(&new, 1).unwrap().seal(&id, &t).unwrap();
        assert_eq!(parse_header(&env1).unwrap().epoch, 1);
        assert_ne!(env1[22..], env[22..]);
        assert_eq!(Opener::new(&new).unwrap().open(&id, &env1).unwrap(), t);
        assert_eq!(Opener::new(&old).unwrap().open(&id, &env1), Err(EnvelopeError::UnknownEpoch(1)));
    }

    #[test]
    fn envelopes_are_standard_aes_256_gcm() {
        // An independent implementation (RustCrypto aes-gcm) decrypts our envelopes.
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let k = keys(7);
        let t = b"not compressible? 0123456789".to_vec();
        let id = k.chunk_id(&t);
        let env = Sealer::new(&k, 1).unwrap().seal(&id, &t).unwrap();
        let h = parse_header(&env).unwrap();
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&k.data_key(0).unwrap()).unwrap();
        let nonce = aes_gcm::Nonce::try_from(&env[h.len..h.len + NONCE_LEN]).unwrap();
        let mut aad = env[..h.len].to_vec();
        aad.extend_from_slice(&id.0);
        let payload = cipher.decrypt(&nonce, Payload { msg: &env[h.len + NONCE_LEN..], aad: &aad }).unwrap();
        let plain = match h.codec {
            Codec::Raw => payload,
            Codec::Zstd => zstd::bulk::decompress(&payload, t.len()).unwrap(),
            Codec::ZstdDelta(_) => unreachable!(),
        };
        assert_eq!(plain, t);
    }

    /// A day of change: a few rows rewritten in place.
    fn changed(t: &[u8]) -> Vec<u8> {
        let mut c = t.to_vec();
        for at in [100, 9000, 20000] {
            c[at..at + 7].copy_from_slice(b"Tallinn");
        }
        c
    }

    #[test]
    fn delta_round_trip_is_small_and_needs_its_base() {
        let k = keys(8);
        let base: Vec<u8> =
            (0..4000u32).flat_map(|i| format!("{i},person-{},{}\n", i * 7919 % 10007, i % 97).into_bytes()).collect();
        let new = changed(&base);
        let (bid, id) = (k.chunk_id(&base), k.chunk_id(&new));
        let mut s = Sealer::new(&k, 1).unwrap();
        let full = s.seal(&id, &new).unwrap();
        let delta = s.seal_delta(&id, &new, &bid, &base).unwrap();
        assert!(delta.len() * 10 < full.len(), "delta {} full {}", delta.len(), full.len());
        assert_eq!(parse_header(&delta).unwrap().codec, Codec::ZstdDelta(bid));
        assert_eq!(s.seal_delta(&id, &new, &bid, &base).unwrap(), delta, "deterministic");

        let mut o = Opener::new(&k).unwrap();
        assert_eq!(o.open(&id, &delta), Err(EnvelopeError::NeedsBase(bid)));
        let Opened::Delta(d) = o.open_any(&id, &delta).unwrap() else { panic!("not a delta") };
        assert_eq!(d.base, bid);
        assert_eq!(o.apply_delta(&id, d, &base).unwrap(), new);

        // The wrong base never yields a chunk: zstd fails, or the id does not match.
        let Opened::Delta(d) = o.open_any(&id, &delta).unwrap() else { panic!("not a delta") };
        let wrong: Vec<u8> = base.iter().rev().copied().collect();
        assert!(o.apply_delta(&id, d, &wrong).is_err());
    }

    #[test]
    fn a_large_chunk_finds_all_of_its_base() {
        // Incompressible on its own, so only the base can make the delta small; at 3 MiB the
        // level's own window and tables would reach back over a fraction of the base.
        let k = keys(10);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let base: Vec<u8> = (0..3 * 1024 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut new = base.clone();
        for at in (0..new.len()).step_by(40_000) {
            new[at] ^= 0x5a;
        }
        let (bid, id) = (k.chunk_id(&base), k.chunk_id(&new));
        let delta = Sealer::new(&k, 1).unwrap().seal_delta(&id, &new, &bid, &base).unwrap();
        assert!(
            delta.len() < new.len() / 100,
            "delta of {} bytes for {} changed bytes",
            delta.len(),
            new.len() / 40_000
        );
        let mut o = Opener::new(&k).unwrap();
        let Opened::Delta(d) = o.open_any(&id, &delta).unwrap() else { panic!("not a delta") };
        assert_eq!(o.apply_delta(&id, d, &base).unwrap(), new);
    }

    #[test]
    fn a_tampered_delta_or_base_id_is_detected() {
        let k = keys(9);
        let base = text();
        let new = changed(&base);
        let (bid, id) = (k.chunk_id(&base), k.chunk_id(&new));
        let delta = Sealer::new(&k, 1).unwrap().seal_delta(&id, &new, &bid, &base).unwrap();
        let mut o = Opener::new(&k).unwrap();
        for byte in 0..delta.len() {
            let mut bad = delta.clone();
            bad[byte] ^= 0x10;
            assert!(o.open_any(&id, &bad).is_err(), "flip at byte {byte} not detected");
        }
        // The base id is authenticated: another base cannot be named.
        let mut other = delta.clone();
        other[FIXED_HEADER] ^= 1;
        assert_eq!(o.open_any(&id, &other).err(), Some(EnvelopeError::Authentication));
    }

    #[test]
    fn header_rejects_garbage() {
        assert_eq!(parse_header(b"XV"), Err(EnvelopeError::Truncated(2)));
        assert_eq!(parse_header(&[0u8; 64]), Err(EnvelopeError::BadMagic));
        let mut h = b"XVE\x02\x00\x00".to_vec();
        h.extend_from_slice(&[0u8; 40]);
        assert_eq!(parse_header(&h), Err(EnvelopeError::UnsupportedVersion(2)));
        let mut h = b"XVE\x01\x09\x00".to_vec();
        h.extend_from_slice(&[0u8; 40]);
        assert_eq!(parse_header(&h), Err(EnvelopeError::UnsupportedCodec(9)));
        let mut h = b"XVE\x01\x01\x00\x00\x00\x00\x00".to_vec();
        h.extend_from_slice(&u32::MAX.to_le_bytes());
        h.extend_from_slice(&[0u8; 40]);
        assert_eq!(parse_header(&h), Err(EnvelopeError::TooLarge(u32::MAX)));
    }
}
