//! Task management applied to a logical unit: tasks leave its task set, and the unit
//! attentions SAM-5 asks for reach the right nexuses.

use super::*;
use crate::scsi::{Task, TaskAttr, TaskKey, TmfFunction, TmfResponse};

const TUR: [u8; 6] = [0; 6];

fn task(id: u64, n: &Arc<ItNexus>, tag: u64, attr: TaskAttr) -> Task {
    Task {
        key: TaskKey { nexus: id, tag },
        attr,
        nexus: n.clone(),
    }
}

/// A LU that has seen nexuses 1 and 2 (ids 1 and 2), each with a running task.
fn busy_lu() -> (LogicalUnit, Arc<ItNexus>, Arc<ItNexus>) {
    let (lu, _) = lu();
    let (a, b) = (nexus(1), nexus(2));
    for (id, n) in [(1, &a), (2, &b)] {
        assert_good(&lu.execute(&cmd(n, &TUR, &[])));
        lu.submit_task(task(id, n, 7, TaskAttr::Simple)).unwrap();
    }
    (lu, a, b)
}

#[test]
fn clear_task_set_tells_the_other_nexus_once() {
    let (lu, a, b) = busy_lu();
    let d = lu.task_management(2, TmfFunction::ClearTaskSet);
    assert_eq!(d.response, TmfResponse::Complete);
    assert_eq!(d.removal.aborted.len(), 2);
    assert_sense(&lu.execute(&cmd(&a, &TUR, &[])), 6, 0x2F, 0x00);
    assert_good(&lu.execute(&cmd(&a, &TUR, &[])));
    assert_good(&lu.execute(&cmd(&b, &TUR, &[])));
}

#[test]
fn logical_unit_reset_tells_every_nexus() {
    let (lu, a, b) = busy_lu();
    lu.task_management(1, TmfFunction::LogicalUnitReset);
    for n in [&a, &b] {
        assert_sense(&lu.execute(&cmd(n, &TUR, &[])), 6, 0x29, 0x03);
    }
    // Running tasks stay until completed; nothing waits.
    assert_eq!(lu.task_counts(), (0, 2));
}

#[test]
fn abort_task_set_and_abort_task_tell_nobody() {
    let (lu, a, b) = busy_lu();
    let d = lu.task_management(1, TmfFunction::AbortTaskSet);
    assert_eq!(d.removal.aborted.len(), 1);
    let d = lu.task_management(2, TmfFunction::AbortTask { tag: 7 });
    assert_eq!(d.response, TmfResponse::Complete);
    for n in [&a, &b] {
        assert_good(&lu.execute(&cmd(n, &TUR, &[])));
    }
}

#[test]
fn one_lus_ordered_task_does_not_hold_back_another_lu() {
    let ((lu0, _), (lu1, _)) = (lu(), lu());
    let a = nexus(1);
    assert_eq!(
        lu0.submit_task(task(1, &a, 1, TaskAttr::Ordered))
            .unwrap()
            .len(),
        1
    );
    assert!(lu0
        .submit_task(task(1, &a, 2, TaskAttr::Ordered))
        .unwrap()
        .is_empty());
    let started = lu1.submit_task(task(1, &a, 3, TaskAttr::Simple)).unwrap();
    assert_eq!(started, [TaskKey { nexus: 1, tag: 3 }]);
    assert_eq!(lu0.complete_task(TaskKey { nexus: 1, tag: 1 }).len(), 1);
}
