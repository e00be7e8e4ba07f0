//! The block device's state survives the service: the test plays the core (guest RAM memfd,
//! state region, ioeventfd, irqfd kept across instances; a fresh ring per instance) and a guest
//! driver, SIGKILLs `bulkhead-block` at various points and starts a new instance with the same
//! fds. The new instance must resume without re-negotiation and complete every request exactly
//! once; a corrupted state region must end in DEVICE_NEEDS_RESET.

mod support;
use support::*;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::MutexGuard;
use std::time::Duration;

use ipc::control::FdRole;
use ipc::state::{StateRegion, SLOT_HEADER_LEN, SLOT_LEN};
use ipc::wait;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = MMIO_BASE;
const RAM: u64 = 8 << 20;
const DISK: u64 = 4 << 20;
const QSIZE: u16 = 32;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x18000;
const DATA: u64 = 0x100000;
/// Bytes per request slot (large requests widen the in-flight window).
const SLOT: u64 = 128 * 1024;
const T: Duration = Duration::from_secs(5);
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const DRIVER_OK_ALL: u32 = 1 | 2 | 4 | 8;
const NEEDS_RESET: u32 = 0x40;

/// What the core keeps across instances, plus the current instance.
struct Rig {
    _serial: MutexGuard<'static, ()>,
    memfd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    disk: tempfile::NamedTempFile,
    state: StateRegion,
    notify: EventFd,
    irq: EventFd,
    svc: Option<Instance>,
    /// Driver side.
    q: GuestQueue,
}

impl Rig {
    fn new() -> Self {
        let serial = one_at_a_time();
        let mut disk = tempfile::NamedTempFile::new().expect("tempfile");
        disk.write_all(&vec![0u8; usize::try_from(DISK).expect("size")]).expect("fill");
        disk.flush().expect("flush");
        let (memfd, mem) = guest_ram(usize::try_from(RAM).expect("ram"));
        Self {
            _serial: serial,
            memfd,
            mem,
            disk,
            state: StateRegion::create("test-state").expect("state region"),
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            svc: None,
            q: GuestQueue::at(DESC, AVAIL, USED, QSIZE),
        }
    }

    /// Starts an instance exactly as the core would, with a fresh ring.
    fn start(&mut self) {
        let disk_fd: OwnedFd = self.disk.reopen().expect("reopen").into();
        self.svc = Some(Instance::start(
            env!("CARGO_BIN_EXE_bulkhead-block"),
            "restart-test",
            StderrTo::Inherit,
            &[
                (FdRole::GuestMemory, self.memfd.as_fd()),
                (FdRole::Disk, disk_fd.as_fd()),
                (FdRole::Irq, borrow(&self.irq)),
                (FdRole::QueueNotify(0), borrow(&self.notify)),
                (FdRole::StateRegion, self.state.fd()),
            ],
            block_device(RAM, DISK, false, "restart", Default::default()),
        ));
    }

    /// SIGKILLs the current instance (dropping it does).
    fn kill(&mut self) {
        self.svc = None;
    }

    fn svc(&self) -> &Instance {
        self.svc.as_ref().expect("instance")
    }

    fn rd(&self, off: u64) -> u32 {
        self.svc().mmio(BASE).rd(off)
    }

    fn wr(&self, off: u64, v: u32) {
        self.svc().mmio(BASE).wr(off, v);
    }

    /// Zeroed rings, VERSION_1 only, queue 0, DRIVER_OK.
    fn init(&mut self) {
        self.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).expect("clear rings");
        let svc = self.svc.as_ref().expect("instance");
        svc.mmio(BASE).init(2, 1 << 32, std::slice::from_mut(&mut self.q));
    }

    /// Puts request `slot` (descriptors 3*slot..) in the avail ring: `t` at `sector`, `len` bytes.
    fn submit(&mut self, slot: u16, t: u32, sector: u64, len: u32) {
        let hdr = HDR + 16 * u64::from(slot);
        blk_header(&self.mem, hdr, t, sector);
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS + u64::from(slot))).expect("status");
        let w = if t == T_IN { DESC_WRITE } else { 0 };
        self.q.set_desc(&self.mem, 3 * slot, hdr, 16, DESC_NEXT, 3 * slot + 1);
        self.q.set_desc(&self.mem, 3 * slot + 1, DATA + SLOT * u64::from(slot), len, DESC_NEXT | w, 3 * slot + 2);
        self.q.set_desc(&self.mem, 3 * slot + 2, STATUS + u64::from(slot), 1, DESC_WRITE, 0);
        self.q.offer(&self.mem, 3 * slot);
    }

    fn kick(&self) {
        self.notify.write(1).expect("kick");
    }

    /// Waits (bounded) for the used index to reach the avail index; returns new used heads.
    fn wait_all(&mut self) -> Vec<u16> {
        let deadline = std::time::Instant::now() + T;
        while self.q.used_idx(&self.mem) != self.q.next_avail {
            let used = self.q.used_idx(&self.mem);
            assert!(std::time::Instant::now() < deadline, "stalled: used {used} avail {}", self.q.next_avail);
            let _ = wait::wait_readable(borrow(&self.irq), Duration::from_millis(5));
            let _ = self.irq.read();
        }
        self.q.take_used(&self.mem).into_iter().map(|(head, _)| head).collect()
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(self.disk.path()).expect("open").read_to_end(&mut v).expect("read");
        v
    }

    fn redone(&self) -> u64 {
        self.svc().ping(1, T).redone
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let seed = usize::try_from(seed).expect("seed");
    (0..len).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(97)).to_le_bytes()[1]).collect()
}

/// One batch of `n` writes (slot i → its own sectors, with data seeded by `seed + i`), kicked,
/// then optionally a kill after `kill_after_us` and a restart. Checks exactly-once completion
/// and updates the disk model.
fn batch(rig: &mut Rig, model: &mut [u8], n: u16, seed: u32, kill_after_us: Option<u64>, sector_base: u64) {
    let len = u32::try_from(SLOT).expect("slot");
    for i in 0..n {
        let data = pattern(seed + u32::from(i), len as usize);
        rig.mem.write_slice(&data, GuestAddress(DATA + SLOT * u64::from(i))).expect("data");
        let sector = (sector_base + u64::from(i) * (SLOT / 512)) % (DISK / 512 - SLOT / 512);
        rig.submit(i, T_OUT, sector, len);
        let off = usize::try_from(sector * 512).expect("off");
        model[off..off + data.len()].copy_from_slice(&data);
    }
    rig.kick();
    if let Some(us) = kill_after_us {
        std::thread::sleep(Duration::from_micros(us));
        rig.kill();
        rig.start();
        assert_eq!(rig.rd(0x070), DRIVER_OK_ALL, "resumed without re-negotiation");
        rig.wr(0x030, 0);
        assert_eq!(rig.rd(0x044), 1, "queue still ready");
    }
    let mut heads = rig.wait_all();
    heads.sort_unstable();
    let want: Vec<u16> = (0..n).map(|i| 3 * i).collect();
    assert_eq!(heads, want, "every request completed exactly once");
    for i in 0..n {
        let st: u8 = rig.mem.read_obj(GuestAddress(STATUS + u64::from(i))).expect("status");
        assert_eq!(st, 0, "request {i} OK");
    }
}

#[test]
fn killed_with_requests_in_flight_resumes_and_completes_each_once() {
    let mut rig = Rig::new();
    rig.start();
    rig.init();
    let mut model = vec![0u8; usize::try_from(DISK).expect("disk")];
    // Between requests, right after the kick, and a little later (requests in flight).
    let kills = [None, Some(0), Some(200), Some(1000), Some(3000), None, Some(50), Some(10_000)];
    let mut redone = 0;
    for (k, kill) in kills.iter().enumerate() {
        let seed = u32::try_from(k).expect("k") * 100;
        batch(&mut rig, &mut model, 8, seed, *kill, u64::try_from(k).expect("k") * 97);
        if kill.is_some() {
            redone += rig.redone();
        }
    }
    // A kill between batches (nothing in flight) resumes too.
    rig.kill();
    rig.start();
    assert_eq!(rig.rd(0x070), DRIVER_OK_ALL);
    assert_eq!(rig.redone(), 0, "nothing in flight between batches");
    // Reads through the new instance see the model.
    rig.submit(0, T_IN, 0, u32::try_from(SLOT).expect("slot"));
    rig.kick();
    assert_eq!(rig.wait_all(), vec![0]);
    let mut back = vec![0u8; usize::try_from(SLOT).expect("slot")];
    rig.mem.read_slice(&mut back, GuestAddress(DATA)).expect("read back");
    assert_eq!(back, model[..back.len()], "read after restart");
    assert!(rig.disk_bytes() == model, "disk matches the model");
    eprintln!("requests redone over {} kills: {redone}", kills.iter().filter(|k| k.is_some()).count());
}

#[test]
fn corrupted_state_region_means_needs_reset() {
    let mut rig = Rig::new();
    rig.start();
    rig.init();
    let mut model = vec![0u8; usize::try_from(DISK).expect("disk")];
    batch(&mut rig, &mut model, 2, 7, None, 0);
    rig.kill();
    // Flip one payload byte of each committed slot (whichever is newest).
    rig.state.corrupt_byte(SLOT_HEADER_LEN + 3, 0x04);
    rig.state.corrupt_byte(SLOT_LEN + SLOT_HEADER_LEN + 3, 0x04);
    let _ = rig.irq.read();
    rig.start();
    assert!(wait::wait_readable(borrow(&rig.irq), T).expect("poll"), "config interrupt raised");
    assert_eq!(rig.rd(0x070), NEEDS_RESET, "DEVICE_NEEDS_RESET, nothing else");
    assert_ne!(rig.rd(0x060) & 2, 0, "config-change bit");
    assert!(rig.svc.as_mut().expect("instance").is_running(), "alive");
    // The guest resets the device: it works again, and its new state survives the next kill.
    rig.init();
    assert_eq!(rig.rd(0x070), DRIVER_OK_ALL);
    batch(&mut rig, &mut model, 3, 70, Some(100), 50);
    assert_eq!(rig.disk_bytes(), model);
}

#[test]
fn hot_word_corruption_means_needs_reset() {
    let mut rig = Rig::new();
    rig.start();
    rig.init();
    let mut model = vec![0u8; usize::try_from(DISK).expect("disk")];
    batch(&mut rig, &mut model, 2, 9, None, 0);
    rig.kill();
    rig.state.corrupt_byte(ipc::state::HOT_OFFSET + 1, 0x01);
    rig.start();
    assert_eq!(rig.rd(0x070), NEEDS_RESET);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]
        /// Random sequences of (submit a batch, maybe kill after a random delay, restart) against
        /// a model of the disk: every request completes exactly once, the disk matches.
        #[test]
        fn submit_kill_restart_matches_model(ops in proptest::collection::vec((1u16..=8, proptest::option::of(0u64..4000)), 1..6)) {
            let mut rig = Rig::new();
            rig.start();
            rig.init();
            let mut model = vec![0u8; usize::try_from(DISK).expect("disk")];
            for (k, (n, kill)) in ops.iter().enumerate() {
                let k = u32::try_from(k).expect("k");
                batch(&mut rig, &mut model, *n, k * 31 + 5, *kill, u64::from(k) * 131);
            }
            prop_assert!(rig.disk_bytes() == model, "disk matches the model");
        }
    }
}

/// Deterministic crash points: the test leaves the state region and guest memory exactly as an
/// instance killed at that instruction would, then starts a new instance.
#[test]
fn crash_points_of_take_and_publish() {
    use ipc::state::InflightEntry;
    let mut rig = Rig::new();
    rig.start();
    rig.init();
    let mut model = vec![0u8; usize::try_from(DISK).expect("disk")];
    batch(&mut rig, &mut model, 2, 3, None, 0);
    let len = u32::try_from(SLOT).expect("slot");

    // 1. Taken and recorded (entry + next_avail), not executed: redone once.
    rig.kill();
    let data = pattern(500, len as usize);
    rig.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    rig.submit(0, T_OUT, 64, len);
    model[64 * 512..64 * 512 + data.len()].copy_from_slice(&data);
    let pos = rig.q.next_avail.wrapping_sub(1);
    let mut w = rig.state.queue_word(0).expect("word");
    assert_eq!(w.next_avail, pos, "the dead instance had taken everything before");
    rig.state.set_entry(0, Some(InflightEntry { pos, order: 7 }));
    w.next_avail = pos.wrapping_add(1);
    rig.state.set_queue_word(0, w);
    rig.start();
    assert_eq!(rig.wait_all(), vec![0]);
    assert_eq!(rig.redone(), 1, "redone once");

    // 2. Entry written, next_avail not yet advanced: redone once, not taken twice.
    rig.kill();
    rig.submit(0, T_OUT, 64, len);
    let pos = rig.q.next_avail.wrapping_sub(1);
    rig.state.set_entry(0, Some(InflightEntry { pos, order: 8 }));
    rig.start();
    assert_eq!(rig.wait_all(), vec![0], "completed once");
    assert_eq!(rig.redone(), 1);

    // 3. Published in the used ring (idx advanced) but the entry not cleared: not redone.
    rig.kill();
    rig.submit(0, T_OUT, 64, len);
    let pos = rig.q.next_avail.wrapping_sub(1);
    let mut w = rig.state.queue_word(0).expect("word");
    rig.state.set_entry(0, Some(InflightEntry { pos, order: 9 }));
    w.next_avail = pos.wrapping_add(1);
    w.publishing = true;
    w.last_head = 0;
    rig.state.set_queue_word(0, w);
    // The dead instance did the I/O and wrote the used element and index.
    std::fs::OpenOptions::new()
        .write(true)
        .open(rig.disk.path())
        .and_then(|mut f| {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(64 * 512))?;
            f.write_all(&data)
        })
        .expect("dead instance's write");
    rig.mem.write_obj(0u8, GuestAddress(STATUS)).expect("status");
    let at = USED + 4 + 8 * u64::from(w.used_idx % QSIZE);
    rig.mem.write_obj(0u32, GuestAddress(at)).expect("id");
    rig.mem.write_obj(1u32, GuestAddress(at + 4)).expect("len");
    rig.mem.write_obj(w.used_idx.wrapping_add(1), GuestAddress(USED + 2)).expect("used idx");
    rig.start();
    assert_eq!(rig.redone(), 0, "a published request is not redone");
    assert_eq!(rig.wait_all(), vec![0], "and appears once in the used ring");
    assert_eq!(rig.state.queue_word(0).expect("word").used_idx, rig.q.next_avail, "used index caught up");
    assert_eq!(rig.state.entry(0).expect("entry"), None, "entry cleared");

    // 4. Publishing started, used index not written: redone.
    rig.kill();
    rig.submit(0, T_OUT, 64, len);
    let pos = rig.q.next_avail.wrapping_sub(1);
    let mut w = rig.state.queue_word(0).expect("word");
    rig.state.set_entry(0, Some(InflightEntry { pos, order: 10 }));
    w.next_avail = pos.wrapping_add(1);
    w.publishing = true;
    rig.state.set_queue_word(0, w);
    rig.start();
    assert_eq!(rig.wait_all(), vec![0]);
    assert_eq!(rig.redone(), 1);

    // 5. Inconsistent bookkeeping (next_avail ahead with nothing in flight): needs reset.
    rig.kill();
    let mut w = rig.state.queue_word(0).expect("word");
    w.next_avail = w.next_avail.wrapping_add(3);
    rig.state.set_queue_word(0, w);
    rig.start();
    assert_eq!(rig.rd(0x070), NEEDS_RESET);
    rig.init();
    batch(&mut rig, &mut model, 2, 11, None, 200);
    assert_eq!(rig.disk_bytes(), model);
}
