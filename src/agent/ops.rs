//! The agent's operations: claims, starts, restarts, offline, orphan release,
//! monitoring and heartbeats. Each runs as its own task, does what the planner decided
//! (re-checking its precondition in the record's COMPARE AND WRITE), and reports one
//! [`Done`] back to the loop in `node.rs`.

use crate::agent::claim::{self, Identity, QUORUM_TYPE};
use crate::agent::config::{GroupConfig, OfflineAction, ValidNodeConfig};
use crate::agent::driver::{DriverError, VmContext, VmDriver, VmStatus};
use crate::agent::events::{mono_ns, Events};
use crate::agent::planner::OfflineReason;
use crate::agent::quorum::{
    self, AdminState, GroupRecord, GroupState, HeartbeatSlot, NodeState, QuorumLayout,
};
use crate::agent::quorum_disk::QuorumDisk;
use crate::agent::record_update::{self, Decision, Updated};
use crate::agent::{wall_ms, AgentError};
use crate::initiator::Session;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an operation reports back to the main loop.
pub(super) enum Done {
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
    /// A live-migration step of the source ended: the VM runs (or waits, handed over)
    /// here at `epoch`, and this is what the owner knows of the migration now.
    Live {
        group: String,
        epoch: u64,
        live: crate::agent::planner::LiveOut,
    },
    /// A resume could not reach the target: still paused as before.
    StillPaused {
        group: String,
        epoch: u64,
        since: Instant,
    },
}

impl Done {
    /// The group it reports on.
    pub(super) fn group(&self) -> &str {
        match self {
            Done::Running { group, .. }
            | Done::Idle { group }
            | Done::Monitored { group, .. }
            | Done::Fenced { group, .. }
            | Done::Failed { group, .. }
            | Done::Live { group, .. }
            | Done::StillPaused { group, .. } => group,
        }
    }
}

/// What the operations share.
pub(super) struct Shared {
    pub(super) cfg: ValidNodeConfig,
    pub(super) me: Identity,
    pub(super) id: u16,
    pub(super) cluster: String,
    pub(super) events: Events,
    pub(super) incarnation: AtomicU64,
    pub(super) session: Mutex<Option<Session>>,
    /// A quorum write was refused: we were preempted.
    pub(super) fenced: AtomicBool,
    /// mono_ns of the last completed heartbeat write.
    pub(super) last_heartbeat_ok: AtomicU64,
    pub(super) counter: AtomicU64,
    pub(super) state: Mutex<NodeState>,
    pub(super) layout: Mutex<Option<QuorumLayout>>,
    /// The portal of the current login: VMs use the same path.
    pub(super) portal: Mutex<Option<std::net::SocketAddr>>,
}

impl Shared {
    pub(super) fn timeout(&self) -> Duration {
        self.cfg.timings().io_timeout
    }
    pub(super) fn session(&self) -> Result<Session, AgentError> {
        match self.session.lock().ok().and_then(|s| s.clone()) {
            Some(s) if !s.is_closed() => Ok(s),
            _ => Err(AgentError::Other("not connected to the target".into())),
        }
    }
    /// Forget a session that failed at the connection level; the main loop logs in
    /// again (same ISID, so the same I_T nexus) and re-registers.
    pub(super) fn drop_session(&self, why: &AgentError) {
        if let Ok(mut s) = self.session.lock() {
            if s.take().is_some() {
                tracing::warn!(error = %why, "dropping the iSCSI session; will log in again");
            }
        }
    }
    pub(super) fn quorum(&self) -> Result<QuorumDisk, AgentError> {
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
    pub(super) fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }
    pub(super) fn ctx(&self, g: &GroupConfig, epoch: u64) -> VmContext {
        let st = &self.cfg.config.node.state_dir;
        let shared = self.cfg.config.node.shared_state_dir.as_ref().unwrap_or(st);
        let portal = self
            .portal
            .lock()
            .ok()
            .and_then(|p| *p)
            .unwrap_or(self.cfg.portals[0]);
        VmContext {
            group: g.name.clone(),
            node: self.cfg.config.node.name.clone(),
            node_id: self.id,
            epoch,
            initiator_name: self.cfg.vm_initiator_name.clone(),
            portal: portal.to_string(),
            other_portals: (self.cfg.portals.iter())
                .filter(|&&p| p != portal)
                .map(ToString::to_string)
                .collect(),
            target: self.cfg.config.target.name.clone(),
            disks: g.disks.clone(),
            state_file: shared.join(format!("{}.state", g.name)),
            state_dir: st.clone(),
        }
    }

    /// Read-modify-COMPARE AND WRITE of group `name`: `f` gets the current record and
    /// returns the new one, or `None` to give up (its precondition no longer holds).
    pub(super) async fn update_group(
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
}

/// Run a blocking driver call on the blocking pool.
pub(super) async fn drive<T: Send + 'static>(
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

pub(super) async fn write_heartbeat(sh: &Shared) -> Result<(), AgentError> {
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

pub(super) async fn heartbeat_loop(sh: Arc<Shared>) {
    let mut tick = tokio::time::interval(sh.cfg.timings().heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // This loop ran: the systemd watchdog is fed here, whatever the write's outcome
        // (a storage outage is the agent's to handle, not a reason to restart it).
        crate::service::notify::watchdog();
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

/// Fence the dead owner (quorum LUN, then the disks through the claim), claim the
/// record, claim every disk and read it back, and only then start the VM.
pub(super) async fn claim_and_start(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    seen: &GroupRecord,
    victim: Option<u16>,
    victim_incarnation: Option<u64>,
) -> Done {
    let claim_started = mono_ns();
    // 1. The record: exactly one node wins this COMPARE AND WRITE.
    let rec = match claim_record(sh, cfg, seen, victim).await {
        Ok(r) => r,
        Err(d) => return d,
    };
    let s = match sh.session() {
        Ok(s) => s,
        Err(e) => {
            return Done::Failed {
                group: cfg.name.clone(),
                why: e.to_string(),
            }
        }
    };
    // 2. Fence the dead owner on the quorum LUN: its heartbeat writes now fail, which
    //    makes it kill its VMs should it ever wake up.
    if let Some(v) = victim {
        if let Err(d) = fence_victim(sh, cfg, drv, &s, &rec, v, victim_incarnation).await {
            return d;
        }
    }
    // 3. The disks, in order: registered (agent + VM data path), every other key
    //    preempted with abort, reservation ours, read back.
    for &lun in &cfg.disks {
        if let Err(e) = claim::claim_disk(&s, lun, vm, sh.timeout()).await {
            let fenced = matches!(e, AgentError::Fenced(_));
            let why = format!("claiming LUN {lun}: {e}");
            return undo_claim(sh, cfg, drv, &rec, &why, fenced).await;
        }
    }
    // 4. Start (or restore) the VM.
    start_claimed(sh, cfg, drv, &rec, claim_started).await
}

/// Step 1 of a claim: the record, from exactly the owner and epoch we saw, to us.
/// `Err` is what the claim reports when it lost or failed.
async fn claim_record(
    sh: &Shared,
    cfg: &GroupConfig,
    seen: &GroupRecord,
    victim: Option<u16>,
) -> Result<GroupRecord, Done> {
    let group = cfg.name.clone();
    let (me, inc) = (sh.id, sh.incarnation());
    let reason = match victim {
        Some(v) => format!(
            "node {v} stopped heartbeating; taken over by {}",
            sh.cfg.config.node.name
        ),
        None if seen.move_to == me => format!("moved here ({})", seen.reason),
        None => format!("claimed by {}", sh.cfg.config.node.name),
    };
    let expect_owner = seen.owner;
    let expect_epoch = seen.epoch;
    // A takeover also needs the record untouched since we judged its owner dead: an
    // owner that resumed after a pause rewrote it, and its resume must win or lose to
    // this claim as a whole, never both proceed.
    let expect_touched = victim.map(|_| seen.changed_wall_ms);
    let claimed = sh
        .update_group(&group, |r| {
            let touched = expect_touched.is_some_and(|t| t != r.changed_wall_ms);
            if r.owner != expect_owner
                || r.epoch != expect_epoch
                || touched
                || r.admin == AdminState::Offline
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
            // A live migration of the old owner's run ends with this claim.
            n.migration = None;
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
                "the record changed before our COMPARE AND WRITE: another node won, or its owner resumed it",
                serde_json::json!({"seen_epoch": expect_epoch}),
            );
            return Err(Done::Idle { group });
        }
        Err(e) => {
            return Err(Done::Failed {
                group,
                why: e.to_string(),
            })
        }
    };
    sh.events.emit(
        "claimed",
        &group,
        &reason,
        serde_json::json!({"epoch": rec.epoch, "previous_owner": expect_owner}),
    );
    Ok(rec)
}

/// Step 2 of a claim: PREEMPT AND ABORT the dead owner's key on the quorum LUN, and
/// note it on its admin record.
async fn fence_victim(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    s: &Session,
    rec: &GroupRecord,
    victim: u16,
    victim_incarnation: Option<u64>,
) -> Result<(), Done> {
    let vkey = quorum::pr_key(&sh.cluster, victim);
    let lun = sh.cfg.config.target.quorum_lun;
    match claim::preempt_abort(s, lun, &sh.me, vkey, QUORUM_TYPE, sh.timeout()).await {
        Ok(_) => {}
        Err(e @ AgentError::Fenced(_)) => {
            return Err(Done::Fenced {
                group: cfg.name.clone(),
                why: e.to_string(),
            })
        }
        Err(e) => return Err(undo_claim(sh, cfg, drv, rec, &e.to_string(), false).await),
    }
    let _ = record_fence(sh, victim, victim_incarnation.unwrap_or(0)).await;
    sh.events.emit(
        "fenced",
        &cfg.name,
        &format!("node {victim} preempted and aborted on the quorum LUN"),
        serde_json::json!({"node_id": victim, "key": format!("{vkey:#x}")}),
    );
    Ok(())
}

/// Step 4 of a claim: start (or restore) the VM on the claimed disks, then record it
/// running. A record that changed meanwhile means someone else took it: kill ours.
async fn start_claimed(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    rec: &GroupRecord,
    claim_started: u64,
) -> Done {
    let group = cfg.name.clone();
    let (me, inc) = (sh.id, sh.incarnation());
    let claimed_ns = mono_ns();
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
            return undo_claim(sh, cfg, drv, rec, &format!("VM start failed: {e}"), false).await
        }
    };
    let epoch = rec.epoch;
    let r = sh
        .update_group(&group, |r| {
            let mut n = if_held(r, (me, inc, epoch))?;
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
                let reason = format!("claim by node {me} failed: {why}");
                unowned_if_held(r, (me, inc, epoch), reason)
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

/// A record that names us from an earlier life, or one whose VM died here while the
/// target was unreachable: make sure no VM of it runs here, then give it back
/// (Stopped) so placement decides afresh.
pub(super) async fn release_orphan(
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
    // Our current incarnation: the VM died while the record could not be written
    // (a pause that outlasted max_pause, a VM that could not be paused).
    let (reason, event_reason) = if old_inc == sh.incarnation() {
        (
            "the VM was killed while the target was unreachable; VM stopped",
            "record of this node whose VM is gone",
        )
    } else {
        (
            "the owner's agent restarted or self-fenced; VM stopped",
            "record from an earlier incarnation of this node",
        )
    };
    let r = sh
        .update_group(&cfg.name, |r| {
            // A move requested meanwhile (ctl move while we were cut off) still stands.
            unowned_if_held(r, (me, old_inc, epoch), reason.into())
        })
        .await;
    match r {
        Ok(Some(_)) => {
            sh.events.emit(
                "orphan-released",
                &cfg.name,
                event_reason,
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
pub(super) async fn monitor(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    epoch: u64,
) -> Done {
    let group = cfg.name.clone();
    // A target that cannot be asked is not a lost claim: the status check still runs.
    if let Err(Some(fenced)) = claim_still_ours(sh, vm, cfg).await {
        return fenced;
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
pub(super) async fn restart_in_place(
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
            let mut x = if_held(r, (me, inc, epoch))?;
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
pub(super) async fn take_offline(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    why: OfflineReason,
    text: &str,
) -> Done {
    let group = cfg.name.clone();
    let (me, inc) = (sh.id, sh.incarnation());
    let t0 = mono_ns();
    if why.vm_running() {
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
    let saved = match stop_vm(sh, cfg, drv, why).await {
        Ok(saved) => saved,
        Err(d) => return d,
    };
    let stopped_ns = mono_ns();
    if let Ok(s) = sh.session() {
        for &lun in &cfg.disks {
            if let Err(e) = claim::release_disk(&s, lun, &sh.me, sh.timeout()).await {
                tracing::warn!(group, lun, error = %e, "release failed (the next owner preempts)");
            }
        }
    }
    let r = hand_back(sh, &group, why, text, saved).await;
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

/// The offline action on a running VM (a VM that already stopped is only made sure
/// of with a kill). `Ok(saved)`; `Err` when the VM could not be stopped at all.
async fn stop_vm(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    why: OfflineReason,
) -> Result<bool, Done> {
    let ctx = sh.ctx(cfg, 0);
    if !why.vm_running() {
        let _ = drive(drv, move |d| d.kill(&ctx)).await;
        return Ok(false);
    }
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
    let e = match r {
        Ok(saved) => return Ok(saved),
        Err(e) => e,
    };
    // A stop or save that failed (or timed out) must not leave the VM running while
    // the disks are released: kill it, and say so.
    let group = cfg.name.clone();
    let ctx = sh.ctx(cfg, 0);
    let k = drive(drv, move |d| d.kill(&ctx)).await;
    tracing::warn!(group, error = %e, kill_ok = k.is_ok(), "offline action failed; VM killed");
    match k {
        Ok(()) => Ok(false),
        Err(k) => {
            sh.events.emit(
                "vm-kill-failed",
                &group,
                &format!("offline action failed ({e}) and kill failed ({k})"),
                serde_json::json!({}),
            );
            Err(Done::Failed {
                group,
                why: format!("cannot stop the VM: {k}"),
            })
        }
    }
}

/// Give the record back after an offline: stopped, and what the reason implies.
async fn hand_back(
    sh: &Shared,
    group: &str,
    why: OfflineReason,
    text: &str,
    saved: bool,
) -> Result<Option<GroupRecord>, AgentError> {
    let (me, inc) = (sh.id, sh.incarnation());
    sh.update_group(group, |r| {
        if r.owner != me || r.owner_incarnation != inc {
            return None;
        }
        let mut x = r.clone();
        x.owner = 0;
        x.owner_incarnation = 0;
        x.state = GroupState::Stopped;
        x.saved = saved;
        x.reason = text.to_string();
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
    .await
}

/// Resume a VM paused through a storage outage, if and only if our claim still stands:
/// the record is re-written by COMPARE AND WRITE first (a peer's claim of the same record
/// and this resume are ordered by the target: exactly one wins), then our key is checked
/// on every disk, and only then does the VM continue.
pub(super) async fn resume(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    epoch: u64,
    since: Instant,
) -> Done {
    let group = cfg.name.clone();
    let paused_ms = since.elapsed().as_millis() as u64;
    let still_paused = || Done::StillPaused {
        group: group.clone(),
        epoch,
        since,
    };
    let holder = (sh.id, sh.incarnation(), epoch);
    let reason = format!("resumed after a {paused_ms} ms pause (storage outage)");
    let kept = sh
        .update_group(&group, |r| {
            if_held(r, holder)
                .filter(|r| r.state == GroupState::Running)
                .map(|mut n| {
                    n.reason = reason.clone();
                    n
                })
        })
        .await;
    match kept {
        Ok(Some(_)) => {}
        Ok(None) => {
            let why = "paused VM: its claim was taken during the outage; never resumed";
            kill_local(sh, cfg, drv, why).await;
            return Done::Idle { group };
        }
        Err(e) => return lost_resume(sh, &e, still_paused()),
    }
    if let Err(done) = claim_still_ours(sh, vm, cfg).await {
        return done.unwrap_or_else(still_paused);
    }
    let ctx = sh.ctx(cfg, epoch);
    if let Err(e) = drive(drv, move |d| d.resume(&ctx)).await {
        kill_local(sh, cfg, drv, &format!("resume failed: {e}")).await;
        return Done::Monitored {
            group,
            status: VmStatus::Failed(format!("resume failed: {e}")),
        };
    }
    sh.events.emit(
        "resumed",
        &group,
        &reason,
        serde_json::json!({"epoch": epoch, "paused_ms": paused_ms}),
    );
    Done::Running { group, epoch }
}

/// A resume that lost the target again: log it and stay paused.
fn lost_resume(sh: &Shared, e: &AgentError, still_paused: Done) -> Done {
    if e.is_connection() {
        sh.drop_session(e);
    }
    tracing::warn!(error = %e, "cannot resume yet; the VM stays paused");
    still_paused
}

/// Our key on every disk of the group. `Err(Some(Fenced))` when one lost it;
/// `Err(None)` when the target could not be asked.
async fn claim_still_ours(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
) -> Result<(), Option<Done>> {
    let s = sh.session().map_err(|_| None)?;
    for &lun in &cfg.disks {
        match claim::key_present(&s, lun, vm.key, sh.timeout()).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Some(Done::Fenced {
                    group: cfg.name.clone(),
                    why: format!("our key is gone from LUN {lun}"),
                }))
            }
            Err(e) => {
                if e.is_connection() {
                    sh.drop_session(&e);
                }
                return Err(None);
            }
        }
    }
    Ok(())
}

/// Kill a VM that must not run here (its record names another owner, or the agent
/// stops and cannot hand it over), and say so.
pub(super) async fn kill_local(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Arc<Mutex<Box<dyn VmDriver>>>,
    why: &str,
) {
    let ctx = sh.ctx(cfg, 0);
    let r = drive(drv, move |d| d.kill(&ctx)).await;
    sh.events.emit(
        "vm-killed",
        &cfg.name,
        why,
        serde_json::json!({"ok": r.is_ok(), "error": r.err().map(|e| e.to_string())}),
    );
}

/// A claim on a group record: the owner's node id and incarnation, and the epoch.
pub(super) type Holder = (u16, u64, u64);

/// A copy of `r` to update if it is still the claim of `holder`; `None` (no update) if
/// someone has moved it on since.
pub(super) fn if_held(r: &GroupRecord, (node, incarnation, epoch): Holder) -> Option<GroupRecord> {
    (r.owner == node && r.owner_incarnation == incarnation && r.epoch == epoch).then(|| r.clone())
}

/// `r` stopped and owned by nobody, for `reason`, if it is still the claim of `holder`
/// (node, incarnation, epoch); `None` (no update) if someone has moved it on since.
fn unowned_if_held(r: &GroupRecord, holder: Holder, reason: String) -> Option<GroupRecord> {
    let mut n = if_held(r, holder)?;
    n.owner = 0;
    n.owner_incarnation = 0;
    n.state = GroupState::Stopped;
    n.reason = reason;
    Some(n)
}
