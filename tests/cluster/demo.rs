//! `holdfast demo --quiet` end to end: a target, three agents, two groups, a kill -9 of
//! one owner, the failover measured, the checker clean, everything stopped.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_fails_over_and_checks_clean() {
    let keep = tempfile::tempdir().expect("tempdir");
    let dir = keep.path().join("demo");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["demo", "--quiet", "--keep"])
        .arg(&dir)
        .env_remove("HOLDFAST_LOG")
        .output()
        .expect("run holdfast demo");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "holdfast demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("holdfast demo --quiet took {took:?}:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("failover time: "))
        .unwrap_or_else(|| panic!("no failover time in the output:\n{stdout}"));
    let secs: f64 = line["failover time: ".len()..]
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    // dead_after (3 s) + a poll + the claim + the guest's start; 30 s is the demo's limit.
    assert!(secs > 1.0 && secs < 30.0, "{line}");
    assert!(
        stdout.contains("guest check: web OK, db OK"),
        "checker verdicts missing:\n{stdout}"
    );
    assert!(took < Duration::from_secs(60), "the demo took {took:?}");
    // --keep leaves the files, and nothing of the demo runs any more: no process has the
    // kept directory's configs on its command line.
    assert!(dir.join("events.jsonl").exists());
    assert!(dir.join("node1.toml").exists());
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&needle),
            "left behind: pid {} {cmdline}",
            e.file_name().to_string_lossy()
        );
    }
}

/// `holdfast demo --quiet --vm INITRAMFS`: the same scenario with QEMU guests (the
/// agent_qemu test's image, TCG here) — both groups boot, the owner of `web` dies, `web`
/// boots on a survivor, both disks check clean and nothing is left running.
#[test]
fn demo_vm_runs_real_guests_fails_over_and_checks_clean() {
    let Some(img) = super::agent_qemu::guest_image("demo --vm") else {
        return;
    };
    let keep = tempfile::tempdir().expect("tempdir");
    let dir = keep.path().join("demo");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["demo", "--quiet", "--keep"])
        .arg(&dir)
        .arg("--vm")
        .arg(&img.initramfs)
        .arg("--vm-kernel")
        .arg(&img.kernel)
        // KVM may be present and unusable here.
        .args(["--vm-accel", "tcg"])
        .env_remove("HOLDFAST_LOG")
        .output()
        .expect("run holdfast demo --vm");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "holdfast demo --vm failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("holdfast demo --quiet --vm took {took:?}:\n{stdout}");
    assert!(stdout.contains("failover time: "), "{stdout}");
    assert!(
        stdout.contains("guest check: web OK, db OK"),
        "checker verdicts missing:\n{stdout}"
    );
    // The guests were QEMU VMs: their configs name the qemu driver, and QEMU appended
    // their ack lines (from the serial port) to the ack logs.
    let node1 = std::fs::read_to_string(dir.join("node1.toml")).expect("node1.toml");
    assert!(node1.contains("driver = \"qemu\""), "{node1}");
    let acks = std::fs::read_to_string(dir.join("acks-web.log")).expect("web's ack log");
    assert!(acks.lines().filter(|l| l.starts_with("ack ")).count() >= 20);
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&needle), "left behind: {cmdline}");
    }
}
