//! The core's address map for virtio-mmio devices: each device gets a 4 KiB window above RAM's low
//! part (in the 32-bit MMIO gap) and its own GSI, and the guest learns about it from a
//! `virtio_mmio.device=` word on its command line. The core only hands out addresses; it never
//! interprets what is behind them.

use crate::arch::layout::{IOAPIC_PINS, MMIO_GAP_START};

/// Size of one device's window.
pub const WINDOW_LEN: u64 = 0x1000;
/// Offset of the virtio-mmio QueueNotify register in a window (wired to ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// First GSI handed to virtio devices (0–4 are the PIT, keyboard, cascade, COM2, COM1).
pub const FIRST_GSI: u32 = 5;
/// Where the first window goes.
pub const FIRST_WINDOW: u64 = MMIO_GAP_START + 0x1000_0000;

/// Errors from the allocator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioError {
    /// Every IOAPIC pin for devices is taken.
    #[error("too many virtio devices: only {} interrupt lines available", u32::from(IOAPIC_PINS) - FIRST_GSI)]
    OutOfGsis,
}

/// One device's place in the guest: window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base of the window.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// GSI (IOAPIC pin) of the device's interrupt.
    pub gsi: u32,
}

impl MmioSlot {
    /// The Linux command-line word that announces this device.
    pub fn cmdline_word(&self) -> String {
        format!("virtio_mmio.device={}K@{:#x}:{}", self.len / 1024, self.base, self.gsi)
    }

    /// Guest-physical address of the QueueNotify register.
    pub fn queue_notify_addr(&self) -> u64 {
        self.base + QUEUE_NOTIFY_OFFSET
    }
}

/// Hands out windows and GSIs in order.
#[derive(Debug)]
pub struct MmioAllocator {
    next_base: u64,
    next_gsi: u32,
}

impl Default for MmioAllocator {
    fn default() -> Self {
        Self { next_base: FIRST_WINDOW, next_gsi: FIRST_GSI }
    }
}

impl MmioAllocator {
    /// The next slot.
    pub fn allocate(&mut self) -> Result<MmioSlot, MmioError> {
        if self.next_gsi >= u32::from(IOAPIC_PINS) {
            return Err(MmioError::OutOfGsis);
        }
        let slot = MmioSlot { base: self.next_base, len: WINDOW_LEN, gsi: self.next_gsi };
        self.next_base += WINDOW_LEN;
        self.next_gsi += 1;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_and_announced() {
        let mut a = MmioAllocator::default();
        let s0 = a.allocate().expect("slot");
        let s1 = a.allocate().expect("slot");
        assert_eq!(s0.cmdline_word(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(s1.base, s0.base + WINDOW_LEN);
        assert_eq!(s1.gsi, 6);
        assert_eq!(s0.queue_notify_addr(), 0xd000_0050);
    }

    #[test]
    fn runs_out_of_gsis() {
        let mut a = MmioAllocator::default();
        for _ in FIRST_GSI..u32::from(IOAPIC_PINS) {
            a.allocate().expect("slot");
        }
        assert_eq!(a.allocate(), Err(MmioError::OutOfGsis));
    }
}
