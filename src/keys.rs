//! Tenant keys: the master key, its key file, and the subkeys derived from it.
//!
//! Every subkey comes from `blake3::derive_key` with a fixed context string, so one 256-bit
//! master key per tenant is all that must be kept (and, later, split into Shamir shares).
//!
//! | subkey | context | material |
//! |---|---|---|
//! | chunk-id key | `exclave 2026-01 chunk id v1` | master |
//! | nonce key | `exclave 2026-01 envelope nonce v1` | master |
//! | data key of epoch `e` | `exclave 2026-01 envelope data key v1` | master ‖ e (u32 LE) |
//! | fingerprint | `exclave 2026-01 key fingerprint v1` | master (first 8 bytes, hex) |
//!
//! The chunk-id key does not change with the epoch: rotation must not break deduplication.
//!
//! Key file layout (TOML, written 0600):
//! ```toml
//! format = "exclave-key-v1"
//! tenant = "lux"
//! epoch = 0
//! fingerprint = "3f9a0c51d2e47b68"   # lets a wrong key be named before any decryption
//! master_key = "<64 hex digits>"
//! ```

use std::fmt;
use std::path::Path;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::chunk_id::ChunkId;

const CTX_CHUNK_ID: &str = "exclave 2026-01 chunk id v1";
const CTX_NONCE: &str = "exclave 2026-01 envelope nonce v1";
const CTX_DATA: &str = "exclave 2026-01 envelope data key v1";
const CTX_FINGERPRINT: &str = "exclave 2026-01 key fingerprint v1";
pub const KEY_FILE_FORMAT: &str = "exclave-key-v1";

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
}

/// A tenant's 256-bit master key. Never printed.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        MasterKey(k)
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

    pub fn data_key(&self, epoch: u32) -> [u8; 32] {
        let mut material = [0u8; 36];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(&epoch.to_le_bytes());
        blake3::derive_key(CTX_DATA, &material)
    }
}

/// The derived keys an agent or a restore works with.
#[derive(Clone)]
pub struct TenantKeys {
    pub tenant: String,
    pub epoch: u32,
    pub fingerprint: String,
    master: MasterKey,
    chunk_id_key: [u8; 32],
    nonce_key: [u8; 32],
}

impl fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantKeys({}, epoch {}, {})", self.tenant, self.epoch, self.fingerprint)
    }
}

impl TenantKeys {
    pub fn new(tenant: &str, epoch: u32, master: MasterKey) -> Self {
        TenantKeys {
            tenant: tenant.to_string(),
            epoch,
            fingerprint: master.fingerprint(),
            chunk_id_key: master.chunk_id_key(),
            nonce_key: master.nonce_key(),
            master,
        }
    }

    /// The chunk id of a plaintext: keyed, so that a node cannot test for a known document.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id_key, plaintext).as_bytes())
    }

    pub fn nonce_key(&self) -> &[u8; 32] {
        &self.nonce_key
    }

    pub fn data_key(&self, epoch: u32) -> [u8; 32] {
        self.master.data_key(epoch)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileToml {
    format: String,
    tenant: String,
    epoch: u32,
    fingerprint: String,
    master_key: String,
}

/// Writes a new key file with mode 0600; refuses to replace an existing one.
pub fn write_key_file(path: &Path, keys: &TenantKeys) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path.display().to_string();
    let body = KeyFileToml {
        format: KEY_FILE_FORMAT.into(),
        tenant: keys.tenant.clone(),
        epoch: keys.epoch,
        fingerprint: keys.fingerprint.clone(),
        master_key: hex::encode(keys.master.0),
    };
    let text = format!(
        "# Exclave tenant master key. Keep it secret and keep it safe: without it no backup\n\
         # of tenant {:?} can be read. Hand it abroad only as Shamir shares.\n{}",
        keys.tenant,
        toml::to_string(&body).map_err(|e| KeyError::Invalid { path: p.clone(), reason: e.to_string() })?
    );
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(p.clone())
        } else {
            KeyError::Write { path: p.clone(), err: e }
        }
    })?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| KeyError::Write { path: p, err: e })
}

/// Reads and checks a key file: format, tenant, key length, fingerprint, permissions.
pub fn read_key_file(path: &Path) -> Result<TenantKeys, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| KeyError::Read { path: p.clone(), err: e })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: p, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read { path: p.clone(), err: e })?;
    parse_key_file(&text).map_err(|reason| KeyError::Invalid { path: p, reason })
}

/// Parses the text of a key file (pure; `read_key_file` adds the file checks).
pub fn parse_key_file(text: &str) -> Result<TenantKeys, String> {
    let k: KeyFileToml = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if k.format != KEY_FILE_FORMAT {
        return Err(format!("unknown format {:?} (expected {KEY_FILE_FORMAT:?})", k.format));
    }
    if k.tenant.is_empty() {
        return Err("empty tenant".into());
    }
    let raw = hex::decode(k.master_key.trim()).map_err(|_| "master_key is not hex".to_string())?;
    let bytes: [u8; 32] = raw.try_into().map_err(|_| "master_key is not 32 bytes".to_string())?;
    let master = MasterKey(bytes);
    if master.fingerprint() != k.fingerprint {
        return Err(format!(
            "fingerprint {} does not match the key ({}); the file is damaged",
            k.fingerprint,
            master.fingerprint()
        ));
    }
    Ok(TenantKeys::new(&k.tenant, k.epoch, master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subkeys_are_distinct_and_stable() {
        let m = MasterKey::from_bytes([7u8; 32]);
        let keys = [m.chunk_id_key(), m.nonce_key(), m.data_key(0), m.data_key(1)];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
        // Golden: derived keys are part of the on-disk contract.
        assert_eq!(m.fingerprint(), MasterKey::from_bytes([7u8; 32]).fingerprint());
        assert_eq!(m.fingerprint().len(), 16);
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = TenantKeys::new("lux", 0, MasterKey::from_bytes([1; 32]));
        let b = TenantKeys::new("est", 0, MasterKey::from_bytes([2; 32]));
        assert_ne!(a.chunk_id(b"same document"), b.chunk_id(b"same document"));
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }

    #[test]
    fn key_file_round_trip_and_checks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lux.key");
        let keys = TenantKeys::new("lux", 0, MasterKey::generate());
        write_key_file(&path, &keys).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = read_key_file(&path).unwrap();
        assert_eq!(back.fingerprint, keys.fingerprint);
        assert_eq!(back.chunk_id(b"a"), keys.chunk_id(b"a"));
        assert!(matches!(write_key_file(&path, &keys), Err(KeyError::Exists(_))));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(read_key_file(&path), Err(KeyError::Permissions { .. })));
        assert!(matches!(read_key_file(&dir.path().join("missing.key")), Err(KeyError::Read { .. })));
    }

    #[test]
    fn damaged_key_files_are_refused() {
        let keys = TenantKeys::new("lux", 0, MasterKey::from_bytes([9; 32]));
        let good = format!(
            "format = \"{KEY_FILE_FORMAT}\"\ntenant = \"lux\"\nepoch = 0\nfingerprint = \"{}\"\nmaster_key = \"{}\"\n",
            keys.fingerprint,
            hex::encode([9u8; 32])
        );
        assert!(parse_key_file(&good).is_ok());
        let flipped = good.replace(&hex::encode([9u8; 32]), &hex::encode([8u8; 32]));
        assert!(parse_key_file(&flipped).unwrap_err().contains("fingerprint"));
        assert!(parse_key_file("hello").is_err());
        assert!(parse_key_file(&good.replace("exclave-key-v1", "other")).unwrap_err().contains("format"));
    }
}
