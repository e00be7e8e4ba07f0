//! Bounded `poll(2)` helpers shared by both sides of the ring.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Polls `fds` for at most `timeout`, retrying on `EINTR` until the time is spent.
///
/// Returns the number of entries with a non-zero `revents`.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so a sub-millisecond remainder still sleeps instead of spinning.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let nfds = libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `fds` is a valid, exclusively borrowed slice of `pollfd` of length `nfds`.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if rc >= 0 {
            return Ok(usize::try_from(rc).unwrap_or(0));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted || Instant::now() >= deadline {
            return Err(err);
        }
    }
}

/// A `pollfd` entry watching `fd` for readability.
pub fn readable(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }
}

/// Waits until `fd` is readable or hung up, at most `timeout`. Returns whether it is.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [readable(fd)];
    Ok(poll(&mut fds, timeout)? > 0)
}
