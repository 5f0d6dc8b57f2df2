//! The status page (`holdfast ctl serve`) in headless Chromium, driven over the DevTools
//! protocol: the page is loaded while node1 owns the group, node1 is killed with -9,
//! and the same page (no reload) must come to show the new owner and the fence event.
//! The screenshot is kept as target/tools-test/status-page.png. Chromium is required:
//! without it this test fails (tools/deps.sh installs it).

use crate::common;

use common::cluster::{node_name, Cluster, GroupSpec};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(45);

/// GET (or `method`) `path` on `addr`: status code and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    raw_http(
        addr,
        &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0u8; len.unwrap_or(0)];
    r.read_exact(&mut body).unwrap();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// A minimal WebSocket client (RFC 6455: masked text frames out, whole messages in)
/// speaking the Chrome DevTools protocol.
struct Cdp {
    s: TcpStream,
    next_id: u64,
}

impl Cdp {
    fn connect(port: u16, path: &str) -> Cdp {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("DevTools connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "no WebSocket upgrade: {head}"
        );
        Cdp { s, next_id: 1 }
    }

    fn send(&mut self, text: &str) {
        let p = text.as_bytes();
        let mut f = vec![0x81u8];
        match p.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).unwrap();
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut l = [0u8; 2];
                self.s.read_exact(&mut l).unwrap();
                len = u64::from(u16::from_be_bytes(l));
            } else if len == 127 {
                let mut l = [0u8; 8];
                self.s.read_exact(&mut l).unwrap();
                len = u64::from_be_bytes(l);
            }
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).unwrap();
            assert_ne!(opcode, 8, "DevTools closed the WebSocket");
            msg.extend_from_slice(&p);
            if fin {
                return String::from_utf8(msg).unwrap();
            }
        }
    }

    /// Send a command and wait for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&serde_json::json!({"id": id, "method": method, "params": params}).to_string());
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.recv()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page; its value (a string).
    fn eval(&mut self, expr: &str) -> String {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for ch in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in ch.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..ch.len()]);
    }
    out
}

/// A child killed when dropped, so a failing test leaves no browser or server behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Headless Chromium with DevTools on a port it picks (read from DevToolsActivePort).
fn chromium(profile: &Path) -> (Reaped, u16) {
    let child = Reaped(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromium is required for this test (tools/deps.sh installs it): {e}")
            }),
    );
    let file = profile.join("DevToolsActivePort");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(port) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.parse().ok()))
        {
            return (child, port);
        }
        assert!(
            Instant::now() < end,
            "chromium did not open its DevTools port"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `holdfast ctl serve` on a free port, with node `id`'s config.
fn serve(c: &Cluster, id: u16) -> (Reaped, SocketAddr) {
    let mut child = Command::new(&c.bin)
        .args(["ctl", "--config"])
        .arg(c.node_config(id))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let child = Reaped(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("status page on http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// What the live page shows: the group's owner and state, node1's alive cell, the
/// event kinds (with their "about" node), the update count and our no-reload marker.
const LOOK: &str = r#"JSON.stringify({
  owner: (document.querySelector('tr[data-group="web"] .owner') || {}).textContent || "",
  state: (document.querySelector('tr[data-group="web"] .state') || {}).textContent || "",
  node1: (document.querySelector('tr[data-node="node1"]') || {}).textContent || "",
  events: [...document.querySelectorAll('#events tbody tr')].map(r => r.dataset.kind + ":" + r.querySelector('.target').textContent),
  updates: Number(document.body.dataset.updates || 0),
  marker: window.__holdfast_test_marker || 0
})"#;

/// `Null` while the page is still loading (the expression throws then).
fn look(cdp: &mut Cdp) -> serde_json::Value {
    serde_json::from_str(&cdp.eval(LOOK)).unwrap_or(serde_json::Value::Null)
}

fn wait_page(
    cdp: &mut Cdp,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + T;
    loop {
        let v = look(cdp);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < end, "the page never showed {what}: {v}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn artifact() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools-test/status-page.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_new_owner_and_the_fence_without_a_reload() {
    let mut g = GroupSpec::new("web", 1);
    g.preferred = vec![node_name(1), node_name(2), node_name(3)];
    let mut c = Cluster::new(3, vec![g]).await;
    for id in 1..=3 {
        c.start_agent(id);
    }
    c.wait_running("web", Some(1), T).await;
    let (_srv, addr) = serve(&c, 3);
    let end = Instant::now() + T;
    while !http(addr, "GET", "/api/status").1.contains(r#""ok":true"#) {
        assert!(Instant::now() < end, "/api/status never became ok");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Bad requests are answered and do not hurt the server.
    assert_eq!(http(addr, "GET", "/nope").0, 404);
    assert_eq!(http(addr, "POST", "/api/status").0, 405);
    assert_eq!(raw_http(addr, "garbage\r\n\r\n").0, 400);
    let (code, page) = http(addr, "GET", "/");
    assert!(code == 200 && page.contains("<script>"), "{code}");

    let profile = tempfile::tempdir().unwrap();
    let (_browser, port) = chromium(profile.path());
    let (_, list) = http(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        "/json/list",
    );
    let targets: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ws = targets
        .as_array()
        .and_then(|t| t.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_string();
    let path = &ws[ws.find("/devtools/").unwrap()..];
    let mut cdp = Cdp::connect(port, path);
    cdp.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://{addr}/")}),
    );
    wait_page(&mut cdp, "node1 owning web", |v| {
        v["owner"] == "node1" && v["state"] == "running"
    });
    cdp.eval("window.__holdfast_test_marker = 42; ''");

    c.kill_node(1);
    let v = wait_page(&mut cdp, "the new owner and the fence", |v| {
        let owner = v["owner"].as_str().unwrap_or("");
        let fenced = v["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|k| k == "fenced:node1"));
        (owner == "node2" || owner == "node3") && v["state"] == "running" && fenced
    });
    assert_eq!(v["marker"], 42, "the page was reloaded: {v}");
    assert!(
        v["node1"].as_str().unwrap().contains("NO"),
        "node1 not shown dead: {v}"
    );
    let updates_before = v["updates"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        look(&mut cdp)["updates"].as_u64().unwrap() > updates_before,
        "polling stopped"
    );

    let shot = cdp.call(
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    );
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    std::fs::create_dir_all(artifact().parent().unwrap()).unwrap();
    std::fs::write(artifact(), &png).unwrap();
    eprintln!("screenshot: {} ({} bytes)", artifact().display(), png.len());
}
