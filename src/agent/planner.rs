//! Every decision the agent takes, as pure functions: the quorum image, this node's
//! local state and the time go in, the operations to run come out. No I/O, no clock,
//! no tokio, so each policy, race and timing edge is a table test (Pacemaker's
//! scheduler regression tests). `node.rs` runs the returned ops; `ops.rs` does them.

use crate::agent::config::{self, Failback, GroupConfig};
use crate::agent::driver::VmStatus;
use crate::agent::membership::{Liveness, Membership};
use crate::agent::placement::{self, Candidate, RestartBudget};
use crate::agent::quorum::{AdminState, GroupRecord, GroupState, NodeState, QuorumImage};
use std::time::{Duration, Instant};

/// Where a group stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Not running here.
    Idle,
    /// An operation (claim/start, stop, restart, monitor) is in flight.
    Busy,
    Running {
        epoch: u64,
    },
    /// Frozen through a storage outage since `since`: resumed only if its claim at
    /// `epoch` still stands once the target answers again, killed otherwise.
    Paused {
        epoch: u64,
        since: Instant,
    },
}

/// What the owner of a group knows of its live migration away (the record has the
/// rest). Changed only by the ops the planner returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LiveOut {
    #[default]
    None,
    /// The record asks for a migration to `to`: the destination may register on the
    /// disks, so whatever ends the migration here must also clean up after it.
    Pending { to: u16 },
    /// Migrating to `addr` failed; the VM runs on here, and `addr` is not tried again.
    Failed { to: u16, addr: String },
    /// The state went over to `to`: the VM here is stopped for good (postmigrate) and
    /// waits for the destination's switchover, or to be continued if none comes.
    HandedOver { to: u16 },
}

/// Why a group is being taken offline (decides the offline action and the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineReason {
    Maintenance,
    Move(u16),
    NodeStop,
    /// The VM stopped by itself cleanly: nothing to stop, kept offline.
    GuestShutDown,
    /// Restarts used up: nothing to stop, mark failed here so a peer takes it.
    Failed,
}

impl OfflineReason {
    /// Whether a VM still runs that the offline action must stop.
    pub fn vm_running(self) -> bool {
        !matches!(self, OfflineReason::GuestShutDown | OfflineReason::Failed)
    }
}

/// The placement policy of one group, parsed once from its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub preferred_owners: Vec<String>,
    pub failback: Failback,
    /// Minutes of the day; `None` when unset or unparsable (then a window never opens).
    pub failback_window: Option<(u16, u16)>,
}

impl Policy {
    pub fn of(cfg: &GroupConfig) -> Policy {
        Policy {
            preferred_owners: cfg.preferred_owners.clone(),
            failback: cfg.failback,
            failback_window: cfg
                .failback_window
                .as_deref()
                .and_then(|w| config::parse_window(w).ok()),
        }
    }
}

/// This node as the planner sees it.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    pub id: u16,
    pub name: &'a str,
    pub incarnation: u64,
    /// Killing VMs and rejoining: claims nothing meanwhile.
    pub self_fencing: bool,
    pub dead_after: Duration,
    /// Minutes since local midnight (failback windows are in local time).
    pub local_minute: u16,
}

/// One configured group's local state.
#[derive(Debug, Clone)]
pub struct GroupView<'a> {
    pub name: &'a str,
    pub policy: &'a Policy,
    pub local: Local,
    pub next_monitor: Instant,
    /// Since when another node has been the better owner of this unowned group.
    pub waiting_since: Option<Instant>,
    /// No new claim before this (after a failed attempt).
    pub backoff_until: Option<Instant>,
    /// A live migration of this group away from here.
    pub live: LiveOut,
}

/// What the loop is to do. Ops that run I/O mark the group busy until they report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The quorum LUN has no record of the group yet: create it.
    EnsureGroupRecord {
        group: String,
    },
    /// The record names us but nothing runs here: kill any leftover, give it back.
    ReleaseOrphan {
        group: String,
    },
    /// A VM runs here that the record says is not ours: kill it now.
    KillLocal {
        group: String,
        why: String,
    },
    /// Claim the group (fencing `victim` first) and start it.
    Claim {
        group: String,
        victim: Option<u16>,
        victim_incarnation: Option<u64>,
    },
    TakeOffline {
        group: String,
        reason: OfflineReason,
        text: String,
    },
    Monitor {
        group: String,
        epoch: u64,
    },
    /// The VM failed and the restart budget allows another start here.
    RestartInPlace {
        group: String,
        attempt: u32,
        why: String,
    },
    /// Local state only: start (`Some`) or stop (`None`) waiting for a better owner.
    SetWaiting {
        group: String,
        since: Option<Instant>,
    },
    /// Quorum I/O works again and the record still names us at `epoch`: resume the
    /// paused VM through a COMPARE AND WRITE on the record (a peer's claim and our
    /// resume are then ordered by the target).
    Resume {
        group: String,
        epoch: u64,
        since: Instant,
    },
    /// Paused longer than `max_pause`: kill the VM (the record, still ours, is released
    /// as an orphan once the target answers).
    PauseExpired {
        group: String,
        paused_for: Duration,
    },
    /// Local state only: what the owner knows of a live migration away.
    SetLive {
        group: String,
        live: LiveOut,
    },
    /// Destination: register on the disks without preempting, start the VM waiting for
    /// the incoming migration, publish the address, and at switchover take the disks
    /// and the record from `source` (which owned it at `epoch`).
    MigrateIn {
        group: String,
        source: u16,
        epoch: u64,
    },
    /// Source: migrate the VM running here live to `addr` on node `to`.
    MigrateOut {
        group: String,
        to: u16,
        addr: String,
    },
    /// Source: the migration ended without a hand-over: run the VM here again (if it
    /// went over), take back the disks (the destination's keys go) and clear the
    /// record's migration.
    EndMigrationHere {
        group: String,
        epoch: u64,
        handed_over: bool,
        why: String,
    },
    /// Source: the destination took the group over: the stopped VM here goes.
    FinishMigrationOut {
        group: String,
        to: u16,
    },
}

/// The ops for every configured group, in the order given.
pub fn plan(
    node: &NodeView,
    groups: &[GroupView],
    image: &QuorumImage,
    membership: &Membership,
    now: Instant,
) -> Vec<Op> {
    groups
        .iter()
        .flat_map(|g| plan_group(node, g, image, membership, now))
        .collect()
}

/// The ops for one group.
pub fn plan_group(
    node: &NodeView,
    g: &GroupView,
    img: &QuorumImage,
    membership: &Membership,
    now: Instant,
) -> Vec<Op> {
    let group = g.name.to_string();
    let Some((_, rec, _)) = img.group(g.name) else {
        return vec![Op::EnsureGroupRecord { group }];
    };
    if g.local == Local::Busy {
        return vec![];
    }
    let mine = rec.owner == node.id && rec.owner_incarnation == node.incarnation;
    // Ours from an earlier life of this agent (restart, self-fence).
    if rec.owner == node.id && !mine {
        return vec![Op::ReleaseOrphan { group }];
    }
    let w = World {
        node,
        img,
        membership,
        now,
    };
    if mine {
        return plan_owned(&w, g, rec);
    }
    // Not ours: a VM still running here means someone else took it (the destination of
    // a live migration, if the state went over).
    if let (LiveOut::HandedOver { .. }, Local::Running { .. }) = (&g.live, g.local) {
        return vec![Op::FinishMigrationOut {
            group,
            to: rec.owner,
        }];
    }
    if g.local != Local::Idle {
        let why = match g.local {
            Local::Paused { .. } => format!(
                "paused VM: the group was claimed by node {} (epoch {}) during the outage; \
                 never resumed",
                rec.owner, rec.epoch
            ),
            _ => format!(
                "group record names node {} (epoch {}) as owner while the VM runs here",
                rec.owner, rec.epoch
            ),
        };
        return vec![Op::KillLocal { group, why }];
    }
    if rec.admin == AdminState::Offline {
        return stop_waiting(g);
    }
    if let Some(op) = live::migrate_in(node, g, rec, membership, now) {
        return vec![op];
    }
    // Owned by a peer: take over only if that peer is dead or left. Alive with a new
    // incarnation, it cleans its orphans itself.
    if rec.owner != 0
        && !matches!(
            membership.liveness(rec.owner, now),
            Liveness::Dead | Liveness::Left
        )
    {
        return stop_waiting(g);
    }
    if node.self_fencing {
        return vec![];
    }
    plan_claim(&w, g, rec)
}

/// What the decisions about one group read besides the group: this node, the quorum
/// image, the peers' liveness and the time.
struct World<'a> {
    node: &'a NodeView<'a>,
    img: &'a QuorumImage,
    membership: &'a Membership,
    now: Instant,
}

impl World<'_> {
    fn candidates(&self, rec: &GroupRecord, except: u16) -> Vec<Candidate> {
        candidates(self.node, self.img, rec, except, self.membership, self.now)
    }
}

fn stop_waiting(g: &GroupView) -> Vec<Op> {
    match g.waiting_since {
        Some(_) => vec![Op::SetWaiting {
            group: g.name.to_string(),
            since: None,
        }],
        None => vec![],
    }
}

/// Unowned (or its owner dead): claim if we are the node that should run it, or if
/// that node has not claimed within `dead_after` (it may be dead too, or not have the
/// group in its config) and we are a candidate.
fn plan_claim(w: &World, g: &GroupView, rec: &GroupRecord) -> Vec<Op> {
    let (node, now) = (w.node, w.now);
    let group = g.name.to_string();
    let cands = w.candidates(rec, rec.owner);
    let target = if rec.move_to != 0 && cands.iter().any(|c| c.id == rec.move_to) {
        Some(rec.move_to)
    } else {
        placement::best_owner(&g.policy.preferred_owners, &cands)
    };
    if g.backoff_until.is_some_and(|t| now < t) {
        return vec![];
    }
    if target != Some(node.id) {
        let since = g.waiting_since.unwrap_or(now);
        let me_candidate = cands.iter().any(|c| c.id == node.id);
        if !me_candidate || now.saturating_duration_since(since) < node.dead_after {
            return match g.waiting_since {
                None => vec![Op::SetWaiting {
                    group,
                    since: Some(now),
                }],
                Some(_) => vec![],
            };
        }
    }
    let mut ops = stop_waiting(g);
    let victim = (rec.owner != 0 && rec.owner != node.id).then_some(rec.owner);
    ops.push(Op::Claim {
        group,
        victim,
        victim_incarnation: victim.and_then(|v| w.img.slot(v).map(|s| s.incarnation)),
    });
    ops
}

/// A record that names us as we are now.
fn plan_owned(w: &World, g: &GroupView, rec: &GroupRecord) -> Vec<Op> {
    let group = g.name.to_string();
    match g.local {
        // Ours on the record but not running here and no op in flight: an op ended
        // without finishing the record (e.g. lost connection). Make it consistent.
        Local::Idle => return vec![Op::ReleaseOrphan { group }],
        Local::Busy => return vec![],
        Local::Paused { epoch, since } => return plan_paused(rec, group, epoch, since),
        Local::Running { .. } => {}
    }
    if rec.frozen {
        return vec![];
    }
    if let Some(ops) = live::migrate_out(w.membership, g, rec, w.now) {
        return ops;
    }
    if let Some((reason, text)) = owned_request(w, g, rec) {
        return vec![Op::TakeOffline {
            group,
            reason,
            text,
        }];
    }
    if w.now >= g.next_monitor {
        return vec![Op::Monitor {
            group,
            epoch: rec.epoch,
        }];
    }
    vec![]
}

/// A VM paused here whose record still names this incarnation: resume it if the record
/// is the run we paused (same epoch, running); anything else means the claim moved on.
fn plan_paused(rec: &GroupRecord, group: String, epoch: u64, since: Instant) -> Vec<Op> {
    if rec.epoch == epoch && rec.state == GroupState::Running {
        return vec![Op::Resume {
            group,
            epoch,
            since,
        }];
    }
    let why = format!(
        "paused VM: its record moved on to epoch {} ({}) during the outage; never resumed",
        rec.epoch,
        rec.state.name()
    );
    vec![Op::KillLocal { group, why }]
}

/// Admin and placement requests on a group running here, most specific first.
fn owned_request(w: &World, g: &GroupView, rec: &GroupRecord) -> Option<(OfflineReason, String)> {
    let (node, img, now) = (w.node, w.img, w.now);
    let me = node.id;
    if rec.admin == AdminState::Offline {
        return Some((
            OfflineReason::Maintenance,
            "taken offline by the administrator".into(),
        ));
    }
    if rec.move_to != 0 && rec.move_to != me {
        // A move to a node that is not alive waits (it stays here meanwhile).
        return w.membership.is_alive(rec.move_to, now).then(|| {
            (
                OfflineReason::Move(rec.move_to),
                format!("moving to node {} on request", rec.move_to),
            )
        });
    }
    let cands = w.candidates(rec, me);
    let prefs = &g.policy.preferred_owners;
    if img.admin(me).drained {
        return placement::best_owner(prefs, &cands).map(|t| {
            (
                OfflineReason::Move(t),
                format!("node drained; moving to node {t}"),
            )
        });
    }
    let target =
        placement::failback_target(prefs, &cands).and_then(|t| cands.iter().find(|c| c.id == t))?;
    let allowed = placement::is_away_from(prefs, node.name, &target.name)
        && placement::failback_allowed(
            g.policy.failback,
            g.policy.failback_window,
            node.local_minute,
        );
    allowed.then(|| {
        (
            OfflineReason::Move(target.id),
            format!("failback to preferred owner {}", target.name),
        )
    })
}

/// Nodes that may run a group now: alive (or us, with our current incarnation in our
/// slot and not self-fencing), not drained, not marked failed for it, and not `except`.
pub fn candidates(
    node: &NodeView,
    img: &QuorumImage,
    rec: &GroupRecord,
    except: u16,
    membership: &Membership,
    now: Instant,
) -> Vec<Candidate> {
    img.slots
        .iter()
        .flatten()
        .filter(|s| s.node_id != except && !rec.failed_on_node(s.node_id))
        .filter(|s| !img.admin(s.node_id).drained)
        .filter(|s| {
            if s.node_id == node.id {
                s.incarnation == node.incarnation && !node.self_fencing
            } else {
                s.state == NodeState::Active
                    && membership.liveness(s.node_id, now) == Liveness::Alive
            }
        })
        .map(|s| Candidate {
            id: s.node_id,
            name: s.name.clone(),
            load: img.load(s.node_id),
        })
        .collect()
}

/// What a monitor's status means for a group running here: `None` while it runs,
/// else a restart in place while `budget` allows, else give it up (failover). The
/// budget counts the restart.
pub fn after_status(
    group: &str,
    status: VmStatus,
    budget: &mut RestartBudget,
    now: Instant,
) -> Option<Op> {
    let group = group.to_string();
    let why = match status {
        VmStatus::Running => return None,
        VmStatus::ShutDown => {
            return Some(Op::TakeOffline {
                group,
                reason: OfflineReason::GuestShutDown,
                text: "the guest was shut down by its administrator; kept stopped".into(),
            })
        }
        VmStatus::Failed(w) => w,
        VmStatus::Stopped => "the VM is not running".to_string(),
    };
    if budget.try_restart(now) {
        let attempt = budget.count(now);
        return Some(Op::RestartInPlace {
            group,
            attempt,
            why,
        });
    }
    budget.reset();
    let text = format!(
        "VM failed ({why}) after {} restarts within {:?}; failing over",
        budget.threshold(),
        budget.period()
    );
    Some(Op::TakeOffline {
        group,
        reason: OfflineReason::Failed,
        text,
    })
}

/// SIGTERM hand-over of a group running here: name the best peer in the record (as a
/// move does) so that it claims at once instead of waiting to see whether we return.
pub fn handover(
    node: &NodeView,
    policy: &Policy,
    rec: Option<&GroupRecord>,
    img: Option<&QuorumImage>,
    membership: &Membership,
    now: Instant,
) -> (OfflineReason, String) {
    let next = img.zip(rec).and_then(|(img, rec)| {
        let cands = candidates(node, img, rec, node.id, membership, now);
        placement::best_owner(&policy.preferred_owners, &cands)
    });
    match next {
        Some(t) => (
            OfflineReason::Move(t),
            format!("agent stopping; handing the group over to node {t}"),
        ),
        None => (
            OfflineReason::NodeStop,
            "agent stopping; no other node can take the group".to_string(),
        ),
    }
}

/// What a node does about its VMs when it is fenced or its quorum I/O falters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutageAction {
    /// A peer fenced us (or pausing is switched off): kill every VM here, paused or
    /// not, and rejoin as a new incarnation.
    Fence(String),
    /// No heartbeat write has completed for `self_fence_after`: freeze the running VMs
    /// until the target answers again (peers may take them over meanwhile; then they
    /// are killed, never resumed).
    Pause(String),
}

/// Whether this node must act on its VMs now, and how: a quorum write was refused (a
/// peer fenced us) → fence; with VMs running and no heartbeat write completed for
/// `self_fence_after` → pause them, or fence when `max_pause` is zero (pausing off).
/// `heartbeat_age` is `None` before the first completed write.
pub fn outage_action(
    fenced: bool,
    running_vms: bool,
    heartbeat_age: Option<Duration>,
    self_fence_after: Duration,
    max_pause: Duration,
) -> Option<OutageAction> {
    if fenced {
        return Some(OutageAction::Fence(
            "this node was fenced: a quorum LUN write was refused, or its key is gone".into(),
        ));
    }
    let age = heartbeat_age.filter(|a| running_vms && *a > self_fence_after)?;
    let why = format!("no completed heartbeat write for {} ms", age.as_millis());
    Some(if max_pause.is_zero() {
        OutageAction::Fence(why)
    } else {
        OutageAction::Pause(why)
    })
}

/// Paused VMs whose pause has outlasted `max_pause`: they are killed (Windows' compute
/// resiliency period ends the same way).
pub fn expired_pauses(groups: &[GroupView], max_pause: Duration, now: Instant) -> Vec<Op> {
    groups
        .iter()
        .filter_map(|g| match g.local {
            Local::Paused { since, .. } if now.saturating_duration_since(since) >= max_pause => {
                Some(Op::PauseExpired {
                    group: g.name.to_string(),
                    paused_for: now.saturating_duration_since(since),
                })
            }
            _ => None,
        })
        .collect()
}

#[path = "planner_live.rs"]
mod live;

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
