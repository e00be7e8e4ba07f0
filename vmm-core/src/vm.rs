//! The KVM VM: capability checks, memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::memory::GuestRam;

/// Errors while creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host KVM lacks something the core needs.
    #[error("host KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("VM ioctl {what} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Capabilities the core relies on, by name.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "IRQCHIP"),
    (Cap::Pit2, "PIT2"),
    (Cap::Ioeventfd, "IOEVENTFD"),
    (Cap::Irqfd, "IRQFD"),
    (Cap::UserMemory, "USER_MEMORY"),
    (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
];

/// Opens KVM and checks the capabilities the core needs.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM with guest RAM mapped, an in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
pub fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    for (slot, (gpa, len, host)) in ram.slots().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::MissingCap("memory slots"))?,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: `host..host+len` is a live mapping of guest RAM owned by `ram`, which the caller
        // keeps alive for as long as the VM runs (it outlives every vCPU thread in `main`).
        unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok(vm)
}
