//! DMA memory and a split virtqueue in it (virtio 1.x, no event index, no indirect
//! descriptors). Ring fields are accessed with volatile loads and stores; the available index
//! is published after a release fence and the used index read before an acquire fence (both
//! plain compiler barriers on x86, whose stores and loads are each kept in order).

use core::sync::atomic::{fence, AtomicU16, Ordering};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Available-ring flag: the driver does not want interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not need notifications now (VIRTQ_USED_F_NO_NOTIFY).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue the probe sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Bytes of DMA memory a queue of [`MAX_QUEUE_SIZE`] uses: descriptors, available and used
/// ring, each on its own page.
pub const QUEUE_BYTES: usize = 3 * 4096;

/// A page-aligned arena whose addresses are guest-physical addresses (identity mapping).
/// Every accessor is bounds-checked: an out-of-range access reads 0 or is dropped.
#[derive(Debug)]
pub struct Dma {
    base: *mut u8,
    len: usize,
}

impl Dma {
    /// Wraps the arena from [`crate::Machine::take_dma`].
    pub fn new(mem: &'static mut [u8]) -> Self {
        Dma { base: mem.as_mut_ptr(), len: mem.len() }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest-physical address of byte `off`.
    pub fn phys(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    /// A pointer to `size_of::<T>()` bytes at `off`, if in bounds and aligned for `T`.
    fn at<T>(&self, off: usize) -> Option<*mut T> {
        let size = core::mem::size_of::<T>();
        let end = off.checked_add(size)?;
        if end > self.len || !(self.base as usize + off).is_multiple_of(core::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: `off + size <= len`, so the pointer stays inside the arena.
        Some(unsafe { self.base.add(off) }.cast())
    }

    /// Volatile store of `v` at `off` (dropped if out of bounds or misaligned).
    pub fn store<T: Copy>(&mut self, off: usize, v: T) {
        if let Some(p) = self.at::<T>(off) {
            // SAFETY: `at` checked bounds and alignment; the arena is ours (`&'static mut`).
            unsafe { p.write_volatile(v) };
        }
    }

    /// Volatile load at `off` (zero of `T`'s `Default` if out of bounds or misaligned).
    pub fn load<T: Copy + Default>(&self, off: usize) -> T {
        match self.at::<T>(off) {
            // SAFETY: `at` checked bounds and alignment; any bit pattern is a valid integer.
            Some(p) => unsafe { p.read_volatile() },
            None => T::default(),
        }
    }

    /// Stores `v` at `off` with an atomic exchange (`xchg`: a full barrier on x86, so later
    /// loads cannot pass it; a plain instruction KVM's emulator runs). Dropped if out of
    /// bounds or misaligned.
    pub fn store_u16_full_barrier(&mut self, off: usize, v: u16) {
        if let Some(p) = self.at::<u16>(off) {
            // SAFETY: `at` checked bounds and alignment (2, as `AtomicU16` needs); the arena is
            // ours and the device only accesses it as plain memory.
            let a = unsafe { AtomicU16::from_ptr(p) };
            a.swap(v, Ordering::SeqCst);
        }
    }

    /// Zeroes `[off, off + len)` (clipped to the arena).
    pub fn zero(&mut self, off: usize, len: usize) {
        if let Some(b) = self.bytes_mut(off, len) {
            b.fill(0);
        }
    }

    /// The bytes `[off, off + len)`, if in bounds. The caller must not hold them while a
    /// device may write there (the block driver only hands out buffers of idle slots).
    pub fn bytes_mut(&mut self, off: usize, len: usize) -> Option<&mut [u8]> {
        let end = off.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of the arena, which we own exclusively (`&'static mut`), and
        // `&mut self` prevents a second live slice.
        Some(unsafe { core::slice::from_raw_parts_mut(self.base.add(off), len) })
    }
}

/// A split virtqueue whose three parts live in a [`Dma`] arena.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    next_avail: u16,
    last_used: u16,
}

/// What the device put in the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the chain.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

impl SplitQueue {
    /// Lays out a queue of `size` entries (a power of two, at most [`MAX_QUEUE_SIZE`]) at
    /// arena offset `off` (page-aligned, [`QUEUE_BYTES`] long), zeroes it and asks for no
    /// interrupts. `None` if the size or the space is wrong.
    pub fn new(dma: &mut Dma, off: usize, size: u16) -> Option<Self> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() || !off.is_multiple_of(4096) {
            return None;
        }
        if off.checked_add(QUEUE_BYTES)? > dma.len() {
            return None;
        }
        dma.zero(off, QUEUE_BYTES);
        let q = SplitQueue { size, desc: off, avail: off + 4096, used: off + 8192, next_avail: 0, last_used: 0 };
        dma.store::<u16>(q.avail, AVAIL_F_NO_INTERRUPT);
        Some(q)
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self, dma: &Dma) -> (u64, u64, u64) {
        (dma.phys(self.desc), dma.phys(self.avail), dma.phys(self.used))
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, dma: &mut Dma, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        if i >= self.size {
            return;
        }
        let d = self.desc + 16 * usize::from(i);
        dma.store::<u64>(d, addr);
        dma.store::<u32>(d + 8, len);
        dma.store::<u16>(d + 12, flags);
        dma.store::<u16>(d + 14, next);
    }

    /// Reads descriptor `i` back as (addr, len, flags, next) (for tests and the fake device).
    pub fn desc(&self, dma: &Dma, i: u16) -> (u64, u32, u16, u16) {
        let d = self.desc + 16 * usize::from(i % self.size);
        (dma.load(d), dma.load(d + 8), dma.load(d + 12), dma.load(d + 14))
    }

    /// Puts chain head `head` in the next available-ring slot (not yet visible to the device).
    pub fn push(&mut self, dma: &mut Dma, head: u16) {
        let slot = usize::from(self.next_avail & (self.size - 1));
        dma.store::<u16>(self.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes every pushed head: release fence, then the available index.
    pub fn publish(&self, dma: &mut Dma) {
        fence(Ordering::Release);
        dma.store::<u16>(self.avail + 2, self.next_avail);
    }

    /// Publishes every pushed head with a full barrier, then reports whether the device asks
    /// to be notified (VIRTQ_USED_F_NO_NOTIFY clear). The barrier orders the index store
    /// before the flags load, so a device that re-enables notifications and then re-checks
    /// the available index cannot be missed.
    pub fn publish_and_check(&self, dma: &mut Dma) -> bool {
        dma.store_u16_full_barrier(self.avail + 2, self.next_avail);
        dma.load::<u16>(self.used) & USED_F_NO_NOTIFY == 0
    }

    /// Entries the device has used that we have not consumed (used.idx − last seen), read
    /// once, followed by an acquire fence so later ring and buffer reads see the device's data.
    pub fn used_pending(&self, dma: &Dma) -> u16 {
        let idx = dma.load::<u16>(self.used + 2);
        fence(Ordering::Acquire);
        idx.wrapping_sub(self.last_used)
    }

    /// Consumes the next used element. Call only after [`Self::used_pending`] returned > 0.
    pub fn pop_used(&mut self, dma: &Dma) -> UsedElem {
        let slot = usize::from(self.last_used & (self.size - 1));
        let e = self.used + 4 + 8 * slot;
        self.last_used = self.last_used.wrapping_add(1);
        UsedElem { id: dma.load(e), len: dma.load(e + 4) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::testing::leak_dma;

    #[test]
    fn dma_accessors_are_bounds_checked() {
        let mut d = Dma::new(leak_dma(4096));
        d.store::<u64>(4088, 0x1122_3344_5566_7788);
        assert_eq!(d.load::<u64>(4088), 0x1122_3344_5566_7788);
        d.store::<u64>(4090, 1); // out of bounds: dropped
        d.store::<u32>(2, 1); // misaligned: dropped
        assert_eq!(d.load::<u64>(4096), 0);
        assert_eq!(d.load::<u32>(0), 0);
        assert!(d.bytes_mut(4000, 97).is_none());
        assert_eq!(d.bytes_mut(4000, 96).map(|b| b.len()), Some(96));
        assert_eq!(d.phys(16), d.phys(0) + 16);
        assert_eq!(d.phys(0) % 4096, 0);
    }

    #[test]
    fn ring_layout_publish_and_used_wraparound() {
        let mut d = Dma::new(leak_dma(QUEUE_BYTES + 4096));
        assert!(SplitQueue::new(&mut d, 0, 3).is_none());
        assert!(SplitQueue::new(&mut d, 0, 512).is_none());
        assert!(SplitQueue::new(&mut d, 4096, 4).is_some());
        assert!(SplitQueue::new(&mut d, 8192, 4).is_none());
        let mut q = SplitQueue::new(&mut d, 0, 4).expect("queue");
        let (desc, avail, used) = q.addresses(&d);
        assert_eq!((avail - desc, used - desc), (4096, 8192));
        assert_eq!(d.load::<u16>(4096), AVAIL_F_NO_INTERRUPT);
        q.set_desc(&mut d, 1, 0xabc, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
        assert_eq!(q.desc(&d, 1), (0xabc, 512, 3, 2));
        // Six pushes on a 4-entry ring: slots wrap, idx counts on.
        for h in 0..6u16 {
            q.push(&mut d, h);
        }
        assert_eq!(d.load::<u16>(4096 + 2), 0, "not published yet");
        q.publish(&mut d);
        assert_eq!(d.load::<u16>(4096 + 2), 6);
        assert_eq!(d.load::<u16>(4096 + 4), 4);
        assert_eq!(d.load::<u16>(4096 + 4 + 2), 5);
        // The device reports two used elements.
        d.store::<u32>(8192 + 4, 7);
        d.store::<u32>(8192 + 8, 513);
        d.store::<u32>(8192 + 12, 9);
        d.store::<u16>(8192 + 2, 2);
        assert_eq!(q.used_pending(&d), 2);
        assert_eq!(q.pop_used(&d), UsedElem { id: 7, len: 513 });
        assert_eq!(q.pop_used(&d).id, 9);
        assert_eq!(q.used_pending(&d), 0);
    }

    #[test]
    fn publish_and_check_honours_no_notify() {
        let mut d = Dma::new(leak_dma(QUEUE_BYTES));
        let mut q = SplitQueue::new(&mut d, 0, 4).expect("queue");
        q.push(&mut d, 1);
        assert!(q.publish_and_check(&mut d), "flags clear: notify");
        assert_eq!(d.load::<u16>(4096 + 2), 1);
        d.store::<u16>(8192, USED_F_NO_NOTIFY);
        q.push(&mut d, 2);
        assert!(!q.publish_and_check(&mut d), "NO_NOTIFY: no notify");
        assert_eq!(d.load::<u16>(4096 + 2), 2, "published anyway");
    }
}
