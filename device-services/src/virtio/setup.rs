//! The set-up every virtio-mmio service binary shares: check the window the core assigned, take
//! guest RAM, the irqfd and the queue-notify eventfds from the set-up message, and attach the state
//! region when the core passed one. The device-specific part (its own fd, its config) stays in the
//! binary.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::rc::Rc;

use bulkhead_policies::Policy;
use ipc::control::{FdRole, MemoryRegion};
use ipc::state::StateRegion;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, MIN_WINDOW};
use super::VirtioDevice;
use crate::memory::{map_guest_memory, memory_fds, GuestMem};
use crate::runtime::{error_chain, RuntimeError, Startup};

/// Guest RAM and the eventfds a virtio transport is built from.
pub struct TransportFds {
    /// Guest RAM, mapped from the core's memfd.
    pub mem: GuestMem,
    /// The irqfd.
    pub irq: EventFd,
    /// One ioeventfd per queue, in queue order.
    pub notify: Vec<EventFd>,
}

/// Refuses a window shorter than the register file or one that wraps.
pub fn check_window(base: u64, len: u64) -> Result<(), RuntimeError> {
    if len < MIN_WINDOW || base.checked_add(len).is_none() {
        return Err(RuntimeError::WrongDevice(format!("MMIO window {base:#x}+{len:#x}")));
    }
    Ok(())
}

/// Takes guest RAM (mapped over `memory`), the irqfd and the queue-notify eventfds of queues
/// `0..max_queues` (the first missing one ends the list; a gap after a present one is an error).
pub fn take_transport_fds(
    st: &mut Startup,
    memory: &[MemoryRegion],
    max_queues: u16,
) -> Result<TransportFds, RuntimeError> {
    let memfd = st.take_fd(FdRole::GuestMemory).ok_or(RuntimeError::MissingFd(FdRole::GuestMemory))?;
    let irq = st.take_eventfd(FdRole::Irq).ok_or(RuntimeError::MissingFd(FdRole::Irq))?;
    let mut notify = Vec::new();
    for i in 0..max_queues {
        match st.take_eventfd(FdRole::QueueNotify(i)) {
            Some(e) => notify.push(e),
            None if notify.is_empty() => break,
            None => return Err(RuntimeError::MissingFd(FdRole::QueueNotify(i))),
        }
    }
    let mem = map_guest_memory(memfd, memory).map_err(|e| RuntimeError::Device(error_chain(&e)))?;
    Ok(TransportFds { mem, irq, notify })
}

/// Builds the transport around `device` and attaches the state region if the core passed one.
pub fn transport<D: VirtioDevice>(
    st: &mut Startup,
    device: D,
    fds: TransportFds,
) -> Result<MmioTransport<D>, RuntimeError> {
    let device_error = |e: &dyn std::error::Error| RuntimeError::Device(error_chain(e));
    let mut transport = MmioTransport::new(device, fds.mem, fds.notify, fds.irq).map_err(|e| device_error(&e))?;
    if let Some(fd) = st.take_fd(FdRole::StateRegion) {
        let region = StateRegion::from_fd(fd).map_err(|e| device_error(&e))?;
        transport.attach_state(region).map_err(|e| device_error(&e))?;
    }
    Ok(transport)
}

/// A transport with the window it serves: `(transport, base, length)`.
pub type Placed<D> = (MmioTransport<D>, u64, u64);

/// What a virtio service binary supplies to [`run_service`]: its name, its seccomp policy, its
/// device-specific set-up, and how to reach the device's back-end fds and counters. The
/// transport itself is the handler the runtime serves (`VirtioDevice` hooks add what a device
/// needs beyond its queues).
pub struct ServiceParts<D, S> {
    /// Binary name, for log lines (`bulkhead-net`).
    pub name: &'static str,
    /// The seccomp policy installed before any guest data is read.
    pub policy: Policy,
    /// What the device redoes after a restart, for the log (`request(s)`, `chain(s)`).
    pub redone_what: &'static str,
    /// Builds the transport from the set-up message: `(transport, window base, window length)`.
    pub setup: fn(&mut Startup) -> Result<Placed<D>, RuntimeError>,
    /// The device's back-end fds (disk and its flush witness, TAP), kept through the jail.
    pub backend_fds: fn(&D) -> Vec<RawFd>,
    /// The device's counters, printed at exit.
    pub stats: fn(&D) -> Rc<Cell<S>>,
}

/// The life of a virtio service process after its arguments: set up (reporting a failure to the
/// core), jail keeping only the transport's, guest RAM's and the back end's fds, seccomp, resume
/// from the state region, serve until `Shutdown`, print the counters. Returns the exit code.
pub fn run_service<D: VirtioDevice, S: Copy + std::fmt::Display>(parts: &ServiceParts<D, S>) -> ExitCode {
    let name = parts.name;
    let run = || -> Result<(), RuntimeError> {
        let mut st = Startup::from_args(std::env::args().skip(1))?;
        let (mut transport, base, len) = match (parts.setup)(&mut st) {
            Ok(t) => t,
            Err(e) => {
                st.report_failure(&error_chain(&e));
                return Err(e);
            }
        };
        let mut keep = transport.raw_fds();
        keep.extend((parts.backend_fds)(transport.device()));
        keep.extend(memory_fds(transport.memory()));
        st.jail(&keep)?;
        // Last step of confinement, before any guest data is read.
        st.seccomp(parts.policy)?;
        transport.restore().log(name, parts.redone_what);
        let stats = (parts.stats)(transport.device());
        // After the requests in flight were redone: they are not charged again.
        transport.device().serving();
        let served = st.serve_mmio(transport, base, len);
        eprintln!("{name}[{}]: stats {}", std::process::id(), stats.get());
        served.map(|_| ())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}[{}]: {}", std::process::id(), error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
