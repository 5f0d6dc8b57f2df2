//! Persistent reservation tests: the state machine through `LogicalUnit::execute`, the
//! access tables, unit attentions, TransportIDs, APTPL persistence and the PREEMPT AND
//! ABORT fence.

use super::*;
use crate::scsi::pr::{self, PrCaps, PrState, PrStore};
use crate::scsi::pr_codes::PrType;
use crate::scsi::transport_id::TransportId;
use std::sync::atomic::AtomicU64;

const RK: u8 = 0; // PR IN service actions
const RR: u8 = 1;
const RC: u8 = 2;
const RFS: u8 = 3;

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const PREEMPT_ABORT: u8 = 5;
const REG_IGNORE: u8 = 6;
const REG_MOVE: u8 = 7;
const REPLACE_LOST: u8 = 8;

const SPEC_I_PT: u8 = 0x08;
const ALL_TG_PT: u8 = 0x04;
const APTPL: u8 = 0x01;

const TYPES: [u8; 6] = [1, 3, 5, 6, 7, 8];

/// Nexus of initiator `name_i` with ISID ending in `isid` on portal group `tpgt`.
fn nx(name_i: u8, isid: u8, tpgt: u16) -> Arc<ItNexus> {
    Arc::new(ItNexus {
        initiator_name: format!("iqn.2024-01.test:init{name_i}"),
        isid: [0x40, 0, 0, 0, 0, isid],
        target_name: "iqn.2024-01.test:target".into(),
        tpgt,
        relative_port_id: tpgt,
    })
}

fn prout_cdb(action: u8, ty: u8, len: u32) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x5F;
    c[1] = action;
    c[2] = ty;
    c[5..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn plist(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    p
}

fn prout_raw(lu: &LogicalUnit, n: &Arc<ItNexus>, action: u8, ty: u8, p: &[u8]) -> ScsiOutcome {
    lu.execute(&cmd(n, &prout_cdb(action, ty, p.len() as u32), p))
}

fn prout(
    lu: &LogicalUnit,
    n: &Arc<ItNexus>,
    action: u8,
    ty: u8,
    key: u64,
    sak: u64,
) -> ScsiOutcome {
    prout_raw(lu, n, action, ty, &plist(key, sak, 0))
}

/// Register each nexus with its key (REGISTER from an unregistered nexus).
fn register(lu: &LogicalUnit, regs: &[(&Arc<ItNexus>, u64)]) {
    for (n, key) in regs {
        assert_good(&prout(lu, n, REGISTER, 0, 0, *key));
    }
}

/// A fresh LU with each nexus registered with its key.
fn registered(regs: &[(&Arc<ItNexus>, u64)]) -> LogicalUnit {
    let (lu, _) = super::lu();
    register(&lu, regs);
    lu
}

fn prin(lu: &LogicalUnit, n: &Arc<ItNexus>, action: u8, alloc: u16) -> ScsiOutcome {
    let mut c = [0u8; 10];
    c[0] = 0x5E;
    c[1] = action;
    c[7..9].copy_from_slice(&alloc.to_be_bytes());
    lu.execute(&cmd(n, &c, &[]))
}

/// PR IN from an observer nexus, past any unit attention it has pending.
fn observe(lu: &LogicalUnit, action: u8) -> ScsiOutcome {
    let n = nx(9, 9, 1);
    let _ = uas(lu, &n);
    prin(lu, &n, action, 8192)
}

fn keys(lu: &LogicalUnit) -> (u32, Vec<u64>) {
    let o = observe(lu, RK);
    assert_good(&o);
    let d = &o.data_in;
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let ks = d[8..8 + len]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (gen, ks)
}

/// (key, type) of the reservation, if any.
fn reservation(lu: &LogicalUnit) -> Option<(u64, u8)> {
    let o = observe(lu, RR);
    assert_good(&o);
    let d = &o.data_in;
    match u32::from_be_bytes(d[4..8].try_into().unwrap()) {
        0 => None,
        16 => Some((
            u64::from_be_bytes(d[8..16].try_into().unwrap()),
            d[21] & 0x0F,
        )),
        n => panic!("bad additional length {n}"),
    }
}

fn conflict(o: &ScsiOutcome) {
    assert_eq!(o.status, status::RESERVATION_CONFLICT, "{o:?}");
    assert_eq!(o.sense, None);
}

/// Drain a nexus's unit attentions with TEST UNIT READY-less REQUEST SENSE.
fn uas(lu: &LogicalUnit, n: &Arc<ItNexus>) -> Vec<(u8, u8)> {
    let mut v = Vec::new();
    loop {
        let o = lu.execute(&cmd(n, &[0x03, 0, 0, 0, 252, 0], &[]));
        assert_good(&o);
        let (k, asc, ascq) = (o.data_in[2] & 0x0F, o.data_in[12], o.data_in[13]);
        if k != 6 {
            return v;
        }
        v.push((asc, ascq));
    }
}

fn seen(lu: &LogicalUnit, ns: &[&Arc<ItNexus>]) {
    for n in ns {
        let _ = lu.execute(&cmd(n, &[0x12, 0, 0, 0, 36, 0], &[]));
    }
}

#[test]
fn register_unregister_and_generation() {
    let (lu, _) = super::lu();
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    assert_eq!(keys(&lu), (0, vec![]));
    // Unregistered nexus with a nonzero reservation key: conflict.
    conflict(&prout(&lu, &a, REGISTER, 0, 5, 0x11));
    // Unregistering an unregistered nexus: GOOD, nothing changes.
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0));
    assert_eq!(keys(&lu), (0, vec![]));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0x11));
    assert_eq!(keys(&lu), (1, vec![0x11]));
    // Re-register with the wrong key: conflict; with the right one: key changes.
    conflict(&prout(&lu, &a, REGISTER, 0, 0x12, 0x13));
    conflict(&prout(&lu, &a, REGISTER, 0, 0, 0x13));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0x11, 0x13));
    assert_eq!(keys(&lu), (2, vec![0x13]));
    // REGISTER AND IGNORE EXISTING KEY ignores the reservation key.
    assert_good(&prout(&lu, &a, REG_IGNORE, 0, 0xdead, 0x14));
    assert_good(&prout(&lu, &b, REG_IGNORE, 0, 0xdead, 0x21));
    assert_eq!(keys(&lu), (4, vec![0x14, 0x21]));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0x14, 0));
    assert_eq!(keys(&lu), (5, vec![0x21]));
    assert_good(&prout(&lu, &b, REG_IGNORE, 0, 0, 0));
    assert_eq!(keys(&lu), (6, vec![]));
    // Nexus loss and LUN reset keep registrations.
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0x31));
    lu.nexus_lost(&a);
    lu.reset();
    assert_eq!(keys(&lu).1, vec![0x31]);
}

/// The PR OUT service actions only a registered I_T nexus with the right key may issue.
const NEED_REGISTRATION: [u8; 6] = [
    RESERVE,
    RELEASE,
    CLEAR,
    PREEMPT,
    PREEMPT_ABORT,
    REPLACE_LOST,
];

#[test]
fn prout_requires_registration() {
    let (lu, _) = super::lu();
    let a = nx(1, 1, 1);
    for action in NEED_REGISTRATION {
        conflict(&prout(&lu, &a, action, 1, 0, 0x1));
    }
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0x10));
    // Registered, wrong reservation key.
    for action in NEED_REGISTRATION {
        conflict(&prout(&lu, &a, action, 1, 0x11, 0x10));
    }
}

#[test]
fn cdb_and_parameter_list_errors() {
    let (lu, _) = super::lu();
    let a = nx(1, 1, 1);
    // Unknown service action.
    let o = prout(&lu, &a, 9, 0, 0, 1);
    assert_sense(&o, 5, 0x24, 0);
    // Parameter list length not 24.
    let mut p = plist(0, 1, 0);
    p.push(0);
    assert_sense(&prout_raw(&lu, &a, REGISTER, 0, &p), 5, 0x1A, 0);
    assert_sense(&prout_raw(&lu, &a, REGISTER, 0, &p[..20]), 5, 0x1A, 0);
    // Data-Out shorter than the list length.
    let o = lu.execute(&cmd(&a, &prout_cdb(REGISTER, 0, 24), &p[..10]));
    assert_sense(&o, 5, 0x1A, 0);
    // SPEC_I_PT on anything but REGISTER.
    let p = plist(0, 1, SPEC_I_PT);
    assert_sense(&prout_raw(&lu, &a, REG_IGNORE, 0, &p), 5, 0x26, 0);
    // SPEC_I_PT without TransportIDs: list too short.
    assert_sense(&prout_raw(&lu, &a, REGISTER, 0, &p), 5, 0x1A, 0);
    // APTPL without a store.
    assert_sense(
        &prout_raw(&lu, &a, REGISTER, 0, &plist(0, 1, APTPL)),
        5,
        0x26,
        0,
    );
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 1));
    // Scope other than LU, invalid types.
    assert_sense(&prout(&lu, &a, RESERVE, 0x11, 1, 0), 5, 0x24, 0);
    for bad in [0u8, 2, 4, 9, 15] {
        assert_sense(&prout(&lu, &a, RESERVE, bad, 1, 0), 5, 0x24, 0);
    }
    assert_eq!(reservation(&lu), None);
    // PR IN: bad service action, with a field pointer to byte 1.
    for sa in 4..0x20 {
        let o = prin(&lu, &a, sa, 100);
        assert_sense(&o, 5, 0x24, 0);
        assert_eq!(&o.sense.as_ref().unwrap()[15..18], &[0xCC, 0, 1]);
    }
}

#[test]
fn reserve_release_every_type() {
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    let lu = registered(&[(&a, 0xA), (&b, 0xB)]);
    for ty in TYPES {
        let gen = keys(&lu).0;
        assert_good(&prout(&lu, &a, RESERVE, ty, 0xA, 0));
        let ar = ty == 7 || ty == 8;
        assert_eq!(reservation(&lu), Some((if ar { 0 } else { 0xA }, ty)));
        // Same type again by the holder: GOOD; another type: conflict.
        assert_good(&prout(&lu, &a, RESERVE, ty, 0xA, 0));
        let other = if ty == 1 { 3 } else { 1 };
        conflict(&prout(&lu, &a, RESERVE, other, 0xA, 0));
        // Another registrant: GOOD for all-registrants of the same type, else conflict.
        let o = prout(&lu, &b, RESERVE, ty, 0xB, 0);
        if ar {
            assert_good(&o);
        } else {
            conflict(&o);
        }
        // A non-holder's RELEASE is a GOOD no-op.
        if !ar {
            assert_good(&prout(&lu, &b, RELEASE, ty, 0xB, 0));
            assert!(reservation(&lu).is_some());
        }
        // Wrong type in RELEASE by the holder: INVALID RELEASE OF PERSISTENT RESERVATION.
        assert_sense(&prout(&lu, &a, RELEASE, other, 0xA, 0), 5, 0x26, 0x04);
        let _ = uas(&lu, &b);
        assert_good(&prout(&lu, &a, RELEASE, ty, 0xA, 0));
        assert_eq!(reservation(&lu), None);
        // RESERVE and RELEASE leave the generation alone.
        assert_eq!(keys(&lu).0, gen);
        // RELEASE of a registrants-only / all-registrants reservation: RESERVATIONS
        // RELEASED to the other registrants, never to the issuer.
        let expect = if ty >= 5 { vec![(0x2A, 0x04)] } else { vec![] };
        assert_eq!(uas(&lu, &b), expect, "type {ty}");
        assert_eq!(uas(&lu, &a), vec![]);
        // Releasing with no reservation: GOOD.
        assert_good(&prout(&lu, &a, RELEASE, ty, 0xA, 0));
    }
}

/// What SPC-4 table 56 / SBC-3 table 13 say a (holder, registered, unregistered) nexus may
/// do under each type: (read, write).
fn expected_access(ty: u8, role: usize) -> (bool, bool) {
    match (ty, role) {
        (_, 0) => (true, true),
        (1, _) => (true, false),
        (3, _) => (false, false),
        (5, 1) | (6, 1) | (7, 1) | (8, 1) => (true, true),
        (5, 2) | (7, 2) => (true, false),
        (6, 2) | (8, 2) => (false, false),
        _ => unreachable!(),
    }
}

#[test]
fn access_table_every_type_and_role() {
    let read_cmds: Vec<Vec<u8>> = vec![
        rw10(opcode::READ_10, 1, 1).to_vec(),
        rw16(opcode::READ_16, 1, 1).to_vec(),
        vec![0x08, 0, 0, 1, 1, 0],
        rw10(opcode::VERIFY_10, 1, 1).to_vec(),
        rw10(opcode::PRE_FETCH_10, 1, 1).to_vec(),
        vec![0x1A, 0, 0x3F, 0, 255, 0],
    ];
    let write_cmds: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (rw10(opcode::WRITE_10, 1, 1).to_vec(), vec![0; 512]),
        (rw16(opcode::WRITE_16, 1, 1).to_vec(), vec![0; 512]),
        (rw10(opcode::SYNC_CACHE_10, 0, 0).to_vec(), vec![]),
        (rw10(opcode::WRITE_SAME_10, 1, 1).to_vec(), vec![0; 512]),
        (vec![0x1E, 0, 0, 0, 0, 0], vec![]),
        (vec![0x1B, 0, 0, 0, 1, 0], vec![]),
    ];
    let always: Vec<Vec<u8>> = vec![
        vec![0; 6],                                   // TEST UNIT READY
        vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],        // READ CAPACITY(10)
        vec![0x12, 0, 0, 0, 36, 0],                   // INQUIRY
        vec![0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], // REPORT LUNS
        vec![0x5E, 0, 0, 0, 0, 0, 0, 0, 100, 0],      // PR IN
    ];
    for ty in TYPES {
        let (h, r, u) = (nx(1, 1, 1), nx(2, 2, 1), nx(3, 3, 1));
        let lu = registered(&[(&h, 0xA), (&r, 0xB)]);
        assert_good(&prout(&lu, &h, RESERVE, ty, 0xA, 0));
        for (role, n) in [&h, &r, &u].into_iter().enumerate() {
            let (can_read, can_write) = expected_access(ty, role);
            for c in &read_cmds {
                let o = lu.execute(&cmd(n, c, &[]));
                if can_read {
                    assert_good(&o);
                } else {
                    conflict(&o);
                }
            }
            for (c, d) in &write_cmds {
                let o = lu.execute(&cmd(n, c, d));
                if can_write {
                    assert_good(&o);
                } else {
                    conflict(&o);
                }
            }
            for c in &always {
                assert_good(&lu.execute(&cmd(n, c, &[])));
            }
        }
    }
}

#[test]
fn unregistering_the_holder_releases() {
    for ty in TYPES {
        let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
        let lu = registered(&[(&a, 0xA), (&b, 0xB)]);
        assert_good(&prout(&lu, &a, RESERVE, ty, 0xA, 0));
        assert_good(&prout(&lu, &a, REGISTER, 0, 0xA, 0));
        let ar = ty == 7 || ty == 8;
        // All-registrants reservations stay while a registrant is left.
        assert_eq!(reservation(&lu).is_some(), ar, "type {ty}");
        let expect = if ty == 5 || ty == 6 {
            vec![(0x2A, 0x04)]
        } else {
            vec![]
        };
        assert_eq!(uas(&lu, &b), expect, "type {ty}");
        assert_good(&prout(&lu, &b, REGISTER, 0, 0xB, 0));
        assert_eq!(reservation(&lu), None);
    }
}

#[test]
fn clear_removes_everything_with_ua() {
    let (lu, _) = super::lu();
    let (a, b, c) = (nx(1, 1, 1), nx(2, 2, 1), nx(3, 3, 1));
    seen(&lu, &[&c]);
    register(&lu, &[(&a, 0xA), (&b, 0xB)]);
    assert_good(&prout(&lu, &a, RESERVE, 3, 0xA, 0));
    let gen = keys(&lu).0;
    assert_good(&prout(&lu, &b, CLEAR, 0, 0xB, 0));
    assert_eq!(keys(&lu), (gen + 1, vec![]));
    assert_eq!(reservation(&lu), None);
    assert_eq!(uas(&lu, &a), vec![(0x2A, 0x03)]);
    assert_eq!(uas(&lu, &b), vec![]);
    assert_eq!(uas(&lu, &c), vec![]);
    // Everyone may write again.
    assert_good(&lu.execute(&cmd(&c, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
}

#[test]
fn preempt_variants() {
    // Without a reservation: removes the registrations with the key.
    let (a, b, b2) = (nx(1, 1, 1), nx(2, 2, 1), nx(2, 3, 1));
    let lu = registered(&[(&a, 0xA), (&b, 0xB), (&b2, 0xB)]);
    let gen = keys(&lu).0;
    assert_good(&prout(&lu, &a, PREEMPT, 3, 0xA, 0xB));
    assert_eq!(keys(&lu), (gen + 1, vec![0xA]));
    assert_eq!(reservation(&lu), None);
    assert_eq!(uas(&lu, &b), vec![(0x2A, 0x05)]);
    assert_eq!(uas(&lu, &b2), vec![(0x2A, 0x05)]);
    assert_eq!(uas(&lu, &a), vec![]);
    // Unknown key: conflict; key 0 without an all-registrants reservation: invalid field.
    conflict(&prout(&lu, &a, PREEMPT, 3, 0xA, 0x77));
    assert_sense(&prout(&lu, &a, PREEMPT, 3, 0xA, 0), 5, 0x26, 0);

    // Preempting the holder: the reservation moves to the issuer with the new type,
    // remaining registrants hear RESERVATIONS RELEASED because the type changed.
    let c = nx(3, 3, 1);
    let lu = registered(&[(&a, 0xA), (&b, 0xB), (&c, 0xC)]);
    assert_good(&prout(&lu, &b, RESERVE, 1, 0xB, 0));
    assert_good(&prout(&lu, &a, PREEMPT, 5, 0xA, 0xB));
    assert_eq!(reservation(&lu), Some((0xA, 5)));
    assert_eq!(keys(&lu).1, vec![0xA, 0xC]);
    assert_eq!(uas(&lu, &b), vec![(0x2A, 0x05)]);
    assert_eq!(uas(&lu, &c), vec![(0x2A, 0x04)]);
    // Invalid type when the reservation would be created.
    assert_sense(&prout(&lu, &c, PREEMPT, 2, 0xC, 0xA), 5, 0x24, 0);
    // Preempting a non-holder: only registrations go, the reservation stays.
    assert_good(&prout(&lu, &a, PREEMPT, 5, 0xA, 0xC));
    assert_eq!(reservation(&lu), Some((0xA, 5)));
    assert_eq!(keys(&lu).1, vec![0xA]);
    assert_eq!(uas(&lu, &c), vec![(0x2A, 0x05)]);
    // Same type, self-preempt: no RESERVATIONS RELEASED.
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB));
    assert_good(&prout(&lu, &a, PREEMPT, 5, 0xA, 0xA));
    assert_eq!(uas(&lu, &b), vec![]);

    // All-registrants: key 0 removes every other registrant.
    let (lu, _) = super::lu();
    register(&lu, &[(&a, 0xA), (&b, 0xB), (&c, 0xC)]);
    assert_good(&prout(&lu, &b, RESERVE, 8, 0xB, 0));
    assert_good(&prout(&lu, &a, PREEMPT_ABORT, 3, 0xA, 0));
    assert_eq!(reservation(&lu), Some((0xA, 3)));
    assert_eq!(keys(&lu).1, vec![0xA]);
    assert_eq!(uas(&lu, &b), vec![(0x2A, 0x05)]);
    assert_eq!(uas(&lu, &c), vec![(0x2A, 0x05)]);
    conflict(&lu.execute(&cmd(&b, &rw10(opcode::READ_10, 0, 1), &[])));
    // All-registrants with a nonzero key: just that registration.
    let (lu, _) = super::lu();
    register(&lu, &[(&a, 0xA), (&b, 0xB)]);
    assert_good(&prout(&lu, &b, RESERVE, 7, 0xB, 0));
    assert_good(&prout(&lu, &a, PREEMPT, 7, 0xA, 0xB));
    assert_eq!(reservation(&lu), Some((0, 7)));
    assert_eq!(keys(&lu).1, vec![0xA]);
}

fn tid(text: &str, format01: bool) -> Vec<u8> {
    let body = (text.len() + 1).next_multiple_of(4).max(20);
    let mut b = vec![if format01 { 0x45 } else { 0x05 }, 0];
    b.extend_from_slice(&(body as u16).to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b.resize(4 + body, 0);
    b
}

fn spec_list(key: u64, sak: u64, flags: u8, tids: &[Vec<u8>]) -> Vec<u8> {
    let mut p = plist(key, sak, flags | SPEC_I_PT);
    let all: Vec<u8> = tids.concat();
    p.extend_from_slice(&(all.len() as u32).to_be_bytes());
    p.extend_from_slice(&all);
    p
}

#[test]
fn spec_i_pt_transport_id_formats() {
    let (lu, _) = super::lu();
    let agent = nx(1, 1, 1);
    // Format 00b: the VM's initiator name, any ISID; format 01b: one initiator port.
    let p = spec_list(
        0,
        0xA,
        0,
        &[
            tid("iqn.2024-01.test:INIT2", false),
            tid("iqn.2024-01.test:init3,i,0x400000000007", true),
        ],
    );
    assert_good(&prout_raw(&lu, &agent, REGISTER, 0, &p));
    assert_eq!(keys(&lu), (1, vec![0xA, 0xA, 0xA]));
    let st = lu.pr_state();
    assert!(st.is_registered(&nx(2, 0x11, 1)));
    assert!(st.is_registered(&nx(2, 0x99, 1)));
    assert!(!st.is_registered(&nx(2, 0x99, 2)), "other target port");
    assert!(st.is_registered(&nx(3, 7, 1)));
    assert!(!st.is_registered(&nx(3, 8, 1)));
    // A fresh ISID of the VM is a registrant: it may write under WE-RO.
    assert_good(&prout(&lu, &agent, RESERVE, 5, 0xA, 0));
    let vm = nx(2, 0x55, 1);
    let _ = uas(&lu, &vm);
    assert_good(&lu.execute(&cmd(&vm, &rw10(opcode::WRITE_10, 0, 1), &[1; 512])));
    conflict(&lu.execute(&cmd(&nx(3, 8, 1), &rw10(opcode::WRITE_10, 0, 1), &[1; 512])));
    // PREEMPT AND ABORT of the key removes them all at once.
    let other = nx(4, 4, 1);
    assert_good(&prout(&lu, &other, REGISTER, 0, 0, 0xB));
    assert_good(&prout(&lu, &other, PREEMPT_ABORT, 5, 0xB, 0xA));
    assert_eq!(keys(&lu).1, vec![0xB]);
    let _ = (uas(&lu, &vm), uas(&lu, &agent));
    conflict(&lu.execute(&cmd(&vm, &rw10(opcode::WRITE_10, 0, 1), &[1; 512])));
    conflict(&lu.execute(&cmd(&agent, &rw10(opcode::WRITE_10, 0, 1), &[1; 512])));

    // SPEC_I_PT from a registered nexus: invalid field in CDB.
    let p = spec_list(0xB, 0xB, 0, &[tid("iqn.x:y", false)]);
    assert_sense(&prout_raw(&lu, &other, REGISTER, 0, &p), 5, 0x24, 0);
    // Already-registered TransportID: invalid field in parameter list, nothing changes.
    let (lu, _) = super::lu();
    assert_good(&prout(&lu, &nx(2, 2, 1), REGISTER, 0, 0, 0x2));
    let p = spec_list(
        0,
        0xA,
        0,
        &[tid("iqn.2024-01.test:init2,i,0x400000000002", true)],
    );
    assert_sense(&prout_raw(&lu, &agent, REGISTER, 0, &p), 5, 0x26, 0);
    assert_eq!(keys(&lu).1, vec![0x2]);
    // Malformed TransportIDs.
    let mut bad_proto = tid("iqn.x:y", false);
    bad_proto[0] = 0x01;
    let mut bad_fmt = tid("iqn.x:y", false);
    bad_fmt[0] = 0x85;
    let mut too_long = tid("iqn.x:y", false);
    too_long[3] = 200;
    for t in [
        bad_proto,
        bad_fmt,
        tid("iqn.x:y,i,0xZZ", true),
        tid("iqn.x:y", true),
        tid("", false),
    ] {
        let p = spec_list(0, 0xA, 0, &[t]);
        assert_sense(&prout_raw(&lu, &agent, REGISTER, 0, &p), 5, 0x26, 0);
    }
    // TransportID overrunning its list length.
    let mut p = spec_list(0, 0xA, 0, &[too_long]);
    let n = p.len() as u32 - 28;
    p[24..28].copy_from_slice(&n.to_be_bytes());
    assert_eq!(
        prout_raw(&lu, &agent, REGISTER, 0, &p).status,
        status::CHECK_CONDITION
    );
    // List length field disagreeing with the parameter list length.
    let mut p = spec_list(0, 0xA, 0, &[tid("iqn.x:y", false)]);
    p[27] += 4;
    assert_sense(&prout_raw(&lu, &agent, REGISTER, 0, &p), 5, 0x1A, 0);
    assert_eq!(keys(&lu).1, vec![0x2]);
}

#[test]
fn all_tg_pt_covers_every_target_port() {
    let (lu, _) = super::lu();
    let a1 = nx(1, 1, 1);
    assert_good(&prout_raw(&lu, &a1, REGISTER, 0, &plist(0, 0xA, ALL_TG_PT)));
    let st = lu.pr_state();
    assert!(st.is_registered(&nx(1, 1, 2)));
    assert!(!st.is_registered(&nx(1, 2, 2)));
    // Without ALL_TG_PT only the receiving port.
    let b = nx(2, 2, 1);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB));
    assert!(!lu.pr_state().is_registered(&nx(2, 2, 2)));
    // Through the other port the registration is usable.
    assert_good(&prout(&lu, &nx(1, 1, 2), RESERVE, 1, 0xA, 0));
    let o = prin(&lu, &b, RFS, 4096);
    assert_good(&o);
    let d = &o.data_in;
    assert_eq!(d[8 + 12], 0x03, "ALL_TG_PT and R_HOLDER");
}

#[test]
fn read_full_status_layout() {
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 3));
    let lu = registered(&[(&a, 0xA), (&b, 0xB)]);
    assert_good(&prout(&lu, &b, RESERVE, 6, 0xB, 0));
    let o = prin(&lu, &a, RFS, 4096);
    assert_good(&o);
    let d = &o.data_in;
    assert_eq!(&d[0..4], &2u32.to_be_bytes());
    let total = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 8 + total);
    let mut off = 8;
    let mut seen = Vec::new();
    while off < d.len() {
        let key = u64::from_be_bytes(d[off..off + 8].try_into().unwrap());
        let flags = d[off + 12];
        let ty = d[off + 13];
        let rel = u16::from_be_bytes([d[off + 18], d[off + 19]]);
        let tl = u32::from_be_bytes(d[off + 20..off + 24].try_into().unwrap()) as usize;
        let t = &d[off + 24..off + 24 + tl];
        assert_eq!(t[0], 0x45);
        assert_eq!(tl % 4, 0);
        let text = std::str::from_utf8(&t[4..]).unwrap().trim_end_matches('\0');
        seen.push((key, flags, ty, rel, text.to_string()));
        off += 24 + tl;
    }
    assert_eq!(
        seen,
        vec![
            (
                0xA,
                0,
                0,
                1,
                "iqn.2024-01.test:init1,i,0x400000000001".into()
            ),
            (
                0xB,
                1,
                6,
                3,
                "iqn.2024-01.test:init2,i,0x400000000002".into()
            ),
        ]
    );
    // Truncation keeps ADDITIONAL LENGTH.
    let o = prin(&lu, &a, RFS, 10);
    assert_eq!(o.data_in.len(), 10);
    assert_eq!(
        u32::from_be_bytes(o.data_in[4..8].try_into().unwrap()) as usize,
        total
    );
}

#[test]
fn read_keys_truncation_and_capabilities() {
    let (lu, _) = super::lu();
    let a = nx(1, 1, 1);
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA));
    let o = prin(&lu, &a, RK, 8);
    assert_eq!(&o.data_in[..], &[0, 0, 0, 1, 0, 0, 0, 8]);
    let o = prin(&lu, &a, RK, 12);
    assert_eq!(o.data_in.len(), 12);
    let o = prin(&lu, &a, RR, 4);
    assert_eq!(o.data_in.len(), 4);
    let o = prin(&lu, &a, RC, 100);
    assert_good(&o);
    // Without a store: no PTPL_C.
    assert_eq!(&o.data_in[..], &[0, 8, 0x1C, 0x90, 0xEA, 0x01, 0, 0]);
}

#[test]
fn register_and_move() {
    let (lu, _) = super::lu();
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA));
    let mv = |key: u64, sak: u64, flags: u8, rel: u16, t: &[u8]| {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sak.to_be_bytes());
        p[17] = flags;
        p[18..20].copy_from_slice(&rel.to_be_bytes());
        p[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(t);
        p
    };
    let to_b = tid("iqn.2024-01.test:init2,i,0x400000000002", true);
    // No reservation: conflict.
    conflict(&prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xB, 0, 1, &to_b)));
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0));
    // Errors: key 0, relative port 0, name-only TransportID, the issuer itself.
    assert_sense(
        &prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0, 0, 1, &to_b)),
        5,
        0x26,
        0,
    );
    assert_sense(
        &prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xB, 0, 0, &to_b)),
        5,
        0x26,
        0,
    );
    let name_only = tid("iqn.2024-01.test:init2", false);
    assert_sense(
        &prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xB, 0, 1, &name_only)),
        5,
        0x26,
        0,
    );
    let me = tid("iqn.2024-01.test:init1,i,0x400000000001", true);
    assert_sense(
        &prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xB, 0, 1, &me)),
        5,
        0x26,
        0,
    );
    conflict(&prout_raw(
        &lu,
        &a,
        REG_MOVE,
        1,
        &mv(0xA1, 0xB, 0, 1, &to_b),
    ));
    let gen = keys(&lu).0;
    // Move keeping the issuer registered.
    assert_good(&prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xB, 0, 1, &to_b)));
    assert_eq!(keys(&lu), (gen + 1, vec![0xA, 0xB]));
    assert_eq!(reservation(&lu), Some((0xB, 1)));
    assert!(lu.pr_state().is_holder(&b));
    conflict(&lu.execute(&cmd(&a, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    // A non-holder cannot move it.
    conflict(&prout_raw(&lu, &a, REG_MOVE, 1, &mv(0xA, 0xC, 0, 1, &to_b)));
    // Move back with UNREG.
    let to_a = tid("iqn.2024-01.test:init1,i,0x400000000001", true);
    assert_good(&prout_raw(
        &lu,
        &b,
        REG_MOVE,
        1,
        &mv(0xB, 0xAA, 0x02, 1, &to_a),
    ));
    assert_eq!(keys(&lu).1, vec![0xA]);
    assert_eq!(reservation(&lu), Some((0xA, 1)));
    // All-registrants reservations cannot be moved.
    assert_good(&prout(&lu, &a, RELEASE, 1, 0xA, 0));
    assert_good(&prout(&lu, &a, RESERVE, 7, 0xA, 0));
    conflict(&prout_raw(&lu, &a, REG_MOVE, 7, &mv(0xA, 0xB, 0, 1, &to_b)));
}

#[test]
fn replace_lost_reservation() {
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    let lu = registered(&[(&a, 0xA), (&b, 0xB)]);
    assert_good(&prout(&lu, &a, REPLACE_LOST, 5, 0xA, 0));
    assert_eq!(reservation(&lu), Some((0xA, 5)));
    // Someone else's reservation cannot be replaced.
    conflict(&prout(&lu, &b, REPLACE_LOST, 1, 0xB, 0));
    assert_good(&prout(&lu, &a, REPLACE_LOST, 3, 0xA, 0));
    assert_eq!(reservation(&lu), Some((0xA, 3)));
}

#[test]
fn scsi2_interplay() {
    let (lu, _) = super::lu();
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    let release6 = [0x17, 0, 0, 0, 0, 0];
    // A SCSI-2 reservation blocks another nexus's PR OUT (and lets the holder's through).
    assert_good(&lu.execute(&cmd(&a, &reserve6, &[])));
    conflict(&prout(&lu, &b, REGISTER, 0, 0, 0xB));
    assert_good(&prin(&lu, &b, RK, 100));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA));
    assert_good(&lu.execute(&cmd(&a, &release6, &[])));
    // Registrations alone make RESERVE(6) conflict.
    conflict(&lu.execute(&cmd(&b, &reserve6, &[])));
    conflict(&lu.execute(&cmd(&a, &reserve6, &[])));
    assert_good(&lu.execute(&cmd(&b, &release6, &[])));
    // With a persistent reservation the holder's RESERVE/RELEASE are GOOD no-ops,
    // others conflict.
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0));
    assert_good(&lu.execute(&cmd(&a, &reserve6, &[])));
    assert_good(&lu.execute(&cmd(&a, &release6, &[])));
    assert_eq!(reservation(&lu), Some((0xA, 1)));
    conflict(&lu.execute(&cmd(&b, &reserve6, &[])));
    conflict(&lu.execute(&cmd(&b, &release6, &[])));
    // Under registrants-only a registrant's RESERVE(6) is a no-op too.
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB));
    assert_good(&prout(&lu, &a, RELEASE, 1, 0xA, 0));
    assert_good(&prout(&lu, &a, RESERVE, 5, 0xA, 0));
    assert_good(&lu.execute(&cmd(&b, &reserve6, &[])));
    assert_good(&lu.execute(&cmd(&nx(3, 3, 1), &[0; 6], &[])));
    assert_good(&lu.execute(&cmd(&nx(3, 3, 1), &rw10(opcode::READ_10, 0, 1), &[])));
}

#[test]
fn registration_limit() {
    let mut st = PrState::default();
    let caps = PrCaps { ptpl: false };
    let c = prout_cdb(REGISTER, 0, 24);
    for i in 0..pr::MAX_REGISTRATIONS {
        let n = ItNexus {
            initiator_name: format!("iqn.x:{i}"),
            isid: [0; 6],
            target_name: "t".into(),
            tpgt: 1,
            relative_port_id: 1,
        };
        st.prout(&n, &c, &plist(0, 1, 0), caps).unwrap();
    }
    let n = nx(1, 1, 1);
    let e = st.prout(&n, &c, &plist(0, 1, 0), caps).unwrap_err();
    assert_eq!(
        e,
        crate::scsi::lun::CmdError::Check(crate::scsi::sense::Sense::new(5, 0x55, 0x04))
    );
    assert_eq!(st.registrations.len(), pr::MAX_REGISTRATIONS);
    // READ KEYS of a full LU: 8 + 8 * 4096 bytes, cut to the allocation length.
    let mut cdb = [0x5E, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0];
    assert_eq!(
        st.prin(&cdb, caps).unwrap().len(),
        8 + 8 * pr::MAX_REGISTRATIONS
    );
    cdb[7] = 0;
    assert_eq!(st.prin(&cdb, caps).unwrap().len(), 0xFF);
}

#[test]
fn report_supported_opcodes_and_data_out_length() {
    let (lu, _) = super::lu();
    assert_eq!(lu.data_out_length(&prout_cdb(0, 0, 24)), 24);
    assert_eq!(lu.data_out_length(&prout_cdb(0, 0, 2 << 20)), 0);
    // One command, options 1: PR OUT is listed with its CDB usage.
    let o = run(&lu, &[0xA3, 0x0C, 0x01, 0x5F, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&o);
    assert_eq!(o.data_in[1] & 0x07, 0x03);
    assert_eq!(o.data_in[4], 0x5F);
    let o = run(&lu, &[0xA3, 0x0C, 0x01, 0x5E, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(o.data_in[1] & 0x07, 0x03);
}

/// A PrStore in memory, optionally failing saves.
#[derive(Debug, Default)]
struct MemStore {
    bytes: Mutex<Option<Vec<u8>>>,
    fail: AtomicBool,
    saves: AtomicUsize,
}

impl PrStore for Arc<MemStore> {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.bytes.lock().unwrap().clone())
    }
    fn save(&self, b: &[u8]) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("disk full"));
        }
        self.saves.fetch_add(1, Ordering::SeqCst);
        *self.bytes.lock().unwrap() = Some(b.to_vec());
        Ok(())
    }
    fn remove(&self) -> io::Result<()> {
        *self.bytes.lock().unwrap() = None;
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn persistent_lu(store: &Arc<MemStore>) -> Result<LogicalUnit, crate::scsi::PrLoadError> {
    let be = TestBackend::new((BLOCKS * 512) as usize);
    LogicalUnit::with_persistence(settings(), be, Box::new(store.clone()))
}

#[test]
fn aptpl_persistence_round_trip() {
    let store = Arc::new(MemStore::default());
    let lu = persistent_lu(&store).unwrap();
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    // Without APTPL nothing is saved.
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA));
    assert_eq!(store.saves.load(Ordering::SeqCst), 0);
    assert_good(&prout_raw(&lu, &b, REGISTER, 0, &plist(0, 0xB, APTPL)));
    assert_good(&prout(&lu, &b, RESERVE, 5, 0xB, 0));
    let p = spec_list(
        0,
        0xC,
        ALL_TG_PT | APTPL,
        &[tid("iqn.2024-01.test:vm", false)],
    );
    assert_good(&prout_raw(&lu, &nx(3, 3, 1), REGISTER, 0, &p));
    assert_eq!(store.saves.load(Ordering::SeqCst), 3);
    let o = prin(&lu, &a, RC, 8);
    assert_eq!(o.data_in[2] & 0x01, 1, "PTPL_C");
    assert_eq!(o.data_in[3] & 0x01, 1, "PTPL_A");
    let before = lu.pr_state();
    drop(lu);
    // "Restart": the state comes back whole.
    let lu = persistent_lu(&store).unwrap();
    assert_eq!(lu.pr_state(), before);
    assert!(!lu.pr_state().is_registered(&nx(0xFF, 1, 9)));
    let vm = Arc::new(ItNexus {
        initiator_name: "iqn.2024-01.test:VM".into(),
        isid: [1, 2, 3, 4, 5, 6],
        target_name: "iqn.2024-01.test:target".into(),
        tpgt: 7,
        relative_port_id: 7,
    });
    assert_good(&lu.execute(&cmd(&vm, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    conflict(&lu.execute(&cmd(&nx(4, 4, 1), &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    // A failing save refuses the PR OUT and leaves the state alone.
    store.fail.store(true, Ordering::SeqCst);
    assert_sense(
        &prout_raw(&lu, &a, REGISTER, 0, &plist(0xA, 0, APTPL)),
        4,
        0x44,
        0,
    );
    assert_eq!(lu.pr_state(), before);
    store.fail.store(false, Ordering::SeqCst);
    // APTPL off: the saved state is removed, the in-memory state stays.
    assert_good(&prout(&lu, &a, REGISTER, 0, 0xA, 0xAA));
    assert!(store.bytes.lock().unwrap().is_none());
    assert_eq!(lu.pr_state().registrations.len(), 4);
    let lu = persistent_lu(&store).unwrap();
    assert_eq!(lu.pr_state(), PrState::default());
}

/// A unit attention taken by a command whose response was never delivered (aborted by
/// PREEMPT AND ABORT) is given back and reported by the next command, once.
#[test]
fn unreported_unit_attention_is_queued_again() {
    let (lu, _) = super::lu();
    let (a, b) = (nx(1, 1, 1), nx(2, 2, 1));
    seen(&lu, &[&a, &b]);
    register(&lu, &[(&a, 0xA), (&b, 0xB)]);
    assert_good(&prout(&lu, &b, PREEMPT_ABORT, 5, 0xB, 0xA));
    let tur = [0u8; 6];
    let taken = lu.execute(&cmd(&a, &tur, &[]));
    assert_sense(&taken, 6, 0x2A, 0x05);
    // Its response is suppressed: the transport hands the outcome back.
    lu.unreported(&a, &taken);
    lu.unreported(&a, &lu.execute(&cmd(&b, &tur, &[]))); // GOOD: nothing to give back
    assert_sense(&lu.execute(&cmd(&a, &tur, &[])), 6, 0x2A, 0x05);
    assert_good(&lu.execute(&cmd(&a, &tur, &[])));
}

/// An all-registrants reservation whose creator unregisters or is preempted stays with
/// the other registrants, and such a state saves and loads (it used to name the departed
/// creator as holder, which the loader refused: the LUN did not start again).
#[test]
fn all_registrants_reservation_outlives_its_creator_across_restart() {
    for (ty, preempt) in [(7u8, false), (8, false), (7, true), (8, true)] {
        let store = Arc::new(MemStore::default());
        let lu = persistent_lu(&store).unwrap();
        let (a, b, c) = (nx(1, 1, 1), nx(2, 2, 1), nx(3, 3, 1));
        assert_good(&prout_raw(&lu, &a, REGISTER, 0, &plist(0, 0xA, APTPL)));
        assert_good(&prout_raw(&lu, &b, REGISTER, 0, &plist(0, 0xB, APTPL)));
        assert_good(&prout_raw(&lu, &c, REGISTER, 0, &plist(0, 0xC, APTPL)));
        assert_good(&prout(&lu, &a, RESERVE, ty, 0xA, 0));
        if preempt {
            assert_good(&prout(&lu, &b, PREEMPT, ty, 0xB, 0xA));
        } else {
            assert_good(&prout_raw(&lu, &a, REGISTER, 0, &plist(0xA, 0, APTPL)));
        }
        let st = lu.pr_state();
        let res = st.reservation.clone().expect("still reserved");
        assert!(st.registrations.iter().any(|r| r.id == res.holder));
        drop(lu);
        let lu = persistent_lu(&store).expect("the saved state loads");
        assert_eq!(reservation(&lu), Some((0, ty)));
        assert_good(&lu.execute(&cmd(&c, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
        conflict(&lu.execute(&cmd(&a, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    }
}

#[test]
fn corrupt_state_is_an_error() {
    let good = {
        let store = Arc::new(MemStore::default());
        let lu = persistent_lu(&store).unwrap();
        assert_good(&prout_raw(
            &lu,
            &nx(1, 1, 1),
            REGISTER,
            0,
            &plist(0, 0xB, APTPL),
        ));
        let saved = store.bytes.lock().unwrap().clone();
        saved.unwrap()
    };
    let text = String::from_utf8(good.clone()).unwrap();
    let tampered = text.replacen("\"key\": 11", "\"key\": 12", 1);
    assert_ne!(tampered, text);
    let mut bad_version = text.replacen("\"version\": 1", "\"version\": 2", 1);
    bad_version.push(' ');
    for bytes in [
        b"garbage".to_vec(),
        good[..good.len() / 2].to_vec(),
        tampered.into_bytes(),
        bad_version.into_bytes(),
        Vec::new(),
    ] {
        let store = Arc::new(MemStore::default());
        *store.bytes.lock().unwrap() = Some(bytes);
        assert!(persistent_lu(&store).is_err());
    }
    let store = Arc::new(MemStore::default());
    *store.bytes.lock().unwrap() = Some(good);
    assert_eq!(
        persistent_lu(&store)
            .unwrap()
            .pr_state()
            .registrations
            .len(),
        1
    );
}

#[test]
fn file_store_through_runtime_paths() {
    use crate::store::PrFileStore;
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    let mk = || {
        let be = TestBackend::new((BLOCKS * 512) as usize);
        LogicalUnit::with_persistence(settings(), be, Box::new(PrFileStore::for_backing(&backing)))
    };
    let lu = mk().unwrap();
    assert_good(&prout_raw(
        &lu,
        &nx(1, 1, 1),
        REGISTER,
        0,
        &plist(0, 0xB, APTPL),
    ));
    assert_good(&prout(&lu, &nx(1, 1, 1), RESERVE, 1, 0xB, 0));
    drop(lu);
    assert_eq!(
        mk().unwrap().pr_state().reservation.unwrap().ty,
        PrType::WriteExclusive
    );
    std::fs::write(dir.path().join("disk.img.holdfast-pr"), b"{").unwrap();
    let e = mk().unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
}

/// A memory backend whose writes take a while, so a write admitted before a preempt is
/// still in flight when the preempt arrives (what the fence must wait for).
#[derive(Debug)]
struct SlowBackend(crate::store::MemBackend);

impl BlockBackend for SlowBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(std::time::Duration::from_micros(300));
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.deallocate(offset, len)
    }
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        self.0.allocation_at(offset)
    }
}

/// PREEMPT AND ABORT fence: once it returns, no write of the preempted nexus lands.
#[test]
fn preempt_and_abort_stops_victim_writes() {
    let be = Arc::new(SlowBackend(crate::store::MemBackend::new(
        (BLOCKS * 512) as usize,
    )));
    let lu = Arc::new(LogicalUnit::new(settings(), be.clone()));
    let victims: Vec<_> = (0..3).map(|i| nx(1, 10 + i, 1)).collect();
    let winner = nx(2, 2, 1);
    // The victim node registers every nexus by name (format 00b), holds WE-RO.
    let p = spec_list(0, 0xA, 0, &[tid("iqn.2024-01.test:init1", false)]);
    assert_good(&prout_raw(&lu, &victims[0], REGISTER, 0, &p));
    assert_good(&prout(&lu, &victims[0], RESERVE, 5, 0xA, 0));
    assert_good(&prout(&lu, &winner, REGISTER, 0, 0, 0xB));
    let aborted = Arc::new(Mutex::new(Vec::new()));
    let ab = aborted.clone();
    lu.set_abort_hook(Box::new(move |n: &[ItNexus]| {
        ab.lock().unwrap().extend_from_slice(n)
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(1));
    let landed: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let mut threads = Vec::new();
    for (t, v) in victims.iter().enumerate() {
        let (lu, v, stop, counter) = (lu.clone(), v.clone(), stop.clone(), counter.clone());
        let landed = landed.clone();
        threads.push(std::thread::spawn(move || {
            let mut ok = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let val = counter.fetch_add(1, Ordering::SeqCst);
                let mut d = vec![0u8; 512 * 8];
                for c in d.chunks_mut(8) {
                    c.copy_from_slice(&val.to_be_bytes());
                }
                let o = lu.execute(&cmd(&v, &rw10(opcode::WRITE_10, (t * 8) as u32, 8), &d));
                if o.status == status::GOOD {
                    ok += 1;
                    landed[t].fetch_add(1, Ordering::SeqCst);
                }
            }
            ok
        }));
    }
    // Let the victims write for a while, then preempt.
    while landed.iter().any(|l| l.load(Ordering::SeqCst) < 20) {
        std::thread::yield_now();
    }
    assert_good(&prout(&lu, &winner, PREEMPT_ABORT, 5, 0xB, 0xA));
    let mut snapshot = vec![0u8; 512 * 24];
    be.read_at(&mut snapshot, 0).unwrap();
    // Victims keep trying; they must all conflict now.
    let after = counter.load(Ordering::SeqCst);
    while counter.load(Ordering::SeqCst) < after + 100 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    let ok: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ok > 0, "victims wrote before the preempt");
    let mut now = vec![0u8; 512 * 24];
    be.read_at(&mut now, 0).unwrap();
    assert_eq!(
        now, snapshot,
        "a victim write landed after PREEMPT AND ABORT"
    );
    // Every victim nexus got REGISTRATIONS PREEMPTED and went to the abort hook.
    let mut hooked: Vec<_> = aborted.lock().unwrap().iter().map(|n| n.isid[5]).collect();
    hooked.sort_unstable();
    assert_eq!(hooked, vec![10, 11, 12]);
    assert_good(&lu.execute(&cmd(&winner, &rw10(opcode::WRITE_10, 0, 1), &[7; 512])));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        #[test]
        fn random_pr_commands_never_panic(
            seq in proptest::collection::vec(
                (0u8..4, 0u8..12, any::<u8>(), 0u64..4, 0u64..4, any::<u8>(),
                 proptest::collection::vec(any::<u8>(), 0..80), any::<bool>(), any::<u16>()),
                1..12),
        ) {
            let (lu, _) = super::lu();
            for (who, action, ty, key, sak, flags, tail, raw, alloc) in seq {
                let n = nx(who % 2, who, 1 + u16::from(who / 2));
                let mut p = plist(key, sak, flags);
                p.extend_from_slice(&tail);
                if !raw {
                    p.truncate(24);
                }
                let o = prout_raw(&lu, &n, action, ty, &p);
                prop_assert!(matches!(o.status, status::GOOD | status::CHECK_CONDITION
                    | status::RESERVATION_CONFLICT));
                for sa in 0..5 {
                    let mut c = [0x5E, sa, 0, 0, 0, 0, 0, 0, 0, 0];
                    c[7..9].copy_from_slice(&alloc.to_be_bytes());
                    let o = lu.execute(&cmd(&n, &c, &[]));
                    prop_assert!(o.data_in.len() <= usize::from(alloc));
                }
                let st = lu.pr_state();
                // The holder of a reservation is always registered.
                if let Some(r) = &st.reservation {
                    prop_assert!(st.registrations.iter().any(|x| x.id == r.holder));
                }
                prop_assert!(PrState::from_bytes(&st.to_bytes()).unwrap() == st);
            }
        }

        #[test]
        fn random_transport_ids_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TransportId::decode(&b);
            let mut st = PrState::default();
            let mut p = plist(0, 1, SPEC_I_PT);
            p.extend_from_slice(&(b.len() as u32).to_be_bytes());
            p.extend_from_slice(&b);
            let _ = st.prout(&nx(1, 1, 1), &prout_cdb(0, 0, p.len() as u32), &p,
                PrCaps { ptpl: true });
            let mut m = vec![0u8; 24];
            m.extend_from_slice(&b);
            let _ = st.prout(&nx(1, 1, 1), &prout_cdb(7, 1, m.len() as u32), &m,
                PrCaps { ptpl: true });
        }
    }
}
