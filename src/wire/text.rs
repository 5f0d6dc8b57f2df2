//! Text key=value codec (RFC 7143 §6). (interface; implemented by the wire helper)
use super::codec::WireError;
use bytes::Bytes;

/// Parse a NUL-separated list of `key=value` pairs, keeping order and duplicates.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    // Temporary stand-in (iscsi branch) so login tests run; the wire helper's version wins.
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0).filter(|i| !i.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| WireError::Malformed("text not UTF-8"))?;
        let (k, v) = s
            .split_once('=')
            .ok_or(WireError::Malformed("text item without '='"))?;
        if k.is_empty() {
            return Err(WireError::Malformed("empty text key"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0…`.
pub fn encode_text(pairs: &[(String, String)]) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    Bytes::from(out)
}
