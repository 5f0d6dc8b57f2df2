//! BHS encoding (RFC 7143 §11): the common header fields, then one small writer per
//! PDU type. Framing, AHS and digests are in `codec`.
use super::codec::MAX_DATA_SEGMENT_LEN;
use super::pdu::*;

/// A fixed 48-byte header under construction; offsets are constants below 48.
struct HeaderBuf([u8; BHS_LEN]);

impl HeaderBuf {
    fn u8(&mut self, off: usize, v: u8) {
        self.0[off] = v;
    }
    fn u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, off: usize, v: &[u8]) {
        self.0[off..off + v.len()].copy_from_slice(v);
    }
}

fn flag(cond: bool, mask: u8) -> u8 {
    if cond {
        mask
    } else {
        0
    }
}

/// The 48-byte BHS of `bhs` with the given length fields.
pub fn bhs_bytes(bhs: &Bhs, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
    let mut h = HeaderBuf([0; BHS_LEN]);
    let imm = flag(bhs.immediate(), 0x40);
    h.u8(0, bhs.opcode() as u8 | imm);
    h.u32(4, data_len & MAX_DATA_SEGMENT_LEN);
    h.u8(4, ahs_words);
    h.u32(16, bhs.itt());
    if let Some(lun) = bhs.lun() {
        h.u64(8, lun);
    }
    match bhs {
        Bhs::NopOut(b) => nop_out(&mut h, b),
        Bhs::ScsiCommand(b) => scsi_command(&mut h, b),
        Bhs::TaskMgmtRequest(b) => task_mgmt_request(&mut h, b),
        Bhs::LoginRequest(b) => login_request(&mut h, b),
        Bhs::TextRequest(b) => text_request(&mut h, b),
        Bhs::DataOut(b) => data_out(&mut h, b),
        Bhs::LogoutRequest(b) => logout_request(&mut h, b),
        Bhs::SnackRequest(b) => snack_request(&mut h, b),
        Bhs::NopIn(b) => nop_in(&mut h, b),
        Bhs::ScsiResponse(b) => scsi_response(&mut h, b),
        Bhs::TaskMgmtResponse(b) => task_mgmt_response(&mut h, b),
        Bhs::LoginResponse(b) => login_response(&mut h, b),
        Bhs::TextResponse(b) => text_response(&mut h, b),
        Bhs::DataIn(b) => data_in(&mut h, b),
        Bhs::LogoutResponse(b) => logout_response(&mut h, b),
        Bhs::R2t(b) => r2t(&mut h, b),
        Bhs::AsyncMessage(b) => async_message(&mut h, b),
        Bhs::Reject(b) => reject(&mut h, b),
    }
    h.0
}

fn nop_out(h: &mut HeaderBuf, b: &NopOut) {
    h.u8(1, 0x80);
    h.u32(20, b.ttt);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
}

fn scsi_command(h: &mut HeaderBuf, b: &ScsiCommand) {
    let f = flag(b.final_, 0x80) | flag(b.read, 0x40) | flag(b.write, 0x20);
    h.u8(1, f | (b.attr & 0x07));
    h.u32(20, b.expected_data_transfer_length);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
    h.bytes(32, &b.cdb);
}

fn task_mgmt_request(h: &mut HeaderBuf, b: &TaskMgmtRequest) {
    h.u8(1, 0x80 | (b.function & 0x7f));
    h.u32(20, b.referenced_task_tag);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
    h.u32(32, b.ref_cmd_sn);
    h.u32(36, b.exp_data_sn);
}

fn login_request(h: &mut HeaderBuf, b: &LoginRequest) {
    let f = flag(b.transit, 0x80) | flag(b.continue_, 0x40);
    h.u8(1, f | ((b.csg & 3) << 2) | (b.nsg & 3));
    h.u8(2, b.version_max);
    h.u8(3, b.version_min);
    h.bytes(8, &b.isid);
    h.u16(14, b.tsih);
    h.u16(20, b.cid);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
}

fn text_request(h: &mut HeaderBuf, b: &TextRequest) {
    h.u8(1, flag(b.final_, 0x80) | flag(b.continue_, 0x40));
    h.u32(20, b.ttt);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
}

fn data_out(h: &mut HeaderBuf, b: &DataOut) {
    h.u8(1, flag(b.final_, 0x80));
    h.u32(20, b.ttt);
    h.u32(28, b.exp_stat_sn);
    h.u32(36, b.data_sn);
    h.u32(40, b.buffer_offset);
}

fn logout_request(h: &mut HeaderBuf, b: &LogoutRequest) {
    h.u8(1, 0x80 | (b.reason & 0x7f));
    h.u16(20, b.cid);
    h.u32(24, b.cmd_sn);
    h.u32(28, b.exp_stat_sn);
}

fn snack_request(h: &mut HeaderBuf, b: &SnackRequest) {
    h.u8(1, 0x80 | (b.type_ & 0x0f));
    h.u32(20, b.ttt);
    h.u32(28, b.exp_stat_sn);
    h.u32(40, b.beg_run);
    h.u32(44, b.run_length);
}

fn nop_in(h: &mut HeaderBuf, b: &NopIn) {
    h.u8(1, 0x80);
    h.u32(20, b.ttt);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
}

fn scsi_response(h: &mut HeaderBuf, b: &ScsiResponse) {
    let f = flag(b.bidi_overflow, 0x10)
        | flag(b.bidi_underflow, 0x08)
        | flag(b.overflow, 0x04)
        | flag(b.underflow, 0x02);
    h.u8(1, 0x80 | f);
    h.u8(2, b.response);
    h.u8(3, b.status);
    h.u32(20, b.snack_tag);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u32(36, b.exp_data_sn);
    h.u32(40, b.bidi_read_residual_count);
    h.u32(44, b.residual_count);
}

fn task_mgmt_response(h: &mut HeaderBuf, b: &TaskMgmtResponse) {
    h.u8(1, 0x80);
    h.u8(2, b.response);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
}

fn login_response(h: &mut HeaderBuf, b: &LoginResponse) {
    let f = flag(b.transit, 0x80) | flag(b.continue_, 0x40);
    h.u8(1, f | ((b.csg & 3) << 2) | (b.nsg & 3));
    h.u8(2, b.version_max);
    h.u8(3, b.version_active);
    h.bytes(8, &b.isid);
    h.u16(14, b.tsih);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u8(36, b.status_class);
    h.u8(37, b.status_detail);
}

fn text_response(h: &mut HeaderBuf, b: &TextResponse) {
    h.u8(1, flag(b.final_, 0x80) | flag(b.continue_, 0x40));
    h.u32(20, b.ttt);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
}

fn data_in(h: &mut HeaderBuf, b: &DataIn) {
    let s = b.status_present;
    let f = flag(b.final_, 0x80)
        | flag(b.ack, 0x40)
        | flag(b.overflow, 0x04)
        | flag(b.underflow, 0x02)
        | flag(s, 0x01);
    h.u8(1, f);
    // Status and StatSN are reserved (zero) unless S is set.
    if s {
        h.u8(3, b.status);
        h.u32(24, b.stat_sn);
    }
    h.u32(20, b.ttt);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u32(36, b.data_sn);
    h.u32(40, b.buffer_offset);
    h.u32(44, b.residual_count);
}

fn logout_response(h: &mut HeaderBuf, b: &LogoutResponse) {
    h.u8(1, 0x80);
    h.u8(2, b.response);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u16(40, b.time2wait);
    h.u16(42, b.time2retain);
}

fn r2t(h: &mut HeaderBuf, b: &R2t) {
    h.u8(1, 0x80);
    h.u32(20, b.ttt);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u32(36, b.r2t_sn);
    h.u32(40, b.buffer_offset);
    h.u32(44, b.desired_data_transfer_length);
}

fn async_message(h: &mut HeaderBuf, b: &AsyncMessage) {
    h.u8(1, 0x80);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u8(36, b.async_event);
    h.u8(37, b.async_vcode);
    h.u16(38, b.parameter1);
    h.u16(40, b.parameter2);
    h.u16(42, b.parameter3);
}

fn reject(h: &mut HeaderBuf, b: &Reject) {
    h.u8(1, 0x80);
    h.u8(2, b.reason);
    h.u32(24, b.stat_sn);
    h.u32(28, b.exp_cmd_sn);
    h.u32(32, b.max_cmd_sn);
    h.u32(36, b.data_sn);
}
