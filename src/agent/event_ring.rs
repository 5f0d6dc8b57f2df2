//! The cluster-wide event ring on the quorum LUN: after the group table, every node id
//! has its own sub-ring of [`PER_NODE`] one-block entries. Node N (its agent, and `ctl`
//! run with node N's config) appends only to sub-ring N, each append a COMPARE AND
//! WRITE against the block it read, so writers never overwrite each other's entries.
//! Entry `seq` (1, 2, …) of a node lives in slot `(seq - 1) % PER_NODE`; readers decode
//! every sub-ring and merge them by wall time. Pure encode/decode/merge; no I/O.

use crate::agent::config::MAX_NODE_ID;
use crate::agent::quorum::{QuorumError, QuorumLayout};

/// Entries each node keeps on the LUN (the newest ones; older are overwritten).
pub const PER_NODE: u64 = 64;
const ENTRY_MAGIC: &[u8; 8] = b"HFEVENT1";
/// Entry format version (inside the CRC), for a future reader to tell formats apart.
const ENTRY_VERSION: u8 = 1;
const KIND_CAP: usize = 24;
const GROUP_CAP: usize = 48;
const REASON_CAP: usize = 120;
const ACTOR_CAP: usize = 64;
const ENTRY_BODY: usize = 1
    + 2
    + 8
    + 8
    + 1
    + (1 + KIND_CAP)
    + (1 + GROUP_CAP)
    + (1 + REASON_CAP)
    + 2
    + 8
    + (1 + ACTOR_CAP);

/// First LBA of the ring: right after the group table.
pub fn ring_lba() -> u64 {
    QuorumLayout::blocks()
}

/// First LBA of node `id`'s sub-ring.
pub fn sub_ring_lba(id: u16) -> u64 {
    ring_lba() + u64::from(id.saturating_sub(1)) * PER_NODE
}

/// LBA of entry `seq` (≥ 1) of node `id`.
pub fn entry_lba(id: u16, seq: u64) -> u64 {
    sub_ring_lba(id) + (seq.saturating_sub(1) % PER_NODE)
}

/// Blocks a quorum LUN needs from LBA 0 to hold the ring.
pub fn blocks_with_ring() -> u64 {
    ring_lba() + u64::from(MAX_NODE_ID) * PER_NODE
}

/// Who wrote an entry: the agent of the node, or `ctl` run with the node's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Agent = 1,
    Ctl = 2,
}

/// One cluster transition as the ring keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RingEntry {
    pub node_id: u16,
    /// Per node: 1, 2, … across restarts (the writer continues after the highest).
    pub seq: u64,
    /// Wall clock of the writer, ms since the epoch (display and ordering only).
    pub wall_ms: u64,
    pub source: Source,
    /// The event name ("fenced", "claimed", "ctl-move", …).
    pub kind: String,
    pub group: String,
    pub reason: String,
    /// The node the event is about (fenced peer, move target); 0 = none.
    pub target_node: u16,
    pub epoch: u64,
    /// Who asked, for `ctl` changes: "user@host".
    pub actor: String,
}

/// Cut free text to `cap` bytes on a char boundary: a long reason is cut, never refused.
fn cut(s: &str, cap: usize) -> &str {
    let mut end = s.len().min(cap);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_text(b: &mut Vec<u8>, s: &str, cap: usize) {
    let s = cut(s, cap);
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
    b.resize(b.len() + cap - s.len(), 0);
}

impl RingEntry {
    /// One block: magic, version, fields, CRC32C, zeros.
    pub fn encode(&self, block_size: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(block_size as usize);
        b.extend_from_slice(ENTRY_MAGIC);
        b.push(ENTRY_VERSION);
        b.extend_from_slice(&self.node_id.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.wall_ms.to_be_bytes());
        b.push(self.source as u8);
        put_text(&mut b, &self.kind, KIND_CAP);
        put_text(&mut b, &self.group, GROUP_CAP);
        put_text(&mut b, &self.reason, REASON_CAP);
        b.extend_from_slice(&self.target_node.to_be_bytes());
        b.extend_from_slice(&self.epoch.to_be_bytes());
        put_text(&mut b, &self.actor, ACTOR_CAP);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b.resize(block_size as usize, 0);
        b
    }

    /// `None`: a never-written (all-zero) block. An error: anything else that is not a
    /// whole entry of this slot (torn, foreign, another version, misplaced).
    pub fn decode(b: &[u8], lba: u64) -> Result<Option<RingEntry>, QuorumError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let corrupt = |why: &str| QuorumError::Corrupt {
            what: "event ring entry",
            lba,
            why: why.into(),
        };
        let end = ENTRY_MAGIC.len() + ENTRY_BODY;
        if b.len() < end + 4 {
            return Err(corrupt("block too short"));
        }
        if &b[..8] != ENTRY_MAGIC {
            return Err(corrupt("wrong magic"));
        }
        let crc = u32::from_be_bytes([b[end], b[end + 1], b[end + 2], b[end + 3]]);
        if crc32c::crc32c(&b[..end]) != crc {
            return Err(corrupt("CRC mismatch (torn or damaged)"));
        }
        if b[8] != ENTRY_VERSION {
            return Err(corrupt("unknown entry version"));
        }
        let mut r = Reader { b, at: 9 };
        let e = RingEntry {
            node_id: u16::from_be_bytes(r.take()),
            seq: u64::from_be_bytes(r.take()),
            wall_ms: u64::from_be_bytes(r.take()),
            source: match r.take::<1>()[0] {
                1 => Source::Agent,
                2 => Source::Ctl,
                _ => return Err(corrupt("unknown source")),
            },
            kind: r.text(KIND_CAP).ok_or_else(|| corrupt("bad kind text"))?,
            group: r.text(GROUP_CAP).ok_or_else(|| corrupt("bad group text"))?,
            reason: r
                .text(REASON_CAP)
                .ok_or_else(|| corrupt("bad reason text"))?,
            target_node: u16::from_be_bytes(r.take()),
            epoch: u64::from_be_bytes(r.take()),
            actor: r.text(ACTOR_CAP).ok_or_else(|| corrupt("bad actor text"))?,
        };
        if e.seq == 0
            || !(1..=MAX_NODE_ID).contains(&e.node_id)
            || entry_lba(e.node_id, e.seq) != lba
        {
            return Err(corrupt("entry does not belong in this slot"));
        }
        Ok(Some(e))
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        a
    }
    fn text(&mut self, cap: usize) -> Option<String> {
        let len = usize::from(self.take::<1>()[0]);
        let raw = &self.b[self.at..self.at + cap];
        self.at += cap;
        String::from_utf8(raw.get(..len)?.to_vec()).ok()
    }
}

/// One node's sub-ring as read: its entries, the raw blocks (for COMPARE AND WRITE) and
/// what did not decode.
#[derive(Debug, Clone)]
pub struct SubRing {
    pub node_id: u16,
    pub entries: Vec<RingEntry>,
    pub blocks: Vec<Vec<u8>>,
    pub corrupt: Vec<QuorumError>,
}

impl SubRing {
    /// Decode `PER_NODE` blocks read from [`sub_ring_lba`]`(id)`.
    pub fn decode(id: u16, all: &[u8], block_size: u32) -> SubRing {
        let bs = block_size as usize;
        let mut s = SubRing {
            node_id: id,
            entries: vec![],
            blocks: vec![],
            corrupt: vec![],
        };
        for (i, b) in all.chunks(bs).take(PER_NODE as usize).enumerate() {
            s.blocks.push(b.to_vec());
            match RingEntry::decode(b, sub_ring_lba(id) + i as u64) {
                Ok(Some(e)) if e.node_id == id => s.entries.push(e),
                Ok(_) => {}
                Err(e) => s.corrupt.push(e),
            }
        }
        s.entries.sort_by_key(|e| e.seq);
        s
    }

    /// The sequence number the next append takes.
    pub fn next_seq(&self) -> u64 {
        self.entries.last().map_or(1, |e| e.seq + 1)
    }

    /// The block now at the slot of `seq` (what a COMPARE AND WRITE expects).
    pub fn block_for(&self, seq: u64) -> Option<&[u8]> {
        let i = usize::try_from(seq.saturating_sub(1) % PER_NODE).ok()?;
        self.blocks.get(i).map(|b| b.as_slice())
    }

    /// Note a successful append of `entry` as `block`.
    pub fn appended(&mut self, entry: RingEntry, block: Vec<u8>) {
        if let Ok(i) = usize::try_from(entry.seq.saturating_sub(1) % PER_NODE) {
            if let Some(b) = self.blocks.get_mut(i) {
                *b = block;
            }
        }
        self.entries.retain(|e| e.seq + PER_NODE > entry.seq);
        self.entries.push(entry);
    }
}

/// Every node's entries in one timeline: by wall time, then node, then sequence.
pub fn merge(rings: &[SubRing]) -> Vec<RingEntry> {
    let mut all: Vec<RingEntry> = rings.iter().flat_map(|r| r.entries.clone()).collect();
    all.sort_by_key(|e| (e.wall_ms, e.node_id, e.seq));
    all
}

/// What `ctl events` shows: entries at or after `since_ms`, the last `n` of them.
pub fn select(merged: Vec<RingEntry>, since_ms: Option<u64>, n: Option<usize>) -> Vec<RingEntry> {
    let mut v: Vec<RingEntry> = merged
        .into_iter()
        .filter(|e| since_ms.is_none_or(|s| e.wall_ms >= s))
        .collect();
    if let Some(n) = n {
        let skip = v.len().saturating_sub(n);
        v.drain(..skip);
    }
    v
}

/// Entries not seen yet, given the highest sequence seen per node (`--follow`);
/// updates `seen`.
pub fn unseen(
    merged: &[RingEntry],
    seen: &mut std::collections::BTreeMap<u16, u64>,
) -> Vec<RingEntry> {
    let before = seen.clone();
    let out: Vec<RingEntry> = merged
        .iter()
        .filter(|e| before.get(&e.node_id).is_none_or(|&s| e.seq > s))
        .cloned()
        .collect();
    for e in &out {
        let s = seen.entry(e.node_id).or_insert(0);
        *s = (*s).max(e.seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: u16, seq: u64, wall: u64) -> RingEntry {
        RingEntry {
            node_id: node,
            seq,
            wall_ms: wall,
            source: Source::Agent,
            kind: "fenced".into(),
            group: "web".into(),
            reason: "node 1 preempted and aborted on the quorum LUN".into(),
            target_node: 1,
            epoch: 7,
            actor: String::new(),
        }
    }

    /// A sub-ring image with `entries` written at their slots.
    fn image(node: u16, entries: &[RingEntry], bs: u32) -> Vec<u8> {
        let mut all = vec![0u8; PER_NODE as usize * bs as usize];
        for e in entries {
            let i = ((e.seq - 1) % PER_NODE) as usize * bs as usize;
            all[i..i + bs as usize].copy_from_slice(&e.encode(bs));
            assert_eq!(e.node_id, node);
        }
        all
    }

    #[test]
    fn entries_round_trip_at_both_block_sizes_and_long_text_is_cut() {
        for bs in [512u32, 4096] {
            let mut e = entry(3, 70, 1234);
            e.source = Source::Ctl;
            e.actor = "alice@hv1".into();
            let b = e.encode(bs);
            assert_eq!(b.len(), bs as usize);
            assert_eq!(RingEntry::decode(&b, entry_lba(3, 70)), Ok(Some(e)));
        }
        let mut e = entry(1, 1, 0);
        e.reason = "é".repeat(100);
        let d = RingEntry::decode(&e.encode(512), entry_lba(1, 1))
            .unwrap()
            .unwrap();
        assert!(d.reason.len() <= REASON_CAP && d.reason.starts_with('é'));
        assert_eq!(RingEntry::decode(&[0u8; 512], ring_lba()), Ok(None));
    }

    #[test]
    fn a_torn_or_misplaced_entry_is_reported_and_skipped() {
        let good = [entry(2, 1, 10), entry(2, 2, 20), entry(2, 3, 30)];
        let mut all = image(2, &good, 512);
        // Entry 2 torn: its second half never reached the medium.
        for b in &mut all[512 + 256..1024] {
            *b = 0;
        }
        // Entry 3 copied into node 2's sub-ring from node 4's: it belongs elsewhere.
        let foreign = entry(4, 4, 40).encode(512);
        all[3 * 512..4 * 512].copy_from_slice(&foreign);
        let r = SubRing::decode(2, &all, 512);
        assert_eq!(r.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(r.corrupt.len(), 2);
        // The next append continues after the highest whole entry.
        assert_eq!(r.next_seq(), 4);
        assert_eq!(r.block_for(4), Some(&foreign[..]));
    }

    #[test]
    fn a_wrapped_sub_ring_keeps_the_newest_entries_in_order() {
        let n = PER_NODE + 10;
        let mut r = SubRing::decode(5, &image(5, &[], 512), 512);
        assert_eq!(r.next_seq(), 1);
        for seq in 1..=n {
            let e = entry(5, seq, 1000 + seq);
            assert_eq!(r.next_seq(), seq);
            let b = e.encode(512);
            r.appended(e, b);
        }
        // Decoding what was written gives the same as the writer's own view.
        let all: Vec<u8> = r.blocks.concat();
        let d = SubRing::decode(5, &all, 512);
        let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (11..=n).collect::<Vec<_>>());
        assert_eq!(d.next_seq(), n + 1);
        assert_eq!(r.entries.len(), PER_NODE as usize);
        // Slot of seq n+1 is that of seq 11: the oldest is overwritten next.
        assert_eq!(entry_lba(5, n + 1), entry_lba(5, 11));
    }

    #[test]
    fn mixed_nodes_merge_by_time_and_select_filters() {
        let a = SubRing::decode(
            1,
            &image(1, &[entry(1, 1, 100), entry(1, 2, 300)], 512),
            512,
        );
        let b = SubRing::decode(
            3,
            &image(3, &[entry(3, 1, 200), entry(3, 2, 300)], 512),
            512,
        );
        let m = merge(&[a, b]);
        let order: Vec<(u16, u64)> = m.iter().map(|e| (e.node_id, e.seq)).collect();
        assert_eq!(order, [(1, 1), (3, 1), (1, 2), (3, 2)]);
        let s = select(m.clone(), Some(200), Some(2));
        assert_eq!(
            s.iter().map(|e| (e.node_id, e.seq)).collect::<Vec<_>>(),
            [(1, 2), (3, 2)]
        );
        let mut seen = std::collections::BTreeMap::new();
        assert_eq!(unseen(&m, &mut seen).len(), 4);
        assert!(unseen(&m, &mut seen).is_empty());
        seen.insert(3, 1);
        assert_eq!(unseen(&m, &mut seen).len(), 1);
    }

    #[test]
    fn the_ring_lies_after_the_group_table() {
        assert_eq!(
            ring_lba(),
            QuorumLayout::group_lba(crate::agent::quorum::MAX_GROUPS)
        );
        assert_eq!(sub_ring_lba(1), ring_lba());
        assert_eq!(entry_lba(2, PER_NODE + 1), sub_ring_lba(2));
        assert_eq!(blocks_with_ring(), 385 + 64 * 64);
    }
}
