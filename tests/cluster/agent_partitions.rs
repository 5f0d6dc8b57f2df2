//! Partitions, not kills: each node (agent and guests) in its own network namespace,
//! its link to the target taken down and brought back (tests/common/netns.rs). A node
//! cut off for less than its peers' `dead_after` keeps its groups (its VMs are paused
//! and resumed in the same epoch); one cut off for longer loses them to a survivor, and
//! on heal finds itself fenced and kills its paused VMs, which never write again. Each
//! test ends with the checker: no double run, no lost acknowledged write, no late write.
//!
//! Knobs of the boundary test: PARTITION_ROUNDS (default 8), PARTITION_SEED (default
//! 20261206; printed).

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use common::netns::{self, Netns};
use holdfast::agent::config::Timings;
use holdfast::agent::node::mono_ns;
use holdfast::agent::quorum::{GroupRecord, GroupState, NodeState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

async fn three_partitionable(group: &str) -> Cluster {
    let mut g = GroupSpec::new(group, 1);
    g.preferred = vec![node_name(1), node_name(2), node_name(3)];
    let mut c = Cluster::new_partitionable(3, vec![g]).await;
    for id in 1..=3 {
        c.start_agent(id);
    }
    c
}

/// Events named `event` about `group` from `node` logged at or after `since` (mono_ns).
fn events_of(
    c: &Cluster,
    node: u16,
    event: &str,
    group: &str,
    since: u64,
) -> Vec<serde_json::Value> {
    c.events()
        .into_iter()
        .filter(|e| {
            e["event"] == event
                && e["node"] == node_name(node).as_str()
                && e["group"] == group
                && e["mono_ns"].as_u64().is_some_and(|t| t >= since)
        })
        .collect()
}

/// Events about `group` at or after `since`, as "nodeN event" lines.
fn transitions(c: &Cluster, group: &str, since: u64) -> Vec<String> {
    c.events()
        .into_iter()
        .filter(|e| e["group"] == group && e["mono_ns"].as_u64().is_some_and(|t| t >= since))
        .map(|e| format!("{} {}", e["node"].as_str().unwrap_or("?"), e["event"]))
        .collect()
}

async fn wait_until(c: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !done() {
        assert!(
            Instant::now() < end,
            "timed out waiting until {what}\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_cut_moves_nothing() {
    let c = three_partitionable("p1").await;
    let r = c.wait_running("p1", Some(1), T).await;
    c.wait_acks("p1", r.epoch, 10, T).await;
    let since = mono_ns();
    c.cut(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.heal(1);
    let acked = c.acked_in_epoch("p1", r.epoch);
    c.wait_acks("p1", r.epoch, acked + 20, T).await;
    let now = c.record("p1").await.expect("record");
    assert_eq!(
        (now.owner, now.epoch, now.state),
        (1, r.epoch, GroupState::Running),
        "a 1 s cut moved the group: {now:?}\n{}",
        c.diagnostics()
    );
    let moved: Vec<String> = transitions(&c, "p1", since)
        .into_iter()
        .filter(|t| !t.ends_with("\"paused\"") && !t.ends_with("\"resumed\""))
        .collect();
    assert!(
        moved.is_empty(),
        "a 1 s cut caused {moved:?}\n{}",
        c.diagnostics()
    );
    let guests = c.guests();
    assert!(
        matches!(guests[..], [(1, _, false)]),
        "one running guest on node1 expected: {guests:?}"
    );
    eprintln!(
        "1 s cut: {} pause(s) on node1",
        events_of(&c, 1, "paused", "p1", since).len()
    );
    c.check("p1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_second_cut_fails_over_and_the_cut_node_kills_its_paused_vm() {
    let c = three_partitionable("p5").await;
    let r = c.wait_running("p5", Some(1), T).await;
    c.wait_acks("p5", r.epoch, 10, T).await;
    let old: Vec<i32> = c.guest_pids(1);
    assert_eq!(old.len(), 1, "node1's guests: {old:?}");
    let since = mono_ns();
    let cut_at = Instant::now();
    c.cut(1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A survivor must have claimed the group by now; a loaded machine may need a
    // little longer, and healing before the claim would test something else.
    let claimed = c
        .wait_record("p5", T, "claimed by a survivor", |x| {
            x.owner != 1 && x.epoch > r.epoch
        })
        .await;
    let cut_for = cut_at.elapsed();
    let paused = events_of(&c, 1, "paused", "p5", since);
    assert_eq!(
        paused.len(),
        1,
        "node1 must pause its VM once while cut off: {paused:?}\n{}",
        c.diagnostics()
    );
    assert!(
        old.iter().all(|&p| common::cluster::is_stopped(p)),
        "node1's guest is not stopped (paused) while cut off\n{}",
        c.diagnostics()
    );
    let old_acks = c.acked_in_epoch("p5", r.epoch);
    c.heal(1);
    let r2 = c.wait_running_elsewhere("p5", 1, T).await;
    assert_eq!((r2.owner, r2.epoch), (claimed.owner, claimed.epoch));
    wait_until(&c, "node1 kills its paused VM", || {
        !events_of(&c, 1, "vm-killed", "p5", since).is_empty()
            && old.iter().all(|&p| !c.is_running(p))
    })
    .await;
    c.wait_acks("p5", r2.epoch, 20, T).await;
    assert!(
        events_of(&c, 1, "resumed", "p5", since).is_empty(),
        "node1 resumed a VM it had lost\n{}",
        c.diagnostics()
    );
    assert_eq!(
        c.acked_in_epoch("p5", r.epoch),
        old_acks,
        "the paused run acknowledged writes after the heal\n{}",
        c.diagnostics()
    );
    let guests = c.guests();
    assert!(
        matches!(guests[..], [(n, _, false)] if n == r2.owner),
        "one running guest on node{} expected: {guests:?}",
        r2.owner
    );
    eprintln!(
        "cut for {cut_for:?}: node{} took over in epoch {}; node1 killed its paused VM",
        r2.owner, r2.epoch
    );
    c.check("p5");
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Wait until the group runs on one node only: its record says running under the
/// owner's current incarnation, every agent is active and has heartbeated twice since
/// `since_heal`, the run has acknowledged 3 writes since, and exactly one guest exists
/// in the whole cluster, running (not paused) on the owner.
async fn one_owner(c: &Cluster, group: &str, acks_before: &BTreeMap<u64, usize>) -> GroupRecord {
    let first = c.image().await;
    let mut beats: BTreeMap<u16, (Option<(u64, u64)>, usize)> = BTreeMap::new();
    let end = Instant::now() + T;
    loop {
        let img = c.image().await;
        let mut pending = Vec::new();
        for n in 1..=c.nodes {
            let slot = |i: &holdfast::agent::quorum::QuorumImage| {
                i.slot(n).map(|s| (s.incarnation, s.counter))
            };
            let (last, changes) = beats.entry(n).or_insert((slot(&first), 0));
            if slot(&img) != *last {
                *last = slot(&img);
                *changes += 1;
            }
            let active = img.slot(n).is_some_and(|s| s.state == NodeState::Active);
            if !active || *changes < 2 {
                pending.push(format!("node{n}: active {active}, {changes} heartbeats"));
            }
        }
        let rec = img.group(group).map(|(_, r, _)| r.clone()).expect("record");
        let current = img
            .slot(rec.owner)
            .is_some_and(|s| s.incarnation == rec.owner_incarnation);
        let acks = c.acked_in_epoch(group, rec.epoch) - acks_before.get(&rec.epoch).unwrap_or(&0);
        if rec.state != GroupState::Running || !current || acks < 3 {
            pending.push(format!(
                "record {rec:?} (current {current}, {acks} new acks)"
            ));
        }
        let guests = c.guests();
        if !matches!(guests[..], [(n, _, false)] if n == rec.owner) {
            pending.push(format!("guests (node, pid, stopped): {guests:?}"));
        }
        if pending.is_empty() {
            return rec;
        }
        assert!(
            Instant::now() < end,
            "no single owner of {group}:\n  {}\n{}",
            pending.join("\n  "),
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cuts of the owner drawn from dead_after − 2 s to dead_after + 600 ms. The boundary
/// that matters is where contact loss, not the cut, reaches dead_after: after a heal
/// the owner needs up to io_timeout + poll_interval (and TCP retransmission) to beat
/// again, so moves start near 1.5 s cuts. On either side, and at the race between the
/// owner's resume and a survivor's claim, a round must end with exactly one owner and
/// one running guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_around_dead_after_end_with_exactly_one_owner() {
    let rounds: usize = env_or("PARTITION_ROUNDS", 8);
    let seed: u64 = env_or("PARTITION_SEED", 20261206);
    println!("agent_partitions: PARTITION_SEED={seed} PARTITION_ROUNDS={rounds}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dead = Timings::default().dead_after.as_millis() as u64;
    let c = three_partitionable("edge").await;
    let mut r = c.wait_running("edge", Some(1), T).await;
    c.wait_acks("edge", r.epoch, 5, T).await;
    let (mut stayed, mut moved) = (0, 0);
    for round in 0..rounds {
        let ms = rng.gen_range(dead - 2000..=dead + 600);
        let owner = r.owner;
        let acks_before = BTreeMap::from([(r.epoch, c.acked_in_epoch("edge", r.epoch))]);
        let since = mono_ns();
        c.cut(owner);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        c.heal(owner);
        let next = one_owner(&c, "edge", &acks_before).await;
        let what = if next.epoch == r.epoch {
            stayed += 1;
            "stayed"
        } else {
            moved += 1;
            "moved"
        };
        println!(
            "round {round}: cut node{owner} for {ms} ms: {what}, node{} epoch {} ({:?})",
            next.owner,
            next.epoch,
            transitions(&c, "edge", since)
        );
        if next.epoch == r.epoch {
            assert_eq!(next.owner, owner, "same epoch, other owner: {next:?}");
        }
        r = next;
    }
    println!("agent_partitions: {rounds} cuts around the boundary: {stayed} stayed, {moved} moved");
    c.check("edge");
}

/// The fixture itself: a cut link drops packets silently (a connect neither succeeds
/// nor is refused: it times out), and a healed one carries them again.
#[test]
fn a_cut_link_drops_packets_and_a_healed_one_carries_them() {
    let net = Netns::new(1);
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let connect = || {
        let script = format!("exec 3<>/dev/tcp/{}/{port}", net.host_addr(1));
        let t0 = Instant::now();
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                net.namespace(1),
                "timeout",
                "2",
                "bash",
                "-c",
            ])
            .arg(script)
            .status()
            .unwrap();
        (st.code(), t0.elapsed())
    };
    assert_eq!(connect().0, Some(0), "connect over the link");
    net.cut(1);
    assert!(!net.is_up(1));
    let (code, took) = connect();
    // timeout(1) exits 124 when it had to kill the command: no answer at all.
    assert_eq!(code, Some(124), "a cut link answered after {took:?}");
    net.heal(1);
    assert_eq!(connect().0, Some(0), "connect after the heal");
}

/// Namespaces of a test process that died without dropping its fixture are deleted,
/// and what still ran in them is killed; live ones are left alone.
#[test]
fn stale_namespaces_of_a_dead_test_process_are_removed() {
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let ns = format!("hf-{dead}-0-n1");
    let ip = |args: &[&str]| Command::new("ip").args(args).status().unwrap();
    assert!(ip(&["netns", "add", &ns]).success());
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &ns, "sleep", "60"])
        .spawn()
        .unwrap();
    let live = Netns::new(1);
    // Wait until the orphan runs in the namespace.
    let end = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap()
            .stdout,
    )
    .contains(&orphan.id().to_string())
    {
        assert!(Instant::now() < end, "the orphan never entered {ns}");
        std::thread::sleep(Duration::from_millis(10));
    }
    netns::remove_stale();
    let st = orphan.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&format!("{ns} ")) && !list.lines().any(|l| l == ns));
    assert!(
        list.contains(live.namespace(1)),
        "a live fixture was removed"
    );
}
