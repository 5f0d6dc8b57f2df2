//! Agent configuration (`node.toml`): TOML via serde, validated before anything starts,
//! with errors that name the file, the key and the reason.

use crate::config_value::{self, ByteSize, ConfigValueError};
use crate::initiator::url::parse_portal;
use crate::initiator::ConnectOptions;
use crate::iscsi::chap::check_secret_len;
use crate::iscsi::name::check_iscsi_name;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Highest node id a quorum LUN has a heartbeat slot for.
pub const MAX_NODE_ID: u16 = 64;

/// The error of every configuration file, shared with the target's.
pub use crate::config_value::ConfigError as AgentConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub target: TargetSection,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name, unique in the cluster (shown in status, used in preferred owners).
    pub name: String,
    /// This node's id, 1..=64, unique in the cluster: its heartbeat slot and PR key.
    pub id: u16,
    /// Cluster name; must match the quorum LUN's header. Part of every PR key.
    pub cluster: String,
    /// The agent's own iSCSI initiator name
    /// [default: iqn.2026-11.org.holdfast:CLUSTER.NODE].
    #[serde(default)]
    pub initiator_name: Option<String>,
    /// The initiator name the VMs' data path uses (QEMU's libiscsi or open-iscsi); the
    /// agent registers it with SPEC_I_PT before a VM starts [default: INITIATOR_NAME.vm].
    #[serde(default)]
    pub vm_initiator_name: Option<String>,
    /// Where VM drivers keep saved states and logs [default: /var/lib/holdfast/agent].
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where saved VM states go ({state_file}). A planned move with `save` restores on
    /// another node only if this is storage every node sees (NFS, a cluster file
    /// system) [default: STATE_DIR].
    #[serde(default)]
    pub shared_state_dir: Option<PathBuf>,
    /// Append every transition as a JSON line to this file [default: STATE_DIR/events.jsonl].
    #[serde(default)]
    pub event_log: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`); absent: no metrics.
    /// `holdfast agent --metrics ADDR` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Rotate the event log when it would grow past this size ("0": never)
    /// [default: 10MiB].
    #[serde(default = "default_event_log_max_size")]
    pub event_log_max_size: ByteSize,
    /// Rotated event logs kept (EVENT_LOG.1 … EVENT_LOG.N) [default: 5].
    #[serde(default = "default_event_log_keep")]
    pub event_log_keep: u32,
    /// Run through `/bin/sh -c` on fence, self-fence, pause, resume, claim failure and
    /// VM restart, with HOLDFAST_ALERT_* variables (README, "Cluster events and alerts").
    #[serde(default)]
    pub alert_command: Option<String>,
    /// An alert command still running after this is killed [default: 30s].
    #[serde(default = "default_alert_timeout", with = "humantime_serde")]
    pub alert_timeout: Duration,
    /// The address this node's incoming live migrations listen on (a port is picked
    /// per migration and published in the group record) [default: 127.0.0.1; set it to
    /// an address the other nodes reach].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_address: Option<String>,
}

fn default_event_log_max_size() -> ByteSize {
    ByteSize(10 << 20)
}

fn default_event_log_keep() -> u32 {
    5
}

fn default_alert_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/holdfast/agent")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Portals ("host:port"), tried in order at every (re)login.
    pub portals: Vec<String>,
    /// The target's iSCSI name.
    pub name: String,
    /// LUN of the quorum LUN.
    pub quorum_lun: u64,
    /// One-way CHAP credentials for the agent's and the VMs' sessions.
    #[serde(default)]
    pub chap: Option<ChapSection>,
}

/// One-way CHAP. The secret is given inline (then node.toml must be mode 0600) or as
/// `secret_file` (mode 0600, one trailing newline ignored, relative to node.toml's
/// directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapSection {
    pub username: String,
    /// 12 to 255 bytes; or `secret_file`.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub secret: Secret,
    /// File holding `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

impl ChapSection {
    /// Read `secret_file` (relative to `base`) into `secret`; both given is refused.
    fn load_secret_file(&mut self, base: &Path) -> Result<(), (String, String)> {
        let Some(p) = &self.secret_file else {
            return Ok(());
        };
        let key = "target.chap.secret_file";
        if !self.secret.is_empty() {
            return Err((
                key.into(),
                "secret and secret_file are mutually exclusive: give one".into(),
            ));
        }
        self.secret = crate::secret::read_secret_file(&base.join(p))
            .map_err(|e| (key.into(), e.to_string()))?;
        Ok(())
    }
}

/// Timings. Safety never depends on them (the target enforces reservations); they decide
/// how soon a dead peer is fenced and how soon a cut-off node stops its VMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timings {
    /// How often the node writes its heartbeat slot.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the node reads the quorum LUN (peers' heartbeats, group records).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest a single iSCSI command may take before the session is dropped and redone.
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// A node that has not completed a heartbeat write for this long pauses its VMs
    /// (and resumes them only if its claims still stand once the target answers again).
    #[serde(with = "humantime_serde")]
    pub self_fence_after: Duration,
    /// A peer whose heartbeat counter has not advanced for this long is fenced.
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// Longest a VM stays paused through a storage outage before it is killed and its
    /// group released (Windows' resiliency period is 4 minutes too). `0s`: never pause,
    /// kill at once.
    #[serde(with = "humantime_serde")]
    pub max_pause: Duration,
    /// Longest a live migration may take, from the destination listening to the
    /// switchover; past it the migration is cancelled and the VM stays on the source.
    #[serde(with = "humantime_serde")]
    pub migration_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat_interval: Duration::from_millis(500),
            poll_interval: Duration::from_millis(200),
            io_timeout: Duration::from_millis(1000),
            self_fence_after: Duration::from_millis(2000),
            dead_after: Duration::from_millis(3000),
            max_pause: Duration::from_secs(240),
            migration_timeout: Duration::from_secs(120),
        }
    }
}

impl Timings {
    /// The rules that keep fencing ahead of failover: a node must notice it is cut off
    /// (and kill its VMs) before its peers give up on it, with room for one more
    /// heartbeat and one slow command in between.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((format!("timings.{k}"), r));
        let ms = |d: Duration| d.as_millis();
        if self.heartbeat_interval < Duration::from_millis(50) {
            return bad("heartbeat_interval", "must be at least 50ms".into());
        }
        if self.poll_interval < Duration::from_millis(20) {
            return bad("poll_interval", "must be at least 20ms".into());
        }
        if self.poll_interval > self.heartbeat_interval {
            return bad(
                "poll_interval",
                format!(
                    "must not exceed heartbeat_interval ({} ms)",
                    ms(self.heartbeat_interval)
                ),
            );
        }
        if self.io_timeout < self.heartbeat_interval {
            return bad(
                "io_timeout",
                format!(
                    "must be at least heartbeat_interval ({} ms)",
                    ms(self.heartbeat_interval)
                ),
            );
        }
        if self.self_fence_after < self.heartbeat_interval + self.io_timeout {
            return bad(
                "self_fence_after",
                format!(
                    "must be at least heartbeat_interval + io_timeout ({} ms)",
                    ms(self.heartbeat_interval + self.io_timeout)
                ),
            );
        }
        if self.dead_after < self.self_fence_after + self.heartbeat_interval {
            return bad(
                "dead_after",
                format!(
                    "must be at least self_fence_after + heartbeat_interval ({} ms), so a \
                     cut-off node kills its VMs before its peers take them over",
                    ms(self.self_fence_after + self.heartbeat_interval)
                ),
            );
        }
        Ok(())
    }
}

/// When a group that runs away from its first preferred owner goes back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    Never,
    Immediately,
    /// Only inside `failback_window` (local time of the owning node).
    Window,
}

/// What "take the group offline" does to its VM (planned moves, ctl offline, drain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineAction {
    /// Save the VM's state (restored on the next start, on whichever node).
    Save,
    /// Graceful shutdown, killed after `stop_timeout`.
    Shutdown,
    /// Kill at once.
    Kill,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name, unique in the cluster, at most 48 bytes.
    pub name: String,
    /// LUNs of the group's disks, in claim order (data disks before the OS disk).
    pub disks: Vec<u64>,
    /// Node names in order of preference; empty = any node.
    #[serde(default)]
    pub preferred_owners: Vec<String>,
    #[serde(default = "default_failback")]
    pub failback: Failback,
    /// "HH:MM-HH:MM" for `failback = "window"` (may wrap midnight).
    #[serde(default)]
    pub failback_window: Option<String>,
    /// Restarts in place allowed within `restart_period` before the group fails over.
    #[serde(default = "default_restart_threshold")]
    pub restart_threshold: u32,
    #[serde(default = "default_restart_period", with = "humantime_serde")]
    pub restart_period: Duration,
    /// How often the VM's status is checked.
    #[serde(default = "default_monitor_interval", with = "humantime_serde")]
    pub monitor_interval: Duration,
    #[serde(default = "default_offline_action")]
    pub offline_action: OfflineAction,
    /// How long a graceful stop or a save may take before the VM is killed.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// The VM and its driver.
    pub vm: VmConfig,
}

impl GroupConfig {
    /// A group with every optional setting at its default (what an omitted key means).
    pub fn new(name: impl Into<String>, disks: Vec<u64>, vm: VmConfig) -> GroupConfig {
        GroupConfig {
            name: name.into(),
            disks,
            preferred_owners: vec![],
            failback: default_failback(),
            failback_window: None,
            restart_threshold: default_restart_threshold(),
            restart_period: default_restart_period(),
            monitor_interval: default_monitor_interval(),
            offline_action: default_offline_action(),
            stop_timeout: default_stop_timeout(),
            vm,
        }
    }
}

fn default_failback() -> Failback {
    Failback::Never
}
fn default_restart_threshold() -> u32 {
    3
}
fn default_restart_period() -> Duration {
    Duration::from_secs(900)
}
fn default_monitor_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_offline_action() -> OfflineAction {
    OfflineAction::Shutdown
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The VM driver and its settings. Strings may use the placeholders of
/// [`super::driver::VmContext::expand`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase", deny_unknown_fields)]
pub enum VmConfig {
    /// The agent runs and supervises a command line (e.g. qemu-system-x86_64).
    Process(ProcessVm),
    /// An rgmanager-style script: `script start|stop|status|save|restore|kill`, and
    /// `pause|resume` when `pause` is set.
    Script {
        path: PathBuf,
        /// Longest any action other than stop/save may take.
        #[serde(default = "default_script_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// The script implements `pause` and `resume`; without it the agent kills the VM
        /// where it would pause it.
        #[serde(default)]
        pause: bool,
    },
    /// A QEMU guest the agent runs itself and drives over QMP (see [`QemuVm`]).
    Qemu(QemuVm),
    /// A libvirt domain driven through virsh.
    Libvirt {
        domain: String,
        /// Domain XML to `virsh define` before the first start on a node.
        #[serde(default)]
        xml: Option<PathBuf>,
        /// libvirt URI (virsh -c) [default: virsh's own].
        #[serde(default)]
        uri: Option<String>,
        /// virsh binary [default: virsh].
        #[serde(default = "default_virsh")]
        virsh: String,
        /// The libvirt URI the source migrates to when this node receives a live
        /// migration; `{migration_address}` is `node.migration_address`
        /// [default: `qemu+ssh://{migration_address}/system`].
        #[serde(default)]
        migrate_uri: Option<String>,
    },
}

impl VmConfig {
    /// A `process` VM running `command`, every optional setting at its default.
    pub fn process(command: Vec<String>) -> VmConfig {
        VmConfig::Process(ProcessVm::new(command))
    }
}

/// The `process` driver's settings ([`VmConfig::Process`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessVm {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra arguments when restoring a saved state (e.g. ["-incoming", "file:{state_file}"]).
    #[serde(default)]
    pub restore_args: Vec<String>,
    /// Signal asking the program to save its state to {state_file} and exit 0
    /// ("SIGUSR1"); unset = this VM cannot save (save falls back to shutdown).
    #[serde(default)]
    pub save_signal: Option<String>,
    /// Signal for a graceful stop [default: SIGTERM].
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Environment added to the program's.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// File receiving the program's stdout and stderr [default: STATE_DIR/GROUP.log].
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// QEMU's QMP socket ("{state_dir}/{group}.qmp", given to QEMU as `-qmp
    /// unix:PATH,server=on,wait=off`): pause and resume then use QMP `stop` and `cont`
    /// instead of SIGSTOP and SIGCONT to the process group.
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// Cap on a live migration's transfer from this VM, bytes per second ("100MiB")
    /// [default: 1GiB]: the migration network's share is the operator's to size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_bandwidth: Option<ByteSize>,
}

impl ProcessVm {
    /// Settings running `command`, every optional one at its default.
    pub fn new(command: Vec<String>) -> ProcessVm {
        ProcessVm {
            command,
            restore_args: vec![],
            save_signal: None,
            stop_signal: default_stop_signal(),
            env: Default::default(),
            log: None,
            qmp: None,
            migration_bandwidth: None,
        }
    }
}

/// The `qemu` driver's settings ([`VmConfig::Qemu`]): the agent builds the QEMU command
/// line (the group's disks over iscsi:// with the node's VM initiator name, a QMP socket,
/// serial ports appended to files) and stops, saves, restores, pauses and watches the
/// guest over QMP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuVm {
    /// The emulator [default: qemu-system-x86_64].
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// `-machine` [default: q35,accel=kvm:tcg].
    #[serde(default = "default_machine")]
    pub machine: String,
    /// `-m` [default: 256M].
    #[serde(default = "default_memory")]
    pub memory: String,
    /// `-smp` [default: 1].
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Kernel to boot directly (`-kernel`); without it the guest boots from its disks.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// `-initrd`; needs `kernel`.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`); needs `kernel`.
    #[serde(default)]
    pub append: Option<String>,
    /// Files the guest's serial ports (ttyS0, ttyS1, …) are appended to.
    #[serde(default)]
    pub serial: Vec<PathBuf>,
    /// More QEMU arguments, added after the ones the driver builds (NICs, say).
    #[serde(default)]
    pub args: Vec<String>,
    /// QMP socket [default: {state_dir}/{group}.qmp].
    #[serde(default)]
    pub qmp: Option<PathBuf>,
    /// File receiving QEMU's stdout and stderr [default: STATE_DIR/GROUP.log].
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Cap on a live migration's transfer from this guest, bytes per second ("100MiB")
    /// [default: 1GiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_bandwidth: Option<ByteSize>,
}

impl QemuVm {
    /// A guest booting `kernel`, every other setting at its default.
    pub fn new(kernel: Option<PathBuf>) -> QemuVm {
        QemuVm {
            qemu: default_qemu(),
            machine: default_machine(),
            memory: default_memory(),
            cpus: default_cpus(),
            kernel,
            initrd: None,
            append: None,
            serial: vec![],
            args: vec![],
            qmp: None,
            log: None,
            migration_bandwidth: None,
        }
    }
}

fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn default_machine() -> String {
    "q35,accel=kvm:tcg".into()
}
fn default_memory() -> String {
    "256M".into()
}
fn default_cpus() -> u32 {
    1
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_script_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_virsh() -> String {
    "virsh".into()
}

/// A validated configuration and the facts derived from it.
#[derive(Debug, Clone)]
pub struct ValidNodeConfig {
    pub config: NodeConfig,
    pub source: String,
    pub initiator_name: String,
    pub vm_initiator_name: String,
    pub portals: Vec<SocketAddr>,
}

impl ValidNodeConfig {
    pub fn node(&self) -> &NodeSection {
        &self.config.node
    }
    pub fn timings(&self) -> &Timings {
        &self.config.timings
    }
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.config.groups.iter().find(|g| g.name == name)
    }

    /// How this node logs in to the target: its initiator name, the given fixed ISID
    /// (one nexus per role: agent, ctl) and the target's CHAP.
    pub fn connect_options(&self, isid: [u8; 6], login_timeout: Duration) -> ConnectOptions {
        let chap = self.config.target.chap.as_ref();
        let mut opts = ConnectOptions::new(self.initiator_name.clone()).with_chap(
            chap.map(|c| c.username.as_str()),
            chap.map(|c| c.secret.expose()),
        );
        opts.isid = Some(isid);
        opts.login_timeout = Some(login_timeout);
        opts
    }
}

/// Load and validate node.toml: a secret inline needs the file private (mode 0600), a
/// `secret_file` is read relative to the file's directory.
pub fn load_file(path: &Path) -> Result<ValidNodeConfig, AgentConfigError> {
    let (config, file) = config_value::read_toml::<NodeConfig>(path)?;
    if config
        .target
        .chap
        .as_ref()
        .is_some_and(|c| !c.secret.is_empty())
    {
        crate::secret::require_private(path).map_err(|e| {
            ConfigValueError::new(
                &file,
                "target.chap.secret",
                format!("{e} (or move it to a secret_file)"),
            )
        })?;
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    validate(config, &file, &base)
}

/// Parse and validate node.toml's text; `base` anchors a relative `secret_file`.
pub fn parse(text: &str, file: &str) -> Result<ValidNodeConfig, AgentConfigError> {
    validate(config_value::parse_toml(text, file)?, file, Path::new(""))
}

/// "HH:MM-HH:MM" → (start minute, end minute) of the day.
pub fn parse_window(s: &str) -> Result<(u16, u16), String> {
    let hm = |p: &str| -> Result<u16, String> {
        let (h, m) = p
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{p:?} is not HH:MM"))?;
        let h: u16 = h.parse().map_err(|_| format!("{p:?} is not HH:MM"))?;
        let m: u16 = m.parse().map_err(|_| format!("{p:?} is not HH:MM"))?;
        if h > 23 || m > 59 {
            return Err(format!("{p:?} is not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not HH:MM-HH:MM"))?;
    let (a, b) = (hm(a)?, hm(b)?);
    if a == b {
        return Err(format!("{s:?} is an empty window"));
    }
    Ok((a, b))
}

/// Why `name` (the value of `key`) is not an iSCSI name; a name the agent derived
/// (`derived_from` given) points at the setting that would replace it.
fn iscsi_name_reason(name: &str, key: &str, derived_from: Option<&str>) -> Result<(), String> {
    check_iscsi_name(name).map_err(|e| match derived_from {
        None => format!("{name:?} is not a valid iSCSI name: {e}"),
        Some(from) => {
            format!("{name:?} is not a valid iSCSI name: {e} (derived from {from}: set {key})")
        }
    })
}

fn validate(
    mut config: NodeConfig,
    file: &str,
    base: &Path,
) -> Result<ValidNodeConfig, AgentConfigError> {
    let bad = |key: &str, reason: String| -> AgentConfigError {
        ConfigValueError::new(file, key, reason).into()
    };
    if let Some(c) = &mut config.target.chap {
        c.load_secret_file(base).map_err(|(k, r)| bad(&k, r))?;
    }
    let (initiator_name, vm_initiator_name) = check_node(&config.node, &bad)?;
    let portals = check_target(&config.target, &bad)?;
    check_alert(&config.node, &bad)?;
    config.timings.check().map_err(|(k, r)| bad(&k, r))?;
    let mut names = HashSet::new();
    let mut claimed_luns = HashSet::new();
    for (i, g) in config.groups.iter().enumerate() {
        let key = |k: &str| format!("group[{i}].{k}");
        let quorum_lun = config.target.quorum_lun;
        check_group(g, &key, quorum_lun, &mut names, &mut claimed_luns, &bad)?;
        check_vm(&g.vm, &key, &bad)?;
    }
    Ok(ValidNodeConfig {
        config,
        source: file.to_string(),
        initiator_name,
        vm_initiator_name,
        portals,
    })
}

/// An alert command must say something, and get time to run.
fn check_alert(n: &NodeSection, bad: &Bad<'_>) -> Result<(), AgentConfigError> {
    if n.alert_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(bad("node.alert_command", "must not be empty".into()));
    }
    if n.alert_timeout.is_zero() {
        return Err(bad("node.alert_timeout", "must be more than 0s".into()));
    }
    Ok(())
}

/// Turns a key and a reason into the file's error.
type Bad<'a> = dyn Fn(&str, String) -> AgentConfigError + 'a;

/// The node's initiator names: given, or derived from the cluster and node names.
fn check_node(n: &NodeSection, bad: &Bad<'_>) -> Result<(String, String), AgentConfigError> {
    if n.name.is_empty() || n.name.len() > 32 || !n.name.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(bad(
            "node.name",
            "must be 1-32 printable ASCII characters without spaces".into(),
        ));
    }
    if n.id == 0 || n.id > MAX_NODE_ID {
        return Err(bad("node.id", format!("must be 1..={MAX_NODE_ID}")));
    }
    if n.cluster.is_empty()
        || n.cluster.len() > 64
        || !n.cluster.bytes().all(|c| c.is_ascii_graphic())
    {
        return Err(bad(
            "node.cluster",
            "must be 1-64 printable ASCII characters without spaces".into(),
        ));
    }
    let initiator_name = n.initiator_name.clone().unwrap_or_else(|| {
        format!(
            "iqn.2026-11.org.holdfast:{}.{}",
            n.cluster.to_ascii_lowercase(),
            n.name.to_ascii_lowercase()
        )
    });
    let key = "node.initiator_name";
    let derived = n
        .initiator_name
        .is_none()
        .then_some("node.cluster and node.name");
    iscsi_name_reason(&initiator_name, key, derived).map_err(|r| bad(key, r))?;
    let vm_initiator_name = n
        .vm_initiator_name
        .clone()
        .unwrap_or_else(|| format!("{initiator_name}.vm"));
    let key = "node.vm_initiator_name";
    let derived = n.vm_initiator_name.is_none().then_some("initiator_name");
    iscsi_name_reason(&vm_initiator_name, key, derived).map_err(|r| bad(key, r))?;
    if vm_initiator_name == initiator_name {
        return Err(bad(
            "node.vm_initiator_name",
            "must differ from initiator_name: the agent's own session and the VMs' data \
             path are different I_T nexuses"
                .into(),
        ));
    }
    Ok((initiator_name, vm_initiator_name))
}

/// The target's portals, resolved (HOST[:PORT], port 3260 by default).
fn check_target(t: &TargetSection, bad: &Bad<'_>) -> Result<Vec<SocketAddr>, AgentConfigError> {
    if t.portals.is_empty() {
        return Err(bad(
            "target.portals",
            "at least one portal is needed".into(),
        ));
    }
    let mut portals = Vec::new();
    for p in &t.portals {
        let (host, port) =
            parse_portal(p).map_err(|e| bad("target.portals", format!("{p:?}: {e}")))?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| bad("target.portals", format!("{p:?}: {e}")))?
            .next()
            .ok_or_else(|| bad("target.portals", format!("{p:?} resolves to nothing")))?;
        portals.push(addr);
    }
    iscsi_name_reason(&t.name, "target.name", None).map_err(|r| bad("target.name", r))?;
    if t.quorum_lun > 16383 {
        return Err(bad("target.quorum_lun", "must be at most 16383".into()));
    }
    if let Some(c) = &t.chap {
        if c.secret.is_empty() {
            let why = "is missing: give secret or secret_file";
            return Err(bad("target.chap.secret", why.into()));
        }
        check_secret_len(c.secret.len()).map_err(|r| bad("target.chap.secret", r))?;
    }
    Ok(portals)
}

/// One group's own settings; `names` and `claimed` collect every group's name and LUNs.
fn check_group(
    g: &GroupConfig,
    key: &dyn Fn(&str) -> String,
    quorum_lun: u64,
    names: &mut HashSet<String>,
    claimed: &mut HashSet<u64>,
    bad: &Bad<'_>,
) -> Result<(), AgentConfigError> {
    if g.name.is_empty()
        || g.name.len() > 48
        || !g
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        return Err(bad(
            &key("name"),
            "must be 1-48 characters of A-Z a-z 0-9 - _ .".into(),
        ));
    }
    if !names.insert(g.name.clone()) {
        return Err(bad(&key("name"), format!("{:?} is used twice", g.name)));
    }
    if g.disks.is_empty() || g.disks.len() > 16 {
        return Err(bad(&key("disks"), "must list 1 to 16 LUNs".into()));
    }
    for d in &g.disks {
        if *d == quorum_lun {
            return Err(bad(&key("disks"), format!("LUN {d} is the quorum LUN")));
        }
        if *d > 16383 {
            return Err(bad(&key("disks"), format!("LUN {d} is above 16383")));
        }
        if !claimed.insert(*d) {
            return Err(bad(
                &key("disks"),
                format!("LUN {d} belongs to two groups (or twice to this one)"),
            ));
        }
    }
    if g.restart_period.is_zero() {
        return Err(bad(&key("restart_period"), "must be positive".into()));
    }
    if g.monitor_interval < Duration::from_millis(50) {
        return Err(bad(
            &key("monitor_interval"),
            "must be at least 50ms".into(),
        ));
    }
    match (g.failback, &g.failback_window) {
        (Failback::Window, None) => {
            return Err(bad(
                &key("failback_window"),
                "is needed with failback = \"window\"".into(),
            ))
        }
        (Failback::Window, Some(w)) => {
            parse_window(w).map_err(|r| bad(&key("failback_window"), r))?;
        }
        (_, Some(_)) => {
            return Err(bad(
                &key("failback_window"),
                "only applies with failback = \"window\"".into(),
            ))
        }
        _ => {}
    }
    Ok(())
}

fn check_vm(
    vm: &VmConfig,
    key: &dyn Fn(&str) -> String,
    bad: &Bad<'_>,
) -> Result<(), AgentConfigError> {
    match vm {
        VmConfig::Process(ProcessVm {
            command,
            save_signal,
            stop_signal,
            migration_bandwidth,
            ..
        }) => {
            if command.is_empty() || command[0].is_empty() {
                return Err(bad(&key("vm.command"), "must name a program".into()));
            }
            check_bandwidth(*migration_bandwidth, key, bad)?;
            for (k, s) in [
                ("vm.stop_signal", Some(stop_signal)),
                ("vm.save_signal", save_signal.as_ref()),
            ] {
                if let Some(s) = s {
                    if super::driver::signal_number(s).is_none() {
                        return Err(bad(&key(k), format!("{s:?} is not a signal name")));
                    }
                }
            }
        }
        VmConfig::Script { path, .. } => {
            if path.as_os_str().is_empty() {
                return Err(bad(&key("vm.path"), "must name a script".into()));
            }
        }
        VmConfig::Qemu(q) => check_qemu(q, key, bad)?,
        VmConfig::Libvirt { domain, .. } => {
            if domain.is_empty() {
                return Err(bad(&key("vm.domain"), "must name a domain".into()));
            }
        }
    }
    Ok(())
}

/// A zero cap is refused: it names no rate (QEMU versions differ on what 0 means).
fn check_bandwidth(
    b: Option<ByteSize>,
    key: &dyn Fn(&str) -> String,
    bad: &Bad<'_>,
) -> Result<(), AgentConfigError> {
    match b {
        Some(ByteSize(0)) => Err(bad(
            &key("vm.migration_bandwidth"),
            "must be more than 0".into(),
        )),
        _ => Ok(()),
    }
}

fn check_qemu(
    q: &QemuVm,
    key: &dyn Fn(&str) -> String,
    bad: &Bad<'_>,
) -> Result<(), AgentConfigError> {
    if q.qemu.is_empty() {
        return Err(bad(&key("vm.qemu"), "must name a program".into()));
    }
    if q.cpus == 0 {
        return Err(bad(&key("vm.cpus"), "must be at least 1".into()));
    }
    check_bandwidth(q.migration_bandwidth, key, bad)?;
    if q.kernel.is_none() {
        for (k, set) in [
            ("vm.initrd", q.initrd.is_some()),
            ("vm.append", q.append.is_some()),
        ] {
            if set {
                return Err(bad(&key(k), "needs vm.kernel".into()));
            }
        }
    }
    // QEMU reads these as comma-separated option lists: a comma would split them.
    for (k, p) in [("vm.qmp", q.qmp.as_ref())]
        .into_iter()
        .chain(q.serial.iter().map(|p| ("vm.serial", Some(p))))
    {
        if p.is_some_and(|p| p.to_string_lossy().contains(',')) {
            return Err(bad(&key(k), "a path with a comma".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[node]
name = "n1"
id = 1
cluster = "lab"
[target]
portals = ["127.0.0.1:3260"]
name = "iqn.2026-11.org.holdfast:storage"
quorum_lun = 0
[[group]]
name = "web"
disks = [1]
[group.vm]
driver = "process"
command = ["sleep", "1000"]
"#;

    #[test]
    fn chap_secret_inline_needs_a_private_file_or_comes_from_secret_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let with_chap = |body: &str| {
            MINIMAL.replace(
                "quorum_lun = 0\n",
                &format!("quorum_lun = 0\n[target.chap]\nusername = \"u\"\n{body}\n"),
            )
        };
        let inline = with_chap("secret = \"inline-secret-1\"");
        let p = write("open.toml", &inline, 0o644);
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
        assert!(e.contains("target.chap.secret"), "{e}");
        let p = write("private.toml", &inline, 0o600);
        let v = load_file(&p).unwrap();
        assert_eq!(
            v.config.target.chap.unwrap().secret.expose(),
            "inline-secret-1"
        );
        write("chap.secret", "file-secret-22\n", 0o600);
        let p = write(
            "file.toml",
            &with_chap("secret_file = \"chap.secret\""),
            0o644,
        );
        let v = load_file(&p).unwrap();
        let shown = toml::to_string(&v.config).unwrap();
        assert!(!shown.contains("file-secret-22"), "{shown}");
        assert!(!format!("{v:?}").contains("file-secret-22"));
        let opts = v.connect_options([0; 6], Duration::from_secs(1));
        assert!(!format!("{opts:?}").contains("file-secret-22"), "{opts:?}");
        assert_eq!(opts.chap.unwrap().1, b"file-secret-22");
        let both = with_chap("secret = \"inline-secret-1\"\nsecret_file = \"chap.secret\"");
        let p = write("both.toml", &both, 0o600);
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("mutually exclusive"), "{e}");
        // The one length rule: 17 bytes, once refused here, is accepted like on the target.
        assert!(parse(&with_chap("secret = \"seventeen-bytes-x\""), "n.toml").is_ok());
        let e = parse(&with_chap("secret = \"short\""), "n.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target.chap.secret: must be 12 to 255 bytes"),
            "{e}"
        );
    }

    /// Before the shared validator the agent checked only the iqn./eui./naa. prefix.
    #[test]
    fn names_follow_the_shared_iscsi_name_rules() {
        let err = |text: &str| parse(text, "n.toml").unwrap_err().to_string();
        let e = err(&MINIMAL.replace("iqn.2026-11.org.holdfast:storage", "iqn.a:b"));
        assert!(
            e.starts_with("n.toml: target.name: \"iqn.a:b\" is not a valid iSCSI name"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("name = \"n1\"", "name = \"n_1\""));
        assert!(
            e.contains("node.initiator_name") && e.contains("set node.initiator_name"),
            "{e}"
        );
        let ok = MINIMAL.replace(
            "cluster = \"lab\"",
            "cluster = \"lab\"\ninitiator_name = \"eui.02004567A425678D\"",
        );
        // INITIATOR_NAME.vm is no eui. name: the VM name has to be given.
        let e = err(&ok);
        assert!(
            e.contains("node.vm_initiator_name") && e.contains("set node.vm_initiator_name"),
            "{e}"
        );
        let ok = ok.replace(
            "initiator_name = \"eui.02004567A425678D\"",
            "initiator_name = \"eui.02004567A425678D\"\nvm_initiator_name = \"eui.02004567A425678E\"",
        );
        assert_eq!(
            parse(&ok, "n.toml").unwrap().vm_initiator_name,
            "eui.02004567A425678E"
        );
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.initiator_name, "iqn.2026-11.org.holdfast:lab.n1");
        assert_eq!(c.vm_initiator_name, "iqn.2026-11.org.holdfast:lab.n1.vm");
        assert!(c.config.timings.check().is_ok());
        let g = &c.config.groups[0];
        assert_eq!(g.restart_threshold, 3);
        assert_eq!(g.restart_period, Duration::from_secs(900));
        assert_eq!(g.failback, Failback::Never);
    }

    #[test]
    fn inconsistent_timings_are_refused_with_the_key() {
        let text = format!("{MINIMAL}\n[timings]\ndead_after = \"2s\"\n");
        let e = parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("timings.dead_after"), "{e}");
        let text = format!("{MINIMAL}\n[timings]\nself_fence_after = \"1s\"\n");
        let e = parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("timings.self_fence_after"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            ("id = 1", "id = 0", "node.id"),
            ("disks = [1]", "disks = [0]", "group[0].disks"),
            ("disks = [1]", "disks = []", "group[0].disks"),
            ("name = \"web\"", "name = \"w b\"", "group[0].name"),
            (
                "command = [\"sleep\", \"1000\"]",
                "command = []",
                "group[0].vm.command",
            ),
        ] {
            let e = parse(&MINIMAL.replace(from, to), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{from} -> {to}: {e}");
        }
        let e = parse(&MINIMAL.replace("id = 1", "id = 1\nbogus = 2"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn qemu_vm_parses_with_defaults_and_refuses_what_qemu_cannot_take() {
        let qemu = |vm: &str| {
            MINIMAL.replace(
                "driver = \"process\"\ncommand = [\"sleep\", \"1000\"]",
                &format!("driver = \"qemu\"\n{vm}"),
            )
        };
        let c = parse(&qemu("kernel = \"/k\"\nserial = [\"/a\"]"), "t.toml").unwrap();
        let VmConfig::Qemu(q) = &c.config.groups[0].vm else {
            panic!("{:?}", c.config.groups[0].vm)
        };
        assert_eq!(
            (&*q.qemu, &*q.machine, &*q.memory, q.cpus),
            ("qemu-system-x86_64", "q35,accel=kvm:tcg", "256M", 1)
        );
        assert_eq!(q.serial, vec![PathBuf::from("/a")]);
        assert!(q.qmp.is_none() && q.initrd.is_none());
        for (vm, key) in [
            ("append = \"quiet\"", "group[0].vm.append"),
            ("cpus = 0", "group[0].vm.cpus"),
            ("qemu = \"\"", "group[0].vm.qemu"),
            ("serial = [\"/a,b\"]", "group[0].vm.serial"),
            ("qmp = \"/q,server=off\"", "group[0].vm.qmp"),
            ("kernel = \"/k\"\nbogus = 1", "bogus"),
            ("migration_bandwidth = 0", "group[0].vm.migration_bandwidth"),
        ] {
            let e = parse(&qemu(vm), "t.toml").unwrap_err().to_string();
            assert!(e.contains(key), "{vm}: {e}");
        }
    }

    #[test]
    fn migration_bandwidth_is_a_size_per_second_and_never_zero() {
        let with = |line: &str| {
            MINIMAL.replace(
                "driver = \"process\"\n",
                &format!("driver = \"process\"\n{line}\n"),
            )
        };
        let c = parse(&with("migration_bandwidth = \"4MiB\""), "t.toml").unwrap();
        let VmConfig::Process(p) = &c.config.groups[0].vm else {
            panic!("{:?}", c.config.groups[0].vm)
        };
        assert_eq!(p.migration_bandwidth, Some(ByteSize(4 << 20)));
        let c = parse(MINIMAL, "t.toml").unwrap();
        let VmConfig::Process(p) = &c.config.groups[0].vm else {
            panic!("{:?}", c.config.groups[0].vm)
        };
        assert_eq!(p.migration_bandwidth, None);
        let e = parse(&with("migration_bandwidth = \"0\""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("group[0].vm.migration_bandwidth"), "{e}");
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("22:00-06:30"), Ok((1320, 390)));
        assert!(parse_window("25:00-01:00").is_err());
        assert!(parse_window("01:00-01:00").is_err());
        assert!(parse_window("0100").is_err());
    }
}
