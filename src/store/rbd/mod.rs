//! A LUN backed by a Ceph RBD image, through librbd loaded at run time (see [`ffi`]).
//!
//! Every call blocks on the network, so none runs inline on the runtime thread: under
//! [`backend::without_blocking`] each one refuses and the transport reruns the command
//! on its blocking pool.

mod ffi;
mod pr_object;
mod pr_sync;
mod pr_watch;
mod recovery;
mod stall;

pub use pr_watch::share_reservations;

use super::identity::{self, LunIdentity};
use crate::scsi::backend::{self, BlockBackend, ExclusiveLock, ReadDone};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

/// How to reach the cluster (the target config's `[ceph]` table).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CephSettings {
    pub conf: PathBuf,
    /// Full cephx name, e.g. "client.holdfast".
    pub client: String,
    /// Keyring file; absent: what `conf` says.
    pub keyring: Option<PathBuf>,
    /// Limit on connecting and on each RADOS operation: a cluster that stops answering
    /// fails commands after this long instead of hanging them forever.
    pub timeout: Duration,
    /// How long a PR OUT waits for the other gateways' acknowledgements.
    pub notify_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error(
        "the Ceph client libraries cannot be loaded ({0}); install librados2 and librbd1 \
         to serve RBD images"
    )]
    Unavailable(String),
    #[error("cannot connect to Ceph as {client} with {conf}: {step}: {source}")]
    Connect {
        conf: String,
        client: String,
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("rbd image {spec}: {step}: {source}")]
    Open {
        spec: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("rbd image {spec} does not exist (create it with `rbd create --size SIZE {spec}`)")]
    NoImage { spec: String },
    #[error("pool {pool} (of rbd image {spec}) does not exist")]
    NoPool { pool: String, spec: String },
    #[error("rbd image {spec}: {reason}")]
    Identity { spec: String, reason: String },
    #[error("rbd image {spec} holds {actual} bytes, less than the configured {configured}")]
    TooSmall {
        spec: String,
        actual: u64,
        configured: u64,
    },
}

/// One connection per distinct [`CephSettings`], shared by the LUNs using it.
static CLUSTERS: Mutex<Vec<(CephSettings, Weak<ffi::Cluster>)>> = Mutex::new(Vec::new());

fn connect(s: &CephSettings) -> Result<Arc<ffi::Cluster>, RbdError> {
    connect_replacing(s, None)
}

/// The shared connection for `s`, made anew if the cached one is `dead` (a blocklisted
/// client instance can never be used again; LUNs still holding it reconnect in turn
/// and share the replacement).
fn connect_replacing(
    s: &CephSettings,
    dead: Option<&Arc<ffi::Cluster>>,
) -> Result<Arc<ffi::Cluster>, RbdError> {
    ffi::available().map_err(RbdError::Unavailable)?;
    let mut cache = CLUSTERS.lock().unwrap_or_else(PoisonError::into_inner);
    cache.retain(|(_, w)| w.strong_count() > 0);
    if let Some(c) = cache
        .iter()
        .find(|(k, _)| k == s)
        .and_then(|(_, w)| w.upgrade())
        .filter(|c| !dead.is_some_and(|d| Arc::ptr_eq(c, d)))
    {
        return Ok(c);
    }
    cache.retain(|(k, _)| k != s);
    let secs = s.timeout.as_secs().max(1).to_string();
    let mut opts = vec![
        // No librbd cache: a write is acknowledged only once it is in RADOS, so a read
        // through another gateway (another path to the same LU) sees it; a gateway-local
        // writeback or read cache would make the paths disagree.
        ("rbd_cache", "false".to_string()),
        ("client_mount_timeout", secs.clone()),
        ("rados_osd_op_timeout", secs.clone()),
        ("rados_mon_op_timeout", secs),
    ];
    if let Some(k) = &s.keyring {
        opts.push(("keyring", k.display().to_string()));
    }
    let conf = s.conf.display().to_string();
    let c =
        ffi::Cluster::connect(&conf, &s.client, &opts).map_err(|(step, e)| RbdError::Connect {
            conf: conf.clone(),
            client: s.client.clone(),
            step,
            source: io::Error::from_raw_os_error(e),
        })?;
    let c = Arc::new(c);
    cache.push((s.clone(), Arc::downgrade(&c)));
    Ok(c)
}

/// A LUN's RBD image.
pub struct RbdBackend {
    /// Swapped for a handle on a new connection when this client was blocklisted; each
    /// call clones the Arc under an uncontended read lock.
    image: RwLock<Arc<ffi::Image>>,
    pool: String,
    name: String,
    /// "POOL/IMAGE", for messages (shared with read callbacks).
    spec: Arc<str>,
    size: std::sync::atomic::AtomicU64,
    /// RBD's atomic compare-and-write works within one stripe unit (object).
    stripe_unit: u64,
    read_only: bool,
    /// Calls in flight and completed: the PR watcher tells a stall from them.
    progress: Arc<stall::IoProgress>,
}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("spec", &self.spec)
            .finish()
    }
}

/// Largest single librbd call for zeroing (its results are ssize_t byte counts).
const ZERO_CHUNK: u64 = 1 << 30;

impl RbdBackend {
    /// Open `pool/image` and serve its first `size` bytes (the image must be that large).
    pub fn open(
        settings: &CephSettings,
        pool: &str,
        image: &str,
        size: u64,
        read_only: bool,
    ) -> Result<RbdBackend, RbdError> {
        let spec = format!("{pool}/{image}");
        let cluster = connect(settings)?;
        let img = ffi::Image::open(cluster, pool, image).map_err(|(step, e)| match e {
            libc::ENOENT if step == "opening the pool" => RbdError::NoPool {
                pool: pool.into(),
                spec: spec.clone(),
            },
            libc::ENOENT => RbdError::NoImage { spec: spec.clone() },
            _ => RbdError::Open {
                spec: spec.clone(),
                step,
                source: io::Error::from_raw_os_error(e),
            },
        })?;
        let open_err = |step, e| RbdError::Open {
            spec: spec.clone(),
            step,
            source: io::Error::from_raw_os_error(e),
        };
        let actual = img.size().map_err(|e| open_err("reading its size", e))?;
        if actual < size {
            return Err(RbdError::TooSmall {
                spec,
                actual,
                configured: size,
            });
        }
        let stripe_unit = img
            .stripe_unit()
            .map_err(|e| open_err("reading its layout", e))?;
        Ok(RbdBackend {
            image: RwLock::new(Arc::new(img)),
            pool: pool.into(),
            name: image.into(),
            spec: spec.into(),
            size: size.into(),
            stripe_unit: stripe_unit.max(1),
            read_only,
            progress: Arc::default(),
        })
    }

    /// The LUN's NAA and serial, derived from the cluster fsid, the pool id and the
    /// image's id (see [`identity::derive`]): every gateway serving this image reports the
    /// same disk, with no file and no coordination. A configured serial overrides the
    /// derived one (set it on every gateway alike).
    pub fn identity(&self, configured_serial: Option<&str>) -> Result<LunIdentity, RbdError> {
        let (fsid, pool, id) = self.image().identity_key().map_err(|e| RbdError::Open {
            spec: self.spec.to_string(),
            step: "reading its ids",
            source: io::Error::from_raw_os_error(e),
        })?;
        identity::derive(&[&fsid, &pool.to_string(), &id], configured_serial).map_err(|e| {
            RbdError::Identity {
                spec: self.spec.to_string(),
                reason: e.to_string(),
            }
        })
    }

    fn image(&self) -> Arc<ffi::Image> {
        self.image
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reopen the image through `cluster` (a new connection after this client was
    /// blocklisted) and serve through it from now on. Returns the old handle, for the
    /// caller to drop where a slow close cannot hold up commands.
    fn reopen(&self, cluster: Arc<ffi::Cluster>) -> Result<Arc<ffi::Image>, RbdError> {
        let img = ffi::Image::open(cluster, &self.pool, &self.name).map_err(|(step, e)| {
            RbdError::Open {
                spec: self.spec.to_string(),
                step,
                source: io::Error::from_raw_os_error(e),
            }
        })?;
        let mut cur = self.image.write().unwrap_or_else(PoisonError::into_inner);
        Ok(std::mem::replace(&mut *cur, Arc::new(img)))
    }

    /// "POOL/IMAGE".
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Serve `size` bytes (a live reload): the image must already be that large (grow
    /// it with `rbd resize` first). A smaller `size` changes nothing.
    pub fn grow(&self, size: u64) -> Result<(), RbdError> {
        use std::sync::atomic::Ordering;
        if size <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let actual = self.image().size().map_err(|e| RbdError::Open {
            spec: self.spec.to_string(),
            step: "reading its size",
            source: io::Error::from_raw_os_error(e),
        })?;
        if actual < size {
            return Err(RbdError::TooSmall {
                spec: self.spec.to_string(),
                actual,
                configured: size,
            });
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// librbd's errno as an I/O error, logged here with the image and the call (the
    /// device server logs only the error). A handle that can never work again (image
    /// gone) becomes ENODEV, which takes the LU offline (NOT READY); a blocklisted
    /// client stays ESHUTDOWN, which the LU answers NOT READY until the PR watcher has
    /// reconnected; a timeout or other failure stays a medium error until the device
    /// server's limit.
    fn err(&self, what: &str, errno: i32) -> io::Error {
        call_failed(&self.spec, what, errno)
    }

    /// Checks before a call; the guard counts it in flight until dropped.
    fn start(&self, write: bool, offset: u64, len: u64) -> io::Result<stall::InFlight> {
        if backend::must_not_block() {
            return Err(backend::refuse_to_block());
        }
        if write && self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only LUN",
            ));
        }
        super::check_range(self.size(), offset, len)?;
        Ok(self.progress.begin())
    }
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _io = self.start(false, offset, buf.len() as u64)?;
        let n = self
            .image()
            .read(buf, offset)
            .map_err(|e| self.err("read", e))?;
        if n < buf.len() {
            // Past the image's end (it shrank under us): never serve stale buffer bytes.
            return Err(self.err("short read", libc::EIO));
        }
        Ok(())
    }

    fn reads_async(&self) -> bool {
        true
    }

    /// librbd's aio: the read takes no thread of ours while the OSDs answer.
    fn start_read(&self, len: usize, offset: u64, done: ReadDone) {
        if let Err(e) = super::check_range(self.size(), offset, len as u64) {
            return done(Err(e));
        }
        let io = self.progress.begin();
        let spec = self.spec.clone();
        self.image().aio_read(
            len,
            offset,
            Box::new(move |read| {
                done(read.map_err(|e| call_failed(&spec, "aio_read", e)));
                drop(io);
            }),
        );
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _io = self.start(true, offset, buf.len() as u64)?;
        let n = self
            .image()
            .write(buf, offset)
            .map_err(|e| self.err("write", e))?;
        if n < buf.len() {
            return Err(self.err("short write", libc::EIO));
        }
        Ok(())
    }

    /// Nothing to do: with librbd's cache off (see `connect`) a write returns only once
    /// every replica has committed it, so all acknowledged writes are already durable.
    /// Calling `rbd_flush` anyway would take the image's exclusive lock (librbd treats
    /// a user flush like a write), and a SYNCHRONIZE CACHE through a non-optimized path
    /// would move the lock and the optimized state with it.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _io = self.start(true, offset, len)?;
        // write_zeroes, not discard: librbd skips the unaligned parts of a discard, but
        // LBPRZ promises zeros; write_zeroes removes whole objects and zeroes the rest.
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK);
            self.image()
                .write_zeroes(at, n as usize)
                .map_err(|e| self.err("write_zeroes", e))?;
            at += n;
        }
        Ok(())
    }

    fn allocation_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        let _io = self.start(false, offset, 1)?;
        // Look at most one window ahead: a long hole is reported in window-sized runs
        // (GET LBA STATUS merges them).
        let window = (self.size() - offset).min(ZERO_CHUNK);
        let ext = self
            .image()
            .allocated_extents(offset, window, 1)
            .map_err(|e| self.err("diff_iterate", e))?;
        Ok(match ext.first() {
            Some(&(start, len)) if start <= offset => {
                (true, (start + len).saturating_sub(offset).clamp(1, window))
            }
            Some(&(start, _)) => (false, start - offset),
            None => (false, window),
        })
    }

    fn compare_and_write(&self, verify: &[u8], new: &[u8], offset: u64) -> io::Result<Option<u64>> {
        let _io = self.start(true, offset, new.len() as u64)?;
        let len = new.len() as u64;
        if len == 0 {
            return Ok(None);
        }
        if offset / self.stripe_unit != (offset + len - 1) / self.stripe_unit {
            // librbd refuses a compare-and-write across objects; the device server then
            // compares and writes under its range lock.
            return Err(io::ErrorKind::Unsupported.into());
        }
        match self.image().compare_and_write(verify, new, offset) {
            Ok(()) => Ok(None),
            // Ceph 16 reports no usable mismatch offset (always 0): find it by reading.
            // The device server holds the range lock, so through this gateway nothing
            // changed since the compare.
            Err((libc::EILSEQ, _)) => {
                let mut current = vec![0u8; verify.len()];
                self.read_at(&mut current, offset)?;
                let at = current.iter().zip(verify).position(|(a, b)| a != b);
                Ok(Some(at.unwrap_or(0) as u64))
            }
            // Ceph 16 compares only single sectors (EINVAL otherwise): the device server
            // compares and writes under its range lock instead.
            Err((libc::EINVAL, _)) => Err(io::ErrorKind::Unsupported.into()),
            Err((e, _)) => Err(self.err("compare_and_write", e)),
        }
    }

    fn exclusive_lock(&self) -> io::Result<ExclusiveLock> {
        if backend::must_not_block() {
            return Err(backend::refuse_to_block());
        }
        let owner = self
            .image()
            .lock_owner()
            .map_err(|e| self.err("lock_get_owners", e))?;
        Ok(match owner {
            ffi::LockOwner::NoLock => ExclusiveLock::NotShared,
            ffi::LockOwner::Nobody => ExclusiveLock::Unowned,
            ffi::LockOwner::This => ExclusiveLock::HeldHere,
            ffi::LockOwner::Other => ExclusiveLock::HeldElsewhere,
        })
    }

    fn write_same(&self, pattern: &[u8], offset: u64, len: u64) -> io::Result<()> {
        let _io = self.start(true, offset, len)?;
        if pattern.is_empty() || len % pattern.len() as u64 != 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let step = ZERO_CHUNK - ZERO_CHUNK % pattern.len() as u64;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(step);
            self.image()
                .write_same(at, n as usize, pattern)
                .map_err(|e| self.err("writesame", e))?;
            at += n;
        }
        Ok(())
    }
}

/// See [`RbdBackend::err`].
fn call_failed(spec: &str, what: &str, errno: i32) -> io::Error {
    let gone = matches!(errno, libc::ENOENT | libc::ENODEV);
    let code = if gone { libc::ENODEV } else { errno };
    tracing::warn!(
        image = %spec,
        call = what,
        errno,
        error = %io::Error::from_raw_os_error(errno),
        "rbd call failed"
    );
    io::Error::from_raw_os_error(code)
}

/// Whether the Ceph libraries load here (for messages and tests).
pub fn libraries_available() -> Result<(), String> {
    ffi::available()
}
