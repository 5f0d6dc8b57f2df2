//! SAM task set ordering for one I_T nexus: SIMPLE tasks run concurrently, an ORDERED
//! task runs alone after everything before it, HEAD OF QUEUE runs at once.

/// SAM task attribute as the transport carries it (iSCSI ATTR field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

impl TaskAttr {
    /// Decode the 3-bit ATTR field of a SCSI Command PDU (untagged and unknown: simple).
    pub fn from_raw(raw: u8) -> Self {
        match raw & 7 {
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        }
    }
}
use std::collections::{HashMap, VecDeque};

pub type TaskId = u64;

#[derive(Debug)]
pub struct TaskSet<T> {
    next_id: TaskId,
    waiting: VecDeque<(TaskId, TaskAttr, T)>,
    running: HashMap<TaskId, TaskAttr>,
    running_ordered: usize,
}

impl<T> Default for TaskSet<T> {
    fn default() -> Self {
        Self {
            next_id: 1,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            running_ordered: 0,
        }
    }
}

impl<T> TaskSet<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Enter a task; returns the tasks (this one, if it may start) to start now.
    pub fn submit(&mut self, attr: TaskAttr, item: T) -> (TaskId, Vec<(TaskId, T)>) {
        let id = self.next_id;
        self.next_id += 1;
        if attr == TaskAttr::HeadOfQueue {
            self.running.insert(id, attr);
            return (id, vec![(id, item)]);
        }
        self.waiting.push_back((id, attr, item));
        (id, self.start_ready())
    }

    /// A running task finished; returns tasks that may start now.
    pub fn complete(&mut self, id: TaskId) -> Vec<(TaskId, T)> {
        if let Some(attr) = self.running.remove(&id) {
            if attr == TaskAttr::Ordered {
                self.running_ordered -= 1;
            }
        }
        self.start_ready()
    }

    fn start_ready(&mut self) -> Vec<(TaskId, T)> {
        let mut out = Vec::new();
        while let Some((_, attr, _)) = self.waiting.front() {
            let can_start = match attr {
                TaskAttr::Ordered => self.running.is_empty(),
                _ => self.running_ordered == 0,
            };
            if !can_start {
                break;
            }
            let Some((id, attr, item)) = self.waiting.pop_front() else {
                break;
            };
            if attr == TaskAttr::Ordered {
                self.running_ordered += 1;
            }
            self.running.insert(id, attr);
            out.push((id, item));
            if attr == TaskAttr::Ordered {
                break;
            }
        }
        out
    }

    /// Remove waiting tasks matching `pred` (they never start); returns them.
    pub fn remove_waiting(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<(TaskId, T)> {
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for (id, attr, item) in self.waiting.drain(..) {
            if pred(&item) {
                removed.push((id, item));
            } else {
                kept.push_back((id, attr, item));
            }
        }
        self.waiting = kept;
        removed
    }

    pub fn is_running(&self, id: TaskId) -> bool {
        self.running.contains_key(&id)
    }

    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskAttr::*;

    fn ids<T>(v: &[(TaskId, T)]) -> Vec<TaskId> {
        v.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn simple_tasks_run_concurrently() {
        let mut s = TaskSet::new();
        assert_eq!(ids(&s.submit(Simple, ()).1), vec![1]);
        assert_eq!(ids(&s.submit(Simple, ()).1), vec![2]);
        assert_eq!(s.running_count(), 2);
    }

    #[test]
    fn ordered_waits_for_older_and_blocks_younger() {
        let mut s = TaskSet::new();
        s.submit(Simple, 'a');
        let (o, started) = s.submit(Ordered, 'o');
        assert!(started.is_empty());
        let (_, started) = s.submit(Simple, 'b');
        assert!(started.is_empty(), "simple behind an ordered waits");
        assert_eq!(ids(&s.complete(1)), vec![o]);
        assert_eq!(ids(&s.complete(o)), vec![3]);
    }

    #[test]
    fn head_of_queue_starts_at_once() {
        let mut s = TaskSet::new();
        s.submit(Ordered, ());
        s.submit(Simple, ());
        let (h, started) = s.submit(HeadOfQueue, ());
        assert_eq!(ids(&started), vec![h]);
    }

    #[test]
    fn removed_waiting_tasks_never_start() {
        let mut s = TaskSet::new();
        s.submit(Ordered, 1);
        s.submit(Simple, 2);
        s.submit(Simple, 3);
        let gone = s.remove_waiting(|v| *v == 2);
        assert_eq!(ids(&gone), vec![2]);
        assert_eq!(ids(&s.complete(1)), vec![3]);
        assert_eq!(s.waiting_count(), 0);
    }
}
