//! Persistent reservations shared by several `holdfast target` gateway processes serving
//! one RBD image (issue 14): one PR object in RADOS, notify/ack to every gateway, and
//! the blocklist fence for a gateway that does not answer. Uses the shared throwaway
//! cluster (ceph_fixture); portals on 127.0.0.13-15, one TPGT per gateway.

use crate::ceph_fixture::{ceph, export, image};
use crate::common::metrics::{samples, scrape, value};
use crate::common::pr::{self, sa, ty, Outcome};
use crate::common::BLOCK;
use crate::rbd_gateway::Gateway;
use bytes::Bytes;
use holdfast::initiator::cdb;
use holdfast::initiator::pr::PrInAction;
use holdfast::initiator::Session;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 8;
/// A victim write with no answer after this long was aborted (TAS = 0) or is stuck
/// behind a frozen gateway.
const NO_RESPONSE: Duration = Duration::from_secs(5);
/// The LBAs the victim writes and the preemptor's fence marker covers.
const FENCED_BLOCKS: u32 = 64;

fn marker() -> Bytes {
    Bytes::from(vec![0xfe; (FENCED_BLOCKS * BLOCK) as usize])
}

/// Victim writes, each (submitted, outcome; None: no response).
type WriteLog = Arc<Mutex<Vec<(Instant, Option<Outcome>)>>>;

/// `n` writers on the victim session writing 8-block stamps over the fenced LBAs until
/// `stop`, every outcome logged.
fn start_victim(
    s: &Session,
    n: u64,
    stop: &Arc<AtomicBool>,
) -> (WriteLog, Vec<tokio::task::JoinHandle<()>>) {
    let log: WriteLog = Arc::default();
    let tasks = (0..n)
        .map(|w| {
            let (s, stop, log) = (s.clone(), stop.clone(), log.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let lba = (seq + w) % u64::from(FENCED_BLOCKS / 8) * 8;
                    let data = Bytes::from(vec![(seq as u8) | 1; 8 * BLOCK as usize]);
                    let at = Instant::now();
                    let c = cdb::write16(lba, 8, false);
                    let r = match s.submit(0, &c, Some(data), 0).await {
                        Ok(task) => match tokio::time::timeout(NO_RESPONSE, task.wait()).await {
                            Ok(Ok(r)) => Some(pr::outcome(&r)),
                            Ok(Err(_)) | Err(_) => None,
                        },
                        Err(_) => None,
                    };
                    log.lock().unwrap().push((at, r));
                    if r != Some(Outcome::Good) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    (log, tasks)
}

async fn stop_victim(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(NO_RESPONSE * 3, t).await;
    }
}

fn count(log: &WriteLog, o: Outcome) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, r)| *r == Some(o))
        .count()
}

/// Register the victim (through A) as WRITE EXCLUSIVE holder and the preemptor (B).
async fn victim_holds(victim: &Session, pre: &Session) {
    assert_eq!(pr::register(victim, 0, 0, 0xa1).await, Outcome::Good);
    assert_eq!(pr::reserve(victim, 0, 0xa1, ty::WE).await, Outcome::Good);
    assert_eq!(pr::register(pre, 0, 0, 0xb2).await, Outcome::Good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_through_one_gateway_are_seen_through_the_other() {
    let spec = image("prshare", MIB);
    let a = Gateway::start("127.0.0.13", 1, &spec, "5s").await;
    let b = Gateway::start("127.0.0.14", 2, &spec, "5s").await;
    let sa_ = a.login("host1", 1).await;
    let sb = b.login("host2", 2).await;
    victim_holds(&sa_, &sb).await;
    // Byte for byte: the relative target port id in each descriptor is that of the
    // registration's own I_T nexus (SPC-4 READ FULL STATUS), not the asking port's.
    let ra = sa_
        .prin(0, PrInAction::ReadFullStatus)
        .await
        .expect("PR IN via A");
    let rb = sb
        .prin(0, PrInAction::ReadFullStatus)
        .await
        .expect("PR IN via B");
    assert_eq!(ra, rb, "READ FULL STATUS through A and B");
    let (gen, st) = pr::read_full_status(&sb, 0).await;
    assert_eq!(gen, 2);
    let keys: Vec<(u64, bool, u16)> = st.iter().map(|e| (e.key, e.holder, e.rel_port)).collect();
    assert_eq!(keys, vec![(0xa1, true, 1), (0xb2, false, 2)]);
    // The reservation made through A binds writes through B, not A's holder.
    let w = |s: &Session| {
        let s = s.clone();
        async move {
            let c = cdb::write16(0, 1, false);
            let task = s
                .submit(0, &c, Some(Bytes::from(vec![1u8; BLOCK as usize])), 0)
                .await
                .unwrap();
            pr::outcome(&task.wait().await.unwrap())
        }
    };
    assert_eq!(w(&sb).await, Outcome::Conflict);
    assert_eq!(w(&sa_).await, Outcome::Good);
    // A registration through B is visible through A at once (no polling).
    assert_eq!(pr::register(&sb, 0, 0xb2, 0xb3).await, Outcome::Good);
    let (_, st) = pr::read_full_status(&sa_, 0).await;
    assert!(st.iter().any(|e| e.key == 0xb3), "{st:?}");
}

/// PREEMPT AND ABORT through B while the victim writes through A: once B's command
/// returns, no victim write lands (B's marker stays on the image), the victim gets
/// RESERVATION CONFLICT, and 2A/05 reaches its nexus once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_through_b_fences_a_victim_writing_through_a() {
    let spec = image("prabort", MIB);
    let a = Gateway::start("127.0.0.13", 1, &spec, "5s").await;
    let b = Gateway::start("127.0.0.14", 2, &spec, "5s").await;
    let victim = a.login("victim", 1).await;
    let pre = b.login("preemptor", 2).await;
    victim_holds(&victim, &pre).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (log, tasks) = start_victim(&victim, 4, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    assert_eq!(
        pr::preempt(&pre, 0, 0xb2, 0xa1, ty::WE, true).await,
        Outcome::Good
    );
    let took = t0.elapsed();
    pre.write16(0, 0, marker(), BLOCK, true)
        .await
        .expect("marker write by the new holder");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_victim(&stop, tasks).await;
    let img = export(&spec);
    assert!(
        img[..marker().len()] == marker()[..],
        "a victim write landed after PREEMPT AND ABORT returned"
    );
    assert!(
        count(&log, Outcome::Good) > 0,
        "the victim wrote before the preempt"
    );
    assert!(
        count(&log, Outcome::Conflict) > 0,
        "the victim got RESERVATION CONFLICT"
    );
    assert_eq!(
        count(&log, pr::UA_REG_PREEMPTED),
        1,
        "2A/05 once on the victim's nexus"
    );
    println!("cross-gateway PREEMPT AND ABORT took {took:?}");
}

fn blocklist() -> Vec<String> {
    let (ok, out, err) = ceph(&["osd", "blocklist", "ls"]);
    assert!(ok, "{err}");
    // `blocklist ls` prints the entries on stdout and "listed N entries" on stderr.
    out.lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The same with gateway A frozen (SIGSTOP) during the preempt: B's PREEMPT completes
/// within the notify timeout plus the map barrier, A is blocklisted, and after SIGCONT
/// none of A's queued victim writes land; A answers NOT READY, then reconnects by
/// itself and serves again with the new state (the victim's writes conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_is_blocklisted_and_none_of_its_writes_land() {
    let spec = image("prfrozen", MIB);
    let a = Gateway::start("127.0.0.13", 1, &spec, "3s").await;
    let b = Gateway::start("127.0.0.14", 2, &spec, "3s").await;
    let victim = a.login("victim", 1).await;
    let pre = b.login("preemptor", 2).await;
    victim_holds(&victim, &pre).await;
    let before = blocklist();
    let stop = Arc::new(AtomicBool::new(false));
    let (log, tasks) = start_victim(&victim, 4, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    assert_eq!(
        pr::preempt(&pre, 0, 0xb2, 0xa1, ty::WE, true).await,
        Outcome::Good
    );
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3 + 10), "preempt took {took:?}");
    let after = blocklist();
    let added: Vec<&String> = after.iter().filter(|e| !before.contains(e)).collect();
    assert!(!added.is_empty(), "gateway A blocklisted: {after:?}");
    pre.write16(0, 0, marker(), BLOCK, true)
        .await
        .expect("marker write through B");
    a.signal("-CONT");
    let resumed = Instant::now();
    // A reconnects by itself (new client, image reopened, state re-read) and serves
    // again: reads work, and the preempted victim's writes meet the new reservation.
    a_serves_again(&victim).await;
    let recovered = resumed.elapsed();
    let image = [("image", spec.as_str())];
    let count = |g: &Gateway, name: &str| value(&samples(&scrape(g.metrics)), name, &image);
    assert!(count(&b, "holdfast_rbd_gateways_fenced_total").is_some_and(|v| v >= 1.0));
    assert!(count(&a, "holdfast_rbd_pr_watches_lost_total").is_some_and(|v| v >= 1.0));
    assert!(count(&a, "holdfast_rbd_pr_watches_recovered_total").is_some_and(|v| v >= 1.0));
    stop_victim(&stop, tasks).await;
    // Victim writes that reached A before it had recovered were answered NOT READY (the
    // blocklisted handle refused them, or the watch was known lost). Counted, not
    // asserted: when A recovers (~0.2 s) before the victim's next write reaches it, there
    // are none (seen once in CI). The answer itself is asserted in
    // rbd::a_blocklisted_gateway_answers_not_ready; here the watch's loss and recovery
    // (metrics above), the conflict below and the intact marker are what A shows.
    let not_ready = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, r)| matches!(r, Some(Outcome::Check(0x02, 0x04, _))))
        .count();
    assert_eq!(victim_write(&victim).await, Outcome::Conflict);
    println!("frozen-gateway PREEMPT AND ABORT took {took:?}; blocklisted {added:?}; victim NOT READY answers {not_ready}; A served again {recovered:?} after SIGCONT");
    let img = export(&spec);
    assert!(
        img[..marker().len()] == marker()[..],
        "a write of the fenced gateway landed"
    );
    for e in added {
        let _ = ceph(&["osd", "blocklist", "rm", e]);
    }
}

/// Median PR OUT latency (REGISTER AND IGNORE EXISTING KEY through gateway A) with 1, 2
/// and 3 gateways watching the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pr_out_latency_with_one_two_and_three_gateways() {
    let spec = image("prlat", MIB);
    let mut gws = vec![Gateway::start("127.0.0.13", 1, &spec, "5s").await];
    let s = gws[0].login("lat", 1).await;
    let mut report = Vec::new();
    for n in 1..=3 {
        if n > 1 {
            let ip = format!("127.0.0.{}", 12 + n);
            gws.push(Gateway::start(&ip, n as u16, &spec, "5s").await);
        }
        let mut t = Vec::new();
        // Warm-up: connections to the OSD and to the new gateway's watch.
        for i in 0..5u64 {
            pr::prout_basic(&s, 0, sa::REGISTER_AND_IGNORE, 0, 0, 0x80 + i, 0).await;
        }
        for i in 0..50u64 {
            let t0 = Instant::now();
            let o = pr::prout_basic(&s, 0, sa::REGISTER_AND_IGNORE, 0, 0, 0x100 + i, 0).await;
            t.push(t0.elapsed());
            assert_eq!(o, Outcome::Good);
        }
        t.sort();
        report.push((n, t[t.len() / 2], t[t.len() * 9 / 10]));
    }
    for (n, med, p90) in &report {
        println!("PR OUT latency with {n} gateway(s): median {med:?}, p90 {p90:?}");
        assert!(*med < Duration::from_secs(5), "no notify timed out");
    }
}

/// The logical unit spans the gateways: non-APTPL registrations survive one gateway's
/// restart while another serves, and are cleared when a gateway starts with none
/// serving (the whole LU was power-cycled); APTPL ones survive that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_aptpl_state_lasts_while_a_gateway_serves_and_aptpl_survives_all() {
    let spec = image("prlife", MIB);
    let a = Gateway::start("127.0.0.13", 1, &spec, "2s").await;
    let b = Gateway::start("127.0.0.14", 2, &spec, "2s").await;
    let s = a.login("host1", 1).await;
    assert_eq!(pr::register(&s, 0, 0, 0xa1).await, Outcome::Good);
    drop((s, a));
    let a = Gateway::start("127.0.0.13", 1, &spec, "2s").await;
    let s = a.login("host1", 1).await;
    assert_eq!(
        pr::read_keys(&s, 0).await.1,
        vec![0xa1],
        "B served meanwhile"
    );
    drop((s, a, b));
    // Both gone (their watches linger until the OSDs time them out, and are fenced).
    let a = Gateway::start("127.0.0.13", 1, &spec, "2s").await;
    let s = a.login("host1", 1).await;
    assert!(
        pr::read_keys(&s, 0).await.1.is_empty(),
        "power cycle clears"
    );
    let o = pr::prout_basic(&s, 0, sa::REGISTER, 0, 0, 0xc3, pr::APTPL).await;
    assert_eq!(o, Outcome::Good);
    drop((s, a));
    let a = Gateway::start("127.0.0.13", 1, &spec, "2s").await;
    let s = a.login("host1", 1).await;
    assert_eq!(pr::read_keys(&s, 0).await.1, vec![0xc3], "APTPL survives");
    // The fenced entries are dead gateways' old connections: left to expire.
}

/// Wait until a READ through the victim's session on A succeeds; panics after a minute.
async fn a_serves_again(victim: &Session) {
    let t0 = Instant::now();
    loop {
        // NOT READY while A reconnects; unit attentions (the victim was preempted) once.
        // A read admitted just before A installs the preempt is aborted with the
        // victim's other tasks and, TAS being 0, never answered: hence the timeout.
        let read = tokio::time::timeout(NO_RESPONSE, victim.read16(0, 0, 1, BLOCK)).await;
        if matches!(read, Ok(Ok(_))) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "gateway A never served again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The victim's WRITE through A, past any pending unit attentions.
async fn victim_write(victim: &Session) -> Outcome {
    for _ in 0..4 {
        let c = cdb::write16(0, 1, false);
        let task = victim
            .submit(0, &c, Some(Bytes::from(vec![9u8; BLOCK as usize])), 0)
            .await
            .expect("submit through A");
        let r = tokio::time::timeout(NO_RESPONSE, task.wait()).await;
        let o = pr::outcome(&r.expect("A answers").expect("response"));
        if !matches!(o, Outcome::Check(0x06, _, _)) {
            return o;
        }
    }
    panic!("unit attentions without end through A")
}
