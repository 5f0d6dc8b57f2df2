//! The test guest as a real QEMU VM: the `../shared/vm-initiator` kernel with the
//! initramfs of fixtures/qemu-guest/build.sh, whose /init runs `holdfast guest run
//! --device /dev/vda` (O_DIRECT|O_DSYNC on the virtio disk, an iscsi:// LUN with
//! cache=none) and writes the ack lines to ttyS1. QEMU appends ttyS1 to the ack log, so
//! `holdfast guest check` judges this guest as it judges the process one. Used by
//! `holdfast demo --vm` and tests/cluster/agent_qemu.rs.

use crate::agent::config::{QemuVm, VmConfig};
use std::path::{Path, PathBuf};

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Where build-image.sh leaves the vm-initiator kernel: $VM_INITIATOR_DIR, else
/// ~/.cache/vm-initiator.
pub fn vm_initiator_dir() -> PathBuf {
    match std::env::var_os("VM_INITIATOR_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/vm-initiator")
        }
    }
}

/// The qemu driver's settings for the guest of one group, writing `ack_log`. `accel`
/// is QEMU's accelerator list ("kvm:tcg", "tcg").
pub fn qemu_guest_vm(img: &GuestImage, ack_log: &Path, accel: &str) -> VmConfig {
    let mut vm = QemuVm::new(Some(img.kernel.clone()));
    vm.machine = format!("q35,accel={accel}");
    vm.initrd = Some(img.initramfs.clone());
    vm.append = Some("console=ttyS0 loglevel=4 hf.epoch={epoch} hf.interval=20ms".into());
    vm.serial = vec![
        PathBuf::from("{state_dir}/{group}.console"),
        ack_log.to_path_buf(),
    ];
    VmConfig::Qemu(vm)
}
