//! What /proc says about processes and threads, read with the `procfs` crate (which
//! parses /proc/PID/stat correctly for command names holding spaces or parentheses).
//! A process or thread that vanishes while being read is simply absent.
use procfs::process::{all_processes, Process};

/// The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) that holdfast uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// The state letter: `R`, `S`, `D`, `T`, `t`, `Z`, `X`, …
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    /// Clock ticks after boot: with the pid, names one process for good.
    pub starttime: u64,
}

impl From<procfs::process::Stat> for ProcStat {
    fn from(s: procfs::process::Stat) -> ProcStat {
        ProcStat {
            state: s.state,
            ppid: s.ppid as u32,
            pgrp: s.pgrp as u32,
            starttime: s.starttime,
        }
    }
}

/// /proc/`pid`/stat, if the process exists.
pub(crate) fn stat(pid: u32) -> Option<ProcStat> {
    let p = Process::new(i32::try_from(pid).ok()?).ok()?;
    p.stat().ok().map(ProcStat::from)
}

/// Every process now, with its stat.
pub(crate) fn processes() -> Vec<(u32, ProcStat)> {
    let Ok(all) = all_processes() else {
        return Vec::new();
    };
    all.filter_map(|p| {
        let p = p.ok()?;
        Some((p.pid as u32, p.stat().ok()?.into()))
    })
    .collect()
}

/// (thread id, state) of every thread of `pid`; empty if the process is gone.
pub(crate) fn threads(pid: u32) -> Vec<(u32, char)> {
    let Some(p) = i32::try_from(pid).ok().and_then(|p| Process::new(p).ok()) else {
        return Vec::new();
    };
    let Ok(tasks) = p.tasks() else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            Some((t.tid as u32, t.stat().ok()?.state))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_its_threads() {
        let me = std::process::id();
        let s = stat(me).expect("our own stat");
        assert_eq!(s.ppid, std::os::unix::process::parent_id());
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw() as u32);
        assert!(matches!(s.state, 'R' | 'S'), "{s:?}");
        assert!(threads(me).iter().any(|&(tid, _)| tid == me));
        assert!(processes()
            .iter()
            .any(|(p, st)| *p == me && st.starttime == s.starttime));
        assert_eq!(stat(u32::MAX), None);
    }

    #[test]
    fn a_command_name_with_parentheses_and_spaces_does_not_shift_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a) b (c");
        std::os::unix::fs::symlink("/bin/sleep", &odd).unwrap();
        let mut child = std::process::Command::new(&odd).arg("5").spawn().unwrap();
        let comm = format!("/proc/{}/comm", child.id());
        for _ in 0..500 {
            if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() == "a) b (c") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let st = stat(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let st = st.expect("the child's stat");
        assert_eq!(st.ppid, std::process::id());
        assert_eq!(st.pgrp, nix::unistd::getpgrp().as_raw() as u32);
        // D: a loaded machine may catch the child paging in its executable.
        assert!(matches!(st.state, 'R' | 'S' | 'D'), "{st:?}");
    }
}
