//! A backend wrapper whose hook runs before every call: tests fail calls (faults),
//! delay them (a slow disk) or hold them (a task that stays running).

use holdfast::scsi::backend::BlockBackend;
use std::io;
use std::sync::Arc;

/// Which backend call a [`Hook`] sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Deallocate,
    Allocation,
}

/// Runs before each call of the backend it wraps; an error fails the call.
pub trait Hook: Send + Sync + std::fmt::Debug {
    fn before(&self, op: Op, offset: u64, len: u64) -> io::Result<()>;
}

#[derive(Debug)]
pub struct Hooked<H> {
    pub inner: Arc<dyn BlockBackend>,
    pub hook: H,
}

impl<H: Hook> BlockBackend for Hooked<H> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.hook.before(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.hook.before(Op::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.hook.before(Op::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.hook.before(Op::Deallocate, offset, len)?;
        self.inner.deallocate(offset, len)
    }
    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        self.hook.before(Op::Allocation, offset, 1)?;
        self.inner.allocation_at(offset)
    }
}
