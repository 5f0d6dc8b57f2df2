//! Target-side integration tests in one crate (one link of the library instead of one
//! per file): an in-process or child-process target driven over real TCP by the
//! initiator library, a raw PDU peer, `holdfast pr`, and restart/kill durability.
//! Run one area with a filter: `cargo test --test server -- hostile::`.

#[path = "../common/mod.rs"]
mod common;

use common::ceph_fixture;
mod faults;
mod hostile;
mod io;
mod kill_durability;
mod layers;
mod limits;
mod login;
mod metrics;
mod pr;
mod pr_cli;
mod pr_restart;
mod quorum_fuzz_seeds;
mod rbd;
mod rbd_fence_scsi;
mod rbd_gateway;
mod rbd_multipath;
mod rbd_osd;
mod rbd_pr;
mod readme_config;
mod reload;
mod secrets;
mod service;
mod shutdown;
mod soak;
mod tmf;
