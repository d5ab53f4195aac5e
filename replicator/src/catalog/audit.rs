//! The audit log as the catalog keeps it: one record per session of a restore or
//! administrator identity, replicated like everything else, so any surviving node answers
//! who read what, and when.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! Y ‖ tenant ‖ 0 ‖ ended (i64 BE) ‖ seq (u64 BE)   → postcard(AuditRecord)   tenant empty: cluster sessions
//! y                                               → u64 BE                  last audit sequence
//!
//! K ‖ tenant ‖ 0                                  → postcard(KeepSet)       how long, if set
//! W ‖ tenant ‖ 0                                  → postcard(PendingAuditKeep) a shortening asked for
//! ```
//!
//! # Keeping
//!
//! A tenant's records are kept `DEFAULT_KEEP_DAYS` (ten years) of cluster time unless an
//! administrator set another time: applying a record drops at most `PRUNE_PER_RECORD`
//! records of its tenant older than that, so pruning costs nothing that grows with the log.
//! The rules of `SetAuditKeep` (one stolen administrator certificate must not be able to
//! erase who read what):
//! - the time is `MIN_KEEP_DAYS` to `MAX_KEEP_DAYS`, and never shorter than the longest
//!   retention lock or protection window of the tenant: records outlive the data they
//!   are about;
//! - lengthening applies at once;
//! - shortening is recorded as a request; it applies when a *different* administrator asks
//!   for the same days within `locks::APPROVAL_SECS` of cluster time (re-checked then).

use exclave::protocol::{AuditKeepView, AuditRecord, MAX_AUDIT_RECORDS, PendingAuditKeep};
use serde::{Deserialize, Serialize};

use super::{CatalogError, CatalogRead, Outcome, Write, decode, encode, locks, tenant_key};

/// How long audit records are kept unless an administrator says otherwise, in days.
pub const DEFAULT_KEEP_DAYS: u32 = 3660;
/// The shortest keeping time an administrator may set (a year).
pub const MIN_KEEP_DAYS: u32 = 365;
/// The longest (a century).
pub const MAX_KEEP_DAYS: u32 = 36_500;
const PRUNE_PER_RECORD: usize = 16;
const SEQ_KEY: &[u8] = b"y";

/// An administrator's keeping time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeepSet {
    days: u32,
    by: String,
    since: i64,
}

fn keep_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'K', tenant)
}

fn pending_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'W', tenant)
}

/// How long `tenant`'s records are kept, and what waits for a second administrator.
pub fn keep(view: &dyn CatalogRead, tenant: &str) -> Result<AuditKeepView, CatalogError> {
    let set: Option<KeepSet> = view.get(&keep_key(tenant))?.map(|v| decode(&v)).transpose()?;
    let pending = view.get(&pending_key(tenant))?.map(|v| decode(&v)).transpose()?;
    Ok(AuditKeepView {
        tenant: tenant.to_string(),
        days: set.as_ref().map_or(DEFAULT_KEEP_DAYS, |s| s.days),
        set: set.map(|s| (s.by, s.since)),
        pending,
    })
}

/// `SetAuditKeep` (rules at the top of this module).
pub(super) fn set_keep(
    view: &dyn CatalogRead,
    tenant: &str,
    days: u32,
    by: &str,
    now: i64,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    if !(MIN_KEEP_DAYS..=MAX_KEEP_DAYS).contains(&days) {
        return Ok(Outcome::Refused(format!("audit records are kept {MIN_KEEP_DAYS} to {MAX_KEEP_DAYS} days")));
    }
    let floor = data_days(view, tenant)?;
    if days < floor {
        return Ok(Outcome::Refused(format!(
            "the tenant's data is kept up to {floor} days (its longest lock or protection window): \
             its audit records may not be kept less"
        )));
    }
    let current = keep(view, tenant)?;
    let set = |w: &mut Vec<Write>, by: String| {
        w.push(Write::Put(keep_key(tenant), encode(&KeepSet { days, by, since: now })));
        w.push(Write::Delete(pending_key(tenant)));
    };
    if days >= current.days {
        set(w, by.to_string());
        return Ok(Outcome::Done);
    }
    match current.pending {
        Some(p) if p.days == days && now <= p.expires && p.by != by => {
            set(w, format!("{} + {by}", p.by));
        }
        Some(p) if p.days == days && now <= p.expires => {
            return Ok(Outcome::Refused(format!(
                "this shortening was asked for with this certificate ({by}): a different administrator must \
                 ask for the same days"
            )));
        }
        _ => {
            let p = PendingAuditKeep {
                days,
                by: by.to_string(),
                requested: now,
                expires: now.saturating_add(locks::APPROVAL_SECS),
            };
            w.push(Write::Put(pending_key(tenant), encode(&p)));
        }
    }
    Ok(Outcome::Done)
}

/// The longest a tenant's data is promised to be kept, in days: its locks and its window.
fn data_days(view: &dyn CatalogRead, tenant: &str) -> Result<u32, CatalogError> {
    let locked = locks::locks(view, tenant)?.into_iter().map(|(_, l)| l.days).max().unwrap_or(0);
    Ok(locked.max(super::protection(view, tenant)?.days))
}

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
    let keep_secs = i64::from(keep(view, &r.tenant)?.days) * 86_400;
    let horizon = super::cluster_time(view)?.saturating_sub(keep_secs).max(0) as u64;
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
