//! Key negotiation state of one login (RFC 7143 §6.2, §6.3): which keys were offered,
//! what was agreed, and what we offered ourselves. The same engine serves the target
//! ([`super::login`]) and the initiator (`crate::initiator::login`); every per-key
//! decision comes from the table in [`super::keys`] applied to a [`KeyPolicy`].

use super::keys::{self, lookup, parse_bool, parse_number, Agreed, KeyDef, Rule, Sender};
use super::login::{ConnectionParams, KeyPolicy, SessionParams};
use std::collections::BTreeMap;

/// Negotiation errors: each ends the login with INITIATOR_ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("key {0} offered more than once")]
    Duplicate(String),
    #[error("key {0} may not be sent by the peer")]
    WrongSender(&'static str),
    #[error("security key {0} outside the security stage")]
    SecurityKeyLate(&'static str),
    #[error("answer {value:?} to our offer of {key} breaks its result function")]
    BadAnswer { key: &'static str, value: String },
}

/// Result of processing one request's keys.
#[derive(Debug, Default)]
pub struct Batch {
    /// Answers to the initiator's offers, in order.
    pub responses: Vec<(String, String)>,
    /// Authentication keys (AuthMethod, CHAP_*), left for the login/CHAP code.
    pub auth: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct Negotiation {
    discovery: bool,
    /// This side is the initiator (else the target).
    initiator: bool,
    /// Values in force: agreed answers and accepted declarations.
    agreed: BTreeMap<&'static str, String>,
    /// Every key the initiator sent, with its value (repeats are errors).
    seen: BTreeMap<String, String>,
    /// Keys we offered and still await an answer for.
    offered: BTreeMap<&'static str, String>,
    declared_mrdsl: bool,
}

impl Agreed for Negotiation {
    fn num(&self, key: &str) -> u32 {
        self.value(key)
            .and_then(parse_number)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }
    fn flag(&self, key: &str) -> bool {
        self.value(key).and_then(parse_bool).unwrap_or(false)
    }
}

fn is_special_answer(v: &str) -> bool {
    v == keys::NOT_UNDERSTOOD || v == keys::IRRELEVANT || v == keys::REJECT
}

impl Negotiation {
    /// The target's side of a login.
    pub fn new(discovery: bool) -> Self {
        Self {
            discovery,
            ..Self::default()
        }
    }

    /// The initiator's side of a login.
    pub fn for_initiator(discovery: bool) -> Self {
        Self {
            discovery,
            initiator: true,
            ..Self::default()
        }
    }

    /// Keys only this side may send (the peer sending one is an error).
    fn own_only(&self) -> Sender {
        if self.initiator {
            Sender::Initiator
        } else {
            Sender::Target
        }
    }

    /// Record offers we send (keys outside the table are ignored); the peer's answers
    /// are then checked against our policy by [`Negotiation::process`].
    pub fn record_offers(&mut self, offers: &[(String, String)]) {
        for (k, v) in offers {
            if let Some(def) = lookup(k) {
                if def.rule != Rule::Declarative {
                    self.offered.insert(def.name, v.clone());
                }
            }
        }
    }

    /// Forget offers never answered: their defaults stay in force.
    pub fn drop_unanswered(&mut self) {
        self.offered.clear();
    }

    /// The value in force for `key`: agreed or declared, else the table default.
    pub fn value(&self, key: &str) -> Option<&str> {
        match lookup(key) {
            Some(def) => self
                .agreed
                .get(def.name)
                .map(String::as_str)
                .or(def.default),
            None => None,
        }
    }

    /// Was `key` sent by the initiator (or agreed)?
    pub fn declared(&self, key: &str) -> Option<&str> {
        self.agreed.get(key).map(String::as_str)
    }

    /// Process the keys of one complete request. `security` = security stage.
    pub fn process(
        &mut self,
        pairs: &[(String, String)],
        security: bool,
        policy: &KeyPolicy,
    ) -> Result<Batch, NegotiationError> {
        let mut batch = Batch::default();
        // Keys with cross-key rules are answered after the rest of the request, so that
        // e.g. FirstBurstLength sees the MaxBurstLength/InitialR2T of the same PDU.
        let mut deferred: Vec<(&'static KeyDef, &str)> = Vec::new();
        for (k, v) in pairs {
            if let Some((name, ours)) = self.offered.remove_entry(k.as_str()) {
                self.seen.insert(k.clone(), v.clone());
                self.take_answer(name, &ours, v, policy)?;
                continue;
            }
            let def = lookup(k);
            if let Some(prev) = self.seen.get(k) {
                if def.is_some_and(|d| d.repeatable) && prev == v {
                    continue;
                }
                return Err(NegotiationError::Duplicate(k.clone()));
            }
            self.seen.insert(k.clone(), v.clone());
            let Some(def) = def else {
                tracing::debug!(key = %k, "key not understood");
                batch
                    .responses
                    .push((k.clone(), keys::NOT_UNDERSTOOD.into()));
                continue;
            };
            if def.sender == self.own_only() {
                return Err(NegotiationError::WrongSender(def.name));
            }
            if def.rule == Rule::Auth {
                if !security {
                    return Err(NegotiationError::SecurityKeyLate(def.name));
                }
                batch.auth.push((def.name, v.clone()));
                continue;
            }
            if is_special_answer(v) {
                // An answer to an offer we never made: nothing to agree on.
                tracing::debug!(key = %k, value = %v, "ignoring unsolicited answer");
                continue;
            }
            if def.irrelevant.is_some() || def.cap.is_some() {
                deferred.push((def, v));
                continue;
            }
            self.answer_offer(def, v, policy, &mut batch);
        }
        for (def, v) in deferred {
            self.answer_offer(def, v, policy, &mut batch);
        }
        Ok(batch)
    }

    fn answer_offer(
        &mut self,
        def: &'static KeyDef,
        value: &str,
        policy: &KeyPolicy,
        batch: &mut Batch,
    ) {
        match keys::answer(def, value, policy, self.discovery, self) {
            Some(ans) => {
                if !is_special_answer(&ans) {
                    self.agreed.insert(def.name, ans.clone());
                }
                batch.responses.push((def.name.into(), ans));
            }
            // Accepted declaration.
            None => {
                self.agreed.insert(def.name, value.into());
            }
        }
    }

    fn take_answer(
        &mut self,
        name: &'static str,
        ours: &str,
        value: &str,
        policy: &KeyPolicy,
    ) -> Result<(), NegotiationError> {
        if is_special_answer(value) {
            tracing::warn!(
                key = name,
                offered = ours,
                answer = value,
                "peer refused our offer; default applies"
            );
            return Ok(());
        }
        let Some(def) = lookup(name) else {
            return Ok(());
        };
        // A valid answer combined with our bound must give the answer back.
        match keys::answer(def, value, policy, self.discovery, self) {
            Some(ans) if ans == value => {
                self.agreed.insert(name, ans);
                Ok(())
            }
            // Other answers made the key moot; its default stands.
            Some(ans) if ans == keys::IRRELEVANT => Ok(()),
            _ => Err(NegotiationError::BadAnswer {
                key: name,
                value: value.into(),
            }),
        }
    }

    /// Offers the target must make before leaving operational negotiation: keys the
    /// initiator did not offer whose default our policy cannot accept. Empty when
    /// nothing needs changing (the common case with default policies).
    pub fn target_offers(&mut self, policy: &KeyPolicy) -> Vec<(String, String)> {
        let mut out = Vec::new();
        // Keys with cross-key rules are judged last, seeing our other offers as agreed.
        for cross in [false, true] {
            let view = if cross {
                let mut v = self.clone();
                v.agreed
                    .extend(self.offered.iter().map(|(k, o)| (*k, o.clone())));
                v
            } else {
                self.clone()
            };
            for def in keys::KEYS {
                if (def.irrelevant.is_some() || def.cap.is_some()) != cross
                    || !matches!(
                        def.rule,
                        Rule::Min | Rule::Max | Rule::And | Rule::Or | Rule::List
                    )
                    || self.seen.contains_key(def.name)
                    || self.agreed.contains_key(def.name)
                    || self.offered.contains_key(def.name)
                {
                    continue;
                }
                let Some(default) = def.default else { continue };
                let Some(ans) = keys::answer(def, default, policy, self.discovery, &view) else {
                    continue;
                };
                if is_special_answer(&ans) || ans == default {
                    continue;
                }
                self.offered.insert(def.name, ans.clone());
                out.push((def.name.to_string(), ans));
            }
        }
        out
    }

    /// Offers still unanswered.
    pub fn pending_offers(&self) -> bool {
        !self.offered.is_empty()
    }

    /// Our MaxRecvDataSegmentLength declaration, once per login.
    pub fn declare_mrdsl(&mut self, policy: &KeyPolicy) -> Option<(String, String)> {
        if self.declared_mrdsl {
            return None;
        }
        self.declared_mrdsl = true;
        Some((
            "MaxRecvDataSegmentLength".into(),
            target_mrdsl(policy).to_string(),
        ))
    }

    pub fn session_params(&self) -> SessionParams {
        let max_burst_length = self.num("MaxBurstLength");
        SessionParams {
            max_connections: self.num("MaxConnections").min(u16::MAX.into()) as u16,
            initial_r2t: self.flag("InitialR2T"),
            immediate_data: self.flag("ImmediateData"),
            max_burst_length,
            first_burst_length: self.num("FirstBurstLength").min(max_burst_length),
            default_time2wait: self.num("DefaultTime2Wait").min(u16::MAX.into()) as u16,
            default_time2retain: self.num("DefaultTime2Retain").min(u16::MAX.into()) as u16,
            max_outstanding_r2t: self.num("MaxOutstandingR2T"),
            data_pdu_in_order: self.flag("DataPDUInOrder"),
            data_sequence_in_order: self.flag("DataSequenceInOrder"),
            error_recovery_level: self.num("ErrorRecoveryLevel").min(u8::MAX.into()) as u8,
        }
    }

    /// Connection parameters: our receive limit from `policy`, the peer's as declared.
    pub fn connection_params(&self, policy: &KeyPolicy) -> ConnectionParams {
        let (ours, theirs) = (target_mrdsl(policy), self.num("MaxRecvDataSegmentLength"));
        let (initiator, target) = if self.initiator {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        ConnectionParams {
            header_digest: self.value("HeaderDigest") == Some("CRC32C"),
            data_digest: self.value("DataDigest") == Some("CRC32C"),
            initiator_max_recv_data_segment_length: initiator,
            target_max_recv_data_segment_length: target,
        }
    }
}

/// Our declared MaxRecvDataSegmentLength, forced into the legal range.
pub fn target_mrdsl(policy: &KeyPolicy) -> u32 {
    policy
        .max_recv_data_segment_length
        .clamp(512, keys::MAX_LEN)
}
