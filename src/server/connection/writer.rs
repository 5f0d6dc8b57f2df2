//! The writer task: stamped PDUs out in order, batched into few vectored writes, with
//! large data segments sent from their own buffers.

use crate::iscsi::target_conn::Hold;
use crate::wire::{self, DigestConfig, Pdu};
use bytes::{Bytes, BytesMut};
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

/// Data segments at least this long are sent from their own buffer (vectored write)
/// instead of being copied behind their header: a Data-In payload is never copied.
const COPY_DATA_MAX: usize = 2048;
/// Buffers handed to one writev.
const MAX_IOVECS: usize = 64;

/// Write `chunks` in order with as few writev calls as the socket allows.
async fn write_chunks(wr: &mut OwnedWriteHalf, chunks: &mut [Bytes]) -> std::io::Result<()> {
    use bytes::Buf;
    let mut i = 0;
    while i < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[i..]
            .iter()
            .take(MAX_IOVECS)
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < chunks.len() {
            let len = chunks[i].len();
            if n >= len {
                n -= len;
                i += 1;
            } else {
                chunks[i].advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Write stamped PDUs in order, batching what is queued into few vectored writes.
pub(super) async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    digests: DigestConfig,
    (stall_after, stalled): (Duration, watch::Sender<bool>),
) {
    // Headers and small PDUs accumulate in `small`; large payloads join `chunks` by
    // reference between the pieces of `small` that surround them.
    let mut small = BytesMut::with_capacity(64 * 1024);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut closing = false;
    let mut releases: Vec<Hold> = Vec::new();
    while let Some(first) = rx.recv().await {
        chunks.clear();
        let mut queued = 0usize;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdu(p) => {
                    if p.data.len() >= COPY_DATA_MAX {
                        let trailer = wire::codec::encode_parts(&p, digests, &mut small);
                        chunks.push(small.split().freeze());
                        queued += p.data.len();
                        chunks.push(p.data);
                        small.extend_from_slice(trailer.as_slice());
                    } else {
                        wire::encode(&p, digests, &mut small);
                    }
                }
                Out::Release(b) => releases.push(b),
                Out::Close => closing = true,
            }
            if closing || queued + small.len() >= 1 << 20 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        match tokio::time::timeout(stall_after, write_chunks(&mut wr, &mut chunks)).await {
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
        if small.capacity() < 16 * 1024 {
            // split() hands the written bytes away; start the next batch on fresh room.
            small.reserve(64 * 1024);
        }
        releases.clear();
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}
