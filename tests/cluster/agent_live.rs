//! Live migration (`ctl move --live`) between two agents, with real QEMU under the
//! process driver and its QMP socket: a minimal guest (no OS, 64 MiB, the group's LUN
//! attached over iscsi:// with the node's VM initiator name), which runs and migrates
//! like any other. QEMU must be installed: these tests fail without it.

use crate::common;
use common::cluster::{events_named, show_output};

use common::cluster::{node_name, Cluster, GroupSpec, CLUSTER, TARGET};
use holdfast::agent::config::{ProcessVm, Timings, VmConfig};
use holdfast::agent::quorum::{self, GroupRecord, GroupState};
use holdfast::cli::cluster_kit as kit;
use holdfast::initiator::{InitiatorConfig, InitiatorError, Session};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(40);
const LUN: u64 = 1;

fn qemu_installed() {
    let found = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): live \
         migration needs a real QEMU"
    );
}

/// The guest: `mem` MiB (the same on both nodes, or the incoming migration fails).
fn qemu_vm(mem: u32) -> VmConfig {
    let command = [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-m",
        &mem.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-iscsi",
        "initiator-name={initiator_name}",
        "-drive",
        "file={disk0},format=raw,if=virtio,cache=none",
        "-qmp",
        "unix:{state_dir}/{group}.qmp,server=on,wait=off",
    ]
    .map(String::from)
    .to_vec();
    VmConfig::Process(ProcessVm {
        qmp: Some("{state_dir}/{group}.qmp".into()),
        ..ProcessVm::new(command)
    })
}

/// Two nodes, group g1 preferring node1; node `n`'s guest gets `mem[n-1]` MiB.
async fn cluster(mem: [u32; 2]) -> Cluster {
    qemu_installed();
    let mut g = GroupSpec::new("g1", LUN);
    g.preferred = vec![node_name(1)];
    let mut c = Cluster::new(2, vec![g]).await;
    let timings = Timings {
        migration_timeout: Duration::from_secs(20),
        ..Timings::default()
    };
    for id in 1..=2u16 {
        let mut cfg = c.kit.node_config(id, &c.groups, &timings);
        cfg.groups[0].vm = qemu_vm(mem[usize::from(id) - 1]);
        kit::write_toml(&c.node_config(id), "", &cfg).unwrap();
    }
    c.start_agent(1);
    c.start_agent(2);
    c
}

/// The pid of node `id`'s QEMU for g1, from the process driver's pid file.
fn qemu_pid(c: &Cluster, id: u16) -> Option<i32> {
    let text = std::fs::read_to_string(vm_file(c, id, "g1.pid")).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    c.is_running(pid).then_some(pid)
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

fn vm_file(c: &Cluster, id: u16, name: &str) -> PathBuf {
    c.path(&node_name(id)).join(name)
}

/// QMP query-status of node `id`'s guest (or why it cannot be asked: a QEMU just
/// started may not have created its socket yet).
fn guest_status(c: &Cluster, id: u16) -> String {
    use holdfast::agent::driver::qmp::{self, Qmp};
    let asked = Qmp::connect(&vm_file(c, id, "g1.qmp"), Duration::from_secs(5))
        .and_then(|mut q| qmp::run_state(&mut q));
    asked.unwrap_or_else(|e| format!("no answer: {e}"))
}

async fn keys(c: &Cluster) -> Vec<u64> {
    let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:keys", TARGET, c.addr);
    let s = Session::login(cfg).await.unwrap();
    let (_, keys) = s.read_keys(LUN).await.unwrap();
    let _ = s.logout().await;
    keys
}

fn vm_initiator(id: u16) -> String {
    format!("iqn.2026-11.org.holdfast:{CLUSTER}.{}.vm", node_name(id))
}

fn settled_on(r: &GroupRecord, id: u16) -> bool {
    r.owner == id && r.state == GroupState::Running && r.migration.is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_move_hands_the_running_guest_and_its_disk_over() {
    let c = cluster([64, 64]).await;
    let before = c.wait_running("g1", Some(1), T).await;
    wait_until("node1's QEMU", &c, || qemu_pid(&c, 1).is_some()).await;
    let src_pid = qemu_pid(&c, 1).unwrap();
    // The process driver's start returns once QEMU is spawned: its QMP socket may come
    // a moment later on a busy machine.
    wait_until("node1's guest running (QMP)", &c, || {
        guest_status(&c, 1) == "running"
    })
    .await;

    let t0 = Instant::now();
    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "40"]);
    eprintln!("ctl move --live: {}", show_output(&out));
    assert!(
        out.status.success(),
        "{}\n{}",
        show_output(&out),
        c.diagnostics()
    );
    let moved_in = t0.elapsed();
    let after = c
        .wait_record("g1", T, "settled on node2", |r| settled_on(r, 2))
        .await;
    assert_eq!(after.epoch, before.epoch + 1);
    assert_eq!(guest_status(&c, 2), "running");
    wait_until("node1's QEMU gone", &c, || !c.is_running(src_pid)).await;

    // Only node2's key is left on the disk, and node1's VM path is refused.
    let k = keys(&c).await;
    assert!(k.contains(&quorum::pr_key(CLUSTER, 2)), "{k:x?}");
    assert!(!k.contains(&quorum::pr_key(CLUSTER, 1)), "{k:x?}");
    let cfg = InitiatorConfig::new(vm_initiator(1), TARGET, c.addr);
    let s = Session::login(cfg).await.unwrap();
    let r = s.write16(LUN, 0, vec![7u8; 512].into(), 512, true).await;
    assert!(
        matches!(r, Err(InitiatorError::ReservationConflict)),
        "{r:?}"
    );

    let all = c.events();
    let done = events_named(&all, "migration-completed");
    let arrived = events_named(&all, "migrated-in");
    assert_eq!((done.len(), arrived.len()), (1, 1), "{all:#?}");
    eprintln!(
        "live migration: QEMU downtime {} ms, QEMU total {} ms; switchover {:.1} ms, \
         destination total {:.1} ms; request to running on node2 {} ms",
        done[0]["downtime_ms"],
        done[0]["total_ms"],
        arrived[0]["switchover_ms"].as_f64().unwrap(),
        arrived[0]["total_ms"].as_f64().unwrap(),
        moved_in.as_millis()
    );
    assert!(!events_named(&all, "migrated-out").is_empty(), "{all:#?}");
    let ring = c.ctl(&["events"]);
    let text = String::from_utf8_lossy(&ring.stdout);
    assert!(
        text.contains("migration-completed") && text.contains("downtime"),
        "{text}"
    );
}

/// The destination's QEMU dies before the switchover: its incoming migration fails
/// (it has another RAM size than the source's, so QEMU refuses the state and exits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_qemu_dying_before_switchover_leaves_the_guest_on_the_source() {
    let c = cluster([64, 96]).await;
    let before = c.wait_running("g1", Some(1), T).await;
    wait_until("node1's QEMU", &c, || qemu_pid(&c, 1).is_some()).await;
    let src_pid = qemu_pid(&c, 1).unwrap();

    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "40"]);
    eprintln!("ctl move --live: {}", show_output(&out));
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\n{}",
        show_output(&out),
        c.diagnostics()
    );
    let after = c
        .wait_record("g1", T, "back on node1", |r| settled_on(r, 1))
        .await;
    assert_eq!(after.epoch, before.epoch, "the run on node1 goes on");
    let all = c.events();
    assert!(
        !events_named(&all, "migration-failed").is_empty(),
        "{all:#?}"
    );
    wait_until("node1 cleaned up", &c, || {
        !events_named(&c.events(), "migration-aborted").is_empty()
    })
    .await;
    assert_eq!(qemu_pid(&c, 1), Some(src_pid));
    assert_eq!(guest_status(&c, 1), "running");
    assert_eq!(qemu_pid(&c, 2), None);
    let k = keys(&c).await;
    assert_eq!(k, vec![quorum::pr_key(CLUSTER, 1); k.len()], "{k:x?}");
}

/// The destination's QEMU is killed while it listens: the source's agent is held
/// (SIGSTOP, for less than `self_fence_after`) from the request until the kill, so the
/// kill lands before any migration can begin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_qemu_killed_while_listening_leaves_the_guest_on_the_source() {
    let c = cluster([64, 64]).await;
    let before = c.wait_running("g1", Some(1), T).await;
    wait_until("node1's QEMU", &c, || qemu_pid(&c, 1).is_some()).await;
    let src_pid = qemu_pid(&c, 1).unwrap();
    let agent1 = c.agent_pid(1).unwrap();
    signal(agent1, Signal::SIGSTOP);
    let held = Instant::now();
    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "0"]);
    assert!(out.status.success(), "{}", show_output(&out));
    c.wait_record("g1", T, "node2 listening", |r| {
        r.migration.as_ref().is_some_and(|m| !m.addr.is_empty())
    })
    .await;
    let dst_pid = qemu_pid(&c, 2).expect("node2's incoming QEMU");
    signal(dst_pid, Signal::SIGKILL);
    signal(agent1, Signal::SIGCONT);
    eprintln!("node1's agent held for {} ms", held.elapsed().as_millis());

    let after = c
        .wait_record("g1", T, "back on node1", |r| settled_on(r, 1))
        .await;
    assert_eq!(after.epoch, before.epoch, "the run on node1 goes on");
    wait_until("node1 cleaned up", &c, || {
        !events_named(&c.events(), "migration-aborted").is_empty()
    })
    .await;
    let all = c.events();
    assert!(
        !events_named(&all, "migration-failed").is_empty(),
        "{all:#?}"
    );
    assert!(events_named(&all, "migrated-in").is_empty(), "{all:#?}");
    assert_eq!(qemu_pid(&c, 1), Some(src_pid));
    assert_eq!(guest_status(&c, 1), "running");
    let k = keys(&c).await;
    assert_eq!(k, vec![quorum::pr_key(CLUSTER, 1); k.len()], "{k:x?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_node_killed_mid_migration_ends_in_a_failover() {
    let mut c = cluster([64, 64]).await;
    c.wait_running("g1", Some(1), T).await;
    wait_until("node1's QEMU", &c, || qemu_pid(&c, 1).is_some()).await;

    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "0"]);
    assert!(out.status.success(), "{}", show_output(&out));
    c.wait_record("g1", T, "a migration under way", |r| r.migration.is_some())
        .await;
    let killed = Instant::now();
    c.kill_node(1);
    let after = c
        .wait_record("g1", T, "running on node2", |r| settled_on(r, 2))
        .await;
    wait_until("node2's QEMU", &c, || qemu_pid(&c, 2).is_some()).await;
    wait_until("node2's guest running", &c, || {
        guest_status(&c, 2) == "running"
    })
    .await;
    let all = c.events();
    let how = if events_named(&all, "migrated-in").is_empty() {
        "failover"
    } else {
        "migration (it completed before the kill)"
    };
    eprintln!(
        "source killed mid-migration: running on node2 by {how}, epoch {}, {} ms after the kill",
        after.epoch,
        killed.elapsed().as_millis()
    );
    let k = keys(&c).await;
    assert!(!k.contains(&quorum::pr_key(CLUSTER, 1)), "{k:x?}");
}

/// A group whose VM cannot migrate live (the test guest: a process without `qmp`) is
/// refused by ctl before anything is asked of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_a_live_move_the_driver_cannot_do() {
    let c = Cluster::new(2, vec![GroupSpec::new("g1", LUN)]).await;
    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "0"]);
    assert!(!out.status.success(), "{}", show_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot migrate live"), "{err}");
    for way in [
        "`qemu` driver",
        "`process` driver with `qmp`",
        "`libvirt` driver",
    ] {
        assert!(err.contains(way), "{way}: {err}");
    }
    let r = c.record("g1").await;
    assert!(r.as_ref().is_none_or(|r| r.migration.is_none()), "{r:?}");
}

async fn wait_until(what: &str, c: &Cluster, f: impl Fn() -> bool) {
    common::cluster::wait_until(what, T, f, || c.diagnostics()).await
}
