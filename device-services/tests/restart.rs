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
use std::process::Child;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc::control::{BlockConfig, ControlMsg, DeviceConfig, FdRole, MemoryRegion, RingSetup, ServiceSetup};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::state::{StateRegion, SLOT_HEADER_LEN, SLOT_LEN};
use ipc::{wait, ControlChannel, CoreEndpoint, WaitConfig};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = 0xd000_0000;
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
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const DRIVER_OK_ALL: u32 = 1 | 2 | 4 | 8;
const NEEDS_RESET: u32 = 0x40;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What the core keeps across instances, plus the current instance.
struct Rig {
    _serial: MutexGuard<'static, ()>,
    memfd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    disk: tempfile::NamedTempFile,
    state: StateRegion,
    notify: EventFd,
    irq: EventFd,
    child: Option<Child>,
    ctl: Option<ControlChannel>,
    core: Option<CoreEndpoint>,
    /// Driver side.
    avail: u16,
    used_seen: u16,
}

impl Rig {
    fn new() -> Self {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut disk = tempfile::NamedTempFile::new().expect("tempfile");
        disk.write_all(&vec![0u8; usize::try_from(DISK).expect("size")]).expect("fill");
        disk.flush().expect("flush");
        let memfd = memfd_create(c"test-guest-ram", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&memfd, i64::try_from(RAM).expect("ram")).expect("truncate");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(RAM).expect("ram"),
            Some(FileOffset::new(File::from(memfd.try_clone().expect("dup")), 0)),
        )])
        .expect("map");
        Self {
            _serial: serial,
            memfd,
            mem,
            disk,
            state: StateRegion::create("test-state").expect("state region"),
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            child: None,
            ctl: None,
            core: None,
            avail: 0,
            used_seen: 0,
        }
    }

    /// Starts an instance exactly as the core would, with a fresh ring.
    fn start(&mut self) {
        let (child, ctl) = spawn_service(env!("CARGO_BIN_EXE_bulkhead-block"), &[], false);
        let core = CoreEndpoint::create("restart-test", 16, WaitConfig::default()).expect("ring");
        let disk_fd: OwnedFd = self.disk.reopen().expect("reopen").into();
        let roles = vec![
            FdRole::Ring,
            FdRole::SubmitBell,
            FdRole::CompleteBell,
            FdRole::GuestMemory,
            FdRole::Disk,
            FdRole::Irq,
            FdRole::QueueNotify(0),
            FdRole::StateRegion,
        ];
        let fds = [
            core.region_fd(),
            core.submit_bell(),
            core.complete_bell(),
            self.memfd.as_fd(),
            disk_fd.as_fd(),
            borrow(&self.irq),
            borrow(&self.notify),
            self.state.fd(),
        ];
        let setup = ServiceSetup {
            name: "restart-test".into(),
            ring: RingSetup { capacity: core.capacity(), region_len: core.region_len() as u64 },
            fds: roles,
            device: DeviceConfig::Block(BlockConfig {
                mmio_base: BASE,
                mmio_len: 0x1000,
                gsi: 5,
                memory: vec![MemoryRegion { guest_addr: 0, len: RAM, file_offset: 0 }],
                disk_size: DISK,
                read_only: false,
                id: "restart".into(),
                num_queues: 1,
                queue_size: 256,
                rate_limit: Default::default(),
            }),
            idle_spin_us: 200,
        };
        ctl.send(&ControlMsg::Setup(setup), &fds).expect("send setup");
        let (msg, _) = ctl.recv(Instant::now() + Duration::from_secs(10)).expect("ready");
        assert_eq!(msg, ControlMsg::Ready { pid: child.id() });
        self.child = Some(child);
        self.ctl = Some(ctl);
        self.core = Some(core);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.ctl = None;
        self.core = None;
    }

    fn rd(&self, off: u64) -> u32 {
        let core = self.core.as_ref().expect("instance");
        let r = core.call(&ExitRequest::read(ExitKind::MmioRead, BASE + off, 4), T).expect("mmio read");
        assert_eq!(r.status, Status::Ok, "read {off:#x}");
        u32::from_le_bytes([r.data[0], r.data[1], r.data[2], r.data[3]])
    }

    fn wr(&self, off: u64, v: u32) {
        let core = self.core.as_ref().expect("instance");
        let req = ExitRequest::write(ExitKind::MmioWrite, BASE + off, &v.to_le_bytes()).expect("req");
        assert_eq!(core.call(&req, T).expect("mmio write").status, Status::Ok, "write {off:#x}");
    }

    fn init(&mut self) {
        self.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).expect("clear rings");
        self.wr(0x070, 0);
        self.wr(0x070, 1 | 2);
        self.wr(0x014, 1);
        let hi = self.rd(0x010);
        self.wr(0x024, 0);
        self.wr(0x020, 0);
        self.wr(0x024, 1);
        self.wr(0x020, hi & 1);
        self.wr(0x070, 1 | 2 | 8);
        assert_ne!(self.rd(0x070) & 8, 0, "FEATURES_OK");
        self.wr(0x030, 0);
        self.wr(0x038, u32::from(QSIZE));
        self.wr(0x080, lo32(DESC));
        self.wr(0x084, 0);
        self.wr(0x090, lo32(AVAIL));
        self.wr(0x094, 0);
        self.wr(0x0a0, lo32(USED));
        self.wr(0x0a4, 0);
        self.wr(0x044, 1);
        self.wr(0x070, DRIVER_OK_ALL);
        self.avail = 0;
        self.used_seen = 0;
    }

    /// Puts request `slot` (descriptors 3*slot..) in the avail ring: `t` at `sector`, `len` bytes.
    fn submit(&mut self, slot: u16, t: u32, sector: u64, len: u32) {
        let hdr = HDR + 16 * u64::from(slot);
        self.mem.write_obj(t, GuestAddress(hdr)).expect("type");
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).expect("reserved");
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).expect("sector");
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS + u64::from(slot))).expect("status");
        let d = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(DESC + 16 * u64::from(i));
            self.mem.write_obj(addr, at).expect("addr");
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).expect("len");
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).expect("flags");
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).expect("next");
        };
        let w = if t == T_IN { F_WRITE } else { 0 };
        d(3 * slot, hdr, 16, F_NEXT, 3 * slot + 1);
        d(3 * slot + 1, DATA + SLOT * u64::from(slot), len, F_NEXT | w, 3 * slot + 2);
        d(3 * slot + 2, STATUS + u64::from(slot), 1, F_WRITE, 0);
        let at = AVAIL + 4 + 2 * u64::from(self.avail % QSIZE);
        self.mem.write_obj(3 * slot, GuestAddress(at)).expect("ring");
        self.avail = self.avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(self.avail, GuestAddress(AVAIL + 2)).expect("idx");
    }

    fn kick(&self) {
        self.notify.write(1).expect("kick");
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
    }

    /// Waits (bounded) for the used index to reach the avail index; returns new used heads.
    fn wait_all(&mut self) -> Vec<u32> {
        let deadline = Instant::now() + T;
        while self.used_idx() != self.avail {
            assert!(Instant::now() < deadline, "stalled: used {} avail {}", self.used_idx(), self.avail);
            let _ = wait::wait_readable(borrow(&self.irq), Duration::from_millis(5));
            let _ = self.irq.read();
        }
        let mut heads = Vec::new();
        while self.used_seen != self.used_idx() {
            let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            heads.push(self.mem.read_obj::<u32>(GuestAddress(at)).expect("id"));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        heads
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(self.disk.path()).expect("open").read_to_end(&mut v).expect("read");
        v
    }

    fn redone(&self) -> u64 {
        let ctl = self.ctl.as_ref().expect("instance");
        ctl.send(&ControlMsg::Ping { token: 1 }, &[]).expect("ping");
        match ctl.recv(Instant::now() + T).expect("pong").0 {
            ControlMsg::Pong { stats, .. } => stats.redone,
            other => panic!("unexpected {other:?}"),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill();
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
    let want: Vec<u32> = (0..u32::from(n)).map(|i| 3 * i).collect();
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
    assert!(rig.child.as_mut().expect("child").try_wait().expect("try_wait").is_none(), "alive");
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
    let pos = rig.avail.wrapping_sub(1);
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
    let pos = rig.avail.wrapping_sub(1);
    rig.state.set_entry(0, Some(InflightEntry { pos, order: 8 }));
    rig.start();
    assert_eq!(rig.wait_all(), vec![0], "completed once");
    assert_eq!(rig.redone(), 1);

    // 3. Published in the used ring (idx advanced) but the entry not cleared: not redone.
    rig.kill();
    rig.submit(0, T_OUT, 64, len);
    let pos = rig.avail.wrapping_sub(1);
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
    assert_eq!(rig.state.queue_word(0).expect("word").used_idx, rig.avail, "used index caught up");
    assert_eq!(rig.state.entry(0).expect("entry"), None, "entry cleared");

    // 4. Publishing started, used index not written: redone.
    rig.kill();
    rig.submit(0, T_OUT, 64, len);
    let pos = rig.avail.wrapping_sub(1);
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
