//! Hooks the crash and scale tests use on the real binary, read from the environment once.
//! Unset, they cost one lookup and change nothing.
//!
//! - `EXCLAVE_TEST_CRASH_AT=STEP` aborts the process at that step: `pack-written`,
//!   `pack-synced`, `mid-record` (see `store`), `snapshot-page` (after the first page of a
//!   streamed catalog snapshot is written, see `snapshot`), `chunks-stored` (an upload held
//!   by a write quorum, before it is indexed, see `replication`), `gc-swept` (after a GC
//!   pass's first sweep), `gc-copied` (live records of a pack copied, locations not yet
//!   repointed), `gc-before-delete` (repointed, the old pack not yet deleted; see `gc`),
//!   `get-chunks:N` (on its Nth chunk-fetch request: a node dying in the middle of a
//!   restore), `put-chunks:N` (on its Nth chunk upload: in the middle of a backup),
//!   `scrub-page` (a scrub pass's cursor saved after its first page, see `scrub`).
//! - `EXCLAVE_TEST_SNAPSHOT_PAGE_BYTES=N` makes snapshot pages N bytes, so that a small
//!   catalog travels in many pages.
//! - `EXCLAVE_TEST_OLD_LAYOUT=1` founds a cluster with the catalog layout of older versions,
//!   as a cluster upgraded in place has until `cluster finalize-upgrade`.
//! - `EXCLAVE_TEST_KNOWN_LAYOUT=N` makes the node say it knows catalog layouts up to N only,
//!   as a node of an older version would (see `upgrade`).

use std::sync::OnceLock;

fn crash_at() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var("EXCLAVE_TEST_CRASH_AT").ok()).as_deref()
}

/// Whether the process is to abort at `step` (for steps that must act before aborting).
pub fn crashes_at(step: &str) -> bool {
    crash_at() == Some(step)
}

/// Aborts the process if it was asked to at `step`.
pub fn crash_point(step: &str) {
    if crashes_at(step) {
        eprintln!("EXCLAVE_TEST_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

/// Aborts the process on the Nth time it passes `step`, when asked with `STEP:N`.
pub fn crash_after(step: &str) {
    static PASSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(n) = crash_at().and_then(|at| at.strip_prefix(step)?.strip_prefix(':')?.parse::<u64>().ok()) else {
        return;
    };
    if PASSED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= n {
        eprintln!("EXCLAVE_TEST_CRASH_AT={step}:{n}: aborting");
        std::process::abort();
    }
}

/// Bytes of catalog pairs in one snapshot page.
pub fn snapshot_page_bytes(default: usize) -> usize {
    static BYTES: OnceLock<Option<usize>> = OnceLock::new();
    BYTES
        .get_or_init(|| std::env::var("EXCLAVE_TEST_SNAPSHOT_PAGE_BYTES").ok().and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

/// Whether a new cluster is to be founded with the older versions' catalog layout.
pub fn founds_old_layout() -> bool {
    static OLD: OnceLock<bool> = OnceLock::new();
    *OLD.get_or_init(|| std::env::var_os("EXCLAVE_TEST_OLD_LAYOUT").is_some_and(|v| v == "1"))
}

/// The newest catalog layout the node is to say it knows, when a test stands it in for an
/// older version.
pub fn known_layout() -> Option<u32> {
    static KNOWN: OnceLock<Option<u32>> = OnceLock::new();
    *KNOWN.get_or_init(|| std::env::var("EXCLAVE_TEST_KNOWN_LAYOUT").ok().and_then(|v| v.parse().ok()))
}
