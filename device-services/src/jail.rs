//! Confinement of a service process, a step separate from set-up.
//!
//! Today: every fd the service does not need is closed, so a compromised device cannot use
//! anything the core passed by mistake. Seccomp filters and namespaces come later and belong here.

use std::os::fd::RawFd;

/// Errors entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Listing `/proc/self/fd` failed.
    #[error("list open fds")]
    ListFds(#[source] std::io::Error),
}

/// Closes every fd above 2 that is not in `keep`. Returns how many were closed.
pub fn close_other_fds(keep: &[RawFd]) -> Result<usize, JailError> {
    // Collect first: closing while iterating would also close the directory's own fd.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(JailError::ListFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut closed = 0;
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: `fd` was open in this process and is not one the caller keeps; the
            // service owns no other handle to it that would be used later (the directory handle
            // that listed it is already closed, so EBADF is harmless).
            if unsafe { libc::close(fd) } == 0 {
                closed += 1;
            }
        }
    }
    Ok(closed)
}
