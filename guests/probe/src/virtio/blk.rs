//! A polling virtio-blk driver over a version 2 virtio-mmio transport: one split virtqueue,
//! no interrupts, requests in fixed "slots" (three chained descriptors each: header, data,
//! status) so many can be in flight and one notify covers a whole batch.
//!
//! DMA arena layout: the queue ([`QUEUE_BYTES`]), one page of request headers (16 bytes per
//! slot) and status bytes (at 2048 + slot), then the slots' data buffers.

use super::queue::{Dma, SplitQueue, DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE, QUEUE_BYTES};
use super::{reg, status, Transport, VirtioError, F_VERSION_1};
use crate::console::Console;
use crate::machine::Machine;

/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// Every feature the driver accepts; the rest of what the device offers is declined.
pub const ACCEPTED: u64 = F_VERSION_1 | F_FLUSH | F_BLK_SIZE | F_SEG_MAX | F_RO;

/// Status byte: success.
pub const S_OK: u8 = 0;
/// Status byte: I/O error.
pub const S_IOERR: u8 = 1;
/// Status byte: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
pub const S_UNWRITTEN: u8 = 0xff;

/// How many times per timeout a long [`Blk::wait`] reads the device status (rarely: a wait
/// shorter than timeout / STATUS_CHECKS, e.g. a service restart or hang caught by the host's
/// liveness check, costs no exit).
pub const STATUS_CHECKS: u64 = 4;

/// Most slots: three descriptors each in the largest queue.
pub const MAX_SLOTS: usize = MAX_QUEUE_SIZE as usize / 3;
/// Arena offset of the header/status page.
pub const HDR_OFF: usize = QUEUE_BYTES;
/// Arena offset of the status bytes.
pub const STATUS_OFF: usize = HDR_OFF + 2048;
/// Arena offset of the first data buffer.
pub const DATA_OFF: usize = HDR_OFF + 4096;
/// virtio-blk sector size.
pub const SECTOR: u64 = 512;
/// [`SECTOR`] as a byte count.
pub const SECTOR_BYTES: usize = 512;

/// A request type (`virtio_blk_req.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ReqType {
    /// Read (VIRTIO_BLK_T_IN).
    In = 0,
    /// Write (VIRTIO_BLK_T_OUT).
    Out = 1,
    /// Flush (VIRTIO_BLK_T_FLUSH): no data.
    Flush = 4,
}

/// One request for [`Blk::submit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub ty: ReqType,
    /// First 512-byte sector.
    pub sector: u64,
    /// Data bytes (a multiple of 512; 0 for a flush).
    pub bytes: usize,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The slot it ran in.
    pub slot: usize,
    /// Its status byte ([`S_OK`], [`S_IOERR`], [`S_UNSUPP`], or [`S_UNWRITTEN`] if the
    /// device never wrote it).
    pub status: u8,
}

/// What the device told us at set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkInfo {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Features the device offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// `blk_size` (0 unless BLK_SIZE was negotiated).
    pub blk_size: u32,
    /// `seg_max` (0 unless SEG_MAX was negotiated).
    pub seg_max: u32,
    /// Entries in queue 0.
    pub queue_size: u16,
}

impl BlkInfo {
    /// Whether the disk is read-only (VIRTIO_BLK_F_RO).
    pub fn ro(&self) -> bool {
        self.features & F_RO != 0
    }
    /// Whether FLUSH is supported.
    pub fn flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }
}

/// Why the driver stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// Transport-level failure during set-up.
    Virtio(VirtioError),
    /// The machine has no DMA arena (or it was taken).
    NoDma,
    /// The DMA arena cannot hold the queue and headers.
    DmaTooSmall,
    /// `set_slots` asked for more than fits (the maximum attached).
    TooManySlots(usize),
    /// A request the driver refuses to send (bad size, past the end, busy slot...).
    BadRequest,
    /// Requests are in flight where none may be.
    Busy,
    /// Waiting with nothing in flight.
    Idle,
    /// No completion within the timeout (device status and requests in flight attached).
    Timeout {
        /// The device status register when we gave up.
        status: u32,
        /// Requests still in flight.
        in_flight: usize,
    },
    /// The used ring names a descriptor that is not the head of an in-flight request.
    BadUsedId(u32),
    /// The used index moved by more than the requests in flight.
    BadUsedCount(u16),
    /// The device set DEVICE_NEEDS_RESET (e.g. the host gave up on it): it will not answer.
    NeedsReset {
        /// The device status register.
        status: u32,
        /// Requests still in flight.
        in_flight: usize,
    },
}

impl BlkError {
    /// Prints the reason (no newline).
    pub fn print(&self, con: &mut Console<'_>) {
        match *self {
            BlkError::Virtio(e) => e.print(con),
            BlkError::NoDma => {
                con.str(b"no DMA memory");
            }
            BlkError::DmaTooSmall => {
                con.str(b"DMA memory too small");
            }
            BlkError::TooManySlots(max) => {
                con.str(b"queue depth times request size too large (max depth ").dec(max as u64).str(b")");
            }
            BlkError::BadRequest => {
                con.str(b"request refused by the driver (size, range or slot)");
            }
            BlkError::Busy => {
                con.str(b"requests still in flight");
            }
            BlkError::Idle => {
                con.str(b"waiting with nothing in flight");
            }
            BlkError::Timeout { status, in_flight } => {
                con.str(b"device timeout: ")
                    .dec(in_flight as u64)
                    .str(b" request(s) unanswered, device status ")
                    .hex(u64::from(status));
            }
            BlkError::BadUsedId(id) => {
                con.str(b"device returned unknown descriptor id ").dec(u64::from(id));
            }
            BlkError::NeedsReset { status, in_flight } => {
                con.str(b"device needs reset: ")
                    .dec(in_flight as u64)
                    .str(b" request(s) unanswered, device status ")
                    .hex(u64::from(status));
            }
            BlkError::BadUsedCount(n) => {
                con.str(b"device used index jumped by ").dec(u64::from(n)).str(b", more than in flight");
            }
        }
    }
}

impl From<VirtioError> for BlkError {
    fn from(e: VirtioError) -> Self {
        BlkError::Virtio(e)
    }
}

/// Totals of [`Blk::run`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Requests completed.
    pub completed: u64,
    /// Completions with a status other than [`S_OK`].
    pub errors: u64,
    /// Notifications (MMIO writes to QueueNotify) sent.
    pub kicks: u64,
    /// TSC cycles from before the first submission to after the last completion.
    pub cycles: u64,
    /// Longest single wait for a completion, in TSC cycles: the longest stall the driver saw
    /// (e.g. while a device service was being restarted).
    pub max_wait: u64,
}

/// The driver.
#[derive(Debug)]
pub struct Blk {
    t: Transport,
    dma: Dma,
    q: SplitQueue,
    info: BlkInfo,
    slots: usize,
    slot_bytes: usize,
    busy: [bool; MAX_SLOTS],
    in_flight: usize,
    timeout_cycles: u64,
}

impl Blk {
    /// Resets the device, negotiates features (accepting only [`ACCEPTED`]), sets up queue 0
    /// in `dma`, reads the config and sets DRIVER_OK. On failure the device is left FAILED.
    /// `timeout_cycles` bounds every wait for a completion.
    pub fn init(
        m: &mut dyn Machine,
        t: Transport,
        dma: &'static mut [u8],
        timeout_cycles: u64,
    ) -> Result<Blk, BlkError> {
        let mut dma = Dma::new(dma);
        if dma.len() < DATA_OFF {
            return Err(BlkError::DmaTooSmall);
        }
        match Self::handshake(m, &t, &mut dma) {
            Ok((q, info)) => Ok(Blk {
                t,
                dma,
                q,
                info,
                slots: 0,
                slot_bytes: 0,
                busy: [false; MAX_SLOTS],
                in_flight: 0,
                timeout_cycles: timeout_cycles.max(1),
            }),
            Err(e) => {
                t.add_status(m, status::FAILED);
                Err(e)
            }
        }
    }

    fn handshake(m: &mut dyn Machine, t: &Transport, dma: &mut Dma) -> Result<(SplitQueue, BlkInfo), BlkError> {
        let (offered, features) = t.negotiate(m, ACCEPTED)?;
        let q = t.setup_queue(m, dma, 0, 0)?;
        // capacity (le64), size_max, seg_max, geometry, blk_size.
        let cfg = t.config_words::<6>(m, 0)?;
        let info = BlkInfo {
            capacity: (u64::from(cfg[1]) << 32) | u64::from(cfg[0]),
            offered,
            features,
            blk_size: if features & F_BLK_SIZE != 0 { cfg[5] } else { 0 },
            seg_max: if features & F_SEG_MAX != 0 { cfg[3] } else { 0 },
            queue_size: q.size(),
        };
        t.driver_ok(m)?;
        Ok((q, info))
    }

    /// What the device reported.
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }

    /// Reads the capacity again (a medium may have been replaced) and returns it.
    pub fn reread_capacity(&mut self, m: &mut dyn Machine) -> Result<u64, BlkError> {
        let cfg = self.t.config_words::<2>(m, 0)?;
        self.info.capacity = (u64::from(cfg[1]) << 32) | u64::from(cfg[0]);
        Ok(self.info.capacity)
    }

    /// The largest queue depth for requests of `slot_bytes`.
    pub fn max_slots(&self, slot_bytes: usize) -> usize {
        let by_queue = (usize::from(self.q.size()) / 3).min(MAX_SLOTS);
        let by_mem = (self.dma.len() - DATA_OFF).checked_div(slot_bytes).unwrap_or(0);
        by_queue.min(by_mem)
    }

    /// Sets up `qd` slots with data buffers of `slot_bytes` (a non-zero multiple of 512).
    /// Nothing may be in flight.
    pub fn set_slots(&mut self, qd: usize, slot_bytes: usize) -> Result<(), BlkError> {
        if self.in_flight != 0 {
            return Err(BlkError::Busy);
        }
        if slot_bytes == 0 || !slot_bytes.is_multiple_of(SECTOR_BYTES) || u32::try_from(slot_bytes).is_err() {
            return Err(BlkError::BadRequest);
        }
        let max = self.max_slots(slot_bytes);
        if qd == 0 || qd > max {
            return Err(BlkError::TooManySlots(max));
        }
        self.slots = qd;
        self.slot_bytes = slot_bytes;
        Ok(())
    }

    /// Whether `slot` is in flight (out-of-range slots count as busy). No indexing: the probe
    /// has no formatted panics.
    fn is_busy(&self, slot: usize) -> bool {
        self.busy.get(slot).copied().unwrap_or(true)
    }

    fn set_busy(&mut self, slot: usize, busy: bool) {
        if let Some(b) = self.busy.get_mut(slot) {
            *b = busy;
        }
    }

    fn head(slot: usize) -> u16 {
        u16::try_from(3 * slot).unwrap_or(u16::MAX)
    }

    fn data_off(&self, slot: usize) -> usize {
        DATA_OFF + slot * self.slot_bytes
    }

    /// The data buffer of an idle slot (empty if the slot is busy or does not exist).
    pub fn buffer(&mut self, slot: usize) -> &mut [u8] {
        if slot >= self.slots || self.is_busy(slot) {
            return &mut [];
        }
        let off = self.data_off(slot);
        self.dma.bytes_mut(off, self.slot_bytes).unwrap_or(&mut [])
    }

    /// Queues `r` in idle slot `slot` (visible to the device at the next [`Self::kick`]).
    pub fn submit(&mut self, slot: usize, r: Request) -> Result<(), BlkError> {
        if slot >= self.slots || self.is_busy(slot) {
            return Err(BlkError::BadRequest);
        }
        let sectors = (r.bytes as u64) / SECTOR;
        let has_data = r.ty != ReqType::Flush;
        if has_data
            && (r.bytes == 0
                || !r.bytes.is_multiple_of(SECTOR_BYTES)
                || r.bytes > self.slot_bytes
                || r.sector.checked_add(sectors).is_none_or(|end| end > self.info.capacity))
        {
            return Err(BlkError::BadRequest);
        }
        let h = Self::head(slot);
        let hdr = HDR_OFF + 16 * slot;
        self.dma.store::<u32>(hdr, r.ty as u32);
        self.dma.store::<u32>(hdr + 4, 0);
        self.dma.store::<u64>(hdr + 8, if has_data { r.sector } else { 0 });
        self.dma.store::<u8>(STATUS_OFF + slot, S_UNWRITTEN);
        let hdr_phys = self.dma.phys(hdr);
        let status_phys = self.dma.phys(STATUS_OFF + slot);
        if has_data {
            let data_phys = self.dma.phys(self.data_off(slot));
            let write = if r.ty == ReqType::In { DESC_F_WRITE } else { 0 };
            let len = u32::try_from(r.bytes).map_err(|_| BlkError::BadRequest)?;
            self.q.set_desc(&mut self.dma, h, hdr_phys, 16, DESC_F_NEXT, h + 1);
            self.q.set_desc(&mut self.dma, h + 1, data_phys, len, DESC_F_NEXT | write, h + 2);
        } else {
            self.q.set_desc(&mut self.dma, h, hdr_phys, 16, DESC_F_NEXT, h + 2);
        }
        self.q.set_desc(&mut self.dma, h + 2, status_phys, 1, DESC_F_WRITE, 0);
        self.q.push(&mut self.dma, h);
        self.set_busy(slot, true);
        self.in_flight += 1;
        Ok(())
    }

    /// Publishes everything submitted and notifies the device (one MMIO write).
    pub fn kick(&mut self, m: &mut dyn Machine) {
        self.q.publish(&mut self.dma);
        self.t.notify(m, 0);
    }

    /// The device's register window (for tests that touch registers themselves).
    pub fn transport(&self) -> &Transport {
        &self.t
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next completion, if the device has produced one (never blocks).
    pub fn poll(&mut self) -> Result<Option<Completion>, BlkError> {
        let pending = self.q.used_pending(&self.dma);
        if pending == 0 {
            return Ok(None);
        }
        if usize::from(pending) > self.in_flight {
            return Err(BlkError::BadUsedCount(pending));
        }
        let e = self.q.pop_used(&self.dma);
        let slot = (e.id / 3) as usize;
        if !e.id.is_multiple_of(3) || slot >= self.slots || !self.is_busy(slot) {
            return Err(BlkError::BadUsedId(e.id));
        }
        self.set_busy(slot, false);
        self.in_flight -= 1;
        let status = self.dma.load::<u8>(STATUS_OFF + slot);
        Ok(Some(Completion { slot, status }))
    }

    /// Waits (polling memory, bounded by the timeout) for the next completion.
    pub fn wait(&mut self, m: &mut dyn Machine) -> Result<Completion, BlkError> {
        if self.in_flight == 0 {
            return Err(BlkError::Idle);
        }
        let start = m.tsc();
        // A second bound in case the TSC does not advance: every poll costs more than 8 cycles.
        let max_polls = self.timeout_cycles / 8 + 64;
        let mut polls = 0u64;
        // A long wait looks at the status register a few times per timeout (one MMIO exit
        // each), so a device that gave up is noticed long before the timeout, while a short
        // stall (a service restart) costs no exit at all.
        let (every_cycles, every_polls) = (self.timeout_cycles / STATUS_CHECKS, max_polls / STATUS_CHECKS);
        let (mut last_tsc, mut last_polls) = (start, 0u64);
        loop {
            if let Some(c) = self.poll()? {
                return Ok(c);
            }
            polls += 1;
            if polls.is_multiple_of(64) {
                let now = m.tsc();
                let timed_out = now.wrapping_sub(start) > self.timeout_cycles || polls > max_polls;
                let due = now.wrapping_sub(last_tsc) > every_cycles || polls - last_polls > every_polls;
                if timed_out || due {
                    (last_tsc, last_polls) = (now, polls);
                    let st = self.t.read(m, reg::STATUS);
                    if st & status::DEVICE_NEEDS_RESET != 0 {
                        return Err(BlkError::NeedsReset { status: st, in_flight: self.in_flight });
                    }
                    if timed_out {
                        return Err(BlkError::Timeout { status: st, in_flight: self.in_flight });
                    }
                }
            }
            m.pause();
        }
    }

    /// Runs `total` requests at the configured queue depth. `make(i, buf)` describes request
    /// `i` (and fills `buf`, its slot's data buffer, for a write); `done(i, buf, status)` sees
    /// it finish (for a read `buf` holds the data). All free slots are refilled after each
    /// batch of completions, with one notify per refill.
    pub fn run<F, G>(&mut self, m: &mut dyn Machine, total: u64, mut make: F, mut done: G) -> Result<RunStats, BlkError>
    where
        F: FnMut(u64, &mut [u8]) -> Request,
        G: FnMut(u64, &[u8], u8),
    {
        if self.in_flight != 0 {
            return Err(BlkError::Busy);
        }
        let mut req_of = [0u64; MAX_SLOTS];
        let mut stats = RunStats::default();
        let mut next = 0u64;
        let start = m.tsc();
        while stats.completed < total {
            let mut submitted = false;
            for (slot, req) in req_of.iter_mut().enumerate().take(self.slots) {
                if next >= total {
                    break;
                }
                if self.is_busy(slot) {
                    continue;
                }
                let r = make(next, self.buffer(slot));
                self.submit(slot, r)?;
                *req = next;
                next += 1;
                submitted = true;
            }
            if submitted {
                self.kick(m);
                stats.kicks += 1;
            }
            let waiting = m.tsc();
            let mut c = Some(self.wait(m)?);
            stats.max_wait = stats.max_wait.max(m.tsc().wrapping_sub(waiting));
            while let Some(done_now) = c {
                let i = req_of.get(done_now.slot).copied().unwrap_or(0);
                done(i, self.buffer(done_now.slot), done_now.status);
                stats.completed += 1;
                if done_now.status != S_OK {
                    stats.errors += 1;
                }
                c = self.poll()?;
            }
        }
        stats.cycles = m.tsc().wrapping_sub(start);
        Ok(stats)
    }

    /// Resets the device so it stops using our memory (bounded; errors ignored).
    pub fn shutdown(&mut self, m: &mut dyn Machine) {
        let _ = self.t.reset(m);
        self.in_flight = 0;
        self.busy = [false; MAX_SLOTS];
    }
}
