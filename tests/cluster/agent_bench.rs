//! Failover timing with the agent's default timings (heartbeat 500 ms, poll 200 ms,
//! self-fence 2 s, dead 3 s), on a three-node cluster of separate processes
//! (tests/common/cluster.rs). Ignored by `cargo test`; tools/failover-bench runs it:
//!
//!   cargo test --release --test cluster -- agent_bench:: --ignored --nocapture
//!
//! (a) unplanned failover: from just before the SIGKILL of the owner node (agent and
//!     guest) to the `vm-started` event of the survivor;
//! (b) planned move: from just before `ctl move` to the `vm-started` event on the
//!     target node, with offline_action = "save" (SIGUSR1 save, then restore).
//!
//! Times are CLOCK_MONOTONIC, the clock of the agents' `mono_ns`, so the test's own
//! timestamps and the events of other processes compare directly. The guest's `start`
//! line and first `ack` of the new run are seen by polling the ack log every 2 ms.
//!
//! Knobs: FAILOVER_RUNS (30), OUT (summary JSON path; the text goes beside it with
//! .txt; default CARGO_TARGET_TMPDIR/failover-bench.json).

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec, LineTail};
use holdfast::agent::config::OfflineAction;
use holdfast::agent::node::mono_ns;
use holdfast::agent::quorum::GroupState;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const GROUP: &str = "vm";
const T: Duration = Duration::from_secs(60);

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// What one run measured, in ms from its start (kill or `ctl move`); the parts are
/// durations.
type Sample = BTreeMap<&'static str, f64>;

/// Follows the shared event log and the group's ack log from "now" on.
struct Watch {
    events: LineTail,
    acks: LineTail,
    seen: Vec<Value>,
    /// mono_ns at which the first `start` / `ack` line of an epoch above `after` was seen.
    guest_start: Option<u64>,
    first_ack: Option<u64>,
}

impl Watch {
    fn new(c: &Cluster) -> Watch {
        Watch {
            events: LineTail::new(c.path("events.jsonl"), false),
            acks: LineTail::new(c.ack_log(GROUP), false),
            seen: Vec::new(),
            guest_start: None,
            first_ack: None,
        }
    }

    /// Poll until the `vm-started` of an epoch above `after` (on `on`, if given) and the
    /// new run's first acknowledged write have been seen. Returns that event.
    async fn until_new_run(&mut self, c: &Cluster, after: u64, on: Option<u16>) -> Value {
        let end = Instant::now() + T;
        let mut started: Option<Value> = None;
        let mut i = 0u32;
        loop {
            for l in self.acks.read_new() {
                let f: Vec<&str> = l.split(' ').collect();
                let newer = f.len() >= 4 && f[2].parse::<u64>().is_ok_and(|e| e > after);
                if newer && f[0] == "start" && self.guest_start.is_none() {
                    self.guest_start = Some(mono_ns());
                }
                if newer && f[0] == "ack" && self.first_ack.is_none() {
                    self.first_ack = Some(mono_ns());
                }
            }
            // The event log only every 10th poll: its events carry their own times.
            if i % 10 == 0 {
                for l in self.events.read_new() {
                    if let Ok(v) = serde_json::from_str::<Value>(&l) {
                        if started.is_none()
                            && v["event"] == "vm-started"
                            && v["group"] == GROUP
                            && v["epoch"].as_u64().is_some_and(|e| e > after)
                            && on.is_none_or(|n| v["node"] == node_name(n))
                        {
                            started = Some(v.clone());
                        }
                        self.seen.push(v);
                    }
                }
            }
            i += 1;
            if let (Some(s), Some(_)) = (&started, self.first_ack) {
                return s.clone();
            }
            assert!(
                Instant::now() < end,
                "no new run of {GROUP} after epoch {after} within {T:?}\n{}",
                c.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The last event of this kind for the group seen so far.
    fn last(&self, event: &str) -> Option<&Value> {
        self.seen
            .iter()
            .rev()
            .find(|v| v["event"] == event && v["group"] == GROUP)
    }
}

/// Wait until node `id` heartbeats under an incarnation other than `old` and every
/// observer has had time to see it alive (a few polls).
async fn wait_rejoined(c: &Cluster, id: u16, old: u64) {
    let end = Instant::now() + T;
    loop {
        let img = c.image().await;
        if img.slot(id).is_some_and(|s| {
            s.incarnation != old && s.state == holdfast::agent::quorum::NodeState::Active
        }) {
            break;
        }
        assert!(
            Instant::now() < end,
            "node{id} did not rejoin\n{}",
            c.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two heartbeats seen by every peer's poll: alive everywhere.
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

/// Running, with `n` acknowledged writes in its current run: a steady state.
async fn steady(c: &Cluster, n: usize) -> holdfast::agent::quorum::GroupRecord {
    let r = c
        .wait_record(GROUP, T, "running", |r| r.state == GroupState::Running)
        .await;
    c.wait_acks(GROUP, r.epoch, n, T).await;
    r
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

async fn unplanned(c: &mut Cluster, run: usize) -> Sample {
    let r = steady(c, 10).await;
    let owner = r.owner;
    let old_inc = c
        .image()
        .await
        .slot(owner)
        .map(|s| s.incarnation)
        .unwrap_or(0);
    let mut w = Watch::new(c);
    let t0 = mono_ns();
    c.kill_node(owner);
    let ev = w.until_new_run(c, r.epoch, None).await;
    let at = ev["mono_ns"].as_u64().expect("mono_ns") as i128;
    let (claim, start) = (f(&ev, "claim_ms"), f(&ev, "start_ms"));
    let mut s = Sample::new();
    s.insert("vm_started_ms", ms(at - t0 as i128));
    // The survivor began its claim (claim_ms + start_ms before the event): the rest is
    // detection, dead_after plus up to a poll interval.
    s.insert("detect_ms", ms(at - t0 as i128) - claim - start);
    s.insert("claim_ms", claim);
    s.insert("start_ms", start);
    let t0i = t0 as i128;
    s.insert(
        "guest_start_ms",
        w.guest_start.map_or(f64::NAN, |t| ms(t as i128 - t0i)),
    );
    s.insert(
        "first_ack_ms",
        w.first_ack.map_or(f64::NAN, |t| ms(t as i128 - t0i)),
    );
    println!(
        "unplanned {run}: node{owner} killed; vm-started on {} after {:.0} ms (detect {:.0}, \
         claim {:.1}, start {:.1}), first ack {:.0} ms",
        ev["node"].as_str().unwrap_or("?"),
        s["vm_started_ms"],
        s["detect_ms"],
        claim,
        start,
        s["first_ack_ms"]
    );
    c.start_agent(owner);
    wait_rejoined(c, owner, old_inc).await;
    s
}

async fn planned(c: &mut Cluster, run: usize) -> Sample {
    let r = steady(c, 10).await;
    let to = r.owner % 3 + 1;
    let mut w = Watch::new(c);
    let t0 = mono_ns();
    let out = c.ctl(&["move", GROUP, &node_name(to), "--wait", "0"]);
    let t_req = mono_ns();
    assert!(
        out.status.success(),
        "ctl move: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = w.until_new_run(c, r.epoch, Some(to)).await;
    assert_eq!(
        ev["restored"], true,
        "the move must restore the saved state: {ev}"
    );
    let off = w
        .last("offline")
        .cloned()
        .expect("an offline event of the old owner");
    let t0i = t0 as i128;
    let at = ev["mono_ns"].as_u64().expect("mono_ns") as i128;
    let off_at = off["mono_ns"].as_u64().expect("mono_ns") as i128;
    let (claim, start) = (f(&ev, "claim_ms"), f(&ev, "start_ms"));
    let (stop, handover) = (f(&off, "stop_ms"), f(&off, "handover_ms"));
    let off_begin = off_at as f64 / 1e6 - handover;
    let claim_begin = at as f64 / 1e6 - claim - start;
    let mut s = Sample::new();
    s.insert("vm_started_ms", ms(at - t0i));
    s.insert("request_ms", ms(t_req as i128 - t0i));
    // The owner's next poll saw move_to (measured from the end of `ctl move`).
    s.insert("notice_ms", off_begin - t_req as f64 / 1e6);
    s.insert("save_ms", stop);
    s.insert("release_ms", handover - stop);
    // The target's next poll saw the record stopped with move_to = itself.
    s.insert("pickup_ms", claim_begin - off_at as f64 / 1e6);
    s.insert("claim_ms", claim);
    s.insert("restore_ms", start);
    s.insert(
        "guest_start_ms",
        w.guest_start.map_or(f64::NAN, |t| ms(t as i128 - t0i)),
    );
    s.insert(
        "first_ack_ms",
        w.first_ack.map_or(f64::NAN, |t| ms(t as i128 - t0i)),
    );
    println!(
        "planned {run}: node{} -> node{to}: vm-started after {:.0} ms (request {:.0}, notice {:.0}, \
         save {:.1}, release {:.1}, pickup {:.0}, claim {:.1}, restore {:.1}), first ack {:.0} ms",
        r.owner,
        s["vm_started_ms"],
        s["request_ms"],
        s["notice_ms"],
        stop,
        handover - stop,
        s["pickup_ms"],
        claim,
        start,
        s["first_ack_ms"]
    );
    s
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The figures in the order things happen, the headline first.
const UNPLANNED: &[&str] = &[
    "vm_started_ms",
    "detect_ms",
    "claim_ms",
    "start_ms",
    "guest_start_ms",
    "first_ack_ms",
];
const PLANNED: &[&str] = &[
    "vm_started_ms",
    "request_ms",
    "notice_ms",
    "save_ms",
    "release_ms",
    "pickup_ms",
    "claim_ms",
    "restore_ms",
    "guest_start_ms",
    "first_ack_ms",
];

fn summarize(samples: &[Sample], keys: &[&str]) -> (Value, String) {
    let mut js = serde_json::Map::new();
    let mut text = format!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "ms", "median", "p90", "p99", "max", "min"
    );
    for &k in keys {
        let mut v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.get(k).copied())
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let (p50, p90, p99) = (pct(&v, 50.0), pct(&v, 90.0), pct(&v, 99.0));
        let (max, min) = (
            v.last().copied().unwrap_or(f64::NAN),
            v.first().copied().unwrap_or(f64::NAN),
        );
        text.push_str(&format!(
            "{:<16} {p50:>9.1} {p90:>9.1} {p99:>9.1} {max:>9.1} {min:>9.1}\n",
            k.trim_end_matches("_ms")
        ));
        js.insert(
            k.to_string(),
            json!({"median": p50, "p90": p90, "p99": p99, "max": max, "min": min, "n": v.len()}),
        );
    }
    (Value::Object(js), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: tools/failover-bench runs it"]
async fn failover_bench() {
    let runs: usize = std::env::var("FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let out = std::env::var_os("OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("failover-bench.json"));
    let mut g = GroupSpec::new(GROUP, 1);
    g.preferred = vec![node_name(1), node_name(2), node_name(3)];
    g.settings.offline_action = OfflineAction::Save;
    // Default timings: no [timings] lines.
    let mut c = Cluster::new(3, vec![g]).await;
    for id in 1..=3 {
        c.start_agent(id);
    }
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let t_all = Instant::now();
    let mut un = Vec::new();
    for i in 0..runs {
        un.push(unplanned(&mut c, i).await);
    }
    let mut pl = Vec::new();
    for i in 0..runs {
        pl.push(planned(&mut c, i).await);
    }
    // The runs must not have broken anything either.
    for id in c.agents_up() {
        c.kill_node(id);
    }
    c.check(GROUP);
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (uj, ut) = summarize(&un, UNPLANNED);
    let (pj, pt) = summarize(&pl, PLANNED);
    let summary = json!({
        "runs": runs,
        "timings": "defaults: heartbeat 500 ms, poll 200 ms, self-fence 2 s, dead 3 s",
        "loadavg_start": load0.trim(),
        "loadavg_end": load1.trim(),
        "seconds": t_all.elapsed().as_secs_f64(),
        "unplanned": uj,
        "planned_move": pj,
        "unplanned_runs": un,
        "planned_runs": pl,
    });
    let text = format!(
        "failover-bench: {runs} runs each, default timings; load average {} -> {}\n\n\
         (a) unplanned: kill -9 of the owner node -> vm-started on the survivor\n{ut}\n\
         (b) planned move (save + restore): ctl move -> vm-started on the target node\n{pt}\n\
         nearest-rank percentiles; guest_start / first_ack are the ack log's lines of the new\n\
         run as seen by polling every 2 ms; they can come before vm_started, which the agent\n\
         emits after the process driver's 50 ms start check and the record update.\n",
        load0.split(' ').take(3).collect::<Vec<_>>().join(" "),
        load1.split(' ').take(3).collect::<Vec<_>>().join(" "),
    );
    println!("\n{text}");
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    if let Some(d) = out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&summary).unwrap()).expect("write OUT");
    std::fs::write(out.with_extension("txt"), &text).expect("write the text summary");
    println!(
        "written: {} and {}",
        out.display(),
        out.with_extension("txt").display()
    );
}
