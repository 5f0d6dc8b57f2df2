//! Each gateway watches the PR object of its RBD LUNs: a notice from another gateway is
//! installed in the logical unit (which waits for every command admitted under the old
//! state) before it is acknowledged. A broken watch makes the LU answer NOT READY for
//! commands subject to reservations until it is re-established and the state re-read.

use super::ffi::{Pool, Watch, WatchEvent};
use super::pr_object::{PrObject, RbdSharedPr};
use super::pr_sync::{self, PrNotice};
use super::{CephSettings, RbdError};
use crate::scsi::lun::LogicalUnit;
use crate::scsi::pr::{PrState, ProutEffects};
use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the watcher checks that its LU still exists, and retries a broken watch.
const TICK: Duration = Duration::from_secs(1);
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
/// [`pr_sync::state_at_start`] and keeps watching until `lu` is dropped.
pub fn share_reservations(
    settings: &CephSettings,
    pool: &str,
    image: &str,
    lu: &Arc<LogicalUnit>,
) -> Result<(), RbdError> {
    let spec = format!("{pool}/{image}");
    let cluster = super::connect(settings)?;
    let gid = cluster.instance_id();
    let addr = cluster
        .address()
        .map_err(|e| err(&spec, "reading the client address", e))?;
    let open = |c| Pool::open(c, pool).map_err(|e| err(&spec, "opening the pool", e));
    let cas = open(cluster.clone())?;
    let obj = Arc::new(PrObject::new(Arc::new(open(cluster)?), cas, image));
    let others = others_watching(&obj).map_err(|e| err(&spec, "probing other gateways", e))?;
    // Publishing the address also creates the object (empty: the initial state), which
    // a watch needs.
    obj.pool
        .setxattr(&obj.oid, &pr_sync::address_xattr(gid), addr.as_bytes())
        .map_err(|e| err(&spec, "publishing the gateway address", e))?;
    let (tx, rx) = mpsc::channel();
    let watch = obj
        .pool
        .watch(&obj.oid, 0, tx.clone())
        .map_err(|e| err(&spec, "watching the PR object", e))?;
    let mut at_start = |cur: &PrState| {
        Ok(match pr_sync::state_at_start(cur, others) {
            Some(s) => (
                s,
                ProutEffects {
                    changed: true,
                    ..Default::default()
                },
            ),
            None => (cur.clone(), ProutEffects::default()),
        })
    };
    let c = obj
        .update(&mut at_start)
        .map_err(|e| err(&spec, "reading the PR object", e.errno()))?;
    tracing::info!(image = %spec, others_serving = others, cleared = c.effects.changed,
        registrations = c.state.registrations.len(), "shared persistent reservations");
    let shared = Arc::new(RbdSharedPr::new(obj.clone(), settings.notify_timeout));
    if c.effects.changed && !shared.publish(c.seq, &c.state, &c.effects) {
        tracing::warn!(image = %spec, "a silent gateway could not be fenced after clearing");
    }
    lu.install_shared_pr(c.seq, c.state, &ProutEffects::default(), None);
    lu.set_shared_pr(shared);
    let w = Watcher {
        obj,
        lu: Arc::downgrade(lu),
        gid,
        tx,
        watch: Some(watch),
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
    gid: u64,
    tx: Sender<WatchEvent>,
    watch: Option<Watch>,
}

impl Watcher {
    fn run(mut self, rx: Receiver<WatchEvent>) {
        loop {
            let ev = rx.recv_timeout(TICK);
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
                    let current = self.watch.as_ref().is_some_and(|w| w.cookie() == cookie);
                    if current {
                        tracing::warn!(object = %self.obj.oid, errno, "PR watch lost");
                        lu.set_pr_stale(true);
                        self.watch = None;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.watch.is_none() {
                self.rewatch(&lu);
            }
        }
    }

    /// Install a notice from another gateway (ours are installed by the PR OUT itself;
    /// an empty payload is a start-up probe).
    fn on_notify(&self, lu: &LogicalUnit, notifier: u64, payload: &[u8]) {
        if notifier == self.gid || payload.is_empty() {
            return;
        }
        match PrNotice::decode(payload) {
            Some(n) => lu.install_shared_pr(n.seq, n.state.clone(), &n.effects(), None),
            None => {
                tracing::warn!(object = %self.obj.oid, "unreadable PR notice: re-reading");
                self.reload(lu);
            }
        }
    }

    /// Re-read the committed state and install it. False if it could not be read.
    fn reload(&self, lu: &LogicalUnit) -> bool {
        match self.obj.read_state() {
            Ok((seq, st)) => {
                lu.install_shared_pr(seq, st, &ProutEffects::default(), None);
                true
            }
            Err(e) => {
                tracing::warn!(object = %self.obj.oid, error = %e, "cannot re-read PR state");
                false
            }
        }
    }

    /// Re-establish the watch, then re-read: only then is the LU ready again. A
    /// blocklisted client never gets its watch back (it needs a new connection).
    fn rewatch(&mut self, lu: &LogicalUnit) {
        match self.obj.pool.watch(&self.obj.oid, 0, self.tx.clone()) {
            Ok(w) => {
                self.watch = Some(w);
                if self.reload(lu) {
                    lu.set_pr_stale(false);
                } else {
                    self.watch = None;
                }
            }
            Err(e) => tracing::debug!(object = %self.obj.oid, errno = e, "PR re-watch failed"),
        }
    }
}
