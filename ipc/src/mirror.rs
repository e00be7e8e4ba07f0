//! The read mirror: register values a service publishes so the core can answer a guest read
//! without a round trip.
//!
//! A device has registers whose read has no side effect and whose value the device knows at all
//! times (a UART's line-status register, polled before every byte a console writes). The service
//! publishes such `(address, size, value)` triples in a small table at the end of its ring region;
//! the core answers a read of exactly that address and size from the table, as the device itself
//! would have, and forwards everything else. The core never interprets the values: which
//! registers are mirrored, and what they hold, is the service's business.
//!
//! Layout (at [`MIRROR_OFFSET`](crate::ring) in the ring region, 64-byte aligned):
//!
//! | offset | content |
//! |---|---|
//! | 0 | sequence (`u64`): even = the table is valid, odd = being rewritten or invalidated |
//! | 8 | number of entries (`u32`, at most [`MIRROR_SLOTS`]) |
//! | 64 | [`MIRROR_SLOTS`] × entry: address `u64`, size `u32`, flags `u32`, value `[u8; 8]` |
//!
//! An entry with flags 0 is a register value. An entry with [`POSTED_WRITE`] carries no value:
//! it says that a write of exactly that address and size changes nothing but the device's own
//! registers (an interrupt acknowledge, a byte for a UART to send), so the core may *post* it:
//! queue it on the ring and let the vCPU go on without waiting for the completion. The ring
//! keeps requests in order and the core answers no read from the table while a request of its
//! own is outstanding, so every later access still sees the write's effect.
//!
//! Protocol (a sequence lock, one writer: the service's serving thread):
//! - A change the service makes outside a request may instead rewrite one value in place
//!   ([`Mirror::update`]): the table stays valid, so a read is still answered while the service
//!   is busy (inside a slow disk call) right after it raised an interrupt.
//! - The service publishes the table after handling every request and *before* completing it, so
//!   a read the core answers after a completion sees the effect of every write completed before.
//! - Anything that changes a mirrored value outside a request (input arriving, a timer) first
//!   invalidates the table (sequence made odd, then a `SeqCst` fence) and only then raises the
//!   interrupt that could make the guest read; the service republishes once it is done.
//! - The core copies the sequence, the count and the entries, fences, and re-reads the sequence:
//!   if it was odd or changed, it forwards the read instead (bounded: a few tries, then forward).
//!   The core consults the mirror only with no request of its own in flight on this ring.
//! - Whatever a hostile service writes, the core reads a bounded table and at worst returns a value
//!   for the service's own registers, which the service could have returned anyway. A new service
//!   instance gets a new ring region, so a dead instance's values are never used.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::region::SharedRegion;

/// Entries in the table.
pub const MIRROR_SLOTS: usize = 16;
/// Bytes the table takes in the region.
pub const MIRROR_BYTES: usize = 64 + MIRROR_SLOTS * ENTRY_BYTES;

const ENTRY_BYTES: usize = 24;
const OFF_SEQ: usize = 0;
const OFF_COUNT: usize = 8;
const OFF_ENTRIES: usize = 64;
/// Reads of a changing table before the core gives up and forwards.
const READ_TRIES: usize = 3;

/// One mirrored register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct MirrorEntry {
    /// Absolute guest port or physical address.
    pub addr: u64,
    /// Access size: 1, 2, 4 or 8.
    pub len: u32,
    /// 0 for a register value, or [`POSTED_WRITE`].
    pub flags: u32,
    /// The value a read returns (first `len` bytes).
    pub data: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<MirrorEntry>() == ENTRY_BYTES);

/// [`MirrorEntry::flags`]: writes of this address and size may be posted (the entry has no value).
pub const POSTED_WRITE: u32 = 1;

impl MirrorEntry {
    /// A `data.len()`-byte register at `addr` (1, 2, 4 or 8 bytes; longer data is cut to 8).
    pub fn new(addr: u64, data: &[u8]) -> Self {
        let mut d = [0u8; 8];
        let n = data.len().min(8);
        d[..n].copy_from_slice(&data[..n]);
        Self { addr, len: u32::try_from(n).unwrap_or(8), flags: 0, data: d }
    }

    /// Declares that `len`-byte writes at `addr` may be posted ([`POSTED_WRITE`]).
    pub fn posted_write(addr: u64, len: u32) -> Self {
        Self { addr, len, flags: POSTED_WRITE, data: [0; 8] }
    }
}

/// A view of the table in a ring region.
#[derive(Debug, Clone)]
pub struct Mirror {
    region: Arc<SharedRegion>,
    off: usize,
    /// Added to the address given to [`update`](Self::update) (see [`based`](Self::based)).
    base: u64,
}

impl Mirror {
    /// The table at `off` in `region`; `None` if it does not fit or `off` is not 64-byte aligned.
    pub(crate) fn new(region: Arc<SharedRegion>, off: usize) -> Option<Self> {
        let end = off.checked_add(MIRROR_BYTES)?;
        (off.is_multiple_of(64) && end <= region.len()).then_some(Self { region, off, base: 0 })
    }

    /// A table in a region of its own (for a device tested without a ring).
    ///
    /// # Errors
    /// Creating or mapping the memfd failed.
    pub fn standalone(name: &str) -> Result<Self, crate::region::RegionError> {
        let region = Arc::new(SharedRegion::create(name, MIRROR_BYTES.div_ceil(4096) * 4096)?);
        Ok(Self { region, off: 0, base: 0 })
    }

    /// This table, for a device that names its registers by offset into a window at `base`:
    /// [`update`](Self::update) adds `base` to the address it is given.
    #[must_use]
    pub fn based(&self, base: u64) -> Self {
        Self { base, ..self.clone() }
    }

    fn seq(&self) -> &AtomicU64 {
        // SAFETY: `off` is 64-aligned and the table lies inside the mapping (checked in `new`);
        // the mapping lives as long as `self.region`; both sides only touch it atomically.
        unsafe { &*self.region.as_ptr().add(self.off + OFF_SEQ).cast::<AtomicU64>() }
    }

    fn count(&self) -> &AtomicU32 {
        // SAFETY: as in `seq`, 4-aligned.
        unsafe { &*self.region.as_ptr().add(self.off + OFF_COUNT).cast::<AtomicU32>() }
    }

    fn entry_ptr(&self, i: usize) -> *mut MirrorEntry {
        debug_assert!(i < MIRROR_SLOTS);
        // SAFETY: i < MIRROR_SLOTS, so the entry lies inside the table, which lies inside the
        // mapping; entries are 8-aligned (the table is 64-aligned, entries 24 bytes).
        unsafe { self.region.as_ptr().add(self.off + OFF_ENTRIES + i * ENTRY_BYTES).cast() }
    }

    /// Core side: the published value of a `len`-byte read at `addr`, if the table is valid and
    /// holds exactly that register.
    pub fn lookup(&self, addr: u64, len: u32) -> Option<[u8; 8]> {
        self.find(addr, len, 0).flatten()
    }

    /// Core side: whether the table is valid and says that a `len`-byte write at `addr` may be
    /// posted ([`POSTED_WRITE`]).
    pub fn posts_write(&self, addr: u64, len: u32) -> bool {
        matches!(self.find(addr, len, POSTED_WRITE), Some(Some(_)))
    }

    /// A consistent read of the entry for `(addr, len, flags)`: `None` if the table was not
    /// stable (invalid, or rewritten during every try), `Some(None)` if it holds no such entry.
    fn find(&self, addr: u64, len: u32, flags: u32) -> Option<Option<[u8; 8]>> {
        for _ in 0..READ_TRIES {
            let s1 = self.seq().load(Ordering::Acquire);
            if s1 & 1 == 1 {
                return None;
            }
            let n = usize::try_from(self.count().load(Ordering::Relaxed)).unwrap_or(usize::MAX).min(MIRROR_SLOTS);
            let mut found = None;
            for i in 0..n {
                // SAFETY: inside the table (i < MIRROR_SLOTS); a volatile copy, validated by the
                // sequence check below before it is used.
                let e = unsafe { self.entry_ptr(i).read_volatile() };
                if e.addr == addr && e.len == len && e.flags == flags {
                    found = Some(e.data);
                    break;
                }
            }
            fence(Ordering::Acquire);
            if self.seq().load(Ordering::Relaxed) == s1 {
                return Some(found);
            }
        }
        None
    }

    /// Service side: replaces the table with `entries` (at most [`MIRROR_SLOTS`]; more are
    /// ignored) and marks it valid.
    pub fn publish(&self, entries: &[MirrorEntry]) {
        let seq = self.seq();
        let odd = seq.load(Ordering::Relaxed) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        let n = entries.len().min(MIRROR_SLOTS);
        for (i, e) in entries.iter().take(n).enumerate() {
            // SAFETY: i < MIRROR_SLOTS, inside the table; readers detect the concurrent write
            // through the odd sequence.
            unsafe { self.entry_ptr(i).write_volatile(*e) };
        }
        self.count().store(u32::try_from(n).unwrap_or(0), Ordering::Relaxed);
        seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Service side: rewrites the value of the register at `base + addr` (see
    /// [`based`](Self::based)) in place, `data.len()` bytes, keeping the table valid. Returns
    /// false, having invalidated the table, if it holds no such register; a table already
    /// invalid stays so (the next [`publish`](Self::publish) makes it valid).
    pub fn update(&self, addr: u64, data: &[u8]) -> bool {
        let addr = self.base.wrapping_add(addr);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let seq = self.seq();
        let s0 = seq.load(Ordering::Relaxed);
        let n = usize::try_from(self.count().load(Ordering::Relaxed)).unwrap_or(usize::MAX).min(MIRROR_SLOTS);
        // One writer (this thread): the entries do not change under us.
        let Some(i) = (0..n).find(|&i| {
            // SAFETY: inside the table (i < MIRROR_SLOTS), written only by this thread.
            let e = unsafe { self.entry_ptr(i).read_volatile() };
            e.addr == addr && e.len == len && e.flags == 0
        }) else {
            self.invalidate();
            return false;
        };
        let new = MirrorEntry::new(addr, data);
        if s0 & 1 == 1 {
            // SAFETY: as above; readers ignore an odd table.
            unsafe { self.entry_ptr(i).write_volatile(new) };
            return true;
        }
        seq.store(s0 | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        // SAFETY: as above; readers that overlap this write see the odd sequence, or a changed one.
        unsafe { self.entry_ptr(i).write_volatile(new) };
        seq.store(s0.wrapping_add(2), Ordering::Release);
        fence(Ordering::SeqCst);
        true
    }

    /// Service side: a number that changes whenever the table does (its sequence).
    pub fn generation(&self) -> u64 {
        self.seq().load(Ordering::Acquire)
    }

    /// Service side: marks the table invalid until the next [`publish`](Self::publish). Call
    /// before raising an interrupt that follows a change of a mirrored value.
    pub fn invalidate(&self) {
        self.seq().fetch_or(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Whether the table is currently valid.
    pub fn is_valid(&self) -> bool {
        self.seq().load(Ordering::Acquire) & 1 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror() -> (Mirror, Mirror) {
        let region = Arc::new(SharedRegion::create("mirror-test", 4096).expect("region"));
        let fd = region.fd().try_clone_to_owned().expect("dup");
        let other = Arc::new(SharedRegion::from_fd(fd, 4096).expect("map"));
        (Mirror::new(region, 512).expect("fits"), Mirror::new(other, 512).expect("fits"))
    }

    #[test]
    fn empty_table_answers_nothing() {
        let (core, _svc) = mirror();
        assert_eq!(core.lookup(0x3fd, 1), None);
    }

    #[test]
    fn published_values_answer_exact_address_and_size_only() {
        let (core, svc) = mirror();
        svc.publish(&[MirrorEntry::new(0x3fd, &[0x60]), MirrorEntry::new(0x1000, &7u32.to_le_bytes())]);
        assert_eq!(core.lookup(0x3fd, 1).map(|d| d[0]), Some(0x60));
        assert_eq!(core.lookup(0x1000, 4).map(|d| d[..4].to_vec()), Some(7u32.to_le_bytes().to_vec()));
        assert_eq!(core.lookup(0x3fd, 2), None, "other size");
        assert_eq!(core.lookup(0x3fc, 1), None, "other address");
        // A new table replaces the old one entirely.
        svc.publish(&[MirrorEntry::new(0x3fd, &[0x61])]);
        assert_eq!(core.lookup(0x3fd, 1).map(|d| d[0]), Some(0x61));
        assert_eq!(core.lookup(0x1000, 4), None);
    }

    #[test]
    fn invalidated_table_answers_nothing_until_republished() {
        let (core, svc) = mirror();
        svc.publish(&[MirrorEntry::new(0x3fd, &[0x60])]);
        svc.invalidate();
        assert!(!core.is_valid());
        assert_eq!(core.lookup(0x3fd, 1), None);
        svc.publish(&[MirrorEntry::new(0x3fd, &[0x61])]);
        assert_eq!(core.lookup(0x3fd, 1).map(|d| d[0]), Some(0x61));
    }

    #[test]
    fn posted_write_entries_are_no_read_values() {
        let (core, svc) = mirror();
        svc.publish(&[MirrorEntry::posted_write(0x1064, 4), MirrorEntry::new(0x1060, &1u32.to_le_bytes())]);
        assert!(core.posts_write(0x1064, 4));
        assert!(!core.posts_write(0x1064, 2), "other size");
        assert!(!core.posts_write(0x1060, 4), "a value entry allows no posting");
        assert_eq!(core.lookup(0x1064, 4), None, "a posting entry answers no read");
        svc.invalidate();
        assert!(!core.posts_write(0x1064, 4), "an invalid table allows no posting");
    }

    #[test]
    fn update_rewrites_one_value_and_keeps_the_table_valid() {
        let (core, svc) = mirror();
        svc.publish(&[MirrorEntry::new(0x1060, &0u32.to_le_bytes()), MirrorEntry::new(0x1070, &[7, 0, 0, 0])]);
        let g = svc.generation();
        let based = svc.based(0x1000);
        assert!(based.update(0x60, &1u32.to_le_bytes()));
        assert!(core.is_valid());
        assert_ne!(svc.generation(), g, "the generation moves");
        assert_eq!(core.lookup(0x1060, 4).map(|d| d[0]), Some(1));
        assert_eq!(core.lookup(0x1070, 4).map(|d| d[0]), Some(7), "the others stay");
        // A register the table does not hold: invalid until republished.
        assert!(!based.update(0x64, &1u32.to_le_bytes()));
        assert!(!core.is_valid());
        // An invalid table stays invalid across an update.
        assert!(based.update(0x60, &3u32.to_le_bytes()));
        assert!(!core.is_valid());
        assert_eq!(core.lookup(0x1060, 4), None);
    }

    #[test]
    fn more_entries_than_slots_are_cut() {
        let (core, svc) = mirror();
        let many: Vec<MirrorEntry> = (0..40u64).map(|a| MirrorEntry::new(a, &[1])).collect();
        svc.publish(&many);
        assert!(core.lookup(15, 1).is_some());
        assert_eq!(core.lookup(16, 1), None);
    }

    /// A hostile service writing garbage (huge count, odd sizes, a sequence stuck odd) makes the
    /// core forward, never read out of the table or loop.
    #[test]
    fn hostile_tables_are_bounded() {
        let (core, svc) = mirror();
        svc.count().store(u32::MAX, Ordering::SeqCst);
        assert_eq!(core.lookup(0x3fd, 1), None);
        svc.seq().store(3, Ordering::SeqCst);
        assert_eq!(core.lookup(0x3fd, 1), None);
    }

    /// Torn reads never escape: a writer republishing two entries that always agree, a reader
    /// checking that any value it gets is one of the published ones.
    #[test]
    fn concurrent_publish_never_yields_a_torn_value() {
        let (core, svc) = mirror();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut b: u8 = 0;
            while !s.load(Ordering::Relaxed) {
                b = b.wrapping_add(1);
                svc.publish(&[MirrorEntry::new(8, &[b; 8])]);
                // A short rest now and then, so that a reader on a busy machine also meets a
                // stable table (a writer that never rests may make every read retry and forward).
                if b == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
        });
        let mut hits = 0u64;
        let mut reads = 0u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reads < 200_000 || (hits == 0 && std::time::Instant::now() < deadline) {
            if let Some(d) = core.lookup(8, 8) {
                assert!(d.iter().all(|b| *b == d[0]), "torn value {d:?}");
                hits += 1;
            }
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        assert!(hits > 0);
    }
}
