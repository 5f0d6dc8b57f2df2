//! The agent's Prometheus endpoint through a real failover: three agents with the
//! `metrics` key in their node.toml, the owner killed with SIGKILL, and the survivor
//! that took the group over scraped: a fence, a claim and a failover counted, the
//! heartbeat fresh, one peer alive and one dead, the group running here; `promtool
//! check metrics` accepts the exposition of every survivor.

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use common::metrics::{free_addr, promtool_check, samples, scrape, value, wait_up};
use holdfast::agent::config::Timings;
use holdfast::cli::cluster_kit;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Scrape `addr` until `ok` holds for the samples (or fail with the last scrape).
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> String {
    let end = Instant::now() + T;
    loop {
        let text = scrape(addr);
        if ok(&samples(&text)) {
            return text;
        }
        assert!(Instant::now() < end, "{what} never held:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn v(s: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(s, name, labels).unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_shows_in_the_survivors_metrics() {
    let mut spec = GroupSpec::new("web", 1);
    spec.preferred = [1, 2, 3].iter().map(|&n| node_name(n)).collect();
    let mut c = Cluster::new(3, vec![spec]).await;
    let mut addrs = BTreeMap::new();
    for id in 1..=3u16 {
        let addr = free_addr();
        let mut cfg = c.kit.node_config(id, &c.groups, &Timings::default());
        cfg.node.metrics = Some(addr);
        cluster_kit::write_toml(&c.node_config(id), "", &cfg).expect("node config");
        c.start_agent(id);
        wait_up(addr, &format!("agent {id}")).await;
        addrs.insert(id, addr);
    }
    let r = c.wait_running("web", Some(1), T).await;
    c.wait_acks("web", r.epoch, 10, T).await;
    scrape_until(addrs[&2], "node 2 sees two peers alive", |s| {
        v(s, "holdfast_agent_peers_alive", &[]) == 2.0
    })
    .await;

    c.kill_node(1);
    let r2 = c.wait_running_elsewhere("web", 1, T).await;
    let owner = r2.owner;
    let id = owner.to_string();
    let text = scrape_until(addrs[&owner], "the new owner's view", |s| {
        v(
            s,
            "holdfast_agent_group_local_state",
            &[("group", "web"), ("state", "running")],
        ) == 1.0
            && v(s, "holdfast_agent_group_owner", &[("group", "web")]) == f64::from(owner)
            && v(s, "holdfast_agent_peers_dead", &[]) == 1.0
    })
    .await;
    let s = samples(&text);
    let took = |h: &str| v(&s, &format!("holdfast_agent_{h}_duration_seconds_sum"), &[]);
    eprintln!(
        "failover {:.2} s, claim {:.3} s",
        took("failover"),
        took("claim")
    );
    assert!(v(&s, "holdfast_agent_fences_total", &[]) >= 1.0, "{text}");
    assert!(
        v(&s, "holdfast_agent_claim_duration_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    assert!(
        v(&s, "holdfast_agent_failover_duration_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    // Detection alone takes dead_after: a failover shorter than that was not measured
    // from the dead owner's last heartbeat.
    let sum = v(&s, "holdfast_agent_failover_duration_seconds_sum", &[]);
    assert!(sum >= Timings::default().dead_after.as_secs_f64(), "{text}");
    assert!(
        v(&s, "holdfast_agent_heartbeat_age_seconds", &[]) < 3.0,
        "{text}"
    );
    assert_eq!(v(&s, "holdfast_agent_peers_alive", &[]), 1.0, "{text}");
    let running = [("group", "web"), ("state", "running")];
    assert_eq!(v(&s, "holdfast_agent_group_state", &running), 1.0, "{text}");
    assert!(v(&s, "holdfast_agent_events_total", &[("event", "claimed")]) >= 1.0);
    for (n, addr) in addrs.iter().filter(|(n, _)| **n != 1) {
        let text = scrape(*addr);
        let (ok, said) = promtool_check(&text);
        assert!(
            ok,
            "node {n} (owner {id}): promtool refused:\n{said}\n{text}"
        );
    }
    c.check("web");
}
