//! The configuration turned into running objects: targets, their logical units,
//! access control and CHAP, shared by every connection.

use super::config::{Backing, ChapConfig, LunConfig, TargetConfig, ValidConfig};
use super::live::{LiveState, LunBackend, Served};
use super::session::NexusDirectory;
use crate::iscsi::login::{ChapCredentials, LoginStatus, TargetKeyPolicy};
use crate::metrics::target::{TargetGauges, TargetMetrics};
use crate::scsi::backend::BlockBackend;
use crate::scsi::{LogicalUnit, LunMap, LunSettings};
use crate::store::{identity, FileBackend, LunStore, PrFileStore, RbdBackend};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{key}: {reason}")]
    Lun { key: String, reason: String },
}

/// One access-control entry of a target.
#[derive(Debug, Clone)]
pub struct AclEntry {
    pub initiator: String,
    pub luns: Option<Vec<u64>>,
    pub chap: Option<ChapCredentials>,
}

/// A served iSCSI target.
#[derive(Debug)]
pub struct TargetNode {
    pub name: String,
    pub alias: Option<String>,
    pub portals: Vec<(SocketAddr, u16)>,
    pub luns: BTreeMap<u64, Arc<LogicalUnit>>,
    /// `luns` as the map every initiator without a LUN list shares, made on first use
    /// (a node serves behind an `Arc`, so `luns` no longer changes by then).
    all: OnceLock<LunMap>,
    /// Empty: every initiator may log in and sees every LUN.
    pub acl: Vec<AclEntry>,
    pub chap: Option<ChapCredentials>,
}

impl TargetNode {
    fn acl_entry(&self, initiator: &str) -> Option<&AclEntry> {
        self.acl
            .iter()
            .find(|a| a.initiator.eq_ignore_ascii_case(initiator))
    }

    /// Whether `initiator` may discover and log in to this target.
    pub fn admits(&self, initiator: &str) -> bool {
        self.acl.is_empty() || self.acl_entry(initiator).is_some()
    }

    /// CHAP credentials that apply to `initiator` (per-initiator entry first).
    pub fn chap_for(&self, initiator: &str) -> Option<ChapCredentials> {
        self.acl_entry(initiator)
            .and_then(|a| a.chap.clone())
            .or_else(|| self.chap.clone())
    }

    /// The LUN list `initiator`'s ACL entry restricts it to, if any.
    fn lun_list(&self, initiator: &str) -> Option<&Vec<u64>> {
        self.acl_entry(initiator).and_then(|a| a.luns.as_ref())
    }

    fn visible(&self, initiator: &str) -> BTreeMap<u64, Arc<LogicalUnit>> {
        match self.lun_list(initiator) {
            Some(list) => self
                .luns
                .iter()
                .filter(|(id, _)| list.contains(id))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            None => self.luns.clone(),
        }
    }

    /// The LUNs `initiator` sees (LUN masking).
    pub fn lun_map_for(&self, initiator: &str) -> LunMap {
        match self.lun_list(initiator) {
            Some(_) => LunMap::new(self.visible(initiator)),
            None => self
                .all
                .get_or_init(|| LunMap::new(self.luns.clone()))
                .clone(),
        }
    }

    pub fn visible_luns(&self, initiator: &str) -> Vec<Arc<LogicalUnit>> {
        self.visible(initiator).into_values().collect()
    }

    /// Portal group tag this target uses on a listening address.
    pub fn tpgt_on(&self, listen: SocketAddr) -> Option<u16> {
        self.portals
            .iter()
            .find(|(a, _)| *a == listen)
            .map(|(_, t)| *t)
    }
}

pub fn chap_credentials(c: &ChapConfig) -> ChapCredentials {
    ChapCredentials {
        username: c.username.clone(),
        secret: c.secret.expose().as_bytes().to_vec(),
        mutual: match (&c.mutual_username, &c.mutual_secret) {
            (Some(u), Some(s)) => Some((u.clone(), s.expose().as_bytes().to_vec())),
            _ => None,
        },
    }
}

/// Wraps a LUN's backend, given its backing file's path (see [`Runtime::build_with`]).
pub type BackendWrap = dyn Fn(&std::path::Path, Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend>;

/// Everything shared by all connections of one running target process.
#[derive(Debug)]
pub struct Runtime {
    /// The targets as built from the starting configuration; what is served now (after
    /// live reloads) is [`Runtime::served`].
    pub targets: Vec<Arc<TargetNode>>,
    /// As built; see [`Runtime::served`].
    pub discovery_chap: Option<ChapCredentials>,
    pub key_policy: TargetKeyPolicy,
    pub settings: super::config::IscsiSettings,
    /// Live I_T nexuses, for PREEMPT AND ABORT of their tasks.
    pub nexuses: Arc<NexusDirectory>,
    /// Connection, session, buffer and CHAP-failure limits.
    pub limits: super::limits::ResourceLimits,
    /// The running configuration, sessions' LUN maps and backing stores, as reloads
    /// change them.
    pub live: LiveState,
    /// Prometheus series, when the configuration asks for them (`metrics`).
    pub metrics: Option<Arc<TargetMetrics>>,
}

impl Runtime {
    /// Open every backing file (creating sparse ones) and build the logical units.
    pub fn build(cfg: &ValidConfig) -> Result<Runtime, RuntimeError> {
        Self::build_with(cfg, &|_, b| b)
    }

    /// Like [`Runtime::build`], with every LUN's backend passed through `wrap` (given the
    /// backing file's path): fault injection and instrumentation in tests.
    pub fn build_with(cfg: &ValidConfig, wrap: &BackendWrap) -> Result<Runtime, RuntimeError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| RuntimeError::Lun {
            key: "data_dir".into(),
            reason: format!("cannot create {}: {e}", cfg.data_dir.display()),
        })?;
        let mut targets = Vec::new();
        let mut backends = Vec::new();
        let nexuses = Arc::new(NexusDirectory::default());
        for (ti, t) in cfg.config.targets.iter().enumerate() {
            let mut luns = BTreeMap::new();
            for (li, l) in t.luns.iter().enumerate() {
                let key = format!("target[{ti}].lun[{li}]");
                let (lu, backend) = open_lun(cfg, &t.name, l, wrap, &nexuses)
                    .map_err(|reason| RuntimeError::Lun { key, reason })?;
                backends.push(LunBackend {
                    target: t.name.clone(),
                    lun: l.id,
                    backend,
                });
                luns.insert(l.id, lu);
            }
            let portals = cfg.portal_addrs[ti].clone();
            targets.push(Arc::new(node_from_config(t, portals, luns)));
        }
        let s = &cfg.config.iscsi;
        Ok(Runtime {
            targets,
            discovery_chap: cfg.config.discovery_chap.as_ref().map(chap_credentials),
            key_policy: s.key_policy(),
            settings: s.clone(),
            limits: super::limits::ResourceLimits::new(cfg.config.limits.clone()),
            live: LiveState::new(cfg.clone(), backends),
            nexuses,
            metrics: cfg.config.metrics.map(|_| Arc::new(TargetMetrics::new())),
        })
    }

    /// The targets and discovery CHAP served now.
    pub fn served(&self) -> Arc<Served> {
        self.live.served(|| Served {
            targets: self.targets.clone(),
            discovery_chap: self.discovery_chap.clone(),
        })
    }

    /// How many LUNs are served now, over all targets.
    pub fn lun_count(&self) -> usize {
        self.served().targets.iter().map(|t| t.luns.len()).sum()
    }

    pub fn target(&self, name: &str) -> Option<Arc<TargetNode>> {
        self.served().target(name)
    }

    /// Login check for a normal session arriving on `listen`.
    pub fn authorize_normal(
        &self,
        listen: SocketAddr,
        target: &str,
        initiator: &str,
    ) -> Result<Option<ChapCredentials>, LoginStatus> {
        let t = self.target(target).ok_or(LoginStatus::NOT_FOUND)?;
        if t.tpgt_on(listen).is_none() {
            // The target exists but is not served on this portal.
            return Err(LoginStatus::NOT_FOUND);
        }
        if !t.admits(initiator) {
            return Err(LoginStatus::AUTHORIZATION_FAILURE);
        }
        Ok(t.chap_for(initiator))
    }

    /// What the metrics read from the running target at a scrape.
    pub fn metrics_gauges(&self) -> TargetGauges {
        let limit = usize::try_from(self.limits.settings.buffer_memory.0)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let served = self.served();
        let luns = served.targets.iter().flat_map(|t| {
            let luns = t.luns.iter();
            luns.map(|(id, lu)| (t.name.clone(), *id, lu.is_offline()))
        });
        TargetGauges {
            sessions: self.limits.live_sessions(),
            connections: self.limits.open_connections(),
            buffer_in_use: limit.saturating_sub(self.limits.buffer_available()) as u64,
            buffer_limit: limit as u64,
            luns: luns.collect(),
        }
    }

    /// Flush every LUN (shutdown).
    pub fn flush_all(&self) {
        for (target, lun, b) in self.live.backends() {
            if let Err(e) = b.flush() {
                tracing::error!(%target, lun, error = %e, "flush at shutdown failed");
            }
        }
    }
}

/// A target node as configured, serving `luns` on `portals`.
pub(crate) fn node_from_config(
    t: &TargetConfig,
    portals: Vec<(SocketAddr, u16)>,
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
) -> TargetNode {
    TargetNode {
        name: t.name.clone(),
        alias: t.alias.clone(),
        portals,
        all: OnceLock::new(),
        luns,
        acl: t
            .acl
            .iter()
            .map(|a| AclEntry {
                initiator: a.initiator.clone(),
                luns: a.luns.clone(),
                chap: a.chap.as_ref().map(chap_credentials),
            })
            .collect(),
        chap: t.chap.as_ref().map(chap_credentials),
    }
}

/// Open (creating if need be) one LUN's backing file, or its RBD image.
fn open_store(
    cfg: &ValidConfig,
    l: &LunConfig,
    path: &std::path::Path,
) -> Result<LunStore, String> {
    match l.backing() {
        Backing::File(_) => Ok(LunStore::File(Arc::new(
            FileBackend::open(path, l.size.0, true, l.read_only).map_err(|e| e.to_string())?,
        ))),
        Backing::Rbd { pool, image } => {
            let ceph = cfg.ceph.as_ref().ok_or("rbd needs a [ceph] table")?;
            let b = RbdBackend::open(ceph, pool, image, l.size.0, l.read_only)
                .map_err(|e| e.to_string())?;
            Ok(LunStore::Rbd(Arc::new(b)))
        }
    }
}

/// Open one LUN's backing store and build its logical unit; the error is the reason,
/// for a [`RuntimeError::Lun`]. An RBD LUN keeps its identity and reservation files
/// under data_dir/rbd/POOL/.
pub(crate) fn open_lun(
    cfg: &ValidConfig,
    target: &str,
    l: &LunConfig,
    wrap: &BackendWrap,
    nexuses: &Arc<NexusDirectory>,
) -> Result<(Arc<LogicalUnit>, LunStore), String> {
    let path = cfg.resolve(&l.sidecar_base());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let backend = open_store(cfg, l, &path)?;
    // An image's identity is derived from Ceph's ids, the same on every gateway.
    let id = match &backend {
        LunStore::Rbd(b) => b.identity(l.serial.as_deref()).map_err(|e| e.to_string())?,
        LunStore::File(_) => {
            identity::load_or_create(&path, l.serial.as_deref()).map_err(|e| e.to_string())?
        }
    };
    let settings = LunSettings {
        block_size: l.block_size,
        physical_block_size: l.physical_block_size.unwrap_or(l.block_size),
        read_only: l.read_only,
        serial: id.serial,
        naa: id.naa,
        vendor: "HOLDFAST".into(),
        product: l.product.clone().unwrap_or_else(|| "holdfast LUN".into()),
        revision: env!("CARGO_PKG_VERSION")
            .chars()
            .filter(|c| *c != '.')
            .take(4)
            .collect(),
        write_cache: l.write_cache,
        thin_provisioning: l.thin_provisioning,
        alua: cfg.alua(target),
    };
    // Persistent reservations (APTPL) live next to the identity sidecar; a state file
    // that cannot be read stops this LUN rather than dropping reservations a cluster
    // relies on.
    let store = PrFileStore::for_backing(&path);
    let pr_path = store.path().display().to_string();
    let served = wrap(&path, backend.backend());
    let lu = LogicalUnit::with_persistence(settings, served, Box::new(store))
        .map_err(|e| format!("{pr_path}: {e}"))?;
    let dir = nexuses.clone();
    let lun_id = l.id;
    lu.set_abort_hook(Box::new(move |victims| dir.abort(victims, lun_id)));
    let lu = Arc::new(lu);
    // An RBD image may be served by several gateways: its reservations are shared.
    if let (Backing::Rbd { pool, image }, Some(ceph), LunStore::Rbd(b)) =
        (l.backing(), cfg.ceph.as_ref(), &backend)
    {
        crate::store::rbd::share_reservations(ceph, pool, image, &lu, b)
            .map_err(|e| e.to_string())?;
    }
    Ok((lu, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A corrupt persistent reservation file stops the build with its path and reason.
    #[test]
    fn corrupt_pr_state_stops_the_lun() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("data_dir = \"data\"\n{}", super::super::config::tests::MIN);
        let cfg = super::super::config::parse(&text, "test.toml", dir.path()).unwrap();
        assert_eq!(Runtime::build(&cfg).unwrap().targets.len(), 1);
        let pr = dir.path().join("data").join("a.img.holdfast-pr");
        std::fs::write(&pr, b"{\"version\":1").unwrap();
        let e = Runtime::build(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("a.img.holdfast-pr") && e.contains("corrupt"),
            "{e}"
        );
    }
}
