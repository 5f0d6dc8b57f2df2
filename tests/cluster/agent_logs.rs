//! The agent's log through a storage outage and with CHAP, as separate processes.
//!
//! - A 10 s target outage (SIGKILL, restart on the same port and state, as in
//!   agent_outage.rs) gives a handful of agent log lines, not one per 200 ms poll: a
//!   repeated failure is logged once, then at a bounded rate, and its end at once.
//! - A login the target refuses (wrong CHAP secret) at every poll: one log line and one
//!   `connect-failed` event, not one per poll.
//! - A cluster whose target requires CHAP, with every secret in a `secret_file` or the
//!   environment: the agent logs in, `ctl status --json` works, and no log (at debug
//!   level) and no output contains a secret.

use crate::common;

use common::cluster::{Cluster, GroupSpec, CLUSTER, TARGET};
use holdfast::agent::config::{ChapSection, Timings};
use holdfast::cli::cluster_kit::{self as kit, Launch, Layout};
use holdfast::initiator::InitiatorConfig;
use holdfast::secret::Secret;
use holdfast::server::config::ChapConfig;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// At most this many agent log lines for a 10 s outage. Logged per attempt, the
/// reconnect loop alone (every 200 ms poll) would write about 50.
const HANDFUL: usize = 12;

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_outage_logs_a_handful_of_lines() {
    let mut c = Cluster::new(1, vec![GroupSpec::new("a", 1)]).await;
    c.start_agent(1);
    let r = c.wait_running("a", Some(1), T).await;
    c.wait_acks("a", r.epoch, 5, T).await;
    let log = c.path("agent1.log");
    let before = lines(&log).len();
    c.kill_target();
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.start_target().await;
    let acked = c.acked_in_epoch("a", r.epoch);
    c.wait_acks("a", r.epoch, acked + 10, T).await;
    let all = lines(&log);
    let during = &all[before..];
    let text = during.join("\n");
    println!(
        "agent log through the outage ({} lines):\n{text}",
        during.len()
    );
    let count = |s: &str| during.iter().filter(|l| l.contains(s)).count();
    assert_eq!(count("cannot reach the target"), 1, "{text}");
    assert_eq!(count("target reachable again"), 1, "{text}");
    assert!(
        during.len() <= HANDFUL,
        "{} agent log lines for a 10 s outage (at most {HANDFUL}):\n{text}",
        during.len()
    );
}

/// Distinct secrets, each configured once; none may show up anywhere.
const TARGET_SECRET: &str = "TargetChapSecret-a1";

/// Kills the processes it holds when dropped (also when a test fails).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_private(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `holdfast ARGS` to completion, HOLDFAST_CHAP_SECRET set (for ctl init-quorum):
/// success, stdout, stderr.
fn holdfast(l: &Layout, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(&l.exe)
        .args(args)
        .env("HOLDFAST_LOG", "debug")
        .env("HOLDFAST_CHAP_SECRET", TARGET_SECRET)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The target with one-way CHAP (its secret from a file) and an empty quorum LUN.
async fn chap_target(l: &Layout, procs: &mut Procs) {
    write_private(&l.path("chap.secret"), &format!("{TARGET_SECRET}\n"));
    let mut cfg = l.target_config(&[]);
    cfg.targets[0].chap = Some(ChapConfig {
        username: "agent".into(),
        secret: Secret::default(),
        secret_file: Some(PathBuf::from("chap.secret")),
        mutual_username: None,
        mutual_secret: None,
        mutual_secret_file: None,
    });
    kit::write_toml(&l.target_config_path(), "", &cfg).unwrap();
    let launch = Launch {
        log_filter: "debug",
        leash: false,
    };
    let config = l.target_config_path();
    let args = ["target".as_ref(), "--config".as_ref(), config.as_os_str()];
    procs.0.push(
        l.spawn_via(&[] as &[&str], &args, "target.log", &launch)
            .unwrap(),
    );
    let mut probe = InitiatorConfig::new("iqn.2026-11.org.holdfast:probe", TARGET, l.addr);
    probe.chap = Some(("agent".into(), TARGET_SECRET.as_bytes().to_vec()));
    let end = Instant::now() + T;
    while !kit::accepts_login(&probe).await {
        assert!(
            Instant::now() < end,
            "{}",
            l.log_tails(&["target.log".into()], 30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn layout(dir: &Path) -> Layout {
    Layout {
        dir: dir.to_path_buf(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_holdfast")),
        addr: SocketAddr::from(([127, 0, 0, 1], kit::free_port().unwrap())),
        target: TARGET.into(),
        cluster: CLUSTER.into(),
    }
}

/// node1.toml with CHAP, its secret from `secret_file`; the agent started.
fn start_chap_agent(l: &Layout, secret_file: PathBuf, log_filter: &str, procs: &mut Procs) {
    let mut node = l.node_config(1, &[], &Timings::default());
    node.target.chap = Some(ChapSection {
        username: "agent".into(),
        secret: Secret::default(),
        secret_file: Some(secret_file),
    });
    kit::write_toml(&l.node_config_path(1), "", &node).unwrap();
    let launch = Launch {
        log_filter,
        leash: false,
    };
    let config = l.node_config_path(1);
    let args = ["agent".as_ref(), "--config".as_ref(), config.as_os_str()];
    let child = l.spawn_via(&[] as &[&str], &args, "agent1.log", &launch);
    procs.0.push(child.unwrap());
}

/// An agent whose CHAP secret the target refuses (and then locks out) fails every
/// poll; for 5 s of that it logs a line or two, not one or two per poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_logged_once_not_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(dir.path());
    let mut procs = Procs(vec![]);
    chap_target(&l, &mut procs).await;
    write_private(&l.path("wrong.secret"), "not-the-right-one");
    start_chap_agent(&l, l.path("wrong.secret"), "info", &mut procs);
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(procs);
    let log = lines(&l.path("agent1.log"));
    let text = log.join("\n");
    let refusals = log.iter().filter(|l| l.contains("login failed")).count();
    assert!(refusals >= 1, "the refusal is logged:\n{text}");
    assert!(
        log.len() <= 3,
        "{} lines for 5 s of refused logins:\n{text}",
        log.len()
    );
    let events = lines(&l.events());
    let failed = events
        .iter()
        .filter(|e| e.contains("connect-failed"))
        .count();
    assert_eq!(failed, 1, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chap_cluster_never_logs_or_prints_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let l = layout(dir.path());
    let mut procs = Procs(vec![]);
    chap_target(&l, &mut procs).await;
    let url = l.url(0);
    let init_quorum = [
        "ctl",
        "init-quorum",
        &url,
        "--cluster",
        CLUSTER,
        "--chap-user",
        "agent",
    ];
    let (ok, init, init_err) = holdfast(&l, &init_quorum);
    assert!(
        ok,
        "init-quorum with the secret from the environment: {init}{init_err}"
    );
    start_chap_agent(&l, l.path("chap.secret"), "debug", &mut procs);
    let config = l.node_config_path(1);
    let end = Instant::now() + T;
    while !std::fs::read_to_string(l.path("agent1.log"))
        .is_ok_and(|t| t.contains("quorum LUN joined"))
    {
        assert!(
            Instant::now() < end,
            "{}",
            l.log_tails(&["agent1.log".into()], 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = config.display().to_string();
    let (ok, status, status_err) = holdfast(&l, &["ctl", "--config", &cfg, "status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("ctl status --json is not JSON ({e}): {status}{status_err}"));
    assert!(ok && v["nodes"][0]["alive"] == true, "{v}");
    let (ok, check, check_err) = holdfast(&l, &["agent", "--check", "--config", &cfg]);
    assert!(ok && check.contains("secret_file"), "{check}{check_err}");
    drop(procs);
    let mut seen = vec![
        ("ctl init-quorum", init + &init_err),
        ("ctl status --json", status + &status_err),
        ("agent --check", check + &check_err),
    ];
    for f in ["target.log", "agent1.log"] {
        seen.push((f, std::fs::read_to_string(l.path(f)).unwrap()));
    }
    // The logs are at debug level and cover the logins.
    assert!(seen[3].1.contains("DEBUG") && seen[4].1.contains("DEBUG"));
    for (what, text) in &seen {
        assert!(
            !text.contains(TARGET_SECRET),
            "{what} shows the CHAP secret:\n{text}"
        );
    }
}
