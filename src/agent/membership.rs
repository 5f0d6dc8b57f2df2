//! Liveness of peers, judged from their heartbeat counters on this node's own monotonic
//! clock: a peer is dead when its counter has not moved for `dead_after` of *observed*
//! time. Time is passed in, never read here, so the tests are exact.

use crate::agent::quorum::{HeartbeatSlot, NodeState};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What this node believes about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Never seen heartbeating since this node started watching.
    Unknown,
    Alive,
    /// Stopped cleanly (its slot says so); owns nothing.
    Left,
    /// Heartbeat stalled for `dead_after`: to be fenced.
    Dead,
}

impl Liveness {
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Unknown => "unknown",
            Liveness::Alive => "alive",
            Liveness::Left => "left",
            Liveness::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    incarnation: u64,
    counter: u64,
    state: NodeState,
    /// When the counter (or incarnation) last changed, on our clock.
    changed_at: Instant,
}

/// Liveness of every peer, fed with each successful read of the heartbeat slots.
#[derive(Debug, Clone)]
pub struct Membership {
    dead_after: Duration,
    peers: BTreeMap<u16, Seen>,
    /// When the observer started watching: a slot that does not move for `dead_after`
    /// after that is dead too.
    started: Option<Instant>,
    /// The last successful observation; liveness is only judged on fresh reads.
    last_read: Option<Instant>,
}

impl Membership {
    pub fn new(dead_after: Duration) -> Membership {
        Membership {
            dead_after,
            peers: BTreeMap::new(),
            started: None,
            last_read: None,
        }
    }

    /// Record one successful read of the slots at `now`.
    pub fn observe<'a>(
        &mut self,
        now: Instant,
        slots: impl IntoIterator<Item = &'a HeartbeatSlot>,
    ) {
        // A gap in our own reads (we were cut off) must not count against the peers:
        // shift every clock by the time we could not look.
        if let Some(last) = self.last_read {
            let gap = now.saturating_duration_since(last);
            if gap > self.dead_after / 2 {
                let credit = gap;
                for s in self.peers.values_mut() {
                    s.changed_at = (s.changed_at + credit).min(now);
                }
                if let Some(st) = &mut self.started {
                    *st = (*st + credit).min(now);
                }
            }
        }
        self.started.get_or_insert(now);
        self.last_read = Some(now);
        for slot in slots {
            match self.peers.get_mut(&slot.node_id) {
                Some(s) if s.incarnation == slot.incarnation && s.counter == slot.counter => {
                    s.state = slot.state;
                }
                Some(s) => {
                    *s = Seen {
                        incarnation: slot.incarnation,
                        counter: slot.counter,
                        state: slot.state,
                        changed_at: now,
                    };
                }
                None => {
                    self.peers.insert(
                        slot.node_id,
                        Seen {
                            incarnation: slot.incarnation,
                            counter: slot.counter,
                            state: slot.state,
                            changed_at: now,
                        },
                    );
                }
            }
        }
    }

    pub fn liveness(&self, id: u16, now: Instant) -> Liveness {
        let Some(s) = self.peers.get(&id) else {
            return Liveness::Unknown;
        };
        if s.state == NodeState::Left {
            return Liveness::Left;
        }
        if now.saturating_duration_since(s.changed_at) >= self.dead_after {
            Liveness::Dead
        } else {
            Liveness::Alive
        }
    }

    pub fn is_alive(&self, id: u16, now: Instant) -> bool {
        self.liveness(id, now) == Liveness::Alive
    }

    /// The incarnation last seen in `id`'s slot.
    pub fn incarnation(&self, id: u16) -> Option<u64> {
        self.peers.get(&id).map(|s| s.incarnation)
    }

    /// How long `id`'s counter has been still, on our clock.
    pub fn silent_for(&self, id: u16, now: Instant) -> Option<Duration> {
        self.peers
            .get(&id)
            .map(|s| now.saturating_duration_since(s.changed_at))
    }

    /// Whether a fresh read happened within `fresh` of `now`.
    pub fn is_fresh(&self, now: Instant, fresh: Duration) -> bool {
        self.last_read
            .is_some_and(|t| now.saturating_duration_since(t) <= fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u16, inc: u64, counter: u64) -> HeartbeatSlot {
        HeartbeatSlot {
            node_id: id,
            name: format!("n{id}"),
            incarnation: inc,
            counter,
            state: NodeState::Active,
            wall_ms: 0,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_still_counter_is_dead_after_dead_after() {
        let t0 = Instant::now();
        let mut m = Membership::new(3000 * MS);
        m.observe(t0, &[slot(2, 1, 10)]);
        assert_eq!(m.liveness(2, t0), Liveness::Alive);
        assert_eq!(m.liveness(3, t0), Liveness::Unknown);
        for i in 1..=14u32 {
            m.observe(t0 + i * 200 * MS, &[slot(2, 1, 10)]);
        }
        assert_eq!(m.liveness(2, t0 + 2800 * MS), Liveness::Alive);
        m.observe(t0 + 3000 * MS, &[slot(2, 1, 10)]);
        assert_eq!(m.liveness(2, t0 + 3000 * MS), Liveness::Dead);
        // It comes back: alive again at once.
        m.observe(t0 + 3200 * MS, &[slot(2, 1, 11)]);
        assert_eq!(m.liveness(2, t0 + 3200 * MS), Liveness::Alive);
    }

    #[test]
    fn a_moving_counter_stays_alive() {
        let t0 = Instant::now();
        let mut m = Membership::new(3000 * MS);
        for i in 0..100u32 {
            let now = t0 + i * 200 * MS;
            m.observe(now, &[slot(2, 1, u64::from(i / 3))]);
            assert_eq!(m.liveness(2, now), Liveness::Alive, "at {i}");
        }
    }

    #[test]
    fn our_own_blackout_does_not_kill_peers() {
        let t0 = Instant::now();
        let mut m = Membership::new(3000 * MS);
        m.observe(t0, &[slot(2, 1, 10)]);
        m.observe(t0 + 200 * MS, &[slot(2, 1, 11)]);
        // We could not read for 5 s; the peer's counter is unchanged at our next read.
        let back = t0 + 5200 * MS;
        m.observe(back, &[slot(2, 1, 11)]);
        assert_eq!(m.liveness(2, back), Liveness::Alive);
        // But it must move within dead_after of our return.
        for i in 1..=15u32 {
            m.observe(back + i * 200 * MS, &[slot(2, 1, 11)]);
        }
        assert_eq!(m.liveness(2, back + 3000 * MS), Liveness::Dead);
    }

    #[test]
    fn left_and_new_incarnations() {
        let t0 = Instant::now();
        let mut m = Membership::new(3000 * MS);
        let mut s = slot(2, 1, 10);
        s.state = NodeState::Left;
        m.observe(t0, &[s]);
        assert_eq!(m.liveness(2, t0), Liveness::Left);
        m.observe(t0 + 100 * MS, &[slot(2, 2, 0)]);
        assert_eq!(m.liveness(2, t0 + 100 * MS), Liveness::Alive);
        assert_eq!(m.incarnation(2), Some(2));
    }
}
