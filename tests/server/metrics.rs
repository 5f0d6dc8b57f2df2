//! The target's Prometheus endpoint: a real `holdfast target --metrics ADDR` process,
//! real I/O from holdfast's initiator, a reservation conflict, a failed CHAP login and a
//! logout; each scrape checks the counters and histograms that must have moved, with
//! their labels, and `promtool check metrics` accepts the exposition.

use crate::common::hooked::{Hook, Hooked, Op};
use crate::common::metrics::{free_addr, promtool_check, samples, scrape, value, wait_up};
use crate::common::{clear_unit_attention, BLOCK};
use bytes::Bytes;
use holdfast::initiator::{InitiatorConfig, InitiatorError, PrType, RegisterFlags, Session};
use holdfast::metrics::agent;
use holdfast::metrics::http::{Format, MetricsServer, Render};
use holdfast::metrics::target::{CommandDone, CommandKind, SessionId, TargetGauges, TargetMetrics};
use holdfast::scsi::backend::BlockBackend;
use holdfast::server::config;
use holdfast::server::portal::Portals;
use holdfast::server::runtime::Runtime;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TARGET: &str = "iqn.2026-11.org.holdfast:metrics";
const WRITER: &str = "iqn.2026-11.org.holdfast:writer";
const HOLDER: &str = "iqn.2026-11.org.holdfast:holder";
const SECRET: &str = "metrics-chap-secret";
const WRITER_ISID: [u8; 6] = [0x40, 0, 0x01, 0x37, 0, 0x01];

struct Target {
    dir: tempfile::TempDir,
    child: Child,
    portal: SocketAddr,
    metrics: SocketAddr,
}

impl Target {
    async fn start() -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        let portal = free_addr();
        let metrics = free_addr();
        let toml = format!(
            "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n\
             [[target.portal]]\nlisten = \"{portal}\"\n\
             [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"4MiB\"\n\
             [target.chap]\nusername = \"alice\"\nsecret = \"{SECRET}\"\n"
        );
        std::fs::write(dir.path().join("t.toml"), toml).expect("config");
        // it holds a CHAP secret: the target refuses it readable by others
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(dir.path().join("t.toml"), private).expect("chmod");
        let log = std::fs::File::create(dir.path().join("target.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(["--log", "info", "target", "--config"])
            .arg(dir.path().join("t.toml"))
            .args(["--metrics", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn holdfast target");
        let t = Target {
            dir,
            child,
            portal,
            metrics,
        };
        wait_up(metrics, &t.log()).await;
        t
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("target.log")).unwrap_or_default()
    }

    fn config(&self, initiator: &str, secret: &str) -> InitiatorConfig {
        let mut c = InitiatorConfig::new(initiator, TARGET, self.portal);
        c.chap = Some(("alice".into(), secret.as_bytes().to_vec()));
        c
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write 8 blocks and read them back; then a second session holds a WRITE EXCLUSIVE
/// reservation and the first session's next write conflicts.
async fn io_and_conflict(t: &Target) -> Session {
    let mut c = t.config(WRITER, SECRET);
    c.isid = Some(WRITER_ISID);
    let writer = Session::login(c).await.expect("CHAP login");
    clear_unit_attention(&writer, 0).await;
    let data = Bytes::from(vec![0x5a; 8 * BLOCK as usize]);
    writer
        .write16(0, 0, data.clone(), BLOCK, false)
        .await
        .expect("write");
    let back = writer.read16(0, 0, 8, BLOCK).await.expect("read");
    assert_eq!(back, data);
    let holder = Session::login(t.config(HOLDER, SECRET))
        .await
        .expect("login");
    clear_unit_attention(&holder, 0).await;
    let flags = RegisterFlags::default();
    holder.register(0, 0, 0xb0, &flags).await.expect("register");
    holder
        .reserve(0, 0xb0, PrType::WriteExclusive)
        .await
        .expect("reserve");
    let e = writer.write16(0, 8, data, BLOCK, false).await.unwrap_err();
    assert!(matches!(e, InitiatorError::ReservationConflict), "{e}");
    holder.logout().await.expect("logout");
    wait_gone(t, HOLDER).await;
    writer
}

/// Wait until no series names `initiator` (its session ended on the target's side).
async fn wait_gone(t: &Target, initiator: &str) {
    let label = format!("initiator=\"{initiator}\"");
    for _ in 0..500 {
        if !scrape(t.metrics).contains(&label) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{initiator}'s series outlived its session:\n{}", t.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_metrics_follow_io_conflicts_and_chap_failures() {
    let t = Target::start().await;
    let writer = io_and_conflict(&t).await;
    let e = Session::login(t.config(WRITER, "not-the-secret-at-all"))
        .await
        .unwrap_err();
    assert_eq!(e.login_status(), Some((2, 1)), "{e}");

    let text = scrape(t.metrics);
    let s = samples(&text);
    let v = |name: &str, labels: &[(&str, &str)]| value(&s, name, labels);
    let lun = [("target", TARGET), ("lun", "0")];
    let me = [("initiator", WRITER), ("isid", "400001370001")];
    let kind = |k| [("target", TARGET), ("lun", "0"), ("kind", k)];
    assert_eq!(
        v("holdfast_lun_written_bytes_total", &lun),
        Some(4096.0),
        "{text}"
    );
    assert_eq!(
        v("holdfast_lun_read_bytes_total", &lun),
        Some(4096.0),
        "{text}"
    );
    // The good write and the conflicted one; the read; the holder's PR OUTs are other.
    let count = "holdfast_lun_command_duration_seconds_count";
    assert_eq!(v(count, &kind("write")), Some(2.0), "{text}");
    assert_eq!(v(count, &kind("read")), Some(1.0), "{text}");
    assert!(v(count, &kind("other")).unwrap_or(0.0) >= 2.0, "{text}");
    let inf = [
        ("target", TARGET),
        ("lun", "0"),
        ("kind", "write"),
        ("le", "+Inf"),
    ];
    assert_eq!(
        v("holdfast_lun_command_duration_seconds_bucket", &inf),
        Some(2.0)
    );
    assert_eq!(
        v("holdfast_lun_reservation_conflicts_total", &lun),
        Some(1.0)
    );
    let w = [me[0], me[1], ("kind", "write")];
    assert_eq!(
        v("holdfast_session_commands_total", &w),
        Some(2.0),
        "{text}"
    );
    assert_eq!(v("holdfast_session_written_bytes_total", &me), Some(4096.0));
    assert_eq!(
        v("holdfast_session_reservation_conflicts_total", &me),
        Some(1.0)
    );
    assert_eq!(
        v("holdfast_chap_failures_total", &[("target", TARGET)]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        v("holdfast_login_failures_total", &[("status", "0201")]),
        Some(1.0)
    );
    assert_eq!(v("holdfast_logins_total", &[]), Some(2.0));
    assert_eq!(v("holdfast_lun_offline", &lun), Some(0.0));
    assert!(v("holdfast_buffer_memory_limit_bytes", &[]).unwrap_or(0.0) > 0.0);
    // The holder logged out (its series went), the writer is still in.
    assert_eq!(v("holdfast_sessions", &[]), Some(1.0), "{text}");
    let (ok, said) = promtool_check(&text);
    assert!(
        ok,
        "promtool check metrics refused the exposition:\n{said}\n{text}"
    );

    writer.logout().await.expect("logout");
    wait_gone(&t, WRITER).await;
}

/// OpenMetrics for a scraper that asks for it, a 404 elsewhere, and both parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_metrics_negotiate_the_format() {
    let t = Target::start().await;
    let om = "application/openmetrics-text; version=1.0.0";
    let (head, body) = crate::common::metrics::get(t.metrics, Some(om)).expect("scrape");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("holdfast_buffer_memory_limit_bytes "),
        "{body}"
    );
    let mut s = std::net::TcpStream::connect(t.metrics).expect("connect");
    std::io::Write::write_all(&mut s, b"GET /other HTTP/1.1\r\n\r\n").expect("send");
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).expect("reply");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

/// Every series name the code exports: the families' TYPE lines from a target and an
/// agent registry with every family populated (histograms with their three suffixes).
fn exported_series() -> BTreeSet<String> {
    let m = Arc::new(TargetMetrics::new());
    let id = SessionId {
        target: "t",
        initiator: "i",
        isid: "00",
        tsih: 1,
    };
    let s = m.session(&id, &[0]);
    s.command(CommandDone {
        lun: 0,
        kind: CommandKind::Read,
        read: 512,
        written: 512,
        conflict: true,
        took: Duration::from_millis(1),
    });
    m.login();
    m.login_failed(2, 1);
    m.chap_failed(Some("t"));
    let gauges = TargetGauges {
        luns: vec![("t".into(), 0, false)],
        ..TargetGauges::default()
    };
    let a = agent::install();
    agent::on_event("fenced", &serde_json::json!({}));
    agent::on_event("vm-started", &serde_json::json!({"claim_ms": 10.0}));
    a.failover(Duration::from_secs(3));
    a.group_record("g", "running", 1);
    a.group_local("g", "running");
    a.peers(1, 0);
    let text = m.render(&gauges, Format::Prometheus) + &a.render(Format::Prometheus);
    let mut names = BTreeSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_string());
    }
    names
}

/// Every `expr` and templating `query` string of the dashboard.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// docs/grafana/holdfast.json parses, uses no series the code does not export, and
/// shows every series family the code exports: it cannot drift silently.
#[test]
fn the_grafana_dashboard_matches_the_exported_series() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/holdfast.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dash, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");
    let exported = exported_series();
    let mut used = BTreeSet::new();
    for q in &queries {
        let mut rest = q.as_str();
        while let Some(i) = rest.find("holdfast_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "{name} (in {q}) is not exported: {exported:?}"
            );
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    let unshown: Vec<_> = exported
        .iter()
        .filter(|n| !n.ends_with("_bucket") && !n.ends_with("_sum") && !n.ends_with("_count"))
        .filter(|n| !exported.contains(&format!("{n}_count")))
        .filter(|n| !used.contains(*n))
        .collect();
    // A histogram family is shown through any of its suffixes.
    let hist_unshown: Vec<_> = exported
        .iter()
        .filter_map(|n| n.strip_suffix("_count"))
        .filter(|b| {
            !["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| used.contains(&format!("{b}{s}")))
        })
        .collect();
    assert!(
        unshown.is_empty() && hist_unshown.is_empty(),
        "not on the dashboard: {unshown:?} {hist_unshown:?}"
    );
}

/// Fails every backend call with ENODEV once switched on (the device is gone).
#[derive(Debug)]
struct Gone(Arc<AtomicBool>);

impl Hook for Gone {
    fn before(&self, _: Op, _: u64, _: u64) -> std::io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
        }
        Ok(())
    }
}

/// A target whose `metrics` key is set, LUN 0's store failing on demand; the endpoint is
/// wired as `holdfast target` wires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_shows_as_an_offline_lun() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = free_addr();
    let text = format!(
        "metrics = \"{addr}\"\n{}",
        crate::common::config_text("", "", &[(0, "lun0.img", "1MiB"), (1, "lun1.img", "1MiB")])
    );
    let cfg = config::parse(&text, "test.toml", dir.path()).expect("config");
    let gone = Arc::new(AtomicBool::new(false));
    let switch = gone.clone();
    let wrap = move |p: &std::path::Path, inner: Arc<dyn BlockBackend>| -> Arc<dyn BlockBackend> {
        if !p.ends_with("lun0.img") {
            return inner;
        }
        Arc::new(Hooked {
            inner,
            hook: Gone(switch.clone()),
        })
    };
    let rt = Arc::new(Runtime::build_with(&cfg, &wrap).expect("runtime"));
    let portals = Portals::bind(&cfg.listen_addrs()).await.expect("bind");
    let portal = portals.local_addrs()[0];
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(portals.serve(rt.clone(), rx.clone()));
    let metrics = rt
        .metrics
        .clone()
        .expect("the metrics key turns metrics on");
    let server = MetricsServer::bind(cfg.config.metrics.expect("key"))
        .await
        .expect("bind");
    let state = rt.clone();
    let render: Render = Arc::new(move |f| metrics.render(&state.metrics_gauges(), f));
    tokio::spawn(server.serve(render, rx));

    let s = Session::login(InitiatorConfig::new(
        crate::common::INITIATOR,
        crate::common::TARGET,
        portal,
    ))
    .await
    .expect("login");
    clear_unit_attention(&s, 0).await;
    let target = crate::common::TARGET;
    let offline = |text: &str, lun: &str| {
        value(
            &samples(text),
            "holdfast_lun_offline",
            &[("target", target), ("lun", lun)],
        )
    };
    assert_eq!(offline(&scrape(addr), "0"), Some(0.0));
    gone.store(true, Ordering::SeqCst);
    let data = Bytes::from(vec![1; BLOCK as usize]);
    s.write16(0, 0, data, BLOCK, false).await.unwrap_err();
    let text = scrape(addr);
    assert_eq!(offline(&text, "0"), Some(1.0), "{text}");
    assert_eq!(offline(&text, "1"), Some(0.0), "{text}");
}
