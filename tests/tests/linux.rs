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
//! to a listener on 10.0.2.1:6666; the test checks the lines arrive.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
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

/// A network namespace for the boot, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("bh-linux-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip").success();
        assert!(ok, "ip netns add {name} (needs root)");
        let ns = Self(name);
        for cmd in [
            "ip tuntap add dev bhlinux0 mode tap vnet_hdr",
            "ip link set bhlinux0 address 02:00:0a:00:02:01",
            "ip addr add 10.0.2.1/24 dev bhlinux0",
            "ip link set bhlinux0 up",
            "ip link set lo up",
        ] {
            ns.exec(cmd);
        }
        ns
    }

    fn exec(&self, cmd: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd.split(' '))
            .status()
            .expect("run ip netns exec")
            .success();
        assert!(ok, "in {}: {cmd}", self.0);
    }

    /// A UDP socket bound to `addr` inside the namespace.
    fn udp(&self, addr: &str) -> UdpSocket {
        let path = format!("/var/run/netns/{}", self.0);
        let addr = addr.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with an fd we own for the call.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            UdpSocket::bind(&addr).expect("bind UDP listener")
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Collects the netconsole datagrams arriving on `sock` until `stop` is set.
fn listen(sock: UdpSocket, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 2048];
        let start = Instant::now();
        while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(900) {
            if let Ok(n) = sock.recv(&mut buf) {
                lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        lines
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
    let ns = Netns::new();
    let stop = Arc::new(AtomicBool::new(false));
    let listener = listen(ns.udp("10.0.2.1:6666"), stop.clone());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0]).arg(bin_dir().join("bulkhead")).arg("run");
    cmd.args([
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
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let r = wait_bounded(cmd.spawn().expect("spawn bulkhead"), Duration::from_secs(900));
    // Datagrams sent just before the reboot may still be in flight.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let udp = listener.join().expect("listener");
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
