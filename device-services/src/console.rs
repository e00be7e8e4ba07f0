//! The console device: a 16550 UART (`vm_superio::Serial`) behind the exit ring.
//!
//! Output goes to an fd the core passes (a dup of its stdout or a file); input read from another
//! fd (optional) is fed to the guest with `enqueue_raw_bytes`, never more than the UART's FIFO has
//! room for: the rest stays buffered here (at most [`MAX_PENDING_INPUT`] bytes; the console stops
//! reading its input fd while that buffer is full, nothing is dropped) and is retried whenever the
//! guest drains the FIFO. The interrupt is raised by writing an irqfd EventFd. End of input is not
//! an error: the console keeps serving output.
//!
//! # State that survives the service
//!
//! Given the console's state region ([`Console::with_state`]), the console commits its whole state
//! there ([`UartState`]: every register of `vm_superio`'s `SerialState`, the receive FIFO and the
//! pending input) after every access that changed it, and only then: register writes, RBR and
//! IIR reads, input moved into the FIFO or read from the input fd. A new instance restores it, so
//! the guest sees the same registers and receives every unread input byte, in order, once.
//!
//! Bounds of what a kill can cost (the core redoes the exit that was in flight against the new
//! instance):
//! - input: bytes taken from the input fd by a `read` whose commit had not happened yet are lost
//!   (one read: ≤ 4 KiB and ≤ the free room of the pending buffer); an RBR read whose commit
//!   happened but whose reply did not reach the core loses that one byte (the redone read returns
//!   the next one). Input is never delivered twice.
//! - output: a THR byte is written to the output fd before the reply, so a redone THR write may
//!   emit that one byte a second time; nothing acknowledged to the guest is lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use ipc::state::{
    decode_payload, encode_payload, DeviceKind, Loaded, StateError, StateRegion, UartState, MAX_UART_FIFO,
    MAX_UART_PENDING,
};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use ipc::control::{DeviceReport, IoCounters, UartReport};
use ipc::{Mirror, MirrorEntry};

use crate::output::Output;
use crate::runtime::{PioHandler, RuntimeError};

/// Number of ports a 16550 decodes.
pub const UART_PORTS: u16 = 8;
/// Most input bytes buffered in the service before it stops reading its input fd (back-pressure).
/// Equal to [`MAX_UART_PENDING`], so the whole buffer always fits in the state region.
pub const MAX_PENDING_INPUT: usize = MAX_UART_PENDING;
const READ_CHUNK: usize = 4096;

const OFF_RBR: u16 = 0;
const OFF_IIR: u16 = 2;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_VALID: u8 = 0x0f;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const LSR_DR: u8 = 0x01;
/// LSR bits the model keeps set: THR empty and transmitter idle.
const LSR_FIXED: u8 = 0x60;

/// Errors of the console's state handling.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The state region could not be read (corrupt slot, wrong kind, undecodable payload).
    #[error("console state region")]
    State(#[source] StateError),
    /// The saved state is well-formed but not a state this UART model can be in.
    #[error("invalid saved UART state: {0}")]
    Invalid(&'static str),
    /// The region holds per-request words a UART never writes.
    #[error("console state region has virtio request words set")]
    HotWords,
    /// `vm_superio` refused a validated state (cannot happen: validation checks its one
    /// condition, and the interrupt is muted while restoring).
    #[error("restoring the UART: {0}")]
    Restore(String),
}

/// Raises the UART's interrupt by writing an irqfd. Muted while a saved state is restored, so the
/// console raises a pending interrupt exactly once afterwards.
#[derive(Debug)]
pub struct IrqTrigger {
    evt: EventFd,
    muted: Cell<bool>,
    /// Invalidated before every interrupt: the interrupt follows a change of the UART's state
    /// (input arrived, THR emptied), and the guest's handler must not read the old values.
    mirror: std::cell::OnceCell<Mirror>,
}

impl IrqTrigger {
    /// A trigger writing `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self { evt, muted: Cell::new(false), mirror: std::cell::OnceCell::new() }
    }

    /// The irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if self.muted.get() {
            return Ok(());
        }
        if let Some(m) = self.mirror.get() {
            m.invalidate();
        }
        self.evt.write(1)
    }
}

/// What [`Console::with_state`] found in the state region.
#[derive(Debug)]
pub enum Restore {
    /// The region was zero: a freshly reset UART.
    Fresh,
    /// The saved state was restored.
    Restored {
        /// Generation of the state restored.
        generation: u64,
        /// Unread bytes in the receive FIFO.
        fifo: usize,
        /// Input bytes waiting for room in the FIFO.
        pending: usize,
        /// An enabled interrupt was pending, so the irqfd was raised once.
        irq_raised: bool,
    },
    /// The region failed validation: it was cleared and the UART starts freshly reset. A 16550 has
    /// no equivalent of virtio's DEVICE_NEEDS_RESET, so a fresh UART is the only safe choice; the
    /// guest's driver sees reset registers (and re-programs them when it next opens the port).
    Invalid(ConsoleError),
}

type Uart = Serial<IrqTrigger, NoEvents, Output>;

/// The console device.
#[derive(Debug)]
pub struct Console {
    serial: Uart,
    input: Option<File>,
    pending: VecDeque<u8>,
    /// Input bytes moved into the FIFO for the guest.
    input_bytes: u64,
    state: Option<StateRegion>,
    /// The state last committed to `state` (or found there).
    saved: UartState,
    store_failed: bool,
}

fn snapshot(serial: &Uart, pending: &VecDeque<u8>) -> UartState {
    let s = serial.state();
    UartState {
        dll: s.baud_divisor_low,
        dlm: s.baud_divisor_high,
        ier: s.interrupt_enable,
        iir: s.interrupt_identification,
        lcr: s.line_control,
        lsr: s.line_status,
        mcr: s.modem_control,
        msr: s.modem_status,
        scr: s.scratch,
        fifo: s.in_buffer,
        pending: pending.iter().copied().collect(),
    }
}

/// Checks a saved state against the UART model and converts it. LCR, MCR, the divisor latch and
/// the scratch register accept every 8-bit value (the model stores guest writes unmasked); IER
/// must use only the 16550's four enable bits; IIR must be "none" or THRE and/or RDA; LSR must be
/// THRE|TEMT plus DR exactly when the FIFO holds data; MSR never changes in this model; RDA can
/// only be pending with data in the FIFO; both buffers are bounded.
pub fn validate(s: &UartState) -> Result<SerialState, ConsoleError> {
    let bad = |what| Err(ConsoleError::Invalid(what));
    if s.ier & !IER_VALID != 0 {
        return bad("IER has bits outside the 16550's enable bits");
    }
    if ![IIR_NONE, IIR_THRE, IIR_RDA, IIR_THRE | IIR_RDA].contains(&s.iir) {
        return bad("IIR is not an identification the UART produces");
    }
    if s.fifo.len() > MAX_UART_FIFO {
        return bad("receive FIFO longer than 64 bytes");
    }
    if s.pending.len() > MAX_UART_PENDING {
        return bad("pending input longer than its bound");
    }
    if s.lsr & !LSR_DR != LSR_FIXED || (s.lsr & LSR_DR != 0) == s.fifo.is_empty() {
        return bad("LSR inconsistent with the receive FIFO");
    }
    if s.msr != SerialState::default().modem_status {
        return bad("MSR differs from the model's fixed modem status");
    }
    if s.iir & IIR_RDA != 0 && s.fifo.is_empty() {
        return bad("received-data interrupt pending with an empty FIFO");
    }
    Ok(SerialState {
        baud_divisor_low: s.dll,
        baud_divisor_high: s.dlm,
        interrupt_enable: s.ier,
        interrupt_identification: s.iir,
        line_control: s.lcr,
        line_status: s.lsr,
        modem_control: s.mcr,
        modem_status: s.msr,
        scratch: s.scr,
        in_buffer: s.fifo.clone(),
    })
}

/// Loads and validates the saved state: `Ok(None)` for a fresh region.
fn load_saved(region: &mut StateRegion) -> Result<Option<(u64, UartState, SerialState)>, ConsoleError> {
    let Loaded::Saved { generation, payload } = region.load(DeviceKind::Uart).map_err(ConsoleError::State)? else {
        return Ok(None);
    };
    if !region.hot_is_zero() {
        return Err(ConsoleError::HotWords);
    }
    let saved: UartState = decode_payload(&payload).map_err(ConsoleError::State)?;
    let serial = validate(&saved)?;
    Ok(Some((generation, saved, serial)))
}

impl Console {
    /// A UART writing to `output`, reading from `input` (if any), interrupting through `irq`.
    /// Its state lives only in this process.
    pub fn new(output: OwnedFd, input: Option<OwnedFd>, irq: EventFd) -> Self {
        let serial = Serial::new(IrqTrigger::new(irq), Output::new(File::from(output)));
        let saved = snapshot(&serial, &VecDeque::new());
        Self {
            serial,
            input: input.map(File::from),
            pending: VecDeque::new(),
            input_bytes: 0,
            state: None,
            saved,
            store_failed: false,
        }
    }

    /// Like [`new`](Self::new), but keeping the UART's state in `region` (the console's state
    /// region) and starting from what it holds: a zero region gives a fresh UART; a valid one is
    /// restored (registers, FIFO, pending input) and, if it says an enabled interrupt is pending,
    /// the irqfd is raised once; an invalid one is cleared and the UART starts fresh (see
    /// [`Restore::Invalid`]). Errors only if `vm_superio` refuses a validated state.
    pub fn with_state(
        output: OwnedFd,
        input: Option<OwnedFd>,
        irq: EventFd,
        mut region: StateRegion,
    ) -> Result<(Self, Restore), ConsoleError> {
        let (mut console, restore) = match load_saved(&mut region) {
            Ok(None) => (Self::new(output, input, irq), Restore::Fresh),
            Err(e) => {
                region.clear();
                (Self::new(output, input, irq), Restore::Invalid(e))
            }
            Ok(Some((generation, saved, ss))) => {
                let trigger = IrqTrigger::new(irq);
                trigger.muted.set(true);
                let serial = Serial::from_state(&ss, trigger, NoEvents, Output::new(File::from(output)))
                    .map_err(|e| ConsoleError::Restore(format!("{e:?}")))?;
                serial.interrupt_evt().muted.set(false);
                let irq_pending = (ss.interrupt_enable & IER_RDA != 0 && ss.interrupt_identification & IIR_RDA != 0)
                    || (ss.interrupt_enable & IER_THRE != 0 && ss.interrupt_identification & IIR_THRE != 0);
                let mut irq_raised = false;
                if irq_pending {
                    match serial.interrupt_evt().trigger() {
                        Ok(()) => irq_raised = true,
                        Err(e) => eprintln!("bulkhead-console: raising the restored interrupt failed: {e}"),
                    }
                }
                let restore =
                    Restore::Restored { generation, fifo: saved.fifo.len(), pending: saved.pending.len(), irq_raised };
                let console = Self {
                    serial,
                    input: input.map(File::from),
                    pending: saved.pending.iter().copied().collect(),
                    input_bytes: 0,
                    state: None,
                    saved,
                    store_failed: false,
                };
                (console, restore)
            }
        };
        console.state = Some(region);
        // A restored FIFO with room left takes pending input now (and commits that change).
        if console.feed() > 0 {
            console.persist();
        }
        Ok((console, restore))
    }

    /// Input bytes read but not yet in the UART's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Queues as much of `bytes` for the guest as the pending buffer has room for (at most
    /// [`MAX_PENDING_INPUT`] buffered), moves as many as fit into the FIFO and commits the state.
    /// Returns how many bytes were accepted.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(MAX_PENDING_INPUT.saturating_sub(self.pending.len()));
        self.pending.extend(&bytes[..n]);
        self.feed();
        self.persist();
        n
    }

    /// Moves buffered input into the FIFO as far as it has room. Returns the bytes moved.
    fn feed(&mut self) -> usize {
        let mut moved = 0;
        // Each round moves at least one byte or stops, so at most `pending.len()` rounds.
        while !self.pending.is_empty() && self.serial.fifo_capacity() > 0 {
            let room = self.serial.fifo_capacity();
            let (front, _) = self.pending.as_slices();
            let chunk = &front[..front.len().min(room)];
            match self.serial.enqueue_raw_bytes(chunk) {
                Ok(0) | Err(vm_superio::serial::Error::FullFifo) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    moved += n;
                }
                Err(e) => {
                    // The bytes were queued; only the interrupt failed. Keep going.
                    eprintln!("bulkhead-console: raising the interrupt failed: {e:?}");
                    let n = chunk.len();
                    self.pending.drain(..n);
                    moved += n;
                }
            }
        }
        self.input_bytes = self.input_bytes.saturating_add(moved as u64);
        moved
    }

    /// Commits the state to the region if it changed since the last commit.
    fn persist(&mut self) {
        let Some(region) = self.state.as_mut() else { return };
        let now = snapshot(&self.serial, &self.pending);
        if now == self.saved {
            return;
        }
        match encode_payload(&now).and_then(|b| region.store(DeviceKind::Uart, &b)) {
            Ok(_) => self.saved = now,
            Err(e) => {
                if !self.store_failed {
                    self.store_failed = true;
                    eprintln!("bulkhead-console: committing the UART state failed (will retry): {e}");
                }
            }
        }
    }

    fn read_input(&mut self) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len()).min(READ_CHUNK);
        if room == 0 {
            return;
        }
        let Some(input) = self.input.as_mut() else { return };
        let mut buf = [0u8; READ_CHUNK];
        match input.read(&mut buf[..room]) {
            Ok(0) => {
                // End of input: stop watching it, keep serving.
                self.input = None;
            }
            Ok(n) => {
                self.push_input(&buf[..n]);
            }
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
        // The guest may just have drained the FIFO: refill it. Only RBR and IIR reads (and input
        // moved into the FIFO) change state; LSR polling stays cheap.
        let moved = self.feed();
        if moved > 0 || offset == OFF_RBR || offset == OFF_IIR {
            self.persist();
        }
        true
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> bool {
        let (Ok(off), [byte]) = (u8::try_from(offset), data) else { return false };
        // The output never fails nor blocks (`Output` buffers, drops and counts): the only error
        // left is the interrupt's, which `IrqTrigger` already reports.
        let _ = self.serial.write(off, *byte);
        self.feed();
        // A THR write changes nothing unless it sets the THRE interrupt: the comparison skips it.
        self.persist();
        true
    }

    fn event_fds(&self) -> Vec<RawFd> {
        match &self.input {
            Some(f) if self.pending.len() < MAX_PENDING_INPUT => vec![f.as_raw_fd()],
            _ => Vec::new(),
        }
    }

    fn write_fds(&self) -> Vec<RawFd> {
        let out = self.serial.writer();
        if out.wants_writable() {
            vec![out.raw_fd()]
        } else {
            Vec::new()
        }
    }

    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        if self.input.as_ref().is_some_and(|f| f.as_raw_fd() == fd) {
            self.read_input();
        }
        if self.serial.writer().raw_fd() == fd {
            self.serial.writer_mut().flush_now();
        }
        Ok(())
    }

    fn report(&mut self) -> DeviceReport {
        let s = self.serial.state();
        DeviceReport::Uart(UartReport {
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            fifo: u32::try_from(s.in_buffer.len()).unwrap_or(u32::MAX),
            pending_input: u32::try_from(self.pending.len()).unwrap_or(u32::MAX),
        })
    }

    /// Output bytes the reader got (`bytes_from_guest`), output bytes dropped for a reader that
    /// did not keep up (`errors`), input bytes given to the guest (`bytes_to_guest`).
    fn io_counters(&self) -> IoCounters {
        let out = self.serial.writer();
        IoCounters {
            requests: 0,
            bytes_to_guest: self.input_bytes,
            bytes_from_guest: out.written(),
            throttled: 0,
            errors: out.dropped(),
            host_errors: 0,
        }
    }

    /// Every register but RBR (a read pops the FIFO) and IIR (a read clears the THR-empty
    /// interrupt): the line status polled before each byte a driver writes, and the rest. Writes
    /// to THR (or DLL) may be posted: a byte to send changes nothing but the UART.
    fn mirrored(&mut self, out: &mut Vec<MirrorEntry>) {
        for off in MIRRORED {
            out.push(MirrorEntry::new(u64::from(off), &[self.serial.read(off)]));
        }
        out.push(MirrorEntry::posted_write(0, 1));
    }

    fn attach_mirror(&mut self, mirror: Mirror) {
        let _ = self.serial.interrupt_evt().mirror.set(mirror);
    }
}

/// UART registers whose read has no side effect in vm-superio's 16550 (IER or DLH, LCR, MCR,
/// LSR, MSR, SCR).
const MIRRORED: [u8; 6] = [1, 3, 4, 5, 6, 7];

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::state::SLOT_HEADER_LEN;
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
        assert_eq!(c.push_input(&input), 300);
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

    fn with_region(region: &StateRegion) -> (Console, Restore, File, EventFd) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dup = StateRegion::from_fd(region.fd().try_clone_to_owned().expect("dup")).expect("map");
        let (c, restore) = Console::with_state(w, None, irq.try_clone().expect("clone"), dup).expect("console");
        (c, restore, File::from(r), irq)
    }

    #[test]
    fn pending_input_is_bounded_not_dropped() {
        let (mut c, _out, _irq) = console();
        let big = vec![7u8; MAX_PENDING_INPUT + 64 + 100];
        // The FIFO takes 64, the buffer MAX_PENDING_INPUT; the rest is refused, not dropped later.
        assert_eq!(c.push_input(&big), MAX_PENDING_INPUT);
        assert_eq!(c.pending_input(), MAX_PENDING_INPUT - 64);
        assert_eq!(c.push_input(&big), 64);
        assert_eq!(c.pending_input(), MAX_PENDING_INPUT);
        assert_eq!(c.push_input(b"x"), 0);
    }

    #[test]
    fn state_survives_a_new_instance_in_process() {
        let region = StateRegion::create("console-unit").expect("region");
        let (mut c, restore, _out, _irq) = with_region(&region);
        assert!(matches!(restore, Restore::Fresh));
        assert!(c.write(3, &[0x80]));
        assert!(c.write(0, &[0x01]));
        assert!(c.write(1, &[0x00]));
        assert!(c.write(3, &[0x03]));
        assert!(c.write(IER, &[0x01]));
        assert!(c.write(7, &[0x5a]));
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(c.push_input(&input), 100);
        assert_eq!(rd(&mut c, 0), 0);
        drop(c);
        let (mut c2, restore, _out2, irq2) = with_region(&region);
        let Restore::Restored { fifo, pending, irq_raised, .. } = restore else { panic!("{restore:?}") };
        assert_eq!((fifo, pending), (64, 35));
        assert!(irq_raised);
        assert_eq!(irq2.read().expect("raised once"), 1);
        assert_eq!(rd(&mut c2, 3), 0x03);
        assert_eq!(rd(&mut c2, IER), 0x01);
        assert_eq!(rd(&mut c2, 7), 0x5a);
        let mut got = Vec::new();
        for _ in 0..200 {
            if rd(&mut c2, LSR) & LSR_DR == 0 {
                break;
            }
            got.push(rd(&mut c2, 0));
        }
        assert_eq!(got, input[1..]);
    }

    /// The mirror holds the registers a read does not change, with their current values; an
    /// interrupt is raised only after the mirror was invalidated (input arrived: the guest's
    /// handler must read the new line status, not the published one).
    #[test]
    fn mirror_holds_side_effect_free_registers_and_is_invalidated_before_an_interrupt() {
        let (mut c, _out, irq) = console();
        let mirror = Mirror::standalone("console-test").expect("mirror");
        c.attach_mirror(mirror.clone());
        let mut v = Vec::new();
        c.mirrored(&mut v);
        let offs: Vec<u64> = v.iter().filter(|e| e.flags == 0).map(|e| e.addr).collect();
        assert_eq!(offs, vec![1, 3, 4, 5, 6, 7], "never RBR (0) or IIR (2)");
        let posted: Vec<(u64, u32)> =
            v.iter().filter(|e| e.flags == ipc::mirror::POSTED_WRITE).map(|e| (e.addr, e.len)).collect();
        assert_eq!(posted, vec![(0, 1)], "THR writes may be posted, nothing else");
        let lsr = |v: &[MirrorEntry]| v.iter().find(|e| e.addr == 5).map(|e| e.data[0]).expect("LSR");
        assert_eq!(lsr(&v) & 1, 0, "no data ready yet");
        mirror.publish(&v);
        // Enable the received-data interrupt, then input arrives.
        assert!(c.write(IER, &[1]));
        mirror.publish(&v);
        assert!(mirror.is_valid());
        let _ = irq.read();
        c.push_input(b"x");
        assert_eq!(irq.read().expect("interrupt raised"), 1);
        assert!(!mirror.is_valid(), "interrupt raised with the old line status still published");
        v.clear();
        c.mirrored(&mut v);
        assert_eq!(lsr(&v) & 1, 1, "data ready now");
    }

    #[test]
    fn lsr_polling_does_not_commit() {
        let region = StateRegion::create("console-unit").expect("region");
        let (mut c, _, _out, _irq) = with_region(&region);
        assert!(c.write(7, &[1]));
        let g = c.state.as_mut().map(|r| r.load(DeviceKind::Uart));
        let Some(Ok(Loaded::Saved { generation, .. })) = g else { panic!("{g:?}") };
        for _ in 0..10 {
            rd(&mut c, LSR);
            assert!(c.write(7, &[1]));
        }
        let g2 = c.state.as_mut().map(|r| r.load(DeviceKind::Uart));
        assert!(matches!(g2, Some(Ok(Loaded::Saved { generation: g, .. })) if g == generation), "{g2:?}");
    }

    #[test]
    fn validation_rejects_impossible_states() {
        let ok = snapshot(
            &Serial::new(IrqTrigger::new(EventFd::new(0).expect("efd")), Output::new(tempfile())),
            &VecDeque::new(),
        );
        assert!(validate(&ok).is_ok());
        let cases: Vec<(&str, UartState)> = vec![
            ("ier", UartState { ier: 0x10, ..ok.clone() }),
            ("iir", UartState { iir: 0x00, ..ok.clone() }),
            ("iir", UartState { iir: 0x08, ..ok.clone() }),
            ("lsr dr", UartState { lsr: 0x61, ..ok.clone() }),
            ("lsr", UartState { lsr: 0xe0, ..ok.clone() }),
            ("fifo", UartState { fifo: vec![1; 65], lsr: 0x61, ..ok.clone() }),
            ("pending", UartState { pending: vec![1; MAX_UART_PENDING + 1], ..ok.clone() }),
            ("msr", UartState { msr: 0, ..ok.clone() }),
            ("rda", UartState { iir: IIR_RDA, ..ok.clone() }),
        ];
        for (what, s) in cases {
            assert!(matches!(validate(&s), Err(ConsoleError::Invalid(_))), "{what} accepted");
        }
        // Any LCR/MCR/divisor/scratch value is one a guest may write.
        assert!(validate(&UartState { lcr: 0xff, mcr: 0xff, dll: 0, dlm: 0xff, scr: 0xff, ..ok }).is_ok());
    }

    #[test]
    fn corrupt_region_starts_fresh_and_is_cleared() {
        let region = StateRegion::create("console-unit").expect("region");
        let (mut c, _, _out, _irq) = with_region(&region);
        assert!(c.write(7, &[0x5a]));
        drop(c);
        region.corrupt_byte(SLOT_HEADER_LEN + 3, 0x40);
        let (mut c2, restore, _out2, _irq2) = with_region(&region);
        assert!(matches!(restore, Restore::Invalid(ConsoleError::State(_))), "{restore:?}");
        assert_eq!(rd(&mut c2, 7), 0);
        assert!(c2.write(7, &[0x11]));
        drop(c2);
        let (mut c3, restore, _out3, _irq3) = with_region(&region);
        assert!(matches!(restore, Restore::Restored { .. }), "{restore:?}");
        assert_eq!(rd(&mut c3, 7), 0x11);
    }

    fn tempfile() -> File {
        let (_r, w) = nix::unistd::pipe().expect("pipe");
        File::from(w)
    }
}
