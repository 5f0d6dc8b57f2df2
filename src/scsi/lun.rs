//! One logical unit: settings, the command table (the single source for dispatch, Data-Out
//! sizing and REPORT SUPPORTED OPERATION CODES), unit attentions and SCSI-2 reservations.

use super::alua::{self, AluaSettings};
use super::backend::BlockBackend;
use super::cdb;
use super::opcode;
use super::pr::{self, PrCaps, PrLoadError, PrState, PrStore, ProutEffects, Scsi2Verdict};
use super::range_lock::RangeLock;
use super::sense::{key, ua, Sense};
use super::{mode, sbc, spc, status, ItNexus, ScsiCommand, ScsiOutcome};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard};

/// Static description of one logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunSettings {
    /// Logical block size in bytes (512 by default).
    pub block_size: u32,
    /// Physical block size reported (READ CAPACITY 16 exponent, Block Limits
    /// granularity); a multiple of `block_size`. Defaults to `block_size`.
    pub physical_block_size: u32,
    pub read_only: bool,
    pub serial: String,
    /// NAA IEEE Registered Extended designator (16 bytes), persisted elsewhere.
    pub naa: [u8; 16],
    /// T10 vendor identification, 8 characters ("HOLDFAST").
    pub vendor: String,
    pub product: String,
    pub revision: String,
    /// Initial WCE (write cache enabled); with WCE off every write is flushed before it
    /// completes.
    pub write_cache: bool,
    /// Thin provisioning: UNMAP, WRITE SAME with UNMAP, GET LBA STATUS, LBPME.
    pub thin_provisioning: bool,
    /// Target port groups (one per gateway) for ALUA.
    pub alua: AluaSettings,
}

impl Default for LunSettings {
    fn default() -> Self {
        LunSettings {
            block_size: 512,
            physical_block_size: 512,
            read_only: false,
            serial: String::new(),
            naa: [0; 16],
            vendor: "HOLDFAST".into(),
            product: "holdfast disk".into(),
            revision: "0001".into(),
            write_cache: true,
            thin_provisioning: true,
            alua: AluaSettings::default(),
        }
    }
}

/// Why a command did not complete with GOOD.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    #[error("check condition: {0}")]
    Check(#[from] Sense),
    #[error("reservation conflict")]
    ReservationConflict,
}

pub(crate) type CmdResult = Result<Bytes, CmdError>;

/// One command as a handler sees it.
pub(crate) struct Request<'a> {
    pub cmd: &'a ScsiCommand,
    pub cdb: &'a [u8],
}

/// How the Data-Out length follows from the CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataOut {
    None,
    /// Transfer length in logical blocks.
    Blocks,
    /// WRITE SAME: one block unless NDOB.
    WriteSame,
    /// VERIFY: by BYTCHK (0: none, 1: all blocks, 3: one block).
    Verify,
    /// COMPARE AND WRITE: twice the blocks.
    CompareAndWrite,
    /// A parameter list length of `width` bytes at CDB byte `at`.
    Param {
        at: usize,
        width: usize,
    },
}

/// Class of a command for reservation checks: SCSI-2 RESERVE/RELEASE and the SPC-4 /
/// SBC-3 persistent reservation tables ("commands allowed in the presence of various
/// reservations"), decided in [`LogicalUnit::access_check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, REQUEST SENSE, RSOC,
    /// PERSISTENT RESERVE IN).
    Any,
    /// Allowed under every persistent reservation, conflicts with another nexus's SCSI-2
    /// reservation (TEST UNIT READY, READ CAPACITY).
    Status,
    /// RELEASE(6)/(10): SCSI-2 rules, with the SPC-4 §5.13.3 exceptions.
    Release,
    /// RESERVE(6)/(10): SCSI-2 rules, with the SPC-4 §5.13.3 exceptions.
    Reserve,
    /// Reads the medium or LU state (READ, VERIFY, PRE-FETCH, MODE SENSE, GET LBA
    /// STATUS, READ DEFECT DATA): allowed under WE, holder-only under EA, registrants
    /// under EA-RO/EA-AR.
    Read,
    /// Changes the medium or LU state (WRITE, WRITE SAME, UNMAP, COMPARE AND WRITE,
    /// ORWRITE, SYNCHRONIZE CACHE, MODE SELECT, START STOP UNIT, PREVENT ALLOW):
    /// holder-only under WE/EA, registrants under the RO/AR types.
    Write,
    /// PERSISTENT RESERVE OUT: its own key checks; conflicts with a SCSI-2 reservation.
    PrOut,
}

type Handler = fn(&LogicalUnit, &Request) -> CmdResult;

/// One row of the command table.
pub(crate) struct CommandSpec {
    pub opcode: u8,
    pub service_action: Option<u16>,
    pub name: &'static str,
    /// CDB usage data for REPORT SUPPORTED OPERATION CODES; its length is the CDB length.
    pub usage: &'static [u8],
    pub data_out: DataOut,
    pub access: Access,
    /// Reported unit attentions are not raised for this command (SAM-5 §5.14).
    pub ua_exempt: bool,
    /// Only offered when thin provisioning is on.
    pub thin_only: bool,
    pub handler: Handler,
}

const C: u8 = 0x04; // control byte: only NACA is examined (and rejected)

/// A table row: the opcode is the usage data's first byte.
macro_rules! cmd {
    ($sa:expr, $name:expr, $usage:expr, $dout:expr, $acc:expr, $h:expr) => {
        CommandSpec {
            opcode: $usage[0],
            service_action: $sa,
            name: $name,
            usage: &$usage,
            data_out: $dout,
            access: $acc,
            ua_exempt: false,
            thin_only: false,
            handler: $h,
        }
    };
}

const RW16: [u8; 16] = [
    0, 0xFA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, C,
];

const fn with(mut u: [u8; 16], opcode: u8, b1: u8) -> [u8; 16] {
    u[0] = opcode;
    u[1] = b1;
    u
}

const fn with10(opcode: u8, b1: u8) -> [u8; 10] {
    [opcode, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, C]
}

const fn with12(opcode: u8, b1: u8) -> [u8; 12] {
    [
        opcode, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, C,
    ]
}

/// Every command the device server implements. Dispatch, Data-Out sizing and REPORT
/// SUPPORTED OPERATION CODES all read this one table.
#[rustfmt::skip]
pub(crate) static COMMANDS: &[CommandSpec] = &[
    cmd!(None, "TEST UNIT READY", [opcode::TEST_UNIT_READY, 0, 0, 0, 0, C], DataOut::None, Access::Status, spc::test_unit_ready),
    CommandSpec { ua_exempt: true, ..cmd!(None, "REQUEST SENSE", [opcode::REQUEST_SENSE, 0x01, 0, 0, 0xFF, C], DataOut::None, Access::Any, spc::request_sense) },
    cmd!(None, "READ(6)", [opcode::READ_6, 0x1F, 0xFF, 0xFF, 0xFF, C], DataOut::None, Access::Read, sbc::read),
    cmd!(None, "WRITE(6)", [opcode::WRITE_6, 0x1F, 0xFF, 0xFF, 0xFF, C], DataOut::Blocks, Access::Write, sbc::write),
    CommandSpec { ua_exempt: true, ..cmd!(None, "INQUIRY", [opcode::INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, C], DataOut::None, Access::Any, spc::inquiry) },
    cmd!(None, "MODE SELECT(6)", [opcode::MODE_SELECT_6, 0x11, 0, 0, 0xFF, C], DataOut::Param { at: 4, width: 1 }, Access::Write, mode::mode_select),
    cmd!(None, "RESERVE(6)", [opcode::RESERVE_6, 0, 0, 0, 0, C], DataOut::None, Access::Reserve, spc::reserve),
    cmd!(None, "RELEASE(6)", [opcode::RELEASE_6, 0, 0, 0, 0, C], DataOut::None, Access::Release, spc::release),
    cmd!(None, "MODE SENSE(6)", [opcode::MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, C], DataOut::None, Access::Read, mode::mode_sense),
    cmd!(None, "START STOP UNIT", [opcode::START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, C], DataOut::None, Access::Write, spc::start_stop_unit),
    cmd!(None, "PREVENT ALLOW MEDIUM REMOVAL", [opcode::PREVENT_ALLOW, 0, 0, 0, 0x03, C], DataOut::None, Access::Write, spc::prevent_allow),
    cmd!(None, "READ CAPACITY(10)", [opcode::READ_CAPACITY_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, C], DataOut::None, Access::Status, sbc::read_capacity_10),
    cmd!(None, "READ(10)", with10(opcode::READ_10, 0xFA), DataOut::None, Access::Read, sbc::read),
    cmd!(None, "WRITE(10)", with10(opcode::WRITE_10, 0xFA), DataOut::Blocks, Access::Write, sbc::write),
    cmd!(None, "WRITE AND VERIFY(10)", with10(opcode::WRITE_VERIFY_10, 0xF2), DataOut::Blocks, Access::Write, sbc::write_and_verify),
    cmd!(None, "VERIFY(10)", with10(opcode::VERIFY_10, 0xF6), DataOut::Verify, Access::Read, sbc::verify),
    cmd!(None, "PRE-FETCH(10)", with10(opcode::PRE_FETCH_10, 0x02), DataOut::None, Access::Read, sbc::pre_fetch),
    cmd!(None, "SYNCHRONIZE CACHE(10)", with10(opcode::SYNC_CACHE_10, 0x06), DataOut::None, Access::Write, sbc::synchronize_cache),
    cmd!(None, "READ DEFECT DATA(10)", [opcode::READ_DEFECT_10, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, C], DataOut::None, Access::Read, sbc::read_defect_data),
    cmd!(None, "WRITE SAME(10)", with10(opcode::WRITE_SAME_10, 0xF8), DataOut::WriteSame, Access::Write, sbc::write_same),
    CommandSpec { thin_only: true, ..cmd!(None, "UNMAP", [opcode::UNMAP, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, C], DataOut::Param { at: 7, width: 2 }, Access::Write, sbc::unmap) },
    cmd!(None, "MODE SELECT(10)", [opcode::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, C], DataOut::Param { at: 7, width: 2 }, Access::Write, mode::mode_select),
    cmd!(None, "RESERVE(10)", [opcode::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, C], DataOut::Param { at: 7, width: 2 }, Access::Reserve, spc::reserve),
    cmd!(None, "RELEASE(10)", [opcode::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, C], DataOut::Param { at: 7, width: 2 }, Access::Release, spc::release),
    cmd!(None, "MODE SENSE(10)", [opcode::MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, C], DataOut::None, Access::Read, mode::mode_sense),
    cmd!(None, "PERSISTENT RESERVE IN", [opcode::PERSISTENT_RESERVE_IN, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, C], DataOut::None, Access::Any, spc::persistent_reserve_in),
    cmd!(None, "PERSISTENT RESERVE OUT", [opcode::PERSISTENT_RESERVE_OUT, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, C], DataOut::Param { at: 5, width: 4 }, Access::PrOut, spc::persistent_reserve_out),
    cmd!(None, "READ(16)", with(RW16, opcode::READ_16, 0xFA), DataOut::None, Access::Read, sbc::read),
    cmd!(None, "COMPARE AND WRITE", [opcode::COMPARE_AND_WRITE, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, C], DataOut::CompareAndWrite, Access::Write, sbc::compare_and_write),
    cmd!(None, "WRITE(16)", with(RW16, opcode::WRITE_16, 0xFA), DataOut::Blocks, Access::Write, sbc::write),
    cmd!(None, "ORWRITE(16)", with(RW16, opcode::ORWRITE_16, 0xF8), DataOut::Blocks, Access::Write, sbc::orwrite),
    cmd!(None, "WRITE AND VERIFY(16)", with(RW16, opcode::WRITE_VERIFY_16, 0xF2), DataOut::Blocks, Access::Write, sbc::write_and_verify),
    cmd!(None, "VERIFY(16)", with(RW16, opcode::VERIFY_16, 0xF6), DataOut::Verify, Access::Read, sbc::verify),
    cmd!(None, "PRE-FETCH(16)", with(RW16, opcode::PRE_FETCH_16, 0x02), DataOut::None, Access::Read, sbc::pre_fetch),
    cmd!(None, "SYNCHRONIZE CACHE(16)", with(RW16, opcode::SYNC_CACHE_16, 0x06), DataOut::None, Access::Write, sbc::synchronize_cache),
    cmd!(None, "WRITE SAME(16)", with(RW16, opcode::WRITE_SAME_16, 0xF9), DataOut::WriteSame, Access::Write, sbc::write_same),
    cmd!(Some(opcode::SA_READ_CAPACITY_16), "READ CAPACITY(16)", [opcode::SERVICE_ACTION_IN_16, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Status, sbc::read_capacity_16),
    CommandSpec { thin_only: true, ..cmd!(Some(opcode::SA_GET_LBA_STATUS), "GET LBA STATUS", [opcode::SERVICE_ACTION_IN_16, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Read, sbc::get_lba_status) },
    CommandSpec { ua_exempt: true, ..cmd!(None, "REPORT LUNS", [opcode::REPORT_LUNS, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Any, spc::report_luns_single) },
    cmd!(Some(opcode::SA_REPORT_TARGET_PORT_GROUPS), "REPORT TARGET PORT GROUPS", [opcode::MAINTENANCE_IN, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Any, alua::report_target_port_groups),
    cmd!(Some(opcode::SA_REPORT_SUPPORTED_OPCODES), "REPORT SUPPORTED OPERATION CODES", [opcode::MAINTENANCE_IN, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Any, spc::report_supported_opcodes),
    cmd!(None, "READ(12)", with12(opcode::READ_12, 0xFA), DataOut::None, Access::Read, sbc::read),
    cmd!(None, "WRITE(12)", with12(opcode::WRITE_12, 0xFA), DataOut::Blocks, Access::Write, sbc::write),
    cmd!(None, "WRITE AND VERIFY(12)", with12(opcode::WRITE_VERIFY_12, 0xF2), DataOut::Blocks, Access::Write, sbc::write_and_verify),
    cmd!(None, "VERIFY(12)", with12(opcode::VERIFY_12, 0xF6), DataOut::Verify, Access::Read, sbc::verify),
    cmd!(None, "READ DEFECT DATA(12)", [opcode::READ_DEFECT_12, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, C], DataOut::None, Access::Read, sbc::read_defect_data),
];

/// Opcodes whose CDB carries a service action in byte 1 bits 4..0.
pub(crate) fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// Find the table row for a CDB, or the sense to return.
pub(crate) fn lookup(cdb: &[u8]) -> Result<&'static CommandSpec, Sense> {
    let opcode = cdb::byte(cdb, 0);
    let mut seen_opcode = false;
    for c in COMMANDS {
        if c.opcode != opcode {
            continue;
        }
        seen_opcode = true;
        match c.service_action {
            None => return Ok(c),
            Some(sa) if u16::from(cdb::byte(cdb, 1) & 0x1F) == sa => return Ok(c),
            Some(_) => {}
        }
    }
    if seen_opcode {
        Err(Sense::invalid_cdb(1, Some(4)))
    } else {
        Err(Sense::INVALID_OPCODE)
    }
}

/// Limits advertised in the Block Limits VPD page and enforced by the SBC handlers.
pub(crate) mod limits {
    /// Largest READ/WRITE in bytes; bounds the buffer a peer can make us allocate.
    pub const MAX_TRANSFER_BYTES: u64 = 64 << 20;
    pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 128;
    pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
    pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
    /// Largest WRITE SAME in bytes (it is replicated in bounded chunks, never buffered whole).
    pub const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;
}

/// Pending unit attentions of one I_T nexus the LU has seen.
#[derive(Debug, Default)]
struct NexusState {
    unit_attentions: VecDeque<(u8, u8)>,
}

/// At most this many unit attentions queue per nexus; later ones are dropped (the oldest
/// report is the one SAM requires first).
const MAX_QUEUED_UA: usize = 16;

/// A logical unit: executes SCSI commands against a [`BlockBackend`].
#[derive(Debug)]
pub struct LogicalUnit {
    settings: LunSettings,
    backend: Arc<dyn BlockBackend>,
    block_size: u64,
    /// Only ever grows (a live reload, see [`LogicalUnit::capacity_grown`]).
    num_blocks: AtomicU64,
    pub(crate) wce: AtomicBool,
    pub(crate) d_sense: AtomicBool,
    pub(crate) ranges: RangeLock,
    nexuses: RwLock<HashMap<ItNexus, NexusState>>,
    /// Count of queued unit attentions over all nexuses: lets the hot path skip the map.
    ua_pending: AtomicUsize,
    /// SCSI-2 RESERVE holder.
    reservation: Mutex<Option<ItNexus>>,
    reserved: AtomicBool,
    /// Persistent reservation state, and the PREEMPT AND ABORT fence: every command
    /// subject to reservations holds the read side from its access check to the end of
    /// its I/O; PR OUT takes the write side, so once a PR OUT returns, no command admitted
    /// under the old state is still running, and later ones see the new state.
    pr: RwLock<PrState>,
    /// Where the state goes when APTPL is set; None: APTPL is not supported.
    pr_store: Option<Box<dyn PrStore>>,
    abort_hook: AbortHook,
    /// The PR state is shared with other gateways (an RBD image): PR OUT goes through it.
    shared_pr: OnceLock<Arc<dyn SharedPr>>,
    /// Sequence number of the shared state installed in `pr` (changed under its write lock).
    shared_seq: AtomicU64,
    /// The shared state may be out of date (the watch broke): NOT READY until re-read.
    pr_stale: AtomicBool,
    /// One shared PR OUT at a time from this gateway (the PR lock is not held across
    /// the round trip: other gateways' notices must be able to install meanwhile).
    pr_out_serial: Mutex<()>,
    /// The task set (one for all nexuses, TST=000b); see `task_set.rs` and `tmf.rs`.
    pub(super) tasks: Mutex<super::task_set::TaskSet>,
    /// Set after a fatal backend error: medium access answers NOT READY from then on.
    offline: AtomicBool,
    /// Backend errors since the last command that succeeded.
    consecutive_errors: AtomicUsize,
}

/// Consecutive backend errors (with no success in between) that take a LU offline: one
/// EIO may be a bad sector, a run of them is a dead device.
pub const OFFLINE_AFTER_ERRORS: usize = 8;

/// Errors of a store reached over the network that did not answer in time (librados'
/// operation timeout): the store may answer again, the medium is not at fault.
fn unreachable_store(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ETIMEDOUT | libc::ENOTCONN))
}

/// NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY for a store that did not
/// answer: the one NOT READY that initiators retry after a delay (Linux:
/// ACTION_DELAYED_RETRY) rather than failing the I/O, as MEDIUM ERROR would.
const STORE_UNREACHABLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x01);

/// Errors that mean the device itself is gone, not one bad range.
fn fatal_io_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENODEV | libc::ENXIO | libc::EBADF | libc::ESTALE)
    )
}

/// A PR OUT committed to shared state, installed on every other gateway.
#[derive(Debug, Clone)]
pub struct SharedCommit {
    pub state: PrState,
    pub effects: ProutEffects,
    /// Sequence number of `state` (orders installs from concurrent notices).
    pub seq: u64,
    /// Whether every other gateway has the state.
    pub published: Published,
}

/// How far a committed shared PR state reached the other gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Every other gateway installed it or was fenced (or nothing changed).
    Everywhere,
    /// A silent gateway could not be fenced: the command fails.
    Incomplete,
    /// This gateway was fenced before it could tell the others: the command answers
    /// NOT READY, as a PR OUT refused for that reason does, and the LU waits for the
    /// watcher's reload (which re-publishes what it reads).
    FencedHere,
}

/// What a shared PR OUT applies to the authoritative state: the next state and its
/// effects, or the command's error.
pub type PrApply<'a> = dyn FnMut(&PrState) -> Result<(PrState, ProutEffects), CmdError> + 'a;

/// Persistent reservation state kept outside this process and shared by several
/// gateways (one logical unit spanning them). Implemented by the RBD backend.
pub trait SharedPr: Send + Sync + std::fmt::Debug {
    /// Apply `apply` to the current shared state (retrying it on a concurrent change),
    /// commit the result and have every other gateway install it. A PR OUT that
    /// changes nothing is not written (`effects.changed` false).
    fn update(&self, apply: &mut PrApply<'_>) -> Result<SharedCommit, SharedPrError>;

    /// Tell every other gateway that this logical unit was reset here (LOGICAL UNIT
    /// RESET or a target reset): each aborts its tasks on it and raises 29/03 for its
    /// nexuses ([`LogicalUnit::reset_from_peer`]). Silent gateways are fenced.
    fn announce_reset(&self) -> Published;
}

/// Why a shared PR OUT was not committed.
#[derive(Debug, thiserror::Error)]
pub enum SharedPrError {
    /// The command itself failed (a conflict, an invalid field): answered as it is.
    #[error(transparent)]
    Command(#[from] CmdError),
    /// This gateway's client was fenced (blocklisted) in the shared store: NOT READY
    /// until the watcher has reconnected and re-read the state, as for any other command.
    #[error("this gateway's client is fenced")]
    Fenced,
    /// The shared state could not be read or written (the store logged why).
    #[error("the shared reservation state is unavailable")]
    Unavailable,
}

/// NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY: the gateway is re-reading
/// the shared reservation state; initiators retry it (or another path) instead of
/// failing the I/O.
const PR_STATE_RELOADING: Sense = Sense::new(key::NOT_READY, 0x04, 0x01);

/// Called after PREEMPT AND ABORT with the preempted nexuses this LU has seen, so the
/// transport can abort their queued tasks. The conflict guarantee does not depend on it.
pub type AbortHookFn = Box<dyn Fn(&[ItNexus]) + Send + Sync>;

#[derive(Default)]
struct AbortHook(RwLock<Option<AbortHookFn>>);

impl std::fmt::Debug for AbortHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortHook")
    }
}

/// The (ASC, ASCQ) of a CHECK CONDITION with sense key UNIT ATTENTION, in either sense
/// format.
fn unit_attention_in(o: &ScsiOutcome) -> Option<(u8, u8)> {
    if o.status != status::CHECK_CONDITION {
        return None;
    }
    let b = o.sense.as_deref()?;
    let (k, asc, ascq) = match b.first()? & 0x7f {
        0x70 | 0x71 => (b.get(2)? & 0x0f, *b.get(12)?, *b.get(13)?),
        0x72 | 0x73 => (b.get(1)? & 0x0f, *b.get(2)?, *b.get(3)?),
        _ => return None,
    };
    (k == key::UNIT_ATTENTION).then_some((asc, ascq))
}

fn conflict_outcome() -> ScsiOutcome {
    ScsiOutcome {
        status: status::RESERVATION_CONFLICT,
        sense: None,
        data_in: Bytes::new(),
    }
}

impl LogicalUnit {
    pub fn new(mut settings: LunSettings, backend: Arc<dyn BlockBackend>) -> Self {
        if !(512..=65536).contains(&settings.block_size) {
            tracing::warn!(
                block_size = settings.block_size,
                "unsupported block size, using 512"
            );
            settings.block_size = 512;
        }
        let block_size = u64::from(settings.block_size);
        let num_blocks = backend.size() / block_size;
        LogicalUnit {
            wce: AtomicBool::new(settings.write_cache),
            d_sense: AtomicBool::new(false),
            settings,
            backend,
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            ranges: RangeLock::new(),
            nexuses: RwLock::new(HashMap::new()),
            ua_pending: AtomicUsize::new(0),
            reservation: Mutex::new(None),
            reserved: AtomicBool::new(false),
            pr: RwLock::new(PrState::default()),
            pr_store: None,
            abort_hook: AbortHook::default(),
            shared_pr: OnceLock::new(),
            shared_seq: AtomicU64::new(0),
            pr_stale: AtomicBool::new(false),
            pr_out_serial: Mutex::new(()),
            tasks: Mutex::default(),
            offline: AtomicBool::new(false),
            consecutive_errors: AtomicUsize::new(0),
        }
    }

    /// A logical unit whose persistent reservation state survives restarts when APTPL is
    /// set: loaded from `store` now, saved to it before every PR OUT that changes it
    /// completes. An unreadable or corrupt saved state is an error (the LUN must not
    /// come up without its reservations).
    pub fn with_persistence(
        settings: LunSettings,
        backend: Arc<dyn BlockBackend>,
        store: Box<dyn PrStore>,
    ) -> Result<Self, PrLoadError> {
        let state = match store.load()? {
            Some(bytes) => PrState::from_bytes(&bytes)?,
            None => PrState::default(),
        };
        if !state.registrations.is_empty() {
            tracing::info!(
                store = %store.describe(),
                registrations = state.registrations.len(),
                reserved = state.reservation.is_some(),
                "persistent reservations restored"
            );
        }
        let mut lu = LogicalUnit::new(settings, backend);
        lu.pr = RwLock::new(state);
        lu.pr_store = Some(store);
        Ok(lu)
    }

    /// Register the PREEMPT AND ABORT hook (replacing any previous one).
    pub fn set_abort_hook(&self, f: AbortHookFn) {
        *self
            .abort_hook
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(f);
    }

    /// A copy of the persistent reservation state (diagnostics and tests).
    pub fn pr_state(&self) -> PrState {
        self.pr_read().clone()
    }

    fn pr_read(&self) -> RwLockReadGuard<'_, PrState> {
        self.pr.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn pr_caps(&self) -> PrCaps {
        PrCaps {
            ptpl: self.pr_store.is_some() || self.shared_pr.get().is_some(),
        }
    }

    /// Serve PR OUT through shared state from now on (the local APTPL store is no
    /// longer used). Call once, before the LU serves commands.
    pub fn set_shared_pr(&self, shared: Arc<dyn SharedPr>) {
        let _ = self.shared_pr.set(shared);
    }

    /// Whether the shared state may be out of date (commands answer NOT READY).
    pub fn is_pr_stale(&self) -> bool {
        self.pr_stale.load(Ordering::Acquire)
    }

    /// Mark the shared state possibly stale (true: commands subject to reservations get
    /// NOT READY) or fresh again after it was re-read and installed.
    pub fn set_pr_stale(&self, stale: bool) {
        if self.pr_stale.swap(stale, Ordering::AcqRel) != stale {
            tracing::warn!(stale, serial = %self.settings.serial, "shared reservation state");
        }
    }

    /// Install shared state `seq` (unless a newer one is already installed) and apply
    /// `fx`: unit attentions for this gateway's matching nexuses, aborts for its
    /// preempted ones. Under the PR write lock, so every command admitted under the old
    /// state has finished when this returns. `issuer`: the nexus that sent the PR OUT,
    /// when it is on this gateway (it gets no unit attention and is not aborted).
    pub fn install_shared_pr(
        &self,
        seq: u64,
        state: PrState,
        fx: &ProutEffects,
        issuer: Option<&ItNexus>,
    ) {
        let mut st = self.pr.write().unwrap_or_else(PoisonError::into_inner);
        if seq >= self.shared_seq.load(Ordering::Acquire) {
            *st = state;
            self.shared_seq.store(seq, Ordering::Release);
        }
        let victims = self.queue_effects(fx, issuer);
        drop(st);
        self.abort(&victims);
    }

    /// Queue `fx`'s unit attentions and return the nexuses it preempts (call with the PR
    /// write lock held).
    fn queue_effects(&self, fx: &ProutEffects, issuer: Option<&ItNexus>) -> Vec<ItNexus> {
        let not_issuer = |x: &ItNexus| issuer != Some(x);
        for n in &fx.uas {
            self.queue_unit_attention(
                &|x| not_issuer(x) && n.to.iter().any(|id| id.matches(x)),
                n.asc,
                n.ascq,
            );
        }
        if fx.aborted.is_empty() {
            return Vec::new();
        }
        self.nexuses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|x| not_issuer(x) && fx.aborted.iter().any(|id| id.matches(x)))
            .cloned()
            .collect()
    }

    fn abort(&self, victims: &[ItNexus]) {
        if victims.is_empty() {
            return;
        }
        tracing::info!(
            victims = victims.len(),
            "aborting the tasks of other nexuses"
        );
        if let Some(hook) = &*self
            .abort_hook
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            hook(victims);
        }
    }

    /// PR OUT through shared state: applied to the authoritative copy, committed and
    /// installed on every other gateway, then installed here.
    fn pr_out_shared(&self, shared: &dyn SharedPr, req: &Request) -> CmdResult {
        let nexus: &ItNexus = &req.cmd.nexus;
        let _one = self
            .pr_out_serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // SCSI-2 reservations stay local to this gateway.
        if self.access_check(None, nexus, Access::PrOut).is_err() {
            return Err(CmdError::ReservationConflict);
        }
        let caps = self.pr_caps();
        let mut apply = |cur: &PrState| {
            let mut next = cur.clone();
            let fx = next.prout(nexus, req.cdb, &req.cmd.data_out, caps)?;
            Ok((next, fx))
        };
        let c = shared.update(&mut apply).map_err(|e| match e {
            SharedPrError::Command(c) => c,
            SharedPrError::Fenced => self.fenced_here("PR OUT refused"),
            SharedPrError::Unavailable => Sense::INTERNAL_TARGET_FAILURE.into(),
        })?;
        tracing::debug!(
            action = cdb::byte(req.cdb, 1) & 0x1F,
            initiator = %nexus.initiator_port_id(),
            seq = c.seq,
            "shared persistent reserve out"
        );
        if c.effects.changed {
            self.install_shared_pr(c.seq, c.state, &c.effects, Some(nexus));
        }
        match c.published {
            Published::Everywhere => Ok(Bytes::new()),
            Published::Incomplete => Err(Sense::INTERNAL_TARGET_FAILURE.into()),
            Published::FencedHere => Err(self.fenced_here("PR OUT committed but not published")),
        }
    }

    /// This gateway is fenced in the shared store: NOT READY (becoming ready) until the
    /// watcher has reconnected and re-read the state.
    fn fenced_here(&self, what: &str) -> CmdError {
        tracing::warn!(serial = %self.settings.serial, what,
            "this gateway is fenced; NOT READY until reconnected");
        self.set_pr_stale(true);
        PR_STATE_RELOADING.into()
    }

    /// PERSISTENT RESERVE IN.
    pub(crate) fn pr_in(&self, req: &Request) -> CmdResult {
        let data = self.pr_read().prin(req.cdb, self.pr_caps())?;
        Ok(Bytes::from(data))
    }

    /// PERSISTENT RESERVE OUT: under the write side of the PR lock, so it waits for every
    /// in-flight command admitted under the old state; the new state is made durable
    /// (APTPL) before it is installed and before the command completes.
    pub(crate) fn pr_out(&self, req: &Request) -> CmdResult {
        if let Some(shared) = self.shared_pr.get() {
            return self.pr_out_shared(&**shared, req);
        }
        let nexus: &ItNexus = &req.cmd.nexus;
        let mut st = self.pr.write().unwrap_or_else(PoisonError::into_inner);
        if let Err(o) = self.access_check(Some(&st), nexus, Access::PrOut) {
            debug_assert_eq!(o.status, status::RESERVATION_CONFLICT);
            return Err(CmdError::ReservationConflict);
        }
        let mut next = st.clone();
        let fx = next.prout(nexus, req.cdb, &req.cmd.data_out, self.pr_caps())?;
        if fx.changed {
            if let Some(store) = &self.pr_store {
                let r = if next.aptpl {
                    store.save(&next.to_bytes())
                } else if st.aptpl {
                    store.remove()
                } else {
                    Ok(())
                };
                if let Err(e) = r {
                    tracing::error!(store = %store.describe(), error = %e,
                        "cannot persist reservation state; PR OUT refused");
                    return Err(Sense::INTERNAL_TARGET_FAILURE.into());
                }
            }
        }
        *st = next;
        tracing::debug!(
            action = cdb::byte(req.cdb, 1) & 0x1F,
            initiator = %nexus.initiator_port_id(),
            generation = st.generation,
            "persistent reserve out"
        );
        let victims = self.queue_effects(&fx, Some(nexus));
        drop(st);
        self.abort(&victims);
        Ok(Bytes::new())
    }

    pub fn settings(&self) -> &LunSettings {
        &self.settings
    }

    pub(crate) fn backend(&self) -> &dyn BlockBackend {
        &*self.backend
    }

    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// The backend grew (a live reload): take its new size as the capacity and raise
    /// CAPACITY DATA HAS CHANGED (2A/09) for every nexus of this LU, `seeing` included
    /// (nexuses that may address it but have sent it nothing yet). Returns the new
    /// number of blocks.
    pub fn capacity_grown(&self, seeing: &[ItNexus]) -> u64 {
        let blocks = self.backend.size() / self.block_size;
        self.num_blocks.fetch_max(blocks, Ordering::AcqRel);
        let (asc, ascq) = ua::CAPACITY_DATA_HAS_CHANGED;
        for n in seeing {
            self.note_nexus(n);
        }
        self.queue_unit_attention(&|_| true, asc, ascq);
        self.num_blocks()
    }

    /// Raise a unit attention for one nexus, whether or not it has addressed this LU yet
    /// (REPORTED LUNS DATA HAS CHANGED reaches a session through any LU it can see).
    pub fn queue_unit_attention_for(&self, nexus: &ItNexus, (asc, ascq): (u8, u8)) {
        self.note_nexus(nexus);
        self.queue_unit_attention(&|n| n == nexus, asc, ascq);
    }

    pub(crate) fn max_transfer_blocks(&self) -> u64 {
        limits::MAX_TRANSFER_BYTES / self.block_size
    }

    /// log2(physical block / logical block), as configured.
    pub(crate) fn physical_block_exponent(&self) -> u8 {
        let ratio = u64::from(self.settings.physical_block_size) / self.block_size.max(1);
        ratio.max(1).trailing_zeros().min(15) as u8
    }

    pub(crate) fn max_write_same_blocks(&self) -> u64 {
        limits::MAX_WRITE_SAME_BYTES / self.block_size
    }

    /// CHECK CONDITION with sense in the LU's current format.
    pub(crate) fn check(&self, sense: Sense) -> ScsiOutcome {
        ScsiOutcome {
            status: status::CHECK_CONDITION,
            sense: Some(sense.encode(self.d_sense.load(Ordering::Relaxed))),
            data_in: Bytes::new(),
        }
    }

    fn outcome(&self, r: CmdResult) -> ScsiOutcome {
        match r {
            Ok(data_in) => ScsiOutcome {
                status: status::GOOD,
                sense: None,
                data_in,
            },
            Err(CmdError::Check(s)) => self.check(s),
            Err(CmdError::ReservationConflict) => ScsiOutcome {
                status: status::RESERVATION_CONFLICT,
                sense: None,
                data_in: Bytes::new(),
            },
        }
    }

    /// Execute one command (blocking on backend I/O).
    pub fn execute(&self, cmd: &ScsiCommand) -> ScsiOutcome {
        let (spec, guard) = match self.admit(cmd) {
            Ok(admitted) => admitted,
            Err(outcome) => return outcome,
        };
        tracing::trace!(command = spec.name, lun = cmd.lun, "execute");
        let req = Request { cmd, cdb: &cmd.cdb };
        let result = (spec.handler)(self, &req);
        drop(guard);
        self.finish(spec, result)
    }

    /// The checks every command passes before its handler: unit offline, unit attention,
    /// opcode and CDB, reservations. Ok: the command's entry and, for commands subject to
    /// reservations, the read side of the PR lock, to hold through the handler's I/O (the
    /// PREEMPT AND ABORT fence; PR IN and PR OUT take the lock themselves). Err: the
    /// outcome to send instead.
    pub(crate) fn admit(
        &self,
        cmd: &ScsiCommand,
    ) -> Result<(&'static CommandSpec, Option<RwLockReadGuard<'_, PrState>>), ScsiOutcome> {
        let cdb: &[u8] = &cmd.cdb;
        self.note_nexus(&cmd.nexus);
        if self.offline.load(Ordering::Acquire)
            && !matches!(
                cdb::byte(cdb, 0),
                opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
            )
        {
            // SPC-4: identification and LUN inventory still work on a failed unit.
            return Err(self.check(Sense::LOGICAL_UNIT_OFFLINE));
        }
        let found = lookup(cdb);
        let exempt = matches!(found, Ok(spec) if spec.ua_exempt);
        if !exempt {
            if let Some((asc, ascq)) = self.take_unit_attention(&cmd.nexus) {
                return Err(self.check(Sense::unit_attention(asc, ascq)));
            }
        }
        let spec = found.map_err(|sense| self.check(sense))?;
        if spec.thin_only && !self.settings.thin_provisioning {
            return Err(self.check(Sense::INVALID_OPCODE));
        }
        let len = spec.usage.len();
        if cdb.len() < len {
            return Err(self.check(Sense::invalid_cdb(0, None)));
        }
        // No ACA support: NACA=1 in the control byte is an invalid field.
        if cdb::byte(cdb, len - 1) & 0x04 != 0 {
            return Err(self.check(Sense::invalid_cdb((len - 1) as u16, Some(2))));
        }
        let guard = match spec.access {
            Access::Any | Access::PrOut => None,
            _ => Some(self.pr_read()),
        };
        let subject = spec.access != Access::Any || spec.opcode == opcode::PERSISTENT_RESERVE_IN;
        if subject && self.pr_stale.load(Ordering::Acquire) {
            return Err(self.check(PR_STATE_RELOADING));
        }
        if spec.access != Access::PrOut {
            self.access_check(guard.as_deref(), &cmd.nexus, spec.access)?;
        }
        Ok((spec, guard))
    }

    /// The outcome of a handler's `result`, after the bookkeeping every command shares.
    pub(crate) fn finish(&self, spec: &CommandSpec, result: CmdResult) -> ScsiOutcome {
        // Only a command that touched the medium proves the backend works again (a TEST
        // UNIT READY poll must not hide a dead device).
        if result.is_ok()
            && matches!(spec.access, Access::Read | Access::Write)
            && self.consecutive_errors.load(Ordering::Relaxed) != 0
        {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
        self.outcome(result)
    }

    /// Bytes of Data-Out the CDB asks for (0 for no data / unknown opcode / invalid CDB).
    pub fn data_out_length(&self, cdb: &[u8]) -> u32 {
        let Ok(spec) = lookup(cdb) else { return 0 };
        if cdb.len() < spec.usage.len() {
            return 0;
        }
        let bs = self.block_size;
        let max = self.max_transfer_blocks();
        let blocks = |n: u64| -> u64 {
            // Over-limit requests fail in execute; do not invite the transport to buffer them.
            if n > max {
                0
            } else {
                n * bs
            }
        };
        let bytes = match spec.data_out {
            DataOut::None => 0,
            DataOut::Blocks => blocks(u64::from(cdb::block_range(cdb).blocks)),
            DataOut::WriteSame => {
                if spec.opcode == opcode::WRITE_SAME_16 && cdb::byte(cdb, 1) & 0x01 != 0 {
                    0
                } else {
                    bs
                }
            }
            DataOut::Verify => match (cdb::byte(cdb, 1) >> 1) & 0x03 {
                1 => blocks(u64::from(cdb::block_range(cdb).blocks)),
                3 => bs,
                _ => 0,
            },
            DataOut::CompareAndWrite => {
                let n = u64::from(cdb::block_range(cdb).blocks);
                if n > u64::from(limits::MAX_COMPARE_AND_WRITE_BLOCKS) {
                    0
                } else {
                    2 * n * bs
                }
            }
            DataOut::Param { at, width } => match width {
                1 => u64::from(cdb::byte(cdb, at)),
                2 => u64::from(cdb::be16(cdb, at)),
                // Over-long PR OUT lists fail in execute; do not buffer them.
                _ => match cdb::be32(cdb, at) {
                    n if n > pr::MAX_PARAM_LIST => 0,
                    n => u64::from(n),
                },
            },
        };
        u32::try_from(bytes).unwrap_or(0)
    }

    /// LOGICAL UNIT RESET (or a target reset): drop the SCSI-2 reservation and raise
    /// BUS DEVICE RESET FUNCTION OCCURRED (29/03) for every nexus seen so far, the one
    /// that asked for the reset included (SAM-5 §6.3; multipath initiators check for it).
    pub fn reset(&self) {
        self.clear_reservation();
        let (asc, ascq) = ua::BUS_DEVICE_RESET_FUNCTION_OCCURRED;
        self.queue_unit_attention(&|_| true, asc, ascq);
    }

    /// A LU reset done on another gateway of a logical unit spanning several: every
    /// task here is aborted (through the abort hook, as PREEMPT AND ABORT does) and
    /// every nexus gets 29/03, as for a reset here.
    pub fn reset_from_peer(&self) {
        let all: Vec<ItNexus> = (self.nexuses.read())
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        tracing::info!(serial = %self.settings.serial, nexuses = all.len(),
            "logical unit reset on another gateway");
        self.abort(&all);
        self.reset();
    }

    /// After a reset here: have the other gateways reset too (a no-op without shared
    /// state). Blocks up to the shared store's notify timeout.
    pub fn announce_reset(&self) {
        let Some(shared) = self.shared_pr.get() else {
            return;
        };
        match shared.announce_reset() {
            Published::Everywhere => {}
            other => tracing::error!(serial = %self.settings.serial, ?other,
                "the other gateways could not all be told of the reset"),
        }
    }

    /// Whether a reset here must be announced to other gateways.
    pub fn spans_gateways(&self) -> bool {
        self.shared_pr.get().is_some()
    }

    /// I_T nexus loss: release its SCSI-2 reservation and forget its state (a nexus that
    /// logs in again starts without unit attentions).
    pub fn nexus_lost(&self, nexus: &ItNexus) {
        self.release(nexus);
        let mut map = self.nexuses.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = map.remove(nexus) {
            self.ua_pending
                .fetch_sub(state.unit_attentions.len(), Ordering::AcqRel);
        }
    }

    /// Queue a unit attention (asc/ascq) for every seen nexus `nexus_filter` accepts.
    pub fn queue_unit_attention(&self, nexus_filter: &dyn Fn(&ItNexus) -> bool, asc: u8, ascq: u8) {
        let mut map = self.nexuses.write().unwrap_or_else(PoisonError::into_inner);
        for (nexus, state) in map.iter_mut() {
            if !nexus_filter(nexus) {
                continue;
            }
            let q = &mut state.unit_attentions;
            if q.len() < MAX_QUEUED_UA && !q.contains(&(asc, ascq)) {
                q.push_back((asc, ascq));
                self.ua_pending.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Remember a nexus so resets and mode changes can reach it with a unit attention.
    /// A fresh nexus gets no power-on UA (kept simple on purpose).
    fn note_nexus(&self, nexus: &ItNexus) {
        {
            let map = self.nexuses.read().unwrap_or_else(PoisonError::into_inner);
            if map.contains_key(nexus) {
                return;
            }
        }
        self.nexuses
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(nexus.clone())
            .or_default();
    }

    /// A response that was never delivered (its task was aborted, e.g. by PREEMPT AND
    /// ABORT) reported nothing: if it carried a unit attention, queue it again in front, so
    /// the nexus still learns of it (SAM-5: a unit attention is cleared when reported).
    pub fn unreported(&self, nexus: &ItNexus, outcome: &ScsiOutcome) {
        let Some((asc, ascq)) = unit_attention_in(outcome) else {
            return;
        };
        let mut map = self.nexuses.write().unwrap_or_else(PoisonError::into_inner);
        // A nexus that is gone has nobody left to tell.
        if let Some(state) = map.get_mut(nexus) {
            let q = &mut state.unit_attentions;
            if !q.contains(&(asc, ascq)) {
                q.push_front((asc, ascq));
                self.ua_pending.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Pop the oldest pending unit attention of a nexus.
    pub(crate) fn take_unit_attention(&self, nexus: &ItNexus) -> Option<(u8, u8)> {
        if self.ua_pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut map = self.nexuses.write().unwrap_or_else(PoisonError::into_inner);
        let ua = map.get_mut(nexus)?.unit_attentions.pop_front()?;
        self.ua_pending.fetch_sub(1, Ordering::AcqRel);
        Some(ua)
    }

    fn clear_reservation(&self) {
        let mut r = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *r = None;
        self.reserved.store(false, Ordering::Release);
    }

    /// SCSI-2 RESERVE: conflict if another nexus holds it.
    pub(crate) fn reserve(&self, nexus: &ItNexus) -> Result<(), CmdError> {
        let mut r = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match r.as_ref() {
            Some(holder) if holder != nexus => Err(CmdError::ReservationConflict),
            Some(_) => Ok(()),
            None => {
                *r = Some(nexus.clone());
                self.reserved.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    /// SCSI-2 RELEASE: only the holder's release has an effect; others get GOOD.
    pub(crate) fn release(&self, nexus: &ItNexus) {
        let mut r = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if r.as_ref() == Some(nexus) {
            *r = None;
            self.reserved.store(false, Ordering::Release);
        }
    }

    /// The one place reservation rules decide whether a nexus may run a command class.
    /// `pr` is the persistent reservation state the caller holds locked (None for
    /// [`Access::Any`]). `Err` carries the outcome to return instead of running the
    /// command: RESERVATION CONFLICT, or GOOD for a SCSI-2 RESERVE/RELEASE that a
    /// persistent reservation turns into a no-op (SPC-4 §5.13.3, CRH = 1).
    pub(crate) fn access_check(
        &self,
        pr: Option<&PrState>,
        nexus: &ItNexus,
        access: Access,
    ) -> Result<(), ScsiOutcome> {
        if access == Access::Any {
            return Ok(());
        }
        // Persistent reservations first: they take precedence over SCSI-2 ones.
        if let Some(pr) = pr {
            match access {
                Access::Reserve | Access::Release => {
                    match pr.scsi2_verdict(nexus, access == Access::Reserve) {
                        Scsi2Verdict::NoOp => return Err(self.outcome(Ok(Bytes::new()))),
                        Scsi2Verdict::Scsi2 => {}
                        Scsi2Verdict::Conflict => return Err(conflict_outcome()),
                    }
                }
                Access::Read | Access::Write => {
                    if !pr.allows(nexus, access == Access::Write) {
                        return Err(conflict_outcome());
                    }
                }
                Access::Any | Access::Status | Access::PrOut => {}
            }
        }
        if !self.reserved.load(Ordering::Acquire) || access == Access::Release {
            return Ok(());
        }
        let r = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match r.as_ref() {
            Some(holder) if holder != nexus => Err(conflict_outcome()),
            _ => Ok(()),
        }
    }

    /// Range check: `blocks` from `lba` must lie on the medium; with 0 blocks the LBA itself
    /// must exist.
    pub(crate) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        let end = lba.checked_add(blocks.max(1));
        match end {
            Some(end) if end <= self.num_blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    /// Map a backend error to sense and log it.
    pub(crate) fn io_error(&self, e: &io::Error, what: &'static str, write: bool) -> Sense {
        if e.kind() == io::ErrorKind::WouldBlock && super::backend::must_not_block() {
            // A non-blocking attempt (backend::without_blocking): not an error, the
            // transport discards this outcome and runs the command again.
            return Sense::READ_ERROR;
        }
        if e.raw_os_error() == Some(libc::ESHUTDOWN) && self.shared_pr.get().is_some() {
            // A shared (RBD) backend's client was blocklisted: not a device failure. The
            // PR watcher reconnects and re-reads the state; NOT READY until then.
            tracing::warn!(error = %e, what, serial = %self.settings.serial,
                "backend client fenced: NOT READY until reconnected");
            self.set_pr_stale(true);
            return PR_STATE_RELOADING;
        }
        if unreachable_store(e) {
            // A network store (RBD) that did not answer in time says nothing about the
            // medium: retryable NOT READY, never counted towards taking the LU offline.
            tracing::warn!(error = %e, what, serial = %self.settings.serial,
                "backing store unreachable: NOT READY (retryable)");
            return STORE_UNREACHABLE;
        }
        tracing::error!(error = %e, what, serial = %self.settings.serial, "backend I/O error");
        if e.raw_os_error() == Some(libc::ENOSPC) {
            // Out of space is the file system's state, not the device's: stay online.
            Sense::SPACE_ALLOCATION_FAILED
        } else if self.note_backend_error(e) {
            Sense::LOGICAL_UNIT_OFFLINE
        } else if write {
            Sense::WRITE_ERROR
        } else {
            Sense::READ_ERROR
        }
    }

    /// Count a backend error; takes the LU offline (true) on a fatal one or a long run.
    fn note_backend_error(&self, e: &io::Error) -> bool {
        let run = self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if fatal_io_error(e) || run >= OFFLINE_AFTER_ERRORS {
            if !self.offline.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    error = %e,
                    consecutive_errors = run,
                    serial = %self.settings.serial,
                    "backing store failed: logical unit offline (NOT READY, manual intervention required) until restart"
                );
            }
            return true;
        }
        false
    }

    /// Whether a fatal backend error took this LU offline.
    pub fn is_offline(&self) -> bool {
        self.offline.load(Ordering::Acquire)
    }

    /// After a write: make it durable when FUA is set or the write cache is off.
    pub(crate) fn complete_write(&self, fua: bool) -> Result<(), Sense> {
        if fua || !self.wce.load(Ordering::Relaxed) {
            self.backend
                .flush()
                .map_err(|e| self.io_error(&e, "flush", true))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/shared_pr.rs"]
mod shared_pr_tests;
