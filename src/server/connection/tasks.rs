//! The driver between a connection and the SCSI core's per-LU task sets: commands enter
//! their LU's task set when their data is in and run when it starts them; TMFs are
//! decided by the core ([`LogicalUnit::task_management`]) and carried out here on the
//! connections whose tasks they abort, in this session or another.

use super::Shared;
use crate::iscsi::target_conn::{Aborted, Execute, Submit, TargetConnection, TmfRequest};
use crate::scsi::{
    AbortedTask, LogicalUnit, NexusId, Task, TaskAttr, TaskKey, TmfFunction, TmfResponse,
    TmfUnitAttention,
};
use crate::wire::tmf_function::*;
use crate::wire::tmf_response::{COMPLETE, NO_TASK, REJECTED};
use crate::wire::TaskAttribute;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// What the driver does once the connection's lock is released.
pub(super) enum Work {
    Execute(Execute),
    /// A task set started a task of another session.
    Start(Arc<LogicalUnit>, TaskKey),
    /// A TMF of this session aborted tasks of another one.
    Abort(Arc<LogicalUnit>, NexusId, Vec<AbortedTask>),
    /// A TMF to answer once other sessions' aborted tasks have ended.
    Answer(Deferred),
}

/// A decided TMF whose response waits for running tasks of other sessions it aborted
/// (RFC 7143 §4.2.3.3: the response follows the end of every affected task).
pub(super) struct Deferred {
    itt: u32,
    response: u8,
    own: Vec<Aborted>,
    others: Vec<(Arc<LogicalUnit>, TaskKey)>,
    /// Reset logical units that span gateways: the other gateways reset them too
    /// before the response (`LogicalUnit::announce_reset`).
    announce: Vec<Arc<LogicalUnit>>,
}

/// How often a deferred TMF response looks whether the tasks it waits for ended.
const ANSWER_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// The SAM task attribute of an iSCSI ATTR field (RFC 7143 §11.3.1; untagged and
/// reserved values: SIMPLE).
pub(super) fn task_attr(raw: u8) -> TaskAttr {
    match raw & 7 {
        x if x == TaskAttribute::Ordered as u8 => TaskAttr::Ordered,
        x if x == TaskAttribute::HeadOfQueue as u8 => TaskAttr::HeadOfQueue,
        x if x == TaskAttribute::Aca as u8 => TaskAttr::Aca,
        _ => TaskAttr::Simple,
    }
}

/// The SCSI function of an iSCSI TMF code, with the LUs it addresses.
fn tmf_function(req: &TmfRequest) -> Option<TmfFunction> {
    Some(match req.function {
        ABORT_TASK => TmfFunction::AbortTask {
            tag: req.task.unwrap_or(u64::MAX),
        },
        ABORT_TASK_SET => TmfFunction::AbortTaskSet,
        CLEAR_TASK_SET => TmfFunction::ClearTaskSet,
        // TARGET WARM/COLD RESET: a LU reset of every LU of the session.
        LOGICAL_UNIT_RESET | TARGET_WARM_RESET | TARGET_COLD_RESET => TmfFunction::LogicalUnitReset,
        _ => return None,
    })
}

/// RFC 7143 §11.6.1 response for a SAM service response.
fn response_code(r: TmfResponse) -> u8 {
    match r {
        TmfResponse::Complete | TmfResponse::Succeeded => COMPLETE,
        TmfResponse::NoSuchTask => NO_TASK,
    }
}

impl Shared {
    fn key(&self, task: u64) -> TaskKey {
        TaskKey {
            nexus: self.id,
            tag: task,
        }
    }

    /// A command's data is in: enter it into its LU's task set.
    pub(super) fn submit(&self, conn: &mut TargetConnection, s: Submit, work: &mut Vec<Work>) {
        let Some(lu) = self.ctx.luns.current().get(s.lun).cloned() else {
            // No LU, no task set: the device server answers at once (LUN NOT SUPPORTED).
            conn.start_task(s.task, Instant::now());
            return;
        };
        let task = Task {
            key: self.key(s.task),
            attr: task_attr(s.attr),
            nexus: self.nexus.clone(),
        };
        match lu.submit_task(task) {
            Ok(started) => self.released(conn, &lu, started, work),
            Err(e) => {
                // Task ids are never reused, so this is a bug; run it rather than hang.
                warn!(error = %e, "task set refused a task: running it outside the task set");
                conn.start_task(s.task, Instant::now());
            }
        }
    }

    /// Start what `lu`'s task set released: this session's tasks here (those with
    /// nothing left to run complete at once, which may release more), others' later.
    pub(super) fn released(
        &self,
        conn: &mut TargetConnection,
        lu: &Arc<LogicalUnit>,
        started: Vec<TaskKey>,
        work: &mut Vec<Work>,
    ) {
        let mut queue = std::collections::VecDeque::from(started);
        while let Some(key) = queue.pop_front() {
            if key.nexus != self.id {
                work.push(Work::Start(lu.clone(), key));
            } else if !conn.start_task(key.tag, Instant::now()) {
                queue.extend(lu.complete_task(key));
            }
        }
    }

    /// A command of this session ended: its LU's task set may start others.
    pub(super) fn completed(
        &self,
        conn: &mut TargetConnection,
        lun: u64,
        task: u64,
        work: &mut Vec<Work>,
    ) {
        if let Some(lu) = self.ctx.luns.lu(lun) {
            let started = lu.complete_task(self.key(task));
            self.released(conn, &lu, started, work);
        }
    }

    /// Ask the SCSI core to decide a TMF; abort what it aborted here, and queue what it
    /// aborted in other sessions.
    pub(super) fn decide_tmf(
        &self,
        conn: &mut TargetConnection,
        req: TmfRequest,
        work: &mut Vec<Work>,
    ) {
        let now = Instant::now();
        let Some(f) = tmf_function(&req) else {
            return conn.tmf_decided(req.itt, REJECTED, &[], now);
        };
        let lus: Vec<Arc<LogicalUnit>> = match req.function {
            TARGET_WARM_RESET | TARGET_COLD_RESET => self.ctx.luns.current().units(),
            _ => self
                .ctx
                .luns
                .current()
                .get(req.lun)
                .cloned()
                .into_iter()
                .collect(),
        };
        if lus.is_empty() && req.function == ABORT_TASK {
            // A command on an unmapped LUN ran outside any task set.
            let own = req.task.map(|task| Aborted {
                task,
                running: true,
            });
            return conn.tmf_decided(req.itt, COMPLETE, own.as_slice(), now);
        }
        let mut d = Deferred {
            itt: req.itt,
            response: COMPLETE,
            own: Vec::new(),
            others: Vec::new(),
            announce: Vec::new(),
        };
        for lu in &lus {
            let decision = lu.task_management(self.id, f);
            if matches!(decision.unit_attention, TmfUnitAttention::Reset) && lu.spans_gateways() {
                d.announce.push(lu.clone());
            }
            d.response = response_code(decision.response);
            for (nexus, tasks) in by_nexus(&decision.removal.aborted) {
                if nexus == self.id {
                    d.own.extend(tasks.iter().map(own_task));
                    continue;
                }
                let running = tasks.iter().filter(|a| a.running);
                d.others.extend(running.map(|a| (lu.clone(), a.key)));
                work.push(Work::Abort(lu.clone(), nexus, tasks));
            }
            self.released(conn, lu, decision.removal.started, work);
        }
        info!(
            function = req.function,
            lun = req.lun,
            response = d.response,
            aborted = d.own.len(),
            elsewhere = d.others.len(),
            "task management decided"
        );
        if d.others.is_empty() && d.announce.is_empty() {
            return conn.tmf_decided(d.itt, d.response, &d.own, now);
        }
        // Our own aborted tasks stop answering now; the response waits.
        conn.abort_tasks(&d.own, now);
        work.push(Work::Answer(d));
    }

    /// Answer a deferred TMF once the other gateways have reset too and the other
    /// sessions' tasks it aborted have left their task sets (they complete as their
    /// execution ends).
    fn answer_later(self: &Arc<Self>, d: Deferred) {
        let me = self.clone();
        self.handle.spawn(async move {
            let announce = d.announce.clone();
            // A notify waits for the other gateways' acknowledgements: not on a worker.
            let told = tokio::task::spawn_blocking(move || {
                announce.iter().for_each(|lu| lu.announce_reset())
            });
            if let Err(e) = told.await {
                tracing::error!(error = %e, "announcing a reset to the other gateways failed");
            }
            while d.others.iter().any(|(lu, key)| lu.has_task(*key)) {
                tokio::time::sleep(ANSWER_POLL).await;
            }
            me.with_conn(|_, conn, _| {
                // The own tasks again: the response also waits for those still running.
                conn.tmf_decided(d.itt, d.response, &d.own, Instant::now());
            });
        });
    }

    /// Carry out work queued under the lock: executions, other sessions' starts and
    /// aborts.
    pub(super) fn run(self: &Arc<Self>, work: Vec<Work>) {
        for w in work {
            match w {
                Work::Execute(e) => self.spawn_exec(e),
                Work::Start(lu, key) => start_elsewhere(&self.ctx.rt.nexuses, &lu, key),
                Work::Answer(d) => self.answer_later(d),
                Work::Abort(lu, nexus, tasks) => {
                    // A session that ended meanwhile has nothing left to abort: its
                    // running tasks complete themselves.
                    if let Some(other) = self.ctx.rt.nexuses.get(nexus) {
                        other.abort_tasks(&lu, &tasks);
                    }
                }
            }
        }
    }

    /// Run `f` on the connection, then drain it and do what it asked for.
    fn with_conn(self: &Arc<Self>, f: impl FnOnce(&Self, &mut TargetConnection, &mut Vec<Work>)) {
        let mut work = Vec::new();
        {
            let mut conn = self.conn();
            f(self, &mut conn, &mut work);
            self.drain(&mut conn, &mut work);
        }
        // A blocked TMF or logout may be able to go on.
        self.task_ended.notify_one();
        self.run(work);
    }

    /// The nexus ends: its waiting tasks leave the task sets (what they held back may
    /// start); its running ones complete as they finish.
    pub(super) fn end_nexus(self: &Arc<Self>) {
        self.conn().abort_all();
        for lu in self.ctx.luns.every_lu() {
            let r = lu.abort_tasks_of(&[self.id]);
            for key in r.started {
                start_elsewhere(&self.ctx.rt.nexuses, &lu, key);
            }
        }
    }
}

/// An aborted task of this connection, as the connection knows it (by its own tag).
fn own_task(a: &AbortedTask) -> Aborted {
    Aborted {
        task: a.key.tag,
        running: a.running,
    }
}

/// Group aborted tasks by nexus.
fn by_nexus(aborted: &[AbortedTask]) -> BTreeMap<NexusId, Vec<AbortedTask>> {
    let mut m: BTreeMap<NexusId, Vec<AbortedTask>> = BTreeMap::new();
    for a in aborted {
        m.entry(a.key.nexus).or_default().push(*a);
    }
    m
}

/// Start `key` in its session; a session that is gone has nothing to run, so the task
/// completes at once (and may release more).
fn start_elsewhere(
    dir: &super::super::session::NexusDirectory,
    lu: &Arc<LogicalUnit>,
    key: TaskKey,
) {
    let mut queue = vec![key];
    while let Some(key) = queue.pop() {
        match dir.get(key.nexus) {
            Some(other) => other.start_task(lu, key),
            None => queue.extend(lu.complete_task(key)),
        }
    }
}

impl super::super::session::TaskAborter for Shared {
    fn abort_lun(self: Arc<Self>, lun: u64) {
        let Some(lu) = self.ctx.luns.lu(lun) else {
            return;
        };
        self.with_conn(|me, conn, work| {
            let r = lu.abort_tasks_of(&[me.id]);
            let tasks: Vec<Aborted> = r.aborted.iter().map(own_task).collect();
            let n = conn.abort_tasks(&tasks, Instant::now());
            me.released(conn, &lu, r.started, work);
            if n > 0 {
                info!(initiator = %me.nexus.initiator_name, isid = %hex::encode(me.nexus.isid), lun, running = n, "tasks aborted by PREEMPT AND ABORT");
            }
        });
    }

    fn abort_tasks(self: Arc<Self>, _lu: &Arc<LogicalUnit>, tasks: &[AbortedTask]) {
        let tasks: Vec<Aborted> = tasks.iter().map(own_task).collect();
        self.with_conn(|_, conn, _| {
            conn.abort_tasks(&tasks, Instant::now());
        });
    }

    fn start_task(self: Arc<Self>, lu: &Arc<LogicalUnit>, key: TaskKey) {
        self.with_conn(|me, conn, work| me.released(conn, lu, vec![key], work));
    }
}
