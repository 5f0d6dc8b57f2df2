//! `holdfast`: the command line. Parses the arguments and hands each subcommand to its
//! module in `holdfast::cli` (the CLI edge, where anyhow lives).

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use holdfast::cli::{self, ctl_command::CtlArgs, guest::GuestCommand, pr::PrArgs};
use std::path::PathBuf;

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
    /// Log line format on stderr: `text` (under systemd, without timestamps: journald
    /// adds its own) or `json`, one object per line
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HOLDFAST_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the iSCSI target (no --config: the embedded default in ./holdfast-data).
    /// `reload|sessions|luns|show` talk to a running target through its admin socket.
    Target(Box<cli::target::TargetArgs>),
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
        /// Serve Prometheus metrics on ADDR (GET /metrics), e.g. 127.0.0.1:9465
        /// [default: the config's node.metrics key, else none].
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
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
        /// Run the guests as QEMU VMs booting this initramfs (made by
        /// fixtures/qemu-guest/build.sh) instead of as processes
        #[arg(long, value_name = "INITRAMFS")]
        vm: Option<PathBuf>,
        /// The kernel the --vm guests boot [default: $VM_INITIATOR_DIR/vmlinuz, else
        /// ~/.cache/vm-initiator/vmlinuz]
        #[arg(long, value_name = "KERNEL", requires = "vm")]
        vm_kernel: Option<PathBuf>,
        /// QEMU accelerators of the --vm guests, in order of preference (e.g. "tcg"
        /// where /dev/kvm exists but does not work) [default: kvm:tcg]
        #[arg(long, value_name = "ACCEL", requires = "vm")]
        vm_accel: Option<String>,
    },
    /// Write man pages or shell completions from these definitions (for packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        command: cli::generate::GenerateCommand,
    },
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Log to stderr with `filter`. Text gets colours only on a terminal and no timestamp
/// when stderr is journald's stream (systemd sets JOURNAL_STREAM; journald stamps each
/// line itself).
fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("invalid --log filter")?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let journal = !tty && std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Text if journal => fmt.with_ansi(false).without_time().init(),
        LogFormat::Text => fmt.with_ansi(tty).init(),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    // pr, ctl, guest and demo print for scripts and people: only warnings in the log
    let quiet = matches!(
        args.command,
        Command::Pr(_)
            | Command::Ctl(_)
            | Command::Guest { .. }
            | Command::Demo { .. }
            | Command::Generate { .. }
    ) || matches!(&args.command, Command::Target(t) if t.action.is_some()
    );
    let filter = args
        .log
        .as_deref()
        .unwrap_or(if quiet { "warn" } else { "info" });
    init_logging(filter, args.log_format)?;
    match args.command {
        Command::Target(args) => std::process::exit(cli::target::main(&args)?),
        Command::Pr(args) => std::process::exit(cli::pr::main(&args)?),
        Command::Agent {
            config,
            check,
            metrics,
        } => cli::agent::main(&config, check, metrics),
        Command::Ctl(args) => std::process::exit(cli::ctl_command::main(&args)?),
        Command::Guest { command } => std::process::exit(cli::guest::main(command)?),
        Command::Demo {
            port,
            keep,
            quiet,
            vm,
            vm_kernel,
            vm_accel,
        } => {
            let vm = vm.map(|initramfs| cli::guest_qemu::GuestImage {
                kernel: vm_kernel
                    .unwrap_or_else(|| cli::guest_qemu::vm_initiator_dir().join("vmlinuz")),
                initramfs,
            });
            let opts = cli::demo::DemoOptions {
                port,
                keep,
                quiet,
                vm,
                vm_accel,
            };
            // run() has stopped everything it started by the time it returns.
            if let Err(e) = cli::demo::run(&opts) {
                eprintln!("holdfast demo: {e}");
                std::process::exit(e.exit_code());
            }
            Ok(())
        }
        Command::Generate { command } => {
            std::process::exit(cli::generate::main(Cli::command(), &command)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` (and the man pages made from it) explains every argument and
    /// subcommand: a new one without a doc comment fails here.
    #[test]
    fn every_argument_and_subcommand_has_help_text() {
        let missing = cli::generate::missing_help(&Cli::command());
        assert!(
            missing.is_empty(),
            "no help text:\n  {}",
            missing.join("\n  ")
        );
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
