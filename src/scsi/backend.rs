//! What the device server needs from a block store. Implemented in `crate::store`.

use std::io;

/// Byte-addressed backing store of one logical unit. Calls block; the transport runs
/// them off the async runtime.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes (fixed for the life of the backend).
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; holes read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`. Not durable until [`BlockBackend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocate (punch a hole in) `[offset, offset+len)`; the range then reads as zeros.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether `offset` is mapped (holds data) and how many bytes from `offset` share that
    /// state (at least 1, at most up to the end of the store).
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)>;
}
