//! A whole cluster on loopback, as separate processes: one `holdfast target`, N
//! `holdfast agent`s, and per group a test guest (`holdfast guest run`) started by the
//! `process` driver, writing a counter to its disk through its own iSCSI session.
//! Used by tests/agent_*.rs and by the randomized fault test. The configs, the file
//! layout and the process handling are the library's cluster kit
//! (`holdfast::cli::cluster_kit`), shared with `holdfast demo`; this adds the tests'
//! policy (panics, timeouts) and fault injection.
//!
//! [`Cluster::new_partitionable`] puts each node (its agent and, through it, its guests)
//! in its own network namespace (tests/common/netns.rs), so that [`Cluster::cut`] can
//! partition a node. The target stays in the root namespace and listens on 0.0.0.0:
//! the test's own sessions (quorum reads, ctl, the checker) keep using 127.0.0.1 and
//! are never cut, and a target restarted while a link is down still binds (a down
//! link's address is not local).

use super::gateways::Gateways;
use super::netns::Netns;
use holdfast::agent::config::Timings;
use holdfast::agent::quorum::{GroupRecord, GroupState, QuorumImage};
use holdfast::agent::quorum_disk::QuorumDisk;
use holdfast::cli::cluster_kit::{self as kit, Launch, Layout, Processes};
use holdfast::cli::guest::AckEvent;
use holdfast::initiator::{InitiatorConfig, Session};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use holdfast::cli::cluster_kit::{node_name, GroupSpec, LineTail};

pub const TARGET: &str = "iqn.2026-11.org.holdfast:cluster-test";
pub const CLUSTER: &str = "testlab";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kit: Layout,
    pub bin: PathBuf,
    pub addr: SocketAddr,
    pub nodes: u16,
    pub groups: Vec<GroupSpec>,
    /// The nodes' namespaces, in partitionable mode. Dropped after `procs` is emptied
    /// (in `Drop`), so no process of ours is left in a namespace it deletes.
    net: Option<Netns>,
    procs: Processes,
    /// On Ceph: the gateways (and their Ceph cluster) instead of the one target.
    pub gateways: Option<Gateways>,
}

impl Cluster {
    /// Write the configs, start the target and format the quorum LUN (agents are
    /// started with [`Cluster::start_agent`]).
    pub async fn new(nodes: u16, groups: Vec<GroupSpec>) -> Cluster {
        Cluster::build(nodes, groups, None).await
    }

    /// [`Cluster::new`] with each node in its own network namespace, reaching the
    /// target over its own link, which [`Cluster::cut`] takes down. Needs root.
    pub async fn new_partitionable(nodes: u16, groups: Vec<GroupSpec>) -> Cluster {
        Cluster::build(nodes, groups, Some(Netns::new(nodes))).await
    }

    /// [`Cluster::new`] with its LUNs on RBD images of a Ceph cluster of its own, served
    /// by `gateways` holdfast gateways (tests/common/gateways.rs); node i's portals list
    /// every gateway, starting from a different one per node.
    pub async fn new_on_ceph(nodes: u16, groups: Vec<GroupSpec>, gateways: u16) -> Cluster {
        Cluster::build_with(nodes, groups, None, gateways).await
    }

    async fn build(nodes: u16, groups: Vec<GroupSpec>, net: Option<Netns>) -> Cluster {
        Cluster::build_with(nodes, groups, net, 0).await
    }

    async fn build_with(
        nodes: u16,
        groups: Vec<GroupSpec>,
        net: Option<Netns>,
        gateways: u16,
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
        let addr = SocketAddr::from(([127, 0, 0, 1], kit::free_port().expect("a free port")));
        let kit = Layout {
            dir: dir.path().to_path_buf(),
            exe: bin.clone(),
            addr,
            target: TARGET.into(),
            cluster: CLUSTER.into(),
        };
        std::fs::create_dir_all(kit.path("shared")).unwrap();
        let mut c = Cluster {
            dir,
            kit,
            bin,
            addr,
            nodes,
            groups,
            net,
            procs: Processes::default(),
            gateways: None,
        };
        if gateways == 0 {
            c.write_target_config();
            c.start_target().await;
        } else {
            c.gateways = Some(Gateways::start(&c.kit, &c.groups, gateways));
            c.wait_gateways().await;
        }
        let out = c.run(&["ctl", "init-quorum", &c.kit.url(0), "--cluster", CLUSTER]);
        assert!(
            out.status.success(),
            "init-quorum: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for id in 1..=nodes {
            c.write_node_config(id, &Timings::default());
        }
        if c.net.is_some() {
            // ctl runs here, in the root namespace.
            let cfg = c.kit.node_config(1, &c.groups, &Timings::default());
            kit::write_toml(&c.ctl_config(), "", &cfg).unwrap();
        }
        c
    }

    /// DIR/target.toml; partitionable: listening on every address.
    fn write_target_config(&self) {
        let mut cfg = self.kit.target_config(&self.groups);
        if self.net.is_some() {
            let any = SocketAddr::from(([0, 0, 0, 0], self.addr.port()));
            cfg.targets[0].portals[0].listen = any.to_string();
        }
        kit::write_toml(&self.kit.target_config_path(), "", &cfg).unwrap();
    }

    /// DIR/nodeN.toml with `timings`; partitionable: the portal is the target's side
    /// of the node's link.
    pub fn write_node_config(&self, id: u16, timings: &Timings) {
        let mut cfg = self.kit.node_config(id, &self.groups, timings);
        if let Some(net) = &self.net {
            let portal = SocketAddr::from((net.host_addr(id), self.addr.port()));
            cfg.target.portals = vec![portal.to_string()];
        }
        if let Some(g) = &self.gateways {
            cfg.target.portals = g.portals_for(id);
        }
        kit::write_toml(&self.node_config(id), "", &cfg).unwrap();
    }

    /// The config `ctl` runs with: node 1's, reaching the target on 127.0.0.1.
    fn ctl_config(&self) -> PathBuf {
        match self.net {
            Some(_) => self.path("ctl.toml"),
            None => self.node_config(1),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.kit.path(p)
    }

    pub fn ack_log(&self, group: &str) -> PathBuf {
        self.kit.ack_log(group)
    }

    pub fn node_config(&self, id: u16) -> PathBuf {
        self.kit.node_config_path(id)
    }

    /// Run `holdfast ARGS` to completion (ctl, guest check…).
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .env("HOLDFAST_LOG", "warn")
            .output()
            .expect("run holdfast")
    }

    /// `holdfast ctl --config nodeN.toml ARGS`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let cfg = self.ctl_config().display().to_string();
        let mut a = vec!["ctl", "--config", cfg.as_str()];
        a.extend_from_slice(args);
        self.run(&a)
    }

    /// Start `holdfast ARGS`, in node `node`'s namespace if there is one.
    fn spawn(
        &self,
        node: Option<u16>,
        args: &[&std::ffi::OsStr],
        log: &str,
        log_filter: &str,
    ) -> std::process::Child {
        let launch = Launch {
            log_filter,
            leash: false,
        };
        let wrapper = match (&self.net, node) {
            (Some(net), Some(id)) => net.exec_prefix(id),
            _ => vec![],
        };
        self.kit
            .spawn_via(&wrapper, args, log, &launch)
            .expect("spawn holdfast")
    }

    pub async fn start_target(&mut self) {
        let config = self.kit.target_config_path();
        let child = self.spawn(
            None,
            &["target".as_ref(), "--config".as_ref(), config.as_ref()],
            "target.log",
            "info",
        );
        self.procs.target = Some(child);
        let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:probe", TARGET, self.addr);
        for _ in 0..400 {
            if kit::accepts_login(&cfg).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "target did not come up; see {}",
            self.path("target.log").display()
        );
    }

    /// Wait until every gateway accepts logins.
    async fn wait_gateways(&self) {
        let portals = self.gateways.as_ref().map_or(vec![], |g| g.portals.clone());
        for p in portals {
            let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:probe", TARGET, p);
            let end = Instant::now() + Duration::from_secs(60);
            while !kit::accepts_login(&cfg).await {
                assert!(
                    Instant::now() < end,
                    "gateway {p} did not come up\n{}",
                    self.diagnostics()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// SIGKILL the target (APTPL state and data are on disk).
    pub fn kill_target(&mut self) {
        self.procs.kill_target();
    }

    pub fn start_agent(&mut self, id: u16) {
        let config = self.node_config(id);
        let child = self.spawn(
            Some(id),
            &["agent".as_ref(), "--config".as_ref(), config.as_ref()],
            &format!("agent{id}.log"),
            "info,holdfast::initiator=warn",
        );
        self.procs.agents.insert(id, child);
    }

    pub fn agent_pid(&self, id: u16) -> Option<i32> {
        self.procs.agent_pid(id)
    }

    /// The node's whole process tree: agent and its VMs.
    pub fn node_pids(&self, id: u16) -> Vec<i32> {
        self.procs.node_pids(id)
    }

    /// SIGSTOP the agent and wait until all its threads are stopped: from then on it
    /// cannot start a VM, so listing its children afterwards misses none.
    fn stop_agent_process(&self, id: u16) {
        let Some(pid) = self.agent_pid(id) else {
            return;
        };
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !kit::all_threads_stopped(pid) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// kill -9 of the node: the agent and its guests at once.
    pub fn kill_node(&mut self, id: u16) {
        // The agent is stopped first so that a VM it is spawning right now is listed
        // and killed too (a guest outliving its "node" would be a harness artefact).
        self.stop_agent_process(id);
        self.procs.kill_node(id);
    }

    /// SIGSTOP the node (agent and guests): a frozen host.
    pub fn freeze_node(&self, id: u16) -> Vec<i32> {
        self.stop_agent_process(id);
        let pids = self.node_pids(id);
        for &p in &pids {
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        pids
    }

    pub fn thaw(&self, pids: &[i32]) {
        for &p in pids {
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }

    /// SIGTERM the agent and wait for it (it hands its groups over).
    pub fn stop_agent(&mut self, id: u16) {
        if let Some(mut c) = self.procs.agents.remove(&id) {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn is_running(&self, pid: i32) -> bool {
        kit::is_running(pid)
    }

    /// Read the quorum LUN with our own session.
    pub async fn image(&self) -> QuorumImage {
        let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:observer", TARGET, self.addr);
        for _ in 0..100 {
            if let Ok(s) = Session::login(cfg.clone()).await {
                if let Ok((q, _)) =
                    QuorumDisk::open(s.clone(), 0, CLUSTER, Duration::from_secs(5)).await
                {
                    if let Ok(img) = q.read_image().await {
                        let _ = s.logout().await;
                        return img;
                    }
                }
                let _ = s.logout().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot read the quorum LUN");
    }

    pub async fn record(&self, group: &str) -> Option<GroupRecord> {
        self.image().await.group(group).map(|(_, r, _)| r.clone())
    }

    /// Wait until `pred` holds for the group's record.
    pub async fn wait_record(
        &self,
        group: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&GroupRecord) -> bool,
    ) -> GroupRecord {
        let end = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < end {
            if let Some(r) = self.record(group).await {
                if pred(&r) {
                    return r;
                }
                last = Some(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {group}: {what}; last record {last:?}\n{}",
            self.diagnostics()
        );
    }

    pub async fn wait_running(
        &self,
        group: &str,
        on: Option<u16>,
        timeout: Duration,
    ) -> GroupRecord {
        self.wait_record(group, timeout, &format!("running on {on:?}"), |r| {
            r.state == GroupState::Running && on.is_none_or(|n| r.owner == n)
        })
        .await
    }

    pub async fn wait_running_elsewhere(
        &self,
        group: &str,
        not: u16,
        timeout: Duration,
    ) -> GroupRecord {
        self.wait_record(
            group,
            timeout,
            &format!("running elsewhere than node {not}"),
            |r| r.state == GroupState::Running && r.owner != not,
        )
        .await
    }

    /// All events of all agents so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The ack log's lines.
    pub fn acks(&self, group: &str) -> Vec<String> {
        std::fs::read_to_string(self.ack_log(group))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Acked writes so far by the run with `epoch`.
    pub fn acked_in_epoch(&self, group: &str, epoch: u64) -> usize {
        self.kit.acks_in(group, epoch).len()
    }

    /// Wait until the run of `epoch` has acknowledged `n` writes.
    pub async fn wait_acks(&self, group: &str, epoch: u64, n: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.acked_in_epoch(group, epoch) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "run {epoch} of {group} did not ack {n} writes\n{}",
            self.diagnostics()
        );
    }

    /// `holdfast guest check` over the group's disk and ack log: must be clean.
    pub fn check(&self, group: &str) -> String {
        self.check_logs(group, &[self.ack_log(group)], &self.diagnostics())
    }

    /// `holdfast guest check` over the group's disk and these ack logs: must be clean;
    /// `diagnostics` go into the failure message.
    pub fn check_logs(&self, group: &str, logs: &[PathBuf], diagnostics: &str) -> String {
        let g = self.groups.iter().find(|g| g.name == group).expect("group");
        let mut args = vec!["guest".to_string(), "check".into(), "--disk".into()];
        args.push(self.kit.url(g.lun));
        for l in logs {
            args.push("--ack-log".into());
            args.push(l.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "guest check of {group} failed:\n{text}\n{diagnostics}"
        );
        text
    }

    /// The tail of every log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut names = vec!["target.log".to_string(), "events.jsonl".to_string()];
        for i in 1..=self.gateways.as_ref().map_or(0, Gateways::count) {
            names.push(format!("gw{i}.log"));
        }
        for id in 1..=self.nodes {
            names.push(format!("agent{id}.log"));
        }
        for g in &self.groups {
            names.push(format!("acks-{}.log", g.name));
        }
        self.kit.log_tails(&names, 40)
    }

    pub fn keep_dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Partitions (partitionable clusters only).
impl Cluster {
    fn net(&self) -> &Netns {
        self.net
            .as_ref()
            .expect("a partition needs Cluster::new_partitionable")
    }

    pub fn is_partitionable(&self) -> bool {
        self.net.is_some()
    }

    /// Partition node `id` from the target: its link goes down (no RST, packets
    /// vanish), for its agent and its guests alike.
    pub fn cut(&self, id: u16) {
        self.net().cut(id);
    }

    /// End node `id`'s partition.
    pub fn heal(&self, id: u16) {
        self.net().heal(id);
    }

    /// Node `id`'s network namespace.
    pub fn namespace(&self, id: u16) -> &str {
        self.net().namespace(id)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Never leave processes behind a failed assertion: guests first, then agents.
        self.procs.kill_all();
        self.gateways = None;
        if std::env::var_os("KEEP_CLUSTER").is_some() {
            let p = self.dir.path().to_path_buf();
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().unwrap(),
            ));
            eprintln!("cluster files kept in {}", p.display());
        }
    }
}

/// Helpers for the fault test and the failover benchmark.
impl Cluster {
    /// Whether this harness has an agent process for node `id` (started, not killed or
    /// stopped since; it may be frozen).
    pub fn has_agent(&self, id: u16) -> bool {
        self.procs.agents.contains_key(&id)
    }

    /// Nodes with an agent process, in id order.
    pub fn agents_up(&self) -> Vec<u16> {
        self.procs.agents.keys().copied().collect()
    }

    /// SIGTERM the agent (it hands its groups over) and wait up to `timeout` for it to
    /// exit. `None` if it did not: then the node is killed (kill -9) instead.
    pub fn stop_agent_within(
        &mut self,
        id: u16,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut c = self.procs.agents.remove(&id)?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.procs.agents.insert(id, c);
        self.kill_node(id);
        None
    }

    /// Wait until node `id` has logged `agent-start` at or after `since` (mono_ns): its
    /// SIGTERM handler is installed by then, so a stop is a graceful one.
    pub async fn wait_agent_started(&self, id: u16, since: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let name = node_name(id);
        while Instant::now() < end {
            if self.events().iter().any(|e| {
                e["event"] == "agent-start"
                    && e["node"] == name.as_str()
                    && e["mono_ns"].as_u64().is_some_and(|t| t >= since)
            }) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn target_running(&self) -> bool {
        self.procs.target.is_some()
    }

    /// Every guest (VM process) of every agent that is not gone: (node, pid, stopped).
    /// A stopped guest is a paused VM (SIGSTOP) or one of a frozen node.
    pub fn guests(&self) -> Vec<(u16, i32, bool)> {
        self.agents_up()
            .into_iter()
            .flat_map(|id| self.guest_pids(id).into_iter().map(move |p| (id, p)))
            .filter(|&(_, p)| kit::is_running(p))
            .map(|(id, p)| (id, p, is_stopped(p)))
            .collect()
    }

    /// The guests (VM processes) the node's agent runs now.
    pub fn guest_pids(&self, id: u16) -> Vec<i32> {
        self.agent_pid(id)
            .map(|p| kit::children_of(p as u32))
            .unwrap_or_default()
    }
}

/// Whether `pid` is stopped (state T: SIGSTOP).
pub fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// Acknowledged writes per epoch of one group, kept up to date from its ack log
/// without re-reading the whole file (long fault runs make it large).
pub struct AckTally {
    tail: LineTail,
    per_epoch: BTreeMap<u64, usize>,
}

impl AckTally {
    pub fn new(c: &Cluster, group: &str) -> AckTally {
        AckTally {
            tail: LineTail::new(c.ack_log(group), true),
            per_epoch: BTreeMap::new(),
        }
    }

    pub fn acked_in_epoch(&mut self, epoch: u64) -> usize {
        self.refresh();
        self.per_epoch.get(&epoch).copied().unwrap_or(0)
    }

    /// Acknowledged writes per epoch so far.
    pub fn counts(&mut self) -> BTreeMap<u64, usize> {
        self.refresh();
        self.per_epoch.clone()
    }

    fn refresh(&mut self) {
        for l in self.tail.read_new() {
            if let Some(AckEvent::Ack { epoch, .. }) = AckEvent::parse(&l) {
                *self.per_epoch.entry(epoch).or_default() += 1;
            }
        }
    }
}

/// The events among `all` named `name` (`ctl events --json` lines).
pub fn events_named(all: &[serde_json::Value], name: &str) -> Vec<serde_json::Value> {
    all.iter().filter(|e| e["event"] == name).cloned().collect()
}

/// A finished command's exit status and output, for assertion messages.
pub fn show_output(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}stderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Poll `done` every 50 ms until it holds; after `limit`, fail with `what` and
/// `diagnostics()`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    done: impl Fn() -> bool,
    diagnostics: impl Fn() -> String,
) {
    let end = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < end, "timed out: {what}\n{}", diagnostics());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
