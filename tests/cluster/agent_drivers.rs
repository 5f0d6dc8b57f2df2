//! The agent's VM drivers against real processes: a supervised `sh` (process), the
//! fixture VM script (script), and a fake virsh keeping domains in a directory (libvirt).

use holdfast::agent::config::VmConfig;
use holdfast::agent::driver::process::{ProcessDriver, ProcessVm};
use holdfast::agent::driver::{build, DriverError, VmContext, VmDriver, VmStatus};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ctx(dir: &Path) -> VmContext {
    VmContext {
        group: "web".into(),
        node: "n1".into(),
        node_id: 1,
        epoch: 7,
        initiator_name: "iqn.2026-11.org.holdfast:lab.n1.vm".into(),
        portal: "127.0.0.1:3260".into(),
        other_portals: vec![],
        target: "iqn.t".into(),
        disks: vec![2, 1],
        state_file: dir.join("web.state"),
        state_dir: dir.to_path_buf(),
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/agent")
        .join(name)
}

/// kill(pid, 0): whether the pid names any process (zombies included).
fn pid_exists(pid: u32) -> bool {
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Running and not a zombie: orphans may stay zombies where init does not reap.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Wait up to 5 s for `f`.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_pid(path: &Path) -> u32 {
    let mut s = String::new();
    eventually(&format!("{}", path.display()), || {
        s = std::fs::read_to_string(path).unwrap_or_default();
        s.ends_with('\n')
    });
    s.trim().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// process

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into(), "vm".into()]
}

fn process(
    command: Vec<String>,
    restore_args: &[&str],
    save_signal: Option<&str>,
    log: PathBuf,
) -> ProcessDriver {
    let vm = ProcessVm {
        restore_args: restore_args.iter().map(|s| s.to_string()).collect(),
        save_signal: save_signal.map(str::to_string),
        ..ProcessVm::new(command)
    };
    ProcessDriver::new(vm, log)
}

const POLITE: &str = r#"trap "exit 0" TERM; while :; do sleep 0.05; done"#;
const STUBBORN: &str = r#"trap "" TERM; sleep 600 & echo $! > "$HOLDFAST_STATE_FILE.child"; while :; do sleep 0.05; done"#;

fn status_once_exited(d: &mut dyn VmDriver, c: &VmContext) -> VmStatus {
    let mut st = VmStatus::Running;
    eventually("the process to exit", || {
        st = d.status(c).unwrap();
        st != VmStatus::Running
    });
    st
}

#[test]
fn process_start_status_stop() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    // Through build(), with the default log in a directory that does not exist yet.
    let vm = VmConfig::process(sh(&format!("echo hello from {{group}}; {POLITE}")));
    let log = dir.path().join("logs/deep/web.log");
    let mut d = build(&vm, log.clone());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
    d.start(&c).unwrap();
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    let err = d.start(&c).unwrap_err().to_string();
    assert!(err.contains("already running"), "{err}");
    eventually("the log line", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("hello from web"))
    });
    let t = Instant::now();
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("--- holdfast: start web (epoch 7) on n1"),
        "{text}"
    );
}

#[test]
fn process_stop_is_graceful_and_reaps() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    // Writes a file on SIGTERM: proves the stop signal came before any SIGKILL.
    let script = r#"trap 'echo term > "$HOLDFAST_STATE_FILE.term"; exit 0' TERM; while :; do sleep 0.05; done"#;
    let mut d = process(sh(script), &[], None, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert!(!pid_exists(pid), "pid {pid} still exists after stop");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("web.state.term")).unwrap(),
        "term\n"
    );
    // Stopping what is not running is fine.
    d.stop(&c, Duration::from_secs(1)).unwrap();
}

#[test]
fn process_exit_codes_map_to_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    for (script, want) in [
        (
            "sleep 0.3; exit 3",
            VmStatus::Failed("exit status 3".into()),
        ),
        ("sleep 0.3; exit 0", VmStatus::ShutDown),
        (
            "sleep 0.3; kill -KILL $$",
            VmStatus::Failed("killed by signal 9".into()),
        ),
    ] {
        let mut d = process(sh(script), &[], None, dir.path().join("log"));
        d.start(&c).unwrap();
        assert_eq!(d.status(&c).unwrap(), VmStatus::Running, "{script}");
        assert_eq!(status_once_exited(&mut d, &c), want, "{script}");
        // It stays reported until the next action; a stop makes it Stopped.
        assert_eq!(d.status(&c).unwrap(), want, "{script}");
        d.stop(&c, Duration::from_secs(1)).unwrap();
        assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped, "{script}");
    }
}

#[test]
fn process_that_dies_at_once_fails_start_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let log = dir.path().join("log");
    std::fs::write(&log, "output of an earlier run\n").unwrap();
    let mut d = process(sh("echo no such disk >&2; exit 4"), &[], None, log);
    match d.start(&c) {
        Err(DriverError::Failed {
            action: "start",
            detail,
        }) => {
            assert!(detail.contains("exit status 4"), "{detail}");
            assert!(detail.contains("no such disk"), "{detail}");
            assert!(!detail.contains("earlier run"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let mut d = process(
        vec!["/nonexistent/qemu".into()],
        &[],
        None,
        dir.path().join("log"),
    );
    assert!(matches!(
        d.start(&c),
        Err(DriverError::Spawn {
            action: "start",
            ..
        })
    ));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
}

#[test]
fn process_stop_escalates_to_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = process(sh(STUBBORN), &[], None, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let child = read_pid(&dir.path().join("web.state.child"));
    let t = Instant::now();
    d.stop(&c, Duration::from_millis(400)).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(!pid_exists(pid));
    // The whole group: the sleep it started went too.
    eventually("the group's other member to die", || !alive(child));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
}

#[test]
fn process_kill_is_prompt_and_total() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = process(sh(STUBBORN), &[], None, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let child = read_pid(&dir.path().join("web.state.child"));
    let t = Instant::now();
    d.kill(&c).unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Reaped before kill returned.
    assert!(!pid_exists(pid), "pid {pid} still exists after kill");
    eventually("the group's other member to die", || !alive(child));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
}

#[test]
fn process_leftovers_die_with_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let script = r#"sleep 600 & echo $! > "$HOLDFAST_STATE_FILE.child"; sleep 0.3; exit 2"#;
    let mut d = process(sh(script), &[], None, dir.path().join("log"));
    d.start(&c).unwrap();
    let child = read_pid(&dir.path().join("web.state.child"));
    assert_eq!(
        status_once_exited(&mut d, &c),
        VmStatus::Failed("exit status 2".into())
    );
    eventually("the leftover to die", || !alive(child));
}

#[test]
fn process_drop_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = process(sh(STUBBORN), &[], None, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let child = read_pid(&dir.path().join("web.state.child"));
    drop(d);
    assert!(!pid_exists(pid));
    eventually("the group's other member to die", || !alive(child));
}

#[test]
fn process_env_and_placeholders_reach_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let out = dir.path().join("env.out");
    let mut env = BTreeMap::new();
    env.insert("VM_NAME".to_string(), "{group}-{node}".to_string());
    // The agent's variables win over a config's.
    env.insert("HOLDFAST_EPOCH".to_string(), "999".to_string());
    let vm = ProcessVm {
        stop_signal: "TERM".into(),
        env,
        ..ProcessVm::new(vec![
            "sh".into(),
            "-c".into(),
            r#"echo "args $1 $2"; env | grep -E '^(HOLDFAST_|VM_)' | sort; echo end; exec sleep 600"#
                .into(),
            "vm".into(),
            "{disk1}".into(),
            "lun{lun0}@{epoch}".into(),
        ])
    };
    let mut d = ProcessDriver::new(vm, out.clone());
    d.start(&c).unwrap();
    let mut text = String::new();
    eventually("the child's report", || {
        text = std::fs::read_to_string(&out).unwrap_or_default();
        text.contains("end\n")
    });
    d.kill(&c).unwrap();
    for want in [
        "args iscsi://127.0.0.1:3260/iqn.t/1 lun2@7\n",
        "VM_NAME=web-n1\n",
        "HOLDFAST_GROUP=web\n",
        "HOLDFAST_NODE=n1\n",
        "HOLDFAST_NODE_ID=1\n",
        "HOLDFAST_EPOCH=7\n",
        "HOLDFAST_INITIATOR_NAME=iqn.2026-11.org.holdfast:lab.n1.vm\n",
        "HOLDFAST_DISK0=iscsi://127.0.0.1:3260/iqn.t/2\n",
        "HOLDFAST_DISKS=iscsi://127.0.0.1:3260/iqn.t/2 iscsi://127.0.0.1:3260/iqn.t/1\n",
        &format!("HOLDFAST_STATE_FILE={}\n", c.state_file.display()),
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn process_runs_left_by_a_dead_agent_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let pidfile = dir.path().join("web.pid");
    let log = dir.path().join("log");

    let mut d = process(sh(STUBBORN), &[], None, log.clone());
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let child = read_pid(&dir.path().join("web.state.child"));
    let recorded = std::fs::read_to_string(&pidfile).unwrap();
    assert!(recorded.starts_with(&format!("{pid} ")), "{recorded}");
    // The agent dies without dropping its driver (SIGKILL, abort): the VM lives on.
    std::mem::forget(d);
    assert!(alive(pid));

    // The restarted agent's driver kills it through the pid file.
    let mut d = process(sh(STUBBORN), &[], None, log.clone());
    d.kill(&c).unwrap();
    assert!(!alive(pid), "the earlier run's VM survived kill");
    eventually("the earlier run's group to die", || !alive(child));
    assert!(!pidfile.exists());

    // A start clears one first, rather than run a second VM beside it.
    d.start(&c).unwrap();
    let first = d.pid().unwrap();
    std::mem::forget(d);
    let mut d = process(sh(STUBBORN), &[], None, log.clone());
    d.start(&c).unwrap();
    assert!(!alive(first), "two VMs of one group ran at once");
    assert!(alive(d.pid().unwrap()));
    d.kill(&c).unwrap();
    assert!(!pidfile.exists());

    // A stop asks nicely first.
    let script = r#"trap 'echo term > "$HOLDFAST_STATE_FILE.term"; exit 0' TERM; while :; do sleep 0.05; done"#;
    let mut d = process(sh(script), &[], None, log.clone());
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    std::mem::forget(d);
    let mut d = process(sh(script), &[], None, log);
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert!(!alive(pid));
    assert!(dir.path().join("web.state.term").exists());

    // A stale pid file (the pid now names another process, started at another time) is
    // dropped without killing anything: here it names this test process.
    std::fs::write(&pidfile, format!("{} 1\n", std::process::id())).unwrap();
    d.kill(&c).unwrap();
    assert!(!pidfile.exists());
}

/// Saves its "state" on SIGUSR1 and logs its arguments at each start.
const SAVER: &str = r#"echo "args:$*" >> "$HOLDFAST_STATE_FILE.args"
trap 'echo "saved epoch $HOLDFAST_EPOCH" > "$HOLDFAST_STATE_FILE"; exit 0' USR1
trap 'exit 0' TERM
while :; do sleep 0.05; done"#;

#[test]
fn process_save_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let args = dir.path().join("web.state.args");
    let mut d = process(
        sh(SAVER),
        &["--incoming", "file:{state_file}"],
        Some("SIGUSR1"),
        dir.path().join("log"),
    );
    // Nothing saved: nothing started.
    assert!(!d.restore(&c).unwrap());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
    assert!(!args.exists());

    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    d.save(&c, Duration::from_secs(10)).unwrap();
    assert!(!pid_exists(pid));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
    assert_eq!(
        std::fs::read_to_string(&c.state_file).unwrap(),
        "saved epoch 7\n"
    );

    assert!(d.restore(&c).unwrap());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    eventually("the restore's arguments", || {
        std::fs::read_to_string(&args).is_ok_and(|s| s.lines().count() == 2)
    });
    let text = std::fs::read_to_string(&args).unwrap();
    assert_eq!(
        text,
        format!("args:\nargs:--incoming file:{}\n", c.state_file.display())
    );
    d.stop(&c, Duration::from_secs(10)).unwrap();

    d.discard_saved(&c).unwrap();
    assert!(!c.state_file.exists());
    d.discard_saved(&c).unwrap();
    assert!(!d.restore(&c).unwrap());
}

#[test]
fn process_failed_saves_kill_and_leave_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let log = dir.path().join("log");

    // Unsupported without a save signal.
    let mut d = process(sh(POLITE), &[], None, log.clone());
    d.start(&c).unwrap();
    assert!(matches!(
        d.save(&c, Duration::from_secs(1)),
        Err(DriverError::Unsupported { action: "save" })
    ));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    d.kill(&c).unwrap();

    // Exits 0 without writing the state: an older state file must not pass for it.
    std::fs::write(&c.state_file, "stale").unwrap();
    let script = r#"trap 'echo not saving; exit 0' USR1; while :; do sleep 0.05; done"#;
    let mut d = process(sh(script), &[], Some("USR1"), log.clone());
    d.start(&c).unwrap();
    match d.save(&c, Duration::from_secs(10)) {
        Err(DriverError::Failed {
            action: "save",
            detail,
        }) => {
            assert!(detail.contains("without writing"), "{detail}");
            assert!(detail.contains("not saving"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!c.state_file.exists());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    // Writes half a state and fails: the partial file goes.
    let script = r#"trap 'echo partial > "$HOLDFAST_STATE_FILE"; exit 1' USR1; while :; do sleep 0.05; done"#;
    let mut d = process(sh(script), &[], Some("USR1"), log.clone());
    d.start(&c).unwrap();
    let e = d.save(&c, Duration::from_secs(10)).unwrap_err().to_string();
    assert!(e.contains("exit status 1"), "{e}");
    assert!(!c.state_file.exists());

    // Ignores the save signal: killed at the timeout.
    let script = r#"trap '' USR1; while :; do sleep 0.05; done"#;
    let mut d = process(sh(script), &[], Some("USR1"), log);
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let t = Instant::now();
    assert!(matches!(
        d.save(&c, Duration::from_millis(300)),
        Err(DriverError::Timeout { action: "save", .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!pid_exists(pid));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
}

// ---------------------------------------------------------------------------------------
// script

fn script_driver(timeout: Duration) -> Box<dyn VmDriver> {
    build(
        &VmConfig::Script {
            path: fixture("test-vm-script.sh"),
            timeout,
            pause: false,
        },
        PathBuf::from("/nonexistent/unused.log"),
    )
}

fn calls(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn script_drives_every_action() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let pidf = dir.path().join("web.pid");
    let mut d = script_driver(Duration::from_secs(20));

    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped); // exit 3
    assert!(!d.restore(&c).unwrap()); // exit 7

    // start leaves its sleep holding stdout: the call must still come back at once.
    let t = Instant::now();
    d.start(&c).unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running); // exit 0
    let env = std::fs::read_to_string(dir.path().join("env-start")).unwrap();
    for want in [
        "HOLDFAST_ACTION=start\n",
        "HOLDFAST_TIMEOUT_SECS=20\n",
        "HOLDFAST_GROUP=web\n",
        "HOLDFAST_EPOCH=7\n",
        "HOLDFAST_DISK1=iscsi://127.0.0.1:3260/iqn.t/1\n",
    ] {
        assert!(env.contains(want), "missing {want:?} in:\n{env}");
    }

    let vm = read_pid(&pidf);
    d.save(&c, Duration::from_secs(9)).unwrap();
    eventually("the saved VM to die", || !alive(vm));
    assert_eq!(
        std::fs::read_to_string(&c.state_file).unwrap(),
        format!("state of {vm}\n")
    );
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    assert!(d.restore(&c).unwrap()); // exit 0
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    let vm = read_pid(&pidf);
    d.stop(&c, Duration::from_secs(3)).unwrap();
    assert!(!alive(vm));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    d.discard_saved(&c).unwrap();
    assert!(!c.state_file.exists());
    assert!(!d.restore(&c).unwrap());

    d.start(&c).unwrap();
    let vm = read_pid(&pidf);
    d.kill(&c).unwrap();
    eventually("the killed VM to die", || !alive(vm));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    // Each action ran as `script ACTION` with its name and timeout in the environment;
    // stop and save got the agent's timeouts, the rest the configured one.
    assert_eq!(
        calls(&dir.path().join("calls.log")),
        [
            "status status 20",
            "restore restore 20",
            "start start 20",
            "status status 20",
            "save save 9",
            "status status 20",
            "restore restore 20",
            "status status 20",
            "stop stop 3",
            "status status 20",
            "restore restore 20",
            "start start 20",
            "kill kill 20",
            "status status 20",
        ]
    );
}

#[test]
fn script_statuses_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let pidf = dir.path().join("web.pid");
    let mut d = script_driver(Duration::from_secs(20));

    // The VM dies behind the script's back: "dead but pid file exists" (exit 1).
    d.start(&c).unwrap();
    let vm = read_pid(&pidf);
    unsafe { libc::kill(vm as i32, libc::SIGKILL) };
    eventually("the VM to die", || !alive(vm));
    match d.status(&c).unwrap() {
        VmStatus::Failed(m) => {
            assert!(m.contains("exit status 1"), "{m}");
            assert!(m.contains("dead but pid file exists"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // Its admin shut it down (exit 5).
    std::fs::write(dir.path().join("clean-exit"), "").unwrap();
    assert_eq!(d.status(&c).unwrap(), VmStatus::ShutDown);
    d.kill(&c).unwrap();
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    // Cannot save (exit 3).
    d.start(&c).unwrap();
    std::fs::write(dir.path().join("no-save"), "").unwrap();
    assert!(matches!(
        d.save(&c, Duration::from_secs(5)),
        Err(DriverError::Unsupported { action: "save" })
    ));
    std::fs::remove_file(dir.path().join("no-save")).unwrap();

    // A kill that fails is reported, with the script's words.
    std::fs::write(dir.path().join("fail-kill"), "").unwrap();
    match d.kill(&c) {
        Err(DriverError::Failed {
            action: "kill",
            detail,
        }) => {
            assert!(detail.contains("exit status 1"), "{detail}");
            assert!(detail.contains("permission denied"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    std::fs::remove_file(dir.path().join("fail-kill")).unwrap();
    d.kill(&c).unwrap();

    // A save of a VM that is not running fails (exit 1), quoting stderr.
    let e = d.save(&c, Duration::from_secs(5)).unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");
}

#[test]
fn script_timeouts_kill_the_script_group() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = script_driver(Duration::from_millis(300));
    for (action, knob) in [("status", "hang-status"), ("stop", "hang-stop")] {
        let knob = dir.path().join(knob);
        std::fs::write(&knob, "").unwrap();
        let _ = std::fs::remove_file(dir.path().join("hang.pid"));
        let t = Instant::now();
        let r = match action {
            "status" => d.status(&c).map(|_| ()),
            _ => d.stop(&c, Duration::from_millis(500)),
        };
        let took = t.elapsed();
        match r {
            Err(DriverError::Timeout { action: a, after }) => {
                assert_eq!(a, action);
                assert!(took >= after, "{took:?} < {after:?}");
            }
            other => panic!("{action}: {other:?}"),
        }
        assert!(took < Duration::from_secs(3), "{action}: {took:?}");
        // The script's child went down with it.
        let hung = read_pid(&dir.path().join("hang.pid"));
        eventually("the hung script's child to die", || !alive(hung));
        std::fs::remove_file(&knob).unwrap();
    }
}

#[test]
fn script_missing_or_not_executable_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let plain = dir.path().join("not-executable.sh");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    for path in [dir.path().join("missing.sh"), plain] {
        let mut d = build(
            &VmConfig::Script {
                path: path.clone(),
                timeout: Duration::from_secs(5),
                pause: false,
            },
            PathBuf::new(),
        );
        match d.start(&c) {
            Err(DriverError::Spawn {
                action: "start",
                program,
                ..
            }) => assert_eq!(program, path.display().to_string()),
            other => panic!("{}: {other:?}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// libvirt

struct FakeLibvirt {
    dir: tempfile::TempDir,
}

impl FakeLibvirt {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.xml"),
            "<domain type='kvm'>\n  <name>web</name>\n  <memory>1024</memory>\n  <devices><disk>\
             <source><initiator><iqn name='iqn.2026-11.org.holdfast:lab.n1.vm'/></initiator>\
             </source></disk></devices>\n</domain>\n",
        )
        .unwrap();
        FakeLibvirt { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The driver for domain "{group}" (= web) through `-c fake://DIR`: the fake finds its
    /// domains through that URI, so every logged call proves `-c` was passed.
    fn driver(&self, with_xml: bool) -> Box<dyn VmDriver> {
        self.driver_migrating_to(with_xml, None)
    }

    /// With `migrate_uri` set: the URI a live migration to this "host" goes to.
    fn driver_migrating_to(&self, with_xml: bool, migrate_uri: Option<&str>) -> Box<dyn VmDriver> {
        build(
            &VmConfig::Libvirt {
                domain: "{group}".into(),
                xml: with_xml.then(|| self.path().join("web.xml")),
                uri: Some(format!("fake://{}", self.path().display())),
                virsh: fixture("fake-virsh.sh").display().to_string(),
                migrate_uri: migrate_uri.map(str::to_string),
            },
            PathBuf::new(),
        )
    }

    /// The virsh calls since the last look.
    fn calls(&self) -> Vec<String> {
        let log = self.path().join("calls.log");
        let v = calls(&log);
        let _ = std::fs::remove_file(&log);
        v
    }

    fn set_state(&self, state: &str, reason: &str) {
        let d = self.path().join("web");
        std::fs::write(d.join("state"), format!("{state}\n")).unwrap();
        std::fs::write(d.join("reason"), format!("{reason}\n")).unwrap();
    }

    fn reason(&self) -> String {
        std::fs::read_to_string(self.path().join("web/reason"))
            .unwrap()
            .trim()
            .to_string()
    }
}

#[test]
fn libvirt_start_defines_and_drops_a_managed_save() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped); // unknown domain
    f.calls();

    d.start(&c).unwrap();
    let xml = f.path().join("web.xml");
    assert_eq!(
        f.calls(),
        [
            "dominfo web".to_string(),
            format!("define {}", xml.display()),
            "managedsave-remove web".into(),
            "start web".into(),
        ]
    );
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    assert_eq!(f.calls(), ["domstate --reason web"]);

    // Already defined: no define. Already running: virsh refuses, and says why.
    let e = d.start(&c).unwrap_err().to_string();
    assert!(e.contains("already active"), "{e}");
    assert_eq!(
        f.calls(),
        ["dominfo web", "managedsave-remove web", "start web"]
    );

    // A plain start after a save boots fresh: the managed save is removed first.
    d.save(&c, Duration::from_secs(5)).unwrap();
    assert!(f.path().join("web/managedsave").exists());
    f.calls();
    d.start(&c).unwrap();
    assert_eq!(
        f.calls(),
        ["dominfo web", "managedsave-remove web", "start web"]
    );
    assert!(!f.path().join("web/managedsave").exists());
    assert_eq!(f.reason(), "booted");
    d.kill(&c).unwrap();
}

#[test]
fn libvirt_without_xml_or_domain_fails_start_and_has_nothing_to_restore() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(false);
    assert!(!d.restore(&c).unwrap());
    assert_eq!(f.calls(), ["dominfo web"]);
    let e = d.start(&c).unwrap_err().to_string();
    assert!(e.contains("failed to get domain"), "{e}");
    assert_eq!(f.calls(), ["managedsave-remove web"]);
    // Killing or stopping a domain this node never had is not an error.
    d.kill(&c).unwrap();
    d.stop(&c, Duration::from_secs(1)).unwrap();
    d.discard_saved(&c).unwrap();
}

#[test]
fn libvirt_save_and_restore() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    d.start(&c).unwrap();
    f.calls();

    d.save(&c, Duration::from_secs(5)).unwrap();
    assert_eq!(f.calls(), ["managedsave web"]);
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped); // shut off (saved)

    assert!(d.restore(&c).unwrap());
    assert_eq!(
        f.calls(),
        ["domstate --reason web", "dominfo web", "start web"]
    );
    assert_eq!(f.reason(), "restored");
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);

    // Nothing saved now: restore starts nothing.
    d.kill(&c).unwrap();
    f.calls();
    assert!(!d.restore(&c).unwrap());
    assert_eq!(f.calls(), ["dominfo web"]);

    // discard_saved removes the image; without one it is still fine.
    d.start(&c).unwrap();
    d.save(&c, Duration::from_secs(5)).unwrap();
    f.calls();
    d.discard_saved(&c).unwrap();
    d.discard_saved(&c).unwrap();
    assert_eq!(
        f.calls(),
        ["managedsave-remove web", "managedsave-remove web"]
    );
    assert!(!d.restore(&c).unwrap());
}

#[test]
fn libvirt_stop_shuts_down_then_destroys() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);

    // A guest that shuts down: asked, polled until shut off, no destroy.
    d.start(&c).unwrap();
    f.calls();
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert_eq!(
        f.calls(),
        [
            "domstate web",
            "shutdown web",
            "domstate web",
            "domstate web"
        ]
    );
    assert_eq!(f.reason(), "shutdown");
    // The guest powered off because we asked: Stopped, not ShutDown.
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);

    // Already shut off: nothing to do.
    f.calls();
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert_eq!(f.calls(), ["domstate web"]);

    // A guest that ignores the request is destroyed once the timeout passes.
    d.start(&c).unwrap();
    std::fs::write(f.path().join("web/refuse-shutdown"), "").unwrap();
    f.calls();
    let t = Instant::now();
    d.stop(&c, Duration::from_millis(700)).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let calls = f.calls();
    assert_eq!(calls[..2], ["domstate web", "shutdown web"], "{calls:?}");
    assert_eq!(
        calls.last().map(String::as_str),
        Some("destroy web"),
        "{calls:?}"
    );
    let polls = &calls[2..calls.len() - 1];
    assert!(
        !polls.is_empty() && polls.iter().all(|c| c == "domstate web"),
        "{calls:?}"
    );
    assert_eq!(f.reason(), "destroyed");
    assert_eq!(d.status(&c).unwrap(), VmStatus::Stopped);
}

#[test]
fn libvirt_kill_destroys_and_tolerates_shut_off() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    d.start(&c).unwrap();
    f.calls();
    d.kill(&c).unwrap();
    assert_eq!(f.calls(), ["destroy web"]);
    assert_eq!(f.reason(), "destroyed");
    // Already shut off: virsh destroy refuses, domstate confirms, and that is success.
    d.kill(&c).unwrap();
    assert_eq!(f.calls(), ["destroy web", "domstate web"]);
}

#[test]
fn libvirt_status_parses_each_domstate() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    d.start(&c).unwrap();
    for (state, reason, want) in [
        ("running", "booted", VmStatus::Running),
        ("paused", "user", VmStatus::Running),
        ("blocked", "unknown", VmStatus::Running),
        ("pmsuspended", "unknown", VmStatus::Running),
        ("shut off", "shutdown", VmStatus::ShutDown),
        ("shut off", "destroyed", VmStatus::Stopped),
        ("shut off", "saved", VmStatus::Stopped),
        ("shut off", "unknown", VmStatus::Stopped),
        (
            "shut off",
            "crashed",
            VmStatus::Failed("shut off (crashed)".into()),
        ),
        (
            "crashed",
            "panicked",
            VmStatus::Failed("crashed (panicked)".into()),
        ),
    ] {
        f.set_state(state, reason);
        f.calls();
        assert_eq!(d.status(&c).unwrap(), want, "{state} ({reason})");
        assert_eq!(f.calls(), ["domstate --reason web"]);
    }
}

#[test]
fn libvirt_save_timeout_aborts_the_job() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    d.start(&c).unwrap();
    std::fs::write(f.path().join("hang-managedsave"), "").unwrap();
    f.calls();
    let t = Instant::now();
    match d.save(&c, Duration::from_millis(300)) {
        Err(DriverError::Timeout { action: "save", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        f.calls(),
        [
            "managedsave web",
            "domjobabort web",
            "managedsave-remove web"
        ]
    );
    d.kill(&c).unwrap();
}

#[test]
fn libvirt_missing_virsh_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = build(
        &VmConfig::Libvirt {
            domain: "web".into(),
            xml: None,
            uri: None,
            virsh: "/nonexistent/virsh".into(),
            migrate_uri: None,
        },
        PathBuf::new(),
    );
    assert!(matches!(
        d.status(&c),
        Err(DriverError::Spawn {
            action: "status",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------
// pause / resume

/// State letters of every thread of every process in process group `pgid`, read from
/// /proc independently of the driver.
fn group_thread_states(pgid: u32) -> Vec<char> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let f: Vec<String> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        if f.get(2).and_then(|p| p.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(s) = std::fs::read_to_string(t.path().join("stat")) {
                if let Some((_, r)) = s.rsplit_once(')') {
                    out.push(r.trim_start().chars().next().unwrap());
                }
            }
        }
    }
    out
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn process_pause_freezes_the_group_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let (f, g) = (
        dir.path().join("child.out"),
        dir.path().join("grandchild.out"),
    );
    let script = format!(
        r#"trap 'echo term > "$HOLDFAST_STATE_FILE.term"; kill $gc; exit 0' TERM
( trap - TERM; while :; do echo g >> {g}; sleep 0.01; done ) & gc=$!
while :; do echo c >> {f}; sleep 0.01; done"#,
        f = f.display(),
        g = g.display()
    );
    let mut d = process(sh(&script), &[], None, dir.path().join("log"));
    // Not running: an error that says so.
    let e = d.pause(&c).unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    eventually("both writers", || size(&f) > 0 && size(&g) > 0);

    d.pause(&c).unwrap();
    let states = group_thread_states(pid);
    assert!(states.len() >= 2, "{states:?}");
    assert!(states.iter().all(|s| matches!(s, 'T' | 'Z')), "{states:?}");
    assert!(states.contains(&'T'), "{states:?}");
    let (a, b) = (size(&f), size(&g));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!((size(&f), size(&g)), (a, b), "a paused VM wrote");
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);

    d.resume(&c).unwrap();
    eventually("both writers again", || size(&f) > a && size(&g) > b);
    assert!(!group_thread_states(pid).contains(&'T'));

    // Kill of a paused VM: prompt, reaped.
    d.pause(&c).unwrap();
    let t = Instant::now();
    d.kill(&c).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!pid_exists(pid), "pid {pid} not reaped");
    // The rest of the group died too (zombies where init does not reap orphans).
    eventually("the group to die", || {
        group_thread_states(pid).iter().all(|s| *s == 'Z')
    });
    let e = d.resume(&c).unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");

    // Stop of a paused VM is graceful: its TERM handler runs.
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    d.pause(&c).unwrap();
    let t = Instant::now();
    d.stop(&c, Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(!pid_exists(pid));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("web.state.term")).unwrap(),
        "term\n"
    );
    assert!(d.pause(&c).unwrap_err().to_string().contains("not running"));
}

/// qemu-system-x86_64 must be installed: this test does not pass without it.
fn qemu() -> String {
    let found = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): the QMP \
         pause test needs a real QEMU"
    );
    "qemu-system-x86_64".into()
}

/// query-status over a raw QMP exchange, independent of the driver's client.
fn raw_qmp_status(sock: &Path) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
    writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).unwrap();
    writeln!(w, r#"{{"execute":"query-status","id":"q"}}"#).unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["id"] == "q" {
            return v["return"]["status"].as_str().unwrap().to_string();
        }
    }
}

#[test]
fn process_pause_through_qmp_against_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let command: Vec<String> = [
        qemu().as_str(),
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        "unix:{state_dir}/{group}.qmp,server=on,wait=off",
    ]
    .map(String::from)
    .to_vec();
    let vm = ProcessVm {
        qmp: Some("{state_dir}/{group}.qmp".into()),
        ..ProcessVm::new(command)
    };
    let mut d = ProcessDriver::new(vm, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    let sock = dir.path().join("web.qmp");
    eventually("the QMP socket", || sock.exists());
    assert_eq!(raw_qmp_status(&sock), "running");
    d.pause(&c).unwrap();
    assert_eq!(raw_qmp_status(&sock), "paused");
    // Paused by QMP, not by a signal: the monitor still answers.
    assert!(!group_thread_states(pid).contains(&'T'));
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running);
    d.resume(&c).unwrap();
    assert_eq!(raw_qmp_status(&sock), "running");
    d.pause(&c).unwrap();
    d.kill(&c).unwrap();
    assert!(!pid_exists(pid));

    // Without qmp, the same QEMU is frozen thread by thread.
    let vm = ProcessVm::new(
        [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
        ]
        .map(String::from)
        .to_vec(),
    );
    let mut d = ProcessDriver::new(vm, dir.path().join("log"));
    d.start(&c).unwrap();
    let pid = d.pid().unwrap();
    d.pause(&c).unwrap();
    let states = group_thread_states(pid);
    assert!(
        states.len() >= 2 && states.iter().all(|s| *s == 'T'),
        "{states:?}"
    );
    d.resume(&c).unwrap();
    d.kill(&c).unwrap();
}

#[test]
fn script_pause_only_with_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx(dir.path());
    let mut d = script_driver(Duration::from_secs(20));
    assert!(matches!(
        d.pause(&c),
        Err(DriverError::Unsupported { action: "pause" })
    ));
    assert!(matches!(
        d.resume(&c),
        Err(DriverError::Unsupported { action: "resume" })
    ));
    assert!(calls(&dir.path().join("calls.log")).is_empty());
    let mut d = build(
        &VmConfig::Script {
            path: fixture("test-vm-script.sh"),
            timeout: Duration::from_secs(20),
            pause: true,
        },
        PathBuf::new(),
    );
    d.start(&c).unwrap();
    let vm = read_pid(&dir.path().join("web.pid"));
    d.pause(&c).unwrap();
    // The fixture's VM (a sleep) is started detached from the script's group: check it.
    let st = std::fs::read_to_string(format!("/proc/{vm}/stat")).unwrap();
    assert!(
        st.rsplit_once(')').unwrap().1.trim_start().starts_with('T'),
        "{st}"
    );
    d.resume(&c).unwrap();
    d.kill(&c).unwrap();
    assert_eq!(
        calls(&dir.path().join("calls.log")),
        [
            "start start 20",
            "pause pause 20",
            "resume resume 20",
            "kill kill 20"
        ]
    );
}

#[test]
fn libvirt_pause_suspends_and_resume_resumes() {
    let f = FakeLibvirt::new();
    let c = ctx(f.path());
    let mut d = f.driver(true);
    d.start(&c).unwrap();
    f.calls();
    d.pause(&c).unwrap();
    assert_eq!(f.calls(), ["suspend web"]);
    assert_eq!(d.status(&c).unwrap(), VmStatus::Running); // paused (user)
    assert_eq!(f.reason(), "user");
    d.resume(&c).unwrap();
    assert_eq!(f.reason(), "unpaused");
    d.kill(&c).unwrap();
    f.calls();
    let e = d.pause(&c).unwrap_err().to_string();
    assert!(
        e.contains("virsh suspend web") && e.contains("not running"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// libvirt live migration: two fake "hosts", the source's virsh migrating to the other

const N2_VM: &str = "iqn.2026-11.org.holdfast:lab.n2.vm";

/// The destination node's context (its own VM initiator name).
fn dest_ctx(dir: &Path) -> VmContext {
    VmContext {
        node: "n2".into(),
        node_id: 2,
        initiator_name: N2_VM.into(),
        ..ctx(dir)
    }
}

/// A destination "host" whose libvirt runs the repo's qemu hook with this node's name.
fn dest_with_hook() -> FakeLibvirt {
    let f = FakeLibvirt::new();
    std::fs::copy(fixture("libvirt-qemu-hook.sh"), f.path().join("hook-qemu")).unwrap();
    std::fs::write(
        f.path().join("holdfast-vm-initiator-name"),
        format!("{N2_VM}\n"),
    )
    .unwrap();
    f
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

#[test]
fn libvirt_live_migration_arrives_paused_and_resumes_on_the_destination() {
    let (src, dst) = (FakeLibvirt::new(), dest_with_hook());
    let (c1, c2) = (ctx(src.path()), dest_ctx(dst.path()));
    let mut s = src.driver(true);
    let mut d = dst.driver_migrating_to(false, Some("fake://{migration_address}"));
    assert!(s.can_migrate_live() && d.can_migrate_live());
    s.start(&c1).unwrap();
    src.calls();

    let uri = d.start_incoming(&c2, dst.path().to_str().unwrap()).unwrap();
    assert_eq!(uri, format!("fake://{}", dst.path().display()));
    assert_eq!(dst.calls(), ["domstate web"]);
    // Nothing has come yet: the wait times out (the agent asks again).
    let e = d
        .wait_incoming(&c2, Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    dst.calls();

    let st = s.migrate_live(&c1, &uri, Duration::from_secs(10)).unwrap();
    assert_eq!(st.downtime, Duration::from_millis(41));
    assert_eq!(st.total, Duration::from_millis(1530));
    assert_eq!(st.transferred, 12 * 1024 * 1024 + 512 * 1024);
    assert_eq!(
        src.calls(),
        [
            format!("migrate --live --suspend --abort-on-error web {uri}"),
            "domjobinfo --completed web".into(),
        ]
    );
    assert_eq!(s.status(&c1).unwrap(), VmStatus::Stopped); // shut off (migrated)

    d.wait_incoming(&c2, Duration::from_secs(10)).unwrap();
    assert_eq!(dst.calls(), ["domstate --reason web", "dumpxml web"]);
    assert_eq!(read(dst.path().join("web/state")), "paused");
    // The hook gave the disks this node's initiator name.
    let xml = read(dst.path().join("web/xml"));
    assert!(xml.contains(N2_VM) && !xml.contains("n1.vm"), "{xml}");

    d.continue_migrated(&c2).unwrap();
    assert_eq!(dst.calls(), ["resume web", "domstate web"]);
    assert_eq!(d.status(&c2).unwrap(), VmStatus::Running);
    assert_eq!(dst.reason(), "unpaused");

    // No way back on the source: libvirt's domain left it.
    let e = s.continue_migrated(&c1).unwrap_err().to_string();
    assert!(
        e.contains("virsh resume web") && e.contains("not running"),
        "{e}"
    );
    s.kill(&c1).unwrap();
    // A second incoming on a node where the domain runs is refused before anything.
    let e = d.start_incoming(&c2, "h").unwrap_err().to_string();
    assert!(e.contains("already running"), "{e}");
}

#[test]
fn libvirt_failed_live_migration_leaves_the_domain_running_on_the_source() {
    let (src, dst) = (FakeLibvirt::new(), dest_with_hook());
    let (c1, c2) = (ctx(src.path()), dest_ctx(dst.path()));
    let mut s = src.driver(true);
    let mut d = dst.driver_migrating_to(false, Some("fake://{migration_address}"));
    s.start(&c1).unwrap();
    let uri = d.start_incoming(&c2, dst.path().to_str().unwrap()).unwrap();

    std::fs::write(src.path().join("fail-migrate"), "").unwrap();
    src.calls();
    let e = s
        .migrate_live(&c1, &uri, Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpectedly failed"), "{e}");
    assert_eq!(
        src.calls(),
        [format!(
            "migrate --live --suspend --abort-on-error web {uri}"
        )]
    );
    assert_eq!(s.status(&c1).unwrap(), VmStatus::Running);
    assert_eq!(src.reason(), "booted");
    assert!(!dst.path().join("web").exists());

    // A virsh that hangs: killed at the timeout, libvirt's job aborted, still here.
    std::fs::remove_file(src.path().join("fail-migrate")).unwrap();
    std::fs::write(src.path().join("hang-migrate"), "").unwrap();
    src.calls();
    let t = Instant::now();
    let e = s
        .migrate_live(&c1, &uri, Duration::from_millis(500))
        .unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let calls = src.calls();
    assert_eq!(calls[1..], ["domjobabort web", "domstate --reason web"]);
    assert_eq!(s.status(&c1).unwrap(), VmStatus::Running);

    // The destination gives up: nothing arrived, and its clean-up (kill) finds nothing.
    let e = d
        .wait_incoming(&c2, Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    d.kill(&c2).unwrap();
    assert_eq!(d.status(&c2).unwrap(), VmStatus::Stopped);
}

#[test]
fn libvirt_incoming_domain_with_the_source_initiator_is_refused() {
    // No hook on the destination: the disks would log in with the source's name.
    let (src, dst) = (FakeLibvirt::new(), FakeLibvirt::new());
    let (c1, c2) = (ctx(src.path()), dest_ctx(dst.path()));
    let mut s = src.driver(true);
    let mut d = dst.driver_migrating_to(false, Some("fake://{migration_address}"));
    s.start(&c1).unwrap();
    let uri = d.start_incoming(&c2, dst.path().to_str().unwrap()).unwrap();
    s.migrate_live(&c1, &uri, Duration::from_secs(10)).unwrap();
    let e = d
        .wait_incoming(&c2, Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("iqn.2026-11.org.holdfast:lab.n1.vm") && e.contains(N2_VM),
        "{e}"
    );
    // The agent's abort then destroys the paused domain there.
    d.kill(&c2).unwrap();
    assert_eq!(dst.reason(), "destroyed");
}
