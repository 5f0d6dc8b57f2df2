//! The command-line edge: what `holdfast target`, `agent`, `pr`, `ctl`, `demo` and `guest` do, each over the
//! library's initiator and agent modules. `main.rs` only parses arguments and calls these.
//! The test guest and its checker, and `cluster_kit` (a local cluster: configs, files,
//! processes), are tooling for the tests and the demo, not the agent.

pub mod agent;
pub mod cluster_kit;
pub mod ctl;
pub mod ctl_command;
pub mod demo;
pub mod guest;
pub mod pr;
pub mod target;
