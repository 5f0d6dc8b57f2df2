//! The agent protocol's building blocks against a real (in-process) target over TCP:
//! quorum formatting, COMPARE AND WRITE races, the disk claim with PREEMPT AND ABORT,
//! and the VM data path's name-only registration.

use crate::common;

use common::{config_text, start, TARGET};
use holdfast::agent::claim::{self, Identity};
use holdfast::agent::quorum::{self, GroupState};
use holdfast::agent::quorum_disk::{CawOutcome, QuorumDisk};
use holdfast::agent::AgentError;
use holdfast::cli::ctl;
use holdfast::initiator::IscsiUrl;
use holdfast::initiator::{InitiatorConfig, InitiatorError, Session};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);
const CLUSTER: &str = "proto";

fn node(id: u16) -> Identity {
    Identity {
        key: quorum::pr_key(CLUSTER, id),
        initiator_name: format!("iqn.2026-11.org.holdfast:proto.n{id}"),
        isid: quorum::node_isid(id, quorum::ISID_AGENT),
        vm_initiator_name: Some(format!("iqn.2026-11.org.holdfast:proto.n{id}.vm")),
    }
}

async fn login(addr: std::net::SocketAddr, name: &str, isid: Option<[u8; 6]>) -> Session {
    let mut c = InitiatorConfig::new(name, TARGET, addr);
    c.isid = isid;
    let s = Session::login(c).await.expect("login");
    common::clear_unit_attention(&s, 0).await;
    common::clear_unit_attention(&s, 1).await;
    s
}

fn url(addr: std::net::SocketAddr, lun: u64) -> IscsiUrl {
    format!("iscsi://{addr}/{TARGET}/{lun}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_quorum_refuses_data_and_reformat_unless_forced() {
    let t = start(&config_text(
        "",
        "",
        &[(0, "q.img", "4MiB"), (1, "d.img", "4MiB")],
    ))
    .await;
    let name = "iqn.2026-11.org.holdfast:ctl";
    ctl::init_quorum(&url(t.addr, 0), name, CLUSTER, false, None)
        .await
        .expect("fresh LUN formats");
    let e = ctl::init_quorum(&url(t.addr, 0), name, CLUSTER, false, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already the quorum LUN"), "{e}");
    // A LUN with data on it (a file system, a VM disk) is refused too.
    let s = login(t.addr, "iqn.2026-11.org.holdfast:writer", None).await;
    s.write16(1, 100, vec![0xabu8; 512].into(), 512, true)
        .await
        .unwrap();
    let e = ctl::init_quorum(&url(t.addr, 1), name, CLUSTER, false, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    ctl::init_quorum(&url(t.addr, 1), name, "other", true, None)
        .await
        .expect("--force overwrites");
    // And the header names the cluster: opening it as another cluster fails.
    let e = QuorumDisk::open(s.clone(), 1, CLUSTER, T)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("belongs to cluster"), "{e}");
    QuorumDisk::open(s.clone(), 0, CLUSTER, T)
        .await
        .expect("opens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_record_have_exactly_one_winner() {
    let t = start(&config_text("", "", &[(0, "q.img", "4MiB")])).await;
    ctl::init_quorum(
        &url(t.addr, 0),
        "iqn.2026-11.org.holdfast:ctl",
        CLUSTER,
        false,
        None,
    )
    .await
    .unwrap();
    let mut disks = Vec::new();
    for id in 1..=4u16 {
        let me = node(id);
        let s = login(t.addr, &me.initiator_name, Some(me.isid)).await;
        claim::join_quorum(&s, 0, &me, T).await.expect("join");
        let (q, _) = QuorumDisk::open(s, 0, CLUSTER, T).await.unwrap();
        disks.push((id, q));
    }
    // Four nodes create the same group at once: one record.
    let mut hs = Vec::new();
    for (_, q) in &disks {
        let q = q.clone();
        hs.push(tokio::spawn(async move { q.ensure_group("g").await }));
    }
    for h in hs {
        h.await.unwrap().expect("ensure_group");
    }
    let img = disks[0].1.read_image().await.unwrap();
    assert_eq!(img.groups.len(), 1, "{:?}", img.groups);
    // 25 rounds: all four try to move the record from what they read to themselves.
    for round in 0..25 {
        let img = disks[0].1.read_image().await.unwrap();
        let (idx, rec, block) = img.group("g").unwrap();
        let (rec, block) = (rec.clone(), block.to_vec());
        let mut hs = Vec::new();
        for (id, q) in &disks {
            let (q, block, mut new) = (q.clone(), block.clone(), rec.clone());
            new.owner = *id;
            new.owner_incarnation = 1;
            new.epoch += 1;
            new.state = GroupState::Starting;
            let id = *id;
            hs.push(tokio::spawn(async move {
                (id, q.caw_group(idx, &block, &new).await.unwrap())
            }));
        }
        let mut winners = Vec::new();
        for h in hs {
            let (id, o) = h.await.unwrap();
            if o == CawOutcome::Written {
                winners.push(id);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let now = disks[0].1.read_image().await.unwrap();
        let (_, r, _) = now.group("g").unwrap();
        assert_eq!((r.owner, r.epoch), (winners[0], rec.epoch + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_fences_the_previous_owner_and_its_vm_data_path() {
    let t = start(&config_text(
        "",
        "",
        &[(0, "q.img", "4MiB"), (1, "d.img", "16MiB")],
    ))
    .await;
    let (a, b) = (node(1), node(2));
    let sa = login(t.addr, &a.initiator_name, Some(a.isid)).await;
    let sb = login(t.addr, &b.initiator_name, Some(b.isid)).await;
    claim::claim_disk(&sa, 1, &a, T).await.expect("A claims");
    // Idempotent: a second claim (e.g. a restart in place) changes nothing.
    claim::claim_disk(&sa, 1, &a, T)
        .await
        .expect("A claims again");
    // A's VM logs in with A's VM initiator name and any ISID: registered, may write.
    let vm_a = login(t.addr, a.vm_initiator_name.as_deref().unwrap(), None).await;
    vm_a.write16(1, 8, vec![1u8; 512].into(), 512, true)
        .await
        .expect("A's VM writes");
    // A VM with another ISID (a restart of QEMU) is covered too.
    let vm_a2 = login(t.addr, a.vm_initiator_name.as_deref().unwrap(), None).await;
    vm_a2
        .write16(1, 9, vec![1u8; 512].into(), 512, true)
        .await
        .expect("A's restarted VM writes");
    // A stranger may read but not write.
    let other = login(t.addr, "iqn.2026-11.org.holdfast:stranger", None).await;
    assert!(other.read16(1, 8, 1, 512).await.is_ok());
    assert!(matches!(
        other.write16(1, 8, vec![9u8; 512].into(), 512, true).await,
        Err(InitiatorError::ReservationConflict)
    ));
    // B takes over: PREEMPT AND ABORT of A's key removes A's agent and VM registrations.
    claim::claim_disk(&sb, 1, &b, T).await.expect("B claims");
    claim::verify_disk(&sb, 1, &b, T).await.expect("read back");
    for s in [&vm_a, &vm_a2, &sa] {
        let r = s.write16(1, 8, vec![2u8; 512].into(), 512, true).await;
        assert!(
            matches!(r, Err(InitiatorError::ReservationConflict))
                || matches!(r, Err(InitiatorError::CheckCondition { key: 6, .. })),
            "{r:?}"
        );
        let r = s.write16(1, 8, vec![2u8; 512].into(), 512, true).await;
        assert!(
            matches!(r, Err(InitiatorError::ReservationConflict)),
            "{r:?}"
        );
    }
    // A notices: its key is gone, and its own read-back says fenced.
    assert!(!claim::key_present(&sa, 1, a.key, T).await.unwrap());
    assert!(matches!(
        claim::verify_disk(&sa, 1, &a, T).await,
        Err(AgentError::Fenced(_))
    ));
    // B's VM writes; the data A's VM wrote before the claim is intact.
    let vm_b = login(t.addr, b.vm_initiator_name.as_deref().unwrap(), None).await;
    vm_b.write16(1, 10, vec![3u8; 512].into(), 512, true)
        .await
        .expect("B's VM writes");
    assert_eq!(vm_b.read16(1, 8, 1, 512).await.unwrap()[0], 1);
    // B re-logs in with its fixed ISID (same nexus): still registered, nothing to redo.
    drop(sb);
    let sb2 = login(t.addr, &b.initiator_name, Some(b.isid)).await;
    claim::verify_disk(&sb2, 1, &b, T)
        .await
        .expect("same nexus keeps the claim");
    // Release: no reservation; B's registrations stay until the next claimer preempts.
    claim::release_disk(&sb2, 1, &b, T).await.unwrap();
    let (_, res) = sb2.read_reservation(1).await.unwrap();
    assert!(res.is_none());
    claim::claim_disk(&sa, 1, &a, T)
        .await
        .expect("A claims back");
    let (_, keys) = sa.read_keys(1).await.unwrap();
    assert!(keys.iter().all(|k| *k == a.key), "{keys:x?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_member_cannot_write_the_quorum_lun() {
    let t = start(&config_text("", "", &[(0, "q.img", "4MiB")])).await;
    ctl::init_quorum(
        &url(t.addr, 0),
        "iqn.2026-11.org.holdfast:ctl",
        CLUSTER,
        false,
        None,
    )
    .await
    .unwrap();
    let (a, b) = (node(1), node(2));
    let qa = Identity {
        vm_initiator_name: None,
        ..a.clone()
    };
    let qb = Identity {
        vm_initiator_name: None,
        ..b.clone()
    };
    let sa = login(t.addr, &a.initiator_name, Some(a.isid)).await;
    let sb = login(t.addr, &b.initiator_name, Some(b.isid)).await;
    claim::join_quorum(&sa, 0, &qa, T).await.unwrap();
    claim::join_quorum(&sb, 0, &qb, T).await.unwrap();
    let (da, _) = QuorumDisk::open(sa.clone(), 0, CLUSTER, T).await.unwrap();
    let slot = quorum::HeartbeatSlot {
        node_id: 1,
        name: "n1".into(),
        incarnation: 5,
        counter: 1,
        state: quorum::NodeState::Active,
        wall_ms: 0,
    };
    da.write_slot(&slot).await.expect("member writes");
    // B fences A on the quorum LUN: the all-registrants reservation stays, A is out.
    assert!(
        claim::preempt_abort(&sb, 0, &qb, a.key, claim::QUORUM_TYPE, T)
            .await
            .unwrap()
    );
    let e = da.write_slot(&slot).await.unwrap_err();
    assert!(matches!(e, AgentError::Conflict(_)), "{e}");
    // Fencing an already-fenced node is not an error.
    assert!(
        !claim::preempt_abort(&sb, 0, &qb, a.key, claim::QUORUM_TYPE, T)
            .await
            .unwrap()
    );
    // A rejoins (registers again) and writes.
    claim::join_quorum(&sa, 0, &qa, T).await.unwrap();
    da.write_slot(&slot).await.expect("rejoined");
}
