//! The per-node event log (events.jsonl) with size-based rotation: when a line would
//! take the file past `max_bytes`, it becomes `events.jsonl.1` (older ones shift to
//! `.2` … `.keep`, the oldest is removed) and a new file starts. Several agents may
//! append to one file (the test cluster does): the one whose rename of the live file
//! succeeds rotates, and every writer reopens when the path no longer is its file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub struct RotatingLog {
    path: PathBuf,
    /// 0: never rotate.
    max_bytes: u64,
    keep: u32,
    file: File,
    ino: u64,
}

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let ino = f.metadata()?.ino();
    Ok((f, ino))
}

/// `events.jsonl.N`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingLog> {
        let (file, ino) = open(path)?;
        Ok(RotatingLog {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file,
            ino,
        })
    }

    /// Append one line (one write, so writers sharing the file never interleave).
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current != Some(self.ino) {
            // Rotated (or removed) by someone else: follow the path.
            (self.file, self.ino) = open(&self.path)?;
        }
        let len = self.file.metadata()?.len();
        if self.max_bytes > 0 && len > 0 && len + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(format!(".rotating.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        // Only the writer whose rename succeeds rotates; the others just reopen.
        if std::fs::rename(&self.path, &tmp).is_ok() {
            if self.keep == 0 {
                let _ = std::fs::remove_file(&tmp);
            } else {
                let _ = std::fs::remove_file(rotated(&self.path, self.keep));
                for n in (1..self.keep).rev() {
                    let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
                }
                std::fs::rename(&tmp, rotated(&self.path, 1))?;
            }
        }
        (self.file, self.ino) = open(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .map(|s| s.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_log_rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut log = RotatingLog::open(&p, 100, 2).unwrap();
        // 10 lines of 40 bytes: 2 per file of at most 100 bytes.
        for i in 0..10 {
            log.write_line(&format!("{i:038}\n")).unwrap();
        }
        let names: Vec<u64> = [p.clone(), rotated(&p, 1), rotated(&p, 2)]
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect();
        assert!(names.iter().all(|&n| n <= 100), "{names:?}");
        assert!(!rotated(&p, 3).exists(), "keeps only 2 rotated files");
        let newest: Vec<String> = [rotated(&p, 2), rotated(&p, 1), p.clone()]
            .iter()
            .flat_map(|f| lines(f))
            .collect();
        let want: Vec<String> = (4..10).map(|i| format!("{i:038}")).collect();
        assert_eq!(
            newest, want,
            "the newest lines, in order, nothing lost in between"
        );
    }

    #[test]
    fn a_second_writer_follows_a_rotation_done_by_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut a = RotatingLog::open(&p, 50, 3).unwrap();
        let mut b = RotatingLog::open(&p, 50, 3).unwrap();
        a.write_line(&format!("{:039}\n", 1)).unwrap();
        a.write_line(&format!("{:039}\n", 2)).unwrap(); // a rotates
        b.write_line(&format!("{:039}\n", 3)).unwrap(); // b follows the new file
        assert_eq!(lines(&rotated(&p, 1)).len(), 1);
        assert_eq!(lines(&p).len(), 1, "{:?}", lines(&p));
        // No rotation: max 0.
        let q = dir.path().join("other.jsonl");
        let mut c = RotatingLog::open(&q, 0, 3).unwrap();
        for _ in 0..50 {
            c.write_line("0123456789\n").unwrap();
        }
        assert!(!rotated(&q, 1).exists());
    }
}
