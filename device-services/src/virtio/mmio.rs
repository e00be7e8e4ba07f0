//! The virtio-mmio transport, version 2 (virtio 1.x, "non-legacy"), written once for every
//! virtio service.
//!
//! Register accesses arrive as forwarded MMIO exits (offsets relative to the window); queue kicks
//! arrive on ioeventfds the core registered on `QueueNotify` (or, as a fallback, as a forwarded
//! write to it). Interrupts are raised by writing the irqfd. Everything the driver writes is
//! validated: a register access of the wrong width or to an unknown offset, a queue set-up that
//! is misaligned, outside guest RAM, of a size that is not a power of two ≤ the maximum, or a
//! queue the device finds corrupt while processing makes the device set `DEVICE_NEEDS_RESET`,
//! raise a configuration-change interrupt (if the driver is running) and stop touching its queues
//! until the driver resets it. Nothing the driver does makes the service panic.
//!
//! While the service spins, [`MmioTransport::poll`](crate::runtime::MmioHandler::poll) looks at the
//! available rings directly and disables kicks (`VRING_USED_F_NO_NOTIFY`, or the `EVENT_IDX`
//! equivalent); they are re-enabled, with a final check, before it sleeps, on every queue every
//! time: with `EVENT_IDX` that moves `avail_event` to where the device now is. A queue can take
//! buffers outside the poll loop (a kick handled at once, or the net service's RX queue run
//! when its TAP is readable), and a driver does not kick for buffers it adds past a stale
//! `avail_event`: a queue left armed at an older position slept through them until the next
//! wake-up (the sleep slice, 1 s, at the latest, when the poll finds them).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipc::state::{
    decode_payload, encode_payload, DeviceKind, Loaded, QueueRegs, QueueWord, StateRegion, VirtioState,
    HOT_QUEUE_WORDS, MAX_ENTRIES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::tracked::{QueueCtx, Tracker};
use super::{VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::memory::GuestMem;
use ipc::control::{DeviceReport, IoCounters, QueueReport, RateLimitUpdate, VirtioReport};
use ipc::{Mirror, MirrorEntry};

use crate::runtime::{MmioHandler, RuntimeError};

/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Transport version (1.x, non-legacy).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver ("BLKH").
pub const VENDOR_ID: u32 = 0x484b_4c42;
/// Start of the device config space in the window.
pub const CONFIG_OFFSET: u64 = 0x100;
/// Smallest window the transport needs (registers plus 256 bytes of config space).
pub const MIN_WINDOW: u64 = 0x200;

/// Register offsets (from virtio-bindings' `virtio_mmio`, as window offsets).
pub mod reg {
    use virtio_bindings::virtio_mmio as m;

    /// MagicValue (R).
    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    /// Version (R).
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    /// DeviceFeatures (R).
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    /// Status (RW).
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    /// QueueDriverLow (W).
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    /// QueueDriverHigh (W).
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    /// QueueDeviceLow (W).
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    /// QueueDeviceHigh (W).
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
}

/// Device status bits (virtio-bindings' `virtio_config`).
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// DRIVER.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// DEVICE_NEEDS_RESET (set by the device).
    pub const NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// FAILED (set by the driver).
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer interrupts (honoured without
/// EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
const _: () = assert!(AVAIL_F_NO_INTERRUPT as u32 == virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT);
/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device declared an invalid queue size.
    #[error("queue {index}: invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The size.
        size: u16,
        /// The crate's refusal.
        #[source]
        source: virtio_queue::Error,
    },
    /// More ioeventfds than queues.
    #[error("{fds} queue-notify fds for {queues} queues")]
    TooManyNotifyFds {
        /// Fds given.
        fds: usize,
        /// Queues.
        queues: usize,
    },
    /// The device does not offer VERSION_1.
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// The queue geometry does not fit the state region's in-flight table.
    #[error("{queues} queues of up to {size} entries do not fit the state region")]
    StateGeometry {
        /// Queues.
        queues: usize,
        /// Largest queue size.
        size: u16,
    },
}

/// What [`MmioTransport::restore`] found in the state region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// No state region attached: a fresh device.
    NoRegion,
    /// The region was zero: a fresh device.
    Fresh,
    /// The saved state was restored.
    Resumed {
        /// Requests that were in flight and were redone.
        redone: u64,
    },
    /// The region failed validation: the device signals DEVICE_NEEDS_RESET.
    NeedsReset(String),
}

impl Restored {
    /// Says on stderr what a restore found, when it is worth saying (`what` names the unit that
    /// was redone: requests, chains).
    pub fn log(&self, service: &str, what: &str) {
        let pid = std::process::id();
        match self {
            Self::NoRegion | Self::Fresh => {}
            Self::Resumed { redone } => eprintln!("{service}[{pid}]: resumed from saved state, {redone} {what} redone"),
            Self::NeedsReset(why) => eprintln!("{service}[{pid}]: saved state refused ({why}): device needs reset"),
        }
    }
}

/// Queue addresses as the driver wrote them, applied when it sets QueueReady.
#[derive(Debug, Clone, Copy, Default)]
struct QueueAddrs {
    desc: u64,
    driver: u64,
    device: u64,
}

/// Counters of a transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Chains completed.
    pub completed: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Times the device marked itself as needing reset.
    pub needs_reset: u64,
}

/// A virtio device behind the virtio-mmio register file.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMem,
    queues: Vec<Queue>,
    addrs: Vec<QueueAddrs>,
    /// Whether kicks are currently enabled per queue (false while the service polls).
    notify_on: Vec<bool>,
    /// Per queue, the used index when this instance last decided to interrupt for it (for
    /// [`report`](Self::report): whether the driver was told of the latest used entries).
    notified_used: Vec<Option<u16>>,
    notify: Vec<EventFd>,
    irq: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq_failed: bool,
    complaints: u32,
    stats: TransportStats,
    /// The state region, if the core passed one.
    state: Option<StateRegion>,
    /// Cold state as last committed.
    saved: Option<VirtioState>,
    /// Hot word of each queue as last stored.
    words: Vec<QueueWord>,
    /// Next in-flight order counter per queue.
    orders: Vec<u32>,
    /// In-flight entries per queue (the largest queue size).
    stride: u16,
    /// Requests redone after a restart.
    redone: u64,
    /// Failed for good ([`enter_failed`](Self::enter_failed)): queues are never used again.
    failed: bool,
    /// The read mirror: InterruptStatus and Status rewritten in place before every interrupt.
    mirror: Option<Mirror>,
    /// Interrupt bits held back while the device restores ([`restore`](Self::restore)): raised
    /// on the first [`poll`](MmioHandler::poll), after the runtime has served the requests
    /// queued on the ring before this instance started (the previous instance's posted
    /// acknowledgements, which must not clear them).
    deferred_irq: Option<u32>,
    /// Interrupt bits raised since the runtime last reported the core's submission count
    /// ([`MmioHandler::work_done`]).
    raised: u32,
    /// Interrupts raised, each with the core's submission count read after it, oldest first
    /// (at most [`MAX_RAISES`]). An InterruptACK is posted: the guest read InterruptStatus, wrote
    /// the acknowledgement and went on to process its used rings while the write waited in the
    /// ring. An interrupt the device raised after the write was submitted (its count is above the
    /// write's ring position) was not in what the guest read: the write must not clear it, or
    /// the guest's handler for it would read 0 and skip the used ring, losing the completion.
    raises: std::collections::VecDeque<(u64, u32)>,
    /// The ring position of the request being served ([`MmioHandler::at_request`]).
    request_index: Option<u64>,
}

/// Most interrupt records kept for [`MmioTransport::raises`]; older ones are merged.
const MAX_RAISES: usize = 64;

/// Most complaints about driver errors logged (then silence).
const MAX_COMPLAINTS: u32 = 20;

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over guest memory `mem`, with one ioeventfd per queue in `notify`
    /// (index = queue; fewer is allowed: those queues are kicked through the forwarded register)
    /// and `irq` as its irqfd.
    pub fn new(device: D, mem: GuestMem, notify: Vec<EventFd>, irq: EventFd) -> Result<Self, TransportError> {
        if device.features() & F_VERSION_1 == 0 {
            return Err(TransportError::NoVersion1);
        }
        let sizes = device.queue_max_sizes();
        if notify.len() > sizes.len() {
            return Err(TransportError::TooManyNotifyFds { fds: notify.len(), queues: sizes.len() });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| Queue::new(size).map_err(|source| TransportError::QueueSize { index, size, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let n = queues.len();
        let stride = sizes.iter().copied().max().unwrap_or(0);
        Ok(Self {
            device,
            mem,
            queues,
            addrs: vec![QueueAddrs::default(); n],
            notify_on: vec![true; n],
            notified_used: vec![None; n],
            notify,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq_failed: false,
            complaints: 0,
            stats: TransportStats::default(),
            state: None,
            saved: None,
            words: vec![QueueWord::default(); n],
            orders: vec![0; n],
            stride,
            redone: 0,
            failed: false,
            mirror: None,
            deferred_irq: None,
            raised: 0,
            raises: std::collections::VecDeque::new(),
            request_index: None,
        })
    }

    /// Attaches the state region the device's state is kept in (call [`restore`](Self::restore)
    /// next, once confined, before serving).
    pub fn attach_state(&mut self, region: StateRegion) -> Result<(), TransportError> {
        let n = self.queues.len();
        if n > HOT_QUEUE_WORDS || n * usize::from(self.stride) > MAX_ENTRIES {
            return Err(TransportError::StateGeometry { queues: n, size: self.stride });
        }
        self.state = Some(region);
        Ok(())
    }

    /// Requests redone after a restart.
    pub fn redone(&self) -> u64 {
        self.redone
    }

    /// Why the device holds a request and wants the VM stopped ([`VirtioDevice::take_stop`]).
    pub fn take_stop(&mut self) -> Option<String> {
        self.device.take_stop()
    }

    /// The VM was resumed: a request the device held is redone now, from its avail position (it
    /// stayed in flight, so the state region still records it), and the queue carries on.
    pub fn resume_held(&mut self) {
        let Some((q, pos, head)) = self.device.release_held() else { return };
        let i = usize::from(q);
        if !self.running() || i >= self.queues.len() || !self.queues[i].ready() {
            return;
        }
        let resume = self.queues[i].next_avail();
        self.run_queue(i, Some((VecDeque::from([(pos, head)]), resume)));
        // Whatever arrived meanwhile.
        self.run_queue(i, None);
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::Virtio(u8::try_from(self.device.device_id()).unwrap_or(u8::MAX))
    }

    fn snapshot(&self) -> VirtioState {
        VirtioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            entry_stride: self.stride,
            config_digest: self.config_digest(),
            queues: self
                .queues
                .iter()
                .zip(&self.addrs)
                .map(|(q, a)| QueueRegs {
                    size: q.size(),
                    ready: q.ready(),
                    desc: a.desc,
                    driver: a.driver,
                    device: a.device,
                })
                .collect(),
        }
    }

    /// FNV-1a over the device's configuration space (the bytes it answers, at most 256).
    fn config_digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for off in 0..256u64 {
            let mut b = [0u8];
            if !self.device.read_config(off, &mut b) {
                break;
            }
            h = (h ^ u64::from(b[0])).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// Commits the cold state if it changed since the last commit.
    fn persist(&mut self) {
        if self.state.is_none() {
            return;
        }
        let snap = self.snapshot();
        if self.saved.as_ref() == Some(&snap) {
            return;
        }
        let kind = self.kind();
        let r = encode_payload(&snap).and_then(|p| match self.state.as_mut() {
            Some(st) => st.store(kind, &p),
            None => Ok(0),
        });
        match r {
            Ok(_) => self.saved = Some(snap),
            Err(e) => {
                if self.complaints < MAX_COMPLAINTS {
                    self.complaints += 1;
                    eprintln!("virtio-mmio: saving device state failed: {e}");
                }
            }
        }
    }

    /// Restores the device from the state region (after a restart of the service): registers,
    /// negotiated features, queues, then redoes the requests that were in flight, in order, and
    /// raises the interrupt once. A region that fails validation leaves the device in
    /// DEVICE_NEEDS_RESET with a configuration-change interrupt. Reads guest memory (the rings):
    /// call it once confined.
    pub fn restore(&mut self) -> Restored {
        let Some(st) = self.state.as_mut() else { return Restored::NoRegion };
        // Interrupts raised from here on wait for the first poll (see `deferred_irq`).
        self.deferred_irq = Some(0);
        let kind = DeviceKind::Virtio(u8::try_from(self.device.device_id()).unwrap_or(u8::MAX));
        let loaded = st.load(kind);
        let saved = match loaded {
            Ok(Loaded::Fresh) => {
                st.clear_hot();
                return Restored::Fresh;
            }
            Ok(Loaded::Saved { payload, .. }) => decode_payload::<VirtioState>(&payload),
            Err(e) => Err(e),
        };
        let config_changed = saved.as_ref().is_ok_and(|s| s.config_digest != self.config_digest());
        let result = match saved {
            Ok(s) => self.apply(&s).and_then(|()| self.recover_queues()),
            Err(e) => Err(format!("{e}")),
        };
        match result {
            Ok(redo) => {
                self.saved = Some(self.snapshot());
                let mut redone = 0;
                for (i, list, resume) in redo {
                    redone += list.len() as u64;
                    self.run_queue(i, Some((list, resume)));
                }
                self.redone += redone;
                if self.status & status::DRIVER_OK != 0 {
                    // Interrupts the dead instance may not have raised: one (maybe spurious) now.
                    for (n, q) in self.notified_used.iter_mut().zip(&self.queues) {
                        *n = q.ready().then(|| q.next_used());
                    }
                    self.signal(INT_VRING);
                    if config_changed {
                        // A new medium (the core swapped the image): the driver re-reads the
                        // configuration, as after a capacity change on real hardware.
                        self.config_generation = self.config_generation.wrapping_add(1);
                        self.signal(INT_CONFIG);
                        eprintln!("virtio-mmio: configuration changed since the last instance: configuration-change interrupt");
                    }
                }
                Restored::Resumed { redone }
            }
            Err(why) => {
                eprintln!("virtio-mmio: saved device state refused, device needs reset: {why}");
                self.reset();
                self.status = status::NEEDS_RESET;
                self.stats.needs_reset += 1;
                if let Some(st) = self.state.as_mut() {
                    st.clear();
                }
                self.saved = None;
                self.signal(INT_CONFIG);
                self.persist();
                Restored::NeedsReset(why)
            }
        }
    }

    /// Applies and validates the cold state.
    fn apply(&mut self, s: &VirtioState) -> Result<(), String> {
        const KNOWN: u32 = status::ACKNOWLEDGE
            | status::DRIVER
            | status::DRIVER_OK
            | status::FEATURES_OK
            | status::NEEDS_RESET
            | status::FAILED;
        if s.status & !KNOWN != 0 {
            return Err(format!("status {:#x}", s.status));
        }
        if s.status & status::DRIVER_OK != 0 && s.status & status::FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let offered = self.device.features();
        if s.status & status::FEATURES_OK != 0
            && (s.driver_features & !offered != 0 || s.driver_features & F_VERSION_1 == 0)
        {
            return Err(format!("negotiated features {:#x} not offered", s.driver_features));
        }
        if s.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(format!("interrupt status {:#x}", s.interrupt_status));
        }
        if s.entry_stride != self.stride || s.queues.len() != self.queues.len() {
            return Err("queue geometry differs".into());
        }
        let event_idx = s.driver_features & F_EVENT_IDX != 0;
        for (i, r) in s.queues.iter().enumerate() {
            let q = &mut self.queues[i];
            q.reset();
            q.try_set_size(r.size).map_err(|e| format!("queue {i}: size {}: {e}", r.size))?;
            self.addrs[i] = QueueAddrs { desc: r.desc, driver: r.driver, device: r.device };
            if r.ready {
                q.try_set_desc_table_address(GuestAddress(r.desc))
                    .and_then(|()| q.try_set_avail_ring_address(GuestAddress(r.driver)))
                    .and_then(|()| q.try_set_used_ring_address(GuestAddress(r.device)))
                    .map_err(|e| format!("queue {i}: {e}"))?;
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i}: rings not inside guest RAM"));
                }
            }
            if s.status & status::DRIVER_OK != 0 {
                q.set_event_idx(event_idx);
            }
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if s.status & status::DRIVER_OK != 0 {
            self.device.activate(s.driver_features).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Validates the hot words and in-flight entries against the guest's used rings; returns
    /// per queue the requests to redo (avail position, head; oldest first) and where to resume.
    #[allow(clippy::type_complexity)]
    fn recover_queues(&mut self) -> Result<Vec<(usize, VecDeque<(u16, u16)>, u16)>, String> {
        let Some(st) = self.state.as_ref() else { return Ok(Vec::new()) };
        let mut redo = Vec::new();
        for i in 0..self.queues.len() {
            let q = &mut self.queues[i];
            let base = i * usize::from(self.stride);
            let mut w = st.queue_word(i).ok_or_else(|| format!("queue {i}: hot word corrupt"))?;
            if !q.ready() {
                // Never tracked (or made ready after the last commit): start clean.
                st.set_queue_word(i, QueueWord::default());
                for h in 0..usize::from(self.stride) {
                    st.set_entry(base + h, None);
                }
                self.words[i] = QueueWord::default();
                continue;
            }
            if !w.active {
                return Err(format!("queue {i}: ready but not tracked"));
            }
            let size = q.size();
            let used_at = q.used_ring().checked_add(2).ok_or("used ring address")?;
            let g: u16 = self.mem.read_obj(GuestAddress(used_at)).map_err(|e| format!("queue {i}: used idx: {e}"))?;
            let published = g.wrapping_sub(w.used_idx);
            if w.publishing && published == 1 {
                if w.last_head >= size {
                    return Err(format!("queue {i}: published head {} out of range", w.last_head));
                }
                st.set_entry(base + usize::from(w.last_head), None);
                w.used_idx = g;
            } else if w.publishing && published > 1 && published <= size {
                // A batch (QueueCtx::add_used_batch) was published whole: clear the heads its
                // used elements name.
                for k in 0..published {
                    let slot = u64::from(w.used_idx.wrapping_add(k) % size);
                    let at = q.used_ring().checked_add(4 + slot * 8).ok_or("used ring address")?;
                    let id: u32 =
                        self.mem.read_obj(GuestAddress(at)).map_err(|e| format!("queue {i}: used element: {e}"))?;
                    let head = u16::try_from(id).ok().filter(|&h| h < size);
                    let head = head.ok_or_else(|| format!("queue {i}: published head {id} out of range"))?;
                    st.set_entry(base + usize::from(head), None);
                }
                w.used_idx = g;
            } else if g != w.used_idx {
                return Err(format!("queue {i}: used index {g} in guest memory, {} saved", w.used_idx));
            }
            w.publishing = false;
            let mut found: Vec<(u16, u16, u32)> = Vec::new();
            for h in 0..self.stride {
                let e = st.entry(base + usize::from(h)).map_err(|e| format!("queue {i}: {e}"))?;
                let Some(e) = e else { continue };
                if h >= size {
                    return Err(format!("queue {i}: entry for head {h} beyond size {size}"));
                }
                found.push((e.pos, h, e.order));
            }
            // A take interrupted before `next_avail` was stored.
            if let Some(&(pos, _, _)) = found.iter().find(|(pos, _, _)| *pos == w.next_avail) {
                w.next_avail = pos.wrapping_add(1);
            }
            let outstanding = w.next_avail.wrapping_sub(w.used_idx);
            if usize::from(outstanding) != found.len() || outstanding > size {
                return Err(format!(
                    "queue {i}: {} in flight but next avail {} and used {}",
                    found.len(),
                    w.next_avail,
                    w.used_idx
                ));
            }
            // Oldest first: largest distance behind next_avail.
            found.sort_by_key(|&(pos, _, _)| std::cmp::Reverse(w.next_avail.wrapping_sub(pos)));
            if found.windows(2).any(|p| p[0].0 == p[1].0)
                || found.iter().any(|&(pos, _, _)| w.next_avail.wrapping_sub(pos) > outstanding)
            {
                return Err(format!("queue {i}: in-flight positions inconsistent"));
            }
            self.orders[i] = found.iter().map(|f| f.2.wrapping_add(1)).max().unwrap_or(0);
            q.set_next_avail(w.next_avail);
            q.set_next_used(w.used_idx);
            st.set_queue_word(i, w);
            self.words[i] = w;
            // Kicks may have been off when the old instance died: re-arm them before sleeping.
            self.notify_on[i] = false;
            if !found.is_empty() {
                redo.push((i, found.iter().map(|&(pos, h, _)| (pos, h)).collect(), w.next_avail));
            }
        }
        Ok(redo)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Counters.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    /// Fds to keep open in a jail (ioeventfds, the irqfd and the state region).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.notify.iter().map(|e| e.as_raw_fd()).collect();
        v.push(self.irq.as_raw_fd());
        v.extend(self.state.as_ref().map(|s| s.fd().as_raw_fd()));
        v
    }

    fn running(&self) -> bool {
        !self.failed
            && self.status & status::DRIVER_OK != 0
            && self.status & (status::NEEDS_RESET | status::FAILED) == 0
    }

    /// The device's own source of work ([`VirtioDevice::own_work`]) while the device runs and
    /// names a queue it has.
    fn own_work(&self) -> Option<(RawFd, usize)> {
        self.device.own_work().filter(|(_, q)| self.running() && *q < self.queues.len())
    }

    /// Runs queue `queue` for the device's own work, as a kick would (interrupts batched the
    /// same way), and saves the registers as after any access. Returns whether chains completed.
    fn run_own_work(&mut self, queue: usize) -> bool {
        let did = self.process(queue);
        self.persist();
        did
    }

    /// Whether the device failed for good ([`enter_failed`](Self::enter_failed)).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Puts the device in a permanent failed state (the core gave up on it): DEVICE_NEEDS_RESET
    /// is set and a configuration-change interrupt raised; from now on no queue is processed,
    /// guest memory is never touched, a reset (status 0) is accepted but FEATURES_OK is refused,
    /// so a driver gives up cleanly. Register and config-space reads keep working.
    pub fn enter_failed(&mut self, reason: &str) {
        if self.failed {
            return;
        }
        self.failed = true;
        eprintln!("virtio-mmio: device failed for good ({reason}): DEVICE_NEEDS_RESET, queues stopped");
        for q in &mut self.queues {
            q.set_ready(false);
        }
        if self.status & status::NEEDS_RESET == 0 {
            self.stats.needs_reset += 1;
            self.status |= status::NEEDS_RESET;
        }
        // Always: a polling driver reads the status anyway, an interrupt-driven one learns of it.
        self.signal(INT_CONFIG);
        self.persist();
    }

    /// The transport's live state and its queues', guest-memory fields read now.
    pub fn report(&self) -> VirtioReport {
        let mem = &self.mem;
        let at = |addr: u64| -> Option<u16> {
            mem.load::<u16>(GuestAddress(addr), Ordering::Acquire).ok().map(u16::from_le)
        };
        let queues = self
            .queues
            .iter()
            .zip(self.notify_on.iter().zip(&self.notified_used))
            .map(|(q, (&armed, &notified_used))| {
                let ready = q.ready();
                // The ring fields virtio-queue does not read for us: the flags, and the two
                // EVENT_IDX words after each ring.
                let size = u64::from(q.size());
                let (avail, used) = (q.avail_ring(), q.used_ring());
                let word = |addr: u64| ready.then(|| at(addr)).flatten();
                QueueReport {
                    ready,
                    size: q.size(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    avail_flags: word(avail),
                    avail_idx: ready.then(|| q.avail_idx(mem, Ordering::Acquire).ok()).flatten().map(|i| i.0),
                    used_event: word(avail.wrapping_add(4 + 2 * size)),
                    used_idx: ready.then(|| q.used_idx(mem, Ordering::Acquire).ok()).flatten().map(|i| i.0),
                    avail_event: word(used.wrapping_add(4 + 8 * size)),
                    kicks_armed: armed,
                    notified_used,
                }
            })
            .collect();
        VirtioReport {
            status: self.status,
            interrupt_status: self.interrupt_status,
            interrupts: self.stats.interrupts,
            held_interrupts: self.deferred_irq,
            raise_records: u32::try_from(self.raises.len()).unwrap_or(u32::MAX),
            driver_features: self.driver_features,
            queues,
            device: self.device.report_counts(),
        }
    }

    /// Bits of the interrupts raised after the request being served was submitted (all that
    /// are still unreported when the runtime gave no position: a direct call in a test, or a
    /// raise during this very batch, conservatively kept). Forgets the records this request
    /// and every later one come after.
    fn raised_after_request(&mut self) -> u32 {
        let Some(index) = self.request_index else { return 0 };
        let keep = self.raises.iter().filter(|(count, _)| *count > index).fold(self.raised, |k, (_, b)| k | b);
        self.raises.retain(|(count, _)| *count > index);
        keep
    }

    fn signal(&mut self, bits: u32) {
        if let Some(held) = self.deferred_irq.as_mut() {
            *held |= bits;
            return;
        }
        self.interrupt_status |= bits;
        self.raised |= bits;
        self.stats.interrupts += 1;
        // The guest's handler reads InterruptStatus first: it must see this change. Rewritten
        // in place (with Status, which a reset request changes), the table stays valid, so the
        // core still answers that read while this thread is busy, e.g. inside a slow disk call.
        if let Some(m) = &self.mirror {
            if m.update(reg::INTERRUPT_STATUS, &self.interrupt_status.to_le_bytes()) {
                m.update(reg::STATUS, &self.status.to_le_bytes());
            }
        }
        if let Err(e) = self.irq.write(1) {
            if !self.irq_failed {
                self.irq_failed = true;
                eprintln!("virtio-mmio: raising the interrupt failed (further failures not logged): {e}");
            }
        }
    }

    /// The driver did something invalid, or a queue is corrupt: DEVICE_NEEDS_RESET.
    fn needs_reset(&mut self, why: &str) {
        if self.complaints < MAX_COMPLAINTS {
            self.complaints += 1;
            eprintln!("virtio-mmio: device needs reset: {why}");
        }
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        self.stats.needs_reset += 1;
        self.status |= status::NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.signal(INT_CONFIG);
        }
        self.persist();
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.raised = 0;
        self.raises.clear();
        for q in &mut self.queues {
            q.reset();
        }
        self.addrs.iter_mut().for_each(|a| *a = QueueAddrs::default());
        self.notify_on.iter_mut().for_each(|n| *n = true);
        self.notified_used.iter_mut().for_each(|n| *n = None);
        self.device.reset();
        self.words.iter_mut().for_each(|w| *w = QueueWord::default());
        self.orders.iter_mut().for_each(|o| *o = 0);
        if let Some(st) = self.state.as_ref() {
            st.clear_hot();
        }
    }

    fn selected(&self) -> Option<usize> {
        let i = usize::try_from(self.queue_sel).ok()?;
        (i < self.queues.len()).then_some(i)
    }

    /// The selected queue, if the driver may still configure it.
    fn configurable_queue(&mut self, what: &str) -> Option<usize> {
        let Some(i) = self.selected() else {
            self.needs_reset(&format!("{what} for queue {} which does not exist", self.queue_sel));
            return None;
        };
        if self.status & status::DRIVER_OK != 0 || self.queues[i].ready() {
            self.needs_reset(&format!("{what} for queue {i} after it was made ready"));
            return None;
        }
        Some(i)
    }

    fn set_queue_ready(&mut self, i: usize) {
        if self.failed {
            self.needs_reset(&format!("queue {i} made ready on a failed device"));
            return;
        }
        let a = self.addrs[i];
        let q = &mut self.queues[i];
        let r = q
            .try_set_desc_table_address(GuestAddress(a.desc))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(a.driver)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(a.device)));
        if let Err(e) = r {
            self.needs_reset(&format!("queue {i}: {e}"));
            return;
        }
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            q.set_ready(false);
            let size = q.size();
            self.needs_reset(&format!(
                "queue {i}: rings (desc {:#x}, avail {:#x}, used {:#x}, size {size}) not inside guest RAM",
                a.desc, a.driver, a.device
            ));
            return;
        }
        // Start tracking before the ready queue is committed to the cold state.
        let w = QueueWord {
            active: true,
            publishing: false,
            next_avail: q.next_avail(),
            used_idx: q.next_used(),
            last_head: 0,
        };
        self.words[i] = w;
        self.orders[i] = 0;
        if let Some(st) = self.state.as_ref() {
            let base = i * usize::from(self.stride);
            for h in 0..usize::from(self.stride) {
                st.set_entry(base + h, None);
            }
            st.set_queue_word(i, w);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status & !status::NEEDS_RESET;
        let new = v & !status::NEEDS_RESET;
        if new & old != old {
            self.needs_reset(&format!("status {v:#x} clears bits of {old:#x}"));
            return;
        }
        let added = new & !old;
        let mut keep = new;
        if self.failed && added & status::FEATURES_OK != 0 {
            // A failed device accepts no driver: FEATURES_OK does not stick.
            keep &= !status::FEATURES_OK;
        } else if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Not accepted: the driver sees FEATURES_OK did not stick.
                keep &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if keep & status::FEATURES_OK == 0 {
                self.status = (self.status & status::NEEDS_RESET) | (keep & !status::DRIVER_OK);
                self.needs_reset("DRIVER_OK without FEATURES_OK");
                return;
            }
            let event_idx = self.driver_features & F_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            if let Err(e) = self.device.activate(self.driver_features) {
                self.status = (self.status & status::NEEDS_RESET) | keep;
                self.needs_reset(&e.to_string());
                return;
            }
        }
        self.status = (self.status & status::NEEDS_RESET) | keep;
    }

    /// Processes queue `i` if the device is running and the queue ready. Returns whether any
    /// chain was completed.
    fn process(&mut self, i: usize) -> bool {
        if !self.running() || !self.queues[i].ready() {
            return false;
        }
        self.run_queue(i, None)
    }

    /// Runs the device on queue `i` (or replays `redo` on it) and notifies the driver.
    fn run_queue(&mut self, i: usize, redo: Option<(VecDeque<(u16, u16)>, u16)>) -> bool {
        let Ok(index) = u16::try_from(i) else { return false };
        let tracker = self.state.as_ref().map(|region| Tracker {
            region,
            queue: i,
            entry_base: i * usize::from(self.stride),
            word: &mut self.words[i],
            order: &mut self.orders[i],
        });
        let mut ctx = match redo {
            Some((list, resume)) => QueueCtx::replay(index, &mut self.queues[i], &self.mem, tracker, list, resume),
            None => QueueCtx::tracked(index, &mut self.queues[i], &self.mem, tracker),
        };
        let r = self.device.process_queue(&mut ctx);
        let forced = ctx.force_notify();
        match r {
            Ok(0) => false,
            Ok(n) => {
                self.stats.completed += n as u64;
                // Always called: it also resets the queue's EVENT_IDX bookkeeping.
                match self.queues[i].needs_notification(&self.mem) {
                    Ok(needed) => {
                        let wanted = if self.queues[i].event_idx_enabled() {
                            needed || forced
                        } else {
                            // Without EVENT_IDX the driver's VRING_AVAIL_F_NO_INTERRUPT says it
                            // polls (the virtio-queue crate does not look at it): no interrupt.
                            !self.interrupts_suppressed(i)
                        };
                        if wanted {
                            self.notified_used[i] = Some(self.queues[i].next_used());
                            self.signal(INT_VRING);
                        }
                    }
                    Err(e) => self.needs_reset(&format!("queue {i}: reading used_event: {e}")),
                }
                true
            }
            Err(e) => {
                self.needs_reset(&e.to_string());
                false
            }
        }
    }

    /// Whether the driver set `VRING_AVAIL_F_NO_INTERRUPT` in queue `i`'s avail ring flags (read
    /// after the used-ring writes; an unreadable flags word counts as not set).
    fn interrupts_suppressed(&self, i: usize) -> bool {
        let flags: u16 = self
            .mem
            .load(GuestAddress(self.queues[i].avail_ring()), std::sync::atomic::Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0);
        flags & AVAIL_F_NO_INTERRUPT != 0
    }

    fn has_work(&self, i: usize) -> bool {
        let q = &self.queues[i];
        q.ready() && q.avail_idx(&self.mem, Ordering::Acquire).is_ok_and(|idx| idx.0 != q.next_avail())
    }

    fn read_register(&self, offset: u64) -> Option<u32> {
        let sel_queue = self.selected().map(|i| &self.queues[i]);
        Some(match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.device.features() & 0xffff_ffff) as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => sel_queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => sel_queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => return None,
        })
    }

    fn write_register(&mut self, offset: u64, v: u32) -> bool {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
                    self.needs_reset("driver features written after FEATURES_OK");
                    return true;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    // Feature bits above 63 do not exist: only zeros are valid.
                    _ if v != 0 => self.needs_reset("driver features beyond bit 63"),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(i) = self.configurable_queue("QueueNum") {
                    let size = u16::try_from(v).unwrap_or(0);
                    if let Err(e) = self.queues[i].try_set_size(size) {
                        self.needs_reset(&format!("queue {i}: size {v}: {e}"));
                    }
                }
            }
            reg::QUEUE_READY => match v {
                0 => {
                    if let Some(i) = self.selected() {
                        self.queues[i].set_ready(false);
                    }
                }
                1 => {
                    if let Some(i) = self.configurable_queue("QueueReady") {
                        self.set_queue_ready(i);
                    }
                }
                _ => self.needs_reset(&format!("QueueReady {v}")),
            },
            reg::QUEUE_NOTIFY => {
                // Normally an ioeventfd catches this in the kernel; this is the fallback.
                match usize::try_from(v).ok().filter(|&i| i < self.queues.len()) {
                    Some(i) => {
                        self.process(i);
                    }
                    None => self.needs_reset(&format!("notify for queue {v} which does not exist")),
                }
            }
            reg::INTERRUPT_ACK => {
                let keep = self.raised_after_request();
                self.interrupt_status &= !(v & !keep);
            }
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if let Some(i) = self.configurable_queue("queue address") {
                    let a = &mut self.addrs[i];
                    let field = match offset & !0xf {
                        reg::QUEUE_DESC_LOW => &mut a.desc,
                        reg::QUEUE_DRIVER_LOW => &mut a.driver,
                        _ => &mut a.device,
                    };
                    *field = if offset & 4 == 0 {
                        (*field & !0xffff_ffff) | u64::from(v)
                    } else {
                        (*field & 0xffff_ffff) | (u64::from(v) << 32)
                    };
                }
            }
            _ => return false,
        }
        true
    }
}

fn config_width_ok(len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
}

/// Registers the read mirror carries: every 32-bit register a driver reads (none has a read side
/// effect in virtio-mmio), InterruptStatus above all, read first by every interrupt handler.
const MIRRORED: [u64; 10] = [
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_READY,
    reg::INTERRUPT_STATUS,
    reg::STATUS,
    reg::CONFIG_GENERATION,
];

impl<D: VirtioDevice> MmioHandler for MmioTransport<D> {
    fn at_request(&mut self, index: u64) {
        self.request_index = Some(index);
    }

    fn work_done(&mut self, submitted: u64) {
        if self.raised == 0 {
            return;
        }
        if self.raises.len() >= MAX_RAISES {
            // Merged into the newest: a later count only keeps more bits (a spare interrupt
            // bit the guest reads and finds nothing behind, never a lost one).
            if let Some((_, b)) = self.raises.pop_front() {
                if let Some(front) = self.raises.front_mut() {
                    front.1 |= b;
                }
            }
        }
        self.raises.push_back((submitted, std::mem::take(&mut self.raised)));
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) -> bool {
        if offset >= CONFIG_OFFSET {
            if config_width_ok(data.len()) && self.device.read_config(offset - CONFIG_OFFSET, data) {
                return true;
            }
            self.needs_reset(&format!("config read of {} bytes at {offset:#x}", data.len()));
            return false;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.needs_reset(&format!("register read of {} bytes at {offset:#x}", data.len()));
            return false;
        }
        match self.read_register(offset) {
            Some(v) => {
                data.copy_from_slice(&v.to_le_bytes());
                true
            }
            None => {
                self.needs_reset(&format!("read of write-only or unknown register {offset:#x}"));
                false
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset >= CONFIG_OFFSET {
            if config_width_ok(data.len()) && self.device.write_config(offset - CONFIG_OFFSET, data) {
                return true;
            }
            self.needs_reset(&format!("config write of {} bytes at {offset:#x}", data.len()));
            return false;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.needs_reset(&format!("register write of {} bytes at {offset:#x}", data.len()));
            return false;
        };
        if !offset.is_multiple_of(4) || !self.write_register(offset, u32::from_le_bytes(bytes)) {
            self.needs_reset(&format!("write to read-only or unknown register {offset:#x}"));
            return false;
        }
        self.persist();
        true
    }

    fn event_fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.notify.iter().map(|e| e.as_raw_fd()).collect();
        v.extend(self.own_work().map(|(fd, _)| fd));
        v
    }

    fn mirrored(&mut self, out: &mut Vec<MirrorEntry>) {
        for off in MIRRORED {
            if let Some(v) = self.read_register(off) {
                out.push(MirrorEntry::new(off, &v.to_le_bytes()));
            }
        }
        // An acknowledgement changes nothing but InterruptStatus: the core may post it.
        out.push(MirrorEntry::posted_write(reg::INTERRUPT_ACK, 4));
    }

    fn attach_mirror(&mut self, mirror: Mirror) {
        self.mirror = Some(mirror);
    }

    fn report(&mut self) -> DeviceReport {
        DeviceReport::Virtio(MmioTransport::report(self))
    }

    fn redone(&self) -> u64 {
        self.redone
    }

    fn enter_failed(&mut self, reason: &str) -> bool {
        MmioTransport::enter_failed(self, reason);
        true
    }

    fn take_stop(&mut self) -> Option<String> {
        MmioTransport::take_stop(self)
    }

    fn resumed(&mut self) {
        self.resume_held();
    }

    fn wake_after(&self) -> Option<Duration> {
        self.device.wake_after()
    }

    fn set_rate_limit(&mut self, limits: &RateLimitUpdate) -> bool {
        self.device.update_rate_limit(limits)
    }

    fn io_counters(&self) -> IoCounters {
        self.device.io_counters().unwrap_or(IoCounters { requests: self.stats.completed, ..IoCounters::default() })
    }

    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        if let Some((own, queue)) = self.own_work() {
            if fd == own {
                self.run_own_work(queue);
                return Ok(());
            }
        }
        let Some(i) = self.notify.iter().position(|e| e.as_raw_fd() == fd) else { return Ok(()) };
        // Drain the kick counter (readable, so this does not block).
        let _ = self.notify[i].read();
        self.process(i);
        Ok(())
    }

    fn poll(&mut self) -> Result<bool, RuntimeError> {
        let mut did = false;
        if let Some(bits) = self.deferred_irq.take() {
            if bits != 0 {
                self.signal(bits);
                did = true;
            }
        }
        if !self.running() {
            return Ok(did);
        }
        for i in 0..self.queues.len() {
            if !self.has_work(i) {
                continue;
            }
            if self.notify_on[i] {
                // The service is spinning: the guest need not kick while it does.
                if let Err(e) = self.queues[i].disable_notification(&self.mem) {
                    self.needs_reset(&format!("queue {i}: disabling notifications: {e}"));
                    return Ok(false);
                }
                self.notify_on[i] = false;
            }
            did |= self.process(i);
        }
        if let Some((_, queue)) = self.own_work() {
            did |= self.run_own_work(queue);
        }
        Ok(did)
    }

    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError> {
        if !self.running() {
            return Ok(false);
        }
        let mut pending = false;
        for i in 0..self.queues.len() {
            // Re-armed even if armed already (see the module docs): the position may be stale.
            if !self.queues[i].ready() {
                continue;
            }
            match self.queues[i].enable_notification(&self.mem) {
                Ok(more) => {
                    self.notify_on[i] = true;
                    pending |= more;
                }
                Err(e) => self.needs_reset(&format!("queue {i}: enabling notifications: {e}")),
            }
        }
        if pending && self.device.pending_waits_for_tokens() {
            // Chains waiting for tokens are no reason to stay awake (`wake_after` ends the
            // sleep when they are due); take whatever else arrived first.
            return self.poll();
        }
        Ok(pending)
    }
}

/// Checks the transport must pass over each device, run from the device modules' tests.
#[cfg(test)]
pub(crate) mod handler_checks {
    use super::*;

    fn isr(h: &mut impl MmioHandler) -> u32 {
        let mut b = [0u8; 4];
        assert!(h.read(reg::INTERRUPT_STATUS, &mut b));
        u32::from_le_bytes(b)
    }

    fn ack(h: &mut impl MmioHandler, bits: u32) {
        assert!(h.write(reg::INTERRUPT_ACK, &bits.to_le_bytes()));
    }

    /// Through `MmioHandler`, called as the runtime calls it: an interrupt raised after a posted
    /// InterruptACK was submitted survives that acknowledgement, and the guest's next one clears
    /// it. Fails if `at_request` or `work_done` does not reach the ordering (then every
    /// acknowledgement clears everything). The interrupt is `enter_failed`'s configuration
    /// change, which the report shows.
    pub(crate) fn a_posted_ack_keeps_a_later_interrupt(h: &mut impl MmioHandler) {
        assert!(h.enter_failed("check"), "a virtio handler has a failed state");
        // Raised while the core had submitted 4 requests.
        h.work_done(4);
        assert_eq!(isr(h) & INT_CONFIG, INT_CONFIG);
        // An acknowledgement at ring position 2, submitted before the interrupt.
        h.at_request(2);
        ack(h, INT_CONFIG);
        h.work_done(4);
        assert_eq!(isr(h) & INT_CONFIG, INT_CONFIG, "an earlier acknowledgement cleared a later interrupt");
        // The guest's acknowledgement of it, at position 5.
        h.at_request(5);
        ack(h, INT_CONFIG);
        h.work_done(6);
        assert_eq!(isr(h) & INT_CONFIG, 0);
        let DeviceReport::Virtio(r) = h.report() else { panic!("not the transport's report") };
        assert_eq!(r.status & status::NEEDS_RESET, status::NEEDS_RESET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tracked::QueueCtx;
    use crate::virtio::DeviceError;
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Counts how often the transport asks it to process a queue; completes nothing.
    #[derive(Debug, Default)]
    struct Counting {
        processed: u32,
    }

    impl VirtioDevice for Counting {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            F_VERSION_1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
            data.fill(0x5a);
            offset < 8
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
            false
        }
        fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(&mut self, _queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
            self.processed += 1;
            Ok(0)
        }
        fn reset(&mut self) {}
    }

    fn rd(t: &mut MmioTransport<Counting>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(MmioHandler::read(t, offset, &mut b), "read {offset:#x}");
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<Counting>, offset: u64, v: u32) {
        assert!(MmioHandler::write(t, offset, &v.to_le_bytes()), "write {offset:#x}");
    }

    /// Negotiates VERSION_1 and sets FEATURES_OK; returns the status read back.
    fn negotiate(t: &mut MmioTransport<Counting>) -> u32 {
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, 1); // VERSION_1 is bit 32
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        rd(t, reg::STATUS)
    }

    fn make_ready(t: &mut MmioTransport<Counting>) {
        wr(t, reg::QUEUE_SEL, 0);
        wr(t, reg::QUEUE_NUM, 16);
        wr(t, reg::QUEUE_DESC_LOW, 0x1000);
        wr(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        wr(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        wr(t, reg::QUEUE_READY, 1);
    }

    /// The mirror carries every readable register with the value a read returns, and declares
    /// InterruptACK postable; an interrupt is raised only after InterruptStatus (and Status) were
    /// rewritten in place: the guest's handler then reads the new value, never the published
    /// zero, and the table stays valid for reads while the service is busy.
    #[test]
    fn mirror_carries_the_registers_and_is_updated_before_an_interrupt() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq_seen = irq.try_clone().expect("dup");
        let mut t = MmioTransport::new(Counting::default(), mem.clone(), vec![notify], irq).expect("transport");
        let mirror = Mirror::standalone("mmio-mirror").expect("mirror");
        MmioHandler::attach_mirror(&mut t, mirror.clone());
        let st = negotiate(&mut t);
        make_ready(&mut t);
        wr(&mut t, reg::STATUS, st | status::DRIVER_OK);
        let mut v = Vec::new();
        MmioHandler::mirrored(&mut t, &mut v);
        assert_eq!(v.len(), MIRRORED.len() + 1);
        let posted: Vec<u64> = v.iter().filter(|e| e.flags == ipc::mirror::POSTED_WRITE).map(|e| e.addr).collect();
        assert_eq!(posted, vec![reg::INTERRUPT_ACK]);
        v.retain(|e| e.flags == 0);
        for e in &v {
            assert_eq!(e.len, 4);
            let want = rd(&mut t, e.addr);
            assert_eq!(e.data[..4], want.to_le_bytes(), "register {:#x}", e.addr);
        }
        let isr = |v: &[MirrorEntry]| v.iter().find(|e| e.addr == reg::INTERRUPT_STATUS).map(|e| e.data[0]);
        assert_eq!(isr(&v), Some(0));
        mirror.publish(&v);
        let _ = irq_seen.read();
        // A change outside any access that interrupts the guest (here: the core gives up on the
        // device, a configuration-change interrupt).
        MmioHandler::enter_failed(&mut t, "restart cap reached");
        assert!(irq_seen.read().expect("interrupt") >= 1);
        assert!(mirror.is_valid(), "rewritten in place, not invalidated");
        let published = |off: u64| mirror.lookup(off, 4).map(|d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        assert_eq!(published(reg::INTERRUPT_STATUS), Some(INT_CONFIG), "the new InterruptStatus is published");
        assert_eq!(published(reg::STATUS), Some(rd(&mut t, reg::STATUS)), "and the new Status (NEEDS_RESET)");
        v.clear();
        MmioHandler::mirrored(&mut t, &mut v);
        assert_eq!(isr(&v).map(|b| u32::from(b) & INT_CONFIG), Some(INT_CONFIG));
    }

    #[test]
    fn failed_device_needs_reset_refuses_features_and_never_processes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let kick = notify.try_clone().expect("dup");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq_seen = irq.try_clone().expect("dup");
        let mut t = MmioTransport::new(Counting::default(), mem.clone(), vec![notify], irq).expect("transport");

        // A driver brings the device up; one available buffer is processed.
        let st = negotiate(&mut t);
        assert_ne!(st & status::FEATURES_OK, 0);
        make_ready(&mut t);
        wr(&mut t, reg::STATUS, st | status::DRIVER_OK);
        mem.write_obj(1u16, GuestAddress(0x2002)).expect("avail idx");
        assert!(MmioHandler::poll(&mut t).is_ok());
        assert_eq!(t.device().processed, 1);

        // The core gives up on the device.
        MmioHandler::enter_failed(&mut t, "restart cap reached");
        assert!(t.is_failed());
        let st = rd(&mut t, reg::STATUS);
        assert_ne!(st & status::NEEDS_RESET, 0, "status {st:#x}");
        assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert!(irq_seen.read().expect("interrupt raised") >= 1);

        // More work appears and is kicked three ways: nothing is processed.
        mem.write_obj(2u16, GuestAddress(0x2002)).expect("avail idx");
        kick.write(1).expect("kick");
        let fd = MmioHandler::event_fds(&t)[0];
        MmioHandler::on_event(&mut t, fd).expect("event");
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        assert!(!MmioHandler::prepare_sleep(&mut t).expect("prepare"));
        assert_eq!(t.device().processed, 1, "a failed device must not process its queues");

        // Identification and config space still read normally.
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::VERSION), MMIO_VERSION);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(rd(&mut t, CONFIG_OFFSET), 0x5a5a_5a5a);

        // A reset is accepted; FEATURES_OK then does not stick, and DRIVER_OK needs reset again.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        let st = negotiate(&mut t);
        assert_eq!(st & status::FEATURES_OK, 0, "FEATURES_OK refused: {st:#x}");
        make_ready(&mut t);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0, "no queue becomes ready on a failed device");
        wr(&mut t, reg::STATUS, st | status::DRIVER_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::NEEDS_RESET, 0);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        assert_eq!(t.device().processed, 1);
    }

    /// Takes every available chain; publishes them together as one batch unless `hold`.
    #[derive(Debug, Default)]
    struct Batcher {
        hold: bool,
        taken: Vec<u16>,
        /// Offers `EVENT_IDX`.
        event_idx: bool,
    }

    impl VirtioDevice for Batcher {
        fn device_id(&self) -> u32 {
            1
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | if self.event_idx { F_EVENT_IDX } else { 0 }
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) -> bool {
            false
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
            false
        }
        fn process_queue(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
            let mut elems = Vec::new();
            while let Some(chain) = queue.pop()? {
                self.taken.push(chain.head_index());
                elems.push((chain.head_index(), 100));
            }
            if self.hold {
                return Ok(0);
            }
            queue.add_used_batch(&elems)?;
            Ok(elems.len())
        }
        fn reset(&mut self) {}
    }

    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A driver that made the queue ready and offered heads 0, 1, 2 (one descriptor each).
    fn batch_rig(hold: bool, mem: &GuestMemoryMmap<()>, region: StateRegion) -> (MmioTransport<Batcher>, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let seen = irq.try_clone().expect("dup");
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut t = MmioTransport::new(Batcher { hold, ..Batcher::default() }, mem.clone(), vec![notify], irq)
            .expect("transport");
        t.attach_state(region).expect("state");
        (t, seen)
    }

    fn bring_up(t: &mut MmioTransport<Batcher>, mem: &GuestMemoryMmap<()>) {
        bring_up_with(t, mem, 0);
    }

    /// [`bring_up`] with the low 32 feature bits `low` accepted too.
    fn bring_up_with(t: &mut MmioTransport<Batcher>, mem: &GuestMemoryMmap<()>, low: u32) {
        wr_b(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr_b(t, reg::DRIVER_FEATURES_SEL, 0);
        wr_b(t, reg::DRIVER_FEATURES, low);
        wr_b(t, reg::DRIVER_FEATURES_SEL, 1);
        wr_b(t, reg::DRIVER_FEATURES, 1);
        wr_b(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        wr_b(t, reg::QUEUE_SEL, 0);
        wr_b(t, reg::QUEUE_NUM, 16);
        wr_b(t, reg::QUEUE_DESC_LOW, 0x1000);
        wr_b(t, reg::QUEUE_DRIVER_LOW, 0x2000);
        wr_b(t, reg::QUEUE_DEVICE_LOW, 0x3000);
        wr_b(t, reg::QUEUE_READY, 1);
        offer(mem, 0..3);
        wr_b(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        mem.write_obj(3u16, GuestAddress(AVAIL + 2)).expect("avail idx");
    }

    /// Puts `heads` in the available ring, a 64-byte device-writable buffer each (head N at
    /// slot N); the caller publishes the new available index.
    fn offer(mem: &GuestMemoryMmap<()>, heads: std::ops::Range<u16>) {
        for head in heads {
            let d = 0x1000 + u64::from(head) * 16;
            mem.write_obj(0x8000u64 + u64::from(head) * 0x100, GuestAddress(d)).expect("addr");
            mem.write_obj(64u32, GuestAddress(d + 8)).expect("len");
            mem.write_obj(2u16, GuestAddress(d + 12)).expect("flags");
            mem.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(head) * 2)).expect("ring");
        }
    }

    fn wr_b(t: &mut MmioTransport<Batcher>, offset: u64, v: u32) {
        assert!(MmioHandler::write(t, offset, &v.to_le_bytes()), "write {offset:#x}");
    }

    fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
    }

    fn used_heads(mem: &GuestMemoryMmap<()>, n: u16) -> Vec<u32> {
        (0..u64::from(n)).map(|i| mem.read_obj(GuestAddress(USED + 4 + i * 8)).expect("elem")).collect()
    }

    #[test]
    fn a_batch_is_published_with_one_index_update_and_always_notified() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let region = StateRegion::create("batch-test").expect("region");
        let (mut t, irq) = batch_rig(false, &mem, region);
        bring_up(&mut t, &mem);
        assert!(MmioHandler::poll(&mut t).expect("poll"));
        assert_eq!(t.device().taken, vec![0, 1, 2]);
        assert_eq!(used_idx(&mem), 3, "all three visible at once");
        assert_eq!(used_heads(&mem, 3), vec![0, 1, 2]);
        let len: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).expect("len");
        assert_eq!(len, 100);
        assert!(irq.read().expect("interrupt") >= 1);
    }

    /// A posted InterruptACK clears only what the guest could have read before submitting it:
    /// an interrupt raised after its submission (the used ring the guest's handler has not
    /// seen) survives it, so the handler for that interrupt reads its bit and takes the used
    /// ring. Without this a completion was lost now and then (a Linux guest's `sync` or TCP
    /// stream waited forever).
    #[test]
    fn a_posted_acknowledgement_never_clears_a_later_interrupt() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let region = StateRegion::create("ack-order").expect("region");
        let (mut t, irq) = batch_rig(false, &mem, region);
        bring_up(&mut t, &mem);
        // The device completes a batch and interrupts while the core had submitted 4 requests.
        assert!(MmioHandler::poll(&mut t).expect("poll"));
        t.work_done(4);
        assert!(irq.read().expect("interrupt") >= 1);
        assert_eq!(rd_b(&mut t, reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING);
        // An acknowledgement submitted at position 2, before that interrupt: the bit stays.
        t.at_request(2);
        wr_b(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd_b(&mut t, reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING, "a later interrupt survives");
        // The guest's handler for it acknowledges at position 5, after it: cleared.
        t.at_request(5);
        wr_b(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(rd_b(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    /// A restarted instance redoes what was in flight, but raises the interrupt only on its first
    /// poll, after the runtime served what waited on the ring: an acknowledgement the guest
    /// posted to the dead instance (carried to this one) clears the old bits, never the new one.
    /// With `EVENT_IDX`, a queue that took buffers outside the poll loop (the net service's RX
    /// queue, run when its TAP is readable) is re-armed at its new position before the service
    /// sleeps: the driver kicks only for buffers added past `avail_event`, so a stale one would
    /// let the service sleep through the next buffers until its next wake-up.
    #[test]
    fn sleeping_rearms_event_idx_where_the_device_is() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let dev = Batcher { event_idx: true, ..Batcher::default() };
        let mut t = MmioTransport::new(dev, mem.clone(), vec![notify], irq).expect("transport");
        bring_up_with(&mut t, &mem, 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        // `avail_event` follows the 16 used-ring entries.
        let avail_event = || -> u16 { mem.read_obj(GuestAddress(USED + 4 + 16 * 8)).expect("avail_event") };
        assert!(MmioHandler::poll(&mut t).expect("poll"), "heads 0-2 taken");
        assert!(!MmioHandler::prepare_sleep(&mut t).expect("sleep"), "nothing more");
        assert_eq!(avail_event(), 3, "armed where the device is");
        // The driver adds heads 3 and 4; the device takes them through QueueNotify before it
        // sees the kick (as RX does on the TAP's readiness), then finds no new work in a poll.
        offer(&mem, 3..5);
        mem.write_obj(5u16, GuestAddress(AVAIL + 2)).expect("avail idx");
        wr_b(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.device().taken, [0, 1, 2, 3, 4]);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        assert!(!MmioHandler::prepare_sleep(&mut t).expect("sleep"));
        assert_eq!(avail_event(), 5, "re-armed where the device is now, so head 5 is kicked");
    }

    #[test]
    fn a_restored_device_interrupts_after_the_carried_acknowledgements() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let region = StateRegion::create("restore-ack").expect("region");
        let keep = region.fd().try_clone_to_owned().expect("dup");
        let (mut t, _irq) = batch_rig(true, &mem, region);
        bring_up(&mut t, &mem);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        drop(t);
        let (mut t, irq) = batch_rig(false, &mem, StateRegion::from_fd(keep).expect("region"));
        assert_eq!(t.restore(), Restored::Resumed { redone: 3 });
        assert_eq!(used_idx(&mem), 3, "redone at once");
        assert!(irq.read().is_err(), "no interrupt before the first poll");
        // The guest's acknowledgement of the dead instance's interrupt, served first.
        wr_b(&mut t, reg::INTERRUPT_ACK, INT_VRING | INT_CONFIG);
        assert!(MmioHandler::poll(&mut t).expect("poll"), "the held interrupt is work");
        assert!(irq.read().expect("interrupt") >= 1);
        assert_eq!(rd_b(&mut t, reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING, "the redone completions' bit stands");
    }

    #[test]
    fn a_batch_interrupted_before_or_after_its_index_update_is_redone_or_not_exactly_once() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        // Crash after the take, before anything is published: all three are redone.
        let region = StateRegion::create("batch-before").expect("region");
        let keep = region.fd().try_clone_to_owned().expect("dup");
        let (mut t, _irq) = batch_rig(true, &mem, region);
        bring_up(&mut t, &mem);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        assert_eq!(t.device().taken, vec![0, 1, 2]);
        drop(t);
        let (mut t, _irq) = batch_rig(false, &mem, StateRegion::from_fd(keep).expect("region"));
        assert_eq!(t.restore(), Restored::Resumed { redone: 3 });
        assert_eq!(t.device().taken, vec![0, 1, 2], "redone in take order");
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(used_heads(&mem, 3), vec![0, 1, 2]);

        // Crash after the used index covered the batch, before the entries were cleared: the
        // new instance clears them and redoes nothing.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let region = StateRegion::create("batch-after").expect("region");
        let keep = region.fd().try_clone_to_owned().expect("dup");
        let (mut t, _irq) = batch_rig(true, &mem, region);
        bring_up(&mut t, &mem);
        assert!(!MmioHandler::poll(&mut t).expect("poll"));
        drop(t);
        let st = StateRegion::from_fd(keep).expect("region");
        let mut w = st.queue_word(0).expect("word");
        assert_eq!((w.next_avail, w.used_idx), (3, 0));
        w.publishing = true;
        w.last_head = 0;
        st.set_queue_word(0, w);
        for (i, head) in (0u64..).zip([0u32, 1, 2]) {
            mem.write_obj(head, GuestAddress(USED + 4 + i * 8)).expect("elem id");
            mem.write_obj(100u32, GuestAddress(USED + 8 + i * 8)).expect("elem len");
        }
        mem.write_obj(3u16, GuestAddress(USED + 2)).expect("used idx");
        let (mut t, _irq) = batch_rig(false, &mem, st);
        assert_eq!(t.restore(), Restored::Resumed { redone: 0 });
        assert!(t.device().taken.is_empty(), "nothing completed twice");
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(t.status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn no_interrupt_flag_suppresses_used_buffer_interrupts_without_event_idx() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let (mut t, irq) = batch_rig(false, &mem, StateRegion::create("no-int").expect("region"));
        bring_up(&mut t, &mem);
        // The driver polls: VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags.
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL)).expect("flags");
        assert!(MmioHandler::poll(&mut t).expect("poll"));
        assert_eq!(used_idx(&mem), 3, "the work is done");
        assert!(irq.read().is_err(), "no interrupt for a driver that polls");
        assert_eq!(rd_b(&mut t, reg::INTERRUPT_STATUS) & INT_VRING, 0);
        // The driver wants interrupts again: the next batch raises one.
        mem.write_obj(0u16, GuestAddress(AVAIL)).expect("flags");
        let used_before = used_idx(&mem);
        // Head 0 (completed above) is offered again at avail position 3.
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 6)).expect("ring");
        mem.write_obj(4u16, GuestAddress(AVAIL + 2)).expect("avail idx");
        assert!(MmioHandler::poll(&mut t).expect("poll"));
        assert_eq!(used_idx(&mem), used_before.wrapping_add(1));
        assert!(irq.read().expect("interrupt") >= 1);
    }

    fn rd_b(t: &mut MmioTransport<Batcher>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(MmioHandler::read(t, offset, &mut b), "read {offset:#x}");
        u32::from_le_bytes(b)
    }
}
