//! APTPL survives SIGKILL: run `holdfast target` as a child process, drive a random
//! sequence of PR OUT commands (APTPL=1) from four initiators with fixed ISIDs, keep a
//! model updated only by commands that returned GOOD, SIGKILL the target (after a command
//! returned, or with one in flight), restart it and compare READ KEYS, READ RESERVATION
//! and READ FULL STATUS with the model. A command in flight at the kill may or may not
//! have taken effect, so either state is accepted for it.
//!
//! `PR_RESTART_ROUNDS` (default 20) and `PR_RESTART_SEED` tune a run;
//! `tools/pr-restart.sh` runs a long one.

use crate::common;

use common::pr::{self, sa, ty, Outcome, APTPL};
use common::{clear_unit_attention, init_tracing, TARGET};
use holdfast::initiator::{InitiatorConfig, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INITIATORS: usize = 4;
const LUN: u64 = 0;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn name(i: usize) -> String {
    format!("iqn.2026-11.org.holdfast:restart{i}")
}

fn isid(i: usize) -> [u8; 6] {
    [0x80, 0x10, 0, 0, 0, i as u8 + 1]
}

/// The expected PR state. Keys are unique per initiator (the high byte names it), so a
/// key identifies its registrant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    keys: [Option<u64>; INITIATORS],
    /// (creator / holder, type). For all-registrants types every registrant holds it.
    res: Option<(usize, u8)>,
}

fn all_registrants(t: u8) -> bool {
    matches!(t, ty::WE_AR | ty::EA_AR)
}

impl Model {
    fn holds(&self, i: usize) -> bool {
        match self.res {
            Some((_, t)) if all_registrants(t) => self.keys[i].is_some(),
            Some((h, _)) => h == i,
            None => false,
        }
    }

    /// Drop the reservation when its holder is gone (all-registrants: when nobody is left).
    fn settle(&mut self) {
        if let Some((h, t)) = self.res {
            let gone = if all_registrants(t) {
                self.keys.iter().all(Option::is_none)
            } else {
                self.keys[h].is_none()
            };
            if gone {
                self.res = None;
            }
        }
    }

    /// Whether SPC-4 lets `op` from initiator `i` succeed, and the state after it.
    fn apply(&self, i: usize, op: &Op) -> (bool, Model) {
        let mut m = self.clone();
        let registered_with = |k: u64| self.keys[i] == Some(k);
        let ok = match *op {
            Op::Register { old, new } => match self.keys[i] {
                None => {
                    old == 0 && new != 0 && {
                        m.keys[i] = Some(new);
                        true
                    }
                }
                Some(cur) => {
                    if old != cur {
                        false
                    } else {
                        m.keys[i] = (new != 0).then_some(new);
                        m.settle();
                        true
                    }
                }
            },
            Op::Reserve { key, rtype } => {
                registered_with(key)
                    && match self.res {
                        None => {
                            m.res = Some((i, rtype));
                            true
                        }
                        Some((_, t)) => self.holds(i) && t == rtype,
                    }
            }
            Op::Release { key, rtype } => {
                registered_with(key)
                    && match self.res {
                        Some((_, t)) if self.holds(i) => {
                            m.res = None;
                            t == rtype
                        }
                        _ => true,
                    }
            }
            Op::Clear { key } => {
                registered_with(key) && {
                    m = Model::default();
                    true
                }
            }
            Op::Preempt { key, victim, rtype } => {
                if !registered_with(key) {
                    false
                } else {
                    match self.res {
                        Some((_, t)) if all_registrants(t) && victim == 0 => {
                            for (j, k) in m.keys.iter_mut().enumerate() {
                                if j != i {
                                    *k = None;
                                }
                            }
                            m.res = Some((i, rtype));
                            true
                        }
                        Some((h, t)) if !all_registrants(t) && self.keys[h] == Some(victim) => {
                            for (j, k) in m.keys.iter_mut().enumerate() {
                                if j != i && *k == Some(victim) {
                                    *k = None;
                                }
                            }
                            m.res = Some((i, rtype));
                            true
                        }
                        _ => {
                            let hit = victim != 0 && self.keys.contains(&Some(victim));
                            for k in m.keys.iter_mut() {
                                if *k == Some(victim) {
                                    *k = None;
                                }
                            }
                            m.settle();
                            hit
                        }
                    }
                }
            }
        };
        (ok, if ok { m } else { self.clone() })
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register { old: u64, new: u64 },
    Reserve { key: u64, rtype: u8 },
    Release { key: u64, rtype: u8 },
    Clear { key: u64 },
    Preempt { key: u64, victim: u64, rtype: u8 },
}

impl Op {
    /// (service action, type, parameter list) with APTPL set.
    fn encode(&self) -> (u8, u8, Vec<u8>) {
        let list = |k, s| pr::basic_list(k, s, APTPL, &[]);
        match *self {
            Op::Register { old, new } => (sa::REGISTER, 0, list(old, new)),
            Op::Reserve { key, rtype } => (sa::RESERVE, rtype, list(key, 0)),
            Op::Release { key, rtype } => (sa::RELEASE, rtype, list(key, 0)),
            Op::Clear { key } => (sa::CLEAR, 0, list(key, 0)),
            Op::Preempt { key, victim, rtype } => (sa::PREEMPT, rtype, list(key, victim)),
        }
    }
}

fn new_key(rng: &mut StdRng, i: usize) -> u64 {
    ((i as u64 + 1) << 56) | rng.gen_range(1..=0xffu64)
}

/// A random op for a random initiator, mostly well-formed against the model (so it
/// usually changes something), sometimes with a wrong key or type.
fn random_op(rng: &mut StdRng, m: &Model) -> (usize, Op) {
    let i = rng.gen_range(0..INITIATORS);
    let mut key = m.keys[i].unwrap_or(0);
    if rng.gen_bool(0.1) {
        key = new_key(rng, i); // wrong key
    }
    let rtype = match m.res {
        Some((_, t)) if rng.gen_bool(0.7) => t,
        _ => ty::ALL[rng.gen_range(0..ty::ALL.len())],
    };
    let op = match rng.gen_range(0..100) {
        0..=34 => Op::Register {
            old: key,
            new: if m.keys[i].is_some() && rng.gen_bool(0.3) {
                0
            } else {
                new_key(rng, i)
            },
        },
        35..=59 => Op::Reserve { key, rtype },
        60..=72 => Op::Release { key, rtype },
        73..=77 => Op::Clear { key },
        _ => {
            let others: Vec<u64> = (0..INITIATORS)
                .filter(|&j| j != i)
                .filter_map(|j| m.keys[j])
                .collect();
            let victim = match m.res {
                Some((_, t)) if all_registrants(t) && rng.gen_bool(0.4) => 0,
                _ if others.is_empty() || rng.gen_bool(0.1) => new_key(rng, (i + 1) % INITIATORS),
                _ => others[rng.gen_range(0..others.len())],
            };
            Op::Preempt { key, victim, rtype }
        }
    };
    (i, op)
}

struct Target {
    child: Child,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_target(config: &Path, log: &Path) -> Target {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("target")
        .arg("--config")
        .arg(config)
        .env("HOLDFAST_LOG", "info")
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("spawn holdfast target");
    Target { child }
}

fn config(dir: &Path, addr: SocketAddr) -> PathBuf {
    let path = dir.join("target.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{addr}\"\n\
             [[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = \"1MiB\"\n"
        ),
    )
    .expect("write config");
    path
}

async fn login_when_up(addr: SocketAddr, i: usize, log: &Path) -> Session {
    let mut cfg = InitiatorConfig::new(name(i), TARGET, addr);
    cfg.isid = Some(isid(i));
    cfg.login_timeout = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = Session::login(cfg.clone()).await {
            clear_unit_attention(&s, LUN).await;
            return s;
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let errors: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.starts_with("Error"))
                .take(8)
                .collect();
            panic!("target did not come up; errors in its log: {errors:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The target's PR state, in the model's terms (panics on anything the model cannot
/// express: unknown keys, wrong TransportIDs, inconsistent reports).
async fn observe(s: &Session) -> Model {
    let mut m = Model::default();
    let (_, keys) = pr::read_keys(s, LUN).await;
    let (_, full) = pr::read_full_status(s, LUN).await;
    assert_eq!(
        keys.len(),
        full.len(),
        "READ KEYS and READ FULL STATUS agree"
    );
    for e in &full {
        let i = ((e.key >> 56) as usize)
            .checked_sub(1)
            .filter(|i| *i < INITIATORS)
            .unwrap_or_else(|| panic!("unexpected key {:#x}", e.key));
        assert_eq!(
            e.name,
            pr::port_name(&name(i), isid(i)),
            "TransportID of {:#x}",
            e.key
        );
        assert_eq!((e.format, e.rel_port, e.all_tg_pt), (1, 1, false));
        assert!(m.keys[i].is_none(), "two registrations for initiator {i}");
        assert!(keys.contains(&e.key));
        m.keys[i] = Some(e.key);
    }
    let (_, res) = pr::read_reservation(s, LUN).await;
    if let Some((key, t)) = res {
        let holders: Vec<usize> = full
            .iter()
            .filter(|e| e.holder)
            .map(|e| (e.key >> 56) as usize - 1)
            .collect();
        assert!(full.iter().filter(|e| e.holder).all(|e| e.rtype == t));
        if all_registrants(t) {
            assert_eq!(key, 0, "all-registrants reservations report key 0");
            assert_eq!(holders.len(), full.len(), "every registrant holds type {t}");
            // The model's creator is not observable for these types.
            m.res = Some((usize::MAX, t));
        } else {
            assert_eq!(holders.len(), 1, "one holder of type {t}");
            assert_eq!(m.keys[holders[0]], Some(key));
            m.res = Some((holders[0], t));
        }
    } else {
        assert!(full.iter().all(|e| !e.holder));
    }
    m
}

/// Compare ignoring what cannot be observed (the creator of an all-registrants
/// reservation).
fn same(observed: &Model, model: &Model) -> bool {
    let norm = |m: &Model| {
        let mut m = m.clone();
        if let Some((_, t)) = m.res {
            if all_registrants(t) {
                m.res = Some((usize::MAX, t));
            }
        }
        m
    };
    norm(observed) == norm(model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aptpl_state_survives_sigkill() {
    init_tracing();
    let rounds = env_u64("PR_RESTART_ROUNDS").unwrap_or(20);
    let seed = env_u64("PR_RESTART_SEED").unwrap_or_else(rand::random);
    eprintln!("pr-restart: rounds={rounds} seed={seed} (PR_RESTART_SEED={seed} repeats it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = config(dir.path(), addr);
    let log = dir.path().join("target.log");
    let mut model = Model::default();
    let (mut ops_total, mut in_flight_kills, mut changed_in_flight) = (0, 0, 0);
    let started = Instant::now();
    for round in 0..=rounds {
        let mut target = spawn_target(&cfg, &log);
        let mut sessions = Vec::new();
        for i in 0..INITIATORS {
            sessions.push(login_when_up(addr, i, &log).await);
        }
        let seen = observe(&sessions[0]).await;
        assert!(
            same(&seen, &model),
            "round {round} (seed {seed}): after restart the target has {seen:?}, expected {model:?}\nlog: {}",
            log.display()
        );
        model = seen_with_creator(seen, &model);
        if round == rounds {
            break;
        }
        for _ in 0..rng.gen_range(1..=12) {
            let (i, op) = random_op(&mut rng, &model);
            let (sa_, t, list) = op.encode();
            // A unit attention (other initiators' preempts and clears) means the command
            // did not run: retry it.
            let mut o = pr::prout(&sessions[i], LUN, sa_, t, list.clone()).await;
            for _ in 0..4 {
                if !matches!(o, Outcome::Check(0x06, _, _)) {
                    break;
                }
                o = pr::prout(&sessions[i], LUN, sa_, t, list.clone()).await;
            }
            let (expect_ok, next) = model.apply(i, &op);
            assert_eq!(
                o == Outcome::Good,
                expect_ok,
                "round {round} (seed {seed}): initiator {i} {op:?} on {model:?} ended {o:?}"
            );
            model = next;
            ops_total += 1;
        }
        if rng.gen_bool(0.5) {
            // Kill with one command in flight.
            let (i, op) = random_op(&mut rng, &model);
            let (sa_, t, list) = op.encode();
            let s = sessions[i].clone();
            // Reported unit attentions first, so the command in flight really runs.
            clear_unit_attention(&s, LUN).await;
            let c = holdfast::initiator::cdb::persistent_reserve_out(sa_, t, list.len() as u32);
            let flight =
                tokio::spawn(async move { s.command(LUN, &c, Some(list.into()), 0).await });
            let delay = Duration::from_micros(rng.gen_range(0..3000));
            tokio::time::sleep(delay).await;
            target.child.kill().expect("SIGKILL");
            let _ = target.child.wait();
            let (ok, after) = model.apply(i, &op);
            match flight.await.expect("in-flight task") {
                Ok(r) if pr::outcome(&r) == Outcome::Good => {
                    assert!(ok, "in-flight {op:?} returned GOOD against the model");
                    model = after;
                }
                Ok(_) => {}
                Err(_) => {
                    // No answer: either state may be on disk; decided after the restart.
                    let mut t2 = spawn_target(&cfg, &log);
                    let s0 = login_when_up(addr, 0, &log).await;
                    let seen = observe(&s0).await;
                    assert!(
                        same(&seen, &model) || same(&seen, &after),
                        "round {round} (seed {seed}): after an interrupted {op:?} the target has {seen:?}, expected {model:?} or {after:?}"
                    );
                    if same(&seen, &after) && after != model {
                        changed_in_flight += 1;
                        model = after;
                    }
                    drop(s0);
                    t2.child.kill().expect("SIGKILL");
                    let _ = t2.child.wait();
                }
            }
            in_flight_kills += 1;
        } else {
            target.child.kill().expect("SIGKILL");
            let _ = target.child.wait();
        }
        drop(sessions);
    }
    eprintln!(
        "pr-restart: {rounds} rounds, {ops_total} PR OUT commands, {in_flight_kills} kills with a command in flight ({changed_in_flight} of them took effect), {:?}",
        started.elapsed()
    );
}

/// After a restart the observed state replaces the model, keeping the model's creator of
/// an all-registrants reservation (not observable, and irrelevant to access).
fn seen_with_creator(seen: Model, model: &Model) -> Model {
    match (seen.res, model.res) {
        (Some((usize::MAX, t)), Some((c, _))) => Model {
            res: Some((c, t)),
            ..seen
        },
        _ => seen,
    }
}

/// A corrupt state file stops the target from starting, and the error names the file.
#[test]
fn corrupt_state_file_refuses_to_start() {
    for (what, bytes) in [
        ("garbage", b"{ this is not a PR state".to_vec()),
        ("empty", Vec::new()),
        (
            "checksum",
            br#"{"version":1,"crc32c":1,"state":{"generation":1,"aptpl":true,"registrations":[],"reservation":null}}"#.to_vec(),
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = config(dir.path(), ([127, 0, 0, 1], port).into());
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let pr_file = dir.path().join("data").join("lun0.img.holdfast-pr");
        std::fs::write(&pr_file, &bytes).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .arg("target")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what}: target started despite a corrupt {}", pr_file.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{what}: exit status {status}");
        assert!(
            err.contains("lun0.img.holdfast-pr"),
            "{what}: the error names the state file: {err}"
        );
        // The file is left as it was, for the operator to inspect.
        assert_eq!(std::fs::read(&pr_file).unwrap(), bytes);
    }
}
