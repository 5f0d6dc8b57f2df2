//! Resource limits: each one exceeded gets a polite refusal, and memory stays bounded
//! when many peers announce large writes and never send the data.

use crate::common;

use bytes::Bytes;
use common::raw::{read16, sense_of, write16, RawConn};
use common::*;
use holdfast::initiator::{InitiatorError, Session};
use holdfast::wire::Bhs;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);
const OTHER: &str = "iqn.2026-11.org.holdfast:other";

fn limits_config(limits: &str) -> String {
    let base = config_text("", "", &[(0, "lun0.img", "16MiB")]);
    // [limits] is a top-level table: put it before [iscsi].
    base.replacen("[iscsi]", &format!("[limits]\n{limits}\n\n[iscsi]"), 1)
}

#[tokio::test]
async fn connections_per_initiator() {
    let t = start(&limits_config("max_connections_per_initiator = 2")).await;
    let mut c = t.config();
    c.isid = Some([0x80, 0, 0, 0, 0, 1]);
    let a = Session::login(c.clone()).await.unwrap();
    let _b = t.login().await;
    let e = Session::login(t.config()).await.unwrap_err();
    assert_eq!(e.login_status(), Some((3, 2)), "OUT OF RESOURCES: {e}");
    // Another initiator is not affected.
    let mut o = t.config();
    o.initiator_name = OTHER.into();
    Session::login(o).await.unwrap().nop().await.unwrap();
    // Reinstating a live session (same ISID) is not a new connection.
    let a2 = Session::login(c)
        .await
        .expect("reinstatement within the limit");
    a2.nop().await.unwrap();
    drop(a);
    a2.logout().await.unwrap();
    // A slot freed by logout is usable again.
    t.login().await.nop().await.unwrap();
}

#[tokio::test]
async fn connections_per_target_and_sessions_total() {
    let t = start(&limits_config(
        "max_connections_per_target = 2\nmax_sessions = 3",
    ))
    .await;
    let _a = t.login().await;
    let mut o = t.config();
    o.initiator_name = OTHER.into();
    let _b = Session::login(o.clone()).await.unwrap();
    let mut x = t.config();
    x.initiator_name = "iqn.2026-11.org.holdfast:third".into();
    let e = Session::login(x).await.unwrap_err();
    assert_eq!(e.login_status(), Some((3, 2)), "{e}");
    // Discovery is not a connection to the target: allowed, and it is session 3 of 3.
    let d = tokio::spawn({
        let addr = t.addr;
        async move { Session::discover(addr, INITIATOR, None).await }
    });
    assert_eq!(d.await.unwrap().unwrap().len(), 1);
}

#[tokio::test]
async fn total_sessions() {
    let t = start(&limits_config("max_sessions = 1")).await;
    let s = t.login().await;
    let e = Session::discover(t.addr, INITIATOR, None)
        .await
        .unwrap_err();
    assert_eq!(e.login_status(), Some((3, 2)), "{e}");
    s.logout().await.unwrap();
    Session::discover(t.addr, INITIATOR, None).await.unwrap();
}

#[tokio::test]
async fn open_connections_total() {
    let t = start(&limits_config("max_connections = 2")).await;
    let _c1 = RawConn::connect(t.addr).await;
    let s = t.login().await;
    // The third is closed at once (it never gets to send a login).
    let mut c3 = RawConn::connect(t.addr).await;
    assert!(c3.closed_within(T).await.is_some());
    drop(_c1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.nop().await.unwrap();
    let s2 = t.login().await;
    s2.nop().await.unwrap();
}

async fn raw_session(t: &TestTarget, name: &str) -> RawConn {
    let mut c = RawConn::connect(t.addr).await;
    c.login(name, TARGET, &[]).await;
    // Consume the power-on unit attention.
    for _ in 0..3 {
        let itt = c.itt();
        let p = c.scsi_command(itt, &[0u8; 6], false, false, 0, Bytes::new());
        c.send(&p).await;
        let r = c.expect_reply(T).await;
        if matches!(r.bhs, Bhs::ScsiResponse(ref s) if s.status == 0) {
            break;
        }
    }
    c
}

fn status_and_sense(p: &holdfast::wire::Pdu) -> (u8, Option<(u8, u8, u8)>) {
    match &p.bhs {
        Bhs::ScsiResponse(r) => (r.status, sense_of(&p.data)),
        other => panic!("expected a SCSI Response, got {other:?}"),
    }
}

#[tokio::test]
async fn command_size_limit() {
    let t = start(&limits_config("max_command_bytes = \"1MiB\"")).await;
    let mut c = raw_session(&t, INITIATOR).await;
    for (cdb, read, write) in [
        (write16(0, 4096), false, true),
        (read16(0, 4096), true, false),
    ] {
        let itt = c.itt();
        let p = c.scsi_command(itt, &cdb, read, write, 2 << 20, Bytes::new());
        c.send(&p).await;
        let r = c.expect_reply(T).await;
        assert_eq!(status_and_sense(&r), (2, Some((5, 0x24, 0))));
    }
    // At the limit it works.
    let s = t.login().await;
    clear_unit_attention(&s, 0).await;
    s.write16(0, 0, Bytes::from(vec![1u8; 1 << 20]), BLOCK, false)
        .await
        .unwrap();
}

#[tokio::test]
async fn buffer_budget_answers_busy_and_task_set_full() {
    let t = start(&limits_config(
        "buffer_memory = \"1MiB\"\nmax_command_bytes = \"512KiB\"",
    ))
    .await;
    let mut c = raw_session(&t, INITIATOR).await;
    // Two 512 KiB writes announced, data withheld: the whole budget.
    let mut pending = Vec::new();
    for i in 0..2u64 {
        let itt = c.itt();
        let p = c.scsi_command(
            itt,
            &write16(i * 1024, 1024),
            false,
            true,
            512 << 10,
            Bytes::new(),
        );
        c.send(&p).await;
        let r = c.expect_reply(T).await;
        let Bhs::R2t(r2t) = r.bhs else {
            panic!("expected R2T, got {r:?}")
        };
        pending.push((itt, r2t));
    }
    // This session has commands outstanding: TASK SET FULL.
    let itt = c.itt();
    let p = c.scsi_command(itt, &write16(4096, 8), false, true, 4096, Bytes::new());
    c.send(&p).await;
    assert_eq!(status_and_sense(&c.expect_reply(T).await), (0x28, None));
    // Another session with nothing outstanding: BUSY.
    let mut o = t.config();
    o.initiator_name = OTHER.into();
    let s = Session::login(o).await.unwrap();
    clear_unit_attention(&s, 0).await;
    let e = s
        .write16(0, 8192, Bytes::from(vec![2u8; 4096]), BLOCK, false)
        .await
        .unwrap_err();
    assert!(matches!(e, InitiatorError::Status(0x08)), "{e}");
    // Sending the data finishes one write and returns its budget.
    let (itt, first) = pending.remove(0);
    let mut r2t = first;
    loop {
        let mut off = 0;
        let mut sn = 0;
        while off < r2t.desired_data_transfer_length {
            let n = (r2t.desired_data_transfer_length - off).min(8192);
            let last = off + n == r2t.desired_data_transfer_length;
            let mut d = c.data_out(
                itt,
                r2t.ttt,
                r2t.buffer_offset + off,
                Bytes::from(vec![4u8; n as usize]),
                last,
            );
            if let Bhs::DataOut(h) = &mut d.bhs {
                h.data_sn = sn;
            }
            c.send(&d).await;
            off += n;
            sn += 1;
        }
        let r = c.expect_reply(T).await;
        match r.bhs {
            Bhs::R2t(next) => r2t = next,
            _ => {
                assert_eq!(status_and_sense(&r), (0, None));
                break;
            }
        }
    }
    s.write16(0, 8192, Bytes::from(vec![2u8; 4096]), BLOCK, false)
        .await
        .expect("budget returned");
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// 50 connections each announce a 16 MiB write and never send the data. With the default
/// per-command limit and a 64 MiB budget, four get R2Ts and the rest BUSY; the process
/// RSS does not grow by anything like 50 × 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_writes_without_data_stay_bounded() {
    let t = start(&limits_config("buffer_memory = \"64MiB\"")).await;
    let before = rss_bytes();
    let mut conns = Vec::new();
    let (mut r2ts, mut busy) = (0, 0);
    for i in 0..50 {
        let mut c = raw_session(&t, &format!("iqn.2026-11.org.holdfast:peer{i}")).await;
        let itt = c.itt();
        let p = c.scsi_command(itt, &write16(0, 32768), false, true, 16 << 20, Bytes::new());
        c.send(&p).await;
        let r = c.expect_reply(T).await;
        match &r.bhs {
            Bhs::R2t(_) => r2ts += 1,
            Bhs::ScsiResponse(s) if s.status == 0x08 => busy += 1,
            other => panic!("{other:?}"),
        }
        conns.push(c);
    }
    let after = rss_bytes();
    let grew = after.saturating_sub(before);
    eprintln!(
        "50 connections x 16 MiB announced: R2T {r2ts}, BUSY {busy}; RSS {} -> {} MiB (+{} MiB)",
        before >> 20,
        after >> 20,
        grew >> 20
    );
    assert_eq!((r2ts, busy), (4, 46));
    assert!(grew < 96 << 20, "RSS grew by {} MiB", grew >> 20);
    // A well-behaved session still gets through once budget is free again.
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = t.login().await;
    clear_unit_attention(&s, 0).await;
    s.write16(0, 0, Bytes::from(vec![1u8; 65536]), BLOCK, false)
        .await
        .unwrap();
}
