//! `holdfast guest run` and `holdfast guest check` end to end: the real binary against
//! an in-process target. Records are forged here from the documented layout (not with
//! the library's encoder), so the on-disk format is checked too.

use crate::common;

use common::{config_text, start, TestTarget, TARGET};
use holdfast::initiator::{PrType, RegisterFlags, TransportId};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GUEST: &str = "iqn.2026-11.org.holdfast:guest-vm";
const AGENT: &str = "iqn.2026-11.org.holdfast:agent";
const REGISTRAR: &str = "iqn.2026-11.org.holdfast:registrar";
/// 16 MiB of 512-byte blocks: 16 regions of S = 1024 blocks.
const SLOTS: u64 = 1024;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn url(t: &TestTarget) -> String {
    format!("iscsi://{}/{TARGET}/0", t.addr)
}

fn command(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    c.args(args)
        .env_remove("HOLDFAST_LOG")
        .env_remove("HOLDFAST_CHAP_SECRET");
    c
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Run to completion, off the runtime thread so that the in-process target keeps
/// serving.
async fn run(args: Vec<String>) -> Run {
    let out = tokio::task::spawn_blocking(move || command(&args).output().expect("run holdfast"))
        .await
        .expect("join");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn guest_args(t: &TestTarget, log: &Path, epoch: u64, extra: &[&str]) -> Vec<String> {
    let mut v = strings(&["guest", "run", "--disk"]);
    v.push(url(t));
    v.extend(strings(&["--initiator-name", GUEST, "--epoch"]));
    v.push(epoch.to_string());
    v.push("--ack-log".into());
    v.push(log.display().to_string());
    v.extend(strings(extra));
    v
}

async fn guest_check(t: &TestTarget, log: &Path, json: bool) -> Run {
    let mut v = strings(&["guest", "check", "--disk"]);
    v.push(url(t));
    v.push("--ack-log".into());
    v.push(log.display().to_string());
    if json {
        v.push("--json".into());
    }
    run(v).await
}

/// One parsed ack-log line: (kind, instance, epoch, number or reason).
fn log_lines(log: &Path) -> Vec<(String, String, u64, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "ack log line {l:?}");
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].parse().expect("epoch"),
                f[3].to_string(),
            )
        })
        .collect()
}

/// Counters of the `kind` lines of one epoch.
fn numbers(log: &Path, kind: &str, epoch: u64) -> Vec<u64> {
    log_lines(log)
        .into_iter()
        .filter(|(k, _, e, _)| k == kind && *e == epoch)
        .map(|(_, _, _, n)| n.parse().expect("number"))
        .collect()
}

fn exit_reason(log: &Path, epoch: u64) -> Option<String> {
    log_lines(log)
        .into_iter()
        .find(|(k, _, e, _)| k == "exit" && *e == epoch)
        .map(|l| l.3)
}

/// A guest running in the background.
struct Background {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Background {
    fn spawn(args: Vec<String>, stderr: PathBuf) -> Background {
        let err = std::fs::File::create(&stderr).expect("stderr file");
        let child = command(&args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn guest");
        Background { child, stderr }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, which has not been waited for yet.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0, "kill");
    }

    /// Wait (up to 30 s) for the exit status.
    async fn wait(mut self) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "guest did not exit: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Never leave a guest behind when a test fails half-way.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until the log holds at least `n` acks of `epoch`.
async fn wait_for_acks(g: &Background, log: &Path, epoch: u64, n: usize) {
    let t0 = Instant::now();
    while numbers(log, "ack", epoch).len() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no {n} acks of epoch {epoch}: {}",
            g.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A record block as the layout documents it: magic, instance, epoch, counter (u64 LE),
/// CRC32C of those 32 bytes (u32 LE), zeros.
fn forged_block(instance: u64, epoch: u64, counter: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    b.extend_from_slice(b"HFGUEST1");
    b.extend_from_slice(&instance.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&counter.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.resize(512, 0);
    b
}

fn block_of(epoch: u64, counter: u64) -> u64 {
    1 + (epoch % 16) * SLOTS + counter % SLOTS
}

async fn target_16mib() -> TestTarget {
    start(&config_text("", "", &[(0, "lun0.img", "16MiB")])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_save_restore_and_check_catches_late_and_lost_writes() {
    let t = target_16mib().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("acks.log");
    let state = dir.path().join("group.state");
    let state_s = state.display().to_string();

    // Epoch 1: 50 writes, then a clean exit.
    let r = run(guest_args(
        &t,
        &log,
        1,
        &[
            "--instance",
            "a1",
            "--exit-after",
            "50",
            "--interval",
            "1ms",
        ],
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(numbers(&log, "start", 1), vec![1]);
    assert_eq!(numbers(&log, "ack", 1), (1..=50).collect::<Vec<_>>());
    assert_eq!(exit_reason(&log, 1).as_deref(), Some("exit-after"));
    assert!(log_lines(&log).iter().all(|l| l.1 == "00000000000000a1"));

    // Epoch 2 (random instance): runs until SIGUSR1 saves it.
    let g = Background::spawn(
        guest_args(
            &t,
            &log,
            2,
            &["--state-file", &state_s, "--interval", "2ms"],
        ),
        dir.path().join("epoch2.err"),
    );
    wait_for_acks(&g, &log, 2, 20).await;
    g.signal(libc::SIGUSR1);
    let err = g.stderr.clone();
    assert_eq!(
        g.wait().await,
        0,
        "{}",
        std::fs::read_to_string(err).unwrap_or_default()
    );
    assert_eq!(numbers(&log, "start", 2), vec![51]);
    let acks2 = numbers(&log, "ack", 2);
    let last2 = *acks2.last().expect("acks");
    assert_eq!(
        acks2,
        (51..=last2).collect::<Vec<_>>(),
        "one counter after another"
    );
    assert_eq!(exit_reason(&log, 2).as_deref(), Some("saved"));
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state file")).expect("json");
    assert_eq!(
        saved["counter"], last2,
        "the save holds the last acknowledged counter"
    );
    assert_eq!(saved["epoch"], 2);
    let inst2 = log_lines(&log)
        .into_iter()
        .find(|l| l.2 == 2)
        .map(|l| l.1)
        .expect("epoch 2 lines");
    assert_eq!(saved["instance"], inst2.as_str());

    // Epoch 3 restores: it continues above the saved counter and consumes the file.
    let r = run(guest_args(
        &t,
        &log,
        3,
        &[
            "--restore",
            "--state-file",
            &state_s,
            "--exit-after",
            "30",
            "--interval",
            "1ms",
        ],
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(numbers(&log, "start", 3), vec![last2 + 1]);
    assert_eq!(numbers(&log, "ack", 3).len(), 30);
    assert!(!state.exists(), "the state file is used once");

    // Epoch 4 restores a state whose counter is above anything on the disk (a save
    // the disk has not seen): it must start above the saved counter, not the disk's.
    std::fs::write(
        &state,
        r#"{"counter":5000,"instance":"00000000000000c3","epoch":3}"#,
    )
    .expect("write state");
    let r = run(guest_args(
        &t,
        &log,
        4,
        &[
            "--restore",
            "--state-file",
            &state_s,
            "--exit-after",
            "3",
            "--interval",
            "1ms",
        ],
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(numbers(&log, "ack", 4), vec![5001, 5002, 5003]);

    // Clean history: exit 0, and the JSON lists the four runs.
    let c = guest_check(&t, &log, true).await;
    assert_eq!(c.code, 0, "{} / {}", c.stdout, c.stderr);
    let j: Value = serde_json::from_str(c.stdout.trim()).expect("json");
    assert_eq!(j["ok"], true);
    assert_eq!(j["violations"], serde_json::json!([]));
    let runs = j["runs"].as_array().expect("runs");
    let summary: Vec<(u64, u64, u64, u64)> = runs
        .iter()
        .map(|r| {
            (
                r["epoch"].as_u64().unwrap(),
                r["first"].as_u64().unwrap(),
                r["last"].as_u64().unwrap(),
                r["acked"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, 1, 50, 50),
            (2, 51, last2, last2 - 50),
            (3, last2 + 1, last2 + 30, 30),
            (4, 5001, 5003, 3),
        ]
    );
    assert_eq!(runs[0]["instance"], "00000000000000a1");
    let human = guest_check(&t, &log, false).await;
    assert_eq!(human.code, 0);
    assert!(human.stdout.contains("OK: 4 runs"), "{}", human.stdout);

    // Forge a write of epoch 1 that "lands" now, with a counter above epoch 2's start:
    // a late write. Its block is in epoch 1's region, clear of epoch 1's acked records.
    let s = t.login_as("iqn.2026-11.org.holdfast:forger", None, 0).await;
    let forged = 1_000_000;
    let block = block_of(1, forged);
    assert!(!(1..=50).any(|c| block_of(1, c) == block));
    s.write16(0, block, forged_block(0xbad, 1, forged).into(), 512, true)
        .await
        .expect("forge");
    let c = guest_check(&t, &log, false).await;
    assert_eq!(c.code, 1, "{} / {}", c.stdout, c.stderr);
    assert!(
        c.stdout.contains(&format!(
            "VIOLATION late write: block {block} holds counter {forged}"
        )),
        "{}",
        c.stdout
    );
    let j: Value =
        serde_json::from_str(guest_check(&t, &log, true).await.stdout.trim()).expect("json");
    assert_eq!(j["ok"], false);
    let v = j["violations"].as_array().expect("violations");
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["kind"], "late_write");
    assert_eq!(v[0]["source"], "disk");
    assert_eq!(v[0]["counter"], forged);
    assert_eq!(v[0]["run"]["epoch"], 1);
    assert_eq!(v[0]["run"]["instance"], "0000000000000bad");
    assert_eq!(v[0]["newer"]["epoch"], 2, "the first run it postdates");
    assert_eq!(v[0]["newer_first"], 51);

    // Wipe the block of epoch 3's last acknowledged write: a lost write.
    let lost = last2 + 30;
    s.write16(0, block_of(3, lost), vec![0u8; 512].into(), 512, true)
        .await
        .expect("wipe");
    let c = guest_check(&t, &log, false).await;
    assert_eq!(c.code, 1);
    assert!(
        c.stdout
            .contains("VIOLATION lost write: epoch 3 (instance ")
            && c.stdout.contains(&format!(
                "acknowledged counter {lost}, block {} holds no record",
                block_of(3, lost)
            )),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("FAILED: 2 violations"), "{}", c.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_conflict_stops_the_guest() {
    let t = target_16mib().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("acks.log");
    let agent = t.login_as(AGENT, None, 0).await;
    let flags = RegisterFlags::default();
    agent
        .register_ignore(0, 0xa6e, &flags)
        .await
        .expect("register");
    agent
        .reserve(0, 0xa6e, PrType::WriteExclusiveRegistrantsOnly)
        .await
        .expect("reserve");

    // The guest's initiator is not registered: its first write conflicts.
    let r = run(guest_args(&t, &log, 1, &["--interval", "1ms"])).await;
    assert_eq!(r.code, 75, "{}", r.stderr);
    let lines = log_lines(&log);
    let kinds: Vec<&str> = lines.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(kinds, vec!["start", "conflict", "exit"], "{lines:?}");
    assert_eq!(numbers(&log, "conflict", 1), vec![1]);
    assert_eq!(exit_reason(&log, 1).as_deref(), Some("conflict"));

    // The agent registers the guest's name (every ISID) the way it does before a start:
    // the guest writes under the reservation...
    let registrar = t.login_as(REGISTRAR, None, 0).await;
    registrar
        .register(
            0,
            0,
            0x9e57,
            &RegisterFlags {
                spec_i_pt: vec![TransportId::iscsi_name(GUEST)],
                ..Default::default()
            },
        )
        .await
        .expect("register the guest");
    let g = Background::spawn(
        guest_args(&t, &log, 2, &["--interval", "2ms", "--io-timeout", "2s"]),
        dir.path().join("epoch2.err"),
    );
    wait_for_acks(&g, &log, 2, 10).await;
    // ...until it is fenced: PREEMPT AND ABORT of its key.
    agent
        .preempt_and_abort(0, 0xa6e, 0x9e57, PrType::WriteExclusiveRegistrantsOnly)
        .await
        .expect("preempt");
    let fenced_after = numbers(&log, "ack", 2).len();
    let err = g.stderr.clone();
    assert_eq!(
        g.wait().await,
        75,
        "{}",
        std::fs::read_to_string(err).unwrap_or_default()
    );
    let conflicts = numbers(&log, "conflict", 2);
    assert_eq!(conflicts.len(), 1);
    let acks = numbers(&log, "ack", 2);
    // At most the write in flight during the preempt completes after it.
    assert!(
        acks.len() <= fenced_after + 1,
        "{} > {}",
        acks.len(),
        fenced_after + 1
    );
    assert_eq!(
        conflicts[0],
        acks.last().expect("acks") + 1,
        "the next counter conflicted"
    );
    assert_eq!(exit_reason(&log, 2).as_deref(), Some("conflict"));

    // Reads are allowed under Write Exclusive: the checker sees a clean history.
    let c = guest_check(&t, &log, false).await;
    assert_eq!(c.code, 0, "{} / {}", c.stdout, c.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_rides_out_a_target_restart_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("acks.log");
    // A fixed port and an absolute data directory, so the restarted target is the same
    // disk at the same address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let data = dir.path().join("data");
    let text = format!(
        "data_dir = \"{}\"\n[[target]]\nname = \"{TARGET}\"\n\
         [[target.portal]]\nlisten = \"127.0.0.1:{port}\"\ntpgt = 1\n\
         [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"16MiB\"\n",
        data.display()
    );
    let mut t = start(&text).await;
    let g = Background::spawn(
        guest_args(&t, &log, 1, &["--interval", "2ms", "--io-timeout", "2s"]),
        dir.path().join("epoch1.err"),
    );
    wait_for_acks(&g, &log, 1, 20).await;
    t.shutdown().await;
    let before = numbers(&log, "ack", 1).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = start(&text).await;
    // It logs in again on its own and carries on.
    wait_for_acks(&g, &log, 1, before + 20).await;
    g.signal(libc::SIGTERM);
    let err = g.stderr.clone();
    assert_eq!(
        g.wait().await,
        0,
        "{}",
        std::fs::read_to_string(err).unwrap_or_default()
    );
    assert_eq!(exit_reason(&log, 1).as_deref(), Some("sigterm"));
    let acks = numbers(&log, "ack", 1);
    let last = *acks.last().expect("acks");
    assert_eq!(
        acks,
        (1..=last).collect::<Vec<_>>(),
        "no counter skipped or acknowledged twice across the restart"
    );

    // A crash (--fail-after) exits 1; the next run starts above it.
    let r = run(guest_args(
        &t,
        &log,
        2,
        &["--fail-after", "5", "--interval", "1ms"],
    ))
    .await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(exit_reason(&log, 2).as_deref(), Some("fail-after"));
    assert_eq!(
        numbers(&log, "ack", 2),
        (last + 1..=last + 5).collect::<Vec<_>>()
    );
    let c = guest_check(&t, &log, false).await;
    assert_eq!(c.code, 0, "{} / {}", c.stdout, c.stderr);
}
