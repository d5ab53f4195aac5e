//! An envelope as a node serves it: the header is parsed, then opened with a known key.
#![no_main]

use exclave::ChunkId;
use exclave::envelope::{Opener, parse_header};
use exclave::keys::{MasterKey, TenantKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
    let keys = TenantKeys::from_master("lux", MasterKey::from_bytes([7; 32]));
    if let Ok(mut o) = Opener::new(&keys) {
        let _ = o.open(&ChunkId([1; 32]), data);
    }
});
