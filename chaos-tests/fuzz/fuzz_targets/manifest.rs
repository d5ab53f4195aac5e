//! Manifest bytes as a restore reads them from the cluster, in two pieces.
#![no_main]

use exclave::manifest::{ManifestReader, decode_root};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_root(data);
    let (a, b) = data.split_at(data.len() / 2);
    let mut r = ManifestReader::new();
    r.push(a);
    while let Ok(Some(_)) = r.next_entry() {}
    r.push(b);
    while let Ok(Some(_)) = r.next_entry() {}
});
