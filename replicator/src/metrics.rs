//! The node's Prometheus metrics: one for each thing a site operator alerts on.

use std::path::Path;
use std::time::Duration;

use exclave::protocol::SnapshotInfo;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

type Refresh = std::sync::Arc<std::sync::Mutex<Option<Box<dyn Fn() + Send + Sync>>>>;

/// Gauges brought up to date from live state at each scrape, so that a scrape never shows
/// what was true seconds before (a node just elected, a member just added).
struct OnScrape {
    refresh: Refresh,
    inner: IntGaugeVec,
}

impl prometheus::core::Collector for OnScrape {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(f) = self.refresh.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            f();
        }
        self.inner.collect()
    }
}

#[derive(Clone)]
pub struct NodeMetrics {
    raft_refresh: Refresh,
    pub registry: Registry,
    sessions: IntCounterVec,
    read_bytes: IntCounterVec,
    audit_errors: IntCounter,
    audit_pending: IntGauge,
    requests: IntCounterVec,
    latency: HistogramVec,
    errors: IntCounterVec,
    chunks_stored: IntCounter,
    bytes_received: IntCounter,
    last_snapshot: IntGaugeVec,
    disk: IntGaugeVec,
    commit_seconds: Histogram,
    raft: IntGaugeVec,
    chunks_missing: IntGauge,
    chunks_backfilled: IntCounter,
    peer_contact: prometheus::GaugeVec,
    cert_expiry: IntGaugeVec,
    revoked: IntGauge,
    scrub_bytes: IntCounter,
    scrub_last: IntGauge,
    scrub_corrupt: IntCounter,
    scrub_repaired: IntCounter,
    scrub_unrepairable: IntGauge,
    tenant_bytes: IntGaugeVec,
    tenant_quota: IntGaugeVec,
    drill_last_run: IntGaugeVec,
    drill_last_success: IntGaugeVec,
    drill_rpo: IntGaugeVec,
    drill_ok: IntGaugeVec,
    drill_rto: prometheus::GaugeVec,
    history_head: IntGaugeVec,
    pub gc: GcMetrics,
}

/// One tenant as the catalog shows it: each source's newest snapshot time, the history's head.
pub struct TenantView {
    pub tenant: String,
    pub newest: Vec<(String, i64)>,
    pub history_head: u64,
}

/// Garbage collection: the cluster's passes (from the catalog, so every node reports them) and
/// this node's own share (orphans, disk space returned).
#[derive(Clone)]
pub struct GcMetrics {
    pub passes: IntCounter,
    pub errors: IntCounter,
    pub last_pass: IntGauge,
    pub condemned_pending: IntGauge,
    pub condemned_bytes: IntCounter,
    pub swept_bytes: IntCounter,
    pub reclaimed_bytes: IntCounter,
    pub orphans: IntGauge,
    pub pack_bytes: IntGauge,
}

impl GcMetrics {
    fn new(registry: &Registry) -> Result<GcMetrics, prometheus::Error> {
        let m = GcMetrics {
            passes: IntCounter::new("gc_passes_total", "Garbage-collection passes this node ran (cluster or its own)")?,
            errors: IntCounter::new("gc_errors_total", "Garbage-collection passes that stopped on an error")?,
            last_pass: IntGauge::new(
                "gc_last_pass_timestamp_seconds",
                "When the cluster's last garbage-collection pass ended (Unix time)",
            )?,
            condemned_pending: IntGauge::new(
                "gc_condemned_chunks",
                "Chunks out of the index waiting for their grace to end before being swept",
            )?,
            condemned_bytes: IntCounter::new(
                "gc_condemned_bytes_total",
                "Envelope bytes condemned by passes this node ran",
            )?,
            swept_bytes: IntCounter::new("gc_swept_bytes_total", "Envelope bytes swept by passes this node ran")?,
            reclaimed_bytes: IntCounter::new(
                "gc_reclaimed_bytes_total",
                "Pack bytes this node gave back to its file system",
            )?,
            orphans: IntGauge::new(
                "gc_orphan_chunks",
                "Chunks stored on this node that the index does not name (last pass)",
            )?,
            pack_bytes: IntGauge::new("store_pack_bytes", "Bytes of this node's pack files")?,
        };
        for c in [&m.passes, &m.errors, &m.condemned_bytes, &m.swept_bytes, &m.reclaimed_bytes] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&m.last_pass, &m.condemned_pending, &m.orphans, &m.pack_bytes] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(m)
    }
}

impl NodeMetrics {
    pub fn new(node: &str) -> Result<NodeMetrics, prometheus::Error> {
        let registry =
            Registry::new_custom(Some("exclave".into()), Some([("node".to_string(), node.to_string())].into()))?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests served, by kind and result"),
            &["kind", "result"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("request_seconds", "Request latency by kind")
                .buckets(vec![0.0005, 0.002, 0.01, 0.05, 0.2, 1.0, 5.0]),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(Opts::new("errors_total", "Errors by kind"), &["kind"])?;
        let chunks_stored = IntCounter::new("chunks_stored_total", "New chunks stored")?;
        let bytes_received = IntCounter::new("chunk_bytes_received_total", "Envelope bytes received")?;
        let last_snapshot = IntGaugeVec::new(
            Opts::new("snapshot_last_time_seconds", "Time of the newest committed snapshot per source"),
            &["tenant", "source"],
        )?;
        let disk = IntGaugeVec::new(
            Opts::new("disk_bytes", "Data directory file system: used, free, and the reserve uploads may not touch"),
            &["state"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(chunks_stored.clone()))?;
        registry.register(Box::new(bytes_received.clone()))?;
        registry.register(Box::new(last_snapshot.clone()))?;
        registry.register(Box::new(disk.clone()))?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "commit_seconds",
                "Time to commit a snapshot through Raft, once its references are staged",
            )
            .buckets(vec![0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
        )?;
        let raft = IntGaugeVec::new(
            Opts::new("raft", "Raft state: term, is_leader, commit_index, applied_index, voters, learners"),
            &["field"],
        )?;
        let chunks_missing =
            IntGauge::new("chunks_missing", "Indexed chunks this node lacks (last anti-entropy pass)")?;
        let chunks_backfilled =
            IntCounter::new("chunks_backfilled_total", "Chunks fetched from peers by anti-entropy")?;
        let peer_contact = prometheus::GaugeVec::new(
            Opts::new("peer_last_contact_seconds", "Seconds since this node last heard from each peer"),
            &["peer"],
        )?;
        registry.register(Box::new(commit_seconds.clone()))?;
        let raft_refresh: Refresh = Default::default();
        registry.register(Box::new(OnScrape { refresh: raft_refresh.clone(), inner: raft.clone() }))?;
        registry.register(Box::new(chunks_missing.clone()))?;
        registry.register(Box::new(chunks_backfilled.clone()))?;
        registry.register(Box::new(peer_contact.clone()))?;
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "certificate_expiry_timestamp_seconds",
                "When this node's certificate and the cluster CA's expire (Unix time)",
            ),
            &["identity"],
        )?;
        let revoked = IntGauge::new("certificates_revoked", "Certificates revoked in the cluster's catalog")?;
        registry.register(Box::new(cert_expiry.clone()))?;
        registry.register(Box::new(revoked.clone()))?;
        let scrub_bytes = IntCounter::new("scrub_bytes_total", "Stored envelope bytes re-read and checked by scrub")?;
        let scrub_last =
            IntGauge::new("scrub_last_full_pass_timestamp_seconds", "When the last full scrub pass ended (Unix time)")?;
        let scrub_corrupt = IntCounter::new("scrub_corrupt_total", "Chunks scrub found damaged or unreadable")?;
        let scrub_repaired =
            IntCounter::new("scrub_repaired_total", "Damaged chunks replaced by a good copy from a peer")?;
        let scrub_unrepairable = IntGauge::new(
            "scrub_unrepairable",
            "Damaged chunks no peer could replace (their snapshots are not whole)",
        )?;
        for m in [&scrub_bytes, &scrub_corrupt, &scrub_repaired] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(scrub_last.clone()))?;
        let tenant_bytes = IntGaugeVec::new(
            Opts::new("tenant_stored_bytes", "Envelope bytes of each tenant's chunks in the cluster index"),
            &["tenant"],
        )?;
        let tenant_quota =
            IntGaugeVec::new(Opts::new("tenant_quota_bytes", "Each tenant's storage quota, where set"), &["tenant"])?;
        registry.register(Box::new(tenant_bytes.clone()))?;
        registry.register(Box::new(tenant_quota.clone()))?;
        let per_source = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["tenant", "source"]);
        let drill_last_run =
            per_source("drill_last_run_timestamp_seconds", "When the newest restore drill of each source started")?;
        let drill_last_success = per_source(
            "drill_last_success_timestamp_seconds",
            "When the newest passing restore drill of each source started",
        )?;
        let drill_rpo =
            per_source("drill_rpo_seconds", "Age of the snapshot the newest restore drill of each source restored")?;
        let drill_ok = per_source("drill_ok", "1 when the newest restore drill of each source passed")?;
        let drill_rto = prometheus::GaugeVec::new(
            Opts::new("drill_rto_seconds", "Recovery time measured by the newest restore drill of each source"),
            &["tenant", "source"],
        )?;
        for m in [&drill_last_run, &drill_last_success, &drill_rpo, &drill_ok] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(drill_rto.clone()))?;
        let history_head = IntGaugeVec::new(
            Opts::new(
                "history_head_seq",
                "Events in each tenant's hash-chained history (never goes down: a fall is a rewritten catalog)",
            ),
            &["tenant"],
        )?;
        registry.register(Box::new(history_head.clone()))?;
        registry.register(Box::new(scrub_unrepairable.clone()))?;
        let gc = GcMetrics::new(&registry)?;
        let sessions = IntCounterVec::new(
            Opts::new(
                "audit_sessions_total",
                "Sessions of restore and administrator identities this node served and recorded, by identity",
            ),
            &["identity"],
        )?;
        let read_bytes = IntCounterVec::new(
            Opts::new("audit_read_bytes_total", "Envelope bytes served to each restore or administrator identity"),
            &["identity"],
        )?;
        let audit_errors = IntCounter::new(
            "audit_errors_total",
            "Sessions whose audit record could not go through the cluster at once (kept on the node)",
        )?;
        let audit_pending =
            IntGauge::new("audit_pending", "Audit records kept on this node until the cluster can record them")?;
        registry.register(Box::new(audit_pending.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(read_bytes.clone()))?;
        registry.register(Box::new(audit_errors.clone()))?;
        Ok(NodeMetrics {
            raft_refresh,
            sessions,
            read_bytes,
            audit_errors,
            audit_pending,
            registry,
            requests,
            latency,
            errors,
            chunks_stored,
            bytes_received,
            last_snapshot,
            disk,
            commit_seconds,
            raft,
            chunks_missing,
            chunks_backfilled,
            peer_contact,
            cert_expiry,
            revoked,
            scrub_bytes,
            scrub_last,
            scrub_corrupt,
            scrub_repaired,
            scrub_unrepairable,
            tenant_bytes,
            tenant_quota,
            drill_last_run,
            drill_last_success,
            drill_rpo,
            drill_ok,
            drill_rto,
            history_head,
            gc,
        })
    }

    /// Publishes what the catalog says of each tenant: its sources' newest snapshot (the
    /// catalog's, so any node answers, and after a restart too) and its history's head.
    pub fn catalog_view(&self, list: &[TenantView]) {
        for t in list {
            for (source, time) in &t.newest {
                let g = self.last_snapshot.with_label_values(&[&t.tenant, source]);
                if *time > g.get() {
                    g.set(*time);
                }
            }
            self.history_head.with_label_values(&[&t.tenant]).set(t.history_head as i64);
        }
    }

    /// Publishes every source's newest drill (rebuilt from the catalog, so any node answers).
    pub fn drills(&self, list: &[(String, String, crate::catalog::DrillLatest)]) {
        for (tenant, source, d) in list {
            let l = [tenant.as_str(), source.as_str()];
            self.drill_last_run.with_label_values(&l).set(d.last.started);
            if let Some(t) = d.last_success {
                self.drill_last_success.with_label_values(&l).set(t);
            }
            self.drill_rpo.with_label_values(&l).set(d.last.rpo_secs);
            self.drill_ok.with_label_values(&l).set(i64::from(d.last.verdict == "PASS"));
            self.drill_rto.with_label_values(&l).set(d.last.rto_ms as f64 / 1000.0);
        }
    }

    /// Publishes each tenant's storage and quota.
    pub fn tenants(&self, list: &[(String, u64, Option<crate::catalog::Quota>)]) {
        for (tenant, used, quota) in list {
            self.tenant_bytes.with_label_values(&[tenant]).set(*used as i64);
            match quota {
                Some(q) => self.tenant_quota.with_label_values(&[tenant]).set(q.max_bytes as i64),
                None => {
                    let _ = self.tenant_quota.remove_label_values(&[tenant]);
                }
            }
        }
    }

    pub fn scrub_checked(&self, bytes: u64) {
        self.scrub_bytes.inc_by(bytes);
    }

    pub fn scrub_last_pass(&self, t: i64) {
        self.scrub_last.set(t);
    }

    pub fn scrub_corrupt(&self) {
        self.scrub_corrupt.inc();
    }

    pub fn scrub_repaired(&self) {
        self.scrub_repaired.inc();
    }

    pub fn scrub_unrepairable(&self, n: usize) {
        self.scrub_unrepairable.set(n as i64);
    }

    /// Publishes when a certificate expires (`identity`: its subject, or `ca`).
    pub fn certificate(&self, identity: &str, not_after: i64) {
        self.cert_expiry.with_label_values(&[identity]).set(not_after);
    }

    pub fn revocations(&self, n: usize) {
        self.revoked.set(n as i64);
    }

    pub fn request(&self, kind: &str, ok: bool, took: Duration) {
        self.requests.with_label_values(&[kind, if ok { "ok" } else { "error" }]).inc();
        self.latency.with_label_values(&[kind]).observe(took.as_secs_f64());
    }

    /// A session recorded in the audit log (`identity`: its subject, without the serial).
    pub fn session(&self, identity: &str, bytes: u64) {
        self.sessions.with_label_values(&[identity]).inc();
        self.read_bytes.with_label_values(&[identity]).inc_by(bytes);
    }

    pub fn audit_failed(&self) {
        self.audit_errors.inc();
    }

    pub fn audit_pending(&self, n: usize) {
        self.audit_pending.set(n as i64);
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub fn stored(&self, new_chunks: usize, bytes: usize) {
        self.chunks_stored.inc_by(new_chunks as u64);
        self.bytes_received.inc_by(bytes as u64);
    }

    pub fn backfill(&self, missing: u64, fetched: u64) {
        self.chunks_missing.set(missing as i64);
        self.chunks_backfilled.inc_by(fetched);
    }

    /// Sets how the Raft gauges are refreshed at each scrape (`raft_state` with the live view).
    pub fn refresh_raft_on_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.raft_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    /// Publishes the Raft member's state and when each peer was last heard from.
    pub fn raft_state(&self, v: &crate::consensus::RaftView, me: u64, name_of: impl Fn(u64) -> String) {
        let is_leader = v.leader == me && v.role == Some(raft::StateRole::Leader);
        for (field, value) in [
            ("term", v.term),
            ("is_leader", u64::from(is_leader)),
            ("commit_index", v.commit),
            ("applied_index", v.applied),
            ("voters", v.voters.len() as u64),
            ("learners", v.learners.len() as u64),
        ] {
            self.raft.with_label_values(&[field]).set(value as i64);
        }
        for (id, t) in &v.last_heard {
            self.peer_contact.with_label_values(&[&name_of(*id)]).set(t.elapsed().as_secs_f64());
        }
    }

    pub fn committed(&self, tenant: &str, s: &SnapshotInfo, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        let g = self.last_snapshot.with_label_values(&[tenant, &s.source]);
        if s.time > g.get() {
            g.set(s.time);
        }
    }

    pub fn update_disk(&self, data: &Path, reserve: u64) {
        let (used, free) = disk_usage(data);
        self.disk.with_label_values(&["used"]).set(used as i64);
        self.disk.with_label_values(&["free"]).set(free as i64);
        self.disk.with_label_values(&["reserve"]).set(reserve as i64);
    }
}

/// (used, free) bytes of the file system holding `path`.
pub fn disk_usage(path: &Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(st) => {
            // The field types differ between platforms (u32 on some 32-bit targets).
            #[allow(clippy::unnecessary_cast)]
            let (bs, blocks, free, avail) =
                (st.fragment_size() as u64, st.blocks() as u64, st.blocks_free() as u64, st.blocks_available() as u64);
            (blocks.saturating_sub(free) * bs, avail * bs)
        }
        Err(_) => (0, 0),
    }
}
