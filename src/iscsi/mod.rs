//! iSCSI protocol rules, sans-IO: key negotiation, login (with CHAP), and the
//! full-feature-phase bookkeeping (CmdSN window, task ordering, data transfer planning).

pub mod chap;
pub mod cmdsn;
pub mod keys;
pub mod login;
pub mod negotiation;
pub mod target_conn;
pub mod task_set;
pub mod transfer;
