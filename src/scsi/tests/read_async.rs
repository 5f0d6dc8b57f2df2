//! `LogicalUnit::start_read` against `execute`: the same checks and answers, the data
//! from the store's own thread, and no store I/O for a READ that a check ends.

use super::*;
use crate::scsi::backend::ReadDone;
use crate::scsi::sense::{key, Sense};
use crate::store::MemBackend;
use std::sync::mpsc;
use std::thread::{self, ThreadId};
use std::time::Duration;

/// Memory whose reads complete on a thread of their own, like librbd's aio.
#[derive(Debug)]
struct ThreadedMem {
    mem: Arc<MemBackend>,
    started: AtomicUsize,
    fail: AtomicBool,
}

impl BlockBackend for ThreadedMem {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.deallocate(offset, len)
    }
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        self.mem.allocation_at(offset)
    }
    fn reads_async(&self) -> bool {
        true
    }
    fn start_read(&self, len: usize, offset: u64, done: ReadDone) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let (mem, fail) = (self.mem.clone(), self.fail.load(Ordering::SeqCst));
        thread::spawn(move || {
            done(match fail {
                true => Err(io::Error::from_raw_os_error(libc::EIO)),
                false => mem.read_buf(len, offset),
            })
        });
    }
}

fn unit() -> (Arc<LogicalUnit>, Arc<ThreadedMem>) {
    let be = Arc::new(ThreadedMem {
        mem: Arc::new(MemBackend::new(BLOCKS as usize * 512)),
        started: AtomicUsize::new(0),
        fail: AtomicBool::new(false),
    });
    let settings = LunSettings {
        serial: "SN0002".into(),
        naa: [0x6B; 16],
        ..LunSettings::default()
    };
    (Arc::new(LogicalUnit::new(settings, be.clone())), be)
}

/// Start `c` and wait for its outcome; also which thread delivered it.
fn start(lu: &Arc<LogicalUnit>, c: &ScsiCommand) -> (ScsiOutcome, ThreadId) {
    let (tx, rx) = mpsc::channel();
    lu.start_read(
        c,
        Box::new(move |o| tx.send((o, thread::current().id())).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(10))
        .expect("done called")
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let (l, b) = (lba.to_be_bytes(), blocks.to_be_bytes());
    vec![0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

fn sense_of(o: &ScsiOutcome) -> Sense {
    assert_eq!(o.status, status::CHECK_CONDITION);
    Sense::decode(o.sense.as_ref().unwrap()).unwrap()
}

/// PR OUT `sa` (REGISTER 0, RESERVE 1) with `key` (REGISTER: the new key), `kind`.
fn pr_out(lu: &LogicalUnit, n: &Arc<ItNexus>, sa: u8, key: u64, kind: u8) {
    let mut param = [0u8; 24];
    let at = if sa == 0 { 8 } else { 0 };
    param[at..at + 8].copy_from_slice(&key.to_be_bytes());
    let cdb = [0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let o = lu.execute(&cmd(n, &cdb, &param));
    assert_eq!(o.status, status::GOOD, "PR OUT {sa}");
}

#[test]
fn only_reads_on_a_store_with_asynchronous_reads_qualify() {
    let (lu, _) = unit();
    for op in [0x08u8, 0x28, 0xA8, 0x88] {
        assert!(lu.reads_async(&[op]), "{op:#x}");
    }
    for op in [0x0Au8, 0x2A, 0x12, 0x00, 0x35, 0x2F] {
        assert!(!lu.reads_async(&[op]), "{op:#x}");
    }
    let file_like = LogicalUnit::new(LunSettings::default(), Arc::new(MemBackend::new(4096)));
    assert!(!file_like.reads_async(&read10(0, 1)));
}

#[test]
fn a_read_returns_what_execute_returns_from_the_stores_thread() {
    let (lu, be) = unit();
    let n = nexus(1);
    let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    let write = [0x2A, 0, 0, 0, 0, 5, 0, 0, 2, 0];
    assert_eq!(lu.execute(&cmd(&n, &write, &data)).status, status::GOOD);
    let reads: [&[u8]; 4] = [
        &[0x08, 0, 0, 5, 2, 0],
        &read10(5, 2),
        &[0xA8, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0],
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0],
    ];
    for cdb in reads {
        let c = cmd(&n, cdb, &[]);
        let (o, by) = start(&lu, &c);
        assert_eq!(o.status, status::GOOD);
        assert_eq!(&o.data_in[..], &data[..]);
        assert_eq!(o.data_in, lu.execute(&c).data_in);
        assert_ne!(by, thread::current().id());
    }
    assert_eq!(be.started.load(Ordering::SeqCst), 4);
}

#[test]
fn a_check_that_fails_answers_at_once_without_store_io() {
    let (lu, be) = unit();
    let n = nexus(1);
    let (o, by) = start(&lu, &cmd(&n, &read10(BLOCKS as u32 - 1, 2), &[]));
    assert_eq!(sense_of(&o), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(by, thread::current().id());
    // Zero blocks: GOOD, nothing read.
    let (o, _) = start(&lu, &cmd(&n, &read10(3, 0), &[]));
    assert_eq!((o.status, o.data_in.len()), (status::GOOD, 0));
    // RDPROTECT without protection information.
    let mut cdb = read10(0, 1);
    cdb[1] = 0x20;
    let (o, _) = start(&lu, &cmd(&n, &cdb, &[]));
    assert_eq!(sense_of(&o).key, key::ILLEGAL_REQUEST);
    assert_eq!(be.started.load(Ordering::SeqCst), 0);
}

#[test]
fn a_pending_unit_attention_is_reported_before_any_read() {
    let (lu, be) = unit();
    let n = nexus(1);
    lu.queue_unit_attention_for(&n, (0x2A, 0x09));
    let (o, _) = start(&lu, &cmd(&n, &read10(0, 1), &[]));
    assert_eq!(sense_of(&o), Sense::unit_attention(0x2A, 0x09));
    assert_eq!(be.started.load(Ordering::SeqCst), 0);
    let (o, _) = start(&lu, &cmd(&n, &read10(0, 1), &[]));
    assert_eq!(o.status, status::GOOD);
}

#[test]
fn another_nexus_exclusive_access_reservation_conflicts_reads() {
    let (lu, be) = unit();
    let (holder, other) = (nexus(1), nexus(2));
    pr_out(&lu, &holder, 0, 0xAA, 0);
    pr_out(&lu, &holder, 1, 0xAA, 3); // Exclusive Access
    let (o, _) = start(&lu, &cmd(&other, &read10(0, 1), &[]));
    assert_eq!(o.status, status::RESERVATION_CONFLICT);
    assert_eq!(be.started.load(Ordering::SeqCst), 0);
    let (o, _) = start(&lu, &cmd(&holder, &read10(0, 1), &[]));
    assert_eq!(o.status, status::GOOD);
}

#[test]
fn a_store_error_is_a_medium_error() {
    let (lu, be) = unit();
    be.fail.store(true, Ordering::SeqCst);
    let (o, _) = start(&lu, &cmd(&nexus(1), &read10(0, 1), &[]));
    assert_eq!(sense_of(&o).key, key::MEDIUM_ERROR);
}
