//! The guest-physical memory map the core builds for an x86-64 guest.
//!
//! Low memory holds the boot structures at fixed addresses, in the same places Linux VMMs put
//! them, so the kernel and the probe guest find them where the boot protocol says.

/// GDT used while entering the guest in long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) while entering the guest.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PVH `hvm_start_info` (56 bytes): what `ebx` points at on a PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd: one 32-byte entry), after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (24-byte entries, at most three), after the module list, in the same page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux boot_params "zero page".
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PML4 of the identity map used to enter long mode.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages) of the identity map: covers the first 1 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (bytes, without the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the MP table area (in the last KiB below the EBDA, as on PCs).
pub const MPTABLE_START: u64 = 0x9fc00;
/// Start of the EBDA / legacy hole; RAM below this is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// First address of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (exclusive).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The TSS KVM needs on Intel hosts (three pages just below the IOAPIC window's end).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Number of GSIs routed through the IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
