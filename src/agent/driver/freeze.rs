//! Freezing a process group with SIGSTOP, and proving it froze. A stop signal only marks
//! each thread; a thread stops at its next return to user space (one in uninterruptible
//! disk sleep only once that I/O ends), so the group is frozen once every thread of every
//! process in it reads `T` in /proc/PID/task/TID/stat.

use super::exec::signal_group;
use std::time::{Duration, Instant};

/// One thread of a process in the group, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Thread {
    pub pid: u32,
    pub tid: u32,
    /// The state letter: `R`, `S`, `D`, `T`, `Z`, …
    pub state: char,
}

impl Thread {
    /// Stopped by a signal, or dead (a zombie cannot run, and its stopped parent cannot
    /// reap it).
    fn frozen(&self) -> bool {
        matches!(self.state, 'T' | 'Z' | 'X')
    }
}

/// State and process group from the text of a /proc stat file.
fn parse_stat(text: &str) -> Option<(char, u32)> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last
    // ')' are fixed. They start with field 3 (state); 5 is pgrp.
    let f: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(2)?.parse().ok()?))
}

fn numeric_entries(dir: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every thread of every process whose process group is `pgid`. Processes and threads
/// that vanish during the scan are left out.
pub(crate) fn group_threads(pgid: u32) -> Vec<Thread> {
    let mut out = Vec::new();
    for pid in numeric_entries("/proc") {
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|(_, pgrp)| pgrp == pgid);
        if !in_group {
            continue;
        }
        for tid in numeric_entries(&format!("/proc/{pid}/task")) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"));
            if let Some((state, _)) = stat.ok().and_then(|s| parse_stat(&s)) {
                out.push(Thread { pid, tid, state });
            }
        }
    }
    out
}

/// Send `sig` to the group until `done` holds for its threads, or `timeout` passes: then
/// the threads that kept it from holding are returned. Signalling on every round also
/// reaches a process forked after the previous round.
fn signal_until(
    pgid: u32,
    sig: i32,
    timeout: Duration,
    done: impl Fn(&Thread) -> bool,
) -> Result<(), Vec<Thread>> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        signal_group(pgid, sig);
        let left: Vec<Thread> = group_threads(pgid)
            .into_iter()
            .filter(|t| !done(t))
            .collect();
        let now = Instant::now();
        if left.is_empty() {
            return Ok(());
        }
        if now >= deadline {
            return Err(left);
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// SIGSTOP process group `pgid` and return once every thread in it is stopped, or with
/// the threads still not stopped once `timeout` passes (those stopped stay stopped).
/// The caller must know the group's leader is not reaped (see [`signal_group`]).
pub(crate) fn stop_group(pgid: u32, timeout: Duration) -> Result<(), Vec<Thread>> {
    signal_until(pgid, libc::SIGSTOP, timeout, Thread::frozen)
}

/// SIGCONT process group `pgid` and return once no thread in it is stopped, or with the
/// threads still stopped once `timeout` passes.
pub(crate) fn continue_group(pgid: u32, timeout: Duration) -> Result<(), Vec<Thread>> {
    signal_until(pgid, libc::SIGCONT, timeout, |t| t.state != 'T')
}

/// "pid 12 thread 14 in state D, …" for an error or a log line (the first few).
pub(crate) fn describe(threads: &[Thread]) -> String {
    let mut s: Vec<String> = threads
        .iter()
        .take(5)
        .map(|t| format!("pid {} thread {} in state {}", t.pid, t.tid, t.state))
        .collect();
    if threads.len() > 5 {
        s.push(format!("{} more", threads.len() - 5));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4240 4240 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 99";
        assert_eq!(parse_stat(line), Some(('S', 4240)));
        assert_eq!(parse_stat("4242 (x) T 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn only_stopped_or_dead_threads_count_as_frozen() {
        let t = |state| Thread {
            pid: 1,
            tid: 1,
            state,
        };
        assert!(t('T').frozen() && t('Z').frozen());
        assert!(!t('R').frozen() && !t('S').frozen() && !t('D').frozen());
        let many: Vec<Thread> = (0..7).map(|_| t('D')).collect();
        assert_eq!(
            describe(&many),
            "pid 1 thread 1 in state D, pid 1 thread 1 in state D, pid 1 thread 1 in state D, \
             pid 1 thread 1 in state D, pid 1 thread 1 in state D, 2 more"
        );
    }
}
