//! Two `holdfast target` gateways (separate processes, so separate Ceph clients) serving
//! one RBD image: one disk with two paths. Identical device identity, distinct relative
//! port ids and target port groups, and ALUA states that follow the image's exclusive
//! lock as writes move it. The cluster is ceph_fixture.rs's throwaway one.

use crate::ceph_fixture::{image, rbd};
use crate::common::metrics::{samples, scrape, value};
use crate::common::{clear_unit_attention, BLOCK, TARGET};
use crate::rbd_gateway::{Gateway, GatewayConfig};
use bytes::Bytes;
use holdfast::initiator::{InitiatorConfig, InitiatorError, Session};
use std::path::Path;
use std::time::{Duration, Instant};

const AO: u8 = 0;
const ANO: u8 = 1;

/// Gateway `group` (tpgt = port group = `group`) of `spec` on `ip`, `peer` the other.
async fn start_gateway(spec: &str, group: u16, peer: u16, ip: &str) -> Gateway {
    Gateway::with(&GatewayConfig {
        ip,
        tpgt: group,
        spec,
        mib: 16,
        notify_timeout: None,
        alua_peer: Some(peer),
    })
    .await
}

async fn login(g: &Gateway) -> Session {
    let mut cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:multipath-host", TARGET, g.portal);
    cfg.login_timeout = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = Session::login(cfg.clone()).await {
            clear_unit_attention(&s, 0).await;
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway {} did not come up: {}",
            g.portal,
            g.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Designators of VPD page 0x83 as (association, type, value).
async fn designators(s: &Session) -> Vec<(u8, u8, Vec<u8>)> {
    let page = s.inquiry(0, true, 0x83, 1024).await.expect("VPD 0x83");
    let mut at = 4;
    let mut v = Vec::new();
    while at + 4 <= page.len() {
        let len = usize::from(page[at + 3]);
        let value = page[at + 4..(at + 4 + len).min(page.len())].to_vec();
        v.push(((page[at + 1] >> 4) & 3, page[at + 1] & 0x0F, value));
        at += 4 + len;
    }
    v
}

/// The 16-bit value of the target-port designator of `kind` (4: relative port, 5: group).
fn port_designator(d: &[(u8, u8, Vec<u8>)], kind: u8) -> u16 {
    let (_, _, v) = d
        .iter()
        .find(|(assoc, t, _)| *assoc == 1 && *t == kind)
        .unwrap_or_else(|| panic!("no designator of type {kind}: {d:?}"));
    u16::from_be_bytes([v[2], v[3]])
}

/// REPORT TARGET PORT GROUPS: (group, state, relative port ids), in the reported order.
async fn port_groups(s: &Session) -> Vec<(u16, u8, Vec<u16>)> {
    let cdb = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let r = s.command(0, &cdb, None, 1024).await.expect("RTPG");
    assert_eq!(r.status, 0, "RTPG status, sense {:?}", r.sense);
    let d = &r.data;
    let mut at = 4;
    let mut v = Vec::new();
    while at + 8 <= d.len() {
        let n = usize::from(d[at + 7]);
        let ports = (0..n)
            .map(|i| u16::from_be_bytes([d[at + 10 + 4 * i], d[at + 11 + 4 * i]]))
            .collect();
        v.push((
            u16::from_be_bytes([d[at + 2], d[at + 3]]),
            d[at] & 0x0F,
            ports,
        ));
        at += 8 + 4 * n;
    }
    v
}

/// What both gateways report once the lock is where `optimized` says (retrying while a
/// lock handover is still under way).
async fn expect_states(a: &Session, b: &Session, optimized: u16) {
    let other = 3 - optimized;
    let want = |g: u16| if g == optimized { AO } else { ANO };
    let want = vec![(1, want(1), vec![1]), (2, want(2), vec![2])];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ra, rb) = (port_groups(a).await, port_groups(b).await);
        if ra == want && rb == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group {optimized} optimized, {other} not: gateway 1 says {ra:?}, gateway 2 {rb:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn write(s: &Session, seed: u8) {
    s.write16(0, 8, Bytes::from(vec![seed; 4096]), BLOCK, true)
        .await
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_are_one_disk_whose_optimized_path_follows_the_lock() {
    let spec = image("multipath", 16);
    let ga = start_gateway(&spec, 1, 2, "127.0.0.13").await;
    let gb = start_gateway(&spec, 2, 1, "127.0.0.14").await;
    let (a, b) = (login(&ga).await, login(&gb).await);

    // One disk: the same serial, NAA and T10 vendor id through both gateways.
    let serial = |p: Bytes| p[4..].to_vec();
    let sa = serial(a.inquiry(0, true, 0x80, 255).await.expect("VPD 0x80"));
    assert!(!sa.is_empty());
    assert_eq!(
        sa,
        serial(b.inquiry(0, true, 0x80, 255).await.expect("VPD 0x80"))
    );
    let (da, db) = (designators(&a).await, designators(&b).await);
    let lu = |d: &[(u8, u8, Vec<u8>)]| d.iter().filter(|x| x.0 == 0).cloned().collect::<Vec<_>>();
    assert!(lu(&da).iter().any(|(_, t, _)| *t == 3), "an NAA: {da:?}");
    assert_eq!(lu(&da), lu(&db));
    let inq_a = a.inquiry(0, false, 0, 96).await.expect("INQUIRY");
    let inq_b = b.inquiry(0, false, 0, 96).await.expect("INQUIRY");
    assert_eq!(inq_a, inq_b);
    assert_eq!(inq_a[5] & 0x30, 0x10, "implicit ALUA (TPGS = 01b)");
    // Two paths: distinct relative target ports and port groups.
    assert_eq!((port_designator(&da, 4), port_designator(&da, 5)), (1, 1));
    assert_eq!((port_designator(&db, 4), port_designator(&db, 5)), (2, 2));

    // Nobody wrote yet, so nobody holds the lock: both point at the lowest group.
    expect_states(&a, &b, 1).await;
    // A write through gateway 2 takes the lock there, and the optimized state with it.
    write(&b, 1).await;
    expect_states(&a, &b, 2).await;
    // ...and a write through gateway 1 moves both back (the implicit transition).
    write(&a, 2).await;
    expect_states(&a, &b, 1).await;
    // A SYNCHRONIZE CACHE through the non-optimized path leaves the lock where it is
    // (every acknowledged write is already in RADOS; librbd's flush would take the lock).
    b.synchronize_cache(0)
        .await
        .expect("SYNCHRONIZE CACHE through gateway 2");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = (port_groups(&a).await, port_groups(&b).await);
    assert_eq!(still.0[0].1, AO, "a flush moved the lock: {still:?}");
    assert_eq!(still.1[0].1, AO, "a flush moved the lock: {still:?}");
    let back = b
        .read16(0, 8, 8, BLOCK)
        .await
        .expect("read through gateway 2");
    assert_eq!(
        &back[..],
        &[2u8; 4096][..],
        "one disk: gateway 2 reads gateway 1's write"
    );
    // Without FUA or SYNCHRONIZE CACHE too: a write acknowledged by one gateway is what
    // the other reads next (no gateway-local cache hides it).
    for i in 0..40u8 {
        let (w, r) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let lba = u64::from(i % 4) * 64;
        w.write16(0, lba, Bytes::from(vec![i; 8192]), BLOCK, false)
            .await
            .expect("write");
        let back = r.read16(0, lba, 16, BLOCK).await.expect("read");
        assert!(
            back.iter().all(|&x| x == i),
            "round {i}: the other gateway read stale data"
        );
    }
}

/// The gateway holding the image's exclusive lock is killed: the other one's next write
/// stalls behind the dead holder's lock, so it probes the gateways on the PR object and
/// blocklists the silent one; the OSDs drop the dead client's watches, librbd breaks its
/// lock and the write completes (without the probe it would wait for Ceph's watch
/// timeout, 30 s by default). The elapsed time is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lock_holder_is_fenced_so_the_survivor_takes_the_lock() {
    let spec = image("deadholder", 16);
    let ga = start_gateway(&spec, 1, 2, "127.0.0.15").await;
    let gb = start_gateway(&spec, 2, 1, "127.0.0.16").await;
    let (a, b) = (login(&ga).await, login(&gb).await);
    write(&a, 1).await;
    expect_states(&a, &b, 1).await;

    drop(a);
    drop(ga); // SIGKILL while it holds the lock
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), write(&b, 2))
        .await
        .expect("the survivor's write completes");
    let took = t0.elapsed();
    eprintln!("write through the survivor completed {took:?} after the holder died");

    let log = gb.log();
    assert!(
        log.contains("probing the gateways") && log.contains("blocklisted"),
        "the survivor probed and fenced the dead holder: {log}"
    );
    let state = port_groups(&b).await;
    assert_eq!(
        state[1],
        (2, AO, vec![2]),
        "the survivor holds the lock: {state:?}"
    );
    let m = samples(&scrape(gb.metrics));
    let image = [("image", spec.as_str())];
    for name in [
        "holdfast_rbd_stall_probes_total",
        "holdfast_rbd_gateways_fenced_total",
    ] {
        assert!(
            value(&m, name, &image).is_some_and(|v| v >= 1.0),
            "{name} counts it: {m:?}"
        );
    }
    let back = b.read16(0, 8, 8, BLOCK).await.expect("read");
    assert_eq!(&back[..], &[2u8; 4096][..]);
}

/// An image without the exclusive-lock feature (what the quorum LUN should be: every node
/// writes its own slots through its own gateway) has no lock to move: every path is
/// active/optimized, writes through both gateways interleave without a handover, and when
/// a gateway is killed the other one's next write goes straight to RADOS, with no stall
/// and no probe. The survivor's write time is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_without_the_exclusive_lock_is_optimized_everywhere_and_never_stalls() {
    let spec = format!(
        "{}/nolock-{}",
        crate::ceph_fixture::POOL,
        std::process::id()
    );
    rbd(&[
        "create",
        "--size",
        "16M",
        "--image-feature",
        "layering",
        &spec,
    ]);
    let ga = start_gateway(&spec, 1, 2, "127.0.0.18").await;
    let gb = start_gateway(&spec, 2, 1, "127.0.0.19").await;
    let (a, b) = (login(&ga).await, login(&gb).await);
    let all_optimized = vec![(1, AO, vec![1]), (2, AO, vec![2])];
    assert_eq!(port_groups(&a).await, all_optimized);
    assert_eq!(port_groups(&b).await, all_optimized);
    for i in 0..20u8 {
        let (w, r) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        write(w, i).await;
        let back = r.read16(0, 8, 8, BLOCK).await.expect("read");
        assert!(back.iter().all(|&x| x == i), "round {i}: stale read");
    }
    assert_eq!(port_groups(&b).await, all_optimized, "writes moved nothing");

    drop(a);
    drop(ga); // SIGKILL
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), write(&b, 0xEE))
        .await
        .expect("the survivor's write completes");
    eprintln!(
        "write through the survivor completed {:?} after the other gateway died",
        t0.elapsed()
    );
    let back = b.read16(0, 8, 8, BLOCK).await.expect("read");
    assert_eq!(&back[..], &[0xEEu8; 4096][..]);
    assert!(
        !gb.log().contains("probing the gateways"),
        "no stall, so no probe: {}",
        gb.log()
    );
}

/// LOGICAL UNIT RESET through gateway A resets the one logical unit: a nexus on gateway B
/// gets BUS DEVICE RESET FUNCTION OCCURRED (29/03) too (the reset notice on the image's
/// PR object), once, and B serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lu_reset_through_one_gateway_is_a_unit_attention_through_the_other() {
    let spec = image("lureset", 16);
    let ga = start_gateway(&spec, 1, 2, "127.0.0.20").await;
    let gb = start_gateway(&spec, 2, 1, "127.0.0.21").await;
    let (a, b) = (login(&ga).await, login(&gb).await);
    write(&b, 1).await;
    let response = a.lun_reset(0).await.expect("LU reset");
    assert_eq!(response, 0, "function complete");
    let seen = |r: Result<(), InitiatorError>| match r {
        Err(InitiatorError::CheckCondition { key, asc, ascq }) => (key, asc, ascq),
        other => panic!("expected a unit attention, got {other:?}"),
    };
    assert_eq!(
        seen(b.test_unit_ready(0).await),
        (6, 0x29, 0x03),
        "{}",
        gb.log()
    );
    b.test_unit_ready(0)
        .await
        .expect("the unit attention is reported once");
    assert_eq!(seen(a.test_unit_ready(0).await), (6, 0x29, 0x03));
    write(&b, 2).await;
    let back = a.read16(0, 8, 8, BLOCK).await.expect("read");
    assert!(back.iter().all(|&x| x == 2));
}

/// The README's gateway configs ("When one storage box is not enough") validate, and
/// describe two gateways of one image with distinct groups and tpgts.
#[test]
fn readme_gateway_configs_are_valid() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let section = readme
        .split("## When one storage box is not enough")
        .nth(1)
        .expect("the section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let configs: Vec<_> = section
        .split("```toml")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or_default())
        .map(|b| {
            holdfast::server::config::parse(b, "README gateway", Path::new("/tmp"))
                .unwrap_or_else(|e| panic!("README gateway config: {e}\n{b}"))
        })
        .collect();
    assert_eq!(configs.len(), 2, "two gateway configs");
    let (a, b) = (&configs[0].config, &configs[1].config);
    assert_ne!(a.alua.group, b.alua.group);
    assert_eq!(a.alua.peers[0].group, b.alua.group);
    assert_eq!(b.alua.peers[0].group, a.alua.group);
    assert_ne!(a.targets[0].portals[0].tpgt, b.targets[0].portals[0].tpgt);
    assert_eq!(a.targets[0].luns[0].rbd, b.targets[0].luns[0].rbd);
}
