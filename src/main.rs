//! `holdfast`: the command line. Library errors are typed; anyhow lives only here.

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast::agent::guest::{self, CheckArgs, RunArgs};
use holdfast::pr_command::{self, PrArgs};
use holdfast::target::config::{self, ValidConfig};
use holdfast::target::portal::Portals;
use holdfast::target::runtime::Runtime;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Shared storage that is also the referee"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "holdfast=debug"
    /// [default: info; warn for `pr`, whose stdout and stderr scripts read]
    #[arg(long, global = true, env = "HOLDFAST_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the iSCSI target (no --config: the embedded default in ./holdfast-data).
    Target {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Validate the configuration, print what would be served, and exit.
        #[arg(long)]
        check: bool,
        /// Print the embedded default configuration and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Persistent reservations on a LUN, like sg_persist, over holdfast's own initiator.
    /// Exit status 24 = RESERVATION CONFLICT.
    Pr(Box<PrArgs>),
    /// Test guest (like sanlock's devcount): `run` writes a counter to a disk over its own
    /// iSCSI session; `check` proves from the disk and the ack logs that no acknowledged
    /// write was lost, the group never ran twice at once, and no old write landed late.
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
    /// Run the cluster agent of this hypervisor node.
    Agent {
        /// The node's TOML configuration.
        #[arg(long, short, default_value = "/etc/holdfast/node.toml")]
        config: PathBuf,
        /// Validate the configuration, print it with its defaults, and exit.
        #[arg(long)]
        check: bool,
    },
    /// Administer the cluster through its quorum LUN.
    Ctl(Box<CtlArgs>),
    /// A three-node cluster on this machine: target, agents, two groups running the test
    /// guest; kill -9 the owner of one, measure the failover, check that no acknowledged
    /// write was lost and nothing ran twice, stop everything.
    Demo {
        /// Port of the target's portal on 127.0.0.1 [default: a free port]
        #[arg(long)]
        port: Option<u16>,
        /// Put the files (configs, logs, events, ack logs, disk images) in DIR, a new or
        /// empty directory, and keep it [default: a temporary directory, removed]
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        /// No narration: only the failover time and the check results
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(clap::Args)]
struct CtlArgs {
    /// A node's TOML configuration (portals, target, quorum LUN, cluster, node id).
    #[arg(long, short, global = true, default_value = "/etc/holdfast/node.toml")]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Format a LUN as the quorum LUN (refuses a LUN that holds data unless --force).
    InitQuorum {
        /// iscsi://HOST[:PORT]/TARGET/LUN
        url: String,
        /// Cluster name (every node's `node.cluster`).
        #[arg(long)]
        cluster: String,
        /// Overwrite a LUN that is not empty (or another cluster's quorum LUN).
        #[arg(long)]
        force: bool,
        /// Initiator name to log in with.
        #[arg(long, default_value = "iqn.2026-11.org.holdfast:ctl",
              value_parser = holdfast::iscsi::name::parse_iscsi_name)]
        initiator_name: String,
        #[arg(long, requires = "chap_secret")]
        chap_user: Option<String>,
        #[arg(long, env = "HOLDFAST_CHAP_SECRET", requires = "chap_user")]
        chap_secret: Option<String>,
    },
    /// Nodes (alive, fenced, last heartbeat), groups (owner, state, epoch, restarts) and
    /// the PR keys of every LUN.
    Status,
    /// Planned move: offline action on the owner, hand-over, start/restore on NODE.
    Move {
        group: String,
        node: String,
        /// Wait until the group runs on NODE (seconds; 0 = don't wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Maintenance: stop the group and keep it stopped.
    Offline {
        group: String,
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// End maintenance (and forget where it failed): the group is placed and started.
    Online {
        group: String,
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Stop monitoring the group (its VM is left alone) until `thaw`.
    Freeze {
        group: String,
    },
    Thaw {
        group: String,
    },
    /// Move every group away from NODE and keep new ones off it (--undo ends that).
    Drain {
        node: String,
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Subcommand)]
enum GuestCommand {
    /// Write an increasing counter to the disk until stopped (exit 75 when fenced).
    Run(Box<RunArgs>),
    /// Check the disk against the guests' ack logs (exit 0 clean, 1 violations, 2 error).
    Check(CheckArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(
                match cli.command {
                    Command::Pr(_)
                    | Command::Ctl(_)
                    | Command::Guest { .. }
                    | Command::Demo { .. } => "warn",
                    _ => "info",
                },
            ))
            .context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Target {
            config,
            check,
            print_default_config,
        } => {
            if print_default_config {
                print!("{}", config::EMBEDDED_DEFAULT.trim_start());
                return Ok(());
            }
            let cfg = match &config {
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
            run_target(cfg)
        }
        Command::Pr(args) => {
            let code = run_pr(&args)?;
            std::process::exit(code)
        }
        Command::Agent { config, check } => {
            let cfg = holdfast::agent::config::load_file(&config)?;
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
            run_agent(cfg)
        }
        Command::Ctl(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(run_ctl(&args)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "error": format!("{e:#}")})
                        );
                    }
                    eprintln!("holdfast ctl: {e:#}");
                    std::process::exit(1)
                }
            }
        }
        Command::Guest { command } => {
            let code = run_guest(command)?;
            std::process::exit(code)
        }
        Command::Demo { port, keep, quiet } => {
            let opts = holdfast::demo::DemoOptions { port, keep, quiet };
            // run() has stopped everything it started by the time it returns.
            if let Err(e) = holdfast::demo::run(&opts) {
                eprintln!("holdfast demo: {e}");
                std::process::exit(e.exit_code());
            }
            Ok(())
        }
    }
}

/// `holdfast guest run|check`; returns the exit status.
fn run_guest(command: GuestCommand) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        GuestCommand::Run(args) => match rt.block_on(guest::run(&args)) {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("holdfast guest run: {e}");
                Ok(e.exit_code())
            }
        },
        GuestCommand::Check(args) => match rt.block_on(guest::check_disk(&args)) {
            Ok(report) => {
                if args.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{report}");
                }
                Ok(if report.ok { 0 } else { 1 })
            }
            Err(e) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "error": e.to_string()})
                    );
                }
                eprintln!("holdfast guest check: {e}");
                Ok(guest::EXIT_USAGE)
            }
        },
    }
}

fn run_agent(cfg: holdfast::agent::config::ValidNodeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("holdfast-agent")
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let agent = tokio::spawn(holdfast::agent::node::run(cfg, rx));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; handing groups over"),
            _ = term.recv() => tracing::info!("SIGTERM received; handing groups over"),
        }
        let _ = tx.send(true);
        agent.await.context("agent task failed")??;
        Ok(())
    })
}

async fn run_ctl(args: &CtlArgs) -> anyhow::Result<()> {
    use holdfast::agent::ctl::{self, Ctl};
    use holdfast::agent::quorum::GroupState;
    use std::time::Duration;
    if let CtlCommand::InitQuorum {
        url,
        cluster,
        force,
        initiator_name,
        chap_user,
        chap_secret,
    } = &args.command
    {
        let url: holdfast::pr_command::IscsiUrl = url.parse()?;
        let chap = chap_user
            .clone()
            .zip(chap_secret.clone().map(String::into_bytes));
        let msg = ctl::init_quorum(&url, initiator_name, cluster, *force, chap).await?;
        if args.json {
            println!("{}", serde_json::json!({"ok": true, "message": msg}));
        } else {
            println!("{msg}");
        }
        return Ok(());
    }
    let cfg = holdfast::agent::config::load_file(&args.config)?;
    let mut c = Ctl::connect(cfg).await?;
    let result = async {
        let done = |msg: String| {
            if args.json {
                println!("{}", serde_json::json!({"ok": true, "message": msg}));
            } else {
                println!("{msg}");
            }
        };
        match &args.command {
            CtlCommand::InitQuorum { .. } => unreachable!("handled above"),
            CtlCommand::Status => {
                let st = c.status().await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else {
                    print!("{st}");
                }
            }
            CtlCommand::Move { group, node, wait } => {
                let img = c.quorum.read_image().await?;
                let to = Ctl::resolve_node(&img, node)?;
                let t0 = std::time::Instant::now();
                c.update_group(group, |r, _| ctl::req_move(r, to)).await?;
                if *wait > 0 {
                    c.wait_group(group, Duration::from_secs(*wait), |r| {
                        r.owner == to && r.state == GroupState::Running
                    })
                    .await?;
                    done(format!(
                        "group {group} runs on {node} ({} ms after the request)",
                        t0.elapsed().as_millis()
                    ));
                } else {
                    done(format!("move of {group} to {node} requested"));
                }
            }
            CtlCommand::Offline { group, wait } => {
                c.update_group(group, |r, _| ctl::req_offline(r)).await?;
                if *wait > 0 {
                    c.wait_group(group, Duration::from_secs(*wait), |r| {
                        r.state == GroupState::Stopped
                    })
                    .await?;
                    done(format!("group {group} is offline"));
                } else {
                    done(format!("offline of {group} requested"));
                }
            }
            CtlCommand::Online { group, wait } => {
                c.update_group(group, |r, _| ctl::req_online(r)).await?;
                if *wait > 0 {
                    let r = c
                        .wait_group(group, Duration::from_secs(*wait), |r| {
                            r.state == GroupState::Running
                        })
                        .await?;
                    let img = c.quorum.read_image().await?;
                    let owner = img
                        .slot(r.owner)
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| format!("node id {}", r.owner));
                    done(format!("group {group} runs on {owner}"));
                } else {
                    done(format!("online of {group} requested"));
                }
            }
            CtlCommand::Freeze { group } => {
                c.update_group(group, |r, _| ctl::req_freeze(r, true))
                    .await?;
                done(format!(
                    "group {group} frozen: its VM is no longer monitored"
                ));
            }
            CtlCommand::Thaw { group } => {
                c.update_group(group, |r, _| ctl::req_freeze(r, false))
                    .await?;
                done(format!("group {group} thawed: monitoring resumes"));
            }
            CtlCommand::Drain { node, undo } => {
                let img = c.quorum.read_image().await?;
                let id = Ctl::resolve_node(&img, node)?;
                let drained = !*undo;
                c.update_admin(id, |a| a.drained = drained).await?;
                done(if drained {
                    format!("node {node} drained: its groups move away")
                } else {
                    format!("node {node} accepts groups again")
                });
            }
        }
        anyhow::Ok(())
    }
    .await;
    c.close().await;
    result
}

/// One `holdfast pr` invocation: prints the outcome (or the error) and returns the exit
/// status, 24 for RESERVATION CONFLICT so that fencing scripts can tell it apart.
fn run_pr(args: &PrArgs) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(pr_command::run(args)) {
        Ok(outcome) => {
            if args.json {
                println!("{}", outcome.to_json(args.action));
            } else {
                print!("{outcome}");
            }
            Ok(0)
        }
        Err(e) => {
            if args.json {
                println!("{}", e.to_json());
            }
            eprintln!("holdfast pr: {e}");
            Ok(e.exit_code())
        }
    }
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

fn run_target(cfg: ValidConfig) -> anyhow::Result<()> {
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
