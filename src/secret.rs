//! Secrets (CHAP) as one type that never shows its value: `Debug`, `Display` and
//! `Serialize` all give `<redacted>`, so `--check`, logs and JSON cannot leak it by
//! accident. The value is reached only through [`Secret::expose`]. Also the file rules:
//! a secret file, or a configuration file holding a secret inline, must not be readable
//! by group or others.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What every printed form of a secret shows.
pub const REDACTED: &str = "<redacted>";

/// A secret value. Equality compares the values (a reload notices a rotation).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value itself: only for the CHAP computation.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// For clap: a secret given on the command line or in an environment variable.
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

/// Why a secret file, or a configuration file holding a secret, was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path} holds a secret but is readable by group or others (mode {mode:04o}); \
         fix: chmod 600 {path}"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error("{path}: the secret is not UTF-8 text")]
    NotText { path: PathBuf },
}

/// Refuse `path` (a file holding a secret) when group or others may read it.
pub fn require_private(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|cause| SecretFileError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Readable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Read a secret file: private (see [`require_private`]), its text without one
/// trailing newline (what `echo secret > file` adds).
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    require_private(path)?;
    let bytes = std::fs::read(path).map_err(|cause| SecretFileError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotText {
        path: path.to_path_buf(),
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Secret(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printed_form_is_redacted() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "hunter2-hunter2");
        let back: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(back.expose(), "abc");
    }

    /// The login's own structs hold the secrets as bytes; their Debug leaves them out.
    #[test]
    fn login_structs_debug_without_secrets() {
        let creds = crate::iscsi::login::ChapCredentials {
            username: "u".into(),
            secret: b"chap-secret-one".to_vec(),
            mutual: Some(("t".into(), b"chap-secret-two".to_vec())),
        };
        let mut cfg = crate::initiator::InitiatorConfig::new(
            "iqn.2026-11.org.example:i",
            "iqn.2026-11.org.example:t",
            "127.0.0.1:3260".parse().unwrap(),
        );
        cfg.chap = Some(("u".into(), b"chap-secret-one".to_vec()));
        cfg.mutual_chap = Some(("t".into(), b"chap-secret-two".to_vec()));
        for shown in [format!("{creds:?}"), format!("{cfg:?}")] {
            assert!(!shown.contains("chap-secret"), "{shown}");
            assert!(
                shown.contains("\"u\"") && shown.contains("\"t\""),
                "{shown}"
            );
        }
    }

    fn file_with(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, p)
    }

    #[test]
    fn secret_file_loses_one_trailing_newline() {
        for (text, want) in [
            ("abc\n", "abc"),
            ("abc", "abc"),
            ("abc\n\n", "abc\n"),
            ("abc\r\n", "abc"),
            (" abc \n", " abc "),
        ] {
            let (_d, p) = file_with(text, 0o600);
            assert_eq!(read_secret_file(&p).unwrap().expose(), want, "{text:?}");
        }
    }

    #[test]
    fn readable_secret_file_is_refused_with_the_fix() {
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let (_d, p) = file_with("abc", mode);
            let e = read_secret_file(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(e.contains(&format!("{mode:04o}")), "{e}");
        }
        let (_d, p) = file_with("abc", 0o400);
        assert!(read_secret_file(&p).is_ok());
    }
}
