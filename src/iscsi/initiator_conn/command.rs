//! SCSI commands: the command PDU with immediate and unsolicited data, Data-Out for
//! R2Ts, Data-In reassembly, and status with sense and residuals.

use super::{
    CommandResult, CommandState, Event, InitiatorConnection, Itt, Pending, ProtocolError,
    MAX_CDB_LEN,
};
use crate::wire::{self, Ahs, Bhs, Pdu, RESERVED_TAG};
use bytes::{Bytes, BytesMut};

/// One SCSI command to send.
#[derive(Debug, Clone, Default)]
pub struct CommandRequest {
    /// The 8-byte LUN field as it goes on the wire.
    pub lun: u64,
    pub cdb: Bytes,
    /// Data to write (empty for none).
    pub data_out: Bytes,
    /// Expected Data-In length (0 for none).
    pub data_in_len: u32,
}

/// Why a request cannot be sent at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("CDB of {0} bytes")]
    CdbLength(usize),
    #[error("bidirectional commands are not supported")]
    Bidirectional,
    #[error("Data-Out larger than 4 GiB")]
    DataOutTooLong,
    #[error("text request of {len} bytes exceeds the target's segment limit of {max}")]
    TextTooLong { len: usize, max: u32 },
    #[error("the connection is closed")]
    Closed,
}

/// A command accepted for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    pub itt: Itt,
    pub cmd_sn: u32,
}

impl InitiatorConnection {
    /// Queue a SCSI command; it goes out once the CmdSN window admits it, with as much
    /// immediate and unsolicited data as the login allowed.
    pub fn submit_command(&mut self, req: CommandRequest) -> Result<Submitted, SubmitError> {
        if self.closed {
            return Err(SubmitError::Closed);
        }
        if req.cdb.is_empty() || req.cdb.len() > MAX_CDB_LEN {
            return Err(SubmitError::CdbLength(req.cdb.len()));
        }
        if !req.data_out.is_empty() && req.data_in_len > 0 {
            return Err(SubmitError::Bidirectional);
        }
        let out_len = u32::try_from(req.data_out.len()).map_err(|_| SubmitError::DataOutTooLong)?;
        let itt = self.alloc_itt();
        let seq = self.alloc_seq();
        let plan = self.unsolicited(req.data_out.len());
        let cmd_sn = self.send_ordered(|cmd_sn| command_pdus(&req, itt, cmd_sn, out_len, plan));
        self.pending.insert(
            itt,
            Pending::Command(Box::new(CommandState {
                lun: req.lun,
                seq,
                data_out: req.data_out,
                data_in_len: req.data_in_len,
                data_in: BytesMut::new(),
                data_in_end: 0,
            })),
        );
        Ok(Submitted { itt, cmd_sn })
    }

    /// What of `total` Data-Out bytes goes unsolicited (RFC 7143 §13.10–13.14).
    fn unsolicited(&self, total: usize) -> Unsolicited {
        let s = &self.cfg.params.session;
        let mrdsl = self
            .cfg
            .params
            .connection
            .target_max_recv_data_segment_length;
        let first_burst = s.first_burst_length as usize;
        let immediate = if s.immediate_data {
            total.min(first_burst).min(mrdsl as usize)
        } else {
            0
        };
        let end = if s.initial_r2t {
            immediate
        } else {
            total.min(first_burst).max(immediate)
        };
        Unsolicited {
            immediate,
            end,
            mrdsl,
        }
    }

    pub(super) fn on_data_in(&mut self, h: wire::DataIn, data: Bytes) -> Result<(), ProtocolError> {
        if !self.expect(h.itt, "Data-In", is_command)? {
            return Ok(());
        }
        let Some(Pending::Command(t)) = self.pending.get_mut(&h.itt) else {
            return Ok(());
        };
        let off = h.buffer_offset as usize;
        let end = off.saturating_add(data.len());
        if end > t.data_in_len as usize {
            return Err(ProtocolError::DataInOverflow {
                itt: h.itt,
                offset: h.buffer_offset,
                len: data.len(),
                expected: t.data_in_len,
            });
        }
        if t.data_in.len() < t.data_in_len as usize {
            t.data_in.resize(t.data_in_len as usize, 0);
        }
        t.data_in[off..end].copy_from_slice(&data);
        t.data_in_end = t.data_in_end.max(end);
        if h.status_present {
            let residual = residual(h.underflow, h.overflow, h.residual_count);
            self.complete_command(h.itt, 0, h.status, None, residual)?;
        }
        Ok(())
    }

    pub(super) fn on_scsi_response(
        &mut self,
        h: wire::ScsiResponse,
        data: Bytes,
    ) -> Result<(), ProtocolError> {
        // Sense data: a 2-byte SenseLength, then the sense bytes.
        let sense = data.get(..2).and_then(|l| {
            let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
            let end = (2 + len).min(data.len());
            (len > 0).then(|| data.slice(2..end))
        });
        let residual = residual(h.underflow, h.overflow, h.residual_count);
        self.complete_command(h.itt, h.response, h.status, sense, residual)
    }

    fn complete_command(
        &mut self,
        itt: Itt,
        response: u8,
        status: u8,
        sense: Option<Bytes>,
        residual: i64,
    ) -> Result<(), ProtocolError> {
        if !self.expect(itt, "SCSI status", is_command)? {
            return Ok(());
        }
        let Some(Pending::Command(t)) = self.take(itt) else {
            return Ok(());
        };
        let result = if response != 0 {
            Err(super::RequestError::TargetFailure(response))
        } else {
            let mut d = t.data_in;
            d.truncate(t.data_in_end);
            Ok(CommandResult {
                status,
                sense,
                data: d.freeze(),
                residual,
            })
        };
        self.events.push_back(Event::CommandDone { itt, result });
        Ok(())
    }

    /// The target asks for a burst of Data-Out: send it, at most MaxRecvDataSegmentLength
    /// bytes a PDU.
    pub(super) fn on_r2t(&mut self, h: wire::R2t) -> Result<(), ProtocolError> {
        if !self.expect(h.itt, "R2T", is_command)? {
            return Ok(());
        }
        let Some(Pending::Command(t)) = self.pending.get(&h.itt) else {
            return Ok(());
        };
        let off = h.buffer_offset as usize;
        let len = h.desired_data_transfer_length;
        let end = off.saturating_add(len as usize);
        let max_burst = self.cfg.params.session.max_burst_length;
        if len == 0 || end > t.data_out.len() || len > max_burst {
            return Err(ProtocolError::R2tOutsideData {
                itt: h.itt,
                offset: h.buffer_offset,
                len,
            });
        }
        let burst = t.data_out.slice(off..end);
        let mrdsl = self
            .cfg
            .params
            .connection
            .target_max_recv_data_segment_length;
        let pdus = data_outs(h.itt, h.ttt, t.lun, &burst, h.buffer_offset, mrdsl);
        self.transmits.extend(pdus);
        Ok(())
    }
}

fn is_command(p: &Pending) -> bool {
    matches!(p, Pending::Command(_))
}

/// How a command's Data-Out splits: `..immediate` rides in the command PDU,
/// `immediate..end` follows in unsolicited Data-Out, the rest waits for R2Ts.
#[derive(Debug, Clone, Copy)]
struct Unsolicited {
    immediate: usize,
    end: usize,
    mrdsl: u32,
}

/// The command PDU and its unsolicited Data-Out.
fn command_pdus(
    req: &CommandRequest,
    itt: Itt,
    cmd_sn: u32,
    out_len: u32,
    plan: Unsolicited,
) -> Vec<Pdu> {
    let mut cdb16 = [0u8; 16];
    let head = req.cdb.len().min(16);
    cdb16[..head].copy_from_slice(&req.cdb[..head]);
    let ahs = if req.cdb.len() > 16 {
        // Extended CDB AHS: a reserved byte, then the CDB bytes beyond 16.
        let mut a = BytesMut::with_capacity(1 + req.cdb.len() - 16);
        a.extend_from_slice(&[0]);
        a.extend_from_slice(&req.cdb[16..]);
        vec![Ahs {
            ahs_type: 1,
            data: a.freeze(),
        }]
    } else {
        Vec::new()
    };
    let total = req.data_out.len();
    let cmd = Pdu {
        bhs: Bhs::ScsiCommand(wire::ScsiCommand {
            immediate: false,
            final_: plan.end == plan.immediate,
            read: req.data_in_len > 0,
            write: total > 0,
            attr: 1, // SIMPLE
            lun: req.lun,
            itt,
            expected_data_transfer_length: if total > 0 { out_len } else { req.data_in_len },
            cmd_sn,
            exp_stat_sn: 0,
            cdb: cdb16,
        }),
        ahs,
        data: req.data_out.slice(..plan.immediate),
    };
    let mut pdus = vec![cmd];
    if plan.end > plan.immediate {
        pdus.extend(data_outs(
            itt,
            RESERVED_TAG,
            req.lun,
            &req.data_out.slice(plan.immediate..plan.end),
            plan.immediate as u32,
            plan.mrdsl,
        ));
    }
    pdus
}

pub(super) fn residual(underflow: bool, overflow: bool, count: u32) -> i64 {
    if underflow {
        i64::from(count)
    } else if overflow {
        -i64::from(count)
    } else {
        0
    }
}

/// Data-Out PDUs for one burst: `data` starts at `offset`, at most `mrdsl` bytes each,
/// DataSN from 0, F on the last.
pub(super) fn data_outs(
    itt: Itt,
    ttt: u32,
    lun: u64,
    data: &Bytes,
    offset: u32,
    mrdsl: u32,
) -> Vec<Pdu> {
    let seg = mrdsl.max(512) as usize;
    let n = data.len().div_ceil(seg);
    (0..n)
        .map(|i| {
            let start = i * seg;
            let end = (start + seg).min(data.len());
            Pdu::with_data(
                Bhs::DataOut(wire::DataOut {
                    final_: i + 1 == n,
                    lun,
                    itt,
                    ttt,
                    exp_stat_sn: 0,
                    data_sn: i as u32,
                    buffer_offset: offset + start as u32,
                }),
                data.slice(start..end),
            )
        })
        .collect()
}
