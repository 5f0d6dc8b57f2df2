//! `holdfast pr` end to end: the real binary against an in-process target.

use crate::common;

use common::{TestTarget, TARGET};
use serde_json::Value;

const N1: &str = "iqn.2026-11.org.holdfast:node1";
const N2: &str = "iqn.2026-11.org.holdfast:node2";
const N3: &str = "iqn.2026-11.org.holdfast:node3";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.stdout, self.stderr))
    }
}

/// Run `holdfast pr URL ARGS…` as initiator `name` (fixed default ISID), off the
/// runtime thread so that the in-process target keeps serving.
async fn pr(t: &TestTarget, name: &str, args: &[&str]) -> Run {
    let url = format!("iscsi://{}/{TARGET}/0", t.addr);
    let mut argv: Vec<String> = vec!["pr".into(), url];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.extend(["--initiator-name".into(), name.into()]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(&argv)
            .env_remove("HOLDFAST_LOG")
            .env_remove("HOLDFAST_CHAP_SECRET")
            .output()
            .expect("run holdfast")
    })
    .await
    .expect("join");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(t: &TestTarget, name: &str, args: &[&str]) -> Run {
    let r = pr(t, name, args).await;
    assert_eq!(r.code, 0, "{args:?}: {} / {}", r.stdout, r.stderr);
    r
}

async fn conflict(t: &TestTarget, name: &str, args: &[&str]) -> Run {
    let r = pr(t, name, args).await;
    assert_eq!(r.code, 24, "{args:?}: {} / {}", r.stdout, r.stderr);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_reserve_fence_and_reunfence() {
    let t = common::start_default().await;
    ok(&t, N1, &["register-ignore", "--sa-key", "0x1001"]).await;
    ok(&t, N2, &["register-ignore", "--sa-key", "1002"]).await;
    ok(&t, N1, &["reserve", "--key", "0x1001", "--type", "we-ro"]).await;

    let r = ok(&t, N1, &["read-keys"]).await;
    assert_eq!(
        r.stdout,
        "  PR generation=0x2, 2 registered reservation keys follow:\n    0x1001\n    0x1002\n"
    );
    let j = ok(&t, N2, &["read-reservation", "--json", "--key", "0x1002"])
        .await
        .json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["reservation"]["key"], "0x1001");
    assert_eq!(j["reservation"]["type"], "write-exclusive-registrants-only");
    assert_eq!(j["held_by_key"], false);

    // Another node's RESERVE conflicts; JSON says so too.
    let r = conflict(&t, N2, &["reserve", "-K", "1002", "-T", "5", "--json"]).await;
    assert_eq!(r.json()["reservation_conflict"], true);
    assert!(r.stderr.contains("RESERVATION CONFLICT"), "{}", r.stderr);

    // Registrants may write under WE-RO, strangers may not.
    ok(&t, N2, &["write-test", "--lba", "8"]).await;
    conflict(&t, N3, &["write-test", "--lba", "8"]).await;

    // Fence node2.
    ok(
        &t,
        N1,
        &[
            "preempt-abort",
            "--key",
            "1001",
            "--sa-key",
            "1002",
            "--type",
            "5",
        ],
    )
    .await;
    let j = ok(&t, N1, &["read-keys", "--json"]).await.json();
    assert_eq!(j["keys"], serde_json::json!(["0x1001"]));
    assert_eq!(j["generation"], 3);
    conflict(&t, N2, &["write-test", "--lba", "8"]).await;
    let j = ok(&t, N1, &["read-reservation", "--json", "--key", "1001"])
        .await
        .json();
    assert_eq!(j["held_by_key"], true);

    // node2 comes back (unfence) and may write again.
    ok(&t, N2, &["register-ignore", "--sa-key", "1002"]).await;
    ok(&t, N2, &["write-test", "--lba", "8"]).await;
    let j = ok(&t, N2, &["read-full-status", "--json"]).await.json();
    let regs = j["registrations"].as_array().expect("array");
    assert_eq!(regs.len(), 2);
    assert_eq!(regs[0]["holder"], true);
    assert_eq!(regs[0]["transport_id"], format!("{N1},i,0x806866707201"));
    assert_eq!(regs[1]["holder"], false);
    assert_eq!(regs[1]["type"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isid_is_part_of_the_nexus() {
    let t = common::start_default().await;
    ok(
        &t,
        N1,
        &["register", "--sa-key", "0xa1", "--isid", "0x800000000001"],
    )
    .await;
    // Same name, other ISID: another I_T nexus, not registered.
    conflict(
        &t,
        N1,
        &["reserve", "-K", "a1", "-T", "we", "--isid", "800000000002"],
    )
    .await;
    ok(
        &t,
        N1,
        &["reserve", "-K", "a1", "-T", "we", "--isid", "800000000001"],
    )
    .await;
    // Move the reservation to node2's port, which REGISTER AND MOVE registers.
    ok(
        &t,
        N1,
        &[
            "register-move",
            "-K",
            "a1",
            "-S",
            "b2",
            "-T",
            "we",
            "--rel-tgt-port",
            "1",
            "--transport-id",
            &format!("{N2},i,0x806866707201"),
            "--unreg",
            "--isid",
            "800000000001",
        ],
    )
    .await;
    let j = ok(&t, N2, &["read-reservation", "--json", "-K", "b2"])
        .await
        .json();
    assert_eq!(j["held_by_key"], true);
    assert_eq!(j["reservation"]["type"], "write-exclusive");
    let j = ok(&t, N2, &["read-keys", "--json"]).await.json();
    assert_eq!(j["keys"], serde_json::json!(["0xb2"]));

    // SPEC_I_PT (only from an unregistered nexus) with a name-only TransportID
    // registers that initiator name, for every ISID.
    ok(
        &t,
        N2,
        &[
            "register",
            "-S",
            "c3",
            "--spec-i-pt",
            N3,
            "--isid",
            "800000000009",
        ],
    )
    .await;
    let j = ok(&t, N3, &["read-full-status", "--json"]).await.json();
    let regs: Vec<(&str, &str)> = j["registrations"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| Some((r["key"].as_str()?, r["transport_id"].as_str()?)))
        .collect();
    assert!(regs.contains(&("0xc3", N3)), "{regs:?}");
    // Only the holder may write under Write Exclusive.
    conflict(&t, N3, &["write-test", "--isid", "random"]).await;
    ok(&t, N2, &["write-test"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_and_exit_codes() {
    let t = common::start_default().await;
    let r = pr(&t, N1, &["reserve", "--key", "1"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("reserve needs --type"), "{}", r.stderr);
    let r = pr(&t, N1, &["reserve", "--key", "1", "--type", "2"]).await;
    assert_eq!(r.code, 2, "clap rejects type 2: {}", r.stderr);
    let r = pr(
        &t,
        N1,
        &["register-ignore", "--sa-key", "1", "--spec-i-pt", N2],
    )
    .await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    // RELEASE from an unregistered nexus is a RESERVATION CONFLICT (SPC-4 §5.13.11.2).
    conflict(&t, N1, &["release", "--key", "1", "--type", "we"]).await;
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["pr", "iscsi://127.0.0.1/iqn.a:b", "read-keys", "--json"])
            .output()
            .expect("run holdfast")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(2));
    let j: Value = serde_json::from_slice(&out.stdout).expect("json error");
    assert_eq!(j["ok"], false);
    assert!(j["error"].as_str().unwrap_or("").contains("LUN is missing"));
}
