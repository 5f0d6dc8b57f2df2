//! The `libvirt` driver: a domain driven through `virsh` (optionally `-c URI`).
//!
//! Saving uses libvirt's managed save, which `virsh start` restores automatically; so a
//! plain start first removes any managed save (a state older than the disks must never
//! come back), and `restore` starts only when `virsh dominfo` reports one. Managed-save
//! images live on the node that saved, so a restore on another node finds none (unless
//! libvirt's save directory is shared) and the VM boots fresh.
//!
//! virsh runs with `LC_ALL=C` (its states and messages are parsed) and with
//! [`VmContext::env`] in its environment; each call has a timeout (60 s, or what is left
//! of the agent's timeout for stop and save), after which it is killed.
//!
//! Live migration is `virsh migrate --live --suspend`: see [`live`].

use super::exec::{self, describe, tail_lines};
use super::{DriverError, VmContext, VmDriver, VmStatus};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "libvirt_live.rs"]
pub mod live;

/// Timeout of a virsh call outside stop and save.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest timeout a virsh call gets even when the stop deadline is (nearly) spent.
const MIN_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a stop polls the domain's state.
const POLL: Duration = Duration::from_millis(200);

pub struct LibvirtDriver {
    domain: String,
    xml: Option<PathBuf>,
    uri: Option<String>,
    virsh: String,
    /// `migrate_uri` of the config (placeholders unexpanded).
    migrate_uri: Option<String>,
    /// Whether the domain is down because this driver stopped, killed or saved it: a
    /// guest that powers off on our ACPI request reads "shut off (shutdown)", which is
    /// only its admin's doing when we did not ask.
    stopped_by_us: bool,
}

impl LibvirtDriver {
    /// Settings as in [`crate::agent::config::VmConfig::Libvirt`]; strings may hold
    /// placeholders.
    pub fn new(
        domain: String,
        xml: Option<PathBuf>,
        uri: Option<String>,
        virsh: String,
        migrate_uri: Option<String>,
    ) -> Self {
        LibvirtDriver {
            domain,
            xml,
            uri,
            virsh,
            migrate_uri,
            stopped_by_us: false,
        }
    }

    /// Run `virsh [-c URI] ARGS…`. A non-zero exit is returned, not an error.
    fn virsh(
        &self,
        ctx: &VmContext,
        action: &'static str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Run, DriverError> {
        let mut cmd = Command::new(ctx.expand(&self.virsh));
        if let Some(uri) = &self.uri {
            cmd.arg("-c").arg(ctx.expand(uri));
        }
        cmd.args(args).envs(ctx.env()).env("LC_ALL", "C");
        let out = exec::run(cmd, action, timeout, false)?;
        Ok(Run {
            action,
            args: args.join(" "),
            out,
        })
    }

    fn domain(&self, ctx: &VmContext) -> String {
        ctx.expand(&self.domain)
    }

    /// `virsh managedsave-remove`; no image (or no domain, hence no image) is fine.
    fn remove_managed_save(
        &self,
        ctx: &VmContext,
        action: &'static str,
        tolerate_no_domain: bool,
    ) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        let r = self.virsh(ctx, action, &["managedsave-remove", &dom], COMMAND_TIMEOUT)?;
        if r.ok() || r.says_no_managed_save() || (tolerate_no_domain && r.says_no_domain()) {
            Ok(())
        } else {
            Err(r.error())
        }
    }

    /// `virsh domstate` (plain: "running", "shut off", …); `None` when libvirt does not
    /// know the domain.
    fn domstate(
        &self,
        ctx: &VmContext,
        action: &'static str,
        timeout: Duration,
    ) -> Result<Option<String>, DriverError> {
        let dom = self.domain(ctx);
        let r = self.virsh(ctx, action, &["domstate", &dom], timeout)?;
        if r.ok() {
            Ok(Some(r.out.stdout.trim().to_string()))
        } else if r.says_no_domain() {
            Ok(None)
        } else {
            Err(r.error())
        }
    }

    /// `virsh destroy`, which refuses a domain that is not running: that is success.
    fn destroy(&self, ctx: &VmContext, action: &'static str) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        let r = self.virsh(ctx, action, &["destroy", &dom], COMMAND_TIMEOUT)?;
        if r.ok() {
            return Ok(());
        }
        match self.domstate(ctx, action, COMMAND_TIMEOUT)? {
            None => Ok(()),
            Some(s) if s == "shut off" => Ok(()),
            Some(_) => Err(r.error()),
        }
    }

    /// Graceful shutdown, polled until the deadline, then destroy.
    fn stop_domain(&self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(MIN_CALL_TIMEOUT)
        };
        let dom = self.domain(ctx);
        match self.domstate(ctx, "stop", left())? {
            None => return Ok(()),
            Some(s) if s == "shut off" => return Ok(()),
            Some(_) => {}
        }
        let asked = self.virsh(ctx, "stop", &["shutdown", &dom], left());
        match asked {
            Ok(r) if r.ok() => loop {
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!(
                        group = %ctx.group,
                        domain = %dom,
                        ?timeout,
                        "domain did not shut down in time; destroying it"
                    );
                    break;
                }
                std::thread::sleep(POLL.min(deadline - now));
                match self.domstate(ctx, "stop", left()) {
                    Ok(None) => return Ok(()),
                    Ok(Some(s)) if s == "shut off" => return Ok(()),
                    Ok(Some(_)) => {}
                    // A hung or failing virsh must not stop the stop: destroy follows.
                    Err(e) => tracing::warn!(group = %ctx.group, "stop: {e}"),
                }
            },
            // The guest never got the request: waiting would only delay the destroy.
            Ok(r) => tracing::warn!(group = %ctx.group, "{}", r.error()),
            Err(e) => tracing::warn!(group = %ctx.group, "{e}"),
        }
        self.destroy(ctx, "stop")
    }
}

/// One virsh call's outcome.
struct Run {
    action: &'static str,
    args: String,
    out: exec::Output,
}

impl Run {
    fn ok(&self) -> bool {
        self.out.status.success()
    }

    fn says(&self, what: &str) -> bool {
        let l = |s: &str| s.to_ascii_lowercase().contains(what);
        l(&self.out.stderr) || l(&self.out.stdout)
    }

    fn says_no_domain(&self) -> bool {
        self.says("domain not found") || self.says("failed to get domain")
    }

    /// virsh says "has no manage save image" (sic) and exits 0; older ones failed.
    fn says_no_managed_save(&self) -> bool {
        self.says("no manage")
    }

    /// A non-zero exit is an error quoting virsh's complaint.
    fn checked(self) -> Result<Run, DriverError> {
        if self.ok() {
            Ok(self)
        } else {
            Err(self.error())
        }
    }

    fn error(&self) -> DriverError {
        let mut msg = tail_lines(&self.out.stderr, 3);
        if msg.is_empty() {
            msg = tail_lines(&self.out.stdout, 3);
        }
        DriverError::Failed {
            action: self.action,
            detail: format!("virsh {}: {}: {msg}", self.args, describe(self.out.status)),
        }
    }
}

/// What `virsh domstate --reason` prints ("shut off (shutdown)") means for the group.
pub fn parse_domstate(s: &str) -> VmStatus {
    let s = s.trim();
    let (state, reason) = match s.split_once(" (") {
        Some((st, r)) => (st, r.trim_end_matches(')')),
        None => (s, ""),
    };
    match state {
        // "no state" is libvirt not knowing yet; a guest on its way down is still up.
        "running" | "idle" | "paused" | "blocked" | "pmsuspended" | "in shutdown" | "no state" => {
            VmStatus::Running
        }
        "shut off" => match reason {
            // Shut down from inside the guest: its admin's decision.
            "shutdown" => VmStatus::ShutDown,
            // qemu died without the guest asking (libvirt's default on_crash is to
            // destroy, which reads "shut off (crashed)"), or it never came up.
            "crashed" | "failed" => VmStatus::Failed(s.to_string()),
            // destroyed, saved, migrated, unknown (never started, daemon restarted), …
            _ => VmStatus::Stopped,
        },
        "crashed" => VmStatus::Failed(s.to_string()),
        _ => VmStatus::Failed(format!("unknown domain state {s:?}")),
    }
}

/// Whether `virsh dominfo` output shows a managed save ("Managed save:   yes").
pub fn has_managed_save(dominfo: &str) -> bool {
    dominfo.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "Managed save" && v.trim() == "yes")
    })
}

impl VmDriver for LibvirtDriver {
    fn start(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        if let Some(xml) = &self.xml {
            let known = self
                .virsh(ctx, "start", &["dominfo", &dom], COMMAND_TIMEOUT)?
                .ok();
            if !known {
                let xml = match xml.to_str() {
                    Some(s) => ctx.expand(s),
                    None => xml.to_string_lossy().into_owned(),
                };
                self.virsh(ctx, "start", &["define", &xml], COMMAND_TIMEOUT)?
                    .checked()?;
            }
        }
        // Not optional: `virsh start` would silently resume a managed save, and a plain
        // start means the saved state is not to be used (it may be older than the disks).
        self.remove_managed_save(ctx, "start", false)?;
        self.virsh(ctx, "start", &["start", &dom], COMMAND_TIMEOUT)?
            .checked()?;
        self.stopped_by_us = false;
        Ok(())
    }

    fn restore(&mut self, ctx: &VmContext) -> Result<bool, DriverError> {
        let dom = self.domain(ctx);
        let info = self.virsh(ctx, "restore", &["dominfo", &dom], COMMAND_TIMEOUT)?;
        // An unknown domain (not defined on this node yet) has no managed save either.
        if !info.ok() || !has_managed_save(&info.out.stdout) {
            return Ok(false);
        }
        self.virsh(ctx, "restore", &["start", &dom], COMMAND_TIMEOUT)?
            .checked()?;
        self.stopped_by_us = false;
        Ok(true)
    }

    fn stop(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        self.stop_domain(ctx, timeout)?;
        self.stopped_by_us = true;
        Ok(())
    }

    fn kill(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.destroy(ctx, "kill")?;
        self.stopped_by_us = true;
        Ok(())
    }

    fn save(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        match self
            .virsh(ctx, "save", &["managedsave", &dom], timeout)
            .and_then(Run::checked)
        {
            Ok(_) => {
                self.stopped_by_us = true;
                Ok(())
            }
            Err(e) => {
                if matches!(e, DriverError::Timeout { .. }) {
                    // Killing virsh does not stop libvirt's save job: abort it, and drop
                    // an image that may still have been completed, so a save reported
                    // as failed can never be restored later.
                    let _ = self.virsh(ctx, "save", &["domjobabort", &dom], COMMAND_TIMEOUT);
                    let _ = self.remove_managed_save(ctx, "save", true);
                }
                Err(e)
            }
        }
    }

    fn status(&mut self, ctx: &VmContext) -> Result<VmStatus, DriverError> {
        let dom = self.domain(ctx);
        let r = self.virsh(
            ctx,
            "status",
            &["domstate", "--reason", &dom],
            COMMAND_TIMEOUT,
        )?;
        if r.ok() {
            Ok(match parse_domstate(&r.out.stdout) {
                VmStatus::ShutDown if self.stopped_by_us => VmStatus::Stopped,
                st => st,
            })
        } else if r.says_no_domain() {
            // Not defined on this node (yet): nothing runs.
            Ok(VmStatus::Stopped)
        } else {
            Err(r.error())
        }
    }

    fn discard_saved(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.remove_managed_save(ctx, "discard_saved", true)
    }

    /// `virsh suspend`: libvirt stops the vCPUs (QMP `stop`).
    fn pause(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        self.virsh(ctx, "pause", &["suspend", &dom], COMMAND_TIMEOUT)?
            .checked()?;
        Ok(())
    }

    fn resume(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        self.virsh(ctx, "resume", &["resume", &dom], COMMAND_TIMEOUT)?
            .checked()?;
        Ok(())
    }

    // Live migration: `virsh migrate --live --suspend` (see [`live`]). `host` is
    // `node.migration_address`; the "address" published is the libvirt URI to migrate to.

    fn start_incoming(&mut self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        self.incoming_uri(ctx, host)
    }

    fn wait_incoming(&mut self, ctx: &VmContext, timeout: Duration) -> Result<(), DriverError> {
        self.await_incoming(ctx, timeout)
    }

    fn migrate_live(
        &mut self,
        ctx: &VmContext,
        addr: &str,
        timeout: Duration,
    ) -> Result<super::migration::MigrationStats, DriverError> {
        self.migrate_to(ctx, addr, timeout)
    }

    fn continue_migrated(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        self.resume_migrated(ctx)
    }

    fn can_migrate_live(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domstates_map_to_statuses() {
        for (s, want) in [
            ("running (booted)", VmStatus::Running),
            ("running (restored)", VmStatus::Running),
            ("paused (user)", VmStatus::Running),
            ("blocked (unknown)", VmStatus::Running),
            ("pmsuspended (unknown)", VmStatus::Running),
            ("in shutdown (user)", VmStatus::Running),
            ("shut off (shutdown)\n", VmStatus::ShutDown),
            ("shut off (destroyed)", VmStatus::Stopped),
            ("shut off (saved)", VmStatus::Stopped),
            ("shut off (unknown)", VmStatus::Stopped),
            ("shut off", VmStatus::Stopped),
            (
                "shut off (crashed)",
                VmStatus::Failed("shut off (crashed)".into()),
            ),
            (
                "crashed (panicked)",
                VmStatus::Failed("crashed (panicked)".into()),
            ),
        ] {
            assert_eq!(parse_domstate(s), want, "{s:?}");
        }
        assert!(
            matches!(parse_domstate("exploded"), VmStatus::Failed(m) if m.contains("exploded"))
        );
    }

    #[test]
    fn dominfo_managed_save() {
        let info = "Id:             -\nName:           web\nState:          shut off\n\
                    Persistent:     yes\nManaged save:   yes\nSecurity model: none\n";
        assert!(has_managed_save(info));
        assert!(!has_managed_save(
            &info.replace("save:   yes", "save:   no")
        ));
        assert!(!has_managed_save(""));
    }
}
