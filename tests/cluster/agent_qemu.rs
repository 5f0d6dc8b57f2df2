//! Real QEMU guests under the agent (the `qemu` driver): the vm-initiator kernel with the
//! initramfs of fixtures/qemu-guest, whose /init writes the test guest's counter records
//! to its virtio disk (iscsi:// LUN, cache=none) with O_DIRECT|O_DSYNC and echoes every
//! acknowledged write on its second serial port, which QEMU appends to the group's ack
//! log (src/cli/guest_qemu.rs). One two-node cluster goes through: start; crash (kill -9 of QEMU) → restart in
//! place; kill -9 of the owner node → the guest boots on the survivor; planned move with
//! save/restore → the same run continues; an ACPI power-down the agent did not ask for →
//! the group is kept offline. `holdfast guest check` is clean after each step.
//!
//! Timing figures (restart, failover to a writing guest, quick migration) are printed.
//! Without QEMU, the kernel or the vm-initiator initrd the test skips with the reason,
//! unless CI=true or HOLDFAST_VM_TESTS=require, where it fails.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use holdfast::agent::config::{OfflineAction, Timings};
use holdfast::agent::driver::qmp::Qmp;
use holdfast::agent::quorum::{AdminState, GroupState};
use holdfast::cli::cluster_kit as kit;
use holdfast::cli::guest::AckEvent;
use holdfast::cli::guest_qemu::{qemu_guest_vm, vm_initiator_dir, GuestImage};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const GROUP: &str = "vm1";
pub(crate) const LUN: u64 = 1;
/// A TCG guest boots in ~10-20 s on a shared machine; twice that and more is a failure.
pub(crate) const BOOT: Duration = Duration::from_secs(90);

/// Build (or find cached) the guest image, or None (reason printed) when the test may
/// skip: locally without the prerequisites, or anywhere with SKIP_VM=1. Under CI=true or
/// HOLDFAST_VM_TESTS=require a missing prerequisite fails the test.
pub(crate) fn guest_image(test: &str) -> Option<GuestImage> {
    let vmi = vm_initiator_dir();
    let kernel = vmi.join("vmlinuz");
    let missing = if std::env::var("SKIP_VM").as_deref() == Ok("1") {
        eprintln!("SKIP {test}: SKIP_VM=1");
        return None;
    } else if !kernel.is_file() || !vmi.join("initrd.img").is_file() {
        Some(format!(
            "{}/{{vmlinuz,initrd.img}} missing (../shared/vm-initiator/build-image.sh)",
            vmi.display()
        ))
    } else if !Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("qemu-system-x86_64 not installed".into())
    } else {
        None
    };
    if let Some(why) = missing {
        let required = std::env::var("CI").as_deref() == Ok("true")
            || std::env::var("HOLDFAST_VM_TESTS").as_deref() == Ok("require");
        assert!(!required, "{test}: {why}");
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("fixtures/qemu-guest/build.sh"))
        .arg(env!("CARGO_BIN_EXE_holdfast"))
        .arg(&vmi)
        .arg(Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-guest"))
        .output()
        .expect("run fixtures/qemu-guest/build.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "build.sh: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let initramfs = PathBuf::from(stdout.lines().last().expect("build.sh names its output"));
    Some(GuestImage { kernel, initramfs })
}

/// Every node runs the group's guest under the qemu driver (TCG: KVM may be there and
/// unusable), acks on ttyS1 into the ack log.
pub(crate) fn write_configs(c: &Cluster, img: &GuestImage, timings: &Timings) {
    for id in 1..=c.nodes {
        let mut cfg = c.kit.node_config(id, &c.groups, timings);
        cfg.groups[0].vm = qemu_guest_vm(img, &c.ack_log(GROUP), "tcg");
        kit::write_toml(&c.node_config(id), "", &cfg).unwrap();
    }
}

pub(crate) fn events(c: &Cluster) -> Vec<AckEvent> {
    kit::ack_events(&c.ack_log(GROUP)).collect()
}

pub(crate) fn starts(ev: &[AckEvent]) -> usize {
    ev.iter()
        .filter(|e| matches!(e, AckEvent::Start { .. }))
        .count()
}

pub(crate) fn acks(ev: &[AckEvent]) -> usize {
    ev.iter()
        .filter(|e| matches!(e, AckEvent::Ack { .. }))
        .count()
}

/// Wait until the ack log holds `starts` start lines and, after the last of them, `n`
/// acknowledged writes; returns when the first of those writes was seen.
pub(crate) async fn wait_writing(c: &Cluster, want_starts: usize, n: usize, what: &str) -> Instant {
    let end = Instant::now() + BOOT;
    let mut first = None;
    loop {
        let ev = events(c);
        let last_start = ev.iter().rposition(|e| matches!(e, AckEvent::Start { .. }));
        if starts(&ev) >= want_starts {
            let after = last_start.map_or(0, |i| acks(&ev[i..]));
            if after >= 1 && first.is_none() {
                first = Some(Instant::now());
            }
            if after >= n {
                return first.unwrap_or_else(Instant::now);
            }
        }
        assert!(
            Instant::now() < end,
            "{what}: no guest writing ({} starts, {} acks)\n{}",
            starts(&ev),
            acks(&ev),
            diagnostics(c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn diagnostics(c: &Cluster) -> String {
    let names: Vec<String> = (1..=c.nodes)
        .flat_map(|id| {
            let n = node_name(id);
            [format!("{n}/{GROUP}.log"), format!("{n}/{GROUP}.console")]
        })
        .collect();
    format!("{}{}", c.kit.log_tails(&names, 20), c.diagnostics())
}

/// The pid of node `id`'s QEMU, from the driver's pid file.
fn qemu_pid(c: &Cluster, id: u16) -> i32 {
    let f = c.path(&format!("{}/{GROUP}.pid", node_name(id)));
    let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid")
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_restarts_fails_over_moves_and_powers_off() {
    let Some(img) = guest_image("agent_qemu") else {
        return;
    };
    let mut spec = GroupSpec::new(GROUP, LUN);
    spec.preferred = vec![node_name(1)];
    spec.settings.offline_action = OfflineAction::Save;
    spec.settings.stop_timeout = Duration::from_secs(60);
    spec.settings.monitor_interval = Duration::from_millis(500);
    let mut c = Cluster::new(2, vec![spec]).await;
    write_configs(&c, &img, &Timings::default());
    c.start_agent(1);
    c.start_agent(2);

    // Start: node 1 boots the guest, which writes.
    let t0 = Instant::now();
    c.wait_running(GROUP, Some(1), BOOT).await;
    let first = wait_writing(&c, 1, 5, "start").await;
    eprintln!(
        "qemu: start to first acknowledged write: {}",
        secs(first - t0)
    );
    c.check(GROUP);

    // Crash: kill -9 of QEMU; the agent restarts it in place (a new run).
    let t = Instant::now();
    kit::sigkill(qemu_pid(&c, 1));
    let first = wait_writing(&c, 2, 5, "restart in place").await;
    let r = c.wait_running(GROUP, Some(1), BOOT).await;
    assert!(r.restarts >= 1, "{r:?}");
    eprintln!(
        "qemu: crash to a writing guest (restart in place): {}",
        secs(first - t)
    );
    c.check(GROUP);

    // Node 1 dies (agent and QEMU): node 2 fences it and boots the guest.
    let t = Instant::now();
    c.kill_node(1);
    c.wait_running(GROUP, Some(2), BOOT).await;
    let first = wait_writing(&c, 3, 5, "failover").await;
    eprintln!(
        "qemu: failover time to a writing guest: {}",
        secs(first - t)
    );
    c.check(GROUP);

    move_back_with_save_restore(&mut c).await;
    power_off_from_the_guest(&c).await;
    c.check(GROUP);
}

/// Planned move to node 1 with offline_action = save: the run continues (no new start
/// line), its counter goes on.
async fn move_back_with_save_restore(c: &mut Cluster) {
    c.start_agent(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = events(c);
    let t = Instant::now();
    let out = c.ctl(&["move", GROUP, &node_name(1), "--wait", "120"]);
    assert!(
        out.status.success(),
        "ctl move: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        diagnostics(c)
    );
    let moved = t.elapsed();
    let acked = acks(&before);
    let end = Instant::now() + BOOT;
    while acks(&events(c)) < acked + 20 {
        assert!(
            Instant::now() < end,
            "no writes after the move\n{}",
            diagnostics(c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = events(c);
    assert_eq!(starts(&after), starts(&before), "the restored run went on");
    assert!(
        !c.path(&format!("shared/{GROUP}.state")).exists(),
        "a restored state is not kept"
    );
    eprintln!(
        "qemu: quick migration (save + move + restore, ctl move): {}",
        secs(moved)
    );
    c.check(GROUP);
}

/// An ACPI power-down nobody asked the agent for (as `poweroff` in the guest): QEMU
/// exits 0, the group goes offline and stays so.
async fn power_off_from_the_guest(c: &Cluster) {
    let qmp = c.path(&format!("{}/{GROUP}.qmp", node_name(1)));
    let mut q = Qmp::connect(&qmp, Duration::from_secs(5)).expect("QMP");
    q.execute("system_powerdown", None)
        .expect("system_powerdown");
    let r = c
        .wait_record(GROUP, BOOT, "offline after the guest's power-down", |r| {
            r.state == GroupState::Stopped && r.admin == AdminState::Offline
        })
        .await;
    let ev = events(c);
    assert!(
        matches!(ev.last(), Some(AckEvent::Exit { reason, .. }) if reason == "sigterm"),
        "the guest's writer ended cleanly: {:?}",
        ev.last()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(starts(&events(c)), starts(&ev), "not restarted: {r:?}");
    let now = c.record(GROUP).await.expect("record");
    assert_eq!(now.state, GroupState::Stopped, "{now:?}");
}

/// The qemu driver alone, on a local disk file (no cluster): QMP pause really stops the
/// guest's writes and resume continues them, and a stop of a paused guest is still a
/// clean ACPI power-down (the driver continues it so it can see the button).
#[test]
fn qemu_driver_pauses_resumes_and_powers_down_a_paused_guest() {
    use holdfast::agent::driver::qemu::QemuDriver;
    use holdfast::agent::driver::{VmContext, VmDriver, VmStatus};
    let Some(img) = guest_image("agent_qemu driver") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (disk, acks) = (dir.path().join("disk.img"), dir.path().join("acks.log"));
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("disk file");
    let holdfast::agent::config::VmConfig::Qemu(mut vm) = qemu_guest_vm(&img, &acks, "tcg") else {
        unreachable!("qemu_guest_vm builds a qemu VM")
    };
    vm.args = vec![
        "-drive".into(),
        format!("file={},format=raw,if=virtio,cache=none", disk.display()),
    ];
    let ctx = VmContext {
        group: "solo".into(),
        node: "n1".into(),
        node_id: 1,
        epoch: 1,
        initiator_name: "iqn.2026-11.org.holdfast:solo.vm".into(),
        portal: "127.0.0.1:1".into(),
        other_portals: vec![],
        target: "iqn.2026-11.org.holdfast:none".into(),
        disks: vec![],
        state_file: dir.path().join("solo.state"),
        state_dir: dir.path().to_path_buf(),
    };
    let acked = || {
        kit::ack_events(&acks)
            .filter(|e| matches!(e, AckEvent::Ack { .. }))
            .count()
    };
    let wait_acks = |n: usize| {
        let end = Instant::now() + BOOT;
        while acked() < n {
            assert!(Instant::now() < end, "{n} acks: {}", acked());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut d = QemuDriver::new(vm, dir.path().join("solo.log"));
    d.start(&ctx).expect("start");
    wait_acks(10);

    d.pause(&ctx).expect("pause");
    assert_eq!(d.status(&ctx).unwrap(), VmStatus::Running, "paused by us");
    let frozen = acked();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(acked(), frozen, "a paused guest writes nothing");
    d.resume(&ctx).expect("resume");
    wait_acks(frozen + 10);

    d.pause(&ctx).expect("pause");
    let t = Instant::now();
    d.stop(&ctx, Duration::from_secs(60)).expect("stop");
    let took = t.elapsed();
    let last = kit::ack_events(&acks).last();
    assert!(
        matches!(&last, Some(AckEvent::Exit { reason, .. }) if reason == "sigterm"),
        "the guest powered down cleanly, not killed after {took:?}: {last:?}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(d.status(&ctx).unwrap(), VmStatus::Stopped);
    assert!(d.pid().is_none());
}
