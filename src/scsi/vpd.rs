//! Vital product data pages (SPC-4 §7.8, SBC-3 §6.5).

use super::lun::{limits, LogicalUnit};
use super::sense::Sense;
use super::ItNexus;
use bytes::{BufMut, BytesMut};

const SUPPORTED: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2];

/// Build VPD page `code`, or INVALID FIELD IN CDB pointing at the page code.
pub(crate) fn page(lu: &LogicalUnit, nexus: &ItNexus, code: u8) -> Result<BytesMut, Sense> {
    let mut b = BytesMut::with_capacity(64);
    b.put_u8(0x00); // peripheral qualifier / device type
    b.put_u8(code);
    b.put_u16(0); // page length, patched below
    match code {
        0x00 => b.put_slice(&SUPPORTED),
        0x80 => b.put_slice(lu.settings().serial.as_bytes()),
        0x83 => device_identification(lu, nexus, &mut b),
        0x86 => {
            b.put_bytes(0, 60);
            b[5] = 0x01; // SIMPSUP
            b[6] = 0x01; // V_SUP: volatile cache present
            b[7] = 0x01; // LUICLR
        }
        0xB0 => block_limits(lu, &mut b),
        0xB1 => {
            b.put_u16(0x0001); // medium rotation rate: non-rotating
            b.put_bytes(0, 58);
        }
        0xB2 => {
            let thin = lu.settings().thin_provisioning;
            b.put_u8(0); // threshold exponent
                         // LBPU, LBPWS, LBPWS10, LBPRZ (holes read as zeros).
            b.put_u8(if thin { 0xE4 } else { 0x00 });
            b.put_u8(if thin { 0x02 } else { 0x00 }); // provisioning type thin
            b.put_u8(0);
        }
        _ => return Err(Sense::invalid_cdb(2, Some(7))),
    }
    let len = (b.len() - 4) as u16;
    b[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(b)
}

/// Device Identification: NAA and T10 vendor id (LU), SCSI name string, relative port and
/// target port group (target port), SCSI name string (target device).
fn device_identification(lu: &LogicalUnit, nexus: &ItNexus, b: &mut BytesMut) {
    let s = lu.settings();
    // NAA, binary, associated with the LU.
    b.put_slice(&[0x01, 0x03, 0x00, 16]);
    b.put_slice(&s.naa);
    // T10 vendor identification, ASCII: vendor (8, space padded) + serial.
    let vlen = 8 + s.serial.len();
    b.put_slice(&[0x02, 0x01, 0x00, vlen.min(255) as u8]);
    let mut vendor = [b' '; 8];
    for (d, c) in vendor.iter_mut().zip(s.vendor.bytes()) {
        *d = c;
    }
    b.put_slice(&vendor);
    b.put_slice(&s.serial.as_bytes()[..vlen.min(255) - 8]);
    // Target port name and target device name as SCSI name strings (iSCSI, UTF-8, PIV).
    name_string(b, 0x90, &nexus.target_port_id());
    // Relative target port identifier.
    b.put_slice(&[0x51, 0x94, 0x00, 4, 0, 0]);
    b.put_u16(nexus.relative_port_id);
    // Target port group (ALUA): one per gateway.
    b.put_slice(&[0x51, 0x95, 0x00, 4, 0, 0]);
    b.put_u16(s.alua.local.id);
    name_string(b, 0xA0, &nexus.target_name);
}

/// SCSI name string designator: NUL-terminated, padded to a multiple of 4.
fn name_string(b: &mut BytesMut, piv_assoc: u8, name: &str) {
    let raw = name.as_bytes();
    let raw = &raw[..raw.len().min(251)];
    let len = (raw.len() + 1).div_ceil(4) * 4;
    b.put_slice(&[0x53, piv_assoc | 0x08, 0x00, len as u8]);
    b.put_slice(raw);
    b.put_bytes(0, len - raw.len());
}

fn block_limits(lu: &LogicalUnit, b: &mut BytesMut) {
    let thin = lu.settings().thin_provisioning;
    let bs = lu.block_size();
    b.put_u8(0x00); // WSNZ=0: WRITE SAME with 0 blocks runs to the end of the medium
    b.put_u8(limits::MAX_COMPARE_AND_WRITE_BLOCKS as u8);
    b.put_u16(1); // optimal transfer length granularity
    b.put_u32(lu.max_transfer_blocks() as u32);
    b.put_u32(((1u64 << 20) / bs).max(1) as u32); // optimal transfer length
    b.put_u32(0); // max prefetch length
    if thin {
        b.put_u32(limits::MAX_UNMAP_BLOCKS);
        b.put_u32(limits::MAX_UNMAP_DESCRIPTORS);
        b.put_u32((4096 / bs).max(1) as u32); // optimal unmap granularity
    } else {
        b.put_bytes(0, 12);
    }
    b.put_u32(0); // unmap granularity alignment, UGAVALID = 0
    b.put_u64(lu.max_write_same_blocks());
    b.put_bytes(0, 64 - b.len());
}
