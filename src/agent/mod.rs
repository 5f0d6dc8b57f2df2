//! The cluster agent: one per hypervisor node. It proves the node alive through the
//! quorum LUN, claims resource groups (disks + VM) by persistent reservation, fences dead
//! peers with PREEMPT AND ABORT, and starts a VM only after its reservation is read back.
//! The protocol is described in docs/AGENT.md.

pub mod config;
pub mod driver;
pub mod guest;
