//! Each gateway watches the PR object of its RBD LUNs: a notice from another gateway is
//! installed in the logical unit (which waits for every command admitted under the old
//! state) before it is acknowledged. A broken watch makes the LU answer NOT READY for
//! commands subject to reservations until it is re-established and the state re-read.

use super::ffi::{Cluster, Pool, Watch, WatchEvent};
use super::pr_object::{PrObject, RbdSharedPr};
use super::pr_sync::{self, PrNotice};
use super::recovery::{Recovery, Step};
use super::stall::StallDetector;
use super::{CephSettings, RbdBackend, RbdError};
use crate::scsi::backend::{BlockBackend, ExclusiveLock};
use crate::scsi::lun::{LogicalUnit, Published};
use crate::scsi::pr::{PrState, ProutEffects};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the watcher checks that its LU still exists and whether a recovery
/// attempt is due (the backoff's first wait is shorter than this).
const RECOVERY_TICK: Duration = Duration::from_millis(100);
/// How long the start-up probe waits for other gateways to answer.
const PROBE_MS: u64 = 2000;

fn err(spec: &str, step: &'static str, e: i32) -> RbdError {
    RbdError::Open {
        spec: spec.into(),
        step,
        source: io::Error::from_raw_os_error(e),
    }
}

/// Serve `lu`'s persistent reservations from the PR object of `pool/image`, shared with
/// every gateway serving that image. Applies the start-up rule of
/// [`pr_sync::state_at_start`] and keeps watching until `lu` is dropped; when this
/// client is blocklisted, reconnects (reopening `backend`'s image) and serves again.
pub fn share_reservations(
    settings: &CephSettings,
    pool: &str,
    image: &str,
    lu: &Arc<LogicalUnit>,
    backend: &Arc<RbdBackend>,
) -> Result<(), RbdError> {
    let spec = format!("{pool}/{image}");
    let cluster = super::connect(settings)?;
    let (tx, rx) = mpsc::channel();
    let (obj, watch, others) = open_session(cluster, pool, image, &tx, &mut others_watching)
        .map_err(|(step, e)| err(&spec, step, e))?;
    let c = obj
        .update(&mut |cur: &PrState| Ok(start_state(cur, others)))
        .map_err(|e| err(&spec, "reading the PR object", e.errno()))?;
    tracing::info!(image = %spec, others_serving = others, cleared = c.effects.changed,
        registrations = c.state.registrations.len(), "shared persistent reservations");
    let shared = Arc::new(RbdSharedPr::new(obj.clone(), settings.notify_timeout));
    if c.effects.changed && shared.publish(c.seq, &c.state, &c.effects) != Published::Everywhere {
        tracing::warn!(image = %spec, "a silent gateway could not be fenced after clearing");
    }
    lu.install_shared_pr(c.seq, c.state, &ProutEffects::default(), None);
    lu.set_shared_pr(shared.clone());
    let w = Watcher {
        obj,
        lu: Arc::downgrade(lu),
        tx,
        watch: Some(watch),
        recovery: Recovery::default(),
        settings: settings.clone(),
        pool: pool.into(),
        image: image.into(),
        backend: Arc::downgrade(backend),
        shared,
        stall: StallDetector::default(),
        probing: Arc::default(),
    };
    std::thread::Builder::new()
        .name("holdfast-pr-watch".into())
        .spawn(move || w.run(rx))
        .map_err(|e| RbdError::Open {
            spec,
            step: "starting the PR watcher",
            source: e,
        })?;
    Ok(())
}

/// The start-up rule as a PR update: the state to write, or the stored one unchanged.
fn start_state(cur: &PrState, others: bool) -> (PrState, ProutEffects) {
    match pr_sync::state_at_start(cur, others) {
        Some(s) => (
            s,
            ProutEffects {
                changed: true,
                ..Default::default()
            },
        ),
        None => (cur.clone(), ProutEffects::default()),
    }
}

type StepError = (&'static str, i32);

/// On `cluster`: the PR object of `image`, `probe`'s answer (asked before this gateway
/// watches), this client's address published on the object (which also creates it,
/// empty: the initial state; a watch needs it) and the watch.
fn open_session<T>(
    cluster: Arc<Cluster>,
    pool: &str,
    image: &str,
    tx: &Sender<WatchEvent>,
    probe: &mut dyn FnMut(&PrObject) -> Result<T, i32>,
) -> Result<(Arc<PrObject>, Watch, T), StepError> {
    let gid = cluster.instance_id();
    let addr = cluster
        .address()
        .map_err(|e| ("reading the client address", e))?;
    let open = |c| Pool::open(c, pool).map_err(|e| ("opening the pool", e));
    let cas = open(cluster.clone())?;
    let obj = Arc::new(PrObject::new(Arc::new(open(cluster)?), cas, pool, image));
    let probed = probe(&obj).map_err(|e| ("probing other gateways", e))?;
    obj.pool
        .setxattr(&obj.oid, &pr_sync::address_xattr(gid), addr.as_bytes())
        .map_err(|e| ("publishing the gateway address", e))?;
    let watch = obj
        .pool
        .watch(&obj.oid, 0, tx.clone())
        .map_err(|e| ("watching the PR object", e))?;
    Ok((obj, watch, probed))
}

/// Whether another gateway serves the image now (a probe notify its watchers ack;
/// nobody watching answers at once).
fn others_watching(obj: &PrObject) -> Result<bool, i32> {
    match obj.pool.notify(&obj.oid, b"", PROBE_MS) {
        Ok((_, raw)) => {
            let r = pr_sync::parse_notify_reply(&raw).unwrap_or_default();
            // Only a gateway that answers is serving: a crashed one's watch lingers
            // until the OSD times it out, and a frozen one is fenced when the cleared
            // state is published.
            Ok(!r.acked.is_empty())
        }
        Err(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

impl pr_sync::UpdateError {
    fn errno(&self) -> i32 {
        match self {
            pr_sync::UpdateError::Io(e) => *e,
            _ => libc::EIO,
        }
    }
}

struct Watcher {
    obj: Arc<PrObject>,
    lu: Weak<LogicalUnit>,
    tx: Sender<WatchEvent>,
    watch: Option<Watch>,
    recovery: Recovery,
    /// What a reconnect needs: where to connect, the image to reopen, the PR OUT path
    /// to move to the new connection.
    settings: CephSettings,
    pool: String,
    image: String,
    backend: Weak<RbdBackend>,
    shared: Arc<RbdSharedPr>,
    stall: StallDetector,
    /// A stall probe is running (on its own thread: it may wait `notify_timeout`, and
    /// this thread must keep acknowledging other gateways' notices meanwhile).
    probing: Arc<AtomicBool>,
}

impl Watcher {
    fn run(mut self, rx: Receiver<WatchEvent>) {
        loop {
            let ev = rx.recv_timeout(RECOVERY_TICK);
            let Some(lu) = self.lu.upgrade() else { break };
            match ev {
                Ok(WatchEvent::Notify {
                    notify_id,
                    cookie,
                    notifier_id,
                    payload,
                }) => {
                    self.on_notify(&lu, notifier_id, &payload);
                    if let Err(e) = self.obj.pool.notify_ack(&self.obj.oid, notify_id, cookie) {
                        tracing::warn!(object = %self.obj.oid, errno = e, "PR notify ack failed");
                    }
                }
                Ok(WatchEvent::Error { cookie, errno }) => {
                    if self.watch.as_ref().is_some_and(|w| w.cookie() == cookie) {
                        tracing::warn!(object = %self.obj.oid, errno, "PR watch lost");
                        self.lose(&lu, errno);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Image I/O that found this client blocklisted marked the LU stale itself.
            if lu.is_pr_stale() && !self.recovery.is_lost() {
                tracing::warn!(object = %self.obj.oid, "image I/O refused: reconnecting");
                self.lose(&lu, super::recovery::EBLOCKLISTED);
            }
            if let Some(step) = self.recovery.due(Instant::now()) {
                self.attempt(&lu, step);
            }
            self.check_stall();
        }
    }

    /// Image I/O stalled: if another gateway holds the exclusive lock, probe the
    /// gateways and fence a silent one (a dead holder would keep the lock until the
    /// OSDs time its watch out).
    fn check_stall(&mut self) {
        let Some(b) = self.backend.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due = self.stall.handle_sample(now, b.progress.sample());
        if !due || self.recovery.is_lost() || self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stall.probed(now);
        let (shared, probing) = (self.shared.clone(), self.probing.clone());
        let spawned = std::thread::Builder::new()
            .name("holdfast-rbd-probe".into())
            .spawn(move || {
                if matches!(b.exclusive_lock(), Ok(ExclusiveLock::HeldElsewhere)) {
                    tracing::warn!(image = %b.spec(), "image I/O stalled while another gateway \
                        holds the exclusive lock: probing the gateways, fencing a silent one");
                    crate::metrics::ceph::get().stall_probe(b.spec());
                    let answered = shared.fence_silent();
                    tracing::info!(image = %b.spec(), answered_or_fenced = answered, "probe done");
                }
                probing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.probing.store(false, Ordering::Release);
        }
    }

    fn lose(&mut self, lu: &LogicalUnit, errno: i32) {
        if !self.recovery.is_lost() {
            crate::metrics::ceph::get().watch_lost(&self.obj.spec);
        }
        lu.set_pr_stale(true);
        self.watch = None;
        self.recovery.lost(errno, Instant::now());
    }

    /// One recovery attempt; only a complete one makes the LU ready again.
    fn attempt(&mut self, lu: &LogicalUnit, step: Step) {
        let t0 = Instant::now();
        let r = match step {
            Step::Rewatch => self.rewatch(lu),
            Step::Reconnect => self.reconnect(lu),
        };
        match r {
            Ok((seq, state)) => {
                self.recovery.recovered();
                crate::metrics::ceph::get().watch_recovered(&self.obj.spec);
                lu.set_pr_stale(false);
                tracing::info!(object = %self.obj.oid, ?step, took = ?t0.elapsed(),
                    "PR watch re-established and state re-read: serving again");
                self.republish(seq, state);
            }
            Err((what, errno)) => {
                self.watch = None;
                let unit = jitter();
                self.recovery.failed(step, errno, Instant::now(), unit);
                tracing::warn!(object = %self.obj.oid, ?step, what, errno,
                    "PR watch recovery failed; retrying");
            }
        }
    }

    /// Install a notice from another gateway (ours are installed by the PR OUT itself;
    /// an empty payload is a start-up probe), or carry out its LU reset.
    fn on_notify(&mut self, lu: &LogicalUnit, notifier: u64, payload: &[u8]) {
        if notifier == self.obj.pool.cluster().instance_id() || payload.is_empty() {
            return;
        }
        if payload == pr_sync::RESET_NOTICE {
            return lu.reset_from_peer();
        }
        match PrNotice::decode(payload) {
            Some(n) => lu.install_shared_pr(n.seq, n.state.clone(), &n.effects(), None),
            None => {
                tracing::warn!(object = %self.obj.oid, "unreadable PR notice: re-reading");
                if let Err((what, errno)) = self.reload(lu) {
                    tracing::warn!(object = %self.obj.oid, what, errno, "PR state unknown");
                    self.lose(lu, errno);
                }
            }
        }
    }

    /// Publish the state just re-read to the other gateways, on a thread of its own
    /// (this one must keep acknowledging their notices). A PR OUT of ours may have
    /// committed while we were cut off without its notice reaching them (the commit
    /// landed, then we found ourselves fenced); until another PR OUT, they would act
    /// on the state before it. A silent gateway is fenced, as for any notice.
    fn republish(&self, seq: u64, state: PrState) {
        let shared = self.shared.clone();
        let oid = self.obj.oid.clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-pr-republish".into())
            .spawn(move || {
                let published = shared.publish(seq, &state, &ProutEffects::default());
                tracing::info!(object = %oid, seq, ?published,
                    "re-published the PR state after recovery");
            });
        if let Err(e) = spawned {
            tracing::warn!(object = %self.obj.oid, error = %e, "cannot re-publish the PR state");
        }
    }

    /// Re-read the committed state and install it; what was installed.
    fn reload(&self, lu: &LogicalUnit) -> Result<(u64, PrState), StepError> {
        let (seq, st) = self.obj.read_state().map_err(|e| {
            (
                "re-reading the PR state",
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
        lu.install_shared_pr(seq, st.clone(), &ProutEffects::default(), None);
        Ok((seq, st))
    }

    /// Re-establish the watch on the current connection, then re-read.
    fn rewatch(&mut self, lu: &LogicalUnit) -> Result<(u64, PrState), StepError> {
        let w = self
            .obj
            .pool
            .watch(&self.obj.oid, 0, self.tx.clone())
            .map_err(|e| ("watching the PR object", e))?;
        self.watch = Some(w);
        self.reload(lu)
    }

    /// A new connection (this client was blocklisted): reopen the image, publish the
    /// new address, watch, re-read; then PR OUT goes through the new connection too.
    fn reconnect(&mut self, lu: &LogicalUnit) -> Result<(u64, PrState), StepError> {
        let dead = self.obj.pool.cluster_arc();
        let cluster = super::connect_replacing(&self.settings, Some(&dead))
            .map_err(|_| ("connecting anew", libc::ENOTCONN))?;
        let (obj, watch, ()) = open_session(
            cluster.clone(),
            &self.pool,
            &self.image,
            &self.tx,
            &mut |_| Ok(()),
        )?;
        self.obj = obj.clone();
        self.watch = Some(watch);
        // Install first: that waits out every command admitted under the old state
        // (they fail on the old handle), so none of them can reach the new one.
        let loaded = self.reload(lu)?;
        if let Some(b) = self.backend.upgrade() {
            let old = b
                .reopen(cluster)
                .map_err(|_| ("reopening the image", libc::EIO))?;
            // Closing a blocklisted client's image may wait on the cluster: not here.
            let _ = std::thread::Builder::new()
                .name("holdfast-rbd-close".into())
                .spawn(move || drop(old));
        }
        self.shared.replace_object(obj);
        Ok(loaded)
    }
}

/// Jitter in [0, 1) for the backoff, from the clock (no RNG needed for spreading
/// retries of gateways that lost their connections together).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}
