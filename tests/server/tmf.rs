//! Task sets and task management over TCP: one task set per logical unit (an ORDERED
//! task holds back only its own LU), and TMFs that reach other sessions' tasks (CLEAR
//! TASK SET, LOGICAL UNIT RESET) with the unit attentions SAM-5 asks for.

use crate::common;

use bytes::Bytes;
use common::hooked::{Hook, Hooked, Op};
use common::raw::{read16, sense_of, RawConn, Recv};
use common::*;
use holdfast::scsi::backend::{must_not_block, refuse_to_block};
use holdfast::store::memory::MemBackend;
use holdfast::wire::{self, Bhs, Pdu};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
/// Long enough for a response that is coming to come.
const QUIET: Duration = Duration::from_millis(500);
const LUN1: u64 = 0x0001_0000_0000_0000;
/// Reads at or beyond this byte offset wait for the gate.
const GATED: u64 = 1 << 20;
const GATED_LBA: u64 = GATED / 512;

/// Holds reads past [`GATED`] until it opens: a task that stays running as long as a
/// test needs.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl Hook for Arc<Gate> {
    fn before(&self, op: Op, offset: u64, _len: u64) -> std::io::Result<()> {
        if op != Op::Read || offset < GATED {
            return Ok(());
        }
        if must_not_block() {
            return Err(refuse_to_block());
        }
        let g = self.open.lock().unwrap();
        let _g = self.cv.wait_timeout_while(g, T, |open| !*open).unwrap();
        Ok(())
    }
}

/// LUN 0 gated, LUN 1 a plain file.
async fn gated_target() -> (TestTarget, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let mem = Arc::new(MemBackend::new(4 << 20));
    let text = config_text("", "", &[(0, "lun0.img", "4MiB"), (1, "lun1.img", "4MiB")]);
    let backend = Hooked {
        inner: mem,
        hook: gate.clone(),
    };
    let t = common::start_with_backend(&text, 0, Arc::new(backend)).await;
    (t, gate)
}

async fn session(t: &TestTarget, who: &str) -> RawConn {
    let mut c = RawConn::connect(t.addr).await;
    c.login(&format!("iqn.2026-12.org.holdfast:{who}"), TARGET, &[])
        .await;
    c.ping().await;
    c
}

/// A command on `lun` with task attribute `attr` (1 SIMPLE, 2 ORDERED).
fn command(c: &mut RawConn, cdb: &[u8], edtl: u32, lun: u64, attr: u8) -> (u32, Pdu) {
    let itt = c.itt();
    let mut p = c.scsi_command(itt, cdb, edtl > 0, false, edtl, Bytes::new());
    if let Bhs::ScsiCommand(sc) = &mut p.bhs {
        sc.lun = lun;
        sc.attr = attr;
    }
    (itt, p)
}

fn tmf(c: &mut RawConn, function: u8, lun: u64, rtt: u32) -> (u32, Pdu) {
    let itt = c.itt();
    let mut r = wire::TaskMgmtRequest::default();
    (r.immediate, r.function, r.lun, r.itt) = (true, 0x80 | function, lun, itt);
    (r.referenced_task_tag, r.cmd_sn, r.exp_stat_sn) = (rtt, c.cmd_sn, c.exp_stat_sn);
    (itt, Pdu::with_data(Bhs::TaskMgmtRequest(r), Bytes::new()))
}

/// What ended a task, by ITT: SCSI status (with sense) or a TMF response code.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Status(u8, Option<(u8, u8, u8)>),
    Tmf(u8),
}

/// The next answer within `wait` (Data-In without status is skipped), or None.
async fn answer(c: &mut RawConn, wait: Duration) -> Option<(u32, Answer)> {
    loop {
        let p = match c.recv(wait).await {
            Recv::Pdu(p) => p,
            Recv::Silent => return None,
            Recv::Closed => panic!("connection closed"),
        };
        match &p.bhs {
            Bhs::ScsiResponse(r) => {
                return Some((r.itt, Answer::Status(r.status, sense_of(&p.data))));
            }
            Bhs::DataIn(d) if d.status_present => {
                return Some((d.itt, Answer::Status(d.status, None)));
            }
            Bhs::TaskMgmtResponse(r) => return Some((r.itt, Answer::Tmf(r.response))),
            Bhs::NopIn(n) if n.itt == wire::RESERVED_TAG => c.nop_answer(n.ttt).await,
            _ => {}
        }
    }
}

/// TEST UNIT READY on `lun`: its status and sense.
async fn tur(c: &mut RawConn, lun: u64) -> Answer {
    let (itt, p) = command(c, &[0; 6], 0, lun, 1);
    c.send(&p).await;
    let (got, a) = answer(c, T).await.expect("TUR answered");
    assert_eq!(got, itt);
    a
}

/// Sessions `a` and `b` (both seen by every LU), a read of `a` on LUN 0 held running
/// by the gate and an ORDERED TUR of `a` waiting behind it.
struct Scene {
    _t: TestTarget,
    gate: Arc<Gate>,
    a: RawConn,
    b: RawConn,
    slow: u32,
    queued: u32,
}

async fn scene() -> Scene {
    let (t, gate) = gated_target().await;
    let mut a = session(&t, "a").await;
    let mut b = session(&t, "b").await;
    for c in [&mut a, &mut b] {
        for lun in [0, LUN1] {
            assert_eq!(tur(c, lun).await, Answer::Status(0, None));
        }
    }
    let (slow, p) = command(&mut a, &read16(GATED_LBA, 1), 512, 0, 1);
    a.send(&p).await;
    let (queued, p) = command(&mut a, &[0; 6], 0, 0, 2);
    a.send(&p).await;
    tokio::time::sleep(QUIET).await;
    Scene {
        _t: t,
        gate,
        a,
        b,
        slow,
        queued,
    }
}

/// The [`scene`] after `b` sent TMF `function` for LUN 0, the gate opened and `b` got
/// FUNCTION COMPLETE (only then, if the TMF `aborts` `a`'s tasks); `a`'s two tasks
/// ended without status if `aborts`, else with GOOD.
async fn after_tmf_from_b(function: u8, aborts: bool) -> Scene {
    let mut s = scene().await;
    let (itt, p) = tmf(&mut s.b, function, 0, 0);
    s.b.send(&p).await;
    if aborts {
        let early = answer(&mut s.b, QUIET).await;
        assert_eq!(
            early, None,
            "the response waits for the aborted running read"
        );
    }
    s.gate.open();
    assert_eq!(answer(&mut s.b, T).await, Some((itt, Answer::Tmf(0))));
    if aborts {
        assert_eq!(answer(&mut s.a, QUIET).await, None, "aborted: no status");
    } else {
        for itt in [s.slow, s.queued] {
            assert_eq!(
                answer(&mut s.a, T).await,
                Some((itt, Answer::Status(0, None)))
            );
        }
    }
    s
}

#[tokio::test]
async fn an_ordered_task_holds_back_only_its_own_logical_unit() {
    let (t, gate) = gated_target().await;
    let mut c = session(&t, "a").await;
    let (slow, p) = command(&mut c, &read16(GATED_LBA, 1), 512, 0, 1);
    c.send(&p).await;
    let (ordered, p) = command(&mut c, &[0; 6], 0, 0, 2);
    c.send(&p).await;
    let (other_lun, p) = command(&mut c, &read16(0, 1), 512, LUN1, 1);
    c.send(&p).await;
    let (same_lun, p) = command(&mut c, &read16(0, 1), 512, 0, 1);
    c.send(&p).await;
    let first = answer(&mut c, T)
        .await
        .expect("the LUN 1 read is not held back");
    assert_eq!(first, (other_lun, Answer::Status(0, None)));
    assert_eq!(
        answer(&mut c, QUIET).await,
        None,
        "LUN 0 waits behind its ORDERED task"
    );
    gate.open();
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(answer(&mut c, T).await.expect("answered").0);
    }
    assert_eq!(rest, [slow, ordered, same_lun], "SAM order on LUN 0");
}

#[tokio::test]
async fn clear_task_set_aborts_other_sessions_tasks_and_tells_them() {
    let s = &mut after_tmf_from_b(4, true).await;
    // COMMANDS CLEARED BY ANOTHER INITIATOR, once; not for the nexus that cleared.
    let ua = Answer::Status(2, Some((6, 0x2F, 0x00)));
    assert_eq!(tur(&mut s.a, 0).await, ua);
    assert_eq!(tur(&mut s.a, 0).await, Answer::Status(0, None));
    assert_eq!(tur(&mut s.b, 0).await, Answer::Status(0, None));
}

#[tokio::test]
async fn lun_reset_aborts_every_session_task_on_that_lun_only() {
    let s = &mut after_tmf_from_b(5, true).await;
    // BUS DEVICE RESET FUNCTION OCCURRED on LUN 0 for both, nothing on LUN 1.
    let ua = Answer::Status(2, Some((6, 0x29, 0x03)));
    for c in [&mut s.a, &mut s.b] {
        assert_eq!(tur(c, 0).await, ua);
        assert_eq!(tur(c, LUN1).await, Answer::Status(0, None));
    }
}

#[tokio::test]
async fn abort_task_set_leaves_other_sessions_alone() {
    let s = &mut after_tmf_from_b(2, false).await;
    assert_eq!(tur(&mut s.a, 0).await, Answer::Status(0, None), "and no UA");
}
