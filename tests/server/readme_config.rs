//! The README's configuration references (target and agent) and the config structs must
//! list the same keys; the README's examples and the sample configs in fixtures/agent/
//! must validate.

use holdfast::agent::config as agent_config;
use holdfast::server::config;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A config that sets every key, so serializing it shows every field the code has.
const EVERY_KEY: &str = r#"
data_dir = "d"
admin_socket = "admin.sock"
metrics = "127.0.0.1:9464"
[ceph]
conf = "ceph.conf"
client = "client.gw"
keyring = "gw.keyring"
timeout = "10s"
notify_timeout = "5s"
[alua]
group = 3
[[alua.peer]]
group = 4
ports = [4, 5]
[discovery_chap]
username = "disc"
secret = "discovery-secret"
mutual_username = "tgt"
mutual_secret = "discovery-mutual"
[iscsi]
max_recv_data_segment_length = 65536
max_burst_length = 262144
first_burst_length = 65536
immediate_data = true
initial_r2t = false
max_outstanding_r2t = 2
queue_depth = 64
nop_interval_secs = 5
nop_timeout_secs = 10
login_timeout_secs = 10
[[target]]
name = "iqn.2026-11.org.example:t"
alias = "t"
[[target.portal]]
listen = "127.0.0.1:3260"
tpgt = 1
[[target.lun]]
id = 0
path = "a.img"
size = "1MiB"
serial = "s1"
read_only = false
block_size = 512
physical_block_size = 4096
write_cache = true
thin_provisioning = true
product = "p"
[[target.lun]]
id = 1
rbd = "pool/image"
size = "1MiB"
[[target.acl]]
initiator = "iqn.2026-11.org.example:i"
luns = [0]
[target.acl.chap]
username = "u"
secret = "initiator-secret"
[target.chap]
username = "u"
secret = "initiator-secret"
"#;

/// Tables documented as one key (their sub-keys are described in the row).
const LEAF_TABLES: &[&str] = &["discovery_chap", "chap"];

fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(_) if !LEAF_TABLES.contains(&k.as_str()) => {
                        walk(&path, v, out)
                    }
                    toml::Value::Array(a) if a.first().is_some_and(|x| x.is_table()) => {
                        for x in a {
                            walk(&format!("{path}[]"), x, out)
                        }
                    }
                    _ => {
                        out.insert(path);
                    }
                }
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

fn readme_keys() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("README has a configuration reference");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn readme_reference_matches_the_config_structs() {
    let cfg = config::parse(EVERY_KEY, "every-key.toml", Path::new("/tmp"))
        .expect("every-key config is valid");
    let value = toml::Value::try_from(&cfg.config).unwrap();
    let mut code = BTreeSet::new();
    walk("", &value, &mut code);
    let doc = readme_keys();
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let unknown: Vec<_> = doc.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from the README reference: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "README documents keys the code does not have: {unknown:?}"
    );
}

#[test]
fn readme_example_config_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme.split("## Configuration reference").nth(1).unwrap();
    let example = section
        .split("```toml")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    config::parse(example, "README example", Path::new("/tmp"))
        .expect("the README example must validate");
}

// ---- the agent's node.toml ----

/// A node config that sets every key, with one group per VM driver, so that serializing
/// it shows every field the code has.
const EVERY_AGENT_KEY: &str = r#"
[node]
name = "n1"
id = 1
cluster = "lab"
initiator_name = "iqn.2026-11.org.example:n1"
vm_initiator_name = "iqn.2026-11.org.example:n1.vm"
state_dir = "/tmp/state"
shared_state_dir = "/tmp/shared"
event_log = "/tmp/events.jsonl"
metrics = "127.0.0.1:9465"
alert_command = "logger -t holdfast-alert"
migration_address = "10.0.0.1"
[target]
portals = ["127.0.0.1:3260"]
name = "iqn.2026-11.org.example:t"
quorum_lun = 0
[target.chap]
username = "u"
secret = "a-16-char-secret"
[timings]
heartbeat_interval = "500ms"
poll_interval = "200ms"
io_timeout = "1s"
self_fence_after = "2s"
dead_after = "3s"

[[group]]
name = "p"
disks = [1]
preferred_owners = ["n1"]
failback = "window"
failback_window = "22:00-06:00"
restart_threshold = 3
restart_period = "15m"
monitor_interval = "1s"
offline_action = "save"
stop_timeout = "30s"
[group.vm]
driver = "process"
command = ["qemu-system-x86_64"]
restore_args = ["-incoming", "defer"]
save_signal = "SIGUSR1"
stop_signal = "SIGTERM"
env = { A = "b" }
log = "/tmp/p.log"
qmp = "/tmp/p.qmp"
migration_bandwidth = "100MiB"

[[group]]
name = "s"
disks = [2]
[group.vm]
driver = "script"
path = "/bin/true"
timeout = "60s"
pause = true

[[group]]
name = "q"
disks = [4]
[group.vm]
driver = "qemu"
qemu = "qemu-system-x86_64"
machine = "q35,accel=kvm:tcg"
memory = "256M"
cpus = 1
kernel = "/tmp/vmlinuz"
initrd = "/tmp/initrd"
append = "console=ttyS0"
serial = ["/tmp/q.console"]
args = ["-S"]
qmp = "/tmp/q.qmp"
log = "/tmp/q.log"
migration_bandwidth = "200MiB"

[[group]]
name = "l"
disks = [3]
[group.vm]
driver = "libvirt"
domain = "l"
xml = "/tmp/l.xml"
uri = "qemu:///system"
virsh = "virsh"
migrate_uri = "qemu+ssh://{migration_address}/system"
"#;

/// Tables of the agent config documented as one key.
const AGENT_LEAF_TABLES: &[&str] = &["chap", "env"];

/// Keys under `prefix` in `v`; arrays of tables are walked element by element.
fn walk_agent(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    let toml::Value::Table(t) = v else {
        out.insert(prefix.to_string());
        return;
    };
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(_) if !AGENT_LEAF_TABLES.contains(&k.as_str()) => {
                walk_agent(&path, v, out)
            }
            toml::Value::Array(a) if a.first().is_some_and(|x| x.is_table()) => {
                for x in a {
                    walk_agent(&format!("{path}[]"), x, out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

/// The keys the code has, as `key` or, for a driver's own keys, `key (driver)`.
fn agent_code_keys() -> (BTreeSet<String>, BTreeSet<String>) {
    let cfg = agent_config::parse(EVERY_AGENT_KEY, "every-agent-key.toml")
        .expect("every-key agent config is valid");
    let value = toml::Value::try_from(&cfg.config).unwrap();
    let mut keys = BTreeSet::new();
    let mut drivers = BTreeSet::new();
    let mut top = value.as_table().unwrap().clone();
    let groups = top.remove("group").expect("groups serialize as [[group]]");
    walk_agent("", &toml::Value::Table(top), &mut keys);
    for g in groups.as_array().unwrap() {
        let driver = g["vm"]["driver"].as_str().unwrap().to_string();
        let mut gk = BTreeSet::new();
        walk_agent("group[]", g, &mut gk);
        for k in gk {
            if k.starts_with("group[].vm.") && k != "group[].vm.driver" {
                keys.insert(format!("{k} ({driver})"));
            } else {
                keys.insert(k);
            }
        }
        drivers.insert(driver);
    }
    (keys, drivers)
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

fn agent_reference_section(readme: &str) -> &str {
    let section = readme
        .split("## Agent configuration reference")
        .nth(1)
        .expect("README has an agent configuration reference");
    section.split("\n## ").next().unwrap()
}

/// The rows of the section's first table ("| key | default | meaning |"): `key` or
/// `key (driver)`.
fn readme_agent_keys() -> BTreeSet<String> {
    let readme = readme();
    let section = agent_reference_section(&readme);
    let table = section
        .split("| key | default | meaning |")
        .nth(1)
        .expect("the agent reference has a key table");
    let mut keys = BTreeSet::new();
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cell = line
            .trim_start_matches('|')
            .split(" | ")
            .next()
            .unwrap()
            .trim();
        let rest = cell
            .strip_prefix('`')
            .unwrap_or_else(|| panic!("a key row starts with `key`: {line}"));
        let (key, after) = rest.split_once('`').unwrap();
        let after = after.trim();
        if after.is_empty() {
            keys.insert(key.to_string());
        } else {
            let driver = after
                .strip_prefix('(')
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("after the key, only (driver): {line}"));
            keys.insert(format!("{key} ({driver})"));
        }
    }
    keys
}

#[test]
fn readme_agent_reference_matches_the_config_structs() {
    let (code, drivers) = agent_code_keys();
    assert_eq!(
        drivers,
        ["libvirt", "process", "qemu", "script"]
            .map(String::from)
            .into_iter()
            .collect(),
        "EVERY_AGENT_KEY must have one group per driver"
    );
    let doc = readme_agent_keys();
    let undocumented: Vec<_> = code.difference(&doc).collect();
    let unknown: Vec<_> = doc.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "keys missing from the README's agent reference: {undocumented:?}; keys it documents \
         that the code does not have: {unknown:?}"
    );
}

/// Node, target and timings for README snippets that show only groups.
const SNIPPET_BASE: &str = r#"
[node]
name = "node1"
id = 1
cluster = "lab"
[target]
portals = ["127.0.0.1:3260"]
name = "iqn.2026-11.org.holdfast:storage"
quorum_lun = 0
"#;

#[test]
fn readme_agent_examples_are_valid() {
    let readme = readme();
    // The agent reference ends with a complete node.toml.
    let section = agent_reference_section(&readme);
    let complete = section
        .split("```toml")
        .last()
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    assert!(complete.contains("[node]"), "the complete example is last");
    let cfg = agent_config::parse(complete, "README agent example")
        .expect("the README's node.toml example must validate");
    let drivers: BTreeSet<&str> = cfg
        .config
        .groups
        .iter()
        .map(|g| match g.vm {
            agent_config::VmConfig::Process(_) => "process",
            agent_config::VmConfig::Qemu(_) => "qemu",
            agent_config::VmConfig::Script { .. } => "script",
            agent_config::VmConfig::Libvirt { .. } => "libvirt",
        })
        .collect();
    assert_eq!(drivers.len(), 4, "the complete example shows every driver");
    // Every other agent snippet (whole node configs, or groups alone) validates too.
    let mut checked = 0;
    for block in readme.split("```toml").skip(1) {
        let block = block.split("```").next().unwrap();
        let text = if block.contains("[node]") {
            block.to_string()
        } else if block.contains("[[group]]") {
            format!("{SNIPPET_BASE}\n{block}")
        } else {
            continue; // a target config
        };
        agent_config::parse(&text, "README snippet")
            .unwrap_or_else(|e| panic!("README snippet does not validate: {e}\n{block}"));
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} agent snippets found");
}

fn agent_fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agent");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn sample_node_configs_are_valid() {
    let files = agent_fixtures();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "node1.toml",
        "node2.toml",
        "node-script.toml",
        "node-libvirt.toml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    for f in &files {
        let c = agent_config::load_file(f).unwrap_or_else(|e| panic!("{e}"));
        for g in &c.config.groups {
            // A sample script must be one that ships beside the samples.
            if let agent_config::VmConfig::Script { path, .. } = &g.vm {
                let base = path.file_name().unwrap();
                assert!(
                    f.with_file_name(base).exists(),
                    "{}: script {} is not in fixtures/agent",
                    f.display(),
                    path.display()
                );
            }
        }
    }
}

/// The walk-through's two nodes run against the target's embedded default.
#[test]
fn walk_through_nodes_match_the_embedded_default() {
    let target = config::parse(config::EMBEDDED_DEFAULT, "<embedded>", Path::new(""))
        .expect("embedded default");
    let t = &target.config.targets[0];
    let portal = target.listen_addrs()[0].to_string();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/agent");
    let mut groups = Vec::new();
    for (i, f) in ["node1.toml", "node2.toml"].iter().enumerate() {
        let c = agent_config::load_file(&dir.join(f)).unwrap();
        assert_eq!(c.node().id as usize, i + 1);
        assert_eq!(
            c.node().cluster,
            "lab",
            "the walk-through's init-quorum uses lab"
        );
        assert_eq!(c.config.target.name, t.name);
        assert_eq!(c.config.target.portals, vec![portal.clone()]);
        assert_eq!(c.config.target.quorum_lun, t.luns[0].id);
        for g in &c.config.groups {
            for d in &g.disks {
                assert!(t.luns.iter().any(|l| l.id == *d), "LUN {d} is not served");
            }
        }
        groups.push(toml::Value::try_from(&c.config.groups).unwrap());
    }
    assert_eq!(groups[0], groups[1], "both nodes configure the same groups");
}
