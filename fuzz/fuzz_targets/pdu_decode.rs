//! PduDecoder::decode on arbitrary bytes with arbitrary digest settings and maximum
//! data segment, fed incrementally; whatever decodes must re-encode to the same length
//! and decode again to the same PDU.
//!
//! Input: [flags][max segment: 4 bytes][chunk size][stream...].
#![no_main]

use bytes::BytesMut;
use holdfast::wire::{encode, DigestConfig, PduDecoder, WireError};
use holdfast_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let digests = DigestConfig {
        header: flags & 1 != 0,
        data: flags & 2 != 0,
    };
    // Mostly realistic limits; with flag 4 the whole 24-bit range (the decoder must
    // still not buffer more than the PDU needs).
    let raw_max = c.u32();
    let max = if flags & 4 != 0 {
        raw_max & 0x00ff_ffff
    } else {
        raw_max % (256 * 1024 + 1)
    };
    // 0 = everything at once, else feed this many bytes per step.
    let chunk = usize::from(c.u8());
    let stream = c.rest();

    let mut dec = PduDecoder::new(max);
    dec.digests = digests;
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        let step = if chunk == 0 { stream.len() } else { chunk };
        let end = (fed + step).min(stream.len());
        buf.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) must not consume");
                    break;
                }
                Ok(Some(pdu)) => {
                    let consumed = before - buf.len();
                    round_trip(&pdu, digests, consumed);
                }
                // The stream cannot be trusted any more: the connection is dropped.
                Err(WireError::HeaderDigest) | Err(WireError::DataSegmentTooLong { .. }) => {
                    assert_eq!(buf.len(), before, "fatal errors consume nothing");
                    return;
                }
                Err(_) => assert!(buf.len() < before, "recoverable errors consume the PDU"),
            }
        }
        if fed == stream.len() {
            break;
        }
    }
});

fn round_trip(pdu: &holdfast::wire::Pdu, digests: DigestConfig, consumed: usize) {
    let mut wire = BytesMut::new();
    encode(pdu, digests, &mut wire);
    assert_eq!(wire.len(), consumed, "re-encoded length differs: {pdu:?}");
    let encoded = wire.clone().freeze();
    let mut dec = PduDecoder::new(holdfast::wire::codec::MAX_DATA_SEGMENT_LEN);
    dec.digests = digests;
    let again = dec
        .decode(&mut wire)
        .unwrap_or_else(|e| panic!("re-encoded PDU does not decode: {e}: {pdu:?}"))
        .expect("re-encoded PDU is complete");
    assert!(
        wire.is_empty(),
        "re-encoded PDU decoded with bytes left over"
    );
    assert_eq!(&again, pdu, "decode(encode(pdu)) != pdu");
    let mut twice = BytesMut::new();
    encode(&again, digests, &mut twice);
    assert_eq!(twice.freeze(), encoded, "encoding is not stable");
}
