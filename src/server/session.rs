//! Session registry: TSIH allocation and session reinstatement (RFC 7143 §6.3.5): a new
//! login with the ISID of a live session of the same initiator and target replaces it.

use crate::scsi::{AbortedTask, ItNexus, LogicalUnit, NexusId, TaskKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::watch;

/// Identity of a session: initiator port (name + ISID) and target port (name + TPGT).
/// The same ISID through another portal group is another session (RFC 7143 §4.4.3: the
/// session id is ISID + TPGT), so it must not reinstate this one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: String,
    pub tpgt: u16,
}

impl SessionKey {
    pub fn new(initiator: &str, isid: [u8; 6], target: &str, tpgt: u16) -> Self {
        // iSCSI names compare case-insensitively (they are normalised to lower case).
        Self {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            target: target.to_ascii_lowercase(),
            tpgt,
        }
    }
}

/// Handle on a live session, used to stop it and wait until it is gone.
#[derive(Debug)]
pub struct SessionHandle {
    pub tsih: u16,
    stop_tx: watch::Sender<bool>,
    done_rx: watch::Receiver<bool>,
}

/// The session's own end of its handle.
#[derive(Debug)]
pub struct SessionControl {
    pub stop_rx: watch::Receiver<bool>,
    done_tx: watch::Sender<bool>,
}

impl SessionControl {
    /// Tell waiters the session has fully ended (its tasks are finished).
    pub fn finished(&self) {
        let _ = self.done_tx.send(true);
    }
}

impl Drop for SessionControl {
    fn drop(&mut self) {
        let _ = self.done_tx.send(true);
    }
}

impl SessionHandle {
    /// Ask the session to end and wait until it has.
    pub async fn terminate(&self) {
        let _ = self.stop_tx.send(true);
        let mut rx = self.done_rx.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[derive(Debug, Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<SessionKey, Arc<SessionHandle>>>,
    next_tsih: AtomicU16,
}

impl SessionRegistry {
    pub fn new() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
        }
    }

    /// A fresh non-zero TSIH not used by a live session.
    pub fn allocate_tsih(&self) -> u16 {
        let live: Vec<u16> = self.lock().values().map(|h| h.tsih).collect();
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 && !live.contains(&t) {
                return t;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Arc<SessionHandle>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Does a live session of (initiator, ISID) carry this TSIH?
    pub fn has_tsih(&self, initiator: &str, isid: [u8; 6], tsih: u16) -> bool {
        let init = initiator.to_ascii_lowercase();
        self.lock()
            .iter()
            .any(|(k, h)| k.initiator == init && k.isid == isid && h.tsih == tsih)
    }

    /// Register a new session; returns the previous session with the same key (to be
    /// terminated: reinstatement) and the control end for the new one.
    pub fn register(
        &self,
        key: SessionKey,
        tsih: u16,
    ) -> (
        Option<Arc<SessionHandle>>,
        SessionControl,
        Arc<SessionHandle>,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let handle = Arc::new(SessionHandle {
            tsih,
            stop_tx,
            done_rx,
        });
        let old = self.lock().insert(key, handle.clone());
        (old, SessionControl { stop_rx, done_tx }, handle)
    }

    /// Remove a session if the registry still maps its key to this handle.
    pub fn unregister(&self, key: &SessionKey, handle: &Arc<SessionHandle>) {
        let mut m = self.lock();
        if m.get(key).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            m.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live session (for shutdown).
    pub fn all(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reinstatement_returns_the_old_session_and_terminate_waits() {
        let reg = SessionRegistry::new();
        let key = SessionKey::new("iqn.2026-11.x:I", [1; 6], "iqn.2026-11.x:T", 1);
        let t1 = reg.allocate_tsih();
        let (old, mut ctl1, h1) = reg.register(key.clone(), t1);
        assert!(old.is_none());
        assert!(reg.has_tsih("IQN.2026-11.X:i", [1; 6], t1));
        let t2 = reg.allocate_tsih();
        assert_ne!(t1, t2);
        let (old, _ctl2, h2) = reg.register(key.clone(), t2);
        let old = old.expect("same key replaces");
        assert!(Arc::ptr_eq(&old, &h1));
        let waiter = tokio::spawn(async move { old.terminate().await });
        ctl1.stop_rx.changed().await.unwrap();
        assert!(*ctl1.stop_rx.borrow());
        ctl1.finished();
        waiter.await.unwrap();
        // the old session unregistering must not remove the new one
        reg.unregister(&key, &h1);
        assert_eq!(reg.len(), 1);
        reg.unregister(&key, &h2);
        assert!(reg.is_empty());
    }

    #[test]
    fn same_isid_in_another_portal_group_is_another_session() {
        let reg = SessionRegistry::new();
        let k1 = SessionKey::new("iqn.2026-11.x:i", [1; 6], "iqn.2026-11.x:t", 1);
        let k2 = SessionKey::new("iqn.2026-11.x:i", [1; 6], "iqn.2026-11.x:t", 2);
        let (old, _c1, _h1) = reg.register(k1, reg.allocate_tsih());
        assert!(old.is_none());
        let (old, _c2, _h2) = reg.register(k2, reg.allocate_tsih());
        assert!(old.is_none(), "no reinstatement across portal groups");
        assert_eq!(reg.len(), 2);
    }
}

/// One session's tasks as other sessions and the LU task sets reach them (the
/// connection's task table).
pub trait TaskAborter: Send + Sync {
    /// PREEMPT AND ABORT: abort every task of this session on `lun` (queued ones never
    /// start, running ones finish without a response).
    fn abort_lun(self: Arc<Self>, lun: u64);
    /// Another nexus's task management function aborted these tasks on `lu`.
    fn abort_tasks(self: Arc<Self>, lu: &Arc<LogicalUnit>, tasks: &[AbortedTask]);
    /// `lu`'s task set started this task of this session (another nexus's task ended).
    fn start_task(self: Arc<Self>, lu: &Arc<LogicalUnit>, key: TaskKey);
}

type Live = HashMap<ItNexus, (NexusId, Weak<dyn TaskAborter>)>;

/// Live I_T nexuses: PREEMPT AND ABORT names victims by nexus (SPC-4 5.13.11.2.4), the
/// LU task sets by [`NexusId`].
#[derive(Default)]
pub struct NexusDirectory {
    live: Mutex<Live>,
    by_id: Mutex<HashMap<NexusId, Weak<dyn TaskAborter>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for NexusDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NexusDirectory").finish_non_exhaustive()
    }
}

impl NexusDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashMap<NexusId, Weak<dyn TaskAborter>>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id for a nexus that is logging in (never reused, so a reinstated session
    /// is a new nexus to the task sets).
    pub fn allocate_id(&self) -> NexusId {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, nexus: ItNexus, id: NexusId, aborter: Weak<dyn TaskAborter>) {
        self.ids().insert(id, aborter.clone());
        self.lock().insert(nexus, (id, aborter));
    }

    pub fn remove(&self, nexus: &ItNexus, id: NexusId) {
        self.ids().remove(&id);
        let mut live = self.lock();
        if live.get(nexus).is_some_and(|(i, _)| *i == id) {
            live.remove(nexus);
        }
    }

    /// The live session of nexus `id`.
    pub fn get(&self, id: NexusId) -> Option<Arc<dyn TaskAborter>> {
        self.ids().get(&id)?.upgrade()
    }

    /// Abort the tasks of `victims` on `lun`.
    pub fn abort(&self, victims: &[ItNexus], lun: u64) {
        let found: Vec<Arc<dyn TaskAborter>> = self
            .lock()
            .iter()
            .filter(|(n, _)| victims.contains(n))
            .filter_map(|(_, (_, w))| w.upgrade())
            .collect();
        for a in found {
            a.abort_lun(lun);
        }
    }
}
