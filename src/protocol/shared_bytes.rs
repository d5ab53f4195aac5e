//! Envelopes decoded as slices of the frame they arrived in, not as copies.
//!
//! A node receives every chunk of a backup in `PutChunks` (or, on a peer, `Replicate`) frames
//! of megabytes; decoding each envelope into its own buffer copied every byte once more.
//! `decode_shared` decodes a frame whose payload it owns as `Bytes`; while it runs, an envelope
//! field (`#[serde(with = "shared_bytes")]`) that postcard hands out as a slice of that payload
//! becomes a reference-counted slice of it. Anywhere else (another format, a payload borrowed
//! from elsewhere) the bytes are copied, as before. The wire format is serde's bytes, the same
//! as `serde_bytes` gave.
//!
//! Every envelope of a frame keeps the whole frame alive: they are stored and forwarded
//! together, then dropped together.

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;

use super::frame::FrameError;

thread_local! {
    /// The payload `decode_shared` is decoding on this thread, if any.
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Clears the thread's frame when decoding ends, also by a panic.
struct Decoding;

impl Drop for Decoding {
    fn drop(&mut self) {
        FRAME.with(|f| f.borrow_mut().take());
    }
}

/// Decodes a message from `payload` (a `Vec<u8>` is taken over, not copied), its envelopes
/// sharing the payload's memory.
pub fn decode_shared<T: DeserializeOwned>(payload: impl Into<Bytes>) -> Result<T, FrameError> {
    let payload = payload.into();
    FRAME.with(|f| *f.borrow_mut() = Some(payload.clone()));
    let _clear = Decoding;
    postcard::from_bytes(&payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// `v` as a slice of the frame being decoded when it lies within it, else a copy.
fn shared(v: &[u8]) -> Bytes {
    FRAME.with(|f| match &*f.borrow() {
        Some(frame) if within(frame, v) => frame.slice_ref(v),
        _ => Bytes::copy_from_slice(v),
    })
}

fn within(frame: &[u8], v: &[u8]) -> bool {
    let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
    let (s, e) = (v.as_ptr() as usize, v.as_ptr() as usize + v.len());
    !v.is_empty() && start <= s && e <= end
}

pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(b)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    d.deserialize_bytes(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        Ok(shared(v))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Bytes::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk_id::{Checksum, ChunkId};
    use crate::protocol::{PutChunk, Request};

    fn batch() -> Request {
        let chunks = (0..5u8)
            .map(|i| PutChunk {
                id: ChunkId([i; 32]),
                checksum: Checksum([i ^ 0x5a; 32]),
                envelope: Bytes::from(vec![i; 1000 * usize::from(i)]),
            })
            .collect();
        Request::PutChunks { chunks }
    }

    #[test]
    fn envelopes_decoded_from_a_frame_share_its_memory_and_equal_a_copying_decode() {
        let req = batch();
        let payload = Bytes::from(postcard::to_stdvec(&req).unwrap());
        let (start, end) = (payload.as_ptr() as usize, payload.as_ptr() as usize + payload.len());
        let shared: Request = decode_shared(payload.clone()).unwrap();
        let copied: Request = postcard::from_bytes(&payload).unwrap();
        assert_eq!(shared, req);
        assert_eq!(copied, req);
        let Request::PutChunks { chunks } = shared else { unreachable!() };
        for c in chunks.iter().filter(|c| !c.envelope.is_empty()) {
            let p = c.envelope.as_ptr() as usize;
            assert!(start <= p && p + c.envelope.len() <= end, "{} is a slice of the frame", c.id.short());
        }
        // Outside `decode_shared`, a decode copies.
        let Request::PutChunks { chunks } = copied else { unreachable!() };
        for c in chunks.iter().filter(|c| !c.envelope.is_empty()) {
            let p = c.envelope.as_ptr() as usize;
            assert!(p + c.envelope.len() <= start || p >= end);
        }
        // The frame is forgotten after decoding, also after a malformed one.
        assert!(decode_shared::<Request>(payload.slice(..payload.len() - 1)).is_err());
        FRAME.with(|f| assert!(f.borrow().is_none()));
    }

    #[test]
    fn the_wire_format_is_that_of_serde_bytes() {
        #[derive(serde::Serialize)]
        struct Old<'a> {
            id: ChunkId,
            checksum: Checksum,
            #[serde(with = "serde_bytes")]
            envelope: &'a [u8],
        }
        let new =
            PutChunk { id: ChunkId([1; 32]), checksum: Checksum([2; 32]), envelope: Bytes::from_static(b"sealed") };
        let old = Old { id: new.id, checksum: new.checksum, envelope: b"sealed" };
        assert_eq!(postcard::to_stdvec(&new).unwrap(), postcard::to_stdvec(&old).unwrap());
    }
}
