//! The session: a tokio driver around the sans-IO [`InitiatorConnection`]. A reader
//! task feeds it target PDUs, a writer task sends what it polls out (and runs its timer),
//! and request methods lock it briefly to queue a request and register a oneshot waiter
//! that its completion event fulfils. The lock is never held across an await.

use super::login::{InitiatorLogin, LoginParams, LoginResult, LoginStep};
use super::scsi::{encode_lun, ScsiResult};
use super::{random_isid, InitiatorConfig, InitiatorError};
use crate::iscsi::initiator_conn::{
    self as conn, tmf, CommandRequest, Event, InitiatorConnection, Itt, RequestError, Sequence,
    SubmitError,
};
use crate::wire::text::{encode_text, parse_text};
use crate::wire::{self, DigestConfig, PduDecoder, PduWriter, RESERVED_TAG};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Largest data segment accepted during login (before MaxRecvDataSegmentLength applies).
const LOGIN_MAX_SEGMENT: u32 = 64 * 1024;
/// Bytes of PDUs gathered into one socket write.
const WRITE_BATCH: usize = 1 << 20;

type Reply<T> = oneshot::Sender<Result<T, InitiatorError>>;

/// Who waits for a request's completion: hands the event to its oneshot.
type Waiter = Box<dyn FnOnce(Event) + Send>;

/// A waiter that answers `tx` with what `pick` finds in the completion event.
fn waiter<T: Send + 'static>(
    tx: Reply<T>,
    pick: fn(Event) -> Option<Result<T, RequestError>>,
) -> Waiter {
    Box::new(move |ev| {
        let r = pick(ev).unwrap_or_else(|| Err(RequestError::ConnectionLost));
        // The requester may have gone away; nobody to tell then.
        let _ = tx.send(r.map_err(InitiatorError::from));
    })
}

/// The connection and the waiters of its requests, under one lock so a request and
/// its waiter are registered together.
struct Core {
    conn: InitiatorConnection,
    waiters: HashMap<Itt, Waiter>,
}

impl Core {
    /// Hand completion events to their waiters; true once the connection closed.
    fn dispatch(&mut self) -> bool {
        let mut closed = false;
        while let Some(ev) = self.conn.poll_event() {
            match ev.itt() {
                Some(itt) => {
                    if let Some(w) = self.waiters.remove(&itt) {
                        w(ev);
                    }
                }
                None => closed = true,
            }
        }
        if closed {
            // Every request was answered before Closed; nothing else will complete.
            self.waiters.clear();
        }
        closed
    }
}

fn command_done(ev: Event) -> Option<Result<ScsiResult, RequestError>> {
    match ev {
        Event::CommandDone { result, .. } => Some(result.map(|r| ScsiResult {
            status: r.status,
            sense: r.sense,
            data: r.data,
            residual: r.residual,
        })),
        _ => None,
    }
}

fn submit_error(e: SubmitError) -> InitiatorError {
    match e {
        SubmitError::Closed => InitiatorError::ConnectionLost,
        e => InitiatorError::InvalidRequest(e.to_string()),
    }
}

struct Shared {
    core: Mutex<Core>,
    /// Wakes the writer: PDUs to send, a new timeout, or the connection closed.
    wake: Notify,
    /// Signalled when the CmdSN window may have opened or the connection closed.
    window: Notify,
    negotiated: LoginParams,
    isid: [u8; 6],
    initiator_name: String,
    target_name: String,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the connection, then deliver its events and wake the writer.
    fn with<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let r = self.run(f);
        self.wake.notify_one();
        r
    }

    /// [`Self::with`] without waking the writer (for the writer itself: a wake-up
    /// permit it gave itself would spin it).
    fn run<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let mut core = self.core();
        let was_open = core.conn.window_open();
        let r = f(&mut core);
        let closed = core.dispatch();
        // Submitters wait only while the window is shut: wake them when it opens, not
        // on every PDU while it stays open.
        let opened = !was_open && core.conn.window_open();
        drop(core);
        if opened || closed {
            self.window.notify_waiters();
        }
        r
    }

    /// Queue a request built by `submit` and wait for its answer.
    async fn request<T: Send + 'static>(
        &self,
        submit: impl FnOnce(&mut InitiatorConnection) -> Result<Itt, SubmitError>,
        pick: fn(Event) -> Option<Result<T, RequestError>>,
    ) -> Result<T, InitiatorError> {
        let (tx, rx) = oneshot::channel();
        self.with(|c| {
            let itt = submit(&mut c.conn).map_err(submit_error)?;
            c.waiters.insert(itt, waiter(tx, pick));
            Ok::<_, InitiatorError>(())
        })?;
        rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))
    }

    /// The connection is gone from our side.
    fn close(&self) {
        self.with(|c| c.conn.handle_disconnect());
    }
}

async fn reader_task(
    shared: Arc<Shared>,
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut dec: PduDecoder,
) {
    loop {
        let r = wire::read_pdu(&mut rd, &mut buf, &mut dec).await;
        let now = Instant::now();
        let closed = shared.with(|c| {
            match r {
                Ok(p) => c.conn.handle_pdu(p, now),
                Err(wire::ReadError::Wire(e)) => c.conn.handle_wire_error(e, now),
                Err(e) => {
                    debug!(target = %shared.target_name, error = %e, "connection read ended");
                    c.conn.handle_disconnect();
                }
            }
            c.conn.is_closed()
        });
        if closed {
            break;
        }
    }
}

async fn writer_task(shared: Arc<Shared>, mut wr: OwnedWriteHalf, digests: DigestConfig) {
    let mut out = PduWriter::new(digests);
    loop {
        let (closed, deadline) = shared.run(|c| {
            c.conn.handle_timeout(Instant::now());
            while out.queued_bytes() < WRITE_BATCH {
                let Some(p) = c.conn.poll_transmit() else {
                    break;
                };
                out.queue(p);
            }
            (c.conn.is_closed(), c.conn.poll_timeout())
        });
        if out.queued_bytes() > 0 {
            if let Err(e) = out.write_to(&mut wr).await {
                warn!(target = %shared.target_name, error = %e, "write failed");
                shared.close();
                break;
            }
            // More may be queued beyond the batch bound.
            continue;
        }
        if closed {
            break;
        }
        match deadline {
            Some(t) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(t.into()) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
    let _ = wr.shutdown().await;
}

/// Owner of the session's tasks: when the last handle goes, the connection goes.
struct Inner {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.shared.close();
    }
}

/// A logged-in iSCSI session. Clone it freely: clones share the connection, and commands
/// from many tasks are pipelined within the target's CmdSN window.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("initiator", &self.shared().initiator_name)
            .field("target", &self.shared().target_name)
            .field("isid", &hex::encode(self.shared().isid))
            .finish()
    }
}

/// A submitted SCSI command; [`Task::wait`] yields its result.
#[derive(Debug)]
pub struct Task {
    itt: u32,
    cmd_sn: u32,
    lun: u64,
    rx: oneshot::Receiver<Result<ScsiResult, InitiatorError>>,
}

impl Task {
    /// Initiator Task Tag (for ABORT TASK).
    pub fn itt(&self) -> u32 {
        self.itt
    }
    pub fn cmd_sn(&self) -> u32 {
        self.cmd_sn
    }
    pub fn lun(&self) -> u64 {
        self.lun
    }
    pub async fn wait(self) -> Result<ScsiResult, InitiatorError> {
        self.rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))
    }
}

/// A TCP connection that completed its login.
struct LoggedIn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    dec: PduDecoder,
    result: LoginResult,
}

/// Connect and run the login exchange (unbounded in time: the caller bounds it).
async fn login_exchange(
    cfg: &InitiatorConfig,
    discovery: bool,
    isid: [u8; 6],
) -> Result<LoggedIn, InitiatorError> {
    let stream = TcpStream::connect(cfg.addr).await?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut dec = PduDecoder::new(LOGIN_MAX_SEGMENT);
    let mut login = InitiatorLogin::new(cfg.clone(), discovery, isid);
    let mut req = login.start();
    // Login PDUs carry no digests (RFC 7143 §13.1).
    let mut out = PduWriter::new(DigestConfig::default());
    let result = loop {
        out.send(&mut wr, req).await?;
        let resp = wire::read_pdu(&mut rd, &mut buf, &mut dec).await?;
        match login.on_response(&resp)? {
            LoginStep::Send(p) => req = p,
            LoginStep::Done(r) => break *r,
        }
    };
    Ok(LoggedIn {
        rd,
        wr,
        buf,
        dec,
        result,
    })
}

impl Session {
    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Connect and log in to a normal session.
    pub async fn login(cfg: InitiatorConfig) -> Result<Session, InitiatorError> {
        Self::establish(cfg, false).await
    }

    /// Discovery: log in to a discovery session, ask SendTargets=All, log out.
    /// Returns (target name, its addresses as "ip:port,tpgt").
    pub async fn discover(
        addr: SocketAddr,
        initiator_name: &str,
        chap: Option<(String, Vec<u8>)>,
    ) -> Result<Vec<(String, Vec<String>)>, InitiatorError> {
        let mut cfg = InitiatorConfig::new(initiator_name, "", addr);
        cfg.chap = chap;
        let s = Self::establish(cfg, true).await?;
        let pairs = s.text(&[("SendTargets".into(), "All".into())]).await?;
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "TargetName" => out.push((v, Vec::new())),
                "TargetAddress" => match out.last_mut() {
                    Some((_, addrs)) => addrs.push(v),
                    None => warn!(address = %v, "TargetAddress before any TargetName: ignored"),
                },
                _ => debug!(key = %k, "unexpected key in SendTargets response"),
            }
        }
        s.logout().await?;
        Ok(out)
    }

    async fn establish(cfg: InitiatorConfig, discovery: bool) -> Result<Session, InitiatorError> {
        let isid = cfg.isid.unwrap_or_else(random_isid);
        let LoggedIn {
            rd,
            wr,
            buf,
            mut dec,
            result,
        } = tokio::time::timeout(cfg.login_timeout, login_exchange(&cfg, discovery, isid))
            .await
            .map_err(|_| InitiatorError::Timeout)??;
        let negotiated = result.params.clone();
        let digests = DigestConfig {
            header: negotiated.connection.header_digest,
            data: negotiated.connection.data_digest,
        };
        dec.digests = digests;
        dec.max_data_segment_len = negotiated.connection.initiator_max_recv_data_segment_length;
        info!(
            target = %cfg.target_name,
            addr = %cfg.addr,
            isid = %hex::encode(isid),
            tsih = negotiated.tsih,
            discovery,
            "logged in"
        );
        let sequence = Sequence {
            cmd_sn: result.cmd_sn,
            exp_stat_sn: result.exp_stat_sn,
            exp_cmd_sn: result.exp_cmd_sn,
            max_cmd_sn: result.max_cmd_sn,
        };
        let conn_cfg = conn::InitiatorConfig::new(result.params, sequence);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                conn: InitiatorConnection::new(conn_cfg, Instant::now()),
                waiters: HashMap::new(),
            }),
            wake: Notify::new(),
            window: Notify::new(),
            negotiated,
            isid,
            initiator_name: cfg.initiator_name.clone(),
            target_name: cfg.target_name.clone(),
        });
        let reader = tokio::spawn(reader_task(shared.clone(), rd, buf, dec));
        let writer = tokio::spawn(writer_task(shared.clone(), wr, digests));
        Ok(Session {
            inner: Arc::new(Inner {
                shared,
                reader,
                writer,
            }),
        })
    }

    pub fn isid(&self) -> [u8; 6] {
        self.shared().isid
    }

    pub fn initiator_name(&self) -> &str {
        &self.shared().initiator_name
    }

    pub fn target_name(&self) -> &str {
        &self.shared().target_name
    }

    /// Parameters in force for this session.
    pub fn negotiated(&self) -> &LoginParams {
        &self.shared().negotiated
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.shared().core().conn.is_closed()
    }

    /// Send a SCSI command and return at once with a handle to its result. Waits (only)
    /// while the target's CmdSN window is closed, so a slow target pushes back.
    pub async fn submit(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<Task, InitiatorError> {
        let sh = self.shared();
        let req = CommandRequest {
            lun: encode_lun(lun),
            cdb: Bytes::copy_from_slice(cdb),
            data_out: data_out.unwrap_or_default(),
            data_in_len,
        };
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        loop {
            let opened = sh.window.notified();
            let submitted = sh.with(|c| {
                if !c.conn.window_open() && !c.conn.is_closed() {
                    return Ok(None);
                }
                let s = c.conn.submit_command(req.clone()).map_err(submit_error)?;
                if let Some(tx) = tx.take() {
                    c.waiters.insert(s.itt, waiter(tx, command_done));
                }
                Ok::<_, InitiatorError>(Some(s))
            })?;
            if let Some(s) = submitted {
                return Ok(Task {
                    itt: s.itt,
                    cmd_sn: s.cmd_sn,
                    lun,
                    rx,
                });
            }
            debug!("CmdSN window closed: waiting for MaxCmdSN to advance");
            opened.await;
        }
    }

    /// Run one SCSI command: `data_out` for writes, `data_in_len` = expected read length.
    pub async fn command(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<ScsiResult, InitiatorError> {
        self.submit(lun, cdb, data_out, data_in_len)
            .await?
            .wait()
            .await
    }

    /// NOP-Out ping; returns the round-trip time.
    pub async fn nop(&self) -> Result<Duration, InitiatorError> {
        self.shared()
            .request(
                |c| c.ping(Instant::now()),
                |ev| match ev {
                    Event::NopDone { result, .. } => Some(result),
                    _ => None,
                },
            )
            .await
    }

    async fn task_management(
        &self,
        function: u8,
        lun: u64,
        referenced: u32,
        ref_cmd_sn: u32,
    ) -> Result<u8, InitiatorError> {
        let lun_field = encode_lun(lun);
        self.shared()
            .request(
                |c| c.task_management(function, lun_field, referenced, ref_cmd_sn),
                |ev| match ev {
                    Event::TmfDone { result, .. } => Some(result),
                    _ => None,
                },
            )
            .await
    }

    /// ABORT TASK for a task submitted with [`Session::submit`]. Returns the TMF response
    /// (0 = function complete; the task then fails with [`RequestError::Aborted`]).
    pub async fn abort_task(&self, task: &Task) -> Result<u8, InitiatorError> {
        self.task_management(tmf::ABORT_TASK, task.lun, task.itt, task.cmd_sn)
            .await
    }

    /// ABORT TASK SET on `lun` (this nexus's tasks).
    pub async fn abort_task_set(&self, lun: u64) -> Result<u8, InitiatorError> {
        self.task_management(tmf::ABORT_TASK_SET, lun, RESERVED_TAG, 0)
            .await
    }

    /// LOGICAL UNIT RESET; commands of ours still running on `lun` fail with Aborted.
    pub async fn lun_reset(&self, lun: u64) -> Result<u8, InitiatorError> {
        self.task_management(tmf::LOGICAL_UNIT_RESET, lun, RESERVED_TAG, 0)
            .await
    }

    /// Text request (full feature phase); returns the (reassembled) answer keys.
    pub async fn text(
        &self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, InitiatorError> {
        let body = encode_text(pairs);
        let data = self
            .shared()
            .request(
                |c| c.text(body),
                |ev| match ev {
                    Event::TextDone { result, .. } => Some(result),
                    _ => None,
                },
            )
            .await?;
        Ok(parse_text(&data)?)
    }

    /// Wait for outstanding SCSI commands, then log out (close the session).
    pub async fn logout(self) -> Result<(), InitiatorError> {
        self.shared()
            .request(
                |c| c.logout(),
                |ev| match ev {
                    Event::LogoutDone { result, .. } => Some(result),
                    _ => None,
                },
            )
            .await?;
        debug!(target = %self.shared().target_name, "logged out");
        Ok(())
    }
}
