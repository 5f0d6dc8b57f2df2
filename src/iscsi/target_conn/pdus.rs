//! Building the target's PDUs: responses, Data-In, Reject, and SN stamping.

use super::{status, Outcome, Ready};
use crate::iscsi::transfer::{plan_data_in, Residual};
use crate::wire::{self, Bhs, DigestConfig, Pdu, RESERVED_TAG};
use bytes::{Bytes, BytesMut};

pub(super) fn pdu(bhs: Bhs, data: Bytes) -> Pdu {
    Pdu {
        bhs,
        ahs: Vec::new(),
        data,
    }
}

/// Reject `offending`; the data segment carries its header (RFC 7143 §11.17).
pub(super) fn reject(reason: u8, offending: &Pdu) -> Pdu {
    let mut hdr = BytesMut::new();
    wire::encode(
        &Pdu {
            bhs: offending.bhs.clone(),
            ahs: Vec::new(),
            data: Bytes::new(),
        },
        DigestConfig {
            header: false,
            data: false,
        },
        &mut hdr,
    );
    hdr.truncate(wire::BHS_LEN);
    pdu(
        Bhs::Reject(wire::Reject {
            reason,
            ..Default::default()
        }),
        hdr.freeze(),
    )
}

/// Fixed-format sense data (SPC-4 §4.5.3) with only key, ASC and ASCQ.
/// The sense conditions the transport itself reports (RFC 7143 §11.4.7.2, SPC-4 Table
/// 28): key, ASC, ASCQ. The SCSI vocabulary lives in `scsi`, which this layer does not
/// import; these are the iSCSI-specific ones.
pub(super) mod sense {
    pub type Condition = (u8, u8, u8);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (e.g. a command the LUN cannot take here).
    pub const INVALID_FIELD_IN_CDB: Condition = (0x05, 0x24, 0x00);
    /// ABORTED COMMAND, NOT ENOUGH UNSOLICITED DATA.
    pub const NOT_ENOUGH_UNSOLICITED_DATA: Condition = (0x0b, 0x0c, 0x0d);
    /// ABORTED COMMAND, DATA PHASE CRC ERROR DETECTED (a Data-Out digest failed).
    pub const DATA_PHASE_CRC_ERROR: Condition = (0x0b, 0x47, 0x01);
    /// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (a command's data digest failed).
    pub const PROTOCOL_SERVICE_CRC_ERROR: Condition = (0x0b, 0x47, 0x05);
}

pub(super) fn fixed_sense((key, asc, ascq): sense::Condition) -> Bytes {
    let mut b = [0u8; 18];
    b[0] = 0x70;
    b[2] = key & 0x0f;
    b[7] = 10;
    b[12] = asc;
    b[13] = ascq;
    Bytes::copy_from_slice(&b)
}

pub(super) fn scsi_response(
    itt: u32,
    st: u8,
    sense: Option<&Bytes>,
    residual: Residual,
    exp_data_sn: u32,
) -> Pdu {
    let data = match sense {
        Some(s) if !s.is_empty() => {
            let mut d = BytesMut::with_capacity(2 + s.len());
            d.extend_from_slice(&(s.len() as u16).to_be_bytes());
            d.extend_from_slice(s);
            d.freeze()
        }
        _ => Bytes::new(),
    };
    pdu(
        Bhs::ScsiResponse(wire::ScsiResponse {
            overflow: residual.overflow,
            underflow: residual.underflow,
            response: 0,
            status: st,
            itt,
            exp_data_sn,
            residual_count: residual.count,
            ..Default::default()
        }),
        data,
    )
}

/// Data-In PDUs (with status collapse when GOOD) and/or the SCSI Response for a task.
pub(super) fn build_response(
    ready: &Ready,
    outcome: &Outcome,
    max_segment: u32,
    max_burst: u32,
    out: &mut impl Extend<Pdu>,
) {
    let itt = ready.exec.itt;
    if ready.read && !outcome.data_in.is_empty() {
        let full = outcome.data_in.len() as u64;
        let residual = Residual::of(ready.edtl, full);
        let send = outcome
            .data_in
            .slice(..(full.min(ready.edtl as u64) as usize));
        let collapse = outcome.status == status::GOOD && outcome.sense.is_none();
        let segs = plan_data_in(&send, max_segment, max_burst, collapse);
        let n = segs.len() as u32;
        out.extend(segs.into_iter().map(|s| {
            let last = s.with_status;
            pdu(
                Bhs::DataIn(wire::DataIn {
                    final_: s.final_,
                    status_present: last,
                    status: if last { outcome.status } else { 0 },
                    overflow: last && residual.overflow,
                    underflow: last && residual.underflow,
                    residual_count: if last { residual.count } else { 0 },
                    lun: 0,
                    itt,
                    ttt: RESERVED_TAG,
                    data_sn: s.data_sn,
                    buffer_offset: s.offset,
                    ..Default::default()
                }),
                s.data,
            )
        }));
        if !collapse || n == 0 {
            out.extend([scsi_response(
                itt,
                outcome.status,
                outcome.sense.as_ref(),
                residual,
                n,
            )]);
        }
        return;
    }
    let residual = if ready.read {
        Residual::of(ready.edtl, 0)
    } else if ready.edtl > 0 || ready.cdb_out_len > 0 {
        Residual::of(ready.edtl, ready.cdb_out_len as u64)
    } else {
        Residual::default()
    };
    out.extend([scsi_response(
        itt,
        outcome.status,
        outcome.sense.as_ref(),
        residual,
        ready.r2t_count,
    )]);
}

/// Decode the SAM LUN field (peripheral or flat addressing, first level only).
pub fn decode_lun(field: u64) -> Option<u64> {
    let b = field.to_be_bytes();
    match b[0] >> 6 {
        0b00 if b[0] & 0x3f == 0 => Some(b[1] as u64),
        0b01 => Some((((b[0] & 0x3f) as u64) << 8) | b[1] as u64),
        _ => None,
    }
}

pub(super) fn bhs_name(b: &Bhs) -> &'static str {
    match b {
        Bhs::NopIn(_) => "NOP-In",
        Bhs::ScsiResponse(_) => "SCSI Response",
        Bhs::TaskMgmtResponse(_) => "Task Management Response",
        Bhs::LoginResponse(_) => "Login Response",
        Bhs::LoginRequest(_) => "Login Request",
        Bhs::TextResponse(_) => "Text Response",
        Bhs::DataIn(_) => "Data-In",
        Bhs::LogoutResponse(_) => "Logout Response",
        Bhs::R2t(_) => "R2T",
        Bhs::AsyncMessage(_) => "Async Message",
        Bhs::Reject(_) => "Reject",
        _ => "request",
    }
}

/// Fill in StatSN, ExpCmdSN and MaxCmdSN at send time (RFC 7143 §4.2.2.2): responses
/// that consume a StatSN get the next one; others carry the current value.
pub fn stamp(pdu: &mut Pdu, stat_sn: &mut u32, exp: u32, max: u32) {
    macro_rules! consume {
        ($h:expr) => {{
            $h.stat_sn = *stat_sn;
            *stat_sn = stat_sn.wrapping_add(1);
            $h.exp_cmd_sn = exp;
            $h.max_cmd_sn = max;
        }};
    }
    match &mut pdu.bhs {
        Bhs::ScsiResponse(h) => consume!(h),
        Bhs::TaskMgmtResponse(h) => consume!(h),
        Bhs::TextResponse(h) => consume!(h),
        Bhs::LogoutResponse(h) => consume!(h),
        Bhs::AsyncMessage(h) => consume!(h),
        Bhs::Reject(h) => {
            // RFC 7143 §11.17.3: a Reject consumes a StatSN (it is a status-bearing
            // response); initiators accept both.
            consume!(h);
            h.data_sn = 0;
        }
        Bhs::NopIn(h) => {
            h.stat_sn = *stat_sn;
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
            if h.itt != RESERVED_TAG {
                *stat_sn = stat_sn.wrapping_add(1);
            }
        }
        Bhs::DataIn(h) => {
            if h.status_present {
                h.stat_sn = *stat_sn;
                *stat_sn = stat_sn.wrapping_add(1);
            }
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
        }
        Bhs::R2t(h) => {
            h.stat_sn = *stat_sn;
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
        }
        _ => {}
    }
}
