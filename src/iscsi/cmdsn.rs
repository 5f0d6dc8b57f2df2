//! Command numbering (RFC 7143 §4.2.2): the CmdSN window, in-order delivery of
//! non-immediate commands, and flow control through MaxCmdSN.
//!
//! Serial-number arithmetic follows RFC 1982 with 32-bit wrap.

use std::collections::BTreeMap;

/// `a < b` in 32-bit serial number arithmetic.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Where an arriving command goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// Deliver these now, in this order (the command itself and any queued ones it
    /// unblocked).
    Deliver(Vec<T>),
    /// Within the window but ahead of ExpCmdSN: held until the gap fills.
    Held,
    /// Outside the window: RFC 7143 says silently ignore it.
    Ignored,
}

/// The target side of one session's command window.
#[derive(Debug)]
pub struct CmdWindow<T> {
    exp_cmd_sn: u32,
    depth: u32,
    /// Commands admitted (delivered) but not yet completed.
    outstanding: u32,
    /// Highest MaxCmdSN announced so far: never shrinks (initiators ignore decreases).
    announced_max: u32,
    held: BTreeMap<u32, T>,
}

impl<T> CmdWindow<T> {
    /// `first_cmd_sn` is the CmdSN of the first full-feature command (from login);
    /// `depth` the number of commands the session may have outstanding.
    pub fn new(first_cmd_sn: u32, depth: u32) -> Self {
        let depth = depth.max(1);
        Self {
            exp_cmd_sn: first_cmd_sn,
            depth,
            outstanding: 0,
            announced_max: first_cmd_sn.wrapping_add(depth - 1),
            held: BTreeMap::new(),
        }
    }

    /// Record a MaxCmdSN announced elsewhere (the login response): the window may never
    /// shrink below what the initiator was already promised.
    pub fn note_announced(&mut self, max: u32) {
        if sn_lt(self.announced_max, max) {
            self.announced_max = max;
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// MaxCmdSN to announce now: the window closes while commands are outstanding, so a
    /// slow medium pushes back on the initiator instead of queueing without bound.
    pub fn max_cmd_sn(&mut self) -> u32 {
        let free = self.depth.saturating_sub(self.outstanding);
        let candidate = self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
        if sn_lt(self.announced_max, candidate) {
            self.announced_max = candidate;
        }
        self.announced_max
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Admit a non-immediate command carrying `cmd_sn`.
    pub fn admit(&mut self, cmd_sn: u32, item: T) -> Admission<T> {
        let max = self.max_cmd_sn();
        // Window membership by distance from ExpCmdSN: serial comparison is undefined
        // for numbers 2^31 apart (RFC 1982), and treating such a CmdSN as inside held
        // it forever. A full window (MaxCmdSN = ExpCmdSN - 1) has width 0.
        let width = max.wrapping_sub(self.exp_cmd_sn).wrapping_add(1);
        if cmd_sn.wrapping_sub(self.exp_cmd_sn) >= width {
            return Admission::Ignored;
        }
        if cmd_sn != self.exp_cmd_sn {
            if self.held.contains_key(&cmd_sn) {
                return Admission::Ignored;
            }
            self.held.insert(cmd_sn, item);
            return Admission::Held;
        }
        let mut out = vec![item];
        self.advance();
        while let Some(next) = self.held.remove(&self.exp_cmd_sn) {
            out.push(next);
            self.advance();
        }
        Admission::Deliver(out)
    }

    /// An immediate command: delivered at once and does not advance ExpCmdSN, but it
    /// occupies a slot until it completes.
    pub fn admit_immediate(&mut self) {
        self.outstanding += 1;
    }

    fn advance(&mut self) {
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        self.outstanding += 1;
    }

    /// One delivered command (immediate or not) has completed.
    pub fn complete(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// Commands held ahead of a gap (dropped when the connection ends).
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/cmdsn_and_transfer: a CmdSN exactly 2^31 ahead of ExpCmdSN is
    /// neither before nor after it in serial arithmetic and was held.
    #[test]
    fn cmd_sn_half_the_number_space_away_is_ignored() {
        for depth in [0, 1, 128] {
            let mut w: CmdWindow<u32> = CmdWindow::new(1_591_664_350, depth);
            let far = w.exp_cmd_sn().wrapping_add(0x8000_0000);
            assert_eq!(w.admit(far, 1), Admission::Ignored);
            assert_eq!(w.admit(far.wrapping_add(1), 2), Admission::Ignored);
            assert_eq!(w.held(), 0);
        }
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 1));
        assert!(sn_lt(u32::MAX, 0));
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(sn_le(7, 7));
    }

    #[test]
    fn in_order_commands_are_delivered_and_advance() {
        let mut w = CmdWindow::new(10, 4);
        assert_eq!(w.max_cmd_sn(), 13);
        assert_eq!(w.admit(10, 'a'), Admission::Deliver(vec!['a']));
        assert_eq!(w.exp_cmd_sn(), 11);
        // one outstanding: the window does not grow until it completes
        assert_eq!(w.max_cmd_sn(), 13);
        w.complete();
        assert_eq!(w.max_cmd_sn(), 14);
    }

    #[test]
    fn out_of_window_is_ignored() {
        let mut w = CmdWindow::new(100, 8);
        // Before ExpCmdSN, past MaxCmdSN (107), far behind.
        for sn in [99, 108, 0] {
            assert_eq!(w.admit(sn, 'x'), Admission::Ignored, "CmdSN {sn}");
        }
        assert_eq!(w.exp_cmd_sn(), 100);
    }

    #[test]
    fn gaps_are_held_then_released_in_order() {
        let mut w = CmdWindow::new(0, 8);
        assert_eq!(w.admit(2, 'c'), Admission::Held);
        assert_eq!(w.admit(1, 'b'), Admission::Held);
        assert_eq!(w.admit(1, 'B'), Admission::Ignored, "duplicate CmdSN");
        assert_eq!(w.admit(0, 'a'), Admission::Deliver(vec!['a', 'b', 'c']));
        assert_eq!(w.exp_cmd_sn(), 3);
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn window_never_shrinks_and_closes_when_full() {
        let mut w = CmdWindow::new(u32::MAX - 1, 2);
        assert_eq!(w.max_cmd_sn(), u32::MAX);
        assert!(matches!(w.admit(u32::MAX - 1, 1), Admission::Deliver(_)));
        assert!(matches!(w.admit(u32::MAX, 2), Admission::Deliver(_)));
        // full: the next CmdSN (0 after wrap) is outside the window
        assert_eq!(w.admit(0, 3), Admission::Ignored);
        assert_eq!(w.max_cmd_sn(), u32::MAX);
        w.complete();
        assert_eq!(w.max_cmd_sn(), 0);
        assert!(matches!(w.admit(0, 3), Admission::Deliver(_)));
    }
}
