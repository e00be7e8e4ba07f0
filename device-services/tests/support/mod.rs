//! Shared by the integration tests: start a service binary the way the core does (its end of the
//! control socket on fd 3, stdin/stdout on /dev/null), and small fd/number helpers.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use ipc::ControlChannel;

/// Starts `binary` with the child's end of a fresh control channel on fd 3 and `extra_args`;
/// returns the child and the core's end. `quiet` sends its stderr to /dev/null.
pub fn spawn_service(binary: &str, extra_args: &[&str], quiet: bool) -> (Child, ControlChannel) {
    let (ctl, child_end) = ControlChannel::pair().expect("pair");
    let child_fd: OwnedFd = child_end.into_fd();
    let raw = child_fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(extra_args).stdin(Stdio::null()).stdout(Stdio::null());
    if quiet {
        cmd.stderr(Stdio::null());
    }
    // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl) on fds that exist.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
    drop(child_fd);
    (child, ctl)
}

/// Borrows the descriptor `fd` owns.
pub fn borrow(fd: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns the descriptor and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// The low 32 bits of `v`.
pub fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}
