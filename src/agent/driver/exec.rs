//! Running a short-lived helper (a VM script, virsh) with a deadline and its output
//! captured, and the process-group plumbing the drivers share.

use super::DriverError;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most output kept per stream: errors only quote the last lines.
const OUTPUT_CAP: usize = 64 * 1024;

/// How long to wait for the pipes to reach EOF once the helper exited. A helper that
/// starts a daemon (a VM script's `start`) may leave it holding stdout; its output must
/// not hold up the call, so the rest is read by a detached thread until that daemon
/// closes it.
const DRAIN_GRACE: Duration = Duration::from_millis(100);

pub(crate) struct Output {
    pub status: ExitStatus,
    /// stdout, or stdout and stderr interleaved when run with `merge`.
    pub stdout: String,
    pub stderr: String,
}

/// "exit status 3" / "killed by signal 9".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => format!("{status}"),
    }
}

/// The last `n` non-empty lines of `s`, joined with " | " so an error stays one line.
pub(crate) fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Send `sig` to process group `pgid`. Only call this while the group leader is known
/// not to have been reaped: until then its pid cannot be reused, so the signal cannot
/// reach a stranger. ESRCH (already gone) is not an error.
pub(crate) fn signal_group(pgid: u32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pgid as i32), sig);
}

/// What [`peek`] saw of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    Running,
    /// Exited, not reaped yet: its pid and process group cannot be reused until it is.
    Exited,
    /// Reaped by somebody else (ECHILD): its pid may already belong to a stranger.
    Lost,
}

/// Whether child `pid` has exited, without reaping it (WNOWAIT): the zombie keeps its
/// pid and process group reserved, so the group can still be signalled safely.
pub(crate) fn peek(pid: u32) -> std::io::Result<Peek> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        let peek = match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
            Ok(WaitStatus::StillAlive) => Peek::Running,
            Ok(_) => Peek::Exited,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => Peek::Lost,
            // waitid(2) itself cannot say EINVAL with these flags: nix does, for a child
            // killed by a signal it has no name for (a realtime one). It did exit.
            Err(Errno::EINVAL) => Peek::Exited,
            Err(e) => return Err(e.into()),
        };
        return Ok(peek);
    }
}

/// Poll until child `pid` exits or `timeout` passes (then `Peek::Running`).
pub(crate) fn wait_exit(pid: u32, timeout: Duration) -> std::io::Result<Peek> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        let p = peek(pid)?;
        let now = Instant::now();
        if p != Peek::Running || now >= deadline {
            return Ok(p);
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

type Shared = Arc<Mutex<Vec<u8>>>;

fn append_capped(buf: &Shared, data: &[u8]) {
    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
    b.extend_from_slice(data);
    if b.len() > OUTPUT_CAP {
        let cut = b.len() - OUTPUT_CAP;
        b.drain(..cut);
    }
}

fn snapshot(buf: &Shared) -> String {
    let b = buf.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&b).into_owned()
}

fn reader(
    mut from: impl Read + Send + 'static,
    into: Shared,
    done: mpsc::Sender<()>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vm-helper-output".into())
        .spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => append_capped(&into, &chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        })
        .map(|_| ())
}

fn kill_and_reap(child: &mut Child) {
    signal_group(child.id(), Signal::SIGKILL);
    let _ = child.wait();
}

/// Start `cmd` as the leader of a new process group, so that signals sent to the group
/// reach whatever it starts too, and the agent's terminal signals (Ctrl-C) do not.
pub(crate) fn spawn_in_group(
    cmd: &mut Command,
    action: &'static str,
) -> Result<Child, DriverError> {
    cmd.process_group(0)
        .spawn()
        .map_err(|source| DriverError::Spawn {
            action,
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })
}

/// Run `cmd` in its own process group with stdin from /dev/null and its output
/// captured. Past `timeout` the whole group is SIGKILLed and the call fails with
/// `Timeout`. A non-zero exit is not an error here: callers give exit codes meaning.
pub(crate) fn run(
    mut cmd: Command,
    action: &'static str,
    timeout: Duration,
    merge: bool,
) -> Result<Output, DriverError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own group, so a timeout also reaches whatever it started.
    let mut child = spawn_in_group(&mut cmd, action)?;
    let out: Shared = Arc::default();
    let err: Shared = if merge { out.clone() } else { Arc::default() };
    let (done_tx, done_rx) = mpsc::channel();
    let mut readers = 0;
    let mut started = Ok(());
    if let Some(s) = child.stdout.take() {
        readers += 1;
        started = reader(s, out.clone(), done_tx.clone());
    }
    if let Some(s) = child.stderr.take() {
        if started.is_ok() {
            readers += 1;
            started = reader(s, err.clone(), done_tx);
        }
    }
    if let Err(source) = started {
        kill_and_reap(&mut child);
        return Err(DriverError::Spawn {
            action,
            program,
            source,
        });
    }
    let peeked = match wait_exit(child.id(), timeout) {
        Ok(p) => p,
        Err(e) => {
            kill_and_reap(&mut child);
            return Err(DriverError::Failed {
                action,
                detail: format!("waiting for {program}: {e}"),
            });
        }
    };
    if peeked == Peek::Running {
        kill_and_reap(&mut child);
        return Err(DriverError::Timeout {
            action,
            after: timeout,
        });
    }
    let status = child.wait().map_err(|e| DriverError::Failed {
        action,
        detail: format!("waiting for {program}: {e}"),
    })?;
    let grace = Instant::now() + DRAIN_GRACE;
    for _ in 0..readers {
        let left = grace.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(Output {
        status,
        stdout: snapshot(&out),
        stderr: if merge { String::new() } else { snapshot(&err) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_and_descriptions() {
        assert_eq!(tail_lines("a\n\nb\nc  \n", 2), "b | c");
        assert_eq!(tail_lines("", 3), "");
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit status 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by signal 9");
    }

    #[test]
    fn output_is_captured_and_merged() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 4"]);
        let o = run(c, "t", Duration::from_secs(10), false).unwrap();
        assert_eq!(o.status.code(), Some(4));
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; sleep 0.05; echo err >&2"]);
        let o = run(c, "t", Duration::from_secs(10), true).unwrap();
        assert_eq!(o.stdout, "out\nerr\n");
    }

    /// Running and not a zombie (orphans may stay zombies where init does not reap).
    pub(crate) fn alive(pid: i32) -> bool {
        super::super::procinfo::stat(pid as u32).is_some_and(|s| s.state != 'Z')
    }

    #[test]
    fn a_daemon_holding_stdout_does_not_hold_up_the_call() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo started; sleep 5 & echo \"pid $!\" >&2"]);
        let t = Instant::now();
        let o = run(c, "t", Duration::from_secs(10), false).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(o.stdout, "started\n");
        let pid: i32 = o.stderr.trim().trim_start_matches("pid ").parse().unwrap();
        assert!(alive(pid));
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    #[test]
    fn a_timeout_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut c = Command::new("sh");
        c.args(["-c", "sleep 30 & echo $! > \"$1\"; wait; echo never", "sh"])
            .arg(&pidfile);
        let t = Instant::now();
        match run(c, "t", Duration::from_millis(300), true) {
            Err(DriverError::Timeout { action: "t", .. }) => {}
            other => panic!("{:?}", other.map(|o| o.stdout)),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The script's background child went down with it.
        let gone = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "sleep {pid} survived the timeout");
    }
}
