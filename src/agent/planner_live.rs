//! The planner's live-migration decisions (docs/AGENT.md, "Live migration"): when the
//! destination starts its incoming VM, when the source migrates, and how a migration
//! that does not end in a switchover is undone.

use super::{GroupView, LiveOut, Local, Op};
use crate::agent::membership::{Liveness, Membership};
use crate::agent::quorum::{GroupRecord, GroupState};
use std::time::Instant;

/// Destination: the record asks for a live migration here of a group that runs on a
/// live owner, and nobody listens yet → start the incoming VM. Anything else (the owner
/// dead, a migration already listening that this node does not run: its agent
/// restarted) is left to the normal takeover and to the source's clean-up.
pub(super) fn migrate_in(
    node: &super::NodeView,
    g: &GroupView,
    rec: &GroupRecord,
    membership: &Membership,
    now: Instant,
) -> Option<Op> {
    let m = rec.migration.as_ref()?;
    let ready = m.to == node.id
        && m.addr.is_empty()
        && g.local == Local::Idle
        && rec.state == GroupState::Running
        && !node.self_fencing
        && g.backoff_until.is_none_or(|t| now >= t)
        && membership.liveness(rec.owner, now) == Liveness::Alive;
    ready.then(|| Op::MigrateIn {
        group: g.name.to_string(),
        source: rec.owner,
        epoch: rec.epoch,
    })
}

/// Source (the record names us, the VM runs here): `None` when no live migration
/// concerns the group; otherwise the ops, which replace the owner's other requests
/// (moves, failback) until the migration has ended one way or the other.
pub(super) fn migrate_out(
    membership: &Membership,
    g: &GroupView,
    rec: &GroupRecord,
    now: Instant,
) -> Option<Vec<Op>> {
    let group = g.name.to_string();
    let m = rec.migration.as_ref();
    let end = |handed_over: bool, why: String| {
        Some(vec![Op::EndMigrationHere {
            group: group.clone(),
            epoch: rec.epoch,
            handed_over,
            why,
        }])
    };
    let dest_gone = m.is_some_and(|m| !membership.is_alive(m.to, now));
    match (&g.live, m) {
        (LiveOut::None, None) => None,
        (LiveOut::HandedOver { to }, _) if dest_gone || m.is_none_or(|m| m.to != *to) => end(
            true,
            format!("node {to} did not take the migrated VM over; it runs here again"),
        ),
        // The state is over there: wait for the destination's switchover (no monitor:
        // its PREEMPT AND ABORT removes our key before its record update lands).
        (LiveOut::HandedOver { .. }, _) => Some(vec![]),
        (_, Some(m)) if dest_gone => end(
            false,
            format!("live migration to node {}: the node is gone", m.to),
        ),
        (_, None) => end(false, "live migration ended without a hand-over".into()),
        (LiveOut::None, Some(m)) => Some(vec![Op::SetLive {
            group,
            live: LiveOut::Pending { to: m.to },
        }]),
        (LiveOut::Pending { .. }, Some(m)) if !m.addr.is_empty() => Some(vec![Op::MigrateOut {
            group,
            to: m.to,
            addr: m.addr.clone(),
        }]),
        (LiveOut::Failed { addr, .. }, Some(m)) if !m.addr.is_empty() && *addr != m.addr => {
            Some(vec![Op::MigrateOut {
                group,
                to: m.to,
                addr: m.addr.clone(),
            }])
        }
        // Requested and not listening yet, or failed and waiting for the destination to
        // give up: keep watching the VM here.
        _ => Some(monitor(g, rec, now)),
    }
}

fn monitor(g: &GroupView, rec: &GroupRecord, now: Instant) -> Vec<Op> {
    if now < g.next_monitor {
        return vec![];
    }
    vec![Op::Monitor {
        group: g.name.to_string(),
        epoch: rec.epoch,
    }]
}
