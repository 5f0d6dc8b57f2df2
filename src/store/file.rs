//! A LUN backed by a (sparse) regular file or a block device, with positional I/O.

use super::{check_range, StoreError};
use crate::scsi::backend::{self, BlockBackend};
use bytes::BytesMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Chunk size of the zero-writing fallback of [`BlockBackend::deallocate`].
const ZERO_CHUNK: usize = 1 << 20;

/// Largest aligned piece one `pwrite` stores. A buffered write that brings a range into
/// the page cache gets a folio sized after the write (up to 2 MiB on ext4 since Linux
/// 6.16), and ext4 walks every block of a folio on each later write into it: a 4 KiB
/// write into a 1 MiB folio costs ~10 µs of kernel time, into a 16 KiB one ~2 µs. Block
/// targets mostly take small random writes, so large writes go in pieces (a few more
/// syscalls per MiB) to keep the folios they create small. docs/PERFORMANCE.md, round 3.
const WRITE_PIECE: u64 = 16 * 1024;

/// `(offset, length)` pieces of a write of `len` bytes at `offset`: none crosses a
/// multiple of [`WRITE_PIECE`], together they cover the range in order.
fn write_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let end = offset.saturating_add(len as u64);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let n = (WRITE_PIECE - pos % WRITE_PIECE).min(end - pos);
        let piece = (pos, n as usize);
        pos += n;
        Some(piece)
    })
}

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    /// Only ever grows (a live reload, see [`FileBackend::grow`]).
    size: AtomicU64,
    read_only: bool,
    /// Cleared once the filesystem refuses hole punching, so we stop asking.
    punch_supported: AtomicBool,
}

impl FileBackend {
    /// Open (or create, sparse) the backing store of `size` bytes.
    ///
    /// A regular file shorter than `size` is extended sparsely; a longer one is an error
    /// because shrinking it would destroy data. A block device must be at least `size`.
    pub fn open(
        path: &Path,
        size: u64,
        create: bool,
        read_only: bool,
    ) -> Result<FileBackend, StoreError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io(path, "stat", e)),
        };
        let is_block = match &meta {
            None if !create => return Err(StoreError::Missing { path: path.into() }),
            None => false,
            Some(m) if m.is_file() => false,
            Some(m) if m.file_type().is_block_device() => true,
            Some(_) => return Err(StoreError::NotAFile { path: path.into() }),
        };

        let needs_resize = !is_block && meta.as_ref().is_none_or(|m| m.len() != size);
        if let Some(m) = &meta {
            if m.is_file() && m.len() > size {
                return Err(StoreError::LargerThanConfigured {
                    path: path.into(),
                    actual: m.len(),
                    configured: size,
                });
            }
        }
        // Creating or extending needs write access even for a read-only LUN.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only || needs_resize)
            .create(meta.is_none())
            .open(path)
            .map_err(|e| StoreError::io(path, "open", e))?;
        if needs_resize {
            // set_len beyond EOF leaves a hole: no blocks are allocated.
            file.set_len(size)
                .map_err(|e| StoreError::io(path, "extend", e))?;
            file.sync_all()
                .map_err(|e| StoreError::io(path, "fsync", e))?;
        }
        let file = if read_only && needs_resize {
            File::open(path).map_err(|e| StoreError::io(path, "reopen read-only", e))?
        } else {
            file
        };
        if is_block {
            let actual = device_size(&file).map_err(|e| StoreError::io(path, "size", e))?;
            if actual < size {
                return Err(StoreError::DeviceTooSmall {
                    path: path.into(),
                    actual,
                    configured: size,
                });
            }
        }
        Ok(FileBackend {
            file,
            path: path.into(),
            size: AtomicU64::new(size),
            read_only,
            punch_supported: AtomicBool::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grow the store to `size` bytes while it is served (a live reload): a regular file
    /// is extended sparsely (also when the LUN is read-only), a block device must already
    /// be that large. A smaller `size` changes nothing: shrinking would destroy data.
    pub fn grow(&self, size: u64) -> Result<(), StoreError> {
        let path = self.path.as_path();
        if size <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let meta = self
            .file
            .metadata()
            .map_err(|e| StoreError::io(path, "stat", e))?;
        if meta.file_type().is_block_device() {
            let actual = device_size(&self.file).map_err(|e| StoreError::io(path, "size", e))?;
            if actual < size {
                return Err(StoreError::DeviceTooSmall {
                    path: path.into(),
                    actual,
                    configured: size,
                });
            }
        } else if meta.len() < size {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| StoreError::io(path, "open", e))?;
            file.set_len(size)
                .map_err(|e| StoreError::io(path, "extend", e))?;
            file.sync_all()
                .map_err(|e| StoreError::io(path, "fsync", e))?;
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only LUN",
            ));
        }
        Ok(())
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let end = offset + len;
        while offset < end {
            let n = zeros
                .len()
                .min(usize::try_from(end - offset).unwrap_or(usize::MAX));
            self.write_in_pieces(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// `pwrite` all of `buf` at `offset`, piece by piece (see [`WRITE_PIECE`]).
    fn write_in_pieces(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut rest = buf;
        for (pos, n) in write_pieces(offset, buf.len()) {
            let (piece, tail) = rest.split_at(n);
            self.file.write_all_at(piece, pos)?;
            rest = tail;
        }
        Ok(())
    }

    /// `lseek(fd, offset, whence)`; lseek moves the shared file offset, which positional
    /// I/O ignores, so this is safe alongside concurrent reads and writes.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall on a file descriptor we own for our lifetime.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }
}

impl FileBackend {
    /// `len` bytes at `offset` into a new buffer that is never zeroed: its length only
    /// grows over what the kernel wrote. Without waiting when `must_not_block` (as
    /// [`FileBackend::read_cached`]: anything but the whole range at once refuses).
    fn read_uninit(&self, len: usize, offset: u64) -> io::Result<BytesMut> {
        let nowait = backend::must_not_block();
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let done = buf.len();
            let off = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let spare = &mut buf.spare_capacity_mut()[..len - done];
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            // SAFETY: one iovec over spare capacity of `buf` (`len - done` bytes, within
            // its allocation), which outlives the call; the kernel only writes there.
            let r = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, flags) };
            match r {
                _ if nowait && (r < 0 || r as usize != len) => {
                    return Err(backend::refuse_to_block())
                }
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // SAFETY: the kernel initialised the first `r` (≤ `len - done`) bytes
                // of the spare capacity.
                r => unsafe { buf.set_len(done + r as usize) },
            }
        }
        Ok(buf)
    }

    /// Read only what the page cache holds (preadv2 RWF_NOWAIT); anything that would wait
    /// for the device, including a short read, is refused as a whole.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which outlives the call; a descriptor we own.
        let r = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if r >= 0 && r as usize == buf.len() {
            return Ok(());
        }
        // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT here), a short read or a real
        // error: the blocking read on the pool does it again and reports real errors.
        Err(backend::refuse_to_block())
    }
}

fn device_size(file: &File) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        if backend::must_not_block() {
            return self.read_cached(buf, offset);
        }
        self.file.read_exact_at(buf, offset)
    }

    fn read_buf(&self, len: usize, offset: u64) -> io::Result<BytesMut> {
        check_range(self.size(), offset, len as u64)?;
        self.read_uninit(len, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Also when must_not_block: a buffered write lands in the page cache (ext4 has no
        // RWF_NOWAIT for it); only flush and deallocate refuse.
        self.check_writable()?;
        check_range(self.size(), offset, buf.len() as u64)?;
        self.write_in_pieces(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if backend::must_not_block() {
            return Err(backend::refuse_to_block());
        }
        self.file.sync_data()
    }

    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if backend::must_not_block() {
            return Err(backend::refuse_to_block());
        }
        self.check_writable()?;
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.punch_supported.load(Ordering::Relaxed) {
            let (off, l) = match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
            };
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on a file descriptor we own.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    self.punch_supported.store(false, Ordering::Relaxed);
                }
                _ => return Err(err),
            }
        }
        // The range must read as zeros afterwards; without hole punching, write them.
        self.write_zeros(offset, len)
    }

    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        let size = self.size();
        if offset >= size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset past the end",
            ));
        }
        let rest = size - offset;
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(data) if data > offset => Ok((false, (data.min(size) - offset).max(1))),
            Ok(_) => match self.seek(offset, libc::SEEK_HOLE) {
                Ok(hole) => Ok((true, (hole.min(size).saturating_sub(offset)).max(1))),
                Err(_) => Ok((true, rest)),
            },
            // No data at or after `offset`: a hole to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((false, rest)),
            // SEEK_DATA unsupported: report everything as mapped, which is always safe.
            Err(_) => Ok((true, rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn open_new(dir: &tempfile::TempDir, size: u64) -> (PathBuf, FileBackend) {
        let p = dir.path().join("lun.img");
        let b = FileBackend::open(&p, size, true, false).unwrap();
        (p, b)
    }

    #[test]
    fn creates_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = open_new(&dir, 64 * MIB);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 64 * MIB);
        assert!(
            m.blocks() * 512 < MIB,
            "file is not sparse: {} blocks",
            m.blocks()
        );
        assert_eq!(b.size(), 64 * MIB);
        assert!(!b.allocation_at(0).unwrap().0);
    }

    #[test]
    fn missing_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent.img");
        let e = FileBackend::open(&p, MIB, false, false).unwrap_err();
        assert!(matches!(e, StoreError::Missing { .. }));
        assert!(e.to_string().contains("absent.img"));
    }

    #[test]
    fn without_blocking_reads_cached_data_and_refuses_flush() {
        use crate::scsi::backend::without_blocking;
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, MIB);
        let data = vec![7u8; 4096];
        // A buffered write is allowed (it lands in the page cache), a flush is not.
        assert!(without_blocking(|| b.write_at(&data, 0)).unwrap().is_ok());
        assert!(without_blocking(|| b.flush()).is_none());
        let mut back = vec![0u8; 4096];
        // Just written, so cached: RWF_NOWAIT succeeds (where the kernel supports it).
        if let Some(r) = without_blocking(|| b.read_at(&mut back, 0)) {
            r.unwrap();
            assert_eq!(back, data);
        }
        // Outside without_blocking nothing is refused.
        b.flush().unwrap();
        assert!(!crate::scsi::backend::must_not_block());
    }

    #[test]
    fn read_buf_returns_data_holes_and_bounds_without_zeroing() {
        use crate::scsi::backend::without_blocking;
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, 4 * MIB);
        let data: Vec<u8> = (0..(MIB + 4096) as u32).map(|i| (i % 253) as u8).collect();
        b.write_at(&data, MIB).unwrap();
        // Data, a range ending in a hole, and 1 MiB (several pages of uninitialised
        // capacity filled by one call).
        assert_eq!(&b.read_buf(8192, MIB).unwrap()[..], &data[..8192]);
        assert_eq!(&b.read_buf(data.len(), MIB).unwrap()[..], &data[..]);
        let tail = b.read_buf(8192, 2 * MIB).unwrap();
        assert_eq!(&tail[..4096], &data[MIB as usize..]);
        assert!(
            tail[4096..].iter().all(|&x| x == 0),
            "a hole reads as zeros"
        );
        assert!(b.read_buf(0, 0).unwrap().is_empty());
        assert!(b.read_buf(4096, 4 * MIB - 2048).is_err(), "past the end");
        // Cached data without blocking: the same bytes (where RWF_NOWAIT is supported).
        if let Some(r) = without_blocking(|| b.read_buf(4096, MIB + 4096)) {
            assert_eq!(&r.unwrap()[..], &data[4096..8192]);
        }
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, MIB);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        b.write_at(&data, 4096).unwrap();
        b.flush().unwrap();
        let mut back = vec![0u8; 8192];
        b.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        let mut zero = vec![1u8; 512];
        b.read_at(&mut zero, MIB - 512).unwrap();
        assert!(zero.iter().all(|&x| x == 0));
        assert!(b.read_at(&mut zero, MIB - 256).is_err());
        assert!(b.write_at(&zero, u64::MAX - 10).is_err());
    }

    #[test]
    fn grows_but_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let (p, b) = open_new(&dir, MIB);
        b.write_at(b"keep", 0).unwrap();
        drop(b);
        let b = FileBackend::open(&p, 2 * MIB, true, false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * MIB);
        let mut buf = [0u8; 4];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"keep");
        drop(b);
        let e = FileBackend::open(&p, MIB, true, false).unwrap_err();
        assert!(matches!(e, StoreError::LargerThanConfigured { actual, .. } if actual == 2 * MIB));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * MIB);
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro.img");
        let b = FileBackend::open(&p, MIB, true, true).unwrap();
        assert!(b.write_at(b"x", 0).is_err());
        assert!(b.deallocate(0, 4096).is_err());
        let mut buf = [1u8; 16];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn punch_hole_reads_zeros_and_reports_unmapped() {
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, 4 * MIB);
        b.write_at(&vec![0xaa; (2 * MIB) as usize], MIB).unwrap();
        b.flush().unwrap();
        let (mapped, len) = b.allocation_at(MIB).unwrap();
        // Filesystems without SEEK_DATA report everything mapped; both are valid.
        assert!(mapped);
        assert!((1..=3 * MIB).contains(&len));
        let (mapped0, len0) = b.allocation_at(0).unwrap();
        if !mapped0 {
            assert_eq!(len0, MIB);
        }

        b.deallocate(MIB, MIB).unwrap();
        let mut buf = vec![1u8; MIB as usize];
        b.read_at(&mut buf, MIB).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        b.read_at(&mut buf, 2 * MIB).unwrap();
        assert!(buf.iter().all(|&x| x == 0xaa));
        if b.punch_supported.load(Ordering::Relaxed) {
            let (mapped, len) = b.allocation_at(MIB).unwrap();
            assert!(!mapped);
            assert_eq!(len, MIB);
            let (mapped, len) = b.allocation_at(2 * MIB).unwrap();
            assert!(mapped);
            assert_eq!(len, MIB);
            // The hole after the data runs to the end of the store.
            assert_eq!(b.allocation_at(3 * MIB).unwrap(), (false, MIB));
            assert_eq!(b.allocation_at(4 * MIB - 1).unwrap(), (false, 1));
        }
        assert!(b.allocation_at(4 * MIB).is_err());
    }

    #[test]
    fn write_pieces_stay_within_aligned_pieces_and_cover_the_range() {
        for (offset, len) in [
            (0u64, 0usize),
            (0, 4096),
            (512, 100_000),
            (WRITE_PIECE - 1, 2),
        ] {
            let pieces: Vec<_> = write_pieces(offset, len).collect();
            let mut pos = offset;
            for &(at, n) in &pieces {
                assert_eq!(at, pos, "pieces in order, no gap");
                assert!(n > 0 && n as u64 <= WRITE_PIECE);
                assert_eq!(at / WRITE_PIECE, (at + n as u64 - 1) / WRITE_PIECE);
                pos += n as u64;
            }
            assert_eq!(pos, offset + len as u64);
        }
        assert_eq!(write_pieces(WRITE_PIECE - 1, 2).count(), 2);
    }

    #[test]
    fn a_write_in_pieces_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, MIB);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        b.write_at(&data, 1536).unwrap();
        let mut back = vec![1u8; data.len() + 512];
        b.read_at(&mut back, 1024).unwrap();
        assert!(back[..512].iter().all(|&x| x == 0));
        assert!(back[512..] == data[..], "the pieces read back as written");
    }

    #[test]
    fn zero_fallback_writes_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (_, b) = open_new(&dir, MIB);
        b.write_at(&[7u8; 10000], 100).unwrap();
        b.punch_supported.store(false, Ordering::Relaxed);
        b.deallocate(200, 5000).unwrap();
        let mut buf = vec![0u8; 10000];
        b.read_at(&mut buf, 100).unwrap();
        assert!(buf[..100].iter().all(|&x| x == 7));
        assert!(buf[100..5100].iter().all(|&x| x == 0));
        assert!(buf[5100..].iter().all(|&x| x == 7));
    }
}
