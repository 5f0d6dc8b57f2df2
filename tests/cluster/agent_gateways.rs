//! Issue 14's agent test: a three-node cluster whose storage is two holdfast gateways
//! on Ceph RBD (tests/common/gateways.rs; its own throwaway Ceph cluster), the nodes
//! spread over them (node i lists both portals, starting from a different gateway), a
//! test guest per node writing through the same gateway as its agent.
//!
//! 1. kill -9 of gateway 2 under the guests' writes. Node 2's agent and guest lose
//!    their path and log in through gateway 1: no VM is paused, stopped, restarted or
//!    moved, no node is fenced, every run goes on in its epoch with consecutive
//!    counters. Their registrations are ALL_TG_PT, so the new path is registered.
//! 2. SIGSTOP of an OSD (a hung one): I/O to its objects stalls until Ceph marks it
//!    down (about 20 s), then continues. VMs may pause meanwhile (the pause/resume rule)
//!    and every pause is resumed; none is killed or moved. Then SIGCONT, and the test
//!    waits for every placement group to be clean again.
//! 3. kill -9 of another OSD: a short stall (its peers see refused connections), the
//!    same rules.
//! 4. Every run went on in its epoch, and the checker is clean for every group (read
//!    through gateway 1).
//!
//! KEEP_CLUSTER=1 keeps the cluster's files (gwN.log, agentN.log, ack logs).

use crate::agent_outage::{ack_counts, assert_runs_continue, group_per_node, start_runs};
use crate::common;

use common::cluster::Cluster;
use holdfast::agent::node::mono_ns;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// Ceph marks a dead OSD down after its heartbeat grace (20 s by default), then the
/// placement groups re-peer.
const OSD_T: Duration = Duration::from_secs(120);
const GROUPS: [(&str, u16); 3] = [("a", 1), ("b", 2), ("c", 3)];
/// Events that mean a VM or a node was disturbed beyond a pause.
const DISTURBED: [&str; 10] = [
    "fenced",
    "self-fence",
    "rejoin",
    "claimed",
    "claim-failed",
    "vm-started",
    "vm-restart",
    "vm-killed",
    "pause-expired",
    "offline",
];
const PAUSES: [&str; 2] = ["paused", "resumed"];

/// Events since `since` whose kind is in `kinds`, as "node event group: reason".
fn events_among(c: &Cluster, since: u64, kinds: &[&str]) -> Vec<String> {
    c.events()
        .iter()
        .filter(|e| e["mono_ns"].as_u64().is_some_and(|t| t >= since))
        .filter(|e| kinds.contains(&e["event"].as_str().unwrap_or("")))
        .map(|e| {
            format!(
                "{} {} {}: {}",
                e["node"], e["event"], e["group"], e["reason"]
            )
        })
        .collect()
}

/// Wait until every run has acknowledged `more` writes beyond `from`; how long the
/// group that waited longest for its first new ack took.
async fn wait_all_ack(
    c: &Cluster,
    runs: &BTreeMap<String, (u16, u64)>,
    from: &BTreeMap<String, usize>,
    more: usize,
    timeout: Duration,
) -> BTreeMap<String, Duration> {
    let t0 = Instant::now();
    let mut first_new = BTreeMap::new();
    loop {
        let now = ack_counts(c, runs);
        for (g, &n) in &now {
            if n > from[g] {
                first_new.entry(g.clone()).or_insert_with(|| t0.elapsed());
            }
        }
        if now.iter().all(|(g, &n)| n >= from[g] + more) {
            return first_new;
        }
        assert!(
            t0.elapsed() < timeout,
            "writes did not go on within {timeout:?}: {now:?} (from {from:?})\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Node `id`'s agent logged in through `portal` (its log says so).
fn agent_used(c: &Cluster, id: u16, portal: std::net::SocketAddr) -> bool {
    let log = std::fs::read_to_string(c.path(&format!("agent{id}.log"))).unwrap_or_default();
    log.lines()
        .any(|l| l.contains("quorum LUN joined") && l.contains(&format!("portal={portal}")))
}

fn signal_osd(c: &Cluster, id: u32, sig: Signal) {
    let dir = &c.gateways.as_ref().expect("on Ceph").ceph.dir;
    let pid = std::fs::read_to_string(dir.join(format!("run/osd.{id}.pid"))).expect("osd pid");
    let pid = pid.trim().parse::<i32>().expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal the OSD");
}

/// Wait until `ceph pg stat` reports every placement group active+clean.
async fn wait_clean(c: &Cluster) {
    let conf = c.gateways.as_ref().expect("on Ceph").ceph.conf();
    let end = Instant::now() + OSD_T;
    loop {
        let out = std::process::Command::new("ceph")
            .arg("-c")
            .arg(&conf)
            .args(["pg", "stat", "--format", "json"])
            .output()
            .expect("ceph pg stat");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let states = v["pg_summary"]["num_pg_by_state"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if states.len() == 1 && states[0]["name"] == "active+clean" {
            return;
        }
        assert!(Instant::now() < end, "placement groups not clean: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every "paused" since `since` has its "resumed"; both, as text.
fn pauses_resumed(c: &Cluster, since: u64) -> Vec<String> {
    let n = |kind: &str| events_among(c, since, &[kind]).len();
    assert_eq!(
        n("paused"),
        n("resumed"),
        "a paused VM was not resumed\n{}",
        c.diagnostics()
    );
    events_among(c, since, &PAUSES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_or_an_osd_killed_under_load_kills_no_vm() {
    let mut c = Cluster::new_on_ceph(3, group_per_node(&GROUPS), 2).await;
    let portals = c.gateways.as_ref().expect("on Ceph").portals.clone();
    let runs = start_runs(&mut c, &GROUPS).await;
    assert!(
        agent_used(&c, 2, portals[1]) && agent_used(&c, 1, portals[0]),
        "nodes not spread over the gateways\n{}",
        c.diagnostics()
    );
    let pids: BTreeMap<u16, Vec<i32>> = (1..=3).map(|id| (id, c.guest_pids(id))).collect();

    // 1. A gateway dies under load.
    let since = mono_ns();
    let before = ack_counts(&c, &runs);
    c.gateways.as_mut().expect("on Ceph").kill(2);
    let gaps = wait_all_ack(&c, &runs, &before, 50, T).await;
    let bad = events_among(&c, since, &[&DISTURBED[..], &PAUSES[..]].concat());
    assert!(
        bad.is_empty(),
        "a dead gateway disturbed VMs or nodes: {bad:?}\n{}",
        c.diagnostics()
    );
    assert!(
        agent_used(&c, 2, portals[0]),
        "node2's agent did not move to gateway 1\n{}",
        c.diagnostics()
    );
    println!("gateway 2 killed: first write acknowledged after {gaps:?}");

    // 2. An OSD hangs under load (SIGSTOP): its objects stall until Ceph marks it down
    // (osd_heartbeat_grace, 20 s), longer than self_fence_after: a VM may pause, and
    // must resume.
    let since_osd = mono_ns();
    let before = ack_counts(&c, &runs);
    signal_osd(&c, 1, Signal::SIGSTOP);
    let stalls = wait_all_ack(&c, &runs, &before, 50, OSD_T).await;
    signal_osd(&c, 1, Signal::SIGCONT);
    let pauses = pauses_resumed(&c, since_osd);
    println!("OSD 1 hung: first write acknowledged after {stalls:?}; pauses: {pauses:?}");
    wait_clean(&c).await;

    // 3. An OSD dies under load: its peers see the refused connections at once.
    let since_kill = mono_ns();
    let before = ack_counts(&c, &runs);
    signal_osd(&c, 0, Signal::SIGKILL);
    let stalls = wait_all_ack(&c, &runs, &before, 50, OSD_T).await;
    let pauses = pauses_resumed(&c, since_kill);
    println!("OSD 0 killed: first write acknowledged after {stalls:?}; pauses: {pauses:?}");
    let bad = events_among(&c, since_osd, &DISTURBED);
    assert!(
        bad.is_empty(),
        "an OSD outage killed, moved or fenced: {bad:?}\n{}",
        c.diagnostics()
    );

    // 4. Every run went on, in place, and nothing acknowledged was lost.
    for (g, &(node, epoch)) in &runs {
        let r = c.record(g).await.expect("record");
        assert_eq!((r.owner, r.epoch), (node, epoch), "{g} moved: {r:?}");
    }
    for (id, p) in &pids {
        assert_eq!(&c.guest_pids(*id), p, "node{id}'s guests changed");
    }
    assert_runs_continue(&c, &runs);
    for (g, _) in GROUPS {
        let report = c.check(g);
        println!("check {g}: {}", report.lines().last().unwrap_or(""));
    }
}
