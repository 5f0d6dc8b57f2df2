//! `holdfast ctl`'s commands: parse, connect, change a record, wait, print.
use super::ctl::{self, Ctl};
use super::ctl_wait::{self, Goal, WaitError};
use super::{ctl_events, status_page};
use crate::agent::config::ValidNodeConfig;
use crate::agent::quorum::GroupState;
use crate::agent::wall_ms;
use clap::Subcommand;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct CtlArgs {
    /// A node's TOML configuration (portals, target, quorum LUN, cluster, node id).
    #[arg(long, short, global = true, default_value = "/etc/holdfast/node.toml")]
    pub config: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand)]
pub enum CtlCommand {
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
              value_parser = crate::iscsi::name::parse_iscsi_name)]
        initiator_name: String,
        #[command(flatten)]
        chap: super::chap_args::ChapArgs,
    },
    /// Nodes (alive, fenced, last heartbeat), groups (owner, state, epoch, restarts) and
    /// the PR keys of every LUN.
    Status {
        /// Redraw every second until interrupted (Ctrl-C).
        #[arg(long)]
        watch: bool,
    },
    /// The recent transitions of the whole cluster (fences, claims, starts, pauses, ctl
    /// changes with who asked), from the event ring on the quorum LUN, oldest first.
    Events {
        /// Only events since a duration ago ("10m") or a time ("2026-12-01T10:00:00Z").
        #[arg(long)]
        since: Option<String>,
        /// Only the last N events.
        #[arg(short = 'n', long = "lines")]
        lines: Option<usize>,
        /// Keep printing new events as they land.
        #[arg(long, short)]
        follow: bool,
    },
    /// A read-only status page over HTTP: nodes, groups, PR keys and recent events,
    /// updated every second (JSON at /api/status).
    Serve {
        /// Address to listen on (port 0: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8474")]
        listen: std::net::SocketAddr,
    },
    /// Planned move: offline action on the owner, hand-over, start/restore on NODE.
    Move {
        /// The group to move.
        group: String,
        /// The node to move it to (name or node id).
        node: String,
        /// Wait until the group runs on NODE, printing each state change (seconds;
        /// 0 = don't wait). Exit status 3 if it has not by then, 4 if the move failed.
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// Live migration: the VM keeps running while its memory is copied to NODE,
        /// which then takes the disks over (QEMU with a QMP socket only).
        #[arg(long)]
        live: bool,
    },
    /// Maintenance: stop the group and keep it stopped.
    Offline {
        /// The group to take offline.
        group: String,
        /// Wait until the group has stopped, printing each state change (seconds;
        /// 0 = don't wait). Exit status 3 if it has not by then.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// End maintenance (and forget where it failed): the group is placed and started.
    Online {
        /// The group to bring online.
        group: String,
        /// Wait until the group runs, printing each state change (seconds; 0 = don't
        /// wait). Exit status 3 if it does not by then, 4 if it was taken offline again.
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Stop monitoring the group (its VM is left alone) until `thaw`.
    Freeze {
        /// The group to freeze.
        group: String,
    },
    /// Resume monitoring a frozen group.
    Thaw {
        /// The group to thaw.
        group: String,
    },
    /// Move every group away from NODE and keep new ones off it (--undo ends that).
    Drain {
        /// The node to drain (name or node id).
        node: String,
        /// End the drain: the node accepts groups again.
        #[arg(long)]
        undo: bool,
    },
}

/// Run one ctl command and print its outcome; returns the exit status.
pub fn main(args: &CtlArgs) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(run(args)) {
        Ok(code) => Ok(code),
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": format!("{e:#}")})
                );
            }
            eprintln!("holdfast ctl: {e:#}");
            Ok(e.downcast_ref::<WaitError>()
                .map_or(1, WaitError::exit_code))
        }
    }
}

/// A finished command's message, as text or JSON.
fn done(json: bool, msg: String) {
    if json {
        println!("{}", serde_json::json!({"ok": true, "message": msg}));
    } else {
        println!("{msg}");
    }
}

/// Run the command; `Ok` carries the exit status of a command that printed its own
/// failure (`status` with the target unreachable).
async fn run(args: &CtlArgs) -> anyhow::Result<i32> {
    if let CtlCommand::InitQuorum {
        url,
        cluster,
        force,
        initiator_name,
        chap,
    } = &args.command
    {
        let url: crate::initiator::IscsiUrl = url.parse()?;
        let chap = chap
            .credentials()
            .map_err(anyhow::Error::msg)?
            .map(|(u, s)| (u.to_string(), s.expose().as_bytes().to_vec()));
        let msg = ctl::init_quorum(&url, initiator_name, cluster, *force, chap).await?;
        done(args.json, msg);
        return Ok(0);
    }
    // The config error names the file itself.
    let cfg = crate::agent::config::load_file(&args.config)?;
    match &args.command {
        CtlCommand::Status { watch: false } => return status(cfg, args.json).await,
        CtlCommand::Status { watch: true } => return status_page::watch(cfg).await.map(|()| 0),
        CtlCommand::Serve { listen } => return status_page::serve(cfg, *listen).await.map(|()| 0),
        _ => {}
    }
    let mut c = Ctl::connect(cfg).await?;
    let result = on_cluster(&mut c, &args.command, args.json).await;
    c.close().await;
    result.map(|()| 0)
}

/// `ctl status`: the cluster as the quorum LUN shows it, plus the groups that this
/// node's agent keeps paused (its STATE_DIR/paused.json). During a storage outage the
/// LUN cannot be read: then the paused groups are printed anyway, and the error after.
async fn status(cfg: ValidNodeConfig, json: bool) -> anyhow::Result<i32> {
    let state_dir = cfg.config.node.state_dir.clone();
    let from_lun = async {
        let c = Ctl::connect(cfg).await?;
        let st = c.status().await;
        c.close().await;
        st
    }
    .await;
    // Read after the LUN, so that a pause that began meanwhile shows.
    let paused = ctl::paused_here(&state_dir, wall_ms()).unwrap_or_else(|e| {
        eprintln!("holdfast ctl: warning: {e}");
        vec![]
    });
    match from_lun {
        Ok(mut st) => {
            st.paused_here = paused;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{st}");
            }
            Ok(0)
        }
        Err(e) => {
            if json {
                let v = serde_json::json!({"ok": false, "error": e.to_string(),
                    "paused_here": paused});
                println!("{v}");
            } else if paused.is_empty() {
                println!("no group is paused on this node");
            } else {
                print!("{}", ctl::PausedList(&paused));
            }
            eprintln!("holdfast ctl: {e}");
            Ok(1)
        }
    }
}

async fn on_cluster(c: &mut Ctl, command: &CtlCommand, json: bool) -> anyhow::Result<()> {
    match command {
        CtlCommand::InitQuorum { .. } | CtlCommand::Status { .. } | CtlCommand::Serve { .. } => {
            unreachable!("handled before connecting")
        }
        CtlCommand::Events {
            since,
            lines,
            follow,
        } => ctl_events::run(c, since.as_deref(), *lines, *follow, json).await?,
        CtlCommand::Move {
            group,
            node,
            wait,
            live,
        } => move_group(c, group, node, *wait, *live, json).await?,
        CtlCommand::Offline { group, wait } => {
            let t0 = Instant::now();
            let by = format!("offline requested by {}", ctl_events::actor());
            c.update_group(group, |r, _| ctl::req_offline(r).map(|n| noted(n, &by)))
                .await?;
            c.record("ctl-offline", group, &by, 0).await;
            if *wait > 0 {
                let timeout = Duration::from_secs(*wait);
                ctl_wait::wait(c, group, Goal::Stopped, t0, timeout, !json).await?;
                done(json, format!("group {group} is offline"));
            } else {
                done(json, format!("offline of {group} requested"));
            }
        }
        CtlCommand::Online { group, wait } => online(c, group, *wait, json).await?,
        CtlCommand::Freeze { group } => {
            c.update_group(group, |r, _| ctl::req_freeze(r, true))
                .await?;
            c.record("ctl-freeze", group, "monitoring suspended", 0)
                .await;
            done(
                json,
                format!("group {group} frozen: its VM is no longer monitored"),
            );
        }
        CtlCommand::Thaw { group } => {
            c.update_group(group, |r, _| ctl::req_freeze(r, false))
                .await?;
            c.record("ctl-thaw", group, "monitoring resumes", 0).await;
            done(json, format!("group {group} thawed: monitoring resumes"));
        }
        CtlCommand::Drain { node, undo } => {
            let img = c.quorum.read_image().await?;
            let id = Ctl::resolve_node(&img, node)?;
            let drained = !*undo;
            c.update_admin(id, |a| a.drained = drained).await?;
            let (kind, what) = match drained {
                true => ("ctl-drain", "drained"),
                false => ("ctl-undrain", "accepts groups again"),
            };
            c.record(kind, "", &format!("node {node} {what}"), id).await;
            done(
                json,
                if drained {
                    format!("node {node} drained: its groups move away")
                } else {
                    format!("node {node} accepts groups again")
                },
            );
        }
    }
    Ok(())
}

async fn move_group(
    c: &mut Ctl,
    group: &str,
    node: &str,
    wait: u64,
    live: bool,
    json: bool,
) -> anyhow::Result<()> {
    if live {
        if let Some(why) = ctl::live_migration_refusal(&c.cfg, group) {
            anyhow::bail!(why);
        }
    }
    let img = c.quorum.read_image().await?;
    let to = Ctl::resolve_node(&img, node)?;
    let t0 = Instant::now();
    let kind = if live { "live migration" } else { "move" };
    let by = format!("{kind} to {node} requested by {}", ctl_events::actor());
    let request = if live {
        ctl::req_live_move
    } else {
        ctl::req_move
    };
    c.update_group(group, |r, _| request(r, to).map(|n| noted(n, &by)))
        .await?;
    c.record("ctl-move", group, &by, to).await;
    if wait == 0 {
        done(json, format!("{kind} of {group} to {node} requested"));
        return Ok(());
    }
    let timeout = Duration::from_secs(wait);
    ctl_wait::wait(c, group, Goal::RunOn(to), t0, timeout, !json).await?;
    done(
        json,
        format!(
            "group {group} runs on {node} ({} ms after the request)",
            t0.elapsed().as_millis()
        ),
    );
    Ok(())
}

/// `n` with `by` (what was asked, by whom) as its reason while the group is stopped;
/// a running group keeps its reason until its owner acts.
fn noted(mut n: crate::agent::quorum::GroupRecord, by: &str) -> crate::agent::quorum::GroupRecord {
    if n.state == GroupState::Stopped {
        n.reason = by.to_string();
    }
    n
}

async fn online(c: &mut Ctl, group: &str, wait: u64, json: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let by = format!("online requested by {}", ctl_events::actor());
    c.update_group(group, |r, _| ctl::req_online(r).map(|n| noted(n, &by)))
        .await?;
    c.record("ctl-online", group, &by, 0).await;
    if wait == 0 {
        done(json, format!("online of {group} requested"));
        return Ok(());
    }
    let timeout = Duration::from_secs(wait);
    let r = ctl_wait::wait(c, group, Goal::Running, t0, timeout, !json).await?;
    let img = c.quorum.read_image().await?;
    let owner = img
        .slot(r.owner)
        .map(|s| s.name.clone())
        .unwrap_or_else(|| format!("node id {}", r.owner));
    done(json, format!("group {group} runs on {owner}"));
    Ok(())
}
