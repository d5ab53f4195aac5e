//! Retention policies: which snapshots of a source the cluster keeps.
//!
//! A policy is sent by the agent (or set by an administrator) and applied by the cluster's
//! catalog whenever a snapshot of the source commits, never by an agent deleting snapshots.
//! Selection is pure and deterministic (UTC calendar, ties broken by commit order), because
//! every embassy node applies it inside the replicated state machine.
//!
//! The rules are restic's: `keep_last` keeps the N newest; `keep_hourly` keeps the newest
//! snapshot of each of the N newest hours that have one, and likewise for days, ISO weeks,
//! months and years. A snapshot kept by any rule is kept.
//!
//! # No erasure by agents
//!
//! An agent may commit any number of snapshots, claiming any times; a stolen agent
//! certificate must still not make the cluster forget what its policy promised. So:
//!
//! 1. **Cluster time.** The time retention reads is the snapshot's *commit time*, assigned by
//!    the catalog when the commit is applied: the proposing node's clock, never allowed to go
//!    back (the catalog keeps the newest it has applied and takes the larger). The agent's
//!    `time` is kept as information only (the snapshot's own start, as its host saw it).
//! 2. **Protection window.** Retention never forgets a snapshot committed less than the
//!    tenant's window ago in cluster time (set by an administrator, 14 days by default),
//!    whatever else is committed: a flood of junk commits leaves two weeks of real history in
//!    place, long enough for the age and count alerts to be seen.
//! 3. **Calendar slots on cluster time.** Beyond the window, hourly to yearly slots are
//!    counted on commit times: commits made today land in today's slot and cannot empty
//!    yesterday's. (`keep_last` keeps its literal promise, the N newest; the window is what
//!    protects older real snapshots from a flood.)
//!
//! The selection itself (`forget`, `forget_at`) is pure; the catalog supplies commit times.

use chrono::{DateTime, Datelike};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionPolicy {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a retention policy must keep something: set at least one keep-* above 0")]
pub struct EmptyPolicy;

/// The protection window of a tenant that no administrator has set, in days.
pub const DEFAULT_PROTECTION_DAYS: u32 = 14;
/// The longest protection window an administrator may set, in days.
pub const MAX_PROTECTION_DAYS: u32 = 36_500;

/// A snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// Commit time (cluster time, Unix seconds).
    pub time: i64,
    pub commit_seq: u64,
}

impl RetentionPolicy {
    fn rules(&self) -> [u32; 6] {
        [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly]
    }

    pub fn validate(&self) -> Result<(), EmptyPolicy> {
        if self.rules().iter().all(|r| *r == 0) { Err(EmptyPolicy) } else { Ok(()) }
    }

    /// Whether this policy keeps at least what `other` keeps, rule by rule (so replacing
    /// `other` by it can never forget a snapshot `other` would have kept).
    pub fn keeps_at_least(&self, other: &RetentionPolicy) -> bool {
        self.rules().iter().zip(other.rules()).all(|(a, b)| *a >= b)
    }

    pub fn describe(&self) -> String {
        let names = ["last", "hourly", "daily", "weekly", "monthly", "yearly"];
        let parts: Vec<String> =
            self.rules().iter().zip(names).filter(|(n, _)| **n > 0).map(|(n, name)| format!("{name} {n}")).collect();
        format!("keep {}", parts.join(", "))
    }

    /// What the cluster forgets at cluster time `now`: what `forget` selects, except the
    /// snapshots committed less than `window_secs` before `now` (a window of 0 protects nothing).
    pub fn forget_at(&self, snapshots: &[Candidate], now: i64, window_secs: i64) -> Vec<String> {
        let floor = now.saturating_sub(window_secs);
        let protected: std::collections::HashSet<&str> =
            snapshots.iter().filter(|c| c.time > floor).map(|c| c.id.as_str()).collect();
        self.forget(snapshots).into_iter().filter(|id| !protected.contains(id.as_str())).collect()
    }

    /// The ids of `snapshots` this policy forgets, in the order given.
    pub fn forget(&self, snapshots: &[Candidate]) -> Vec<String> {
        if self.validate().is_err() {
            return Vec::new(); // an empty policy never deletes everything
        }
        let mut order: Vec<usize> = (0..snapshots.len()).collect();
        // Newest first; commit order breaks ties within a second.
        order.sort_by_key(|&i| std::cmp::Reverse((snapshots[i].time, snapshots[i].commit_seq)));
        let mut keep = vec![false; snapshots.len()];
        for &i in order.iter().take(self.keep_last as usize) {
            keep[i] = true;
        }
        let buckets: [(u32, Bucket); 5] = [
            (self.keep_hourly, |t| t.div_euclid(3600)),
            (self.keep_daily, |t| t.div_euclid(86400)),
            (self.keep_weekly, |t| {
                let d = at(t);
                let w = d.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }),
            (self.keep_monthly, |t| {
                let d = at(t);
                i64::from(d.year()) * 100 + i64::from(d.month())
            }),
            (self.keep_yearly, |t| i64::from(at(t).year())),
        ];
        for (n, bucket) in buckets {
            let mut last = None;
            let mut taken = 0;
            for &i in &order {
                if taken >= n {
                    break;
                }
                let b = bucket(snapshots[i].time);
                if last != Some(b) {
                    keep[i] = true;
                    last = Some(b);
                    taken += 1;
                }
            }
        }
        snapshots.iter().zip(keep).filter(|(_, k)| !k).map(|(s, _)| s.id.clone()).collect()
    }
}

/// The calendar bucket a time falls in (hour, day, ISO week, month, year).
type Bucket = fn(i64) -> i64;

fn at(t: i64) -> DateTime<chrono::Utc> {
    DateTime::from_timestamp(t, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snaps(times: &[i64]) -> Vec<Candidate> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate { id: format!("s{i}"), time: *t, commit_seq: i as u64 })
            .collect()
    }

    const DAY: i64 = 86400;
    const T: i64 = 1_795_000_000;

    #[test]
    fn keep_last_keeps_the_newest() {
        let s = snaps(&[T, T + 10, T + 20, T + 30]);
        let p = RetentionPolicy { keep_last: 2, ..Default::default() };
        assert_eq!(p.forget(&s), ["s0", "s1"]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        // Three snapshots a day for five days.
        let times: Vec<i64> = (0..5).flat_map(|d| [T + d * DAY, T + d * DAY + 60, T + d * DAY + 120]).collect();
        let s = snaps(&times);
        let p = RetentionPolicy { keep_daily: 3, ..Default::default() };
        let forgotten = p.forget(&s);
        let kept: Vec<&str> = s.iter().map(|c| c.id.as_str()).filter(|id| !forgotten.iter().any(|f| f == id)).collect();
        // Day boundaries in UTC: T is 11:06, so T + 120 is the same day.
        assert_eq!(kept, ["s8", "s11", "s14"]);
        let p = RetentionPolicy { keep_daily: 3, keep_last: 4, ..Default::default() };
        assert_eq!(p.forget(&s).len(), 15 - 5, "last 4 (s11..s14) plus s8");
    }

    #[test]
    fn weekly_monthly_yearly_buckets() {
        let times: Vec<i64> = (0..800).map(|d| T + d * DAY).collect();
        let s = snaps(&times);
        let kept = |p: RetentionPolicy| s.len() - p.forget(&s).len();
        assert_eq!(kept(RetentionPolicy { keep_weekly: 10, ..Default::default() }), 10);
        assert_eq!(kept(RetentionPolicy { keep_monthly: 6, ..Default::default() }), 6);
        assert_eq!(kept(RetentionPolicy { keep_yearly: 10, ..Default::default() }), 4, "2026 to 2029");
    }

    #[test]
    fn empty_policies_and_lengthening() {
        let s = snaps(&[T, T + 1]);
        assert_eq!(RetentionPolicy::default().forget(&s), Vec::<String>::new());
        assert_eq!(RetentionPolicy::default().validate(), Err(EmptyPolicy));
        let short = RetentionPolicy { keep_daily: 7, ..Default::default() };
        let long = RetentionPolicy { keep_daily: 30, keep_monthly: 12, ..Default::default() };
        assert!(long.keeps_at_least(&short) && !short.keeps_at_least(&long));
        assert_eq!(long.describe(), "keep daily 30, monthly 12");
    }

    #[test]
    fn the_window_protects_whatever_the_rules_select() {
        let s = snaps(&[T, T + DAY, T + 20 * DAY, T + 20 * DAY + 1]);
        let p = RetentionPolicy { keep_last: 1, ..Default::default() };
        assert_eq!(p.forget(&s), ["s0", "s1", "s2"]);
        let now = T + 20 * DAY + 1;
        assert_eq!(p.forget_at(&s, now, 14 * DAY), ["s0", "s1"], "s2 is a second old");
        assert_eq!(p.forget_at(&s, now, 20 * DAY), ["s0"], "s0 is 20 days and a second old");
        assert_eq!(p.forget_at(&s, now, 20 * DAY + 1), ["s0"], "... s0 is not younger than 20 days and a second");
        assert_eq!(p.forget_at(&s, now, 20 * DAY + 2), Vec::<String>::new());
        assert_eq!(p.forget_at(&s, now, 0), ["s0", "s1", "s2"]);
        assert_eq!(p.forget_at(&s, i64::MIN, i64::MAX), Vec::<String>::new(), "no overflow");
    }

    proptest! {
        /// The newest snapshot is always kept, and a policy that keeps at least as much
        /// never forgets a snapshot the smaller one keeps. An empty policy is no policy: it
        /// forgets nothing (and the catalog refuses to store one), so it is compared with
        /// nothing.
        #[test]
        fn newest_kept_and_monotone(times in proptest::collection::vec(0i64..5_000_000_000, 1..60),
                                    a in proptest::array::uniform6(0u32..5), extra in proptest::array::uniform6(0u32..3)) {
            let s = snaps(&times);
            let small = RetentionPolicy { keep_last: a[0], keep_hourly: a[1], keep_daily: a[2], keep_weekly: a[3], keep_monthly: a[4], keep_yearly: a[5] };
            let big = RetentionPolicy {
                keep_last: a[0] + extra[0], keep_hourly: a[1] + extra[1], keep_daily: a[2] + extra[2],
                keep_weekly: a[3] + extra[3], keep_monthly: a[4] + extra[4], keep_yearly: a[5] + extra[5],
            };
            let f_small = small.forget(&s);
            let f_big = big.forget(&s);
            if small.validate().is_ok() {
                for id in &f_big {
                    prop_assert!(f_small.contains(id), "{id} forgotten by the larger policy only");
                }
                let newest = s.iter().max_by_key(|c| (c.time, c.commit_seq)).unwrap();
                prop_assert!(!f_small.contains(&newest.id));
            } else {
                prop_assert!(f_small.is_empty(), "an empty policy forgot {f_small:?}");
            }
        }
    }
}
