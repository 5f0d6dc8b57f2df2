//! One process per directory: the target on its data directory, the agent on its state
//! directory. Two targets on one data directory would both write the LUN files and the
//! PR state; two agents on one state directory would kill each other's VMs at start.
//! The lock is flock(2) on a file in the directory, held for the life of the process
//! (released by the kernel when it dies, whatever the cause); the file holds the pid of
//! the holder so that the refused process can name it.
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another {what} ({holder}); stop it first, or give this one \
         another directory (lock file {file})",
        dir = dir.display(), file = file.display(),
        holder = match pid { Some(p) => format!("pid {p}"), None => "pid unknown".into() }
    )]
    InUse {
        what: String,
        dir: PathBuf,
        file: PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on a directory; released on drop (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl DirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Create `dir` if needed and lock it through `dir/file_name` for `what` ("holdfast
/// target"), writing our pid into the file; fails at once if another process holds it.
pub fn lock_dir(dir: &Path, file_name: &str, what: &str) -> Result<DirLock, LockError> {
    let path = dir.join(file_name);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Not truncated on open: the holder's pid must survive a refused opener.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            return Err(LockError::InUse {
                what: what.to_string(),
                dir: dir.to_path_buf(),
                file: path.clone(),
                pid: holder_pid(&mut file),
            })
        }
        Err((_, e)) => return Err(io(std::io::Error::from(e))),
    };
    write_pid(&mut locked).map_err(io)?;
    Ok(DirLock {
        _file: locked,
        path,
    })
}

fn write_pid(file: &mut File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_data()
}

/// The pid the holder wrote; `None` if it has not written it yet.
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder_and_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_dir(dir.path(), "x.lock", "holdfast thing").unwrap();
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        let e = lock_dir(dir.path(), "x.lock", "holdfast thing").unwrap_err();
        let LockError::InUse { pid, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*pid, Some(std::process::id()));
        let text = e.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("another holdfast thing"), "{text}");
        drop(first);
        lock_dir(dir.path(), "x.lock", "holdfast thing").expect("free again after drop");
    }
}
