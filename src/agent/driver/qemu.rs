//! The `qemu` driver: a QEMU guest the agent runs itself (through the process driver:
//! own process group, pid file, log, orphan handling) and drives over QMP.
//!
//! - start: the command line is built here: the group's disks as virtio drives on
//!   iscsi:// with the node's VM initiator name (`-iscsi initiator-name=`), cache=none so
//!   the guest's flushes and FUA writes reach the target; a QMP socket; serial ports
//!   appended to files. It returns once QMP answers.
//! - stop: ACPI power-down (`system_powerdown`, and `cont` if paused so the guest can act
//!   on it), a wait up to the timeout, then SIGKILL of the group.
//! - save: `stop`, then migration into `exec:cat > STATE.partial`, renamed to the state
//!   file once QEMU reports it completed, then the process is killed (its state is on
//!   file, its disks flushed and released by the migration).
//! - restore: QEMU with `-incoming defer`, `migrate-incoming` from `exec:cat STATE`,
//!   then `cont`; the state file is removed once the guest runs, so it is never restored
//!   twice.
//! - status: the process first (QEMU's exit status 0 is a guest that powered off: a
//!   clean shutdown; a signal or non-zero is a crash), then QMP `query-status`, whose run
//!   state tells a guest paused by an I/O error, panicked or shut down apart from one
//!   that runs or that the agent paused; see [`status_of_run_state`].

use super::exec::{wait_exit, Peek};
use super::migration;
use super::process::{live_error, ProcessDriver, ProcessVm, MIGRATION_QMP_TIMEOUT};
use super::qmp::{self, Qmp, QmpError};
use super::{DriverError, VmContext, VmDriver, VmStatus};
pub use crate::agent::config::QemuVm;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// QEMU creates its QMP socket before it runs the guest: this long is a QEMU that did
/// not come up.
const QMP_READY: Duration = Duration::from_secs(15);
/// Each QMP command's limit.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a restore may take to load the saved state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the QMP socket is when the config names none.
const DEFAULT_QMP: &str = "{state_dir}/{group}.qmp";

pub struct QemuDriver {
    vm: QemuVm,
    inner: ProcessDriver,
    /// How a run ended that QMP (not the process) reported as over: the process is
    /// killed then, and this is what `status` keeps saying until the next action.
    ended: Option<VmStatus>,
}

impl QemuDriver {
    /// A driver for `vm`, QEMU's output going to `vm.log` or else to `default_log`.
    pub fn new(vm: QemuVm, default_log: PathBuf) -> QemuDriver {
        let mut p = ProcessVm::new(base_argv(&vm));
        p.qmp = Some(qmp_template(&vm));
        p.log = vm.log.clone();
        p.migration_bandwidth = vm.migration_bandwidth;
        QemuDriver {
            inner: ProcessDriver::new(p, default_log),
            vm,
            ended: None,
        }
    }

    /// The QMP socket of this VM's runs.
    pub fn qmp_socket(&self, ctx: &VmContext) -> PathBuf {
        expand_path(ctx, &qmp_template(&self.vm))
    }

    /// Pid of the running QEMU, if any.
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    /// Start QEMU with the group's disks and `extra` arguments (e.g. `-incoming defer`)
    /// and wait for its QMP socket to answer; on failure nothing is left running.
    pub fn start_with_args(
        &mut self,
        ctx: &VmContext,
        action: &'static str,
        extra: &[String],
    ) -> Result<Qmp, DriverError> {
        self.ended = None;
        let mut args = disk_args(ctx);
        args.extend_from_slice(extra);
        self.inner.start_with_args(ctx, action, &args)?;
        let path = self.qmp_socket(ctx);
        match Qmp::connect_when_up(&path, QMP_READY, QMP_TIMEOUT, || self.inner.pid().is_some()) {
            Ok(q) => Ok(q),
            Err(e) => {
                let _ = self.inner.kill(ctx);
                Err(qmp_failed(action, &path, e))
            }
        }
    }

    fn connect(&self, ctx: &VmContext, action: &'static str) -> Result<Qmp, DriverError> {
        let path = self.qmp_socket(ctx);
        Qmp::connect(&path, QMP_TIMEOUT).map_err(|e| qmp_failed(action, &path, e))
    }

    /// Stop the guest and migrate it into `tmp`; Ok once QEMU says completed.
    fn save_to(&self, ctx: &VmContext, tmp: &Path, timeout: Duration) -> Result<(), DriverError> {
        let path = self.qmp_socket(ctx);
        let fail = |e| qmp_failed("save", &path, e);
        let mut q = self.connect(ctx, "save")?;
        // Paused first: one pass over memory, and no guest write after the state.
        q.execute("stop", None).map_err(fail)?;
        let uri = format!("exec:cat > {}", shell_quote(&tmp.display().to_string()));
        q.execute("migrate", Some(json!({ "uri": uri })))
            .map_err(fail)?;
        migration::follow(&mut q, &path, timeout).map_err(|e| live_error("save", e))?;
        sync_file(tmp).map_err(|e| DriverError::Failed {
            action: "save",
            detail: format!("{}: {e}", tmp.display()),
        })
    }

    /// Feed the saved state to a QEMU started with `-incoming defer` and run the guest.
    fn load_from(&self, ctx: &VmContext, q: &mut Qmp) -> Result<(), DriverError> {
        let path = self.qmp_socket(ctx);
        let fail = |e| qmp_failed("restore", &path, e);
        let uri = format!(
            "exec:cat {}",
            shell_quote(&ctx.state_file.display().to_string())
        );
        q.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map_err(fail)?;
        migration::follow(q, &path, RESTORE_TIMEOUT).map_err(|e| live_error("restore", e))?;
        q.execute("cont", None).map_err(fail)?;
        match qmp::run_state(q).map_err(fail)?.as_str() {
            "running" => Ok(()),
            other => Err(DriverError::Failed {
                action: "restore",
                detail: format!("after cont the guest is {other:?}"),
            }),
        }
    }

    /// The guest's run state says its run is over: end the process, remember why.
    fn end_by_run_state(&mut self, ctx: &VmContext, status: VmStatus) -> VmStatus {
        tracing::warn!(group = %ctx.group, ?status, "QEMU reports the guest's run over");
        if let Err(e) = self.inner.kill(ctx) {
            tracing::warn!(group = %ctx.group, "cannot kill QEMU: {e}");
        }
        self.ended = Some(status.clone());
        status
    }
}

/// The QEMU command line without disks (strings keep their placeholders).
pub fn base_argv(vm: &QemuVm) -> Vec<String> {
    let mut a: Vec<String> = vec![vm.qemu.clone(), "-name".into(), "{group}".into()];
    for (opt, val) in [
        ("-machine", vm.machine.clone()),
        ("-m", vm.memory.clone()),
        ("-smp", vm.cpus.to_string()),
        ("-display", "none".into()),
        ("-iscsi", "initiator-name={initiator_name}".into()),
        (
            "-qmp",
            format!("unix:{},server=on,wait=off", qmp_template(vm).display()),
        ),
    ] {
        a.extend([opt.to_string(), val]);
    }
    a.extend(["-nodefaults".to_string(), "-no-user-config".to_string()]);
    let boot = [
        (
            "-kernel",
            vm.kernel.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "-initrd",
            vm.initrd.as_ref().map(|p| p.display().to_string()),
        ),
        ("-append", vm.append.clone()),
    ];
    for (opt, val) in boot {
        if let Some(v) = val {
            a.extend([opt.to_string(), v]);
        }
    }
    for (i, p) in vm.serial.iter().enumerate() {
        a.extend([
            "-chardev".to_string(),
            format!("file,id=serial{i},path={},append=on", p.display()),
            "-serial".to_string(),
            format!("chardev:serial{i}"),
        ]);
    }
    a.extend(vm.args.iter().cloned());
    a
}

/// One virtio drive per group disk, over iscsi:// (the URL names portal, target, LUN).
pub fn disk_args(ctx: &VmContext) -> Vec<String> {
    (0..ctx.disks.len())
        .filter_map(|i| ctx.disk_url(i))
        .enumerate()
        .flat_map(|(i, url)| {
            [
                "-drive".to_string(),
                format!("file={url},format=raw,if=virtio,cache=none,id=disk{i}"),
            ]
        })
        .collect()
}

/// What a QMP run state means to the agent. Paused (by the agent, or while a migration
/// loads or saves) is still running; a guest stopped by an I/O error, a panic, a
/// watchdog or an emulator error has failed (the planner restarts it); `shutdown` (a
/// guest that powered off under `-no-shutdown`) is a clean shutdown.
pub fn status_of_run_state(state: &str) -> VmStatus {
    let failed = |why: &str| VmStatus::Failed(format!("QEMU run state {state}: {why}"));
    match state {
        "io-error" => failed("paused by an I/O error"),
        "guest-panicked" => failed("the guest panicked"),
        "internal-error" => failed("an emulation error"),
        "watchdog" => failed("the guest's watchdog fired"),
        "shutdown" => VmStatus::ShutDown,
        // running, paused, prelaunch, inmigrate, postmigrate, finish-migrate, save-vm,
        // restore-vm, suspended, debug, colo, and states newer QEMUs add.
        _ => VmStatus::Running,
    }
}

fn qmp_template(vm: &QemuVm) -> PathBuf {
    vm.qmp.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_QMP))
}

fn expand_path(ctx: &VmContext, p: &Path) -> PathBuf {
    match p.to_str() {
        Some(s) => PathBuf::from(ctx.expand(s)),
        None => p.to_path_buf(),
    }
}

fn qmp_failed(action: &'static str, path: &Path, e: QmpError) -> DriverError {
    match e {
        QmpError::Timeout { after, .. } => DriverError::Timeout { action, after },
        e => DriverError::Failed {
            action,
            detail: format!("QMP {}: {e}", path.display()),
        },
    }
}

/// `s` as one word for /bin/sh (the exec: URI is run by a shell).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn sync_file(p: &Path) -> std::io::Result<()> {
    std::fs::File::open(p)?.sync_all()
}

fn remove_if_present(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn partial(state_file: &Path) -> PathBuf {
    let mut s = state_file.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

impl VmDriver for QemuDriver {
    fn start(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.start_with_args(ctx, "start", &[]).map(|_| ())
    }

    fn restore(&mut self, ctx: &VmContext) -> Result<bool, DriverError> {
        if !ctx.has_saved_state()? {
            return Ok(false);
        }
        let incoming = ["-incoming".to_string(), "defer".to_string()];
        let mut q = self.start_with_args(ctx, "restore", &incoming)?;
        if let Err(e) = self.load_from(ctx, &mut q) {
            let _ = self.inner.kill(ctx);
            return Err(e);
        }
        // Restored once: a later restore of it would roll the disks' user back.
        if let Err(e) = remove_if_present(&ctx.state_file) {
            tracing::warn!(file = %ctx.state_file.display(), "cannot remove state: {e}");
        }
        Ok(true)
    }

    fn stop(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        self.ended = None;
        let Some(pid) = self.inner.pid() else {
            // Not ours (an earlier agent's, if any): the process driver's way.
            return self.inner.stop(ctx, timeout);
        };
        let asked = self.connect(ctx, "stop").and_then(|mut q| {
            let fail = |e| qmp_failed("stop", &self.qmp_socket(ctx), e);
            q.execute("system_powerdown", None).map_err(fail)?;
            // A paused guest cannot see the button.
            if qmp::run_state(&mut q).map_err(fail)? == "paused" {
                q.execute("cont", None).map_err(fail)?;
            }
            Ok(())
        });
        if let Err(e) = asked {
            // No guest shutdown then, but QEMU still flushes and exits on SIGTERM.
            tracing::warn!(group = %ctx.group, "ACPI power-down not sent: {e}");
            return self.inner.stop(ctx, timeout);
        }
        if wait_exit(pid, timeout).unwrap_or(Peek::Running) == Peek::Running {
            tracing::warn!(group = %ctx.group, pid, ?timeout, "guest did not power down in time; killing it");
        }
        self.inner.kill(ctx)
    }

    fn kill(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.ended = None;
        self.inner.kill(ctx)
    }

    fn save(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        self.ended = None;
        if self.inner.pid().is_none() {
            return Err(DriverError::Failed {
                action: "save",
                detail: "not running".into(),
            });
        }
        let (state, tmp) = (ctx.state_file.clone(), partial(&ctx.state_file));
        let io = |p: &Path, e: std::io::Error| DriverError::Failed {
            action: "save",
            detail: format!("{}: {e}", p.display()),
        };
        // An older state must not pass for this one.
        remove_if_present(&state).map_err(|e| io(&state, e))?;
        let saved = self
            .save_to(ctx, &tmp, timeout)
            .and_then(|()| std::fs::rename(&tmp, &state).map_err(|e| io(&state, e)));
        if saved.is_err() {
            let _ = remove_if_present(&tmp);
        }
        // Saved or not, this run is over (the agent stops a VM whose save failed).
        let killed = self.inner.kill(ctx);
        saved.and(killed)
    }

    fn status(&mut self, ctx: &VmContext) -> Result<VmStatus, DriverError> {
        if let Some(s) = &self.ended {
            return Ok(s.clone());
        }
        let st = self.inner.status(ctx)?;
        if st != VmStatus::Running {
            return Ok(st);
        }
        let state = self.connect(ctx, "status").and_then(|mut q| {
            qmp::run_state(&mut q).map_err(|e| qmp_failed("status", &self.qmp_socket(ctx), e))
        });
        match state.map(|s| status_of_run_state(&s)) {
            Ok(VmStatus::Running) => Ok(VmStatus::Running),
            Ok(over) => Ok(self.end_by_run_state(ctx, over)),
            // The process runs: a busy monitor is no verdict on the guest.
            Err(e) => {
                tracing::warn!(group = %ctx.group, "QMP status: {e}");
                Ok(VmStatus::Running)
            }
        }
    }

    fn discard_saved(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.inner.discard_saved(ctx)
    }

    fn pause(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.inner.pause(ctx)
    }

    fn resume(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.inner.resume(ctx)
    }

    // Live migration: the destination is this driver's own command line (disks,
    // initiator name, QMP) held with -S; the other steps are the process driver's, which
    // reach the same QMP socket.

    fn start_incoming(&mut self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        let extra = ["-S", "-incoming", "defer"].map(String::from);
        self.start_with_args(ctx, "start incoming", &extra)?;
        let path = self.qmp_socket(ctx);
        migration::listen(&path, host, MIGRATION_QMP_TIMEOUT).map_err(|e| {
            // A half-started destination must not linger.
            let _ = self.inner.kill(ctx);
            live_error("start incoming", e)
        })
    }

    fn wait_incoming(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        self.inner.wait_incoming(ctx, timeout)
    }

    fn migrate_live(
        &mut self,
        ctx: &VmContext,
        addr: &str,
        timeout: Duration,
    ) -> Result<migration::MigrationStats, DriverError> {
        self.inner.migrate_live(ctx, addr, timeout)
    }

    fn continue_migrated(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.ended = None;
        self.inner.continue_migrated(ctx)
    }

    fn can_migrate_live(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> VmContext {
        VmContext {
            group: "web".into(),
            node: "n1".into(),
            node_id: 1,
            epoch: 7,
            initiator_name: "iqn.x:vm".into(),
            portal: "127.0.0.1:3260".into(),
            other_portals: vec![],
            target: "iqn.t".into(),
            disks: vec![2, 1],
            state_file: "/s/web.state".into(),
            state_dir: "/s".into(),
        }
    }

    #[test]
    fn run_states_map_onto_vm_status() {
        for s in [
            "running",
            "paused",
            "inmigrate",
            "postmigrate",
            "prelaunch",
            "new-state",
        ] {
            assert_eq!(status_of_run_state(s), VmStatus::Running, "{s}");
        }
        assert_eq!(status_of_run_state("shutdown"), VmStatus::ShutDown);
        for (s, why) in [
            ("io-error", "I/O error"),
            ("guest-panicked", "panicked"),
            ("internal-error", "emulation"),
            ("watchdog", "watchdog"),
        ] {
            match status_of_run_state(s) {
                VmStatus::Failed(d) => assert!(d.contains(why) && d.contains(s), "{d}"),
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn command_line_carries_disks_initiator_qmp_and_serial_ports() {
        let mut vm = QemuVm::new(Some("/k".into()));
        vm.append = Some("console=ttyS0 hf.epoch={epoch}".into());
        vm.serial = vec!["/l/{group}.console".into(), "/l/acks".into()];
        vm.args = vec!["-S".into()];
        let c = ctx();
        let argv: Vec<String> = base_argv(&vm).iter().map(|a| c.expand(a)).collect();
        let pairs: Vec<(&str, &str)> = argv
            .windows(2)
            .map(|w| (w[0].as_str(), w[1].as_str()))
            .collect();
        for want in [
            ("-iscsi", "initiator-name=iqn.x:vm"),
            ("-qmp", "unix:/s/web.qmp,server=on,wait=off"),
            ("-kernel", "/k"),
            ("-append", "console=ttyS0 hf.epoch=7"),
            ("-chardev", "file,id=serial1,path=/l/acks,append=on"),
            ("-serial", "chardev:serial0"),
            ("-m", "256M"),
        ] {
            assert!(pairs.contains(&want), "{want:?} in {argv:?}");
        }
        assert_eq!(argv[0], "qemu-system-x86_64");
        assert_eq!(argv.last().map(String::as_str), Some("-S"));
        assert!(!argv.iter().any(|a| a == "-initrd"), "{argv:?}");
        assert_eq!(
            disk_args(&c),
            [
                "-drive",
                "file=iscsi://127.0.0.1:3260/iqn.t/2,format=raw,if=virtio,cache=none,id=disk0",
                "-drive",
                "file=iscsi://127.0.0.1:3260/iqn.t/1,format=raw,if=virtio,cache=none,id=disk1",
            ]
        );
    }
    #[test]
    fn shell_quoting_keeps_a_path_one_word() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            partial(Path::new("/s/web.state")),
            Path::new("/s/web.state.partial")
        );
    }
}
