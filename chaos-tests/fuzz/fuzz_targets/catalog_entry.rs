//! A catalog record as a node reads it back from its store (postcard values a damaged disk or
//! a hand edit may have changed), and a history event's hash: decoding must fail cleanly.
//! The records whose types the node keeps to itself are the same postcard structs of ids,
//! integers and strings.
#![no_main]

use exclave::protocol::{
    AuditKeepView, AuditRecord, DrillRecord, HistoryEvent, HistoryHead, LegalHold, PendingLockChange, RetentionLock,
    SnapshotInfo,
};
use exclave::retention::RetentionPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = postcard::from_bytes::<SnapshotInfo>(data);
    let _ = postcard::from_bytes::<Vec<exclave::ChunkId>>(data);
    let _ = postcard::from_bytes::<AuditRecord>(data);
    let _ = postcard::from_bytes::<DrillRecord>(data);
    let _ = postcard::from_bytes::<HistoryHead>(data);
    let _ = postcard::from_bytes::<RetentionPolicy>(data);
    let _ = postcard::from_bytes::<RetentionLock>(data);
    let _ = postcard::from_bytes::<LegalHold>(data);
    let _ = postcard::from_bytes::<PendingLockChange>(data);
    let _ = postcard::from_bytes::<AuditKeepView>(data);
    if let Ok(e) = postcard::from_bytes::<HistoryEvent>(data) {
        let _ = e.hash();
    }
});
