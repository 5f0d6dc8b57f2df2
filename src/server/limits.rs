//! Resource limits of a running target: connection and session slots, the byte budget
//! for command buffers, and the CHAP failure lockout. One peer hitting a limit gets a
//! polite refusal; the others keep their share.

use super::config::LimitSettings;
use crate::iscsi::login::LoginStatus;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Who a session slot belongs to (names lower-cased: iSCSI names compare that way).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SlotOwner {
    initiator: String,
    isid: [u8; 6],
    /// None: a discovery session.
    target: Option<String>,
}

#[derive(Debug, Default)]
struct LiveSessions {
    next_id: u64,
    slots: HashMap<u64, SlotOwner>,
}

/// CHAP failures of one initiator name.
#[derive(Debug, Default, Clone)]
struct ChapRecord {
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// The limits and what currently counts against them.
#[derive(Debug)]
pub struct ResourceLimits {
    pub settings: LimitSettings,
    connections: Arc<AtomicU32>,
    sessions: Arc<Mutex<LiveSessions>>,
    buffers: Arc<Semaphore>,
    chap: Mutex<HashMap<String, ChapRecord>>,
}

/// One open TCP connection; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicU32>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One logged-in session; released on drop.
#[derive(Debug)]
pub struct SessionSlot {
    id: u64,
    live: Arc<Mutex<LiveSessions>>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        lock(&self.live).slots.remove(&self.id);
    }
}

/// Bytes of command buffer a task holds until it ends.
pub type BufferPermit = OwnedSemaphorePermit;

/// Lock, taking over the data of a holder that panicked: these maps stay consistent
/// between statements, and one failed task must not take the target down.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ResourceLimits {
    pub fn new(settings: LimitSettings) -> Self {
        let bytes = usize::try_from(settings.buffer_memory.0)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            settings,
            connections: Arc::new(AtomicU32::new(0)),
            sessions: Arc::new(Mutex::new(LiveSessions::default())),
            buffers: Arc::new(Semaphore::new(bytes)),
            chap: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for a newly accepted connection, or None when `max_connections` are open.
    pub fn connection(&self) -> Option<ConnectionSlot> {
        let max = self.settings.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.connections.clone()))
    }

    pub fn open_connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// A slot for a session about to enter the full feature phase. A login that
    /// reinstates a live session (same initiator port and target) does not count the
    /// session it replaces.
    pub fn session(
        &self,
        initiator: &str,
        isid: [u8; 6],
        target: Option<&str>,
    ) -> Result<SessionSlot, LoginStatus> {
        let owner = SlotOwner {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            target: target.map(str::to_ascii_lowercase),
        };
        let mut live = lock(&self.sessions);
        let others: Vec<&SlotOwner> = live.slots.values().filter(|o| **o != owner).collect();
        let s = &self.settings;
        let per_target = owner.target.as_ref().map_or(0, |t| {
            others
                .iter()
                .filter(|o| o.target.as_ref() == Some(t))
                .count()
        });
        let per_initiator = others
            .iter()
            .filter(|o| o.initiator == owner.initiator)
            .count();
        let refused = if others.len() >= s.max_sessions as usize {
            Some("max_sessions")
        } else if owner.target.is_some() && per_target >= s.max_connections_per_target as usize {
            Some("max_connections_per_target")
        } else if per_initiator >= s.max_connections_per_initiator as usize {
            Some("max_connections_per_initiator")
        } else {
            None
        };
        if let Some(limit) = refused {
            tracing::warn!(
                initiator,
                target = target.unwrap_or("(discovery)"),
                limit,
                "login refused: limit reached (OUT OF RESOURCES)"
            );
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        let id = live.next_id;
        live.next_id += 1;
        live.slots.insert(id, owner);
        Ok(SessionSlot {
            id,
            live: self.sessions.clone(),
        })
    }

    pub fn live_sessions(&self) -> usize {
        lock(&self.sessions).slots.len()
    }

    /// Buffer budget for a command moving `bytes`; None when it does not fit now.
    pub fn buffer(&self, bytes: u32) -> Option<BufferPermit> {
        if bytes == 0 {
            return self.buffers.clone().try_acquire_many_owned(0).ok();
        }
        self.buffers.clone().try_acquire_many_owned(bytes).ok()
    }

    /// Bytes of buffer budget not in use.
    pub fn buffer_available(&self) -> usize {
        self.buffers.available_permits()
    }

    /// Whether `initiator` is locked out after repeated CHAP failures at `now`.
    pub fn chap_locked(&self, initiator: &str, now: Instant) -> bool {
        let key = initiator.to_ascii_lowercase();
        let mut m = lock(&self.chap);
        let Some(r) = m.get_mut(&key) else {
            return false;
        };
        match r.locked_until {
            Some(t) if now < t => true,
            Some(_) => {
                // The lockout is over: start counting afresh.
                m.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Count one failed CHAP login; returns true when it started a lockout.
    pub fn chap_failed(&self, initiator: &str, now: Instant) -> bool {
        let s = &self.settings;
        let window = Duration::from_secs(s.chap_failure_window_secs);
        let mut m = lock(&self.chap);
        // Forget initiators whose failures are all old, so random names cannot grow the map.
        m.retain(|_, r| {
            r.locked_until.is_some_and(|t| now < t)
                || r.failures.iter().any(|f| now.duration_since(*f) < window)
        });
        let r = m.entry(initiator.to_ascii_lowercase()).or_default();
        r.failures.retain(|f| now.duration_since(*f) < window);
        r.failures.push(now);
        if r.locked_until.is_none() && r.failures.len() >= s.chap_max_failures as usize {
            r.locked_until = Some(now + Duration::from_secs(s.chap_lockout_secs));
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut LimitSettings)) -> ResourceLimits {
        let mut s = LimitSettings::default();
        f(&mut s);
        ResourceLimits::new(s)
    }

    #[test]
    fn connection_slots_are_counted_and_released() {
        let l = limits(|s| s.max_connections = 2);
        let a = l.connection().unwrap();
        let _b = l.connection().unwrap();
        assert!(l.connection().is_none());
        drop(a);
        assert!(l.connection().is_some());
    }

    #[test]
    fn session_limits_and_reinstatement() {
        let l = limits(|s| {
            s.max_connections_per_initiator = 2;
            s.max_connections_per_target = 3;
            s.max_sessions = 4;
        });
        let a = l.session("I1", [1; 6], Some("T")).unwrap();
        let _b = l.session("i1", [2; 6], Some("t")).unwrap();
        assert_eq!(
            l.session("I1", [3; 6], Some("T")).unwrap_err(),
            LoginStatus::OUT_OF_RESOURCES
        );
        // Reinstating [1;6] replaces the live session: not refused.
        let a2 = l.session("I1", [1; 6], Some("T")).unwrap();
        drop(a);
        drop(a2);
        let _c = l.session("I2", [1; 6], Some("T")).unwrap();
        let _d = l.session("I1", [3; 6], Some("T")).unwrap();
        // Target T is full (3), other targets are not; total is 4.
        assert!(l.session("I3", [1; 6], Some("T")).is_err());
        let _e = l.session("I3", [1; 6], None).unwrap();
        assert!(l.session("I4", [1; 6], Some("U")).is_err(), "max_sessions");
        assert_eq!(l.live_sessions(), 4);
    }

    #[test]
    fn buffer_budget() {
        let l = limits(|s| s.buffer_memory = super::super::config::ByteSize(1 << 20));
        let a = l.buffer(768 << 10).unwrap();
        assert!(l.buffer(512 << 10).is_none());
        drop(a);
        assert!(l.buffer(512 << 10).is_some());
    }

    #[test]
    fn chap_lockout() {
        let l = limits(|s| {
            s.chap_max_failures = 3;
            s.chap_failure_window_secs = 60;
            s.chap_lockout_secs = 30;
        });
        let t0 = Instant::now();
        assert!(!l.chap_failed("I", t0));
        // An old failure falls out of the window.
        assert!(!l.chap_failed("I", t0 + Duration::from_secs(61)));
        assert!(!l.chap_failed("I", t0 + Duration::from_secs(62)));
        assert!(!l.chap_locked("I", t0 + Duration::from_secs(62)));
        assert!(l.chap_failed("i", t0 + Duration::from_secs(63)));
        assert!(l.chap_locked("I", t0 + Duration::from_secs(64)));
        assert!(!l.chap_locked("other", t0 + Duration::from_secs(64)));
        assert!(!l.chap_locked("I", t0 + Duration::from_secs(94)));
        assert!(!l.chap_failed("I", t0 + Duration::from_secs(95)));
    }
}
