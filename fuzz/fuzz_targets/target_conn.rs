//! The target's full-feature connection (`iscsi::target_conn`) driven by arbitrary PDU
//! sequences, decode errors, command outcomes, aborts and clock ticks. Submitted tasks
//! start at once (a task set that holds nothing back); a TMF is decided by aborting the
//! running tasks it names.
//!
//! Checks: no panic; every status-bearing PDU takes the next StatSN; MaxCmdSN never
//! moves back and stays at least ExpCmdSN - 1; a task id is executed once and only
//! reported while running; after `abort_all` and reporting what runs, nothing is left.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use holdfast::iscsi::cmdsn::sn_lt;
use holdfast::iscsi::target_conn::{
    Aborted, ConnConfig, Event, Hold, Outcome, TargetConnection, TargetContext, TmfRequest,
};
use holdfast::iscsi::transfer::WriteLimits;
use holdfast::wire::{self, Bhs, Pdu, WireError, RESERVED_TAG};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Ctx {
    budget_ok: bool,
}

impl TargetContext for Ctx {
    fn lun_exists(&self, lun: u64) -> bool {
        lun < 2
    }
    fn data_out_length(&self, _lun: u64, cdb: &[u8]) -> u32 {
        u32::from(cdb[8]) * 512
    }
    fn reserve_buffer(&self, bytes: u32) -> Option<Hold> {
        (self.budget_ok || bytes < 4096).then(|| Box::new(()) as Hold)
    }
    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        (0..20)
            .map(|i| ("TargetName".to_string(), format!("iqn.t:{which}{i}")))
            .collect()
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Command {
        immediate: bool,
        sn: i8,
        itt: u8,
        read: bool,
        write: bool,
        final_: bool,
        attr: u8,
        lun: u8,
        blocks: u8,
        edtl: u16,
        immediate_data: u16,
    },
    DataOut {
        itt: u8,
        /// Index of an R2T seen, or a raw TTT.
        ttt: Result<u8, u32>,
        data_sn: u8,
        offset: u16,
        len: u16,
        final_: bool,
    },
    Outcome {
        which: u8,
        status: u8,
        sense: bool,
        data_in: u16,
    },
    Tmf {
        immediate: bool,
        sn: i8,
        function: u8,
        lun: u8,
        rtt: u8,
    },
    Text {
        sn: i8,
        /// Continue the last response's TTT, or start over.
        cont: bool,
        body: Vec<u8>,
    },
    Nop {
        sn: i8,
        itt: u8,
        ttt: bool,
    },
    Logout {
        sn: i8,
        reason: u8,
    },
    Snack,
    DigestError {
        on_command: bool,
        itt: u8,
        sn: i8,
    },
    UnknownOpcode(u8),
    Tick(u8),
    AbortLun(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    discovery: bool,
    initial_r2t: bool,
    budget_ok: bool,
    depth: u8,
    first_cmd_sn: u32,
    first_burst: u16,
    max_burst: u16,
    max_r2t: u8,
    segment: u16,
    ops: Vec<Op>,
}

struct Checker {
    stat_sn: u32,
    max_cmd_sn: u32,
    r2t_ttts: Vec<u32>,
    text_ttt: u32,
    executed: HashSet<u64>,
    /// Running tasks and their LUNs.
    running: Vec<(u64, u64)>,
}

impl Checker {
    fn drain(&mut self, c: &mut TargetConnection, now: Instant) {
        loop {
            while let Some(p) = c.poll_transmit() {
                self.check(&p);
            }
            let Some(e) = c.poll_event() else {
                return;
            };
            match e {
                Event::Submit(s) => {
                    c.start_task(s.task, now);
                }
                Event::Execute(x) => {
                    assert!(
                        self.executed.insert(x.task),
                        "task {} executed twice",
                        x.task
                    );
                    self.running.push((x.task, x.lun));
                }
                Event::TaskManagement(t) => {
                    let aborted = self.aborted_by(&t);
                    c.tmf_decided(t.itt, 0, &aborted, now);
                }
                _ => {}
            }
        }
    }
    /// The running tasks a TMF aborts.
    fn aborted_by(&self, t: &TmfRequest) -> Vec<Aborted> {
        self.running
            .iter()
            .filter(|(task, lun)| match t.function {
                1 => t.task == Some(*task),
                6 | 7 => true,
                _ => *lun == t.lun,
            })
            .map(|(task, _)| Aborted {
                task: *task,
                running: true,
            })
            .collect()
    }
    fn check(&mut self, p: &Pdu) {
        let (stat_sn, exp, max, consumes) = match &p.bhs {
            Bhs::ScsiResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Bhs::TaskMgmtResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Bhs::LogoutResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Bhs::Reject(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Bhs::TextResponse(h) => {
                self.text_ttt = h.ttt;
                (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true)
            }
            Bhs::NopIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, h.itt != RESERVED_TAG),
            Bhs::DataIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, h.status_present),
            Bhs::R2t(h) => {
                self.r2t_ttts.push(h.ttt);
                (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, false)
            }
            other => panic!("the target sent {other:?}"),
        };
        if consumes {
            assert_eq!(stat_sn, self.stat_sn, "StatSN out of sequence");
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        assert!(!sn_lt(max, self.max_cmd_sn), "MaxCmdSN moved back");
        assert!(
            !sn_lt(max.wrapping_add(1), exp),
            "MaxCmdSN below ExpCmdSN - 1"
        );
        self.max_cmd_sn = max;
    }
}

fn pdu(bhs: Bhs, data: Vec<u8>) -> Pdu {
    Pdu {
        bhs,
        ahs: Vec::new(),
        data: Bytes::from(data),
    }
}

fn lun_field(lun: u8) -> u64 {
    u64::from(lun % 4) << 48
}

fn request(op: Op, exp: u32, ck: &Checker) -> Option<Pdu> {
    let sn = |d: i8| exp.wrapping_add(d as i32 as u32);
    Some(match op {
        Op::Command {
            immediate,
            sn: d,
            itt,
            read,
            write,
            final_,
            attr,
            lun,
            blocks,
            edtl,
            immediate_data,
        } => {
            let mut cdb = [0u8; 16];
            cdb[0] = if write { 0x2a } else { 0x28 };
            cdb[8] = blocks;
            pdu(
                Bhs::ScsiCommand(wire::ScsiCommand {
                    immediate,
                    final_,
                    read,
                    write,
                    attr,
                    lun: lun_field(lun),
                    itt: u32::from(itt % 16),
                    expected_data_transfer_length: u32::from(edtl),
                    cmd_sn: sn(d),
                    cdb,
                    ..Default::default()
                }),
                vec![7; usize::from(immediate_data % 9000)],
            )
        }
        Op::DataOut {
            itt,
            ttt,
            data_sn,
            offset,
            len,
            final_,
        } => {
            let ttt = match ttt {
                Ok(i) if !ck.r2t_ttts.is_empty() => ck.r2t_ttts[usize::from(i) % ck.r2t_ttts.len()],
                Ok(_) => RESERVED_TAG,
                Err(t) => t,
            };
            pdu(
                Bhs::DataOut(wire::DataOut {
                    final_,
                    itt: u32::from(itt % 16),
                    ttt,
                    data_sn: u32::from(data_sn),
                    buffer_offset: u32::from(offset),
                    ..Default::default()
                }),
                vec![1; usize::from(len % 9000)],
            )
        }
        Op::Tmf {
            immediate,
            sn: d,
            function,
            lun,
            rtt,
        } => pdu(
            Bhs::TaskMgmtRequest(wire::TaskMgmtRequest {
                immediate,
                function: 0x80 | function,
                lun: lun_field(lun),
                itt: 0x100 + u32::from(rtt),
                referenced_task_tag: u32::from(rtt % 16),
                cmd_sn: sn(d),
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::Text { sn: d, cont, body } => pdu(
            Bhs::TextRequest(wire::TextRequest {
                final_: true,
                itt: 0x200,
                ttt: if cont { ck.text_ttt } else { RESERVED_TAG },
                cmd_sn: sn(d),
                ..Default::default()
            }),
            body,
        ),
        Op::Nop { sn: d, itt, ttt } => pdu(
            Bhs::NopOut(wire::NopOut {
                itt: if itt == 0 {
                    RESERVED_TAG
                } else {
                    0x300 + u32::from(itt)
                },
                ttt: if ttt { 1 } else { RESERVED_TAG },
                cmd_sn: sn(d),
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::Logout { sn: d, reason } => pdu(
            Bhs::LogoutRequest(wire::LogoutRequest {
                reason: reason % 4,
                itt: 0x400,
                cmd_sn: sn(d),
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::Snack => pdu(Bhs::SnackRequest(wire::SnackRequest::default()), Vec::new()),
        _ => return None,
    })
}

fuzz_target!(|input: Input| {
    let cfg = ConnConfig {
        discovery: input.discovery,
        first_cmd_sn: input.first_cmd_sn,
        announced_max_cmd_sn: input.first_cmd_sn.wrapping_add(31),
        queue_depth: u32::from(input.depth % 64).max(1),
        first_stat_sn: 1,
        max_send_segment: u32::from(input.segment).max(512),
        max_burst: u32::from(input.max_burst).max(512),
        write_limits: WriteLimits {
            initial_r2t: input.initial_r2t,
            first_burst_length: u32::from(input.first_burst).max(512),
            max_burst_length: u32::from(input.max_burst).max(512),
            max_outstanding_r2t: u32::from(input.max_r2t % 4).max(1),
        },
        max_command_bytes: 60_000,
        nop_interval: Duration::from_secs(5),
        nop_timeout: Duration::from_secs(5),
    };
    let t0 = Instant::now();
    let mut now = t0;
    let ctx = Arc::new(Ctx {
        budget_ok: input.budget_ok,
    });
    let mut c = TargetConnection::new(cfg, ctx, t0);
    let mut ck = Checker {
        stat_sn: 1,
        max_cmd_sn: input.first_cmd_sn.wrapping_add(31),
        r2t_ttts: Vec::new(),
        text_ttt: RESERVED_TAG,
        executed: HashSet::new(),
        running: Vec::new(),
    };
    for op in input.ops {
        let exp = c.window().0;
        match op {
            Op::Outcome {
                which,
                status,
                sense,
                data_in,
            } => {
                if ck.running.is_empty() {
                    continue;
                }
                let (task, _) = ck.running.remove(usize::from(which) % ck.running.len());
                let o = Outcome {
                    status,
                    sense: sense.then(|| Bytes::from_static(&[0x70, 0, 5, 0, 0, 0, 0, 10])),
                    data_in: Bytes::from(vec![3; usize::from(data_in)]),
                };
                c.handle_outcome(task, o, now);
            }
            Op::Tick(s) => {
                now += Duration::from_secs(u64::from(s % 8));
                if c.handle_timeout(now).is_err() {
                    break;
                }
            }
            Op::AbortLun(l) => {
                let lun = u64::from(l % 3);
                let list: Vec<Aborted> = ck
                    .running
                    .iter()
                    .filter(|(_, l)| *l == lun)
                    .map(|(task, _)| Aborted {
                        task: *task,
                        running: true,
                    })
                    .collect();
                c.abort_tasks(&list, now);
            }
            Op::DigestError {
                on_command,
                itt,
                sn,
            } => {
                let bhs = if on_command {
                    Bhs::ScsiCommand(wire::ScsiCommand {
                        write: true,
                        final_: true,
                        itt: u32::from(itt % 16),
                        cmd_sn: exp.wrapping_add(sn as i32 as u32),
                        expected_data_transfer_length: 512,
                        ..Default::default()
                    })
                } else {
                    Bhs::DataOut(wire::DataOut {
                        itt: u32::from(itt % 16),
                        ..Default::default()
                    })
                };
                let e = WireError::DataDigest { bhs: Box::new(bhs) };
                c.handle_wire_error(e, now)
                    .expect("a data digest error is recoverable");
            }
            Op::UnknownOpcode(o) => {
                let mut header = Box::new([0u8; 48]);
                header[0] = o;
                let e = WireError::UnknownOpcode {
                    opcode: o,
                    itt: 0,
                    header,
                };
                c.handle_wire_error(e, now)
                    .expect("an unknown opcode is recoverable");
            }
            op => {
                if let Some(p) = request(op, exp, &ck) {
                    c.handle_pdu(p, now);
                }
            }
        }
        ck.drain(&mut c, now);
    }
    c.abort_all();
    for (task, _) in std::mem::take(&mut ck.running) {
        c.handle_outcome(task, Outcome::default(), now);
    }
    ck.drain(&mut c, now);
    assert_eq!(c.running_tasks(), 0, "tasks left after the end");
    assert!(ck.running.is_empty(), "nothing starts after abort_all");
});
