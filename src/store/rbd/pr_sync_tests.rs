use super::*;
use crate::scsi::sense::Sense;
use std::cell::RefCell;

/// An in-memory guarded object; `interfere` writes run just before our next write, as
/// another gateway's commit would.
#[derive(Default)]
struct FakeObject {
    data: RefCell<Option<(Vec<u8>, u64)>>,
    interfere: RefCell<Vec<PrState>>,
    writes: RefCell<usize>,
}

impl FakeObject {
    fn put(&self, seq: u64, st: &PrState) {
        let mut d = self.data.borrow_mut();
        let v = d.as_ref().map_or(1, |(_, v)| v + 1);
        *d = Some((encode_object(seq, st), v));
    }
    fn current(&self) -> (u64, PrState) {
        decode_object(&self.data.borrow().as_ref().unwrap().0).unwrap()
    }
}

impl GuardedObject for FakeObject {
    fn read(&self) -> Result<Option<(Vec<u8>, u64)>, i32> {
        Ok(self.data.borrow().clone())
    }
    fn write(&self, data: &[u8], expected: Option<u64>) -> Result<u64, i32> {
        if let Some(st) = self.interfere.borrow_mut().pop() {
            let seq = self
                .data
                .borrow()
                .as_ref()
                .map_or(0, |(b, _)| decode_object(b).unwrap().0);
            self.put(seq + 1, &st);
        }
        let cur = self.data.borrow().as_ref().map(|(_, v)| *v);
        match (cur, expected) {
            (Some(_), None) => return Err(libc::EEXIST),
            (Some(c), Some(e)) if c > e => return Err(libc::ERANGE),
            (Some(c), Some(e)) if c < e => return Err(libc::EOVERFLOW),
            _ => {}
        }
        *self.writes.borrow_mut() += 1;
        let v = cur.map_or(1, |v| v + 1);
        *self.data.borrow_mut() = Some((data.to_vec(), v));
        Ok(v)
    }
}

fn with_generation(g: u32) -> PrState {
    PrState {
        generation: g,
        ..PrState::default()
    }
}

/// Bump the generation by one (a stand-in for an SPC-4 action that changes state).
fn bump(cur: &PrState) -> Result<(PrState, ProutEffects), CmdError> {
    let next = with_generation(cur.generation + 1);
    Ok((
        next,
        ProutEffects {
            changed: true,
            ..Default::default()
        },
    ))
}

#[test]
fn object_round_trips_and_empty_is_initial() {
    let st = with_generation(7);
    assert_eq!(decode_object(&encode_object(42, &st)).unwrap(), (42, st));
    assert_eq!(decode_object(b"").unwrap(), (0, PrState::default()));
    assert_eq!(
        decode_object(b"{\"version\":1}xxxxxxxx"),
        Err(PrObjectError::BadMagic)
    );
    let mut bad = encode_object(1, &with_generation(1));
    let n = bad.len();
    bad[n - 3] ^= 1;
    assert!(matches!(
        decode_object(&bad),
        Err(PrObjectError::Corrupt(_))
    ));
}

#[test]
fn first_update_creates_the_object_exclusively() {
    let obj = FakeObject::default();
    let c = update(&obj, &mut bump).unwrap();
    assert_eq!((c.seq, c.state.generation), (1, 1));
    assert_eq!(obj.current(), (1, with_generation(1)));
}

#[test]
fn a_concurrent_commit_makes_the_update_reapply_to_the_newer_state() {
    let obj = FakeObject::default();
    obj.put(3, &with_generation(10));
    // Another gateway commits generation 20 between our read and our write.
    obj.interfere.borrow_mut().push(with_generation(20));
    let mut seen = Vec::new();
    let mut apply = |cur: &PrState| {
        seen.push(cur.generation);
        bump(cur)
    };
    let c = update(&obj, &mut apply).unwrap();
    assert_eq!(seen, vec![10, 20]);
    assert_eq!((c.seq, c.state.generation), (5, 21));
    assert_eq!(obj.current(), (5, with_generation(21)));
}

#[test]
fn a_concurrent_create_is_a_conflict_too() {
    let obj = FakeObject::default();
    obj.interfere.borrow_mut().push(with_generation(5));
    let c = update(&obj, &mut bump).unwrap();
    assert_eq!((c.seq, c.state.generation), (2, 6));
}

#[test]
fn endless_contention_gives_up() {
    let obj = FakeObject::default();
    obj.put(1, &with_generation(1));
    *obj.interfere.borrow_mut() = vec![with_generation(9); MAX_ATTEMPTS];
    assert!(matches!(update(&obj, &mut bump), Err(UpdateError::Contended(n)) if n == MAX_ATTEMPTS));
    assert_eq!(*obj.writes.borrow(), 0);
}

#[test]
fn unchanged_state_and_refused_commands_write_nothing() {
    let obj = FakeObject::default();
    obj.put(4, &with_generation(2));
    let mut same = |cur: &PrState| Ok((cur.clone(), ProutEffects::default()));
    let c = update(&obj, &mut same).unwrap();
    assert_eq!((c.seq, c.effects.changed), (4, false));
    let mut refuse = |_: &PrState| Err(CmdError::ReservationConflict);
    assert!(matches!(
        update(&obj, &mut refuse),
        Err(UpdateError::Command(CmdError::ReservationConflict))
    ));
    let mut bad = |_: &PrState| Err(CmdError::Check(Sense::INVALID_FIELD_IN_CDB));
    assert!(matches!(
        update(&obj, &mut bad),
        Err(UpdateError::Command(CmdError::Check(_)))
    ));
    assert_eq!(*obj.writes.borrow(), 0);
}

fn reply(acks: &[(u64, u64, &[u8])], timeouts: &[(u64, u64)]) -> Vec<u8> {
    let mut b = (acks.len() as u32).to_le_bytes().to_vec();
    for (g, c, p) in acks {
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&c.to_le_bytes());
        b.extend_from_slice(&(p.len() as u32).to_le_bytes());
        b.extend_from_slice(p);
    }
    b.extend_from_slice(&(timeouts.len() as u32).to_le_bytes());
    for (g, c) in timeouts {
        b.extend_from_slice(&g.to_le_bytes());
        b.extend_from_slice(&c.to_le_bytes());
    }
    b
}

#[test]
fn notify_reply_parses_acks_and_timeouts() {
    let b = reply(&[(4100, 1, b"ok"), (4200, 2, b"")], &[(4300, 3), (4300, 4)]);
    let r = parse_notify_reply(&b).unwrap();
    assert_eq!(r.acked, vec![(4100, 1), (4200, 2)]);
    assert_eq!(r.timed_out, vec![(4300, 3), (4300, 4)]);
    assert_eq!(parse_notify_reply(&b[..b.len() - 1]), None);
    assert_eq!(parse_notify_reply(&[0, 0, 0, 0]), None);
    assert_eq!(
        parse_notify_reply(&reply(&[], &[])),
        Some(NotifyReply::default())
    );
}

#[test]
fn silent_gateways_are_fenced_once_and_never_ourselves() {
    let r = NotifyReply {
        acked: vec![(1, 1)],
        timed_out: vec![(9, 1), (7, 2), (9, 3), (5, 4)],
    };
    assert_eq!(gateways_to_fence(&r, 5), vec![7, 9]);
    assert!(gateways_to_fence(&NotifyReply::default(), 5).is_empty());
}

#[test]
fn non_aptpl_state_is_cleared_only_when_no_other_gateway_serves() {
    let registered = {
        let mut s = PrState::default();
        let n = crate::scsi::ItNexus {
            initiator_name: "iqn.x:a".into(),
            isid: [0; 6],
            target_name: "iqn.t".into(),
            tpgt: 1,
            relative_port_id: 1,
        };
        // REGISTER with key 1.
        let mut p = vec![0u8; 24];
        p[8..16].copy_from_slice(&1u64.to_be_bytes());
        let cdb = [0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0];
        s.prout(&n, &cdb, &p, crate::scsi::pr::PrCaps { ptpl: true })
            .unwrap();
        s
    };
    assert_eq!(state_at_start(&registered, true), None);
    assert_eq!(state_at_start(&registered, false), Some(PrState::default()));
    let mut aptpl = registered.clone();
    aptpl.aptpl = true;
    assert_eq!(state_at_start(&aptpl, false), None);
    assert_eq!(state_at_start(&PrState::default(), false), None);
}

#[test]
fn notice_round_trips() {
    let n = PrNotice {
        seq: 9,
        state: with_generation(3),
        uas: vec![UaNotice {
            to: vec![],
            asc: 0x2a,
            ascq: 0x05,
        }],
        aborted: vec![],
    };
    assert_eq!(PrNotice::decode(&n.encode()), Some(n.clone()));
    assert_eq!(n.effects().uas.len(), 1);
    assert_eq!(PrNotice::decode(b""), None);
}
