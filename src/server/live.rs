//! The running target's changeable state and the step that applies a reload plan to it:
//! the served targets (LUNs, ACLs, CHAP, portals) are swapped whole under a lock, each
//! logged-in session's LUN map is replaced in place, and unit attentions tell the
//! initiators what changed. No session is dropped.
//!
//! Atomicity: everything that can fail (planning, opening new LUNs, binding new portals,
//! growing backing files) happens before anything running is touched; the commit itself
//! cannot fail.

use super::config::ValidConfig;
use super::portal::Portals;
use super::reload::{self, Change, Plan, ReloadRefused, SessionUse};
use super::runtime::{node_from_config, open_lun, Runtime, TargetNode};
use crate::iscsi::login::ChapCredentials;
use crate::scsi::sense::ua;
use crate::scsi::{ItNexus, LogicalUnit, LunMap};
use crate::store::LunStore;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::time::SystemTime;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Refused(#[from] ReloadRefused),
    #[error("reload failed, nothing applied: {what}: {reason}")]
    Prepare { what: String, reason: String },
}

/// What logins and discovery read: replaced whole by a reload.
#[derive(Debug, Clone)]
pub struct Served {
    pub targets: Vec<Arc<TargetNode>>,
    pub discovery_chap: Option<ChapCredentials>,
}

impl Served {
    pub fn target(&self, name: &str) -> Option<Arc<TargetNode>> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .cloned()
    }
}

/// The LUNs one logged-in normal session sees; a reload replaces the map.
#[derive(Debug)]
pub struct SessionLuns {
    pub nexus: Arc<ItNexus>,
    pub tsih: u16,
    pub since: SystemTime,
    map: RwLock<Arc<LunMap>>,
    /// Every map the session had, newest last (one per reload that changed it): a task
    /// entered into an LU's task set is completed or aborted there even after a mask
    /// change hid the LU. Maps, not a merged copy, so sessions keep sharing tables.
    ever: Mutex<Vec<LunMap>>,
}

impl SessionLuns {
    pub fn new(nexus: Arc<ItNexus>, tsih: u16, map: LunMap) -> SessionLuns {
        let ever = vec![map.clone()];
        SessionLuns {
            nexus,
            tsih,
            since: SystemTime::now(),
            map: RwLock::new(Arc::new(map)),
            ever: Mutex::new(ever),
        }
    }

    /// The map new commands and REPORT LUNS use.
    pub fn current(&self) -> Arc<LunMap> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An LU this session could see at some point (for its tasks' completion).
    pub fn lu(&self, lun: u64) -> Option<Arc<LogicalUnit>> {
        let ever = self.ever_lock();
        ever.iter().rev().find_map(|m| m.get(lun)).cloned()
    }

    /// Every LU this session could see at some point (for the nexus's end), once each.
    pub fn every_lu(&self) -> Vec<Arc<LogicalUnit>> {
        let mut seen = HashSet::new();
        let ever = self.ever_lock();
        let units = ever.iter().flat_map(|m| m.units());
        units.filter(|lu| seen.insert(Arc::as_ptr(lu))).collect()
    }

    fn ever_lock(&self) -> MutexGuard<'_, Vec<LunMap>> {
        self.ever.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Install `map`; true when the LUN inventory it shows changed.
    fn replace(&self, map: LunMap) -> bool {
        let changed = self.current().ids() != map.ids();
        let mut ever = self.ever_lock();
        if !ever.last().is_some_and(|last| last.same_table(&map)) {
            // An older map whose every LU the new one holds adds nothing: drop it, so
            // reloads do not pile maps up.
            let held: HashSet<_> = map.units().iter().map(Arc::as_ptr).collect();
            ever.retain(|m| m.units().iter().any(|lu| !held.contains(&Arc::as_ptr(lu))));
            ever.push(map.clone());
        }
        drop(ever);
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
        changed
    }

    fn usage(&self) -> SessionUse {
        SessionUse {
            target: self.nexus.target_name.clone(),
            initiator: self.nexus.initiator_name.clone(),
            isid: hex::encode(self.nexus.isid),
            luns: self.current().ids(),
        }
    }
}

/// One LUN's backing store, for growth and the flush at shutdown.
#[derive(Debug)]
pub struct LunBackend {
    pub target: String,
    pub lun: u64,
    pub backend: LunStore,
}

/// Everything a reload reads and changes, apart from what logins read.
#[derive(Debug)]
struct Control {
    config: ValidConfig,
    sessions: Vec<Weak<SessionLuns>>,
    backends: Vec<LunBackend>,
    /// Where new portals go to be served (set by `Portals::serve`).
    portal_sink: Option<UnboundedSender<Portals>>,
}

/// The changeable part of a [`Runtime`].
#[derive(Debug)]
pub struct LiveState {
    served: OnceLock<RwLock<Arc<Served>>>,
    control: Mutex<Control>,
    /// One reload at a time (held across the awaits of preparing one).
    reloading: tokio::sync::Mutex<()>,
}

impl LiveState {
    pub fn new(config: ValidConfig, backends: Vec<LunBackend>) -> LiveState {
        LiveState {
            served: OnceLock::new(),
            control: Mutex::new(Control {
                config,
                sessions: Vec::new(),
                backends,
                portal_sink: None,
            }),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The served targets; `init` builds them the first time (the runtime as built).
    pub fn served(&self, init: impl FnOnce() -> Served) -> Arc<Served> {
        self.served
            .get_or_init(|| RwLock::new(Arc::new(init())))
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn swap(&self, new: Served) {
        if let Some(lock) = self.served.get() {
            *lock.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        }
    }

    /// The configuration the target runs with now.
    pub fn config(&self) -> ValidConfig {
        self.control().config.clone()
    }

    pub fn backends(&self) -> Vec<(String, u64, LunStore)> {
        self.control()
            .backends
            .iter()
            .map(|b| (b.target.clone(), b.lun, b.backend.clone()))
            .collect()
    }

    pub fn set_portal_sink(&self, sink: UnboundedSender<Portals>) {
        self.control().portal_sink = Some(sink);
    }

    /// Live sessions, dropping the entries of ended ones.
    pub fn sessions(&self) -> Vec<Arc<SessionLuns>> {
        let mut c = self.control();
        c.sessions.retain(|w| w.strong_count() > 0);
        c.sessions.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Register a session that logged in to `target`: its LUN map is built from the served
/// targets under the reload lock, so a reload either sees it or precedes it.
pub fn join(
    rt: &Runtime,
    target: &Arc<TargetNode>,
    nexus: Arc<ItNexus>,
    tsih: u16,
) -> Arc<SessionLuns> {
    let mut c = rt.live.control();
    // Re-read under the lock: a reload may have replaced `target` since login.
    let node = rt
        .served()
        .target(&target.name)
        .unwrap_or_else(|| target.clone());
    let s = Arc::new(SessionLuns::new(
        nexus.clone(),
        tsih,
        visible_map(&node, &nexus.initiator_name),
    ));
    c.sessions.push(Arc::downgrade(&s));
    s
}

/// Plan `new` against the running configuration and apply it, or refuse it whole.
/// Returns the applied changes.
pub async fn reload(rt: &Runtime, new: ValidConfig) -> Result<Vec<Change>, ReloadError> {
    let _one = rt.live.reloading.lock().await;
    let old = rt.live.config();
    let uses: Vec<SessionUse> = rt.live.sessions().iter().map(|s| s.usage()).collect();
    let plan = reload::plan(&old.config, &new.config, &uses)?;
    if plan.changes.is_empty() {
        return Ok(Vec::new());
    }
    let prepared = prepare(rt, &old, &new, &plan).await?;
    commit(rt, new, prepared);
    for c in &plan.changes {
        tracing::info!(change = %c, "reload applied");
    }
    Ok(plan.changes)
}

/// What a plan needs that can fail, done before anything running changes.
struct Prepared {
    new_luns: Vec<(String, u64, Arc<LogicalUnit>, LunStore)>,
    grown: Vec<Arc<LogicalUnit>>,
    portals: Option<Portals>,
}

fn prepare_error(what: impl Into<String>, reason: impl ToString) -> ReloadError {
    ReloadError::Prepare {
        what: what.into(),
        reason: reason.to_string(),
    }
}

async fn prepare(
    rt: &Runtime,
    old: &ValidConfig,
    new: &ValidConfig,
    plan: &Plan,
) -> Result<Prepared, ReloadError> {
    let mut new_luns = Vec::new();
    for c in &plan.changes {
        if let Change::LunAdded { target, lun } = c {
            let l = lun_config(new, target, *lun)
                .ok_or_else(|| prepare_error(format!("{target} LUN {lun}"), "not configured"))?;
            let (lu, backend) = open_lun(new, target, l, &|_, b| b, &rt.nexuses)
                .map_err(|r| prepare_error(format!("{target} LUN {lun}"), r))?;
            new_luns.push((target.clone(), *lun, lu, backend));
        }
    }
    let portals = bind_new_portals(rt, old, new).await?;
    let grown = grow_luns(rt, plan)?;
    Ok(Prepared {
        new_luns,
        grown,
        portals,
    })
}

fn lun_config<'a>(
    cfg: &'a ValidConfig,
    target: &str,
    lun: u64,
) -> Option<&'a super::config::LunConfig> {
    let t = cfg.config.targets.iter().find(|t| t.name == target)?;
    t.luns.iter().find(|l| l.id == lun)
}

async fn bind_new_portals(
    rt: &Runtime,
    old: &ValidConfig,
    new: &ValidConfig,
) -> Result<Option<Portals>, ReloadError> {
    let known = old.listen_addrs();
    let fresh: Vec<SocketAddr> = new
        .listen_addrs()
        .into_iter()
        .filter(|a| !known.contains(a))
        .collect();
    if fresh.is_empty() {
        return Ok(None);
    }
    if rt.live.control().portal_sink.is_none() {
        return Err(prepare_error("portals", "the target is not serving yet"));
    }
    Portals::bind(&fresh)
        .await
        .map(Some)
        .map_err(|e| prepare_error("portals", e))
}

/// Extend the backing files of grown LUNs (the last fallible step: a failure leaves a
/// file longer than configured, which serves exactly as before).
fn grow_luns(rt: &Runtime, plan: &Plan) -> Result<Vec<Arc<LogicalUnit>>, ReloadError> {
    let backends = rt.live.backends();
    let served = rt.served();
    let mut grown = Vec::new();
    for c in &plan.changes {
        let Change::LunGrown {
            target, lun, to, ..
        } = c
        else {
            continue;
        };
        let what = || format!("{target} LUN {lun}");
        let (_, _, b) = backends
            .iter()
            .find(|(t, l, _)| t == target && l == lun)
            .ok_or_else(|| prepare_error(what(), "no backing store"))?;
        let lu = served
            .target(target)
            .and_then(|t| t.luns.get(lun).cloned())
            .ok_or_else(|| prepare_error(what(), "not served"))?;
        b.grow(*to).map_err(|e| prepare_error(what(), e))?;
        grown.push(lu);
    }
    Ok(grown)
}

/// Install a prepared reload: cannot fail.
fn commit(rt: &Runtime, new: ValidConfig, p: Prepared) {
    let mut c = rt.live.control();
    let old = rt.served();
    let mut targets = Vec::new();
    for (ti, t) in new.config.targets.iter().enumerate() {
        let mut luns = old
            .target(&t.name)
            .map(|n| n.luns.clone())
            .unwrap_or_default();
        for (target, lun, lu, _) in &p.new_luns {
            if *target == t.name {
                luns.insert(*lun, lu.clone());
            }
        }
        let portals = new.portal_addrs.get(ti).cloned().unwrap_or_default();
        targets.push(Arc::new(node_from_config(t, portals, luns)));
    }
    rt.live.swap(Served {
        targets,
        discovery_chap: new
            .config
            .discovery_chap
            .as_ref()
            .map(super::runtime::chap_credentials),
    });
    let sessions: Vec<Arc<SessionLuns>> = c.sessions.iter().filter_map(Weak::upgrade).collect();
    for lu in &p.grown {
        let seeing: Vec<ItNexus> = sessions
            .iter()
            .filter(|s| s.current().units().iter().any(|u| Arc::ptr_eq(u, lu)))
            .map(|s| (*s.nexus).clone())
            .collect();
        lu.capacity_grown(&seeing);
    }
    remap_sessions(rt, &sessions);
    if let (Some(portals), Some(sink)) = (p.portals, &c.portal_sink) {
        let _ = sink.send(portals);
    }
    c.backends.extend(
        p.new_luns
            .into_iter()
            .map(|(target, lun, _, backend)| LunBackend {
                target,
                lun,
                backend,
            }),
    );
    c.config = new;
}

/// The LUNs a session of `initiator` sees: none once the ACL no longer admits it (the
/// session stays, as the ACL only decides logins).
fn visible_map(node: &TargetNode, initiator: &str) -> LunMap {
    if node.admits(initiator) {
        node.lun_map_for(initiator)
    } else {
        LunMap::default()
    }
}

/// Give every session the map the new ACLs and LUNs allow; a session whose inventory
/// changed gets REPORTED LUNS DATA HAS CHANGED through each LU it now sees.
fn remap_sessions(rt: &Runtime, sessions: &[Arc<SessionLuns>]) {
    let served = rt.served();
    for s in sessions {
        let Some(node) = served.target(&s.nexus.target_name) else {
            continue;
        };
        let map = visible_map(&node, &s.nexus.initiator_name);
        let units = map.units();
        if s.replace(map) {
            for lu in &units {
                lu.queue_unit_attention_for(&s.nexus, ua::REPORTED_LUNS_DATA_HAS_CHANGED);
            }
        }
    }
}
