//! Live migration over QMP, as free functions over a QEMU's monitor socket, so that any
//! QEMU-based driver can use them.
//!
//! Destination: QEMU started with `-incoming defer -S` (paused, waiting), then
//! [`listen`] (`migrate-incoming`, and the address QEMU actually bound), [`wait_incoming`]
//! until the state has arrived, and [`cont`] once the agent has taken the disks over.
//! Source: [`migrate`] (`migrate`, then `query-migrate` until it ends; `migrate_cancel`
//! on timeout) and, when the hand-over does not happen after all, [`cont`] again.

use super::qmp::{self, Qmp, QmpError};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a migration's progress is asked for.
const POLL: Duration = Duration::from_millis(20);

/// Bandwidth cap for the transfer when the VM's config sets none, bytes per second.
/// QEMU's default (32 MiB/s) would make even a small guest take seconds.
pub const DEFAULT_BANDWIDTH: u64 = 1 << 30;

/// What QEMU reports about a completed migration (source side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationStats {
    /// The guest stood still this long (the last pass and the switch of devices).
    pub downtime: Duration,
    /// From `migrate` to completion.
    pub total: Duration,
    /// Bytes of RAM sent.
    pub transferred: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("QMP {path}: {source}")]
    Qmp { path: String, source: QmpError },
    #[error("migration {0}")]
    Failed(String),
    #[error("migration did not complete within {0:?}")]
    Timeout(Duration),
}

fn qmp_err(path: &Path) -> impl Fn(QmpError) -> MigrationError + '_ {
    move |source| MigrationError::Qmp {
        path: path.display().to_string(),
        source,
    }
}

/// Destination: listen for the incoming migration on `host` (a port QEMU picks) and
/// return the `host:port` it bound.
pub fn listen(path: &Path, host: &str, timeout: Duration) -> Result<String, MigrationError> {
    // Just started: its socket may not be there yet.
    let mut q = Qmp::connect_when_up(path, timeout, timeout, || true).map_err(qmp_err(path))?;
    let uri = if host.contains(':') {
        format!("tcp:[{host}]:0")
    } else {
        format!("tcp:{host}:0")
    };
    q.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .map_err(qmp_err(path))?;
    let info = q.execute("query-migrate", None).map_err(qmp_err(path))?;
    bound_address(&info)
        .ok_or_else(|| MigrationError::Failed(format!("QEMU reports no listening address: {info}")))
}

/// `host:port` from `query-migrate`'s `socket-address` on a listening destination.
pub fn bound_address(info: &Value) -> Option<String> {
    let a = info.get("socket-address")?.as_array()?.first()?;
    if a.get("type")?.as_str()? != "inet" {
        return None;
    }
    let host = a.get("host")?.as_str()?;
    let port = a.get("port")?.as_str()?;
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Source: migrate to `addr` (host:port) at up to `bandwidth` bytes per second and
/// follow it to its end. On timeout the migration is cancelled (the guest keeps running
/// here).
pub fn migrate(
    path: &Path,
    addr: &str,
    bandwidth: u64,
    timeout: Duration,
) -> Result<MigrationStats, MigrationError> {
    let e = qmp_err(path);
    let mut q = Qmp::connect(path, timeout.min(Duration::from_secs(10))).map_err(&e)?;
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": bandwidth })),
    )
    .map_err(&e)?;
    q.execute("migrate", Some(json!({ "uri": format!("tcp:{addr}") })))
        .map_err(&e)?;
    follow(&mut q, path, timeout)
}

/// Follow a migration that `q`'s QEMU runs (either side: `migrate` or
/// `migrate-incoming` was sent) through `query-migrate` until it ends; cancel it once
/// `timeout` passes.
pub fn follow(
    q: &mut Qmp,
    path: &Path,
    timeout: Duration,
) -> Result<MigrationStats, MigrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = q.execute("query-migrate", None).map_err(qmp_err(path))?;
        if let Some(end) = migration_end(&info) {
            return end;
        }
        if Instant::now() >= deadline {
            let _ = q.execute("migrate_cancel", None);
            return Err(MigrationError::Timeout(timeout));
        }
        std::thread::sleep(POLL);
    }
}

/// `None` while `query-migrate` says the migration goes on; else how it ended.
pub fn migration_end(info: &Value) -> Option<Result<MigrationStats, MigrationError>> {
    let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
    let ms = |k: &str| Duration::from_millis(info.get(k).and_then(Value::as_u64).unwrap_or(0));
    match status {
        "completed" => Some(Ok(MigrationStats {
            downtime: ms("downtime"),
            total: ms("total-time"),
            transferred: info
                .pointer("/ram/transferred")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })),
        // "none" (or no status yet) is a migration QEMU has not begun: still going.
        "failed" | "cancelled" => {
            let why = info
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("(no reason given)");
            Some(Err(MigrationError::Failed(format!("{status}: {why}"))))
        }
        _ => None,
    }
}

/// Destination: wait until the incoming state has fully arrived (QEMU leaves
/// `inmigrate`; with `-S` it then stays paused). A QEMU whose incoming migration fails
/// exits, which shows here as a lost connection.
pub fn wait_incoming(path: &Path, timeout: Duration) -> Result<(), MigrationError> {
    let e = qmp_err(path);
    let mut q = Qmp::connect(path, timeout.min(Duration::from_secs(10))).map_err(&e)?;
    let deadline = Instant::now() + timeout;
    loop {
        match qmp::run_state(&mut q).map_err(&e)?.as_str() {
            "inmigrate" => {}
            "paused" | "running" => return Ok(()),
            other => {
                return Err(MigrationError::Failed(format!(
                    "incoming QEMU is {other:?}, not paused"
                )))
            }
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Timeout(timeout));
        }
        std::thread::sleep(POLL);
    }
}

/// Run the guest (`cont`): the destination after its switchover, or the source again
/// after a hand-over that did not happen. Checked with `query-status`.
pub fn cont(path: &Path, timeout: Duration) -> Result<(), MigrationError> {
    let e = qmp_err(path);
    let mut q = Qmp::connect(path, timeout).map_err(&e)?;
    q.execute("cont", None).map_err(&e)?;
    match qmp::run_state(&mut q).map_err(&e)?.as_str() {
        "running" => Ok(()),
        other => Err(MigrationError::Failed(format!(
            "after cont the guest is {other:?}, not running"
        ))),
    }
}

#[cfg(test)]
#[path = "migration_tests.rs"]
mod tests;
