//! Spawns the real `bulkhead-block` and drives it exactly as the core and a guest driver would:
//! guest RAM in a memfd, virtio-mmio registers over the exit ring, descriptor chains written into
//! the memfd, kicks on the queue's ioeventfd, completions awaited (bounded) on the irqfd.

mod support;
use support::*;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ipc::control::FdRole;
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::wait;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = MMIO_BASE;
const WIN: u64 = 0x1000;
const RAM: u64 = 4 << 20;
const DISK: u64 = 1 << 20;
const DISK_USIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const T: Duration = Duration::from_secs(2);

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const NEEDS_RESET: u32 = 0x40;

struct Blk {
    _serial: MutexGuard<'static, ()>,
    svc: Instance,
    mem: GuestMemoryMmap<()>,
    notify: EventFd,
    irq: EventFd,
    disk: tempfile::NamedTempFile,
    q: GuestQueue,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| i.wrapping_mul(31).wrapping_add(usize::from(seed) * 7).wrapping_add(i >> 9).to_le_bytes()[0])
        .collect()
}

fn spawn(read_only: bool) -> Blk {
    let serial = one_at_a_time();
    let mut disk = tempfile::NamedTempFile::new().expect("tempfile");
    disk.write_all(&pattern(1, DISK_USIZE)).expect("fill disk");
    disk.flush().expect("flush");
    let disk_fd: OwnedFd = if read_only {
        File::open(disk.path()).expect("open ro").into()
    } else {
        disk.reopen().expect("reopen").into()
    };
    let (memfd, mem) = guest_ram(usize::try_from(RAM).expect("ram"));
    let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let svc = Instance::start(
        env!("CARGO_BIN_EXE_bulkhead-block"),
        "block-test",
        StderrTo::Inherit,
        &[
            (FdRole::GuestMemory, memfd.as_fd()),
            (FdRole::Disk, disk_fd.as_fd()),
            (FdRole::Irq, borrow(&irq)),
            (FdRole::QueueNotify(0), borrow(&notify)),
        ],
        block_device(RAM, DISK, read_only, "test-disk-7", Default::default()),
    );
    Blk { _serial: serial, svc, mem, notify, irq, disk, q: GuestQueue::at(DESC, AVAIL, USED, QSIZE) }
}

impl Blk {
    fn regs(&self) -> MmioRegs<'_> {
        self.svc.mmio(BASE)
    }

    fn rd(&self, off: u64) -> u32 {
        self.regs().rd(off)
    }

    fn wr(&self, off: u64, v: u32) {
        self.regs().wr(off, v);
    }

    fn features(&self) -> u64 {
        self.regs().features()
    }

    /// Feature negotiation and queue 0 (descriptor table at `desc`) set-up, as a driver does.
    fn init(&mut self, desc: u64) {
        assert_eq!(self.rd(0x004), 2, "version");
        let regs = self.svc.mmio(BASE);
        let offered = regs.begin(2);
        assert_ne!(offered & (1 << 32), 0, "VERSION_1 offered");
        regs.accept(offered & ((1 << 32) | (1 << 9) | (1 << 6) | (1 << 2) | (1 << 5)));
        self.q = GuestQueue::at(desc, AVAIL, USED, QSIZE);
        regs.setup_queue(0, &mut self.q);
        regs.driver_ok();
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q.set_desc(&self.mem, i, addr, len, flags, next);
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        blk_header(&self.mem, at, t, sector);
    }

    /// Makes `head` available and kicks.
    fn offer_and_kick(&mut self, head: u16) {
        self.q.offer(&self.mem, head);
        self.notify.write(1).expect("kick");
    }

    /// Waits (bounded) until the used index reaches the avail index, with an interrupt seen.
    /// Returns the used elements (id, len) that appeared.
    fn wait_used(&mut self) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + T;
        let mut irq_seen = false;
        while self.q.used_idx(&self.mem) != self.q.next_avail || !irq_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            let used = self.q.used_idx(&self.mem);
            assert!(!left.is_zero(), "no completion: used {used} avail {} irq {irq_seen}", self.q.next_avail);
            if wait::wait_readable(borrow(&self.irq), left.min(Duration::from_millis(50))).expect("poll irq") {
                let _ = self.irq.read();
                irq_seen = true;
                let isr = self.rd(0x060);
                if isr != 0 {
                    self.wr(0x064, isr);
                }
            }
        }
        self.q.take_used(&self.mem)
    }

    fn status_at(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).expect("status")
    }

    /// A three-descriptor request: header, data (`write` = device-writable), status.
    fn request(&mut self, t: u32, sector: u64, data_len: u32, device_writes: bool) -> (u8, u32) {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison status");
        self.header(HDR, t, sector);
        if data_len > 0 {
            self.desc(0, HDR, 16, DESC_NEXT, 1);
            self.desc(1, DATA, data_len, DESC_NEXT | if device_writes { DESC_WRITE } else { 0 }, 2);
            self.desc(2, STATUS, 1, DESC_WRITE, 0);
        } else {
            self.desc(0, HDR, 16, DESC_NEXT, 2);
            self.desc(2, STATUS, 1, DESC_WRITE, 0);
        }
        self.offer_and_kick(0);
        let used = self.wait_used();
        assert_eq!(used.len(), 1, "{used:?}");
        assert_eq!(used[0].0, 0, "used id is the head");
        (self.status_at(STATUS), used[0].1)
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut f = File::open(self.disk.path()).expect("open");
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut v).expect("read");
        v
    }

    fn alive(&mut self) {
        assert!(self.svc.is_running(), "service died");
        assert_eq!(self.rd(0x000), 0x7472_6976, "still answers registers");
    }

    fn shutdown(mut self) {
        self.svc.shutdown(T);
    }
}

#[test]
fn write_read_flush_get_id() {
    let mut b = spawn(false);
    b.init(DESC);
    let cap: u64 = {
        let lo = b.rd(0x100);
        let hi = b.rd(0x104);
        u64::from(lo) | (u64::from(hi) << 32)
    };
    assert_eq!(cap, DISK / 512, "capacity in sectors");
    assert_eq!(b.rd(0x114), 512, "blk_size");

    // Read sectors 8..16 and compare with the file.
    let (st, len) = b.request(T_IN, 8, 4096, true);
    assert_eq!((st, len), (S_OK, 4097));
    let mut got = vec![0u8; 4096];
    b.mem.read_slice(&mut got, GuestAddress(DATA)).expect("read data");
    assert_eq!(got, pattern(1, DISK_USIZE)[8 * 512..16 * 512]);

    // Write a new pattern at sector 100, read it back through the device and from the file.
    let new = pattern(9, 8192);
    b.mem.write_slice(&new, GuestAddress(DATA)).expect("data");
    assert_eq!(b.request(T_OUT, 100, 8192, false), (S_OK, 1));
    b.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).expect("clear");
    assert_eq!(b.request(T_IN, 100, 8192, true), (S_OK, 8193));
    let mut back = vec![0u8; 8192];
    b.mem.read_slice(&mut back, GuestAddress(DATA)).expect("read back");
    assert_eq!(back, new);
    assert_eq!(b.disk_bytes()[100 * 512..100 * 512 + 8192], new[..]);

    assert_eq!(b.request(T_FLUSH, 0, 0, false), (S_OK, 1));

    let (st, len) = b.request(T_GET_ID, 0, 20, true);
    assert_eq!((st, len), (S_OK, 21));
    let mut id = [0u8; 20];
    b.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id[..11], b"test-disk-7");
    assert!(id[11..].iter().all(|&c| c == 0));

    // Sectors past the end.
    assert_eq!(b.request(T_IN, cap, 512, true).0, S_IOERR);
    assert_eq!(b.request(T_IN, cap - 1, 1024, true).0, S_IOERR);
    assert_eq!(b.request(T_OUT, u64::MAX, 512, false).0, S_IOERR);
    b.alive();
    b.shutdown();
}

/// Sends `msg` and waits (bounded) for the acknowledgement `ack` picks.
fn control_exchange(svc: &Instance, msg: &ipc::control::ControlMsg, ack: impl Fn(&ipc::control::ControlMsg) -> bool) {
    svc.ctl.send(msg, &[]).expect("send");
    let (reply, _) = svc.ctl.recv(Instant::now() + T).expect("acknowledgement");
    assert!(ack(&reply), "unexpected answer {reply:?} to {msg:?}");
}

#[test]
fn paused_service_takes_no_request_until_resumed() {
    use ipc::control::ControlMsg;
    let mut b = spawn(false);
    b.init(DESC);
    control_exchange(&b.svc, &ControlMsg::Pause { token: 7 }, |m| *m == ControlMsg::Paused { token: 7 });
    // A write kicked while paused: nothing is taken, written or signalled for 500 ms.
    let new = pattern(4, 4096);
    b.mem.write_slice(&new, GuestAddress(DATA)).expect("data");
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison status");
    b.header(HDR, T_OUT, 40);
    b.desc(0, HDR, 16, DESC_NEXT, 1);
    b.desc(1, DATA, 4096, DESC_NEXT, 2);
    b.desc(2, STATUS, 1, DESC_WRITE, 0);
    let before = b.disk_bytes();
    b.offer_and_kick(0);
    assert!(!wait::wait_readable(borrow(&b.irq), Duration::from_millis(500)).expect("poll irq"), "no interrupt");
    assert_eq!(b.q.used_idx(&b.mem), 0, "no chain completed");
    assert_eq!(b.status_at(STATUS), 0xee, "no guest memory written");
    assert_eq!(b.disk_bytes(), before, "nothing written to the disk");
    // Still answers its control channel while paused (the liveness check needs that).
    b.svc.ping(9, T);
    control_exchange(&b.svc, &ControlMsg::Resume { token: 8 }, |m| *m == ControlMsg::Resumed { token: 8 });
    let used = b.wait_used();
    assert_eq!(used, vec![(0, 1)], "the request kicked during the pause is served on resume");
    assert_eq!(b.status_at(STATUS), S_OK);
    assert_eq!(b.disk_bytes()[40 * 512..40 * 512 + 4096], new[..]);
    b.alive();
    b.shutdown();
}

#[test]
fn write_zeroes_when_offered() {
    let mut b = spawn(false);
    b.init(DESC);
    if b.features() & (1 << 14) == 0 {
        eprintln!("SKIPPED: the temp file system supports neither hole punching nor range zeroing");
        return;
    }
    // One segment: sector 16, 8 sectors, no flags.
    b.mem.write_obj(16u64, GuestAddress(DATA)).expect("sector");
    b.mem.write_obj(8u32, GuestAddress(DATA + 8)).expect("num");
    b.mem.write_obj(0u32, GuestAddress(DATA + 12)).expect("flags");
    assert_eq!(b.request(T_WRITE_ZEROES, 0, 16, false), (S_OK, 1));
    let disk = b.disk_bytes();
    assert!(disk[16 * 512..24 * 512].iter().all(|&c| c == 0), "range zeroed");
    assert_eq!(disk[24 * 512..25 * 512], pattern(1, DISK_USIZE)[24 * 512..25 * 512], "next sector intact");
    assert_eq!(disk.len() as u64, DISK, "size kept");
    // Unknown flags are UNSUPP.
    b.mem.write_obj(0x80u32, GuestAddress(DATA + 12)).expect("flags");
    assert_eq!(b.request(T_WRITE_ZEROES, 0, 16, false).0, S_UNSUPP);
    b.alive();
    b.shutdown();
}

#[test]
fn read_only_disk_rejects_writes_and_stays_unchanged() {
    let mut b = spawn(true);
    let before = b.disk_bytes();
    assert_ne!(b.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(b.features() & ((1 << 13) | (1 << 14)), 0, "no discard / write-zeroes on a read-only disk");
    b.init(DESC);
    b.mem.write_slice(&pattern(5, 4096), GuestAddress(DATA)).expect("data");
    assert_eq!(b.request(T_OUT, 0, 4096, false), (S_IOERR, 1));
    assert_eq!(b.request(T_IN, 0, 512, true), (S_OK, 513), "reads still work");
    assert_eq!(b.request(T_FLUSH, 0, 0, false).0, S_OK);
    assert_eq!(b.disk_bytes(), before, "image unchanged");
    b.alive();
    b.shutdown();
}

#[test]
fn hostile_chains_are_answered_and_the_service_survives() {
    let mut b = spawn(false);
    b.init(DESC);
    let before = b.disk_bytes();
    let run = |b: &mut Blk| -> Vec<(u16, u32)> {
        b.offer_and_kick(0);
        b.wait_used()
    };
    // 1. A loop: header -> status -> header ... (bounded by the queue size): IOERR.
    b.header(HDR, T_IN, 0);
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison");
    b.desc(0, HDR, 16, DESC_NEXT, 1);
    b.desc(1, STATUS, 1, DESC_WRITE | DESC_NEXT, 0);
    assert_eq!(run(&mut b), vec![(0, 1)]);
    assert_eq!(b.status_at(STATUS), S_IOERR, "loop");
    // 2. Data outside guest RAM.
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison");
    b.desc(0, HDR, 16, DESC_NEXT, 1);
    b.desc(1, 0x1_0000_0000, 4096, DESC_WRITE | DESC_NEXT, 2);
    b.desc(2, STATUS, 1, DESC_WRITE, 0);
    assert_eq!(run(&mut b), vec![(0, 1)]);
    assert_eq!(b.status_at(STATUS), S_IOERR, "outside RAM");
    // 3. Wrong direction: a read whose data buffer is device-readable.
    assert_eq!(b.request(T_IN, 0, 512, false).0, S_IOERR, "wrong direction");
    // ... and a readable descriptor after a writable one.
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison");
    b.desc(0, DATA, 512, DESC_WRITE | DESC_NEXT, 1);
    b.desc(1, HDR, 16, DESC_NEXT, 2);
    b.desc(2, STATUS, 1, DESC_WRITE, 0);
    assert_eq!(run(&mut b), vec![(0, 1)]);
    assert_eq!(b.status_at(STATUS), S_IOERR, "readable after writable");
    // 4. Too short: an 8-byte header.
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison");
    b.desc(0, HDR, 8, DESC_NEXT, 2);
    b.desc(2, STATUS, 1, DESC_WRITE, 0);
    assert_eq!(run(&mut b), vec![(0, 1)]);
    assert_eq!(b.status_at(STATUS), S_IOERR, "short header");
    // 5. Too long for the disk and not a whole number of sectors.
    assert_eq!(b.request(T_OUT, 0, 100, false).0, S_IOERR, "partial sector");
    assert_eq!(b.request(T_OUT, DISK / 512 - 1, 4096, false).0, S_IOERR, "past the end");
    // 6. No status byte at all (everything device-readable): completed with length 0.
    b.desc(0, HDR, 16, DESC_NEXT, 1);
    b.desc(1, DATA, 512, 0, 0);
    b.header(HDR, T_OUT, 0);
    assert_eq!(run(&mut b), vec![(0, 0)], "no status: used length 0");
    // 7. Unknown request type.
    assert_eq!(b.request(77, 0, 0, false).0, S_UNSUPP);
    // 8. Descriptor index out of the table in the chain: truncated chain, IOERR.
    b.mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("poison");
    b.header(HDR, T_IN, 0);
    b.desc(0, HDR, 16, DESC_NEXT, 1);
    b.desc(1, STATUS, 1, DESC_WRITE | DESC_NEXT, 999);
    assert_eq!(run(&mut b), vec![(0, 1)]);
    assert_eq!(b.status_at(STATUS), S_IOERR, "bad next index");
    b.alive();
    assert_eq!(b.disk_bytes(), before, "no hostile request wrote to the disk");
    assert_eq!(b.rd(0x070) & NEEDS_RESET, 0, "answerable chains do not need a reset");

    // 9. A head index outside the queue cannot be completed: the device needs a reset.
    b.offer_and_kick(200);
    let deadline = Instant::now() + T;
    while b.rd(0x070) & NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET not set");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(wait::wait_readable(borrow(&b.irq), T).expect("poll"), "config interrupt raised");
    assert_ne!(b.rd(0x060) & 2, 0, "config-change bit in InterruptStatus");
    b.alive();
    // A reset brings it back.
    b.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).expect("clear rings");
    b.init(DESC);
    assert_eq!(b.rd(0x070) & NEEDS_RESET, 0);
    assert_eq!(b.request(T_IN, 0, 512, true), (S_OK, 513), "works after reset");
    b.shutdown();
}

#[test]
fn queue_outside_ram_needs_reset() {
    let mut b = spawn(false);
    b.init(RAM + 0x1000);
    assert_eq!(b.rd(0x044), 0, "queue refused");
    assert_ne!(b.rd(0x070) & NEEDS_RESET, 0, "DEVICE_NEEDS_RESET");
    b.alive();
    // Misaligned descriptor table, after a reset.
    b.wr(0x070, 0);
    assert_eq!(b.rd(0x070), 0);
    b.init(DESC + 8);
    assert_eq!(b.rd(0x044), 0);
    assert_ne!(b.rd(0x070) & NEEDS_RESET, 0);
    // Wrong access widths are refused, not fatal.
    let r = b.svc.core.call(&ExitRequest::read(ExitKind::MmioRead, BASE, 2), T).expect("call");
    assert_eq!(r.status, Status::Rejected);
    let r = b.svc.core.call(&ExitRequest::read(ExitKind::PioRead, BASE, 4), T).expect("call");
    assert_eq!(r.status, Status::Rejected, "port I/O is not this device's");
    let r = b.svc.core.call(&ExitRequest::read(ExitKind::MmioRead, BASE + WIN, 4), T).expect("call");
    assert_eq!(r.status, Status::Rejected, "outside the window");
    b.alive();
    b.shutdown();
}

/// Host-side "guest" throughput: 4 KiB random reads at queue depth 16, polled completions.
#[test]
fn random_read_throughput() {
    let mut b = spawn(false);
    b.init(DESC);
    let depth = QSIZE;
    let total: u32 = 20_000;
    let mut rng = 0x1234_5678u64;
    let sectors = DISK / 512 / 8;
    // Per slot i: descriptors 3i, 3i+1, 3i+2 (header, 4 KiB buffer, status).
    let prep = |b: &Blk, i: u16, sector: u64| {
        let hdr = HDR + 16 * u64::from(i);
        b.header(hdr, T_IN, sector);
        b.desc(3 * i, hdr, 16, DESC_NEXT, 3 * i + 1);
        b.desc(3 * i + 1, DATA + 4096 * u64::from(i), 4096, DESC_NEXT | DESC_WRITE, 3 * i + 2);
        b.desc(3 * i + 2, STATUS + u64::from(i), 1, DESC_WRITE, 0);
    };
    // Descriptor table for 16 slots of 3 needs 48 entries: use a 64-entry queue.
    b.wr(0x070, 0);
    b.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).expect("clear");
    let t0 = Instant::now();
    let cpu0 = child_cpu(&b);
    let mut submitted = 0u32;
    let mut done = 0u32;
    // Re-init with queue size 64 (used ring at 0x4000), VERSION_1 only.
    let used_at = 0x4000u64;
    b.q = GuestQueue::at(DESC, AVAIL, used_at, 64);
    b.svc.mmio(BASE).init(2, 1 << 32, std::slice::from_mut(&mut b.q));
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < total {
        while submitted < total && submitted - done < u32::from(depth) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let slot = u16::try_from(submitted % u32::from(depth)).expect("slot");
            prep(&b, slot, (rng % sectors) * 8);
            b.q.push(&b.mem, 3 * slot);
            submitted += 1;
        }
        b.q.publish(&b.mem);
        let flags: u16 = b.mem.read_obj(GuestAddress(used_at)).expect("flags");
        if flags & 1 == 0 {
            b.notify.write(1).expect("kick");
        }
        loop {
            let used = b.q.take_used(&b.mem);
            if !used.is_empty() {
                for (id, len) in &used {
                    assert_eq!(*len, 4097, "full read");
                    assert_eq!(b.status_at(STATUS + u64::from(id / 3)), S_OK);
                }
                done += u32::try_from(used.len()).expect("n");
                break;
            }
            assert!(Instant::now() < deadline, "throughput run stalled at {done}");
            std::hint::spin_loop();
        }
        let _ = b.irq.read();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = child_cpu(&b) - cpu0;
    eprintln!(
        "random 4 KiB reads, QD {depth}: {total} in {secs:.3} s = {:.0} IOPS; service CPU {:.2} µs/request",
        f64::from(total) / secs,
        cpu * 1e6 / f64::from(total)
    );
    assert_eq!(done, total);
    b.alive();
    b.shutdown();
}

/// User+system CPU seconds of the service so far (from /proc).
fn child_cpu(b: &Blk) -> f64 {
    cpu_time(b.svc.child.id()).as_secs_f64()
}
