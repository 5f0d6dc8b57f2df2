//! iSCSI PDU types (RFC 7143 §11): typed Basic Header Segments and the PDU container.
//!
//! Field names follow the RFC. Integers are host-order here; the codec converts.

use bytes::Bytes;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Reserved-for-"no tag" value of Initiator Task Tag / Target Transfer Tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

/// 8-byte LUN field as carried in the BHS (SAM encoding, not decoded here).
pub type LunField = u64;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttribute {
    Untagged = 0,
    #[default]
    Simple = 1,
    Ordered = 2,
    HeadOfQueue = 3,
    Aca = 4,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F bit: no unsolicited Data-Out PDUs follow.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Raw 3-bit ATTR field (see [`TaskAttribute`]); kept raw so reserved values survive decode.
    pub attr: u8,
    pub lun: LunField,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    /// The 16-byte CDB of the BHS. Longer CDBs continue in an Extended-CDB AHS.
    pub cdb: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// Function code (1 = ABORT TASK … 8 = TASK REASSIGN).
    pub function: u8,
    pub lun: LunField,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginRequest {
    /// T bit.
    pub transit: bool,
    /// C bit.
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 = close session, 1 = close connection, 2 = remove connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnackRequest {
    pub type_: u8,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    /// o bit: bidirectional read residual overflow.
    pub bidi_overflow: bool,
    /// u bit: bidirectional read residual underflow.
    pub bidi_underflow: bool,
    /// O bit.
    pub overflow: bool,
    /// U bit.
    pub underflow: bool,
    /// iSCSI service response (0 = command completed at target).
    pub response: u8,
    /// SCSI status byte.
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_read_residual_count: u32,
    pub residual_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    /// A bit (ERL>0 only; always false at ERL 0).
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S bit: status is carried in this PDU (then `final_` is set too).
    pub status_present: bool,
    pub status: u8,
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    /// Meaningful only when `status_present`; otherwise encoded as 0.
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: LunField,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: LunField,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub async_event: u8,
    pub async_vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// Task management function codes (RFC 7143 §11.5.1), one set for both sides.
pub mod tmf_function {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

/// Task management response codes (RFC 7143 §11.6.1).
pub mod tmf_response {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const STILL_ALLEGIANT: u8 = 3;
    pub const NO_REASSIGN: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const REJECTED: u8 = 255;
}

/// Reject reason codes (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    pub const NEGOTIATION_RESET: u8 = 0x0b;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// A typed Basic Header Segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// One Additional Header Segment (RFC 7143 §11.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ahs {
    /// 1 = Extended CDB, 2 = Bidirectional Read Expected Data Transfer Length.
    pub ahs_type: u8,
    /// AHS-specific bytes that follow the type byte (for Extended CDB this
    /// starts with the reserved byte, as on the wire); unpadded.
    pub data: Bytes,
}

/// A whole PDU: header, AHS list and the (unpadded) data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<Ahs>,
    pub data: Bytes,
}

impl Opcode {
    /// Map the 6-bit opcode field (already masked with 0x3f) to a known opcode.
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// Initiator opcodes are 0x00..=0x1f; target opcodes have bit 5 set.
    pub fn is_initiator(self) -> bool {
        (self as u8) & 0x20 == 0
    }
}

impl Bhs {
    pub fn opcode(&self) -> Opcode {
        match self {
            Bhs::NopOut(_) => Opcode::NopOut,
            Bhs::ScsiCommand(_) => Opcode::ScsiCommand,
            Bhs::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Bhs::LoginRequest(_) => Opcode::LoginRequest,
            Bhs::TextRequest(_) => Opcode::TextRequest,
            Bhs::DataOut(_) => Opcode::DataOut,
            Bhs::LogoutRequest(_) => Opcode::LogoutRequest,
            Bhs::SnackRequest(_) => Opcode::SnackRequest,
            Bhs::NopIn(_) => Opcode::NopIn,
            Bhs::ScsiResponse(_) => Opcode::ScsiResponse,
            Bhs::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Bhs::LoginResponse(_) => Opcode::LoginResponse,
            Bhs::TextResponse(_) => Opcode::TextResponse,
            Bhs::DataIn(_) => Opcode::DataIn,
            Bhs::LogoutResponse(_) => Opcode::LogoutResponse,
            Bhs::R2t(_) => Opcode::R2t,
            Bhs::AsyncMessage(_) => Opcode::AsyncMessage,
            Bhs::Reject(_) => Opcode::Reject,
        }
    }

    /// Initiator Task Tag. Async Message and Reject carry the reserved tag on the wire.
    pub fn itt(&self) -> u32 {
        match self {
            Bhs::NopOut(b) => b.itt,
            Bhs::ScsiCommand(b) => b.itt,
            Bhs::TaskMgmtRequest(b) => b.itt,
            Bhs::LoginRequest(b) => b.itt,
            Bhs::TextRequest(b) => b.itt,
            Bhs::DataOut(b) => b.itt,
            Bhs::LogoutRequest(b) => b.itt,
            Bhs::SnackRequest(b) => b.itt,
            Bhs::NopIn(b) => b.itt,
            Bhs::ScsiResponse(b) => b.itt,
            Bhs::TaskMgmtResponse(b) => b.itt,
            Bhs::LoginResponse(b) => b.itt,
            Bhs::TextResponse(b) => b.itt,
            Bhs::DataIn(b) => b.itt,
            Bhs::LogoutResponse(b) => b.itt,
            Bhs::R2t(b) => b.itt,
            Bhs::AsyncMessage(_) | Bhs::Reject(_) => RESERVED_TAG,
        }
    }

    /// The LUN field, for the PDU types that carry one.
    pub fn lun(&self) -> Option<LunField> {
        match self {
            Bhs::NopOut(b) => Some(b.lun),
            Bhs::ScsiCommand(b) => Some(b.lun),
            Bhs::TaskMgmtRequest(b) => Some(b.lun),
            Bhs::TextRequest(b) => Some(b.lun),
            Bhs::DataOut(b) => Some(b.lun),
            Bhs::SnackRequest(b) => Some(b.lun),
            Bhs::NopIn(b) => Some(b.lun),
            Bhs::TextResponse(b) => Some(b.lun),
            Bhs::DataIn(b) => Some(b.lun),
            Bhs::R2t(b) => Some(b.lun),
            Bhs::AsyncMessage(b) => Some(b.lun),
            _ => None,
        }
    }

    /// The I bit. Login requests always carry it (RFC 7143 §11.12).
    pub fn immediate(&self) -> bool {
        match self {
            Bhs::NopOut(b) => b.immediate,
            Bhs::ScsiCommand(b) => b.immediate,
            Bhs::TaskMgmtRequest(b) => b.immediate,
            Bhs::TextRequest(b) => b.immediate,
            Bhs::LogoutRequest(b) => b.immediate,
            Bhs::LoginRequest(_) => true,
            _ => false,
        }
    }

    /// CmdSN of initiator requests that carry one.
    pub fn cmd_sn(&self) -> Option<u32> {
        match self {
            Bhs::NopOut(b) => Some(b.cmd_sn),
            Bhs::ScsiCommand(b) => Some(b.cmd_sn),
            Bhs::TaskMgmtRequest(b) => Some(b.cmd_sn),
            Bhs::LoginRequest(b) => Some(b.cmd_sn),
            Bhs::TextRequest(b) => Some(b.cmd_sn),
            Bhs::LogoutRequest(b) => Some(b.cmd_sn),
            _ => None,
        }
    }

    /// ExpStatSN of initiator PDUs (all of them carry it).
    pub fn exp_stat_sn(&self) -> Option<u32> {
        match self {
            Bhs::NopOut(b) => Some(b.exp_stat_sn),
            Bhs::ScsiCommand(b) => Some(b.exp_stat_sn),
            Bhs::TaskMgmtRequest(b) => Some(b.exp_stat_sn),
            Bhs::LoginRequest(b) => Some(b.exp_stat_sn),
            Bhs::TextRequest(b) => Some(b.exp_stat_sn),
            Bhs::DataOut(b) => Some(b.exp_stat_sn),
            Bhs::LogoutRequest(b) => Some(b.exp_stat_sn),
            Bhs::SnackRequest(b) => Some(b.exp_stat_sn),
            _ => None,
        }
    }
}

impl Pdu {
    /// A PDU without AHS or data.
    pub fn new(bhs: Bhs) -> Self {
        Self {
            bhs,
            ahs: Vec::new(),
            data: Bytes::new(),
        }
    }

    pub fn with_data(bhs: Bhs, data: Bytes) -> Self {
        Self {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }
}
