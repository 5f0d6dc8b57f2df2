//! SCSI on top of a [`Session`]: the result type, sense decoding, CDB builders and typed
//! helpers for the commands the agent, CLI and tests use. Anything else (persistent
//! reservations included) goes through [`Session::command`] with a CDB from [`cdb`].

use super::session::Session;
use super::InitiatorError;
pub use crate::scsi::sense::Sense;
use crate::scsi::status;
use bytes::{Bytes, BytesMut};

/// The outcome of one SCSI command as the target reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResult {
    pub status: u8,
    /// Sense data without the iSCSI 2-byte SenseLength prefix.
    pub sense: Option<Bytes>,
    /// Data-In received.
    pub data: Bytes,
    /// Residual count: positive = underflow (less than expected), negative = overflow.
    pub residual: i64,
}

impl ScsiResult {
    pub fn sense(&self) -> Option<Sense> {
        self.sense.as_deref().and_then(Sense::decode)
    }

    /// GOOD (or CONDITION MET) → Ok(self); anything else → the matching error.
    pub fn check(self) -> Result<ScsiResult, InitiatorError> {
        match self.status {
            status::GOOD | status::CONDITION_MET => Ok(self),
            status::CHECK_CONDITION => {
                let s = self.sense().unwrap_or(Sense::NO_SENSE);
                Err(InitiatorError::CheckCondition {
                    key: s.key,
                    asc: s.asc,
                    ascq: s.ascq,
                })
            }
            status::RESERVATION_CONFLICT => Err(InitiatorError::ReservationConflict),
            other => Err(InitiatorError::Status(other)),
        }
    }
}

/// The 8-byte SAM LUN field for a LUN number: peripheral addressing below 256, flat
/// addressing up to 16383 (what targets report in REPORT LUNS).
pub fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// Decode one 8-byte REPORT LUNS entry (peripheral or flat addressing).
pub fn decode_lun(field: [u8; 8]) -> Option<u64> {
    match field[0] >> 6 {
        0b00 if field[0] & 0x3f == 0 => Some(u64::from(field[1])),
        0b01 => Some((u64::from(field[0] & 0x3f) << 8) | u64::from(field[1])),
        _ => None,
    }
}

/// CDB builders (SPC-4, SBC-3).
pub mod cdb {
    use crate::scsi::opcode::{
        COMPARE_AND_WRITE, INQUIRY, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT, READ_16,
        REPORT_LUNS, SA_READ_CAPACITY_16, SERVICE_ACTION_IN_16, SYNC_CACHE_16, TEST_UNIT_READY,
        WRITE_16,
    };

    /// FUA bit of READ/WRITE(16) and COMPARE AND WRITE (byte 1).
    const FUA: u8 = 0x08;

    pub fn test_unit_ready() -> [u8; 6] {
        [TEST_UNIT_READY, 0, 0, 0, 0, 0]
    }

    pub fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
        let a = alloc.to_be_bytes();
        [INQUIRY, u8::from(evpd), page, a[0], a[1], 0]
    }

    fn rw16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    /// READ(16); `fua` forces the read from the medium.
    pub fn read16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
        rw16(READ_16, if fua { FUA } else { 0 }, lba, blocks)
    }

    /// WRITE(16); `fua` = the data are on stable storage before GOOD.
    pub fn write16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
        rw16(WRITE_16, if fua { FUA } else { 0 }, lba, blocks)
    }

    /// SYNCHRONIZE CACHE(16) of `blocks` from `lba` (0 blocks = to the end).
    pub fn synchronize_cache16(lba: u64, blocks: u32) -> [u8; 16] {
        rw16(SYNC_CACHE_16, 0, lba, blocks)
    }

    /// COMPARE AND WRITE of `blocks` (≤ 255) blocks.
    pub fn compare_and_write(lba: u64, blocks: u8, fua: bool) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = COMPARE_AND_WRITE;
        c[1] = if fua { FUA } else { 0 };
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[13] = blocks;
        c
    }

    pub fn read_capacity16(alloc: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = SERVICE_ACTION_IN_16;
        // The service action fits the 5-bit field (0x10).
        c[1] = SA_READ_CAPACITY_16 as u8;
        c[10..14].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    pub fn report_luns(select: u8, alloc: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = REPORT_LUNS;
        c[2] = select;
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    /// PERSISTENT RESERVE IN with `service_action` (0 READ KEYS, 1 READ RESERVATION, …).
    pub fn persistent_reserve_in(service_action: u8, alloc: u16) -> [u8; 10] {
        let a = alloc.to_be_bytes();
        [
            PERSISTENT_RESERVE_IN,
            service_action & 0x1f,
            0,
            0,
            0,
            0,
            0,
            a[0],
            a[1],
            0,
        ]
    }

    /// PERSISTENT RESERVE OUT with `service_action`, `scope_type` and parameter length.
    pub fn persistent_reserve_out(service_action: u8, scope_type: u8, param_len: u32) -> [u8; 10] {
        let l = param_len.to_be_bytes();
        [
            PERSISTENT_RESERVE_OUT,
            service_action & 0x1f,
            scope_type,
            0,
            0,
            l[0],
            l[1],
            l[2],
            l[3],
            0,
        ]
    }
}

fn invalid(msg: impl Into<String>) -> InitiatorError {
    InitiatorError::InvalidRequest(msg.into())
}

impl Session {
    /// A command that must end in GOOD status: its Data-In.
    async fn checked(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Option<Bytes>,
        data_in_len: u32,
    ) -> Result<Bytes, InitiatorError> {
        Ok(self
            .command(lun, cdb, data_out, data_in_len)
            .await?
            .check()?
            .data)
    }

    pub async fn test_unit_ready(&self, lun: u64) -> Result<(), InitiatorError> {
        self.checked(lun, &cdb::test_unit_ready(), None, 0)
            .await
            .map(|_| ())
    }

    /// INQUIRY (standard data, or the VPD page `page` when `evpd`).
    pub async fn inquiry(
        &self,
        lun: u64,
        evpd: bool,
        page: u8,
        alloc: u16,
    ) -> Result<Bytes, InitiatorError> {
        self.checked(lun, &cdb::inquiry(evpd, page, alloc), None, alloc.into())
            .await
    }

    /// READ(16) of `blocks` blocks of `block_size` bytes.
    pub async fn read16(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<Bytes, InitiatorError> {
        let len = blocks
            .checked_mul(block_size)
            .ok_or_else(|| invalid("read length overflows"))?;
        self.checked(lun, &cdb::read16(lba, blocks, false), None, len)
            .await
    }

    /// WRITE(16) of `data` (a whole number of blocks of `block_size`).
    pub async fn write16(
        &self,
        lun: u64,
        lba: u64,
        data: Bytes,
        block_size: u32,
        fua: bool,
    ) -> Result<(), InitiatorError> {
        if block_size == 0 || data.len() % block_size as usize != 0 {
            return Err(invalid("write data is not a whole number of blocks"));
        }
        let blocks = u32::try_from(data.len() / block_size as usize)
            .map_err(|_| invalid("write too large"))?;
        self.checked(lun, &cdb::write16(lba, blocks, fua), Some(data), 0)
            .await
            .map(|_| ())
    }

    /// SYNCHRONIZE CACHE(16) of the whole LUN.
    pub async fn synchronize_cache(&self, lun: u64) -> Result<(), InitiatorError> {
        self.checked(lun, &cdb::synchronize_cache16(0, 0), None, 0)
            .await
            .map(|_| ())
    }

    /// READ CAPACITY(16): (last LBA, logical block size).
    pub async fn read_capacity16(&self, lun: u64) -> Result<(u64, u32), InitiatorError> {
        let d = self
            .checked(lun, &cdb::read_capacity16(32), None, 32)
            .await?;
        if d.len() < 12 {
            return Err(InitiatorError::Protocol(format!(
                "READ CAPACITY(16) returned {} bytes",
                d.len()
            )));
        }
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&d[0..8]);
        let mut bs = [0u8; 4];
        bs.copy_from_slice(&d[8..12]);
        Ok((u64::from_be_bytes(lba), u32::from_be_bytes(bs)))
    }

    /// REPORT LUNS (sent to LUN 0): the LUN numbers this nexus sees.
    pub async fn report_luns(&self) -> Result<Vec<u64>, InitiatorError> {
        let mut alloc: u32 = 8 + 8 * 256;
        loop {
            let d = self
                .checked(0, &cdb::report_luns(0, alloc), None, alloc)
                .await?;
            if d.len() < 8 {
                return Err(InitiatorError::Protocol("short REPORT LUNS data".into()));
            }
            let list_len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            if list_len.saturating_add(8) > alloc && alloc < (1 << 20) {
                alloc = list_len.saturating_add(8).min(1 << 20);
                continue;
            }
            return Ok(d[8..]
                .chunks_exact(8)
                .take(list_len as usize / 8)
                .filter_map(|c| <[u8; 8]>::try_from(c).ok().and_then(decode_lun))
                .collect());
        }
    }

    /// COMPARE AND WRITE: if the blocks at `lba` equal `verify`, write `write` there.
    /// A mismatch is `CheckCondition { key: MISCOMPARE, asc: 0x1d, .. }`.
    pub async fn compare_and_write(
        &self,
        lun: u64,
        lba: u64,
        verify: &[u8],
        write: &[u8],
        block_size: u32,
    ) -> Result<(), InitiatorError> {
        if verify.len() != write.len()
            || block_size == 0
            || verify.is_empty()
            || verify.len() % block_size as usize != 0
        {
            return Err(invalid(
                "COMPARE AND WRITE needs equal, whole-block verify and write buffers",
            ));
        }
        let blocks = u8::try_from(verify.len() / block_size as usize)
            .map_err(|_| invalid("COMPARE AND WRITE of more than 255 blocks"))?;
        let mut data = BytesMut::with_capacity(verify.len() * 2);
        data.extend_from_slice(verify);
        data.extend_from_slice(write);
        self.checked(
            lun,
            &cdb::compare_and_write(lba, blocks, false),
            Some(data.freeze()),
            0,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_maps_status() {
        let r = ScsiResult {
            status: status::RESERVATION_CONFLICT,
            ..Default::default()
        };
        assert!(matches!(
            r.check(),
            Err(InitiatorError::ReservationConflict)
        ));
        let r = ScsiResult {
            status: status::BUSY,
            ..Default::default()
        };
        assert!(matches!(r.check(), Err(InitiatorError::Status(0x08))));
    }

    #[test]
    fn lun_encoding_round_trips() {
        for lun in [0u64, 1, 255, 256, 16383] {
            let f = encode_lun(lun).to_be_bytes();
            assert_eq!(decode_lun(f), Some(lun));
        }
    }

    #[test]
    fn cdbs() {
        let c = cdb::write16(0x0102, 8, true);
        assert_eq!(c[0], crate::scsi::opcode::WRITE_16);
        assert_eq!(c[1], 0x08);
        assert_eq!(&c[8..10], &[0x01, 0x02]);
        assert_eq!(&c[10..14], &[0, 0, 0, 8]);
    }
}
