//! The command-line edge: what `holdfast target`, `agent`, `pr`, `ctl`, `demo` and `guest` do, each over the
//! library's initiator and agent modules. `main.rs` only parses arguments and calls these.
//! The test guest and its checker, and `cluster_kit` (a local cluster: configs, files,
//! processes), are tooling for the tests and the demo, not the agent.

/// `?` on a URL or connection error in a command whose error wraps [`SessionError`].
macro_rules! session_error_sources {
    ($t:ty) => {
        impl From<crate::initiator::UrlError> for $t {
            fn from(e: crate::initiator::UrlError) -> $t {
                crate::cli::SessionError::from(e).into()
            }
        }
        impl From<crate::initiator::ConnectError> for $t {
            fn from(e: crate::initiator::ConnectError) -> $t {
                crate::cli::SessionError::from(e).into()
            }
        }
    };
}

pub mod agent;
pub mod chap_args;
pub mod cluster_kit;
pub mod ctl;
pub mod ctl_command;
pub mod ctl_events;
pub mod ctl_wait;
pub mod demo;
pub mod generate;
pub mod guest;
mod guest_device;
pub mod guest_qemu;
pub mod pr;
pub mod status_page;
pub mod target;
mod target_client;

use crate::initiator::{ConnectError, InitiatorError, UrlError};

/// What can go wrong for every command that logs in to a target and sends it SCSI
/// commands (`pr`, `guest`); each command's own error adds its own cases.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{what}: {source}")]
    Scsi {
        what: &'static str,
        source: InitiatorError,
    },
}

impl SessionError {
    /// A bad command line or URL: the exit status clap uses for a bad command line.
    pub fn is_usage(&self) -> bool {
        matches!(self, SessionError::Url(_) | SessionError::Usage(_))
    }

    pub fn is_reservation_conflict(&self) -> bool {
        matches!(
            self,
            SessionError::Scsi {
                source: InitiatorError::ReservationConflict,
                ..
            }
        )
    }
}
