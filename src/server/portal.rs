//! Listening portals: accept connections and hand each to its own task; on shutdown stop
//! accepting, end sessions (running commands finish), flush every LUN.

use super::connection;
use super::runtime::Runtime;
use super::session::SessionRegistry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// A bound set of portals, ready to serve.
pub struct Portals {
    listeners: Vec<(SocketAddr, TcpListener)>,
}

impl Portals {
    /// Bind every address (fails before serving anything if one cannot be bound).
    pub async fn bind(addrs: &[SocketAddr]) -> std::io::Result<Portals> {
        let mut listeners = Vec::new();
        for a in addrs {
            let sock = if a.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.set_reuseaddr(true)?;
            sock.bind(*a)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            listeners.push((*a, sock.listen(1024)?));
        }
        Ok(Portals { listeners })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Serve until `shutdown` turns true; then end sessions and flush. Portals a live
    /// reload adds arrive through the runtime's portal sink and are served alike.
    pub async fn serve(self, rt: Arc<Runtime>, shutdown: watch::Receiver<bool>) {
        let reg = Arc::new(SessionRegistry::new());
        let mut conns = JoinSet::new();
        let mut accepts = JoinSet::new();
        let (sink, mut added) = tokio::sync::mpsc::unbounded_channel::<Portals>();
        rt.live.set_portal_sink(sink);
        let mut sets = (&mut accepts, &mut conns);
        for (listen, l) in self.listeners {
            serve_portal(&mut sets, (listen, l), &rt, &reg, &shutdown);
        }
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|v| *v) => break,
                Some(p) = added.recv() => for (listen, l) in p.listeners {
                    info!(%listen, "portal added by reload");
                    serve_portal(&mut sets, (listen, l), &rt, &reg, &shutdown);
                },
            }
        }
        info!("shutting down: no new connections; ending sessions");
        accepts.abort_all();
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(30), drain)
            .await
            .is_err()
        {
            warn!("sessions did not end within 30 s; flushing anyway");
        }
        let rt2 = rt.clone();
        let _ = tokio::task::spawn_blocking(move || rt2.flush_all()).await;
        info!(sessions = reg.len(), "shutdown complete");
    }
}

type PortalTasks<'a> = (&'a mut JoinSet<()>, &'a mut JoinSet<()>);

/// Accept on one listener and serve each connection in its own task.
fn serve_portal(
    (accepts, conns): &mut PortalTasks<'_>,
    (listen, l): (SocketAddr, TcpListener),
    rt: &Arc<Runtime>,
    reg: &Arc<SessionRegistry>,
    shutdown: &watch::Receiver<bool>,
) {
    let (ctx, mut crx) = tokio::sync::mpsc::unbounded_channel();
    accepts.spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    tracing::debug!(%peer, %listen, "connection accepted");
                    if ctx.send(s).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%listen, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let (rt, reg, sd2) = (rt.clone(), reg.clone(), shutdown.clone());
    conns.spawn(async move {
        let mut set = JoinSet::new();
        let mut sd3 = sd2.clone();
        loop {
            tokio::select! {
                s = crx.recv() => match s {
                    Some(s) => { set.spawn(connection::serve(rt.clone(), reg.clone(), s, listen, sd2.clone())); }
                    None => break,
                },
                _ = sd3.wait_for(|v| *v) => break,
                Some(_) = set.join_next(), if !set.is_empty() => {}
            }
        }
        // Connections see the same shutdown signal and wind down themselves.
        while set.join_next().await.is_some() {}
    });
}
