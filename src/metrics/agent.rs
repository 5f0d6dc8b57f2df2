//! The agent's series: heartbeat age, peers, group states, and counts and durations
//! of what it did (fences, self-fences, pauses, resumes, VM restarts, claims,
//! failovers). One agent per process, so one set, installed when `--metrics` (or the
//! `metrics` key) asks for it; every hook is a no-op otherwise.

use super::histogram::{DurationHistogram, FAILOVER_BOUNDS_NS};
use super::http::Format;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupStateLabels {
    group: String,
    state: String,
}

/// Age of this node's last successful heartbeat write (None: none yet).
pub type HeartbeatAge = Box<dyn Fn() -> Option<Duration> + Send + Sync>;

/// A gauge family with one series per (group, state): 1 for the group's state now, 0
/// for the states it had before.
#[derive(Debug, Default)]
struct StateSet {
    family: Family<GroupStateLabels, Gauge>,
    now: Mutex<BTreeMap<String, String>>,
}

impl StateSet {
    fn set(&self, group: &str, state: &str) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        if now.get(group).map(String::as_str) == Some(state) {
            return;
        }
        let labels = |state: &str| GroupStateLabels {
            group: group.to_string(),
            state: state.to_string(),
        };
        if let Some(old) = now.insert(group.to_string(), state.to_string()) {
            self.family.get_or_create(&labels(&old)).set(0);
        }
        self.family.get_or_create(&labels(state)).set(1);
    }
}

/// Every series of the agent.
pub struct AgentMetrics {
    registry: Registry,
    events: Family<EventLabel, Counter>,
    fences: Counter,
    self_fences: Counter,
    pauses: Counter,
    resumes: Counter,
    vm_restarts: Counter,
    claim: DurationHistogram,
    failover: DurationHistogram,
    peers_alive: Gauge,
    peers_dead: Gauge,
    group_state: StateSet,
    group_local: StateSet,
    group_owner: Family<GroupLabel, Gauge>,
    heartbeat_age: Gauge<f64, AtomicU64>,
    heartbeat: Mutex<Option<HeartbeatAge>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

static INSTALLED: OnceLock<AgentMetrics> = OnceLock::new();

/// Turn the agent's metrics on (once per process) and return them.
pub fn install() -> &'static AgentMetrics {
    INSTALLED.get_or_init(AgentMetrics::new)
}

/// The agent's metrics, if turned on.
pub fn get() -> Option<&'static AgentMetrics> {
    INSTALLED.get()
}

/// The hook in `Events::emit`: count `event`, and take the claim time from a
/// `vm-started` that followed a claim.
pub fn on_event(event: &str, extra: &serde_json::Value) {
    if let Some(m) = get() {
        m.event(event, extra);
    }
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let mut m = AgentMetrics {
            registry: Registry::default(),
            events: Family::default(),
            fences: Counter::default(),
            self_fences: Counter::default(),
            pauses: Counter::default(),
            resumes: Counter::default(),
            vm_restarts: Counter::default(),
            claim: DurationHistogram::new(FAILOVER_BOUNDS_NS),
            failover: DurationHistogram::new(FAILOVER_BOUNDS_NS),
            peers_alive: Gauge::default(),
            peers_dead: Gauge::default(),
            group_state: StateSet::default(),
            group_local: StateSet::default(),
            group_owner: Family::default(),
            heartbeat_age: Gauge::default(),
            heartbeat: Mutex::new(None),
        };
        m.register_counts();
        m.register_state();
        m
    }

    fn register_counts(&mut self) {
        let r = &mut self.registry;
        r.register(
            "holdfast_agent_events",
            "Agent events, by name",
            self.events.clone(),
        );
        let counters = [
            (
                "holdfast_agent_fences",
                "Dead peers this node fenced (PREEMPT AND ABORT)",
                &self.fences,
            ),
            (
                "holdfast_agent_self_fences",
                "Times this node fenced itself",
                &self.self_fences,
            ),
            (
                "holdfast_agent_pauses",
                "VMs paused through a storage outage",
                &self.pauses,
            ),
            (
                "holdfast_agent_resumes",
                "Paused VMs resumed as the owner",
                &self.resumes,
            ),
            (
                "holdfast_agent_vm_restarts",
                "VMs restarted in place after a failure",
                &self.vm_restarts,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        r.register_with_unit(
            "holdfast_agent_claim_duration",
            "Claims: record, fence and disks claimed and read back, until the VM start",
            Unit::Seconds,
            self.claim.clone(),
        );
        r.register_with_unit(
            "holdfast_agent_failover_duration",
            "Failovers: the dead owner's last heartbeat seen until the VM runs here",
            Unit::Seconds,
            self.failover.clone(),
        );
    }

    fn register_state(&mut self) {
        let r = &mut self.registry;
        r.register_with_unit(
            "holdfast_agent_heartbeat_age",
            "Time since this node's last successful heartbeat write (+Inf: none yet)",
            Unit::Seconds,
            self.heartbeat_age.clone(),
        );
        r.register(
            "holdfast_agent_peers_alive",
            "Peers whose heartbeat moves",
            self.peers_alive.clone(),
        );
        r.register(
            "holdfast_agent_peers_dead",
            "Peers judged dead (heartbeat still for dead_after)",
            self.peers_dead.clone(),
        );
        r.register(
            "holdfast_agent_group_state",
            "A group's state in its quorum record (1: current)",
            self.group_state.family.clone(),
        );
        r.register(
            "holdfast_agent_group_local_state",
            "A group's state on this node: idle, busy, running, paused (1: current)",
            self.group_local.family.clone(),
        );
        r.register(
            "holdfast_agent_group_owner",
            "Node id of a group's owner (0: nobody)",
            self.group_owner.clone(),
        );
    }

    fn event(&self, event: &str, extra: &serde_json::Value) {
        let label = EventLabel {
            event: event.to_string(),
        };
        self.events.get_or_create(&label).inc();
        let counter = match event {
            "fenced" => &self.fences,
            "self-fence" => &self.self_fences,
            "paused" => &self.pauses,
            "resumed" => &self.resumes,
            "vm-restart" => &self.vm_restarts,
            "vm-started" => {
                if let Some(ms) = extra.get("claim_ms").and_then(serde_json::Value::as_f64) {
                    self.claim
                        .observe(Duration::from_secs_f64(ms.max(0.0) / 1e3));
                }
                return;
            }
            _ => return,
        };
        counter.inc();
    }

    /// Where the heartbeat age is read at each scrape.
    pub fn watch_heartbeat(&self, age: HeartbeatAge) {
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Some(age);
    }

    /// A failover ended here: `took` from the dead owner's last heartbeat seen.
    pub fn failover(&self, took: Duration) {
        self.failover.observe(took);
    }

    pub fn peers(&self, alive: usize, dead: usize) {
        self.peers_alive.set(alive as i64);
        self.peers_dead.set(dead as i64);
    }

    /// A group as its quorum record says: `state` and `owner` (0: nobody).
    pub fn group_record(&self, group: &str, state: &str, owner: u16) {
        self.group_state.set(group, state);
        let label = GroupLabel {
            group: group.to_string(),
        };
        self.group_owner.get_or_create(&label).set(i64::from(owner));
    }

    /// A group's state on this node.
    pub fn group_local(&self, group: &str, state: &str) {
        self.group_local.set(group, state);
    }

    /// Claims and failovers observed so far (tests).
    pub fn counts(&self) -> (u64, u64) {
        (self.claim.count(), self.failover.count())
    }

    pub fn render(&self, format: Format) -> String {
        let age = {
            let h = self.heartbeat.lock().unwrap_or_else(|p| p.into_inner());
            h.as_ref().and_then(|f| f())
        };
        self.heartbeat_age
            .set(age.map_or(f64::INFINITY, |a| a.as_secs_f64()));
        super::encode(&self.registry, format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_count_and_states_switch() {
        let m = AgentMetrics::new();
        m.event("fenced", &serde_json::json!({}));
        m.event("vm-started", &serde_json::json!({"claim_ms": 250.0}));
        m.event("vm-started", &serde_json::json!({}));
        m.group_record("web", "starting", 2);
        m.group_record("web", "running", 2);
        m.watch_heartbeat(Box::new(|| Some(Duration::from_millis(1500))));
        let text = m.render(Format::Prometheus);
        for want in [
            "holdfast_agent_fences_total 1",
            r#"holdfast_agent_events_total{event="vm-started"} 2"#,
            "holdfast_agent_claim_duration_seconds_count 1",
            r#"holdfast_agent_group_state{group="web",state="running"} 1"#,
            r#"holdfast_agent_group_state{group="web",state="starting"} 0"#,
            r#"holdfast_agent_group_owner{group="web"} 2"#,
            "holdfast_agent_heartbeat_age_seconds 1.5",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
