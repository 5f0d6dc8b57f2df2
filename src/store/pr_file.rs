//! File-backed [`PrStore`]: the APTPL persistent reservation state of a LUN in the sidecar
//! `<backing file>.holdfast-pr`, replaced crash-atomically.

use crate::atomic_file::write_file_atomically;
use crate::scsi::PrStore;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Suffix appended to the backing file's name to form the state file's.
pub const PR_SUFFIX: &str = ".holdfast-pr";

#[derive(Debug, Clone)]
pub struct PrFileStore {
    path: PathBuf,
}

impl PrFileStore {
    /// The store next to `backing_path`.
    pub fn for_backing(backing_path: &Path) -> Self {
        let mut name = OsString::from(backing_path.as_os_str());
        name.push(PR_SUFFIX);
        PrFileStore {
            path: PathBuf::from(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PrStore for PrFileStore {
    fn load(&self) -> io::Result<Option<Vec<u8>>> {
        match fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, bytes: &[u8]) -> io::Result<()> {
        write_file_atomically(&self.path, bytes)
    }

    fn remove(&self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        // Make the unlink durable, as the rename of a save is.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = PrFileStore::for_backing(&dir.path().join("disk.img"));
        assert!(s.path().ends_with("disk.img.holdfast-pr"));
        assert_eq!(s.load().unwrap(), None);
        s.save(b"abc").unwrap();
        assert_eq!(s.load().unwrap().as_deref(), Some(&b"abc"[..]));
        s.remove().unwrap();
        assert_eq!(s.load().unwrap(), None);
        s.remove().unwrap();
    }
}
