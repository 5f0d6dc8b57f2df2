//! VM drivers: one trait (start, stop, kill, save, restore, status, pause, resume) over
//! the ways a node runs a guest: a supervised process, a QEMU guest driven over QMP, an
//! rgmanager-style script, or libvirt.
//!
//! Calls block (they fork, wait and signal); the agent runs them on tokio's blocking
//! pool, one group at a time.

use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::time::Duration;

mod exec;
mod freeze;
pub mod libvirt;
pub mod migration;
pub mod process;
pub(crate) mod procinfo;
pub mod qemu;
pub mod qmp;
pub mod script;

/// The driver a group's `[group.vm]` section asks for. `default_log` is where a process
/// VM's output goes when its config names no log (STATE_DIR/GROUP.log).
pub fn build(vm: &crate::agent::config::VmConfig, default_log: PathBuf) -> Box<dyn VmDriver> {
    use crate::agent::config::VmConfig;
    match vm {
        VmConfig::Process(p) => Box::new(process::ProcessDriver::new(p.clone(), default_log)),
        VmConfig::Qemu(q) => Box::new(qemu::QemuDriver::new(q.clone(), default_log)),
        VmConfig::Script {
            path,
            timeout,
            pause,
        } => Box::new(script::ScriptDriver::new(path.clone(), *timeout, *pause)),
        VmConfig::Libvirt {
            domain,
            xml,
            uri,
            virsh,
            migrate_uri,
        } => Box::new(libvirt::LibvirtDriver::new(
            domain.clone(),
            xml.clone(),
            uri.clone(),
            virsh.clone(),
            migrate_uri.clone(),
        )),
    }
}

/// Everything a driver may need to know about the run it is asked to do. Strings in a
/// driver's settings may use these as `{placeholders}` (see [`VmContext::expand`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmContext {
    /// `{group}`
    pub group: String,
    /// `{node}`: this node's name.
    pub node: String,
    /// `{node_id}`
    pub node_id: u16,
    /// `{epoch}`: the group record's epoch of this claim (grows with every owner change).
    pub epoch: u64,
    /// `{initiator_name}`: the initiator name the VM's data path must use (registered by
    /// the agent before the start).
    pub initiator_name: String,
    /// `{portal}`: host:port of the portal the agent is logged in through.
    pub portal: String,
    /// The node's other portals (node.toml's list without `portal`). `{portals}`: all of
    /// them, `portal` first, comma separated: where a VM's data path may log in again
    /// when its portal (a gateway) is lost.
    pub other_portals: Vec<String>,
    /// `{target}`: the target's iSCSI name.
    pub target: String,
    /// `{disk0}`, `{disk1}`, …: iscsi://PORTAL/TARGET/LUN of each disk, in config order;
    /// `{disks}`: all of them, space separated; `{lun0}`, `{lun1}`, …: the LUN numbers.
    pub disks: Vec<u64>,
    /// `{state_file}`: where a saved state lives (STATE_DIR/GROUP.state).
    pub state_file: PathBuf,
    /// `{state_dir}`
    pub state_dir: PathBuf,
}

impl VmContext {
    /// Whether a saved state waits at `state_file` (for a restore).
    pub fn has_saved_state(&self) -> Result<bool, DriverError> {
        self.state_file
            .try_exists()
            .map_err(|e| DriverError::Failed {
                action: "restore",
                detail: format!("{}: {e}", self.state_file.display()),
            })
    }

    pub fn disk_url(&self, i: usize) -> Option<String> {
        self.disks
            .get(i)
            .map(|l| format!("iscsi://{}/{}/{}", self.portal, self.target, l))
    }

    /// `{portals}`: the agent's portal first, then the node's others.
    pub fn portals(&self) -> String {
        std::iter::once(&self.portal)
            .chain(&self.other_portals)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Replace the placeholders listed on the fields; unknown `{…}` stay as written.
    pub fn expand(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                out.push_str(&rest[open..]);
                return out;
            };
            let name = &after[..close];
            match self.lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push('{');
                    out.push_str(name);
                    out.push('}');
                }
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    }

    fn lookup(&self, name: &str) -> Option<String> {
        Some(match name {
            "group" => self.group.clone(),
            "node" => self.node.clone(),
            "node_id" => self.node_id.to_string(),
            "epoch" => self.epoch.to_string(),
            "initiator_name" => self.initiator_name.clone(),
            "portal" => self.portal.clone(),
            "portals" => self.portals(),
            "target" => self.target.clone(),
            "state_file" => self.state_file.display().to_string(),
            "state_dir" => self.state_dir.display().to_string(),
            "disks" => (0..self.disks.len())
                .filter_map(|i| self.disk_url(i))
                .collect::<Vec<_>>()
                .join(" "),
            _ => {
                if let Some(i) = name.strip_prefix("disk") {
                    return self.disk_url(i.parse().ok()?);
                }
                if let Some(i) = name.strip_prefix("lun") {
                    return self
                        .disks
                        .get(i.parse::<usize>().ok()?)
                        .map(|l| l.to_string());
                }
                return None;
            }
        })
    }

    /// The environment every driver passes to what it runs.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("HOLDFAST_GROUP".to_string(), self.group.clone()),
            ("HOLDFAST_NODE".to_string(), self.node.clone()),
            ("HOLDFAST_NODE_ID".to_string(), self.node_id.to_string()),
            ("HOLDFAST_EPOCH".to_string(), self.epoch.to_string()),
            (
                "HOLDFAST_INITIATOR_NAME".to_string(),
                self.initiator_name.clone(),
            ),
            ("HOLDFAST_PORTAL".to_string(), self.portal.clone()),
            ("HOLDFAST_PORTALS".to_string(), self.portals()),
            ("HOLDFAST_TARGET".to_string(), self.target.clone()),
            (
                "HOLDFAST_STATE_FILE".to_string(),
                self.state_file.display().to_string(),
            ),
            (
                "HOLDFAST_DISKS".to_string(),
                self.lookup("disks").unwrap_or_default(),
            ),
        ];
        for i in 0..self.disks.len() {
            if let Some(u) = self.disk_url(i) {
                v.push((format!("HOLDFAST_DISK{i}"), u));
            }
        }
        v
    }
}

/// What a driver reports about its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    Running,
    /// Not running and never started by this driver, or stopped by the agent.
    Stopped,
    /// Stopped by itself cleanly (the guest's admin shut it down): not a failure, and
    /// not restarted.
    ShutDown,
    /// Stopped by itself otherwise (crash, non-zero exit, killed by someone else).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{action}: cannot run {program}: {source}")]
    Spawn {
        action: &'static str,
        program: String,
        source: std::io::Error,
    },
    #[error("{action} failed: {detail}")]
    Failed {
        action: &'static str,
        detail: String,
    },
    #[error("{action} timed out after {after:?}")]
    Timeout {
        action: &'static str,
        after: Duration,
    },
    #[error("{action} is not supported by this VM's driver")]
    Unsupported { action: &'static str },
}

/// One VM, driven the way its config says. Every call blocks until done.
pub trait VmDriver: Send {
    /// Start the VM. Returns once it is running (or failed to start).
    fn start(&mut self, ctx: &VmContext) -> Result<(), DriverError>;
    /// Start the VM from the state a [`save`](VmDriver::save) left. `Ok(false)`: there is
    /// no saved state, and nothing was started (the caller starts it instead).
    fn restore(&mut self, ctx: &VmContext) -> Result<bool, DriverError>;
    /// Graceful stop; killed once `timeout` passes. Returns once it is gone.
    fn stop(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError>;
    /// Stop at once (self-fencing). Returns once it is gone.
    fn kill(&mut self, ctx: &VmContext) -> Result<(), DriverError>;
    /// Save the VM's state (for a later restore, possibly on another node) and stop it.
    /// `Unsupported` when this VM cannot save.
    fn save(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError>;
    fn status(&mut self, ctx: &VmContext) -> Result<VmStatus, DriverError>;
    /// Forget a saved state (after a start that must not use it).
    fn discard_saved(&mut self, ctx: &VmContext) -> Result<(), DriverError>;
    /// Freeze the VM in place during a storage outage: afterwards it neither writes nor
    /// talks on the network, and [`resume`](VmDriver::resume) continues it where it
    /// stopped. `Unsupported` when this VM cannot be paused (the agent kills it instead).
    fn pause(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let _ = ctx;
        Err(DriverError::Unsupported { action: "pause" })
    }
    /// Continue a VM that [`pause`](VmDriver::pause) froze.
    fn resume(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let _ = ctx;
        Err(DriverError::Unsupported { action: "resume" })
    }

    // Live migration. A driver that can do it implements all five; the agent asks
    // nothing of one that cannot beyond `start_incoming`, whose `Unsupported` ends the
    // attempt before anything changed.

    /// Destination: start the VM paused, waiting for an incoming migration on `host`;
    /// returns the `host:port` it listens on.
    fn start_incoming(&mut self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        let _ = (ctx, host);
        Err(DriverError::Unsupported {
            action: "live migration",
        })
    }
    /// Destination: wait until the incoming state has arrived (the VM stays paused).
    fn wait_incoming(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        let _ = (ctx, timeout);
        Err(DriverError::Unsupported {
            action: "live migration",
        })
    }
    /// Source: migrate the running VM live to `addr` (host:port) and return QEMU's
    /// figures once it completed; the VM here is then stopped for good (postmigrate). On
    /// failure or timeout the migration is cancelled and the VM keeps running here.
    fn migrate_live(
        &mut self,
        ctx: &VmContext,
        addr: &str,
        timeout: Duration,
    ) -> Result<migration::MigrationStats, DriverError> {
        let _ = (ctx, addr, timeout);
        Err(DriverError::Unsupported {
            action: "live migration",
        })
    }
    /// Run the VM after a migration: the destination once it owns the disks, or the
    /// source again when the hand-over did not happen.
    fn continue_migrated(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let _ = ctx;
        Err(DriverError::Unsupported {
            action: "live migration",
        })
    }
    /// Whether this VM's driver can migrate live at all (for `ctl move --live`).
    fn can_migrate_live(&self) -> bool {
        false
    }
}

/// A signal from "SIGTERM", "TERM" or "15" (standard signals only: realtime ones have
/// no name to check them by).
pub fn signal_number(s: &str) -> Option<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> VmContext {
        VmContext {
            group: "web".into(),
            node: "n1".into(),
            node_id: 1,
            epoch: 7,
            initiator_name: "iqn.x:vm".into(),
            portal: "127.0.0.1:3260".into(),
            other_portals: vec![],
            target: "iqn.t".into(),
            disks: vec![2, 1],
            state_file: "/s/web.state".into(),
            state_dir: "/s".into(),
        }
    }

    #[test]
    fn placeholders_expand() {
        let c = ctx();
        assert_eq!(
            c.expand("{group}@{node}#{epoch} {disk0} {lun1} {nope} {"),
            "web@n1#7 iscsi://127.0.0.1:3260/iqn.t/2 1 {nope} {"
        );
        assert_eq!(
            c.expand("{disks}"),
            "iscsi://127.0.0.1:3260/iqn.t/2 iscsi://127.0.0.1:3260/iqn.t/1"
        );
        assert_eq!(c.expand("{disk9}"), "{disk9}");
        assert_eq!(c.expand("{portals}"), "127.0.0.1:3260");
        let two = VmContext {
            other_portals: vec!["127.0.0.2:3260".into()],
            ..c
        };
        assert_eq!(two.expand("{portals}"), "127.0.0.1:3260,127.0.0.2:3260");
    }

    #[test]
    fn signals_parse() {
        assert_eq!(signal_number("SIGUSR1"), Some(Signal::SIGUSR1));
        assert_eq!(signal_number("TERM"), Some(Signal::SIGTERM));
        assert_eq!(signal_number("PWR"), Some(Signal::SIGPWR));
        assert_eq!(signal_number("9"), Some(Signal::SIGKILL));
        assert_eq!(signal_number("SIGFOO"), None);
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("sigterm"), None);
    }
}
