//! The target side of one full-feature-phase connection, sans-IO (quinn-proto style):
//! CmdSN admission, R2T/Data-Out collection, Data-In and status, the transport side of
//! task management (ITT to task, holding the TMF response until aborted tasks end),
//! Text/SendTargets, NOP, Reject and StatSN/ExpCmdSN/MaxCmdSN stamping.
//!
//! Inputs: [`TargetConnection::handle_pdu`], [`TargetConnection::handle_wire_error`],
//! [`TargetConnection::start_task`], [`TargetConnection::handle_outcome`],
//! [`TargetConnection::tmf_decided`], [`TargetConnection::abort_tasks`],
//! [`TargetConnection::handle_timeout`], [`TargetConnection::abort_all`].
//! Outputs: [`TargetConnection::poll_transmit`] (stamped PDUs, in send order),
//! [`TargetConnection::poll_event`] (tasks for the LU task sets, commands to execute,
//! TMFs to decide, buffer releases, close) and [`TargetConnection::poll_timeout`]. Time
//! is an input; nothing here blocks, spawns or reads a clock. SCSI semantics stay with
//! the caller: task ordering and which tasks a TMF aborts are the SCSI core's, commands
//! leave as CDB bytes and come back as status, sense and Data-In bytes.

mod command;
mod manage;
mod pdus;
#[cfg(test)]
mod tests;
mod text;

use super::cmdsn::{Admission, CmdWindow};
use super::login::{LoginOutcome, SessionType, QUEUE_DEPTH};
use super::transfer::{WriteLimits, WriteTransfer};
use crate::wire::{self, reject_reason, Bhs, Pdu, WireError, RESERVED_TAG};
use bytes::Bytes;
use pdus::sense;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

pub use pdus::{decode_lun, stamp};

/// A task of this connection, unique for the connection's life (unlike an ITT, which the
/// initiator reuses): the tag the SCSI core's task set knows it by.
pub type TaskId = u64;

/// SCSI status bytes the transport itself produces (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const BUSY: u8 = 0x08;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// A resource the caller charged for a command (its share of the buffer budget); the
/// connection holds it until the command's response is queued, then hands it back in
/// [`Event::Release`] (or drops it when the command ends without a response).
pub type Hold = Box<dyn Send>;

/// What the connection asks of the target it belongs to (lookups, no I/O).
pub trait TargetContext: Send + Sync {
    /// Whether `lun` is mapped for this session.
    fn lun_exists(&self, lun: u64) -> bool;
    /// Data-Out bytes `cdb` asks for on `lun` (0 when unknown).
    fn data_out_length(&self, lun: u64, cdb: &[u8]) -> u32;
    /// Charge `bytes` of buffer budget; None when it does not fit now.
    fn reserve_buffer(&self, bytes: u32) -> Option<Hold>;
    /// SendTargets answer (RFC 7143 Appendix C) for the value `which`.
    fn send_targets(&self, which: &str) -> Vec<(String, String)>;
}

/// Fixed parameters of one connection, mostly from its login.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    pub discovery: bool,
    /// CmdSN of the first non-immediate command.
    pub first_cmd_sn: u32,
    /// MaxCmdSN already announced during login.
    pub announced_max_cmd_sn: u32,
    pub queue_depth: u32,
    /// StatSN of the first full-feature response.
    pub first_stat_sn: u32,
    /// Largest data segment the initiator accepts.
    pub max_send_segment: u32,
    pub max_burst: u32,
    pub write_limits: WriteLimits,
    /// Largest expected data transfer length accepted.
    pub max_command_bytes: u64,
    /// Idle time before a NOP-In ping.
    pub nop_interval: Duration,
    /// Time a ping (or a pause in traffic after it) may go unanswered.
    pub nop_timeout: Duration,
}

impl ConnConfig {
    /// Parameters from a completed login and the target's settings.
    pub fn from_login(
        outcome: &LoginOutcome,
        queue_depth: u32,
        max_command_bytes: u64,
        nop_interval: Duration,
        nop_timeout: Duration,
    ) -> Self {
        let s = &outcome.session;
        Self {
            discovery: outcome.session_type == SessionType::Discovery,
            first_cmd_sn: outcome.exp_cmd_sn,
            announced_max_cmd_sn: outcome.exp_cmd_sn.wrapping_add(QUEUE_DEPTH - 1),
            queue_depth,
            first_stat_sn: outcome.next_stat_sn,
            max_send_segment: outcome.connection.initiator_max_recv_data_segment_length,
            max_burst: s.max_burst_length,
            write_limits: WriteLimits::negotiated(s),
            max_command_bytes,
            nop_interval,
            nop_timeout,
        }
    }
}

/// A command whose data is all in: it enters its LU's task set, and runs once
/// [`TargetConnection::start_task`] says the task set lets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submit {
    pub task: TaskId,
    pub lun: u64,
    /// The raw 3-bit ATTR field (the SCSI core decodes it).
    pub attr: u8,
}

/// A task management request for the SCSI core to decide; answer with
/// [`TargetConnection::tmf_decided`]. Functions 1, 2, 4, 5 name one LU; 6, 7 the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfRequest {
    pub itt: u32,
    /// RFC 7143 §11.5.1 function code.
    pub function: u8,
    pub lun: u64,
    /// ABORT TASK: the referenced task (its ITT already mapped).
    pub task: Option<TaskId>,
}

/// A task the SCSI core aborted, as the connection knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aborted {
    pub task: TaskId,
    /// Whether the task set had started it (then it ends without a response); else it
    /// left the task set and never starts.
    pub running: bool,
}

/// A command ready to run: all its data arrived and the task set lets it start.
#[derive(Debug, Clone)]
pub struct Execute {
    pub task: TaskId,
    pub itt: u32,
    pub lun: u64,
    pub cdb: Bytes,
    /// The raw 3-bit ATTR field.
    pub attr: u8,
    pub data_out: Bytes,
    /// Expected Data-In length (0 unless the R bit was set).
    pub data_in_len: u32,
    /// Expected Data-Out length (0 unless the W bit was set).
    pub data_out_len: u32,
}

/// The result of a command, in transport terms.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u8,
    /// Encoded sense data, if any.
    pub sense: Option<Bytes>,
    pub data_in: Bytes,
}

/// Something the driver must do.
pub enum Event {
    /// Enter a task into its LU's task set.
    Submit(Submit),
    /// Run a command and report with [`TargetConnection::handle_outcome`].
    Execute(Execute),
    /// Decide a task management function.
    TaskManagement(TmfRequest),
    /// A task's hold, to give back once the PDUs polled before it are written.
    Release(Hold),
    /// Flush what is queued and close (logout, target cold reset).
    Close,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Submit(s) => f.debug_tuple("Submit").field(s).finish(),
            Event::Execute(e) => f.debug_tuple("Execute").field(e).finish(),
            Event::TaskManagement(t) => f.debug_tuple("TaskManagement").field(t).finish(),
            Event::Release(_) => f.write_str("Release"),
            Event::Close => f.write_str("Close"),
        }
    }
}

/// Whether a finished command's response went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// The task was aborted meanwhile (or is unknown): nothing was sent, and whatever
    /// the outcome reported (a unit attention) was never seen by the initiator.
    Suppressed,
}

/// Why the connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("no answer to NOP-In ping")]
    PingTimeout,
    #[error("framing error: {0}")]
    Framing(WireError),
}

/// A non-immediate request waiting for its CmdSN turn.
#[derive(Debug)]
enum Request {
    Pdu(Pdu),
    /// A SCSI Command whose immediate data failed its digest (by ITT): it takes its
    /// CmdSN like any command, then fails.
    DigestFailed(u32),
}

/// A task known to the connection, by ITT (waiting in its LU's task set or running).
#[derive(Debug)]
struct ActiveTask {
    lun: u64,
    task_id: TaskId,
    aborted: bool,
}

/// A command whose data is complete, in its LU's task set.
struct Ready {
    exec: Execute,
    read: bool,
    edtl: u32,
    /// Data-Out length the CDB asked for (for write residuals).
    cdb_out_len: u32,
    r2t_count: u32,
    hold: Option<Hold>,
}

/// A write task still receiving Data-Out.
struct PendingWrite {
    transfer: WriteTransfer,
    ready: Ready,
}

/// A request whose answer waits for the SCSI core's decision and for aborted tasks to
/// end (the connection reads nothing meanwhile, as a blocking TMF would: RFC 7143
/// §4.2.3.3, responses to affected tasks go out before the TMF response).
#[derive(Debug)]
struct Blocker {
    waits: Vec<TaskId>,
    then: AfterWait,
}

#[derive(Debug)]
enum AfterWait {
    /// `response` is None until [`TargetConnection::tmf_decided`].
    Tmf {
        itt: u32,
        function: u8,
        response: Option<u8>,
    },
    Logout {
        itt: u32,
    },
}

/// One full-feature-phase connection of a target (see the module doc).
pub struct TargetConnection {
    cfg: ConnConfig,
    ctx: std::sync::Arc<dyn TargetContext>,
    window: CmdWindow<Request>,
    next_task: TaskId,
    /// Submitted tasks the task set has not started yet.
    waiting: HashMap<TaskId, Ready>,
    /// Tasks by ITT, waiting or running.
    active: HashMap<u32, ActiveTask>,
    /// What a running task needs for its response.
    running: HashMap<TaskId, Ready>,
    writes: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// Remainder of a long text response and its TTT.
    text_pending: Option<(u32, Bytes)>,
    /// TTT of our NOP-In ping awaiting its NOP-Out.
    ping_outstanding: Option<u32>,
    last_rx: Instant,
    blocker: Option<Blocker>,
    /// Requests released by the window but not yet handled (behind a blocker).
    queued: VecDeque<Request>,
    /// PDUs that arrived while blocked.
    inbox: VecDeque<Pdu>,
    stat_sn: u32,
    transmits: VecDeque<Pdu>,
    events: VecDeque<Event>,
    closed: bool,
}

impl TargetConnection {
    pub fn new(cfg: ConnConfig, ctx: std::sync::Arc<dyn TargetContext>, now: Instant) -> Self {
        let mut window = CmdWindow::new(cfg.first_cmd_sn, cfg.queue_depth);
        window.note_announced(cfg.announced_max_cmd_sn);
        Self {
            stat_sn: cfg.first_stat_sn,
            cfg,
            ctx,
            window,
            next_task: 1,
            waiting: HashMap::new(),
            active: HashMap::new(),
            running: HashMap::new(),
            writes: HashMap::new(),
            next_ttt: 1,
            text_pending: None,
            ping_outstanding: None,
            last_rx: now,
            blocker: None,
            queued: VecDeque::new(),
            inbox: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
        }
    }

    // ---- outputs ----

    /// The next PDU to send, stamped with StatSN, ExpCmdSN and MaxCmdSN.
    pub fn poll_transmit(&mut self) -> Option<Pdu> {
        let mut p = self.transmits.pop_front()?;
        let exp = self.window.exp_cmd_sn();
        let max = self.window.max_cmd_sn();
        stamp(&mut p, &mut self.stat_sn, exp, max);
        Some(p)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] wants to be called (NOP-In ping and its timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed || self.blocker.is_some() {
            return None;
        }
        let wait = if self.ping_outstanding.is_some() {
            self.cfg.nop_timeout
        } else {
            self.cfg.nop_interval
        };
        Some(self.last_rx + wait)
    }

    /// Whether the driver should read the next PDU (false while a TMF or logout waits
    /// for running tasks, and after close).
    pub fn accepts_pdus(&self) -> bool {
        !self.closed && self.blocker.is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Tasks started and not yet reported.
    pub fn running_tasks(&self) -> usize {
        self.running.len()
    }

    /// Current ExpCmdSN and MaxCmdSN (for a status report).
    pub fn window(&mut self) -> (u32, u32) {
        (self.window.exp_cmd_sn(), self.window.max_cmd_sn())
    }

    // ---- inputs ----

    pub fn handle_pdu(&mut self, p: Pdu, now: Instant) {
        self.last_rx = now;
        if self.closed {
            return;
        }
        if self.blocker.is_some() {
            self.inbox.push_back(p);
            return;
        }
        self.on_pdu(p);
    }

    /// A PDU the codec could not deliver. Data digest errors and unknown opcodes are
    /// rejected and the connection goes on; other framing errors end it.
    pub fn handle_wire_error(&mut self, e: WireError, now: Instant) -> Result<(), ConnError> {
        self.last_rx = now;
        match e {
            WireError::DataDigest { bhs } => {
                warn!("data digest error: rejecting the PDU");
                let p = Pdu {
                    bhs: *bhs,
                    ahs: Vec::new(),
                    data: Bytes::new(),
                };
                self.send(pdus::reject(reject_reason::DATA_DIGEST_ERROR, &p));
                match &p.bhs {
                    Bhs::DataOut(d) => {
                        // The task cannot complete without its data at ERL 0.
                        if let Some(w) = self.writes.remove(&d.itt) {
                            self.fail_write(w, sense::DATA_PHASE_CRC_ERROR);
                        }
                    }
                    Bhs::ScsiCommand(c) => {
                        self.ping_outstanding = None;
                        self.admit(c.immediate, c.cmd_sn, Request::DigestFailed(c.itt));
                    }
                    _ => {}
                }
                Ok(())
            }
            WireError::UnknownOpcode { opcode, header, .. } => {
                warn!(opcode, "unknown opcode: rejecting");
                self.send(pdus::pdu(
                    Bhs::Reject(wire::Reject {
                        reason: reject_reason::COMMAND_NOT_SUPPORTED,
                        ..Default::default()
                    }),
                    Bytes::copy_from_slice(&header[..]),
                ));
                Ok(())
            }
            other => {
                warn!(error = %other, "framing error: dropping connection");
                Err(ConnError::Framing(other))
            }
        }
    }

    /// Time passed: ping an idle initiator; give up on one that does not answer.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnError> {
        match self.poll_timeout() {
            Some(t) if now >= t => {}
            _ => return Ok(()),
        }
        if self.ping_outstanding.is_some() {
            return Err(ConnError::PingTimeout);
        }
        let ttt = self.alloc_ttt();
        self.ping_outstanding = Some(ttt);
        self.last_rx = now;
        self.send(pdus::pdu(
            Bhs::NopIn(wire::NopIn {
                itt: RESERVED_TAG,
                ttt,
                ..Default::default()
            }),
            Bytes::new(),
        ));
        Ok(())
    }

    // ---- internals ----

    fn send(&mut self, p: Pdu) {
        self.transmits.push_back(p);
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1) & 0x7fff_ffff;
        if self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        t
    }

    fn on_pdu(&mut self, p: Pdu) {
        let (immediate, cmd_sn) = match &p.bhs {
            Bhs::DataOut(_) => return self.on_data_out(p),
            Bhs::SnackRequest(_) => {
                warn!("SNACK at ErrorRecoveryLevel 0: rejecting");
                return self.send(pdus::reject(reject_reason::SNACK_REJECT, &p));
            }
            Bhs::NopOut(n) if n.itt == RESERVED_TAG => {
                // Answer to our ping (or an unsolicited ping needing no reply).
                if n.ttt != RESERVED_TAG && self.ping_outstanding == Some(n.ttt) {
                    self.ping_outstanding = None;
                }
                return;
            }
            Bhs::NopOut(n) => (n.immediate, n.cmd_sn),
            Bhs::ScsiCommand(c) => (c.immediate, c.cmd_sn),
            Bhs::TaskMgmtRequest(t) => (t.immediate, t.cmd_sn),
            Bhs::TextRequest(t) => (t.immediate, t.cmd_sn),
            Bhs::LogoutRequest(l) => (l.immediate, l.cmd_sn),
            other => {
                warn!(
                    opcode = pdus::bhs_name(other),
                    "unexpected PDU from initiator: rejecting"
                );
                return self.send(pdus::reject(reject_reason::PROTOCOL_ERROR, &p));
            }
        };
        // Any request proves the peer alive.
        self.ping_outstanding = None;
        self.admit(immediate, cmd_sn, Request::Pdu(p));
    }

    /// Pass a request through the CmdSN window and handle whatever it releases.
    fn admit(&mut self, immediate: bool, cmd_sn: u32, req: Request) {
        if immediate {
            self.window.admit_immediate();
            self.queued.push_back(req);
        } else {
            match self.window.admit(cmd_sn, req) {
                Admission::Deliver(v) => self.queued.extend(v),
                Admission::Held => {}
                Admission::Ignored => {
                    // Nothing is allocated for it: the window bounds what a session holds.
                    debug!(
                        cmd_sn,
                        "command outside the CmdSN window: ignored (RFC 7143 §4.2.2.1)"
                    );
                }
            }
        }
        self.run_queued();
    }

    /// Handle released requests until one blocks or closes the connection.
    fn run_queued(&mut self) {
        while self.blocker.is_none() && !self.closed {
            let Some(r) = self.queued.pop_front() else {
                break;
            };
            match r {
                Request::Pdu(p) => self.on_request(p),
                Request::DigestFailed(itt) => {
                    // RFC 7143 §7.8: the header was good, the immediate data was not; the
                    // task ends with "protocol service CRC error".
                    self.fail_command(
                        itt,
                        status::CHECK_CONDITION,
                        Some(sense::PROTOCOL_SERVICE_CRC_ERROR),
                    );
                }
            }
        }
    }

    /// Once a blocker is gone: the rest of its batch, then what arrived meanwhile.
    fn resume(&mut self, now: Instant) {
        self.last_rx = now;
        self.run_queued();
        while self.blocker.is_none() && !self.closed {
            let Some(p) = self.inbox.pop_front() else {
                break;
            };
            self.on_pdu(p);
        }
    }

    fn on_request(&mut self, p: Pdu) {
        match p.bhs {
            Bhs::ScsiCommand(c) => self.on_scsi_command(c, p.ahs, p.data),
            Bhs::NopOut(n) => {
                self.send(pdus::pdu(
                    Bhs::NopIn(wire::NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        ..Default::default()
                    }),
                    p.data,
                ));
                self.window.complete();
            }
            Bhs::TextRequest(t) => {
                self.on_text(t, p.data);
                self.window.complete();
            }
            Bhs::TaskMgmtRequest(t) => self.on_tmf(&t),
            Bhs::LogoutRequest(l) => self.on_logout(&l),
            _ => {}
        }
    }
}
