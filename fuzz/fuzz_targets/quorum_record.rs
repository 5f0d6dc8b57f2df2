//! The quorum LUN's record decoders (`agent::quorum`) on arbitrary blocks: the header,
//! heartbeat slots, node admin records and group records. None may panic; an empty
//! record (`Ok(None)`) is an all-zero block; whatever decodes re-encodes and decodes to
//! the same record (`decode(encode(r)) == r`, and the encoding is stable).
//! `QuorumImage::decode` (512-byte blocks) runs on the rest of the input as a quorum
//! LUN read of any length, and on request on a full-size image that is all zero but for
//! the block at node n's slot, admin and group LBAs; the image must agree with the
//! per-block decoders (every slot and admin record under its own node id, group records
//! in index order with their raw blocks, the first free group record really empty, one
//! corrupt entry per block that did not decode, nothing where nothing was written).
//!
//! Every record carries a magic and a CRC32C that a mutation almost never gets right,
//! so on request the harness seals the block for each decoder: that record type's magic
//! at the start and the right CRC after its body (the layouts below, checked against
//! the encoders on the first run). Then the mutations reach the field checks.
//!
//! Input: [flags][n][block...]. flags bit 0: 4096-byte blocks (else 512); bit 1: the
//! block is the rest of the input as it is, any length (else the rest zero-padded or cut
//! to the block size); bit 2: also the full-size image (512-byte blocks only); bit 3:
//! seal. n: the node id / group index the block is read as: the header at LBA 0, a
//! heartbeat slot at `slot_lba(n)`, an admin record at `admin_lba(n)`, a group record at
//! `group_lba(n)`. Seeds: written by tests/server/quorum_fuzz_seeds.rs.
#![no_main]

use std::borrow::Cow;
use std::sync::Once;

use holdfast::agent::config::MAX_NODE_ID;
use holdfast::agent::quorum::{
    GroupRecord, GroupState, HeartbeatSlot, NodeAdmin, NodeState, QuorumHeader, QuorumImage,
    QuorumLayout, HEADER_MAGIC, MAX_GROUPS,
};
use holdfast_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;

const BIG: u8 = 1;
const RAW: u8 = 2;
const WHOLE: u8 = 4;
const SEAL: u8 = 8;

/// A record type's magic and where its CRC32C (big-endian) starts: magic + body bytes
/// (`*_BODY` in agent/quorum.rs).
struct Layout {
    magic: &'static [u8],
    crc_at: usize,
}
const HEADER: Layout = Layout {
    magic: HEADER_MAGIC,
    crc_at: 16 + 85,
};
const SLOT: Layout = Layout {
    magic: b"HFBEAT01",
    crc_at: 8 + 60,
};
const ADMIN: Layout = Layout {
    magic: b"HFNODE01",
    crc_at: 8 + 25,
};
const GROUP: Layout = Layout {
    magic: b"HFGROUP1",
    crc_at: 8 + 172,
};

impl Layout {
    /// `block` with this type's magic and a correct CRC, if `seal` and it is long enough.
    fn seal<'a>(&self, block: &'a [u8], seal: bool) -> Cow<'a, [u8]> {
        let end = self.crc_at;
        if !seal || block.len() < end + 4 {
            return Cow::Borrowed(block);
        }
        let mut b = block.to_vec();
        b[..self.magic.len()].copy_from_slice(self.magic);
        let crc = crc32c::crc32c(&b[..end]);
        b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        Cow::Owned(b)
    }
    /// The encoder agrees: magic, CRC at `crc_at`, zeros after it.
    fn check(&self, what: &str, enc: &[u8]) {
        let end = self.crc_at;
        assert_eq!(&enc[..self.magic.len()], self.magic, "{what} magic");
        let crc = u32::from_be_bytes(enc[end..end + 4].try_into().unwrap());
        assert_eq!(crc32c::crc32c(&enc[..end]), crc, "{what}: CRC not at {end}");
        assert!(all_zero(&enc[end + 4..]), "{what}: bytes after the CRC");
        assert_eq!(
            self.seal(enc, true),
            enc,
            "{what}: sealing changes a record"
        );
    }
}

/// The harness's record layouts match the encoders (once per process).
fn check_layouts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let h = QuorumHeader::new("c", 512, 1).encode().unwrap();
        HEADER.check("header", &h);
        let s = HeartbeatSlot {
            node_id: 1,
            name: "n".into(),
            incarnation: 1,
            counter: 1,
            state: NodeState::Active,
            wall_ms: 1,
        };
        SLOT.check("slot", &s.encode(512).unwrap());
        ADMIN.check("admin", &NodeAdmin::empty(1).encode(512));
        GROUP.check("group", &GroupRecord::new("g").encode(512).unwrap());
    });
}

thread_local! {
    /// A whole 512-byte-block image, all zero between runs.
    static IMAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fuzz_target!(|data: &[u8]| {
    check_layouts();
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let n = u16::from(c.u8());
    let rest = c.rest();
    let bs: u32 = if flags & BIG != 0 { 4096 } else { 512 };
    let seal = flags & SEAL != 0;
    let fitted;
    let block = if flags & RAW != 0 {
        rest
    } else {
        let mut b = rest[..rest.len().min(bs as usize)].to_vec();
        b.resize(bs as usize, 0);
        fitted = b;
        &fitted[..]
    };

    header(&HEADER.seal(block, seal));
    slot(&SLOT.seal(block, seal), bs, n);
    admin(&ADMIN.seal(block, seal), bs, n);
    group(&GROUP.seal(block, seal), bs, n);

    let layout = QuorumLayout::new(512).unwrap();
    // The input as the start of a quorum LUN read (usually a short one).
    check_image(&layout, rest);
    // A whole image with this block at node n's places (costly: every decoder first
    // scans its block for zeros, byte by byte under the coverage instrumentation).
    if flags & WHOLE != 0 && bs == 512 {
        let mut b512 = [0u8; 512];
        let len = block.len().min(512);
        b512[..len].copy_from_slice(&block[..len]);
        let blocks = [
            SLOT.seal(&b512, seal).into_owned(),
            ADMIN.seal(&b512, seal).into_owned(),
            GROUP.seal(&b512, seal).into_owned(),
        ];
        IMAGE.with_borrow_mut(|all| {
            all.resize(layout.bytes() as usize, 0);
            check_sparse_image(&layout, all, &blocks, n);
        });
    }
});

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn header(block: &[u8]) {
    if let Ok(h) = QuorumHeader::decode(block) {
        assert_eq!(
            h.block_size as usize,
            block.len(),
            "header block size: {h:?}"
        );
        let enc = h
            .encode()
            .unwrap_or_else(|e| panic!("{h:?} does not encode: {e}"));
        assert_eq!(enc.len(), block.len());
        assert_eq!(
            QuorumHeader::decode(&enc),
            Ok(h.clone()),
            "header round trip"
        );
        assert_eq!(h.encode().unwrap(), enc, "header encoding is not stable");
        assert_eq!(QuorumHeader::decode_for(block, &h.cluster), Ok(h));
    }
}

fn slot(block: &[u8], bs: u32, n: u16) {
    let lba = QuorumLayout::slot_lba(n);
    match HeartbeatSlot::decode(block, lba) {
        Ok(Some(s)) => {
            assert_eq!(QuorumLayout::slot_lba(s.node_id), lba, "{s:?} at LBA {lba}");
            let enc = s
                .encode(bs)
                .unwrap_or_else(|e| panic!("{s:?} does not encode: {e}"));
            assert_eq!(enc.len(), bs as usize);
            assert_eq!(HeartbeatSlot::decode(&enc, lba), Ok(Some(s.clone())));
            assert_eq!(s.encode(bs).unwrap(), enc, "slot encoding is not stable");
        }
        Ok(None) => assert!(all_zero(block), "Ok(None) for a non-zero slot block"),
        Err(_) => {}
    }
}

fn admin(block: &[u8], bs: u32, n: u16) {
    let lba = QuorumLayout::admin_lba(n);
    match NodeAdmin::decode(block, lba) {
        Ok(Some(a)) => {
            assert_eq!(
                QuorumLayout::admin_lba(a.node_id),
                lba,
                "{a:?} at LBA {lba}"
            );
            let enc = a.encode(bs);
            assert_eq!(enc.len(), bs as usize);
            assert_eq!(NodeAdmin::decode(&enc, lba), Ok(Some(a.clone())));
            assert_eq!(a.encode(bs), enc, "admin encoding is not stable");
        }
        Ok(None) => assert!(all_zero(block), "Ok(None) for a non-zero admin block"),
        Err(_) => {}
    }
}

fn group(block: &[u8], bs: u32, n: u16) {
    let lba = QuorumLayout::group_lba(n);
    match GroupRecord::decode(block, lba) {
        Ok(Some(g)) => {
            assert!(!g.name.is_empty(), "{g:?}");
            assert!(g.owner <= MAX_NODE_ID && g.move_to <= MAX_NODE_ID, "{g:?}");
            assert_eq!(g.owner == 0, g.state == GroupState::Stopped, "{g:?}");
            let enc = g
                .encode(bs)
                .unwrap_or_else(|e| panic!("{g:?} does not encode: {e}"));
            assert_eq!(enc.len(), bs as usize);
            assert_eq!(GroupRecord::decode(&enc, lba), Ok(Some(g.clone())));
            assert_eq!(g.encode(bs).unwrap(), enc, "group encoding is not stable");
        }
        Ok(None) => assert!(all_zero(block), "Ok(None) for a non-zero group block"),
        Err(_) => {}
    }
}

/// `QuorumImage::decode` on `all`, checked against the per-block decoders.
fn check_image(layout: &QuorumLayout, all: &[u8]) {
    let img = QuorumImage::decode(layout, all);
    let ids = usize::from(MAX_NODE_ID);
    assert_eq!(img.slots.len(), ids);
    assert_eq!(img.admins.len(), ids);
    assert_eq!(img.admin_blocks.len(), ids);
    assert_eq!(img.groups.len(), img.group_blocks.len());
    let mut corrupt = 0;

    for id in 1..=MAX_NODE_ID {
        let lba = QuorumLayout::slot_lba(id);
        let want = match layout
            .block(all, lba)
            .map(|b| HeartbeatSlot::decode(b, lba))
        {
            Some(Ok(s)) => s,
            Some(Err(_)) => {
                corrupt += 1;
                None
            }
            None => None,
        };
        assert_eq!(img.slot(id), want.as_ref(), "slot {id}");
        if let Some(s) = want {
            assert_eq!(s.node_id, id);
            let named = img.node_id(&s.name).expect("a slot's name finds a node");
            assert_eq!(img.slot(named).map(|t| &t.name), Some(&s.name));
        }

        let lba = QuorumLayout::admin_lba(id);
        let raw = layout.block(all, lba).unwrap_or(&[]);
        assert_eq!(img.admin_block(id), Some(raw), "admin block {id}");
        let a = img.admin(id);
        assert_eq!(a.node_id, id);
        match NodeAdmin::decode(raw, lba) {
            Ok(Some(want)) => assert_eq!(a, want, "admin {id}"),
            Ok(None) => assert_eq!(a, NodeAdmin::empty(id)),
            Err(_) => {
                corrupt += 1;
                assert_eq!(a, NodeAdmin::empty(id));
            }
        }
    }

    let mut groups = img.groups.iter().zip(&img.group_blocks);
    let mut first_free = None;
    for i in 0..MAX_GROUPS {
        let lba = QuorumLayout::group_lba(i);
        let Some(b) = layout.block(all, lba) else {
            break;
        };
        match GroupRecord::decode(b, lba) {
            Ok(Some(want)) => {
                let ((idx, r), raw) = groups.next().expect("a group record is missing");
                assert_eq!((*idx, r), (i, &want), "group record {i}");
                assert_eq!(raw.as_slice(), b, "raw block of group record {i}");
                let (_, found, _) = img.group(&want.name).expect("group found by name");
                assert_eq!(found.name, want.name);
            }
            Ok(None) => {
                first_free.get_or_insert(i);
            }
            Err(_) => corrupt += 1,
        }
    }
    assert!(groups.next().is_none(), "group records beyond the image");
    assert_eq!(img.first_free_group, first_free, "first free group record");
    assert_eq!(
        img.corrupt.len(),
        corrupt,
        "corrupt blocks: {:?}",
        img.corrupt
    );

    let owned: usize = (1..=MAX_NODE_ID).map(|id| img.load(id)).sum();
    assert_eq!(
        owned,
        img.groups.iter().filter(|(_, r)| r.owner != 0).count()
    );
}

/// `QuorumImage::decode` on `all` (all zero) with `blocks` (slot, admin, group) at node
/// `n`'s slot, admin and group LBAs: it finds exactly what the per-block decoders find
/// there, and nothing else. `all` is zero again afterwards.
fn check_sparse_image(layout: &QuorumLayout, all: &mut [u8], blocks: &[Vec<u8>; 3], n: u16) {
    let node = (1..=MAX_NODE_ID).contains(&n);
    let in_table = n < MAX_GROUPS;
    let [slot_b, admin_b, group_b] = blocks;
    let mut places = Vec::new();
    if node {
        places.push((QuorumLayout::slot_lba(n), slot_b));
        places.push((QuorumLayout::admin_lba(n), admin_b));
    }
    if in_table {
        places.push((QuorumLayout::group_lba(n), group_b));
    }
    for (lba, b) in &places {
        let s = *lba as usize * 512;
        all[s..s + 512].copy_from_slice(b);
    }
    let img = QuorumImage::decode(layout, all);
    for (lba, _) in &places {
        let s = *lba as usize * 512;
        all[s..s + 512].fill(0);
    }

    let slot = node.then(|| HeartbeatSlot::decode(slot_b, QuorumLayout::slot_lba(n)));
    let admin = node.then(|| NodeAdmin::decode(admin_b, QuorumLayout::admin_lba(n)));
    let grp = in_table.then(|| GroupRecord::decode(group_b, QuorumLayout::group_lba(n)));
    let corrupt = usize::from(matches!(slot, Some(Err(_))))
        + usize::from(matches!(admin, Some(Err(_))))
        + usize::from(matches!(grp, Some(Err(_))));
    assert_eq!(
        img.corrupt.len(),
        corrupt,
        "corrupt blocks: {:?}",
        img.corrupt
    );

    assert_eq!(img.slots.len(), usize::from(MAX_NODE_ID));
    assert_eq!(img.admins.len(), usize::from(MAX_NODE_ID));
    assert_eq!(img.admin_blocks.len(), usize::from(MAX_NODE_ID));
    for id in 1..=MAX_NODE_ID {
        let here = node && id == n;
        let want = if here {
            slot.clone().unwrap().ok().flatten()
        } else {
            None
        };
        assert_eq!(img.slot(id), want.as_ref(), "slot {id}");
        let want = match admin.clone().filter(|_| here) {
            Some(Ok(Some(a))) => a,
            _ => NodeAdmin::empty(id),
        };
        assert_eq!(img.admin(id), want, "admin {id}");
        let raw = img.admin_block(id).unwrap();
        assert_eq!(raw.len(), 512);
        if here {
            assert_eq!(raw, admin_b.as_slice(), "admin block {id}");
        }
    }
    if let Some(s) = img.slot(n) {
        assert_eq!(img.node_id(&s.name), Some(n));
    }

    match &grp {
        Some(Ok(Some(g))) => {
            assert_eq!(img.groups, [(n, g.clone())]);
            assert_eq!(img.group_blocks, std::slice::from_ref(group_b));
            assert_eq!(img.group(&g.name).map(|(i, _, _)| i), Some(n));
            let owned: usize = (1..=MAX_NODE_ID).map(|id| img.load(id)).sum();
            assert_eq!(owned, usize::from(g.owner != 0));
        }
        _ => assert!(img.groups.is_empty() && img.group_blocks.is_empty()),
    }
    // Index 0 is free unless the block is there and not empty.
    let taken0 = n == 0 && !matches!(grp, Some(Ok(None)));
    assert_eq!(img.first_free_group, Some(u16::from(taken0)));
}
