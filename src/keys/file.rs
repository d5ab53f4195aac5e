//! Key files: raw (for unattended agents, mode 0600) or sealed under a passphrase.
//!
//! Raw, format v1 (a key never rotated; still written for those, so older builds read them):
//! ```toml
//! format = "exclave-key-v1"
//! tenant = "lux"
//! epoch = 0
//! fingerprint = "3f9a0c51d2e47b68"   # lets a wrong key be named before any decryption
//! master_key = "<64 hex digits>"
//! ```
//!
//! Raw, format v2 (a rotated key): as v1, with `format = "exclave-key-v2"`, `epoch` the
//! current epoch `n`, and `epoch_seeds = ["<64 hex>", …]`: the seeds of epochs 1..=n in order.
//!
//! Sealed, format v1:
//! ```toml
//! format = "exclave-sealed-key-v1"
//! tenant = "lux"
//! fingerprint = "3f9a0c51d2e47b68"
//! epoch = 1                  # the current epoch; the file holds epochs 0..=epoch
//! kdf = "Argon2id, 256 MiB, 3 iteration(s), 1 lane(s)"   # for people; `sealed` carries its own
//! sealed = "<hex>"           # seal::seal(encoded material, context), layout in `seal`
//! checksum = "<16 hex>"      # BLAKE3 of the fields above: damage is told from a wrong passphrase
//! ```
//! The sealing context is `exclave key file ‖ 0 ‖ tenant ‖ 0 ‖ fingerprint ‖ 0 ‖ epoch`, so
//! the clear fields cannot be edited to pass a key off as another tenant's.
//!
//! Files are created with mode 0600 and never overwritten in place: `replace_key_file` writes a
//! new file beside the old one, syncs it and renames it over (rotation, seal, unseal), so a
//! crash leaves the old key or the new one, never half of either.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::seal::{self, KdfParams, SealError};
use super::{KeyError, KeyMaterial, MasterKey, Passphrase, TenantKeys};

pub const KEY_FILE_FORMAT: &str = "exclave-key-v1";
pub const KEY_FILE_FORMAT_V2: &str = "exclave-key-v2";
pub const SEALED_KEY_FILE_FORMAT: &str = "exclave-sealed-key-v1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToml {
    format: String,
    tenant: String,
    epoch: u32,
    fingerprint: String,
    master_key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    epoch_seeds: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedToml {
    format: String,
    tenant: String,
    fingerprint: String,
    epoch: u32,
    kdf: String,
    sealed: String,
    checksum: String,
}

#[derive(Deserialize)]
struct FormatOnly {
    format: String,
}

/// What a key file says about itself without its passphrase (`keys show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileInfo {
    pub format: String,
    pub tenant: String,
    pub fingerprint: String,
    /// The current epoch; the file holds epochs 0..=epoch.
    pub epoch: u32,
    /// Set for a sealed file: the parameters it was sealed with.
    pub sealed: Option<KdfParams>,
}

/// A parsed key file: the keys, or what is needed to unseal them.
pub enum KeyFile {
    Raw(TenantKeys),
    Sealed { info: KeyFileInfo, blob: Vec<u8> },
}

fn sealed_context(tenant: &str, fingerprint: &str, epoch: u32) -> Vec<u8> {
    format!("exclave key file\0{tenant}\0{fingerprint}\0{epoch}").into_bytes()
}

fn sealed_checksum(t: &SealedToml) -> String {
    let mut h = blake3::Hasher::new();
    for f in [&t.format, &t.tenant, &t.fingerprint, &t.epoch.to_string(), &t.kdf, &t.sealed] {
        h.update(f.as_bytes());
        h.update(&[0]);
    }
    hex::encode(&h.finalize().as_bytes()[..8])
}

fn hex32(what: &str, s: &str) -> Result<[u8; 32], String> {
    let raw = Zeroizing::new(hex::decode(s.trim()).map_err(|_| format!("{what} is not hex"))?);
    raw.as_slice().try_into().map_err(|_| format!("{what} is not 32 bytes"))
}

/// Parses the text of a key file (pure; `load_key_file` adds the file checks and unsealing).
pub fn parse_key_file(text: &str) -> Result<KeyFile, String> {
    let format = toml::from_str::<FormatOnly>(text).map_err(|e| e.message().to_string())?.format;
    match format.as_str() {
        KEY_FILE_FORMAT | KEY_FILE_FORMAT_V2 => {
            let k: RawToml = toml::from_str(text).map_err(|e| e.message().to_string())?;
            if k.tenant.is_empty() {
                return Err("empty tenant".into());
            }
            let master = MasterKey::from_bytes(hex32("master_key", &k.master_key)?);
            if master.fingerprint() != k.fingerprint {
                return Err(format!(
                    "fingerprint {} does not match the key ({}); the file is damaged",
                    k.fingerprint,
                    master.fingerprint()
                ));
            }
            if format == KEY_FILE_FORMAT && k.epoch != 0 {
                return Err(format!("a {KEY_FILE_FORMAT} file holds epoch 0 only, not {}", k.epoch));
            }
            if k.epoch_seeds.len() != k.epoch as usize {
                return Err(format!(
                    "epoch {} needs {} epoch_seeds, the file has {}",
                    k.epoch,
                    k.epoch,
                    k.epoch_seeds.len()
                ));
            }
            let mut material = KeyMaterial::from_master(master);
            for (i, s) in k.epoch_seeds.iter().enumerate() {
                material.seeds.push(hex32(&format!("epoch_seeds[{i}]"), s)?);
            }
            Ok(KeyFile::Raw(TenantKeys::new(&k.tenant, material)))
        }
        SEALED_KEY_FILE_FORMAT => {
            let k: SealedToml = toml::from_str(text).map_err(|e| e.message().to_string())?;
            if sealed_checksum(&k) != k.checksum {
                return Err(format!("checksum {} does not match its contents; the file is damaged", k.checksum));
            }
            let blob = hex::decode(k.sealed.trim()).map_err(|_| "sealed is not hex".to_string())?;
            let params = seal::params_of(&blob).map_err(|e| e.to_string())?;
            Ok(KeyFile::Sealed {
                info: KeyFileInfo {
                    format,
                    tenant: k.tenant,
                    fingerprint: k.fingerprint,
                    epoch: k.epoch,
                    sealed: Some(params),
                },
                blob,
            })
        }
        other => Err(format!(
            "unknown format {other:?} (expected {KEY_FILE_FORMAT:?}, {KEY_FILE_FORMAT_V2:?} or {SEALED_KEY_FILE_FORMAT:?})"
        )),
    }
}

/// Opens a sealed key with its passphrase (pure apart from the Argon2 cost).
pub fn unseal(info: &KeyFileInfo, blob: &[u8], passphrase: &[u8], name: &str) -> Result<TenantKeys, KeyError> {
    let ctx = sealed_context(&info.tenant, &info.fingerprint, info.epoch);
    let material = seal::open(blob, passphrase, &ctx).map_err(|e| match e {
        SealError::WrongPassphrase => KeyError::WrongPassphrase(name.to_string()),
        other => KeyError::Damaged(name.to_string(), other.to_string()),
    })?;
    let material = KeyMaterial::from_bytes(&material).map_err(|e| KeyError::Damaged(name.to_string(), e))?;
    if material.fingerprint() != info.fingerprint || material.current_epoch() != info.epoch {
        return Err(KeyError::Damaged(name.to_string(), "the sealed key differs from its header".into()));
    }
    Ok(TenantKeys::new(&info.tenant, material))
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| KeyError::Read { path: p.clone(), err: e })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: p, mode });
    }
    std::fs::read_to_string(path).map_err(|e| KeyError::Read { path: p, err: e })
}

fn parse_at(path: &Path) -> Result<KeyFile, KeyError> {
    let text = Zeroizing::new(read_text(path)?);
    parse_key_file(&text).map_err(|reason| KeyError::Invalid { path: path.display().to_string(), reason })
}

/// The passphrase that opened a sealed key file and its parameters: what seals it again.
pub type Sealing = (Zeroizing<String>, KdfParams);

/// Reads a key file, raw or sealed (asking `passphrase` only for a sealed one); for a sealed
/// file also returns how it was sealed.
pub fn open_key_file(path: &Path, passphrase: &Passphrase) -> Result<(TenantKeys, Option<Sealing>), KeyError> {
    match parse_at(path)? {
        KeyFile::Raw(keys) => Ok((keys, None)),
        KeyFile::Sealed { info, blob } => {
            let name = path.display().to_string();
            let pw = passphrase.get(&name)?;
            let keys = unseal(&info, &blob, pw.as_bytes(), &name)?;
            let params = info.sealed.unwrap_or_default();
            Ok((keys, Some((pw, params))))
        }
    }
}

/// Reads a key file, raw or sealed (asking `passphrase` only for a sealed one).
pub fn load_key_file(path: &Path, passphrase: &Passphrase) -> Result<TenantKeys, KeyError> {
    Ok(open_key_file(path, passphrase)?.0)
}

/// Reads a key file; a sealed one takes its passphrase from `EXCLAVE_PASSPHRASE_FILE` or a prompt.
pub fn read_key_file(path: &Path) -> Result<TenantKeys, KeyError> {
    load_key_file(path, &Passphrase::default())
}

/// What a key file says of itself, without unsealing it.
pub fn inspect_key_file(path: &Path) -> Result<KeyFileInfo, KeyError> {
    Ok(match parse_at(path)? {
        KeyFile::Raw(k) => KeyFileInfo {
            format: if k.epoch == 0 { KEY_FILE_FORMAT } else { KEY_FILE_FORMAT_V2 }.into(),
            tenant: k.tenant.clone(),
            fingerprint: k.fingerprint.clone(),
            epoch: k.epoch,
            sealed: None,
        },
        KeyFile::Sealed { info, .. } => info,
    })
}

const HEADER: &str = "# Keep it secret and keep it safe: without it no backup of this tenant can be read.\n\
                      # Hand it abroad only as shares (exclave-agent keys split).\n";

/// The text of a raw key file.
pub fn raw_text(keys: &TenantKeys) -> Result<Zeroizing<String>, String> {
    let m = keys.material();
    let body = RawToml {
        format: if m.current_epoch() == 0 { KEY_FILE_FORMAT } else { KEY_FILE_FORMAT_V2 }.into(),
        tenant: keys.tenant.clone(),
        epoch: m.current_epoch(),
        fingerprint: keys.fingerprint.clone(),
        master_key: hex::encode(m.master.0),
        epoch_seeds: m.seeds.iter().map(hex::encode).collect(),
    };
    let toml = Zeroizing::new(toml::to_string(&body).map_err(|e| e.to_string())?);
    Ok(Zeroizing::new(format!("# Exclave tenant key ({}).\n{HEADER}{}", keys.tenant, *toml)))
}

/// The text of a sealed key file.
pub fn sealed_text(keys: &TenantKeys, passphrase: &[u8], params: &KdfParams) -> Result<String, String> {
    let m = keys.material();
    let ctx = sealed_context(&keys.tenant, &keys.fingerprint, m.current_epoch());
    let blob = seal::seal(&m.to_bytes(), passphrase, params, &ctx).map_err(|e| e.to_string())?;
    let mut t = SealedToml {
        format: SEALED_KEY_FILE_FORMAT.into(),
        tenant: keys.tenant.clone(),
        fingerprint: keys.fingerprint.clone(),
        epoch: m.current_epoch(),
        kdf: params.describe(),
        sealed: hex::encode(&blob),
        checksum: String::new(),
    };
    t.checksum = sealed_checksum(&t);
    Ok(format!(
        "# Exclave tenant key ({}), sealed under a passphrase ({}).\n{HEADER}{}",
        keys.tenant,
        params.describe(),
        toml::to_string(&t).map_err(|e| e.to_string())?
    ))
}

fn create_new(path: &Path, text: &str) -> Result<(), KeyError> {
    let p = path.display().to_string();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(p.clone())
        } else {
            KeyError::Write { path: p.clone(), err: e }
        }
    })?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| KeyError::Write { path: p, err: e })
}

fn invalid(path: &Path, reason: String) -> KeyError {
    KeyError::Invalid { path: path.display().to_string(), reason }
}

/// Writes a new raw key file with mode 0600; refuses to replace an existing one.
pub fn write_key_file(path: &Path, keys: &TenantKeys) -> Result<(), KeyError> {
    let text = raw_text(keys).map_err(|e| invalid(path, e))?;
    create_new(path, &text)
}

/// Writes a new sealed key file with mode 0600; refuses to replace an existing one.
pub fn write_sealed_key_file(
    path: &Path,
    keys: &TenantKeys,
    passphrase: &[u8],
    params: &KdfParams,
) -> Result<(), KeyError> {
    let text = sealed_text(keys, passphrase, params).map_err(|e| invalid(path, e))?;
    create_new(path, &text)
}

/// Replaces an existing key file atomically (a new file beside it, synced, renamed over, the
/// directory synced): sealed under `sealing` if given, raw otherwise.
pub fn replace_key_file(path: &Path, keys: &TenantKeys, sealing: Option<(&[u8], &KdfParams)>) -> Result<(), KeyError> {
    let text = match sealing {
        Some((pw, params)) => Zeroizing::new(sealed_text(keys, pw, params).map_err(|e| invalid(path, e))?),
        None => raw_text(keys).map_err(|e| invalid(path, e))?,
    };
    let p = path.display().to_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    create_new(&tmp, &text)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        KeyError::Write { path: p.clone(), err: e }
    })?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| KeyError::Write { path: p, err: e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::seal::MIN_MEMORY_KIB;

    const FAST: KdfParams = KdfParams { memory_kib: MIN_MEMORY_KIB, iterations: 1, parallelism: 1 };

    fn raw(k: KeyFile) -> TenantKeys {
        match k {
            KeyFile::Raw(k) => k,
            KeyFile::Sealed { .. } => panic!("sealed"),
        }
    }

    #[test]
    fn key_file_round_trip_and_checks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lux.key");
        let keys = TenantKeys::new("lux", KeyMaterial::generate());
        write_key_file(&path, &keys).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(std::fs::read_to_string(&path).unwrap().contains("format = \"exclave-key-v1\""));
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
        let keys = TenantKeys::from_master("lux", MasterKey::from_bytes([9; 32]));
        let good = format!(
            "format = \"{KEY_FILE_FORMAT}\"\ntenant = \"lux\"\nepoch = 0\nfingerprint = \"{}\"\nmaster_key = \"{}\"\n",
            keys.fingerprint,
            hex::encode([9u8; 32])
        );
        assert_eq!(raw(parse_key_file(&good).unwrap()).fingerprint, keys.fingerprint);
        let err = |t: &str| parse_key_file(t).err().unwrap_or_default();
        let flipped = good.replace(&hex::encode([9u8; 32]), &hex::encode([8u8; 32]));
        assert!(err(&flipped).contains("fingerprint"));
        assert!(parse_key_file("hello").is_err());
        assert!(err(&good.replace("exclave-key-v1", "other")).contains("format"));
        assert!(err(&good.replace("epoch = 0", "epoch = 2")).contains("epoch 0 only"));
    }

    #[test]
    fn rotated_keys_are_written_as_v2_and_read_back() {
        let mut m = KeyMaterial::generate();
        m.rotate().unwrap();
        m.rotate().unwrap();
        let keys = TenantKeys::new("lux", m);
        let text = raw_text(&keys).unwrap();
        assert!(text.contains(KEY_FILE_FORMAT_V2) && text.contains("epoch = 2"));
        let back = raw(parse_key_file(&text).unwrap());
        assert_eq!(back.epoch, 2);
        assert_eq!(back.material().check(), keys.material().check());
        let short = text.replacen("epoch = 2", "epoch = 3", 1);
        assert!(parse_key_file(&short).err().unwrap_or_default().contains("epoch_seeds"));
    }

    #[test]
    fn sealed_files_round_trip_and_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lux.key");
        let mut m = KeyMaterial::generate();
        m.rotate().unwrap();
        let keys = TenantKeys::new("lux", m);
        write_sealed_key_file(&path, &keys, b"pw one", &FAST).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(keys.material().master().0)), "no key material in the clear");
        let KeyFile::Sealed { info, blob } = parse_key_file(&text).unwrap() else { panic!("not sealed") };
        assert_eq!((info.tenant.as_str(), info.epoch, info.sealed), ("lux", 1, Some(FAST)));
        assert_eq!(inspect_key_file(&path).unwrap(), info);
        let back = unseal(&info, &blob, b"pw one", "f").unwrap();
        assert_eq!(back.material().check(), keys.material().check());
        assert!(matches!(unseal(&info, &blob, b"pw two", "f"), Err(KeyError::WrongPassphrase(_))));
        // Damage anywhere is caught by the checksum before any passphrase is tried.
        let sealed_line = text.lines().find(|l| l.starts_with("sealed = ")).unwrap();
        let mut damaged_line = sealed_line.to_string();
        let pos = damaged_line.len() - 10;
        let c = if &damaged_line[pos..pos + 1] == "0" { "1" } else { "0" };
        damaged_line.replace_range(pos..pos + 1, c);
        let damaged = text.replace(sealed_line, &damaged_line);
        assert!(parse_key_file(&damaged).err().unwrap_or_default().contains("checksum"));
        // A header edited to name another tenant, checksum recomputed: the AEAD refuses it.
        let KeyFile::Sealed { mut info, blob } = parse_key_file(&text).unwrap() else { panic!() };
        info.tenant = "est".into();
        assert!(matches!(unseal(&info, &blob, b"pw one", "f"), Err(KeyError::Damaged(..))));
        // Replacing converts between raw and sealed, atomically.
        replace_key_file(&path, &keys, None).unwrap();
        assert_eq!(read_key_file(&path).unwrap().material().check(), keys.material().check());
        assert!(inspect_key_file(&path).unwrap().sealed.is_none());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }
}
