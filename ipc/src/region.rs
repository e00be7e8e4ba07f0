//! A memfd-backed shared memory region mapped into both the core and a service.
//!
//! The core creates the region ([`SharedRegion::create`]), seals its size and passes the fd to the
//! service, which maps it with [`SharedRegion::from_fd`] after checking the size with `fstat` and
//! the seals, so the core cannot shrink it under the service (which would turn accesses into
//! `SIGBUS`).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// Largest region either side accepts (keeps a hostile size from exhausting address space).
pub const MAX_REGION_SIZE: usize = 64 << 20;

/// Errors from creating or mapping a shared region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The requested or received size is zero or above [`MAX_REGION_SIZE`].
    #[error("invalid region size {0}")]
    InvalidSize(u64),
    /// The region name contains a NUL byte.
    #[error("invalid region name")]
    InvalidName,
    /// `memfd_create` failed.
    #[error("memfd_create failed")]
    Create(#[source] nix::Error),
    /// Setting the size failed.
    #[error("ftruncate failed")]
    Truncate(#[source] nix::Error),
    /// Adding or reading seals failed.
    #[error("memfd seals")]
    Seal(#[source] std::io::Error),
    /// The received fd is not sealed against shrinking and cannot be.
    #[error("region fd is not sealed against shrinking")]
    NotSealed,
    /// `fstat` failed.
    #[error("fstat failed")]
    Stat(#[source] nix::Error),
    /// The received fd's size differs from the expected size.
    #[error("region size {actual} differs from expected {expected}")]
    SizeMismatch {
        /// Size the set-up message announced.
        expected: u64,
        /// Size `fstat` reported.
        actual: u64,
    },
    /// `mmap` failed.
    #[error("mmap failed")]
    Map(#[source] std::io::Error),
}

/// A shared, read-write mapping of a memfd.
///
/// The memory may be written by the peer process at any time: it must only be accessed through
/// atomics or volatile copies, never through references to plain data.
#[derive(Debug)]
pub struct SharedRegion {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain shared memory owned by this value; all access goes through raw
// pointers with atomics or volatile copies, so moving it between threads is sound.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; `&SharedRegion` only hands out raw pointers, callers synchronise via atomics.
unsafe impl Sync for SharedRegion {}

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn check_size(len: u64) -> Result<usize, RegionError> {
    usize::try_from(len).ok().filter(|&l| l > 0 && l <= MAX_REGION_SIZE).ok_or(RegionError::InvalidSize(len))
}

impl SharedRegion {
    /// Creates a zero-filled region of `len` bytes, sealed against resizing.
    pub fn create(name: &str, len: usize) -> Result<Self, RegionError> {
        let len = check_size(len as u64)?;
        let cname = CString::new(name).map_err(|_| RegionError::InvalidName)?;
        let fd = memfd_create(&cname, MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
            .map_err(RegionError::Create)?;
        let size = libc::off_t::try_from(len).map_err(|_| RegionError::InvalidSize(len as u64))?;
        nix::unistd::ftruncate(&fd, size).map_err(RegionError::Truncate)?;
        // SAFETY: F_ADD_SEALS on a memfd we own takes an int argument and touches no memory.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) };
        if rc < 0 {
            return Err(RegionError::Seal(std::io::Error::last_os_error()));
        }
        Self::map(fd, len)
    }

    /// Maps a region received from the peer, which must be exactly `expected_len` bytes and
    /// sealed against shrinking (the seal is added here if the peer allowed it).
    pub fn from_fd(fd: OwnedFd, expected_len: u64) -> Result<Self, RegionError> {
        let len = check_size(expected_len)?;
        // SAFETY: F_GET_SEALS takes no argument and touches no memory.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(RegionError::Seal(std::io::Error::last_os_error()));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            // SAFETY: F_ADD_SEALS takes an int argument and touches no memory.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            if rc < 0 {
                return Err(RegionError::NotSealed);
            }
        }
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(RegionError::Stat)?;
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual != expected_len {
            return Err(RegionError::SizeMismatch { expected: expected_len, actual });
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, RegionError> {
        // SAFETY: a fresh shared mapping of `len` bytes of a memfd whose size is at least `len`
        // (checked or set by the caller, and sealed against shrinking); no existing memory is
        // affected because the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RegionError::Map(std::io::Error::last_os_error()));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| RegionError::Map(std::io::Error::other("null mapping")))?;
        Ok(Self { fd, ptr, len })
    }

    /// The memfd backing the region (to pass to the peer).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address of the mapping. Valid for `len()` bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `map`, which nothing else unmaps;
        // after drop no pointer derived from it is used (users borrow `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_and_map_twice_share_memory() {
        let a = SharedRegion::create("t", 4096).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        let b = SharedRegion::from_fd(fd, 4096).expect("map");
        // SAFETY: both pointers are valid for 4096 bytes; single-threaded test.
        unsafe {
            a.as_ptr().add(100).write_volatile(42);
            assert_eq!(b.as_ptr().add(100).read_volatile(), 42);
        }
    }

    #[test]
    fn size_checks() {
        let a = SharedRegion::create("t", 8192).expect("create");
        let fd = a.fd().try_clone_to_owned().expect("dup");
        assert!(matches!(SharedRegion::from_fd(fd, 4096), Err(RegionError::SizeMismatch { actual: 8192, .. })));
        assert!(matches!(SharedRegion::create("t", 0), Err(RegionError::InvalidSize(0))));
        let fd = a.fd().try_clone_to_owned().expect("dup");
        assert!(matches!(SharedRegion::from_fd(fd, u64::MAX), Err(RegionError::InvalidSize(_))));
        // The seals forbid shrinking.
        assert!(nix::unistd::ftruncate(a.fd(), 0).is_err());
    }
}
