//! One TCP connection: login phase, then the full feature phase of a discovery or normal
//! session. The reader half runs here; a writer task stamps sequence numbers and sends.
//! SCSI commands execute on the blocking pool and answer through the writer.

use super::limits::{BufferPermit, SessionSlot};
use super::runtime::Runtime;
use super::session::{SessionControl, SessionKey, SessionRegistry};
use crate::iscsi::cmdsn::{Admission, CmdWindow};
use crate::iscsi::login::{
    ChapCredentials, Leading, LoginAuthority, LoginMachine, LoginOutcome, LoginStatus, LoginStep,
    SessionType, TargetPolicy,
};
use crate::iscsi::task_set::{TaskId, TaskSet};
use crate::iscsi::transfer::{plan_data_in, Residual, WriteLimits, WriteTransfer};
use crate::scsi::sense::Sense;
use crate::scsi::{status, ItNexus, LogicalUnit, LunMap, ScsiCommand, ScsiOutcome, TaskAttr};
use crate::wire::{
    self, reject_reason, Bhs, DigestConfig, Pdu, PduDecoder, WireError, RESERVED_TAG,
};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

/// Largest data segment accepted during login (RFC default is 8192; be lenient).
const LOGIN_MAX_SEGMENT: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("login timed out")]
    LoginTimeout,
    #[error("login failed")]
    LoginFailed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no answer to NOP-In ping")]
    PingTimeout,
}

/// Login checks against the runtime, for a connection that arrived on `listen`.
struct Authority<'a> {
    rt: &'a Runtime,
    reg: &'a SessionRegistry,
    listen: SocketAddr,
    /// The session slot reserved when the login completes.
    slot: Option<SessionSlot>,
}

impl Authority<'_> {
    /// The policy of the target `lead` names (its alias, CHAP secrets, key policy), and
    /// whether CHAP is demanded (for the CHAP failure count, even when locked out).
    fn choose(&self, lead: &Leading) -> (Result<TargetPolicy, LoginStatus>, bool) {
        let chap = match lead.authorize(self) {
            Ok(chap) => chap,
            Err(s) => return (Err(s), false),
        };
        let demanded = chap.is_some();
        if demanded
            && self
                .rt
                .limits
                .chap_locked(&lead.initiator_name, Instant::now())
        {
            warn!(
                initiator = %lead.initiator_name,
                "login refused: CHAP locked out after repeated failures"
            );
            return (Err(LoginStatus::AUTH_FAILURE), demanded);
        }
        let mut keys = self.rt.key_policy.clone();
        // The alias is per target.
        if let Some(node) = lead.target_name.as_deref().and_then(|t| self.rt.target(t)) {
            keys.target_alias = node.alias.clone();
        }
        (Ok(TargetPolicy { keys, chap }), demanded)
    }
}

impl LoginAuthority for Authority<'_> {
    fn normal_session(
        &self,
        target: &str,
        initiator: &str,
    ) -> Result<Option<ChapCredentials>, LoginStatus> {
        self.rt.authorize_normal(self.listen, target, initiator)
    }
    fn discovery_session(&self, _initiator: &str) -> Result<Option<ChapCredentials>, LoginStatus> {
        Ok(self.rt.discovery_chap.clone())
    }
    fn resolve_tsih(&mut self, lead: &Leading) -> Result<u16, LoginStatus> {
        // Called once, just before the login succeeds: the place to take a session slot.
        let initiator = lead.initiator_name.as_str();
        let slot = self
            .rt
            .limits
            .session(initiator, lead.isid, lead.target_name.as_deref())?;
        self.slot = Some(slot);
        if lead.tsih == 0 {
            Ok(self.reg.allocate_tsih())
        } else if self.reg.has_tsih(initiator, lead.isid, lead.tsih) {
            Ok(lead.tsih)
        } else {
            Err(LoginStatus::SESSION_DOES_NOT_EXIST)
        }
    }
    fn tpgt(&self) -> u16 {
        self.rt
            .targets
            .iter()
            .find_map(|t| t.tpgt_on(self.listen))
            .unwrap_or(1)
    }
}

/// Read one PDU, buffering partial input in `buf`.
async fn read_pdu(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    dec: &mut PduDecoder,
) -> Result<Pdu, ConnError> {
    loop {
        if let Some(p) = dec.decode(buf)? {
            return Ok(p);
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

async fn write_pdu(
    wr: &mut OwnedWriteHalf,
    pdu: &Pdu,
    digests: DigestConfig,
) -> Result<(), ConnError> {
    let mut out = BytesMut::with_capacity(wire::BHS_LEN + pdu.data.len() + 16);
    wire::encode(pdu, digests, &mut out);
    wr.write_all(&out).await?;
    Ok(())
}

/// Serve one accepted connection until it ends.
pub async fn serve(
    rt: Arc<Runtime>,
    reg: Arc<SessionRegistry>,
    stream: TcpStream,
    listen: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let peer = stream.peer_addr().ok();
    let Some(_conn_slot) = rt.limits.connection() else {
        warn!(
            ?peer,
            max = rt.limits.settings.max_connections,
            "too many open connections (limits.max_connections): closing the new one"
        );
        return;
    };
    let local = stream.local_addr().unwrap_or(listen);
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut dec = PduDecoder::new(LOGIN_MAX_SEGMENT);
    let login_timeout = Duration::from_secs(rt.settings.login_timeout_secs);
    let login = tokio::time::timeout(
        login_timeout,
        login_phase(&rt, &reg, listen, &mut rd, &mut wr, &mut buf, &mut dec),
    );
    let outcome = match login.await {
        Err(_) => {
            warn!(
                ?peer,
                "login timed out after {:?}; dropping connection", login_timeout
            );
            return;
        }
        Ok(Err(e)) => {
            match e {
                ConnError::Closed => debug!(?peer, "connection closed during login"),
                ConnError::LoginFailed => {}
                e => warn!(?peer, error = %e, "login aborted"),
            }
            return;
        }
        Ok(Ok(o)) => o,
    };
    let (outcome, _session_slot) = outcome;
    info!(
        ?peer,
        initiator = %outcome.initiator_name,
        target = outcome.target_name.as_deref().unwrap_or("(discovery)"),
        isid = %hex::encode(outcome.isid),
        tsih = outcome.tsih,
        header_digest = outcome.connection.header_digest,
        data_digest = outcome.connection.data_digest,
        "login complete"
    );
    dec.digests = DigestConfig {
        header: outcome.connection.header_digest,
        data: outcome.connection.data_digest,
    };
    dec.max_data_segment_len = outcome.connection.target_max_recv_data_segment_length;
    let res = run_full_feature(rt, reg, outcome, listen, local, rd, wr, buf, dec, shutdown).await;
    match res {
        Ok(()) | Err(ConnError::Closed) => debug!(?peer, "connection ended"),
        Err(e) => warn!(?peer, error = %e, "connection dropped"),
    }
}

async fn login_phase(
    rt: &Runtime,
    reg: &SessionRegistry,
    listen: SocketAddr,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    dec: &mut PduDecoder,
) -> Result<(LoginOutcome, Option<SessionSlot>), ConnError> {
    let mut auth = Authority {
        rt,
        reg,
        listen,
        slot: None,
    };
    let mut machine = LoginMachine::new();
    // Initiator of the leading request and whether its target demanded CHAP.
    let mut who: Option<(String, bool)> = None;
    loop {
        let pdu = match read_pdu(rd, buf, dec).await {
            Ok(p) => p,
            Err(ConnError::Wire(e)) => {
                warn!(error = %e, "malformed PDU during login; dropping connection");
                return Err(ConnError::Wire(e));
            }
            Err(e) => return Err(e),
        };
        let mut step = machine.on_pdu(&pdu, &mut auth);
        if let LoginStep::ChooseTarget(lead) = &step {
            let (policy, chap) = auth.choose(lead);
            if policy.is_ok() || chap {
                who = Some((lead.initiator_name.clone(), chap));
            }
            step = machine.choose(policy, &mut auth);
        }
        match step {
            LoginStep::Continue(resp) => write_pdu(wr, &resp, DigestConfig::default()).await?,
            LoginStep::ChooseTarget(_) => unreachable!("the target was just chosen"),
            LoginStep::Complete(resp, outcome) => {
                write_pdu(wr, &resp, DigestConfig::default()).await?;
                return Ok((*outcome, auth.slot.take()));
            }
            LoginStep::Fail(resp, error) => {
                let initiator = who.as_ref().map_or("?", |w| w.0.as_str()).to_string();
                let status = error.status();
                warn!(
                    initiator,
                    status_class = status.class,
                    status_detail = status.detail,
                    reason = %error,
                    "login refused"
                );
                let chap = who.as_ref().is_some_and(|w| w.1);
                if chap
                    && status == LoginStatus::AUTH_FAILURE
                    && rt.limits.chap_failed(&initiator, Instant::now())
                {
                    warn!(
                        initiator,
                        failures = rt.limits.settings.chap_max_failures,
                        lockout_secs = rt.limits.settings.chap_lockout_secs,
                        "repeated CHAP failures: initiator locked out"
                    );
                }
                write_pdu(wr, &resp, DigestConfig::default()).await?;
                let _ = wr.shutdown().await;
                return Err(ConnError::LoginFailed);
            }
        }
    }
}

/// Something for the writer task.
enum Out {
    Pdu(Pdu),
    /// A task's buffer budget, returned once the PDUs queued before it are written: a
    /// peer that stops reading cannot make Data-In pile up beyond the budget.
    Release(BufferPermit),
    /// Flush what is queued and close the connection.
    Close,
}

/// Completion tracking of one task, for task management waiters.
#[derive(Debug, Default)]
struct TaskDone {
    flag: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl TaskDone {
    fn set(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.flag.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }
}

/// A task known to the session (waiting in the task set or running).
struct ActiveTask {
    lun: u64,
    task_id: TaskId,
    aborted: bool,
    done: Arc<TaskDone>,
}

/// A command ready to execute (all its Data-Out arrived).
struct Ready {
    itt: u32,
    read: bool,
    edtl: u32,
    /// Data-Out length the CDB asked for (for write residuals).
    cdb_out_len: u32,
    r2t_count: u32,
    cmd: ScsiCommand,
    /// The command's share of `limits.buffer_memory`, returned when the task ends.
    buffer: Option<BufferPermit>,
}

/// A non-immediate request waiting for its CmdSN turn.
enum Request {
    Pdu(Pdu),
    /// A SCSI Command whose immediate data failed its digest (by ITT): it takes its
    /// CmdSN like any command, then fails.
    DigestFailed(u32),
}

struct Core {
    window: CmdWindow<Request>,
    tasks: TaskSet<Ready>,
    active: HashMap<u32, ActiveTask>,
}

/// State shared between the reader, the writer and executing tasks.
struct Shared {
    core: Mutex<Core>,
    out: mpsc::UnboundedSender<Out>,
    lun_map: LunMap,
    /// The same LUNs, for nexus-wide events (reset, nexus loss).
    luns: Vec<Arc<LogicalUnit>>,
    nexus: Arc<ItNexus>,
    /// Largest Data-In segment the initiator accepts.
    max_send_segment: u32,
    max_burst: u32,
    handle: tokio::runtime::Handle,
}

impl Shared {
    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn send(&self, pdu: Pdu) {
        let _ = self.out.send(Out::Pdu(pdu));
    }
}

fn pdu(bhs: Bhs, data: Bytes) -> Pdu {
    Pdu {
        bhs,
        ahs: Vec::new(),
        data,
    }
}

fn reject(reason: u8, offending: &Pdu) -> Pdu {
    // The Reject data segment carries the offending header (RFC 7143 §11.17).
    let mut hdr = BytesMut::new();
    wire::encode(
        &Pdu {
            bhs: offending.bhs.clone(),
            ahs: Vec::new(),
            data: Bytes::new(),
        },
        DigestConfig {
            header: false,
            data: false,
        },
        &mut hdr,
    );
    hdr.truncate(wire::BHS_LEN);
    pdu(
        Bhs::Reject(wire::Reject {
            reason,
            ..Default::default()
        }),
        hdr.freeze(),
    )
}

/// Decode the SAM LUN field (peripheral or flat addressing, first level only).
pub fn decode_lun(field: u64) -> Option<u64> {
    let b = field.to_be_bytes();
    match b[0] >> 6 {
        0b00 if b[0] & 0x3f == 0 => Some(b[1] as u64),
        0b01 => Some((((b[0] & 0x3f) as u64) << 8) | b[1] as u64),
        _ => None,
    }
}

fn task_attr(raw: u8) -> TaskAttr {
    match raw & 7 {
        2 => TaskAttr::Ordered,
        3 => TaskAttr::HeadOfQueue,
        4 => TaskAttr::Aca,
        _ => TaskAttr::Simple,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_full_feature(
    rt: Arc<Runtime>,
    reg: Arc<SessionRegistry>,
    outcome: LoginOutcome,
    listen: SocketAddr,
    local: SocketAddr,
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    dec: PduDecoder,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (lun_map, luns, nexus, control, key_handle) = match (
        outcome.session_type,
        outcome.target_name.as_deref(),
    ) {
        (SessionType::Normal, Some(tname)) => {
            let Some(target) = rt.target(tname).cloned() else {
                return Err(ConnError::Protocol(format!("target {tname} vanished")));
            };
            // The portal group is the one of the portal that accepted the connection (as
            // configured: the socket's own address differs for port 0 or a wildcard).
            let Some(tpgt) = target.tpgt_on(listen) else {
                return Err(ConnError::Protocol(format!(
                    "target {tname} is not served on {listen}"
                )));
            };
            let nexus = Arc::new(ItNexus {
                initiator_name: outcome.initiator_name.clone(),
                isid: outcome.isid,
                target_name: target.name.clone(),
                tpgt,
                relative_port_id: tpgt,
            });
            let key = SessionKey::new(&outcome.initiator_name, outcome.isid, &target.name, tpgt);
            let (old, control, handle) = reg.register(key.clone(), outcome.tsih);
            if let Some(old) = old {
                info!(initiator = %outcome.initiator_name, isid = %hex::encode(outcome.isid), "session reinstatement: ending the previous session");
                old.terminate().await;
            }
            let map = target.lun_map_for(&outcome.initiator_name);
            let luns = target.visible_luns(&outcome.initiator_name);
            (map, luns, nexus, Some(control), Some((key, handle)))
        }
        _ => (
            LunMap::new(Default::default()),
            Vec::new(),
            Arc::new(ItNexus {
                initiator_name: outcome.initiator_name.clone(),
                isid: outcome.isid,
                target_name: String::new(),
                tpgt: 0,
                relative_port_id: 0,
            }),
            None,
            None,
        ),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut window = CmdWindow::new(outcome.exp_cmd_sn, rt.settings.queue_depth);
    window.note_announced(
        outcome
            .exp_cmd_sn
            .wrapping_add(crate::iscsi::login::QUEUE_DEPTH - 1),
    );
    let shared = Arc::new(Shared {
        core: Mutex::new(Core {
            window,
            tasks: TaskSet::new(),
            active: HashMap::new(),
        }),
        out: tx,
        lun_map,
        luns,
        nexus,
        max_send_segment: outcome.connection.initiator_max_recv_data_segment_length,
        max_burst: outcome.session.max_burst_length,
        handle: tokio::runtime::Handle::current(),
    });
    if !shared.luns.is_empty() {
        let weak: std::sync::Weak<dyn super::session::TaskAborter> = Arc::downgrade(&shared) as _;
        rt.nexuses.insert((*shared.nexus).clone(), weak);
    }
    let digests = DigestConfig {
        header: outcome.connection.header_digest,
        data: outcome.connection.data_digest,
    };
    let (stalled_tx, mut stalled_rx) = watch::channel(false);
    let writer = tokio::spawn(writer_task(
        wr,
        rx,
        shared.clone(),
        digests,
        outcome.next_stat_sn,
        (
            Duration::from_secs(rt.settings.nop_timeout_secs),
            stalled_tx,
        ),
    ));
    let mut conn = Reader {
        rt: rt.clone(),
        shared: shared.clone(),
        outcome,
        local,
        rd,
        buf,
        dec,
        writes: HashMap::new(),
        next_ttt: 1,
        text_pending: None,
        ping_outstanding: None,
    };
    let mut stop_rx = control.as_ref().map(|c| c.stop_rx.clone());
    let res = tokio::select! {
        r = conn.run() => r,
        _ = shutdown.wait_for(|s| *s) => Ok(()),
        _ = stalled_rx.wait_for(|s| *s) => Err(ConnError::Protocol(format!(
            "peer stopped reading: a write blocked for more than nop_timeout_secs ({} s)",
            rt.settings.nop_timeout_secs
        ))),
        _ = async { match stop_rx.as_mut() { Some(s) => { let _ = s.wait_for(|s| *s).await; } None => std::future::pending().await } } => {
            info!(initiator = %conn.outcome.initiator_name, "session ended by reinstatement or shutdown");
            Ok(())
        }
    };
    // End of the nexus: nothing queued starts, running tasks finish before we report
    // the session gone (a reinstating login waits for this).
    conn.writes.clear();
    let waits = abort_tasks(&shared, |_| true);
    for w in waits {
        w.wait().await;
    }
    rt.nexuses.remove(&shared.nexus);
    for lu in &shared.luns {
        lu.nexus_lost(&shared.nexus);
    }
    let _ = shared.out.send(Out::Close);
    let _ = writer.await;
    if let (Some((key, handle)), Some(control)) = (key_handle, control) {
        reg.unregister(&key, &handle);
        control.finished();
        drop::<SessionControl>(control);
    }
    res
}

impl super::session::TaskAborter for Shared {
    fn abort_lun(&self, lun: u64) {
        let n = abort_tasks(self, |l| l == lun).len();
        if n > 0 {
            info!(initiator = %self.nexus.initiator_name, isid = %hex::encode(self.nexus.isid), lun, running = n, "tasks aborted by PREEMPT AND ABORT");
        }
    }
}

/// Mark matching tasks aborted: waiting ones are dropped now, running ones are awaited by
/// the caller through the returned handles (their responses are suppressed).
fn abort_tasks(shared: &Shared, mut pred: impl FnMut(u64) -> bool) -> Vec<Arc<TaskDone>> {
    let mut core = shared.core();
    let removed = core.tasks.remove_waiting(|r| pred(r.cmd.lun));
    for (_, r) in &removed {
        if let Some(t) = core.active.remove(&r.itt) {
            t.done.set();
        }
        core.window.complete();
    }
    let mut waits = Vec::new();
    for t in core.active.values_mut() {
        if pred(t.lun) {
            t.aborted = true;
            waits.push(t.done.clone());
        }
    }
    waits
}

/// Submit a ready command to the task set and start whatever may run.
fn submit(shared: &Arc<Shared>, ready: Ready) {
    let attr = ready.cmd.attr;
    let itt = ready.itt;
    let lun = ready.cmd.lun;
    let started = {
        let mut core = shared.core();
        let (task_id, started) = core.tasks.submit(attr, ready);
        core.active.insert(
            itt,
            ActiveTask {
                lun,
                task_id,
                aborted: false,
                done: Arc::new(TaskDone::default()),
            },
        );
        started
    };
    for (id, r) in started {
        spawn_exec(shared.clone(), id, r);
    }
}

/// Largest READ answered inline (bounds how long one command holds a runtime thread).
const INLINE_READ_MAX: u32 = 256 * 1024;
/// Largest WRITE tried inline: small writes are where the pool round trip dominates.
const INLINE_WRITE_MAX: u32 = 64 * 1024;

/// Whether a command may be tried on the calling (runtime) thread first: plain READs and
/// WRITEs without FUA, whose attempt has no effect beyond the transfer itself, so that
/// an attempt the backend refuses (data not in the page cache, a flush needed, a range
/// held by COMPARE AND WRITE) can simply run again on the blocking pool. A buffered write
/// may still wait briefly in the kernel (dirty page throttling); that is the price of
/// not paying two thread wake-ups per small write.
fn try_inline(cmd: &ScsiCommand) -> bool {
    let cdb: &[u8] = &cmd.cdb;
    let fua = cdb.get(1).is_some_and(|b| b & 0x08 != 0);
    match cdb.first() {
        Some(0x08 | 0x28 | 0xa8 | 0x88) => cmd.data_in_len <= INLINE_READ_MAX,
        Some(0x0a) => cmd.data_out.len() <= INLINE_WRITE_MAX as usize,
        Some(0x2a | 0xaa | 0x8a) => !fua && cmd.data_out.len() <= INLINE_WRITE_MAX as usize,
        _ => false,
    }
}

fn spawn_exec(shared: Arc<Shared>, task_id: TaskId, ready: Ready) {
    // The round trip through the blocking pool (two thread wake-ups) costs more than a
    // page-cache copy: try cheap commands here first (see try_inline).
    if try_inline(&ready.cmd) {
        if let Some(outcome) =
            crate::scsi::backend::without_blocking(|| shared.lun_map.execute(&ready.cmd))
        {
            let mut ready = ready;
            let pdus = build_response(&shared, &ready, outcome.clone());
            let buffer = ready.buffer.take();
            finish(&shared, &ready, task_id, pdus, &outcome, buffer);
            return;
        }
    }
    let h = shared.handle.clone();
    h.spawn_blocking(move || {
        let mut ready = ready;
        let outcome = shared.lun_map.execute(&ready.cmd);
        let pdus = build_response(&shared, &ready, outcome.clone());
        let buffer = ready.buffer.take();
        finish(&shared, &ready, task_id, pdus, &outcome, buffer);
    });
}

/// Send the response unless the task was aborted meanwhile; the task's buffer budget
/// goes back once the writer has sent the response.
fn finish(
    shared: &Arc<Shared>,
    ready: &Ready,
    task_id: TaskId,
    pdus: Vec<Pdu>,
    outcome: &ScsiOutcome,
    buffer: Option<BufferPermit>,
) {
    let itt = ready.itt;
    let (started, entry, aborted) = {
        let mut core = shared.core();
        let entry = core.active.remove(&itt);
        let aborted = entry
            .as_ref()
            .is_none_or(|e| e.aborted || e.task_id != task_id);
        core.window.complete();
        if !aborted {
            for p in pdus {
                shared.send(p);
            }
            if let Some(b) = buffer {
                let _ = shared.out.send(Out::Release(b));
            }
        } else {
            debug!(itt, "task aborted: response suppressed");
        }
        (core.tasks.complete(task_id), entry, aborted)
    };
    if aborted {
        // A unit attention this task took was never reported: give it back before
        // anyone waiting for the task (session end, nexus loss) goes on.
        if let Some(lu) = shared.lun_map.get(ready.cmd.lun) {
            lu.unreported(&ready.cmd.nexus, outcome);
        }
    }
    if let Some(e) = entry {
        e.done.set();
    }
    for (id, r) in started {
        spawn_exec(shared.clone(), id, r);
    }
}

fn scsi_response(
    itt: u32,
    st: u8,
    sense: Option<&Bytes>,
    residual: Residual,
    exp_data_sn: u32,
) -> Pdu {
    let data = match sense {
        Some(s) if !s.is_empty() => {
            let mut d = BytesMut::with_capacity(2 + s.len());
            d.extend_from_slice(&(s.len() as u16).to_be_bytes());
            d.extend_from_slice(s);
            d.freeze()
        }
        _ => Bytes::new(),
    };
    pdu(
        Bhs::ScsiResponse(wire::ScsiResponse {
            overflow: residual.overflow,
            underflow: residual.underflow,
            response: 0,
            status: st,
            itt,
            exp_data_sn,
            residual_count: residual.count,
            ..Default::default()
        }),
        data,
    )
}

fn build_response(shared: &Shared, ready: &Ready, outcome: ScsiOutcome) -> Vec<Pdu> {
    let mut out = Vec::new();
    if ready.read && !outcome.data_in.is_empty() {
        let full = outcome.data_in.len() as u64;
        let residual = Residual::of(ready.edtl, full);
        let send = outcome
            .data_in
            .slice(..(full.min(ready.edtl as u64) as usize));
        let collapse = outcome.status == status::GOOD && outcome.sense.is_none();
        let segs = plan_data_in(&send, shared.max_send_segment, shared.max_burst, collapse);
        let n = segs.len() as u32;
        for s in segs {
            let last = s.with_status;
            out.push(pdu(
                Bhs::DataIn(wire::DataIn {
                    final_: s.final_,
                    status_present: last,
                    status: if last { outcome.status } else { 0 },
                    overflow: last && residual.overflow,
                    underflow: last && residual.underflow,
                    residual_count: if last { residual.count } else { 0 },
                    lun: 0,
                    itt: ready.itt,
                    ttt: RESERVED_TAG,
                    data_sn: s.data_sn,
                    buffer_offset: s.offset,
                    ..Default::default()
                }),
                s.data,
            ));
        }
        if !collapse || n == 0 {
            out.push(scsi_response(
                ready.itt,
                outcome.status,
                outcome.sense.as_ref(),
                residual,
                n,
            ));
        }
        return out;
    }
    let residual = if ready.read {
        Residual::of(ready.edtl, 0)
    } else if ready.edtl > 0 || ready.cdb_out_len > 0 {
        Residual::of(ready.edtl, ready.cdb_out_len as u64)
    } else {
        Residual::default()
    };
    out.push(scsi_response(
        ready.itt,
        outcome.status,
        outcome.sense.as_ref(),
        residual,
        ready.r2t_count,
    ));
    out
}

/// A write task still receiving Data-Out.
struct PendingWrite {
    transfer: WriteTransfer,
    ready: Ready,
}

struct Reader {
    rt: Arc<Runtime>,
    shared: Arc<Shared>,
    outcome: LoginOutcome,
    local: SocketAddr,
    rd: OwnedReadHalf,
    buf: BytesMut,
    dec: PduDecoder,
    writes: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// Remainder of a long text response and its TTT.
    text_pending: Option<(u32, Bytes)>,
    /// TTT of our NOP-In ping awaiting its NOP-Out.
    ping_outstanding: Option<u32>,
}

impl Reader {
    fn is_discovery(&self) -> bool {
        self.outcome.session_type == SessionType::Discovery
    }

    async fn run(&mut self) -> Result<(), ConnError> {
        let interval = Duration::from_secs(self.rt.settings.nop_interval_secs);
        let timeout = Duration::from_secs(self.rt.settings.nop_timeout_secs);
        loop {
            let wait = if self.ping_outstanding.is_some() {
                timeout
            } else {
                interval
            };
            let pdu = match tokio::time::timeout(
                wait,
                read_pdu(&mut self.rd, &mut self.buf, &mut self.dec),
            )
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(ConnError::Wire(e))) => {
                    if let Some((immediate, cmd_sn, req)) = self.on_wire_error(e)? {
                        if self.admit(immediate, cmd_sn, req).await? {
                            return Ok(());
                        }
                    }
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    if self.ping_outstanding.is_some() {
                        return Err(ConnError::PingTimeout);
                    }
                    // Idle: ping the initiator; a dead peer is dropped after the timeout.
                    let ttt = self.alloc_ttt();
                    self.ping_outstanding = Some(ttt);
                    self.shared.send(pdu(
                        Bhs::NopIn(wire::NopIn {
                            itt: RESERVED_TAG,
                            ttt,
                            ..Default::default()
                        }),
                        Bytes::new(),
                    ));
                    continue;
                }
            };
            if self.on_pdu(pdu).await? {
                return Ok(());
            }
        }
    }

    /// Handle a decode error; Ok when the connection can go on, with a request that must
    /// still take its place in the CmdSN window.
    #[allow(clippy::type_complexity)]
    fn on_wire_error(&mut self, e: WireError) -> Result<Option<(bool, u32, Request)>, ConnError> {
        match e {
            WireError::DataDigest { bhs } => {
                warn!("data digest error: rejecting the PDU");
                let p = Pdu {
                    bhs: *bhs,
                    ahs: Vec::new(),
                    data: Bytes::new(),
                };
                self.shared
                    .send(reject(reject_reason::DATA_DIGEST_ERROR, &p));
                match &p.bhs {
                    Bhs::DataOut(d) => {
                        // The task cannot complete without its data at ERL 0.
                        if let Some(w) = self.writes.remove(&d.itt) {
                            self.fail_write(w, 0x0b, 0x47, 0x01);
                        }
                    }
                    Bhs::ScsiCommand(c) => {
                        self.ping_outstanding = None;
                        return Ok(Some((c.immediate, c.cmd_sn, Request::DigestFailed(c.itt))));
                    }
                    _ => {}
                }
                Ok(None)
            }
            WireError::UnknownOpcode { opcode, header, .. } => {
                warn!(opcode, "unknown opcode: rejecting");
                let data = Bytes::copy_from_slice(&header[..]);
                self.shared.send(pdu(
                    Bhs::Reject(wire::Reject {
                        reason: reject_reason::COMMAND_NOT_SUPPORTED,
                        ..Default::default()
                    }),
                    data,
                ));
                Ok(None)
            }
            other => {
                warn!(error = %other, "framing error: dropping connection");
                Err(ConnError::Wire(other))
            }
        }
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1) & 0x7fff_ffff;
        if self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        t
    }

    /// Returns Ok(true) when the connection should close (after logout).
    async fn on_pdu(&mut self, p: Pdu) -> Result<bool, ConnError> {
        match &p.bhs {
            Bhs::DataOut(_) => {
                self.on_data_out(p);
                Ok(false)
            }
            Bhs::SnackRequest(_) => {
                warn!("SNACK at ErrorRecoveryLevel 0: rejecting");
                self.shared.send(reject(reject_reason::SNACK_REJECT, &p));
                Ok(false)
            }
            Bhs::NopOut(n) if n.itt == RESERVED_TAG => {
                // Answer to our ping (or an unsolicited ping needing no reply).
                if n.ttt != RESERVED_TAG && self.ping_outstanding == Some(n.ttt) {
                    self.ping_outstanding = None;
                }
                Ok(false)
            }
            Bhs::NopOut(_)
            | Bhs::ScsiCommand(_)
            | Bhs::TaskMgmtRequest(_)
            | Bhs::TextRequest(_)
            | Bhs::LogoutRequest(_) => {
                let (immediate, cmd_sn) = match &p.bhs {
                    Bhs::NopOut(n) => (n.immediate, n.cmd_sn),
                    Bhs::ScsiCommand(c) => (c.immediate, c.cmd_sn),
                    Bhs::TaskMgmtRequest(t) => (t.immediate, t.cmd_sn),
                    Bhs::TextRequest(t) => (t.immediate, t.cmd_sn),
                    Bhs::LogoutRequest(l) => (l.immediate, l.cmd_sn),
                    _ => (true, 0),
                };
                // Any traffic proves the peer alive.
                self.ping_outstanding = None;
                self.admit(immediate, cmd_sn, Request::Pdu(p)).await
            }
            _ => {
                warn!(opcode = ?bhs_name(&p.bhs), "unexpected PDU from initiator: rejecting");
                self.shared.send(reject(reject_reason::PROTOCOL_ERROR, &p));
                Ok(false)
            }
        }
    }

    /// Pass a request through the CmdSN window and handle whatever it releases.
    async fn admit(
        &mut self,
        immediate: bool,
        cmd_sn: u32,
        req: Request,
    ) -> Result<bool, ConnError> {
        let batch = if immediate {
            self.shared.core().window.admit_immediate();
            vec![req]
        } else {
            let adm = self.shared.core().window.admit(cmd_sn, req);
            match adm {
                Admission::Deliver(v) => v,
                Admission::Held => Vec::new(),
                Admission::Ignored => {
                    // Nothing is allocated for it: the window bounds what a session holds.
                    debug!(
                        cmd_sn,
                        "command outside the CmdSN window: ignored (RFC 7143 §4.2.2.1)"
                    );
                    Vec::new()
                }
            }
        };
        for r in batch {
            match r {
                Request::Pdu(r) => {
                    if self.on_request(r).await? {
                        return Ok(true);
                    }
                }
                Request::DigestFailed(itt) => {
                    // RFC 7143 §7.8: the header was good, the immediate data was not; the
                    // task ends with "protocol service CRC error".
                    self.fail_command(
                        itt,
                        status::CHECK_CONDITION,
                        Some(Sense::new(0x0b, 0x47, 0x05)),
                    );
                }
            }
        }
        Ok(false)
    }

    /// Mark a non-SCSI request done in the window.
    fn complete_request(&self) {
        self.shared.core().window.complete();
    }

    async fn on_request(&mut self, p: Pdu) -> Result<bool, ConnError> {
        match p.bhs {
            Bhs::ScsiCommand(c) => {
                self.on_scsi_command(c, p.ahs, p.data);
                Ok(false)
            }
            Bhs::NopOut(n) => {
                self.shared.send(pdu(
                    Bhs::NopIn(wire::NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        ..Default::default()
                    }),
                    p.data,
                ));
                self.complete_request();
                Ok(false)
            }
            Bhs::TextRequest(t) => {
                self.on_text(t, p.data);
                self.complete_request();
                Ok(false)
            }
            Bhs::TaskMgmtRequest(t) => {
                let resp = self.on_tmf(&t).await;
                self.shared.send(pdu(
                    Bhs::TaskMgmtResponse(wire::TaskMgmtResponse {
                        response: resp,
                        itt: t.itt,
                        ..Default::default()
                    }),
                    Bytes::new(),
                ));
                self.complete_request();
                Ok(t.function == 7 && resp == 0)
            }
            Bhs::LogoutRequest(l) => {
                let response = match l.reason {
                    0 | 1 => 0,
                    // Connection recovery needs ErrorRecoveryLevel 2.
                    _ => 2,
                };
                if response == 0 {
                    self.writes.clear();
                    for w in abort_tasks(&self.shared, |_| true) {
                        w.wait().await;
                    }
                }
                info!(initiator = %self.outcome.initiator_name, reason = l.reason, "logout");
                self.shared.send(pdu(
                    Bhs::LogoutResponse(wire::LogoutResponse {
                        response,
                        itt: l.itt,
                        ..Default::default()
                    }),
                    Bytes::new(),
                ));
                self.complete_request();
                Ok(response == 0)
            }
            _ => Ok(false),
        }
    }

    fn on_scsi_command(&mut self, c: wire::ScsiCommand, ahs: Vec<wire::Ahs>, data: Bytes) {
        let offending = || Pdu {
            bhs: Bhs::ScsiCommand(c.clone()),
            ahs: Vec::new(),
            data: Bytes::new(),
        };
        if self.is_discovery() {
            warn!("SCSI command in a discovery session: rejecting");
            self.shared
                .send(reject(reject_reason::PROTOCOL_ERROR, &offending()));
            self.complete_request();
            return;
        }
        let duplicate =
            self.writes.contains_key(&c.itt) || self.shared.core().active.contains_key(&c.itt);
        if duplicate || c.itt == RESERVED_TAG {
            warn!(
                itt = c.itt,
                "SCSI command reuses an active task tag: rejecting"
            );
            self.shared
                .send(reject(reject_reason::TASK_IN_PROGRESS, &offending()));
            self.complete_request();
            return;
        }
        let edtl = c.expected_data_transfer_length;
        let limits = &self.rt.limits;
        if u64::from(edtl) > limits.settings.max_command_bytes.0 {
            warn!(
                itt = c.itt,
                edtl,
                max = limits.settings.max_command_bytes.0,
                "expected data transfer length beyond limits.max_command_bytes: failing the command"
            );
            self.fail_command(
                c.itt,
                status::CHECK_CONDITION,
                Some(Sense::new(0x05, 0x24, 0x00)),
            );
            return;
        }
        // Buffers are charged before anything is allocated, so announced-but-never-sent
        // writes cannot pin more than the budget.
        let Some(buffer) = limits.buffer(edtl) else {
            // SAM-5: TASK SET FULL when this nexus has other commands in the task set,
            // BUSY when it has none; initiators retry either.
            let others = self.shared.core().window.outstanding() > 1;
            let st = if others {
                status::TASK_SET_FULL
            } else {
                status::BUSY
            };
            debug!(
                itt = c.itt,
                edtl,
                status = st,
                "buffer budget exhausted: command refused"
            );
            self.fail_command(c.itt, st, None);
            return;
        };
        // Extended CDB AHS (type 1): the CDB continues past the 16 bytes of the BHS.
        let mut cdb = BytesMut::from(&c.cdb[..]);
        if let Some(ext) = ahs.iter().find(|a| a.ahs_type == 1) {
            cdb.extend_from_slice(ext.data.get(1..).unwrap_or_default());
        }
        let cdb = cdb.freeze();
        let lun = decode_lun(c.lun).unwrap_or(u64::MAX);
        let cdb_out_len = if c.write {
            self.shared.lun_map.data_out_length(lun, &cdb)
        } else {
            0
        };
        let cmd = ScsiCommand {
            nexus: self.shared.nexus.clone(),
            lun,
            cdb,
            data_out: Bytes::new(),
            data_in_len: if c.read {
                c.expected_data_transfer_length
            } else {
                0
            },
            data_out_len: if c.write {
                c.expected_data_transfer_length
            } else {
                0
            },
            attr: task_attr(c.attr),
        };
        let ready = Ready {
            itt: c.itt,
            read: c.read,
            edtl: c.expected_data_transfer_length,
            cdb_out_len,
            r2t_count: 0,
            cmd,
            buffer: Some(buffer),
        };
        if !c.write || c.expected_data_transfer_length == 0 {
            if !data.is_empty() && !c.write {
                warn!(
                    itt = c.itt,
                    "data segment on a command without the W bit: ignored"
                );
            }
            submit(&self.shared, ready);
            return;
        }
        let limits = WriteLimits {
            initial_r2t: self.outcome.session.initial_r2t,
            first_burst_length: if self.outcome.session.immediate_data
                || !self.outcome.session.initial_r2t
            {
                self.outcome.session.first_burst_length
            } else {
                0
            },
            max_burst_length: self.outcome.session.max_burst_length,
            max_outstanding_r2t: self.outcome.session.max_outstanding_r2t,
        };
        let ttt_base = self.alloc_ttt().wrapping_mul(0x1_0000) & 0x7fff_ffff;
        match WriteTransfer::new(
            c.expected_data_transfer_length,
            cdb_out_len,
            &data,
            c.final_,
            limits,
            ttt_base,
        ) {
            Ok(t) => {
                let mut w = PendingWrite { transfer: t, ready };
                self.send_r2ts(&mut w);
                if w.transfer.is_complete() {
                    self.start_write(w);
                } else {
                    self.writes.insert(c.itt, w);
                }
            }
            Err(e) => {
                warn!(itt = c.itt, error = %e, "bad immediate/unsolicited data: failing the command");
                let r = scsi_response(
                    c.itt,
                    status::CHECK_CONDITION,
                    Some(&Sense::new(0x0b, 0x0c, 0x0d).encode(false)),
                    Residual::default(),
                    0,
                );
                self.shared.send(r);
                self.complete_request();
            }
        }
    }

    fn send_r2ts(&mut self, w: &mut PendingWrite) {
        for r in w.transfer.next_r2ts() {
            self.shared.send(pdu(
                Bhs::R2t(wire::R2t {
                    lun: 0,
                    itt: w.ready.itt,
                    ttt: r.ttt,
                    r2t_sn: r.r2t_sn,
                    buffer_offset: r.offset,
                    desired_data_transfer_length: r.length,
                    ..Default::default()
                }),
                Bytes::new(),
            ));
        }
    }

    fn start_write(&mut self, w: PendingWrite) {
        let PendingWrite {
            transfer,
            mut ready,
        } = w;
        ready.r2t_count = transfer.r2t_count();
        ready.cmd.data_out = transfer.into_data();
        submit(&self.shared, ready);
    }

    /// Answer a command that never started with `st` (and sense) and free its slot.
    fn fail_command(&mut self, itt: u32, st: u8, sense: Option<Sense>) {
        let sense = sense.map(|s| s.encode(false));
        self.shared.send(scsi_response(
            itt,
            st,
            sense.as_ref(),
            Residual::default(),
            0,
        ));
        self.complete_request();
    }

    fn fail_write(&mut self, w: PendingWrite, key: u8, asc: u8, ascq: u8) {
        let r = scsi_response(
            w.ready.itt,
            status::CHECK_CONDITION,
            Some(&Sense::new(key, asc, ascq).encode(false)),
            Residual::default(),
            w.transfer.r2t_count(),
        );
        self.shared.send(r);
        self.complete_request();
    }

    fn on_data_out(&mut self, p: Pdu) {
        let Bhs::DataOut(d) = &p.bhs else { return };
        let Some(mut w) = self.writes.remove(&d.itt) else {
            warn!(itt = d.itt, "Data-Out for an unknown task: rejecting");
            self.shared.send(reject(reject_reason::PROTOCOL_ERROR, &p));
            return;
        };
        match w
            .transfer
            .on_data_out(d.ttt, d.data_sn, d.buffer_offset, &p.data, d.final_)
        {
            Ok(()) => {
                self.send_r2ts(&mut w);
                if w.transfer.is_complete() {
                    self.start_write(w);
                } else {
                    self.writes.insert(d.itt, w);
                }
            }
            Err(e) => {
                // ERL 0 cannot recover a data sequence: reject the PDU, fail the task.
                warn!(itt = d.itt, error = %e, "invalid Data-Out: rejecting and failing the command");
                self.shared.send(reject(reject_reason::PROTOCOL_ERROR, &p));
                self.fail_write(w, 0x0b, 0x0c, 0x0d);
            }
        }
    }

    async fn on_tmf(&mut self, t: &wire::TaskMgmtRequest) -> u8 {
        const COMPLETE: u8 = 0;
        const NO_TASK: u8 = 1;
        const NO_LUN: u8 = 2;
        const NOT_SUPPORTED: u8 = 5;
        const REJECTED: u8 = 255;
        if self.is_discovery() {
            return REJECTED;
        }
        let lun = decode_lun(t.lun).unwrap_or(u64::MAX);
        let lun_exists = self.shared.lun_map.get(lun).is_some();
        let function = t.function & 0x7f;
        info!(function, lun, initiator = %self.outcome.initiator_name, "task management request");
        match function {
            1 => {
                // ABORT TASK
                let rtt = t.referenced_task_tag;
                if self.writes.remove(&rtt).is_some() {
                    self.complete_request();
                    return COMPLETE;
                }
                let waits = {
                    let mut core = self.shared.core();
                    let removed = core.tasks.remove_waiting(|r| r.itt == rtt);
                    if !removed.is_empty() {
                        if let Some(a) = core.active.remove(&rtt) {
                            a.done.set();
                        }
                        core.window.complete();
                        return COMPLETE;
                    }
                    match core.active.get_mut(&rtt) {
                        Some(a) => {
                            a.aborted = true;
                            vec![a.done.clone()]
                        }
                        None => Vec::new(),
                    }
                };
                if waits.is_empty() {
                    // Already completed (or never seen): RFC 7143 §11.6.1.
                    return NO_TASK;
                }
                for w in waits {
                    w.wait().await;
                }
                COMPLETE
            }
            2 | 4 | 5 => {
                // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
                if !lun_exists {
                    return NO_LUN;
                }
                let itts: Vec<u32> = self
                    .writes
                    .iter()
                    .filter(|(_, w)| w.ready.cmd.lun == lun)
                    .map(|(i, _)| *i)
                    .collect();
                for i in itts {
                    self.writes.remove(&i);
                    self.complete_request();
                }
                for w in abort_tasks(&self.shared, |l| l == lun) {
                    w.wait().await;
                }
                if function == 5 {
                    if let Some(lu) = self.shared.lun_map.get(lun) {
                        lu.reset();
                    }
                }
                COMPLETE
            }
            6 | 7 => {
                // TARGET WARM / COLD RESET
                let n = self.writes.len();
                self.writes.clear();
                for _ in 0..n {
                    self.complete_request();
                }
                for w in abort_tasks(&self.shared, |_| true) {
                    w.wait().await;
                }
                for lu in &self.shared.luns {
                    lu.reset();
                }
                COMPLETE
            }
            3 => NOT_SUPPORTED, // CLEAR ACA: NACA is not supported
            8 => 4,             // TASK REASSIGN: allegiance reassignment needs ERL 2
            _ => REJECTED,
        }
    }

    fn on_text(&mut self, t: wire::TextRequest, data: Bytes) {
        let max = self
            .outcome
            .connection
            .initiator_max_recv_data_segment_length
            .max(512) as usize;
        let body: Bytes = if t.ttt != RESERVED_TAG {
            match self.text_pending.take() {
                Some((ttt, rest)) if ttt == t.ttt => rest,
                _ => {
                    warn!(ttt = t.ttt, "Text continuation for an unknown transfer tag");
                    self.shared.send(reject(
                        reject_reason::INVALID_PDU_FIELD,
                        &pdu(Bhs::TextRequest(t.clone()), Bytes::new()),
                    ));
                    return;
                }
            }
        } else {
            let pairs = match wire::text::parse_text(&data) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "malformed text request");
                    self.shared.send(reject(
                        reject_reason::PROTOCOL_ERROR,
                        &pdu(Bhs::TextRequest(t.clone()), Bytes::new()),
                    ));
                    return;
                }
            };
            let mut resp: Vec<(String, String)> = Vec::new();
            for (k, v) in pairs {
                if k == "SendTargets" {
                    resp.extend(self.send_targets(&v));
                } else {
                    resp.push((k, "NotUnderstood".into()));
                }
            }
            wire::text::encode_text(&resp)
        };
        let (chunk, rest) = if body.len() > max {
            (body.slice(..max), Some(body.slice(max..)))
        } else {
            (body, None)
        };
        let ttt = match rest {
            Some(r) => {
                let ttt = self.alloc_ttt();
                self.text_pending = Some((ttt, r));
                ttt
            }
            None => RESERVED_TAG,
        };
        self.shared.send(pdu(
            Bhs::TextResponse(wire::TextResponse {
                final_: ttt == RESERVED_TAG,
                continue_: ttt != RESERVED_TAG,
                lun: t.lun,
                itt: t.itt,
                ttt,
                ..Default::default()
            }),
            chunk,
        ));
    }

    /// SendTargets (RFC 7143 Appendix C): targets this initiator may see, with portals.
    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let init = &self.outcome.initiator_name;
        let mut out = Vec::new();
        for t in &self.rt.targets {
            let wanted = match which {
                "All" => self.is_discovery(),
                "" => self
                    .outcome
                    .target_name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&t.name)),
                name => name.eq_ignore_ascii_case(&t.name),
            };
            if !wanted || !t.admits(init) {
                continue;
            }
            out.push(("TargetName".to_string(), t.name.clone()));
            for (addr, tpgt) in &t.portals {
                let a = if addr.ip().is_unspecified() {
                    SocketAddr::new(self.local.ip(), addr.port())
                } else {
                    *addr
                };
                let s = match a {
                    SocketAddr::V4(v) => format!("{}:{},{}", v.ip(), v.port(), tpgt),
                    SocketAddr::V6(v) => format!("[{}]:{},{}", v.ip(), v.port(), tpgt),
                };
                out.push(("TargetAddress".to_string(), s));
            }
        }
        out
    }
}

fn bhs_name(b: &Bhs) -> &'static str {
    match b {
        Bhs::NopIn(_) => "NOP-In",
        Bhs::ScsiResponse(_) => "SCSI Response",
        Bhs::TaskMgmtResponse(_) => "Task Management Response",
        Bhs::LoginResponse(_) => "Login Response",
        Bhs::LoginRequest(_) => "Login Request",
        Bhs::TextResponse(_) => "Text Response",
        Bhs::DataIn(_) => "Data-In",
        Bhs::LogoutResponse(_) => "Logout Response",
        Bhs::R2t(_) => "R2T",
        Bhs::AsyncMessage(_) => "Async Message",
        Bhs::Reject(_) => "Reject",
        _ => "request",
    }
}

/// Fill in StatSN, ExpCmdSN and MaxCmdSN at send time (RFC 7143 §4.2.2.2): responses
/// that consume a StatSN get the next one; others carry the current value.
fn stamp(pdu: &mut Pdu, stat_sn: &mut u32, exp: u32, max: u32) {
    macro_rules! consume {
        ($h:expr) => {{
            $h.stat_sn = *stat_sn;
            *stat_sn = stat_sn.wrapping_add(1);
            $h.exp_cmd_sn = exp;
            $h.max_cmd_sn = max;
        }};
    }
    match &mut pdu.bhs {
        Bhs::ScsiResponse(h) => consume!(h),
        Bhs::TaskMgmtResponse(h) => consume!(h),
        Bhs::TextResponse(h) => consume!(h),
        Bhs::LogoutResponse(h) => consume!(h),
        Bhs::Reject(h) => {
            // Reject carries the next StatSN without consuming it? RFC 7143 §11.17.3: it
            // does consume one (it is a status-bearing response); initiators accept both.
            h.stat_sn = *stat_sn;
            *stat_sn = stat_sn.wrapping_add(1);
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
            h.data_sn = 0;
        }
        Bhs::NopIn(h) => {
            h.stat_sn = *stat_sn;
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
            if h.itt != RESERVED_TAG {
                *stat_sn = stat_sn.wrapping_add(1);
            }
        }
        Bhs::DataIn(h) => {
            if h.status_present {
                h.stat_sn = *stat_sn;
                *stat_sn = stat_sn.wrapping_add(1);
            }
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
        }
        Bhs::R2t(h) => {
            h.stat_sn = *stat_sn;
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
        }
        Bhs::AsyncMessage(h) => {
            h.stat_sn = *stat_sn;
            *stat_sn = stat_sn.wrapping_add(1);
            h.exp_cmd_sn = exp;
            h.max_cmd_sn = max;
        }
        _ => {}
    }
}

/// Data segments at least this long are sent from their own buffer (vectored write)
/// instead of being copied behind their header: a Data-In payload is never copied.
const COPY_DATA_MAX: usize = 2048;
/// Buffers handed to one writev.
const MAX_IOVECS: usize = 64;

/// Write `chunks` in order with as few writev calls as the socket allows.
async fn write_chunks(wr: &mut OwnedWriteHalf, chunks: &mut [Bytes]) -> std::io::Result<()> {
    use bytes::Buf;
    let mut i = 0;
    while i < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[i..]
            .iter()
            .take(MAX_IOVECS)
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < chunks.len() {
            let len = chunks[i].len();
            if n >= len {
                n -= len;
                i += 1;
            } else {
                chunks[i].advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    digests: DigestConfig,
    mut stat_sn: u32,
    (stall_after, stalled): (Duration, watch::Sender<bool>),
) {
    // Headers and small PDUs accumulate in `small`; large payloads join `chunks` by
    // reference between the pieces of `small` that surround them.
    let mut small = BytesMut::with_capacity(64 * 1024);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut closing = false;
    let mut releases: Vec<BufferPermit> = Vec::new();
    while let Some(first) = rx.recv().await {
        chunks.clear();
        let mut queued = 0usize;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdu(mut p) => {
                    let (exp, max) = {
                        let mut core = shared.core();
                        let exp = core.window.exp_cmd_sn();
                        (exp, core.window.max_cmd_sn())
                    };
                    stamp(&mut p, &mut stat_sn, exp, max);
                    if p.data.len() >= COPY_DATA_MAX {
                        let trailer = wire::codec::encode_parts(&p, digests, &mut small);
                        chunks.push(small.split().freeze());
                        queued += p.data.len();
                        chunks.push(p.data);
                        small.extend_from_slice(trailer.as_slice());
                    } else {
                        wire::encode(&p, digests, &mut small);
                    }
                }
                Out::Release(b) => releases.push(b),
                Out::Close => closing = true,
            }
            if closing || queued + small.len() >= 1 << 20 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        match tokio::time::timeout(stall_after, write_chunks(&mut wr, &mut chunks)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "write failed; connection is gone");
                break;
            }
            Err(_) => {
                // A peer that does not read would hold its responses (and their
                // buffer budget) forever.
                let _ = stalled.send(true);
                break;
            }
        }
        if small.capacity() < 16 * 1024 {
            // split() hands the written bytes away; start the next batch on fresh room.
            small.reserve(64 * 1024);
        }
        releases.clear();
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_decoding() {
        assert_eq!(decode_lun(0), Some(0));
        assert_eq!(decode_lun(0x0001_0000_0000_0000), Some(1));
        assert_eq!(decode_lun(0x4105_0000_0000_0000), Some(0x105));
        assert_eq!(decode_lun(0x8000_0000_0000_0000), None);
        assert_eq!(decode_lun(0x0101_0000_0000_0000), None, "bus 1 is not ours");
    }

    #[test]
    fn stamping_consumes_statsn_only_for_status() {
        let mut sn = 10;
        let mut r2t = pdu(Bhs::R2t(wire::R2t::default()), Bytes::new());
        stamp(&mut r2t, &mut sn, 5, 9);
        assert_eq!(sn, 10);
        let mut resp = pdu(
            Bhs::ScsiResponse(wire::ScsiResponse::default()),
            Bytes::new(),
        );
        stamp(&mut resp, &mut sn, 5, 9);
        assert_eq!(sn, 11);
        let Bhs::ScsiResponse(h) = &resp.bhs else {
            unreachable!()
        };
        assert_eq!((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn), (10, 5, 9));
        let mut ping = pdu(
            Bhs::NopIn(wire::NopIn {
                itt: RESERVED_TAG,
                ..Default::default()
            }),
            Bytes::new(),
        );
        stamp(&mut ping, &mut sn, 5, 9);
        assert_eq!(sn, 11, "an unsolicited NOP-In does not advance StatSN");
        let mut din = pdu(Bhs::DataIn(wire::DataIn::default()), Bytes::new());
        stamp(&mut din, &mut sn, 5, 9);
        assert_eq!(sn, 11);
    }
}
