//! Issue 12's done-when test: a storage outage pauses VMs instead of killing them. A
//! three-node cluster with a test guest per node; the target is killed (SIGKILL) and
//! restarted on the same port and state (APTPL) after 1 s, 10 s and 60 s. An outage
//! every node sees is no node's failure: no VM is killed or restarted, each guest's ack
//! log continues in the same epoch after a gap, the events show "paused" and "resumed"
//! for every outage longer than self_fence_after, and the checker is clean.
//!
//! During the 10 s outage `holdfast ctl status` runs on node1: the quorum LUN cannot be
//! read, so it prints the groups paused on this node (from the agent's
//! STATE_DIR/paused.json) and then the error.
//!
//! KEEP_CLUSTER=1 keeps the cluster's files (events.jsonl, agentN.log, ack logs).

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use holdfast::agent::config::Timings;
use holdfast::agent::node::mono_ns;
use holdfast::agent::quorum::GroupState;
use holdfast::cli::cluster_kit::ack_events;
use holdfast::cli::guest::AckEvent;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
const GROUPS: [(&str, u16); 3] = [("a", 1), ("b", 2), ("c", 3)];
/// The only events an outage may cause about a group; anything else (vm-killed,
/// claimed, fenced, vm-started, vm-restart, pause-expired...) means a VM was killed,
/// restarted or taken away.
pub(crate) const ALLOWED: [&str; 2] = ["paused", "resumed"];
/// Node events that would kill every VM of the node.
pub(crate) const NODE_FORBIDDEN: [&str; 2] = ["self-fence", "rejoin"];

/// Events named `event` about `group` logged at or after `since` (mono_ns).
pub(crate) fn events_of(c: &Cluster, event: &str, group: &str, since: u64) -> Vec<Value> {
    c.events()
        .into_iter()
        .filter(|e| {
            e["event"] == event
                && e["group"] == group
                && e["mono_ns"].as_u64().is_some_and(|t| t >= since)
        })
        .collect()
}

/// The ack log of `group` as (instance, counter) of each ack of `epoch`, and the
/// number of `start` and `exit` lines of that epoch.
fn run_of(c: &Cluster, group: &str, epoch: u64) -> (Vec<(u64, u64)>, usize, usize) {
    let (mut acks, mut starts, mut exits) = (Vec::new(), 0, 0);
    for e in ack_events(&c.ack_log(group)) {
        match e {
            AckEvent::Ack {
                instance,
                epoch: x,
                counter,
            } if x == epoch => acks.push((instance, counter)),
            AckEvent::Start { epoch: x, .. } if x == epoch => starts += 1,
            AckEvent::Exit { epoch: x, .. } if x == epoch => exits += 1,
            _ => {}
        }
    }
    (acks, starts, exits)
}

/// Per group: acknowledged writes of its run so far.
pub(crate) fn ack_counts(
    c: &Cluster,
    runs: &BTreeMap<String, (u16, u64)>,
) -> BTreeMap<String, usize> {
    runs.iter()
        .map(|(g, &(_, e))| (g.clone(), c.acked_in_epoch(g, e)))
        .collect()
}

/// Group (name, node) on LUN `node`, preferring that node: one group per node.
pub(crate) fn group_per_node(groups: &[(&str, u16)]) -> Vec<GroupSpec> {
    groups
        .iter()
        .map(|&(name, node)| {
            let mut g = GroupSpec::new(name, u64::from(node));
            g.preferred = vec![node_name(node)];
            g
        })
        .collect()
}

/// Start the agents of nodes 1..=N; wait until each group runs on its node and has
/// acknowledged 5 writes. Per group: (node, epoch) of its run.
pub(crate) async fn start_runs(
    c: &mut Cluster,
    groups: &[(&str, u16)],
) -> BTreeMap<String, (u16, u64)> {
    for id in 1..=c.nodes {
        c.start_agent(id);
    }
    let mut runs = BTreeMap::new();
    for &(g, node) in groups {
        let r = c.wait_running(g, Some(node), T).await;
        c.wait_acks(g, r.epoch, 5, T).await;
        runs.insert(g.to_string(), (node, r.epoch));
    }
    runs
}

/// Whether every guest of the cluster is stopped (SIGSTOP: paused).
fn all_guests_paused(c: &Cluster) -> bool {
    let g = c.guests();
    g.len() == GROUPS.len() && g.iter().all(|&(_, _, stopped)| stopped)
}

/// `ctl status` on node1 while the target is down: node1's paused group from its
/// paused.json, since when and why, then the error; and the same as JSON.
async fn ctl_status_during_the_outage(c: &Cluster) {
    // The agent writes the file right after pausing its guests: wait for that moment.
    let file = c.path("node1").join(holdfast::agent::node::PAUSE_FILE);
    let end = Instant::now() + T;
    while !std::fs::read_to_string(&file).is_ok_and(|t| t.contains("\"a\"")) {
        assert!(
            Instant::now() < end,
            "node1 never listed a in {}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = c.ctl(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ctl status with the target down must fail: {stdout}{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("a "))
        .unwrap_or_else(|| panic!("no paused group a in ctl status:\n{stdout}\n{stderr}"));
    assert!(
        line.contains("no completed heartbeat write") && line.contains(" ago"),
        "paused group a without why or since when: {line:?}"
    );
    assert!(
        !stdout.lines().any(|l| l.trim_start().starts_with("b ")),
        "node2's group b shown as paused on node1:\n{stdout}"
    );
    assert!(
        stderr.contains("holdfast ctl:"),
        "no error after the paused groups: {stderr}"
    );
    let out = c.ctl(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl status --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["ok"], false, "{v}");
    let paused = v["paused_here"].as_array().expect("paused_here");
    assert_eq!(paused.len(), 1, "{v}");
    assert_eq!(paused[0]["group"], "a", "{v}");
    assert!(
        paused[0]["paused_for_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{v}"
    );
    assert!(paused[0]["since_wall_ms"].as_u64().is_some(), "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    println!("ctl status during the outage:\n{stdout}{stderr}");
}

/// One outage of `secs`: kill the target, keep it down, restart it; check that the
/// guests stopped acknowledging meanwhile and continue in the same run afterwards, and
/// that a pause (if any) was resumed. Returns each group's pause in ms (0: none).
async fn outage(
    c: &mut Cluster,
    secs: u64,
    runs: &BTreeMap<String, (u16, u64)>,
    pids: &BTreeMap<u16, Vec<i32>>,
) -> BTreeMap<String, u64> {
    let t = Timings::default();
    let since = mono_ns();
    c.kill_target();
    let killed_at = Instant::now();
    // Acks already in flight when the target died may still land; none after this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = ack_counts(c, runs);
    let long = Duration::from_secs(secs) > t.self_fence_after + t.heartbeat_interval * 2;
    if long {
        let end = killed_at + t.self_fence_after + Duration::from_secs(5);
        while !all_guests_paused(c) {
            assert!(
                Instant::now() < end,
                "guests not paused {:?} into a {secs} s outage: {:?}\n{}",
                killed_at.elapsed(),
                c.guests(),
                c.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if secs == 10 {
            ctl_status_during_the_outage(c).await;
        }
    }
    let rest = Duration::from_secs(secs).saturating_sub(killed_at.elapsed());
    tokio::time::sleep(rest).await;
    assert_eq!(
        ack_counts(c, runs),
        during,
        "a guest acknowledged a write while the target was down\n{}",
        c.diagnostics()
    );
    c.start_target().await;
    let down = killed_at.elapsed();
    for (g, &(_, epoch)) in runs {
        c.wait_acks(g, epoch, during[g] + 10, T).await;
    }
    let resumed_after = killed_at.elapsed() - down;
    for (id, p) in pids {
        assert_eq!(
            &c.guest_pids(*id),
            p,
            "node{id}'s guests changed over a {secs} s outage\n{}",
            c.diagnostics()
        );
    }
    let mut pauses = BTreeMap::new();
    for (g, &(_, epoch)) in runs {
        let paused = events_of(c, "paused", g, since);
        let resumed = events_of(c, "resumed", g, since);
        let what = format!("{g}, {secs} s outage: paused {paused:?}, resumed {resumed:?}");
        assert_eq!(paused.len(), resumed.len(), "{what}\n{}", c.diagnostics());
        assert!(paused.len() <= 1, "{what}");
        if long {
            assert_eq!(paused.len(), 1, "{what}\n{}", c.diagnostics());
        }
        for e in paused.iter().chain(&resumed) {
            assert_eq!(e["epoch"].as_u64(), Some(epoch), "{what}");
        }
        let ms = resumed.first().and_then(|e| e["paused_ms"].as_u64());
        if long {
            let ms = ms.expect("paused_ms");
            let least = (secs * 1000).saturating_sub(t.self_fence_after.as_millis() as u64);
            assert!(
                ms >= least && ms <= secs * 1000 + T.as_millis() as u64,
                "{what}: paused for {ms} ms"
            );
        }
        pauses.insert(g.clone(), ms.unwrap_or(0));
    }
    println!(
        "{secs} s outage (target down {:.1} s): guests acking again {:.1} s after the restart; \
         pauses (ms) {pauses:?}",
        down.as_secs_f64(),
        resumed_after.as_secs_f64()
    );
    pauses
}

/// Each group's run goes on: one start line and no exit in its epoch, every ack from
/// the same guest instance, counters consecutive across the gaps.
pub(crate) fn assert_runs_continue(c: &Cluster, runs: &BTreeMap<String, (u16, u64)>) {
    for (g, &(_, epoch)) in runs {
        let (acks, starts, exits) = run_of(c, g, epoch);
        assert_eq!(
            (starts, exits),
            (1, 0),
            "{g}: run {epoch} restarted or exited"
        );
        let instance = acks[0].0;
        assert!(
            acks.iter().all(|&(i, _)| i == instance),
            "{g}: acks of run {epoch} from several guest instances"
        );
        let gaps: Vec<(u64, u64)> = acks
            .windows(2)
            .filter(|w| w[1].1 != w[0].1 + 1)
            .map(|w| (w[0].1, w[1].1))
            .collect();
        assert!(
            gaps.is_empty(),
            "{g}: counters of run {epoch} not consecutive: {gaps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_restarts_after_1_10_and_60_s_pause_and_resume_every_vm_in_place() {
    let t = Timings::default();
    // 10 s and 60 s outages outlast self_fence_after and dead_after, and stay below
    // max_pause: every VM pauses and must come back, in place.
    assert!(Duration::from_secs(10) > t.dead_after && Duration::from_secs(10) > t.self_fence_after);
    assert!(Duration::from_secs(60) + T < t.max_pause);
    let mut c = Cluster::new(3, group_per_node(&GROUPS)).await;
    let runs = start_runs(&mut c, &GROUPS).await;
    let pids: BTreeMap<u16, Vec<i32>> = (1..=3).map(|id| (id, c.guest_pids(id))).collect();
    assert!(
        pids.values().all(|p| p.len() == 1),
        "one guest per node expected: {pids:?}"
    );
    let since = mono_ns();
    let mut measured = Vec::new();
    for secs in [1, 10, 60] {
        measured.push((secs, outage(&mut c, secs, &runs, &pids).await));
    }
    for (g, &(node, epoch)) in &runs {
        let r = c.record(g).await.expect("record");
        assert_eq!(
            (r.owner, r.epoch),
            (node, epoch),
            "{g} moved or restarted: {r:?}"
        );
        let acts: Vec<String> = c
            .events()
            .iter()
            .filter(|e| e["mono_ns"].as_u64().is_some_and(|t| t >= since))
            .filter(|e| {
                let ev = e["event"].as_str().unwrap_or("");
                (e["group"] == g.as_str() && !ALLOWED.contains(&ev))
                    || (e["group"] == "" && NODE_FORBIDDEN.contains(&ev))
            })
            .map(|e| format!("{} {}: {}", e["node"], e["event"], e["reason"]))
            .collect();
        assert!(
            acts.is_empty(),
            "{g}: outages killed, fenced or restarted: {acts:?}\n{}",
            c.diagnostics()
        );
    }
    assert_runs_continue(&c, &runs);
    let out = c.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("PAUSED"),
        "ctl status after the outages: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (g, _) in GROUPS {
        let report = c.check(g);
        println!("check {g}: {}", report.lines().last().unwrap_or(""));
    }
    println!("agent_outage: pauses per outage (s → group → ms): {measured:?}");
}

/// An outage longer than `max_pause` (5 s here, so the test is short): each paused VM
/// is killed when its pause expires ("pause-expired"), never resumed; once the target
/// answers, its record (still naming the owner) is released and the group starts
/// again in a new epoch. The old run never writes again: the checker is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_max_pause_kills_the_paused_vm_and_the_group_starts_again() {
    let t = Timings {
        max_pause: Duration::from_secs(5),
        ..Timings::default()
    };
    let mut g = GroupSpec::new("x", 1);
    g.preferred = vec![node_name(1)];
    let mut c = Cluster::new(3, vec![g]).await;
    for id in 1..=3 {
        c.write_node_config(id, &t);
        c.start_agent(id);
    }
    let r = c.wait_running("x", Some(1), T).await;
    c.wait_acks("x", r.epoch, 5, T).await;
    let old = c.guest_pids(1);
    assert_eq!(old.len(), 1, "node1's guests: {old:?}");
    let since = mono_ns();
    c.kill_target();
    let killed_at = Instant::now();
    let down = t.self_fence_after + t.max_pause + Duration::from_secs(5);
    let end = killed_at + down;
    while events_of(&c, "pause-expired", "x", since).is_empty() {
        assert!(
            Instant::now() < end,
            "no pause-expired within {down:?} of the outage\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired_after = killed_at.elapsed();
    // The target is still down: node1 says nothing is paused any more.
    let out = c.ctl(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code() == Some(1) && stdout.contains("no group is paused on this node"),
        "ctl status after the pause expired: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(down.saturating_sub(killed_at.elapsed())).await;
    let old_acks = c.acked_in_epoch("x", r.epoch);
    c.start_target().await;
    let r2 = c
        .wait_record("x", T, "running in a new epoch", |x| {
            x.state == GroupState::Running && x.epoch > r.epoch
        })
        .await;
    c.wait_acks("x", r2.epoch, 10, T).await;
    assert!(
        old.iter().all(|&p| !c.is_running(p)),
        "the expired VM still runs"
    );
    assert_eq!(
        c.acked_in_epoch("x", r.epoch),
        old_acks,
        "the expired run acknowledged writes after the outage"
    );
    let resumed = events_of(&c, "resumed", "x", since);
    assert!(
        resumed.is_empty(),
        "an expired pause was resumed: {resumed:?}"
    );
    let paused = events_of(&c, "paused", "x", since);
    assert_eq!(paused.len(), 1, "{paused:?}\n{}", c.diagnostics());
    let released = events_of(&c, "orphan-released", "x", since);
    assert!(
        matches!(&released[..], [e] if e["reason"] == "record of this node whose VM is gone"),
        "the record of the expired VM was not released as this node's: {released:?}"
    );
    println!(
        "max_pause {:?}: pause expired {:.1} s into the outage; x runs again on node{} in \
         epoch {} (was {})",
        t.max_pause,
        expired_after.as_secs_f64(),
        r2.owner,
        r2.epoch,
        r.epoch
    );
    c.check("x");
}
