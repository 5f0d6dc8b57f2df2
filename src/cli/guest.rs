//! `holdfast guest`: a test guest in the manner of sanlock's devcount, and its checker.
//!
//! `guest run` stands in for a VM: it logs in with its own iSCSI session and writes an
//! increasing counter to its disk, one FUA write at a time, logging every acknowledged
//! write to an ack log. `guest check` reads the disk and the ack logs afterwards and
//! proves (a) no acknowledged write was lost, (b) the group never ran twice at once and
//! (c) no write of an older run landed after a newer run started.
//!
//! Disk layout: block 0 is unused; 16 regions of S = min(1024, (blocks - 1) / 16) blocks
//! follow from block 1. A run of epoch E writes only into region E % 16, so a late write
//! of an older run cannot hide itself by overwriting the newer run's records (unless the
//! two epochs are 16 apart). The record for counter c goes to block
//! 1 + (E % 16) * S + (c % S). Each record fills one block:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `HFGUEST1` |
//! | 8..16 | instance (u64, little-endian): random per process |
//! | 16..24 | epoch (u64 LE) |
//! | 24..32 | counter (u64 LE) |
//! | 32..36 | CRC32C of bytes 0..32 (u32 LE) |
//! | 36.. | zeros |
//!
//! A new run scans all regions and starts at the highest counter found + 1, so counters
//! grow across runs and epochs: a record of an older epoch with a counter at or above a
//! newer run's first counter was written after that run started.
//!
//! Ack log lines (appended with one write each; several guests may share a file):
//! `start INSTANCE EPOCH FIRST_COUNTER`, `ack INSTANCE EPOCH COUNTER`,
//! `conflict INSTANCE EPOCH COUNTER`, `exit INSTANCE EPOCH REASON`. INSTANCE is 16 hex
//! digits, the numbers decimal.

use super::chap_args::ChapArgs;
use super::SessionError;
use crate::backoff::Backoff;
use crate::initiator::url::parse_portal;
use crate::initiator::{
    connect, past_unit_attention, ConnectError, ConnectOptions, InitiatorConfig, InitiatorError,
    IscsiUrl, Session,
};
use crate::log_limit::{FailureLog, Repeated, Verdict};
use crate::scsi::sense::key as sense_key;
use crate::scsi::status;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// First bytes of every record.
pub const MAGIC: [u8; 8] = *b"HFGUEST1";
/// Bytes of a record before its zero padding.
pub const RECORD_LEN: usize = 36;
/// Number of regions (one per epoch % 16).
pub const REGIONS: u64 = 16;
/// Largest region, in blocks.
pub const MAX_SLOTS: u64 = 1024;
/// Largest READ when scanning the regions.
pub const MAX_READ_BYTES: u64 = 1 << 20;
/// `guest run` exit status on RESERVATION CONFLICT (EX_TEMPFAIL): fenced.
pub const EXIT_CONFLICT: i32 = 75;
/// Exit status for failures (a crash, `--fail-after`, a target gone for good).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for a bad command line; also `guest check`'s status for I/O errors.
pub const EXIT_USAGE: i32 = 2;
/// The checker's initiator name.
pub const CHECKER_INITIATOR: &str = "iqn.2026-11.org.holdfast:checker";
/// Re-login pace and patience after a lost connection.
const RELOGIN_EVERY: Duration = Duration::from_millis(100);
/// The longest wait between re-login attempts (they back off from RELOGIN_EVERY).
const RELOGIN_CAP: Duration = Duration::from_secs(1);
const RELOGIN_FOR: Duration = Duration::from_secs(30);
/// Each login attempt's own limit (a hung target must not eat the whole 30 s).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Unit attentions swallowed per command (each one is reported once, then cleared).
const UA_RETRIES: u32 = 16;
/// The checker's limit for the whole scan.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Layout and records

/// Where records live on a disk of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub block_size: u32,
    /// S: blocks per region.
    pub slots: u64,
}

impl Layout {
    /// The layout of a disk of `num_blocks` blocks of `block_size` bytes.
    pub fn new(num_blocks: u64, block_size: u32) -> Result<Layout, GuestError> {
        if (block_size as usize) < RECORD_LEN || u64::from(block_size) > MAX_READ_BYTES {
            return Err(GuestError::Layout(format!(
                "block size {block_size} is not usable (records are {RECORD_LEN} bytes)"
            )));
        }
        let slots = (num_blocks.saturating_sub(1) / REGIONS).min(MAX_SLOTS);
        if slots == 0 {
            return Err(GuestError::Layout(format!(
                "a disk of {num_blocks} blocks is too small (at least {} needed)",
                1 + REGIONS
            )));
        }
        Ok(Layout { block_size, slots })
    }

    pub fn region(epoch: u64) -> u64 {
        epoch % REGIONS
    }

    /// The block of the record for `counter` written by a run of `epoch`.
    pub fn block(&self, epoch: u64, counter: u64) -> u64 {
        1 + Self::region(epoch) * self.slots + counter % self.slots
    }

    /// Blocks covered by the regions (from block 1).
    pub fn blocks(&self) -> u64 {
        REGIONS * self.slots
    }

    /// The READs that cover every region: (LBA, blocks), each at most 1 MiB.
    pub fn reads(&self) -> Vec<(u64, u32)> {
        let per = (MAX_READ_BYTES / u64::from(self.block_size)).max(1);
        let end = 1 + self.blocks();
        let mut out = Vec::new();
        let mut lba = 1;
        while lba < end {
            let n = per.min(end - lba);
            // n ≤ 1 MiB / block size, so it fits.
            out.push((lba, u32::try_from(n).unwrap_or(u32::MAX)));
            lba += n;
        }
        out
    }
}

/// One counter record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub instance: u64,
    pub epoch: u64,
    pub counter: u64,
}

impl Record {
    /// The whole block holding this record.
    pub fn encode(&self, block_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; block_size.max(RECORD_LEN)];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.instance.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.counter.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A block's record; None for anything else (never written, torn, foreign, corrupt).
    pub fn decode(block: &[u8]) -> Option<Record> {
        let head = block.get(..RECORD_LEN)?;
        if head[..8] != MAGIC {
            return None;
        }
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&head[32..36]);
        if u32::from_le_bytes(crc) != crc32c::crc32c(&head[..32]) {
            return None;
        }
        // The padding is part of the format: garbage there means the block is not ours.
        if block[RECORD_LEN..].iter().any(|&b| b != 0) {
            return None;
        }
        Some(Record {
            instance: u64_at(8),
            epoch: u64_at(16),
            counter: u64_at(24),
        })
    }
}

/// The records found in the regions, by block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskContents {
    pub layout: Layout,
    pub records: BTreeMap<u64, Record>,
}

impl DiskContents {
    pub fn new(layout: Layout) -> DiskContents {
        DiskContents {
            layout,
            records: BTreeMap::new(),
        }
    }

    /// Decode the blocks of one READ starting at `lba`.
    pub fn add_blocks(&mut self, lba: u64, data: &[u8]) {
        let bs = self.layout.block_size as usize;
        for (i, block) in data.chunks_exact(bs).enumerate() {
            if let Some(r) = Record::decode(block) {
                self.records.insert(lba + i as u64, r);
            }
        }
    }

    /// Put one record at its block (tests, simulations).
    pub fn put(&mut self, record: Record) {
        let block = self.layout.block(record.epoch, record.counter);
        self.records.insert(block, record);
    }

    pub fn max_counter(&self) -> Option<u64> {
        self.records.values().map(|r| r.counter).max()
    }
}

/// The first counter of a new run: above everything on the disk and, when restoring,
/// above the saved counter.
pub fn first_counter(disk_max: Option<u64>, saved: Option<u64>) -> u64 {
    disk_max.max(saved).map_or(1, |m| m.saturating_add(1))
}

// ---------------------------------------------------------------------------------------
// Ack log

/// An instance id, shown as 16 hex digits (JSON numbers lose precision above 2^53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instance(pub u64);

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Instance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Instance {
    type Err = String;
    fn from_str(s: &str) -> Result<Instance, String> {
        let h = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if h.is_empty() || h.len() > 16 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not an instance id (up to 16 hex digits)"));
        }
        u64::from_str_radix(h, 16)
            .map(Instance)
            .map_err(|e| format!("{s:?}: {e}"))
    }
}

/// One line of an ack log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckEvent {
    Start {
        instance: u64,
        epoch: u64,
        first: u64,
    },
    Ack {
        instance: u64,
        epoch: u64,
        counter: u64,
    },
    Conflict {
        instance: u64,
        epoch: u64,
        counter: u64,
    },
    Exit {
        instance: u64,
        epoch: u64,
        reason: String,
    },
}

impl fmt::Display for AckEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckEvent::Start {
                instance,
                epoch,
                first,
            } => write!(f, "start {} {epoch} {first}", Instance(*instance)),
            AckEvent::Ack {
                instance,
                epoch,
                counter,
            } => write!(f, "ack {} {epoch} {counter}", Instance(*instance)),
            AckEvent::Conflict {
                instance,
                epoch,
                counter,
            } => write!(f, "conflict {} {epoch} {counter}", Instance(*instance)),
            AckEvent::Exit {
                instance,
                epoch,
                reason,
            } => write!(f, "exit {} {epoch} {reason}", Instance(*instance)),
        }
    }
}

impl AckEvent {
    /// Parse one line; None when it is not a well-formed event.
    pub fn parse(line: &str) -> Option<AckEvent> {
        let mut it = line.split_whitespace();
        let kind = it.next()?;
        let instance = it.next()?.parse::<Instance>().ok()?.0;
        let epoch = it.next()?.parse::<u64>().ok()?;
        if kind == "exit" {
            let reason = it.collect::<Vec<_>>().join(" ");
            return Some(AckEvent::Exit {
                instance,
                epoch,
                reason,
            });
        }
        let n = it.next()?.parse::<u64>().ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(match kind {
            "start" => AckEvent::Start {
                instance,
                epoch,
                first: n,
            },
            "ack" => AckEvent::Ack {
                instance,
                epoch,
                counter: n,
            },
            "conflict" => AckEvent::Conflict {
                instance,
                epoch,
                counter: n,
            },
            _ => return None,
        })
    }

    pub fn run(&self) -> RunId {
        let (instance, epoch) = match self {
            AckEvent::Start {
                instance, epoch, ..
            }
            | AckEvent::Ack {
                instance, epoch, ..
            }
            | AckEvent::Conflict {
                instance, epoch, ..
            }
            | AckEvent::Exit {
                instance, epoch, ..
            } => (*instance, *epoch),
        };
        RunId {
            epoch,
            instance: Instance(instance),
        }
    }
}

/// Parse an ack log: the events, and the lines that are not events (a torn last line
/// after a crash, say), with their line numbers.
pub fn parse_ack_log(text: &str) -> (Vec<AckEvent>, Vec<(usize, String)>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match AckEvent::parse(line) {
            Some(e) => events.push(e),
            None => bad.push((i + 1, line.to_string())),
        }
    }
    (events, bad)
}

// ---------------------------------------------------------------------------------------
// The check

/// A run: one guest process (instance) of one epoch. Ordered by epoch first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RunId {
    pub epoch: u64,
    pub instance: Instance,
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} (instance {})", self.epoch, self.instance)
    }
}

/// What the ack logs say about one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    pub instance: Instance,
    pub epoch: u64,
    /// From its `start` line.
    pub first: Option<u64>,
    /// Highest acknowledged counter.
    pub last: Option<u64>,
    pub acked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
}

/// Where a late write was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A record on the disk.
    Disk,
    /// An acknowledgement in an ack log.
    AckLog,
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// An acknowledged write is not on the disk, and nothing that may legitimately
    /// overwrite it is there instead.
    LostWrite {
        run: RunId,
        counter: u64,
        block: u64,
        /// What the block holds instead (None: no record).
        #[serde(skip_serializing_if = "Option::is_none")]
        found: Option<FoundRecord>,
    },
    /// Two runs acknowledged the same counter: both ran at once. One entry per pair of
    /// runs; `counter` is the lowest shared one.
    DuplicateCounter {
        runs: [RunId; 2],
        counter: u64,
        count: u64,
    },
    /// In counter order, an older epoch's acknowledgement follows a newer epoch's.
    EpochRegression {
        newer: RunId,
        newer_counter: u64,
        older: RunId,
        older_counter: u64,
        count: u64,
    },
    /// In counter order, a run's acknowledgements are split by another run's.
    InterleavedRuns {
        run: RunId,
        /// The run acknowledged in between.
        other: RunId,
        /// `run`'s first acknowledgement after `other`'s.
        counter: u64,
        count: u64,
    },
    /// A write of an older epoch with a counter at or above a newer run's first counter:
    /// it landed (or was acknowledged) after the newer run started.
    LateWrite {
        source: Source,
        run: RunId,
        counter: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        block: Option<u64>,
        newer: RunId,
        newer_first: u64,
    },
}

/// A record as a violation reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FoundRecord {
    pub instance: Instance,
    pub epoch: u64,
    pub counter: u64,
}

impl From<Record> for FoundRecord {
    fn from(r: Record) -> FoundRecord {
        FoundRecord {
            instance: Instance(r.instance),
            epoch: r.epoch,
            counter: r.counter,
        }
    }
}

impl Violation {
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::LostWrite { .. } => "lost write",
            Violation::DuplicateCounter { .. } => "duplicate counter",
            Violation::EpochRegression { .. } => "epoch regression",
            Violation::InterleavedRuns { .. } => "interleaved runs",
            Violation::LateWrite { .. } => "late write",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind())?;
        match self {
            Violation::LostWrite {
                run,
                counter,
                block,
                found,
            } => {
                write!(
                    f,
                    "{run} acknowledged counter {counter}, block {block} holds "
                )?;
                match found {
                    Some(r) => write!(
                        f,
                        "counter {} of epoch {} (instance {})",
                        r.counter, r.epoch, r.instance
                    ),
                    None => write!(f, "no record"),
                }
            }
            Violation::DuplicateCounter {
                runs,
                counter,
                count,
            } => write!(
                f,
                "{} and {} both acknowledged counter {counter} ({count} counters in common)",
                runs[0], runs[1]
            ),
            Violation::EpochRegression {
                newer,
                newer_counter,
                older,
                older_counter,
                count,
            } => write!(
                f,
                "{older} acknowledged counter {older_counter} after {newer} acknowledged \
                 {newer_counter} ({count} times)"
            ),
            Violation::InterleavedRuns {
                run,
                other,
                counter,
                count,
            } => write!(
                f,
                "{run} acknowledged counter {counter} after {other} had taken over \
                 ({count} times)"
            ),
            Violation::LateWrite {
                source,
                run,
                counter,
                block,
                newer,
                newer_first,
            } => {
                match source {
                    Source::Disk => write!(
                        f,
                        "block {} holds counter {counter} of {run}",
                        block.unwrap_or(0)
                    )?,
                    Source::AckLog => write!(f, "{run} acknowledged counter {counter}")?,
                }
                write!(f, ", but {newer} had started at counter {newer_first}")
            }
        }
    }
}

/// The checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    /// By epoch, then instance.
    pub runs: Vec<RunSummary>,
    pub violations: Vec<Violation>,
    /// Valid records found on the disk.
    pub records: u64,
    /// Lines of the ack logs that were not events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.runs {
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            write!(
                f,
                "run epoch {} instance {}: first {} last {} acked {}",
                r.epoch,
                r.instance,
                opt(r.first),
                opt(r.last),
                r.acked
            )?;
            if let Some(c) = r.conflict {
                write!(f, ", conflict at {c}")?;
            }
            if let Some(e) = &r.exit {
                write!(f, ", exit {e}")?;
            }
            writeln!(f)?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        // A double run can yield thousands; the JSON has them all.
        const SHOWN: usize = 50;
        for v in self.violations.iter().take(SHOWN) {
            writeln!(f, "VIOLATION {v}")?;
        }
        if self.violations.len() > SHOWN {
            writeln!(
                f,
                "... and {} more violations (--json lists all)",
                self.violations.len() - SHOWN
            )?;
        }
        if self.ok {
            writeln!(
                f,
                "OK: {} runs, {} acknowledged writes, {} records on disk; nothing lost, no \
                 double run, no late write",
                self.runs.len(),
                self.runs.iter().map(|r| r.acked).sum::<u64>(),
                self.records
            )
        } else {
            writeln!(f, "FAILED: {} violations", self.violations.len())
        }
    }
}

#[derive(Default)]
struct RunAcc {
    first: Option<u64>,
    acks: BTreeSet<u64>,
    conflict: Option<u64>,
    exit: Option<String>,
}

/// Check a disk's records against the guests' ack logs. Pure: the same inputs give the
/// same report.
pub fn check(disk: &DiskContents, events: &[AckEvent]) -> CheckReport {
    let mut runs: BTreeMap<RunId, RunAcc> = BTreeMap::new();
    for e in events {
        let acc = runs.entry(e.run()).or_default();
        match e {
            AckEvent::Start { first, .. } => {
                acc.first = Some(acc.first.map_or(*first, |f| f.min(*first)));
            }
            // A set: the same log given twice is not a double run.
            AckEvent::Ack { counter, .. } => {
                acc.acks.insert(*counter);
            }
            AckEvent::Conflict { counter, .. } => acc.conflict = Some(*counter),
            AckEvent::Exit { reason, .. } => acc.exit = Some(reason.clone()),
        }
    }
    let mut violations = Vec::new();
    lost_writes(disk, &runs, &mut violations);
    double_runs(&runs, &mut violations);
    late_writes(disk, &runs, &mut violations);
    let summaries = runs
        .iter()
        .map(|(id, a)| RunSummary {
            instance: id.instance,
            epoch: id.epoch,
            first: a.first,
            last: a.acks.last().copied(),
            acked: a.acks.len() as u64,
            conflict: a.conflict,
            exit: a.exit.clone(),
        })
        .collect();
    CheckReport {
        ok: violations.is_empty(),
        runs: summaries,
        violations,
        records: disk.records.len() as u64,
        warnings: Vec::new(),
    }
}

/// (a) Every acknowledged write whose slot no later acknowledged write of the same run
/// reused must be on the disk, or be overwritten by a record that may legitimately
/// replace it: a higher counter in the same slot from a run of the same or a later epoch
/// (the same run's unacknowledged next lap, or a later run reusing the region).
fn lost_writes(disk: &DiskContents, runs: &BTreeMap<RunId, RunAcc>, out: &mut Vec<Violation>) {
    let s = disk.layout.slots;
    for (id, acc) in runs {
        // The last acknowledged counter of each slot: the last S when contiguous.
        let mut last_in_slot: BTreeMap<u64, u64> = BTreeMap::new();
        for &c in &acc.acks {
            last_in_slot.insert(c % s, c);
        }
        for &c in last_in_slot.values() {
            let block = disk.layout.block(id.epoch, c);
            let found = disk.records.get(&block).copied();
            let fine = found.is_some_and(|r| {
                let exact = r.instance == id.instance.0 && r.epoch == id.epoch && r.counter == c;
                let replaced = r.counter > c && r.counter % s == c % s && r.epoch >= id.epoch;
                exact || replaced
            });
            if !fine {
                out.push(Violation::LostWrite {
                    run: *id,
                    counter: c,
                    block,
                    found: found.map(FoundRecord::from),
                });
            }
        }
    }
}

/// (b) Counters are acknowledged once; in counter order epochs never go back and each
/// run's acknowledgements are one unbroken stretch.
fn double_runs(runs: &BTreeMap<RunId, RunAcc>, out: &mut Vec<Violation>) {
    let mut all: Vec<(u64, RunId)> = runs
        .iter()
        .flat_map(|(id, a)| a.acks.iter().map(move |&c| (c, *id)))
        .collect();
    all.sort_unstable();

    // Per pair of runs: (first counter, count).
    let mut dups: BTreeMap<(RunId, RunId), (u64, u64)> = BTreeMap::new();
    let mut regressions: BTreeMap<(RunId, RunId), (u64, u64, u64)> = BTreeMap::new();
    let mut interleaved: BTreeMap<(RunId, RunId), (u64, u64)> = BTreeMap::new();

    for w in all.windows(2) {
        let ((c0, r0), (c1, r1)) = (w[0], w[1]);
        if c0 == c1 {
            let e = dups.entry((r0, r1)).or_insert((c0, 0));
            e.1 += 1;
        }
    }
    // The newest epoch acknowledged so far, and where.
    let mut newest: Option<(u64, RunId)> = None;
    let mut finished: HashSet<RunId> = HashSet::new();
    let mut prev: Option<RunId> = None;
    for &(c, id) in &all {
        if let Some((nc, nid)) = newest {
            if id.epoch < nid.epoch {
                let e = regressions.entry((nid, id)).or_insert((nc, c, 0));
                e.2 += 1;
            }
        }
        if newest.is_none_or(|(_, nid)| id.epoch >= nid.epoch) {
            newest = Some((c, id));
        }
        if let Some(p) = prev.filter(|p| *p != id) {
            finished.insert(p);
            if finished.contains(&id) {
                let e = interleaved.entry((id, p)).or_insert((c, 0));
                e.1 += 1;
            }
        }
        prev = Some(id);
    }
    for ((a, b), (counter, count)) in dups {
        out.push(Violation::DuplicateCounter {
            runs: [a, b],
            counter,
            count,
        });
    }
    for ((newer, older), (newer_counter, older_counter, count)) in regressions {
        out.push(Violation::EpochRegression {
            newer,
            newer_counter,
            older,
            older_counter,
            count,
        });
    }
    for ((run, other), (counter, count)) in interleaved {
        out.push(Violation::InterleavedRuns {
            run,
            other,
            counter,
            count,
        });
    }
}

/// (c) No record (on disk) or acknowledgement (in a log) of an older epoch has a counter
/// at or above the first counter of a newer run: that run chose its first counter above
/// everything on the disk when it started.
fn late_writes(disk: &DiskContents, runs: &BTreeMap<RunId, RunAcc>, out: &mut Vec<Violation>) {
    let starts: Vec<(RunId, u64)> = runs
        .iter()
        .filter_map(|(id, a)| a.first.map(|f| (*id, f)))
        .collect();
    // The earliest-starting newer run this write postdates.
    let newer_than = |epoch: u64, counter: u64| {
        starts
            .iter()
            .filter(|(id, first)| id.epoch > epoch && *first <= counter)
            .min_by_key(|(id, first)| (*first, *id))
            .copied()
    };
    for (&block, r) in &disk.records {
        if let Some((newer, newer_first)) = newer_than(r.epoch, r.counter) {
            out.push(Violation::LateWrite {
                source: Source::Disk,
                run: RunId {
                    epoch: r.epoch,
                    instance: Instance(r.instance),
                },
                counter: r.counter,
                block: Some(block),
                newer,
                newer_first,
            });
        }
    }
    for (id, a) in runs {
        for &c in &a.acks {
            if let Some((newer, newer_first)) = newer_than(id.epoch, c) {
                out.push(Violation::LateWrite {
                    source: Source::AckLog,
                    run: *id,
                    counter: c,
                    block: None,
                    newer,
                    newer_first,
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Command line

fn parse_instance(s: &str) -> Result<u64, String> {
    s.parse::<Instance>().map(|i| i.0)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Arguments of `holdfast guest run`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Exit status: 0 clean stop (SIGTERM/SIGINT, SIGUSR1 save, --exit-after), 75 RESERVATION \
CONFLICT (fenced), 1 failure (--fail-after, target gone for 30 s, I/O error), 2 bad usage.")]
pub struct RunArgs {
    /// iscsi://HOST[:PORT]/TARGET-IQN/LUN
    #[arg(long, required_unless_present = "device", requires = "initiator_name")]
    pub disk: Option<String>,
    /// Our iSCSI initiator name (the one the agent registered)
    #[arg(long)]
    pub initiator_name: Option<String>,
    /// Write through this block device (or file) with O_DIRECT|O_DSYNC instead of our
    /// own iSCSI session, e.g. the kernel initiator's /dev/sdX; EIO counts as fenced
    #[arg(long, conflicts_with_all = ["disk", "initiator_name"])]
    pub device: Option<PathBuf>,
    /// Logical block size of --device
    #[arg(long, default_value_t = 512, requires = "device")]
    pub block_size: u32,
    /// This run's epoch; the run writes into region EPOCH % 16
    #[arg(long)]
    pub epoch: u64,
    /// File to append start/ack/conflict/exit lines to
    #[arg(long)]
    pub ack_log: PathBuf,
    /// Instance id, up to 16 hex digits [default: random]
    #[arg(long, value_parser = parse_instance)]
    pub instance: Option<u64>,
    /// Pause between writes
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    pub interval: Duration,
    /// Where SIGUSR1 saves the counter (and --restore reads it)
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Continue above the counter in --state-file if it exists, then delete the file
    #[arg(long, requires = "state_file")]
    pub restore: bool,
    /// Exit 0 after N acknowledged writes (an admin's clean shutdown)
    #[arg(long, value_name = "N")]
    pub exit_after: Option<u64>,
    /// Exit 1 after N acknowledged writes (a crash)
    #[arg(long, value_name = "N")]
    pub fail_after: Option<u64>,
    /// A command with no answer after this long counts as a lost connection
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub io_timeout: Duration,
    /// More portals of the disk's target (HOST[:PORT], comma separated), tried in turn
    /// after the --disk URL's when a login fails: another gateway's path (the agent's
    /// `{portals}`)
    #[arg(long, value_delimiter = ',', value_name = "PORTALS", requires = "disk")]
    pub portals: Vec<String>,
    #[command(flatten)]
    pub chap: ChapArgs,
}

/// Arguments of `holdfast guest check`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Exit status: 0 clean, 1 violations found, 2 bad usage or I/O error.")]
pub struct CheckArgs {
    /// iscsi://HOST[:PORT]/TARGET-IQN/LUN
    #[arg(long)]
    pub disk: String,
    /// An ack log of the guests (repeatable)
    #[arg(long, required = true)]
    pub ack_log: Vec<PathBuf>,
    /// Machine-readable report on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chap: ChapArgs,
}

/// Why `guest run` or `guest check` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {}: {why}", path.display())]
    StateFile { path: PathBuf, why: String },
    #[error("{0}")]
    Layout(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("timed out")]
    Timeout,
}

session_error_sources!(GuestError);

impl GuestError {
    /// `guest run`'s exit status for this error (`guest check` always exits 2).
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestError::Session(e) if e.is_usage() => EXIT_USAGE,
            GuestError::Session(e) if e.is_reservation_conflict() => EXIT_CONFLICT,
            _ => EXIT_FAILURE,
        }
    }
}

pub(super) fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::File {
        path: path.to_path_buf(),
        source,
    }
}

fn initiator_config(
    url: &IscsiUrl,
    name: &str,
    chap: &ChapArgs,
) -> Result<InitiatorConfig, GuestError> {
    let chap = chap.credentials().map_err(SessionError::Usage)?;
    // Random ISID: each login is a new I_T nexus; the agent registers the name.
    let (user, secret) = (chap.map(|c| c.0), chap.map(|c| c.1.expose()));
    let mut opts = ConnectOptions::new(name).with_chap(user, secret);
    opts.login_timeout = Some(LOGIN_TIMEOUT);
    Ok(connect::resolve_url(url, &opts)?)
}

// ---------------------------------------------------------------------------------------
// guest run

/// What the saved state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub counter: u64,
    pub instance: String,
    pub epoch: u64,
}

/// Read a state file; Ok(None) when there is none.
pub fn read_state(path: &Path) -> Result<Option<SavedState>, GuestError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(path)(e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| GuestError::StateFile {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

/// Write a state file atomically: a reader sees the old file or the whole new one.
pub fn write_state(path: &Path, state: &SavedState) -> Result<(), GuestError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let body = serde_json::to_string(state).map_err(|e| GuestError::StateFile {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(file_err(&tmp))?;
    f.write_all(format!("{body}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(file_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(file_err(path))?;
    // The rename itself must survive a crash too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The ack log: every line goes out in one write(2) on an O_APPEND file, so lines of
/// guests sharing the file never mix.
pub(super) struct AckLog {
    file: std::fs::File,
    path: PathBuf,
}

impl AckLog {
    pub(super) fn open(path: &Path) -> Result<AckLog, GuestError> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(file_err(path))?;
        Ok(AckLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn log(&mut self, e: &AckEvent) -> Result<(), GuestError> {
        let line = format!("{e}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(file_err(&self.path))
    }
}

/// A stop the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Term,
    Int,
    Save,
}

/// Install the handlers now (so an early signal is not fatal); the receiver sees the
/// first signal.
pub(super) fn install_signals() -> std::io::Result<watch::Receiver<Option<Stop>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let s = tokio::select! {
            _ = term.recv() => Stop::Term,
            _ = int.recv() => Stop::Int,
            _ = usr1.recv() => Stop::Save,
        };
        let _ = tx.send(Some(s));
        // Keep the streams (and so the handlers) alive; later signals change nothing.
        let _keep = (term, int, usr1);
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Why a command did not succeed, after recovery.
enum Fail {
    Conflict,
    Stopped(Stop),
    /// The target stayed unreachable for the whole re-login period.
    Lost,
    Fatal(InitiatorError),
}

impl RunArgs {
    /// `--fail-after` / `--exit-after` reached after `acked` acknowledged writes.
    pub(super) fn limit_reached(&self, acked: u64) -> Option<Ending> {
        if self.fail_after.is_some_and(|n| acked >= n) {
            Some(Ending::FailAfter)
        } else if self.exit_after.is_some_and(|n| acked >= n) {
            Some(Ending::ExitAfter)
        } else {
            None
        }
    }
}

/// How a run ends: the ack log's exit reason and the exit status.
#[derive(Debug)]
pub(super) enum Ending {
    ExitAfter,
    FailAfter,
    Signal(Stop),
    Conflict,
    ConnectionLost,
    Error(String),
}

/// A login that no portal accepted: the last portal tried and its error.
type LoginFailed = (SocketAddr, InitiatorError);

/// Why a run could not start writing.
enum StartFailed {
    /// No portal accepted the first login.
    Login(ConnectError),
    /// Stopped, fenced or failed while logging in or reading the disk.
    Setup(Fail),
}

struct Guest {
    cfg: InitiatorConfig,
    /// Where to log in: the URL's portal first, then --portals; `cfg.addr` is one of them.
    portals: Vec<SocketAddr>,
    lun: u64,
    io_timeout: Duration,
    session: Option<Session>,
    stop: watch::Receiver<Option<Stop>>,
}

/// Worth a new session: the connection is lost, or the target failed this session's
/// request in a way a fresh login may cure.
fn is_connection_error(e: &InitiatorError) -> bool {
    e.is_connection_lost() || matches!(e, InitiatorError::Request(_) | InitiatorError::Timeout)
}

/// Worth retrying on the same session after a pause.
fn is_transient(e: &InitiatorError) -> bool {
    match e {
        InitiatorError::Status(s) => matches!(*s, status::BUSY | status::TASK_SET_FULL),
        InitiatorError::CheckCondition { key, .. } => {
            matches!(*key, sense_key::ABORTED_COMMAND | sense_key::NOT_READY)
        }
        _ => false,
    }
}

impl Guest {
    fn stop_requested(&self) -> Option<Stop> {
        *self.stop.borrow()
    }

    /// Wait for `d` unless a stop comes first.
    async fn pause(&mut self, d: Duration) -> Result<(), Stop> {
        if let Some(s) = self.stop_requested() {
            return Err(s);
        }
        let mut rx = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = rx.wait_for(Option::is_some) => Err(self.stop_requested().unwrap_or(Stop::Term)),
        }
    }

    /// Log in again with a fresh ISID, backing off from 100 ms to 1 s, for up to 30 s.
    async fn relogin(&mut self) -> Result<(), Fail> {
        self.session = None;
        let mut deadline = Instant::now() + RELOGIN_FOR;
        let mut backoff = Backoff::new(RELOGIN_EVERY, RELOGIN_CAP);
        let mut failures = FailureLog::default();
        let mut began = Instant::now();
        loop {
            let attempt = self.login_somewhere().await?;
            match attempt {
                Ok(s) => {
                    let failed = match failures.success(Instant::now().into_std()) {
                        Verdict::Recovered { failures, .. } => failures,
                        _ => 0,
                    };
                    let isid = hex::encode(s.isid());
                    info!(%isid, portal = %self.cfg.addr, failed, "logged in again");
                    self.session = Some(s);
                    return Ok(());
                }
                Err((portal, e)) => {
                    match failures.failure(&e.to_string(), Instant::now().into_std()) {
                        Verdict::Log { repeated } => {
                            warn!(%portal, error = %e, "re-login failed; retrying{}", Repeated(repeated))
                        }
                        _ => debug!(%portal, error = %e, "re-login failed"),
                    }
                }
            }
            // A round (wait + one attempt per portal) far longer than its limits means this
            // process was stopped (a VM paused through a storage outage): that is not
            // patience spent.
            let round = RELOGIN_CAP + LOGIN_TIMEOUT * self.portals.len() as u32;
            if began.elapsed() > round + Duration::from_secs(1) {
                deadline = Instant::now() + RELOGIN_FOR;
            }
            if Instant::now() >= deadline {
                return Err(Fail::Lost);
            }
            began = Instant::now();
            let wait = backoff.next_delay(rand::random());
            self.pause(wait).await.map_err(Fail::Stopped)?;
        }
    }

    /// One login through each portal in turn, from the current one, until one accepts;
    /// the last error if none does. The portal that accepted stays current.
    async fn login_somewhere(&mut self) -> Result<Result<Session, LoginFailed>, Fail> {
        let mut last = None;
        for _ in 0..self.portals.len() {
            let mut rx = self.stop.clone();
            let attempt = tokio::select! {
                r = Session::login(self.cfg.clone()) => r,
                _ = rx.wait_for(Option::is_some) => {
                    return Err(Fail::Stopped(self.stop_requested().unwrap_or(Stop::Term)));
                }
            };
            match attempt {
                Ok(s) => return Ok(Ok(s)),
                Err(e) => {
                    debug!(portal = %self.cfg.addr, error = %e, "login failed");
                    last = Some((self.cfg.addr, e));
                    self.next_portal();
                }
            }
        }
        Ok(Err(last.unwrap_or((self.cfg.addr, InitiatorError::Timeout))))
    }

    fn next_portal(&mut self) {
        if let Some(i) = self.portals.iter().position(|&p| p == self.cfg.addr) {
            self.cfg.addr = self.portals[(i + 1) % self.portals.len()];
        }
    }

    /// Run `op` until it succeeds, through unit attentions, busy answers and lost
    /// connections (re-login, then the same command again).
    async fn command<T, F, Fut>(&mut self, what: &str, op: F) -> Result<T, Fail>
    where
        F: Fn(Session) -> Fut,
        Fut: Future<Output = Result<T, InitiatorError>>,
    {
        let mut ua_left = UA_RETRIES;
        let mut busy_until: Option<Instant> = None;
        loop {
            let Some(s) = self.session.clone() else {
                self.relogin().await?;
                continue;
            };
            let e = match tokio::time::timeout(self.io_timeout, op(s)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => InitiatorError::Timeout,
            };
            match e {
                InitiatorError::ReservationConflict => return Err(Fail::Conflict),
                InitiatorError::CheckCondition {
                    key: sense_key::UNIT_ATTENTION,
                    asc,
                    ascq,
                } if ua_left > 0 => {
                    info!(what, asc, ascq, "unit attention; retrying");
                    ua_left -= 1;
                }
                e if is_transient(&e) => {
                    let until = *busy_until.get_or_insert_with(|| Instant::now() + RELOGIN_FOR);
                    if Instant::now() >= until {
                        return Err(Fail::Fatal(e));
                    }
                    info!(what, error = %e, "target busy; retrying");
                    self.pause(RELOGIN_EVERY).await.map_err(Fail::Stopped)?;
                }
                e if is_connection_error(&e) => {
                    warn!(what, error = %e, "connection lost; logging in again");
                    // Dropping the last handle closes the connection.
                    self.session = None;
                }
                e => return Err(Fail::Fatal(e)),
            }
        }
    }

    async fn scan(&mut self, layout: Layout) -> Result<DiskContents, Fail> {
        let mut disk = DiskContents::new(layout);
        let (lun, bs) = (self.lun, layout.block_size);
        for (lba, n) in layout.reads() {
            let data = self
                .command("read", move |s: Session| async move {
                    s.read16(lun, lba, n, bs).await
                })
                .await?;
            disk.add_blocks(lba, &data);
        }
        Ok(disk)
    }

    async fn write(&mut self, layout: Layout, r: Record) -> Result<(), Fail> {
        let block = layout.block(r.epoch, r.counter);
        let data = Bytes::from(r.encode(layout.block_size as usize));
        let (lun, bs) = (self.lun, layout.block_size);
        self.command("write", move |s: Session| {
            let d = data.clone();
            async move { s.write16(lun, block, d, bs, true).await }
        })
        .await
    }

    /// The first login, then [`Guest::setup`]. The login is not retried (beyond one
    /// try per portal): a guest that cannot reach its disk at all fails at once, and the
    /// agent sees it.
    async fn start(&mut self, target: &str) -> Result<(Layout, DiskContents), StartFailed> {
        match self.login_somewhere().await.map_err(StartFailed::Setup)? {
            Ok(s) => self.session = Some(s),
            Err((addr, source)) => {
                return Err(StartFailed::Login(ConnectError::Login {
                    target: target.to_string(),
                    addr,
                    source,
                }))
            }
        }
        self.setup().await.map_err(StartFailed::Setup)
    }

    /// The disk's layout (from its capacity) and what is on it.
    async fn setup(&mut self) -> Result<(Layout, DiskContents), Fail> {
        let lun = self.lun;
        let (last_lba, bs) = self
            .command("read capacity", move |s: Session| async move {
                s.read_capacity16(lun).await
            })
            .await?;
        let layout = Layout::new(last_lba.saturating_add(1), bs)
            .map_err(|e| Fail::Fatal(InitiatorError::InvalidRequest(e.to_string())))?;
        let disk = self.scan(layout).await?;
        Ok((layout, disk))
    }
}

/// `holdfast guest run`: returns the exit status. Errors are what stops it before it
/// could start (bad usage, unreadable files, the first login).
pub async fn run(a: &RunArgs) -> Result<i32, GuestError> {
    if let Some(device) = &a.device {
        return super::guest_device::run(a, device).await;
    }
    let (Some(disk), Some(name)) = (&a.disk, &a.initiator_name) else {
        return Err(GuestError::Layout(
            "--disk and --initiator-name are required without --device".into(),
        ));
    };
    let url: IscsiUrl = disk.parse()?;
    let cfg = initiator_config(&url, name, &a.chap)?;
    let portals = portal_list(cfg.addr, &a.portals)?;
    let instance = a.instance.unwrap_or_else(rand::random);
    // A state file that cannot be read fails the start before anything is written.
    let saved = saved_state(a)?;
    let mut log = AckLog::open(&a.ack_log)?;
    let stop = install_signals().map_err(GuestError::Signals)?;
    let mut g = Guest {
        cfg,
        portals,
        lun: url.lun,
        io_timeout: a.io_timeout,
        session: None,
        stop,
    };
    let exit = |log: &mut AckLog, reason: &str| {
        log.log(&AckEvent::Exit {
            instance,
            epoch: a.epoch,
            reason: reason.to_string(),
        })
    };

    let (layout, disk) = match g.start(&url.target).await {
        Ok(v) => v,
        Err(StartFailed::Login(e)) => {
            exit(&mut log, "login-failed")?;
            return Err(e.into());
        }
        Err(StartFailed::Setup(f)) => {
            let (reason, code, err) = ending_of_setup(f);
            exit(&mut log, reason)?;
            if let Some(e) = err {
                eprintln!("holdfast guest run: {e}");
            }
            return Ok(code);
        }
    };
    let first = first_counter(disk.max_counter(), saved.as_ref().map(|s| s.counter));
    log.log(&AckEvent::Start {
        instance,
        epoch: a.epoch,
        first,
    })?;
    info!(
        instance = %Instance(instance),
        epoch = a.epoch,
        first,
        slots = layout.slots,
        records = disk.records.len(),
        restored = saved.is_some(),
        "guest started"
    );
    if saved.is_some() {
        if let Some(p) = &a.state_file {
            // Used once: a later start must not go back to it.
            std::fs::remove_file(p).map_err(file_err(p))?;
        }
    }

    let mut w = Writer {
        a,
        instance,
        layout,
        next: first,
        acked: 0,
    };
    let ending = w.write_until_done(&mut g, &mut log).await?;
    let (reason, code) = ending_status(&ending, a, instance, w.next);
    // Clean stops log out; a crash (or a fenced guest) just goes away.
    if code == 0 {
        if let Some(s) = g.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.logout()).await;
        }
    }
    if let Err(e) = exit(&mut log, reason) {
        eprintln!("holdfast guest run: {e}");
    }
    info!(instance = %Instance(instance), epoch = a.epoch, acked = w.acked, reason, code, "guest exits");
    Ok(code)
}

/// The URL's portal, then the others of --portals (resolved, without repeats).
fn portal_list(first: SocketAddr, more: &[String]) -> Result<Vec<SocketAddr>, GuestError> {
    let mut all = vec![first];
    for p in more {
        let (host, port) =
            parse_portal(p).map_err(|e| SessionError::Usage(format!("--portals {p:?}: {e}")))?;
        let addr = connect::resolve(&host, port).map_err(SessionError::from)?;
        if !all.contains(&addr) {
            all.push(addr);
        }
    }
    Ok(all)
}

/// The state to restore (`--restore` with a `--state-file`), if any.
pub(super) fn saved_state(a: &RunArgs) -> Result<Option<SavedState>, GuestError> {
    let saved = match (&a.state_file, a.restore) {
        (Some(p), true) => read_state(p)?,
        _ => None,
    };
    if let Some(s) = &saved {
        if s.epoch >= a.epoch {
            warn!(
                saved = s.epoch,
                ours = a.epoch,
                "restoring a state saved by the same or a later epoch"
            );
        }
    }
    Ok(saved)
}

/// The write loop of one run: a counter per write, each acknowledged one logged.
struct Writer<'a> {
    a: &'a RunArgs,
    instance: u64,
    layout: Layout,
    /// The counter of the next write.
    next: u64,
    acked: u64,
}

impl Writer<'_> {
    /// Write until a signal, a limit, a conflict or an error ends the run. Errors are
    /// ack log failures (an acknowledged write that cannot be logged ends everything).
    async fn write_until_done(
        &mut self,
        g: &mut Guest,
        log: &mut AckLog,
    ) -> Result<Ending, GuestError> {
        loop {
            if let Some(s) = g.stop_requested() {
                return Ok(Ending::Signal(s));
            }
            if let Some(e) = self.limit_reached() {
                return Ok(e);
            }
            if let Some(e) = self.write_one(g, log).await? {
                return Ok(e);
            }
            if let Some(e) = self.limit_reached() {
                return Ok(e);
            }
            if let Err(s) = g.pause(self.a.interval).await {
                return Ok(Ending::Signal(s));
            }
        }
    }

    fn limit_reached(&self) -> Option<Ending> {
        self.a.limit_reached(self.acked)
    }

    /// One write of the next counter; Some when it ends the run.
    async fn write_one(
        &mut self,
        g: &mut Guest,
        log: &mut AckLog,
    ) -> Result<Option<Ending>, GuestError> {
        let r = Record {
            instance: self.instance,
            epoch: self.a.epoch,
            counter: self.next,
        };
        match g.write(self.layout, r).await {
            Ok(()) => {
                self.acked += 1;
                Ok(log_acked(log, &r)?.map(|n| self.next = n).err())
            }
            Err(Fail::Conflict) => {
                log_refused(log, &r);
                Ok(Some(Ending::Conflict))
            }
            Err(Fail::Stopped(s)) => Ok(Some(Ending::Signal(s))),
            Err(Fail::Lost) => Ok(Some(Ending::ConnectionLost)),
            Err(Fail::Fatal(e)) => Ok(Some(Ending::Error(e.to_string()))),
        }
    }
}

/// Log the acknowledged write `r`: the counter to write next, or why the run must end.
pub(super) fn log_acked(log: &mut AckLog, r: &Record) -> Result<Result<u64, Ending>, GuestError> {
    log.log(&AckEvent::Ack {
        instance: r.instance,
        epoch: r.epoch,
        counter: r.counter,
    })?;
    // A forged record near u64::MAX must not make us wrap (or panic).
    Ok(r.counter
        .checked_add(1)
        .ok_or_else(|| Ending::Error("counter space exhausted".into())))
}

/// Log the refused write `r`. The exit status says "fenced" even if the log cannot.
pub(super) fn log_refused(log: &mut AckLog, r: &Record) {
    if let Err(e) = log.log(&AckEvent::Conflict {
        instance: r.instance,
        epoch: r.epoch,
        counter: r.counter,
    }) {
        eprintln!("holdfast guest run: {e}");
    }
}

/// The exit reason (for the ack log) and status of a run that ended so; a save request
/// writes the state file here.
pub(super) fn ending_status(
    ending: &Ending,
    a: &RunArgs,
    instance: u64,
    next: u64,
) -> (&'static str, i32) {
    match ending {
        Ending::ExitAfter => ("exit-after", 0),
        Ending::FailAfter => ("fail-after", EXIT_FAILURE),
        Ending::Signal(Stop::Term) => ("sigterm", 0),
        Ending::Signal(Stop::Int) => ("sigint", 0),
        Ending::Signal(Stop::Save) => save(a, instance, next),
        Ending::Conflict => ("conflict", EXIT_CONFLICT),
        Ending::ConnectionLost => {
            eprintln!(
                "holdfast guest run: target unreachable for {} s",
                RELOGIN_FOR.as_secs()
            );
            ("connection-lost", EXIT_FAILURE)
        }
        Ending::Error(e) => {
            eprintln!("holdfast guest run: {e}");
            ("error", EXIT_FAILURE)
        }
    }
}

/// SIGUSR1: save the last acknowledged counter to the state file.
fn save(a: &RunArgs, instance: u64, next: u64) -> (&'static str, i32) {
    let state = SavedState {
        // The last acknowledged counter (first - 1 when none was).
        counter: next - 1,
        instance: Instance(instance).to_string(),
        epoch: a.epoch,
    };
    match a.state_file.as_deref() {
        Some(p) => match write_state(p, &state) {
            Ok(()) => ("saved", 0),
            Err(e) => {
                eprintln!("holdfast guest run: save failed: {e}");
                ("save-failed", EXIT_FAILURE)
            }
        },
        None => {
            eprintln!("holdfast guest run: SIGUSR1 without --state-file: nothing saved");
            ("save-failed", EXIT_FAILURE)
        }
    }
}

fn ending_of_setup(f: Fail) -> (&'static str, i32, Option<String>) {
    match f {
        Fail::Conflict => ("conflict", EXIT_CONFLICT, None),
        Fail::Stopped(Stop::Term) => ("sigterm", 0, None),
        Fail::Stopped(Stop::Int) => ("sigint", 0, None),
        // Nothing written yet: nothing to save beyond what the disk holds.
        Fail::Stopped(Stop::Save) => ("sigusr1-before-start", 0, None),
        Fail::Lost => (
            "connection-lost",
            EXIT_FAILURE,
            Some("target unreachable".into()),
        ),
        Fail::Fatal(e) => ("error", EXIT_FAILURE, Some(e.to_string())),
    }
}

// ---------------------------------------------------------------------------------------
// guest check

/// Read the disk (reads only: allowed under Write Exclusive reservations).
async fn read_disk(cfg: InitiatorConfig, lun: u64) -> Result<DiskContents, GuestError> {
    let addr = cfg.addr;
    let target = cfg.target_name.clone();
    let s = Session::login(cfg)
        .await
        .map_err(|source| ConnectError::Login {
            target,
            addr,
            source,
        })?;
    let scsi = |what| move |source| GuestError::from(SessionError::Scsi { what, source });
    let (last_lba, bs) = past_unit_attention(|| s.read_capacity16(lun))
        .await
        .map_err(scsi("READ CAPACITY(16)"))?;
    let layout = Layout::new(last_lba.saturating_add(1), bs)?;
    let mut disk = DiskContents::new(layout);
    for (lba, n) in layout.reads() {
        let data = past_unit_attention(|| s.read16(lun, lba, n, bs))
            .await
            .map_err(scsi("READ(16)"))?;
        disk.add_blocks(lba, &data);
    }
    let _ = s.logout().await;
    Ok(disk)
}

/// `holdfast guest check`: read the disk and the ack logs, and judge.
pub async fn check_disk(a: &CheckArgs) -> Result<CheckReport, GuestError> {
    let url: IscsiUrl = a.disk.parse()?;
    let mut events = Vec::new();
    let mut warnings = Vec::new();
    for p in &a.ack_log {
        let text = std::fs::read_to_string(p).map_err(file_err(p))?;
        let (ev, bad) = parse_ack_log(&text);
        events.extend(ev);
        warnings.extend(
            bad.into_iter()
                .map(|(n, l)| format!("{}:{n}: not an event: {l:?}", p.display())),
        );
    }
    let cfg = initiator_config(&url, CHECKER_INITIATOR, &a.chap)?;
    let disk = tokio::time::timeout(CHECK_TIMEOUT, read_disk(cfg, url.lun))
        .await
        .map_err(|_| GuestError::Timeout)??;
    let mut report = check(&disk, &events);
    report.warnings = warnings;
    Ok(report)
}

/// `holdfast guest`'s subcommands.
#[derive(clap::Subcommand)]
pub enum GuestCommand {
    /// Write an increasing counter to the disk until stopped (exit 75 when fenced).
    Run(Box<RunArgs>),
    /// Check the disk against the guests' ack logs (exit 0 clean, 1 violations, 2 error).
    Check(CheckArgs),
}

/// `holdfast guest run|check`; returns the exit status.
pub fn main(command: GuestCommand) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        GuestCommand::Run(args) => match rt.block_on(run(&args)) {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("holdfast guest run: {e}");
                Ok(e.exit_code())
            }
        },
        GuestCommand::Check(args) => match rt.block_on(check_disk(&args)) {
            Ok(report) => {
                if args.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{report}");
                }
                Ok(if report.ok { 0 } else { 1 })
            }
            Err(e) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"ok": false, "error": e.to_string()})
                    );
                }
                eprintln!("holdfast guest check: {e}");
                Ok(EXIT_USAGE)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 512;

    /// A disk of 16 regions of `slots` blocks.
    fn layout(slots: u64) -> Layout {
        Layout::new(1 + 16 * slots, BS).unwrap()
    }

    /// Simulates well-behaved guests: each run starts above the disk's maximum, writes
    /// into its region and acknowledges what landed.
    struct Sim {
        disk: DiskContents,
        events: Vec<AckEvent>,
    }

    impl Sim {
        fn new(slots: u64) -> Sim {
            Sim {
                disk: DiskContents::new(layout(slots)),
                events: Vec::new(),
            }
        }

        fn start(&mut self, instance: u64, epoch: u64) -> u64 {
            let first = first_counter(self.disk.max_counter(), None);
            self.events.push(AckEvent::Start {
                instance,
                epoch,
                first,
            });
            first
        }

        fn write(&mut self, instance: u64, epoch: u64, counter: u64, ack: bool) {
            self.disk.put(Record {
                instance,
                epoch,
                counter,
            });
            if ack {
                self.ack(instance, epoch, counter);
            }
        }

        fn ack(&mut self, instance: u64, epoch: u64, counter: u64) {
            self.events.push(AckEvent::Ack {
                instance,
                epoch,
                counter,
            });
        }

        /// A whole run of `n` acknowledged writes; returns (first, last).
        fn run(&mut self, instance: u64, epoch: u64, n: u64) -> (u64, u64) {
            let first = self.start(instance, epoch);
            for c in first..first + n {
                self.write(instance, epoch, c, true);
            }
            self.events.push(AckEvent::Exit {
                instance,
                epoch,
                reason: "exit-after".into(),
            });
            (first, first + n - 1)
        }

        fn check(&self) -> CheckReport {
            check(&self.disk, &self.events)
        }
    }

    fn kinds(r: &CheckReport) -> Vec<&'static str> {
        let mut k: Vec<_> = r.violations.iter().map(Violation::kind).collect();
        k.dedup();
        k
    }

    #[test]
    fn records_round_trip_and_reject_junk() {
        let r = Record {
            instance: 0xdead_beef_0123_4567,
            epoch: 42,
            counter: u64::MAX - 1,
        };
        for bs in [36usize, 512, 4096] {
            let b = r.encode(bs);
            assert_eq!(b.len(), bs);
            assert_eq!(&b[..8], b"HFGUEST1");
            assert_eq!(Record::decode(&b), Some(r));
        }
        let good = r.encode(512);
        assert_eq!(Record::decode(&good[..35]), None, "short");
        assert_eq!(Record::decode(&[]), None);
        assert_eq!(Record::decode(&[0u8; 512]), None, "zeros");
        for flip in [0usize, 9, 17, 25, 33, 100, 511] {
            let mut b = good.clone();
            b[flip] ^= 0x40;
            assert_eq!(Record::decode(&b), None, "byte {flip} flipped");
        }
    }

    #[test]
    fn layout_sizes_and_positions() {
        // 16 MiB of 512-byte blocks: regions of 1024.
        let l = Layout::new(32768, 512).unwrap();
        assert_eq!(l.slots, 1024);
        assert_eq!(l.block(0, 0), 1);
        assert_eq!(l.block(1, 5), 1 + 1024 + 5);
        assert_eq!(l.block(17, 1024 + 5), 1 + 1024 + 5);
        assert_eq!(l.block(15, 1023), 16 * 1024);
        // Small disks: (blocks - 1) / 16.
        assert_eq!(Layout::new(17, 512).unwrap().slots, 1);
        assert_eq!(Layout::new(16 * 100 + 1, 512).unwrap().slots, 100);
        assert!(Layout::new(16, 512).is_err());
        assert!(Layout::new(0, 512).is_err());
        assert!(
            Layout::new(u64::MAX, 16).is_err(),
            "block smaller than a record"
        );
        // Reads: ≤ 1 MiB each, covering blocks 1..=16 S exactly.
        let reads = l.reads();
        assert_eq!(reads.len(), 8);
        assert!(reads.iter().all(|&(_, n)| u64::from(n) * 512 <= 1 << 20));
        assert_eq!(reads[0].0, 1);
        let end = reads.last().map(|&(l, n)| l + u64::from(n)).unwrap();
        assert_eq!(end, 1 + 16 * 1024);
        let l4k = Layout::new(1 << 20, 4096).unwrap();
        assert!(l4k.reads().iter().all(|&(_, n)| n == 256));
    }

    #[test]
    fn ack_lines_round_trip() {
        let evs = [
            AckEvent::Start {
                instance: 0xa1,
                epoch: 1,
                first: 1,
            },
            AckEvent::Ack {
                instance: u64::MAX,
                epoch: 7,
                counter: 99,
            },
            AckEvent::Conflict {
                instance: 3,
                epoch: 2,
                counter: 5,
            },
            AckEvent::Exit {
                instance: 3,
                epoch: 2,
                reason: "conflict".into(),
            },
        ];
        for e in &evs {
            assert_eq!(AckEvent::parse(&e.to_string()).as_ref(), Some(e), "{e}");
        }
        assert_eq!(evs[0].to_string(), "start 00000000000000a1 1 1");
        let text = "start 00000000000000a1 1 1\nack 00000000000000a1 1 1\n\nack zz 1 2\n\
                    ack 00000000000000a1 1\nbogus 1 1 1\nack 00000000000000a1 1 2 3\nack 00000000000000a1 1 2";
        let (ev, bad) = parse_ack_log(text);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            bad.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
    }

    #[test]
    fn first_counter_is_above_disk_and_saved_state() {
        assert_eq!(first_counter(None, None), 1);
        assert_eq!(first_counter(Some(50), None), 51);
        assert_eq!(first_counter(Some(50), Some(70)), 71);
        assert_eq!(first_counter(Some(90), Some(70)), 91);
        assert_eq!(first_counter(None, Some(0)), 1);
    }

    #[test]
    fn clean_history_passes() {
        // Slots of 8 so that runs wrap their region, and epochs 1 and 17 share one.
        let mut sim = Sim::new(8);
        sim.run(0xa, 1, 20);
        // A run whose last write landed but was never acknowledged (killed).
        let (_, last) = sim.run(0xb, 2, 5);
        sim.write(0xb, 2, last + 1, false);
        sim.run(0xc, 3, 30);
        // Epoch 17 reuses epoch 1's region.
        sim.run(0xd, 17, 3);
        // A fenced run: started, nothing acknowledged.
        sim.start(0xe, 18);
        sim.events.push(AckEvent::Conflict {
            instance: 0xe,
            epoch: 18,
            counter: 1,
        });
        sim.run(0xf, 19, 12);
        // Two runs of one epoch, one after the other (a local restart).
        sim.run(0x10, 20, 9);
        sim.run(0x11, 20, 9);
        let r = sim.check();
        assert!(r.ok, "{r}");
        assert!(r.violations.is_empty());
        assert_eq!(r.runs.len(), 8);
        let a = &r.runs[0];
        assert_eq!(
            (a.epoch, a.first, a.last, a.acked),
            (1, Some(1), Some(20), 20)
        );
        // The same log twice is still one history.
        let mut twice = sim.events.clone();
        twice.extend(sim.events.iter().cloned());
        assert!(check(&sim.disk, &twice).ok);
    }

    #[test]
    fn lost_ack_is_caught() {
        let mut sim = Sim::new(8);
        sim.run(0xa, 1, 20);
        let (_, last) = sim.run(0xb, 2, 6);
        // The ack of counter `last` is in the log, but its block went back to nothing.
        let block = sim.disk.layout.block(2, last);
        sim.disk.records.remove(&block);
        let r = sim.check();
        assert!(!r.ok);
        assert_eq!(
            r.violations,
            vec![Violation::LostWrite {
                run: RunId {
                    epoch: 2,
                    instance: Instance(0xb)
                },
                counter: last,
                block,
                found: None
            }]
        );
        // An older write of the same run in that slot is no excuse either.
        let mut sim = Sim::new(8);
        let (_, last) = sim.run(0xa, 1, 20);
        sim.disk.put(Record {
            instance: 0xa,
            epoch: 1,
            counter: last - 8,
        });
        assert_eq!(kinds(&sim.check()), vec!["lost write"]);
        // Only the last S acknowledgements are expected on disk: older ones were
        // overwritten by the run itself, which is not a loss.
        let mut sim = Sim::new(8);
        sim.run(0xa, 1, 100);
        assert!(sim.check().ok);
    }

    #[test]
    fn duplicate_counter_is_caught() {
        let mut sim = Sim::new(64);
        sim.run(0xa, 1, 10);
        // Epoch 2 starts while epoch 1 still runs: both pick up at 11.
        let first = sim.start(0xb, 2);
        for c in first..first + 5 {
            sim.write(0xa, 1, c, true);
            sim.write(0xb, 2, c, true);
        }
        let r = sim.check();
        assert!(!r.ok);
        assert!(
            r.violations.iter().any(|v| matches!(
                v,
                Violation::DuplicateCounter {
                    counter: 11,
                    count: 5,
                    ..
                }
            )),
            "{r}"
        );
    }

    #[test]
    fn interleaved_runs_are_caught() {
        // Two runs of the same epoch alternating (no epoch regression to see, and no
        // counter acknowledged twice): only the interleaving gives them away.
        let mut sim = Sim::new(64);
        sim.start(0xa, 5);
        sim.start(0xb, 5);
        for c in 1..=10 {
            let who = if c % 2 == 0 { 0xa } else { 0xb };
            sim.write(who, 5, c, true);
        }
        let r = sim.check();
        assert_eq!(kinds(&r), vec!["interleaved runs"], "{r}");
        // Epochs alternating: a newer run's acks, then the older one's again.
        let mut sim = Sim::new(64);
        sim.run(0xa, 1, 5);
        sim.start(0xb, 2);
        sim.write(0xb, 2, 6, true);
        sim.write(0xb, 2, 7, true);
        sim.write(0xa, 1, 8, true);
        let r = sim.check();
        let k = kinds(&r);
        assert!(k.contains(&"epoch regression"), "{r}");
        assert!(k.contains(&"interleaved runs"), "{r}");
        assert!(k.contains(&"late write"), "{r}");
    }

    #[test]
    fn late_write_is_caught() {
        let mut sim = Sim::new(64);
        sim.run(0xa, 1, 10);
        let (first2, _) = sim.run(0xb, 2, 10);
        // Epoch 1's write, in flight when epoch 2 took over, lands afterwards; its
        // guest never saw an answer (no ack), so only the disk shows it.
        sim.disk.put(Record {
            instance: 0xa,
            epoch: 1,
            counter: 1000,
        });
        let r = sim.check();
        assert!(!r.ok);
        assert_eq!(
            r.violations,
            vec![Violation::LateWrite {
                source: Source::Disk,
                run: RunId {
                    epoch: 1,
                    instance: Instance(0xa)
                },
                counter: 1000,
                block: Some(sim.disk.layout.block(1, 1000)),
                newer: RunId {
                    epoch: 2,
                    instance: Instance(0xb)
                },
                newer_first: first2,
            }]
        );
        assert!(r.to_string().contains("VIOLATION late write"), "{r}");
        // An acknowledgement alone proves it too, even when the disk no longer shows it.
        let mut sim = Sim::new(64);
        sim.run(0xa, 1, 10);
        let first2 = sim.start(0xb, 2);
        sim.ack(0xa, 1, first2);
        let r = sim.check();
        assert!(
            r.violations.iter().any(|v| matches!(
                v,
                Violation::LateWrite {
                    source: Source::AckLog,
                    ..
                }
            )),
            "{r}"
        );
    }

    #[test]
    fn report_json_shape() {
        let mut sim = Sim::new(8);
        sim.run(0xa1, 1, 3);
        let j = serde_json::to_value(sim.check()).unwrap();
        assert_eq!(j["ok"], true);
        assert_eq!(
            j["runs"][0],
            serde_json::json!({"instance": "00000000000000a1", "epoch": 1, "first": 1,
                               "last": 3, "acked": 3, "exit": "exit-after"})
        );
        assert_eq!(j["violations"], serde_json::json!([]));
        sim.disk.records.clear();
        let j = serde_json::to_value(sim.check()).unwrap();
        assert_eq!(j["ok"], false);
        assert_eq!(j["violations"][0]["kind"], "lost_write");
        assert_eq!(j["violations"][0]["run"]["instance"], "00000000000000a1");
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.state");
        assert_eq!(read_state(&p).unwrap(), None);
        let s = SavedState {
            counter: 77,
            instance: "00000000000000b2".into(),
            epoch: 2,
        };
        write_state(&p, &s).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"counter\":77,\"instance\":\"00000000000000b2\",\"epoch\":2}\n"
        );
        assert_eq!(read_state(&p).unwrap(), Some(s));
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(read_state(&p), Err(GuestError::StateFile { .. })));
    }
}
