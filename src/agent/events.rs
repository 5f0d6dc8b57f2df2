//! Structured events of the agent: what tests, benchmarks and `holdfast demo` read.

use crate::agent::wall_ms;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Structured events: a tracing line each, and a JSON line in STATE_DIR/events.jsonl
/// that tests, benchmarks and `holdfast demo` read.
#[derive(Clone)]
pub struct Events {
    node: String,
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl Events {
    pub fn open(node: &str, path: Option<PathBuf>) -> Events {
        let file = path.and_then(|p| {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| tracing::warn!(path = %p.display(), error = %e, "cannot open the event log"))
                .ok()
        });
        Events {
            node: node.to_string(),
            file: file.map(|f| Arc::new(Mutex::new(f))),
        }
    }

    /// One transition: `event` names it, `group` (may be empty) what it concerns,
    /// `reason` why, `extra` any other fields.
    pub fn emit(&self, event: &str, group: &str, reason: &str, extra: serde_json::Value) {
        tracing::info!(event, group, reason, extra = %extra, "transition");
        crate::metrics::agent::on_event(event, &extra);
        if let Some(f) = &self.file {
            let mut v = serde_json::json!({
                "wall_ms": wall_ms(),
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
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, which
/// is what the failover benchmark needs.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
