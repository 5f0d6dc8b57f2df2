//! Persistent-reservation steps of the agent protocol: join the quorum LUN, claim a
//! group's disks (register this node's nexus and its VMs' initiator name, take the
//! reservation from whoever held it with PREEMPT AND ABORT, read it back), fence a peer,
//! and check that a claim still stands.

use crate::agent::quorum_disk::bounded;
use crate::agent::AgentError;
use crate::initiator::{PrType, RegisterFlags, Reservation, Session, TransportId};
use std::time::Duration;

/// Disks of a group: Write Exclusive, Registrants Only. Only the owner's nexuses are
/// registered, so only the owner (agent and VM data path) may write; anyone may read.
pub const DISK_TYPE: PrType = PrType::WriteExclusiveRegistrantsOnly;
/// The quorum LUN: Write Exclusive, All Registrants. Every member writes; a fenced
/// (preempted) member's writes are refused, which is how it learns it was fenced.
pub const QUORUM_TYPE: PrType = PrType::WriteExclusiveAllRegistrants;

/// Who we are on the wire.
#[derive(Debug, Clone)]
pub struct Identity {
    pub key: u64,
    /// The agent's own initiator port (name + ISID) — one I_T nexus.
    pub initiator_name: String,
    pub isid: [u8; 6],
    /// The VMs' initiator name, registered name-only (every ISID) via SPEC_I_PT.
    /// Both registrations are ALL_TG_PT: a node or VM that logs in again through another
    /// target port (another portal group, or another gateway on Ceph) is still registered.
    pub vm_initiator_name: Option<String>,
}

/// What a reservation step on one LUN yields.
pub type ClaimResult<T = ()> = Result<T, AgentError>;

/// APTPL is a property of the whole LU set by the last REGISTER, so every REGISTER the
/// agent and ctl send carries it, the unregistering ones included.
pub fn aptpl() -> RegisterFlags {
    RegisterFlags {
        aptpl: true,
        ..RegisterFlags::default()
    }
}

/// The reservation on `lun`, if any.
async fn reservation(s: &Session, lun: u64, t: Duration) -> ClaimResult<Option<Reservation>> {
    let (_, res) = bounded(t, "READ RESERVATION", s.read_reservation(lun)).await?;
    Ok(res)
}

fn same_name(a: &str, b: &str) -> bool {
    // iSCSI names compare case-insensitively (RFC 3722 stringprep folds case).
    a.eq_ignore_ascii_case(b)
}

/// Make sure our nexus (and, if given, the VM initiator name) is registered on `lun`
/// with our key, APTPL set so it survives a target restart. SPC-4 allows SPEC_I_PT only
/// from an unregistered nexus, so a missing VM registration behind a registered agent
/// nexus is fixed by unregistering the nexus first.
pub async fn ensure_registered(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    for _ in 0..3 {
        let (_, regs) = bounded(t, "READ FULL STATUS", s.read_full_status(lun)).await?;
        let nexus = regs.iter().find(|r| {
            same_name(&r.transport_id.name, &me.initiator_name)
                && r.transport_id.isid == Some(me.isid)
        });
        let vm_ok = match &me.vm_initiator_name {
            None => true,
            Some(vm) => regs
                .iter()
                .any(|r| r.key == me.key && same_name(&r.transport_id.name, vm)),
        };
        let vm_other_key = me.vm_initiator_name.as_ref().is_some_and(|vm| {
            regs.iter()
                .any(|r| r.key != me.key && same_name(&r.transport_id.name, vm))
        });
        if vm_other_key {
            return Err(AgentError::Claim(format!(
                "LUN {lun}: the VM initiator name is registered with another key; is \
                 vm_initiator_name shared by two nodes?"
            )));
        }
        match nexus {
            Some(r) if r.key == me.key && vm_ok => return Ok(()),
            Some(r) => {
                // Wrong key (a stale one) or the VM registration is missing: start over
                // from an unregistered nexus (REGISTER with the current key, SA key 0).
                let cur = r.key;
                bounded(
                    t,
                    "PR OUT REGISTER (unregister)",
                    s.register(lun, cur, 0, &aptpl()),
                )
                .await?;
            }
            None => {
                let flags = RegisterFlags {
                    aptpl: true,
                    all_tg_pt: true,
                    spec_i_pt: match (&me.vm_initiator_name, vm_ok) {
                        (Some(vm), false) => vec![TransportId::iscsi_name(vm.clone())],
                        _ => vec![],
                    },
                };
                bounded(t, "PR OUT REGISTER", s.register(lun, 0, me.key, &flags)).await?;
            }
        }
    }
    Err(AgentError::Claim(format!(
        "LUN {lun}: registration did not settle"
    )))
}

/// Join the quorum LUN: register and hold (or share) the all-registrants reservation.
pub async fn join_quorum(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    ensure_registered(s, lun, me, t).await?;
    let res = reservation(s, lun, t).await?;
    match res {
        Some(r) if r.type_ == QUORUM_TYPE => Ok(()),
        Some(r) => Err(AgentError::Claim(format!(
            "quorum LUN {lun} holds a {} reservation, not {}: is it used by something else?",
            r.type_.name(),
            QUORUM_TYPE.name()
        ))),
        None => {
            match bounded(t, "PR OUT RESERVE", s.reserve(lun, me.key, QUORUM_TYPE)).await {
                Ok(()) => Ok(()),
                // Another member reserved it between our read and our reserve.
                Err(AgentError::Conflict(_)) => {
                    let res = reservation(s, lun, t).await?;
                    match res {
                        Some(r) if r.type_ == QUORUM_TYPE => Ok(()),
                        _ => Err(AgentError::Claim(format!(
                            "quorum LUN {lun}: cannot establish the {} reservation",
                            QUORUM_TYPE.name()
                        ))),
                    }
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Whether our key is still registered on `lun` (a lost key means we were fenced).
pub async fn key_present(s: &Session, lun: u64, key: u64, t: Duration) -> ClaimResult<bool> {
    let (_, keys) = bounded(t, "READ KEYS", s.read_keys(lun)).await?;
    Ok(keys.contains(&key))
}

/// Remove every registration of `victim` on `lun` and abort its tasks. With an
/// all-registrants reservation the reservation stays; on a disk held by the victim it
/// moves to us. A victim that is already gone is not an error.
pub async fn preempt_abort(
    s: &Session,
    lun: u64,
    me: &Identity,
    victim: u64,
    ty: PrType,
    t: Duration,
) -> ClaimResult<bool> {
    if victim == me.key || victim == 0 {
        return Ok(false);
    }
    match bounded(
        t,
        "PR OUT PREEMPT AND ABORT",
        s.preempt_and_abort(lun, me.key, victim, ty),
    )
    .await
    {
        Ok(()) => Ok(true),
        Err(AgentError::Conflict(_)) => {
            // SPC-4: preempting a key nobody holds is a conflict; fine if it is gone,
            // an error if *we* are the ones not registered.
            let (_, keys) = bounded(t, "READ KEYS", s.read_keys(lun)).await?;
            if !keys.contains(&me.key) {
                return Err(AgentError::Fenced(format!(
                    "LUN {lun}: our key is gone; we were fenced"
                )));
            }
            if keys.contains(&victim) {
                return Err(AgentError::Claim(format!(
                    "LUN {lun}: PREEMPT AND ABORT of {victim:#x} refused"
                )));
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Claim one disk: registered, every other key preempted (and its tasks aborted), the
/// Write Exclusive Registrants Only reservation ours — then read back.
pub async fn claim_disk(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    ensure_registered(s, lun, me, t).await?;
    let res = reservation(s, lun, t).await?;
    match res {
        Some(r) if r.key == me.key && r.type_ == DISK_TYPE => {}
        Some(r) if r.key != me.key && r.key != 0 => {
            preempt_abort(s, lun, me, r.key, DISK_TYPE, t).await?;
        }
        Some(r) if r.key == me.key => {
            // Ours, of another type (an older layout or a hand-made one): re-take it.
            bounded(t, "PR OUT RELEASE", s.release(lun, me.key, r.type_)).await?;
        }
        Some(r) => {
            return Err(AgentError::Claim(format!(
                "LUN {lun} holds a {} reservation; a group disk must carry {} (clear it \
                 with `holdfast pr … clear` if it is left over)",
                r.type_.name(),
                DISK_TYPE.name()
            )))
        }
        None => {}
    }
    // Every other registration (an old owner's VM data path, a stale nexus) goes too.
    let (_, keys) = bounded(t, "READ KEYS", s.read_keys(lun)).await?;
    let mut others: Vec<u64> = keys.into_iter().filter(|k| *k != me.key).collect();
    others.sort_unstable();
    others.dedup();
    for k in others {
        preempt_abort(s, lun, me, k, DISK_TYPE, t).await?;
    }
    let res = reservation(s, lun, t).await?;
    if res.is_none() {
        bounded(t, "PR OUT RESERVE", s.reserve(lun, me.key, DISK_TYPE)).await?;
    }
    verify_disk(s, lun, me, t).await
}

/// Read back: the reservation is ours with the right type and no other key is
/// registered. The VM may start only after this passes.
pub async fn verify_disk(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    let res = reservation(s, lun, t).await?;
    let (_, keys) = bounded(t, "READ KEYS", s.read_keys(lun)).await?;
    match res {
        Some(r) if r.key == me.key && r.type_ == DISK_TYPE => {}
        Some(r) => {
            return Err(AgentError::Fenced(format!(
                "LUN {lun}: reservation is held by {:#x} ({}), not us",
                r.key,
                r.type_.name()
            )))
        }
        None => return Err(AgentError::Fenced(format!("LUN {lun}: no reservation"))),
    }
    if !keys.contains(&me.key) {
        return Err(AgentError::Fenced(format!(
            "LUN {lun}: our key is not registered"
        )));
    }
    if let Some(k) = keys.iter().find(|k| **k != me.key) {
        return Err(AgentError::Claim(format!(
            "LUN {lun}: key {k:#x} is still registered"
        )));
    }
    Ok(())
}

/// Let go of a disk after the VM stopped: release the reservation. The registrations
/// stay until the next owner preempts them (a claim removes every other key), which is
/// harmless: the VM is stopped, and a restart here needs no new registration.
pub async fn release_disk(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    let res = reservation(s, lun, t).await?;
    if let Some(r) = res {
        if r.key == me.key {
            bounded(t, "PR OUT RELEASE", s.release(lun, me.key, r.type_)).await?;
        }
    }
    Ok(())
}

/// Take this nexus's registration off `lun` (REGISTER with our key, service action key
/// 0), after an incoming live migration that did not happen. Not registered is fine.
pub async fn unregister(s: &Session, lun: u64, me: &Identity, t: Duration) -> ClaimResult {
    match bounded(
        t,
        "PR OUT REGISTER (unregister)",
        s.register(lun, me.key, 0, &aptpl()),
    )
    .await
    {
        Ok(()) | Err(AgentError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
