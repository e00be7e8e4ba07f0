//! Spawns the real `bulkhead-console` and drives it through the ring exactly as the core does.

mod support;
use support::*;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ipc::control::{DeviceConfig, FdRole};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::wait;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const COM1: u64 = 0x3f8;
const T: Duration = Duration::from_secs(2);

struct Svc {
    _serial: MutexGuard<'static, ()>,
    svc: Instance,
    out: File,
    input: Option<File>,
    irq: EventFd,
}

fn spawn(with_input: bool) -> Svc {
    let serial = one_at_a_time();
    let (out_r, out_w) = nix::unistd::pipe().expect("pipe");
    let (in_r, in_w) = nix::unistd::pipe().expect("pipe");
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut fds = vec![(FdRole::Output, out_w.as_fd()), (FdRole::Irq, borrow(&irq))];
    if with_input {
        fds.push((FdRole::Input, in_r.as_fd()));
    }
    let svc = Instance::start(
        env!("CARGO_BIN_EXE_bulkhead-console"),
        "console-test",
        StderrTo::Inherit,
        &fds,
        DeviceConfig::Console { base: 0x3f8, len: 8 },
    );
    Svc { _serial: serial, svc, out: File::from(out_r), input: with_input.then(|| File::from(in_w)), irq }
}

impl Svc {
    fn inb(&self, port: u64) -> u8 {
        self.svc.inb(port)
    }

    fn outb(&self, port: u64, v: u8) {
        self.svc.outb(port, v);
    }

    fn read_output(&mut self, n: usize) -> Vec<u8> {
        read_pipe(&mut self.out, n, T)
    }

    fn shutdown(mut self) {
        self.svc.shutdown(T);
    }
}

#[test]
fn thr_bytes_reach_the_output_fd() {
    let mut s = spawn(false);
    for b in b"hi\n" {
        s.outb(COM1, *b);
    }
    assert_eq!(s.read_output(3), b"hi\n");
    s.shutdown();
}

#[test]
fn lsr_and_iir_after_reset() {
    let s = spawn(false);
    assert_eq!(s.inb(COM1 + 5), 0x60, "LSR: THR empty, transmitter empty");
    assert_eq!(s.inb(COM1 + 2) & 0x0f, 0x01, "IIR: no interrupt pending");
    s.outb(COM1 + 7, 0x5a);
    assert_eq!(s.inb(COM1 + 7), 0x5a, "scratch register");
    s.shutdown();
}

#[test]
fn input_reaches_rbr_and_raises_irq() {
    let mut s = spawn(true);
    s.outb(COM1 + 1, 0x01); // IER: received-data interrupt
    s.input.as_mut().expect("input").write_all(b"abc").expect("feed");
    assert!(wait::wait_readable(borrow(&s.irq), T).expect("poll"), "irqfd did not fire");
    assert!(s.irq.read().expect("irq count") >= 1);
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    while got.len() < 3 && Instant::now() < deadline {
        if s.inb(COM1 + 5) & 1 == 1 {
            got.push(s.inb(COM1));
        }
    }
    assert_eq!(got, b"abc");
    assert_eq!(s.inb(COM1 + 5) & 1, 0, "FIFO drained");
    s.shutdown();
}

#[test]
fn large_input_is_not_dropped_and_eof_does_not_exit() {
    let mut s = spawn(true);
    let data: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut input = s.input.take().expect("input");
    input.write_all(&data).expect("feed");
    drop(input); // EOF
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < data.len() && Instant::now() < deadline {
        if s.inb(COM1 + 5) & 1 == 1 {
            got.push(s.inb(COM1));
        }
    }
    assert_eq!(got.len(), data.len());
    assert_eq!(got, data);
    std::thread::sleep(Duration::from_millis(50));
    assert!(s.svc.is_running(), "console exited on input EOF");
    s.outb(COM1, b'!');
    assert_eq!(s.read_output(1), b"!");
    s.shutdown();
}

#[test]
fn out_of_range_and_bad_sizes_are_rejected() {
    let s = spawn(false);
    for req in [
        ExitRequest::read(ExitKind::PioRead, 0x400, 1),
        ExitRequest::read(ExitKind::PioRead, 0x3f7, 1),
        ExitRequest::read(ExitKind::PioRead, 0x3ff, 2),
        ExitRequest::read(ExitKind::PioRead, 0x3f8, 2),
        ExitRequest::read(ExitKind::MmioRead, 0x3f8, 1),
    ] {
        let r = s.svc.core.call(&req, T).expect("call");
        assert_eq!(r.status, Status::Rejected, "{req:?}");
        assert_eq!(r.data, [0xff; 8]);
    }
    // Still serving after rejections.
    assert_eq!(s.inb(COM1 + 5), 0x60);
    s.shutdown();
}

#[test]
fn ping_reports_stats_and_only_needed_fds_are_open() {
    let s = spawn(true);
    for _ in 0..10 {
        s.inb(COM1 + 5);
    }
    let _ = s.svc.core.call(&ExitRequest::read(ExitKind::PioRead, 0x500, 1), T).expect("call");
    let stats = s.svc.ping(42, T);
    assert_eq!(stats.requests, 11);
    assert_eq!(stats.rejected, 1);
    // stdio, control, ring memfd, two doorbells, output, input, irq.
    let n = std::fs::read_dir(format!("/proc/{}/fd", s.svc.child.id())).expect("proc").count();
    assert_eq!(n, 10, "service holds fds it does not need");
    s.shutdown();
}

#[test]
fn serves_back_to_back_without_sleeping() {
    let s = spawn(false);
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        s.inb(COM1 + 5);
    }
    let per = t.elapsed() / n;
    let stats = s.svc.ping(1, T);
    eprintln!("forwarded inb: {per:?} per round trip, service slept {} times", stats.sleeps);
    // Requests back to back keep the service spinning: far fewer sleeps than requests. When
    // other work on these 2 cores preempts the spinners, round trips exceed the 200 µs idle spin
    // and sleeping is the right thing to do, so only check when the machine let us run.
    if per < Duration::from_micros(50) {
        assert!(stats.sleeps < u64::from(n) / 10, "service slept {} times", stats.sleeps);
    } else {
        eprintln!("machine busy ({per:?} per round trip): not checking the sleep count");
    }
    s.shutdown();
}

#[test]
fn idle_spin_is_reported_and_excludes_sleep() {
    let s = spawn(false);
    let t = Instant::now();
    for _ in 0..50 {
        s.inb(COM1 + 5);
    }
    // Long past the idle spin: the service spun after the last request, then slept.
    std::thread::sleep(Duration::from_millis(100));
    let first = s.svc.ping(1, T);
    let wall = u64::try_from(t.elapsed().as_nanos()).expect("ns");
    assert!(first.sleeps > 0, "the service never slept: {first:?}");
    // Time asleep is not spin: a second look after 300 ms more of sleep adds nothing (a ping
    // wakes the service but is no request, so it does not start a spin).
    std::thread::sleep(Duration::from_millis(300));
    let second = s.svc.ping(2, T);
    assert_eq!(second.idle_spin_ns, first.idle_spin_ns, "sleep counted as spin");
    // Wall time in the spin, never more than the wall time that passed.
    assert!(first.idle_spin_ns <= wall, "{} ns of spin in {wall} ns", first.idle_spin_ns);
    s.shutdown();
}

#[test]
fn garbage_setup_makes_service_exit_nonzero() {
    let (mut child, ctl) = spawn_service(env!("CARGO_BIN_EXE_bulkhead-console"), &["--control-fd", "3"], true);
    ctl.send_raw(&[9, 9, 9, 9, 9]).expect("garbage");
    let st = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(st.code(), Some(1));
}
