//! holdfast: a userspace iSCSI target with durable SCSI-3 persistent reservations,
//! and the cluster agent that uses them.
//!
//! Layers, each knowing only those below it: `wire` (PDU codec), `iscsi` (login,
//! negotiation, session rules; sans-IO), `scsi` (transport-independent device server),
//! `store` (block backends), `target` (tokio edge: portals, connections, config).

pub mod agent;
pub mod cli;
pub mod config_value;
pub mod initiator;
pub mod iscsi;
pub mod scsi;
pub mod server;
pub mod store;
pub mod wire;
