//! Initiator-side login (RFC 7143 §6, §11.12–13), sans-IO: [`InitiatorLogin`] builds
//! Login Requests and consumes Login Responses; the session's tokio code only moves them.
//!
//! Stages: security (AuthMethod=None, or CHAP with MD5 and optional mutual CHAP), then
//! operational negotiation, then the full feature phase.

use super::{InitiatorConfig, InitiatorError};
use crate::iscsi::chap::{chap_response, decode_binary, encode_hex};
use crate::iscsi::keys::{self, Rule};
use crate::wire::text::{encode_text, parse_text};
use crate::wire::{Bhs, LoginRequest, LoginResponse, Pdu};
use rand::RngCore;
use std::collections::HashMap;

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

/// The parameters in force after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept (what we declared).
    pub max_recv_data_segment_length: u32,
    /// Largest data segment the target accepts: the bound for our Data-Out and immediate data.
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub error_recovery_level: u8,
    pub target_portal_group_tag: Option<u16>,
    pub target_alias: Option<String>,
    pub tsih: u16,
}

impl Negotiated {
    /// RFC 7143 defaults, adjusted as keys are agreed.
    fn defaults(our_mrdsl: u32) -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: our_mrdsl,
            target_max_recv_data_segment_length: DEFAULT_MRDSL,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            error_recovery_level: 0,
            target_portal_group_tag: None,
            target_alias: None,
            tsih: 0,
        }
    }
}

/// Sequence numbers as the login leaves them, for the session to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    pub negotiated: Negotiated,
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
    /// Operational keys we offered, with the value offered.
    offered: HashMap<String, String>,
    negotiated: Negotiated,
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

fn is_special(v: &str) -> bool {
    matches!(v, keys::NOT_UNDERSTOOD | keys::IRRELEVANT | keys::REJECT)
}

fn num(key: &str, v: &str) -> Result<u32, InitiatorError> {
    keys::parse_number(v)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| InitiatorError::Negotiation(format!("{key}={v}: not a number")))
}

fn flag(key: &str, v: &str) -> Result<bool, InitiatorError> {
    keys::parse_bool(v).ok_or_else(|| InitiatorError::Negotiation(format!("{key}={v}: not Yes/No")))
}

impl InitiatorLogin {
    pub fn new(cfg: InitiatorConfig, discovery: bool, isid: [u8; 6]) -> Self {
        let negotiated = Negotiated::defaults(cfg.max_recv_data_segment_length);
        Self {
            cfg,
            discovery,
            isid,
            stage: Stage::Security(Security::NoneOffered),
            exp_stat_sn: 0,
            rounds: 0,
            offered: HashMap::new(),
            negotiated,
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
        self.offered = k.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
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
            tracing::warn!(
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
            self.negotiated.target_portal_group_tag =
                Some(u16::try_from(num("TargetPortalGroupTag", v)?).map_err(|_| {
                    InitiatorError::Negotiation("TargetPortalGroupTag out of range".into())
                })?);
        }
        if let Some(v) = get(keys, "TargetAlias") {
            self.negotiated.target_alias = Some(v.to_string());
        }
        if let Some(v) = get(keys, "MaxRecvDataSegmentLength") {
            let n = num("MaxRecvDataSegmentLength", v)?;
            if !(512..=keys::MAX_LEN).contains(&n) {
                return Err(InitiatorError::Negotiation(format!(
                    "target MaxRecvDataSegmentLength {n} out of range"
                )));
            }
            self.negotiated.target_max_recv_data_segment_length = n;
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
            Security::AlgorithmSent => {
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
            Security::ResponseSent { mutual } => {
                if let (Some((id, challenge)), Some((tuser, tsecret))) =
                    (mutual, self.cfg.mutual_chap.as_ref())
                {
                    let name = get(keys, "CHAP_N");
                    if name != Some(tuser.as_str()) {
                        return Err(InitiatorError::TargetAuth(format!(
                            "target CHAP_N {name:?} is not {tuser:?}"
                        )));
                    }
                    let expected = chap_response(id, tsecret, &challenge);
                    let got = get(keys, "CHAP_R").and_then(decode_binary);
                    if got.as_deref() != Some(&expected[..]) {
                        return Err(InitiatorError::TargetAuth(
                            "target CHAP_R does not match".into(),
                        ));
                    }
                    // Verified once; later responses in this stage need not repeat it.
                    self.stage = Stage::Security(Security::ResponseSent { mutual: None });
                }
                self.security_transit(r)
            }
        }
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
        let mut answers = Vec::new();
        for (k, v) in keys {
            if matches!(
                k.as_str(),
                "TargetPortalGroupTag" | "TargetAlias" | "MaxRecvDataSegmentLength"
            ) {
                continue;
            }
            if let Some(offer) = self.offered.remove(k) {
                self.apply(k, v, Some(&offer))?;
            } else if k == "TargetAddress" {
                continue;
            } else {
                // The target offers a key we did not: answer it, and abide by the result.
                let ans = self.answer_offer(k, v);
                if !is_special(&ans) {
                    self.apply(k, &ans, None)?;
                }
                answers.push((k.clone(), ans));
            }
        }
        if r.transit && answers.is_empty() {
            if r.nsg != FULL_FEATURE {
                return Err(InitiatorError::Protocol(format!(
                    "target moved to stage {} instead of full feature phase",
                    r.nsg
                )));
            }
            // Offers the target never answered keep their defaults.
            self.offered.clear();
            self.negotiated.tsih = r.tsih;
            if self.negotiated.first_burst_length > self.negotiated.max_burst_length {
                self.negotiated.first_burst_length = self.negotiated.max_burst_length;
            }
            return Ok(LoginStep::Done(Box::new(LoginResult {
                negotiated: self.negotiated.clone(),
                cmd_sn: INITIAL_CMD_SN,
                exp_stat_sn: self.exp_stat_sn,
                exp_cmd_sn: r.exp_cmd_sn,
                max_cmd_sn: r.max_cmd_sn,
            })));
        }
        Ok(LoginStep::Send(self.request(
            true,
            OPERATIONAL,
            FULL_FEATURE,
            &answers,
        )))
    }

    /// Our answer to a key the target offered, by the key's negotiation rule.
    fn answer_offer(&self, key: &str, value: &str) -> String {
        let Some(def) = keys::lookup(key) else {
            return keys::NOT_UNDERSTOOD.to_string();
        };
        let ours_num = |k: &str| -> Option<u64> {
            Some(u64::from(match k {
                "MaxBurstLength" => self.cfg.max_burst_length,
                "FirstBurstLength" => self.cfg.first_burst_length,
                "MaxOutstandingR2T" | "MaxConnections" => 1,
                "ErrorRecoveryLevel" => 0,
                _ => return None,
            }))
        };
        match def.rule {
            Rule::List => {
                let want_crc = match key {
                    "HeaderDigest" => self.cfg.header_digest,
                    "DataDigest" => self.cfg.data_digest,
                    _ => true,
                };
                let vals: Vec<&str> = value.split(',').collect();
                if key.ends_with("Digest") {
                    let pick = if want_crc { "CRC32C" } else { "None" };
                    if vals.contains(&pick) {
                        return pick.into();
                    }
                    if vals.contains(&"None") {
                        return "None".into();
                    }
                    return keys::REJECT.into();
                }
                vals.first().map_or(keys::REJECT.into(), |v| v.to_string())
            }
            Rule::Min | Rule::Max => match keys::parse_number(value) {
                Some(theirs) => {
                    let r = match ours_num(key) {
                        Some(o) if def.rule == Rule::Min => theirs.min(o),
                        Some(o) => theirs.max(o),
                        None => theirs,
                    };
                    r.to_string()
                }
                None => keys::REJECT.into(),
            },
            Rule::And | Rule::Or => match keys::parse_bool(value) {
                Some(theirs) => {
                    let ours = match key {
                        "InitialR2T" => self.cfg.initial_r2t,
                        "ImmediateData" => self.cfg.immediate_data,
                        _ => theirs,
                    };
                    let r = if def.rule == Rule::And {
                        theirs && ours
                    } else {
                        theirs || ours
                    };
                    keys::bool_str(r).into()
                }
                None => keys::REJECT.into(),
            },
            Rule::Declarative => {
                // Nothing to answer; declarations are noted above.
                keys::IRRELEVANT.into()
            }
            _ => keys::REJECT.into(),
        }
    }

    /// Record an agreed value (the target's answer to our offer, or ours to its offer).
    fn apply(&mut self, key: &str, value: &str, offer: Option<&str>) -> Result<(), InitiatorError> {
        if is_special(value) {
            // Rejected or irrelevant: the default stays in force.
            tracing::debug!(key, value, "offer not taken; default applies");
            return Ok(());
        }
        if let Some(offer) = offer {
            if let Some(def) = keys::lookup(key) {
                let bad = match def.rule {
                    Rule::List => !offer.split(',').any(|o| o == value),
                    Rule::Min => num(key, value)? > num(key, offer)?,
                    Rule::Max => num(key, value)? < num(key, offer)?,
                    Rule::And => flag(key, value)? && !flag(key, offer)?,
                    Rule::Or => !flag(key, value)? && flag(key, offer)?,
                    _ => false,
                };
                if bad {
                    return Err(InitiatorError::Negotiation(format!(
                        "target answered {key}={value} to our offer {offer}"
                    )));
                }
            }
        }
        let n = &mut self.negotiated;
        match key {
            "HeaderDigest" => n.header_digest = value == "CRC32C",
            "DataDigest" => n.data_digest = value == "CRC32C",
            "MaxBurstLength" => n.max_burst_length = num(key, value)?,
            "FirstBurstLength" => n.first_burst_length = num(key, value)?,
            "ImmediateData" => n.immediate_data = flag(key, value)?,
            "InitialR2T" => n.initial_r2t = flag(key, value)?,
            "MaxOutstandingR2T" => n.max_outstanding_r2t = num(key, value)?,
            "ErrorRecoveryLevel" => {
                let erl = num(key, value)?;
                if erl != 0 {
                    return Err(InitiatorError::Negotiation(format!(
                        "ErrorRecoveryLevel={erl} not supported"
                    )));
                }
                n.error_recovery_level = 0;
            }
            "DataPDUInOrder" | "DataSequenceInOrder" if !flag(key, value)? => {
                // Our Data-In collection copies by offset, so order does not matter.
            }
            _ => {}
        }
        Ok(())
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
        let n = res.negotiated;
        assert_eq!(n.max_burst_length, 65536);
        assert_eq!(n.first_burst_length, 8192);
        assert!(!n.immediate_data && n.initial_r2t);
        assert_eq!(n.target_max_recv_data_segment_length, 16384);
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
            offered: HashMap::new(),
            negotiated: l.negotiated.clone(),
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
        assert_eq!(res.negotiated.max_burst_length, 4096);
    }
}
