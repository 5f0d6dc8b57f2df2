//! Tooling, not the product: a whole cluster on this machine, as `holdfast demo` and the
//! cluster integration tests (`tests/common/cluster.rs`) build it. One `holdfast target`
//! (LUN 0 the quorum LUN, one LUN per group) and N `holdfast agent`s whose groups run
//! the test guest (`holdfast guest run`) through the `process` driver.
//!
//! The configuration files are the real config structs ([`crate::server::config::Config`],
//! [`NodeConfig`]) written as TOML, so what the demo and the tests run is exactly what
//! the loaders accept. The kit also names the files of a cluster directory, spawns the
//! processes, walks their process trees and reads the logs they leave (ack logs, events).
//! Policy (timeouts, what a failure means) stays with the caller: the demo reports
//! errors, the tests panic.

use crate::agent::config::{
    GroupConfig, NodeConfig, NodeSection, ProcessVm, TargetSection, Timings, VmConfig,
};
use crate::agent::driver::procinfo;
use crate::cli::guest::AckEvent;
use crate::initiator::{InitiatorConfig, Session};
use crate::server::config::{
    ByteSize, Config, IscsiSettings, LimitSettings, LunConfig, PortalConfig, TargetConfig,
};
use nix::errno::Errno;
use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{getppid, setpgid, Pid};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// The quorum LUN's number on the cluster's target.
pub const QUORUM_LUN: u64 = 0;
const QUORUM_SIZE: ByteSize = ByteSize(4 << 20);
const DISK_SIZE: ByteSize = ByteSize(16 << 20);

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Toml {
        what: String,
        source: toml::ser::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KitError {
    let what = what.into();
    move |source| KitError::Io { what, source }
}

/// `node{id}`: the name of node `id`.
pub fn node_name(id: u16) -> String {
    format!("node{id}")
}

/// A free TCP port on 127.0.0.1 (free now; nothing holds it for the caller).
pub fn free_port() -> io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// One group of the cluster: its disk, who should run it and how its guest runs.
/// [`GroupSpec::new`] gives a test cluster's defaults (a guest that gives up on a
/// write soon, a quick monitor); the demo states its own.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub name: String,
    /// Its one disk (the target serves it as a 16 MiB LUN).
    pub lun: u64,
    /// `preferred_owners`, unless `prefer_self`.
    pub preferred: Vec<String>,
    /// Every node lists itself as the first preferred owner (so that after a failure
    /// several survivors each believe they should claim: a real race).
    pub prefer_self: bool,
    /// Arguments appended to the guest's command line.
    pub guest_args: Vec<String>,
    /// The other `[[group]]` settings (failback, offline_action, ...); its name, disks,
    /// preferred_owners and vm are replaced by the above when a node's config is built.
    pub settings: GroupConfig,
}

impl GroupSpec {
    pub fn new(name: &str, lun: u64) -> GroupSpec {
        let mut settings = GroupConfig::new(name, vec![lun], VmConfig::process(vec![]));
        settings.monitor_interval = Duration::from_millis(200);
        GroupSpec {
            name: name.into(),
            lun,
            preferred: vec![],
            prefer_self: false,
            // A write aborted by PREEMPT AND ABORT gets no answer: give up on it soon.
            guest_args: vec!["--io-timeout".into(), "2s".into()],
            settings,
        }
    }
}

/// Where a cluster lives (one directory holds every config, log and disk image), which
/// executable it runs and where its target listens.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    /// The `holdfast` executable.
    pub exe: PathBuf,
    /// The target's portal.
    pub addr: SocketAddr,
    /// The target's iSCSI name.
    pub target: String,
    pub cluster: String,
}

impl Layout {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn target_config_path(&self) -> PathBuf {
        self.path("target.toml")
    }
    pub fn node_config_path(&self, id: u16) -> PathBuf {
        self.path(&format!("node{id}.toml"))
    }
    /// The ack log every run of `group`'s guest appends to.
    pub fn ack_log(&self, group: &str) -> PathBuf {
        self.path(&format!("acks-{group}.log"))
    }
    /// The agents' shared event log.
    pub fn events(&self) -> PathBuf {
        self.path("events.jsonl")
    }
    pub fn url(&self, lun: u64) -> String {
        format!("iscsi://{}/{}/{lun}", self.addr, self.target)
    }

    /// The target's configuration: the quorum LUN and one disk per group, images under
    /// DIR/data, NOP-Ins every 2 s so that a dead initiator is noticed soon.
    pub fn target_config(&self, groups: &[GroupSpec]) -> Config {
        let mut luns = vec![LunConfig::new(QUORUM_LUN, "quorum.img", QUORUM_SIZE)];
        luns.extend(
            groups
                .iter()
                .map(|g| LunConfig::new(g.lun, format!("{}.img", g.name), DISK_SIZE)),
        );
        Config {
            data_dir: self.path("data"),
            iscsi: IscsiSettings {
                nop_interval_secs: 2,
                nop_timeout_secs: 4,
                ..IscsiSettings::default()
            },
            limits: LimitSettings::default(),
            discovery_chap: None,
            admin_socket: None,
            metrics: None,
            ceph: None,
            alua: Default::default(),
            targets: vec![TargetConfig {
                name: self.target.clone(),
                alias: None,
                portals: vec![PortalConfig {
                    listen: self.addr.to_string(),
                    tpgt: 1,
                }],
                luns,
                acl: vec![],
                chap: None,
            }],
        }
    }

    /// Node `id`'s configuration: state in DIR/node{id}, events in DIR/events.jsonl,
    /// every group's guest logging its acknowledged writes to DIR/acks-GROUP.log.
    pub fn node_config(&self, id: u16, groups: &[GroupSpec], timings: &Timings) -> NodeConfig {
        NodeConfig {
            node: NodeSection {
                name: node_name(id),
                id,
                cluster: self.cluster.clone(),
                initiator_name: None,
                vm_initiator_name: None,
                state_dir: self.path(&node_name(id)),
                shared_state_dir: Some(self.path("shared")),
                event_log: Some(self.events()),
                metrics: None,
                event_log_max_size: crate::config_value::ByteSize(10 << 20),
                event_log_keep: 5,
                alert_command: None,
                alert_timeout: Duration::from_secs(30),
                migration_address: None,
            },
            target: TargetSection {
                portals: vec![self.addr.to_string()],
                name: self.target.clone(),
                quorum_lun: QUORUM_LUN,
                chap: None,
            },
            timings: timings.clone(),
            groups: groups.iter().map(|g| self.group_config(id, g)).collect(),
        }
    }

    fn group_config(&self, id: u16, g: &GroupSpec) -> GroupConfig {
        let mut vm = VmConfig::process(self.guest_command(g));
        if let VmConfig::Process(ProcessVm {
            restore_args,
            save_signal,
            ..
        }) = &mut vm
        {
            *restore_args = vec!["--restore".into()];
            *save_signal = Some("SIGUSR1".into());
        }
        GroupConfig {
            name: g.name.clone(),
            disks: vec![g.lun],
            preferred_owners: if g.prefer_self {
                vec![node_name(id)]
            } else {
                g.preferred.clone()
            },
            vm,
            ..g.settings.clone()
        }
    }

    /// The test guest, with the agent's placeholders for the disk, names and state.
    fn guest_command(&self, g: &GroupSpec) -> Vec<String> {
        let exe = self.exe.display().to_string();
        let ack_log = self.ack_log(&g.name).display().to_string();
        let mut cmd: Vec<String> = [
            exe.as_str(),
            "guest",
            "run",
            "--disk",
            "{disk0}",
            "--portals",
            "{portals}",
            "--initiator-name",
            "{initiator_name}",
            "--epoch",
            "{epoch}",
            "--ack-log",
            ack_log.as_str(),
            "--state-file",
            "{state_file}",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        cmd.extend(g.guest_args.iter().cloned());
        cmd
    }

    /// Write DIR/target.toml, with `header` (comment lines) on top.
    pub fn write_target_config(
        &self,
        groups: &[GroupSpec],
        header: &str,
    ) -> Result<PathBuf, KitError> {
        let path = self.target_config_path();
        write_toml(&path, header, &self.target_config(groups))?;
        Ok(path)
    }

    /// Write DIR/node{id}.toml, with `header` (comment lines) on top.
    pub fn write_node_config(
        &self,
        id: u16,
        groups: &[GroupSpec],
        timings: &Timings,
        header: &str,
    ) -> Result<PathBuf, KitError> {
        let path = self.node_config_path(id);
        write_toml(&path, header, &self.node_config(id, groups, timings))?;
        Ok(path)
    }

    /// Start `holdfast ARGS` with stderr appended to DIR/`log` and HOLDFAST_LOG set to
    /// `launch.log_filter`.
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        log: &str,
        launch: &Launch,
    ) -> Result<Child, KitError> {
        self.spawn_via::<&str, S>(&[], args, log, launch)
    }

    /// [`Layout::spawn`] through a wrapper that execs the rest of its command line,
    /// such as `ip netns exec NS` (an agent in its own network namespace): `wrapper`,
    /// then the executable and `args`. The wrapper must exec, not fork, so that the
    /// child's pid is holdfast's.
    pub fn spawn_via<W: AsRef<OsStr>, S: AsRef<OsStr>>(
        &self,
        wrapper: &[W],
        args: &[S],
        log: &str,
        launch: &Launch,
    ) -> Result<Child, KitError> {
        let what = format!(
            "starting holdfast {}",
            args.first()
                .map_or("".into(), |a| a.as_ref().to_string_lossy())
        );
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(log))
            .map_err(io_err(what.clone()))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.args(args)
            .env("HOLDFAST_LOG", launch.log_filter)
            .stdout(Stdio::null())
            .stderr(file);
        if launch.leash {
            leash(&mut cmd);
        }
        cmd.spawn().map_err(io_err(what))
    }

    /// The last `n` lines of each of DIR/`names` that exists, for a failure report.
    pub fn log_tails(&self, names: &[String], n: usize) -> String {
        let mut s = String::new();
        for name in names {
            let Ok(text) = std::fs::read_to_string(self.path(name)) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            s.push_str(&format!("---- {name} (last {} lines)\n", tail.len()));
            for l in tail {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Counters acknowledged by `group`'s run of `epoch`, in log order.
    pub fn acks_in(&self, group: &str, epoch: u64) -> Vec<u64> {
        ack_events(&self.ack_log(group))
            .filter_map(|e| match e {
                AckEvent::Ack {
                    epoch: e, counter, ..
                } if e == epoch => Some(counter),
                _ => None,
            })
            .collect()
    }

    /// The first counter of `group`'s run of `epoch` (its `start` line).
    pub fn run_start(&self, group: &str, epoch: u64) -> Option<u64> {
        ack_events(&self.ack_log(group)).find_map(|e| match e {
            AckEvent::Start {
                epoch: e, first, ..
            } if e == epoch => Some(first),
            _ => None,
        })
    }
}

/// How [`Layout::spawn`] starts a process.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// HOLDFAST_LOG of the child.
    pub log_filter: &'a str,
    /// Its own process group (a Ctrl-C at the terminal reaches only the caller, which
    /// stops the rest) and SIGKILL as its parent-death signal (a killed caller leaves
    /// nothing running). The parent-death signal fires when the *thread* that spawned
    /// the child ends: spawn from a thread that outlives the child.
    pub leash: bool,
}

fn leash(cmd: &mut Command) {
    let parent = std::process::id();
    // An error's first line is what a failure report needs, not its backtrace.
    cmd.env("RUST_LIB_BACKTRACE", "0").stdin(Stdio::null());
    // SAFETY: between fork and exec, only async-signal-safe calls (nix's thin syscall
    // wrappers) and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
            set_pdeathsig(Signal::SIGKILL)?;
            // The parent died before the prctl: nobody would kill us.
            if getppid().as_raw() as u32 != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Write `value` as TOML to `path`, `header` (comment lines, may be empty) first.
pub fn write_toml<T: Serialize>(path: &Path, header: &str, value: &T) -> Result<(), KitError> {
    let what = format!("writing {}", path.display());
    let text = toml::to_string(value).map_err(|source| KitError::Toml {
        what: what.clone(),
        source,
    })?;
    std::fs::write(path, format!("{header}{text}")).map_err(io_err(what))
}

/// Whether the target at `cfg` accepts a login now (the session is closed again).
pub async fn accepts_login(cfg: &InitiatorConfig) -> bool {
    match Session::login(cfg.clone()).await {
        Ok(s) => {
            let _ = s.logout().await;
            true
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------
// Ack logs and the event log

/// The events of the ack log at `path` (none if it does not exist yet).
pub fn ack_events(path: &Path) -> impl Iterator<Item = AckEvent> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let events: Vec<AckEvent> = text.lines().filter_map(AckEvent::parse).collect();
    events.into_iter()
}

/// Reads the lines appended to a file since the last call (a log several processes
/// append to with one write per line): a partial last line waits for its end.
pub struct LineTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LineTail {
    /// Tail `path` from its current end (`from_start`: from its beginning).
    pub fn new(path: PathBuf, from_start: bool) -> LineTail {
        let offset = if from_start {
            0
        } else {
            std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        };
        LineTail {
            path,
            offset,
            partial: String::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn read_new(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return vec![];
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return vec![];
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else {
            return vec![];
        };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines.retain(|l| !l.is_empty());
        lines
    }

    /// The complete lines appended since the last call that are JSON (events).
    pub fn read_json(&mut self) -> Vec<serde_json::Value> {
        self.read_new()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Process trees

/// Processes whose parent is `pid` (an agent's VMs).
pub fn children_of(pid: u32) -> Vec<i32> {
    procinfo::processes()
        .into_iter()
        .filter(|(_, st)| st.ppid == pid)
        .map(|(p, _)| p as i32)
        .collect()
}

/// Whether `pid` runs (zombies count as gone).
pub fn is_running(pid: i32) -> bool {
    u32::try_from(pid)
        .ok()
        .and_then(procinfo::stat)
        .is_some_and(|st| st.state != 'Z')
}

/// True when every thread of `pid` is stopped (or the process is gone).
pub fn all_threads_stopped(pid: i32) -> bool {
    let Ok(pid) = u32::try_from(pid) else {
        return true;
    };
    procinfo::threads(pid)
        .iter()
        .all(|(_, state)| matches!(state, 'T' | 't' | 'Z' | 'X'))
}

/// SIGKILL `pid` and its process group (guests lead their own). No SIGCONT: a stopped
/// process dies of SIGKILL too, and a frozen agent must not run again before it dies.
pub fn sigkill(pid: i32) {
    // A pid we started or adopted (still unreaped, so not reused); the group form
    // reaches its process group, or nothing (ESRCH) if it leads none.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// The target and the agents (by node id) of a cluster: children of this process.
/// Dropping it kills whatever still runs, so that a failure or a panic leaves nothing
/// behind.
#[derive(Debug, Default)]
pub struct Processes {
    pub target: Option<Child>,
    pub agents: BTreeMap<u16, Child>,
}

impl Processes {
    pub fn agent_pid(&self, id: u16) -> Option<i32> {
        self.agents.get(&id).map(|c| c.id() as i32)
    }

    /// The node's process tree: its agent, then the VMs (guests) the agent started.
    pub fn node_pids(&self, id: u16) -> Vec<i32> {
        let Some(pid) = self.agent_pid(id) else {
            return vec![];
        };
        let mut v = vec![pid];
        v.extend(children_of(pid as u32));
        v
    }

    /// The target and the agents.
    pub fn all_pids(&self) -> Vec<i32> {
        self.agents
            .values()
            .chain(self.target.iter())
            .map(|c| c.id() as i32)
            .collect()
    }

    /// The first of the target and the agents found to have exited ("the target", "the
    /// agent of node2"), reaped and forgotten.
    pub fn exited(&mut self) -> Option<(String, ExitStatus)> {
        let exited = |c: &mut Child| c.try_wait().ok().flatten();
        if let Some(status) = self.target.as_mut().and_then(exited) {
            self.target = None;
            return Some(("the target".into(), status));
        }
        let (id, status) = self
            .agents
            .iter_mut()
            .find_map(|(&id, c)| Some((id, exited(c)?)))?;
        self.agents.remove(&id);
        Some((format!("the agent of {}", node_name(id)), status))
    }

    /// kill -9 of a node: its agent and its guests at once, then reap them. Once the
    /// agent is reaped its guests are ours if this process is a child subreaper (the
    /// demo); otherwise waitpid answers ECHILD at once.
    pub fn kill_node(&mut self, id: u16) {
        let pids = self.node_pids(id);
        for &p in &pids {
            sigkill(p);
        }
        if let Some(mut a) = self.agents.remove(&id) {
            let _ = a.wait();
        }
        for &p in pids.iter().skip(1) {
            // ECHILD at once if it is not ours.
            let _ = waitpid(Pid::from_raw(p), None);
        }
    }

    /// SIGKILL the target (its data and PR state are on disk) and reap it.
    pub fn kill_target(&mut self) {
        if let Some(mut t) = self.target.take() {
            sigkill(t.id() as i32);
            let _ = t.wait();
        }
    }

    /// SIGKILL whatever still runs: the agents with their guests, then the target.
    pub fn kill_all(&mut self) {
        let ids: Vec<u16> = self.agents.keys().copied().collect();
        for id in ids {
            self.kill_node(id);
        }
        self.kill_target();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::{self as agent_config, Failback, OfflineAction};
    use crate::server::config as server_config;

    fn layout() -> Layout {
        Layout {
            dir: PathBuf::from("/tmp/holdfast-kit \"quoted\""),
            exe: PathBuf::from("/usr/bin/holdfast"),
            addr: "127.0.0.1:3260".parse().unwrap(),
            target: "iqn.2026-11.org.holdfast:kit".into(),
            cluster: "kit".into(),
        }
    }

    fn groups() -> Vec<GroupSpec> {
        let mut a = GroupSpec::new("web", 1);
        a.preferred = vec!["node2".into(), "node1".into()];
        a.settings.offline_action = OfflineAction::Save;
        a.settings.failback = Failback::Immediately;
        a.settings.restart_threshold = 2;
        a.settings.restart_period = Duration::from_secs(600);
        let mut b = GroupSpec::new("db", 2);
        b.prefer_self = true;
        b.guest_args.extend(["--fail-after".into(), "10".into()]);
        vec![a, b]
    }

    #[test]
    fn target_config_round_trips_through_the_loader() {
        let l = layout();
        let text = toml::to_string(&l.target_config(&groups())).unwrap();
        let v = server_config::parse(&text, "target.toml", Path::new("/")).unwrap();
        assert_eq!(v.data_dir, l.path("data"));
        assert_eq!(v.config.iscsi.nop_interval_secs, 2);
        assert_eq!(v.config.iscsi.nop_timeout_secs, 4);
        let t = &v.config.targets[0];
        assert_eq!(t.name, l.target);
        assert_eq!(v.listen_addrs(), vec![l.addr]);
        let luns: Vec<(u64, PathBuf, u64)> = t
            .luns
            .iter()
            .map(|x| (x.id, x.path.clone(), x.size.0))
            .collect();
        assert_eq!(
            luns,
            vec![
                (0, "quorum.img".into(), 4 << 20),
                (1, "web.img".into(), 16 << 20),
                (2, "db.img".into(), 16 << 20)
            ]
        );
    }

    #[test]
    fn node_config_round_trips_through_the_loader() {
        let l = layout();
        let timings = Timings {
            dead_after: Duration::from_millis(4500),
            ..Timings::default()
        };
        let text = toml::to_string(&l.node_config(3, &groups(), &timings)).unwrap();
        let v = agent_config::parse(&text, "node3.toml").unwrap();
        let n = v.node();
        assert_eq!(
            (n.name.as_str(), n.id, n.cluster.as_str()),
            ("node3", 3, "kit")
        );
        assert_eq!(n.state_dir, l.path("node3"));
        assert_eq!(n.event_log.as_deref(), Some(l.events().as_path()));
        assert_eq!(v.portals, vec![l.addr]);
        assert_eq!(v.timings().dead_after, Duration::from_millis(4500));
        let web = v.group("web").unwrap();
        assert_eq!(web.disks, vec![1]);
        assert_eq!(web.preferred_owners, vec!["node2", "node1"]);
        assert_eq!(web.offline_action, OfflineAction::Save);
        assert_eq!(web.failback, Failback::Immediately);
        assert_eq!(web.restart_threshold, 2);
        assert_eq!(web.restart_period, Duration::from_secs(600));
        assert_eq!(web.monitor_interval, Duration::from_millis(200));
        let db = v.group("db").unwrap();
        assert_eq!(db.preferred_owners, vec!["node3"]);
        let VmConfig::Process(ProcessVm {
            command,
            restore_args,
            save_signal,
            ..
        }) = &db.vm
        else {
            panic!("not a process VM: {:?}", db.vm);
        };
        assert_eq!(command[0], "/usr/bin/holdfast");
        assert_eq!(command[12], l.ack_log("db").display().to_string());
        assert_eq!(command[command.len() - 2..], ["--fail-after", "10"]);
        assert_eq!(restore_args, &["--restore"]);
        assert_eq!(save_signal.as_deref(), Some("SIGUSR1"));
    }
}
