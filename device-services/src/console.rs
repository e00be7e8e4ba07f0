//! The console device: a 16550 UART (`vm_superio::Serial`) behind the exit ring.
//!
//! Output goes to an fd the core passes (a dup of its stdout or a file); input read from another
//! fd (optional) is fed to the guest with `enqueue_raw_bytes`, never more than the UART's FIFO has
//! room for: the rest stays buffered here and is retried whenever the guest drains the FIFO. The
//! interrupt is raised by writing an irqfd EventFd. End of input is not an error: the console keeps
//! serving output.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::runtime::{PioHandler, RuntimeError};

/// Number of ports a 16550 decodes.
pub const UART_PORTS: u16 = 8;
/// Most input bytes buffered in the service before it stops reading its input fd (back-pressure).
pub const MAX_PENDING_INPUT: usize = 64 * 1024;
const READ_CHUNK: usize = 4096;

/// Raises the UART's interrupt by writing an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The console device.
#[derive(Debug)]
pub struct Console {
    serial: Serial<IrqTrigger, NoEvents, File>,
    input: Option<File>,
    pending: VecDeque<u8>,
    output_failed: bool,
}

impl Console {
    /// A UART writing to `output`, reading from `input` (if any), interrupting through `irq`.
    pub fn new(output: OwnedFd, input: Option<OwnedFd>, irq: EventFd) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), File::from(output)),
            input: input.map(File::from),
            pending: VecDeque::new(),
            output_failed: false,
        }
    }

    /// Fds the console needs to keep open (output, input, irq).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.serial.writer().as_raw_fd(), self.serial.interrupt_evt().0.as_raw_fd()];
        v.extend(self.input.as_ref().map(|f| f.as_raw_fd()));
        v
    }

    /// Input bytes read but not yet in the UART's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Queues `bytes` for the guest and moves as many as fit into the FIFO.
    pub fn push_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.feed();
    }

    /// Moves buffered input into the FIFO as far as it has room.
    fn feed(&mut self) {
        // Each round moves at least one byte or stops, so at most `pending.len()` rounds.
        while !self.pending.is_empty() && self.serial.fifo_capacity() > 0 {
            let room = self.serial.fifo_capacity();
            let (front, _) = self.pending.as_slices();
            let chunk = &front[..front.len().min(room)];
            match self.serial.enqueue_raw_bytes(chunk) {
                Ok(0) | Err(vm_superio::serial::Error::FullFifo) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) => {
                    // The bytes were queued; only the interrupt failed. Keep going.
                    eprintln!("bulkhead-console: raising the interrupt failed: {e:?}");
                    self.pending.drain(..chunk.len());
                }
            }
        }
    }

    fn read_input(&mut self) {
        let Some(input) = self.input.as_mut() else { return };
        let mut buf = [0u8; READ_CHUNK];
        match input.read(&mut buf) {
            Ok(0) => {
                // End of input: stop watching it, keep serving.
                self.input = None;
            }
            Ok(n) => self.push_input(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            Err(e) => {
                eprintln!("bulkhead-console: input failed, ignoring it from now on: {e}");
                self.input = None;
            }
        }
    }
}

impl PioHandler for Console {
    fn read(&mut self, offset: u16, data: &mut [u8]) -> bool {
        let (Ok(off), [byte]) = (u8::try_from(offset), data) else { return false };
        *byte = self.serial.read(off);
        // The guest may just have drained the FIFO: refill it.
        self.feed();
        true
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> bool {
        let (Ok(off), [byte]) = (u8::try_from(offset), data) else { return false };
        if let Err(e) = self.serial.write(off, *byte) {
            if !self.output_failed {
                self.output_failed = true;
                eprintln!("bulkhead-console: UART write failed (output dropped from now on): {e:?}");
            }
        }
        self.feed();
        true
    }

    fn event_fds(&self) -> Vec<RawFd> {
        match &self.input {
            Some(f) if self.pending.len() < MAX_PENDING_INPUT => vec![f.as_raw_fd()],
            _ => Vec::new(),
        }
    }

    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        if self.input.as_ref().is_some_and(|f| f.as_raw_fd() == fd) {
            self.read_input();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LSR: u16 = 5;
    const IER: u16 = 1;
    const LSR_DR: u8 = 1;

    fn console() -> (Console, File, EventFd) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let c = Console::new(w, None, irq.try_clone().expect("clone"));
        (c, File::from(r), irq)
    }

    fn rd(c: &mut Console, off: u16) -> u8 {
        let mut b = [0u8];
        assert!(c.read(off, &mut b));
        b[0]
    }

    #[test]
    fn thr_goes_to_output() {
        let (mut c, mut out, _irq) = console();
        for b in b"ok\n" {
            assert!(c.write(0, &[*b]));
        }
        drop(c);
        let mut s = String::new();
        out.read_to_string(&mut s).expect("read");
        assert_eq!(s, "ok\n");
    }

    #[test]
    fn input_beyond_fifo_is_kept_and_delivered_in_order() {
        let (mut c, _out, irq) = console();
        assert!(c.write(IER, &[1]));
        let input: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        c.push_input(&input);
        assert_eq!(c.pending_input(), 300 - 64);
        assert!(irq.read().expect("irq fired") >= 1);
        let mut got = Vec::new();
        for _ in 0..1000 {
            if rd(&mut c, LSR) & LSR_DR == 0 {
                break;
            }
            got.push(rd(&mut c, 0));
        }
        assert_eq!(got, input);
        assert_eq!(c.pending_input(), 0);
    }

    #[test]
    fn bad_sizes_rejected() {
        let (mut c, _out, _irq) = console();
        let mut two = [0u8; 2];
        assert!(!c.read(0, &mut two));
        assert!(!c.write(0, &[1, 2]));
        assert!(!c.read(300, &mut [0u8]));
    }

    #[test]
    fn input_eof_stops_watching() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let (_or, ow) = nix::unistd::pipe().expect("pipe");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut c = Console::new(ow, Some(r), irq);
        let mut w = File::from(w);
        w.write_all(b"xy").expect("write");
        drop(w);
        let fd = c.event_fds()[0];
        c.on_event(fd).expect("event");
        assert_eq!(rd(&mut c, LSR) & LSR_DR, LSR_DR);
        c.on_event(fd).expect("eof");
        assert!(c.event_fds().is_empty());
        assert_eq!(rd(&mut c, 0), b'x');
    }
}
