//! Persistent reservations over real iSCSI sessions: what needs two or more nexuses
//! talking to one target at once, and what libiscsi's PR tests leave out (PREEMPT AND
//! ABORT against a live write load, REGISTER AND MOVE, SPEC_I_PT name-only registrations,
//! ALL_TG_PT across portals, unit attention routing, ISID churn, the six access tables).

use crate::common;

use bytes::BytesMut;
use common::hooked::{Hook, Hooked, Op};
use common::pr::{self, sa, ty, Outcome, ALL_TG_PT, SPEC_I_PT};
use common::{config_text, start, TestTarget, BLOCK, TARGET};
use holdfast::initiator::{cdb, Session};
use holdfast::store::memory::MemBackend;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LUN: u64 = 0;

fn iqn(who: &str) -> String {
    format!("iqn.2026-11.org.holdfast:{who}")
}

async fn one_lun_target() -> TestTarget {
    start(&config_text("", "", &[(0, "lun0.img", "4MiB")])).await
}

/// A backend that takes its time before each write lands: commands admitted by the
/// access check stay in flight for milliseconds, the window the PREEMPT AND ABORT fence
/// has to close (on a fast file the window is microseconds and a broken fence goes unseen).
#[derive(Debug)]
struct SlowWrites;

impl Hook for SlowWrites {
    fn before(&self, op: Op, _offset: u64, _len: u64) -> std::io::Result<()> {
        if op == Op::Write {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// One LUN over [`SlowWrites`]; the memory behind it is the medium the tests inspect.
async fn slow_write_target() -> (TestTarget, Arc<MemBackend>) {
    let mem = Arc::new(MemBackend::new(4 << 20));
    let text = config_text("", "", &[(0, "lun0.img", "4MiB")]);
    let t = common::start_with_backend(
        &text,
        0,
        Arc::new(Hooked {
            inner: mem.clone(),
            hook: SlowWrites,
        }),
    )
    .await;
    (t, mem)
}

/// A target with one LUN served on two portals in different portal groups (two target
/// ports). 127.0.0.2 is loopback too on Linux.
async fn two_port_target() -> TestTarget {
    let text = format!(
        "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n\
         [[target.portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 1\n\
         [[target.portal]]\nlisten = \"127.0.0.2:0\"\ntpgt = 2\n\
         [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"4MiB\"\n"
    );
    start(&text).await
}

async fn gen(s: &Session) -> u32 {
    pr::read_keys(s, LUN).await.0
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------------------
// PREEMPT AND ABORT against a live write load

const RACE_WRITE_BLOCKS: u32 = 8;
const RACE_BLOCKS: u64 = RACE_RANGES * RACE_WRITE_BLOCKS as u64;
const RACE_WRITERS: u64 = 12;
const RACE_RANGES: u64 = 64;
const MAGIC: &[u8; 8] = b"PRRACE01";
/// A victim command with no answer after this long was aborted (responses are
/// suppressed for aborted tasks, SAM-5 TAS = 0).
const NO_RESPONSE: Duration = Duration::from_secs(5);

/// One victim write and what became of it.
struct Sent {
    seq: u64,
    submitted: Instant,
    /// None: no response (aborted).
    result: Option<Outcome>,
}

/// Fill `blocks` blocks from `lba` with stamps naming (writer, seq): readable from the
/// backing file, so the medium itself tells which write put it there.
fn stamped(writer: u64, seq: u64, lba: u64, blocks: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity((blocks * BLOCK) as usize);
    for i in 0..u64::from(blocks) {
        let start = b.len();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&writer.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&(lba + i).to_be_bytes());
        b.resize(start + BLOCK as usize, seq as u8);
    }
    b
}

/// (writer, seq) of a stamped block, None for a block no victim wrote.
fn stamp_of(block: &[u8]) -> Option<(u64, u64)> {
    (block[..8] == MAGIC[..]).then(|| {
        let w = u64::from_be_bytes(block[8..16].try_into().unwrap());
        let s = u64::from_be_bytes(block[16..24].try_into().unwrap());
        (w, s)
    })
}

fn medium(mem: &MemBackend) -> Vec<u8> {
    let mut d = mem.snapshot().expect("medium");
    d.truncate((RACE_BLOCKS * u64::from(BLOCK)) as usize);
    d
}

/// One victim writer: WRITEs of stamped blocks until `stop`, one in flight at a time
/// per writer (RACE_WRITERS in flight overall), every result recorded.
async fn victim_writer(
    s: Session,
    w: u64,
    stop: Arc<AtomicBool>,
    good: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<(u64, Sent)>>>,
    preempted: Arc<std::sync::OnceLock<Instant>>,
    late: Arc<AtomicU64>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let lba = (seq * 7 + w * 5) % RACE_RANGES * u64::from(RACE_WRITE_BLOCKS);
        let data = stamped(w, seq, lba, RACE_WRITE_BLOCKS).freeze();
        let submitted = Instant::now();
        let c = cdb::write16(lba, RACE_WRITE_BLOCKS, false);
        let result = match s.submit(LUN, &c, Some(data), 0).await {
            Ok(task) => match tokio::time::timeout(NO_RESPONSE, task.wait()).await {
                Ok(Ok(r)) => Some(pr::outcome(&r)),
                Ok(Err(e)) => panic!("victim write transport error: {e}"),
                Err(_) => None,
            },
            Err(e) => panic!("victim submit: {e}"),
        };
        if result == Some(Outcome::Good) {
            good.fetch_add(1, Ordering::Relaxed);
        }
        if preempted.get().is_some_and(|p| submitted > *p) {
            late.fetch_add(1, Ordering::Relaxed);
        }
        log.lock().unwrap().push((
            w,
            Sent {
                seq,
                submitted,
                result,
            },
        ));
    }
}

/// The fencing guarantee: once PREEMPT AND ABORT has returned GOOD, the preempted
/// nexus's writes no longer reach the medium, whether they were queued, running, or sent
/// afterwards. Checked on the backing file itself, several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_fences_a_writing_victim() {
    for iteration in 0..4 {
        let (t, mem) = slow_write_target().await;
        let victim = t.login_as(&iqn("victim"), None, 0).await;
        let pre = t.login_as(&iqn("preemptor"), None, 0).await;
        assert_eq!(pr::register(&victim, LUN, 0, 0x71C7).await, Outcome::Good);
        assert_eq!(pr::register(&pre, LUN, 0, 0xB0B).await, Outcome::Good);
        // The victim holds WE-RO; both are registrants, so both may write until the preempt.
        assert_eq!(
            pr::reserve(&victim, LUN, 0x71C7, ty::WE_RO).await,
            Outcome::Good
        );
        let gen_before = gen(&pre).await;

        let stop = Arc::new(AtomicBool::new(false));
        let good = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let preempted_at = Arc::new(std::sync::OnceLock::new());
        let late_count = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..RACE_WRITERS)
            .map(|w| {
                tokio::spawn(victim_writer(
                    victim.clone(),
                    w,
                    stop.clone(),
                    good.clone(),
                    log.clone(),
                    preempted_at.clone(),
                    late_count.clone(),
                ))
            })
            .collect();
        // Preempt mid-stream, with writes in flight.
        let deadline = Instant::now() + Duration::from_secs(20);
        while good.load(Ordering::Relaxed) < 200 {
            assert!(Instant::now() < deadline, "victim writes do not progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let o = pr::preempt(&pre, LUN, 0xB0B, 0x71C7, ty::WE_RO, true).await;
        let preempted = Instant::now();
        preempted_at.set(preempted).unwrap();
        assert_eq!(o, Outcome::Good, "PREEMPT AND ABORT");
        let snapshot = medium(&mem);
        // The victim keeps writing against the fence: every writer several more times
        // (a writer whose write was aborted first waits NO_RESPONSE for it).
        let deadline = Instant::now() + NO_RESPONSE + Duration::from_secs(10);
        while late_count.load(Ordering::Relaxed) < 4 * RACE_WRITERS {
            assert!(Instant::now() < deadline, "victim writers stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("victim writer");
        }
        let after = medium(&mem);
        assert!(
            snapshot == after,
            "iteration {iteration}: the medium changed after PREEMPT AND ABORT returned"
        );

        // Owned, so no lock is held across the awaits below.
        let log: Vec<(u64, Sent)> = std::mem::take(&mut *log.lock().unwrap());
        let late: Vec<&Sent> = log
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.submitted > preempted)
            .collect();
        assert!(
            late.len() >= RACE_WRITERS as usize,
            "the victim kept writing after the preempt ({} writes)",
            late.len()
        );
        for s in &late {
            // Sent after the preempt completed: never admitted, never silently dropped.
            assert!(
                matches!(
                    s.result,
                    Some(Outcome::Conflict) | Some(pr::UA_REG_PREEMPTED)
                ),
                "victim write sent after the preempt ended with {:?}",
                s.result
            );
        }
        for (_, s) in log.iter() {
            if s.result.is_none() {
                assert!(
                    s.submitted < preempted,
                    "a write sent after the preempt got no response"
                );
            }
        }
        // Every stamp on the medium comes from a write sent before the preempt returned.
        let sent_at: std::collections::HashMap<(u64, u64), Instant> = log
            .iter()
            .map(|(w, s)| ((*w, s.seq), s.submitted))
            .collect();
        for block in after.chunks(BLOCK as usize) {
            if let Some(id) = stamp_of(block) {
                let when = sent_at.get(&id).expect("stamp of a logged write");
                assert!(*when < preempted, "a write sent after the preempt landed");
            }
        }
        let uas = log
            .iter()
            .filter(|(_, s)| s.result == Some(pr::UA_REG_PREEMPTED))
            .count();
        let aborted = log.iter().filter(|(_, s)| s.result.is_none()).count();
        eprintln!(
            "iteration {iteration}: {} writes, {} GOOD, {aborted} without response, {} after the preempt, {uas} UA",
            log.len(),
            good.load(Ordering::Relaxed),
            late.len()
        );
        // One REGISTRATIONS PREEMPTED for the nexus, reported once.
        assert!(uas <= 1, "REGISTRATIONS PREEMPTED reported {uas} times");
        if uas == 0 {
            assert_eq!(pr::tur(&victim, LUN).await, pr::UA_REG_PREEMPTED);
        }
        // The preemptor holds the reservation; the victim is gone from the keys.
        assert_eq!(
            pr::read_reservation(&pre, LUN).await,
            (gen_before + 1, Some((0xB0B, ty::WE_RO)))
        );
        assert_eq!(pr::read_keys(&victim, LUN).await.1, vec![0xB0B]);
    }
}

/// A burst of victim writes queued behind each other (same LBAs, so they serialise on the
/// range lock) when PREEMPT AND ABORT arrives: each is completed before the fence (GOOD),
/// aborted (no response) or refused; afterwards the victim session still works, gets
/// REGISTRATIONS PREEMPTED once, may use PR IN and READ, and its WRITEs conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_aborts_queued_tasks_and_victim_stays_usable() {
    let (t, mem) = slow_write_target().await;
    let victim = t.login_as(&iqn("victim"), None, 0).await;
    let pre = t.login_as(&iqn("preemptor"), None, 0).await;
    let bystander = t.login_as(&iqn("bystander"), None, 0).await;
    assert_eq!(pr::register(&victim, LUN, 0, 0x1111).await, Outcome::Good);
    assert_eq!(pr::register(&pre, LUN, 0, 0x2222).await, Outcome::Good);
    assert_eq!(
        pr::register(&bystander, LUN, 0, 0x3333).await,
        Outcome::Good
    );
    // WE-AR: every registrant holds it, so all three may write before the preempt.
    assert_eq!(
        pr::reserve(&pre, LUN, 0x2222, ty::WE_AR).await,
        Outcome::Good
    );
    let g0 = gen(&pre).await;

    let blocks = 8u32;
    let mut tasks = Vec::new();
    for i in 0..48u64 {
        let data = stamped(0, i + 1, 0, blocks).freeze();
        tasks.push(
            victim
                .submit(LUN, &cdb::write16(0, blocks, false), Some(data), 0)
                .await
                .expect("submit"),
        );
    }
    // Let the burst reach the target: its writes are then running (each takes 2 ms).
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        pr::preempt(&pre, LUN, 0x2222, 0x1111, ty::WE_AR, true).await,
        Outcome::Good
    );
    let snapshot = mem.snapshot().unwrap();
    let mut counts = [0usize; 4]; // good, no response, conflict, UA
    for task in tasks {
        match tokio::time::timeout(NO_RESPONSE, task.wait()).await {
            Err(_) => counts[1] += 1,
            Ok(r) => match pr::outcome(&r.expect("transport")) {
                Outcome::Good => counts[0] += 1,
                Outcome::Conflict => counts[2] += 1,
                o if o == pr::UA_REG_PREEMPTED => counts[3] += 1,
                o => panic!("queued victim write ended with {o:?}"),
            },
        }
    }
    eprintln!("burst: good/no response/conflict/UA = {counts:?}");
    assert!(counts[3] <= 1);
    assert_eq!(
        mem.snapshot().unwrap(),
        snapshot,
        "a victim write landed after the preempt"
    );
    // Its next command reports the preemption, unless a burst write already did.
    if counts[3] == 0 {
        assert_eq!(pr::tur(&victim, LUN).await, pr::UA_REG_PREEMPTED);
    }
    assert_eq!(pr::tur(&victim, LUN).await, Outcome::Good);
    // The bystander lost nothing and is told nothing.
    assert_eq!(pr::tur(&bystander, LUN).await, Outcome::Good);
    assert_eq!(
        pr::write_block(&bystander, LUN, 1000, 0xbb).await,
        Outcome::Good
    );
    // PR IN and READ stay open to the victim; WRITE does not.
    let (g1, keys) = pr::read_keys(&victim, LUN).await;
    assert_eq!(g1, g0 + 1, "PREEMPT AND ABORT bumps PRgeneration once");
    assert_eq!(sorted(keys), vec![0x2222, 0x3333]);
    assert_eq!(
        pr::read_reservation(&victim, LUN).await.1,
        Some((0, ty::WE_AR)),
        "all-registrants reservation survives, reported with key 0"
    );
    assert_eq!(pr::read_block(&victim, LUN, 0).await, Outcome::Good);
    assert_eq!(
        pr::write_block(&victim, LUN, 0, 0xee).await,
        Outcome::Conflict
    );
    // Re-registering lets it back in under WE-AR.
    assert_eq!(pr::register(&victim, LUN, 0, 0x1112).await, Outcome::Good);
    assert_eq!(pr::write_block(&victim, LUN, 0, 0xee).await, Outcome::Good);
}

// ---------------------------------------------------------------------------------------
// Unit attentions

/// Each PR unit attention goes to the nexuses SPC-4 names and to no other: not to the
/// issuer, not to unregistered nexuses, not to registrants that lost nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_attentions_reach_exactly_the_affected_nexuses() {
    let t = one_lun_target().await;
    let a = t.login_as(&iqn("a"), None, 0).await;
    let b = t.login_as(&iqn("b"), None, 0).await;
    let c = t.login_as(&iqn("c"), None, 0).await;
    let d = t.login_as(&iqn("d"), None, 0).await; // never registers
    let all = [&a, &b, &c, &d];
    async fn expect(sessions: &[&Session], want: [Outcome; 4], what: &str) {
        for (i, s) in sessions.iter().enumerate() {
            assert_eq!(pr::tur(s, LUN).await, want[i], "{what}: session {i}");
        }
        // Reported once: the next command is clean.
        for (i, s) in sessions.iter().enumerate() {
            assert_eq!(
                pr::tur(s, LUN).await,
                Outcome::Good,
                "{what}: session {i} again"
            );
        }
    }
    let good = Outcome::Good;
    for (s, k) in [(&a, 0xA), (&b, 0xB), (&c, 0xC)] {
        assert_eq!(pr::register(s, LUN, 0, k).await, good);
    }
    expect(&all, [good; 4], "registering").await;

    // RELEASE of a registrants-only reservation: RESERVATIONS RELEASED to the other
    // registrants.
    assert_eq!(pr::reserve(&a, LUN, 0xA, ty::WE_RO).await, good);
    assert_eq!(pr::release(&a, LUN, 0xA, ty::WE_RO).await, good);
    let rel = pr::UA_RES_RELEASED;
    expect(&all, [good, rel, rel, good], "release WE-RO").await;

    // RELEASE of WE (single holder): nobody else had access through it, no UA.
    assert_eq!(pr::reserve(&a, LUN, 0xA, ty::WE).await, good);
    assert_eq!(pr::release(&a, LUN, 0xA, ty::WE).await, good);
    expect(&all, [good; 4], "release WE").await;

    // The holder of EA-RO unregisters: the reservation goes, RESERVATIONS RELEASED.
    assert_eq!(pr::reserve(&a, LUN, 0xA, ty::EA_RO).await, good);
    assert_eq!(pr::register(&a, LUN, 0xA, 0).await, good);
    expect(&all, [good, rel, rel, good], "holder of EA-RO unregisters").await;
    assert_eq!(pr::read_reservation(&a, LUN).await.1, None);
    assert_eq!(pr::register(&a, LUN, 0, 0xA).await, good);

    // PREEMPT of one registrant's key: REGISTRATIONS PREEMPTED to it only.
    assert_eq!(pr::reserve(&a, LUN, 0xA, ty::WE_RO).await, good);
    assert_eq!(pr::preempt(&b, LUN, 0xB, 0xC, ty::WE_RO, false).await, good);
    expect(&all, [good, good, pr::UA_REG_PREEMPTED, good], "preempt C").await;
    assert_eq!(pr::register(&c, LUN, 0, 0xC).await, good);

    // PREEMPT of the holder with another type: the holder gets REGISTRATIONS PREEMPTED,
    // the remaining registrants RESERVATIONS RELEASED (the type changed).
    assert_eq!(pr::preempt(&b, LUN, 0xB, 0xA, ty::EA_RO, false).await, good);
    expect(
        &all,
        [pr::UA_REG_PREEMPTED, good, rel, good],
        "preempt the holder",
    )
    .await;
    assert_eq!(
        pr::read_reservation(&a, LUN).await.1,
        Some((0xB, ty::EA_RO))
    );

    // CLEAR: RESERVATIONS PREEMPTED to every other registrant.
    assert_eq!(pr::register(&a, LUN, 0, 0xA).await, good);
    assert_eq!(pr::clear(&b, LUN, 0xB).await, good);
    let pre = pr::UA_RES_PREEMPTED;
    expect(&all, [pre, good, pre, good], "clear").await;
    assert_eq!(pr::read_keys(&d, LUN).await.1, Vec::<u64>::new());
}

// ---------------------------------------------------------------------------------------
// REGISTER AND MOVE, REPLACE LOST RESERVATION, READ FULL STATUS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_move_hands_the_reservation_to_another_port() {
    let t = one_lun_target().await;
    let a = t.login_as(&iqn("a"), None, 0).await;
    let isid_b = [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a];
    let isid_c = [0x80, 0xab, 0xcd, 0xef, 0x01, 0x02];
    let b = t.login_as(&iqn("b"), Some(isid_b), 0).await;
    let c = t.login_as(&iqn("c"), Some(isid_c), 0).await;
    let good = Outcome::Good;
    assert_eq!(pr::register(&a, LUN, 0, 0xA).await, good);
    assert_eq!(pr::reserve(&a, LUN, 0xA, ty::WE).await, good);
    let g0 = gen(&a).await;

    // Only the holder may move it; a registrant that does not hold it conflicts.
    assert_eq!(pr::register(&c, LUN, 0, 0xC0).await, good);
    let to_b = pr::move_list(0xC0, 0xB, false, false, 1, &pr::tid_port(&iqn("b"), isid_b));
    assert_eq!(
        pr::prout(&c, LUN, sa::REGISTER_AND_MOVE, ty::WE, to_b).await,
        Outcome::Conflict
    );
    assert_eq!(pr::register(&c, LUN, 0xC0, 0).await, good);
    let g0 = g0 + 2;
    assert_eq!(gen(&a).await, g0);

    // The destination must be one initiator port: a name-only TransportID is refused.
    let by_name = pr::move_list(0xA, 0xB, false, false, 1, &pr::tid_name(&iqn("b")));
    assert!(matches!(
        pr::prout(&a, LUN, sa::REGISTER_AND_MOVE, ty::WE, by_name).await,
        Outcome::Check(0x05, _, _)
    ));
    assert_eq!(gen(&a).await, g0, "a refused move changes nothing");

    // Move to B (TransportID format 01b), keeping A registered.
    let to_b = pr::move_list(0xA, 0xB, false, false, 1, &pr::tid_port(&iqn("b"), isid_b));
    assert_eq!(
        pr::prout(&a, LUN, sa::REGISTER_AND_MOVE, ty::WE, to_b).await,
        good
    );
    assert_eq!(
        pr::read_reservation(&a, LUN).await,
        (g0 + 1, Some((0xB, ty::WE)))
    );
    assert_eq!(sorted(pr::read_keys(&a, LUN).await.1), vec![0xA, 0xB]);
    let (_, full) = pr::read_full_status(&a, LUN).await;
    let b_entry = full.iter().find(|e| e.key == 0xB).expect("B registered");
    assert_eq!(
        (
            b_entry.holder,
            b_entry.rtype,
            b_entry.format,
            b_entry.rel_port
        ),
        (true, ty::WE, 1, 1)
    );
    assert_eq!(b_entry.name, pr::port_name(&iqn("b"), isid_b));
    let a_entry = full
        .iter()
        .find(|e| e.key == 0xA)
        .expect("A still registered");
    assert!(!a_entry.holder);
    assert_eq!(a_entry.name, pr::port_name(&iqn("a"), a.isid()));
    // Under WE only the holder writes: now B, not A.
    assert_eq!(pr::write_block(&b, LUN, 3, 0xb0).await, good);
    assert_eq!(pr::write_block(&a, LUN, 3, 0xa0).await, Outcome::Conflict);

    // B moves it on to C and unregisters itself (UNREG).
    let to_c = pr::move_list(0xB, 0xC, true, false, 1, &pr::tid_port(&iqn("c"), isid_c));
    assert_eq!(
        pr::prout(&b, LUN, sa::REGISTER_AND_MOVE, ty::WE, to_c).await,
        good
    );
    assert_eq!(
        pr::read_reservation(&b, LUN).await,
        (g0 + 2, Some((0xC, ty::WE)))
    );
    assert_eq!(sorted(pr::read_keys(&b, LUN).await.1), vec![0xA, 0xC]);
    assert_eq!(pr::write_block(&b, LUN, 3, 0xb1).await, Outcome::Conflict);
    assert_eq!(pr::write_block(&c, LUN, 3, 0xc0).await, good);
    // B is no longer registered: its old key gets it nothing.
    assert_eq!(pr::release(&b, LUN, 0xB, ty::WE).await, Outcome::Conflict);
    assert_eq!(pr::release(&c, LUN, 0xC, ty::WE).await, good);
    assert_eq!(pr::read_reservation(&c, LUN).await.1, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_lost_reservation() {
    let t = one_lun_target().await;
    let a = t.login_as(&iqn("a"), None, 0).await;
    let b = t.login_as(&iqn("b"), None, 0).await;
    let d = t.login_as(&iqn("d"), None, 0).await;
    let good = Outcome::Good;
    assert_eq!(pr::register(&a, LUN, 0, 0xA).await, good);
    assert_eq!(pr::register(&b, LUN, 0, 0xB).await, good);
    let g0 = gen(&a).await;
    async fn rlr(s: &Session, key: u64, rtype: u8) -> Outcome {
        pr::prout_basic(s, LUN, sa::REPLACE_LOST, rtype, key, 0, 0).await
    }
    // Unregistered, or registered with another key: conflict.
    assert_eq!(rlr(&d, 0xD, ty::WE).await, Outcome::Conflict);
    assert_eq!(rlr(&a, 0xB, ty::WE).await, Outcome::Conflict);
    assert_eq!(rlr(&a, 0xA, ty::WE_RO).await, good);
    assert_eq!(
        pr::read_reservation(&a, LUN).await,
        (g0, Some((0xA, ty::WE_RO))),
        "a reservation is established; PRgeneration does not move"
    );
    // Another registrant cannot replace someone else's reservation.
    assert_eq!(rlr(&b, 0xB, ty::WE).await, Outcome::Conflict);
    // The holder may replace it with another type.
    assert_eq!(rlr(&a, 0xA, ty::EA).await, good);
    assert_eq!(pr::read_reservation(&b, LUN).await.1, Some((0xA, ty::EA)));
    assert_eq!(pr::read_block(&b, LUN, 0).await, Outcome::Conflict);
    assert_eq!(pr::read_block(&a, LUN, 0).await, good);
}

// ---------------------------------------------------------------------------------------
// SPEC_I_PT, ALL_TG_PT, ISID churn

/// SPEC_I_PT with a name-only TransportID registers every ISID of that initiator (the
/// agent's way of registering a VM's data path); format 01b registers one port only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_i_pt_name_only_covers_every_isid_port_format_one() {
    let t = one_lun_target().await;
    let good = Outcome::Good;
    let holder = t.login_as(&iqn("holder"), None, 0).await;
    let agent = t.login_as(&iqn("agent"), None, 0).await;
    assert_eq!(pr::register(&holder, LUN, 0, 0x40).await, good);
    assert_eq!(pr::reserve(&holder, LUN, 0x40, ty::WE_RO).await, good);
    let g0 = gen(&holder).await;

    // The agent registers itself and initiator X by name.
    let list = pr::basic_list(0, 0xA6, SPEC_I_PT, &[pr::tid_name(&iqn("x"))]);
    assert_eq!(pr::prout(&agent, LUN, sa::REGISTER, 0, list).await, good);
    let (g1, keys) = pr::read_keys(&holder, LUN).await;
    assert_eq!(g1, g0 + 1);
    assert_eq!(sorted(keys), vec![0x40, 0xA6, 0xA6]);
    let (_, full) = pr::read_full_status(&holder, LUN).await;
    let x = full
        .iter()
        .find(|e| e.name == iqn("x"))
        .expect("X listed by name");
    assert_eq!((x.key, x.format, x.holder), (0xA6, 0, false));

    // X logs in twice with different ISIDs: both nexuses are registrants and write.
    let x1 = t.login_as(&iqn("x"), Some([0x80, 0, 0, 0, 0, 1]), 0).await;
    let x2 = t.login_as(&iqn("x"), Some([0x80, 0, 0, 0, 0, 2]), 0).await;
    assert_eq!(pr::write_block(&x1, LUN, 10, 1).await, good);
    assert_eq!(pr::write_block(&x2, LUN, 11, 2).await, good);
    // X can manage its registration with the key, from either ISID.
    assert_eq!(pr::try_read_keys(&x2, LUN).await.map(|k| k.0), Ok(g1));
    // An unregistered initiator still conflicts.
    let y = t.login_as(&iqn("y"), None, 0).await;
    assert_eq!(pr::write_block(&y, LUN, 12, 3).await, Outcome::Conflict);

    // Format 01b: exactly one initiator port of Z.
    let z_isid = [0x80, 0, 0, 0, 0, 7];
    let agent2 = t.login_as(&iqn("agent2"), None, 0).await;
    let list = pr::basic_list(0, 0xA7, SPEC_I_PT, &[pr::tid_port(&iqn("z"), z_isid)]);
    assert_eq!(pr::prout(&agent2, LUN, sa::REGISTER, 0, list).await, good);
    let z1 = t.login_as(&iqn("z"), Some(z_isid), 0).await;
    let z2 = t.login_as(&iqn("z"), Some([0x80, 0, 0, 0, 0, 8]), 0).await;
    assert_eq!(pr::write_block(&z1, LUN, 13, 4).await, good);
    assert_eq!(pr::write_block(&z2, LUN, 14, 5).await, Outcome::Conflict);
    let (_, full) = pr::read_full_status(&holder, LUN).await;
    let z = full
        .iter()
        .find(|e| e.name == pr::port_name(&iqn("z"), z_isid))
        .expect("Z's port listed");
    assert_eq!((z.key, z.format, z.rel_port), (0xA7, 1, 1));

    // PREEMPT AND ABORT of the agent's key removes its name-only registration too: both
    // X nexuses are told and lose write access at once.
    assert_eq!(
        pr::preempt(&holder, LUN, 0x40, 0xA6, ty::WE_RO, true).await,
        good
    );
    for xs in [&x1, &x2] {
        assert_eq!(pr::write_block(xs, LUN, 10, 9).await, pr::UA_REG_PREEMPTED);
        assert_eq!(pr::write_block(xs, LUN, 10, 9).await, Outcome::Conflict);
    }
    assert_eq!(
        sorted(pr::read_keys(&holder, LUN).await.1),
        vec![0x40, 0xA7, 0xA7]
    );
}

/// ALL_TG_PT: a registration made through one target port covers the initiator port on
/// every target port; without it, only the port it was made through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_tg_pt_registration_covers_the_other_portal_group() {
    let t = two_port_target().await;
    let good = Outcome::Good;
    let holder = t.login_as(&iqn("holder"), None, 0).await;
    assert_eq!(pr::register(&holder, LUN, 0, 0x40).await, good);
    assert_eq!(pr::reserve(&holder, LUN, 0x40, ty::WE_RO).await, good);

    let x_isid = [0x80, 0, 0, 0, 1, 1];
    let z_isid = [0x80, 0, 0, 0, 1, 2];
    let x_p1 = t.login_as(&iqn("x"), Some(x_isid), 0).await;
    let z_p1 = t.login_as(&iqn("z"), Some(z_isid), 0).await;
    assert_eq!(
        pr::prout_basic(&x_p1, LUN, sa::REGISTER, 0, 0, 0x11, ALL_TG_PT).await,
        good
    );
    assert_eq!(pr::register(&z_p1, LUN, 0, 0x22).await, good);

    // The same initiator ports log in through the second portal group (a different
    // target port, so a different I_T nexus and a different session).
    let x_p2 = t.login_as(&iqn("x"), Some(x_isid), 1).await;
    let z_p2 = t.login_as(&iqn("z"), Some(z_isid), 1).await;
    assert_eq!(pr::write_block(&x_p2, LUN, 20, 1).await, good);
    assert_eq!(pr::write_block(&z_p2, LUN, 21, 2).await, Outcome::Conflict);
    assert_eq!(pr::write_block(&z_p1, LUN, 21, 2).await, good);
    // The first sessions were not replaced by the logins on the other portal group.
    assert_eq!(pr::write_block(&x_p1, LUN, 22, 3).await, good);

    let (_, full) = pr::read_full_status(&holder, LUN).await;
    let x = full.iter().find(|e| e.key == 0x11).expect("X");
    let z = full.iter().find(|e| e.key == 0x22).expect("Z");
    assert!(x.all_tg_pt && !z.all_tg_pt);
    assert_eq!(z.rel_port, 1, "registered through portal group 1");
    let h = full.iter().find(|e| e.key == 0x40).expect("holder");
    assert_eq!((h.holder, h.rtype, h.rel_port), (true, ty::WE_RO, 1));

    // Z registers through port 2 as well: a second registration, same key allowed.
    assert_eq!(pr::register(&z_p2, LUN, 0, 0x22).await, good);
    assert_eq!(pr::write_block(&z_p2, LUN, 21, 2).await, good);
    let (_, full) = pr::read_full_status(&holder, LUN).await;
    let mut z_ports: Vec<u16> = full
        .iter()
        .filter(|e| e.key == 0x22)
        .map(|e| e.rel_port)
        .collect();
    z_ports.sort_unstable();
    assert_eq!(z_ports, vec![1, 2]);
}

/// A re-login with a new ISID is a new I_T nexus: the old registration stays with the old
/// nexus and does not cover the new one until it registers itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isid_churn_requires_re_registration() {
    let t = one_lun_target().await;
    let good = Outcome::Good;
    let holder = t.login_as(&iqn("holder"), None, 0).await;
    assert_eq!(pr::register(&holder, LUN, 0, 0x40).await, good);
    assert_eq!(pr::reserve(&holder, LUN, 0x40, ty::WE_RO).await, good);

    let old = t
        .login_as(&iqn("node"), Some([0x80, 1, 1, 1, 1, 1]), 0)
        .await;
    assert_eq!(pr::register(&old, LUN, 0, 0x77).await, good);
    assert_eq!(pr::write_block(&old, LUN, 5, 1).await, good);
    old.logout().await.expect("logout");

    let new = t
        .login_as(&iqn("node"), Some([0x80, 2, 2, 2, 2, 2]), 0)
        .await;
    assert_eq!(pr::write_block(&new, LUN, 5, 2).await, Outcome::Conflict);
    // The old nexus's registration outlives its session (registrations survive I_T
    // nexus loss), but it is not this nexus's: a REGISTER with its key conflicts.
    assert_eq!(sorted(pr::read_keys(&new, LUN).await.1), vec![0x40, 0x77]);
    assert_eq!(pr::register(&new, LUN, 0x77, 0x78).await, Outcome::Conflict);
    assert_eq!(pr::register(&new, LUN, 0, 0x78).await, good);
    assert_eq!(pr::write_block(&new, LUN, 5, 2).await, good);
    let (_, full) = pr::read_full_status(&holder, LUN).await;
    let names: Vec<(u64, String)> = full.into_iter().map(|e| (e.key, e.name)).collect();
    assert!(names.contains(&(0x77, pr::port_name(&iqn("node"), [0x80, 1, 1, 1, 1, 1]))));
    assert!(names.contains(&(0x78, pr::port_name(&iqn("node"), [0x80, 2, 2, 2, 2, 2]))));

    // Logging in again with the old ISID is the old nexus again: registered.
    let back = t
        .login_as(&iqn("node"), Some([0x80, 1, 1, 1, 1, 1]), 0)
        .await;
    assert_eq!(pr::write_block(&back, LUN, 6, 3).await, good);
}

// ---------------------------------------------------------------------------------------
// The access tables

/// SPC-4 table 180 (access by type) for the holder, another registrant and an
/// unregistered nexus; READ FULL STATUS marks the holders; PRgeneration moves only with
/// registrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tables_of_the_six_types() {
    let t = one_lun_target().await;
    let h = t.login_as(&iqn("holder"), None, 0).await;
    let r = t.login_as(&iqn("registrant"), None, 0).await;
    let u = t.login_as(&iqn("unregistered"), None, 0).await;
    let (g, c) = (Outcome::Good, Outcome::Conflict);
    for rtype in ty::ALL {
        let g0 = gen(&h).await;
        assert_eq!(pr::register(&h, LUN, 0, 0x10).await, g);
        assert_eq!(pr::register(&r, LUN, 0, 0x20).await, g);
        assert_eq!(pr::reserve(&h, LUN, 0x10, rtype).await, g);
        assert_eq!(gen(&h).await, g0 + 2, "type {rtype}: RESERVE does not bump");
        // Reserving again with the same type is a no-op, another type conflicts.
        assert_eq!(pr::reserve(&h, LUN, 0x10, rtype).await, g);
        let other = if rtype == ty::WE { ty::EA } else { ty::WE };
        assert_eq!(pr::reserve(&h, LUN, 0x10, other).await, c);

        let exclusive = matches!(rtype, ty::EA | ty::EA_RO | ty::EA_AR);
        let shared = matches!(rtype, ty::WE_RO | ty::EA_RO | ty::WE_AR | ty::EA_AR);
        let all_reg = matches!(rtype, ty::WE_AR | ty::EA_AR);
        // (session, read, write) expectations.
        let table = [
            (&h, "holder", g, g),
            (
                &r,
                "registrant",
                if exclusive && !shared { c } else { g },
                if shared { g } else { c },
            ),
            (&u, "unregistered", if exclusive { c } else { g }, c),
        ];
        for (s, who, read, write) in table {
            assert_eq!(
                pr::read_block(s, LUN, 7).await,
                read,
                "type {rtype} {who} READ"
            );
            assert_eq!(
                pr::write_block(s, LUN, 7, rtype).await,
                write,
                "type {rtype} {who} WRITE"
            );
            assert_eq!(pr::tur(s, LUN).await, g, "type {rtype} {who} TUR");
            assert_eq!(pr::inquiry(s, LUN).await, g, "type {rtype} {who} INQUIRY");
            assert!(
                pr::try_read_keys(s, LUN).await.is_ok(),
                "type {rtype} {who} PR IN"
            );
        }
        let expect_key = if all_reg { 0 } else { 0x10 };
        assert_eq!(
            pr::read_reservation(&u, LUN).await.1,
            Some((expect_key, rtype))
        );
        let (_, full) = pr::read_full_status(&u, LUN).await;
        let holders: Vec<(u64, bool, u8)> =
            full.iter().map(|e| (e.key, e.holder, e.rtype)).collect();
        let r_holds = (all_reg, if all_reg { rtype } else { 0 });
        assert!(
            holders.contains(&(0x10, true, rtype)),
            "type {rtype}: {holders:?}"
        );
        assert!(
            holders.contains(&(0x20, r_holds.0, r_holds.1)),
            "type {rtype}: {holders:?}"
        );
        // An unregistered nexus cannot touch the reservation.
        assert_eq!(pr::release(&u, LUN, 0x10, rtype).await, c);
        assert_eq!(pr::clear(&u, LUN, 0x10).await, c);
        assert_eq!(pr::clear(&h, LUN, 0x10).await, g);
        assert_eq!(pr::tur(&r, LUN).await, pr::UA_RES_PREEMPTED);
        assert_eq!(gen(&h).await, g0 + 3, "type {rtype}: CLEAR bumps");
    }
}

/// A basic parameter list sent through a nexus that is already registered may not carry
/// SPEC_I_PT, and an unregistered REGISTER with a non-zero key conflicts: the checks
/// PRgeneration counting relies on (nothing changes, nothing counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_register_changes_nothing() {
    let t = one_lun_target().await;
    let a = t.login_as(&iqn("a"), None, 0).await;
    assert_eq!(pr::register(&a, LUN, 0, 0xA).await, Outcome::Good);
    let g0 = gen(&a).await;
    let list = pr::basic_list(0xA, 0xA, SPEC_I_PT, &[pr::tid_name(&iqn("x"))]);
    assert!(matches!(
        pr::prout(&a, LUN, sa::REGISTER, 0, list).await,
        Outcome::Check(0x05, _, _)
    ));
    let b = t.login_as(&iqn("b"), None, 0).await;
    assert_eq!(pr::register(&b, LUN, 0x99, 0xB).await, Outcome::Conflict);
    assert_eq!(pr::read_keys(&b, LUN).await, (g0, vec![0xA]));
    // REGISTER AND IGNORE EXISTING KEY works whatever the old key.
    assert_eq!(
        pr::prout_basic(&a, LUN, sa::REGISTER_AND_IGNORE, 0, 0x1234, 0xAA, 0).await,
        Outcome::Good
    );
    assert_eq!(pr::read_keys(&b, LUN).await, (g0 + 1, vec![0xAA]));
}
