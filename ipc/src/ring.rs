//! The exit ring: fixed-layout records in a shared region, no serialisation.
//!
//! Layout (all offsets in bytes from the start of the region, indices are free-running `u64`s,
//! slot = index mod capacity, capacity a power of two):
//!
//! | offset | content |
//! |---|---|
//! | 0 | header: magic `u64`, version `u32`, capacity `u32`, submission record size `u32`, completion record size `u32` |
//! | 64 | submission producer index (written by the core) |
//! | 128 | submission consumer index (written by the service) |
//! | 192 | completion producer index (written by the service) |
//! | 256 | completion consumer index (written by the core) |
//! | 320 | service-sleeping flag (`u32`, written by the service) |
//! | 384 | core-sleeping flag (`u32`, written by the core) |
//! | 392 | core CPU: the CPU the core's waiting thread last ran on, plus one (`u32`, written by the core) |
//! | 448 | service heartbeat (`u64`, bumped by the service on every turn of its loop) |
//! | 456 | service CPU: the CPU the service last ran on, plus one (`u32`, written by the service) |
//! | 512 | submission ring: `capacity` × [`ExitRecord`] (32 bytes) |
//! | 512 + 32·cap | completion ring: `capacity` × [`CompletionRecord`] (24 bytes) |
//! | 512 + 56·cap, rounded up to 64 | the read mirror ([`crate::mirror`]) |
//!
//! Each side keeps private copies of the indices it produces and only *reads* the peer's, and
//! validates every value read: a submission/completion producer may never be more than `capacity`
//! ahead of the consumer, and the service may never complete more than the core submitted.
//!
//! Doorbells: a waiter spins on the peer's producer index for a while, then sets its sleeping flag,
//! issues a `SeqCst` fence, re-checks the index and only then sleeps in `poll()` on its eventfd with
//! a timeout. A producer publishes its index, fences, and writes the peer's eventfd only if the
//! peer's sleeping flag is set. The two fences order "flag store → index load" against
//! "index store → flag load", so one of the two always sees the other: no lost wake-up, and no
//! syscall on the fast path when the peer spins.
//!
//! Posted writes: a write the service's read mirror declares postable ([`crate::mirror`]) is
//! submitted like any request, but the caller does not wait for it ([`CoreEndpoint::post`]). The
//! core remembers it until its completion arrives; completions come in submission order, so the
//! completions of posted writes are consumed, and checked (sequence, length), ahead of the one a
//! later call waits for, or whenever the core looks at the mirror. At most [`MAX_POSTED`] are
//! outstanding, the mirror answers no read while any is, and when an instance dies those not
//! completed are handed to the next one ([`CoreEndpoint::take_posted`], then
//! [`CoreEndpoint::adopt`] on the new ring before it starts serving), so none is lost.
//!
//! Spinning only pays while the peer is on a CPU: on a busy host a spinning waiter burns the time
//! slice its peer needs (both on one CPU) or waits out the peer's preemption (on another). So each
//! side publishes where it runs (its CPU and, for the service, a heartbeat bumped on every turn of
//! its loop) and the core spins only while the service is awake, beating, and not parked on the
//! core's own CPU; otherwise it sleeps at once and lets the service run. The service in turn stops
//! spinning when the core it just woke does not get back on a CPU (see
//! [`ServiceEndpoint::core_off_cpu`]). These values only steer spinning: whatever the peer writes
//! there, every wait stays bounded by its deadline and no wake-up is lost.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mirror::{Mirror, MIRROR_BYTES};
use crate::region::{RegionError, SharedRegion};
use crate::wait;
use std::sync::Arc;

/// Magic at offset 0 of every ring region ("BHRING01").
pub const RING_MAGIC: u64 = 0x3130_474e_4952_4842;
/// Version of the layout described in the module docs.
pub const RING_VERSION: u32 = 2;
/// Largest supported capacity.
pub const MAX_CAPACITY: u32 = 4096;

const OFF_SUB_PROD: usize = 64;
const OFF_SUB_CONS: usize = 128;
const OFF_COMP_PROD: usize = 192;
const OFF_COMP_CONS: usize = 256;
const OFF_SERVICE_SLEEPING: usize = 320;
const OFF_CORE_SLEEPING: usize = 384;
const OFF_CORE_CPU: usize = 392;
const OFF_SERVICE_BEAT: usize = 448;
const OFF_SERVICE_CPU: usize = 456;
/// The service's I/O mark: `CLOCK_MONOTONIC` ns + 1 when it entered the I/O call it is in, or
/// that of when its last one ended with [`IO_ENDED`] set; 0: none yet.
const OFF_SERVICE_IO_SINCE: usize = 464;
/// Flag of [`OFF_SERVICE_IO_SINCE`]: the time is when the last I/O call ended.
const IO_ENDED: u64 = 1 << 63;
const OFF_SUB_RING: usize = 512;
/// Most extensions of one call's deadline for the service's I/O calls (one per I/O call that
/// overlaps the wait: a service that keeps doing slow I/O still answers within this many).
const MAX_IO_EXTENSIONS: u32 = 4;
/// Most posted writes outstanding on one ring ([`CoreEndpoint::post`]); past that a write waits
/// like any other access (and with it, for all those before it).
pub const MAX_POSTED: usize = 16;
const PAGE: usize = 4096;

/// Kind of a forwarded exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ExitKind {
    /// Guest `in`.
    PioRead = 1,
    /// Guest `out`.
    PioWrite = 2,
    /// Guest MMIO load.
    MmioRead = 3,
    /// Guest MMIO store.
    MmioWrite = 4,
}

impl ExitKind {
    /// Decodes a raw kind, `None` when unknown.
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::PioRead),
            2 => Some(Self::PioWrite),
            3 => Some(Self::MmioRead),
            4 => Some(Self::MmioWrite),
            _ => None,
        }
    }

    /// Whether the guest expects data back.
    pub fn is_read(self) -> bool {
        matches!(self, Self::PioRead | Self::MmioRead)
    }
}

/// Completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// The device handled the access.
    Ok = 0,
    /// The service refused the access (out of its range, unsupported size, malformed record).
    Rejected = 1,
}

impl Status {
    /// Decodes a raw status, `None` when unknown.
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Ok),
            1 => Some(Self::Rejected),
            _ => None,
        }
    }
}

/// Submission record as laid out in shared memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ExitRecord {
    /// Sequence number chosen by the core, echoed in the completion.
    pub seq: u64,
    /// Raw [`ExitKind`].
    pub kind: u32,
    /// Access size: 1, 2, 4 or 8.
    pub len: u32,
    /// Absolute guest port or physical address.
    pub addr: u64,
    /// Data of a write (first `len` bytes, little-endian guest order).
    pub data: [u8; 8],
}

/// Completion record as laid out in shared memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CompletionRecord {
    /// Sequence number of the request this completes.
    pub seq: u64,
    /// Raw [`Status`].
    pub status: u32,
    /// Access size, must equal the request's.
    pub len: u32,
    /// Data of a read (first `len` bytes).
    pub data: [u8; 8],
}

const SUB_REC: usize = std::mem::size_of::<ExitRecord>();
const COMP_REC: usize = std::mem::size_of::<CompletionRecord>();
const _: () = assert!(SUB_REC == 32 && COMP_REC == 24);
const SUB_REC_U32: u32 = 32;
const COMP_REC_U32: u32 = 24;

/// A validated exit to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRequest {
    /// What the guest did.
    pub kind: ExitKind,
    /// Absolute guest port or physical address.
    pub addr: u64,
    /// Access size: 1, 2, 4 or 8.
    pub len: u32,
    /// Data of a write; ignored for reads.
    pub data: [u8; 8],
}

/// Copies the first `min(dst.len(), src.len(), 8)` bytes of an access and returns how many.
///
/// Exit data is 1 to 8 bytes, and a `copy_from_slice` of a length known only at run time compiles
/// to a call into libc's `memcpy`/`memset` (its AVX-512 variants on these hosts): a call per
/// exit on the vCPU thread for a few bytes. These copies are of constant sizes, done inline.
/// (Live AVX-512 state also makes KVM's FPU swap per `KVM_RUN` dearer, but a thread inherits it
/// from its creator, so these copies alone do not clear it: docs/benchmarks.md.)
#[inline]
pub fn copy_access(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len()).min(8);
    if n == 8 {
        dst[..8].copy_from_slice(&src[..8]);
        return 8;
    }
    let mut off = 0;
    if n & 4 != 0 {
        dst[..4].copy_from_slice(&src[..4]);
        off = 4;
    }
    if n & 2 != 0 {
        dst[off..off + 2].copy_from_slice(&src[off..off + 2]);
        off += 2;
    }
    if n & 1 != 0 {
        dst[off] = src[off];
    }
    n
}

/// Sets the first `min(dst.len(), 8)` bytes of an access to `byte`, inline (see [`copy_access`]).
#[inline]
pub fn fill_access(dst: &mut [u8], byte: u8) {
    copy_access(dst, &[byte; 8]);
}

impl ExitRequest {
    /// A read of `len` bytes at `addr`.
    pub fn read(kind: ExitKind, addr: u64, len: u32) -> Self {
        Self { kind, addr, len, data: [0; 8] }
    }

    /// A write of `data` (1, 2, 4 or 8 bytes) at `addr`; `None` for other sizes.
    pub fn write(kind: ExitKind, addr: u64, data: &[u8]) -> Option<Self> {
        let len = u32::try_from(data.len()).ok().filter(|l| valid_len(*l))?;
        let mut d = [0u8; 8];
        copy_access(&mut d, data);
        Some(Self { kind, addr, len, data: d })
    }

    /// The bytes of the access (`len` bytes of `data`).
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len.min(8) as usize]
    }
}

/// A validated completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReply {
    /// Outcome.
    pub status: Status,
    /// Data of a read; meaningful for `len` bytes when `status` is [`Status::Ok`].
    pub data: [u8; 8],
}

impl ExitReply {
    /// Successful reply carrying `data` (up to 8 bytes).
    pub fn ok(data: &[u8]) -> Self {
        let mut d = [0u8; 8];
        copy_access(&mut d, data);
        Self { status: Status::Ok, data: d }
    }

    /// Rejection: reads see all-ones.
    pub fn rejected() -> Self {
        Self { status: Status::Rejected, data: [0xff; 8] }
    }
}

fn valid_len(l: u32) -> bool {
    matches!(l, 1 | 2 | 4 | 8)
}

/// Errors of the exit ring.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// The peer broke the ring protocol (bad index, seq, length, status, header).
    #[error("protocol violation: {what}")]
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// No reply before the deadline.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The request itself is malformed (size not 1, 2, 4 or 8).
    #[error("invalid request size {0}")]
    InvalidRequest(u32),
    /// The endpoint was aborted (the peer died).
    #[error("endpoint aborted")]
    Aborted,
    /// An earlier failure left the ring in an unknown state; it is no longer used.
    #[error("ring unusable after an earlier failure")]
    Broken,
    /// Bad ring parameters.
    #[error("invalid ring capacity {0}")]
    InvalidCapacity(u32),
    /// Creating or mapping the region failed.
    #[error("shared region")]
    Region(#[from] RegionError),
    /// An eventfd or poll operation failed.
    #[error("doorbell")]
    Doorbell(#[source] std::io::Error),
}

fn protocol(what: impl Into<String>) -> IpcError {
    IpcError::Protocol { what: what.into() }
}

/// Spin/sleep tuning of a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitConfig {
    /// How long at most to busy-poll the shared index before announcing sleep and blocking on the
    /// eventfd.
    pub spin: Duration,
    /// How long the service's heartbeat may stand still before the core takes it for preempted (or
    /// busy with a long request) and sleeps instead of spinning.
    pub stale: Duration,
    /// How long the core keeps spinning after ringing a sleeping service, for it to wake up.
    pub wake_grace: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(100),
            stale: Duration::from_micros(20),
            wake_grace: Duration::from_micros(60),
        }
    }
}

/// The CPU the calling thread runs on, plus one (0: unknown). Cheap: glibc answers from the rseq
/// area or the vDSO, without a system call.
fn current_cpu() -> u32 {
    // SAFETY: sched_getcpu takes no arguments and touches no caller memory.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).map_or(0, |c| c.wrapping_add(1))
}

/// Size in bytes of a ring region of `capacity` entries (rounded up to a page).
pub fn region_size(capacity: u32) -> Result<usize, IpcError> {
    if capacity == 0 || capacity > MAX_CAPACITY || !capacity.is_power_of_two() {
        return Err(IpcError::InvalidCapacity(capacity));
    }
    let end = mirror_offset(capacity) + MIRROR_BYTES;
    Ok(end.div_ceil(PAGE) * PAGE)
}

/// Offset of the read mirror in a ring region of `capacity` (valid) entries.
fn mirror_offset(capacity: u32) -> usize {
    (OFF_SUB_RING + capacity as usize * (SUB_REC + COMP_REC)).div_ceil(64) * 64
}

/// Raw view of the ring inside a region. All accessors stay within the mapping because the
/// capacity was checked against the region size at construction.
#[derive(Debug, Clone)]
struct RingView {
    region: Arc<SharedRegion>,
    cap: u64,
}

impl RingView {
    fn new(region: SharedRegion, capacity: u32) -> Result<Self, IpcError> {
        let need = region_size(capacity)?;
        if region.len() < need {
            return Err(protocol(format!("region of {} bytes too small for capacity {capacity}", region.len())));
        }
        Ok(Self { region: Arc::new(region), cap: u64::from(capacity) })
    }

    fn mirror(&self) -> Result<Mirror, IpcError> {
        // The capacity was validated in `new`, so the offset is in range.
        let cap = u32::try_from(self.cap).map_err(|_| IpcError::InvalidCapacity(u32::MAX))?;
        Mirror::new(self.region.clone(), mirror_offset(cap)).ok_or_else(|| protocol("no room for the read mirror"))
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.region.len());
        // SAFETY: `off` is one of the 8-aligned header offsets below OFF_SUB_RING, inside the
        // page-aligned mapping (at least one page); the memory lives as long as `self.region`,
        // and is only ever accessed atomically through this type by both processes.
        unsafe { &*self.region.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= self.region.len());
        // SAFETY: as in `u64_at`, for a 4-aligned header offset.
        unsafe { &*self.region.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn slot(&self, idx: u64) -> usize {
        // Capacity is a power of two and at most MAX_CAPACITY, so the masked value fits.
        usize::try_from(idx & (self.cap - 1)).unwrap_or(0)
    }

    fn sub_ptr(&self, idx: u64) -> *mut ExitRecord {
        // SAFETY: slot < cap and the region holds OFF_SUB_RING + cap * SUB_REC bytes (checked in
        // `new`), so the pointer stays inside the mapping.
        unsafe { self.region.as_ptr().add(OFF_SUB_RING + self.slot(idx) * SUB_REC).cast() }
    }

    fn comp_ptr(&self, idx: u64) -> *mut CompletionRecord {
        let base = OFF_SUB_RING + usize::try_from(self.cap).unwrap_or(0) * SUB_REC;
        // SAFETY: as in `sub_ptr`, the completion ring follows the submission ring inside the
        // mapping.
        unsafe { self.region.as_ptr().add(base + self.slot(idx) * COMP_REC).cast() }
    }

    fn write_header(&self, capacity: u32) {
        let p = self.region.as_ptr();
        // SAFETY: the header occupies the first 24 bytes of the mapping, 8-aligned; the peer does
        // not run yet (the core writes the header before passing the fd).
        unsafe {
            p.cast::<u64>().write_volatile(RING_MAGIC);
            p.add(8).cast::<u32>().write_volatile(RING_VERSION);
            p.add(12).cast::<u32>().write_volatile(capacity);
            p.add(16).cast::<u32>().write_volatile(SUB_REC_U32);
            p.add(20).cast::<u32>().write_volatile(COMP_REC_U32);
        }
    }

    fn check_header(&self, capacity: u32) -> Result<(), IpcError> {
        let p = self.region.as_ptr();
        // SAFETY: the header lies inside the mapping; volatile copies tolerate concurrent writes.
        let (magic, version, cap, sr, cr) = unsafe {
            (
                p.cast::<u64>().read_volatile(),
                p.add(8).cast::<u32>().read_volatile(),
                p.add(12).cast::<u32>().read_volatile(),
                p.add(16).cast::<u32>().read_volatile(),
                p.add(20).cast::<u32>().read_volatile(),
            )
        };
        if magic != RING_MAGIC || version != RING_VERSION {
            return Err(protocol(format!("bad ring header magic {magic:#x} version {version}")));
        }
        if cap != capacity || sr as usize != SUB_REC || cr as usize != COMP_REC {
            return Err(protocol(format!("ring header capacity {cap} / record sizes {sr},{cr} do not match")));
        }
        Ok(())
    }
}

fn drain(bell: &EventFd) {
    // Non-blocking: EAGAIN just means nothing was pending.
    let _ = bell.read();
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns this fd and outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// See [`CoreEndpoint::service_activity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceActivity {
    /// The service sleeps in `poll` on its doorbell, control socket and device fds.
    pub asleep: bool,
    /// Its heartbeat, bumped on every turn of its serving loop.
    pub beat: u64,
    /// Its back-end I/O, as it marks it ([`IoMarker`]).
    pub io: IoState,
}

/// What the service says of its back-end I/O calls ([`IoMarker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoState {
    /// It made none (marked) yet.
    #[default]
    None,
    /// It is inside one, for this long.
    Inside(Duration),
    /// Its last one ended this long ago.
    EndedAgo(Duration),
}

/// `CLOCK_MONOTONIC` in ns: the clock both processes share.
fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the same clock at tick resolution (never ahead of
/// [`monotonic_ns`]), read in a few ns.
pub fn coarse_monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// The service's side of "I am inside an I/O system call since T": a device wraps each
/// back-end call that may be slow (a write to a slow disk, a flush) in [`IoMarker::begin`] and the
/// guard it returns. The core then waits for a forwarded exit, and for a liveness answer, up to
/// its I/O deadline instead of its call deadline: slow storage is not a hang. The value is a
/// hint from a hostile peer like everything in the ring; it can only buy the service the I/O
/// deadline, which the core bounds.
#[derive(Debug, Clone)]
pub struct IoMarker {
    view: RingView,
}

impl IoMarker {
    fn word(&self) -> &AtomicU64 {
        self.view.u64_at(OFF_SERVICE_IO_SINCE)
    }

    /// Marks the start of an I/O call; the mark ends when the guard drops. (The coarse clock:
    /// a few ns per call on the request path, and the deadlines it serves are seconds.)
    pub fn begin(&self) -> IoGuard<'_> {
        self.word().store(coarse_monotonic_ns().saturating_add(1), Ordering::Release);
        IoGuard(self)
    }
}

/// Ends an I/O mark when dropped.
#[derive(Debug)]
pub struct IoGuard<'a>(&'a IoMarker);

impl Drop for IoGuard<'_> {
    /// Records when the call ended: a peer that was waiting for it counts its own deadline from
    /// there (the service still has to get back to its ring).
    fn drop(&mut self) {
        self.0.word().store(coarse_monotonic_ns().saturating_add(1) | IO_ENDED, Ordering::Release);
    }
}

/// What the core's waiter knows about whether the service is on a CPU.
struct PeerWatch {
    /// Heartbeat last read.
    beat: u64,
    /// When the heartbeat was last seen to move (or the watch began).
    moved: Instant,
    /// When the sleeping service was rung, if it was.
    rang_at: Option<Instant>,
}

impl PeerWatch {
    fn new(view: &RingView, now: Instant, rang: bool) -> Self {
        Self { beat: view.u64_at(OFF_SERVICE_BEAT).load(Ordering::Relaxed), moved: now, rang_at: rang.then_some(now) }
    }

    /// Whether the reply is near enough to keep spinning: the service is awake, its heartbeat
    /// moved recently and it is not waiting for the very CPU this thread occupies. A service that
    /// was asleep is given `wake_grace` to show up.
    fn worth_spinning(&mut self, view: &RingView, now: Instant, cpu: u32, cfg: &WaitConfig) -> bool {
        let beat = view.u64_at(OFF_SERVICE_BEAT).load(Ordering::Relaxed);
        if beat != self.beat {
            self.beat = beat;
            self.moved = now;
            self.rang_at = None;
        }
        if let Some(at) = self.rang_at {
            return now.duration_since(at) < cfg.wake_grace;
        }
        if view.u32_at(OFF_SERVICE_SLEEPING).load(Ordering::Relaxed) != 0 {
            // Asleep without having seen this request yet: it is rung or about to see it.
            return now.duration_since(self.moved) < cfg.wake_grace;
        }
        let peer_cpu = view.u32_at(OFF_SERVICE_CPU).load(Ordering::Relaxed);
        if cpu != 0 && peer_cpu == cpu && now.duration_since(self.moved) > Duration::from_micros(1) {
            // It last ran where we run now, and has not beaten since we took the CPU: it waits
            // for us to let go.
            return false;
        }
        now.duration_since(self.moved) < cfg.stale
    }
}

#[derive(Debug)]
struct CoreState {
    next_seq: u64,
    sub_prod: u64,
    comp_cons: u64,
    broken: bool,
    /// Posted writes not completed yet, oldest first (their completions come first).
    posted: std::collections::VecDeque<Posted>,
}

/// A write submitted without waiting for its completion.
#[derive(Debug, Clone, Copy)]
struct Posted {
    seq: u64,
    req: ExitRequest,
}

/// The core's end of a ring: submits exits and waits for their completions.
///
/// Thread-safe: concurrent [`call`](Self::call)s are serialised by a mutex (the layout itself allows
/// up to `capacity` requests in flight). After a timeout or protocol violation the endpoint is
/// marked broken and every later call fails with [`IpcError::Broken`] at once.
#[derive(Debug)]
pub struct CoreEndpoint {
    view: RingView,
    capacity: u32,
    state: Mutex<CoreState>,
    sub_bell: EventFd,
    comp_bell: EventFd,
    aborted: AtomicBool,
    wait: WaitConfig,
    mirror: Mirror,
}

impl CoreEndpoint {
    /// Creates a ring of `capacity` entries (a power of two, at most [`MAX_CAPACITY`]) in a new
    /// memfd named `name`, and its two doorbells.
    pub fn create(name: &str, capacity: u32, wait: WaitConfig) -> Result<Self, IpcError> {
        let size = region_size(capacity)?;
        let region = SharedRegion::create(name, size)?;
        let view = RingView::new(region, capacity)?;
        view.write_header(capacity);
        let sub_bell = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(IpcError::Doorbell)?;
        let comp_bell = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(IpcError::Doorbell)?;
        let mirror = view.mirror()?;
        Ok(Self {
            mirror,
            view,
            capacity,
            state: Mutex::new(CoreState {
                next_seq: 1,
                sub_prod: 0,
                comp_cons: 0,
                broken: false,
                posted: std::collections::VecDeque::new(),
            }),
            sub_bell,
            comp_bell,
            aborted: AtomicBool::new(false),
            wait,
        })
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The memfd of the ring region (to send to the service).
    pub fn region_fd(&self) -> BorrowedFd<'_> {
        self.view.region.fd()
    }

    /// Size of the ring region in bytes.
    pub fn region_len(&self) -> usize {
        self.view.region.len()
    }

    /// The doorbell the core rings after submitting (the service waits on it).
    pub fn submit_bell(&self) -> BorrowedFd<'_> {
        borrow(&self.sub_bell)
    }

    /// The doorbell the service rings after completing (the core waits on it).
    pub fn complete_bell(&self) -> BorrowedFd<'_> {
        borrow(&self.comp_bell)
    }

    /// Marks the endpoint dead (the peer exited) and wakes a caller blocked in [`call`](Self::call),
    /// which then returns [`IpcError::Aborted`], as do all later calls.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        let _ = self.comp_bell.write(1);
    }

    /// Whether [`abort`](Self::abort) was called.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    /// What the service last published about itself: whether it is asleep on its doorbell (inside
    /// `poll`, so any control message or device event wakes it) and its heartbeat. Hints only,
    /// written by the service: they may spare it a liveness ping, never excuse a missed deadline.
    pub fn service_activity(&self) -> ServiceActivity {
        ServiceActivity {
            asleep: self.view.u32_at(OFF_SERVICE_SLEEPING).load(Ordering::Acquire) != 0,
            beat: self.view.u64_at(OFF_SERVICE_BEAT).load(Ordering::Acquire),
            io: self.service_io(),
        }
    }

    /// What the service says of its back-end I/O (a time from the future counts as just now).
    pub fn service_io(&self) -> IoState {
        let word = self.view.u64_at(OFF_SERVICE_IO_SINCE).load(Ordering::Acquire);
        let at = (word & !IO_ENDED).saturating_sub(1);
        let ago = Duration::from_nanos(monotonic_ns().saturating_sub(at));
        match (word, word & IO_ENDED != 0) {
            (0, _) => IoState::None,
            (_, true) => IoState::EndedAgo(ago),
            (_, false) => IoState::Inside(ago),
        }
    }

    /// How long the service has been inside an I/O call, if it says it is in one.
    pub fn service_in_io(&self) -> Option<Duration> {
        match self.service_io() {
            IoState::Inside(t) => Some(t),
            _ => None,
        }
    }

    /// Answers a read from the service's read mirror ([`crate::mirror`]) when it publishes exactly
    /// this register and no request is in flight on this ring; `None` means: forward it.
    pub fn read_mirror(&self, req: &ExitRequest) -> Option<ExitReply> {
        if !req.kind.is_read() || !valid_len(req.len) || self.is_aborted() {
            return None;
        }
        // Another vCPU's request in flight: its effect may not be published yet; forward.
        let mut st = self.state.try_lock().ok()?;
        if st.broken {
            return None;
        }
        // Posted writes the service has completed since: consumed now, so that they do not keep
        // every read forwarded.
        if self.reap(&mut st).is_err() {
            st.broken = true;
            return None;
        }
        if st.sub_prod != st.comp_cons {
            return None;
        }
        let data = self.mirror.lookup(req.addr, req.len)?;
        drop(st);
        Some(ExitReply { status: Status::Ok, data })
    }

    /// Posts a write the service's mirror declares postable ([`crate::mirror::POSTED_WRITE`]):
    /// submits it and returns without waiting for its completion. `Ok(false)`: not posted (a
    /// read, not declared postable, or [`MAX_POSTED`] outstanding already); make it a
    /// [`call`](Self::call), which also waits for every posted write before it. Errors as
    /// [`call`](Self::call)'s, and then the write was not submitted.
    pub fn post(&self, req: &ExitRequest) -> Result<bool, IpcError> {
        if req.kind.is_read() || !valid_len(req.len) || !self.mirror.posts_write(req.addr, req.len) {
            return Ok(false);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_aborted() {
            return Err(IpcError::Aborted);
        }
        if st.broken {
            return Err(IpcError::Broken);
        }
        let res = self.reap(&mut st).and_then(|()| self.submit_posted(&mut st, req));
        if res.is_err() {
            st.broken = true;
        }
        res
    }

    /// Posted writes not completed, oldest first, taken away: after [`abort`](Self::abort), for
    /// the next instance to [`adopt`](Self::adopt). Completions the dead instance published
    /// first are consumed (validated as always): a write it finished is not done twice. One it
    /// did but died before completing is carried (the window between its effect and its
    /// completion record; a UART byte may then show twice, as after a lost acknowledgement on
    /// real hardware). A completion that fails validation stops the consumption there: the rest
    /// is carried.
    pub fn take_posted(&self) -> Vec<ExitRequest> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.reap(&mut st);
        st.posted.drain(..).map(|p| p.req).collect()
    }

    /// Submits `reqs` (a dead instance's posted writes, [`take_posted`](Self::take_posted)) as
    /// posted writes on this fresh ring, before its service starts serving: they are the first
    /// requests it takes. At most [`MAX_POSTED`] (a dead ring never holds more); the rest, and
    /// any that do not fit, are dropped. Returns how many were submitted.
    pub fn adopt(&self, reqs: &[ExitRequest]) -> usize {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for req in reqs.iter().filter(|r| !r.kind.is_read() && valid_len(r.len)) {
            if !matches!(self.submit_posted(&mut st, req), Ok(true)) {
                break;
            }
            n += 1;
        }
        n
    }

    /// Submits `req` as a posted write if there is room: fewer than [`MAX_POSTED`] outstanding,
    /// and always room for one call behind them. `Ok(false)`: no room, nothing submitted.
    fn submit_posted(&self, st: &mut CoreState, req: &ExitRequest) -> Result<bool, IpcError> {
        let outstanding = st.sub_prod.wrapping_sub(st.comp_cons);
        if st.posted.len() >= MAX_POSTED || outstanding.saturating_add(2) > self.view.cap {
            return Ok(false);
        }
        let (seq, _) = self.submit(st, req)?;
        st.posted.push_back(Posted { seq, req: *req });
        Ok(true)
    }

    /// Posted writes outstanding (submitted, completion not consumed yet).
    pub fn posted_outstanding(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).posted.len()
    }

    /// Forwards one exit and waits at most `timeout` for its completion.
    pub fn call(&self, req: &ExitRequest, timeout: Duration) -> Result<ExitReply, IpcError> {
        self.call_with_io(req, timeout, Duration::ZERO)
    }

    /// [`call`](Self::call), except that while the service says it is inside an I/O call
    /// ([`IoMarker`]) the wait goes on until that call has lasted `io_deadline`: a slow disk
    /// delays the answer, it does not make the service look hung. Bounded by `io_deadline` past
    /// the latest I/O call's start, which the core reads fresh at every expiry.
    pub fn call_with_io(
        &self,
        req: &ExitRequest,
        timeout: Duration,
        io_deadline: Duration,
    ) -> Result<ExitReply, IpcError> {
        if !valid_len(req.len) {
            return Err(IpcError::InvalidRequest(req.len));
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_aborted() {
            return Err(IpcError::Aborted);
        }
        if st.broken {
            return Err(IpcError::Broken);
        }
        let res = self.call_locked(&mut st, req, timeout, io_deadline);
        if res.is_err() {
            st.broken = true;
        }
        res
    }

    fn call_locked(
        &self,
        st: &mut CoreState,
        req: &ExitRequest,
        timeout: Duration,
        io_deadline: Duration,
    ) -> Result<ExitReply, IpcError> {
        let start = Instant::now();
        let mut deadline = start + timeout;
        // Each extension ends where the service's current I/O call reaches `io_deadline`, and is
        // granted only while that point lies ahead: at most one per I/O call, each bounded.
        let mut extensions = 0u32;
        let (seq, rang) = self.submit(st, req)?;

        let spin_until = start + self.wait.spin;
        let comp_prod = self.view.u64_at(OFF_COMP_PROD);
        let sleeping = self.view.u32_at(OFF_CORE_SLEEPING);
        let mut peer = PeerWatch::new(&self.view, start, rang);
        let cpu = current_cpu();
        self.view.u32_at(OFF_CORE_CPU).store(cpu, Ordering::Relaxed);
        loop {
            if let Some(reply) = self.try_complete(st, seq, req)? {
                return Ok(reply);
            }
            if self.is_aborted() {
                return Err(IpcError::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                // Inside an I/O call: wait until it reaches the I/O deadline. Just out of one
                // that overlapped this wait: the call deadline counts from its end.
                let left = match self.service_io() {
                    _ if io_deadline.is_zero() || extensions >= MAX_IO_EXTENSIONS => Duration::ZERO,
                    IoState::Inside(t) => io_deadline.saturating_sub(t),
                    IoState::EndedAgo(e) if e < now.duration_since(start) => timeout.saturating_sub(e),
                    _ => Duration::ZERO,
                };
                if left.is_zero() {
                    return Err(IpcError::Timeout(timeout));
                }
                extensions += 1;
                deadline = now + left;
                continue;
            }
            if now < spin_until && peer.worth_spinning(&self.view, now, cpu, &self.wait) {
                std::hint::spin_loop();
                continue;
            }
            sleeping.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if comp_prod.load(Ordering::SeqCst) != st.comp_cons || self.is_aborted() {
                sleeping.store(0, Ordering::SeqCst);
                continue;
            }
            let r = wait::wait_readable(borrow(&self.comp_bell), deadline.saturating_duration_since(now));
            sleeping.store(0, Ordering::SeqCst);
            drain(&self.comp_bell);
            r.map_err(IpcError::Doorbell)?;
            // Woken: the service is on a CPU now (or the wait timed out); judge it afresh.
            peer = PeerWatch::new(&self.view, Instant::now(), false);
        }
    }

    /// Writes `req` into the next submission slot and publishes it; rings the service if it
    /// sleeps. Returns the request's sequence number and whether the bell was rung.
    fn submit(&self, st: &mut CoreState, req: &ExitRequest) -> Result<(u64, bool), IpcError> {
        // Our own bookkeeping guarantees at most `cap` requests are outstanding, so we never need
        // to trust the service's consumer index to find space.
        if st.sub_prod.wrapping_sub(st.comp_cons) >= self.view.cap {
            return Err(protocol("submission ring full"));
        }
        let seq = st.next_seq;
        st.next_seq = st.next_seq.wrapping_add(1);
        let rec = ExitRecord { seq, kind: req.kind as u32, len: req.len, addr: req.addr, data: req.data };
        // SAFETY: `sub_ptr` points inside the mapping at an aligned slot the service does not
        // consume until the producer index below is published.
        unsafe { self.view.sub_ptr(st.sub_prod).write_volatile(rec) };
        st.sub_prod = st.sub_prod.wrapping_add(1);
        self.view.u64_at(OFF_SUB_PROD).store(st.sub_prod, Ordering::Release);
        fence(Ordering::SeqCst);
        let rang = self.view.u32_at(OFF_SERVICE_SLEEPING).load(Ordering::SeqCst) != 0;
        if rang {
            self.sub_bell.write(1).map_err(IpcError::Doorbell)?;
        }
        Ok((seq, rang))
    }

    /// The next completion the service published, if any, consumed (its index validated, its
    /// record copied; the caller checks the record).
    fn next_completion(&self, st: &mut CoreState) -> Result<Option<CompletionRecord>, IpcError> {
        let cp = self.view.u64_at(OFF_COMP_PROD).load(Ordering::Acquire);
        if cp == st.comp_cons {
            return Ok(None);
        }
        let avail = cp.wrapping_sub(st.comp_cons);
        let outstanding = st.sub_prod.wrapping_sub(st.comp_cons);
        if avail > outstanding {
            return Err(protocol(format!(
                "completion index {cp} runs {avail} ahead of consumer {} with {outstanding} outstanding",
                st.comp_cons
            )));
        }
        // SAFETY: the slot is inside the mapping; the volatile copy takes a snapshot the caller
        // validates, whatever the service writes concurrently.
        let rec = unsafe { self.view.comp_ptr(st.comp_cons).read_volatile() };
        st.comp_cons = st.comp_cons.wrapping_add(1);
        self.view.u64_at(OFF_COMP_CONS).store(st.comp_cons, Ordering::Release);
        Ok(Some(rec))
    }

    /// Consumes the completions of posted writes the service has published, oldest first,
    /// checking each against the write it completes. Bounded by the posted writes outstanding.
    fn reap(&self, st: &mut CoreState) -> Result<(), IpcError> {
        while let Some(front) = st.posted.front().copied() {
            let Some(rec) = self.next_completion(st)? else { break };
            if rec.seq != front.seq {
                return Err(protocol(format!("completion seq {} for posted write {}", rec.seq, front.seq)));
            }
            if rec.len != front.req.len {
                return Err(protocol(format!("completion len {} for posted write of {}", rec.len, front.req.len)));
            }
            Status::from_raw(rec.status).ok_or_else(|| protocol(format!("unknown status {}", rec.status)))?;
            st.posted.pop_front();
        }
        Ok(())
    }

    fn try_complete(&self, st: &mut CoreState, seq: u64, req: &ExitRequest) -> Result<Option<ExitReply>, IpcError> {
        // Posted writes were submitted before this request: their completions come first.
        self.reap(st)?;
        if !st.posted.is_empty() {
            return Ok(None);
        }
        let Some(rec) = self.next_completion(st)? else { return Ok(None) };
        if rec.seq != seq {
            return Err(protocol(format!("completion seq {} for request {seq}", rec.seq)));
        }
        if rec.len != req.len {
            return Err(protocol(format!("completion len {} for request of {}", rec.len, req.len)));
        }
        let status = Status::from_raw(rec.status).ok_or_else(|| protocol(format!("unknown status {}", rec.status)))?;
        let mut data = if status == Status::Ok { rec.data } else { [0xff; 8] };
        if !req.kind.is_read() {
            data = [0; 8];
        }
        Ok(Some(ExitReply { status, data }))
    }
}

/// A request taken from the ring by the service: its seq and either a validated request or the
/// reason the record was refused (the service must still complete it, with [`Status::Rejected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// Sequence number to echo.
    pub seq: u64,
    /// Raw length to echo in the completion.
    pub len: u32,
    /// The validated request, or `None` when the record was malformed.
    pub request: Option<ExitRequest>,
    /// Its position in the submission ring (how many requests the core had submitted before
    /// it): compared with [`ServiceEndpoint::submitted`] taken when the device raised an
    /// interrupt, it tells whether a posted write was submitted before that interrupt.
    pub index: u64,
}

/// The service's end of a ring: takes exits and posts completions.
#[derive(Debug)]
pub struct ServiceEndpoint {
    view: RingView,
    sub_cons: u64,
    comp_prod: u64,
    sub_bell: EventFd,
    comp_bell: EventFd,
    /// Heartbeat last published.
    beat: u64,
    /// When a completion last rang the sleeping core.
    rang_core_at: Option<Instant>,
    mirror: Mirror,
}

impl ServiceEndpoint {
    /// The marker a device uses around its slow back-end calls ([`IoMarker`]).
    pub fn io_marker(&self) -> IoMarker {
        IoMarker { view: self.view.clone() }
    }

    /// Attaches to a ring the core created: maps `region_fd` (exactly `region_len` bytes), checks
    /// the header against `capacity`, and takes the two doorbells.
    pub fn attach(
        region_fd: std::os::fd::OwnedFd,
        region_len: u64,
        capacity: u32,
        sub_bell: EventFd,
        comp_bell: EventFd,
    ) -> Result<Self, IpcError> {
        let need = region_size(capacity)?;
        if region_len != need as u64 {
            return Err(protocol(format!("region length {region_len} for capacity {capacity} (want {need})")));
        }
        let region = SharedRegion::from_fd(region_fd, region_len)?;
        let view = RingView::new(region, capacity)?;
        view.check_header(capacity)?;
        // Start from where the core is (normally zero), validated like any later read.
        let sub_cons = view.u64_at(OFF_SUB_CONS).load(Ordering::Acquire);
        let comp_prod = view.u64_at(OFF_COMP_PROD).load(Ordering::Acquire);
        if sub_cons != 0 || comp_prod != 0 {
            return Err(protocol("ring indices not zero at attach"));
        }
        let mirror = view.mirror()?;
        Ok(Self { view, sub_cons, comp_prod, sub_bell, comp_bell, beat: 0, rang_core_at: None, mirror })
    }

    /// Raw fds this endpoint owns (ring memfd, both doorbells), e.g. to keep them open when a
    /// jail closes everything else.
    pub fn raw_fds(&self) -> [std::os::fd::RawFd; 3] {
        [self.view.region.fd().as_raw_fd(), self.sub_bell.as_raw_fd(), self.comp_bell.as_raw_fd()]
    }

    /// The doorbell to watch while sleeping.
    pub fn bell_fd(&self) -> BorrowedFd<'_> {
        borrow(&self.sub_bell)
    }

    /// Whether the core has published a request not yet taken (cheap, no validation).
    pub fn has_pending(&self) -> bool {
        self.view.u64_at(OFF_SUB_PROD).load(Ordering::Acquire) != self.sub_cons
    }

    /// Takes the next request, if any. A malformed record comes back with `request: None`; a
    /// corrupt producer index is a protocol error.
    pub fn next_request(&mut self) -> Result<Option<Incoming>, IpcError> {
        let sp = self.view.u64_at(OFF_SUB_PROD).load(Ordering::Acquire);
        if sp == self.sub_cons {
            return Ok(None);
        }
        let avail = sp.wrapping_sub(self.sub_cons);
        if avail > self.view.cap {
            return Err(protocol(format!("submission index {sp} runs {avail} ahead of consumer {}", self.sub_cons)));
        }
        // Completions are produced in order, so one is owed for every request taken: refuse to
        // take more than the completion ring can hold.
        let owed = self.sub_cons.wrapping_sub(self.comp_prod);
        if owed >= self.view.cap {
            return Err(protocol("too many requests without completions"));
        }
        // SAFETY: the slot is inside the mapping; the volatile copy is validated below.
        let rec = unsafe { self.view.sub_ptr(self.sub_cons).read_volatile() };
        let index = self.sub_cons;
        self.sub_cons = self.sub_cons.wrapping_add(1);
        self.view.u64_at(OFF_SUB_CONS).store(self.sub_cons, Ordering::Release);
        let request = match ExitKind::from_raw(rec.kind) {
            Some(kind) if valid_len(rec.len) => {
                Some(ExitRequest { kind, addr: rec.addr, len: rec.len, data: rec.data })
            }
            _ => None,
        };
        Ok(Some(Incoming { seq: rec.seq, len: rec.len, request, index }))
    }

    /// How many requests this end has taken so far (its consumer index).
    pub fn taken(&self) -> u64 {
        self.sub_cons
    }

    /// How many requests the core has submitted so far (its producer index, as published).
    pub fn submitted(&self) -> u64 {
        self.view.u64_at(OFF_SUB_PROD).load(Ordering::Acquire)
    }

    /// Posts the completion of `inc` and rings the core if it announced sleep.
    pub fn complete(&mut self, inc: &Incoming, reply: &ExitReply) -> Result<(), IpcError> {
        if self.comp_prod == self.sub_cons {
            return Err(protocol("completion without a request"));
        }
        let cc = self.view.u64_at(OFF_COMP_CONS).load(Ordering::Acquire);
        let used = self.comp_prod.wrapping_sub(cc);
        if used >= self.view.cap {
            return Err(protocol(format!(
                "completion ring full or corrupt (producer {}, consumer {cc})",
                self.comp_prod
            )));
        }
        let rec = CompletionRecord { seq: inc.seq, status: reply.status as u32, len: inc.len, data: reply.data };
        // SAFETY: slot inside the mapping; the core reads it only after the index is published.
        unsafe { self.view.comp_ptr(self.comp_prod).write_volatile(rec) };
        self.comp_prod = self.comp_prod.wrapping_add(1);
        self.view.u64_at(OFF_COMP_PROD).store(self.comp_prod, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.view.u32_at(OFF_CORE_SLEEPING).load(Ordering::SeqCst) != 0 {
            self.comp_bell.write(1).map_err(IpcError::Doorbell)?;
            self.rang_core_at = Some(Instant::now());
        }
        Ok(())
    }

    /// The read mirror of this ring ([`crate::mirror`]): publish side-effect-free register values
    /// there before completing each request; clone it for code that must invalidate it before
    /// raising an interrupt.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Publishes that the service is on a CPU, and which: call on every turn of the serving loop.
    /// The core spins for a reply only while this moves.
    pub fn beat(&mut self) {
        self.beat = self.beat.wrapping_add(1);
        self.view.u32_at(OFF_SERVICE_CPU).store(current_cpu(), Ordering::Relaxed);
        self.view.u64_at(OFF_SERVICE_BEAT).store(self.beat, Ordering::Relaxed);
    }

    /// Whether the core, rung awake by a completion, is still off a CPU: it last ran on the CPU
    /// this thread holds (it waits for us to let go), or it has not got back on one within
    /// `grace`. Spinning for its next request is then wasted, or worse, in its way.
    pub fn core_off_cpu(&mut self, now: Instant, grace: Duration) -> bool {
        let Some(at) = self.rang_core_at else { return false };
        if self.view.u32_at(OFF_CORE_SLEEPING).load(Ordering::Relaxed) == 0 {
            // Back on a CPU (or waiting again for a newer request: then it is not waiting on us).
            self.rang_core_at = None;
            return false;
        }
        let core_cpu = self.view.u32_at(OFF_CORE_CPU).load(Ordering::Relaxed);
        let cpu = current_cpu();
        (cpu != 0 && core_cpu == cpu) || now.duration_since(at) >= grace
    }

    /// Announces that the service is about to sleep on [`bell_fd`](Self::bell_fd). Returns false
    /// (and withdraws the announcement) when a request arrived meanwhile: do not sleep then.
    pub fn prepare_sleep(&self) -> bool {
        let flag = self.view.u32_at(OFF_SERVICE_SLEEPING);
        flag.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.view.u64_at(OFF_SUB_PROD).load(Ordering::SeqCst) != self.sub_cons {
            flag.store(0, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Withdraws the sleep announcement after waking and drains the doorbell. Call as soon as
    /// `poll` returns, before handling what woke the service: the announcement also tells the
    /// core's liveness check that the service is idle, not stuck in a handler.
    pub fn end_sleep(&self) {
        self.view.u32_at(OFF_SERVICE_SLEEPING).store(0, Ordering::SeqCst);
        drain(&self.sub_bell);
    }

    /// Serves requests until none is pending for `spin`, then sleeps on the doorbell for at most
    /// `timeout`. Returns the number of requests handled.
    pub fn serve_for<F>(&mut self, spin: Duration, timeout: Duration, mut handler: F) -> Result<usize, IpcError>
    where
        F: FnMut(&ExitRequest) -> ExitReply,
    {
        let deadline = Instant::now() + timeout;
        let mut handled = 0;
        let mut last = Instant::now();
        loop {
            self.beat();
            while let Some(inc) = self.next_request()? {
                let reply = inc.request.as_ref().map_or_else(ExitReply::rejected, &mut handler);
                self.complete(&inc, &reply)?;
                handled += 1;
                last = Instant::now();
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(handled);
            }
            if now.duration_since(last) < spin {
                std::hint::spin_loop();
                continue;
            }
            if handled > 0 {
                return Ok(handled);
            }
            if self.prepare_sleep() {
                let r = wait::wait_readable(self.bell_fd(), deadline.saturating_duration_since(now));
                self.end_sleep();
                r.map_err(IpcError::Doorbell)?;
            }
        }
    }
}

#[cfg(test)]
mod tests;
