//! `ctl serve` (a read-only status page: one self-contained HTML page whose script
//! polls /api/status every second) and `ctl status --watch` (the same snapshot redrawn
//! in the terminal). Both keep one ctl session and judge liveness by when each node's
//! heartbeat last moved, on this process's monotonic clock.

use super::ctl::{self, ClusterStatus, Ctl};
use super::ctl_events::EventView;
use crate::agent::config::ValidNodeConfig;
use crate::agent::event_ring::RingEntry;
use crate::agent::quorum::HeartbeatSlot;
use crate::agent::wall_ms;
use crate::http::{Handler, HttpServer, Request, Response};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("status_page.html");
/// Events the page and the watch show.
const RECENT_EVENTS: usize = 40;

/// What /api/status returns.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub ok: bool,
    pub error: Option<String>,
    pub updated: String,
    pub status: Option<ClusterStatus>,
    /// Groups whose VM is paused through a storage outage: on this node (its
    /// paused.json), or as the event ring last said.
    pub paused_groups: Vec<String>,
    pub events: Vec<EventView>,
    pub events_error: Option<String>,
}

impl Snapshot {
    fn failed(e: String) -> Snapshot {
        Snapshot {
            ok: false,
            error: Some(e),
            updated: crate::agent::alert::rfc3339_ms(wall_ms()),
            status: None,
            paused_groups: vec![],
            events: vec![],
            events_error: None,
        }
    }
}

/// Groups whose last pause-related ring event is a pause.
pub fn paused_by_ring(entries: &[RingEntry]) -> Vec<String> {
    let mut last: HashMap<&str, &str> = HashMap::new();
    for e in entries {
        if matches!(
            e.kind.as_str(),
            "paused" | "resumed" | "vm-killed" | "pause-expired" | "vm-started" | "offline"
        ) {
            last.insert(&e.group, &e.kind);
        }
    }
    let mut v: Vec<String> = last
        .into_iter()
        .filter(|(_, k)| *k == "paused")
        .map(|(g, _)| g.to_string())
        .collect();
    v.sort();
    v
}

/// One ctl session, polled; liveness from when each heartbeat last moved.
struct Poller {
    cfg: ValidNodeConfig,
    ctl: Option<Ctl>,
    /// Per node id: (incarnation, counter) last seen and when it last changed.
    moved_at: HashMap<u16, (u64, u64, Instant)>,
}

impl Poller {
    fn new(cfg: ValidNodeConfig) -> Poller {
        Poller {
            cfg,
            ctl: None,
            moved_at: HashMap::new(),
        }
    }

    async fn poll(&mut self) -> Snapshot {
        match self.try_poll().await {
            Ok(s) => s,
            Err(e) => {
                if let Some(c) = self.ctl.take() {
                    c.close().await;
                }
                Snapshot::failed(e.to_string())
            }
        }
    }

    async fn try_poll(&mut self) -> Result<Snapshot, crate::agent::AgentError> {
        if self.ctl.is_none() {
            self.ctl = Some(Ctl::connect(self.cfg.clone()).await?);
            self.moved_at.clear();
        }
        let Some(c) = &self.ctl else {
            unreachable!("connected above")
        };
        let t = self.cfg.timings();
        if self.moved_at.is_empty() {
            // A first look: liveness needs the counters to be seen moving.
            note_moves(&mut self.moved_at, &c.quorum.read_image().await?.slots);
            tokio::time::sleep(t.heartbeat_interval * 2 + t.heartbeat_interval / 2).await;
        }
        let img = c.quorum.read_image().await?;
        let now = Instant::now();
        note_moves(&mut self.moved_at, &img.slots);
        let dead_after = t.dead_after;
        let moved_at = &self.moved_at;
        let moved = |s: &HeartbeatSlot| {
            moved_at
                .get(&s.node_id)
                .is_some_and(|m| now.duration_since(m.2) < dead_after)
        };
        let mut status = c.status_of(&img, dead_after, &moved).await;
        status.paused_here =
            ctl::paused_here(&self.cfg.config.node.state_dir, wall_ms()).unwrap_or_default();
        let (events, events_error, mut paused) = match c.events().await {
            Ok((img, all)) => {
                let skip = all.len().saturating_sub(RECENT_EVENTS);
                let v = all[skip..].iter().map(|e| EventView::of(&img, e)).collect();
                (v, None, paused_by_ring(&all))
            }
            Err(e) => (vec![], Some(e.to_string()), vec![]),
        };
        paused.extend(status.paused_here.iter().map(|p| p.group.clone()));
        paused.sort();
        paused.dedup();
        Ok(Snapshot {
            ok: true,
            error: None,
            updated: crate::agent::alert::rfc3339_ms(wall_ms()),
            status: Some(status),
            paused_groups: paused,
            events,
            events_error,
        })
    }
}

fn note_moves(moved_at: &mut HashMap<u16, (u64, u64, Instant)>, slots: &[Option<HeartbeatSlot>]) {
    let now = Instant::now();
    for s in slots.iter().flatten() {
        let e = moved_at
            .entry(s.node_id)
            .or_insert((s.incarnation, s.counter, now));
        if (e.0, e.1) != (s.incarnation, s.counter) {
            *e = (s.incarnation, s.counter, now);
        }
    }
}

/// `ctl status --watch`: clear the screen and print the snapshot, every second.
pub async fn watch(cfg: ValidNodeConfig) -> anyhow::Result<()> {
    let mut p = Poller::new(cfg);
    loop {
        let t0 = Instant::now();
        let s = p.poll().await;
        let mut out = format!("\x1b[H\x1b[2Jholdfast status at {}\n", s.updated);
        match &s.status {
            Some(st) => out.push_str(&st.to_string()),
            None => out.push_str(&format!(
                "cannot read the cluster: {}\n",
                s.error.as_deref().unwrap_or("?")
            )),
        }
        if !s.events.is_empty() {
            out.push_str("\nRECENT EVENTS\n");
            let skip = s.events.len().saturating_sub(10);
            for e in &s.events[skip..] {
                out.push_str(&format!("  {e}\n"));
            }
        }
        print!("{out}");
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
    }
}

/// `ctl serve`: the page on `listen`, the snapshot refreshed every second.
pub async fn serve(cfg: ValidNodeConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let server = HttpServer::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("status page on http://{}/", server.local_addr()?);
    let snap = Arc::new(Mutex::new(serde_json::to_string(&Snapshot::failed(
        "starting: reading the cluster".into(),
    ))?));
    let s2 = snap.clone();
    tokio::spawn(async move {
        let mut p = Poller::new(cfg);
        loop {
            let t0 = Instant::now();
            let s = p.poll().await;
            if let (Ok(j), Ok(mut cur)) = (serde_json::to_string(&s), s2.lock()) {
                *cur = j;
            }
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed())).await;
        }
    });
    let (_stop, never) = tokio::sync::watch::channel(false);
    server.serve(page_handler(snap), never).await;
    Ok(())
}

/// The page, its JSON snapshot, 404 for anything else.
fn page_handler(snap: Arc<Mutex<String>>) -> Handler {
    Arc::new(move |r: &Request| match r.path.as_str() {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", PAGE.into()),
        "/api/status" => {
            let body = snap.lock().map(|s| s.clone()).unwrap_or_default();
            Response::ok("application/json", body)
        }
        _ => Response::not_found(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::event_ring::Source;

    #[test]
    fn requests_are_routed_or_refused() {
        let h = page_handler(Arc::new(Mutex::new("{\"cluster\":\"c\"}".into())));
        let status = |req: &[u8]| {
            let reply = crate::http::respond(crate::http::parse_request(req), &h);
            let text = String::from_utf8_lossy(&reply).into_owned();
            text.split(' ')
                .nth(1)
                .unwrap_or("")
                .parse::<u16>()
                .unwrap_or(0)
        };
        assert_eq!(status(b"GET /api/status?x=1 HTTP/1.1\r\nHost: a"), 200);
        assert_eq!(status(b"GET / HTTP/1.0"), 200);
        assert_eq!(status(b"GET /nothing HTTP/1.1"), 404);
        assert_eq!(status(b"POST / HTTP/1.1"), 405);
        assert_eq!(status(b"GET /"), 400);
        assert_eq!(status(b"\xff\xfe / HTTP/1.1"), 400);
        assert_eq!(status(b"GET x HTTP/1.1"), 400);
        assert_eq!(status(b""), 400);
    }

    #[test]
    fn a_group_is_paused_until_a_later_event_says_otherwise() {
        let e = |g: &str, k: &str| RingEntry {
            node_id: 1,
            seq: 1,
            wall_ms: 0,
            source: Source::Agent,
            kind: k.into(),
            group: g.into(),
            reason: String::new(),
            target_node: 0,
            epoch: 0,
            actor: String::new(),
        };
        let v = [
            e("a", "paused"),
            e("b", "paused"),
            e("b", "resumed"),
            e("c", "claimed"),
        ];
        assert_eq!(paused_by_ring(&v), ["a"]);
    }
}
