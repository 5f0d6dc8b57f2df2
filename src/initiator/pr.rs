//! Persistent reservations from the initiator side (SPC-4 §6.15, §6.16): typed PR IN
//! and PR OUT helpers on [`Session`]. The reservation types, service actions and iSCSI
//! TransportIDs are the SCSI vocabulary of `crate::scsi`, re-exported here.
//!
//! Everything the target sends back is peer input: short or inconsistent PR IN data
//! becomes [`InitiatorError::Protocol`], never a panic. RESERVATION CONFLICT is
//! [`InitiatorError::ReservationConflict`] (from [`ScsiResult::check`]).

use super::scsi::{cdb, ScsiResult};
use super::session::Session;
use super::InitiatorError;
pub use crate::scsi::pr_codes::{PrCodeError, PrInAction, PrOutAction, PrType};
use crate::scsi::sense::key;
pub use crate::scsi::transport_id::{parse_isid, TransportId, TransportIdParseError};
use bytes::Bytes;
use serde::Serialize;

/// Largest allocation length a 10-byte PR IN CDB can carry.
const MAX_ALLOC: u16 = u16::MAX;
/// How many UNIT ATTENTIONs a command is retried through (a fresh nexus may have a
/// power-on UA, a preempted one a RESERVATIONS/REGISTRATIONS PREEMPTED UA queued; the
/// target did not execute the command that reported it, so retrying is safe).
use super::retry::UA_RETRIES;

/// READ RESERVATION: the reservation on the logical unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    /// The holder's key (0 for the all-registrants types).
    #[serde(serialize_with = "ser_key")]
    pub key: u64,
    /// SCOPE field (0 = LU_SCOPE, the only scope SPC-4 keeps).
    pub scope: u8,
    #[serde(rename = "type", serialize_with = "ser_type")]
    pub type_: PrType,
}

/// REPORT CAPABILITIES (SPC-4 §6.15.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Replace Lost Reservation capable (SPC-5).
    pub rlr_c: bool,
    /// Compatible Reservation Handling (SCSI-2 RESERVE/RELEASE rules).
    pub crh: bool,
    /// SPEC_I_PT supported.
    pub sip_c: bool,
    /// ALL_TG_PT supported.
    pub atp_c: bool,
    /// Persist Through Power Loss capable.
    pub ptpl_c: bool,
    /// Type mask valid.
    pub tmv: bool,
    /// ALLOW COMMANDS field (SPC-4 table 191).
    pub allow_commands: u8,
    /// Persist Through Power Loss activated.
    pub ptpl_a: bool,
    /// Types the device server supports (meaningful when `tmv`).
    #[serde(serialize_with = "ser_types")]
    pub types: Vec<PrType>,
}

/// One READ FULL STATUS descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FullStatus {
    #[serde(serialize_with = "ser_key")]
    pub key: u64,
    pub all_tg_pt: bool,
    /// This registration is a reservation holder.
    pub holder: bool,
    pub scope: u8,
    /// The reservation type (holders only).
    #[serde(rename = "type", serialize_with = "ser_opt_type")]
    pub type_: Option<PrType>,
    pub relative_target_port: u16,
    pub transport_id: TransportId,
}

/// Options of REGISTER / REGISTER AND IGNORE EXISTING KEY.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterFlags {
    /// Activate Persist Through Power Loss.
    pub aptpl: bool,
    /// Register on every target port.
    pub all_tg_pt: bool,
    /// Also register these initiators (SPEC_I_PT; REGISTER only).
    pub spec_i_pt: Vec<TransportId>,
}

fn ser_key<S: serde::Serializer>(k: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{k:#x}"))
}

// Reports show a type by its long name; PrType's own serde form is the state file's.
fn ser_type<S: serde::Serializer>(t: &PrType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name())
}

fn ser_opt_type<S: serde::Serializer>(t: &Option<PrType>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => ser_type(t, s),
        None => s.serialize_none(),
    }
}

fn ser_types<S: serde::Serializer>(t: &[PrType], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(t.iter().map(|t| t.name()))
}

fn protocol(msg: impl Into<String>) -> InitiatorError {
    InitiatorError::Protocol(msg.into())
}

fn be32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn be64(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// Parse READ KEYS data: (generation, keys).
pub fn parse_read_keys(d: &[u8]) -> Result<(u32, Vec<u64>), InitiatorError> {
    let (generation, body) = prin_header(d, "READ KEYS")?;
    if body.len() % 8 != 0 {
        return Err(protocol("READ KEYS list is not a multiple of 8 bytes"));
    }
    let keys = body
        .chunks_exact(8)
        .filter_map(|c| be64(c, 0))
        .collect::<Vec<_>>();
    Ok((generation, keys))
}

/// Parse READ RESERVATION data.
pub fn parse_read_reservation(d: &[u8]) -> Result<(u32, Option<Reservation>), InitiatorError> {
    let (generation, body) = prin_header(d, "READ RESERVATION")?;
    if body.is_empty() {
        return Ok((generation, None));
    }
    if body.len() < 16 {
        return Err(protocol(format!(
            "READ RESERVATION descriptor of {} bytes",
            body.len()
        )));
    }
    let key = be64(body, 0).unwrap_or(0);
    let scope_type = body[13];
    let type_ = PrType::try_from(scope_type & 0x0f)
        .map_err(|e| protocol(format!("READ RESERVATION: {e}")))?;
    Ok((
        generation,
        Some(Reservation {
            key,
            scope: scope_type >> 4,
            type_,
        }),
    ))
}

/// Parse REPORT CAPABILITIES data.
pub fn parse_capabilities(d: &[u8]) -> Result<Capabilities, InitiatorError> {
    if d.len() < 6 {
        return Err(protocol(format!(
            "REPORT CAPABILITIES returned {} bytes",
            d.len()
        )));
    }
    let mask = u16::from_be_bytes([d[4], d[5]]);
    Ok(Capabilities {
        rlr_c: d[2] & 0x80 != 0,
        crh: d[2] & 0x10 != 0,
        sip_c: d[2] & 0x08 != 0,
        atp_c: d[2] & 0x04 != 0,
        ptpl_c: d[2] & 0x01 != 0,
        tmv: d[3] & 0x80 != 0,
        allow_commands: (d[3] >> 4) & 0x07,
        ptpl_a: d[3] & 0x01 != 0,
        types: PrType::ALL
            .into_iter()
            .filter(|t| mask & t.mask_bit() != 0)
            .collect(),
    })
}

/// Parse READ FULL STATUS data.
pub fn parse_full_status(d: &[u8]) -> Result<(u32, Vec<FullStatus>), InitiatorError> {
    let (generation, mut body) = prin_header(d, "READ FULL STATUS")?;
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 24 {
            return Err(protocol("READ FULL STATUS: truncated descriptor"));
        }
        let tid_len = be32(body, 20).unwrap_or(0) as usize;
        let tid_bytes = body
            .get(24..24usize.saturating_add(tid_len))
            .ok_or_else(|| protocol("READ FULL STATUS: TransportID runs past the data"))?;
        let (transport_id, used) =
            TransportId::decode(tid_bytes).map_err(|e| protocol(format!("TransportID: {e}")))?;
        if used != tid_len {
            return Err(protocol(format!(
                "READ FULL STATUS: TransportID of {used} bytes in a {tid_len}-byte field"
            )));
        }
        let holder = body[12] & 0x01 != 0;
        out.push(FullStatus {
            key: be64(body, 0).unwrap_or(0),
            all_tg_pt: body[12] & 0x02 != 0,
            holder,
            scope: body[13] >> 4,
            type_: if holder {
                PrType::try_from(body[13] & 0x0f).ok()
            } else {
                None
            },
            relative_target_port: u16::from_be_bytes([body[18], body[19]]),
            transport_id,
        });
        body = &body[24 + tid_len..];
    }
    Ok((generation, out))
}

/// PRGENERATION and the ADDITIONAL LENGTH bytes that follow the 8-byte header. Data
/// cut short by the allocation length is an error here: callers grow the allocation
/// first (see [`Session::prin`]).
fn prin_header<'a>(d: &'a [u8], what: &str) -> Result<(u32, &'a [u8]), InitiatorError> {
    let (Some(generation), Some(len)) = (be32(d, 0), be32(d, 4)) else {
        return Err(protocol(format!("{what} returned {} bytes", d.len())));
    };
    let body = d
        .get(8..8usize.saturating_add(len as usize))
        .ok_or_else(|| {
            protocol(format!(
                "{what}: ADDITIONAL LENGTH {len} but {} bytes follow",
                d.len().saturating_sub(8)
            ))
        })?;
    Ok((generation, body))
}

/// The 24-byte basic PR OUT parameter list (SPC-4 §6.16.3), plus SPEC_I_PT
/// TransportIDs when given.
pub fn prout_params(key: u64, sa_key: u64, flags: &RegisterFlags) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let spec = !flags.spec_i_pt.is_empty();
    p[20] = (u8::from(spec) << 3) | (u8::from(flags.all_tg_pt) << 2) | u8::from(flags.aptpl);
    if spec {
        let tids: Vec<u8> = flags.spec_i_pt.iter().flat_map(|t| t.encode()).collect();
        p.extend_from_slice(&u32::try_from(tids.len()).unwrap_or(u32::MAX).to_be_bytes());
        p.extend_from_slice(&tids);
    }
    p
}

/// The REGISTER AND MOVE parameter list (SPC-4 §6.16.4).
pub fn register_and_move_params(
    key: u64,
    sa_key: u64,
    relative_target_port: u16,
    unreg: bool,
    aptpl: bool,
    transport_id: &TransportId,
) -> Vec<u8> {
    let tid = transport_id.encode();
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[17] = (u8::from(unreg) << 1) | u8::from(aptpl);
    p[18..20].copy_from_slice(&relative_target_port.to_be_bytes());
    p[20..24].copy_from_slice(&u32::try_from(tid.len()).unwrap_or(u32::MAX).to_be_bytes());
    p.extend_from_slice(&tid);
    p
}

fn scope_type(type_: Option<PrType>) -> u8 {
    // Scope is always LU_SCOPE (0) in SPC-4.
    type_.map_or(0, PrType::code)
}

impl Session {
    /// A command retried through UNIT ATTENTIONs, then checked.
    async fn command_past_ua(
        &self,
        lun: u64,
        cdb_bytes: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, InitiatorError> {
        let mut left = UA_RETRIES;
        loop {
            let r = self
                .command(lun, cdb_bytes, data_out.clone(), data_in_len)
                .await?;
            match r.sense() {
                Some(s) if s.key == key::UNIT_ATTENTION && left > 0 => {
                    tracing::debug!(
                        asc = s.asc,
                        ascq = s.ascq,
                        "unit attention consumed; retrying"
                    );
                    left -= 1;
                }
                _ => return r.check(),
            }
        }
    }

    /// PERSISTENT RESERVE IN, growing the allocation until the whole answer fits.
    pub async fn prin(&self, lun: u64, action: PrInAction) -> Result<Bytes, InitiatorError> {
        let mut alloc: u16 = 1024;
        loop {
            let r = self
                .command_past_ua(
                    lun,
                    &cdb::persistent_reserve_in(action.code(), alloc),
                    None,
                    alloc.into(),
                )
                .await?;
            let need = be32(&r.data, 4).map_or(0, |l| u64::from(l) + 8);
            if action != PrInAction::ReportCapabilities
                && need > u64::from(alloc)
                && alloc < MAX_ALLOC
            {
                alloc = u16::try_from(need).unwrap_or(MAX_ALLOC);
                continue;
            }
            return Ok(r.data);
        }
    }

    /// PERSISTENT RESERVE OUT with a parameter list.
    pub async fn prout(
        &self,
        lun: u64,
        action: PrOutAction,
        type_: Option<PrType>,
        params: Vec<u8>,
    ) -> Result<(), InitiatorError> {
        let len = u32::try_from(params.len())
            .map_err(|_| InitiatorError::InvalidRequest("PR OUT parameter list too long".into()))?;
        let c = cdb::persistent_reserve_out(action.code(), scope_type(type_), len);
        self.command_past_ua(lun, &c, Some(Bytes::from(params)), 0)
            .await
            .map(|_| ())
    }

    /// READ KEYS: (PRgeneration, registered keys).
    pub async fn read_keys(&self, lun: u64) -> Result<(u32, Vec<u64>), InitiatorError> {
        parse_read_keys(&self.prin(lun, PrInAction::ReadKeys).await?)
    }

    /// READ RESERVATION: (PRgeneration, the reservation if any).
    pub async fn read_reservation(
        &self,
        lun: u64,
    ) -> Result<(u32, Option<Reservation>), InitiatorError> {
        parse_read_reservation(&self.prin(lun, PrInAction::ReadReservation).await?)
    }

    pub async fn report_capabilities(&self, lun: u64) -> Result<Capabilities, InitiatorError> {
        parse_capabilities(&self.prin(lun, PrInAction::ReportCapabilities).await?)
    }

    /// READ FULL STATUS: (PRgeneration, one descriptor per registered I_T nexus).
    pub async fn read_full_status(
        &self,
        lun: u64,
    ) -> Result<(u32, Vec<FullStatus>), InitiatorError> {
        parse_full_status(&self.prin(lun, PrInAction::ReadFullStatus).await?)
    }

    /// REGISTER: `key` must be the current registration's key (0 when unregistered);
    /// `sa_key` 0 unregisters.
    pub async fn register(
        &self,
        lun: u64,
        key: u64,
        sa_key: u64,
        flags: &RegisterFlags,
    ) -> Result<(), InitiatorError> {
        let p = prout_params(key, sa_key, flags);
        self.prout(lun, PrOutAction::Register, None, p).await
    }

    /// REGISTER AND IGNORE EXISTING KEY (SPEC_I_PT is not allowed with it).
    pub async fn register_ignore(
        &self,
        lun: u64,
        sa_key: u64,
        flags: &RegisterFlags,
    ) -> Result<(), InitiatorError> {
        if !flags.spec_i_pt.is_empty() {
            return Err(InitiatorError::InvalidRequest(
                "SPEC_I_PT is only allowed with REGISTER".into(),
            ));
        }
        let p = prout_params(0, sa_key, flags);
        self.prout(lun, PrOutAction::RegisterAndIgnoreExistingKey, None, p)
            .await
    }

    pub async fn reserve(&self, lun: u64, key: u64, type_: PrType) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, PrOutAction::Reserve, Some(type_), p).await
    }

    pub async fn release(&self, lun: u64, key: u64, type_: PrType) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, PrOutAction::Release, Some(type_), p).await
    }

    /// CLEAR: removes every registration and the reservation.
    pub async fn clear(&self, lun: u64, key: u64) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, PrOutAction::Clear, None, p).await
    }

    /// PREEMPT the registrations (and reservation) of `sa_key`.
    pub async fn preempt(
        &self,
        lun: u64,
        key: u64,
        sa_key: u64,
        type_: PrType,
    ) -> Result<(), InitiatorError> {
        let p = prout_params(key, sa_key, &RegisterFlags::default());
        self.prout(lun, PrOutAction::Preempt, Some(type_), p).await
    }

    /// PREEMPT AND ABORT: as PREEMPT, and the preempted nexuses' tasks are aborted.
    pub async fn preempt_and_abort(
        &self,
        lun: u64,
        key: u64,
        sa_key: u64,
        type_: PrType,
    ) -> Result<(), InitiatorError> {
        let p = prout_params(key, sa_key, &RegisterFlags::default());
        self.prout(lun, PrOutAction::PreemptAndAbort, Some(type_), p)
            .await
    }

    /// REGISTER AND MOVE the reservation (of type `type_`) to the initiator port
    /// `transport_id` on `relative_target_port`, registering it with `sa_key`.
    #[allow(clippy::too_many_arguments)] // mirrors the parameter list field by field
    pub async fn register_and_move(
        &self,
        lun: u64,
        key: u64,
        sa_key: u64,
        type_: PrType,
        relative_target_port: u16,
        unreg: bool,
        aptpl: bool,
        transport_id: &TransportId,
    ) -> Result<(), InitiatorError> {
        let p = register_and_move_params(
            key,
            sa_key,
            relative_target_port,
            unreg,
            aptpl,
            transport_id,
        );
        self.prout(lun, PrOutAction::RegisterAndMove, Some(type_), p)
            .await
    }

    pub async fn replace_lost_reservation(
        &self,
        lun: u64,
        key: u64,
        type_: PrType,
    ) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, PrOutAction::ReplaceLostReservation, Some(type_), p)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_parameter_list() {
        let p = prout_params(0x1122, 0x3344, &RegisterFlags::default());
        assert_eq!(p.len(), 24);
        assert_eq!(&p[0..8], &0x1122u64.to_be_bytes());
        assert_eq!(&p[8..16], &0x3344u64.to_be_bytes());
        assert_eq!(p[20], 0);
        let flags = RegisterFlags {
            aptpl: true,
            all_tg_pt: true,
            spec_i_pt: vec![
                TransportId::iscsi_name("iqn.a:b"),
                TransportId::iscsi_port("iqn.a:c", [0x80, 0, 0, 0, 0, 1]),
            ],
        };
        let p = prout_params(0, 7, &flags);
        assert_eq!(p[20], 0x08 | 0x04 | 0x01);
        let tids = u32::from_be_bytes([p[24], p[25], p[26], p[27]]) as usize;
        assert_eq!(p.len(), 28 + tids);
        let (a, used) = TransportId::decode(&p[28..]).unwrap();
        assert_eq!(a, flags.spec_i_pt[0]);
        let (b, used2) = TransportId::decode(&p[28 + used..]).unwrap();
        assert_eq!(b, flags.spec_i_pt[1]);
        assert_eq!(used + used2, tids);
    }

    #[test]
    fn register_and_move_list() {
        let t = TransportId::iscsi_port("iqn.a:b", [0x80, 0, 0, 0, 0, 2]);
        let p = register_and_move_params(1, 2, 3, true, false, &t);
        assert_eq!(p[17], 0x02);
        assert_eq!(&p[18..20], &[0, 3]);
        let len = u32::from_be_bytes([p[20], p[21], p[22], p[23]]) as usize;
        assert_eq!(p.len(), 24 + len);
        assert_eq!(TransportId::decode(&p[24..]).unwrap().0, t);
    }

    #[test]
    fn read_keys_data() {
        let mut d = vec![0, 0, 0, 3, 0, 0, 0, 16];
        d.extend_from_slice(&0xaau64.to_be_bytes());
        d.extend_from_slice(&0xbbu64.to_be_bytes());
        assert_eq!(parse_read_keys(&d).unwrap(), (3, vec![0xaa, 0xbb]));
        assert_eq!(
            parse_read_keys(&[0, 0, 0, 1, 0, 0, 0, 0]).unwrap(),
            (1, vec![])
        );
        assert!(parse_read_keys(&d[..20]).is_err()); // truncated
        assert!(parse_read_keys(&[0, 0, 0]).is_err());
        let mut odd = d.clone();
        odd[7] = 12;
        assert!(parse_read_keys(&odd[..20]).is_err());
    }

    #[test]
    fn read_reservation_data() {
        assert_eq!(
            parse_read_reservation(&[0, 0, 0, 5, 0, 0, 0, 0]).unwrap(),
            (5, None)
        );
        let mut d = vec![0, 0, 0, 6, 0, 0, 0, 16];
        d.extend_from_slice(&0xabcdu64.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 0, 0, 0x05, 0, 0]);
        assert_eq!(
            parse_read_reservation(&d).unwrap(),
            (
                6,
                Some(Reservation {
                    key: 0xabcd,
                    scope: 0,
                    type_: PrType::WriteExclusiveRegistrantsOnly
                })
            )
        );
        d[21] = 0x02; // type 2 is obsolete
        assert!(parse_read_reservation(&d).is_err());
        assert!(parse_read_reservation(&d[..16]).is_err());
    }

    #[test]
    fn capabilities_data() {
        let c = parse_capabilities(&[0, 8, 0x9d, 0x91, 0xea, 0x01, 0, 0]).unwrap();
        assert!(c.rlr_c && c.crh && c.sip_c && c.atp_c && c.ptpl_c && c.tmv && c.ptpl_a);
        assert_eq!(c.allow_commands, 1);
        assert_eq!(c.types, PrType::ALL.to_vec());
        let c = parse_capabilities(&[0, 8, 0, 0x80, 0x20, 0, 0, 0]).unwrap();
        assert_eq!(c.types, vec![PrType::WriteExclusiveRegistrantsOnly]);
        assert!(parse_capabilities(&[0, 8, 0]).is_err());
    }

    fn full_status_descriptor(key: u64, flags: u8, st: u8, port: u16, t: &TransportId) -> Vec<u8> {
        let tid = t.encode();
        let mut d = key.to_be_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        d.push(flags);
        d.push(st);
        d.extend_from_slice(&[0; 4]);
        d.extend_from_slice(&port.to_be_bytes());
        d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
        d.extend_from_slice(&tid);
        d
    }

    #[test]
    fn full_status_data() {
        let a = TransportId::iscsi_port("iqn.a:node1", [0x80, 0, 0, 0, 0, 1]);
        let b = TransportId::iscsi_name("iqn.a:node2");
        let mut body = full_status_descriptor(0x11, 0x01, 0x05, 1, &a);
        let first = body.len();
        body.extend(full_status_descriptor(0x22, 0x02, 0x00, 0, &b));
        let mut d = vec![0, 0, 0, 9];
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
        d.extend_from_slice(&body);
        let (g, v) = parse_full_status(&d).unwrap();
        assert_eq!(g, 9);
        assert_eq!(
            v,
            vec![
                FullStatus {
                    key: 0x11,
                    all_tg_pt: false,
                    holder: true,
                    scope: 0,
                    type_: Some(PrType::WriteExclusiveRegistrantsOnly),
                    relative_target_port: 1,
                    transport_id: a,
                },
                FullStatus {
                    key: 0x22,
                    all_tg_pt: true,
                    holder: false,
                    scope: 0,
                    type_: None,
                    relative_target_port: 0,
                    transport_id: b,
                }
            ]
        );
        // Every truncation is an error, never a panic.
        for cut in 0..d.len() {
            let mut t = d[..cut].to_vec();
            if t.len() >= 8 {
                let l = (t.len() - 8) as u32;
                t[4..8].copy_from_slice(&l.to_be_bytes());
            }
            let whole = cut == 8 || cut == 8 + first;
            assert_eq!(parse_full_status(&t).is_ok(), whole, "cut {cut}");
        }
    }
}
