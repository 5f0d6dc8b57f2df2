//! The agent daemon's loop: the tokio shell around the planner. One heartbeat task
//! writes this node's slot; the loop reads the quorum LUN every poll interval, judges
//! peers, asks [`planner::plan`] what to do and spawns those [`ops`]; each op reports a
//! [`Done`] back, so a slow VM never delays the heartbeat. Decisions live in the
//! planner only.
//!
//! Safety does not rest on these timers: a VM starts only after its disks' reservation
//! is read back as ours, and a fenced node's writes are refused by the target.

use crate::agent::claim::{self, Identity};
use crate::agent::config::{GroupConfig, ValidNodeConfig};
use crate::agent::driver::{self, VmDriver};
use crate::agent::live_ops;
use crate::agent::membership::{Liveness, Membership};
use crate::agent::ops::{self, drive, Done, Shared};
use crate::agent::placement::RestartBudget;
use crate::agent::planner::{self, GroupView, LiveOut, Local, NodeView, Op, OutageAction, Policy};
use crate::agent::quorum::{self, NodeState, QuorumImage};
use crate::agent::quorum_disk::QuorumDisk;
use crate::agent::AgentError;
use crate::initiator::connect_portals;
use crate::log_limit::{FailureLog, Repeated, Verdict};
use crate::metrics::agent as metrics;
use crate::service::notify::{self, StatusLine};
use crate::service::status::{self, AgentFacts};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use crate::agent::events::{mono_ns, Events};

/// A configured group: its driver and what this node knows about it.
struct GroupRt {
    cfg: GroupConfig,
    driver: Arc<Mutex<Box<dyn VmDriver>>>,
    policy: Policy,
    local: Local,
    budget: RestartBudget,
    next_monitor: Instant,
    waiting_since: Option<Instant>,
    backoff_until: Option<Instant>,
    /// Why and since when (wall clock, for people) the VM is paused, while it is.
    pause_note: Option<PauseNote>,
    /// A claim from a dead owner is under way: when its heartbeat last moved (for the
    /// failover duration metric).
    failover_from: Option<Instant>,
    /// A live migration of the group away from here.
    live: LiveOut,
}

impl GroupRt {
    fn view(&self) -> GroupView<'_> {
        GroupView {
            name: &self.cfg.name,
            policy: &self.policy,
            local: self.local,
            next_monitor: self.next_monitor,
            waiting_since: self.waiting_since,
            backoff_until: self.backoff_until,
            live: self.live.clone(),
        }
    }
}

pub struct Agent {
    sh: Arc<Shared>,
    groups: BTreeMap<String, GroupRt>,
    membership: Membership,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    last_image: Option<QuorumImage>,
    self_fencing: bool,
    /// What STATE_DIR/paused.json says now (rewritten only on change).
    pause_file: String,
    /// Failed logins, logged on change and then at a bounded rate.
    reach_log: FailureLog,
    /// Failed quorum reads, likewise.
    read_log: FailureLog,
    /// systemd's STATUS= line; READY=1 went with it once the first heartbeat landed.
    service_status: StatusLine,
    ready_sent: bool,
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
    if let Some(m) = metrics::get() {
        let sh = agent.sh.clone();
        m.watch_heartbeat(Box::new(move || {
            let ok = sh.last_heartbeat_ok.load(Ordering::SeqCst);
            (ok != 0).then(|| Duration::from_nanos(mono_ns().saturating_sub(ok)))
        }));
    }
    let hb = tokio::spawn(ops::heartbeat_loop(agent.sh.clone()));
    let sh = agent.sh.clone();
    let ring = agent.sh.events.start_ring(move || sh.quorum().ok());
    let poll = agent.sh.cfg.timings().poll_interval;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                agent.tick().await;
                agent.write_pause_file();
                agent.report_service();
            }
            Some(d) = agent.done_rx.recv() => {
                agent.on_done(d).await;
                agent.write_pause_file();
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    agent.shutdown().await;
    agent.sh.events.flush_ring(Duration::from_secs(2)).await;
    if let Some(r) = ring {
        r.abort();
    }
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
        let events = Events::for_node(&cfg);
        let mut groups = BTreeMap::new();
        for g in &cfg.config.groups {
            let d = driver::build(&g.vm, n.state_dir.join(format!("{}.log", g.name)));
            groups.insert(
                g.name.clone(),
                GroupRt {
                    cfg: g.clone(),
                    driver: Arc::new(Mutex::new(d)),
                    policy: Policy::of(g),
                    local: Local::Idle,
                    budget: RestartBudget::new(g.restart_threshold, g.restart_period),
                    next_monitor: Instant::now(),
                    waiting_since: None,
                    backoff_until: None,
                    pause_note: None,
                    failover_from: None,
                    live: LiveOut::None,
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
            pause_file: String::new(),
            reach_log: FailureLog::default(),
            read_log: FailureLog::default(),
            service_status: StatusLine::new(),
            ready_sent: false,
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
        let opts = self.sh.cfg.connect_options(self.sh.me.isid, t);
        let (s, addr) = connect_portals(&tcfg.name, &self.sh.cfg.portals, &opts)
            .await
            .map_err(AgentError::from_connect)?;
        let (q, _header) =
            QuorumDisk::open(s.clone(), tcfg.quorum_lun, &self.sh.cluster, t).await?;
        if let Ok(mut l) = self.sh.layout.lock() {
            *l = Some(q.layout);
        }
        self.check_not_fenced(&s).await?;
        claim::join_quorum(&s, tcfg.quorum_lun, &self.sh.me, t).await?;
        if let Ok(mut cur) = self.sh.session.lock() {
            *cur = Some(s.clone());
        }
        if let Ok(mut p) = self.sh.portal.lock() {
            *p = Some(addr);
        }
        // "Re-register after every re-login": a new nexus starts unregistered.
        let vm = self.vm_identity();
        for g in self.groups.values() {
            if matches!(g.local, Local::Running { .. } | Local::Paused { .. }) {
                for &lun in &g.cfg.disks {
                    claim::ensure_registered(&s, lun, &vm, t).await?;
                }
            }
        }
        for g in self.groups.keys() {
            q.ensure_group(g).await?;
        }
        tracing::info!(portal = %addr, "logged in; quorum LUN joined");
        Ok(())
    }

    /// With VMs here (running or paused), our key must still be on the quorum LUN and on
    /// their disks when we log in again: if a peer removed it, we were fenced while
    /// away, and re-registering would hide that. Then the next tick kills them.
    async fn check_not_fenced(&self, s: &crate::initiator::Session) -> Result<(), AgentError> {
        if !self.have_vms() {
            return Ok(());
        }
        let t = self.sh.timeout();
        let quorum = self.sh.cfg.config.target.quorum_lun;
        let luns = self
            .groups
            .values()
            .filter(|g| matches!(g.local, Local::Running { .. } | Local::Paused { .. }))
            .flat_map(|g| g.cfg.disks.iter().copied());
        for lun in std::iter::once(quorum).chain(luns) {
            if !claim::key_present(s, lun, self.sh.me.key, t).await? {
                self.sh.fenced.store(true, Ordering::SeqCst);
                return Err(AgentError::Fenced(format!(
                    "our key is gone from LUN {lun}: this node was fenced while away"
                )));
            }
        }
        Ok(())
    }

    /// This node as the planner sees it.
    fn node_view(&self) -> NodeView<'_> {
        NodeView {
            id: self.sh.id,
            name: &self.sh.cfg.config.node.name,
            incarnation: self.sh.incarnation(),
            self_fencing: self.self_fencing,
            dead_after: self.sh.cfg.timings().dead_after,
            local_minute: local_minute(),
        }
    }

    fn have_vms(&self) -> bool {
        self.groups.values().any(|g| g.local != Local::Idle)
    }

    fn running_vms(&self) -> bool {
        self.groups
            .values()
            .any(|g| matches!(g.local, Local::Running { .. }))
    }

    /// Whether this node must fence itself or pause its VMs now, and why.
    fn outage_check(&self) -> Option<OutageAction> {
        let last_ok = self.sh.last_heartbeat_ok.load(Ordering::SeqCst);
        let age = (last_ok != 0).then(|| Duration::from_nanos(mono_ns().saturating_sub(last_ok)));
        let t = self.sh.cfg.timings();
        planner::outage_action(
            self.sh.fenced.load(Ordering::SeqCst),
            self.running_vms(),
            age,
            t.self_fence_after,
            t.max_pause,
        )
    }

    /// A heartbeat write completed after `t`.
    fn beat_since(&self, t: Instant) -> bool {
        let last_ok = self.sh.last_heartbeat_ok.load(Ordering::SeqCst);
        last_ok != 0 && Duration::from_nanos(mono_ns().saturating_sub(last_ok)) < t.elapsed()
    }

    /// Log in again if the session is gone. `false`: not connected this tick.
    async fn ensure_connected(&mut self) -> bool {
        if self.sh.session().is_ok() {
            return true;
        }
        if let Err(e) = self.connect().await {
            // The event too is news only when the failure starts, changes or is
            // repeated for long (a refused login fails every poll).
            let news = match self.reach_log.failure(&e.to_string(), Instant::now()) {
                Verdict::Log { repeated } => {
                    tracing::warn!(error = %e, "cannot reach the target{}", Repeated(repeated));
                    true
                }
                _ => {
                    tracing::debug!(error = %e, "cannot reach the target");
                    false
                }
            };
            if news && !e.is_connection() {
                self.sh
                    .events
                    .emit("connect-failed", "", &e.to_string(), serde_json::json!({}));
            }
            return false;
        }
        log_recovery(&mut self.reach_log, "target reachable again");
        // With VMs running, prove we are alive at once: the heartbeat task's next
        // beat may come after the next outage check, which would pause VMs that just
        // rode out a short target restart. After an outage, do it without VMs too: a
        // VM that this tick's plan starts would otherwise be judged by the age of the
        // last beat before the outage and paused at once. (Not on the first login:
        // joining peers get a beat to show up before anyone places groups.)
        let beat_before = self.sh.last_heartbeat_ok.load(Ordering::SeqCst) != 0;
        if self.have_vms() || beat_before {
            match ops::write_heartbeat(&self.sh).await {
                Ok(()) => self.sh.last_heartbeat_ok.store(mono_ns(), Ordering::SeqCst),
                // Preempted on the quorum LUN while we were away: fenced.
                Err(AgentError::Conflict(_)) => self.sh.fenced.store(true, Ordering::SeqCst),
                Err(_) => {}
            }
        }
        true
    }

    async fn read_image(&mut self) -> Option<QuorumImage> {
        let q = self.sh.quorum().ok()?;
        match q.read_image().await {
            Ok(img) => {
                log_recovery(&mut self.read_log, "quorum LUN readable again");
                for c in &img.corrupt {
                    tracing::warn!(error = %c, "corrupt quorum record");
                }
                Some(img)
            }
            Err(e) => {
                if e.is_connection() {
                    self.sh.drop_session(&e);
                }
                match self.read_log.failure(&e.to_string(), Instant::now()) {
                    Verdict::Log { repeated } => {
                        tracing::warn!(error = %e, "cannot read the quorum LUN{}", Repeated(repeated))
                    }
                    _ => tracing::debug!(error = %e, "cannot read the quorum LUN"),
                }
                None
            }
        }
    }

    /// One poll: self-fence if we must, read the image, plan, run the ops.
    async fn tick(&mut self) {
        match self.outage_check() {
            Some(OutageAction::Fence(why)) => {
                self.self_fence(&why).await;
                return;
            }
            Some(OutageAction::Pause(why)) => self.pause_running(&why).await,
            None => {}
        }
        self.expire_pauses().await;
        if !self.ensure_connected().await {
            return;
        }
        let Some(img) = self.read_image().await else {
            return;
        };
        // Judge liveness at the moment the read completed, not when the tick began.
        let now = Instant::now();
        self.membership.observe(now, img.slots.iter().flatten());
        self.report_metrics(&img, now);
        let ops = {
            let views: Vec<GroupView> = self.groups.values().map(GroupRt::view).collect();
            planner::plan(&self.node_view(), &views, &img, &self.membership, now)
        };
        for op in ops {
            self.run_op(op, Some(&img), now).await;
        }
        self.last_image = Some(img);
    }

    /// Mark `group` busy and run `op` as its own task; its `Done` comes back to the loop.
    fn spawn_op<F, Fut>(&mut self, group: &str, op: F)
    where
        F: FnOnce(Arc<Shared>, GroupConfig, Arc<Mutex<Box<dyn VmDriver>>>) -> Fut,
        Fut: Future<Output = Done> + Send + 'static,
    {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        g.local = Local::Busy;
        let fut = op(self.sh.clone(), g.cfg.clone(), g.driver.clone());
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(fut.await);
        });
    }

    /// Carry out one planned op. `img` is the image it was planned from (ops that act
    /// on a record need it).
    async fn run_op(&mut self, op: Op, img: Option<&QuorumImage>, now: Instant) {
        let record = |g: &str| img.and_then(|i| i.group(g)).map(|(_, r, _)| r.clone());
        let vm = self.vm_identity();
        match op {
            Op::EnsureGroupRecord { group } => {
                let r = match self.sh.quorum() {
                    Ok(q) => q.ensure_group(&group).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::warn!(group, error = %e, "decision failed");
                    if e.is_connection() {
                        self.sh.drop_session(&e);
                    }
                }
            }
            Op::ReleaseOrphan { group } => {
                let Some(rec) = record(&group) else { return };
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::release_orphan(&sh, &cfg, &drv, &rec).await
                });
            }
            Op::KillLocal { group, why } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    ops::kill_local(&self.sh, &g.cfg, &g.driver, &why).await;
                    g.local = Local::Idle;
                }
            }
            Op::Claim {
                group,
                victim,
                victim_incarnation,
            } => {
                let Some(rec) = record(&group) else { return };
                let silent = victim.and_then(|v| self.membership.silent_for(v, now));
                if let Some(g) = self.groups.get_mut(&group) {
                    g.failover_from = silent.map(|s| now - s);
                }
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::claim_and_start(&sh, &vm, &cfg, &drv, &rec, victim, victim_incarnation)
                        .await
                });
            }
            Op::TakeOffline {
                group,
                reason,
                text,
            } => {
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::take_offline(&sh, &cfg, &drv, reason, &text).await
                });
            }
            Op::Monitor { group, epoch } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.next_monitor = now + g.cfg.monitor_interval;
                }
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::monitor(&sh, &vm, &cfg, &drv, epoch).await
                });
            }
            Op::RestartInPlace {
                group,
                attempt,
                why,
            } => {
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::restart_in_place(&sh, &vm, &cfg, &drv, attempt, &why).await
                });
            }
            Op::SetWaiting { group, since } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.waiting_since = since;
                }
            }
            Op::Resume {
                group,
                epoch,
                since,
            } => {
                // Peers must see us alive before the resume rewrites the record, or a
                // peer still judging us dead would claim right after it.
                if !self.beat_since(since) {
                    return;
                }
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    ops::resume(&sh, &vm, &cfg, &drv, epoch, since).await
                });
            }
            Op::PauseExpired { group, paused_for } => self.end_pause(&group, paused_for).await,
            op => self.run_live_op(op, img),
        }
    }

    /// Carry out a live-migration op (planner_live.rs decided it).
    fn run_live_op(&mut self, op: Op, img: Option<&QuorumImage>) {
        let vm = self.vm_identity();
        let epoch_of = |g: &str| img.and_then(|i| i.group(g)).map(|(_, r, _)| r.epoch);
        match op {
            Op::SetLive { group, live } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.live = live;
                }
            }
            Op::MigrateIn {
                group,
                source,
                epoch,
            } => self.spawn_op(&group, move |sh, cfg, drv| async move {
                let incoming = live_ops::Incoming {
                    sh: &sh,
                    vm: &vm,
                    cfg: &cfg,
                    drv: &drv,
                    source,
                    epoch,
                };
                incoming.run().await
            }),
            Op::MigrateOut { group, to, addr } => {
                let Some(epoch) = epoch_of(&group) else {
                    return;
                };
                self.spawn_op(&group, move |sh, cfg, drv| async move {
                    live_ops::migrate_out(&sh, &cfg, &drv, epoch, to, addr).await
                });
            }
            Op::EndMigrationHere {
                group,
                epoch,
                handed_over,
                why,
            } => self.spawn_op(&group, move |sh, cfg, drv| async move {
                live_ops::end_here(&sh, &vm, &cfg, &drv, epoch, handed_over, why).await
            }),
            Op::FinishMigrationOut { group, to } => self
                .spawn_op(&group, move |sh, cfg, drv| async move {
                    live_ops::finish_out(&sh, &cfg, &drv, to).await
                }),
            other => tracing::error!(?other, "not a live-migration op"),
        }
    }

    async fn on_done(&mut self, d: Done) {
        let now = Instant::now();
        if let Some(g) = self.groups.get_mut(d.group()) {
            // Whatever else ends here ends a live migration away too.
            if !matches!(d, Done::Monitored { .. } | Done::StillPaused { .. }) {
                g.live = LiveOut::None;
            }
        }
        match d {
            Done::Live { group, epoch, live } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Running { epoch };
                    g.live = live;
                    g.next_monitor = now + g.cfg.monitor_interval;
                }
            }
            Done::Running { group, epoch } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    if let (Some(t), Some(m)) = (g.failover_from.take(), metrics::get()) {
                        m.failover(now.saturating_duration_since(t));
                    }
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
            Done::StillPaused {
                group,
                epoch,
                since,
            } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.local = Local::Paused { epoch, since };
                }
            }
            Done::Monitored { group, status } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                let Local::Busy = g.local else { return };
                match planner::after_status(&group, status, &mut g.budget, now) {
                    None => {
                        // The epoch is unchanged by a monitor.
                        let epoch = self
                            .last_image
                            .as_ref()
                            .and_then(|i| i.group(&group).map(|(_, r, _)| r.epoch))
                            .unwrap_or(0);
                        g.local = Local::Running { epoch };
                    }
                    Some(op) => self.run_op(op, None, now).await,
                }
            }
        }
    }

    /// Peers, group records and local states for the metrics (if on).
    fn report_metrics(&mut self, img: &QuorumImage, now: Instant) {
        let Some(m) = metrics::get() else { return };
        let peers = self.tally_members(img, now, Some(self.sh.id));
        m.peers(peers.alive, peers.dead);
        for (_, r) in &img.groups {
            m.group_record(&r.name, r.state.name(), r.owner);
        }
        for (name, g) in &mut self.groups {
            if !matches!(g.local, Local::Busy) {
                // A claim that did not end running is no failover.
                g.failover_from = None;
            }
            let state = match g.local {
                Local::Idle => "idle",
                Local::Busy => "busy",
                Local::Running { .. } => "running",
                Local::Paused { .. } => "paused",
            };
            m.group_local(name, state);
        }
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
        let mut kills = Vec::new();
        for (n, g) in &self.groups {
            if g.local != Local::Idle {
                let what = match g.local {
                    Local::Paused { .. } => "paused VM killed: this node was fenced",
                    _ => "VM killed: this node fenced itself",
                };
                self.sh
                    .events
                    .emit("vm-killed", n, what, serde_json::json!({"why": why}));
            }
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

    /// Freeze every running VM (quorum I/O has failed for `self_fence_after`): a paused
    /// VM neither writes nor talks, and resumes only if its claim survives the outage.
    /// A VM that cannot be paused is killed; its record, still ours, is released as an
    /// orphan once the target answers.
    async fn pause_running(&mut self, why: &str) {
        let now = Instant::now();
        let mut pauses = Vec::new();
        for (n, g) in &self.groups {
            let Local::Running { epoch } = g.local else {
                continue;
            };
            let ctx = self.sh.ctx(&g.cfg, epoch);
            let d = g.driver.clone();
            let n = n.clone();
            pauses.push(async move { (n, epoch, drive(&d, move |d| d.pause(&ctx)).await) });
        }
        for (n, epoch, r) in futures_join(pauses).await {
            let Some(g) = self.groups.get_mut(&n) else {
                continue;
            };
            match r {
                Ok(()) => {
                    g.local = Local::Paused { epoch, since: now };
                    g.pause_note = Some(PauseNote::new(why));
                    self.sh.events.emit(
                        "paused",
                        &n,
                        why,
                        serde_json::json!({"epoch": epoch, "max_pause_ms":
                            self.sh.cfg.timings().max_pause.as_millis() as u64}),
                    );
                }
                Err(e) => {
                    let text = format!("cannot pause the VM ({e}); killed instead: {why}");
                    ops::kill_local(&self.sh, &g.cfg, &g.driver, &text).await;
                    g.local = Local::Idle;
                }
            }
        }
        // At once, not after this tick's login attempt (io_timeout when cut off):
        // `ctl status` on this node reads it while the VMs are paused.
        self.write_pause_file();
    }

    /// Kill the VMs paused for longer than `max_pause`.
    async fn expire_pauses(&mut self) {
        let ops = {
            let views: Vec<GroupView> = self.groups.values().map(GroupRt::view).collect();
            planner::expired_pauses(&views, self.sh.cfg.timings().max_pause, Instant::now())
        };
        for op in ops {
            self.run_op(op, None, Instant::now()).await;
        }
    }

    /// A pause that lasted too long: the VM dies here; the record (still ours) is
    /// released as an orphan when the target answers, and placement decides again.
    async fn end_pause(&mut self, group: &str, paused_for: Duration) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let why = format!(
            "paused for {} s, longer than max_pause: killed",
            paused_for.as_secs()
        );
        self.sh.events.emit(
            "pause-expired",
            group,
            &why,
            serde_json::json!({"paused_ms": paused_for.as_millis() as u64}),
        );
        ops::kill_local(&self.sh, &g.cfg, &g.driver, &why).await;
        g.local = Local::Idle;
    }

    /// STATE_DIR/paused.json: the groups paused here, since when and why, for
    /// `ctl status` on this node (the quorum LUN cannot be written during an outage).
    fn write_pause_file(&mut self) {
        let mut paused = Vec::new();
        for (n, g) in self.groups.iter_mut() {
            if matches!(g.local, Local::Running { .. } | Local::Idle) {
                g.pause_note = None;
            }
            if let Some(note) = &g.pause_note {
                paused.push(
                    serde_json::json!({"group": n, "since_wall_ms": note.since_wall_ms,
                    "why": note.why}),
                );
            }
        }
        let text = serde_json::json!({ "paused": paused }).to_string();
        if text == self.pause_file {
            return;
        }
        let path = self.sh.cfg.config.node.state_dir.join(PAUSE_FILE);
        match crate::atomic_file::write_file_atomically(&path, text.as_bytes()) {
            Ok(()) => self.pause_file = text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pause file")
            }
        }
    }

    /// systemd: READY=1 once a heartbeat write has landed (the quorum LUN is joined),
    /// then a STATUS= line whenever it changes.
    fn report_service(&mut self) {
        let line = status::agent_line(&self.service_facts());
        if !self.ready_sent && self.sh.last_heartbeat_ok.load(Ordering::SeqCst) != 0 {
            self.ready_sent = true;
            self.service_status.ready(&line);
        } else {
            self.service_status.set(&line);
        }
    }

    /// The nodes with a slot in `img` (but `except`) that our membership judges alive
    /// and dead; nodes not yet judged or gone for good count in neither.
    fn tally_members(&self, img: &QuorumImage, now: Instant, except: Option<u16>) -> Tally {
        let mut t = Tally::default();
        for slot in img.slots.iter().flatten() {
            if Some(slot.node_id) == except {
                continue;
            }
            match self.membership.liveness(slot.node_id, now) {
                Liveness::Alive => t.alive += 1,
                Liveness::Dead => t.dead += 1,
                Liveness::Unknown | Liveness::Left => {}
            }
        }
        t
    }

    fn service_facts(&self) -> AgentFacts {
        let now = Instant::now();
        let mut f = AgentFacts {
            connected: self.sh.session().is_ok(),
            ..AgentFacts::default()
        };
        let Some(img) = &self.last_image else {
            return f;
        };
        let all = self.tally_members(img, now, None);
        (f.alive, f.members) = (all.alive, all.alive + all.dead);
        let me = (self.sh.id, self.sh.incarnation());
        for (_, r) in &img.groups {
            if (r.owner, r.owner_incarnation) == me && self.groups.contains_key(&r.name) {
                f.owned.push(r.name.clone());
            }
        }
        for (n, g) in &self.groups {
            if matches!(g.local, Local::Paused { .. }) {
                f.paused.push(n.clone());
            }
        }
        f
    }

    /// Wait (bounded) for the operations in flight before a SIGTERM hand-over.
    async fn settle_ops(&mut self) {
        let deadline = Instant::now() + HANDOVER_SETTLE;
        while self.groups.values().any(|g| g.local == Local::Busy) && Instant::now() < deadline {
            let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(200), self.done_rx.recv()).await
            else {
                continue;
            };
            let (group, local) = match d {
                Done::Running { group, epoch } | Done::Live { group, epoch, .. } => {
                    (group, Local::Running { epoch })
                }
                Done::Monitored { group, .. } => (group, Local::Running { epoch: 0 }),
                Done::Idle { group } | Done::Failed { group, .. } | Done::Fenced { group, .. } => {
                    (group, Local::Idle)
                }
                Done::StillPaused {
                    group,
                    epoch,
                    since,
                } => (group, Local::Paused { epoch, since }),
            };
            if let Some(g) = self.groups.get_mut(&group) {
                g.local = local;
            }
        }
    }

    /// SIGTERM: take every group offline so that peers take over, then say "left".
    async fn shutdown(&mut self) {
        notify::stopping("stopping: handing the groups over");
        self.sh
            .events
            .emit("agent-stop", "", "SIGTERM", serde_json::json!({}));
        self.settle_ops().await;
        let img = match self.sh.quorum() {
            Ok(q) => q.read_image().await.ok(),
            Err(_) => None,
        };
        let now = Instant::now();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for n in names {
            let g = &self.groups[&n];
            if let Local::Paused { .. } = g.local {
                // Paused means the target did not answer: nothing can be handed over, and
                // a VM must not outlive its agent unwatched.
                let why = "agent stopping while the VM was paused by a storage outage";
                ops::kill_local(&self.sh, &g.cfg, &g.driver, why).await;
                continue;
            }
            if !matches!(g.local, Local::Running { .. }) {
                continue;
            }
            let rec = img.as_ref().and_then(|i| i.group(&n)).map(|(_, r, _)| r);
            let (why, text) = planner::handover(
                &self.node_view(),
                &g.policy,
                rec,
                img.as_ref(),
                &self.membership,
                now,
            );
            let d = ops::take_offline(&self.sh, &g.cfg, &g.driver, why, &text).await;
            if let Done::Failed { why, .. } = d {
                tracing::error!(group = n, why, "could not hand the group over; killing it");
                ops::kill_local(&self.sh, &g.cfg, &g.driver, "agent stopping").await;
                if let Some(g) = self.groups.get_mut(&n) {
                    g.local = Local::Idle;
                }
            }
        }
        if let Ok(mut s) = self.sh.state.lock() {
            *s = NodeState::Left;
        }
        let _ = ops::write_heartbeat(&self.sh).await;
    }
}

/// Log the end of a run of failures, if `log` had one.
fn log_recovery(log: &mut FailureLog, what: &str) {
    if let Verdict::Recovered { failures, lasted } = log.success(Instant::now()) {
        tracing::info!(failures, after_ms = lasted.as_millis() as u64, "{what}");
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

/// How long a SIGTERM hand-over waits for the operations in flight (a claim, a start)
/// before taking the groups offline; part of the systemd unit's TimeoutStopSec.
pub const HANDOVER_SETTLE: Duration = Duration::from_secs(120);

/// The file in STATE_DIR that lists the groups paused on this node.
pub const PAUSE_FILE: &str = "paused.json";

/// Nodes counted by liveness ([`Agent::tally_members`]).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    alive: usize,
    dead: usize,
}

/// Why a VM is paused, and since when on the wall clock (for people reading status).
#[derive(Debug, Clone)]
struct PauseNote {
    why: String,
    since_wall_ms: u64,
}

impl PauseNote {
    fn new(why: &str) -> PauseNote {
        PauseNote {
            why: why.to_string(),
            since_wall_ms: crate::agent::wall_ms(),
        }
    }
}

fn fresh_incarnation() -> u64 {
    rand::random::<u64>() | 1
}

/// Minutes since local midnight (failback windows are in the node's local time: TZ, or
/// /etc/localtime, as libc's localtime reads them).
fn local_minute() -> u16 {
    let now = jiff::Zoned::now();
    (i16::from(now.hour()) * 60 + i16::from(now.minute())) as u16
}

#[cfg(test)]
mod tests {
    /// The local time of day as `date` (libc's localtime) gives it, under a fixed zone.
    #[test]
    fn local_minute_is_the_local_time_of_day() {
        let date = |tz: &str| {
            let out = std::process::Command::new("date")
                .arg("+%H %M")
                .env("TZ", tz)
                .output()
                .expect("date");
            let text = String::from_utf8(out.stdout).unwrap();
            let (h, m) = text.trim().split_once(' ').unwrap();
            h.parse::<u16>().unwrap() * 60 + m.parse::<u16>().unwrap()
        };
        // A zone 5 h 30 min from UTC tells a local reading from a UTC one.
        let tz = "Asia/Kolkata";
        std::env::set_var("TZ", tz);
        let before = date(tz);
        let ours = super::local_minute();
        let after = date(tz);
        std::env::remove_var("TZ");
        assert!(
            ours == before || ours == after,
            "{ours} not in {before}..={after}"
        );
    }
}
