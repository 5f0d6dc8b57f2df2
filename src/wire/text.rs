//! Text key=value codec (RFC 7143 §6).
use super::codec::WireError;
use bytes::{BufMut, Bytes, BytesMut};

/// Parse a NUL-separated list of `key=value` pairs, keeping order and duplicates.
///
/// Empty items (consecutive NULs, zero padding) are skipped and the final NUL may be
/// missing. A value may itself contain '='; only the first one separates.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0).filter(|item| !item.is_empty()) {
        let Some(eq) = item.iter().position(|&b| b == b'=') else {
            return Err(WireError::Malformed("text item without '='"));
        };
        let (key, value) = item.split_at(eq);
        if key.is_empty() {
            return Err(WireError::Malformed("text item with an empty key"));
        }
        let value = value.get(1..).unwrap_or_default();
        let key =
            std::str::from_utf8(key).map_err(|_| WireError::Malformed("text key not UTF-8"))?;
        let value =
            std::str::from_utf8(value).map_err(|_| WireError::Malformed("text value not UTF-8"))?;
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0…`.
pub fn encode_text(pairs: &[(String, String)]) -> Bytes {
    let len = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = BytesMut::with_capacity(len);
    for (k, v) in pairs {
        out.put_slice(k.as_bytes());
        out.put_u8(b'=');
        out.put_slice(v.as_bytes());
        out.put_u8(0);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_in_order_with_duplicates() {
        let got = parse_text(b"InitiatorName=iqn.x\0SendTargets=All\0SendTargets=All\0").unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("InitiatorName", "iqn.x"),
                ("SendTargets", "All"),
                ("SendTargets", "All")
            ])
        );
    }

    #[test]
    fn tolerates_missing_final_nul_padding_and_empty_values() {
        let got = parse_text(b"A=1\0\0B=\0C=x=y").unwrap();
        assert_eq!(got, pairs(&[("A", "1"), ("B", ""), ("C", "x=y")]));
        assert_eq!(parse_text(b"A=1\0\0\0\0").unwrap(), pairs(&[("A", "1")]));
        assert!(parse_text(b"").unwrap().is_empty());
        assert!(parse_text(b"\0\0\0").unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_items() {
        assert!(matches!(
            parse_text(b"A=1\0junk\0"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(parse_text(b"=1\0"), Err(WireError::Malformed(_))));
        assert!(matches!(
            parse_text(b"A=\xff\0"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            parse_text(b"\xfe=1\0"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn encode_round_trips() {
        let p = pairs(&[
            ("HeaderDigest", "CRC32C,None"),
            ("MaxBurstLength", "262144"),
        ]);
        let b = encode_text(&p);
        assert_eq!(&b[..], b"HeaderDigest=CRC32C,None\0MaxBurstLength=262144\0");
        assert_eq!(parse_text(&b).unwrap(), p);
        assert!(encode_text(&[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_text(&data);
        }

        #[test]
        fn round_trip(p in proptest::collection::vec(("[A-Za-z0-9.:_-]{1,16}", "[^\u{0}]{0,24}"), 0..8)) {
            proptest::prop_assert_eq!(parse_text(&encode_text(&p)).unwrap(), p);
        }
    }
}
