//! When a daemon runs each scheduled job (the agent's snapshots of a source, the drill
//! daemon's drills of one): cron schedules with jitter, retry with backoff, never two runs of
//! one job at once. Pure: time is given, never read, so the tests drive it with a simulated
//! clock.
//!
//! Rules:
//! - A source is due at its next cron occurrence plus a random jitter in `[0, jitter)`, so
//!   agents sharing a schedule do not hit the cluster in the same second.
//! - On start, a source whose last success is older than its latest occurrence (a run was
//!   missed while the agent was down) is due at once.
//! - A failed run is retried after 30 s (`retry-secs`), doubling up to 1 h, or at the next occurrence if
//!   that comes first; a success resets the backoff.
//! - A running source is never started again until its run has finished.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone};
use croner::Cron;

pub const FIRST_RETRY_SECS: i64 = 30;
pub const MAX_RETRY_SECS: i64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waiting; due at the given time.
    Waiting {
        due: i64,
    },
    Running {
        since: i64,
    },
}

#[derive(Debug, Clone)]
pub struct Job {
    pub cron: Cron,
    pub jitter_secs: u64,
    pub state: State,
    /// Consecutive failures (0 after a success).
    pub failures: u32,
}

pub struct Scheduler<Tz: TimeZone> {
    tz: Tz,
    pub jobs: BTreeMap<String, Job>,
    rng: Box<dyn FnMut(u64) -> u64 + Send>,
    first_retry: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("schedule {expr:?}: {why}")]
pub struct ScheduleError {
    expr: String,
    why: String,
}

pub fn parse(expr: &str) -> Result<Cron, ScheduleError> {
    use std::str::FromStr;
    Cron::from_str(expr).map_err(|e| ScheduleError { expr: expr.to_string(), why: e.to_string() })
}

impl<Tz: TimeZone> Scheduler<Tz> {
    /// `rng(n)` returns a value in `[0, n)` (n > 0).
    pub fn new(tz: Tz, rng: Box<dyn FnMut(u64) -> u64 + Send>) -> Scheduler<Tz> {
        Scheduler { tz, jobs: BTreeMap::new(), rng, first_retry: FIRST_RETRY_SECS }
    }

    /// Sets the first retry delay (doubling from there up to `MAX_RETRY_SECS`).
    pub fn with_first_retry(mut self, secs: i64) -> Self {
        self.first_retry = secs.max(1);
        self
    }

    fn at(&self, t: i64) -> DateTime<Tz> {
        // A Unix time maps to exactly one instant; only an out-of-range value has none.
        self.tz.timestamp_opt(t, 0).earliest().unwrap_or_else(|| chrono::DateTime::UNIX_EPOCH.with_timezone(&self.tz))
    }

    fn next_occurrence(&self, cron: &Cron, after: i64) -> i64 {
        cron.find_next_occurrence(&self.at(after), false).map(|d| d.timestamp()).unwrap_or(i64::MAX)
    }

    fn jitter(&mut self, jitter_secs: u64) -> i64 {
        if jitter_secs == 0 { 0 } else { (self.rng)(jitter_secs) as i64 }
    }

    /// Adds a source. `last_success` comes from the status file of an earlier run.
    pub fn add(&mut self, name: &str, cron: Cron, jitter_secs: u64, now: i64, last_success: Option<i64>) {
        let missed = last_success.is_some_and(|last| self.next_occurrence(&cron, last) <= now);
        let due = if missed { now } else { self.next_occurrence(&cron, now) + self.jitter(jitter_secs) };
        self.jobs.insert(name.to_string(), Job { cron, jitter_secs, state: State::Waiting { due }, failures: 0 });
    }

    /// The sources to start now; they are marked running.
    pub fn take_due(&mut self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        for (name, job) in self.jobs.iter_mut() {
            if let State::Waiting { due } = job.state
                && due <= now
            {
                job.state = State::Running { since: now };
                out.push(name.clone());
            }
        }
        out
    }

    /// Records the end of a run and schedules the next.
    pub fn finished(&mut self, name: &str, now: i64, ok: bool) {
        let Some(job) = self.jobs.get(name) else { return };
        let (cron, jitter_secs, failures) = (job.cron.clone(), job.jitter_secs, job.failures);
        let regular = self.next_occurrence(&cron, now) + self.jitter(jitter_secs);
        let (due, failures) = if ok {
            (regular, 0)
        } else {
            let backoff = (self.first_retry << failures.min(16)).min(MAX_RETRY_SECS);
            ((now + backoff).min(regular), failures + 1)
        };
        if let Some(job) = self.jobs.get_mut(name) {
            job.state = State::Waiting { due };
            job.failures = failures;
        }
    }

    /// When the next source is due (None: nothing waiting).
    pub fn next_due(&self) -> Option<i64> {
        self.jobs
            .values()
            .filter_map(|j| match j.state {
                State::Waiting { due } => Some(due),
                State::Running { .. } => None,
            })
            .min()
    }

    /// The longest time between two successive occurrences of a source's schedule over the
    /// next eight days, plus its jitter: how old its newest snapshot may be when all is well
    /// (the age alert allows twice this). Daylight-saving jumps and schedules like "weekdays
    /// only" make the gaps uneven, so the longest is taken, not the first.
    pub fn interval_of(&self, name: &str, now: i64) -> Option<i64> {
        let job = self.jobs.get(name)?;
        let horizon = now + 8 * 86_400;
        let (mut t, mut longest) = (self.next_occurrence(&job.cron, now), 0i64);
        // Bounded: an every-minute schedule has 11520 occurrences in eight days.
        for _ in 0..20_000 {
            let next = self.next_occurrence(&job.cron, t);
            if next == i64::MAX {
                break;
            }
            longest = longest.max(next - t);
            if next > horizon {
                break;
            }
            t = next;
        }
        (longest > 0).then_some(longest + job.jitter_secs as i64)
    }

    pub fn due_of(&self, name: &str) -> Option<i64> {
        match self.jobs.get(name)?.state {
            State::Waiting { due } => Some(due),
            State::Running { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    const T0: i64 = 1_795_000_000; // 2026-11-18 ~11:06 UTC

    fn sched() -> Scheduler<Utc> {
        Scheduler::new(Utc, Box::new(|n| n / 2))
    }

    #[test]
    fn runs_at_each_occurrence_with_jitter_and_never_twice_at_once() {
        let mut s = sched();
        s.add("db", parse("*/15 * * * *").unwrap(), 60, T0, None);
        let first = s.due_of("db").unwrap();
        assert_eq!(first % 900, 30, "next quarter hour plus the jitter (30 s of 60)");
        assert!(first > T0 && first - T0 <= 930);
        assert!(s.take_due(first - 1).is_empty());
        assert_eq!(s.take_due(first), ["db"]);
        // Still running at the next occurrence: not started again.
        assert!(s.take_due(first + 900).is_empty());
        assert_eq!(s.next_due(), None);
        s.finished("db", first + 1000, true);
        let next = s.due_of("db").unwrap();
        assert_eq!(next, first - 30 + 1800 + 30, "the occurrence after the run ended");
    }

    #[test]
    fn interval_is_the_longest_gap_plus_jitter() {
        let mut s = sched();
        s.add("q", parse("*/15 * * * *").unwrap(), 60, T0, None);
        s.add("nightly", parse("0 2 * * *").unwrap(), 0, T0, None);
        // Weekdays only: Friday 02:00 to Monday 02:00 is the longest wait.
        s.add("weekdays", parse("0 2 * * 1-5").unwrap(), 0, T0, None);
        assert_eq!(s.interval_of("q", T0), Some(900 + 60));
        assert_eq!(s.interval_of("nightly", T0), Some(86_400));
        assert_eq!(s.interval_of("weekdays", T0), Some(3 * 86_400));
        assert_eq!(s.interval_of("absent", T0), None);
    }

    #[test]
    fn failures_back_off_and_a_success_resets() {
        let mut s = sched();
        s.add("db", parse("0 2 * * *").unwrap(), 0, T0, None);
        let due = s.due_of("db").unwrap();
        assert_eq!(s.take_due(due), ["db"]);
        let mut now = due;
        let mut waits = Vec::new();
        for _ in 0..9 {
            s.finished("db", now, false);
            let next = s.due_of("db").unwrap();
            waits.push(next - now);
            assert_eq!(s.take_due(next), ["db"]);
            now = next;
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        s.finished("db", now, true);
        assert_eq!(s.jobs["db"].failures, 0);
        assert_eq!(s.due_of("db").unwrap() % 86400, 2 * 3600, "back to 02:00 UTC");
    }

    #[test]
    fn a_retry_never_waits_past_the_next_occurrence() {
        let mut s = sched();
        s.add("wal", parse("* * * * *").unwrap(), 0, T0, None);
        let due = s.due_of("wal").unwrap();
        s.take_due(due);
        for _ in 0..5 {
            s.finished("wal", due, false);
        }
        assert_eq!(s.due_of("wal").unwrap(), due + 60, "every minute beats a long backoff");
    }

    #[test]
    fn a_run_missed_while_down_is_taken_at_once() {
        let mut s = sched();
        let cron = parse("0 2 * * *").unwrap();
        let today_2am = T0 - T0 % 86400 + 2 * 3600;
        s.add("missed", cron.clone(), 600, T0, Some(today_2am - 86400));
        s.add("fine", cron.clone(), 0, T0, Some(today_2am + 5));
        s.add("new", cron, 0, T0, None);
        assert_eq!(s.take_due(T0), ["missed"]);
        assert_eq!(s.due_of("fine").unwrap(), today_2am + 86400);
        assert_eq!(s.due_of("new").unwrap(), today_2am + 86400);
    }

    #[test]
    fn bad_expressions_are_named() {
        let e = parse("61 * * * *").unwrap_err().to_string();
        assert!(e.contains("61 * * * *"), "{e}");
        assert!(parse("every day").is_err());
    }
}
