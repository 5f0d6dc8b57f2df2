//! The agent daemon: the tokio shell around the protocol. One heartbeat task writes this
//! node's slot; the main loop reads the quorum LUN every poll interval, judges peers,
//! and decides per group; claims, starts, stops and moves run as their own tasks and
//! report back, so a slow VM never delays the heartbeat.
//!
//! Safety does not rest on these timers: a VM starts only after its disks' reservation
//! is read back as ours, and a fenced node's writes are refused by the target.

use crate::agent::claim::{self, Identity, QUORUM_TYPE};
use crate::agent::config::{GroupConfig, OfflineAction, ValidNodeConfig};
use crate::agent::driver::{self, DriverError, VmContext, VmDriver, VmStatus};
use crate::agent::membership::{Liveness, Membership};
use crate::agent::placement::{self, Candidate, RestartBudget};
use crate::agent::quorum::{
    self, AdminState, GroupRecord, GroupState, HeartbeatSlot, NodeState, QuorumImage, QuorumLayout,
};
use crate::agent::quorum_disk::QuorumDisk;
use crate::agent::record_update::{self, Decision, Updated};
use crate::agent::{wall_ms, AgentError};
use crate::initiator::{InitiatorConfig, Session};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Structured events: a tracing line each, and a JSON line in STATE_DIR/events.jsonl
/// that tests, benchmarks and `holdfast demo` read.
#[derive(Clone)]
pub struct Events {
    node: String,
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl Events {
    pub fn open(node: &str, path: Option<PathBuf>) -> Events {
        let file = path.and_then(|p| {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| tracing::warn!(path = %p.display(), error = %e, "cannot open the event log"))
                .ok()
        });
        Events {
            node: node.to_string(),
            file: file.map(|f| Arc::new(Mutex::new(f))),
        }
    }

    /// One transition: `event` names it, `group` (may be empty) what it concerns,
    /// `reason` why, `extra` any other fields.
    pub fn emit(&self, event: &str, group: &str, reason: &str, extra: serde_json::Value) {
        tracing::info!(event, group, reason, extra = %extra, "transition");
        if let Some(f) = &self.file {
            let mut v = serde_json::json!({
                "wall_ms": wall_ms(),
                "mono_ns": mono_ns(),
                "node": self.node,
                "event": event,
                "group": group,
                "reason": reason,
            });
            if let (Some(o), serde_json::Value::Object(x)) = (v.as_object_mut(), extra) {
                o.extend(x);
            }
            // One write per line: several agents may share the file.
            let line = format!("{v}\n");
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, which
/// is what the failover benchmark needs.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where a group stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Not running here.
    Idle,
    /// An operation (claim/start, stop, restart, monitor) is in flight.
    Busy,
    Running {
        epoch: u64,
    },
}

struct GroupRt {
    cfg: GroupConfig,
    driver: Arc<Mutex<Box<dyn VmDriver>>>,
    local: Local,
    budget: RestartBudget,
    next_monitor: Instant,
    /// Since when this node has seen the group wanting an owner while another node was
    /// the better choice: after `dead_after` of that, anyone may claim.
    waiting_since: Option<Instant>,
    /// No new claim before this (after a failed attempt).
    backoff_until: Option<Instant>,
}

/// What an operation reports back to the main loop.
enum Done {
    /// The VM runs here at `epoch`.
    Running { group: String, epoch: u64 },
    /// Not running here any more (or never started).
    Idle { group: String },
    /// Status check: `None` means it runs; `Some` is what happened to it.
    Monitored { group: String, status: VmStatus },
    /// A claim step found our key gone or the reservation someone else's.
    Fenced { group: String, why: String },
    /// The operation failed; retry later.
    Failed { group: String, why: String },
}

/// What the operations share.
struct Shared {
    cfg: ValidNodeConfig,
    me: Identity,
    id: u16,
    cluster: String,
    events: Events,
    incarnation: AtomicU64,
    session: Mutex<Option<Session>>,
    /// A quorum write was refused: we were preempted.
    fenced: AtomicBool,
    /// mono_ns of the last completed heartbeat write.
    last_heartbeat_ok: AtomicU64,
    counter: AtomicU64,
    state: Mutex<NodeState>,
    layout: Mutex<Option<QuorumLayout>>,
    /// The portal of the current login: VMs use the same path.
    portal: Mutex<Option<std::net::SocketAddr>>,
}

impl Shared {
    fn timeout(&self) -> Duration {
        self.cfg.timings().io_timeout
    }
    fn session(&self) -> Result<Session, AgentError> {
        match self.session.lock().ok().and_then(|s| s.clone()) {
            Some(s) if !s.is_closed() => Ok(s),
            _ => Err(AgentError::Other("not connected to the target".into())),
        }
    }
    /// Forget a session that failed at the connection level; the main loop logs in
    /// again (same ISID, so the same I_T nexus) and re-registers.
    fn drop_session(&self, why: &AgentError) {
        if let Ok(mut s) = self.session.lock() {
            if s.take().is_some() {
                tracing::warn!(error = %why, "dropping the iSCSI session; will log in again");
            }
        }
    }
    fn quorum(&self) -> Result<QuorumDisk, AgentError> {
        let layout = self
            .layout
            .lock()
            .ok()
            .and_then(|l| *l)
            .ok_or_else(|| AgentError::Other("quorum LUN not opened".into()))?;
        Ok(QuorumDisk {
            session: self.session()?,
            lun: self.cfg.config.target.quorum_lun,
            layout,
            timeout: self.timeout(),
        })
    }
    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }
    fn ctx(&self, g: &GroupConfig, epoch: u64) -> VmContext {
        let st = &self.cfg.config.node.state_dir;
        let shared = self.cfg.config.node.shared_state_dir.as_ref().unwrap_or(st);
        VmContext {
            group: g.name.clone(),
            node: self.cfg.config.node.name.clone(),
            node_id: self.id,
            epoch,
            initiator_name: self.cfg.vm_initiator_name.clone(),
            portal: self
                .portal
                .lock()
                .ok()
                .and_then(|p| *p)
                .unwrap_or(self.cfg.portals[0])
                .to_string(),
            target: self.cfg.config.target.name.clone(),
            disks: g.disks.clone(),
            state_file: shared.join(format!("{}.state", g.name)),
            state_dir: st.clone(),
        }
    }

    /// Read-modify-COMPARE AND WRITE of group `name`: `f` gets the current record and
    /// returns the new one, or `None` to give up (its precondition no longer holds).
    async fn update_group(
        &self,
        name: &str,
        f: impl Fn(&GroupRecord) -> Option<GroupRecord>,
    ) -> Result<Option<GroupRecord>, AgentError> {
        let r = record_update::update_group(&self.quorum()?, name, |rec, _| match f(rec) {
            Some(n) => Decision::Write(n),
            None => Decision::Skip,
        })
        .await?;
        match r {
            Updated::Written(n) => Ok(Some(n)),
            Updated::Skipped | Updated::Refused(_) => Ok(None),
            Updated::NoRecord => Err(AgentError::Other(format!("group {name:?} has no record"))),
            Updated::Contended => Err(AgentError::Other(format!(
                "group {name:?}: the record keeps changing under us"
            ))),
        }
    }

    fn is_mine(&self, r: &GroupRecord) -> bool {
        r.owner == self.id && r.owner_incarnation == self.incarnation()
    }
}

/// Run a blocking driver call on the blocking pool.
async fn drive<T: Send + 'static>(
    d: &Arc<Mutex<Box<dyn VmDriver>>>,
    f: impl FnOnce(&mut dyn VmDriver) -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    let d = d.clone();
    tokio::task::spawn_blocking(move || {
        let mut g = d.lock().unwrap_or_else(|p| p.into_inner());
        f(g.as_mut())
    })
    .await
    .unwrap_or_else(|e| {
        Err(DriverError::Failed {
            action: "driver call",
            detail: format!("panicked: {e}"),
        })
    })
}

pub struct Agent {
    sh: Arc<Shared>,
    groups: BTreeMap<String, GroupRt>,
    membership: Membership,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    last_image: Option<QuorumImage>,
    self_fencing: bool,
}

/// Start an agent and run it until `stop` turns true (SIGTERM): then owned groups are
/// taken offline so that peers take them over, and the slot says "left".
pub async fn run(
    cfg: ValidNodeConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut agent = Agent::new(cfg)?;
    agent.sh.events.emit(
        "agent-start",
        "",
        "started",
        serde_json::json!({"incarnation": format!("{:#x}", agent.sh.incarnation())}),
    );
    // A VM left running by an earlier agent process on this node is not adopted: it
    // might be writing under a claim that a peer has since taken over. Kill it first.
    for g in agent.groups.values() {
        let ctx = agent.sh.ctx(&g.cfg, 0);
        if let Err(e) = drive(&g.driver, move |d| d.kill(&ctx)).await {
            tracing::error!(group = g.cfg.name, error = %e, "cannot kill a VM left by an earlier agent");
            return Err(AgentError::Driver(e));
        }
    }
    let hb = tokio::spawn(heartbeat_loop(agent.sh.clone()));
    let poll = agent.sh.cfg.timings().poll_interval;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => agent.tick().await,
            Some(d) = agent.done_rx.recv() => agent.on_done(d).await,
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    agent.shutdown().await;
    hb.abort();
    Ok(())
}

impl Agent {
    fn new(cfg: ValidNodeConfig) -> Result<Agent, AgentError> {
        let n = cfg.config.node.clone();
        let key = quorum::pr_key(&n.cluster, n.id);
        let me = Identity {
            key,
            initiator_name: cfg.initiator_name.clone(),
            isid: quorum::node_isid(n.id, quorum::ISID_AGENT),
            vm_initiator_name: None,
        };
        if let Some(d) = &n.shared_state_dir {
            std::fs::create_dir_all(d).map_err(|e| {
                AgentError::Other(format!(
                    "cannot create shared_state_dir {}: {e}",
                    d.display()
                ))
            })?;
        }
        std::fs::create_dir_all(&n.state_dir).map_err(|e| {
            AgentError::Other(format!(
                "cannot create state_dir {}: {e}",
                n.state_dir.display()
            ))
        })?;
        let events = Events::open(
            &n.name,
            Some(
                n.event_log
                    .clone()
                    .unwrap_or_else(|| n.state_dir.join("events.jsonl")),
            ),
        );
        let mut groups = BTreeMap::new();
        for g in &cfg.config.groups {
            let d = driver::build(&g.vm, n.state_dir.join(format!("{}.log", g.name)));
            groups.insert(
                g.name.clone(),
                GroupRt {
                    cfg: g.clone(),
                    driver: Arc::new(Mutex::new(d)),
                    local: Local::Idle,
                    budget: RestartBudget::new(g.restart_threshold, g.restart_period),
                    next_monitor: Instant::now(),
                    waiting_since: None,
                    backoff_until: None,
                },
            );
        }
        let dead_after = cfg.timings().dead_after;
        let sh = Arc::new(Shared {
            id: n.id,
            cluster: n.cluster.clone(),
            me,
            events,
            incarnation: AtomicU64::new(fresh_incarnation()),
            session: Mutex::new(None),
            fenced: AtomicBool::new(false),
            last_heartbeat_ok: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            state: Mutex::new(NodeState::Active),
            layout: Mutex::new(None),
            portal: Mutex::new(None),
            cfg,
        });
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Agent {
            sh,
            groups,
            membership: Membership::new(dead_after),
            done_tx,
            done_rx,
            last_image: None,
            self_fencing: false,
        })
    }

    fn vm_identity(&self) -> Identity {
        Identity {
            vm_initiator_name: Some(self.sh.cfg.vm_initiator_name.clone()),
            ..self.sh.me.clone()
        }
    }

    /// Log in (portals in order, the node's fixed ISID), open the quorum LUN, register
    /// on it, and re-register on the disks of every group running here.
    async fn connect(&mut self) -> Result<(), AgentError> {
        let t = self.sh.timeout();
        let tcfg = &self.sh.cfg.config.target;
        let mut last = AgentError::Other("no portal".into());
        for addr in &self.sh.cfg.portals {
            let mut ic =
                InitiatorConfig::new(self.sh.cfg.initiator_name.clone(), tcfg.name.clone(), *addr);
            ic.isid = Some(self.sh.me.isid);
            ic.login_timeout = t;
            if let Some(c) = &tcfg.chap {
                ic.chap = Some((c.username.clone(), c.secret.clone().into_bytes()));
            }
            let s = match Session::login(ic).await {
                Ok(s) => s,
                Err(e) => {
                    last = AgentError::from_initiator("login", e);
                    continue;
                }
            };
            let (q, _header) =
                QuorumDisk::open(s.clone(), tcfg.quorum_lun, &self.sh.cluster, t).await?;
            if let Ok(mut l) = self.sh.layout.lock() {
                *l = Some(q.layout);
            }
            claim::join_quorum(&s, tcfg.quorum_lun, &self.sh.me, t).await?;
            if let Ok(mut cur) = self.sh.session.lock() {
                *cur = Some(s.clone());
            }
            if let Ok(mut p) = self.sh.portal.lock() {
                *p = Some(*addr);
            }
            // "Re-register after every re-login": a new nexus starts unregistered.
            let vm = self.vm_identity();
            for g in self.groups.values() {
                if matches!(g.local, Local::Running { .. }) {
                    for &lun in &g.cfg.disks {
                        claim::ensure_registered(&s, lun, &vm, t).await?;
                    }
                }
            }
            for g in self.groups.keys() {
                q.ensure_group(g).await?;
            }
            tracing::info!(portal = %addr, "logged in; quorum LUN joined");
            return Ok(());
        }
        Err(last)
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        // Self-fence: a quorum write refused, or no completed heartbeat for too long.
        let last_ok = self.sh.last_heartbeat_ok.load(Ordering::SeqCst);
        let hb_age = Duration::from_nanos(mono_ns().saturating_sub(last_ok));
        let have_vms = self
            .groups
            .values()
            .any(|g| !matches!(g.local, Local::Idle));
        if self.sh.fenced.load(Ordering::SeqCst) {
            self.self_fence("a quorum LUN write was refused: this node was fenced")
                .await;
            return;
        }
        if have_vms && last_ok != 0 && hb_age > self.sh.cfg.timings().self_fence_after {
            self.self_fence(&format!(
                "no completed heartbeat write for {} ms",
                hb_age.as_millis()
            ))
            .await;
            return;
        }
        if self.sh.session().is_err() {
            if let Err(e) = self.connect().await {
                tracing::warn!(error = %e, "cannot reach the target");
                if !e.is_connection() {
                    self.sh.events.emit(
                        "connect-failed",
                        "",
                        &e.to_string(),
                        serde_json::json!({}),
                    );
                }
                return;
            }
            // With VMs running, prove we are alive at once: the heartbeat task's next
            // beat may come after the next self-fence check, which would kill VMs that
            // just rode out a short target restart. (Not on the first login: joining
            // peers get a beat to show up before anyone places groups.)
            if have_vms && write_heartbeat(&self.sh).await.is_ok() {
                self.sh.last_heartbeat_ok.store(mono_ns(), Ordering::SeqCst);
            }
        }
        let q = match self.sh.quorum() {
            Ok(q) => q,
            Err(_) => return,
        };
        let img = match q.read_image().await {
            Ok(i) => i,
            Err(e) => {
                if e.is_connection() {
                    self.sh.drop_session(&e);
                }
                tracing::warn!(error = %e, "cannot read the quorum LUN");
                return;
            }
        };
        for c in &img.corrupt {
            tracing::warn!(error = %c, "corrupt quorum record");
        }
        // Judge liveness at the moment the read completed, not when the tick began.
        let now2 = Instant::now();
        let _ = now;
        self.membership.observe(now2, img.slots.iter().flatten());
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            if let Err(e) = self.decide(&name, &img, now2).await {
                tracing::warn!(group = name, error = %e, "decision failed");
                if e.is_connection() {
                    self.sh.drop_session(&e);
                }
            }
        }
        self.last_image = Some(img);
    }

    /// Nodes that may run a group now: alive (or us, with a fresh heartbeat), not
    /// drained, not marked failed for it, and not `except`.
    fn candidates(
        &self,
        img: &QuorumImage,
        rec: &GroupRecord,
        except: u16,
        now: Instant,
    ) -> Vec<Candidate> {
        let mut v = Vec::new();
        for slot in img.slots.iter().flatten() {
            let id = slot.node_id;
            if id == except || rec.failed_on_node(id) || img.admin(id).drained {
                continue;
            }
            let ok = if id == self.sh.id {
                slot.incarnation == self.sh.incarnation() && !self.self_fencing
            } else {
                slot.state == NodeState::Active
                    && self.membership.liveness(id, now) == Liveness::Alive
            };
            if ok {
                v.push(Candidate {
                    id,
                    name: slot.name.clone(),
                    load: img.load(id),
                });
            }
        }
        v
    }

    async fn decide(
        &mut self,
        name: &str,
        img: &QuorumImage,
        now: Instant,
    ) -> Result<(), AgentError> {
        let Some((_, rec, _)) = img.group(name) else {
            // Created on the next connect (or by a peer).
            return self.sh.quorum()?.ensure_group(name).await;
        };
        let rec = rec.clone();
        let Some(g) = self.groups.get(name) else {
            return Ok(());
        };
        if g.local == Local::Busy {
            return Ok(());
        }
        let me = self.sh.id;
        let mine = self.sh.is_mine(&rec);
        // 1. Records of ours from an earlier life of this agent (restart, self-fence).
        if rec.owner == me && !mine {
            let g = self.groups.get_mut(name).expect("group exists");
            g.local = Local::Busy;
            let sh = self.sh.clone();
            let (cfg, drv, tx) = (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
            tokio::spawn(async move {
                let d = release_orphan(&sh, &cfg, &drv, &rec).await;
                let _ = tx.send(d);
            });
            return Ok(());
        }
        // 2. Ours and running here: monitor and apply policies.
        if mine {
            return self.decide_owned(name, img, &rec, now).await;
        }
        // Not ours: a VM still running here means someone else took it. Kill it now.
        if !matches!(self.groups[name].local, Local::Idle) {
            let why = format!(
                "group record names node {} (epoch {}) as owner while the VM runs here",
                rec.owner, rec.epoch
            );
            self.kill_group(name, &why).await;
            return Ok(());
        }
        if rec.admin == AdminState::Offline {
            self.groups.get_mut(name).expect("group").waiting_since = None;
            return Ok(());
        }
        // 3. Owned by a peer: take over only if that peer is dead.
        if rec.owner != 0 {
            match self.membership.liveness(rec.owner, now) {
                Liveness::Dead => {}
                Liveness::Left => {}
                _ => {
                    // Alive, but a new incarnation: it cleans its orphans itself.
                    self.groups.get_mut(name).expect("group").waiting_since = None;
                    return Ok(());
                }
            }
        }
        if self.self_fencing {
            return Ok(());
        }
        // 4. Unowned (or owner dead): claim if we are the node that should run it.
        let cands = self.candidates(img, &rec, rec.owner, now);
        let target = if rec.move_to != 0 && cands.iter().any(|c| c.id == rec.move_to) {
            Some(rec.move_to)
        } else {
            placement::best_owner(&self.groups[name].cfg.preferred_owners, &cands)
        };
        let vm = self.vm_identity();
        let g = self.groups.get_mut(name).expect("group");
        if let Some(t) = g.backoff_until {
            if now < t {
                return Ok(());
            }
            g.backoff_until = None;
        }
        let dead_after = self.sh.cfg.timings().dead_after;
        let go = match target {
            Some(t) if t == me => true,
            Some(_) | None => {
                // Another node should take it; if it has not within dead_after, we do
                // (it may be dead too, or not configured for this group). Never when
                // we are not a candidate ourselves.
                let since = *g.waiting_since.get_or_insert(now);
                cands.iter().any(|c| c.id == me)
                    && now.saturating_duration_since(since) >= dead_after
            }
        };
        if !go {
            return Ok(());
        }
        g.waiting_since = None;
        g.local = Local::Busy;
        let sh = self.sh.clone();
        let (cfg, drv, tx) = (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
        let victim = if rec.owner != 0 && rec.owner != me {
            Some(rec.owner)
        } else {
            None
        };
        let victim_inc = victim.and_then(|v| img.slot(v).map(|s| s.incarnation));
        tokio::spawn(async move {
            let d = claim_and_start(&sh, &vm, &cfg, &drv, &rec, victim, victim_inc).await;
            let _ = tx.send(d);
        });
        Ok(())
    }

    async fn decide_owned(
        &mut self,
        name: &str,
        img: &QuorumImage,
        rec: &GroupRecord,
        now: Instant,
    ) -> Result<(), AgentError> {
        let me = self.sh.id;
        let cands = self.candidates(img, rec, me, now);
        let vm = self.vm_identity();
        let my_name = self.sh.cfg.config.node.name.clone();
        let g = self.groups.get_mut(name).expect("group");
        let Local::Running { .. } = g.local else {
            // Ours on the record but not running here and no op in flight: an op ended
            // without finishing the record (e.g. lost connection). Make it consistent.
            if g.local == Local::Idle {
                g.local = Local::Busy;
                let sh = self.sh.clone();
                let (cfg, drv, tx) = (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
                let rec = rec.clone();
                tokio::spawn(async move {
                    let d = release_orphan(&sh, &cfg, &drv, &rec).await;
                    let _ = tx.send(d);
                });
            }
            return Ok(());
        };
        if rec.frozen {
            return Ok(());
        }
        // Admin and placement requests, most specific first.
        let request: Option<(OfflineReason, String)> = if rec.admin == AdminState::Offline {
            Some((
                OfflineReason::Maintenance,
                "taken offline by the administrator".into(),
            ))
        } else if rec.move_to != 0 && rec.move_to != me {
            let alive = self.membership.is_alive(rec.move_to, now);
            if alive {
                Some((
                    OfflineReason::Move(rec.move_to),
                    format!("moving to node {} on request", rec.move_to),
                ))
            } else {
                None
            }
        } else if img.admin(me).drained {
            placement::best_owner(&g.cfg.preferred_owners, &cands).map(|t| {
                (
                    OfflineReason::Move(t),
                    format!("node drained; moving to node {t}"),
                )
            })
        } else {
            let window = g
                .cfg
                .failback_window
                .as_deref()
                .and_then(|w| crate::agent::config::parse_window(w).ok());
            placement::failback_target(&g.cfg.preferred_owners, &cands)
                .and_then(|t| cands.iter().find(|c| c.id == t))
                .filter(|t| placement::is_away_from(&g.cfg.preferred_owners, &my_name, &t.name))
                .filter(|_| placement::failback_allowed(g.cfg.failback, window, local_minute()))
                .map(|t| {
                    (
                        OfflineReason::Move(t.id),
                        format!("failback to preferred owner {}", t.name),
                    )
                })
        };
        if let Some((why, text)) = request {
            g.local = Local::Busy;
            let sh = self.sh.clone();
            let (cfg, drv, tx) = (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
            tokio::spawn(async move {
                let d = take_offline(&sh, &cfg, &drv, why, &text, true).await;
                let _ = tx.send(d);
            });
            return Ok(());
        }
        if now >= g.next_monitor {
            g.next_monitor = now + g.cfg.monitor_interval;
            g.local = Local::Busy;
            let sh = self.sh.clone();
            let (cfg, drv, tx) = (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
            let epoch = rec.epoch;
            tokio::spawn(async move {
                let d = monitor(&sh, &vm, &cfg, &drv, epoch).await;
                let _ = tx.send(d);
            });
        }
        Ok(())
    }

    async fn on_done(&mut self, d: Done) {
        let now = Instant::now();
        match d {
            Done::Running { group, epoch } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Running { epoch };
                    g.next_monitor = now + g.cfg.monitor_interval;
                }
            }
            Done::Idle { group } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Idle;
                }
            }
            Done::Failed { group, why } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Idle;
                    g.backoff_until = Some(now + self.sh.cfg.timings().dead_after);
                }
                tracing::warn!(group, why, "operation failed");
            }
            Done::Fenced { group, why } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Idle;
                }
                self.self_fence(&format!("group {group}: {why}")).await;
            }
            Done::Monitored { group, status } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                let Local::Busy = g.local else { return };
                match status {
                    VmStatus::Running => {
                        // The epoch is unchanged by a monitor.
                        let epoch = self
                            .last_image
                            .as_ref()
                            .and_then(|i| i.group(&group).map(|(_, r, _)| r.epoch))
                            .unwrap_or(0);
                        g.local = Local::Running { epoch };
                    }
                    VmStatus::ShutDown => {
                        let sh = self.sh.clone();
                        let (cfg, drv, tx) =
                            (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
                        tokio::spawn(async move {
                            let d = take_offline(
                                &sh,
                                &cfg,
                                &drv,
                                OfflineReason::GuestShutDown,
                                "the guest was shut down by its administrator; kept stopped",
                                false,
                            )
                            .await;
                            let _ = tx.send(d);
                        });
                    }
                    st => {
                        let why = match st {
                            VmStatus::Failed(w) => w,
                            _ => "the VM is not running".to_string(),
                        };
                        let sh = self.sh.clone();
                        let (cfg, drv, tx) =
                            (g.cfg.clone(), g.driver.clone(), self.done_tx.clone());
                        if g.budget.try_restart(now) {
                            let n = g.budget.count(now);
                            let vm = self.vm_identity();
                            tokio::spawn(async move {
                                let d = restart_in_place(&sh, &vm, &cfg, &drv, n, &why).await;
                                let _ = tx.send(d);
                            });
                        } else {
                            g.budget.reset();
                            let text = format!(
                                "VM failed ({why}) after {} restarts within {:?}; failing over",
                                cfg.restart_threshold, cfg.restart_period
                            );
                            tokio::spawn(async move {
                                let d = take_offline(
                                    &sh,
                                    &cfg,
                                    &drv,
                                    OfflineReason::Failed,
                                    &text,
                                    false,
                                )
                                .await;
                                let _ = tx.send(d);
                            });
                        }
                    }
                }
            }
        }
    }

    async fn kill_group(&mut self, name: &str, why: &str) {
        let Some(g) = self.groups.get_mut(name) else {
            return;
        };
        let ctx = self.sh.ctx(&g.cfg, 0);
        let r = drive(&g.driver, move |d| d.kill(&ctx)).await;
        g.local = Local::Idle;
        self.sh.events.emit(
            "vm-killed",
            name,
            why,
            serde_json::json!({"ok": r.is_ok(), "error": r.err().map(|e| e.to_string())}),
        );
    }

    /// Kill every VM here at once, then rejoin as a new incarnation: our old records
    /// become orphans that we (or the peers that fenced us) settle.
    async fn self_fence(&mut self, why: &str) {
        if self.self_fencing {
            return;
        }
        self.self_fencing = true;
        if let Ok(mut s) = self.sh.state.lock() {
            *s = NodeState::SelfFenced;
        }
        self.sh
            .events
            .emit("self-fence", "", why, serde_json::json!({}));
        let names: Vec<String> = self.groups.keys().cloned().collect();
        let mut kills = Vec::new();
        for n in &names {
            let g = &self.groups[n];
            let ctx = self.sh.ctx(&g.cfg, 0);
            let d = g.driver.clone();
            let n = n.clone();
            kills.push(async move { (n, drive(&d, move |d| d.kill(&ctx)).await) });
        }
        for (n, r) in futures_join(kills).await {
            if let Err(e) = r {
                tracing::error!(group = n, error = %e, "self-fence: kill failed");
            }
            if let Some(g) = self.groups.get_mut(&n) {
                g.local = Local::Idle;
                g.budget.reset();
            }
        }
        // Rejoin: a new incarnation, so nothing of the old one is trusted.
        self.sh
            .incarnation
            .store(fresh_incarnation(), Ordering::SeqCst);
        self.sh.fenced.store(false, Ordering::SeqCst);
        if let Ok(mut s) = self.sh.state.lock() {
            *s = NodeState::Active;
        }
        // Log in again from scratch; join_quorum re-registers if our key was removed.
        if let Ok(mut s) = self.sh.session.lock() {
            *s = None;
        }
        self.sh.last_heartbeat_ok.store(0, Ordering::SeqCst);
        self.sh.events.emit(
            "rejoin",
            "",
            "VMs gone; rejoining as a new incarnation",
            serde_json::json!({"incarnation": format!("{:#x}", self.sh.incarnation())}),
        );
        self.self_fencing = false;
    }

    /// SIGTERM: take every group offline so that peers take over, then say "left".
    async fn shutdown(&mut self) {
        self.sh
            .events
            .emit("agent-stop", "", "SIGTERM", serde_json::json!({}));
        // Wait for operations in flight.
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.groups.values().any(|g| g.local == Local::Busy) && Instant::now() < deadline {
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(200), self.done_rx.recv()).await
            {
                match d {
                    Done::Running { group, epoch } => {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.local = Local::Running { epoch };
                        }
                    }
                    Done::Monitored { group, .. } => {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.local = Local::Running { epoch: 0 };
                        }
                    }
                    Done::Idle { group }
                    | Done::Failed { group, .. }
                    | Done::Fenced { group, .. } => {
                        if let Some(g) = self.groups.get_mut(&group) {
                            g.local = Local::Idle;
                        }
                    }
                }
            }
        }
        let names: Vec<String> = self.groups.keys().cloned().collect();
        // Name the next owner in the record (as a move does), so that it claims at
        // once instead of every peer waiting to see whether we come back.
        let img = match self.sh.quorum() {
            Ok(q) => q.read_image().await.ok(),
            Err(_) => None,
        };
        let now = Instant::now();
        for n in names {
            let g = &self.groups[&n];
            if matches!(g.local, Local::Running { .. }) {
                let next = img.as_ref().and_then(|img| {
                    let (_, rec, _) = img.group(&n)?;
                    let cands = self.candidates(img, rec, self.sh.id, now);
                    placement::best_owner(&g.cfg.preferred_owners, &cands)
                });
                let (why, text) = match next {
                    Some(t) => (
                        OfflineReason::Move(t),
                        format!("agent stopping; handing the group over to node {t}"),
                    ),
                    None => (
                        OfflineReason::NodeStop,
                        "agent stopping; no other node can take the group".to_string(),
                    ),
                };
                let d = take_offline(&self.sh, &g.cfg, &g.driver, why, &text, true).await;
                if let Done::Failed { why, .. } = d {
                    tracing::error!(group = n, why, "could not hand the group over; killing it");
                    self.kill_group(&n, "agent stopping").await;
                }
            }
        }
        if let Ok(mut s) = self.sh.state.lock() {
            *s = NodeState::Left;
        }
        let _ = write_heartbeat(&self.sh).await;
    }
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

fn fresh_incarnation() -> u64 {
    rand::random::<u64>() | 1
}

/// Minutes since local midnight (failback windows are in the node's local time).
fn local_minute() -> u16 {
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r fills the tm we own from a valid time_t.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        (tm.tm_hour * 60 + tm.tm_min) as u16
    } else {
        0
    }
}

async fn write_heartbeat(sh: &Shared) -> Result<(), AgentError> {
    let q = sh.quorum()?;
    let state = sh.state.lock().map(|s| *s).unwrap_or(NodeState::Active);
    let slot = HeartbeatSlot {
        node_id: sh.id,
        name: sh.cfg.config.node.name.clone(),
        incarnation: sh.incarnation(),
        counter: sh.counter.fetch_add(1, Ordering::SeqCst) + 1,
        state,
        wall_ms: wall_ms(),
    };
    q.write_slot(&slot).await
}

async fn heartbeat_loop(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(sh.cfg.timings().heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match write_heartbeat(&sh).await {
            Ok(()) => sh.last_heartbeat_ok.store(mono_ns(), Ordering::SeqCst),
            Err(AgentError::Conflict(_)) => {
                // Preempted on the quorum LUN: a peer fenced us.
                sh.fenced.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                if e.is_connection() {
                    sh.drop_session(&e);
                }
                tracing::debug!(error = %e, "heartbeat write failed");
            }
        }
    }
}

/// Why a group is being taken offline (decides the offline action and the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OfflineReason {
    Maintenance,
    Move(u16),
    NodeStop,
    /// The VM stopped by itself cleanly: nothing to stop, kept offline.
    GuestShutDown,
    /// Restarts used up: nothing to stop, mark failed here so a peer takes it.
    Failed,
}

/// Fence the dead owner (quorum LUN, then the disks through the claim), claim the
/// record, claim every disk and read it back, and only then start the VM.
async fn claim_and_start(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    seen: &GroupRecord,
    victim: Option<u16>,
    victim_incarnation: Option<u64>,
) -> Done {
    let group = cfg.name.clone();
    let t = sh.timeout();
    let me = sh.id;
    let inc = sh.incarnation();
    let reason = match victim {
        Some(v) => format!(
            "node {v} stopped heartbeating; taken over by {}",
            sh.cfg.config.node.name
        ),
        None if seen.move_to == me => format!("moved here ({})", seen.reason),
        None => format!("claimed by {}", sh.cfg.config.node.name),
    };
    let claim_started = mono_ns();
    // 1. The record: exactly one node wins this COMPARE AND WRITE.
    let expect_owner = seen.owner;
    let expect_epoch = seen.epoch;
    let claimed = sh
        .update_group(&group, |r| {
            if r.owner != expect_owner || r.epoch != expect_epoch || r.admin == AdminState::Offline
            {
                return None;
            }
            let mut n = r.clone();
            n.owner = me;
            n.owner_incarnation = inc;
            n.epoch += 1;
            n.state = GroupState::Starting;
            n.move_to = 0;
            n.restarts = 0;
            n.reason = reason.clone();
            Some(n)
        })
        .await;
    let rec = match claimed {
        Ok(Some(r)) => r,
        Ok(None) => {
            sh.events.emit(
                "claim-lost",
                &group,
                "the record changed before our COMPARE AND WRITE: another node won",
                serde_json::json!({"seen_epoch": expect_epoch}),
            );
            return Done::Idle { group };
        }
        Err(e) => {
            return Done::Failed {
                group,
                why: e.to_string(),
            }
        }
    };
    sh.events.emit(
        "claimed",
        &group,
        &reason,
        serde_json::json!({"epoch": rec.epoch, "previous_owner": expect_owner}),
    );
    let fail = |why: String, fenced: bool| async move {
        if fenced {
            Done::Fenced {
                group: cfg.name.clone(),
                why,
            }
        } else {
            Done::Failed {
                group: cfg.name.clone(),
                why,
            }
        }
    };
    let s = match sh.session() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string(), false).await,
    };
    // 2. Fence the dead owner on the quorum LUN: its heartbeat writes now fail, which
    //    makes it kill its VMs should it ever wake up.
    if let Some(v) = victim {
        let vkey = quorum::pr_key(&sh.cluster, v);
        match claim::preempt_abort(
            &s,
            sh.cfg.config.target.quorum_lun,
            &sh.me,
            vkey,
            QUORUM_TYPE,
            t,
        )
        .await
        {
            Ok(_) => {}
            Err(e @ AgentError::Fenced(_)) => return fail(e.to_string(), true).await,
            Err(e) => return undo_claim(sh, cfg, drv, &rec, &e.to_string(), false).await,
        }
        let _ = record_fence(sh, v, victim_incarnation.unwrap_or(0)).await;
        sh.events.emit(
            "fenced",
            &group,
            &format!("node {v} preempted and aborted on the quorum LUN"),
            serde_json::json!({"node_id": v, "key": format!("{vkey:#x}")}),
        );
    }
    // 3. The disks, in order: registered (agent + VM data path), every other key
    //    preempted with abort, reservation ours, read back.
    for &lun in &cfg.disks {
        if let Err(e) = claim::claim_disk(&s, lun, vm, t).await {
            let fenced = matches!(e, AgentError::Fenced(_));
            return undo_claim(
                sh,
                cfg,
                drv,
                &rec,
                &format!("claiming LUN {lun}: {e}"),
                fenced,
            )
            .await;
        }
    }
    let claimed_ns = mono_ns();
    // 4. Start (or restore) the VM.
    let ctx = sh.ctx(cfg, rec.epoch);
    let saved = rec.saved;
    let started = drive(drv, move |d| {
        if saved && d.restore(&ctx)? {
            return Ok(true);
        }
        if !saved {
            d.discard_saved(&ctx)?;
        }
        d.start(&ctx).map(|_| false)
    })
    .await;
    let restored = match started {
        Ok(r) => r,
        Err(e) => {
            return undo_claim(sh, cfg, drv, &rec, &format!("VM start failed: {e}"), false).await
        }
    };
    let epoch = rec.epoch;
    let r = sh
        .update_group(&group, |r| {
            if r.owner != me || r.owner_incarnation != inc || r.epoch != epoch {
                return None;
            }
            let mut n = r.clone();
            n.state = GroupState::Running;
            n.saved = false;
            Some(n)
        })
        .await;
    match r {
        Ok(Some(_)) => {}
        Ok(None) => {
            // Someone took it while we started: kill ours at once.
            let ctx = sh.ctx(cfg, epoch);
            let _ = drive(drv, move |d| d.kill(&ctx)).await;
            return Done::Idle { group };
        }
        Err(e) => {
            // Running, record not updated: the monitor keeps it; the next successful
            // update sets the state.
            tracing::warn!(group, error = %e, "VM started but the record update failed");
        }
    }
    sh.events.emit(
        "vm-started",
        &group,
        if restored {
            "restored from saved state"
        } else {
            "started"
        },
        serde_json::json!({
            "epoch": epoch,
            "restored": restored,
            "claim_ms": (claimed_ns - claim_started) as f64 / 1e6,
            "start_ms": (mono_ns() - claimed_ns) as f64 / 1e6,
        }),
    );
    Done::Running { group, epoch }
}

/// A failed claim: stop what was started, let the disks go, give the record back.
async fn undo_claim(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    rec: &GroupRecord,
    why: &str,
    fenced: bool,
) -> Done {
    let ctx = sh.ctx(cfg, rec.epoch);
    let _ = drive(drv, move |d| d.kill(&ctx)).await;
    sh.events.emit(
        "claim-failed",
        &cfg.name,
        why,
        serde_json::json!({"epoch": rec.epoch}),
    );
    if !fenced {
        if let Ok(s) = sh.session() {
            for &lun in &cfg.disks {
                let _ = claim::release_disk(&s, lun, &sh.me, sh.timeout()).await;
            }
        }
        let (me, inc, epoch) = (sh.id, sh.incarnation(), rec.epoch);
        let _ = sh
            .update_group(&cfg.name, |r| {
                if r.owner != me || r.owner_incarnation != inc || r.epoch != epoch {
                    return None;
                }
                let mut n = r.clone();
                n.owner = 0;
                n.owner_incarnation = 0;
                n.state = GroupState::Stopped;
                n.reason = format!("claim by node {me} failed: {why}");
                Some(n)
            })
            .await;
        return Done::Failed {
            group: cfg.name.clone(),
            why: why.to_string(),
        };
    }
    Done::Fenced {
        group: cfg.name.clone(),
        why: why.to_string(),
    }
}

/// Note on the victim's admin record that it was fenced (for `ctl status`).
async fn record_fence(sh: &Shared, victim: u16, incarnation: u64) -> Result<(), AgentError> {
    let me = sh.id;
    record_update::update_admin(&sh.quorum()?, victim, |a| {
        if a.fenced_incarnation == incarnation && incarnation != 0 {
            return Decision::Skip;
        }
        let mut n = a.clone();
        n.fenced_incarnation = incarnation;
        n.fenced_by = me;
        n.fence_count = n.fence_count.saturating_add(1);
        n.fenced_wall_ms = wall_ms();
        Decision::Write(n)
    })
    .await?;
    Ok(())
}

/// A record that names us from an earlier life: make sure no VM of it runs here, then
/// give it back (Stopped) so placement decides afresh.
async fn release_orphan(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    rec: &GroupRecord,
) -> Done {
    let ctx = sh.ctx(cfg, rec.epoch);
    if let Err(e) = drive(drv, move |d| d.kill(&ctx)).await {
        return Done::Failed {
            group: cfg.name.clone(),
            why: format!("cannot make sure the old VM is gone: {e}"),
        };
    }
    let (me, old_inc, epoch) = (sh.id, rec.owner_incarnation, rec.epoch);
    let r = sh
        .update_group(&cfg.name, |r| {
            if r.owner != me || r.owner_incarnation != old_inc || r.epoch != epoch {
                return None;
            }
            let mut n = r.clone();
            n.owner = 0;
            n.owner_incarnation = 0;
            n.state = GroupState::Stopped;
            // A move requested meanwhile (ctl move while we were cut off) still stands.
            n.reason = "the owner's agent restarted or self-fenced; VM stopped".into();
            Some(n)
        })
        .await;
    match r {
        Ok(Some(_)) => {
            sh.events.emit(
                "orphan-released",
                &cfg.name,
                "record from an earlier incarnation of this node",
                serde_json::json!({"epoch": epoch}),
            );
            Done::Idle {
                group: cfg.name.clone(),
            }
        }
        Ok(None) => Done::Idle {
            group: cfg.name.clone(),
        },
        Err(e) => Done::Failed {
            group: cfg.name.clone(),
            why: e.to_string(),
        },
    }
}

/// Status check, and that our claim still stands (a lost key means fenced).
async fn monitor(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    epoch: u64,
) -> Done {
    let group = cfg.name.clone();
    if let Ok(s) = sh.session() {
        for &lun in &cfg.disks {
            match claim::key_present(&s, lun, vm.key, sh.timeout()).await {
                Ok(true) => {}
                Ok(false) => {
                    return Done::Fenced {
                        group,
                        why: format!("our key is gone from LUN {lun}"),
                    }
                }
                Err(e) => {
                    if e.is_connection() {
                        sh.drop_session(&e);
                    }
                    break;
                }
            }
        }
    }
    let ctx = sh.ctx(cfg, epoch);
    match drive(drv, move |d| d.status(&ctx)).await {
        Ok(st) => Done::Monitored { group, status: st },
        Err(e) => Done::Monitored {
            group,
            status: VmStatus::Failed(format!("status check failed: {e}")),
        },
    }
}

/// Restart a failed VM here: a new epoch on the record, our claim read back, start.
async fn restart_in_place(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    n: u32,
    why: &str,
) -> Done {
    let group = cfg.name.clone();
    let (me, inc) = (sh.id, sh.incarnation());
    let reason = format!("restart {n}/{} after: {why}", cfg.restart_threshold);
    // Make sure the old one is gone before a new one starts.
    let ctx = sh.ctx(cfg, 0);
    let _ = drive(drv, move |d| d.kill(&ctx)).await;
    let rec = match sh
        .update_group(&group, |r| {
            if r.owner != me || r.owner_incarnation != inc {
                return None;
            }
            let mut x = r.clone();
            x.epoch += 1;
            x.state = GroupState::Starting;
            x.restarts = n as u16;
            x.reason = reason.clone();
            Some(x)
        })
        .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return Done::Idle { group },
        Err(e) => {
            return Done::Failed {
                group,
                why: e.to_string(),
            }
        }
    };
    sh.events.emit(
        "vm-restart",
        &group,
        &reason,
        serde_json::json!({"epoch": rec.epoch}),
    );
    let s = match sh.session() {
        Ok(s) => s,
        Err(e) => return undo_claim(sh, cfg, drv, &rec, &e.to_string(), false).await,
    };
    for &lun in &cfg.disks {
        if let Err(e) = claim::claim_disk(&s, lun, vm, sh.timeout()).await {
            let fenced = matches!(e, AgentError::Fenced(_));
            return undo_claim(sh, cfg, drv, &rec, &format!("LUN {lun}: {e}"), fenced).await;
        }
    }
    let ctx = sh.ctx(cfg, rec.epoch);
    if let Err(e) = drive(drv, move |d| {
        d.discard_saved(&ctx)?;
        d.start(&ctx)
    })
    .await
    {
        return undo_claim(sh, cfg, drv, &rec, &format!("VM start failed: {e}"), false).await;
    }
    let epoch = rec.epoch;
    let _ = sh
        .update_group(&group, |r| {
            if r.owner != me || r.owner_incarnation != inc || r.epoch != epoch {
                return None;
            }
            let mut x = r.clone();
            x.state = GroupState::Running;
            Some(x)
        })
        .await;
    sh.events.emit(
        "vm-started",
        &group,
        "restarted in place",
        serde_json::json!({"epoch": epoch}),
    );
    Done::Running { group, epoch }
}

/// Take a group offline here: the offline action on the VM (unless it already
/// stopped), the reservation released, the record handed back as the reason says.
async fn take_offline(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    why: OfflineReason,
    text: &str,
    vm_running: bool,
) -> Done {
    let group = cfg.name.clone();
    let (me, inc) = (sh.id, sh.incarnation());
    let t0 = mono_ns();
    if vm_running {
        let _ = sh
            .update_group(&group, |r| {
                if r.owner != me || r.owner_incarnation != inc {
                    return None;
                }
                let mut x = r.clone();
                x.state = GroupState::Stopping;
                x.reason = text.to_string();
                Some(x)
            })
            .await;
    }
    let mut saved = false;
    if vm_running {
        let ctx = sh.ctx(cfg, 0);
        let action = match why {
            OfflineReason::Move(_) | OfflineReason::NodeStop => cfg.offline_action,
            OfflineReason::Maintenance => cfg.offline_action,
            _ => OfflineAction::Kill,
        };
        let timeout = cfg.stop_timeout;
        let r = drive(drv, move |d| match action {
            OfflineAction::Save => match d.save(&ctx, timeout) {
                Ok(()) => Ok(true),
                Err(DriverError::Unsupported { .. }) => d.stop(&ctx, timeout).map(|_| false),
                Err(e) => {
                    // A failed save must not leave the VM running: stop it for real.
                    let _ = d.kill(&ctx);
                    Err(e)
                }
            },
            OfflineAction::Shutdown => d.stop(&ctx, timeout).map(|_| false),
            OfflineAction::Kill => d.kill(&ctx).map(|_| false),
        })
        .await;
        match r {
            Ok(s) => saved = s,
            Err(e) => {
                // A stop or save that failed (or timed out) must not leave the VM
                // running while the disks are released: kill it, and say so.
                let ctx = sh.ctx(cfg, 0);
                let k = drive(drv, move |d| d.kill(&ctx)).await;
                tracing::warn!(group, error = %e, kill_ok = k.is_ok(), "offline action failed; VM killed");
                if let Err(k) = k {
                    sh.events.emit(
                        "vm-kill-failed",
                        &group,
                        &format!("offline action failed ({e}) and kill failed ({k})"),
                        serde_json::json!({}),
                    );
                    return Done::Failed {
                        group,
                        why: format!("cannot stop the VM: {k}"),
                    };
                }
            }
        }
    } else {
        let ctx = sh.ctx(cfg, 0);
        let _ = drive(drv, move |d| d.kill(&ctx)).await;
    }
    let stopped_ns = mono_ns();
    if let Ok(s) = sh.session() {
        for &lun in &cfg.disks {
            if let Err(e) = claim::release_disk(&s, lun, &sh.me, sh.timeout()).await {
                tracing::warn!(group, lun, error = %e, "release failed (the next owner preempts)");
            }
        }
    }
    let text2 = text.to_string();
    let r = sh
        .update_group(&group, |r| {
            if r.owner != me || r.owner_incarnation != inc {
                return None;
            }
            let mut x = r.clone();
            x.owner = 0;
            x.owner_incarnation = 0;
            x.state = GroupState::Stopped;
            x.saved = saved;
            x.reason = text2.clone();
            x.restarts = 0;
            match why {
                OfflineReason::Move(to) => x.move_to = to,
                OfflineReason::GuestShutDown => x.admin = AdminState::Offline,
                OfflineReason::Failed => x.set_failed_on(me),
                OfflineReason::Maintenance => x.move_to = 0,
                // A move requested while we were stopping still stands.
                OfflineReason::NodeStop => {}
            }
            Some(x)
        })
        .await;
    sh.events.emit(
        "offline",
        &group,
        text,
        serde_json::json!({
            "saved": saved,
            "stop_ms": (stopped_ns - t0) as f64 / 1e6,
            "handover_ms": (mono_ns() - t0) as f64 / 1e6,
            "move_to": match why { OfflineReason::Move(t) => t, _ => 0 },
        }),
    );
    match r {
        Ok(_) => Done::Idle { group },
        Err(e) => Done::Failed {
            group,
            why: format!("VM stopped, but the record update failed: {e}"),
        },
    }
}
