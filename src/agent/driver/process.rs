//! The `process` driver: the agent itself runs and supervises the VM's command line
//! (typically qemu-system-*), in its own process group so signals reach everything it
//! started, with stdout and stderr appended to a log file.
//!
//! Exits are observed with `waitid(WNOWAIT)` before reaping: while the leader is an
//! unreaped zombie its pid (and so its process group id) cannot be reused, which is what
//! makes signalling the group afterwards safe. Whenever the leader is found dead, the
//! rest of its group is SIGKILLed before the reap: the VM is that process, and helpers it
//! leaves behind must not keep using the disks once the agent counts the VM as down.
//!
//! While a run lasts, STATE_DIR/GROUP.pid holds its pid and start time. A driver that
//! finds one it did not write (its agent died without killing the VM: SIGKILL, crash)
//! kills that process group on `kill`, `stop`, `start` and `restore`, so a restarted
//! agent can make sure no VM of an earlier life runs before it starts one. The start
//! time, checked against /proc, keeps a recycled pid from being taken for the VM.
//!
//! Pause freezes the whole process group with SIGSTOP and returns once every thread of it
//! is stopped; resume is SIGCONT. With `qmp` set, QEMU is asked instead (`stop`/`cont`,
//! checked with `query-status`): its vCPUs stop and its devices quiesce while its monitor
//! stays responsive. A stopped group is still Running to `status` (waitid asks for exits
//! only), SIGKILL ends it as it is, and `stop` and `save` follow their signal with SIGCONT,
//! since a stopped process only acts on a signal once it is continued.

use super::exec::{self, describe, peek, signal_group, tail_lines, wait_exit, Peek};
use super::migration::{self, MigrationError, MigrationStats};
use super::qmp::{self, Qmp, QmpError};
use super::{freeze, procinfo, signal_number, DriverError, VmContext, VmDriver, VmStatus};
pub use crate::agent::config::ProcessVm;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

/// A program that dies this soon after being started failed to start (bad arguments,
/// missing image, port in use): report it from `start` rather than from the next status.
const START_CHECK: Duration = Duration::from_millis(50);

/// Log lines quoted in errors.
const TAIL_LINES: usize = 10;

/// Longest wait for an earlier agent's VM to die after SIGKILL (it is not our child:
/// there is no reaping it, only watching /proc).
const ORPHAN_KILL_WAIT: Duration = Duration::from_secs(10);

/// Longest a pause or a resume may take: for every thread to stop (a thread in
/// uninterruptible disk sleep stops only once that I/O ends), or for a QMP command.
/// Past it the call fails with `Timeout`, and the agent kills the VM.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

enum State {
    /// Never started, or stopped/killed/saved by us.
    Idle,
    /// Started by us; may have exited since (not yet observed).
    Running {
        child: Child,
        log: PathBuf,
        /// Where this run's output starts in the log.
        log_from: u64,
        pid_file: PathBuf,
    },
    /// Exited on its own; reaped. What `status` keeps reporting until the next action.
    Exited(VmStatus),
}

pub struct ProcessDriver {
    /// The settings; strings may hold placeholders. Its `log` is not used: see `log`.
    vm: ProcessVm,
    /// The resolved log file (the config's or STATE_DIR/GROUP.log).
    log: PathBuf,
    state: State,
}

impl ProcessDriver {
    /// A driver for `vm`, its output going to `vm.log` or else to `default_log`.
    pub fn new(vm: ProcessVm, default_log: PathBuf) -> Self {
        let log = vm.log.clone().unwrap_or(default_log);
        ProcessDriver {
            vm,
            log,
            state: State::Idle,
        }
    }

    /// Pid (and process group id) of the running program, if one was started and not
    /// yet seen to exit.
    pub fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Running { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// Start the configured command with `extra` arguments after it (placeholders
    /// expanded): what the qemu driver starts its guests with.
    pub(super) fn start_with_args(
        &mut self,
        ctx: &VmContext,
        action: &'static str,
        extra: &[String],
    ) -> Result<(), DriverError> {
        self.spawn(ctx, action, extra)
    }

    fn log_path(&self, ctx: &VmContext) -> PathBuf {
        match self.log.to_str() {
            Some(s) => PathBuf::from(ctx.expand(s)),
            None => self.log.clone(),
        }
    }

    fn spawn(
        &mut self,
        ctx: &VmContext,
        action: &'static str,
        extra: &[String],
    ) -> Result<(), DriverError> {
        self.refresh(action)?;
        if let Some(pid) = self.pid() {
            return Err(DriverError::Failed {
                action,
                detail: format!("already running (pid {pid})"),
            });
        }
        let argv: Vec<String> = self
            .vm
            .command
            .iter()
            .chain(extra)
            .map(|a| ctx.expand(a))
            .collect();
        let Some((program, args)) = argv.split_first() else {
            return Err(DriverError::Failed {
                action,
                detail: "no command configured".into(),
            });
        };
        // An instance left by an earlier agent would be a second VM on the same disks,
        // under this node's (re-established) registration: it goes first.
        kill_orphan(ctx, action, None)?;
        let log = self.log_path(ctx);
        let (out, log_from) =
            open_log(&log, action, ctx, &argv).map_err(|e| DriverError::Failed {
                action,
                detail: format!("log {}: {e}", log.display()),
            })?;
        let err = out.try_clone().map_err(|e| DriverError::Failed {
            action,
            detail: format!("log {}: {e}", log.display()),
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(self.vm.env.iter().map(|(k, v)| (k.clone(), ctx.expand(v))))
            // Last, so a config's env cannot mask what the agent tells the VM.
            .envs(ctx.env())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Its own group: stop and kill signals must reach whatever it starts too.
        let mut child = exec::spawn_in_group(&mut cmd, action)?;
        let pid = child.id();
        let pid_file = pid_file(ctx);
        if let Err(e) = write_pid_file(&pid_file, pid) {
            // Without it, a crash of the agent would leave this VM running unseen.
            finish(&mut child, Peek::Running);
            return Err(DriverError::Failed {
                action,
                detail: format!("pid file {}: {e}", pid_file.display()),
            });
        }
        // An error cannot happen for our own child; if it did, the status checks to come
        // would report it.
        let seen = wait_exit(pid, START_CHECK).unwrap_or(Peek::Running);
        if seen != Peek::Running {
            let status = end_run(&mut child, &pid_file, seen);
            let detail = format!(
                "{program} exited at once: {}{}",
                status_detail(&status),
                log_tail(&log, log_from)
            );
            self.state = State::Exited(status);
            return Err(DriverError::Failed { action, detail });
        }
        tracing::debug!(group = %ctx.group, pid, action, "VM process started");
        self.state = State::Running {
            child,
            log,
            log_from,
            pid_file,
        };
        Ok(())
    }

    /// Notice an exit of the running program: reap it and remember how it ended.
    fn refresh(&mut self, action: &'static str) -> Result<(), DriverError> {
        if let State::Running {
            child, pid_file, ..
        } = &mut self.state
        {
            let seen = peek(child.id()).map_err(|e| DriverError::Failed {
                action,
                detail: format!("waitid({}): {e}", child.id()),
            })?;
            if seen != Peek::Running {
                let status = end_run(child, pid_file, seen);
                self.state = State::Exited(status);
            }
        }
        Ok(())
    }

    /// SIGKILL the running program's group and reap it; Idle afterwards.
    fn kill_now(&mut self) {
        if let State::Running {
            child, pid_file, ..
        } = &mut self.state
        {
            // On an (impossible) waitid error, signal anyway: it is still our child.
            let seen = peek(child.id()).unwrap_or(Peek::Running);
            end_run(child, pid_file, seen);
        }
        self.state = State::Idle;
    }

    /// The pid of the running program, or an error saying it is not running.
    fn running_pid(&mut self, action: &'static str) -> Result<u32, DriverError> {
        self.refresh(action)?;
        let why = match &self.state {
            State::Running { child, .. } => return Ok(child.id()),
            State::Idle => "never started, or stopped".to_string(),
            State::Exited(st) => status_detail(st),
        };
        Err(DriverError::Failed {
            action,
            detail: format!("the VM is not running ({why})"),
        })
    }

    /// The expanded QMP socket path, when the config names one.
    fn qmp_path(&self, ctx: &VmContext) -> Option<PathBuf> {
        self.vm.qmp.as_ref().map(|p| match p.to_str() {
            Some(s) => PathBuf::from(ctx.expand(s)),
            None => p.clone(),
        })
    }

    /// Pause or resume: QMP `command` when configured, else the group signal. `pause`
    /// tells which.
    fn set_paused(&mut self, ctx: &VmContext, pause: bool) -> Result<(), DriverError> {
        let action = if pause { "pause" } else { "resume" };
        let pid = self.running_pid(action)?;
        match self.qmp_path(ctx) {
            Some(path) => qmp_set_paused(&path, action, pause),
            None => signal_set_paused(pid, action, pause),
        }?;
        // It may have died meanwhile (a zombie counts as frozen).
        self.running_pid(action)?;
        tracing::debug!(group = %ctx.group, pid, action, "VM {action}d");
        Ok(())
    }
}

/// Live migration, for a QEMU started with `-qmp` (the `qmp` setting): the destination
/// runs the command line with `-S -incoming defer` added, the rest is QMP
/// ([`migration`]).
impl ProcessDriver {
    /// The QMP socket of the running VM, for a live-migration step.
    fn live_qmp(&mut self, ctx: &VmContext, action: &'static str) -> Result<PathBuf, DriverError> {
        let path = self.qmp_path(ctx).ok_or(DriverError::Unsupported {
            action: "live migration (the process VM has no `qmp` socket)",
        })?;
        self.running_pid(action)?;
        Ok(path)
    }

    fn incoming(&mut self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        if self.vm.qmp.is_none() {
            return self.live_qmp(ctx, "start incoming").map(|_| String::new());
        }
        let extra = ["-S", "-incoming", "defer"].map(String::from);
        self.spawn(ctx, "start incoming", &extra)?;
        let path = self.live_qmp(ctx, "start incoming")?;
        migration::listen(&path, host, MIGRATION_QMP_TIMEOUT).map_err(|e| {
            // A half-started destination must not linger.
            self.kill_now();
            live_error("start incoming", e)
        })
    }
}

/// Longest wait for a QMP answer (and for a fresh QEMU's socket) in a migration step;
/// the migration itself has the agent's `migration_timeout`.
pub(super) const MIGRATION_QMP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn live_error(action: &'static str, e: MigrationError) -> DriverError {
    match e {
        MigrationError::Timeout(after) => DriverError::Timeout { action, after },
        e => DriverError::Failed {
            action,
            detail: e.to_string(),
        },
    }
}

/// SIGSTOP (pause) or SIGCONT the group and wait until every thread is (no longer)
/// stopped. A pause that times out leaves stopped what stopped.
fn signal_set_paused(pgid: u32, action: &'static str, pause: bool) -> Result<(), DriverError> {
    let waited = if pause {
        freeze::stop_group(pgid, PAUSE_TIMEOUT)
    } else {
        freeze::continue_group(pgid, PAUSE_TIMEOUT)
    };
    waited.map_err(|left| {
        tracing::warn!(
            pgid,
            action,
            "not every thread of the VM followed within {PAUSE_TIMEOUT:?}: {}",
            freeze::describe(&left)
        );
        DriverError::Timeout {
            action,
            after: PAUSE_TIMEOUT,
        }
    })
}

/// QMP `stop` (pause) or `cont`, then `query-status` must say "paused" or "running".
fn qmp_set_paused(path: &Path, action: &'static str, pause: bool) -> Result<(), DriverError> {
    let (command, want) = if pause {
        ("stop", "paused")
    } else {
        ("cont", "running")
    };
    let run = || -> Result<String, QmpError> {
        let mut q = Qmp::connect(path, PAUSE_TIMEOUT)?;
        q.execute(command, None)?;
        qmp::run_state(&mut q)
    };
    let failed = |detail: String| DriverError::Failed { action, detail };
    match run() {
        Ok(state) if state == want => Ok(()),
        Ok(state) => Err(failed(format!(
            "QMP {}: after {command} the VM is {state:?}, not {want:?}",
            path.display()
        ))),
        Err(QmpError::Timeout { after, .. }) => Err(DriverError::Timeout { action, after }),
        Err(e) => Err(failed(format!("QMP {}: {e}", path.display()))),
    }
}

/// [`finish`], and the run's pid file goes: nothing is left for a successor to kill.
fn end_run(child: &mut Child, pid_file: &Path, seen: Peek) -> VmStatus {
    let st = finish(child, seen);
    if let Err(e) = remove_if_present(pid_file) {
        tracing::warn!(file = %pid_file.display(), "cannot remove pid file: {e}");
    }
    st
}

fn pid_file(ctx: &VmContext) -> PathBuf {
    ctx.state_dir.join(format!("{}.pid", ctx.group))
}

/// Write "PID STARTTIME" atomically (temporary file, rename).
fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let start = procinfo::stat(pid)
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("/proc/{pid}/stat"))
        })?
        .starttime;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(&tmp, path)
}

/// The process group a pid file names, if its leader is still that process (same start
/// time; possibly a zombie nobody reaped, which still holds the group id).
fn orphan(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    let st = procinfo::stat(pid)?;
    (st.pgrp == pid && st.starttime == start).then_some(pid)
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    procinfo::stat(pid).is_some_and(|st| st.state != 'Z')
}

fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while running(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Kill the process group a pid file from an earlier driver names (first asking with
/// `graceful`'s signal and waiting up to its timeout), wait for its leader to die, and
/// drop the file. No file, or a stale one, is nothing to do.
fn kill_orphan(
    ctx: &VmContext,
    action: &'static str,
    graceful: Option<(Signal, Duration)>,
) -> Result<(), DriverError> {
    let path = pid_file(ctx);
    if let Some(pid) = orphan(&path) {
        tracing::warn!(
            group = %ctx.group,
            pid,
            "killing a VM process an earlier agent left running"
        );
        // Not our child, so nothing pins its pid: each signal follows a fresh check of
        // the start time (a pid is not recycled within microseconds).
        if let Some((sig, timeout)) = graceful {
            signal_group(pid, sig);
            // That agent may have died with the VM paused (SIGSTOPped).
            signal_group(pid, Signal::SIGCONT);
            wait_gone(pid, timeout);
        }
        // After a graceful exit init may have reaped it, freeing the pid (what is left
        // of its group then escapes: it can no longer be told from a stranger's).
        if orphan(&path) == Some(pid) {
            signal_group(pid, Signal::SIGKILL);
        }
        if !wait_gone(pid, ORPHAN_KILL_WAIT) {
            return Err(DriverError::Failed {
                action,
                detail: format!(
                    "pid {pid}, left by an earlier agent, survived SIGKILL for {ORPHAN_KILL_WAIT:?}"
                ),
            });
        }
    }
    remove_if_present(&path).map_err(|e| DriverError::Failed {
        action,
        detail: format!("pid file {}: {e}", path.display()),
    })
}

/// End a run: SIGKILL what is left of the group (unless the leader was reaped behind our
/// back, when its pid may name a stranger), reap the leader and say how it ended.
fn finish(child: &mut Child, seen: Peek) -> VmStatus {
    if seen != Peek::Lost {
        signal_group(child.id(), Signal::SIGKILL);
    }
    match child.wait() {
        Ok(s) if s.success() => VmStatus::ShutDown,
        Ok(s) => VmStatus::Failed(describe(s)),
        Err(e) => VmStatus::Failed(format!("exit status unknown: {e}")),
    }
}

fn status_detail(s: &VmStatus) -> String {
    match s {
        VmStatus::Failed(d) => d.clone(),
        VmStatus::ShutDown => "exit status 0".into(),
        other => format!("{other:?}"),
    }
}

/// Open (creating it and its directory) the log for appending, write a header for this
/// run and return the file and the offset this run's output starts at.
fn open_log(
    path: &Path,
    action: &str,
    ctx: &VmContext,
    argv: &[String],
) -> std::io::Result<(File, u64)> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(
        f,
        "--- holdfast: {action} {} (epoch {}) on {} at {}: {argv:?}",
        ctx.group,
        ctx.epoch,
        ctx.node,
        humantime::format_rfc3339_seconds(SystemTime::now()),
    )?;
    let from = f.metadata()?.len();
    Ok((f, from))
}

/// "; log: last | lines" of what this run wrote, or "" when it wrote nothing.
fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = from.max(len.saturating_sub(8192));
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) => {
            let t = tail_lines(&s, TAIL_LINES);
            if t.is_empty() {
                String::new()
            } else {
                format!("; log: {t}")
            }
        }
        Err(_) => String::new(),
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl VmDriver for ProcessDriver {
    fn start(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.spawn(ctx, "start", &[])
    }

    fn restore(&mut self, ctx: &VmContext) -> Result<bool, DriverError> {
        if !ctx.has_saved_state()? {
            return Ok(false);
        }
        let extra = self.vm.restore_args.clone();
        self.spawn(ctx, "restore", &extra)?;
        Ok(true)
    }

    fn stop(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        // Config validation refuses bad names; an error here leaves the VM running for
        // the agent's escalation to kill.
        let sig = signal_number(&self.vm.stop_signal).ok_or_else(|| DriverError::Failed {
            action: "stop",
            detail: format!("{:?} is not a signal", self.vm.stop_signal),
        })?;
        let State::Running { child, .. } = &mut self.state else {
            self.state = State::Idle;
            return kill_orphan(ctx, "stop", Some((sig, timeout)));
        };
        let pid = child.id();
        signal_group(pid, sig);
        // A paused (SIGSTOPped) group keeps the stop signal pending until continued.
        signal_group(pid, Signal::SIGCONT);
        if wait_exit(pid, timeout).unwrap_or(Peek::Running) == Peek::Running {
            tracing::warn!(
                group = %ctx.group,
                pid,
                ?timeout,
                "VM did not stop in time; killing it"
            );
        }
        // Exited or not, nothing of the group may outlive a stop.
        self.kill_now();
        Ok(())
    }

    fn kill(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        if self.pid().is_some() {
            self.kill_now();
            Ok(())
        } else {
            self.state = State::Idle;
            kill_orphan(ctx, "kill", None)
        }
    }

    fn save(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        let Some(name) = &self.vm.save_signal else {
            return Err(DriverError::Unsupported { action: "save" });
        };
        let sig = signal_number(name).ok_or_else(|| DriverError::Failed {
            action: "save",
            detail: format!("{name:?} is not a signal"),
        })?;
        self.refresh("save")?;
        let State::Running {
            child,
            log,
            log_from,
            pid_file,
        } = &mut self.state
        else {
            return Err(DriverError::Failed {
                action: "save",
                detail: "not running".into(),
            });
        };
        let pid = child.id();
        let (log, log_from) = (log.clone(), *log_from);
        let state_file = ctx.state_file.clone();
        // A state file from an earlier save must not pass for this one: restoring an
        // older state over disks that moved on since would corrupt them.
        if let Err(e) = remove_if_present(&state_file) {
            return Err(DriverError::Failed {
                action: "save",
                detail: format!("cannot remove old {}: {e}", state_file.display()),
            });
        }
        // The leader only: saving is a conversation with the program itself, and the
        // rest of its group must keep running until it has written its state.
        // pid is our unreaped child, so it names no stranger.
        let _ = kill(Pid::from_raw(pid as i32), sig);
        // A paused group could neither act on the signal nor write the state.
        signal_group(pid, Signal::SIGCONT);
        let ended = match wait_exit(pid, timeout).unwrap_or(Peek::Running) {
            Peek::Running => {
                self.kill_now();
                None
            }
            seen => {
                let st = end_run(child, pid_file, seen);
                self.state = State::Idle;
                Some(st)
            }
        };
        let ok = matches!(ended, Some(VmStatus::ShutDown)) && state_file.exists();
        if ok {
            return Ok(());
        }
        // Whatever it left is not a state to restore from.
        let _ = remove_if_present(&state_file);
        match ended {
            None => {
                tracing::warn!(
                    group = %ctx.group,
                    pid,
                    ?timeout,
                    "VM did not save in time; killed it"
                );
                Err(DriverError::Timeout {
                    action: "save",
                    after: timeout,
                })
            }
            Some(st) => {
                let how = if matches!(st, VmStatus::ShutDown) {
                    format!("exited 0 without writing {}", state_file.display())
                } else {
                    status_detail(&st)
                };
                Err(DriverError::Failed {
                    action: "save",
                    detail: format!("{how}{}", log_tail(&log, log_from)),
                })
            }
        }
    }

    fn status(&mut self, _ctx: &VmContext) -> Result<VmStatus, DriverError> {
        self.refresh("status")?;
        Ok(match &self.state {
            State::Idle => VmStatus::Stopped,
            State::Running { .. } => VmStatus::Running,
            State::Exited(s) => s.clone(),
        })
    }

    fn discard_saved(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        remove_if_present(&ctx.state_file).map_err(|e| DriverError::Failed {
            action: "discard_saved",
            detail: format!("{}: {e}", ctx.state_file.display()),
        })
    }

    fn pause(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.set_paused(ctx, true)
    }

    fn resume(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.set_paused(ctx, false)
    }

    fn start_incoming(&mut self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        self.incoming(ctx, host)
    }

    fn wait_incoming(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        let path = self.live_qmp(ctx, "incoming migration")?;
        migration::wait_incoming(&path, timeout).map_err(|e| live_error("incoming migration", e))
    }

    fn migrate_live(
        &mut self,
        ctx: &VmContext,
        addr: &str,
        timeout: Duration,
    ) -> Result<MigrationStats, DriverError> {
        let path = self.live_qmp(ctx, "live migration")?;
        let bandwidth = self
            .vm
            .migration_bandwidth
            .map_or(migration::DEFAULT_BANDWIDTH, |b| b.0);
        migration::migrate(&path, addr, bandwidth, timeout)
            .map_err(|e| live_error("live migration", e))
    }

    fn continue_migrated(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let path = self.live_qmp(ctx, "continue after migration")?;
        migration::cont(&path, MIGRATION_QMP_TIMEOUT)
            .map_err(|e| live_error("continue after migration", e))
    }

    fn can_migrate_live(&self) -> bool {
        self.vm.qmp.is_some()
    }
}

/// The agent kills its VMs when it dies: its heartbeat stops, peers take the group over
/// and start the VM elsewhere, and an orphan left here would be a second instance nobody
/// watches (its disk I/O refused by the reservation, but still up on the network). So a
/// driver dropped with its program running kills it too rather than orphan it.
impl Drop for ProcessDriver {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            tracing::warn!(
                pid,
                "VM driver dropped with its process running; killing it"
            );
        }
        self.kill_now();
    }
}
