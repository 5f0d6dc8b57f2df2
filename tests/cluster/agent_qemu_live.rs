//! Live migration of the real QEMU guest (agent_qemu's: the vm-initiator kernel, whose
//! /init writes the test guest's counter with O_DIRECT|O_DSYNC and echoes each
//! acknowledged write on ttyS1) under the `qemu` driver, while it writes. Both nodes'
//! QEMUs append ttyS1 to the same ack log, so one log holds the run across the move. One
//! two-node cluster goes through:
//!
//! 1. a destination QEMU killed while it listens (the source's agent held with SIGSTOP
//!    from the request to the kill, so no migration can begin): the guest runs on;
//! 2. `ctl move --live` under write load: the same run goes on (no new start line, the
//!    counter strictly consecutive), the source's QEMU is gone and its key preempted, a
//!    late write through the source's VM initiator name gets RESERVATION CONFLICT;
//! 3. a live move back whose destination node is killed (agent and incoming QEMU) while
//!    the state is on its way (node 2, the source, migrates at `SLOW` bytes per second to
//!    leave that window): the guest runs on on node 2 in the same run and epoch, node 1's
//!    registrations are preempted, the migration is cleared with an event saying why,
//!    and nobody is fenced; node 1's agent is then started again;
//! 4. a live move back whose source node is killed (agent and QEMU) once the destination
//!    listens: the group fails over (or, if the state went over first, arrives).
//!
//! `holdfast guest check` is clean after each step. QEMU's downtime and total time
//! (events) and the guest's own (the longest pause between acks as a host thread sees
//! them appear in the log) are printed.

use crate::agent_qemu::{
    acks, diagnostics, events, guest_image, secs, starts, wait_writing, BOOT, GROUP, LUN,
};
use crate::common;
use crate::common::cluster::{events_named, show_output};

use common::cluster::{node_name, Cluster, GroupSpec, CLUSTER, TARGET};
use holdfast::agent::config::{Timings, VmConfig};
use holdfast::agent::events::mono_ns;
use holdfast::agent::quorum::{self, GroupRecord, GroupState};
use holdfast::cli::cluster_kit as kit;
use holdfast::cli::cluster_kit::LineTail;
use holdfast::cli::guest::AckEvent;
use holdfast::cli::guest_qemu::{qemu_guest_vm, GuestImage};
use holdfast::config_value::ByteSize;
use holdfast::initiator::{InitiatorConfig, InitiatorError, Session};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Record changes and migrations; boots use [`BOOT`].
const T: Duration = Duration::from_secs(60);
/// Acks to see after a step before judging it (20 ms apart in the guest).
const MORE: usize = 25;

/// Node 2's cap on its outgoing migrations, bytes per second: slow enough that the
/// guest's state (tens of MB of RAM in use) takes seconds to send, so its destination
/// can be killed mid-way.
const SLOW: u64 = 8 << 20;

/// Self-fencing late enough that the source's agent may be held (SIGSTOP) while the
/// destination's QEMU starts under TCG on a busy machine.
fn timings() -> Timings {
    Timings {
        self_fence_after: Duration::from_secs(4),
        dead_after: Duration::from_secs(5),
        migration_timeout: Duration::from_secs(60),
        ..Timings::default()
    }
}

/// The ack lines' counters with when a host thread saw each appear (every 5 ms).
struct AckWatch {
    seen: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AckWatch {
    fn start(log: PathBuf) -> AckWatch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, done) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut tail = LineTail::new(log, true);
            while !done.load(Ordering::Relaxed) {
                let now = Instant::now();
                let new = tail
                    .read_new()
                    .into_iter()
                    .filter_map(|l| match AckEvent::parse(&l) {
                        Some(AckEvent::Ack { counter, .. }) => Some((counter, now)),
                        _ => None,
                    });
                into.lock().unwrap().extend(new);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        AckWatch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The longest wait for the next ack among acks seen from `from` on, with the
    /// counters either side of it.
    fn longest_gap(&self, from: Instant) -> Option<(Duration, u64, u64)> {
        let seen = self.seen.lock().unwrap();
        let i = seen.iter().position(|&(_, t)| t >= from)?;
        seen[i.saturating_sub(1)..]
            .windows(2)
            .map(|w| (w[1].1 - w[0].1, w[0].0, w[1].0))
            .max_by_key(|g| g.0)
    }

    /// The median wait between acks seen before `until`: the guest's pace.
    fn usual_gap(&self, until: Instant) -> Duration {
        let seen = self.seen.lock().unwrap();
        let mut gaps: Vec<Duration> = seen
            .windows(2)
            .filter(|w| w[1].1 < until)
            .map(|w| w[1].1 - w[0].1)
            .collect();
        gaps.sort();
        gaps.get(gaps.len() / 2).copied().unwrap_or_default()
    }
}

impl Drop for AckWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The current run (from the last start line) has acknowledged strictly consecutive
/// counters, all its own and none refused; returns its first and last counter.
fn continuous_run(ev: &[AckEvent]) -> Result<(u64, u64), String> {
    let i = ev
        .iter()
        .rposition(|e| matches!(e, AckEvent::Start { .. }))
        .ok_or("no start line")?;
    let AckEvent::Start { instance, .. } = &ev[i] else {
        unreachable!("found as a start line")
    };
    let instance = *instance;
    let mut counters = Vec::new();
    for e in &ev[i + 1..] {
        match e {
            AckEvent::Ack {
                instance: n,
                counter,
                ..
            } if *n == instance => counters.push(*counter),
            AckEvent::Exit { .. } => {}
            other => return Err(format!("in the run of instance {instance:x}: {other}")),
        }
    }
    if let Some(w) = counters.windows(2).find(|w| w[1] != w[0] + 1) {
        return Err(format!("counter {} followed by {}", w[0], w[1]));
    }
    match (counters.first(), counters.last()) {
        (Some(&a), Some(&b)) => Ok((a, b)),
        _ => Err("no acknowledged write in the run".into()),
    }
}

fn assert_continuous(c: &Cluster, what: &str) -> (u64, u64) {
    continuous_run(&events(c))
        .unwrap_or_else(|e| panic!("{what}: the guest's run broke: {e}\n{}", diagnostics(c)))
}

/// The pid of node `id`'s QEMU while it runs (from the driver's pid file).
fn qemu_pid(c: &Cluster, id: u16) -> Option<i32> {
    let f = c.path(&format!("{}/{GROUP}.pid", node_name(id)));
    let text = std::fs::read_to_string(f).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    c.is_running(pid).then_some(pid)
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("{sig} to {pid}: {e}"));
}

fn settled_on(r: &GroupRecord, id: u16) -> bool {
    r.owner == id && r.state == GroupState::Running && r.migration.is_none()
}

fn listening(r: &GroupRecord) -> bool {
    r.migration.as_ref().is_some_and(|m| !m.addr.is_empty())
}

/// Wait until `MORE` writes past `acked` are acknowledged.
async fn wait_more_acks(c: &Cluster, acked: usize, what: &str) {
    wait_until(what, c, || acks(&events(c)) >= acked + MORE).await;
}

async fn keys(c: &Cluster) -> Vec<u64> {
    let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:keys", TARGET, c.addr);
    let s = Session::login(cfg).await.unwrap();
    let (_, keys) = s.read_keys(LUN).await.unwrap();
    let _ = s.logout().await;
    keys
}

/// Wait until the group's disk holds keys that `ok`.
async fn wait_keys(c: &Cluster, what: &str, ok: impl Fn(&[u64]) -> bool) {
    let end = Instant::now() + T;
    loop {
        let k = keys(c).await;
        if ok(&k) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: keys {k:x?}\n{}",
            diagnostics(c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An established TCP connection to `addr`'s port (the source's QEMU sending the
/// state), from /proc/net/tcp (IPv4: the agents' migration address is 127.0.0.1).
fn migration_connected(addr: &str) -> bool {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
        return false;
    };
    let remote = format!(":{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2].ends_with(&remote) && f[3] == "01"
    })
}

/// A write through node `id`'s VM initiator name (as its QEMU would send one) is refused.
async fn late_write_is_refused(c: &Cluster, id: u16) {
    let name = format!("iqn.2026-11.org.holdfast:{CLUSTER}.{}.vm", node_name(id));
    let s = Session::login(InitiatorConfig::new(name, TARGET, c.addr))
        .await
        .unwrap();
    let r = s.write16(LUN, 0, vec![7u8; 512].into(), 512, true).await;
    let _ = s.logout().await;
    assert!(
        matches!(r, Err(InitiatorError::ReservationConflict)),
        "node {id}'s late write: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_migrates_live_under_write_load_and_survives_failed_migrations() {
    let Some(img) = guest_image("agent_qemu_live") else {
        return;
    };
    let mut spec = GroupSpec::new(GROUP, LUN);
    spec.preferred = vec![node_name(1)];
    spec.settings.monitor_interval = Duration::from_millis(500);
    let mut c = Cluster::new(2, vec![spec]).await;
    write_configs(&c, &img);
    c.start_agent(1);
    c.start_agent(2);
    let watch = AckWatch::start(c.ack_log(GROUP));

    c.wait_running(GROUP, Some(1), BOOT).await;
    wait_writing(&c, 1, 5, "start").await;
    c.check(GROUP);

    destination_dies_before_switchover(&c).await;
    live_move_under_write_load(&c, &watch).await;
    destination_node_dies_mid_migration(&mut c).await;
    source_dies_mid_migration(&mut c).await;
}

/// agent_qemu's configs (the qemu driver running the test guest), node 2's guest
/// migrating out at [`SLOW`].
fn write_configs(c: &Cluster, img: &GuestImage) {
    for id in 1..=c.nodes {
        let mut cfg = c.kit.node_config(id, &c.groups, &timings());
        let mut vm = qemu_guest_vm(img, &c.ack_log(GROUP), "tcg");
        if let (2, VmConfig::Qemu(q)) = (id, &mut vm) {
            q.migration_bandwidth = Some(ByteSize(SLOW));
        }
        cfg.groups[0].vm = vm;
        kit::write_toml(&c.node_config(id), "", &cfg).unwrap();
    }
}

/// Node 2's incoming QEMU is killed while it listens; node 1's agent is held from the
/// request to the kill so the migration cannot begin: the guest writes on, on node 1.
async fn destination_dies_before_switchover(c: &Cluster) {
    let before = c
        .wait_record(GROUP, T, "settled on node1", |r| settled_on(r, 1))
        .await;
    let src = qemu_pid(c, 1).expect("node1's QEMU");
    let starts0 = starts(&events(c));
    let agent1 = c.agent_pid(1).expect("node1's agent");
    signal(agent1, Signal::SIGSTOP);
    let held = Instant::now();
    let out = c.ctl(&["move", GROUP, &node_name(2), "--live", "--wait", "0"]);
    assert!(out.status.success(), "{}", show_output(&out));
    c.wait_record(GROUP, T, "node2 listening", listening).await;
    let dst = qemu_pid(c, 2).expect("node2's incoming QEMU");
    signal(dst, Signal::SIGKILL);
    signal(agent1, Signal::SIGCONT);
    let held = held.elapsed();
    assert!(held < timings().self_fence_after, "held {held:?}: too long");

    // Node 2 gives up (its QEMU is gone); node 1 may or may not have seen the request.
    wait_until("node2 gave up", c, || {
        !events_named(&c.events(), "migration-failed").is_empty()
    })
    .await;
    let after = c
        .wait_record(GROUP, T, "back on node1", |r| settled_on(r, 1))
        .await;
    assert_eq!(after.epoch, before.epoch, "the run on node1 goes on");
    assert_eq!(qemu_pid(c, 1), Some(src), "the same QEMU");
    assert_eq!(qemu_pid(c, 2), None);
    let all = c.events();
    assert!(events_named(&all, "migrated-in").is_empty(), "{all:#?}");
    wait_more_acks(c, acks(&events(c)), "writes on node1 after the failed move").await;
    assert_eq!(starts(&events(c)), starts0, "not restarted");
    let (first, last) = assert_continuous(c, "destination died");
    wait_keys(c, "only node1's keys", |k| {
        k.iter().all(|&k| k == quorum::pr_key(CLUSTER, 1))
    })
    .await;
    eprintln!(
        "qemu live: destination killed while listening (node1's agent held {} ms): the \
         guest ran on, counters {first}..={last} without a gap",
        held.as_millis()
    );
    c.check(GROUP);
}

/// `ctl move --live` to node 2 while the guest writes.
async fn live_move_under_write_load(c: &Cluster, watch: &AckWatch) {
    // Node 2 holds the group off for dead_after after its failed migration: the time
    // of this move is the move's alone.
    tokio::time::sleep(timings().dead_after).await;
    let before = c.record(GROUP).await.expect("record");
    let src = qemu_pid(c, 1).expect("node1's QEMU");
    let starts0 = starts(&events(c));
    let t0 = Instant::now();
    let out = c.ctl(&["move", GROUP, &node_name(2), "--live", "--wait", "60"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        show_output(&out),
        diagnostics(c)
    );
    let moved = t0.elapsed();
    let after = c
        .wait_record(GROUP, T, "settled on node2", |r| settled_on(r, 2))
        .await;
    assert_eq!(after.epoch, before.epoch + 1);
    wait_until("node1's QEMU gone", c, || !c.is_running(src)).await;
    assert!(qemu_pid(c, 2).is_some(), "node2's QEMU runs");

    // Node 1's QEMU is gone: every write acknowledged from here came through node 2's.
    let src_gone = acks(&events(c));
    wait_more_acks(c, src_gone, "writes through node2").await;
    assert_eq!(starts(&events(c)), starts0, "the same run went on");
    let (first, last) = assert_continuous(c, "live migration");
    late_write_is_refused(c, 1).await;
    let k = keys(c).await;
    assert!(k.contains(&quorum::pr_key(CLUSTER, 2)), "{k:x?}");
    assert!(!k.contains(&quorum::pr_key(CLUSTER, 1)), "{k:x?}");

    let (gap, a, b) = watch.longest_gap(t0).expect("acks during the move");
    assert!(
        gap < moved,
        "the guest wrote during the move: {gap:?} of {moved:?}"
    );
    let all = c.events();
    let done = events_named(&all, "migration-completed");
    let arrived = events_named(&all, "migrated-in");
    assert_eq!((done.len(), arrived.len()), (1, 1), "{all:#?}");
    eprintln!(
        "qemu live: guest downtime (longest wait between acks, {a} -> {b}) {:.0} ms, its \
         usual pace {:.0} ms; QEMU downtime {} ms, QEMU total {} ms, {} bytes; \
         destination switchover {:.1} ms, destination total {:.1} ms; ctl move --live {}; \
         counters {first}..={last} without a gap or repeat",
        gap.as_secs_f64() * 1e3,
        watch.usual_gap(t0).as_secs_f64() * 1e3,
        done[0]["downtime_ms"],
        done[0]["total_ms"],
        done[0]["transferred"],
        arrived[0]["switchover_ms"].as_f64().unwrap_or(f64::NAN),
        arrived[0]["total_ms"].as_f64().unwrap_or(f64::NAN),
        secs(moved)
    );
    c.check(GROUP);
}

/// A live move back to node 1 (node 2 sending at [`SLOW`]) whose destination node is
/// killed -9 (agent and incoming QEMU) while the state is on its way: node 2 keeps the
/// guest, takes the disks back and clears the migration; node 1 is a dead node like any
/// other (it owned nothing: nobody is fenced). Node 1's agent is started again after.
async fn destination_node_dies_mid_migration(c: &mut Cluster) {
    let before = c
        .wait_record(GROUP, T, "settled on node2", |r| settled_on(r, 2))
        .await;
    let src = qemu_pid(c, 2).expect("node2's QEMU");
    let starts0 = starts(&events(c));
    let fenced0 = counted(c, &["fenced", "self-fence"]);
    let completed0 = counted(c, &["migration-completed"]);
    let aborted0 = counted(c, &["migration-aborted"]);

    let out = c.ctl(&["move", GROUP, &node_name(1), "--live", "--wait", "0"]);
    assert!(out.status.success(), "{}", show_output(&out));
    let r = c.wait_record(GROUP, T, "node1 listening", listening).await;
    let addr = r.migration.map(|m| m.addr).unwrap_or_default();
    wait_until("node2 sending the state", c, || migration_connected(&addr)).await;
    let dst = qemu_pid(c, 1).expect("node1's incoming QEMU");
    let killed = Instant::now();
    c.kill_node(1);
    let mid = listening(&c.record(GROUP).await.expect("record"))
        && counted(c, &["migration-completed"]) == completed0;
    assert!(
        mid,
        "the migration ended before node1 was killed\n{}",
        diagnostics(c)
    );
    assert!(
        !c.is_running(dst),
        "node1's incoming QEMU survived the kill"
    );

    let after = c
        .wait_record(GROUP, T, "migration cleared on node2", |r| settled_on(r, 2))
        .await;
    let cleared = killed.elapsed();
    assert_eq!(after.epoch, before.epoch, "the run on node2 goes on");
    assert_eq!(qemu_pid(c, 2), Some(src), "the same QEMU");
    wait_keys(c, "only node2's keys", |k| {
        !k.is_empty() && k.iter().all(|&k| k == quorum::pr_key(CLUSTER, 2))
    })
    .await;
    let all = c.events();
    let aborted = events_named(&all, "migration-aborted");
    let why = aborted.get(aborted0).map(|e| e["reason"].to_string());
    assert!(
        why.as_ref()
            .is_some_and(|w| w.contains("node 1") && w.contains("gone")),
        "no migration-aborted event naming the dead node: {why:?}\n{all:#?}"
    );
    assert_eq!(counted(c, &["fenced", "self-fence"]), fenced0, "{all:#?}");
    assert_eq!(counted(c, &["migration-completed"]), completed0, "{all:#?}");
    wait_more_acks(c, acks(&events(c)), "writes on node2 after node1 died").await;
    assert_eq!(starts(&events(c)), starts0, "not restarted");
    let (first, last) = assert_continuous(c, "destination node died");
    eprintln!(
        "qemu live: destination node killed while receiving: the guest ran on on node2, \
         migration cleared and node1's keys preempted {} after the kill, counters \
         {first}..={last} without a gap; abandoned because {}",
        secs(cleared),
        why.unwrap_or_default()
    );
    c.check(GROUP);

    let since = mono_ns();
    c.start_agent(1);
    assert!(
        c.wait_agent_started(1, since, T).await,
        "node1's agent did not start again\n{}",
        diagnostics(c)
    );
    // Node 2 must see node 1's heartbeat move again before node 1 can be asked for more.
    tokio::time::sleep(timings().self_fence_after).await;
}

/// How many of the cluster's events are named one of `names`.
fn counted(c: &Cluster, names: &[&str]) -> usize {
    let all = c.events();
    names.iter().map(|n| events_named(&all, n).len()).sum()
}

/// A live move back to node 1, whose source (node 2: agent and QEMU) is killed once
/// node 1 listens: the group ends up running on node 1, the checker clean.
async fn source_dies_mid_migration(c: &mut Cluster) {
    let starts0 = starts(&events(c));
    let arrived0 = events_named(&c.events(), "migrated-in").len();
    let out = c.ctl(&["move", GROUP, &node_name(1), "--live", "--wait", "0"]);
    assert!(out.status.success(), "{}", show_output(&out));
    let r = c.wait_record(GROUP, T, "node1 listening", listening).await;
    let addr = r.migration.map(|m| m.addr).unwrap_or_default();
    // Killed once the state is on its way, if that is seen within 5 s.
    let end = Instant::now() + Duration::from_secs(5);
    let mut sending = false;
    while !sending && Instant::now() < end {
        sending = migration_connected(&addr);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed = Instant::now();
    c.kill_node(2);
    let after = c
        .wait_record(GROUP, BOOT, "running on node1", |r| settled_on(r, 1))
        .await;
    let migrated = events_named(&c.events(), "migrated-in").len() > arrived0;
    let how = if migrated {
        wait_more_acks(c, acks(&events(c)), "writes after the migration").await;
        assert_eq!(starts(&events(c)), starts0, "the migrated run goes on");
        "migration (the state went over before the kill)"
    } else {
        wait_writing(c, starts0 + 1, 5, "failover after the source died").await;
        "failover (a fresh boot)"
    };
    let when = if sending {
        "while sending the state"
    } else {
        "before a transfer was seen"
    };
    eprintln!(
        "qemu live: source killed {when}: writing on node1 by {how}, epoch {}, {} after \
         the kill",
        after.epoch,
        secs(killed.elapsed())
    );
    let k = keys(c).await;
    assert!(!k.contains(&quorum::pr_key(CLUSTER, 2)), "{k:x?}");
    assert_continuous(c, "after the source died");
    c.check(GROUP);
}

async fn wait_until(what: &str, c: &Cluster, f: impl Fn() -> bool) {
    common::cluster::wait_until(what, T, f, || diagnostics(c)).await
}
