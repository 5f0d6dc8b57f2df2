//! Task sets and task management over TCP: one task set per logical unit (an ORDERED
//! task holds back only its own LU), and TMFs that reach other sessions' tasks (CLEAR
//! TASK SET, LOGICAL UNIT RESET) with the unit attentions SAM-5 asks for.

use crate::common;

use bytes::Bytes;
use common::raw::{read16, sense_of, RawConn, Recv};
use common::*;
use holdfast::scsi::backend::{must_not_block, refuse_to_block, BlockBackend};
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

/// A backend whose reads past [`GATED`] block until the gate opens: a task that stays
/// running as long as a test needs.
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

#[derive(Debug)]
struct Gated(Arc<MemBackend>, Arc<Gate>);

impl BlockBackend for Gated {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset >= GATED {
            if must_not_block() {
                return Err(refuse_to_block());
            }
            let g = self.1.open.lock().unwrap();
            let _g = self.1.cv.wait_timeout_while(g, T, |open| !*open).unwrap();
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.deallocate(offset, len)
    }
    fn allocation_at(&self, offset: u64) -> std::io::Result<(bool, u64)> {
        self.0.allocation_at(offset)
    }
}

/// LUN 0 gated, LUN 1 a plain file.
async fn gated_target() -> (TestTarget, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let mem = Arc::new(MemBackend::new(4 << 20));
    let text = config_text("", "", &[(0, "lun0.img", "4MiB"), (1, "lun1.img", "4MiB")]);
    let t = common::start_with_backend(&text, 0, Arc::new(Gated(mem, gate.clone()))).await;
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
    let p = Pdu::with_data(
        Bhs::TaskMgmtRequest(wire::TaskMgmtRequest {
            immediate: true,
            function: 0x80 | function,
            lun,
            itt,
            referenced_task_tag: rtt,
            cmd_sn: c.cmd_sn,
            exp_stat_sn: c.exp_stat_sn,
            ..Default::default()
        }),
        Bytes::new(),
    );
    (itt, p)
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
    let (t, gate) = gated_target().await;
    let mut a = session(&t, "a").await;
    let mut b = session(&t, "b").await;
    assert_eq!(tur(&mut a, 0).await, Answer::Status(0, None));
    let (slow, p) = command(&mut a, &read16(GATED_LBA, 1), 512, 0, 1);
    a.send(&p).await;
    let (queued, p) = command(&mut a, &[0; 6], 0, 0, 2);
    a.send(&p).await;
    tokio::time::sleep(QUIET).await;
    let (clear, p) = tmf(&mut b, 4, 0, 0);
    b.send(&p).await;
    assert_eq!(answer(&mut b, T).await, Some((clear, Answer::Tmf(0))));
    gate.open();
    assert_eq!(
        answer(&mut a, QUIET).await,
        None,
        "{slow} and {queued} end without status"
    );
    // COMMANDS CLEARED BY ANOTHER INITIATOR, once; not for the nexus that cleared.
    let ua = Answer::Status(2, Some((6, 0x2F, 0x00)));
    assert_eq!(tur(&mut a, 0).await, ua);
    assert_eq!(tur(&mut a, 0).await, Answer::Status(0, None));
    assert_eq!(tur(&mut b, 0).await, Answer::Status(0, None));
}

#[tokio::test]
async fn lun_reset_aborts_every_session_task_on_that_lun_only() {
    let (t, gate) = gated_target().await;
    let mut a = session(&t, "a").await;
    let mut b = session(&t, "b").await;
    for c in [&mut a, &mut b] {
        for lun in [0, LUN1] {
            tur(c, lun).await;
        }
    }
    let (slow, p) = command(&mut a, &read16(GATED_LBA, 1), 512, 0, 1);
    a.send(&p).await;
    tokio::time::sleep(QUIET).await;
    let (reset, p) = tmf(&mut b, 5, 0, 0);
    b.send(&p).await;
    assert_eq!(answer(&mut b, T).await, Some((reset, Answer::Tmf(0))));
    gate.open();
    assert_eq!(
        answer(&mut a, QUIET).await,
        None,
        "{slow} ends without status"
    );
    // BUS DEVICE RESET FUNCTION OCCURRED on LUN 0 for both, nothing on LUN 1.
    let ua = Answer::Status(2, Some((6, 0x29, 0x03)));
    for c in [&mut a, &mut b] {
        assert_eq!(tur(c, 0).await, ua);
        assert_eq!(tur(c, LUN1).await, Answer::Status(0, None));
    }
}

#[tokio::test]
async fn abort_task_set_leaves_other_sessions_alone() {
    let (t, gate) = gated_target().await;
    let mut a = session(&t, "a").await;
    let mut b = session(&t, "b").await;
    let (slow, p) = command(&mut a, &read16(GATED_LBA, 1), 512, 0, 1);
    a.send(&p).await;
    tokio::time::sleep(QUIET).await;
    let (abort, p) = tmf(&mut b, 2, 0, 0);
    b.send(&p).await;
    assert_eq!(answer(&mut b, T).await, Some((abort, Answer::Tmf(0))));
    gate.open();
    assert_eq!(
        answer(&mut a, T).await,
        Some((slow, Answer::Status(0, None)))
    );
}
