//! `alert_command`: like Pacemaker's alert agents, a command run on the transitions an
//! administrator must hear about (fence, self-fence, pause, resume, claim failure, VM
//! restart), with the facts in `HOLDFAST_ALERT_*` variables. It runs on its own thread
//! and is killed after `alert_timeout`, so a slow or hung script never blocks the agent.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The events that run the alert command.
pub const ALERT_KINDS: &[&str] = &[
    "fenced",
    "self-fence",
    "paused",
    "resumed",
    "pause-expired",
    "claim-failed",
    "vm-restart",
];

/// More alerts than this running at once are dropped (and logged): a storm of events
/// must not become a storm of processes.
const MAX_RUNNING: usize = 16;

/// One alert: what happened, as the event said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: String,
    pub group: String,
    pub reason: String,
    /// The node the event is about (the fenced peer); 0 = none.
    pub target_node_id: u16,
    pub target_node: String,
    pub epoch: Option<u64>,
    pub wall_ms: u64,
    /// The event's other fields, as JSON.
    pub extra: String,
}

/// Where alerts come from: this agent's node.
#[derive(Debug, Clone)]
pub struct AlertSource {
    pub cluster: String,
    pub node: String,
    pub node_id: u16,
}

/// RFC 3339 in UTC with milliseconds, from ms since the epoch.
pub fn rfc3339_ms(wall_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(wall_ms)).to_string()
}

/// The environment of the alert command (documented in README, "Cluster events and
/// alerts").
pub fn alert_env(src: &AlertSource, a: &Alert, sequence: u64) -> Vec<(String, String)> {
    let v = |k: &str, val: String| (format!("HOLDFAST_ALERT_{k}"), val);
    vec![
        v("KIND", a.kind.clone()),
        v("CLUSTER", src.cluster.clone()),
        v("NODE", src.node.clone()),
        v("NODE_ID", src.node_id.to_string()),
        v("GROUP", a.group.clone()),
        v("REASON", a.reason.clone()),
        v("TARGET_NODE", a.target_node.clone()),
        v(
            "TARGET_NODE_ID",
            match a.target_node_id {
                0 => String::new(),
                id => id.to_string(),
            },
        ),
        v("EPOCH", a.epoch.map(|e| e.to_string()).unwrap_or_default()),
        v("TIMESTAMP", rfc3339_ms(a.wall_ms)),
        v("TIMESTAMP_MS", a.wall_ms.to_string()),
        v("SEQUENCE", sequence.to_string()),
        v("EXTRA", a.extra.clone()),
    ]
}

/// Runs `alert_command` through `/bin/sh -c`.
pub struct Alerter {
    command: String,
    timeout: Duration,
    source: AlertSource,
    sequence: AtomicU64,
    running: Arc<AtomicUsize>,
}

impl Alerter {
    pub fn new(command: String, timeout: Duration, source: AlertSource) -> Alerter {
        Alerter {
            command,
            timeout,
            source,
            sequence: AtomicU64::new(0),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Start the command for `a` and return at once.
    pub fn fire(&self, a: Alert) {
        let seq = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        if self.running.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
            self.running.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                kind = a.kind,
                seq,
                "alert dropped: {MAX_RUNNING} alert commands still running"
            );
            return;
        }
        let env = alert_env(&self.source, &a, seq);
        let (cmd, timeout, running) = (self.command.clone(), self.timeout, self.running.clone());
        let spawned = std::thread::Builder::new()
            .name("alert".into())
            .spawn(move || {
                run(&cmd, env, timeout, &a.kind, seq);
                running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.running.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start a thread for the alert command");
        }
    }
}

/// Run the command to its end or until `timeout`, then kill it; log what went wrong.
fn run(cmd: &str, env: Vec<(String, String)>, timeout: Duration, kind: &str, seq: u64) {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .envs(env)
        .stdin(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(kind, seq, error = %e, "cannot run the alert command");
            return;
        }
    };
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return,
            Ok(Some(st)) => {
                tracing::warn!(kind, seq, status = %st, "the alert command failed");
                return;
            }
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(kind, seq, timeout = ?timeout, "the alert command timed out and was killed");
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!(kind, seq, error = %e, "cannot wait for the alert command");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> AlertSource {
        AlertSource {
            cluster: "lab".into(),
            node: "hv2".into(),
            node_id: 2,
        }
    }

    fn fence() -> Alert {
        Alert {
            kind: "fenced".into(),
            group: "web".into(),
            reason: "node 1 preempted and aborted on the quorum LUN".into(),
            target_node_id: 1,
            target_node: "hv1".into(),
            epoch: Some(4),
            wall_ms: 1_700_000_000_123,
            extra: "{}".into(),
        }
    }

    #[test]
    fn the_environment_names_every_documented_variable() {
        let env: std::collections::BTreeMap<_, _> =
            alert_env(&src(), &fence(), 9).into_iter().collect();
        let get = |k: &str| env.get(&format!("HOLDFAST_ALERT_{k}")).cloned();
        assert_eq!(get("KIND").as_deref(), Some("fenced"));
        assert_eq!(get("NODE").as_deref(), Some("hv2"));
        assert_eq!(get("TARGET_NODE").as_deref(), Some("hv1"));
        assert_eq!(get("TARGET_NODE_ID").as_deref(), Some("1"));
        assert_eq!(
            get("TIMESTAMP").as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(get("SEQUENCE").as_deref(), Some("9"));
        assert_eq!(get("EPOCH").as_deref(), Some("4"));
        let mut none = fence();
        none.target_node_id = 0;
        none.epoch = None;
        let env = alert_env(&src(), &none, 1);
        assert!(env.contains(&("HOLDFAST_ALERT_TARGET_NODE_ID".into(), String::new())));
        assert!(env.contains(&("HOLDFAST_ALERT_EPOCH".into(), String::new())));
    }

    #[test]
    fn a_hung_command_is_killed_at_its_timeout_and_the_caller_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!(
            "echo \"$HOLDFAST_ALERT_KIND\" > {}; exec sleep 30",
            out.display()
        );
        let a = Alerter::new(cmd, Duration::from_millis(300), src());
        let t0 = Instant::now();
        a.fire(fence());
        assert!(t0.elapsed() < Duration::from_millis(100), "fire blocked");
        let end = Instant::now() + Duration::from_secs(5);
        while a.running.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(a.running.load(Ordering::SeqCst), 0, "not killed");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "fenced\n");
    }
}
