//! The console's output: never blocks the guest on whoever reads it.
//!
//! The UART's transmitter is written one byte per guest `out`. Whoever reads the console (a
//! terminal, a pipe to a log collector, a FIFO) may stall; a blocking write would then stall the
//! service inside a guest access, it would miss its deadline and be killed and restarted in a
//! loop while the guest waits. Instead [`Output`] keeps what the reader has not taken yet in a
//! bounded buffer ([`Output::CAPACITY`]) and writes only what the fd takes without waiting:
//! - the core hands over a non-blocking open file description where the output is a pipe, FIFO
//!   or terminal (its own reopening of it, so the core's stdout keeps its own flags) or a regular
//!   file (where the flag changes nothing for anyone), and then a write that would block returns
//!   `EAGAIN`;
//! - on a blocking fd (a socket, which cannot be reopened), a write is tried only when `poll`
//!   says the fd is writable, and at most [`CHUNK`] bytes at a time.
//!
//! Bytes that arrive while the buffer is full are dropped and counted ([`Output::dropped`]): the
//! guest never waits, a stalled reader loses the newest output, not the VM. The service watches
//! the fd for writability while bytes wait ([`Output::wants_writable`]) and writes them then
//! ([`Output::flush_now`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};

/// Most bytes written to a blocking, non-file fd in one `write`, after `poll` said it is writable:
/// below what a pipe, socket or terminal that reports writable takes without blocking.
pub const CHUNK: usize = 512;

/// How a write to the fd can be kept from blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `O_NONBLOCK` set: write directly.
    Direct,
    /// Blocking: `poll` first, small writes.
    Guarded,
}

/// Bounded, non-blocking console output (see the module docs).
#[derive(Debug)]
pub struct Output {
    file: File,
    mode: Mode,
    pending: VecDeque<u8>,
    written: u64,
    dropped: u64,
    failed: Option<io::ErrorKind>,
}

impl Output {
    /// Bytes kept for a reader that does not keep up.
    pub const CAPACITY: usize = 64 << 10;

    /// Output to `file`.
    pub fn new(file: File) -> Self {
        // (Only `F_GETFL`: the service's seccomp filter allows no `fstat`.)
        let mode = if nonblocking(&file) { Mode::Direct } else { Mode::Guarded };
        Self { file, mode, pending: VecDeque::new(), written: 0, dropped: 0, failed: None }
    }

    /// The fd written to.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Bytes waiting for the reader.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes the reader got.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes dropped: the buffer was full, or writing failed for good.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether bytes wait for the fd to become writable.
    pub fn wants_writable(&self) -> bool {
        !self.pending.is_empty() && self.failed.is_none()
    }

    /// Writes what the fd takes now, without waiting. Bounded: every round writes something or
    /// stops.
    pub fn flush_now(&mut self) {
        while !self.pending.is_empty() && self.failed.is_none() {
            if self.mode == Mode::Guarded && !writable(&self.file) {
                return;
            }
            let (front, _) = self.pending.as_slices();
            let n = if self.mode == Mode::Guarded { front.len().min(CHUNK) } else { front.len() };
            match self.file.write(&front[..n]) {
                Ok(0) => return,
                Ok(k) => {
                    self.pending.drain(..k);
                    self.written = self.written.saturating_add(k as u64);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return,
                Err(e) => {
                    eprintln!("bulkhead-console: output failed, dropping it from now on: {e}");
                    self.failed = Some(e.kind());
                    self.dropped = self.dropped.saturating_add(self.pending.len() as u64);
                    self.pending.clear();
                }
            }
        }
    }
}

impl Write for Output {
    /// Takes all of `buf`, always: what does not fit the buffer is dropped and counted.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed.is_some() {
            self.dropped = self.dropped.saturating_add(buf.len() as u64);
            return Ok(buf.len());
        }
        let room = Self::CAPACITY.saturating_sub(self.pending.len());
        let take = buf.len().min(room);
        self.pending.extend(&buf[..take]);
        self.dropped = self.dropped.saturating_add((buf.len() - take) as u64);
        self.flush_now();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_now();
        Ok(())
    }
}

fn nonblocking(file: &File) -> bool {
    // SAFETY: F_GETFL only reads the fd's status flags.
    let flags = unsafe { libc::fcntl(file.as_fd().as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

fn writable(file: &File) -> bool {
    let mut p = [libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
    // SAFETY: poll reads and writes the one pollfd we pass; a zero timeout never blocks.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) };
    n > 0 && p[0].revents & libc::POLLOUT != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe(nonblocking_write: bool) -> (File, File) {
        let mut fds = [0; 2];
        let flags = libc::O_CLOEXEC | if nonblocking_write { libc::O_NONBLOCK } else { 0 };
        // SAFETY: pipe2 writes two fds into the array we pass.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) }, 0);
        // SAFETY: both fds were just created for us and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let r = File::from(r);
        // The reader side must not block the test either.
        // SAFETY: F_SETFL on our own fd.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        (r, File::from(w))
    }

    fn drain(r: &mut File) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    }

    /// A reader that takes nothing: the writer never blocks, keeps CAPACITY bytes past what the
    /// pipe holds, drops and counts the rest; once the reader drains, the kept bytes arrive in
    /// order. Both a non-blocking description and a blocking one (guarded by poll).
    #[test]
    fn a_stalled_reader_never_blocks_the_writer() {
        for nonblocking_write in [true, false] {
            let (mut r, w) = pipe(nonblocking_write);
            let mut out = Output::new(w);
            let total = 4 << 20;
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            for b in &data {
                assert_eq!(out.write(std::slice::from_ref(b)).expect("write"), 1);
            }
            assert_eq!(out.pending(), Output::CAPACITY, "the buffer is full");
            let in_pipe = out.written();
            assert_eq!(out.dropped(), total as u64 - in_pipe - Output::CAPACITY as u64);
            assert!(out.wants_writable());
            let mut got = drain(&mut r);
            // Bounded: each round moves at least one pipe's worth.
            for _ in 0..64 {
                out.flush_now();
                got.extend(drain(&mut r));
                if out.pending() == 0 {
                    break;
                }
            }
            assert_eq!(out.pending(), 0);
            let kept = usize::try_from(in_pipe).expect("usize");
            assert_eq!(&got[..kept], &data[..kept], "the bytes the pipe took first");
            assert_eq!(&got[kept..], &data[kept..kept + Output::CAPACITY], "then the buffered ones, in order");
        }
    }

    #[test]
    fn a_closed_reader_drops_output_and_counts_it() {
        let (r, w) = pipe(true);
        drop(r);
        let mut out = Output::new(w);
        assert_eq!(out.write(b"lost").expect("write"), 4);
        assert_eq!(out.write(b"also").expect("write"), 4);
        assert_eq!((out.dropped(), out.pending(), out.wants_writable()), (8, 0, false));
    }
}
