//! The one read → decide → COMPARE AND WRITE → retry loop for shared records. Every
//! change to a group or admin record goes through here, so two writers can never both
//! win a transition: on MISCOMPARE the record is read again and decided again.

use crate::agent::quorum::{GroupRecord, NodeAdmin, QuorumImage, QuorumLayout};
use crate::agent::quorum_disk::{CawOutcome, QuorumDisk};
use crate::agent::{wall_ms, AgentError};

/// Reads before giving up on a record that keeps changing under us.
pub const ATTEMPTS: usize = 8;

/// What a caller's closure decides about the record it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<R> {
    /// Write this instead.
    Write(R),
    /// Leave it: the caller's precondition no longer holds (or nothing to change).
    Skip,
    /// Leave it, and say why (a request ctl refuses).
    Refuse(String),
}

/// How an update ended, short of an I/O error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated<R> {
    Written(R),
    Skipped,
    Refused(String),
    /// No record of that group exists.
    NoRecord,
    /// Every attempt met a MISCOMPARE.
    Contended,
}

/// Change group `name`: `decide` sees the record (and the image it came from).
pub async fn update_group(
    q: &QuorumDisk,
    name: &str,
    decide: impl Fn(&GroupRecord, &QuorumImage) -> Decision<GroupRecord>,
) -> Result<Updated<GroupRecord>, AgentError> {
    for _ in 0..ATTEMPTS {
        let img = q.read_image().await?;
        let Some((idx, rec, block)) = img.group(name) else {
            return Ok(Updated::NoRecord);
        };
        let mut new = match decide(rec, &img) {
            Decision::Write(n) => n,
            Decision::Skip => return Ok(Updated::Skipped),
            Decision::Refuse(why) => return Ok(Updated::Refused(why)),
        };
        new.changed_wall_ms = wall_ms();
        if q.caw_group(idx, block, &new).await? == CawOutcome::Written {
            return Ok(Updated::Written(new));
        }
    }
    Ok(Updated::Contended)
}

/// Change node `id`'s admin record (an empty one if never written).
pub async fn update_admin(
    q: &QuorumDisk,
    id: u16,
    decide: impl Fn(&NodeAdmin) -> Decision<NodeAdmin>,
) -> Result<Updated<NodeAdmin>, AgentError> {
    for _ in 0..ATTEMPTS {
        let img = q.read_image().await?;
        let old = img.admin_block(id).unwrap_or(&[]).to_vec();
        let mut cur = img.admin(id);
        cur.node_id = id;
        let new = match decide(&cur) {
            Decision::Write(n) => n,
            Decision::Skip => return Ok(Updated::Skipped),
            Decision::Refuse(why) => return Ok(Updated::Refused(why)),
        };
        let block = new.encode(q.layout.block_size);
        if q.caw(QuorumLayout::admin_lba(id), &old, &block).await? == CawOutcome::Written {
            return Ok(Updated::Written(new));
        }
    }
    Ok(Updated::Contended)
}
