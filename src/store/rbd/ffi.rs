//! The only unsafe code of the RBD backend: librados and librbd loaded at run time with
//! dlopen (so one holdfast binary runs, and its package installs, on machines without
//! Ceph), and thin handles over the C API. Every call returns librbd's negative errno as
//! a positive `i32` error; callers turn it into typed errors.

use bytes::BytesMut;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, OnceLock};

type Handle = *mut c_void;
type DiffCb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type WatchCb = extern "C" fn(*mut c_void, u64, u64, u64, *mut c_void, usize);
type WatchErrCb = extern "C" fn(*mut c_void, u64, c_int);
type AioCb = extern "C" fn(Handle, *mut c_void);

/// The C entry points we use, resolved once per process.
struct Api {
    rados_create2: unsafe extern "C" fn(*mut Handle, *const c_char, *const c_char, u64) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(Handle, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(Handle, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(Handle) -> c_int,
    rados_shutdown: unsafe extern "C" fn(Handle),
    rados_ioctx_create: unsafe extern "C" fn(Handle, *const c_char, *mut Handle) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(Handle),
    rbd_open: unsafe extern "C" fn(Handle, *const c_char, *mut Handle, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(Handle) -> c_int,
    rbd_get_size: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    rbd_get_stripe_unit: unsafe extern "C" fn(Handle, *mut u64) -> c_int,
    rbd_read2: unsafe extern "C" fn(Handle, u64, usize, *mut c_char, c_int) -> isize,
    rbd_write2: unsafe extern "C" fn(Handle, u64, usize, *const c_char, c_int) -> isize,
    rbd_aio_create_completion: unsafe extern "C" fn(*mut c_void, AioCb, *mut Handle) -> c_int,
    rbd_aio_read2: unsafe extern "C" fn(Handle, u64, usize, *mut c_char, Handle, c_int) -> c_int,
    rbd_aio_get_return_value: unsafe extern "C" fn(Handle) -> isize,
    rbd_aio_release: unsafe extern "C" fn(Handle),
    rbd_write_zeroes: unsafe extern "C" fn(Handle, u64, usize, c_int, c_int) -> isize,
    rbd_writesame: unsafe extern "C" fn(Handle, u64, usize, *const c_char, usize, c_int) -> isize,
    rbd_compare_and_write: unsafe extern "C" fn(
        Handle,
        u64,
        usize,
        *const c_char,
        *const c_char,
        *mut u64,
        c_int,
    ) -> isize,
    rbd_diff_iterate2:
        unsafe extern "C" fn(Handle, *const c_char, u64, u64, u8, u8, DiffCb, *mut c_void) -> c_int,
    // --- ALUA and shared identity: begin ---
    rados_cluster_fsid: unsafe extern "C" fn(Handle, *mut c_char, usize) -> c_int,
    rados_ioctx_get_id: unsafe extern "C" fn(Handle) -> i64,
    rbd_get_id: unsafe extern "C" fn(Handle, *mut c_char, usize) -> c_int,
    rbd_is_exclusive_lock_owner: unsafe extern "C" fn(Handle, *mut c_int) -> c_int,
    rbd_lock_get_owners:
        unsafe extern "C" fn(Handle, *mut c_int, *mut *mut c_char, *mut usize) -> c_int,
    rbd_lock_get_owners_cleanup: unsafe extern "C" fn(*mut *mut c_char, usize),
    // --- ALUA and shared identity: end ---
    // --- shared persistent reservations (pr_object.rs, pr_watch.rs): begin ---
    rados_read: unsafe extern "C" fn(Handle, *const c_char, *mut c_char, usize, u64) -> c_int,
    rados_get_last_version: unsafe extern "C" fn(Handle) -> u64,
    rados_create_write_op: unsafe extern "C" fn() -> Handle,
    rados_release_write_op: unsafe extern "C" fn(Handle),
    rados_write_op_assert_version: unsafe extern "C" fn(Handle, u64),
    rados_write_op_create: unsafe extern "C" fn(Handle, c_int, *const c_char),
    rados_write_op_write_full: unsafe extern "C" fn(Handle, *const c_char, usize),
    rados_write_op_operate:
        unsafe extern "C" fn(Handle, Handle, *const c_char, *mut libc::time_t, c_int) -> c_int,
    rados_getxattr:
        unsafe extern "C" fn(Handle, *const c_char, *const c_char, *mut c_char, usize) -> c_int,
    rados_setxattr:
        unsafe extern "C" fn(Handle, *const c_char, *const c_char, *const c_char, usize) -> c_int,
    rados_watch3: unsafe extern "C" fn(
        Handle,
        *const c_char,
        *mut u64,
        WatchCb,
        WatchErrCb,
        u32,
        *mut c_void,
    ) -> c_int,
    rados_unwatch2: unsafe extern "C" fn(Handle, u64) -> c_int,
    rados_watch_flush: unsafe extern "C" fn(Handle) -> c_int,
    rados_notify2: unsafe extern "C" fn(
        Handle,
        *const c_char,
        *const c_char,
        c_int,
        u64,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int,
    rados_notify_ack:
        unsafe extern "C" fn(Handle, *const c_char, u64, u64, *const c_char, c_int) -> c_int,
    rados_buffer_free: unsafe extern "C" fn(*mut c_char),
    rados_blocklist_add: unsafe extern "C" fn(Handle, *mut c_char, u32) -> c_int,
    rados_wait_for_latest_osdmap: unsafe extern "C" fn(Handle) -> c_int,
    rados_get_instance_id: unsafe extern "C" fn(Handle) -> u64,
    rados_getaddrs: unsafe extern "C" fn(Handle, *mut *mut c_char) -> c_int,
    // --- shared persistent reservations: end ---
}

/// Why librados/librbd could not be loaded (a missing library or symbol).
pub type LoadError = String;

static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a thread-local NUL-terminated string we copy at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        return "unknown dlopen error".into();
    }
    // SAFETY: non-NULL, NUL-terminated, valid until the next dl* call on this thread.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn open_lib(name: &CStr) -> Result<Handle, LoadError> {
    // SAFETY: dlopen with a NUL-terminated name; the handle is never closed (the
    // function pointers taken from it live for the whole process).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!("{}: {}", name.to_string_lossy(), dlerror_text()));
    }
    Ok(h)
}

/// Resolve `name` in `lib` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the `extern "C" fn` type matching the C declaration of `name`.
unsafe fn sym<F: Copy>(lib: Handle, name: &CStr) -> Result<F, LoadError> {
    // SAFETY: lib is a live dlopen handle and name NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "symbol {} missing: {}",
            name.to_string_lossy(),
            dlerror_text()
        ));
    }
    debug_assert_eq!(size_of::<F>(), size_of::<*mut c_void>());
    // SAFETY: the caller guarantees F is the symbol's function pointer type, which has
    // the size and representation of a data pointer on the platforms dlsym serves.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

fn load() -> Result<Api, LoadError> {
    let rados = open_lib(c"librados.so.2")?;
    let rbd = open_lib(c"librbd.so.1")?;
    // SAFETY: each type below is copied from librados.h / librbd.h (Ceph 15 and later).
    unsafe {
        Ok(Api {
            rados_create2: sym(rados, c"rados_create2")?,
            rados_conf_read_file: sym(rados, c"rados_conf_read_file")?,
            rados_conf_set: sym(rados, c"rados_conf_set")?,
            rados_connect: sym(rados, c"rados_connect")?,
            rados_shutdown: sym(rados, c"rados_shutdown")?,
            rados_ioctx_create: sym(rados, c"rados_ioctx_create")?,
            rados_ioctx_destroy: sym(rados, c"rados_ioctx_destroy")?,
            rbd_open: sym(rbd, c"rbd_open")?,
            rbd_close: sym(rbd, c"rbd_close")?,
            rbd_get_size: sym(rbd, c"rbd_get_size")?,
            rbd_get_stripe_unit: sym(rbd, c"rbd_get_stripe_unit")?,
            rbd_read2: sym(rbd, c"rbd_read2")?,
            rbd_write2: sym(rbd, c"rbd_write2")?,
            rbd_aio_create_completion: sym(rbd, c"rbd_aio_create_completion")?,
            rbd_aio_read2: sym(rbd, c"rbd_aio_read2")?,
            rbd_aio_get_return_value: sym(rbd, c"rbd_aio_get_return_value")?,
            rbd_aio_release: sym(rbd, c"rbd_aio_release")?,
            rbd_write_zeroes: sym(rbd, c"rbd_write_zeroes")?,
            rbd_writesame: sym(rbd, c"rbd_writesame")?,
            rbd_compare_and_write: sym(rbd, c"rbd_compare_and_write")?,
            rbd_diff_iterate2: sym(rbd, c"rbd_diff_iterate2")?,
            // --- ALUA and shared identity: begin ---
            rados_cluster_fsid: sym(rados, c"rados_cluster_fsid")?,
            rados_ioctx_get_id: sym(rados, c"rados_ioctx_get_id")?,
            rbd_get_id: sym(rbd, c"rbd_get_id")?,
            rbd_is_exclusive_lock_owner: sym(rbd, c"rbd_is_exclusive_lock_owner")?,
            rbd_lock_get_owners: sym(rbd, c"rbd_lock_get_owners")?,
            rbd_lock_get_owners_cleanup: sym(rbd, c"rbd_lock_get_owners_cleanup")?,
            // --- ALUA and shared identity: end ---
            // --- shared persistent reservations: begin ---
            rados_read: sym(rados, c"rados_read")?,
            rados_get_last_version: sym(rados, c"rados_get_last_version")?,
            rados_create_write_op: sym(rados, c"rados_create_write_op")?,
            rados_release_write_op: sym(rados, c"rados_release_write_op")?,
            rados_write_op_assert_version: sym(rados, c"rados_write_op_assert_version")?,
            rados_write_op_create: sym(rados, c"rados_write_op_create")?,
            rados_write_op_write_full: sym(rados, c"rados_write_op_write_full")?,
            rados_write_op_operate: sym(rados, c"rados_write_op_operate")?,
            rados_getxattr: sym(rados, c"rados_getxattr")?,
            rados_setxattr: sym(rados, c"rados_setxattr")?,
            rados_watch3: sym(rados, c"rados_watch3")?,
            rados_unwatch2: sym(rados, c"rados_unwatch2")?,
            rados_watch_flush: sym(rados, c"rados_watch_flush")?,
            rados_notify2: sym(rados, c"rados_notify2")?,
            rados_notify_ack: sym(rados, c"rados_notify_ack")?,
            rados_buffer_free: sym(rados, c"rados_buffer_free")?,
            rados_blocklist_add: sym(rados, c"rados_blocklist_add")?,
            rados_wait_for_latest_osdmap: sym(rados, c"rados_wait_for_latest_osdmap")?,
            rados_get_instance_id: sym(rados, c"rados_get_instance_id")?,
            rados_getaddrs: sym(rados, c"rados_getaddrs")?,
            // --- shared persistent reservations: end ---
        })
    }
}

fn api() -> Result<&'static Api, LoadError> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether librados and librbd can be loaded on this machine (Err: why not).
pub fn available() -> Result<(), LoadError> {
    api().map(|_| ())
}

fn cstr(s: &str) -> Result<CString, i32> {
    CString::new(s).map_err(|_| libc::EINVAL)
}

fn check(r: c_int) -> Result<(), i32> {
    if r < 0 {
        Err(-r)
    } else {
        Ok(())
    }
}

fn check_len(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(i32::try_from(-r).unwrap_or(libc::EIO))
    } else {
        Ok(r as usize)
    }
}

/// Where an asynchronous read's data (or librbd's errno) goes.
pub type AioReadDone = Box<dyn FnOnce(Result<BytesMut, i32>) + Send>;

/// An asynchronous read in flight: its buffer, and the image kept open until it ends.
struct AioRead {
    buf: BytesMut,
    len: usize,
    image: Arc<Image>,
    done: AioReadDone,
}

extern "C" fn aio_read_done(c: Handle, arg: *mut c_void) {
    // SAFETY: arg is the AioRead that Image::aio_read leaked for this completion; librbd
    // calls this once per completion, so it is taken back exactly once.
    let read = unsafe { Box::from_raw(arg.cast::<AioRead>()) };
    let AioRead {
        mut buf,
        len,
        image,
        done,
    } = *read;
    // SAFETY: c is this callback's completion, complete; released once, here.
    let r = unsafe { (image.api.rbd_aio_get_return_value)(c) };
    // SAFETY: as above; nothing uses c after this.
    unsafe { (image.api.rbd_aio_release)(c) };
    let result = match check_len(r) {
        Ok(n) if n == len => {
            // SAFETY: librbd wrote all `len` bytes of the buffer's capacity (n == len).
            unsafe { buf.set_len(len) };
            Ok(buf)
        }
        // Past the image's end (it shrank under us): never serve uninitialised bytes.
        Ok(_) => Err(libc::EIO),
        Err(e) => Err(e),
    };
    done(result);
    release_image(image);
}

/// Drop an image handle on a librbd thread. rbd_close waits for librbd's own threads,
/// so the last handle (the image was swapped or its LUN removed meanwhile) closes on a
/// thread of its own instead.
fn release_image(image: Arc<Image>) {
    if let Some(last) = Arc::into_inner(image) {
        std::thread::spawn(move || drop(last));
    }
}

/// A connected cluster handle (`rados_t`).
pub struct Cluster {
    api: &'static Api,
    h: Handle,
}

// SAFETY: librados cluster handles are thread-safe (the C API is used from many threads
// by QEMU and tcmu-runner); we only hand out &self methods that call into librados.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Create a handle for `client` ("client.NAME"), read `conf`, apply `settings`
    /// (key, value), then connect. Err: (step, errno).
    pub fn connect(
        conf: &str,
        client: &str,
        settings: &[(&str, String)],
    ) -> Result<Cluster, (String, i32)> {
        let api = api().map_err(|e| (e, libc::ENOSYS))?;
        let name = cstr(client).map_err(|e| ("client name".to_string(), e))?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: h is an out-pointer; cluster name "ceph" and the client name are NUL-terminated.
        check(unsafe { (api.rados_create2)(&mut h, c"ceph".as_ptr(), name.as_ptr(), 0) })
            .map_err(|e| ("rados_create2".to_string(), e))?;
        let cluster = Cluster { api, h };
        let path = cstr(conf).map_err(|e| ("conf path".to_string(), e))?;
        // SAFETY: live handle, NUL-terminated path.
        check(unsafe { (api.rados_conf_read_file)(cluster.h, path.as_ptr()) })
            .map_err(|e| (format!("reading {conf}"), e))?;
        for (k, v) in settings {
            let (ck, cv) = (cstr(k), cstr(v));
            let (Ok(ck), Ok(cv)) = (ck, cv) else {
                return Err((format!("setting {k}"), libc::EINVAL));
            };
            // SAFETY: live handle, NUL-terminated key and value.
            check(unsafe { (api.rados_conf_set)(cluster.h, ck.as_ptr(), cv.as_ptr()) })
                .map_err(|e| (format!("setting {k} = {v}"), e))?;
        }
        // SAFETY: live, configured, not yet connected handle.
        check(unsafe { (api.rados_connect)(cluster.h) })
            .map_err(|e| ("connecting".to_string(), e))?;
        Ok(cluster)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every IoCtx/Image holds an Arc<Cluster>, so none outlives this handle.
        unsafe { (self.api.rados_shutdown)(self.h) }
    }
}

/// An open image (`rbd_image_t`) with the pool context it was opened through.
pub struct Image {
    api: &'static Api,
    ioctx: Handle,
    h: Handle,
    /// Keeps the cluster connected while the image is open.
    _cluster: std::sync::Arc<Cluster>,
}

// SAFETY: librbd image handles may be used from several threads at once (librbd
// serialises internally); close happens only in Drop, with exclusive access.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Open `image` in `pool`. Err: (step, errno).
    pub fn open(
        cluster: std::sync::Arc<Cluster>,
        pool: &str,
        image: &str,
    ) -> Result<Image, (&'static str, i32)> {
        let api = cluster.api;
        let (p, i) = (cstr(pool), cstr(image));
        let (Ok(p), Ok(i)) = (p, i) else {
            return Err(("name", libc::EINVAL));
        };
        let mut ioctx: Handle = std::ptr::null_mut();
        // SAFETY: connected cluster, NUL-terminated pool name, out-pointer.
        check(unsafe { (api.rados_ioctx_create)(cluster.h, p.as_ptr(), &mut ioctx) })
            .map_err(|e| ("opening the pool", e))?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated image name, out-pointer, no snapshot.
        let r = unsafe { (api.rbd_open)(ioctx, i.as_ptr(), &mut h, std::ptr::null()) };
        if r < 0 {
            // SAFETY: the ioctx was created above and nothing else refers to it.
            unsafe { (api.rados_ioctx_destroy)(ioctx) };
            return Err(("opening the image", -r));
        }
        Ok(Image {
            api,
            ioctx,
            h,
            _cluster: cluster,
        })
    }

    pub fn size(&self) -> Result<u64, i32> {
        let mut s = 0u64;
        // SAFETY: open image, out-pointer to a local.
        check(unsafe { (self.api.rbd_get_size)(self.h, &mut s) })?;
        Ok(s)
    }

    pub fn stripe_unit(&self) -> Result<u64, i32> {
        let mut s = 0u64;
        // SAFETY: open image, out-pointer to a local.
        check(unsafe { (self.api.rbd_get_stripe_unit)(self.h, &mut s) })?;
        Ok(s)
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<usize, i32> {
        // SAFETY: buf is valid for buf.len() writable bytes for the whole (synchronous) call.
        check_len(unsafe {
            (self.api.rbd_read2)(self.h, offset, buf.len(), buf.as_mut_ptr().cast(), 0)
        })
    }

    /// Start reading `len` (> 0) bytes at `offset`; `done` gets them, or librbd's errno,
    /// on librbd's completion thread. The buffer is never zeroed: librbd fills all of it
    /// (holes read as zeros) or the read fails.
    pub fn aio_read(self: &Arc<Self>, len: usize, offset: u64, done: AioReadDone) {
        let api = self.api;
        let mut read = Box::new(AioRead {
            buf: BytesMut::with_capacity(len),
            len,
            image: self.clone(),
            done,
        });
        let dst = read.buf.spare_capacity_mut().as_mut_ptr();
        let arg = Box::into_raw(read);
        let mut c: Handle = std::ptr::null_mut();
        // SAFETY: arg stays valid until aio_read_done takes it back (exactly once: librbd
        // calls the callback once per completion); c is an out-pointer.
        let r = unsafe { (api.rbd_aio_create_completion)(arg.cast(), aio_read_done, &mut c) };
        if r < 0 {
            // SAFETY: no completion exists, so no callback will take arg: reclaim it here.
            let read = unsafe { Box::from_raw(arg) };
            return (read.done)(Err(-r));
        }
        // SAFETY: open image; dst points to the buffer's `len` bytes of capacity, owned by
        // the AioRead that lives until the callback; c is the completion made above.
        let r = unsafe { (api.rbd_aio_read2)(self.h, offset, len, dst.cast(), c, 0) };
        if r < 0 {
            // librbd refused the request before queueing it: no callback will come.
            // SAFETY: c was created above and never handed on; arg as above.
            unsafe { (api.rbd_aio_release)(c) };
            // SAFETY: as above.
            let read = unsafe { Box::from_raw(arg) };
            (read.done)(Err(-r));
        }
    }

    /// Returns once every replica has committed the data (the gateway runs with librbd's
    /// cache off), so an acknowledged write is durable without a flush.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<usize, i32> {
        // SAFETY: buf is valid for buf.len() bytes for the whole (synchronous) call.
        check_len(unsafe {
            (self.api.rbd_write2)(self.h, offset, buf.len(), buf.as_ptr().cast(), 0)
        })
    }

    /// Zero `[offset, offset+len)`, deallocating whole objects.
    pub fn write_zeroes(&self, offset: u64, len: usize) -> Result<usize, i32> {
        // SAFETY: open image; no buffers involved.
        check_len(unsafe { (self.api.rbd_write_zeroes)(self.h, offset, len, 0, 0) })
    }

    /// Write `pattern` repeatedly over `[offset, offset+len)` (len a multiple of it).
    pub fn write_same(&self, offset: u64, len: usize, pattern: &[u8]) -> Result<usize, i32> {
        // SAFETY: pattern is valid for pattern.len() bytes for the whole call.
        check_len(unsafe {
            (self.api.rbd_writesame)(
                self.h,
                offset,
                len,
                pattern.as_ptr().cast(),
                pattern.len(),
                0,
            )
        })
    }

    /// Atomically compare `verify` with the image at `offset` and write `new` on a
    /// match. Err(EILSEQ) with the reported mismatch offset on a miscompare.
    pub fn compare_and_write(
        &self,
        verify: &[u8],
        new: &[u8],
        offset: u64,
    ) -> Result<(), (i32, u64)> {
        if verify.len() != new.len() {
            return Err((libc::EINVAL, 0));
        }
        let mut mismatch = 0u64;
        // SAFETY: both buffers are valid for len bytes for the whole call; out-pointer.
        let r = unsafe {
            (self.api.rbd_compare_and_write)(
                self.h,
                offset,
                new.len(),
                verify.as_ptr().cast(),
                new.as_ptr().cast(),
                &mut mismatch,
                0,
            )
        };
        check_len(r).map(|_| ()).map_err(|e| (e, mismatch))
    }

    /// Allocated extents (offset, len) intersecting `[offset, offset+len)`, in order,
    /// at most `limit` of them (the walk stops there).
    pub fn allocated_extents(
        &self,
        offset: u64,
        len: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, i32> {
        struct Acc {
            v: Vec<(u64, u64)>,
            limit: usize,
        }
        extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: arg is the &mut Acc passed below, alive for the synchronous walk and
            // touched by nothing else meanwhile.
            let acc = unsafe { &mut *arg.cast::<Acc>() };
            if exists != 0 {
                acc.v.push((off, len as u64));
            }
            // A negative return stops the walk early.
            if acc.v.len() >= acc.limit {
                -libc::ECANCELED
            } else {
                0
            }
        }
        let mut acc = Acc {
            v: Vec::new(),
            limit,
        };
        // SAFETY: open image; no snapshot (NULL: from the beginning of time); the callback
        // gets &mut acc, which outlives the synchronous call.
        let r = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.h,
                std::ptr::null(),
                offset,
                len,
                1,
                0,
                cb,
                (&mut acc as *mut Acc).cast(),
            )
        };
        if r < 0 && r != -libc::ECANCELED {
            return Err(-r);
        }
        Ok(acc.v)
    }
}

// --- ALUA and shared identity: begin ---

/// Where an image's exclusive lock is, as librbd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOwner {
    /// The image has no exclusive-lock feature: every client writes freely.
    NoLock,
    Nobody,
    This,
    Other,
}

/// Copy a NUL-terminated string out of `buf` (all of it if it has no NUL).
fn c_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Image {
    /// What names the image for good: (cluster fsid, pool id, image id). The image id
    /// survives renames; pool ids are never reused within a cluster.
    pub fn identity_key(&self) -> Result<(String, i64, String), i32> {
        let mut fsid = [0u8; 64];
        // SAFETY: connected cluster; buf is valid for its whole length (librbd writes
        // at most len bytes, NUL included).
        let r = unsafe {
            (self.api.rados_cluster_fsid)(self._cluster.h, fsid.as_mut_ptr().cast(), fsid.len())
        };
        check(r)?;
        // SAFETY: live ioctx; returns the pool id, no pointers involved.
        let pool = unsafe { (self.api.rados_ioctx_get_id)(self.ioctx) };
        let mut id = [0u8; 128];
        // SAFETY: open image; buf valid for its whole length (-ERANGE if too short).
        check(unsafe { (self.api.rbd_get_id)(self.h, id.as_mut_ptr().cast(), id.len()) })?;
        Ok((c_text(&fsid), pool, c_text(&id)))
    }

    /// Who holds the image's exclusive lock (asks the cluster unless it is us).
    pub fn lock_owner(&self) -> Result<LockOwner, i32> {
        let mut mine: c_int = 0;
        // SAFETY: open image, out-pointer to a local.
        check(unsafe { (self.api.rbd_is_exclusive_lock_owner)(self.h, &mut mine) })?;
        if mine != 0 {
            return Ok(LockOwner::This);
        }
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 4] = [std::ptr::null_mut(); 4];
        let mut n = owners.len();
        // SAFETY: open image; owners has room for n pointers, which librbd fills with
        // strdup'ed strings and counts in n (on success only).
        let r = unsafe {
            (self.api.rbd_lock_get_owners)(self.h, &mut mode, owners.as_mut_ptr(), &mut n)
        };
        match r {
            0 => {
                // SAFETY: the n strings librbd allocated above, freed once.
                unsafe { (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n) };
                Ok(LockOwner::Other)
            }
            r if r == -libc::ENOENT => Ok(LockOwner::Nobody),
            r if r == -libc::EINVAL => Ok(LockOwner::NoLock),
            r => Err(-r),
        }
    }
}

// --- ALUA and shared identity: end ---

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: we own both handles; no call on them can be running (Drop has &mut self).
        unsafe {
            (self.api.rbd_close)(self.h);
            (self.api.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

// --- shared persistent reservations: begin ---

impl Cluster {
    /// This client's global id (the `notifier_id` of its notifies, `client.GID`).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle.
        unsafe { (self.api.rados_get_instance_id)(self.h) }
    }

    /// This client's address as the OSDs see it (what `osd blocklist add` takes).
    pub fn address(&self) -> Result<String, i32> {
        let mut p: *mut c_char = std::ptr::null_mut();
        // SAFETY: connected handle; out-pointer to a string librados strdup()s.
        check(unsafe { (self.api.rados_getaddrs)(self.h, &mut p) })?;
        if p.is_null() {
            return Err(libc::EIO);
        }
        // SAFETY: non-NULL NUL-terminated string from strdup, copied, then freed once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: allocated with malloc by librados (strdup); freed exactly once here.
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    /// Blocklist `addr` for `expire_secs` (the mon commits it before this returns).
    pub fn blocklist_add(&self, addr: &str, expire_secs: u32) -> Result<(), i32> {
        let a = cstr(addr)?;
        // SAFETY: connected handle; librados only reads the NUL-terminated address (the
        // C prototype lacks const).
        check(unsafe { (self.api.rados_blocklist_add)(self.h, a.as_ptr().cast_mut(), expire_secs) })
    }

    /// Wait until this client has the newest OSD map (so ops sent after this
    /// return are judged under a blocklist committed before it).
    pub fn wait_for_latest_osdmap(&self) -> Result<(), i32> {
        // SAFETY: connected handle.
        check(unsafe { (self.api.rados_wait_for_latest_osdmap)(self.h) })
    }
}

/// A pool context (`rados_ioctx_t`) for plain RADOS objects.
pub struct Pool {
    api: &'static Api,
    io: Handle,
    cluster: std::sync::Arc<Cluster>,
}

// SAFETY: librados io contexts are thread-safe for the object operations used here;
// rados_get_last_version is read right after the op on the same thread, and callers
// serialise the read/version pairs they rely on (see pr_object.rs).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

/// One watch or watch-error event, delivered from librados's callback thread.
#[derive(Debug)]
pub enum WatchEvent {
    Notify {
        notify_id: u64,
        cookie: u64,
        notifier_id: u64,
        payload: Vec<u8>,
    },
    /// The watch broke (errno, e.g. ENOTCONN after a timeout, ESHUTDOWN when blocklisted).
    Error { cookie: u64, errno: i32 },
}

type EventTx = std::sync::Mutex<std::sync::mpsc::Sender<WatchEvent>>;

extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    cookie: u64,
    notifier_id: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: arg is the Box<EventTx> a Watch owns; it is freed only after unwatch2 and
    // watch_flush, so no callback runs past it.
    let tx = unsafe { &*arg.cast::<EventTx>() };
    let payload = if data.is_null() || len == 0 {
        Vec::new()
    } else {
        // SAFETY: librados passes `len` readable bytes at `data` for this call.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec()
    };
    let ev = WatchEvent::Notify {
        notify_id,
        cookie,
        notifier_id,
        payload,
    };
    let _ = tx.lock().map(|t| t.send(ev));
}

extern "C" fn on_watch_error(arg: *mut c_void, cookie: u64, err: c_int) {
    // SAFETY: as in on_notify.
    let tx = unsafe { &*arg.cast::<EventTx>() };
    let ev = WatchEvent::Error {
        cookie,
        errno: -err,
    };
    let _ = tx.lock().map(|t| t.send(ev));
}

/// A registered watch; unwatched (and its callbacks drained) on drop.
pub struct Watch {
    pool: std::sync::Arc<Pool>,
    cookie: u64,
    sink: *mut EventTx,
}

// SAFETY: the sink is only read (through its Mutex) by callbacks and freed in Drop after
// librados has stopped calling them.
unsafe impl Send for Watch {}
// SAFETY: as above; &Watch gives no access to the sink.
unsafe impl Sync for Watch {}

impl Watch {
    pub fn cookie(&self) -> u64 {
        self.cookie
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let api = self.pool.api;
        // SAFETY: live ioctx and our cookie; then watch_flush waits for every callback
        // in flight, after which the sink is no longer referenced and is freed once.
        unsafe {
            (api.rados_unwatch2)(self.pool.io, self.cookie);
            (api.rados_watch_flush)(self.pool.cluster.h);
            drop(Box::from_raw(self.sink));
        }
    }
}

/// Version of the object last read or written through this context (racy if another
/// thread uses the same context in between: callers hold a lock).
fn last_version(api: &Api, io: Handle) -> u64 {
    // SAFETY: live ioctx.
    unsafe { (api.rados_get_last_version)(io) }
}

impl Pool {
    pub fn open(cluster: std::sync::Arc<Cluster>, pool: &str) -> Result<Pool, i32> {
        let api = cluster.api;
        let p = cstr(pool)?;
        let mut io: Handle = std::ptr::null_mut();
        // SAFETY: connected cluster, NUL-terminated pool name, out-pointer.
        check(unsafe { (api.rados_ioctx_create)(cluster.h, p.as_ptr(), &mut io) })?;
        Ok(Pool { api, io, cluster })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The connection this context belongs to, shared.
    pub fn cluster_arc(&self) -> std::sync::Arc<Cluster> {
        self.cluster.clone()
    }

    /// The whole object (at most `max` bytes) and its version; Ok(None) if absent.
    pub fn read(&self, oid: &str, max: usize) -> Result<Option<(Vec<u8>, u64)>, i32> {
        let o = cstr(oid)?;
        let mut buf = vec![0u8; max];
        // SAFETY: live ioctx; buf is valid for max writable bytes for the synchronous call.
        let r =
            unsafe { (self.api.rados_read)(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), max, 0) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check(r)?;
        buf.truncate(r as usize);
        Ok(Some((buf, last_version(self.api, self.io))))
    }

    /// Replace the object with `data` if its version is still `expected` (None: only
    /// if it does not exist). Err(ERANGE/EOVERFLOW/EEXIST): someone wrote in between.
    /// Ok: the new version.
    pub fn write_guarded(&self, oid: &str, data: &[u8], expected: Option<u64>) -> Result<u64, i32> {
        let o = cstr(oid)?;
        // SAFETY: creates an op we release below on every path.
        let op = unsafe { (self.api.rados_create_write_op)() };
        if op.is_null() {
            return Err(libc::ENOMEM);
        }
        // SAFETY: live op; data outlives operate (the op copies it when executed).
        let r = unsafe {
            match expected {
                Some(v) => (self.api.rados_write_op_assert_version)(op, v),
                None => (self.api.rados_write_op_create)(op, 1, std::ptr::null()),
            }
            (self.api.rados_write_op_write_full)(op, data.as_ptr().cast(), data.len());
            let r =
                (self.api.rados_write_op_operate)(op, self.io, o.as_ptr(), std::ptr::null_mut(), 0);
            (self.api.rados_release_write_op)(op);
            r
        };
        check(r)?;
        Ok(last_version(self.api, self.io))
    }

    /// An xattr's value; Ok(None) if the object or attribute is absent.
    pub fn getxattr(&self, oid: &str, name: &str) -> Result<Option<Vec<u8>>, i32> {
        let (o, n) = (cstr(oid)?, cstr(name)?);
        let mut buf = vec![0u8; 512];
        // SAFETY: live ioctx; buf valid for its length for the synchronous call.
        let r = unsafe {
            (self.api.rados_getxattr)(
                self.io,
                o.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r == -libc::ENOENT || r == -libc::ENODATA {
            return Ok(None);
        }
        check(r)?;
        buf.truncate(r as usize);
        Ok(Some(buf))
    }

    pub fn setxattr(&self, oid: &str, name: &str, value: &[u8]) -> Result<(), i32> {
        let (o, n) = (cstr(oid)?, cstr(name)?);
        // SAFETY: live ioctx; value valid for its length for the synchronous call.
        check(unsafe {
            (self.api.rados_setxattr)(
                self.io,
                o.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
            )
        })
    }

    /// Watch `oid`; events go to `tx` until the returned [`Watch`] is dropped.
    pub fn watch(
        self: &std::sync::Arc<Pool>,
        oid: &str,
        timeout_secs: u32,
        tx: std::sync::mpsc::Sender<WatchEvent>,
    ) -> Result<Watch, i32> {
        let o = cstr(oid)?;
        let sink = Box::into_raw(Box::new(std::sync::Mutex::new(tx)));
        let mut cookie = 0u64;
        // SAFETY: live ioctx; the callbacks get `sink`, which lives until the Watch's Drop
        // (or is freed right here if registering fails, when no callback can come).
        let r = unsafe {
            (self.api.rados_watch3)(
                self.io,
                o.as_ptr(),
                &mut cookie,
                on_notify,
                on_watch_error,
                timeout_secs,
                sink.cast(),
            )
        };
        if r < 0 {
            // SAFETY: registration failed: librados holds no reference to sink.
            drop(unsafe { Box::from_raw(sink) });
            return Err(-r);
        }
        Ok(Watch {
            pool: self.clone(),
            cookie,
            sink,
        })
    }

    /// Notify the watchers of `oid` and wait up to `timeout_ms` for their acks. Returns
    /// librados's result (0, or ETIMEDOUT when some did not ack) and the raw reply.
    pub fn notify(
        &self,
        oid: &str,
        payload: &[u8],
        timeout_ms: u64,
    ) -> Result<(i32, Vec<u8>), i32> {
        let o = cstr(oid)?;
        let len = c_int::try_from(payload.len()).map_err(|_| libc::EINVAL)?;
        let (mut reply, mut reply_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: live ioctx; payload valid for len bytes; out-pointers to locals.
        let r = unsafe {
            (self.api.rados_notify2)(
                self.io,
                o.as_ptr(),
                payload.as_ptr().cast(),
                len,
                timeout_ms,
                &mut reply,
                &mut reply_len,
            )
        };
        let bytes = if reply.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados returned reply_len bytes at reply; copied, then freed once.
            let v = unsafe { std::slice::from_raw_parts(reply.cast::<u8>(), reply_len) }.to_vec();
            // SAFETY: a buffer librados allocated for us; freed exactly once.
            unsafe { (self.api.rados_buffer_free)(reply) };
            v
        };
        if r < 0 && r != -libc::ETIMEDOUT {
            return Err(-r);
        }
        Ok((-r, bytes))
    }

    pub fn notify_ack(&self, oid: &str, notify_id: u64, cookie: u64) -> Result<(), i32> {
        let o = cstr(oid)?;
        // SAFETY: live ioctx; empty ack payload.
        check(unsafe {
            (self.api.rados_notify_ack)(self.io, o.as_ptr(), notify_id, cookie, std::ptr::null(), 0)
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: every Watch holds an Arc<Pool>, so none is live; we own the context.
        unsafe { (self.api.rados_ioctx_destroy)(self.io) }
    }
}
// --- shared persistent reservations: end ---
