//! iSCSI TransportIDs (SPC-4 §7.6.4.6): the wire codec both the device server (SPEC_I_PT,
//! REGISTER AND MOVE, READ FULL STATUS) and the initiator use, and the text form
//! `NAME` / `NAME,i,0xISID` users type.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// iSCSI's PROTOCOL IDENTIFIER (SPC-4 table 444).
pub const PROTOCOL_ISCSI: u8 = 5;
/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;
/// FORMAT CODE 01b: initiator port (name + ISID); 00b names the initiator device.
const FORMAT_PORT: u8 = 0x40;
/// Shortest ADDITIONAL LENGTH SPC-4 allows for an iSCSI TransportID.
const MIN_BODY_LEN: usize = 20;
/// What separates the name from the ISID in format 01b.
const ISID_SEPARATOR: &str = ",i,";

/// An iSCSI TransportID: format 00b names an initiator (every ISID of it), format 01b one
/// initiator port (name + ISID).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransportId {
    pub name: String,
    pub isid: Option<[u8; 6]>,
}

/// Why a TransportID could not be decoded; [`TransportIdError::field`] says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportIdError {
    #[error("shorter than its header")]
    Short,
    #[error("protocol {0} is not iSCSI")]
    Protocol(u8),
    #[error("unknown format code {0}")]
    Format(u8),
    #[error("ADDITIONAL LENGTH runs past the data")]
    Length,
    #[error("name is not UTF-8")]
    NotUtf8,
    #[error("format 01b without ,i,0xISID: {0:?}")]
    MissingIsid(String),
    #[error("invalid name {0:?}")]
    Name(String),
}

impl TransportIdError {
    /// The offending field within the TransportID: (byte, bit), for a sense field pointer.
    pub fn field(&self) -> (usize, Option<u8>) {
        match self {
            TransportIdError::Short | TransportIdError::Protocol(_) => (0, Some(3)),
            TransportIdError::Format(_) => (0, Some(7)),
            TransportIdError::Length => (2, None),
            _ => (4, None),
        }
    }
}

/// A TransportID typed by a user that is not `NAME` or `NAME,i,0xISID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid iSCSI TransportID {0:?}: expected NAME or NAME,i,0xISID (ISID: 12 hex digits)")]
pub struct TransportIdParseError(pub String);

impl TransportId {
    /// Format 00b: the initiator device `name`.
    pub fn iscsi_name(name: impl Into<String>) -> TransportId {
        TransportId {
            name: name.into(),
            isid: None,
        }
    }

    /// Format 01b: the initiator port `name,i,0x<isid>`.
    pub fn iscsi_port(name: impl Into<String>, isid: [u8; 6]) -> TransportId {
        TransportId {
            name: name.into(),
            isid: Some(isid),
        }
    }

    /// The wire form: header, NUL-terminated text, padded to a multiple of 4 with an
    /// ADDITIONAL LENGTH of at least 20 (SPC-4 requires both).
    pub fn encode(&self) -> Vec<u8> {
        let text = self.to_string();
        let body = (text.len() + 1).next_multiple_of(4).max(MIN_BODY_LEN);
        let mut b = Vec::with_capacity(4 + body);
        let format = if self.isid.is_some() { FORMAT_PORT } else { 0 };
        b.push(format | PROTOCOL_ISCSI);
        b.push(0);
        // A valid iSCSI name is at most 223 bytes, so this fits; saturate rather than wrap.
        b.extend_from_slice(&u16::try_from(body).unwrap_or(u16::MAX).to_be_bytes());
        b.extend_from_slice(text.as_bytes());
        b.resize(4 + body, 0);
        b
    }

    /// Decode one TransportID at the start of `buf`; returns it and its length.
    pub fn decode(buf: &[u8]) -> Result<(TransportId, usize), TransportIdError> {
        let [b0, _, l0, l1, ..] = *buf else {
            return Err(TransportIdError::Short);
        };
        if b0 & 0x0f != PROTOCOL_ISCSI {
            return Err(TransportIdError::Protocol(b0 & 0x0f));
        }
        // Only formats 00b and 01b exist for iSCSI; bits 5..4 are reserved.
        let format = b0 >> 6;
        if format > 1 || b0 & 0x30 != 0 {
            return Err(TransportIdError::Format(format));
        }
        let total = 4 + usize::from(u16::from_be_bytes([l0, l1]));
        let body = buf.get(4..total).ok_or(TransportIdError::Length)?;
        let text = body.split(|&c| c == 0).next().unwrap_or(&[]);
        let text = std::str::from_utf8(text).map_err(|_| TransportIdError::NotUtf8)?;
        let id = if format == 0 {
            TransportId::iscsi_name(text)
        } else {
            port_from_text(text).ok_or_else(|| TransportIdError::MissingIsid(text.into()))?
        };
        if !valid_name(&id.name) {
            return Err(TransportIdError::Name(id.name));
        }
        Ok((id, total))
    }
}

/// Format 01b text: `NAME,i,0xISID`, the separator matched case-insensitively.
fn port_from_text(text: &str) -> Option<TransportId> {
    let pos = text.to_ascii_lowercase().rfind(ISID_SEPARATOR)?;
    let hex_isid = text[pos + ISID_SEPARATOR.len()..]
        .strip_prefix("0x")
        .or_else(|| text[pos + ISID_SEPARATOR.len()..].strip_prefix("0X"))?;
    let isid = parse_isid(hex_isid)?;
    Some(TransportId::iscsi_port(&text[..pos], isid))
}

/// What a TransportID may name: 1 to 223 printable ASCII characters, no comma (the text
/// form's separator). The full iSCSI name rules are the login's business, not SCSI's.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|c| c.is_ascii_graphic() && c != b',')
}

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.isid {
            Some(isid) => write!(f, "{}{ISID_SEPARATOR}0x{}", self.name, hex::encode(isid)),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for TransportId {
    type Err = TransportIdParseError;

    /// `NAME` (format 00b) or `NAME,i,0xISID` (format 01b; `0x` optional here); the
    /// separator is matched case-insensitively, as iSCSI initiator port names are.
    fn from_str(s: &str) -> Result<TransportId, TransportIdParseError> {
        let err = || TransportIdParseError(s.to_string());
        let (name, isid) = match s.to_ascii_lowercase().rfind(ISID_SEPARATOR) {
            None => (s, None),
            Some(pos) => {
                let isid = parse_isid(&s[pos + ISID_SEPARATOR.len()..]).ok_or_else(err)?;
                (&s[..pos], Some(isid))
            }
        };
        if !valid_name(name) {
            return Err(err());
        }
        Ok(TransportId {
            name: name.to_string(),
            isid,
        })
    }
}

impl Serialize for TransportId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An ISID in hex: 1 to 12 digits, `0x` optional (fewer digits are zero-extended on the
/// left).
pub fn parse_isid(s: &str) -> Option<[u8; 6]> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if h.is_empty() || h.len() > 12 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let v = u64::from_str_radix(h, 16).ok()?;
    let mut isid = [0u8; 6];
    isid.copy_from_slice(&v.to_be_bytes()[2..]);
    Some(isid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_00b() {
        let t = TransportId::iscsi_name("iqn.a:b");
        let b = t.encode();
        assert_eq!(b[0], 0x05);
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 20); // short names pad to 20
        assert_eq!(&b[4..11], b"iqn.a:b");
        assert!(b[11..].iter().all(|&c| c == 0));
        assert_eq!(TransportId::decode(&b).unwrap(), (t, 24));
    }

    #[test]
    fn format_01b() {
        let t = TransportId::iscsi_port("iqn.2026-11.org.holdfast:node-1", [0x80, 1, 2, 3, 4, 5]);
        let b = t.encode();
        let text = b"iqn.2026-11.org.holdfast:node-1,i,0x800102030405";
        assert_eq!(b[0], 0x45);
        let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        assert_eq!(len % 4, 0);
        assert!(len > text.len());
        assert_eq!(b.len(), 4 + len);
        assert_eq!(&b[4..4 + text.len()], text);
        assert_eq!(b[4 + text.len()], 0);
        assert_eq!(TransportId::decode(&b).unwrap(), (t, 4 + len));
    }

    #[test]
    fn decode_keeps_case_and_accepts_short_isids() {
        let mut b = vec![0x45, 0, 0, 20];
        b.extend_from_slice(b"IQN.X:Y,I,0X0A\0");
        b.resize(24, 0);
        let want = TransportId::iscsi_port("IQN.X:Y", [0, 0, 0, 0, 0, 0x0a]);
        assert_eq!(TransportId::decode(&b).unwrap(), (want, 24));
    }

    #[test]
    fn decode_rejects_garbage_and_points_at_the_field() {
        let field = |b: &[u8]| TransportId::decode(b).unwrap_err().field();
        assert_eq!(field(&[]), (0, Some(3)));
        assert_eq!(field(&[0x05, 0, 0]), (0, Some(3)));
        // Fibre Channel, not iSCSI.
        assert_eq!(field(&[0x00, 0, 0, 4, 0, 0, 0, 0]), (0, Some(3)));
        // Length past the buffer.
        assert_eq!(field(&[0x05, 0, 0, 20, b'i', 0, 0, 0]), (2, None));
        let name = TransportId::iscsi_name("iqn.a:b").encode();
        // Format 01b without an ISID.
        let mut b = name.clone();
        b[0] = 0x45;
        assert_eq!(field(&b), (4, None));
        // Format 10b does not exist for iSCSI; reserved bits 5..4 must be zero.
        b[0] = 0x85;
        assert_eq!(field(&b), (0, Some(7)));
        b[0] = 0x15;
        assert_eq!(field(&b), (0, Some(7)));
        // Empty name, a name with a space, an ISID that is not hex.
        assert_eq!(field(&[0x05, 0, 0, 4, 0, 0, 0, 0]), (4, None));
        assert_eq!(field(&TransportId::iscsi_name("a b").encode()), (4, None));
        let mut b = TransportId::iscsi_name("iqn.x:y,i,0xZZ").encode();
        b[0] = 0x45;
        assert_eq!(field(&b), (4, None));
        // Format 01b on the wire needs the 0x.
        let mut b = TransportId::iscsi_name("iqn.x:y,i,1").encode();
        b[0] = 0x45;
        assert_eq!(field(&b), (4, None));
    }

    #[test]
    fn text_form() {
        let t: TransportId = "iqn.x:y,I,0x00023D000001".parse().unwrap();
        assert_eq!(t, TransportId::iscsi_port("iqn.x:y", [0, 2, 0x3d, 0, 0, 1]));
        assert_eq!(t.to_string(), "iqn.x:y,i,0x00023d000001");
        let t: TransportId = "iqn.x:y".parse().unwrap();
        assert_eq!(t.isid, None);
        for bad in [
            "",
            ",i,0x1",
            "iqn.x:y,i,0x",
            "iqn.x:y,i,0x1234567890abc",
            "a b",
        ] {
            assert!(bad.parse::<TransportId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn isid_text() {
        assert_eq!(parse_isid("0x800000000001"), Some([0x80, 0, 0, 0, 0, 1]));
        assert_eq!(parse_isid("1"), Some([0, 0, 0, 0, 0, 1]));
        assert_eq!(parse_isid("0x"), None);
        assert_eq!(parse_isid("8000000000011"), None);
        assert_eq!(parse_isid("zz"), None);
    }
}
