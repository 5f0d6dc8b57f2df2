//! Block backends and durable LUN metadata: file-backed, RBD-backed and in-memory
//! implementations of [`crate::scsi::backend::BlockBackend`], the persisted per-LUN
//! identity (NAA + serial), and the crash-atomic file write used for durable state.

pub mod file;
pub mod identity;
pub mod memory;
pub mod pr_file;
pub mod rbd;

pub use crate::atomic_file::write_file_atomically;
pub use file::FileBackend;
pub use identity::{load_or_create, LunIdentity};
pub use memory::MemBackend;
pub use pr_file::PrFileStore;
pub use rbd::{CephSettings, RbdBackend, RbdError};

use crate::scsi::backend::BlockBackend;
use std::sync::Arc;

/// The backing store a served LUN was opened on, for what the server does beyond I/O
/// (growing on reload, flushing at shutdown, naming it in `holdfast target luns`).
#[derive(Debug, Clone)]
pub enum LunStore {
    File(Arc<FileBackend>),
    Rbd(Arc<RbdBackend>),
}

impl LunStore {
    /// The file's path or "rbd:POOL/IMAGE".
    pub fn describe(&self) -> String {
        match self {
            LunStore::File(f) => f.path().display().to_string(),
            LunStore::Rbd(r) => format!("rbd:{}", r.spec()),
        }
    }

    /// Serve `size` bytes (a live reload; never shrinks).
    pub fn grow(&self, size: u64) -> Result<(), String> {
        match self {
            LunStore::File(f) => f.grow(size).map_err(|e| e.to_string()),
            LunStore::Rbd(r) => r.grow(size).map_err(|e| e.to_string()),
        }
    }

    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        match self {
            LunStore::File(f) => f.clone(),
            LunStore::Rbd(r) => r.clone(),
        }
    }

    pub fn flush(&self) -> io::Result<()> {
        self.backend().flush()
    }
}

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
