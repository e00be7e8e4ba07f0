//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs, the
//! IOAPIC and the ISA interrupt routing.
//!
//! The table is built as bytes (no unsafe casts): a floating pointer structure at
//! [`MPTABLE_START`](super::layout::MPTABLE_START), followed by the configuration table.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, MPTABLE_START};

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the space below the EBDA end.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

/// Largest vCPU count the table has room for.
pub const MAX_VCPUS: u8 = 32;

const MPC_SPEC: u8 = 4; // MP spec 1.4
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MPC_APIC_USABLE: u8 = 1;
const CPU_FAMILY_6: u32 = 0x600;
const FEATURE_FPU: u32 = 1 << 0;
const FEATURE_APIC: u32 = 1 << 9;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP floating pointer and configuration table for `cpus` vCPUs, as bytes to place at
/// `MPTABLE_START`.
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_FAMILY_6.to_le_bytes());
        entries.extend_from_slice(&(FEATURE_FPU | FEATURE_APIC).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming polarity/trigger), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[ENTRY_INTSRC, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = u32::try_from(MPTABLE_START + 16).map_err(|_| MptableError::TooManyCpus(cpus))?;
    let table_len = 44 + entries.len();
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).map_err(|_| MptableError::TooManyCpus(cpus))?.to_le_bytes());
    header.push(MPC_SPEC);
    header.push(0); // checksum, below
    header.extend_from_slice(b"BULKHEAD");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    if MPTABLE_START + out.len() as u64 > EBDA_START + 0x400 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(MptableError::GuestWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, MAX_VCPUS] {
            let t = build(cpus).expect("table");
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let len = usize::from(u16::from_le_bytes([t[16 + 4], t[16 + 5]]));
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0, "table checksum");
            let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
            assert_eq!(count, u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
