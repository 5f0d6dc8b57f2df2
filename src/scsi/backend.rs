//! What the device server needs from a block store. Implemented in `crate::store`.

use bytes::BytesMut;
use std::io;

/// Where an asynchronous read's result goes (see [`BlockBackend::start_read`]).
pub type ReadDone = Box<dyn FnOnce(io::Result<BytesMut>) + Send>;

/// Byte-addressed backing store of one logical unit. Calls block (except
/// [`BlockBackend::start_read`]); the transport runs them off the async runtime.
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes: fixed, except that a live reload may grow it (never shrink it).
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; holes read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `len` bytes from `offset` in a new buffer (what a READ sends). The default zeroes
    /// a buffer and calls [`BlockBackend::read_at`]; a store that can read into
    /// uninitialised memory overrides it (zeroing cost 12 % of a 1 MiB read's CPU).
    fn read_buf(&self, len: usize, offset: u64) -> io::Result<BytesMut> {
        let mut buf = BytesMut::zeroed(len);
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// Whether [`BlockBackend::start_read`] works: reads complete on the store's own
    /// threads, so a READ takes no thread of ours while it waits (librbd's aio).
    fn reads_async(&self) -> bool {
        false
    }
    /// Start reading `len` bytes from `offset` and return at once; `done` gets the buffer
    /// (or the error) exactly once, on whatever thread the store completes on. Called only
    /// when [`BlockBackend::reads_async`]; the default fails.
    fn start_read(&self, len: usize, offset: u64, done: ReadDone) {
        let _ = (len, offset);
        done(Err(io::ErrorKind::Unsupported.into()));
    }
    /// Write all of `buf` at `offset`. Not durable until [`BlockBackend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocate (punch a hole in) `[offset, offset+len)`; the range then reads as zeros.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether `offset` is mapped (holds data) and how many bytes from `offset` share that
    /// state (at least 1, at most up to the end of the store).
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)>;
    /// Atomically, against every writer of the store (also other servers): if the data
    /// at `offset` equals `verify`, write `new` there (same length). Ok(None): written;
    /// Ok(Some(i)): byte `i` is the first that differs, nothing written. The default,
    /// `Unsupported`, makes the device server compare and write under its range lock,
    /// which only excludes writers through this server.
    fn compare_and_write(&self, verify: &[u8], new: &[u8], offset: u64) -> io::Result<Option<u64>> {
        let _ = (verify, new, offset);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Write `pattern` repeatedly over `[offset, offset+len)` (`len` a multiple of its
    /// length) in one request to the store. The default, `Unsupported`, makes the device
    /// server write replicated buffers.
    fn write_same(&self, pattern: &[u8], offset: u64, len: u64) -> io::Result<()> {
        let _ = (pattern, offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Who holds the store's exclusive write lock, when several servers (gateways) serve
    /// the same store and it moves between them on write (an RBD image's exclusive
    /// lock). The default, `NotShared`, is a store only this server writes. Blocks (it
    /// may ask the cluster).
    fn exclusive_lock(&self) -> io::Result<ExclusiveLock> {
        Ok(ExclusiveLock::NotShared)
    }
}

/// Where a shared store's exclusive write lock is (see [`BlockBackend::exclusive_lock`]);
/// ALUA reports access states from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExclusiveLock {
    /// Only this server writes the store: there is no lock to move.
    NotShared,
    /// The store is shared but nobody holds the lock now.
    Unowned,
    /// This server holds it.
    HeldHere,
    /// Another server (gateway) holds it.
    HeldElsewhere,
}

thread_local! {
    /// Set while [`without_blocking`] runs on this thread: 0 = off, 1 = on, 2 = on and a
    /// backend call refused to block.
    static NO_BLOCK: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Run `f` (a command execution) on the calling thread, asking backends not to block:
/// a backend that would have to wait for the device (a read not in the page cache, a
/// write, a flush) calls [`refuse_to_block`] and fails with `WouldBlock` instead. Returns
/// None when that happened; the caller then discards the result and runs the command again
/// where blocking is fine. Only commands whose partial execution is harmless to repeat
/// (plain READs) may be tried this way.
pub fn without_blocking<R>(f: impl FnOnce() -> R) -> Option<R> {
    NO_BLOCK.with(|c| c.set(1));
    let r = f();
    let refused = NO_BLOCK.with(|c| c.replace(0)) == 2;
    (!refused).then_some(r)
}

/// For backends: whether the current call must not block (see [`without_blocking`]).
pub fn must_not_block() -> bool {
    NO_BLOCK.with(|c| c.get() != 0)
}

/// For backends: note that a call was refused because it would block, and return the
/// error to fail it with.
pub fn refuse_to_block() -> io::Error {
    NO_BLOCK.with(|c| {
        if c.get() != 0 {
            c.set(2);
        }
    });
    io::Error::from(io::ErrorKind::WouldBlock)
}
