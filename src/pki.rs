//! The cluster PKI: a CA per cluster, the certificates it issues, and the record of both.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! ca.crt, ca.key          the cluster CA (keep ca.key offline once the cluster is set up, with
//!                         a copy abroad: without it no identity can be issued after a loss)
//! NAME.crt, NAME.key      one identity; keys are written 0600
//! NAME.crt.prev, …key.prev  what `pki renew` replaced
//! issued.jsonl            the record: one JSON object a line, appended, never rewritten
//! ```
//!
//! Record lines: `{"event":"issued","serial","name","subject","not_before","not_after","time"}`
//! for every certificate issued or renewed, and `{"event":"revoked","serial","subject",
//! "reason","by","time"}` for every revocation sent from this directory (the cluster's catalog
//! holds the revocations that count; this is the CA host's memory of them). Times are Unix
//! seconds; serials are hex.
//!
//! Node certificates carry the `serverAuth` and `clientAuth` usages and the DNS name
//! `exclave-node` (plus any `--host`); every other role gets `clientAuth` only, so no client
//! certificate can ever pose as a node. Every certificate has a random 127-bit serial, which is
//! what a revocation names: a renewed certificate of the same identity is a new certificate.
//! Validity starts an hour before issue (clocks differ) and lasts a role's default
//! (`default_days`) unless `--days` says otherwise.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, date_time_ymd,
};
use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// The TLS server name every node certificate carries and every client asks for.
pub const NODE_SERVER_NAME: &str = "exclave-node";
/// The record of issued and revoked certificates in a PKI directory.
pub const RECORD: &str = "issued.jsonl";
/// Programs warn this long before their certificate expires.
pub const EXPIRY_WARNING_SECS: i64 = 30 * 86400;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0} already exists; refusing to overwrite")]
    Exists(PathBuf),
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} holds no usable {what}")]
    Invalid { path: PathBuf, what: &'static str },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("{0}")]
    Usage(String),
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn this_year() -> i32 {
    1970 + (now_secs() / 31_556_952) as i32
}

/// How long a certificate of this role is valid unless said otherwise: agents' and restore
/// teams' certificates are short (a stolen one expires soon, renewal is routine); nodes' and
/// admins' longer (renewing them means restarting a node or a person's tooling).
pub fn default_days(identity: &Identity) -> u32 {
    match identity {
        Identity::Agent { .. } => 90,
        Identity::Restore { .. } => 180,
        Identity::Admin => 365,
        Identity::Node { .. } => 730,
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_path_buf())
        } else {
            PkiError::Write { path: path.to_path_buf(), err: e }
        }
    })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| PkiError::Write { path: path.to_path_buf(), err: e })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::Read { path: path.to_path_buf(), err: e })
}

/// Creates `dir/ca.crt` and `dir/ca.key`.
pub fn init_ca(dir: &Path, cluster_name: &str) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Write { path: dir.to_path_buf(), err: e })?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let kp = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Exclave cluster CA {cluster_name}"));
    dn.push(DnType::OrganizationName, "Exclave");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    let y = this_year();
    params.not_before = date_time_ymd(y - 1, 1, 1);
    params.not_after = date_time_ymd(y + 30, 1, 1);
    let cert = params.self_signed(&kp)?;
    write_new(&key, &kp.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub identity: Identity,
    /// File stem: `NAME.crt`, `NAME.key`.
    pub name: String,
    /// Extra DNS names or IP addresses (nodes).
    pub hosts: Vec<String>,
    /// Valid from (Unix seconds).
    pub not_before: i64,
    /// Valid until (Unix seconds).
    pub not_after: i64,
}

impl IssueRequest {
    /// Valid from an hour ago (clocks differ) for `days` days, or the role's default.
    pub fn new(identity: Identity, name: String, hosts: Vec<String>, days: Option<u32>) -> Self {
        let days = days.unwrap_or_else(|| default_days(&identity));
        let now = now_secs();
        IssueRequest { identity, name, hosts, not_before: now - 3600, not_after: now + i64::from(days) * 86400 }
    }
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f; // a positive integer
    b[0] |= 0x01; // and no leading zero byte, so the DER encoding is exactly these 16 bytes
    SerialNumber::from_slice(&b)
}

fn time(secs: i64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| PkiError::Usage(format!("validity: {e}")))
}

/// Issues a certificate from the CA in `dir` and records it; returns the paths written.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<(PathBuf, PathBuf), PkiError> {
    crate::identity::check_name("certificate name", &req.name)?;
    let (crt, key) = (dir.join(format!("{}.crt", req.name)), dir.join(format!("{}.key", req.name)));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    issue_into(dir, req, &crt, &key)?;
    Ok((crt, key))
}

fn issue_into(dir: &Path, req: &IssueRequest, crt: &Path, key: &Path) -> Result<CertInfo, PkiError> {
    if req.not_after <= req.not_before {
        return Err(PkiError::Usage("a certificate must be valid for some time (--days 1 or more)".into()));
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)
        .map_err(|_| PkiError::Invalid { path: ca_key_path.clone(), what: "CA key" })?;
    let ca_crt_path = dir.join("ca.crt");
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_crt_path)?, ca_key)
        .map_err(|_| PkiError::Invalid { path: ca_crt_path, what: "CA certificate" })?;
    let is_node = matches!(req.identity, Identity::Node { .. });
    let mut sans = Vec::new();
    if is_node {
        sans.push(NODE_SERVER_NAME.to_string());
        sans.extend(req.hosts.iter().cloned());
    }
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.identity.subject());
    dn.push(DnType::OrganizationName, "Exclave");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if is_node {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.serial_number = Some(random_serial());
    params.not_before = time(req.not_before)?;
    params.not_after = time(req.not_after)?;
    let kp = KeyPair::generate()?;
    let cert = params.signed_by(&kp, &issuer)?;
    write_new(key, &kp.serialize_pem(), 0o600)?;
    write_new(crt, &cert.pem(), 0o644)?;
    let info = cert_info(cert.der()).map_err(|_| PkiError::Invalid { path: crt.to_path_buf(), what: "certificate" })?;
    append_record(
        dir,
        &Record::Issued {
            serial: info.serial.clone(),
            name: req.name.clone(),
            subject: info.subject.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
            time: now_secs(),
        },
    )?;
    Ok(info)
}

/// Issues a new certificate and key for the identity of `dir/NAME.crt` (same identity and
/// hosts, a new serial), keeping the old pair as `NAME.crt.prev` and `NAME.key.prev`.
pub fn renew(dir: &Path, name: &str, days: Option<u32>) -> Result<CertInfo, PkiError> {
    crate::identity::check_name("certificate name", name)?;
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let old = read_cert_file(&crt)?;
    let identity = Identity::parse(&old.subject)?;
    let hosts = old.hosts.iter().filter(|h| *h != NODE_SERVER_NAME).cloned().collect();
    let req = IssueRequest::new(identity, name.to_string(), hosts, days);
    let (new_crt, new_key) = (dir.join(format!(".{name}.crt.new")), dir.join(format!(".{name}.key.new")));
    let _ = std::fs::remove_file(&new_crt);
    let _ = std::fs::remove_file(&new_key);
    let info = issue_into(dir, &req, &new_crt, &new_key)?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|e| PkiError::Write { path: to.to_path_buf(), err: e })
    };
    rename(&crt, &dir.join(format!("{name}.crt.prev")))?;
    if key.exists() {
        rename(&key, &dir.join(format!("{name}.key.prev")))?;
    }
    rename(&new_key, &key)?;
    rename(&new_crt, &crt)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PkiError::Write { path: dir.to_path_buf(), err: e })?;
    Ok(info)
}

/// What a certificate says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Subject common name (an identity, or the CA's name).
    pub subject: String,
    /// Serial number, hex.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    /// DNS names and IP addresses.
    pub hosts: Vec<String>,
}

/// Reads a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unparsable certificate: {e}"))?;
    let subject =
        cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => hosts.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => hosts.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(ip);
                        hosts.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject,
        serial: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        hosts,
    })
}

/// Reads the first certificate of a PEM file.
pub fn read_cert_file(path: &Path) -> Result<CertInfo, PkiError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| PkiError::Read { path: path.to_path_buf(), err: e })?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| PkiError::Invalid { path: path.to_path_buf(), what: "certificate" })?;
    cert_info(&der).map_err(|_| PkiError::Invalid { path: path.to_path_buf(), what: "certificate" })
}

/// Whether a certificate is usable at `now`, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    /// Valid, but for less than `EXPIRY_WARNING_SECS` more.
    ExpiresSoon {
        in_days: i64,
    },
    Expired,
    NotYetValid,
}

pub fn validity(info: &CertInfo, now: i64) -> Validity {
    if now < info.not_before {
        Validity::NotYetValid
    } else if now > info.not_after {
        Validity::Expired
    } else if info.not_after - now < EXPIRY_WARNING_SECS {
        // Rounded up: a certificate issued for ten days "expires in 10 days" when new.
        Validity::ExpiresSoon { in_days: (info.not_after - now + 86399) / 86400 }
    } else {
        Validity::Valid
    }
}

/// A UTC date and time for people.
pub fn format_time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// One line of the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    Issued { serial: String, name: String, subject: String, not_before: i64, not_after: i64, time: i64 },
    Revoked { serial: String, subject: String, reason: String, by: String, time: i64 },
}

/// Appends one line to `dir/issued.jsonl` (synced: the record is the CA host's memory).
pub fn append_record(dir: &Path, r: &Record) -> Result<(), PkiError> {
    let path = dir.join(RECORD);
    let mut line = serde_json::to_string(r).map_err(|e| PkiError::Usage(e.to_string()))?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&path)
        .map_err(|e| PkiError::Write { path: path.clone(), err: e })?;
    f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| PkiError::Write { path, err: e })
}

/// The record of `dir` (empty if there is none); a damaged line is skipped with its number
/// in the returned warnings.
pub fn read_record(dir: &Path) -> Result<(Vec<Record>, Vec<String>), PkiError> {
    let path = dir.join(RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(PkiError::Read { path, err: e }),
    };
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(e) => warnings.push(format!("{}:{}: {e}", path.display(), i + 1)),
        }
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        dir
    }

    #[test]
    fn issued_certificates_carry_their_identity_serial_and_validity() {
        let dir = pki();
        assert!(matches!(init_ca(dir.path(), "test"), Err(PkiError::Exists(_))));
        let id = Identity::parse("agent:lux:rnpp").unwrap();
        let req = IssueRequest::new(id.clone(), "rnpp".into(), vec![], None);
        let (crt, key) = issue(dir.path(), &req).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let pem = std::fs::read(&crt).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let info = read_cert_file(&crt).unwrap();
        assert_eq!(info.serial.len(), 32, "16-byte serial: {}", info.serial);
        assert_eq!(info.not_after - info.not_before, 90 * 86400 + 3600);
        assert_eq!(validity(&info, now_secs()), Validity::Valid);
        assert_eq!(validity(&info, info.not_after - 86400 * 3), Validity::ExpiresSoon { in_days: 3 });
        assert_eq!(validity(&info, info.not_after + 1), Validity::Expired);
        let (record, warnings) = read_record(dir.path()).unwrap();
        assert!(warnings.is_empty());
        assert!(
            matches!(&record[..], [Record::Issued { serial, name, .. }] if *serial == info.serial && name == "rnpp")
        );
    }

    #[test]
    fn renewal_keeps_the_identity_and_hosts_and_changes_the_serial() {
        let dir = pki();
        let id = Identity::parse("node:n1").unwrap();
        issue(dir.path(), &IssueRequest::new(id, "n1".into(), vec!["10.0.0.1".into()], Some(10))).unwrap();
        let old = read_cert_file(&dir.path().join("n1.crt")).unwrap();
        let new = renew(dir.path(), "n1", None).unwrap();
        assert_eq!((new.subject.as_str(), new.hosts.clone()), ("node:n1", old.hosts.clone()));
        assert!(old.hosts.contains(&"10.0.0.1".to_string()) && old.hosts.contains(&NODE_SERVER_NAME.to_string()));
        assert_ne!(new.serial, old.serial);
        assert!(new.not_after > old.not_after + 600 * 86400);
        assert_eq!(read_cert_file(&dir.path().join("n1.crt.prev")).unwrap(), old);
        assert_eq!(read_cert_file(&dir.path().join("n1.crt")).unwrap(), new);
        assert_eq!(read_record(dir.path()).unwrap().0.len(), 2);
        assert!(renew(dir.path(), "absent", None).is_err());
    }
}
