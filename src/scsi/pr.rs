//! Persistent reservations (SPC-4 §5.13): the pure state machine of one logical unit.
//!
//! No I/O happens here. [`PrState::prout`] decodes a PERSISTENT RESERVE OUT command,
//! changes the state and reports what the caller must do (unit attentions, nexuses to
//! abort, whether to persist); [`PrState::prin`] answers PERSISTENT RESERVE IN;
//! [`PrState::allows`] is the access rule for media commands. The logical unit wraps it in
//! a lock that doubles as the PREEMPT AND ABORT fence (see `lun.rs`).
//!
//! Registrations are keyed by I_T nexus: initiator port (name + ISID) and target port
//! (target name + TPGT, or every target port with ALL_TG_PT). A registration made through
//! SPEC_I_PT with an iSCSI TransportID of format 00b (name only) has no ISID and covers
//! every initiator port of that name, as LIO does: the cluster agent registers a VM's data
//! path that way, and the VM logs in with fresh ISIDs.

use super::cdb;
use super::lun::CmdError;
use super::pr_codes::{PrInAction, PrOutAction, PrType};
pub use super::pr_index::Registrations;
use super::sense::{ua, Sense};
use super::transport_id::TransportId;
use super::ItNexus;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;

/// Most registrations one LU keeps (bounds memory and READ KEYS / READ FULL STATUS size).
pub const MAX_REGISTRATIONS: usize = 4096;
/// Longest PR OUT parameter list accepted (bounds what the transport buffers).
pub const MAX_PARAM_LIST: u32 = 1 << 20;

/// A target port: target name and portal group tag (the relative target port id equals
/// the TPGT in holdfast).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetPort {
    pub name: String,
    pub tpgt: u16,
}

/// Which I_T nexuses a registration stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegId {
    /// iSCSI initiator name, lower-cased (iSCSI names compare case-insensitively).
    pub initiator: String,
    /// None: every ISID of the name (SPEC_I_PT TransportID format 00b).
    pub isid: Option<[u8; 6]>,
    /// None: every target port (ALL_TG_PT).
    pub target: Option<TargetPort>,
}

impl RegId {
    fn new(initiator: &str, isid: Option<[u8; 6]>, target: Option<TargetPort>) -> RegId {
        RegId {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            target: target.map(|t| TargetPort {
                name: t.name.to_ascii_lowercase(),
                tpgt: t.tpgt,
            }),
        }
    }

    /// The registration a plain REGISTER from `n` creates.
    pub fn of_nexus(n: &ItNexus, all_tg_pt: bool) -> RegId {
        RegId::new(
            &n.initiator_name,
            Some(n.isid),
            (!all_tg_pt).then(|| port_of(n)),
        )
    }

    pub fn matches(&self, n: &ItNexus) -> bool {
        self.initiator.eq_ignore_ascii_case(&n.initiator_name)
            && self.isid.is_none_or_eq(n.isid)
            && match &self.target {
                None => true,
                Some(t) => t.tpgt == n.tpgt && t.name.eq_ignore_ascii_case(&n.target_name),
            }
    }

    fn covers(&self, other: &RegId) -> bool {
        self.initiator == other.initiator
            && (self.isid.is_none() || self.isid == other.isid)
            && (self.target.is_none() || self.target == other.target)
    }
}

trait OptEq<T> {
    fn is_none_or_eq(&self, v: T) -> bool;
}

impl<T: PartialEq> OptEq<T> for Option<T> {
    fn is_none_or_eq(&self, v: T) -> bool {
        match self {
            None => true,
            Some(x) => *x == v,
        }
    }
}

fn port_of(n: &ItNexus) -> TargetPort {
    TargetPort {
        name: n.target_name.to_ascii_lowercase(),
        tpgt: n.tpgt,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub id: RegId,
    pub key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The registration holding it (for all-registrants types: the one that created it).
    pub holder: RegId,
    pub ty: PrType,
}

/// The persistent reservation state of one LU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrState {
    pub generation: u32,
    /// The last APTPL bit received with REGISTER / REGISTER AND IGNORE / REGISTER AND MOVE.
    pub aptpl: bool,
    /// In registration order, indexed by initiator name (serialized as a plain list).
    pub registrations: Registrations,
    pub reservation: Option<Reservation>,
}

/// What a SCSI-2 RESERVE/RELEASE does given the persistent reservation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scsi2Verdict {
    /// GOOD without effect (the nexus holds, or shares, the persistent reservation).
    NoOp,
    Conflict,
    /// No persistent reservation in the way: SCSI-2 rules apply.
    Scsi2,
}

/// A unit attention to raise for every nexus covered by `to`, except the issuing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UaNotice {
    pub to: Vec<RegId>,
    pub asc: u8,
    pub ascq: u8,
}

/// What a PR OUT service action yields.
type ProutResult = Result<ProutEffects, CmdError>;

/// What a successful PR OUT asks of the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProutEffects {
    pub uas: Vec<UaNotice>,
    /// Registrations removed by PREEMPT AND ABORT: their nexuses' tasks are to be aborted.
    pub aborted: Vec<RegId>,
    /// The state changed (persist it when APTPL is set).
    pub changed: bool,
}

impl ProutEffects {
    /// The state changed and nothing else is asked.
    fn changed() -> Self {
        ProutEffects {
            changed: true,
            ..Default::default()
        }
    }

    fn ua(&mut self, to: Vec<RegId>, (asc, ascq): (u8, u8)) {
        if !to.is_empty() {
            self.uas.push(UaNotice { to, asc, ascq });
        }
    }
}

/// Capabilities the device server offers (REPORT CAPABILITIES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrCaps {
    /// APTPL is supported (a store for the state exists).
    pub ptpl: bool,
}

/// Decoded basic PR OUT parameter list.
struct Params {
    key: u64,
    sa_key: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
}

const fn conflict<T>() -> Result<T, CmdError> {
    Err(CmdError::ReservationConflict)
}

fn bad_param<T>(byte: u16, bit: Option<u8>) -> Result<T, CmdError> {
    Err(Sense::invalid_param(byte, bit).into())
}

fn bad_cdb<T>(byte: u16, bit: Option<u8>) -> Result<T, CmdError> {
    Err(Sense::invalid_cdb(byte, bit).into())
}

fn param_len_error<T>() -> Result<T, CmdError> {
    Err(Sense::PARAM_LIST_LENGTH.into())
}

/// Decode one TransportID at offset `at` of a parameter list; a bad one is INVALID FIELD
/// IN PARAMETER LIST pointing at the offending field.
fn decode_transport_id(list: &[u8], at: usize) -> Result<(TransportId, usize), CmdError> {
    TransportId::decode(list.get(at..).unwrap_or(&[])).map_err(|e| {
        let (byte, bit) = e.field();
        let ptr = u16::try_from(at.saturating_add(byte)).unwrap_or(u16::MAX);
        Sense::invalid_param(ptr, bit).into()
    })
}

/// The TransportID READ FULL STATUS reports for a registration.
fn transport_id_of(id: &RegId) -> TransportId {
    TransportId {
        name: id.initiator.clone(),
        isid: id.isid,
    }
}

impl PrState {
    /// Index of the registration covering `n`, the exact (ISID) one first.
    pub fn find(&self, n: &ItNexus) -> Option<usize> {
        self.registrations.find(n)
    }

    pub fn is_registered(&self, n: &ItNexus) -> bool {
        self.find(n).is_some()
    }

    fn holds(&self, idx: usize) -> bool {
        match &self.reservation {
            None => false,
            Some(r) => r.ty.all_registrants() || self.registrations[idx].id == r.holder,
        }
    }

    /// Whether `n` holds the persistent reservation.
    pub fn is_holder(&self, n: &ItNexus) -> bool {
        self.find(n).is_some_and(|i| self.holds(i))
    }

    /// SPC-4 / SBC-3 access rule for a media command of `n` (`write`: writes, and every
    /// command that changes the medium or the LU's state).
    pub fn allows(&self, n: &ItNexus, write: bool) -> bool {
        let Some(res) = &self.reservation else {
            return true;
        };
        let reg = self.find(n);
        if reg.is_some_and(|i| self.holds(i)) {
            return true;
        }
        if res.ty.registrants_share() && reg.is_some() {
            return true;
        }
        !write && !res.ty.exclusive_access()
    }

    /// How a SCSI-2 RESERVE (`reserve`) or RELEASE from `n` is handled in the presence of
    /// persistent reservations (SPC-4 §5.13.3, CRH = 1).
    pub fn scsi2_verdict(&self, n: &ItNexus, reserve: bool) -> Scsi2Verdict {
        match &self.reservation {
            Some(res) => {
                let reg = self.find(n);
                if reg.is_some_and(|i| self.holds(i))
                    || (res.ty.registrants_share() && reg.is_some())
                {
                    Scsi2Verdict::NoOp
                } else {
                    Scsi2Verdict::Conflict
                }
            }
            // Registrations without a reservation still block a SCSI-2 RESERVE.
            None if reserve && !self.registrations.is_empty() => Scsi2Verdict::Conflict,
            None => Scsi2Verdict::Scsi2,
        }
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn ids_except(&self, keep: impl Fn(&Registration) -> bool) -> Vec<RegId> {
        self.registrations
            .iter()
            .filter(|r| !keep(r))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Execute PERSISTENT RESERVE OUT from `n`. `caps` says whether APTPL is possible.
    /// On error the state is unchanged.
    pub fn prout(
        &mut self,
        n: &ItNexus,
        cdb_bytes: &[u8],
        data: &[u8],
        caps: PrCaps,
    ) -> ProutResult {
        let Ok(action) = PrOutAction::try_from(cdb::byte(cdb_bytes, 1) & 0x1F) else {
            return bad_cdb(1, Some(4));
        };
        let scope = cdb::byte(cdb_bytes, 2) >> 4;
        let type_code = cdb::byte(cdb_bytes, 2) & 0x0F;
        let plen = cdb::be32(cdb_bytes, 5);
        if plen > MAX_PARAM_LIST || (data.len() as u64) < u64::from(plen) {
            return param_len_error();
        }
        let list = &data[..plen as usize];
        if action == PrOutAction::RegisterAndMove {
            return self.register_and_move(n, list, scope, type_code, caps);
        }
        if plen < 24 {
            return param_len_error();
        }
        let flags = cdb::byte(list, 20);
        let p = Params {
            key: cdb::be64(list, 0),
            sa_key: cdb::be64(list, 8),
            spec_i_pt: flags & 0x08 != 0,
            all_tg_pt: flags & 0x04 != 0,
            aptpl: flags & 0x01 != 0,
        };
        if p.spec_i_pt && action != PrOutAction::Register {
            return bad_param(20, Some(3));
        }
        if !p.spec_i_pt && plen != 24 {
            return param_len_error();
        }
        let is_register = matches!(
            action,
            PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey
        );
        if is_register && p.aptpl && !caps.ptpl {
            return bad_param(20, Some(0));
        }
        // RESERVE, RELEASE, PREEMPT and PREEMPT AND ABORT use scope and type; only
        // LU_SCOPE exists in SPC-4. The type is checked where it takes effect.
        if action.is_scoped() && scope != 0 {
            return bad_cdb(2, Some(7));
        }
        let ty = PrType::try_from(type_code).ok();
        match action {
            PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey => self.register(
                n,
                &p,
                action == PrOutAction::RegisterAndIgnoreExistingKey,
                list,
            ),
            PrOutAction::Reserve => self.reserve(n, &p, ty.ok_or(Sense::invalid_cdb(2, Some(3)))?),
            PrOutAction::Release => self.release(n, &p, type_code),
            PrOutAction::Clear => self.clear(n, &p),
            PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
                self.preempt(n, &p, ty, action == PrOutAction::PreemptAndAbort)
            }
            PrOutAction::RegisterAndMove => unreachable!("handled above"),
            PrOutAction::ReplaceLostReservation => {
                self.replace_lost(n, &p, ty.ok_or(Sense::invalid_cdb(2, Some(3)))?)
            }
        }
    }

    /// The registered index of `n` whose key is `key`, else RESERVATION CONFLICT.
    fn registered_with(&self, n: &ItNexus, key: u64) -> Result<usize, CmdError> {
        match self.find(n) {
            Some(i) if self.registrations[i].key == key => Ok(i),
            _ => conflict(),
        }
    }

    fn register(&mut self, n: &ItNexus, p: &Params, ignore: bool, list: &[u8]) -> ProutResult {
        let mut fx = ProutEffects::default();
        match self.find(n) {
            None => {
                if !ignore && p.key != 0 {
                    return conflict();
                }
                if p.sa_key == 0 {
                    // Unregistering an unregistered nexus: nothing to do.
                    return Ok(fx);
                }
                let mut new = vec![RegId::of_nexus(n, p.all_tg_pt)];
                if p.spec_i_pt {
                    let tids = parse_tid_list(list, 24)?;
                    for t in tids {
                        let target = (!p.all_tg_pt).then(|| port_of(n));
                        let id = RegId::new(&t.name, t.isid, target);
                        if new.contains(&id) {
                            continue;
                        }
                        if self.registrations.contains_id(&id) {
                            return bad_param(24, None);
                        }
                        new.push(id);
                    }
                }
                if self.registrations.len() + new.len() > MAX_REGISTRATIONS {
                    return Err(Sense::INSUFFICIENT_REGISTRATION_RESOURCES.into());
                }
                for id in new {
                    // An exact registration for this nexus replaces nothing: `find` missed.
                    self.registrations.push(Registration { id, key: p.sa_key });
                }
            }
            Some(i) => {
                if !ignore && p.key != self.registrations[i].key {
                    return conflict();
                }
                if p.spec_i_pt {
                    return bad_cdb(1, None);
                }
                if p.sa_key == 0 {
                    self.unregister(i, &mut fx);
                } else {
                    self.registrations.set_key(i, p.sa_key);
                }
            }
        }
        self.aptpl = p.aptpl;
        self.bump();
        fx.changed = true;
        Ok(fx)
    }

    /// An all-registrants reservation outlives the registration that created it: when
    /// that one goes, a remaining registrant stands for it, so the holder is always
    /// registered (the saved state is refused otherwise, and the LUN would not start).
    fn keep_holder_registered(&mut self) {
        let regs = &self.registrations;
        if let Some(res) = &mut self.reservation {
            if !regs.iter().any(|r| r.id == res.holder) {
                match regs.first() {
                    Some(r) if res.ty.all_registrants() => res.holder = r.id.clone(),
                    _ => self.reservation = None,
                }
            }
        }
    }

    /// Remove registration `i`; a holder's reservation goes with it (SPC-4 §5.13.11.2.3).
    fn unregister(&mut self, i: usize, fx: &mut ProutEffects) {
        self.unregister_inner(i, fx);
        self.keep_holder_registered();
    }

    fn unregister_inner(&mut self, i: usize, fx: &mut ProutEffects) {
        let gone = self.registrations.remove(i);
        let Some(res) = &self.reservation else { return };
        let released = if res.ty.all_registrants() {
            self.registrations.is_empty()
        } else {
            res.holder == gone.id
        };
        if released {
            let ty = res.ty;
            self.reservation = None;
            if matches!(
                ty,
                PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
            ) {
                fx.ua(self.ids_except(|_| false), ua::RESERVATIONS_RELEASED);
            }
        }
    }

    /// Registration `i` now holds a reservation of type `ty`.
    fn reserve_for(&mut self, i: usize, ty: PrType) -> ProutResult {
        self.reservation = Some(Reservation {
            holder: self.registrations[i].id.clone(),
            ty,
        });
        Ok(ProutEffects::changed())
    }

    fn reserve(&mut self, n: &ItNexus, p: &Params, ty: PrType) -> ProutResult {
        let i = self.registered_with(n, p.key)?;
        match &self.reservation {
            Some(res) if self.holds(i) && res.ty == ty => Ok(ProutEffects::default()),
            Some(_) => conflict(),
            None => self.reserve_for(i, ty),
        }
    }

    fn release(&mut self, n: &ItNexus, p: &Params, type_code: u8) -> ProutResult {
        let i = self.registered_with(n, p.key)?;
        let mut fx = ProutEffects::default();
        let Some(res) = &self.reservation else {
            return Ok(fx);
        };
        if !self.holds(i) {
            return Ok(fx);
        }
        if res.ty.code() != type_code {
            return Err(Sense::INVALID_RELEASE_OF_PERSISTENT_RESERVATION.into());
        }
        let ty = res.ty;
        self.reservation = None;
        if ty.registrants_share() {
            let me = self.registrations[i].id.clone();
            fx.ua(self.ids_except(|r| r.id == me), ua::RESERVATIONS_RELEASED);
        }
        fx.changed = true;
        Ok(fx)
    }

    fn clear(&mut self, n: &ItNexus, p: &Params) -> ProutResult {
        let i = self.registered_with(n, p.key)?;
        let me = self.registrations[i].id.clone();
        let mut fx = ProutEffects::changed();
        fx.ua(self.ids_except(|r| r.id == me), ua::RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        self.bump();
        Ok(fx)
    }

    fn preempt(&mut self, n: &ItNexus, p: &Params, ty: Option<PrType>, abort: bool) -> ProutResult {
        let i = self.registered_with(n, p.key)?;
        let me = self.registrations[i].id.clone();
        let mut fx = ProutEffects::changed();
        let need_type = || ty.ok_or(CmdError::from(Sense::invalid_cdb(2, Some(3))));
        let res = self.reservation.clone();
        let removed: Vec<RegId> = match res {
            // All-registrants with key 0: every other registration goes, the issuer
            // becomes the holder of a new reservation.
            Some(res) if res.ty.all_registrants() && p.sa_key == 0 => {
                let new_ty = need_type()?;
                let removed = self.ids_except(|r| r.id == me);
                self.registrations.retain(|r| r.id == me);
                self.reservation = Some(Reservation {
                    holder: me.clone(),
                    ty: new_ty,
                });
                removed
            }
            // Preempting the holder: its reservation moves to the issuer.
            Some(res)
                if !res.ty.all_registrants()
                    && self
                        .registrations
                        .iter()
                        .any(|r| r.id == res.holder && r.key == p.sa_key) =>
            {
                let new_ty = need_type()?;
                let removed = self.ids_except(|r| r.key != p.sa_key || r.id == me);
                self.registrations
                    .retain(|r| r.key != p.sa_key || r.id == me);
                self.reservation = Some(Reservation {
                    holder: me.clone(),
                    ty: new_ty,
                });
                if new_ty != res.ty {
                    // Type changed: the remaining registrants lose the old reservation.
                    let rest = self.ids_except(|r| r.id == me);
                    fx.ua(rest, ua::RESERVATIONS_RELEASED);
                }
                removed
            }
            Some(_) | None => {
                if p.sa_key == 0 {
                    return bad_param(8, None);
                }
                // Only registrations with the key go; the reservation stays.
                let removed = self.ids_except(|r| r.key != p.sa_key);
                if removed.is_empty() {
                    return conflict();
                }
                self.registrations.retain(|r| r.key != p.sa_key);
                if let Some(res) = &self.reservation {
                    if res.ty.all_registrants() && self.registrations.is_empty() {
                        self.reservation = None;
                    }
                }
                self.keep_holder_registered();
                removed
            }
        };
        if abort {
            fx.aborted = removed.clone();
        }
        fx.ua(removed, ua::REGISTRATIONS_PREEMPTED);
        self.bump();
        Ok(fx)
    }

    fn register_and_move(
        &mut self,
        n: &ItNexus,
        list: &[u8],
        scope: u8,
        type_code: u8,
        caps: PrCaps,
    ) -> ProutResult {
        if list.len() < 24 {
            return param_len_error();
        }
        let key = cdb::be64(list, 0);
        let sa_key = cdb::be64(list, 8);
        let unreg = cdb::byte(list, 17) & 0x02 != 0;
        let aptpl = cdb::byte(list, 17) & 0x01 != 0;
        let rel_port = cdb::be16(list, 18);
        let tid_len = cdb::be32(list, 20) as usize;
        if 24usize.saturating_add(tid_len) != list.len() {
            return param_len_error();
        }
        let i = self.registered_with(n, key)?;
        let Some(res) = self.reservation.clone() else {
            return conflict();
        };
        // Only the holder of a single-holder reservation can move it (SPC-4 §5.13.8).
        if res.ty.all_registrants() || !self.holds(i) {
            return conflict();
        }
        if scope != 0 || res.ty.code() != type_code {
            return bad_cdb(2, None);
        }
        if aptpl && !caps.ptpl {
            return bad_param(17, Some(0));
        }
        if sa_key == 0 {
            return bad_param(8, None);
        }
        if rel_port == 0 {
            return bad_param(18, None);
        }
        let (tid, used) = decode_transport_id(list, 24)?;
        if used != tid_len {
            return param_len_error();
        }
        let Some(isid) = tid.isid else {
            // The destination is one I_T nexus, so the TransportID must carry the ISID.
            return bad_param(24, Some(7));
        };
        let dest = RegId::new(
            &tid.name,
            Some(isid),
            Some(TargetPort {
                name: n.target_name.clone(),
                tpgt: rel_port,
            }),
        );
        let me = self.registrations[i].id.clone();
        if me.covers(&dest) {
            return bad_param(24, None);
        }
        let existing = self.registrations.iter().position(|r| r.id.covers(&dest));
        let holder = match existing {
            Some(j) => self.registrations[j].id.clone(),
            None => {
                if self.registrations.len() >= MAX_REGISTRATIONS {
                    return Err(Sense::INSUFFICIENT_REGISTRATION_RESOURCES.into());
                }
                self.registrations.push(Registration {
                    id: dest.clone(),
                    key: sa_key,
                });
                dest
            }
        };
        self.reservation = Some(Reservation { holder, ty: res.ty });
        if unreg {
            self.registrations.retain(|r| r.id != me);
        }
        self.aptpl = aptpl;
        self.bump();
        Ok(ProutEffects::changed())
    }

    /// REPLACE LOST RESERVATION (SPC-5): holdfast never loses reservation state (an
    /// unreadable state file stops the LUN instead), so this establishes the reservation
    /// like RESERVE, and lets the holder change its type.
    fn replace_lost(&mut self, n: &ItNexus, p: &Params, ty: PrType) -> ProutResult {
        let i = self.registered_with(n, p.key)?;
        match &self.reservation {
            Some(res) if !self.holds(i) || (res.ty.all_registrants() && res.ty != ty) => conflict(),
            _ => self.reserve_for(i, ty),
        }
    }

    /// Execute PERSISTENT RESERVE IN; the data is already cut to the allocation length
    /// (ADDITIONAL LENGTH keeps the full size).
    pub fn prin(&self, cdb_bytes: &[u8], caps: PrCaps) -> Result<Vec<u8>, CmdError> {
        let Ok(action) = PrInAction::try_from(cdb::byte(cdb_bytes, 1) & 0x1F) else {
            return bad_cdb(1, Some(4));
        };
        let alloc = usize::from(cdb::be16(cdb_bytes, 7));
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&self.generation.to_be_bytes());
        match action {
            PrInAction::ReadKeys => {
                let n = self.registrations.len() * 8;
                b.extend_from_slice(&(n as u32).to_be_bytes());
                for r in &self.registrations {
                    if b.len() >= alloc {
                        break;
                    }
                    b.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            PrInAction::ReadReservation => match &self.reservation {
                None => b.extend_from_slice(&0u32.to_be_bytes()),
                Some(res) => {
                    b.extend_from_slice(&16u32.to_be_bytes());
                    let key = if res.ty.all_registrants() {
                        0
                    } else {
                        self.registrations
                            .iter()
                            .find(|r| r.id == res.holder)
                            .map_or(0, |r| r.key)
                    };
                    b.extend_from_slice(&key.to_be_bytes());
                    b.extend_from_slice(&[0; 4]); // obsolete
                    b.push(0);
                    b.push(res.ty.code()); // scope 0 (LU)
                    b.extend_from_slice(&[0; 2]);
                }
            },
            PrInAction::ReportCapabilities => {
                b.clear();
                b.extend_from_slice(&8u16.to_be_bytes());
                // CRH, SIP_C, ATP_C, PTPL_C
                b.push(0x10 | 0x08 | 0x04 | u8::from(caps.ptpl));
                // TMV, ALLOW COMMANDS = 001b (SPC-4 table 191), PTPL_A
                b.push(0x80 | 0x10 | u8::from(self.aptpl && caps.ptpl));
                // Type mask: every type.
                let mask = PrType::ALL.iter().fold(0, |m, t| m | t.mask_bit());
                b.extend_from_slice(&mask.to_be_bytes());
                b.extend_from_slice(&[0; 2]);
            }
            PrInAction::ReadFullStatus => {
                b.extend_from_slice(&[0; 4]);
                let mut total: usize = 0;
                for (i, r) in self.registrations.iter().enumerate() {
                    let tid = transport_id_of(&r.id).encode();
                    total += 24 + tid.len();
                    if b.len() >= alloc {
                        continue; // keep counting ADDITIONAL LENGTH
                    }
                    b.extend_from_slice(&r.key.to_be_bytes());
                    b.extend_from_slice(&[0; 4]);
                    let holder = self.holds(i);
                    b.push(u8::from(r.id.target.is_none()) << 1 | u8::from(holder));
                    b.push(match (&self.reservation, holder) {
                        (Some(res), true) => res.ty.code(),
                        _ => 0,
                    });
                    b.extend_from_slice(&[0; 4]);
                    let rel = r.id.target.as_ref().map_or(0, |t| t.tpgt);
                    b.extend_from_slice(&rel.to_be_bytes());
                    b.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    b.extend_from_slice(&tid);
                }
                let total = u32::try_from(total).unwrap_or(u32::MAX);
                b[4..8].copy_from_slice(&total.to_be_bytes());
            }
        }
        b.truncate(alloc);
        Ok(b)
    }

    /// Serialized form for the APTPL store: versioned JSON with a CRC32C of the state.
    pub fn to_bytes(&self) -> Vec<u8> {
        let state = serde_json::to_vec(self).unwrap_or_default();
        let file = PrFile {
            version: PR_FILE_VERSION,
            crc32c: crc32c::crc32c(&state),
            state: self.clone(),
        };
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parse what [`PrState::to_bytes`] wrote; any inconsistency is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<PrState, PrLoadError> {
        let file: PrFile = serde_json::from_slice(bytes)
            .map_err(|e| PrLoadError::Corrupt(format!("not a PR state file: {e}")))?;
        if file.version != PR_FILE_VERSION {
            return Err(PrLoadError::Corrupt(format!(
                "unsupported version {}",
                file.version
            )));
        }
        let state = serde_json::to_vec(&file.state).unwrap_or_default();
        if crc32c::crc32c(&state) != file.crc32c {
            return Err(PrLoadError::Corrupt("checksum mismatch".into()));
        }
        let mut s = file.state;
        if s.registrations.len() > MAX_REGISTRATIONS {
            return Err(PrLoadError::Corrupt("too many registrations".into()));
        }
        // Earlier versions saved an all-registrants reservation whose creator had left;
        // it is still held by the remaining registrants.
        if s.reservation
            .as_ref()
            .is_some_and(|r| r.ty.all_registrants() && !s.registrations.is_empty())
        {
            s.keep_holder_registered();
        }
        if let Some(res) = &s.reservation {
            if !s.registrations.iter().any(|r| r.id == res.holder) {
                return Err(PrLoadError::Corrupt(
                    "reservation holder is not registered".into(),
                ));
            }
        }
        Ok(s)
    }
}

/// Parse the TransportID list of a SPEC_I_PT REGISTER: a 4-byte length at `at`, then
/// TransportIDs filling exactly that length.
fn parse_tid_list(list: &[u8], at: usize) -> Result<Vec<TransportId>, CmdError> {
    let len = cdb::be32(list, at) as usize;
    let start = at + 4;
    if list.len() < start || len != list.len() - start {
        return param_len_error();
    }
    let mut out = Vec::new();
    let mut off = start;
    while off < list.len() {
        let (t, used) = decode_transport_id(list, off)?;
        if out.len() >= MAX_REGISTRATIONS {
            return Err(Sense::INSUFFICIENT_REGISTRATION_RESOURCES.into());
        }
        out.push(t);
        off += used;
    }
    Ok(out)
}

const PR_FILE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrFile {
    version: u32,
    crc32c: u32,
    state: PrState,
}

#[derive(Debug, thiserror::Error)]
pub enum PrLoadError {
    #[error("corrupt persistent reservation state: {0}")]
    Corrupt(String),
    #[error("cannot read persistent reservation state: {0}")]
    Io(#[from] io::Error),
}

/// Durable home of the PR state when APTPL is set (implemented in `crate::store`).
pub trait PrStore: Send + Sync + fmt::Debug {
    /// The saved state, or None if nothing is saved.
    fn load(&self) -> io::Result<Option<Vec<u8>>>;
    /// Replace the saved state crash-atomically; durable when this returns.
    fn save(&self, bytes: &[u8]) -> io::Result<()>;
    /// Remove the saved state durably (APTPL turned off).
    fn remove(&self) -> io::Result<()>;
    /// Where the state lives, for messages.
    fn describe(&self) -> String;
}
