//! An OSD dies under a gateway's writes: I/O stalls until Ceph marks the OSD down and
//! its placement groups re-peer (pool size 2, min_size 1), then goes on; every write the
//! gateway acknowledged is in the image. A cluster of its own (ceph_fixture::OwnCluster),
//! so the shared one's tests never see the outage.

use crate::ceph_fixture::{OwnCluster, POOL};
use crate::common::{self, BLOCK, TARGET};
use bytes::Bytes;
use std::time::{Duration, Instant};

const MIB: u64 = 64;
/// One write per RBD object (4 MiB), cycling over the image, so every placement group
/// the image uses (and with it the killed OSD) is written.
const STRIDE_BLOCKS: u64 = (4 << 20) / BLOCK as u64;
const OBJECTS: u64 = MIB / 4;

fn block(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8; BLOCK as usize];
    b[..8].copy_from_slice(&i.to_be_bytes());
    b
}

/// Write number `i` lands at the start of object `i % OBJECTS`, one block further on
/// every round, so no write overwrites another.
fn lba(i: u64) -> u64 {
    (i % OBJECTS) * STRIDE_BLOCKS + i / OBJECTS
}

fn kill_osd(c: &OwnCluster, id: u32) {
    let pid = std::fs::read_to_string(c.dir.join(format!("run/osd.{id}.pid"))).expect("osd pid");
    let pid = pid.trim().parse::<i32>().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the OSD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_osd_killed_under_writes_stalls_them_and_none_is_lost() {
    let c = OwnCluster::start("osd");
    let spec = format!("{POOL}/osd");
    c.rbd(&["create", "--size", &format!("{MIB}M"), &spec]);
    let cfg = format!(
        "data_dir = \"data\"\n[ceph]\nconf = \"{}\"\nclient = \"client.holdfast\"\n\
         [[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"127.0.0.17:0\"\n\
         [[target.lun]]\nid = 0\nrbd = \"{spec}\"\nsize = \"{MIB}MiB\"\n",
        c.conf().display()
    );
    let t = common::start(&cfg).await;
    let s = t.login().await;
    common::clear_unit_attention(&s, 0).await;

    let (before, after) = (64u64, 192u64);
    let mut slowest = (Duration::ZERO, 0);
    for i in 0..before + after {
        if i == before {
            kill_osd(&c, 0);
        }
        let t0 = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(90),
            s.write16(0, lba(i), Bytes::from(block(i)), BLOCK, false),
        )
        .await
        .unwrap_or_else(|_| panic!("write {i} got no answer in 90 s"))
        .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        slowest = slowest.max((t0.elapsed(), i));
    }
    eprintln!(
        "OSD 0 killed before write {before}: the slowest write was #{} ({:?})",
        slowest.1, slowest.0
    );

    // The outage was real: the monitor has marked OSD 0 down by now.
    let dump = std::process::Command::new("ceph")
        .arg("-c")
        .arg(c.conf())
        .args(["osd", "dump", "--format", "json"])
        .output()
        .expect("ceph osd dump");
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("osd dump json");
    let osd0 = dump["osds"]
        .as_array()
        .and_then(|v| v.iter().find(|o| o["osd"] == 0))
        .expect("osd.0 in the map");
    assert_eq!(osd0["up"], 0, "OSD 0 is down: {osd0}");

    // Straight from RADOS (through the surviving replicas), not through the gateway.
    let out = c.dir.join("export");
    c.rbd(&[
        "export",
        "--no-progress",
        &spec,
        out.to_str().expect("path"),
    ]);
    let image = std::fs::read(&out).expect("export");
    for i in 0..before + after {
        let at = (lba(i) * u64::from(BLOCK)) as usize;
        assert_eq!(
            &image[at..at + BLOCK as usize],
            &block(i)[..],
            "acknowledged write {i} is not in the image"
        );
    }
}
