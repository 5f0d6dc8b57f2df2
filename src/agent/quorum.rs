//! The quorum LUN's on-disk layout: a header, one heartbeat slot per node (written only by
//! that node), one admin record per node and one record per resource group (both changed
//! only with COMPARE AND WRITE). Every record fills one logical block, so a single-block
//! COMPARE AND WRITE is atomic, and ends with a CRC32C so that a torn or foreign block
//! reads as corrupt instead of as a plausible record. Pure encode/decode; no I/O.

use crate::agent::config::MAX_NODE_ID;

/// Group records on a quorum LUN.
pub const MAX_GROUPS: u16 = 256;
pub const HEADER_MAGIC: &[u8; 16] = b"HOLDFAST-QUORUM\0";
pub const VERSION: u32 = 1;
const SLOT_MAGIC: &[u8; 8] = b"HFBEAT01";
const ADMIN_MAGIC: &[u8; 8] = b"HFNODE01";
const GROUP_MAGIC: &[u8; 8] = b"HFGROUP1";
/// Bytes a record may use; every supported block size (512, 4096) holds it.
const RECORD_BYTES: usize = 256;

/// Block addresses of everything on the quorum LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumLayout {
    pub block_size: u32,
}

impl QuorumLayout {
    pub fn new(block_size: u32) -> Result<QuorumLayout, QuorumError> {
        if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(QuorumError::BlockSize(block_size));
        }
        Ok(QuorumLayout { block_size })
    }
    pub const HEADER_LBA: u64 = 0;
    /// Heartbeat slot of node `id` (1..=64).
    pub fn slot_lba(id: u16) -> u64 {
        u64::from(id)
    }
    /// Admin record of node `id`.
    pub fn admin_lba(id: u16) -> u64 {
        u64::from(MAX_NODE_ID) + u64::from(id)
    }
    /// Record `index` (0..MAX_GROUPS) of the group table.
    pub fn group_lba(index: u16) -> u64 {
        1 + 2 * u64::from(MAX_NODE_ID) + u64::from(index)
    }
    /// Blocks the layout uses from LBA 0.
    pub fn blocks() -> u64 {
        Self::group_lba(MAX_GROUPS)
    }
    pub fn bytes(&self) -> u64 {
        Self::blocks() * u64::from(self.block_size)
    }
    /// The block at `lba` out of a buffer read from LBA 0.
    pub fn block<'a>(&self, all: &'a [u8], lba: u64) -> Option<&'a [u8]> {
        let bs = self.block_size as usize;
        let start = usize::try_from(lba).ok()?.checked_mul(bs)?;
        all.get(start..start.checked_add(bs)?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    #[error("block size {0} is not supported (512..65536, a power of two)")]
    BlockSize(u32),
    #[error("{what} at LBA {lba} is corrupt: {why}")]
    Corrupt {
        what: &'static str,
        lba: u64,
        why: String,
    },
    #[error("not a holdfast quorum LUN (no header)")]
    NotFormatted,
    #[error("quorum LUN version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("the quorum LUN belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster { found: String, expected: String },
    #[error("{0} is too long for the quorum record")]
    TooLong(&'static str),
}

/// The 8-byte PR key of node `id` in `cluster`: stable across restarts, unique in the
/// cluster, never 0, and readable in `READ KEYS` output: CRC32C(cluster) · "HF" · id.
pub fn pr_key(cluster: &str, id: u16) -> u64 {
    (u64::from(crc32c::crc32c(cluster.as_bytes())) << 32) | (0x4846 << 16) | u64::from(id)
}

/// The node id inside a key of this cluster, if it is one.
pub fn node_of_key(cluster: &str, key: u64) -> Option<u16> {
    let id = (key & 0xffff) as u16;
    (key == pr_key(cluster, id) && id != 0).then_some(id)
}

/// A stable ISID per node and purpose ("random" format, RFC 7143 §10.12.5), so that a
/// re-login after a target restart is the same I_T nexus and keeps its registrations.
pub fn node_isid(id: u16, purpose: u8) -> [u8; 6] {
    let [hi, lo] = id.to_be_bytes();
    [0x80, b'H', b'F', purpose, hi, lo]
}
pub const ISID_AGENT: u8 = 1;
pub const ISID_CTL: u8 = 2;

/// Little helper for fixed-offset big-endian encoding.
struct Enc {
    b: Vec<u8>,
}
impl Enc {
    fn new(magic: &[u8]) -> Enc {
        let mut b = Vec::with_capacity(RECORD_BYTES);
        b.extend_from_slice(magic);
        Enc { b }
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.b.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.b.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.b.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.b.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A length byte and `cap` bytes of text, zero padded.
    fn text(&mut self, s: &str, cap: usize, what: &'static str) -> Result<&mut Self, QuorumError> {
        if s.len() > cap {
            return Err(QuorumError::TooLong(what));
        }
        self.b.push(s.len() as u8);
        self.b.extend_from_slice(s.as_bytes());
        self.b.resize(self.b.len() + cap - s.len(), 0);
        Ok(self)
    }
    /// CRC32C of everything so far, then zeros to the end of the block.
    fn finish(mut self, block_size: u32) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.b);
        self.b.extend_from_slice(&crc.to_be_bytes());
        self.b.resize(block_size as usize, 0);
        self.b
    }
}

struct Dec<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
    lba: u64,
}
impl<'a> Dec<'a> {
    /// `None`: an all-zero block (never written). Errors: wrong magic or CRC.
    fn open(
        b: &'a [u8],
        magic: &[u8],
        body: usize,
        what: &'static str,
        lba: u64,
    ) -> Result<Option<Dec<'a>>, QuorumError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let corrupt = |why: String| QuorumError::Corrupt { what, lba, why };
        let end = magic.len() + body;
        if b.len() < end + 4 {
            return Err(corrupt(format!("block of {} bytes is too short", b.len())));
        }
        if &b[..magic.len()] != magic {
            return Err(corrupt("wrong magic".into()));
        }
        let stored = u32::from_be_bytes([b[end], b[end + 1], b[end + 2], b[end + 3]]);
        if crc32c::crc32c(&b[..end]) != stored {
            return Err(corrupt("CRC mismatch".into()));
        }
        Ok(Some(Dec {
            b,
            at: magic.len(),
            what,
            lba,
        }))
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
    fn text(&mut self, cap: usize) -> Result<String, QuorumError> {
        let len = usize::from(self.u8());
        let raw = &self.b[self.at..self.at + cap];
        self.at += cap;
        if len > cap {
            return Err(self.corrupt("text length beyond its field"));
        }
        String::from_utf8(raw[..len].to_vec()).map_err(|_| self.corrupt("text is not UTF-8"))
    }
    fn corrupt(&self, why: &str) -> QuorumError {
        QuorumError::Corrupt {
            what: self.what,
            lba: self.lba,
            why: why.into(),
        }
    }
}

const CLUSTER_CAP: usize = 64;
const NODE_NAME_CAP: usize = 32;
const GROUP_NAME_CAP: usize = 48;
const REASON_CAP: usize = 80;

/// LBA 0: identifies the LUN as this cluster's quorum LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumHeader {
    pub version: u32,
    pub block_size: u32,
    pub max_nodes: u16,
    pub max_groups: u16,
    pub cluster: String,
    /// Random at format time: a re-formatted LUN is a different cluster history.
    pub format_id: u64,
}

const HEADER_BODY: usize = 4 + 4 + 2 + 2 + 1 + CLUSTER_CAP + 8;

impl QuorumHeader {
    pub fn new(cluster: &str, block_size: u32, format_id: u64) -> QuorumHeader {
        QuorumHeader {
            version: VERSION,
            block_size,
            max_nodes: MAX_NODE_ID,
            max_groups: MAX_GROUPS,
            cluster: cluster.to_string(),
            format_id,
        }
    }
    pub fn encode(&self) -> Result<Vec<u8>, QuorumError> {
        let mut e = Enc::new(HEADER_MAGIC);
        e.u32(self.version)
            .u32(self.block_size)
            .u16(self.max_nodes)
            .u16(self.max_groups)
            .text(&self.cluster, CLUSTER_CAP, "cluster name")?
            .u64(self.format_id);
        Ok(e.finish(self.block_size))
    }
    pub fn decode(b: &[u8]) -> Result<QuorumHeader, QuorumError> {
        if b.len() >= 16 && &b[..16] != HEADER_MAGIC {
            return Err(QuorumError::NotFormatted);
        }
        let mut d = Dec::open(b, HEADER_MAGIC, HEADER_BODY, "header", 0)?
            .ok_or(QuorumError::NotFormatted)?;
        let h = QuorumHeader {
            version: d.u32(),
            block_size: d.u32(),
            max_nodes: d.u16(),
            max_groups: d.u16(),
            cluster: d.text(CLUSTER_CAP)?,
            format_id: d.u64(),
        };
        if h.version != VERSION {
            return Err(QuorumError::Version(h.version));
        }
        if h.max_nodes != MAX_NODE_ID || h.max_groups != MAX_GROUPS {
            return Err(d.corrupt("layout sizes differ from this build's"));
        }
        if usize::try_from(h.block_size).ok() != Some(b.len()) {
            return Err(d.corrupt("block size differs from the LUN's"));
        }
        Ok(h)
    }
    /// Decode and check that it is `cluster`'s.
    pub fn decode_for(b: &[u8], cluster: &str) -> Result<QuorumHeader, QuorumError> {
        let h = Self::decode(b)?;
        if h.cluster != cluster {
            return Err(QuorumError::WrongCluster {
                found: h.cluster,
                expected: cluster.to_string(),
            });
        }
        Ok(h)
    }
}

/// A node's heartbeat slot: written only by that node, with plain WRITE + FUA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatSlot {
    pub node_id: u16,
    pub name: String,
    /// Random per agent start: tells a restarted agent from a live one.
    pub incarnation: u64,
    /// Grows by one with every heartbeat write.
    pub counter: u64,
    pub state: NodeState,
    /// Wall-clock milliseconds since the epoch at the write (display only: liveness
    /// is judged by the counter on the observer's own monotonic clock).
    pub wall_ms: u64,
}

const SLOT_BODY: usize = 2 + 1 + NODE_NAME_CAP + 8 + 8 + 1 + 8;

impl HeartbeatSlot {
    pub fn encode(&self, block_size: u32) -> Result<Vec<u8>, QuorumError> {
        let mut e = Enc::new(SLOT_MAGIC);
        e.u16(self.node_id)
            .text(&self.name, NODE_NAME_CAP, "node name")?
            .u64(self.incarnation)
            .u64(self.counter)
            .u8(self.state as u8)
            .u64(self.wall_ms);
        Ok(e.finish(block_size))
    }
    pub fn decode(b: &[u8], lba: u64) -> Result<Option<HeartbeatSlot>, QuorumError> {
        let Some(mut d) = Dec::open(b, SLOT_MAGIC, SLOT_BODY, "heartbeat slot", lba)? else {
            return Ok(None);
        };
        let node_id = d.u16();
        let name = d.text(NODE_NAME_CAP)?;
        let incarnation = d.u64();
        let counter = d.u64();
        let state = NodeState::from_u8(d.u8()).ok_or_else(|| d.corrupt("unknown state"))?;
        let wall_ms = d.u64();
        if QuorumLayout::slot_lba(node_id) != lba {
            return Err(d.corrupt("slot names another node id"));
        }
        Ok(Some(HeartbeatSlot {
            node_id,
            name,
            incarnation,
            counter,
            state,
            wall_ms,
        }))
    }
}

/// Per-node settings changed by the administrator or by a fencing peer (CAW only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAdmin {
    pub node_id: u16,
    /// `ctl drain`: run nothing here; owned groups move away.
    pub drained: bool,
    /// The incarnation a peer fenced last (0: never fenced).
    pub fenced_incarnation: u64,
    pub fenced_by: u16,
    pub fence_count: u32,
    pub fenced_wall_ms: u64,
}

const ADMIN_BODY: usize = 2 + 1 + 8 + 2 + 4 + 8;

impl NodeAdmin {
    pub fn empty(node_id: u16) -> NodeAdmin {
        NodeAdmin {
            node_id,
            ..NodeAdmin::default()
        }
    }
    pub fn encode(&self, block_size: u32) -> Vec<u8> {
        let mut e = Enc::new(ADMIN_MAGIC);
        e.u16(self.node_id)
            .u8(u8::from(self.drained))
            .u64(self.fenced_incarnation)
            .u16(self.fenced_by)
            .u32(self.fence_count)
            .u64(self.fenced_wall_ms);
        e.finish(block_size)
    }
    pub fn decode(b: &[u8], lba: u64) -> Result<Option<NodeAdmin>, QuorumError> {
        let Some(mut d) = Dec::open(b, ADMIN_MAGIC, ADMIN_BODY, "node admin record", lba)? else {
            return Ok(None);
        };
        let a = NodeAdmin {
            node_id: d.u16(),
            drained: d.u8() != 0,
            fenced_incarnation: d.u64(),
            fenced_by: d.u16(),
            fence_count: d.u32(),
            fenced_wall_ms: d.u64(),
        };
        if QuorumLayout::admin_lba(a.node_id) != lba {
            return Err(d.corrupt("record names another node id"));
        }
        Ok(Some(a))
    }
}

/// State enums stored in the records as one byte: each variant's code and its name
/// (status output), with `from_u8` (`None` for a code we do not know) and `name`.
macro_rules! record_codes {
    ($($(#[$doc:meta])* $ty:ident {
        $($(#[$vdoc:meta])* $v:ident = $code:literal, $name:literal;)*
    })*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $ty {
            $($(#[$vdoc])* $v = $code,)*
        }

        impl $ty {
            fn from_u8(v: u8) -> Option<$ty> {
                match v {
                    $($code => Some($ty::$v),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$v => $name,)*
                }
            }
        }
    )*};
}

record_codes! {
    /// What a node says about itself in its heartbeat slot.
    NodeState {
        /// Heartbeating and able to run groups.
        Active = 1, "active";
        /// Stopped cleanly; owns nothing.
        Left = 2, "left";
        /// Killed its VMs because it lost the quorum LUN or its reservation; rejoining.
        SelfFenced = 3, "self-fenced";
    }
    /// Where a group's run stands.
    GroupState {
        /// Nobody runs it (owner 0).
        Stopped = 1, "stopped";
        /// The owner has claimed it and is starting (or restoring) the VM.
        Starting = 2, "starting";
        Running = 3, "running";
        /// The owner is taking it offline (offline action), for maintenance or a move.
        Stopping = 4, "stopping";
    }
    /// What the administrator wants of a group.
    AdminState {
        Online = 1, "online";
        /// Maintenance: stopped and kept stopped until `ctl online`.
        Offline = 2, "offline";
    }
}

/// One resource group's shared state; changed only with COMPARE AND WRITE against the
/// exact block the writer read, so two nodes never both win a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    /// Node id of the owner; 0 = nobody.
    pub owner: u16,
    /// The owner's incarnation when it claimed: a restarted owner is not the owner.
    pub owner_incarnation: u64,
    /// Grows by one with every claim and every start (each run has its own epoch).
    pub epoch: u64,
    pub state: GroupState,
    pub admin: AdminState,
    /// Monitoring suspended (`ctl freeze`): the VM is left as it is.
    pub frozen: bool,
    /// Requested move target (node id), 0 = none.
    pub move_to: u16,
    /// A saved VM state exists: the next start restores it.
    pub saved: bool,
    /// Restarts in place within the current restart period.
    pub restarts: u16,
    /// Nodes (bit id-1) where the group used up its restarts; not placed there again
    /// until `ctl online` or until it has run elsewhere.
    pub failed_on: u64,
    /// Why the last transition happened.
    pub reason: String,
    /// Wall-clock milliseconds of the last transition (display only).
    pub changed_wall_ms: u64,
    /// A live migration under way (kept in a trailer after the record's CRC; see
    /// [`Migration`]).
    pub migration: Option<Migration>,
}

/// A live migration of a running group to `to`. Requested by `ctl move --live` with an
/// empty `addr`; the destination fills `addr` once its incoming QEMU listens, and the
/// record then shows `migrating`. The owner stays the source (state running) until the
/// destination's switchover claims the record, so an agent that predates live migration
/// reads the record as an ordinary running group and ignores the trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub to: u16,
    /// host:port the destination's incoming QEMU listens on; empty until it does.
    pub addr: String,
}

const MIGRATION_MAGIC: &[u8] = b"HFMIG1";
const MIGRATION_ADDR_CAP: usize = 64;
const MIGRATION_BODY: usize = 2 + 1 + MIGRATION_ADDR_CAP;

const GROUP_BODY: usize =
    1 + GROUP_NAME_CAP + 2 + 8 + 8 + 1 + 1 + 1 + 2 + 1 + 2 + 8 + 1 + REASON_CAP + 8;

impl GroupRecord {
    pub fn new(name: &str) -> GroupRecord {
        GroupRecord {
            name: name.to_string(),
            owner: 0,
            owner_incarnation: 0,
            epoch: 0,
            state: GroupState::Stopped,
            admin: AdminState::Online,
            frozen: false,
            move_to: 0,
            saved: false,
            restarts: 0,
            failed_on: 0,
            reason: "created".into(),
            changed_wall_ms: 0,
            migration: None,
        }
    }
    /// The state shown to people: `migrating` while a destination listens.
    pub fn state_name(&self) -> &'static str {
        match &self.migration {
            Some(m) if !m.addr.is_empty() && self.state == GroupState::Running => "migrating",
            _ => self.state.name(),
        }
    }
    pub fn failed_on_node(&self, id: u16) -> bool {
        (1..=64).contains(&id) && self.failed_on & (1u64 << (id - 1)) != 0
    }
    pub fn set_failed_on(&mut self, id: u16) {
        if (1..=64).contains(&id) {
            self.failed_on |= 1u64 << (id - 1);
        }
    }
    pub fn encode(&self, block_size: u32) -> Result<Vec<u8>, QuorumError> {
        let mut reason = self.reason.clone();
        // A reason is free text for humans: cut it (on a char boundary), never refuse.
        while reason.len() > REASON_CAP {
            reason.pop();
        }
        let mut e = Enc::new(GROUP_MAGIC);
        e.text(&self.name, GROUP_NAME_CAP, "group name")?
            .u16(self.owner)
            .u64(self.owner_incarnation)
            .u64(self.epoch)
            .u8(self.state as u8)
            .u8(self.admin as u8)
            .u8(u8::from(self.frozen))
            .u16(self.move_to)
            .u8(u8::from(self.saved))
            .u16(self.restarts)
            .u64(self.failed_on)
            .text(&reason, REASON_CAP, "reason")?
            .u64(self.changed_wall_ms);
        let mut b = e.finish(block_size);
        if let Some(m) = &self.migration {
            let mut t = Enc::new(MIGRATION_MAGIC);
            t.u16(m.to)
                .text(&m.addr, MIGRATION_ADDR_CAP, "migration address")?;
            let trailer = t.finish(block_size);
            let at = GROUP_MAGIC.len() + GROUP_BODY + 4;
            let len = MIGRATION_MAGIC.len() + MIGRATION_BODY + 4;
            b[at..at + len].copy_from_slice(&trailer[..len]);
        }
        Ok(b)
    }

    /// The migration trailer after the record's CRC: zeros (every record written before
    /// live migration existed) mean none.
    fn decode_migration(b: &[u8], lba: u64) -> Result<Option<Migration>, QuorumError> {
        let at = GROUP_MAGIC.len() + GROUP_BODY + 4;
        let Some(rest) = b.get(at..) else {
            return Ok(None);
        };
        let what = "group record's migration";
        let Some(mut d) = Dec::open(rest, MIGRATION_MAGIC, MIGRATION_BODY, what, lba)? else {
            return Ok(None);
        };
        let to = d.u16();
        let addr = d.text(MIGRATION_ADDR_CAP)?;
        if to == 0 || to > MAX_NODE_ID {
            return Err(d.corrupt("migration target out of range"));
        }
        Ok(Some(Migration { to, addr }))
    }
    pub fn decode(b: &[u8], lba: u64) -> Result<Option<GroupRecord>, QuorumError> {
        let Some(mut d) = Dec::open(b, GROUP_MAGIC, GROUP_BODY, "group record", lba)? else {
            return Ok(None);
        };
        let name = d.text(GROUP_NAME_CAP)?;
        let owner = d.u16();
        let owner_incarnation = d.u64();
        let epoch = d.u64();
        let state = GroupState::from_u8(d.u8()).ok_or_else(|| d.corrupt("unknown state"))?;
        let admin = AdminState::from_u8(d.u8()).ok_or_else(|| d.corrupt("unknown admin state"))?;
        let frozen = d.u8() != 0;
        let move_to = d.u16();
        let saved = d.u8() != 0;
        let restarts = d.u16();
        let failed_on = d.u64();
        let reason = d.text(REASON_CAP)?;
        let changed_wall_ms = d.u64();
        if name.is_empty() {
            return Err(d.corrupt("empty group name"));
        }
        if owner > MAX_NODE_ID || move_to > MAX_NODE_ID {
            return Err(d.corrupt("node id out of range"));
        }
        if (owner == 0) != (state == GroupState::Stopped) {
            return Err(d.corrupt("owner and state disagree"));
        }
        Ok(Some(GroupRecord {
            name,
            owner,
            owner_incarnation,
            epoch,
            state,
            admin,
            frozen,
            move_to,
            saved,
            restarts,
            failed_on,
            reason,
            changed_wall_ms,
            migration: GroupRecord::decode_migration(b, lba)?,
        }))
    }
}

/// Everything on a quorum LUN, decoded from one read of [`QuorumLayout::bytes`].
#[derive(Debug, Clone, Default)]
pub struct QuorumImage {
    /// Heartbeat slot per node id (index id-1).
    pub slots: Vec<Option<HeartbeatSlot>>,
    pub admins: Vec<Option<NodeAdmin>>,
    /// (record index, record) of every group record in use.
    pub groups: Vec<(u16, GroupRecord)>,
    /// The raw blocks of the group records in use, for COMPARE AND WRITE.
    pub group_blocks: Vec<Vec<u8>>,
    pub admin_blocks: Vec<Vec<u8>>,
    /// Index of the first unused group record.
    pub first_free_group: Option<u16>,
    /// Blocks that did not decode (reported, never overwritten blindly).
    pub corrupt: Vec<QuorumError>,
}

impl QuorumImage {
    /// Decode a whole image read from LBA 0 (header checked separately).
    pub fn decode(layout: &QuorumLayout, all: &[u8]) -> QuorumImage {
        let mut img = QuorumImage::default();
        for id in 1..=MAX_NODE_ID {
            let lba = QuorumLayout::slot_lba(id);
            img.slots.push(match layout.block(all, lba) {
                Some(b) => HeartbeatSlot::decode(b, lba).unwrap_or_else(|e| {
                    img.corrupt.push(e);
                    None
                }),
                None => None,
            });
            let lba = QuorumLayout::admin_lba(id);
            let b = layout.block(all, lba).unwrap_or(&[]);
            img.admin_blocks.push(b.to_vec());
            img.admins
                .push(NodeAdmin::decode(b, lba).unwrap_or_else(|e| {
                    img.corrupt.push(e);
                    None
                }));
        }
        for i in 0..MAX_GROUPS {
            let lba = QuorumLayout::group_lba(i);
            let Some(b) = layout.block(all, lba) else {
                break;
            };
            match GroupRecord::decode(b, lba) {
                Ok(Some(r)) => {
                    img.groups.push((i, r));
                    img.group_blocks.push(b.to_vec());
                }
                Ok(None) => {
                    if img.first_free_group.is_none() {
                        img.first_free_group = Some(i);
                    }
                }
                Err(e) => img.corrupt.push(e),
            }
        }
        img
    }

    pub fn slot(&self, id: u16) -> Option<&HeartbeatSlot> {
        self.slots.get(usize::from(id).checked_sub(1)?)?.as_ref()
    }
    pub fn admin(&self, id: u16) -> NodeAdmin {
        usize::from(id)
            .checked_sub(1)
            .and_then(|i| self.admins.get(i).cloned().flatten())
            .unwrap_or_else(|| NodeAdmin::empty(id))
    }
    pub fn admin_block(&self, id: u16) -> Option<&[u8]> {
        self.admin_blocks
            .get(usize::from(id).checked_sub(1)?)
            .map(|v| v.as_slice())
    }
    /// (index, record, raw block) of the group called `name`.
    pub fn group(&self, name: &str) -> Option<(u16, &GroupRecord, &[u8])> {
        self.groups
            .iter()
            .zip(&self.group_blocks)
            .find(|((_, r), _)| r.name == name)
            .map(|((i, r), b)| (*i, r, b.as_slice()))
    }
    /// Node id of the node named `name`, from the heartbeat slots.
    pub fn node_id(&self, name: &str) -> Option<u16> {
        self.slots
            .iter()
            .flatten()
            .find(|s| s.name == name)
            .map(|s| s.node_id)
    }
    /// Groups each node owns (index id-1).
    pub fn load(&self, id: u16) -> usize {
        self.groups.iter().filter(|(_, r)| r.owner == id).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupRecord {
        let mut g = GroupRecord::new("web");
        g.owner = 3;
        g.owner_incarnation = 0xdead_beef;
        g.epoch = 42;
        g.state = GroupState::Running;
        g.move_to = 2;
        g.saved = true;
        g.restarts = 2;
        g.set_failed_on(5);
        g.reason = "claimed after node 1 died".into();
        g
    }

    #[test]
    fn the_migration_trailer_round_trips_and_old_records_have_none() {
        for bs in [512u32, 4096] {
            let lba = QuorumLayout::group_lba(0);
            let old = group();
            let b = old.encode(bs).unwrap();
            assert_eq!(
                GroupRecord::decode(&b, lba).unwrap().unwrap().migration,
                None
            );
            let mut g = group();
            g.migration = Some(Migration {
                to: 2,
                addr: "10.0.0.2:49152".into(),
            });
            let b = g.encode(bs).unwrap();
            // The record proper is byte for byte what an older agent writes and reads.
            let body = GROUP_MAGIC.len() + GROUP_BODY + 4;
            assert_eq!(b[..body], old.encode(bs).unwrap()[..body]);
            assert_eq!(GroupRecord::decode(&b, lba), Ok(Some(g.clone())));
            assert_eq!(g.state_name(), "migrating");
            g.migration.as_mut().unwrap().addr.clear();
            assert_eq!(g.state_name(), "running");
            let mut b = g.encode(bs).unwrap();
            b[body + 8] ^= 1;
            assert!(GroupRecord::decode(&b, lba).is_err());
        }
    }

    #[test]
    fn records_round_trip_at_both_block_sizes() {
        for bs in [512u32, 4096] {
            let h = QuorumHeader::new("lab", bs, 77);
            assert_eq!(QuorumHeader::decode(&h.encode().unwrap()), Ok(h.clone()));
            let s = HeartbeatSlot {
                node_id: 4,
                name: "n4".into(),
                incarnation: 9,
                counter: 1234,
                state: NodeState::Active,
                wall_ms: 5,
            };
            let b = s.encode(bs).unwrap();
            assert_eq!(b.len(), bs as usize);
            assert_eq!(HeartbeatSlot::decode(&b, 4), Ok(Some(s)));
            let a = NodeAdmin {
                node_id: 2,
                drained: true,
                fenced_incarnation: 3,
                fenced_by: 1,
                fence_count: 1,
                fenced_wall_ms: 8,
            };
            let lba = QuorumLayout::admin_lba(2);
            assert_eq!(NodeAdmin::decode(&a.encode(bs), lba), Ok(Some(a)));
            let g = group();
            let lba = QuorumLayout::group_lba(0);
            assert_eq!(
                GroupRecord::decode(&g.encode(bs).unwrap(), lba),
                Ok(Some(g))
            );
        }
    }

    #[test]
    fn zero_blocks_are_empty_and_damage_is_corrupt() {
        assert_eq!(HeartbeatSlot::decode(&[0u8; 512], 1), Ok(None));
        assert_eq!(GroupRecord::decode(&[0u8; 512], 129), Ok(None));
        let mut b = group().encode(512).unwrap();
        b[20] ^= 1;
        assert!(matches!(
            GroupRecord::decode(&b, 129),
            Err(QuorumError::Corrupt { .. })
        ));
        let mut b = group().encode(512).unwrap();
        b[0] = b'X';
        assert!(GroupRecord::decode(&b, 129).is_err());
        assert!(GroupRecord::decode(&[1u8; 3], 129).is_err());
        assert_eq!(
            QuorumHeader::decode(&[0u8; 512]),
            Err(QuorumError::NotFormatted)
        );
        assert_eq!(
            QuorumHeader::decode(&[0x55u8; 512]),
            Err(QuorumError::NotFormatted)
        );
        // A slot copied to another node's LBA is refused.
        let s = HeartbeatSlot {
            node_id: 4,
            name: "n4".into(),
            incarnation: 9,
            counter: 1,
            state: NodeState::Active,
            wall_ms: 0,
        };
        assert!(HeartbeatSlot::decode(&s.encode(512).unwrap(), 5).is_err());
    }

    #[test]
    fn header_checks_cluster_and_block_size() {
        let h = QuorumHeader::new("lab", 512, 1).encode().unwrap();
        assert!(matches!(
            QuorumHeader::decode_for(&h, "prod"),
            Err(QuorumError::WrongCluster { .. })
        ));
        let mut big = h.clone();
        big.resize(4096, 0);
        assert!(QuorumHeader::decode(&big).is_err());
    }

    #[test]
    fn keys_are_stable_unique_and_decodable() {
        assert_eq!(pr_key("lab", 1), pr_key("lab", 1));
        assert_ne!(pr_key("lab", 1), pr_key("lab", 2));
        assert_ne!(pr_key("lab", 1), pr_key("prod", 1));
        assert_eq!(node_of_key("lab", pr_key("lab", 7)), Some(7));
        assert_eq!(node_of_key("prod", pr_key("lab", 7)), None);
        assert_eq!(node_of_key("lab", 0x1234), None);
        for id in 1..=64 {
            assert_ne!(pr_key("x", id), 0);
        }
    }

    #[test]
    fn long_text_is_refused_or_cut() {
        let mut g = group();
        g.name = "x".repeat(49);
        assert_eq!(g.encode(512), Err(QuorumError::TooLong("group name")));
        let mut g = group();
        g.reason = "é".repeat(100);
        let r = GroupRecord::decode(&g.encode(512).unwrap(), 129)
            .unwrap()
            .unwrap();
        assert!(r.reason.len() <= 80 && r.reason.starts_with('é'));
    }

    #[test]
    fn image_decodes_layout() {
        let layout = QuorumLayout::new(512).unwrap();
        let mut all = vec![0u8; layout.bytes() as usize];
        let put = |all: &mut Vec<u8>, lba: u64, b: &[u8]| {
            let s = lba as usize * 512;
            all[s..s + 512].copy_from_slice(b);
        };
        let s = HeartbeatSlot {
            node_id: 2,
            name: "b".into(),
            incarnation: 1,
            counter: 1,
            state: NodeState::Active,
            wall_ms: 0,
        };
        put(&mut all, QuorumLayout::slot_lba(2), &s.encode(512).unwrap());
        put(
            &mut all,
            QuorumLayout::group_lba(0),
            &group().encode(512).unwrap(),
        );
        put(&mut all, QuorumLayout::group_lba(2), &[7u8; 512]);
        let img = QuorumImage::decode(&layout, &all);
        assert_eq!(img.slot(2).map(|s| s.name.as_str()), Some("b"));
        assert_eq!(img.node_id("b"), Some(2));
        assert!(img.slot(1).is_none());
        assert_eq!(img.group("web").map(|g| g.0), Some(0));
        assert_eq!(img.first_free_group, Some(1));
        assert_eq!(img.corrupt.len(), 1);
        assert_eq!(img.load(3), 1);
    }
}
