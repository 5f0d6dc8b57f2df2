//! Login phase state machine (RFC 7143 §6): security negotiation with CHAP, operational
//! negotiation, stage transitions. (interface; implemented by the iscsi helper)

use super::chap::{ChapExchange, ChapInput};
use super::negotiation::Negotiation;
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
    fn normal_session(
        &self,
        target: &str,
        initiator: &str,
    ) -> Result<Option<ChapCredentials>, LoginStatus>;
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

/// Command window granted at login: MaxCmdSN = ExpCmdSN + QUEUE_DEPTH - 1.
pub const QUEUE_DEPTH: u32 = 128;

/// Largest login text (all continuation pieces together) we buffer.
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// Login stages (CSG/NSG values, RFC 7143 §11.12.3).
const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// Where authentication stands.
#[derive(Debug)]
enum Auth {
    /// No AuthMethod agreed yet.
    Pending,
    /// AuthMethod=None agreed, or no security stage needed.
    NotRequired,
    /// AuthMethod=CHAP agreed.
    Chap(Box<ChapExchange>),
}

/// Identity fixed by the leading request.
#[derive(Debug, Clone)]
struct Leading {
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    /// CHAP credentials the authority demands (None = no authentication).
    creds: Option<ChapCredentials>,
}

/// Per-connection login state machine.
#[derive(Debug)]
pub struct LoginMachine {
    policy: TargetKeyPolicy,
    rng: StdRng,
    /// Header fields of the first request (ISID, TSIH, CID must not change).
    first: Option<LoginRequest>,
    leading: Option<Leading>,
    /// Stage the next request must be in (its CSG).
    stage: u8,
    auth: Auth,
    negotiation: Negotiation,
    /// Text of a request split over several PDUs (C bit).
    pending_text: Vec<u8>,
    /// StatSN of the next response.
    stat_sn: u32,
    /// The first response with keys has been sent (target declarations done).
    declared: bool,
    finished: bool,
}

impl LoginMachine {
    pub fn new(policy: TargetKeyPolicy) -> Self {
        Self::with_rng(
            policy,
            StdRng::from_rng(OsRng).unwrap_or_else(|_| StdRng::seed_from_u64(0)),
        )
    }

    /// Deterministic randomness (CHAP identifiers/challenges, initial StatSN) for tests.
    pub fn with_rng(policy: TargetKeyPolicy, mut rng: StdRng) -> Self {
        let stat_sn = rng.next_u32();
        Self {
            policy,
            rng,
            first: None,
            leading: None,
            stage: SECURITY,
            auth: Auth::Pending,
            negotiation: Negotiation::default(),
            pending_text: Vec::new(),
            stat_sn,
            declared: false,
            finished: false,
        }
    }

    /// Feed one PDU received during the login phase (normally a Login Request; anything
    /// else fails the login with INVALID_DURING_LOGIN).
    pub fn on_pdu(&mut self, pdu: &Pdu, authority: &dyn LoginAuthority) -> LoginStep {
        let Bhs::LoginRequest(req) = &pdu.bhs else {
            let req = self.first.clone().unwrap_or_default();
            return self.fail(
                &req,
                LoginStatus::INVALID_DURING_LOGIN,
                "non-login PDU during login",
            );
        };
        if self.finished {
            return self.fail(
                req,
                LoginStatus::INITIATOR_ERROR,
                "login request after the login ended",
            );
        }
        match self.step(req, &pdu.data, authority) {
            Ok(step) => step,
            Err((status, reason)) => self.fail(req, status, &reason),
        }
    }

    fn step(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        authority: &dyn LoginAuthority,
    ) -> Result<LoginStep, (LoginStatus, String)> {
        let err = |reason: &str| (LoginStatus::INITIATOR_ERROR, reason.to_string());
        match &self.first {
            None => {
                // We speak version 0 only (RFC 7143 §11.12.4).
                if req.version_min > 0 {
                    return Err((
                        LoginStatus::UNSUPPORTED_VERSION,
                        format!("version {}..{}", req.version_min, req.version_max),
                    ));
                }
                if req.csg != SECURITY && req.csg != OPERATIONAL {
                    return Err(err("first request not in a negotiation stage"));
                }
                self.stage = req.csg;
                self.first = Some(req.clone());
            }
            Some(first) => {
                if (first.isid, first.tsih, first.cid) != (req.isid, req.tsih, req.cid) {
                    return Err(err("ISID, TSIH or CID changed during login"));
                }
            }
        }
        if req.csg != self.stage {
            return Err(err("CSG does not match the login stage"));
        }
        if req.transit && req.continue_ {
            return Err(err("T and C both set"));
        }
        if req.transit
            && !(req.nsg > req.csg && (req.nsg == OPERATIONAL || req.nsg == FULL_FEATURE))
        {
            return Err(err("invalid NSG"));
        }
        if self.pending_text.len() + data.len() > MAX_LOGIN_TEXT {
            return Err(err("login text too long"));
        }
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
        let pairs = parse_text(&text).map_err(|e| err(&format!("bad login text: {e}")))?;

        if self.leading.is_none() {
            self.leading = Some(self.admit(req, &pairs, authority)?);
        }
        let security = req.csg == SECURITY;
        let batch = self
            .negotiation
            .process(&pairs, security, &self.policy)
            .map_err(|e| err(&e.to_string()))?;
        let mut out = batch.responses;
        if security {
            out.extend(self.authenticate(&batch.auth)?);
        }

        // Does the target agree to move on?
        let mut transit = req.transit;
        if transit && security {
            transit = match &self.auth {
                Auth::NotRequired => true,
                Auth::Chap(x) => x.is_complete(),
                Auth::Pending if self.creds().is_none() => true,
                Auth::Pending => {
                    return Err((
                        LoginStatus::AUTH_FAILURE,
                        "initiator skipped authentication".into(),
                    ))
                }
            };
        }
        if transit && req.nsg == FULL_FEATURE && !security {
            let offers = self.negotiation.target_offers(&self.policy);
            if !offers.is_empty() || self.negotiation.pending_offers() {
                out.extend(offers);
                transit = false;
            }
        }

        // Target declarations: TPGT and alias first, our receive limit once we negotiate.
        let leading = self
            .leading
            .clone()
            .ok_or_else(|| err("no leading request"))?;
        if !self.declared {
            self.declared = true;
            if leading.session_type == SessionType::Normal {
                out.push(("TargetPortalGroupTag".into(), authority.tpgt().to_string()));
                if let Some(alias) = &self.policy.target_alias {
                    out.push(("TargetAlias".into(), alias.clone()));
                }
            }
        }
        if !security || (transit && req.nsg == FULL_FEATURE) {
            out.extend(self.negotiation.declare_mrdsl(&self.policy));
        }

        if !transit {
            return Ok(LoginStep::Continue(self.response(
                req,
                false,
                req.nsg,
                encode_text(&out),
            )));
        }
        if req.nsg != FULL_FEATURE {
            self.stage = req.nsg;
            return Ok(LoginStep::Continue(self.response(
                req,
                true,
                req.nsg,
                encode_text(&out),
            )));
        }
        let tsih = authority
            .resolve_tsih(&leading.initiator_name, leading.isid, leading.tsih)
            .map_err(|s| (s, "TSIH not accepted".to_string()))?;
        let mut pdu = self.response(req, true, FULL_FEATURE, encode_text(&out));
        if let Bhs::LoginResponse(r) = &mut pdu.bhs {
            r.tsih = tsih;
        }
        self.finished = true;
        let outcome = LoginOutcome {
            session_type: leading.session_type,
            initiator_name: leading.initiator_name,
            initiator_alias: leading.initiator_alias,
            target_name: leading.target_name,
            isid: leading.isid,
            tsih,
            cid: leading.cid,
            session: self.negotiation.session_params(),
            connection: self.negotiation.connection_params(&self.policy),
            exp_cmd_sn: req.cmd_sn,
            next_stat_sn: self.stat_sn,
        };
        tracing::info!(initiator = %outcome.initiator_name, target = ?outcome.target_name, tsih, "login complete");
        Ok(LoginStep::Complete(pdu, Box::new(outcome)))
    }

    fn creds(&self) -> Option<&ChapCredentials> {
        self.leading.as_ref().and_then(|l| l.creds.as_ref())
    }

    /// Checks of the leading (first complete) request: identity, session type, authority.
    fn admit(
        &mut self,
        req: &LoginRequest,
        pairs: &[(String, String)],
        authority: &dyn LoginAuthority,
    ) -> Result<Leading, (LoginStatus, String)> {
        let get = |k: &str| pairs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        let Some(initiator_name) = get("InitiatorName").filter(|n| !n.is_empty()) else {
            return Err((LoginStatus::MISSING_PARAMETER, "no InitiatorName".into()));
        };
        let session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => {
                return Err((
                    LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
                    format!("SessionType={other}"),
                ))
            }
        };
        let (target_name, creds) = match session_type {
            SessionType::Normal => {
                let Some(target) = get("TargetName").filter(|n| !n.is_empty()) else {
                    return Err((LoginStatus::MISSING_PARAMETER, "no TargetName".into()));
                };
                let creds = authority
                    .normal_session(&target, &initiator_name)
                    .map_err(|s| (s, format!("target {target} refused")))?;
                (Some(target), creds)
            }
            SessionType::Discovery => (
                None,
                authority
                    .discovery_session(&initiator_name)
                    .map_err(|s| (s, "discovery refused".into()))?,
            ),
        };
        if req.csg == OPERATIONAL && creds.is_some() {
            // RFC 7143 §6.3: a target that requires authentication fails a login that
            // starts in operational negotiation.
            return Err((
                LoginStatus::AUTH_FAILURE,
                "authentication required but security stage skipped".into(),
            ));
        }
        if req.csg == OPERATIONAL {
            self.auth = Auth::NotRequired;
        }
        self.negotiation = Negotiation::new(session_type == SessionType::Discovery);
        Ok(Leading {
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
            initiator_name,
            initiator_alias: get("InitiatorAlias"),
            target_name,
            session_type,
            creds,
        })
    }

    /// AuthMethod selection and the CHAP exchange of one security-stage request.
    fn authenticate(
        &mut self,
        keys: &[(&'static str, String)],
    ) -> Result<Vec<(String, String)>, (LoginStatus, String)> {
        let auth_fail = |reason: String| (LoginStatus::AUTH_FAILURE, reason);
        let mut out = Vec::new();
        let mut chap = ChapInput::default();
        let mut method = None;
        for (k, v) in keys {
            if !chap.set(k, v) {
                method = Some(v.as_str());
            }
        }
        if let Some(offered) = method {
            if !matches!(self.auth, Auth::Pending) {
                return Err((
                    LoginStatus::INITIATOR_ERROR,
                    "AuthMethod renegotiated".into(),
                ));
            }
            let offered: Vec<&str> = offered.split(',').collect();
            let answer = match self.creds().cloned() {
                Some(creds) if offered.contains(&"CHAP") => {
                    self.auth = Auth::Chap(Box::new(ChapExchange::new(creds)));
                    "CHAP"
                }
                Some(_) => {
                    return Err(auth_fail(format!(
                        "CHAP required, initiator offered AuthMethod={}",
                        offered.join(",")
                    )))
                }
                None if offered.contains(&"None") => {
                    self.auth = Auth::NotRequired;
                    "None"
                }
                // We have no secret to run CHAP with; the initiator decides what next.
                None => super::keys::REJECT,
            };
            out.push(("AuthMethod".to_string(), answer.to_string()));
        }
        if !chap.is_empty() {
            let Auth::Chap(x) = &mut self.auth else {
                return Err((
                    LoginStatus::INITIATOR_ERROR,
                    "CHAP keys without AuthMethod=CHAP".into(),
                ));
            };
            out.extend(
                x.step(&chap, &mut self.rng)
                    .map_err(|e| auth_fail(e.to_string()))?,
            );
        }
        Ok(out)
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

    /// End the login: a response with `status`, no keys, T=0.
    fn fail(&mut self, req: &LoginRequest, status: LoginStatus, reason: &str) -> LoginStep {
        self.finished = true;
        let initiator = self
            .leading
            .as_ref()
            .map_or("(unknown)", |l| l.initiator_name.as_str());
        tracing::warn!(
            initiator,
            class = status.class,
            detail = status.detail,
            reason,
            "login failed"
        );
        let mut pdu = self.response(req, false, 0, Bytes::new());
        if let Bhs::LoginResponse(r) = &mut pdu.bhs {
            r.status_class = status.class;
            r.status_detail = status.detail;
        }
        LoginStep::Fail(pdu)
    }
}
