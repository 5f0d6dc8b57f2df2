//! Live migration (`ctl move --live`) between two agents under the libvirt driver, with
//! the fake virsh (fixtures/agent/fake-virsh.sh): each node's "libvirt" is a directory
//! in its state dir, and the source's `virsh migrate` moves the domain into the
//! destination's, through the repo's qemu hook there (fixtures/agent/libvirt-qemu-hook.sh).
//! The agents, target, reservations and record are real; the guest does no I/O.

use crate::common;
use common::cluster::{events_named, show_output};

use common::cluster::{node_name, Cluster, GroupSpec, CLUSTER};
use holdfast::agent::config::{Timings, VmConfig};
use holdfast::agent::quorum::{self, GroupRecord, GroupState};
use holdfast::cli::cluster_kit as kit;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(40);
const LUN: u64 = 1;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/agent")
        .join(name)
}

fn vm_initiator(id: u16) -> String {
    format!("iqn.2026-11.org.holdfast:{CLUSTER}.{}.vm", node_name(id))
}

/// Node `id`'s fake libvirt: DIR/nodeN/libvirt.
fn libvirt_dir(c: &Cluster, id: u16) -> PathBuf {
    c.path(&node_name(id)).join("libvirt")
}

/// Node `id`'s libvirt with the hook, and its own copy of the domain XML.
fn host(c: &Cluster, id: u16) -> PathBuf {
    let dir = libvirt_dir(c, id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("libvirt-qemu-hook.sh"), dir.join("hook-qemu")).unwrap();
    std::fs::write(
        dir.join("holdfast-vm-initiator-name"),
        format!("{}\n", vm_initiator(id)),
    )
    .unwrap();
    let xml = dir.join("g1.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='kvm'>\n  <name>g1</name>\n  <devices><disk><source>\
             <initiator><iqn name='{}'/></initiator></source></disk></devices>\n</domain>\n",
            vm_initiator(id)
        ),
    )
    .unwrap();
    xml
}

async fn cluster() -> Cluster {
    let mut g = GroupSpec::new("g1", LUN);
    g.preferred = vec![node_name(1)];
    let mut c = Cluster::new(2, vec![g]).await;
    let timings = Timings {
        migration_timeout: Duration::from_secs(20),
        ..Timings::default()
    };
    for id in 1..=2u16 {
        let xml = host(&c, id);
        let mut cfg = c.kit.node_config(id, &c.groups, &timings);
        cfg.groups[0].vm = VmConfig::Libvirt {
            domain: "{group}".into(),
            xml: Some(xml),
            uri: Some("fake://{state_dir}/libvirt".into()),
            virsh: fixture("fake-virsh.sh").display().to_string(),
            migrate_uri: Some("fake://{state_dir}/libvirt".into()),
        };
        kit::write_toml(&c.node_config(id), "", &cfg).unwrap();
    }
    c.start_agent(1);
    c.start_agent(2);
    c
}

/// Node `id`'s domain g1 as `domstate --reason` shows it ("" when unknown there).
fn domstate(c: &Cluster, id: u16) -> String {
    let d = libvirt_dir(c, id).join("g1");
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
    if !d.join("state").exists() {
        return String::new();
    }
    format!("{} ({})", read("state").trim(), read("reason").trim())
}

fn settled_on(r: &GroupRecord, id: u16) -> bool {
    r.owner == id && r.state == GroupState::Running && r.migration.is_none()
}

async fn keys(c: &Cluster) -> Vec<u64> {
    use holdfast::initiator::{InitiatorConfig, Session};
    let cfg = InitiatorConfig::new(
        "iqn.2026-11.org.holdfast:keys",
        common::cluster::TARGET,
        c.addr,
    );
    let s = Session::login(cfg).await.unwrap();
    let (_, keys) = s.read_keys(LUN).await.unwrap();
    let _ = s.logout().await;
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_live_move_hands_the_domain_and_its_disk_over() {
    let c = cluster().await;
    let before = c.wait_running("g1", Some(1), T).await;
    wait_until("node1's domain", &c, || {
        domstate(&c, 1) == "running (booted)"
    })
    .await;

    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "40"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        show_output(&out),
        c.diagnostics()
    );
    let after = c
        .wait_record("g1", T, "settled on node2", |r| settled_on(r, 2))
        .await;
    assert_eq!(after.epoch, before.epoch + 1);
    // Arrived paused, resumed after the switchover (just after the record moved); gone
    // from node1.
    wait_until("node2's domain resumed", &c, || {
        domstate(&c, 2) == "running (unpaused)"
    })
    .await;
    assert_eq!(domstate(&c, 1), "shut off (migrated)");
    let xml = std::fs::read_to_string(libvirt_dir(&c, 2).join("g1/xml")).unwrap();
    assert!(xml.contains(&vm_initiator(2)), "{xml}");

    let k = keys(&c).await;
    assert!(k.contains(&quorum::pr_key(CLUSTER, 2)), "{k:x?}");
    assert!(!k.contains(&quorum::pr_key(CLUSTER, 1)), "{k:x?}");
    let all = c.events();
    let done = events_named(&all, "migration-completed");
    assert_eq!(done.len(), 1, "{all:#?}");
    // libvirt's figures (the fake's domjobinfo --completed).
    assert_eq!(
        (
            done[0]["downtime_ms"].as_u64(),
            done[0]["total_ms"].as_u64()
        ),
        (Some(41), Some(1530))
    );
    // Events reach the ring a moment after the step they tell of.
    wait_until("node2's migrated-in and node1's migrated-out", &c, || {
        let all = c.events();
        !events_named(&all, "migrated-out").is_empty()
            && !events_named(&all, "migrated-in").is_empty()
    })
    .await;
    assert_eq!(events_named(&c.events(), "migrated-in").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_libvirt_migration_leaves_the_domain_running_on_the_source() {
    let c = cluster().await;
    let before = c.wait_running("g1", Some(1), T).await;
    wait_until("node1's domain", &c, || {
        domstate(&c, 1) == "running (booted)"
    })
    .await;
    std::fs::write(libvirt_dir(&c, 1).join("fail-migrate"), "").unwrap();

    let out = c.ctl(&["move", "g1", "node2", "--live", "--wait", "40"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}\n{}",
        show_output(&out),
        c.diagnostics()
    );
    let after = c
        .wait_record("g1", T, "back on node1", |r| settled_on(r, 1))
        .await;
    assert_eq!(after.epoch, before.epoch, "the run on node1 goes on");
    wait_until("node1 cleaned up", &c, || {
        !events_named(&c.events(), "migration-aborted").is_empty()
    })
    .await;
    let all = c.events();
    assert!(
        !events_named(&all, "migration-failed").is_empty(),
        "{all:#?}"
    );
    assert!(events_named(&all, "migrated-in").is_empty(), "{all:#?}");
    assert_eq!(domstate(&c, 1), "running (booted)");
    assert_eq!(domstate(&c, 2), "");
    let k = keys(&c).await;
    assert_eq!(k, vec![quorum::pr_key(CLUSTER, 1); k.len()], "{k:x?}");
}

async fn wait_until(what: &str, c: &Cluster, f: impl Fn() -> bool) {
    common::cluster::wait_until(what, T, f, || c.diagnostics()).await
}
