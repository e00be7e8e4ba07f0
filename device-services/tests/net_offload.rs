//! Checksum/TSO offloads and mergeable RX buffers of the real `bulkhead-net`, driven as the core
//! and a guest driver would (guest RAM in a memfd, registers over the exit ring, kicks on the
//! queues' ioeventfds) with its TAP in a network namespace this test creates and deletes. The
//! host side has an address (10.77.0.1/24) on the TAP and a static neighbour entry for the
//! guest (10.77.0.2), so host sockets talk to the fake guest through the service.

mod support;

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use device_services::virtio::net::{
    NetHdr, F_CSUM, F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_MRG_RXBUF, HDR_F_NEEDS_CSUM,
    HDR_GSO_ECN, HDR_GSO_TCPV4, HDR_GSO_TCPV6, HDR_LEN,
};
use device_services::virtio::F_VERSION_1;
use ipc::control::FdRole;
use ipc::state::StateRegion;
use support::{
    guest_ram, ip, net_device, one_at_a_time, packet_send, GuestQueue, Instance, Netns, StderrTo, DESC_WRITE, MMIO_BASE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[allow(dead_code)]
#[path = "../../vmm-core/src/tap.rs"]
mod tap;

const RAM: u64 = 4 << 20;
const QSIZE: u16 = 64;
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x20_0000;
const BUF: u64 = 4096;
const T: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x02, 0xb1, 0x6b, 0x00, 0x00, 0x09];
/// The TAP's own MAC (set by the test).
const HOST_MAC: [u8; 6] = [0x02, 0xb1, 0x6b, 0x00, 0x00, 0x01];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// `SOL_PACKET` / `PACKET_VNET_HDR`: the AF_PACKET socket reads a `virtio_net_hdr` per frame.
const PACKET_VNET_HDR: libc::c_int = 15;

struct Rig {
    _serial: std::sync::MutexGuard<'static, ()>,
    memfd: OwnedFd,
    mem: GuestMemoryMmap<()>,
    state: StateRegion,
    notify: [EventFd; 2],
    irq: EventFd,
    tap: OwnedFd,
    sock: OwnedFd,
    tap_name: String,
    inst: Option<Instance>,
    q: [GuestQueue; 2],
    host_mac: [u8; 6],
    // Last: the namespace goes after the TAP and the socket are closed.
    ns: Netns,
}

impl Rig {
    fn new() -> Self {
        let serial = one_at_a_time();
        let (ns, n) = Netns::new("bh-offload");
        let tap_name = format!("bhoff{n}");
        let (tap, sock) = ns.tap_and_packet_socket(&tap_name, |name| {
            let t = tap::open_tap(name, 0).expect("open TAP");
            (t.name, t.fd)
        });
        let host_mac = ns.run(|| {
            // The MAC first: changing it flushes the neighbour table.
            ip(&["link", "set", "dev", &tap_name, "address", "02:b1:6b:00:00:01"]);
            ip(&["link", "set", "dev", &tap_name, "mtu", "9000"]);
            ip(&["addr", "add", "10.77.0.1/24", "dev", &tap_name]);
            let mac = MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            ip(&["neigh", "add", "10.77.0.2", "lladdr", &mac, "nud", "permanent", "dev", &tap_name]);
            HOST_MAC
        });
        let (memfd, mem) = guest_ram(usize::try_from(RAM).expect("ram"));
        let mut rig = Self {
            _serial: serial,
            memfd,
            mem,
            state: StateRegion::create("net-offload-state").expect("state region"),
            notify: [EventFd::new(EFD_NONBLOCK).expect("eventfd"), EventFd::new(EFD_NONBLOCK).expect("eventfd")],
            irq: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            tap,
            sock,
            tap_name,
            inst: None,
            q: [GuestQueue::at(0x1000, 0x2000, 0x3000, QSIZE), GuestQueue::at(0x4000, 0x5000, 0x6000, QSIZE)],
            host_mac,
            ns,
        };
        rig.start();
        rig
    }

    /// Starts an instance as the core does, with the same device fds each time.
    fn start(&mut self) {
        let fds = [
            (FdRole::GuestMemory, self.memfd.as_fd()),
            (FdRole::Tap, self.tap.as_fd()),
            (FdRole::Irq, support::borrow(&self.irq)),
            (FdRole::QueueNotify(0), support::borrow(&self.notify[0])),
            (FdRole::QueueNotify(1), support::borrow(&self.notify[1])),
            (FdRole::StateRegion, self.state.fd()),
        ];
        let device = net_device(RAM, MAC, &self.tap_name, Default::default());
        self.inst =
            Some(Instance::start(env!("CARGO_BIN_EXE_bulkhead-net"), "net-offload", StderrTo::Pipe, &fds, device));
    }

    /// A driver's initialisation with `features` (fresh rings).
    fn init(&mut self, features: u64) {
        self.q = [
            GuestQueue::new(&self.mem, 0x1000, 0x2000, 0x3000, QSIZE),
            GuestQueue::new(&self.mem, 0x4000, 0x5000, 0x6000, QSIZE),
        ];
        let inst = self.inst.as_ref().expect("instance");
        inst.mmio(MMIO_BASE).init(1, F_VERSION_1 | features, &mut self.q);
    }

    /// Posts RX buffer `i` (descriptor i, BUF bytes at RXBUF + i * BUF) and kicks.
    fn post_rx(&mut self, i: u16) {
        let at = RXBUF + u64::from(i) * BUF;
        self.mem.write_slice(&[0xeeu8; 16], GuestAddress(at)).expect("poison");
        self.q[0].set_desc(&self.mem, i, at, u32::try_from(BUF).expect("len"), DESC_WRITE, 0);
        self.q[0].offer(&self.mem, i);
        self.notify[0].write(1).expect("kick");
    }

    /// Sends `frame` with `hdr` from TX descriptor `i` and waits for its completion.
    fn tx(&mut self, i: u16, hdr: &NetHdr, frame: &[u8]) {
        let at = TXBUF + u64::from(i % 8) * 0x1_0000;
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(at)).expect("hdr");
        self.mem.write_slice(frame, GuestAddress(at + HDR_LEN as u64)).expect("frame");
        let d = i % QSIZE;
        self.q[1].set_desc(&self.mem, d, at, u32::try_from(HDR_LEN + frame.len()).expect("len"), 0, 0);
        self.q[1].offer(&self.mem, d);
        self.notify[1].write(1).expect("kick");
        let used = self.q[1].wait_used(&self.mem, 1, T);
        assert_eq!(used, vec![(d, 0)], "TX completion");
    }

    /// Waits for `n` RX completions.
    fn rx_used(&mut self, n: u16) -> Vec<(u16, u32)> {
        self.q[0].wait_used(&self.mem, n, T)
    }

    /// Waits for the next IPv4/UDP frame in a single RX buffer (other frames, e.g. ARP, are
    /// skipped and their buffers posted again); returns its header and frame.
    fn rx_udp(&mut self) -> (NetHdr, Vec<u8>) {
        for _ in 0..8 {
            let (id, len) = self.rx_used(1)[0];
            let b = self.rx_bytes(id, len);
            let f = &b[HDR_LEN..];
            if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[14 + 9] == 17 {
                return (NetHdr::from_bytes(&b[..HDR_LEN].try_into().expect("12")), f.to_vec());
            }
            self.post_rx(id);
        }
        panic!("no UDP frame");
    }

    /// The `len` bytes of RX buffer `i`.
    fn rx_bytes(&self, i: u16, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(len).expect("len")];
        self.mem.read_slice(&mut b, GuestAddress(RXBUF + u64::from(i) * BUF)).expect("read");
        b
    }

    fn udp_socket(&self, port: u16) -> UdpSocket {
        self.ns.run(|| {
            let s = UdpSocket::bind(("10.77.0.1", port)).expect("bind UDP");
            s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            s
        })
    }

    fn shutdown_stats(&mut self) -> Vec<(String, u64)> {
        let mut inst = self.inst.take().expect("instance");
        inst.shutdown_with_stats(T)
    }
}

/// The Internet checksum's one's-complement sum of `data` (folded, not complemented).
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// Ethernet + IPv4 headers from the guest to the host, carrying `l4_len` bytes of `proto`.
fn eth_ip(host_mac: [u8; 6], proto: u8, l4_len: usize) -> Vec<u8> {
    let mut f = host_mac.to_vec();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + l4_len).expect("ip len");
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    iph.extend_from_slice(&GUEST_IP);
    iph.extend_from_slice(&HOST_IP);
    let c = !u16::try_from(sum16(0, &iph)).expect("folded");
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    f
}

/// The pseudo-header sum a driver leaves in the checksum field with `NEEDS_CSUM`.
fn pseudo(proto: u8, l4_len: usize) -> u16 {
    let mut p = GUEST_IP.to_vec();
    p.extend_from_slice(&HOST_IP);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&u16::try_from(l4_len).expect("len").to_be_bytes());
    u16::try_from(sum16(0, &p)).expect("folded")
}

/// A UDP datagram from the guest (port 5555) to the host's `port` with checksum field `csum`.
fn udp_frame(host_mac: [u8; 6], port: u16, payload: &[u8], csum: u16) -> Vec<u8> {
    let l4 = 8 + payload.len();
    let mut f = eth_ip(host_mac, 17, l4);
    f.extend_from_slice(&5555u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&u16::try_from(l4).expect("len").to_be_bytes());
    f.extend_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed)).collect()
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    support::stat_of(stats, name)
}

#[test]
fn negotiated_offloads_reach_the_tap_and_a_reset_takes_them_back() {
    let mut r = Rig::new();
    let host = r.ns.run(|| UdpSocket::bind("10.77.0.1:0").expect("bind"));
    // GUEST_CSUM (+ TSO, MRG_RXBUF): the service sets TUN_F_CSUM|TSO4|TSO6|TSO_ECN on its TAP,
    // so a datagram the host sends leaves its checksum to the "hardware": NEEDS_CSUM arrives.
    r.init(F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_MRG_RXBUF);
    for i in 0..4 {
        r.post_rx(i);
    }
    let data = payload(1, 200);
    host.send_to(&data, "10.77.0.2:9999").expect("send");
    let (hdr, f) = r.rx_udp();
    assert_eq!(f.len(), 14 + 20 + 8 + 200);
    assert_eq!(hdr.flags, HDR_F_NEEDS_CSUM, "partial checksum with offloads on: {hdr:?}");
    assert_eq!((hdr.csum_start, hdr.csum_offset, hdr.num_buffers), (34, 6, 1));
    assert_eq!(&f[42..], &data[..]);

    // Reset, then a driver without GUEST_CSUM: the service sets the TAP's offloads back to 0,
    // and the kernel hands over a fully checksummed datagram.
    r.init(F_MRG_RXBUF);
    for i in 0..4 {
        r.post_rx(i);
    }
    let data = payload(2, 300);
    host.send_to(&data, "10.77.0.2:9999").expect("send");
    let (hdr, f) = r.rx_udp();
    assert_eq!((hdr.flags, hdr.gso_type, hdr.num_buffers), (0, 0, 1), "no offloads after the reset: {hdr:?}");
    let udp = &f[34..];
    assert_eq!(&udp[8..], &data[..]);
    let full = sum16(u32::from(pseudo_to_guest(udp.len())), udp);
    assert_eq!(full, 0xffff, "the UDP checksum is complete and valid");
    let stats = r.shutdown_stats();
    assert_eq!((stat(&stats, "rx_csum"), stat(&stats, "rx_dropped")), (1, 0), "{stats:?}");
}

/// The pseudo-header sum of a UDP datagram from the host to the guest.
fn pseudo_to_guest(l4_len: usize) -> u16 {
    let mut p = HOST_IP.to_vec();
    p.extend_from_slice(&GUEST_IP);
    p.extend_from_slice(&[0, 17]);
    p.extend_from_slice(&u16::try_from(l4_len).expect("len").to_be_bytes());
    u16::try_from(sum16(0, &p)).expect("folded")
}

/// Reads frames of ethertype IPv4 from the AF_PACKET socket with `PACKET_VNET_HDR` on: each
/// starts with a 10-byte `virtio_net_hdr`. Returns (header, frame) of the first TCP one.
fn recv_tcp_with_vnet_hdr(sock: &OwnedFd, within: Duration) -> Option<(NetHdr, Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into buf, alive for the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if let Ok(n) = usize::try_from(n) {
            let f = &buf[10..n];
            if n >= 10 + 34 && f[12..14] == [0x08, 0x00] && f[14 + 9] == 6 && f[6..12] == MAC {
                let mut h = [0u8; HDR_LEN];
                h[..10].copy_from_slice(&buf[..10]);
                return Some((NetHdr::from_bytes(&h), f.to_vec()));
            }
            continue;
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[test]
fn tx_checksum_and_tso_frames_are_taken_by_the_host_stack_and_bad_headers_dropped() {
    let mut r = Rig::new();
    r.init(F_CSUM | F_HOST_TSO4);
    let host = r.udp_socket(7777);
    let mut buf = [0u8; 2048];

    // A datagram with NEEDS_CSUM: the checksum field holds only the pseudo-header sum, the
    // kernel completes it; the host socket gets the data.
    let data = payload(3, 500);
    let csum = NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..NetHdr::default() };
    r.tx(0, &csum, &udp_frame(r.host_mac, 7777, &data, pseudo(17, 508)));
    let (n, from) = host.recv_from(&mut buf).expect("datagram with a completed checksum");
    assert_eq!(&buf[..n], &data[..]);
    assert_eq!(from.to_string(), "10.77.0.2:5555");
    // The same bytes without NEEDS_CSUM carry a wrong checksum: the host stack drops them (so the
    // datagram above got through because the offload was honoured).
    r.tx(1, &NetHdr::default(), &udp_frame(r.host_mac, 7777, &data, pseudo(17, 508)));
    assert!(host.recv_from(&mut buf).is_err(), "a datagram with a bad checksum was delivered");

    // A TSO frame: TCP, 3 x 1000 bytes of payload, gso_size 1000. The kernel takes it as one GSO
    // packet (seen with its virtio_net_hdr by an AF_PACKET socket with PACKET_VNET_HDR).
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from `one`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            r.sock.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_VNET_HDR,
            std::ptr::addr_of!(one).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("len"),
        )
    };
    assert_eq!(rc, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
    let seg = payload(4, 3000);
    let mut tcp = eth_ip(r.host_mac, 6, 20 + seg.len());
    tcp.extend_from_slice(&40000u16.to_be_bytes());
    tcp.extend_from_slice(&9u16.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.extend_from_slice(&[0x50, 0x18, 0xff, 0xff]);
    tcp.extend_from_slice(&pseudo(6, 20 + seg.len()).to_be_bytes());
    tcp.extend_from_slice(&[0, 0]);
    tcp.extend_from_slice(&seg);
    let tso = NetHdr { gso_type: HDR_GSO_TCPV4, gso_size: 1000, hdr_len: 54, csum_offset: 16, ..csum };
    r.tx(2, &tso, &tcp);
    let (h, f) = recv_tcp_with_vnet_hdr(&r.sock, T).expect("the TSO frame on the host side");
    assert_eq!((h.gso_type, h.gso_size), (HDR_GSO_TCPV4, 1000), "one GSO packet of 3 segments: {h:?}");
    assert_eq!(f.len(), 54 + 3000);
    assert_eq!(&f[54..], &seg[..]);

    // Hostile headers: dropped and counted, the service goes on.
    let bad = [
        NetHdr { gso_type: HDR_GSO_TCPV6, ..tso },
        NetHdr { gso_type: HDR_GSO_TCPV4 | HDR_GSO_ECN, ..tso },
        NetHdr { csum_start: 3060, ..csum },
        NetHdr { csum_offset: 3100, ..csum },
        NetHdr { gso_size: 0, ..tso },
        NetHdr { flags: 0x02, ..NetHdr::default() },
    ];
    for (i, h) in bad.iter().enumerate() {
        r.tx(3 + u16::try_from(i).expect("i"), h, &tcp);
    }
    let data = payload(5, 100);
    r.tx(10, &csum, &udp_frame(r.host_mac, 7777, &data, pseudo(17, 108)));
    let (n, _) = host.recv_from(&mut buf).expect("the service still sends");
    assert_eq!(&buf[..n], &data[..]);
    assert!(r.inst.as_mut().expect("instance").is_running());
    let stats = r.shutdown_stats();
    assert_eq!(stat(&stats, "tx_bad_headers"), 6, "{stats:?}");
    assert_eq!(stat(&stats, "tx_dropped"), 6);
    assert_eq!(stat(&stats, "tx_errors"), 0);
    assert_eq!((stat(&stats, "tx_frames"), stat(&stats, "tx_csum"), stat(&stats, "tx_gso")), (4, 3, 1));
}

#[test]
fn tso_and_checksum_headers_are_refused_when_not_negotiated() {
    let mut r = Rig::new();
    r.init(F_MRG_RXBUF);
    let csum = NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..NetHdr::default() };
    let frame = udp_frame(r.host_mac, 7777, &payload(6, 100), 0);
    r.tx(0, &csum, &frame);
    r.tx(1, &NetHdr { gso_type: HDR_GSO_TCPV4, gso_size: 1000, ..csum }, &frame);
    r.tx(2, &NetHdr::default(), &frame);
    let stats = r.shutdown_stats();
    assert_eq!((stat(&stats, "tx_bad_headers"), stat(&stats, "tx_frames")), (2, 1), "{stats:?}");
}

/// A broadcast frame of our experimental ethertype with a sequence number and a pattern.
fn jumbo(seq: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend(payload(seq, len - 14));
    f
}

/// The frame spread over RX buffers `ids` with used lengths `lens`: header, then the bytes.
fn gather(r: &Rig, used: &[(u16, u32)]) -> (NetHdr, Vec<u8>) {
    let mut all = Vec::new();
    for &(id, len) in used {
        all.extend(r.rx_bytes(id, len));
    }
    let hdr = NetHdr::from_bytes(&all[..HDR_LEN].try_into().expect("12"));
    (hdr, all[HDR_LEN..].to_vec())
}

#[test]
fn mergeable_rx_spreads_a_jumbo_frame_and_a_restart_neither_leaks_nor_reuses_buffers() {
    let mut r = Rig::new();
    r.init(F_MRG_RXBUF);
    // Two 4 KiB buffers for a 9000-byte frame: it waits in the service until a third comes.
    r.post_rx(0);
    r.post_rx(1);
    let f1 = jumbo(1, 9000);
    packet_send(&r.sock, &f1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.q[0].take_used(&r.mem), vec![], "nothing completed before the frame fits");
    r.post_rx(2);
    let used = r.rx_used(3);
    assert_eq!(used, vec![(0, 4096), (1, 4096), (2, 9012 - 8192)]);
    let (hdr, got) = gather(&r, &used);
    assert_eq!(hdr.num_buffers, 3, "{hdr:?}");
    assert!(got == f1, "the frame is intact over three buffers");

    // A frame waiting for buffers when the service is SIGKILLed: lost, but the buffers it had
    // filled are taken again by the next instance, each completed exactly once.
    r.post_rx(3);
    r.post_rx(4);
    packet_send(&r.sock, &jumbo(2, 9000));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.q[0].take_used(&r.mem), vec![]);
    r.inst.as_mut().expect("instance").kill();
    r.inst = None;
    r.start();
    r.post_rx(5);
    let f3 = jumbo(3, 9000);
    packet_send(&r.sock, &f3);
    let used = r.rx_used(3);
    assert_eq!(used, vec![(3, 4096), (4, 4096), (5, 9012 - 8192)], "the held buffers, in order, once");
    let (hdr, got) = gather(&r, &used);
    assert_eq!(hdr.num_buffers, 3);
    assert!(got == f3, "the next frame is intact");
    // A small frame after that takes one buffer.
    r.post_rx(6);
    let f4 = jumbo(4, 60);
    packet_send(&r.sock, &f4);
    let used = r.rx_used(1);
    assert_eq!(used, vec![(6, 72)]);
    assert_eq!(r.q[0].take_used(&r.mem), vec![], "no buffer completed twice");
    let (hdr, got) = gather(&r, &used);
    assert_eq!((hdr.num_buffers, got), (1, f4));
    let stats = r.shutdown_stats();
    assert_eq!((stat(&stats, "rx_merged"), stat(&stats, "rx_frames")), (1, 2), "{stats:?}");
}
