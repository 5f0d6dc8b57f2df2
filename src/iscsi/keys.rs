//! Table of RFC 7143 §13 keys and their negotiation rules.
//!
//! One table ([`KEYS`]) says, for every key the target knows: how a value is negotiated
//! (result function), in which login stage it may appear, its scope, who may send it,
//! its default and its range, whether it matters in discovery sessions, and what the
//! target itself wants (derived from [`KeyPolicy`], the same for the target and the initiator). The login code consults only
//! this table; it never special-cases a key by its name.

use super::login::KeyPolicy;

/// How the value of a key is decided (RFC 7143 §6.2, §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `<list-of-values>`: the responder picks the first offered value it supports.
    List,
    /// Boolean, result function AND.
    And,
    /// Boolean, result function OR.
    Or,
    /// Numeric, result function Minimum.
    Min,
    /// Numeric, result function Maximum.
    Max,
    /// Declared by the sender; not answered.
    Declarative,
    /// Part of the authentication exchange (AuthMethod, CHAP_*): handled by login/CHAP.
    Auth,
    /// Obsolete key that must be answered with the constant "Reject" (RFC 7143 §13.25).
    Reject,
    /// Only valid in the full feature phase (SendTargets): answered Irrelevant in login.
    FullFeatureOnly,
}

/// Login stage(s) in which a key may be offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Security negotiation stage only.
    Security,
    /// Operational negotiation stage (initiators often send these early; accepted).
    Operational,
    /// Any login stage (declarations).
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Session,
    Connection,
}

/// Who may send the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Initiator,
    Target,
    Both,
}

/// What the target wants for a key, given its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ours {
    /// Values we support (for list keys).
    Values(&'static [&'static str]),
    Bool(bool),
    Num(u32),
    /// Nothing to say: declarations, auth keys.
    Nothing,
}

/// Values already agreed in this login, used by cross-key rules.
pub trait Agreed {
    /// The agreed (or default) value of a numeric key.
    fn num(&self, key: &str) -> u32;
    /// The agreed (or default) value of a boolean key.
    fn flag(&self, key: &str) -> bool;
}

/// One key of RFC 7143 §13.
#[derive(Debug, Clone, Copy)]
pub struct KeyDef {
    pub name: &'static str,
    pub rule: Rule,
    pub phase: Phase,
    pub scope: Scope,
    pub sender: Sender,
    /// Value in force when the key is not negotiated.
    pub default: Option<&'static str>,
    /// Inclusive range of numeric values.
    pub range: Option<(u32, u32)>,
    /// Whether the key means anything in a discovery session (else: Irrelevant).
    pub in_discovery: bool,
    /// May the initiator send it again with the same value later in the login?
    /// (identity declarations, which some initiators repeat in every stage)
    pub repeatable: bool,
    pub ours: fn(&KeyPolicy) -> Ours,
    /// Cross-key rule: answer Irrelevant when this returns true.
    pub irrelevant: Option<fn(&dyn Agreed) -> bool>,
    /// Cross-key rule: upper bound imposed by other agreed keys.
    pub cap: Option<fn(&dyn Agreed) -> u32>,
}

/// Largest data segment / burst length value (2^24 - 1).
pub const MAX_LEN: u32 = (1 << 24) - 1;

const LEN_RANGE: Option<(u32, u32)> = Some((512, MAX_LEN));
const TIME_RANGE: Option<(u32, u32)> = Some((0, 3600));

fn nothing(_: &KeyPolicy) -> Ours {
    Ours::Nothing
}
fn digests(wanted: bool) -> Ours {
    if wanted {
        Ours::Values(&["CRC32C", "None"])
    } else {
        Ours::Values(&["None"])
    }
}
fn yes(_: &KeyPolicy) -> Ours {
    Ours::Bool(true)
}
fn no(_: &KeyPolicy) -> Ours {
    Ours::Bool(false)
}

const fn key(name: &'static str, rule: Rule, phase: Phase, ours: fn(&KeyPolicy) -> Ours) -> KeyDef {
    KeyDef {
        name,
        rule,
        phase,
        scope: Scope::Session,
        sender: Sender::Both,
        default: None,
        range: None,
        in_discovery: true,
        repeatable: false,
        ours,
        irrelevant: None,
        cap: None,
    }
}

/// A session-wide key of the operational stage with its RFC default, not negotiated in
/// discovery sessions.
const fn session_op(
    name: &'static str,
    rule: Rule,
    default: &'static str,
    ours: fn(&KeyPolicy) -> Ours,
) -> KeyDef {
    let mut k = key(name, rule, Phase::Operational, ours);
    k.default = Some(default);
    k.in_discovery = false;
    k
}

const fn auth(name: &'static str) -> KeyDef {
    let mut k = key(name, Rule::Auth, Phase::Security, nothing);
    k.scope = Scope::Connection;
    k
}

const fn identity(name: &'static str, sender: Sender) -> KeyDef {
    let mut k = key(name, Rule::Declarative, Phase::Any, nothing);
    k.sender = sender;
    k.repeatable = true;
    k
}

/// Every key the target understands. Anything else (including X-* and X#* keys) is
/// answered NotUnderstood.
pub static KEYS: &[KeyDef] = &[
    KeyDef {
        scope: Scope::Connection,
        default: Some("None"),
        ..key("HeaderDigest", Rule::List, Phase::Operational, |p| {
            digests(p.header_digest)
        })
    },
    KeyDef {
        scope: Scope::Connection,
        default: Some("None"),
        ..key("DataDigest", Rule::List, Phase::Operational, |p| {
            digests(p.data_digest)
        })
    },
    // Only one connection per session is supported.
    KeyDef {
        range: Some((1, 65535)),
        ..session_op("MaxConnections", Rule::Min, "1", |_| Ours::Num(1))
    },
    KeyDef {
        sender: Sender::Initiator,
        ..key("SendTargets", Rule::FullFeatureOnly, Phase::Any, nothing)
    },
    identity("TargetName", Sender::Initiator),
    identity("InitiatorName", Sender::Initiator),
    identity("TargetAlias", Sender::Target),
    identity("InitiatorAlias", Sender::Initiator),
    identity("TargetAddress", Sender::Target),
    identity("TargetPortalGroupTag", Sender::Target),
    session_op("InitialR2T", Rule::Or, "Yes", |p| Ours::Bool(p.initial_r2t)),
    session_op("ImmediateData", Rule::And, "Yes", |p| {
        Ours::Bool(p.immediate_data)
    }),
    KeyDef {
        scope: Scope::Connection,
        default: Some("8192"),
        range: LEN_RANGE,
        ..key(
            "MaxRecvDataSegmentLength",
            Rule::Declarative,
            Phase::Any,
            nothing,
        )
    },
    KeyDef {
        range: LEN_RANGE,
        ..session_op("MaxBurstLength", Rule::Min, "262144", |p| {
            Ours::Num(p.max_burst_length)
        })
    },
    KeyDef {
        range: LEN_RANGE,
        // Unsolicited data is impossible with InitialR2T=Yes and ImmediateData=No.
        irrelevant: Some(|a| a.flag("InitialR2T") && !a.flag("ImmediateData")),
        // FirstBurstLength MUST NOT exceed MaxBurstLength.
        cap: Some(|a| a.num("MaxBurstLength")),
        ..session_op("FirstBurstLength", Rule::Min, "65536", |p| {
            Ours::Num(p.first_burst_length)
        })
    },
    KeyDef {
        default: Some("2"),
        range: TIME_RANGE,
        ..key("DefaultTime2Wait", Rule::Max, Phase::Operational, |p| {
            Ours::Num(p.default_time2wait)
        })
    },
    KeyDef {
        default: Some("20"),
        range: TIME_RANGE,
        ..key("DefaultTime2Retain", Rule::Min, Phase::Operational, |p| {
            Ours::Num(p.default_time2retain)
        })
    },
    KeyDef {
        range: Some((1, 65535)),
        ..session_op("MaxOutstandingR2T", Rule::Min, "1", |p| {
            Ours::Num(p.max_outstanding_r2t)
        })
    },
    // Data reassembly out of order is not implemented: insist on order.
    session_op("DataPDUInOrder", Rule::Or, "Yes", yes),
    session_op("DataSequenceInOrder", Rule::Or, "Yes", yes),
    // Only ERL 0 is implemented.
    KeyDef {
        default: Some("0"),
        range: Some((0, 2)),
        ..key("ErrorRecoveryLevel", Rule::Min, Phase::Operational, |_| {
            Ours::Num(0)
        })
    },
    KeyDef {
        sender: Sender::Initiator,
        default: Some("Normal"),
        ..identity("SessionType", Sender::Initiator)
    },
    KeyDef {
        scope: Scope::Connection,
        default: Some("None"),
        ..key("AuthMethod", Rule::Auth, Phase::Security, nothing)
    },
    auth("CHAP_A"),
    auth("CHAP_I"),
    auth("CHAP_C"),
    auth("CHAP_N"),
    auth("CHAP_R"),
    // Markers are obsolete (RFC 7143 §13.25); "No" keeps them off with RFC 3720 peers.
    KeyDef {
        scope: Scope::Connection,
        default: Some("No"),
        ..key("OFMarker", Rule::And, Phase::Operational, no)
    },
    KeyDef {
        scope: Scope::Connection,
        default: Some("No"),
        ..key("IFMarker", Rule::And, Phase::Operational, no)
    },
    KeyDef {
        scope: Scope::Connection,
        ..key("OFMarkInt", Rule::Reject, Phase::Operational, nothing)
    },
    KeyDef {
        scope: Scope::Connection,
        ..key("IFMarkInt", Rule::Reject, Phase::Operational, nothing)
    },
    // RFC 7143 §13.23: we implement neither ResponseFence nor FastAbort.
    session_op("TaskReporting", Rule::List, "RFC3720", |_| {
        Ours::Values(&["RFC3720"])
    }),
    // RFC 7143 §13.24: level 1 is RFC 7143 itself; RFC 7144 features (level 2) are not.
    KeyDef {
        range: Some((0, 31)),
        ..session_op("iSCSIProtocolLevel", Rule::Min, "1", |_| Ours::Num(1))
    },
];

/// Look a key up by its exact (case-sensitive) name.
pub fn lookup(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.name == name)
}

/// The special answers of RFC 7143 §6.2.
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
pub const IRRELEVANT: &str = "Irrelevant";
pub const REJECT: &str = "Reject";

/// Parse a numerical value: decimal or `0x` hex (RFC 7143 §6.1).
pub fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse().ok()
    } else {
        None
    }
}

pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// The target's answer to an offer of `def` with `value`, or Reject.
///
/// `discovery` selects the Irrelevant rule for session-only keys; `agreed` feeds the
/// cross-key rules. Returns None for keys that are not answered (declarations).
pub fn answer(
    def: &KeyDef,
    value: &str,
    policy: &KeyPolicy,
    discovery: bool,
    agreed: &dyn Agreed,
) -> Option<String> {
    if discovery && !def.in_discovery {
        return Some(IRRELEVANT.into());
    }
    if def.irrelevant.is_some_and(|f| f(agreed)) {
        return Some(IRRELEVANT.into());
    }
    let in_range = |n: u64| {
        def.range
            .is_none_or(|(lo, hi)| n >= u64::from(lo) && n <= u64::from(hi))
    };
    let ans = match (def.rule, (def.ours)(policy)) {
        (Rule::List, Ours::Values(supported)) => value
            .split(',')
            .find(|v| supported.contains(v))
            .map(str::to_string)
            .unwrap_or_else(|| REJECT.into()),
        (Rule::And, Ours::Bool(ours)) => match parse_bool(value) {
            Some(theirs) => bool_str(theirs && ours).into(),
            None => REJECT.into(),
        },
        (Rule::Or, Ours::Bool(ours)) => match parse_bool(value) {
            Some(theirs) => bool_str(theirs || ours).into(),
            None => REJECT.into(),
        },
        (Rule::Min | Rule::Max, Ours::Num(ours)) => match parse_number(value) {
            Some(n) if in_range(n) => {
                // In range, so it fits u32.
                let n = n as u32;
                let mut r = if def.rule == Rule::Min {
                    n.min(ours)
                } else {
                    n.max(ours)
                };
                if let Some(cap) = def.cap {
                    r = r.min(cap(agreed));
                }
                r.to_string()
            }
            _ => REJECT.into(),
        },
        (Rule::Declarative, _) => {
            return match def.range {
                Some(_) => match parse_number(value) {
                    Some(n) if in_range(n) => None,
                    _ => Some(REJECT.into()),
                },
                None => None,
            };
        }
        (Rule::Reject, _) => REJECT.into(),
        (Rule::FullFeatureOnly, _) => IRRELEVANT.into(),
        // Auth keys are answered by the authentication exchange; a table entry whose
        // `ours` does not fit its rule is a programming slip, answered safely.
        _ => REJECT.into(),
    };
    Some(ans)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Defaults;
    impl Agreed for Defaults {
        fn num(&self, key: &str) -> u32 {
            lookup(key)
                .and_then(|k| k.default)
                .and_then(parse_number)
                .map_or(0, |n| n as u32)
        }
        fn flag(&self, key: &str) -> bool {
            lookup(key)
                .and_then(|k| k.default)
                .and_then(parse_bool)
                .unwrap_or(false)
        }
    }

    fn ans(key: &str, value: &str) -> Option<String> {
        answer(
            lookup(key).unwrap(),
            value,
            &KeyPolicy::default(),
            false,
            &Defaults,
        )
    }

    /// Each (key, offered value, the answer; None: no answer) under the default policy.
    fn assert_answered(cases: &[(&str, &str, Option<&str>)]) {
        for (key, value, want) in cases {
            assert_eq!(ans(key, value).as_deref(), *want, "{key}={value}");
        }
    }

    #[test]
    fn table_is_consistent() {
        for (i, k) in KEYS.iter().enumerate() {
            assert!(
                KEYS[i + 1..].iter().all(|o| o.name != k.name),
                "duplicate {}",
                k.name
            );
            if let (Some(d), Some((lo, hi))) = (k.default, k.range) {
                let n = parse_number(d).unwrap();
                assert!(
                    n >= lo.into() && n <= hi.into(),
                    "{} default out of range",
                    k.name
                );
            }
        }
    }

    #[test]
    fn answers_by_rule() {
        assert_answered(&[
            // Numeric rules.
            ("MaxBurstLength", "16776192", Some("1048576")),
            ("MaxBurstLength", "4096", Some("4096")),
            ("MaxBurstLength", "0x1000", Some("4096")),
            ("MaxBurstLength", "511", Some("Reject")),
            ("MaxBurstLength", "16777216", Some("Reject")),
            ("MaxBurstLength", "12ab", Some("Reject")),
            ("DefaultTime2Wait", "5", Some("5")),
            ("DefaultTime2Wait", "3601", Some("Reject")),
            ("DefaultTime2Retain", "0", Some("0")),
            ("DefaultTime2Retain", "60", Some("20")),
            ("ErrorRecoveryLevel", "2", Some("0")),
            ("ErrorRecoveryLevel", "3", Some("Reject")),
            ("MaxConnections", "8", Some("1")),
            ("MaxConnections", "0", Some("Reject")),
            ("iSCSIProtocolLevel", "2", Some("1")),
            ("iSCSIProtocolLevel", "0", Some("0")),
            // FirstBurstLength is capped by (default) MaxBurstLength.
            ("FirstBurstLength", "16776192", Some("262144")),
            // Boolean and list rules.
            ("InitialR2T", "No", Some("No")),
            ("ImmediateData", "Yes", Some("Yes")),
            ("ImmediateData", "yes", Some("Reject")),
            ("DataPDUInOrder", "No", Some("Yes")),
            ("IFMarker", "Yes", Some("No")),
            ("OFMarkInt", "2048~8192", Some("Reject")),
            ("HeaderDigest", "CRC32C,None", Some("CRC32C")),
            ("HeaderDigest", "None,CRC32C", Some("None")),
            ("DataDigest", "MD5", Some("Reject")),
            ("TaskReporting", "FastAbort,RFC3720", Some("RFC3720")),
            ("SendTargets", "All", Some("Irrelevant")),
            ("MaxRecvDataSegmentLength", "262144", None),
            ("MaxRecvDataSegmentLength", "100", Some("Reject")),
        ]);
    }

    #[test]
    fn discovery_irrelevant() {
        let def = lookup("MaxBurstLength").unwrap();
        let a = answer(def, "4096", &KeyPolicy::default(), true, &Defaults);
        assert_eq!(a.as_deref(), Some("Irrelevant"));
        let def = lookup("HeaderDigest").unwrap();
        let a = answer(def, "CRC32C", &KeyPolicy::default(), true, &Defaults);
        assert_eq!(a.as_deref(), Some("CRC32C"));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("+1"), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
    }
}
