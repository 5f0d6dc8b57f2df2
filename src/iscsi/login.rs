//! Login phase state machine (RFC 7143 §6): security negotiation with CHAP, operational
//! negotiation, stage transitions. (interface; implemented by the iscsi helper)

use super::chap::{ChapError, ChapExchange, ChapInput};
use super::negotiation::{Negotiation, NegotiationError};
use crate::wire::text::{encode_text, parse_text};
use crate::wire::{Bhs, LoginRequest, LoginResponse, Pdu};
use bytes::Bytes;
use rand::rngs::{OsRng, StdRng};
use rand::{RngCore, SeedableRng};

/// Login status class/detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: Self = Self {
        class: 0,
        detail: 0,
    };
    pub const INITIATOR_ERROR: Self = Self {
        class: 2,
        detail: 0,
    };
    pub const AUTH_FAILURE: Self = Self {
        class: 2,
        detail: 1,
    };
    pub const AUTHORIZATION_FAILURE: Self = Self {
        class: 2,
        detail: 2,
    };
    pub const NOT_FOUND: Self = Self {
        class: 2,
        detail: 3,
    };
    pub const TARGET_REMOVED: Self = Self {
        class: 2,
        detail: 4,
    };
    pub const UNSUPPORTED_VERSION: Self = Self {
        class: 2,
        detail: 5,
    };
    pub const TOO_MANY_CONNECTIONS: Self = Self {
        class: 2,
        detail: 6,
    };
    pub const MISSING_PARAMETER: Self = Self {
        class: 2,
        detail: 7,
    };
    pub const CANT_INCLUDE_IN_SESSION: Self = Self {
        class: 2,
        detail: 8,
    };
    pub const SESSION_TYPE_NOT_SUPPORTED: Self = Self {
        class: 2,
        detail: 9,
    };
    pub const SESSION_DOES_NOT_EXIST: Self = Self {
        class: 2,
        detail: 10,
    };
    pub const INVALID_DURING_LOGIN: Self = Self {
        class: 2,
        detail: 11,
    };
    pub const TARGET_ERROR: Self = Self {
        class: 3,
        detail: 0,
    };
    pub const SERVICE_UNAVAILABLE: Self = Self {
        class: 3,
        detail: 1,
    };
    pub const OUT_OF_RESOURCES: Self = Self {
        class: 3,
        detail: 2,
    };
}

/// CHAP secrets that apply to one login. `Debug` shows the names, not the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// What the initiator must prove (CHAP_N must equal `username`).
    pub username: String,
    pub secret: Vec<u8>,
    /// Mutual CHAP: what the target answers with when the initiator challenges it.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .field("mutual_username", &self.mutual.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// What the target allows for a given login; supplied by the target layer.
pub trait LoginAuthority {
    /// Normal session: may `initiator` log in to `target`? `Ok(None)` = no authentication
    /// required; `Ok(Some(c))` = CHAP required with `c`. Err = refuse with that status
    /// (NOT_FOUND for an unknown target, AUTHORIZATION_FAILURE for an ACL miss).
    fn normal_session(
        &self,
        target: &str,
        initiator: &str,
    ) -> Result<Option<ChapCredentials>, LoginStatus>;
    /// Discovery session: same contract.
    fn discovery_session(&self, initiator: &str) -> Result<Option<ChapCredentials>, LoginStatus>;
    /// Admit the session of `lead` just before the login succeeds and resolve its TSIH:
    /// 0 asks for a new session (return a fresh non-zero TSIH); non-zero must name an
    /// existing session of this initiator + ISID.
    fn resolve_tsih(&mut self, lead: &Leading) -> Result<u16, LoginStatus>;
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

impl Default for SessionParams {
    /// The RFC 7143 §13 defaults (what holds for keys nobody negotiated).
    fn default() -> Self {
        Self {
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
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

/// What a login settled: the parameters the shared negotiation engine agreed (the same
/// types as the target's), and what the target declared about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginParams {
    pub session: SessionParams,
    /// `initiator_max_recv_data_segment_length` is ours (what we accept);
    /// `target_max_recv_data_segment_length` bounds our Data-Out and immediate data.
    pub connection: ConnectionParams,
    pub tsih: u16,
    pub target_portal_group_tag: Option<u16>,
    pub target_alias: Option<String>,
}

/// What one side wants from negotiation, for either side: the target's answers and
/// offers and the initiator's answers and checks come from the same key table
/// ([`super::keys::KEYS`]) applied to this policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    /// Digests this side accepts (CRC32C is preferred when accepted).
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our bound for DefaultTime2Wait (result function Maximum).
    pub default_time2wait: u32,
    /// Our bound for DefaultTime2Retain (result function Minimum).
    pub default_time2retain: u32,
    /// TargetAlias declared by a target (unused by initiators).
    pub target_alias: Option<String>,
}

/// The target's key policy (from config).
pub type TargetKeyPolicy = KeyPolicy;

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 1,
            header_digest: true,
            data_digest: true,
            // A target is happy with whatever wait the initiator wants.
            default_time2wait: 0,
            default_time2retain: 20,
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
    /// The leading request named its target (or asked for discovery): choose the policy
    /// that applies and answer with [`LoginMachine::choose`]. Nothing is sent yet.
    ChooseTarget(Box<Leading>),
    /// Send this final Login Response; the connection enters the full feature phase.
    Complete(Pdu, Box<LoginOutcome>),
    /// Send this Login Response (non-zero status) and close the connection.
    Fail(Pdu, LoginError),
}

/// Command window granted at login: MaxCmdSN = ExpCmdSN + QUEUE_DEPTH - 1.
pub const QUEUE_DEPTH: u32 = 128;

/// Largest login text (all continuation pieces together) we buffer.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Login stages (CSG/NSG values, RFC 7143 §11.12.3).
const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// Why a login ended with an error status. [`LoginError::status`] is the one mapping to
/// the status class/detail sent to the initiator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("non-login PDU during login")]
    NotLoginPdu,
    #[error("login request after the login ended")]
    AfterEnd,
    #[error("login request while the target policy is still being chosen")]
    TargetNotChosen,
    #[error("version {min}..{max} not supported")]
    UnsupportedVersion { min: u8, max: u8 },
    #[error("first request not in a negotiation stage")]
    FirstStage,
    #[error("ISID, TSIH or CID changed during login")]
    IdentityChanged,
    #[error("CSG does not match the login stage")]
    StageMismatch,
    #[error("T and C both set")]
    TransitWithContinue,
    #[error("invalid NSG")]
    InvalidNsg,
    #[error("login text too long")]
    TextTooLong,
    #[error("bad login text: {0}")]
    BadText(String),
    #[error("no InitiatorName")]
    MissingInitiatorName,
    #[error("no TargetName")]
    MissingTargetName,
    #[error("SessionType={0}")]
    SessionType(String),
    #[error("refused by the target's authority")]
    Refused(LoginStatus),
    #[error("authentication required but security stage skipped")]
    SecuritySkipped,
    #[error("initiator skipped authentication")]
    AuthSkipped,
    #[error("AuthMethod renegotiated")]
    AuthMethodRenegotiated,
    #[error("CHAP required, initiator offered AuthMethod={0}")]
    ChapNotOffered(String),
    #[error("CHAP keys without AuthMethod=CHAP")]
    ChapWithoutMethod,
    #[error("{0}")]
    Chap(#[from] ChapError),
    #[error("{0}")]
    Negotiation(#[from] NegotiationError),
    #[error("session not admitted (unknown TSIH or a limit)")]
    NotAdmitted(LoginStatus),
}

impl LoginError {
    /// The Login Response status for this error.
    pub fn status(&self) -> LoginStatus {
        use LoginError as E;
        match self {
            E::NotLoginPdu => LoginStatus::INVALID_DURING_LOGIN,
            E::TargetNotChosen => LoginStatus::TARGET_ERROR,
            E::UnsupportedVersion { .. } => LoginStatus::UNSUPPORTED_VERSION,
            E::MissingInitiatorName | E::MissingTargetName => LoginStatus::MISSING_PARAMETER,
            E::SessionType(_) => LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
            E::Refused(s) | E::NotAdmitted(s) => *s,
            E::SecuritySkipped | E::AuthSkipped | E::ChapNotOffered(_) | E::Chap(_) => {
                LoginStatus::AUTH_FAILURE
            }
            E::AfterEnd
            | E::FirstStage
            | E::IdentityChanged
            | E::StageMismatch
            | E::TransitWithContinue
            | E::InvalidNsg
            | E::TextTooLong
            | E::BadText(_)
            | E::AuthMethodRenegotiated
            | E::ChapWithoutMethod
            | E::Negotiation(_) => LoginStatus::INITIATOR_ERROR,
        }
    }
}

/// Identity fixed by the leading (first complete) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leading {
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// None for discovery sessions.
    pub target_name: Option<String>,
    pub session_type: SessionType,
}

impl Leading {
    /// Parse the identity keys of the leading request.
    fn parse(req: &LoginRequest, pairs: &[(String, String)]) -> Result<Self, LoginError> {
        let get = |k: &str| pairs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        let initiator_name = get("InitiatorName")
            .filter(|n| !n.is_empty())
            .ok_or(LoginError::MissingInitiatorName)?;
        let session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => return Err(LoginError::SessionType(other.to_string())),
        };
        let target_name = match session_type {
            SessionType::Normal => Some(
                get("TargetName")
                    .filter(|n| !n.is_empty())
                    .ok_or(LoginError::MissingTargetName)?,
            ),
            SessionType::Discovery => None,
        };
        Ok(Self {
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
            initiator_name,
            initiator_alias: get("InitiatorAlias"),
            target_name,
            session_type,
        })
    }

    /// Ask `authority` whether this login may proceed and with which CHAP secrets.
    pub fn authorize(
        &self,
        authority: &dyn LoginAuthority,
    ) -> Result<Option<ChapCredentials>, LoginStatus> {
        match &self.target_name {
            Some(target) => authority.normal_session(target, &self.initiator_name),
            None => authority.discovery_session(&self.initiator_name),
        }
    }
}

/// The policy of the target the leading request named, chosen by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Keys (and TargetAlias) the target negotiates with.
    pub keys: TargetKeyPolicy,
    /// CHAP secrets the initiator must prove (None = no authentication).
    pub chap: Option<ChapCredentials>,
}

/// Where authentication stands in the security stage.
#[derive(Debug)]
enum Auth {
    /// No AuthMethod agreed yet.
    Pending,
    /// AuthMethod=None agreed.
    NotRequired,
    /// AuthMethod=CHAP agreed.
    Chap(Box<ChapExchange>),
}

/// What both negotiation stages work on once the target is chosen.
#[derive(Debug)]
struct Context {
    lead: Leading,
    policy: TargetPolicy,
    negotiation: Negotiation,
}

/// The login's states, each with only its own data.
#[derive(Debug)]
enum LoginState {
    /// Waiting for the leading request (possibly continued over several PDUs).
    AwaitLeading,
    /// The leading request is parsed; the driver must [`LoginMachine::choose`].
    ChooseTarget {
        lead: Leading,
        req: LoginRequest,
        pairs: Vec<(String, String)>,
    },
    Security {
        ctx: Box<Context>,
        auth: Auth,
    },
    Operational {
        ctx: Box<Context>,
    },
    /// Completed or failed: nothing more is accepted.
    Done,
}

/// Per-connection login state machine.
#[derive(Debug)]
pub struct LoginMachine {
    rng: StdRng,
    state: LoginState,
    /// Header of the first request: ISID, TSIH and CID must not change; echoed in a
    /// failure response to a non-login PDU.
    first: Option<LoginRequest>,
    /// Text of a request split over several PDUs (C bit).
    pending_text: Vec<u8>,
    /// StatSN of the next response.
    stat_sn: u32,
}

impl Default for LoginMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl LoginMachine {
    pub fn new() -> Self {
        Self::with_rng(StdRng::from_rng(OsRng).unwrap_or_else(|_| StdRng::seed_from_u64(0)))
    }

    /// Deterministic randomness (CHAP identifiers/challenges, initial StatSN) for tests.
    pub fn with_rng(mut rng: StdRng) -> Self {
        let stat_sn = rng.next_u32();
        Self {
            rng,
            state: LoginState::AwaitLeading,
            first: None,
            pending_text: Vec::new(),
            stat_sn,
        }
    }

    /// Feed one PDU received during the login phase (normally a Login Request; anything
    /// else fails the login with INVALID_DURING_LOGIN).
    pub fn on_pdu(&mut self, pdu: &Pdu, authority: &mut dyn LoginAuthority) -> LoginStep {
        let Bhs::LoginRequest(req) = &pdu.bhs else {
            let req = self.first.clone().unwrap_or_default();
            return self.fail(&req, LoginError::NotLoginPdu);
        };
        match self.step(req, &pdu.data, authority) {
            Ok(step) => step,
            Err(e) => self.fail(req, e),
        }
    }

    /// Answer [`LoginStep::ChooseTarget`]: the policy of the named target, or the status
    /// that refuses the login.
    pub fn choose(
        &mut self,
        policy: Result<TargetPolicy, LoginStatus>,
        authority: &mut dyn LoginAuthority,
    ) -> LoginStep {
        let LoginState::ChooseTarget { lead, req, pairs } =
            std::mem::replace(&mut self.state, LoginState::Done)
        else {
            let req = self.first.clone().unwrap_or_default();
            return self.fail(&req, LoginError::TargetNotChosen);
        };
        match self.start(lead, &req, &pairs, policy, authority) {
            Ok(step) => step,
            Err(e) => self.fail(&req, e),
        }
    }

    fn start(
        &mut self,
        lead: Leading,
        req: &LoginRequest,
        pairs: &[(String, String)],
        policy: Result<TargetPolicy, LoginStatus>,
        authority: &mut dyn LoginAuthority,
    ) -> Result<LoginStep, LoginError> {
        let policy = policy.map_err(LoginError::Refused)?;
        // RFC 7143 §6.3: a target that requires authentication fails a login that starts
        // in operational negotiation.
        if req.csg == OPERATIONAL && policy.chap.is_some() {
            return Err(LoginError::SecuritySkipped);
        }
        let negotiation = Negotiation::new(lead.session_type == SessionType::Discovery);
        let ctx = Box::new(Context {
            lead,
            policy,
            negotiation,
        });
        let auth = (req.csg == SECURITY).then_some(Auth::Pending);
        self.exchange(req, pairs, ctx, auth, authority, true)
    }

    fn step(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        authority: &mut dyn LoginAuthority,
    ) -> Result<LoginStep, LoginError> {
        let stage = match &self.state {
            LoginState::Done => return Err(LoginError::AfterEnd),
            LoginState::ChooseTarget { .. } => return Err(LoginError::TargetNotChosen),
            LoginState::AwaitLeading => self.check_first(req)?,
            LoginState::Security { .. } => SECURITY,
            LoginState::Operational { .. } => OPERATIONAL,
        };
        self.check_request(req, stage, data.len())?;
        self.pending_text.extend_from_slice(data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response in the same stage.
            return Ok(LoginStep::Continue(self.response(
                req,
                false,
                req.csg,
                Bytes::new(),
            )));
        }
        let text = std::mem::take(&mut self.pending_text);
        let pairs = parse_text(&text).map_err(|e| LoginError::BadText(e.to_string()))?;
        match std::mem::replace(&mut self.state, LoginState::Done) {
            LoginState::AwaitLeading => {
                let lead = Leading::parse(req, &pairs)?;
                self.state = LoginState::ChooseTarget {
                    lead: lead.clone(),
                    req: req.clone(),
                    pairs,
                };
                Ok(LoginStep::ChooseTarget(Box::new(lead)))
            }
            LoginState::Security { ctx, auth } => {
                self.exchange(req, &pairs, ctx, Some(auth), authority, false)
            }
            LoginState::Operational { ctx } => {
                self.exchange(req, &pairs, ctx, None, authority, false)
            }
            LoginState::ChooseTarget { .. } | LoginState::Done => Err(LoginError::TargetNotChosen),
        }
    }

    /// Checks of the first PDU of the leading request; returns its stage.
    fn check_first(&mut self, req: &LoginRequest) -> Result<u8, LoginError> {
        if let Some(first) = &self.first {
            return Ok(first.csg);
        }
        // We speak version 0 only (RFC 7143 §11.12.4).
        if req.version_min > 0 {
            return Err(LoginError::UnsupportedVersion {
                min: req.version_min,
                max: req.version_max,
            });
        }
        if req.csg != SECURITY && req.csg != OPERATIONAL {
            return Err(LoginError::FirstStage);
        }
        self.first = Some(req.clone());
        Ok(req.csg)
    }

    /// Header checks every request passes, in `stage`, carrying `len` bytes of text.
    fn check_request(&self, req: &LoginRequest, stage: u8, len: usize) -> Result<(), LoginError> {
        if let Some(first) = &self.first {
            if (first.isid, first.tsih, first.cid) != (req.isid, req.tsih, req.cid) {
                return Err(LoginError::IdentityChanged);
            }
        }
        if req.csg != stage {
            return Err(LoginError::StageMismatch);
        }
        if req.transit && req.continue_ {
            return Err(LoginError::TransitWithContinue);
        }
        if req.transit
            && !(req.nsg > req.csg && (req.nsg == OPERATIONAL || req.nsg == FULL_FEATURE))
        {
            return Err(LoginError::InvalidNsg);
        }
        if self.pending_text.len() + len > MAX_LOGIN_TEXT {
            return Err(LoginError::TextTooLong);
        }
        Ok(())
    }

    /// Negotiate the keys of one complete request in the security stage (`auth` is Some)
    /// or the operational stage, and move to the next state.
    fn exchange(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        mut ctx: Box<Context>,
        mut auth: Option<Auth>,
        authority: &mut dyn LoginAuthority,
        leading: bool,
    ) -> Result<LoginStep, LoginError> {
        let security = auth.is_some();
        let batch = ctx.negotiation.process(pairs, security, &ctx.policy.keys)?;
        let mut out = batch.responses;
        // Does the target agree to move on?
        let mut transit = req.transit;
        if let Some(a) = auth.as_mut() {
            let creds = ctx.policy.chap.as_ref();
            out.extend(authenticate(a, creds, &batch.auth, &mut self.rng)?);
            if transit {
                transit = may_leave_security(a, creds.is_some())?;
            }
        }
        if transit && req.nsg == FULL_FEATURE && !security {
            let offers = ctx.negotiation.target_offers(&ctx.policy.keys);
            if !offers.is_empty() || ctx.negotiation.pending_offers() {
                out.extend(offers);
                transit = false;
            }
        }
        // Target declarations: TPGT and alias first, our receive limit once we negotiate.
        if leading && ctx.lead.session_type == SessionType::Normal {
            out.push(("TargetPortalGroupTag".into(), authority.tpgt().to_string()));
            if let Some(alias) = &ctx.policy.keys.target_alias {
                out.push(("TargetAlias".into(), alias.clone()));
            }
        }
        if !security || (transit && req.nsg == FULL_FEATURE) {
            out.extend(ctx.negotiation.declare_mrdsl(&ctx.policy.keys));
        }
        if transit && req.nsg == FULL_FEATURE {
            return self.complete(req, ctx, &out, authority);
        }
        self.state = match auth {
            Some(auth) if !transit => LoginState::Security { ctx, auth },
            _ => LoginState::Operational { ctx },
        };
        Ok(LoginStep::Continue(self.response(
            req,
            transit,
            req.nsg,
            encode_text(&out),
        )))
    }

    /// The final response: the session is admitted and the login is done.
    fn complete(
        &mut self,
        req: &LoginRequest,
        ctx: Box<Context>,
        out: &[(String, String)],
        authority: &mut dyn LoginAuthority,
    ) -> Result<LoginStep, LoginError> {
        let tsih = authority
            .resolve_tsih(&ctx.lead)
            .map_err(LoginError::NotAdmitted)?;
        let mut pdu = self.response(req, true, FULL_FEATURE, encode_text(out));
        if let Bhs::LoginResponse(r) = &mut pdu.bhs {
            r.tsih = tsih;
        }
        let Context {
            lead,
            policy,
            negotiation,
        } = *ctx;
        let outcome = LoginOutcome {
            session_type: lead.session_type,
            initiator_name: lead.initiator_name,
            initiator_alias: lead.initiator_alias,
            target_name: lead.target_name,
            isid: lead.isid,
            tsih,
            cid: lead.cid,
            session: negotiation.session_params(),
            connection: negotiation.connection_params(&policy.keys),
            exp_cmd_sn: req.cmd_sn,
            next_stat_sn: self.stat_sn,
        };
        tracing::info!(initiator = %outcome.initiator_name, target = ?outcome.target_name, tsih, "login complete");
        Ok(LoginStep::Complete(pdu, Box::new(outcome)))
    }

    /// A Login Response echoing `req`, taking the next StatSN.
    fn response(&mut self, req: &LoginRequest, transit: bool, nsg: u8, data: Bytes) -> Pdu {
        let stat_sn = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        Pdu {
            bhs: Bhs::LoginResponse(LoginResponse {
                transit,
                continue_: false,
                csg: req.csg,
                nsg: if transit { nsg } else { 0 },
                version_max: 0,
                version_active: 0,
                isid: req.isid,
                tsih: req.tsih,
                itt: req.itt,
                stat_sn,
                exp_cmd_sn: req.cmd_sn,
                max_cmd_sn: req.cmd_sn.wrapping_add(QUEUE_DEPTH - 1),
                status_class: 0,
                status_detail: 0,
            }),
            ahs: Vec::new(),
            data,
        }
    }

    /// End the login: a response with the error's status, no keys, T=0.
    fn fail(&mut self, req: &LoginRequest, error: LoginError) -> LoginStep {
        self.state = LoginState::Done;
        let status = error.status();
        tracing::warn!(
            class = status.class,
            detail = status.detail,
            reason = %error,
            "login failed"
        );
        let mut pdu = self.response(req, false, 0, Bytes::new());
        if let Bhs::LoginResponse(r) = &mut pdu.bhs {
            r.status_class = status.class;
            r.status_detail = status.detail;
        }
        LoginStep::Fail(pdu, error)
    }
}

/// Whether the security stage may be left now.
fn may_leave_security(auth: &Auth, chap_required: bool) -> Result<bool, LoginError> {
    match auth {
        Auth::NotRequired => Ok(true),
        Auth::Chap(x) => Ok(x.is_complete()),
        Auth::Pending if !chap_required => Ok(true),
        Auth::Pending => Err(LoginError::AuthSkipped),
    }
}

/// AuthMethod selection and the CHAP exchange of one security-stage request.
fn authenticate(
    auth: &mut Auth,
    creds: Option<&ChapCredentials>,
    keys: &[(&'static str, String)],
    rng: &mut StdRng,
) -> Result<Vec<(String, String)>, LoginError> {
    let mut out = Vec::new();
    let mut chap = ChapInput::default();
    let mut method = None;
    for (k, v) in keys {
        if !chap.set(k, v) {
            method = Some(v.as_str());
        }
    }
    if let Some(offered) = method {
        if !matches!(auth, Auth::Pending) {
            return Err(LoginError::AuthMethodRenegotiated);
        }
        let offered: Vec<&str> = offered.split(',').collect();
        let answer = match creds {
            Some(creds) if offered.contains(&"CHAP") => {
                *auth = Auth::Chap(Box::new(ChapExchange::new(creds.clone())));
                "CHAP"
            }
            Some(_) => return Err(LoginError::ChapNotOffered(offered.join(","))),
            None if offered.contains(&"None") => {
                *auth = Auth::NotRequired;
                "None"
            }
            // We have no secret to run CHAP with; the initiator decides what next.
            None => super::keys::REJECT,
        };
        out.push(("AuthMethod".to_string(), answer.to_string()));
    }
    if !chap.is_empty() {
        let Auth::Chap(x) = auth else {
            return Err(LoginError::ChapWithoutMethod);
        };
        out.extend(x.step(&chap, rng)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::chap::{chap_response, decode_binary, encode_hex};
    use md5::{Digest, Md5};
    use proptest::prelude::*;

    const TARGET: &str = "iqn.2026-01.org.holdfast:disk1";
    const INITIATOR: &str = "iqn.2004-10.com.ubuntu:01:abcdef";

    /// Authority with one target; CHAP if `creds` is set; one ACL entry.
    #[derive(Clone)]
    struct Auth0 {
        creds: Option<ChapCredentials>,
    }

    impl LoginAuthority for Auth0 {
        fn normal_session(
            &self,
            target: &str,
            initiator: &str,
        ) -> Result<Option<ChapCredentials>, LoginStatus> {
            if target != TARGET {
                return Err(LoginStatus::NOT_FOUND);
            }
            if initiator != INITIATOR {
                return Err(LoginStatus::AUTHORIZATION_FAILURE);
            }
            Ok(self.creds.clone())
        }
        fn discovery_session(
            &self,
            _initiator: &str,
        ) -> Result<Option<ChapCredentials>, LoginStatus> {
            Ok(self.creds.clone())
        }
        fn resolve_tsih(&mut self, lead: &Leading) -> Result<u16, LoginStatus> {
            match lead.tsih {
                0 => Ok(0x1234),
                _ => Err(LoginStatus::SESSION_DOES_NOT_EXIST),
            }
        }
        fn tpgt(&self) -> u16 {
            7
        }
    }

    fn plain() -> Auth0 {
        Auth0 { creds: None }
    }

    fn chap_creds(mutual: bool) -> ChapCredentials {
        ChapCredentials {
            username: "node1".into(),
            secret: b"node1-secret-0123".to_vec(),
            mutual: mutual.then(|| ("holdfast".into(), b"target-secret-4567".to_vec())),
        }
    }

    /// A machine plus the key policy its driver chooses for the one target.
    struct Driven {
        m: LoginMachine,
        keys: TargetKeyPolicy,
    }

    impl Driven {
        fn with(keys: TargetKeyPolicy, seed: u64) -> Self {
            Self {
                m: LoginMachine::with_rng(StdRng::seed_from_u64(seed)),
                keys,
            }
        }

        /// Feed a PDU as the connection driver does: answer a ChooseTarget step with
        /// the authority's verdict and our key policy.
        fn on_pdu(&mut self, pdu: &Pdu, a: &Auth0) -> LoginStep {
            let mut a = a.clone();
            match self.m.on_pdu(pdu, &mut a) {
                LoginStep::ChooseTarget(lead) => {
                    let policy = lead.authorize(&a).map(|chap| TargetPolicy {
                        keys: self.keys.clone(),
                        chap,
                    });
                    self.m.choose(policy, &mut a)
                }
                step => step,
            }
        }
    }

    fn machine() -> Driven {
        Driven::with(TargetKeyPolicy::default(), 42)
    }

    fn req(csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> Pdu {
        let mut data = Vec::new();
        for (k, v) in keys {
            data.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        raw(csg, nsg, transit, false, data)
    }

    fn raw(csg: u8, nsg: u8, transit: bool, continue_: bool, data: Vec<u8>) -> Pdu {
        Pdu {
            bhs: Bhs::LoginRequest(LoginRequest {
                transit,
                continue_,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0, 0x02, 0x3d, 0, 1],
                tsih: 0,
                itt: 0x11,
                cid: 0,
                cmd_sn: 100,
                exp_stat_sn: 0,
            }),
            ahs: vec![],
            data: Bytes::from(data),
        }
    }

    fn resp(step: &LoginStep) -> (&LoginResponse, Vec<(String, String)>) {
        let pdu = match step {
            LoginStep::Continue(p) | LoginStep::Complete(p, _) | LoginStep::Fail(p, _) => p,
            LoginStep::ChooseTarget(_) => panic!("no response while choosing the target"),
        };
        let Bhs::LoginResponse(r) = &pdu.bhs else {
            panic!("not a login response")
        };
        (r, parse_text(&pdu.data).unwrap())
    }

    fn get<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
        keys.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str())
    }

    /// `keys` answers each key as given.
    #[track_caller]
    /// A leading request of the operational stage with `extra` keys: the target's answers
    /// include `want`. Returns the step and all the answered keys.
    fn answered(
        extra: &[(&'static str, &'static str)],
        want: &[(&str, &str)],
    ) -> (LoginStep, Vec<(String, String)>) {
        let s = machine().on_pdu(&req(1, 3, true, &leading(extra)), &plain());
        let keys = resp(&s).1;
        assert_answers(&keys, want);
        (s, keys)
    }

    fn assert_answers(keys: &[(String, String)], want: &[(&str, &str)]) {
        for (k, v) in want {
            assert_eq!(get(keys, k), Some(*v), "{k}");
        }
    }

    fn status(step: &LoginStep) -> LoginStatus {
        let (r, _) = resp(step);
        LoginStatus {
            class: r.status_class,
            detail: r.status_detail,
        }
    }

    fn assert_fail(step: &LoginStep, want: LoginStatus) {
        assert!(
            matches!(step, LoginStep::Fail(..)),
            "expected failure, got {step:?}"
        );
        assert_eq!(status(step), want);
        let (r, keys) = resp(step);
        assert!(!r.transit && keys.is_empty());
    }

    fn leading(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "node1"),
            ("SessionType", "Normal"),
            ("TargetName", TARGET),
        ];
        v.extend_from_slice(extra);
        v
    }

    /// What open-iscsi (iscsid) offers in operational negotiation for a normal session.
    const OPEN_ISCSI_OPS: &[(&str, &str)] = &[
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("MaxBurstLength", "16776192"),
        ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"),
        ("MaxConnections", "1"),
        ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"),
        ("MaxRecvDataSegmentLength", "262144"),
    ];

    #[test]
    fn open_iscsi_plain_login() {
        let mut m = machine();
        let a = plain();
        let s = m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "None")])), &a);
        let (r, keys) = resp(&s);
        assert!(matches!(s, LoginStep::Continue(_)));
        assert!(r.transit && r.csg == 0 && r.nsg == 1);
        assert_eq!(
            (r.itt, r.exp_cmd_sn, r.max_cmd_sn),
            (0x11, 100, 100 + QUEUE_DEPTH - 1)
        );
        assert_answers(
            &keys,
            &[("AuthMethod", "None"), ("TargetPortalGroupTag", "7")],
        );
        let first_stat_sn = r.stat_sn;

        let s = m.on_pdu(&req(1, 3, true, OPEN_ISCSI_OPS), &a);
        let (r, keys) = resp(&s);
        assert!(r.transit && r.csg == 1 && r.nsg == 3);
        assert_eq!(r.tsih, 0x1234);
        assert_eq!(r.stat_sn, first_stat_sn.wrapping_add(1));
        assert_answers(
            &keys,
            &[
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144"),
                ("DefaultTime2Retain", "0"),
                ("InitialR2T", "No"),
                ("IFMarker", "No"),
                ("MaxRecvDataSegmentLength", "262144"),
            ],
        );
        // Declarations are not answered: only ours appears.
        assert_eq!(
            keys.iter()
                .filter(|(k, _)| k == "MaxRecvDataSegmentLength")
                .count(),
            1
        );
        let LoginStep::Complete(_, o) = s else {
            panic!("not complete")
        };
        assert_eq!(o.session_type, SessionType::Normal);
        assert_eq!(o.initiator_name, INITIATOR);
        assert_eq!(o.initiator_alias.as_deref(), Some("node1"));
        assert_eq!(o.target_name.as_deref(), Some(TARGET));
        assert_eq!((o.tsih, o.cid, o.exp_cmd_sn), (0x1234, 0, 100));
        assert_eq!(o.next_stat_sn, first_stat_sn.wrapping_add(2));
        assert_eq!(
            o.session,
            SessionParams {
                max_connections: 1,
                initial_r2t: false,
                immediate_data: true,
                max_burst_length: 1048576,
                first_burst_length: 262144,
                default_time2wait: 2,
                default_time2retain: 0,
                max_outstanding_r2t: 1,
                data_pdu_in_order: true,
                data_sequence_in_order: true,
                error_recovery_level: 0,
            }
        );
        assert_eq!(
            o.connection,
            ConnectionParams {
                header_digest: false,
                data_digest: false,
                initiator_max_recv_data_segment_length: 262144,
                target_max_recv_data_segment_length: 262144,
            }
        );
        // Anything after completion is refused.
        assert_fail(
            &m.on_pdu(&req(1, 3, true, &[]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
    }

    #[test]
    fn libiscsi_starts_in_operational_stage() {
        let mut m = machine();
        let mut keys = leading(&[]);
        keys.extend_from_slice(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxConnections", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
        ]);
        let s = m.on_pdu(&req(1, 3, true, &keys), &plain());
        let (r, keys) = resp(&s);
        assert!(r.transit && r.nsg == 3);
        assert_answers(
            &keys,
            &[("HeaderDigest", "None"), ("TargetPortalGroupTag", "7")],
        );
        let LoginStep::Complete(_, o) = s else {
            panic!()
        };
        assert!(o.session.initial_r2t && o.session.immediate_data);
        assert_eq!(o.session.first_burst_length, 262144);
    }

    #[test]
    fn libiscsi_repeats_identity_in_operational_stage() {
        let mut m = machine();
        let a = plain();
        let s = m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "None")])), &a);
        assert!(resp(&s).0.transit);
        let s = m.on_pdu(
            &req(
                1,
                3,
                true,
                &[
                    ("InitiatorName", INITIATOR),
                    ("MaxRecvDataSegmentLength", "65536"),
                ],
            ),
            &a,
        );
        assert!(matches!(s, LoginStep::Complete(..)), "{s:?}");
        // ...but a changed identity is an error.
        let mut m = machine();
        m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "None")])), &a);
        let s = m.on_pdu(&req(1, 3, true, &[("InitiatorName", "iqn.other")]), &a);
        assert_fail(&s, LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn discovery_login() {
        let mut m = machine();
        let a = plain();
        let s = m.on_pdu(
            &req(
                0,
                1,
                true,
                &[
                    ("InitiatorName", INITIATOR),
                    ("SessionType", "Discovery"),
                    ("AuthMethod", "None"),
                ],
            ),
            &a,
        );
        let (_, keys) = resp(&s);
        assert_eq!(get(&keys, "TargetPortalGroupTag"), None);
        // open-iscsi's first offers, then a smaller MaxRecvDataSegmentLength and a
        // session key that discovery does not negotiate.
        let mut ops = OPEN_ISCSI_OPS[..7].to_vec();
        ops.extend([
            ("MaxRecvDataSegmentLength", "32768"),
            ("MaxBurstLength", "262144"),
        ]);
        let s = m.on_pdu(&req(1, 3, true, &ops), &a);
        let (r, keys) = resp(&s);
        assert!(r.transit);
        assert_answers(
            &keys,
            &[("MaxBurstLength", "Irrelevant"), ("HeaderDigest", "None")],
        );
        let LoginStep::Complete(_, o) = s else {
            panic!()
        };
        assert_eq!(o.session_type, SessionType::Discovery);
        assert_eq!(o.target_name, None);
        assert_eq!(o.connection.initiator_max_recv_data_segment_length, 32768);
    }

    /// Runs the CHAP legs; returns (machine, step after CHAP_R, id, challenge).
    fn chap_until_challenge(creds: ChapCredentials) -> (Driven, Auth0, u8, Vec<u8>) {
        let a = Auth0 { creds: Some(creds) };
        let mut m = machine();
        let s = m.on_pdu(
            &req(0, 1, false, &leading(&[("AuthMethod", "CHAP,None")])),
            &a,
        );
        let (r, keys) = resp(&s);
        assert!(!r.transit);
        assert_eq!(get(&keys, "AuthMethod"), Some("CHAP"));
        let s = m.on_pdu(&req(0, 1, false, &[("CHAP_A", "5")]), &a);
        let (r, keys) = resp(&s);
        assert!(!r.transit);
        assert_eq!(get(&keys, "CHAP_A"), Some("5"));
        let id: u8 = get(&keys, "CHAP_I").unwrap().parse().unwrap();
        let c = decode_binary(get(&keys, "CHAP_C").unwrap()).unwrap();
        assert!(c.len() >= 16);
        (m, a, id, c)
    }

    /// MD5(id || secret || challenge), computed here independently of chap.rs.
    fn md5_hex(id: u8, secret: &[u8], challenge: &[u8]) -> String {
        let mut h = Md5::new();
        h.update([id]);
        h.update(secret);
        h.update(challenge);
        format!("0x{}", hex::encode(h.finalize()))
    }

    #[test]
    fn chap_one_way_success() {
        let (mut m, a, id, c) = chap_until_challenge(chap_creds(false));
        let r = md5_hex(id, b"node1-secret-0123", &c);
        let s = m.on_pdu(&req(0, 1, true, &[("CHAP_N", "node1"), ("CHAP_R", &r)]), &a);
        let (resp0, keys) = resp(&s);
        assert!(
            resp0.transit && resp0.nsg == 1 && keys.iter().all(|(k, _)| !k.starts_with("CHAP"))
        );
        let s = m.on_pdu(&req(1, 3, true, OPEN_ISCSI_OPS), &a);
        assert!(matches!(s, LoginStep::Complete(..)));
    }

    #[test]
    fn chap_transit_waits_for_response() {
        // T=1 while the challenge is outstanding: the target answers T=0.
        let a = Auth0 {
            creds: Some(chap_creds(false)),
        };
        let mut m = machine();
        let s = m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "CHAP")])), &a);
        assert!(!resp(&s).0.transit);
        let s = m.on_pdu(&req(0, 1, true, &[("CHAP_A", "5")]), &a);
        assert!(!resp(&s).0.transit);
    }

    #[test]
    fn chap_wrong_secret_and_user() {
        let (mut m, a, id, c) = chap_until_challenge(chap_creds(false));
        let r = md5_hex(id, b"wrong-secret-0000", &c);
        assert_fail(
            &m.on_pdu(&req(0, 1, true, &[("CHAP_N", "node1"), ("CHAP_R", &r)]), &a),
            LoginStatus::AUTH_FAILURE,
        );
        let (mut m, a, id, c) = chap_until_challenge(chap_creds(false));
        let r = md5_hex(id, b"node1-secret-0123", &c);
        assert_fail(
            &m.on_pdu(&req(0, 1, true, &[("CHAP_N", "node2"), ("CHAP_R", &r)]), &a),
            LoginStatus::AUTH_FAILURE,
        );
    }

    #[test]
    fn chap_mutual() {
        let (mut m, a, id, c) = chap_until_challenge(chap_creds(true));
        let r = md5_hex(id, b"node1-secret-0123", &c);
        let ours = [9u8; 16];
        let s = m.on_pdu(
            &req(
                0,
                1,
                true,
                &[
                    ("CHAP_N", "node1"),
                    ("CHAP_R", &r),
                    ("CHAP_I", "77"),
                    ("CHAP_C", &encode_hex(&ours)),
                ],
            ),
            &a,
        );
        let (resp0, keys) = resp(&s);
        assert!(resp0.transit);
        assert_eq!(get(&keys, "CHAP_N"), Some("holdfast"));
        assert_eq!(
            get(&keys, "CHAP_R"),
            Some(md5_hex(77, b"target-secret-4567", &ours).as_str())
        );
        assert_eq!(
            decode_binary(get(&keys, "CHAP_R").unwrap()).unwrap(),
            chap_response(77, b"target-secret-4567", &ours)
        );
    }

    #[test]
    fn chap_mutual_not_configured_and_reflection() {
        // Mutual CHAP asked of a target without a mutual secret; then, with one, our own
        // challenge reflected back at us.
        for mutual in [false, true] {
            let (mut m, a, id, c) = chap_until_challenge(chap_creds(mutual));
            let r = md5_hex(id, b"node1-secret-0123", &c);
            let (chap_i, chap_c) = if mutual {
                (id.to_string(), encode_hex(&c))
            } else {
                ("1".to_string(), "0x0102".to_string())
            };
            let keys = [
                ("CHAP_N", "node1"),
                ("CHAP_R", &r),
                ("CHAP_I", &chap_i),
                ("CHAP_C", &chap_c),
            ];
            let s = m.on_pdu(&req(0, 1, true, &keys), &a);
            assert_fail(&s, LoginStatus::AUTH_FAILURE);
        }
    }

    #[test]
    fn chap_required_but_not_offered_or_skipped() {
        let a = Auth0 {
            creds: Some(chap_creds(false)),
        };
        let mut m = machine();
        assert_fail(
            &m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "None")])), &a),
            LoginStatus::AUTH_FAILURE,
        );
        let mut m = machine();
        assert_fail(
            &m.on_pdu(&req(1, 3, true, &leading(&[])), &a),
            LoginStatus::AUTH_FAILURE,
        );
        let mut m = machine();
        assert_fail(
            &m.on_pdu(&req(0, 1, true, &leading(&[])), &a),
            LoginStatus::AUTH_FAILURE,
        );
        // CHAP_A without MD5.
        let mut m = machine();
        m.on_pdu(&req(0, 1, false, &leading(&[("AuthMethod", "CHAP")])), &a);
        assert_fail(
            &m.on_pdu(&req(0, 1, false, &[("CHAP_A", "6,7")]), &a),
            LoginStatus::AUTH_FAILURE,
        );
    }

    #[test]
    fn authority_refusals_and_missing_parameters() {
        for (keys, want) in [
            (
                vec![("InitiatorName", INITIATOR), ("TargetName", "iqn.nope")],
                LoginStatus::NOT_FOUND,
            ),
            (
                vec![("InitiatorName", "iqn.stranger"), ("TargetName", TARGET)],
                LoginStatus::AUTHORIZATION_FAILURE,
            ),
            (vec![("TargetName", TARGET)], LoginStatus::MISSING_PARAMETER),
            (
                vec![("InitiatorName", INITIATOR)],
                LoginStatus::MISSING_PARAMETER,
            ),
            (
                vec![("InitiatorName", INITIATOR), ("SessionType", "Bogus")],
                LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
            ),
        ] {
            let s = machine().on_pdu(&req(0, 1, true, &keys), &plain());
            assert_fail(&s, want);
        }
    }

    #[test]
    fn unsupported_version() {
        let mut p = req(0, 1, true, &leading(&[]));
        if let Bhs::LoginRequest(r) = &mut p.bhs {
            r.version_min = 1;
            r.version_max = 2;
        }
        assert_fail(
            &machine().on_pdu(&p, &plain()),
            LoginStatus::UNSUPPORTED_VERSION,
        );
    }

    #[test]
    fn repeated_key_is_initiator_error() {
        let a = plain();
        let s = machine().on_pdu(
            &req(
                1,
                3,
                true,
                &leading(&[("MaxBurstLength", "4096"), ("MaxBurstLength", "4096")]),
            ),
            &a,
        );
        assert_fail(&s, LoginStatus::INITIATOR_ERROR);
        // Across PDUs as well.
        let mut m = machine();
        let s = m.on_pdu(&req(1, 3, false, &leading(&[("ImmediateData", "Yes")])), &a);
        assert!(matches!(s, LoginStep::Continue(_)));
        assert_fail(
            &m.on_pdu(&req(1, 3, true, &[("ImmediateData", "Yes")]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
    }

    #[test]
    fn reject_not_understood_and_irrelevant() {
        let (s, _) = answered(
            &[
                ("MaxBurstLength", "100"),
                ("MaxRecvDataSegmentLength", "99999999"),
                ("ErrorRecoveryLevel", "7"),
                ("X-com.example.Foo", "1"),
                ("X#example", "2"),
                ("FancyKey", "3"),
                ("OFMarkInt", "2048~8192"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "No"),
                ("FirstBurstLength", "4096"),
            ],
            &[
                ("MaxBurstLength", "Reject"),
                ("ErrorRecoveryLevel", "Reject"),
                ("X-com.example.Foo", "NotUnderstood"),
                ("X#example", "NotUnderstood"),
                ("FancyKey", "NotUnderstood"),
                ("OFMarkInt", "Reject"),
                ("FirstBurstLength", "Irrelevant"),
            ],
        );
        let LoginStep::Complete(_, o) = s else {
            panic!()
        };
        // Rejected values leave the defaults in force.
        assert_eq!(o.session.max_burst_length, 262144);
        assert_eq!(o.connection.initiator_max_recv_data_segment_length, 8192);
        assert!(!o.session.immediate_data && o.session.initial_r2t);
    }

    #[test]
    fn digests_and_burst_rules() {
        let (s, keys) = answered(
            &[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "CRC32C"),
                ("FirstBurstLength", "1048576"),
                ("MaxBurstLength", "131072"),
            ],
            &[
                ("HeaderDigest", "CRC32C"),
                ("DataDigest", "CRC32C"),
                ("MaxBurstLength", "131072"),
            ],
        );
        // Capped by the MaxBurstLength of the same request, though offered before it.
        assert_eq!(get(&keys, "FirstBurstLength"), Some("131072"));
        let LoginStep::Complete(_, o) = s else {
            panic!()
        };
        assert!(o.connection.header_digest && o.connection.data_digest);
        assert_eq!(
            (o.session.max_burst_length, o.session.first_burst_length),
            (131072, 131072)
        );
    }

    /// A machine under `policy` after an operational request with no keys: the target
    /// answers with offers of its own instead of completing. Returns its keys.
    fn offers(policy: TargetKeyPolicy) -> (Driven, Vec<(String, String)>) {
        let mut m = Driven::with(policy, 1);
        let s = m.on_pdu(&req(1, 3, true, &leading(&[])), &plain());
        let (r, keys) = resp(&s);
        assert!(!r.transit);
        (m, keys)
    }

    #[test]
    fn target_offers_when_defaults_break_policy() {
        let a = plain();
        let (mut m, keys) = offers(TargetKeyPolicy {
            max_burst_length: 65536,
            first_burst_length: 8192,
            ..Default::default()
        });
        assert_answers(
            &keys,
            &[("MaxBurstLength", "65536"), ("FirstBurstLength", "8192")],
        );
        assert_eq!(get(&keys, "ImmediateData"), None);
        let s = m.on_pdu(
            &req(
                1,
                3,
                true,
                &[("MaxBurstLength", "32768"), ("FirstBurstLength", "8192")],
            ),
            &a,
        );
        let LoginStep::Complete(_, o) = s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (o.session.max_burst_length, o.session.first_burst_length),
            (32768, 8192)
        );

        // ImmediateData=No makes FirstBurstLength moot (InitialR2T stays Yes): not offered.
        let (mut m, keys) = offers(TargetKeyPolicy {
            immediate_data: false,
            first_burst_length: 8192,
            ..Default::default()
        });
        assert_eq!(get(&keys, "ImmediateData"), Some("No"));
        assert_eq!(get(&keys, "FirstBurstLength"), None);
        // An answer that breaks the result function fails the login.
        assert_fail(
            &m.on_pdu(&req(1, 3, true, &[("ImmediateData", "Yes")]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
        let (mut m, _) = offers(TargetKeyPolicy {
            immediate_data: false,
            ..Default::default()
        });
        let s = m.on_pdu(&req(1, 3, true, &[("ImmediateData", "No")]), &a);
        let LoginStep::Complete(_, o) = s else {
            panic!("{s:?}")
        };
        assert!(!o.session.immediate_data && o.session.initial_r2t);
    }

    #[test]
    fn continuation_accumulates_text() {
        let a = plain();
        let mut m = machine();
        let mut text = Vec::new();
        for (k, v) in leading(&[("MaxBurstLength", "65536"), ("HeaderDigest", "CRC32C")]) {
            text.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        // Split in the middle of a key.
        let (p1, p2) = text.split_at(30);
        let s = m.on_pdu(&raw(1, 0, false, true, p1.to_vec()), &a);
        let (r, keys) = resp(&s);
        assert!(matches!(s, LoginStep::Continue(_)) && !r.transit && keys.is_empty());
        let s = m.on_pdu(&raw(1, 3, true, false, p2.to_vec()), &a);
        let (_, keys) = resp(&s);
        assert_eq!(get(&keys, "MaxBurstLength"), Some("65536"));
        assert!(matches!(s, LoginStep::Complete(..)));
        // T and C together are illegal.
        assert_fail(
            &machine().on_pdu(&raw(1, 3, true, true, vec![]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
    }

    #[test]
    fn misc_protocol_errors() {
        let a = plain();
        // Non-login PDU.
        let nop = Pdu {
            bhs: Bhs::NopOut(Default::default()),
            ahs: vec![],
            data: Bytes::new(),
        };
        assert_fail(
            &machine().on_pdu(&nop, &a),
            LoginStatus::INVALID_DURING_LOGIN,
        );
        // Security key in operational stage.
        assert_fail(
            &machine().on_pdu(&req(1, 3, true, &leading(&[("AuthMethod", "None")])), &a),
            LoginStatus::INITIATOR_ERROR,
        );
        // Target-only key from the initiator.
        assert_fail(
            &machine().on_pdu(
                &req(1, 3, true, &leading(&[("TargetPortalGroupTag", "1")])),
                &a,
            ),
            LoginStatus::INITIATOR_ERROR,
        );
        // Wrong stage after transition.
        let mut m = machine();
        m.on_pdu(&req(0, 1, true, &leading(&[("AuthMethod", "None")])), &a);
        assert_fail(
            &m.on_pdu(&req(0, 1, true, &[]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
        // Bad NSG.
        assert_fail(
            &machine().on_pdu(&req(1, 2, true, &leading(&[])), &a),
            LoginStatus::INITIATOR_ERROR,
        );
        // Unknown TSIH.
        let mut p = req(1, 3, true, &leading(&[]));
        if let Bhs::LoginRequest(r) = &mut p.bhs {
            r.tsih = 9;
        }
        assert_fail(
            &machine().on_pdu(&p, &a),
            LoginStatus::SESSION_DOES_NOT_EXIST,
        );
        // Malformed text.
        assert_fail(
            &machine().on_pdu(&raw(1, 3, true, false, b"novalue\0".to_vec()), &a),
            LoginStatus::INITIATOR_ERROR,
        );
    }

    #[test]
    fn leading_request_asks_to_choose_the_target() {
        let mut a = plain();
        let mut m = LoginMachine::with_rng(StdRng::seed_from_u64(3));
        let s = m.on_pdu(
            &req(0, 1, true, &leading(&[("AuthMethod", "None")])),
            &mut a,
        );
        let LoginStep::ChooseTarget(lead) = s else {
            panic!("{s:?}")
        };
        assert_eq!(lead.target_name.as_deref(), Some(TARGET));
        assert_eq!(lead.initiator_name, INITIATOR);
        assert_eq!(lead.initiator_alias.as_deref(), Some("node1"));
        assert_eq!(lead.session_type, SessionType::Normal);
        assert!(matches!(m.state, LoginState::ChooseTarget { .. }));
        // The policy chosen for that target (its alias) shapes the first response.
        let policy = TargetPolicy {
            keys: TargetKeyPolicy {
                target_alias: Some("disk-one".into()),
                ..Default::default()
            },
            chap: lead.authorize(&a).unwrap(),
        };
        let s = m.choose(Ok(policy), &mut a);
        let (r, keys) = resp(&s);
        assert!(r.transit && r.nsg == 1);
        assert_answers(
            &keys,
            &[
                ("AuthMethod", "None"),
                ("TargetPortalGroupTag", "7"),
                ("TargetAlias", "disk-one"),
            ],
        );
        assert!(matches!(m.state, LoginState::Operational { .. }));
    }

    #[test]
    fn choose_refusal_and_out_of_turn_requests() {
        let mut a = plain();
        let mut m = LoginMachine::with_rng(StdRng::seed_from_u64(3));
        let s = m.on_pdu(&req(1, 3, true, &leading(&[])), &mut a);
        assert!(matches!(s, LoginStep::ChooseTarget(_)));
        let s = m.choose(Err(LoginStatus::NOT_FOUND), &mut a);
        assert_fail(&s, LoginStatus::NOT_FOUND);
        assert!(matches!(s, LoginStep::Fail(_, LoginError::Refused(_))));
        assert!(matches!(m.state, LoginState::Done));

        // A request while the driver still has to choose is a driver slip.
        let mut m = LoginMachine::with_rng(StdRng::seed_from_u64(3));
        m.on_pdu(&req(1, 3, true, &leading(&[])), &mut a);
        let s = m.on_pdu(&req(1, 3, true, &[]), &mut a);
        assert_fail(&s, LoginStatus::TARGET_ERROR);
        // choose() without a pending ChooseTarget.
        let mut m = LoginMachine::with_rng(StdRng::seed_from_u64(3));
        let s = m.choose(Err(LoginStatus::NOT_FOUND), &mut a);
        assert!(matches!(s, LoginStep::Fail(_, LoginError::TargetNotChosen)));
    }

    #[test]
    fn state_transitions() {
        let a = Auth0 {
            creds: Some(chap_creds(false)),
        };
        let mut m = machine();
        assert!(matches!(m.m.state, LoginState::AwaitLeading));
        // A continued leading request stays in AwaitLeading.
        let mut text = Vec::new();
        for (k, v) in leading(&[("AuthMethod", "CHAP")]) {
            text.extend_from_slice(format!("{k}={v}\0").as_bytes());
        }
        let (p1, p2) = text.split_at(20);
        m.on_pdu(&raw(0, 0, false, true, p1.to_vec()), &a);
        assert!(matches!(m.m.state, LoginState::AwaitLeading));
        m.on_pdu(&raw(0, 1, false, false, p2.to_vec()), &a);
        assert!(matches!(
            m.m.state,
            LoginState::Security {
                auth: Auth::Chap(_),
                ..
            }
        ));
        m.on_pdu(&req(0, 1, false, &[("CHAP_A", "5")]), &a);
        assert!(matches!(m.m.state, LoginState::Security { .. }));

        // AuthMethod=None without CHAP: Security (None agreed) → Operational → Done.
        let a = plain();
        let mut m = machine();
        m.on_pdu(&req(0, 1, false, &leading(&[("AuthMethod", "None")])), &a);
        assert!(matches!(
            m.m.state,
            LoginState::Security {
                auth: Auth::NotRequired,
                ..
            }
        ));
        m.on_pdu(&req(0, 1, true, &[]), &a);
        assert!(matches!(m.m.state, LoginState::Operational { .. }));
        m.on_pdu(&req(1, 1, false, &[("MaxBurstLength", "65536")]), &a);
        assert!(matches!(m.m.state, LoginState::Operational { .. }));
        let s = m.on_pdu(&req(1, 3, true, &[]), &a);
        assert!(matches!(s, LoginStep::Complete(..)));
        assert!(matches!(m.m.state, LoginState::Done));
        assert_fail(
            &m.on_pdu(&req(1, 3, true, &[]), &a),
            LoginStatus::INITIATOR_ERROR,
        );
        // A failure ends in Done as well.
        let mut m = machine();
        m.on_pdu(&raw(1, 3, true, true, vec![]), &a);
        assert!(matches!(m.m.state, LoginState::Done));
    }

    #[test]
    fn login_error_status_mapping() {
        use LoginError as E;
        let cases = [
            (E::NotLoginPdu, LoginStatus::INVALID_DURING_LOGIN),
            (
                E::UnsupportedVersion { min: 1, max: 2 },
                LoginStatus::UNSUPPORTED_VERSION,
            ),
            (E::MissingTargetName, LoginStatus::MISSING_PARAMETER),
            (
                E::SessionType("x".into()),
                LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
            ),
            (E::Refused(LoginStatus::NOT_FOUND), LoginStatus::NOT_FOUND),
            (
                E::NotAdmitted(LoginStatus::TOO_MANY_CONNECTIONS),
                LoginStatus::TOO_MANY_CONNECTIONS,
            ),
            (E::AuthSkipped, LoginStatus::AUTH_FAILURE),
            (E::SecuritySkipped, LoginStatus::AUTH_FAILURE),
            (
                E::Chap(ChapError::MissingResponse),
                LoginStatus::AUTH_FAILURE,
            ),
            (E::TransitWithContinue, LoginStatus::INITIATOR_ERROR),
            (E::IdentityChanged, LoginStatus::INITIATOR_ERROR),
            (E::TargetNotChosen, LoginStatus::TARGET_ERROR),
        ];
        for (e, want) in cases {
            assert_eq!(e.status(), want, "{e}");
        }
    }

    fn arb_key() -> impl Strategy<Value = String> {
        let known: Vec<String> = crate::iscsi::keys::KEYS
            .iter()
            .map(|k| k.name.to_string())
            .collect();
        prop_oneof![proptest::sample::select(known), "[A-Za-z_#\\-]{1,12}"]
    }

    fn arb_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Yes".to_string()),
            Just("No".to_string()),
            Just("5".to_string()),
            Just("CHAP,None".to_string()),
            Just("0x00ff".to_string()),
            Just(INITIATOR.to_string()),
            Just(TARGET.to_string()),
            Just("Discovery".to_string()),
            "[0-9]{1,12}",
            "[ -~]{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn never_panics(
            pdus in proptest::collection::vec(
                (0u8..4, 0u8..4, any::<bool>(), any::<bool>(), 0u8..3, any::<u16>(),
                 proptest::collection::vec((arb_key(), arb_value()), 0..8),
                 proptest::collection::vec(any::<u8>(), 0..16), any::<bool>()),
                1..6),
            chap in any::<bool>(),
        ) {
            let a = Auth0 { creds: chap.then(|| chap_creds(true)) };
            let mut m = machine();
            for (csg, nsg, t, c, vmin, tsih, keys, junk, use_junk) in pdus {
                let mut data = Vec::new();
                for (k, v) in keys {
                    data.extend_from_slice(format!("{k}={v}\0").as_bytes());
                }
                if use_junk {
                    data.extend_from_slice(&junk);
                }
                let mut p = raw(csg, nsg, t, c, data);
                if let Bhs::LoginRequest(r) = &mut p.bhs {
                    r.version_min = vmin;
                    r.tsih = tsih;
                }
                let step = m.on_pdu(&p, &a);
                if let LoginStep::Fail(..) = &step {
                    prop_assert!(status(&step) != LoginStatus::SUCCESS);
                }
            }
        }
    }
}
