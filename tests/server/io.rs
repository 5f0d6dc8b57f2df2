//! SCSI I/O through the initiator against an in-process target.

use crate::common;

use bytes::Bytes;
use common::*;
use holdfast::initiator::{cdb, InitiatorError, RequestError, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const LUN_BLOCKS: u64 = 64 * 1024 * 1024 / BLOCK as u64;

async fn ready_session(t: &TestTarget) -> Session {
    let s = t.login().await;
    clear_unit_attention(&s, 0).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_round_trip_32_in_flight() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let mut rng = StdRng::seed_from_u64(7);
    // Non-overlapping extents so every read has one expected content.
    let mut jobs = Vec::new();
    for i in 0..32u64 {
        let blocks = rng.gen_range(1..=64u32);
        let lba = i * 4096 + rng.gen_range(0..1000);
        let mut data = vec![0u8; (blocks * BLOCK) as usize];
        rng.fill(&mut data[..]);
        jobs.push((lba, Bytes::from(data)));
    }
    let writes: Vec<_> = jobs
        .iter()
        .map(|(lba, d)| {
            let s = s.clone();
            let (lba, d) = (*lba, d.clone());
            tokio::spawn(async move { s.write16(0, lba, d, BLOCK, false).await })
        })
        .collect();
    for w in writes {
        w.await.unwrap().expect("write");
    }
    let reads: Vec<_> = jobs
        .iter()
        .map(|(lba, d)| {
            let s = s.clone();
            let (lba, n) = (*lba, d.len() as u32 / BLOCK);
            tokio::spawn(async move { s.read16(0, lba, n, BLOCK).await })
        })
        .collect();
    for ((_, d), r) in jobs.iter().zip(reads) {
        assert_eq!(&r.await.unwrap().expect("read"), d);
    }
    s.logout().await.unwrap();
}

/// With a CmdSN window of 2, 24 concurrent commands make submitters wait for the window
/// to open again; every one of them must be woken and complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitters_wait_for_a_small_cmdsn_window() {
    let t = start(&config_text(
        "queue_depth = 2",
        "",
        &[(0, "lun0.img", "16MiB")],
    ))
    .await;
    let s = ready_session(&t).await;
    // The login response promises the default window (128); run past it first.
    for i in 0..130u64 {
        s.read16(0, i, 1, BLOCK).await.expect("read");
    }
    let reads: Vec<_> = (0..24u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.read16(0, i * 8, 8, BLOCK).await })
        })
        .collect();
    for r in reads {
        let done = tokio::time::timeout(Duration::from_secs(20), r).await;
        assert_eq!(
            done.expect("a submitter was never woken")
                .unwrap()
                .expect("read")
                .len(),
            8 * BLOCK as usize
        );
    }
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_needs_r2ts() {
    let t = start(&config_text(
        "first_burst_length = 8192\nimmediate_data = false\ninitial_r2t = true\nmax_burst_length = 262144\nmax_recv_data_segment_length = 65536",
        "",
        &[(0, "lun0.img", "64MiB")],
    ))
    .await;
    let mut c = t.config();
    c.immediate_data = false;
    c.initial_r2t = true;
    c.first_burst_length = 8192;
    let s = Session::login(c).await.unwrap();
    let n = s.negotiated().clone();
    assert!(!n.session.immediate_data && n.session.initial_r2t, "{n:?}");
    assert!(n.session.max_burst_length <= 262_144);
    clear_unit_attention(&s, 0).await;
    let mut data = vec![0u8; 4 << 20];
    StdRng::seed_from_u64(9).fill(&mut data[..]);
    let data = Bytes::from(data);
    s.write16(0, 2048, data.clone(), BLOCK, false)
        .await
        .unwrap();
    let back = s.read16(0, 2048, (4 << 20) / BLOCK, BLOCK).await.unwrap();
    assert!(back == data, "4 MiB round trip differs");
    s.logout().await.unwrap();
}

#[tokio::test]
async fn unsolicited_data_out() {
    // InitialR2T=No and ImmediateData=No: the first burst goes as unsolicited Data-Out.
    let t = start(&config_text(
        "immediate_data = false\ninitial_r2t = false\nfirst_burst_length = 65536",
        "",
        &[(0, "lun0.img", "8MiB")],
    ))
    .await;
    let mut c = t.config();
    c.immediate_data = false;
    c.initial_r2t = false;
    let s = Session::login(c).await.unwrap();
    assert!(!s.negotiated().session.initial_r2t);
    clear_unit_attention(&s, 0).await;
    let data = Bytes::from(
        (0..300 * 1024)
            .map(|i| (i * 7 % 256) as u8)
            .collect::<Vec<u8>>(),
    );
    s.write16(0, 10, data.clone(), BLOCK, true).await.unwrap();
    assert_eq!(s.read16(0, 10, 600, BLOCK).await.unwrap(), data);
}

#[tokio::test]
async fn read_capacity() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let (last, bs) = s.read_capacity16(0).await.unwrap();
    assert_eq!(bs, BLOCK);
    assert_eq!(last, LUN_BLOCKS - 1);
}

#[tokio::test]
async fn report_luns_masked_by_acl() {
    let t = start(&config_text(
        "",
        &format!("[[target.acl]]\ninitiator = \"{INITIATOR}\"\nluns = [0, 2]\n[[target.acl]]\ninitiator = \"iqn.2026-11.org.holdfast:all\"\n"),
        &[(0, "a.img", "1MiB"), (1, "b.img", "1MiB"), (2, "c.img", "1MiB")],
    ))
    .await;
    let s = ready_session(&t).await;
    assert_eq!(s.report_luns().await.unwrap(), vec![0, 2]);
    let mut c = t.config();
    c.initiator_name = "iqn.2026-11.org.holdfast:all".into();
    let all = Session::login(c).await.unwrap();
    clear_unit_attention(&all, 0).await;
    assert_eq!(all.report_luns().await.unwrap(), vec![0, 1, 2]);
    // A masked LUN is not addressable.
    let r = s
        .command(1, &cdb::test_unit_ready(), None, 0)
        .await
        .unwrap();
    assert!(r.check().is_err());
}

#[tokio::test]
async fn compare_and_write() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let old = vec![0x11u8; BLOCK as usize];
    let new = vec![0x22u8; BLOCK as usize];
    s.write16(0, 5, Bytes::from(old.clone()), BLOCK, false)
        .await
        .unwrap();
    s.compare_and_write(0, 5, &old, &new, BLOCK)
        .await
        .expect("CAW match");
    assert_eq!(s.read16(0, 5, 1, BLOCK).await.unwrap(), new);
    // Now the old content no longer matches.
    let e = s
        .compare_and_write(0, 5, &old, &new, BLOCK)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            InitiatorError::CheckCondition {
                key: 0x0e,
                asc: 0x1d,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.read16(0, 5, 1, BLOCK).await.unwrap(), new);
}

#[tokio::test]
async fn fua_write_and_sync() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let d = Bytes::from(vec![0x5au8; 8 * BLOCK as usize]);
    s.write16(0, 100, d.clone(), BLOCK, true).await.unwrap();
    s.write16(0, 200, d.clone(), BLOCK, false).await.unwrap();
    s.synchronize_cache(0).await.unwrap();
    let f = std::fs::read(t.file("lun0.img")).unwrap();
    let at = |lba: usize| &f[lba * BLOCK as usize..(lba + 8) * BLOCK as usize];
    assert_eq!(at(100), &d[..]);
    assert_eq!(at(200), &d[..]);
}

#[tokio::test]
async fn nop_round_trip() {
    let t = start_default().await;
    let s = t.login().await;
    for _ in 0..10 {
        assert!(s.nop().await.unwrap() < Duration::from_secs(5));
    }
}

#[tokio::test]
async fn lba_out_of_range() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let e = s.read16(0, LUN_BLOCKS, 1, BLOCK).await.unwrap_err();
    assert!(
        matches!(
            e,
            InitiatorError::CheckCondition {
                key: 0x05,
                asc: 0x21,
                ascq: 0x00
            }
        ),
        "{e}"
    );
    let e = s
        .write16(
            0,
            LUN_BLOCKS - 1,
            Bytes::from(vec![0u8; 2 * BLOCK as usize]),
            BLOCK,
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            InitiatorError::CheckCondition {
                key: 0x05,
                asc: 0x21,
                ascq: 0x00
            }
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_reset_during_io_does_not_hang() {
    let t = start_default().await;
    let s = ready_session(&t).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..16u64)
        .map(|w| {
            let s = s.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let d = Bytes::from(vec![w as u8; 64 * 1024]);
                let mut done = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match s.write16(0, w * 1024, d.clone(), BLOCK, false).await {
                        Ok(()) => done += 1,
                        // Aborted by the reset, or UNIT ATTENTION after it: both expected.
                        Err(InitiatorError::Request(RequestError::Aborted))
                        | Err(InitiatorError::CheckCondition { .. }) => {}
                        Err(e) => panic!("worker {w}: {e}"),
                    }
                }
                done
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = tokio::time::timeout(Duration::from_secs(20), s.lun_reset(0))
        .await
        .expect("LUN reset answers")
        .unwrap();
    assert_eq!(resp, 0, "function complete");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("worker finishes")
            .unwrap();
    }
    clear_unit_attention(&s, 0).await;
    s.nop().await.unwrap();
    s.write16(0, 0, Bytes::from(vec![1u8; BLOCK as usize]), BLOCK, false)
        .await
        .unwrap();
}
