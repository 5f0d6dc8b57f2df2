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
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAGE: &str = include_str!("status_page.html");
/// Events the page and the watch show.
const RECENT_EVENTS: usize = 40;
/// A request head larger than this, or slower than [`REQUEST_TIMEOUT`], is refused.
const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("status page on http://{}/", l.local_addr()?);
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
    loop {
        let (conn, _) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "status page: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let snap = snap.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, &snap)).await;
        });
    }
}

/// Read one request head and answer it; the connection is closed after.
async fn answer(mut conn: TcpStream, snap: &Mutex<String>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(&mut conn, 431, "text/plain", "request too large\n").await;
        }
    }
    let body = snap.lock().map(|s| s.clone()).unwrap_or_default();
    match route(&buf) {
        Ok("/") | Ok("/index.html") => {
            respond(&mut conn, 200, "text/html; charset=utf-8", PAGE).await
        }
        Ok("/api/status") => respond(&mut conn, 200, "application/json", &body).await,
        Ok(_) => respond(&mut conn, 404, "text/plain", "not found\n").await,
        Err(code) => respond(&mut conn, code, "text/plain", "bad request\n").await,
    }
}

/// The path of a GET (query ignored), or the status code refusing the request.
pub fn route(head: &[u8]) -> Result<&str, u16> {
    let line = head.split(|&b| b == b'\r').next().ok_or(400u16)?;
    let line = std::str::from_utf8(line).map_err(|_| 400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || !target.starts_with('/') {
        return Err(400);
    }
    if method != "GET" && method != "HEAD" {
        return Err(405);
    }
    Ok(target.split('?').next().unwrap_or("/"))
}

async fn respond(conn: &mut TcpStream, code: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::event_ring::Source;

    #[test]
    fn requests_are_routed_or_refused() {
        assert_eq!(
            route(b"GET /api/status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok("/api/status")
        );
        assert_eq!(route(b"GET / HTTP/1.0\r\n\r\n"), Ok("/"));
        assert_eq!(route(b"POST / HTTP/1.1\r\n\r\n"), Err(405));
        assert_eq!(route(b"GET /\r\n\r\n"), Err(400));
        assert_eq!(route(b"\xff\xfe / HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(route(b"GET x HTTP/1.1\r\n\r\n"), Err(400));
        assert_eq!(route(b"\r\n\r\n"), Err(400));
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
