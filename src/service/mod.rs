//! Running as a system service: the systemd notification protocol ([`notify`]), the
//! single-instance lock on a data or state directory ([`lock`]), and the status lines
//! both daemons report ([`status`]).

pub mod lock;
pub mod nofile;
pub mod notify;
pub mod status;
