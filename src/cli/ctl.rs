//! `holdfast ctl`: administer a cluster through its quorum LUN. Requests (offline, move,
//! freeze, drain…) are COMPARE AND WRITE changes of the shared records that the agents
//! act on; no daemon socket is involved, so ctl works from any node that can reach the
//! target. `status` reads only.

use crate::agent::claim::{self, Identity};
use crate::agent::config::ValidNodeConfig;
use crate::agent::event_ring;
use crate::agent::quorum::{
    self, AdminState, GroupRecord, GroupState, QuorumHeader, QuorumImage, QuorumLayout,
};
use crate::agent::quorum_disk::{bounded, QuorumDisk};
use crate::agent::record_update::{self, Decision, Updated};
use crate::agent::{wall_ms, AgentError};
use crate::initiator::{connect, connect_portals, ConnectOptions, IscsiUrl, Session};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// A ctl connection: logged in with the node's initiator name and a ctl ISID (its own
/// I_T nexus), registered with the node's key only while it changes records.
pub struct Ctl {
    pub cfg: ValidNodeConfig,
    pub session: Session,
    pub quorum: QuorumDisk,
    me: Identity,
    registered: bool,
}

impl Ctl {
    pub async fn connect(cfg: ValidNodeConfig) -> Result<Ctl, AgentError> {
        let t = cfg.timings().io_timeout.max(Duration::from_secs(5));
        let n = &cfg.config.node;
        let me = Identity {
            key: quorum::pr_key(&n.cluster, n.id),
            initiator_name: cfg.initiator_name.clone(),
            isid: quorum::node_isid(n.id, quorum::ISID_CTL),
            vm_initiator_name: None,
        };
        let opts = cfg.connect_options(me.isid, t);
        let (s, _) = connect_portals(&cfg.config.target.name, &cfg.portals, &opts)
            .await
            .map_err(AgentError::from_connect)?;
        let (quorum, _) =
            QuorumDisk::open(s.clone(), cfg.config.target.quorum_lun, &n.cluster, t).await?;
        Ok(Ctl {
            cfg,
            session: s,
            quorum,
            me,
            registered: false,
        })
    }

    async fn register(&mut self) -> Result<(), AgentError> {
        if !self.registered {
            claim::ensure_registered(
                &self.session,
                self.quorum.lun,
                &self.me,
                self.quorum.timeout,
            )
            .await?;
            self.registered = true;
        }
        Ok(())
    }

    /// Unregister our nexus (it never holds anything) and log out.
    pub async fn close(self) {
        if self.registered {
            let _ = bounded(
                self.quorum.timeout,
                "PR OUT REGISTER (unregister)",
                self.session
                    .register(self.quorum.lun, self.me.key, 0, &claim::aptpl()),
            )
            .await;
        }
        let _ = self.session.logout().await;
    }

    /// COMPARE AND WRITE group `name` with `f` (an `Err` refuses with its message).
    pub async fn update_group(
        &mut self,
        name: &str,
        f: impl Fn(&GroupRecord, &QuorumImage) -> Result<GroupRecord, String>,
    ) -> Result<GroupRecord, AgentError> {
        self.register().await?;
        let r = record_update::update_group(&self.quorum, name, |rec, img| match f(rec, img) {
            Ok(n) => Decision::Write(n),
            Err(why) => Decision::Refuse(why),
        })
        .await?;
        match r {
            Updated::Written(n) => Ok(n),
            Updated::Refused(why) => Err(AgentError::Other(why)),
            Updated::NoRecord => Err(AgentError::Other(format!(
                "no group {name:?} on the quorum LUN (groups appear once an agent that \
                 has them in its config has started)"
            ))),
            Updated::Skipped | Updated::Contended => Err(AgentError::Other(format!(
                "group {name:?}: the record keeps changing; try again"
            ))),
        }
    }

    /// Change node `id`'s admin record.
    pub async fn update_admin(
        &mut self,
        id: u16,
        f: impl Fn(&mut quorum::NodeAdmin),
    ) -> Result<(), AgentError> {
        self.register().await?;
        let r = record_update::update_admin(&self.quorum, id, |a| {
            let mut n = a.clone();
            f(&mut n);
            Decision::Write(n)
        })
        .await?;
        match r {
            Updated::Written(_) => Ok(()),
            _ => Err(AgentError::Other(
                "node record keeps changing; try again".into(),
            )),
        }
    }

    /// Node id by name (from the heartbeat slots) or by number.
    pub fn resolve_node(img: &QuorumImage, node: &str) -> Result<u16, AgentError> {
        if let Some(id) = img.node_id(node) {
            return Ok(id);
        }
        if let Ok(id) = node.parse::<u16>() {
            if img.slot(id).is_some() {
                return Ok(id);
            }
        }
        Err(AgentError::Other(format!(
            "no node {node:?} has ever heartbeated on this quorum LUN"
        )))
    }

    pub async fn status(&self) -> Result<ClusterStatus, AgentError> {
        let hb = self.cfg.timings().heartbeat_interval;
        let first = self.quorum.read_image().await?;
        let t0 = Instant::now();
        // Liveness needs two looks: a node is alive if its counter moved in between.
        tokio::time::sleep(hb * 2 + hb / 2).await;
        let img = self.quorum.read_image().await?;
        let watched = t0.elapsed();
        let moved = |s: &quorum::HeartbeatSlot| {
            first
                .slot(s.node_id)
                .is_none_or(|b| b.counter != s.counter || b.incarnation != s.incarnation)
        };
        Ok(self.status_of(&img, watched, &moved).await)
    }

    /// The status from `img`, a node being alive when `moved` says its heartbeat moved
    /// while it was watched for `watched`.
    pub async fn status_of(
        &self,
        img: &QuorumImage,
        watched: Duration,
        moved: &(dyn Fn(&quorum::HeartbeatSlot) -> bool + Sync),
    ) -> ClusterStatus {
        let now_wall = wall_ms();
        let cluster = &self.cfg.config.node.cluster;
        ClusterStatus {
            cluster: cluster.clone(),
            watched_ms: watched.as_millis() as u64,
            nodes: node_statuses(cluster, img, now_wall, moved),
            groups: group_statuses(img, now_wall),
            luns: self.lun_statuses(img).await,
            paused_here: vec![],
        }
    }

    /// The keys and the reservation of the quorum LUN and of every group's disks.
    async fn lun_statuses(&self, img: &QuorumImage) -> Vec<LunStatus> {
        let mut luns = vec![(self.quorum.lun, "quorum".to_string())];
        for g in &self.cfg.config.groups {
            for d in &g.disks {
                luns.push((*d, g.name.clone()));
            }
        }
        let cluster = &self.cfg.config.node.cluster;
        let t = self.quorum.timeout;
        let key_name = |k: u64| match quorum::node_of_key(cluster, k) {
            Some(id) => format!("{k:#018x} ({})", node_label(img, id)),
            None => format!("{k:#018x}"),
        };
        let mut reservations = Vec::new();
        for (lun, what) in luns {
            let keys = bounded(t, "READ KEYS", self.session.read_keys(lun)).await;
            let res = bounded(t, "READ RESERVATION", self.session.read_reservation(lun)).await;
            reservations.push(match (keys, res) {
                (Ok((generation, keys)), Ok((_, res))) => LunStatus {
                    lun,
                    used_by: what,
                    generation: Some(generation),
                    keys: keys.into_iter().map(key_name).collect(),
                    reservation: res.map(|r| {
                        format!(
                            "{} by {}",
                            r.type_.short_name(),
                            if r.key == 0 {
                                "all registrants".into()
                            } else {
                                key_name(r.key)
                            }
                        )
                    }),
                    error: None,
                },
                (Err(e), _) | (_, Err(e)) => LunStatus {
                    lun,
                    used_by: what,
                    generation: None,
                    keys: vec![],
                    reservation: None,
                    error: Some(e.to_string()),
                },
            });
        }
        reservations
    }
}

/// A node's name as the quorum LUN knows it ("-" for no node).
pub fn node_label(img: &QuorumImage, id: u16) -> String {
    img.slot(id).map(|s| s.name.clone()).unwrap_or_else(|| {
        if id == 0 {
            "-".into()
        } else {
            format!("node{id}")
        }
    })
}

/// Every node with a slot; alive if `moved` says its heartbeat moved.
fn node_statuses(
    cluster: &str,
    img: &QuorumImage,
    now_wall: u64,
    moved: &(dyn Fn(&quorum::HeartbeatSlot) -> bool + Sync),
) -> Vec<NodeStatus> {
    img.slots
        .iter()
        .flatten()
        .map(|s| {
            let admin = img.admin(s.node_id);
            NodeStatus {
                id: s.node_id,
                name: s.name.clone(),
                state: s.state.name().to_string(),
                alive: moved(s) && s.state == quorum::NodeState::Active,
                fenced: admin.fence_count > 0 && admin.fenced_incarnation == s.incarnation,
                heartbeat_counter: s.counter,
                incarnation: format!("{:#x}", s.incarnation),
                last_heartbeat_ms_ago: now_wall.saturating_sub(s.wall_ms),
                drained: admin.drained,
                fenced_count: admin.fence_count,
                last_fenced_by: (admin.fence_count > 0).then_some(admin.fenced_by),
                pr_key: format!("{:#018x}", quorum::pr_key(cluster, s.node_id)),
                groups_owned: img.load(s.node_id),
            }
        })
        .collect()
}

fn group_statuses(img: &QuorumImage, now_wall: u64) -> Vec<GroupStatus> {
    let name_of = |id: u16| node_label(img, id);
    img.groups
        .iter()
        .map(|(_, r)| GroupStatus {
            name: r.name.clone(),
            owner: (r.owner != 0).then(|| name_of(r.owner)),
            state: r.state_name().to_string(),
            admin: r.admin.name().to_string(),
            frozen: r.frozen,
            epoch: r.epoch,
            restarts: r.restarts,
            move_to: (r.move_to != 0).then(|| name_of(r.move_to)),
            migrate_to: r.migration.as_ref().map(|m| name_of(m.to)),
            saved: r.saved,
            failed_on: (1..=64u16)
                .filter(|i| r.failed_on_node(*i))
                .map(name_of)
                .collect(),
            reason: r.reason.clone(),
            changed_ms_ago: now_wall.saturating_sub(r.changed_wall_ms),
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    /// How long the heartbeat counters were watched to judge liveness.
    pub watched_ms: u64,
    pub nodes: Vec<NodeStatus>,
    pub groups: Vec<GroupStatus>,
    pub luns: Vec<LunStatus>,
    /// Groups this node's agent keeps paused (from its paused.json, not the LUN).
    pub paused_here: Vec<PausedHere>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub id: u16,
    pub name: String,
    pub state: String,
    pub alive: bool,
    /// A peer fenced this incarnation (it has not rejoined since).
    pub fenced: bool,
    pub heartbeat_counter: u64,
    pub incarnation: String,
    pub last_heartbeat_ms_ago: u64,
    pub drained: bool,
    pub fenced_count: u32,
    pub last_fenced_by: Option<u16>,
    pub pr_key: String,
    pub groups_owned: usize,
}

#[derive(Debug, Serialize)]
pub struct GroupStatus {
    pub name: String,
    pub owner: Option<String>,
    pub state: String,
    pub admin: String,
    pub frozen: bool,
    pub epoch: u64,
    pub restarts: u16,
    pub move_to: Option<String>,
    /// A live migration is requested or under way to this node.
    pub migrate_to: Option<String>,
    pub saved: bool,
    pub failed_on: Vec<String>,
    pub reason: String,
    pub changed_ms_ago: u64,
}

#[derive(Debug, Serialize)]
pub struct LunStatus {
    pub lun: u64,
    pub used_by: String,
    pub generation: Option<u32>,
    pub keys: Vec<String>,
    pub reservation: Option<String>,
    pub error: Option<String>,
}

impl std::fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "cluster {}", self.cluster)?;
        writeln!(f, "\nNODES")?;
        writeln!(
            f,
            "  {:>3} {:<12} {:<12} {:<6} {:>9} {:>6} {:<8} fenced",
            "id", "name", "state", "alive", "last hb", "groups", "drained"
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "  {:>3} {:<12} {:<12} {:<6} {:>7}ms {:>6} {:<8} {}",
                n.id,
                n.name,
                n.state,
                if n.alive { "yes" } else { "NO" },
                n.last_heartbeat_ms_ago,
                n.groups_owned,
                if n.drained { "yes" } else { "no" },
                match n.last_fenced_by {
                    Some(b) => format!("{}x, last by node {b}", n.fenced_count),
                    None => "never".into(),
                }
            )?;
        }
        writeln!(f, "\nGROUPS")?;
        writeln!(
            f,
            "  {:<16} {:<12} {:<9} {:<8} {:>6} {:>8}  reason",
            "name", "owner", "state", "admin", "epoch", "restarts"
        )?;
        for g in &self.groups {
            let mut flags = Vec::new();
            if g.frozen {
                flags.push("frozen".to_string());
            }
            if let Some(m) = &g.move_to {
                flags.push(format!("moving to {m}"));
            }
            if let Some(m) = &g.migrate_to {
                flags.push(format!("migrating live to {m}"));
            }
            if g.saved {
                flags.push("saved state".into());
            }
            if !g.failed_on.is_empty() {
                flags.push(format!("failed on {}", g.failed_on.join(",")));
            }
            writeln!(
                f,
                "  {:<16} {:<12} {:<9} {:<8} {:>6} {:>8}  {}{}",
                g.name,
                g.owner.as_deref().unwrap_or("-"),
                g.state,
                g.admin,
                g.epoch,
                g.restarts,
                g.reason,
                if flags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", flags.join("; "))
                }
            )?;
        }
        if !self.paused_here.is_empty() {
            writeln!(f)?;
            write!(f, "{}", PausedList(&self.paused_here))?;
        }
        writeln!(f, "\nRESERVATIONS")?;
        for l in &self.luns {
            match &l.error {
                Some(e) => writeln!(f, "  LUN {:<4} {:<16} error: {e}", l.lun, l.used_by)?,
                None => writeln!(
                    f,
                    "  LUN {:<4} {:<16} gen {:<5} {}; keys: {}",
                    l.lun,
                    l.used_by,
                    l.generation.unwrap_or(0),
                    l.reservation.as_deref().unwrap_or("no reservation"),
                    if l.keys.is_empty() {
                        "none".into()
                    } else {
                        l.keys.join(", ")
                    }
                )?,
            }
        }
        Ok(())
    }
}

/// A group that this node's agent keeps paused through a storage outage, as the
/// agent's STATE_DIR/paused.json lists it. During an outage the quorum LUN cannot be
/// read, and its record still says "running": this file is where the truth is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedHere {
    pub group: String,
    /// When the pause began (wall clock, ms since the epoch).
    pub since_wall_ms: u64,
    pub why: String,
    /// How long it has lasted when ctl read the file.
    #[serde(default)]
    pub paused_for_ms: u64,
}

#[derive(Deserialize)]
struct PauseFile {
    paused: Vec<PausedHere>,
}

/// The groups paused on this node, from STATE_DIR/paused.json (written by the agent
/// whenever the set changes); none if there is no such file (no agent ran here).
pub fn paused_here(state_dir: &Path, now_wall: u64) -> Result<Vec<PausedHere>, String> {
    let path = state_dir.join(crate::agent::node::PAUSE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file: PauseFile =
        serde_json::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    Ok(file
        .paused
        .into_iter()
        .map(|p| PausedHere {
            paused_for_ms: now_wall.saturating_sub(p.since_wall_ms),
            ..p
        })
        .collect())
}

/// The "PAUSED ON THIS NODE" section of `ctl status`.
pub struct PausedList<'a>(pub &'a [PausedHere]);

impl std::fmt::Display for PausedList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "PAUSED ON THIS NODE (storage outage)")?;
        writeln!(
            f,
            "  {:<16} {:<20} {:>10}  why",
            "name", "paused since (UTC)", "for"
        )?;
        for p in self.0 {
            let since = UNIX_EPOCH + Duration::from_millis(p.since_wall_ms);
            writeln!(
                f,
                "  {:<16} {:<20} {:>6} ago  {}",
                p.group,
                humantime::format_rfc3339_seconds(since).to_string(),
                format!("{} s", p.paused_for_ms / 1000),
                p.why
            )?;
        }
        Ok(())
    }
}

/// `ctl init-quorum`: write an empty layout and the header. Refuses a LUN that holds
/// anything (another cluster's quorum, a file system, a VM disk) unless `force`.
pub async fn init_quorum(
    url: &IscsiUrl,
    initiator_name: &str,
    cluster: &str,
    force: bool,
    chap: Option<(String, Vec<u8>)>,
) -> Result<String, AgentError> {
    if cluster.is_empty() || cluster.len() > 64 || !cluster.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(AgentError::Other(
            "the cluster name must be 1-64 printable ASCII characters without spaces".into(),
        ));
    }
    let mut opts = ConnectOptions::new(initiator_name);
    opts.chap = chap;
    let s = connect(url, &opts)
        .await
        .map_err(AgentError::from_connect)?;
    let t = Duration::from_secs(10);
    let (last, bs) = bounded(t, "READ CAPACITY", s.read_capacity16(url.lun)).await?;
    let layout = QuorumLayout::new(bs)?;
    let blocks = QuorumLayout::blocks();
    if last + 1 < blocks {
        return Err(AgentError::Other(format!(
            "LUN {} has {} blocks of {bs} bytes; a quorum LUN needs at least {blocks}",
            url.lun,
            last + 1
        )));
    }
    // Look at the start of the LUN (and the layout's area) for anything written.
    let probe =
        u32::try_from(blocks.max((1 << 20) / u64::from(bs)).min(last + 1)).unwrap_or(u32::MAX);
    let data = bounded(t, "READ", s.read16(url.lun, 0, probe, bs)).await?;
    if !force {
        match QuorumHeader::decode(&data[..bs as usize]) {
            Ok(h) => {
                return Err(AgentError::Other(format!(
                    "LUN {} is already the quorum LUN of cluster {:?}; use --force to wipe it \
                     (every node must be stopped)",
                    url.lun, h.cluster
                )))
            }
            Err(_) if data.iter().any(|&b| b != 0) => {
                return Err(AgentError::Other(format!(
                    "LUN {} is not empty (it may hold a file system or a VM disk); use --force \
                     to overwrite it",
                    url.lun
                )))
            }
            Err(_) => {}
        }
    }
    let header = QuorumHeader::new(cluster, bs, rand::random::<u64>() | 1);
    let mut image = vec![0u8; layout.bytes() as usize];
    image[..bs as usize].copy_from_slice(&header.encode()?);
    // Header last would be safer against a crash mid-format, but one FUA WRITE of the
    // whole layout is all-or-nothing per block and a half-formatted LUN is re-formatted.
    bounded(
        t,
        "WRITE",
        s.write16(url.lun, 0, Bytes::from(image), bs, true),
    )
    .await
    .map_err(|e| match e {
        AgentError::Conflict(_) => AgentError::Other(format!(
            "LUN {} is reserved (a cluster is using it): stop the agents and clear the \
             reservation (`holdfast pr URL clear`) before re-formatting",
            url.lun
        )),
        e => e,
    })?;
    let ring = if last + 1 >= event_ring::blocks_with_ring() {
        clear_ring(&s, url.lun, bs, t).await?;
        format!("an event ring of {} entries per node", event_ring::PER_NODE)
    } else {
        format!(
            "no event ring: it needs {} blocks",
            event_ring::blocks_with_ring()
        )
    };
    let _ = s.logout().await;
    Ok(format!(
        "formatted LUN {} of {} as the quorum LUN of cluster {cluster:?} ({} nodes, {} groups, {ring}, {bs}-byte blocks)",
        url.lun,
        url.target,
        crate::agent::config::MAX_NODE_ID,
        quorum::MAX_GROUPS
    ))
}

/// Zero the event ring (a re-format starts a new history), a bounded chunk per WRITE.
async fn clear_ring(s: &Session, lun: u64, bs: u32, t: Duration) -> Result<(), AgentError> {
    const CHUNK: u64 = 256;
    let (mut lba, end) = (event_ring::ring_lba(), event_ring::blocks_with_ring());
    while lba < end {
        let n = CHUNK.min(end - lba);
        let zeros = Bytes::from(vec![0u8; (n * u64::from(bs)) as usize]);
        bounded(t, "WRITE", s.write16(lun, lba, zeros, bs, true)).await?;
        lba += n;
    }
    Ok(())
}

/// Helpers for the ctl requests: each returns the new record or a refusal.
pub fn req_offline(r: &GroupRecord) -> Result<GroupRecord, String> {
    let mut n = r.clone();
    n.admin = AdminState::Offline;
    n.move_to = 0;
    if r.state == GroupState::Stopped {
        n.reason = "offline (maintenance) by the administrator".into();
    }
    Ok(n)
}

pub fn req_online(r: &GroupRecord) -> Result<GroupRecord, String> {
    let mut n = r.clone();
    n.admin = AdminState::Online;
    n.failed_on = 0;
    if r.state == GroupState::Stopped {
        n.reason = "online requested by the administrator".into();
    }
    Ok(n)
}

pub fn req_freeze(r: &GroupRecord, frozen: bool) -> Result<GroupRecord, String> {
    let mut n = r.clone();
    n.frozen = frozen;
    Ok(n)
}

pub fn req_move(r: &GroupRecord, to: u16) -> Result<GroupRecord, String> {
    if r.admin == AdminState::Offline {
        return Err(format!(
            "group {} is offline; `ctl online` it first",
            r.name
        ));
    }
    if r.owner == to {
        return Err(format!("group {} already runs on node {to}", r.name));
    }
    if r.failed_on_node(to) {
        return Err(format!(
            "group {} failed on node {to}; `ctl online` clears that first",
            r.name
        ));
    }
    let mut n = r.clone();
    n.move_to = to;
    Ok(n)
}

/// `ctl move --live`: the group must run (on a node other than `to`) with no other
/// migration or move pending; the destination then starts its incoming VM.
pub fn req_live_move(r: &GroupRecord, to: u16) -> Result<GroupRecord, String> {
    let mut n = req_move(r, to)?;
    if r.state != GroupState::Running || r.owner == 0 {
        return Err(format!(
            "group {} is {}: only a running group migrates live",
            r.name,
            r.state_name()
        ));
    }
    if let Some(m) = &r.migration {
        return Err(format!(
            "group {} is already migrating live to node {}",
            r.name, m.to
        ));
    }
    if r.move_to != 0 {
        return Err(format!(
            "group {} is already moving to node {}",
            r.name, r.move_to
        ));
    }
    n.move_to = 0;
    n.migration = Some(crate::agent::quorum::Migration {
        to,
        addr: String::new(),
    });
    Ok(n)
}

/// Why `group`'s VM, as this node's config describes it, cannot migrate live; `None`
/// when it can (or the group is not in this config: the destination then decides).
pub fn live_migration_refusal(cfg: &ValidNodeConfig, group: &str) -> Option<String> {
    let g = cfg.config.groups.iter().find(|g| g.name == group)?;
    let d = crate::agent::driver::build(&g.vm, std::path::PathBuf::from("/dev/null"));
    (!d.can_migrate_live()).then(|| {
        format!(
            "group {group}'s VM cannot migrate live: live migration needs the `qemu` driver, \
             the `process` driver with `qmp` set to its QEMU's -qmp socket, or the `libvirt` \
             driver (use `ctl move` without --live to move it by stop or save and start)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_move_refusal_names_every_driver_that_can_migrate_live() {
        let text = |vm: &str| {
            format!(
                "[node]\nname = \"n1\"\nid = 1\ncluster = \"lab\"\n[target]\n\
                 portals = [\"127.0.0.1:3260\"]\nname = \"iqn.2026-11.org.holdfast:s\"\n\
                 quorum_lun = 0\n[[group]]\nname = \"web\"\ndisks = [1]\n[group.vm]\n{vm}\n"
            )
        };
        let plain =
            crate::agent::config::parse(&text("driver = \"process\"\ncommand = [\"q\"]"), "t")
                .unwrap();
        let why = live_migration_refusal(&plain, "web").expect("refused");
        for name in ["`qemu` driver", "`process` driver with `qmp`", "`libvirt`"] {
            assert!(why.contains(name), "{name}: {why}");
        }
        assert!(!why.contains("  "), "{why}");
        assert_eq!(live_migration_refusal(&plain, "other"), None);
        for vm in [
            "driver = \"process\"\ncommand = [\"q\"]\nqmp = \"/run/q.qmp\"",
            "driver = \"qemu\"",
            "driver = \"libvirt\"\ndomain = \"web\"",
        ] {
            let c = crate::agent::config::parse(&text(vm), "t").unwrap();
            assert_eq!(live_migration_refusal(&c, "web"), None, "{vm}");
        }
    }

    #[test]
    fn a_live_move_is_asked_of_a_running_group_only_once() {
        let mut r = GroupRecord::new("web");
        assert!(req_live_move(&r, 2)
            .unwrap_err()
            .contains("only a running group"));
        r.owner = 1;
        r.owner_incarnation = 9;
        r.state = GroupState::Running;
        assert!(req_live_move(&r, 1)
            .unwrap_err()
            .contains("already runs on node 1"));
        let n = req_live_move(&r, 2).unwrap();
        assert_eq!(
            n.migration,
            Some(crate::agent::quorum::Migration {
                to: 2,
                addr: String::new()
            })
        );
        assert_eq!((n.owner, n.state, n.move_to), (1, GroupState::Running, 0));
        assert!(req_live_move(&n, 3)
            .unwrap_err()
            .contains("already migrating"));
        let moving = req_move(&r, 3).unwrap();
        assert!(req_live_move(&moving, 2)
            .unwrap_err()
            .contains("already moving"));
        let mut off = r.clone();
        off.admin = AdminState::Offline;
        assert!(req_live_move(&off, 2).unwrap_err().contains("offline"));
    }

    #[test]
    fn status_shows_a_group_migrating_once_the_destination_listens() {
        let mut r = GroupRecord::new("web");
        r.owner = 1;
        r.state = GroupState::Running;
        r.migration = Some(crate::agent::quorum::Migration {
            to: 2,
            addr: String::new(),
        });
        let img = |r: &GroupRecord| QuorumImage {
            groups: vec![(0, r.clone())],
            ..QuorumImage::default()
        };
        let g = &group_statuses(&img(&r), 0)[0];
        assert_eq!(
            (g.state.as_str(), g.migrate_to.as_deref()),
            ("running", Some("node2"))
        );
        r.migration.as_mut().unwrap().addr = "10.0.0.2:4444".into();
        let g = &group_statuses(&img(&r), 0)[0];
        assert_eq!(
            (g.state.as_str(), g.migrate_to.as_deref()),
            ("migrating", Some("node2"))
        );
    }

    #[test]
    fn no_pause_file_means_nothing_paused() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(paused_here(d.path(), 1_000), Ok(vec![]));
    }

    #[test]
    fn the_agents_pause_file_is_read_with_how_long_each_pause_lasted() {
        let d = tempfile::tempdir().unwrap();
        let text = r#"{"paused":[{"group":"web","since_wall_ms":1800000000000,
            "why":"no completed heartbeat write for 2100 ms"}]}"#;
        std::fs::write(d.path().join(crate::agent::node::PAUSE_FILE), text).unwrap();
        let p = paused_here(d.path(), 1_800_000_042_500).unwrap();
        assert_eq!(
            p,
            vec![PausedHere {
                group: "web".into(),
                since_wall_ms: 1_800_000_000_000,
                why: "no completed heartbeat write for 2100 ms".into(),
                paused_for_ms: 42_500,
            }]
        );
        let shown = PausedList(&p).to_string();
        assert!(shown.contains("PAUSED ON THIS NODE"), "{shown}");
        let line = shown.lines().last().unwrap();
        for part in ["web", "2027-01-15T08:00:00Z", "42 s ago", "2100 ms"] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
    }

    #[test]
    fn a_broken_pause_file_is_an_error_that_names_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::agent::node::PAUSE_FILE), "{").unwrap();
        let e = paused_here(d.path(), 0).unwrap_err();
        assert!(e.contains("paused.json"), "{e}");
    }
}
