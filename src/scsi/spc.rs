//! SPC-4 commands common to all device types: TEST UNIT READY, INQUIRY, REQUEST SENSE,
//! REPORT LUNS, REPORT SUPPORTED OPERATION CODES, RESERVE/RELEASE, START STOP UNIT,
//! PREVENT ALLOW MEDIUM REMOVAL.

use super::cdb;
use super::lun::{has_service_actions, CmdResult, LogicalUnit, Request, COMMANDS};
use super::opcode;
use super::sense::Sense;
use super::vpd;
use bytes::{BufMut, Bytes, BytesMut};

/// Cut response data to the allocation length (never an error, SPC-4 §4.2.5.6).
pub(crate) fn truncate(mut data: BytesMut, alloc: usize) -> Bytes {
    data.truncate(alloc);
    data.freeze()
}

pub(crate) fn test_unit_ready(_lu: &LogicalUnit, _req: &Request) -> CmdResult {
    Ok(Bytes::new())
}

/// REQUEST SENSE: reports (and clears) the oldest unit attention, else NO SENSE.
pub(crate) fn request_sense(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let desc = cdb::byte(req.cdb, 1) & 0x01 != 0;
    let alloc = usize::from(cdb::byte(req.cdb, 4));
    let sense = match lu.take_unit_attention(&req.cmd.nexus) {
        Some((asc, ascq)) => Sense::unit_attention(asc, ascq),
        None => Sense::NO_SENSE,
    };
    let data = sense.encode(desc);
    Ok(data.slice(..data.len().min(alloc)))
}

/// Pad or cut an ASCII identification field to `n` bytes with spaces.
fn put_ascii(b: &mut BytesMut, s: &str, n: usize) {
    let bytes = s.as_bytes();
    let take = bytes.len().min(n);
    for &c in &bytes[..take] {
        // Identification fields must be printable ASCII.
        b.put_u8(if (0x20..0x7F).contains(&c) { c } else { b' ' });
    }
    b.put_bytes(b' ', n - take);
}

/// Standard INQUIRY data (96 bytes) for a present LU.
pub(crate) fn standard_inquiry(lu: Option<&LogicalUnit>) -> BytesMut {
    let mut b = BytesMut::with_capacity(96);
    // Peripheral qualifier 000b/type 0 (direct access) if present, else 011b/1Fh.
    b.put_u8(if lu.is_some() { 0x00 } else { 0x7F });
    b.put_u8(0x00); // RMB = 0
    b.put_u8(0x06); // SPC-4
    b.put_u8(0x12); // HiSup, response data format 2
    b.put_u8(96 - 5);
    b.put_u8(0x10); // SCCS = 0, ACC = 0, TPGS = 01b (implicit ALUA only), 3PC, PROTECT
    b.put_u8(0x00);
    b.put_u8(0x02); // CmdQue
    let (vendor, product, revision) = match lu {
        Some(lu) => {
            let s = lu.settings();
            (s.vendor.as_str(), s.product.as_str(), s.revision.as_str())
        }
        None => ("HOLDFAST", "", ""),
    };
    put_ascii(&mut b, vendor, 8);
    put_ascii(&mut b, product, 16);
    put_ascii(&mut b, revision, 4);
    b.put_bytes(0, 58 - 36);
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
    for v in [0x00A0u16, 0x0460, 0x04C0, 0x0960] {
        b.put_u16(v);
    }
    b.put_bytes(0, 96 - b.len());
    b
}

pub(crate) fn inquiry(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let c = req.cdb;
    let evpd = cdb::byte(c, 1) & 0x01 != 0;
    if cdb::byte(c, 1) & 0xFE != 0 {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    let page = cdb::byte(c, 2);
    let alloc = usize::from(cdb::be16(c, 3));
    if !evpd {
        if page != 0 {
            return Err(Sense::invalid_cdb(2, Some(7)).into());
        }
        return Ok(truncate(standard_inquiry(Some(lu)), alloc));
    }
    let data = vpd::page(lu, &req.cmd.nexus, page)?;
    Ok(truncate(data, alloc))
}

/// REPORT LUNS parameter data for `luns` (SAM-5 flat / peripheral addressing).
pub(crate) fn report_luns_data(cdb: &[u8], luns: impl Iterator<Item = u64>) -> CmdResult {
    let select = cdb::byte(cdb, 2);
    if select > 2 {
        return Err(Sense::invalid_cdb(2, Some(7)).into());
    }
    let alloc = cdb::be32(cdb, 6) as usize;
    let mut list = BytesMut::with_capacity(8 + 8 * 4);
    list.put_bytes(0, 8);
    for lun in luns {
        let entry: u16 = match lun {
            0..=255 => lun as u16,
            256..=16383 => 0x4000 | lun as u16,
            _ => {
                tracing::warn!(lun, "LUN beyond flat addressing, not reported");
                continue;
            }
        };
        list.put_u16(entry);
        list.put_bytes(0, 6);
    }
    let n = (list.len() - 8) as u32;
    list[0..4].copy_from_slice(&n.to_be_bytes());
    Ok(truncate(list, alloc))
}

/// REPORT LUNS sent straight to one LU (the LUN map normally answers it).
pub(crate) fn report_luns_single(_lu: &LogicalUnit, req: &Request) -> CmdResult {
    report_luns_data(req.cdb, std::iter::once(req.cmd.lun))
}

/// RESERVE and RELEASE (6 and 10): third-party and extent reservations are not
/// supported, so their bits in byte 1 are invalid fields.
fn check_whole_lu_reservation(req: &Request, opcode_6: u8) -> Result<(), Sense> {
    let b1 = cdb::byte(req.cdb, 1);
    let bad = if cdb::byte(req.cdb, 0) == opcode_6 {
        b1 & 0x1F
    } else {
        b1 & 0x12
    };
    if bad != 0 {
        return Err(Sense::invalid_cdb(1, Some(4)));
    }
    Ok(())
}

pub(crate) fn reserve(lu: &LogicalUnit, req: &Request) -> CmdResult {
    check_whole_lu_reservation(req, opcode::RESERVE_6)?;
    lu.reserve(&req.cmd.nexus)?;
    Ok(Bytes::new())
}

pub(crate) fn release(lu: &LogicalUnit, req: &Request) -> CmdResult {
    check_whole_lu_reservation(req, opcode::RELEASE_6)?;
    lu.release(&req.cmd.nexus);
    Ok(Bytes::new())
}

/// START STOP UNIT: power conditions are accepted and ignored; the medium is not
/// removable, so LOEJ (load/eject) is refused.
pub(crate) fn start_stop_unit(_lu: &LogicalUnit, req: &Request) -> CmdResult {
    let b4 = cdb::byte(req.cdb, 4);
    let power_condition = b4 >> 4;
    if power_condition == 0 && b4 & 0x02 != 0 {
        return Err(Sense::invalid_cdb(4, Some(1)).into());
    }
    Ok(Bytes::new())
}

/// PREVENT ALLOW MEDIUM REMOVAL: nothing to prevent on a non-removable medium.
pub(crate) fn prevent_allow(_lu: &LogicalUnit, req: &Request) -> CmdResult {
    if cdb::byte(req.cdb, 4) & 0xFC != 0 {
        return Err(Sense::invalid_cdb(4, Some(7)).into());
    }
    Ok(Bytes::new())
}

/// REPORT SUPPORTED OPERATION CODES, generated from the command table.
pub(crate) fn report_supported_opcodes(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let c = req.cdb;
    let rctd = cdb::byte(c, 2) & 0x80 != 0;
    let options = cdb::byte(c, 2) & 0x07;
    let req_op = cdb::byte(c, 3);
    let req_sa = cdb::be16(c, 4);
    let alloc = cdb::be32(c, 6) as usize;
    let thin = lu.settings().thin_provisioning;
    let offered = || COMMANDS.iter().filter(move |s| thin || !s.thin_only);
    let put_timeouts = |b: &mut BytesMut| {
        b.put_u16(0x000A);
        b.put_u8(0);
        b.put_u8(0);
        b.put_u32(0); // nominal: not specified
        b.put_u32(30); // recommended, seconds
    };
    match options {
        0 => {
            let mut b = BytesMut::with_capacity(4 + COMMANDS.len() * 20);
            b.put_u32(0);
            for s in offered() {
                b.put_u8(s.opcode);
                b.put_u8(0);
                b.put_u16(s.service_action.unwrap_or(0));
                b.put_u8(0);
                b.put_u8(u8::from(rctd) << 1 | u8::from(s.service_action.is_some()));
                b.put_u16(s.usage.len() as u16);
                if rctd {
                    put_timeouts(&mut b);
                }
            }
            let n = (b.len() - 4) as u32;
            b[0..4].copy_from_slice(&n.to_be_bytes());
            Ok(truncate(b, alloc))
        }
        1..=3 => {
            let with_sa = has_service_actions(req_op);
            match (options, with_sa) {
                (1, true) => return Err(Sense::invalid_cdb(2, Some(2)).into()),
                (2, false) => return Err(Sense::invalid_cdb(2, Some(2)).into()),
                _ => {}
            }
            let spec = offered()
                .find(|s| s.opcode == req_op && (!with_sa || s.service_action == Some(req_sa)));
            let mut b = BytesMut::with_capacity(4 + 16 + 12);
            match spec {
                Some(s) => {
                    b.put_u8(0);
                    b.put_u8(u8::from(rctd) << 7 | 0x03); // supported, per standard
                    b.put_u16(s.usage.len() as u16);
                    b.put_slice(s.usage);
                    if rctd {
                        put_timeouts(&mut b);
                    }
                }
                None => {
                    b.put_u8(0);
                    b.put_u8(0x01); // not supported
                    b.put_u16(0);
                }
            }
            Ok(truncate(b, alloc))
        }
        _ => Err(Sense::invalid_cdb(2, Some(2)).into()),
    }
}

pub(crate) fn persistent_reserve_in(lu: &LogicalUnit, req: &Request) -> CmdResult {
    lu.pr_in(req)
}

pub(crate) fn persistent_reserve_out(lu: &LogicalUnit, req: &Request) -> CmdResult {
    lu.pr_out(req)
}
