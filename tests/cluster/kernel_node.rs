//! The Linux kernel initiator as a cluster node's data path. Node 1 runs inside the
//! `../shared/vm-initiator` QEMU guest (tools/kernel-node/guest-node.sh): open-iscsi
//! logs in as the node's VM initiator name, its agent is this build's binary, and its
//! "VM" is `holdfast guest run --device /dev/sdX` (O_DIRECT|O_DSYNC through the kernel's
//! block device). Node 2 is a host agent whose VM is the usual iSCSI test guest.
//!
//! - Power cut: SIGKILL of the guest's QEMU; node 2 fences node 1 and takes over.
//! - Freeze: the kernel initiator's connection stalls (a relay holds what it sends, so the
//!   VM's next write is certainly outstanding), QEMU gets SIGSTOP, the stalled
//!   connection is dropped, and once node 2 has taken over and written, SIGCONT. The
//!   thawed kernel re-logs in and resends the queued write: the guest's kernel log must
//!   show it refused with RESERVATION CONFLICT, and a deliberate write as the old run's
//!   epoch must be refused too (exit 75). Whether the agent pauses or kills the VM on
//!   thaw does not matter here.
//!
//! Both end with `holdfast guest check` over every ack log: no lost acknowledged write,
//! no double run, no late write. The tests skip (with the reason printed) without the
//! guest image or QEMU, or with SKIP_VM=1; `HOLDFAST_VM_TESTS=require` (tools/test) turns
//! a missing prerequisite into a failure.

mod kernel_log;
mod relay;
mod vm;

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec, TARGET};
use holdfast::agent::config::{Timings, VmConfig};
use holdfast::agent::quorum::GroupState;
use holdfast::cli::cluster_kit as kit;
use holdfast::cli::guest::AckEvent;
use kernel_log::{refused_writes, Refused};
use relay::Relay;
use std::path::Path;
use std::time::{Duration, Instant};
use vm::{vm_initiator, Guest, VmInitiator};

const GROUP: &str = "g1";
const LUN: u64 = 1;
/// Where run-guest.sh mounts the cluster directory in the guest.
const SHARE: &str = "/mnt/host";
/// The kernel block device of the group's disk, as guest-node.sh links it.
const DEVICE: &str = "/dev/hf-disk";
/// The guest's VM acknowledges into its own file (the host's VM appends to another one
/// at the same time, and appends over 9p and on the host are not atomic together).
const GUEST_ACKS: &str = "acks-g1-guest.log";
const BOOT: Duration = Duration::from_secs(150);
const T: Duration = Duration::from_secs(60);

/// Only one guest at a time: each is a 2-vCPU TCG emulator on a small machine.
static ONE_GUEST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Slower than the defaults: node 1 runs under TCG emulation on a shared machine.
fn timings() -> Timings {
    Timings {
        heartbeat_interval: Duration::from_millis(1000),
        poll_interval: Duration::from_millis(250),
        io_timeout: Duration::from_millis(2000),
        self_fence_after: Duration::from_millis(4000),
        dead_after: Duration::from_millis(6000),
        ..Timings::default()
    }
}

/// Target, quorum LUN and node configs; node 1's is rewritten for the guest.
async fn cluster() -> Cluster {
    let mut spec = GroupSpec::new(GROUP, LUN);
    spec.preferred = vec![node_name(1)];
    let c = Cluster::new(2, vec![spec]).await;
    c.write_node_config(2, &timings());
    write_guest_node_config(&c);
    std::fs::copy(&c.bin, c.path("holdfast")).expect("copy holdfast into the share");
    c
}

/// Node 1 as the guest sees it: the portal through slirp, files in the share, and a VM
/// writing through the kernel's block device.
fn write_guest_node_config(c: &Cluster) {
    let mut cfg = c.kit.node_config(1, &c.groups, &timings());
    let share = Path::new(SHARE);
    cfg.target.portals = vec![format!("10.0.2.2:{}", c.addr.port())];
    cfg.node.state_dir = share.join("node1");
    cfg.node.shared_state_dir = Some(share.join("shared"));
    cfg.node.event_log = Some(share.join("events-node1.jsonl"));
    let acks = share.join(GUEST_ACKS).display().to_string();
    let command = [
        "/run/hf/holdfast",
        "guest",
        "run",
        "--device",
        DEVICE,
        "--epoch",
        "{epoch}",
        "--ack-log",
        &acks,
        "--state-file",
        "{state_file}",
        // Nearly always a write in flight: a freeze then catches one queued.
        "--interval",
        "2ms",
    ];
    let VmConfig::Process(vm) = &mut cfg.groups[0].vm else {
        panic!("the kit's groups use the process driver");
    };
    vm.command = command.iter().map(|s| s.to_string()).collect();
    std::fs::create_dir_all(c.path("node1")).unwrap();
    kit::write_toml(&c.node_config(1), "", &cfg).unwrap();
}

/// The node's VM initiator name (docs/AGENT.md, identities): the agent registers it on
/// the group's disks, and open-iscsi in the guest logs in with it.
fn vm_initiator_name(id: u16) -> String {
    format!(
        "iqn.2026-11.org.holdfast:{}.{}.vm",
        common::cluster::CLUSTER,
        node_name(id)
    )
}

/// Boot node 1 in the guest; its kernel initiator reaches the target through
/// `data_port`, its agent directly.
fn boot_node1(c: &Cluster, vmi: &VmInitiator, data_port: u16) -> Guest {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/kernel-node/guest-node.sh");
    let mut options: Vec<String> = vec![
        "--portal-port".into(),
        c.addr.port().to_string(),
        "--timeout".into(),
        "600".into(),
        "--share".into(),
        c.dir.path().display().to_string(),
        "--initiator-name".into(),
        vm_initiator_name(1),
        "--console-log".into(),
        c.path("guest-console.log").display().to_string(),
    ];
    let env = [
        format!("HF_TARGET_IQN={TARGET}"),
        format!("HF_LUN={LUN}"),
        format!("HF_VM_INITIATOR={}", vm_initiator_name(1)),
        "HF_CONFIG=node1.toml".to_string(),
        format!("HF_DEVICE={DEVICE}"),
        format!("HF_DATA_PORT={data_port}"),
    ];
    for e in env {
        options.extend(["--env".to_string(), e]);
    }
    Guest::boot(vmi, &script, &options, &c.path("guest.out"))
}

fn read(c: &Cluster, name: &str) -> String {
    std::fs::read_to_string(c.path(name)).unwrap_or_default()
}

/// Everything the guest left, for failure messages.
fn guest_diagnostics(c: &Cluster) -> String {
    let names = [
        "guest.out",
        "guest-status",
        "agent-guest.log",
        "events-node1.jsonl",
        GUEST_ACKS,
        "node1/g1.log",
        "probe.log",
    ];
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    format!("{}{}", c.kit.log_tails(&names, 30), c.diagnostics())
}

/// The guest VM's ack log events.
fn guest_acks(c: &Cluster) -> Vec<AckEvent> {
    read(c, GUEST_ACKS)
        .lines()
        .filter_map(AckEvent::parse)
        .collect()
}

fn acked_in(events: &[AckEvent], run: u64) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, AckEvent::Ack { epoch, .. } if *epoch == run))
        .count()
}

/// Boot the guest and wait until node 1 runs the group through the kernel initiator
/// (5 acknowledged writes), then start node 2 and wait until it is up. Returns the
/// guest run's epoch.
async fn guest_owns_the_group(c: &mut Cluster, guest: &mut Guest) -> u64 {
    let end = Instant::now() + BOOT;
    let epoch = loop {
        if let Some(r) = c.record(GROUP).await {
            let running = r.owner == 1 && r.state == GroupState::Running;
            if running && acked_in(&guest_acks(c), r.epoch) >= 5 {
                break r.epoch;
            }
        }
        let ended = guest.ended();
        assert!(
            Instant::now() < end && ended.is_none(),
            "node 1 in the guest did not run {GROUP} (run-guest.sh: {ended:?})\n{}",
            guest_diagnostics(c)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = read(c, "guest-status");
    assert!(
        status.contains(&format!("login {}", vm_initiator_name(1))),
        "{status}"
    );
    c.start_agent(2);
    assert!(
        c.wait_agent_started(2, 0, T).await,
        "node 2 did not start\n{}",
        c.diagnostics()
    );
    epoch
}

/// Node 2 took the group over from the guest's run `old`: a newer epoch, with 5 acks.
async fn survivor_takes_over(c: &Cluster, old: u64) -> u64 {
    let r = c.wait_running(GROUP, Some(2), T).await;
    assert!(r.epoch > old, "{r:?}");
    c.wait_acks(GROUP, r.epoch, 5, T).await;
    let img = c.image().await;
    assert!(
        img.admin(1).fence_count >= 1,
        "node 1 not fenced: {:?}",
        img.admin(1)
    );
    r.epoch
}

/// `holdfast guest check` over the disk and every ack log: must be clean. Node 2 is
/// stopped first, so that no write is in flight while the checker reads.
fn check_everything(c: &mut Cluster, extra_logs: &[&str]) -> String {
    c.kill_node(2);
    let mut logs = vec![c.ack_log(GROUP), c.path(GUEST_ACKS)];
    logs.extend(extra_logs.iter().map(|l| c.path(l)));
    c.check_logs(GROUP, &logs, &guest_diagnostics(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_of_the_guest_node_fails_over_cleanly() {
    let Some(vmi) = vm_initiator() else { return };
    let _one = ONE_GUEST.lock().await;
    let mut c = cluster().await;
    let mut guest = boot_node1(&c, &vmi, c.addr.port());
    let old = guest_owns_the_group(&mut c, &mut guest).await;
    let cut = Instant::now();
    guest.signal(libc::SIGKILL);
    let new = survivor_takes_over(&c, old).await;
    eprintln!(
        "power cut: node 2 runs {GROUP} (epoch {new}) {:?} after the cut",
        cut.elapsed()
    );
    let report = check_everything(&mut c, &[]);
    eprintln!("{report}");
}

/// Wait until the guest's VM (writing every 2 ms) has acknowledged nothing for 2 s: its
/// next write is outstanding (a margin for a guest slowed down by a busy host). The counter of that write.
async fn wait_for_a_stalled_write(c: &Cluster, run: u64) -> u64 {
    let end = Instant::now() + T;
    let next = |events: Vec<AckEvent>| {
        events.iter().fold(None, |n, e| match e {
            AckEvent::Start { epoch, first, .. } if *epoch == run => Some(*first),
            AckEvent::Ack { epoch, counter, .. } if *epoch == run => Some(counter + 1),
            _ => n,
        })
    };
    let mut last = (next(guest_acks(c)), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = next(guest_acks(c));
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            return n.expect("the run's start line");
        }
        assert!(
            Instant::now() < end,
            "the guest's VM kept acknowledging writes through a held connection\n{}",
            guest_diagnostics(c)
        );
    }
}

/// Ask the guest for one write as epoch `run` through its kernel block device; its
/// exit status.
async fn probe_write(c: &Cluster, run: u64) -> i32 {
    std::fs::write(c.path("probe-request"), run.to_string()).unwrap();
    let end = Instant::now() + T;
    loop {
        if let Ok(rc) = std::fs::read_to_string(c.path("probe-rc")) {
            return rc.trim().parse().expect("probe-rc");
        }
        assert!(
            Instant::now() < end,
            "the guest did not run the probe\n{}",
            guest_diagnostics(c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Blocks per region of the test guest's layout on the 16 MiB disk (32768 blocks of 512
/// bytes: min(1024, (blocks - 1) / 16)), as README.md "Test guest" documents it.
const SLOTS: u64 = 1024;

/// The blocks the test guest's run of `epoch` writes to.
fn region_of(epoch: u64) -> std::ops::Range<u64> {
    let first = 1 + (epoch % 16) * SLOTS;
    first..first + SLOTS
}

/// The block of the probe's one write: its first counter, from its `start` line.
fn probe_block(c: &Cluster, epoch: u64) -> u64 {
    let first = read(c, "probe-acks.log")
        .lines()
        .filter_map(AckEvent::parse)
        .find_map(|e| match e {
            AckEvent::Start { first, .. } => Some(first),
            _ => None,
        })
        .expect("the probe's start line");
    region_of(epoch).start + first % SLOTS
}

/// The kernel log at the guest's end: RESERVATION CONFLICT for the probe's write and for
/// the frozen VM's write of counter `stalled` (the data, or the flush that follows it),
/// queued across the freeze. The VM's refused writes.
fn kernel_refusals(c: &Cluster, old: u64, stalled: u64) -> Vec<Refused> {
    let mut refused = refused_writes(&read(c, "guest-dmesg.log"));
    let probe = Refused::Block(probe_block(c, old));
    let Some(at) = refused.iter().position(|r| *r == probe) else {
        panic!(
            "the probe's write ({probe:?}) is not among the refused ones {refused:?}\n{}",
            guest_diagnostics(c)
        );
    };
    refused.remove(at);
    // Nothing else writes through the device: the rest is the VM's.
    let region = region_of(old);
    assert!(
        refused.iter().all(|r| match r {
            Refused::Block(b) => region.contains(b),
            Refused::Flush => true,
        }),
        "refused writes outside the old run's region: {refused:?}"
    );
    let queued = Refused::Block(region.start + stalled % SLOTS);
    assert!(
        refused.contains(&queued) || refused.contains(&Refused::Flush),
        "the frozen VM's queued write of counter {stalled} ({queued:?}) was not refused \
         with RESERVATION CONFLICT: {refused:?}\n{}",
        guest_diagnostics(c)
    );
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_guest_node_is_fenced_on_the_kernel_data_path() {
    let Some(vmi) = vm_initiator() else { return };
    let _one = ONE_GUEST.lock().await;
    let mut c = cluster().await;
    let relay = Relay::start(c.addr).await;
    let mut guest = boot_node1(&c, &vmi, relay.port);
    let old = guest_owns_the_group(&mut c, &mut guest).await;
    // Freeze the node while its VM has a write outstanding: the data path stalls (the
    // VM's next write never reaches the target), then QEMU stops, then the stalled
    // connection goes away. The agent's own sessions are not stalled.
    relay.hold();
    let stalled = wait_for_a_stalled_write(&c, old).await;
    guest.signal(libc::SIGSTOP);
    guest.wait_stopped();
    relay.cut();
    let new = survivor_takes_over(&c, old).await;
    guest.signal(libc::SIGCONT);
    // The thawed node's deliberate write as the old run: refused by the target.
    let rc = probe_write(&c, old).await;
    assert_eq!(
        rc,
        75,
        "probe write through the kernel initiator\n{}",
        guest_diagnostics(&c)
    );
    // The survivor keeps writing after the thaw.
    let before = c.acked_in_epoch(GROUP, new);
    c.wait_acks(GROUP, new, before + 5, T).await;
    std::fs::write(c.path("guest-stop"), "").unwrap();
    let stopped = guest.wait(T);
    assert!(
        stopped.is_some_and(|s| s.success()),
        "guest-node.sh did not stop cleanly: {stopped:?}\n{}",
        guest_diagnostics(&c)
    );
    let vm_refused = kernel_refusals(&c, old, stalled);
    let events = guest_acks(&c);
    let conflict = events
        .iter()
        .any(|e| matches!(e, AckEvent::Conflict { epoch, .. } if *epoch == old));
    eprintln!(
        "freeze: write {stalled} outstanding at the freeze, {} acks in all; the frozen VM's \
         writes {vm_refused:?} got RESERVATION CONFLICT (logged by the VM: \
         {conflict})",
        acked_in(&events, old)
    );
    let report = check_everything(&mut c, &["probe-acks.log"]);
    eprintln!("{report}");
}
