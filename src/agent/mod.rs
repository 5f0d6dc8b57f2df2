//! The cluster agent: one per hypervisor node. It proves the node alive through the
//! quorum LUN, claims resource groups (disks + VM) by persistent reservation, fences dead
//! peers with PREEMPT AND ABORT, and starts a VM only after its reservation is read back.
//! The protocol is described in docs/AGENT.md.

pub mod alert;
pub mod claim;
pub mod config;
pub mod driver;
pub mod event_log;
pub mod event_ring;
pub mod events;
mod live_ops;
pub mod membership;
mod ops;
pub mod placement;
pub mod planner;
pub mod quorum;
pub mod quorum_disk;
pub mod record_update;
pub mod ring_io;
pub mod ring_writer;

use crate::initiator::{ConnectError, InitiatorError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}: timed out")]
    Timeout(&'static str),
    #[error("{0}: RESERVATION CONFLICT")]
    Conflict(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: InitiatorError,
    },
    #[error("quorum LUN: {0}")]
    Quorum(#[from] quorum::QuorumError),
    /// Our key is gone or someone else holds our disk: we were fenced.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("claim: {0}")]
    Claim(String),
    #[error("VM: {0}")]
    Driver(#[from] driver::DriverError),
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    pub fn from_initiator(what: &'static str, e: InitiatorError) -> AgentError {
        match e {
            InitiatorError::ReservationConflict => AgentError::Conflict(what),
            InitiatorError::Timeout => AgentError::Timeout(what),
            source => AgentError::Io { what, source },
        }
    }

    /// A failed connect: the login's own error when it got that far.
    pub fn from_connect(e: ConnectError) -> AgentError {
        match e {
            ConnectError::Login { source, .. } => AgentError::from_initiator("login", source),
            other => AgentError::Other(other.to_string()),
        }
    }

    /// Errors that mean the session is unusable and must be re-established.
    pub fn is_connection(&self) -> bool {
        match self {
            AgentError::Timeout(_) => true,
            AgentError::Io { source, .. } => source.is_connection_lost(),
            _ => false,
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (for display in records only).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
pub mod node;
