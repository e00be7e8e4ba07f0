//! What a vCPU is doing, read back from KVM for an operator or a test looking at a guest that
//! seems stuck (`GET /bulkhead/vcpus`): where it runs, whether it halted, the interrupt KVM is
//! injecting, and its local APIC's pending (IRR) and in-service (ISR) vectors. Read by the vCPU's
//! own thread between two `KVM_RUN`s (a vCPU fd's ioctls wait for its `KVM_RUN` to return), so
//! the guest stands still while it is read. Beside them, the in-kernel I/O APIC's pins, which the
//! devices' irqfds drive ([`ioapic`], read on the VM fd). Read-only: nothing is set.

use kvm_bindings::{kvm_irqchip, kvm_lapic_state, KVM_IRQCHIP_IOAPIC, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::Serialize;

/// The vCPUs and the I/O APIC that feeds them (`GET /bulkhead/vcpus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuReport {
    /// Each vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// The in-kernel I/O APIC.
    pub ioapic: Option<IoapicReport>,
    /// Why it could not be read.
    pub ioapic_error: Option<String>,
}

/// One vCPU's state ([`read`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuReport {
    /// The vCPU's index.
    pub index: usize,
    /// `running` or `paused` (by the VMM).
    pub state: &'static str,
    /// KVM exits handled so far.
    pub exits: u64,
    /// `runnable`, `halted` or KVM's number for another state.
    pub mp_state: Option<String>,
    /// Instruction pointer.
    pub rip: Option<u64>,
    /// Flags (bit 9: interrupts enabled).
    pub rflags: Option<u64>,
    /// The interrupt KVM is injecting (vector), if any.
    pub injecting: Option<u8>,
    /// Whether an STI or MOV SS shadow blocks interrupts for one instruction.
    pub interrupt_shadow: Option<bool>,
    /// The local APIC.
    pub lapic: Option<LapicReport>,
    /// What could not be read.
    pub errors: Vec<String>,
}

/// A local APIC's priority and vector registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LapicReport {
    /// Task priority.
    pub tpr: u32,
    /// Processor priority.
    pub ppr: u32,
    /// Vectors requested and not yet delivered (IRR).
    pub irr: Vec<u8>,
    /// Vectors delivered and not yet ended with an EOI (ISR).
    pub isr: Vec<u8>,
    /// Spurious-interrupt vector register (bit 8: the APIC is enabled).
    pub svr: u32,
    /// LVT timer register.
    pub lvt_timer: u32,
    /// Timer initial count.
    pub timer_initial: u32,
}

/// Reads vCPU `index`'s state; `exits` and `paused` come from its thread.
pub fn read(vcpu: &VcpuFd, index: usize, exits: u64, paused: bool) -> VcpuReport {
    let mut r = VcpuReport { index, state: if paused { "paused" } else { "running" }, exits, ..Default::default() };
    match vcpu.get_mp_state() {
        Ok(m) => {
            r.mp_state = Some(match m.mp_state {
                KVM_MP_STATE_RUNNABLE => "runnable".to_string(),
                KVM_MP_STATE_HALTED => "halted".to_string(),
                other => other.to_string(),
            });
        }
        Err(e) => r.errors.push(format!("KVM_GET_MP_STATE: {e}")),
    }
    match vcpu.get_regs() {
        Ok(regs) => {
            r.rip = Some(regs.rip);
            r.rflags = Some(regs.rflags);
        }
        Err(e) => r.errors.push(format!("KVM_GET_REGS: {e}")),
    }
    match vcpu.get_vcpu_events() {
        Ok(ev) => {
            r.injecting = (ev.interrupt.injected != 0).then_some(ev.interrupt.nr);
            r.interrupt_shadow = Some(ev.interrupt.shadow != 0);
        }
        Err(e) => r.errors.push(format!("KVM_GET_VCPU_EVENTS: {e}")),
    }
    match vcpu.get_lapic() {
        Ok(l) => r.lapic = Some(lapic(&l)),
        Err(e) => r.errors.push(format!("KVM_GET_LAPIC: {e}")),
    }
    r
}

/// The in-kernel I/O APIC: which pins are requested (`irr`), and each unmasked pin's routing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IoapicReport {
    /// Pins whose line is asserted (bit per pin).
    pub irr: u32,
    /// The pins the guest unmasked.
    pub pins: Vec<IoapicPin>,
    /// Pins the guest left masked (their routing is not shown).
    pub masked: Vec<u8>,
}

/// One unmasked I/O APIC pin (a redirection-table entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IoapicPin {
    /// The pin (the GSI, for pins 0-23).
    pub pin: u8,
    /// The vector it delivers.
    pub vector: u8,
    /// `edge` or `level`.
    pub trigger: &'static str,
    /// Level-triggered: delivered and waiting for the EOI.
    pub remote_irr: bool,
    /// The delivery is pending.
    pub delivery_pending: bool,
    /// Destination APIC id.
    pub dest: u8,
}

/// The in-kernel I/O APIC's state (`KVM_GET_IRQCHIP`).
pub fn ioapic(vm: &VmFd) -> Result<IoapicReport, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.get_irqchip(&mut chip)?;
    // SAFETY: `chip_id` is KVM_IRQCHIP_IOAPIC, so KVM filled the union's `ioapic` member; every
    // bit pattern is a valid `kvm_ioapic_state` (plain integers).
    let state = unsafe { chip.chip.ioapic };
    let mut r = IoapicReport { irr: state.irr, ..Default::default() };
    for (pin, entry) in (0u8..).zip(state.redirtbl.iter()) {
        // SAFETY: both union members are plain integers over the same 64 bits.
        let bits = unsafe { entry.bits };
        match redirection(pin, bits) {
            Some(p) => r.pins.push(p),
            None => r.masked.push(pin),
        }
    }
    Ok(r)
}

/// A redirection-table entry's fields (82093AA datasheet, 3.2.4); `None` if the pin is masked.
fn redirection(pin: u8, bits: u64) -> Option<IoapicPin> {
    let bit = |n: u32| bits & (1 << n) != 0;
    (!bit(16)).then(|| IoapicPin {
        pin,
        vector: bits.to_le_bytes()[0],
        trigger: if bit(15) { "level" } else { "edge" },
        remote_irr: bit(14),
        delivery_pending: bit(12),
        dest: bits.to_le_bytes()[7],
    })
}

// Register offsets in the local APIC's page (Intel SDM vol. 3, table 11-1).
const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_SVR: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TIMER_INITIAL: usize = 0x380;

/// The registers of a `KVM_GET_LAPIC` page.
fn lapic(l: &kvm_lapic_state) -> LapicReport {
    // The page as bytes (c_char is i8 on x86).
    let page: Vec<u8> = l.regs.iter().map(|&b| b.to_ne_bytes()[0]).collect();
    LapicReport {
        tpr: reg(&page, APIC_TPR),
        ppr: reg(&page, APIC_PPR),
        irr: vectors(&page, APIC_IRR),
        isr: vectors(&page, APIC_ISR),
        svr: reg(&page, APIC_SVR),
        lvt_timer: reg(&page, APIC_LVT_TIMER),
        timer_initial: reg(&page, APIC_TIMER_INITIAL),
    }
}

/// The 32-bit register at `offset` of an APIC page (0 past its end).
fn reg(page: &[u8], offset: usize) -> u32 {
    page.get(offset..offset + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
}

/// The vectors set in the 256-bit register that starts at `base`: eight 32-bit words, 16 bytes
/// apart, vector 0 in bit 0 of the first.
fn vectors(page: &[u8], base: usize) -> Vec<u8> {
    (0u8..=255).filter(|&v| reg(page, base + usize::from(v / 32) * 16) & (1 << (v % 32)) != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_read_from_the_eight_words_sixteen_bytes_apart() {
        let mut page = vec![0u8; 1024];
        // Vector 0x26 (word 1, bit 6) and 0xec (word 7, bit 12) in the IRR, 0x30 in the ISR.
        page[APIC_IRR + 16] = 1 << 6;
        page[APIC_IRR + 7 * 16 + 1] = 1 << 4;
        page[APIC_ISR + 16 + 2] = 1 << 0;
        page[APIC_TPR] = 0x20;
        assert_eq!(vectors(&page, APIC_IRR), vec![0x26, 0xec]);
        assert_eq!(vectors(&page, APIC_ISR), vec![0x30]);
        assert_eq!(reg(&page, APIC_TPR), 0x20);
        assert_eq!(reg(&page, 1022), 0, "a register past the page reads 0");
    }

    #[test]
    fn redirection_entries_decode_and_masked_pins_are_left_out() {
        assert_eq!(redirection(4, 1 << 16), None, "masked");
        let e = redirection(6, 0x0100_0000_0000_c036).expect("unmasked");
        assert_eq!((e.pin, e.vector, e.trigger, e.remote_irr, e.dest), (6, 0x36, "level", true, 1));
        let e = redirection(5, 0x35).expect("unmasked");
        assert_eq!((e.trigger, e.remote_irr, e.delivery_pending), ("edge", false, false));
    }
}
