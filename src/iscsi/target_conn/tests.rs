//! In-memory tests of the target connection with a simulated clock: the protocol edge
//! cases `tests/hostile.rs` and friends reach over TCP, here without sockets or time.

use super::*;
use crate::wire::{DigestConfig, PduDecoder};
use bytes::BytesMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const LUN1: u64 = 0x0001_0000_0000_0000;

/// A target with LUNs 0 and 1, a buffer budget, and two targets for SendTargets.
struct FakeTarget {
    budget: AtomicU64,
    targets: usize,
}

impl TargetContext for FakeTarget {
    fn lun_exists(&self, lun: u64) -> bool {
        lun <= 1
    }
    fn data_out_length(&self, _lun: u64, cdb: &[u8]) -> u32 {
        match cdb[0] {
            // WRITE(10): blocks of 512
            0x2a => u32::from(u16::from_be_bytes([cdb[7], cdb[8]])) * 512,
            _ => 0,
        }
    }
    fn reserve_buffer(&self, bytes: u32) -> Option<Hold> {
        let b = u64::from(bytes);
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(b))
            .ok()?;
        Some(Box::new(b))
    }
    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for i in 0..self.targets {
            let name = format!("iqn.2026-01.test:disk{i:03}");
            if which == "All" || which == name {
                v.push(("TargetName".into(), name));
                v.push(("TargetAddress".into(), format!("10.0.0.{i}:3260,1")));
            }
        }
        v
    }
}

fn config() -> ConnConfig {
    ConnConfig {
        discovery: false,
        first_cmd_sn: 1,
        announced_max_cmd_sn: 4,
        queue_depth: 4,
        first_stat_sn: 100,
        max_send_segment: 8192,
        max_burst: 262_144,
        write_limits: WriteLimits {
            initial_r2t: true,
            first_burst_length: 65_536,
            max_burst_length: 16_384,
            max_outstanding_r2t: 1,
        },
        max_command_bytes: 1 << 20,
        nop_interval: Duration::from_secs(5),
        nop_timeout: Duration::from_secs(10),
    }
}

/// One connection, a simulated clock, and what came out of it.
struct Sim {
    conn: TargetConnection,
    t0: Instant,
    now: Instant,
    sent: Vec<Pdu>,
    events: Vec<Event>,
    /// Start submitted tasks at once (a task set that never holds anything back).
    auto_start: bool,
    /// Tasks submitted and not started (when `auto_start` is off).
    submitted: Vec<Submit>,
    /// TMFs waiting for [`Sim::decide`].
    tmfs: Vec<TmfRequest>,
}

impl Sim {
    fn new() -> Self {
        Self::with(config(), 4 << 20)
    }
    fn with(cfg: ConnConfig, budget: u64) -> Self {
        let t0 = Instant::now();
        let ctx = Arc::new(FakeTarget {
            budget: AtomicU64::new(budget),
            targets: 40,
        });
        Self {
            conn: TargetConnection::new(cfg, ctx, t0),
            t0,
            now: t0,
            sent: Vec::new(),
            events: Vec::new(),
            auto_start: true,
            submitted: Vec::new(),
            tmfs: Vec::new(),
        }
    }
    fn advance(&mut self, secs: u64) -> Result<(), ConnError> {
        self.now += Duration::from_secs(secs);
        let r = self.conn.handle_timeout(self.now);
        self.drain();
        r
    }
    fn send(&mut self, bhs: Bhs, data: &[u8]) {
        self.conn.handle_pdu(
            Pdu {
                bhs,
                ahs: Vec::new(),
                data: Bytes::copy_from_slice(data),
            },
            self.now,
        );
        self.drain();
    }
    fn drain(&mut self) {
        loop {
            while let Some(p) = self.conn.poll_transmit() {
                self.sent.push(p);
            }
            let Some(e) = self.conn.poll_event() else {
                break;
            };
            match e {
                Event::Submit(s) if self.auto_start => {
                    assert!(self.conn.start_task(s.task, self.now));
                }
                Event::Submit(s) => self.submitted.push(s),
                Event::TaskManagement(t) => self.tmfs.push(t),
                e => self.events.push(e),
            }
        }
    }
    /// The task set starts `task`.
    fn start(&mut self, task: TaskId) -> bool {
        let r = self.conn.start_task(task, self.now);
        self.drain();
        r
    }
    /// The SCSI core decides the oldest pending TMF.
    fn decide(&mut self, response: u8, aborted: &[Aborted]) {
        let t = self.tmfs.remove(0);
        self.conn.tmf_decided(t.itt, response, aborted, self.now);
        self.drain();
    }
    fn take_sent(&mut self) -> Vec<Pdu> {
        std::mem::take(&mut self.sent)
    }
    /// Executions asked for so far (taken).
    fn executes(&mut self) -> Vec<Execute> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Execute(x) => {
                out.push(x.clone());
                false
            }
            _ => true,
        });
        out
    }
    fn complete(&mut self, task: TaskId, outcome: Outcome) -> Delivery {
        let d = self.conn.handle_outcome(task, outcome, self.now);
        self.drain();
        d
    }
    fn good(&mut self, task: TaskId) -> Delivery {
        self.complete(task, Outcome::default())
    }
}

fn cmd(itt: u32, cmd_sn: u32, cdb: &[u8], read: bool, write: bool, edtl: u32) -> Bhs {
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    Bhs::ScsiCommand(wire::ScsiCommand {
        final_: true,
        read,
        write,
        attr: 1,
        itt,
        expected_data_transfer_length: edtl,
        cmd_sn,
        cdb: c,
        ..Default::default()
    })
}

fn tur(itt: u32, cmd_sn: u32) -> Bhs {
    cmd(itt, cmd_sn, &[0], false, false, 0)
}

fn read10(itt: u32, cmd_sn: u32, edtl: u32) -> Bhs {
    cmd(
        itt,
        cmd_sn,
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 8],
        true,
        false,
        edtl,
    )
}

fn write10(itt: u32, cmd_sn: u32, blocks: u16) -> Bhs {
    let [hi, lo] = blocks.to_be_bytes();
    let edtl = u32::from(blocks) * 512;
    cmd(
        itt,
        cmd_sn,
        &[0x2a, 0, 0, 0, 0, 0, 0, hi, lo],
        false,
        true,
        edtl,
    )
}

fn data_out(itt: u32, ttt: u32, data_sn: u32, offset: u32, final_: bool) -> Bhs {
    Bhs::DataOut(wire::DataOut {
        final_,
        itt,
        ttt,
        data_sn,
        buffer_offset: offset,
        ..Default::default()
    })
}

fn tmf(itt: u32, cmd_sn: u32, function: u8, lun: u64, rtt: u32) -> Bhs {
    Bhs::TaskMgmtRequest(wire::TaskMgmtRequest {
        immediate: true,
        function: 0x80 | function,
        lun,
        itt,
        referenced_task_tag: rtt,
        cmd_sn,
        ..Default::default()
    })
}

fn logout(immediate: bool, reason: u8, itt: u32, cmd_sn: u32) -> Bhs {
    Bhs::LogoutRequest(wire::LogoutRequest {
        immediate,
        reason,
        itt,
        cmd_sn,
        ..Default::default()
    })
}

fn status_of(p: &Pdu) -> Option<(u32, u8, u32)> {
    match &p.bhs {
        Bhs::ScsiResponse(r) => Some((r.itt, r.status, r.stat_sn)),
        Bhs::DataIn(d) if d.status_present => Some((d.itt, d.status, d.stat_sn)),
        _ => None,
    }
}

/// `p` is a Reject with `reason`.
fn assert_rejected(p: &Pdu, reason: u8) {
    match &p.bhs {
        Bhs::Reject(r) => assert_eq!(r.reason, reason),
        other => panic!("expected a Reject (reason {reason:#04x}), got {other:?}"),
    }
}

fn r2ts(sent: &[Pdu]) -> Vec<wire::R2t> {
    sent.iter()
        .filter_map(|p| match &p.bhs {
            Bhs::R2t(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn lun_decoding() {
    assert_eq!(decode_lun(0), Some(0));
    assert_eq!(decode_lun(LUN1), Some(1));
    assert_eq!(decode_lun(0x4105_0000_0000_0000), Some(0x105));
    assert_eq!(decode_lun(0x8000_0000_0000_0000), None);
    assert_eq!(decode_lun(0x0101_0000_0000_0000), None, "bus 1 is not ours");
}

#[test]
fn stamping_consumes_statsn_only_for_status() {
    let mut sn = 10;
    let mut r2t = pdus::pdu(Bhs::R2t(wire::R2t::default()), Bytes::new());
    stamp(&mut r2t, &mut sn, 5, 9);
    assert_eq!(sn, 10);
    let mut resp = pdus::pdu(
        Bhs::ScsiResponse(wire::ScsiResponse::default()),
        Bytes::new(),
    );
    stamp(&mut resp, &mut sn, 5, 9);
    assert_eq!(sn, 11);
    let Bhs::ScsiResponse(h) = &resp.bhs else {
        unreachable!()
    };
    assert_eq!((h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn), (10, 5, 9));
    let mut ping = pdus::pdu(
        Bhs::NopIn(wire::NopIn {
            itt: RESERVED_TAG,
            ..Default::default()
        }),
        Bytes::new(),
    );
    stamp(&mut ping, &mut sn, 5, 9);
    assert_eq!(sn, 11, "an unsolicited NOP-In does not advance StatSN");
    let mut din = pdus::pdu(Bhs::DataIn(wire::DataIn::default()), Bytes::new());
    stamp(&mut din, &mut sn, 5, 9);
    assert_eq!(sn, 11);
}

#[test]
fn read_returns_data_in_with_collapsed_status_and_statsn() {
    let mut s = Sim::new();
    s.send(read10(7, 1, 4096), &[]);
    let ex = s.executes();
    assert_eq!(ex.len(), 1);
    assert_eq!((ex[0].itt, ex[0].lun, ex[0].data_in_len), (7, 0, 4096));
    let d = s.complete(
        ex[0].task,
        Outcome {
            data_in: Bytes::from(vec![0xab; 4096]),
            ..Default::default()
        },
    );
    assert_eq!(d, Delivery::Sent);
    let sent = s.take_sent();
    assert_eq!(sent.len(), 1, "one Data-In with status");
    assert_eq!(status_of(&sent[0]), Some((7, 0, 100)));
    let Bhs::DataIn(h) = &sent[0].bhs else {
        unreachable!()
    };
    assert_eq!((h.exp_cmd_sn, h.max_cmd_sn), (2, 5));
    assert!(matches!(s.events[..], [Event::Release(_)]));
}

#[test]
fn cmdsn_outside_window_is_ignored_and_gaps_are_held() {
    let mut s = Sim::new();
    s.send(tur(1, 50), &[]);
    s.send(tur(2, 0), &[]);
    assert!(
        s.executes().is_empty() && s.take_sent().is_empty(),
        "outside: dropped"
    );
    s.send(tur(3, 2), &[]);
    assert!(s.executes().is_empty(), "CmdSN 2 waits for 1");
    s.send(tur(4, 1), &[]);
    let ex = s.executes();
    assert_eq!(ex.iter().map(|e| e.itt).collect::<Vec<_>>(), [4, 3]);
    assert_eq!(s.conn.window().0, 3);
}

#[test]
fn duplicate_cmdsn_is_ignored() {
    let mut s = Sim::new();
    s.send(tur(1, 2), &[]);
    s.send(tur(9, 2), &[]);
    s.send(tur(2, 1), &[]);
    let ex = s.executes();
    assert_eq!(ex.iter().map(|e| e.itt).collect::<Vec<_>>(), [2, 1]);
    s.send(tur(3, 1), &[]);
    assert!(s.executes().is_empty(), "CmdSN 1 again: already delivered");
}

#[test]
fn immediate_command_bypasses_the_window() {
    let mut s = Sim::new();
    let Bhs::ScsiCommand(mut c) = tur(5, 77) else {
        unreachable!()
    };
    c.immediate = true;
    s.send(Bhs::ScsiCommand(c), &[]);
    let ex = s.executes();
    assert_eq!(ex.len(), 1);
    assert_eq!(s.conn.window().0, 1, "ExpCmdSN does not move");
}

#[test]
fn full_window_shrinks_maxcmdsn_until_completion() {
    let mut s = Sim::new();
    for i in 0..4 {
        s.send(tur(i, i + 1), &[]);
    }
    let ex = s.executes();
    assert_eq!(ex.len(), 4);
    assert_eq!(s.conn.window(), (5, 4), "no room: MaxCmdSN = ExpCmdSN - 1");
    s.send(tur(9, 5), &[]);
    assert!(s.executes().is_empty(), "beyond MaxCmdSN: ignored");
    s.good(ex[0].task);
    assert_eq!(s.conn.window(), (5, 5));
}

#[test]
fn reused_task_tag_is_rejected() {
    let mut s = Sim::new();
    s.send(tur(1, 1), &[]);
    s.send(tur(1, 2), &[]);
    let sent = s.take_sent();
    assert_rejected(&sent[0], reject_reason::TASK_IN_PROGRESS);
}

#[test]
fn write_is_solicited_by_r2t_in_bursts() {
    let mut s = Sim::new();
    s.send(write10(3, 1, 64), &[]); // 32 KiB, MaxBurst 16 KiB
    let r = r2ts(&s.take_sent());
    assert_eq!(r.len(), 1, "MaxOutstandingR2T=1");
    assert_eq!(
        (
            r[0].buffer_offset,
            r[0].desired_data_transfer_length,
            r[0].r2t_sn
        ),
        (0, 16384, 0)
    );
    s.send(data_out(3, r[0].ttt, 0, 0, false), &[1; 8192]);
    s.send(data_out(3, r[0].ttt, 1, 8192, true), &[2; 8192]);
    let r2 = r2ts(&s.take_sent());
    assert_eq!((r2[0].buffer_offset, r2[0].r2t_sn), (16384, 1));
    assert!(s.executes().is_empty());
    s.send(data_out(3, r2[0].ttt, 0, 16384, true), &[3; 16384]);
    let ex = s.executes();
    assert_eq!(ex[0].data_out.len(), 32768);
    assert_eq!(&ex[0].data_out[8190..8194], &[1, 1, 2, 2]);
    s.good(ex[0].task);
    let Bhs::ScsiResponse(h) = &s.take_sent()[0].bhs else {
        panic!("status")
    };
    assert_eq!((h.status, h.exp_data_sn, h.residual_count), (0, 2, 0));
}

#[test]
fn data_out_with_wrong_datasn_or_offset_fails_the_task() {
    for (data_sn, offset) in [(1, 0), (0, 512)] {
        let mut s = Sim::new();
        s.send(write10(3, 1, 8), &[]);
        let r = r2ts(&s.take_sent());
        s.send(data_out(3, r[0].ttt, data_sn, offset, true), &[0; 4096]);
        let sent = s.take_sent();
        assert_rejected(&sent[0], reject_reason::PROTOCOL_ERROR);
        assert_eq!(
            status_of(&sent[1]).map(|s| s.1),
            Some(status::CHECK_CONDITION)
        );
        assert_eq!(&sent[1].data[2..3], &[0x70], "fixed sense");
        assert_eq!((sent[1].data[4], sent[1].data[14]), (0x0b, 0x0c));
        assert!(s.executes().is_empty());
        assert_eq!(s.conn.window(), (2, 5), "the slot is free again");
    }
}

#[test]
fn data_out_for_unknown_task_is_rejected() {
    let mut s = Sim::new();
    s.send(data_out(42, 1, 0, 0, true), &[0; 512]);
    assert_rejected(&s.take_sent()[0], reject_reason::PROTOCOL_ERROR);
}

#[test]
fn unsolicited_data_beyond_first_burst_fails_the_command() {
    let mut cfg = config();
    cfg.write_limits.initial_r2t = false;
    cfg.write_limits.first_burst_length = 1024;
    let mut s = Sim::with(cfg, 1 << 20);
    s.send(write10(3, 1, 8), &[0; 2048]);
    let sent = s.take_sent();
    assert_eq!(
        status_of(&sent[0]).map(|s| s.1),
        Some(status::CHECK_CONDITION)
    );
    assert!(s.executes().is_empty());
}

#[test]
fn immediate_data_counts_and_r2t_asks_for_the_rest() {
    let mut cfg = config();
    cfg.write_limits.first_burst_length = 1024;
    let mut s = Sim::with(cfg, 1 << 20);
    s.send(write10(3, 1, 4), &[9; 1024]);
    let r = r2ts(&s.take_sent());
    assert_eq!(
        (r[0].buffer_offset, r[0].desired_data_transfer_length),
        (1024, 1024)
    );
    s.send(data_out(3, r[0].ttt, 0, 1024, true), &[8; 1024]);
    assert_eq!(s.executes()[0].data_out.len(), 2048);
}

#[test]
fn buffer_budget_exhausted_answers_busy() {
    let mut s = Sim::with(config(), 1000);
    s.send(read10(1, 1, 4096), &[]);
    let sent = s.take_sent();
    assert_eq!(status_of(&sent[0]).map(|s| s.1), Some(status::BUSY));
}

#[test]
fn command_beyond_max_command_bytes_is_refused() {
    let mut s = Sim::new();
    s.send(read10(1, 1, 2 << 20), &[]);
    let sent = s.take_sent();
    assert_eq!(
        status_of(&sent[0]).map(|s| s.1),
        Some(status::CHECK_CONDITION)
    );
    assert_eq!(sent[0].data[14], 0x24, "INVALID FIELD IN CDB");
}

fn ordered(itt: u32, cmd_sn: u32) -> Bhs {
    let Bhs::ScsiCommand(mut c) = tur(itt, cmd_sn) else {
        unreachable!()
    };
    c.attr = 2;
    Bhs::ScsiCommand(c)
}

/// An ORDERED task (ITT 1) and a SIMPLE one (ITT 2), submitted and not started.
fn ordered_then_simple(s: &mut Sim) -> Vec<Submit> {
    s.auto_start = false;
    s.send(ordered(1, 1), &[]);
    s.send(tur(2, 2), &[]);
    std::mem::take(&mut s.submitted)
}

/// [`ordered_then_simple`] with the ORDERED task started: the sim, both submissions
/// and the ORDERED task's execution.
fn ordered_started() -> (Sim, Vec<Submit>, Execute) {
    let mut s = Sim::new();
    let sub = ordered_then_simple(&mut s);
    s.start(sub[0].task);
    let ex = s.executes().remove(0);
    (s, sub, ex)
}

/// A SIMPLE task (ITT 1, CmdSN 1), submitted and not started.
fn one_waiting() -> (Sim, TaskId) {
    let mut s = Sim::new();
    s.auto_start = false;
    s.send(tur(1, 1), &[]);
    let task = s.submitted[0].task;
    (s, task)
}

fn running(task: TaskId) -> Aborted {
    Aborted {
        task,
        running: true,
    }
}

fn waiting(task: TaskId) -> Aborted {
    Aborted {
        task,
        running: false,
    }
}

#[test]
fn tasks_are_submitted_with_their_raw_attribute_and_run_when_started() {
    let mut s = Sim::new();
    let sub = ordered_then_simple(&mut s);
    assert_eq!(sub.iter().map(|x| x.attr).collect::<Vec<_>>(), [2, 1]);
    assert!(
        s.executes().is_empty(),
        "nothing runs before the task set says so"
    );
    assert!(s.start(sub[1].task));
    assert_eq!(s.executes()[0].itt, 2);
    assert!(!s.start(sub[1].task), "started once");
    assert!(!s.start(99), "unknown");
}

#[test]
fn abort_task_of_a_waiting_task_answers_at_once() {
    let (mut s, sub, ex) = ordered_started();
    s.send(tmf(10, 3, 1, 0, 2), &[]);
    assert!(
        s.take_sent().is_empty() && !s.conn.accepts_pdus(),
        "the core decides"
    );
    let req = s.tmfs[0];
    assert_eq!((req.function, req.task), (1, Some(sub[1].task)));
    s.decide(0, &[waiting(sub[1].task)]);
    let sent = s.take_sent();
    let Bhs::TaskMgmtResponse(t) = &sent[0].bhs else {
        panic!("TMF response")
    };
    assert_eq!((t.itt, t.response), (10, 0));
    s.good(ex.task);
    assert!(!s.start(sub[1].task), "the aborted task never starts");
    assert!(s.executes().is_empty());
    assert_eq!(s.conn.window(), (3, 6), "every slot is free again");
}

#[test]
fn abort_task_of_a_running_task_waits_and_suppresses_its_status() {
    let mut s = Sim::new();
    s.send(read10(1, 1, 512), &[]);
    let ex = s.executes();
    s.send(tmf(10, 2, 1, 0, 1), &[]);
    s.decide(0, &[running(ex[0].task)]);
    assert!(s.take_sent().is_empty(), "the TMF waits for the task");
    assert!(!s.conn.accepts_pdus());
    assert_eq!(s.conn.poll_timeout(), None, "no pings while blocked");
    s.send(tur(2, 2), &[]);
    assert!(s.executes().is_empty(), "held while the TMF waits");
    assert_eq!(s.good(ex[0].task), Delivery::Suppressed);
    let sent = s.take_sent();
    let Bhs::TaskMgmtResponse(t) = &sent[0].bhs else {
        panic!("TMF response, not {:?}", sent[0].bhs)
    };
    assert_eq!(t.response, 0);
    assert_eq!(s.executes().iter().map(|e| e.itt).collect::<Vec<_>>(), [2]);
}

#[test]
fn abort_task_of_unknown_tag_says_no_task() {
    let mut s = Sim::new();
    s.send(tmf(10, 1, 1, 0, 99), &[]);
    let Bhs::TaskMgmtResponse(t) = &s.take_sent()[0].bhs else {
        panic!()
    };
    assert_eq!(t.response, 1);
}

#[test]
fn abort_task_of_a_pending_write_drops_it() {
    let mut s = Sim::new();
    s.send(write10(3, 1, 8), &[]);
    let r = r2ts(&s.take_sent());
    s.send(tmf(10, 2, 1, 0, 3), &[]);
    let Bhs::TaskMgmtResponse(t) = &s.take_sent()[0].bhs else {
        panic!()
    };
    assert_eq!(t.response, 0);
    s.send(data_out(3, r[0].ttt, 0, 0, true), &[0; 4096]);
    assert_rejected(&s.take_sent()[0], reject_reason::PROTOCOL_ERROR);
}

#[test]
fn lun_reset_waits_for_the_tasks_the_core_aborted() {
    let mut s = Sim::new();
    s.send(cmd(1, 1, &[0], false, false, 0), &[]);
    let Bhs::ScsiCommand(mut c) = tur(2, 2) else {
        unreachable!()
    };
    c.lun = LUN1;
    s.send(Bhs::ScsiCommand(c), &[]);
    let ex = s.executes();
    s.send(tmf(10, 3, 5, LUN1, 0), &[]);
    assert_eq!((s.tmfs[0].function, s.tmfs[0].lun), (5, 1));
    s.decide(0, &[running(ex[1].task)]);
    assert!(s.take_sent().is_empty());
    assert_eq!(s.good(ex[0].task), Delivery::Sent, "LUN 0 is untouched");
    assert!(matches!(s.take_sent()[0].bhs, Bhs::ScsiResponse(_)));
    assert_eq!(s.good(ex[1].task), Delivery::Suppressed);
    assert!(matches!(s.take_sent()[0].bhs, Bhs::TaskMgmtResponse(_)));
}

#[test]
fn tmf_on_a_missing_lun_and_unsupported_functions() {
    let mut s = Sim::new();
    s.send(tmf(10, 1, 5, 0x0007_0000_0000_0000, 0), &[]);
    s.send(tmf(11, 1, 3, 0, 0), &[]);
    s.send(tmf(12, 1, 8, 0, 0), &[]);
    s.send(tmf(13, 1, 0x7f, 0, 0), &[]);
    let codes: Vec<u8> = s
        .take_sent()
        .iter()
        .map(|p| match &p.bhs {
            Bhs::TaskMgmtResponse(t) => t.response,
            _ => 0xee,
        })
        .collect();
    assert_eq!(codes, [2, 5, 4, 255]);
}

#[test]
fn target_cold_reset_closes_the_connection() {
    let mut s = Sim::new();
    s.send(tmf(10, 1, 7, 0, 0), &[]);
    assert!(!s.conn.is_closed(), "not before the core reset the LUs");
    s.decide(0, &[]);
    assert!(matches!(s.events[..], [Event::Close]));
    assert!(s.conn.is_closed());
}

#[test]
fn data_digest_error_on_a_command_rejects_and_fails_it_in_order() {
    let mut s = Sim::new();
    let digests = DigestConfig {
        header: true,
        data: true,
    };
    let mut raw = BytesMut::new();
    let mut w = Pdu {
        bhs: write10(3, 1, 1),
        ahs: Vec::new(),
        data: Bytes::from(vec![5; 512]),
    };
    if let Bhs::ScsiCommand(c) = &mut w.bhs {
        c.final_ = true;
    }
    wire::encode(&w, digests, &mut raw);
    let n = raw.len();
    raw[n - 10] ^= 0xff; // inside the data segment
    let mut dec = PduDecoder::new(65536);
    dec.digests = digests;
    let err = dec.decode(&mut raw).expect_err("digest mismatch");
    s.conn.handle_wire_error(err, s.now).expect("recoverable");
    s.drain();
    let sent = s.take_sent();
    assert_rejected(&sent[0], reject_reason::DATA_DIGEST_ERROR);
    let (itt, st, _) = status_of(&sent[1]).expect("status");
    assert_eq!(
        (itt, st, sent[1].data[14], sent[1].data[15]),
        (3, 2, 0x47, 0x05)
    );
    assert_eq!(s.conn.window().0, 2, "the command took its CmdSN");
}

#[test]
fn unknown_opcode_is_rejected_and_header_digest_error_is_fatal() {
    let mut s = Sim::new();
    let mut raw = BytesMut::from(&[0u8; 48][..]);
    raw[0] = 0x1f;
    let mut dec = PduDecoder::new(65536);
    let err = dec.decode(&mut raw).expect_err("unknown opcode");
    s.conn.handle_wire_error(err, s.now).expect("recoverable");
    s.drain();
    let sent = s.take_sent();
    assert_rejected(&sent[0], reject_reason::COMMAND_NOT_SUPPORTED);
    assert_eq!(sent[0].data[0], 0x1f);
    let fatal = s.conn.handle_wire_error(WireError::HeaderDigest, s.now);
    assert!(matches!(fatal, Err(ConnError::Framing(_))));
}

#[test]
fn snack_and_target_only_pdus_are_rejected() {
    let mut s = Sim::new();
    s.send(Bhs::SnackRequest(wire::SnackRequest::default()), &[]);
    s.send(Bhs::NopIn(wire::NopIn::default()), &[]);
    let sent = s.take_sent();
    assert_eq!(sent.len(), 2);
    assert_rejected(&sent[0], reject_reason::SNACK_REJECT);
    assert_rejected(&sent[1], reject_reason::PROTOCOL_ERROR);
}

#[test]
fn nop_out_ping_is_echoed_with_its_data() {
    let mut s = Sim::new();
    s.send(
        Bhs::NopOut(wire::NopOut {
            itt: 44,
            ttt: RESERVED_TAG,
            cmd_sn: 1,
            ..Default::default()
        }),
        b"ping",
    );
    let sent = s.take_sent();
    let Bhs::NopIn(n) = &sent[0].bhs else {
        panic!()
    };
    assert_eq!((n.itt, n.ttt, n.stat_sn), (44, RESERVED_TAG, 100));
    assert_eq!(&sent[0].data[..], b"ping");
    assert_eq!(s.conn.window(), (2, 5));
}

#[test]
fn idle_connection_is_pinged_and_dropped_without_an_answer() {
    let mut s = Sim::new();
    assert_eq!(s.conn.poll_timeout(), Some(s.t0 + Duration::from_secs(5)));
    s.advance(4).unwrap();
    assert!(s.take_sent().is_empty());
    s.advance(1).unwrap();
    let sent = s.take_sent();
    let Bhs::NopIn(n) = &sent[0].bhs else {
        panic!()
    };
    assert_eq!(n.itt, RESERVED_TAG);
    // Answered: back to the idle interval.
    s.send(
        Bhs::NopOut(wire::NopOut {
            itt: RESERVED_TAG,
            ttt: n.ttt,
            ..Default::default()
        }),
        &[],
    );
    s.advance(5).unwrap();
    assert_eq!(s.take_sent().len(), 1, "pinged again");
    s.advance(9).unwrap();
    assert!(matches!(s.advance(1), Err(ConnError::PingTimeout)));
}

#[test]
fn send_targets_continues_across_text_responses() {
    let mut cfg = config();
    cfg.max_send_segment = 512;
    let mut s = Sim::with(cfg, 1 << 20);
    let text = |itt, ttt, cmd_sn| {
        Bhs::TextRequest(wire::TextRequest {
            final_: true,
            itt,
            ttt,
            cmd_sn,
            ..Default::default()
        })
    };
    s.send(text(1, RESERVED_TAG, 1), b"SendTargets=All\0");
    let mut body = Vec::new();
    let mut cmd_sn = 2;
    loop {
        let sent = s.take_sent();
        let Bhs::TextResponse(t) = &sent[0].bhs else {
            panic!()
        };
        assert!(sent[0].data.len() <= 512);
        body.extend_from_slice(&sent[0].data);
        if t.final_ {
            assert_eq!(t.ttt, RESERVED_TAG);
            break;
        }
        assert!(t.continue_);
        s.send(text(1, t.ttt, cmd_sn), &[]);
        cmd_sn += 1;
    }
    assert!(cmd_sn > 3, "several responses");
    let pairs = wire::text::parse_text(&body).unwrap();
    assert_eq!(pairs.iter().filter(|(k, _)| k == "TargetName").count(), 40);
    s.send(text(2, 0x1234, cmd_sn), &[]);
    assert_rejected(&s.take_sent()[0], reject_reason::INVALID_PDU_FIELD);
}

#[test]
fn discovery_session_rejects_scsi_commands() {
    let mut cfg = config();
    cfg.discovery = true;
    let mut s = Sim::with(cfg, 1 << 20);
    s.send(tur(1, 1), &[]);
    assert_rejected(&s.take_sent()[0], reject_reason::PROTOCOL_ERROR);
    assert!(s.executes().is_empty());
}

#[test]
fn logout_waits_for_running_tasks_then_closes() {
    let mut s = Sim::new();
    s.send(read10(1, 1, 512), &[]);
    let ex = s.executes();
    s.send(logout(true, 0, 9, 2), &[]);
    assert!(s.take_sent().is_empty() && !s.conn.is_closed());
    assert_eq!(s.good(ex[0].task), Delivery::Suppressed);
    let sent = s.take_sent();
    let Bhs::LogoutResponse(l) = &sent[0].bhs else {
        panic!()
    };
    assert_eq!((l.itt, l.response), (9, 0));
    assert!(s.conn.is_closed());
    assert!(matches!(s.events.last(), Some(Event::Close)));
}

#[test]
fn logout_for_recovery_is_refused_and_the_connection_goes_on() {
    let mut s = Sim::new();
    s.send(logout(false, 2, 9, 1), &[]);
    let Bhs::LogoutResponse(l) = &s.take_sent()[0].bhs else {
        panic!()
    };
    assert_eq!(l.response, 2);
    assert!(!s.conn.is_closed());
}

#[test]
fn preempt_and_abort_suppresses_running_and_drops_waiting() {
    let (mut s, sub, ex) = ordered_started();
    let n = s
        .conn
        .abort_tasks(&[running(sub[0].task), waiting(sub[1].task)], s.now);
    assert_eq!(n, 1);
    assert_eq!(s.good(ex.task), Delivery::Suppressed);
    assert!(s.take_sent().is_empty() && s.executes().is_empty());
    assert_eq!(s.conn.running_tasks(), 0);
    assert_eq!(s.conn.window(), (3, 6));
}

#[test]
fn a_task_aborted_before_its_start_ends_when_the_task_set_starts_it() {
    let (mut s, task) = one_waiting();
    s.send(tmf(10, 2, 2, 0, 0), &[]);
    // The task set had started it (running) but the start had not arrived yet.
    s.decide(0, &[running(task)]);
    assert!(s.take_sent().is_empty(), "the TMF waits for it");
    assert!(!s.start(task), "nothing to execute");
    assert!(s.executes().is_empty());
    let Bhs::TaskMgmtResponse(t) = &s.take_sent()[0].bhs else {
        panic!()
    };
    assert_eq!(t.response, 0);
    s.send(tur(1, 2), &[]);
    assert_eq!(s.submitted.len(), 2, "the ITT is free again");
}

#[test]
fn a_decision_for_no_pending_tmf_is_ignored() {
    let mut s = Sim::new();
    s.conn.tmf_decided(77, 0, &[], s.now);
    s.drain();
    assert!(s.take_sent().is_empty() && s.conn.accepts_pdus());
}

#[test]
fn logout_drops_waiting_tasks_without_a_response() {
    let (mut s, task) = one_waiting();
    s.send(logout(true, 0, 9, 2), &[]);
    assert!(matches!(s.take_sent()[0].bhs, Bhs::LogoutResponse(_)));
    assert!(
        !s.start(task),
        "the task set's later start finds nothing to run"
    );
}

#[test]
fn a_write_returns_its_buffer_budget_before_its_status_leaves() {
    // Only Data-In is sent by reference; a write's buffer is free once it ran, so its
    // budget must not wait for the writer (an initiator that got GOOD may send at once).
    let mut s = Sim::new();
    s.send(write10(3, 1, 4), &[7; 2048]);
    let ex = s.executes();
    assert_eq!(ex.len(), 1);
    assert_eq!(s.complete(ex[0].task, Outcome::default()), Delivery::Sent);
    assert!(
        !s.events.iter().any(|e| matches!(e, Event::Release(_))),
        "no Release left for the writer"
    );
}
