//! Cluster integration tests in one crate: `holdfast agent` processes against a target,
//! the VM drivers, the test guest and its checker, the demo, the fault test, the
//! failover benchmark, a node inside a QEMU guest writing through the kernel initiator
//! (kernel_node), and real QEMU guests under the qemu driver (agent_qemu), live-migrated under write load
//! (agent_qemu_live), and the cluster spread over gateways on Ceph RBD (agent_gateways). Run one area with a filter: `cargo test --test cluster -- agent_failover::`.

#[path = "../common/mod.rs"]
mod common;

mod agent_bench;
mod agent_drivers;
mod agent_events;
mod agent_failover;
mod agent_faults;
mod agent_gateways;
mod agent_guest;
mod agent_live;
mod agent_live_libvirt;
mod agent_logs;
mod agent_metrics;
mod agent_outage;
mod agent_partitions;
mod agent_protocol;
mod agent_qemu;
mod agent_qemu_live;
mod agent_service;
mod ctl_wait;
mod demo;
mod kernel_node;
mod status_page;
