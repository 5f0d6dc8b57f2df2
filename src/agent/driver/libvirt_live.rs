//! The libvirt driver's live migration: `virsh migrate --live --suspend`.
//!
//! libvirt moves the domain between the two libvirtds itself, so there is no port to
//! listen on: the destination's "address" is the libvirt URI the source's virsh migrates
//! to (`migrate_uri`). `--suspend` makes the domain arrive paused, so nothing runs on
//! the destination before its agent owns the disks; the destination waits for that
//! paused domain and resumes it after the switchover.
//!
//! Unlike QEMU's own migration, a completed libvirt migration has no way back: the
//! source's domain is gone ("shut off (migrated)"), so `continue_migrated` there fails
//! and the guest boots again as after a crash (the source's writes all completed
//! before libvirt finished, so none is lost).
//!
//! The domain's XML travels with it, including its disks' `<initiator><iqn name=…/>`,
//! which must be the destination's VM initiator name or its disks lose the reservation
//! at the switchover. libvirt's qemu hook rewrites it on the destination
//! (fixtures/agent/libvirt-qemu-hook.sh); the destination checks it before it takes
//! the disks.

use super::{LibvirtDriver, Run, COMMAND_TIMEOUT, POLL};
use crate::agent::driver::migration::MigrationStats;
use crate::agent::driver::{DriverError, VmContext};
use std::time::{Duration, Instant};

/// Where the source migrates to when the destination's config names no `migrate_uri`.
pub const DEFAULT_MIGRATE_URI: &str = "qemu+ssh://{migration_address}/system";

const ACTION: &str = "live migration";

/// The URI the source's virsh migrates to: `template` (or the default) with
/// `{migration_address}` set to `host` (bracketed when it is an IPv6 address) and the
/// context's placeholders filled in.
pub fn migrate_uri(template: Option<&str>, ctx: &VmContext, host: &str) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let t = template.unwrap_or(DEFAULT_MIGRATE_URI);
    ctx.expand(&t.replace("{migration_address}", &host))
}

/// `virsh migrate`'s arguments: live; arriving paused (`--suspend`: the destination runs
/// nothing before it owns the disks); aborted on an I/O error rather than carried on.
pub fn migrate_args<'a>(domain: &'a str, dest_uri: &'a str) -> [&'a str; 6] {
    [
        "migrate",
        "--live",
        "--suspend",
        "--abort-on-error",
        domain,
        dest_uri,
    ]
}

/// What the destination's `virsh domstate --reason` says about an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Not (fully) here yet: unknown, shut off, "paused (migrating)" (libvirt's state
    /// while the state comes in) or "paused (starting up)".
    Waiting,
    /// Arrived and held paused.
    Arrived,
    /// In any other state (running, crashed, …): not a migration we can take over.
    Wrong(String),
}

pub fn incoming_state(domstate: &str) -> Incoming {
    let s = domstate.trim();
    let (state, reason) = match s.split_once(" (") {
        Some((st, r)) => (st, r.trim_end_matches(')')),
        None => (s, ""),
    };
    match (state, reason) {
        ("shut off", _) | ("paused", "migrating") | ("paused", "starting up") => Incoming::Waiting,
        ("paused", _) => Incoming::Arrived,
        _ => Incoming::Wrong(s.to_string()),
    }
}

/// The initiator names in a domain XML's `<iqn name='…'/>` elements other than `mine`.
pub fn foreign_initiators(xml: &str, mine: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<iqn") {
        rest = &rest[at + 4..];
        let end = rest.find('>').unwrap_or(rest.len());
        let Some(n) = rest[..end].find("name=") else {
            continue;
        };
        let v = &rest[n + 5..end];
        let Some(q) = v.chars().next().filter(|c| *c == '\'' || *c == '"') else {
            continue;
        };
        let name = v[1..].split(q).next().unwrap_or_default();
        if name != mine && !out.iter().any(|o| o == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// Figures from `virsh domjobinfo --completed`, each absent when not shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobFigures {
    pub total: Option<Duration>,
    pub downtime: Option<Duration>,
    pub transferred: Option<u64>,
}

pub fn parse_jobinfo(text: &str) -> JobFigures {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.split_whitespace().collect::<Vec<_>>())
        })
    };
    let ms = |key: &str| match field(key)?.as_slice() {
        [n, "ms"] => n.parse().ok().map(Duration::from_millis),
        _ => None,
    };
    let bytes = |key: &str| match field(key)?.as_slice() {
        [n, unit] => {
            let shift = ["B", "KiB", "MiB", "GiB", "TiB"]
                .iter()
                .position(|u| u == unit)?;
            let n: f64 = n.parse().ok()?;
            Some((n * (1u64 << (10 * shift)) as f64) as u64)
        }
        _ => None,
    };
    JobFigures {
        total: ms("Time elapsed"),
        downtime: ms("Total downtime"),
        transferred: bytes("Data processed").or_else(|| bytes("Memory processed")),
    }
}

/// The figures for the agent: libvirt's when it reports them, else the wall time of
/// `virsh migrate` as the total, and the total as the downtime (its upper bound).
pub fn stats(job: JobFigures, wall: Duration) -> MigrationStats {
    let total = job.total.unwrap_or(wall);
    MigrationStats {
        downtime: job.downtime.unwrap_or(total),
        total,
        transferred: job.transferred.unwrap_or(0),
    }
}

fn failed(detail: String) -> DriverError {
    DriverError::Failed {
        action: ACTION,
        detail,
    }
}

impl LibvirtDriver {
    /// Destination: nothing starts here (libvirt creates the domain when the state comes);
    /// a domain already active here would be taken for the incoming one, so it is refused.
    pub(super) fn incoming_uri(&self, ctx: &VmContext, host: &str) -> Result<String, DriverError> {
        let dom = self.domain(ctx);
        match self.domstate(ctx, ACTION, COMMAND_TIMEOUT)? {
            None => {}
            Some(s) if s == "shut off" => {}
            Some(s) => return Err(failed(format!("domain {dom} is already {s} here"))),
        }
        Ok(migrate_uri(self.migrate_uri.as_deref(), ctx, host))
    }

    /// Destination: poll `domstate --reason` until the domain is here and paused, then
    /// check that its disks log in with this node's VM initiator name.
    pub(super) fn await_incoming(
        &self,
        ctx: &VmContext,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.virsh(
                ctx,
                ACTION,
                &["domstate", "--reason", &dom],
                COMMAND_TIMEOUT,
            )?;
            let st = if r.ok() {
                incoming_state(&r.out.stdout)
            } else if r.says_no_domain() {
                Incoming::Waiting
            } else {
                return Err(r.error());
            };
            match st {
                Incoming::Arrived => return self.check_initiators(ctx, &dom),
                Incoming::Wrong(s) => return Err(failed(format!("incoming domain is {s:?}"))),
                Incoming::Waiting => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout {
                    action: ACTION,
                    after: timeout,
                });
            }
            std::thread::sleep(POLL.min(left));
        }
    }

    fn check_initiators(&self, ctx: &VmContext, dom: &str) -> Result<(), DriverError> {
        let xml = self
            .virsh(ctx, ACTION, &["dumpxml", dom], COMMAND_TIMEOUT)?
            .checked()?;
        let foreign = foreign_initiators(&xml.out.stdout, &ctx.initiator_name);
        if foreign.is_empty() {
            return Ok(());
        }
        Err(failed(format!(
            "the migrated domain's disks log in as {}, not as this node's VM initiator \
             name {} (libvirt's qemu hook must rewrite it)",
            foreign.join(", "),
            ctx.initiator_name
        )))
    }

    /// Source: `virsh migrate` to `dest_uri`. On timeout libvirt's job is aborted; if it
    /// had completed all the same, that counts as done.
    pub(super) fn migrate_to(
        &mut self,
        ctx: &VmContext,
        dest_uri: &str,
        timeout: Duration,
    ) -> Result<MigrationStats, DriverError> {
        let dom = self.domain(ctx);
        let started = Instant::now();
        let ran = self
            .virsh(ctx, ACTION, &migrate_args(&dom, dest_uri), timeout)
            .and_then(Run::checked);
        if let Err(e) = ran {
            if !matches!(e, DriverError::Timeout { .. }) || !self.abort_job(ctx, &dom)? {
                return Err(e);
            }
        }
        let wall = started.elapsed();
        self.stopped_by_us = true;
        let job = self
            .virsh(
                ctx,
                ACTION,
                &["domjobinfo", "--completed", &dom],
                COMMAND_TIMEOUT,
            )
            .ok()
            .filter(Run::ok)
            .map(|r| parse_jobinfo(&r.out.stdout))
            .unwrap_or_default();
        Ok(stats(job, wall))
    }

    /// Abort a migration job whose virsh was killed; `true` when the domain had left
    /// all the same ("shut off (migrated)").
    fn abort_job(&self, ctx: &VmContext, dom: &str) -> Result<bool, DriverError> {
        let _ = self.virsh(ctx, ACTION, &["domjobabort", dom], COMMAND_TIMEOUT);
        let r = self.virsh(ctx, ACTION, &["domstate", "--reason", dom], COMMAND_TIMEOUT)?;
        Ok(r.ok() && r.out.stdout.trim() == "shut off (migrated)")
    }

    /// `virsh resume`, then the domain must read "running". On a source whose domain
    /// left, this fails: libvirt has no way back.
    pub(super) fn resume_migrated(&mut self, ctx: &VmContext) -> Result<(), DriverError> {
        let dom = self.domain(ctx);
        self.virsh(ctx, ACTION, &["resume", &dom], COMMAND_TIMEOUT)?
            .checked()?;
        match self.domstate(ctx, ACTION, COMMAND_TIMEOUT)? {
            Some(s) if s == "running" => {
                self.stopped_by_us = false;
                Ok(())
            }
            s => Err(failed(format!(
                "after virsh resume the domain is {}",
                s.as_deref().map_or("unknown".into(), |s| format!("{s:?}"))
            ))),
        }
    }
}

#[cfg(test)]
#[path = "libvirt_live_tests.rs"]
mod tests;
