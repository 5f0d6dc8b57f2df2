//! Reload planning: compare the running configuration with a newly read one and
//! decide, without I/O, what can change live and what must be refused.
//!
//! A reload is atomic: if any part of the new configuration is unsafe while the
//! target runs, the whole reload is refused and nothing is applied. Refusals that
//! concern a LUN name the sessions (initiator name + ISID) that use it, so the
//! operator knows whom to log out first.

use std::collections::BTreeMap;
use std::fmt;

use super::config::{AclConfig, Config, LunConfig, TargetConfig};

/// A session of the running target, as far as reload planning cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionUse {
    pub target: String,
    pub initiator: String,
    /// ISID as 12 hex digits.
    pub isid: String,
    /// LUNs this session can currently see.
    pub luns: Vec<u64>,
}

/// One change that can be applied to the running target without dropping sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nexuses that see it get REPORTED LUNS DATA HAS CHANGED.
    LunAdded {
        target: String,
        lun: u64,
    },
    /// Every nexus of the LU gets CAPACITY DATA HAS CHANGED.
    LunGrown {
        target: String,
        lun: u64,
        from: u64,
        to: u64,
    },
    AclAdded {
        target: String,
        initiator: String,
    },
    /// The initiator's existing sessions stay but lose access to every LUN.
    AclRemoved {
        target: String,
        initiator: String,
    },
    /// Its nexuses get REPORTED LUNS DATA HAS CHANGED.
    LunMaskChanged {
        target: String,
        initiator: String,
    },
    /// New logins use the new secret; existing sessions continue.
    ChapChanged {
        scope: String,
    },
    PortalAdded {
        target: String,
        listen: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::LunAdded { target, lun } => write!(f, "{target}: LUN {lun} added"),
            Change::LunGrown {
                target,
                lun,
                from,
                to,
            } => {
                write!(f, "{target}: LUN {lun} grown from {from} to {to} bytes")
            }
            Change::AclAdded { target, initiator } => {
                write!(f, "{target}: ACL entry {initiator} added")
            }
            Change::AclRemoved { target, initiator } => {
                write!(
                    f,
                    "{target}: ACL entry {initiator} removed (its sessions lose LUN access)"
                )
            }
            Change::LunMaskChanged { target, initiator } => {
                write!(f, "{target}: LUN mask of {initiator} changed")
            }
            // The secret itself is never part of the message.
            Change::ChapChanged { scope } => write!(f, "{scope}: CHAP credentials changed"),
            Change::PortalAdded { target, listen } => write!(f, "{target}: portal {listen} added"),
        }
    }
}

/// Why one part of a new configuration cannot be applied live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A LUN in use would be removed, shrunk or re-pointed.
    LunInUse {
        target: String,
        lun: u64,
        what: String,
        sessions: Vec<String>,
    },
    /// A change that is never live (needs a restart).
    NotLive { what: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::LunInUse {
                target,
                lun,
                what,
                sessions,
            } => write!(
                f,
                "{target}: LUN {lun} {what} while in use by {}",
                sessions.join(", ")
            ),
            Refusal::NotLive { what } => write!(f, "{what} cannot change while the target runs"),
        }
    }
}

/// The whole reload refused: nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reload refused, nothing applied: {}", list(.0))]
pub struct ReloadRefused(pub Vec<Refusal>);

fn list(r: &[Refusal]) -> String {
    r.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The changes a reload makes, in the order they are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
}

/// Plan a reload from `old` (running) to `new`, given the live sessions.
pub fn plan(old: &Config, new: &Config, sessions: &[SessionUse]) -> Result<Plan, ReloadRefused> {
    let mut changes = Vec::new();
    let mut refusals = Vec::new();
    global_changes(old, new, &mut changes, &mut refusals);
    let old_t: BTreeMap<&str, &TargetConfig> =
        old.targets.iter().map(|t| (t.name.as_str(), t)).collect();
    let new_t: BTreeMap<&str, &TargetConfig> =
        new.targets.iter().map(|t| (t.name.as_str(), t)).collect();
    for name in old_t.keys().filter(|n| !new_t.contains_key(*n)) {
        refusals.push(Refusal::NotLive {
            what: format!("target {name} (removed or renamed)"),
        });
    }
    for name in new_t.keys().filter(|n| !old_t.contains_key(*n)) {
        refusals.push(Refusal::NotLive {
            what: format!("target {name} (added)"),
        });
    }
    for (name, o) in &old_t {
        if let Some(n) = new_t.get(name) {
            target_changes(o, n, sessions, &mut changes, &mut refusals);
        }
    }
    if refusals.is_empty() {
        Ok(Plan { changes })
    } else {
        Err(ReloadRefused(refusals))
    }
}

fn global_changes(
    old: &Config,
    new: &Config,
    changes: &mut Vec<Change>,
    refusals: &mut Vec<Refusal>,
) {
    if old.data_dir != new.data_dir {
        refusals.push(Refusal::NotLive {
            what: "data_dir".into(),
        });
    }
    if toml_of(&old.iscsi) != toml_of(&new.iscsi) {
        refusals.push(Refusal::NotLive {
            what: "[iscsi] settings".into(),
        });
    }
    if toml_of(&old.limits) != toml_of(&new.limits) {
        refusals.push(Refusal::NotLive {
            what: "[limits] settings".into(),
        });
    }
    if old.admin_socket != new.admin_socket {
        refusals.push(Refusal::NotLive {
            what: "admin_socket".into(),
        });
    }
    if old.metrics != new.metrics {
        refusals.push(Refusal::NotLive {
            what: "metrics".into(),
        });
    }
    // Served images keep the connection they were opened with; adding [ceph] (for a
    // first RBD LUN) is fine.
    if old.ceph.is_some() && old.ceph != new.ceph {
        refusals.push(Refusal::NotLive {
            what: "[ceph] settings".into(),
        });
    }
    if old.discovery_chap != new.discovery_chap {
        changes.push(Change::ChapChanged {
            scope: "discovery".into(),
        });
    }
}

/// Settings structs carry no PartialEq; their serialized form compares them whole,
/// so a key added later is covered without touching this file.
fn toml_of<T: serde::Serialize>(v: &T) -> String {
    toml::to_string(v).unwrap_or_default()
}

fn target_changes(
    o: &TargetConfig,
    n: &TargetConfig,
    sessions: &[SessionUse],
    changes: &mut Vec<Change>,
    refusals: &mut Vec<Refusal>,
) {
    let name = &o.name;
    if o.alias != n.alias {
        refusals.push(Refusal::NotLive {
            what: format!("{name}: alias"),
        });
    }
    portal_changes(o, n, changes, refusals);
    lun_changes(o, n, sessions, changes, refusals);
    acl_changes(o, n, changes);
    if o.chap != n.chap {
        changes.push(Change::ChapChanged {
            scope: name.clone(),
        });
    }
}

fn portal_changes(
    o: &TargetConfig,
    n: &TargetConfig,
    changes: &mut Vec<Change>,
    refusals: &mut Vec<Refusal>,
) {
    let key = |p: &super::config::PortalConfig| (p.listen.clone(), p.tpgt);
    let old: Vec<_> = o.portals.iter().map(key).collect();
    let new: Vec<_> = n.portals.iter().map(key).collect();
    for (listen, tpgt) in old.iter().filter(|p| !new.contains(p)) {
        refusals.push(Refusal::NotLive {
            what: format!("{}: portal {listen} (tpgt {tpgt}) removal", o.name),
        });
    }
    for (listen, _) in new.iter().filter(|p| !old.contains(p)) {
        changes.push(Change::PortalAdded {
            target: o.name.clone(),
            listen: listen.clone(),
        });
    }
}

fn users_of(target: &str, lun: u64, sessions: &[SessionUse]) -> Vec<String> {
    sessions
        .iter()
        .filter(|s| s.target == target && s.luns.contains(&lun))
        .map(|s| format!("{} (ISID {})", s.initiator, s.isid))
        .collect()
}

fn lun_changes(
    o: &TargetConfig,
    n: &TargetConfig,
    sessions: &[SessionUse],
    changes: &mut Vec<Change>,
    refusals: &mut Vec<Refusal>,
) {
    let new: BTreeMap<u64, &LunConfig> = n.luns.iter().map(|l| (l.id, l)).collect();
    let old: BTreeMap<u64, &LunConfig> = o.luns.iter().map(|l| (l.id, l)).collect();
    for (id, ol) in &old {
        let what = match new.get(id) {
            None => Some("removal".to_string()),
            Some(nl) => lun_refusal(ol, nl),
        };
        if let Some(what) = what {
            refuse_lun(&o.name, *id, what, sessions, refusals);
        } else if let Some(nl) = new.get(id).filter(|nl| nl.size.0 > ol.size.0) {
            changes.push(Change::LunGrown {
                target: o.name.clone(),
                lun: *id,
                from: ol.size.0,
                to: nl.size.0,
            });
        }
    }
    for id in new.keys().filter(|id| !old.contains_key(id)) {
        changes.push(Change::LunAdded {
            target: o.name.clone(),
            lun: *id,
        });
    }
}

fn refuse_lun(
    target: &str,
    lun: u64,
    what: String,
    sessions: &[SessionUse],
    refusals: &mut Vec<Refusal>,
) {
    let users = users_of(target, lun, sessions);
    if users.is_empty() {
        // Nobody sees it, yet its LU may hold reservations and data; changing its
        // identity live is still not supported, only refused without names.
        refusals.push(Refusal::NotLive {
            what: format!("{target}: LUN {lun} {what}"),
        });
    } else {
        refusals.push(Refusal::LunInUse {
            target: target.into(),
            lun,
            what,
            sessions: users,
        });
    }
}

/// What makes a LUN change unsafe live, if anything (growth is safe).
fn lun_refusal(o: &LunConfig, n: &LunConfig) -> Option<String> {
    if n.size.0 < o.size.0 {
        return Some(format!("shrink from {} to {} bytes", o.size.0, n.size.0));
    }
    if o.path != n.path || o.rbd != n.rbd {
        return Some(match &n.rbd {
            Some(spec) => format!("backing store change to rbd image {spec}"),
            None => format!("backing file change to {}", n.path.display()),
        });
    }
    if o.block_size != n.block_size || o.physical_block_size != n.physical_block_size {
        return Some("block size change".into());
    }
    let same_identity = o.serial == n.serial
        && o.read_only == n.read_only
        && o.write_cache == n.write_cache
        && o.thin_provisioning == n.thin_provisioning
        && o.product == n.product;
    (!same_identity).then(|| "serial/read_only/write_cache/thin_provisioning/product change".into())
}

fn acl_changes(o: &TargetConfig, n: &TargetConfig, changes: &mut Vec<Change>) {
    let old: BTreeMap<&str, &AclConfig> = o.acl.iter().map(|a| (a.initiator.as_str(), a)).collect();
    let new: BTreeMap<&str, &AclConfig> = n.acl.iter().map(|a| (a.initiator.as_str(), a)).collect();
    let target = || o.name.clone();
    for (init, oa) in &old {
        match new.get(init) {
            None => changes.push(Change::AclRemoved {
                target: target(),
                initiator: init.to_string(),
            }),
            Some(na) => {
                if oa.luns != na.luns {
                    changes.push(Change::LunMaskChanged {
                        target: target(),
                        initiator: init.to_string(),
                    });
                }
                if oa.chap != na.chap {
                    changes.push(Change::ChapChanged {
                        scope: format!("{} ACL {init}", o.name),
                    });
                }
            }
        }
    }
    for init in new.keys().filter(|i| !old.contains_key(*i)) {
        changes.push(Change::AclAdded {
            target: target(),
            initiator: init.to_string(),
        });
    }
}

#[cfg(test)]
#[path = "reload_tests.rs"]
mod tests;
