//! Both sans-IO connections wired back to back (quinn-proto's `Pair`): an
//! [`InitiatorConnection`] and a [`TargetConnection`] exchange PDUs in memory under a
//! simulated clock, with a tiny in-memory disk answering the target's commands.

use super::initiator_conn::tests::params;
use super::initiator_conn::{
    tmf, CommandRequest, CommandResult, Event as IEvent, InitiatorConfig, InitiatorConnection, Itt,
    RequestError, Sequence,
};
use super::login::LoginParams;
use super::target_conn::{
    Aborted, ConnConfig, Event as TEvent, Execute, Hold, Outcome, TargetConnection, TargetContext,
    TmfRequest,
};
use super::transfer::WriteLimits;
use crate::wire::{Bhs, Pdu};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 512;

struct Ctx;

impl TargetContext for Ctx {
    fn lun_exists(&self, lun: u64) -> bool {
        lun == 0
    }
    fn data_out_length(&self, _lun: u64, cdb: &[u8]) -> u32 {
        match cdb[0] {
            0x2a => u32::from(u16::from_be_bytes([cdb[7], cdb[8]])) * BLOCK as u32,
            _ => 0,
        }
    }
    fn reserve_buffer(&self, _bytes: u32) -> Option<Hold> {
        Some(Box::new(()))
    }
    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        (0..200)
            .map(|i| format!("iqn.2026-01.test:disk{i:03}"))
            .filter(|n| which == "All" || which == n)
            .flat_map(|n| {
                [
                    ("TargetName".to_string(), n),
                    ("TargetAddress".to_string(), "10.0.0.1:3260,1".to_string()),
                ]
            })
            .collect()
    }
}

/// The target's side of the same login.
fn target_config(p: &LoginParams) -> ConnConfig {
    let s = &p.session;
    ConnConfig {
        discovery: false,
        first_cmd_sn: 1,
        announced_max_cmd_sn: 4,
        queue_depth: 4,
        first_stat_sn: 10,
        max_send_segment: p.connection.initiator_max_recv_data_segment_length,
        max_burst: s.max_burst_length,
        write_limits: WriteLimits::negotiated(s),
        max_command_bytes: 1 << 20,
        nop_interval: Duration::from_secs(5),
        nop_timeout: Duration::from_secs(10),
    }
}

struct Pair {
    ini: InitiatorConnection,
    tgt: TargetConnection,
    now: Instant,
    disk: Vec<u8>,
    /// Hold commands instead of answering them (to keep the window closed).
    hold: bool,
    held: Vec<Execute>,
    /// Every PDU each side sent.
    from_ini: Vec<Pdu>,
    from_tgt: Vec<Pdu>,
    events: Vec<IEvent>,
    target_closed: bool,
}

impl Pair {
    fn new(p: LoginParams) -> Self {
        let now = Instant::now();
        let seq = Sequence {
            cmd_sn: 1,
            exp_stat_sn: 10,
            exp_cmd_sn: 1,
            max_cmd_sn: 4,
        };
        let tgt = TargetConnection::new(target_config(&p), Arc::new(Ctx), now);
        Self {
            ini: InitiatorConnection::new(InitiatorConfig::new(p, seq), now),
            tgt,
            now,
            disk: (0..64 * BLOCK).map(|i| (i / 7) as u8).collect(),
            hold: false,
            held: Vec::new(),
            from_ini: Vec::new(),
            from_tgt: Vec::new(),
            events: Vec::new(),
            target_closed: false,
        }
    }

    /// Move PDUs both ways and run commands until nothing moves.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(p) = self.ini.poll_transmit() {
                self.from_ini.push(p.clone());
                self.tgt.handle_pdu(p, self.now);
                moved = true;
            }
            while let Some(e) = self.tgt.poll_event() {
                match e {
                    // The fake task set starts every task at once.
                    TEvent::Submit(t) => {
                        assert!(self.tgt.start_task(t.task, self.now));
                    }
                    TEvent::Execute(x) if self.hold => self.held.push(x),
                    TEvent::Execute(x) => self.execute(x),
                    TEvent::TaskManagement(r) => self.decide_tmf(r),
                    TEvent::Close => self.target_closed = true,
                    _ => {}
                }
                moved = true;
            }
            while let Some(p) = self.tgt.poll_transmit() {
                self.from_tgt.push(p.clone());
                self.ini.handle_pdu(p, self.now);
                moved = true;
            }
            while let Some(e) = self.ini.poll_event() {
                self.events.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    /// The fake device: READ(10), WRITE(10), anything else CHECK CONDITION.
    fn execute(&mut self, x: Execute) {
        let lba = u32::from_be_bytes([x.cdb[2], x.cdb[3], x.cdb[4], x.cdb[5]]) as usize * BLOCK;
        let len = usize::from(u16::from_be_bytes([x.cdb[7], x.cdb[8]])) * BLOCK;
        let outcome = match x.cdb[0] {
            0x28 => Outcome {
                data_in: Bytes::copy_from_slice(&self.disk[lba..lba + len]),
                ..Default::default()
            },
            0x2a => {
                self.disk[lba..lba + len].copy_from_slice(&x.data_out);
                Outcome::default()
            }
            _ => Outcome {
                status: 2,
                sense: Some(Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10])),
                ..Default::default()
            },
        };
        self.tgt.handle_outcome(x.task, outcome, self.now);
    }

    /// The fake SCSI core knows ABORT TASK only: the task is running when held.
    fn decide_tmf(&mut self, r: TmfRequest) {
        assert_eq!(r.function, tmf::ABORT_TASK);
        let aborted: Vec<Aborted> = r
            .task
            .map(|task| Aborted {
                task,
                running: self.held.iter().any(|x| x.task == task),
            })
            .into_iter()
            .collect();
        let response = if aborted.is_empty() { 1 } else { 0 };
        self.tgt.tmf_decided(r.itt, response, &aborted, self.now);
    }

    fn release_held(&mut self) {
        for x in std::mem::take(&mut self.held) {
            self.execute(x);
        }
        self.drive();
    }

    fn submit(&mut self, opcode: u8, lba: u32, blocks: u16, data_out: Bytes) -> Itt {
        let mut cdb = vec![opcode, 0];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&[0]);
        cdb.extend_from_slice(&blocks.to_be_bytes());
        cdb.push(0);
        let data_in_len = if opcode == 0x28 {
            u32::from(blocks) * BLOCK as u32
        } else {
            0
        };
        let s = self
            .ini
            .submit_command(CommandRequest {
                lun: 0,
                cdb: Bytes::from(cdb),
                data_out,
                data_in_len,
            })
            .unwrap();
        self.drive();
        s.itt
    }

    fn result(&self, itt: Itt) -> &Result<CommandResult, RequestError> {
        self.events
            .iter()
            .find_map(|e| match e {
                IEvent::CommandDone { itt: i, result } if *i == itt => Some(result),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no result for {itt}: {:?}", self.events))
    }

    /// The command `itt` completed with GOOD status.
    fn good(&self, itt: Itt) -> &CommandResult {
        let r = self.result(itt).as_ref().expect("completed");
        assert_eq!(r.status, 0, "GOOD status");
        r
    }

    fn has(&self, f: impl Fn(&IEvent) -> bool) -> bool {
        self.events.iter().any(f)
    }

    fn count_from_tgt(&self, f: impl Fn(&Bhs) -> bool) -> usize {
        self.from_tgt.iter().filter(|p| f(&p.bhs)).count()
    }
}

#[test]
fn read_spanning_bursts() {
    let mut pair = Pair::new(params(true, false));
    let itt = pair.submit(0x28, 2, 40, Bytes::new());
    let r = pair.good(itt);
    assert_eq!(&r.data[..], &pair.disk[2 * BLOCK..42 * BLOCK]);
    // 20 KiB over MaxRecvDataSegmentLength 8 KiB.
    assert!(pair.count_from_tgt(|b| matches!(b, Bhs::DataIn(_))) >= 3);
    assert!(!pair.ini.is_closed());
}

#[test]
fn write_solicited_by_r2t_only() {
    let mut pair = Pair::new(params(false, true));
    let data = Bytes::from(vec![0xab; 40 * BLOCK]);
    let itt = pair.submit(0x2a, 4, 40, data.clone());
    pair.good(itt);
    assert_eq!(&pair.disk[4 * BLOCK..44 * BLOCK], &data[..]);
    // MaxBurstLength 16 KiB: 20 KiB needs two R2Ts.
    assert_eq!(pair.count_from_tgt(|b| matches!(b, Bhs::R2t(_))), 2);
    assert!(pair.from_ini.iter().all(|p| p.data.len() <= 4096));
}

#[test]
fn write_with_immediate_and_unsolicited_data() {
    let mut pair = Pair::new(params(true, false));
    let data: Bytes = (0..40 * BLOCK).map(|i| (i % 251) as u8).collect();
    let itt = pair.submit(0x2a, 0, 40, data.clone());
    pair.good(itt);
    assert_eq!(&pair.disk[..40 * BLOCK], &data[..]);
    assert_eq!(pair.from_ini[0].data.len(), 4096, "immediate data");
    // FirstBurst 8 KiB went unsolicited; the remaining 12 KiB took one R2T.
    assert_eq!(pair.count_from_tgt(|b| matches!(b, Bhs::R2t(_))), 1);
}

#[test]
fn cmd_sn_window_closes_and_opens() {
    let mut pair = Pair::new(params(true, false));
    pair.hold = true;
    let itts: Vec<Itt> = (0..7)
        .map(|i| pair.submit(0x28, i, 1, Bytes::new()))
        .collect();
    assert_eq!(pair.held.len(), 4, "queue depth 4 runs four");
    assert!(!pair.ini.window_open(), "the rest wait for MaxCmdSN");
    let sent = |pair: &Pair| {
        pair.from_ini
            .iter()
            .filter(|p| matches!(p.bhs, Bhs::ScsiCommand(_)))
            .count()
    };
    assert_eq!(sent(&pair), 4);
    pair.release_held();
    assert_eq!(sent(&pair), 7);
    pair.release_held();
    for itt in itts {
        pair.good(itt);
    }
    assert!(pair.ini.window_open());
}

#[test]
fn nop_ping_both_ways() {
    let mut pair = Pair::new(params(true, false));
    let itt = pair.ini.ping(pair.now).unwrap();
    pair.now += Duration::from_millis(3);
    pair.drive();
    assert!(pair.has(|e| matches!(e, IEvent::NopDone { itt: i, result: Ok(_) } if *i == itt)));
    // The target pings an idle initiator, which answers; no timeout follows.
    for _ in 0..4 {
        pair.now += Duration::from_secs(6);
        pair.tgt.handle_timeout(pair.now).unwrap();
        pair.drive();
    }
    assert_eq!(pair.count_from_tgt(|b| matches!(b, Bhs::NopIn(_))), 5);
    assert!(!pair.ini.is_closed());
}

#[test]
fn abort_task() {
    let mut pair = Pair::new(params(true, false));
    pair.hold = true;
    let victim = pair.submit(0x28, 0, 1, Bytes::new());
    let cmd_sn = 1;
    let tmf_itt = pair
        .ini
        .task_management(tmf::ABORT_TASK, 0, victim, cmd_sn)
        .unwrap();
    pair.drive();
    // The TMF answer waits for the running task, which then ends unanswered.
    pair.hold = false;
    pair.release_held();
    assert!(pair.has(
        |e| matches!(e, IEvent::TmfDone { itt, result: Ok(crate::wire::tmf_response::COMPLETE) } if *itt == tmf_itt)
    ));
    assert_eq!(pair.result(victim), &Err(RequestError::Aborted));
    // The connection goes on.
    let next = pair.submit(0x28, 0, 1, Bytes::new());
    assert!(pair.result(next).is_ok());
}

#[test]
fn check_condition_carries_sense() {
    let mut pair = Pair::new(params(true, false));
    let itt = pair.submit(0x12, 0, 0, Bytes::new());
    let r = pair.result(itt).as_ref().unwrap();
    assert_eq!(r.status, 2);
    assert_eq!(r.sense.as_deref().map(|s| s[2]), Some(5));
}

#[test]
fn text_send_targets_across_pdus() {
    let mut pair = Pair::new(params(true, false));
    let itt = pair
        .ini
        .text(Bytes::from_static(b"SendTargets=All\0"))
        .unwrap();
    pair.drive();
    let body = pair
        .events
        .iter()
        .find_map(|e| match e {
            IEvent::TextDone { itt: i, result } if *i == itt => Some(result.clone().unwrap()),
            _ => None,
        })
        .unwrap();
    let pairs = crate::wire::text::parse_text(&body).unwrap();
    assert_eq!(pairs.len(), 400);
    assert!(pair.count_from_tgt(|b| matches!(b, Bhs::TextResponse(_))) > 1);
}

#[test]
fn logout_after_commands() {
    let mut pair = Pair::new(params(true, false));
    pair.hold = true;
    let itt = pair.submit(0x28, 0, 1, Bytes::new());
    let lo = pair.ini.logout().unwrap();
    pair.drive();
    assert!(!pair
        .from_ini
        .iter()
        .any(|p| matches!(p.bhs, Bhs::LogoutRequest(_))));
    pair.hold = false;
    pair.release_held();
    assert!(pair.result(itt).is_ok());
    assert!(pair.has(|e| matches!(e, IEvent::LogoutDone { itt, result: Ok(()) } if *itt == lo)));
    assert!(matches!(
        pair.events.last(),
        Some(IEvent::Closed { error: None })
    ));
    assert!(pair.target_closed);
}
