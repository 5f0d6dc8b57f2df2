//! PDUs over a byte stream, for the target's connections, the initiator's sessions and
//! the raw test peer alike. Reading: [`read_pdu`] feeds [`PduDecoder`] (framing is its);
//! cancel-safe, input read before a cancellation stays in the buffer. Writing:
//! [`PduWriter`] batches PDUs into vectored writes.
use super::codec::{encode, encode_parts, DigestConfig, PduDecoder, WireError};
use super::pdu::Pdu;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why no PDU could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed by peer")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
}

/// Headroom kept free in the buffer before each read, and how much to grow it by: a
/// full-size data segment then arrives in few reads.
const MIN_FREE: usize = 16 * 1024;
const GROW: usize = 64 * 1024;

/// Read one PDU from `rd`, keeping partial input (and any following PDUs) in `buf`.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    dec: &mut PduDecoder,
) -> Result<Pdu, ReadError> {
    loop {
        if let Some(p) = dec.decode(buf)? {
            return Ok(p);
        }
        if buf.capacity() - buf.len() < MIN_FREE {
            buf.reserve(GROW);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Data segments at least this long are sent from their own buffer (vectored write)
/// instead of being copied behind their header: a Data-In or Data-Out payload is never
/// copied.
const COPY_DATA_MAX: usize = 2048;
/// Buffers handed to one writev.
const MAX_IOVECS: usize = 64;
/// Room kept for headers and small PDUs between flushes.
const SMALL_ROOM: usize = 64 * 1024;

/// PDUs queued for one write: headers and small PDUs are encoded into one buffer, large
/// data segments join by reference between the pieces that surround them.
#[derive(Debug)]
pub struct PduWriter {
    digests: DigestConfig,
    small: BytesMut,
    chunks: Vec<Bytes>,
    queued: usize,
}

impl PduWriter {
    pub fn new(digests: DigestConfig) -> Self {
        Self {
            digests,
            small: BytesMut::with_capacity(SMALL_ROOM),
            chunks: Vec::new(),
            queued: 0,
        }
    }

    /// Encode `pdu` behind what is queued.
    pub fn queue(&mut self, pdu: Pdu) {
        if pdu.data.len() >= COPY_DATA_MAX {
            let trailer = encode_parts(&pdu, self.digests, &mut self.small);
            self.chunks.push(self.small.split().freeze());
            self.queued += pdu.data.len();
            self.chunks.push(pdu.data);
            self.small.extend_from_slice(trailer.as_slice());
        } else {
            encode(&pdu, self.digests, &mut self.small);
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued + self.small.len()
    }

    /// Write everything queued to `wr`, in order, with as few writev calls as it takes.
    /// On an error the queue is dropped: the stream is unusable anyway.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
        let res = write_chunks(wr, &mut self.chunks).await;
        self.chunks.clear();
        self.queued = 0;
        if self.small.capacity() < SMALL_ROOM / 4 {
            // split() handed the written bytes away; start the next batch on fresh room.
            self.small.reserve(SMALL_ROOM);
        }
        res
    }

    /// Queue `pdu` and write it with whatever was queued before it.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        pdu: Pdu,
    ) -> std::io::Result<()> {
        self.queue(pdu);
        self.write_to(wr).await
    }
}

/// Write `chunks` in order with as few writev calls as the stream allows.
async fn write_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
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
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, Bhs, DigestConfig, NopOut};

    fn nop_out(itt: u32, data: bytes::Bytes) -> Pdu {
        Pdu::with_data(
            Bhs::NopOut(NopOut {
                itt,
                ..Default::default()
            }),
            data,
        )
    }

    #[tokio::test]
    async fn reads_pdus_split_across_reads_then_reports_close() {
        let pdu = nop_out(7, bytes::Bytes::from_static(b"ping"));
        let mut bytes = BytesMut::new();
        encode(&pdu, DigestConfig::default(), &mut bytes);
        encode(&pdu, DigestConfig::default(), &mut bytes);
        let (mut client, mut server) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&bytes).await.unwrap();
        });
        let (mut buf, mut dec) = (BytesMut::new(), PduDecoder::new(1 << 16));
        for _ in 0..2 {
            let got = read_pdu(&mut server, &mut buf, &mut dec).await.unwrap();
            assert_eq!(got.bhs.itt(), 7);
            assert_eq!(&got.data[..], b"ping");
        }
        writer.await.unwrap();
        assert!(matches!(
            read_pdu(&mut server, &mut buf, &mut dec).await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn writer_batches_small_and_large_pdus_in_order() {
        let small = nop_out(1, bytes::Bytes::from_static(b"abc"));
        let large = nop_out(2, bytes::Bytes::from(vec![7u8; 5000]));
        let digests = DigestConfig {
            header: true,
            data: true,
        };
        let mut expected = BytesMut::new();
        for p in [&small, &large, &small] {
            encode(p, digests, &mut expected);
        }
        let mut w = PduWriter::new(digests);
        w.queue(small.clone());
        w.queue(large);
        w.queue(small);
        assert!(w.queued_bytes() >= 5000);
        let mut out: Vec<u8> = Vec::new();
        w.write_to(&mut out).await.unwrap();
        assert_eq!(out, &expected[..]);
        assert_eq!(w.queued_bytes(), 0);
    }
}
