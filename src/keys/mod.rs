//! Tenant keys: the key material, the subkeys derived from it, and how it is kept.
//!
//! A tenant's key material is one 256-bit master key plus one random seed per rotated epoch.
//! Every subkey comes from `blake3::derive_key` with a fixed context string:
//!
//! | subkey | context | material |
//! |---|---|---|
//! | chunk-id key | `exclave 2026-01 chunk id v1` | master |
//! | nonce key | `exclave 2026-01 envelope nonce v1` | master |
//! | data key of epoch 0 | `exclave 2026-01 envelope data key v1` | master ‖ 0 (u32 LE) |
//! | data key of epoch `e` ≥ 1 | `exclave 2026-11 envelope data key v2` | seed of `e` ‖ e (u32 LE) |
//! | fingerprint | `exclave 2026-01 key fingerprint v1` | master (first 8 bytes, hex) |
//! | material check | `exclave 2026-11 key material check v1` | encoded material (first 8 bytes, hex) |
//!
//! **Rotation** (`keys rotate`) opens epoch `e + 1` with a fresh random seed kept in the same
//! key file, never derived from the master: a copy of the key file that leaked before the
//! rotation cannot decrypt anything sealed after it. New snapshots are sealed with the newest
//! epoch; the envelope names its epoch, so every older one stays readable with the same file.
//!
//! **Chunk ids do not change with the epoch** (the chunk-id key comes from the master alone):
//! a rotation must not make the next backup re-upload and store every register a second time
//! (at national scale, tens of terabytes over embassy links). The price: whoever holds a leaked
//! pre-rotation file can still compute the id of a document they already know and, with the
//! embassy's index, tell whether it is stored; they cannot read anything new. A tenant that
//! must close that too starts a new key (`keys init`) and a full upload.
//!
//! The fingerprint names the master key and so stays the same across rotations (a snapshot of
//! epoch 0 and one of epoch 3 are sealed by "the same key"); the material check names one
//! exact state of the material, so shares split before a rotation are told apart from shares
//! split after it.
//!
//! Encoded material (sealed in sealed key files and split into Shamir shares):
//!
//! ```text
//! offset  size   field
//! 0       1      version = 1
//! 1       32     master key
//! 33      4      n: rotated epochs (u32 LE); the current epoch is n
//! 37      32·n   seeds of epochs 1..=n, in order
//! ```
//!
//! Where the material is kept: `file` (raw and sealed key files), `seal` (Argon2id and
//! AES-256-GCM under a passphrase), `shares` (k-of-n Shamir shares a person can type back in),
//! `passphrase` (where a passphrase comes from).

pub mod file;
pub mod passphrase;
pub mod seal;
pub mod shares;

use std::fmt;

use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::chunk_id::ChunkId;

pub use file::{
    KEY_FILE_FORMAT, KEY_FILE_FORMAT_V2, KeyFileInfo, SEALED_KEY_FILE_FORMAT, inspect_key_file, load_key_file,
    open_key_file, parse_key_file, read_key_file, replace_key_file, write_key_file, write_sealed_key_file,
};
pub use passphrase::Passphrase;

const CTX_CHUNK_ID: &str = "exclave 2026-01 chunk id v1";
const CTX_NONCE: &str = "exclave 2026-01 envelope nonce v1";
const CTX_DATA: &str = "exclave 2026-01 envelope data key v1";
const CTX_DATA_V2: &str = "exclave 2026-11 envelope data key v2";
const CTX_FINGERPRINT: &str = "exclave 2026-01 key fingerprint v1";
const CTX_MATERIAL_CHECK: &str = "exclave 2026-11 key material check v1";
const MATERIAL_VERSION: u8 = 1;
/// More epochs than anyone rotates in a lifetime; bounds what a damaged length can claim.
pub const MAX_EPOCHS: u32 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("cannot write key file {path}: {err}")]
    Write { path: String, err: std::io::Error },
    #[error("key file {path} is not a valid Exclave key file: {reason}")]
    Invalid { path: String, reason: String },
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}` first")]
    Permissions { path: String, mode: u32 },
    #[error("key file {0} already exists; refusing to overwrite a key")]
    Exists(String),
    #[error("wrong passphrase for {0}")]
    WrongPassphrase(String),
    #[error("{0} is damaged: {1}")]
    Damaged(String, String),
    #[error(
        "{0} is sealed under a passphrase: give --passphrase-file FILE or set EXCLAVE_PASSPHRASE_FILE (on a terminal you are asked)"
    )]
    PassphraseNeeded(String),
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

impl KeyError {
    /// Whether trying again may help: never for a key (a person must fix the input).
    pub fn retryable(&self) -> bool {
        false
    }
}

/// A tenant's 256-bit master key. Never printed; wiped from memory when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

fn random32() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rng().fill_bytes(&mut k);
    k
}

impl MasterKey {
    pub fn generate() -> Self {
        MasterKey(random32())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    pub fn fingerprint(&self) -> String {
        hex::encode(&blake3::derive_key(CTX_FINGERPRINT, &self.0)[..8])
    }

    pub fn chunk_id_key(&self) -> [u8; 32] {
        blake3::derive_key(CTX_CHUNK_ID, &self.0)
    }

    pub fn nonce_key(&self) -> [u8; 32] {
        blake3::derive_key(CTX_NONCE, &self.0)
    }

    /// The data key of epoch 0 (and, for key files of format v1, of any epoch).
    fn derived_data_key(&self, epoch: u32) -> [u8; 32] {
        let mut material = Zeroizing::new([0u8; 36]);
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(&epoch.to_le_bytes());
        blake3::derive_key(CTX_DATA, &material[..])
    }
}

/// All of a tenant's secret key material: the master key and one random seed per rotated
/// epoch (seed `i` belongs to epoch `i + 1`).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial {
    master: MasterKey,
    seeds: Vec<[u8; 32]>,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({}, epochs 0..={})", self.fingerprint(), self.current_epoch())
    }
}

impl KeyMaterial {
    pub fn generate() -> Self {
        KeyMaterial { master: MasterKey::generate(), seeds: Vec::new() }
    }

    /// Material of epoch 0 only.
    pub fn from_master(master: MasterKey) -> Self {
        KeyMaterial { master, seeds: Vec::new() }
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// The epoch new envelopes are sealed with: the newest.
    pub fn current_epoch(&self) -> u32 {
        self.seeds.len() as u32
    }

    pub fn fingerprint(&self) -> String {
        self.master.fingerprint()
    }

    /// Names this exact state of the material (it changes with every rotation).
    pub fn check(&self) -> String {
        let bytes = self.to_bytes();
        hex::encode(&blake3::derive_key(CTX_MATERIAL_CHECK, &bytes)[..8])
    }

    /// Opens a new epoch with a fresh random seed; returns its number.
    pub fn rotate(&mut self) -> Result<u32, KeyError> {
        if self.current_epoch() + 1 >= MAX_EPOCHS {
            return Err(KeyError::Kdf(format!("a key holds at most {MAX_EPOCHS} epochs")));
        }
        self.seeds.push(random32());
        Ok(self.current_epoch())
    }

    /// The data key of `epoch`, if this material holds it.
    pub fn data_key(&self, epoch: u32) -> Option<[u8; 32]> {
        if epoch == 0 {
            return Some(self.master.derived_data_key(0));
        }
        let seed = self.seeds.get(epoch as usize - 1)?;
        let mut material = Zeroizing::new([0u8; 36]);
        material[..32].copy_from_slice(seed);
        material[32..].copy_from_slice(&epoch.to_le_bytes());
        Some(blake3::derive_key(CTX_DATA_V2, &material[..]))
    }

    /// The encoded material (layout at the top of this module).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(37 + 32 * self.seeds.len()));
        out.push(MATERIAL_VERSION);
        out.extend_from_slice(&self.master.0);
        out.extend_from_slice(&self.current_epoch().to_le_bytes());
        for s in &self.seeds {
            out.extend_from_slice(s);
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() < 37 {
            return Err(format!("key material of {} bytes is too short", b.len()));
        }
        if b[0] != MATERIAL_VERSION {
            return Err(format!("key material version {} is not supported by this build", b[0]));
        }
        let mut master = [0u8; 32];
        master.copy_from_slice(&b[1..33]);
        let n = u32::from_le_bytes([b[33], b[34], b[35], b[36]]);
        if n >= MAX_EPOCHS || b.len() != 37 + 32 * n as usize {
            return Err(format!("key material of {} bytes does not hold the {n} epoch(s) it declares", b.len()));
        }
        let seeds = b[37..]
            .chunks_exact(32)
            .map(|c| {
                let mut s = [0u8; 32];
                s.copy_from_slice(c);
                s
            })
            .collect();
        Ok(KeyMaterial { master: MasterKey(master), seeds })
    }
}

/// The derived keys an agent or a restore works with.
#[derive(Clone)]
pub struct TenantKeys {
    pub tenant: String,
    /// The epoch new envelopes are sealed with.
    pub epoch: u32,
    pub fingerprint: String,
    material: KeyMaterial,
    chunk_id_key: [u8; 32],
    nonce_key: [u8; 32],
}

impl fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKeys({}, epoch {}, {})", self.tenant, self.epoch, self.fingerprint)
    }
}

impl TenantKeys {
    pub fn new(tenant: &str, material: KeyMaterial) -> Self {
        TenantKeys {
            tenant: tenant.to_string(),
            epoch: material.current_epoch(),
            fingerprint: material.fingerprint(),
            chunk_id_key: material.master.chunk_id_key(),
            nonce_key: material.master.nonce_key(),
            material,
        }
    }

    /// Keys of epoch 0 only (a key that was never rotated).
    pub fn from_master(tenant: &str, master: MasterKey) -> Self {
        TenantKeys::new(tenant, KeyMaterial::from_master(master))
    }

    /// The chunk id of a plaintext: keyed, so that a node cannot test for a known document.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id_key, plaintext).as_bytes())
    }

    pub fn nonce_key(&self) -> &[u8; 32] {
        &self.nonce_key
    }

    /// The data key of `epoch`, if the key file holds it.
    pub fn data_key(&self, epoch: u32) -> Option<[u8; 32]> {
        self.material.data_key(epoch)
    }

    pub fn material(&self) -> &KeyMaterial {
        &self.material
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subkeys_are_distinct_and_stable() {
        let m = MasterKey::from_bytes([7u8; 32]);
        let mut km = KeyMaterial::from_master(m.clone());
        km.rotate().unwrap();
        let keys = [m.chunk_id_key(), m.nonce_key(), km.data_key(0).unwrap(), km.data_key(1).unwrap()];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
        // Goldens: derived keys are part of the on-disk contract.
        assert_eq!(m.fingerprint(), "7a97a98f813bcbb7");
        assert_eq!(
            hex::encode(km.data_key(0).unwrap()),
            "69de047fae1e1897d291adc0aa0a36eefcf3ee2e5ccde72ca3f62afbadca5049"
        );
        assert_eq!(hex::encode(m.chunk_id_key()), "bb2958ffff2a21f557d62ba26f3656a5417e3f0f54d275629e79aa206be98263");
        assert!(km.data_key(2).is_none());
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = TenantKeys::from_master("lux", MasterKey::from_bytes([1; 32]));
        let b = TenantKeys::from_master("est", MasterKey::from_bytes([2; 32]));
        assert_ne!(a.chunk_id(b"same document"), b.chunk_id(b"same document"));
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }

    #[test]
    fn rotation_keeps_ids_and_old_epochs_and_is_not_derived_from_the_master() {
        let master = MasterKey::from_bytes([3; 32]);
        let before = KeyMaterial::from_master(master.clone());
        let mut a = before.clone();
        let mut b = before.clone();
        assert_eq!(a.rotate().unwrap(), 1);
        b.rotate().unwrap();
        // Two rotations of the same master give unrelated epoch-1 keys: nothing about the new
        // key follows from the old file.
        assert_ne!(a.data_key(1), b.data_key(1));
        assert_eq!(a.data_key(0), before.data_key(0));
        assert_eq!(a.fingerprint(), before.fingerprint());
        assert_ne!(a.check(), before.check());
        let (ka, k0) = (TenantKeys::new("lux", a), TenantKeys::new("lux", before));
        assert_eq!(ka.epoch, 1);
        assert_eq!(ka.chunk_id(b"doc"), k0.chunk_id(b"doc"), "dedup survives the rotation");
    }

    #[test]
    fn damaged_material_is_refused() {
        let mut m = KeyMaterial::generate();
        m.rotate().unwrap();
        let b = m.to_bytes();
        assert!(KeyMaterial::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(KeyMaterial::from_bytes(&b[..20]).is_err());
        let mut v = b.to_vec();
        v[0] = 9;
        assert!(KeyMaterial::from_bytes(&v).unwrap_err().contains("version 9"));
        let mut v = b.to_vec();
        v[33] = 0xff;
        assert!(KeyMaterial::from_bytes(&v).is_err());
    }

    proptest! {
        #[test]
        fn material_round_trips(master in any::<[u8; 32]>(), rotations in 0usize..5) {
            let mut m = KeyMaterial::from_master(MasterKey::from_bytes(master));
            for _ in 0..rotations {
                m.rotate().unwrap();
            }
            let back = KeyMaterial::from_bytes(&m.to_bytes()).unwrap();
            prop_assert_eq!(back.check(), m.check());
            for e in 0..=rotations as u32 {
                prop_assert_eq!(back.data_key(e), m.data_key(e));
            }
        }
    }
}
