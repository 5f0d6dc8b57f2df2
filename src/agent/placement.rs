//! Pure policy decisions: where a group should run, whether a failed VM may be
//! restarted in place, and whether failback is allowed now.

use crate::agent::config::Failback;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A node that could run a group, as the deciding node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: u16,
    pub name: String,
    /// Groups it owns now.
    pub load: usize,
}

/// The node that should run a group: the first preferred owner among the candidates,
/// else the least loaded candidate (lowest id on ties). Callers pass only nodes that are
/// alive, not drained and not marked failed for this group. Every node computes the
/// same answer from the same quorum image, so usually only that node claims.
pub fn best_owner(preferred: &[String], candidates: &[Candidate]) -> Option<u16> {
    for p in preferred {
        if let Some(c) = candidates.iter().find(|c| &c.name == p) {
            return Some(c.id);
        }
    }
    candidates
        .iter()
        .min_by_key(|c| (c.load, c.id))
        .map(|c| c.id)
}

/// The most preferred candidate, if the group has preferred owners: where failback
/// would send it.
pub fn failback_target(preferred: &[String], candidates: &[Candidate]) -> Option<u16> {
    preferred
        .iter()
        .find_map(|p| candidates.iter().find(|c| &c.name == p))
        .map(|c| c.id)
}

/// Whether `owner` runs the group somewhere less preferred than `target`.
pub fn is_away_from(preferred: &[String], owner_name: &str, target_name: &str) -> bool {
    let rank = |n: &str| preferred.iter().position(|p| p == n).unwrap_or(usize::MAX);
    rank(target_name) < rank(owner_name)
}

/// Whether failback may happen at local minute-of-day `minute` (0..1440).
pub fn failback_allowed(policy: Failback, window: Option<(u16, u16)>, minute: u16) -> bool {
    match policy {
        Failback::Never => false,
        Failback::Immediately => true,
        Failback::Window => match window {
            Some((a, b)) if a < b => (a..b).contains(&minute),
            Some((a, b)) => minute >= a || minute < b,
            None => false,
        },
    }
}

/// "Restart N times within P, then fail over": the restarts of one group on this node.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    threshold: u32,
    period: Duration,
    restarts: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(threshold: u32, period: Duration) -> RestartBudget {
        RestartBudget {
            threshold,
            period,
            restarts: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&t) = self.restarts.front() {
            if now.saturating_duration_since(t) >= self.period {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
    }

    /// A failure at `now`: `true` = restart in place (and it is counted), `false` = the
    /// threshold is used up, fail over.
    pub fn try_restart(&mut self, now: Instant) -> bool {
        self.expire(now);
        if self.restarts.len() as u32 >= self.threshold {
            return false;
        }
        self.restarts.push_back(now);
        true
    }

    /// Restarts counted within the period at `now`.
    pub fn count(&mut self, now: Instant) -> u32 {
        self.expire(now);
        self.restarts.len() as u32
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    pub fn reset(&mut self) {
        self.restarts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u16, name: &str, load: usize) -> Candidate {
        Candidate {
            id,
            name: name.into(),
            load,
        }
    }

    #[test]
    fn preferred_first_then_least_loaded() {
        let cands = [c(1, "a", 2), c(2, "b", 0), c(3, "c", 0)];
        assert_eq!(best_owner(&["c".into(), "b".into()], &cands), Some(3));
        assert_eq!(best_owner(&["z".into(), "a".into()], &cands), Some(1));
        assert_eq!(best_owner(&[], &cands), Some(2));
        assert_eq!(best_owner(&["z".into()], &cands), Some(2));
        assert_eq!(best_owner(&[], &[]), None);
        assert_eq!(failback_target(&["z".into()], &cands), None);
        assert_eq!(failback_target(&["z".into(), "c".into()], &cands), Some(3));
        assert!(is_away_from(&["a".into(), "b".into()], "b", "a"));
        assert!(!is_away_from(&["a".into(), "b".into()], "a", "b"));
        assert!(is_away_from(&["a".into()], "x", "a"));
    }

    #[test]
    fn failback_windows() {
        assert!(!failback_allowed(Failback::Never, None, 0));
        assert!(failback_allowed(Failback::Immediately, None, 0));
        let w = Some((22 * 60, 6 * 60));
        assert!(failback_allowed(Failback::Window, w, 23 * 60));
        assert!(failback_allowed(Failback::Window, w, 60));
        assert!(!failback_allowed(Failback::Window, w, 12 * 60));
        let w = Some((60, 120));
        assert!(failback_allowed(Failback::Window, w, 90));
        assert!(!failback_allowed(Failback::Window, w, 120));
    }

    #[test]
    fn restart_budget_refills_after_the_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = RestartBudget::new(3, 900 * s);
        assert!(b.try_restart(t0));
        assert!(b.try_restart(t0 + s));
        assert!(b.try_restart(t0 + 2 * s));
        assert!(!b.try_restart(t0 + 3 * s));
        assert_eq!(b.count(t0 + 3 * s), 3);
        assert!(b.try_restart(t0 + 900 * s));
        assert!(!b.try_restart(t0 + 900 * s));
        let mut z = RestartBudget::new(0, s);
        assert!(!z.try_restart(t0));
    }
}
