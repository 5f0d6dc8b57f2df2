//! The quorum LUN over an initiator session: read the whole image, write this node's
//! heartbeat slot (FUA), change records with COMPARE AND WRITE. Every command is bounded
//! by the I/O timeout, so a hung target turns into an error the caller can act on.

use crate::agent::quorum::{
    GroupRecord, HeartbeatSlot, QuorumError, QuorumHeader, QuorumImage, QuorumLayout,
};
use crate::agent::AgentError;
use crate::initiator::{past_unit_attention, InitiatorError, Session};
use crate::scsi::sense::key::MISCOMPARE;
use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

/// Run `f`, turning a timeout into [`AgentError::Timeout`].
pub async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, InitiatorError>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| AgentError::from_initiator(what, e)),
        Err(_) => Err(AgentError::Timeout(what)),
    }
}

/// As [`bounded`], sending the command again after a unit attention (the initiator's
/// one policy, [`past_unit_attention`]).
pub async fn bounded_past_ua<T, F, Fut>(
    timeout: Duration,
    what: &'static str,
    f: F,
) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, InitiatorError>>,
{
    bounded(timeout, what, past_unit_attention(f)).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CawOutcome {
    Written,
    /// Someone changed the block since it was read: read again and decide again.
    Miscompare,
}

#[derive(Clone)]
pub struct QuorumDisk {
    pub session: Session,
    pub lun: u64,
    pub layout: QuorumLayout,
    pub timeout: Duration,
}

impl QuorumDisk {
    /// Check the LUN's size and header; `cluster` must match the header's.
    pub async fn open(
        session: Session,
        lun: u64,
        cluster: &str,
        timeout: Duration,
    ) -> Result<(QuorumDisk, QuorumHeader), AgentError> {
        let (last, bs) =
            bounded_past_ua(timeout, "READ CAPACITY", || session.read_capacity16(lun)).await?;
        let layout = QuorumLayout::new(bs)?;
        if last.saturating_add(1) < QuorumLayout::blocks() {
            return Err(AgentError::Quorum(QuorumError::Corrupt {
                what: "quorum LUN",
                lba: 0,
                why: format!(
                    "{} blocks is smaller than the {} the layout needs",
                    last + 1,
                    QuorumLayout::blocks()
                ),
            }));
        }
        let disk = QuorumDisk {
            session,
            lun,
            layout,
            timeout,
        };
        let h = disk.read_blocks(QuorumLayout::HEADER_LBA, 1).await?;
        let header = QuorumHeader::decode_for(&h, cluster)?;
        Ok((disk, header))
    }

    pub async fn read_blocks(&self, lba: u64, blocks: u32) -> Result<Bytes, AgentError> {
        bounded_past_ua(self.timeout, "quorum READ", || {
            self.session
                .read16(self.lun, lba, blocks, self.layout.block_size)
        })
        .await
    }

    /// Everything after the header, in one READ.
    pub async fn read_image(&self) -> Result<QuorumImage, AgentError> {
        let blocks = u32::try_from(QuorumLayout::blocks()).unwrap_or(u32::MAX);
        let all = self.read_blocks(0, blocks).await?;
        Ok(QuorumImage::decode(&self.layout, &all))
    }

    /// Write this node's heartbeat slot, durable before it counts (FUA).
    pub async fn write_slot(&self, slot: &HeartbeatSlot) -> Result<(), AgentError> {
        let b = Bytes::from(slot.encode(self.layout.block_size)?);
        bounded_past_ua(self.timeout, "heartbeat WRITE", || {
            self.session.write16(
                self.lun,
                QuorumLayout::slot_lba(slot.node_id),
                b.clone(),
                self.layout.block_size,
                true,
            )
        })
        .await
    }

    /// COMPARE AND WRITE one block.
    pub async fn caw(&self, lba: u64, old: &[u8], new: &[u8]) -> Result<CawOutcome, AgentError> {
        let r = bounded_past_ua(self.timeout, "quorum COMPARE AND WRITE", || async {
            match self
                .session
                .compare_and_write(self.lun, lba, old, new, self.layout.block_size)
                .await
            {
                Ok(()) => Ok(CawOutcome::Written),
                Err(InitiatorError::CheckCondition { key, .. }) if key == MISCOMPARE => {
                    Ok(CawOutcome::Miscompare)
                }
                Err(e) => Err(e),
            }
        })
        .await;
        r
    }

    /// Replace group record `index` (read as `old_block`) with `new`.
    pub async fn caw_group(
        &self,
        index: u16,
        old_block: &[u8],
        new: &GroupRecord,
    ) -> Result<CawOutcome, AgentError> {
        let b = new.encode(self.layout.block_size)?;
        self.caw(QuorumLayout::group_lba(index), old_block, &b)
            .await
    }

    /// The record of group `name`, creating it (Stopped, online) in the first free
    /// slot if there is none. Creation is a COMPARE AND WRITE against zeros, so two
    /// nodes creating the same group at once end with one record.
    pub async fn ensure_group(&self, name: &str) -> Result<(), AgentError> {
        for _ in 0..16 {
            let img = self.read_image().await?;
            if img.group(name).is_some() {
                return Ok(());
            }
            let Some(free) = img.first_free_group else {
                return Err(AgentError::Claim(format!(
                    "no free group record for {name:?} on the quorum LUN"
                )));
            };
            let zeros = vec![0u8; self.layout.block_size as usize];
            let mut rec = GroupRecord::new(name);
            rec.changed_wall_ms = crate::agent::wall_ms();
            if self.caw_group(free, &zeros, &rec).await? == CawOutcome::Written {
                return Ok(());
            }
        }
        Err(AgentError::Claim(format!(
            "could not create the record of {name:?}: the group table keeps changing"
        )))
    }
}
