//! A simulated virtio-mmio (version 2) block device for host tests. It runs requests
//! synchronously when QueueNotify is written, reading the rings and buffers through the
//! addresses the driver gave it (host pointers into the leaked DMA arena stand in for
//! guest-physical addresses).

// Test-only simulation on a 64-bit host: sizes are small and come from the test itself.
#![allow(clippy::cast_possible_truncation)]

use super::blk::{F_BLK_SIZE, F_FLUSH, F_RO, F_SEG_MAX};
use super::{reg, MAGIC};
use crate::machine::testing::FakeMmio;
use std::any::Any;

/// Features the fake offers by default (besides RO): VERSION_1, FLUSH, BLK_SIZE, SEG_MAX and
/// two the driver must decline (EVENT_IDX, INDIRECT_DESC).
pub const OFFERED: u64 = super::F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_SEG_MAX | (1 << 29) | (1 << 28);

/// The fake device.
#[derive(Debug)]
pub struct FakeBlk {
    /// Disk contents (a multiple of 512 bytes).
    pub disk: Vec<u8>,
    /// Offered features.
    pub offered: u64,
    /// What the driver wrote to DriverFeatures (lo, hi).
    pub driver_features: u64,
    /// Status register.
    pub status: u32,
    /// Version register.
    pub version: u32,
    /// QueueNumMax.
    pub queue_max: u32,
    /// Never complete anything.
    pub silent: bool,
    /// After this many notifies the device sets DEVICE_NEEDS_RESET and answers nothing more.
    pub needs_reset_after: Option<u64>,
    /// Flip bit 0 of this disk byte in the data of every read covering it.
    pub corrupt_read_at: Option<usize>,
    /// Report used id + 1 (a descriptor that is not a chain head).
    pub bad_used_id: bool,
    /// Requests seen, by type: (in, out, flush, other).
    pub counts: (u64, u64, u64, u64),
    /// QueueNotify writes.
    pub notifies: u64,
    /// Largest number of requests found in the ring at one notify.
    pub max_batch: u64,
    features_sel: u32,
    driver_sel: u32,
    queue_num: u32,
    ready: u32,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

impl FakeBlk {
    /// A writable disk of `bytes` bytes, zero-filled.
    pub fn new(bytes: usize) -> Self {
        FakeBlk {
            disk: vec![0; bytes],
            offered: OFFERED,
            driver_features: 0,
            status: 0,
            version: 2,
            queue_max: 256,
            silent: false,
            needs_reset_after: None,
            corrupt_read_at: None,
            bad_used_id: false,
            counts: (0, 0, 0, 0),
            notifies: 0,
            max_batch: 0,
            features_sel: 0,
            driver_sel: 0,
            queue_num: 0,
            ready: 0,
            desc: 0,
            avail: 0,
            used: 0,
            last_avail: 0,
            used_idx: 0,
        }
    }

    /// A read-only disk.
    pub fn read_only(bytes: usize) -> Self {
        let mut d = Self::new(bytes);
        d.offered |= F_RO;
        d
    }

    fn config(&self, off: u64) -> u32 {
        let cap = (self.disk.len() / 512) as u64;
        match off {
            0 => (cap & 0xffff_ffff) as u32,
            4 => (cap >> 32) as u32,
            0x0c => 128,
            0x14 => 4096,
            _ => 0,
        }
    }

    fn set_addr(slot: &mut u64, high: bool, v: u32) {
        if high {
            *slot = (*slot & 0xffff_ffff) | (u64::from(v) << 32);
        } else {
            *slot = (*slot & !0xffff_ffff) | u64::from(v);
        }
    }

    /// Runs every request the driver made available.
    fn process(&mut self) {
        if self.silent || self.ready == 0 || self.queue_num == 0 {
            return;
        }
        let size = self.queue_num as u16;
        // SAFETY (all raw accesses below): the driver gave us addresses inside its leaked DMA
        // arena; the test process owns that memory and nothing else runs concurrently.
        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
        let avail_idx: u16 = unsafe { rd(self.avail + 2) };
        let mut batch = 0;
        while self.last_avail != avail_idx {
            let slot = u64::from(self.last_avail % size);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            let head: u16 = unsafe { rd(self.avail + 4 + 2 * slot) };
            self.last_avail = self.last_avail.wrapping_add(1);
            batch += 1;
            let written = self.run_chain(head, size);
            let id = u32::from(head) + u32::from(self.bad_used_id);
            let u = self.used + 4 + 8 * u64::from(self.used_idx % size);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe {
                wr(u, id);
                wr(u + 4, written);
            }
            self.used_idx = self.used_idx.wrapping_add(1);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe { wr(self.used + 2, self.used_idx) };
        }
        self.max_batch = self.max_batch.max(batch);
    }

    /// Runs one chain; returns the bytes written to device-writable buffers.
    fn run_chain(&mut self, head: u16, size: u16) -> u32 {
        let mut chain = Vec::new();
        let mut i = head;
        for _ in 0..size {
            let d = self.desc + 16 * u64::from(i % size);
            let (addr, len, flags, next): (u64, u32, u16, u16) =
                // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                unsafe { (rd(d), rd(d + 8), rd(d + 12), rd(d + 14)) };
            chain.push((addr, len, flags));
            if flags & 1 == 0 {
                break;
            }
            i = next;
        }
        let (hdr, data, status) = match chain.as_slice() {
            [h, d @ .., s] if h.1 == 16 && s.1 == 1 && s.2 & 2 != 0 => (*h, d.to_vec(), *s),
            _ => panic!("malformed chain {chain:?}"),
        };
        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
        let ty: u32 = unsafe { rd(hdr.0) };
        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
        let sector: u64 = unsafe { rd(hdr.0 + 8) };
        let mut pos = sector as usize * 512;
        let mut written = 1u32;
        let mut st = 0u8;
        match ty {
            0 => {
                self.counts.0 += 1;
                for (addr, len, flags) in data {
                    assert!(flags & 2 != 0, "read into a device-readable buffer");
                    let len = len as usize;
                    let Some(src) = self.disk.get(pos..pos + len) else {
                        st = 1;
                        break;
                    };
                    let mut bytes = src.to_vec();
                    if let Some(c) = self.corrupt_read_at {
                        if c >= pos && c < pos + len {
                            bytes[c - pos] ^= 1;
                        }
                    }
                    // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, len) };
                    written += len as u32;
                    pos += len;
                }
            }
            1 => {
                self.counts.1 += 1;
                if self.offered & F_RO != 0 {
                    st = 1;
                } else {
                    for (addr, len, flags) in data {
                        assert!(flags & 2 == 0, "write from a device-writable buffer");
                        let len = len as usize;
                        let Some(dst) = self.disk.get_mut(pos..pos + len) else {
                            st = 1;
                            break;
                        };
                        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), len) };
                        pos += len;
                    }
                }
            }
            4 => self.counts.2 += 1,
            _ => {
                self.counts.3 += 1;
                st = 2;
            }
        }
        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
        unsafe { wr(status.0, st) };
        written
    }
}

/// Reads a `T` at host address `a`.
///
/// # Safety
/// `a` must point to readable memory holding a `T`.
pub(crate) unsafe fn rd<T: Copy>(a: u64) -> T {
    // SAFETY: the caller's contract.
    unsafe { (a as *const T).read_unaligned() }
}

/// Writes a `T` at host address `a`.
///
/// # Safety
/// `a` must point to writable memory for a `T`.
pub(crate) unsafe fn wr<T: Copy>(a: u64, v: T) {
    // SAFETY: the caller's contract.
    unsafe { (a as *mut T).write_unaligned(v) }
}

impl FakeMmio for FakeBlk {
    fn read(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => self.version,
            reg::DEVICE_ID => 2,
            reg::VENDOR_ID => 0x554d_4551,
            reg::DEVICE_FEATURES => {
                if self.features_sel == 0 {
                    (self.offered & 0xffff_ffff) as u32
                } else if self.features_sel == 1 {
                    (self.offered >> 32) as u32
                } else {
                    0
                }
            }
            reg::QUEUE_NUM_MAX => self.queue_max,
            reg::QUEUE_READY => self.ready,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            o if o >= reg::CONFIG => self.config(o - reg::CONFIG),
            _ => 0,
        }
    }

    fn write(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_sel = value,
            reg::DRIVER_FEATURES => {
                let shift = if self.driver_sel == 1 { 32 } else { 0 };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
            }
            reg::QUEUE_NUM => self.queue_num = value,
            reg::QUEUE_READY => self.ready = value,
            reg::QUEUE_NOTIFY => {
                self.notifies += 1;
                if self.needs_reset_after.is_some_and(|n| self.notifies > n) {
                    self.status |= 0x40;
                    self.silent = true;
                }
                self.process();
            }
            reg::STATUS => {
                if value == 0 {
                    let disk = std::mem::take(&mut self.disk);
                    let keep = (self.offered, self.version, self.silent, self.corrupt_read_at);
                    let (counts, notifies, max_batch, bad) =
                        (self.counts, self.notifies, self.max_batch, self.bad_used_id);
                    // Kept for inspection; the driver rewrites it before FEATURES_OK.
                    let negotiated = self.driver_features;
                    let needs_reset_after = self.needs_reset_after;
                    *self = FakeBlk::new(0);
                    self.needs_reset_after = needs_reset_after;
                    self.disk = disk;
                    (self.offered, self.version, self.silent, self.corrupt_read_at) = keep;
                    (self.counts, self.notifies, self.max_batch, self.bad_used_id) = (counts, notifies, max_batch, bad);
                    self.driver_features = negotiated;
                } else {
                    // FEATURES_OK only sticks for a subset of what we offer.
                    let mut v = value;
                    if v & 8 != 0 && self.driver_features & !self.offered != 0 {
                        v &= !8;
                    }
                    self.status = v;
                }
            }
            reg::QUEUE_DESC_LOW => Self::set_addr(&mut self.desc, false, value),
            0x084 => Self::set_addr(&mut self.desc, true, value),
            reg::QUEUE_DRIVER_LOW => Self::set_addr(&mut self.avail, false, value),
            0x094 => Self::set_addr(&mut self.avail, true, value),
            reg::QUEUE_DEVICE_LOW => Self::set_addr(&mut self.used, false, value),
            0x0a4 => Self::set_addr(&mut self.used, true, value),
            _ => {}
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
