//! The console's UART state survives the service: the test plays the core (output pipe, input
//! pipe, irqfd and state region kept across instances; a fresh ring per instance) and a guest
//! driver, SIGKILLs `bulkhead-console` and starts a new instance with the same fds. Registers,
//! unread FIFO bytes and pending input must carry over exactly; a corrupted region must give a
//! fresh UART and a live service.

mod support;
use support::*;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ipc::control::{DeviceConfig, FdRole};
use ipc::state::{DeviceKind, Loaded, StateRegion, MAX_UART_FIFO, MAX_UART_PENDING, SLOT_HEADER_LEN, SLOT_LEN};
use ipc::wait;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const COM1: u64 = 0x3f8;
const RBR: u64 = COM1;
const DLL: u64 = COM1;
const IER: u64 = COM1 + 1;
const DLM: u64 = COM1 + 1;
const IIR: u64 = COM1 + 2;
const LCR: u64 = COM1 + 3;
const MCR: u64 = COM1 + 4;
const LSR: u64 = COM1 + 5;
const MSR: u64 = COM1 + 6;
const SCR: u64 = COM1 + 7;
const T: Duration = Duration::from_secs(5);

/// What the core keeps across instances, plus the current instance.
struct Rig {
    _serial: MutexGuard<'static, ()>,
    out_r: File,
    out_w: OwnedFd,
    in_r: OwnedFd,
    in_w: File,
    irq: EventFd,
    state: StateRegion,
    svc: Option<Instance>,
}

impl Rig {
    fn new() -> Self {
        let serial = one_at_a_time();
        let (out_r, out_w) = nix::unistd::pipe().expect("pipe");
        let (in_r, in_w) = nix::unistd::pipe().expect("pipe");
        Self {
            _serial: serial,
            out_r: File::from(out_r),
            out_w,
            in_r,
            in_w: File::from(in_w),
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            state: StateRegion::create("console-restart-test").expect("state region"),
            svc: None,
        }
    }

    /// Starts an instance exactly as the core does, with a fresh ring and the kept fds.
    fn start(&mut self) {
        self.svc = Some(Instance::start(
            env!("CARGO_BIN_EXE_bulkhead-console"),
            "console-restart",
            StderrTo::Inherit,
            &[
                (FdRole::Output, self.out_w.as_fd()),
                (FdRole::Irq, borrow(&self.irq)),
                (FdRole::Input, self.in_r.as_fd()),
                (FdRole::StateRegion, self.state.fd()),
            ],
            DeviceConfig::Console { base: 0x3f8, len: 8 },
        ));
    }

    fn sigkill(&mut self) {
        let st = self.svc.take().expect("instance").kill();
        assert!(!st.success(), "killed service exited cleanly: {st:?}");
    }

    fn alive(&mut self) -> bool {
        self.svc.as_mut().is_some_and(Instance::is_running)
    }

    fn inb(&self, port: u64) -> u8 {
        self.svc.as_ref().expect("instance").inb(port)
    }

    fn outb(&self, port: u64, v: u8) {
        self.svc.as_ref().expect("instance").outb(port, v);
    }

    /// Bytes still in the input pipe (not yet read by the service).
    fn input_unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the valid pointer.
        let rc = unsafe { libc::ioctl(self.in_r.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD");
        usize::try_from(n).expect("count")
    }

    /// Waits until exactly `left` input bytes remain in the pipe, then makes one round trip: the
    /// service handles input and exits on one thread, so the state it read is committed by then.
    fn settle_input(&self, left: usize) {
        let deadline = Instant::now() + T;
        while self.input_unread() != left {
            assert!(Instant::now() < deadline, "service left {} bytes unread, expected {left}", self.input_unread());
            std::thread::sleep(Duration::from_millis(1));
        }
        // Back-pressure: the count must stay put, not creep down.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(self.input_unread(), left, "service kept reading past its bound");
        self.inb(LSR);
    }

    /// Reads RBR while LSR says data is ready (bounded by `max`).
    fn drain_rx(&self, max: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < max && self.inb(LSR) & 1 == 1 {
            got.push(self.inb(RBR));
        }
        got
    }

    /// Every register the guest can read without side effects, plus the divisor latch.
    fn registers(&self) -> Vec<(&'static str, u8)> {
        let lcr = self.inb(LCR);
        self.outb(LCR, lcr | 0x80);
        let (dll, dlm) = (self.inb(DLL), self.inb(DLM));
        self.outb(LCR, lcr);
        vec![
            ("IER", self.inb(IER)),
            ("LCR", lcr),
            ("MCR", self.inb(MCR)),
            ("LSR", self.inb(LSR)),
            ("MSR", self.inb(MSR)),
            ("SCR", self.inb(SCR)),
            ("DLL", dll),
            ("DLM", dlm),
        ]
    }

    fn read_output(&mut self, n: usize) -> Vec<u8> {
        read_pipe(&mut self.out_r, n, T)
    }

    fn program(&self) {
        self.outb(LCR, 0x80); // DLAB
        self.outb(DLL, 0x01); // 115200 baud
        self.outb(DLM, 0x00);
        self.outb(LCR, 0x03); // 8N1, DLAB off
        self.outb(IER, 0x01); // received-data interrupt
        self.outb(SCR, 0x5a);
        self.outb(MCR, 0x0b); // DTR, RTS, OUT2
    }

    fn irq_count(&self) -> u64 {
        match self.irq.read() {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("irqfd: {e}"),
        }
    }

    fn shutdown(mut self) {
        self.svc.as_mut().expect("instance").shutdown(T);
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| u8::try_from((i * 7 + i / 251) % 256).expect("byte")).collect()
}

#[test]
fn registers_fifo_and_pending_input_survive_sigkill() {
    let mut rig = Rig::new();
    rig.start();
    rig.program();
    let input = pattern(200);
    rig.in_w.write_all(&input).expect("feed");
    rig.settle_input(0);
    // The guest reads 10 bytes: 54 stay in the FIFO, 136 wait in the service.
    let first = rig.drain_rx(10);
    assert_eq!(first, input[..10]);
    let before = rig.registers();
    assert_eq!(
        before,
        [
            ("IER", 0x01),
            ("LCR", 0x03),
            ("MCR", 0x0b),
            ("LSR", 0x61),
            ("MSR", 0xb0),
            ("SCR", 0x5a),
            ("DLL", 1),
            ("DLM", 0)
        ]
    );
    let _ = rig.irq_count();

    rig.sigkill();
    rig.start();
    // The restored state has the received-data interrupt pending and enabled: raised once.
    assert!(wait::wait_readable(borrow(&rig.irq), T).expect("poll"), "restored interrupt not raised");
    assert_eq!(rig.irq_count(), 1, "restored interrupt raised exactly once");
    assert_eq!(rig.inb(IIR), 0xc4, "IIR: received data pending (16550A FIFO bits)");
    assert_eq!(rig.registers(), before);
    let rest = rig.drain_rx(1000);
    assert_eq!(rest.len(), 190, "unread bytes after restart");
    assert_eq!(rest, input[10..], "unread input delivered in order, once");
    // The kept input and output fds still work with the new instance.
    rig.in_w.write_all(b"tail").expect("feed");
    rig.settle_input(0);
    assert_eq!(rig.drain_rx(10), b"tail");
    rig.outb(COM1, b'!');
    assert_eq!(rig.read_output(1), b"!");
    rig.shutdown();
}

#[test]
fn bounded_pending_input_survives_repeated_kills() {
    let mut rig = Rig::new();
    rig.start();
    rig.program();
    let input = pattern(3000);
    rig.in_w.write_all(&input).expect("feed");
    // FIFO + pending buffer full; the rest stays in the pipe (back-pressure, nothing dropped).
    let bound = MAX_UART_FIFO + MAX_UART_PENDING;
    rig.settle_input(input.len() - bound);
    let mut got = Vec::new();
    for round in 0..6 {
        got.extend(rig.drain_rx(100 + round * 37));
        rig.settle_input(input.len().saturating_sub(got.len() + bound));
        rig.sigkill();
        rig.start();
        assert_eq!(rig.inb(SCR), 0x5a, "round {round}: SCR");
    }
    got.extend(rig.drain_rx(input.len()));
    while got.len() < input.len() {
        rig.settle_input(input.len().saturating_sub(got.len() + bound));
        let more = rig.drain_rx(input.len());
        assert!(!more.is_empty(), "input stalled after {} bytes", got.len());
        got.extend(more);
    }
    assert_eq!(got.len(), input.len());
    assert!(got == input, "input lost, reordered or duplicated across kills");
    rig.shutdown();
}

#[test]
fn corrupted_region_gives_a_fresh_uart_and_a_live_service() {
    let mut rig = Rig::new();
    rig.start();
    rig.program();
    rig.sigkill();
    // Flip a payload byte of both slots: each committed slot now fails its checksum.
    rig.state.corrupt_byte(SLOT_HEADER_LEN + 4, 0x20);
    rig.state.corrupt_byte(SLOT_LEN + SLOT_HEADER_LEN + 4, 0x20);
    rig.start();
    assert!(rig.alive(), "service died on a corrupt region");
    // The instance refused the region and cleared it.
    let mut view = StateRegion::from_fd(rig.state.fd().try_clone_to_owned().expect("dup")).expect("map");
    assert!(matches!(view.load(DeviceKind::Uart), Ok(Loaded::Fresh)), "corrupt region not cleared");
    assert_eq!(
        rig.registers(),
        [("IER", 0), ("LCR", 0x03), ("MCR", 0x08), ("LSR", 0x60), ("MSR", 0xb0), ("SCR", 0), ("DLL", 0x0c), ("DLM", 0)],
        "fresh 16550 after reset"
    );
    // The fresh UART commits again (two LCR writes above, then this one).
    rig.outb(SCR, 0x33);
    assert!(matches!(view.load(DeviceKind::Uart), Ok(Loaded::Saved { generation: 3, .. })));
    // Still a working console.
    rig.outb(COM1, b'k');
    assert_eq!(rig.read_output(1), b"k");
    rig.in_w.write_all(b"in").expect("feed");
    rig.settle_input(0);
    assert_eq!(rig.drain_rx(10), b"in");
    rig.sigkill();
    rig.start();
    assert_eq!(rig.inb(SCR), 0x33, "state kept again after the fresh start");
    rig.shutdown();
}
