//! SCSI device server, transport-independent: a command carries an I_T nexus identity,
//! a LUN, a CDB and its Data-Out buffer, never an iSCSI type.
//!
//! Execution is synchronous and may block on backend I/O; the transport runs it on a
//! blocking pool so the async runtime never waits on the disk.
//!
//! The SCSI vocabulary lives here once, for the device server and the initiator alike:
//! [`status`], [`sense`], [`opcode`], [`pr_codes`] and [`transport_id`].

pub mod alua;
pub mod backend;
pub mod cdb;
pub mod lun;
pub mod lun_map;
mod mode;
pub mod opcode;
pub mod pr;
pub mod pr_codes;
mod pr_index;
pub mod range_lock;
pub mod read_async;
mod sbc;
pub mod sense;
mod spc;
pub mod status;
pub mod task_set;
pub mod tmf;
pub mod transport_id;
mod vpd;

#[cfg(test)]
mod tests;

pub use lun::{LogicalUnit, LunSettings};
pub use lun_map::LunMap;
pub use pr::{PrLoadError, PrState, PrStore};
pub use task_set::{AbortedTask, NexusId, Removal, Task, TaskKey, TaskSet, TaskSetError};
pub use tmf::{TmfDecision, TmfFunction, TmfResponse, TmfUnitAttention};

use bytes::Bytes;
use std::sync::Arc;

/// An I_T nexus: (initiator port, target port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// iSCSI initiator name (e.g. `iqn.1994-05.com.redhat:abc`).
    pub initiator_name: String,
    /// Initiator session id; part of the initiator port identity.
    pub isid: [u8; 6],
    pub target_name: String,
    /// Target portal group tag; part of the target port identity.
    pub tpgt: u16,
    /// SCSI relative target port identifier (1-based, derived from the TPGT).
    pub relative_port_id: u16,
}

impl ItNexus {
    /// `InitiatorName,i,0x<ISID>` as in RFC 7143 §4.4.2 (a format 01b TransportID's text).
    pub fn initiator_port_id(&self) -> String {
        transport_id::TransportId::iscsi_port(self.initiator_name.as_str(), self.isid).to_string()
    }
    /// `TargetName,t,0x<TPGT>`.
    pub fn target_port_id(&self) -> String {
        format!("{},t,0x{:04x}", self.target_name, self.tpgt)
    }
}

/// SAM task attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command as the device server sees it.
#[derive(Debug, Clone)]
pub struct ScsiCommand {
    pub nexus: Arc<ItNexus>,
    /// The LUN as decoded by the transport (flat, 0-based).
    pub lun: u64,
    pub cdb: Bytes,
    /// Data-Out as received (may be shorter than the CDB asks for, when the transport's
    /// expected length was shorter).
    pub data_out: Bytes,
    /// Expected Data-In length from the transport; data_in longer than this is truncated by
    /// the transport, which reports the residual.
    pub data_in_len: u32,
    /// Data-Out length the transport announced (iSCSI EDTL of a write), which may differ
    /// from what the CDB asks for; lets commands refuse data the CDB does not account for.
    pub data_out_len: u32,
    pub attr: TaskAttr,
}

/// Result of executing a command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScsiOutcome {
    pub status: u8,
    /// Encoded sense data (fixed or descriptor format, as the LUN's D_SENSE says).
    pub sense: Option<Bytes>,
    /// Data-In produced (already limited by the CDB's allocation/transfer length).
    pub data_in: Bytes,
}
