//! When a gateway's watch breaks, how it gets back to serving, sans-IO: re-watch on the
//! same connection, or, once the cluster has blocklisted this client (a blocklisted
//! client instance can never be used again), a whole new connection. Attempts back off;
//! the LU answers NOT READY from the loss until an attempt succeeds. The RADOS calls
//! are in `pr_watch.rs`.

use crate::backoff::Backoff;
use std::time::{Duration, Instant};

/// librados's EBLOCKLISTED (its own name for ESHUTDOWN).
pub const EBLOCKLISTED: i32 = libc::ESHUTDOWN;
/// Plain re-watches that may fail before a new connection is tried anyway (a client
/// whose errors do not say "blocklisted" may still be unusable).
const REWATCHES_BEFORE_RECONNECT: u32 = 3;
const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(10);

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Watch the PR object again on the current connection, then re-read the state.
    Rewatch,
    /// New connection, reopen the image, publish the new address, watch, re-read.
    Reconnect,
}

/// Recovery of one LU's watch.
#[derive(Debug)]
pub struct Recovery {
    /// None: the watch is up and the state current.
    lost: Option<Lost>,
    backoff: Backoff,
}

#[derive(Debug, Clone, Copy)]
struct Lost {
    blocklisted: bool,
    failed_rewatches: u32,
    next_at: Instant,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            lost: None,
            backoff: Backoff::new(FIRST_WAIT, MAX_WAIT),
        }
    }
}

impl Recovery {
    /// Whether the LU must answer NOT READY (the watch is not up).
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// The watch broke, or an operation failed with `errno` (0: no errno): try at once.
    pub fn lost(&mut self, errno: i32, now: Instant) {
        let blocklisted = errno.abs() == EBLOCKLISTED;
        match &mut self.lost {
            Some(l) => l.blocklisted |= blocklisted,
            None => {
                self.lost = Some(Lost {
                    blocklisted,
                    failed_rewatches: 0,
                    next_at: now,
                })
            }
        }
    }

    /// The attempt due at `now`, if any.
    pub fn due(&self, now: Instant) -> Option<Step> {
        let l = self.lost?;
        if now < l.next_at {
            return None;
        }
        Some(
            if l.blocklisted || l.failed_rewatches >= REWATCHES_BEFORE_RECONNECT {
                Step::Reconnect
            } else {
                Step::Rewatch
            },
        )
    }

    /// The attempt `step` failed with `errno`; `unit` in [0, 1) jitters the wait.
    pub fn failed(&mut self, step: Step, errno: i32, now: Instant, unit: f64) {
        let wait = self.backoff.next_delay(unit);
        if let Some(l) = &mut self.lost {
            l.blocklisted |= errno.abs() == EBLOCKLISTED;
            if step == Step::Rewatch {
                l.failed_rewatches += 1;
            }
            l.next_at = now + wait;
        }
    }

    /// An attempt succeeded: the watch is up and the state installed.
    pub fn recovered(&mut self) {
        self.lost = None;
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_watch_needs_nothing() {
        let r = Recovery::default();
        assert!(!r.is_lost());
        assert_eq!(r.due(Instant::now()), None);
    }

    #[test]
    fn a_lost_watch_is_rewatched_at_once() {
        let mut r = Recovery::default();
        let t = Instant::now();
        r.lost(-libc::ENOTCONN, t);
        assert!(r.is_lost());
        assert_eq!(r.due(t), Some(Step::Rewatch));
    }

    #[test]
    fn a_blocklisted_client_reconnects_instead() {
        let mut r = Recovery::default();
        let t = Instant::now();
        r.lost(-108, t);
        assert_eq!(r.due(t), Some(Step::Reconnect));
    }

    #[test]
    fn a_rewatch_answered_blocklisted_switches_to_reconnect() {
        let mut r = Recovery::default();
        let t = Instant::now();
        r.lost(0, t);
        r.failed(Step::Rewatch, EBLOCKLISTED, t, 0.0);
        assert_eq!(r.due(t + MAX_WAIT), Some(Step::Reconnect));
    }

    #[test]
    fn repeated_failed_rewatches_end_in_a_new_connection() {
        let mut r = Recovery::default();
        let mut t = Instant::now();
        r.lost(-libc::ENOTCONN, t);
        for _ in 0..REWATCHES_BEFORE_RECONNECT {
            assert_eq!(r.due(t), Some(Step::Rewatch));
            r.failed(Step::Rewatch, libc::ETIMEDOUT, t, 0.5);
            t += MAX_WAIT;
        }
        assert_eq!(r.due(t), Some(Step::Reconnect));
    }

    #[test]
    fn failures_back_off_and_success_resets() {
        // With no jitter (unit 0) each wait is half its step: 100 ms, then 200 ms.
        let mut r = Recovery::default();
        let t = Instant::now();
        let first = FIRST_WAIT / 2;
        r.lost(-108, t);
        r.failed(Step::Reconnect, libc::ETIMEDOUT, t, 0.0);
        assert_eq!(r.due(t), None, "no retry before the wait");
        assert_eq!(r.due(t + first), Some(Step::Reconnect));
        r.failed(Step::Reconnect, libc::ETIMEDOUT, t, 0.0);
        assert_eq!(r.due(t + first), None, "the second wait is longer");
        assert_eq!(r.due(t + FIRST_WAIT), Some(Step::Reconnect));
        r.recovered();
        assert!(!r.is_lost());
        assert_eq!(r.due(t), None);
        r.lost(-108, t);
        r.failed(Step::Reconnect, libc::ETIMEDOUT, t, 0.0);
        assert_eq!(r.due(t + first), Some(Step::Reconnect), "backoff reset");
    }
}
