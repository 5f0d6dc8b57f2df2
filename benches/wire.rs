//! Wire-layer micro-benchmarks: PDU decode/encode and the CRC32C digest.
//!
//! `cargo bench --bench wire`. The Data-In cases compare the copying `encode` (header and
//! payload into one buffer) with `encode_parts` (header only; the payload is sent from
//! its own buffer), which is what the target's writer uses.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use holdfast::wire::{self, codec, Bhs, DigestConfig, Pdu, PduDecoder};

const NO_DIGESTS: DigestConfig = DigestConfig {
    header: false,
    data: false,
};

fn read16_command() -> Pdu {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&123_456u64.to_be_bytes());
    cdb[10..14].copy_from_slice(&8u32.to_be_bytes());
    Pdu {
        bhs: Bhs::ScsiCommand(wire::ScsiCommand {
            final_: true,
            read: true,
            attr: 1,
            lun: 0x0001_0000_0000_0000,
            itt: 42,
            expected_data_transfer_length: 4096,
            cmd_sn: 7,
            exp_stat_sn: 9,
            cdb,
            ..Default::default()
        }),
        ahs: Vec::new(),
        data: Bytes::new(),
    }
}

fn data_in(len: usize) -> Pdu {
    Pdu {
        bhs: Bhs::DataIn(wire::DataIn {
            final_: true,
            status_present: true,
            itt: 42,
            ttt: wire::RESERVED_TAG,
            stat_sn: 3,
            exp_cmd_sn: 8,
            max_cmd_sn: 135,
            ..Default::default()
        }),
        ahs: Vec::new(),
        data: Bytes::from(vec![0x5a; len]),
    }
}

fn encoded(p: &Pdu, d: DigestConfig) -> Bytes {
    let mut b = BytesMut::new();
    wire::encode(p, d, &mut b);
    b.freeze()
}

fn scsi_command(c: &mut Criterion) {
    let mut g = c.benchmark_group("scsi_command");
    let p = read16_command();
    let bytes = encoded(&p, NO_DIGESTS);
    let mut out = BytesMut::with_capacity(1024);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            wire::encode(black_box(&p), NO_DIGESTS, &mut out);
            black_box(out.len())
        })
    });
    let mut dec = PduDecoder::new(1 << 20);
    g.bench_function("decode", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&bytes[..]),
            |buf| dec.decode(buf).unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn data_in_pdus(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_in");
    for (name, len) in [("4KiB", 4096usize), ("256KiB", 256 * 1024)] {
        let p = data_in(len);
        g.throughput(Throughput::Bytes(len as u64));
        let mut out = BytesMut::with_capacity(len + 1024);
        g.bench_function(format!("encode_copy/{name}"), |b| {
            b.iter(|| {
                out.clear();
                wire::encode(black_box(&p), NO_DIGESTS, &mut out);
                black_box(out.len())
            })
        });
        g.bench_function(format!("encode_parts/{name}"), |b| {
            b.iter(|| {
                out.clear();
                let t = codec::encode_parts(black_box(&p), NO_DIGESTS, &mut out);
                black_box((out.len(), t, p.data.clone()))
            })
        });
        let bytes = encoded(&p, NO_DIGESTS);
        let mut dec = PduDecoder::new(1 << 24);
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| dec.decode(buf).unwrap().unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn crc32c_digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for (name, len) in [("8KiB", 8192usize), ("256KiB", 256 * 1024)] {
        let data = vec![0xa5u8; len];
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| b.iter(|| codec::data_digest(black_box(&data))));
    }
    g.finish();
}

criterion_group!(benches, scsi_command, data_in_pdus, crc32c_digest);
criterion_main!(benches);
