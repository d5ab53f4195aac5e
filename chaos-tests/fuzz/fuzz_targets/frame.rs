//! A frame from the network: header, then a request or a reply; decoding must fail cleanly.
#![no_main]

use exclave::protocol::frame::{FrameHeader, FrameKind, decode_frame};
use exclave::protocol::{Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = FrameHeader::parse(data);
    let _ = decode_frame::<Request>(FrameKind::Request, data);
    let _ = decode_frame::<Reply>(FrameKind::Reply, data);
});
