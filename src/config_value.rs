//! What the target's and the agent's configuration files share: the error for a value
//! that is not acceptable, and byte sizes ("64MiB"). iSCSI names are checked by
//! [`crate::iscsi::name`].

use serde::{Deserialize, Serialize};

/// Why a configuration file (the target's or a node's) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is in the message, not the error chain, so that `{:#}` at the CLI
    /// does not print it twice.
    #[error("{file}: cannot read: {cause}")]
    Read { file: String, cause: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error(transparent)]
    Invalid(#[from] ConfigValueError),
}

/// Read a configuration file and parse its TOML into `T`; `file` names it in errors.
pub fn read_toml<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<(T, String), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        file: file.clone(),
        cause,
    })?;
    Ok((parse_toml(&text, &file)?, file))
}

/// Parse TOML text into `T`; `file` names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.to_string(),
        message: e.to_string(),
    })
}

/// A setting whose value is not acceptable: which file, which key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigValueError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl ConfigValueError {
    pub fn new(file: &str, key: &str, reason: impl Into<String>) -> ConfigValueError {
        ConfigValueError {
            file: file.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size {0:?}")]
    Number(String),
    #[error("invalid size unit in {0:?} (use KiB, MiB, GiB or TiB)")]
    Unit(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

/// Parse "64MiB", "8 GiB", "1G", "4096", "2TiB": binary units, K/M/G/T, KB/MB/… and
/// KiB/MiB/… alike, case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError::Number(s.into()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Unit(s.into())),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.into()))
}

/// A size in bytes, written as an integer or a string with a unit ("64MiB", "8G", "512").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("4096", 4096),
            ("512b", 512),
            ("64MiB", 64 << 20),
            (" 8 GiB ", 8 << 30),
            ("1g", 1 << 30),
            ("2TB", 2 << 40),
            ("4k", 4096),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
        assert_eq!(parse_size(""), Err(SizeError::Number(String::new())));
        assert_eq!(parse_size("MiB"), Err(SizeError::Number("MiB".into())));
        assert_eq!(parse_size("1.5GiB"), Err(SizeError::Unit("1.5GiB".into())));
        assert_eq!(parse_size("-1"), Err(SizeError::Number("-1".into())));
        assert_eq!(parse_size("8PiB"), Err(SizeError::Unit("8PiB".into())));
        assert_eq!(
            parse_size("16777216TiB"),
            Err(SizeError::TooLarge("16777216TiB".into()))
        );
    }

    #[test]
    fn byte_size_reads_numbers_and_strings() {
        #[derive(Deserialize)]
        struct T {
            a: ByteSize,
            b: ByteSize,
        }
        let t: T = toml::from_str("a = 4096\nb = \"1MiB\"").unwrap();
        assert_eq!((t.a, t.b), (ByteSize(4096), ByteSize(1 << 20)));
        assert!(toml::from_str::<T>("a = 1\nb = \"1 parsec\"").is_err());
    }
}
