//! The audit log as the catalog keeps it: one record per session of a restore or
//! administrator identity, replicated like everything else, so any surviving node answers
//! who read what, and when.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! Y ‖ tenant ‖ 0 ‖ ended (i64 BE) ‖ seq (u64 BE)   → postcard(AuditRecord)   tenant empty: cluster sessions
//! y                                               → u64 BE                  last audit sequence
//! ```
//!
//! Records are kept `AUDIT_KEEP_SECS` (ten years) of cluster time, longer than any data:
//! applying a record drops at most `PRUNE_PER_RECORD` records of its tenant older than that,
//! so pruning costs nothing that grows with the log.

use exclave::protocol::{AuditRecord, MAX_AUDIT_RECORDS};

use super::{CatalogError, CatalogRead, Outcome, Write, decode, encode, tenant_key};

/// How long audit records are kept, in seconds of cluster time.
pub const AUDIT_KEEP_SECS: i64 = 10 * 366 * 86_400;
const PRUNE_PER_RECORD: usize = 16;
const SEQ_KEY: &[u8] = b"y";

fn prefix(tenant: &str) -> Vec<u8> {
    tenant_key(b'Y', tenant)
}

fn record_key(tenant: &str, ended: i64, seq: u64) -> Vec<u8> {
    let mut k = prefix(tenant);
    // Times before 1970 (a node's broken clock) sort first rather than last.
    k.extend_from_slice(&(ended.max(0) as u64).to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `Audit`: records a session, and drops the tenant's oldest records past the keeping time.
pub(super) fn record(view: &dyn CatalogRead, r: &AuditRecord, w: &mut Vec<Write>) -> Result<Outcome, CatalogError> {
    let seq = super::next_counter(view, SEQ_KEY, w)?;
    w.push(Write::Put(record_key(&r.tenant, r.ended, seq), encode(r)));
    let horizon = super::cluster_time(view)?.saturating_sub(AUDIT_KEEP_SECS).max(0) as u64;
    let mut old = Vec::new();
    let p = prefix(&r.tenant);
    view.scan(&p, &mut |k, _| {
        let ended = k.get(p.len()..p.len() + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        if ended.is_some_and(|e| e < horizon) && old.len() < PRUNE_PER_RECORD {
            old.push(k.to_vec());
            true
        } else {
            false
        }
    })?;
    w.extend(old.into_iter().map(Write::Delete));
    Ok(Outcome::Done)
}

/// A tenant's records (`""`: the cluster's) that ended at or after `since`, by identities
/// starting with `who`, oldest first, at most `MAX_AUDIT_RECORDS`.
pub fn records(
    view: &dyn CatalogRead,
    tenant: &str,
    since: i64,
    who: Option<&str>,
) -> Result<Vec<AuditRecord>, CatalogError> {
    let p = prefix(tenant);
    let mut start = p.clone();
    start.extend_from_slice(&(since.max(0) as u64).to_be_bytes());
    let mut out = Vec::new();
    let mut err = None;
    view.scan_from(&p, &start, &mut |_, v| match decode::<AuditRecord>(v) {
        Ok(r) => {
            if who.is_none_or(|w| r.identity.starts_with(w)) {
                out.push(r);
            }
            out.len() < MAX_AUDIT_RECORDS
        }
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
