//! Guest RAM backed by a memfd, so device services can map the same pages.
//!
//! The core creates one memfd for all of guest RAM (sealed against shrinking and growing) and maps
//! it with vm-memory. Regions are laid out around the 32-bit MMIO gap.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero, not page aligned, or too large for this host.
    #[error("invalid guest memory size {0} MiB")]
    InvalidSize(u64),
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] nix::Error),
    /// Sizing the memfd failed (not enough memory or file-size limit).
    #[error("cannot size guest memory to {size} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Sealing the memfd failed.
    #[error("cannot seal the guest memory memfd")]
    Seal(#[source] nix::Error),
    /// More guest memory than the host has.
    #[error("guest memory of {requested} MiB exceeds the host's {host} MiB")]
    ExceedsHost {
        /// Requested MiB.
        requested: u64,
        /// Host MemTotal in MiB.
        host: u64,
    },
    /// Mapping guest memory failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM: the mapping and the memfd behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    file: File,
    size: u64,
}

/// Splits `size` bytes of RAM around the MMIO gap: `(guest address, length, offset in the memfd)`.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size, 0)]
    } else {
        vec![(0, MMIO_GAP_START, 0), (MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START)]
    }
}

/// The host's MemTotal in MiB, if /proc/meminfo says.
pub fn host_mem_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl GuestRam {
    /// Creates `mib` MiB of guest RAM in a new memfd.
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        // Bound: 1 TiB is far beyond anything these machines can back; the kernel refuses first.
        if mib == 0 || mib > (1 << 20) {
            return Err(MemoryError::InvalidSize(mib));
        }
        if let Some(host) = host_mem_mib() {
            if mib > host {
                return Err(MemoryError::ExceedsHost { requested: mib, host });
            }
        }
        let size = mib << 20;
        let fd = memfd_create(c"bulkhead-guest-ram", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(MemoryError::Memfd)?;
        let file = File::from(fd);
        file.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
        fcntl(
            file.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
        )
        .map_err(MemoryError::Seal)?;
        let mut ranges = Vec::new();
        for (gpa, len, off) in ram_ranges(size) {
            let len = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(mib))?;
            let dup = file.try_clone().map_err(|source| MemoryError::Truncate { size, source })?;
            ranges.push((GuestAddress(gpa), len, Some(FileOffset::new(dup, off))));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        // Guest RAM stays out of a core dump of the core (the guest's secrets are not the
        // host's to keep; and a dump of GiBs would stall the host). Advice only: a kernel that
        // refuses it changes nothing else.
        for r in memory.iter() {
            if let (Ok(p), Ok(len)) = (memory.get_host_address(r.start_addr()), usize::try_from(r.len())) {
                // SAFETY: madvise on a range this GuestMemoryMmap mapped and keeps mapped;
                // MADV_DONTDUMP only changes the dump flag of the VMA, never its contents.
                unsafe { libc::madvise(p.cast(), len, libc::MADV_DONTDUMP) };
            }
        }
        Ok(Self { memory, file, size })
    }

    /// The vm-memory view of guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd backing guest RAM (to pass to services).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// End of RAM below the MMIO gap (exclusive).
    pub fn low_end(&self) -> u64 {
        self.size.min(MMIO_GAP_START)
    }

    /// Regions as `(guest address, length, host address)` for KVM memory slots.
    pub fn slots(&self) -> Vec<(u64, u64, u64)> {
        self.memory
            .iter()
            .map(|r| {
                let host = self.memory.get_host_address(r.start_addr()).map_or(0, |p| p as u64);
                (r.start_addr().0, r.len(), host)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20, 0)]);
        let four = 4u64 << 30;
        assert_eq!(
            ram_ranges(four),
            vec![(0, MMIO_GAP_START, 0), (MMIO_GAP_END, four - MMIO_GAP_START, MMIO_GAP_START)]
        );
    }

    #[test]
    fn memfd_backs_memory() {
        let ram = GuestRam::new(4).expect("ram");
        ram.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).expect("write");
        // The same bytes are visible through the memfd.
        let mut buf = [0u8; 4];
        nix::sys::uio::pread(ram.memfd(), &mut buf, 0x1000).expect("pread");
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.size(), 4 << 20);
        assert!(GuestRam::new(0).is_err());
        let host = host_mem_mib().expect("meminfo");
        assert!(matches!(GuestRam::new(host + 1), Err(MemoryError::ExceedsHost { .. })));
    }
}
