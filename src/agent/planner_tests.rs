//! Planner table tests in the Pacemaker scheduler style: a cluster scene (heartbeats,
//! records, this node's local state) at a time in, the expected ops out. Each case
//! mirrors an edge that the multi-process tests (tests/agent_*.rs) drive for real.

use super::*;
use crate::agent::quorum::{HeartbeatSlot, NodeAdmin};
use std::collections::BTreeMap;

const DEAD_AFTER: Duration = Duration::from_millis(3000);
/// The agent's poll interval: how often the scene's observer reads the slots.
const POLL_MS: u64 = 200;
/// This node's incarnation, and an earlier one (before a restart or self-fence).
const INC_ME: u64 = 0x1001;
const INC_OLD_ME: u64 = 0x0dd1;

fn inc(id: u16) -> u64 {
    0x1000 + u64::from(id)
}

fn name(id: u16) -> String {
    format!("n{id}")
}

/// How a node's heartbeat behaves over the scene, in ms since T0.
#[derive(Clone, Copy)]
enum Beat {
    Alive,
    SilentSince(u64),
    Left,
    /// Heartbeating under another incarnation than `inc(id)`.
    Incarnation(u64),
}

fn alive() -> Beat {
    Beat::Alive
}
fn silent_since(ms: u64) -> Beat {
    Beat::SilentSince(ms)
}
fn left() -> Beat {
    Beat::Left
}

/// Local state of one configured group.
#[derive(Clone)]
struct Conf {
    policy: Policy,
    local: Local,
    next_monitor_ms: u64,
    waiting_since_ms: Option<u64>,
    backoff_until_ms: Option<u64>,
    live: LiveOut,
}

impl Default for Conf {
    fn default() -> Conf {
        Conf {
            policy: Policy {
                preferred_owners: vec![],
                failback: Failback::Never,
                failback_window: None,
            },
            local: Local::Idle,
            next_monitor_ms: 0,
            waiting_since_ms: None,
            backoff_until_ms: None,
            live: LiveOut::None,
        }
    }
}

struct Scene {
    t0: Instant,
    me: u16,
    my_incarnation: u64,
    self_fencing: bool,
    minute: u16,
    nodes: BTreeMap<u16, Beat>,
    drained: Vec<u16>,
    records: Vec<GroupRecord>,
    confs: BTreeMap<String, Conf>,
    /// The observer could not read between these times (ms, exclusive).
    blackout: Option<(u64, u64)>,
}

/// A scene seen from node `id`, which heartbeats with `INC_ME`.
fn me(id: u16) -> Scene {
    let mut nodes = BTreeMap::new();
    nodes.insert(id, Beat::Incarnation(INC_ME));
    Scene {
        t0: Instant::now(),
        me: id,
        my_incarnation: INC_ME,
        self_fencing: false,
        minute: 12 * 60,
        nodes,
        drained: vec![],
        records: vec![],
        confs: BTreeMap::new(),
        blackout: None,
    }
}

impl Scene {
    fn node(mut self, id: u16, b: Beat) -> Scene {
        self.nodes.insert(id, b);
        self
    }
    fn drained(mut self, id: u16) -> Scene {
        self.drained.push(id);
        self
    }
    fn self_fencing(mut self) -> Scene {
        self.self_fencing = true;
        self
    }
    fn blackout(mut self, from: u64, to: u64) -> Scene {
        self.blackout = Some((from, to));
        self
    }
    fn minute(mut self, m: u16) -> Scene {
        self.minute = m;
        self
    }
    /// A record on the quorum LUN, configured here with the default policy.
    fn group(mut self, r: GroupRecord) -> Scene {
        self.confs.entry(r.name.clone()).or_default();
        self.records.push(r);
        self
    }
    /// A group configured here without a record yet.
    fn configured(mut self, group: &str) -> Scene {
        self.confs.entry(group.into()).or_default();
        self
    }
    fn conf(mut self, group: &str, f: impl FnOnce(&mut Conf)) -> Scene {
        f(self.confs.entry(group.into()).or_default());
        self
    }
    fn prefer(self, group: &str, nodes: &[u16]) -> Scene {
        let p: Vec<String> = nodes.iter().map(|&n| name(n)).collect();
        self.conf(group, |c| c.policy.preferred_owners = p)
    }
    fn local(self, group: &str, l: Local) -> Scene {
        self.conf(group, |c| c.local = l)
    }
    fn running(self, group: &str) -> Scene {
        let epoch = self
            .records
            .iter()
            .find(|r| r.name == group)
            .map_or(0, |r| r.epoch);
        self.local(group, Local::Running { epoch })
    }
    /// Paused here at `ms` while the record stood at `epoch`.
    fn paused(self, group: &str, epoch: u64, ms: u64) -> Scene {
        let since = self.at(ms);
        self.local(group, Local::Paused { epoch, since })
    }
    fn waiting_since(self, group: &str, ms: u64) -> Scene {
        self.conf(group, |c| c.waiting_since_ms = Some(ms))
    }
    fn backoff_until(self, group: &str, ms: u64) -> Scene {
        self.conf(group, |c| c.backoff_until_ms = Some(ms))
    }
    fn next_monitor(self, group: &str, ms: u64) -> Scene {
        self.conf(group, |c| c.next_monitor_ms = ms)
    }
    fn failback(self, group: &str, f: Failback, window: Option<(u16, u16)>) -> Scene {
        self.conf(group, |c| {
            c.policy.failback = f;
            c.policy.failback_window = window;
        })
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn slot(&self, id: u16, b: Beat, ms: u64) -> HeartbeatSlot {
        let (incarnation, counter, state) = match b {
            Beat::Alive => (inc(id), ms / POLL_MS + 1, NodeState::Active),
            Beat::Incarnation(i) => (i, ms / POLL_MS + 1, NodeState::Active),
            Beat::SilentSince(s) => (inc(id), ms.min(s) / POLL_MS + 1, NodeState::Active),
            Beat::Left => (inc(id), 1, NodeState::Left),
        };
        HeartbeatSlot {
            node_id: id,
            name: name(id),
            incarnation,
            counter,
            state,
            wall_ms: 0,
        }
    }

    fn image(&self, ms: u64) -> QuorumImage {
        let mut img = QuorumImage {
            slots: vec![None; 64],
            admins: vec![None; 64],
            ..QuorumImage::default()
        };
        for (&id, &b) in &self.nodes {
            img.slots[usize::from(id) - 1] = Some(self.slot(id, b, ms));
        }
        for &id in &self.drained {
            img.admins[usize::from(id) - 1] = Some(NodeAdmin {
                drained: true,
                ..NodeAdmin::empty(id)
            });
        }
        for (i, r) in self.records.iter().enumerate() {
            img.groups.push((i as u16, r.clone()));
            img.group_blocks.push(vec![]);
        }
        img
    }

    /// The observer polls every POLL_MS from T0 up to `ms`, as the agent does.
    fn membership(&self, ms: u64) -> Membership {
        let mut m = Membership::new(DEAD_AFTER);
        let mut t = 0;
        loop {
            let t_now = t.min(ms);
            t += POLL_MS;
            if self.blackout.is_some_and(|(a, b)| a < t_now && t_now < b) && t_now != ms {
                continue;
            }
            let slots: Vec<HeartbeatSlot> = self
                .nodes
                .iter()
                .map(|(&id, &b)| self.slot(id, b, t_now))
                .collect();
            m.observe(self.at(t_now), &slots);
            if t_now == ms {
                return m;
            }
        }
    }

    fn node_name(&self) -> String {
        name(self.me)
    }

    fn plan(&self, ms: u64) -> Vec<Op> {
        let now = self.at(ms);
        let my_name = self.node_name();
        let node = NodeView {
            id: self.me,
            name: &my_name,
            incarnation: self.my_incarnation,
            self_fencing: self.self_fencing,
            dead_after: DEAD_AFTER,
            local_minute: self.minute,
        };
        plan(
            &node,
            &self.views(),
            &self.image(ms),
            &self.membership(ms),
            now,
        )
    }

    fn views(&self) -> Vec<GroupView<'_>> {
        self.confs
            .iter()
            .map(|(n, c)| GroupView {
                name: n,
                policy: &c.policy,
                local: c.local,
                next_monitor: self.at(c.next_monitor_ms),
                waiting_since: c.waiting_since_ms.map(|t| self.at(t)),
                backoff_until: c.backoff_until_ms.map(|t| self.at(t)),
                live: c.live.clone(),
            })
            .collect()
    }
}

/// Group records.
fn unowned(group: &str) -> GroupRecord {
    let mut r = GroupRecord::new(group);
    r.epoch = 4;
    r
}
fn owned_by(group: &str, id: u16) -> GroupRecord {
    owned_by_inc(group, id, inc(id))
}
fn owned_by_inc(group: &str, id: u16, incarnation: u64) -> GroupRecord {
    let mut r = unowned(group);
    r.owner = id;
    r.owner_incarnation = incarnation;
    r.state = crate::agent::quorum::GroupState::Running;
    r
}
/// Owned by this node as it is now (node `id`, `INC_ME`).
fn mine(group: &str, id: u16) -> GroupRecord {
    owned_by_inc(group, id, INC_ME)
}
fn with(mut r: GroupRecord, f: impl FnOnce(&mut GroupRecord)) -> GroupRecord {
    f(&mut r);
    r
}
fn moving_to(r: GroupRecord, to: u16) -> GroupRecord {
    with(r, |r| r.move_to = to)
}
fn offline(r: GroupRecord) -> GroupRecord {
    with(r, |r| r.admin = AdminState::Offline)
}
fn frozen(r: GroupRecord) -> GroupRecord {
    with(r, |r| r.frozen = true)
}
fn failed_on(r: GroupRecord, id: u16) -> GroupRecord {
    with(r, |r| r.set_failed_on(id))
}

/// Expected ops.
fn claim(group: &str) -> Op {
    Op::Claim {
        group: group.into(),
        victim: None,
        victim_incarnation: None,
    }
}
fn claim_fencing(group: &str, victim: u16) -> Op {
    Op::Claim {
        group: group.into(),
        victim: Some(victim),
        victim_incarnation: Some(inc(victim)),
    }
}
fn start_waiting(s: &Scene, group: &str, ms: u64) -> Op {
    Op::SetWaiting {
        group: group.into(),
        since: Some(s.at(ms)),
    }
}
fn stop_waiting(group: &str) -> Op {
    Op::SetWaiting {
        group: group.into(),
        since: None,
    }
}
fn take_offline(group: &str, reason: OfflineReason, text: &str) -> Op {
    Op::TakeOffline {
        group: group.into(),
        reason,
        text: text.into(),
    }
}
fn monitor(group: &str, epoch: u64) -> Op {
    Op::Monitor {
        group: group.into(),
        epoch,
    }
}
fn release_orphan(group: &str) -> Op {
    Op::ReleaseOrphan {
        group: group.into(),
    }
}

/// Cases of one scene and the plan expected at one time, a test each:
/// `NAME: |s| SCENE, at MS => OPS;` (OPS may use the scene as `s`).
macro_rules! plan_cases {
    ($($name:ident: |$s:ident| $scene:expr, at $ms:expr => $ops:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let $s = $scene;
                assert_eq!($s.plan($ms), $ops);
            }
        )*
    };
}

/// A time at which every scene's nodes have been watched for long enough that
/// silent ones are dead.
const LATE: u64 = 10_000;

// ---- Records ----

plan_cases! {
    a_group_without_a_record_gets_one:
        |s| me(1).configured("web"),
        at 0 => [Op::EnsureGroupRecord { group: "web".into() }];
    a_busy_group_is_left_alone:
        |s| me(1).group(owned_by_inc("web", 1, INC_OLD_ME)).local("web", Local::Busy),
        at LATE => [];
    groups_are_planned_in_config_order:
        |s| me(1).group(unowned("b")).group(unowned("a")),
        at LATE => [claim("a"), claim("b")];
}

// ---- Placement of unowned groups ----

plan_cases! {
    an_unowned_group_is_claimed_by_its_preferred_owner:
        |s| me(1).node(2, alive()).group(unowned("web")).prefer("web", &[1, 2]),
        at LATE => [claim("web")];
    a_node_that_is_not_preferred_starts_waiting:
        |s| me(1).node(2, alive()).group(unowned("web")).prefer("web", &[2, 1]),
        at LATE => [start_waiting(&s, "web", LATE)];
    waiting_less_than_dead_after_does_nothing:
        |s| me(1).node(2, alive()).group(unowned("web")).prefer("web", &[2]).waiting_since("web", LATE - 2999),
        at LATE => [];
    after_dead_after_of_waiting_a_candidate_claims_itself:
        |s| me(1).node(2, alive()).group(unowned("web")).prefer("web", &[2]).waiting_since("web", LATE - 3000),
        at LATE => [stop_waiting("web"), claim("web")];
    without_preference_the_least_loaded_node_claims:
        |s| me(1).node(2, alive()).group(owned_by("db", 2)).group(unowned("web")),
        at LATE => [claim("web")];
    a_more_loaded_node_waits_for_the_least_loaded:
        |s| me(1).node(2, alive()).group(mine("db", 1)).running("db").next_monitor("db", LATE + 1).group(unowned("web")),
        at LATE => [start_waiting(&s, "web", LATE)];
}

#[test]
fn equal_load_is_broken_by_the_lowest_id() {
    let s = me(2).node(1, alive()).group(unowned("web"));
    assert_eq!(s.plan(LATE), [start_waiting(&s, "web", LATE)]);
    let s = me(1).node(2, alive()).group(unowned("web"));
    assert_eq!(s.plan(LATE), [claim("web")]);
}

plan_cases! {
    a_node_where_the_group_failed_never_claims_it:
        |s| me(1).node(2, alive()).group(failed_on(unowned("web"), 1)).prefer("web", &[1]).waiting_since("web", 0),
        at LATE => [];
    the_preferred_owner_where_it_failed_is_skipped:
        |s| me(1).node(2, alive()).group(failed_on(unowned("web"), 2)).prefer("web", &[2, 1]),
        at LATE => [claim("web")];
    a_drained_node_never_claims:
        |s| me(1).drained(1).node(2, alive()).group(unowned("web")).prefer("web", &[1]).waiting_since("web", 0),
        at LATE => [];
    a_drained_preferred_owner_is_skipped:
        |s| me(1).node(2, alive()).drained(2).group(unowned("web")).prefer("web", &[2, 1]),
        at LATE => [claim("web")];
}

#[test]
fn a_dead_preferred_owner_is_skipped() {
    let s = me(1)
        .node(2, silent_since(0))
        .group(unowned("web"))
        .prefer("web", &[2, 1]);
    assert_eq!(s.plan(2999), [start_waiting(&s, "web", 2999)]);
    assert_eq!(s.plan(3000), [claim("web")]);
}

plan_cases! {
    a_preferred_owner_that_left_is_skipped:
        |s| me(1).node(2, left()).group(unowned("web")).prefer("web", &[2, 1]),
        at LATE => [claim("web")];
    a_preferred_owner_that_never_heartbeated_is_skipped:
        |s| me(1).group(unowned("web")).prefer("web", &[2, 1]),
        at 0 => [claim("web")];
}

#[test]
fn before_our_first_heartbeat_we_are_no_candidate() {
    // Our slot still shows an earlier incarnation: peers cannot see us yet.
    let s = me(1)
        .node(1, Beat::Incarnation(INC_OLD_ME))
        .node(2, alive())
        .group(unowned("web"))
        .prefer("web", &[1])
        .waiting_since("web", 0);
    assert_eq!(s.plan(LATE), []);
}

#[test]
fn a_claim_is_held_back_until_the_backoff_ends() {
    let s = me(1).group(unowned("web")).backoff_until("web", LATE + 1);
    assert_eq!(s.plan(LATE), []);
    let s = me(1).group(unowned("web")).backoff_until("web", LATE);
    assert_eq!(s.plan(LATE), [claim("web")]);
}

plan_cases! {
    a_backoff_also_holds_back_waiting:
        |s| me(1).node(2, alive()).group(unowned("web")).prefer("web", &[2]).backoff_until("web", LATE + 1),
        at LATE => [];
}

// ---- Owned by a peer ----

plan_cases! {
    a_dead_owner_is_taken_over_with_a_fence:
        |s| me(1).node(2, silent_since(0)).group(owned_by("web", 2)),
        at 3000 => [claim_fencing("web", 2)];
}

#[test]
fn an_owner_silent_for_less_than_dead_after_keeps_its_group() {
    let s = me(1).node(2, silent_since(1000)).group(owned_by("web", 2));
    assert_eq!(s.plan(3999), []);
    assert_eq!(s.plan(4000), [claim_fencing("web", 2)]);
}

plan_cases! {
    the_dead_owner_is_no_candidate_even_when_preferred:
        |s| me(1).node(2, silent_since(0)).group(owned_by("web", 2)).prefer("web", &[2, 1]),
        at LATE => [claim_fencing("web", 2)];
}

#[test]
fn a_dead_owners_group_waits_for_the_preferred_survivor() {
    let s = me(1)
        .node(2, silent_since(0))
        .node(3, alive())
        .group(owned_by("web", 2))
        .prefer("web", &[3]);
    assert_eq!(s.plan(LATE), [start_waiting(&s, "web", LATE)]);
    let s = s.waiting_since("web", LATE - 3000);
    assert_eq!(s.plan(LATE), [stop_waiting("web"), claim_fencing("web", 2)]);
}

#[test]
fn of_two_racing_survivors_only_the_chosen_one_claims() {
    let s = me(3)
        .node(1, silent_since(0))
        .node(2, alive())
        .group(owned_by("web", 1));
    assert_eq!(s.plan(LATE), [start_waiting(&s, "web", LATE)]);
    let s = me(2)
        .node(1, silent_since(0))
        .node(3, alive())
        .group(owned_by("web", 1));
    assert_eq!(s.plan(LATE), [claim_fencing("web", 1)]);
}

#[test]
fn our_own_read_blackout_does_not_make_the_owner_dead() {
    // A target restart: nobody's heartbeat moves, and we cannot read either.
    let s = me(1)
        .node(2, silent_since(1000))
        .group(owned_by("web", 2))
        .blackout(1000, 5000);
    assert_eq!(s.plan(5000), []);
    // Without the blackout the same silence is death.
    let s = me(1).node(2, silent_since(1000)).group(owned_by("web", 2));
    assert_eq!(s.plan(5000), [claim_fencing("web", 2)]);
}

plan_cases! {
    an_owner_that_left_is_taken_over_at_once:
        |s| me(1).node(2, left()).group(owned_by("web", 2)),
        at 0 => [claim_fencing("web", 2)];
}

#[test]
fn an_alive_owner_with_a_new_incarnation_keeps_its_orphan() {
    // It releases its orphan itself.
    let s = me(1)
        .node(2, alive())
        .group(owned_by_inc("web", 2, 0xbad))
        .waiting_since("web", 0);
    assert_eq!(s.plan(LATE), [stop_waiting("web")]);
}

plan_cases! {
    an_alive_owner_keeps_its_group:
        |s| me(1).node(2, alive()).group(owned_by("web", 2)).prefer("web", &[1]),
        at LATE => [];
    an_owner_never_seen_is_not_taken_over:
        |s| me(1).group(owned_by("web", 5)),
        at LATE => [];
}

// ---- Orphans and strays ----

plan_cases! {
    a_record_of_an_earlier_incarnation_of_ours_is_released:
        |s| me(1).node(2, alive()).group(owned_by_inc("web", 1, INC_OLD_ME)),
        at 0 => [release_orphan("web")];
}

#[test]
fn an_orphan_is_released_even_when_offline_or_moving() {
    let r = moving_to(offline(owned_by_inc("web", 1, INC_OLD_ME)), 2);
    let s = me(1).node(2, alive()).group(r);
    assert_eq!(s.plan(0), [release_orphan("web")]);
}

plan_cases! {
    a_record_of_ours_with_nothing_running_here_is_released:
        |s| me(1).group(mine("web", 1)),
        at 0 => [release_orphan("web")];
    a_vm_running_here_for_a_peers_record_is_killed:
        |s| me(1).node(2, alive()).group(owned_by("web", 2)).running("web"),
        at LATE => [Op::KillLocal { group: "web".into(), why: "group record names node 2 (epoch 4) as owner while the VM runs here".into(), }];
    a_vm_running_here_for_an_unowned_record_is_killed:
        |s| me(1).group(unowned("web")).local("web", Local::Running { epoch: 3 }),
        at LATE => [Op::KillLocal { group: "web".into(), why: "group record names node 0 (epoch 4) as owner while the VM runs here".into(), }];
}

// ---- Admin offline ----

plan_cases! {
    an_offline_group_running_here_is_stopped_for_maintenance:
        |s| me(1).group(offline(mine("web", 1))).running("web"),
        at LATE => [take_offline("web", OfflineReason::Maintenance, "taken offline by the administrator")];
}

#[test]
fn an_offline_unowned_group_is_not_claimed_and_stops_waiting() {
    let s = me(1).group(offline(unowned("web")));
    assert_eq!(s.plan(LATE), []);
    let s = s.waiting_since("web", 0);
    assert_eq!(s.plan(LATE), [stop_waiting("web")]);
}

plan_cases! {
    an_offline_group_of_a_dead_owner_is_not_taken_over:
        |s| me(1).node(2, silent_since(0)).group(offline(owned_by("web", 2))),
        at LATE => [];
}

// ---- Moves ----

plan_cases! {
    a_move_to_an_alive_node_takes_the_group_offline_here:
        |s| me(1).node(2, alive()).group(moving_to(mine("web", 1), 2)).running("web"),
        at LATE => [take_offline("web", OfflineReason::Move(2), "moving to node 2 on request")];
}

#[test]
fn a_move_to_a_dead_node_stays_here() {
    let s = me(1)
        .node(2, silent_since(0))
        .group(moving_to(mine("web", 1), 2))
        .running("web")
        .next_monitor("web", LATE + 1);
    assert_eq!(s.plan(LATE), []);
    // And it is still monitored meanwhile.
    let s = s.next_monitor("web", LATE);
    assert_eq!(s.plan(LATE), [monitor("web", 4)]);
}

plan_cases! {
    a_move_to_ourselves_is_no_move:
        |s| me(1).node(2, alive()).group(moving_to(mine("web", 1), 1)).running("web").next_monitor("web", LATE + 1),
        at LATE => [];
    the_move_target_claims_the_released_group:
        |s| me(2).node(1, alive()).group(moving_to(unowned("web"), 2)).prefer("web", &[1]),
        at LATE => [claim("web")];
    others_wait_for_the_move_target:
        |s| me(1).node(2, alive()).group(moving_to(unowned("web"), 2)).prefer("web", &[1]),
        at LATE => [start_waiting(&s, "web", LATE)];
    a_move_target_that_is_no_candidate_falls_back_to_placement:
        |s| me(1).node(2, alive()).drained(2).group(moving_to(unowned("web"), 2)),
        at LATE => [claim("web")];
    a_move_to_a_node_that_died_after_the_release_is_claimed_by_placement:
        |s| me(1).node(2, silent_since(0)).group(moving_to(unowned("web"), 2)),
        at LATE => [claim("web")];
}

// ---- Drain ----

plan_cases! {
    a_drained_owner_moves_its_group_to_the_best_owner:
        |s| me(1).drained(1).node(2, alive()).node(3, alive()).group(mine("web", 1)).running("web").prefer("web", &[3, 2]),
        at LATE => [take_offline("web", OfflineReason::Move(3), "node drained; moving to node 3")];
    a_drained_owner_without_a_peer_keeps_its_group:
        |s| me(1).drained(1).node(2, silent_since(0)).group(mine("web", 1)).running("web"),
        at LATE => [monitor("web", 4)];
}

// ---- Failback ----

fn away_from_home() -> Scene {
    // Node 2 runs web; node 1, its first preferred owner, is back.
    me(2)
        .node(1, alive())
        .group(mine("web", 2))
        .running("web")
        .prefer("web", &[1, 2])
        .next_monitor("web", LATE + 1)
}

fn failback_to_1() -> Op {
    take_offline(
        "web",
        OfflineReason::Move(1),
        "failback to preferred owner n1",
    )
}

plan_cases! {
    failback_immediately_moves_home:
        |s| away_from_home().failback("web", Failback::Immediately, None),
        at LATE => [failback_to_1()];
    failback_never_stays:
        |s| away_from_home().failback("web", Failback::Never, None),
        at LATE => [];
}

#[test]
fn failback_window_moves_home_only_inside_it() {
    let w = Some((60, 120));
    let s = away_from_home()
        .failback("web", Failback::Window, w)
        .minute(90);
    assert_eq!(s.plan(LATE), [failback_to_1()]);
    let s = s.minute(120);
    assert_eq!(s.plan(LATE), []);
}

#[test]
fn failback_window_may_wrap_midnight() {
    let w = Some((22 * 60, 6 * 60));
    let s = away_from_home()
        .failback("web", Failback::Window, w)
        .minute(23 * 60);
    assert_eq!(s.plan(LATE), [failback_to_1()]);
    let s = s.minute(5 * 60 + 59);
    assert_eq!(s.plan(LATE), [failback_to_1()]);
    let s = s.minute(12 * 60);
    assert_eq!(s.plan(LATE), []);
}

plan_cases! {
    failback_without_a_valid_window_never_happens:
        |s| away_from_home().failback("web", Failback::Window, None),
        at LATE => [];
    no_failback_to_a_node_where_the_group_failed:
        |s| me(2).node(1, alive()).group(failed_on(mine("web", 2), 1)).running("web").prefer("web", &[1, 2]).failback("web", Failback::Immediately, None).next_monitor("web", LATE + 1),
        at LATE => [];
    no_failback_to_a_dead_preferred_owner:
        |s| away_from_home().node(1, silent_since(0)).failback("web", Failback::Immediately, None),
        at LATE => [];
    no_failback_when_already_home:
        |s| me(1).node(2, alive()).group(mine("web", 1)).running("web").prefer("web", &[1, 2]).failback("web", Failback::Immediately, None).next_monitor("web", LATE + 1),
        at LATE => [];
    failback_from_a_node_outside_the_preferred_list:
        |s| me(3).node(1, alive()).group(mine("web", 3)).running("web").prefer("web", &[1]).failback("web", Failback::Immediately, None),
        at LATE => [failback_to_1()];
}

// ---- Frozen, monitoring ----

plan_cases! {
    a_frozen_group_is_neither_monitored_nor_moved:
        |s| me(1).node(2, alive()).group(frozen(offline(moving_to(mine("web", 1), 2)))).running("web"),
        at LATE => [];
}

#[test]
fn a_running_group_is_monitored_when_due() {
    let s = me(1)
        .group(mine("web", 1))
        .running("web")
        .next_monitor("web", LATE);
    assert_eq!(s.plan(LATE), [monitor("web", 4)]);
    let s = s.next_monitor("web", LATE + 1);
    assert_eq!(s.plan(LATE), []);
}

// ---- Self-fencing ----

#[test]
fn a_self_fencing_node_never_claims() {
    let s = me(1).group(unowned("web")).self_fencing();
    assert_eq!(s.plan(LATE), []);
    let s = me(1)
        .node(2, silent_since(0))
        .group(owned_by("web", 2))
        .self_fencing();
    assert_eq!(s.plan(LATE), []);
}

#[test]
fn a_self_fencing_node_still_kills_a_stray_vm() {
    let s = me(1)
        .node(2, alive())
        .group(owned_by("web", 2))
        .running("web")
        .self_fencing();
    assert!(matches!(&s.plan(LATE)[..], [Op::KillLocal { .. }]));
}

// ---- Storage outages: fence, pause, resume ----

const SELF_FENCE_AFTER: Duration = Duration::from_secs(2);
const MAX_PAUSE: Duration = Duration::from_secs(240);

fn outage(fenced: bool, running: bool, age_ms: Option<u64>, max: Duration) -> Option<OutageAction> {
    let age = age_ms.map(Duration::from_millis);
    outage_action(fenced, running, age, SELF_FENCE_AFTER, max)
}

/// fenced, VMs running, heartbeat age (ms), max_pause, expected action.
type OutageCase = (bool, bool, Option<u64>, Duration, Option<OutageAction>);

#[test]
fn outage_actions() {
    use OutageAction::{Fence, Pause};
    let fenced =
        || Fence("this node was fenced: a quorum LUN write was refused, or its key is gone".into());
    let stale = "no completed heartbeat write for 2001 ms".to_string();
    let cases: &[OutageCase] = &[
        // A refused quorum write kills, paused VMs included, pausing on or off.
        (true, false, None, MAX_PAUSE, Some(fenced())),
        (true, true, Some(10), Duration::ZERO, Some(fenced())),
        // A stale heartbeat pauses running VMs; with pausing off it kills them.
        (
            false,
            true,
            Some(2001),
            MAX_PAUSE,
            Some(Pause(stale.clone())),
        ),
        (false, true, Some(2001), Duration::ZERO, Some(Fence(stale))),
        // Nothing running (idle, or everything already paused): nothing to do.
        (false, false, Some(2001), MAX_PAUSE, None),
        // At the limit, not past it; and nothing to judge before the first beat.
        (false, true, Some(2000), MAX_PAUSE, None),
        (false, true, None, MAX_PAUSE, None),
    ];
    for (i, (f, run, age, max, want)) in cases.iter().enumerate() {
        assert_eq!(&outage(*f, *run, *age, *max), want, "case {i}");
    }
}

#[test]
fn a_paused_group_still_ours_is_resumed_in_the_same_epoch() {
    let s = me(1)
        .node(2, alive())
        .group(mine("web", 1))
        .paused("web", 4, 1000);
    assert_eq!(
        s.plan(LATE),
        [Op::Resume {
            group: "web".into(),
            epoch: 4,
            since: s.at(1000),
        }]
    );
}

#[test]
fn a_paused_group_resumes_even_after_an_outage_every_node_saw() {
    // Everyone was blind for 8 s (a target restart): the peers look silent since
    // before the blackout, but the observer credits its own blackout, so nobody is
    // dead and our paused group is simply resumed.
    let s = me(1)
        .node(2, silent_since(1000))
        .node(3, silent_since(1000))
        .blackout(1000, 9000)
        .group(mine("web", 1))
        .group(owned_by("db", 2))
        .paused("web", 4, 3000);
    let ops = s.plan(9200);
    assert_eq!(
        ops,
        [Op::Resume {
            group: "web".into(),
            epoch: 4,
            since: s.at(3000),
        }]
    );
}

#[test]
fn a_paused_group_claimed_by_a_peer_is_killed_never_resumed() {
    let s = me(1)
        .node(2, alive())
        .group(with(owned_by("web", 2), |r| r.epoch = 5))
        .paused("web", 4, 1000);
    assert_eq!(
        s.plan(LATE),
        [Op::KillLocal {
            group: "web".into(),
            why: "paused VM: the group was claimed by node 2 (epoch 5) during the outage; \
                  never resumed"
                .into(),
        }]
    );
}

#[test]
fn a_paused_group_whose_record_moved_on_is_killed() {
    // Still our incarnation on the record, but not the run we paused.
    let s = me(1)
        .group(with(mine("web", 1), |r| r.epoch = 6))
        .paused("web", 4, 1000);
    assert!(matches!(&s.plan(LATE)[..], [Op::KillLocal { why, .. }] if why.contains("epoch 6")));
    let s = me(1)
        .group(with(mine("web", 1), |r| r.state = GroupState::Stopping))
        .paused("web", 4, 1000);
    assert!(matches!(&s.plan(LATE)[..], [Op::KillLocal { .. }]));
    // Released to nobody meanwhile (an admin, or our own orphan release).
    let s = me(1).group(unowned("web")).paused("web", 4, 1000);
    assert!(matches!(&s.plan(LATE)[..], [Op::KillLocal { .. }]));
}

#[test]
fn a_paused_group_is_not_monitored() {
    let s = me(1)
        .group(mine("web", 1))
        .paused("web", 4, 0)
        .next_monitor("web", 0);
    assert!(!s.plan(LATE).iter().any(|o| matches!(o, Op::Monitor { .. })));
}

#[test]
fn pauses_expire_after_max_pause() {
    let s = me(1)
        .group(mine("web", 1))
        .group(mine("db", 1))
        .paused("web", 4, 1000)
        .paused("db", 4, 5000);
    let views = s.views();
    let at = |ms| expired_pauses(&views, MAX_PAUSE, s.at(ms));
    assert_eq!(at(240_999), []);
    assert_eq!(
        at(241_000),
        [Op::PauseExpired {
            group: "web".into(),
            paused_for: MAX_PAUSE,
        }]
    );
    assert_eq!(at(245_000).len(), 2);
}

// ---- After a monitor ----

fn budget() -> RestartBudget {
    RestartBudget::new(2, Duration::from_secs(900))
}

#[test]
fn a_running_vm_needs_nothing() {
    let t = Instant::now();
    assert_eq!(
        after_status("web", VmStatus::Running, &mut budget(), t),
        None
    );
}

#[test]
fn a_guest_shut_down_by_its_admin_is_kept_offline() {
    let t = Instant::now();
    assert_eq!(
        after_status("web", VmStatus::ShutDown, &mut budget(), t),
        Some(take_offline(
            "web",
            OfflineReason::GuestShutDown,
            "the guest was shut down by its administrator; kept stopped"
        ))
    );
}

#[test]
fn a_failed_vm_is_restarted_then_failed_over() {
    let t = Instant::now();
    let mut b = budget();
    let crash = || VmStatus::Failed("exit status 1".into());
    let restart = |attempt| Op::RestartInPlace {
        group: "web".into(),
        attempt,
        why: "exit status 1".into(),
    };
    assert_eq!(after_status("web", crash(), &mut b, t), Some(restart(1)));
    assert_eq!(after_status("web", crash(), &mut b, t), Some(restart(2)));
    assert_eq!(
        after_status("web", crash(), &mut b, t),
        Some(take_offline(
            "web",
            OfflineReason::Failed,
            "VM failed (exit status 1) after 2 restarts within 900s; failing over"
        ))
    );
    // The budget starts afresh after a failover.
    assert_eq!(after_status("web", crash(), &mut b, t), Some(restart(1)));
}

#[test]
fn a_vm_that_vanished_counts_as_failed() {
    let t = Instant::now();
    assert_eq!(
        after_status("web", VmStatus::Stopped, &mut budget(), t),
        Some(Op::RestartInPlace {
            group: "web".into(),
            attempt: 1,
            why: "the VM is not running".into(),
        })
    );
}

// ---- SIGTERM hand-over ----

#[test]
fn on_sigterm_a_group_is_handed_to_the_best_peer() {
    let s = me(1)
        .node(2, alive())
        .node(3, alive())
        .group(mine("web", 1))
        .prefer("web", &[3]);
    let (img, m) = (s.image(LATE), s.membership(LATE));
    let my_name = s.node_name();
    let node = NodeView {
        id: 1,
        name: &my_name,
        incarnation: INC_ME,
        self_fencing: false,
        dead_after: DEAD_AFTER,
        local_minute: 0,
    };
    let rec = img.group("web").map(|(_, r, _)| r);
    let policy = &s.confs["web"].policy;
    assert_eq!(
        handover(&node, policy, rec, Some(&img), &m, s.at(LATE)),
        (
            OfflineReason::Move(3),
            "agent stopping; handing the group over to node 3".into()
        )
    );
    let empty = me(1).group(mine("web", 1));
    let (img, m) = (empty.image(LATE), empty.membership(LATE));
    let rec = img.group("web").map(|(_, r, _)| r);
    assert_eq!(
        handover(&node, policy, rec, Some(&img), &m, empty.at(LATE)).0,
        OfflineReason::NodeStop
    );
    assert_eq!(
        handover(&node, policy, None, None, &m, s.at(LATE)).0,
        OfflineReason::NodeStop
    );
}

// ---- Live migration (planner_live.rs) ----

use crate::agent::quorum::Migration;

/// A live migration of `r` to `to`, listening on `addr` ("" = requested only).
fn migrating(r: GroupRecord, to: u16, addr: &str) -> GroupRecord {
    with(r, |r| {
        r.migration = Some(Migration {
            to,
            addr: addr.into(),
        })
    })
}
fn live(s: Scene, group: &str, l: LiveOut) -> Scene {
    s.conf(group, |c| c.live = l)
}
fn migrate_in(group: &str, source: u16) -> Op {
    Op::MigrateIn {
        group: group.into(),
        source,
        epoch: 4,
    }
}
fn migrate_out(group: &str, to: u16, addr: &str) -> Op {
    Op::MigrateOut {
        group: group.into(),
        to,
        addr: addr.into(),
    }
}
fn end_here(group: &str, handed_over: bool, why: &str) -> Op {
    Op::EndMigrationHere {
        group: group.into(),
        epoch: 4,
        handed_over,
        why: why.into(),
    }
}
const ADDR: &str = "127.0.0.1:4444";

plan_cases! {
    // Destination.
    live_destination_starts_incoming_when_asked:
        |s| me(2).node(1, alive()).group(migrating(owned_by("g", 1), 2, "")),
        at LATE => vec![migrate_in("g", 1)];
    live_destination_does_not_start_twice_once_listening:
        |s| me(2).node(1, alive()).group(migrating(owned_by("g", 1), 2, ADDR)),
        at LATE => vec![];
    live_other_nodes_leave_the_migration_alone:
        |s| me(3).node(1, alive()).node(2, alive()).group(migrating(owned_by("g", 1), 2, "")),
        at LATE => vec![];
    live_destination_waits_out_its_backoff:
        |s| me(2).node(1, alive()).group(migrating(owned_by("g", 1), 2, ""))
            .backoff_until("g", LATE + 1),
        at LATE => vec![];
    live_destination_self_fencing_does_not_start:
        |s| me(2).node(1, alive()).group(migrating(owned_by("g", 1), 2, "")).self_fencing(),
        at LATE => vec![];
    live_source_dead_mid_migration_is_taken_over:
        |s| me(2).node(1, silent_since(0)).group(migrating(owned_by("g", 1), 2, ADDR)),
        at LATE => vec![claim_fencing("g", 1)];
    live_request_for_a_dead_owner_is_a_normal_failover:
        |s| me(2).node(1, silent_since(0)).group(migrating(owned_by("g", 1), 2, "")),
        at LATE => vec![claim_fencing("g", 1)];

    // Source.
    live_source_notes_the_request_and_monitors_on:
        |s| me(1).node(2, alive()).group(migrating(mine("g", 1), 2, "")).running("g"),
        at LATE => vec![Op::SetLive { group: "g".into(), live: LiveOut::Pending { to: 2 } }];
    live_source_monitors_while_the_destination_gets_ready:
        |s| live(me(1).node(2, alive()).group(migrating(mine("g", 1), 2, "")).running("g"),
            "g", LiveOut::Pending { to: 2 }),
        at LATE => vec![monitor("g", 4)];
    live_source_migrates_once_the_destination_listens:
        |s| live(me(1).node(2, alive()).group(migrating(mine("g", 1), 2, ADDR)).running("g"),
            "g", LiveOut::Pending { to: 2 }),
        at LATE => vec![migrate_out("g", 2, ADDR)];
    live_source_does_not_retry_a_failed_address:
        |s| live(me(1).node(2, alive()).group(migrating(mine("g", 1), 2, ADDR)).running("g")
            .next_monitor("g", LATE + 1),
            "g", LiveOut::Failed { to: 2, addr: ADDR.into() }),
        at LATE => vec![];
    live_source_handed_over_waits_for_the_switchover_without_monitoring:
        |s| live(me(1).node(2, alive()).group(migrating(mine("g", 1), 2, ADDR)).running("g"),
            "g", LiveOut::HandedOver { to: 2 }),
        at LATE => vec![];
    live_source_handed_over_ends_when_the_destination_took_the_record:
        |s| live(me(1).node(2, alive()).group(owned_by("g", 2)).running("g"),
            "g", LiveOut::HandedOver { to: 2 }),
        at LATE => vec![Op::FinishMigrationOut { group: "g".into(), to: 2 }];
    live_source_handed_over_runs_again_when_the_destination_dies:
        |s| live(me(1).node(2, silent_since(0)).group(migrating(mine("g", 1), 2, ADDR))
            .running("g"), "g", LiveOut::HandedOver { to: 2 }),
        at LATE => vec![end_here("g", true,
            "node 2 did not take the migrated VM over; it runs here again")];
    live_source_handed_over_runs_again_when_the_destination_gave_up:
        |s| live(me(1).node(2, alive()).group(mine("g", 1)).running("g"),
            "g", LiveOut::HandedOver { to: 2 }),
        at LATE => vec![end_here("g", true,
            "node 2 did not take the migrated VM over; it runs here again")];
    live_source_cleans_up_after_a_dead_destination:
        |s| live(me(1).node(2, silent_since(0)).group(migrating(mine("g", 1), 2, ADDR))
            .running("g"), "g", LiveOut::Failed { to: 2, addr: ADDR.into() }),
        at LATE => vec![end_here("g", false, "live migration to node 2: the node is gone")];
    live_source_cleans_up_after_the_destination_aborted:
        |s| live(me(1).node(2, alive()).group(mine("g", 1)).running("g"),
            "g", LiveOut::Pending { to: 2 }),
        at LATE => vec![end_here("g", false, "live migration ended without a hand-over")];
    live_source_does_not_move_or_fail_back_during_a_migration:
        |s| me(1).node(2, alive()).node(3, alive())
            .group(moving_to(migrating(mine("g", 1), 2, ""), 3)).running("g"),
        at LATE => vec![Op::SetLive { group: "g".into(), live: LiveOut::Pending { to: 2 } }];
}
