//! `holdfast target` as a systemd service, on the real binary: READY=1 only once the
//! portal accepts connections, STATUS= lines, RELOADING=1/READY=1 around a SIGHUP
//! reload and STOPPING=1 on SIGTERM, all received on a fake NOTIFY_SOCKET; and the
//! single-instance lock on the data directory.

use crate::common::notify::NotifySocket;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A config with `luns` 1 MiB LUNs in `data`, one portal on `port`.
fn config(data: &Path, port: u16, luns: u64) -> String {
    let mut s = format!(
        "data_dir = \"{}\"\n[[target]]\nname = \"iqn.2026-11.org.holdfast:svc\"\n\
         [[target.portal]]\nlisten = \"127.0.0.1:{port}\"\ntpgt = 1\n",
        data.display()
    );
    for id in 0..luns {
        s += &format!("[[target.lun]]\nid = {id}\npath = \"lun{id}.img\"\nsize = \"1MiB\"\n");
    }
    s
}

fn spawn_target(cfg: &Path, log: &Path, notify: Option<&Path>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.args(["--log", "info", "target", "--config"])
        .arg(cfg)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"));
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    cmd.spawn().expect("spawn holdfast target")
}

fn signal(c: &Child, s: Signal) {
    kill(Pid::from_raw(c.id() as i32), s).expect("kill");
}

/// Wait for `c` to exit within `timeout`; kills it and panics if it does not.
fn wait_exit(c: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(st) = c.try_wait().expect("try_wait") {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    panic!("{what} did not exit within {timeout:?}");
}

/// Kills the child if the test panics before stopping it.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn target_notifies_ready_status_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg) = (dir.path().join("data"), dir.path().join("t.toml"));
    let port = free_port();
    std::fs::write(&cfg, config(&data, port, 2)).unwrap();
    let n = NotifySocket::bind(&dir.path().join("notify.sock"));
    let mut t = Reap(spawn_target(
        &cfg,
        &dir.path().join("t.log"),
        Some(n.path()),
    ));
    let (ready, _) = n.wait_for(0, T, "READY=1", |l| l == "READY=1");
    // READY=1 promises a bound portal: a connection succeeds at once.
    TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("READY=1 came before the portal was bound");
    let want = format!("STATUS=serving 2 LUNs on 127.0.0.1:{port}");
    n.wait_for(0, T, &want, |l| l == want);

    // A SIGHUP reload that adds a LUN: RELOADING=1 (with the monotonic time systemd
    // wants), then READY=1 again and the new STATUS.
    std::fs::write(&cfg, config(&data, port, 3)).unwrap();
    signal(&t.0, Signal::SIGHUP);
    let (reloading, _) = n.wait_for(ready + 1, T, "RELOADING=1", |l| l == "RELOADING=1");
    n.wait_for(reloading, T, "MONOTONIC_USEC", |l| {
        l.strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())
    });
    let (again, _) = n.wait_for(reloading + 1, T, "READY=1 after the reload", |l| {
        l == "READY=1"
    });
    let want = format!("STATUS=serving 3 LUNs on 127.0.0.1:{port}");
    n.wait_for(again, T, &want, |l| l == want);

    signal(&t.0, Signal::SIGTERM);
    n.wait_for(again, T, "STOPPING=1", |l| l == "STOPPING=1");
    let st = wait_exit(&mut t.0, T, "the target");
    assert!(st.success(), "{st}");
}

#[test]
fn a_second_target_on_the_same_data_directory_exits_naming_it_and_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (p1, p2) = (free_port(), free_port());
    let (cfg1, cfg2): (PathBuf, PathBuf) = (dir.path().join("1.toml"), dir.path().join("2.toml"));
    std::fs::write(&cfg1, config(&data, p1, 1)).unwrap();
    std::fs::write(&cfg2, config(&data, p2, 1)).unwrap();
    let first = Reap(spawn_target(&cfg1, &dir.path().join("1.log"), None));
    let end = Instant::now() + T;
    while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], p1))).is_err() {
        assert!(Instant::now() < end, "the first target did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log2 = dir.path().join("2.log");
    let mut second = spawn_target(&cfg2, &log2, None);
    let st = wait_exit(&mut second, T, "the second target");
    let err = std::fs::read_to_string(&log2).unwrap();
    assert!(
        !st.success(),
        "a second target ran on {}: {err}",
        data.display()
    );
    assert!(err.contains(&data.display().to_string()), "{err}");
    assert!(err.contains(&format!("pid {}", first.0.id())), "{err}");
    assert!(err.contains("another holdfast target"), "{err}");
    // It stopped before its portal: nothing listens there, and the first still serves.
    assert!(TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], p2))).is_err());
    assert!(TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], p1))).is_ok());
}

/// The shipped units with ExecStart naming the binary under test: `verify` checks that
/// the program exists.
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    ["holdfast-target.service", "holdfast-agent.service"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(root.join(name)).expect("unit file");
            let text = text.replace("/usr/bin/holdfast", env!("CARGO_BIN_EXE_holdfast"));
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect()
}

#[test]
fn systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units_for_verify(dir.path()))
        .output()
        .expect("systemd-analyze (Debian package systemd; tools/deps.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on a misspelt value ("Failed to parse …, ignoring"): any output
    // is a finding.
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

/// The values of `key=` in a unit file.
fn setting(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(unit)).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

fn duration(unit: &str, key: &str) -> Duration {
    let v = setting(unit, key);
    assert_eq!(v.len(), 1, "{unit}: {key} = {v:?}");
    humantime::parse_duration(&v[0]).unwrap_or_else(|e| panic!("{unit}: {key}: {e}"))
}

#[test]
fn the_units_notify_and_the_agent_stop_covers_the_handover() {
    use holdfast::agent::config::{GroupConfig, Timings, VmConfig};
    let (target, agent) = (
        "packaging/systemd/holdfast-target.service",
        "packaging/systemd/holdfast-agent.service",
    );
    for unit in [target, agent] {
        assert_eq!(setting(unit, "Type"), ["notify"], "{unit}");
        assert_eq!(setting(unit, "NotifyAccess"), ["main"], "{unit}");
        assert_eq!(setting(unit, "Restart"), ["on-failure"], "{unit}");
    }
    assert!(setting(target, "ExecStart")[0].ends_with("--config /etc/holdfast/target.toml"));
    assert!(setting(agent, "ExecStart")[0].ends_with("--config /etc/holdfast/node.toml"));
    assert!(setting(target, "ExecReload")[0].contains("-HUP $MAINPID"));
    // SIGTERM to the agent only; it stops the VMs itself after handing groups over.
    assert_eq!(setting(agent, "KillMode"), ["mixed"]);
    // The watchdog is fed from the heartbeat loop, at most every WatchdogSec/2.
    let t = Timings::default();
    assert!(duration(agent, "WatchdogSec") >= 4 * t.heartbeat_interval);
    // The hand-over with the agent's defaults, for 8 running groups one after another:
    // the settle bound, then per group its stop_timeout and ~10 quorum/disk writes.
    let vm = VmConfig::Script {
        path: "/x".into(),
        timeout: Duration::from_secs(1),
        pause: false,
    };
    let stop = GroupConfig::new("g", vec![1], vm).stop_timeout;
    let handover = holdfast::agent::node::HANDOVER_SETTLE + 8 * (stop + 10 * t.io_timeout);
    let timeout = duration(agent, "TimeoutStopSec");
    assert!(
        timeout >= handover,
        "TimeoutStopSec {timeout:?} < hand-over {handover:?}"
    );
}

/// Under a soft open-file limit of 100 and a hard one of 150 (prlimit(1)), the target
/// raises its soft limit to 150 and warns, at start-up, that 150 cannot hold the
/// 2 LUN files + 1,024 connections its configuration allows.
#[test]
fn target_raises_its_open_file_limit_and_warns_when_the_hard_one_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let (data, cfg, log) = (
        dir.path().join("data"),
        dir.path().join("t.toml"),
        dir.path().join("t.log"),
    );
    let port = free_port();
    std::fs::write(&cfg, config(&data, port, 2)).unwrap();
    let child = Command::new("prlimit")
        .arg("--nofile=100:150")
        .arg(env!("CARGO_BIN_EXE_holdfast"))
        .args(["--log", "info", "target", "--config"])
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn prlimit holdfast target");
    let mut t = Reap(child);
    let end = Instant::now() + T;
    while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
        assert!(Instant::now() < end, "target never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", t.0.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(fields[3..5], ["150", "150"], "{open_files}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("open-file limit (RLIMIT_NOFILE) 150 is below the 1090 descriptors")
            && text.contains("2 LUN files + limits.max_connections 1024"),
        "{text}"
    );
    signal(&t.0, Signal::SIGTERM);
    let st = wait_exit(&mut t.0, T, "the target");
    assert!(st.success(), "{st}");
}
