//! A whole cluster on loopback, as separate processes: one `holdfast target`, N
//! `holdfast agent`s, and per group a test guest (`holdfast guest run`) started by the
//! `process` driver, writing a counter to its disk through its own iSCSI session.
//! Used by tests/agent_*.rs and by the randomized fault test.

use holdfast::agent::quorum::{GroupRecord, GroupState, QuorumImage};
use holdfast::agent::quorum_disk::QuorumDisk;
use holdfast::initiator::{InitiatorConfig, Session};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TARGET: &str = "iqn.2026-11.org.holdfast:cluster-test";
pub const CLUSTER: &str = "testlab";

#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub name: String,
    pub lun: u64,
    pub preferred: Vec<String>,
    /// Extra TOML lines for the group (failback, restart_threshold, offline_action…).
    pub extra: String,
    /// Extra arguments for the guest (e.g. --fail-after).
    pub guest_args: Vec<String>,
    /// Every node lists itself as the first preferred owner (so that after a failure
    /// several survivors each believe they should claim: a real race).
    pub prefer_self: bool,
}

impl GroupSpec {
    pub fn new(name: &str, lun: u64) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            lun,
            preferred: vec![],
            extra: String::new(),
            guest_args: vec![],
            prefer_self: false,
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub addr: SocketAddr,
    pub nodes: u16,
    pub groups: Vec<GroupSpec>,
    target: Option<Child>,
    agents: BTreeMap<u16, Child>,
    /// Extra `[timings]` lines for every node.
    pub timings: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn node_name(id: u16) -> String {
    format!("node{id}")
}

impl Cluster {
    /// Write the configs, start the target and format the quorum LUN (agents are
    /// started with [`Cluster::start_agent`]).
    pub async fn new(nodes: u16, groups: Vec<GroupSpec>) -> Cluster {
        Self::with_timings(nodes, groups, "").await
    }

    pub async fn with_timings(nodes: u16, groups: Vec<GroupSpec>, timings: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut luns =
            String::from("[[target.lun]]\nid = 0\npath = \"quorum.img\"\nsize = \"4MiB\"\n");
        for g in &groups {
            luns.push_str(&format!(
                "[[target.lun]]\nid = {}\npath = \"{}.img\"\nsize = \"16MiB\"\n",
                g.lun, g.name
            ));
        }
        let tcfg = format!(
            "data_dir = \"{}\"\n[iscsi]\nnop_interval_secs = 2\nnop_timeout_secs = 4\n\
             [[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{addr}\"\ntpgt = 1\n{luns}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("target.toml"), tcfg).unwrap();
        std::fs::create_dir_all(dir.path().join("shared")).unwrap();
        let mut c = Cluster {
            dir,
            bin,
            addr,
            nodes,
            groups,
            target: None,
            agents: BTreeMap::new(),
            timings: timings.to_string(),
        };
        c.start_target().await;
        let out = c.run(&[
            "ctl",
            "init-quorum",
            &format!("iscsi://{addr}/{TARGET}/0"),
            "--cluster",
            CLUSTER,
        ]);
        assert!(
            out.status.success(),
            "init-quorum: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for id in 1..=nodes {
            c.write_node_config(id);
        }
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn ack_log(&self, group: &str) -> PathBuf {
        self.path(&format!("acks-{group}.log"))
    }

    pub fn node_config(&self, id: u16) -> PathBuf {
        self.path(&format!("node{id}.toml"))
    }

    fn write_node_config(&self, id: u16) {
        let mut groups = String::new();
        for g in &self.groups {
            let mut cmd = vec![
                self.bin.display().to_string(),
                "guest".into(),
                "run".into(),
                "--disk".into(),
                "{disk0}".into(),
                "--initiator-name".into(),
                "{initiator_name}".into(),
                "--epoch".into(),
                "{epoch}".into(),
                "--ack-log".into(),
                self.ack_log(&g.name).display().to_string(),
                "--state-file".into(),
                "{state_file}".into(),
                // A write aborted by PREEMPT AND ABORT gets no answer: give up on it soon.
                "--io-timeout".into(),
                "2s".into(),
            ];
            cmd.extend(g.guest_args.iter().cloned());
            let quoted: Vec<String> = cmd.iter().map(|a| format!("{a:?}")).collect();
            groups.push_str(&format!(
                "[[group]]\nname = \"{}\"\ndisks = [{}]\npreferred_owners = [{}]\nmonitor_interval = \"200ms\"\n{}\n\
                 [group.vm]\ndriver = \"process\"\ncommand = [{}]\nrestore_args = [\"--restore\"]\nsave_signal = \"SIGUSR1\"\n",
                g.name,
                g.lun,
                if g.prefer_self {
                    format!("{:?}", node_name(id))
                } else {
                    g.preferred
                        .iter()
                        .map(|p| format!("{p:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                g.extra,
                quoted.join(", ")
            ));
        }
        let text = format!(
            "[node]\nname = \"{}\"\nid = {id}\ncluster = \"{CLUSTER}\"\nstate_dir = \"{}\"\n\
             shared_state_dir = \"{}\"\nevent_log = \"{}\"\n\
             [target]\nportals = [\"{}\"]\nname = \"{TARGET}\"\nquorum_lun = 0\n\
             [timings]\n{}\n{groups}",
            node_name(id),
            self.path(&format!("state{id}")).display(),
            self.path("shared").display(),
            self.path("events.jsonl").display(),
            self.addr,
            self.timings,
        );
        std::fs::write(self.node_config(id), text).unwrap();
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
        let cfg = self.node_config(1).display().to_string();
        let mut a = vec!["ctl", "--config", cfg.as_str()];
        a.extend_from_slice(args);
        self.run(&a)
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap()
    }

    pub async fn start_target(&mut self) {
        let child = Command::new(&self.bin)
            .arg("target")
            .arg("--config")
            .arg(self.path("target.toml"))
            .env("HOLDFAST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log("target.log"))
            .spawn()
            .expect("spawn target");
        self.target = Some(child);
        let cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:probe", TARGET, self.addr);
        for _ in 0..400 {
            if let Ok(s) = Session::login(cfg.clone()).await {
                let _ = s.logout().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "target did not come up; see {}",
            self.path("target.log").display()
        );
    }

    /// SIGKILL the target (APTPL state and data are on disk).
    pub fn kill_target(&mut self) {
        if let Some(mut t) = self.target.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
    }

    pub fn start_agent(&mut self, id: u16) {
        let child = Command::new(&self.bin)
            .arg("agent")
            .arg("--config")
            .arg(self.node_config(id))
            .env("HOLDFAST_LOG", "info,holdfast::initiator=warn")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent{id}.log")))
            .spawn()
            .expect("spawn agent");
        self.agents.insert(id, child);
    }

    pub fn agent_pid(&self, id: u16) -> Option<i32> {
        self.agents.get(&id).map(|c| c.id() as i32)
    }

    /// Processes whose parent is `pid` (the agent's VMs).
    fn children_of(pid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                    // ppid is the 2nd field after the ")" that ends the command name.
                    if let Some(rest) = stat.rsplit_once(") ").map(|x| x.1) {
                        let ppid = rest.split(' ').nth(1).and_then(|x| x.parse::<i32>().ok());
                        if ppid == Some(pid) {
                            out.push(p);
                        }
                    }
                }
            }
        }
        out
    }

    /// The node's whole process tree: agent and its VMs.
    pub fn node_pids(&self, id: u16) -> Vec<i32> {
        let Some(pid) = self.agent_pid(id) else {
            return vec![];
        };
        let mut v = vec![pid];
        v.extend(Self::children_of(pid));
        v
    }

    /// SIGSTOP the agent and wait until all its threads are stopped: from then on it
    /// cannot start a VM, so listing its children afterwards misses none.
    fn stop_agent_process(&self, id: u16) {
        let Some(pid) = self.agent_pid(id) else {
            return;
        };
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !all_threads_stopped(pid) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// kill -9 of the node: the agent and its guests at once.
    pub fn kill_node(&mut self, id: u16) {
        // The agent is stopped first so that a VM it is spawning right now is listed
        // and killed too (a guest outliving its "node" would be a harness artefact).
        self.stop_agent_process(id);
        for p in self.node_pids(id) {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if let Some(mut c) = self.agents.remove(&id) {
            let _ = c.wait();
        }
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
        if let Some(mut c) = self.agents.remove(&id) {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn is_running(&self, pid: i32) -> bool {
        // Zombies count as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s.rsplit_once(") ").is_some_and(|x| x.1.starts_with('Z')),
            Err(_) => false,
        }
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
        self.acks(group)
            .iter()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() >= 4 && f[0] == "ack" && f[2] == epoch.to_string()
            })
            .count()
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
        let g = self.groups.iter().find(|g| g.name == group).expect("group");
        let url = format!("iscsi://{}/{TARGET}/{}", self.addr, g.lun);
        let out = self.run(&[
            "guest",
            "check",
            "--disk",
            &url,
            "--ack-log",
            &self.ack_log(group).display().to_string(),
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "guest check of {group} failed:\n{text}\n{}",
            self.diagnostics()
        );
        text
    }

    /// The tail of every log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let mut names = vec!["target.log".to_string(), "events.jsonl".to_string()];
        for id in 1..=self.nodes {
            names.push(format!("agent{id}.log"));
        }
        for g in &self.groups {
            names.push(format!("acks-{}.log", g.name));
        }
        for n in names {
            let text = std::fs::read_to_string(self.path(&n)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            s.push_str(&format!(
                "---- {n} (last {} lines)\n{}\n",
                tail.len(),
                tail.join("\n")
            ));
        }
        s
    }

    pub fn keep_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Never leave processes behind a failed assertion: guests first, then agents.
        let ids: Vec<u16> = self.agents.keys().copied().collect();
        for id in ids {
            for p in self.node_pids(id) {
                unsafe {
                    libc::kill(p, libc::SIGCONT);
                    libc::kill(p, libc::SIGKILL);
                }
            }
            if let Some(mut c) = self.agents.remove(&id) {
                let _ = c.wait();
            }
        }
        self.kill_target();
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

/// True when every thread of `pid` is stopped (or the process is gone).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    rd.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_none_or(|x| x.1.starts_with(['T', 't', 'Z', 'X']))
            })
            .unwrap_or(true)
    })
}

/// Helpers for the fault test and the failover benchmark.
impl Cluster {
    /// Whether this harness has an agent process for node `id` (started, not killed or
    /// stopped since; it may be frozen).
    pub fn has_agent(&self, id: u16) -> bool {
        self.agents.contains_key(&id)
    }

    /// Nodes with an agent process, in id order.
    pub fn agents_up(&self) -> Vec<u16> {
        self.agents.keys().copied().collect()
    }

    /// SIGTERM the agent (it hands its groups over) and wait up to `timeout` for it to
    /// exit. `None` if it did not: then the node is killed (kill -9) instead.
    pub fn stop_agent_within(
        &mut self,
        id: u16,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut c = self.agents.remove(&id)?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agents.insert(id, c);
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
        self.target.is_some()
    }

    /// The guests (VM processes) the node's agent runs now.
    pub fn guest_pids(&self, id: u16) -> Vec<i32> {
        self.agent_pid(id)
            .map(Self::children_of)
            .unwrap_or_default()
    }
}

/// Reads the lines appended to a file since the last call (a log several processes
/// append to with one write per line): a partial last line waits for its end.
pub struct LineTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LineTail {
    /// Tail `path` from its current end (`from_start`: from its beginning).
    pub fn new(path: PathBuf, from_start: bool) -> LineTail {
        let offset = if from_start {
            0
        } else {
            std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        };
        LineTail {
            path,
            offset,
            partial: String::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn read_new(&mut self) -> Vec<String> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return vec![];
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return vec![];
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else {
            return vec![];
        };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines.retain(|l| !l.is_empty());
        lines
    }
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
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() >= 4 && f[0] == "ack" {
                if let Ok(e) = f[2].parse::<u64>() {
                    *self.per_epoch.entry(e).or_default() += 1;
                }
            }
        }
    }
}
