//! The set-up every virtio-mmio service binary shares: check the window the core assigned, take
//! guest RAM, the irqfd and the queue-notify eventfds from the set-up message, and attach the state
//! region when the core passed one. The device-specific part (its own fd, its config) stays in the
//! binary.

use ipc::control::{FdRole, MemoryRegion};
use ipc::state::StateRegion;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, MIN_WINDOW};
use super::VirtioDevice;
use crate::memory::{map_guest_memory, GuestMem};
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
