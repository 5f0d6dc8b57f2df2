//! Pacemaker's fence_scsi sequence (tools/pr-sequences.sh, fence-scsi part) with its two
//! nodes on different gateways (issue 14): node1 talks to gateway A only, node2 to
//! gateway B only, both `holdfast target` processes serving one RBD image. Every step
//! runs the real `holdfast pr` binary and checks its exit status and output; node2's
//! writes through B must get RESERVATION CONFLICT once node1 fences it through A.

use crate::ceph_fixture::image;
use crate::common::TARGET;
use crate::rbd_gateway::Gateway;
use std::net::SocketAddr;

const MIB: u64 = 8;
/// fence_scsi keys: a cluster-derived prefix and the node id.
const K1: &str = "0x3abe0001";
const K2: &str = "0x3abe0002";
/// `holdfast pr`'s exit status for RESERVATION CONFLICT.
const CONFLICT: i32 = 24;

/// A fence_scsi node: a fixed (initiator name, ISID) pair on one gateway's portal, so
/// that one invocation's REGISTER and the next one's RESERVE share an I_T nexus.
struct Node {
    name: &'static str,
    isid: &'static str,
    portal: SocketAddr,
}

impl Node {
    /// `holdfast pr` as this node: (exit status, stdout). Off the runtime thread.
    async fn pr(&self, args: &[&str]) -> (i32, String) {
        let mut argv: Vec<String> = vec![
            "pr".into(),
            format!("iscsi://{}/{TARGET}/0", self.portal),
            "--initiator-name".into(),
            self.name.into(),
            "--isid".into(),
            self.isid.into(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
                .args(&argv)
                .env_remove("HOLDFAST_LOG")
                .env_remove("HOLDFAST_CHAP_SECRET")
                .output()
                .expect("run holdfast pr")
        })
        .await
        .expect("join");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        println!("{} via {}: pr {args:?} -> {code}", self.name, self.portal);
        (code, format!("{stdout}\n--stderr--\n{stderr}"))
    }

    /// The step must exit with `want`; its output.
    async fn expect(&self, want: i32, step: &str, args: &[&str]) -> String {
        let (code, out) = self.pr(args).await;
        assert_eq!(code, want, "{step}: {out}");
        out
    }
}

fn has(out: &str, what: &str, step: &str) {
    assert!(out.contains(what), "{step}: output lacks {what:?}: {out}");
}

fn key_line(out: &str, key: &str) -> bool {
    out.lines().any(|l| l.trim() == key)
}

/// Both nodes unfence: REGISTER AND IGNORE; the first RESERVEs type 5 (WE-RO).
async fn unfence_both(n1: &Node, n2: &Node) {
    n1.expect(
        0,
        "node1 register-ignore",
        &["register-ignore", "--sa-key", K1],
    )
    .await;
    let out = n1
        .expect(0, "node1 read-reservation", &["read-reservation"])
        .await;
    has(
        &out,
        "there is NO reservation held",
        "before the first unfence",
    );
    let we_ro = ["--type", "write-exclusive-registrants-only"];
    n1.expect(
        0,
        "node1 reserve",
        &[&["reserve", "--key", K1][..], &we_ro].concat(),
    )
    .await;
    n2.expect(
        0,
        "node2 register-ignore",
        &["register-ignore", "--sa-key", K2],
    )
    .await;
    let out = n2
        .expect(0, "node2 read-reservation", &["read-reservation"])
        .await;
    has(
        &out,
        &format!("Key={K1}"),
        "node2 sees node1's reservation via B",
    );
    has(
        &out,
        "type: Write Exclusive, registrants only",
        "WE-RO via B",
    );
    let out = n1.expect(0, "read-keys via A", &["read-keys"]).await;
    assert!(
        key_line(&out, K1) && key_line(&out, K2),
        "both keys via A: {out}"
    );
    has(
        &out,
        "2 registered reservation keys follow",
        "read-keys counts 2",
    );
    n2.expect(
        0,
        "node2 (registrant) writes via B",
        &["write-test", "--lba", "16"],
    )
    .await;
}

/// node1 (through A) fences node2 (through B); B enforces it at once.
async fn node1_fences_node2(n1: &Node, n2: &Node) {
    let pa = ["preempt-abort", "--key", K1, "--sa-key", K2, "--type", "5"];
    n1.expect(0, "node1 preempt-abort via A", &pa).await;
    let out = n1
        .expect(0, "read-keys --json", &["read-keys", "--json"])
        .await;
    has(&out, &format!("\"{K1}\""), "node1 still registered");
    assert!(
        !out.contains(&format!("\"{K2}\"")),
        "node2's key gone: {out}"
    );
    n2.expect(
        CONFLICT,
        "fenced node2 writes via B",
        &["write-test", "--lba", "16"],
    )
    .await;
    let rr = ["read-reservation", "--key", K1, "--json"];
    let out = n1.expect(0, "read-reservation --json", &rr).await;
    has(&out, "\"held_by_key\":true", "node1 still holds");
    has(
        &out,
        "\"type\":\"write-exclusive-registrants-only\"",
        "still WE-RO",
    );
    let back = ["preempt-abort", "--key", K2, "--sa-key", K1, "--type", "5"];
    n2.expect(CONFLICT, "fenced node2 cannot preempt back via B", &back)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_scsi_with_its_nodes_on_different_gateways() {
    let spec = image("fencescsi", MIB);
    let a = Gateway::start("127.0.0.16", 1, &spec, "5s").await;
    let b = Gateway::start("127.0.0.17", 2, &spec, "5s").await;
    let n1 = Node {
        name: "iqn.2026-11.org.holdfast:fence-node1",
        isid: "0x400001000001",
        portal: a.portal,
    };
    let n2 = Node {
        name: "iqn.2026-11.org.holdfast:fence-node2",
        isid: "0x400002000001",
        portal: b.portal,
    };
    unfence_both(&n1, &n2).await;
    node1_fences_node2(&n1, &n2).await;
    // node2 rejoins through B: unfence again, and its writes land.
    n2.expect(
        0,
        "node2 re-unfence via B",
        &["register-ignore", "--sa-key", K2],
    )
    .await;
    let out = n1.expect(0, "read-keys via A", &["read-keys"]).await;
    assert!(key_line(&out, K2), "A sees node2 again: {out}");
    n2.expect(
        0,
        "re-unfenced node2 writes via B",
        &["write-test", "--lba", "16"],
    )
    .await;
    n1.expect(0, "cleanup: clear via A", &["clear", "--key", K1])
        .await;
    let out = n2.expect(0, "read-keys via B", &["read-keys"]).await;
    has(
        &out,
        "there are NO registered reservation keys",
        "B after clear",
    );
}
