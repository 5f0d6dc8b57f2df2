//! BHS decoding (RFC 7143 §11): the common header fields, then one small parser per
//! opcode. Framing, AHS and digests are in `codec`.
use super::pdu::*;
use nom::bytes::complete::take;
use nom::number::complete::{be_u16, be_u24, be_u32, be_u64, be_u8};
use nom::IResult;

/// The fields every BHS has at the same place (bytes 0..20).
struct Common<'a> {
    immediate: bool,
    opcode: u8,
    flags: u8,
    b2: u8,
    b3: u8,
    /// Bytes 8..16: the LUN, or ISID+TSIH for login.
    w8: &'a [u8],
    itt: u32,
}

fn common(i: &[u8]) -> IResult<&[u8], Common<'_>> {
    let (i, b0) = be_u8(i)?;
    let (i, flags) = be_u8(i)?;
    let (i, b2) = be_u8(i)?;
    let (i, b3) = be_u8(i)?;
    // TotalAHSLength and DataSegmentLength were already used to frame the PDU.
    let (i, _ahs) = be_u8(i)?;
    let (i, _dsl) = be_u24(i)?;
    let (i, w8) = take(8usize)(i)?;
    let (i, itt) = be_u32(i)?;
    Ok((
        i,
        Common {
            immediate: b0 & 0x40 != 0,
            opcode: b0 & 0x3f,
            flags,
            b2,
            b3,
            w8,
            itt,
        },
    ))
}

fn lun_of(w8: &[u8]) -> LunField {
    be_u64::<_, nom::error::Error<&[u8]>>(w8)
        .map(|(_, v)| v)
        .unwrap_or(0)
}

/// Reads `N` consecutive big-endian u32 words.
fn words<const N: usize>(mut i: &[u8]) -> IResult<&[u8], [u32; N]> {
    let mut out = [0u32; N];
    for w in out.iter_mut() {
        let (rest, v) = be_u32(i)?;
        *w = v;
        i = rest;
    }
    Ok((i, out))
}

fn bit(flags: u8, mask: u8) -> bool {
    flags & mask != 0
}

/// Decode a 48-byte BHS. `Ok(None)` means an opcode we do not know.
pub fn parse_bhs(h: &[u8; BHS_LEN]) -> IResult<&[u8], Option<Bhs>> {
    let (i, c) = common(h)?;
    let Some(op) = Opcode::from_u8(c.opcode) else {
        return Ok((i, None));
    };
    let (i, bhs) = match op {
        Opcode::NopOut => nop_out(&c, i)?,
        Opcode::ScsiCommand => scsi_command(&c, i)?,
        Opcode::TaskMgmtRequest => task_mgmt_request(&c, i)?,
        Opcode::LoginRequest => login_request(&c, i)?,
        Opcode::TextRequest => text_request(&c, i)?,
        Opcode::DataOut => data_out(&c, i)?,
        Opcode::LogoutRequest => logout_request(&c, i)?,
        Opcode::SnackRequest => snack_request(&c, i)?,
        Opcode::NopIn => nop_in(&c, i)?,
        Opcode::ScsiResponse => scsi_response(&c, i)?,
        Opcode::TaskMgmtResponse => task_mgmt_response(&c, i)?,
        Opcode::LoginResponse => login_response(&c, i)?,
        Opcode::TextResponse => text_response(&c, i)?,
        Opcode::DataIn => data_in(&c, i)?,
        Opcode::LogoutResponse => logout_response(&c, i)?,
        Opcode::R2t => r2t(&c, i)?,
        Opcode::AsyncMessage => async_message(&c, i)?,
        Opcode::Reject => reject(&c, i)?,
    };
    Ok((i, Some(bhs)))
}

fn nop_out<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, cmd_sn, exp_stat_sn]) = words::<3>(i)?;
    let b = NopOut {
        immediate: c.immediate,
        lun,
        itt,
        ttt,
        cmd_sn,
        exp_stat_sn,
    };
    Ok((i, Bhs::NopOut(b)))
}

fn scsi_command<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [edtl, cmd_sn, exp_stat_sn]) = words::<3>(i)?;
    let (i, cdb) = take(16usize)(i)?;
    let mut cdb_arr = [0u8; 16];
    cdb_arr.copy_from_slice(cdb);
    let b = ScsiCommand {
        immediate: c.immediate,
        final_: bit(f, 0x80),
        read: bit(f, 0x40),
        write: bit(f, 0x20),
        attr: f & 0x07,
        lun,
        itt,
        expected_data_transfer_length: edtl,
        cmd_sn,
        exp_stat_sn,
        cdb: cdb_arr,
    };
    Ok((i, Bhs::ScsiCommand(b)))
}

fn task_mgmt_request<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn]) = words::<5>(i)?;
    let b = TaskMgmtRequest {
        immediate: c.immediate,
        function: f & 0x7f,
        lun,
        itt,
        referenced_task_tag: rtt,
        cmd_sn,
        exp_stat_sn,
        ref_cmd_sn,
        exp_data_sn,
    };
    Ok((i, Bhs::TaskMgmtRequest(b)))
}

fn login_request<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let itt = c.itt;
    let (isid, tsih) = isid_tsih(c.w8);
    let (i, cid) = be_u16(i)?;
    let (i, _) = be_u16(i)?;
    let (i, [cmd_sn, exp_stat_sn]) = words::<2>(i)?;
    let b = LoginRequest {
        transit: bit(f, 0x80),
        continue_: bit(f, 0x40),
        csg: (f >> 2) & 3,
        nsg: f & 3,
        version_max: c.b2,
        version_min: c.b3,
        isid,
        tsih,
        itt,
        cid,
        cmd_sn,
        exp_stat_sn,
    };
    Ok((i, Bhs::LoginRequest(b)))
}

fn text_request<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, cmd_sn, exp_stat_sn]) = words::<3>(i)?;
    let b = TextRequest {
        immediate: c.immediate,
        final_: bit(f, 0x80),
        continue_: bit(f, 0x40),
        lun,
        itt,
        ttt,
        cmd_sn,
        exp_stat_sn,
    };
    Ok((i, Bhs::TextRequest(b)))
}

fn data_out<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, _, exp_stat_sn, _, data_sn, buffer_offset]) = words::<6>(i)?;
    let b = DataOut {
        final_: bit(f, 0x80),
        lun,
        itt,
        ttt,
        exp_stat_sn,
        data_sn,
        buffer_offset,
    };
    Ok((i, Bhs::DataOut(b)))
}

fn logout_request<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let itt = c.itt;
    let (i, cid) = be_u16(i)?;
    let (i, _) = be_u16(i)?;
    let (i, [cmd_sn, exp_stat_sn]) = words::<2>(i)?;
    let b = LogoutRequest {
        immediate: c.immediate,
        reason: f & 0x7f,
        itt,
        cid,
        cmd_sn,
        exp_stat_sn,
    };
    Ok((i, Bhs::LogoutRequest(b)))
}

fn snack_request<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, _, exp_stat_sn, _, _, beg_run, run_length]) = words::<7>(i)?;
    let b = SnackRequest {
        type_: f & 0x0f,
        lun,
        itt,
        ttt,
        exp_stat_sn,
        beg_run,
        run_length,
    };
    Ok((i, Bhs::SnackRequest(b)))
}

fn nop_in<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, stat_sn, exp_cmd_sn, max_cmd_sn]) = words::<4>(i)?;
    Ok((
        i,
        Bhs::NopIn(NopIn {
            lun,
            itt,
            ttt,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
        }),
    ))
}

fn scsi_response<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let itt = c.itt;
    let (i, w) = words::<7>(i)?;
    let [snack_tag, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn, bidi, residual] = w;
    let b = ScsiResponse {
        bidi_overflow: bit(f, 0x10),
        bidi_underflow: bit(f, 0x08),
        overflow: bit(f, 0x04),
        underflow: bit(f, 0x02),
        response: c.b2,
        status: c.b3,
        itt,
        snack_tag,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        exp_data_sn,
        bidi_read_residual_count: bidi,
        residual_count: residual,
    };
    Ok((i, Bhs::ScsiResponse(b)))
}

fn task_mgmt_response<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let itt = c.itt;
    let (i, [_, stat_sn, exp_cmd_sn, max_cmd_sn]) = words::<4>(i)?;
    let b = TaskMgmtResponse {
        response: c.b2,
        itt,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
    };
    Ok((i, Bhs::TaskMgmtResponse(b)))
}

fn login_response<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let itt = c.itt;
    let (isid, tsih) = isid_tsih(c.w8);
    let (i, [_, stat_sn, exp_cmd_sn, max_cmd_sn]) = words::<4>(i)?;
    let (i, status_class) = be_u8(i)?;
    let (i, status_detail) = be_u8(i)?;
    let b = LoginResponse {
        transit: bit(f, 0x80),
        continue_: bit(f, 0x40),
        csg: (f >> 2) & 3,
        nsg: f & 3,
        version_max: c.b2,
        version_active: c.b3,
        isid,
        tsih,
        itt,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        status_class,
        status_detail,
    };
    Ok((i, Bhs::LoginResponse(b)))
}

fn text_response<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, [ttt, stat_sn, exp_cmd_sn, max_cmd_sn]) = words::<4>(i)?;
    let b = TextResponse {
        final_: bit(f, 0x80),
        continue_: bit(f, 0x40),
        lun,
        itt,
        ttt,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
    };
    Ok((i, Bhs::TextResponse(b)))
}

fn data_in<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let f = c.flags;
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, w) = words::<7>(i)?;
    let [ttt, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, buffer_offset, residual] = w;
    let s = bit(f, 0x01);
    let b = DataIn {
        final_: bit(f, 0x80),
        ack: bit(f, 0x40),
        overflow: bit(f, 0x04),
        underflow: bit(f, 0x02),
        status_present: s,
        // Status and StatSN are reserved unless the S bit is set.
        status: if s { c.b3 } else { 0 },
        lun,
        itt,
        ttt,
        stat_sn: if s { stat_sn } else { 0 },
        exp_cmd_sn,
        max_cmd_sn,
        data_sn,
        buffer_offset,
        residual_count: residual,
    };
    Ok((i, Bhs::DataIn(b)))
}

fn logout_response<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let itt = c.itt;
    let (i, [_, stat_sn, exp_cmd_sn, max_cmd_sn, _]) = words::<5>(i)?;
    let (i, time2wait) = be_u16(i)?;
    let (i, time2retain) = be_u16(i)?;
    let b = LogoutResponse {
        response: c.b2,
        itt,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        time2wait,
        time2retain,
    };
    Ok((i, Bhs::LogoutResponse(b)))
}

fn r2t<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let lun = lun_of(c.w8);
    let itt = c.itt;
    let (i, w) = words::<7>(i)?;
    let [ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, buffer_offset, ddtl] = w;
    let b = R2t {
        lun,
        itt,
        ttt,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        r2t_sn,
        buffer_offset,
        desired_data_transfer_length: ddtl,
    };
    Ok((i, Bhs::R2t(b)))
}

fn async_message<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let lun = lun_of(c.w8);
    let (i, [_, stat_sn, exp_cmd_sn, max_cmd_sn]) = words::<4>(i)?;
    let (i, async_event) = be_u8(i)?;
    let (i, async_vcode) = be_u8(i)?;
    let (i, parameter1) = be_u16(i)?;
    let (i, parameter2) = be_u16(i)?;
    let (i, parameter3) = be_u16(i)?;
    let b = AsyncMessage {
        lun,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        async_event,
        async_vcode,
        parameter1,
        parameter2,
        parameter3,
    };
    Ok((i, Bhs::AsyncMessage(b)))
}

fn reject<'a>(c: &Common<'_>, i: &'a [u8]) -> IResult<&'a [u8], Bhs> {
    let (i, [_, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn]) = words::<5>(i)?;
    let b = Reject {
        reason: c.b2,
        stat_sn,
        exp_cmd_sn,
        max_cmd_sn,
        data_sn,
    };
    Ok((i, Bhs::Reject(b)))
}

fn isid_tsih(w8: &[u8]) -> ([u8; 6], u16) {
    match w8 {
        [a, b, c, d, e, f, t0, t1] => ([*a, *b, *c, *d, *e, *f], u16::from_be_bytes([*t0, *t1])),
        _ => ([0; 6], 0),
    }
}
