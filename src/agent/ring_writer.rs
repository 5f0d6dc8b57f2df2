//! The agent's writer of its own sub-ring of the event ring. `Events::emit` only queues
//! an entry (no I/O, never blocks); this task appends queued entries one at a time,
//! each a single-block COMPARE AND WRITE bounded by the I/O timeout. It never holds
//! anything the heartbeat task needs, and has at most one command outstanding, so a
//! heartbeat waits behind at most one small command on the session, never behind the
//! ring. While the quorum LUN cannot be written (an outage, a fence before rejoining)
//! entries wait in the queue, keeping their own wall time, and are written after.

use crate::agent::event_ring::{RingEntry, SubRing};
use crate::agent::quorum::{HeartbeatSlot, QuorumLayout};
use crate::agent::quorum_disk::{CawOutcome, QuorumDisk};
use crate::agent::{ring_io, AgentError};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Entries kept while the LUN cannot be written; older ones are dropped beyond that.
const QUEUE_MAX: usize = 256;
/// How often peers' names (for alerts) are read again from the heartbeat slots.
const NAMES_EVERY: Duration = Duration::from_secs(5);

/// What `emit` shares with the writer task.
#[derive(Default)]
pub struct RingQueue {
    queue: Mutex<VecDeque<RingEntry>>,
    notify: Notify,
    /// Node names by id, from the heartbeat slots (alerts name the fenced peer).
    names: Mutex<BTreeMap<u16, String>>,
}

impl RingQueue {
    pub fn push(&self, e: RingEntry) {
        if let Ok(mut q) = self.queue.lock() {
            if q.len() >= QUEUE_MAX {
                q.pop_front();
                tracing::warn!("event ring queue full: the oldest unwritten entry is dropped");
            }
            q.push_back(e);
        }
        self.notify.notify_one();
    }

    fn front(&self) -> Option<RingEntry> {
        self.queue.lock().ok()?.front().cloned()
    }

    fn pop(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.pop_front();
        }
    }

    fn clear(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.clear();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    pub fn name_of(&self, id: u16) -> Option<String> {
        self.names.lock().ok()?.get(&id).cloned()
    }

    /// Wait until the queue is written out, at most `timeout` (agent stop).
    pub async fn flush(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.is_empty() && Instant::now() < end {
            self.notify.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Run the writer of node `id`'s sub-ring; `quorum` gives the LUN while connected.
pub async fn run(
    queue: Arc<RingQueue>,
    id: u16,
    quorum: impl Fn() -> Option<QuorumDisk> + Send + 'static,
) {
    let mut ring: Option<SubRing> = None;
    let mut room: Option<bool> = None;
    let mut names_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = queue.notify.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(q) = quorum() else {
            ring = None;
            continue;
        };
        if names_at.is_none_or(|t| t.elapsed() >= NAMES_EVERY) && read_names(&q, &queue).await {
            names_at = Some(Instant::now());
        }
        if room.is_none() {
            room = match ring_io::check_room(&q).await {
                Ok(()) => Some(true),
                Err(e @ AgentError::Other(_)) => {
                    tracing::warn!(error = %e, "cluster events are not written to the quorum LUN");
                    Some(false)
                }
                Err(_) => None,
            };
        }
        if room == Some(false) {
            queue.clear();
            continue;
        }
        if room == Some(true) {
            if let Err(e) = drain(&q, id, &queue, &mut ring).await {
                tracing::debug!(error = %e, "event ring write failed; will retry");
                ring = None;
            }
        }
    }
}

/// Write queued entries in order until the queue is empty or a write fails.
async fn drain(
    q: &QuorumDisk,
    id: u16,
    queue: &RingQueue,
    ring: &mut Option<SubRing>,
) -> Result<(), AgentError> {
    while let Some(e) = queue.front() {
        let r = match ring {
            Some(r) => r,
            None => ring.insert(ring_io::read_sub_ring(q, id).await?),
        };
        match ring_io::append(q, r, e).await? {
            CawOutcome::Written => queue.pop(),
            // `ctl` of this node appended meanwhile: read again, retry.
            CawOutcome::Miscompare => *ring = None,
        }
    }
    Ok(())
}

/// Node names from the heartbeat slots; `false` if they could not be read.
async fn read_names(q: &QuorumDisk, queue: &RingQueue) -> bool {
    let max = crate::agent::config::MAX_NODE_ID;
    let Ok(all) = q
        .read_blocks(QuorumLayout::slot_lba(1), u32::from(max))
        .await
    else {
        return false;
    };
    let mut names = BTreeMap::new();
    for id in 1..=max {
        let lba = QuorumLayout::slot_lba(id);
        let start = usize::from(id - 1) * q.layout.block_size as usize;
        let Some(b) = all.get(start..start + q.layout.block_size as usize) else {
            break;
        };
        if let Ok(Some(s)) = HeartbeatSlot::decode(b, lba) {
            names.insert(id, s.name);
        }
    }
    if let Ok(mut n) = queue.names.lock() {
        *n = names;
    }
    true
}
