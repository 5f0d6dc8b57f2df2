//! `holdfast target`: load the configuration (or the embedded default), print what is
//! served, run the portals until SIGINT/SIGTERM.
use crate::server::config::{self, ValidConfig};
use crate::server::portal::Portals;
use crate::server::runtime::Runtime;
use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;

/// `holdfast target [--config F] [--check] [--print-default-config]`.
pub fn main(config: Option<&Path>, check: bool, print_default_config: bool) -> anyhow::Result<()> {
    if print_default_config {
        print!("{}", config::EMBEDDED_DEFAULT.trim_start());
        return Ok(());
    }
    let cfg = match config {
        Some(p) => config::load_file(p)?,
        None => config::parse(
            config::EMBEDDED_DEFAULT,
            "<embedded default>",
            Path::new(""),
        )?,
    };
    if check {
        print_summary(&cfg);
        return Ok(());
    }
    run(cfg)
}

fn print_summary(cfg: &ValidConfig) {
    println!(
        "configuration {} is valid; data in {}",
        cfg.source,
        cfg.data_dir.display()
    );
    for (ti, t) in cfg.config.targets.iter().enumerate() {
        for (addr, tpgt) in &cfg.portal_addrs[ti] {
            for l in &t.luns {
                println!(
                    "  iscsi://{addr}/{}/{}  ({} bytes, tpgt {tpgt}{})",
                    t.name,
                    l.id,
                    l.size.0,
                    if l.read_only { ", read-only" } else { "" }
                );
            }
        }
    }
}

fn run(cfg: ValidConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("holdfast")
        .build()?;
    rt.block_on(async move {
        let runtime = Arc::new(
            Runtime::build(&cfg)
                .with_context(|| format!("{}: cannot open the LUNs", cfg.source))?,
        );
        let portals = Portals::bind(&cfg.listen_addrs()).await?;
        print_summary(&cfg);
        tracing::info!(portals = ?portals.local_addrs(), "holdfast target ready");
        let (tx, rx) = tokio::sync::watch::channel(false);
        let serve = tokio::spawn(portals.serve(runtime, rx));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
        let _ = tx.send(true);
        serve.await.context("serving task failed")?;
        Ok(())
    })
}
