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
//! Every process is a child of this one (target, agents) or a grandchild (guests, which
//! this process collects as a child subreaper once their agent is gone). Each runs in
//! its own process group with a parent-death signal, so a Ctrl-C at the terminal reaches
//! only the demo, which then kills them all. Even a SIGKILL of the demo takes the target
//! and the agents with it; their guests then give up (exit 1) once the target has been
//! gone for 30 s.

use crate::agent::config::{self as agent_config, AgentConfigError, ValidNodeConfig};
use crate::agent::node::mono_ns;
use crate::agent::quorum::{GroupRecord, GroupState, NodeState, QuorumImage};
use crate::agent::AgentError;
use crate::cli::ctl::{self, Ctl};
use crate::cli::guest::{self, CheckArgs, GuestError};
use crate::initiator::{InitiatorConfig, Session};
use std::collections::BTreeMap;
use std::fmt::Display;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
        None => free_port()?,
    };
    let env = Env {
        dir: dir.clone(),
        exe,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        say,
    };
    become_subreaper();
    let mut procs = Procs::default();
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
                diagnostics(&dir)
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
    dir: PathBuf,
    exe: PathBuf,
    addr: SocketAddr,
    say: Narrator,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn node_config(&self, id: u16) -> PathBuf {
        self.path(&format!("node{id}.toml"))
    }
    fn ack_log(&self, group: &str) -> PathBuf {
        self.path(&format!("acks-{group}.log"))
    }
    fn url(&self, lun: u64) -> String {
        format!("iscsi://{}/{TARGET}/{lun}", self.addr)
    }
    fn load(&self, id: u16) -> Result<ValidNodeConfig, DemoError> {
        Ok(agent_config::load_file(&self.node_config(id))?)
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

fn node_name(id: u16) -> String {
    format!("node{id}")
}

async fn scenario(env: &Env, procs: &mut Procs) -> Result<DemoReport, DemoError> {
    let say = env.say;
    say.say(format!(
        "holdfast demo: a three-node cluster on this machine, files in {}",
        env.dir.display()
    ));
    write_configs(env)?;

    // 1. The target.
    say.say(format!(
        "starting the iSCSI target {TARGET} on {}: LUN 0 is the quorum LUN, LUN 1 web's \
         disk, LUN 2 db's disk",
        env.addr
    ));
    procs.target = Some(spawn(
        env,
        &["target", "--config", &path_arg(&env.path("target.toml"))],
        "target.log",
    )?);
    wait_target_up(env, procs).await?;
    say.say("target is up");

    // 2. The quorum LUN, and the groups' records (offline, so that nobody claims a group
    //    before all three nodes have joined and placement can honour preferred owners).
    let url: crate::initiator::IscsiUrl = env
        .url(0)
        .parse()
        .map_err(|e| DemoError::Failed(format!("{}: {e}", env.url(0))))?;
    let msg = ctl::init_quorum(&url, "iqn.2026-11.org.holdfast:ctl", CLUSTER, false, None)
        .await
        .map_err(agent_err("ctl init-quorum"))?;
    say.say(msg);
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
    say.say("created the records of groups web and db, offline until every node has joined");

    // 3. The agents.
    for id in 1..=NODES {
        let cfg = path_arg(&env.node_config(id));
        let child = spawn(env, &["agent", "--config", &cfg], &format!("agent{id}.log"))?;
        say.say(format!(
            "started the agent of {} (pid {})",
            node_name(id),
            child.id()
        ));
        procs.agents.insert(id, child);
    }
    wait_nodes_joined(procs, &admin).await?;
    say.say("all three nodes heartbeat on the quorum LUN");
    for (g, _, pref) in GROUPS {
        admin
            .update_group(g, |r, _| ctl::req_online(r))
            .await
            .map_err(agent_err(format!("ctl online {g}")))?;
        say.say(format!(
            "group {g} set online (preferred owners {})",
            pref.join(", ")
        ));
    }
    admin.close().await;

    // 4. Both groups run, and their guests write.
    let observer = Ctl::connect(env.load(NODES)?)
        .await
        .map_err(agent_err("ctl (observer)"))?;
    let mut runs = BTreeMap::new();
    for (g, _, _) in GROUPS {
        let r = wait_group(procs, &observer, g, "to run", |r| {
            r.state == GroupState::Running
        })
        .await?;
        say.say(format!(
            "{g} runs on {} (epoch {}): its guest writes a counter to LUN {}",
            node_name(r.owner),
            r.epoch,
            lun_of(g)
        ));
        runs.insert(g, r);
    }
    for (g, r) in &runs {
        wait_acks(env, procs, g, r.epoch).await?;
    }
    say.say(format!(
        "both guests have {ACKS}+ acknowledged writes (web {}, db {})",
        acks_in(env, "web", runs["web"].epoch).len(),
        acks_in(env, "db", runs["db"].epoch).len()
    ));
    print_status(env, &observer).await?;

    // 5. kill -9 the owner of the first group: agent and guest at once.
    let (group, _, _) = GROUPS[0];
    let before = runs[group].clone();
    let victim = before.owner;
    let victim_name = node_name(victim);
    let pids = procs.node_pids(victim);
    let mut events = EventTail::new(env.path("events.jsonl"));
    events.skip_existing();
    let dead_after = env.load(1)?.timings().dead_after;
    let killed_at = mono_ns();
    procs.kill_node(victim);
    say.at(
        killed_at,
        format!(
            "kill -9 {victim_name}, which owns {group}: its agent and its guest (pids {})",
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let last_acked = acks_in(env, group, before.epoch).last().copied();
    say.say(format!(
        "{group}'s last acknowledged write before the kill: counter {}; the survivors \
         take over once {victim_name}'s heartbeat has been still for dead_after = {} ms",
        last_acked.map_or("-".into(), |c| c.to_string()),
        dead_after.as_millis()
    ));

    // 6. The group comes back on a survivor.
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let (started_ns, new_owner, new_epoch) = loop {
        procs.check_alive()?;
        let mut found = None;
        for e in events.new_events() {
            let ns = e["mono_ns"].as_u64().unwrap_or(0);
            if ns < killed_at {
                continue;
            }
            narrate_event(&say, &e);
            if e["event"] == "vm-started"
                && e["group"] == group
                && e["node"].as_str() != Some(victim_name.as_str())
            {
                found = Some((
                    ns,
                    e["node"].as_str().unwrap_or("?").to_string(),
                    e["epoch"].as_u64().unwrap_or(0),
                ));
            }
        }
        if let Some(f) = found {
            break f;
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Failed(format!(
                "{group} did not come back on a survivor within {} s of the kill",
                STEP_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let failover = Duration::from_nanos(started_ns.saturating_sub(killed_at));
    say.at(
        started_ns,
        format!(
            "{group} runs again, on {new_owner} (epoch {new_epoch}): failover time {:.3} s",
            failover.as_secs_f64()
        ),
    );
    let after = wait_group(procs, &observer, group, "to run on a survivor", |r| {
        r.state == GroupState::Running && r.owner != victim && r.epoch == new_epoch
    })
    .await?;
    wait_acks(env, procs, group, after.epoch).await?;
    let first = ack_log_start(env, group, after.epoch);
    say.say(format!(
        "{group}'s new run started at counter {} (above every acknowledged write) and has \
         {ACKS}+ acknowledged writes",
        first.map_or("-".into(), |c| c.to_string()),
    ));
    for (g, _, _) in &GROUPS[1..] {
        if runs[g].owner == victim {
            let r = wait_group(procs, &observer, g, "to run on a survivor", |r| {
                r.state == GroupState::Running && r.owner != victim
            })
            .await?;
            say.say(format!("{g} runs again too, on {}", node_name(r.owner)));
        } else {
            say.say(format!(
                "{g} still runs on {}, untouched",
                node_name(runs[g].owner)
            ));
        }
    }
    print_status(env, &observer).await?;
    observer.close().await;

    // 7. The proof: no lost acknowledged write, no double run, no late write.
    let mut verdicts = Vec::new();
    for (g, lun, _) in GROUPS {
        let ack_log = env.ack_log(g);
        say.say(format!(
            "checking {g}'s disk against its guests' ack log (holdfast guest check --disk {} \
             --ack-log {})",
            env.url(lun),
            ack_log.display()
        ));
        let report = guest::check_disk(&CheckArgs {
            disk: env.url(lun),
            ack_log: vec![ack_log],
            json: false,
            chap_user: None,
            chap_secret: None,
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

    // 8. Stop: the agents hand their groups back and stop their guests, then the target.
    say.say(format!(
        "stopping: SIGTERM to the agents of {} (each stops its guest and leaves the cluster)",
        procs
            .agents
            .keys()
            .map(|&id| node_name(id))
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    procs.stop_agents().await?;
    say.say("agents stopped");
    procs.stop_target().await?;
    say.say("target stopped");
    Ok(DemoReport {
        group: group.into(),
        from: victim_name,
        to: new_owner,
        failover,
        checks: verdicts,
        elapsed: Duration::ZERO,
    })
}

fn lun_of(group: &str) -> u64 {
    GROUPS
        .iter()
        .find(|(g, _, _)| *g == group)
        .map_or(0, |(_, l, _)| *l)
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

/// A TOML string (quotes and escapes).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML array of strings.
fn toml_list<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|a| toml_str(a.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

fn write_configs(env: &Env) -> Result<(), DemoError> {
    let write = |name: &str, text: String| {
        std::fs::write(env.path(name), text).map_err(io_err(format!("writing {name}")))
    };
    let mut luns = String::from("[[target.lun]]\nid = 0\npath = \"quorum.img\"\nsize = \"4MiB\"\n");
    for (g, lun, _) in GROUPS {
        luns.push_str(&format!(
            "[[target.lun]]\nid = {lun}\npath = \"{g}.img\"\nsize = \"16MiB\"\n"
        ));
    }
    write(
        "target.toml",
        format!(
            "# holdfast demo: the shared storage\ndata_dir = {}\n[iscsi]\nnop_interval_secs = 2\n\
             nop_timeout_secs = 4\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\n\
             listen = \"{}\"\ntpgt = 1\n{luns}",
            toml_str(&path_arg(&env.path("data"))),
            env.addr
        ),
    )?;
    for id in 1..=NODES {
        let mut groups = String::new();
        for (g, lun, pref) in GROUPS {
            let cmd = [
                path_arg(&env.exe),
                "guest".into(),
                "run".into(),
                "--disk".into(),
                "{disk0}".into(),
                "--initiator-name".into(),
                "{initiator_name}".into(),
                "--epoch".into(),
                "{epoch}".into(),
                "--ack-log".into(),
                path_arg(&env.ack_log(g)),
                "--state-file".into(),
                "{state_file}".into(),
            ];
            groups.push_str(&format!(
                "\n[[group]]\nname = \"{g}\"\ndisks = [{lun}]\npreferred_owners = [{}]\n\
                 monitor_interval = \"500ms\"\noffline_action = \"shutdown\"\n\
                 stop_timeout = \"5s\"\n[group.vm]\ndriver = \"process\"\ncommand = [{}]\n\
                 restore_args = [\"--restore\"]\nsave_signal = \"SIGUSR1\"\n",
                toml_list(&pref),
                toml_list(&cmd),
            ));
        }
        write(
            &format!("node{id}.toml"),
            format!(
                "# holdfast demo: the agent of node{id}\n[node]\nname = \"node{id}\"\nid = {id}\n\
                 cluster = \"{CLUSTER}\"\nstate_dir = {}\nshared_state_dir = {}\n\
                 event_log = {}\n[target]\nportals = [\"{}\"]\nname = \"{TARGET}\"\n\
                 quorum_lun = 0\n{groups}",
                toml_str(&path_arg(&env.path(&format!("node{id}")))),
                toml_str(&path_arg(&env.path("shared"))),
                toml_str(&path_arg(&env.path("events.jsonl"))),
                env.addr
            ),
        )?;
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

fn free_port() -> Result<u16, DemoError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("finding a free port on 127.0.0.1"))
}

// ---------------------------------------------------------------------------------------
// Waiting

async fn wait_target_up(env: &Env, procs: &mut Procs) -> Result<(), DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:demo-probe", TARGET, env.addr);
    cfg.login_timeout = Duration::from_secs(2);
    loop {
        procs.check_alive()?;
        if let Ok(s) = Session::login(cfg.clone()).await {
            let _ = s.logout().await;
            return Ok(());
        }
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Timeout {
                what: format!("the target to accept logins on {}", env.addr),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Until every node's slot is active and its counter has moved twice since we first
/// saw it.
async fn wait_nodes_joined(procs: &mut Procs, c: &Ctl) -> Result<(), DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut first: BTreeMap<u16, u64> = BTreeMap::new();
    loop {
        procs.check_alive()?;
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
    procs: &mut Procs,
    c: &Ctl,
    group: &str,
    what: &str,
    pred: impl Fn(&GroupRecord) -> bool,
) -> Result<GroupRecord, DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut last = String::from("no record read yet");
    loop {
        procs.check_alive()?;
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

/// Counters acknowledged by the run of `epoch`, in log order.
fn acks_in(env: &Env, group: &str, epoch: u64) -> Vec<u64> {
    ack_lines(env, group)
        .filter(|f| f.len() >= 4 && f[0] == "ack" && f[2] == epoch.to_string())
        .filter_map(|f| f[3].parse().ok())
        .collect()
}

/// The first counter of the run of `epoch` (its `start` line).
fn ack_log_start(env: &Env, group: &str, epoch: u64) -> Option<u64> {
    ack_lines(env, group)
        .find(|f| f.len() >= 4 && f[0] == "start" && f[2] == epoch.to_string())
        .and_then(|f| f[3].parse().ok())
}

/// The ack log's lines, split into fields.
fn ack_lines(env: &Env, group: &str) -> impl Iterator<Item = Vec<String>> {
    let text = std::fs::read_to_string(env.ack_log(group)).unwrap_or_default();
    let lines: Vec<Vec<String>> = text
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect();
    lines.into_iter()
}

async fn wait_acks(env: &Env, procs: &mut Procs, group: &str, epoch: u64) -> Result<(), DemoError> {
    let end = tokio::time::Instant::now() + STEP_TIMEOUT;
    while acks_in(env, group, epoch).len() < ACKS {
        procs.check_alive()?;
        if tokio::time::Instant::now() >= end {
            return Err(DemoError::Timeout {
                what: format!("{group}'s guest (epoch {epoch}) to acknowledge {ACKS} writes"),
            });
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// The agents' events.jsonl, read as it grows.
struct EventTail {
    path: PathBuf,
    /// Bytes already consumed (whole lines only).
    offset: usize,
}

impl EventTail {
    fn new(path: PathBuf) -> EventTail {
        EventTail { path, offset: 0 }
    }

    fn skip_existing(&mut self) {
        let _ = self.new_events();
    }

    fn new_events(&mut self) -> Vec<serde_json::Value> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return vec![];
        };
        let Some(rest) = text.get(self.offset..) else {
            return vec![];
        };
        // Only complete lines: an agent may be halfway through writing the last one.
        let Some(end) = rest.rfind('\n') else {
            return vec![];
        };
        self.offset += end + 1;
        rest[..end]
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The tail of every log, for a failure report.
fn diagnostics(dir: &Path) -> String {
    let mut names = vec!["target.log".to_string(), "events.jsonl".to_string()];
    for id in 1..=NODES {
        names.push(format!("agent{id}.log"));
        for (g, _, _) in GROUPS {
            names.push(format!("node{id}/{g}.log"));
        }
    }
    for (g, _, _) in GROUPS {
        names.push(format!("acks-{g}.log"));
    }
    let mut s = String::new();
    for n in names {
        let Ok(text) = std::fs::read_to_string(dir.join(&n)) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(15)..];
        s.push_str(&format!("---- {n} (last {} lines)\n", tail.len()));
        for l in tail {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Processes

/// Start `holdfast ARGS` (this executable) with stderr appended to DIR/`log`, in its own
/// process group (a Ctrl-C at the terminal reaches only the demo, which stops the rest),
/// with SIGKILL as its parent-death signal (a killed demo leaves nothing running).
fn spawn(env: &Env, args: &[&str], log: &str) -> Result<Child, DemoError> {
    let what = format!("starting holdfast {}", args[0]);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.path(log))
        .map_err(io_err(what.clone()))?;
    let parent = std::process::id();
    let mut cmd = Command::new(&env.exe);
    cmd.args(args)
        .env("HOLDFAST_LOG", CHILD_LOG)
        // An error's first line is what the failure report needs, not its backtrace.
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    // SAFETY: between fork and exec, only async-signal-safe calls and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) != 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The demo died before the prctl: nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(io_err(what))
}

/// Adopt the guests of dead agents (they are the agents' children, not ours), so that
/// they can be found and reaped. Best effort: without it they go to init.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong);
    }
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the ")" that ends the command name.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) with a pid we started or adopted (still unreaped, so not reused);
    // the negative form reaches its process group (guests lead their own).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
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
            let mut status = 0;
            // SAFETY: waitpid on a child of ours, with a status int we own.
            if unsafe { libc::waitpid(k, &mut status, 0) } == k {
                n += 1;
            }
        }
    }
    n
}

/// The target and the agents, by node id.
#[derive(Default)]
struct Procs {
    target: Option<Child>,
    agents: BTreeMap<u16, Child>,
}

impl Procs {
    /// An error if the target or an agent has exited.
    fn check_alive(&mut self) -> Result<(), DemoError> {
        let exited = |c: &mut Child| c.try_wait().ok().flatten();
        if let Some(status) = self.target.as_mut().and_then(exited) {
            self.target = None;
            return Err(DemoError::Exited {
                what: "the target".into(),
                status,
            });
        }
        for (&id, c) in self.agents.iter_mut() {
            if let Some(status) = exited(c) {
                self.agents.remove(&id);
                return Err(DemoError::Exited {
                    what: format!("the agent of {}", node_name(id)),
                    status,
                });
            }
        }
        Ok(())
    }

    /// The agent of node `id` and its VMs (the guests it started).
    fn node_pids(&self, id: u16) -> Vec<i32> {
        let Some(a) = self.agents.get(&id) else {
            return vec![];
        };
        let mut v = vec![a.id() as i32];
        v.extend(children_of(a.id()));
        v
    }

    /// kill -9 of a node: its agent and its guests at once, then reap them all.
    fn kill_node(&mut self, id: u16) {
        let pids = self.node_pids(id);
        for &p in &pids {
            sigkill(p);
        }
        if let Some(mut a) = self.agents.remove(&id) {
            let _ = a.wait();
        }
        // The agent is reaped, so its guests have been handed to us (subreaper).
        for &p in &pids[1..] {
            let mut status = 0;
            // SAFETY: waitpid with a status int we own; ECHILD if it is not ours.
            unsafe { libc::waitpid(p, &mut status, 0) };
        }
    }

    /// SIGTERM every agent (each hands its groups over and stops its guests) and wait.
    async fn stop_agents(&mut self) -> Result<(), DemoError> {
        let ids: Vec<u16> = self.agents.keys().copied().collect();
        for c in self.agents.values() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let mut failures = Vec::new();
        for id in ids {
            let Some(c) = self.agents.get_mut(&id) else {
                continue;
            };
            match wait_exit(c).await {
                Some(s) => {
                    // Reaped: forget it (its pid may be reused from now on).
                    self.agents.remove(&id);
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
        let keep: Vec<i32> = self.all_pids();
        let stray = reap_orphans(&keep);
        if stray > 0 {
            failures.push(format!("{stray} guest(s) outlived their agent"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DemoError::Failed(failures.join("; ")))
        }
    }

    async fn stop_target(&mut self) -> Result<(), DemoError> {
        let Some(c) = self.target.as_mut() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        match wait_exit(c).await {
            Some(s) if s.success() => {
                self.target = None;
                Ok(())
            }
            Some(s) => {
                self.target = None;
                Err(DemoError::Failed(format!("the target exited {s}")))
            }
            None => Err(DemoError::Failed(format!(
                "the target did not stop within {} s of SIGTERM",
                STOP_TIMEOUT.as_secs()
            ))),
        }
    }

    fn all_pids(&self) -> Vec<i32> {
        self.agents
            .values()
            .chain(self.target.iter())
            .map(|c| c.id() as i32)
            .collect()
    }

    /// SIGKILL whatever still runs: the agents with their guests, then the target.
    fn kill_all(&mut self) {
        let ids: Vec<u16> = self.agents.keys().copied().collect();
        for id in ids {
            self.kill_node(id);
        }
        if let Some(mut t) = self.target.take() {
            sigkill(t.id() as i32);
            let _ = t.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // A panic must not leave processes behind either.
        self.kill_all();
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
