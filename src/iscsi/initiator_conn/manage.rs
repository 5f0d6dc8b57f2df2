//! Everything but SCSI commands: NOP both ways, task management, Text, logout, Reject
//! and asynchronous messages.

use super::command::SubmitError;
use super::{tmf, Event, InitiatorConnection, Itt, Pending, ProtocolError, RequestError};
use crate::wire::{self, Bhs, Pdu, RESERVED_TAG};
use bytes::{Bytes, BytesMut};
use std::time::Instant;
use tracing::{debug, info, warn};

impl InitiatorConnection {
    /// NOP-Out ping (immediate); [`Event::NopDone`] reports the round-trip time.
    pub fn ping(&mut self, now: Instant) -> Result<Itt, SubmitError> {
        if self.closed {
            return Err(SubmitError::Closed);
        }
        Ok(self.send_nop(now, false))
    }

    pub(super) fn send_nop(&mut self, now: Instant, keepalive: bool) -> Itt {
        let itt = self.alloc_itt();
        self.pending.insert(
            itt,
            Pending::Nop {
                sent: now,
                keepalive,
            },
        );
        self.transmits.push_back(Pdu::new(Bhs::NopOut(wire::NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.immediate_cmd_sn(),
            exp_stat_sn: 0,
        })));
        itt
    }

    /// A task management function (immediate). `lun` is the wire LUN field;
    /// `referenced`/`ref_cmd_sn` name the task for ABORT TASK (else RESERVED_TAG / 0).
    /// On "function complete" the commands it covered end with [`RequestError::Aborted`]
    /// (the target suppresses their status).
    pub fn task_management(
        &mut self,
        function: u8,
        lun: u64,
        referenced: Itt,
        ref_cmd_sn: u32,
    ) -> Result<Itt, SubmitError> {
        if self.closed {
            return Err(SubmitError::Closed);
        }
        let itt = self.alloc_itt();
        let seq = self.alloc_seq();
        self.pending.insert(
            itt,
            Pending::Tmf {
                function,
                lun,
                referenced,
                seq,
            },
        );
        self.transmits
            .push_back(Pdu::new(Bhs::TaskMgmtRequest(wire::TaskMgmtRequest {
                immediate: true,
                function,
                lun,
                itt,
                referenced_task_tag: referenced,
                cmd_sn: self.immediate_cmd_sn(),
                exp_stat_sn: 0,
                ref_cmd_sn,
                exp_data_sn: 0,
            })));
        Ok(itt)
    }

    /// A Text request (ordered) with `body` as its key=value bytes; a long answer is
    /// collected across Text Responses and reported whole in [`Event::TextDone`].
    pub fn text(&mut self, body: Bytes) -> Result<Itt, SubmitError> {
        if self.closed {
            return Err(SubmitError::Closed);
        }
        let max = self
            .cfg
            .params
            .connection
            .target_max_recv_data_segment_length;
        if body.len() > max as usize {
            return Err(SubmitError::TextTooLong {
                len: body.len(),
                max,
            });
        }
        let itt = self.alloc_itt();
        self.pending.insert(
            itt,
            Pending::Text {
                acc: BytesMut::new(),
            },
        );
        self.send_text_request(itt, RESERVED_TAG, body);
        Ok(itt)
    }

    fn send_text_request(&mut self, itt: Itt, ttt: u32, body: Bytes) {
        self.send_ordered(|cmd_sn| {
            vec![Pdu::with_data(
                Bhs::TextRequest(wire::TextRequest {
                    immediate: false,
                    final_: true,
                    continue_: false,
                    lun: 0,
                    itt,
                    ttt,
                    cmd_sn,
                    exp_stat_sn: 0,
                }),
                body,
            )]
        });
    }

    /// Close the session (immediate Logout, reason 0) once the outstanding SCSI
    /// commands have finished.
    pub fn logout(&mut self) -> Result<Itt, SubmitError> {
        if self.closed {
            return Err(SubmitError::Closed);
        }
        let itt = self.alloc_itt();
        self.pending.insert(itt, Pending::Logout);
        // Its CmdSN is stamped when it leaves (see maybe_send_logout).
        self.deferred_logout = Some(Pdu::new(Bhs::LogoutRequest(wire::LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
        })));
        self.maybe_send_logout();
        Ok(itt)
    }

    /// Send a deferred logout once no SCSI command is outstanding.
    pub(super) fn maybe_send_logout(&mut self) {
        if self.deferred_logout.is_none() || self.commands_outstanding() > 0 {
            return;
        }
        if let Some(mut p) = self.deferred_logout.take() {
            if let Bhs::LogoutRequest(l) = &mut p.bhs {
                l.cmd_sn = self.immediate_cmd_sn();
            }
            self.transmits.push_back(p);
        }
    }

    pub(super) fn on_nop_in(
        &mut self,
        h: wire::NopIn,
        data: Bytes,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if h.itt == RESERVED_TAG {
            if h.ttt != RESERVED_TAG {
                // A target ping: answer at once, immediate, echoing its tag and data.
                let max = self
                    .cfg
                    .params
                    .connection
                    .target_max_recv_data_segment_length;
                let echo = data.slice(..data.len().min(max as usize));
                let cmd_sn = self.immediate_cmd_sn();
                self.transmits.push_back(Pdu::with_data(
                    Bhs::NopOut(wire::NopOut {
                        immediate: true,
                        lun: h.lun,
                        itt: RESERVED_TAG,
                        ttt: h.ttt,
                        cmd_sn,
                        exp_stat_sn: 0,
                    }),
                    echo,
                ));
            }
            return Ok(());
        }
        if !self.expect(h.itt, "NOP-In", |p| matches!(p, Pending::Nop { .. }))? {
            return Ok(());
        }
        if let Some(Pending::Nop { sent, keepalive }) = self.take(h.itt) {
            if keepalive {
                self.keepalive = None;
            } else {
                let rtt = now.saturating_duration_since(sent);
                self.events.push_back(Event::NopDone {
                    itt: h.itt,
                    result: Ok(rtt),
                });
            }
        }
        Ok(())
    }

    pub(super) fn on_tmf_response(
        &mut self,
        h: wire::TaskMgmtResponse,
    ) -> Result<(), ProtocolError> {
        let what = "Task Management Response";
        if !self.expect(h.itt, what, |p| matches!(p, Pending::Tmf { .. }))? {
            return Ok(());
        }
        let Some(Pending::Tmf {
            function,
            lun,
            referenced,
            seq,
        }) = self.pending.remove(&h.itt)
        else {
            return Ok(());
        };
        if h.response == crate::wire::tmf_response::COMPLETE {
            self.abort_covered(function, lun, referenced, seq);
        }
        info!(function, lun, response = h.response, "task management done");
        self.events.push_back(Event::TmfDone {
            itt: h.itt,
            result: Ok(h.response),
        });
        self.maybe_send_logout();
        Ok(())
    }

    /// A TMF completed: the commands it covered (submitted before it) end as aborted.
    fn abort_covered(&mut self, function: u8, lun: u64, referenced: Itt, seq: u64) {
        let mut itts: Vec<Itt> = self
            .pending
            .iter()
            .filter(|(itt, p)| match p {
                Pending::Command(t) => match function {
                    tmf::ABORT_TASK => **itt == referenced,
                    tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                        t.lun == lun && t.seq < seq
                    }
                    tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => t.seq < seq,
                    _ => false,
                },
                _ => false,
            })
            .map(|(itt, _)| *itt)
            .collect();
        itts.sort_unstable();
        if !itts.is_empty() {
            debug!(
                function,
                count = itts.len(),
                "tasks aborted by task management"
            );
        }
        for itt in itts {
            if let Some(p) = self.pending.remove(&itt) {
                self.retire(itt);
                self.fail(itt, p, RequestError::Aborted);
            }
        }
    }

    pub(super) fn on_text_response(
        &mut self,
        h: wire::TextResponse,
        data: Bytes,
    ) -> Result<(), ProtocolError> {
        if !self.expect(h.itt, "Text Response", |p| {
            matches!(p, Pending::Text { .. })
        })? {
            return Ok(());
        }
        let Some(Pending::Text { acc }) = self.pending.get_mut(&h.itt) else {
            return Ok(());
        };
        acc.extend_from_slice(&data);
        if h.continue_ || !h.final_ {
            // Ask for the rest with the target's transfer tag.
            self.send_text_request(h.itt, h.ttt, Bytes::new());
            return Ok(());
        }
        if let Some(Pending::Text { acc }) = self.take(h.itt) {
            self.events.push_back(Event::TextDone {
                itt: h.itt,
                result: Ok(acc.freeze()),
            });
        }
        Ok(())
    }

    pub(super) fn on_logout_response(
        &mut self,
        h: wire::LogoutResponse,
    ) -> Result<(), ProtocolError> {
        if !self.expect(h.itt, "Logout Response", |p| matches!(p, Pending::Logout))? {
            return Ok(());
        }
        self.pending.remove(&h.itt);
        if h.response != 0 {
            self.events.push_back(Event::LogoutDone {
                itt: h.itt,
                result: Err(RequestError::LogoutRefused(h.response)),
            });
            return Ok(());
        }
        self.events.push_back(Event::LogoutDone {
            itt: h.itt,
            result: Ok(()),
        });
        // The target closes the connection after a successful logout.
        self.close(None);
        Ok(())
    }

    /// The data segment is the rejected PDU's header; its ITT names the request.
    pub(super) fn on_reject(&mut self, reason: u8, data: &Bytes) {
        let itt = data
            .get(16..20)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        warn!(reason, ?itt, "target rejected a PDU");
        if let Some(itt) = itt {
            if let Some(p) = self.take(itt) {
                self.fail(itt, p, RequestError::Rejected { reason });
            }
        }
    }
}

pub(super) fn log_async(h: &wire::AsyncMessage, data: &Bytes) {
    match h.async_event {
        0 => {
            info!(lun = h.lun, sense = %hex::encode(data), "target reports a SCSI asynchronous event")
        }
        1 => warn!("target requests logout"),
        2 | 3 => warn!(event = h.async_event, "target will drop the connection"),
        4 => info!("target requests parameter renegotiation (ignored)"),
        e => debug!(event = e, "async message"),
    }
}
