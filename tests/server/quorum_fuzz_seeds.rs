//! The seed corpus of the `quorum_record` fuzz target (fuzz/fuzz_targets/quorum_record.rs),
//! built from records encoded by `agent::quorum` itself. Every seed is in
//! fixtures/fuzz/quorum_record/ with exactly this content, so a change to the on-disk
//! format that leaves the committed seeds stale fails here. Rewrite them with
//!
//!     HOLDFAST_WRITE_FUZZ_SEEDS=1 cargo test --test server -- quorum_fuzz_seeds::
//!
//! (files not made here, e.g. a crash input kept as a regression seed, are left alone).
//!
//! Input format of the target: [flags][n][block...]; flags bit 0: 4096-byte blocks
//! (else 512), bit 1: the block is the rest as it is (else zero-padded to the block
//! size, so these seeds leave out trailing zeros), bit 2: also decode a full-size image
//! with the block in it, bit 3: give each decoder the block with its magic and a right
//! CRC (a no-op on these valid records; mutations of them keep decoding that far); n:
//! the node id / group index.

use holdfast::agent::quorum::{
    AdminState, GroupRecord, GroupState, HeartbeatSlot, NodeAdmin, NodeState, QuorumHeader,
    QuorumLayout,
};
use std::path::PathBuf;

const BIG: u8 = 1;
const RAW: u8 = 2;
const WHOLE: u8 = 4;
const SEAL: u8 = 8;

fn trimmed(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    &b[..end]
}

/// A seed: flags, n and the block (trailing zeros cut unless RAW).
fn seed(flags: u8, n: u16, block: &[u8]) -> Vec<u8> {
    let mut s = vec![flags, u8::try_from(n).unwrap()];
    s.extend_from_slice(if flags & RAW != 0 {
        block
    } else {
        trimmed(block)
    });
    s
}

fn slot(node_id: u16, name: &str, state: NodeState) -> HeartbeatSlot {
    HeartbeatSlot {
        node_id,
        name: name.into(),
        incarnation: 0x5eed_0000_0000_0000 | u64::from(node_id),
        counter: 1000 + u64::from(node_id),
        state,
        wall_ms: 1_790_000_000_000,
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (bs, flags, name) in [(512u32, 0, "header-512"), (4096, BIG | SEAL, "header-4096")] {
        let h = QuorumHeader::new("lab", bs, 0x0123_4567_89ab_cdef);
        out.push((name, seed(flags, 0, &h.encode().unwrap())));
    }

    let s = slot(4, "node-4", NodeState::Active);
    out.push(("slot-4-active-512", seed(WHOLE, 4, &s.encode(512).unwrap())));
    let s = slot(1, "n1", NodeState::Left);
    out.push(("slot-1-left-512", seed(SEAL, 1, &s.encode(512).unwrap())));
    let s = slot(64, &"x".repeat(32), NodeState::SelfFenced);
    out.push((
        "slot-64-selffenced-4096",
        seed(BIG, 64, &s.encode(4096).unwrap()),
    ));

    let a = NodeAdmin {
        node_id: 2,
        drained: true,
        fenced_incarnation: 0x5eed_0000_0000_0002,
        fenced_by: 1,
        fence_count: 3,
        fenced_wall_ms: 1_790_000_000_000,
    };
    out.push(("admin-2-fenced-512", seed(WHOLE | SEAL, 2, &a.encode(512))));
    out.push((
        "admin-64-empty-4096",
        seed(BIG | SEAL, 64, &NodeAdmin::empty(64).encode(4096)),
    ));

    let mut g = GroupRecord::new("web");
    g.owner = 3;
    g.owner_incarnation = 0x5eed_0000_0000_0003;
    g.epoch = 42;
    g.state = GroupState::Running;
    g.move_to = 2;
    g.restarts = 2;
    g.set_failed_on(5);
    g.reason = "claimed after node 1 died".into();
    out.push((
        "group-0-running-512",
        seed(WHOLE | SEAL, 0, &g.encode(512).unwrap()),
    ));
    let mut g = GroupRecord::new(&"g".repeat(48));
    g.admin = AdminState::Offline;
    g.frozen = true;
    g.saved = true;
    g.epoch = u64::MAX;
    g.set_failed_on(64);
    g.reason = "é".repeat(40);
    out.push((
        "group-255-offline-4096",
        seed(BIG | SEAL, 255, &g.encode(4096).unwrap()),
    ));
    let mut g = GroupRecord::new("db");
    g.owner = 64;
    g.state = GroupState::Stopping;
    g.saved = true;
    g.reason = "moving to node 2".into();
    out.push((
        "group-7-stopping-raw-512",
        seed(RAW | WHOLE, 7, &g.encode(512).unwrap()),
    ));

    // The start of a quorum LUN read, as it is: header and slots 1-3 (the image decode
    // sees them where they belong; the record decoders see the header).
    let mut image = QuorumHeader::new("lab", 512, 7).encode().unwrap();
    image.extend(slot(1, "a", NodeState::Active).encode(512).unwrap());
    image.extend([0u8; 512]);
    image.extend(slot(3, "c", NodeState::SelfFenced).encode(512).unwrap());
    out.push(("image-start-raw-512", seed(RAW, 0, &image)));
    out
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz/quorum_record")
}

#[test]
fn seeds_decode_as_intended() {
    for (name, s) in seeds() {
        let (flags, n) = (s[0], u16::from(s[1]));
        let bs = if flags & BIG != 0 { 4096 } else { 512 };
        let mut block = s[2..].to_vec();
        if flags & RAW == 0 {
            block.resize(bs, 0);
        }
        // (the image seed: its first block is the header)
        let ok = if name.starts_with("header") || name.starts_with("image") {
            QuorumHeader::decode(&block[..bs]).is_ok()
        } else if name.starts_with("slot") {
            matches!(
                HeartbeatSlot::decode(&block, QuorumLayout::slot_lba(n)),
                Ok(Some(_))
            )
        } else if name.starts_with("admin") {
            matches!(
                NodeAdmin::decode(&block, QuorumLayout::admin_lba(n)),
                Ok(Some(_))
            )
        } else {
            matches!(
                GroupRecord::decode(&block, QuorumLayout::group_lba(n)),
                Ok(Some(_))
            )
        };
        assert!(ok, "seed {name} does not decode");
    }
}

#[test]
fn committed_seeds_are_current() {
    let dir = dir();
    let write = std::env::var_os("HOLDFAST_WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1");
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, s) in seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &s).unwrap();
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == s,
            "{} is missing or stale; rewrite the seeds with \
             HOLDFAST_WRITE_FUZZ_SEEDS=1 cargo test --test server -- quorum_fuzz_seeds::",
            path.display()
        );
    }
}
