//! Task management requests, logout, and aborting this connection's tasks.
//!
//! The connection finds tasks by tag (or LUN) and keeps their responses from going out;
//! what a reset means for a logical unit is the caller's ([`Event::ResetLun`]).

use super::pdus::{self, decode_lun};
use super::{AfterWait, Blocker, Event, TargetConnection};
use crate::iscsi::task_set::TaskId;
use crate::wire::{self, Bhs};
use bytes::Bytes;
use std::time::Instant;
use tracing::info;

/// Task management function response codes (RFC 7143 §11.6.1).
pub mod tmf_response {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NO_REASSIGN: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}
use tmf_response::*;

impl TargetConnection {
    /// PREEMPT AND ABORT reached this nexus: tasks on `lun` waiting in the task set are
    /// dropped, running ones finish without a response. Returns how many were running.
    pub fn abort_lun(&mut self, lun: u64, now: Instant) -> usize {
        let n = self.abort_tasks(|l| l == lun).len();
        self.check_blocker(now);
        n
    }

    /// The nexus ends: nothing queued starts, nothing more is answered. The caller waits
    /// until [`Self::running_tasks`] is 0.
    pub fn abort_all(&mut self) {
        self.writes.clear();
        self.abort_tasks(|_| true);
        self.blocker = None;
        self.closed = true;
    }

    /// Mark matching tasks aborted: waiting ones are dropped now; returns the running
    /// ones, whose outcomes will be suppressed.
    fn abort_tasks(&mut self, mut pred: impl FnMut(u64) -> bool) -> Vec<TaskId> {
        for (_, r) in self.tasks.remove_waiting(|r| pred(r.exec.lun)) {
            self.active.remove(&r.exec.itt);
            self.window.complete();
        }
        let mut waits = Vec::new();
        for t in self.active.values_mut() {
            if pred(t.lun) {
                t.aborted = true;
                waits.push(t.task_id);
            }
        }
        waits
    }

    /// Drop pending writes matching `pred` (each frees its CmdSN slot).
    fn drop_writes(&mut self, mut pred: impl FnMut(u64) -> bool) {
        let itts: Vec<u32> = self
            .writes
            .iter()
            .filter(|(_, w)| pred(w.ready.exec.lun))
            .map(|(i, _)| *i)
            .collect();
        for i in itts {
            self.writes.remove(&i);
            self.window.complete();
        }
    }

    pub(super) fn on_tmf(&mut self, t: &wire::TaskMgmtRequest) {
        let function = t.function & 0x7f;
        let lun = decode_lun(t.lun).unwrap_or(u64::MAX);
        let then = AfterWait::Tmf {
            itt: t.itt,
            function,
            lun,
        };
        if self.cfg.discovery {
            return self.tmf_done(t.itt, function, REJECTED);
        }
        info!(function, lun, "task management request");
        let waits = match function {
            1 => match self.abort_task(t.referenced_task_tag) {
                Ok(waits) => waits,
                Err(resp) => return self.tmf_done(t.itt, function, resp),
            },
            2 | 4 | 5 => {
                // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
                if !self.ctx.lun_exists(lun) {
                    return self.tmf_done(t.itt, function, NO_LUN);
                }
                self.drop_writes(|l| l == lun);
                self.abort_tasks(|l| l == lun)
            }
            6 | 7 => {
                // TARGET WARM / COLD RESET
                self.drop_writes(|_| true);
                self.abort_tasks(|_| true)
            }
            3 => return self.tmf_done(t.itt, function, NOT_SUPPORTED), // no NACA
            8 => return self.tmf_done(t.itt, function, NO_REASSIGN),   // needs ERL 2
            _ => return self.tmf_done(t.itt, function, REJECTED),
        };
        self.wait_then(waits, then);
    }

    /// ABORT TASK: Ok with the running task to wait for (none if it was dropped now),
    /// Err with the response when there is nothing to wait for.
    fn abort_task(&mut self, rtt: u32) -> Result<Vec<TaskId>, u8> {
        if self.writes.remove(&rtt).is_some() {
            self.window.complete();
            return Err(COMPLETE);
        }
        let removed = self.tasks.remove_waiting(|r| r.exec.itt == rtt);
        if !removed.is_empty() {
            self.active.remove(&rtt);
            self.window.complete();
            return Err(COMPLETE);
        }
        match self.active.get_mut(&rtt) {
            Some(a) => {
                a.aborted = true;
                Ok(vec![a.task_id])
            }
            // Already completed (or never seen): RFC 7143 §11.6.1.
            None => Err(NO_TASK),
        }
    }

    pub(super) fn on_logout(&mut self, l: &wire::LogoutRequest) {
        info!(reason = l.reason, "logout");
        if !matches!(l.reason, 0 | 1) {
            // Connection recovery needs ErrorRecoveryLevel 2.
            return self.logout_response(l.itt, 2);
        }
        self.writes.clear();
        let waits = self.abort_tasks(|_| true);
        self.wait_then(waits, AfterWait::Logout { itt: l.itt });
    }

    fn wait_then(&mut self, waits: Vec<TaskId>, then: AfterWait) {
        let blocker = Blocker { waits, then };
        if self.blocker_done(&blocker) {
            self.finish_wait(blocker.then);
        } else {
            self.blocker = Some(blocker);
        }
    }

    fn blocker_done(&self, b: &Blocker) -> bool {
        b.waits.iter().all(|t| !self.running.contains_key(t))
    }

    /// Finish a TMF or logout whose tasks have ended, then go on reading.
    pub(super) fn check_blocker(&mut self, now: Instant) {
        let Some(b) = self.blocker.take() else {
            return;
        };
        if !self.blocker_done(&b) {
            self.blocker = Some(b);
            return;
        }
        self.finish_wait(b.then);
        self.resume(now);
    }

    fn finish_wait(&mut self, then: AfterWait) {
        match then {
            AfterWait::Tmf { itt, function, lun } => {
                match function {
                    5 => self.events.push_back(Event::ResetLun(lun)),
                    6 | 7 => self.events.push_back(Event::ResetTarget),
                    _ => {}
                }
                self.tmf_done(itt, function, COMPLETE);
            }
            AfterWait::Logout { itt } => self.logout_response(itt, 0),
        }
    }

    fn tmf_done(&mut self, itt: u32, function: u8, response: u8) {
        self.send(pdus::pdu(
            Bhs::TaskMgmtResponse(wire::TaskMgmtResponse {
                response,
                itt,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        self.window.complete();
        if function == 7 && response == COMPLETE {
            self.close();
        }
    }

    fn logout_response(&mut self, itt: u32, response: u8) {
        self.send(pdus::pdu(
            Bhs::LogoutResponse(wire::LogoutResponse {
                response,
                itt,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        self.window.complete();
        if response == 0 {
            self.close();
        }
    }

    fn close(&mut self) {
        self.closed = true;
        self.events.push_back(Event::Close);
    }
}
