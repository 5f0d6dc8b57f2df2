//! The session: one TCP connection after login, a reader task that routes target PDUs
//! by Initiator Task Tag, a writer task that stamps ExpStatSN and sends, and a shared
//! state (CmdSN window, outstanding tasks) behind a mutex that is never held across an
//! await.

use super::login::{InitiatorLogin, LoginParams, LoginResult, LoginStep};
use super::scsi::{encode_lun, ScsiResult};
use super::{random_isid, InitiatorConfig, InitiatorError};
use crate::iscsi::cmdsn::{sn_le, sn_lt};
use crate::wire::text::{encode_text, parse_text};
use crate::wire::{self, Ahs, Bhs, DigestConfig, Pdu, PduDecoder, WireError, RESERVED_TAG};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Largest data segment accepted during login (before MaxRecvDataSegmentLength applies).
const LOGIN_MAX_SEGMENT: u32 = 64 * 1024;
/// Longest CDB an Extended-CDB AHS can carry here (16 in the BHS + 244 in the AHS).
const MAX_CDB_LEN: usize = 260;

/// TMF function codes (RFC 7143 §11.5.1).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    /// Response "Function complete".
    pub const COMPLETE: u8 = 0;
}

type Reply<T> = oneshot::Sender<Result<T, InitiatorError>>;

/// A SCSI command waiting for its status.
struct ScsiTask {
    reply: Reply<ScsiResult>,
    lun: u64,
    /// Submission order, for deciding what a task management function covered.
    seq: u64,
    lun_field: u64,
    data_out: Bytes,
    data_in_len: u32,
    data_in: BytesMut,
    /// End of the furthest Data-In received.
    data_in_end: usize,
}

enum Pending {
    Scsi(Box<ScsiTask>),
    Nop(Reply<()>),
    Tmf {
        reply: Reply<u8>,
        function: u8,
        lun: u64,
        referenced: u32,
        seq: u64,
    },
    Text {
        reply: Reply<Bytes>,
        acc: BytesMut,
    },
    Logout(Reply<()>),
}

impl Pending {
    fn fail(self, e: InitiatorError) {
        // The requester may have gone away; nobody to tell then.
        let _ = match self {
            Pending::Scsi(t) => t.reply.send(Err(e)).map_err(drop),
            Pending::Nop(r) | Pending::Logout(r) => r.send(Err(e)).map_err(drop),
            Pending::Tmf { reply, .. } => reply.send(Err(e)).map_err(drop),
            Pending::Text { reply, .. } => reply.send(Err(e)).map_err(drop),
        };
    }
}

struct State {
    /// CmdSN for the next non-immediate request.
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    next_seq: u64,
    pending: HashMap<u32, Pending>,
    closed: bool,
}

impl State {
    fn alloc_itt(&mut self) -> u32 {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG && !self.pending.contains_key(&itt) {
                return itt;
            }
        }
    }

    fn window_open(&self) -> bool {
        sn_le(self.cmd_sn, self.max_cmd_sn)
    }

    fn scsi_outstanding(&self) -> bool {
        self.pending.values().any(|p| matches!(p, Pending::Scsi(_)))
    }
}

enum Out {
    Pdu(Pdu),
    Close,
}

struct Shared {
    state: Mutex<State>,
    out: mpsc::UnboundedSender<Out>,
    /// Signalled when MaxCmdSN moves or the connection closes.
    window: Notify,
    /// Signalled when a request completes (logout waits for SCSI tasks to drain).
    progress: Notify,
    exp_stat_sn: AtomicU32,
    negotiated: LoginParams,
    isid: [u8; 6],
    initiator_name: String,
    target_name: String,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, pdu: Pdu) {
        // Fails only when the writer is gone, which the reader reports as connection loss.
        let _ = self.out.send(Out::Pdu(pdu));
    }

    /// Take note of a target PDU's StatSN / ExpCmdSN / MaxCmdSN.
    fn note_sequence(&self, bhs: &Bhs) {
        let (stat_sn, exp, max) = match bhs {
            Bhs::ScsiResponse(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            Bhs::TaskMgmtResponse(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            Bhs::TextResponse(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            Bhs::LogoutResponse(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            Bhs::Reject(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            Bhs::AsyncMessage(h) => (Some(h.stat_sn), h.exp_cmd_sn, h.max_cmd_sn),
            // An unsolicited NOP-In carries the next StatSN without consuming it.
            Bhs::NopIn(h) => (
                (h.itt != RESERVED_TAG).then_some(h.stat_sn),
                h.exp_cmd_sn,
                h.max_cmd_sn,
            ),
            Bhs::DataIn(h) => (
                h.status_present.then_some(h.stat_sn),
                h.exp_cmd_sn,
                h.max_cmd_sn,
            ),
            Bhs::R2t(h) => (None, h.exp_cmd_sn, h.max_cmd_sn),
            _ => return,
        };
        if let Some(sn) = stat_sn {
            let next = sn.wrapping_add(1);
            let _ = self
                .exp_stat_sn
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                    sn_lt(cur, next).then_some(next)
                });
        }
        // RFC 7143 §4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1; never move either backwards.
        if sn_lt(max, exp.wrapping_sub(1)) {
            return;
        }
        let mut st = self.state();
        let mut opened = false;
        if sn_lt(st.exp_cmd_sn, exp) {
            st.exp_cmd_sn = exp;
        }
        if sn_lt(st.max_cmd_sn, max) {
            st.max_cmd_sn = max;
            opened = true;
        }
        drop(st);
        if opened {
            self.window.notify_waiters();
        }
    }

    fn take(&self, itt: u32) -> Option<Pending> {
        let p = self.state().pending.remove(&itt);
        if p.is_some() {
            self.progress.notify_waiters();
        }
        p
    }

    /// End of the connection: every waiter fails.
    fn close(&self, why: &str) {
        let drained: Vec<Pending> = {
            let mut st = self.state();
            if st.closed {
                return;
            }
            st.closed = true;
            st.pending.drain().map(|(_, p)| p).collect()
        };
        if drained.is_empty() {
            debug!(target = %self.target_name, why, "connection closed");
        } else {
            warn!(target = %self.target_name, why, failed = drained.len(), "connection lost with requests outstanding");
        }
        for p in drained {
            p.fail(InitiatorError::ConnectionLost);
        }
        let _ = self.out.send(Out::Close);
        self.window.notify_waiters();
        self.progress.notify_waiters();
    }

    fn on_pdu(&self, pdu: Pdu) {
        self.note_sequence(&pdu.bhs);
        let Pdu { bhs, data, .. } = pdu;
        match bhs {
            Bhs::DataIn(h) => self.on_data_in(h, data),
            Bhs::ScsiResponse(h) => self.on_scsi_response(h, data),
            Bhs::R2t(h) => self.on_r2t(h),
            Bhs::NopIn(h) => self.on_nop_in(h, data),
            Bhs::TaskMgmtResponse(h) => self.on_tmf_response(h),
            Bhs::TextResponse(h) => self.on_text_response(h, data),
            Bhs::LogoutResponse(h) => match self.take(h.itt) {
                Some(Pending::Logout(r)) => {
                    let res = if h.response == 0 {
                        Ok(())
                    } else {
                        Err(InitiatorError::Protocol(format!(
                            "logout refused (response {})",
                            h.response
                        )))
                    };
                    let _ = r.send(res);
                }
                other => self.unexpected(h.itt, other, "Logout Response"),
            },
            Bhs::Reject(h) => {
                // The data segment is the rejected PDU's header; its ITT names the request.
                let itt = data
                    .get(16..20)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                warn!(reason = h.reason, ?itt, "target rejected a PDU");
                if let Some(p) = itt.and_then(|i| self.take(i)) {
                    p.fail(InitiatorError::Rejected { reason: h.reason });
                }
            }
            Bhs::AsyncMessage(h) => match h.async_event {
                0 => {
                    info!(lun = h.lun, sense = %hex::encode(&data), "target reports a SCSI asynchronous event")
                }
                1 => warn!("target requests logout"),
                2 | 3 => warn!(event = h.async_event, "target will drop the connection"),
                4 => info!("target requests parameter renegotiation (ignored)"),
                e => debug!(event = e, "async message"),
            },
            other => warn!(opcode = ?other.opcode(), "unexpected PDU from the target: ignored"),
        }
    }

    fn unexpected(&self, itt: u32, got: Option<Pending>, what: &str) {
        match got {
            Some(p) => {
                warn!(itt, what, "response does not match the request: failing it");
                p.fail(InitiatorError::Protocol(format!("unexpected {what}")));
            }
            None => debug!(itt, what, "response for no outstanding request: ignored"),
        }
    }

    fn with_scsi<R>(&self, itt: u32, f: impl FnOnce(&mut ScsiTask) -> R) -> Option<R> {
        let mut st = self.state();
        match st.pending.get_mut(&itt) {
            Some(Pending::Scsi(t)) => Some(f(t)),
            _ => None,
        }
    }

    fn on_data_in(&self, h: wire::DataIn, data: Bytes) {
        let copied = self.with_scsi(h.itt, |t| {
            let off = h.buffer_offset as usize;
            let end = off.checked_add(data.len())?;
            if end > t.data_in_len as usize {
                return None;
            }
            if t.data_in.len() < t.data_in_len as usize {
                t.data_in.resize(t.data_in_len as usize, 0);
            }
            t.data_in[off..end].copy_from_slice(&data);
            t.data_in_end = t.data_in_end.max(end);
            Some(())
        });
        match copied {
            None if self.with_scsi(h.itt, |_| ()).is_none() => {
                debug!(itt = h.itt, "Data-In for no outstanding command: ignored");
                return;
            }
            None => {
                warn!(
                    itt = h.itt,
                    offset = h.buffer_offset,
                    len = data.len(),
                    "Data-In beyond the expected length"
                );
                if let Some(p) = self.take(h.itt) {
                    p.fail(InitiatorError::Protocol(
                        "Data-In beyond the expected length".into(),
                    ));
                }
                return;
            }
            Some(_) => {}
        }
        if h.status_present {
            let residual = residual(h.underflow, h.overflow, h.residual_count);
            self.complete_scsi(h.itt, 0, h.status, None, residual);
        }
    }

    fn on_scsi_response(&self, h: wire::ScsiResponse, data: Bytes) {
        // Sense data: a 2-byte SenseLength, then the sense bytes.
        let sense = match data.get(..2) {
            Some(l) => {
                let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
                let end = (2 + len).min(data.len());
                (len > 0).then(|| data.slice(2..end))
            }
            None => None,
        };
        let residual = residual(h.underflow, h.overflow, h.residual_count);
        self.complete_scsi(h.itt, h.response, h.status, sense, residual);
    }

    fn complete_scsi(
        &self,
        itt: u32,
        response: u8,
        status: u8,
        sense: Option<Bytes>,
        residual: i64,
    ) {
        let Some(p) = self.take(itt) else {
            debug!(itt, "status for no outstanding command: ignored");
            return;
        };
        let Pending::Scsi(t) = p else {
            return self.unexpected(itt, Some(p), "SCSI status");
        };
        if response != 0 {
            let _ = t.reply.send(Err(InitiatorError::TargetFailure(response)));
            return;
        }
        let mut d = t.data_in;
        d.truncate(t.data_in_end);
        let _ = t.reply.send(Ok(ScsiResult {
            status,
            sense,
            data: d.freeze(),
            residual,
        }));
    }

    fn on_r2t(&self, h: wire::R2t) {
        let mrdsl = self
            .negotiated
            .connection
            .target_max_recv_data_segment_length;
        let plan = self.with_scsi(h.itt, |t| {
            let off = h.buffer_offset as usize;
            let end = off.checked_add(h.desired_data_transfer_length as usize)?;
            (end <= t.data_out.len() && h.desired_data_transfer_length > 0)
                .then(|| (t.lun_field, t.data_out.slice(off..end)))
        });
        match plan {
            Some(Some((lun_field, data))) => {
                for p in data_outs(h.itt, h.ttt, lun_field, &data, h.buffer_offset, mrdsl) {
                    self.send(p);
                }
            }
            Some(None) => {
                warn!(
                    itt = h.itt,
                    offset = h.buffer_offset,
                    len = h.desired_data_transfer_length,
                    "R2T outside the command's data"
                );
                if let Some(p) = self.take(h.itt) {
                    p.fail(InitiatorError::Protocol(
                        "R2T outside the command's data".into(),
                    ));
                }
            }
            None => debug!(itt = h.itt, "R2T for no outstanding command: ignored"),
        }
    }

    fn on_nop_in(&self, h: wire::NopIn, data: Bytes) {
        if h.itt == RESERVED_TAG {
            if h.ttt != RESERVED_TAG {
                // A target ping: answer at once, immediate, echoing its tag and data.
                let cmd_sn = self.state().cmd_sn;
                let max = self
                    .negotiated
                    .connection
                    .target_max_recv_data_segment_length as usize;
                let echo = data.slice(..data.len().min(max));
                self.send(Pdu::with_data(
                    Bhs::NopOut(wire::NopOut {
                        immediate: true,
                        lun: h.lun,
                        itt: RESERVED_TAG,
                        ttt: h.ttt,
                        cmd_sn,
                        exp_stat_sn: 0,
                    }),
                    echo,
                ));
            }
            return;
        }
        match self.take(h.itt) {
            Some(Pending::Nop(r)) => {
                let _ = r.send(Ok(()));
            }
            other => self.unexpected(h.itt, other, "NOP-In"),
        }
    }

    fn on_tmf_response(&self, h: wire::TaskMgmtResponse) {
        let Some(p) = self.take(h.itt) else {
            return debug!(itt = h.itt, "TMF response for no outstanding request");
        };
        let Pending::Tmf {
            reply,
            function,
            lun,
            referenced,
            seq,
        } = p
        else {
            return self.unexpected(h.itt, Some(p), "Task Management Response");
        };
        if h.response == tmf::COMPLETE {
            // The target suppresses the status of tasks it aborted: fail them here.
            let aborted: Vec<Pending> = {
                let mut st = self.state();
                let itts: Vec<u32> = st
                    .pending
                    .iter()
                    .filter(|(itt, p)| match p {
                        Pending::Scsi(t) => match function {
                            tmf::ABORT_TASK => **itt == referenced,
                            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                                t.lun == lun && t.seq < seq
                            }
                            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => t.seq < seq,
                            _ => false,
                        },
                        _ => false,
                    })
                    .map(|(itt, _)| *itt)
                    .collect();
                itts.iter().filter_map(|i| st.pending.remove(i)).collect()
            };
            if !aborted.is_empty() {
                debug!(
                    function,
                    count = aborted.len(),
                    "tasks aborted by task management"
                );
                self.progress.notify_waiters();
            }
            for p in aborted {
                p.fail(InitiatorError::Aborted);
            }
        }
        let _ = reply.send(Ok(h.response));
    }

    fn on_text_response(&self, h: wire::TextResponse, data: Bytes) {
        let more = {
            let mut st = self.state();
            match st.pending.get_mut(&h.itt) {
                Some(Pending::Text { acc, .. }) => {
                    acc.extend_from_slice(&data);
                    if h.continue_ || !h.final_ {
                        // Ask for the rest with the target's transfer tag.
                        let cmd_sn = st.cmd_sn;
                        st.cmd_sn = st.cmd_sn.wrapping_add(1);
                        Some(cmd_sn)
                    } else {
                        None
                    }
                }
                _ => {
                    drop(st);
                    let got = self.take(h.itt);
                    return self.unexpected(h.itt, got, "Text Response");
                }
            }
        };
        if let Some(cmd_sn) = more {
            self.send(Pdu::new(Bhs::TextRequest(wire::TextRequest {
                immediate: false,
                final_: true,
                continue_: false,
                lun: 0,
                itt: h.itt,
                ttt: h.ttt,
                cmd_sn,
                exp_stat_sn: 0,
            })));
            return;
        }
        if let Some(Pending::Text { reply, acc }) = self.take(h.itt) {
            let _ = reply.send(Ok(acc.freeze()));
        }
    }
}

fn residual(underflow: bool, overflow: bool, count: u32) -> i64 {
    if underflow {
        i64::from(count)
    } else if overflow {
        -i64::from(count)
    } else {
        0
    }
}

/// Data-Out PDUs for one burst: `data` starts at `offset`, at most `mrdsl` bytes each,
/// DataSN from 0, F on the last.
fn data_outs(itt: u32, ttt: u32, lun: u64, data: &Bytes, offset: u32, mrdsl: u32) -> Vec<Pdu> {
    let seg = mrdsl.max(512) as usize;
    let n = data.len().div_ceil(seg);
    (0..n)
        .map(|i| {
            let start = i * seg;
            let end = (start + seg).min(data.len());
            Pdu::with_data(
                Bhs::DataOut(wire::DataOut {
                    final_: i + 1 == n,
                    lun,
                    itt,
                    ttt,
                    exp_stat_sn: 0,
                    data_sn: i as u32,
                    buffer_offset: offset + start as u32,
                }),
                data.slice(start..end),
            )
        })
        .collect()
}

/// One PDU off the socket ([`wire::read_pdu`]), in the initiator's error type.
async fn read_pdu(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    dec: &mut PduDecoder,
) -> Result<Pdu, InitiatorError> {
    Ok(wire::read_pdu(rd, buf, dec).await?)
}

async fn reader_task(
    shared: Arc<Shared>,
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    mut dec: PduDecoder,
) {
    let why = loop {
        match read_pdu(&mut rd, &mut buf, &mut dec).await {
            Ok(p) => shared.on_pdu(p),
            Err(InitiatorError::Wire(WireError::DataDigest { bhs })) => {
                // At ErrorRecoveryLevel 0 the command whose data was damaged fails.
                warn!(itt = bhs.itt(), "data digest error");
                if let Some(p) = shared.take(bhs.itt()) {
                    p.fail(InitiatorError::Protocol("data digest error".into()));
                }
            }
            Err(InitiatorError::ConnectionLost) => break "closed by the target".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    shared.close(&why);
}

async fn writer_task(
    shared: Arc<Shared>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    digests: DigestConfig,
) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdu(mut p) => {
                    let exp = shared.exp_stat_sn.load(Ordering::SeqCst);
                    set_exp_stat_sn(&mut p.bhs, exp);
                    wire::encode(&p, digests, &mut buf);
                }
                Out::Close => {
                    closing = true;
                    break;
                }
            }
            // Batch what is queued into one write, up to a bound.
            if buf.len() >= 1 << 20 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            if let Err(e) = wr.write_all(&buf).await {
                shared.close(&format!("write failed: {e}"));
                break;
            }
        }
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

fn set_exp_stat_sn(bhs: &mut Bhs, exp: u32) {
    match bhs {
        Bhs::NopOut(b) => b.exp_stat_sn = exp,
        Bhs::ScsiCommand(b) => b.exp_stat_sn = exp,
        Bhs::TaskMgmtRequest(b) => b.exp_stat_sn = exp,
        Bhs::TextRequest(b) => b.exp_stat_sn = exp,
        Bhs::DataOut(b) => b.exp_stat_sn = exp,
        Bhs::LogoutRequest(b) => b.exp_stat_sn = exp,
        Bhs::SnackRequest(b) => b.exp_stat_sn = exp,
        _ => {}
    }
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
        self.shared.close("session dropped");
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

async fn write_login_pdu(wr: &mut OwnedWriteHalf, pdu: &Pdu) -> Result<(), InitiatorError> {
    let mut out = BytesMut::new();
    wire::encode(pdu, DigestConfig::default(), &mut out);
    wr.write_all(&out).await?;
    Ok(())
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
        let timeout = cfg.login_timeout;
        let work = async {
            let stream = TcpStream::connect(cfg.addr).await?;
            let _ = stream.set_nodelay(true);
            let (mut rd, mut wr) = stream.into_split();
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut dec = PduDecoder::new(LOGIN_MAX_SEGMENT);
            let mut login = InitiatorLogin::new(cfg.clone(), discovery, isid);
            let mut req = login.start();
            let result = loop {
                write_login_pdu(&mut wr, &req).await?;
                let resp = read_pdu(&mut rd, &mut buf, &mut dec).await?;
                match login.on_response(&resp)? {
                    LoginStep::Send(p) => req = p,
                    LoginStep::Done(r) => break r,
                }
            };
            Ok::<_, InitiatorError>((rd, wr, buf, dec, result))
        };
        let (rd, wr, buf, mut dec, result) = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| InitiatorError::Timeout)??;
        let LoginResult {
            params: negotiated,
            cmd_sn,
            exp_stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            ..
        } = *result;
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
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cmd_sn,
                exp_cmd_sn,
                max_cmd_sn,
                next_itt: 1,
                next_seq: 0,
                pending: HashMap::new(),
                closed: false,
            }),
            out: tx,
            window: Notify::new(),
            progress: Notify::new(),
            exp_stat_sn: AtomicU32::new(exp_stat_sn),
            negotiated,
            isid,
            initiator_name: cfg.initiator_name.clone(),
            target_name: cfg.target_name.clone(),
        });
        let reader = tokio::spawn(reader_task(shared.clone(), rd, buf, dec));
        let writer = tokio::spawn(writer_task(shared.clone(), wr, rx, digests));
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
        self.shared().state().closed
    }

    /// Queue a non-immediate request once the CmdSN window admits it. `build` gets the
    /// ITT and CmdSN and returns the PDUs to send plus the pending entry.
    async fn submit_ordered(
        &self,
        mut build: impl FnMut(u32, u32, u64) -> (Vec<Pdu>, Pending),
    ) -> Result<(u32, u32), InitiatorError> {
        let sh = self.shared();
        loop {
            let opened = sh.window.notified();
            {
                let mut st = sh.state();
                if st.closed {
                    return Err(InitiatorError::ConnectionLost);
                }
                if st.window_open() {
                    let itt = st.alloc_itt();
                    let cmd_sn = st.cmd_sn;
                    st.cmd_sn = st.cmd_sn.wrapping_add(1);
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let (pdus, pending) = build(itt, cmd_sn, seq);
                    st.pending.insert(itt, pending);
                    // Sent under the lock so PDUs leave in CmdSN order.
                    for p in pdus {
                        sh.send(p);
                    }
                    return Ok((itt, cmd_sn));
                }
            }
            debug!("CmdSN window closed: waiting for MaxCmdSN to advance");
            opened.await;
        }
    }

    /// Queue an immediate request (it carries the current CmdSN without taking it).
    fn submit_immediate(
        &self,
        build: impl FnOnce(u32, u32, u64) -> (Pdu, Pending),
    ) -> Result<(), InitiatorError> {
        let sh = self.shared();
        let mut st = sh.state();
        if st.closed {
            return Err(InitiatorError::ConnectionLost);
        }
        let itt = st.alloc_itt();
        let seq = st.next_seq;
        st.next_seq += 1;
        let (pdu, pending) = build(itt, st.cmd_sn, seq);
        st.pending.insert(itt, pending);
        sh.send(pdu);
        Ok(())
    }

    /// Send a SCSI command and return at once with a handle to its result.
    pub async fn submit(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<Task, InitiatorError> {
        if cdb.is_empty() || cdb.len() > MAX_CDB_LEN {
            return Err(InitiatorError::InvalidRequest(format!(
                "CDB of {} bytes",
                cdb.len()
            )));
        }
        let data_out = data_out.unwrap_or_default();
        if !data_out.is_empty() && data_in_len > 0 {
            return Err(InitiatorError::InvalidRequest(
                "bidirectional commands are not supported".into(),
            ));
        }
        let out_len = u32::try_from(data_out.len())
            .map_err(|_| InitiatorError::InvalidRequest("Data-Out larger than 4 GiB".into()))?;
        let mut cdb16 = [0u8; 16];
        let head = cdb.len().min(16);
        cdb16[..head].copy_from_slice(&cdb[..head]);
        let ahs = if cdb.len() > 16 {
            // Extended CDB AHS: a reserved byte, then the CDB bytes beyond 16.
            let mut a = BytesMut::with_capacity(1 + cdb.len() - 16);
            a.extend_from_slice(&[0]);
            a.extend_from_slice(&cdb[16..]);
            vec![Ahs {
                ahs_type: 1,
                data: a.freeze(),
            }]
        } else {
            Vec::new()
        };
        let n = &self.shared().negotiated;
        let (sp, mrdsl) = (&n.session, n.connection.target_max_recv_data_segment_length);
        let total = data_out.len();
        let imm = if sp.immediate_data {
            total
                .min(sp.first_burst_length as usize)
                .min(mrdsl as usize)
        } else {
            0
        };
        let unsolicited_end = if sp.initial_r2t {
            imm
        } else {
            total.min(sp.first_burst_length as usize).max(imm)
        };
        let lun_field = encode_lun(lun);
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let (itt, cmd_sn) = self
            .submit_ordered(|itt, cmd_sn, seq| {
                let cmd = Pdu {
                    bhs: Bhs::ScsiCommand(wire::ScsiCommand {
                        immediate: false,
                        final_: unsolicited_end == imm,
                        read: data_in_len > 0,
                        write: total > 0,
                        attr: 1, // SIMPLE
                        lun: lun_field,
                        itt,
                        expected_data_transfer_length: if total > 0 {
                            out_len
                        } else {
                            data_in_len
                        },
                        cmd_sn,
                        exp_stat_sn: 0,
                        cdb: cdb16,
                    }),
                    ahs: ahs.clone(),
                    data: data_out.slice(..imm),
                };
                let mut pdus = vec![cmd];
                if unsolicited_end > imm {
                    pdus.extend(data_outs(
                        itt,
                        RESERVED_TAG,
                        lun_field,
                        &data_out.slice(imm..unsolicited_end),
                        imm as u32,
                        mrdsl,
                    ));
                }
                let pending = Pending::Scsi(Box::new(ScsiTask {
                    // submit_ordered calls build exactly once.
                    reply: tx.take().unwrap_or_else(|| oneshot::channel().0),
                    lun,
                    seq,
                    lun_field,
                    data_out: data_out.clone(),
                    data_in_len,
                    data_in: BytesMut::new(),
                    data_in_end: 0,
                }));
                (pdus, pending)
            })
            .await?;
        Ok(Task {
            itt,
            cmd_sn,
            lun,
            rx,
        })
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
        let (tx, rx) = oneshot::channel();
        let start = Instant::now();
        self.submit_immediate(|itt, cmd_sn, _| {
            (
                Pdu::new(Bhs::NopOut(wire::NopOut {
                    immediate: true,
                    lun: 0,
                    itt,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn: 0,
                })),
                Pending::Nop(tx),
            )
        })?;
        rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))?;
        Ok(start.elapsed())
    }

    async fn task_management(
        &self,
        function: u8,
        lun: u64,
        referenced: u32,
        ref_cmd_sn: u32,
    ) -> Result<u8, InitiatorError> {
        let (tx, rx) = oneshot::channel();
        self.submit_immediate(|itt, cmd_sn, seq| {
            (
                Pdu::new(Bhs::TaskMgmtRequest(wire::TaskMgmtRequest {
                    immediate: true,
                    function,
                    lun: encode_lun(lun),
                    itt,
                    referenced_task_tag: referenced,
                    cmd_sn,
                    exp_stat_sn: 0,
                    ref_cmd_sn,
                    exp_data_sn: 0,
                })),
                Pending::Tmf {
                    reply: tx,
                    function,
                    lun,
                    referenced,
                    seq,
                },
            )
        })?;
        let r = rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))?;
        info!(function, lun, response = r, "task management done");
        Ok(r)
    }

    /// ABORT TASK for a task submitted with [`Session::submit`]. Returns the TMF response
    /// (0 = function complete; the task then fails with [`InitiatorError::Aborted`]).
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
        if body.len()
            > self
                .shared()
                .negotiated
                .connection
                .target_max_recv_data_segment_length as usize
        {
            return Err(InitiatorError::InvalidRequest(
                "text request too long".into(),
            ));
        }
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        self.submit_ordered(|itt, cmd_sn, _| {
            let p = Pdu::with_data(
                Bhs::TextRequest(wire::TextRequest {
                    immediate: false,
                    final_: true,
                    continue_: false,
                    lun: 0,
                    itt,
                    ttt: RESERVED_TAG,
                    cmd_sn,
                    exp_stat_sn: 0,
                }),
                body.clone(),
            );
            let pending = Pending::Text {
                reply: tx.take().unwrap_or_else(|| oneshot::channel().0),
                acc: BytesMut::new(),
            };
            (vec![p], pending)
        })
        .await?;
        let data = rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))?;
        Ok(parse_text(&data)?)
    }

    /// Wait for outstanding SCSI commands, then log out (close the session).
    pub async fn logout(self) -> Result<(), InitiatorError> {
        let sh = self.shared();
        loop {
            let progressed = sh.progress.notified();
            {
                let st = sh.state();
                if st.closed {
                    return Err(InitiatorError::ConnectionLost);
                }
                if !st.scsi_outstanding() {
                    break;
                }
            }
            progressed.await;
        }
        let (tx, rx) = oneshot::channel();
        self.submit_immediate(|itt, cmd_sn, _| {
            (
                Pdu::new(Bhs::LogoutRequest(wire::LogoutRequest {
                    immediate: true,
                    reason: 0,
                    itt,
                    cid: 0,
                    cmd_sn,
                    exp_stat_sn: 0,
                })),
                Pending::Logout(tx),
            )
        })?;
        rx.await.unwrap_or(Err(InitiatorError::ConnectionLost))?;
        debug!(target = %sh.target_name, "logged out");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_out_split() {
        let data = Bytes::from(vec![7u8; 10_000]);
        let p = data_outs(5, 9, 0, &data, 4096, 4096);
        assert_eq!(p.len(), 3);
        let offs: Vec<(u32, u32, bool, usize)> = p
            .iter()
            .map(|p| match &p.bhs {
                Bhs::DataOut(d) => (d.data_sn, d.buffer_offset, d.final_, p.data.len()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            offs,
            vec![
                (0, 4096, false, 4096),
                (1, 8192, false, 4096),
                (2, 12288, true, 1808)
            ]
        );
    }

    #[test]
    fn residual_sign() {
        assert_eq!(residual(true, false, 10), 10);
        assert_eq!(residual(false, true, 10), -10);
        assert_eq!(residual(false, false, 10), 0);
    }
}
