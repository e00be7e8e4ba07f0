//! Boot-time vCPU state for entering a guest: in 32-bit protected mode with paging off (PVH), or
//! directly in 64-bit long mode (the Linux 64-bit boot protocol): GDT, identity page tables,
//! control registers, general registers, FPU, MSRs, LAPIC LINT pins and CPUID.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::boot::BootProtocol;

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Writing a boot table into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// Which table.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("vCPU ioctl {what} failed")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM did not accept all boot MSRs.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// MSRs KVM accepted.
        set: usize,
        /// MSRs we asked for.
        wanted: usize,
    },
    /// Building a FAM wrapper failed.
    #[error("cannot build the MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Ioctl { what, source }
}

// Control-register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

// Local APIC register offsets and delivery modes (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Packs a GDT descriptor from `flags` (access byte plus the flags nibble at bits 12..16), base
/// and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment a GDT descriptor at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| u8::from((entry >> n) & 1 == 1);
    let base = ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff);
    let mut limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    if bit(55) == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = bit(47);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present,
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT for long mode: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// The boot GDT for PVH: null, flat 32-bit code, flat data, a 32-bit TSS of 0x68 bytes (what the
/// PVH ABI asks for).
pub const PVH_GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)];

/// The GDT `protocol` enters with.
pub fn boot_gdt(protocol: BootProtocol) -> &'static [u64; 4] {
    match protocol {
        BootProtocol::Pvh => &PVH_GDT,
        BootProtocol::Linux64 => &BOOT_GDT,
    }
}

/// Writes the boot GDT for `protocol`, an empty IDT and, for long mode, identity page tables
/// for the first 1 GiB (2 MiB pages). A PVH guest builds its own.
pub fn write_boot_tables<M: GuestMemory>(mem: &M, protocol: BootProtocol) -> Result<(), CpuError> {
    let w =
        |what, r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|source| CpuError::GuestWrite { what, source });
    for (i, e) in boot_gdt(protocol).iter().enumerate() {
        w("GDT", mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64)))?;
    }
    w("IDT", mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)))?;
    if protocol == BootProtocol::Pvh {
        return Ok(());
    }
    w("PML4", mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)))?;
    w("PDPT", mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w("PD", mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8)))?;
    }
    Ok(())
}

/// Points GDTR and IDTR at the boot tables (the GDT being `gdt`: null, code, data, TSS) and loads
/// CS, the data segments and TR from it.
fn load_boot_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
}

/// Special registers for long mode with the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    load_boot_segments(&mut sregs, &BOOT_GDT);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for PVH: 32-bit protected mode on the PVH GDT, paging off, no PAE, no
/// long mode.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    load_boot_segments(&mut sregs, &PVH_GDT);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers at the entry point: for the 64-bit protocol `rsi` points at the zero
/// page; for PVH `rbx` points at the start info.
pub fn boot_regs(entry: u64, protocol: BootProtocol) -> kvm_regs {
    match protocol {
        BootProtocol::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs { rflags: 0x2, rip: entry, rbx: PVH_INFO_START, ..Default::default() },
    }
}

/// The MSR values a freshly reset x86 CPU entering Linux should have.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *b as i8;
    }
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a PC BIOS leaves them.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
}

/// Adjusts the host-supported CPUID for vCPU `index` of `count`: APIC IDs, logical CPU count,
/// the hypervisor bit.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= 1 << 31; // hypervisor present
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: several logical processors
                }
            }
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
}

/// Puts vCPU `index` (of `count`) at `entry` in the mode `protocol` enters with, everything
/// above set.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mut cpuid: CpuId,
    index: u8,
    count: u8,
    entry: u64,
    protocol: BootProtocol,
) -> Result<(), CpuError> {
    filter_cpuid(&mut cpuid, index, count);
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(CpuError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs { set, wanted: entries.len() });
    }
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let sregs = match protocol {
        BootProtocol::Pvh => pvh_sregs(sregs),
        BootProtocol::Linux64 => long_mode_sregs(sregs),
    };
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry, protocol)).map_err(ioctl("KVM_SET_REGS"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((code.l, code.db, code.present, code.s, code.type_, code.selector), (1, 0, 1, 1, 0xb, 8));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn pvh_enters_flat_32_bit_protected_mode_without_paging() {
        let s = pvh_sregs(long_mode_sregs(kvm_sregs::default()));
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_, s.cs.base, s.cs.limit), (0, 1, 0xb, 0, 0xffff_ffff));
        assert_eq!((s.ds.db, s.ds.type_, s.ds.limit), (1, 3, 0xffff_ffff));
        assert_eq!((s.tr.type_, s.tr.limit, s.tr.present), (0xb, 0x67, 1));
        let r = boot_regs(0x1234, BootProtocol::Pvh);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x1234, PVH_INFO_START, 2));
        let r = boot_regs(0x20_0000, BootProtocol::Linux64);
        assert_eq!((r.rip, r.rsi), (0x20_0000, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_writes_no_page_tables() {
        use vm_memory::GuestMemoryMmap;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_boot_tables(&mem, BootProtocol::Pvh).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, 0);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).expect("read");
        assert_eq!(code, PVH_GDT[1]);
        write_boot_tables(&mem, BootProtocol::Linux64).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("read");
        assert_eq!(pml4, PDPTE_START | 3);
    }

    #[test]
    fn lint_pins() {
        let mut lapic = kvm_lapic_state::default();
        set_lint(&mut lapic);
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
