//! Initiator-side login (RFC 7143 §6, §11.12–13), sans-IO: [`InitiatorLogin`] builds
//! Login Requests and consumes Login Responses; the session's tokio code only moves them.
//!
//! Stages: security (AuthMethod=None, or CHAP with MD5 and optional mutual CHAP), then
//! operational negotiation, then the full feature phase.

use super::{InitiatorConfig, InitiatorError};
use crate::iscsi::chap::{chap_response, decode_binary, encode_hex};
use crate::iscsi::keys;
use crate::iscsi::login::KeyPolicy;
use crate::iscsi::negotiation::Negotiation;
use crate::wire::text::{encode_text, parse_text};
use crate::wire::{Bhs, LoginRequest, LoginResponse, Pdu};
use rand::RngCore;

/// Login stage codes (CSG/NSG).
const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// RFC 7143 default MaxRecvDataSegmentLength, in force until the target declares its own.
pub const DEFAULT_MRDSL: u32 = 8192;
/// Login requests and responses share one task tag.
pub const LOGIN_ITT: u32 = 0;
/// CmdSN of the login (and of the first command after it).
pub const INITIAL_CMD_SN: u32 = 1;
/// Answer exchanges we tolerate before calling the login stuck.
const MAX_ROUNDS: u32 = 16;

pub use crate::iscsi::login::LoginParams;

/// What the target declared during login (any stage), and our own receive limit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Declared {
    target_mrdsl: u32,
    tpgt: Option<u16>,
    alias: Option<String>,
}

/// The initiator's negotiation policy: what it offers, and the bound it answers and
/// checks the target's answers with (through the shared key table).
pub fn key_policy(cfg: &InitiatorConfig) -> KeyPolicy {
    let max_burst_length = cfg.max_burst_length.clamp(512, keys::MAX_LEN);
    KeyPolicy {
        max_recv_data_segment_length: cfg.max_recv_data_segment_length,
        max_burst_length,
        first_burst_length: cfg.first_burst_length.clamp(512, max_burst_length),
        immediate_data: cfg.immediate_data,
        initial_r2t: cfg.initial_r2t,
        max_outstanding_r2t: 1,
        header_digest: cfg.header_digest,
        data_digest: cfg.data_digest,
        default_time2wait: 2,
        default_time2retain: 0,
        target_alias: None,
    }
}

/// Sequence numbers as the login leaves them, for the session to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    pub params: LoginParams,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// What to do after a Login Response.
#[derive(Debug)]
pub enum LoginStep {
    Send(Pdu),
    Done(Box<LoginResult>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Security {
    /// Sent AuthMethod=None with T=1.
    NoneOffered,
    /// Sent AuthMethod=CHAP.
    ChapOffered,
    /// Sent CHAP_A; expecting CHAP_I/CHAP_C.
    AlgorithmSent,
    /// Sent CHAP_N/CHAP_R (and our own challenge when mutual).
    ResponseSent { mutual: Option<(u8, [u8; 16])> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Security(Security),
    Operational,
}

/// The initiator half of one login.
#[derive(Debug)]
pub struct InitiatorLogin {
    cfg: InitiatorConfig,
    discovery: bool,
    isid: [u8; 6],
    stage: Stage,
    exp_stat_sn: u32,
    rounds: u32,
    policy: KeyPolicy,
    /// The shared negotiation engine, on the initiator's side.
    negotiation: Negotiation,
    declared: Declared,
}

fn pairs(v: &[(&str, String)]) -> Vec<(String, String)> {
    v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn get<'a>(keys: &'a [(String, String)], name: &str) -> Option<&'a str> {
    keys.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn num(key: &str, v: &str) -> Result<u32, InitiatorError> {
    keys::parse_number(v)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| InitiatorError::Negotiation(format!("{key}={v}: not a number")))
}

impl InitiatorLogin {
    pub fn new(cfg: InitiatorConfig, discovery: bool, isid: [u8; 6]) -> Self {
        let declared = Declared {
            target_mrdsl: DEFAULT_MRDSL,
            tpgt: None,
            alias: None,
        };
        Self {
            policy: key_policy(&cfg),
            cfg,
            discovery,
            isid,
            stage: Stage::Security(Security::NoneOffered),
            exp_stat_sn: 0,
            rounds: 0,
            negotiation: Negotiation::for_initiator(discovery),
            declared,
        }
    }

    fn request(&self, transit: bool, csg: u8, nsg: u8, keys: &[(String, String)]) -> Pdu {
        Pdu::with_data(
            Bhs::LoginRequest(LoginRequest {
                transit,
                continue_: false,
                csg,
                nsg: if transit { nsg } else { 0 },
                version_max: 0,
                version_min: 0,
                isid: self.isid,
                tsih: 0,
                itt: LOGIN_ITT,
                cid: 0,
                cmd_sn: INITIAL_CMD_SN,
                exp_stat_sn: self.exp_stat_sn,
            }),
            encode_text(keys),
        )
    }

    /// The first Login Request.
    pub fn start(&mut self) -> Pdu {
        let mut k = vec![
            ("InitiatorName", self.cfg.initiator_name.clone()),
            (
                "SessionType",
                if self.discovery {
                    "Discovery"
                } else {
                    "Normal"
                }
                .to_string(),
            ),
        ];
        if !self.discovery {
            k.push(("TargetName", self.cfg.target_name.clone()));
        }
        if self.cfg.chap.is_some() {
            k.push(("AuthMethod", "CHAP".into()));
            self.stage = Stage::Security(Security::ChapOffered);
            self.request(false, SECURITY, OPERATIONAL, &pairs(&k))
        } else {
            k.push(("AuthMethod", "None".into()));
            self.stage = Stage::Security(Security::NoneOffered);
            self.request(true, SECURITY, OPERATIONAL, &pairs(&k))
        }
    }

    /// Our operational offers.
    fn operational_offers(&mut self) -> Vec<(String, String)> {
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" }.to_string();
        let c = &self.cfg;
        let mut k = vec![
            ("HeaderDigest", digest(c.header_digest)),
            ("DataDigest", digest(c.data_digest)),
        ];
        if !self.discovery {
            let mbl = c.max_burst_length.clamp(512, keys::MAX_LEN);
            k.extend([
                ("InitialR2T", keys::bool_str(c.initial_r2t).to_string()),
                (
                    "ImmediateData",
                    keys::bool_str(c.immediate_data).to_string(),
                ),
                ("MaxBurstLength", mbl.to_string()),
                (
                    "FirstBurstLength",
                    c.first_burst_length.clamp(512, mbl).to_string(),
                ),
                ("MaxOutstandingR2T", "1".to_string()),
                ("MaxConnections", "1".to_string()),
                ("ErrorRecoveryLevel", "0".to_string()),
                ("DataPDUInOrder", "Yes".to_string()),
                ("DataSequenceInOrder", "Yes".to_string()),
                ("DefaultTime2Wait", "2".to_string()),
                ("DefaultTime2Retain", "0".to_string()),
            ]);
        }
        self.negotiation.record_offers(&pairs(&k));
        // A declaration, not an offer: the target does not answer it.
        k.push((
            "MaxRecvDataSegmentLength",
            c.max_recv_data_segment_length
                .clamp(512, keys::MAX_LEN)
                .to_string(),
        ));
        pairs(&k)
    }

    /// Consume a Login Response: the next request, or the finished login.
    pub fn on_response(&mut self, pdu: &Pdu) -> Result<LoginStep, InitiatorError> {
        let Bhs::LoginResponse(r) = &pdu.bhs else {
            return Err(InitiatorError::Protocol(format!(
                "expected a Login Response, got {:?}",
                pdu.bhs.opcode()
            )));
        };
        if r.status_class != 0 {
            // The caller logs the error it gets (the agent's reconnect loop at a bounded
            // rate): a warning here would repeat at every attempt.
            tracing::debug!(
                class = r.status_class,
                detail = r.status_detail,
                "login refused by the target"
            );
            return Err(InitiatorError::LoginFailed {
                class: r.status_class,
                detail: r.status_detail,
            });
        }
        if r.continue_ {
            // Our answers are short; a target that splits its own is not supported.
            return Err(InitiatorError::Protocol(
                "continued Login Response not supported".into(),
            ));
        }
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Err(InitiatorError::Protocol("login does not converge".into()));
        }
        self.exp_stat_sn = r.stat_sn.wrapping_add(1);
        let keys = parse_text(&pdu.data)?;
        self.note_declarations(&keys)?;
        match self.stage.clone() {
            Stage::Security(s) => self.on_security(r, s, &keys),
            Stage::Operational => self.on_operational(r, &keys),
        }
    }

    fn note_declarations(&mut self, keys: &[(String, String)]) -> Result<(), InitiatorError> {
        if let Some(v) = get(keys, "TargetPortalGroupTag") {
            self.declared.tpgt =
                Some(u16::try_from(num("TargetPortalGroupTag", v)?).map_err(|_| {
                    InitiatorError::Negotiation("TargetPortalGroupTag out of range".into())
                })?);
        }
        if let Some(v) = get(keys, "TargetAlias") {
            self.declared.alias = Some(v.to_string());
        }
        if let Some(v) = get(keys, "MaxRecvDataSegmentLength") {
            let n = num("MaxRecvDataSegmentLength", v)?;
            if !(512..=keys::MAX_LEN).contains(&n) {
                return Err(InitiatorError::Negotiation(format!(
                    "target MaxRecvDataSegmentLength {n} out of range"
                )));
            }
            self.declared.target_mrdsl = n;
        }
        Ok(())
    }

    fn enter_operational(&mut self) -> LoginStep {
        self.stage = Stage::Operational;
        let k = self.operational_offers();
        LoginStep::Send(self.request(true, OPERATIONAL, FULL_FEATURE, &k))
    }

    fn on_security(
        &mut self,
        r: &LoginResponse,
        s: Security,
        keys: &[(String, String)],
    ) -> Result<LoginStep, InitiatorError> {
        let method = get(keys, "AuthMethod");
        match s {
            Security::NoneOffered => {
                if method.is_some_and(|m| m != "None") {
                    return Err(InitiatorError::Negotiation(format!(
                        "target answered AuthMethod={}",
                        method.unwrap_or_default()
                    )));
                }
                self.security_transit(r)
            }
            Security::ChapOffered => match method {
                Some("CHAP") => {
                    self.stage = Stage::Security(Security::AlgorithmSent);
                    Ok(LoginStep::Send(self.request(
                        false,
                        SECURITY,
                        OPERATIONAL,
                        &pairs(&[("CHAP_A", "5".into())]),
                    )))
                }
                Some("None") if self.cfg.mutual_chap.is_none() => {
                    // The target needs no authentication; CHAP is not forced on it.
                    self.stage = Stage::Security(Security::NoneOffered);
                    self.security_transit(r)
                }
                other => Err(InitiatorError::TargetAuth(format!(
                    "target does not authenticate with CHAP (AuthMethod={})",
                    other.unwrap_or("absent")
                ))),
            },
            Security::AlgorithmSent => self.answer_chap_challenge(keys),
            Security::ResponseSent { mutual } => {
                if let Some((id, challenge)) = mutual {
                    self.verify_mutual_chap(id, &challenge, keys)?;
                }
                self.security_transit(r)
            }
        }
    }

    /// CHAP_I/CHAP_C arrived: answer with CHAP_N/CHAP_R (and our own challenge when
    /// mutual CHAP is configured).
    fn answer_chap_challenge(
        &mut self,
        keys: &[(String, String)],
    ) -> Result<LoginStep, InitiatorError> {
        if get(keys, "CHAP_A") != Some("5") {
            return Err(InitiatorError::Negotiation(
                "target did not select CHAP_A=5 (MD5)".into(),
            ));
        }
        let id = get(keys, "CHAP_I")
            .and_then(keys::parse_number)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| InitiatorError::Negotiation("bad or missing CHAP_I".into()))?;
        let challenge = get(keys, "CHAP_C")
            .and_then(decode_binary)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| InitiatorError::Negotiation("bad or missing CHAP_C".into()))?;
        let Some((user, secret)) = self.cfg.chap.clone() else {
            return Err(InitiatorError::Protocol("CHAP without credentials".into()));
        };
        let mut out = vec![
            ("CHAP_N", user),
            (
                "CHAP_R",
                encode_hex(&chap_response(id, &secret, &challenge)),
            ),
        ];
        let mutual = if self.cfg.mutual_chap.is_some() {
            let mut rng = rand::thread_rng();
            let mut ours = [0u8; 16];
            rng.fill_bytes(&mut ours);
            let our_id = (rng.next_u32() & 0xff) as u8;
            out.push(("CHAP_I", our_id.to_string()));
            out.push(("CHAP_C", encode_hex(&ours)));
            Some((our_id, ours))
        } else {
            None
        };
        self.stage = Stage::Security(Security::ResponseSent { mutual });
        Ok(LoginStep::Send(self.request(
            true,
            SECURITY,
            OPERATIONAL,
            &pairs(&out),
        )))
    }

    /// Check the target's answer to our mutual-CHAP challenge `(id, challenge)`.
    fn verify_mutual_chap(
        &mut self,
        id: u8,
        challenge: &[u8; 16],
        keys: &[(String, String)],
    ) -> Result<(), InitiatorError> {
        let Some((tuser, tsecret)) = self.cfg.mutual_chap.as_ref() else {
            return Ok(());
        };
        let name = get(keys, "CHAP_N");
        if name != Some(tuser.as_str()) {
            return Err(InitiatorError::TargetAuth(format!(
                "target CHAP_N {name:?} is not {tuser:?}"
            )));
        }
        let expected = chap_response(id, tsecret, challenge);
        let got = get(keys, "CHAP_R").and_then(decode_binary);
        if got.as_deref() != Some(&expected[..]) {
            return Err(InitiatorError::TargetAuth(
                "target CHAP_R does not match".into(),
            ));
        }
        // Verified once; later responses in this stage need not repeat it.
        self.stage = Stage::Security(Security::ResponseSent { mutual: None });
        Ok(())
    }

    /// After authentication: move on once the target agrees to leave the security stage.
    fn security_transit(&mut self, r: &LoginResponse) -> Result<LoginStep, InitiatorError> {
        if r.transit {
            if r.nsg == OPERATIONAL {
                return Ok(self.enter_operational());
            }
            return Err(InitiatorError::Protocol(format!(
                "target moved from security stage to stage {}",
                r.nsg
            )));
        }
        Ok(LoginStep::Send(self.request(
            true,
            SECURITY,
            OPERATIONAL,
            &[],
        )))
    }

    fn on_operational(
        &mut self,
        r: &LoginResponse,
        keys: &[(String, String)],
    ) -> Result<LoginStep, InitiatorError> {
        // Declarations were noted already; the rest are answers to our offers (checked
        // against our policy) and offers of the target (answered by the same table).
        let negotiable: Vec<(String, String)> = keys
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "TargetPortalGroupTag"
                        | "TargetAlias"
                        | "MaxRecvDataSegmentLength"
                        | "TargetAddress"
                )
            })
            .cloned()
            .collect();
        let answers = self
            .negotiation
            .process(&negotiable, false, &self.policy)
            .map_err(|e| InitiatorError::Negotiation(format!("target: {e}")))?
            .responses;
        if r.transit && answers.is_empty() {
            if r.nsg != FULL_FEATURE {
                return Err(InitiatorError::Protocol(format!(
                    "target moved to stage {} instead of full feature phase",
                    r.nsg
                )));
            }
            return Ok(LoginStep::Done(Box::new(self.result(r))));
        }
        Ok(LoginStep::Send(self.request(
            true,
            OPERATIONAL,
            FULL_FEATURE,
            &answers,
        )))
    }

    /// The finished login: offers the target never answered keep their defaults.
    fn result(&mut self, r: &LoginResponse) -> LoginResult {
        self.negotiation.drop_unanswered();
        let session = self.negotiation.session_params();
        let mut connection = self.negotiation.connection_params(&self.policy);
        connection.target_max_recv_data_segment_length = self.declared.target_mrdsl;
        LoginResult {
            params: LoginParams {
                session,
                connection,
                tsih: r.tsih,
                target_portal_group_tag: self.declared.tpgt,
                target_alias: self.declared.alias.clone(),
            },
            cmd_sn: INITIAL_CMD_SN,
            exp_stat_sn: self.exp_stat_sn,
            exp_cmd_sn: r.exp_cmd_sn,
            max_cmd_sn: r.max_cmd_sn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn cfg() -> InitiatorConfig {
        InitiatorConfig::new(
            "iqn.2026-11.org.test:init",
            "iqn.2026-11.org.test:tgt",
            SocketAddr::from((Ipv4Addr::LOCALHOST, 3260)),
        )
    }

    fn resp(transit: bool, csg: u8, nsg: u8, keys: &[(&str, &str)]) -> Pdu {
        let k: Vec<(String, String)> = keys
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Pdu::with_data(
            Bhs::LoginResponse(LoginResponse {
                transit,
                csg,
                nsg,
                tsih: 7,
                stat_sn: 41,
                exp_cmd_sn: 1,
                max_cmd_sn: 128,
                ..Default::default()
            }),
            encode_text(&k),
        )
    }

    fn sent_keys(step: LoginStep) -> (LoginRequest, Vec<(String, String)>) {
        let LoginStep::Send(p) = step else {
            panic!("expected a request")
        };
        let Bhs::LoginRequest(r) = p.bhs else {
            panic!("not a login request")
        };
        (r, parse_text(&p.data).unwrap())
    }

    #[test]
    fn plain_login_reaches_full_feature_phase() {
        let mut l = InitiatorLogin::new(cfg(), false, [0x80, 1, 2, 3, 4, 5]);
        let first = l.start();
        let Bhs::LoginRequest(r) = &first.bhs else {
            panic!()
        };
        assert!(r.transit && r.csg == 0 && r.nsg == 1);
        let (r, keys) = sent_keys(
            l.on_response(&resp(
                true,
                0,
                1,
                &[("AuthMethod", "None"), ("TargetPortalGroupTag", "3")],
            ))
            .unwrap(),
        );
        assert_eq!((r.csg, r.nsg, r.exp_stat_sn), (1, 3, 42));
        assert_eq!(get(&keys, "ErrorRecoveryLevel"), Some("0"));
        let step = l
            .on_response(&resp(
                true,
                1,
                3,
                &[
                    ("HeaderDigest", "None"),
                    ("DataDigest", "None"),
                    ("MaxBurstLength", "65536"),
                    ("FirstBurstLength", "8192"),
                    ("ImmediateData", "No"),
                    ("InitialR2T", "Yes"),
                    ("MaxRecvDataSegmentLength", "16384"),
                ],
            ))
            .unwrap();
        let LoginStep::Done(res) = step else { panic!() };
        let n = res.params;
        assert_eq!(n.session.max_burst_length, 65536);
        assert_eq!(n.session.first_burst_length, 8192);
        assert!(!n.session.immediate_data && n.session.initial_r2t);
        assert_eq!(n.connection.target_max_recv_data_segment_length, 16384);
        assert_eq!(n.target_portal_group_tag, Some(3));
        assert_eq!(n.tsih, 7);
    }

    #[test]
    fn chap_with_mutual_verifies_the_target() {
        let mut c = cfg();
        c.chap = Some(("alice".into(), b"alice-secret-1".to_vec()));
        c.mutual_chap = Some(("tgt".into(), b"target-secret-2".to_vec()));
        let mut l = InitiatorLogin::new(c, false, [0x80, 0, 0, 0, 0, 1]);
        l.start();
        let (_, k) = sent_keys(
            l.on_response(&resp(false, 0, 0, &[("AuthMethod", "CHAP")]))
                .unwrap(),
        );
        assert_eq!(get(&k, "CHAP_A"), Some("5"));
        let (r, k) = sent_keys(
            l.on_response(&resp(
                false,
                0,
                0,
                &[("CHAP_A", "5"), ("CHAP_I", "9"), ("CHAP_C", "0x0102030405")],
            ))
            .unwrap(),
        );
        assert!(r.transit);
        let expect = encode_hex(&chap_response(9, b"alice-secret-1", &[1, 2, 3, 4, 5]));
        assert_eq!(get(&k, "CHAP_R"), Some(expect.as_str()));
        let id = get(&k, "CHAP_I").unwrap().parse::<u8>().unwrap();
        let ch = decode_binary(get(&k, "CHAP_C").unwrap()).unwrap();
        // A wrong answer from the target is refused.
        let mut bad = InitiatorLogin {
            stage: l.stage.clone(),
            cfg: l.cfg.clone(),
            policy: l.policy.clone(),
            ..InitiatorLogin::new(cfg(), false, [0; 6])
        };
        let wrong = encode_hex(&chap_response(id, b"nope-nope-nope", &ch));
        assert!(matches!(
            bad.on_response(&resp(true, 0, 1, &[("CHAP_N", "tgt"), ("CHAP_R", &wrong)])),
            Err(InitiatorError::TargetAuth(_))
        ));
        let right = encode_hex(&chap_response(id, b"target-secret-2", &ch));
        let (r, _) = sent_keys(
            l.on_response(&resp(true, 0, 1, &[("CHAP_N", "tgt"), ("CHAP_R", &right)]))
                .unwrap(),
        );
        assert_eq!((r.csg, r.nsg), (1, 3));
    }

    #[test]
    fn refusal_carries_status() {
        let mut l = InitiatorLogin::new(cfg(), false, [0; 6]);
        l.start();
        let mut p = resp(false, 0, 0, &[]);
        if let Bhs::LoginResponse(r) = &mut p.bhs {
            r.status_class = 2;
            r.status_detail = 3;
        }
        let e = l.on_response(&p).unwrap_err();
        assert_eq!(e.login_status(), Some((2, 3)));
    }

    #[test]
    fn target_offer_is_answered() {
        let mut l = InitiatorLogin::new(cfg(), false, [0; 6]);
        l.start();
        l.on_response(&resp(true, 0, 1, &[])).unwrap();
        let (r, k) = sent_keys(
            l.on_response(&resp(
                false,
                1,
                0,
                &[("MaxBurstLength", "4096"), ("IFMarker", "No")],
            ))
            .unwrap(),
        );
        assert!(r.transit);
        assert_eq!(get(&k, "IFMarker"), Some("No"));
        let LoginStep::Done(res) = l.on_response(&resp(true, 1, 3, &[])).unwrap() else {
            panic!()
        };
        assert_eq!(res.params.session.max_burst_length, 4096);
    }

    /// Logs in up to the operational stage with `c`; returns the login.
    fn to_operational(c: InitiatorConfig) -> InitiatorLogin {
        let mut l = InitiatorLogin::new(c, false, [0; 6]);
        l.start();
        l.on_response(&resp(true, 0, 1, &[])).unwrap();
        l
    }

    #[test]
    fn target_offers_answered_by_the_shared_table() {
        let mut c = cfg();
        c.immediate_data = false;
        c.max_burst_length = 65536;
        let mut l = to_operational(c);
        // Answers to our offers first, then offers of the target's own.
        let (r, k) = sent_keys(
            l.on_response(&resp(
                false,
                1,
                0,
                &[
                    ("MaxBurstLength", "65536"),
                    ("IFMarker", "Yes"),
                    ("OFMarkInt", "2048"),
                    ("iSCSIProtocolLevel", "2"),
                    ("X-vendor.Key", "1"),
                ],
            ))
            .unwrap(),
        );
        assert!(r.transit && (r.csg, r.nsg) == (1, 3));
        // The same answers the target's table gives: AND with our No, Reject for the
        // obsolete key, Minimum against our bound, NotUnderstood for the unknown.
        assert_eq!(get(&k, "IFMarker"), Some("No"));
        assert_eq!(get(&k, "OFMarkInt"), Some("Reject"));
        assert_eq!(get(&k, "iSCSIProtocolLevel"), Some("1"));
        assert_eq!(get(&k, "X-vendor.Key"), Some("NotUnderstood"));
        // MaxBurstLength answered our offer: nothing to say back.
        assert_eq!(get(&k, "MaxBurstLength"), None);
        let LoginStep::Done(res) = l.on_response(&resp(true, 1, 3, &[])).unwrap() else {
            panic!()
        };
        assert_eq!(res.params.session.max_burst_length, 65536);
        // ImmediateData was offered but never answered: the default (Yes) stays.
        assert!(res.params.session.immediate_data);
    }

    #[test]
    fn target_offer_of_digests_follows_our_policy() {
        let mut l = to_operational(cfg());
        // We offered HeaderDigest=None; answering None, the result holds no digests.
        let step = l
            .on_response(&resp(
                true,
                1,
                3,
                &[("HeaderDigest", "None"), ("DataDigest", "None")],
            ))
            .unwrap();
        let LoginStep::Done(res) = step else { panic!() };
        assert!(!res.params.connection.header_digest && !res.params.connection.data_digest);
        assert_eq!(res.params.session.max_burst_length, 262_144);
        assert_eq!(
            res.params.connection.initiator_max_recv_data_segment_length,
            256 * 1024
        );
        assert_eq!(
            res.params.connection.target_max_recv_data_segment_length,
            DEFAULT_MRDSL
        );
    }

    #[test]
    fn contradictory_answers_from_the_target_fail_the_login() {
        let bad = |c: InitiatorConfig, key: &str, value: &str| {
            let mut l = to_operational(c);
            let e = l
                .on_response(&resp(true, 1, 3, &[(key, value)]))
                .expect_err(key);
            assert!(matches!(e, InitiatorError::Negotiation(_)), "{key}: {e:?}");
        };
        let mut c = cfg();
        c.max_burst_length = 65536;
        c.immediate_data = false;
        c.initial_r2t = true;
        bad(c.clone(), "MaxBurstLength", "131072");
        bad(c.clone(), "ImmediateData", "Yes");
        bad(c.clone(), "InitialR2T", "No");
        bad(c.clone(), "HeaderDigest", "CRC32C");
        bad(c.clone(), "ErrorRecoveryLevel", "1");
        bad(c.clone(), "DataPDUInOrder", "No");
        bad(c.clone(), "DefaultTime2Wait", "1");
        bad(c.clone(), "DefaultTime2Retain", "20");
        bad(c.clone(), "MaxBurstLength", "banana");
        // A key only the initiator may send.
        bad(c, "InitiatorName", "iqn.x");
    }

    #[test]
    fn rejected_offer_keeps_the_default() {
        let mut c = cfg();
        c.immediate_data = false;
        let mut l = to_operational(c);
        let step = l
            .on_response(&resp(
                true,
                1,
                3,
                &[
                    ("ImmediateData", "Reject"),
                    ("MaxBurstLength", "Irrelevant"),
                ],
            ))
            .unwrap();
        let LoginStep::Done(res) = step else { panic!() };
        // RFC 7143 defaults: ImmediateData=Yes, MaxBurstLength=262144.
        assert!(res.params.session.immediate_data);
        assert_eq!(res.params.session.max_burst_length, 262_144);
    }
}
