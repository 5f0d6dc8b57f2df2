//! PDU decoder/encoder (RFC 7143 §11): BHS, AHS, header digest, data segment with
//! padding, data digest.
//!
//! Digests are CRC32C, sent least-significant byte first (RFC 7143 Appendix B.4 lists
//! its examples "in byte order as sent on the wire", which is little-endian).
use super::pdu::*;
use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DigestConfig {
    pub header: bool,
    pub data: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The PDU was consumed; the connection may Reject it and go on.
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<Bhs> },
    /// The PDU was consumed; the connection may Reject it and go on.
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode {
        opcode: u8,
        itt: u32,
        header: Box<[u8; BHS_LEN]>,
    },
    #[error("data segment of {len} bytes exceeds the negotiated maximum of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    /// Returned once the PDU's length is known; the PDU was consumed.
    #[error("malformed PDU: {0}")]
    Malformed(&'static str),
}

/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// Largest TotalAHSLength in bytes (255 four-byte words).
pub const MAX_AHS_LEN: usize = 255 * 4;
/// Largest DataSegmentLength the 24-bit field can express.
pub const MAX_DATA_SEGMENT_LEN: u32 = 0x00ff_ffff;

/// Bytes of zero padding that bring `len` up to a multiple of 4.
#[inline]
pub fn pad_len(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

const ZEROS: [u8; 4] = [0; 4];

/// CRC32C of `data` followed by its zero padding: the iSCSI data digest.
pub fn data_digest(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc32c::crc32c_append(crc, &ZEROS[..pad_len(data.len())])
}

/// Incremental decoder: feed it a growing buffer, it takes whole PDUs off the front.
#[derive(Debug, Clone)]
pub struct PduDecoder {
    pub digests: DigestConfig,
    /// Largest data segment accepted (our MaxRecvDataSegmentLength).
    pub max_data_segment_len: u32,
}

impl PduDecoder {
    pub fn new(max_data_segment_len: u32) -> Self {
        Self {
            digests: DigestConfig::default(),
            max_data_segment_len,
        }
    }

    /// Returns `Ok(None)` if `buf` does not yet hold a whole PDU (nothing consumed).
    ///
    /// Errors: `HeaderDigest` and `DataSegmentTooLong` consume nothing (the stream can
    /// not be trusted any more; the connection should be dropped). `DataDigest`,
    /// `UnknownOpcode` and `Malformed` consume the whole PDU.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Pdu>, WireError> {
        // Bytes 4..8: TotalAHSLength and DataSegmentLength; enough to find the header end.
        let Some(&[ahs_words, d0, d1, d2]) = buf.get(4..8) else {
            return Ok(None);
        };
        if buf.len() < BHS_LEN {
            return Ok(None);
        }
        let ahs_len = usize::from(ahs_words) * 4;
        let dsl = u32::from_be_bytes([0, d0, d1, d2]);
        let hd_len = if self.digests.header { DIGEST_LEN } else { 0 };
        let header_len = BHS_LEN + ahs_len + hd_len;
        // The header is at most 1072 bytes, so waiting for it is cheap.
        let Some(header) = buf.get(..header_len) else {
            return Ok(None);
        };
        if self.digests.header {
            let (covered, digest) = header.split_at(BHS_LEN + ahs_len);
            if crc32c::crc32c(covered).to_le_bytes() != digest {
                return Err(WireError::HeaderDigest);
            }
        }
        // Checked before waiting for the data so a peer cannot make us buffer it.
        if dsl > self.max_data_segment_len {
            return Err(WireError::DataSegmentTooLong {
                len: dsl,
                max: self.max_data_segment_len,
            });
        }
        let data_len = dsl as usize;
        let padded = data_len + pad_len(data_len);
        // No data digest without a data segment.
        let dd_len = if self.digests.data && data_len > 0 {
            DIGEST_LEN
        } else {
            0
        };
        let total = header_len + padded + dd_len;
        if buf.len() < total {
            // Make room once rather than growing in small steps as the data trickles in.
            buf.reserve(total - buf.len());
            return Ok(None);
        }

        let frame: Bytes = buf.split_to(total).freeze();
        let bhs_bytes: [u8; BHS_LEN] = match frame.get(..BHS_LEN).map(<[u8; BHS_LEN]>::try_from) {
            Some(Ok(b)) => b,
            _ => return Err(WireError::Malformed("short header")),
        };
        let Some(bhs) = parse_bhs(&bhs_bytes) else {
            let [i0, i1, i2, i3] = itt_bytes(&bhs_bytes);
            return Err(WireError::UnknownOpcode {
                opcode: bhs_bytes[0] & 0x3f,
                itt: u32::from_be_bytes([i0, i1, i2, i3]),
                header: Box::new(bhs_bytes),
            });
        };
        let data_start = header_len;
        if dd_len > 0 {
            let covered = frame
                .get(data_start..data_start + padded)
                .unwrap_or_default();
            let digest = frame.get(data_start + padded..total).unwrap_or_default();
            let crc = crc32c::crc32c(covered);
            if crc.to_le_bytes() != digest {
                return Err(WireError::DataDigest { bhs: Box::new(bhs) });
            }
        }
        let ahs = parse_ahs_list(&frame, BHS_LEN, BHS_LEN + ahs_len)?;
        let data = frame.slice(data_start..data_start + data_len);
        Ok(Some(Pdu { bhs, ahs, data }))
    }
}

fn itt_bytes(h: &[u8; BHS_LEN]) -> [u8; 4] {
    [h[16], h[17], h[18], h[19]]
}

/// Split the AHS area `frame[start..end]` into segments; the data are zero-copy slices.
fn parse_ahs_list(frame: &Bytes, start: usize, end: usize) -> Result<Vec<Ahs>, WireError> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(&[l0, l1, ahs_type]) = frame.get(pos..pos + 3) else {
            return Err(WireError::Malformed("truncated AHS"));
        };
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        let data_start = pos + 3;
        let seg_end = data_start + len;
        if seg_end > end {
            return Err(WireError::Malformed("AHS longer than TotalAHSLength"));
        }
        out.push(Ahs {
            ahs_type,
            data: frame.slice(data_start..seg_end),
        });
        pos = seg_end + pad_len(3 + len);
    }
    Ok(out)
}

pub use super::bhs::{bhs_bytes, parse_bhs};

/// Padded wire length of an AHS list.
fn ahs_wire_len(ahs: &[Ahs]) -> usize {
    ahs.iter()
        .map(|a| 3 + a.data.len() + pad_len(3 + a.data.len()))
        .sum()
}

/// Wire length of BHS + AHS + header digest.
pub fn header_wire_len(ahs: &[Ahs], digests: DigestConfig) -> usize {
    BHS_LEN + ahs_wire_len(ahs) + if digests.header { DIGEST_LEN } else { 0 }
}

/// Append BHS, AHS and (if enabled) the header digest for a PDU whose data segment is
/// `data_len` bytes long.
///
/// The AHS list must fit TotalAHSLength (1020 bytes) and each AHS its 16-bit length;
/// both are our own output, so this is checked in debug builds only and a longer list
/// is cut off at the limit.
pub fn encode_header_into(
    bhs: &Bhs,
    ahs: &[Ahs],
    data_len: u32,
    digests: DigestConfig,
    out: &mut BytesMut,
) {
    debug_assert!(data_len <= MAX_DATA_SEGMENT_LEN, "data segment too long");
    let ahs_len = ahs_wire_len(ahs);
    debug_assert!(ahs_len <= MAX_AHS_LEN, "AHS list too long");
    let ahs_len = ahs_len.min(MAX_AHS_LEN);
    let start = out.len();
    out.reserve(header_wire_len(ahs, digests));
    out.put_slice(&bhs_bytes(bhs, (ahs_len / 4) as u8, data_len));
    let mut written = 0;
    for a in ahs {
        let seg = 3 + a.data.len() + pad_len(3 + a.data.len());
        if written + seg > ahs_len {
            break;
        }
        out.put_u16(a.data.len() as u16);
        out.put_u8(a.ahs_type);
        out.put_slice(&a.data);
        out.put_slice(&ZEROS[..pad_len(3 + a.data.len())]);
        written += seg;
    }
    if digests.header {
        let crc = crc32c::crc32c(out.get(start..).unwrap_or_default());
        out.put_u32_le(crc);
    }
}

/// What follows the data segment on the wire: zero padding and the optional data digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trailer {
    bytes: [u8; 7],
    len: u8,
}

impl Trailer {
    /// The trailer for `data` (empty for an empty data segment).
    pub fn for_data(data: &[u8], digests: DigestConfig) -> Self {
        let mut t = Trailer::default();
        let pad = pad_len(data.len());
        // Padding bytes are already zero.
        let mut len = pad;
        if digests.data && !data.is_empty() {
            t.bytes[pad..pad + DIGEST_LEN].copy_from_slice(&data_digest(data).to_le_bytes());
            len += DIGEST_LEN;
        }
        t.len = len as u8;
        t
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Split encoding for vectored writes: `header_out` receives BHS+AHS+header digest and
/// the returned trailer holds padding and data digest, so that
/// `header_out ++ pdu.data ++ trailer` equals [`encode`]'s output without copying data.
pub fn encode_parts(pdu: &Pdu, digests: DigestConfig, header_out: &mut BytesMut) -> Trailer {
    encode_header_into(
        &pdu.bhs,
        &pdu.ahs,
        pdu.data.len() as u32,
        digests,
        header_out,
    );
    Trailer::for_data(&pdu.data, digests)
}

/// Append the wire form of `pdu` (with padding and digests) to `out`.
pub fn encode(pdu: &Pdu, digests: DigestConfig, out: &mut BytesMut) {
    let trailer = Trailer::for_data(&pdu.data, digests);
    out.reserve(header_wire_len(&pdu.ahs, digests) + pdu.data.len() + trailer.as_slice().len());
    encode_header_into(&pdu.bhs, &pdu.ahs, pdu.data.len() as u32, digests, out);
    out.put_slice(&pdu.data);
    out.put_slice(trailer.as_slice());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_DIGESTS: DigestConfig = DigestConfig {
        header: false,
        data: false,
    };
    const BOTH: DigestConfig = DigestConfig {
        header: true,
        data: true,
    };

    /// A BHS with `fields` (offset, bytes) written over zeros.
    fn hdr(fields: &[(usize, &[u8])]) -> [u8; BHS_LEN] {
        let mut h = [0u8; BHS_LEN];
        for (off, b) in fields {
            h[*off..*off + b.len()].copy_from_slice(b);
        }
        h
    }

    fn be32(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    fn decode_all(bytes: &[u8], digests: DigestConfig) -> Pdu {
        let mut dec = PduDecoder::new(1 << 24);
        dec.digests = digests;
        let mut buf = BytesMut::from(bytes);
        let pdu = dec.decode(&mut buf).unwrap().expect("whole PDU");
        assert!(buf.is_empty(), "PDU not fully consumed");
        pdu
    }

    /// The hand-built header decodes to `bhs`, and `bhs` encodes back to exactly it.
    fn check(h: [u8; BHS_LEN], bhs: Bhs) {
        let pdu = decode_all(&h, NO_DIGESTS);
        assert_eq!(pdu.bhs, bhs);
        assert!(pdu.ahs.is_empty() && pdu.data.is_empty());
        let mut out = BytesMut::new();
        encode(&Pdu::new(bhs), NO_DIGESTS, &mut out);
        assert_eq!(&out[..], &h[..]);
    }

    /// Hand-built headers, one per PDU type, each with the BHS it decodes to.
    fn header_cases() -> Vec<([u8; BHS_LEN], Bhs)> {
        vec![
            (
                hdr(&[
                    (0, &[0x40, 0x80]),
                    (8, &[0, 1, 0, 0, 0, 0, 0, 0]),
                    (16, &be32(0x11)),
                    (20, &be32(RESERVED_TAG)),
                    (24, &be32(7)),
                    (28, &be32(9)),
                ]),
                Bhs::NopOut(NopOut {
                    immediate: true,
                    lun: 0x0001_0000_0000_0000,
                    itt: 0x11,
                    ttt: RESERVED_TAG,
                    cmd_sn: 7,
                    exp_stat_sn: 9,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x42, 0x81]),
                    (8, &[0, 2, 0, 0, 0, 0, 0, 0]),
                    (16, &be32(5)),
                    (20, &be32(3)),
                    (24, &be32(10)),
                    (28, &be32(11)),
                    (32, &be32(8)),
                    (36, &be32(0)),
                ]),
                Bhs::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: true,
                    function: 1,
                    lun: 0x0002_0000_0000_0000,
                    itt: 5,
                    referenced_task_tag: 3,
                    cmd_sn: 10,
                    exp_stat_sn: 11,
                    ref_cmd_sn: 8,
                    exp_data_sn: 0,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x44, 0xc0]),
                    (16, &be32(9)),
                    (20, &be32(RESERVED_TAG)),
                    (24, &be32(2)),
                    (28, &be32(3)),
                ]),
                Bhs::TextRequest(TextRequest {
                    immediate: true,
                    final_: true,
                    continue_: true,
                    lun: 0,
                    itt: 9,
                    ttt: RESERVED_TAG,
                    cmd_sn: 2,
                    exp_stat_sn: 3,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x05, 0x80]),
                    (8, &[0, 1, 0, 0, 0, 0, 0, 0]),
                    (16, &be32(0x22)),
                    (20, &be32(0x33)),
                    (28, &be32(4)),
                    (36, &be32(2)),
                    (40, &be32(16384)),
                ]),
                Bhs::DataOut(DataOut {
                    final_: true,
                    lun: 0x0001_0000_0000_0000,
                    itt: 0x22,
                    ttt: 0x33,
                    exp_stat_sn: 4,
                    data_sn: 2,
                    buffer_offset: 16384,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x46, 0x81]),
                    (16, &be32(77)),
                    (20, &[0x00, 0x03]),
                    (24, &be32(12)),
                    (28, &be32(13)),
                ]),
                Bhs::LogoutRequest(LogoutRequest {
                    immediate: true,
                    reason: 1,
                    itt: 77,
                    cid: 3,
                    cmd_sn: 12,
                    exp_stat_sn: 13,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x10, 0x81]),
                    (16, &be32(1)),
                    (20, &be32(2)),
                    (28, &be32(3)),
                    (40, &be32(4)),
                    (44, &be32(5)),
                ]),
                Bhs::SnackRequest(SnackRequest {
                    type_: 1,
                    lun: 0,
                    itt: 1,
                    ttt: 2,
                    exp_stat_sn: 3,
                    beg_run: 4,
                    run_length: 5,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x20, 0x80]),
                    (16, &be32(RESERVED_TAG)),
                    (20, &be32(0x44)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                ]),
                Bhs::NopIn(NopIn {
                    lun: 0,
                    itt: RESERVED_TAG,
                    ttt: 0x44,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x21, 0x80 | 0x10 | 0x02, 0x00, 0x02]),
                    (16, &be32(0xabcd)),
                    (24, &be32(5)),
                    (28, &be32(6)),
                    (32, &be32(70)),
                    (36, &be32(1)),
                    (40, &be32(10)),
                    (44, &be32(512)),
                ]),
                Bhs::ScsiResponse(ScsiResponse {
                    bidi_overflow: true,
                    bidi_underflow: false,
                    overflow: false,
                    underflow: true,
                    response: 0,
                    status: 0x02,
                    itt: 0xabcd,
                    snack_tag: 0,
                    stat_sn: 5,
                    exp_cmd_sn: 6,
                    max_cmd_sn: 70,
                    exp_data_sn: 1,
                    bidi_read_residual_count: 10,
                    residual_count: 512,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x22, 0x80, 0x05]),
                    (16, &be32(5)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                ]),
                Bhs::TaskMgmtResponse(TaskMgmtResponse {
                    response: 5,
                    itt: 5,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x24, 0x40]),
                    (16, &be32(3)),
                    (20, &be32(0x99)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                ]),
                Bhs::TextResponse(TextResponse {
                    final_: false,
                    continue_: true,
                    lun: 0,
                    itt: 3,
                    ttt: 0x99,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x26, 0x80, 0x00]),
                    (16, &be32(77)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                    (40, &[0x00, 0x02, 0x00, 0x14]),
                ]),
                Bhs::LogoutResponse(LogoutResponse {
                    response: 0,
                    itt: 77,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                    time2wait: 2,
                    time2retain: 20,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x31, 0x80]),
                    (8, &[0, 3, 0, 0, 0, 0, 0, 0]),
                    (16, &be32(0x10)),
                    (20, &be32(0x20)),
                    (24, &be32(5)),
                    (28, &be32(6)),
                    (32, &be32(7)),
                    (36, &be32(1)),
                    (40, &be32(65536)),
                    (44, &be32(262144)),
                ]),
                Bhs::R2t(R2t {
                    lun: 0x0003_0000_0000_0000,
                    itt: 0x10,
                    ttt: 0x20,
                    stat_sn: 5,
                    exp_cmd_sn: 6,
                    max_cmd_sn: 7,
                    r2t_sn: 1,
                    buffer_offset: 65536,
                    desired_data_transfer_length: 262144,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x32, 0x80]),
                    (16, &be32(RESERVED_TAG)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                    (36, &[0x01, 0x00, 0x00, 0x05, 0x00, 0x06, 0x00, 0x07]),
                ]),
                Bhs::AsyncMessage(AsyncMessage {
                    lun: 0,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                    async_event: 1,
                    async_vcode: 0,
                    parameter1: 5,
                    parameter2: 6,
                    parameter3: 7,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x3f, 0x80, reject_reason::PROTOCOL_ERROR]),
                    (16, &be32(RESERVED_TAG)),
                    (24, &be32(1)),
                    (28, &be32(2)),
                    (32, &be32(3)),
                    (36, &be32(4)),
                ]),
                Bhs::Reject(Reject {
                    reason: reject_reason::PROTOCOL_ERROR,
                    stat_sn: 1,
                    exp_cmd_sn: 2,
                    max_cmd_sn: 3,
                    data_sn: 4,
                }),
            ),
            (
                hdr(&[
                    (0, &[0x23, 0x81, 0x00, 0x00]),
                    (8, &[0x40, 0, 0, 0, 0, 1]),
                    (14, &[0x12, 0x34]),
                    (16, &be32(1)),
                    (24, &be32(100)),
                    (28, &be32(1)),
                    (32, &be32(33)),
                    (36, &[0x02, 0x01]),
                ]),
                Bhs::LoginResponse(LoginResponse {
                    transit: true,
                    continue_: false,
                    csg: 0,
                    nsg: 1,
                    version_max: 0,
                    version_active: 0,
                    isid: [0x40, 0, 0, 0, 0, 1],
                    tsih: 0x1234,
                    itt: 1,
                    stat_sn: 100,
                    exp_cmd_sn: 1,
                    max_cmd_sn: 33,
                    status_class: 2,
                    status_detail: 1,
                }),
            ),
        ]
    }

    #[test]
    fn headers_round_trip() {
        for (h, bhs) in header_cases() {
            check(h, bhs);
        }
    }

    #[test]
    fn scsi_command() {
        let cdb = [0x28, 0, 0, 0, 0x10, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
        let h = hdr(&[
            (0, &[0x01, 0xc1]),
            (16, &be32(0xabcd)),
            (20, &be32(4096)),
            (24, &be32(100)),
            (28, &be32(55)),
            (32, &cdb),
        ]);
        let b = ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: TaskAttribute::Simple as u8,
            lun: 0,
            itt: 0xabcd,
            expected_data_transfer_length: 4096,
            cmd_sn: 100,
            exp_stat_sn: 55,
            cdb,
        };
        check(h, Bhs::ScsiCommand(b));
        // W bit and an immediate, unsolicited-data write with a reserved ATTR value kept raw.
        let h = hdr(&[(0, &[0x41, 0x27])]);
        let Bhs::ScsiCommand(c) = decode_all(&h, NO_DIGESTS).bhs else {
            panic!()
        };
        assert!(c.immediate && c.write && !c.read && !c.final_);
        assert_eq!(c.attr, 7);
    }

    #[test]
    fn login_request_with_text_data() {
        let isid = [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a];
        let text = b"InitiatorName=iqn.x\0";
        let mut h = hdr(&[
            (0, &[0x43, 0x87, 0x00, 0x00]),
            (5, &[0, 0, text.len() as u8]),
            (8, &isid),
            (14, &[0x00, 0x01]),
            (16, &be32(1)),
            (20, &[0x00, 0x02]),
            (24, &be32(1)),
            (28, &be32(0)),
        ])
        .to_vec();
        // 20 bytes of text: a multiple of 4, so no padding follows.
        h.extend_from_slice(text);
        let pdu = decode_all(&h, NO_DIGESTS);
        let b = LoginRequest {
            transit: true,
            continue_: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid,
            tsih: 1,
            itt: 1,
            cid: 2,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        assert_eq!(pdu.bhs, Bhs::LoginRequest(b.clone()));
        assert_eq!(&pdu.data[..], text);
        let mut out = BytesMut::new();
        encode(&pdu, NO_DIGESTS, &mut out);
        assert_eq!(&out[..], &h[..]);

        // Odd length: padded with zeros, DataSegmentLength excludes the padding.
        let pdu = Pdu::with_data(Bhs::LoginRequest(b), Bytes::from_static(b"A=1\0B"));
        let mut out = BytesMut::new();
        encode(&pdu, NO_DIGESTS, &mut out);
        assert_eq!(out.len(), 48 + 8);
        assert_eq!(&out[5..8], &[0, 0, 5]);
        assert_eq!(&out[48..], b"A=1\0B\0\0\0");
        assert_eq!(decode_all(&out, NO_DIGESTS), pdu);
    }

    #[test]
    fn data_in() {
        // With status (S): status byte 3 and StatSN 24..28 present.
        let h = hdr(&[
            (0, &[0x25, 0x80 | 0x02 | 0x01, 0x00, 0x00]),
            (16, &be32(0x10)),
            (20, &be32(RESERVED_TAG)),
            (24, &be32(42)),
            (28, &be32(43)),
            (32, &be32(44)),
            (36, &be32(3)),
            (40, &be32(0x3000)),
            (44, &be32(0x200)),
        ]);
        let b = DataIn {
            final_: true,
            ack: false,
            overflow: false,
            underflow: true,
            status_present: true,
            status: 0,
            lun: 0,
            itt: 0x10,
            ttt: RESERVED_TAG,
            stat_sn: 42,
            exp_cmd_sn: 43,
            max_cmd_sn: 44,
            data_sn: 3,
            buffer_offset: 0x3000,
            residual_count: 0x200,
        };
        check(h, Bhs::DataIn(b.clone()));

        // Without S, StatSN and status are not sent even if set in the struct.
        let no_s = DataIn {
            final_: false,
            status_present: false,
            status: 2,
            stat_sn: 42,
            ..b
        };
        let mut out = BytesMut::new();
        encode(&Pdu::new(Bhs::DataIn(no_s.clone())), NO_DIGESTS, &mut out);
        assert_eq!(out[1], 0x02);
        assert_eq!(out[3], 0);
        assert_eq!(&out[24..28], &[0, 0, 0, 0]);
        let Bhs::DataIn(d) = decode_all(&out, NO_DIGESTS).bhs else {
            panic!()
        };
        assert_eq!(
            d,
            DataIn {
                status: 0,
                stat_sn: 0,
                ..no_s
            }
        );
    }

    #[test]
    fn crc32c_vectors() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4 examples, given in wire byte order.
        assert_eq!(
            data_digest(&[0u8; 32]).to_le_bytes(),
            [0xaa, 0x36, 0x91, 0x8a]
        );
        assert_eq!(
            data_digest(&[0xffu8; 32]).to_le_bytes(),
            [0x43, 0xab, 0xa8, 0x62]
        );
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(data_digest(&inc).to_le_bytes(), [0x4e, 0x79, 0xdd, 0x46]);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(data_digest(&dec).to_le_bytes(), [0x5c, 0xdb, 0x3f, 0x11]);
        // The digest covers the padding too.
        assert_eq!(data_digest(b"abc"), crc32c::crc32c(b"abc\0"));
    }

    fn sample_pdu() -> Pdu {
        let b = ScsiCommand {
            final_: true,
            write: true,
            itt: 7,
            expected_data_transfer_length: 5,
            cdb: [0x2a; 16],
            ..Default::default()
        };
        Pdu {
            bhs: Bhs::ScsiCommand(b),
            ahs: vec![Ahs {
                ahs_type: 1,
                data: Bytes::from_static(&[0, 1, 2, 3, 4]),
            }],
            data: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn digest_layout() {
        let pdu = sample_pdu();
        let mut out = BytesMut::new();
        encode(&pdu, BOTH, &mut out);
        // BHS, AHS of 3+5 bytes (8, no padding), header digest, 5 data + 3 pad, digest.
        assert_eq!(out[4], 2);
        assert_eq!(&out[48..56], &[0, 5, 1, 0, 1, 2, 3, 4]);
        assert_eq!(&out[56..60], &crc32c::crc32c(&out[..56]).to_le_bytes());
        assert_eq!(&out[60..68], b"hello\0\0\0");
        assert_eq!(&out[68..72], &crc32c::crc32c(b"hello\0\0\0").to_le_bytes());
        assert_eq!(out.len(), 72);
        assert_eq!(decode_all(&out, BOTH), pdu);

        // No data segment: no data digest either.
        let mut out = BytesMut::new();
        encode(&Pdu::new(pdu.bhs.clone()), BOTH, &mut out);
        assert_eq!(out.len(), 52);
    }

    #[test]
    fn header_digest_mismatch_consumes_nothing() {
        let mut out = BytesMut::new();
        encode(&sample_pdu(), BOTH, &mut out);
        out[20] ^= 1;
        let len = out.len();
        let mut dec = PduDecoder::new(1 << 16);
        dec.digests = BOTH;
        assert!(matches!(dec.decode(&mut out), Err(WireError::HeaderDigest)));
        assert_eq!(out.len(), len);
    }

    #[test]
    fn data_digest_mismatch_consumes_pdu() {
        let mut out = BytesMut::new();
        encode(&sample_pdu(), BOTH, &mut out);
        encode(&sample_pdu(), BOTH, &mut out);
        out[61] ^= 0x80;
        let mut dec = PduDecoder::new(1 << 16);
        dec.digests = BOTH;
        match dec.decode(&mut out) {
            Err(WireError::DataDigest { bhs }) => assert_eq!(*bhs, sample_pdu().bhs),
            other => panic!("{other:?}"),
        }
        assert_eq!(out.len(), 72);
        assert_eq!(dec.decode(&mut out).unwrap().unwrap(), sample_pdu());
    }

    #[test]
    fn unknown_opcode_consumes_pdu() {
        let mut h = hdr(&[(0, &[0x4c]), (7, &[3]), (16, &be32(0x1234))]).to_vec();
        h.extend_from_slice(&[1, 2, 3, 0]);
        let mut buf = BytesMut::from(&h[..]);
        let mut dec = PduDecoder::new(8192);
        match dec.decode(&mut buf) {
            Err(WireError::UnknownOpcode {
                opcode,
                itt,
                header,
            }) => {
                assert_eq!(opcode, 0x0c);
                assert_eq!(itt, 0x1234);
                assert_eq!(&header[..], &h[..48]);
            }
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn too_long_rejected_before_data_arrives() {
        let h = hdr(&[(0, &[0x05, 0x80]), (5, &[0x01, 0x00, 0x00])]);
        let mut buf = BytesMut::from(&h[..]);
        let mut dec = PduDecoder::new(8192);
        match dec.decode(&mut buf) {
            Err(WireError::DataSegmentTooLong { len, max }) => {
                assert_eq!((len, max), (65536, 8192));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_ahs() {
        // TotalAHSLength 1 word, but the AHS claims 8 bytes of data.
        let mut h = hdr(&[(0, &[0x01, 0x80]), (4, &[1])]).to_vec();
        h.extend_from_slice(&[0, 8, 1, 0]);
        let mut buf = BytesMut::from(&h[..]);
        let mut dec = PduDecoder::new(8192);
        assert!(matches!(dec.decode(&mut buf), Err(WireError::Malformed(_))));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_input_consumes_nothing() {
        let mut full = BytesMut::new();
        encode(&sample_pdu(), BOTH, &mut full);
        let mut dec = PduDecoder::new(8192);
        dec.digests = BOTH;
        for k in 0..full.len() {
            let mut buf = BytesMut::from(&full[..k]);
            assert!(dec.decode(&mut buf).unwrap().is_none());
            assert_eq!(&buf[..], &full[..k]);
        }
    }

    // ---- property tests -------------------------------------------------------

    /// Every BHS type with random fields: random header bytes of a known opcode, read
    /// through the shared layout, so fields not carried on the wire (Data-In status and
    /// StatSN without S) and bits beyond a field's width take canonical values.
    fn arb_bhs() -> impl Strategy<Value = Bhs> {
        let opcodes: Vec<u8> = (0..0x40)
            .filter(|&o| Opcode::from_u8(o).is_some())
            .collect();
        let bytes = prop::collection::vec(any::<u8>(), BHS_LEN);
        (prop::sample::select(opcodes), bytes).prop_map(|(opcode, bytes)| {
            let mut h = [0; BHS_LEN];
            h.copy_from_slice(&bytes);
            h[0] = (h[0] & 0xc0) | opcode;
            parse_bhs(&h).expect("a known opcode")
        })
    }

    fn arb_pdu() -> impl Strategy<Value = Pdu> {
        let ahs = prop::collection::vec(
            (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)),
            0..4,
        );
        (arb_bhs(), ahs, prop::collection::vec(any::<u8>(), 0..8192)).prop_map(
            |(bhs, ahs, data)| Pdu {
                bhs,
                ahs: ahs
                    .into_iter()
                    .map(|(ahs_type, d)| Ahs {
                        ahs_type,
                        data: Bytes::from(d),
                    })
                    .collect(),
                data: Bytes::from(data),
            },
        )
    }

    fn arb_digests() -> impl Strategy<Value = DigestConfig> {
        (any::<bool>(), any::<bool>()).prop_map(|(header, data)| DigestConfig { header, data })
    }

    /// Decode until the buffer is exhausted or the decoder stops; must never panic.
    fn drain(dec: &mut PduDecoder, buf: &mut BytesMut) {
        loop {
            let before = buf.len();
            match dec.decode(buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) if buf.len() < before => {}
                Err(_) => break,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn round_trip(pdu in arb_pdu(), digests in arb_digests()) {
            let mut out = BytesMut::new();
            encode(&pdu, digests, &mut out);
            let mut dec = PduDecoder::new(MAX_DATA_SEGMENT_LEN);
            dec.digests = digests;
            let mut buf = out.clone();
            let got = dec.decode(&mut buf).unwrap();
            prop_assert_eq!(got, Some(pdu.clone()));
            prop_assert!(buf.is_empty());

            // encode_parts gives the same bytes without copying the data.
            let mut head = BytesMut::new();
            let trailer = encode_parts(&pdu, digests, &mut head);
            let mut joined = head.to_vec();
            joined.extend_from_slice(&pdu.data);
            joined.extend_from_slice(trailer.as_slice());
            prop_assert_eq!(&joined[..], &out[..]);
        }

        #[test]
        fn incremental_feed(pdu in arb_pdu(), digests in arb_digests()) {
            let mut out = BytesMut::new();
            encode(&pdu, digests, &mut out);
            encode(&pdu, digests, &mut out);
            let mut dec = PduDecoder::new(MAX_DATA_SEGMENT_LEN);
            dec.digests = digests;
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for &byte in out.iter() {
                buf.put_u8(byte);
                if let Some(p) = dec.decode(&mut buf).unwrap() {
                    got.push(p);
                }
            }
            prop_assert_eq!(got, vec![pdu.clone(), pdu]);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..4096),
            digests in arb_digests(),
        ) {
            let mut dec = PduDecoder::new(2048);
            dec.digests = digests;
            drain(&mut dec, &mut BytesMut::from(&data[..]));
        }

        #[test]
        fn mutated_encodings_never_panic(
            pdu in arb_pdu(),
            digests in arb_digests(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut out = BytesMut::new();
            encode(&pdu, digests, &mut out);
            for (idx, x) in flips {
                let i = idx.index(out.len());
                out[i] ^= x;
            }
            let mut dec = PduDecoder::new(16384);
            dec.digests = digests;
            let mut truncated = BytesMut::from(&out[..cut.index(out.len() + 1)]);
            drain(&mut dec, &mut truncated);
            drain(&mut dec, &mut out);
        }
    }
}
