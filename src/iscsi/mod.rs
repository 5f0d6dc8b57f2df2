//! iSCSI protocol rules, sans-IO: key negotiation, login (with CHAP), and the
//! full-feature-phase bookkeeping (CmdSN window, data transfer planning).

pub mod chap;
pub mod keys;
pub mod login;
pub mod negotiation;
