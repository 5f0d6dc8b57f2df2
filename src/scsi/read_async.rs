//! READs that hold no thread while the store works. A backend whose reads complete on
//! its own threads (librbd's aio) gets the READ after the same checks as
//! [`LogicalUnit::execute`], and the outcome follows from its callback: no blocking-pool
//! thread waits per command, which on RBD cost more CPU than librbd itself.

use super::lun::LogicalUnit;
use super::{cdb, opcode, sbc, ScsiCommand, ScsiOutcome};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// Where an asynchronously executed command's outcome goes.
pub type Done = Box<dyn FnOnce(ScsiOutcome) + Send>;

impl LogicalUnit {
    /// Whether `cdb` is a READ this LU runs with [`LogicalUnit::start_read`].
    pub fn reads_async(&self, cdb: &[u8]) -> bool {
        matches!(
            cdb::byte(cdb, 0),
            opcode::READ_6 | opcode::READ_10 | opcode::READ_12 | opcode::READ_16
        ) && self.backend().reads_async()
    }

    /// Check a READ and start its backend I/O; `done` gets the outcome exactly once: at
    /// once when a check fails (or the store fails at once), else on the backend's
    /// thread. The PR read lock covers the checks only, not the I/O as for a write: a
    /// PREEMPT AND ABORT that comes later aborts the task in its task set, which discards
    /// the data, and a read puts nothing on the medium that a fence must stop. Released
    /// before `done` can run, so nothing `done` does can wait on it.
    pub fn start_read(self: &Arc<Self>, cmd: &ScsiCommand, done: Done) {
        let spec = match self.admit(cmd) {
            Ok((spec, _pr_guard)) => spec,
            Err(outcome) => return done(outcome),
        };
        tracing::trace!(command = spec.name, lun = cmd.lun, "start");
        let (offset, len) = match sbc::read_extent(self, &cmd.cdb) {
            Ok(Some(extent)) => extent,
            Ok(None) => return done(self.finish(spec, Ok(Bytes::new()))),
            Err(sense) => return done(self.finish(spec, Err(sense.into()))),
        };
        let lu = self.clone();
        self.backend().start_read(
            len,
            offset,
            Box::new(move |read| {
                let result = read
                    .map(BytesMut::freeze)
                    .map_err(|e| lu.io_error(&e, "read", false).into());
                done(lu.finish(spec, result));
            }),
        );
    }
}
