//! iSCSI names (RFC 7143 §4.2.7, RFC 3720 §3.2.6.3, RFC 3722): the one validator every
//! configuration file, URL and command line uses.
//!
//! Accepted: `iqn.YYYY-MM.reversed.domain[:anything]`, `eui.` + 16 hex digits, `naa.` +
//! 16 or 32 hex digits; at most 223 bytes; only ASCII letters, digits, `-`, `.` and `:`
//! (RFC 3722's stringprep output, with upper case allowed because names compare
//! case-insensitively). Non-ASCII names are refused: nothing here applies stringprep.

/// Longest iSCSI name in bytes (RFC 7143 §4.2.7.1).
pub const MAX_NAME_LEN: usize = 223;

/// Why a string is not an iSCSI name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IscsiNameError {
    #[error("an iSCSI name must be 1 to 223 bytes")]
    Length,
    #[error("an iSCSI name may only contain letters, digits, '-', '.' and ':' (found {0:?})")]
    Character(char),
    #[error("an iSCSI name starts with iqn., eui. or naa.")]
    Prefix,
    #[error("an iqn name looks like iqn.YYYY-MM.reversed.domain[:identifier]")]
    Iqn,
    #[error("an eui name is eui. followed by 16 hex digits")]
    Eui,
    #[error("a naa name is naa. followed by 16 or 32 hex digits")]
    Naa,
}

/// Check that `name` is an iSCSI name (see the module documentation for the rules).
pub fn check_iscsi_name(name: &str) -> Result<(), IscsiNameError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(IscsiNameError::Length);
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
    {
        return Err(IscsiNameError::Character(c));
    }
    let lower = name.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("iqn.") {
        check_iqn(rest)
    } else if let Some(digits) = lower.strip_prefix("eui.") {
        is_hex(digits, &[16])
            .then_some(())
            .ok_or(IscsiNameError::Eui)
    } else if let Some(digits) = lower.strip_prefix("naa.") {
        is_hex(digits, &[16, 32])
            .then_some(())
            .ok_or(IscsiNameError::Naa)
    } else {
        Err(IscsiNameError::Prefix)
    }
}

/// [`check_iscsi_name`] as a command-line value parser.
pub fn parse_iscsi_name(name: &str) -> Result<String, IscsiNameError> {
    check_iscsi_name(name).map(|()| name.to_string())
}

/// `YYYY-MM.` then a naming authority that is not empty.
fn check_iqn(rest: &str) -> Result<(), IscsiNameError> {
    let b = rest.as_bytes();
    let dated = b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'.';
    dated.then_some(()).ok_or(IscsiNameError::Iqn)
}

fn is_hex(s: &str, lengths: &[usize]) -> bool {
    lengths.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms() {
        for ok in [
            "iqn.1994-05.com.redhat:abc",
            "iqn.2026-11.org.holdfast:cluster1.hv1.vm",
            "IQN.2026-11.Org.Holdfast:Node-1",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
            "naa.6001405d1a2b3c4d5e6f708192a3b4c5",
        ] {
            assert_eq!(check_iscsi_name(ok), Ok(()), "{ok}");
        }
        let e = check_iscsi_name;
        assert_eq!(e(""), Err(IscsiNameError::Length));
        assert_eq!(
            e(&format!("iqn.2026-11.x:{}", "a".repeat(210))),
            Err(IscsiNameError::Length)
        );
        assert_eq!(e(&format!("iqn.2026-11.x:{}", "a".repeat(209))), Ok(()));
        assert_eq!(e("iqn.94-05.com"), Err(IscsiNameError::Iqn));
        assert_eq!(e("iqn.2026-11."), Err(IscsiNameError::Iqn));
        assert_eq!(e("eui.0200"), Err(IscsiNameError::Eui));
        assert_eq!(e("naa.52004567BA64678"), Err(IscsiNameError::Naa));
        assert_eq!(e("host.example.com"), Err(IscsiNameError::Prefix));
    }

    /// Cases where the copies this validator replaced disagreed.
    #[test]
    fn cases_the_old_copies_disagreed_on() {
        let e = check_iscsi_name;
        // The agent's copy checked only the prefix; the target's wanted the date.
        assert_eq!(e("iqn.a:b"), Err(IscsiNameError::Iqn));
        assert_eq!(e("iqn."), Err(IscsiNameError::Iqn));
        // ... and the eui./naa. digits.
        assert_eq!(e("eui.x"), Err(IscsiNameError::Eui));
        assert_eq!(e("naa.1234"), Err(IscsiNameError::Naa));
        // The target's copy allowed any non-whitespace character, the agent's any
        // printable ASCII but ','; RFC 3722 allows neither.
        assert_eq!(e("iqn.2026-11.x:a,b"), Err(IscsiNameError::Character(',')));
        assert_eq!(e("iqn.2026-11.x:a_b"), Err(IscsiNameError::Character('_')));
        assert_eq!(e("iqn.2026-11.x:a/b"), Err(IscsiNameError::Character('/')));
        assert_eq!(e("iqn.2026-11.x:é"), Err(IscsiNameError::Character('é')));
        assert_eq!(e("iqn.2026-11.x:a b"), Err(IscsiNameError::Character(' ')));
    }
}
