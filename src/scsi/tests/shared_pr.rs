//! The LU side of shared persistent reservations, sans-IO: two logical units stand for
//! two gateways of one image; a fake [`SharedPr`] commits to one in-memory state and
//! "notifies" the other gateway by installing there, as the RBD watcher does.

use super::*;
use crate::scsi::status;
use crate::store::MemBackend;
use std::sync::{atomic, Weak};

#[derive(Debug, Default)]
struct Store {
    committed: Mutex<(u64, PrState)>,
    gateways: Mutex<Vec<Weak<LogicalUnit>>>,
    /// Every gateway's client is blocklisted.
    fenced: std::sync::atomic::AtomicBool,
    /// The next commit lands, then its publisher finds itself blocklisted: no other
    /// gateway hears of it.
    fenced_after_commit: std::sync::atomic::AtomicBool,
}

/// Gateway `me`'s view of the shared store.
#[derive(Debug)]
struct FakeShared {
    store: Arc<Store>,
    me: usize,
}

impl SharedPr for FakeShared {
    fn update(&self, apply: &mut PrApply<'_>) -> Result<SharedCommit, SharedPrError> {
        if self.store.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SharedPrError::Fenced);
        }
        let mut c = self.store.committed.lock().unwrap();
        let (state, effects) = apply(&c.1)?;
        let cut_off = (self.store.fenced_after_commit).swap(false, atomic::Ordering::SeqCst);
        if cut_off {
            *c = (c.0 + 1, state.clone());
            return Ok(SharedCommit {
                state,
                effects,
                seq: c.0,
                published: Published::FencedHere,
            });
        }
        if effects.changed {
            *c = (c.0 + 1, state.clone());
            let gws = self.store.gateways.lock().unwrap();
            for (i, g) in gws.iter().enumerate() {
                if i != self.me {
                    g.upgrade()
                        .unwrap()
                        .install_shared_pr(c.0, state.clone(), &effects, None);
                }
            }
        }
        Ok(SharedCommit {
            state,
            effects,
            seq: c.0,
            published: Published::Everywhere,
        })
    }

    fn announce_reset(&self) -> Published {
        let gws = self.store.gateways.lock().unwrap();
        for (i, g) in gws.iter().enumerate() {
            if i != self.me {
                g.upgrade().unwrap().reset_from_peer();
            }
        }
        Published::Everywhere
    }
}

type Gateways = (Arc<LogicalUnit>, Arc<LogicalUnit>, Arc<Mutex<Vec<ItNexus>>>);

fn gateways() -> Gateways {
    gateways_of(Arc::new(Store::default()))
}

fn gateways_of(store: Arc<Store>) -> Gateways {
    let aborted = Arc::new(Mutex::new(Vec::new()));
    let mk = |me: usize| {
        let lu = Arc::new(LogicalUnit::new(
            LunSettings::default(),
            Arc::new(MemBackend::new(1 << 20)),
        ));
        lu.set_shared_pr(Arc::new(FakeShared {
            store: store.clone(),
            me,
        }));
        store.gateways.lock().unwrap().push(Arc::downgrade(&lu));
        lu
    };
    let (a, b) = (mk(0), mk(1));
    let rec = aborted.clone();
    a.set_abort_hook(Box::new(move |v| rec.lock().unwrap().extend_from_slice(v)));
    (a, b, aborted)
}

fn nexus(name: &str, tpgt: u16) -> ItNexus {
    ItNexus {
        initiator_name: format!("iqn.2026-12.test:{name}"),
        isid: [0x80, 0, 0, 0, 0, 1],
        target_name: "iqn.2026-12.test:t".into(),
        tpgt,
        relative_port_id: tpgt,
    }
}

fn run(lu: &LogicalUnit, n: &ItNexus, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
    lu.execute(&ScsiCommand {
        nexus: Arc::new(n.clone()),
        lun: 0,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(data),
        data_in_len: 65536,
        data_out_len: data.len() as u32,
        attr: Default::default(),
    })
}

fn prout(lu: &LogicalUnit, n: &ItNexus, action: u8, ty: u8, key: u64, sak: u64) -> ScsiOutcome {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sak.to_be_bytes());
    run(lu, n, &[0x5f, action, ty, 0, 0, 0, 0, 0, 24, 0], &p)
}

fn write(lu: &LogicalUnit, n: &ItNexus) -> ScsiOutcome {
    run(lu, n, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[5u8; 512])
}

/// (sense key, asc, ascq) of a CHECK CONDITION in fixed format.
fn sense(o: &ScsiOutcome) -> (u8, u8, u8) {
    assert_eq!(o.status, status::CHECK_CONDITION, "{o:?}");
    let s = o.sense.as_ref().unwrap();
    (s[2] & 0x0f, s[12], s[13])
}

#[test]
fn a_preempt_through_one_gateway_aborts_and_alerts_the_victim_on_the_other() {
    let (a, b, aborted) = gateways();
    let (victim, pre) = (nexus("victim", 1), nexus("pre", 2));
    assert_eq!(prout(&a, &victim, 0, 0, 0, 0xa1).status, status::GOOD);
    assert_eq!(prout(&a, &victim, 1, 1, 0xa1, 0).status, status::GOOD);
    assert_eq!(prout(&b, &pre, 0, 0, 0, 0xb2).status, status::GOOD);
    // B installed A's reservation: its writes conflict there without a round trip.
    assert_eq!(write(&b, &pre).status, status::RESERVATION_CONFLICT);
    assert_eq!(write(&a, &victim).status, status::GOOD);
    assert_eq!(a.pr_state(), b.pr_state());
    // PREEMPT AND ABORT through B.
    assert_eq!(prout(&b, &pre, 5, 1, 0xb2, 0xa1).status, status::GOOD);
    assert_eq!(*aborted.lock().unwrap(), vec![victim.clone()]);
    assert_eq!(sense(&write(&a, &victim)), (0x06, 0x2a, 0x05));
    assert_eq!(write(&a, &victim).status, status::RESERVATION_CONFLICT);
    // The issuer gets no unit attention; it now holds the reservation.
    assert_eq!(write(&b, &pre).status, status::GOOD);
    assert_eq!(a.pr_state(), b.pr_state());
}

#[test]
fn an_older_notice_does_not_replace_newer_state_but_its_effects_apply() {
    let (a, b, aborted) = gateways();
    let victim = nexus("victim", 1);
    assert_eq!(prout(&b, &nexus("x", 2), 0, 0, 0, 7).status, status::GOOD);
    let newer = a.pr_state();
    let _ = write(&a, &victim);
    let fx = ProutEffects {
        uas: vec![pr::UaNotice {
            to: vec![pr::RegId::of_nexus(&victim, false)],
            asc: 0x2a,
            ascq: 0x05,
        }],
        aborted: vec![pr::RegId::of_nexus(&victim, false)],
        changed: true,
    };
    a.install_shared_pr(0, PrState::default(), &fx, None);
    assert_eq!(
        a.pr_state(),
        newer,
        "seq 0 is older than the installed seq 1"
    );
    assert_eq!(*aborted.lock().unwrap(), vec![victim.clone()]);
    assert_eq!(sense(&write(&a, &victim)), (0x06, 0x2a, 0x05));
    drop(b);
}

#[test]
fn a_stale_gateway_answers_not_ready_to_reservation_commands_only() {
    let (a, _b, _) = gateways();
    let n = nexus("h", 1);
    let _ = write(&a, &n);
    a.set_pr_stale(true);
    assert_eq!(sense(&write(&a, &n)), (0x02, 0x04, 0x01));
    assert_eq!(
        sense(&run(&a, &n, &[0x5e, 0, 0, 0, 0, 0, 0, 0x20, 0, 0], &[])),
        (0x02, 0x04, 0x01)
    );
    assert_eq!(
        run(&a, &n, &[0x12, 0, 0, 0, 36, 0], &[]).status,
        status::GOOD
    );
    assert_eq!(sense(&prout(&a, &n, 0, 0, 0, 1)), (0x02, 0x04, 0x01));
    a.set_pr_stale(false);
    assert_eq!(write(&a, &n).status, status::GOOD);
}

#[test]
fn a_pr_out_through_a_fenced_gateway_answers_not_ready_and_the_lu_waits_for_the_reload() {
    let store = Arc::new(Store::default());
    let (a, _b, _) = gateways_of(store.clone());
    let n = nexus("host1", 1);
    store
        .fenced
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Not HARDWARE ERROR: the initiator retries NOT READY (or takes another path).
    assert_eq!(sense(&prout(&a, &n, 0, 0, 0, 0xA1)), (2, 0x04, 0x01));
    assert_eq!(sense(&write(&a, &n)), (2, 0x04, 0x01));
    // The watcher's re-read makes it ready again.
    a.set_pr_stale(false);
    assert_eq!(write(&a, &n).status, status::GOOD);
}

#[test]
fn a_pr_out_committed_by_a_gateway_fenced_before_publishing_answers_not_ready() {
    let store = Arc::new(Store::default());
    let (a, b, _) = gateways_of(store.clone());
    let n = nexus("host1", 1);
    store
        .fenced_after_commit
        .store(true, atomic::Ordering::SeqCst);
    // Committed but not published: not GOOD (the others do not have it yet), and not
    // HARDWARE ERROR either: NOT READY, until the watcher has reconnected.
    assert_eq!(sense(&prout(&a, &n, 0, 0, 0, 0xA1)), (2, 0x04, 0x01));
    assert_eq!(sense(&write(&a, &n)), (2, 0x04, 0x01));
    assert_ne!(
        a.pr_state(),
        b.pr_state(),
        "the other gateway never heard of it"
    );
    // What the watcher's recovery does: re-read, serve, re-publish to the others.
    let (seq, committed) = store.committed.lock().unwrap().clone();
    a.install_shared_pr(seq, committed.clone(), &ProutEffects::default(), None);
    a.set_pr_stale(false);
    b.install_shared_pr(seq, committed, &ProutEffects::default(), None);
    assert_eq!(a.pr_state(), b.pr_state());
    // The registration stands: REGISTER again with the old key 0 now conflicts.
    assert_eq!(
        prout(&a, &n, 0, 0, 0, 0xA1).status,
        status::RESERVATION_CONFLICT
    );
}

#[test]
fn a_lu_reset_on_one_gateway_aborts_and_alerts_the_nexuses_of_the_other() {
    let (a, b, _) = gateways();
    let (here, there) = (nexus("here", 1), nexus("there", 2));
    let aborted_b = Arc::new(Mutex::new(Vec::new()));
    let rec = aborted_b.clone();
    b.set_abort_hook(Box::new(move |v| rec.lock().unwrap().extend_from_slice(v)));
    assert_eq!(write(&a, &here).status, status::GOOD);
    assert_eq!(write(&b, &there).status, status::GOOD);
    assert!(a.spans_gateways() && b.spans_gateways());
    // What the connection does for LOGICAL UNIT RESET on a: reset here, then announce.
    a.reset();
    a.announce_reset();
    assert_eq!(*aborted_b.lock().unwrap(), vec![there.clone()]);
    assert_eq!(sense(&write(&b, &there)), (0x06, 0x29, 0x03));
    assert_eq!(write(&b, &there).status, status::GOOD);
    assert_eq!(sense(&write(&a, &here)), (0x06, 0x29, 0x03));
}
