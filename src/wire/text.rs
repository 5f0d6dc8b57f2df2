//! Text key=value codec (RFC 7143 §6). (interface; implemented by the wire helper)
use super::codec::WireError;
use bytes::Bytes;

/// Parse a NUL-separated list of `key=value` pairs, keeping order and duplicates.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let _ = data;
    todo!()
}

/// Encode pairs as `key=value\0…`.
pub fn encode_text(pairs: &[(String, String)]) -> Bytes {
    let _ = pairs;
    todo!()
}
