//! Frame codec: length-framed, versioned, with a hard size limit.
//!
//! ```text
//! offset size field
//! 0      2    magic "XV"
//! 2      1    protocol version = 1
//! 3      1    frame kind: 1 request, 2 reply
//! 4      4    payload length, u32 big-endian, at most MAX_FRAME_PAYLOAD
//! 8      n    payload: postcard(Request) or postcard(Reply)
//! ```
//!
//! The length is checked against the limit before any byte of the payload is read or any
//! memory is reserved, so an oversized or lying frame costs the receiver nothing.

use serde::{Serialize, de::DeserializeOwned};

pub const MAGIC: &[u8; 2] = b"XV";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// One chunk batch of up to 16 MiB of envelopes, plus a little room for the message around it.
pub const MAX_FRAME_PAYLOAD: u32 = 17 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Request = 1,
    Reply = 2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame truncated: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("not an Exclave frame (bad magic)")]
    BadMagic,
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unexpected frame kind {0}")]
    BadKind(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_PAYLOAD}")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Malformed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8]) -> Result<FrameHeader, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Truncated { needed: HEADER_LEN, got: b.len() });
        }
        if &b[..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if b[2] != VERSION {
            return Err(FrameError::UnsupportedVersion(b[2]));
        }
        let kind = match b[3] {
            1 => FrameKind::Request,
            2 => FrameKind::Reply,
            k => return Err(FrameError::BadKind(k)),
        };
        let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok(FrameHeader { kind, len })
    }
}

pub fn encode_frame<T: Serialize>(kind: FrameKind, msg: &T) -> Result<Vec<u8>, FrameError> {
    // Sized first: a batch of chunks is megabytes, and a growing buffer copied it again at
    // every doubling. The size pass only adds lengths for byte strings.
    let size = postcard::experimental::serialized_size(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if size > MAX_FRAME_PAYLOAD as usize {
        return Err(FrameError::TooLarge(size.min(u32::MAX as usize) as u32));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    out.resize(HEADER_LEN, 0);
    out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    out[..2].copy_from_slice(MAGIC);
    out[2] = VERSION;
    out[3] = kind as u8;
    out[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes one whole frame from the front of `b`; returns the message and bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(expect: FrameKind, b: &[u8]) -> Result<(T, usize), FrameError> {
    let h = FrameHeader::parse(b)?;
    if h.kind != expect {
        return Err(FrameError::BadKind(h.kind as u8));
    }
    let end = HEADER_LEN + h.len as usize;
    if b.len() < end {
        return Err(FrameError::Truncated { needed: end, got: b.len() });
    }
    Ok((decode_payload(&b[HEADER_LEN..end])?, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_id::{Checksum, ChunkId};
    use crate::protocol::message::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let req = Request::PutChunks {
            chunks: vec![PutChunk { id: ChunkId([1; 32]), checksum: Checksum([2; 32]), envelope: vec![9; 100].into() }],
        };
        let bytes = encode_frame(FrameKind::Request, &req).unwrap();
        let (back, used): (Request, usize) = decode_frame(FrameKind::Request, &bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, req);
    }

    #[test]
    fn truncated_oversized_and_foreign_frames_are_refused() {
        let bytes = encode_frame(FrameKind::Reply, &Reply::Ok).unwrap();
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode_frame::<Reply>(FrameKind::Reply, &bytes[..cut]),
                Err(FrameError::Truncated { .. })
            ));
        }
        let mut big = bytes.clone();
        big[4..8].copy_from_slice(&(MAX_FRAME_PAYLOAD + 1).to_be_bytes());
        assert_eq!(FrameHeader::parse(&big), Err(FrameError::TooLarge(MAX_FRAME_PAYLOAD + 1)));
        assert_eq!(FrameHeader::parse(b"GET / HTTP/1.1"), Err(FrameError::BadMagic));
        let mut v2 = bytes.clone();
        v2[2] = 2;
        assert_eq!(FrameHeader::parse(&v2), Err(FrameError::UnsupportedVersion(2)));
        assert!(matches!(decode_frame::<Request>(FrameKind::Request, &bytes), Err(FrameError::BadKind(2))));
    }

    #[test]
    fn an_oversized_message_is_not_encoded() {
        let req = Request::PutChunks {
            chunks: vec![PutChunk {
                id: ChunkId([0; 32]),
                checksum: Checksum([0; 32]),
                envelope: vec![0; MAX_FRAME_PAYLOAD as usize].into(),
            }],
        };
        assert!(matches!(encode_frame(FrameKind::Request, &req), Err(FrameError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_frame::<Request>(FrameKind::Request, &bytes);
            let _ = decode_frame::<Reply>(FrameKind::Reply, &bytes);
        }

        #[test]
        fn valid_header_with_garbage_payload_is_an_error_not_a_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..300)
        ) {
            let mut b = vec![b'X', b'V', VERSION, 1];
            b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            b.extend_from_slice(&payload);
            let _ = decode_frame::<Request>(FrameKind::Request, &b);
        }
    }
}
