//! An in-memory backend for tests of the layers above the store.

use super::check_range;
use crate::scsi::backend::BlockBackend;
use std::io;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Granularity of allocation tracking, like a filesystem block.
pub const MEM_CHUNK: u64 = 4096;

#[derive(Debug, Default)]
struct Inner {
    data: Vec<u8>,
    /// One flag per [`MEM_CHUNK`]: written since creation or the last deallocation.
    mapped: Vec<bool>,
}

/// RAM-backed store. Starts fully unmapped (like a new sparse file); writes map the
/// chunks they touch and deallocation unmaps whole chunks inside the range.
#[derive(Debug)]
pub struct MemBackend {
    inner: RwLock<Inner>,
    size: u64,
}

fn poisoned() -> io::Error {
    io::Error::other("memory backend lock poisoned")
}

impl MemBackend {
    pub fn new(size: usize) -> Self {
        let chunks = size.div_ceil(MEM_CHUNK as usize);
        let inner = Inner {
            data: vec![0; size],
            mapped: vec![false; chunks],
        };
        Self {
            inner: RwLock::new(inner),
            size: size as u64,
        }
    }

    fn read(&self) -> io::Result<RwLockReadGuard<'_, Inner>> {
        self.inner.read().map_err(|_| poisoned())
    }

    fn write(&self) -> io::Result<RwLockWriteGuard<'_, Inner>> {
        self.inner.write().map_err(|_| poisoned())
    }

    /// A copy of the whole content (for assertions in tests).
    pub fn snapshot(&self) -> io::Result<Vec<u8>> {
        Ok(self.read()?.data.clone())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let inner = self.read()?;
        let start = offset as usize;
        buf.copy_from_slice(&inner.data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut inner = self.write()?;
        let start = offset as usize;
        inner.data[start..start + buf.len()].copy_from_slice(buf);
        let first = (offset / MEM_CHUNK) as usize;
        let last = ((offset + buf.len() as u64 - 1) / MEM_CHUNK) as usize;
        inner.mapped[first..=last]
            .iter_mut()
            .for_each(|m| *m = true);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let mut inner = self.write()?;
        let start = offset as usize;
        inner.data[start..start + len as usize].fill(0);
        // Only chunks entirely inside the range become unmapped, as with hole punching.
        let first = offset.div_ceil(MEM_CHUNK);
        let end = offset + len;
        let last_excl = if end == self.size {
            self.size.div_ceil(MEM_CHUNK)
        } else {
            end / MEM_CHUNK
        };
        if first < last_excl {
            inner.mapped[first as usize..last_excl as usize]
                .iter_mut()
                .for_each(|m| *m = false);
        }
        Ok(())
    }

    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        if offset >= self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "offset past the end",
            ));
        }
        let inner = self.read()?;
        let chunk = (offset / MEM_CHUNK) as usize;
        let state = inner.mapped[chunk];
        let run = inner.mapped[chunk..]
            .iter()
            .take_while(|&&m| m == state)
            .count() as u64;
        let end = ((chunk as u64 + run) * MEM_CHUNK).min(self.size);
        Ok((state, end - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_deallocate() {
        let b = MemBackend::new(64 * 1024);
        assert_eq!(b.allocation_at(0).unwrap(), (false, 64 * 1024));
        b.write_at(&[5u8; 100], 8190).unwrap();
        let mut buf = [0u8; 100];
        b.read_at(&mut buf, 8190).unwrap();
        assert_eq!(buf, [5u8; 100]);
        assert_eq!(b.allocation_at(100).unwrap(), (false, 3996));
        assert_eq!(b.allocation_at(4096).unwrap(), (true, 8192));
        assert_eq!(b.allocation_at(8192).unwrap(), (true, 4096));
        assert_eq!(b.allocation_at(8191).unwrap(), (true, 4097));
        b.deallocate(4096, 8192).unwrap();
        b.read_at(&mut buf, 8190).unwrap();
        assert_eq!(buf, [0u8; 100]);
        assert_eq!(b.allocation_at(0).unwrap(), (false, 64 * 1024));
        assert!(b.read_at(&mut buf, 64 * 1024 - 10).is_err());
        assert!(b.allocation_at(64 * 1024).is_err());
    }

    #[test]
    fn partial_chunk_deallocate_keeps_mapping() {
        let b = MemBackend::new(10_000);
        b.write_at(&[1u8; 10_000], 0).unwrap();
        b.deallocate(100, 5000).unwrap();
        assert_eq!(b.allocation_at(0).unwrap(), (true, 10_000));
        b.deallocate(8192, 10_000 - 8192).unwrap();
        assert_eq!(b.allocation_at(8192).unwrap(), (false, 10_000 - 8192));
        assert_eq!(b.snapshot().unwrap()[99..101], [1, 0]);
    }
}
