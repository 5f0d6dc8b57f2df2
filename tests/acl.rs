//! Access control across targets: discovery and login follow the ACL, CHAP is required
//! where configured (also for discovery and per initiator), and failed CHAP attempts are
//! logged and locked out per initiator name. (Single-target ACL refusal and LUN masking
//! are in tests/server/login.rs and tests/server/io.rs.)
//!
//! Its own crate (not in tests/server/): it installs a global tracing subscriber to
//! capture the target's log lines, which would race with the subscriber of the other
//! tests in a shared test binary.

mod common;

use common::*;
use holdfast::initiator::Session;
use std::io::Write;
use std::sync::{Mutex, Once};
use std::time::Duration;

const T1: &str = "iqn.2026-11.org.holdfast:t1";
const T2: &str = "iqn.2026-11.org.holdfast:t2";
const A: &str = "iqn.2026-11.org.holdfast:node-a";
const B: &str = "iqn.2026-11.org.holdfast:node-b";
const SECRET: &str = "target-wide-secret";
const A_SECRET: &str = "node-a-own-secret";

/// Every log line of this test binary, for assertions on warnings.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// Two targets on one portal: T1 for node A only (LUN 0 of two), T2 for node B only.
fn two_targets(extra_top: &str, t1_extra: &str) -> String {
    format!(
        r#"data_dir = "data"
{extra_top}
[[target]]
name = "{T1}"
{t1_extra}
[[target.portal]]
listen = "127.0.0.1:0"
[[target.lun]]
id = 0
path = "t1-0.img"
size = "1MiB"
[[target.lun]]
id = 1
path = "t1-1.img"
size = "1MiB"
[[target.acl]]
initiator = "{A}"
luns = [1]

[[target]]
name = "{T2}"
[[target.portal]]
listen = "127.0.0.1:0"
[[target.lun]]
id = 0
path = "t2-0.img"
size = "1MiB"
[[target.acl]]
initiator = "{B}"
"#
    )
}

fn cfg(t: &TestTarget, init: &str, target: &str) -> holdfast::initiator::InitiatorConfig {
    let mut c = t.config();
    c.initiator_name = init.into();
    c.target_name = target.into();
    c
}

#[tokio::test]
async fn each_initiator_discovers_and_logs_in_to_its_own_target_only() {
    capture_logs();
    let t = start(&two_targets("", "")).await;
    let found = Session::discover(t.addr, A, None).await.unwrap();
    assert_eq!(found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), [T1]);
    let found = Session::discover(t.addr, B, None).await.unwrap();
    assert_eq!(found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), [T2]);
    let found = Session::discover(t.addr, INITIATOR, None).await.unwrap();
    assert!(found.is_empty(), "a stranger sees {found:?}");
    for (init, target) in [(A, T2), (B, T1), (INITIATOR, T1)] {
        let e = Session::login(cfg(&t, init, target)).await.unwrap_err();
        assert_eq!(e.login_status(), Some((2, 2)), "{init} -> {target}: {e}");
    }
    // A's session sees only its LUN, and SendTargets from inside it names no other target.
    let s = Session::login(cfg(&t, A, T1)).await.unwrap();
    assert_eq!(s.report_luns().await.unwrap(), vec![1]);
    let keys = s
        .text(&[("SendTargets".to_string(), T2.to_string())])
        .await
        .unwrap();
    assert!(
        !keys.iter().any(|(_, v)| v.contains("t2")),
        "T2 leaked to A: {keys:?}"
    );
    s.logout().await.unwrap();
}

#[tokio::test]
async fn discovery_chap_and_per_initiator_chap() {
    capture_logs();
    let disc = format!("[discovery_chap]\nusername = \"disc\"\nsecret = \"{SECRET}\"\n");
    let chap = format!("[target.chap]\nusername = \"all\"\nsecret = \"{SECRET}\"\n");
    let text = two_targets(&disc, &chap).replace(
        &format!("initiator = \"{A}\"\nluns = [1]\n"),
        &format!(
            "initiator = \"{A}\"\nluns = [1]\n[target.acl.chap]\nusername = \"a\"\nsecret = \"{A_SECRET}\"\n"
        ),
    );
    let t = start(&text).await;
    // Discovery without credentials: refused. (B here: every authentication failure
    // counts toward A's CHAP lockout, and A fails twice more below.)
    let e = Session::discover(t.addr, B, None).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");
    let found = Session::discover(t.addr, A, Some(("disc".into(), SECRET.as_bytes().to_vec())))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    // Node A must use its own credentials; the target-wide ones do not work for it.
    let mut c = cfg(&t, A, T1);
    let e = Session::login(c.clone()).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "no CHAP: {e}");
    c.chap = Some(("all".into(), SECRET.as_bytes().to_vec()));
    let e = Session::login(c.clone()).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "target-wide secret: {e}");
    c.chap = Some(("a".into(), A_SECRET.as_bytes().to_vec()));
    Session::login(c).await.unwrap().logout().await.unwrap();
}

#[tokio::test]
async fn failed_chap_is_logged_and_locked_out_per_initiator() {
    capture_logs();
    let limits =
        "[limits]\nchap_max_failures = 3\nchap_failure_window_secs = 60\nchap_lockout_secs = 2\n";
    let chap = format!("[target.chap]\nusername = \"all\"\nsecret = \"{SECRET}\"\n");
    // T1 open to every initiator for this test (drop its ACL).
    let text = two_targets(limits, &chap).replacen(
        &format!("[[target.acl]]\ninitiator = \"{A}\"\nluns = [1]\n"),
        "",
        1,
    );
    let t = start(&text).await;
    let good = |init: &str| {
        let mut c = cfg(&t, init, T1);
        c.chap = Some(("all".into(), SECRET.as_bytes().to_vec()));
        c
    };
    let mut bad = good(A);
    bad.chap = Some(("all".into(), b"guessing-the-secret".to_vec()));
    for _ in 0..3 {
        let e = Session::login(bad.clone()).await.unwrap_err();
        assert_eq!(e.login_status(), Some((2, 1)), "{e}");
    }
    // Locked out: even the right secret is refused for a while.
    let e = Session::login(good(A)).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");
    // Other initiators are not affected.
    Session::login(good(B))
        .await
        .unwrap()
        .logout()
        .await
        .unwrap();
    let log = logs();
    assert!(
        log.contains("repeated CHAP failures: initiator locked out") && log.contains(A),
        "lockout not logged:\n{log}"
    );
    assert!(log.contains("login refused: CHAP locked out"), "{log}");
    assert!(
        log.matches("login refused").count() >= 4,
        "each failure is a warn line:\n{log}"
    );
    // After chap_lockout_secs the right secret works again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    Session::login(good(A))
        .await
        .unwrap()
        .logout()
        .await
        .unwrap();
}
