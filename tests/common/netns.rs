//! A network namespace per cluster node, so that a test can partition a node instead of
//! killing it. Node N's namespace `hf-<pid>-<k>-nN` (pid: this test process, k: the
//! fixture's number in it) holds its agent and the VMs the agent starts (they inherit
//! it). A veth pair joins it to the root namespace, where the target runs: host side
//! `hfhX` with 10.201.X.1/24, node side `hfnX` with 10.201.X.2/24. X is allocated per
//! node from 1..=250 by creating the host-side link, which fails if another fixture (in
//! this or another process) holds that name, so concurrent clusters never share a
//! subnet.
//!
//! [`Netns::cut`] takes the host side down: a partition, not a reset. The node's end
//! loses its carrier and drops whatever it sends, and nothing answers (no RST, no ICMP).
//! Both sides have permanent neighbour entries, so an address lookup never fails fast
//! either: the node's packets vanish until [`Netns::heal`].
//!
//! Dropping the fixture deletes its links and namespaces, also when a test panics. Namespaces left by a test process that died without dropping it
//! (SIGKILL) are deleted when the next fixture is made, after killing what still runs
//! in them: only this fixture makes `hf-<pid>-` namespaces, so that is an orphaned
//! agent or guest of the dead run, which would otherwise keep its veth alive.
//!
//! Needs root (CAP_NET_ADMIN) and `ip` (iproute2).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The first two octets of every link's /24.
const NET: [u8; 2] = [10, 201];

/// Run `ip ARGS`; its stderr on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, which must succeed (the fixture cannot do without it).
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e} (the netns fixture needs root and iproute2)"))
}

/// The MAC address of one end of link X: locally administered, "HF", X, end.
fn mac(x: u8, end: u8) -> String {
    format!("02:48:46:00:{x:02x}:{end:02x}")
}

/// One node's namespace and link.
#[derive(Debug)]
struct Link {
    ns: String,
    /// The third octet of its /24; the links are `hfhX` (root side) and `hfnX`.
    x: u8,
}

impl Link {
    fn host_if(&self) -> String {
        format!("hfh{}", self.x)
    }
    fn node_if(&self) -> String {
        format!("hfn{}", self.x)
    }
    fn addr(&self, end: u8) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], self.x, end)
    }

    /// Create the namespace, then the veth pair on the first free X.
    fn create(mut ns: String) -> Link {
        ip_ok(&["netns", "add", &ns]);
        for x in 1..=250u8 {
            let l = Link { ns, x };
            let made = ip(&[
                "link",
                "add",
                &l.host_if(),
                "address",
                &mac(x, 1),
                "type",
                "veth",
                "peer",
                "name",
                &l.node_if(),
                "address",
                &mac(x, 2),
                "netns",
                &l.ns,
            ]);
            if made.is_ok() {
                l.configure();
                return l;
            }
            ns = l.ns;
        }
        let _ = ip(&["netns", "del", &ns]);
        panic!("no free link name hfh1..hfh250 for {ns}");
    }

    fn configure(&self) {
        let (h, n, ns) = (self.host_if(), self.node_if(), self.ns.as_str());
        let host = format!("{}/24", self.addr(1));
        let node = format!("{}/24", self.addr(2));
        ip_ok(&["addr", "add", &host, "dev", &h]);
        ip_ok(&["link", "set", &h, "up"]);
        ip_ok(&["-n", ns, "addr", "add", &node, "dev", &n]);
        ip_ok(&["-n", ns, "link", "set", &n, "up"]);
        ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        let target = self.addr(1).to_string();
        ip_ok(&[
            "-n",
            ns,
            "neigh",
            "replace",
            &target,
            "lladdr",
            &mac(self.x, 1),
            "dev",
            &n,
            "nud",
            "permanent",
        ]);
        self.host_neighbour();
    }

    /// The root side's entry for the node (taking the link down flushes it).
    fn host_neighbour(&self) {
        let node = self.addr(2).to_string();
        ip_ok(&[
            "neigh",
            "replace",
            &node,
            "lladdr",
            &mac(self.x, 2),
            "dev",
            &self.host_if(),
            "nud",
            "permanent",
        ]);
    }
}

/// The namespaces and links of one cluster's nodes.
#[derive(Debug)]
pub struct Netns {
    links: BTreeMap<u16, Link>,
}

impl Netns {
    /// A namespace and a link for each of nodes 1..=`nodes`, up.
    pub fn new(nodes: u16) -> Netns {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(remove_stale);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut n = Netns {
            links: BTreeMap::new(),
        };
        for id in 1..=nodes {
            // Inserted one by one so that a panic half-way deletes what exists.
            n.links
                .insert(id, Link::create(format!("hf-{pid}-{k}-n{id}")));
        }
        n
    }

    fn link(&self, node: u16) -> &Link {
        self.links
            .get(&node)
            .unwrap_or_else(|| panic!("no namespace for node{node}"))
    }

    /// Node `node`'s namespace.
    pub fn namespace(&self, node: u16) -> &str {
        &self.link(node).ns
    }

    /// The root side of node `node`'s link: where the node reaches the target.
    pub fn host_addr(&self, node: u16) -> Ipv4Addr {
        self.link(node).addr(1)
    }

    /// The node's own address.
    pub fn node_addr(&self, node: u16) -> Ipv4Addr {
        self.link(node).addr(2)
    }

    /// The command prefix that runs a program in node `node`'s namespace.
    pub fn exec_prefix(&self, node: u16) -> Vec<String> {
        ["ip", "netns", "exec", self.namespace(node)]
            .map(String::from)
            .to_vec()
    }

    /// Partition node `node`: its link goes down, its packets vanish.
    pub fn cut(&self, node: u16) {
        ip_ok(&["link", "set", &self.link(node).host_if(), "down"]);
    }

    /// End the partition of node `node`.
    pub fn heal(&self, node: u16) {
        let l = self.link(node);
        ip_ok(&["link", "set", &l.host_if(), "up"]);
        l.host_neighbour();
    }

    /// Whether node `node`'s link is up on the root side.
    pub fn is_up(&self, node: u16) -> bool {
        ip_ok(&["-o", "link", "show", &self.link(node).host_if()]).contains(",UP")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The link first: a namespace outlives its name while a socket of a killed
        // process still retransmits into a cut link, and its veth pair with it.
        for l in self.links.values() {
            for args in [["link", "del", &l.host_if()], ["netns", "del", &l.ns]] {
                if let Err(e) = ip(&args) {
                    eprintln!("netns fixture: {e}");
                }
            }
        }
    }
}

/// The pid in a fixture namespace's name `hf-<pid>-<k>-n<id>`.
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix("hf-")?;
    let (pid, tail) = rest.split_once('-')?;
    let (k, node) = tail.split_once("-n")?;
    k.parse::<u32>().ok()?;
    node.parse::<u16>().ok()?;
    pid.parse().ok()
}

/// Delete the fixture namespaces of test processes that no longer exist, killing what
/// still runs in them first. [`Netns::new`] does this once per test process.
pub fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    // Lines are "NAME" or "NAME (id: N)".
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = owner_pid(ns) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
        for p in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) only sends a signal; p runs in a namespace of a dead run
            // of this fixture, so it is one of that run's agents or guests.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        match ip(&["netns", "del", ns]) {
            Ok(_) => eprintln!("netns fixture: removed stale namespace {ns}"),
            Err(e) => eprintln!("netns fixture: {e}"),
        }
    }
}
