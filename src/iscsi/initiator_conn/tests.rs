//! The initiator connection alone, fed hand-built target PDUs: the happy paths the
//! pair tests cover end to end, and hostile input that must end in typed errors.

use super::*;
use crate::iscsi::login::{ConnectionParams, SessionParams};
use crate::wire;

pub(crate) fn params(immediate_data: bool, initial_r2t: bool) -> LoginParams {
    LoginParams {
        session: SessionParams {
            initial_r2t,
            immediate_data,
            max_burst_length: 16_384,
            first_burst_length: 8_192,
            ..Default::default()
        },
        connection: ConnectionParams {
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 8_192,
            target_max_recv_data_segment_length: 4_096,
        },
        tsih: 1,
        target_portal_group_tag: Some(1),
        target_alias: None,
    }
}

struct Sim {
    conn: InitiatorConnection,
    now: Instant,
    /// Next StatSN the fake target stamps.
    stat_sn: u32,
    sent: Vec<Pdu>,
    events: Vec<Event>,
}

impl Sim {
    fn new() -> Self {
        Self::with(params(true, false), 4)
    }
    fn with(params: LoginParams, max_cmd_sn: u32) -> Self {
        let now = Instant::now();
        let seq = Sequence {
            cmd_sn: 1,
            exp_stat_sn: 10,
            exp_cmd_sn: 1,
            max_cmd_sn,
        };
        let mut cfg = InitiatorConfig::new(params, seq);
        cfg.nop_interval = Some(Duration::from_secs(5));
        Self {
            conn: InitiatorConnection::new(cfg, now),
            now,
            stat_sn: 10,
            sent: Vec::new(),
            events: Vec::new(),
        }
    }
    fn drain(&mut self) {
        while let Some(p) = self.conn.poll_transmit() {
            self.sent.push(p);
        }
        while let Some(e) = self.conn.poll_event() {
            self.events.push(e);
        }
    }
    fn feed(&mut self, bhs: Bhs, data: &[u8]) {
        self.conn
            .handle_pdu(Pdu::with_data(bhs, Bytes::copy_from_slice(data)), self.now);
        self.drain();
    }
    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn += 1;
        s
    }
    fn read(&mut self, len: u32) -> Itt {
        self.submit(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], Bytes::new(), len)
    }
    fn write(&mut self, len: usize) -> Itt {
        self.submit(
            &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            Bytes::from(vec![0x5a; len]),
            0,
        )
    }
    fn submit(&mut self, cdb: &'static [u8], data_out: Bytes, data_in_len: u32) -> Itt {
        let itt = self
            .conn
            .submit_command(CommandRequest {
                lun: 0,
                cdb: Bytes::from_static(cdb),
                data_out,
                data_in_len,
            })
            .unwrap()
            .itt;
        self.drain();
        itt
    }
    fn data_in(&mut self, itt: Itt, offset: u32, len: usize, status: bool, max: u32) {
        let stat_sn = if status { self.next_stat_sn() } else { 0 };
        self.feed(
            Bhs::DataIn(wire::DataIn {
                final_: status,
                status_present: status,
                itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: 2,
                max_cmd_sn: max,
                buffer_offset: offset,
                ..Default::default()
            }),
            &vec![7u8; len],
        );
    }
    /// GOOD status for `itt`, with the next StatSN unless `stat_sn` says otherwise.
    fn respond(&mut self, itt: Itt, stat_sn: Option<u32>) {
        let stat_sn = stat_sn.unwrap_or_else(|| self.next_stat_sn());
        self.feed(
            Bhs::ScsiResponse(wire::ScsiResponse {
                itt,
                stat_sn,
                exp_cmd_sn: 2,
                max_cmd_sn: 5,
                ..Default::default()
            }),
            &[],
        );
    }
    fn r2t(&mut self, itt: Itt, ttt: u32, offset: u32, len: u32) {
        self.feed(
            Bhs::R2t(wire::R2t {
                itt,
                ttt,
                buffer_offset: offset,
                desired_data_transfer_length: len,
                exp_cmd_sn: 2,
                max_cmd_sn: 5,
                ..Default::default()
            }),
            &[],
        );
    }
    fn closed_error(&self) -> Option<&ConnError> {
        self.events.iter().find_map(|e| match e {
            Event::Closed { error } => error.as_ref(),
            _ => None,
        })
    }
}

#[test]
fn read_reassembles_data_in_and_reports_status() {
    let mut s = Sim::new();
    let itt = s.read(1024);
    assert!(
        matches!(&s.sent[0].bhs, Bhs::ScsiCommand(c) if c.read && c.cmd_sn == 1 && c.exp_stat_sn == 10)
    );
    s.data_in(itt, 512, 512, false, 4);
    s.data_in(itt, 0, 512, true, 4);
    match &s.events[..] {
        [Event::CommandDone {
            itt: i,
            result: Ok(r),
        }] => {
            assert_eq!(*i, itt);
            assert_eq!(r.data.len(), 1024);
            assert_eq!(r.status, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.conn.sequence().2, 11);
}

#[test]
fn status_with_sense_and_underflow() {
    let mut s = Sim::new();
    let itt = s.read(4096);
    let stat_sn = s.next_stat_sn();
    s.feed(
        Bhs::ScsiResponse(wire::ScsiResponse {
            underflow: true,
            residual_count: 4096,
            status: 2,
            itt,
            stat_sn,
            exp_cmd_sn: 2,
            max_cmd_sn: 5,
            ..Default::default()
        }),
        &[0, 3, 0x70, 0, 5],
    );
    match &s.events[..] {
        [Event::CommandDone { result: Ok(r), .. }] => {
            assert_eq!(r.status, 2);
            assert_eq!(r.sense.as_deref(), Some(&[0x70, 0, 5][..]));
            assert_eq!(r.residual, 4096);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn data_out_split_by_target_segment_limit() {
    let data = Bytes::from(vec![7u8; 10_000]);
    let p = command::data_outs(5, 9, 0, &data, 4096, 4096);
    let offs: Vec<(u32, u32, bool, usize)> = p
        .iter()
        .map(|p| match &p.bhs {
            Bhs::DataOut(d) => (d.data_sn, d.buffer_offset, d.final_, p.data.len()),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        offs,
        vec![
            (0, 4096, false, 4096),
            (1, 8192, false, 4096),
            (2, 12288, true, 1808)
        ]
    );
}

#[test]
fn residual_sign() {
    assert_eq!(command::residual(true, false, 10), 10);
    assert_eq!(command::residual(false, true, 10), -10);
    assert_eq!(command::residual(false, false, 10), 0);
}

#[test]
fn write_sends_immediate_then_unsolicited_then_answers_r2t() {
    let mut s = Sim::new();
    let itt = s.write(20_000);
    // 4096 immediate (target MRDSL), then unsolicited up to FirstBurst 8192.
    assert_eq!(s.sent.len(), 2);
    assert!(matches!(&s.sent[0].bhs, Bhs::ScsiCommand(c) if !c.final_ && c.write));
    assert_eq!(s.sent[0].data.len(), 4096);
    assert!(
        matches!(&s.sent[1].bhs, Bhs::DataOut(d) if d.final_ && d.buffer_offset == 4096 && d.ttt == RESERVED_TAG)
    );
    s.r2t(itt, 77, 8192, 11_808);
    let outs: Vec<_> = s.sent[2..].iter().collect();
    assert_eq!(outs.len(), 3);
    assert!(outs
        .iter()
        .all(|p| matches!(&p.bhs, Bhs::DataOut(d) if d.ttt == 77)));
    assert!(s.events.is_empty());
}

#[test]
fn closed_window_holds_commands_in_cmd_sn_order() {
    let mut s = Sim::with(params(true, false), 1);
    s.read(512);
    let second = s.read(512);
    assert_eq!(s.sent.len(), 1, "MaxCmdSN 1 admits only CmdSN 1");
    assert!(!s.conn.window_open());
    // An immediate ping still goes out, carrying the held command's CmdSN.
    s.conn.ping(s.now).unwrap();
    s.drain();
    assert!(matches!(&s.sent[1].bhs, Bhs::NopOut(n) if n.immediate && n.cmd_sn == 2));
    // A NOP-In opening the window releases it.
    s.feed(
        Bhs::NopIn(wire::NopIn {
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            stat_sn: 10,
            exp_cmd_sn: 2,
            max_cmd_sn: 2,
            ..Default::default()
        }),
        &[],
    );
    assert!(matches!(&s.sent[2].bhs, Bhs::ScsiCommand(c) if c.itt == second && c.cmd_sn == 2));
}

#[test]
fn unsolicited_nop_in_is_echoed() {
    let mut s = Sim::new();
    s.feed(
        Bhs::NopIn(wire::NopIn {
            itt: RESERVED_TAG,
            ttt: 42,
            stat_sn: 10,
            exp_cmd_sn: 1,
            max_cmd_sn: 4,
            ..Default::default()
        }),
        b"hello",
    );
    assert!(
        matches!(&s.sent[0].bhs, Bhs::NopOut(n) if n.ttt == 42 && n.itt == RESERVED_TAG && n.immediate)
    );
    assert_eq!(&s.sent[0].data[..], b"hello");
    assert_eq!(
        s.conn.sequence().2,
        10,
        "an unsolicited NOP-In consumes no StatSN"
    );
}

#[test]
fn keepalive_then_timeout_closes() {
    let mut s = Sim::new();
    let t = s.conn.poll_timeout().unwrap();
    s.conn.handle_timeout(t);
    s.drain();
    assert!(matches!(&s.sent[0].bhs, Bhs::NopOut(n) if n.itt != RESERVED_TAG));
    let t2 = s.conn.poll_timeout().unwrap();
    s.conn.handle_timeout(t2);
    s.drain();
    assert!(matches!(s.closed_error(), Some(ConnError::PingTimeout)));
}

#[test]
fn unknown_itt_closes_with_a_typed_error() {
    let mut s = Sim::new();
    let pending = s.read(512);
    s.respond(999, None);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::UnknownItt {
            itt: 999,
            ..
        }))
    ));
    assert!(s.events.iter().any(|e| matches!(e,
        Event::CommandDone { itt, result: Err(RequestError::Protocol(_)) } if *itt == pending)));
    assert!(s.conn.is_closed());
    assert_eq!(
        s.conn.submit_command(CommandRequest::default()),
        Err(SubmitError::Closed)
    );
}

#[test]
fn data_in_overflow_is_a_protocol_error() {
    let mut s = Sim::new();
    let itt = s.read(512);
    s.data_in(itt, 256, 512, false, 4);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::DataInOverflow { .. }))
    ));
    // Offsets near u32::MAX must not wrap into the buffer.
    let mut s = Sim::new();
    let itt = s.read(512);
    s.data_in(itt, u32::MAX, 16, false, 4);
    assert!(s.conn.is_closed());
}

#[test]
fn r2t_for_finished_task_and_outside_data() {
    let mut s = Sim::new();
    let itt = s.read(512);
    s.data_in(itt, 0, 512, true, 4);
    s.r2t(itt, 1, 0, 512);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::UnknownItt {
            what: "R2T",
            ..
        }))
    ));
    let mut s = Sim::new();
    let itt = s.write(100);
    s.r2t(itt, 1, 50, 100);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::R2tOutsideData { .. }))
    ));
}

#[test]
fn stat_sn_gap_is_a_protocol_error() {
    let mut s = Sim::new();
    let itt = s.read(0);
    s.respond(itt, Some(13));
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::StatSn {
            got: 13,
            expected: 10
        }))
    ));
}

#[test]
fn response_of_the_wrong_kind_and_initiator_opcodes_are_errors() {
    let mut s = Sim::new();
    let itt = s.conn.ping(s.now).unwrap();
    s.drain();
    s.data_in(itt, 0, 0, false, 4);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::WrongResponse { .. }))
    ));
    let mut s = Sim::new();
    s.feed(Bhs::ScsiCommand(wire::ScsiCommand::default()), &[]);
    assert!(matches!(
        s.closed_error(),
        Some(ConnError::Protocol(ProtocolError::UnexpectedPdu(_)))
    ));
}

#[test]
fn reject_fails_the_named_request_and_data_digest_fails_its_task() {
    let mut s = Sim::new();
    let itt = s.read(512);
    let mut header = vec![0u8; 48];
    header[16..20].copy_from_slice(&itt.to_be_bytes());
    let stat_sn = s.next_stat_sn();
    s.feed(
        Bhs::Reject(wire::Reject {
            reason: 4,
            stat_sn,
            exp_cmd_sn: 2,
            max_cmd_sn: 5,
            ..Default::default()
        }),
        &header,
    );
    assert!(matches!(
        &s.events[..],
        [Event::CommandDone {
            result: Err(RequestError::Rejected { reason: 4 }),
            ..
        }]
    ));
    let itt = s.read(512);
    let bhs = Bhs::DataIn(wire::DataIn {
        itt,
        ..Default::default()
    });
    s.conn
        .handle_wire_error(WireError::DataDigest { bhs: Box::new(bhs) }, s.now);
    s.drain();
    assert!(matches!(
        s.events.last(),
        Some(Event::CommandDone {
            result: Err(RequestError::DataDigest),
            ..
        })
    ));
    assert!(!s.conn.is_closed());
}

#[test]
fn invalid_requests_are_refused_up_front() {
    let mut s = Sim::new();
    let bad = |cdb: &[u8], out: usize, inn: u32| CommandRequest {
        lun: 0,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::from(vec![0; out]),
        data_in_len: inn,
    };
    assert_eq!(
        s.conn.submit_command(bad(&[], 0, 0)),
        Err(SubmitError::CdbLength(0))
    );
    assert_eq!(
        s.conn.submit_command(bad(&[0; 261], 0, 0)),
        Err(SubmitError::CdbLength(261))
    );
    assert_eq!(
        s.conn.submit_command(bad(&[0x2a], 1, 1)),
        Err(SubmitError::Bidirectional)
    );
    assert!(matches!(
        s.conn.text(Bytes::from(vec![b'a'; 5000])),
        Err(SubmitError::TextTooLong { .. })
    ));
    // A long CDB rides in an Extended-CDB AHS.
    s.conn.submit_command(bad(&[0x7f; 32], 0, 0)).unwrap();
    s.drain();
    assert_eq!(s.sent[0].ahs.len(), 1);
    assert_eq!(s.sent[0].ahs[0].data.len(), 17);
}

#[test]
fn logout_waits_for_commands_then_closes_cleanly() {
    let mut s = Sim::new();
    let cmd = s.read(0);
    let lo = s.conn.logout().unwrap();
    s.drain();
    assert_eq!(s.sent.len(), 1, "logout waits for the command");
    s.respond(cmd, None);
    assert!(
        matches!(&s.sent[1].bhs, Bhs::LogoutRequest(l) if l.itt == lo && l.immediate && l.cmd_sn == 2)
    );
    let stat_sn = s.next_stat_sn();
    s.feed(
        Bhs::LogoutResponse(wire::LogoutResponse {
            itt: lo,
            stat_sn,
            exp_cmd_sn: 2,
            max_cmd_sn: 5,
            ..Default::default()
        }),
        &[],
    );
    assert!(matches!(
        s.events.last(),
        Some(Event::Closed { error: None })
    ));
    assert!(s.conn.is_closed());
}

#[test]
fn disconnect_fails_everything_outstanding() {
    let mut s = Sim::new();
    s.read(512);
    s.conn
        .text(Bytes::from_static(b"SendTargets=All\0"))
        .unwrap();
    s.conn.handle_disconnect();
    s.drain();
    assert_eq!(s.events.len(), 3);
    assert!(matches!(s.closed_error(), Some(ConnError::Disconnected)));
}
