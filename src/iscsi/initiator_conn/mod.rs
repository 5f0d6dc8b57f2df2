//! The initiator side of one full-feature-phase connection, sans-IO (quinn-proto style,
//! the mirror of [`super::target_conn`]): ITT allocation, the CmdSN window (ordered
//! requests wait while it is closed), ExpStatSN tracking, Data-In reassembly, status and
//! sense, R2T → Data-Out, NOP both ways, task management, Text and logout.
//!
//! Inputs: the request methods ([`InitiatorConnection::submit_command`],
//! [`InitiatorConnection::ping`], [`InitiatorConnection::task_management`],
//! [`InitiatorConnection::text`], [`InitiatorConnection::logout`]),
//! [`InitiatorConnection::handle_pdu`], [`InitiatorConnection::handle_wire_error`],
//! [`InitiatorConnection::handle_disconnect`], [`InitiatorConnection::handle_timeout`].
//! Outputs: [`InitiatorConnection::poll_transmit`] (PDUs stamped with ExpStatSN, in send
//! order), [`InitiatorConnection::poll_event`] (completions, close) and
//! [`InitiatorConnection::poll_timeout`]. Time is an input; SCSI meaning stays with the
//! caller (CDBs go out as bytes, status and sense come back as bytes).

mod command;
mod manage;
#[cfg(test)]
pub(crate) mod tests;

use super::cmdsn::{sn_le, sn_lt};
use super::login::LoginParams;
use crate::wire::{Bhs, Pdu, WireError, RESERVED_TAG};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

pub use command::{CommandRequest, SubmitError, Submitted};

/// Initiator Task Tag.
pub type Itt = u32;

/// Longest CDB an Extended-CDB AHS can carry here (16 in the BHS + 244 in the AHS).
pub const MAX_CDB_LEN: usize = 260;

/// How many aborted tasks' tags are remembered, so their late PDUs are ignored rather
/// than taken for protocol errors.
const RETIRED_KEPT: usize = 256;

pub use crate::wire::{tmf_function as tmf, tmf_response};

/// Sequence numbers as the login left them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// CmdSN of the first full-feature non-immediate request.
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Fixed parameters of one connection.
#[derive(Debug, Clone)]
pub struct InitiatorConfig {
    pub params: LoginParams,
    pub sequence: Sequence,
    /// Idle time before a keep-alive NOP-Out (None: no keep-alive).
    pub nop_interval: Option<Duration>,
    /// Time a keep-alive may go unanswered before the connection is declared dead.
    pub nop_timeout: Duration,
}

impl InitiatorConfig {
    pub fn new(params: LoginParams, sequence: Sequence) -> Self {
        Self {
            params,
            sequence,
            nop_interval: None,
            nop_timeout: Duration::from_secs(10),
        }
    }
}

/// A finished SCSI command, in transport terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data without the iSCSI 2-byte SenseLength prefix.
    pub sense: Option<Bytes>,
    pub data: Bytes,
    /// Positive = underflow (less than expected), negative = overflow.
    pub residual: i64,
}

/// Why the target broke the protocol (the connection closes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what} for unknown task {itt:#x}")]
    UnknownItt { what: &'static str, itt: Itt },
    #[error("{what} does not match request {itt:#x}")]
    WrongResponse { what: &'static str, itt: Itt },
    #[error("Data-In beyond the expected length (task {itt:#x}, offset {offset}, {len} bytes, expected {expected})")]
    DataInOverflow {
        itt: Itt,
        offset: u32,
        len: usize,
        expected: u32,
    },
    #[error("R2T outside the command's data (task {itt:#x}, offset {offset}, {len} bytes)")]
    R2tOutsideData { itt: Itt, offset: u32, len: u32 },
    #[error("StatSN {got} where {expected} was expected")]
    StatSn { got: u32, expected: u32 },
    #[error("unexpected {0} from the target")]
    UnexpectedPdu(&'static str),
}

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The target rejected a PDU of this request (RFC 7143 §11.17.1 reason code).
    #[error("request rejected by the target (reason {reason:#04x})")]
    Rejected { reason: u8 },
    /// Ended by a task management function of ours.
    #[error("task aborted")]
    Aborted,
    /// iSCSI response other than "command completed at target".
    #[error("target failure (iSCSI response {0:#04x})")]
    TargetFailure(u8),
    #[error("logout refused (response {0})")]
    LogoutRefused(u8),
    /// A Data-In of this task failed its digest (no recovery at ErrorRecoveryLevel 0).
    #[error("data digest error")]
    DataDigest,
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("connection lost")]
    ConnectionLost,
}

/// Why the connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    #[error("framing error: {0}")]
    Framing(WireError),
    #[error("no answer to NOP-Out keep-alive")]
    PingTimeout,
    #[error("connection closed by the target")]
    Disconnected,
}

/// What happened, for the driver to report.
#[derive(Debug)]
pub enum Event {
    CommandDone {
        itt: Itt,
        result: Result<CommandResult, RequestError>,
    },
    NopDone {
        itt: Itt,
        result: Result<Duration, RequestError>,
    },
    /// The TMF response code (0 = function complete).
    TmfDone {
        itt: Itt,
        result: Result<u8, RequestError>,
    },
    /// The reassembled text answer (key=value bytes).
    TextDone {
        itt: Itt,
        result: Result<Bytes, RequestError>,
    },
    LogoutDone {
        itt: Itt,
        result: Result<(), RequestError>,
    },
    /// The connection is over (None: after a logout); every request was answered before.
    Closed { error: Option<ConnError> },
}

impl Event {
    /// The request this event completes (None for `Closed`).
    pub fn itt(&self) -> Option<Itt> {
        match self {
            Event::CommandDone { itt, .. }
            | Event::NopDone { itt, .. }
            | Event::TmfDone { itt, .. }
            | Event::TextDone { itt, .. }
            | Event::LogoutDone { itt, .. } => Some(*itt),
            Event::Closed { .. } => None,
        }
    }
}

/// A SCSI command waiting for its status.
#[derive(Debug)]
struct CommandState {
    lun: u64,
    /// Submission order, for deciding what a task management function covered.
    seq: u64,
    data_out: Bytes,
    data_in_len: u32,
    data_in: BytesMut,
    /// End of the furthest Data-In received.
    data_in_end: usize,
}

#[derive(Debug)]
enum Pending {
    Command(Box<CommandState>),
    Nop {
        sent: Instant,
        /// Our own keep-alive: no event when it completes.
        keepalive: bool,
    },
    Tmf {
        function: u8,
        lun: u64,
        referenced: Itt,
        seq: u64,
    },
    Text {
        acc: BytesMut,
    },
    Logout,
}

/// PDUs of one ordered request, waiting for the CmdSN window to reach `cmd_sn`.
#[derive(Debug)]
struct Held {
    cmd_sn: u32,
    pdus: Vec<Pdu>,
}

/// One full-feature-phase connection of an initiator (see the module doc).
#[derive(Debug)]
pub struct InitiatorConnection {
    cfg: InitiatorConfig,
    /// CmdSN for the next ordered request.
    next_cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: Itt,
    next_seq: u64,
    pending: HashMap<Itt, Pending>,
    held: VecDeque<Held>,
    /// A logout waiting for the outstanding commands to finish.
    deferred_logout: Option<Pdu>,
    /// Tags of tasks ended by task management, most recent last.
    retired: VecDeque<Itt>,
    last_rx: Instant,
    /// Our keep-alive in flight.
    keepalive: Option<Itt>,
    transmits: VecDeque<Pdu>,
    events: VecDeque<Event>,
    closed: bool,
}

impl InitiatorConnection {
    pub fn new(cfg: InitiatorConfig, now: Instant) -> Self {
        let s = cfg.sequence;
        Self {
            next_cmd_sn: s.cmd_sn,
            exp_cmd_sn: s.exp_cmd_sn,
            max_cmd_sn: s.max_cmd_sn,
            exp_stat_sn: s.exp_stat_sn,
            cfg,
            next_itt: 1,
            next_seq: 0,
            pending: HashMap::new(),
            held: VecDeque::new(),
            deferred_logout: None,
            retired: VecDeque::new(),
            last_rx: now,
            keepalive: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
        }
    }

    // ---- outputs ----

    /// The next PDU to send, stamped with the current ExpStatSN.
    pub fn poll_transmit(&mut self) -> Option<Pdu> {
        let mut p = self.transmits.pop_front()?;
        set_exp_stat_sn(&mut p.bhs, self.exp_stat_sn);
        Some(p)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] wants to be called (keep-alive and its timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let interval = self.cfg.nop_interval?;
        if self.closed {
            return None;
        }
        let wait = if self.keepalive.is_some() {
            self.cfg.nop_timeout
        } else {
            interval
        };
        Some(self.last_rx + wait)
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn params(&self) -> &LoginParams {
        &self.cfg.params
    }

    /// Whether an ordered request submitted now would go out at once (the window is
    /// open and nothing waits before it): a driver may wait for this to push back.
    pub fn window_open(&self) -> bool {
        self.held.is_empty() && sn_le(self.next_cmd_sn, self.max_cmd_sn)
    }

    /// SCSI commands not yet answered.
    pub fn commands_outstanding(&self) -> usize {
        self.pending
            .values()
            .filter(|p| matches!(p, Pending::Command(_)))
            .count()
    }

    /// (ExpCmdSN, MaxCmdSN) as last announced by the target, and our ExpStatSN.
    pub fn sequence(&self) -> (u32, u32, u32) {
        (self.exp_cmd_sn, self.max_cmd_sn, self.exp_stat_sn)
    }

    // ---- inputs ----

    pub fn handle_pdu(&mut self, p: Pdu, now: Instant) {
        self.last_rx = now;
        if self.closed {
            return;
        }
        if let Err(e) = self.note_sequence(&p.bhs) {
            return self.close(Some(ConnError::Protocol(e)));
        }
        let Pdu { bhs, data, .. } = p;
        let r = match bhs {
            Bhs::DataIn(h) => self.on_data_in(h, data),
            Bhs::ScsiResponse(h) => self.on_scsi_response(h, data),
            Bhs::R2t(h) => self.on_r2t(h),
            Bhs::NopIn(h) => self.on_nop_in(h, data, now),
            Bhs::TaskMgmtResponse(h) => self.on_tmf_response(h),
            Bhs::TextResponse(h) => self.on_text_response(h, data),
            Bhs::LogoutResponse(h) => self.on_logout_response(h),
            Bhs::Reject(h) => {
                self.on_reject(h.reason, &data);
                Ok(())
            }
            Bhs::AsyncMessage(h) => {
                manage::log_async(&h, &data);
                Ok(())
            }
            other => Err(ProtocolError::UnexpectedPdu(bhs_name(&other))),
        };
        match r {
            Ok(()) => self.release_held(),
            Err(e) => self.close(Some(ConnError::Protocol(e))),
        }
    }

    /// A PDU the codec could not deliver. A data digest error fails the one request it
    /// belongs to (ErrorRecoveryLevel 0 has no retry); any other framing error ends the
    /// connection.
    pub fn handle_wire_error(&mut self, e: WireError, now: Instant) {
        self.last_rx = now;
        if self.closed {
            return;
        }
        match e {
            WireError::DataDigest { bhs } => {
                let itt = bhs.itt();
                warn!(itt, "data digest error");
                if let Some(p) = self.take(itt) {
                    self.fail(itt, p, RequestError::DataDigest);
                }
            }
            other => self.close(Some(ConnError::Framing(other))),
        }
    }

    /// The transport is gone (EOF, reset, write failure): every request fails.
    pub fn handle_disconnect(&mut self) {
        self.close(Some(ConnError::Disconnected));
    }

    /// Time passed: send a keep-alive on an idle connection; give up on a silent target.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.poll_timeout() {
            Some(t) if now >= t => {}
            _ => return,
        }
        if self.keepalive.is_some() {
            return self.close(Some(ConnError::PingTimeout));
        }
        self.last_rx = now;
        let itt = self.send_nop(now, true);
        self.keepalive = Some(itt);
    }

    // ---- internals ----

    fn alloc_itt(&mut self) -> Itt {
        loop {
            let itt = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if itt != RESERVED_TAG && !self.pending.contains_key(&itt) {
                return itt;
            }
        }
    }

    fn alloc_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// CmdSN an immediate request carries: that of the next ordered request to go out.
    fn immediate_cmd_sn(&self) -> u32 {
        self.held.front().map_or(self.next_cmd_sn, |h| h.cmd_sn)
    }

    /// Take the next CmdSN and queue `pdus` (built with it) behind the window.
    fn send_ordered(&mut self, build: impl FnOnce(u32) -> Vec<Pdu>) -> u32 {
        let cmd_sn = self.next_cmd_sn;
        self.next_cmd_sn = cmd_sn.wrapping_add(1);
        let pdus = build(cmd_sn);
        self.held.push_back(Held { cmd_sn, pdus });
        self.release_held();
        cmd_sn
    }

    /// Move held requests the window now admits to the transmit queue, in CmdSN order.
    fn release_held(&mut self) {
        while let Some(h) = self.held.front() {
            if !sn_le(h.cmd_sn, self.max_cmd_sn) {
                debug!(
                    cmd_sn = h.cmd_sn,
                    max_cmd_sn = self.max_cmd_sn,
                    "CmdSN window closed: holding"
                );
                break;
            }
            if let Some(h) = self.held.pop_front() {
                self.transmits.extend(h.pdus);
            }
        }
    }

    fn take(&mut self, itt: Itt) -> Option<Pending> {
        let p = self.pending.remove(&itt);
        if p.is_some() {
            self.maybe_send_logout();
        }
        p
    }

    /// Report `p` (already removed) as failed.
    fn fail(&mut self, itt: Itt, p: Pending, e: RequestError) {
        let ev = match p {
            Pending::Command(_) => Event::CommandDone {
                itt,
                result: Err(e),
            },
            Pending::Nop {
                keepalive: true, ..
            } => return,
            Pending::Nop { .. } => Event::NopDone {
                itt,
                result: Err(e),
            },
            Pending::Tmf { .. } => Event::TmfDone {
                itt,
                result: Err(e),
            },
            Pending::Text { .. } => Event::TextDone {
                itt,
                result: Err(e),
            },
            Pending::Logout => Event::LogoutDone {
                itt,
                result: Err(e),
            },
        };
        self.events.push_back(ev);
    }

    fn retire(&mut self, itt: Itt) {
        if self.retired.len() == RETIRED_KEPT {
            self.retired.pop_front();
        }
        self.retired.push_back(itt);
    }

    /// Whether `itt` is a pending request for which `is` holds (a `what` answers it).
    /// Ok(false): late traffic for an aborted task, to ignore; any other mismatch is a
    /// protocol error.
    fn expect(
        &self,
        itt: Itt,
        what: &'static str,
        is: fn(&Pending) -> bool,
    ) -> Result<bool, ProtocolError> {
        match self.pending.get(&itt) {
            Some(p) if is(p) => Ok(true),
            Some(_) => Err(ProtocolError::WrongResponse { what, itt }),
            None => self.unknown(itt, what).map(|()| false),
        }
    }

    /// A PDU named a task we do not have: late traffic for an aborted task is expected
    /// (the target may have answered before it saw the TMF); anything else is not.
    fn unknown(&self, itt: Itt, what: &'static str) -> Result<(), ProtocolError> {
        if self.retired.contains(&itt) {
            debug!(itt, what, "PDU for an aborted task: ignored");
            return Ok(());
        }
        Err(ProtocolError::UnknownItt { what, itt })
    }

    /// End the connection: every request fails, then `Closed`.
    fn close(&mut self, error: Option<ConnError>) {
        if self.closed {
            return;
        }
        self.closed = true;
        match &error {
            Some(e) if !self.pending.is_empty() => {
                warn!(error = %e, outstanding = self.pending.len(), "connection lost with requests outstanding")
            }
            Some(e) => debug!(error = %e, "connection closed"),
            None => debug!("connection closed after logout"),
        }
        let lost = match &error {
            Some(ConnError::Protocol(p)) => RequestError::Protocol(p.clone()),
            _ => RequestError::ConnectionLost,
        };
        let mut drained: Vec<(Itt, Pending)> = self.pending.drain().collect();
        drained.sort_by_key(|(itt, _)| *itt);
        for (itt, p) in drained {
            self.fail(itt, p, lost.clone());
        }
        self.held.clear();
        self.deferred_logout = None;
        self.events.push_back(Event::Closed { error });
    }

    /// Take note of a target PDU's StatSN / ExpCmdSN / MaxCmdSN.
    fn note_sequence(&mut self, bhs: &Bhs) -> Result<(), ProtocolError> {
        let Some((stat_sn, exp, max)) = sequence_of(bhs) else {
            return Ok(());
        };
        if let Some(sn) = stat_sn {
            // A TCP connection loses nothing: a status-bearing PDU carries exactly the
            // StatSN we expect. A Reject may also repeat the last one (RFC 7143 §11.17.3
            // lets it not consume a number).
            let repeat = matches!(bhs, Bhs::Reject(_)) && sn == self.exp_stat_sn.wrapping_sub(1);
            if sn != self.exp_stat_sn && !repeat {
                return Err(ProtocolError::StatSn {
                    got: sn,
                    expected: self.exp_stat_sn,
                });
            }
            if !repeat {
                self.exp_stat_sn = sn.wrapping_add(1);
            }
        }
        // RFC 7143 §4.2.2.1: ignore MaxCmdSN < ExpCmdSN - 1; never move either backwards.
        if sn_lt(max, exp.wrapping_sub(1)) {
            return Ok(());
        }
        if sn_lt(self.exp_cmd_sn, exp) {
            self.exp_cmd_sn = exp;
        }
        if sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
        Ok(())
    }
}

/// (StatSN if the PDU consumes one, ExpCmdSN, MaxCmdSN) of a target PDU.
fn sequence_of(bhs: &Bhs) -> Option<(Option<u32>, u32, u32)> {
    Some(match bhs {
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
        _ => return None,
    })
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

fn bhs_name(b: &Bhs) -> &'static str {
    match b {
        Bhs::NopOut(_) => "NOP-Out",
        Bhs::ScsiCommand(_) => "SCSI Command",
        Bhs::TaskMgmtRequest(_) => "Task Management Request",
        Bhs::LoginRequest(_) => "Login Request",
        Bhs::TextRequest(_) => "Text Request",
        Bhs::DataOut(_) => "Data-Out",
        Bhs::LogoutRequest(_) => "Logout Request",
        Bhs::SnackRequest(_) => "SNACK",
        Bhs::LoginResponse(_) => "Login Response",
        _ => "PDU",
    }
}
