//! `holdfast agent`: validate the node configuration, or run the agent until SIGINT or
//! SIGTERM (then hand the groups over).
use crate::agent::config::{self, ValidNodeConfig};
use crate::metrics::http::{MetricsServer, Render};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// `holdfast agent --config F [--check] [--metrics ADDR]`.
pub fn main(path: &Path, check: bool, metrics: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut cfg = config::load_file(path)?;
    if metrics.is_some() {
        cfg.config.node.metrics = metrics;
    }
    if check {
        println!(
            "configuration {} is valid: node {} (id {}) of cluster {}, initiator {}, VM \
             initiator {}, {} group(s)",
            cfg.source,
            cfg.node().name,
            cfg.node().id,
            cfg.node().cluster,
            cfg.initiator_name,
            cfg.vm_initiator_name,
            cfg.config.groups.len()
        );
        print!("{}", toml::to_string_pretty(&cfg.config)?);
        return Ok(());
    }
    run(cfg)
}

/// The single-instance lock file in the state directory.
pub const LOCK_FILE: &str = "agent.lock";

fn run(cfg: ValidNodeConfig) -> anyhow::Result<()> {
    // Before the agent kills VMs left by an earlier run: a second agent on this state
    // directory must not kill the first one's VMs.
    let state_dir = &cfg.config.node.state_dir;
    let _lock = crate::service::lock::lock_dir(state_dir, LOCK_FILE, "holdfast agent")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("holdfast-agent")
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        if let Some(addr) = cfg.config.node.metrics {
            serve_metrics(addr, rx.clone()).await?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let agent = tokio::spawn(crate::agent::node::run(cfg, rx));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; handing groups over"),
            _ = term.recv() => tracing::info!("SIGTERM received; handing groups over"),
        }
        let _ = tx.send(true);
        agent.await.context("agent task failed")??;
        Ok(())
    })
}

/// Turn the agent's metrics on and serve them on `addr` until `stop`.
async fn serve_metrics(
    addr: SocketAddr,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let server = MetricsServer::bind(addr)
        .await
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    tracing::info!(addr = %server.local_addr()?, "metrics endpoint: GET /metrics");
    let metrics = crate::metrics::agent::install();
    let render: Render = Arc::new(move |f| metrics.render(f));
    tokio::spawn(server.serve(render, stop));
    Ok(())
}
