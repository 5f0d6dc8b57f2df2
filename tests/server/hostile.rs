//! Hostile peers over real sockets: each test does one bad thing with a raw PDU peer,
//! checks the RFC 7143 reaction, and checks that a well-behaved session doing I/O at the
//! same time keeps succeeding without stalls.

use crate::common;

use bytes::Bytes;
use common::raw::{read16, sense_of, write16, RawConn, Recv};
use common::*;
use holdfast::wire::{reject_reason, Bhs, Pdu, RESERVED_TAG};
use std::time::Duration;

/// Small timeouts so the slow-peer cases finish in seconds.
const ISCSI: &str = "max_recv_data_segment_length = 8192\nnop_interval_secs = 1\nnop_timeout_secs = 1\nlogin_timeout_secs = 2";
const STALL: Duration = Duration::from_secs(3);
const T: Duration = Duration::from_secs(5);

async fn target() -> TestTarget {
    start(&config_text(ISCSI, "", &[(0, "lun0.img", "16MiB")])).await
}

async fn logged_in(t: &TestTarget, extra: &[(&str, &str)]) -> RawConn {
    let mut c = RawConn::connect(t.addr).await;
    c.login("iqn.2026-11.org.holdfast:hostile", TARGET, extra)
        .await;
    // The first command of a fresh nexus may meet the power-on unit attention; a NOP
    // proves the session is in the full feature phase.
    c.ping().await;
    c
}

fn reject_reason_of(p: &Pdu) -> Option<u8> {
    match &p.bhs {
        Bhs::Reject(r) => Some(r.reason),
        _ => None,
    }
}

fn response_of(p: &Pdu) -> (u32, u8, Option<(u8, u8, u8)>) {
    match &p.bhs {
        Bhs::ScsiResponse(r) => (r.itt, r.status, sense_of(&p.data)),
        other => panic!("expected a SCSI Response, got {other:?}"),
    }
}

/// Read a SCSI response for `itt`, skipping nothing else.
async fn scsi_status(c: &mut RawConn, itt: u32) -> (u8, Option<(u8, u8, u8)>) {
    loop {
        let p = c.expect_reply(T).await;
        match &p.bhs {
            Bhs::DataIn(d) if d.itt == itt && d.status_present => return (d.status, None),
            Bhs::DataIn(_) => continue,
            _ => {
                let (i, st, sense) = response_of(&p);
                assert_eq!(i, itt);
                return (st, sense);
            }
        }
    }
}

/// Clear the power-on unit attention of a raw session.
async fn clear_ua(c: &mut RawConn) {
    for _ in 0..3 {
        let itt = c.itt();
        let p = c.scsi_command(itt, &[0u8; 6], false, false, 0, Bytes::new());
        c.send(&p).await;
        if scsi_status(c, itt).await.0 == 0 {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_pdus_then_close() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    // Half a BHS during login.
    let mut c = RawConn::connect(t.addr).await;
    let req = c.login_request(&[("InitiatorName", "iqn.2026-11.x:a")], 1, 3, true);
    let bytes = c.encode(&req);
    c.send_raw(&bytes[..20]).await;
    drop(c);
    // A whole header promising data that never comes, in the full feature phase.
    let mut c = logged_in(&t, &[]).await;
    let itt = c.itt();
    let p = c.scsi_command(
        itt,
        &write16(0, 8),
        false,
        true,
        4096,
        Bytes::from(vec![7u8; 4096]),
    );
    let bytes = c.encode(&p);
    c.send_raw(&bytes[..48 + 100]).await;
    drop(c);
    // The target still serves new logins.
    let mut c = logged_in(&t, &[]).await;
    c.ping().await;
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_data_segment_drops_the_connection() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[]).await;
    let itt = c.itt();
    // 64 KiB of immediate data against a declared MaxRecvDataSegmentLength of 8192: only
    // the header is sent; the target must refuse before waiting for (buffering) the data.
    let p = c.scsi_command(
        itt,
        &write16(0, 128),
        false,
        true,
        65536,
        Bytes::from(vec![1u8; 65536]),
    );
    let bytes = c.encode(&p);
    c.send_raw(&bytes[..48]).await;
    assert!(c.closed_within(T).await.is_some(), "connection not dropped");
    // During login the limit is 64 KiB: a 1 MiB login text is refused the same way.
    let mut c = RawConn::connect(t.addr).await;
    let mut req = c.login_request(&[("InitiatorName", "iqn.2026-11.x:a")], 1, 3, true);
    req.data = Bytes::from(vec![b'a'; 1 << 20]);
    let bytes = c.encode(&req);
    c.send_raw(&bytes[..48]).await;
    assert!(
        c.closed_within(T).await.is_some(),
        "login connection not dropped"
    );
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_digest_error_drops_the_connection() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[("HeaderDigest", "CRC32C")]).await;
    assert!(c.digests.header, "header digest negotiated");
    let (_, p) = c.nop_out();
    let mut bytes = c.encode(&p);
    bytes[48] ^= 0xff; // first byte of the header digest
    c.send_raw(&bytes).await;
    assert!(c.closed_within(T).await.is_some(), "connection not dropped");
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_digest_error_rejects_and_fails_the_command() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 4096).await;
    let mut c = logged_in(
        &t,
        &[
            ("DataDigest", "CRC32C"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
        ],
    )
    .await;
    assert!(c.digests.data, "data digest negotiated");
    clear_ua(&mut c).await;
    // 1. Immediate data with a bad digest: Reject (0x02), then the command fails.
    let itt = c.itt();
    let p = c.scsi_command(
        itt,
        &write16(0, 1),
        false,
        true,
        512,
        Bytes::from(vec![9u8; 512]),
    );
    let mut bytes = c.encode(&p);
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    c.send_raw(&bytes).await;
    let r = c.expect_reply(T).await;
    assert_eq!(
        reject_reason_of(&r),
        Some(reject_reason::DATA_DIGEST_ERROR),
        "{r:?}"
    );
    let (st, sense) = scsi_status(&mut c, itt).await;
    assert_eq!((st, sense), (2, Some((0x0b, 0x47, 0x05))));
    // 2. A solicited Data-Out with a bad digest: Reject, the write fails.
    let itt = c.itt();
    let p = c.scsi_command(itt, &write16(8, 8), false, true, 4096, Bytes::new());
    c.send(&p).await;
    let r2t = c.expect_reply(T).await;
    let Bhs::R2t(r2t) = r2t.bhs else {
        panic!("expected R2T, got {r2t:?}")
    };
    let d = c.data_out(itt, r2t.ttt, 0, Bytes::from(vec![3u8; 4096]), true);
    let mut bytes = c.encode(&d);
    let n = bytes.len();
    bytes[n - 2] ^= 0x55;
    c.send_raw(&bytes).await;
    let r = c.expect_reply(T).await;
    assert_eq!(
        reject_reason_of(&r),
        Some(reject_reason::DATA_DIGEST_ERROR),
        "{r:?}"
    );
    let (st, sense) = scsi_status(&mut c, itt).await;
    assert_eq!((st, sense), (2, Some((0x0b, 0x47, 0x01))));
    // The connection survives and the medium was not touched.
    c.ping().await;
    let itt = c.itt();
    let p = c.scsi_command(itt, &read16(0, 16), true, false, 8192, Bytes::new());
    c.send(&p).await;
    let mut data = Vec::new();
    loop {
        let p = c.expect_reply(T).await;
        match &p.bhs {
            Bhs::DataIn(d) => {
                data.extend_from_slice(&p.data);
                if d.status_present {
                    assert_eq!(d.status, 0);
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        data.iter().all(|b| *b == 0),
        "a failed write reached the medium"
    );
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_window_cmdsn_is_ignored() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[]).await;
    let good = c.cmd_sn;
    // Far ahead of MaxCmdSN and behind ExpCmdSN: silently ignored, nothing allocated
    // (a 16 MiB write would get an R2T if it had been admitted).
    for sn in [good.wrapping_add(100_000), good.wrapping_sub(3)] {
        c.cmd_sn = sn;
        let itt = c.itt();
        let p = c.scsi_command(itt, &write16(0, 32768), false, true, 16 << 20, Bytes::new());
        c.send(&p).await;
        let (_, nop) = c.nop_out();
        c.send(&nop).await;
    }
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        match c.recv(Duration::from_millis(300)).await {
            Recv::Silent => {}
            Recv::Pdu(p) => match &p.bhs {
                Bhs::NopIn(n) if n.itt == RESERVED_TAG => c.nop_answer(n.ttt).await,
                other => panic!("an out-of-window command was answered: {other:?}"),
            },
            Recv::Closed => panic!("connection dropped"),
        }
    }
    // The session goes on at the right CmdSN.
    c.cmd_sn = good;
    c.ping().await;
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_itt_and_ttt_are_rejected() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[("ImmediateData", "Yes"), ("InitialR2T", "No")]).await;
    clear_ua(&mut c).await;
    // A write waiting for its data is an active task ...
    let itt = c.itt();
    let p = c.scsi_command(itt, &write16(16, 8), false, true, 4096, Bytes::new());
    c.send(&p).await;
    let Bhs::R2t(r2t) = c.expect_reply(T).await.bhs else {
        panic!("expected R2T")
    };
    // ... so a new command with its ITT is rejected.
    let dup = c.scsi_command(itt, &read16(0, 1), true, false, 512, Bytes::new());
    c.send(&dup).await;
    let r = c.expect_reply(T).await;
    assert_eq!(
        reject_reason_of(&r),
        Some(reject_reason::TASK_IN_PROGRESS),
        "{r:?}"
    );
    // Data-Out for a task that does not exist: Reject, nothing else.
    let d = c.data_out(0xdead, 0x1234, 0, Bytes::from(vec![1u8; 512]), true);
    c.send(&d).await;
    let r = c.expect_reply(T).await;
    assert_eq!(
        reject_reason_of(&r),
        Some(reject_reason::PROTOCOL_ERROR),
        "{r:?}"
    );
    // The original write still completes with its real TTT.
    let d = c.data_out(itt, r2t.ttt, 0, Bytes::from(vec![5u8; 4096]), true);
    c.send(&d).await;
    assert_eq!(scsi_status(&mut c, itt).await, (0, None));
    // A known task with a TTT we never issued: Reject, and the task fails.
    let itt = c.itt();
    let p = c.scsi_command(itt, &write16(24, 8), false, true, 4096, Bytes::new());
    c.send(&p).await;
    let Bhs::R2t(r2t) = c.expect_reply(T).await.bhs else {
        panic!("expected R2T")
    };
    let d = c.data_out(itt, r2t.ttt ^ 0x5555, 0, Bytes::from(vec![5u8; 4096]), true);
    c.send(&d).await;
    let r = c.expect_reply(T).await;
    assert_eq!(
        reject_reason_of(&r),
        Some(reject_reason::PROTOCOL_ERROR),
        "{r:?}"
    );
    let (st, sense) = scsi_status(&mut c, itt).await;
    assert_eq!(st, 2);
    assert_eq!(sense.map(|s| s.0), Some(0x0b));
    c.ping().await;
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_illegal_or_repeated_keys() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    // Illegal values are answered with Reject and the login goes on.
    let mut c = RawConn::connect(t.addr).await;
    let keys = c
        .login(
            "iqn.2026-11.org.holdfast:hostile",
            TARGET,
            &[
                ("MaxBurstLength", "100"),
                ("ErrorRecoveryLevel", "7"),
                ("DataDigest", "MD5"),
            ],
        )
        .await;
    let get = |k: &str| keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
    assert_eq!(get("MaxBurstLength"), Some("Reject"), "{keys:?}");
    assert_eq!(get("ErrorRecoveryLevel"), Some("Reject"), "{keys:?}");
    assert!(
        matches!(get("DataDigest"), Some("Reject") | Some("None")),
        "{keys:?}"
    );
    c.ping().await;
    // A key given twice fails the login with 0x0200 INITIATOR ERROR and ends it.
    let mut c = RawConn::connect(t.addr).await;
    let (r, _) = c
        .login_once(&[
            ("InitiatorName", "iqn.2026-11.org.holdfast:hostile"),
            ("TargetName", TARGET),
            ("MaxBurstLength", "4096"),
            ("MaxBurstLength", "8192"),
        ])
        .await;
    assert_eq!((r.status_class, r.status_detail), (2, 0));
    assert!(c.closed_within(T).await.is_some());
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_login_is_dropped_at_login_timeout() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let c = RawConn::connect(t.addr).await;
    let req = c.login_request(&[("InitiatorName", "iqn.2026-11.x:slow")], 1, 3, true);
    let bytes = c.encode(&req);
    let (mut rd, mut wr) = c.stream.into_split();
    // One byte a second: the BHS alone would take 48 s.
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for byte in bytes.iter() {
            if wr.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let t0 = std::time::Instant::now();
    let mut scratch = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        loop {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slow login not dropped");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "dropped after {took:?}, login_timeout_secs = 2"
    );
    trickle.abort();
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_is_pinged_then_dropped() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[]).await;
    // The peer goes silent: it neither reads nor answers.
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // What the target sent meanwhile: a NOP-In ping (reserved ITT), then the close.
    match c.recv(Duration::from_secs(1)).await {
        Recv::Pdu(p) => match p.bhs {
            Bhs::NopIn(n) => {
                assert_eq!(n.itt, RESERVED_TAG);
                assert_ne!(n.ttt, RESERVED_TAG, "a ping asks for an answer");
            }
            other => panic!("expected a NOP-In ping, got {other:?}"),
        },
        other => panic!("expected a NOP-In ping, got {other:?}"),
    }
    let closed = c.closed_within(Duration::from_secs(3)).await;
    assert!(closed.is_some(), "silent peer not dropped");
    assert!(t0.elapsed() < Duration::from_secs(7));
    // A peer that answers pings stays (same settings, same time).
    let mut c = logged_in(&t, &[]).await;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(3500) {
        match c.recv(Duration::from_millis(200)).await {
            Recv::Pdu(p) => match p.bhs {
                Bhs::NopIn(n) if n.itt == RESERVED_TAG => c.nop_answer(n.ttt).await,
                other => panic!("{other:?}"),
            },
            Recv::Silent => {}
            Recv::Closed => panic!("a peer answering pings was dropped"),
        }
    }
    c.ping().await;
    b.finish(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_dropped() {
    let t = target().await;
    let b = Bystander::start(&t, 0, 0).await;
    let mut c = logged_in(&t, &[]).await;
    clear_ua(&mut c).await;
    // Keep asking for 64 KiB reads without reading anything: the socket fills up, the
    // target's writes block, and the connection is dropped after nop_timeout instead of
    // queueing responses without bound.
    let mut dropped = false;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        let itt = c.itt();
        let p = c.scsi_command(itt, &read16(0, 128), true, false, 65536, Bytes::new());
        let bytes = c.encode(&p);
        use tokio::io::AsyncWriteExt;
        match tokio::time::timeout(Duration::from_millis(500), c.stream.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                dropped = true;
                break;
            }
            Err(_) => {
                // Our own send buffer is full too; wait for the target to give up.
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if !dropped {
        dropped = c.closed_within(Duration::from_secs(15)).await.is_some();
    }
    assert!(dropped, "a peer that never reads was not dropped");
    b.finish(STALL).await;
}
