//! What a process of a VM keeps resident for the VM's life, beyond what it uses: with hundreds
//! of VMs on a host, every KiB a process keeps alone counts once per process.
//!
//! - [`ZeroPages`]: a large buffer seldom filled, whose pages exist only where written.
//! - [`trim_main_stack`]: the pages of the main thread's stack that start-up touched (argument
//!   parsing, set-up messages, loading the guest) and the steady state does not reach, handed
//!   back once start-up is over.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A buffer of zeroes in an anonymous mapping of its own: the kernel gives it a page only when
/// the page is first written. For a buffer that must be large but is seldom filled (the net
/// service's overflow frame, 64 KiB): from the heap it would be resident for the service's life
/// (a zeroed allocation is written whole unless it comes from fresh heap pages).
pub struct ZeroPages(vm_memory::mmap::MmapRegion<()>);

impl ZeroPages {
    /// A mapping of `len` bytes (rounded up to whole pages by the kernel; `len` are usable).
    pub fn new(len: usize) -> std::io::Result<Self> {
        vm_memory::mmap::MmapRegion::new(len).map(Self).map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(e) => e,
            other => std::io::Error::other(other),
        })
    }
}

impl std::ops::Deref for ZeroPages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the region is a private anonymous mapping of `size()` bytes, readable and
        // writable, owned by `self` and unmapped only when it drops; nothing else aliases it.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.size()) }
    }
}

impl std::ops::DerefMut for ZeroPages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), self.0.size()) }
    }
}

impl std::fmt::Debug for ZeroPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroPages({} bytes)", self.0.size())
    }
}

const PAGE: usize = 4096;
/// How far below the main thread's stack top its stack may have grown for [`trim_main_stack`]
/// to look (the usual `RLIMIT_STACK`; start-up uses well under 1 MiB).
const MAX_STACK: usize = 8 << 20;
/// What is kept below the trimming frame: the frames of the calls it makes itself, with room.
const MARGIN: usize = 16 << 10;

/// An address near the top of the main thread's stack, noted by [`note_main_stack`].
static MAIN_STACK_TOP: AtomicUsize = AtomicUsize::new(0);

/// Notes where the main thread's stack is. Call it first in `main`, on the main thread.
#[inline(never)]
pub fn note_main_stack() {
    let here = 0u8;
    MAIN_STACK_TOP.store(std::hint::black_box(&here) as *const u8 as usize, Ordering::Relaxed);
}

/// Whether `[addr, addr + len)` is all mapped: `madvise(MADV_NORMAL)` fails with `ENOMEM`
/// otherwise, and changes nothing on a mapping that has the default advice (as a stack has).
fn mapped(addr: usize, len: usize) -> bool {
    // SAFETY: MADV_NORMAL only resets read-ahead advice; on the main stack, which never had
    // other advice, it changes nothing. No memory is read or written.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_NORMAL) == 0 }
}

/// How many whole pages right below `end` are mapped without a hole, up to `max`: bisects on the
/// count with `mapped(addr, len)` (a range is mapped if all of it is, so the answer is monotonic).
fn mapped_pages_below(end: usize, max: usize, mapped: impl Fn(usize, usize) -> bool) -> usize {
    let (mut ok, mut bad) = (0usize, max + 1);
    // At most log2(max) + 1 probes.
    while bad - ok > 1 {
        let mid = ok + (bad - ok) / 2;
        match end.checked_sub(mid * PAGE) {
            Some(low) if mapped(low, mid * PAGE) => ok = mid,
            _ => bad = mid,
        }
    }
    ok
}

/// Hands back to the kernel the pages of the main thread's stack more than [`MARGIN`] below
/// the caller's frame: start-up went deep once (argument parsing, the set-up, loading the
/// guest) and the loop that follows does not. A page is given a fresh zeroed one if the stack
/// grows there again. Returns the bytes released (0 when not on the main thread, see
/// [`note_main_stack`]).
///
/// Only the main thread's stack is a mapping of its own that the kernel keeps apart from any
/// other (`stack_guard_gap` below it): the extent is found by probing how far down from here
/// the memory is mapped without a hole, and only that range is released. A thread's stack is an
/// ordinary mapping that may have neighbours, so nothing is done there.
#[inline(never)]
pub fn trim_main_stack() -> usize {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let top = MAIN_STACK_TOP.load(Ordering::Relaxed);
    if top == 0 || here > top || top - here > MAX_STACK {
        return 0;
    }
    let Some(end) = (here & !(PAGE - 1)).checked_sub(MARGIN) else { return 0 };
    let ok = mapped_pages_below(end, (MAX_STACK - (top - here)) / PAGE, mapped);
    if ok == 0 {
        return 0;
    }
    let low = end - ok * PAGE;
    // SAFETY: `[low, end)` is mapped (just checked) and is the main stack below this frame by
    // more than MARGIN: no live frame is there (the stack grows down and only this thread uses
    // it; a signal handler would run below `here`, within the margin). MADV_DONTNEED on private
    // anonymous memory gives zeroed pages on the next touch, as fresh stack.
    if unsafe { libc::madvise(low as *mut libc::c_void, end - low, libc::MADV_DONTNEED) } == 0 {
        end - low
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_read_as_zeroes_and_keep_what_is_written() {
        let mut z = ZeroPages::new(65_551).expect("map");
        assert_eq!(z.len(), 65_551);
        assert!(z.iter().all(|b| *b == 0));
        z[65_550] = 7;
        z[0] = 1;
        assert_eq!((z[0], z[65_550], z[4096]), (1, 7, 0));
    }

    #[test]
    fn the_mapping_probe_tells_mapped_from_not() {
        let z = ZeroPages::new(4 * PAGE).expect("map");
        let base = z.as_ptr() as usize;
        assert!(mapped(base, 4 * PAGE));
        assert!(mapped(base + PAGE, PAGE));
        // The first page is never mapped (`vm.mmap_min_addr`).
        assert!(!mapped(0, PAGE));
        assert!(!mapped(0, 2 * PAGE));
    }

    #[test]
    fn the_extent_below_stops_at_the_first_hole() {
        // Mapped from 0x10_0000 up; a hole below it.
        let probe = |addr: usize, _len: usize| addr >= 0x10_0000;
        let end = 0x10_0000 + 11 * PAGE;
        assert_eq!(mapped_pages_below(end, 64, probe), 11);
        assert_eq!(mapped_pages_below(end, 7, probe), 7, "capped");
        assert_eq!(mapped_pages_below(end, 0, probe), 0);
        assert_eq!(mapped_pages_below(0x10_0000, 64, probe), 0, "nothing mapped right below");
        // Near address 0: no wrap-around.
        assert_eq!(mapped_pages_below(2 * PAGE, 64, |_, _| true), 2);
    }

    #[test]
    fn off_the_main_stack_nothing_is_trimmed() {
        // Nothing noted in this test process (`note_main_stack` is `main`'s), so a test thread
        // is never taken for the main thread.
        assert_eq!(MAIN_STACK_TOP.load(Ordering::Relaxed), 0);
        assert_eq!(trim_main_stack(), 0);
    }
}
