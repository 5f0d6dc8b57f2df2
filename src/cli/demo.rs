//! `holdfast demo`: a whole cluster on this machine, one failover, and the proof that
//! nothing went wrong.
//!
//! It starts a target (LUN 0 the quorum LUN, LUNs 1 and 2 the disks of groups `web` and
//! `db`), formats the quorum LUN, starts three agents (`node1`..`node3`) whose groups run
//! the test guest (`holdfast guest run`, a counter written over its own iSCSI session),
//! waits until both groups run, then kills -9 the node that owns `web` (agent and guest
//! at once) and measures how long `web` takes to run again on a survivor: from the kill
//! to the survivor's `vm-started` event (both CLOCK_MONOTONIC). It ends with
//! `holdfast guest check` on both disks (no lost acknowledged write, no double run, no
//! late write) and stops everything.
//!
//! With `--vm` the guests are real QEMU VMs under the `qemu` driver
//! ([`crate::cli::guest_qemu`]): the same writer inside a kernel and initramfs, on a
//! virtio disk over iscsi://, its acks on a serial port. Booting takes longer (seconds
//! under KVM, 10-20 s under TCG), so the waits for writes get [`VM_BOOT_TIMEOUT`].
//!
//! Every process is a child of this one (target, agents) or a grandchild (guests, which
//! this process collects as a child subreaper once their agent is gone). Each runs in
//! its own process group with a parent-death signal, so a Ctrl-C at the terminal reaches
//! only the demo, which then kills them all. Even a SIGKILL of the demo takes the target
//! and the agents with it; their guests then give up (exit 1) once the target has been
//! gone for 30 s.

use crate::agent::config::{self as agent_config, AgentConfigError, OfflineAction};
use crate::agent::config::{Timings, ValidNodeConfig};
use crate::agent::node::mono_ns;
use crate::agent::quorum::{GroupRecord, GroupState, NodeState, QuorumImage};
use crate::agent::AgentError;
use crate::cli::cluster_kit::{accepts_login, children_of, free_port, node_name, sigkill};
use crate::cli::cluster_kit::{
    GroupSpec, KitError, Launch, Layout, LineTail, Processes, QUORUM_LUN,
};
use crate::cli::ctl::{self, Ctl};
use crate::cli::guest::{self, CheckArgs, GuestError};
use crate::cli::guest_qemu::{qemu_guest_vm, GuestImage};
use crate::initiator::InitiatorConfig;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Display;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

/// The demo target's iSCSI name.
pub const TARGET: &str = "iqn.2026-11.org.holdfast:demo";
/// The demo cluster's name.
pub const CLUSTER: &str = "demo";
const NODES: u16 = 3;
/// Name, LUN and preferred owners of each group. The first is the one that fails over.
const GROUPS: [(&str, u64, [&str; 3]); 2] = [
    ("web", 1, ["node1", "node3", "node2"]),
    ("db", 2, ["node2", "node3", "node1"]),
];
/// Longest wait for each step (target up, nodes joined, groups running, failover).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an agent or the target to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a QEMU guest (`--vm`) to boot and write; TCG on a busy machine.
pub const VM_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Acknowledged writes a guest run must show before the demo goes on.
const ACKS: usize = 20;
/// Log filter of the target and the agents (their stderr goes to DIR/*.log).
const CHILD_LOG: &str = "info,holdfast::initiator=warn";
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);

/// `holdfast demo` options.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Port of the target's portal on 127.0.0.1 (None: a free one).
    pub port: Option<u16>,
    /// Use this directory (new or empty) and leave it in place afterwards.
    pub keep: Option<PathBuf>,
    /// No narration: only the result lines.
    pub quiet: bool,
    /// Run the guests as QEMU VMs booting this image (`--vm`).
    pub vm: Option<GuestImage>,
    /// QEMU's accelerators for those guests [default: "kvm:tcg"].
    pub vm_accel: Option<String>,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub group: String,
    pub from: String,
    pub to: String,
    /// From the SIGKILL to the survivor's `vm-started` event.
    pub failover: Duration,
    /// One verdict per group ("web OK").
    pub checks: Vec<String>,
    /// The whole demo.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Config(#[from] AgentConfigError),
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("{what}: {source}")]
    Agent { what: String, source: AgentError },
    #[error("guest check of {group}: {source}")]
    Guest { group: String, source: GuestError },
    #[error("guest check of {0} found violations")]
    CheckFailed(String),
    #[error("timed out after {} s waiting for {what}", STEP_TIMEOUT.as_secs())]
    Timeout { what: String },
    #[error("{what} exited unexpectedly ({status})")]
    Exited { what: String, status: ExitStatus },
    #[error("{0}")]
    Failed(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

impl DemoError {
    /// 130 after SIGINT (as shells report it), 1 for every failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            DemoError::Interrupted(_) => 130,
            _ => 1,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

fn agent_err(what: impl Into<String>) -> impl FnOnce(AgentError) -> DemoError {
    let what = what.into();
    move |source| DemoError::Agent { what, source }
}

/// Run the demo. Whatever happens, every process it started is gone when this returns,
/// and the directory too unless `--keep` named it.
pub fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let say = Narrator {
        t0: mono_ns(),
        quiet: opts.quiet,
    };
    let exe = std::env::current_exe().map_err(io_err("cannot find the holdfast executable"))?;
    let (dir, temporary) = match &opts.keep {
        Some(d) => (prepare_keep_dir(d)?, false),
        None => (make_temp_dir()?, true),
    };
    let port = match opts.port {
        Some(p) => p,
        None => free_port().map_err(io_err("finding a free port on 127.0.0.1"))?,
    };
    let env = Env {
        kit: Layout {
            dir: dir.clone(),
            exe,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            target: TARGET.into(),
            cluster: CLUSTER.into(),
        },
        say,
        vm: opts.vm.clone(),
        vm_accel: opts.vm_accel.clone().unwrap_or_else(|| "kvm:tcg".into()),
    };
    become_subreaper();
    let mut procs = Processes::default();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("cannot start the async runtime"))
        .and_then(|rt| {
            // Everything is spawned from this (the main) thread: the parent-death signal
            // of a child fires when the thread that forked it ends.
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let sig = |k| signal(k).map_err(io_err("cannot handle signals"));
                let (mut int, mut term, mut hup) = (
                    sig(SignalKind::interrupt())?,
                    sig(SignalKind::terminate())?,
                    sig(SignalKind::hangup())?,
                );
                tokio::select! {
                    r = scenario(&env, &mut procs) => r,
                    _ = int.recv() => Err(DemoError::Interrupted("SIGINT")),
                    _ = term.recv() => Err(DemoError::Interrupted("SIGTERM")),
                    _ = hup.recv() => Err(DemoError::Interrupted("SIGHUP")),
                }
            })
        });
    if let Err(e) = &result {
        if !matches!(e, DemoError::Interrupted(_)) {
            eprint!(
                "---- the demo failed; the logs' last lines:\n{}",
                diagnostics(&env.kit)
            );
        }
        say.say(format!("{e}; killing everything the demo started"));
    }
    procs.kill_all();
    let stray = reap_orphans(&[]);
    if stray > 0 {
        say.say(format!("killed {stray} process(es) left behind"));
    }
    if temporary {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => say.say(format!("removed {}", dir.display())),
            Err(e) => eprintln!("holdfast demo: cannot remove {}: {e}", dir.display()),
        }
    } else {
        say.say(format!(
            "files kept in {}: configs (*.toml), logs (*.log), events.jsonl, the ack logs \
             and the disk images (data/)",
            dir.display()
        ));
    }
    let mut report = result?;
    report.elapsed = Duration::from_nanos(mono_ns() - say.t0);
    say.say(format!(
        "demo finished in {:.1} s",
        report.elapsed.as_secs_f64()
    ));
    if !say.quiet {
        println!();
    }
    println!(
        "failover time: {:.3} s ({}: {} killed with SIGKILL -> vm-started on {})",
        report.failover.as_secs_f64(),
        report.group,
        report.from,
        report.to
    );
    println!("guest check: {}", report.checks.join(", "));
    Ok(report)
}

/// Where the demo runs.
struct Env {
    kit: Layout,
    say: Narrator,
    /// QEMU guests instead of `guest run` processes.
    vm: Option<GuestImage>,
    vm_accel: String,
}

impl Env {
    fn load(&self, id: u16) -> Result<ValidNodeConfig, DemoError> {
        Ok(agent_config::load_file(&self.kit.node_config_path(id))?)
    }
}

/// Narration on stdout, each line stamped with the time since the start.
#[derive(Clone, Copy)]
struct Narrator {
    t0: u64,
    quiet: bool,
}

impl Narrator {
    fn say(&self, msg: impl Display) {
        self.at(mono_ns(), msg)
    }

    /// A line stamped with `ns` (CLOCK_MONOTONIC, e.g. an event's `mono_ns`).
    fn at(&self, ns: u64, msg: impl Display) {
        if !self.quiet {
            let t = ns.saturating_sub(self.t0) as f64 / 1e9;
            println!("[{t:6.2}s] {msg}");
        }
    }

    /// Indented text (a status, a check report).
    fn block(&self, text: &str) {
        if !self.quiet {
            for l in text.lines() {
                println!("           | {l}");
            }
        }
    }
}

/// Where the failed-over group was and where it went.
struct Failover {
    group: &'static str,
    victim: u16,
    victim_name: String,
    killed_at: u64,
    started_ns: u64,
    new_owner: String,
    new_epoch: u64,
}

async fn scenario(env: &Env, procs: &mut Processes) -> Result<DemoReport, DemoError> {
    env.say.say(format!(
        "holdfast demo: a three-node cluster on this machine, files in {}",
        env.kit.dir.display()
    ));
    write_configs(env)?;
    if let Some(img) = &env.vm {
        env.say.say(format!(
            "the guests are QEMU VMs: kernel {}, initramfs {}; each writes through its \
             virtio disk (an iscsi:// LUN) and reports every acknowledged write on a serial \
             port",
            img.kernel.display(),
            img.initramfs.display()
        ));
    }
    start_target(env, procs).await?;
    let admin = create_offline_groups(env).await?;
    start_agents(env, procs, admin).await?;
    let observer = Ctl::connect(env.load(NODES)?)
        .await
        .map_err(agent_err("ctl (observer)"))?;
    let runs = wait_groups_running(env, procs, &observer).await?;
    print_status(env, &observer).await?;
    let f = fail_over(env, procs, &observer, &runs).await?;
    print_status(env, &observer).await?;
    observer.close().await;
    let checks = check_disks(env).await?;
    stop_all(env, procs).await?;
    Ok(DemoReport {
        group: f.group.into(),
        from: f.victim_name,
        to: f.new_owner,
        failover: Duration::from_nanos(f.started_ns.saturating_sub(f.killed_at)),
        checks,
        elapsed: Duration::ZERO,
    })
}

/// Step 1: the target.
async fn start_target(env: &Env, procs: &mut Processes) -> Result<(), DemoError> {
    env.say.say(format!(
        "starting the iSCSI target {TARGET} on {}: LUN 0 is the quorum LUN, LUN 1 web's \
         disk, LUN 2 db's disk",
        env.kit.addr
    ));
    let config = env.kit.target_config_path();
    procs.target = Some(spawn(
        env,
        &[OsStr::new("target"), "--config".as_ref(), config.as_ref()],
        "target.log",
    )?);
    wait_target_up(env, procs).await?;
    env.say.say("target is up");
    Ok(())
}

/// Step 2: the quorum LUN, and the groups' records (offline, so that nobody claims a
/// group before all three nodes have joined and placement can honour preferred owners).
/// Returns the administrator's connection, which sets them online in step 3.
async fn create_offline_groups(env: &Env) -> Result<Ctl, DemoError> {
    let url: crate::initiator::IscsiUrl = env
        .kit
        .url(QUORUM_LUN)
        .parse()
        .map_err(|e| DemoError::Failed(format!("{}: {e}", env.kit.url(QUORUM_LUN))))?;
    let msg = ctl::init_quorum(&url, "iqn.2026-11.org.holdfast:ctl", CLUSTER, false, None)
        .await
        .map_err(agent_err("ctl init-quorum"))?;
    env.say.say(msg);
    let mut admin = Ctl::connect(env.load(1)?)
        .await
        .map_err(agent_err("ctl (node1's configuration)"))?;
    for (g, _, _) in GROUPS {
        admin
            .quorum
            .ensure_group(g)
            .await
            .map_err(agent_err(format!("creating group {g}")))?;
        admin
            .update_group(g, |r, _| ctl::req_offline(r))
            .await
            .map_err(agent_err(format!("ctl offline {g}")))?;
    }
    env.say
        .say("created the records of groups web and db, offline until every node has joined");
    Ok(admin)
}

/// Step 3: the agents; once all heartbeat, the groups go online.
async fn start_agents(env: &Env, procs: &mut Processes, mut admin: Ctl) -> Result<(), DemoError> {
    for id in 1..=NODES {
        let config = env.kit.node_config_path(id);
        let args = [OsStr::new("agent"), "--config".as_ref(), config.as_ref()];
        let child = spawn(env, &args, &format!("agent{id}.log"))?;
        env.say.say(format!(
            "started the agent of {} (pid {})",
            node_name(id),
            child.id()
        ));
        procs.agents.insert(id, child);
    }
    wait_nodes_joined(procs, &admin).await?;
    env.say.say("all three nodes heartbeat on the quorum LUN");
    for (g, _, pref) in GROUPS {
        admin
            .update_group(g, |r, _| ctl::req_online(r))
            .await
            .map_err(agent_err(format!("ctl online {g}")))?;
        env.say.say(format!(
            "group {g} set online (preferred owners {})",
            pref.join(", ")
        ));
    }
    admin.close().await;
    Ok(())
}

/// Step 4: both groups run, and their guests write.
async fn wait_groups_running(
    env: &Env,
    procs: &mut Processes,
    observer: &Ctl,
) -> Result<BTreeMap<&'static str, GroupRecord>, DemoError> {
    let mut runs = BTreeMap::new();
    for (g, lun, _) in GROUPS {
        let r = wait_group(procs, observer, g, "to run", |r| {
            r.state == GroupState::Running
        })
        .await?;
        env.say.say(format!(
            "{g} runs on {} (epoch {}): its guest writes a counter to LUN {lun}",
            node_name(r.owner),
            r.epoch,
        ));
        runs.insert(g, r);
    }
    for (g, r) in &runs {
        wait_acks(env, procs, g, r.epoch).await?;
    }
    env.say.say(format!(
        "both guests have {ACKS}+ acknowledged writes (web {}, db {})",
        env.kit.acks_in("web", runs["web"].epoch).len(),
        env.kit.acks_in("db", runs["db"].epoch).len()
    ));
    Ok(runs)
}

/// Steps 5 and 6: kill -9 the owner of the first group and wait until the group runs
/// again on a survivor (and the other group runs too).
async fn fail_over(
    env: &Env,
    procs: &mut Processes,
    observer: &Ctl,
    runs: &BTreeMap<&'static str, GroupRecord>,
) -> Result<Failover, DemoError> {
    let (group, _, _) = GROUPS[0];
    let mut events = LineTail::new(env.kit.events(), true);
    events.read_new();
    let (victim, killed_at) = kill_owner(env, procs, group, &runs[group])?;
    let f = wait_vm_started(env, procs, &mut events, group, victim, killed_at).await?;
    env.say.at(
        f.started_ns,
        format!(
            "{group} runs again, on {} (epoch {}): failover time {:.3} s",
            f.new_owner,
            f.new_epoch,
            Duration::from_nanos(f.started_ns.saturating_sub(killed_at)).as_secs_f64()
        ),
    );
    confirm_takeover(env, procs, observer, &f, runs).await?;
    Ok(f)
}

/// Step 5: kill -9 of `group`'s owner, agent and guest at once. Returns the victim and
/// the time of the kill.
fn kill_owner(
    env: &Env,
    procs: &mut Processes,
    group: &str,
    before: &GroupRecord,
) -> Result<(u16, u64), DemoError> {
    let victim = before.owner;
    let victim_name = node_name(victim);
    let pids = procs.node_pids(victim);
    let dead_after = env.load(1)?.timings().dead_after;
    let killed_at = mono_ns();
    procs.kill_node(victim);
    env.say.at(
        killed_at,
        format!(
            "kill -9 {victim_name}, which owns {group}: its agent and its guest (pids {})",
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let last_acked = env.kit.acks_in(group, before.epoch).last().copied();
    env.say.say(format!(
        "{group}'s last acknowledged write before the kill: counter {}; the survivors \
         take over once {victim_name}'s heartbeat has been still for dead_after = {} ms",
        last_acked.map_or("-".into(), |c| c.to_string()),
        dead_after.as_millis()
    ));
    Ok((victim, killed_at))
}

/// Step 6a: narrate the agents' events until a survivor logs `vm-started` for `group`.
async fn wait_vm_started(
    env: &Env,
    procs: &mut Processes,
    events: &mut LineTail,
    group: &'static str,
    victim: u16,
    killed_at: u64,
) -> Result<Failover, DemoError> {
    let victim_name = node_name(victim);
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        check_alive(procs)?;
        let mut found = None;
        for e in events.read_json() {
            let ns = e["mono_ns"].as_u64().unwrap_or(0);
            if ns < killed_at {
                continue;
            }
            narrate_event(&env.say, &e);
            if e["event"] == "vm-started"
                && e["group"] == group
                && e["node"].as_str() != Some(victim_name.as_str())
            {
                found = Some(Failover {
                    group,
                    victim,
                    victim_name: victim_name.clone(),
                    killed_at,
                    started_ns: ns,
                    new_owner: e["node"].as_str().unwrap_or("?").to_string(),
                    new_epoch: e["epoch"].as_u64().unwrap_or(0),
                });
            }
        }
        if let Some(f) = found {
            return Ok(f);
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Failed(format!(
                "{group} did not come back on a survivor within {} s of the kill",
                STEP_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Step 6b: the quorum LUN agrees, the new run writes above every acknowledged write,
/// and the other groups run (again, if the victim owned them too).
async fn confirm_takeover(
    env: &Env,
    procs: &mut Processes,
    observer: &Ctl,
    f: &Failover,
    runs: &BTreeMap<&'static str, GroupRecord>,
) -> Result<(), DemoError> {
    let (group, victim) = (f.group, f.victim);
    let after = wait_group(procs, observer, group, "to run on a survivor", |r| {
        r.state == GroupState::Running && r.owner != victim && r.epoch == f.new_epoch
    })
    .await?;
    wait_acks(env, procs, group, after.epoch).await?;
    let first = env.kit.run_start(group, after.epoch);
    env.say.say(format!(
        "{group}'s new run started at counter {} (above every acknowledged write) and has \
         {ACKS}+ acknowledged writes",
        first.map_or("-".into(), |c| c.to_string()),
    ));
    for (g, _, _) in &GROUPS[1..] {
        if runs[g].owner == victim {
            let r = wait_group(procs, observer, g, "to run on a survivor", |r| {
                r.state == GroupState::Running && r.owner != victim
            })
            .await?;
            env.say
                .say(format!("{g} runs again too, on {}", node_name(r.owner)));
        } else {
            env.say.say(format!(
                "{g} still runs on {}, untouched",
                node_name(runs[g].owner)
            ));
        }
    }
    Ok(())
}

/// Step 7, the proof: no lost acknowledged write, no double run, no late write.
/// Returns one verdict per group.
async fn check_disks(env: &Env) -> Result<Vec<String>, DemoError> {
    let say = env.say;
    let mut verdicts = Vec::new();
    for (g, lun, _) in GROUPS {
        let ack_log = env.kit.ack_log(g);
        say.say(format!(
            "checking {g}'s disk against its guests' ack log (holdfast guest check --disk {} \
             --ack-log {})",
            env.kit.url(lun),
            ack_log.display()
        ));
        let report = guest::check_disk(&CheckArgs {
            disk: env.kit.url(lun),
            ack_log: vec![ack_log],
            json: false,
            chap: Default::default(),
        })
        .await
        .map_err(|source| DemoError::Guest {
            group: g.into(),
            source,
        })?;
        say.block(&report.to_string());
        if !report.ok {
            if say.quiet {
                eprint!("{report}");
            }
            return Err(DemoError::CheckFailed(g.into()));
        }
        verdicts.push(format!("{g} OK"));
    }
    Ok(verdicts)
}

/// Step 8: the agents hand their groups back and stop their guests, then the target.
async fn stop_all(env: &Env, procs: &mut Processes) -> Result<(), DemoError> {
    env.say.say(format!(
        "stopping: SIGTERM to the agents of {} (each stops its guest and leaves the cluster)",
        procs
            .agents
            .keys()
            .map(|&id| node_name(id))
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    stop_agents(procs).await?;
    env.say.say("agents stopped");
    stop_target(procs).await?;
    env.say.say("target stopped");
    Ok(())
}

/// One line for the events that tell the failover's story.
fn narrate_event(say: &Narrator, e: &serde_json::Value) {
    let ns = e["mono_ns"].as_u64().unwrap_or(0);
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    let (node, group, reason) = (s("node"), s("group"), s("reason"));
    let line = match e["event"].as_str().unwrap_or("") {
        "fenced" => format!(
            "{node} fenced node{} before touching {group}'s disk: {reason}",
            e["node_id"].as_u64().unwrap_or(0)
        ),
        "claimed" => format!(
            "{node} claimed {group} (epoch {}): {reason}",
            e["epoch"].as_u64().unwrap_or(0)
        ),
        "vm-started" => format!(
            "{node} started {group}'s guest (claim {:.1} ms, start {:.1} ms)",
            e["claim_ms"].as_f64().unwrap_or(0.0),
            e["start_ms"].as_f64().unwrap_or(0.0)
        ),
        "claim-lost" | "claim-failed" | "vm-killed" | "self-fence" | "orphan-released" => {
            format!("{node}: {} {group}: {reason}", s("event"))
        }
        _ => return,
    };
    say.at(ns, line);
}

async fn print_status(env: &Env, c: &Ctl) -> Result<(), DemoError> {
    if env.say.quiet {
        return Ok(());
    }
    env.say
        .say("cluster status (holdfast ctl status; liveness takes a second to judge):");
    let st = c.status().await.map_err(agent_err("ctl status"))?;
    env.say.block(&st.to_string());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Configuration files

/// The groups as the kit builds them: the demo's guests keep the default I/O timeout,
/// a group whose node is cut off shuts its guest down, and a stop takes at most 5 s.
fn group_specs() -> Vec<GroupSpec> {
    GROUPS
        .iter()
        .map(|&(g, lun, pref)| {
            let mut spec = GroupSpec::new(g, lun);
            spec.preferred = pref.iter().map(|p| p.to_string()).collect();
            spec.guest_args.clear();
            spec.settings.monitor_interval = Duration::from_millis(500);
            spec.settings.offline_action = OfflineAction::Shutdown;
            spec.settings.stop_timeout = Duration::from_secs(5);
            spec
        })
        .collect()
}

fn write_configs(env: &Env) -> Result<(), DemoError> {
    let groups = group_specs();
    env.kit
        .write_target_config(&groups, "# holdfast demo: the shared storage\n")?;
    for id in 1..=NODES {
        let header = format!("# holdfast demo: the agent of node{id}\n");
        let mut cfg = env.kit.node_config(id, &groups, &Timings::default());
        if let Some(img) = &env.vm {
            for g in &mut cfg.groups {
                g.vm = qemu_guest_vm(img, &env.kit.ack_log(&g.name), &env.vm_accel);
            }
        }
        crate::cli::cluster_kit::write_toml(&env.kit.node_config_path(id), &header, &cfg)?;
    }
    Ok(())
}

fn make_temp_dir() -> Result<PathBuf, DemoError> {
    let d = std::env::temp_dir().join(format!(
        "holdfast-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&d).map_err(io_err(format!("creating {}", d.display())))?;
    Ok(d)
}

/// `--keep DIR`: created if missing; must be empty (old images and logs would mislead).
fn prepare_keep_dir(d: &Path) -> Result<PathBuf, DemoError> {
    std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
    let d = std::path::absolute(d).map_err(io_err(format!("{}", d.display())))?;
    let mut entries = std::fs::read_dir(&d).map_err(io_err(format!("reading {}", d.display())))?;
    if entries.next().is_some() {
        return Err(DemoError::Failed(format!(
            "{} is not empty; give --keep a new or empty directory",
            d.display()
        )));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------
// Waiting

async fn wait_target_up(env: &Env, procs: &mut Processes) -> Result<(), DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:demo-probe", TARGET, env.kit.addr);
    cfg.login_timeout = Duration::from_secs(2);
    loop {
        check_alive(procs)?;
        if accepts_login(&cfg).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Timeout {
                what: format!("the target to accept logins on {}", env.kit.addr),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Until every node's slot is active and its counter has moved twice since we first
/// saw it.
async fn wait_nodes_joined(procs: &mut Processes, c: &Ctl) -> Result<(), DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut first: BTreeMap<u16, u64> = BTreeMap::new();
    loop {
        check_alive(procs)?;
        if let Ok(img) = c.quorum.read_image().await {
            let mut ready = 0;
            for id in 1..=NODES {
                if let Some(s) = img.slot(id) {
                    if s.state == NodeState::Active {
                        let f = *first.entry(id).or_insert(s.counter);
                        if s.counter >= f + 2 {
                            ready += 1;
                        }
                    }
                }
            }
            if ready == NODES {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Timeout {
                what: "the nodes to heartbeat on the quorum LUN".into(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_group(
    procs: &mut Processes,
    c: &Ctl,
    group: &str,
    what: &str,
    pred: impl Fn(&GroupRecord) -> bool,
) -> Result<GroupRecord, DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut last = String::from("no record read yet");
    loop {
        check_alive(procs)?;
        match c.quorum.read_image().await {
            Ok(img) => {
                if let Some(r) = group_record(&img, group) {
                    if pred(&r) {
                        return Ok(r);
                    }
                    last = format!(
                        "{} on node {} (epoch {}): {}",
                        r.state.name(),
                        r.owner,
                        r.epoch,
                        r.reason
                    );
                }
            }
            Err(e) => last = format!("cannot read the quorum LUN: {e}"),
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Timeout {
                what: format!("{group} {what}; it is {last}"),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn group_record(img: &QuorumImage, group: &str) -> Option<GroupRecord> {
    img.group(group).map(|(_, r, _)| r.clone())
}

async fn wait_acks(
    env: &Env,
    procs: &mut Processes,
    group: &str,
    epoch: u64,
) -> Result<(), DemoError> {
    let limit = if env.vm.is_some() {
        VM_BOOT_TIMEOUT
    } else {
        STEP_TIMEOUT
    };
    let end = tokio::time::Instant::now() + limit;
    while env.kit.acks_in(group, epoch).len() < ACKS {
        check_alive(procs)?;
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Failed(format!(
                "timed out after {} s waiting for {group}'s guest (epoch {epoch}) to \
                 acknowledge {ACKS} writes",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// The tail of every log, for a failure report.
fn diagnostics(kit: &Layout) -> String {
    let mut names = vec!["target.log".to_string(), "events.jsonl".to_string()];
    for id in 1..=NODES {
        names.push(format!("agent{id}.log"));
        for (g, _, _) in GROUPS {
            names.push(format!("node{id}/{g}.log"));
            names.push(format!("node{id}/{g}.console"));
        }
    }
    for (g, _, _) in GROUPS {
        names.push(format!("acks-{g}.log"));
    }
    kit.log_tails(&names, 15)
}

// ---------------------------------------------------------------------------------------
// Processes

/// Start `holdfast ARGS` with stderr appended to DIR/`log`, leashed: its own process
/// group (a Ctrl-C at the terminal reaches only the demo, which stops the rest) and
/// SIGKILL as its parent-death signal (a killed demo leaves nothing running).
fn spawn(env: &Env, args: &[&OsStr], log: &str) -> Result<Child, DemoError> {
    let launch = Launch {
        log_filter: CHILD_LOG,
        leash: true,
    };
    Ok(env.kit.spawn(args, log, &launch)?)
}

/// Adopt the guests of dead agents (they are the agents' children, not ours), so that
/// they can be found and reaped. Best effort: without it they go to init.
fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// Kill and reap every child of ours except `keep` (guests adopted from dead agents).
/// Returns how many there were.
fn reap_orphans(keep: &[i32]) -> usize {
    let mut n = 0;
    for _ in 0..10 {
        let kids: Vec<i32> = children_of(std::process::id())
            .into_iter()
            .filter(|p| !keep.contains(p))
            .collect();
        if kids.is_empty() {
            break;
        }
        for &k in &kids {
            sigkill(k);
            // A child of ours: Ok once reaped (ECHILD if someone else reaped it).
            if waitpid(Pid::from_raw(k), None).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// An error if the target or an agent has exited.
fn check_alive(procs: &mut Processes) -> Result<(), DemoError> {
    match procs.exited() {
        Some((what, status)) => Err(DemoError::Exited { what, status }),
        None => Ok(()),
    }
}

/// SIGTERM every agent (each hands its groups over and stops its guests) and wait.
async fn stop_agents(procs: &mut Processes) -> Result<(), DemoError> {
    let ids: Vec<u16> = procs.agents.keys().copied().collect();
    for c in procs.agents.values() {
        // Our own unreaped child: its pid names no stranger.
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    let mut failures = Vec::new();
    for id in ids {
        let Some(c) = procs.agents.get_mut(&id) else {
            continue;
        };
        match wait_exit(c).await {
            Some(s) => {
                // Reaped: forget it (its pid may be reused from now on).
                procs.agents.remove(&id);
                if !s.success() {
                    failures.push(format!("the agent of {} exited {s}", node_name(id)));
                }
            }
            // Left in place for kill_all.
            None => failures.push(format!(
                "the agent of {} did not stop within {} s of SIGTERM",
                node_name(id),
                STOP_TIMEOUT.as_secs()
            )),
        }
    }
    let stray = reap_orphans(&procs.all_pids());
    if stray > 0 {
        failures.push(format!("{stray} guest(s) outlived their agent"));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Failed(failures.join("; ")))
    }
}

async fn stop_target(procs: &mut Processes) -> Result<(), DemoError> {
    let Some(c) = procs.target.as_mut() else {
        return Ok(());
    };
    // Our own unreaped child: its pid names no stranger.
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    match wait_exit(c).await {
        Some(s) if s.success() => {
            procs.target = None;
            Ok(())
        }
        Some(s) => {
            procs.target = None;
            Err(DemoError::Failed(format!("the target exited {s}")))
        }
        None => Err(DemoError::Failed(format!(
            "the target did not stop within {} s of SIGTERM",
            STOP_TIMEOUT.as_secs()
        ))),
    }
}

/// Wait (without blocking the runtime, so signals still count) up to STOP_TIMEOUT.
async fn wait_exit(c: &mut Child) -> Option<ExitStatus> {
    let end = tokio::time::Instant::now() + STOP_TIMEOUT;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}
