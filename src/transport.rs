//! QUIC endpoints with mutual TLS, and framed message I/O over QUIC streams.
//!
//! Both sides present a certificate of the cluster CA and verify the other's; TLS 1.3 only
//! (QUIC requires it), ring as the crypto provider. A node's certificate must carry the
//! `exclave-node` name and the serverAuth usage, which only node certificates have.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Serialize, de::DeserializeOwned};

use crate::identity::Identity;
use crate::protocol::frame::{self, FrameError, FrameHeader, FrameKind, HEADER_LEN};

pub const ALPN: &[u8] = b"exclave/1";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} holds no {what}")]
    Invalid { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer identity: {0}")]
    Identity(String),
    #[error("stream: {0}")]
    Stream(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer closed the stream before a complete frame")]
    Eof,
}

/// A certificate, its key and the CA it is checked against.
pub struct TlsIdentity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub identity: Identity,
}

impl TlsIdentity {
    /// Loads `pki/ca.crt`, `pki/NAME.crt`, `pki/NAME.key`.
    pub fn load(pki: &Path, name: &str) -> Result<Self, TransportError> {
        let ca = certs(&pki.join("ca.crt"))?;
        let chain = certs(&pki.join(format!("{name}.crt")))?;
        let key_path = pki.join(format!("{name}.key"));
        let pem = std::fs::read(&key_path).map_err(|e| TransportError::Read { path: key_path.clone(), err: e })?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|_| TransportError::Invalid { path: key_path, what: "private key" })?;
        let identity = Identity::from_cert_der(&chain[0]).map_err(|e| TransportError::Identity(e.to_string()))?;
        Ok(TlsIdentity { ca, chain, key, identity })
    }

    /// Refuses to go on with a certificate of ours that no node would accept (expired, not
    /// yet valid), naming it; returns a warning when it expires within 30 days.
    pub fn check_validity(&self, name: &str) -> Result<Option<String>, TransportError> {
        use crate::pki::{Validity, format_time, validity};
        let info = crate::pki::cert_info(&self.chain[0]).map_err(TransportError::Identity)?;
        match validity(&info, crate::pki::now_secs()) {
            Validity::Valid => Ok(None),
            Validity::ExpiresSoon { in_days } => Ok(Some(format!(
                "certificate {name} ({}) expires in {in_days} day(s), on {}: renew it (exclave-replicator pki renew)",
                info.subject,
                format_time(info.not_after)
            ))),
            Validity::Expired => Err(TransportError::Identity(format!(
                "certificate {name} ({}) expired on {}: ask for a new one (exclave-replicator pki renew)",
                info.subject,
                format_time(info.not_after)
            ))),
            Validity::NotYetValid => Err(TransportError::Identity(format!(
                "certificate {name} ({}) is not valid before {} (is this host's clock right?)",
                info.subject,
                format_time(info.not_before)
            ))),
        }
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem = std::fs::read(path).map_err(|e| TransportError::Read { path: path.to_path_buf(), err: e })?;
    let v: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if v.is_empty() {
        return Err(TransportError::Invalid { path: path.to_path_buf(), what: "certificate" });
    }
    Ok(v)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, TransportError> {
    let mut r = rustls::RootCertStore::empty();
    for c in ca {
        r.add(c.clone()).map_err(|e| TransportError::Tls(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(r))
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Each open stream may hold one frame of up to 17 MiB in memory: 64 bounds what a single
    // (authenticated) peer can make a node allocate; our clients use about ten.
    t.max_concurrent_bidi_streams(64u32.into());
    // Cubic (quinn's default) unless EXCLAVE_QUIC_CONGESTION says otherwise. On a link that
    // loses 0.1 % of its packets at random, Cubic takes each loss for congestion and holds a
    // 40 ms link to 1.3 MB/s; quinn's BBR (marked experimental) keeps the link's rate but
    // overshoots a shallow queue into heavy loss (bench/wan.sh, README "Over an embassy
    // link"), so it is a choice for an operator who knows the link, not the default.
    match std::env::var("EXCLAVE_QUIC_CONGESTION").as_deref() {
        Ok("bbr") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok("newreno") => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        _ => {}
    }
    // Room for several 16 MiB chunk batches in flight on a long fat link.
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((32u32 * 1024 * 1024).into());
    t.send_window(32 * 1024 * 1024);
    // A peer that vanishes without closing (killed, cut off) is declared gone after 10 s of
    // silence, so agents fail over and Raft streams reconnect; keep-alives keep live idle links.
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    // Discovery up to Ethernet's 1452 only, which keeps its black-hole detection (a smaller
    // path, such as a tunnel, falls back to 1200). Probing above it, up to 16 KiB, never
    // succeeded even on loopback: every connection lost ~27 packets to it and fell back to
    // 1200, which cost a 16 MiB `wal-push` ~140 ms (~200 ms against ~60 ms now) and a 1 GiB
    // backup ~12 % (228 - 259 against 265 - 290 MB/s, one node on loopback).
    t.mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
    // Start at Ethernet's size rather than QUIC's 1200-byte floor; a smaller path falls back.
    t.initial_mtu(1452);
    #[allow(clippy::expect_used)]
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("10 s is a valid idle timeout")));
    Arc::new(t)
}

/// Largest datagram an endpoint accepts from a peer (what it sends is bounded by discovery).
const MAX_UDP_PAYLOAD: u16 = 16 * 1024;
/// Socket buffers: the kernel default (~200 KiB) drops datagrams at a few hundred MB/s, and
/// QUIC's congestion control then takes the drops for congestion.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// A QUIC endpoint on `addr` with large socket buffers; a server if `server` is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, TransportError> {
    endpoint_with(addr, server, None)
}

/// The key a node's QUIC endpoint derives its stateless-reset tokens from: the same across
/// restarts (it comes from the node's private key), so a node that restarted answers its
/// peers' packets for connections it no longer has with a reset they accept, and they
/// reconnect at once instead of after the idle timeout.
pub fn stateless_reset_key(id: &TlsIdentity) -> [u8; 32] {
    blake3::derive_key("exclave 2026-11 quic stateless reset key", id.key.secret_der())
}

/// As `endpoint`, with a stable stateless-reset key (see `stateless_reset_key`).
pub fn endpoint_with(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    reset_key: Option<[u8; 32]>,
) -> Result<quinn::Endpoint, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = |e: std::io::Error| TransportError::Bind { addr, err: e };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(bind)?;
    let mut cfg = match reset_key {
        Some(k) => {
            let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)));
            // Connection ids are checked with a keyed hash before a reset is sent for them: the
            // key must survive the restart too, or the old connections' ids look invalid.
            let cid_key = u64::from_le_bytes(
                blake3::derive_key("exclave 2026-11 quic cid key", &k)[..8].try_into().unwrap_or_default(),
            );
            cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
            cfg
        }
        None => quinn::EndpointConfig::default(),
    };
    cfg.max_udp_payload_size(MAX_UDP_PAYLOAD + 48).map_err(|e| TransportError::Tls(e.to_string()))?;
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Tls("no async runtime".into()))?;
    quinn::Endpoint::new(cfg, server, socket.into(), runtime).map_err(bind)
}

/// Says whether a client certificate (already verified against the CA) has been revoked.
pub type RevocationCheck = Arc<dyn Fn(&CertificateDer<'_>) -> bool + Send + Sync>;

/// The CA's verdict, then the cluster's: a revoked certificate is refused during the
/// handshake with TLS's `certificate_revoked` alert, which the client can name.
struct RevocationAwareVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: RevocationCheck,
}

impl std::fmt::Debug for RevocationAwareVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevocationAwareVerifier")
    }
}

impl rustls::server::danger::ClientCertVerifier for RevocationAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if (self.revoked)(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A node's server configuration; clients whose certificate `revoked` names are refused.
pub fn server_config(
    id: &TlsIdentity,
    revoked: Option<RevocationCheck>,
) -> Result<quinn::ServerConfig, TransportError> {
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&id.ca)?, provider())
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match revoked {
        Some(revoked) => Arc::new(RevocationAwareVerifier { inner: webpki, revoked }),
        None => webpki,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

pub fn client_config(id: &TlsIdentity) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots(&id.ca)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TransportError> {
    let cert = peer_certificate(conn)?;
    Identity::from_cert_der(&cert).map_err(|e| TransportError::Identity(e.to_string()))
}

/// The peer's (verified) certificate.
pub fn peer_certificate(conn: &quinn::Connection) -> Result<CertificateDer<'static>, TransportError> {
    let any = conn.peer_identity().ok_or_else(|| TransportError::Identity("no peer certificate".into()))?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TransportError::Identity("unexpected peer identity type".into()))?;
    certs.first().cloned().ok_or_else(|| TransportError::Identity("empty certificate chain".into()))
}

/// The serial number of a DER certificate (what a revocation names).
pub fn cert_serial(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.raw_serial().to_vec())
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    kind: FrameKind,
    msg: &T,
) -> Result<(), TransportError> {
    write_encoded(send, bytes::Bytes::from(frame::encode_frame(kind, msg)?)).await
}

/// Writes a frame encoded already; QUIC takes the buffer as it is (no copy), so one frame can
/// go to several peers.
pub async fn write_encoded(send: &mut quinn::SendStream, frame: bytes::Bytes) -> Result<(), TransportError> {
    send.write_chunk(frame).await.map_err(|e| TransportError::Stream(e.to_string()))
}

/// What a frame's buffer starts with; it grows as the payload arrives.
const FIRST_RESERVE: usize = 64 << 10;
/// How far ahead of what arrived a frame's buffer may reach, as a multiple of it.
const RESERVE_AHEAD: usize = 8;

/// Bytes to add to a frame's buffer holding `got` of `len` bytes, when `incoming` more do not
/// fit: `RESERVE_AHEAD` times what arrived (at least what comes in), or the whole declared
/// length when that is within twice as far, so that the last step is not a copy of nearly
/// the whole frame. Growing by eight rather than doubling copies a frame of megabytes in one
/// or two small steps (64 KiB, then 512 KiB; 4 MiB more for the largest) instead of about
/// its whole size, while the buffer stays within `2 × RESERVE_AHEAD` times what the peer
/// actually sent.
fn next_reserve(len: usize, got: usize, incoming: usize) -> usize {
    let ahead = got.saturating_mul(RESERVE_AHEAD).max(got + incoming);
    let target = if ahead.saturating_mul(2) >= len { len } else { ahead };
    target.saturating_sub(got)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before any byte.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    kind: FrameKind,
) -> Result<Option<T>, TransportError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match recv.read(&mut hdr[got..]).await.map_err(|e| TransportError::Stream(e.to_string()))? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated { needed: HEADER_LEN, got }.into()),
        }
    }
    let h = FrameHeader::parse(&hdr)?;
    if h.kind != kind {
        return Err(FrameError::BadKind(h.kind as u8).into());
    }
    // Appended chunk by chunk as QUIC delivers them: a zero-filled buffer would be written
    // twice (the frames of chunk batches are megabytes). Memory follows what arrived, not what
    // the header declares: a peer opening every stream it may with a maximal header and
    // sending nothing more holds a few KiB, not 64 × 17 MiB. Copied, not kept as QUIC's own
    // buffers: a peer sending a byte per datagram would make each byte pin a datagram.
    let len = h.len as usize;
    let mut body = Vec::with_capacity(len.min(FIRST_RESERVE));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await.map_err(|e| TransportError::Stream(e.to_string()))? {
            Some(c) => {
                if body.capacity() - body.len() < c.bytes.len() {
                    body.reserve_exact(next_reserve(len, body.len(), c.bytes.len()));
                }
                body.extend_from_slice(&c.bytes)
            }
            None => return Err(FrameError::Truncated { needed: len, got: body.len() }.into()),
        }
    }
    // Decoded in place: the envelopes of a chunk batch are slices of `body`, not copies.
    Ok(Some(crate::protocol::shared_bytes::decode_shared(body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_buffer_grows_by_eight_within_what_arrived_and_the_declared_length() {
        // A 4 MiB frame arriving in 1200-byte pieces: two copies (64 KiB, then 512 KiB).
        let len = 4 << 20;
        let (mut cap, mut got, mut copied, mut grows) = (FIRST_RESERVE, 0usize, 0usize, 0);
        while got < len {
            let incoming = 1200.min(len - got);
            if cap - got < incoming {
                let add = next_reserve(len, got, incoming);
                assert!(got + add >= got + incoming && got + add <= len);
                assert!(got + add <= (2 * got * RESERVE_AHEAD).max(got + incoming), "never far ahead of what arrived");
                copied += got;
                grows += 1;
                cap = got + add;
            }
            got += incoming;
        }
        assert_eq!(grows, 2);
        assert!(copied <= 600 << 10, "{copied}");
        // A 16 MiB frame: 64 KiB, 512 KiB, 4 MiB, then straight to its length.
        assert_eq!(next_reserve(16 << 20, 64 << 10, 1200), 448 << 10);
        assert_eq!(next_reserve(16 << 20, 512 << 10, 1200), (4 << 20) - (512 << 10));
        assert_eq!(next_reserve(16 << 20, 4 << 20, 1200), 12 << 20);
        // Small frames fit the first reserve; the last step stops at the declared length.
        assert_eq!(next_reserve(100_000, 65_536, 1200), 100_000 - 65_536);
        assert_eq!(next_reserve(len, 0, 1200), 1200);
    }
}
