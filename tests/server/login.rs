//! Login over real TCP against an in-process target.

use crate::common;

use common::*;
use holdfast::initiator::{InitiatorError, Session};

const SECRET: &str = "initiator-secret-1";
const TSECRET: &str = "target-secret-2345";

#[tokio::test]
async fn plain_login_nop_logout() {
    let t = start_default().await;
    let s = t.login().await;
    assert_eq!(s.isid()[0], 0x80, "random ISID format");
    assert_eq!(s.initiator_name(), INITIATOR);
    assert!(s.negotiated().tsih != 0);
    assert_eq!(s.negotiated().target_portal_group_tag, Some(1));
    s.nop().await.expect("nop");
    s.test_unit_ready(0).await.ok();
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn discovery_lists_the_target() {
    let t = start_default().await;
    let found = Session::discover(t.addr, INITIATOR, None)
        .await
        .expect("discovery");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, TARGET);
    assert!(!found[0].1.is_empty(), "addresses: {found:?}");
    assert!(found[0].1[0].ends_with(",1"), "tpgt in {found:?}");
}

fn chap_target(mutual: bool) -> String {
    let m = if mutual {
        format!("mutual_username = \"tgt\"\nmutual_secret = \"{TSECRET}\"\n")
    } else {
        String::new()
    };
    config_text(
        "",
        &format!("[target.chap]\nusername = \"alice\"\nsecret = \"{SECRET}\"\n{m}"),
        &[(0, "lun0.img", "1MiB")],
    )
}

#[tokio::test]
async fn chap_one_way() {
    let t = start(&chap_target(false)).await;
    let mut c = t.config();
    c.chap = Some(("alice".into(), SECRET.as_bytes().to_vec()));
    let s = Session::login(c).await.expect("CHAP login");
    s.nop().await.unwrap();
    // Without credentials the target refuses.
    let e = Session::login(t.config()).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");
}

#[tokio::test]
async fn chap_mutual() {
    let t = start(&chap_target(true)).await;
    let mut c = t.config();
    c.chap = Some(("alice".into(), SECRET.as_bytes().to_vec()));
    c.mutual_chap = Some(("tgt".into(), TSECRET.as_bytes().to_vec()));
    let s = Session::login(c.clone()).await.expect("mutual CHAP login");
    s.nop().await.unwrap();
    // A target that cannot prove the secret we expect is refused by us.
    c.mutual_chap = Some(("tgt".into(), b"some-other-secret".to_vec()));
    let e = Session::login(c).await.unwrap_err();
    assert!(matches!(e, InitiatorError::TargetAuth(_)), "{e}");
}

#[tokio::test]
async fn wrong_secret_is_auth_failure() {
    let t = start(&chap_target(false)).await;
    let mut c = t.config();
    c.chap = Some(("alice".into(), b"not-the-secret-at-all".to_vec()));
    let e = Session::login(c).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");
}

#[tokio::test]
async fn unknown_target_is_not_found() {
    let t = start_default().await;
    let mut c = t.config();
    c.target_name = "iqn.2026-11.org.holdfast:nosuch".into();
    let e = Session::login(c).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 3)), "{e}");
}

#[tokio::test]
async fn acl_refusal_is_authorization_failure() {
    let t = start(&config_text(
        "",
        "[[target.acl]]\ninitiator = \"iqn.2026-11.org.holdfast:someone-else\"\n",
        &[(0, "lun0.img", "1MiB")],
    ))
    .await;
    let e = Session::login(t.config()).await.unwrap_err();
    assert_eq!(e.login_status(), Some((2, 2)), "{e}");
    // Discovery does not show it either.
    let found = Session::discover(t.addr, INITIATOR, None).await.unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test]
async fn crc32c_digests() {
    let t = start_default().await;
    let mut c = t.config();
    c.header_digest = true;
    c.data_digest = true;
    let s = Session::login(c).await.unwrap();
    assert!(s.negotiated().connection.header_digest && s.negotiated().connection.data_digest);
    clear_unit_attention(&s, 0).await;
    let data = bytes::Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    s.write16(0, 100, data.clone(), BLOCK, false).await.unwrap();
    let back = s.read16(0, 100, 128, BLOCK).await.unwrap();
    assert_eq!(back, data);
    s.logout().await.unwrap();
}

#[tokio::test]
async fn session_reinstatement() {
    let t = start_default().await;
    let isid = [0x80, 1, 2, 3, 4, 5];
    let mut c = t.config();
    c.isid = Some(isid);
    let first = Session::login(c.clone()).await.unwrap();
    first.nop().await.unwrap();
    let second = Session::login(c).await.unwrap();
    // The second session works (and by then the first one has been ended).
    second.nop().await.unwrap();
    clear_unit_attention(&second, 0).await;
    let e = tokio::time::timeout(std::time::Duration::from_secs(10), first.nop())
        .await
        .expect("first session's request does not hang")
        .unwrap_err();
    assert!(matches!(e, InitiatorError::ConnectionLost), "{e}");
    second.test_unit_ready(0).await.unwrap();
    second.logout().await.unwrap();
}
