//! Device server tests against an in-memory backend with a hole map.

use super::backend::BlockBackend;
use super::lun::COMMANDS;
use super::opcode;
use super::{status, ItNexus, LogicalUnit, LunMap, LunSettings, ScsiCommand, ScsiOutcome};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Allocation granularity of the test backend.
const GRAN: usize = 512;

#[derive(Debug)]
struct TestBackend {
    /// Bytes and per-GRAN "mapped" flags.
    inner: Mutex<(Vec<u8>, Vec<bool>)>,
    flushes: AtomicUsize,
    fail: AtomicBool,
}

impl TestBackend {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(TestBackend {
            inner: Mutex::new((vec![0; size], vec![false; size.div_ceil(GRAN)])),
            flushes: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }
    fn check(&self, off: u64, len: usize) -> io::Result<(usize, usize)> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected"));
        }
        let size = self.inner.lock().unwrap().0.len();
        let off = off as usize;
        if off + len > size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "beyond end"));
        }
        Ok((off, off + len))
    }
}

impl BlockBackend for TestBackend {
    fn size(&self) -> u64 {
        self.inner.lock().unwrap().0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, buf.len())?;
        buf.copy_from_slice(&self.inner.lock().unwrap().0[a..b]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, buf.len())?;
        let mut g = self.inner.lock().unwrap();
        g.0[a..b].copy_from_slice(buf);
        for m in &mut g.1[a / GRAN..b.div_ceil(GRAN)] {
            *m = true;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, len as usize)?;
        let mut g = self.inner.lock().unwrap();
        g.0[a..b].fill(0);
        for i in a.div_ceil(GRAN)..b / GRAN {
            g.1[i] = false;
        }
        Ok(())
    }
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        let g = self.inner.lock().unwrap();
        let i = offset as usize / GRAN;
        let state = *g.1.get(i).ok_or_else(|| io::Error::other("beyond end"))?;
        let run = g.1[i..].iter().take_while(|&&m| m == state).count();
        Ok((state, ((i + run) * GRAN - offset as usize) as u64))
    }
}

const BLOCKS: u64 = 1024;

fn nexus(i: u8) -> Arc<ItNexus> {
    Arc::new(ItNexus {
        initiator_name: format!("iqn.2024-01.test:init{i}"),
        isid: [0x40, 0, 0, 0, 0, i],
        target_name: "iqn.2024-01.test:target".into(),
        tpgt: 1,
        relative_port_id: 1,
    })
}

fn settings() -> LunSettings {
    LunSettings {
        serial: "SN0001".into(),
        naa: [0x6A; 16],
        ..LunSettings::default()
    }
}

fn lu_with(s: LunSettings) -> (LogicalUnit, Arc<TestBackend>) {
    let be = TestBackend::new((BLOCKS * u64::from(s.block_size)) as usize);
    (LogicalUnit::new(s, be.clone()), be)
}

fn lu() -> (LogicalUnit, Arc<TestBackend>) {
    lu_with(settings())
}

fn cmd(n: &Arc<ItNexus>, cdb: &[u8], data: &[u8]) -> ScsiCommand {
    ScsiCommand {
        nexus: n.clone(),
        lun: 0,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(data),
        data_in_len: 65536,
        data_out_len: data.len() as u32,
        attr: Default::default(),
    }
}

fn run(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> ScsiOutcome {
    lu.execute(&cmd(&nexus(1), cdb, data))
}

/// (key, asc, ascq) from fixed or descriptor sense.
fn sense_of(o: &ScsiOutcome) -> (u8, u8, u8) {
    let s = o.sense.as_ref().expect("sense");
    match s[0] & 0x7F {
        0x70 => (s[2] & 0x0F, s[12], s[13]),
        0x72 => (s[1], s[2], s[3]),
        f => panic!("bad sense format {f:#x}"),
    }
}

#[track_caller]
fn assert_sense(o: &ScsiOutcome, key: u8, asc: u8, ascq: u8) {
    assert_eq!(o.status, status::CHECK_CONDITION, "{o:?}");
    assert_eq!(sense_of(o), (key, asc, ascq));
}

/// One GET LBA STATUS descriptor: LBA, number of blocks, provisioning status.
fn lba_status(lba: u64, blocks: u32, status: u8) -> Vec<u8> {
    let mut d = lba.to_be_bytes().to_vec();
    d.extend_from_slice(&blocks.to_be_bytes());
    d.extend_from_slice(&[status, 0, 0, 0]);
    d
}

#[track_caller]
fn assert_good(o: &ScsiOutcome) {
    assert_eq!(o.status, status::GOOD, "{o:?}");
}

fn rw10(opcode: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn rw16(opcode: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn caw(lba: u64, n: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode::COMPARE_AND_WRITE;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn test_unit_ready_and_unknown_opcode() {
    let (lu, _) = lu();
    assert_good(&run(&lu, &[0; 6], &[]));
    assert_sense(&run(&lu, &[0xFF, 0, 0, 0, 0, 0], &[]), 5, 0x20, 0);
    assert_sense(&run(&lu, &[], &[]), 5, 0x24, 0);
}

#[test]
fn naca_is_rejected_with_field_pointer() {
    let (lu, _) = lu();
    let o = run(&lu, &[0, 0, 0, 0, 0, 0x04], &[]);
    assert_sense(&o, 5, 0x24, 0);
    let s = o.sense.unwrap();
    assert_eq!(&s[15..18], &[0xCA, 0, 5]);
}

#[test]
fn standard_inquiry() {
    let (lu, _) = lu();
    let o = run(&lu, &[0x12, 0, 0, 0, 255, 0], &[]);
    assert_good(&o);
    let d = &o.data_in;
    assert_eq!(d.len(), 96);
    assert_eq!(&d[..8], &[0, 0, 6, 0x12, 91, 0x10, 0, 2]);
    assert_eq!(&d[8..16], b"HOLDFAST");
    assert_eq!(&d[16..32], b"holdfast disk   ");
    assert_eq!(&d[32..36], b"0001");
    assert_eq!(&d[62..64], &[0x04, 0xC0]); // SBC-3 version descriptor
    let o = run(&lu, &[0x12, 0, 0, 0, 5, 0], &[]);
    assert_eq!(o.data_in.len(), 5);
    // Page code without EVPD.
    let o = run(&lu, &[0x12, 0, 0x80, 0, 255, 0], &[]);
    assert_sense(&o, 5, 0x24, 0);
    assert_eq!(&o.sense.unwrap()[15..18], &[0xCF, 0, 2]);
}

#[test]
fn vpd_pages() {
    let (lu, _) = lu();
    let page = |p: u8| run(&lu, &[0x12, 1, p, 0x10, 0, 0], &[]);
    let o = page(0);
    assert_eq!(
        &o.data_in[..],
        &[0, 0, 0, 7, 0, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2]
    );
    assert_eq!(&page(0x80).data_in[..], b"\0\x80\0\x06SN0001");
    let d = page(0x83).data_in;
    assert_eq!(&d[4..8], &[1, 3, 0, 16]);
    assert_eq!(&d[8..24], &[0x6A; 16]);
    assert_eq!(&d[24..28], &[2, 1, 0, 14]);
    assert_eq!(&d[28..42], b"HOLDFASTSN0001");
    assert_eq!(&d[42..44], &[0x53, 0x98]);
    let name = b"iqn.2024-01.test:target,t,0x0001";
    assert_eq!(usize::from(d[45]), (name.len() + 1).div_ceil(4) * 4);
    assert_eq!(&d[46..46 + name.len()], name);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])), d.len() - 4);
    let d = page(0xB0).data_in;
    assert_eq!(d.len(), 64);
    assert_eq!(d[3], 0x3C);
    assert_eq!(d[4], 0); // WSNZ
    assert!(d[5] >= 16);
    assert_ne!(u32::from_be_bytes([d[20], d[21], d[22], d[23]]), 0);
    assert_ne!(u32::from_be_bytes([d[24], d[25], d[26], d[27]]), 0);
    let d = page(0xB1).data_in;
    assert_eq!(&d[..6], &[0, 0xB1, 0, 0x3C, 0, 1]);
    let d = page(0xB2).data_in;
    assert_eq!(&d[..], &[0, 0xB2, 0, 4, 0, 0xE4, 2, 0]);
    let o = page(0x99);
    assert_sense(&o, 5, 0x24, 0);
    // Allocation length truncates, never fails.
    let o = run(&lu, &[0x12, 1, 0x83, 0, 6, 0], &[]);
    assert_good(&o);
    assert_eq!(o.data_in.len(), 6);
}

#[test]
fn read_capacity() {
    let (lu, _) = lu();
    let o = run(&lu, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&o.data_in[..], &[0, 0, 3, 0xFF, 0, 0, 2, 0]);
    let got = run(&lu, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]);
    assert_sense(&got, 5, 0x24, 0);
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let o = run(&lu, &c, &[]);
    assert_eq!(o.data_in.len(), 32);
    assert_eq!(
        &o.data_in[..16],
        &[0, 0, 0, 0, 0, 0, 3, 0xFF, 0, 0, 2, 0, 0, 0, 0xC0, 0]
    );
    c[13] = 12;
    assert_eq!(run(&lu, &c, &[]).data_in.len(), 12);
    c[1] = 0x11; // unknown service action
    let o = run(&lu, &c, &[]);
    assert_sense(&o, 5, 0x24, 0);
    assert_eq!(&o.sense.unwrap()[15..18], &[0xCC, 0, 1]);
}

#[test]
fn write_read_roundtrip_all_sizes() {
    let (lu, _) = lu();
    let data = pattern(2 * 512, 7);
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 10, 2), &data));
    let o = run(&lu, &rw10(opcode::READ_10, 10, 2), &[]);
    assert_good(&o);
    assert_eq!(&o.data_in[..], &data[..]);
    let o = run(&lu, &rw16(opcode::READ_16, 11, 1), &[]);
    assert_eq!(&o.data_in[..], &data[512..]);
    let mut c12 = [0u8; 12];
    c12[0] = opcode::READ_12;
    c12[5] = 10;
    c12[9] = 1;
    assert_eq!(&run(&lu, &c12, &[]).data_in[..], &data[..512]);
    // READ(6)/WRITE(6) with 0 blocks mean 256.
    let big = pattern(256 * 512, 3);
    assert_good(&run(&lu, &[opcode::WRITE_6, 0, 1, 0, 0, 0], &big));
    let o = run(&lu, &[opcode::READ_6, 0, 1, 0, 0, 0], &[]);
    assert_eq!(o.data_in.len(), 256 * 512);
    assert_eq!(&o.data_in[..], &big[..]);
    // Zero-block READ(10) is GOOD with no data.
    let o = run(&lu, &rw10(opcode::READ_10, 0, 0), &[]);
    assert_good(&o);
    assert!(o.data_in.is_empty());
}

#[test]
fn lba_out_of_range() {
    let (lu, _) = lu();
    assert_sense(&run(&lu, &rw10(opcode::READ_10, 1023, 2), &[]), 5, 0x21, 0);
    assert_good(&run(&lu, &rw10(opcode::READ_10, 1023, 1), &[]));
    let got = run(&lu, &rw16(opcode::READ_16, u64::MAX, 1), &[]);
    assert_sense(&got, 5, 0x21, 0);
    let got = run(&lu, &rw16(opcode::WRITE_16, 1024, 1), &[0; 512]);
    assert_sense(&got, 5, 0x21, 0);
    assert_sense(&run(&lu, &rw10(opcode::READ_10, 1025, 0), &[]), 5, 0x21, 0);
    let got = run(&lu, &rw16(opcode::READ_16, 1 << 63, 0), &[]);
    assert_sense(&got, 5, 0x21, 0);
}

#[test]
fn protect_fields_and_transfer_limit() {
    let (lu, _) = lu();
    let mut c = rw10(opcode::READ_10, 0, 1);
    c[1] = 0x20;
    let o = run(&lu, &c, &[]);
    assert_sense(&o, 5, 0x24, 0);
    assert_eq!(&o.sense.unwrap()[15..18], &[0xCF, 0, 1]);
    let mut c = rw16(opcode::WRITE_16, 0, 1);
    c[1] = 0xE0;
    assert_sense(&run(&lu, &c, &[0; 512]), 5, 0x24, 0);
    // DPO/FUA/FUA_NV are accepted.
    let mut c = rw10(opcode::READ_10, 0, 1);
    c[1] = 0x1A;
    assert_good(&run(&lu, &c, &[]));
    let got = run(&lu, &rw16(opcode::READ_16, 0, 1 << 20), &[]);
    assert_sense(&got, 5, 0x24, 0);
}

#[test]
fn read_only_lun() {
    let (lu, _) = lu_with(LunSettings {
        read_only: true,
        ..settings()
    });
    let got = run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[0; 512]);
    assert_sense(&got, 7, 0x27, 0);
    let got = run(&lu, &rw16(opcode::WRITE_SAME_16, 0, 1), &[0; 512]);
    assert_sense(&got, 7, 0x27, 0);
    assert_sense(&run(&lu, &caw(0, 1), &[0; 1024]), 7, 0x27, 0);
    assert_good(&run(&lu, &rw10(opcode::READ_10, 0, 1), &[]));
    let o = run(&lu, &[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_eq!(o.data_in[2] & 0x80, 0x80);
}

#[test]
fn short_data_out_writes_whole_blocks_only() {
    let (lu, _) = lu();
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 2), &[b'a'; 1024]));
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 2), &[b'b'; 512]));
    let o = run(&lu, &rw10(opcode::READ_10, 0, 2), &[]);
    assert!(o.data_in[..512].iter().all(|&b| b == b'b'));
    assert!(o.data_in[512..].iter().all(|&b| b == b'a'));
    // Partial block / no data: nothing written, GOOD.
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[b'c'; 200]));
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[]));
    assert_eq!(run(&lu, &rw10(opcode::READ_10, 0, 1), &[]).data_in[0], b'b');
    // Longer Data-Out than the CDB: only the CDB's blocks.
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[b'd'; 1024]));
    let o = run(&lu, &rw10(opcode::READ_10, 0, 2), &[]);
    assert_eq!((o.data_in[0], o.data_in[512]), (b'd', b'a'));
}

#[test]
fn fua_and_write_cache_flush() {
    let (lu, be) = lu();
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[1; 512]));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 0);
    let mut c = rw10(opcode::WRITE_10, 0, 1);
    c[1] = 0x08;
    assert_good(&run(&lu, &c, &[1; 512]));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 1);
    assert_good(&run(&lu, &rw10(opcode::SYNC_CACHE_10, 0, 0), &[]));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 2);
    let got = run(&lu, &rw16(opcode::SYNC_CACHE_16, 2000, 0), &[]);
    assert_sense(&got, 5, 0x21, 0);
    let (lu, be) = lu_with(LunSettings {
        write_cache: false,
        ..settings()
    });
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[1; 512]));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn backend_errors_map_to_medium_errors() {
    let (lu, be) = lu();
    be.fail.store(true, Ordering::SeqCst);
    assert_sense(&run(&lu, &rw10(opcode::READ_10, 0, 1), &[]), 3, 0x11, 0);
    let got = run(&lu, &rw10(opcode::WRITE_10, 0, 1), &[0; 512]);
    assert_sense(&got, 3, 0x0C, 0);
}

#[test]
fn verify_variants() {
    let (lu, _) = lu();
    let data = pattern(1024, 9);
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 4, 2), &data));
    assert_good(&run(&lu, &rw10(opcode::VERIFY_10, 4, 2), &[]));
    let mut c = rw10(opcode::VERIFY_10, 4, 2);
    c[1] = 0x02;
    assert_good(&run(&lu, &c, &data));
    let mut bad = data.clone();
    bad[700] ^= 1;
    let o = run(&lu, &c, &bad);
    assert_sense(&o, 0x0E, 0x1D, 0);
    let s = o.sense.unwrap();
    assert_eq!(s[0], 0xF0);
    assert_eq!(&s[3..7], &700u32.to_be_bytes());
    // BYTCHK=3: one block compared against each.
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 8, 2), &[5; 1024]));
    let mut c = rw16(opcode::VERIFY_16, 8, 2);
    c[1] = 0x06;
    assert_good(&run(&lu, &c, &[5; 512]));
    let mut c = rw10(opcode::VERIFY_10, 4, 1);
    c[1] = 0x04;
    assert_sense(&run(&lu, &c, &[]), 5, 0x24, 0);
    let got = run(&lu, &rw10(opcode::VERIFY_10, 1024, 1), &[]);
    assert_sense(&got, 5, 0x21, 0);
    let mut c = rw10(opcode::VERIFY_10, 4, 1);
    c[1] = 0x20;
    assert_sense(&run(&lu, &c, &[]), 5, 0x24, 0);
}

#[test]
fn write_and_verify_and_orwrite() {
    let (lu, _) = lu();
    let data = pattern(512, 1);
    assert_good(&run(&lu, &rw10(opcode::WRITE_VERIFY_10, 3, 1), &data));
    assert_eq!(
        &run(&lu, &rw10(opcode::READ_10, 3, 1), &[]).data_in[..],
        &data[..]
    );
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 5, 1), &[0x0F; 512]));
    assert_good(&run(&lu, &rw16(opcode::ORWRITE_16, 5, 1), &[0xF0; 512]));
    assert!(run(&lu, &rw10(opcode::READ_10, 5, 1), &[])
        .data_in
        .iter()
        .all(|&b| b == 0xFF));
    let got = run(&lu, &rw16(opcode::ORWRITE_16, 1024, 1), &[0; 512]);
    assert_sense(&got, 5, 0x21, 0);
}

#[test]
fn compare_and_write() {
    let (lu, _) = lu();
    let old = pattern(1024, 2);
    let new = pattern(1024, 99);
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 20, 2), &old));
    let mut d = old.clone();
    d.extend_from_slice(&new);
    assert_good(&run(&lu, &caw(20, 2), &d));
    assert_eq!(
        &run(&lu, &rw10(opcode::READ_10, 20, 2), &[]).data_in[..],
        &new[..]
    );
    // Now the verify half is stale: miscompare at the first differing byte.
    let o = run(&lu, &caw(20, 2), &d);
    assert_sense(&o, 0x0E, 0x1D, 0);
    let first = old.iter().zip(&new).position(|(a, b)| a != b).unwrap();
    assert_eq!(&o.sense.unwrap()[3..7], &(first as u32).to_be_bytes());
    assert_eq!(
        &run(&lu, &rw10(opcode::READ_10, 20, 2), &[]).data_in[..],
        &new[..]
    );
    assert_sense(&run(&lu, &caw(1023, 2), &[0; 2048]), 5, 0x21, 0);
    assert_sense(&run(&lu, &caw(0, 255), &[]), 5, 0x24, 0);
    // Data-Out that does not match 2 × NUMBER OF LOGICAL BLOCKS is refused.
    assert_sense(&run(&lu, &caw(0, 1), &[0; 512]), 5, 0x24, 0);
    assert_sense(&run(&lu, &caw(0, 1), &[0; 2048]), 5, 0x24, 0);
    assert_sense(&run(&lu, &caw(0, 0), &[0; 512]), 5, 0x24, 0);
    assert_good(&run(&lu, &caw(0, 0), &[]));
    assert_eq!(lu.data_out_length(&caw(0, 3)), 3 * 1024);
}

#[test]
fn compare_and_write_is_atomic() {
    // A counter in block 100 is incremented only by CAW (read, CAW old→old+1, retry on
    // miscompare) from several threads while plain writes hit the neighbouring blocks of
    // the same stripe. Any non-atomic CAW would lose an update.
    let (lu, _) = lu();
    let lu = Arc::new(lu);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u8)
        .map(|t| {
            let (lu, stop) = (lu.clone(), stop.clone());
            std::thread::spawn(move || {
                let nx = nexus(10 + t);
                while !stop.load(Ordering::Relaxed) {
                    let o = lu.execute(&cmd(
                        &nx,
                        &rw10(opcode::WRITE_10, 101 + u32::from(t), 1),
                        &[t; 512],
                    ));
                    assert_eq!(o.status, status::GOOD);
                }
            })
        })
        .collect();
    let per_thread = 50u32;
    let incrementers: Vec<_> = (0..4u8)
        .map(|t| {
            let lu = lu.clone();
            std::thread::spawn(move || {
                let nx = nexus(20 + t);
                let mut done = 0;
                while done < per_thread {
                    let cur = lu.execute(&cmd(&nx, &rw10(opcode::READ_10, 100, 1), &[]));
                    let v = u32::from_be_bytes([
                        cur.data_in[0],
                        cur.data_in[1],
                        cur.data_in[2],
                        cur.data_in[3],
                    ]);
                    let mut d = cur.data_in.to_vec();
                    let mut next = d.clone();
                    next[..4].copy_from_slice(&(v + 1).to_be_bytes());
                    d.extend(next);
                    let o = lu.execute(&cmd(&nx, &caw(100, 1), &d));
                    if o.status == status::GOOD {
                        done += 1;
                    } else {
                        assert_eq!(sense_of(&o), (0x0E, 0x1D, 0));
                    }
                }
            })
        })
        .collect();
    for h in incrementers {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for h in writers {
        h.join().unwrap();
    }
    let r = run(&lu, &rw10(opcode::READ_10, 100, 1), &[]);
    assert_eq!(&r.data_in[..4], &(4 * per_thread).to_be_bytes());
}

#[test]
fn compare_and_write_races_compare_and_write() {
    // Many CAWs from "expected 0" to a distinct value: exactly one may win.
    let (lu, _) = lu();
    let lu = Arc::new(lu);
    let handles: Vec<_> = (0..8u8)
        .map(|t| {
            let lu = lu.clone();
            std::thread::spawn(move || {
                let mut d = vec![0u8; 512];
                d.extend(vec![t + 1; 512]);
                lu.execute(&cmd(&nexus(t), &caw(7, 1), &d)).status == status::GOOD
            })
        })
        .collect();
    let wins: usize = handles
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(wins, 1);
}

#[test]
fn write_same_and_lba_status() {
    let (lu, _) = lu();
    let blk = pattern(512, 4);
    assert_good(&run(&lu, &rw10(opcode::WRITE_SAME_10, 10, 5), &blk));
    let o = run(&lu, &rw10(opcode::READ_10, 10, 5), &[]);
    for c in o.data_in.chunks(512) {
        assert_eq!(c, &blk[..]);
    }
    // GET LBA STATUS: 10..15 mapped.
    let mut g = [0u8; 16];
    g[0] = 0x9E;
    g[1] = 0x12;
    g[9] = 10;
    g[13] = 64;
    let o = run(&lu, &g, &[]);
    assert_good(&o);
    assert_eq!(&o.data_in[..8], &[0, 0, 0, 36, 0, 0, 0, 0]);
    assert_eq!(
        &o.data_in[8..40],
        [lba_status(10, 5, 0), lba_status(15, 1009, 1)].concat()
    );
    // WRITE SAME(16) with UNMAP and a zero block deallocates.
    let mut c = rw16(opcode::WRITE_SAME_16, 11, 2);
    c[1] = 0x08;
    assert_good(&run(&lu, &c, &[0; 512]));
    let o = run(&lu, &g, &[]);
    assert_eq!(
        &o.data_in[8..40],
        [lba_status(10, 1, 0), lba_status(11, 2, 1)].concat()
    );
    assert!(run(&lu, &rw10(opcode::READ_10, 11, 2), &[])
        .data_in
        .iter()
        .all(|&b| b == 0));
    // NDOB: no Data-Out.
    let mut c = rw16(opcode::WRITE_SAME_16, 13, 1);
    c[1] = 0x09;
    assert_eq!(lu.data_out_length(&c), 0);
    assert_good(&run(&lu, &c, &[]));
    // 0 blocks runs to the end of the medium (WSNZ=0); beyond end, anchor, wrprotect.
    assert_good(&run(&lu, &rw10(opcode::WRITE_SAME_10, 1000, 0), &blk));
    let got = run(&lu, &rw10(opcode::WRITE_SAME_10, 1025, 0), &blk);
    assert_sense(&got, 5, 0x21, 0);
    let got = run(&lu, &rw16(opcode::WRITE_SAME_16, u64::MAX, 1), &blk);
    assert_sense(&got, 5, 0x21, 0);
    let mut c = rw10(opcode::WRITE_SAME_10, 0, 1);
    c[1] = 0x10;
    assert_sense(&run(&lu, &c, &blk), 5, 0x24, 0);
    c[1] = 0x20;
    assert_sense(&run(&lu, &c, &blk), 5, 0x24, 0);
    // GET LBA STATUS beyond the end.
    g[2..10].copy_from_slice(&1024u64.to_be_bytes());
    assert_sense(&run(&lu, &g, &[]), 5, 0x21, 0);
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    for &(lba, n) in descs {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
    }
    let len = d.len() as u16;
    d[0..2].copy_from_slice(&(len - 2).to_be_bytes());
    d[2..4].copy_from_slice(&(len - 8).to_be_bytes());
    d
}

fn unmap_cdb(len: u16, anchor: bool) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode::UNMAP;
    c[1] = u8::from(anchor);
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

#[test]
fn unmap() {
    let (lu, _) = lu();
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 0, 8), &[9; 8 * 512]));
    let l = unmap_list(&[(1, 2), (5, 1), (7, 0)]);
    assert_eq!(
        lu.data_out_length(&unmap_cdb(l.len() as u16, false)),
        l.len() as u32
    );
    assert_good(&run(&lu, &unmap_cdb(l.len() as u16, false), &l));
    let o = run(&lu, &rw10(opcode::READ_10, 0, 8), &[]);
    let zero: Vec<bool> = o
        .data_in
        .chunks(512)
        .map(|c| c.iter().all(|&b| b == 0))
        .collect();
    assert_eq!(zero, [false, true, true, false, false, true, false, false]);
    assert_good(&run(&lu, &unmap_cdb(0, false), &[]));
    let l = unmap_list(&[(1020, 5)]);
    assert_sense(&run(&lu, &unmap_cdb(l.len() as u16, false), &l), 5, 0x21, 0);
    assert_sense(&run(&lu, &unmap_cdb(24, true), &l), 5, 0x24, 0);
    assert_sense(&run(&lu, &unmap_cdb(4, false), &[0; 4]), 5, 0x1A, 0);
    let many: Vec<(u64, u32)> = (0..300).map(|i| (i, 1)).collect();
    let l = unmap_list(&many);
    assert_sense(&run(&lu, &unmap_cdb(l.len() as u16, false), &l), 5, 0x26, 0);
    // Fully provisioned LU: UNMAP is not offered.
    let (lu, _) = lu_with(LunSettings {
        thin_provisioning: false,
        ..settings()
    });
    let got = run(&lu, &unmap_cdb(24, false), &unmap_list(&[(0, 1)]));
    assert_sense(&got, 5, 0x20, 0);
}

#[test]
fn mode_sense_pages() {
    let (lu, _) = lu();
    let o = run(&lu, &[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_good(&o);
    let d = &o.data_in;
    assert_eq!(usize::from(d[0]) + 1, d.len());
    assert_eq!(&d[1..4], &[0, 0x10, 8]);
    assert_eq!(&d[4..12], &[0, 0, 4, 0, 0, 0, 2, 0]);
    assert_eq!(&d[12..15], &[0x08, 18, 0x04]);
    assert_eq!(&d[32..35], &[0x0A, 10, 0]);
    assert_eq!(&d[44..46], &[0x1C, 10]);
    assert_eq!(d.len(), 56);
    // DBD, single page, changeable values.
    let o = run(&lu, &[0x1A, 0x08, 0x48, 0, 255, 0], &[]);
    assert_eq!(
        &o.data_in[..],
        &[23, 0, 0x10, 0, 8, 18, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // MODE SENSE(10) with LLBAA.
    let o = run(&lu, &[0x5A, 0x10, 0x0A, 0, 0, 0, 0, 0, 255, 0], &[]);
    let d = &o.data_in;
    assert_eq!(&d[..8], &[0, 34, 0, 0x10, 1, 0, 0, 16]);
    assert_eq!(&d[8..16], &1024u64.to_be_bytes());
    assert_eq!(&d[20..24], &512u32.to_be_bytes());
    assert_eq!(&d[24..26], &[0x0A, 10]);
    // Truncation, saved values, unknown page, bad subpage.
    assert_eq!(run(&lu, &[0x1A, 0, 0x3F, 0, 3, 0], &[]).data_in.len(), 3);
    assert_sense(&run(&lu, &[0x1A, 0, 0xC8, 0, 255, 0], &[]), 5, 0x39, 0);
    assert_sense(&run(&lu, &[0x1A, 0, 0x05, 0, 255, 0], &[]), 5, 0x24, 0);
    assert_sense(&run(&lu, &[0x1A, 0, 0x08, 1, 255, 0], &[]), 5, 0x24, 0);
    assert_good(&run(&lu, &[0x1A, 0, 0x3F, 0xFF, 255, 0], &[]));
}

fn mode_select6(lu: &LogicalUnit, n: &Arc<ItNexus>, page: &[u8]) -> ScsiOutcome {
    let mut d = vec![0, 0, 0, 0];
    d.extend_from_slice(page);
    lu.execute(&cmd(n, &[0x15, 0x10, 0, 0, d.len() as u8, 0], &d))
}

#[test]
fn mode_select_changes_wce_and_raises_ua_for_others() {
    let (lu, be) = lu();
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    let mut caching = [0u8; 20];
    caching[0] = 0x08;
    caching[1] = 18;
    assert_good(&mode_select6(&lu, &a, &caching));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 1);
    let o = lu.execute(&cmd(&a, &[0x1A, 0, 0x08, 0, 255, 0], &[]));
    assert_eq!(o.data_in[14], 0);
    // The other nexus sees MODE PARAMETERS CHANGED once; the changer does not.
    assert_good(&lu.execute(&cmd(&a, &[0; 6], &[])));
    assert_sense(&lu.execute(&cmd(&b, &[0; 6], &[])), 6, 0x2A, 0x01);
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    // Writes now flush.
    assert_good(&lu.execute(&cmd(&a, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    assert_eq!(be.flushes.load(Ordering::SeqCst), 2);
    // Unchangeable field → INVALID FIELD IN PARAMETER LIST pointing at it.
    caching[2] = 0x01; // RCD
    let o = mode_select6(&lu, &a, &caching);
    assert_sense(&o, 5, 0x26, 0);
    assert_eq!(&o.sense.unwrap()[15..18], &[0x88, 0, 6]);
    // PF=0 and SP=1 are invalid fields in the CDB.
    let got = lu.execute(&cmd(&a, &[0x15, 0, 0, 0, 0, 0], &[]));
    assert_sense(&got, 5, 0x24, 0);
    let got = lu.execute(&cmd(&a, &[0x15, 0x11, 0, 0, 0, 0], &[]));
    assert_sense(&got, 5, 0x24, 0);
    // Wrong page length, unknown page, truncated header.
    assert_sense(&mode_select6(&lu, &a, &[0x08, 10, 0, 0]), 5, 0x26, 0);
    assert_sense(&mode_select6(&lu, &a, &[0x05, 2, 0, 0]), 5, 0x26, 0);
    let got = lu.execute(&cmd(&a, &[0x15, 0x10, 0, 0, 2, 0], &[0, 0]));
    assert_sense(&got, 5, 0x1A, 0);
}

#[test]
fn d_sense_switches_to_descriptor_format() {
    let (lu, _) = lu();
    let n = nexus(1);
    let mut control = [0u8; 12];
    control[0] = 0x0A;
    control[1] = 10;
    control[2] = 0x04;
    control[3] = 0x10;
    control[8] = 0xFF;
    control[9] = 0xFF;
    assert_good(&mode_select6(&lu, &n, &control));
    let o = lu.execute(&cmd(&n, &rw10(opcode::READ_10, 5000, 1), &[]));
    let s = o.sense.clone().unwrap();
    assert_eq!(&s[..4], &[0x72, 5, 0x21, 0]);
    assert_sense(&o, 5, 0x21, 0);
    // Miscompare in descriptor format carries an information descriptor.
    let mut c = rw10(opcode::VERIFY_10, 0, 1);
    c[1] = 0x02;
    let o = lu.execute(&cmd(&n, &c, &[1; 512]));
    let s = o.sense.unwrap();
    assert_eq!(&s[..8], &[0x72, 0x0E, 0x1D, 0, 0, 0, 0, 12]);
    assert_eq!(&s[8..20], &[0, 0x0A, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn request_sense_and_unit_attentions() {
    let (lu, _) = lu();
    let (a, b) = (nexus(1), nexus(2));
    let o = lu.execute(&cmd(&a, &[0x03, 0, 0, 0, 252, 0], &[]));
    assert_good(&o);
    assert_eq!(o.data_in.len(), 18);
    assert_eq!((o.data_in[2], o.data_in[12]), (0, 0));
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    lu.reset();
    // INQUIRY does not report the UA; REQUEST SENSE reports and clears it.
    assert_good(&lu.execute(&cmd(&a, &[0x12, 0, 0, 0, 36, 0], &[])));
    let o = lu.execute(&cmd(&a, &[0x03, 1, 0, 0, 252, 0], &[]));
    assert_good(&o);
    assert_eq!(&o.data_in[..4], &[0x72, 6, 0x29, 0x03]);
    assert_good(&lu.execute(&cmd(&a, &[0; 6], &[])));
    // The other nexus gets it as CHECK CONDITION on its next command.
    let got = lu.execute(&cmd(&b, &rw10(opcode::READ_10, 0, 1), &[]));
    assert_sense(&got, 6, 0x29, 0x03);
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    // A nexus first seen after the reset has none; a lost nexus forgets its UAs.
    assert_good(&lu.execute(&cmd(&nexus(3), &[0; 6], &[])));
    lu.queue_unit_attention(&|n| n.isid[5] == 2, 0x2A, 0x03);
    lu.nexus_lost(&b);
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    // Allocation length truncates sense data.
    let o = lu.execute(&cmd(&a, &[0x03, 0, 0, 0, 8, 0], &[]));
    assert_eq!(o.data_in.len(), 8);
}

#[test]
fn scsi2_reservations() {
    let (lu, _) = lu();
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&lu.execute(&cmd(&a, &[0x16, 0, 0, 0, 0, 0], &[])));
    assert_good(&lu.execute(&cmd(&a, &[0x16, 0, 0, 0, 0, 0], &[])));
    let o = lu.execute(&cmd(&b, &rw10(opcode::WRITE_10, 0, 1), &[0; 512]));
    assert_eq!(o.status, status::RESERVATION_CONFLICT);
    assert_eq!(o.sense, None);
    assert_eq!(
        lu.execute(&cmd(&b, &[0x16, 0, 0, 0, 0, 0], &[])).status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&lu.execute(&cmd(&b, &[0x12, 0, 0, 0, 36, 0], &[])));
    // A non-holder's RELEASE is GOOD without effect.
    assert_good(&lu.execute(&cmd(&b, &[0x17, 0, 0, 0, 0, 0], &[])));
    assert_eq!(
        lu.execute(&cmd(&b, &[0; 6], &[])).status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&lu.execute(&cmd(&a, &rw10(opcode::WRITE_10, 0, 1), &[0; 512])));
    assert_good(&lu.execute(&cmd(&a, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])));
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    // Released on nexus loss and on reset.
    assert_good(&lu.execute(&cmd(&a, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])));
    lu.nexus_lost(&a);
    assert_good(&lu.execute(&cmd(&b, &[0; 6], &[])));
    assert_good(&lu.execute(&cmd(&b, &[0x16, 0, 0, 0, 0, 0], &[])));
    lu.reset();
    let _ = lu.execute(&cmd(&a, &[0x03, 0, 0, 0, 18, 0], &[]));
    assert_good(&lu.execute(&cmd(&a, &[0; 6], &[])));
    // Third-party reservation is not supported.
    let got = lu.execute(&cmd(&a, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert_sense(&got, 5, 0x24, 0);
}

#[test]
fn report_supported_opcodes_matches_table() {
    let (lu, _) = lu();
    let rsoc = |opts: u8, opcode: u8, sa: u16| {
        let mut c = [0u8; 12];
        c[0] = 0xA3;
        c[1] = 0x0C;
        c[2] = opts;
        c[3] = opcode;
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c[6..10].copy_from_slice(&65535u32.to_be_bytes());
        run(&lu, &c, &[])
    };
    let o = rsoc(0, 0, 0);
    assert_good(&o);
    let d = &o.data_in;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len, COMMANDS.len() * 8);
    for (i, spec) in COMMANDS.iter().enumerate() {
        let e = &d[4 + 8 * i..12 + 8 * i];
        assert_eq!(e[0], spec.opcode);
        assert_eq!(
            u16::from_be_bytes([e[2], e[3]]),
            spec.service_action.unwrap_or(0)
        );
        assert_eq!(e[5] & 1, u8::from(spec.service_action.is_some()));
        assert_eq!(
            usize::from(u16::from_be_bytes([e[6], e[7]])),
            spec.usage.len()
        );
        assert_eq!(spec.usage[0], spec.opcode, "{}", spec.name);
        let opts = if spec.service_action.is_some() { 2 } else { 1 };
        let one = rsoc(opts, spec.opcode, spec.service_action.unwrap_or(0));
        assert_good(&one);
        assert_eq!(one.data_in[1] & 0x07, 3);
        assert_eq!(&one.data_in[4..], spec.usage);
        // The opposite option is an invalid field.
        assert_sense(
            &rsoc(3 - opts, spec.opcode, spec.service_action.unwrap_or(0)),
            5,
            0x24,
            0,
        );
        // The CDB usage bitmap's length is the CDB length the dispatcher requires.
        assert!(cdb_len_ok(spec.opcode, spec.usage.len()), "{}", spec.name);
    }
    // With timeouts descriptors.
    let o = rsoc(0x80, 0, 0);
    assert_eq!(o.data_in.len(), 4 + 20 * COMMANDS.len());
    assert_eq!(&o.data_in[12..14], &[0, 0x0A]);
    let o = rsoc(0x81, opcode::READ_10, 0);
    assert_eq!(o.data_in[1], 0x83);
    assert_eq!(&o.data_in[14..16], &[0, 0x0A]);
    // Not supported opcode.
    let o = rsoc(1, 0xC0, 0);
    assert_good(&o);
    assert_eq!(&o.data_in[..4], &[0, 1, 0, 0]);
    assert_sense(&rsoc(5, 0, 0), 5, 0x24, 0);
    // Truncation.
    let mut c = [0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[9] = 10;
    assert_eq!(run(&lu, &c, &[]).data_in.len(), 10);
}

fn cdb_len_ok(opcode: u8, len: usize) -> bool {
    super::cdb::cdb_len_for_opcode(opcode) == Some(len)
}

#[test]
fn misc_commands() {
    let (lu, _) = lu();
    assert_good(&run(&lu, &rw10(opcode::PRE_FETCH_10, 1023, 1), &[]));
    assert_eq!(
        run(&lu, &rw10(opcode::PRE_FETCH_10, 0, 1), &[]).status,
        status::GOOD
    );
    let got = run(&lu, &rw16(opcode::PRE_FETCH_16, 1024, 1), &[]);
    assert_sense(&got, 5, 0x21, 0);
    assert_good(&run(&lu, &[0x1B, 1, 0, 0, 1, 0], &[]));
    assert_good(&run(&lu, &[0x1B, 0, 0, 0, 0x30, 0], &[]));
    assert_sense(&run(&lu, &[0x1B, 1, 0, 0, 0x02, 0], &[]), 5, 0x24, 0);
    assert_good(&run(&lu, &[0x1E, 0, 0, 0, 1, 0], &[]));
    let o = run(&lu, &[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]);
    assert_eq!(&o.data_in[..], &[0, 0x18, 0, 0]);
    let o = run(&lu, &[0xB7, 0x08, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]);
    assert_eq!(&o.data_in[..], &[0, 0x08, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn data_out_lengths() {
    let (lu, _) = lu();
    assert_eq!(lu.data_out_length(&rw10(opcode::WRITE_10, 0, 3)), 1536);
    assert_eq!(
        lu.data_out_length(&[opcode::WRITE_6, 0, 0, 0, 0, 0]),
        256 * 512
    );
    assert_eq!(lu.data_out_length(&rw10(opcode::READ_10, 0, 3)), 0);
    assert_eq!(
        lu.data_out_length(&rw10(opcode::WRITE_SAME_10, 0, 300)),
        512
    );
    let mut v = rw10(opcode::VERIFY_10, 0, 2);
    assert_eq!(lu.data_out_length(&v), 0);
    v[1] = 0x02;
    assert_eq!(lu.data_out_length(&v), 1024);
    v[1] = 0x06;
    assert_eq!(lu.data_out_length(&v), 512);
    assert_eq!(lu.data_out_length(&[0x15, 0x10, 0, 0, 24, 0]), 24);
    assert_eq!(
        lu.data_out_length(&[0x55, 0x10, 0, 0, 0, 0, 0, 1, 2, 0]),
        258
    );
    assert_eq!(lu.data_out_length(&[0xFF; 16]), 0);
    assert_eq!(lu.data_out_length(&[]), 0);
    assert_eq!(lu.data_out_length(&rw16(opcode::WRITE_16, 0, u32::MAX)), 0);
}

#[test]
fn lun_map() {
    let (lu0, _) = lu();
    let (lu1, _) = lu();
    let mut m = BTreeMap::new();
    m.insert(0, Arc::new(lu0));
    m.insert(300, Arc::new(lu1));
    let map = LunMap::new(m);
    let n = nexus(1);
    let at = |lun: u64, cdb: &[u8]| {
        let mut c = cmd(&n, cdb, &[]);
        c.lun = lun;
        map.execute(&c)
    };
    let rl = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    for lun in [0, 5] {
        let o = at(lun, &rl);
        assert_good(&o);
        assert_eq!(
            &o.data_in[..],
            &[0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x41, 0x2C, 0, 0, 0, 0, 0, 0]
        );
    }
    let o = at(0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0]);
    assert_eq!(o.data_in.len(), 12);
    assert_sense(&at(7, &[0xA0, 0, 9, 0, 0, 0, 0, 0, 1, 0, 0, 0]), 5, 0x24, 0);
    let o = at(7, &[0x12, 0, 0, 0, 96, 0]);
    assert_good(&o);
    assert_eq!(o.data_in[0], 0x7F);
    let o = at(7, &[0x03, 0, 0, 0, 18, 0]);
    assert_good(&o);
    assert_eq!((o.data_in[2], o.data_in[12]), (5, 0x25));
    assert_sense(&at(7, &[0; 6]), 5, 0x25, 0);
    assert_good(&at(300, &[0; 6]));
    assert!(map.get(300).is_some());
    assert_eq!(map.data_out_length(0, &rw10(opcode::WRITE_10, 0, 1)), 512);
    assert_eq!(map.data_out_length(9, &rw10(opcode::WRITE_10, 0, 1)), 0);
}

#[test]
fn block_size_4096() {
    let (lu, _) = lu_with(LunSettings {
        block_size: 4096,
        ..settings()
    });
    let d = pattern(4096, 1);
    assert_good(&run(&lu, &rw10(opcode::WRITE_10, 1023, 1), &d));
    assert_eq!(
        &run(&lu, &rw10(opcode::READ_10, 1023, 1), &[]).data_in[..],
        &d[..]
    );
    let o = run(&lu, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&o.data_in[4..], &4096u32.to_be_bytes());
}

mod pr;
mod read_async;
mod tmf;

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn opcodes() -> impl Strategy<Value = u8> {
        let known: Vec<u8> = COMMANDS.iter().map(|c| c.opcode).collect();
        prop_oneof![4 => proptest::sample::select(known), 1 => any::<u8>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]
        #[test]
        fn random_cdbs_never_panic(
            opcode in opcodes(),
            rest in proptest::collection::vec(any::<u8>(), 0..20),
            small in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            thin in any::<bool>(),
        ) {
            let (lu, _) = lu_with(LunSettings { thin_provisioning: thin, ..settings() });
            let mut cdb = vec![opcode];
            cdb.extend(rest);
            if small {
                // Bias towards small LBAs/lengths so commands get past the range checks.
                for b in cdb.iter_mut().skip(2).take(6) { *b &= 0x01; }
            }
            let _ = lu.data_out_length(&cdb);
            let o = lu.execute(&cmd(&nexus(1), &cdb, &data));
            if o.status == status::CHECK_CONDITION {
                let s = o.sense.unwrap();
                prop_assert!(s[0] == 0x70 || s[0] == 0xF0 || s[0] == 0x72);
            }
            let mut m = BTreeMap::new();
            m.insert(0, Arc::new(lu));
            let map = LunMap::new(m);
            let mut c = cmd(&nexus(2), &cdb, &data);
            c.lun = u64::from(opcode & 1);
            let _ = map.execute(&c);
        }
    }
}
