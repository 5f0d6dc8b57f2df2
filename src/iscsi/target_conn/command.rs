//! SCSI Command intake, R2T/Data-Out collection, submitting and starting tasks, and
//! responses.

use super::pdus::{self, decode_lun, fixed_sense, scsi_response, sense};
use super::{
    status, ActiveTask, Delivery, Event, Execute, Outcome, PendingWrite, Ready, Submit,
    TargetConnection, TaskId,
};
use crate::iscsi::transfer::{Residual, WriteTransfer};
use crate::wire::{self, reject_reason, Bhs, Pdu, RESERVED_TAG};
use bytes::{Bytes, BytesMut};
use std::time::Instant;
use tracing::{debug, warn};

impl TargetConnection {
    /// A command finished (`task` from [`Event::Execute`]): queue its response unless it
    /// was aborted meanwhile. The caller completes the task in its LU's task set.
    pub fn handle_outcome(&mut self, task: TaskId, outcome: Outcome, now: Instant) -> Delivery {
        let Some(mut ready) = self.running.remove(&task) else {
            return Delivery::Suppressed;
        };
        let itt = ready.exec.itt;
        let aborted = match self.active.get(&itt) {
            Some(e) if e.task_id == task => {
                let aborted = e.aborted;
                self.active.remove(&itt);
                aborted
            }
            // The ITT went to another task meanwhile (this one was dropped).
            _ => true,
        };
        self.window.complete();
        if !aborted {
            let (seg, burst) = (self.cfg.max_send_segment, self.cfg.max_burst);
            pdus::build_response(&ready, &outcome, seg, burst, &mut self.transmits);
            if let Some(h) = ready.hold.take() {
                // Data-In leaves by reference, so its budget returns once the writer
                // has sent it; nothing refers to any other buffer now, and its budget
                // comes back before the status can reach the initiator.
                if outcome.data_in.is_empty() {
                    drop(h);
                } else {
                    self.events.push_back(Event::Release(h));
                }
            }
        } else {
            debug!(itt, "task aborted: response suppressed");
        }
        self.check_blocker(now);
        if aborted {
            Delivery::Suppressed
        } else {
            Delivery::Sent
        }
    }

    pub(super) fn on_scsi_command(
        &mut self,
        c: wire::ScsiCommand,
        ahs: Vec<wire::Ahs>,
        data: Bytes,
    ) {
        if let Some(reason) = self.refuse_command(&c) {
            self.send(pdus::reject(
                reason,
                &pdus::pdu(Bhs::ScsiCommand(c), Bytes::new()),
            ));
            self.window.complete();
            return;
        }
        let edtl = c.expected_data_transfer_length;
        if u64::from(edtl) > self.cfg.max_command_bytes {
            warn!(
                itt = c.itt,
                edtl,
                max = self.cfg.max_command_bytes,
                "expected data transfer length beyond limits.max_command_bytes: failing the command"
            );
            return self.fail_command(
                c.itt,
                status::CHECK_CONDITION,
                Some(sense::INVALID_FIELD_IN_CDB),
            );
        }
        // Buffers are charged before anything is allocated, so announced-but-never-sent
        // writes cannot pin more than the budget.
        let Some(hold) = self.ctx.reserve_buffer(edtl) else {
            // SAM-5: TASK SET FULL when this nexus has other commands in the task set,
            // BUSY when it has none; initiators retry either.
            let st = if self.window.outstanding() > 1 {
                status::TASK_SET_FULL
            } else {
                status::BUSY
            };
            debug!(
                itt = c.itt,
                edtl,
                status = st,
                "buffer budget exhausted: command refused"
            );
            return self.fail_command(c.itt, st, None);
        };
        // Extended CDB AHS (type 1): the CDB continues past the 16 bytes of the BHS.
        let mut cdb = BytesMut::from(&c.cdb[..]);
        if let Some(ext) = ahs.iter().find(|a| a.ahs_type == 1) {
            cdb.extend_from_slice(ext.data.get(1..).unwrap_or_default());
        }
        let cdb = cdb.freeze();
        let lun = decode_lun(c.lun).unwrap_or(u64::MAX);
        let cdb_out_len = if c.write {
            self.ctx.data_out_length(lun, &cdb)
        } else {
            0
        };
        let ready = Ready {
            exec: Execute {
                task: 0,
                itt: c.itt,
                lun,
                cdb,
                attr: c.attr,
                data_out: Bytes::new(),
                data_in_len: if c.read { edtl } else { 0 },
                data_out_len: if c.write { edtl } else { 0 },
            },
            read: c.read,
            edtl,
            cdb_out_len,
            r2t_count: 0,
            hold: Some(hold),
        };
        if !c.write || edtl == 0 {
            if !data.is_empty() && !c.write {
                warn!(
                    itt = c.itt,
                    "data segment on a command without the W bit: ignored"
                );
            }
            return self.submit(ready);
        }
        self.start_transfer(c, ready, &data);
    }

    /// Why a SCSI command is rejected outright, if it is.
    fn refuse_command(&self, c: &wire::ScsiCommand) -> Option<u8> {
        if self.cfg.discovery {
            warn!("SCSI command in a discovery session: rejecting");
            return Some(reject_reason::PROTOCOL_ERROR);
        }
        let duplicate = self.writes.contains_key(&c.itt) || self.active.contains_key(&c.itt);
        if duplicate || c.itt == RESERVED_TAG {
            warn!(
                itt = c.itt,
                "SCSI command reuses an active task tag: rejecting"
            );
            return Some(reject_reason::TASK_IN_PROGRESS);
        }
        None
    }

    /// A write: take its immediate data, ask for the rest.
    fn start_transfer(&mut self, c: wire::ScsiCommand, ready: Ready, data: &Bytes) {
        let ttt_base = self.alloc_ttt().wrapping_mul(0x1_0000) & 0x7fff_ffff;
        match WriteTransfer::from_immediate(
            c.expected_data_transfer_length,
            ready.cdb_out_len,
            data,
            c.final_,
            self.cfg.write_limits,
            ttt_base,
        ) {
            Ok(t) => self.advance_write(c.itt, PendingWrite { transfer: t, ready }),
            Err(e) => {
                warn!(itt = c.itt, error = %e, "bad immediate/unsolicited data: failing the command");
                self.send(scsi_response(
                    c.itt,
                    status::CHECK_CONDITION,
                    Some(&fixed_sense(sense::NOT_ENOUGH_UNSOLICITED_DATA)),
                    Residual::default(),
                    0,
                ));
                self.window.complete();
            }
        }
    }

    /// Asks for the data the write still lacks, and starts it once all is there
    /// (otherwise it waits under `itt` for more Data-Out).
    fn advance_write(&mut self, itt: u32, mut w: PendingWrite) {
        self.send_r2ts(&mut w);
        if w.transfer.is_complete() {
            self.start_write(w);
        } else {
            self.writes.insert(itt, w);
        }
    }

    fn send_r2ts(&mut self, w: &mut PendingWrite) {
        for r in w.transfer.next_r2ts() {
            self.send(pdus::pdu(
                Bhs::R2t(wire::R2t {
                    lun: 0,
                    itt: w.ready.exec.itt,
                    ttt: r.ttt,
                    r2t_sn: r.r2t_sn,
                    buffer_offset: r.offset,
                    desired_data_transfer_length: r.length,
                    ..Default::default()
                }),
                Bytes::new(),
            ));
        }
    }

    fn start_write(&mut self, w: PendingWrite) {
        let PendingWrite {
            transfer,
            mut ready,
        } = w;
        ready.r2t_count = transfer.r2t_count();
        ready.exec.data_out = transfer.into_data();
        self.submit(ready);
    }

    /// A command's data is in: hand it to its LU's task set ([`Event::Submit`]).
    fn submit(&mut self, mut ready: Ready) {
        let task_id = self.next_task;
        self.next_task += 1;
        ready.exec.task = task_id;
        let (itt, lun, attr) = (ready.exec.itt, ready.exec.lun, ready.exec.attr);
        self.active.insert(
            itt,
            ActiveTask {
                lun,
                task_id,
                aborted: false,
            },
        );
        self.waiting.insert(task_id, ready);
        self.events.push_back(Event::Submit(Submit {
            task: task_id,
            lun,
            attr,
        }));
    }

    /// The task set started `task`: execute it ([`Event::Execute`]). False when there is
    /// nothing to execute (the task was aborted, or is unknown): the caller completes it
    /// in the task set at once.
    pub fn start_task(&mut self, task: TaskId, now: Instant) -> bool {
        let Some(mut r) = self.waiting.remove(&task) else {
            return false;
        };
        let itt = r.exec.itt;
        let live = self
            .active
            .get(&itt)
            .is_some_and(|a| !a.aborted && a.task_id == task);
        if !live {
            // Aborted while it waited: it ends here, without a response.
            if self.active.get(&itt).is_some_and(|a| a.task_id == task) {
                self.active.remove(&itt);
            }
            self.window.complete();
            self.check_blocker(now);
            return false;
        }
        self.events.push_back(Event::Execute(r.exec.clone()));
        // The Data-Out now belongs to the execution.
        r.exec.data_out = Bytes::new();
        self.running.insert(task, r);
        true
    }

    /// Answer a command that never started with `st` (and sense) and free its slot.
    pub(super) fn fail_command(&mut self, itt: u32, st: u8, sense: Option<sense::Condition>) {
        let sense = sense.map(fixed_sense);
        self.send(scsi_response(
            itt,
            st,
            sense.as_ref(),
            Residual::default(),
            0,
        ));
        self.window.complete();
    }

    pub(super) fn fail_write(&mut self, w: PendingWrite, condition: sense::Condition) {
        self.send(scsi_response(
            w.ready.exec.itt,
            status::CHECK_CONDITION,
            Some(&fixed_sense(condition)),
            Residual::default(),
            w.transfer.r2t_count(),
        ));
        self.window.complete();
    }

    pub(super) fn on_data_out(&mut self, p: Pdu) {
        let Bhs::DataOut(d) = &p.bhs else { return };
        let Some(mut w) = self.writes.remove(&d.itt) else {
            warn!(itt = d.itt, "Data-Out for an unknown task: rejecting");
            return self.send(pdus::reject(reject_reason::PROTOCOL_ERROR, &p));
        };
        match w
            .transfer
            .on_data_out(d.ttt, d.data_sn, d.buffer_offset, &p.data, d.final_)
        {
            Ok(()) => self.advance_write(d.itt, w),
            Err(e) => {
                // ERL 0 cannot recover a data sequence: reject the PDU, fail the task.
                warn!(itt = d.itt, error = %e, "invalid Data-Out: rejecting and failing the command");
                self.send(pdus::reject(reject_reason::PROTOCOL_ERROR, &p));
                self.fail_write(w, sense::NOT_ENOUGH_UNSOLICITED_DATA);
            }
        }
    }
}
