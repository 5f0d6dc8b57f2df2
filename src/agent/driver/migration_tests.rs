use super::*;
use crate::agent::driver::process::{ProcessDriver, ProcessVm};
use crate::agent::driver::{DriverError, VmContext, VmDriver};

#[test]
fn the_listening_address_is_read_from_query_migrate() {
    let v = json!({"socket-address": [
        {"port": "41295", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]});
    assert_eq!(bound_address(&v).as_deref(), Some("127.0.0.1:41295"));
    let v6 = json!({"socket-address": [{"port": "9", "host": "::1", "type": "inet"}]});
    assert_eq!(bound_address(&v6).as_deref(), Some("[::1]:9"));
    assert_eq!(bound_address(&json!({})), None);
    let unix = json!({"socket-address": [{"path": "/x", "type": "unix"}]});
    assert_eq!(bound_address(&unix), None);
}

#[test]
fn query_migrate_tells_progress_completion_and_failure() {
    assert!(migration_end(&json!({"status": "active"})).is_none());
    assert!(migration_end(&json!({"status": "setup"})).is_none());
    assert!(migration_end(&json!({})).is_none());
    assert!(migration_end(&json!({"status": "none"})).is_none());
    let done = json!({"status": "completed", "downtime": 7, "total-time": 120,
        "ram": {"transferred": 4096}});
    assert_eq!(
        migration_end(&done).unwrap().unwrap(),
        MigrationStats {
            downtime: Duration::from_millis(7),
            total: Duration::from_millis(120),
            transferred: 4096,
        }
    );
    let failed = json!({"status": "failed", "error-desc": "Connection refused"});
    let e = migration_end(&failed).unwrap().unwrap_err().to_string();
    assert!(e.contains("Connection refused"), "{e}");
    assert!(migration_end(&json!({"status": "cancelled"}))
        .unwrap()
        .is_err());
}

/// qemu-system-x86_64 must be installed: these tests fail without it.
fn qemu_driver(dir: &Path, node: &str) -> (ProcessDriver, VmContext) {
    let found = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-system-x86_64 is not installed (qemu-system-x86)"
    );
    let state_dir = dir.join(node);
    let command = [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        "unix:{state_dir}/{group}.qmp,server=on,wait=off",
    ]
    .map(String::from)
    .to_vec();
    let vm = ProcessVm {
        qmp: Some("{state_dir}/{group}.qmp".into()),
        ..ProcessVm::new(command)
    };
    let ctx = VmContext {
        group: "web".into(),
        node: node.into(),
        node_id: 1,
        epoch: 1,
        initiator_name: "iqn.x:vm".into(),
        portal: "127.0.0.1:3260".into(),
        other_portals: vec![],
        target: "iqn.t".into(),
        disks: vec![],
        state_file: state_dir.join("web.state"),
        state_dir: state_dir.clone(),
    };
    std::fs::create_dir_all(&state_dir).unwrap();
    let d = ProcessDriver::new(vm, state_dir.join("web.log"));
    (d, ctx)
}

fn status(ctx: &VmContext) -> String {
    let mut q = Qmp::connect(&ctx.state_dir.join("web.qmp"), Duration::from_secs(5)).unwrap();
    qmp::run_state(&mut q).unwrap()
}

#[test]
fn a_process_qemu_migrates_live_to_an_incoming_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, sctx) = qemu_driver(dir.path(), "a");
    let (mut dst, dctx) = qemu_driver(dir.path(), "b");
    assert!(src.can_migrate_live());
    src.start(&sctx).unwrap();
    let up = Duration::from_secs(10);
    Qmp::connect_when_up(&sctx.state_dir.join("web.qmp"), up, up, || true).unwrap();
    let addr = dst.start_incoming(&dctx, "127.0.0.1").unwrap();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    assert_eq!(status(&dctx), "inmigrate");
    let stats = src
        .migrate_live(&sctx, &addr, Duration::from_secs(60))
        .unwrap();
    assert!(
        stats.total >= stats.downtime && stats.transferred > 0,
        "{stats:?}"
    );
    assert_eq!(status(&sctx), "postmigrate");
    dst.wait_incoming(&dctx, Duration::from_secs(30)).unwrap();
    // -S: the guest waits for the agent's switchover before it runs.
    assert_eq!(status(&dctx), "paused");
    dst.continue_migrated(&dctx).unwrap();
    assert_eq!(status(&dctx), "running");
    src.kill(&sctx).unwrap();
    dst.kill(&dctx).unwrap();
}

#[test]
fn a_migration_to_a_dead_destination_leaves_the_source_running() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, sctx) = qemu_driver(dir.path(), "a");
    let (mut dst, dctx) = qemu_driver(dir.path(), "b");
    src.start(&sctx).unwrap();
    let up = Duration::from_secs(10);
    Qmp::connect_when_up(&sctx.state_dir.join("web.qmp"), up, up, || true).unwrap();
    let addr = dst.start_incoming(&dctx, "127.0.0.1").unwrap();
    dst.kill(&dctx).unwrap();
    let e = src.migrate_live(&sctx, &addr, Duration::from_secs(30));
    assert!(matches!(e, Err(DriverError::Failed { .. })), "{e:?}");
    assert_eq!(status(&sctx), "running");
    assert!(dst.wait_incoming(&dctx, Duration::from_secs(1)).is_err());
    src.kill(&sctx).unwrap();

    // Without a QMP socket there is no live migration, and nothing is started.
    let mut plain = ProcessDriver::new(ProcessVm::new(vec!["sleep".into(), "30".into()]), {
        dir.path().join("plain.log")
    });
    assert!(!plain.can_migrate_live());
    assert!(matches!(
        plain.start_incoming(&dctx, "127.0.0.1"),
        Err(DriverError::Unsupported { .. })
    ));
    assert_eq!(plain.pid(), None);
}
