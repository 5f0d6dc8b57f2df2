//! Crash durability: run the release `holdfast target` as a child process, drive a write
//! load through `Session`, SIGKILL the target at a random moment, restart it and check
//! that every acknowledged block holds its acknowledged stamp (or a later stamp of the
//! same block from a write that may have been in flight).
//!
//! A write counts as acknowledged only once a FUA write returned GOOD, or once the
//! SYNCHRONIZE CACHE issued after it returned GOOD.
//!
//! Ignored by default; `tools/kill-durability.sh` runs it with ROUNDS and SEED.

use crate::common;

use bytes::{Bytes, BytesMut};
use common::{clear_unit_attention, init_tracing, BLOCK, INITIATOR, TARGET};
use holdfast::initiator::{InitiatorConfig, Session};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LUN_BYTES: u64 = 16 << 20;
const LUN_BLOCKS: u64 = LUN_BYTES / BLOCK as u64;
const WRITERS: u64 = 4;
const MAGIC: &[u8; 8] = b"HFSTAMP1";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One block's stamp: who wrote it, with which sequence number, for which LBA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    writer: u32,
    seq: u64,
    lba: u64,
}

fn fill_byte(seq: u64, lba: u64, i: usize) -> u8 {
    ((seq.wrapping_mul(31) ^ lba) as u8).wrapping_add(i as u8)
}

fn stamp_block(out: &mut BytesMut, s: Stamp) {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&s.writer.to_be_bytes());
    out.extend_from_slice(&s.seq.to_be_bytes());
    out.extend_from_slice(&s.lba.to_be_bytes());
    for i in out.len() - start..BLOCK as usize {
        out.extend_from_slice(&[fill_byte(s.seq, s.lba, i)]);
    }
}

/// Parse a block; None when it holds no (or a torn) stamp.
fn read_stamp(b: &[u8]) -> Option<Stamp> {
    if b.get(..8)? != MAGIC {
        return None;
    }
    let writer = u32::from_be_bytes(b[8..12].try_into().ok()?);
    let seq = u64::from_be_bytes(b[12..20].try_into().ok()?);
    let lba = u64::from_be_bytes(b[20..28].try_into().ok()?);
    let whole = b
        .iter()
        .enumerate()
        .skip(28)
        .all(|(i, v)| *v == fill_byte(seq, lba, i));
    whole.then_some(Stamp { writer, seq, lba })
}

/// What one writer knows across rounds.
#[derive(Default, Clone)]
struct WriterState {
    next_seq: u64,
    /// Highest acknowledged seq per LBA.
    acked: HashMap<u64, u64>,
    /// Highest seq ever sent per LBA (acknowledged or not).
    issued: HashMap<u64, u64>,
    acked_writes: u64,
}

async fn writer(
    w: u64,
    s: Session,
    mut st: WriterState,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) -> WriterState {
    let span = LUN_BLOCKS / WRITERS;
    let base = w * span;
    while !stop.load(Ordering::Relaxed) {
        let fua = rng.gen_bool(0.5);
        let group = if fua { 1 } else { rng.gen_range(1..=4) };
        let mut sent = Vec::new();
        let mut ok = true;
        for _ in 0..group {
            let n = rng.gen_range(1..=8u64);
            let lba = base + rng.gen_range(0..span - n);
            st.next_seq += 1;
            let seq = st.next_seq;
            let mut d = BytesMut::with_capacity((n * BLOCK as u64) as usize);
            for i in 0..n {
                stamp_block(
                    &mut d,
                    Stamp {
                        writer: w as u32,
                        seq,
                        lba: lba + i,
                    },
                );
                st.issued.insert(lba + i, seq);
            }
            if s.write16(0, lba, d.freeze(), BLOCK, fua).await.is_err() {
                ok = false;
                break;
            }
            sent.push((lba, n, seq));
        }
        if ok && !fua {
            ok = s.synchronize_cache(0).await.is_ok();
        }
        if !ok {
            // The target is gone (or going): nothing of this group counts as acknowledged.
            return st;
        }
        for (lba, n, seq) in sent {
            for i in 0..n {
                let e = st.acked.entry(lba + i).or_insert(0);
                *e = (*e).max(seq);
            }
            st.acked_writes += 1;
        }
    }
    st
}

struct Target {
    child: Child,
}

impl Drop for Target {
    fn drop(&mut self) {
        // Never leave a target running behind a failed assertion.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_target(bin: &Path, config: &Path, log: &Path) -> Target {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(bin)
        .arg("target")
        .arg("--config")
        .arg(config)
        .env(
            "HOLDFAST_LOG",
            std::env::var("TARGET_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn holdfast target");
    Target { child }
}

async fn login_when_up(addr: SocketAddr) -> Session {
    let cfg = InitiatorConfig::new(INITIATOR, TARGET, addr);
    for _ in 0..200 {
        if let Ok(s) = Session::login(cfg.clone()).await {
            clear_unit_attention(&s, 0).await;
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("target did not come up on {addr}");
}

async fn verify(s: &Session, states: &[WriterState], round: u64) -> u64 {
    let chunk_blocks = 2048u32;
    let mut checked = 0;
    let mut lba = 0u64;
    while lba < LUN_BLOCKS {
        let n = chunk_blocks.min((LUN_BLOCKS - lba) as u32);
        let data = s.read16(0, lba, n, BLOCK).await.expect("read back");
        for (i, b) in data.chunks_exact(BLOCK as usize).enumerate() {
            let l = lba + i as u64;
            let w = l / (LUN_BLOCKS / WRITERS);
            let Some(st) = states.get(w as usize) else {
                continue;
            };
            let Some(&acked) = st.acked.get(&l) else {
                continue;
            };
            let issued = st.issued.get(&l).copied().unwrap_or(acked);
            match read_stamp(b) {
                Some(stamp) => {
                    assert_eq!(stamp.lba, l, "round {round}: block {l} holds LBA {}'s data", stamp.lba);
                    assert_eq!(stamp.writer as u64, w, "round {round}: block {l} written by a foreign writer");
                    assert!(
                        stamp.seq >= acked && stamp.seq <= issued,
                        "round {round}: block {l} holds seq {} but seq {acked} was acknowledged (highest issued {issued})",
                        stamp.seq
                    );
                }
                None => assert!(
                    issued > acked,
                    "round {round}: acknowledged block {l} (seq {acked}) lost or torn with no newer write in flight"
                ),
            }
            checked += 1;
        }
        lba += u64::from(n);
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawns the release binary; run tools/kill-durability.sh"]
async fn kill_durability() {
    init_tracing();
    let rounds = env_u64("ROUNDS", 5);
    let seed = env_u64("SEED", 1);
    let bin = std::env::var("HOLDFAST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_holdfast").into());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("target.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{addr}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = {LUN_BYTES}\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("target.log");
    eprintln!(
        "kill-durability: rounds={rounds} seed={seed} bin={} dir={}",
        bin.display(),
        dir.path().display()
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut states = vec![WriterState::default(); WRITERS as usize];
    for round in 0..rounds {
        let mut target = spawn_target(&bin, &config, &log);
        let s = login_when_up(addr).await;
        let checked = verify(&s, &states, round).await;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(w, st)| {
                let wrng = StdRng::seed_from_u64(
                    seed ^ (round << 32) ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9),
                );
                tokio::spawn(writer(w as u64, s.clone(), st.clone(), wrng, stop.clone()))
            })
            .collect();
        let delay = Duration::from_millis(rng.gen_range(50..800));
        tokio::time::sleep(delay).await;
        // SIGKILL: no shutdown path, no flush.
        target.child.kill().expect("kill target");
        let _ = target.child.wait();
        stop.store(true, Ordering::Relaxed);
        for (w, t) in tasks.into_iter().enumerate() {
            states[w] = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("writer ends after the kill")
                .unwrap();
        }
        drop(s);
        let acked: u64 = states.iter().map(|s| s.acked_writes).sum();
        eprintln!("round {round}: verified {checked} blocks; killed after {delay:?}; {acked} writes acknowledged so far");
    }
    let mut target = spawn_target(&bin, &config, &log);
    let s = login_when_up(addr).await;
    let checked = verify(&s, &states, rounds).await;
    eprintln!("final: verified {checked} acknowledged blocks");
    s.logout().await.ok();
    target.child.kill().ok();
    let _ = target.child.wait();
    assert!(
        states.iter().any(|s| s.acked_writes > 0),
        "no write was ever acknowledged"
    );
}

// --- mixed load: writes on LUN 0, APTPL persistent reservations on LUN 1 ---------------

const PR_NODES: usize = 3;

/// What one PR node knows about its registration on LUN 1.
#[derive(Debug, Clone, Default)]
struct PrNode {
    /// Key registered as far as acknowledged PR OUTs tell.
    key: Option<u64>,
    /// A PR OUT in flight when the target died: its outcome (new key or none) is unknown.
    pending: Option<Option<u64>>,
    next: u64,
    acked: u64,
}

fn pr_config(i: usize, addr: SocketAddr) -> InitiatorConfig {
    let mut c = InitiatorConfig::new(format!("iqn.2026-11.org.holdfast:prnode{i}"), TARGET, addr);
    // A fixed ISID: the same I_T nexus after every restart, so APTPL registrations apply.
    c.isid = Some([0x80, 0, 0, 0, 1, i as u8]);
    c
}

fn prout_params(key: u64, sa_key: u64) -> Bytes {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = 0x01; // APTPL
    Bytes::from(p)
}

async fn pr_load(
    sessions: Vec<Session>,
    mut nodes: Vec<PrNode>,
    mut rng: StdRng,
    stop: Arc<AtomicBool>,
) -> Vec<PrNode> {
    use holdfast::initiator::cdb;
    while !stop.load(Ordering::Relaxed) {
        let i = rng.gen_range(0..nodes.len());
        let n = &mut nodes[i];
        let old = n.key.unwrap_or(0);
        let roll = rng.gen_range(0..10);
        // (service action, type, params, resulting key if GOOD; None = unchanged)
        let (sa, ty, params, result): (u8, u8, Bytes, Option<Option<u64>>) =
            if n.key.is_none() || roll < 4 {
                n.next += 1;
                let k = ((i as u64 + 1) << 32) | n.next;
                (0, 0, prout_params(old, k), Some(Some(k)))
            } else if roll < 6 {
                (0, 0, prout_params(old, 0), Some(None))
            } else if roll < 8 {
                (1, 5, prout_params(old, 0), None) // RESERVE, Write Exclusive – Registrants Only
            } else {
                (2, 5, prout_params(old, 0), None) // RELEASE
            };
        n.pending = result;
        let len = params.len() as u32;
        let r = sessions[i]
            .command(
                1,
                &cdb::persistent_reserve_out(sa, ty, len),
                Some(params),
                0,
            )
            .await;
        match r {
            Ok(res) => {
                if res.status == 0 {
                    if let Some(k) = result {
                        n.key = k;
                    }
                    n.acked += 1;
                }
                // Any answer is definitive: not GOOD means not applied.
                n.pending = None;
            }
            // The target is gone: the outcome of this one is unknown.
            Err(_) => return nodes,
        }
    }
    nodes
}

/// READ KEYS on LUN 1 must show exactly the acknowledged registrations (a PR OUT that was
/// in flight at the kill may have landed or not); resolves the uncertainty.
async fn verify_pr(s: &Session, nodes: &mut [PrNode], round: u64) -> usize {
    use holdfast::initiator::cdb;
    let r = s
        .command(1, &cdb::persistent_reserve_in(0, 4096), None, 4096)
        .await
        .expect("READ KEYS")
        .check()
        .expect("READ KEYS status");
    let d = r.data;
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let keys: Vec<u64> = d[8..8 + len]
        .chunks_exact(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        let mine: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| k >> 32 == i as u64 + 1)
            .collect();
        assert!(
            mine.len() <= 1,
            "round {round}: node {i} holds several keys {mine:x?}"
        );
        let found = mine.first().copied();
        let ok = found == n.key || n.pending.is_some_and(|p| p == found);
        assert!(
            ok,
            "round {round}: node {i} registration lost: READ KEYS shows {found:x?}, acknowledged {:x?}, in flight {:x?}",
            n.key, n.pending
        );
        n.key = found;
        n.pending = None;
    }
    assert!(
        keys.iter()
            .all(|k| (1..=PR_NODES as u64).contains(&(k >> 32))),
        "round {round}: unknown keys {keys:x?}"
    );
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "spawns the release binary; run tools/kill-durability.sh"]
async fn kill_durability_mixed_pr() {
    init_tracing();
    let rounds = env_u64("ROUNDS", 5);
    let seed = env_u64("SEED", 1);
    let bin = std::env::var("HOLDFAST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_holdfast").into());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("target.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[[target]]\nname = \"{TARGET}\"\n[[target.portal]]\nlisten = \"{addr}\"\n[[target.lun]]\nid = 0\npath = \"lun0.img\"\nsize = {LUN_BYTES}\n[[target.lun]]\nid = 1\npath = \"lun1.img\"\nsize = \"1MiB\"\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("target.log");
    eprintln!(
        "kill-durability (mixed PR): rounds={rounds} seed={seed} dir={}",
        dir.path().display()
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5052);
    let mut states = vec![WriterState::default(); WRITERS as usize];
    let mut nodes = vec![PrNode::default(); PR_NODES];
    for round in 0..=rounds {
        let mut target = spawn_target(&bin, &config, &log);
        let s = login_when_up(addr).await;
        let checked = verify(&s, &states, round).await;
        let mut prs = Vec::new();
        for i in 0..PR_NODES {
            let p = Session::login(pr_config(i, addr))
                .await
                .expect("PR node login");
            clear_unit_attention(&p, 1).await;
            prs.push(p);
        }
        let keys = verify_pr(&prs[0], &mut nodes, round).await;
        if round == rounds {
            eprintln!("final: verified {checked} blocks and {keys} APTPL registrations");
            target.child.kill().ok();
            let _ = target.child.wait();
            break;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(w, st)| {
                let wrng = StdRng::seed_from_u64(
                    seed ^ (round << 32) ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9),
                );
                tokio::spawn(writer(w as u64, s.clone(), st.clone(), wrng, stop.clone()))
            })
            .collect();
        let pr_task = tokio::spawn(pr_load(
            prs,
            nodes.clone(),
            StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x51_7cc1)),
            stop.clone(),
        ));
        let delay = Duration::from_millis(rng.gen_range(50..800));
        tokio::time::sleep(delay).await;
        target.child.kill().expect("kill target");
        let _ = target.child.wait();
        stop.store(true, Ordering::Relaxed);
        for (w, t) in tasks.into_iter().enumerate() {
            states[w] = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("writer ends after the kill")
                .unwrap();
        }
        nodes = tokio::time::timeout(Duration::from_secs(30), pr_task)
            .await
            .expect("PR load ends after the kill")
            .unwrap();
        let acked: u64 = states.iter().map(|s| s.acked_writes).sum();
        let pr_acked: u64 = nodes.iter().map(|n| n.acked).sum();
        eprintln!(
            "round {round}: verified {checked} blocks, {keys} registrations; killed after {delay:?}; {acked} writes and {pr_acked} PR OUTs acknowledged so far"
        );
    }
    assert!(states.iter().any(|s| s.acked_writes > 0));
    assert!(
        nodes.iter().any(|n| n.acked > 0),
        "no PR OUT was ever acknowledged"
    );
}
