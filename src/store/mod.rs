//! Block backends and durable LUN metadata: file-backed and in-memory implementations of
//! [`crate::scsi::backend::BlockBackend`], the persisted per-LUN identity (NAA + serial),
//! and the crash-atomic file write used for durable state.

pub mod file;
pub mod identity;
pub mod memory;
pub mod pr_file;

pub use crate::atomic_file::write_file_atomically;
pub use file::FileBackend;
pub use identity::{load_or_create, LunIdentity};
pub use memory::MemBackend;
pub use pr_file::PrFileStore;

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: does not exist and creation is not allowed")]
    Missing { path: PathBuf },
    #[error("{path}: not a regular file or block device")]
    NotAFile { path: PathBuf },
    /// Shrinking would destroy user data, so it is never done implicitly.
    #[error(
        "{path}: backing store holds {actual} bytes, more than the configured size of \
         {configured}; refusing to truncate (raise the configured size or shrink the file \
         by hand)"
    )]
    LargerThanConfigured {
        path: PathBuf,
        actual: u64,
        configured: u64,
    },
    #[error("{path}: block device holds {actual} bytes, less than the configured {configured}")]
    DeviceTooSmall {
        path: PathBuf,
        actual: u64,
        configured: u64,
    },
    #[error("{path}: corrupt LUN identity file: {reason}")]
    CorruptIdentity { path: PathBuf, reason: String },
    #[error("invalid configured serial {serial:?}: {reason}")]
    InvalidSerial {
        serial: String,
        reason: &'static str,
    },
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// Checks that `[offset, offset+len)` lies inside a store of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} outside a store of {size} bytes"),
        )),
    }
}
