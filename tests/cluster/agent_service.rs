//! `holdfast agent` as a systemd service, on real processes in a small cluster: READY=1
//! once it has joined the quorum LUN, STATUS= lines as the cluster changes, WATCHDOG=1
//! from the heartbeat loop at WATCHDOG_USEC/2, STOPPING=1 on SIGTERM (all on a fake
//! NOTIFY_SOCKET); and the single-instance lock on the state directory.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use common::notify::NotifySocket;
use holdfast::cli::cluster_kit::Launch;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Child;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// What the test's "systemd" asks for: pings expected every second.
const WATCHDOG: Duration = Duration::from_secs(2);

fn web_on(nodes: &[u16]) -> GroupSpec {
    let mut s = GroupSpec::new("web", 1);
    s.preferred = nodes.iter().map(|&n| node_name(n)).collect();
    s
}

/// `holdfast agent` for node `id` with `env` (through env(1)), logging to agentN.log.
fn spawn_agent(c: &Cluster, id: u16, env: &[String], log: &str) -> Child {
    let mut wrapper = vec!["env".to_string(), "-u".into(), "NOTIFY_SOCKET".into()];
    wrapper.extend(env.iter().cloned());
    let config = c.node_config(id).display().to_string();
    let launch = Launch {
        log_filter: "info,holdfast::initiator=warn",
        leash: false,
    };
    c.kit
        .spawn_via(
            &wrapper,
            &["agent", "--config", config.as_str()],
            log,
            &launch,
        )
        .expect("spawn holdfast agent")
}

/// SIGTERMs the agent (it hands its group over) if the test ends before doing so.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

fn wait_exit(c: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            return st;
        }
        assert!(
            Instant::now() < end,
            "the agent did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notifies_ready_status_watchdog_and_stopping() {
    let mut c = Cluster::new(2, vec![web_on(&[1, 2])]).await;
    let n = NotifySocket::bind(&c.path("notify.sock"));
    let env = [
        format!("NOTIFY_SOCKET={}", n.path().display()),
        format!("WATCHDOG_USEC={}", WATCHDOG.as_micros()),
    ];
    let mut a1 = Agent(spawn_agent(&c, 1, &env, "agent1.log"));
    c.start_agent(2);
    let (ready, _) = n.wait_for(0, T, "READY=1", |l| l == "READY=1");
    // READY=1 means joined: our heartbeat is on the quorum LUN.
    let img = c.image().await;
    assert!(
        img.slots[0].is_some(),
        "READY=1 before node 1's first heartbeat"
    );
    c.wait_running("web", Some(1), T).await;
    n.wait_for(ready, T, "STATUS with both nodes and the group", |l| {
        l == "STATUS=2/2 nodes alive, owns web"
    });

    // The watchdog: pinged while the heartbeat loop runs, at WATCHDOG_USEC/2, not at
    // every heartbeat (500 ms).
    let since = Instant::now();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let pings: Vec<Instant> = n
        .times_of("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= since)
        .collect();
    assert!(
        pings.len() >= 3,
        "{} WATCHDOG=1 in 4.5 s: {:?}",
        pings.len(),
        n.lines()
    );
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= WATCHDOG / 2 - Duration::from_millis(100) && gap < WATCHDOG,
            "WATCHDOG=1 gap {gap:?} (watchdog {WATCHDOG:?})"
        );
    }

    // A peer dies: the STATUS line says so.
    let before = n.lines().len();
    c.kill_node(2);
    n.wait_for(before, T, "STATUS with node 2 dead", |l| {
        l == "STATUS=1/2 nodes alive, owns web"
    });

    let before = n.lines().len();
    kill(Pid::from_raw(a1.0.id() as i32), Signal::SIGTERM).unwrap();
    n.wait_for(before, T, "STOPPING=1", |l| l == "STOPPING=1");
    n.wait_for(before, T, "the stopping STATUS", |l| {
        l.starts_with("STATUS=stopping")
    });
    let st = wait_exit(&mut a1.0, T);
    assert!(st.success(), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_state_directory_exits_and_leaves_the_vms_alone() {
    let mut c = Cluster::new(1, vec![web_on(&[1])]).await;
    c.start_agent(1);
    let r = c.wait_running("web", Some(1), T).await;
    c.wait_acks("web", r.epoch, 5, T).await;
    let guests = c.guest_pids(1);
    assert!(!guests.is_empty(), "no guest running on node 1");
    let first = c.agent_pid(1).expect("agent 1");

    let mut second = spawn_agent(&c, 1, &[], "agent1-second.log");
    let st = wait_exit(&mut second, T);
    let err = std::fs::read_to_string(c.path("agent1-second.log")).unwrap();
    let state_dir = c.path(&node_name(1)).display().to_string();
    assert!(!st.success(), "a second agent ran on {state_dir}: {err}");
    assert!(err.contains(&state_dir), "{err}");
    assert!(err.contains(&format!("pid {first}")), "{err}");
    assert!(err.contains("another holdfast agent"), "{err}");
    // It stopped before killing "VMs left by an earlier agent": they were the first's.
    for g in guests {
        assert!(c.is_running(g), "guest {g} was killed by the refused agent");
    }
    let r2 = c.record("web").await.expect("web record");
    assert_eq!((r2.owner, r2.epoch), (1, r.epoch), "{r2:?}");
    c.check("web");
}
