//! iSCSI protocol rules, sans-IO: key negotiation, login (with CHAP), and the
//! full-feature phase: the target's connection state machine (`target_conn`, driven by
//! `server::connection`) and the initiator's (`initiator_conn`, driven by
//! `initiator::session`) over the CmdSN window, task ordering and data transfer planning.
//! Nothing here does I/O, reads a clock or knows SCSI semantics.

pub mod chap;
pub mod cmdsn;
pub mod initiator_conn;
pub mod keys;
pub mod login;
pub mod name;
pub mod negotiation;
#[cfg(test)]
mod pair_tests;
pub mod target_conn;
pub mod transfer;
