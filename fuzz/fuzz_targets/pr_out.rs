//! Persistent reservations: PR OUT with arbitrary (mostly well-formed) parameter lists
//! and iSCSI TransportIDs, PR IN, SCSI-2 RESERVE/RELEASE, I/O, resets and nexus losses
//! from four nexuses on one LU with an in-memory APTPL store (that can be made to
//! fail). After every step the state must be self-consistent: the generation never
//! decreases; READ KEYS, READ FULL STATUS and READ RESERVATION agree with each other
//! and with the state; the state survives its own serialisation; the store holds
//! exactly the state when APTPL is set and nothing otherwise; a write that got GOOD was
//! allowed by the reservation.
//!
//! Input: records, each [op: bits 0-1 nexus, 2 flag, 4-7 kind] then by kind:
//! 1 PR OUT built from fields (see `prout`), 2 PR IN [sa][alloc u16 LE], 3 READ/WRITE
//! (flag: write), 4 RESERVE(6)/RELEASE(6) (flag: reserve), 5 reset, 6 nexus loss,
//! 7 store failures on/off (flag); anything else a raw command
//! [CDB length u8][CDB][Data-Out length u16 LE][Data-Out] (the seed format).
#![no_main]

use bytes::Bytes;
use holdfast::scsi::pr::PrCaps;
use holdfast::scsi::{status, LogicalUnit, LunSettings, PrState, PrStore, ScsiCommand, TaskAttr};
use holdfast::store::MemBackend;
use holdfast_fuzz::{nexuses, Cursor, INITIATOR_A, INITIATOR_B};
use libfuzzer_sys::fuzz_target;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone)]
struct MemStore {
    saved: Arc<Mutex<Option<Vec<u8>>>>,
    fail: Arc<AtomicBool>,
}

impl MemStore {
    fn fail_now(&self) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            Err(io::Error::other("injected store failure"))
        } else {
            Ok(())
        }
    }
}

impl PrStore for MemStore {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.saved.lock().unwrap().clone())
    }
    fn save(&self, bytes: &[u8]) -> io::Result<()> {
        self.fail_now()?;
        *self.saved.lock().unwrap() = Some(bytes.to_vec());
        Ok(())
    }
    fn remove(&self) -> io::Result<()> {
        self.fail_now()?;
        *self.saved.lock().unwrap() = None;
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// A key: mostly one of a few (so registrations collide and match), or zero, or any.
fn key(c: &mut Cursor) -> u64 {
    match c.u8() % 8 {
        k @ 0..=3 => 0x1000 + u64::from(k),
        4 => 0,
        _ => u64::from(c.u32()) << 32 | u64::from(c.u32()),
    }
}

fn name(i: u8) -> &'static str {
    [
        INITIATOR_A,
        INITIATOR_B,
        "iqn.2026-11.org.example:stranger",
        "x",
    ][usize::from(i % 4)]
}

/// One TransportID: iSCSI format 00b (name only), 01b (name and ISID), or raw bytes.
fn transport_id(c: &mut Cursor) -> Vec<u8> {
    let t = c.u8();
    let (format, text) = match t >> 6 {
        2 => {
            let len = usize::from(c.u8());
            return c.take(len).to_vec();
        }
        1 => (
            0x40,
            format!("{},i,0x80000223d00{:02x}", name(t), (t >> 2) % 4),
        ),
        _ => (0u8, name(t).to_string()),
    };
    let mut body = text.into_bytes();
    body.push(0);
    // Padded to a multiple of four, at least 20 bytes in all.
    while body.len() % 4 != 0 || body.len() + 4 < 20 {
        body.push(0);
    }
    let mut out = vec![format | 0x05, 0];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn adjust(len: usize, by: i8) -> u32 {
    (len as i64 + i64::from(by)).clamp(0, u32::MAX as i64) as u32
}

/// A PR OUT CDB and parameter list built from the input: mostly well-formed, with
/// lengths bent on request.
fn prout(c: &mut Cursor) -> (Vec<u8>, Vec<u8>) {
    let sa = c.u8() % 16;
    let scope_type = c.u8();
    let (k, sa_k) = (key(c), key(c));
    let flags = c.u8();
    let rel_port = u16::from_le_bytes([c.u8(), c.u8()]);
    let ntids = c.u8() % 5;
    let tid: Vec<u8> = (0..ntids).flat_map(|_| transport_id(c)).collect();
    let len_adjust = if flags & 0x20 != 0 { c.u8() as i8 } else { 0 };
    let tid_len_adjust = if flags & 0x40 != 0 { c.u8() as i8 } else { 0 };
    let (spec_i_pt, all_tg_pt, aptpl, unreg) = (
        flags & 8 != 0,
        flags & 4 != 0,
        flags & 1 != 0,
        flags & 2 != 0,
    );
    let mut params = Vec::new();
    params.extend_from_slice(&k.to_be_bytes());
    params.extend_from_slice(&sa_k.to_be_bytes());
    if sa == 7 {
        // REGISTER AND MOVE.
        params.push(0);
        params.push(u8::from(unreg) << 1 | u8::from(aptpl));
        params.extend_from_slice(&rel_port.to_be_bytes());
        params.extend_from_slice(&adjust(tid.len(), tid_len_adjust).to_be_bytes());
        params.extend_from_slice(&tid);
    } else {
        params.extend_from_slice(&[0; 4]);
        params.push(u8::from(spec_i_pt) << 3 | u8::from(all_tg_pt) << 2 | u8::from(aptpl));
        params.extend_from_slice(&[0; 3]);
        if spec_i_pt {
            params.extend_from_slice(&adjust(tid.len(), tid_len_adjust).to_be_bytes());
            params.extend_from_slice(&tid);
        }
    }
    let len = adjust(params.len(), len_adjust);
    params.truncate(len as usize);
    let mut cdb = vec![0x5f, sa, scope_type, 0, 0];
    cdb.extend_from_slice(&len.to_be_bytes());
    cdb.push(0);
    (cdb, params)
}

fn prin_cdb(sa: u8, alloc: u16) -> [u8; 10] {
    let [a0, a1] = alloc.to_be_bytes();
    [0x5e, sa, 0, 0, 0, 0, 0, a0, a1, 0]
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn invariants(st: &PrState, prev_gen: u32, store: &MemStore) {
    assert!(
        st.generation >= prev_gen,
        "generation went back from {prev_gen} to {}",
        st.generation
    );
    let caps = PrCaps { ptpl: true };
    let n = st.registrations.len();

    let keys = st.prin(&prin_cdb(0, 0xffff), caps).expect("READ KEYS");
    assert_eq!(be32(&keys, 0), st.generation, "READ KEYS generation");
    let add = be32(&keys, 4) as usize;
    assert_eq!(add, 8 * n, "READ KEYS length vs {n} registrations");
    let mut listed: Vec<u64> = keys[8..].chunks(8).map(|k| be64(k, 0)).collect();

    let full = st
        .prin(&prin_cdb(3, 0xffff), caps)
        .expect("READ FULL STATUS");
    assert_eq!(be32(&full, 0), st.generation, "READ FULL STATUS generation");
    let add = be32(&full, 4) as usize;
    if add + 8 <= full.len() {
        let mut at = 8;
        let mut described = Vec::new();
        while at < 8 + add {
            assert!(at + 24 <= full.len(), "truncated full status descriptor");
            described.push(be64(&full, at));
            at += 24 + be32(&full, at + 20) as usize;
        }
        assert_eq!(at, 8 + add, "descriptors overrun the additional length");
        listed.sort_unstable();
        described.sort_unstable();
        assert_eq!(listed, described, "READ KEYS and READ FULL STATUS disagree");
    }

    let res = st
        .prin(&prin_cdb(1, 0xffff), caps)
        .expect("READ RESERVATION");
    assert_eq!(be32(&res, 0), st.generation, "READ RESERVATION generation");
    match &st.reservation {
        None => assert_eq!(be32(&res, 4), 0, "READ RESERVATION without a reservation"),
        Some(r) => {
            assert_eq!(be32(&res, 4), 16);
            let holder = st.registrations.iter().find(|g| g.id == r.holder);
            if r.ty.all_registrants() {
                assert!(n > 0, "all-registrants reservation without registrants");
            } else {
                let holder = holder.expect("reservation holder is not registered");
                assert_eq!(be64(&res, 8), holder.key, "READ RESERVATION key");
            }
        }
    }

    let bytes = st.to_bytes();
    assert_eq!(&PrState::from_bytes(&bytes).expect("own state decodes"), st);

    match &*store.saved.lock().unwrap() {
        Some(saved) => {
            assert!(st.aptpl, "state saved while APTPL is off");
            assert_eq!(
                &PrState::from_bytes(saved).expect("saved state decodes"),
                st
            );
        }
        None => assert!(!st.aptpl, "APTPL set but nothing saved"),
    }
}

fuzz_target!(|data: &[u8]| {
    let backend = Arc::new(MemBackend::new(64 * 1024));
    let store = MemStore::default();
    let settings = LunSettings {
        serial: "fuzzpr".into(),
        ..LunSettings::default()
    };
    let lu =
        LogicalUnit::with_persistence(settings.clone(), backend.clone(), Box::new(store.clone()))
            .expect("empty store loads");
    let nx = nexuses();
    let mut gen = 0;
    let mut c = Cursor::new(data);
    for _ in 0..40 {
        if c.is_empty() {
            break;
        }
        let op = c.u8();
        let flag = op & 4 != 0;
        let (cdb, data) = match op >> 4 {
            1 => prout(&mut c),
            2 => {
                let sa = c.u8() % 8;
                (
                    prin_cdb(sa, u16::from_le_bytes([c.u8(), c.u8()])).to_vec(),
                    vec![],
                )
            }
            3 => {
                let op = if flag { 0x2a } else { 0x28 };
                (vec![op, 0, 0, 0, 0, 1, 0, 0, 1, 0], vec![0xab; 512])
            }
            4 => (vec![if flag { 0x16 } else { 0x17 }, 0, 0, 0, 0, 0], vec![]),
            5 => {
                lu.reset();
                continue;
            }
            6 => {
                lu.nexus_lost(&nx[usize::from(op & 3)]);
                continue;
            }
            7 => {
                store.fail.store(flag, Ordering::Relaxed);
                continue;
            }
            _ => {
                // A captured or made-up command as it is.
                let len = usize::from(c.u8());
                let cdb = c.take(len).to_vec();
                let len = usize::from(u16::from_le_bytes([c.u8(), c.u8()]));
                (cdb, c.take(len).to_vec())
            }
        };
        let nexus = nx[usize::from(op & 3)].clone();
        let before = lu.pr_state();
        let cmd = ScsiCommand {
            nexus: nexus.clone(),
            lun: 0,
            cdb: Bytes::from(cdb),
            data_out_len: data.len() as u32,
            data_out: Bytes::from(data),
            data_in_len: 0xffff,
            attr: TaskAttr::Simple,
        };
        let out = lu.execute(&cmd);
        let after = lu.pr_state();
        if out.status == status::GOOD && cmd.cdb.first() == Some(&0x2a) {
            assert!(
                before.allows(&nexus, true),
                "write allowed against {before:?}"
            );
        }
        if out.status != status::GOOD && cmd.cdb.first() == Some(&0x5f) {
            assert_eq!(before, after, "failed PR OUT changed the state");
        }
        invariants(&after, gen, &store);
        gen = after.generation;
    }
    // What was persisted comes back on a restart.
    store.fail.store(false, Ordering::Relaxed);
    let again = LogicalUnit::with_persistence(settings, backend, Box::new(store.clone()))
        .expect("saved state loads");
    let now = lu.pr_state();
    if now.aptpl {
        assert_eq!(again.pr_state(), now);
    } else {
        assert_eq!(again.pr_state(), PrState::default());
    }
});
