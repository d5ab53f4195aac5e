//! Minimum-retention locks and legal holds, as the catalog keeps them.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! l ‖ tenant ‖ 0 ‖ source          → postcard(RetentionLock)      source empty: the whole tenant
//! h ‖ tenant ‖ 0 ‖ 's' ‖ source    → postcard(LegalHold)          a source (and its WAL) on hold
//! h ‖ tenant ‖ 0 ‖ 'n' ‖ id        → postcard(LegalHold)          one snapshot on hold
//! a ‖ request id (u64 BE)          → postcard(PendingLockChange)  waiting for a second admin
//! A                                → u64 BE                       the last request id given
//! ```
//!
//! # The rules
//!
//! - A lock of N days keeps every snapshot it covers for N days of cluster time after its
//!   commit, whatever the retention policy or the protection window say (the longest of them
//!   applies).
//! - **Compliance**: a lock can be lengthened, or a governance lock turned into one, by one
//!   administrator; nobody can shorten it, turn it into governance or remove it.
//! - **Governance**: lengthening is immediate; shortening or removing is recorded as a
//!   request that a *different* administrator certificate must approve within
//!   `APPROVAL_SECS` of cluster time. The change is re-checked against the lock in force at
//!   approval.
//! - **Legal hold**: nothing under hold is forgotten by retention or `Forget` (and so nothing
//!   it references is collected); one administrator places or releases it, and both are
//!   recorded with who and when.

use exclave::protocol::{HoldTarget, LegalHold, LockMode, PendingLockChange, RetentionLock};

use super::{CatalogError, CatalogRead, Outcome, Write, decode, encode, scan_decoded, tenant_key};

/// How long a governance change waits for its second administrator (cluster time).
pub const APPROVAL_SECS: i64 = 86_400;
/// The longest lock, in days (a century).
pub const MAX_LOCK_DAYS: u32 = 36_500;

const REQUEST_SEQ_KEY: &[u8] = b"A";

fn lock_key(tenant: &str, source: Option<&str>) -> Vec<u8> {
    let mut k = tenant_key(b'l', tenant);
    k.extend_from_slice(source.unwrap_or("").as_bytes());
    k
}

fn hold_key(tenant: &str, target: &HoldTarget) -> Vec<u8> {
    let mut k = tenant_key(b'h', tenant);
    match target {
        HoldTarget::Source(s) => {
            k.push(b's');
            k.extend_from_slice(s.as_bytes());
        }
        HoldTarget::Snapshot(id) => {
            k.push(b'n');
            k.extend_from_slice(id.as_bytes());
        }
    }
    k
}

fn request_key(id: u64) -> Vec<u8> {
    let mut k = b"a".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn lock(view: &dyn CatalogRead, tenant: &str, source: Option<&str>) -> Result<Option<RetentionLock>, CatalogError> {
    view.get(&lock_key(tenant, source))?.map(|v| decode(&v)).transpose()
}

/// The tenant's locks: its own (source `None`) and its sources'.
pub fn locks(view: &dyn CatalogRead, tenant: &str) -> Result<Vec<(Option<String>, RetentionLock)>, CatalogError> {
    let prefix = tenant_key(b'l', tenant);
    Ok(scan_decoded::<RetentionLock>(view, &prefix)?
        .into_iter()
        .map(|(k, l)| {
            let source = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            ((!source.is_empty()).then_some(source), l)
        })
        .collect())
}

pub fn holds(view: &dyn CatalogRead, tenant: &str) -> Result<Vec<LegalHold>, CatalogError> {
    Ok(scan_decoded::<LegalHold>(view, &tenant_key(b'h', tenant))?.into_iter().map(|(_, h)| h).collect())
}

pub fn pending(view: &dyn CatalogRead, tenant: &str) -> Result<Vec<PendingLockChange>, CatalogError> {
    Ok(scan_decoded::<PendingLockChange>(view, b"a")?
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p.tenant == tenant)
        .collect())
}

/// The longest lock over a source (the tenant's or the source's own), in seconds.
pub fn lock_secs(view: &dyn CatalogRead, tenant: &str, source: &str) -> Result<i64, CatalogError> {
    let days = [lock(view, tenant, None)?, lock(view, tenant, Some(source))?]
        .into_iter()
        .flatten()
        .map(|l| l.days)
        .max()
        .unwrap_or(0);
    Ok(i64::from(days) * 86_400)
}

pub fn source_held(view: &dyn CatalogRead, tenant: &str, source: &str) -> Result<bool, CatalogError> {
    Ok(view.get(&hold_key(tenant, &HoldTarget::Source(source.to_string())))?.is_some())
}

pub fn snapshot_held(view: &dyn CatalogRead, tenant: &str, id: &str) -> Result<bool, CatalogError> {
    Ok(view.get(&hold_key(tenant, &HoldTarget::Snapshot(id.to_string())))?.is_some())
}

/// Whether replacing `current` by `wanted` only strengthens it (applied at once).
fn strengthens(current: &RetentionLock, wanted: Option<(LockMode, u32)>) -> bool {
    match wanted {
        None => false,
        Some((mode, days)) => {
            days >= current.days && (mode == LockMode::Compliance || current.mode == LockMode::Governance)
        }
    }
}

fn put_lock(
    tenant: &str,
    source: Option<&str>,
    wanted: Option<(LockMode, u32)>,
    by: &str,
    now: i64,
    w: &mut Vec<Write>,
) {
    match wanted {
        Some((mode, days)) => {
            let l = RetentionLock { mode, days, by: by.to_string(), since: now };
            w.push(Write::Put(lock_key(tenant, source), encode(&l)));
        }
        None => w.push(Write::Delete(lock_key(tenant, source))),
    }
}

/// `SetLock`: applied at once when it strengthens (or there is no lock), refused against a
/// compliance lock, recorded as a request against a governance lock.
pub(super) fn set_lock(
    view: &dyn CatalogRead,
    tenant: &str,
    source: Option<&str>,
    wanted: Option<(LockMode, u32)>,
    by: &str,
    now: i64,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    if let Some((_, days)) = wanted
        && (days == 0 || days > MAX_LOCK_DAYS)
    {
        return Ok(Outcome::Refused(format!("a lock is 1 to {MAX_LOCK_DAYS} days")));
    }
    let current = lock(view, tenant, source)?;
    let Some(current) = current else {
        if wanted.is_none() {
            return Ok(Outcome::Refused("there is no lock to remove".into()));
        }
        put_lock(tenant, source, wanted, by, now, w);
        return Ok(Outcome::Done);
    };
    if strengthens(&current, wanted) {
        put_lock(tenant, source, wanted, by, now, w);
        return Ok(Outcome::Done);
    }
    if current.mode == LockMode::Compliance {
        return Ok(Outcome::Refused(format!(
            "a compliance lock of {} days is in force (set {} by {}): nobody can shorten, weaken or remove it",
            current.days,
            exclave::pki::format_time(current.since),
            current.by
        )));
    }
    let id = super::next_counter(view, REQUEST_SEQ_KEY, w)?;
    let req = PendingLockChange {
        id,
        tenant: tenant.to_string(),
        source: source.map(str::to_string),
        lock: wanted,
        by: by.to_string(),
        requested: now,
        expires: now.saturating_add(APPROVAL_SECS),
    };
    w.push(Write::Put(request_key(id), encode(&req)));
    Ok(Outcome::LockPending(req))
}

/// The tenant of a pending request, if it exists.
pub fn request_tenant(view: &dyn CatalogRead, id: u64) -> Result<Option<String>, CatalogError> {
    Ok(view.get(&request_key(id))?.map(|v| decode::<PendingLockChange>(&v)).transpose()?.map(|r| r.tenant))
}

/// `ApproveLock`: a second administrator applies a pending governance change.
pub(super) fn approve(
    view: &dyn CatalogRead,
    id: u64,
    by: &str,
    now: i64,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let Some(req) = view.get(&request_key(id))?.map(|v| decode::<PendingLockChange>(&v)).transpose()? else {
        return Ok(Outcome::Refused(format!("no pending request {id}")));
    };
    if req.by == by {
        return Ok(Outcome::Refused(format!(
            "request {id} was made with this certificate ({by}): a different administrator must approve it"
        )));
    }
    if now > req.expires {
        w.push(Write::Delete(request_key(id)));
        return Ok(Outcome::Refused(format!(
            "request {id} expired at {}; ask again",
            exclave::pki::format_time(req.expires)
        )));
    }
    let current = lock(view, &req.tenant, req.source.as_deref())?;
    if let Some(c) = &current
        && c.mode == LockMode::Compliance
    {
        w.push(Write::Delete(request_key(id)));
        return Ok(Outcome::Refused(format!("the lock became a compliance lock of {} days meanwhile", c.days)));
    }
    w.push(Write::Delete(request_key(id)));
    put_lock(&req.tenant, req.source.as_deref(), req.lock, &format!("{} + {by}", req.by), now, w);
    Ok(Outcome::Done)
}

/// `SetHold`: places (or, with `release`, releases) the legal hold `hold` describes.
pub(super) fn set_hold(
    view: &dyn CatalogRead,
    tenant: &str,
    hold: LegalHold,
    release: bool,
    w: &mut Vec<Write>,
) -> Result<Outcome, CatalogError> {
    let key = hold_key(tenant, &hold.target);
    let held = view.get(&key)?.is_some();
    if release {
        if !held {
            return Ok(Outcome::Refused(format!("no legal hold on {}", describe(&hold.target))));
        }
        w.push(Write::Delete(key));
        return Ok(Outcome::Done);
    }
    if let HoldTarget::Snapshot(id) = &hold.target
        && super::snapshot(view, tenant, id)?.is_none()
    {
        return Ok(Outcome::Refused(format!("snapshot {id} not found")));
    }
    if !held {
        w.push(Write::Put(key, encode(&hold)));
    }
    Ok(Outcome::Done)
}

pub fn describe(target: &HoldTarget) -> String {
    match target {
        HoldTarget::Source(s) => format!("source {s}"),
        HoldTarget::Snapshot(id) => format!("snapshot {id}"),
    }
}
