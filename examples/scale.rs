//! Many sessions at once against a running target: steps of N sessions (by default 250,
//! 500 and 1,000) spread over M LUNs (4,096), each session one outstanding 4 KiB random
//! read or write at a time for a fixed time per step.
//!
//! Sessions log in once and stay: each step logs in the ones it adds, so a step measures
//! the target holding all of them. Session i of a step with N sessions does its I/O on
//! LUNs i, i+N, i+2N, … (a random one per command), so every LUN is in use at every step.
//! Each new session sends REPORT LUNS and checks it sees all M.
//!
//! Per step: login time, aggregate IOPS, latency percentiles, per-session IOPS min / mean
//! / max (a session outside [mean/2, 2×mean] counts as starved or favoured) and, with
//! `--target-pid`, the target's RSS. The closing table shows how p99 grows with the
//! session count and the target's RSS per logged-in session. Used by `tools/bench`; by
//! hand: `cargo run --release --example scale -- --addr 127.0.0.1:3261 --target IQN`.

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Parser;
use holdfast::initiator::{InitiatorConfig, Session};
use holdfast::service::nofile;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Barrier, Semaphore};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    target: String,
    /// Session counts of the steps, ascending (sessions stay logged in between steps).
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
    sessions: Vec<usize>,
    /// LUNs 0..luns, all of which the target must report.
    #[arg(long, default_value_t = 4096)]
    luns: u64,
    /// Seconds of I/O per step.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Percentage of reads (the rest are writes).
    #[arg(long, default_value_t = 50)]
    read_pct: u32,
    /// Target process whose VmRSS is sampled.
    #[arg(long)]
    target_pid: Option<u32>,
    /// Logins in flight at once (a login storm is not what this measures).
    #[arg(long, default_value_t = 32)]
    login_parallel: usize,
}

const IO: u32 = 4096;

/// Size of one LUN: blocks and block size.
#[derive(Debug, Clone, Copy)]
struct Capacity {
    blocks: u64,
    block_size: u32,
}

/// What one step measured.
#[derive(Debug)]
struct Step {
    sessions: usize,
    login_secs: f64,
    p99_us: u32,
    rss_logged_in_kib: Option<u64>,
}

/// A field (kB) of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (utime + stime, all threads) a process has used so far; `None` for self.
fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let p = match pid {
        Some(pid) => procfs::process::Process::new(pid as i32).ok()?,
        None => procfs::process::Process::myself().ok()?,
    };
    let st = p.stat().ok()?;
    Some((st.utime + st.stime) as f64 / procfs::ticks_per_second() as f64)
}

/// CPU µs per I/O of the target and of this client over a step: which side bounds it.
fn report_cpu(target_pid: Option<u32>, before: (Option<f64>, Option<f64>), ios: usize) {
    let per_io = |pid, b: Option<f64>| match (b, cpu_secs(pid)) {
        (Some(b), Some(a)) if ios > 0 => format!("{:.1}", (a - b) * 1e6 / ios as f64),
        _ => "?".into(),
    };
    println!(
        "  CPU us per I/O: target {}  client (this process) {}",
        per_io(target_pid, before.0),
        per_io(None, before.1)
    );
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// Log in sessions `from..to`, `parallel` at a time; each checks REPORT LUNS.
async fn log_in(a: &Args, from: usize, to: usize) -> anyhow::Result<Vec<Session>> {
    let gate = Arc::new(Semaphore::new(a.login_parallel.max(1)));
    let mut logins = Vec::new();
    for i in from..to {
        let gate = gate.clone();
        let cfg = InitiatorConfig::new(
            format!("iqn.2026-11.org.holdfast.scale:init{i}"),
            a.target.clone(),
            a.addr,
        );
        let luns = a.luns;
        logins.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await;
            let s = Session::login(cfg)
                .await
                .with_context(|| format!("login of session {i}"))?;
            let seen = s.report_luns().await?.len() as u64;
            ensure!(
                seen == luns,
                "session {i}: REPORT LUNS lists {seen} LUNs, not {luns}"
            );
            anyhow::Ok(s)
        }));
    }
    let mut out = Vec::new();
    for l in logins {
        out.push(l.await??);
    }
    Ok(out)
}

/// READ CAPACITY of every LUN, through one session.
async fn capacities(s: &Session, luns: u64) -> anyhow::Result<Vec<Capacity>> {
    let mut out = Vec::new();
    for lun in 0..luns {
        let (last_lba, block_size) = s.read_capacity16(lun).await?;
        ensure!(
            u64::from(IO / block_size) <= last_lba + 1,
            "LUN {lun} is smaller than one I/O"
        );
        out.push(Capacity {
            blocks: last_lba + 1,
            block_size,
        });
    }
    Ok(out)
}

/// One session's I/O for `run`: latencies (µs) and the time it took.
async fn session_io(
    s: Session,
    luns: Vec<(u64, Capacity)>,
    seed: u64,
    read_pct: u32,
    run: Duration,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Vec<u32>, Duration)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let payload = Bytes::from(vec![seed as u8; IO as usize]);
    let mut lat_us: Vec<u32> = Vec::with_capacity(4096);
    barrier.wait().await;
    let start = Instant::now();
    while start.elapsed() < run {
        let (lun, cap) = luns[rng.gen_range(0..luns.len())];
        let per_io = u64::from(IO / cap.block_size);
        let lba = rng.gen_range(0..cap.blocks / per_io) * per_io;
        let t = Instant::now();
        if rng.gen_range(0..100) < read_pct {
            s.read16(lun, lba, per_io as u32, cap.block_size).await?;
        } else {
            s.write16(lun, lba, payload.clone(), cap.block_size, false)
                .await?;
        }
        lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    Ok((lat_us, start.elapsed()))
}

/// Peak VmRSS of `pid` sampled every 500 ms for `run`.
fn sample_rss(pid: Option<u32>, run: Duration) -> Option<tokio::task::JoinHandle<u64>> {
    pid.map(|pid| {
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..(run.as_millis() / 500) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                peak = peak.max(status_kib(pid, "VmRSS:").unwrap_or(0));
            }
            peak
        })
    })
}

/// Run every session's I/O at once; returns per-session (latencies, elapsed).
async fn run_io(
    a: &Args,
    sessions: &[Session],
    caps: &[Capacity],
) -> anyhow::Result<Vec<(Vec<u32>, Duration)>> {
    let n = sessions.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let run = Duration::from_secs(a.secs);
    let mut workers = Vec::new();
    for (i, s) in sessions.iter().cloned().enumerate() {
        let luns: Vec<_> = (i..caps.len())
            .step_by(n)
            .map(|l| (l as u64, caps[l]))
            .collect();
        let seed = (n as u64) << 32 | i as u64;
        let b = barrier.clone();
        workers.push(tokio::spawn(session_io(s, luns, seed, a.read_pct, run, b)));
    }
    barrier.wait().await;
    let mut out = Vec::new();
    for w in workers {
        out.push(w.await??);
    }
    Ok(out)
}

/// Print one step's figures; returns its p99 (µs).
fn report_step(per_session: &[(Vec<u32>, Duration)]) -> u32 {
    let mut all: Vec<u32> = per_session.iter().flat_map(|(l, _)| l).copied().collect();
    all.sort_unstable();
    let iops: Vec<f64> = per_session
        .iter()
        .map(|(l, el)| l.len() as f64 / el.as_secs_f64())
        .collect();
    let elapsed = per_session
        .iter()
        .map(|(_, el)| *el)
        .max()
        .unwrap_or_default();
    let mean = iops.iter().sum::<f64>() / iops.len().max(1) as f64;
    let min = iops.iter().copied().fold(f64::INFINITY, f64::min);
    let max = iops.iter().copied().fold(0.0, f64::max);
    let outside = iops
        .iter()
        .filter(|&&x| x < mean / 2.0 || x > mean * 2.0)
        .count();
    let p99 = pct(&all, 0.99);
    println!(
        "  aggregate {:.0} IOPS  latency p50 {} us  p99 {p99} us  p99.9 {} us  max {} us",
        all.len() as f64 / elapsed.as_secs_f64(),
        pct(&all, 0.50),
        pct(&all, 0.999),
        all.last().copied().unwrap_or(0)
    );
    println!(
        "  per-session IOPS min {min:.1}  mean {mean:.1}  max {max:.1}  (min/mean {:.2}, max/mean {:.2}); outside [mean/2, 2*mean]: {outside}",
        min / mean,
        max / mean
    );
    if outside > 0 {
        println!("  STARVATION: {outside} sessions outside [mean/2, 2*mean]");
    }
    p99
}

/// p99 growth against session growth, and RSS per session, over all steps.
fn report_growth(steps: &[Step], rss_idle: Option<u64>) {
    let Some(first) = steps.first() else { return };
    println!(
        "sessions  logins s  p99 us  p99 growth  session growth  target RSS MiB  RSS/session KiB"
    );
    for s in steps {
        let per_session = match (s.rss_logged_in_kib, rss_idle) {
            (Some(r), Some(idle)) => {
                format!("{:.1}", r.saturating_sub(idle) as f64 / s.sessions as f64)
            }
            _ => "?".into(),
        };
        println!(
            "{:8}  {:8.2}  {:6}  {:10.2}  {:14.2}  {:>14}  {:>15}",
            s.sessions,
            s.login_secs,
            s.p99_us,
            f64::from(s.p99_us) / f64::from(first.p99_us.max(1)),
            s.sessions as f64 / first.sessions as f64,
            mib(s.rss_logged_in_kib),
            per_session
        );
    }
    let superlinear = steps.iter().any(|s| {
        f64::from(s.p99_us) / f64::from(first.p99_us.max(1))
            > s.sessions as f64 / first.sessions as f64
    });
    println!(
        "p99 growth {} the session growth",
        if superlinear {
            "EXCEEDS"
        } else {
            "stays within"
        }
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.sessions.is_empty() || a.sessions.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--sessions must be ascending counts, e.g. 250,500,1000");
    }
    let most = *a.sessions.last().unwrap_or(&0);
    // One socket per session: the client needs the descriptors as much as the target.
    let fds = nofile::raise(nofile::needed(0, most as u64))?;
    ensure!(
        fds.enough(),
        "open-file limit {} < {} needed",
        fds.now,
        fds.needed
    );
    let rss_idle = a.target_pid.and_then(|p| status_kib(p, "VmRSS:"));
    let mut sessions: Vec<Session> = Vec::new();
    let mut caps = Vec::new();
    let mut steps = Vec::new();
    for &n in &a.sessions {
        let t0 = Instant::now();
        sessions.extend(log_in(&a, sessions.len(), n).await?);
        let login_secs = t0.elapsed().as_secs_f64();
        if caps.is_empty() {
            caps = capacities(&sessions[0], a.luns).await?;
        }
        let rss_logged_in_kib = a.target_pid.and_then(|p| status_kib(p, "VmRSS:"));
        println!(
            "sessions {n}  luns {}  logins {login_secs:.2}s ({} new)  run {}s",
            a.luns,
            n - steps.last().map_or(0, |s: &Step| s.sessions),
            a.secs
        );
        let sampler = sample_rss(a.target_pid, Duration::from_secs(a.secs));
        let cpu_before = (a.target_pid.and_then(|p| cpu_secs(Some(p))), cpu_secs(None));
        let per_session = run_io(&a, &sessions, &caps).await?;
        let p99_us = report_step(&per_session);
        let ios = per_session.iter().map(|(l, _)| l.len()).sum();
        report_cpu(a.target_pid, cpu_before, ios);
        if let (Some(pid), Some(s)) = (a.target_pid, sampler) {
            println!(
                "  target VmRSS MiB: idle {}  logged in {}  peak during I/O {}  VmHWM {}",
                mib(rss_idle),
                mib(rss_logged_in_kib),
                mib(Some(s.await?)),
                mib(status_kib(pid, "VmHWM:"))
            );
        }
        steps.push(Step {
            sessions: n,
            login_secs,
            p99_us,
            rss_logged_in_kib,
        });
    }
    for s in sessions {
        let _ = s.logout().await;
    }
    report_growth(&steps, rss_idle);
    Ok(())
}
