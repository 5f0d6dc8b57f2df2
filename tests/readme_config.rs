//! The README's configuration reference and the config structs must list the same keys.

use holdfast::target::config;
use std::collections::BTreeSet;
use std::path::Path;

/// A config that sets every key, so serializing it shows every field the code has.
const EVERY_KEY: &str = r#"
data_dir = "d"
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
                        walk(&format!("{path}[]"), &a[0], out)
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
