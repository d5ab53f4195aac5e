//! Text a person types or a disk holds: a key share and a key file.
#![no_main]

use exclave::keys::file::parse_key_file;
use exclave::keys::shares::parse_share;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_share(text);
        let _ = parse_key_file(text);
    }
});
