//! Login phase state machine (RFC 7143 §6): security negotiation with CHAP, operational
//! negotiation, stage transitions. (interface; implemented by the iscsi helper)

use crate::wire::{LoginRequest, Pdu};

/// Login status class/detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: Self = Self { class: 0, detail: 0 };
    pub const INITIATOR_ERROR: Self = Self { class: 2, detail: 0 };
    pub const AUTH_FAILURE: Self = Self { class: 2, detail: 1 };
    pub const AUTHORIZATION_FAILURE: Self = Self { class: 2, detail: 2 };
    pub const NOT_FOUND: Self = Self { class: 2, detail: 3 };
    pub const TARGET_REMOVED: Self = Self { class: 2, detail: 4 };
    pub const UNSUPPORTED_VERSION: Self = Self { class: 2, detail: 5 };
    pub const TOO_MANY_CONNECTIONS: Self = Self { class: 2, detail: 6 };
    pub const MISSING_PARAMETER: Self = Self { class: 2, detail: 7 };
    pub const CANT_INCLUDE_IN_SESSION: Self = Self { class: 2, detail: 8 };
    pub const SESSION_TYPE_NOT_SUPPORTED: Self = Self { class: 2, detail: 9 };
    pub const SESSION_DOES_NOT_EXIST: Self = Self { class: 2, detail: 10 };
    pub const INVALID_DURING_LOGIN: Self = Self { class: 2, detail: 11 };
    pub const TARGET_ERROR: Self = Self { class: 3, detail: 0 };
    pub const SERVICE_UNAVAILABLE: Self = Self { class: 3, detail: 1 };
    pub const OUT_OF_RESOURCES: Self = Self { class: 3, detail: 2 };
}

/// CHAP secrets that apply to one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// What the initiator must prove (CHAP_N must equal `username`).
    pub username: String,
    pub secret: Vec<u8>,
    /// Mutual CHAP: what the target answers with when the initiator challenges it.
    pub mutual: Option<(String, Vec<u8>)>,
}

/// What the target allows for a given login; supplied by the target layer.
pub trait LoginAuthority {
    /// Normal session: may `initiator` log in to `target`? `Ok(None)` = no authentication
    /// required; `Ok(Some(c))` = CHAP required with `c`. Err = refuse with that status
    /// (NOT_FOUND for an unknown target, AUTHORIZATION_FAILURE for an ACL miss).
    fn normal_session(&self, target: &str, initiator: &str) -> Result<Option<ChapCredentials>, LoginStatus>;
    /// Discovery session: same contract.
    fn discovery_session(&self, initiator: &str) -> Result<Option<ChapCredentials>, LoginStatus>;
    /// Resolve the TSIH of the login: 0 asks for a new session (return a fresh non-zero
    /// TSIH); non-zero must name an existing session of this initiator + ISID.
    fn resolve_tsih(&self, initiator: &str, isid: [u8; 6], tsih: u16) -> Result<u16, LoginStatus>;
    /// Target portal group tag of the portal this connection arrived on.
    fn tpgt(&self) -> u16;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Negotiated session-wide operational parameters (RFC 7143 §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

/// Negotiated per-connection parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Declared by the initiator: the largest data segment we may send it.
    pub initiator_max_recv_data_segment_length: u32,
    /// Declared by us: the largest data segment we accept.
    pub target_max_recv_data_segment_length: u32,
}

/// The target's side of negotiation: what it offers/accepts (from config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetKeyPolicy {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub target_alias: Option<String>,
}

impl Default for TargetKeyPolicy {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            target_alias: None,
        }
    }
}

/// Everything the connection needs once login reached the full feature phase.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// None for discovery sessions.
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    pub session: SessionParams,
    pub connection: ConnectionParams,
    /// CmdSN the first full-feature non-immediate command will carry.
    pub exp_cmd_sn: u32,
    /// StatSN of the next response the target sends.
    pub next_stat_sn: u32,
}

/// What the connection does after feeding one login PDU.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this Login Response and wait for the next request.
    Continue(Pdu),
    /// Send this final Login Response; the connection enters the full feature phase.
    Complete(Pdu, Box<LoginOutcome>),
    /// Send this Login Response (non-zero status) and close the connection.
    Fail(Pdu),
}

/// Per-connection login state machine.
#[derive(Debug)]
pub struct LoginMachine {
    policy: TargetKeyPolicy,
}

impl LoginMachine {
    pub fn new(policy: TargetKeyPolicy) -> Self {
        Self { policy }
    }

    /// Feed one PDU received during the login phase (normally a Login Request; anything
    /// else fails the login with INVALID_DURING_LOGIN).
    pub fn on_pdu(&mut self, pdu: &Pdu, authority: &dyn LoginAuthority) -> LoginStep {
        let _ = (pdu, authority, &self.policy);
        let _: Option<LoginRequest> = None;
        todo!()
    }
}
