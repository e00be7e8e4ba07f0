//! Guest RAM as a service sees it: the core's memfd mapped with vm-memory.
//!
//! The core passes its guest-memory memfd and the list of `(guest address, length, memfd offset)`
//! ranges. Each range is checked against the memfd's size before mapping: touching a mapping past
//! the end of its file would raise `SIGBUS`, so a range the file does not back is refused.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use ipc::control::MemoryRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Slices, iovecs and guards of one request or frame, held inline: a frame or a block request
/// is one to a few descriptors, and a heap allocation per list per request showed in the I/O
/// paths' profiles (longer lists spill to the heap).
pub type Inline<T> = smallvec::SmallVec<[T; 4]>;

/// Guest memory as mapped by a service.
pub type GuestMem = GuestMemoryMmap<()>;

/// Most guest-memory ranges accepted.
pub const MAX_REGIONS: usize = 16;

/// Errors mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No range, or more than [`MAX_REGIONS`].
    #[error("{0} guest memory ranges (1..={MAX_REGIONS} allowed)")]
    RegionCount(usize),
    /// A range is empty, overflows or is not backed by the memfd.
    #[error("guest memory range {index} ({guest:#x}+{len:#x} at memfd offset {offset:#x}) invalid for a memfd of {file_len:#x} bytes")]
    BadRegion {
        /// Index in the list.
        index: usize,
        /// Guest address.
        guest: u64,
        /// Length.
        len: u64,
        /// Offset in the memfd.
        offset: u64,
        /// Size of the memfd.
        file_len: u64,
    },
    /// `fstat` or `dup` of the memfd failed.
    #[error("guest memory fd")]
    Fd(#[source] std::io::Error),
    /// vm-memory refused the ranges (overlap) or mmap failed.
    #[error("mapping guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Maps `regions` of the memfd `fd` as guest memory.
pub fn map_guest_memory(fd: OwnedFd, regions: &[MemoryRegion]) -> Result<GuestMem, MemoryError> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(MemoryError::RegionCount(regions.len()));
    }
    let file = File::from(fd);
    let file_len = file.metadata().map_err(MemoryError::Fd)?.len();
    let mut ranges = Vec::with_capacity(regions.len());
    for (index, r) in regions.iter().enumerate() {
        let bad = || MemoryError::BadRegion { index, guest: r.guest_addr, len: r.len, offset: r.file_offset, file_len };
        let file_end = r.file_offset.checked_add(r.len).ok_or_else(bad)?;
        if r.len == 0 || file_end > file_len || r.guest_addr.checked_add(r.len).is_none() {
            return Err(bad());
        }
        let len = usize::try_from(r.len).map_err(|_| bad())?;
        let dup = file.try_clone().map_err(MemoryError::Fd)?;
        ranges.push((GuestAddress(r.guest_addr), len, Some(FileOffset::new(dup, r.file_offset))));
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)
}

/// A part of a range that is not guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len:#x} bytes at guest address {addr:#x} are not all guest memory")]
pub struct OutsideMemory {
    /// Guest address of the range.
    pub addr: u64,
    /// Its length.
    pub len: usize,
}

/// Appends to `out` the host slices that together cover `len` bytes at `addr`: one slice when
/// the range lies inside one region (every descriptor of a guest with one RAM region, found
/// without vm-memory's slice iterator, which the I/O paths' profiles showed at ~12% of a
/// service's CPU), one per region otherwise. Nothing for `len == 0`.
///
/// # Errors
/// Part of the range is not guest memory (`out` may then hold some of its slices).
pub fn push_slices<'m>(
    mem: &'m GuestMem,
    addr: GuestAddress,
    len: usize,
    perm: vm_memory::Permissions,
    out: &mut impl Extend<vm_memory::VolatileSlice<'m, ()>>,
) -> Result<(), OutsideMemory> {
    use vm_memory::GuestMemory;
    let outside = OutsideMemory { addr: addr.0, len };
    if len == 0 {
        return Ok(());
    }
    if let Ok(one) = GuestMemoryBackend::get_slice(mem, addr, len) {
        out.extend(Some(one));
        return Ok(());
    }
    let mut got = 0usize;
    for sl in GuestMemory::get_slices(mem, addr, len, perm).map_err(|_| outside)? {
        let sl = sl.map_err(|_| outside)?;
        got += sl.len();
        out.extend(Some(sl));
    }
    if got == len {
        Ok(())
    } else {
        Err(outside)
    }
}

/// The fds the mapping holds (one per region); a jail must keep them open.
pub fn memory_fds(mem: &GuestMem) -> Vec<RawFd> {
    mem.iter().filter_map(|r| r.file_offset().map(|f| f.file().as_raw_fd())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use vm_memory::Bytes;

    fn memfd(len: u64) -> OwnedFd {
        let fd = memfd_create(c"test-ram", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&fd, i64::try_from(len).expect("len")).expect("truncate");
        fd
    }

    #[test]
    fn maps_shared_ranges() {
        let fd = memfd(0x3000);
        let probe = fd.try_clone().expect("dup");
        let regions = [
            MemoryRegion { guest_addr: 0, len: 0x1000, file_offset: 0 },
            MemoryRegion { guest_addr: 0x10_0000, len: 0x2000, file_offset: 0x1000 },
        ];
        let mem = map_guest_memory(fd, &regions).expect("map");
        mem.write_obj(0xabu8, GuestAddress(0x10_0001)).expect("write");
        let mut b = [0u8; 1];
        nix::sys::uio::pread(&probe, &mut b, 0x1001).expect("pread");
        assert_eq!(b[0], 0xab, "the mapping is the memfd's pages");
        assert_eq!(memory_fds(&mem).len(), 2);
    }

    #[test]
    fn slices_cover_ranges_within_and_across_regions_and_refuse_gaps() {
        let regions = [
            MemoryRegion { guest_addr: 0, len: 0x1000, file_offset: 0 },
            MemoryRegion { guest_addr: 0x1000, len: 0x1000, file_offset: 0x1000 },
            MemoryRegion { guest_addr: 0x10_0000, len: 0x1000, file_offset: 0x2000 },
        ];
        let mem = map_guest_memory(memfd(0x3000), &regions).expect("map");
        let perm = vm_memory::Permissions::Read;
        let lens = |v: &Vec<vm_memory::VolatileSlice<'_, ()>>| v.iter().map(|s| s.len()).collect::<Vec<_>>();
        let mut out = Vec::new();
        push_slices(&mem, GuestAddress(0x100), 0x200, perm, &mut out).expect("within one region");
        assert_eq!(lens(&out), [0x200]);
        // Two adjacent regions: two slices, appended after what `out` held.
        push_slices(&mem, GuestAddress(0xf00), 0x200, perm, &mut out).expect("across two regions");
        assert_eq!(lens(&out), [0x200, 0x100, 0x100]);
        let mut out = Vec::new();
        push_slices(&mem, GuestAddress(0x10), 0, perm, &mut out).expect("empty");
        assert!(out.is_empty());
        // Past the second region lies a gap: refused, however the range starts.
        let gap = push_slices(&mem, GuestAddress(0x1f00), 0x200, perm, &mut Vec::new());
        assert_eq!(gap, Err(OutsideMemory { addr: 0x1f00, len: 0x200 }));
        assert!(push_slices(&mem, GuestAddress(0x5000), 1, perm, &mut Vec::new()).is_err());
        assert!(push_slices(&mem, GuestAddress(0x10_0f00), 0x200, perm, &mut Vec::new()).is_err());
    }

    #[test]
    fn rejects_ranges_the_file_does_not_back() {
        let r = |g, l, o| MemoryRegion { guest_addr: g, len: l, file_offset: o };
        assert!(matches!(map_guest_memory(memfd(0x1000), &[]), Err(MemoryError::RegionCount(0))));
        assert!(matches!(map_guest_memory(memfd(0x1000), &[r(0, 0x2000, 0)]), Err(MemoryError::BadRegion { .. })));
        assert!(matches!(map_guest_memory(memfd(0x1000), &[r(0, 0x1000, 1)]), Err(MemoryError::BadRegion { .. })));
        assert!(matches!(map_guest_memory(memfd(0x1000), &[r(0, 0, 0)]), Err(MemoryError::BadRegion { .. })));
        assert!(matches!(
            map_guest_memory(memfd(0x1000), &[r(u64::MAX - 10, 0x1000, 0)]),
            Err(MemoryError::BadRegion { .. })
        ));
        assert!(matches!(
            map_guest_memory(memfd(0x2000), &[r(0, 0x1000, 0), r(0x800, 0x1000, 0x1000)]),
            Err(MemoryError::Map(_))
        ));
    }
}
