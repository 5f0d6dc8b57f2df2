//! Task management functions (SAM-5 §7) on one logical unit: which tasks each one
//! aborts, its service response, and the unit attentions it leaves behind. The pure
//! decision is [`TaskSet::manage`]; [`LogicalUnit::task_management`] applies it to a LU
//! (its task set, unit attentions, reservation). The transport maps tags to its own
//! tasks, suppresses the aborted tasks' responses and answers the request.

use super::lun::LogicalUnit;
use super::sense::ua;
use super::task_set::{NexusId, Removal, Task, TaskKey, TaskSet, TaskSetError};
use super::ItNexus;
use std::sync::{Arc, PoisonError};

/// A task management function addressed to one logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfFunction {
    /// The requesting nexus's task with this tag.
    AbortTask { tag: u64 },
    /// Every task of the requesting nexus.
    AbortTaskSet,
    /// Every task of every nexus.
    ClearTaskSet,
    /// Every task of every nexus, and the LU's reset (SAM-5 §6.3.3).
    LogicalUnitReset,
    /// Whether the requesting nexus's task with this tag exists; aborts nothing.
    QueryTask { tag: u64 },
}

/// Service response of a task management function (SAM-5 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    /// FUNCTION COMPLETE.
    Complete,
    /// FUNCTION SUCCEEDED (QUERY TASK: the task exists).
    Succeeded,
    /// The referenced task is not in the task set. SAM answers FUNCTION COMPLETE; a
    /// transport that tells the two apart (iSCSI: "task does not exist") can.
    NoSuchTask,
}

/// The unit attention a function establishes (SAM-5 §7, SPC-4 control mode page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TmfUnitAttention {
    None,
    /// COMMANDS CLEARED BY ANOTHER INITIATOR (2Fh/00h) for these nexuses: they lost
    /// tasks to another nexus's CLEAR TASK SET and TAS=0 tells them nothing else.
    CommandsCleared(Vec<Arc<ItNexus>>),
    /// The LU reset: BUS DEVICE RESET FUNCTION OCCURRED (29h/03h) for every nexus.
    Reset,
}

/// What a function decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfDecision {
    pub response: TmfResponse,
    /// Tasks aborted (by nexus and tag) and tasks their removal lets start.
    pub removal: Removal,
    pub unit_attention: TmfUnitAttention,
}

impl TaskSet {
    /// Decide `f`, asked for by nexus `requester`, and remove what it aborts. `tas` is
    /// the control mode page's TAS bit: with TAS=1 the other nexuses hear of their
    /// aborted tasks through TASK ABORTED status instead of a unit attention.
    pub fn manage(&mut self, requester: NexusId, f: TmfFunction, tas: bool) -> TmfDecision {
        let (response, removal, unit_attention) = match f {
            TmfFunction::AbortTask { tag } => {
                let key = TaskKey {
                    nexus: requester,
                    tag,
                };
                if !self.contains(key) {
                    return decision(TmfResponse::NoSuchTask);
                }
                let r = self.abort_where(|t| t.key == key);
                (TmfResponse::Complete, r, TmfUnitAttention::None)
            }
            TmfFunction::QueryTask { tag } => {
                let key = TaskKey {
                    nexus: requester,
                    tag,
                };
                return decision(if self.contains(key) {
                    TmfResponse::Succeeded
                } else {
                    TmfResponse::Complete
                });
            }
            TmfFunction::AbortTaskSet => {
                let r = self.abort_where(|t| t.key.nexus == requester);
                (TmfResponse::Complete, r, TmfUnitAttention::None)
            }
            TmfFunction::ClearTaskSet => {
                let others = self.other_nexuses(requester);
                let r = self.abort_where(|_| true);
                let ua = if tas || others.is_empty() {
                    TmfUnitAttention::None
                } else {
                    TmfUnitAttention::CommandsCleared(others)
                };
                (TmfResponse::Complete, r, ua)
            }
            TmfFunction::LogicalUnitReset => {
                let r = self.abort_where(|_| true);
                (TmfResponse::Complete, r, TmfUnitAttention::Reset)
            }
        };
        TmfDecision {
            response,
            removal,
            unit_attention,
        }
    }

    /// Nexuses other than `requester` with tasks in the set, once each.
    fn other_nexuses(&self, requester: NexusId) -> Vec<Arc<ItNexus>> {
        let mut seen: Vec<(NexusId, Arc<ItNexus>)> = Vec::new();
        let keys = self.tasks().filter(|t| t.key.nexus != requester);
        for t in keys {
            if !seen.iter().any(|(id, _)| *id == t.key.nexus) {
                seen.push((t.key.nexus, t.nexus.clone()));
            }
        }
        seen.sort_by_key(|(id, _)| *id);
        seen.into_iter().map(|(_, n)| n).collect()
    }
}

/// A decision that aborts nothing.
fn decision(response: TmfResponse) -> TmfDecision {
    TmfDecision {
        response,
        removal: Removal::default(),
        unit_attention: TmfUnitAttention::None,
    }
}

impl LogicalUnit {
    fn task_set(&self) -> std::sync::MutexGuard<'_, TaskSet> {
        // The task set is a leaf lock: nothing else is taken while it is held.
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A command is ready to execute: enter it; returns the tasks to start now.
    pub fn submit_task(&self, task: Task) -> Result<Vec<TaskKey>, TaskSetError> {
        self.task_set().submit(task)
    }

    /// A started task ended (executed, or aborted before it ran); returns the tasks to
    /// start now.
    pub fn complete_task(&self, key: TaskKey) -> Vec<TaskKey> {
        self.task_set().complete(key)
    }

    /// Run task management function `f` for nexus `requester`: tasks leave the task set,
    /// unit attentions are established, a LU reset resets the LU.
    pub fn task_management(&self, requester: NexusId, f: TmfFunction) -> TmfDecision {
        let d = self.task_set().manage(requester, f, super::mode::TAS);
        match &d.unit_attention {
            TmfUnitAttention::None => {}
            TmfUnitAttention::CommandsCleared(victims) => {
                let (asc, ascq) = ua::COMMANDS_CLEARED_BY_ANOTHER_INITIATOR;
                let hit = |n: &ItNexus| victims.iter().any(|v| **v == *n);
                self.queue_unit_attention(&hit, asc, ascq);
            }
            TmfUnitAttention::Reset => self.reset(),
        }
        d
    }

    /// Tasks of these nexuses leave the task set (PREEMPT AND ABORT, I_T nexus loss);
    /// no unit attention (the caller establishes what applies).
    pub fn abort_tasks_of(&self, nexuses: &[NexusId]) -> Removal {
        self.task_set()
            .abort_where(|t| nexuses.contains(&t.key.nexus))
    }

    /// Whether the task is still in the task set (waiting, or running until completed).
    pub fn has_task(&self, key: TaskKey) -> bool {
        self.task_set().contains(key)
    }

    /// Waiting and running tasks (diagnostics and tests).
    pub fn task_counts(&self) -> (usize, usize) {
        let s = self.task_set();
        (s.waiting_count(), s.running_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::task_set::AbortedTask;
    use crate::scsi::TaskAttr::{Ordered, Simple};

    fn key(nexus: NexusId, tag: u64) -> TaskKey {
        TaskKey { nexus, tag }
    }

    fn task(nexus_id: NexusId, tag: u64, attr: crate::scsi::TaskAttr) -> Task {
        Task {
            key: key(nexus_id, tag),
            attr,
            nexus: Arc::new(ItNexus {
                initiator_name: format!("iqn.2026-12.test:i{nexus_id}"),
                isid: [0; 6],
                target_name: "iqn.2026-12.test:t".into(),
                tpgt: 1,
                relative_port_id: 1,
            }),
        }
    }

    /// Nexus 1: tag 1 running (ORDERED), tag 2 waiting. Nexus 2: tag 1 waiting.
    fn set() -> TaskSet {
        let mut s = TaskSet::new();
        for t in [task(1, 1, Ordered), task(1, 2, Simple), task(2, 1, Simple)] {
            s.submit(t).unwrap();
        }
        s
    }

    fn aborted(list: &[(NexusId, u64, bool)]) -> Vec<AbortedTask> {
        list.iter()
            .map(|&(n, t, running)| AbortedTask {
                key: key(n, t),
                running,
            })
            .collect()
    }

    #[test]
    fn each_function_aborts_what_sam_says() {
        use TmfFunction::*;
        use TmfResponse::*;
        // (function, requester, response, aborted as (nexus, tag, running))
        type Case = (
            TmfFunction,
            NexusId,
            TmfResponse,
            &'static [(NexusId, u64, bool)],
        );
        let cases: [Case; 9] = [
            (AbortTask { tag: 1 }, 1, Complete, &[(1, 1, true)]),
            (AbortTask { tag: 2 }, 1, Complete, &[(1, 2, false)]),
            (AbortTask { tag: 2 }, 2, NoSuchTask, &[]), // another nexus's tag
            (AbortTask { tag: 9 }, 1, NoSuchTask, &[]),
            (AbortTaskSet, 1, Complete, &[(1, 1, true), (1, 2, false)]),
            (AbortTaskSet, 2, Complete, &[(2, 1, false)]),
            (AbortTaskSet, 3, Complete, &[]),
            (
                ClearTaskSet,
                2,
                Complete,
                &[(1, 1, true), (1, 2, false), (2, 1, false)],
            ),
            (
                LogicalUnitReset,
                3,
                Complete,
                &[(1, 1, true), (1, 2, false), (2, 1, false)],
            ),
        ];
        for (f, requester, response, expect) in cases {
            let mut s = set();
            let d = s.manage(requester, f, false);
            assert_eq!(d.response, response, "{f:?} from {requester}");
            assert_eq!(d.removal.aborted, aborted(expect), "{f:?} from {requester}");
        }
    }

    #[test]
    fn query_task_aborts_nothing() {
        let mut s = set();
        let q = |s: &mut TaskSet, n, tag| s.manage(n, TmfFunction::QueryTask { tag }, false);
        assert_eq!(q(&mut s, 1, 2).response, TmfResponse::Succeeded);
        assert_eq!(q(&mut s, 2, 2).response, TmfResponse::Complete);
        assert_eq!((s.waiting_count(), s.running_count()), (2, 1));
    }

    #[test]
    fn unit_attentions_go_to_the_nexuses_that_lost_tasks() {
        let mut s = set();
        let d = s.manage(2, TmfFunction::ClearTaskSet, false);
        let TmfUnitAttention::CommandsCleared(victims) = d.unit_attention else {
            panic!("{:?}", d.unit_attention)
        };
        let names: Vec<&str> = victims.iter().map(|n| &*n.initiator_name).collect();
        assert_eq!(names, ["iqn.2026-12.test:i1"], "not the requester");
        let d = set().manage(2, TmfFunction::ClearTaskSet, true);
        assert_eq!(d.unit_attention, TmfUnitAttention::None, "TAS=1");
        let d = set().manage(1, TmfFunction::AbortTaskSet, false);
        assert_eq!(d.unit_attention, TmfUnitAttention::None);
        let d = set().manage(1, TmfFunction::LogicalUnitReset, false);
        assert_eq!(d.unit_attention, TmfUnitAttention::Reset);
    }

    #[test]
    fn aborting_another_nexus_set_releases_its_held_tasks() {
        let mut s = set();
        s.submit(task(2, 5, Ordered)).unwrap();
        s.submit(task(3, 1, Simple)).unwrap();
        let d = s.manage(2, TmfFunction::AbortTaskSet, false);
        assert!(d.removal.started.is_empty(), "tag 1 of nexus 1 still runs");
        assert_eq!(s.complete(key(1, 1)), [key(1, 2), key(3, 1)]);
    }
}
