//! CDB field access and decoding. Every accessor is total: bytes past the end of the CDB
//! read as zero, so a short or hostile CDB can never panic the device server (the dispatcher
//! also rejects CDBs shorter than the opcode's length before a handler runs).

use super::opcode;

#[inline]
pub fn byte(cdb: &[u8], i: usize) -> u8 {
    cdb.get(i).copied().unwrap_or(0)
}

#[inline]
pub fn be16(cdb: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([byte(cdb, i), byte(cdb, i + 1)])
}

#[inline]
pub fn be24(cdb: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([0, byte(cdb, i), byte(cdb, i + 1), byte(cdb, i + 2)])
}

#[inline]
pub fn be32(cdb: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([
        byte(cdb, i),
        byte(cdb, i + 1),
        byte(cdb, i + 2),
        byte(cdb, i + 3),
    ])
}

#[inline]
pub fn be64(cdb: &[u8], i: usize) -> u64 {
    (u64::from(be32(cdb, i)) << 32) | u64::from(be32(cdb, i + 4))
}

/// Length of a CDB from its opcode's group code (SPC-4 §4.2.5.1); None for vendor groups.
pub fn cdb_len_for_opcode(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// The LBA / block-count shape shared by the media access commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub lba: u64,
    /// Number of logical blocks as given in the CDB (READ/WRITE(6) 0 already mapped to 256).
    pub blocks: u32,
    /// RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT (byte 1 bits 7..5).
    pub protect: u8,
    pub fua: bool,
}

/// Decode LBA and count by CDB size: 6 (21-bit LBA, 8-bit count with 0 = 256), 10, 12, 16.
/// COMPARE AND WRITE has its own layout (count in byte 13).
pub fn block_range(cdb: &[u8]) -> BlockRange {
    let opcode = byte(cdb, 0);
    let b1 = byte(cdb, 1);
    let (lba, blocks) = if opcode == opcode::COMPARE_AND_WRITE {
        (be64(cdb, 2), u32::from(byte(cdb, 13)))
    } else {
        match cdb_len_for_opcode(opcode) {
            Some(6) => {
                let lba = u64::from(be24(cdb, 1) & 0x1F_FFFF);
                let n = u32::from(byte(cdb, 4));
                (lba, if n == 0 { 256 } else { n })
            }
            Some(10) => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
            Some(12) => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
            _ => (be64(cdb, 2), be32(cdb, 10)),
        }
    };
    let six = cdb_len_for_opcode(opcode) == Some(6);
    BlockRange {
        lba,
        blocks,
        protect: if six { 0 } else { b1 >> 5 },
        fua: !six && b1 & 0x08 != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_are_total() {
        assert_eq!(be64(&[], 10), 0);
        assert_eq!(be32(&[1, 2], 0), 0x0102_0000);
        assert_eq!(be16(&[0xAB], 0), 0xAB00);
    }

    #[test]
    fn decodes_ranges() {
        let r = block_range(&[0x08, 0x1F, 0xFF, 0xFE, 0, 0]);
        assert_eq!((r.lba, r.blocks), (0x1F_FFFE, 256));
        let r = block_range(&[opcode::WRITE_10, 0x08, 0, 0, 1, 0, 0, 0, 2, 0]);
        assert_eq!((r.lba, r.blocks, r.fua, r.protect), (256, 2, true, 0));
        let r = block_range(&[0xA8, 0x20, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0]);
        assert_eq!((r.lba, r.blocks, r.protect), (1, 3, 1));
        let mut c = [0u8; 16];
        c[0] = opcode::COMPARE_AND_WRITE;
        c[9] = 5;
        c[13] = 4;
        let r = block_range(&c);
        assert_eq!((r.lba, r.blocks), (5, 4));
    }
}
