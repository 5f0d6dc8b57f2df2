//! The PR object of one RBD LUN: read and guarded write through librados, the notify
//! that makes every other gateway install a committed state, and the fence (blocklist
//! and OSD map barrier) for gateways that stay silent. Decisions are in `pr_sync.rs`.

use super::ffi::Pool;
use super::pr_sync::{self, GuardedObject, PrNotice, UpdateError};
use crate::scsi::lun::{PrApply, Published, SharedCommit, SharedPr, SharedPrError};
use crate::scsi::pr::{PrState, ProutEffects};
use std::io;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

/// How long a fenced gateway stays blocklisted: far longer than any restart, so its
/// old connection can never write again (a restarted gateway connects afresh).
const BLOCKLIST_SECS: u32 = 3600;

/// One LUN's PR object in its image's pool.
pub struct PrObject {
    /// Watch, notify, acks and xattrs.
    pub(super) pool: Arc<Pool>,
    pub(super) oid: String,
    /// "POOL/IMAGE", for messages and metrics.
    pub(super) spec: String,
    /// The guarded read and write only, under the lock: librados reports an op's object
    /// version per io context, and any other op on the context (an ack observing a
    /// newer version) would hand a read the wrong version and let a write overwrite a
    /// commit it never saw.
    cas: Mutex<Pool>,
}

impl std::fmt::Debug for PrObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrObject").field("oid", &self.oid).finish()
    }
}

impl PrObject {
    /// `holdfast.pr.IMAGE` in `pool` (named `pool_name`); `cas` is a second context on
    /// the same pool.
    pub fn new(pool: Arc<Pool>, cas: Pool, pool_name: &str, image: &str) -> PrObject {
        PrObject {
            pool,
            oid: format!("holdfast.pr.{image}"),
            spec: format!("{pool_name}/{image}"),
            cas: Mutex::new(cas),
        }
    }

    /// The committed (sequence, state).
    pub fn read_state(&self) -> io::Result<(u64, PrState)> {
        match self.read().map_err(io::Error::from_raw_os_error)? {
            None => Ok((0, PrState::default())),
            Some((b, _)) => pr_sync::decode_object(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    pub fn update(&self, apply: &mut PrApply<'_>) -> Result<pr_sync::Committed, UpdateError> {
        pr_sync::update(self, apply)
    }
}

impl GuardedObject for PrObject {
    fn read(&self) -> Result<Option<(Vec<u8>, u64)>, i32> {
        let cas = self.cas.lock().unwrap_or_else(PoisonError::into_inner);
        cas.read(&self.oid, pr_sync::MAX_OBJECT)
    }

    fn write(&self, data: &[u8], expected: Option<u64>) -> Result<u64, i32> {
        let cas = self.cas.lock().unwrap_or_else(PoisonError::into_inner);
        cas.write_guarded(&self.oid, data, expected)
    }
}

/// [`SharedPr`] on a RADOS object: what an RBD LUN's PR OUT goes through.
#[derive(Debug)]
pub struct RbdSharedPr {
    /// Replaced when the gateway reconnects after being blocklisted.
    obj: RwLock<Arc<PrObject>>,
    notify_timeout: Duration,
}

impl RbdSharedPr {
    pub fn new(obj: Arc<PrObject>, notify_timeout: Duration) -> RbdSharedPr {
        RbdSharedPr {
            obj: RwLock::new(obj),
            notify_timeout,
        }
    }

    fn object(&self) -> Arc<PrObject> {
        self.obj
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Go through `obj` (on a new connection) from now on.
    pub fn replace_object(&self, obj: Arc<PrObject>) {
        *self.obj.write().unwrap_or_else(PoisonError::into_inner) = obj;
    }

    /// Have every other gateway install committed state `seq` and apply `fx`; silent
    /// ones are fenced. Everywhere: none can act on older state any more.
    pub fn publish(&self, seq: u64, state: &PrState, fx: &ProutEffects) -> Published {
        let notice = PrNotice {
            seq,
            state: state.clone(),
            uas: fx.uas.clone(),
            aborted: fx.aborted.clone(),
        };
        self.notify_and_fence(&notice.encode())
    }

    /// Probe the other gateways (an empty notice: acknowledged, nothing installed) and
    /// fence the silent ones, whose watches the OSDs then drop at once (see
    /// `stall.rs`). True: every other gateway answered or is fenced.
    pub fn fence_silent(&self) -> bool {
        self.notify_and_fence(b"") == Published::Everywhere
    }

    /// Notify the watchers and fence the silent ones. Everywhere: every other gateway
    /// installed the state or can no longer reach the image.
    fn notify_and_fence(&self, payload: &[u8]) -> Published {
        let obj = self.object();
        let ms = self.notify_timeout.as_millis().max(1) as u64;
        let failed = |errno: i32| match errno {
            libc::ESHUTDOWN => Published::FencedHere,
            _ => Published::Incomplete,
        };
        let (r, raw) = match obj.pool.notify(&obj.oid, payload, ms) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(object = %obj.oid, errno = e, "PR notify failed");
                return failed(e);
            }
        };
        if r == 0 {
            return Published::Everywhere;
        }
        let Some(reply) = pr_sync::parse_notify_reply(&raw) else {
            tracing::error!(object = %obj.oid, "PR notify: unreadable reply");
            return Published::Incomplete;
        };
        let mut fenced_all = true;
        let own_gid = obj.pool.cluster().instance_id();
        for gid in pr_sync::gateways_to_fence(&reply, own_gid) {
            if let Err(e) = fence(&obj, gid) {
                tracing::error!(object = %obj.oid, gid, error = %e,
                    "cannot fence a gateway that did not acknowledge");
                fenced_all = false;
            }
        }
        if let Err(e) = obj.pool.cluster().wait_for_latest_osdmap() {
            tracing::error!(errno = e, "waiting for the OSD map after fencing failed");
            return failed(e);
        }
        if fenced_all {
            Published::Everywhere
        } else {
            Published::Incomplete
        }
    }
}

/// Blocklist gateway `gid` by the address it published on `obj`.
fn fence(obj: &PrObject, gid: u64) -> Result<(), String> {
    let name = pr_sync::address_xattr(gid);
    let addr = match obj.pool.getxattr(&obj.oid, &name) {
        Ok(Some(a)) => String::from_utf8_lossy(&a).into_owned(),
        Ok(None) => return Err(format!("gateway client.{gid} published no address")),
        Err(e) => return Err(format!("reading {name}: errno {e}")),
    };
    obj.pool
        .cluster()
        .blocklist_add(&addr, BLOCKLIST_SECS)
        .map_err(|e| format!("blocklisting {addr}: {}", io::Error::from_raw_os_error(e)))?;
    crate::metrics::ceph::get().gateway_fenced(&obj.spec);
    tracing::warn!(gid, %addr, object = %obj.oid,
        "gateway did not acknowledge a notice on the PR object: blocklisted");
    Ok(())
}

impl SharedPr for RbdSharedPr {
    fn update(&self, apply: &mut PrApply<'_>) -> Result<SharedCommit, SharedPrError> {
        let obj = self.object();
        let c = obj.update(apply).map_err(|e| match e {
            UpdateError::Command(c) => SharedPrError::Command(c),
            UpdateError::Io(libc::ESHUTDOWN) => SharedPrError::Fenced,
            other => {
                tracing::error!(object = %obj.oid, error = %other, "PR OUT not committed");
                SharedPrError::Unavailable
            }
        })?;
        let published = match c.effects.changed {
            true => self.publish(c.seq, &c.state, &c.effects),
            false => Published::Everywhere,
        };
        Ok(SharedCommit {
            state: c.state,
            effects: c.effects,
            seq: c.seq,
            published,
        })
    }

    fn announce_reset(&self) -> Published {
        self.notify_and_fence(pr_sync::RESET_NOTICE)
    }
}
