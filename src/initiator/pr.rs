//! Persistent reservations from the initiator side (SPC-4 §6.15, §6.16): typed PR IN
//! and PR OUT helpers on [`Session`], the six reservation types and iSCSI TransportIDs.
//!
//! Everything the target sends back is peer input: short or inconsistent PR IN data
//! becomes [`InitiatorError::Protocol`], never a panic. RESERVATION CONFLICT is
//! [`InitiatorError::ReservationConflict`] (from [`ScsiResult::check`]).

use super::scsi::{cdb, sense_key, ScsiResult};
use super::session::Session;
use super::InitiatorError;
use bytes::Bytes;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// PR IN service actions.
pub mod prin_sa {
    pub const READ_KEYS: u8 = 0;
    pub const READ_RESERVATION: u8 = 1;
    pub const REPORT_CAPABILITIES: u8 = 2;
    pub const READ_FULL_STATUS: u8 = 3;
}

/// PR OUT service actions.
pub mod prout_sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
    pub const REPLACE_LOST: u8 = 8;
}

/// iSCSI's PROTOCOL IDENTIFIER in a TransportID (SPC-4 table 444).
const PROTOCOL_ISCSI: u8 = 5;
/// Largest allocation length a 10-byte PR IN CDB can carry.
const MAX_ALLOC: u16 = u16::MAX;
/// How many UNIT ATTENTIONs a command is retried through (a fresh nexus may have a
/// power-on UA, a preempted one a RESERVATIONS/REGISTRATIONS PREEMPTED UA queued; the
/// target did not execute the command that reported it, so retrying is safe).
use super::retry::UA_RETRIES;

/// Errors parsing a PR type or TransportID given by a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrParseError {
    #[error("unknown reservation type {0:?} (write-exclusive|we|1, exclusive-access|ea|3, write-exclusive-registrants-only|we-ro|5, exclusive-access-registrants-only|ea-ro|6, write-exclusive-all-registrants|we-ar|7, exclusive-access-all-registrants|ea-ar|8)")]
    Type(String),
    #[error(
        "invalid iSCSI TransportID {0:?}: expected NAME or NAME,i,0xISID (ISID: 12 hex digits)"
    )]
    TransportId(String),
}

/// Persistent reservation type (SPC-4 table 185).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    /// The TYPE field value.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    pub fn from_code(c: u8) -> Option<PrType> {
        PrType::ALL.into_iter().find(|t| t.code() == c)
    }

    /// Long name, e.g. `write-exclusive-registrants-only`.
    pub fn name(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "write-exclusive",
            PrType::ExclusiveAccess => "exclusive-access",
            PrType::WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
            PrType::ExclusiveAccessRegistrantsOnly => "exclusive-access-registrants-only",
            PrType::WriteExclusiveAllRegistrants => "write-exclusive-all-registrants",
            PrType::ExclusiveAccessAllRegistrants => "exclusive-access-all-registrants",
        }
    }

    /// Short alias, e.g. `we-ro`.
    pub fn short_name(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "we",
            PrType::ExclusiveAccess => "ea",
            PrType::WriteExclusiveRegistrantsOnly => "we-ro",
            PrType::ExclusiveAccessRegistrantsOnly => "ea-ro",
            PrType::WriteExclusiveAllRegistrants => "we-ar",
            PrType::ExclusiveAccessAllRegistrants => "ea-ar",
        }
    }

    /// sg_persist's wording, e.g. "Write Exclusive, registrants only".
    pub fn description(self) -> &'static str {
        match self {
            PrType::WriteExclusive => "Write Exclusive",
            PrType::ExclusiveAccess => "Exclusive Access",
            PrType::WriteExclusiveRegistrantsOnly => "Write Exclusive, registrants only",
            PrType::ExclusiveAccessRegistrantsOnly => "Exclusive Access, registrants only",
            PrType::WriteExclusiveAllRegistrants => "Write Exclusive, all registrants",
            PrType::ExclusiveAccessAllRegistrants => "Exclusive Access, all registrants",
        }
    }

    /// Every registrant holds the reservation (READ RESERVATION then reports key 0).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

impl fmt::Display for PrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PrType {
    type Err = PrParseError;

    fn from_str(s: &str) -> Result<PrType, PrParseError> {
        let l = s.trim().to_ascii_lowercase();
        PrType::ALL
            .into_iter()
            .find(|t| l == t.name() || l == t.short_name() || l == t.code().to_string())
            .ok_or_else(|| PrParseError::Type(s.to_string()))
    }
}

impl Serialize for PrType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6): format 00b names an initiator (every ISID of
/// it), format 01b one initiator port (name + ISID).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportId {
    pub name: String,
    pub isid: Option<[u8; 6]>,
}

impl TransportId {
    /// Format 00b: the initiator device `name`.
    pub fn iscsi_name(name: impl Into<String>) -> TransportId {
        TransportId {
            name: name.into(),
            isid: None,
        }
    }

    /// Format 01b: the initiator port `name,i,0x<isid>`.
    pub fn iscsi_port(name: impl Into<String>, isid: [u8; 6]) -> TransportId {
        TransportId {
            name: name.into(),
            isid: Some(isid),
        }
    }

    /// The wire form: header, NUL-terminated text, padded to a multiple of 4 with an
    /// ADDITIONAL LENGTH of at least 20 (SPC-4 requires both).
    pub fn encode(&self) -> Vec<u8> {
        let text = self.to_string();
        let body = (text.len() + 1).next_multiple_of(4).max(20);
        let mut b = Vec::with_capacity(4 + body);
        let format = if self.isid.is_some() { 0x40 } else { 0x00 };
        b.push(format | PROTOCOL_ISCSI);
        b.push(0);
        // An iSCSI name is at most 223 bytes, so this fits; saturate rather than wrap.
        b.extend_from_slice(&u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes());
        b.extend_from_slice(text.as_bytes());
        b.resize(4 + body, 0);
        b
    }

    /// Decode one TransportID at the start of `buf`; returns it and its length.
    pub fn decode(buf: &[u8]) -> Result<(TransportId, usize), InitiatorError> {
        let bad = |why: &str| InitiatorError::Protocol(format!("TransportID: {why}"));
        if buf.len() < 4 {
            return Err(bad("shorter than its header"));
        }
        if buf[0] & 0x0f != PROTOCOL_ISCSI {
            return Err(bad(&format!("protocol {} is not iSCSI", buf[0] & 0x0f)));
        }
        let format = buf[0] >> 6;
        let total = 4 + usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let body = buf
            .get(4..total)
            .ok_or_else(|| bad("ADDITIONAL LENGTH runs past the data"))?;
        let text = body.split(|&c| c == 0).next().unwrap_or(&[]);
        let text = std::str::from_utf8(text).map_err(|_| bad("name is not UTF-8"))?;
        let id = match format {
            0 => TransportId::iscsi_name(text),
            1 => text
                .parse::<TransportId>()
                .ok()
                .filter(|t| t.isid.is_some())
                .ok_or_else(|| bad(&format!("format 01b without ,i,0xISID: {text:?}")))?,
            f => return Err(bad(&format!("unknown format code {f}"))),
        };
        if id.name.is_empty() {
            return Err(bad("empty name"));
        }
        Ok((id, total))
    }
}

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.isid {
            Some(isid) => write!(f, "{},i,0x{}", self.name, hex::encode(isid)),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for TransportId {
    type Err = PrParseError;

    /// `NAME` (format 00b) or `NAME,i,0xISID` (format 01b); the separator is matched
    /// case-insensitively, as iSCSI initiator port names are.
    fn from_str(s: &str) -> Result<TransportId, PrParseError> {
        let err = || PrParseError::TransportId(s.to_string());
        let lower = s.to_ascii_lowercase();
        let (name, isid) = match lower.rfind(",i,") {
            None => (s, None),
            Some(pos) => {
                let isid = parse_isid(&s[pos + 3..]).ok_or_else(err)?;
                (&s[..pos], Some(isid))
            }
        };
        if name.is_empty()
            || name.len() > 223
            || !name.bytes().all(|c| c.is_ascii_graphic() && c != b',')
        {
            return Err(err());
        }
        Ok(TransportId {
            name: name.to_string(),
            isid,
        })
    }
}

impl Serialize for TransportId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An ISID in hex: 12 digits, `0x` optional (fewer digits are zero-extended on the left).
pub fn parse_isid(s: &str) -> Option<[u8; 6]> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 12 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let v = u64::from_str_radix(h, 16).ok()?;
    let mut isid = [0u8; 6];
    isid.copy_from_slice(&v.to_be_bytes()[2..]);
    Some(isid)
}

/// READ RESERVATION: the reservation on the logical unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reservation {
    /// The holder's key (0 for the all-registrants types).
    #[serde(serialize_with = "ser_key")]
    pub key: u64,
    /// SCOPE field (0 = LU_SCOPE, the only scope SPC-4 keeps).
    pub scope: u8,
    #[serde(rename = "type")]
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
    #[serde(rename = "type")]
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
    let type_ = PrType::from_code(scope_type & 0x0f).ok_or_else(|| {
        protocol(format!(
            "READ RESERVATION: unknown type {}",
            scope_type & 0x0f
        ))
    })?;
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
    // Type mask bits (SPC-4 table 192), by type.
    let bit = |t: PrType| match t {
        PrType::WriteExclusiveAllRegistrants => 0x8000,
        PrType::ExclusiveAccessRegistrantsOnly => 0x4000,
        PrType::WriteExclusiveRegistrantsOnly => 0x2000,
        PrType::ExclusiveAccess => 0x0800,
        PrType::WriteExclusive => 0x0200,
        PrType::ExclusiveAccessAllRegistrants => 0x0001,
    };
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
            .filter(|&t| mask & bit(t) != 0)
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
        let (transport_id, used) = TransportId::decode(tid_bytes)?;
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
                PrType::from_code(body[13] & 0x0f)
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
                Some(s) if s.key == sense_key::UNIT_ATTENTION && left > 0 => {
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
    pub async fn prin(&self, lun: u64, service_action: u8) -> Result<Bytes, InitiatorError> {
        let mut alloc: u16 = 1024;
        loop {
            let r = self
                .command_past_ua(
                    lun,
                    &cdb::persistent_reserve_in(service_action, alloc),
                    None,
                    alloc.into(),
                )
                .await?;
            let need = be32(&r.data, 4).map_or(0, |l| u64::from(l) + 8);
            if service_action != prin_sa::REPORT_CAPABILITIES
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
        service_action: u8,
        type_: Option<PrType>,
        params: Vec<u8>,
    ) -> Result<(), InitiatorError> {
        let len = u32::try_from(params.len())
            .map_err(|_| InitiatorError::InvalidRequest("PR OUT parameter list too long".into()))?;
        let c = cdb::persistent_reserve_out(service_action, scope_type(type_), len);
        self.command_past_ua(lun, &c, Some(Bytes::from(params)), 0)
            .await
            .map(|_| ())
    }

    /// READ KEYS: (PRgeneration, registered keys).
    pub async fn read_keys(&self, lun: u64) -> Result<(u32, Vec<u64>), InitiatorError> {
        parse_read_keys(&self.prin(lun, prin_sa::READ_KEYS).await?)
    }

    /// READ RESERVATION: (PRgeneration, the reservation if any).
    pub async fn read_reservation(
        &self,
        lun: u64,
    ) -> Result<(u32, Option<Reservation>), InitiatorError> {
        parse_read_reservation(&self.prin(lun, prin_sa::READ_RESERVATION).await?)
    }

    pub async fn report_capabilities(&self, lun: u64) -> Result<Capabilities, InitiatorError> {
        parse_capabilities(&self.prin(lun, prin_sa::REPORT_CAPABILITIES).await?)
    }

    /// READ FULL STATUS: (PRgeneration, one descriptor per registered I_T nexus).
    pub async fn read_full_status(
        &self,
        lun: u64,
    ) -> Result<(u32, Vec<FullStatus>), InitiatorError> {
        parse_full_status(&self.prin(lun, prin_sa::READ_FULL_STATUS).await?)
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
        self.prout(lun, prout_sa::REGISTER, None, p).await
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
        self.prout(lun, prout_sa::REGISTER_AND_IGNORE, None, p)
            .await
    }

    pub async fn reserve(&self, lun: u64, key: u64, type_: PrType) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, prout_sa::RESERVE, Some(type_), p).await
    }

    pub async fn release(&self, lun: u64, key: u64, type_: PrType) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, prout_sa::RELEASE, Some(type_), p).await
    }

    /// CLEAR: removes every registration and the reservation.
    pub async fn clear(&self, lun: u64, key: u64) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, prout_sa::CLEAR, None, p).await
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
        self.prout(lun, prout_sa::PREEMPT, Some(type_), p).await
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
        self.prout(lun, prout_sa::PREEMPT_AND_ABORT, Some(type_), p)
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
        self.prout(lun, prout_sa::REGISTER_AND_MOVE, Some(type_), p)
            .await
    }

    pub async fn replace_lost_reservation(
        &self,
        lun: u64,
        key: u64,
        type_: PrType,
    ) -> Result<(), InitiatorError> {
        let p = prout_params(key, 0, &RegisterFlags::default());
        self.prout(lun, prout_sa::REPLACE_LOST, Some(type_), p)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_parse_by_name_alias_and_number() {
        for t in PrType::ALL {
            assert_eq!(t.name().parse::<PrType>(), Ok(t));
            assert_eq!(t.short_name().parse::<PrType>(), Ok(t));
            assert_eq!(t.code().to_string().parse::<PrType>(), Ok(t));
            assert_eq!(PrType::from_code(t.code()), Some(t));
        }
        assert_eq!(
            "WE-RO".parse::<PrType>(),
            Ok(PrType::WriteExclusiveRegistrantsOnly)
        );
        assert!("2".parse::<PrType>().is_err());
        assert!("write".parse::<PrType>().is_err());
        assert_eq!(PrType::from_code(0), None);
    }

    #[test]
    fn transport_id_format_00b() {
        let t = TransportId::iscsi_name("iqn.a:b");
        let b = t.encode();
        assert_eq!(b[0], 0x05);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 20); // short names pad to 20
        assert_eq!(&b[4..11], b"iqn.a:b");
        assert!(b[11..].iter().all(|&c| c == 0));
        assert_eq!(TransportId::decode(&b).unwrap(), (t, 24));
    }

    #[test]
    fn transport_id_format_01b() {
        let t = TransportId::iscsi_port("iqn.2026-11.org.holdfast:node-1", [0x80, 1, 2, 3, 4, 5]);
        let b = t.encode();
        let text = b"iqn.2026-11.org.holdfast:node-1,i,0x800102030405";
        assert_eq!(b[0], 0x45);
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        assert_eq!(len % 4, 0);
        assert!(len > text.len());
        assert_eq!(b.len(), 4 + len);
        assert_eq!(&b[4..4 + text.len()], text);
        assert_eq!(b[4 + text.len()], 0);
        assert_eq!(TransportId::decode(&b).unwrap(), (t, 4 + len));
    }

    #[test]
    fn transport_id_decode_rejects_garbage() {
        assert!(TransportId::decode(&[]).is_err());
        assert!(TransportId::decode(&[0x05, 0, 0]).is_err());
        // Fibre Channel, not iSCSI.
        assert!(TransportId::decode(&[0x00, 0, 0, 4, 0, 0, 0, 0]).is_err());
        // Length past the buffer.
        assert!(TransportId::decode(&[0x05, 0, 0, 20, b'i', 0, 0, 0]).is_err());
        // Format 01b without an ISID.
        let mut b = TransportId::iscsi_name("iqn.a:b").encode();
        b[0] = 0x45;
        assert!(TransportId::decode(&b).is_err());
        // Format 10b does not exist for iSCSI.
        b[0] = 0x85;
        assert!(TransportId::decode(&b).is_err());
        // Empty name.
        assert!(TransportId::decode(&[0x05, 0, 0, 4, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn transport_id_text() {
        let t: TransportId = "iqn.x:y,I,0x00023D000001".parse().unwrap();
        assert_eq!(t, TransportId::iscsi_port("iqn.x:y", [0, 2, 0x3d, 0, 0, 1]));
        assert_eq!(t.to_string(), "iqn.x:y,i,0x00023d000001");
        let t: TransportId = "iqn.x:y".parse().unwrap();
        assert_eq!(t.isid, None);
        for bad in [
            "",
            ",i,0x1",
            "iqn.x:y,i,0x",
            "iqn.x:y,i,0x1234567890abc",
            "a b",
        ] {
            assert!(bad.parse::<TransportId>().is_err(), "{bad:?}");
        }
    }

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

    #[test]
    fn isid_text() {
        assert_eq!(parse_isid("0x800000000001"), Some([0x80, 0, 0, 0, 0, 1]));
        assert_eq!(parse_isid("1"), Some([0, 0, 0, 0, 0, 1]));
        assert_eq!(parse_isid("0x"), None);
        assert_eq!(parse_isid("8000000000011"), None);
        assert_eq!(parse_isid("zz"), None);
    }
}
