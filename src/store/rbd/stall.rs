//! Image I/O that makes no progress while another gateway holds the image's exclusive
//! lock. librbd breaks a lock only once its holder's watch on the image header is gone,
//! and the OSDs drop a crashed client's watch only after `osd_client_watch_timeout`
//! (30 s by default): that long, every write through the surviving gateway waits. The
//! watcher thread samples [`IoProgress`] and, once I/O has stalled for [`STALL_AFTER`],
//! probes the other gateways on the PR object; a silent one is blocklisted, which drops
//! its watches at once, so librbd can take the lock. Decisions here are sans-IO.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// No I/O completed for this long while some is outstanding: probe. Longer than a
/// healthy lock handover between live gateways (one notify round trip), far shorter
/// than the watch timeout.
pub const STALL_AFTER: Duration = Duration::from_secs(2);
/// Least time between two probes of one image (a stall with every gateway alive, such
/// as an OSD outage, must not turn into a notify storm).
pub const PROBE_EVERY: Duration = Duration::from_secs(10);

/// Counters the I/O path bumps (two atomic adds per call).
#[derive(Debug, Default)]
pub struct IoProgress {
    inflight: AtomicUsize,
    completed: AtomicU64,
}

/// One call in flight; completes when dropped (whatever its result). Owned, so an
/// asynchronous read's completion callback can carry it.
#[derive(Debug)]
pub struct InFlight(Arc<IoProgress>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::Relaxed);
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the watcher sees at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub inflight: usize,
    pub completed: u64,
}

impl IoProgress {
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn sample(&self) -> Sample {
        Sample {
            inflight: self.inflight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
        }
    }
}

/// Tells from successive samples when a probe is due.
#[derive(Debug, Default)]
pub struct StallDetector {
    last_completed: u64,
    /// First sample that showed outstanding I/O and no progress.
    stalled_since: Option<Instant>,
    last_probe: Option<Instant>,
}

impl StallDetector {
    /// Feed the sample taken at `now`; true: a probe of the other gateways is due (it
    /// stays due until [`StallDetector::probed`] says one started).
    pub fn handle_sample(&mut self, now: Instant, s: Sample) -> bool {
        if s.inflight == 0 || s.completed != self.last_completed {
            self.last_completed = s.completed;
            self.stalled_since = None;
            return false;
        }
        let since = *self.stalled_since.get_or_insert(now);
        now.duration_since(since) >= STALL_AFTER
            && self
                .last_probe
                .is_none_or(|p| now.duration_since(p) >= PROBE_EVERY)
    }

    /// A probe started at `now` (the next one waits [`PROBE_EVERY`]). A due probe the
    /// watcher could not start (one still running, the watch being recovered) is not
    /// recorded, so it starts as soon as it can.
    pub fn probed(&mut self, now: Instant) {
        self.last_probe = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    /// Feeds `samples` one tick apart, starting a probe whenever one is due except at
    /// the ticks in `busy`; the ticks (from 0) at which a probe started.
    fn probes_except(samples: &[(usize, u64)], busy: &[usize]) -> Vec<usize> {
        let t0 = Instant::now();
        let mut d = StallDetector::default();
        let mut started = Vec::new();
        for (i, &(inflight, completed)) in samples.iter().enumerate() {
            let now = t0 + TICK * i as u32;
            let due = d.handle_sample(
                now,
                Sample {
                    inflight,
                    completed,
                },
            );
            if due && !busy.contains(&i) {
                d.probed(now);
                started.push(i);
            }
        }
        started
    }

    fn probes(samples: &[(usize, u64)]) -> Vec<usize> {
        probes_except(samples, &[])
    }

    #[test]
    fn a_due_probe_that_could_not_start_starts_at_the_next_tick() {
        // Due at tick 21 (see below), but the watcher is busy at 21 and 22.
        assert_eq!(probes_except(&[(1, 7); 30], &[21, 22]), vec![23]);
    }

    #[test]
    fn idle_or_progressing_io_never_probes() {
        assert!(probes(&[(0, 0); 100]).is_empty());
        let busy: Vec<_> = (0..100).map(|i| (4, i)).collect();
        assert!(probes(&busy).is_empty());
    }

    #[test]
    fn io_stuck_for_the_stall_time_probes_once_then_waits_between_probes() {
        // the first sample only learns the count; stuck from tick 1: due 2 s later
        // (tick 21), again 10 s after that (tick 121)
        assert_eq!(probes(&[(1, 7); 200]), vec![21, 121]);
    }

    #[test]
    fn progress_restarts_the_stall_clock() {
        let mut s = vec![(1, 0); 15];
        s.extend([(1, 1); 25]);
        // stuck 1.5 s, one completion at tick 15, stuck again from tick 16: due at 36
        assert_eq!(probes(&s), vec![36]);
    }

    #[test]
    fn counters_follow_calls_in_flight() {
        let p = Arc::new(IoProgress::default());
        let a = p.begin();
        let b = p.begin();
        assert_eq!(
            p.sample(),
            Sample {
                inflight: 2,
                completed: 0
            }
        );
        drop(a);
        assert_eq!(
            p.sample(),
            Sample {
                inflight: 1,
                completed: 1
            }
        );
        drop(b);
        assert_eq!(
            p.sample(),
            Sample {
                inflight: 0,
                completed: 2
            }
        );
    }
}
