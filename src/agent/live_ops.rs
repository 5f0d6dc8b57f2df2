//! The live-migration operations (docs/AGENT.md, "Live migration"): the destination's
//! whole part (register without preempting, incoming VM, switchover), the source's
//! migration, and the ends of a migration on the source. Like the other ops, each
//! re-checks its precondition inside its COMPARE AND WRITE and reports one [`Done`].

use crate::agent::claim::{self, Identity};
use crate::agent::config::GroupConfig;
use crate::agent::driver::{DriverError, VmDriver};
use crate::agent::events::mono_ns;
use crate::agent::ops::{drive, if_held, Done, Shared};
use crate::agent::planner::LiveOut;
use crate::agent::quorum::{GroupRecord, GroupState, Migration};
use crate::agent::AgentError;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Driver = Arc<Mutex<Box<dyn VmDriver>>>;

/// Where incoming migrations listen when node.toml names no `migration_address`.
pub const DEFAULT_MIGRATION_ADDRESS: &str = "127.0.0.1";

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The record still asks for the migration to us from `source` at `epoch`.
fn asked_of_us(r: &GroupRecord, me: u16, source: u16, epoch: u64) -> bool {
    r.owner == source
        && r.epoch == epoch
        && r.state == GroupState::Running
        && r.migration.as_ref().is_some_and(|m| m.to == me)
}

/// One live migration this node receives: the group, its driver and our VM identity,
/// and the record it was asked from (running on `source` at `epoch`).
pub(super) struct Incoming<'a> {
    pub sh: &'a Shared,
    pub vm: &'a Identity,
    pub cfg: &'a GroupConfig,
    pub drv: &'a Driver,
    pub source: u16,
    pub epoch: u64,
}

/// How often the destination, while its VM receives, checks that the source lives.
const SOURCE_CHECK: Duration = Duration::from_secs(1);

impl Incoming<'_> {
    /// Register, start incoming, publish, wait, switch over, run.
    pub(super) async fn run(&self) -> Done {
        let (sh, cfg) = (self.sh, self.cfg);
        let started = mono_ns();
        let s = match sh.session() {
            Ok(s) => s,
            Err(e) => return self.abort(e.to_string()).await,
        };
        // Both nodes' nexuses registered: type 5 lets either write until the switchover.
        for &lun in &cfg.disks {
            if let Err(e) = claim::ensure_registered(&s, lun, self.vm, sh.timeout()).await {
                return self.abort(format!("registering on LUN {lun}: {e}")).await;
            }
        }
        let addr = match self.listen().await {
            Ok(a) => a,
            Err(why) => return self.abort(why).await,
        };
        if let Err(why) = self.wait_state().await {
            return self
                .abort(format!("incoming migration from {addr}: {why}"))
                .await;
        }
        let arrived = mono_ns();
        // Switchover: the source's keys go (PREEMPT AND ABORT), read back, then the record.
        for &lun in &cfg.disks {
            if let Err(e) = claim::claim_disk(&s, lun, self.vm, sh.timeout()).await {
                return self.abort(format!("switchover on LUN {lun}: {e}")).await;
            }
        }
        self.switch_over(started, arrived).await
    }

    /// Wait for the incoming state, up to `migration_timeout`; give up early when the
    /// source's heartbeat has not moved for `dead_after` (a dead source sends nothing
    /// more, and its group is to fail over normally).
    async fn wait_state(&self) -> Result<(), String> {
        let (sh, source) = (self.sh, self.source);
        let t = sh.cfg.timings();
        let end = Instant::now() + t.migration_timeout;
        let mut last_beat: Option<(u64, Instant)> = None;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("not complete within {:?}", t.migration_timeout));
            }
            let ctx = sh.ctx(self.cfg, self.epoch + 1);
            let step = left.min(SOURCE_CHECK);
            match drive(self.drv, move |d| d.wait_incoming(&ctx, step)).await {
                Ok(()) => return Ok(()),
                Err(DriverError::Timeout { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            let beat = match sh.quorum() {
                Ok(q) => q
                    .read_image()
                    .await
                    .ok()
                    .and_then(|i| i.slot(source).cloned()),
                Err(_) => None,
            };
            let now = Instant::now();
            match (beat.map(|s| s.counter), last_beat) {
                (Some(c), Some((seen, _))) if c != seen => last_beat = Some((c, now)),
                (Some(c), None) => last_beat = Some((c, now)),
                (_, Some((_, since))) if now - since >= t.dead_after => {
                    return Err(format!("node {source}'s heartbeat stopped"));
                }
                _ => {}
            }
        }
    }

    /// Start the incoming VM and publish its address in the record.
    async fn listen(&self) -> Result<String, String> {
        let (sh, cfg, source, epoch) = (self.sh, self.cfg, self.source, self.epoch);
        let ctx = sh.ctx(cfg, epoch + 1);
        let host = sh
            .cfg
            .config
            .node
            .migration_address
            .clone()
            .unwrap_or_else(|| DEFAULT_MIGRATION_ADDRESS.into());
        let addr = drive(self.drv, move |d| d.start_incoming(&ctx, &host))
            .await
            .map_err(|e| e.to_string())?;
        let me = sh.id;
        let published = sh
            .update_group(&cfg.name, |r| {
                if !asked_of_us(r, me, source, epoch) || !r.migration.as_ref()?.addr.is_empty() {
                    return None;
                }
                let mut n = r.clone();
                n.migration = Some(Migration {
                    to: me,
                    addr: addr.clone(),
                });
                Some(n)
            })
            .await;
        match published {
            Ok(Some(_)) => {}
            Ok(None) => return Err("the migration request was withdrawn".into()),
            Err(e) => return Err(format!("publishing {addr}: {e}")),
        }
        sh.events.emit(
            "migration-listening",
            &cfg.name,
            &format!("incoming live migration from node {source} on {addr}"),
            json!({"epoch": epoch, "target_node": source, "addr": addr}),
        );
        Ok(addr)
    }

    /// The disks are ours: record us as owner, then let the guest run.
    async fn switch_over(&self, started: u64, arrived: u64) -> Done {
        let (sh, cfg, drv, source, epoch) = (self.sh, self.cfg, self.drv, self.source, self.epoch);
        let (me, inc, group) = (sh.id, sh.incarnation(), cfg.name.clone());
        let reason = format!("live-migrated from node {source}");
        let r = sh
            .update_group(&group, |r| {
                if !asked_of_us(r, me, source, epoch) {
                    return None;
                }
                let mut n = r.clone();
                n.owner = me;
                n.owner_incarnation = inc;
                n.epoch = epoch + 1;
                n.migration = None;
                n.move_to = 0;
                n.restarts = 0;
                n.saved = false;
                n.reason = reason.clone();
                Some(n)
            })
            .await;
        let ctx = sh.ctx(cfg, epoch + 1);
        if !matches!(r, Ok(Some(_))) {
            // Someone else holds the record now (a takeover won): our copy must not run.
            let _ = drive(drv, move |d| d.kill(&ctx)).await;
            let why = format!("switchover: the record moved on ({r:?})");
            sh.events
                .emit("migration-failed", &group, &why, json!({"epoch": epoch}));
            return Done::Idle { group };
        }
        let cont = drive(drv, move |d| d.continue_migrated(&ctx)).await;
        let now = mono_ns();
        if let Err(e) = cont {
            // Ours on the record but not running: released as an orphan, placed again.
            let ctx = sh.ctx(cfg, epoch + 1);
            let _ = drive(drv, move |d| d.kill(&ctx)).await;
            let why = format!("the migrated VM did not continue: {e}");
            sh.events.emit(
                "migration-failed",
                &group,
                &why,
                json!({"epoch": epoch + 1}),
            );
            return Done::Idle { group };
        }
        let text = format!(
            "{reason}: switchover {:.0} ms, total {:.0} ms",
            ms(now - arrived),
            ms(now - started)
        );
        sh.events.emit(
            "migrated-in",
            &group,
            &text,
            json!({"epoch": epoch + 1, "target_node": source,
                   "switchover_ms": ms(now - arrived), "total_ms": ms(now - started)}),
        );
        Done::Running {
            group,
            epoch: epoch + 1,
        }
    }

    /// Before switchover: kill the incoming VM, take our registrations off, give the
    /// record back to the source as it was (running there, no migration).
    async fn abort(&self, why: String) -> Done {
        let (sh, cfg, epoch) = (self.sh, self.cfg, self.epoch);
        let ctx = sh.ctx(cfg, epoch + 1);
        let _ = drive(self.drv, move |d| d.kill(&ctx)).await;
        if let Ok(s) = sh.session() {
            for &lun in &cfg.disks {
                if let Err(e) = claim::unregister(&s, lun, self.vm, sh.timeout()).await {
                    tracing::warn!(group = %cfg.name, lun, error = %e, "cannot unregister");
                }
            }
        }
        let me = sh.id;
        let reason = format!("live migration to node {me} failed: {why}");
        let _ = sh
            .update_group(&cfg.name, |r| {
                let mut n = r.clone();
                let ours = r.epoch == epoch && r.migration.as_ref().is_some_and(|m| m.to == me);
                n.migration = None;
                n.reason = reason.clone();
                ours.then_some(n)
            })
            .await;
        sh.events.emit(
            "migration-failed",
            &cfg.name,
            &why,
            json!({"epoch": epoch, "target_node": self.source}),
        );
        Done::Failed {
            group: cfg.name.clone(),
            why,
        }
    }
}

/// Source: migrate the VM to `addr`; QEMU's downtime and total time go in the event.
pub(super) async fn migrate_out(
    sh: &Shared,
    cfg: &GroupConfig,
    drv: &Driver,
    epoch: u64,
    to: u16,
    addr: String,
) -> Done {
    let ctx = sh.ctx(cfg, epoch);
    let timeout = sh.cfg.timings().migration_timeout;
    let target = addr.clone();
    let r = drive(drv, move |d| d.migrate_live(&ctx, &target, timeout)).await;
    let group = cfg.name.clone();
    let live = match r {
        Ok(st) => {
            let text = format!(
                "live migration to node {to} completed: downtime {} ms, total {} ms",
                st.downtime.as_millis(),
                st.total.as_millis()
            );
            sh.events.emit(
                "migration-completed",
                &group,
                &text,
                json!({"epoch": epoch, "target_node": to,
                       "downtime_ms": st.downtime.as_millis() as u64,
                       "total_ms": st.total.as_millis() as u64,
                       "transferred": st.transferred}),
            );
            LiveOut::HandedOver { to }
        }
        Err(e) => {
            let why = format!("live migration to node {to} ({addr}): {e}");
            sh.events.emit(
                "migration-failed",
                &group,
                &why,
                json!({"epoch": epoch, "target_node": to}),
            );
            LiveOut::Failed { to, addr }
        }
    };
    Done::Live { group, epoch, live }
}

/// Source: no hand-over. Run the VM again if its state went over, take the disks back
/// (the destination's registrations are preempted), clear the record's migration.
pub(super) async fn end_here(
    sh: &Shared,
    vm: &Identity,
    cfg: &GroupConfig,
    drv: &Driver,
    epoch: u64,
    handed_over: bool,
    why: String,
) -> Done {
    let group = cfg.name.clone();
    if handed_over {
        let ctx = sh.ctx(cfg, epoch);
        if let Err(e) = drive(drv, move |d| d.continue_migrated(&ctx)).await {
            // Stuck in postmigrate: count it as a failed VM (restart or failover).
            tracing::warn!(group, error = %e, "cannot continue the VM after a migration");
            let ctx = sh.ctx(cfg, epoch);
            let _ = drive(drv, move |d| d.kill(&ctx)).await;
        }
    }
    if let Err(e) = reclaim_disks(sh, vm, cfg).await {
        if matches!(e, AgentError::Fenced(_)) {
            return Done::Fenced {
                group,
                why: e.to_string(),
            };
        }
        tracing::warn!(group, error = %e, "taking the disks back after a migration");
    }
    let (me, inc) = (sh.id, sh.incarnation());
    let _ = sh
        .update_group(&group, |r| {
            let mut n = if_held(r, (me, inc, epoch))?;
            n.migration.take()?;
            n.reason = why.clone();
            Some(n)
        })
        .await;
    sh.events
        .emit("migration-aborted", &group, &why, json!({"epoch": epoch}));
    Done::Live {
        group,
        epoch,
        live: LiveOut::None,
    }
}

async fn reclaim_disks(sh: &Shared, vm: &Identity, cfg: &GroupConfig) -> Result<(), AgentError> {
    let s = sh.session()?;
    for &lun in &cfg.disks {
        claim::claim_disk(&s, lun, vm, sh.timeout()).await?;
    }
    Ok(())
}

/// Source: the destination owns the group: the VM here (stopped after the migration)
/// goes.
pub(super) async fn finish_out(sh: &Shared, cfg: &GroupConfig, drv: &Driver, to: u16) -> Done {
    let ctx = sh.ctx(cfg, 0);
    let r = drive(drv, move |d| d.kill(&ctx)).await;
    let text = match r {
        Ok(()) => format!("node {to} took the group over; the migrated VM here is gone"),
        Err(e) => format!("node {to} took the group over; ending the VM here: {e}"),
    };
    sh.events
        .emit("migrated-out", &cfg.name, &text, json!({"target_node": to}));
    Done::Idle {
        group: cfg.name.clone(),
    }
}
