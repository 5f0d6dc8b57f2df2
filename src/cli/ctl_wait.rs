//! `ctl move|offline|online --wait`: follow the group's record on the quorum LUN until
//! the request is done, printing each state change as it is seen ("  2.1 s  g1:
//! stopping on node1"), and end with an exit status that tells a timeout (3) from a
//! request that can no longer complete (4).
use super::ctl::{node_label, Ctl};
use crate::agent::quorum::{AdminState, GroupRecord, GroupState, QuorumImage};
use crate::agent::AgentError;
use std::time::{Duration, Instant};

/// Exit status of a wait that timed out.
pub const EXIT_TIMED_OUT: i32 = 3;
/// Exit status of a request that can no longer complete (the move was dropped, the
/// group was taken offline meanwhile, ...).
pub const EXIT_FAILED: i32 = 4;

/// What the request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// `move`: running on this node id.
    RunOn(u16),
    /// `online`: running anywhere.
    Running,
    /// `offline`: stopped.
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {secs} s waiting for group {group} to {goal}: it is {now}")]
    TimedOut {
        group: String,
        goal: String,
        secs: u64,
        now: String,
    },
    #[error("group {group} will not {goal}: {why}")]
    Failed {
        group: String,
        goal: String,
        why: String,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl WaitError {
    pub fn exit_code(&self) -> i32 {
        match self {
            WaitError::TimedOut { .. } => EXIT_TIMED_OUT,
            WaitError::Failed { .. } => EXIT_FAILED,
            WaitError::Agent(_) => 1,
        }
    }
}

/// Where one look at the record leaves the wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Waiting,
    Reached,
    /// Cannot complete any more; why.
    Failed(String),
}

/// The part of a record whose change is worth a line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    owner: u16,
    state: GroupState,
    admin: AdminState,
    move_to: u16,
    migration: Option<crate::agent::quorum::Migration>,
}

/// Sans-IO: fed each record read (with the time since the request), says what to print
/// and whether the goal is reached or out of reach.
pub struct Progress {
    group: String,
    goal: Goal,
    last: Option<Seen>,
}

impl Progress {
    pub fn new(group: &str, goal: Goal) -> Progress {
        Progress {
            group: group.to_string(),
            goal,
            last: None,
        }
    }

    /// One look at the record: the line to print if something changed since the last
    /// look (the first look always prints), and the verdict.
    pub fn observe(
        &mut self,
        r: &GroupRecord,
        name_of: &dyn Fn(u16) -> String,
        since_request: Duration,
    ) -> (Option<String>, Verdict) {
        let seen = Seen {
            owner: r.owner,
            state: r.state,
            admin: r.admin,
            move_to: r.move_to,
            migration: r.migration.clone(),
        };
        let line = (self.last.as_ref() != Some(&seen)).then(|| {
            format!(
                "{:>5.1} s  {}: {}",
                since_request.as_secs_f64(),
                self.group,
                describe(r, name_of)
            )
        });
        self.last = Some(seen);
        (line, verdict(self.goal, r, name_of))
    }

    fn goal_text(&self, name_of: &dyn Fn(u16) -> String) -> String {
        match self.goal {
            Goal::RunOn(to) => format!("run on {}", name_of(to)),
            Goal::Running => "run".into(),
            Goal::Stopped => "stop".into(),
        }
    }
}

/// "stopping on node1, moving to node2 (why)", "stopped, offline", ...
pub fn describe(r: &GroupRecord, name_of: &dyn Fn(u16) -> String) -> String {
    let mut s = if r.owner == 0 {
        r.state.name().to_string()
    } else {
        format!("{} on {}", r.state_name(), name_of(r.owner))
    };
    if r.admin == AdminState::Offline {
        s.push_str(", offline");
    }
    if r.move_to != 0 {
        s.push_str(&format!(", moving to {}", name_of(r.move_to)));
    }
    if let Some(m) = &r.migration {
        s.push_str(&format!(", migrating live to {}", name_of(m.to)));
    }
    if !r.reason.is_empty() {
        s.push_str(&format!(" ({})", r.reason));
    }
    s
}

fn verdict(goal: Goal, r: &GroupRecord, name_of: &dyn Fn(u16) -> String) -> Verdict {
    let running = r.state == GroupState::Running;
    match goal {
        Goal::RunOn(to) if r.owner == to && running => Verdict::Reached,
        Goal::Running if running => Verdict::Reached,
        Goal::Stopped if r.state == GroupState::Stopped => Verdict::Reached,
        Goal::RunOn(_) | Goal::Running if r.admin == AdminState::Offline => {
            Verdict::Failed("it was taken offline".into())
        }
        Goal::Stopped if r.admin == AdminState::Online => {
            Verdict::Failed("it was brought online again".into())
        }
        Goal::RunOn(to) if r.failed_on_node(to) => {
            Verdict::Failed(format!("it failed on {}", name_of(to)))
        }
        // Another node claimed it (a claim clears move_to) or the request was dropped.
        Goal::RunOn(to)
            if r.owner != 0
                && r.owner != to
                && r.move_to != to
                && r.migration.as_ref().is_none_or(|m| m.to != to) =>
        {
            Verdict::Failed(format!(
                "the move was dropped: it is {}",
                describe(r, name_of)
            ))
        }
        _ => Verdict::Waiting,
    }
}

/// Follow group `group` from `t0` (when the request was made) until `goal`, printing
/// each change on stdout when `print`; gives up after `timeout`.
pub async fn wait(
    c: &Ctl,
    group: &str,
    goal: Goal,
    t0: Instant,
    timeout: Duration,
    print: bool,
) -> Result<GroupRecord, WaitError> {
    let mut progress = Progress::new(group, goal);
    loop {
        let img = c.quorum.read_image().await?;
        let name_of = |id: u16| node_label(&img, id);
        let Some((_, r, _)) = img.group(group) else {
            return Err(
                AgentError::Other(format!("group {group:?} is gone from the quorum LUN")).into(),
            );
        };
        let (line, verdict) = progress.observe(r, &name_of, t0.elapsed());
        if let (Some(line), true) = (line, print) {
            println!("{line}");
        }
        match verdict {
            Verdict::Reached => return Ok(r.clone()),
            Verdict::Failed(why) => return Err(failed(&progress, &img, why)),
            Verdict::Waiting if t0.elapsed() >= timeout => {
                return Err(WaitError::TimedOut {
                    group: group.to_string(),
                    goal: progress.goal_text(&name_of),
                    secs: timeout.as_secs(),
                    now: describe(r, &name_of),
                })
            }
            Verdict::Waiting => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn failed(p: &Progress, img: &QuorumImage, why: String) -> WaitError {
    WaitError::Failed {
        group: p.group.clone(),
        goal: p.goal_text(&|id| node_label(img, id)),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(id: u16) -> String {
        format!("node{id}")
    }

    fn rec(owner: u16, state: GroupState, move_to: u16, reason: &str) -> GroupRecord {
        let mut r = GroupRecord::new("g1");
        r.owner = owner;
        r.state = state;
        r.move_to = move_to;
        r.reason = reason.into();
        r
    }

    fn look(p: &mut Progress, r: &GroupRecord, ms: u64) -> (Option<String>, Verdict) {
        p.observe(r, &name_of, Duration::from_millis(ms))
    }

    #[test]
    fn a_move_prints_one_line_per_change_until_it_runs_on_the_target() {
        use GroupState::*;
        let mut p = Progress::new("g1", Goal::RunOn(2));
        let seq = [
            (0, rec(1, Running, 2, "")),
            (50, rec(1, Running, 2, "")),
            (2100, rec(1, Stopping, 2, "move")),
            (2150, rec(1, Stopping, 2, "move")),
            (3000, rec(0, Stopped, 2, "moved")),
            (3500, rec(2, Starting, 0, "claimed")),
            (4000, rec(2, Running, 0, "started")),
        ];
        let mut lines = vec![];
        let mut last = Verdict::Waiting;
        for (ms, r) in &seq {
            assert_eq!(last, Verdict::Waiting);
            let (line, v) = look(&mut p, r, *ms);
            lines.extend(line);
            last = v;
        }
        assert_eq!(last, Verdict::Reached);
        assert_eq!(
            lines,
            vec![
                "  0.0 s  g1: running on node1, moving to node2",
                "  2.1 s  g1: stopping on node1, moving to node2 (move)",
                "  3.0 s  g1: stopped, moving to node2 (moved)",
                "  3.5 s  g1: starting on node2 (claimed)",
                "  4.0 s  g1: running on node2 (started)",
            ]
        );
    }

    #[test]
    fn a_move_claimed_by_another_node_fails() {
        let mut p = Progress::new("g1", Goal::RunOn(2));
        look(&mut p, &rec(0, GroupState::Stopped, 2, ""), 0);
        let (_, v) = look(&mut p, &rec(3, GroupState::Starting, 0, "failover"), 900);
        assert!(
            matches!(v, Verdict::Failed(ref w) if w.contains("starting on node3")),
            "{v:?}"
        );
    }

    #[test]
    fn a_move_whose_target_failed_it_fails() {
        let mut p = Progress::new("g1", Goal::RunOn(2));
        let mut r = rec(0, GroupState::Stopped, 2, "failed");
        r.set_failed_on(2);
        let (_, v) = look(&mut p, &r, 10);
        assert_eq!(v, Verdict::Failed("it failed on node2".into()));
    }

    #[test]
    fn offline_is_reached_when_stopped_and_fails_when_brought_online() {
        let mut p = Progress::new("g1", Goal::Stopped);
        let mut r = rec(1, GroupState::Stopping, 0, "");
        r.admin = AdminState::Offline;
        assert_eq!(look(&mut p, &r, 0).1, Verdict::Waiting);
        r.admin = AdminState::Online;
        assert!(matches!(look(&mut p, &r, 10).1, Verdict::Failed(_)));
        let mut p = Progress::new("g1", Goal::Stopped);
        let mut r = rec(0, GroupState::Stopped, 0, "");
        r.admin = AdminState::Offline;
        let (line, v) = look(&mut p, &r, 1234);
        assert_eq!(line.as_deref(), Some("  1.2 s  g1: stopped, offline"));
        assert_eq!(v, Verdict::Reached);
    }

    #[test]
    fn exit_codes_tell_timeout_from_failure() {
        let t = WaitError::TimedOut {
            group: "g".into(),
            goal: "run".into(),
            secs: 5,
            now: "stopped".into(),
        };
        assert_eq!(t.exit_code(), EXIT_TIMED_OUT);
        assert_eq!(
            t.to_string(),
            "timed out after 5 s waiting for group g to run: it is stopped"
        );
        let f = WaitError::Failed {
            group: "g".into(),
            goal: "run".into(),
            why: "x".into(),
        };
        assert_eq!(f.exit_code(), EXIT_FAILED);
    }
}
