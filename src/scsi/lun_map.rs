//! The LUNs one initiator may see, and the commands answered for the map rather than one
//! LU: REPORT LUNS, and INQUIRY / REQUEST SENSE / anything else sent to an absent LUN.

use super::cdb;
use super::lun::LogicalUnit;
use super::opcode;
use super::sense::Sense;
use super::spc::{report_luns_data, standard_inquiry, truncate};
use super::{status, ScsiCommand, ScsiOutcome};
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct LunMap {
    /// Shared: every session of a target without LUN masking holds the same table (a
    /// per-session copy was ~250 KiB per session with 4,096 LUNs).
    luns: Arc<BTreeMap<u64, Arc<LogicalUnit>>>,
}

impl LunMap {
    pub fn new(luns: BTreeMap<u64, Arc<LogicalUnit>>) -> Self {
        LunMap {
            luns: Arc::new(luns),
        }
    }

    /// Whether both are the same table (not merely equal ones).
    pub fn same_table(&self, other: &LunMap) -> bool {
        Arc::ptr_eq(&self.luns, &other.luns)
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// The LUN numbers in the map, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.luns.keys().copied().collect()
    }

    /// The logical units in the map.
    pub fn units(&self) -> Vec<Arc<LogicalUnit>> {
        self.luns.values().cloned().collect()
    }

    /// The LU that runs `cmd` asynchronously (a READ on a store with asynchronous
    /// reads: [`LogicalUnit::start_read`]); None: [`LunMap::execute`] it.
    pub fn async_reader(&self, cmd: &ScsiCommand) -> Option<&Arc<LogicalUnit>> {
        self.luns
            .get(&cmd.lun)
            .filter(|lu| lu.reads_async(&cmd.cdb))
    }

    pub fn execute(&self, cmd: &ScsiCommand) -> ScsiOutcome {
        let cdb: &[u8] = &cmd.cdb;
        let opcode = cdb::byte(cdb, 0);
        if opcode == opcode::REPORT_LUNS {
            // Answered for the whole map whichever LUN it is addressed to.
            let good = |data_in| ScsiOutcome {
                status: status::GOOD,
                sense: None,
                data_in,
            };
            return match report_luns_data(cdb, self.luns.keys().copied()) {
                Ok(data) => good(data),
                Err(e) => {
                    let sense = match e {
                        super::lun::CmdError::Check(s) => s,
                        super::lun::CmdError::ReservationConflict => Sense::INVALID_OPCODE,
                    };
                    match self.luns.get(&cmd.lun) {
                        Some(lu) => lu.check(sense),
                        None => check_fixed(sense),
                    }
                }
            };
        }
        if let Some(lu) = self.luns.get(&cmd.lun) {
            return lu.execute(cmd);
        }
        match opcode {
            opcode::INQUIRY => {
                let evpd = cdb::byte(cdb, 1) & 0x01 != 0;
                let alloc = usize::from(cdb::be16(cdb, 3));
                let data = if evpd {
                    // Qualifier 011b: no page data for a LUN that is not there.
                    BytesMut::from(&[0x7F, cdb::byte(cdb, 2), 0, 0][..])
                } else {
                    standard_inquiry(None)
                };
                ScsiOutcome {
                    status: status::GOOD,
                    sense: None,
                    data_in: truncate(data, alloc),
                }
            }
            opcode::REQUEST_SENSE => {
                let desc = cdb::byte(cdb, 1) & 0x01 != 0;
                let alloc = usize::from(cdb::byte(cdb, 4));
                let data = Sense::LUN_NOT_SUPPORTED.encode(desc);
                ScsiOutcome {
                    status: status::GOOD,
                    sense: None,
                    data_in: data.slice(..data.len().min(alloc)),
                }
            }
            _ => check_fixed(Sense::LUN_NOT_SUPPORTED),
        }
    }

    pub fn data_out_length(&self, lun: u64, cdb: &[u8]) -> u32 {
        match self.luns.get(&lun) {
            Some(lu) => lu.data_out_length(cdb),
            None => 0,
        }
    }
}

fn check_fixed(sense: Sense) -> ScsiOutcome {
    ScsiOutcome {
        status: status::CHECK_CONDITION,
        sense: Some(sense.encode(false)),
        data_in: Bytes::new(),
    }
}
