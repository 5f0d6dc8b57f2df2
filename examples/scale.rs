//! Many sessions at once: N sessions spread over M LUNs, each doing 4 KiB random reads and
//! writes at queue depth 1 for a fixed time, against a running target.
//!
//! Reports aggregate IOPS, latency percentiles, per-session IOPS min/mean/max (a session
//! outside [mean/2, 2×mean] counts as starved or favoured) and, with `--target-pid`, the
//! target's peak resident memory. Used by `tools/bench`; run by hand as
//! `cargo run --release --example scale -- --addr 127.0.0.1:3261 --target IQN`.

use bytes::Bytes;
use clap::Parser;
use holdfast::initiator::{InitiatorConfig, Session};
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
    #[arg(long, default_value_t = 256)]
    sessions: usize,
    /// LUNs 0..luns are used round-robin (session i uses LUN i % luns).
    #[arg(long, default_value_t = 64)]
    luns: u64,
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Percentage of reads (the rest are writes).
    #[arg(long, default_value_t = 50)]
    read_pct: u32,
    /// Target process whose VmRSS is sampled during the run.
    #[arg(long)]
    target_pid: Option<u32>,
    /// Logins in flight at once (a login storm is not what this measures).
    #[arg(long, default_value_t = 32)]
    login_parallel: usize,
}

const IO: u32 = 4096;

/// Resident set size (kB) of a process, from /proc/PID/status.
fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rss_before = a.target_pid.and_then(|p| rss_kib(p, "VmRSS:"));

    // Log in every session first, so the measured phase is pure I/O.
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(a.login_parallel.max(1)));
    let mut logins = Vec::new();
    for i in 0..a.sessions {
        let gate = gate.clone();
        let cfg = InitiatorConfig::new(
            format!("iqn.2026-11.org.holdfast.scale:init{i}"),
            a.target.clone(),
            a.addr,
        );
        logins.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await;
            Session::login(cfg).await
        }));
    }
    let mut sessions = Vec::new();
    for l in logins {
        sessions.push(l.await??);
    }
    let login_secs = t0.elapsed().as_secs_f64();
    let mut blocks = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let lun = i as u64 % a.luns;
        let (last_lba, bs) = s.read_capacity16(lun).await?;
        blocks.push((lun, last_lba + 1, bs));
    }
    let rss_logged_in = a.target_pid.and_then(|p| rss_kib(p, "VmRSS:"));

    let barrier = Arc::new(Barrier::new(a.sessions + 1));
    let run = Duration::from_secs(a.secs);
    let mut workers = Vec::new();
    for (i, s) in sessions.iter().cloned().enumerate() {
        let (lun, nblocks, bs) = blocks[i];
        let barrier = barrier.clone();
        let read_pct = a.read_pct;
        workers.push(tokio::spawn(async move {
            let per_io = u64::from(IO / bs);
            let slots = nblocks / per_io;
            let mut rng = StdRng::seed_from_u64(i as u64);
            let payload = Bytes::from(vec![i as u8; IO as usize]);
            let mut lat_us: Vec<u32> = Vec::with_capacity(4096);
            barrier.wait().await;
            let start = Instant::now();
            while start.elapsed() < run {
                let lba = rng.gen_range(0..slots) * per_io;
                let t = Instant::now();
                if rng.gen_range(0..100) < read_pct {
                    s.read16(lun, lba, per_io as u32, bs).await?;
                } else {
                    s.write16(lun, lba, payload.clone(), bs, false).await?;
                }
                lat_us.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            anyhow::Ok((lat_us, start.elapsed()))
        }));
    }
    // Sample the target's RSS while the sessions run.
    let sampler = a.target_pid.map(|pid| {
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..(run.as_millis() / 500) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                peak = peak.max(rss_kib(pid, "VmRSS:").unwrap_or(0));
            }
            peak
        })
    });
    barrier.wait().await;
    let mut all = Vec::new();
    let mut per_session = Vec::new();
    let mut elapsed_max = Duration::ZERO;
    for w in workers {
        let (lat, el) = w.await??;
        per_session.push(lat.len() as f64 / el.as_secs_f64());
        elapsed_max = elapsed_max.max(el);
        all.extend(lat);
    }
    let rss_peak = match sampler {
        Some(s) => Some(s.await?),
        None => None,
    };
    for s in sessions {
        let _ = s.logout().await;
    }

    all.sort_unstable();
    let total = all.len() as f64;
    let mean = per_session.iter().sum::<f64>() / per_session.len().max(1) as f64;
    let min = per_session.iter().copied().fold(f64::INFINITY, f64::min);
    let max = per_session.iter().copied().fold(0.0, f64::max);
    let outside = per_session
        .iter()
        .filter(|&&x| x < mean / 2.0 || x > mean * 2.0)
        .count();
    println!(
        "sessions {}  luns {}  logins {:.2}s  run {:.1}s",
        a.sessions,
        a.luns,
        login_secs,
        elapsed_max.as_secs_f64()
    );
    println!(
        "aggregate {:.0} IOPS  latency p50 {} us  p99 {} us  p99.9 {} us  max {} us",
        total / elapsed_max.as_secs_f64(),
        pct(&all, 0.50),
        pct(&all, 0.99),
        pct(&all, 0.999),
        all.last().copied().unwrap_or(0)
    );
    println!(
        "per-session IOPS min {min:.1}  mean {mean:.1}  max {max:.1}  (min/mean {:.2}, max/mean {:.2}); outside [mean/2, 2*mean]: {outside}",
        min / mean,
        max / mean
    );
    if let Some(pid) = a.target_pid {
        let kib =
            |v: Option<u64>| v.map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
        println!(
            "target VmRSS MiB: before {}  logged in {}  peak during I/O {}  VmHWM {}",
            kib(rss_before),
            kib(rss_logged_in),
            kib(rss_peak),
            kib(rss_kib(pid, "VmHWM:"))
        );
    }
    if outside > 0 {
        println!("STARVATION: {outside} sessions outside [mean/2, 2*mean]");
    }
    Ok(())
}
