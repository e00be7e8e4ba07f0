//! Spawns the real `bulkhead-net` and drives it exactly as the core and a guest driver would:
//! guest RAM in a memfd, virtio-mmio registers over the exit ring, RX/TX chains written into the
//! memfd, kicks on the queues' ioeventfds. The TAP is opened (with the core's own
//! `vmm-core/src/tap.rs`) inside a network namespace this test creates and always deletes; the
//! host side of the link is an `AF_PACKET` socket bound to the TAP in that namespace. No traffic
//! leaves the namespace: frames are broadcast on a local experimental ethertype.

mod support;
use support::*;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use ipc::control::FdRole;
use ipc::state::StateRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(dead_code)]
#[path = "../../vmm-core/src/tap.rs"]
mod tap;

const BASE: u64 = MMIO_BASE;
const RAM: u64 = 4 << 20;
const QSIZE: u16 = 16;
/// Per queue: descriptor table, avail ring, used ring.
const RINGS: [[u64; 3]; 2] = [[0x1000, 0x2000, 0x3000], [0x4000, 0x5000, 0x6000]];
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x20_0000;
const BIG: u64 = 0x30_0000;
const BUF: u64 = 2048;
const HDR: usize = 12;
const T: Duration = Duration::from_secs(5);
const RX: usize = 0;
const TX: usize = 1;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAC: [u8; 6] = [0x02, 0xb1, 0x6b, 0x00, 0x00, 0x07];
const F_VERSION_1: u64 = 1 << 32;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;

/// The host side of the link: an AF_PACKET socket bound to the TAP.
struct Wire {
    sock: OwnedFd,
}

impl Wire {
    fn send(&self, frame: &[u8]) {
        packet_send(&self.sock, frame);
    }

    /// The next frame of ours that came *from* the TAP (the service's TX), within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = packet_recv(&self.sock, ETHERTYPE) {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Drops whatever is queued.
    fn drain(&self) {
        while self.recv(Duration::from_millis(20)).is_some() {}
    }
}

/// A frame: broadcast, our experimental ethertype, a sequence number and a pattern.
fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_le_bytes());
    while f.len() < len {
        let i = f.len();
        f.push(i.wrapping_mul(7).wrapping_add(seq as usize).to_le_bytes()[0]);
    }
    f.truncate(len);
    f
}

struct Rig {
    _serial: MutexGuard<'static, ()>,
    memfd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    state: StateRegion,
    notify: [EventFd; 2],
    irq: EventFd,
    tap: OwnedFd,
    wire: Wire,
    svc: Option<Instance>,
    q: [GuestQueue; 2],
    // Last: the namespace goes after the service, the TAP and the socket are closed.
    _ns: Netns,
}

impl Rig {
    fn new() -> Self {
        let serial = one_at_a_time();
        let (ns, n) = Netns::new("bh-nettest");
        let (tap, sock) = ns.tap_and_packet_socket(&format!("bhtap{n}"), |name| {
            let t = tap::open_tap(name, 0).expect("open TAP");
            (t.name, t.fd)
        });
        let (memfd, mem) = guest_ram(usize::try_from(RAM).expect("ram"));
        let wire = Wire { sock };
        wire.drain();
        let q = RINGS.map(|[d, a, u]| GuestQueue::at(d, a, u, QSIZE));
        let mut rig = Self {
            _serial: serial,
            memfd,
            mem,
            state: StateRegion::create("net-test-state").expect("state region"),
            notify: [EventFd::new(EFD_NONBLOCK).expect("eventfd"), EventFd::new(EFD_NONBLOCK).expect("eventfd")],
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tap,
            wire,
            svc: None,
            q,
            _ns: ns,
        };
        rig.start();
        rig
    }

    /// Starts an instance exactly as the core would, with a fresh ring and the same device fds.
    fn start(&mut self) {
        self.svc = Some(Instance::start(
            env!("CARGO_BIN_EXE_bulkhead-net"),
            "net-test",
            StderrTo::Pipe,
            &[
                (FdRole::GuestMemory, self.memfd.as_fd()),
                (FdRole::Tap, self.tap.as_fd()),
                (FdRole::Irq, borrow(&self.irq)),
                (FdRole::QueueNotify(0), borrow(&self.notify[0])),
                (FdRole::QueueNotify(1), borrow(&self.notify[1])),
                (FdRole::StateRegion, self.state.fd()),
            ],
            net_device(RAM, MAC, "test", Default::default()),
        ));
    }

    /// SIGKILLs the current instance (dropping it does).
    fn kill(&mut self) {
        self.svc = None;
    }

    fn regs(&self) -> MmioRegs<'_> {
        self.svc.as_ref().expect("instance").mmio(BASE)
    }

    fn access(&self, off: u64, len: u32) -> u32 {
        self.regs().read(off, len)
    }

    fn rd(&self, off: u64) -> u32 {
        self.regs().rd(off)
    }

    /// Feature negotiation and both queues (rings zeroed), as a driver does.
    fn init(&mut self) {
        self.q = RINGS.map(|[d, a, u]| GuestQueue::new(&self.mem, d, a, u, QSIZE));
        let svc = self.svc.as_ref().expect("instance");
        svc.mmio(BASE).init(1, F_VERSION_1 | F_MAC | F_STATUS, &mut self.q);
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q[q].set_desc(&self.mem, i, addr, len, flags, next);
    }

    /// Makes `head` available on queue `q` and kicks.
    fn offer(&mut self, q: usize, head: u16) {
        self.q[q].offer(&self.mem, head);
        self.notify[q].write(1).expect("kick");
    }

    /// Posts RX buffer `i` (descriptor i -> RXBUF + i * BUF) of `len` bytes.
    fn post_rx(&mut self, i: u16, len: u32) {
        self.mem.write_slice(&[0xeeu8; 16], GuestAddress(RXBUF + u64::from(i) * BUF)).expect("poison");
        self.desc(RX, i, RXBUF + u64::from(i) * BUF, len, DESC_WRITE, 0);
        self.offer(RX, i);
    }

    /// Queues `f` in TX slot `i` (header + frame in one descriptor).
    fn send(&mut self, i: u16, f: &[u8]) {
        let at = TXBUF + u64::from(i) * BUF;
        self.mem.write_slice(&[0u8; HDR], GuestAddress(at)).expect("hdr");
        self.mem.write_slice(f, GuestAddress(at + HDR as u64)).expect("frame");
        self.desc(TX, i, at, u32::try_from(HDR + f.len()).expect("len"), 0, 0);
        self.offer(TX, i);
    }

    /// Waits (bounded) for `n` more used elements on queue `q`; returns them (id, len).
    fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u16, u32)> {
        let out = self.q[q].wait_used(&self.mem, n, T);
        let _ = self.irq.read();
        out
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.q[q].used_idx(&self.mem)
    }

    /// Checks RX element (id, len) holds `want` after a zero header with num_buffers = 1.
    fn check_rx(&self, (id, len): (u16, u32), want: &[u8]) {
        assert_eq!(len as usize, HDR + want.len(), "used length of buffer {id}");
        let mut got = vec![0u8; HDR + want.len()];
        self.mem.read_slice(&mut got, GuestAddress(RXBUF + u64::from(id) * BUF)).expect("buffer");
        assert_eq!(got[..HDR], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "virtio_net_hdr_v1");
        assert!(got[HDR..] == *want, "frame content in buffer {id}: {:02x?} vs {:02x?}", &got[HDR..], want);
    }

    fn alive(&mut self) {
        assert!(self.svc.as_mut().expect("instance").is_running(), "service died");
        assert_eq!(self.rd(0x000), 0x7472_6976, "still answers registers");
    }

    /// Shuts the service down cleanly; returns its final counters (`name=value`).
    fn shutdown(&mut self) -> Vec<(String, u64)> {
        self.svc.as_mut().expect("instance").shutdown_with_stats(T)
    }
}

#[test]
fn config_space_and_tx_frames_arrive_intact_in_order() {
    let mut r = Rig::new();
    r.init();
    // MAC and status at every access width.
    let mac: Vec<u8> = (0..6).map(|i| r.access(0x100 + i, 1).to_le_bytes()[0]).collect();
    assert_eq!(mac, MAC);
    assert_eq!(r.access(0x100, 2), u32::from(u16::from_le_bytes([MAC[0], MAC[1]])));
    assert_eq!(r.access(0x100, 4), u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]));
    assert_eq!(r.access(0x106, 2), 1, "status: LINK_UP");
    let sizes = [60usize, 61, 64, 100, 500, 1000, 1499, 1514];
    let total = 48u32;
    let mut seq = 0u32;
    while seq < total {
        let batch = 8u32;
        for k in 0..batch {
            let f = frame(seq + k, sizes[usize::try_from((seq + k) % 8).expect("i")]);
            r.send(u16::try_from(k).expect("slot"), &f);
        }
        let used = r.wait_used(TX, u16::try_from(batch).expect("n"));
        assert!(used.iter().all(|&(_, len)| len == 0), "TX used length 0: {used:?}");
        for k in 0..batch {
            let want = frame(seq + k, sizes[usize::try_from((seq + k) % 8).expect("i")]);
            let got = r.wire.recv(T).unwrap_or_else(|| panic!("frame {} not on the TAP", seq + k));
            assert_eq!(got.len(), want.len(), "frame {}", seq + k);
            assert!(got == want, "frame {} content", seq + k);
        }
        seq += batch;
    }
    assert!(r.wire.recv(Duration::from_millis(50)).is_none(), "no extra frames");
    r.alive();
    let s = r.shutdown();
    assert_eq!(stat_of(&s, "tx_frames"), u64::from(total));
    assert_eq!(stat_of(&s, "tx_dropped") + stat_of(&s, "tx_errors"), 0);
}

#[test]
fn rx_frames_reach_guest_buffers_and_wait_for_buffers() {
    let mut r = Rig::new();
    r.init();
    for i in 0..8 {
        r.post_rx(i, 2048);
    }
    let sent: Vec<Vec<u8>> = (0..8u32).map(|s| frame(1000 + s, 60 + 190 * usize::try_from(s).expect("s"))).collect();
    for f in &sent {
        r.wire.send(f);
    }
    let used = r.wait_used(RX, 8);
    for (k, u) in used.iter().enumerate() {
        assert_eq!(u.0, u16::try_from(k).expect("k"), "buffers used in order");
        r.check_rx(*u, &sent[k]);
    }
    // Back-pressure: no buffers posted, 12 frames wait in the TAP's queue, none lost.
    let waiting: Vec<Vec<u8>> = (0..12u32).map(|s| frame(2000 + s, 1514)).collect();
    for f in &waiting {
        r.wire.send(f);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.used_idx(RX), 8, "nothing delivered without buffers");
    for i in 0..12 {
        r.post_rx(i, 2048);
    }
    let used = r.wait_used(RX, 12);
    for (k, u) in used.iter().enumerate() {
        r.check_rx(*u, &waiting[k]);
    }
    r.alive();
    let s = r.shutdown();
    assert_eq!(stat_of(&s, "rx_frames"), 20);
    assert_eq!(stat_of(&s, "rx_dropped") + stat_of(&s, "rx_bad_chains") + stat_of(&s, "rx_errors"), 0);
    assert_eq!(stat_of(&s, "rx_bytes"), sent.iter().chain(&waiting).map(|f| f.len() as u64).sum::<u64>());
}

#[test]
fn hostile_chains_are_dropped_and_counted() {
    let mut r = Rig::new();
    r.init();
    // TX: zero length, shorter than header + Ethernet header, oversize, outside RAM, writable,
    // and a loop; each completed with length 0, nothing on the wire.
    r.desc(TX, 0, TXBUF, 0, 0, 0);
    r.offer(TX, 0);
    r.desc(TX, 1, TXBUF, 20, 0, 0);
    r.offer(TX, 1);
    r.mem.write_slice(&frame(7, 65_600), GuestAddress(BIG + HDR as u64)).expect("big frame");
    r.desc(TX, 2, BIG, u32::try_from(HDR + 65_600).expect("len"), 0, 0);
    r.offer(TX, 2);
    r.desc(TX, 3, RAM - 16, 1514, 0, 0);
    r.offer(TX, 3);
    r.desc(TX, 4, TXBUF, 1514, DESC_WRITE, 0);
    r.offer(TX, 4);
    r.desc(TX, 5, TXBUF, 100, DESC_NEXT, 6);
    r.desc(TX, 6, TXBUF, 100, DESC_NEXT, 5);
    r.offer(TX, 5);
    r.desc(TX, 7, TXBUF, 100, DESC_NEXT, 999);
    r.offer(TX, 7);
    let used = r.wait_used(TX, 7);
    assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (7, 0)]);
    assert!(r.wire.recv(Duration::from_millis(100)).is_none(), "no hostile frame was sent");
    let good = frame(1, 200);
    r.send(8, &good);
    r.wait_used(TX, 1);
    assert_eq!(r.wire.recv(T).as_deref(), Some(&good[..]), "a good frame still goes out");

    // RX: a device-readable buffer is refused; a frame too big for a small buffer is dropped
    // and the buffer is reused for the next frame.
    r.desc(RX, 0, RXBUF, 2048, 0, 0);
    r.offer(RX, 0);
    assert_eq!(r.wait_used(RX, 1), vec![(0, 0)]);
    r.post_rx(1, 64);
    r.wire.send(&frame(5, 1000));
    let small = frame(6, 52);
    r.wire.send(&small);
    let u = r.wait_used(RX, 1);
    r.check_rx(u[0], &small);
    r.alive();
    assert_eq!(r.rd(0x070) & 0x40, 0, "no reset needed for dropped chains");
    let s = r.shutdown();
    assert_eq!(stat_of(&s, "tx_dropped"), 7);
    assert_eq!(stat_of(&s, "tx_frames"), 1);
    assert_eq!(stat_of(&s, "rx_bad_chains"), 1);
    assert_eq!(stat_of(&s, "rx_dropped"), 1);
    assert_eq!(stat_of(&s, "rx_frames"), 1);
}

#[test]
fn restart_with_rx_buffers_posted_keeps_traffic_flowing() {
    let mut r = Rig::new();
    r.init();
    for i in 0..8 {
        r.post_rx(i, 2048);
    }
    let first = frame(1, 300);
    r.wire.send(&first);
    let u = r.wait_used(RX, 1);
    r.check_rx(u[0], &first);
    // The other 7 buffers are held (in flight) by the service when it dies.
    std::thread::sleep(Duration::from_millis(20));
    r.kill();
    r.start();
    let after: Vec<Vec<u8>> = (0..7u32).map(|s| frame(100 + s, 64 + 100 * usize::try_from(s).expect("s"))).collect();
    for f in &after {
        r.wire.send(f);
    }
    let used = r.wait_used(RX, 7);
    let mut ids: Vec<u16> = used.iter().map(|u| u.0).collect();
    for (k, u) in used.iter().enumerate() {
        r.check_rx(*u, &after[k]);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..8).collect::<Vec<u16>>(), "the buffers posted before the kill were reused");
    let f = frame(9, 1514);
    r.send(0, &f);
    r.wait_used(TX, 1);
    assert_eq!(r.wire.recv(T).as_deref(), Some(&f[..]), "TX after the restart");
    r.alive();
    let s = r.shutdown();
    assert_eq!(stat_of(&s, "rx_frames"), 7);
    assert_eq!(stat_of(&s, "tx_frames"), 1);
}
