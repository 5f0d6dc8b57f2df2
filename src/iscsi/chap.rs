//! CHAP (RFC 1994, CHAP_A=5 MD5) for iSCSI login (RFC 7143 §12.1.3), target side.
//!
//! The exchange: the initiator lists algorithms (CHAP_A), the target picks MD5 and sends
//! an identifier and a challenge (CHAP_I, CHAP_C), the initiator answers with its name
//! and response (CHAP_N, CHAP_R) and may challenge the target back (CHAP_I, CHAP_C), which
//! the target answers with its own name and response.

use super::login::ChapCredentials;
use md5::{Digest, Md5};
use rand::RngCore;

/// CHAP_A value of MD5.
pub const CHAP_MD5: &str = "5";
/// Length of the challenge the target sends.
pub const CHALLENGE_LEN: usize = 16;
/// Longest challenge accepted from an initiator (RFC 7143 allows large binary values;
/// anything this long is already absurd for CHAP).
pub const MAX_PEER_CHALLENGE_LEN: usize = 1024;
/// The one CHAP secret length rule, for the target's and the agent's configuration
/// alike. At least 12 bytes: RFC 7143 §12.1.3 asks for 96 bits of secret against
/// offline attacks on a captured exchange, and Microsoft's initiator refuses shorter
/// secrets. At most 255: LIO's limit; RFC 7143 sets none. (Microsoft's initiator also
/// refuses more than 16, so 12 to 16 works with every initiator.)
pub const MIN_SECRET_LEN: usize = 12;
/// See [`MIN_SECRET_LEN`].
pub const MAX_SECRET_LEN: usize = 255;

/// Why a configured CHAP secret of `len` bytes is refused; what the config error says.
pub fn check_secret_len(len: usize) -> Result<(), String> {
    if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&len) {
        return Ok(());
    }
    Err(format!(
        "must be {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes long (is {len}; \
         12 to 16 suits every initiator)"
    ))
}

/// Why an authentication failed. All of these end the login with AUTH_FAILURE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("initiator offers no CHAP algorithm we support (CHAP_A={0})")]
    NoAlgorithm(String),
    #[error("CHAP key {0} arrived out of order")]
    OutOfOrder(&'static str),
    #[error("CHAP_N or CHAP_R missing")]
    MissingResponse,
    #[error("CHAP_N {0:?} does not match the configured user")]
    WrongName(String),
    #[error("CHAP_R does not match")]
    WrongResponse,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("mutual CHAP requested but the target has no credentials for it")]
    MutualNotConfigured,
    #[error("mutual CHAP challenge repeats the target's challenge (reflection)")]
    Reflection,
    #[error("mutual CHAP needs both CHAP_I and CHAP_C")]
    IncompleteMutual,
    #[error("mutual CHAP target secret equals the initiator secret")]
    SameSecret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for CHAP_A.
    Algorithm,
    /// Challenge sent; waiting for CHAP_N / CHAP_R.
    Response {
        id: u8,
        challenge: [u8; CHALLENGE_LEN],
    },
    /// The initiator is authenticated (and the target too if asked).
    Done,
}

/// Keys the initiator sent in one CHAP step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChapInput {
    pub algorithms: Option<String>,
    pub name: Option<String>,
    pub response: Option<String>,
    pub id: Option<String>,
    pub challenge: Option<String>,
}

impl ChapInput {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Take a CHAP_* key; returns false if `key` is not one.
    pub fn set(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "CHAP_A" => &mut self.algorithms,
            "CHAP_N" => &mut self.name,
            "CHAP_R" => &mut self.response,
            "CHAP_I" => &mut self.id,
            "CHAP_C" => &mut self.challenge,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }
}

/// One CHAP authentication of an initiator by the target.
#[derive(Debug, Clone)]
pub struct ChapExchange {
    creds: ChapCredentials,
    state: State,
}

impl ChapExchange {
    pub fn new(creds: ChapCredentials) -> Self {
        if creds.secret.len() < MIN_SECRET_LEN {
            tracing::warn!(user = %creds.username, "CHAP secret shorter than {MIN_SECRET_LEN} bytes is weak");
        }
        Self {
            creds,
            state: State::Algorithm,
        }
    }

    /// Has the initiator proved its identity?
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    /// Feed the CHAP keys of one request; returns the keys to answer with.
    pub fn step(
        &mut self,
        input: &ChapInput,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<(String, String)>, ChapError> {
        match self.state.clone() {
            State::Algorithm => {
                if input.name.is_some()
                    || input.response.is_some()
                    || input.id.is_some()
                    || input.challenge.is_some()
                {
                    return Err(ChapError::OutOfOrder("CHAP_N/CHAP_R/CHAP_I/CHAP_C"));
                }
                let Some(algs) = &input.algorithms else {
                    // Nothing to do yet (e.g. AuthMethod was just agreed).
                    return Ok(Vec::new());
                };
                if !algs.split(',').any(|a| a == CHAP_MD5) {
                    return Err(ChapError::NoAlgorithm(algs.clone()));
                }
                let id = (rng.next_u32() & 0xff) as u8;
                let mut challenge = [0u8; CHALLENGE_LEN];
                rng.fill_bytes(&mut challenge);
                self.state = State::Response { id, challenge };
                Ok(vec![
                    ("CHAP_A".into(), CHAP_MD5.into()),
                    ("CHAP_I".into(), id.to_string()),
                    ("CHAP_C".into(), encode_hex(&challenge)),
                ])
            }
            State::Response { id, challenge } => {
                if input.algorithms.is_some() {
                    return Err(ChapError::OutOfOrder("CHAP_A"));
                }
                let (Some(name), Some(response)) = (&input.name, &input.response) else {
                    return Err(ChapError::MissingResponse);
                };
                let response = decode_binary(response).ok_or(ChapError::Malformed("CHAP_R"))?;
                if *name != self.creds.username {
                    return Err(ChapError::WrongName(name.clone()));
                }
                let expected = chap_response(id, &self.creds.secret, &challenge);
                if !constant_time_eq(&response, &expected) {
                    return Err(ChapError::WrongResponse);
                }
                let out = match (&input.id, &input.challenge) {
                    (None, None) => Vec::new(),
                    (Some(mid), Some(mc)) => self.answer_mutual(mid, mc, &challenge)?,
                    _ => return Err(ChapError::IncompleteMutual),
                };
                self.state = State::Done;
                Ok(out)
            }
            State::Done => {
                if input.is_empty() {
                    Ok(Vec::new())
                } else {
                    Err(ChapError::OutOfOrder("CHAP key after authentication"))
                }
            }
        }
    }

    fn answer_mutual(
        &self,
        id: &str,
        challenge: &str,
        ours: &[u8],
    ) -> Result<Vec<(String, String)>, ChapError> {
        let Some((user, secret)) = &self.creds.mutual else {
            return Err(ChapError::MutualNotConfigured);
        };
        let id = super::keys::parse_number(id)
            .and_then(|n| u8::try_from(n).ok())
            .ok_or(ChapError::Malformed("CHAP_I"))?;
        let challenge = decode_binary(challenge).ok_or(ChapError::Malformed("CHAP_C"))?;
        if challenge.is_empty() || challenge.len() > MAX_PEER_CHALLENGE_LEN {
            return Err(ChapError::Malformed("CHAP_C"));
        }
        // RFC 7143 §12.1.3: a challenge equal to ours would let the initiator use us as
        // an oracle for our own question.
        if challenge == ours {
            return Err(ChapError::Reflection);
        }
        // RFC 7143 §12.1.3: one secret must never serve both directions.
        if *secret == self.creds.secret {
            return Err(ChapError::SameSecret);
        }
        let response = chap_response(id, secret, &challenge);
        Ok(vec![
            ("CHAP_N".into(), user.clone()),
            ("CHAP_R".into(), encode_hex(&response)),
        ])
    }
}

/// MD5(identifier || secret || challenge) (RFC 1994 §4.1).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `0x`-prefixed lowercase hex, the encoding every initiator accepts.
pub fn encode_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Decode an RFC 7143 §6.1 binary value: `0x`/`0X` hex or `0b`/`0B` base64.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    let (prefix, body) = value.split_at_checked(2)?;
    match prefix {
        "0x" | "0X" => {
            // An odd digit count means a leading zero was dropped.
            if body.len() % 2 == 1 {
                hex::decode(format!("0{body}")).ok()
            } else {
                hex::decode(body).ok()
            }
        }
        "0b" | "0B" => decode_base64(body),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        // Left-align the bits of a short final chunk, then emit whole bytes.
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn one_secret_length_rule() {
        assert!(check_secret_len(11).unwrap_err().contains("12 to 255"));
        assert!(check_secret_len(0).is_err());
        assert!(check_secret_len(256).is_err());
        for ok in [12, 16, 17, 255] {
            assert_eq!(check_secret_len(ok), Ok(()), "{ok}");
        }
    }

    fn creds(mutual: bool) -> ChapCredentials {
        ChapCredentials {
            username: "alice".into(),
            secret: b"alice-secret-123".to_vec(),
            mutual: mutual.then(|| ("target".into(), b"target-secret-456".to_vec())),
        }
    }

    fn input(pairs: &[(&str, &str)]) -> ChapInput {
        let mut i = ChapInput::default();
        for (k, v) in pairs {
            assert!(i.set(k, v));
        }
        i
    }

    fn get<'a>(v: &'a [(String, String)], k: &str) -> &'a str {
        &v.iter().find(|(kk, _)| kk == k).unwrap().1
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0Xaff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0bAAECAw=="), Some(vec![0, 1, 2, 3]));
        assert_eq!(decode_binary("0bAAECAw"), Some(vec![0, 1, 2, 3]));
        assert_eq!(decode_binary("0bAAEC"), Some(vec![0, 1, 2]));
        assert_eq!(decode_binary("0bAAE="), Some(vec![0, 1]));
        assert_eq!(decode_binary("0bA"), None);
        assert_eq!(decode_binary("0b!!!!"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0"), None);
        assert_eq!(decode_binary("é"), None);
    }

    #[test]
    fn md5_known_vector() {
        // RFC 1321 test suite: MD5("abc").
        let r = chap_response(b'a', b"b", b"c");
        assert_eq!(hex::encode(r), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn one_way_and_mutual() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut x = ChapExchange::new(creds(true));
        let out = x.step(&input(&[("CHAP_A", "7,5")]), &mut rng).unwrap();
        assert_eq!(get(&out, "CHAP_A"), "5");
        let id: u8 = get(&out, "CHAP_I").parse().unwrap();
        let c = decode_binary(get(&out, "CHAP_C")).unwrap();
        assert_eq!(c.len(), CHALLENGE_LEN);
        let r = encode_hex(&chap_response(id, b"alice-secret-123", &c));
        let out = x
            .step(
                &input(&[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &r),
                    ("CHAP_I", "9"),
                    ("CHAP_C", "0x0102030405"),
                ]),
                &mut rng,
            )
            .unwrap();
        assert!(x.is_complete());
        assert_eq!(get(&out, "CHAP_N"), "target");
        let want = chap_response(9, b"target-secret-456", &[1, 2, 3, 4, 5]);
        assert_eq!(decode_binary(get(&out, "CHAP_R")).unwrap(), want);
    }

    #[test]
    fn failures() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut x = ChapExchange::new(creds(false));
        assert_eq!(
            x.step(&input(&[("CHAP_A", "6")]), &mut rng),
            Err(ChapError::NoAlgorithm("6".into()))
        );
        let out = x.step(&input(&[("CHAP_A", "5")]), &mut rng).unwrap();
        let id: u8 = get(&out, "CHAP_I").parse().unwrap();
        let c = decode_binary(get(&out, "CHAP_C")).unwrap();
        let good = encode_hex(&chap_response(id, b"alice-secret-123", &c));
        let mut y = x.clone();
        assert_eq!(
            y.step(&input(&[("CHAP_N", "alice")]), &mut rng),
            Err(ChapError::MissingResponse)
        );
        let mut y = x.clone();
        assert_eq!(
            y.step(&input(&[("CHAP_N", "alice"), ("CHAP_R", "0x00")]), &mut rng),
            Err(ChapError::WrongResponse)
        );
        let mut y = x.clone();
        assert_eq!(
            y.step(&input(&[("CHAP_N", "bob"), ("CHAP_R", &good)]), &mut rng),
            Err(ChapError::WrongName("bob".into()))
        );
        let mut y = x.clone();
        assert_eq!(
            y.step(
                &input(&[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &good),
                    ("CHAP_I", "1"),
                    ("CHAP_C", "0x01")
                ]),
                &mut rng
            ),
            Err(ChapError::MutualNotConfigured)
        );
        // base64 response is accepted too.
        let b64 = {
            let r = chap_response(id, b"alice-secret-123", &c);
            let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = String::from("0b");
            for ch in r.chunks(3) {
                let mut b = [0u8; 3];
                b[..ch.len()].copy_from_slice(ch);
                let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
                for i in 0..=ch.len() {
                    s.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            s
        };
        assert_eq!(
            x.step(&input(&[("CHAP_N", "alice"), ("CHAP_R", &b64)]), &mut rng),
            Ok(vec![])
        );
    }

    #[test]
    fn reflection_refused() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut x = ChapExchange::new(creds(true));
        let out = x.step(&input(&[("CHAP_A", "5")]), &mut rng).unwrap();
        let id: u8 = get(&out, "CHAP_I").parse().unwrap();
        let cs = get(&out, "CHAP_C").to_string();
        let c = decode_binary(&cs).unwrap();
        let r = encode_hex(&chap_response(id, b"alice-secret-123", &c));
        let res = x.step(
            &input(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", &id.to_string()),
                ("CHAP_C", &cs),
            ]),
            &mut rng,
        );
        assert_eq!(res, Err(ChapError::Reflection));
    }
}
