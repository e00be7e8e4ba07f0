//! Bounded `poll(2)` helpers shared by both sides of the ring.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Polls `fds` for at most `timeout`, retrying on `EINTR`.
///
/// Returns the number of entries with a non-zero `revents`. A signal never ends the wait with
/// an error: one that comes after the deadline (a thread interrupted near its timeout, or
/// scheduled again only after it: glibc signals every thread of the process when one changes
/// the process's ids, as the core's jail does) gets one more look at the fds without waiting.
/// Bounded: after the deadline, at most [`EINTR_AFTER_DEADLINE`] more tries, then "nothing
/// ready".
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let nfds = libc::nfds_t::try_from(fds.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let deadline = Instant::now() + timeout;
    let mut late = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so a sub-millisecond remainder still sleeps instead of spinning.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid, exclusively borrowed slice of `pollfd` of length `nfds`.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
        if rc >= 0 {
            return Ok(usize::try_from(rc).unwrap_or(0));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
        if left.is_zero() {
            late += 1;
            if late > EINTR_AFTER_DEADLINE {
                fds.iter_mut().for_each(|p| p.revents = 0);
                return Ok(0);
            }
        }
    }
}

/// Signals taken after the deadline before [`poll`] gives up looking.
pub const EINTR_AFTER_DEADLINE: u32 = 8;

/// A `pollfd` entry watching `fd` for readability.
pub fn readable(fd: BorrowedFd<'_>) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }
}

/// Waits until `fd` is readable or hung up, at most `timeout`. Returns whether it is.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [readable(fd)];
    Ok(poll(&mut fds, timeout)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A handler that holds the interrupted thread past its deadline, as a loaded host does.
    extern "C" fn slow_handler(_: libc::c_int) {
        let until = Instant::now() + Duration::from_millis(60);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_signal_past_the_deadline_is_a_timeout_not_an_error() {
        // SAFETY: a handler for SIGUSR2 that only spins on the clock; no SA_RESTART, so the
        // poll it interrupts returns EINTR.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = slow_handler as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut act.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR2, &act, std::ptr::null_mut()), 0);
        }
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let waiting = Arc::new(AtomicBool::new(false));
        let w2 = waiting.clone();
        let t = std::thread::spawn(move || {
            let mut fds = [readable(r.as_fd())];
            w2.store(true, Ordering::SeqCst);
            // 20 ms, interrupted after ~5 ms by a handler that runs for 60.
            poll(&mut fds, Duration::from_millis(20)).map_err(|e| e.to_string())
        });
        use std::os::unix::thread::JoinHandleExt;
        while !waiting.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(5));
        // SAFETY: signalling a thread of this process that is still running (joined below).
        assert_eq!(unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR2) }, 0);
        assert_eq!(t.join().expect("thread"), Ok(0), "EINTR after the deadline is a timeout");
    }
}
