//! Backend faults: ENOSPC on a full file system, EIO from the store, a store that is gone.
//! A write that did not land never gets GOOD; a dead store takes only its own LUN offline.

use crate::common;

use bytes::Bytes;
use common::hooked::{Hook, Hooked, Op};
use common::*;
use holdfast::initiator::{InitiatorError, Session};
use holdfast::scsi::backend::BlockBackend;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// What the fault-injecting backend does.
const HEALTHY: u8 = 0;
/// EIO for any access touching `BAD_RANGE`; also for every flush.
const BAD_SECTORS: u8 = 1;
/// Every call fails with ENODEV (the device is gone).
const GONE: u8 = 2;
/// Every call fails with EIO.
const ALL_EIO: u8 = 3;
/// Every call times out (a network store, such as RBD, that does not answer).
const TIMING_OUT: u8 = 4;

const BAD_RANGE: std::ops::Range<u64> = (1 << 20)..((1 << 20) + 65536);

/// The fault switch of one LUN.
#[derive(Debug)]
struct Faulty(Arc<AtomicU8>);

impl Hook for Faulty {
    fn before(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        match self.0.load(Ordering::SeqCst) {
            BAD_SECTORS if op == Op::Flush => Err(io::Error::from_raw_os_error(libc::EIO)),
            BAD_SECTORS if offset < BAD_RANGE.end && offset + len > BAD_RANGE.start => {
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            GONE => Err(io::Error::from_raw_os_error(libc::ENODEV)),
            ALL_EIO => Err(io::Error::from_raw_os_error(libc::EIO)),
            TIMING_OUT => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            _ => Ok(()),
        }
    }
}

/// Start a target with LUNs 0, 1, 2; LUN 0 and LUN 2 get fault switches.
async fn faulty_target() -> (TestTarget, Arc<AtomicU8>, Arc<AtomicU8>) {
    let m0 = Arc::new(AtomicU8::new(HEALTHY));
    let m2 = Arc::new(AtomicU8::new(HEALTHY));
    let (a, b) = (m0.clone(), m2.clone());
    let wrap = move |p: &Path, inner: Arc<dyn BlockBackend>| -> Arc<dyn BlockBackend> {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mode = match name {
            "lun0.img" => a.clone(),
            "lun2.img" => b.clone(),
            _ => return inner,
        };
        Arc::new(Hooked {
            inner,
            hook: Faulty(mode),
        })
    };
    let t = start_wrapped(
        &config_text(
            "",
            "",
            &[
                (0, "lun0.img", "4MiB"),
                (1, "lun1.img", "4MiB"),
                (2, "lun2.img", "4MiB"),
            ],
        ),
        &wrap,
    )
    .await;
    (t, m0, m2)
}

fn sense(e: &InitiatorError) -> (u8, u8, u8) {
    match e {
        InitiatorError::CheckCondition { key, asc, ascq } => (*key, *asc, *ascq),
        other => panic!("expected CHECK CONDITION, got {other}"),
    }
}

async fn ready(t: &TestTarget) -> Session {
    let s = t.login().await;
    for lun in 0..3 {
        clear_unit_attention(&s, lun).await;
    }
    s
}

fn blocks(fill: u8, n: usize) -> Bytes {
    Bytes::from(vec![fill; n * BLOCK as usize])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_is_a_medium_error_and_never_an_acknowledged_write() {
    let (t, m0, _) = faulty_target().await;
    let s = ready(&t).await;
    s.write16(0, 0, blocks(1, 64), BLOCK, true).await.unwrap();
    m0.store(BAD_SECTORS, Ordering::SeqCst);
    let bad_lba = BAD_RANGE.start / BLOCK as u64;
    // A write into the bad range: MEDIUM ERROR / WRITE ERROR, not GOOD.
    let e = s
        .write16(0, bad_lba - 4, blocks(2, 8), BLOCK, false)
        .await
        .unwrap_err();
    assert_eq!(sense(&e), (3, 0x0c, 0x00));
    // A read of it: MEDIUM ERROR / UNRECOVERED READ ERROR.
    let e = s.read16(0, bad_lba, 8, BLOCK).await.unwrap_err();
    assert_eq!(sense(&e), (3, 0x11, 0x00));
    // A FUA write whose flush fails is not acknowledged; neither is SYNCHRONIZE CACHE.
    let e = s
        .write16(0, 100, blocks(3, 8), BLOCK, true)
        .await
        .unwrap_err();
    assert_eq!(sense(&e), (3, 0x0c, 0x00));
    let e = s.synchronize_cache(0).await.unwrap_err();
    assert_eq!(sense(&e), (3, 0x0c, 0x00));
    // Elsewhere the LU keeps working and the acknowledged data is intact.
    s.write16(0, 200, blocks(4, 8), BLOCK, false).await.unwrap();
    assert_eq!(s.read16(0, 0, 64, BLOCK).await.unwrap(), blocks(1, 64));
    assert_eq!(s.read16(0, 200, 8, BLOCK).await.unwrap(), blocks(4, 8));
    s.test_unit_ready(0).await.unwrap();
    m0.store(HEALTHY, Ordering::SeqCst);
    s.synchronize_cache(0).await.unwrap();
    s.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_takes_only_its_lun_offline() {
    let (t, m0, m2) = faulty_target().await;
    let s = ready(&t).await;
    // ENODEV: the device is gone; the LU goes offline at the first error.
    m0.store(GONE, Ordering::SeqCst);
    let e = s
        .write16(0, 0, blocks(1, 8), BLOCK, false)
        .await
        .unwrap_err();
    assert_eq!(
        sense(&e),
        (2, 0x04, 0x03),
        "NOT READY, MANUAL INTERVENTION REQUIRED"
    );
    // It stays offline even if the store answers again (until a restart re-opens it).
    m0.store(HEALTHY, Ordering::SeqCst);
    let e = s.read16(0, 0, 8, BLOCK).await.unwrap_err();
    assert_eq!(sense(&e), (2, 0x04, 0x03));
    let e = s.test_unit_ready(0).await.unwrap_err();
    assert_eq!(sense(&e), (2, 0x04, 0x03));
    // It can still be identified and is still listed.
    s.inquiry(0, false, 0, 96)
        .await
        .expect("INQUIRY on an offline LU");
    assert_eq!(s.report_luns().await.unwrap(), vec![0, 1, 2]);
    // Persistent EIO: a run of errors with no success in between takes LUN 2 offline.
    m2.store(ALL_EIO, Ordering::SeqCst);
    let mut senses = Vec::new();
    for i in 0..holdfast::scsi::lun::OFFLINE_AFTER_ERRORS {
        let e = s.read16(2, i as u64, 1, BLOCK).await.unwrap_err();
        // A TEST UNIT READY poll in between does not reset the count.
        let _ = s.test_unit_ready(2).await;
        senses.push(sense(&e));
    }
    assert!(
        senses[..senses.len() - 1]
            .iter()
            .all(|s| *s == (3, 0x11, 0)),
        "{senses:?}"
    );
    assert_eq!(*senses.last().unwrap(), (2, 0x04, 0x03));
    // LUN 1 never noticed.
    s.write16(1, 0, blocks(9, 16), BLOCK, true).await.unwrap();
    assert_eq!(s.read16(1, 0, 16, BLOCK).await.unwrap(), blocks(9, 16));
    s.logout().await.unwrap();
}

/// A store that stops answering (librados' ETIMEDOUT) for longer than a run of errors
/// that would take a LU offline: every command gets the retryable NOT READY 04/01, never
/// MEDIUM ERROR, and the LU serves again as soon as the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_answer_is_not_ready_and_never_takes_the_lun_offline() {
    let (t, m0, _) = faulty_target().await;
    let s = ready(&t).await;
    s.write16(0, 0, blocks(1, 8), BLOCK, false).await.unwrap();
    m0.store(TIMING_OUT, Ordering::SeqCst);
    for i in 0..3 * holdfast::scsi::lun::OFFLINE_AFTER_ERRORS as u64 {
        let e = match i % 2 {
            0 => s.read16(0, i, 1, BLOCK).await.unwrap_err(),
            _ => s
                .write16(0, 8 + i, blocks(2, 1), BLOCK, true)
                .await
                .unwrap_err(),
        };
        assert_eq!(sense(&e), (2, 0x04, 0x01), "command {i}");
    }
    m0.store(HEALTHY, Ordering::SeqCst);
    s.test_unit_ready(0).await.expect("online again");
    assert_eq!(s.read16(0, 0, 8, BLOCK).await.unwrap(), blocks(1, 8));
    s.write16(0, 100, blocks(3, 8), BLOCK, true).await.unwrap();
    s.logout().await.unwrap();
}

/// ENOSPC on a real full file system (a 2 MiB tmpfs holding a 64 MiB sparse LUN): every
/// write that could not allocate fails with DATA PROTECT / SPACE ALLOCATION FAILED WRITE
/// PROTECT (27/07), every write that got GOOD reads back, and the LU stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_is_space_allocation_failed_and_acknowledged_writes_landed() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP enospc test: needs root to mount a small tmpfs");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "holdfast-enospc"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP enospc test: mount -t tmpfs failed (no CAP_SYS_ADMIN in this container?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let lun = mnt.path().join("big.img");
    let text = config_text("", "", &[(0, lun.to_str().unwrap(), "64MiB")]);
    let t = start(&text).await;
    let s = ready(&t).await;
    let chunk = 128; // blocks = 64 KiB
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..64u64 {
        let data = blocks((i % 250) as u8 + 1, chunk);
        match s
            .write16(0, i * chunk as u64, data.clone(), BLOCK, false)
            .await
        {
            Ok(()) => acked.push((i, data)),
            Err(e) => {
                failure = Some(sense(&e));
                break;
            }
        }
    }
    eprintln!(
        "ENOSPC after {} acknowledged 64 KiB writes ({} KiB) on a 2 MiB tmpfs: sense {:x?}",
        acked.len(),
        acked.len() * 64,
        failure
    );
    assert_eq!(
        failure,
        Some((7, 0x27, 0x07)),
        "SPACE ALLOCATION FAILED WRITE PROTECT"
    );
    // Every acknowledged write is there.
    for (i, data) in &acked {
        let back = s
            .read16(0, i * chunk as u64, chunk as u32, BLOCK)
            .await
            .unwrap();
        assert!(back == *data, "acknowledged write {i} did not land");
    }
    // Out of space is not a dead device: overwriting allocated blocks still works.
    s.write16(0, 0, blocks(0xee, 8), BLOCK, true).await.unwrap();
    s.test_unit_ready(0).await.unwrap();
    s.logout().await.unwrap();
}
