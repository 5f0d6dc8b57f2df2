use super::*;

fn ctx() -> VmContext {
    VmContext {
        group: "web".into(),
        node: "hv2".into(),
        node_id: 2,
        epoch: 7,
        initiator_name: "iqn.x:hv2.vm".into(),
        portal: "127.0.0.1:3260".into(),
        other_portals: vec![],
        target: "iqn.t".into(),
        disks: vec![3],
        state_file: "/s/web.state".into(),
        state_dir: "/s".into(),
    }
}

#[test]
fn uri_defaults_to_ssh_on_the_migration_address() {
    let c = ctx();
    assert_eq!(
        migrate_uri(None, &c, "192.0.2.11"),
        "qemu+ssh://192.0.2.11/system"
    );
    assert_eq!(
        migrate_uri(None, &c, "fd00::11"),
        "qemu+ssh://[fd00::11]/system"
    );
    assert_eq!(
        migrate_uri(None, &c, "[fd00::11]"),
        "qemu+ssh://[fd00::11]/system"
    );
    assert_eq!(
        migrate_uri(
            Some("qemu+tls://{node}.lan/system?x={migration_address}"),
            &c,
            "h"
        ),
        "qemu+tls://hv2.lan/system?x=h"
    );
}

#[test]
fn migrate_arguments_arrive_paused() {
    assert_eq!(
        migrate_args("web", "qemu+ssh://h/system").join(" "),
        "migrate --live --suspend --abort-on-error web qemu+ssh://h/system"
    );
}

#[test]
fn incoming_states() {
    for (s, want) in [
        ("shut off (unknown)\n", Incoming::Waiting),
        ("shut off", Incoming::Waiting),
        ("paused (migrating)", Incoming::Waiting),
        ("paused (starting up)", Incoming::Waiting),
        ("paused (unknown)", Incoming::Arrived),
        ("paused (user)\n\n", Incoming::Arrived),
        (
            "running (migrated)",
            Incoming::Wrong("running (migrated)".into()),
        ),
        (
            "crashed (panicked)",
            Incoming::Wrong("crashed (panicked)".into()),
        ),
    ] {
        assert_eq!(incoming_state(s), want, "{s:?}");
    }
}

#[test]
fn initiators_other_than_ours_are_found() {
    let xml = "<disk><source><initiator><iqn name='iqn.x:hv1.vm'/></initiator></source>\
               <source><initiator><iqn name=\"iqn.x:hv2.vm\"/></initiator></source>\
               <source><initiator><iqn name='iqn.x:hv1.vm'/></initiator></source>\
               <iqn/><iqn name=bare/></disk>";
    assert_eq!(foreign_initiators(xml, "iqn.x:hv2.vm"), ["iqn.x:hv1.vm"]);
    assert_eq!(foreign_initiators(xml, "iqn.x:hv1.vm"), ["iqn.x:hv2.vm"]);
    assert!(foreign_initiators("<domain/>", "x").is_empty());
}

#[test]
fn jobinfo_figures_or_the_wall_time() {
    let info = "Job type:         Completed\nOperation:        Outgoing migration\n\
                Time elapsed:     1530         ms\nData processed:   12.500 MiB\n\
                Memory processed: 12.000 MiB\nTotal downtime:   41           ms\n";
    let job = parse_jobinfo(info);
    assert_eq!(
        job,
        JobFigures {
            total: Some(Duration::from_millis(1530)),
            downtime: Some(Duration::from_millis(41)),
            transferred: Some(12_500 * 1024 * 1024 / 1000),
        }
    );
    let st = stats(job, Duration::from_secs(9));
    assert_eq!(st.total, Duration::from_millis(1530));
    assert_eq!(st.downtime, Duration::from_millis(41));

    let none = parse_jobinfo("Job type:         None\n");
    assert_eq!(none, JobFigures::default());
    let st = stats(none, Duration::from_millis(800));
    assert_eq!(
        (st.total, st.downtime, st.transferred),
        (Duration::from_millis(800), Duration::from_millis(800), 0)
    );
    let odd = parse_jobinfo("Time elapsed: soon ms\nData processed: 3 parsecs\n");
    assert_eq!(odd, JobFigures::default());
}
