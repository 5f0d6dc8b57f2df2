//! The initiator's full-feature connection (`iscsi::initiator_conn`) driven by arbitrary
//! requests, arbitrary target PDUs (tags picked among those in use, or raw), decode
//! errors, clock ticks and disconnects.
//!
//! Checks: no panic; every request is answered exactly once (a completion, or a failure
//! when the connection closes) and nothing is reported after `Closed`; ordered requests
//! leave with consecutive CmdSNs, never beyond the MaxCmdSN the target announced.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use holdfast::iscsi::cmdsn::sn_le;
use holdfast::iscsi::initiator_conn::{
    CommandRequest, InitiatorConfig, InitiatorConnection, Sequence,
};
use holdfast::iscsi::login::{ConnectionParams, LoginParams, SessionParams};
use holdfast::wire::{self, Bhs, Pdu, WireError, RESERVED_TAG};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        len: u16,
    },
    Write {
        len: u16,
    },
    Ping,
    Tmf {
        function: u8,
        which: u8,
    },
    Text {
        len: u8,
    },
    Logout,
    DataIn {
        which: u8,
        offset: u16,
        len: u16,
        status: bool,
        under: bool,
        count: u16,
    },
    Response {
        which: u8,
        response: u8,
        status: u8,
        sense: Vec<u8>,
    },
    R2t {
        which: u8,
        offset: u16,
        len: u16,
        ttt: u32,
    },
    NopIn {
        which: Option<u8>,
        ttt: bool,
        data: Vec<u8>,
    },
    TmfResponse {
        which: u8,
        response: u8,
    },
    TextResponse {
        which: u8,
        more: bool,
        data: Vec<u8>,
    },
    LogoutResponse {
        which: u8,
        response: u8,
    },
    Reject {
        which: u8,
        reason: u8,
    },
    Async {
        event: u8,
    },
    Login,
    DigestError {
        which: u8,
    },
    Framing,
    Tick(u8),
    Disconnect,
}

#[derive(Arbitrary, Debug)]
struct Input {
    immediate_data: bool,
    initial_r2t: bool,
    max_cmd_sn: u8,
    first_burst: u16,
    max_burst: u16,
    segment: u16,
    /// Stamp the StatSN the connection expects (else an arbitrary one).
    in_order: bool,
    /// Window moves the target announces, relative to what it knows.
    window: Vec<i8>,
    ops: Vec<Op>,
}

struct Checker {
    issued: Vec<u32>,
    answered: HashSet<u32>,
    closed: bool,
    next_cmd_sn: u32,
    max_cmd_sn: u32,
}

impl Checker {
    fn drain(&mut self, c: &mut InitiatorConnection) {
        while let Some(p) = c.poll_transmit() {
            let sn = match &p.bhs {
                Bhs::ScsiCommand(h) if !h.immediate => Some(h.cmd_sn),
                Bhs::TextRequest(h) if !h.immediate => Some(h.cmd_sn),
                _ => None,
            };
            if let Some(sn) = sn {
                assert_eq!(sn, self.next_cmd_sn, "ordered requests skip a CmdSN");
                assert!(sn_le(sn, self.max_cmd_sn), "sent beyond MaxCmdSN");
                self.next_cmd_sn = sn.wrapping_add(1);
            }
        }
        while let Some(e) = c.poll_event() {
            assert!(!self.closed, "event after Closed: {e:?}");
            match e.itt() {
                Some(itt) => assert!(self.answered.insert(itt), "request {itt} answered twice"),
                None => self.closed = true,
            }
        }
    }
}

fn pick(ck: &Checker, which: u8) -> u32 {
    if ck.issued.is_empty() || which >= 250 {
        u32::from(which)
    } else {
        ck.issued[usize::from(which) % ck.issued.len()]
    }
}

fn params(i: &Input) -> LoginParams {
    let max_burst = u32::from(i.max_burst).max(512);
    LoginParams {
        session: SessionParams {
            initial_r2t: i.initial_r2t,
            immediate_data: i.immediate_data,
            max_burst_length: max_burst,
            first_burst_length: u32::from(i.first_burst).clamp(512, max_burst),
            ..Default::default()
        },
        connection: ConnectionParams {
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: u32::from(i.segment).max(512),
        },
        tsih: 1,
        target_portal_group_tag: None,
        target_alias: None,
    }
}

/// A request from the host side; returns its tag when accepted.
fn request(c: &mut InitiatorConnection, op: &Op, ck: &Checker, now: Instant) -> Option<u32> {
    let cmd = |opcode: u8, out: u16, inn: u16| CommandRequest {
        lun: 0,
        cdb: Bytes::from(vec![opcode; 10]),
        data_out: Bytes::from(vec![9; usize::from(out)]),
        data_in_len: u32::from(inn),
    };
    match op {
        Op::Read { len } => c.submit_command(cmd(0x28, 0, *len)).ok().map(|s| s.itt),
        Op::Write { len } => c.submit_command(cmd(0x2a, *len, 0)).ok().map(|s| s.itt),
        Op::Ping => c.ping(now).ok(),
        Op::Tmf { function, which } => c.task_management(function % 8, 0, pick(ck, *which), 0).ok(),
        Op::Text { len } => c.text(Bytes::from(vec![b'a'; usize::from(*len)])).ok(),
        Op::Logout => c.logout().ok(),
        _ => None,
    }
}

/// A PDU from the target for `op`, stamped with `stat_sn` and the window.
fn target_pdu(op: Op, ck: &Checker, stat_sn: u32, exp: u32, max: u32) -> Option<Pdu> {
    let p = |bhs: Bhs, data: Vec<u8>| Some(Pdu::with_data(bhs, Bytes::from(data)));
    match op {
        Op::DataIn {
            which,
            offset,
            len,
            status,
            under,
            count,
        } => p(
            Bhs::DataIn(wire::DataIn {
                final_: status,
                status_present: status,
                underflow: under,
                residual_count: u32::from(count),
                itt: pick(ck, which),
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                buffer_offset: u32::from(offset),
                ..Default::default()
            }),
            vec![5; usize::from(len % 9000)],
        ),
        Op::Response {
            which,
            response,
            status,
            sense,
        } => p(
            Bhs::ScsiResponse(wire::ScsiResponse {
                response: response % 2,
                status,
                itt: pick(ck, which),
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            }),
            sense,
        ),
        Op::R2t {
            which,
            offset,
            len,
            ttt,
        } => p(
            Bhs::R2t(wire::R2t {
                itt: pick(ck, which),
                ttt,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                buffer_offset: u32::from(offset),
                desired_data_transfer_length: u32::from(len),
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::NopIn { which, ttt, data } => p(
            Bhs::NopIn(wire::NopIn {
                itt: which.map_or(RESERVED_TAG, |w| pick(ck, w)),
                ttt: if ttt { 7 } else { RESERVED_TAG },
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            }),
            data,
        ),
        Op::TmfResponse { which, response } => p(
            Bhs::TaskMgmtResponse(wire::TaskMgmtResponse {
                response: response % 3,
                itt: pick(ck, which),
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            }),
            Vec::new(),
        ),
        Op::TextResponse { which, more, data } => p(
            Bhs::TextResponse(wire::TextResponse {
                final_: !more,
                continue_: more,
                itt: pick(ck, which),
                ttt: if more { 3 } else { RESERVED_TAG },
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            }),
            data,
        ),
        Op::LogoutResponse { which, response } => p(
            Bhs::LogoutResponse(wire::LogoutResponse {
                response: response % 3,
                itt: pick(ck, which),
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::Reject { which, reason } => {
            let mut header = vec![0u8; 48];
            header[16..20].copy_from_slice(&pick(ck, which).to_be_bytes());
            p(
                Bhs::Reject(wire::Reject {
                    reason,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: max,
                    ..Default::default()
                }),
                header,
            )
        }
        Op::Async { event } => p(
            Bhs::AsyncMessage(wire::AsyncMessage {
                async_event: event,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                ..Default::default()
            }),
            Vec::new(),
        ),
        Op::Login => p(
            Bhs::LoginResponse(wire::LoginResponse::default()),
            Vec::new(),
        ),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let first_max = u32::from(input.max_cmd_sn % 8);
    let seq = Sequence {
        cmd_sn: 1,
        exp_stat_sn: 1,
        exp_cmd_sn: 1,
        max_cmd_sn: first_max,
    };
    let mut cfg = InitiatorConfig::new(params(&input), seq);
    cfg.nop_interval = Some(Duration::from_secs(5));
    let mut now = Instant::now();
    let mut c = InitiatorConnection::new(cfg, now);
    let mut ck = Checker {
        issued: Vec::new(),
        answered: HashSet::new(),
        closed: false,
        next_cmd_sn: 1,
        max_cmd_sn: first_max,
    };
    let mut moves = input.window.iter().cycle();
    let mut exp = 1u32;
    for op in input.ops {
        if let Some(itt) = request(&mut c, &op, &ck, now) {
            assert!(!ck.closed, "a request accepted after Closed");
            ck.issued.push(itt);
        } else {
            let (_, _, want) = c.sequence();
            let stat_sn = if input.in_order { want } else { want ^ 1 };
            exp = exp.wrapping_add(1);
            let d = moves.next().copied().unwrap_or(0);
            let max = exp.wrapping_add(d as i32 as u32);
            match op {
                Op::DigestError { which } => {
                    let bhs = Bhs::DataIn(wire::DataIn {
                        itt: pick(&ck, which),
                        ..Default::default()
                    });
                    c.handle_wire_error(WireError::DataDigest { bhs: Box::new(bhs) }, now);
                }
                Op::Framing => c.handle_wire_error(WireError::HeaderDigest, now),
                Op::Tick(s) => {
                    now += Duration::from_secs(u64::from(s % 8));
                    c.handle_timeout(now);
                }
                Op::Disconnect => c.handle_disconnect(),
                op => {
                    if let Some(p) = target_pdu(op, &ck, stat_sn, exp, max) {
                        c.handle_pdu(p, now);
                    }
                }
            }
            // What the initiator may use now (it ignores MaxCmdSN < ExpCmdSN - 1).
            let (_, m, _) = c.sequence();
            ck.max_cmd_sn = m;
        }
        ck.drain(&mut c);
    }
    c.handle_disconnect();
    ck.drain(&mut c);
    assert!(ck.closed, "no Closed after a disconnect");
    for itt in &ck.issued {
        assert!(ck.answered.contains(itt), "request {itt} never answered");
    }
});
