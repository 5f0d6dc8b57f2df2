//! The writer task: stamped PDUs out in order, batched by [`PduWriter`] into few
//! vectored writes, each task's buffer budget given back once its PDUs are written.

use crate::iscsi::target_conn::Hold;
use crate::wire::{DigestConfig, Pdu, PduWriter};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};
use tracing::debug;

/// Something for the writer task.
pub(super) enum Out {
    /// A stamped PDU.
    Pdu(Pdu),
    /// A task's buffer budget, returned once the PDUs queued before it are written: a
    /// peer that stops reading cannot make Data-In pile up beyond the budget.
    Release(Hold),
    /// Flush what is queued and close the connection.
    Close,
}

/// Bytes gathered into one batch at the most before it is written.
const BATCH_MAX: usize = 1 << 20;

/// Write stamped PDUs in order, batching what is queued into few vectored writes.
pub(super) async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    digests: DigestConfig,
    (stall_after, stalled): (Duration, watch::Sender<bool>),
) {
    let mut out = PduWriter::new(digests);
    let mut closing = false;
    let mut releases: Vec<Hold> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdu(p) => out.queue(p),
                Out::Release(b) => releases.push(b),
                Out::Close => closing = true,
            }
            if closing || out.queued_bytes() >= BATCH_MAX {
                break;
            }
            next = rx.try_recv().ok();
        }
        match tokio::time::timeout(stall_after, out.write_to(&mut wr)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "write failed; connection is gone");
                break;
            }
            Err(_) => {
                // A peer that does not read would hold its responses (and their
                // buffer budget) forever.
                let _ = stalled.send(true);
                break;
            }
        }
        releases.clear();
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}
