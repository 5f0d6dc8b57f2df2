//! Asymmetric logical unit access (SPC-4 §5.16), implicit only (TPGS = 01b): one target
//! port group per gateway and REPORT TARGET PORT GROUPS.
//!
//! Access states follow the store's exclusive write lock (an RBD image's, which librbd
//! moves to whichever gateway writes): the gateway holding it is active/optimized, the
//! others active/non-optimized. Both states accept every command, so a path is never
//! refused; the states only steer multipath initiators (dm-multipath `prio alua` with
//! `group_by_prio`, Windows MPIO) to the lock holder, so round-robin does not bounce the
//! lock between gateways on every I/O. A write through a non-optimized gateway moves the
//! lock there, and with it the optimized state (the implicit transition).

use super::backend::ExclusiveLock;
use super::cdb;
use super::lun::{CmdResult, LogicalUnit, Request};
use super::sense::Sense;
use super::spc::truncate;
use bytes::{BufMut, BytesMut};

/// A target port group: its id and the relative target port ids in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    pub id: u16,
    pub ports: Vec<u16>,
}

/// The port groups of a logical unit as this gateway sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AluaSettings {
    /// This gateway's group (its target ports: the target's portal group tags).
    pub local: PortGroup,
    /// The other gateways' groups serving the same store (from the configuration).
    pub peers: Vec<PortGroup>,
}

impl Default for AluaSettings {
    fn default() -> Self {
        AluaSettings {
            local: PortGroup {
                id: 1,
                ports: vec![1],
            },
            peers: Vec::new(),
        }
    }
}

/// Asymmetric access states we report (the values of SPC-4 table 165).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessState {
    ActiveOptimized = 0x0,
    ActiveNonOptimized = 0x1,
}

/// Seconds an initiator should allow for an implicit transition: a lock handover from
/// a dead gateway waits for its watch to expire (Ceph's osd_client_watch_timeout, 30 s).
pub const IMPLICIT_TRANSITION_SECS: u8 = 30;

/// Supported states: active/non-optimized (AN_SUP) and active/optimized (AO_SUP).
const SUPPORTED_STATES: u8 = 0x03;

/// STATUS CODE: "altered by implicit asymmetric logical unit access behavior".
const STATUS_IMPLICIT: u8 = 0x02;

/// The state of every group, local first, given where the lock is.
///
/// - no shared lock (a file on one target): every group active/optimized;
/// - held here: this group optimized, the peers not;
/// - held by another gateway: this group non-optimized; with one peer that peer is the
///   holder (optimized), with several we cannot tell which and report them all
///   non-optimized (each gateway's answer for its own group stays exact, which is what
///   dm-multipath uses);
/// - held by nobody: the lowest group id is optimized, so every initiator picks the same
///   gateway, whose first write then takes the lock.
pub fn group_states(alua: &AluaSettings, lock: ExclusiveLock) -> Vec<(&PortGroup, AccessState)> {
    use AccessState::{ActiveNonOptimized as Ano, ActiveOptimized as Ao};
    let lowest = alua
        .peers
        .iter()
        .map(|p| p.id)
        .fold(alua.local.id, u16::min);
    let local = match lock {
        ExclusiveLock::NotShared | ExclusiveLock::HeldHere => Ao,
        ExclusiveLock::HeldElsewhere => Ano,
        ExclusiveLock::Unowned if alua.local.id == lowest => Ao,
        ExclusiveLock::Unowned => Ano,
    };
    let peer = |p: &PortGroup| match lock {
        ExclusiveLock::NotShared => Ao,
        ExclusiveLock::HeldHere => Ano,
        ExclusiveLock::HeldElsewhere if alua.peers.len() == 1 => Ao,
        ExclusiveLock::HeldElsewhere => Ano,
        ExclusiveLock::Unowned if p.id == lowest => Ao,
        ExclusiveLock::Unowned => Ano,
    };
    std::iter::once((&alua.local, local))
        .chain(alua.peers.iter().map(|p| (p, peer(p))))
        .collect()
}

/// REPORT TARGET PORT GROUPS parameter data: the length-only header (format 000b) or
/// the extended header with the implicit transition time (001b), then one descriptor
/// per group in ascending id order.
pub fn report(alua: &AluaSettings, lock: ExclusiveLock, extended: bool) -> BytesMut {
    let mut groups = group_states(alua, lock);
    groups.sort_by_key(|(g, _)| g.id);
    let mut b = BytesMut::with_capacity(8 + groups.len() * 16);
    b.put_u32(0); // return data length, patched below
    if extended {
        b.put_u8(0x10); // FORMAT TYPE 001b
        b.put_u8(IMPLICIT_TRANSITION_SECS);
        b.put_u16(0);
    }
    for (g, state) in groups {
        b.put_u8(state as u8); // PREF = 0: no group is preferred over the lock holder
        b.put_u8(SUPPORTED_STATES);
        b.put_u16(g.id);
        b.put_u8(0);
        b.put_u8(STATUS_IMPLICIT);
        b.put_u8(0);
        let ports = &g.ports[..g.ports.len().min(255)];
        b.put_u8(ports.len() as u8);
        for &p in ports {
            b.put_u16(0);
            b.put_u16(p);
        }
    }
    let n = (b.len() - 4) as u32;
    b[0..4].copy_from_slice(&n.to_be_bytes());
    b
}

/// REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0x0A).
pub(crate) fn report_target_port_groups(lu: &LogicalUnit, req: &Request) -> CmdResult {
    let extended = match cdb::byte(req.cdb, 1) >> 5 {
        0 => false,
        1 => true,
        _ => return Err(Sense::invalid_cdb(1, Some(7)).into()),
    };
    let alloc = cdb::be32(req.cdb, 6) as usize;
    let lock = lu.backend().exclusive_lock().unwrap_or_else(|e| {
        // The cluster did not answer: report as if nobody held the lock, which keeps
        // every path usable and points initiators at one agreed gateway.
        tracing::warn!(error = %e, serial = %lu.settings().serial, "exclusive lock owner unknown");
        ExclusiveLock::Unowned
    });
    Ok(truncate(report(&lu.settings().alua, lock, extended), alloc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessState::{ActiveNonOptimized as Ano, ActiveOptimized as Ao};

    fn group(id: u16) -> PortGroup {
        PortGroup {
            id,
            ports: vec![id],
        }
    }

    fn gateways(local: u16, peers: &[u16]) -> AluaSettings {
        AluaSettings {
            local: group(local),
            peers: peers.iter().map(|&p| group(p)).collect(),
        }
    }

    fn states(a: &AluaSettings, lock: ExclusiveLock) -> Vec<(u16, AccessState)> {
        group_states(a, lock)
            .into_iter()
            .map(|(g, s)| (g.id, s))
            .collect()
    }

    #[test]
    fn the_lock_holder_is_optimized_and_both_gateways_agree() {
        let (a, b) = (gateways(1, &[2]), gateways(2, &[1]));
        // A holds the lock: A's view and B's view name the same optimized group.
        assert_eq!(states(&a, ExclusiveLock::HeldHere), [(1, Ao), (2, Ano)]);
        assert_eq!(
            states(&b, ExclusiveLock::HeldElsewhere),
            [(2, Ano), (1, Ao)]
        );
        assert_eq!(states(&b, ExclusiveLock::HeldHere), [(2, Ao), (1, Ano)]);
    }

    #[test]
    fn nobody_holding_the_lock_points_everyone_at_the_lowest_group() {
        assert_eq!(
            states(&gateways(3, &[2, 5]), ExclusiveLock::Unowned),
            [(3, Ano), (2, Ao), (5, Ano)]
        );
        assert_eq!(
            states(&gateways(2, &[3, 5]), ExclusiveLock::Unowned),
            [(2, Ao), (3, Ano), (5, Ano)]
        );
    }

    #[test]
    fn an_unknown_holder_among_several_peers_is_not_guessed() {
        assert_eq!(
            states(&gateways(1, &[2, 3]), ExclusiveLock::HeldElsewhere),
            [(1, Ano), (2, Ano), (3, Ano)]
        );
    }

    #[test]
    fn an_unshared_store_is_optimized_everywhere() {
        assert_eq!(
            states(&AluaSettings::default(), ExclusiveLock::NotShared),
            [(1, Ao)]
        );
    }

    #[test]
    fn report_lists_groups_in_id_order_with_their_ports() {
        let mut a = gateways(2, &[1]);
        a.local.ports = vec![2, 7];
        let b = report(&a, ExclusiveLock::HeldHere, false);
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 28,
            1, 0x03, 0, 1, 0, 2, 0, 1, 0, 0, 0, 1,
            0, 0x03, 0, 2, 0, 2, 0, 2, 0, 0, 0, 2, 0, 0, 0, 7,
        ];
        assert_eq!(&b[..], &want[..]);
    }

    /// A store shared with other gateways whose lock is wherever the test puts it.
    #[derive(Debug)]
    struct SharedStore(std::sync::Mutex<ExclusiveLock>);

    impl crate::scsi::backend::BlockBackend for SharedStore {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> std::io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn deallocate(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn allocation_at(&self, _: u64) -> std::io::Result<(bool, u64)> {
            Ok((false, 1))
        }
        fn exclusive_lock(&self) -> std::io::Result<ExclusiveLock> {
            Ok(*self.0.lock().unwrap())
        }
    }

    fn execute(lu: &LogicalUnit, cdb: &[u8]) -> crate::scsi::ScsiOutcome {
        let nexus = std::sync::Arc::new(crate::scsi::ItNexus {
            initiator_name: "iqn.2024-01.test:i".into(),
            isid: [0x40, 0, 0, 0, 0, 1],
            target_name: "iqn.2024-01.test:t".into(),
            tpgt: 2,
            relative_port_id: 2,
        });
        lu.execute(&crate::scsi::ScsiCommand {
            nexus,
            lun: 0,
            cdb: bytes::Bytes::copy_from_slice(cdb),
            data_out: bytes::Bytes::new(),
            data_in_len: 4096,
            data_out_len: 0,
            attr: Default::default(),
        })
    }

    #[test]
    fn the_device_server_reports_states_as_the_lock_moves() {
        let store = std::sync::Arc::new(SharedStore(ExclusiveLock::Unowned.into()));
        let settings = crate::scsi::LunSettings {
            alua: gateways(2, &[1]),
            ..Default::default()
        };
        let lu = LogicalUnit::new(settings, store.clone());
        let rtpg = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let state_of =
            |data: &[u8], group: u8| data[4..].chunks(12).find(|d| d[3] == group).map(|d| d[0]);
        let out = execute(&lu, &rtpg);
        assert_eq!(out.status, 0);
        // Nobody holds the lock: group 1 (the lowest) is optimized, we are not.
        assert_eq!(state_of(&out.data_in, 1), Some(Ao as u8));
        assert_eq!(state_of(&out.data_in, 2), Some(Ano as u8));
        *store.0.lock().unwrap() = ExclusiveLock::HeldHere;
        let out = execute(&lu, &rtpg);
        assert_eq!(state_of(&out.data_in, 2), Some(Ao as u8));
        assert_eq!(state_of(&out.data_in, 1), Some(Ano as u8));
        // A parameter data format we do not know is an invalid field; a short allocation
        // length truncates.
        assert_eq!(
            execute(&lu, &[0xA3, 0x4A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).status,
            2
        );
        let out = execute(&lu, &[0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0]);
        assert_eq!(
            &out.data_in[..],
            &[0, 0, 0, 28, 0x10, IMPLICIT_TRANSITION_SECS]
        );
    }

    #[test]
    fn inquiry_and_vpd_announce_implicit_alua_and_the_port_group() {
        let settings = crate::scsi::LunSettings {
            alua: gateways(2, &[1]),
            ..Default::default()
        };
        let store = std::sync::Arc::new(SharedStore(ExclusiveLock::NotShared.into()));
        let lu = LogicalUnit::new(settings, store);
        let std = execute(&lu, &[0x12, 0, 0, 0, 96, 0]);
        assert_eq!(std.data_in[5] & 0x30, 0x10, "TPGS = 01b");
        let page = execute(&lu, &[0x12, 1, 0x83, 1, 0, 0]).data_in;
        let mut at = 4;
        let mut found = Vec::new();
        while at + 4 <= page.len() {
            let (kind, len) = (page[at + 1] & 0x3F, usize::from(page[at + 3]));
            if kind == 0x14 || kind == 0x15 {
                found.push((kind, u16::from_be_bytes([page[at + 6], page[at + 7]])));
            }
            at += 4 + len;
        }
        // Relative target port 2 (the nexus's), target port group 2.
        assert_eq!(found, [(0x14, 2), (0x15, 2)]);
    }

    #[test]
    fn extended_header_carries_the_transition_time() {
        let b = report(&AluaSettings::default(), ExclusiveLock::NotShared, true);
        assert_eq!(
            &b[..8],
            &[0, 0, 0, 16, 0x10, IMPLICIT_TRANSITION_SECS, 0, 0]
        );
        assert_eq!(b.len(), 8 + 12);
        assert_eq!(b[8], Ao as u8);
    }
}
