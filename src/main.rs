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
                    Command::Pr(_) | Command::Guest { .. } => "warn",
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
        Command::Guest { command } => {
            let code = run_guest(command)?;
            std::process::exit(code)
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
