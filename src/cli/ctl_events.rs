//! `ctl`'s side of the cluster event ring: who is asking (recorded with every change),
//! recording a change, reading every node's sub-ring, and `ctl events`.

use super::ctl::{node_label, Ctl};
use crate::agent::alert::rfc3339_ms;
use crate::agent::event_ring::{self, RingEntry, Source};
use crate::agent::quorum::QuorumImage;
use crate::agent::{ring_io, wall_ms, AgentError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Who asked for a change: "user@host". The user is the one behind sudo when there is
/// one ($SUDO_USER), else $USER, else the uid.
pub fn actor() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let user = ["SUDO_USER", "USER"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|u| !u.is_empty())
        .unwrap_or_else(|| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| format!("uid{}", m.uid()))
                .unwrap_or_else(|_| "unknown-user".into())
        });
    format!("{user}@{host}")
}

/// An entry as `ctl events` and the status page show it.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub time: String,
    pub wall_ms: u64,
    pub node_id: u16,
    pub node: String,
    pub seq: u64,
    pub source: Source,
    pub kind: String,
    pub group: String,
    pub reason: String,
    pub target_node: Option<String>,
    pub epoch: u64,
    pub actor: String,
}

impl EventView {
    pub fn of(img: &QuorumImage, e: &RingEntry) -> EventView {
        EventView {
            time: rfc3339_ms(e.wall_ms),
            wall_ms: e.wall_ms,
            node_id: e.node_id,
            node: node_label(img, e.node_id),
            seq: e.seq,
            source: e.source,
            kind: e.kind.clone(),
            group: e.group.clone(),
            reason: e.reason.clone(),
            target_node: (e.target_node != 0).then(|| node_label(img, e.target_node)),
            epoch: e.epoch,
            actor: e.actor.clone(),
        }
    }
}

impl std::fmt::Display for EventView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}  {:<10} {:<15} {:<12} {}",
            self.time,
            self.node,
            self.kind,
            if self.group.is_empty() {
                "-"
            } else {
                &self.group
            },
            self.reason
        )?;
        if let Some(t) = &self.target_node {
            write!(f, " [node {t}]")?;
        }
        if !self.actor.is_empty() {
            write!(f, " [by {}]", self.actor)?;
        }
        Ok(())
    }
}

impl Ctl {
    /// Record a change this ctl made in its node's sub-ring, with who asked. The change
    /// is made already: a failure here is a warning, not an error.
    pub async fn record(&self, kind: &str, group: &str, reason: &str, target: u16) {
        let e = RingEntry {
            node_id: self.cfg.config.node.id,
            seq: 0,
            wall_ms: wall_ms(),
            source: Source::Ctl,
            kind: kind.into(),
            group: group.into(),
            reason: reason.into(),
            target_node: target,
            epoch: 0,
            actor: actor(),
        };
        if let Err(e) = ring_io::append_fresh(&self.quorum, e).await {
            eprintln!(
                "holdfast ctl: warning: the change is made but not recorded in the event ring: {e}"
            );
        }
    }

    /// The image and every node's ring entries, merged by time.
    pub async fn events(&self) -> Result<(QuorumImage, Vec<RingEntry>), AgentError> {
        ring_io::check_room(&self.quorum).await?;
        let img = self.quorum.read_image().await?;
        let me = self.cfg.config.node.id;
        let ids: Vec<u16> = (1..=crate::agent::config::MAX_NODE_ID)
            .filter(|&id| {
                id == me
                    || img.slot(id).is_some()
                    || img
                        .admin_block(id)
                        .is_some_and(|b| b.iter().any(|&x| x != 0))
            })
            .collect();
        let merged = ring_io::read_merged(&self.quorum, &ids).await?;
        Ok((img, merged))
    }
}

/// `--since`: a duration back from now ("10m") or an RFC 3339 time.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_ms.saturating_sub(d.as_millis() as u64));
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        })
        .map_err(|_| {
            format!("--since {s:?}: give a duration (\"10m\") or a time (\"2026-12-01T10:00:00Z\")")
        })
}

fn print(v: &EventView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{v}");
    }
    Ok(())
}

/// `ctl events`: the selected entries, then with `follow` every new one as it lands.
pub async fn run(
    c: &Ctl,
    since: Option<&str>,
    n: Option<usize>,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let since = since
        .map(|s| parse_since(s, wall_ms()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (img, merged) = c.events().await?;
    let mut seen = BTreeMap::new();
    event_ring::unseen(&merged, &mut seen);
    for e in event_ring::select(merged, since, n) {
        print(&EventView::of(&img, &e), json)?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (img, merged) = c.events().await?;
        for e in event_ring::unseen(&merged, &mut seen) {
            print(&EventView::of(&img, &e), json)?;
        }
    }
}
