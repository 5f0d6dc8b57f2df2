//! The SCSI device server: several commands per input through `LunMap::execute`, each
//! with an arbitrary CDB, Data-Out and a nexus out of four, against two LUNs on memory
//! backends (plus an absent LUN), interleaved with resets and nexus losses, so mode
//! pages, unit attentions and reservations evolve between commands.
//!
//! Input (seeds are captured commands; tools/fuzz-seeds.py writes them):
//!   [LUN 1 flags] then records, each
//!   [op: bits 0-1 nexus, 2-3 LUN (0, 1, absent), 4-5 task attribute, 6 EDTL follows,
//!        7 not a command: reset (nexus bit 0 = 0) or nexus loss]
//!   [CDB length: u8][CDB][Data-Out length: u16 LE; with bit 15 set, (len & 0x7fff) * 8
//!    copies of the next byte][Data-Out][EDTL: u32 LE if bit 6]
#![no_main]

use bytes::Bytes;
use holdfast::scsi::{status, LogicalUnit, LunMap, LunSettings, ScsiCommand, TaskAttr};
use holdfast::store::MemBackend;
use holdfast_fuzz::{nexuses, Cursor};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::Arc;

fn build(flags: u8) -> LunMap {
    let lun0 = LogicalUnit::new(
        LunSettings {
            serial: "fuzz0".into(),
            ..LunSettings::default()
        },
        Arc::new(MemBackend::new(1 << 20)),
    );
    let lun1 = LogicalUnit::new(
        LunSettings {
            block_size: 4096,
            physical_block_size: 4096,
            read_only: flags & 1 != 0,
            thin_provisioning: flags & 2 == 0,
            write_cache: flags & 4 == 0,
            serial: "fuzz1".into(),
            ..LunSettings::default()
        },
        Arc::new(MemBackend::new(256 << 10)),
    );
    let mut luns = BTreeMap::new();
    luns.insert(0u64, Arc::new(lun0));
    luns.insert(1u64, Arc::new(lun1));
    LunMap::new(luns)
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let map = build(c.u8());
    let nx = nexuses();
    for _ in 0..32 {
        if c.is_empty() {
            break;
        }
        let op = c.u8();
        let nexus = &nx[usize::from(op & 3)];
        let lun = u64::from((op >> 2) & 3);
        if op & 0x80 != 0 {
            if let Some(lu) = map.get(lun) {
                if op & 1 == 0 {
                    lu.reset();
                } else {
                    lu.nexus_lost(nexus);
                }
            }
            continue;
        }
        let cdb_len = usize::from(c.u8());
        let cdb = Bytes::copy_from_slice(c.take(cdb_len));
        let len = u16::from_le_bytes([c.u8(), c.u8()]);
        let data = if len & 0x8000 != 0 {
            Bytes::from(vec![c.u8(); usize::from(len & 0x7fff) * 8])
        } else {
            Bytes::copy_from_slice(c.take(usize::from(len)))
        };
        let edtl = (op & 0x40 != 0).then(|| c.u32());
        let lun = lun.min(2);
        let data_out_len =
            edtl.unwrap_or_else(|| map.data_out_length(lun, &cdb).max(data.len() as u32));
        // The transport never hands over more than the EDTL it announced.
        let mut data = data;
        data.truncate(data_out_len as usize);
        let cmd = ScsiCommand {
            nexus: nexus.clone(),
            lun,
            cdb,
            data_out: data,
            data_in_len: 64 * 1024,
            data_out_len,
            attr: [
                TaskAttr::Simple,
                TaskAttr::Ordered,
                TaskAttr::HeadOfQueue,
                TaskAttr::Aca,
            ][usize::from((op >> 4) & 3)],
        };
        let out = map.execute(&cmd);
        check(&cmd, &out);
    }
});

fn check(cmd: &ScsiCommand, out: &holdfast::scsi::ScsiOutcome) {
    match out.status {
        status::GOOD | status::CONDITION_MET => {
            assert!(out.sense.is_none(), "sense with status {:#x}", out.status)
        }
        status::CHECK_CONDITION => {
            let sense = out.sense.as_ref().expect("CHECK CONDITION without sense");
            assert!(sense.len() >= 8, "short sense {sense:?}");
            assert!(
                matches!(sense[0] & 0x7f, 0x70 | 0x71 | 0x72 | 0x73),
                "bad sense response code {sense:?}"
            );
        }
        status::RESERVATION_CONFLICT | status::BUSY | status::TASK_SET_FULL => {}
        s => panic!("unexpected status {s:#x} for {cmd:?}"),
    }
}
