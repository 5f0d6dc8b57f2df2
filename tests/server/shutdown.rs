//! Graceful shutdown (the SIGTERM path) with commands in flight: serve() returns and
//! every acknowledged write is in the backing file.

use crate::common;

use bytes::Bytes;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_commands_in_flight_keeps_acknowledged_writes() {
    let mut t = start_default().await;
    let s = t.login().await;
    clear_unit_attention(&s, 0).await;
    // (lba, fill byte) of every acknowledged write; each writer owns its LBAs.
    let acked: Arc<Mutex<Vec<(u64, u8)>>> = Arc::default();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let s = s.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0..10_000u64 {
                    let lba = w * 100_000 + i * 8;
                    let fill = (1 + (w * 31 + i) % 255) as u8;
                    let d = Bytes::from(vec![fill; 8 * BLOCK as usize]);
                    match s.write16(0, lba, d, BLOCK, i % 2 == 0).await {
                        Ok(()) => acked.lock().unwrap().push((lba, fill)),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.shutdown().await;
    for w in writers {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("writers see the connection end")
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "some writes completed before shutdown");
    let f = std::fs::read(t.file("lun0.img")).unwrap();
    for (lba, fill) in &acked {
        let off = *lba as usize * BLOCK as usize;
        assert!(
            f[off..off + 8 * BLOCK as usize].iter().all(|b| b == fill),
            "acknowledged write at LBA {lba} is missing"
        );
    }
    assert!(s.is_closed() || s.nop().await.is_err());
}
