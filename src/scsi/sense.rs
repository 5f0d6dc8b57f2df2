//! Sense data (SPC-4 §4.5): fixed (0x70) and descriptor (0x72) formats, chosen per LU by the
//! control mode page's D_SENSE bit.

use bytes::{BufMut, Bytes, BytesMut};

/// Sense keys (SPC-4 table 48).
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// Unit attention conditions as (ASC, ASCQ) pairs (SPC-4 table 49), queued per nexus and
/// reported with sense key UNIT ATTENTION.
pub mod ua {
    pub const BUS_DEVICE_RESET_FUNCTION_OCCURRED: (u8, u8) = (0x29, 0x03);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: (u8, u8) = (0x2F, 0x00);
    pub const MODE_PARAMETERS_CHANGED: (u8, u8) = (0x2A, 0x01);
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
    /// SPC-4: the LU's capacity changed (a live reload grew it).
    pub const CAPACITY_DATA_HAS_CHANGED: (u8, u8) = (0x2A, 0x09);
    /// SPC-4: the LUN inventory this nexus sees changed (LUN added, ACL or mask changed).
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: (u8, u8) = (0x3F, 0x0E);
}

/// Where in the CDB or parameter list an invalid field sits (sense-key specific field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the field is in the CDB; false: in the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    /// Bit within the byte (0..=7), if a single bit or a field's most significant bit.
    pub bit: Option<u8>,
}

/// One sense condition: key, additional sense code and qualifier, optional INFORMATION and
/// field pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sense key {key:#x}, asc/ascq {asc:#04x}/{ascq:#04x}")]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24/00), pointing at `byte` (and `bit`).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: 0x24,
            ascq: 0x00,
            information: None,
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
        }
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26/00).
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: 0x26,
            ascq: 0x00,
            information: None,
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
        }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const PARAM_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03);
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// INVALID FIELD IN CDB without a field pointer (see [`Sense::invalid_cdb`]).
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense =
        Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
    /// LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED: the LU is offline.
    pub const LOGICAL_UNIT_OFFLINE: Sense = Sense::new(key::NOT_READY, 0x04, 0x03);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    /// A Data-Out PDU failed its data digest.
    pub const DATA_PHASE_CRC_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x47, 0x01);
    /// Immediate data failed its data digest (RFC 7143 §7.8).
    pub const PROTOCOL_SERVICE_CRC_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x47, 0x05);
    /// WRITE ERROR - NOT ENOUGH UNSOLICITED DATA: bad immediate or unsolicited data.
    pub const NOT_ENOUGH_UNSOLICITED_DATA: Sense = Sense::new(key::ABORTED_COMMAND, 0x0C, 0x0D);

    /// MISCOMPARE DURING VERIFY OPERATION (0E/1D/00); INFORMATION = offset of the first
    /// differing byte.
    pub const fn miscompare(offset: u64) -> Self {
        Sense {
            key: key::MISCOMPARE,
            asc: 0x1D,
            ascq: 0x00,
            information: Some(offset),
            field: None,
        }
    }

    pub const fn unit_attention(asc: u8, ascq: u8) -> Self {
        Sense::new(key::UNIT_ATTENTION, asc, ascq)
    }

    /// Decode the sense key, ASC and ASCQ of fixed (0x70/0x71) or descriptor (0x72/0x73)
    /// sense data; INFORMATION and the field pointer are not read back.
    pub fn decode(b: &[u8]) -> Option<Sense> {
        let (key, asc_at) = match b.first()? & 0x7f {
            0x70 | 0x71 => (b.get(2)? & 0x0f, 12),
            0x72 | 0x73 => (b.get(1)? & 0x0f, 2),
            _ => return None,
        };
        let at = |i: usize| b.get(i).copied().unwrap_or(0);
        Some(Sense::new(key, at(asc_at), at(asc_at + 1)))
    }

    /// The three sense-key-specific bytes (SKSV set), if there is a field pointer.
    fn sks(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        let mut b0 = 0x80u8; // SKSV
        if f.in_cdb {
            b0 |= 0x40; // C/D
        }
        if let Some(bit) = f.bit {
            b0 |= 0x08 | (bit & 0x07); // BPV + bit pointer
        }
        let [hi, lo] = f.byte.to_be_bytes();
        Some([b0, hi, lo])
    }

    /// Encode as descriptor format when `descriptor`, else fixed format.
    pub fn encode(&self, descriptor: bool) -> Bytes {
        if descriptor {
            self.encode_descriptor()
        } else {
            self.encode_fixed()
        }
    }

    fn encode_fixed(&self) -> Bytes {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.information {
            // The fixed format only has four INFORMATION bytes; VALID only when it fits.
            if let Ok(v) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        b[2] = self.key & 0x0F;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(sks) = self.sks() {
            b[15..18].copy_from_slice(&sks);
        }
        Bytes::copy_from_slice(&b)
    }

    fn encode_descriptor(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(8 + 12 + 8);
        b.put_u8(0x72);
        b.put_u8(self.key & 0x0F);
        b.put_u8(self.asc);
        b.put_u8(self.ascq);
        b.put_bytes(0, 3);
        b.put_u8(0); // additional length, patched below
        if let Some(info) = self.information {
            b.put_u8(0x00); // information descriptor
            b.put_u8(0x0A);
            b.put_u8(0x80); // VALID
            b.put_u8(0);
            b.put_u64(info);
        }
        if let Some(sks) = self.sks() {
            b.put_u8(0x02); // sense key specific descriptor
            b.put_u8(0x06);
            b.put_bytes(0, 2);
            b.put_slice(&sks);
            b.put_u8(0);
        }
        let add = (b.len() - 8) as u8;
        b[7] = add;
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_cdb_has_field_pointer() {
        let s = Sense::invalid_cdb(2, Some(5)).encode(false);
        assert_eq!(
            &s[..],
            &[0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xCD, 0, 2]
        );
    }

    #[test]
    fn fixed_miscompare_has_information() {
        let s = Sense::miscompare(0x1234).encode(false);
        assert_eq!(s[0], 0xF0);
        assert_eq!(s[2], key::MISCOMPARE);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((s[12], s[13]), (0x1D, 0));
    }

    #[test]
    fn decode_reads_both_formats() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = key::ILLEGAL_REQUEST;
        fixed[12] = 0x21;
        assert_eq!(Sense::decode(&fixed), Some(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(
            Sense::decode(&[0x72, 0x0e, 0x1d, 0x00, 0, 0, 0, 0]),
            Some(Sense::new(key::MISCOMPARE, 0x1d, 0))
        );
        let encoded = Sense::INVALID_FIELD_IN_CDB.encode(true);
        assert_eq!(Sense::decode(&encoded), Some(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(Sense::decode(&[]), None);
        assert_eq!(Sense::decode(&[0x70]), None);
        assert_eq!(Sense::decode(&[0x7f, 0, 0]), None);
    }

    #[test]
    fn descriptor_format() {
        let s = Sense::miscompare(7).encode(true);
        assert_eq!(&s[..8], &[0x72, 0x0E, 0x1D, 0, 0, 0, 0, 12]);
        assert_eq!(&s[8..12], &[0, 0x0A, 0x80, 0]);
        assert_eq!(&s[12..20], &7u64.to_be_bytes());
        let s = Sense::invalid_cdb(1, None).encode(true);
        assert_eq!(
            &s[..],
            &[0x72, 5, 0x24, 0, 0, 0, 0, 8, 2, 6, 0, 0, 0xC0, 0, 1, 0]
        );
        let s = Sense::NO_SENSE.encode(true);
        assert_eq!(&s[..], &[0x72, 0, 0, 0, 0, 0, 0, 0]);
    }
}
