//! The event ring through the quorum LUN: does the LUN hold one, read sub-rings, append
//! one entry with COMPARE AND WRITE. Used by the agent's ring writer and by `ctl`.

use crate::agent::event_ring::{self, RingEntry, SubRing, PER_NODE};
use crate::agent::quorum_disk::{bounded_past_ua, CawOutcome, QuorumDisk};
use crate::agent::AgentError;

/// Why a quorum LUN has no event ring: it was formatted smaller than the ring needs.
pub fn too_small(blocks: u64) -> AgentError {
    AgentError::Other(format!(
        "the quorum LUN has {blocks} blocks, too few for the event ring ({} needed): grow \
         the LUN and re-run `holdfast ctl init-quorum --force` with every agent stopped \
         (heartbeats, groups and fencing work without it)",
        event_ring::blocks_with_ring()
    ))
}

/// `Ok` when the LUN is large enough for the ring.
pub async fn check_room(disk: &QuorumDisk) -> Result<(), AgentError> {
    let (last, _) = bounded_past_ua(disk.timeout, "READ CAPACITY", || {
        disk.session.read_capacity16(disk.lun)
    })
    .await?;
    let blocks = last.saturating_add(1);
    if blocks < event_ring::blocks_with_ring() {
        return Err(too_small(blocks));
    }
    Ok(())
}

/// Node `id`'s sub-ring, in one READ.
pub async fn read_sub_ring(disk: &QuorumDisk, id: u16) -> Result<SubRing, AgentError> {
    let all = disk
        .read_blocks(event_ring::sub_ring_lba(id), PER_NODE as u32)
        .await?;
    Ok(SubRing::decode(id, &all, disk.layout.block_size))
}

/// The sub-rings of `ids`, merged by time.
pub async fn read_merged(disk: &QuorumDisk, ids: &[u16]) -> Result<Vec<RingEntry>, AgentError> {
    let mut rings = Vec::with_capacity(ids.len());
    for &id in ids {
        rings.push(read_sub_ring(disk, id).await?);
    }
    Ok(event_ring::merge(&rings))
}

/// Append `entry` (its `seq` is set here) to `ring`, which must be what the LUN holds:
/// COMPARE AND WRITE against the block read for that slot. `Miscompare` means another
/// writer of the same node appended meanwhile: read the sub-ring again and retry.
pub async fn append(
    disk: &QuorumDisk,
    ring: &mut SubRing,
    mut entry: RingEntry,
) -> Result<CawOutcome, AgentError> {
    entry.node_id = ring.node_id;
    entry.seq = ring.next_seq();
    let bs = disk.layout.block_size;
    let old = ring
        .block_for(entry.seq)
        .map(|b| b.to_vec())
        .unwrap_or_else(|| vec![0u8; bs as usize]);
    let new = entry.encode(bs);
    let lba = event_ring::entry_lba(ring.node_id, entry.seq);
    let r = disk.caw(lba, &old, &new).await?;
    if r == CawOutcome::Written {
        ring.appended(entry, new);
    }
    Ok(r)
}

/// Append with a fresh read of the sub-ring, retrying a few times on contention (ctl).
pub async fn append_fresh(disk: &QuorumDisk, entry: RingEntry) -> Result<(), AgentError> {
    check_room(disk).await?;
    for _ in 0..8 {
        let mut ring = read_sub_ring(disk, entry.node_id).await?;
        if append(disk, &mut ring, entry.clone()).await? == CawOutcome::Written {
            return Ok(());
        }
    }
    Err(AgentError::Other(
        "event ring: the sub-ring keeps changing under us".into(),
    ))
}
