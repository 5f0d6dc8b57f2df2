//! Repeated failures logged on change and then at a bounded rate: a loop that fails every
//! 200 ms while the target is down writes its first failure, then one line per
//! [`REPEAT_EVERY`] saying how often it repeated, and its recovery at once. Sans-IO: the
//! caller passes the time and does the logging.

use std::fmt;
use std::time::{Duration, Instant};

/// How often a failure that keeps repeating unchanged is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// The state of one repeating failure (one per loop that can fail).
#[derive(Debug, Clone)]
pub struct FailureLog {
    every: Duration,
    current: Option<Streak>,
}

/// The failure being repeated: what it says, since when, how often.
#[derive(Debug, Clone)]
struct Streak {
    what: String,
    since: Instant,
    logged_at: Instant,
    /// Failures since the last logged line, not logged.
    unlogged: u64,
    total: u64,
}

/// What a failure or a success should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Log this failure; `repeated`: times the same failure happened unlogged since the
    /// last line about it (0: a new or changed failure).
    Log { repeated: u64 },
    /// Say nothing (counted).
    Quiet,
    /// The failures ended: log the recovery.
    Recovered { failures: u64, lasted: Duration },
}

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog::new(REPEAT_EVERY)
    }
}

impl FailureLog {
    /// A repeated failure is logged again at most once per `every`.
    pub fn new(every: Duration) -> FailureLog {
        FailureLog {
            every,
            current: None,
        }
    }

    /// A failure described by `what` (its error text) happened at `now`.
    pub fn failure(&mut self, what: &str, now: Instant) -> Verdict {
        match &mut self.current {
            Some(s) if s.what == what => {
                s.total += 1;
                if now.saturating_duration_since(s.logged_at) < self.every {
                    s.unlogged += 1;
                    return Verdict::Quiet;
                }
                let repeated = s.unlogged + 1;
                s.unlogged = 0;
                s.logged_at = now;
                Verdict::Log { repeated }
            }
            // New, or changed: the change is news.
            _ => {
                let since = self.current.as_ref().map_or(now, |s| s.since);
                let total = self.current.as_ref().map_or(0, |s| s.total) + 1;
                self.current = Some(Streak {
                    what: what.to_string(),
                    since,
                    logged_at: now,
                    unlogged: 0,
                    total,
                });
                Verdict::Log { repeated: 0 }
            }
        }
    }

    /// The operation succeeded at `now`: a recovery if it had been failing.
    pub fn success(&mut self, now: Instant) -> Verdict {
        match self.current.take() {
            Some(s) => Verdict::Recovered {
                failures: s.total,
                lasted: now.saturating_duration_since(s.since),
            },
            None => Verdict::Quiet,
        }
    }
}

/// " (repeated K times)" after a log message, or nothing for K = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated(pub u64);

impl fmt::Display for Repeated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " (repeated {n} times)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(30);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn first_failure_is_logged_repeats_are_counted() {
        let t0 = Instant::now();
        let mut l = FailureLog::new(EVERY);
        assert_eq!(l.failure("refused", t0), Verdict::Log { repeated: 0 });
        // Every 200 ms for just under 30 s: nothing.
        for i in 1..150 {
            assert_eq!(l.failure("refused", at(t0, i * 200)), Verdict::Quiet, "{i}");
        }
        // At 30 s: one line for the 149 quiet ones and this one.
        assert_eq!(
            l.failure("refused", at(t0, 30_000)),
            Verdict::Log { repeated: 150 }
        );
        assert_eq!(l.failure("refused", at(t0, 30_200)), Verdict::Quiet);
        assert_eq!(
            l.failure("refused", at(t0, 60_000)),
            Verdict::Log { repeated: 2 }
        );
    }

    #[test]
    fn a_change_of_error_is_logged_at_once() {
        let t0 = Instant::now();
        let mut l = FailureLog::new(EVERY);
        assert_eq!(l.failure("refused", t0), Verdict::Log { repeated: 0 });
        assert_eq!(l.failure("refused", at(t0, 200)), Verdict::Quiet);
        assert_eq!(
            l.failure("timed out", at(t0, 400)),
            Verdict::Log { repeated: 0 }
        );
        assert_eq!(l.failure("timed out", at(t0, 600)), Verdict::Quiet);
        assert_eq!(
            l.failure("refused", at(t0, 800)),
            Verdict::Log { repeated: 0 }
        );
        // The streak counts every failure since the first, whatever it said.
        assert_eq!(
            l.success(at(t0, 1000)),
            Verdict::Recovered {
                failures: 5,
                lasted: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn recovery_is_logged_once_and_resets() {
        let t0 = Instant::now();
        let mut l = FailureLog::new(EVERY);
        assert_eq!(l.success(t0), Verdict::Quiet);
        l.failure("refused", t0);
        l.failure("refused", at(t0, 200));
        assert_eq!(
            l.success(at(t0, 10_000)),
            Verdict::Recovered {
                failures: 2,
                lasted: Duration::from_secs(10)
            }
        );
        assert_eq!(l.success(at(t0, 10_200)), Verdict::Quiet);
        // The same failure after a recovery is news again.
        assert_eq!(
            l.failure("refused", at(t0, 10_400)),
            Verdict::Log { repeated: 0 }
        );
    }

    #[test]
    fn repeated_suffix() {
        assert_eq!(Repeated(0).to_string(), "");
        assert_eq!(Repeated(7).to_string(), " (repeated 7 times)");
    }
}
