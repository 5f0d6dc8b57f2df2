//! Structured events of the agent: a tracing line each, a JSON line in the node's
//! rotating event log (STATE_DIR/events.jsonl, which tests, benchmarks and `holdfast
//! demo` read), an entry in the cluster-wide event ring on the quorum LUN (written by
//! [`ring_writer`]), and the `alert_command` for the transitions that need a person.

use crate::agent::alert::{Alert, AlertSource, Alerter, ALERT_KINDS};
use crate::agent::config::ValidNodeConfig;
use crate::agent::event_log::RotatingLog;
use crate::agent::event_ring::{RingEntry, Source};
use crate::agent::quorum_disk::QuorumDisk;
use crate::agent::ring_writer::{self, RingQueue};
use crate::agent::wall_ms;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The events the cluster-wide ring keeps (not the repeated ones, such as a failed
/// login every poll during an outage).
pub const RING_KINDS: &[&str] = &[
    "agent-start",
    "agent-stop",
    "claimed",
    "claim-failed",
    "fenced",
    "self-fence",
    "rejoin",
    "vm-started",
    "vm-restart",
    "vm-killed",
    "vm-kill-failed",
    "offline",
    "orphan-released",
    "paused",
    "resumed",
    "pause-expired",
    "migration-listening",
    "migration-completed",
    "migrated-in",
    "migration-failed",
    "migration-aborted",
    "migrated-out",
];

#[derive(Clone)]
pub struct Events {
    node: String,
    file: Option<Arc<Mutex<RotatingLog>>>,
    ring: Option<(u16, Arc<RingQueue>)>,
    alerter: Option<Arc<Alerter>>,
}

impl Events {
    /// A log at `path` (never rotated), no ring, no alerts: for tools and tests.
    pub fn open(node: &str, path: Option<PathBuf>) -> Events {
        Events {
            node: node.to_string(),
            file: path.and_then(|p| open_log(&p, 0, 0)),
            ring: None,
            alerter: None,
        }
    }

    /// An agent's events, as its configuration says: log, rotation, ring, alerts.
    pub fn for_node(cfg: &ValidNodeConfig) -> Events {
        let n = &cfg.config.node;
        let path = n
            .event_log
            .clone()
            .unwrap_or_else(|| n.state_dir.join("events.jsonl"));
        let alerter = n.alert_command.as_ref().map(|c| {
            Arc::new(Alerter::new(
                c.clone(),
                n.alert_timeout,
                AlertSource {
                    cluster: n.cluster.clone(),
                    node: n.name.clone(),
                    node_id: n.id,
                },
            ))
        });
        Events {
            node: n.name.clone(),
            file: open_log(&path, n.event_log_max_size.0, n.event_log_keep),
            ring: Some((n.id, Arc::new(RingQueue::default()))),
            alerter,
        }
    }

    /// Start writing this node's ring entries; `quorum` gives the LUN while connected.
    pub fn start_ring(
        &self,
        quorum: impl Fn() -> Option<QuorumDisk> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (id, q) = self.ring.clone()?;
        Some(tokio::spawn(ring_writer::run(q, id, quorum)))
    }

    /// Give queued ring entries up to `timeout` to reach the LUN (agent stop).
    pub async fn flush_ring(&self, timeout: Duration) {
        if let Some((_, q)) = &self.ring {
            q.flush(timeout).await;
        }
    }

    /// One transition: `event` names it, `group` (may be empty) what it concerns,
    /// `reason` why, `extra` any other fields.
    pub fn emit(&self, event: &str, group: &str, reason: &str, extra: serde_json::Value) {
        tracing::info!(event, group, reason, extra = %extra, "transition");
        crate::metrics::agent::on_event(event, &extra);
        let wall = wall_ms();
        let target = target_node(event, &extra);
        let epoch = extra.get("epoch").and_then(|v| v.as_u64());
        if let Some((id, q)) = &self.ring {
            if RING_KINDS.contains(&event) {
                q.push(RingEntry {
                    node_id: *id,
                    seq: 0,
                    wall_ms: wall,
                    source: Source::Agent,
                    kind: event.into(),
                    group: group.into(),
                    reason: reason.into(),
                    target_node: target,
                    epoch: epoch.unwrap_or(0),
                    actor: String::new(),
                });
            }
        }
        if let Some(a) = &self.alerter {
            if ALERT_KINDS.contains(&event) {
                a.fire(Alert {
                    kind: event.into(),
                    group: group.into(),
                    reason: reason.into(),
                    target_node_id: target,
                    target_node: self.name_of(target),
                    epoch,
                    wall_ms: wall,
                    extra: extra.to_string(),
                });
            }
        }
        self.log(wall, event, group, reason, extra);
    }

    /// The name of node `id` as its heartbeat slot says ("node{id}" until read).
    fn name_of(&self, id: u16) -> String {
        if id == 0 {
            return String::new();
        }
        self.ring
            .as_ref()
            .and_then(|(_, q)| q.name_of(id))
            .unwrap_or_else(|| format!("node{id}"))
    }

    fn log(&self, wall: u64, event: &str, group: &str, reason: &str, extra: serde_json::Value) {
        let Some(f) = &self.file else { return };
        let mut v = serde_json::json!({
            "wall_ms": wall,
            "mono_ns": mono_ns(),
            "node": self.node,
            "event": event,
            "group": group,
            "reason": reason,
        });
        if let (Some(o), serde_json::Value::Object(x)) = (v.as_object_mut(), extra) {
            o.extend(x);
        }
        // One write per line: several agents may share the file.
        let line = format!("{v}\n");
        if let Ok(mut f) = f.lock() {
            if let Err(e) = f.write_line(&line) {
                tracing::warn!(error = %e, "cannot write the event log");
            }
        }
    }
}

fn open_log(p: &std::path::Path, max: u64, keep: u32) -> Option<Arc<Mutex<RotatingLog>>> {
    RotatingLog::open(p, max, keep)
        .map_err(|e| tracing::warn!(path = %p.display(), error = %e, "cannot open the event log"))
        .ok()
        .map(|l| Arc::new(Mutex::new(l)))
}

/// The node an event is about: the fenced peer of `fenced`.
fn target_node(event: &str, extra: &serde_json::Value) -> u16 {
    let id = |k: &str| extra.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let v = match event {
        "fenced" => id("node_id"),
        _ => id("target_node"),
    };
    u16::try_from(v).unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, which
/// is what the failover benchmark needs.
pub fn mono_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make a duration look long.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}
