//! BHS layouts (RFC 7143 §11): one function per PDU type names where each field sits,
//! and serves both directions: [`bhs_bytes`] runs it over a [`Writer`], [`parse_bhs`]
//! over a [`Reader`], so encoding and decoding cannot disagree. Framing, AHS and
//! digests are in `codec`.
use super::codec::MAX_DATA_SEGMENT_LEN;
use super::pdu::*;

/// One side of a BHS layout: a [`Writer`] stores each field at its offset, a [`Reader`]
/// loads it from there. Offsets are constants below 48; multi-byte fields are
/// big-endian.
trait Fields {
    fn u8(&mut self, off: usize, v: &mut u8);
    fn u16(&mut self, off: usize, v: &mut u16);
    fn u32(&mut self, off: usize, v: &mut u32);
    fn u64(&mut self, off: usize, v: &mut u64);
    fn bytes(&mut self, off: usize, v: &mut [u8]);
    /// A one-bit flag of byte `off`.
    fn bit(&mut self, off: usize, mask: u8, v: &mut bool);
    /// A field of byte `off`: `(byte >> shift) & mask`.
    fn bits(&mut self, off: usize, shift: u8, mask: u8, v: &mut u8);
    /// Bits that are always set when sending (the F bit of single-PDU messages, a
    /// reserved tag); a reader ignores them.
    fn fixed(&mut self, off: usize, v: &[u8]);
    /// Consecutive u32 words from `off` (most of a BHS is such runs).
    fn words<const N: usize>(&mut self, off: usize, v: [&mut u32; N]) {
        for (i, w) in v.into_iter().enumerate() {
            self.u32(off + 4 * i, w);
        }
    }
}

/// Builds a header; each field is ORed into zeros.
struct Writer([u8; BHS_LEN]);

impl Writer {
    fn put(&mut self, off: usize, v: &[u8]) {
        for (d, s) in self.0[off..off + v.len()].iter_mut().zip(v) {
            *d |= s;
        }
    }
}

impl Fields for Writer {
    fn u8(&mut self, off: usize, v: &mut u8) {
        self.put(off, &[*v]);
    }
    fn u16(&mut self, off: usize, v: &mut u16) {
        self.put(off, &v.to_be_bytes());
    }
    fn u32(&mut self, off: usize, v: &mut u32) {
        self.put(off, &v.to_be_bytes());
    }
    fn u64(&mut self, off: usize, v: &mut u64) {
        self.put(off, &v.to_be_bytes());
    }
    fn bytes(&mut self, off: usize, v: &mut [u8]) {
        self.put(off, v);
    }
    fn bit(&mut self, off: usize, mask: u8, v: &mut bool) {
        if *v {
            self.put(off, &[mask]);
        }
    }
    fn bits(&mut self, off: usize, shift: u8, mask: u8, v: &mut u8) {
        self.put(off, &[(*v & mask) << shift]);
    }
    fn fixed(&mut self, off: usize, v: &[u8]) {
        self.put(off, v);
    }
}

/// Reads a received header; bits a layout does not name (reserved ones) are ignored.
struct Reader<'a>(&'a [u8; BHS_LEN]);

impl Reader<'_> {
    fn get<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut b = [0; N];
        b.copy_from_slice(&self.0[off..off + N]);
        b
    }
}

impl Fields for Reader<'_> {
    fn u8(&mut self, off: usize, v: &mut u8) {
        *v = self.0[off];
    }
    fn u16(&mut self, off: usize, v: &mut u16) {
        *v = u16::from_be_bytes(self.get(off));
    }
    fn u32(&mut self, off: usize, v: &mut u32) {
        *v = u32::from_be_bytes(self.get(off));
    }
    fn u64(&mut self, off: usize, v: &mut u64) {
        *v = u64::from_be_bytes(self.get(off));
    }
    fn bytes(&mut self, off: usize, v: &mut [u8]) {
        v.copy_from_slice(&self.0[off..off + v.len()]);
    }
    fn bit(&mut self, off: usize, mask: u8, v: &mut bool) {
        *v = self.0[off] & mask != 0;
    }
    fn bits(&mut self, off: usize, shift: u8, mask: u8, v: &mut u8) {
        *v = (self.0[off] >> shift) & mask;
    }
    fn fixed(&mut self, _off: usize, _v: &[u8]) {}
}

/// Runs the layout of `bhs`'s type over `f`.
fn layout(f: &mut impl Fields, bhs: &mut Bhs) {
    match bhs {
        Bhs::NopOut(b) => nop_out(f, b),
        Bhs::ScsiCommand(b) => scsi_command(f, b),
        Bhs::TaskMgmtRequest(b) => task_mgmt_request(f, b),
        Bhs::LoginRequest(b) => login_request(f, b),
        Bhs::TextRequest(b) => text_request(f, b),
        Bhs::DataOut(b) => data_out(f, b),
        Bhs::LogoutRequest(b) => logout_request(f, b),
        Bhs::SnackRequest(b) => snack_request(f, b),
        Bhs::NopIn(b) => nop_in(f, b),
        Bhs::ScsiResponse(b) => scsi_response(f, b),
        Bhs::TaskMgmtResponse(b) => task_mgmt_response(f, b),
        Bhs::LoginResponse(b) => login_response(f, b),
        Bhs::TextResponse(b) => text_response(f, b),
        Bhs::DataIn(b) => data_in(f, b),
        Bhs::LogoutResponse(b) => logout_response(f, b),
        Bhs::R2t(b) => r2t(f, b),
        Bhs::AsyncMessage(b) => async_message(f, b),
        Bhs::Reject(b) => reject(f, b),
    }
}

/// The 48-byte BHS of `bhs` with the given length fields.
pub fn bhs_bytes(bhs: &Bhs, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
    let mut w = Writer([0; BHS_LEN]);
    w.put(0, &[bhs.opcode() as u8]);
    w.put(4, &[ahs_words]);
    w.put(5, &(data_len & MAX_DATA_SEGMENT_LEN).to_be_bytes()[1..]);
    layout(&mut w, &mut bhs.clone());
    w.0
}

/// Decode a 48-byte BHS (the length fields were already used to frame the PDU). `None`
/// means an opcode we do not know.
pub fn parse_bhs(h: &[u8; BHS_LEN]) -> Option<Bhs> {
    let mut bhs = match Opcode::from_u8(h[0] & 0x3f)? {
        Opcode::NopOut => Bhs::NopOut(Default::default()),
        Opcode::ScsiCommand => Bhs::ScsiCommand(Default::default()),
        Opcode::TaskMgmtRequest => Bhs::TaskMgmtRequest(Default::default()),
        Opcode::LoginRequest => Bhs::LoginRequest(Default::default()),
        Opcode::TextRequest => Bhs::TextRequest(Default::default()),
        Opcode::DataOut => Bhs::DataOut(Default::default()),
        Opcode::LogoutRequest => Bhs::LogoutRequest(Default::default()),
        Opcode::SnackRequest => Bhs::SnackRequest(Default::default()),
        Opcode::NopIn => Bhs::NopIn(Default::default()),
        Opcode::ScsiResponse => Bhs::ScsiResponse(Default::default()),
        Opcode::TaskMgmtResponse => Bhs::TaskMgmtResponse(Default::default()),
        Opcode::LoginResponse => Bhs::LoginResponse(Default::default()),
        Opcode::TextResponse => Bhs::TextResponse(Default::default()),
        Opcode::DataIn => Bhs::DataIn(Default::default()),
        Opcode::LogoutResponse => Bhs::LogoutResponse(Default::default()),
        Opcode::R2t => Bhs::R2t(Default::default()),
        Opcode::AsyncMessage => Bhs::AsyncMessage(Default::default()),
        Opcode::Reject => Bhs::Reject(Default::default()),
    };
    layout(&mut Reader(h), &mut bhs);
    Some(bhs)
}

// ---- initiator PDUs ----------------------------------------------------------------

/// CmdSN and ExpStatSN: bytes 24..32 of the initiator PDUs that carry a CmdSN.
fn cmd_sns(f: &mut impl Fields, cmd_sn: &mut u32, exp_stat_sn: &mut u32) {
    f.words(24, [cmd_sn, exp_stat_sn]);
}

fn nop_out(f: &mut impl Fields, b: &mut NopOut) {
    f.bit(0, 0x40, &mut b.immediate);
    f.fixed(1, &[0x80]);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
}

fn scsi_command(f: &mut impl Fields, b: &mut ScsiCommand) {
    f.bit(0, 0x40, &mut b.immediate);
    f.bit(1, 0x80, &mut b.final_);
    f.bit(1, 0x40, &mut b.read);
    f.bit(1, 0x20, &mut b.write);
    f.bits(1, 0, 0x07, &mut b.attr);
    f.u64(8, &mut b.lun);
    f.u32(16, &mut b.itt);
    f.u32(20, &mut b.expected_data_transfer_length);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
    f.bytes(32, &mut b.cdb);
}

fn task_mgmt_request(f: &mut impl Fields, b: &mut TaskMgmtRequest) {
    f.bit(0, 0x40, &mut b.immediate);
    f.fixed(1, &[0x80]);
    f.bits(1, 0, 0x7f, &mut b.function);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.referenced_task_tag]);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
    f.words(32, [&mut b.ref_cmd_sn, &mut b.exp_data_sn]);
}

fn login_request(f: &mut impl Fields, b: &mut LoginRequest) {
    // Always immediate (RFC 7143 §11.12).
    f.fixed(0, &[0x40]);
    login_stage(f, &mut b.transit, &mut b.continue_, &mut b.csg, &mut b.nsg);
    f.u8(2, &mut b.version_max);
    f.u8(3, &mut b.version_min);
    f.bytes(8, &mut b.isid);
    f.u16(14, &mut b.tsih);
    f.u32(16, &mut b.itt);
    f.u16(20, &mut b.cid);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
}

/// The T and C bits and the CSG and NSG stages of a login request or response.
fn login_stage(f: &mut impl Fields, t: &mut bool, c: &mut bool, csg: &mut u8, nsg: &mut u8) {
    f.bit(1, 0x80, t);
    f.bit(1, 0x40, c);
    f.bits(1, 2, 3, csg);
    f.bits(1, 0, 3, nsg);
}

fn text_request(f: &mut impl Fields, b: &mut TextRequest) {
    f.bit(0, 0x40, &mut b.immediate);
    f.bit(1, 0x80, &mut b.final_);
    f.bit(1, 0x40, &mut b.continue_);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
}

fn data_out(f: &mut impl Fields, b: &mut DataOut) {
    f.bit(1, 0x80, &mut b.final_);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    f.u32(28, &mut b.exp_stat_sn);
    f.words(36, [&mut b.data_sn, &mut b.buffer_offset]);
}

fn logout_request(f: &mut impl Fields, b: &mut LogoutRequest) {
    f.bit(0, 0x40, &mut b.immediate);
    f.fixed(1, &[0x80]);
    f.bits(1, 0, 0x7f, &mut b.reason);
    f.u32(16, &mut b.itt);
    f.u16(20, &mut b.cid);
    cmd_sns(f, &mut b.cmd_sn, &mut b.exp_stat_sn);
}

fn snack_request(f: &mut impl Fields, b: &mut SnackRequest) {
    f.fixed(1, &[0x80]);
    f.bits(1, 0, 0x0f, &mut b.type_);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    f.u32(28, &mut b.exp_stat_sn);
    f.words(40, [&mut b.beg_run, &mut b.run_length]);
}

// ---- target PDUs -------------------------------------------------------------------

/// StatSN, ExpCmdSN and MaxCmdSN: bytes 24..36 of every target PDU.
fn sns(f: &mut impl Fields, stat_sn: &mut u32, exp_cmd_sn: &mut u32, max_cmd_sn: &mut u32) {
    f.words(24, [stat_sn, exp_cmd_sn, max_cmd_sn]);
}

fn nop_in(f: &mut impl Fields, b: &mut NopIn) {
    f.fixed(1, &[0x80]);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
}

fn scsi_response(f: &mut impl Fields, b: &mut ScsiResponse) {
    f.fixed(1, &[0x80]);
    f.bit(1, 0x10, &mut b.bidi_overflow);
    f.bit(1, 0x08, &mut b.bidi_underflow);
    f.bit(1, 0x04, &mut b.overflow);
    f.bit(1, 0x02, &mut b.underflow);
    f.u8(2, &mut b.response);
    f.u8(3, &mut b.status);
    f.words(16, [&mut b.itt, &mut b.snack_tag]);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.u32(36, &mut b.exp_data_sn);
    f.words(40, [&mut b.bidi_read_residual_count, &mut b.residual_count]);
}

fn task_mgmt_response(f: &mut impl Fields, b: &mut TaskMgmtResponse) {
    f.fixed(1, &[0x80]);
    f.u8(2, &mut b.response);
    f.u32(16, &mut b.itt);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
}

fn login_response(f: &mut impl Fields, b: &mut LoginResponse) {
    login_stage(f, &mut b.transit, &mut b.continue_, &mut b.csg, &mut b.nsg);
    f.u8(2, &mut b.version_max);
    f.u8(3, &mut b.version_active);
    f.bytes(8, &mut b.isid);
    f.u16(14, &mut b.tsih);
    f.u32(16, &mut b.itt);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.u8(36, &mut b.status_class);
    f.u8(37, &mut b.status_detail);
}

fn text_response(f: &mut impl Fields, b: &mut TextResponse) {
    f.bit(1, 0x80, &mut b.final_);
    f.bit(1, 0x40, &mut b.continue_);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
}

fn data_in(f: &mut impl Fields, b: &mut DataIn) {
    f.bit(1, 0x80, &mut b.final_);
    f.bit(1, 0x40, &mut b.ack);
    f.bit(1, 0x04, &mut b.overflow);
    f.bit(1, 0x02, &mut b.underflow);
    f.bit(1, 0x01, &mut b.status_present);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    // Status and StatSN are reserved (zero) unless S is set.
    if b.status_present {
        f.u8(3, &mut b.status);
        f.u32(24, &mut b.stat_sn);
    }
    f.words(28, [&mut b.exp_cmd_sn, &mut b.max_cmd_sn, &mut b.data_sn]);
    f.words(40, [&mut b.buffer_offset, &mut b.residual_count]);
}

fn logout_response(f: &mut impl Fields, b: &mut LogoutResponse) {
    f.fixed(1, &[0x80]);
    f.u8(2, &mut b.response);
    f.u32(16, &mut b.itt);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.u16(40, &mut b.time2wait);
    f.u16(42, &mut b.time2retain);
}

fn r2t(f: &mut impl Fields, b: &mut R2t) {
    f.fixed(1, &[0x80]);
    f.u64(8, &mut b.lun);
    f.words(16, [&mut b.itt, &mut b.ttt]);
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.words(36, [&mut b.r2t_sn, &mut b.buffer_offset]);
    f.u32(44, &mut b.desired_data_transfer_length);
}

fn async_message(f: &mut impl Fields, b: &mut AsyncMessage) {
    f.fixed(1, &[0x80]);
    f.u64(8, &mut b.lun);
    f.fixed(16, &RESERVED_TAG.to_be_bytes());
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.u8(36, &mut b.async_event);
    f.u8(37, &mut b.async_vcode);
    f.u16(38, &mut b.parameter1);
    f.u16(40, &mut b.parameter2);
    f.u16(42, &mut b.parameter3);
}

fn reject(f: &mut impl Fields, b: &mut Reject) {
    f.fixed(1, &[0x80]);
    f.u8(2, &mut b.reason);
    f.fixed(16, &RESERVED_TAG.to_be_bytes());
    sns(f, &mut b.stat_sn, &mut b.exp_cmd_sn, &mut b.max_cmd_sn);
    f.u32(36, &mut b.data_sn);
}
