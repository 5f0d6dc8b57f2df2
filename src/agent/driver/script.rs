//! The `script` driver: an rgmanager/LSB-style script run as `PATH ACTION`.
//!
//! The script runs with stdin from /dev/null, in its own process group, with
//! [`VmContext::env`] plus `HOLDFAST_ACTION` (the action) and `HOLDFAST_TIMEOUT_SECS`
//! (whole seconds it has, rounded down) in its environment. Its stdout and stderr are
//! captured; errors quote their last lines. Past the timeout (the configured one; for
//! stop and save, the one the agent passes) its whole process group is SIGKILLed and the
//! call fails with `Timeout`.
//!
//! Exit codes:
//!
//! | action  | 0              | other                                                   |
//! |---------|----------------|---------------------------------------------------------|
//! | start   | started        | failed                                                  |
//! | stop    | stopped        | failed                                                  |
//! | kill    | killed         | failed (the agent escalates)                            |
//! | save    | saved, stopped | 3: cannot save (LSB "unimplemented"): `Unsupported`; others failed |
//! | restore | restored       | 7: no saved state, nothing started; others failed      |
//! | status  | running        | 3: stopped (LSB "not running"); 5: shut down cleanly by its admin, not to be restarted; others: failed |
//! | pause   | paused (neither writes nor talks on the network) | failed (the agent kills the VM) |
//! | resume  | continued where it paused | failed                                     |
//!
//! `pause` and `resume` run only when the config sets `pause = true`; without it they
//! are `Unsupported` and the script is not asked.
//!
//! A saved state lives at `$HOLDFAST_STATE_FILE`: `discard_saved` deletes that file,
//! and `restore` must exit 7 when it is missing.
//!
//! A daemon the script starts (the VM) stays in the script's process group; it should
//! not keep the script's stdout open (redirect it), though doing so only costs a reader
//! thread until the daemon exits.

use super::exec::{self, describe, tail_lines};
use super::{DriverError, VmContext, VmDriver, VmStatus};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Output lines quoted in errors.
const TAIL_LINES: usize = 5;

pub struct ScriptDriver {
    path: PathBuf,
    timeout: Duration,
    /// The script implements `pause` and `resume`.
    pause: bool,
}

impl ScriptDriver {
    /// `timeout` bounds every action but stop and save, which get the agent's.
    pub fn new(path: PathBuf, timeout: Duration, pause: bool) -> Self {
        ScriptDriver {
            path,
            timeout,
            pause,
        }
    }

    /// `pause` or `resume`, when the script implements them.
    fn run_pause(&self, ctx: &VmContext, action: &'static str) -> Result<(), DriverError> {
        if !self.pause {
            return Err(DriverError::Unsupported { action });
        }
        self.run_ok(ctx, action, self.timeout)
    }

    fn run(
        &self,
        ctx: &VmContext,
        action: &'static str,
        timeout: Duration,
    ) -> Result<(Option<i32>, exec::Output), DriverError> {
        let path = match self.path.to_str() {
            Some(s) => PathBuf::from(ctx.expand(s)),
            None => self.path.clone(),
        };
        let mut cmd = Command::new(path);
        cmd.arg(action)
            .envs(ctx.env())
            .env("HOLDFAST_ACTION", action)
            .env("HOLDFAST_TIMEOUT_SECS", timeout.as_secs().to_string());
        let out = exec::run(cmd, action, timeout, true)?;
        Ok((out.status.code(), out))
    }

    /// Run `action`; exit 0 is success, anything else an error quoting the output.
    fn run_ok(
        &self,
        ctx: &VmContext,
        action: &'static str,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        match self.run(ctx, action, timeout)? {
            (Some(0), _) => Ok(()),
            (_, out) => Err(failed(action, &out)),
        }
    }
}

fn detail(out: &exec::Output) -> String {
    let tail = tail_lines(&out.stdout, TAIL_LINES);
    if tail.is_empty() {
        describe(out.status)
    } else {
        format!("{}: {tail}", describe(out.status))
    }
}

fn failed(action: &'static str, out: &exec::Output) -> DriverError {
    DriverError::Failed {
        action,
        detail: detail(out),
    }
}

impl VmDriver for ScriptDriver {
    fn start(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.run_ok(ctx, "start", self.timeout)
    }

    fn restore(&mut self, ctx: &VmContext) -> Result<bool, DriverError> {
        match self.run(ctx, "restore", self.timeout)? {
            (Some(0), _) => Ok(true),
            (Some(7), _) => Ok(false),
            (_, out) => Err(failed("restore", &out)),
        }
    }

    fn stop(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        // A stop that overruns fails with Timeout; the agent then escalates to kill.
        self.run_ok(ctx, "stop", timeout)
    }

    fn kill(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.run_ok(ctx, "kill", self.timeout)
    }

    fn save(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        match self.run(ctx, "save", timeout)? {
            (Some(0), _) => Ok(()),
            (Some(3), _) => Err(DriverError::Unsupported { action: "save" }),
            (_, out) => Err(failed("save", &out)),
        }
    }

    fn status(&mut self, ctx: &VmContext) -> Result<VmStatus, DriverError> {
        Ok(match self.run(ctx, "status", self.timeout)? {
            (Some(0), _) => VmStatus::Running,
            (Some(3), _) => VmStatus::Stopped,
            (Some(5), _) => VmStatus::ShutDown,
            (_, out) => VmStatus::Failed(detail(&out)),
        })
    }

    fn discard_saved(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        match std::fs::remove_file(&ctx.state_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DriverError::Failed {
                action: "discard_saved",
                detail: format!("{}: {e}", ctx.state_file.display()),
            }),
            _ => Ok(()),
        }
    }

    fn pause(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.run_pause(ctx, "pause")
    }

    fn resume(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.run_pause(ctx, "resume")
    }
}
