//! Shared persistent reservation state across gateways, sans-IO: the object's encoding,
//! the notice other gateways install, librados's notify reply, the compare-and-swap
//! loop over an abstract object, and which gateways to fence. The RADOS calls are in
//! `pr_object.rs` and `pr_watch.rs`.

use crate::scsi::lun::{CmdError, PrApply};
use crate::scsi::pr::{PrState, ProutEffects, RegId, UaNotice};
use serde::{Deserialize, Serialize};

/// First bytes of the PR object: magic and format version.
const MAGIC: &[u8; 8] = b"HFPR\0\0\0\x01";
/// Largest PR object read (registrations are bounded by `pr::MAX_REGISTRATIONS`).
pub const MAX_OBJECT: usize = 4 << 20;
/// Compare-and-swap attempts before a PR OUT gives up (each conflict means another
/// gateway's PR OUT committed, so the system as a whole progresses).
pub const MAX_ATTEMPTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrObjectError {
    #[error("not a holdfast PR object")]
    BadMagic,
    #[error("{0}")]
    Corrupt(String),
}

/// The object's bytes: magic, sequence number (le64), then `PrState::to_bytes`.
pub fn encode_object(seq: u64, state: &PrState) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&state.to_bytes());
    out
}

/// (sequence, state); an empty object (created by an xattr) is the initial state.
pub fn decode_object(b: &[u8]) -> Result<(u64, PrState), PrObjectError> {
    if b.is_empty() {
        return Ok((0, PrState::default()));
    }
    if b.len() < 16 || &b[..8] != MAGIC {
        return Err(PrObjectError::BadMagic);
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let state = PrState::from_bytes(&b[16..]).map_err(|e| PrObjectError::Corrupt(e.to_string()))?;
    Ok((seq, state))
}

/// The notice of a LU reset on one gateway (the others abort their tasks on the image
/// and raise 29/03). Not JSON: a gateway that predates it re-reads the state instead.
pub const RESET_NOTICE: &[u8] = b"HFRESET1";

/// What a notify tells the other gateways: the committed state and the effects they
/// apply to their own nexuses. An empty payload is a probe (ack, nothing else).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrNotice {
    pub seq: u64,
    pub state: PrState,
    pub uas: Vec<UaNotice>,
    pub aborted: Vec<RegId>,
}

impl PrNotice {
    pub fn effects(&self) -> ProutEffects {
        ProutEffects {
            uas: self.uas.clone(),
            aborted: self.aborted.clone(),
            changed: true,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<PrNotice> {
        serde_json::from_slice(b).ok()
    }
}

/// librados's notify reply: who acked and who timed out, as (client gid, watch cookie).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReply {
    pub acked: Vec<(u64, u64)>,
    pub timed_out: Vec<(u64, u64)>,
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// Parse the reply: le32 count of acks, each (le64 gid, le64 cookie, le32 length,
/// payload); le32 count of timeouts, each (le64 gid, le64 cookie). None if malformed.
pub fn parse_notify_reply(b: &[u8]) -> Option<NotifyReply> {
    let mut c = Cursor(b);
    let mut r = NotifyReply::default();
    for _ in 0..c.u32()? {
        let (gid, cookie) = (c.u64()?, c.u64()?);
        let len = c.u32()? as usize;
        c.take(len)?;
        r.acked.push((gid, cookie));
    }
    for _ in 0..c.u32()? {
        r.timed_out.push((c.u64()?, c.u64()?));
    }
    Some(r)
}

/// The gateways (client gids) to blocklist after a notify: every watcher that did not
/// ack, except this gateway itself, each once.
pub fn gateways_to_fence(reply: &NotifyReply, own_gid: u64) -> Vec<u64> {
    let mut out: Vec<u64> = reply
        .timed_out
        .iter()
        .map(|&(gid, _)| gid)
        .filter(|&g| g != own_gid)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The xattr on the PR object where a gateway publishes its client address (a notify
/// reply names a silent watcher only by gid; blocklisting needs its address).
pub fn address_xattr(gid: u64) -> String {
    format!("holdfast.gw.{gid}")
}

/// The state a gateway starts from: APTPL state always survives; non-APTPL state
/// survives only while another gateway is serving the LU (the LU spans the gateways;
/// when none is left, the LU was power-cycled and non-APTPL state is cleared).
/// Some(state) when the object must be rewritten with it.
pub fn state_at_start(stored: &PrState, others_serving: bool) -> Option<PrState> {
    if others_serving || stored.aptpl || *stored == PrState::default() {
        return None;
    }
    Some(PrState::default())
}

/// One guarded object, as the compare-and-swap loop needs it.
pub trait GuardedObject {
    /// The object's bytes and version; None if absent. Err: errno.
    fn read(&self) -> Result<Option<(Vec<u8>, u64)>, i32>;
    /// Write if the version is still `expected` (None: only if absent). Err: errno;
    /// a conflict is ERANGE, EOVERFLOW or EEXIST.
    fn write(&self, data: &[u8], expected: Option<u64>) -> Result<u64, i32>;
}

fn is_conflict(errno: i32) -> bool {
    matches!(errno, libc::ERANGE | libc::EOVERFLOW | libc::EEXIST)
}

/// Why a compare-and-swap update failed before anything was committed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The PR OUT itself failed (conflict, bad parameters): its answer.
    #[error("{0}")]
    Command(CmdError),
    #[error("PR object: {0}")]
    Object(PrObjectError),
    #[error("PR object I/O: errno {0}")]
    Io(i32),
    #[error("PR object changed {0} times in a row")]
    Contended(usize),
}

/// Outcome of a committed (or unchanged) update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub seq: u64,
    pub state: PrState,
    pub effects: ProutEffects,
}

/// Read → apply → guarded write, retried on conflict. Unchanged state is not written
/// (its `seq` is the one read).
pub fn update(obj: &dyn GuardedObject, apply: &mut PrApply<'_>) -> Result<Committed, UpdateError> {
    for _ in 0..MAX_ATTEMPTS {
        let read = obj.read().map_err(UpdateError::Io)?;
        let (seq, cur) = match &read {
            Some((b, _)) => decode_object(b).map_err(UpdateError::Object)?,
            None => (0, PrState::default()),
        };
        let (next, effects) = apply(&cur).map_err(UpdateError::Command)?;
        if !effects.changed {
            return Ok(Committed {
                seq,
                state: cur,
                effects,
            });
        }
        let bytes = encode_object(seq + 1, &next);
        match obj.write(&bytes, read.map(|(_, v)| v)) {
            Ok(_) => {
                return Ok(Committed {
                    seq: seq + 1,
                    state: next,
                    effects,
                })
            }
            Err(e) if is_conflict(e) => continue,
            Err(e) => return Err(UpdateError::Io(e)),
        }
    }
    Err(UpdateError::Contended(MAX_ATTEMPTS))
}

#[cfg(test)]
#[path = "pr_sync_tests.rs"]
mod tests;
