//! Cluster-wide events and alerts, end to end: three agents with an `alert_command`
//! that dumps its environment; the owner is killed with -9; the survivor that fences it
//! runs the alert with the documented variables, and `ctl events` (from another node's
//! config) shows the fence, the claims and the ctl changes with who asked, merged by
//! time, also as they land (`--follow`). `ctl status --watch` redraws every second.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use holdfast::agent::config::NodeConfig;
use holdfast::cli::cluster_kit::write_toml;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(30);

/// Every node runs `alert_command`: its HOLDFAST_ALERT_* environment, one file per alert.
fn add_alert_command(c: &Cluster, alerts: &Path) {
    std::fs::create_dir_all(alerts).unwrap();
    for id in 1..=c.nodes {
        let p = c.node_config(id);
        let mut cfg: NodeConfig = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg.node.alert_command = Some(format!(
            "env | grep ^HOLDFAST_ALERT_ > {}/$HOLDFAST_ALERT_NODE.$HOLDFAST_ALERT_SEQUENCE.env",
            alerts.display()
        ));
        write_toml(&p, "", &cfg).unwrap();
    }
}

/// The alerts received so far, each as its variables.
fn alerts(dir: &Path) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![];
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(f.path()).unwrap_or_default();
        let vars: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if vars.contains_key("HOLDFAST_ALERT_SEQUENCE") {
            out.push(vars);
        }
    }
    out
}

/// `holdfast ctl --config nodeID.toml ARGS` as user `user`.
fn ctl_as(c: &Cluster, id: u16, user: &str, args: &[&str]) -> std::process::Output {
    Command::new(&c.bin)
        .arg("ctl")
        .arg("--config")
        .arg(c.node_config(id))
        .args(args)
        .env("HOLDFAST_LOG", "warn")
        .env("SUDO_USER", user)
        .output()
        .expect("run ctl")
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "ctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_runs_the_alert_command_and_every_node_sees_it_in_ctl_events() {
    let mut g = GroupSpec::new("web", 1);
    g.preferred = vec![node_name(1), node_name(2), node_name(3)];
    let mut c = Cluster::new(3, vec![g]).await;
    let dir = c.path("alerts");
    add_alert_command(&c, &dir);
    for id in 1..=3 {
        c.start_agent(id);
    }
    let r = c.wait_running("web", Some(1), T).await;
    let out = ctl_as(&c, 2, "alice", &["freeze", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl_as(&c, 2, "alice", &["thaw", "web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.kill_node(1);
    let r2 = c.wait_running_elsewhere("web", 1, T).await;
    assert!(r2.epoch > r.epoch);
    let survivor = node_name(r2.owner);

    let end = Instant::now() + T;
    let fence = loop {
        if let Some(a) = alerts(&dir)
            .into_iter()
            .find(|a| a["HOLDFAST_ALERT_KIND"] == "fenced")
        {
            break a;
        }
        assert!(Instant::now() < end, "no fence alert\n{}", c.diagnostics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(fence["HOLDFAST_ALERT_NODE"], survivor, "{fence:?}");
    assert_eq!(fence["HOLDFAST_ALERT_NODE_ID"], r2.owner.to_string());
    assert_eq!(fence["HOLDFAST_ALERT_TARGET_NODE"], "node1");
    assert_eq!(fence["HOLDFAST_ALERT_TARGET_NODE_ID"], "1");
    assert_eq!(fence["HOLDFAST_ALERT_GROUP"], "web");
    assert_eq!(fence["HOLDFAST_ALERT_CLUSTER"], "testlab");
    assert!(
        fence["HOLDFAST_ALERT_REASON"].contains("preempted"),
        "{fence:?}"
    );
    assert!(fence["HOLDFAST_ALERT_SEQUENCE"].parse::<u64>().unwrap() >= 1);
    let at = humantime::parse_rfc3339(&fence["HOLDFAST_ALERT_TIMESTAMP"]).expect("RFC 3339");
    let ms = fence["HOLDFAST_ALERT_TIMESTAMP_MS"].parse::<u64>().unwrap();
    assert_eq!(
        at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
        ms
    );
    let age = SystemTime::now().duration_since(at).unwrap();
    assert!(age < Duration::from_secs(60), "{age:?}");

    // From node 3's config: the whole cluster's transitions, in time order.
    let end = Instant::now() + T;
    let ev = loop {
        let ev = json_lines(&ctl_as(&c, 3, "bob", &["events", "--json"]));
        if ev.iter().any(|e| e["kind"] == "fenced") {
            break ev;
        }
        assert!(Instant::now() < end, "no fence in ctl events: {ev:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kinds = |node: &str| -> Vec<String> {
        ev.iter()
            .filter(|e| e["node"] == node)
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(kinds("node1").contains(&"claimed".to_string()), "{ev:?}");
    assert!(kinds("node1").contains(&"vm-started".to_string()), "{ev:?}");
    let fenced = ev.iter().find(|e| e["kind"] == "fenced").unwrap();
    assert_eq!(fenced["node"], survivor.as_str());
    assert_eq!(fenced["target_node"], "node1");
    let freeze = ev
        .iter()
        .find(|e| e["kind"] == "ctl-freeze")
        .expect("ctl-freeze");
    assert_eq!(freeze["node"], "node2");
    assert_eq!(freeze["source"], "ctl");
    assert!(
        freeze["actor"].as_str().unwrap().starts_with("alice@"),
        "{freeze}"
    );
    let times: Vec<u64> = ev.iter().map(|e| e["wall_ms"].as_u64().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not merged by time: {times:?}"
    );
    // Sequence numbers per node grow by one.
    for node in ["node1", "node2"] {
        let seqs: Vec<u64> = ev
            .iter()
            .filter(|e| e["node"] == node)
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{node}"
        );
    }
    let last2 = json_lines(&ctl_as(&c, 3, "bob", &["events", "--json", "-n", "2"]));
    assert_eq!(last2.len(), 2);
    assert_eq!(last2[1]["seq"], ev[ev.len() - 1]["seq"]);
    let none = json_lines(&ctl_as(
        &c,
        3,
        "bob",
        &["events", "--json", "--since", "2100-01-01T00:00:00Z"],
    ));
    assert!(none.is_empty());

    follow_sees_a_new_change(&c);
    watch_redraws(&c);
}

/// `ctl events --follow` prints a change made after it started.
fn follow_sees_a_new_change(c: &Cluster) {
    let mut f = Command::new(&c.bin)
        .args(["ctl", "--config"])
        .arg(c.node_config(3))
        .args(["events", "--json", "--follow", "-n", "0"])
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = f.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let out = ctl_as(c, 2, "carol", &["drain", "node3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("no followed event");
    let _ = f.kill();
    let _ = f.wait();
    let e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(e["kind"], "ctl-drain", "{e}");
    assert_eq!(e["target_node"], "node3");
    assert!(e["actor"].as_str().unwrap().starts_with("carol@"), "{e}");
}

/// `ctl status --watch` for 3.5 s: at least two frames, each a whole status.
fn watch_redraws(c: &Cluster) {
    let mut w = Command::new(&c.bin)
        .args(["ctl", "--config"])
        .arg(c.node_config(2))
        .args(["status", "--watch"])
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let _ = w.kill();
    let out = w.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let frames = text.matches("\x1b[H\x1b[2Jholdfast status at").count();
    assert!(frames >= 2, "{frames} frames:\n{text}");
    assert!(
        text.contains("RECENT EVENTS") && text.contains("fenced"),
        "{text}"
    );
}
