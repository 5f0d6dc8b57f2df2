//! LUNs on Ceph RBD images, through real iSCSI, against a throwaway cluster that
//! tools/ceph-up.sh starts once per test process (and tears down when it exits). Needs
//! the Ceph daemons and CLI (tools/deps.sh installs them); without them these tests fail.
//! The whole libiscsi suite on RBD runs in tools/ceph-conformance.sh.

use crate::ceph_fixture::{cluster, export, image, rbd, POOL};
use crate::common::{self, BLOCK, TARGET};
use bytes::Bytes;
use holdfast::initiator::{cdb, InitiatorError, Session};
use holdfast::scsi::sense::key;
use std::process::Command;

fn config(spec: &str, mib: u64, extra: &str) -> String {
    let conf = cluster().join("ceph.conf");
    format!(
        "data_dir = \"data\"\n[ceph]\nconf = \"{}\"\nclient = \"client.holdfast\"\n{extra}\n\
         [[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"127.0.0.13:0\"\n\
         [[target.lun]]\nid = 0\nrbd = \"{spec}\"\nsize = \"{mib}MiB\"\n",
        conf.display()
    )
}

async fn serve(spec: &str, mib: u64) -> (common::TestTarget, Session) {
    let t = common::start(&config(spec, mib, "")).await;
    let s = t.login().await;
    common::clear_unit_attention(&s, 0).await;
    (t, s)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_data_reaches_the_image_and_reads_back() {
    let spec = image("rw", 16);
    let (_t, s) = serve(&spec, 16).await;
    let data = pattern(64 * 1024, 7);
    s.write16(0, 2048, Bytes::from(data.clone()), BLOCK, false)
        .await
        .expect("write");
    // FUA and SYNCHRONIZE CACHE both end in rbd_flush.
    let fua = pattern(4096, 9);
    s.write16(0, 9000, Bytes::from(fua.clone()), BLOCK, true)
        .await
        .expect("FUA write");
    s.synchronize_cache(0).await.expect("synchronize cache");
    let back = s.read16(0, 2048, 128, BLOCK).await.expect("read");
    assert_eq!(&back[..], &data[..]);
    let img = export(&spec);
    assert_eq!(img.len(), 16 << 20);
    assert_eq!(&img[2048 * 512..2048 * 512 + data.len()], &data[..]);
    assert_eq!(&img[9000 * 512..9000 * 512 + fua.len()], &fua[..]);
    assert!(img[..2048 * 512].iter().all(|&b| b == 0));
}

/// COMPARE AND WRITE: one block goes through rbd_compare_and_write, several through the
/// compare under the range lock; a miscompare reports the first differing byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_and_miscompare() {
    let spec = image("caw", 16);
    let (_t, s) = serve(&spec, 16).await;
    let old = pattern(4 * 512, 1);
    let new = pattern(4 * 512, 2);
    s.write16(0, 100, Bytes::from(old.clone()), BLOCK, false)
        .await
        .expect("write");
    for blocks in [1usize, 4] {
        let len = blocks * 512;
        let mut wrong = old[..len].to_vec();
        let at = len - 3;
        wrong[at] ^= 0xff;
        let cdb = cdb::compare_and_write(100, blocks as u8, false);
        let mut out = wrong.clone();
        out.extend_from_slice(&new[..len]);
        let r = s
            .command(0, &cdb, Some(Bytes::from(out)), 0)
            .await
            .expect("command");
        let sense = r.sense().expect("CHECK CONDITION with sense");
        assert_eq!(
            (sense.key, sense.asc),
            (key::MISCOMPARE, 0x1d),
            "{blocks} blocks"
        );
        let raw = r.sense.as_deref().expect("sense bytes");
        assert_eq!(information(raw), Some(at as u64), "{blocks} blocks: offset");
        let back = s.read16(0, 100, blocks as u32, BLOCK).await.expect("read");
        assert_eq!(&back[..], &old[..len], "a miscompare writes nothing");
    }
    s.compare_and_write(0, 100, &old[..512], &new[..512], BLOCK)
        .await
        .expect("matching one-block compare and write");
    s.compare_and_write(0, 101, &old[512..], &new[512..], BLOCK)
        .await
        .expect("matching three-block compare and write");
    s.synchronize_cache(0).await.expect("sync");
    let img = export(&spec);
    assert_eq!(&img[100 * 512..104 * 512], &new[..]);
}

/// The INFORMATION field of fixed (VALID set) or descriptor format sense data.
fn information(b: &[u8]) -> Option<u64> {
    match b.first()? & 0x7f {
        0x70 | 0x71 if b[0] & 0x80 != 0 => {
            Some(u64::from(u32::from_be_bytes(b.get(3..7)?.try_into().ok()?)))
        }
        0x72 | 0x73 => {
            let mut d = b.get(8..)?;
            while d.len() >= 2 {
                let len = 2 + usize::from(d[1]);
                if d[0] == 0 && d.len() >= 12 {
                    return Some(u64::from_be_bytes(d[4..12].try_into().ok()?));
                }
                d = d.get(len..)?;
            }
            None
        }
        _ => None,
    }
}

fn unmap_cdb(param_len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

fn unmap_list(lba: u64, blocks: u32) -> Bytes {
    let mut v = vec![0u8; 24];
    v[0..2].copy_from_slice(&22u16.to_be_bytes());
    v[2..4].copy_from_slice(&16u16.to_be_bytes());
    v[8..16].copy_from_slice(&lba.to_be_bytes());
    v[16..20].copy_from_slice(&blocks.to_be_bytes());
    Bytes::from(v)
}

/// Extents `rbd diff` reports as data: (offset, length).
fn diff(spec: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&rbd(&["diff", "--format", "json", spec])).expect("rbd diff json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|e| e["exists"] == "true" || e["exists"] == true)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// GET LBA STATUS at `lba`: (first descriptor's block count, provisioning status).
async fn lba_status(s: &Session, lba: u64) -> (u32, u8) {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&64u32.to_be_bytes());
    let d = s
        .command(0, &c, None, 64)
        .await
        .expect("GET LBA STATUS")
        .data;
    assert!(d.len() >= 24, "short GET LBA STATUS data");
    let start = u64::from_be_bytes(d[8..16].try_into().unwrap());
    assert_eq!(start, lba);
    (
        u32::from_be_bytes(d[16..20].try_into().unwrap()),
        d[20] & 0x0f,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmap_deallocates_objects() {
    const OBJ: u64 = 4 << 20; // the default RBD object size
    let spec = image("unmap", 16);
    let (_t, s) = serve(&spec, 16).await;
    // Fill objects 1 and 2.
    for i in 0..16u64 {
        let lba = (OBJ + i * 512 * 1024) / 512;
        s.write16(
            0,
            lba,
            Bytes::from(pattern(512 * 1024, i as u8 | 1)),
            BLOCK,
            false,
        )
        .await
        .expect("write");
    }
    s.synchronize_cache(0).await.expect("sync");
    let covered = |ext: &[(u64, u64)], off: u64| ext.iter().any(|&(o, l)| o <= off && off < o + l);
    let before = diff(&spec);
    assert!(
        covered(&before, OBJ) && covered(&before, 2 * OBJ),
        "{before:?}"
    );
    assert_eq!(lba_status(&s, OBJ / 512).await.1, 0, "written: mapped");

    let r = s
        .command(
            0,
            &unmap_cdb(24),
            Some(unmap_list(OBJ / 512, (OBJ / 512) as u32)),
            0,
        )
        .await
        .expect("UNMAP");
    assert_eq!(r.status, 0, "UNMAP: {:?}", r.sense());
    let after = diff(&spec);
    assert!(
        !covered(&after, OBJ) && !covered(&after, 2 * OBJ - 1),
        "object 1 still there: {after:?}"
    );
    assert!(covered(&after, 2 * OBJ), "object 2 gone too: {after:?}");
    let (blocks, state) = lba_status(&s, OBJ / 512).await;
    assert_eq!((blocks as u64, state), (OBJ / 512, 1), "deallocated run");
    let zeros = s.read16(0, OBJ / 512, 8, BLOCK).await.expect("read");
    assert!(zeros.iter().all(|&b| b == 0));
    // An unaligned UNMAP still reads back as zeros (LBPRZ) though RBD keeps the object.
    s.command(0, &unmap_cdb(24), Some(unmap_list(2 * OBJ / 512 + 3, 5)), 0)
        .await
        .expect("UNMAP");
    let back = s.read16(0, 2 * OBJ / 512, 16, BLOCK).await.expect("read");
    assert!(back[3 * 512..8 * 512].iter().all(|&b| b == 0));
    // object 2 starts with the ninth 512 KiB write (seed 8 | 1)
    assert!(
        back[..3 * 512] == pattern(512 * 1024, 9)[..3 * 512],
        "data before the unmapped range"
    );
    assert!(
        back[8 * 512..] == pattern(512 * 1024, 9)[8 * 512..16 * 512],
        "data after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_or_user_is_a_clear_start_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = format!("{POOL}/absent-{}", std::process::id());
    let cfg = holdfast::server::config::parse(&config(&spec, 16, ""), "t.toml", dir.path())
        .expect("valid config");
    let e = holdfast::server::runtime::Runtime::build(&cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&spec) && e.contains("does not exist"), "{e}");

    let spec = image("user", 16);
    let text = config(&spec, 16, "").replace("client.holdfast", "client.nobody");
    let cfg = holdfast::server::config::parse(&text, "t.toml", dir.path()).expect("valid config");
    let e = holdfast::server::runtime::Runtime::build(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("client.nobody") && e.contains("ceph.conf"),
        "{e}"
    );

    let cfg = holdfast::server::config::parse(&config(&spec, 32, ""), "t.toml", dir.path())
        .expect("valid config");
    let e = holdfast::server::runtime::Runtime::build(&cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("less than the configured"), "{e}");
}

/// A gateway blocklisted in Ceph (what fencing one does) can never write again: its
/// commands get NOT READY (the LU goes offline, logged), the target keeps serving, and
/// the write never reaches the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocklisted_gateway_answers_not_ready() {
    let spec = image("fenced", 16);
    // Its own [ceph] settings, hence its own connection: the blocklist must not hit the
    // other tests' shared one.
    let t = common::start(&config(&spec, 16, "timeout = \"29s\"")).await;
    let s = t.login().await;
    common::clear_unit_attention(&s, 0).await;
    s.write16(0, 0, Bytes::from(pattern(4096, 3)), BLOCK, false)
        .await
        .expect("write");
    s.synchronize_cache(0).await.expect("sync");
    let status: serde_json::Value =
        serde_json::from_str(&rbd(&["status", "--format", "json", &spec])).expect("status json");
    let addr = status["watchers"][0]["address"]
        .as_str()
        .expect("one watcher: the gateway")
        .to_string();
    let conf = cluster().join("ceph.conf");
    let st = Command::new("ceph")
        .arg("-c")
        .arg(&conf)
        .args(["osd", "blocklist", "add", &addr])
        .output()
        .expect("ceph osd blocklist");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // `blocklist add` returns once the monitors committed it; an OSD that has not yet
    // seen that map may still take a write or two (the cross-gateway fence waits for
    // the OSD map for this reason). A PR OUT first: refused as NOT READY, whether its
    // commit was refused (SharedPrError::Fenced) or landed before its notice was
    // (Published::FencedHere); never GOOD once refused, never HARDWARE ERROR.
    let flags = holdfast::initiator::RegisterFlags::default();
    let mut pr_refused = None;
    for i in 0..20u64 {
        match s.register_ignore(0, 0x100 + i, &flags).await {
            Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            other => {
                pr_refused = Some(other);
                break;
            }
        }
    }
    match pr_refused.expect("the blocklisted gateway refused a PR OUT within 4 s") {
        Err(InitiatorError::CheckCondition {
            key: key::NOT_READY,
            asc: 0x04,
            ascq: 0x01,
        }) => {}
        other => panic!("a blocklisted gateway's PR OUT: {other:?}"),
    }
    // Then write until the gateway is refused (at once now: the LU waits for the reload)...
    let mut refused = None;
    for _ in 0..20 {
        match s
            .write16(0, 0, Bytes::from(pattern(4096, 4)), BLOCK, true)
            .await
        {
            Ok(()) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    match refused.expect("the blocklisted gateway was refused within 4 s") {
        Err(InitiatorError::CheckCondition { key: k, .. }) => assert_eq!(k, key::NOT_READY),
        other => panic!("a blocklisted gateway's write: {other:?}"),
    }
    // ...and from then on nothing it is sent reaches the image.
    let after = s
        .write16(0, 0, Bytes::from(pattern(4096, 5)), BLOCK, true)
        .await;
    assert!(
        matches!(after, Err(InitiatorError::CheckCondition { key: k, .. }) if k == key::NOT_READY),
        "{after:?}"
    );
    assert!(
        t.serve.as_ref().is_some_and(|h| !h.is_finished()),
        "target still serving"
    );
    let on_image = export(&spec);
    assert!(
        on_image[..4096] == pattern(4096, 3)[..] || on_image[..4096] == pattern(4096, 4)[..],
        "no write sent after the refusal landed"
    );
    let _ = Command::new("ceph")
        .arg("-c")
        .arg(&conf)
        .args(["osd", "blocklist", "rm", &addr])
        .output();
}

/// A live reload adds an RBD LUN (and the `[ceph]` table it needs) to a target serving
/// files, grows it after `rbd resize`, and refuses to change `[ceph]` under served images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_grows_an_rbd_lun() {
    use holdfast::server::{config, live, portal::Portals, runtime::Runtime};
    use std::sync::Arc;
    common::init_tracing();
    let spec = image("reload", 8);
    let dir = tempfile::tempdir().expect("tempdir");
    let file_lun = "[[target.lun]]\nid = 0\npath = \"a.img\"\nsize = \"1MiB\"\n";
    let base = format!(
        "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\n\
         listen = \"127.0.0.13:0\"\n{file_lun}"
    );
    let cfg = config::parse(&base, "t.toml", dir.path()).expect("valid");
    let rt = Arc::new(Runtime::build(&cfg).expect("runtime"));
    let portals = Portals::bind(&cfg.listen_addrs()).await.expect("bind");
    let addr = portals.local_addrs()[0];
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(portals.serve(rt.clone(), rx));
    let ceph = |timeout: &str| {
        format!(
            "[ceph]\nconf = \"{}\"\ntimeout = \"{timeout}\"\n",
            cluster().join("ceph.conf").display()
        )
    };
    let with_rbd = |mib: u64, timeout: &str| {
        let text = format!(
            "{base}[[target.lun]]\nid = 1\nrbd = \"{spec}\"\nsize = \"{mib}MiB\"\n{}",
            ceph(timeout)
        );
        config::parse(&text, "t.toml", dir.path()).expect("valid")
    };
    live::reload(&rt, with_rbd(8, "30s"))
        .await
        .expect("reload adds the RBD LUN");
    let cfg = holdfast::initiator::InitiatorConfig::new(common::INITIATOR, TARGET, addr);
    let s = Session::login(cfg).await.expect("login");
    common::clear_unit_attention(&s, 1).await;
    assert_eq!(
        s.read_capacity16(1).await.expect("capacity").0,
        8 * 2048 - 1
    );
    s.write16(1, 10, Bytes::from(pattern(4096, 5)), BLOCK, true)
        .await
        .expect("write to the new LUN");
    assert_eq!(
        &export(&spec)[10 * 512..10 * 512 + 4096],
        &pattern(4096, 5)[..]
    );

    // Growing beyond the image is refused with its size; after `rbd resize` it works.
    let e = live::reload(&rt, with_rbd(16, "30s"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("less than the configured"), "{e}");
    rbd(&["resize", "--size", "16M", &spec]);
    live::reload(&rt, with_rbd(16, "30s"))
        .await
        .expect("reload grows the RBD LUN");
    let _ = s.test_unit_ready(1).await; // capacity-changed unit attention
    let cap = holdfast::initiator::past_unit_attention(|| s.read_capacity16(1)).await;
    assert_eq!(cap.expect("capacity").0, 16 * 2048 - 1);

    let e = live::reload(&rt, with_rbd(16, "20s"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("[ceph]"), "{e}");
}
