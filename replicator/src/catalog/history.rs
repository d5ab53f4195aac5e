//! Each tenant's history as a hash chain, kept by the catalog as it applies commands: every
//! commit, every snapshot forgotten, every lock, hold, protection window and policy set,
//! every audited session and audit keeping time is an event naming the hash of the one before. A record removed or
//! edited by hand in one node's store no longer matches the chain, and a chain rewritten on
//! one node no longer matches the head its tenant recorded, or the other nodes'
//! (`exclave-restore history verify`).
//!
//! Only commands that arrived with this chain write to it (`CommitV2`, `SetRetentionV2`,
//! `SetProtection`, `SetLock`, `ApproveLock`, `SetHold`, `Audit`, `RecordDrillV2`,
//! `SetAuditKeep`), so a log
//! replayed by a newer node gives the state older nodes reached. Drill results recorded with
//! the older `RecordDrill` are not in the chain.
//!
//! Keys (see the table in `catalog`):
//!
//! ```text
//! H ‖ tenant ‖ 0 ‖ seq (u64 BE)   → postcard(HistoryEvent)
//! J ‖ tenant                      → postcard(HistoryHead)
//! ```

use exclave::protocol::{HistoryEvent, HistoryHead, MAX_HISTORY_EVENTS};

use super::{CatalogError, CatalogRead, Write, decode, encode, tenant_key};

fn event_key(tenant: &str, seq: u64) -> Vec<u8> {
    let mut k = tenant_key(b'H', tenant);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn head_key(tenant: &str) -> Vec<u8> {
    tenant_key(b'J', tenant)
}

pub fn head(view: &dyn CatalogRead, tenant: &str) -> Result<HistoryHead, CatalogError> {
    Ok(view.get(&head_key(tenant))?.map(|v| decode(&v)).transpose()?.unwrap_or_default())
}

/// Every tenant's head, by tenant name.
pub fn heads(view: &dyn CatalogRead) -> Result<Vec<(String, HistoryHead)>, CatalogError> {
    let mut out = Vec::new();
    let mut err = None;
    view.scan(b"J", &mut |k, v| {
        let tenant = String::from_utf8_lossy(&k[1..k.len().saturating_sub(1)]).into_owned();
        match decode::<HistoryHead>(v) {
            Ok(h) => out.push((tenant, h)),
            Err(e) => err = Some(e),
        }
        err.is_none()
    })?;
    err.map_or(Ok(out), Err)
}

/// Events after `after`, oldest first, at most `MAX_HISTORY_EVENTS`.
pub fn events(view: &dyn CatalogRead, tenant: &str, after: u64) -> Result<Vec<HistoryEvent>, CatalogError> {
    let prefix = tenant_key(b'H', tenant);
    let start = event_key(tenant, after.saturating_add(1));
    let mut out = Vec::new();
    let mut err = None;
    view.scan_from(&prefix, &start, &mut |_, v| match decode::<HistoryEvent>(v) {
        Ok(e) => {
            out.push(e);
            out.len() < MAX_HISTORY_EVENTS
        }
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    err.map_or(Ok(out), Err)
}

/// Appends to a tenant's chain within one command (several events may share one apply).
pub struct Chain {
    tenant: String,
    head: HistoryHead,
    time: i64,
}

impl Chain {
    pub fn open(view: &dyn CatalogRead, tenant: &str, time: i64) -> Result<Chain, CatalogError> {
        Ok(Chain { tenant: tenant.to_string(), head: head(view, tenant)?, time })
    }

    pub fn push(&mut self, kind: &str, payload: Vec<u8>, w: &mut Vec<Write>) {
        let e =
            HistoryEvent { seq: self.head.seq + 1, prev: self.head.hash, time: self.time, kind: kind.into(), payload };
        self.head = HistoryHead { seq: e.seq, hash: e.hash() };
        w.push(Write::Put(event_key(&self.tenant, e.seq), encode(&e)));
        w.push(Write::Put(head_key(&self.tenant), encode(&self.head)));
    }
}

/// Every event of a tenant (for tests and small tenants).
#[cfg(test)]
pub fn all(view: &dyn CatalogRead, tenant: &str) -> Result<Vec<HistoryEvent>, CatalogError> {
    Ok(super::scan_decoded::<HistoryEvent>(view, &tenant_key(b'H', tenant))?.into_iter().map(|(_, e)| e).collect())
}
