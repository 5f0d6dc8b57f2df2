//! Device-server micro-benchmarks on the in-memory backend: the READ(16) dispatch path
//! through `LunMap::execute`, and the persistent-reservation access check with 1,000
//! registrations (`cargo bench --bench scsi`).

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use holdfast::scsi::{status, ItNexus, LogicalUnit, LunMap, LunSettings, ScsiCommand};
use holdfast::store::MemBackend;
use std::collections::BTreeMap;
use std::sync::Arc;

const LUN_BYTES: usize = 64 << 20;
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

fn lu() -> Arc<LogicalUnit> {
    let settings = LunSettings {
        serial: "BENCH0001".into(),
        naa: [0x6a; 16],
        block_size: BLOCK,
        physical_block_size: BLOCK,
        ..LunSettings::default()
    };
    Arc::new(LogicalUnit::new(
        settings,
        Arc::new(MemBackend::new(LUN_BYTES)),
    ))
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

const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;

fn dispatch(c: &mut Criterion) {
    let lu = lu();
    let map = LunMap::new(BTreeMap::from([(1u64, lu)]));
    let n = nexus(0);
    let cmd = command(&n, &rw16(READ_16, 2048, 4096 / BLOCK), Bytes::new(), 4096);
    c.bench_function("dispatch/read16_4KiB", |b| {
        b.iter(|| {
            let o = map.execute(black_box(&cmd));
            debug_assert_eq!(o.status, status::GOOD);
            black_box(o.data_in.len())
        })
    });
}

/// PERSISTENT RESERVE OUT with a basic 24-byte parameter list.
fn prout(lu: &LogicalUnit, n: &Arc<ItNexus>, action: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = action;
    cdb[2] = ty;
    cdb[5..9].copy_from_slice(&24u32.to_be_bytes());
    lu.execute(&command(n, &cdb, Bytes::from(p), 0)).status
}

fn pr_access(c: &mut Criterion) {
    const REGISTER: u8 = 0;
    const RESERVE: u8 = 1;
    const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    let lu = lu();
    let nexuses: Vec<_> = (0..1000).map(nexus).collect();
    for (i, n) in nexuses.iter().enumerate() {
        assert_eq!(
            prout(&lu, n, REGISTER, 0, 0, 0x1000 + i as u64),
            status::GOOD
        );
    }
    assert_eq!(
        prout(
            &lu,
            &nexuses[0],
            RESERVE,
            WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            0x1000,
            0
        ),
        status::GOOD
    );
    // The last registered nexus is the worst case for a linear lookup.
    let registered = nexuses[999].clone();
    let stranger = nexus(5000);
    let data = Bytes::from(vec![0x11u8; 4096]);
    let mut g = c.benchmark_group("pr_access_1000_registrations");
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

criterion_group!(benches, dispatch, pr_access);
criterion_main!(benches);
