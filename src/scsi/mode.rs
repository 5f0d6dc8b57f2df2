//! MODE SENSE / MODE SELECT (SPC-4 §6.11-6.14) with the caching (08h), control (0Ah) and
//! informational exceptions control (1Ch) pages. Only WCE and D_SENSE are changeable;
//! saved pages are not implemented.

use super::cdb;
use super::lun::{CmdResult, LogicalUnit, Request};
use super::opcode;
use super::sense::{ua, Sense};
use super::spc::truncate;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::atomic::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
/// The control mode page's TAS bit: 0, aborted tasks of other nexuses end without a
/// status and those nexuses get a unit attention instead (see `tmf.rs`).
pub(super) const TAS: bool = false;
const IEC: u8 = 0x1C;
const PAGES: [u8; 3] = [CACHING, CONTROL, IEC];

/// Page bytes (including the two-byte page header) for `pc`.
fn page_bytes(lu: &LogicalUnit, code: u8, pc: PageControl) -> Option<Vec<u8>> {
    let (wce, d_sense) = match pc {
        PageControl::Current => (
            lu.wce.load(Ordering::Relaxed),
            lu.d_sense.load(Ordering::Relaxed),
        ),
        PageControl::Changeable => (true, true),
        PageControl::Default => (lu.settings().write_cache, false),
    };
    let changeable = pc == PageControl::Changeable;
    let p = match code {
        CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING;
            p[1] = 18;
            p[2] = if wce { 0x04 } else { 0 };
            p
        }
        CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL;
            p[1] = 10;
            p[2] = if d_sense { 0x04 } else { 0 };
            if !changeable && TAS {
                p[5] = 0x40;
            }
            if !changeable {
                p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering allowed
                p[8] = 0xFF; // busy timeout period: unlimited
                p[9] = 0xFF;
            }
            p
        }
        IEC => {
            let mut p = vec![0u8; 12];
            p[0] = IEC;
            p[1] = 10;
            p
        }
        _ => return None,
    };
    Some(p)
}

pub(crate) fn mode_sense(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let c = req.cdb;
    let ten = cdb::byte(c, 0) == opcode::MODE_SENSE_10;
    let dbd = cdb::byte(c, 1) & 0x08 != 0;
    let llbaa = ten && cdb::byte(c, 1) & 0x10 != 0;
    let pc = match cdb::byte(c, 2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(Sense::SAVING_NOT_SUPPORTED.into()),
    };
    let code = cdb::byte(c, 2) & 0x3F;
    let subpage = cdb::byte(c, 3);
    let alloc = if ten {
        usize::from(cdb::be16(c, 7))
    } else {
        usize::from(cdb::byte(c, 4))
    };
    // Only subpage 0 exists; 0xFF (all subpages) is accepted with "all pages".
    if subpage != 0 && !(code == 0x3F && subpage == 0xFF) {
        return Err(Sense::invalid_cdb(3, Some(7)).into());
    }
    let mut pages = Vec::with_capacity(48);
    if code == 0x3F {
        for p in PAGES {
            pages.extend(page_bytes(lu, p, pc).unwrap_or_default());
        }
    } else {
        match page_bytes(lu, code, pc) {
            Some(p) => pages.extend(p),
            None => return Err(Sense::invalid_cdb(2, Some(5)).into()),
        }
    }
    let num_blocks = lu.num_blocks();
    let bs = lu.block_size();
    let mut bd = BytesMut::new();
    if !dbd {
        if llbaa {
            bd.put_u64(num_blocks);
            bd.put_u32(0);
            bd.put_u32(bs as u32);
        } else {
            bd.put_u8(0); // density code
            bd.put_uint(num_blocks.min(0xFF_FFFF), 3);
            bd.put_u8(0);
            bd.put_uint(bs, 3);
        }
    }
    // Device-specific parameter: WP for read-only LUs, DPOFUA.
    let dsp = if lu.settings().read_only { 0x80 } else { 0 } | 0x10;
    let mut b = BytesMut::with_capacity(8 + bd.len() + pages.len());
    let total = if ten { 8 } else { 4 } + bd.len() + pages.len();
    if ten {
        b.put_u16((total - 2) as u16);
        b.put_u8(0);
        b.put_u8(dsp);
        b.put_u8(u8::from(llbaa && !dbd));
        b.put_u8(0);
        b.put_u16(bd.len() as u16);
    } else {
        b.put_u8((total - 1).min(255) as u8);
        b.put_u8(0);
        b.put_u8(dsp);
        b.put_u8(bd.len() as u8);
    }
    b.put_slice(&bd);
    b.put_slice(&pages);
    Ok(truncate(b, alloc))
}

pub(crate) fn mode_select(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let c = req.cdb;
    let ten = cdb::byte(c, 0) == opcode::MODE_SELECT_10;
    if cdb::byte(c, 1) & 0x10 == 0 {
        // Only the SPC page format is understood.
        return Err(Sense::invalid_cdb(1, Some(4)).into());
    }
    if cdb::byte(c, 1) & 0x01 != 0 {
        return Err(Sense::invalid_cdb(1, Some(0)).into()); // SP: no saved pages
    }
    let plen = if ten {
        usize::from(cdb::be16(c, 7))
    } else {
        usize::from(cdb::byte(c, 4))
    };
    if plen == 0 {
        return Ok(Bytes::new());
    }
    let data = &req.cmd.data_out[..req.cmd.data_out.len().min(plen)];
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return Err(Sense::PARAM_LIST_LENGTH.into());
    }
    let bd_len = if ten {
        usize::from(cdb::be16(data, 6))
    } else {
        usize::from(cdb::byte(data, 3))
    };
    let mut pos = hdr;
    if bd_len != 0 {
        let bd_size = if ten && cdb::byte(data, 4) & 0x01 != 0 {
            16
        } else {
            8
        };
        if bd_len != bd_size || data.len() < hdr + bd_len {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        // Block length (last 3 or 4 bytes) must match ours; the block count is ignored.
        let bl = if bd_size == 16 {
            u64::from(cdb::be32(data, hdr + 12))
        } else {
            u64::from(cdb::be24(data, hdr + 5))
        };
        if bl != lu.block_size() {
            return Err(Sense::invalid_param((hdr + bd_size - 3) as u16, None).into());
        }
        pos += bd_len;
    }
    let mut wce = lu.wce.load(Ordering::Relaxed);
    let mut d_sense = lu.d_sense.load(Ordering::Relaxed);
    while pos < data.len() {
        let code = cdb::byte(data, pos) & 0x3F;
        if cdb::byte(data, pos) & 0x40 != 0 {
            return Err(Sense::invalid_param(pos as u16, Some(6)).into()); // no subpages
        }
        let (Some(cur), Some(chg)) = (
            page_bytes(lu, code, PageControl::Current),
            page_bytes(lu, code, PageControl::Changeable),
        ) else {
            return Err(Sense::invalid_param(pos as u16, Some(5)).into());
        };
        if pos + 1 >= data.len() {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        if usize::from(cdb::byte(data, pos + 1)) != cur.len() - 2 {
            return Err(Sense::invalid_param((pos + 1) as u16, None).into());
        }
        let Some(new) = data.get(pos..pos + cur.len()) else {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        };
        for i in 2..cur.len() {
            let diff = (new[i] ^ cur[i]) & !chg[i];
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(Sense::invalid_param((pos + i) as u16, Some(bit)).into());
            }
        }
        match code {
            CACHING => wce = new[2] & 0x04 != 0,
            CONTROL => d_sense = new[2] & 0x04 != 0,
            _ => {}
        }
        pos += cur.len();
    }
    let changed = lu.wce.swap(wce, Ordering::Relaxed)
        != wce | (lu.d_sense.swap(d_sense, Ordering::Relaxed) != d_sense);
    if changed {
        if !wce {
            // Writes acknowledged under the old write-back setting become durable now.
            lu.backend()
                .flush()
                .map_err(|e| lu.io_error(&e, "flush", true))?;
        }
        let me = &req.cmd.nexus;
        let (asc, ascq) = ua::MODE_PARAMETERS_CHANGED;
        lu.queue_unit_attention(&|n| n != &**me, asc, ascq);
    }
    Ok(Bytes::new())
}
