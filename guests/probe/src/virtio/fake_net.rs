//! A simulated virtio-mmio (version 2) network device for host tests: queue 0 RX, queue 1 TX.
//! Frames the driver transmits are recorded and, in reflect mode, sent back (destination =
//! their source, source = [`PEER_MAC`]) into the RX ring, synchronously at each notify (host
//! pointers into the leaked DMA arena stand in for guest-physical addresses). Knobs drop,
//! corrupt or duplicate chosen frames, inject frames, or misbehave.

// Test-only simulation on a 64-bit host: sizes are small and come from the test itself.
#![allow(clippy::cast_possible_truncation)]

use super::fake::{rd, wr};
use super::net::{F_MAC, F_MRG_RXBUF, F_STATUS, HDR_LEN};
use super::{reg, MAGIC};
use crate::machine::testing::FakeMmio;
use std::any::Any;
use std::collections::VecDeque;

/// The fake's MAC.
pub const FAKE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The source MAC of reflected frames.
pub const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// Offered by default: VERSION_1, MAC, STATUS and two the driver must decline (MRG_RXBUF,
/// CSUM).
pub const OFFERED: u64 = super::F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF | 1;

/// Per-queue registers and ring positions.
#[derive(Debug, Default, Clone, Copy)]
struct Q {
    num: u32,
    ready: u32,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

/// The fake device.
#[derive(Debug)]
pub struct FakeNet {
    /// Offered features.
    pub offered: u64,
    /// What the driver wrote to DriverFeatures.
    pub driver_features: u64,
    /// Status register.
    pub status: u32,
    /// Link status config field.
    pub link: u16,
    /// Send transmitted frames back.
    pub reflect: bool,
    /// Drop the reflection of transmitted frames whose index (from 0) is in this list.
    pub drop: Vec<u64>,
    /// Flip a payload byte in the reflection of these frames.
    pub corrupt: Vec<u64>,
    /// Reflect these frames twice.
    pub dup: Vec<u64>,
    /// Keep VIRTQ_USED_F_NO_NOTIFY set in the RX used ring (the fake fills RX at every TX
    /// notify anyway, as QEMU does when it has buffers).
    pub rx_no_notify: bool,
    /// Never complete TX.
    pub silent_tx: bool,
    /// Report RX used ids + 1000 (not a posted descriptor).
    pub bad_rx_id: bool,
    /// Frames waiting for RX buffers (tests may preload them).
    pub backlog: VecDeque<Vec<u8>>,
    /// Every transmitted frame (without the virtio header).
    pub sent: Vec<Vec<u8>>,
    /// TX headers that were not all-zero.
    pub bad_tx_hdr: u64,
    /// Frames delivered into RX buffers.
    pub delivered: u64,
    /// Notifies per queue.
    pub notifies: [u64; 2],
    /// Largest number of TX frames found at one notify.
    pub max_tx_batch: u64,
    /// MMIO reads at config offsets (the fake machine turns 8- and 16-bit reads into one
    /// 32-bit read each).
    pub config_reads: u64,
    queues: [Q; 2],
    queue_sel: u32,
    features_sel: u32,
    driver_sel: u32,
}

impl Default for FakeNet {
    fn default() -> Self {
        FakeNet {
            offered: OFFERED,
            driver_features: 0,
            status: 0,
            link: 1,
            reflect: true,
            drop: Vec::new(),
            corrupt: Vec::new(),
            dup: Vec::new(),
            rx_no_notify: false,
            silent_tx: false,
            bad_rx_id: false,
            backlog: VecDeque::new(),
            sent: Vec::new(),
            bad_tx_hdr: 0,
            delivered: 0,
            notifies: [0; 2],
            max_tx_batch: 0,
            config_reads: 0,
            queues: [Q::default(); 2],
            queue_sel: 0,
            features_sel: 0,
            driver_sel: 0,
        }
    }
}

impl FakeNet {
    fn config(&self, off: u64) -> u32 {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&FAKE_MAC);
        c[6..8].copy_from_slice(&self.link.to_le_bytes());
        match off {
            0 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            4 => u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            _ => 0,
        }
    }

    fn q(&mut self) -> Option<&mut Q> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Takes every TX chain, records and (maybe) reflects it, completes it.
    fn process_tx(&mut self) {
        let q = self.queues[1];
        if q.ready == 0 || q.num == 0 || self.silent_tx {
            return;
        }
        let size = q.num as u16;
        // SAFETY: an address the driver gave us, inside its leaked DMA arena.
        let avail_idx: u16 = unsafe { rd(q.avail + 2) };
        let mut last = q.last_avail;
        let mut used_idx = q.used_idx;
        let mut batch = 0;
        while last != avail_idx {
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            let head: u16 = unsafe { rd(q.avail + 4 + 2 * u64::from(last % size)) };
            last = last.wrapping_add(1);
            batch += 1;
            let mut bytes = Vec::new();
            let mut i = head;
            for _ in 0..size {
                let d = q.desc + 16 * u64::from(i % size);
                // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                let (addr, len, flags, next): (u64, u32, u16, u16) =
                    unsafe { (rd(d), rd(d + 8), rd(d + 12), rd(d + 14)) };
                assert_eq!(flags & 2, 0, "TX buffer marked device-writable");
                // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) });
                if flags & 1 == 0 {
                    break;
                }
                i = next;
            }
            assert!(bytes.len() >= HDR_LEN, "TX chain shorter than the header");
            if bytes[..HDR_LEN].iter().any(|&b| b != 0) {
                self.bad_tx_hdr += 1;
            }
            let frame = bytes[HDR_LEN..].to_vec();
            let index = self.sent.len() as u64;
            self.sent.push(frame.clone());
            if self.reflect && !self.drop.contains(&index) {
                let mut r = frame;
                let src: [u8; 6] = r[6..12].try_into().expect("6 bytes");
                r[..6].copy_from_slice(&src);
                r[6..12].copy_from_slice(&PEER_MAC);
                if self.corrupt.contains(&index) {
                    let at = r.len() - 1;
                    r[at] ^= 0x40;
                }
                if self.dup.contains(&index) {
                    self.backlog.push_back(r.clone());
                }
                self.backlog.push_back(r);
            }
            let u = q.used + 4 + 8 * u64::from(used_idx % size);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe {
                wr(u, u32::from(head));
                wr(u + 4, 0u32);
            }
            used_idx = used_idx.wrapping_add(1);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe { wr(q.used + 2, used_idx) };
        }
        self.queues[1].last_avail = last;
        self.queues[1].used_idx = used_idx;
        self.max_tx_batch = self.max_tx_batch.max(batch);
    }

    /// Moves backlog frames into posted RX buffers.
    fn deliver(&mut self) {
        let q = self.queues[0];
        if q.ready == 0 || q.num == 0 {
            return;
        }
        let size = q.num as u16;
        let mut last = q.last_avail;
        let mut used_idx = q.used_idx;
        while !self.backlog.is_empty() {
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            let avail_idx: u16 = unsafe { rd(q.avail + 2) };
            if last == avail_idx {
                break;
            }
            let frame = self.backlog.pop_front().expect("non-empty");
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            let head: u16 = unsafe { rd(q.avail + 4 + 2 * u64::from(last % size)) };
            last = last.wrapping_add(1);
            let d = q.desc + 16 * u64::from(head % size);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            let (addr, len, flags): (u64, u32, u16) = unsafe { (rd(d), rd(d + 8), rd(d + 12)) };
            assert_ne!(flags & 2, 0, "RX buffer not device-writable");
            assert!(len as usize >= HDR_LEN + frame.len(), "RX buffer too small");
            let mut hdr = [0u8; HDR_LEN];
            hdr[10] = 1; // num_buffers
                         // SAFETY: an address the driver gave us, inside its leaked DMA arena; `len` checked.
            unsafe {
                std::ptr::copy_nonoverlapping(hdr.as_ptr(), addr as *mut u8, HDR_LEN);
                std::ptr::copy_nonoverlapping(frame.as_ptr(), (addr as *mut u8).add(HDR_LEN), frame.len());
            }
            let id = u32::from(head) + if self.bad_rx_id { 1000 } else { 0 };
            let u = q.used + 4 + 8 * u64::from(used_idx % size);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe {
                wr(u, id);
                wr(u + 4, (HDR_LEN + frame.len()) as u32);
            }
            used_idx = used_idx.wrapping_add(1);
            // SAFETY: an address the driver gave us, inside its leaked DMA arena.
            unsafe { wr(q.used + 2, used_idx) };
            self.delivered += 1;
        }
        self.queues[0].last_avail = last;
        self.queues[0].used_idx = used_idx;
    }

    fn set_addr(slot: &mut u64, high: bool, v: u32) {
        if high {
            *slot = (*slot & 0xffff_ffff) | (u64::from(v) << 32);
        } else {
            *slot = (*slot & !0xffff_ffff) | u64::from(v);
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.queues = [Q::default(); 2];
        self.queue_sel = 0;
    }
}

impl FakeMmio for FakeNet {
    fn read(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => 1,
            reg::VENDOR_ID => 0x554d_4551,
            reg::DEVICE_FEATURES => match self.features_sel {
                0 => (self.offered & 0xffff_ffff) as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if (self.queue_sel as usize) < self.queues.len() => 256,
            reg::QUEUE_READY => self.q().map_or(0, |q| q.ready),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            o if o >= reg::CONFIG => {
                self.config_reads += 1;
                self.config(o - reg::CONFIG)
            }
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
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.q() {
                    q.num = value;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.q() {
                    q.ready = value;
                }
            }
            reg::QUEUE_NOTIFY => {
                let rxq = self.queues[0];
                if self.rx_no_notify && rxq.ready != 0 {
                    // SAFETY: an address the driver gave us, inside its leaked DMA arena.
                    unsafe { wr(rxq.used, 1u16) };
                }
                if let Some(n) = self.notifies.get_mut(value as usize) {
                    *n += 1;
                }
                if value == 1 {
                    self.process_tx();
                }
                self.deliver();
            }
            reg::STATUS => {
                if value == 0 {
                    self.reset();
                } else {
                    let mut v = value;
                    if v & 8 != 0 && self.driver_features & !self.offered != 0 {
                        v &= !8;
                    }
                    self.status = v;
                }
            }
            o @ (0x080 | 0x084) => {
                if let Some(q) = self.q() {
                    Self::set_addr(&mut q.desc, o == 0x084, value);
                }
            }
            o @ (0x090 | 0x094) => {
                if let Some(q) = self.q() {
                    Self::set_addr(&mut q.avail, o == 0x094, value);
                }
            }
            o @ (0x0a0 | 0x0a4) => {
                if let Some(q) = self.q() {
                    Self::set_addr(&mut q.used, o == 0x0a4, value);
                }
            }
            _ => {}
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
