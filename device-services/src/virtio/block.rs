//! The virtio-blk device: a raw image file the core opened, served with positional vectored I/O
//! straight between the file and guest memory (no intermediate copies).
//!
//! Requests: IN, OUT, FLUSH (`fdatasync`), GET_ID, and DISCARD / WRITE_ZEROES through `fallocate`
//! (`PUNCH_HOLE|KEEP_SIZE` / `ZERO_RANGE|KEEP_SIZE`), the latter two offered only when a probe at
//! start-up shows the file supports them. A read-only disk offers `VIRTIO_BLK_F_RO` and answers
//! every write with IOERR. Chains are parsed by [`super::request::parse_request`].
//!
//! Rate limiting ([`Block::set_rate_limit`]): a request is taken from its queue only once the
//! limiter admits it ([`Throttle`]), then charged its data length and one operation. While
//! throttled the chains stay in the queue (nothing held, nothing to lose across a restart) and
//! the service sleeps until the tokens are due instead of spinning
//! ([`VirtioDevice::wake_after`]).

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use ipc::control::{ErrorPolicy, IoCounters, RateLimit, RateLimitUpdate};

use virtio_bindings::virtio_blk;
use vm_memory::{Bytes, Permissions, VolatileSlice};

use super::request::{parse_request, Request, RequestType, MAX_DESCRIPTORS, SECTOR};
use super::{DeviceError, QueueCtx, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::memory::{GuestMem, Inline};
use crate::ratelimit::Throttle;

/// Virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and padding.
pub const CONFIG_LEN: usize = 60;
/// Largest discard / write-zeroes request, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest number of data segments offered (`seg_max`): the descriptor limit less header and status.
pub const MAX_SEG: u32 = 1022;
const _: () = assert!(MAX_SEG as usize + 2 == MAX_DESCRIPTORS);
/// Block size reported in the config space.
pub const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR);
/// Default id when none is given.
pub const DEFAULT_ID: &str = "bulkhead-blk";

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const _: () = assert!(
    S_OK as u32 == virtio_blk::VIRTIO_BLK_S_OK
        && S_IOERR as u32 == virtio_blk::VIRTIO_BLK_S_IOERR
        && S_UNSUPP as u32 == virtio_blk::VIRTIO_BLK_S_UNSUPP
);

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// `fstat` of the disk failed.
    #[error("stat of the disk image")]
    Stat(#[source] io::Error),
    /// The image's size is not what the core said.
    #[error("disk image is {actual} bytes, the set-up says {expected}")]
    SizeMismatch {
        /// Size in the set-up.
        expected: u64,
        /// Size of the file.
        actual: u64,
    },
    /// Queue count or size unusable.
    #[error("{queues} queues of size {size} (1..=8 queues, power-of-two size 2..=32768)")]
    Queues {
        /// Number of queues.
        queues: u16,
        /// Queue size.
        size: u16,
    },
}

/// Per-request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests answered OK.
    pub ok: u64,
    /// Requests answered IOERR (including malformed chains).
    pub ioerr: u64,
    /// Requests answered UNSUPP.
    pub unsupp: u64,
    /// Chains with no locatable status byte (used length 0).
    pub unanswerable: u64,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
    /// Times requests had to wait for rate-limit tokens.
    pub throttled: u64,
    /// Host I/O errors met (EIO, ENOSPC, ...), answered IOERR or held by a stop policy.
    pub host_errors: u64,
    /// Times a request was held and the VM stopped by the error policy.
    pub stops: u64,
}

impl std::fmt::Display for BlockStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} ioerr={} unsupp={} unanswerable={} bytes_read={} bytes_written={} throttled={} host_errors={} \
             stops={}",
            self.ok,
            self.ioerr,
            self.unsupp,
            self.unanswerable,
            self.bytes_read,
            self.bytes_written,
            self.throttled,
            self.host_errors,
            self.stops
        )
    }
}

/// A virtio-blk device over a raw image.
#[derive(Debug)]
pub struct Block {
    disk: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_size: u16,
    num_queues: u16,
    can_punch: bool,
    can_zero: bool,
    stats: BlockStats,
    shared: Rc<Cell<BlockStats>>,
    throttle: Throttle,
    write_errors: ErrorPolicy,
    read_errors: ErrorPolicy,
    /// A request the host failed, held by the error policy. No request is taken until the VM
    /// is resumed ([`Block::release_held`]).
    held: Option<Held>,
    /// The flush witness ([`Block::set_flush_witness`]).
    witness: Option<File>,
}

/// A held request.
#[derive(Debug)]
struct Held {
    /// What failed, for the core and the operator.
    reason: String,
    /// The core was told.
    told: bool,
    /// Where the request is: queue, avail position, head.
    at: Option<(u16, u16, u16)>,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Answered: the used length (data bytes written into the chain plus the status byte; 0 if
    /// there was no status byte to write).
    Used(u32),
    /// The host failed it and the error policy holds it: not answered; it stays in flight
    /// (recorded in the state region) and is redone from its avail position on resume.
    Held,
}

/// How an execution ended.
enum Outcome {
    Done(u8, u32),
    Held,
}

/// Longest turn of queue processing before the service answers its ring again (ns).
const TURN_BUDGET_NS: u64 = 20_000_000;

/// Host errors logged in full before only every `HOST_ERROR_LOG_EVERY`th one is (a failing disk
/// must not flood the log).
const HOST_ERRORS_LOGGED: u64 = 10;
const HOST_ERROR_LOG_EVERY: u64 = 1000;

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes an fd and integers; no memory is passed.
    if unsafe { libc::fallocate(fd, mode, off, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Block {
    /// A block device over `disk`, whose size must be `disk_size` bytes (capacity is rounded
    /// down to whole sectors). Probes once whether the file supports hole punching and range
    /// zeroing (past the end of the file, with `KEEP_SIZE`, so no data changes).
    pub fn new(
        disk: File,
        disk_size: u64,
        read_only: bool,
        id: &str,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, BlockError> {
        let actual = disk.metadata().map_err(BlockError::Stat)?.len();
        if actual != disk_size {
            return Err(BlockError::SizeMismatch { expected: disk_size, actual });
        }
        if !(1..=8).contains(&num_queues) || !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(BlockError::Queues { queues: num_queues, size: queue_size });
        }
        let capacity = actual / SECTOR;
        let end = capacity * SECTOR;
        let (can_punch, can_zero) = if read_only {
            (false, false)
        } else {
            let fd = disk.as_raw_fd();
            let punch =
                fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, end.max(actual), 4096).is_ok();
            let zero =
                fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, end.max(actual), 4096).is_ok();
            (punch, zero)
        };
        let mut idb = [0u8; ID_BYTES];
        let src = if id.is_empty() { DEFAULT_ID.as_bytes() } else { id.as_bytes() };
        let n = src.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&src[..n]);

        let mut features = F_VERSION_1
            | F_EVENT_IDX
            | bit(virtio_blk::VIRTIO_BLK_F_FLUSH)
            | bit(virtio_blk::VIRTIO_BLK_F_BLK_SIZE)
            | bit(virtio_blk::VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            features |= bit(virtio_blk::VIRTIO_BLK_F_RO);
        }
        if can_punch {
            features |= bit(virtio_blk::VIRTIO_BLK_F_DISCARD);
        }
        if can_punch || can_zero {
            features |= bit(virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if num_queues > 1 {
            features |= bit(virtio_blk::VIRTIO_BLK_F_MQ);
        }
        let seg_max = u32::from(queue_size).saturating_sub(2).clamp(1, MAX_SEG);
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        config[20..24].copy_from_slice(&BLK_SIZE.to_le_bytes());
        config[34..36].copy_from_slice(&num_queues.to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&1u32.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&1u32.to_le_bytes());
        config[56] = u8::from(can_punch);
        Ok(Self {
            disk,
            capacity,
            read_only,
            id: idb,
            features,
            config,
            queue_size,
            num_queues,
            can_punch,
            can_zero,
            stats: BlockStats::default(),
            shared: Rc::new(Cell::new(BlockStats::default())),
            throttle: Throttle::unlimited(),
            write_errors: ErrorPolicy::Report,
            read_errors: ErrorPolicy::Report,
            held: None,
            witness: None,
        })
    }

    /// What host errors on writes (flushes, discards) and on reads do.
    pub fn set_error_policy(&mut self, write: ErrorPolicy, read: ErrorPolicy) {
        self.write_errors = write;
        self.read_errors = read;
    }

    /// A host error on a request: counted, logged (the first ones, then one in
    /// [`HOST_ERROR_LOG_EVERY`]), then answered IOERR or held as the policy for its direction
    /// says.
    fn host_error(&mut self, write: bool, what: &str, sector: u64, e: &io::Error) -> Outcome {
        self.stats.host_errors += 1;
        let n = self.stats.host_errors;
        let policy = if write { self.write_errors } else { self.read_errors };
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let stop = policy.stops_on(errno);
        let reason = format!("{what} at sector {sector}: {e}");
        if n <= HOST_ERRORS_LOGGED || n.is_multiple_of(HOST_ERROR_LOG_EVERY) {
            eprintln!(
                "bulkhead-block: host I/O error #{n}: {reason} ({})",
                if stop { "held: the VM stops until resumed" } else { "IOERR to the guest" }
            );
        }
        if stop {
            self.stats.stops += 1;
            self.held = Some(Held { reason, told: false, at: None });
            Outcome::Held
        } else {
            Outcome::Done(S_IOERR, 0)
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether DISCARD is offered (the file supports hole punching).
    pub fn supports_discard(&self) -> bool {
        self.can_punch
    }

    /// Whether WRITE_ZEROES is offered.
    pub fn supports_write_zeroes(&self) -> bool {
        self.can_punch || self.can_zero
    }

    /// Counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// A handle that always shows the latest counters (e.g. to log them after serving ends).
    pub fn stats_handle(&self) -> Rc<Cell<BlockStats>> {
        Rc::clone(&self.shared)
    }

    /// Limits the disk's bytes and requests per second (all queues together). Enforced once
    /// [`arm_rate_limit`](Self::arm_rate_limit) is called; requests are charged from the start.
    pub fn set_rate_limit(&mut self, limit: &RateLimit) {
        self.throttle = Throttle::new(limit);
    }

    /// Starts enforcing the rate limit: call it after the requests in flight at a restart were
    /// redone ([`VirtioDevice::serving`] does).
    pub fn arm_rate_limit(&self) {
        self.throttle.arm();
    }

    /// How long until a request waiting for rate-limit tokens can go (`None`: none waits, or
    /// it can go now).
    pub fn throttle_wait(&self) -> Option<Duration> {
        self.throttle.wake_after(self.throttle.now())
    }

    /// The disk's fds to keep open in a jail: the image and its flush witness.
    pub fn disk_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.disk.as_raw_fd()];
        v.extend(self.witness.as_ref().map(AsRawFd::as_raw_fd));
        v
    }

    /// Gives the device the image's flush witness (see the module docs on flushes).
    pub fn set_flush_witness(&mut self, witness: File) {
        self.witness = Some(witness);
    }

    /// A FLUSH: `fdatasync` of the image. When the request is redone after a restart
    /// (`redone`), the witness is asked first: a writeback error since it was last synced means
    /// data this flush covers did not reach the disk, even if the image's own description no
    /// longer says so (the dead instance may have taken the error). After a failed flush the
    /// witness is synced too, to take the error that was just reported.
    fn flush(&mut self, redone: bool) -> Outcome {
        if redone {
            if let Some(Err(e)) = self.witness.as_ref().map(|w| crate::runtime::io_call(|| w.sync_data())) {
                return self.host_error(true, "flush redone after a restart (a writeback error happened)", 0, &e);
            }
        }
        match crate::runtime::io_call(|| self.disk.sync_data()) {
            Ok(()) => Outcome::Done(S_OK, 0),
            Err(e) => {
                if let Some(w) = &self.witness {
                    let _ = crate::runtime::io_call(|| w.sync_data());
                }
                self.host_error(true, "flush", 0, &e)
            }
        }
    }

    /// Parses and executes one chain (`redone`: a request found in flight after a restart, or
    /// held and retried): answered (with the used length: bytes written into the chain), or held
    /// by the error policy.
    pub fn handle_chain<I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>>(
        &mut self,
        mem: &GuestMem,
        descs: I,
        redone: bool,
    ) -> Handled {
        let parsed = parse_request(mem, descs, self.capacity);
        let bytes = parsed.as_ref().map_or(0, |r| r.data_len);
        self.throttle.charge(bytes, 1, self.throttle.now());
        let (status, st_addr, written) = match parsed {
            Ok(req) => match self.execute(mem, &req, redone) {
                Outcome::Done(st, written) => (st, req.status, written),
                Outcome::Held => return Handled::Held,
            },
            Err(e) => match e.status {
                Some(a) => (S_IOERR, a, 0),
                None => {
                    self.stats.unanswerable += 1;
                    return Handled::Used(0);
                }
            },
        };
        match status {
            S_OK => self.stats.ok += 1,
            S_UNSUPP => self.stats.unsupp += 1,
            _ => self.stats.ioerr += 1,
        }
        if mem.write_obj(status, st_addr).is_err() {
            self.stats.unanswerable += 1;
            return Handled::Used(0);
        }
        Handled::Used(written.saturating_add(1))
    }

    /// Executes a parsed request: its status and the number of data bytes written into guest
    /// memory, or held. Errors the guest caused (a bad buffer, a read-only disk) are IOERR;
    /// errors of the host go through [`host_error`](Self::host_error).
    fn execute(&mut self, mem: &GuestMem, req: &Request, redone: bool) -> Outcome {
        match req.kind {
            RequestType::In => match self.rw(mem, req, false) {
                Ok(()) => {
                    self.stats.bytes_read += req.data_len;
                    Outcome::Done(S_OK, u32::try_from(req.data_len).unwrap_or(u32::MAX))
                }
                Err(RwError::Guest) => Outcome::Done(S_IOERR, 0),
                Err(RwError::Host(e)) => self.host_error(false, "read", req.sector, &e),
            },
            RequestType::Out => {
                if self.read_only {
                    return Outcome::Done(S_IOERR, 0);
                }
                match self.rw(mem, req, true) {
                    Ok(()) => {
                        self.stats.bytes_written += req.data_len;
                        Outcome::Done(S_OK, 0)
                    }
                    Err(RwError::Guest) => Outcome::Done(S_IOERR, 0),
                    Err(RwError::Host(e)) => self.host_error(true, "write", req.sector, &e),
                }
            }
            RequestType::Flush => self.flush(redone),
            RequestType::GetId => {
                let mut written = 0usize;
                for s in &req.data {
                    if written == ID_BYTES {
                        break;
                    }
                    let n = (s.len as usize).min(ID_BYTES - written);
                    if mem.write_slice(&self.id[written..written + n], s.addr).is_err() {
                        return Outcome::Done(S_IOERR, 0);
                    }
                    written += n;
                }
                Outcome::Done(S_OK, u32::try_from(written).unwrap_or(0))
            }
            RequestType::Discard | RequestType::WriteZeroes => match self.discard(mem, req) {
                Ok(st) => Outcome::Done(st, 0),
                Err(e) => self.host_error(true, "discard", req.sector, &e),
            },
            RequestType::Unsupported(_) => Outcome::Done(S_UNSUPP, 0),
        }
    }

    /// A discard or write-zeroes: its status, or the host's error.
    fn discard(&mut self, mem: &GuestMem, req: &Request) -> io::Result<u8> {
        let zeroes = req.kind == RequestType::WriteZeroes;
        if self.read_only || (zeroes && !self.supports_write_zeroes()) || (!zeroes && !self.can_punch) {
            return Ok(if self.read_only { S_IOERR } else { S_UNSUPP });
        }
        let mut seg = [0u8; 16];
        let mut filled = 0;
        for s in &req.data {
            let n = s.len as usize;
            if filled + n > seg.len() || mem.read_slice(&mut seg[filled..filled + n], s.addr).is_err() {
                return Ok(S_IOERR);
            }
            filled += n;
        }
        let [a0, a1, a2, a3, a4, a5, a6, a7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
        let sector = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
        let num = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let allowed = if zeroes { virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            return Ok(S_UNSUPP);
        }
        if num > MAX_DISCARD_SECTORS || sector.checked_add(u64::from(num)).is_none_or(|e| e > self.capacity) {
            return Ok(S_IOERR);
        }
        let (off, len) = (sector * SECTOR, u64::from(num) * SECTOR);
        if len == 0 {
            return Ok(S_OK);
        }
        let fd = self.disk.as_raw_fd();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let r = crate::runtime::io_call(|| {
            if zeroes && self.can_zero {
                fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, off, len)
            } else {
                // A punched hole reads back as zeros, so it also serves WRITE_ZEROES.
                fallocate(fd, punch, off, len)
            }
        });
        r.map(|()| S_OK)
    }

    /// Reads (`write == false`) or writes the request's sectors between the file and guest
    /// memory with one `preadv`/`pwritev` per request (more only after a short transfer).
    fn rw(&self, mem: &GuestMem, req: &Request, write: bool) -> Result<(), RwError> {
        let perm = if write { Permissions::Read } else { Permissions::Write };
        let mut slices: Inline<VolatileSlice<'_, ()>> = Inline::with_capacity(req.data.len());
        for s in &req.data {
            crate::memory::push_slices(mem, s.addr, s.len as usize, perm, &mut slices).map_err(|_| RwError::Guest)?;
        }
        let got: usize = slices.iter().map(|s| s.len()).sum();
        if got as u64 != req.data_len || slices.len() > MAX_DESCRIPTORS {
            return Err(RwError::Guest);
        }
        let offset = req.sector.checked_mul(SECTOR).ok_or(RwError::Guest)?;
        crate::runtime::io_call(|| transfer(self.disk.as_raw_fd(), &slices, offset, write)).map_err(RwError::Host)
    }
}

/// Why a read or write failed.
enum RwError {
    /// The guest's request does not hold together (buffers outside its memory, an offset past
    /// the disk): IOERR, whatever the error policy.
    Guest,
    /// The host's system call failed.
    Host(io::Error),
}

/// Moves all bytes of `slices` from/to the file at `offset`. Bounded: each round moves at least
/// one byte or fails, and the rounds are capped.
fn transfer(fd: RawFd, slices: &[VolatileSlice<'_, ()>], offset: u64, write: bool) -> io::Result<()> {
    let guards: Inline<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Inline<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast::<libc::c_void>(), iov_len: s.len() })
        .collect();
    let mut first = 0usize;
    let mut pos = offset;
    for _ in 0..1024 {
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
        if first == iov.len() {
            return Ok(());
        }
        let cnt = libc::c_int::try_from(iov.len() - first).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ptr = iov[first..].as_ptr();
        let n = if write {
            // SAFETY: every iovec points into guest memory mapped for the lifetime of `slices`
            // (the guards keep the pointers valid) with its exact length; the kernel only reads.
            unsafe { libc::pwritev(fd, ptr, cnt, off) }
        } else {
            // SAFETY: as above; the kernel writes at most iov_len bytes into each guest buffer,
            // which no Rust reference aliases (guest memory is only accessed volatilely).
            unsafe { libc::preadv(fd, ptr, cnt, off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        if n == 0 {
            // End of file inside the disk: the image shrank under us.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        pos += n as u64;
        // Advance past what was moved.
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            let k = n.min(v.iov_len);
            // SAFETY: k <= iov_len, so the pointer stays inside the same guest buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Err(io::Error::from_raw_os_error(libc::EIO))
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        super::read_config_bytes(&self.config, offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        false
    }

    /// The reason a request is held, the first time it is asked after the hold began: the
    /// service tells the core, which pauses the VM.
    fn take_stop(&mut self) -> Option<String> {
        match self.held.as_mut() {
            Some(h) if !h.told => {
                h.told = true;
                Some(h.reason.clone())
            }
            _ => None,
        }
    }

    /// The VM was resumed: ends the hold and says where the held request is (queue, avail
    /// position, head), for the transport to redo it.
    fn release_held(&mut self) -> Option<(u16, u16, u16)> {
        let held = self.held.take()?;
        eprintln!("bulkhead-block: resumed: retrying the held request ({})", held.reason);
        held.at
    }

    fn report_counts(&self) -> std::collections::BTreeMap<String, u64> {
        let s = self.stats;
        [
            ("ok".into(), s.ok),
            ("ioerr".into(), s.ioerr),
            ("held".into(), u64::from(self.held.is_some())),
            (
                "throttle_wait_us".into(),
                self.throttle_wait().map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            ),
        ]
        .into()
    }

    fn process_queue(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        if self.held.is_some() {
            // Nothing is taken while a request is held: the VM is (being) stopped.
            return Ok(0);
        }
        let max = usize::from(queue.size());
        let mem = queue.mem();
        let mut done = 0;
        let mut result = Ok(());
        // A turn ends early once it has run TURN_BUDGET (slow storage): the service goes back
        // to its ring and control socket, and the rest of the queue waits for the next turn.
        let turn_end = ipc::ring::coarse_monotonic_ns().saturating_add(TURN_BUDGET_NS);
        while done < max {
            if done > 0 && ipc::ring::coarse_monotonic_ns() > turn_end {
                break;
            }
            // Not taken from the queue until the limiter admits it.
            if !self.throttle.admit(self.throttle.now()) {
                break;
            }
            let chain = match queue.pop() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let head = chain.head_index();
            let used = match self.handle_chain(mem, chain, queue.replaying()) {
                Handled::Used(used) => used,
                Handled::Held => {
                    // Stays in flight (taken, recorded, unanswered): redone from its avail
                    // position once the VM is resumed, or by the next instance after a crash.
                    if let Some(h) = self.held.as_mut() {
                        h.at = Some((queue.index(), queue.last_pos(), head));
                    }
                    break;
                }
            };
            if let Err(e) = queue.add_used(head, used) {
                result = Err(e);
                break;
            }
            done += 1;
        }
        self.stats.throttled = self.throttle.refusals();
        self.shared.set(self.stats);
        result.map(|()| done)
    }

    fn reset(&mut self) {
        // A request held across a reset is gone with the queues it was on.
        self.held = None;
        self.throttle.clear_wait();
    }

    fn serving(&self) {
        self.arm_rate_limit();
    }

    fn wake_after(&self) -> Option<Duration> {
        self.throttle_wait()
    }

    fn pending_waits_for_tokens(&self) -> bool {
        // One limiter covers every queue.
        self.throttle_wait().is_some()
    }

    fn update_rate_limit(&mut self, limits: &RateLimitUpdate) -> bool {
        let RateLimitUpdate::Block(limit) = limits else { return false };
        self.set_rate_limit(limit);
        self.arm_rate_limit();
        true
    }

    fn io_counters(&self) -> Option<IoCounters> {
        let s = self.stats();
        Some(IoCounters {
            requests: s.ok + s.ioerr + s.unsupp,
            bytes_to_guest: s.bytes_read,
            bytes_from_guest: s.bytes_written,
            throttled: s.throttled,
            errors: s.ioerr + s.unsupp + s.unanswerable,
            host_errors: s.host_errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::request::ParseError;
    use proptest::prelude::*;
    use std::io::Write;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::QueueT;
    use vm_memory::GuestMemory;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MEM: usize = 0x4000;

    fn disk(sectors: u64) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().expect("tempfile");
        t.write_all(&vec![0x5a; usize::try_from(sectors * SECTOR).expect("size")]).expect("fill");
        let f = t.reopen().expect("reopen");
        (t, f)
    }

    fn guest(bytes: &[u8]) -> GuestMem {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
        m.write_slice(bytes, GuestAddress(0)).expect("fill");
        m
    }

    #[test]
    fn the_block_transport_keeps_an_interrupt_raised_after_a_posted_ack() {
        let (_t, f) = disk(16);
        let b = Block::new(f, 16 * SECTOR, false, "h", 1, 16).expect("block");
        let notify = vec![vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd")];
        let mut t =
            MmioTransport::new(b, guest(&[0u8; MEM]), notify, vmm_sys_util::eventfd::EventFd::new(0).expect("irqfd"))
                .expect("transport");
        crate::virtio::mmio::handler_checks::a_posted_ack_keeps_a_later_interrupt(&mut t);
    }

    #[test]
    fn config_space_and_features() {
        let (_t, f) = disk(64);
        let b = Block::new(f, 64 * SECTOR, true, "", 1, 128).expect("block");
        let mut cap = [0u8; 8];
        assert!(b.read_config(0, &mut cap));
        assert_eq!(u64::from_le_bytes(cap), 64);
        assert!(!b.read_config(CONFIG_LEN as u64 - 2, &mut [0u8; 4]), "past the config end");
        assert_ne!(b.features() & bit(virtio_blk::VIRTIO_BLK_F_RO), 0);
        assert_eq!(b.features() & bit(virtio_blk::VIRTIO_BLK_F_DISCARD), 0);
        let (_t2, f2) = disk(64);
        assert!(matches!(Block::new(f2, 65 * SECTOR, false, "x", 1, 128), Err(BlockError::SizeMismatch { .. })));
        let (_t3, f3) = disk(1);
        assert!(matches!(Block::new(f3, SECTOR, false, "x", 1, 100), Err(BlockError::Queues { .. })));
    }

    #[test]
    fn throttled_requests_stay_in_the_queue() {
        let m = guest(&[0u8; MEM]);
        let (_t, f) = disk(16);
        let mut b = Block::new(f, 16 * SECTOR, false, "t", 1, 16).expect("block");
        b.set_rate_limit(&RateLimit { ops_per_sec: 10, ops_burst: 1, ..RateLimit::default() });
        let mut q = crate::virtio::test_queue(8);
        // Three FLUSH requests: header (descriptor 2i), status (2i + 1).
        for i in 0..3u16 {
            let (d, hdr, st) = (u64::from(i) * 32, 0x3000 + u64::from(i) * 16, 0x3100 + u64::from(i));
            m.write_obj(4u32, GuestAddress(hdr)).expect("type");
            for (at, addr, len, flags, next) in [(d, hdr, 16u32, 1u16, 2 * i + 1), (d + 16, st, 1, 2, 0)] {
                m.write_obj(addr, GuestAddress(at)).expect("addr");
                m.write_obj(len, GuestAddress(at + 8)).expect("len");
                m.write_obj(flags, GuestAddress(at + 12)).expect("flags");
                m.write_obj(next, GuestAddress(at + 14)).expect("next");
            }
            m.write_obj(2 * i, GuestAddress(0x1004 + 2 * u64::from(i))).expect("ring");
        }
        m.write_obj(3u16, GuestAddress(0x1002)).expect("idx");
        // Disarmed (redo after a restart): everything goes, and is charged.
        assert_eq!(b.process_queue(&mut QueueCtx::untracked(0, &mut q, &m)).expect("run"), 3);
        assert_eq!(b.stats().throttled, 0);
        // Armed and in debt: nothing is taken from the queue.
        b.arm_rate_limit();
        m.write_obj(4u16, GuestAddress(0x1002)).expect("idx");
        m.write_obj(0u16, GuestAddress(0x1004 + 6)).expect("ring");
        assert_eq!(b.process_queue(&mut QueueCtx::untracked(0, &mut q, &m)).expect("run"), 0);
        assert_eq!(q.next_avail(), 3, "the throttled chain stays available");
        assert_eq!(b.process_queue(&mut QueueCtx::untracked(0, &mut q, &m)).expect("run"), 0);
        assert_eq!(b.stats().throttled, 1, "one wait");
        assert_eq!(b.stats_handle().get().throttled, 1);
        let wait = b.throttle_wait().expect("waiting");
        assert!(wait > Duration::from_millis(200) && wait <= Duration::from_millis(300), "{wait:?}");
        // A reset forgets the wait.
        b.reset();
        assert_eq!(b.throttle_wait(), None);
    }

    fn descriptor() -> impl Strategy<Value = Descriptor> {
        // Addresses mostly inside the 16 KiB of guest memory, sometimes just past or far out.
        let addr = prop_oneof![0u64..MEM as u64, (MEM as u64 - 64)..(MEM as u64 + 64), any::<u64>()];
        let len = prop_oneof![0u32..64, 0u32..4096, Just(16u32), any::<u32>()];
        (addr, len, 0u16..8, 0u16..20).prop_map(|(a, l, f, n)| Descriptor::new(a, l, f, n))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The parser over random memory and random descriptor lists: never panics, and a
        /// request it accepts only names guest memory and sectors inside the disk.
        #[test]
        fn parser_accepts_only_sound_requests(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            descs in proptest::collection::vec(descriptor(), 0..12),
        ) {
            let m = guest(&bytes);
            match parse_request(&m, descs, 16) {
                Ok(r) => {
                    prop_assert!(m.check_range(r.status, 1, Permissions::Write));
                    for s in &r.data {
                        prop_assert!(m.check_range(s.addr, s.len as usize, Permissions::Read));
                    }
                    if matches!(r.kind, RequestType::In | RequestType::Out) {
                        prop_assert_eq!(r.data_len % SECTOR, 0);
                        prop_assert!(r.sector + r.data_len / SECTOR <= 16);
                    }
                }
                Err(e) => {
                    if let Some(s) = e.status {
                        prop_assert!(m.check_range(s, 1, Permissions::Write));
                    } else {
                        prop_assert!(matches!(e.error, ParseError::NoStatus | ParseError::TooLong));
                    }
                }
            }
        }

        /// Whole queues of random guest memory (descriptor table, avail ring, buffers) through
        /// `process_queue`: never panics, completes at most what was offered, and every status
        /// byte it answers with is OK, IOERR or UNSUPP.
        #[test]
        fn process_queue_survives_random_guest_memory(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            avail_idx in 0u16..40,
            size_log in 1u32..5,
        ) {
            let m = guest(&bytes);
            let (_t, f) = disk(16);
            let mut b = Block::new(f, 16 * SECTOR, false, "p", 1, 16).expect("block");
            let size = 1u16 << size_log;
            let mut q = crate::virtio::test_queue(size);
            m.write_obj(avail_idx, GuestAddress(0x1002)).expect("idx");
            // The driver zeroes the used ring before handing it over.
            m.write_obj(0u32, GuestAddress(0x2000)).expect("used header");
            let before = b.stats();
            match b.process_queue(&mut QueueCtx::untracked(0, &mut q, &m)) {
                Ok(n) => {
                    prop_assert!(n <= usize::from(size.min(avail_idx)));
                    let used: u16 = m.read_obj(GuestAddress(0x2002)).expect("used");
                    prop_assert_eq!(usize::from(used), n);
                    let s = b.stats();
                    let answered = (s.ok + s.ioerr + s.unsupp + s.unanswerable) - (before.ok + before.ioerr + before.unsupp + before.unanswerable);
                    prop_assert_eq!(answered, n as u64);
                }
                // A head index outside the table: the transport marks the device for reset.
                Err(DeviceError::Queue { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
