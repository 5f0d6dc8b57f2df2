//! Target configuration: TOML via serde, validated before anything starts, with errors
//! that name the file, the key and the reason.

pub use crate::config_value::ByteSize;
use crate::config_value::{self, ConfigValueError};
use crate::iscsi::chap::check_secret_len;
use crate::iscsi::login::TargetKeyPolicy;
use crate::iscsi::name::check_iscsi_name;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default target name served by the embedded configuration.
pub const DEFAULT_TARGET_NAME: &str = "iqn.2026-11.org.holdfast:storage";

/// The embedded default configuration: what `holdfast target` serves with no `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"
# holdfast embedded default: one target, a 64 MiB quorum LUN and an 8 GiB VM-disk LUN,
# sparse files under ./holdfast-data, portal 127.0.0.1:3260, open to every initiator.
data_dir = "holdfast-data"

[[target]]
name = "iqn.2026-11.org.holdfast:storage"
alias = "holdfast storage"

[[target.portal]]
listen = "127.0.0.1:3260"
tpgt = 1

[[target.lun]]
id = 0
path = "quorum.img"
size = "64MiB"

[[target.lun]]
id = 1
path = "vmdisk.img"
size = "8GiB"
"#;

pub use crate::config_value::ConfigError;

/// Whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for backing files given as relative paths (relative to the config
    /// file's directory; for the embedded default, to the working directory).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// iSCSI negotiation limits the target offers.
    #[serde(default)]
    pub iscsi: IscsiSettings,
    /// Resource limits that keep one peer from starving the others.
    #[serde(default)]
    pub limits: LimitSettings,
    /// CHAP required for discovery sessions (absent: discovery is open, filtered by ACL).
    #[serde(default)]
    pub discovery_chap: Option<ChapConfig>,
    /// Unix socket (mode 0600) of the admin interface: `holdfast target reload`,
    /// `sessions`, `luns`, `show`. Relative paths as for data_dir; absent:
    /// `<data_dir>/admin.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`); absent: no metrics.
    /// `holdfast target --metrics ADDR` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// The Ceph cluster that LUNs with `rbd = "POOL/IMAGE"` are served from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephConfig>,
    /// ALUA: this gateway's target port group and the other gateways' (RBD LUNs served
    /// through several gateways). Absent: one group, id 1.
    #[serde(default, skip_serializing_if = "AluaConfig::is_default")]
    pub alua: AluaConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
}

/// `[ceph]`: how the target reaches the cluster holding its RBD images.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CephConfig {
    /// ceph.conf naming the monitors (relative to the config file's directory).
    #[serde(default = "default_ceph_conf")]
    pub conf: PathBuf,
    /// The cephx user, "client.NAME".
    #[serde(default = "default_ceph_client")]
    pub client: String,
    /// Keyring holding the user's key; absent: the keyring ceph.conf names (by default
    /// /etc/ceph/ceph.client.NAME.keyring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// Limit on connecting and on each RADOS operation; a cluster that stops answering
    /// fails commands (MEDIUM ERROR, logged) after this long instead of hanging them.
    #[serde(default = "default_ceph_timeout", with = "humantime_serde")]
    pub timeout: std::time::Duration,
    /// How long a PR OUT waits for every other gateway to install the new reservation
    /// state; a gateway that has not acknowledged by then is blocklisted in Ceph.
    #[serde(default = "default_ceph_notify_timeout", with = "humantime_serde")]
    pub notify_timeout: std::time::Duration,
}

/// `[alua]`: one target port group per gateway. A group's target ports are its targets'
/// portal groups: relative target port id = tpgt, so tpgts must be unique across the
/// gateways serving the same images (as group ids must).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AluaConfig {
    /// This gateway's target port group id (1–65535).
    #[serde(default = "default_alua_group")]
    pub group: u16,
    /// The other gateways serving the same images, reported by REPORT TARGET PORT GROUPS.
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<AluaPeer>,
}

impl Default for AluaConfig {
    fn default() -> Self {
        AluaConfig {
            group: default_alua_group(),
            peers: Vec::new(),
        }
    }
}

fn default_alua_group() -> u16 {
    1
}

/// `[[alua.peer]]`: another gateway's target port group.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AluaPeer {
    pub group: u16,
    /// That gateway's tpgts (its relative target port ids); absent: `[group]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

impl AluaConfig {
    fn is_default(&self) -> bool {
        *self == AluaConfig::default()
    }
}

impl AluaPeer {
    pub fn ports(&self) -> Vec<u16> {
        if self.ports.is_empty() {
            vec![self.group]
        } else {
            self.ports.clone()
        }
    }
}

fn default_ceph_conf() -> PathBuf {
    PathBuf::from("/etc/ceph/ceph.conf")
}
fn default_ceph_client() -> String {
    "client.holdfast".into()
}
fn default_ceph_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}
fn default_ceph_notify_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("holdfast-data")
}

/// iSCSI settings shared by all targets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiSettings {
    /// Largest data segment we accept (MaxRecvDataSegmentLength we declare).
    pub max_recv_data_segment_length: u32,
    /// Upper bound for MaxBurstLength.
    pub max_burst_length: u32,
    /// Upper bound for FirstBurstLength.
    pub first_burst_length: u32,
    /// Offer ImmediateData=Yes.
    pub immediate_data: bool,
    /// Offer InitialR2T=No (unsolicited data) when false.
    pub initial_r2t: bool,
    /// Upper bound for MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// Commands one session may have outstanding (the CmdSN window).
    pub queue_depth: u32,
    /// Seconds of silence on a connection before the target sends a NOP-In ping.
    pub nop_interval_secs: u64,
    /// Seconds to wait for the ping's answer before dropping the connection.
    pub nop_timeout_secs: u64,
    /// Seconds a connection may spend in the login phase.
    pub login_timeout_secs: u64,
}

impl Default for IscsiSettings {
    /// The login defaults of [`TargetKeyPolicy`], with a deeper R2T pipeline.
    fn default() -> Self {
        let k = TargetKeyPolicy::default();
        Self {
            max_recv_data_segment_length: k.max_recv_data_segment_length,
            max_burst_length: k.max_burst_length,
            first_burst_length: k.first_burst_length,
            immediate_data: k.immediate_data,
            initial_r2t: k.initial_r2t,
            max_outstanding_r2t: 4,
            queue_depth: 128,
            nop_interval_secs: 10,
            nop_timeout_secs: 30,
            login_timeout_secs: 15,
        }
    }
}

impl IscsiSettings {
    /// The key policy a target offers at login under these settings.
    pub fn key_policy(&self) -> TargetKeyPolicy {
        TargetKeyPolicy {
            max_recv_data_segment_length: self.max_recv_data_segment_length,
            max_burst_length: self.max_burst_length,
            first_burst_length: self.first_burst_length,
            immediate_data: self.immediate_data,
            initial_r2t: self.initial_r2t,
            max_outstanding_r2t: self.max_outstanding_r2t,
            target_alias: None,
            ..TargetKeyPolicy::default()
        }
    }
}

/// Resource limits shared by all targets. Refusals are polite: a login beyond a
/// connection or session limit gets status 0x0302 (OUT OF RESOURCES, "the target has
/// insufficient session, connection, or other resources"; 0x0206 is about the
/// connections of one session, which ErrorRecoveryLevel 0 keeps at one); a command that
/// cannot get buffer memory gets BUSY or TASK SET FULL (SAM-5), which initiators retry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Open TCP connections over all portals, logging in or logged in; beyond it a new
    /// connection is closed at once.
    pub max_connections: u32,
    /// Sessions (discovery and normal) over all targets.
    pub max_sessions: u32,
    /// Connections (= sessions at ErrorRecoveryLevel 0) to one target.
    pub max_connections_per_target: u32,
    /// Connections from one initiator name over all targets.
    pub max_connections_per_initiator: u32,
    /// Bytes of Data-Out and Data-In buffers all commands together may hold; a command
    /// that does not fit is answered BUSY or TASK SET FULL and retried by the initiator.
    pub buffer_memory: ByteSize,
    /// Largest expected data transfer length of one command; larger ones fail with
    /// ILLEGAL REQUEST / INVALID FIELD IN CDB before anything is allocated. The default
    /// matches the 64 MiB maximum transfer length the Block Limits VPD page advertises.
    pub max_command_bytes: ByteSize,
    /// Failed CHAP logins of one initiator name within `chap_failure_window_secs` that
    /// start a lockout.
    pub chap_max_failures: u32,
    /// Window in which CHAP failures are counted.
    pub chap_failure_window_secs: u64,
    /// Seconds a locked-out initiator's logins are refused (AUTHENTICATION FAILURE).
    pub chap_lockout_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_sessions: 512,
            max_connections_per_target: 256,
            max_connections_per_initiator: 64,
            buffer_memory: ByteSize(256 << 20),
            max_command_bytes: ByteSize(64 << 20),
            chap_max_failures: 3,
            chap_failure_window_secs: 60,
            chap_lockout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// iSCSI qualified name (iqn.…, eui.… or naa.…).
    pub name: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default, rename = "portal")]
    pub portals: Vec<PortalConfig>,
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
    /// Initiators allowed (absent or empty: every initiator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclConfig>,
    /// CHAP required for normal sessions to this target.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// Address and port to listen on, e.g. "0.0.0.0:3260" or "[::]:3260".
    pub listen: String,
    /// Target portal group tag (1–65535).
    #[serde(default = "default_tpgt")]
    pub tpgt: u16,
}

fn default_tpgt() -> u16 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    /// Logical unit number (0–16383).
    pub id: u64,
    /// Backing file (created sparse if missing; relative to data_dir). Give this or `rbd`.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub path: PathBuf,
    /// RBD image "POOL/IMAGE" in the `[ceph]` cluster (it must exist and hold at least
    /// `size` bytes). Give this or `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<String>,
    /// Size of the LUN; the file is extended if smaller, never truncated.
    pub size: ByteSize,
    /// Unit serial number (VPD 0x80); generated and persisted if absent.
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Logical block size: 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Physical block size reported to initiators (a power-of-two multiple of
    /// block_size, at most 32 KiB); defaults to block_size.
    #[serde(default)]
    pub physical_block_size: Option<u32>,
    /// Initial write-back cache state (WCE); when false every write is flushed before
    /// its status is returned.
    #[serde(default = "default_true")]
    pub write_cache: bool,
    /// Report thin provisioning (UNMAP, WRITE SAME with UNMAP, GET LBA STATUS).
    #[serde(default = "default_true")]
    pub thin_provisioning: bool,
    #[serde(default)]
    pub product: Option<String>,
}

impl LunConfig {
    /// A LUN with every optional setting at its default (what an omitted key means).
    pub fn new(id: u64, path: impl Into<PathBuf>, size: ByteSize) -> LunConfig {
        LunConfig {
            id,
            path: path.into(),
            rbd: None,
            size,
            serial: None,
            read_only: false,
            block_size: default_block_size(),
            physical_block_size: None,
            write_cache: true,
            thin_provisioning: true,
            product: None,
        }
    }
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Where a LUN's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing<'a> {
    File(&'a Path),
    Rbd { pool: &'a str, image: &'a str },
}

impl LunConfig {
    /// The validated backing store (exactly one of `path` and `rbd` is set).
    pub fn backing(&self) -> Backing<'_> {
        match self.rbd.as_deref().and_then(|s| s.split_once('/')) {
            Some((pool, image)) => Backing::Rbd { pool, image },
            None => Backing::File(&self.path),
        }
    }

    /// The file this LUN's identity and reservation sidecars hang off: the backing file,
    /// or `rbd/POOL/IMAGE` (under data_dir) for an image.
    pub fn sidecar_base(&self) -> PathBuf {
        match self.backing() {
            Backing::File(p) => p.to_path_buf(),
            Backing::Rbd { pool, image } => Path::new("rbd").join(pool).join(image),
        }
    }
}

fn default_block_size() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Initiator name allowed to discover and log in.
    pub initiator: String,
    /// LUNs it sees (absent: all).
    #[serde(default)]
    pub luns: Option<Vec<u64>>,
    /// Per-initiator CHAP credentials (override the target's).
    #[serde(default)]
    pub chap: Option<ChapConfig>,
}

/// CHAP credentials. Each secret is given inline or as a file (`secret_file`,
/// `mutual_secret_file`: mode 0600, one trailing newline ignored, relative to the config
/// file's directory); a config file holding a secret inline must itself be 0600.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    pub username: String,
    /// The initiator's secret (12 to 255 bytes); or `secret_file`.
    #[serde(default, skip_serializing_if = "Secret::is_empty")]
    pub secret: Secret,
    /// File holding `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Mutual CHAP: the target's name and secret.
    #[serde(default)]
    pub mutual_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret: Option<Secret>,
    /// File holding `mutual_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret_file: Option<PathBuf>,
}

impl ChapConfig {
    /// Whether a secret is written in the config file itself.
    fn has_inline_secret(&self) -> bool {
        !self.secret.is_empty() || self.mutual_secret.is_some()
    }

    /// Read `secret_file` and `mutual_secret_file` (relative to `base`) into `secret`
    /// and `mutual_secret`; a secret given both ways is refused. Err: (key, reason).
    fn load_secret_files(&mut self, key: &str, base: &Path) -> Result<(), (String, String)> {
        let both = |k: &str| {
            (
                format!("{key}.{k}"),
                format!("{k} and {k}_file are mutually exclusive: give one"),
            )
        };
        let read = |k: &str, p: &Path| {
            crate::secret::read_secret_file(&base.join(p))
                .map_err(|e| (format!("{key}.{k}_file"), e.to_string()))
        };
        if let Some(p) = &self.secret_file {
            if !self.secret.is_empty() {
                return Err(both("secret"));
            }
            self.secret = read("secret", p)?;
        }
        if let Some(p) = &self.mutual_secret_file {
            if self.mutual_secret.is_some() {
                return Err(both("mutual_secret"));
            }
            self.mutual_secret = Some(read("mutual_secret", p)?);
        }
        Ok(())
    }
}

impl Config {
    /// Every CHAP section with its key (`discovery_chap`, `target[0].chap`,
    /// `target[0].acl[1].chap`).
    fn chaps_mut(&mut self) -> Vec<(String, &mut ChapConfig)> {
        let mut v: Vec<(String, &mut ChapConfig)> = Vec::new();
        if let Some(c) = &mut self.discovery_chap {
            v.push(("discovery_chap".into(), c));
        }
        for (ti, t) in self.targets.iter_mut().enumerate() {
            if let Some(c) = &mut t.chap {
                v.push((format!("target[{ti}].chap"), c));
            }
            for (ai, a) in t.acl.iter_mut().enumerate() {
                if let Some(c) = &mut a.chap {
                    v.push((format!("target[{ti}].acl[{ai}].chap"), c));
                }
            }
        }
        v
    }

    /// The key of the first secret written in the file itself, if any.
    fn inline_secret_key(&mut self) -> Option<String> {
        self.chaps_mut()
            .into_iter()
            .find(|(_, c)| c.has_inline_secret())
            .map(|(k, _)| k)
    }

    /// The portals reachable from other hosts of targets that accept any initiator
    /// without CHAP: (target name, address). Worth a warning at start.
    pub fn open_portals(
        &self,
        portal_addrs: &[Vec<(SocketAddr, u16)>],
    ) -> Vec<(String, SocketAddr)> {
        let mut open = Vec::new();
        for (t, addrs) in self.targets.iter().zip(portal_addrs) {
            let guarded = !t.acl.is_empty() || t.chap.is_some();
            for (a, _) in addrs {
                if !guarded && !a.ip().is_loopback() {
                    open.push((t.name.clone(), *a));
                }
            }
        }
        open
    }
}

/// A validated configuration with resolved paths and addresses.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub source: String,
    pub data_dir: PathBuf,
    pub config: Config,
    /// Per target, its portals' resolved socket addresses.
    pub portal_addrs: Vec<Vec<(SocketAddr, u16)>>,
    /// The admin socket's path, resolved (see [`Config::admin_socket`]).
    pub admin_socket: PathBuf,
    /// `[ceph]` with its paths resolved.
    pub ceph: Option<crate::store::CephSettings>,
}

impl ValidConfig {
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    /// The ALUA port groups of `target`'s LUNs: this gateway's group holds the target's
    /// tpgts (its relative target port ids).
    pub fn alua(&self, target: &str) -> crate::scsi::alua::AluaSettings {
        use crate::scsi::alua::{AluaSettings, PortGroup};
        let a = &self.config.alua;
        let mut ports: Vec<u16> = self
            .config
            .targets
            .iter()
            .filter(|t| t.name == target)
            .flat_map(|t| t.portals.iter().map(|p| p.tpgt))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        AluaSettings {
            local: PortGroup { id: a.group, ports },
            peers: a
                .peers
                .iter()
                .map(|p| PortGroup {
                    id: p.group,
                    ports: p.ports(),
                })
                .collect(),
        }
    }

    /// Distinct listen addresses over all targets.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .portal_addrs
            .iter()
            .flatten()
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Load and validate a config file.
pub fn load_file(path: &Path) -> Result<ValidConfig, ConfigError> {
    let (mut config, file) = config_value::read_toml::<Config>(path)?;
    if let Some(key) = config.inline_secret_key() {
        crate::secret::require_private(path).map_err(|e| {
            ConfigValueError::new(&file, &key, format!("{e} (or move it to a secret_file)"))
        })?;
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    validate(config, &file, &base)
}

/// Parse and validate TOML text; `base` anchors a relative data_dir.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<ValidConfig, ConfigError> {
    validate(config_value::parse_toml(text, file)?, file, base)
}

fn check_chap(c: &ChapConfig, key: &str, bad: &mut dyn FnMut(String, String)) {
    if c.username.is_empty() {
        bad(format!("{key}.username"), "must not be empty".into());
    }
    if c.secret.is_empty() {
        bad(
            format!("{key}.secret"),
            "is missing: give secret or secret_file".into(),
        );
    } else if let Err(why) = check_secret_len(c.secret.len()) {
        bad(format!("{key}.secret"), why);
    }
    match (&c.mutual_username, &c.mutual_secret) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => bad(
            format!("{key}.mutual_secret"),
            "mutual_username and mutual_secret go together".into(),
        ),
        (Some(u), Some(s)) => {
            if u.is_empty() {
                bad(format!("{key}.mutual_username"), "must not be empty".into());
            }
            if let Err(why) = check_secret_len(s.len()) {
                bad(format!("{key}.mutual_secret"), why);
            }
            if s == &c.secret {
                // RFC 7143 §12.1.3: the two directions must use different secrets.
                bad(
                    format!("{key}.mutual_secret"),
                    "must differ from the initiator's secret".into(),
                );
            }
        }
    }
}

/// Where a check reports a bad setting: key and reason (the first one is reported).
type Bad<'a> = &'a mut dyn FnMut(String, String);

fn validate(mut config: Config, file: &str, base: &Path) -> Result<ValidConfig, ConfigError> {
    for (key, chap) in config.chaps_mut() {
        chap.load_secret_files(&key, base)
            .map_err(|(k, why)| ConfigValueError::new(file, &k, why))?;
    }
    let mut first: Option<(String, String)> = None;
    let mut bad = |key: String, reason: String| {
        if first.is_none() {
            first = Some((key, reason));
        }
    };
    check_iscsi(&config.iscsi, &mut bad);
    check_limits(&config.limits, &mut bad);
    if let Some(c) = &config.discovery_chap {
        check_chap(c, "discovery_chap", &mut bad);
    }
    if let Some(c) = &config.ceph {
        check_ceph(c, &mut bad);
    }
    check_alua(&config.alua, &config.targets, &mut bad);
    if config.targets.is_empty() {
        bad(
            "target".into(),
            "at least one [[target]] is required".into(),
        );
    }
    let data_dir = if config.data_dir.is_absolute() {
        config.data_dir.clone()
    } else {
        base.join(&config.data_dir)
    };
    let mut names = HashSet::new();
    let mut paths: HashMap<PathBuf, String> = HashMap::new();
    let mut portal_addrs = Vec::new();
    let mut addr_tpgt: BTreeMap<SocketAddr, (String, u16)> = BTreeMap::new();
    for (ti, t) in config.targets.iter().enumerate() {
        let tk = format!("target[{ti}]");
        if let Err(e) = check_iscsi_name(&t.name) {
            bad(format!("{tk}.name"), e.to_string());
        }
        if !names.insert(t.name.to_ascii_lowercase()) {
            bad(
                format!("{tk}.name"),
                format!("target {} is defined twice", t.name),
            );
        }
        if t.portals.is_empty() {
            bad(
                format!("{tk}.portal"),
                "at least one [[target.portal]] is required".into(),
            );
        }
        portal_addrs.push(check_portals(&tk, t, &mut addr_tpgt, &mut bad));
        if t.luns.is_empty() {
            bad(
                format!("{tk}.lun"),
                "at least one [[target.lun]] is required".into(),
            );
        }
        let has_ceph = config.ceph.is_some();
        let ids = check_luns(&tk, t, &data_dir, has_ceph, &mut paths, &mut bad);
        check_acl(&tk, t, &ids, &mut bad);
        if let Some(c) = &t.chap {
            check_chap(c, &format!("{tk}.chap"), &mut bad);
        }
    }
    if let Some((key, reason)) = first {
        return Err(ConfigValueError::new(file, &key, reason).into());
    }
    let admin_socket = match &config.admin_socket {
        Some(p) => base.join(p),
        None => data_dir.join("admin.sock"),
    };
    Ok(ValidConfig {
        source: file.to_string(),
        data_dir,
        ceph: config.ceph.as_ref().map(|c| crate::store::CephSettings {
            conf: base.join(&c.conf),
            client: c.client.clone(),
            keyring: c.keyring.as_ref().map(|k| base.join(k)),
            timeout: c.timeout,
            notify_timeout: c.notify_timeout,
        }),
        config,
        portal_addrs,
        admin_socket,
    })
}

fn check_iscsi(i: &IscsiSettings, bad: Bad<'_>) {
    if !(512..=16_777_215).contains(&i.max_recv_data_segment_length) {
        bad(
            "iscsi.max_recv_data_segment_length".into(),
            "must be 512 to 16777215".into(),
        );
    }
    if !(512..=16_777_215).contains(&i.max_burst_length) {
        bad(
            "iscsi.max_burst_length".into(),
            "must be 512 to 16777215".into(),
        );
    }
    if !(512..=16_777_215).contains(&i.first_burst_length)
        || i.first_burst_length > i.max_burst_length
    {
        bad(
            "iscsi.first_burst_length".into(),
            "must be 512 to 16777215 and at most max_burst_length".into(),
        );
    }
    if !(1..=65535).contains(&i.max_outstanding_r2t) {
        bad(
            "iscsi.max_outstanding_r2t".into(),
            "must be 1 to 65535".into(),
        );
    }
    if !(1..=4096).contains(&i.queue_depth) {
        bad("iscsi.queue_depth".into(), "must be 1 to 4096".into());
    }
    if i.nop_interval_secs == 0 || i.nop_timeout_secs == 0 || i.login_timeout_secs == 0 {
        bad(
            "iscsi".into(),
            "nop_interval_secs, nop_timeout_secs and login_timeout_secs must be > 0".into(),
        );
    }
}

fn check_limits(l: &LimitSettings, bad: Bad<'_>) {
    for (k, v) in [
        ("max_connections", l.max_connections),
        ("max_sessions", l.max_sessions),
        ("max_connections_per_target", l.max_connections_per_target),
        (
            "max_connections_per_initiator",
            l.max_connections_per_initiator,
        ),
        ("chap_max_failures", l.chap_max_failures),
    ] {
        if v == 0 {
            bad(format!("limits.{k}"), "must be > 0".into());
        }
    }
    if !(1 << 20..=1 << 40).contains(&l.buffer_memory.0) {
        bad("limits.buffer_memory".into(), "must be 1MiB to 1TiB".into());
    }
    if l.max_command_bytes.0 < 4096
        || l.max_command_bytes.0 > l.buffer_memory.0
        || l.max_command_bytes.0 > u64::from(u32::MAX)
    {
        bad(
            "limits.max_command_bytes".into(),
            "must be 4KiB to 4GiB-1 and at most buffer_memory".into(),
        );
    }
    if l.chap_failure_window_secs == 0 {
        bad(
            "limits.chap_failure_window_secs".into(),
            "must be > 0".into(),
        );
    }
}

/// The target's portals as (address, TPGT); one address belongs to one portal group
/// across all targets (`addr_tpgt`).
fn check_portals(
    tk: &str,
    t: &TargetConfig,
    addr_tpgt: &mut BTreeMap<SocketAddr, (String, u16)>,
    bad: Bad<'_>,
) -> Vec<(SocketAddr, u16)> {
    let mut addrs = Vec::new();
    let mut tpgts = HashSet::new();
    for (pi, p) in t.portals.iter().enumerate() {
        let pk = format!("{tk}.portal[{pi}]");
        match p.listen.parse::<SocketAddr>() {
            Ok(a) => {
                if let Some((other, tpgt)) = addr_tpgt.get(&a) {
                    if *tpgt != p.tpgt {
                        bad(
                            format!("{pk}.tpgt"),
                            format!("{a} is portal group {tpgt} of {other}; one address belongs to one portal group"),
                        );
                    }
                } else {
                    addr_tpgt.insert(a, (t.name.clone(), p.tpgt));
                }
                if addrs.iter().any(|(x, _)| *x == a) {
                    bad(format!("{pk}.listen"), format!("{a} is listed twice"));
                }
                addrs.push((a, p.tpgt));
            }
            Err(_) => bad(
                format!("{pk}.listen"),
                format!("{:?} is not an address:port", p.listen),
            ),
        }
        if p.tpgt == 0 {
            bad(format!("{pk}.tpgt"), "must be 1 to 65535".into());
        }
        tpgts.insert(p.tpgt);
    }
    addrs
}

/// The target's LUN ids; a backing file belongs to one LUN across all targets (`paths`).
fn check_luns(
    tk: &str,
    t: &TargetConfig,
    data_dir: &Path,
    has_ceph: bool,
    paths: &mut HashMap<PathBuf, String>,
    bad: Bad<'_>,
) -> HashSet<u64> {
    let mut ids = HashSet::new();
    for (li, l) in t.luns.iter().enumerate() {
        let lk = format!("{tk}.lun[{li}]");
        if l.id > 16383 {
            bad(format!("{lk}.id"), "must be 0 to 16383".into());
        }
        if !ids.insert(l.id) {
            bad(format!("{lk}.id"), format!("LUN {} is defined twice", l.id));
        }
        if l.block_size != 512 && l.block_size != 4096 {
            bad(format!("{lk}.block_size"), "must be 512 or 4096".into());
        }
        if let Some(p) = l.physical_block_size {
            if p < l.block_size || p > 32768 || !p.is_power_of_two() {
                bad(
                    format!("{lk}.physical_block_size"),
                    "must be a power of two from block_size to 32768".into(),
                );
            }
        }
        if l.size.0 == 0 || l.size.0 % l.block_size.max(1) as u64 != 0 {
            bad(
                format!("{lk}.size"),
                format!(
                    "must be a positive multiple of the block size ({})",
                    l.block_size
                ),
            );
        }
        if let Some(s) = &l.serial {
            if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_graphic()) {
                bad(
                    format!("{lk}.serial"),
                    "must be 1 to 64 printable ASCII characters".into(),
                );
            }
        }
        check_backing(&lk, l, data_dir, has_ceph, paths, bad);
    }
    ids
}

/// Group ids 1–65535, one per gateway; peer ports 1–65535 and never one of this
/// gateway's tpgts (relative target port ids are unique across gateways).
fn check_alua(a: &AluaConfig, targets: &[TargetConfig], bad: Bad<'_>) {
    if a.group == 0 {
        bad("alua.group".into(), "must be 1 to 65535".into());
    }
    let local: HashSet<u16> = targets
        .iter()
        .flat_map(|t| t.portals.iter().map(|p| p.tpgt))
        .collect();
    let mut groups = HashSet::from([a.group]);
    let mut ports = HashSet::new();
    for (i, p) in a.peers.iter().enumerate() {
        let key = format!("alua.peer[{i}]");
        if p.group == 0 {
            bad(format!("{key}.group"), "must be 1 to 65535".into());
        } else if !groups.insert(p.group) {
            bad(
                format!("{key}.group"),
                format!("target port group {} is already taken (by this gateway or another peer); each gateway has its own", p.group),
            );
        }
        for port in p.ports() {
            let why = if port == 0 {
                "relative target port ids are 1 to 65535".to_string()
            } else if local.contains(&port) {
                format!("{port} is also a tpgt of this gateway; relative target port ids (tpgts) must be unique across gateways")
            } else if !ports.insert(port) {
                format!("port {port} is listed for two peers")
            } else {
                continue;
            };
            bad(format!("{key}.ports"), why);
        }
    }
}

fn check_ceph(c: &CephConfig, bad: Bad<'_>) {
    if !c.client.starts_with("client.") || c.client.len() <= "client.".len() {
        bad(
            "ceph.client".into(),
            format!("{:?} is not a cephx user name (client.NAME)", c.client),
        );
    }
    if c.conf.as_os_str().is_empty() {
        bad("ceph.conf".into(), "must name a ceph.conf".into());
    }
    if c.timeout.is_zero() {
        bad("ceph.timeout".into(), "must be positive".into());
    }
    if c.notify_timeout.is_zero() {
        bad("ceph.notify_timeout".into(), "must be positive".into());
    }
}

/// Exactly one of `path` and `rbd`; an image needs `[ceph]`; no backing store (nor its
/// sidecar files) serves two LUNs.
fn check_backing(
    lk: &str,
    l: &LunConfig,
    data_dir: &Path,
    has_ceph: bool,
    paths: &mut HashMap<PathBuf, String>,
    bad: Bad<'_>,
) {
    let key = match (&l.rbd, l.path.as_os_str().is_empty()) {
        (Some(_), false) => {
            bad(format!("{lk}.rbd"), "give path or rbd, not both".into());
            return;
        }
        (None, true) => {
            bad(
                format!("{lk}.path"),
                "give path (a backing file) or rbd (POOL/IMAGE)".into(),
            );
            return;
        }
        (None, false) => format!("{lk}.path"),
        (Some(spec), true) => {
            if let Err(why) = check_rbd_spec(spec) {
                bad(format!("{lk}.rbd"), why);
                return;
            }
            if !has_ceph {
                bad(
                    format!("{lk}.rbd"),
                    "needs a [ceph] table naming the cluster".into(),
                );
            }
            format!("{lk}.rbd")
        }
    };
    let base = l.sidecar_base();
    let full = if base.is_absolute() {
        base
    } else {
        data_dir.join(base)
    };
    if let Some(prev) = paths.insert(full.clone(), lk.to_string()) {
        let what = match &l.rbd {
            Some(spec) => format!("rbd image {spec} is already served by {prev}"),
            None => format!("{} is already the backing file of {prev}", full.display()),
        };
        bad(key, what);
    }
}

/// "POOL/IMAGE": two non-empty names without '/', '@' (snapshots) or control characters.
fn check_rbd_spec(spec: &str) -> Result<(), String> {
    let ok =
        |s: &str| !s.is_empty() && !s.contains(['/', '@']) && !s.chars().any(|c| c.is_control());
    match spec.split_once('/') {
        Some((pool, image)) if ok(pool) && ok(image) => Ok(()),
        _ => Err(format!(
            "{spec:?} is not POOL/IMAGE (two names; namespaces and snapshots are not supported)"
        )),
    }
}

fn check_acl(tk: &str, t: &TargetConfig, ids: &HashSet<u64>, bad: Bad<'_>) {
    let mut inits = HashSet::new();
    for (ai, a) in t.acl.iter().enumerate() {
        let ak = format!("{tk}.acl[{ai}]");
        if let Err(e) = check_iscsi_name(&a.initiator) {
            bad(format!("{ak}.initiator"), e.to_string());
        }
        if !inits.insert(a.initiator.to_ascii_lowercase()) {
            bad(format!("{ak}.initiator"), "listed twice".into());
        }
        if let Some(luns) = &a.luns {
            for l in luns {
                if !ids.contains(l) && t.luns.iter().all(|x| x.id != *l) {
                    bad(
                        format!("{ak}.luns"),
                        format!("LUN {l} is not defined in this target"),
                    );
                }
            }
        }
        if let Some(c) = &a.chap {
            check_chap(c, &format!("{ak}.chap"), bad);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, "t.toml", Path::new("/base"))
            .unwrap_err()
            .to_string()
    }

    /// The smallest valid config: one target, one portal, one LUN.
    pub(in crate::server) const MIN: &str = r#"
[[target]]
name = "iqn.2026-11.org.example:t1"
[[target.portal]]
listen = "127.0.0.1:3261"
[[target.lun]]
id = 0
path = "a.img"
size = "1MiB"
"#;

    #[test]
    fn alua_groups_are_validated_and_map_to_port_groups() {
        let with = |alua: &str| format!("{MIN}[alua]\n{alua}\n");
        let v = parse(
            &with("group = 3\n[[alua.peer]]\ngroup = 2\n[[alua.peer]]\ngroup = 5\nports = [6, 7]"),
            "t.toml",
            Path::new("/base"),
        )
        .unwrap();
        let a = v.alua("iqn.2026-11.org.example:t1");
        assert_eq!((a.local.id, a.local.ports.as_slice()), (3, &[1][..]));
        let peers: Vec<_> = a.peers.iter().map(|p| (p.id, p.ports.clone())).collect();
        assert_eq!(peers, [(2, vec![2]), (5, vec![6, 7])]);
        // Without [alua]: one group, id 1, holding the target's tpgt.
        let d = parse(MIN, "t.toml", Path::new("/base")).unwrap();
        assert_eq!(d.alua("iqn.2026-11.org.example:t1"), Default::default());
        for (alua, key, why) in [
            ("group = 0", "alua.group", "1 to 65535"),
            (
                "group = 2\n[[alua.peer]]\ngroup = 2",
                "alua.peer[0].group",
                "already taken",
            ),
            (
                "[[alua.peer]]\ngroup = 0",
                "alua.peer[0].group",
                "1 to 65535",
            ),
            (
                "[[alua.peer]]\ngroup = 2\nports = [1]",
                "alua.peer[0].ports",
                "unique across gateways",
            ),
            (
                "[[alua.peer]]\ngroup = 2\n[[alua.peer]]\ngroup = 3\nports = [2]",
                "alua.peer[1].ports",
                "two peers",
            ),
        ] {
            let e = err(&with(alua));
            assert!(e.contains(key) && e.contains(why), "{alua}: {e}");
        }
    }

    #[test]
    fn rbd_luns_name_pool_and_image_and_need_ceph() {
        let lun = |body: &str| {
            format!(
                "[[target]]\nname = \"iqn.2026-11.org.example:t1\"\n[[target.portal]]\n\
                 listen = \"127.0.0.1:3261\"\n[[target.lun]]\nid = 0\nsize = \"1MiB\"\n{body}\n"
            )
        };
        let ceph = "[ceph]\nconf = \"ceph.conf\"\n";
        let v = parse(
            &format!("{}{ceph}", lun("rbd = \"p/img\"")),
            "t.toml",
            Path::new("/base"),
        )
        .unwrap();
        let l = &v.config.targets[0].luns[0];
        assert_eq!(
            l.backing(),
            Backing::Rbd {
                pool: "p",
                image: "img"
            }
        );
        assert_eq!(l.sidecar_base(), Path::new("rbd/p/img"));
        let c = v.ceph.as_ref().unwrap();
        assert_eq!(c.conf, Path::new("/base/ceph.conf"));
        assert_eq!(c.client, "client.holdfast");
        assert_eq!(c.timeout, std::time::Duration::from_secs(30));

        let both = err(&format!(
            "{}{ceph}",
            lun("rbd = \"p/img\"\npath = \"a.img\"")
        ));
        assert!(
            both.contains("lun[0].rbd") && both.contains("not both"),
            "{both}"
        );
        let neither = err(&format!("{}{ceph}", lun("")));
        assert!(
            neither.contains("lun[0].path") && neither.contains("rbd"),
            "{neither}"
        );
        let no_ceph = err(&lun("rbd = \"p/img\""));
        assert!(no_ceph.contains("[ceph]"), "{no_ceph}");
        for spec in ["img", "p/", "/img", "p/ns/img", "p/img@snap"] {
            let e = err(&format!("{}{ceph}", lun(&format!("rbd = \"{spec}\""))));
            assert!(e.contains("POOL/IMAGE"), "{spec}: {e}");
        }
        let twice = format!(
            "{}[[target.lun]]\nid = 1\nsize = \"1MiB\"\nrbd = \"p/img\"\n{ceph}",
            lun("rbd = \"p/img\"")
        );
        let e = err(&twice);
        assert!(
            e.contains("lun[1].rbd") && e.contains("already served by"),
            "{e}"
        );
        let e = err(&format!(
            "{}[ceph]\nclient = \"admin\"\n",
            lun("rbd = \"p/img\"")
        ));
        assert!(e.contains("ceph.client"), "{e}");
    }

    #[test]
    fn secret_files_are_read_relative_to_the_config_and_exclusive() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("init.secret", "initiator-secret\n", 0o600);
        write("tgt.secret", "target-secret-99", 0o600);
        write("open.secret", "initiator-secret", 0o644);
        let chap = |body: &str| format!("{MIN}\n[target.chap]\nusername = \"u\"\n{body}\n");
        let files = "secret_file = \"init.secret\"\nmutual_username = \"t\"\nmutual_secret_file = \"tgt.secret\"";
        let v = parse(&chap(files), "t.toml", dir.path()).unwrap();
        let c = v.config.targets[0].chap.as_ref().unwrap();
        assert_eq!(c.secret.expose(), "initiator-secret");
        assert_eq!(
            c.mutual_secret.as_ref().unwrap().expose(),
            "target-secret-99"
        );
        let shown = toml::to_string(&v.config).unwrap();
        assert!(
            !shown.contains("initiator-secret") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!format!("{v:?}").contains("target-secret-99"));
        let e = parse(
            &chap("secret = \"initiator-secret\"\nsecret_file = \"init.secret\""),
            "t.toml",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("target[0].chap.secret: secret and secret_file are mutually exclusive"),
            "{e}"
        );
        let e = parse(&chap("secret_file = \"open.secret\""), "t.toml", dir.path())
            .unwrap_err()
            .to_string();
        let fix = format!("chmod 600 {}", dir.path().join("open.secret").display());
        assert!(
            e.contains("target[0].chap.secret_file") && e.contains(&fix),
            "{e}"
        );
        let e = parse(&chap(""), "t.toml", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("target[0].chap.secret: is missing"), "{e}");
    }

    #[test]
    fn open_portals_are_the_unguarded_non_loopback_ones() {
        let open = |extra: &str, listen: &str| {
            let v = parse(
                &format!("{}{extra}\n", MIN.replace("127.0.0.1:3261", listen)),
                "t.toml",
                Path::new("/"),
            )
            .unwrap();
            v.config.open_portals(&v.portal_addrs)
        };
        assert_eq!(open("", "127.0.0.1:3261"), vec![]);
        assert_eq!(open("", "[::1]:3261"), vec![]);
        let any = open("", "0.0.0.0:3261");
        assert_eq!(
            any,
            vec![(
                "iqn.2026-11.org.example:t1".to_string(),
                "0.0.0.0:3261".parse().unwrap()
            )]
        );
        let acl = "[[target.acl]]\ninitiator = \"iqn.2026-11.org.example:i\"";
        assert_eq!(open(acl, "0.0.0.0:3261"), vec![]);
        let chap = "[target.chap]\nusername = \"u\"\nsecret = \"0123456789ab\"";
        assert_eq!(open(chap, "0.0.0.0:3261"), vec![]);
    }

    #[test]
    fn embedded_default_is_valid() {
        let v = parse(EMBEDDED_DEFAULT, "<embedded>", Path::new("")).unwrap();
        let t = &v.config.targets[0];
        assert_eq!(t.name, DEFAULT_TARGET_NAME);
        assert_eq!(t.luns[0].size.0, 64 << 20);
        assert_eq!(t.luns[1].size.0, 8 << 30);
        assert_eq!(v.listen_addrs(), vec!["127.0.0.1:3260".parse().unwrap()]);
        assert_eq!(
            v.resolve(Path::new("quorum.img")),
            PathBuf::from("holdfast-data/quorum.img")
        );
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let v = parse(MIN, "t.toml", Path::new("/etc/holdfast")).unwrap();
        assert_eq!(
            v.resolve(Path::new("a.img")),
            PathBuf::from("/etc/holdfast/holdfast-data/a.img")
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err(&MIN.replace("1MiB", "1000"));
        assert_eq!(
            e,
            "t.toml: target[0].lun[0].size: must be a positive multiple of the block size (512)"
        );
        let e = err(&MIN.replace("iqn.2026-11.org.example:t1", "target1"));
        assert!(e.starts_with("t.toml: target[0].name: "), "{e}");
        let e = err(&MIN.replace("127.0.0.1:3261", "localhost"));
        assert!(e.contains("target[0].portal[0].listen"), "{e}");
        // Sections added to MIN, and what the error says.
        let cases = [
            (
                "[[target.lun]]\nid = 0\npath = \"b.img\"\nsize = 512",
                "target[0].lun[1].id: LUN 0 is defined twice",
            ),
            (
                "[target.chap]\nusername = \"u\"\nsecret = \"short\"",
                "target[0].chap.secret",
            ),
            (
                "[target.chap]\nusername = \"u\"\nsecret = \"0123456789ab\"\nmutual_username = \"t\"\nmutual_secret = \"0123456789ab\"",
                "must differ",
            ),
            (
                "[[target.acl]]\ninitiator = \"iqn.2026-11.org.example:i\"\nluns = [7]",
                "target[0].acl[0].luns: LUN 7 is not defined",
            ),
        ];
        for (section, want) in cases {
            let e = err(&format!("{MIN}\n{section}\n"));
            assert!(e.contains(want), "{e}");
        }
        let e = err("bogus = 1\n");
        assert!(e.starts_with("t.toml: ") && e.contains("bogus"), "{e}");
        let e = err("data_dir = \"x\"\n");
        assert!(e.contains("at least one [[target]]"), "{e}");
    }
}
