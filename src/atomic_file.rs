//! Crash-atomic replacement of small files: the target's LUN identity and persistent
//! reservation state, the agent's paused.json. Outside `store` so the agent can use it
//! without reaching into the storage layer.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Replace `path` with `bytes` so that after a crash it holds either the old or the new
/// content, never a mix: write a temporary file in the same directory, fsync it, rename
/// it over `path`, then fsync the directory so the rename itself is durable.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    // A random suffix keeps concurrent writers from sharing a temporary file.
    tmp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage either way.
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_file_atomically(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_file_atomically(&p, b"two, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two, longer");
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("state.json");
        assert!(write_file_atomically(&p, b"x").is_err());
    }
}
