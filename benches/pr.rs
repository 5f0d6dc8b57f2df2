//! The per-command persistent-reservation access check with 4,096 registrations (the
//! most one LU keeps), `cargo bench --bench pr`.
//!
//! `allows/*` times `PrState::allows` alone for a registered nexus (the last one
//! registered: the worst case for a scan) and an unregistered one, READ and WRITE, under
//! Exclusive Access, Write Exclusive – Registrants Only and Write Exclusive – All
//! Registrants. `execute/*` times a whole 4 KiB READ(16) / WRITE(16) through
//! `LogicalUnit::execute` on the in-memory backend with WERO held, so the check's share of
//! a command is visible.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use holdfast::scsi::pr::PrCaps;
use holdfast::scsi::{status, ItNexus, LogicalUnit, LunSettings, PrState, ScsiCommand};
use holdfast::store::MemBackend;
use std::sync::Arc;

const REGISTRATIONS: u32 = 4096;
const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
const BLOCK: u32 = 512;

fn nexus(i: u32) -> Arc<ItNexus> {
    Arc::new(ItNexus {
        initiator_name: format!("iqn.2026-11.org.holdfast.bench:node{i}"),
        isid: [0x80, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8],
        target_name: "iqn.2026-11.org.holdfast:storage".into(),
        tpgt: 1,
        relative_port_id: 1,
    })
}

fn prout_cdb(action: u8, ty: u8) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = action;
    cdb[2] = ty;
    cdb[5..9].copy_from_slice(&24u32.to_be_bytes());
    cdb
}

fn prout_params(key: u64, sa_key: u64) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

fn key(i: u32) -> u64 {
    0x1000 + u64::from(i)
}

/// A PR state with every nexus registered and `ty` reserved by the first.
fn state(nexuses: &[Arc<ItNexus>], ty: u8) -> PrState {
    let caps = PrCaps { ptpl: false };
    let mut st = PrState::default();
    for (i, n) in (0..).zip(nexuses) {
        st.prout(n, &prout_cdb(REGISTER, 0), &prout_params(0, key(i)), caps)
            .expect("REGISTER");
    }
    st.prout(
        &nexuses[0],
        &prout_cdb(RESERVE, ty),
        &prout_params(key(0), 0),
        caps,
    )
    .expect("RESERVE");
    st
}

fn allows(c: &mut Criterion) {
    let nexuses: Vec<_> = (0..REGISTRATIONS).map(nexus).collect();
    let registered = nexuses[nexuses.len() - 1].clone();
    let stranger = nexus(REGISTRATIONS + 1000);
    let mut g = c.benchmark_group("pr_allows_4096_registrations");
    for (ty_name, ty) in [
        ("ea", EXCLUSIVE_ACCESS),
        ("wero", WRITE_EXCLUSIVE_REGISTRANTS_ONLY),
        ("wear", WRITE_EXCLUSIVE_ALL_REGISTRANTS),
    ] {
        let st = state(&nexuses, ty);
        for (who, n) in [("registered", &registered), ("unregistered", &stranger)] {
            for (op, write) in [("read", false), ("write", true)] {
                g.bench_function(format!("{ty_name}/{op}/{who}"), |b| {
                    b.iter(|| black_box(st.allows(black_box(n), write)))
                });
            }
        }
    }
    g.finish();
}

fn command(n: &Arc<ItNexus>, cdb: &[u8], data_out: Bytes, data_in_len: u32) -> ScsiCommand {
    ScsiCommand {
        nexus: n.clone(),
        lun: 1,
        cdb: Bytes::copy_from_slice(cdb),
        data_out_len: data_out.len() as u32,
        data_out,
        data_in_len,
        attr: Default::default(),
    }
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn lu_with_registrations(nexuses: &[Arc<ItNexus>]) -> LogicalUnit {
    let settings = LunSettings {
        serial: "BENCHPR01".into(),
        naa: [0x6b; 16],
        block_size: BLOCK,
        physical_block_size: BLOCK,
        ..LunSettings::default()
    };
    let lu = LogicalUnit::new(settings, Arc::new(MemBackend::new(16 << 20)));
    let run = |n: &Arc<ItNexus>, action, ty, params: Vec<u8>| {
        let cmd = command(n, &prout_cdb(action, ty), Bytes::from(params), 0);
        assert_eq!(lu.execute(&cmd).status, status::GOOD);
    };
    for (i, n) in (0..).zip(nexuses) {
        run(n, REGISTER, 0, prout_params(0, key(i)));
    }
    let holder = &nexuses[0];
    run(
        holder,
        RESERVE,
        WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
        prout_params(key(0), 0),
    );
    lu
}

fn execute(c: &mut Criterion) {
    const READ_16: u8 = 0x88;
    const WRITE_16: u8 = 0x8a;
    let nexuses: Vec<_> = (0..REGISTRATIONS).map(nexus).collect();
    let lu = lu_with_registrations(&nexuses);
    let registered = nexuses[nexuses.len() - 1].clone();
    let stranger = nexus(REGISTRATIONS + 1000);
    let data = Bytes::from(vec![0x11u8; 4096]);
    let mut g = c.benchmark_group("pr_execute_4096_registrations_wero");
    for (who, n, write_status) in [
        ("registered", &registered, status::GOOD),
        ("unregistered", &stranger, status::RESERVATION_CONFLICT),
    ] {
        let read = command(n, &rw16(READ_16, 0, 8), Bytes::new(), 4096);
        let write = command(n, &rw16(WRITE_16, 0, 8), data.clone(), 0);
        assert_eq!(lu.execute(&read).status, status::GOOD);
        assert_eq!(lu.execute(&write).status, write_status);
        g.bench_function(format!("read16_4KiB/{who}"), |b| {
            b.iter(|| black_box(lu.execute(black_box(&read)).status))
        });
        g.bench_function(format!("write16_4KiB/{who}"), |b| {
            b.iter(|| black_box(lu.execute(black_box(&write)).status))
        });
    }
    g.finish();
}

criterion_group!(benches, allows, execute);
criterion_main!(benches);
