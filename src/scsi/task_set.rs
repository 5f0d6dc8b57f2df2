//! The task set of one logical unit (SAM-5 §8.6). The control mode page reports
//! TST=000b, so there is one task set per logical unit, shared by every I_T nexus:
//! SIMPLE tasks run concurrently, an ORDERED task waits for every older task and holds
//! back every younger one, HEAD OF QUEUE starts at once. Nothing here runs a command;
//! the transport submits tasks when their data is in and starts those this returns.

use super::{ItNexus, TaskAttr};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Identity the transport gives one live I_T nexus (cheaper to hash than [`ItNexus`],
/// and distinct for a reinstated session).
pub type NexusId = u64;

/// A task: its I_T nexus and its tag (the iSCSI ITT), unique while the task exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub nexus: NexusId,
    pub tag: u64,
}

/// One task in the task set.
#[derive(Debug, Clone)]
pub struct Task {
    pub key: TaskKey,
    pub attr: TaskAttr,
    /// Who to tell when another nexus clears the task (unit attentions).
    pub nexus: Arc<ItNexus>,
}

/// A task a task management function (or a nexus loss) aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortedTask {
    /// The task, by nexus and tag.
    pub key: TaskKey,
    /// Running (enabled) tasks stay in the task set until the transport completes them;
    /// waiting ones are gone and will never start.
    pub running: bool,
}

/// Why a task could not enter the task set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskSetError {
    #[error("task {0:?} is already in the task set (overlapped tag)")]
    Duplicate(TaskKey),
}

/// What removing tasks did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removal {
    /// In (nexus, tag) order.
    pub aborted: Vec<AbortedTask>,
    /// Tasks that may start now that waiting ones are gone (they were held behind them).
    pub started: Vec<TaskKey>,
}

/// The task set of one logical unit (see the module doc).
#[derive(Debug, Default)]
pub struct TaskSet {
    waiting: VecDeque<Task>,
    running: HashMap<TaskKey, Task>,
    running_ordered: usize,
}

impl TaskSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enter a task; returns the tasks (this one among them, if it may) to start now.
    pub fn submit(&mut self, task: Task) -> Result<Vec<TaskKey>, TaskSetError> {
        if self.contains(task.key) {
            return Err(TaskSetError::Duplicate(task.key));
        }
        if task.attr == TaskAttr::HeadOfQueue {
            let key = task.key;
            self.running.insert(key, task);
            return Ok(vec![key]);
        }
        self.waiting.push_back(task);
        Ok(self.start_ready())
    }

    /// A running task ended; returns the tasks that may start now. An unknown key (a
    /// task that never entered) changes nothing.
    pub fn complete(&mut self, key: TaskKey) -> Vec<TaskKey> {
        if let Some(t) = self.running.remove(&key) {
            if t.attr == TaskAttr::Ordered {
                self.running_ordered -= 1;
            }
        }
        self.start_ready()
    }

    /// Abort the tasks `pred` picks: waiting ones leave now, running ones are reported
    /// and stay until completed (they still hold back an ORDERED task behind them).
    pub fn abort_where(&mut self, mut pred: impl FnMut(&Task) -> bool) -> Removal {
        let mut aborted: Vec<AbortedTask> = self
            .running
            .values()
            .filter(|t| pred(t))
            .map(|t| AbortedTask {
                key: t.key,
                running: true,
            })
            .collect();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for t in self.waiting.drain(..) {
            if pred(&t) {
                aborted.push(AbortedTask {
                    key: t.key,
                    running: false,
                });
            } else {
                kept.push_back(t);
            }
        }
        self.waiting = kept;
        // Deterministic order for callers and tests.
        aborted.sort_by_key(|a| (a.key.nexus, a.key.tag));
        Removal {
            aborted,
            started: self.start_ready(),
        }
    }

    /// The task with this key, waiting or running.
    pub fn get(&self, key: TaskKey) -> Option<&Task> {
        self.running
            .get(&key)
            .or_else(|| self.waiting.iter().find(|t| t.key == key))
    }

    /// Every task, running ones first.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.running.values().chain(self.waiting.iter())
    }

    pub fn contains(&self, key: TaskKey) -> bool {
        self.get(key).is_some()
    }

    pub fn is_running(&self, key: TaskKey) -> bool {
        self.running.contains_key(&key)
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// Start waiting tasks in order while the head may run.
    fn start_ready(&mut self) -> Vec<TaskKey> {
        let mut out = Vec::new();
        while let Some(head) = self.waiting.front() {
            let can_start = match head.attr {
                TaskAttr::Ordered => self.running.is_empty(),
                _ => self.running_ordered == 0,
            };
            if !can_start {
                break;
            }
            let Some(t) = self.waiting.pop_front() else {
                break;
            };
            let ordered = t.attr == TaskAttr::Ordered;
            if ordered {
                self.running_ordered += 1;
            }
            out.push(t.key);
            self.running.insert(t.key, t);
            if ordered {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskAttr::*;

    fn nexus(id: NexusId) -> Arc<ItNexus> {
        Arc::new(ItNexus {
            initiator_name: format!("iqn.2026-12.test:i{id}"),
            isid: [0, 0, 0, 0, 0, id as u8],
            target_name: "iqn.2026-12.test:t".into(),
            tpgt: 1,
            relative_port_id: 1,
        })
    }

    fn task(nexus_id: NexusId, tag: u64, attr: TaskAttr) -> Task {
        Task {
            key: key(nexus_id, tag),
            attr,
            nexus: nexus(nexus_id),
        }
    }

    fn key(nexus: NexusId, tag: u64) -> TaskKey {
        TaskKey { nexus, tag }
    }

    fn submit(s: &mut TaskSet, n: NexusId, tag: u64, attr: TaskAttr) -> Vec<TaskKey> {
        s.submit(task(n, tag, attr)).expect("new tag")
    }

    #[test]
    fn simple_tasks_run_concurrently() {
        let mut s = TaskSet::new();
        assert_eq!(submit(&mut s, 1, 1, Simple), [key(1, 1)]);
        assert_eq!(submit(&mut s, 2, 1, Simple), [key(2, 1)]);
        assert_eq!(s.running_count(), 2);
    }

    #[test]
    fn ordered_waits_for_older_and_blocks_younger_of_every_nexus() {
        let mut s = TaskSet::new();
        submit(&mut s, 1, 1, Simple);
        assert!(submit(&mut s, 1, 2, Ordered).is_empty());
        assert!(
            submit(&mut s, 2, 7, Simple).is_empty(),
            "another nexus's simple task waits behind the ordered one too (TST=000b)"
        );
        assert_eq!(s.complete(key(1, 1)), [key(1, 2)]);
        assert_eq!(s.complete(key(1, 2)), [key(2, 7)]);
    }

    #[test]
    fn consecutive_ordered_tasks_run_one_at_a_time() {
        let mut s = TaskSet::new();
        assert_eq!(submit(&mut s, 1, 1, Ordered), [key(1, 1)]);
        assert!(submit(&mut s, 1, 2, Ordered).is_empty());
        assert!(submit(&mut s, 1, 3, Simple).is_empty());
        assert_eq!(s.complete(key(1, 1)), [key(1, 2)]);
        assert_eq!(s.complete(key(1, 2)), [key(1, 3)]);
    }

    #[test]
    fn head_of_queue_starts_at_once_and_an_ordered_task_waits_for_it() {
        let mut s = TaskSet::new();
        submit(&mut s, 1, 1, Ordered);
        submit(&mut s, 1, 2, Ordered);
        assert_eq!(submit(&mut s, 1, 3, HeadOfQueue), [key(1, 3)]);
        assert!(s.complete(key(1, 1)).is_empty(), "the HoQ task still runs");
        assert_eq!(s.complete(key(1, 3)), [key(1, 2)]);
    }

    #[test]
    fn a_reused_tag_is_refused_and_unknown_completions_are_ignored() {
        let mut s = TaskSet::new();
        submit(&mut s, 1, 1, Simple);
        assert_eq!(
            s.submit(task(1, 1, Simple)),
            Err(TaskSetError::Duplicate(key(1, 1)))
        );
        assert!(s.submit(task(2, 1, Simple)).is_ok(), "tags are per nexus");
        assert!(s.complete(key(9, 9)).is_empty());
        assert_eq!(s.running_count(), 2);
    }

    #[test]
    fn aborting_a_waiting_task_releases_what_it_held_back() {
        let mut s = TaskSet::new();
        submit(&mut s, 1, 1, Simple);
        submit(&mut s, 1, 2, Ordered);
        submit(&mut s, 2, 3, Simple);
        let r = s.abort_where(|t| t.key == key(1, 2));
        assert_eq!(
            r.aborted,
            [AbortedTask {
                key: key(1, 2),
                running: false
            }]
        );
        assert_eq!(r.started, [key(2, 3)]);
        assert!(!s.contains(key(1, 2)));
    }

    #[test]
    fn an_aborted_running_task_stays_until_completed() {
        let mut s = TaskSet::new();
        submit(&mut s, 1, 1, Ordered);
        submit(&mut s, 1, 2, Simple);
        let r = s.abort_where(|t| t.key.tag == 1);
        assert!(r.aborted[0].running && r.started.is_empty());
        assert!(s.is_running(key(1, 1)));
        assert_eq!(s.complete(key(1, 1)), [key(1, 2)]);
    }
}
