//! Task management requests, logout, and aborting this connection's tasks: the
//! transport side. The connection maps ITTs to tasks, drops writes still collecting
//! data, and holds a TMF's response until the SCSI core has decided it
//! ([`Event::TaskManagement`], [`TargetConnection::tmf_decided`]) and every task it
//! aborted here has ended (RFC 7143 §4.2.3.3). Which tasks a function aborts is the
//! SCSI core's decision.

use super::pdus::{self, decode_lun};
use super::{Aborted, AfterWait, Blocker, Event, TargetConnection, TaskId, TmfRequest};
use crate::wire::{self, Bhs};
use bytes::Bytes;
use std::time::Instant;
use tracing::{info, warn};

use wire::tmf_function::*;
use wire::tmf_response::*;

impl TargetConnection {
    /// The SCSI core aborted these tasks of this connection (a TMF of this or another
    /// nexus, PREEMPT AND ABORT): those that never started are dropped now, running ones
    /// finish without a response. Returns how many were running.
    pub fn abort_tasks(&mut self, aborted: &[Aborted], now: Instant) -> usize {
        let n = self.mark_aborted(aborted).len();
        self.check_blocker(now);
        n
    }

    /// The SCSI core's answer to the [`TmfRequest`] `itt`: `response` (RFC 7143
    /// §11.6.1) goes out once the tasks it aborted here have ended.
    pub fn tmf_decided(&mut self, itt: u32, response: u8, aborted: &[Aborted], now: Instant) {
        let waits = self.mark_aborted(aborted);
        match self.blocker.as_mut() {
            Some(Blocker {
                waits: w,
                then:
                    AfterWait::Tmf {
                        itt: pending,
                        response: r @ None,
                        ..
                    },
            }) if *pending == itt => {
                *r = Some(response);
                w.extend(waits);
            }
            _ => warn!(itt, "TMF decision for no pending request: ignored"),
        }
        self.check_blocker(now);
    }

    /// The nexus ends: nothing waiting starts, nothing more is answered. The caller waits
    /// until [`Self::running_tasks`] is 0 and takes the nexus's tasks out of the task sets.
    pub fn abort_all(&mut self) {
        self.writes.clear();
        self.abort_own();
        self.blocker = None;
        self.closed = true;
    }

    /// Abort every task of this connection on its own authority (logout, nexus end):
    /// waiting ones are dropped here (the task set completes them when it would start
    /// them: [`Self::start_task`] says there is nothing to run); returns the running ones.
    fn abort_own(&mut self) -> Vec<TaskId> {
        let list: Vec<Aborted> = self
            .waiting
            .keys()
            .map(|&task| Aborted {
                task,
                running: false,
            })
            .chain(self.running.keys().map(|&task| Aborted {
                task,
                running: true,
            }))
            .collect();
        self.mark_aborted(&list)
    }

    /// Drop listed tasks that never started; mark the others aborted and return them.
    fn mark_aborted(&mut self, aborted: &[Aborted]) -> Vec<TaskId> {
        let mut waits = Vec::new();
        for a in aborted {
            if !a.running {
                if let Some(r) = self.waiting.remove(&a.task) {
                    self.forget(r.exec.itt, a.task);
                    self.window.complete();
                }
                continue;
            }
            let itt = match (self.running.get(&a.task), self.waiting.get(&a.task)) {
                (Some(r), _) | (None, Some(r)) => r.exec.itt,
                (None, None) => continue, // ended meanwhile
            };
            if let Some(t) = self.active.get_mut(&itt).filter(|t| t.task_id == a.task) {
                t.aborted = true;
                waits.push(a.task);
            }
        }
        waits
    }

    /// Remove the ITT's entry if it still is this task's.
    fn forget(&mut self, itt: u32, task: TaskId) {
        if self.active.get(&itt).is_some_and(|t| t.task_id == task) {
            self.active.remove(&itt);
        }
    }

    /// Drop pending writes matching `pred` (each frees its CmdSN slot): they never
    /// reached a task set.
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
        if self.cfg.discovery {
            return self.tmf_done(t.itt, function, REJECTED);
        }
        info!(function, lun, "task management request");
        let mut req = TmfRequest {
            itt: t.itt,
            function,
            lun,
            task: None,
        };
        match function {
            ABORT_TASK => {
                let rtt = t.referenced_task_tag;
                if self.writes.remove(&rtt).is_some() {
                    // Still collecting data: it never reached a task set.
                    self.window.complete();
                    return self.tmf_done(t.itt, function, COMPLETE);
                }
                // Already completed (or never seen): RFC 7143 §11.6.1.
                let Some(a) = self.active.get(&rtt) else {
                    return self.tmf_done(t.itt, function, NO_TASK);
                };
                // The task's own LU: the task set that holds it.
                req.lun = a.lun;
                req.task = Some(a.task_id);
            }
            ABORT_TASK_SET | CLEAR_TASK_SET | LOGICAL_UNIT_RESET => {
                if !self.ctx.lun_exists(lun) {
                    return self.tmf_done(t.itt, function, NO_LUN);
                }
                self.drop_writes(|l| l == lun);
            }
            TARGET_WARM_RESET | TARGET_COLD_RESET => self.drop_writes(|_| true),
            CLEAR_ACA => return self.tmf_done(t.itt, function, NOT_SUPPORTED), // no NACA
            TASK_REASSIGN => return self.tmf_done(t.itt, function, NO_REASSIGN), // needs ERL 2
            _ => return self.tmf_done(t.itt, function, REJECTED),
        }
        self.events.push_back(Event::TaskManagement(req));
        self.blocker = Some(Blocker {
            waits: Vec::new(),
            then: AfterWait::Tmf {
                itt: t.itt,
                function,
                response: None,
            },
        });
    }

    pub(super) fn on_logout(&mut self, l: &wire::LogoutRequest) {
        info!(reason = l.reason, "logout");
        if !matches!(l.reason, 0 | 1) {
            // Connection recovery needs ErrorRecoveryLevel 2.
            return self.logout_response(l.itt, 2);
        }
        self.writes.clear();
        let waits = self.abort_own();
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

    /// Decided, and every task it waits for ended (started or not).
    fn blocker_done(&self, b: &Blocker) -> bool {
        let decided = !matches!(b.then, AfterWait::Tmf { response: None, .. });
        decided
            && b.waits
                .iter()
                .all(|t| !self.running.contains_key(t) && !self.waiting.contains_key(t))
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
            AfterWait::Tmf {
                itt,
                function,
                response,
            } => self.tmf_done(itt, function, response.unwrap_or(COMPLETE)),
            AfterWait::Logout { itt } => self.logout_response(itt, 0),
        }
    }

    fn tmf_done(&mut self, itt: u32, function: u8, response: u8) {
        let bhs = Bhs::TaskMgmtResponse(wire::TaskMgmtResponse {
            response,
            itt,
            ..Default::default()
        });
        self.finish_request(bhs, function == TARGET_COLD_RESET && response == COMPLETE);
    }

    fn logout_response(&mut self, itt: u32, response: u8) {
        let bhs = Bhs::LogoutResponse(wire::LogoutResponse {
            response,
            itt,
            ..Default::default()
        });
        self.finish_request(bhs, response == 0);
    }

    /// Sends the response that ends a task management or logout request, frees its
    /// command window slot, and closes the connection when `then_close`.
    fn finish_request(&mut self, bhs: Bhs, then_close: bool) {
        self.send(pdus::pdu(bhs, Bytes::new()));
        self.window.complete();
        if then_close {
            self.close();
        }
    }

    fn close(&mut self) {
        self.closed = true;
        self.events.push_back(Event::Close);
    }
}
