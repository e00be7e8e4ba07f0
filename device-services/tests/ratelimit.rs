//! Rate limiting of the real `bulkhead-block` and `bulkhead-net` services, driven through the
//! real sandbox by a fake guest (guest RAM in a memfd, registers over the exit ring, chains in
//! guest memory, kicks on ioeventfds). Each test measures the rate the guest (or the TAP) sees
//! once the initial burst is spent and checks it against the configured limit, checks that
//! every byte arrived intact and that the service counted its waits (`throttled`).
//!
//! The tests of this file run one at a time: they measure time.

mod support;
use support::*;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ipc::control::{FdRole, RateLimit};
use ipc::state::StateRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(dead_code)]
#[path = "../../vmm-core/src/tap.rs"]
mod tap;

const BASE: u64 = MMIO_BASE;
const F_VERSION_1: u64 = 1 << 32;
/// Bound on every run (the limits below make each take 2–4 s).
const RUN_LIMIT: Duration = Duration::from_secs(9);
const MIB: u64 = 1 << 20;

/// Rate of `units` over `from..to`, per second.
fn rate(units: u64, from: Instant, to: Instant) -> f64 {
    units as f64 / to.duration_since(from).as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------- block

const BLK_RAM: usize = 8 << 20;
const DISK: u64 = MIB;
const BLK_QSIZE: u16 = 64;
const BLK_HDRS: u64 = 0x1_0000;
const BLK_STATUS: u64 = 0x1_8000;
const BLK_DATA: u64 = 0x10_0000;
/// Largest request of these tests (one data buffer per slot).
const SLOT_BYTES: u64 = 64 << 10;
const T_IN: u32 = 0;

fn disk_pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(131) ^ (i >> 9)).to_le_bytes()[0]).collect()
}

struct Blk {
    _serial: MutexGuard<'static, ()>,
    svc: Instance,
    memfd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    notify: EventFd,
    irq: EventFd,
    disk: Vec<u8>,
    disk_fd: OwnedFd,
    _file: tempfile::NamedTempFile,
    state: StateRegion,
    limit: RateLimit,
    q: GuestQueue,
}

impl Blk {
    fn spawn(limit: RateLimit) -> Self {
        let guard = one_at_a_time();
        let disk = disk_pattern(usize::try_from(DISK).expect("disk"));
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(&disk).expect("fill disk");
        let disk_fd: OwnedFd = file.reopen().expect("reopen").into();
        let (memfd, mem) = guest_ram(BLK_RAM);
        let q = GuestQueue::new(&mem, 0x1000, 0x2000, 0x3000, BLK_QSIZE);
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let state = StateRegion::create("ratelimit-blk-state").expect("state region");
        let svc = Self::start_with(&memfd, &disk_fd, &irq, &notify, &state, limit);
        let mut b = Self { _serial: guard, svc, memfd, mem, notify, irq, disk, disk_fd, _file: file, state, limit, q };
        b.svc.mmio(BASE).init(2, F_VERSION_1, std::slice::from_mut(&mut b.q));
        b
    }

    /// Kills the current instance and starts a new one with the same guest RAM, disk, eventfds
    /// and state region (it resumes the device from the region).
    fn restart(&mut self) {
        self.svc.kill();
        self.svc = Self::start_with(&self.memfd, &self.disk_fd, &self.irq, &self.notify, &self.state, self.limit);
    }

    fn start_with(
        memfd: &OwnedFd,
        disk_fd: &OwnedFd,
        irq: &EventFd,
        notify: &EventFd,
        state: &StateRegion,
        limit: RateLimit,
    ) -> Instance {
        Instance::start(
            env!("CARGO_BIN_EXE_bulkhead-block"),
            "ratelimit-blk",
            StderrTo::Pipe,
            &[
                (FdRole::GuestMemory, memfd.as_fd()),
                (FdRole::Disk, disk_fd.as_fd()),
                (FdRole::Irq, borrow(irq)),
                (FdRole::QueueNotify(0), borrow(notify)),
                (FdRole::StateRegion, state.fd()),
            ],
            block_device(BLK_RAM as u64, DISK, true, "ratelimit", limit),
        )
    }

    /// Makes slot `s` a read of `len` bytes at `sector` and offers it (head = 3s).
    fn submit_read(&mut self, s: u16, sector: u64, len: u32) {
        let hdr = BLK_HDRS + 16 * u64::from(s);
        blk_header(&self.mem, hdr, T_IN, sector);
        self.mem.write_obj(0xeeu8, GuestAddress(BLK_STATUS + u64::from(s))).expect("poison status");
        let data = BLK_DATA + SLOT_BYTES * u64::from(s);
        self.mem.write_slice(&vec![0u8; usize::try_from(len).expect("len")], GuestAddress(data)).expect("clear");
        self.q.set_desc(&self.mem, 3 * s, hdr, 16, DESC_NEXT, 3 * s + 1);
        self.q.set_desc(&self.mem, 3 * s + 1, data, len, DESC_NEXT | DESC_WRITE, 3 * s + 2);
        self.q.set_desc(&self.mem, 3 * s + 2, BLK_STATUS + u64::from(s), 1, DESC_WRITE, 0);
        self.q.offer(&self.mem, 3 * s);
    }

    /// Reads `count` requests of `len` bytes (request i at sector `(i × len / 512) mod disk`) with
    /// `depth` in flight, checks each one's status and data, and returns the completion time
    /// of each, in completion order.
    fn read_all(&mut self, count: u32, len: u32, depth: u16) -> Vec<Instant> {
        assert!(u64::from(len) <= SLOT_BYTES && u64::from(len) % 512 == 0 && 3 * depth <= BLK_QSIZE);
        let sectors_per = u64::from(len) / 512;
        let positions = DISK / u64::from(len);
        let sector_of = |i: u32| (u64::from(i) % positions) * sectors_per;
        let mut slot_req = vec![0u32; usize::from(depth)];
        let mut next = 0u32;
        let mut done = Vec::with_capacity(usize::try_from(count).expect("count"));
        let deadline = Instant::now() + RUN_LIMIT;
        while done.len() < done.capacity() {
            let mut offered = false;
            // Requests complete in order, so the slot of request `next` is free again.
            while next < count && self.q.outstanding() < depth {
                let s = u16::try_from(next % u32::from(depth)).expect("slot");
                slot_req[usize::from(s)] = next;
                self.submit_read(s, sector_of(next), len);
                next += 1;
                offered = true;
            }
            if offered {
                self.notify.write(1).expect("kick");
            }
            for (head, used_len) in self.q.take_used(&self.mem) {
                let s = head / 3;
                let i = slot_req[usize::from(s)];
                assert_eq!(used_len, len + 1, "request {i}: used length");
                let st: u8 = self.mem.read_obj(GuestAddress(BLK_STATUS + u64::from(s))).expect("status");
                assert_eq!(st, 0, "request {i}: status OK");
                let mut got = vec![0u8; usize::try_from(len).expect("len")];
                self.mem.read_slice(&mut got, GuestAddress(BLK_DATA + SLOT_BYTES * u64::from(s))).expect("data");
                let off = usize::try_from(sector_of(i) * 512).expect("offset");
                assert!(got[..] == self.disk[off..off + got.len()], "request {i}: data differs from the disk");
                done.push(Instant::now());
            }
            let _ = self.irq.read();
            assert!(Instant::now() < deadline, "stalled: {} of {count} done", done.len());
            std::thread::sleep(Duration::from_micros(200));
        }
        done
    }

    fn shutdown(mut self) -> Vec<(String, u64)> {
        self.svc.shutdown_with_stats(Duration::from_secs(5))
    }
}

#[test]
fn block_bandwidth_limit_is_the_measured_rate() {
    let limit = MIB;
    let mut b = Blk::spawn(RateLimit { bytes_per_sec: limit, ..RateLimit::default() });
    let len = 64u32 << 10;
    let count = 64u32; // 4 MiB
    let t0 = Instant::now();
    let done = b.read_all(count, len, 8);
    let total = done[done.len() - 1].duration_since(t0);
    // Measured over the last 3 MiB, after the initial burst.
    let skip = usize::try_from(MIB / u64::from(len)).expect("skip");
    let measured = rate(u64::from(len) * (done.len() - skip) as u64, done[skip - 1], done[done.len() - 1]);
    eprintln!(
        "block bw limit {limit} B/s: 4 MiB in {:.2} s, measured {measured:.0} B/s over the last 3 MiB",
        total.as_secs_f64()
    );
    assert!(total >= Duration::from_millis(3500), "4 MiB at 1 MiB/s took only {total:?}");
    let ratio = measured / limit as f64;
    assert!((0.9..=1.1).contains(&ratio), "measured {measured:.0} B/s vs limit {limit} B/s");
    let s = b.shutdown();
    assert!(stat_of(&s, "throttled") > 0, "{s:?}");
    assert_eq!(stat_of(&s, "ok"), u64::from(count));
    assert_eq!(stat_of(&s, "bytes_read"), u64::from(count) * u64::from(len));
}

#[test]
fn block_ops_limit_is_the_measured_rate_without_spinning() {
    let limit = 200u64;
    let mut b = Blk::spawn(RateLimit { ops_per_sec: limit, ..RateLimit::default() });
    let pid = b.svc.child.id();
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let done = b.read_all(400, 512, 8);
    let wall = t0.elapsed();
    let cpu = cpu_time(pid).saturating_sub(cpu0);
    let skip = 100;
    let measured = rate((done.len() - skip) as u64, done[skip - 1], done[done.len() - 1]);
    eprintln!(
        "block ops limit {limit}/s: 400 requests in {:.2} s, measured {measured:.1}/s over the last 300; \
         service CPU {:.0} ms",
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e3
    );
    assert!(wall >= Duration::from_millis(1800), "400 requests at 200/s took only {wall:?}");
    let ratio = measured / limit as f64;
    assert!((0.9..=1.1).contains(&ratio), "measured {measured:.1}/s vs limit {limit}/s");
    // Throttled, the service sleeps until the tokens are due instead of spinning.
    assert!(cpu < wall / 2, "service used {cpu:?} of CPU in {wall:?}");
    let s = b.shutdown();
    assert!(stat_of(&s, "throttled") > 0, "{s:?}");
    assert_eq!(stat_of(&s, "ok"), 400);
}

// ---------------------------------------------------------------- net

const NET_RAM: usize = 4 << 20;
const NET_QSIZE: u16 = 16;
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x20_0000;
const BUF: u64 = 2048;
const VNET_HDR: usize = 12;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const RX: usize = 0;
const TX: usize = 1;

/// A broadcast frame of our experimental ethertype carrying `seq` and a pattern.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x43]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend((f.len()..len).map(|i| i.wrapping_mul(13).wrapping_add(seq as usize).to_le_bytes()[0]));
    f
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_le_bytes([f[14], f[15], f[16], f[17]])
}

/// One of our frames that came out of the TAP (the service's TX), if one is queued.
fn wire_recv(sock: &OwnedFd) -> Option<Vec<u8>> {
    packet_recv(sock, ETHERTYPE)
}

struct NetRig {
    svc: Instance,
    mem: GuestMemoryMmap<()>,
    notify: [EventFd; 2],
    irq: EventFd,
    sock: OwnedFd,
    q: [GuestQueue; 2],
    // Last: the TAP and socket close before the namespace goes.
    _tap: OwnedFd,
    _ns: Netns,
    _serial: MutexGuard<'static, ()>,
}

impl NetRig {
    fn spawn(limit: RateLimit) -> Self {
        let guard = one_at_a_time();
        let (ns, n) = Netns::new("bh-rl");
        let (tap, sock) = ns.tap_and_packet_socket(&format!("bhrl{n}"), |name| {
            let t = tap::open_tap(name, 0).expect("open TAP");
            (t.name, t.fd)
        });
        while wire_recv(&sock).is_some() {}
        let (memfd, mem) = guest_ram(NET_RAM);
        let notify = [EventFd::new(EFD_NONBLOCK).expect("eventfd"), EventFd::new(EFD_NONBLOCK).expect("eventfd")];
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let svc = Instance::start(
            env!("CARGO_BIN_EXE_bulkhead-net"),
            "ratelimit-net",
            StderrTo::Pipe,
            &[
                (FdRole::GuestMemory, memfd.as_fd()),
                (FdRole::Tap, tap.as_fd()),
                (FdRole::Irq, borrow(&irq)),
                (FdRole::QueueNotify(0), borrow(&notify[0])),
                (FdRole::QueueNotify(1), borrow(&notify[1])),
            ],
            net_device(NET_RAM as u64, [0x02, 0xb1, 0x6b, 0, 0, 9], "ratelimit", limit),
        );
        let mut q = [
            GuestQueue::new(&mem, 0x1000, 0x2000, 0x3000, NET_QSIZE),
            GuestQueue::new(&mem, 0x4000, 0x5000, 0x6000, NET_QSIZE),
        ];
        svc.mmio(BASE).init(1, F_VERSION_1, &mut q);
        Self { svc, mem, notify, irq, sock, q, _tap: tap, _ns: ns, _serial: guard }
    }

    /// Queues `f` in TX slot `i` (header and frame in one descriptor).
    fn tx(&mut self, i: u16, f: &[u8]) {
        let at = TXBUF + u64::from(i) * BUF;
        self.mem.write_slice(&[0u8; VNET_HDR], GuestAddress(at)).expect("hdr");
        self.mem.write_slice(f, GuestAddress(at + VNET_HDR as u64)).expect("frame");
        self.q[TX].set_desc(&self.mem, i, at, u32::try_from(VNET_HDR + f.len()).expect("len"), 0, 0);
        self.q[TX].offer(&self.mem, i);
    }

    /// Posts RX buffer `i`.
    fn post_rx(&mut self, i: u16) {
        let at = RXBUF + u64::from(i) * BUF;
        self.q[RX].set_desc(&self.mem, i, at, u32::try_from(BUF).expect("len"), DESC_WRITE, 0);
        self.q[RX].offer(&self.mem, i);
    }

    fn kick(&self, q: usize) {
        self.notify[q].write(1).expect("kick");
    }

    fn shutdown(mut self) -> Vec<(String, u64)> {
        self.svc.shutdown_with_stats(Duration::from_secs(5))
    }
}

#[test]
fn net_tx_bandwidth_limit_on_the_tap_and_nothing_lost() {
    let limit = 500_000u64;
    let mut r = NetRig::spawn(RateLimit { bytes_per_sec: limit, ..RateLimit::default() });
    let (count, len) = (1500u32, 1000usize);
    let mut next = 0u32;
    let mut arrivals: Vec<Instant> = Vec::new();
    let deadline = Instant::now() + RUN_LIMIT;
    while arrivals.len() < count as usize {
        let mut offered = false;
        while next < count && r.q[TX].outstanding() < NET_QSIZE {
            let slot = u16::try_from(next % u32::from(NET_QSIZE)).expect("slot");
            r.tx(slot, &frame(next, len));
            next += 1;
            offered = true;
        }
        if offered {
            r.kick(TX);
        }
        // The guest just sees slower completions.
        for (_, used_len) in r.q[TX].take_used(&r.mem) {
            assert_eq!(used_len, 0, "TX used length");
        }
        let _ = r.irq.read();
        while let Some(f) = wire_recv(&r.sock) {
            let want = u32::try_from(arrivals.len()).expect("count");
            assert_eq!(seq_of(&f), want, "frames arrive in order, none lost");
            assert!(f == frame(want, len), "frame {want} intact");
            arrivals.push(Instant::now());
        }
        assert!(Instant::now() < deadline, "stalled: {} of {count} frames on the TAP", arrivals.len());
        std::thread::sleep(Duration::from_micros(200));
    }
    let skip = 300;
    let measured = rate((arrivals.len() - skip) as u64 * len as u64, arrivals[skip - 1], arrivals[arrivals.len() - 1]);
    eprintln!(
        "net TX bw limit {limit} B/s: {count} frames of {len} B, measured {measured:.0} B/s on the TAP (frames {skip}..)"
    );
    let ratio = measured / limit as f64;
    assert!(ratio <= 1.1, "TX at {measured:.0} B/s exceeds the limit {limit} B/s");
    assert!(ratio >= 0.8, "TX at {measured:.0} B/s, far below the limit {limit} B/s");
    assert!(wire_recv(&r.sock).is_none(), "no extra frames");
    let s = r.shutdown();
    assert_eq!(stat_of(&s, "tx_frames"), u64::from(count));
    assert_eq!(stat_of(&s, "tx_bytes"), u64::from(count) * len as u64);
    assert!(stat_of(&s, "tx_throttled") > 0, "{s:?}");
}

#[test]
fn net_rx_frame_rate_limit_into_the_guest() {
    let limit = 200u64;
    let mut r = NetRig::spawn(RateLimit { ops_per_sec: limit, ..RateLimit::default() });
    for i in 0..NET_QSIZE {
        r.post_rx(i);
    }
    r.kick(RX);
    let (count, len) = (400u32, 200usize);
    for seq in 0..count {
        packet_send(&r.sock, &frame(seq, len));
    }
    let mut got: Vec<(u32, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(3000);
    let mut last_seq = None;
    while Instant::now() < deadline && got.len() < count as usize {
        let used = r.q[RX].take_used(&r.mem);
        for &(id, used_len) in &used {
            assert_eq!(used_len as usize, VNET_HDR + len, "RX used length");
            let mut buf = vec![0u8; VNET_HDR + len];
            r.mem.read_slice(&mut buf, GuestAddress(RXBUF + u64::from(id) * BUF)).expect("buffer");
            let f = &buf[VNET_HDR..];
            let seq = seq_of(f);
            assert!(f == frame(seq, len), "frame {seq} intact");
            assert!(last_seq.is_none_or(|l| seq > l), "frames in order: {seq} after {last_seq:?}");
            last_seq = Some(seq);
            got.push((seq, Instant::now()));
            r.post_rx(id);
        }
        if !used.is_empty() {
            r.kick(RX);
        }
        let _ = r.irq.read();
        std::thread::sleep(Duration::from_micros(200));
    }
    let skip = 50;
    assert!(got.len() > 300, "only {} frames delivered in 3 s at {limit}/s", got.len());
    let measured = rate((got.len() - skip) as u64, got[skip - 1].1, got[got.len() - 1].1);
    eprintln!(
        "net RX pps limit {limit}/s: {} of {count} frames delivered, measured {measured:.1}/s (frames {skip}..)",
        got.len()
    );
    let ratio = measured / limit as f64;
    assert!(ratio <= 1.1, "RX at {measured:.1}/s exceeds the limit {limit}/s");
    assert!(ratio >= 0.8, "RX at {measured:.1}/s, far below the limit {limit}/s");
    let s = r.shutdown();
    assert!(stat_of(&s, "rx_frames") >= got.len() as u64, "{s:?}");
    assert!(stat_of(&s, "rx_throttled") > 0, "{s:?}");
}

/// A throttled guest's requests wait in the queue, so a service restart loses none of them: the
/// new instance resumes the queue and serves them all, under the same limit.
#[test]
fn block_requests_waiting_for_tokens_survive_a_restart() {
    let limit = 20u64;
    let mut b = Blk::spawn(RateLimit { ops_per_sec: limit, ops_burst: 1, ..RateLimit::default() });
    let depth = 8u16;
    for s in 0..depth {
        b.submit_read(s, u64::from(s) * 8, 4096);
    }
    b.notify.write(1).expect("kick");
    // At 20/s, about 3 are done after 120 ms; the rest wait for tokens.
    std::thread::sleep(Duration::from_millis(120));
    let before = b.q.take_used(&b.mem);
    assert!(!before.is_empty() && before.len() < usize::from(depth), "{} done before the restart", before.len());
    b.restart();
    b.notify.write(1).expect("kick");
    let t0 = Instant::now();
    let mut after = Vec::new();
    while before.len() + after.len() < usize::from(depth) {
        after.extend(b.q.take_used(&b.mem));
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{} of {depth} done after the restart",
            before.len() + after.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let waited = t0.elapsed();
    let mut heads: Vec<u16> = before.iter().chain(&after).map(|&(h, _)| h).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..depth).map(|s| 3 * s).collect::<Vec<_>>(), "every request completed exactly once");
    for s in 0..depth {
        let st: u8 = b.mem.read_obj(GuestAddress(BLK_STATUS + u64::from(s))).expect("status");
        assert_eq!(st, 0, "request {s}: OK");
        let mut got = vec![0u8; 4096];
        b.mem.read_slice(&mut got, GuestAddress(BLK_DATA + SLOT_BYTES * u64::from(s))).expect("data");
        let off = usize::from(s) * 4096;
        assert!(got[..] == b.disk[off..off + 4096], "request {s}: data");
    }
    // The new instance starts with a full bucket (1) and then 20/s.
    let n = usize::from(depth) - before.len();
    let floor = Duration::from_millis(1000 * (n as u64 - 1) / limit) * 9 / 10;
    eprintln!("restart while throttled: {} before, {n} after in {waited:?} (limit {limit}/s)", before.len());
    assert!(waited >= floor, "{n} requests at {limit}/s after a restart took only {waited:?}");
    let s = b.shutdown();
    assert!(stat_of(&s, "throttled") > 0, "{s:?}");
}
