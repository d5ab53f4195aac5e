//! The cluster PKI: a CA per cluster and the certificates it issues.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! ca.crt, ca.key          the cluster CA (keep ca.key offline once the cluster is set up)
//! NAME.crt, NAME.key      one identity; keys are written 0600
//! ```
//!
//! Node certificates carry the `serverAuth` and `clientAuth` usages and the DNS name
//! `exclave-node` (plus any `--host`); every other role gets `clientAuth` only, so no client
//! certificate can ever pose as a node.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

use crate::identity::Identity;

/// The TLS server name every node certificate carries and every client asks for.
pub const NODE_SERVER_NAME: &str = "exclave-node";

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
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
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
}

/// Issues a certificate from the CA in `dir`; returns the paths written.
pub fn issue(dir: &Path, req: &IssueRequest) -> Result<(PathBuf, PathBuf), PkiError> {
    crate::identity::check_name("certificate name", &req.name)?;
    let ca_key_path = dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)
        .map_err(|_| PkiError::Invalid { path: ca_key_path.clone(), what: "CA key" })?;
    let ca_crt_path = dir.join("ca.crt");
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_crt_path)?, ca_key)
        .map_err(|_| PkiError::Invalid { path: ca_crt_path, what: "CA certificate" })?;
    let (crt, key) = (dir.join(format!("{}.crt", req.name)), dir.join(format!("{}.key", req.name)));
    for p in [&crt, &key] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
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
    let y = this_year();
    params.not_before = date_time_ymd(y - 1, 1, 1);
    params.not_after = date_time_ymd(y + 5, 1, 1);
    let kp = KeyPair::generate()?;
    let cert = params.signed_by(&kp, &issuer)?;
    write_new(&key, &kp.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test").unwrap();
        assert!(matches!(init_ca(dir.path(), "test"), Err(PkiError::Exists(_))));
        let id = Identity::parse("agent:lux:rnpp").unwrap();
        let (crt, key) =
            issue(dir.path(), &IssueRequest { identity: id.clone(), name: "rnpp".into(), hosts: vec![] }).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let pem = std::fs::read(&crt).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
    }
}
