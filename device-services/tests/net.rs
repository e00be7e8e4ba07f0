//! Spawns the real `bulkhead-net` and drives it exactly as the core and a guest driver would:
//! guest RAM in a memfd, virtio-mmio registers over the exit ring, RX/TX chains written into the
//! memfd, kicks on the queues' ioeventfds. The TAP is opened (with the core's own
//! `vmm-core/src/tap.rs`) inside a network namespace this test creates and always deletes; the
//! host side of the link is an `AF_PACKET` socket bound to the TAP in that namespace. No traffic
//! leaves the namespace: frames are broadcast on a local experimental ethertype.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc::control::{ControlMsg, DeviceConfig, FdRole, MemoryRegion, NetConfig, RingSetup, ServiceSetup};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::state::StateRegion;
use ipc::{ControlChannel, CoreEndpoint, WaitConfig};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(dead_code)]
#[path = "../../vmm-core/src/tap.rs"]
mod tap;

const BASE: u64 = 0xd000_0000;
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
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const RX: usize = 0;
const TX: usize = 1;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAC: [u8; 6] = [0x02, 0xb1, 0x6b, 0x00, 0x00, 0x07];
const F_VERSION_1: u64 = 1 << 32;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const PACKET_OUTGOING: u8 = 4;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn borrow(fd: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns the descriptor and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

/// A network namespace, deleted on drop (also when a test fails).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!("bh-nettest-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let st = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} (needs root / CAP_SYS_ADMIN)");
        let ns = Self { name };
        // No IPv6 chatter (router solicitations, MLD) on the TAP.
        let st = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .status()
            .expect("sysctl");
        assert!(st.success());
        let st = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
            .status()
            .expect("sysctl");
        assert!(st.success());
        ns
    }

    /// Runs `f` on a thread that entered the namespace.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The host side of the link: an AF_PACKET socket bound to the TAP.
struct Wire {
    sock: OwnedFd,
}

impl Wire {
    fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from a live slice.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(frame.len()).expect("len"),
            "AF_PACKET send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame of ours that came *from* the TAP (the service's TX), within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            // SAFETY: sockaddr_ll is plain old data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut flen = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("len");
            // SAFETY: recvfrom writes at most buf.len() bytes into buf and at most flen bytes into
            // `from`, both live for the call.
            let n = unsafe {
                libc::recvfrom(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    std::ptr::addr_of_mut!(from).cast(),
                    &mut flen,
                )
            };
            if n >= 0 {
                let n = usize::try_from(n).expect("n");
                if from.sll_pkttype != PACKET_OUTGOING && n >= 14 && buf[12..14] == ETHERTYPE {
                    return Some(buf[..n].to_vec());
                }
                continue;
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
    child: Option<Child>,
    ctl: Option<ControlChannel>,
    core: Option<CoreEndpoint>,
    avail: [u16; 2],
    used_seen: [u16; 2],
    // Last: the namespace goes after the TAP and socket are closed.
    _ns: Netns,
}

impl Rig {
    fn new() -> Self {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let ns = Netns::new();
        let tap_name = format!("bhtap{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let (tap, sock) = ns.run(|| {
            let t = tap::open_tap(&tap_name, 0).expect("open TAP");
            let st = Command::new("ip").args(["link", "set", &t.name, "up"]).status().expect("ip link");
            assert!(st.success(), "link up");
            let ifname = std::ffi::CString::new(t.name.clone()).expect("name");
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert_ne!(ifindex, 0, "ifindex");
            let proto = u16::try_from(libc::ETH_P_ALL).expect("ETH_P_ALL").to_be();
            // SAFETY: socket takes integers.
            let raw =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::c_int::from(proto)) };
            assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: the kernel just returned this fd; we own it.
            let sock = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain old data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
            let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("len");
            // SAFETY: bind reads `len` bytes of `sll`, alive for the call.
            let rc = unsafe { libc::bind(sock.as_raw_fd(), std::ptr::addr_of!(sll).cast(), len) };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            (t.fd, sock)
        });
        let memfd = memfd_create(c"test-guest-ram", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        nix::unistd::ftruncate(&memfd, i64::try_from(RAM).expect("ram")).expect("truncate");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            usize::try_from(RAM).expect("ram"),
            Some(FileOffset::new(std::fs::File::from(memfd.try_clone().expect("dup")), 0)),
        )])
        .expect("map");
        let wire = Wire { sock };
        wire.drain();
        let mut rig = Self {
            _serial: serial,
            memfd,
            mem,
            state: StateRegion::create("net-test-state").expect("state region"),
            notify: [EventFd::new(EFD_NONBLOCK).expect("eventfd"), EventFd::new(EFD_NONBLOCK).expect("eventfd")],
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tap,
            wire,
            child: None,
            ctl: None,
            core: None,
            avail: [0; 2],
            used_seen: [0; 2],
            _ns: ns,
        };
        rig.start();
        rig
    }

    /// Starts an instance exactly as the core would, with a fresh ring and the same device fds.
    fn start(&mut self) {
        let (ctl, child_end) = ControlChannel::pair().expect("pair");
        let child_fd: OwnedFd = child_end.into_fd();
        let raw = child_fd.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-net"));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn bulkhead-net");
        drop(child_fd);
        let core = CoreEndpoint::create("net-test", 16, WaitConfig::default()).expect("ring");
        let roles = vec![
            FdRole::Ring,
            FdRole::SubmitBell,
            FdRole::CompleteBell,
            FdRole::GuestMemory,
            FdRole::Tap,
            FdRole::Irq,
            FdRole::QueueNotify(0),
            FdRole::QueueNotify(1),
            FdRole::StateRegion,
        ];
        let fds = [
            core.region_fd(),
            core.submit_bell(),
            core.complete_bell(),
            self.memfd.as_fd(),
            self.tap.as_fd(),
            borrow(&self.irq),
            borrow(&self.notify[0]),
            borrow(&self.notify[1]),
            self.state.fd(),
        ];
        let setup = ServiceSetup {
            name: "net-test".into(),
            ring: RingSetup { capacity: core.capacity(), region_len: core.region_len() as u64 },
            fds: roles,
            device: DeviceConfig::Net(NetConfig {
                mmio_base: BASE,
                mmio_len: 0x1000,
                gsi: 6,
                memory: vec![MemoryRegion { guest_addr: 0, len: RAM, file_offset: 0 }],
                mac: MAC,
                queue_size: 256,
                tap_name: "test".into(),
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

    fn access(&self, off: u64, len: u32) -> u32 {
        let core = self.core.as_ref().expect("instance");
        let r = core.call(&ExitRequest::read(ExitKind::MmioRead, BASE + off, len), T).expect("mmio read");
        assert_eq!(r.status, Status::Ok, "read {off:#x}/{len}");
        let mut b = [0u8; 4];
        let n = usize::try_from(len).expect("len");
        b[..n].copy_from_slice(&r.data[..n]);
        u32::from_le_bytes(b)
    }

    fn rd(&self, off: u64) -> u32 {
        self.access(off, 4)
    }

    fn wr(&self, off: u64, v: u32) {
        let core = self.core.as_ref().expect("instance");
        let req = ExitRequest::write(ExitKind::MmioWrite, BASE + off, &v.to_le_bytes()).expect("req");
        let r = core.call(&req, T).expect("mmio write");
        assert_eq!(r.status, Status::Ok, "write {off:#x}");
    }

    fn features(&self) -> u64 {
        self.wr(0x14, 0);
        let lo = self.rd(0x10);
        self.wr(0x14, 1);
        let hi = self.rd(0x10);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Feature negotiation and both queues, as a driver does.
    fn init(&mut self) {
        assert_eq!(self.rd(0x000), 0x7472_6976, "magic");
        assert_eq!(self.rd(0x008), 1, "net device id");
        self.wr(0x070, 0);
        self.wr(0x070, 1 | 2);
        let offered = self.features();
        assert_eq!(offered & (F_VERSION_1 | F_MAC | F_STATUS), F_VERSION_1 | F_MAC | F_STATUS);
        let want = F_VERSION_1 | F_MAC | F_STATUS;
        self.wr(0x24, 0);
        self.wr(0x20, lo32(want));
        self.wr(0x24, 1);
        self.wr(0x20, lo32(want >> 32));
        self.wr(0x070, 1 | 2 | 8);
        assert_ne!(self.rd(0x070) & 8, 0, "FEATURES_OK accepted");
        self.mem.write_slice(&[0u8; 0x6000], GuestAddress(0x1000)).expect("clear rings");
        for (q, r) in RINGS.iter().enumerate() {
            self.wr(0x030, u32::try_from(q).expect("q"));
            assert!(self.rd(0x034) >= u32::from(QSIZE));
            self.wr(0x038, u32::from(QSIZE));
            self.wr(0x080, lo32(r[0]));
            self.wr(0x084, 0);
            self.wr(0x090, lo32(r[1]));
            self.wr(0x094, 0);
            self.wr(0x0a0, lo32(r[2]));
            self.wr(0x0a4, 0);
            self.wr(0x044, 1);
        }
        self.wr(0x070, 1 | 2 | 8 | 4);
        self.avail = [0; 2];
        self.used_seen = [0; 2];
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = RINGS[q][0] + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).expect("addr");
        self.mem.write_obj(len, GuestAddress(at + 8)).expect("len");
        self.mem.write_obj(flags, GuestAddress(at + 12)).expect("flags");
        self.mem.write_obj(next, GuestAddress(at + 14)).expect("next");
    }

    /// Makes `head` available on queue `q` and kicks.
    fn offer(&mut self, q: usize, head: u16) {
        let slot = RINGS[q][1] + 4 + 2 * u64::from(self.avail[q] % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).expect("ring");
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.write_obj(self.avail[q], GuestAddress(RINGS[q][1] + 2)).expect("idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.notify[q].write(1).expect("kick");
    }

    /// Posts RX buffer `i` (descriptor i -> RXBUF + i * BUF) of `len` bytes.
    fn post_rx(&mut self, i: u16, len: u32) {
        self.mem.write_slice(&[0xeeu8; 16], GuestAddress(RXBUF + u64::from(i) * BUF)).expect("poison");
        self.desc(RX, i, RXBUF + u64::from(i) * BUF, len, F_WRITE, 0);
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
    fn wait_used(&mut self, q: usize, n: u16) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + T;
        let target = self.used_seen[q].wrapping_add(n);
        loop {
            let u: u16 = self.mem.read_obj(GuestAddress(RINGS[q][2] + 2)).expect("used idx");
            if u.wrapping_sub(self.used_seen[q]) >= n {
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: used {u}, waiting for {target}");
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let at = RINGS[q][2] + 4 + 8 * u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("id");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("len");
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        let _ = self.irq.read();
        out
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q][2] + 2)).expect("used idx")
    }

    /// Checks RX element (id, len) holds `want` after a zero header with num_buffers = 1.
    fn check_rx(&self, (id, len): (u32, u32), want: &[u8]) {
        assert_eq!(len as usize, HDR + want.len(), "used length of buffer {id}");
        let mut got = vec![0u8; HDR + want.len()];
        self.mem.read_slice(&mut got, GuestAddress(RXBUF + u64::from(id) * BUF)).expect("buffer");
        assert_eq!(got[..HDR], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "virtio_net_hdr_v1");
        assert!(got[HDR..] == *want, "frame content in buffer {id}: {:02x?} vs {:02x?}", &got[HDR..], want);
    }

    fn alive(&mut self) {
        let c = self.child.as_mut().expect("instance");
        assert!(c.try_wait().expect("try_wait").is_none(), "service died");
        assert_eq!(self.rd(0x000), 0x7472_6976, "still answers registers");
    }

    /// Shuts the service down cleanly; returns its final counters (`name=value`).
    fn shutdown(&mut self) -> Vec<(String, u64)> {
        self.ctl.as_ref().expect("instance").send(&ControlMsg::Shutdown, &[]).expect("shutdown");
        let mut child = self.child.take().expect("instance");
        let deadline = Instant::now() + T;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                assert!(st.success(), "exit status {st:?}");
                break;
            }
            assert!(Instant::now() < deadline, "service did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut err = String::new();
        child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
        let line = err.lines().find(|l| l.contains(": stats ")).unwrap_or_else(|| panic!("no stats line in {err}"));
        line.split(": stats ")
            .nth(1)
            .expect("stats")
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("k=v");
                (k.to_string(), v.parse().expect("count"))
            })
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill();
    }
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {name} in {stats:?}"))
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
    assert_eq!(stat(&s, "tx_frames"), u64::from(total));
    assert_eq!(stat(&s, "tx_dropped") + stat(&s, "tx_errors"), 0);
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
        assert_eq!(u.0, u32::try_from(k).expect("k"), "buffers used in order");
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
    assert_eq!(stat(&s, "rx_frames"), 20);
    assert_eq!(stat(&s, "rx_dropped") + stat(&s, "rx_bad_chains") + stat(&s, "rx_errors"), 0);
    assert_eq!(stat(&s, "rx_bytes"), sent.iter().chain(&waiting).map(|f| f.len() as u64).sum::<u64>());
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
    r.desc(TX, 4, TXBUF, 1514, F_WRITE, 0);
    r.offer(TX, 4);
    r.desc(TX, 5, TXBUF, 100, F_NEXT, 6);
    r.desc(TX, 6, TXBUF, 100, F_NEXT, 5);
    r.offer(TX, 5);
    r.desc(TX, 7, TXBUF, 100, F_NEXT, 999);
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
    assert_eq!(stat(&s, "tx_dropped"), 7);
    assert_eq!(stat(&s, "tx_frames"), 1);
    assert_eq!(stat(&s, "rx_bad_chains"), 1);
    assert_eq!(stat(&s, "rx_dropped"), 1);
    assert_eq!(stat(&s, "rx_frames"), 1);
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
    let mut ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    for (k, u) in used.iter().enumerate() {
        r.check_rx(*u, &after[k]);
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..8).collect::<Vec<u32>>(), "the buffers posted before the kill were reused");
    let f = frame(9, 1514);
    r.send(0, &f);
    r.wait_used(TX, 1);
    assert_eq!(r.wire.recv(T).as_deref(), Some(&f[..]), "TX after the restart");
    r.alive();
    let s = r.shutdown();
    assert_eq!(stat(&s, "rx_frames"), 7);
    assert_eq!(stat(&s, "tx_frames"), 1);
}
