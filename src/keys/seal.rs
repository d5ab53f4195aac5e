//! Sealing secret bytes under a passphrase: Argon2id, then AES-256-GCM.
//!
//! Layout of a sealed blob, version 1 (integers little-endian). NEVER change the meaning of
//! an existing version: a key sealed today must open in twenty years.
//!
//! ```text
//! offset  size  field
//! 0       1     version = 1
//! 1       1     kdf = 1: Argon2id, Argon2 version 0x13
//! 2       4     memory, KiB
//! 6       4     iterations
//! 10      4     parallelism (lanes)
//! 14      16    salt (random)
//! 30      8     passphrase check = derive_key(CTX_CHECK, argon2 output)[..8]
//! 38      12    nonce (random)
//! 50      n     ciphertext: AES-256-GCM under derive_key(CTX_KEY, argon2 output)
//! 50+n    16    tag
//! AAD = bytes [0, 50) ‖ context
//! ```
//!
//! The passphrase check tells a wrong passphrase from a damaged blob (it costs a guesser the
//! same Argon2 run as the AEAD would). The context names what is sealed (a tenant's key file,
//! one share), so a sealed blob cannot be moved into another container unnoticed. The KDF
//! parameters are bounded on reading, so a damaged file cannot ask for a terabyte of memory.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const KDF_ARGON2ID: u8 = 1;
const CTX_KEY: &str = "exclave 2026-11 sealed key v1";
const CTX_CHECK: &str = "exclave 2026-11 passphrase check v1";
const HEADER: usize = 50;
const TAG: usize = 16;

/// Argon2id cost. The default takes about a second on one core of this project's reference
/// machine (README, "Keys"): slow for a guesser, bearable once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams { memory_kib: 256 * 1024, iterations: 3, parallelism: 1 }
    }
}

/// Smallest memory cost accepted when sealing (tests use it; people should not).
pub const MIN_MEMORY_KIB: u32 = 8 * 1024;
/// Largest parameters accepted when opening: beyond these the blob is taken as damaged.
const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 16;

impl KdfParams {
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(format!(
                "Argon2 memory must be {} to {} MiB, not {} KiB",
                MIN_MEMORY_KIB / 1024,
                MAX_MEMORY_KIB / 1024,
                self.memory_kib
            ));
        }
        if !(1..=MAX_ITERATIONS).contains(&self.iterations) {
            return Err(format!("Argon2 iterations must be 1 to {MAX_ITERATIONS}, not {}", self.iterations));
        }
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            return Err(format!("Argon2 parallelism must be 1 to {MAX_PARALLELISM}, not {}", self.parallelism));
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "Argon2id, {} MiB, {} iteration(s), {} lane(s)",
            self.memory_kib / 1024,
            self.iterations,
            self.parallelism
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("{0}")]
    Damaged(String),
    #[error("{0}")]
    Params(String),
    #[error("an empty passphrase protects nothing")]
    EmptyPassphrase,
}

/// The parameters a blob was sealed with (readable without the passphrase).
pub fn params_of(blob: &[u8]) -> Result<KdfParams, SealError> {
    if blob.len() < HEADER + TAG {
        return Err(SealError::Damaged(format!("sealed data of {} bytes is truncated", blob.len())));
    }
    if blob[0] != VERSION {
        return Err(SealError::Damaged(format!("sealed data version {} is not supported by this build", blob[0])));
    }
    if blob[1] != KDF_ARGON2ID {
        return Err(SealError::Damaged(format!("key derivation {} is not supported by this build", blob[1])));
    }
    let u = |o: usize| u32::from_le_bytes([blob[o], blob[o + 1], blob[o + 2], blob[o + 3]]);
    let p = KdfParams { memory_kib: u(2), iterations: u(6), parallelism: u(10) };
    p.check().map_err(|e| SealError::Damaged(format!("implausible key derivation parameters: {e}")))?;
    Ok(p)
}

fn derive(passphrase: &[u8], salt: &[u8], p: &KdfParams) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| SealError::Params(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase, salt, &mut out[..]).map_err(|e| SealError::Params(e.to_string()))?;
    Ok(out)
}

fn cipher(key: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"))
}

/// Seals `secret` under `passphrase`; `context` names what it is (bound as AAD).
pub fn seal(secret: &[u8], passphrase: &[u8], params: &KdfParams, context: &[u8]) -> Result<Vec<u8>, SealError> {
    use rand::RngCore;
    if passphrase.is_empty() {
        return Err(SealError::EmptyPassphrase);
    }
    params.check().map_err(SealError::Params)?;
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut salt);
    rand::rng().fill_bytes(&mut nonce);
    let out_key = derive(passphrase, &salt, params)?;
    let mut blob = Vec::with_capacity(HEADER + secret.len() + TAG);
    blob.push(VERSION);
    blob.push(KDF_ARGON2ID);
    blob.extend_from_slice(&params.memory_kib.to_le_bytes());
    blob.extend_from_slice(&params.iterations.to_le_bytes());
    blob.extend_from_slice(&params.parallelism.to_le_bytes());
    blob.extend_from_slice(&salt);
    blob.extend_from_slice(&blake3::derive_key(CTX_CHECK, &out_key[..])[..8]);
    blob.extend_from_slice(&nonce);
    let mut aad = blob.clone();
    aad.extend_from_slice(context);
    blob.extend_from_slice(secret);
    let key = Zeroizing::new(blake3::derive_key(CTX_KEY, &out_key[..]));
    let tag = cipher(&key)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad[..]), &mut blob[HEADER..])
        .map_err(|_| SealError::Params("encryption failed".into()))?;
    blob.extend_from_slice(tag.as_ref());
    Ok(blob)
}

/// Opens a blob sealed with `seal` under the same passphrase and context.
pub fn open(blob: &[u8], passphrase: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let params = params_of(blob)?;
    let out_key = derive(passphrase, &blob[14..30], &params)?;
    if blake3::derive_key(CTX_CHECK, &out_key[..])[..8] != blob[30..38] {
        return Err(SealError::WrongPassphrase);
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&blob[38..50]);
    let mut aad = blob[..HEADER].to_vec();
    aad.extend_from_slice(context);
    let mut body = Zeroizing::new(blob[HEADER..].to_vec());
    let key = Zeroizing::new(blake3::derive_key(CTX_KEY, &out_key[..]));
    let n = cipher(&key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad[..]), &mut body[..])
        .map_err(|_| SealError::Damaged("the sealed key does not authenticate (damaged or tampered with)".into()))?
        .len();
    body.truncate(n);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FAST: KdfParams = KdfParams { memory_kib: MIN_MEMORY_KIB, iterations: 1, parallelism: 1 };

    #[test]
    fn wrong_passphrase_damage_and_context_are_told_apart() {
        let blob = seal(b"secret material", b"correct horse", &FAST, b"lux").unwrap();
        assert_eq!(&open(&blob, b"correct horse", b"lux").unwrap()[..], b"secret material");
        assert_eq!(open(&blob, b"correct hors", b"lux").unwrap_err(), SealError::WrongPassphrase);
        assert!(matches!(open(&blob, b"correct horse", b"est"), Err(SealError::Damaged(_))), "context is bound");
        let mut bad = blob.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(matches!(open(&bad, b"correct horse", b"lux"), Err(SealError::Damaged(_))));
        let mut huge = blob.clone();
        huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            matches!(open(&huge, b"correct horse", b"lux"), Err(SealError::Damaged(m)) if m.contains("implausible"))
        );
        assert!(matches!(open(&blob[..40], b"x", b"lux"), Err(SealError::Damaged(_))));
        assert_eq!(seal(b"x", b"", &FAST, b"").unwrap_err(), SealError::EmptyPassphrase);
        assert!(seal(b"x", b"p", &KdfParams { memory_kib: 64, ..FAST }, b"").is_err());
    }

    #[test]
    fn the_layout_is_argon2id_then_aes_gcm() {
        // An independent implementation (RustCrypto aes-gcm) opens what we seal.
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let blob = seal(b"material", b"pw", &FAST, b"ctx").unwrap();
        let mut out = [0u8; 32];
        let p = argon2::Params::new(FAST.memory_kib, 1, 1, Some(32)).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p)
            .hash_password_into(b"pw", &blob[14..30], &mut out)
            .unwrap();
        let key = blake3::derive_key(CTX_KEY, &out);
        let c = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
        let nonce = aes_gcm::Nonce::try_from(&blob[38..50]).unwrap();
        let mut aad = blob[..50].to_vec();
        aad.extend_from_slice(b"ctx");
        assert_eq!(c.decrypt(&nonce, Payload { msg: &blob[50..], aad: &aad }).unwrap(), b"material");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn sealing_round_trips(secret in prop::collection::vec(any::<u8>(), 0..200), pw in "[ -~]{1,40}") {
            let blob = seal(&secret, pw.as_bytes(), &FAST, b"c").unwrap();
            prop_assert_eq!(params_of(&blob).unwrap(), FAST);
            prop_assert_eq!(&open(&blob, pw.as_bytes(), b"c").unwrap()[..], &secret[..]);
        }
    }
}
