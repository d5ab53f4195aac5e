//! A frame from the network: header, then a request or a reply; decoding must fail cleanly.
//! A node decodes requests in place (`shared_bytes`): that must decode exactly as a copy.
#![no_main]

use exclave::protocol::frame::{FrameHeader, FrameKind, decode_frame, decode_payload};
use exclave::protocol::shared_bytes::decode_shared;
use exclave::protocol::{Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = FrameHeader::parse(data);
    let _ = decode_frame::<Request>(FrameKind::Request, data);
    let _ = decode_frame::<Reply>(FrameKind::Reply, data);
    let shared = decode_shared::<Request>(data.to_vec());
    assert_eq!(shared.ok(), decode_payload::<Request>(data).ok());
});
