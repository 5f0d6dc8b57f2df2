//! Helpers shared by the fuzz targets: fixed identities and small input readers.

use std::sync::Arc;

use holdfast::scsi::ItNexus;

/// Reads fixed-size fields off the front of a fuzz input; zeros once it runs dry, so
/// every input is usable (libFuzzer then learns which bytes matter).
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.rest.split_first() {
            Some((&b, rest)) => {
                self.rest = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        head
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Login targets: open, one-way CHAP, mutual CHAP. tools/fuzz-seeds.sh serves the same
/// names and secrets, so captured logins are valid inputs.
pub const OPEN_TARGET: &str = "iqn.2026-11.org.holdfast:fuzz-open";
pub const CHAP_TARGET: &str = "iqn.2026-11.org.holdfast:fuzz-chap";
pub const MUTUAL_TARGET: &str = "iqn.2026-11.org.holdfast:fuzz-mutual";
pub const CHAP_USER: &str = "fuzzuser";
pub const CHAP_SECRET: &[u8] = b"fuzz-initiator-secret";
pub const MUTUAL_USER: &str = "fuzztarget";
pub const MUTUAL_SECRET: &[u8] = b"fuzz-target-secret-2";

pub const TARGET_NAME: &str = "iqn.2026-11.org.holdfast:fuzz";
pub const INITIATOR_A: &str = "iqn.2026-11.org.example:node-a";
pub const INITIATOR_B: &str = "iqn.2026-11.org.example:node-b";

/// Four I_T nexuses: two initiators, two ISIDs each, on two target ports, so PR code
/// sees same-name/different-ISID and same-initiator/different-port cases.
pub fn nexuses() -> Vec<Arc<ItNexus>> {
    let mk = |name: &str, isid_last: u8, tpgt: u16| {
        Arc::new(ItNexus {
            initiator_name: name.to_string(),
            isid: [0x80, 0, 0x02, 0x3d, 0, isid_last],
            target_name: TARGET_NAME.to_string(),
            tpgt,
            relative_port_id: tpgt,
        })
    };
    vec![
        mk(INITIATOR_A, 1, 1),
        mk(INITIATOR_A, 2, 2),
        mk(INITIATOR_B, 1, 1),
        mk(INITIATOR_B, 2, 1),
    ]
}
