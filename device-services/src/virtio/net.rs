//! The virtio-net device (id 1): RX queue 0, TX queue 1, a TAP fd the core opened
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, vnet header size 12) as the back end.
//!
//! Features: `VERSION_1`, `MAC`, `STATUS` (link always up), `EVENT_IDX`; no offloads and no
//! mergeable RX buffers, so every buffer starts with a 12-byte `virtio_net_hdr_v1` whose fields
//! are all zero except `num_buffers = 1` on RX.
//!
//! Data path, with no copy through the service:
//! * TX: each chain is parsed by the pure [`parse_tx`], then the frame is sent with one `writev`
//!   of our own zero header plus the guest's frame bytes straight from guest memory (the guest's
//!   header is never passed to the kernel: nothing was negotiated that it could ask for).
//! * RX: available RX chains are parsed ([`parse_rx`]) and held; while any is held the TAP fd is
//!   watched and each frame is `readv`'d straight into the oldest held buffer. With no buffer
//!   held the TAP is not read (back-pressure: frames wait in the TAP's queue). A frame that does
//!   not fit its buffer is dropped and counted; the buffer is reused.
//!
//! The transport raises the interrupt once per `process_queue` batch. In-flight tracking follows
//! [`super::tracked`]: a TX chain in flight when the service died is sent again; held RX buffers
//! are in flight and are simply reused by the next instance.
//!
//! Hostile chains (zero length, shorter than a header plus an Ethernet header, longer than
//! [`MAX_PACKET`], outside guest RAM, in the wrong direction, looping) are completed with used
//! length 0 and counted in [`NetStats`]; nothing the guest writes makes the service panic.
//!
//! Rate limiting ([`Net::set_rate_limit`]): one [`Throttle`] per direction, each charged the
//! frame bytes (without the header) and one operation per frame. A throttled TX leaves chains
//! in the TX queue; a throttled RX stops reading the TAP (the kernel queues or drops, as for any
//! slow receiver). [`NetHandler`] then sleeps until the tokens are due.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use ipc::control::RateLimit;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use super::mmio::{reg, status, MmioTransport};
use super::request::{take_front, Segment};
use super::{DeviceError, QueueCtx, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::memory::GuestMem;
use crate::ratelimit::Throttle;
use crate::runtime::{MmioHandler, RuntimeError};

/// Virtio device ID of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Bytes of `virtio_net_hdr_v1` (including `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Bytes of an Ethernet header: the shortest frame the TAP accepts.
pub const ETH_HLEN: usize = 14;
/// Largest packet (header plus frame) accepted on TX or delivered on RX.
pub const MAX_PACKET: usize = 65550;
/// Most descriptors in one chain (with our header, the `writev` stays below `IOV_MAX`).
pub const MAX_DESCRIPTORS: usize = 1022;
/// `VIRTIO_NET_F_MAC`.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
/// Config space: `mac[6]`, `status: u16`, `max_virtqueue_pairs: u16`.
pub const CONFIG_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
const HDR_GSO_NONE: u8 = 0;
/// Most complaints logged (then silence).
const MAX_COMPLAINTS: u32 = 20;

/// Errors of the net device: bad construction parameters, and why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Queue size unusable.
    #[error("queue size {0} (power of two, 2..=32768)")]
    QueueSize(u16),
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain ends in a descriptor that still claims a successor (a loop or a bad index).
    #[error("chain truncated (loop or bad next index)")]
    Truncated,
    /// A device-writable descriptor in a TX chain, or a device-readable one in an RX chain.
    #[error("descriptor in the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest RAM.
    #[error("buffer {addr:#x}+{len:#x} outside guest RAM")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Too short for a header (plus an Ethernet header on TX); zero-length chains included.
    #[error("chain of {0} bytes is too short")]
    TooShort(u64),
    /// A TX packet longer than [`MAX_PACKET`].
    #[error("packet of at least {0} bytes is too long")]
    TooBig(u64),
}

/// A TX chain checked against guest memory: the frame after the 12-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame {
    /// The frame's bytes (every range inside guest RAM, readable).
    pub frame: Vec<Segment>,
    /// Total length of `frame`.
    pub len: u64,
}

/// An RX buffer checked against guest memory (capped at [`MAX_PACKET`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    /// Head descriptor index (the used id).
    pub head: u16,
    /// The writable ranges, in order.
    pub segs: Vec<Segment>,
    /// Total length of `segs`.
    pub cap: u64,
}

/// Counters of a net device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Frame bytes written to the TAP (without headers).
    pub tx_bytes: u64,
    /// TX chains refused by [`parse_tx`] (completed, nothing sent).
    pub tx_dropped: u64,
    /// TX frames the TAP refused (`writev` failed).
    pub tx_errors: u64,
    /// Frames delivered into guest RX buffers.
    pub rx_frames: u64,
    /// Frame bytes delivered (without headers).
    pub rx_bytes: u64,
    /// Frames read from the TAP and dropped (did not fit the buffer, or carried offload
    /// metadata that was not negotiated).
    pub rx_dropped: u64,
    /// RX chains refused by [`parse_rx`] (completed with length 0).
    pub rx_bad_chains: u64,
    /// `readv` failures other than "no frame".
    pub rx_errors: u64,
    /// Times TX had to wait for rate-limit tokens.
    pub tx_throttled: u64,
    /// Times RX had to wait for rate-limit tokens (the TAP left unread).
    pub rx_throttled: u64,
}

impl std::fmt::Display for NetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tx_frames={} tx_bytes={} tx_dropped={} tx_errors={} rx_frames={} rx_bytes={} rx_dropped={} \
             rx_bad_chains={} rx_errors={} tx_throttled={} rx_throttled={}",
            self.tx_frames,
            self.tx_bytes,
            self.tx_dropped,
            self.tx_errors,
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_bad_chains,
            self.rx_errors,
            self.tx_throttled,
            self.rx_throttled
        )
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Collects the descriptors of a chain in one direction, checking each against guest memory.
/// Returns the non-empty ranges and their total (stopping early past `limit` bytes if `strict`).
fn collect<M, I>(mem: &M, descs: I, writable: bool, limit: u64, strict: bool) -> Result<(Vec<Segment>, u64), NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let perm = if writable { Permissions::Write } else { Permissions::Read };
    let mut segs = Vec::new();
    let mut sum = 0u64;
    let mut last_next = false;
    for (count, d) in descs.into_iter().enumerate() {
        if count == MAX_DESCRIPTORS {
            return Err(NetError::TooLong);
        }
        if d.is_write_only() != writable {
            return Err(NetError::WrongDirection);
        }
        let len = d.len();
        sum = sum.saturating_add(u64::from(len));
        if strict && sum > limit {
            return Err(NetError::TooBig(sum));
        }
        if len > 0 {
            let Ok(ulen) = usize::try_from(len) else {
                return Err(NetError::OutsideMemory { addr: d.addr().0, len });
            };
            if !mem.check_range(d.addr(), ulen, perm) {
                return Err(NetError::OutsideMemory { addr: d.addr().0, len });
            }
            segs.push(Segment { addr: d.addr(), len });
        }
        last_next = d.has_next();
    }
    if last_next {
        return Err(NetError::Truncated);
    }
    Ok((segs, sum))
}

/// Parses a TX chain: only device-readable descriptors, each inside guest RAM, at most
/// [`MAX_DESCRIPTORS`], a 12-byte header plus a frame of at least [`ETH_HLEN`] bytes, at most
/// [`MAX_PACKET`] bytes in all. Pure: reads nothing but the descriptors' ranges' validity.
pub fn parse_tx<M, I>(mem: &M, descs: I) -> Result<TxFrame, NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let (mut segs, sum) = collect(mem, descs, false, MAX_PACKET as u64, true)?;
    if sum < (HDR_LEN + ETH_HLEN) as u64 {
        return Err(NetError::TooShort(sum));
    }
    take_front(&mut segs, HDR_LEN as u64);
    Ok(TxFrame { len: total(&segs), frame: segs })
}

/// Parses an RX chain: only device-writable descriptors, each inside guest RAM, room for at
/// least the header and an Ethernet header. Space beyond [`MAX_PACKET`] is not used.
pub fn parse_rx<M, I>(mem: &M, head: u16, descs: I) -> Result<RxBuffer, NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let (mut segs, sum) = collect(mem, descs, true, u64::MAX, false)?;
    if sum < (HDR_LEN + ETH_HLEN) as u64 {
        return Err(NetError::TooShort(sum));
    }
    let segs = take_front(&mut segs, MAX_PACKET as u64);
    Ok(RxBuffer { head, cap: total(&segs), segs })
}

/// Guest slices for `segs` (an error if any is not backed by guest memory).
fn slices<'m>(mem: &'m GuestMem, segs: &[Segment], perm: Permissions) -> io::Result<Vec<VolatileSlice<'m, ()>>> {
    let efault = || io::Error::from_raw_os_error(libc::EFAULT);
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| efault())?;
        for sl in mem.get_slices(s.addr, len, perm).map_err(|_| efault())? {
            out.push(sl.map_err(|_| efault())?);
        }
    }
    if out.len() > MAX_DESCRIPTORS + 1 {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    Ok(out)
}

/// Writes `bytes` at the start of the buffer `segs` (which holds at least that many bytes).
fn write_front(mem: &GuestMem, segs: &[Segment], bytes: &[u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - done);
        if mem.write_slice(&bytes[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == bytes.len()
}

/// Reads the first `out.len()` bytes of the buffer `segs`.
fn read_front(mem: &GuestMem, segs: &[Segment], out: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - done);
        if mem.read_slice(&mut out[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// A virtio-net device over a TAP fd.
#[derive(Debug)]
pub struct Net {
    tap: OwnedFd,
    config: [u8; CONFIG_LEN],
    queue_size: u16,
    features: u64,
    /// RX buffers taken from the queue and not yet filled (oldest first).
    rx_held: VecDeque<RxBuffer>,
    stats: NetStats,
    shared: Rc<Cell<NetStats>>,
    complaints: u32,
    tx_throttle: Throttle,
    rx_throttle: Throttle,
}

impl Net {
    /// A device with MAC `mac` over `tap` (non-blocking, vnet header size 12), with queues of
    /// up to `queue_size` entries.
    pub fn new(tap: OwnedFd, mac: [u8; 6], queue_size: u16) -> Result<Self, NetError> {
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(NetError::QueueSize(queue_size));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            tap,
            config,
            queue_size,
            features: F_VERSION_1 | F_EVENT_IDX | F_MAC | F_STATUS,
            rx_held: VecDeque::new(),
            stats: NetStats::default(),
            shared: Rc::new(Cell::new(NetStats::default())),
            complaints: 0,
            tx_throttle: Throttle::unlimited(),
            rx_throttle: Throttle::unlimited(),
        })
    }

    /// The TAP fd (to keep open in a jail).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// A handle that always shows the latest counters (e.g. to log them after serving ends).
    pub fn stats_handle(&self) -> Rc<Cell<NetStats>> {
        Rc::clone(&self.shared)
    }

    /// RX buffers held, waiting for frames.
    pub fn rx_buffers_held(&self) -> usize {
        self.rx_held.len()
    }

    /// Limits each direction to `limit` (TX and RX have a bucket pair each). Enforced once
    /// [`arm_rate_limit`](Self::arm_rate_limit) is called; frames are charged from the start.
    pub fn set_rate_limit(&mut self, limit: &RateLimit) {
        self.tx_throttle = Throttle::new(limit);
        self.rx_throttle = Throttle::new(limit);
    }

    /// Starts enforcing the rate limit: after the chains in flight at a restart were redone
    /// ([`NetHandler::new`] does).
    pub fn arm_rate_limit(&self) {
        self.tx_throttle.arm();
        self.rx_throttle.arm();
    }

    /// Whether RX may read a frame from the TAP now (rate limit).
    pub fn rx_admissible(&self) -> bool {
        self.rx_throttle.admissible(self.rx_throttle.now())
    }

    /// How long until throttled work can go: TX chains waiting, or held RX buffers while the
    /// TAP is left unread. `None`: nothing waits, or it can go now.
    pub fn throttle_wait(&self) -> Option<Duration> {
        let tx = self.tx_throttle.wake_after(self.tx_throttle.now());
        let rx = if self.rx_held.is_empty() { None } else { self.rx_throttle.wait(self.rx_throttle.now()) };
        tx.into_iter().chain(rx).min()
    }

    /// Whether TX chains wait for tokens.
    pub fn tx_throttled(&self) -> bool {
        self.tx_throttle.wake_after(self.tx_throttle.now()).is_some()
    }

    fn complain(&mut self, what: &str) {
        if self.complaints < MAX_COMPLAINTS {
            self.complaints += 1;
            eprintln!("virtio-net: {what}");
        }
    }

    /// Sends one parsed frame: our zero header, then the guest's bytes, in one `writev`.
    fn send(&self, mem: &GuestMem, frame: &TxFrame) -> io::Result<()> {
        let hdr = [0u8; HDR_LEN];
        let sl = slices(mem, &frame.frame, Permissions::Read)?;
        let guards: Vec<_> = sl.iter().map(|s| s.ptr_guard()).collect();
        let mut iov = Vec::with_capacity(sl.len() + 1);
        iov.push(libc::iovec { iov_base: hdr.as_ptr().cast_mut().cast(), iov_len: HDR_LEN });
        iov.extend(
            guards
                .iter()
                .zip(&sl)
                .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast_mut().cast(), iov_len: s.len() }),
        );
        let cnt = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        for _ in 0..8 {
            // SAFETY: every iovec points at `hdr` (alive until the end of this function) or into
            // guest memory kept mapped by `guards`, each with its exact length; the kernel only
            // reads them.
            let n = unsafe { libc::writev(self.tap.as_raw_fd(), iov.as_ptr(), cnt) };
            if n >= 0 {
                // A TAP write takes the whole packet or nothing.
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Err(io::Error::from_raw_os_error(libc::EINTR))
    }

    /// Reads one frame (with its vnet header) into `buf`. Returns the packet length the TAP
    /// reported, which exceeds `buf.cap` when the frame did not fit (it is then truncated).
    fn receive(&self, mem: &GuestMem, buf: &RxBuffer) -> io::Result<u64> {
        let sl = slices(mem, &buf.segs, Permissions::Write)?;
        let guards: Vec<_> = sl.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&sl)
            .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: s.len() })
            .collect();
        // One byte past the buffer: a frame that reaches it did not fit (the TAP truncates
        // silently on some kernels and reports the full length on others).
        let mut spill = [0u8; 1];
        iov.push(libc::iovec { iov_base: spill.as_mut_ptr().cast(), iov_len: spill.len() });
        let cnt = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        // SAFETY: every iovec points into guest memory kept mapped by `guards`, or at `spill`
        // (alive until the end of this function), with its exact length; the kernel writes at
        // most that much into each, and no Rust reference aliases guest memory (it is only
        // accessed volatilely).
        let n = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), cnt) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        u64::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EIO))
    }

    fn process_tx(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        let mut done = 0;
        for _ in 0..queue.size() {
            if !self.tx_throttle.admit(self.tx_throttle.now()) {
                self.stats.tx_throttled = self.tx_throttle.refusals();
                break;
            }
            let Some(chain) = queue.pop()? else { break };
            let head = chain.head_index();
            let parsed = parse_tx(mem, chain);
            self.tx_throttle.charge(parsed.as_ref().map_or(0, |f| f.len), 1, self.tx_throttle.now());
            match parsed {
                Ok(frame) => match self.send(mem, &frame) {
                    Ok(()) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame.len;
                    }
                    Err(e) => {
                        self.stats.tx_errors += 1;
                        self.complain(&format!("TX frame of {} bytes refused by the TAP: {e}", frame.len));
                    }
                },
                Err(e) => {
                    self.stats.tx_dropped += 1;
                    self.complain(&format!("TX chain {head} dropped: {e}"));
                }
            }
            queue.add_used(head, 0)?;
            done += 1;
        }
        Ok(done)
    }

    fn process_rx(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        let size = usize::from(queue.size());
        let mut done = 0;
        // Take every available buffer (at most a queue's worth held).
        for _ in 0..size {
            if self.rx_held.len() >= size {
                break;
            }
            let Some(chain) = queue.pop()? else { break };
            let head = chain.head_index();
            match parse_rx(mem, head, chain) {
                Ok(buf) => self.rx_held.push_back(buf),
                Err(e) => {
                    self.stats.rx_bad_chains += 1;
                    self.complain(&format!("RX chain {head} refused: {e}"));
                    queue.add_used(head, 0)?;
                    done += 1;
                }
            }
        }
        // Fill them with whatever the TAP has, one frame per buffer.
        for _ in 0..size {
            let Some(buf) = self.rx_held.front() else { break };
            if !self.rx_throttle.admit(self.rx_throttle.now()) {
                self.stats.rx_throttled = self.rx_throttle.refusals();
                break;
            }
            let got = self.receive(mem, buf);
            if let Ok(n) = got {
                self.rx_throttle.charge(n.saturating_sub(HDR_LEN as u64), 1, self.rx_throttle.now());
            }
            match got {
                Ok(n) if n > buf.cap || n < (HDR_LEN + ETH_HLEN) as u64 => {
                    // Did not fit (it reached the spill byte, or the TAP reported its full length).
                    self.stats.rx_dropped += 1;
                }
                Ok(n) => {
                    let mut hdr = [0u8; HDR_LEN];
                    let segs = &buf.segs;
                    if !read_front(mem, segs, &mut hdr) {
                        self.stats.rx_errors += 1;
                        break;
                    }
                    if hdr[0] & HDR_F_NEEDS_CSUM != 0 || hdr[1] != HDR_GSO_NONE {
                        // Offload metadata the guest did not negotiate: the frame is unusable.
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    let mut ours = [0u8; HDR_LEN];
                    ours[10..12].copy_from_slice(&1u16.to_le_bytes());
                    if !write_front(mem, segs, &ours) {
                        self.stats.rx_errors += 1;
                        break;
                    }
                    let head = buf.head;
                    self.rx_held.pop_front();
                    // n <= cap <= MAX_PACKET, which fits a u32.
                    queue.add_used(head, u32::try_from(n).unwrap_or(u32::MAX))?;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += n - HDR_LEN as u64;
                    done += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL)) => {
                    // Kernels that fail the read of a frame larger than the buffer (it is consumed).
                    self.stats.rx_dropped += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.rx_errors += 1;
                    self.complain(&format!("reading the TAP: {e}"));
                    break;
                }
            }
        }
        Ok(done)
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        super::read_config_bytes(&self.config, offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
        false
    }

    fn process_queue(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let r = match queue.index() {
            RX_QUEUE => self.process_rx(queue),
            TX_QUEUE => self.process_tx(queue),
            other => Err(DeviceError::Queue { queue: other, what: "no such queue".into(), source: None }),
        };
        self.shared.set(self.stats);
        r
    }

    fn reset(&mut self) {
        self.rx_held.clear();
        self.tx_throttle.clear_wait();
    }
}

/// The net device as the service runtime serves it: the transport, plus the TAP fd watched
/// (while RX buffers are held) and read while the service spins.
#[derive(Debug)]
pub struct NetHandler {
    transport: MmioTransport<Net>,
}

impl NetHandler {
    /// Wraps a transport (restored, if it had saved state) and arms the device's rate limit.
    pub fn new(transport: MmioTransport<Net>) -> Self {
        transport.device().arm_rate_limit();
        Self { transport }
    }

    /// The transport.
    pub fn transport(&self) -> &MmioTransport<Net> {
        &self.transport
    }

    /// Whether frames can be delivered now (device running, buffers held, RX tokens).
    fn rx_ready(&self) -> bool {
        let st = self.transport.status();
        st & (status::DRIVER_OK | status::NEEDS_RESET | status::FAILED) == status::DRIVER_OK
            && self.transport.device().rx_buffers_held() > 0
            && self.transport.device().rx_admissible()
    }

    /// Runs the RX queue (through the transport's QueueNotify path, which batches the
    /// interrupt). Returns whether anything was delivered.
    fn run_rx(&mut self) -> bool {
        let before = self.transport.device().stats().rx_frames;
        self.transport.write(reg::QUEUE_NOTIFY, &u32::from(RX_QUEUE).to_le_bytes());
        self.transport.device().stats().rx_frames != before
    }
}

impl MmioHandler for NetHandler {
    fn read(&mut self, offset: u64, data: &mut [u8]) -> bool {
        self.transport.read(offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        self.transport.write(offset, data)
    }

    fn event_fds(&self) -> Vec<RawFd> {
        let mut v = self.transport.event_fds();
        if self.rx_ready() {
            v.push(self.transport.device().tap_fd());
        }
        v
    }

    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        if fd == self.transport.device().tap_fd() {
            if self.rx_ready() {
                self.run_rx();
            }
            return Ok(());
        }
        self.transport.on_event(fd)
    }

    fn poll(&mut self) -> Result<bool, RuntimeError> {
        let mut did = self.transport.poll()?;
        if self.rx_ready() {
            did |= self.run_rx();
        }
        Ok(did)
    }

    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError> {
        let pending = self.transport.prepare_sleep()?;
        if pending && self.transport.device().tx_throttled() {
            // TX chains waiting for tokens are no reason to stay awake (`wake_after` ends the
            // sleep when they are due); take whatever else arrived (RX buffers) first.
            return self.poll();
        }
        Ok(pending)
    }

    fn wake_after(&self) -> Option<Duration> {
        self.transport.device().throttle_wait()
    }

    fn redone(&self) -> u64 {
        self.transport.redone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MEM: usize = 0x4000;

    fn guest(bytes: &[u8]) -> GuestMem {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
        m.write_slice(bytes, GuestAddress(0)).expect("fill");
        m
    }

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut f = 0u16;
        if write {
            f |= u16::try_from(VRING_DESC_F_WRITE).expect("flag");
        }
        if next {
            f |= u16::try_from(VRING_DESC_F_NEXT).expect("flag");
        }
        Descriptor::new(addr, len, f, 0)
    }

    /// A pipe standing in for the TAP: the write end is the "TAP" for TX.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        (r, w)
    }

    #[test]
    fn tx_parser_splits_the_header_and_refuses_hostile_chains() {
        let m = guest(&[0u8; MEM]);
        let f = parse_tx(&m, [d(0x100, 8, false, true), d(0x200, 70, false, false)]).expect("valid");
        assert_eq!(f.len, 66);
        assert_eq!(f.frame, vec![Segment { addr: GuestAddress(0x204), len: 66 }]);
        let cases: Vec<(Vec<Descriptor>, NetError)> = vec![
            (vec![], NetError::TooShort(0)),
            (vec![d(0x100, 0, false, false)], NetError::TooShort(0)),
            (vec![d(0x100, 20, false, false)], NetError::TooShort(20)),
            (vec![d(0x100, 60, true, false)], NetError::WrongDirection),
            (vec![d(0x100, 12, false, true), d(0x200, 60, true, false)], NetError::WrongDirection),
            (vec![d(0x3fff, 60, false, false)], NetError::OutsideMemory { addr: 0x3fff, len: 60 }),
            (vec![d(0x100, 60, false, true)], NetError::Truncated),
        ];
        for (descs, want) in cases {
            assert_eq!(parse_tx(&m, descs.clone()), Err(want), "{descs:?}");
        }
        // More than 64 KiB from in-range descriptors (the same page over and over).
        let many: Vec<Descriptor> = (0..30).map(|_| d(0, 0x1000, false, true)).collect();
        assert_eq!(parse_tx(&m, many), Err(NetError::TooBig(17 * 0x1000)));
        let long: Vec<Descriptor> = (0..=MAX_DESCRIPTORS).map(|_| d(0x100, 1, false, true)).collect();
        assert_eq!(parse_tx(&m, long), Err(NetError::TooLong));
    }

    #[test]
    fn rx_parser_caps_and_refuses() {
        let m = guest(&[0u8; MEM]);
        let b = parse_rx(&m, 3, [d(0x100, 6, true, true), d(0x200, 2042, true, false)]).expect("valid");
        assert_eq!((b.head, b.cap), (3, 2048));
        assert_eq!(parse_rx(&m, 0, [d(0x100, 2048, false, false)]), Err(NetError::WrongDirection));
        assert_eq!(parse_rx(&m, 0, [d(0x100, 20, true, false)]), Err(NetError::TooShort(20)));
        assert!(matches!(parse_rx(&m, 0, [d(0x1_0000, 2048, true, false)]), Err(NetError::OutsideMemory { .. })));
    }

    #[test]
    fn config_space_reads_at_every_width() {
        let (_r, w) = pipe();
        let n = Net::new(w, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 256).expect("net");
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            assert!(n.read_config(i as u64, &mut one));
            *b = one[0];
        }
        assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let mut two = [0u8; 2];
        assert!(n.read_config(6, &mut two));
        assert_eq!(u16::from_le_bytes(two), S_LINK_UP);
        let mut four = [0u8; 4];
        assert!(n.read_config(0, &mut four));
        assert_eq!(four, [0x52, 0x54, 0, 0x12]);
        assert!(!n.read_config(8, &mut four), "past the end");
        assert_eq!(n.features() & (F_VERSION_1 | F_MAC | F_STATUS), F_VERSION_1 | F_MAC | F_STATUS);
        let (_r2, w2) = pipe();
        assert_eq!(Net::new(w2, [0; 6], 100).err(), Some(NetError::QueueSize(100)));
    }

    fn descriptor() -> impl Strategy<Value = Descriptor> {
        let addr = prop_oneof![0u64..MEM as u64, (MEM as u64 - 64)..(MEM as u64 + 64), any::<u64>()];
        let len = prop_oneof![0u32..64, 0u32..4096, Just(12u32), any::<u32>()];
        (addr, len, 0u16..8, 0u16..20).prop_map(|(a, l, f, n)| Descriptor::new(a, l, f, n))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The TX parser over random memory and descriptor lists: never panics, and an accepted
        /// frame only names readable guest memory, is at least an Ethernet header and at most
        /// MAX_PACKET with its header.
        #[test]
        fn tx_parser_accepts_only_sound_frames(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            descs in proptest::collection::vec(descriptor(), 0..12),
        ) {
            let m = guest(&bytes);
            if let Ok(f) = parse_tx(&m, descs) {
                prop_assert!(f.len >= ETH_HLEN as u64 && f.len + HDR_LEN as u64 <= MAX_PACKET as u64);
                prop_assert_eq!(total(&f.frame), f.len);
                for s in &f.frame {
                    prop_assert!(s.len > 0);
                    prop_assert!(m.check_range(s.addr, s.len as usize, Permissions::Read));
                }
            }
        }

        /// Whole TX queues of random guest memory through `process_queue` (the TAP is a pipe):
        /// never panics, completes at most what was offered, and every completed chain is
        /// counted as sent, dropped or refused.
        #[test]
        fn tx_queue_survives_random_guest_memory(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            avail_idx in 0u16..40,
            size_log in 1u32..5,
        ) {
            let m = guest(&bytes);
            let (_r, w) = pipe();
            let mut n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
            let size = 1u16 << size_log;
            let mut q = Queue::new(16).expect("queue");
            q.try_set_size(size).expect("size");
            q.try_set_desc_table_address(GuestAddress(0)).expect("desc");
            q.try_set_avail_ring_address(GuestAddress(0x1000)).expect("avail");
            q.try_set_used_ring_address(GuestAddress(0x2000)).expect("used");
            q.set_ready(true);
            m.write_obj(avail_idx, GuestAddress(0x1002)).expect("idx");
            m.write_obj(0u32, GuestAddress(0x2000)).expect("used header");
            match n.process_queue(&mut QueueCtx::untracked(TX_QUEUE, &mut q, &m)) {
                Ok(k) => {
                    prop_assert!(k <= usize::from(size.min(avail_idx)));
                    let used: u16 = m.read_obj(GuestAddress(0x2002)).expect("used");
                    prop_assert_eq!(usize::from(used), k);
                    let s = n.stats();
                    prop_assert_eq!(s.tx_frames + s.tx_dropped + s.tx_errors, k as u64);
                }
                Err(DeviceError::Queue { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    #[test]
    fn tx_writes_zero_header_and_frame_to_the_tap() {
        let m = guest(&[0u8; MEM]);
        let frame: Vec<u8> = (0..60u8).collect();
        m.write_slice(&[0xffu8; HDR_LEN], GuestAddress(0x3000)).expect("guest header");
        m.write_slice(&frame, GuestAddress(0x3000 + HDR_LEN as u64)).expect("frame");
        let (r, w) = pipe();
        let mut n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
        let mut q = Queue::new(16).expect("queue");
        q.try_set_size(4).expect("size");
        q.try_set_desc_table_address(GuestAddress(0)).expect("desc");
        q.try_set_avail_ring_address(GuestAddress(0x1000)).expect("avail");
        q.try_set_used_ring_address(GuestAddress(0x2000)).expect("used");
        q.set_ready(true);
        m.write_obj(0x3000u64, GuestAddress(0)).expect("addr");
        m.write_obj(72u32, GuestAddress(8)).expect("len");
        m.write_obj(0u16, GuestAddress(12)).expect("flags");
        m.write_obj(0u16, GuestAddress(0x1004)).expect("ring");
        m.write_obj(1u16, GuestAddress(0x1002)).expect("idx");
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(TX_QUEUE, &mut q, &m)).expect("tx"), 1);
        let mut got = [0u8; 100];
        let k = nix::unistd::read(r.as_raw_fd(), &mut got).expect("read pipe");
        assert_eq!(k, 72);
        assert_eq!(got[..HDR_LEN], [0u8; HDR_LEN], "the guest's header is not passed on");
        assert_eq!(got[HDR_LEN..72], frame[..]);
        assert_eq!(n.stats().tx_frames, 1);
        assert_eq!(n.stats_handle().get().tx_bytes, 60);
    }
}
