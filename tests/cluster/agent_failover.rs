//! The agent as separate processes: a target, three agents, a test guest per group
//! writing a counter through its own iSCSI session. Each test ends with the checker
//! (`holdfast guest check`): no lost acknowledged write, no double run, no late write.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use holdfast::agent::config::{Failback, OfflineAction, Timings};
use holdfast::agent::quorum::{AdminState, GroupState};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn preferred(g: &str, lun: u64, nodes: &[u16]) -> GroupSpec {
    let mut s = GroupSpec::new(g, lun);
    s.preferred = nodes.iter().map(|&n| node_name(n)).collect();
    s
}

async fn three_nodes(groups: Vec<GroupSpec>) -> Cluster {
    let mut c = Cluster::new(3, groups).await;
    for id in 1..=3 {
        c.start_agent(id);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_moves_the_group_to_a_survivor() {
    let mut c = three_nodes(vec![preferred("web", 1, &[1, 2, 3])]).await;
    let r = c.wait_running("web", Some(1), T).await;
    c.wait_acks("web", r.epoch, 20, T).await;
    let killed = Instant::now();
    c.kill_node(1);
    let r2 = c.wait_running_elsewhere("web", 1, T).await;
    let took = killed.elapsed();
    assert!(r2.owner == 2 || r2.owner == 3, "{r2:?}");
    assert!(r2.epoch > r.epoch);
    c.wait_acks("web", r2.epoch, 20, T).await;
    eprintln!("failover took {took:?}");
    // The survivor fenced node 1 on the quorum LUN.
    let img = c.image().await;
    assert!(img.admin(1).fence_count >= 1, "{:?}", img.admin(1));
    c.check("web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_is_fenced_and_its_late_writes_are_refused() {
    let c = three_nodes(vec![preferred("db", 1, &[1, 2, 3])]).await;
    let r = c.wait_running("db", Some(1), T).await;
    c.wait_acks("db", r.epoch, 20, T).await;
    let frozen = c.freeze_node(1);
    let r2 = c.wait_running_elsewhere("db", 1, T).await;
    assert_ne!(r2.owner, 1);
    c.wait_acks("db", r2.epoch, 20, T).await;
    // Wake the old guest first (its agent still frozen): its next write reaches the
    // target, which must refuse it with RESERVATION CONFLICT (the guest exits 75).
    let (agent, old_guest) = (frozen[0], frozen[1..].to_vec());
    assert!(
        !old_guest.is_empty(),
        "no guest process under node1's agent"
    );
    c.thaw(&old_guest);
    let end = Instant::now() + T;
    while !c
        .acks("db")
        .iter()
        .any(|l| l.starts_with("conflict ") && l.split(' ').nth(2) == Some(&r.epoch.to_string()))
    {
        assert!(
            Instant::now() < end,
            "the old run's write was not refused\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then its agent: it finds itself fenced, kills what is left and rejoins.
    c.thaw(&[agent]);
    let end = Instant::now() + T;
    while old_guest.iter().any(|&p| c.is_running(p)) {
        assert!(
            Instant::now() < end,
            "the old guest still runs\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node 1 rejoins as a new incarnation and is alive again.
    let end = Instant::now() + T;
    loop {
        let ev = c.events();
        if ev
            .iter()
            .any(|e| e["node"] == "node1" && e["event"] == "rejoin")
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "node1 did not rejoin\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r3 = c.record("db").await.unwrap();
    assert_eq!(r3.owner, r2.owner, "the group must stay with the new owner");
    c.wait_acks("db", r2.epoch, 40, T).await;
    c.check("db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_survivors_racing_for_a_group_one_wins() {
    // Every node's config names itself the preferred owner, so when the owner dies both
    // survivors believe they should claim, and both do at once: COMPARE AND WRITE of
    // the group record lets exactly one win, and the loser never starts the VM.
    let mut g = GroupSpec::new("race", 1);
    g.prefer_self = true;
    let mut c = three_nodes(vec![g]).await;
    let r = c.wait_running("race", None, T).await;
    c.wait_acks("race", r.epoch, 10, T).await;
    let owner = r.owner;
    c.kill_node(owner);
    let r2 = c.wait_running_elsewhere("race", owner, T).await;
    assert_ne!(r2.owner, owner);
    c.wait_acks("race", r2.epoch, 30, T).await;
    let claims: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "claimed" && e["group"] == "race" && e["epoch"].as_u64() > Some(r.epoch)
        })
        .collect();
    assert_eq!(claims.len(), 1, "exactly one claim must win: {claims:?}");
    // Both tried: the loser's COMPARE AND WRITE missed (no claim event, no VM start).
    let starts: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "vm-started"
                && e["group"] == "race"
                && e["epoch"].as_u64() > Some(r.epoch)
        })
        .collect();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let lost = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "claim-lost" && e["group"] == "race")
        .count();
    eprintln!("claims lost to the winner's COMPARE AND WRITE: {lost}");
    c.check("race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_threshold_then_failover() {
    let mut g = preferred("flaky", 1, &[1, 2, 3]);
    g.settings.restart_threshold = 2;
    g.settings.restart_period = Duration::from_secs(600);
    // Each run crashes (exit 1) after 10 acknowledged writes.
    g.guest_args.extend(["--fail-after".into(), "10".into()]);
    let mut c = three_nodes(vec![g]).await;
    // Node 1 starts it, restarts it twice, then gives it up; node 2 takes it.
    let r = c
        .wait_record(
            "flaky",
            Duration::from_secs(60),
            "failed over to node2",
            |r| r.owner == 2 && r.state == GroupState::Running,
        )
        .await;
    assert!(r.failed_on_node(1), "{r:?}");
    let restarts: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "vm-restart" && e["node"] == "node1")
        .collect();
    assert_eq!(restarts.len(), 2, "{restarts:?}");
    c.kill_node(2);
    c.kill_node(3);
    c.check("flaky");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_to_the_preferred_owner_when_it_returns() {
    let mut g = preferred("app", 1, &[1, 2]);
    g.settings.failback = Failback::Immediately;
    g.settings.offline_action = OfflineAction::Save;
    let mut c = three_nodes(vec![g]).await;
    let r = c.wait_running("app", Some(1), T).await;
    c.wait_acks("app", r.epoch, 10, T).await;
    c.kill_node(1);
    let r2 = c.wait_running("app", Some(2), T).await;
    c.wait_acks("app", r2.epoch, 10, T).await;
    c.start_agent(1);
    let r3 = c.wait_running("app", Some(1), T).await;
    assert!(r3.epoch > r2.epoch);
    c.wait_acks("app", r3.epoch, 10, T).await;
    let ev = c.events();
    assert!(
        ev.iter().any(|e| e["event"] == "offline"
            && e["node"] == "node2"
            && e["reason"].as_str().unwrap_or("").contains("failback")),
        "no failback event\n{}",
        c.diagnostics()
    );
    c.check("app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_move_saves_hands_over_and_restores() {
    let mut g = preferred("vm1", 1, &[1, 2, 3]);
    g.settings.offline_action = OfflineAction::Save;
    let c = three_nodes(vec![g]).await;
    let r = c.wait_running("vm1", Some(1), T).await;
    c.wait_acks("vm1", r.epoch, 10, T).await;
    let out = c.ctl(&["move", "vm1", "node3", "--wait", "30"]);
    assert!(
        out.status.success(),
        "ctl move: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r2 = c.wait_running("vm1", Some(3), T).await;
    c.wait_acks("vm1", r2.epoch, 10, T).await;
    let ev = c.events();
    let started = ev
        .iter()
        .find(|e| e["event"] == "vm-started" && e["node"] == "node3")
        .expect("started on node3");
    assert_eq!(started["restored"], true, "{started}");
    c.check("vm1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_keeps_a_stopped_guest_stopped() {
    let mut c = three_nodes(vec![preferred("m", 1, &[2, 1, 3])]).await;
    let r = c.wait_running("m", Some(2), T).await;
    c.wait_acks("m", r.epoch, 5, T).await;
    let out = c.ctl(&["offline", "m", "--wait", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks_then = c.acks("m").len();
    // Long enough for any node to have (wrongly) restarted it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rec = c.record("m").await.unwrap();
    assert_eq!(rec.state, GroupState::Stopped);
    assert_eq!(rec.admin, AdminState::Offline);
    assert_eq!(
        c.acks("m").len(),
        acks_then,
        "nothing may write while offline"
    );
    // Killing the old owner changes nothing either.
    c.kill_node(2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(c.record("m").await.unwrap().state, GroupState::Stopped);
    // Back online: it is placed and runs again.
    let out = c.ctl(&["online", "m", "--wait", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r2 = c.wait_running_elsewhere("m", 2, T).await;
    c.wait_acks("m", r2.epoch, 5, T).await;
    c.check("m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_shut_down_by_its_admin_is_not_restarted() {
    let mut g = preferred("quiet", 1, &[1, 2]);
    // The guest exits 0 after 15 writes: its administrator shut it down.
    g.guest_args.extend(["--exit-after".into(), "15".into()]);
    let mut c = three_nodes(vec![g]).await;
    let r = c
        .wait_record("quiet", T, "offline after a clean shutdown", |r| {
            r.admin == AdminState::Offline && r.state == GroupState::Stopped
        })
        .await;
    assert!(r.reason.contains("shut down"), "{r:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.record("quiet").await.unwrap().state, GroupState::Stopped);
    c.kill_node(1);
    c.check("quiet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_restart_changes_no_owner_and_stops_no_vm() {
    let mut c = three_nodes(vec![preferred("a", 1, &[1, 2]), preferred("b", 2, &[2, 1])]).await;
    let ra = c.wait_running("a", Some(1), T).await;
    let rb = c.wait_running("b", Some(2), T).await;
    c.wait_acks("a", ra.epoch, 10, T).await;
    c.wait_acks("b", rb.epoch, 10, T).await;
    c.kill_target();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.start_target().await;
    let before_a = c.acked_in_epoch("a", ra.epoch);
    let before_b = c.acked_in_epoch("b", rb.epoch);
    // The same runs keep writing: same epochs, same owners.
    c.wait_acks("a", ra.epoch, before_a + 20, T).await;
    c.wait_acks("b", rb.epoch, before_b + 20, T).await;
    let a2 = c.record("a").await.unwrap();
    let b2 = c.record("b").await.unwrap();
    assert_eq!((a2.owner, a2.epoch), (1, ra.epoch), "{a2:?}");
    assert_eq!((b2.owner, b2.epoch), (2, rb.epoch), "{b2:?}");
    assert!(
        !c.events()
            .iter()
            .any(|e| e["event"] == "self-fence" || e["event"] == "vm-killed"),
        "a target restart must not stop VMs\n{}",
        c.diagnostics()
    );
    c.check("a");
    c.check("b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_groups_away_and_status_shows_the_cluster() {
    let c = three_nodes(vec![
        preferred("d1", 1, &[1, 2, 3]),
        preferred("d2", 2, &[1, 3, 2]),
    ])
    .await;
    let r1 = c.wait_running("d1", Some(1), T).await;
    let r2 = c.wait_running("d2", Some(1), T).await;
    c.wait_acks("d1", r1.epoch, 5, T).await;
    c.wait_acks("d2", r2.epoch, 5, T).await;
    let out = c.ctl(&["drain", "node1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_running("d1", Some(2), T).await;
    c.wait_running("d2", Some(3), T).await;
    let out = c.ctl(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n1 = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node1")
        .unwrap();
    assert_eq!(n1["drained"], true);
    assert_eq!(n1["alive"], true);
    let g = st["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "d1")
        .unwrap();
    assert_eq!(g["owner"], "node2");
    let lun1 = st["luns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lun"] == 1)
        .unwrap();
    assert!(
        lun1["reservation"].as_str().unwrap().contains("node2"),
        "{lun1}"
    );
    let out = c.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("GROUPS") && text.contains("d2") && text.contains("RESERVATIONS"),
        "{text}"
    );
    c.check("d1");
    c.check("d2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_an_agent_hands_its_groups_over() {
    let mut g = preferred("h", 1, &[1, 2, 3]);
    g.settings.offline_action = OfflineAction::Save;
    let mut c = three_nodes(vec![g]).await;
    let r = c.wait_running("h", Some(1), T).await;
    c.wait_acks("h", r.epoch, 10, T).await;
    let t0 = Instant::now();
    c.stop_agent(1);
    let r2 = c.wait_running_elsewhere("h", 1, T).await;
    let took = t0.elapsed();
    assert_eq!(r2.owner, 2, "the next preferred owner takes it: {r2:?}");
    // Handed over by name: no waiting for node1 to be declared dead.
    assert!(took < Duration::from_secs(3), "hand-over took {took:?}");
    let img = c.image().await;
    assert_eq!(
        img.slot(1).map(|s| s.state),
        Some(holdfast::agent::quorum::NodeState::Left)
    );
    assert_eq!(img.admin(1).fence_count, 0, "a clean stop is not fenced");
    c.wait_acks("h", r2.epoch, 10, T).await;
    c.check("h");
}

/// With pausing switched off (`max_pause = 0`), an outage longer than self_fence_after
/// kills the VMs at once, as before pausing existed. (With the default, the VMs pause
/// and resume in place: tests/cluster/agent_outage.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pausing_off_a_node_cut_off_from_the_target_self_fences_and_recovers() {
    let mut c = Cluster::new(3, vec![preferred("cut", 1, &[1, 2])]).await;
    let no_pause = Timings {
        max_pause: Duration::ZERO,
        ..Timings::default()
    };
    for id in 1..=3 {
        c.write_node_config(id, &no_pause);
        c.start_agent(id);
    }
    let r = c.wait_running("cut", Some(1), T).await;
    c.wait_acks("cut", r.epoch, 10, T).await;
    let guest: Vec<i32> = c.node_pids(1)[1..].to_vec();
    let since = holdfast::agent::node::mono_ns();
    // Longer than self_fence_after (2 s): every node loses the quorum LUN.
    c.kill_target();
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The owner killed its VM on its own, with the target unreachable.
    assert!(
        c.events()
            .iter()
            .any(|e| e["node"] == "node1" && e["event"] == "self-fence"),
        "no self-fence\n{}",
        c.diagnostics()
    );
    assert!(
        guest.iter().all(|&p| !c.is_running(p)),
        "the VM survived the self-fence"
    );
    assert!(
        !c.events()
            .iter()
            .any(|e| e["event"] == "paused" && e["mono_ns"].as_u64().is_some_and(|t| t >= since)),
        "a VM was paused with max_pause = 0\n{}",
        c.diagnostics()
    );
    c.start_target().await;
    // The group comes back under a new epoch (the old record is an orphan).
    let r2 = c
        .wait_record("cut", T, "running again after the outage", |x| {
            x.state == GroupState::Running && x.epoch > r.epoch
        })
        .await;
    c.wait_acks("cut", r2.epoch, 10, T).await;
    c.check("cut");
}
