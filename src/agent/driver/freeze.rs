//! Freezing a process group with SIGSTOP, and proving it froze. A stop signal only marks
//! each thread; a thread stops at its next return to user space (one in uninterruptible
//! disk sleep only once that I/O ends), so the group is frozen once every thread of every
//! process in it reads `T` in /proc/PID/task/TID/stat.

use super::exec::signal_group;
use super::procinfo;
use nix::sys::signal::Signal;
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

/// Every thread of every process whose process group is `pgid`. Processes and threads
/// that vanish during the scan are left out.
pub(crate) fn group_threads(pgid: u32) -> Vec<Thread> {
    let mut out = Vec::new();
    for (pid, _) in procinfo::processes()
        .into_iter()
        .filter(|(_, st)| st.pgrp == pgid)
    {
        for (tid, state) in procinfo::threads(pid) {
            out.push(Thread { pid, tid, state });
        }
    }
    out
}

/// Send `sig` to the group until `done` holds for its threads, or `timeout` passes: then
/// the threads that kept it from holding are returned. Signalling on every round also
/// reaches a process forked after the previous round.
fn signal_until(
    pgid: u32,
    sig: Signal,
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
    signal_until(pgid, Signal::SIGSTOP, timeout, Thread::frozen)
}

/// SIGCONT process group `pgid` and return once no thread in it is stopped, or with the
/// threads still stopped once `timeout` passes.
pub(crate) fn continue_group(pgid: u32, timeout: Duration) -> Result<(), Vec<Thread>> {
    signal_until(pgid, Signal::SIGCONT, timeout, |t| t.state != 'T')
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
