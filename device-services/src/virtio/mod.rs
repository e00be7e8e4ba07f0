//! Virtio devices: the device-side trait and the virtio-mmio transport that every virtio service
//! (block now, net later) shares.
//!
//! A device implements [`VirtioDevice`]: identity, feature bits, config space, queue sizes, and
//! how to process one queue, and the few things a device adds to how it is served (a source of
//! work of its own, like the net device's TAP; rate limits; counters). [`mmio::MmioTransport`]
//! implements the virtio-mmio version 2 register file around it, owns the queues
//! (`virtio_queue::Queue`), the interrupt status and the irqfd, and is the one
//! [`crate::runtime::MmioHandler`] of every virtio service: no device wraps it, so no call of the
//! runtime can miss the transport.

pub mod block;
pub mod mmio;
pub mod net;
pub mod request;
pub mod setup;
pub mod tracked;

use std::os::fd::RawFd;
use std::time::Duration;

use ipc::control::{IoCounters, RateLimitUpdate};
pub use tracked::QueueCtx;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Errors a device reports while processing a queue. Any of them makes the transport set
/// `DEVICE_NEEDS_RESET` and stop using the device until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver broke the virtqueue protocol (bad ring index, head out of range, ring memory
    /// unusable).
    #[error("virtqueue {queue}: {what}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What was wrong.
        what: String,
        /// The crate's error, if one.
        #[source]
        source: Option<virtio_queue::Error>,
    },
    /// The device cannot run with the negotiated features or set-up.
    #[error("activation: {0}")]
    Activate(String),
}

/// Reads `data.len()` bytes at `offset` of a device's config space kept as bytes; false when any
/// of them is out of range (the usual [`VirtioDevice::read_config`]).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) -> bool {
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..o.checked_add(data.len())?)) else {
        return false;
    };
    data.copy_from_slice(src);
    true
}

/// A ready split queue of `size` (at most 16) with its descriptor table at 0, avail ring at
/// 0x1000 and used ring at 0x2000: the layout the devices' unit tests use.
#[cfg(test)]
pub(crate) fn test_queue(size: u16) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;
    let mut q = virtio_queue::Queue::new(16).expect("queue");
    q.try_set_size(size).expect("size");
    q.try_set_desc_table_address(GuestAddress(0)).expect("desc");
    q.try_set_avail_ring_address(GuestAddress(0x1000)).expect("avail");
    q.try_set_used_ring_address(GuestAddress(0x2000)).expect("used");
    q.set_ready(true);
    q
}

/// A virtio device behind a transport. Offsets into the config space are relative to its start.
pub trait VirtioDevice {
    /// Virtio device ID (2 = block, 1 = net).
    fn device_id(&self) -> u32;
    /// Feature bits the device offers (must include [`F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Maximum size of each queue (each a power of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads `data.len()` bytes of config space at `offset`; false if out of range.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool;
    /// Writes config space; false if out of range or read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// The driver set `DRIVER_OK` with `features` acknowledged. By default: refuse any feature the
    /// device did not offer.
    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        if features & !self.features() != 0 {
            return Err(DeviceError::Activate(format!("features {features:#x} not offered")));
        }
        Ok(())
    }
    /// Processes available chains of the queue (all of them, or at most the queue size), taking
    /// each with [`QueueCtx::pop`] and completing it with [`QueueCtx::add_used`] (which track it
    /// in the state region). Returns how many chains were completed.
    fn process_queue(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError>;
    /// The driver reset the device: forget negotiated state.
    fn reset(&mut self);
    /// Why a request is held by the device's error policy, once per hold: the service tells the
    /// core, which stops the VM. Devices that hold nothing return `None`.
    fn take_stop(&mut self) -> Option<String> {
        None
    }
    /// The VM was resumed: the hold ends. Returns where the held request is (queue, avail
    /// position, head): still in flight, the transport redoes it.
    fn release_held(&mut self) -> Option<(u16, u16, u16)> {
        None
    }
    /// Device-specific counts for an inspection report ([`ipc::control::VirtioReport::device`]):
    /// what the device holds that the rings do not show.
    fn report_counts(&self) -> std::collections::BTreeMap<String, u64> {
        std::collections::BTreeMap::new()
    }
    /// The transport is about to be served (restored, if it had saved state): start what runs
    /// on its own, such as the rate limiters' refill. Nothing by default.
    fn serving(&self) {}
    /// Work of the device's own, beside the driver's kicks: an fd to wait on and the queue to
    /// run when it is readable or while the service spins (net: the TAP and the RX queue, while
    /// RX buffers are held and tokens allow). Asked every iteration while the device runs;
    /// `None` (the default) when there is nothing to wait for now.
    fn own_work(&self) -> Option<(RawFd, usize)> {
        None
    }
    /// Requests waiting for rate-limit tokens: how long until some are due (the service sleeps
    /// no longer). `None` (the default): nothing waits.
    fn wake_after(&self) -> Option<Duration> {
        None
    }
    /// Whether chains left in the queues when the service is about to sleep wait for tokens
    /// (then they are no reason to stay awake: [`wake_after`](Self::wake_after) ends the sleep
    /// when they are due). False by default.
    fn pending_waits_for_tokens(&self) -> bool {
        false
    }
    /// The core replaced the rate limits. Returns false (the default) if this device has no
    /// limits of that kind.
    fn update_rate_limit(&mut self, _limits: &RateLimitUpdate) -> bool {
        false
    }
    /// The device's counters for the core's metrics; `None` (the default): the transport counts
    /// completed chains only.
    fn io_counters(&self) -> Option<IoCounters> {
        None
    }
}
