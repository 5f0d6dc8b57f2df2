//! `holdfast guest run --device`: the test guest writing through a block device, such
//! as the kernel initiator's /dev/sdX, instead of its own iSCSI session.
//!
//! Same record layout and ack log as the iSCSI mode (so `guest check` judges both alike).
//! Every I/O is O_DIRECT (no page cache between us and the disk) and every write
//! O_DSYNC (acknowledged only once durable, like a FUA write). Linux fails a direct
//! write that got RESERVATION CONFLICT with EBADE (BLK_STS_NEXUS / RESV_CONFLICT) and
//! other paths with EIO, so either counts as fenced: it is logged as a `conflict` and
//! the run exits 75.

use super::guest::{
    ending_status, file_err, first_counter, install_signals, log_acked, log_refused, saved_state,
    AckEvent, AckLog, DiskContents, Ending, GuestError, Instance, Layout, Record, RunArgs, Stop,
};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::info;

/// O_DIRECT buffers are aligned to this (enough for any logical block size up to 4 KiB
/// and for the memory alignment the kernel asks of O_DIRECT).
const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes whose start is `ALIGN`-aligned.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        // Only the address is used, to find the aligned offset inside `raw`.
        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { raw, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The disk behind a device (or file) opened O_DIRECT|O_DSYNC.
#[derive(Clone)]
pub(super) struct Device {
    file: Arc<File>,
    layout: Layout,
}

impl Device {
    /// Open `path` and work out the layout from its size and `block_size`.
    pub(super) fn open(path: &Path, block_size: u32) -> Result<Device, GuestError> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((OFlag::O_DIRECT | OFlag::O_DSYNC).bits())
            .open(path)
            .map_err(file_err(path))?;
        let bytes = file.seek(SeekFrom::End(0)).map_err(file_err(path))?;
        let layout = Layout::new(bytes / u64::from(block_size.max(1)), block_size)?;
        Ok(Device {
            file: Arc::new(file),
            layout,
        })
    }

    /// Read every region (blocking).
    pub(super) fn scan(&self) -> std::io::Result<DiskContents> {
        let bs = u64::from(self.layout.block_size);
        let mut disk = DiskContents::new(self.layout);
        for (lba, n) in self.layout.reads() {
            let mut buf = AlignedBuf::new(n as usize * bs as usize);
            self.file.read_exact_at(buf.as_mut_slice(), lba * bs)?;
            disk.add_blocks(lba, buf.as_slice());
        }
        Ok(disk)
    }

    /// Write one record durably, off the async thread (a fenced or frozen disk may
    /// block the write for as long as the kernel's SCSI error handling takes).
    async fn write(&self, r: Record) -> std::io::Result<()> {
        let file = Arc::clone(&self.file);
        let bs = self.layout.block_size as usize;
        let offset = self.layout.block(r.epoch, r.counter) * bs as u64;
        tokio::task::spawn_blocking(move || {
            let mut buf = AlignedBuf::new(bs);
            buf.as_mut_slice().copy_from_slice(&r.encode(bs));
            file.write_all_at(buf.as_slice(), offset)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// What a failed write means: EBADE is how the kernel reports RESERVATION CONFLICT to
/// direct I/O, EIO through other paths (and for a dead path, which after the kernel's
/// own retries is as good as fenced).
fn ending_of_write_error(e: &std::io::Error) -> Ending {
    if matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EBADE | Errno::EIO)
    ) {
        Ending::Conflict
    } else {
        Ending::Error(e.to_string())
    }
}

/// `guest run --device PATH`; returns the exit status.
pub(super) async fn run(a: &RunArgs, path: &Path) -> Result<i32, GuestError> {
    let instance = a.instance.unwrap_or_else(rand::random);
    let saved = saved_state(a)?;
    let mut log = AckLog::open(&a.ack_log)?;
    let stop = install_signals().map_err(GuestError::Signals)?;
    let exit = |log: &mut AckLog, reason: &str| {
        log.log(&AckEvent::Exit {
            instance,
            epoch: a.epoch,
            reason: reason.to_string(),
        })
    };
    let dev = match Device::open(path, a.block_size) {
        Ok(d) => d,
        Err(e) => {
            exit(&mut log, "open-failed")?;
            return Err(e);
        }
    };
    let scanner = dev.clone();
    let scanned = tokio::task::spawn_blocking(move || scanner.scan())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let disk = match scanned {
        Ok(d) => d,
        Err(e) => {
            exit(&mut log, "error")?;
            return Err(file_err(path)(e));
        }
    };
    let first = first_counter(disk.max_counter(), saved.as_ref().map(|s| s.counter));
    log.log(&AckEvent::Start {
        instance,
        epoch: a.epoch,
        first,
    })?;
    info!(instance = %Instance(instance), epoch = a.epoch, first, slots = dev.layout.slots,
        records = disk.records.len(), device = %path.display(), "guest started");
    if saved.is_some() {
        if let Some(p) = &a.state_file {
            std::fs::remove_file(p).map_err(file_err(p))?;
        }
    }
    let mut w = DeviceWriter {
        a,
        instance,
        next: first,
        acked: 0,
        stop,
    };
    let ending = w.write_until_done(&dev, &mut log).await?;
    let (reason, code) = ending_status(&ending, a, instance, w.next);
    if let Err(e) = exit(&mut log, reason) {
        eprintln!("holdfast guest run: {e}");
    }
    info!(instance = %Instance(instance), epoch = a.epoch, acked = w.acked, reason, code,
        "guest exits");
    Ok(code)
}

/// The write loop of one run on a device: a counter per write, each acknowledged one
/// logged (the iSCSI mode's loop, without sessions to recover).
struct DeviceWriter<'a> {
    a: &'a RunArgs,
    instance: u64,
    /// The counter of the next write.
    next: u64,
    acked: u64,
    stop: watch::Receiver<Option<Stop>>,
}

impl DeviceWriter<'_> {
    /// Write until a signal, a limit, a conflict or an error ends the run. Errors are
    /// ack log failures (an acknowledged write that cannot be logged ends everything).
    async fn write_until_done(
        &mut self,
        dev: &Device,
        log: &mut AckLog,
    ) -> Result<Ending, GuestError> {
        loop {
            if let Some(s) = *self.stop.borrow() {
                return Ok(Ending::Signal(s));
            }
            if let Some(e) = self.limit_reached() {
                return Ok(e);
            }
            if let Some(e) = self.write_one(dev, log).await? {
                return Ok(e);
            }
            if let Some(e) = self.limit_reached() {
                return Ok(e);
            }
            // A signal cuts the pause short.
            let _ = tokio::time::timeout(self.a.interval, self.stop.changed()).await;
        }
    }

    fn limit_reached(&self) -> Option<Ending> {
        self.a.limit_reached(self.acked)
    }

    /// One write of the next counter; Some when it ends the run.
    async fn write_one(
        &mut self,
        dev: &Device,
        log: &mut AckLog,
    ) -> Result<Option<Ending>, GuestError> {
        let r = Record {
            instance: self.instance,
            epoch: self.a.epoch,
            counter: self.next,
        };
        if let Err(e) = dev.write(r).await {
            let ending = ending_of_write_error(&e);
            if matches!(ending, Ending::Conflict) {
                log_refused(log, &r);
            }
            return Ok(Some(ending));
        }
        self.acked += 1;
        Ok(log_acked(log, &r)?.map(|n| self.next = n).err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::guest::{check, parse_ack_log, EXIT_CONFLICT};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(dir: &Path, extra: &[&str]) -> RunArgs {
        let disk = dir.join("disk.img").display().to_string();
        let log = dir.join("acks.log").display().to_string();
        let mut argv = vec![
            "guest",
            "--device",
            &disk,
            "--ack-log",
            &log,
            "--interval",
            "1ms",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments parse").run
    }

    fn disk_file(dir: &Path, blocks: u64) {
        let f = File::create(dir.join("disk.img")).expect("create disk");
        f.set_len(blocks * 512).expect("size disk");
    }

    fn judge(dir: &Path) -> crate::cli::guest::CheckReport {
        let dev = Device::open(&dir.join("disk.img"), 512).expect("open disk");
        let disk = dev.scan().expect("scan disk");
        let text = std::fs::read_to_string(dir.join("acks.log")).expect("read log");
        let (events, bad) = parse_ack_log(&text);
        assert!(bad.is_empty(), "{bad:?}");
        check(&disk, &events)
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [512, 4096, 8192] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.as_slice().len(), len);
        }
    }

    #[tokio::test]
    async fn runs_on_a_file_continue_counting_and_pass_the_checker() {
        let dir = tempfile::tempdir().expect("tempdir");
        disk_file(dir.path(), 1 + 16 * 64);
        let a = args(dir.path(), &["--epoch", "3", "--exit-after", "20"]);
        assert_eq!(run(&a, a.device.as_ref().unwrap()).await.expect("run 1"), 0);
        let b = args(dir.path(), &["--epoch", "4", "--exit-after", "70"]);
        assert_eq!(run(&b, b.device.as_ref().unwrap()).await.expect("run 2"), 0);
        let report = judge(dir.path());
        assert!(report.ok, "{report}");
        let text = std::fs::read_to_string(dir.path().join("acks.log")).unwrap();
        // The second run starts above the first one's records, found on the disk.
        assert!(text.contains(" 4 21\n"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("ack ")).count(), 90);
        assert!(
            text.lines().last().unwrap().ends_with(" exit-after"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_lost_record_is_caught_after_a_device_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        disk_file(dir.path(), 1 + 16 * 64);
        let a = args(dir.path(), &["--epoch", "1", "--exit-after", "5"]);
        assert_eq!(run(&a, a.device.as_ref().unwrap()).await.expect("run"), 0);
        // Zero the block of counter 3 (epoch 1, 64 slots): an acknowledged write lost.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("disk.img"))
            .unwrap();
        f.write_all_at(&[0u8; 512], (1 + 64 + 3) * 512).unwrap();
        let report = judge(dir.path());
        assert!(!report.ok, "{report}");
    }

    #[test]
    fn eio_and_ebade_mean_fenced_other_errors_do_not() {
        for fenced in [Errno::EIO, Errno::EBADE] {
            let e = std::io::Error::from(fenced);
            assert!(matches!(ending_of_write_error(&e), Ending::Conflict));
        }
        let enospc = std::io::Error::from(Errno::ENOSPC);
        assert!(matches!(ending_of_write_error(&enospc), Ending::Error(_)));
        let (reason, code) = ending_status(
            &Ending::Conflict,
            &args(Path::new("/x"), &["--epoch", "1"]),
            1,
            1,
        );
        assert_eq!((reason, code), ("conflict", EXIT_CONFLICT));
    }

    #[test]
    fn a_disk_too_small_or_missing_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        disk_file(dir.path(), 8);
        assert!(matches!(
            Device::open(&dir.path().join("disk.img"), 512),
            Err(GuestError::Layout(_))
        ));
        assert!(matches!(
            Device::open(&dir.path().join("nope"), 512),
            Err(GuestError::File { .. })
        ));
    }
}
