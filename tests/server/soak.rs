//! Soak: N sessions doing mixed 4 KiB random I/O (with read-back checks) and periodic
//! logout/login against the release binary as a child process, for SOAK_SECONDS. The
//! target's RSS (VmRSS) and open fd count are sampled; the test fails if RSS grows more
//! than a bound after warm-up or if fds leak.
//!
//! Ignored by default; `tools/soak.sh [SECONDS]` runs it (SOAK_SESSIONS, default 64;
//! the long mode is SOAK_SECONDS=3600 SOAK_SESSIONS=256).

use crate::common;

use bytes::Bytes;
use common::{clear_unit_attention, init_tracing, BLOCK, TARGET};
use holdfast::initiator::{InitiatorConfig, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLOT_BLOCKS: u64 = 8; // 4 KiB
const SLOTS_PER_SESSION: u64 = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Child_(Child);
impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Counters {
    ios: AtomicU64,
    logins: AtomicU64,
    errors: AtomicU64,
}

async fn login(cfg: &InitiatorConfig) -> Session {
    for _ in 0..100 {
        if let Ok(s) = Session::login(cfg.clone()).await {
            clear_unit_attention(&s, 0).await;
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("login to {} failed", cfg.addr);
}

async fn session_load(
    i: u64,
    addr: SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
    relogin_every: Duration,
) {
    let cfg = InitiatorConfig::new(format!("iqn.2026-11.org.holdfast:soak{i}"), TARGET, addr);
    let mut rng = StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let base = i * SLOTS_PER_SESSION * SLOT_BLOCKS;
    // What this session last wrote into each slot (a fill byte), to check reads.
    let mut written: HashMap<u64, u8> = HashMap::new();
    let mut s = login(&cfg).await;
    c.logins.fetch_add(1, Ordering::Relaxed);
    let mut since = Instant::now();
    // Spread the re-logins over the period.
    let mut next_relogin = relogin_every.mul_f64(rng.gen_range(0.5..1.5));
    while !stop.load(Ordering::Relaxed) {
        if since.elapsed() > next_relogin {
            s.logout().await.ok();
            s = login(&cfg).await;
            c.logins.fetch_add(1, Ordering::Relaxed);
            since = Instant::now();
            next_relogin = relogin_every.mul_f64(rng.gen_range(0.5..1.5));
        }
        let slot = rng.gen_range(0..SLOTS_PER_SESSION);
        let lba = base + slot * SLOT_BLOCKS;
        let r = if rng.gen_bool(0.5) {
            let fill: u8 = rng.gen_range(1..=255);
            let res = s
                .write16(0, lba, Bytes::from(vec![fill; 4096]), BLOCK, false)
                .await;
            if res.is_ok() {
                written.insert(slot, fill);
            }
            res.map(|_| ())
        } else {
            match s.read16(0, lba, SLOT_BLOCKS as u32, BLOCK).await {
                Ok(d) => {
                    let want = written.get(&slot).copied().unwrap_or(0);
                    assert!(
                        d.iter().all(|b| *b == want),
                        "session {i}: slot {slot} does not hold its last write"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(()) => {
                c.ios.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("session {i}: {e}");
                c.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Mixed, not a benchmark: a small think time keeps 256 sessions on 2 cores fair.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..4))).await;
    }
    s.logout().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawns the release binary for minutes; run tools/soak.sh"]
async fn soak() {
    init_tracing();
    let secs = env_u64("SOAK_SECONDS", 120);
    let sessions = env_u64("SOAK_SESSIONS", 64);
    let seed = env_u64("SEED", 1);
    let rss_bound_mib = env_u64("SOAK_RSS_GROWTH_MIB", 32);
    let bin = std::env::var("HOLDFAST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_holdfast").into());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let lun_bytes = sessions * SLOTS_PER_SESSION * SLOT_BLOCKS * BLOCK as u64;
    let config = dir.path().join("target.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[limits]\nmax_sessions = 4096\nmax_connections = 4096\nmax_connections_per_target = 4096\n\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{addr}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = {lun_bytes}\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("target.log")).unwrap();
    let child = Command::new(&bin)
        .arg("target")
        .arg("--config")
        .arg(&config)
        .env("HOLDFAST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn holdfast");
    let child = Child_(child);
    let pid = child.0.id();
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_idle = fd_count(pid);
    let rss_idle = vm_rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let relogin = Duration::from_secs((secs / 6).clamp(5, 60));
    let tasks: Vec<_> = (0..sessions)
        .map(|i| {
            tokio::spawn(session_load(
                i,
                addr,
                seed,
                stop.clone(),
                counters.clone(),
                relogin,
            ))
        })
        .collect();
    // Warm-up: a fifth of the run (at least 10 s) lets buffers and caches settle.
    let warm = Duration::from_secs((secs / 5).max(10));
    tokio::time::sleep(warm).await;
    let rss_warm = vm_rss_kib(pid);
    let fds_warm = fd_count(pid);
    let ios_warm = counters.ios.load(Ordering::Relaxed);
    let mut rss_max = rss_warm;
    let end = Instant::now() + Duration::from_secs(secs).saturating_sub(warm);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rss_max = rss_max.max(vm_rss_kib(pid));
        assert!(
            child_alive(pid),
            "the target died during the soak (see its log)"
        );
    }
    let rss_end_loaded = vm_rss_kib(pid);
    let fds_end_loaded = fd_count(pid);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("session task ends")
            .expect("session task");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds_end = fd_count(pid);
    let rss_end = vm_rss_kib(pid);
    let ios = counters.ios.load(Ordering::Relaxed);
    let logins = counters.logins.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    eprintln!(
        "soak: {sessions} sessions, {secs} s: {ios} I/Os ({} after warm-up), {logins} logins, {errors} errors",
        ios - ios_warm
    );
    eprintln!(
        "soak: RSS idle {} MiB, after warm-up {} MiB, max {} MiB, end (loaded) {} MiB, end (idle) {} MiB",
        rss_idle >> 10,
        rss_warm >> 10,
        rss_max >> 10,
        rss_end_loaded >> 10,
        rss_end >> 10
    );
    eprintln!(
        "soak: fds idle {fds_idle}, after warm-up {fds_warm}, end (loaded) {fds_end_loaded}, end (idle) {fds_end}"
    );
    assert_eq!(errors, 0, "I/O or login errors during the soak");
    assert!(ios > 0 && logins > sessions, "no load ran");
    let growth = rss_end_loaded.saturating_sub(rss_warm);
    let bound = (rss_bound_mib << 10).max(rss_warm / 4);
    assert!(
        growth <= bound,
        "RSS grew by {} MiB after warm-up (bound {} MiB)",
        growth >> 10,
        bound >> 10
    );
    assert!(
        fds_end <= fds_idle + 2,
        "fd leak: {fds_idle} open before the sessions, {fds_end} after they all logged out"
    );
    assert!(
        fds_end_loaded <= fds_warm + (sessions as usize / 8).max(4),
        "fds grew under load: {fds_warm} -> {fds_end_loaded}"
    );
}

fn child_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| !s.contains("State:\tZ"))
        .unwrap_or(false)
}
