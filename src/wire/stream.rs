//! Reading PDUs off a byte stream: the one loop behind the target's connections, the
//! initiator's sessions and the raw test peer. Framing is [`PduDecoder`]'s; this only
//! feeds it. Cancel-safe: input read before a cancellation stays in the buffer.
use super::codec::{PduDecoder, WireError};
use super::pdu::Pdu;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, Bhs, DigestConfig, NopOut};

    #[tokio::test]
    async fn reads_pdus_split_across_reads_then_reports_close() {
        let pdu = Pdu::with_data(
            Bhs::NopOut(NopOut {
                itt: 7,
                ..Default::default()
            }),
            bytes::Bytes::from_static(b"ping"),
        );
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
}
