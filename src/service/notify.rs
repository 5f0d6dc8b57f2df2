//! sd_notify(3) through the `sd-notify` crate: READY, STATUS, STOPPING, RELOADING and
//! the watchdog ping. Every call is a no-op when NOTIFY_SOCKET is unset (not started by
//! systemd as `Type=notify`); a failed send is logged, never fatal: the service manager
//! going away must not stop the storage or the cluster agent.
use sd_notify::NotifyState;
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Startup finished: `status` says what is served.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line state for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown began: `status` says what is being done.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A configuration reload began (systemd wants the monotonic time with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

/// Status lines sent only when they change (a loop may compute one every tick).
#[derive(Debug, Default)]
pub struct StatusLine {
    last: Mutex<String>,
}

impl StatusLine {
    pub fn new() -> StatusLine {
        StatusLine::default()
    }

    /// Send READY=1 with `line`.
    pub fn ready(&self, line: &str) {
        if let Ok(mut last) = self.last.lock() {
            *last = line.to_string();
        }
        ready(line);
    }

    /// Send `line` if it differs from the last one sent; `true` if it was sent.
    pub fn set(&self, line: &str) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if *last == line {
            return false;
        }
        *last = line.to_string();
        status(line);
        true
    }
}

/// When the last WATCHDOG=1 went out, for [`watchdog`]'s rate.
static LAST_PING: Mutex<Option<Instant>> = Mutex::new(None);

/// The watchdog interval systemd asked for (WATCHDOG_USEC, for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Tell systemd the caller's loop ran. Sent at most every WATCHDOG_USEC/2 (as
/// sd_watchdog_enabled(3) advises), so it may be called on every iteration of a loop
/// that runs more often than that; nothing is sent without a watchdog.
pub fn watchdog() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let now = Instant::now();
    let Ok(mut last) = LAST_PING.lock() else {
        return;
    };
    if last.is_some_and(|t| now.duration_since(t) < every / 2) {
        return;
    }
    *last = Some(now);
    send(&[NotifyState::Watchdog]);
}
