//! The one Linux boot of a test run: a stock-configured kernel through `bulkhead`, its console on
//! `bulkhead-console` and its root file system on an ext4 image served by `bulkhead-block`.
//!
//! Under PVM it takes about two minutes and ends at "Run /sbin/init" (guest user space cannot make
//! system calls there, so init dies, the kernel panics and `panic=1` reboots, which ends the VMM);
//! on hardware-assisted KVM init runs and reboots the machine itself.
//!
//! The block service is killed every 2 s from 3 s on, through the kernel's probe of the disk and
//! the mount of its root: the supervisor restarts it each time and the kernel never sees an I/O
//! error.
//!
//! The same boot checks the network: the VM runs inside a network namespace the test creates,
//! with a `--net` device on a TAP whose host side is 10.0.2.1/24. The kernel configures eth0
//! itself (`ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off`) and netconsole sends its log as UDP
//! to a listener on 10.0.2.1:6666; the test checks the lines arrive. Once the guest says eth0 is
//! configured, the test pings it from the host side (1000-byte ICMP echoes, answered by the
//! guest's kernel) and checks intact replies come back.

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_tests::*;

/// The ext4 superblock's mount count (`s_mnt_count`: u16 at byte 0x34 of the superblock at 1024).
fn ext4_mount_count(image: &std::path::Path) -> u16 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).expect("open image");
    let mut sb = [0u8; 0x3a];
    f.seek(SeekFrom::Start(1024)).expect("seek");
    f.read_exact(&mut sb).expect("read superblock");
    assert_eq!(u16::from_le_bytes([sb[0x38], sb[0x39]]), 0xef53, "not an ext4 image");
    u16::from_le_bytes([sb[0x34], sb[0x35]])
}

/// The boot's network namespace: a TAP whose host side is 10.0.2.1/24 with a fixed MAC.
fn boot_netns() -> NetNs {
    let ns = NetNs::new("linux");
    ns.ip(&["tuntap", "add", "dev", "bhlinux0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["link", "set", "bhlinux0", "address", "02:00:0a:00:02:01"]);
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "bhlinux0"]);
    ns.ip(&["link", "set", "bhlinux0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns
}

/// Collects the netconsole datagrams arriving on `sock` until `stop` is set; tells `configured`
/// when the guest says its eth0 is configured.
fn listen(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    configured: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 2048];
        let start = Instant::now();
        while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(900) {
            if let Ok(n) = sock.recv(&mut buf) {
                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                if line.contains("IP-Config: Complete") {
                    let _ = configured.send(());
                }
                lines.push(line);
            }
        }
        lines
    })
}

/// Internet checksum (RFC 1071).
fn inet_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Once `configured` fires, pings 10.0.2.2 from inside the namespace (raw ICMP socket, 1000-byte
/// payloads, one every 100 ms) until 10 intact replies came back, `stop` is set or 60 s passed.
/// The guest's kernel answers by itself: frames go host → TAP → bulkhead-net → guest and back.
/// Returns (requests sent, intact replies).
fn pinger(
    ns: &NetNs,
    stop: Arc<AtomicBool>,
    configured: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<(u16, u16)> {
    let sock = ns.run(|| {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw ICMP socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned from here on.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    });
    std::thread::spawn(move || {
        if configured.recv_timeout(Duration::from_secs(600)).is_err() {
            return (0, 0);
        }
        let id: u16 = 0xb4b4;
        let payload: Vec<u8> = (0..1000u32).map(|i| ((i * 13 + 7) & 0xff).to_le_bytes()[0]).collect();
        // SAFETY: `sockaddr_in` is plain old data; all-zeroes is a valid value.
        let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dst.sin_family = libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET");
        dst.sin_addr.s_addr = u32::from_ne_bytes([10, 0, 2, 2]);
        let (mut sent, mut intact) = (0u16, 0u16);
        let start = Instant::now();
        while intact < 10 && !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&sent.to_be_bytes());
            pkt.extend_from_slice(&payload);
            let c = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: `pkt` and `dst` are valid for the call; lengths are theirs.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    std::ptr::addr_of!(dst).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("size"),
                )
            };
            assert_eq!(n, pkt.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            sent += 1;
            let until = Instant::now() + Duration::from_millis(100);
            let mut buf = vec![0u8; 2048];
            while Instant::now() < until {
                let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                    continue;
                }
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                // IPv4 header (IHL words), then ICMP: type 0 = echo reply.
                let ihl = usize::from(buf[0] & 0xf) * 4;
                let icmp = &buf[ihl.min(n)..n];
                if icmp.len() == 8 + payload.len()
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[8..] == payload[..]
                    && inet_checksum(icmp) == 0
                {
                    intact += 1;
                }
            }
        }
        (sent, intact)
    })
}

#[test]
fn linux_boots_from_bulkhead_block_with_console_service() {
    let vmlinux = artefact("BULKHEAD_VMLINUX");
    let dir = scratch("linux");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(artefact("BULKHEAD_ROOTFS"), &root).expect("copy rootfs");
    let mounts_before = ext4_mount_count(&root);
    let disk = format!("{},id=root", root.display());
    let ns = boot_netns();
    let stop = Arc::new(AtomicBool::new(false));
    let (configured_tx, configured) = std::sync::mpsc::channel();
    let udp = ns.run(|| UdpSocket::bind("10.0.2.1:6666").expect("bind UDP listener"));
    let listener = listen(udp, stop.clone(), configured_tx);
    let pings = pinger(&ns, stop.clone(), configured);
    let mut cmd = bulkhead(&[
        "--kernel",
        vmlinux.to_str().expect("utf8"),
        "--disk",
        &disk,
        "--serial-input",
        "none",
        "--mem",
        "256",
        "--net",
        "tap=bhlinux0,mac=02:00:0a:00:02:02",
        "--cmdline",
        "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw \
             ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off \
             netconsole=6665@10.0.2.2/eth0,6666@10.0.2.1/02:00:0a:00:02:01",
        "--restart-max",
        "1000/10",
        "--restart-burst",
        "1000/1",
        "--fault",
        "block:kill,after=3s,every=2s",
    ]);
    let r = wait_bounded(ns.spawn(&mut cmd), Duration::from_secs(900));
    // Datagrams sent just before the reboot may still be in flight.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let udp = listener.join().expect("listener");
    let (pings_sent, pongs) = pings.join().expect("pinger");
    let out = &r.stdout;
    let ctx = || format!("--- console\n{out}\n--- log\n{}", r.stderr);
    assert!(out.contains("Linux version 6.1"), "no kernel banner on the console\n{}", ctx());
    assert!(r.stderr.contains("service console started as pid"), "{}", ctx());
    assert!(r.stderr.contains("service block-root started as pid"), "{}", ctx());
    assert!(out.contains("virtio_blk virtio0: [vda]"), "the kernel did not find the disk\n{}", ctx());
    assert!(out.contains("VFS: Mounted root (ext4 filesystem)"), "root not mounted\n{}", ctx());
    assert!(out.contains("Run /sbin/init as init process"), "kernel did not reach init\n{}", ctx());
    assert!(!out.contains("I/O error") && !out.contains("EXT4-fs error"), "the guest saw the kills\n{}", ctx());
    assert!(r.stderr.contains("service net-net0 started as pid"), "{}", ctx());
    assert!(out.contains("IP-Config: Complete"), "the kernel did not configure eth0\n{}", ctx());
    assert!(out.contains("addr=10.0.2.2"), "eth0 got the wrong address\n{}", ctx());
    assert!(out.contains("netconsole: network logging started"), "netconsole did not start\n{}", ctx());
    let udp_text = udp.concat();
    assert!(
        udp_text.contains("IP-Config: Complete") && udp_text.contains("Run /sbin/init as init process"),
        "netconsole lines did not arrive on 10.0.2.1:6666 ({} datagrams)\n{udp_text}\n{}",
        udp.len(),
        ctx()
    );
    // Host → guest and back through bulkhead-net, answered by the guest's kernel.
    assert!(pongs >= 5, "{pongs} intact echo replies to {pings_sent} pings of 10.0.2.2\n{}", ctx());
    eprintln!("ping 10.0.2.2: {pongs} intact replies to {pings_sent} requests");
    let restarts = r.stderr.lines().filter(|l| l.contains("service block-root restarted as pid")).count();
    assert!(restarts >= 5, "only {restarts} block restarts during the boot\n{}", ctx());
    if r.stderr.contains("host KVM is PVM") {
        // Under PVM, user space faults on its first instruction that needs the kernel; the kernel
        // panics and reboots.
        assert!(out.contains("Kernel panic"), "{}", ctx());
    } else {
        assert!(out.contains("bulkhead-guest: init running"), "{}", ctx());
    }
    assert_eq!(r.status.code(), Some(0), "the reboot must end bulkhead cleanly\n{}", ctx());
    assert!(r.stderr.contains("guest stopped"), "{}", ctx());
    let mounts_after = ext4_mount_count(&root);
    assert!(
        mounts_after > mounts_before,
        "the kernel's rw mount must have written the superblock through bulkhead-block: {mounts_before} -> {mounts_after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
