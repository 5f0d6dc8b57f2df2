//! holdfast: a userspace iSCSI target with durable SCSI-3 persistent reservations,
//! and the cluster agent that uses them.
//!
//! Layers, each knowing only those below it (checked by `tests/server/layers.rs`):
//!
//! | layer | knows | does |
//! |---|---|---|
//! | [`wire`] | bytes | PDU codec (BHS per opcode, AHS, digests), text codec, the PDU stream pair [`wire::read_pdu`] / [`wire::PduWriter`] |
//! | [`iscsi`] | `wire`; no tokio, no `scsi` | login states, one negotiation engine (key table) for both sides, CHAP, names, and the sans-IO full-feature connections of both sides, [`iscsi::target_conn::TargetConnection`] (ITT → task, the transport side of TMFs) and [`iscsi::initiator_conn::InitiatorConnection`] (`handle_*` in, `poll_*` out, time as an input) |
//! | [`scsi`] | nothing of iSCSI | the device server: one command table, SPC/SBC, PR state machine, unit attentions, the per-LU task set and task management ([`scsi::task_set`], [`scsi::tmf`]), and the SCSI vocabulary (status, sense, opcodes, PR codes, TransportIDs) |
//! | [`store`] | `scsi`'s traits | file backend, durable PR state |
//! | [`server`] | all of the above + tokio | portals, the connection driver around `TargetConnection` (tasks into LU task sets, TMF aborts to every affected session), sessions, config → runtime |
//! | [`initiator`] | `wire`, `iscsi`, the `scsi` vocabulary, tokio | [`initiator::IscsiUrl`], [`initiator::connect`], the session driver around `InitiatorConnection` (pipelined commands), PR helpers, the one unit-attention policy |
//! | [`agent`] | the initiator (storage only through it) | quorum layout, membership, the pure planner, operations, the loop, VM drivers |
//! | [`service`] | nothing of holdfast | systemd notifications (READY, STATUS, WATCHDOG), the single-instance directory lock, status lines |
//! | [`cli`] | everything | `target`, `agent`, `ctl`, `pr`, `demo`, `guest` (anyhow lives here and in `main.rs`) |
//!
//! [`config_value`] holds what both configuration files share (errors, sizes);
//! [`secret`] the secret type that never prints; [`log_limit`] and [`backoff`] how
//! repeated failures are logged and retried.

pub mod agent;
pub mod atomic_file;
pub mod backoff;
pub mod cli;
pub mod config_value;
pub mod http;
pub mod initiator;
pub mod iscsi;
pub mod log_limit;
pub mod metrics;
pub mod scsi;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod wire;
