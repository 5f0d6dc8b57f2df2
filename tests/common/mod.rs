//! Shared test helpers: an in-process target started from a TOML string, on 127.0.0.1:0,
//! with its backing files in a temporary directory.
#![allow(dead_code)]

pub mod ceph_fixture;
pub mod cluster;
pub mod gateways;
pub mod hooked;
pub mod metrics;
pub mod netns;
pub mod notify;
pub mod pr;
pub mod raw;

use holdfast::initiator::{InitiatorConfig, Session};
use holdfast::server::config;
use holdfast::server::portal::Portals;
use holdfast::server::runtime::Runtime;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const TARGET: &str = "iqn.2026-11.org.holdfast:test";
pub const INITIATOR: &str = "iqn.2026-11.org.holdfast:initiator";
pub const BLOCK: u32 = 512;

pub struct TestTarget {
    pub addr: SocketAddr,
    /// Every portal's bound address, in config order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    pub dir: tempfile::TempDir,
    shutdown: watch::Sender<bool>,
    pub serve: Option<JoinHandle<()>>,
}

impl TestTarget {
    /// Path of a backing file named in the config.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(name)
    }

    pub fn config(&self) -> InitiatorConfig {
        InitiatorConfig::new(INITIATOR, TARGET, self.addr)
    }

    pub async fn login(&self) -> Session {
        Session::login(self.config()).await.expect("login")
    }

    /// Log in as `initiator` through portal `portal` (index into `addrs`), with a fixed
    /// ISID or a random one.
    pub async fn login_as(&self, initiator: &str, isid: Option<[u8; 6]>, portal: usize) -> Session {
        let mut cfg = InitiatorConfig::new(initiator, TARGET, self.addrs[portal]);
        cfg.isid = isid;
        let s = Session::login(cfg).await.expect("login");
        clear_unit_attention(&s, 0).await;
        s
    }

    /// Ask the target to shut down (SIGTERM equivalent) and wait for serve() to return.
    pub async fn shutdown(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(h) = self.serve.take() {
            tokio::time::timeout(std::time::Duration::from_secs(60), h)
                .await
                .expect("serve() returns after shutdown")
                .expect("serve task");
        }
    }

    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A config with one target on 127.0.0.1:0: `iscsi` goes into the [iscsi] table,
/// `target_extra` into the [[target]] table (before its LUNs), `luns` lists
/// (id, file, size) LUNs.
pub fn config_text(iscsi: &str, target_extra: &str, luns: &[(u64, &str, &str)]) -> String {
    let mut s = format!(
        "data_dir = \"data\"\n[iscsi]\n{iscsi}\n\n[[target]]\nname = \"{TARGET}\"\n{target_extra}\n"
    );
    s.push_str("[[target.portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 1\n");
    for (id, file, size) in luns {
        s.push_str(&format!(
            "[[target.lun]]\nid = {id}\npath = \"{file}\"\nsize = \"{size}\"\n"
        ));
    }
    s
}

/// Start a target from a full TOML text.
pub async fn start(text: &str) -> TestTarget {
    start_inner(text, &|_, b| b, |_| {}).await
}

/// A function that wraps (e.g. fault-injects) a LUN's backend, given its file's path.
pub type BackendWrap = holdfast::server::runtime::BackendWrap;

/// Start a target whose LUN backends pass through `wrap`.
pub async fn start_wrapped(text: &str, wrap: &BackendWrap) -> TestTarget {
    start_inner(text, wrap, |_| {}).await
}

/// Start a target from `text` with LUN `lun` of its first target served from `backend`
/// instead of its file (a deliberately slow one, say), PREEMPT AND ABORT hook included.
pub async fn start_with_backend(
    text: &str,
    lun: u64,
    backend: Arc<dyn holdfast::scsi::backend::BlockBackend>,
) -> TestTarget {
    start_inner(text, &|_, b| b, move |rt| {
        let nexuses = rt.nexuses.clone();
        let node = Arc::get_mut(&mut rt.targets[0]).expect("target not shared yet");
        let settings = node.luns[&lun].settings().clone();
        let lu = holdfast::scsi::LogicalUnit::new(settings, backend);
        lu.set_abort_hook(Box::new(move |victims| nexuses.abort(victims, lun)));
        node.luns.insert(lun, Arc::new(lu));
    })
    .await
}

async fn start_inner(
    text: &str,
    wrap: &BackendWrap,
    adjust: impl FnOnce(&mut Runtime),
) -> TestTarget {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config::parse(text, "test.toml", dir.path()).expect("valid config");
    let mut rt = Runtime::build_with(&cfg, wrap).expect("runtime");
    adjust(&mut rt);
    let rt = Arc::new(rt);
    let portals = Portals::bind(&cfg.listen_addrs()).await.expect("bind");
    let addrs = portals.local_addrs();
    let addr = addrs[0];
    let (tx, rx) = watch::channel(false);
    let serve = tokio::spawn(portals.serve(rt, rx));
    TestTarget {
        addr,
        addrs,
        dir,
        shutdown: tx,
        serve: Some(serve),
    }
}

/// One target, one 64 MiB LUN 0, default settings.
pub async fn start_default() -> TestTarget {
    start(&config_text("", "", &[(0, "lun0.img", "64MiB")])).await
}

/// Consume pending unit attentions (power-on, reset) so later commands see GOOD.
pub async fn clear_unit_attention(s: &Session, lun: u64) {
    for _ in 0..4 {
        if s.test_unit_ready(lun).await.is_ok() {
            return;
        }
    }
}

/// A well-behaved session doing write + read-back I/O in the background while a test
/// does something hostile: it must keep succeeding, without long stalls.
pub struct Bystander {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: JoinHandle<BystanderReport>,
}

#[derive(Debug)]
pub struct BystanderReport {
    pub ops: u64,
    pub max_latency: std::time::Duration,
    pub errors: Vec<String>,
}

impl Bystander {
    /// Log in (own ISID) and loop 4 KiB writes and verifying reads on LUN `lun` from
    /// `lba_base` on.
    pub async fn start(t: &TestTarget, lun: u64, lba_base: u64) -> Bystander {
        let s = t.login().await;
        clear_unit_attention(&s, lun).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done2 = done.clone();
        let handle = tokio::spawn(async move {
            let mut r = BystanderReport {
                ops: 0,
                max_latency: std::time::Duration::ZERO,
                errors: Vec::new(),
            };
            let mut i: u64 = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let lba = lba_base + (i % 256) * 8;
                let data = bytes::Bytes::from(vec![(i % 251) as u8; 4096]);
                let t0 = std::time::Instant::now();
                let res = async {
                    s.write16(lun, lba, data.clone(), BLOCK, false).await?;
                    let back = s.read16(lun, lba, 8, BLOCK).await?;
                    if back != data {
                        return Err(holdfast::initiator::InitiatorError::Protocol(
                            "read back differs".into(),
                        ));
                    }
                    Ok::<_, holdfast::initiator::InitiatorError>(())
                };
                match tokio::time::timeout(std::time::Duration::from_secs(20), res).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => r.errors.push(e.to_string()),
                    Err(_) => r.errors.push("write+read timed out".into()),
                }
                r.max_latency = r.max_latency.max(t0.elapsed());
                r.ops += 1;
                done2.store(r.ops, std::sync::atomic::Ordering::Relaxed);
                i += 1;
                if r.errors.len() > 3 {
                    break;
                }
                // Gentle pace: the point is liveness, not load.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let _ = s.logout().await;
            r
        });
        Bystander { stop, done, handle }
    }

    /// Stop and check: no errors, some progress, no stall beyond `bound`.
    pub async fn finish(self, bound: std::time::Duration) -> BystanderReport {
        // Let it show progress after whatever the test did.
        let seen = self.done.load(std::sync::atomic::Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        while self.done.load(std::sync::atomic::Ordering::Relaxed) < seen + 5
            && t0.elapsed() < bound * 4
            && !self.handle.is_finished()
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = self.handle.await.expect("bystander task");
        assert!(r.errors.is_empty(), "bystander saw errors: {r:?}");
        assert!(r.ops >= 3, "bystander made no progress: {r:?}");
        assert!(
            r.max_latency < bound,
            "bystander stalled: {r:?} (bound {bound:?})"
        );
        r
    }
}
