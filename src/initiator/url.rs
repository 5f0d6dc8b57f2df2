//! `iscsi://HOST[:PORT]/TARGET/LUN` (RFC 4173's form, as libiscsi and QEMU take it) and
//! `HOST[:PORT]` portals: the one parser behind every command that names a LUN.
use crate::iscsi::name::check_iscsi_name;
use std::str::FromStr;

/// The well-known iSCSI port (RFC 7143 §13.6 / IANA).
pub const DEFAULT_PORT: u16 = 3260;

/// A parsed `iscsi://HOST[:PORT]/TARGET/LUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    pub target: String,
    pub lun: u64,
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid URL {url:?}: {why} (expected iscsi://HOST[:PORT]/TARGET-IQN/LUN)")]
pub struct UrlError {
    pub url: String,
    pub why: String,
}

impl FromStr for IscsiUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<IscsiUrl, UrlError> {
        let err = |why: &str| UrlError {
            url: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .get(..8)
            .filter(|s| s.eq_ignore_ascii_case("iscsi://"))
            .map(|_| &url[8..])
            .ok_or_else(|| err("the scheme must be iscsi://"))?;
        if rest.contains(['?', '#']) {
            return Err(err("query strings and fragments are not supported"));
        }
        let mut parts = rest.split('/');
        let (Some(authority), Some(target), Some(lun)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(err("the LUN is missing"));
        };
        if parts.next().is_some() {
            return Err(err("too many path segments"));
        }
        if authority.contains('@') {
            return Err(err(
                "credentials in the URL are not supported; use --chap-user/--chap-secret",
            ));
        }
        let (host, port) = split_host_port(authority).map_err(|w| err(&w))?;
        if target.is_empty() {
            return Err(err("the target name is empty"));
        }
        check_iscsi_name(target)
            .map_err(|e| err(&format!("the target name is not an iSCSI name: {e}")))?;
        if lun.is_empty() || !lun.bytes().all(|c| c.is_ascii_digit()) || lun.len() > 5 {
            return Err(err("the LUN must be a decimal number"));
        }
        let lun: u64 = lun.parse().map_err(|_| err("bad LUN"))?;
        if lun > 16383 {
            return Err(err("the LUN must be at most 16383"));
        }
        Ok(IscsiUrl {
            host,
            port,
            target: target.to_string(),
            lun,
        })
    }
}

fn split_host_port(a: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unterminated [IPv6] address")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        (h, port)
    } else {
        match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("the host is empty".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        // All digits: u16::from_str would also take "+80".
        Some(p) => Some(p)
            .filter(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

/// Parse a portal `HOST[:PORT]` or `[IPv6][:PORT]`; the port defaults to 3260.
pub fn parse_portal(portal: &str) -> Result<(String, u16), String> {
    split_host_port(portal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: IscsiUrl = "iscsi://127.0.0.1:3261/iqn.2026-11.org.holdfast:storage/1"
            .parse()
            .unwrap();
        assert_eq!(
            u,
            IscsiUrl {
                host: "127.0.0.1".into(),
                port: 3261,
                target: "iqn.2026-11.org.holdfast:storage".into(),
                lun: 1
            }
        );
        let u: IscsiUrl = "ISCSI://[::1]/IQN.2026-11.x:t/0".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.lun), ("::1", 3260, 0));
        let u: IscsiUrl = "iscsi://[fe80::1]:3262/naa.6001405d1a2b3c4d/16383"
            .parse()
            .unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fe80::1", 3262));
        for bad in [
            "",
            "http://h/iqn.2026-11.x:t/0",
            "iscsi://h/iqn.2026-11.x:t",
            "iscsi://h/iqn.2026-11.x:t/",
            "iscsi://h/iqn.2026-11.x:t/1/2",
            "iscsi://h/iqn.2026-11.x:t/16384",
            "iscsi://h/iqn.2026-11.x:t/-1",
            "iscsi://h/iqn.2026-11.x:t/0x1",
            "iscsi://h//0",
            "iscsi://h/target/0",
            "iscsi://h:0/iqn.2026-11.x:t/0",
            "iscsi://h:70000/iqn.2026-11.x:t/0",
            "iscsi://h:/iqn.2026-11.x:t/0",
            "iscsi://:3260/iqn.2026-11.x:t/0",
            "iscsi://u%p@h/iqn.2026-11.x:t/0",
            "iscsi://h/iqn.2026-11.x:t/0?x=1",
            "iscsi://[::1/iqn.2026-11.x:t/0",
            // Not iSCSI names: no date, too few digits, a character RFC 3722 forbids.
            "iscsi://h/iqn.a:b/0",
            "iscsi://h/naa.6001/0",
            "iscsi://h/iqn.2026-11.x:a_b/0",
        ] {
            assert!(bad.parse::<IscsiUrl>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn portals() {
        assert_eq!(parse_portal("h"), Ok(("h".into(), 3260)));
        assert_eq!(parse_portal("10.0.0.1:3261"), Ok(("10.0.0.1".into(), 3261)));
        assert_eq!(parse_portal("[::1]:3262"), Ok(("::1".into(), 3262)));
        assert_eq!(parse_portal("[::1]"), Ok(("::1".into(), 3260)));
        for bad in ["", ":3260", "h:", "h:x", "[::1", "h:0"] {
            assert!(parse_portal(bad).is_err(), "{bad:?}");
        }
    }
}
