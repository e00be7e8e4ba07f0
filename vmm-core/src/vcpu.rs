//! vCPU threads: KVM exits become a small enum this crate owns ([`Exit`]), a free function
//! ([`handle_exit`]) dispatches them to the buses, and the run loop is a two-state machine
//! (running → stopped) that knows no device.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::Bus;
use crate::control::{StopHandle, StopReason};

/// Up to 8 bytes of access data, copied out of `kvm_run` before anyone looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessData {
    len: u8,
    bytes: [u8; 8],
}

impl AccessData {
    /// Copies `data`, which KVM bounds to 8 bytes; anything longer is truncated to 8.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        Self { len: u8::try_from(n).unwrap_or(8), bytes }
    }

    /// A zeroed buffer of `len` bytes (at most 8).
    pub fn zeroed(len: usize) -> Self {
        Self::from_slice(&[0u8; 8][..len.min(8)])
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[..usize::from(self.len)]
    }
}

/// A vCPU exit, translated at the KVM boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Port read of `len` bytes.
    PioRead {
        /// Port.
        port: u16,
        /// Access size.
        len: u8,
    },
    /// Port write.
    PioWrite {
        /// Port.
        port: u16,
        /// Data written.
        data: AccessData,
    },
    /// MMIO read of `len` bytes.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access size.
        len: u8,
    },
    /// MMIO write.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Data written.
        data: AccessData,
    },
    /// HLT reached user space (only without an in-kernel irqchip).
    Halt,
    /// Triple fault.
    Shutdown,
    /// A KVM system event (`KVM_SYSTEM_EVENT_*`).
    SystemEvent(u32),
    /// KVM failed to emulate or enter (internal error / failed entry).
    Failure(String),
    /// KVM_RUN was interrupted (a kick): nothing to do but look at the stop flag.
    Interrupted,
    /// Anything else: not expected with our VM set-up.
    Other(String),
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest.
    Resume,
    /// Resume the guest, handing it these bytes for its read.
    ResumeWithRead(AccessData),
    /// Stop the VM.
    Stop(StopReason),
}

/// Translates a KVM exit into an [`Exit`], copying its data.
pub fn translate(exit: &VcpuExit<'_>) -> Exit {
    match exit {
        VcpuExit::IoIn(port, data) => Exit::PioRead { port: *port, len: len8(data.len()) },
        VcpuExit::IoOut(port, data) => Exit::PioWrite { port: *port, data: AccessData::from_slice(data) },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr: *addr, len: len8(data.len()) },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr: *addr, data: AccessData::from_slice(data) },
        VcpuExit::Hlt => Exit::Halt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(*kind),
        VcpuExit::InternalError => Exit::Failure("KVM internal error (emulation failure)".into()),
        VcpuExit::FailEntry(reason, cpu) => Exit::Failure(format!("VM entry failed: reason {reason:#x} on cpu {cpu}")),
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Other(format!("{other:?}")),
    }
}

fn len8(n: usize) -> u8 {
    u8::try_from(n.min(8)).unwrap_or(8)
}

/// The port-I/O and MMIO buses a vCPU dispatches to.
#[derive(Clone, Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// MMIO.
    pub mmio: Bus,
}

/// Dispatches one exit. Pure apart from the devices it calls: unit-testable with synthetic exits.
pub fn handle_exit(exit: &Exit, buses: &Buses) -> Outcome {
    match exit {
        Exit::PioRead { port, len } => {
            let mut data = AccessData::zeroed(usize::from(*len));
            buses.pio.read(u64::from(*port), data.as_mut_slice());
            Outcome::ResumeWithRead(data)
        }
        Exit::PioWrite { port, data } => {
            buses.pio.write(u64::from(*port), data.as_slice());
            Outcome::Resume
        }
        Exit::MmioRead { addr, len } => {
            let mut data = AccessData::zeroed(usize::from(*len));
            buses.mmio.read(*addr, data.as_mut_slice());
            Outcome::ResumeWithRead(data)
        }
        Exit::MmioWrite { addr, data } => {
            buses.mmio.write(*addr, data.as_slice());
            Outcome::Resume
        }
        Exit::Interrupted => Outcome::Resume,
        Exit::Halt => Outcome::Stop(StopReason::Halted),
        Exit::Shutdown => Outcome::Stop(StopReason::TripleFault),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Outcome::Stop(StopReason::SystemEvent("shutdown")),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET) => Outcome::Stop(StopReason::SystemEvent("reset")),
        Exit::SystemEvent(other) => Outcome::Stop(StopReason::InternalError(format!("unknown system event {other}"))),
        Exit::Failure(why) => Outcome::Stop(StopReason::InternalError(why.clone())),
        Exit::Other(what) => Outcome::Stop(StopReason::InternalError(format!("unexpected exit {what}"))),
    }
}

/// The signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) handler for [`kick_signal`]: its only job is to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), on_kick)
}

/// State of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stopped,
}

/// Runs vCPU `index` until the VM stops. Reports why through `stop` when it is the one that stops it.
pub fn run(index: usize, mut vcpu: VcpuFd, buses: Arc<Buses>, stop: StopHandle) {
    // The thread's seccomp filter, before its first KVM_RUN: KVM_RUN, the rings' doorbells and
    // little else (policies/json/vcpu.json; a mismatch kills the process). Never run without it.
    if let Err(e) = bulkhead_policies::install(bulkhead_policies::Policy::CoreVcpu) {
        stop.stop(StopReason::InternalError(format!("vcpu{index}: loading its seccomp filter failed: {e}")));
        return;
    }
    let mut state = State::Running;
    let mut exits: u64 = 0;
    while state == State::Running {
        if stop.is_stopping() {
            state = State::Stopped;
            continue;
        }
        let outcome = match vcpu.run() {
            Ok(mut exit) => {
                exits += 1;
                let translated = translate(&exit);
                let outcome = handle_exit(&translated, &buses);
                if let Outcome::ResumeWithRead(read) = &outcome {
                    match &mut exit {
                        VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => {
                            let n = data.len().min(read.as_slice().len());
                            data[..n].copy_from_slice(&read.as_slice()[..n]);
                        }
                        _ => {}
                    }
                }
                outcome
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Outcome::Resume
            }
            Err(e) => Outcome::Stop(StopReason::InternalError(format!("KVM_RUN failed: {e}"))),
        };
        if let Outcome::Stop(reason) = outcome {
            log::debug!("vcpu{index}: stopping after {exits} exits: {reason}");
            stop.stop(reason);
            state = State::Stopped;
        }
    }
    log::debug!("vcpu{index}: thread exits ({exits} exits)");
}

/// Kicks every vCPU thread until it has exited, then joins it. Bounded: gives up on a thread after
/// `tries` kicks 10 ms apart and reports it.
pub fn kick_and_join(threads: Vec<JoinHandle<()>>, tries: u32) -> usize {
    use vmm_sys_util::signal::Killable;
    let mut stuck = 0;
    for t in threads {
        let mut n = 0;
        while !t.is_finished() && n < tries {
            let _ = t.kill(kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(10));
            n += 1;
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            stuck += 1;
        }
    }
    stuck
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    struct Echo(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Echo {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from(offset + i as u64).unwrap_or(0xee);
            }
        }
        fn write(&self, base: u64, offset: u64, data: &[u8]) {
            self.0.lock().expect("lock").push((base + offset, data.to_vec()));
        }
    }

    fn buses() -> (Buses, Arc<Echo>) {
        let dev = Arc::new(Echo(Mutex::new(Vec::new())));
        let mut b = Buses::default();
        b.pio.insert(0x3f8, 8, dev.clone()).expect("pio");
        b.mmio.insert(0xd000_0000, 0x1000, dev.clone()).expect("mmio");
        (b, dev)
    }

    #[test]
    fn pio_read_and_write_reach_the_device() {
        let (b, dev) = buses();
        assert_eq!(
            handle_exit(&Exit::PioRead { port: 0x3fa, len: 2 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[2, 3]))
        );
        let out = Exit::PioWrite { port: 0x3f8, data: AccessData::from_slice(b"A") };
        assert_eq!(handle_exit(&out, &b), Outcome::Resume);
        assert_eq!(dev.0.lock().expect("lock")[0], (0x3f8, b"A".to_vec()));
    }

    #[test]
    fn unmapped_port_reads_all_ones() {
        let (b, _) = buses();
        assert_eq!(
            handle_exit(&Exit::PioRead { port: 0x2f8, len: 1 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[0xff]))
        );
        assert_eq!(
            handle_exit(&Exit::PioWrite { port: 0x2f8, data: AccessData::from_slice(&[1]) }, &b),
            Outcome::Resume
        );
    }

    #[test]
    fn mmio_dispatch() {
        let (b, dev) = buses();
        assert_eq!(
            handle_exit(&Exit::MmioRead { addr: 0xd000_0010, len: 4 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[0x10, 0x11, 0x12, 0x13]))
        );
        handle_exit(&Exit::MmioWrite { addr: 0xd000_0070, data: AccessData::from_slice(&[1, 0, 0, 0]) }, &b);
        assert_eq!(dev.0.lock().expect("lock")[0].0, 0xd000_0070);
    }

    #[test]
    fn stops() {
        let (b, _) = buses();
        assert_eq!(handle_exit(&Exit::Shutdown, &b), Outcome::Stop(StopReason::TripleFault));
        assert_eq!(
            handle_exit(&Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET), &b),
            Outcome::Stop(StopReason::SystemEvent("reset"))
        );
        assert!(matches!(handle_exit(&Exit::Failure("x".into()), &b), Outcome::Stop(StopReason::InternalError(_))));
        assert!(matches!(handle_exit(&Exit::SystemEvent(99), &b), Outcome::Stop(StopReason::InternalError(_))));
        assert_eq!(handle_exit(&Exit::Interrupted, &b), Outcome::Resume);
    }

    #[test]
    fn access_data_bounds() {
        assert_eq!(AccessData::from_slice(&[1; 12]).as_slice().len(), 8);
        assert_eq!(AccessData::zeroed(3).as_slice(), &[0, 0, 0]);
    }
}
