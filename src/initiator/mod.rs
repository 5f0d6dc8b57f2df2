//! iSCSI initiator: a tokio client session (login, pipelined SCSI commands, task
//! management, discovery). Used by the agent, `holdfast pr`, tests and benches.
//!
//! A [`Session`] is a cheap clonable handle; any number of tasks may issue commands
//! through it concurrently. The protocol state lives in the sans-IO
//! [`crate::iscsi::initiator_conn::InitiatorConnection`]; one reader task feeds it target
//! PDUs and one writer task sends what it queues.

pub mod connect;
pub mod login;
pub mod pr;
pub mod retry;
pub mod scsi;
pub mod session;
pub mod url;

pub use connect::{connect, connect_portals, ConnectError, ConnectOptions};
pub use retry::past_unit_attention;
pub use url::{IscsiUrl, UrlError};

pub use login::LoginParams;
pub use pr::{Capabilities, FullStatus, PrType, RegisterFlags, Reservation, TransportId};
pub use scsi::{cdb, encode_lun, ScsiResult, Sense};
pub use session::{Session, Task};

pub use crate::iscsi::initiator_conn::RequestError;
use std::net::SocketAddr;

/// Everything that can go wrong on the initiator side.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("wire: {0}")]
    Wire(#[from] crate::wire::WireError),
    /// The connection ended (closed, reset, session reinstated elsewhere) before the
    /// request completed.
    #[error("connection lost")]
    ConnectionLost,
    /// The target refused the login (RFC 7143 §11.13.5 status class/detail).
    #[error("login failed: status class {class:#04x} detail {detail:#04x}")]
    LoginFailed { class: u8, detail: u8 },
    /// The target's mutual-CHAP answer did not prove it knows the secret.
    #[error("target authentication failed: {0}")]
    TargetAuth(String),
    #[error("negotiation: {0}")]
    Negotiation(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The target failed this request: rejected a PDU of it, answered with a service
    /// response other than "command completed at target", or our task management
    /// aborted it ([`RequestError::Rejected`], [`RequestError::TargetFailure`],
    /// [`RequestError::Aborted`]; the request errors that end the connection become
    /// [`InitiatorError::ConnectionLost`] or [`InitiatorError::Protocol`]).
    #[error(transparent)]
    Request(RequestError),
    #[error("CHECK CONDITION: sense key {key:#04x} asc {asc:#04x} ascq {ascq:#04x}")]
    CheckCondition { key: u8, asc: u8, ascq: u8 },
    #[error("RESERVATION CONFLICT")]
    ReservationConflict,
    #[error("SCSI status {0:#04x}")]
    Status(u8),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("timed out")]
    Timeout,
}

impl From<crate::wire::ReadError> for InitiatorError {
    fn from(e: crate::wire::ReadError) -> Self {
        match e {
            crate::wire::ReadError::Closed => InitiatorError::ConnectionLost,
            crate::wire::ReadError::Io(e) => InitiatorError::Io(e),
            crate::wire::ReadError::Wire(e) => InitiatorError::Wire(e),
        }
    }
}

impl From<RequestError> for InitiatorError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::ConnectionLost => InitiatorError::ConnectionLost,
            RequestError::LogoutRefused(_)
            | RequestError::DataDigest
            | RequestError::Protocol(_) => InitiatorError::Protocol(e.to_string()),
            RequestError::Rejected { .. }
            | RequestError::Aborted
            | RequestError::TargetFailure(_) => InitiatorError::Request(e),
        }
    }
}

impl InitiatorError {
    /// The session is gone or cannot be trusted (closed, reset, garbled, protocol
    /// broken): log in again. Timeouts are the caller's to judge.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            InitiatorError::ConnectionLost
                | InitiatorError::Io(_)
                | InitiatorError::Wire(_)
                | InitiatorError::Protocol(_)
        )
    }

    /// CHECK CONDITION with sense key UNIT ATTENTION: see [`retry`].
    pub fn is_unit_attention(&self) -> bool {
        matches!(self, InitiatorError::CheckCondition { key, .. } if *key == crate::scsi::sense::key::UNIT_ATTENTION)
    }

    /// The login status pair, when this is a login refusal.
    pub fn login_status(&self) -> Option<(u8, u8)> {
        match self {
            InitiatorError::LoginFailed { class, detail } => Some((*class, *detail)),
            _ => None,
        }
    }
}

/// How to reach and log in to one target. `Debug` leaves the CHAP secrets out.
#[derive(Clone)]
pub struct InitiatorConfig {
    pub initiator_name: String,
    pub target_name: String,
    pub addr: SocketAddr,
    /// None: a random ISID of the "random" format (type 0x80, RFC 7143 §10.12.5).
    pub isid: Option<[u8; 6]>,
    /// One-way CHAP: our user name and secret.
    pub chap: Option<(String, Vec<u8>)>,
    /// Mutual CHAP: the name and secret the target must prove.
    pub mutual_chap: Option<(String, Vec<u8>)>,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept (declared to the target).
    pub max_recv_data_segment_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// Offered MaxBurstLength (the target may lower it).
    pub max_burst_length: u32,
    /// Offered FirstBurstLength (the target may lower it).
    pub first_burst_length: u32,
    /// How long connect + login may take.
    pub login_timeout: std::time::Duration,
}

impl std::fmt::Debug for InitiatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = |c: &Option<(String, Vec<u8>)>| c.as_ref().map(|(u, _)| u.clone());
        f.debug_struct("InitiatorConfig")
            .field("initiator_name", &self.initiator_name)
            .field("target_name", &self.target_name)
            .field("addr", &self.addr)
            .field("isid", &self.isid)
            .field("chap_user", &user(&self.chap))
            .field("mutual_chap_user", &user(&self.mutual_chap))
            .field("login_timeout", &self.login_timeout)
            .finish_non_exhaustive()
    }
}

impl InitiatorConfig {
    pub fn new(
        initiator_name: impl Into<String>,
        target_name: impl Into<String>,
        addr: SocketAddr,
    ) -> Self {
        Self {
            initiator_name: initiator_name.into(),
            target_name: target_name.into(),
            addr,
            isid: None,
            chap: None,
            mutual_chap: None,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            login_timeout: std::time::Duration::from_secs(15),
        }
    }
}

/// A random ISID of the "random" format: T=10b, 22 random bits in B/C, random qualifier.
pub fn random_isid() -> [u8; 6] {
    let r: [u8; 5] = rand::random();
    [0x80, r[0], r[1], r[2], r[3], r[4]]
}
