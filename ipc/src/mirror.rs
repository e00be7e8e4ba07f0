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
//! | 64 | [`MIRROR_SLOTS`] × entry: address `u64`, size `u32`, pad `u32`, value `[u8; 8]` |
//!
//! Protocol (a sequence lock, one writer: the service's serving thread):
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
    /// Zero.
    pub pad: u32,
    /// The value a read returns (first `len` bytes).
    pub data: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<MirrorEntry>() == ENTRY_BYTES);

impl MirrorEntry {
    /// A `data.len()`-byte register at `addr` (1, 2, 4 or 8 bytes; longer data is cut to 8).
    pub fn new(addr: u64, data: &[u8]) -> Self {
        let mut d = [0u8; 8];
        let n = data.len().min(8);
        d[..n].copy_from_slice(&data[..n]);
        Self { addr, len: u32::try_from(n).unwrap_or(8), pad: 0, data: d }
    }
}

/// A view of the table in a ring region.
#[derive(Debug, Clone)]
pub struct Mirror {
    region: Arc<SharedRegion>,
    off: usize,
}

impl Mirror {
    /// The table at `off` in `region`; `None` if it does not fit or `off` is not 64-byte aligned.
    pub(crate) fn new(region: Arc<SharedRegion>, off: usize) -> Option<Self> {
        let end = off.checked_add(MIRROR_BYTES)?;
        (off.is_multiple_of(64) && end <= region.len()).then_some(Self { region, off })
    }

    /// A table in a region of its own (for a device tested without a ring).
    ///
    /// # Errors
    /// Creating or mapping the memfd failed.
    pub fn standalone(name: &str) -> Result<Self, crate::region::RegionError> {
        let region = Arc::new(SharedRegion::create(name, MIRROR_BYTES.div_ceil(4096) * 4096)?);
        Ok(Self { region, off: 0 })
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
                if e.addr == addr && e.len == len {
                    found = Some(e.data);
                    break;
                }
            }
            fence(Ordering::Acquire);
            if self.seq().load(Ordering::Relaxed) == s1 {
                return found;
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
