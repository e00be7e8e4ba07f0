//! A polling virtio-net driver over a version 2 virtio-mmio transport: RX queue 0, TX queue 1,
//! no interrupts, no offloads, no mergeable RX buffers. Every buffer is one descriptor holding
//! the 12-byte `virtio_net_hdr_v1` followed by the frame (VIRTIO_F_VERSION_1 implies
//! ANY_LAYOUT). Descriptor `i` of a queue always points at buffer `i` of that queue.
//!
//! The RX ring is kept full: every frame the device returns is handed to the caller and its
//! buffer re-posted, with at most one notify per batch. TX frames are queued into free
//! descriptors and published with at most one notify per batch; completed ones are reclaimed
//! by polling. A batch is published with a full barrier (`xchg`) and not notified while the
//! device has VIRTQ_USED_F_NO_NOTIFY set (QEMU sets it while it works on a queue, and on RX
//! whenever it has buffers), which saves most exits.
//!
//! DMA arena layout ([`NET_DMA_BYTES`]): RX queue, RX buffers, TX queue, TX buffers
//! ([`BUF_BYTES`] each, [`MAX_QUEUE_SIZE`] per queue). The RX and TX halves are separate
//! [`Dma`] arenas so a received frame can be copied into a TX buffer without a copy on the
//! stack (see [`Net::poll_rx`]).

use super::queue::{Dma, SplitQueue, DESC_F_WRITE, MAX_QUEUE_SIZE, QUEUE_BYTES};
use super::{reg, status, Transport, VirtioError};
use crate::console::Console;
use crate::machine::Machine;

/// VIRTIO_NET_F_MAC: the device has a MAC address in config space.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_MRG_RXBUF (declined).
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// VIRTIO_NET_F_STATUS: config space has a link status field.
pub const F_STATUS: u64 = 1 << 16;
/// Every feature the driver accepts (besides VIRTIO_F_VERSION_1).
pub const ACCEPTED: u64 = F_MAC | F_STATUS;
/// `virtio_net_config.status` bit: link up.
pub const S_LINK_UP: u16 = 1;

/// RX queue index.
pub const RX_QUEUE: u16 = 0;
/// TX queue index.
pub const TX_QUEUE: u16 = 1;
/// Bytes of `virtio_net_hdr_v1` (with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Largest Ethernet frame sent or accepted (no FCS, no VLAN tag): 14 + 1500.
pub const MAX_FRAME: usize = 1514;
/// Bytes per buffer: header + frame, rounded up (the spec asks for at least 1526).
pub const BUF_BYTES: usize = 2048;
/// [`BUF_BYTES`] as a descriptor length.
const BUF_BYTES_U32: u32 = 2048;
/// Offset of a queue inside its half of the arena.
const Q_OFF: usize = 0;
/// Offset of the buffers inside a half.
const BUF_OFF: usize = QUEUE_BYTES;
/// Bytes of each half: queue and buffers.
pub const HALF_BYTES: usize = QUEUE_BYTES + MAX_QUEUE_SIZE as usize * BUF_BYTES;
/// DMA bytes the driver needs; the rest of the arena is free for the caller.
pub const NET_DMA_BYTES: usize = 2 * HALF_BYTES;
/// Entries per queue (upper bound).
const QMAX: usize = MAX_QUEUE_SIZE as usize;

/// What the device told us at set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetInfo {
    /// The MAC address (from config space with VIRTIO_NET_F_MAC, else a fixed local one).
    pub mac: [u8; 6],
    /// Whether the MAC came from the device.
    pub mac_from_device: bool,
    /// Features offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// RX queue size.
    pub rx_size: u16,
    /// TX queue size.
    pub tx_size: u16,
}

/// The MAC used when the device offers none: locally administered, unicast.
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// Why the driver stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// Transport-level failure during set-up.
    Virtio(VirtioError),
    /// The machine has no DMA arena (or it was taken).
    NoDma,
    /// The DMA arena is smaller than [`NET_DMA_BYTES`].
    DmaTooSmall,
    /// A frame longer than [`MAX_FRAME`] or shorter than an Ethernet header.
    BadFrame(usize),
    /// No free TX descriptor.
    TxFull,
    /// The used ring of `queue` names a descriptor that is not in flight.
    BadUsedId {
        /// The queue.
        queue: u16,
        /// The id.
        id: u32,
    },
    /// The used index of `queue` moved by more than the buffers in flight.
    BadUsedCount {
        /// The queue.
        queue: u16,
        /// How far it moved.
        n: u16,
    },
    /// Nothing happened within the wait bound.
    Timeout {
        /// The device status register when we gave up.
        status: u32,
        /// TX frames still in flight.
        tx_in_flight: usize,
    },
}

impl NetError {
    /// Prints the reason (no newline).
    pub fn print(&self, con: &mut Console<'_>) {
        match *self {
            NetError::Virtio(e) => e.print(con),
            NetError::NoDma => {
                con.str(b"no DMA memory");
            }
            NetError::DmaTooSmall => {
                con.str(b"DMA memory too small");
            }
            NetError::BadFrame(n) => {
                con.str(b"frame of ").dec(n as u64).str(b" bytes refused");
            }
            NetError::TxFull => {
                con.str(b"no free TX descriptor");
            }
            NetError::BadUsedId { queue, id } => {
                con.str(b"device returned unknown descriptor id ")
                    .dec(u64::from(id))
                    .str(b" on queue ")
                    .dec(u64::from(queue));
            }
            NetError::BadUsedCount { queue, n } => {
                con.str(b"device used index of queue ")
                    .dec(u64::from(queue))
                    .str(b" jumped by ")
                    .dec(u64::from(n))
                    .str(b", more than in flight");
            }
            NetError::Timeout { status, tx_in_flight } => {
                con.str(b"device timeout: ")
                    .dec(tx_in_flight as u64)
                    .str(b" TX frame(s) unanswered, device status ")
                    .hex(u64::from(status));
            }
        }
    }
}

impl From<VirtioError> for NetError {
    fn from(e: VirtioError) -> Self {
        NetError::Virtio(e)
    }
}

/// Counters kept by the driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames queued for the device.
    pub tx_frames: u64,
    /// TX completions reclaimed.
    pub tx_done: u64,
    /// TX notifies.
    pub tx_kicks: u64,
    /// TX batches published without a notify (the device had set VIRTQ_USED_F_NO_NOTIFY).
    pub tx_suppressed: u64,
    /// RX refills published without a notify (likewise).
    pub rx_suppressed: u64,
    /// Frames received (passed to the caller).
    pub rx_frames: u64,
    /// RX buffers returned with a length below the header or above the buffer (dropped).
    pub rx_bad_len: u64,
    /// RX notifies.
    pub rx_kicks: u64,
}

/// A bound on a wait: TSC cycles, plus a poll count in case the TSC does not advance.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: u64,
    cycles: u64,
    polls: u64,
    max_polls: u64,
}

impl Deadline {
    /// A deadline `cycles` from now.
    pub fn new(m: &mut dyn Machine, cycles: u64) -> Self {
        Deadline {
            start: m.tsc(),
            cycles: cycles.max(1),
            polls: 0,
            // Every poll costs well over 8 cycles.
            max_polls: cycles / 8 + 64,
        }
    }

    /// Restarts the bound from now (after progress).
    pub fn restart(&mut self, m: &mut dyn Machine) {
        self.start = m.tsc();
        self.polls = 0;
    }

    /// Counts one poll; true once the bound has passed (the TSC is read every 64 polls).
    pub fn expired(&mut self, m: &mut dyn Machine) -> bool {
        self.polls += 1;
        self.polls.is_multiple_of(64) && (m.tsc().wrapping_sub(self.start) > self.cycles || self.polls > self.max_polls)
    }
}

/// The transmit side: queue 1, its buffers and free descriptors.
#[derive(Debug)]
pub struct Tx {
    dma: Dma,
    q: SplitQueue,
    busy: [bool; QMAX],
    free: [u16; QMAX],
    free_len: usize,
    unpublished: usize,
    frames: u64,
    done: u64,
    kicks: u64,
    suppressed: u64,
}

impl Tx {
    fn new(dma: Dma, q: SplitQueue) -> Self {
        let mut tx = Tx {
            dma,
            q,
            busy: [false; QMAX],
            free: [0; QMAX],
            free_len: 0,
            unpublished: 0,
            frames: 0,
            done: 0,
            kicks: 0,
            suppressed: 0,
        };
        let n = tx.q.size();
        for i in 0..n {
            // A stack: descriptor 0 is handed out first.
            if let Some(slot) = tx.free.get_mut(usize::from(n - 1 - i)) {
                *slot = i;
            }
        }
        tx.free_len = usize::from(n);
        tx
    }

    /// Free TX descriptors (reclaim first to count finished ones).
    pub fn free(&self) -> usize {
        self.free_len
    }

    /// The descriptor (= buffer) index the next [`Self::queue`] will use, if any is free.
    pub fn next_id(&self) -> Option<u16> {
        self.free.get(self.free_len.checked_sub(1)?).copied()
    }

    /// Frames handed to the device (published or not) and not yet reclaimed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.q.size()) - self.free_len
    }

    /// Queues one frame of `len` bytes (14 ≤ len ≤ [`MAX_FRAME`]) that `fill` writes into its
    /// buffer (the whole `len` bytes must be written: the buffer holds an older frame).
    /// Visible to the device after [`Net::flush_tx`].
    pub fn queue<F: FnOnce(&mut [u8])>(&mut self, len: usize, fill: F) -> Result<(), NetError> {
        if !(14..=MAX_FRAME).contains(&len) {
            return Err(NetError::BadFrame(len));
        }
        let top = self.free_len.checked_sub(1).ok_or(NetError::TxFull)?;
        let id = self.free.get(top).copied().ok_or(NetError::TxFull)?;
        let off = BUF_OFF + usize::from(id) * BUF_BYTES;
        let buf = self.dma.bytes_mut(off, HDR_LEN + len).ok_or(NetError::DmaTooSmall)?;
        let (hdr, frame) = buf.split_at_mut(HDR_LEN);
        hdr.fill(0);
        fill(frame);
        let addr = self.dma.phys(off);
        let total = u32::try_from(HDR_LEN + len).map_err(|_| NetError::BadFrame(len))?;
        self.q.set_desc(&mut self.dma, id, addr, total, 0, 0);
        self.q.push(&mut self.dma, id);
        self.free_len = top;
        if let Some(b) = self.busy.get_mut(usize::from(id)) {
            *b = true;
        }
        self.unpublished += 1;
        self.frames += 1;
        Ok(())
    }

    /// Takes back every TX descriptor the device finished with; returns how many.
    pub fn reclaim(&mut self) -> Result<usize, NetError> {
        let pending = self.q.used_pending(&self.dma);
        let published = self.in_flight() - self.unpublished;
        if usize::from(pending) > published {
            return Err(NetError::BadUsedCount { queue: TX_QUEUE, n: pending });
        }
        for _ in 0..pending {
            let e = self.q.pop_used(&self.dma);
            let bad = NetError::BadUsedId { queue: TX_QUEUE, id: e.id };
            let id = u16::try_from(e.id).map_err(|_| bad)?;
            match self.busy.get_mut(usize::from(id)) {
                Some(b) if *b => *b = false,
                _ => return Err(bad),
            }
            *self.free.get_mut(self.free_len).ok_or(bad)? = id;
            self.free_len += 1;
            self.done += 1;
        }
        Ok(usize::from(pending))
    }
}

/// The driver.
#[derive(Debug)]
pub struct Net {
    t: Transport,
    rx_dma: Dma,
    rx: SplitQueue,
    rx_posted: [bool; QMAX],
    rx_in_flight: usize,
    tx: Tx,
    info: NetInfo,
    rx_frames: u64,
    rx_bad_len: u64,
    rx_kicks: u64,
    rx_suppressed: u64,
}

impl Net {
    /// Resets the device, negotiates (VERSION_1, MAC, STATUS only), sets up both queues in
    /// `dma` (at least [`NET_DMA_BYTES`]; only the first [`NET_DMA_BYTES`] are used), reads
    /// the MAC, sets DRIVER_OK and posts every RX buffer (one notify). On failure the device
    /// is left FAILED.
    pub fn init(m: &mut dyn Machine, t: Transport, dma: &'static mut [u8]) -> Result<Net, NetError> {
        if dma.len() < NET_DMA_BYTES {
            return Err(NetError::DmaTooSmall);
        }
        let (rx_mem, rest) = dma.split_at_mut(HALF_BYTES);
        let tx_mem = rest.get_mut(..HALF_BYTES).ok_or(NetError::DmaTooSmall)?;
        let mut rx_dma = Dma::new(rx_mem);
        let mut tx_dma = Dma::new(tx_mem);
        match Self::handshake(m, &t, &mut rx_dma, &mut tx_dma) {
            Ok((rx, txq, info)) => {
                let mut net = Net {
                    t,
                    rx_dma,
                    rx,
                    rx_posted: [false; QMAX],
                    rx_in_flight: 0,
                    tx: Tx::new(tx_dma, txq),
                    info,
                    rx_frames: 0,
                    rx_bad_len: 0,
                    rx_kicks: 0,
                    rx_suppressed: 0,
                };
                net.post_all_rx(m);
                Ok(net)
            }
            Err(e) => {
                t.add_status(m, status::FAILED);
                Err(e)
            }
        }
    }

    fn handshake(
        m: &mut dyn Machine,
        t: &Transport,
        rx_dma: &mut Dma,
        tx_dma: &mut Dma,
    ) -> Result<(SplitQueue, SplitQueue, NetInfo), NetError> {
        let (offered, features) = t.negotiate(m, ACCEPTED)?;
        let rx = t.setup_queue(m, rx_dma, RX_QUEUE, Q_OFF)?;
        let tx = t.setup_queue(m, tx_dma, TX_QUEUE, Q_OFF)?;
        let (mac, mac_from_device) =
            if features & F_MAC != 0 { (t.config_bytes::<6>(m, 0)?, true) } else { (DEFAULT_MAC, false) };
        let info = NetInfo { mac, mac_from_device, offered, features, rx_size: rx.size(), tx_size: tx.size() };
        t.driver_ok(m)?;
        Ok((rx, tx, info))
    }

    /// Points every RX descriptor at its buffer and posts them all (one notify).
    fn post_all_rx(&mut self, m: &mut dyn Machine) {
        for i in 0..self.rx.size() {
            let addr = self.rx_dma.phys(BUF_OFF + usize::from(i) * BUF_BYTES);
            self.rx.set_desc(&mut self.rx_dma, i, addr, BUF_BYTES_U32, DESC_F_WRITE, 0);
            self.rx.push(&mut self.rx_dma, i);
            self.set_posted(i, true);
        }
        self.rx_in_flight = usize::from(self.rx.size());
        self.rx.publish(&mut self.rx_dma);
        self.t.notify(m, RX_QUEUE);
        self.rx_kicks += 1;
    }

    fn set_posted(&mut self, i: u16, v: bool) {
        if let Some(p) = self.rx_posted.get_mut(usize::from(i)) {
            *p = v;
        }
    }

    /// What the device reported.
    pub fn info(&self) -> &NetInfo {
        &self.info
    }

    /// The driver's counters.
    pub fn stats(&self) -> NetStats {
        NetStats {
            tx_frames: self.tx.frames,
            tx_done: self.tx.done,
            tx_kicks: self.tx.kicks,
            tx_suppressed: self.tx.suppressed,
            rx_suppressed: self.rx_suppressed,
            rx_frames: self.rx_frames,
            rx_bad_len: self.rx_bad_len,
            rx_kicks: self.rx_kicks,
        }
    }

    /// Link status: `Some(up)` with VIRTIO_NET_F_STATUS, `None` (assume up) without.
    pub fn link_up(&self, m: &mut dyn Machine) -> Option<bool> {
        if self.info.features & F_STATUS == 0 {
            return None;
        }
        Some(self.t.config_u16(m, 6) & S_LINK_UP != 0)
    }

    /// The transmit side.
    pub fn tx(&mut self) -> &mut Tx {
        &mut self.tx
    }

    /// Publishes the queued TX frames and notifies the device once, unless it set
    /// VIRTQ_USED_F_NO_NOTIFY (it is processing the queue and will see them). Nothing if
    /// none are queued. Returns whether a notify was sent.
    pub fn flush_tx(&mut self, m: &mut dyn Machine) -> bool {
        if self.tx.unpublished == 0 {
            return false;
        }
        self.tx.unpublished = 0;
        if !self.tx.q.publish_and_check(&mut self.tx.dma) {
            self.tx.suppressed += 1;
            return false;
        }
        self.t.notify(m, TX_QUEUE);
        self.tx.kicks += 1;
        true
    }

    /// Hands up to `max` received frames (without the virtio header) to `f`, with the TX side
    /// so `f` may queue replies; re-posts their buffers and, if any, notifies the device once.
    /// Buffers with an impossible length are counted ([`NetStats::rx_bad_len`]) and
    /// re-posted. Returns the frames handed to `f`.
    pub fn poll_rx<F: FnMut(&[u8], &mut Tx)>(
        &mut self,
        m: &mut dyn Machine,
        max: usize,
        mut f: F,
    ) -> Result<usize, NetError> {
        let pending = self.rx.used_pending(&self.rx_dma);
        if usize::from(pending) > self.rx_in_flight {
            return Err(NetError::BadUsedCount { queue: RX_QUEUE, n: pending });
        }
        let take = usize::from(pending).min(max);
        let mut delivered = 0;
        for _ in 0..take {
            let e = self.rx.pop_used(&self.rx_dma);
            let id = match u16::try_from(e.id) {
                Ok(id) if self.rx_posted.get(usize::from(id)).copied().unwrap_or(false) => id,
                _ => return Err(NetError::BadUsedId { queue: RX_QUEUE, id: e.id }),
            };
            self.set_posted(id, false);
            self.rx_in_flight -= 1;
            let len = usize::try_from(e.len).unwrap_or(usize::MAX);
            if !(HDR_LEN..=BUF_BYTES).contains(&len) {
                self.rx_bad_len += 1;
            } else {
                let off = BUF_OFF + usize::from(id) * BUF_BYTES + HDR_LEN;
                if let Some(frame) = self.rx_dma.bytes_mut(off, len - HDR_LEN) {
                    f(frame, &mut self.tx);
                    delivered += 1;
                    self.rx_frames += 1;
                }
            }
            self.rx.push(&mut self.rx_dma, id);
            self.set_posted(id, true);
            self.rx_in_flight += 1;
        }
        if take != 0 {
            if self.rx.publish_and_check(&mut self.rx_dma) {
                self.t.notify(m, RX_QUEUE);
                self.rx_kicks += 1;
            } else {
                self.rx_suppressed += 1;
            }
        }
        Ok(delivered)
    }

    /// Waits (bounded by `cycles`) until every TX frame is reclaimed (publishing any queued).
    pub fn drain_tx(&mut self, m: &mut dyn Machine, cycles: u64) -> Result<(), NetError> {
        self.flush_tx(m);
        let mut d = Deadline::new(m, cycles);
        loop {
            self.tx.reclaim()?;
            if self.tx.in_flight() == 0 {
                return Ok(());
            }
            if d.expired(m) {
                return Err(self.timeout(m));
            }
            m.pause();
        }
    }

    /// A [`NetError::Timeout`] with the current device status.
    pub fn timeout(&self, m: &mut dyn Machine) -> NetError {
        NetError::Timeout { status: self.t.read(m, reg::STATUS), tx_in_flight: self.tx.in_flight() }
    }

    /// Resets the device so it stops using our memory (bounded; errors ignored).
    pub fn shutdown(&mut self, m: &mut dyn Machine) {
        let _ = self.t.reset(m);
        self.rx_in_flight = 0;
        self.rx_posted = [false; QMAX];
        self.tx.busy = [false; QMAX];
        self.tx.free_len = 0;
        self.tx.unpublished = 0;
    }
}
