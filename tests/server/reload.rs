//! Changing the target live: the real `holdfast target` process on real TCP, its config
//! file rewritten and reloaded through the admin socket (`holdfast target reload`) and
//! by SIGHUP, while one session of holdfast's initiator keeps writing and reading back.
//! libiscsi is the second initiator: `iscsi-perf` keeps one session reading through the
//! reloads, and `iscsi-ls`, `iscsi-readcapacity16`, `iscsi-inq` log in afterwards. Every
//! test asserts that the original sessions never dropped: same ISID and TSIH in
//! `holdfast target sessions`, no I/O error, I/O still going after the reload.

use bytes::Bytes;
use holdfast::initiator::{InitiatorConfig, InitiatorError, Session};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TARGET: &str = "iqn.2026-11.org.holdfast:live";
/// holdfast's own initiator: the session that must survive every reload.
const KEEPER: &str = "iqn.2026-11.org.holdfast:keeper";
/// libiscsi's initiator name in these tests.
const NEWCOMER: &str = "iqn.2026-11.org.holdfast:newcomer";
/// An initiator whose ACL entry a reload removes while it is logged in.
const LEAVER: &str = "iqn.2026-11.org.holdfast:leaver";
/// libiscsi's `iscsi-perf`: the second session that must survive every reload.
const READER: &str = "iqn.2026-11.org.holdfast:reader";
const MIB: u64 = 1 << 20;
const REPORTED_LUNS_CHANGED: (u8, u8) = (0x3F, 0x0E);
const CAPACITY_CHANGED: (u8, u8) = (0x2A, 0x09);

/// What the config file says; rewritten between reloads.
#[derive(Clone)]
struct Spec {
    ports: Vec<u16>,
    /// (id, size in MiB)
    luns: Vec<(u64, u64)>,
    /// (initiator, LUN mask)
    acl: Vec<(&'static str, Option<Vec<u64>>)>,
    chap_secret: Option<&'static str>,
}

impl Spec {
    fn toml(&self) -> String {
        let mut s = format!("data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n");
        for (i, p) in self.ports.iter().enumerate() {
            s += &format!(
                "[[target.portal]]\nlisten = \"127.0.0.1:{p}\"\ntpgt = {}\n",
                i + 1
            );
        }
        for (id, mib) in &self.luns {
            s += &format!(
                "[[target.lun]]\nid = {id}\npath = \"lun{id}.img\"\nsize = \"{mib}MiB\"\n"
            );
        }
        for (init, mask) in &self.acl {
            s += &format!("[[target.acl]]\ninitiator = \"{init}\"\n");
            if let Some(m) = mask {
                s += &format!("luns = {m:?}\n");
            }
        }
        if let Some(secret) = self.chap_secret {
            s += &format!("[target.chap]\nusername = \"alice\"\nsecret = \"{secret}\"\n");
        }
        s
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A `holdfast target` child process and its config file.
struct LiveTarget {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

/// A config that may hold a CHAP secret inline must be mode 0600.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("config");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

impl LiveTarget {
    async fn start(spec: &Spec) -> LiveTarget {
        let dir = tempfile::tempdir().expect("tempdir");
        write_private(&dir.path().join("t.toml"), &spec.toml());
        let log = std::fs::File::create(dir.path().join("target.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["--log", "info", "target", "--config"])
            .arg(dir.path().join("t.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn holdfast target");
        let t = LiveTarget {
            dir,
            child,
            port: spec.ports[0],
        };
        for _ in 0..500 {
            if t.socket().exists() && std::net::TcpStream::connect(t.addr()).is_ok() {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("target did not come up: {}", t.log());
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("data").join("admin.sock")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("target.log")).unwrap_or_default()
    }

    fn rewrite(&self, spec: &Spec) {
        write_private(&self.dir.path().join("t.toml"), &spec.toml());
    }

    fn sighup(&self) {
        let st = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    }

    /// `holdfast target CMD --socket S ARGS…`, off the runtime thread.
    async fn admin(&self, cmd: &str, args: &[&str]) -> Output {
        let mut argv = vec![
            "target".to_string(),
            cmd.to_string(),
            "--socket".into(),
            self.socket().display().to_string(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_holdfast"))
                .args(&argv)
                .env_remove("HOLDFAST_LOG")
                .output()
                .expect("run holdfast")
        })
        .await
        .expect("join")
    }

    async fn json(&self, cmd: &str) -> Value {
        let out = self.admin(cmd, &["--json"]).await;
        assert!(out.status.success(), "{cmd}: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("JSON answer")
    }

    /// (initiator, ISID, TSIH) of every session.
    async fn sessions(&self) -> Vec<(String, String, u64)> {
        let v = self.json("sessions").await;
        let mut out: Vec<_> = v["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| {
                (
                    s["initiator"].as_str().unwrap_or_default().to_string(),
                    s["isid"].as_str().unwrap_or_default().to_string(),
                    s["tsih"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// (LUN, size in bytes) as served.
    async fn luns(&self) -> Vec<(u64, u64)> {
        let v = self.json("luns").await;
        v["luns"]
            .as_array()
            .expect("luns")
            .iter()
            .map(|l| (l["lun"].as_u64().unwrap(), l["size"].as_u64().unwrap()))
            .collect()
    }
}

impl Drop for LiveTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A libiscsi utility as initiator `name`; its output and whether it succeeded.
async fn libiscsi(tool: &str, name: &str, url: String, extra: &[&str]) -> (bool, String) {
    let mut argv: Vec<String> = vec!["-i".into(), name.into()];
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.push(url);
    let tool = tool.to_string();
    let out = tokio::task::spawn_blocking(move || Command::new(&tool).args(&argv).output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("{e}: libiscsi-bin is required"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}

type Uas = Arc<Mutex<Vec<(u8, u8)>>>;
type Errors = Arc<Mutex<Vec<String>>>;

/// The kept session: writes and reads back on LUN 0 in the background, recording every
/// unit attention it is told and every other error.
struct Keeper {
    session: Arc<Session>,
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    uas: Uas,
    errors: Errors,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    async fn start(addr: SocketAddr, chap: Option<&str>) -> Keeper {
        let mut cfg = InitiatorConfig::new(KEEPER, TARGET, addr);
        cfg.chap = chap.map(|s| ("alice".to_string(), s.as_bytes().to_vec()));
        let session = Arc::new(Session::login(cfg).await.expect("keeper login"));
        let (ops, stop, uas, errors) = <(Arc<AtomicU64>, Arc<AtomicBool>, Uas, Errors)>::default();
        let (s, ops2, stop2, uas2, errors2) = (
            session.clone(),
            ops.clone(),
            stop.clone(),
            uas.clone(),
            errors.clone(),
        );
        let task = tokio::spawn(async move {
            let mut i: u64 = 0;
            while !stop2.load(Ordering::Relaxed) {
                let lba = i % 1024;
                let data = Bytes::from(vec![(i % 251) as u8; 4096]);
                let r = async {
                    s.write16(0, lba, data.clone(), 512, false).await?;
                    let back = s.read16(0, lba, 8, 512).await?;
                    if back != data {
                        return Err(InitiatorError::Protocol(format!("LBA {lba}: data differs")));
                    }
                    Ok(())
                }
                .await;
                match r {
                    Ok(()) => {
                        ops2.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Err(InitiatorError::CheckCondition { key: 6, asc, ascq }) => {
                        uas2.lock().unwrap().push((asc, ascq));
                    }
                    Err(e) => {
                        errors2.lock().unwrap().push(e.to_string());
                        // A dead session fails at once: yield, or the loop never does.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
        Keeper {
            session,
            ops,
            stop,
            uas,
            errors,
            task,
        }
    }

    /// Run `op` on the kept session, recording (and retrying past) unit attentions.
    async fn cmd<T, F, Fut>(&self, op: F) -> Result<T, InitiatorError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T, InitiatorError>>,
    {
        for _ in 0..8 {
            match op(self.session.clone()).await {
                Err(InitiatorError::CheckCondition { key: 6, asc, ascq }) => {
                    self.uas.lock().unwrap().push((asc, ascq))
                }
                r => return r,
            }
        }
        op(self.session.clone()).await
    }

    async fn wait_for_ua(&self, ua: (u8, u8)) {
        for _ in 0..500 {
            if self.uas.lock().unwrap().contains(&ua) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "no unit attention {ua:02x?}; seen {:02x?}",
            self.uas.lock().unwrap()
        );
    }

    /// I/O goes on: more operations complete, and none failed.
    async fn assert_alive(&self) {
        let before = self.ops.load(Ordering::Relaxed);
        for _ in 0..500 {
            if self.ops.load(Ordering::Relaxed) > before + 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            self.ops.load(Ordering::Relaxed) > before + 10,
            "kept session's I/O stalled"
        );
        assert!(
            self.errors.lock().unwrap().is_empty(),
            "I/O errors: {:?}",
            self.errors.lock().unwrap()
        );
        assert!(!self.session.is_closed(), "kept session closed");
    }

    async fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        (&mut self.task).await.expect("keeper task");
        assert!(
            self.errors.lock().unwrap().is_empty(),
            "I/O errors: {:?}",
            self.errors.lock().unwrap()
        );
        self.ops.load(Ordering::Relaxed)
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A libiscsi initiator with one session reading all along: `iscsi-perf` (sequential
/// READ(16), infinite runtime). Its output is kept line by line with the time each line
/// came. `-x 0` asks for no reconnects, yet libiscsi 1.19 silently logs in again (a new
/// ISID and TSIH) when its connection drops: only the target's session list shows that.
/// Its exit status is not used: iscsi-perf 1.19 retries a unit attention without counting
/// the retry in flight, so after one it may never finish on its own; it is killed.
struct Perf {
    child: Child,
    lines: Arc<Mutex<Vec<(std::time::Instant, String)>>>,
}

/// What iscsi-perf says when I/O failed or its session ended.
const PERF_ERRORS: [&str; 5] = [
    "failed",
    "Failed",
    "maximum number of command retries",
    "ABORT",
    "finished",
];

impl Perf {
    async fn start(name: &str, url: String) -> Perf {
        let mut child = Command::new("iscsi-perf")
            .args(["-i", name, "-x", "0", "-m", "2", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}: libiscsi-bin (iscsi-perf) is required"));
        let lines: Arc<Mutex<Vec<_>>> = Arc::default();
        Self::collect(child.stdout.take().expect("stdout"), lines.clone());
        Self::collect(child.stderr.take().expect("stderr"), lines.clone());
        let perf = Perf { child, lines };
        perf.progress_since(std::time::Instant::now())
            .await
            .unwrap_or_else(|e| panic!("iscsi-perf never got going: {e}"));
        perf
    }

    /// Progress lines end in '\r', the rest in '\n': split on both.
    fn collect(
        mut from: impl std::io::Read + Send + 'static,
        into: Arc<Mutex<Vec<(std::time::Instant, String)>>>,
    ) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut line = Vec::new();
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                for &b in &buf[..n] {
                    if b == b'\r' || b == b'\n' {
                        if !line.is_empty() {
                            let l = String::from_utf8_lossy(&line).into_owned();
                            into.lock().unwrap().push((std::time::Instant::now(), l));
                        }
                        line.clear();
                    } else {
                        line.push(b);
                    }
                }
            }
        });
    }

    fn output(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Ok once reads completed after `since` (up to 10 s) and iscsi-perf has reported no
    /// error.
    async fn progress_since(&self, since: std::time::Instant) -> Result<(), String> {
        for _ in 0..1000 {
            let lines = self.lines.lock().unwrap().clone();
            if let Some((_, l)) = lines
                .iter()
                .find(|(_, l)| PERF_ERRORS.iter().any(|e| l.contains(e)))
            {
                return Err(format!("iscsi-perf reported {l:?}:\n{}", self.output()));
            }
            // Each progress line counts the reads since the one before: the second line
            // after `since` counts only reads done after it.
            let rates: Vec<u64> = lines
                .iter()
                .filter(|(at, _)| *at > since)
                .filter_map(|(_, l)| l.split("iops current ").nth(1))
                .filter_map(|r| r.split(' ').next()?.parse().ok())
                .collect();
            if rates.iter().skip(1).any(|&n| n > 0) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("no progress in 10 s:\n{}", self.output()))
    }

    /// Still running on its first session: progress after `since`, no error, not exited.
    async fn check_alive(&mut self, since: std::time::Instant) -> Result<(), String> {
        self.progress_since(since).await?;
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            r => Err(format!("iscsi-perf ended ({r:?}):\n{}", self.output())),
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url(port: u16, lun: u64) -> String {
    format!("iscsi://127.0.0.1:{port}/{TARGET}/{lun}")
}

/// The reader kept its session through everything since `since`: it read on after it,
/// reported no error, still runs, and the target still has exactly the sessions `before`
/// (same initiators, ISIDs and TSIHs: nothing logged in again).
async fn reader_kept_its_session(
    t: &LiveTarget,
    reader: &mut Perf,
    before: &[(String, String, u64)],
    since: std::time::Instant,
) -> Result<(), String> {
    reader.check_alive(since).await?;
    let now = t.sessions().await;
    if now != before {
        return Err(format!("sessions were {before:?}, now {now:?}"));
    }
    Ok(())
}

/// Through the admin socket: a LUN grows, a LUN, an ACL entry and a portal are added;
/// the kept session sees CAPACITY DATA HAS CHANGED then the new size, REPORTED LUNS DATA
/// HAS CHANGED then the new LUN; a new initiator (libiscsi) logs in through the new
/// portal and sees exactly its mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_add_lun_acl_and_portal_through_the_socket() {
    let mut spec = Spec {
        ports: vec![free_port()],
        luns: vec![(0, 16)],
        acl: vec![(KEEPER, None), (LEAVER, None), (READER, None)],
        chap_secret: None,
    };
    let t = LiveTarget::start(&spec).await;
    let keeper = Keeper::start(t.addr(), None).await;
    keeper.assert_alive().await;
    let mut reader = Perf::start(READER, url(spec.ports[0], 0)).await;
    let leaver = Session::login(InitiatorConfig::new(LEAVER, TARGET, t.addr()))
        .await
        .expect("leaver login");
    let before = t.sessions().await;
    assert_eq!(before.len(), 3, "{before:?}");
    let (ok, out) = libiscsi("iscsi-inq", NEWCOMER, url(spec.ports[0], 0), &[]).await;
    assert!(!ok, "not in the ACL yet, yet logged in: {out}");

    let new_port = free_port();
    spec.ports.push(new_port);
    spec.luns = vec![(0, 32), (1, 8)];
    spec.acl.push((NEWCOMER, Some(vec![0, 1])));
    t.rewrite(&spec);
    let reloaded = std::time::Instant::now();
    let out = t.admin("reload", &[]).await;
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for change in [
        "LUN 0 grown from 16777216 to 33554432 bytes",
        "LUN 1 added",
        &format!("ACL entry {NEWCOMER} added"),
        &format!("portal 127.0.0.1:{new_port} added"),
    ] {
        assert!(said.contains(change), "{change:?} missing: {said}");
    }

    keeper.wait_for_ua(CAPACITY_CHANGED).await;
    keeper.wait_for_ua(REPORTED_LUNS_CHANGED).await;
    let (last, bs) = keeper
        .cmd(|s| async move { s.read_capacity16(0).await })
        .await
        .unwrap();
    assert_eq!(((last + 1) * u64::from(bs)), 32 * MIB);
    let seen = keeper
        .cmd(|s| async move { s.report_luns().await })
        .await
        .unwrap();
    assert_eq!(seen, vec![0, 1]);
    reader_kept_its_session(&t, &mut reader, &before, reloaded)
        .await
        .expect("libiscsi's session through the grow/add reload");
    let (last1, _) = keeper
        .cmd(|s| async move { s.read_capacity16(1).await })
        .await
        .unwrap();
    assert_eq!((last1 + 1) * 512, 8 * MIB);
    assert_eq!(t.luns().await, vec![(0, 32 * MIB), (1, 8 * MIB)]);
    assert_eq!(
        std::fs::metadata(t.file("lun0.img")).unwrap().len(),
        32 * MIB
    );

    // libiscsi through the new portal: logs in now, and sees the new size.
    let (ok, out) = libiscsi("iscsi-readcapacity16", NEWCOMER, url(new_port, 0), &["-s"]).await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), (32 * MIB).to_string(), "{out}");
    let (ok, out) = libiscsi(
        "iscsi-ls",
        NEWCOMER,
        format!("iscsi://127.0.0.1:{new_port}"),
        &["-s"],
    )
    .await;
    assert!(
        ok && out.contains("Lun:0") && out.contains("Lun:1"),
        "{out}"
    );

    // A mask change: the newcomer keeps LUN 1 only (on the next login here); the leaver's
    // entry goes: its session stays, but sees no LUN any more.
    spec.acl[3].1 = Some(vec![1]);
    spec.acl.remove(1);
    t.rewrite(&spec);
    let masked = std::time::Instant::now();
    let out = t.admin("reload", &[]).await;
    let said = text(&out);
    assert!(
        said.contains(&format!("LUN mask of {NEWCOMER} changed")),
        "{said}"
    );
    assert!(
        said.contains(&format!("ACL entry {LEAVER} removed")),
        "{said}"
    );
    assert_eq!(leaver.report_luns().await.unwrap(), Vec::<u64>::new());
    match leaver.test_unit_ready(0).await {
        Err(InitiatorError::CheckCondition {
            key: 5, asc: 0x25, ..
        }) => {}
        r => panic!("LUN 0 still reachable by a removed ACL entry: {r:?}"),
    }
    let (ok, out) = libiscsi(
        "iscsi-ls",
        NEWCOMER,
        format!("iscsi://127.0.0.1:{new_port}"),
        &["-s"],
    )
    .await;
    assert!(
        ok && !out.contains("Lun:0") && out.contains("Lun:1"),
        "{out}"
    );

    keeper.assert_alive().await;
    reader_kept_its_session(&t, &mut reader, &before, masked)
        .await
        .expect("libiscsi's session through both reloads");
    assert!(keeper.stop().await > 0);
}

/// By SIGHUP: the target's CHAP secret rotates (the kept session continues; a new login
/// with the old secret fails, with the new one succeeds, for holdfast's initiator and
/// libiscsi alike). Then a shrink and a removal of the LUN in use are refused whole,
/// naming the LUN and the session, and leave LUNs, sizes, files and sessions as they
/// were; through SIGHUP the refusal is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_chap_and_destructive_changes_are_refused() {
    const OLD: &str = "old-secret-123456";
    const NEW: &str = "new-secret-654321";
    let mut spec = Spec {
        ports: vec![free_port()],
        luns: vec![(0, 16)],
        acl: vec![],
        chap_secret: Some(OLD),
    };
    let t = LiveTarget::start(&spec).await;
    let keeper = Keeper::start(t.addr(), Some(OLD)).await;
    keeper.assert_alive().await;
    let lib = |secret: &str| format!("iscsi://alice%{secret}@127.0.0.1:{}/{TARGET}/0", t.port);
    let mut reader = Perf::start(READER, lib(OLD)).await;
    let before = t.sessions().await;
    assert_eq!(before.len(), 2, "{before:?}");

    spec.chap_secret = Some(NEW);
    t.rewrite(&spec);
    let rotated_at = std::time::Instant::now();
    t.sighup();
    let login = |secret: &'static str| {
        let mut cfg = InitiatorConfig::new("iqn.2026-11.org.holdfast:other", TARGET, t.addr());
        cfg.chap = Some(("alice".into(), secret.as_bytes().to_vec()));
        async move { Session::login(cfg).await }
    };
    let mut rotated = false;
    for _ in 0..500 {
        if let Ok(s) = login(NEW).await {
            s.logout().await.expect("logout");
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rotated, "the new secret never worked: {}", t.log());
    let Err(e) = login(OLD).await else {
        panic!("the old secret still logs in");
    };
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");
    assert!(libiscsi("iscsi-inq", NEWCOMER, lib(NEW), &[]).await.0);
    assert!(!libiscsi("iscsi-inq", NEWCOMER, lib(OLD), &[]).await.0);
    keeper.assert_alive().await;
    reader_kept_its_session(&t, &mut reader, &before, rotated_at)
        .await
        .expect("libiscsi's session through the CHAP rotation");

    // A shrink of the LUN in use, with an addition that must not happen either.
    let isid = &before.iter().find(|s| s.0 == KEEPER).expect("keeper").1;
    let mut bad = spec.clone();
    bad.luns = vec![(0, 8), (1, 8)];
    t.rewrite(&bad);
    let refused = std::time::Instant::now();
    let out = t.admin("reload", &[]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for part in ["refused", "LUN 0 shrink", KEEPER, isid.as_str()] {
        assert!(said.contains(part), "{part:?} missing: {said}");
    }
    // Removal, through SIGHUP: logged, and again nothing changes.
    bad.luns = vec![];
    bad.luns.push((1, 8));
    t.rewrite(&bad);
    t.sighup();
    let mut logged = false;
    for _ in 0..500 {
        if t.log().contains("LUN 0 removal while in use by") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(logged, "refusal not logged: {}", t.log());

    assert_eq!(t.luns().await, vec![(0, 16 * MIB)]);
    assert_eq!(
        std::fs::metadata(t.file("lun0.img")).unwrap().len(),
        16 * MIB
    );
    assert!(
        !t.file("lun1.img").exists(),
        "a refused reload created a LUN"
    );
    let (last, _) = keeper
        .cmd(|s| async move { s.read_capacity16(0).await })
        .await
        .unwrap();
    assert_eq!((last + 1) * 512, 16 * MIB);
    keeper.assert_alive().await;
    reader_kept_its_session(&t, &mut reader, &before, refused)
        .await
        .expect("libiscsi's session through the refused reloads");
    assert!(keeper.stop().await > 0);
}

/// The check above can fail: the reader's session is reinstated (a login as the same
/// initiator with the same ISID drops it, RFC 7143 6.3.5) and that login ends, so the
/// target stays up and whatever libiscsi does next, error or a new login (a new TSIH),
/// it is caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_reader_session_is_caught() {
    let spec = Spec {
        ports: vec![free_port()],
        luns: vec![(0, 16)],
        acl: vec![],
        chap_secret: None,
    };
    let t = LiveTarget::start(&spec).await;
    let mut reader = Perf::start(READER, url(spec.ports[0], 0)).await;
    let before = t.sessions().await;
    assert_eq!(before.len(), 1, "{before:?}");
    let since = std::time::Instant::now();
    reader_kept_its_session(&t, &mut reader, &before, since)
        .await
        .expect("nothing happened yet");

    let isid = u64::from_str_radix(&before[0].1, 16).expect("ISID in hex");
    let mut cfg = InitiatorConfig::new(READER, TARGET, t.addr());
    let mut six = [0u8; 6];
    six.copy_from_slice(&isid.to_be_bytes()[2..]);
    cfg.isid = Some(six);
    let since = std::time::Instant::now();
    let usurper = Session::login(cfg).await.expect("reinstating login");
    usurper.logout().await.expect("logout");
    let caught = reader_kept_its_session(&t, &mut reader, &before, since).await;
    let Err(how) = caught else {
        panic!("a dropped session went unnoticed");
    };
    eprintln!("caught as it should be: {how}");
}

/// A client with no target behind the socket says so and fails.
#[tokio::test]
async fn client_without_a_target_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock: &Path = &dir.path().join("admin.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["target", "sessions", "--socket"])
        .arg(sock)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the target running?"),
        "{}",
        text(&out)
    );
}
