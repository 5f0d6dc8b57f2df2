//! Sequencing state machines a peer drives directly.
//!
//! `CmdWindow`: arbitrary CmdSNs, immediate commands, completions and announced
//! MaxCmdSNs; commands are delivered once each, in CmdSN order, MaxCmdSN never moves
//! back, and nothing outside the window is held.
//!
//! `WriteTransfer`: arbitrary limits and Data-Out sequences (unsolicited, answering the
//! R2Ts it asked for, or made up); no panic, R2Ts stay inside the wanted range, and the
//! buffer is exactly the wanted length. `plan_data_in` cuts arbitrary data in order.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use holdfast::iscsi::cmdsn::{sn_le, sn_lt, Admission, CmdWindow};
use holdfast::iscsi::transfer::{plan_data_in, R2tRequest, WriteLimits, WriteTransfer};
use holdfast::wire::RESERVED_TAG;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

#[derive(Arbitrary, Debug)]
enum WinOp {
    /// CmdSN relative to ExpCmdSN (small offsets hit the window).
    Admit(i8),
    AdmitAt(u32),
    Immediate,
    Complete,
    Announce(i16),
    MaxCmdSn,
}

#[derive(Arbitrary, Debug)]
enum Tt {
    Unsolicited,
    /// The TTT of the n-th R2T issued so far.
    R2t(u8),
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct DataOut {
    ttt: Tt,
    /// None: the DataSN the transfer expects (tracked here); Some: this one.
    data_sn: Option<u32>,
    /// None: right after the previous PDU of that sequence; Some: anywhere.
    offset: Option<u32>,
    len: u16,
    final_: bool,
}

#[derive(Arbitrary, Debug)]
enum XferOp {
    Data(DataOut),
    NextR2ts,
}

#[derive(Arbitrary, Debug)]
struct Input {
    first_cmd_sn: u32,
    depth: u16,
    win: Vec<WinOp>,
    edtl: u32,
    wanted: u32,
    immediate_len: u16,
    immediate_final: bool,
    initial_r2t: bool,
    first_burst: u32,
    max_burst: u32,
    max_outstanding_r2t: u8,
    ttt_base: u32,
    xfer: Vec<XferOp>,
    data_in_len: u32,
    max_seg: u32,
    collapse: bool,
}

fn window(input: &Input) {
    let depth = u32::from(input.depth % 1024);
    let mut w: CmdWindow<u32> = CmdWindow::new(input.first_cmd_sn, depth);
    let mut delivered: HashSet<u32> = HashSet::new();
    let mut next_expected = input.first_cmd_sn;
    let mut max_seen = w.max_cmd_sn();
    for op in input.win.iter().take(256) {
        match op {
            WinOp::Admit(_) | WinOp::AdmitAt(_) => {
                let sn = match op {
                    WinOp::Admit(d) => w.exp_cmd_sn().wrapping_add(*d as i32 as u32),
                    WinOp::AdmitAt(sn) => *sn,
                    _ => unreachable!(),
                };
                let exp = w.exp_cmd_sn();
                let max = w.max_cmd_sn();
                let in_window = sn.wrapping_sub(exp) < max.wrapping_sub(exp).wrapping_add(1);
                match w.admit(sn, sn) {
                    Admission::Deliver(items) => {
                        assert_eq!(sn, exp, "delivered a command that was not next");
                        for it in items {
                            assert_eq!(it, next_expected, "out of order delivery");
                            assert!(delivered.insert(it), "delivered twice: {it}");
                            next_expected = next_expected.wrapping_add(1);
                        }
                        assert_eq!(w.exp_cmd_sn(), next_expected);
                    }
                    Admission::Held => assert!(in_window && sn != exp, "held {sn} outside"),
                    Admission::Ignored => {}
                }
            }
            WinOp::Immediate => w.admit_immediate(),
            WinOp::Complete => w.complete(),
            WinOp::Announce(d) => w.note_announced(w.exp_cmd_sn().wrapping_add(*d as i32 as u32)),
            WinOp::MaxCmdSn => {}
        }
        let max = w.max_cmd_sn();
        assert!(
            sn_le(max_seen, max),
            "MaxCmdSN went back: {max_seen} -> {max}"
        );
        max_seen = max;
        // MaxCmdSN + 1 may equal ExpCmdSN (a closed window), never be behind it.
        assert!(
            !sn_lt(max.wrapping_add(1), w.exp_cmd_sn()),
            "window inverted"
        );
        assert!(
            w.held() <= depth.max(1) as usize + 0x8000,
            "held grows without bound"
        );
    }
}

fn transfer(input: &Input) {
    // Keep buffers small: the buffer is sized by `wanted`.
    let edtl = input.edtl % (4 << 20);
    let wanted = input.wanted % (4 << 20);
    let limits = WriteLimits {
        initial_r2t: input.initial_r2t,
        first_burst_length: input.first_burst,
        max_burst_length: input.max_burst,
        max_outstanding_r2t: u32::from(input.max_outstanding_r2t),
    };
    let immediate = vec![0x5a; usize::from(input.immediate_len)];
    let Ok(mut t) = WriteTransfer::new(
        edtl,
        wanted,
        &immediate,
        input.immediate_final,
        limits,
        input.ttt_base,
    ) else {
        return;
    };
    let wanted = wanted.min(edtl);
    let mut r2ts: Vec<R2tRequest> = Vec::new();
    // Next DataSN and offset per TTT, as a well-behaved initiator would track them.
    let mut next: std::collections::HashMap<u32, (u32, u32)> = Default::default();
    next.insert(RESERVED_TAG, (0, u32::from(input.immediate_len)));
    for op in input.xfer.iter().take(256) {
        match op {
            XferOp::NextR2ts => {
                for r in t.next_r2ts() {
                    assert!(r.length > 0, "empty R2T {r:?}");
                    assert!(
                        u64::from(r.offset) + u64::from(r.length) <= u64::from(wanted),
                        "R2T {r:?} beyond wanted {wanted}"
                    );
                    assert_ne!(r.ttt, RESERVED_TAG);
                    next.insert(r.ttt, (0, r.offset));
                    r2ts.push(r);
                }
            }
            XferOp::Data(d) => {
                let ttt = match d.ttt {
                    Tt::Unsolicited => RESERVED_TAG,
                    Tt::R2t(i) if !r2ts.is_empty() => r2ts[usize::from(i) % r2ts.len()].ttt,
                    Tt::R2t(_) => RESERVED_TAG,
                    Tt::Any(x) => x,
                };
                let (sn, off) = next.get(&ttt).copied().unwrap_or((0, 0));
                let data_sn = d.data_sn.unwrap_or(sn);
                let offset = d.offset.unwrap_or(off);
                let data = vec![0xa5; usize::from(d.len)];
                if t.on_data_out(ttt, data_sn, offset, &data, d.final_).is_ok() {
                    next.insert(
                        ttt,
                        (
                            data_sn.wrapping_add(1),
                            offset.wrapping_add(u32::from(d.len)),
                        ),
                    );
                }
            }
        }
    }
    let _ = t.is_complete();
    let _ = t.r2t_count();
    assert_eq!(
        t.into_data().len(),
        wanted as usize,
        "buffer is not the wanted length"
    );
}

fn data_in(input: &Input) {
    let len = (input.data_in_len % (1 << 20)) as usize;
    let data = Bytes::from(vec![7u8; len]);
    let segs = plan_data_in(&data, input.max_seg, input.max_burst, input.collapse);
    let mut off = 0usize;
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s.data_sn as usize, i);
        assert_eq!(s.offset as usize, off, "Data-In gap or overlap");
        assert!(!s.data.is_empty());
        assert!(s.data.len() <= (input.max_seg.max(512)) as usize);
        off += s.data.len();
        assert_eq!(s.with_status, input.collapse && off == len);
    }
    assert_eq!(off, len, "Data-In does not cover the data");
    if let Some(l) = segs.last() {
        assert!(l.final_);
    }
}

fuzz_target!(|input: Input| {
    window(&input);
    transfer(&input);
    data_in(&input);
});
