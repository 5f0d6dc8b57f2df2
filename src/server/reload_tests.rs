use std::path::Path;

use super::*;
use crate::server::config::parse;

const BASE: &str = r#"
[[target]]
name = "iqn.2026-01.test:t1"
[[target.portal]]
listen = "127.0.0.1:3260"
[[target.lun]]
id = 0
path = "lun0.img"
size = "64MiB"
[[target.acl]]
initiator = "iqn.2026-01.test:i1"
"#;

fn cfg(text: &str) -> Config {
    parse(text, "t.toml", Path::new("/base")).unwrap().config
}

fn session(luns: &[u64]) -> SessionUse {
    SessionUse {
        target: "iqn.2026-01.test:t1".into(),
        initiator: "iqn.2026-01.test:i1".into(),
        isid: "400001370000".into(),
        luns: luns.to_vec(),
    }
}

const T: &str = "iqn.2026-01.test:t1";

#[test]
fn identical_config_is_an_empty_plan() {
    assert_eq!(
        plan(&cfg(BASE), &cfg(BASE), &[session(&[0])]).unwrap(),
        Plan::default()
    );
}

#[test]
fn added_lun_and_grown_lun_are_live() {
    let new = BASE.replace("\"64MiB\"", "\"128MiB\"")
        + "[[target.lun]]\nid = 1\npath = \"lun1.img\"\nsize = \"8MiB\"\n";
    let p = plan(&cfg(BASE), &cfg(&new), &[session(&[0])]).unwrap();
    assert_eq!(
        p.changes,
        vec![
            Change::LunGrown {
                target: T.into(),
                lun: 0,
                from: 64 << 20,
                to: 128 << 20
            },
            Change::LunAdded {
                target: T.into(),
                lun: 1
            },
        ]
    );
}

#[test]
fn removing_a_lun_in_use_names_lun_and_session() {
    // LUN 0 replaced by LUN 1: a target needs at least one LUN.
    let new = BASE.replace("id = 0\npath = \"lun0.img\"", "id = 1\npath = \"lun1.img\"");
    let err = plan(&cfg(BASE), &cfg(&new), &[session(&[0])]).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("LUN 0 removal"), "{text}");
    assert!(
        text.contains("iqn.2026-01.test:i1 (ISID 400001370000)"),
        "{text}"
    );
}

#[test]
fn shrink_is_refused_and_the_whole_reload_with_it() {
    // The LUN add that accompanies the shrink must not appear anywhere: atomic.
    let new = BASE.replace("\"64MiB\"", "\"32MiB\"")
        + "[[target.lun]]\nid = 1\npath = \"lun1.img\"\nsize = \"8MiB\"\n";
    let err = plan(&cfg(BASE), &cfg(&new), &[session(&[0])]).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(
        matches!(&err.0[0], Refusal::LunInUse { lun: 0, what, .. } if what.starts_with("shrink"))
    );
}

#[test]
fn unused_lun_change_is_refused_without_session_names() {
    let new = BASE.replace("lun0.img", "other.img");
    let err = plan(&cfg(BASE), &cfg(&new), &[session(&[])]).unwrap_err();
    assert!(matches!(&err.0[0], Refusal::NotLive { what } if what.contains("backing file")));
}

#[test]
fn block_size_change_is_refused() {
    let new = BASE.replace(
        "size = \"64MiB\"\n",
        "size = \"64MiB\"\nblock_size = 4096\n",
    );
    let err = plan(&cfg(BASE), &cfg(&new), &[session(&[0])]).unwrap_err();
    assert!(matches!(&err.0[0], Refusal::LunInUse { what, .. } if what == "block size change"));
}

#[test]
fn target_rename_and_settings_are_not_live() {
    let new = BASE.replace("test:t1", "test:t2") + "[iscsi]\nqueue_depth = 7\n";
    let err = plan(&cfg(BASE), &cfg(&new), &[]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("target iqn.2026-01.test:t1 (removed or renamed)"),
        "{text}"
    );
    assert!(
        text.contains("target iqn.2026-01.test:t2 (added)"),
        "{text}"
    );
    assert!(text.contains("[iscsi] settings"), "{text}");
}

#[test]
fn acl_add_remove_and_mask() {
    let new = BASE.replace("test:i1\"", "test:i1\"\nluns = [0]")
        + "[[target.acl]]\ninitiator = \"iqn.2026-01.test:i2\"\n";
    let p = plan(&cfg(BASE), &cfg(&new), &[]).unwrap();
    assert_eq!(
        p.changes,
        vec![
            Change::LunMaskChanged {
                target: T.into(),
                initiator: "iqn.2026-01.test:i1".into()
            },
            Change::AclAdded {
                target: T.into(),
                initiator: "iqn.2026-01.test:i2".into()
            },
        ]
    );
    let p = plan(&cfg(&new), &cfg(BASE), &[]).unwrap();
    assert!(p.changes.contains(&Change::AclRemoved {
        target: T.into(),
        initiator: "iqn.2026-01.test:i2".into()
    }));
}

#[test]
fn chap_rotation_is_live_and_never_shows_the_secret() {
    let chap = |s: &str| format!("{BASE}[target.chap]\nusername = \"u\"\nsecret = \"{s}\"\n");
    let old = chap("old-secret-1234");
    let new = chap("new-secret-5678");
    let p = plan(&cfg(&old), &cfg(&new), &[session(&[0])]).unwrap();
    assert_eq!(p.changes, vec![Change::ChapChanged { scope: T.into() }]);
    let shown = p.changes[0].to_string();
    assert!(!shown.contains("secret-"), "{shown}");
}

#[test]
fn portal_add_is_live_removal_is_not() {
    let new = BASE.replace(
        "listen = \"127.0.0.1:3260\"\n",
        "listen = \"127.0.0.1:3260\"\n[[target.portal]]\nlisten = \"127.0.0.1:3261\"\n",
    );
    let p = plan(&cfg(BASE), &cfg(&new), &[]).unwrap();
    assert_eq!(
        p.changes,
        vec![Change::PortalAdded {
            target: T.into(),
            listen: "127.0.0.1:3261".into()
        }]
    );
    let err = plan(&cfg(&new), &cfg(BASE), &[]).unwrap_err();
    assert!(matches!(&err.0[0], Refusal::NotLive { what } if what.contains("3261")));
}

#[test]
fn admin_socket_cannot_move_live() {
    let new = format!("admin_socket = \"/run/other.sock\"\n{BASE}");
    let e = plan(&cfg(BASE), &cfg(&new), &[]).unwrap_err();
    assert_eq!(
        e.0,
        vec![Refusal::NotLive {
            what: "admin_socket".into()
        }]
    );
}

#[test]
fn the_metrics_endpoint_cannot_move_live() {
    let new = format!("metrics = \"127.0.0.1:9464\"\n{BASE}");
    let e = plan(&cfg(BASE), &cfg(&new), &[]).unwrap_err();
    assert_eq!(
        e.0,
        vec![Refusal::NotLive {
            what: "metrics".into()
        }]
    );
}
