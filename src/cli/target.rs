//! `holdfast target`: load the configuration (or the embedded default), print what is
//! served, run the portals and the admin socket until SIGINT/SIGTERM, reload on SIGHUP;
//! and the admin clients `holdfast target reload|sessions|luns|show`.
use crate::metrics::http::{MetricsServer, Render};
use crate::server::admin::{self, AdminSocket, ConfigSource};
use crate::server::config::{self, ValidConfig};
use crate::server::portal::Portals;
use crate::server::runtime::Runtime;
use crate::service::{nofile, notify, status};
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// `holdfast target [--config F] [--check] [--print-default-config] [--admin-socket S]`,
/// or one of the admin clients.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TargetArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print what would be served, and exit.
    #[arg(long)]
    pub check: bool,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Admin socket path [default: the config's admin_socket, else <data_dir>/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR (GET /metrics), e.g. 127.0.0.1:9464
    /// [default: the config's metrics key, else none].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub action: Option<TargetAction>,
}

/// Talk to a running target through its admin socket.
#[derive(clap::Subcommand, Debug)]
pub enum TargetAction {
    /// Re-read the configuration file the target was started with and apply what can
    /// change live; a destructive change refuses the whole reload (exit status 1).
    Reload(ClientArgs),
    /// The logged-in sessions: initiator, ISID, TSIH, portal group, LUNs.
    Sessions(ClientArgs),
    /// The served LUNs with their current sizes.
    Luns(ClientArgs),
    /// The configuration being served (targets, portals, LUNs, ACLs).
    Show(ClientArgs),
}

/// Where the admin socket is, and how to print.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The target's configuration file (its admin_socket, else <data_dir>/admin.sock).
    #[arg(long, short, conflicts_with = "socket")]
    pub config: Option<PathBuf>,
    /// The admin socket itself.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the target's JSON answer as is.
    #[arg(long)]
    pub json: bool,
}

/// The single-instance lock file in the data directory.
pub const LOCK_FILE: &str = "target.lock";

/// Run `holdfast target …`; returns the exit status.
pub fn main(args: &TargetArgs) -> anyhow::Result<i32> {
    if let Some(action) = &args.action {
        return super::target_client::main(action);
    }
    if args.print_default_config {
        print!("{}", config::EMBEDDED_DEFAULT.trim_start());
        return Ok(0);
    }
    let cfg = load(
        args.config.as_deref(),
        args.admin_socket.as_deref(),
        args.metrics,
    )?;
    if args.check {
        print_summary(&cfg);
        // Secrets print as "<redacted>" (crate::secret::Secret).
        print!("{}", toml::to_string_pretty(&cfg.config)?);
        return Ok(0);
    }
    let config = args.config.clone();
    let socket = args.admin_socket.clone();
    let metrics = args.metrics;
    let source: Arc<ConfigSource> =
        Arc::new(move || load(config.as_deref(), socket.as_deref(), metrics));
    run(cfg, source)?;
    Ok(0)
}

/// The configuration file, or the embedded default; `admin_socket` and `metrics`
/// override its keys.
fn load(
    config: Option<&Path>,
    admin_socket: Option<&Path>,
    metrics: Option<std::net::SocketAddr>,
) -> Result<ValidConfig, config::ConfigError> {
    let mut cfg = read(config)?;
    if let Some(p) = admin_socket {
        cfg.admin_socket = p.to_path_buf();
    }
    if metrics.is_some() {
        cfg.config.metrics = metrics;
    }
    Ok(cfg)
}

fn read(config: Option<&Path>) -> Result<ValidConfig, config::ConfigError> {
    match config {
        Some(p) => config::load_file(p),
        None => config::parse(
            config::EMBEDDED_DEFAULT,
            "<embedded default>",
            Path::new(""),
        ),
    }
}

/// The admin socket a client should use: `--socket`, else the one `--config` (or the
/// embedded default) names.
pub fn socket_path(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    Ok(read(args.config.as_deref())?.admin_socket)
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

fn run(cfg: ValidConfig, source: Arc<ConfigSource>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("holdfast")
        .build()?;
    // Before any LUN file is opened: a second target on this data directory stops here.
    let _lock = crate::service::lock::lock_dir(&cfg.data_dir, LOCK_FILE, "holdfast target")?;
    raise_open_file_limit(&cfg);
    rt.block_on(async move {
        let runtime = Arc::new(
            Runtime::build(&cfg)
                .with_context(|| format!("{}: cannot open the LUNs", cfg.source))?,
        );
        let portals = Portals::bind(&cfg.listen_addrs()).await?;
        let admin = AdminSocket::bind(&cfg.admin_socket).await?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        serve_metrics(&cfg, &runtime, rx.clone()).await?;
        print_summary(&cfg);
        for (name, addr) in cfg.config.open_portals(&cfg.portal_addrs) {
            tracing::warn!(iqn = %name, portal = %addr, "portal is not on loopback and the target has neither an ACL nor CHAP: any initiator that reaches it may log in; add [[target.acl]] or [target.chap]");
        }
        tracing::info!(portals = ?portals.local_addrs(), admin_socket = %admin.path().display(), "holdfast target ready");
        let bound = portals.local_addrs();
        notify::ready(&status::target_line(runtime.lun_count(), &bound));
        let serve = tokio::spawn(portals.serve(runtime.clone(), rx.clone()));
        let admin = tokio::spawn(admin.serve(runtime.clone(), source.clone(), rx));
        wait_for_stop(&runtime, &*source, &bound).await?;
        notify::stopping("stopping: closing sessions and flushing the LUNs");
        let _ = tx.send(true);
        serve.await.context("serving task failed")?;
        let _ = admin.await;
        Ok(())
    })
}

/// Lift the soft open-file limit to the hard one before the LUN files are opened, and
/// say so up front when even that cannot hold every LUN file and connection the
/// configuration allows.
fn raise_open_file_limit(cfg: &ValidConfig) {
    let luns: usize = cfg.config.targets.iter().map(|t| t.luns.len()).sum();
    let max_connections = cfg.config.limits.max_connections;
    let need = nofile::needed(luns as u64, u64::from(max_connections));
    match nofile::raise(need) {
        Ok(r) if r.enough() => {
            if r.now != r.before {
                tracing::info!(needed = r.needed, "open-file limit raised from {} to {}", r.before, r.now);
            }
        }
        Ok(r) => tracing::warn!(
            limit = r.now,
            needed = r.needed,
            "open-file limit (RLIMIT_NOFILE) {} is below the {} descriptors this configuration may use ({luns} LUN files + limits.max_connections {max_connections} + {} reserved): connections or LUNs will fail with \"too many open files\"; raise the hard limit (LimitNOFILE= in the unit, ulimit -Hn) or lower limits.max_connections",
            r.now,
            r.needed,
            nofile::RESERVED_FDS
        ),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit (RLIMIT_NOFILE): {e}"),
    }
}

/// Bind the metrics endpoint, if configured, and serve it until `stop`.
async fn serve_metrics(
    cfg: &ValidConfig,
    runtime: &Arc<Runtime>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (Some(addr), Some(metrics)) = (cfg.config.metrics, runtime.metrics.clone()) else {
        return Ok(());
    };
    let server = MetricsServer::bind(addr)
        .await
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    tracing::info!(addr = %server.local_addr()?, "metrics endpoint: GET /metrics");
    let rt = runtime.clone();
    let render: Render = Arc::new(move |f| metrics.render(&rt.metrics_gauges(), f));
    tokio::spawn(server.serve(render, stop));
    Ok(())
}

/// Reload on SIGHUP until SIGINT or SIGTERM.
async fn wait_for_stop(
    rt: &Runtime,
    source: &ConfigSource,
    portals: &[std::net::SocketAddr],
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT received");
                return Ok(());
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received");
                return Ok(());
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                notify::reloading();
                // admin::reload logs the outcome.
                let _ = admin::reload(rt, source).await;
                notify::ready(&status::target_line(rt.lun_count(), portals));
            }
        }
    }
}
