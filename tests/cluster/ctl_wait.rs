//! `ctl move|offline --wait` against real agents: one line per state change as it is
//! seen, with the time since the request; exit status 3 when the wait times out.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use holdfast::agent::config::Failback;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The transition lines of ctl's stdout ("  2.1 s  g1: stopping on node1 ..."), as
/// (seconds, description).
fn transitions(stdout: &[u8], group: &str) -> Vec<(f64, String)> {
    let marker = format!(" s  {group}: ");
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| {
            let (secs, what) = l.split_once(&marker)?;
            Some((secs.trim().parse().ok()?, what.to_string()))
        })
        .collect()
}

fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}stderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_and_offline_print_each_state_change_and_a_stuck_wait_exits_3() {
    let mut g = GroupSpec::new("g1", 1);
    g.preferred = vec![node_name(1), node_name(2)];
    g.settings.failback = Failback::Never;
    let mut c = Cluster::new(2, vec![g]).await;
    c.start_agent(1);
    c.start_agent(2);
    c.wait_running("g1", Some(1), T).await;

    // A real planned move: stop on node1, hand over, start on node2.
    let out = c.ctl(&["move", "g1", "node2", "--wait", "30"]);
    eprintln!("ctl move g1 node2 --wait 30: {}", show(&out));
    assert!(out.status.success(), "{}", show(&out));
    let seen = transitions(&out.stdout, "g1");
    let what: Vec<&str> = seen.iter().map(|(_, w)| w.as_str()).collect();
    assert!(seen.len() >= 3, "too few transitions: {}", show(&out));
    assert!(
        what[0].starts_with("running on node1, moving to node2"),
        "{}",
        show(&out)
    );
    assert!(
        what.last().unwrap().starts_with("running on node2"),
        "{}",
        show(&out)
    );
    // Every line is a change (no repeats) and time only goes forward.
    assert!(what.windows(2).all(|w| w[0] != w[1]), "{}", show(&out));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{}", show(&out));
    // In between it left node1 before it started on node2.
    let left = what.iter().position(|w| !w.contains("on node1"));
    let on2 = what.iter().position(|w| w.contains("on node2"));
    assert!(left.is_some() && left <= on2, "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("group g1 runs on node2"),
        "{}",
        show(&out)
    );

    // A frozen owner does not act on the request: the wait times out with status 3,
    // naming where the group is; the request stands and completes after `thaw`.
    assert!(c.ctl(&["freeze", "g1"]).status.success());
    let out = c.ctl(&["move", "g1", "node1", "--wait", "2"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out after 2 s waiting for group g1 to run on node1: it is running on node2, moving to node1"),
        "{}",
        show(&out)
    );
    let seen = transitions(&out.stdout, "g1");
    assert_eq!(seen.len(), 1, "{}", show(&out));
    assert!(c.ctl(&["thaw", "g1"]).status.success());
    c.wait_running("g1", Some(1), T).await;

    // offline: ends on "stopped, offline".
    let out = c.ctl(&["offline", "g1", "--wait", "30"]);
    assert!(out.status.success(), "{}", show(&out));
    let seen = transitions(&out.stdout, "g1");
    assert!(seen.len() >= 2, "{}", show(&out));
    assert!(
        seen.last().unwrap().1.starts_with("stopped, offline"),
        "{}",
        show(&out)
    );
    c.check("g1");
}
