//! What the guest's kernel log says about refused writes.

/// A write the guest kernel failed with RESERVATION CONFLICT.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// A data write to this block (512-byte blocks: the sector number).
    Block(u64),
    /// A cache flush, as an O_DSYNC write sends after its data.
    Flush,
}

/// The refused writes in the guest's kernel log, from the block layer's error line:
/// "critical nexus error, dev sdb, sector 1034 op 0x1:(WRITE) flags 0x28800 phys_seg 1 …"
/// (Linux 6.1; 6.5 and later call it "reservation conflict error"). A flush carries no
/// data: phys_seg 0.
pub fn refused_writes(dmesg: &str) -> Vec<Refused> {
    dmesg
        .lines()
        .filter(|l| {
            l.contains("critical nexus error, dev ")
                || l.contains("reservation conflict error, dev ")
        })
        .filter(|l| l.contains(" op 0x1:(WRITE) "))
        .filter_map(|l| {
            let field = |name: &str| -> Option<u64> {
                let rest = l.split_once(name)?.1;
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            match field(" phys_seg ")? {
                0 => Some(Refused::Flush),
                _ => Some(Refused::Block(field(", sector ")?)),
            }
        })
        .collect()
}

#[test]
fn refused_writes_are_read_from_the_kernel_log() {
    let dmesg = "[   22.7]  connection1:0: detected conn error (1020)\n\
        [   25.7] sd 0:0:0:1: reservation conflict\n\
        [   25.7] critical nexus error, dev sdb, sector 0 op 0x1:(WRITE) flags 0x800 phys_seg 0 prio class 2\n\
        [   26.1] sd 0:0:0:1: reservation conflict\n\
        [   26.1] sd 0:0:0:1: [sdb] tag#78 CDB: Write(10) 2a 08 00 00 04 96 00 00 01 00\n\
        [   26.1] critical nexus error, dev sdb, sector 1174 op 0x1:(WRITE) flags 0x28800 phys_seg 1 prio class 2\n\
        [   27.0] critical nexus error, dev sdb, sector 7 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2\n\
        [   28.0] reservation conflict error, dev sdc, sector 1037 op 0x1:(WRITE) flags 0x8800 phys_seg 1 prio class 2\n";
    assert_eq!(
        refused_writes(dmesg),
        vec![Refused::Flush, Refused::Block(1174), Refused::Block(1037)]
    );
}
