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

mod on_the_lun {
    //! The ring's I/O against a real in-process target: two writers of one node's
    //! sub-ring (its agent and a ctl) racing never overwrite each other, and a quorum
    //! LUN too small for the ring still formats and says what to do.

    use crate::common::{self, config_text, start, TARGET};
    use holdfast::agent::claim::{self, Identity};
    use holdfast::agent::event_ring::{RingEntry, Source, PER_NODE};
    use holdfast::agent::quorum::{self};
    use holdfast::agent::quorum_disk::QuorumDisk;
    use holdfast::agent::ring_io;
    use holdfast::cli::ctl;
    use holdfast::initiator::{InitiatorConfig, IscsiUrl, Session};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);
    const CLUSTER: &str = "ring";

    async fn joined(addr: std::net::SocketAddr, lun: u64, id: u16, purpose: u8) -> QuorumDisk {
        let me = Identity {
            key: quorum::pr_key(CLUSTER, id),
            initiator_name: format!("iqn.2026-11.org.holdfast:ring.n{id}"),
            isid: quorum::node_isid(id, purpose),
            vm_initiator_name: None,
        };
        let mut c = InitiatorConfig::new(&me.initiator_name, TARGET, addr);
        c.isid = Some(me.isid);
        let s = Session::login(c).await.expect("login");
        common::clear_unit_attention(&s, lun).await;
        claim::join_quorum(&s, lun, &me, T).await.expect("join");
        QuorumDisk::open(s, lun, CLUSTER, T).await.expect("open").0
    }

    fn entry(kind: &str, source: Source) -> RingEntry {
        RingEntry {
            node_id: 2,
            seq: 0,
            wall_ms: holdfast::agent::wall_ms(),
            source,
            kind: kind.into(),
            group: "web".into(),
            reason: String::new(),
            target_node: 0,
            epoch: 0,
            actor: String::new(),
        }
    }

    fn url(addr: std::net::SocketAddr, lun: u64) -> IscsiUrl {
        format!("iscsi://{addr}/{TARGET}/{lun}").parse().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_of_one_sub_ring_keep_every_entry_and_a_small_lun_says_so() {
        let t = start(&config_text(
            "",
            "",
            &[(0, "q.img", "4MiB"), (1, "small.img", "1MiB")],
        ))
        .await;
        let name = "iqn.2026-11.org.holdfast:ctl";
        let msg = ctl::init_quorum(&url(t.addr, 0), name, CLUSTER, false, None)
            .await
            .unwrap();
        assert!(msg.contains("event ring of 64 entries"), "{msg}");
        let agent = joined(t.addr, 0, 2, quorum::ISID_AGENT).await;
        let ctl_side = joined(t.addr, 0, 2, quorum::ISID_CTL).await;
        // The agent keeps its view of the sub-ring; ctl appends behind its back, so the
        // agent's next COMPARE AND WRITE miscompares instead of overwriting.
        let mut view = ring_io::read_sub_ring(&agent, 2).await.unwrap();
        let n = PER_NODE + 5;
        let (mut written, mut miscompares) = (0, 0);
        for i in 0..n {
            if i % 3 == 0 {
                ring_io::append_fresh(&ctl_side, entry("ctl-freeze", Source::Ctl))
                    .await
                    .unwrap();
            }
            loop {
                match ring_io::append(&agent, &mut view, entry("vm-started", Source::Agent))
                    .await
                    .unwrap()
                {
                    holdfast::agent::quorum_disk::CawOutcome::Written => break,
                    holdfast::agent::quorum_disk::CawOutcome::Miscompare => {
                        miscompares += 1;
                        view = ring_io::read_sub_ring(&agent, 2).await.unwrap();
                    }
                }
            }
            written += 1;
        }
        let ctl_writes = n.div_ceil(3);
        assert!(miscompares >= 1, "ctl never raced the agent");
        let r = ring_io::read_sub_ring(&ctl_side, 2).await.unwrap();
        assert!(r.corrupt.is_empty(), "{:?}", r.corrupt);
        let total = written + ctl_writes;
        let seqs: Vec<u64> = r.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, ((total - PER_NODE + 1)..=total).collect::<Vec<_>>());
        let merged = ring_io::read_merged(&ctl_side, &[1, 2, 3]).await.unwrap();
        assert_eq!(merged.len(), PER_NODE as usize);

        // A LUN big enough for the records but not for the ring.
        let msg = ctl::init_quorum(&url(t.addr, 1), name, CLUSTER, false, None)
            .await
            .unwrap();
        assert!(msg.contains("no event ring"), "{msg}");
        let small = joined(t.addr, 1, 2, quorum::ISID_AGENT).await;
        let e = ring_io::check_room(&small).await.unwrap_err().to_string();
        assert!(
            e.contains("re-run `holdfast ctl init-quorum --force`"),
            "{e}"
        );
    }
}
