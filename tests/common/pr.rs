//! PERSISTENT RESERVE IN/OUT as the tests need them: parameter lists and TransportIDs
//! are built here from SPC-4 directly (not with the target's encoder), so a target that
//! mis-encodes or mis-parses them cannot agree with itself by construction.
#![allow(dead_code)]

use holdfast::initiator::{cdb, ScsiResult, Session};

/// PR OUT service actions (SPC-4 table 204).
pub mod sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
    pub const REPLACE_LOST: u8 = 8;
}

/// Reservation types.
pub mod ty {
    pub const WE: u8 = 1;
    pub const EA: u8 = 3;
    pub const WE_RO: u8 = 5;
    pub const EA_RO: u8 = 6;
    pub const WE_AR: u8 = 7;
    pub const EA_AR: u8 = 8;
    pub const ALL: [u8; 6] = [WE, EA, WE_RO, EA_RO, WE_AR, EA_AR];
}

/// Flags of byte 20 of the basic parameter list.
pub const SPEC_I_PT: u8 = 0x08;
pub const ALL_TG_PT: u8 = 0x04;
pub const APTPL: u8 = 0x01;

/// What a command ended with, in the terms the tests assert on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Good,
    Conflict,
    /// CHECK CONDITION: sense key, ASC, ASCQ.
    Check(u8, u8, u8),
    Other(u8),
}

pub const UA_RES_PREEMPTED: Outcome = Outcome::Check(0x06, 0x2A, 0x03);
pub const UA_RES_RELEASED: Outcome = Outcome::Check(0x06, 0x2A, 0x04);
pub const UA_REG_PREEMPTED: Outcome = Outcome::Check(0x06, 0x2A, 0x05);

pub fn outcome(r: &ScsiResult) -> Outcome {
    match r.status {
        0x00 => Outcome::Good,
        0x18 => Outcome::Conflict,
        0x02 => match r.sense() {
            Some(s) => Outcome::Check(s.key, s.asc, s.ascq),
            None => Outcome::Check(0, 0, 0),
        },
        s => Outcome::Other(s),
    }
}

/// iSCSI TransportID, format 00b (initiator name only).
pub fn tid_name(name: &str) -> Vec<u8> {
    tid(0x05, name)
}

/// iSCSI TransportID, format 01b (initiator port: `name,i,0x<ISID>`).
pub fn tid_port(name: &str, isid: [u8; 6]) -> Vec<u8> {
    tid(0x45, &format!("{name},i,0x{}", hex::encode(isid)))
}

fn tid(byte0: u8, text: &str) -> Vec<u8> {
    // NUL-terminated, padded to a multiple of 4 (SPC-4 §7.6.4.6).
    let body = (text.len() + 1).div_ceil(4) * 4;
    let mut b = vec![byte0, 0];
    b.extend_from_slice(&(body as u16).to_be_bytes());
    b.extend_from_slice(text.as_bytes());
    b.resize(4 + body, 0);
    b
}

/// The basic PR OUT parameter list; with SPEC_I_PT, the TransportIDs follow.
pub fn basic_list(key: u64, sa_key: u64, flags: u8, tids: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&key.to_be_bytes());
    b.extend_from_slice(&sa_key.to_be_bytes());
    b.extend_from_slice(&[0; 4]); // obsolete scope-specific address
    b.extend_from_slice(&[flags, 0, 0, 0]);
    if flags & SPEC_I_PT != 0 {
        let n: usize = tids.iter().map(Vec::len).sum();
        b.extend_from_slice(&(n as u32).to_be_bytes());
        for t in tids {
            b.extend_from_slice(t);
        }
    }
    b
}

/// REGISTER AND MOVE parameter list (SPC-4 table 215).
pub fn move_list(
    key: u64,
    sa_key: u64,
    unreg: bool,
    aptpl: bool,
    rel_port: u16,
    tid: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + tid.len());
    b.extend_from_slice(&key.to_be_bytes());
    b.extend_from_slice(&sa_key.to_be_bytes());
    b.push(0);
    b.push(u8::from(unreg) << 1 | u8::from(aptpl));
    b.extend_from_slice(&rel_port.to_be_bytes());
    b.extend_from_slice(&(tid.len() as u32).to_be_bytes());
    b.extend_from_slice(tid);
    b
}

/// Send PR OUT with a parameter list; the raw outcome.
pub async fn prout(s: &Session, lun: u64, action: u8, rtype: u8, list: Vec<u8>) -> Outcome {
    let c = cdb::persistent_reserve_out(action, rtype, list.len() as u32);
    let r = s
        .command(lun, &c, Some(list.into()), 0)
        .await
        .expect("PR OUT transport");
    outcome(&r)
}

/// PR OUT with the basic list of (key, sa_key, flags) and no TransportIDs.
pub async fn prout_basic(
    s: &Session,
    lun: u64,
    action: u8,
    rtype: u8,
    key: u64,
    sa_key: u64,
    flags: u8,
) -> Outcome {
    prout(s, lun, action, rtype, basic_list(key, sa_key, flags, &[])).await
}

pub async fn register(s: &Session, lun: u64, old: u64, new: u64) -> Outcome {
    prout_basic(s, lun, sa::REGISTER, 0, old, new, 0).await
}

pub async fn reserve(s: &Session, lun: u64, key: u64, rtype: u8) -> Outcome {
    prout_basic(s, lun, sa::RESERVE, rtype, key, 0, 0).await
}

pub async fn release(s: &Session, lun: u64, key: u64, rtype: u8) -> Outcome {
    prout_basic(s, lun, sa::RELEASE, rtype, key, 0, 0).await
}

pub async fn clear(s: &Session, lun: u64, key: u64) -> Outcome {
    prout_basic(s, lun, sa::CLEAR, 0, key, 0, 0).await
}

pub async fn preempt(
    s: &Session,
    lun: u64,
    key: u64,
    victim: u64,
    rtype: u8,
    abort: bool,
) -> Outcome {
    let action = if abort {
        sa::PREEMPT_AND_ABORT
    } else {
        sa::PREEMPT
    };
    prout_basic(s, lun, action, rtype, key, victim, 0).await
}

async fn prin(s: &Session, lun: u64, action: u8) -> Result<Vec<u8>, Outcome> {
    let alloc = 8192u16;
    let r = s
        .command(
            lun,
            &cdb::persistent_reserve_in(action, alloc),
            None,
            alloc.into(),
        )
        .await
        .expect("PR IN transport");
    match outcome(&r) {
        Outcome::Good => Ok(r.data.to_vec()),
        o => Err(o),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// READ KEYS: (PRgeneration, keys in the target's order).
pub async fn try_read_keys(s: &Session, lun: u64) -> Result<(u32, Vec<u64>), Outcome> {
    let d = prin(s, lun, 0).await?;
    let len = be32(&d, 4) as usize;
    assert_eq!(len % 8, 0, "READ KEYS additional length {len}");
    assert_eq!(d.len(), 8 + len, "READ KEYS fits the allocation length");
    Ok((
        be32(&d, 0),
        (0..len / 8).map(|i| be64(&d, 8 + 8 * i)).collect(),
    ))
}

pub async fn read_keys(s: &Session, lun: u64) -> (u32, Vec<u64>) {
    try_read_keys(s, lun).await.expect("READ KEYS")
}

/// READ RESERVATION: (PRgeneration, Some((key, type)) when reserved).
pub async fn read_reservation(s: &Session, lun: u64) -> (u32, Option<(u64, u8)>) {
    let d = prin(s, lun, 1).await.expect("READ RESERVATION");
    let gen = be32(&d, 0);
    match be32(&d, 4) {
        0 => (gen, None),
        16 => {
            assert_eq!(d[21] >> 4, 0, "scope is LU_SCOPE");
            (gen, Some((be64(&d, 8), d[21] & 0x0f)))
        }
        n => panic!("READ RESERVATION additional length {n}"),
    }
}

/// One READ FULL STATUS descriptor, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullStatus {
    pub key: u64,
    pub all_tg_pt: bool,
    pub holder: bool,
    pub rtype: u8,
    pub rel_port: u16,
    /// TransportID format (0 = name only, 1 = initiator port).
    pub format: u8,
    /// The TransportID text without its NUL padding (`name` or `name,i,0x<isid>`).
    pub name: String,
}

pub async fn read_full_status(s: &Session, lun: u64) -> (u32, Vec<FullStatus>) {
    let d = prin(s, lun, 3).await.expect("READ FULL STATUS");
    let gen = be32(&d, 0);
    let len = be32(&d, 4) as usize;
    assert_eq!(
        d.len(),
        8 + len,
        "READ FULL STATUS fits the allocation length"
    );
    let mut out = Vec::new();
    let mut at = 8;
    while at < d.len() {
        let desc_len = be32(&d, at + 20) as usize;
        let tid = &d[at + 24..at + 24 + desc_len];
        assert_eq!(tid[0] & 0x0f, 5, "iSCSI protocol identifier");
        let tlen = u16::from_be_bytes([tid[2], tid[3]]) as usize;
        assert_eq!(
            tlen + 4,
            tid.len(),
            "TransportID length matches the descriptor"
        );
        assert_eq!(tlen % 4, 0, "TransportID padded to 4 bytes");
        let text = tid[4..].split(|&c| c == 0).next().unwrap_or(&[]);
        out.push(FullStatus {
            key: be64(&d, at),
            all_tg_pt: d[at + 12] & 0x02 != 0,
            holder: d[at + 12] & 0x01 != 0,
            rtype: d[at + 13] & 0x0f,
            rel_port: u16::from_be_bytes([d[at + 18], d[at + 19]]),
            format: tid[0] >> 6,
            name: String::from_utf8(text.to_vec()).expect("TransportID is text"),
        });
        at += 24 + desc_len;
    }
    assert_eq!(at, d.len(), "descriptors fill the data exactly");
    // The initiator library's decoder (written separately) must read the same.
    let (lib_gen, lib) = holdfast::initiator::pr::parse_full_status(&d).expect("library decodes");
    assert_eq!(lib_gen, gen);
    let lib: Vec<(u64, bool, bool, u16, String)> = lib
        .into_iter()
        .map(|e| {
            let text = match e.transport_id.isid {
                Some(isid) => port_name(&e.transport_id.name, isid),
                None => e.transport_id.name.to_ascii_lowercase(),
            };
            (e.key, e.all_tg_pt, e.holder, e.relative_target_port, text)
        })
        .collect();
    let mine: Vec<(u64, bool, bool, u16, String)> = out
        .iter()
        .map(|e| (e.key, e.all_tg_pt, e.holder, e.rel_port, e.name.clone()))
        .collect();
    assert_eq!(lib, mine, "READ FULL STATUS decoded two ways");
    (gen, out)
}

/// `name,i,0x<isid>` as a TransportID of format 01b spells the initiator port.
pub fn port_name(name: &str, isid: [u8; 6]) -> String {
    format!("{},i,0x{}", name.to_ascii_lowercase(), hex::encode(isid))
}

/// READ(16) of one block at `lba`, raw outcome.
pub async fn read_block(s: &Session, lun: u64, lba: u64) -> Outcome {
    let r = s
        .command(lun, &cdb::read16(lba, 1, false), None, 512)
        .await
        .expect("READ transport");
    outcome(&r)
}

/// WRITE(16) of one block at `lba` filled with `fill`, raw outcome.
pub async fn write_block(s: &Session, lun: u64, lba: u64, fill: u8) -> Outcome {
    let r = s
        .command(
            lun,
            &cdb::write16(lba, 1, false),
            Some(vec![fill; 512].into()),
            0,
        )
        .await
        .expect("WRITE transport");
    outcome(&r)
}

pub async fn tur(s: &Session, lun: u64) -> Outcome {
    let r = s
        .command(lun, &cdb::test_unit_ready(), None, 0)
        .await
        .expect("TUR transport");
    outcome(&r)
}

pub async fn inquiry(s: &Session, lun: u64) -> Outcome {
    let r = s
        .command(lun, &cdb::inquiry(false, 0, 96), None, 96)
        .await
        .expect("INQUIRY transport");
    outcome(&r)
}
