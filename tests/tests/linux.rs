//! The Linux guest end to end, through the real processes (sandbox on): Debian's kernel with our
//! PVM work-arounds (guests/linux), its console on `bulkhead-console`, its ext4 root on
//! `bulkhead-block` and eth0 on `bulkhead-net`, driven by real programs in the guest's busybox user
//! space. Two boots per test run (each a minute or two under PVM):
//!
//! 1. `linux_disk_verify_with_block_service_killed`: the guest-side test `disk-verify` writes 16
//!    MiB of random data to a file on its ext4 root, syncs, drops the page cache, reads it back and
//!    compares checksums while the host kills `bulkhead-block` every 2 s (from the kernel's probe
//!    of the disk on). The guest's result line must report a match, no kernel I/O error and no
//!    ext4 error; afterwards the image passes `e2fsck -fn` and its mount count went up. The same
//!    boot keeps the kernel-level network checks: the kernel configures eth0 itself (`ip=`),
//!    netconsole sends its log to a UDP listener on the host side, and the host pings the guest.
//! 2. `linux_shell_console_and_tcp_with_services_killed`: no test on the command line, so init
//!    starts a shell on the serial console. The test types commands on the VM's stdin and reads
//!    their output (before and after `bulkhead-console` is killed), then types `bulkhead-test
//!    net-tcp ...`: the guest fetches 4 MiB of random data over TCP from a server on the host side
//!    of its TAP and sends it back, while `bulkhead-net` is killed once in each direction. TCP
//!    recovers: both copies are intact, and the driver negotiated checksum offload and TSO.
//!
//! The VM runs in a network namespace the test creates, with a `--net` device on a TAP whose host
//! side is 10.0.2.1/24 (the guest is 10.0.2.2).

use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_tests::linux::*;
use bulkhead_tests::*;

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

/// The kernel command line both boots share (the core adds the PVM parameters itself).
const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw \
                       ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off";

/// `bulkhead run` for the Linux guest on a private copy of the root image, with eth0 on the
/// boot namespace's TAP, the kernel command line `CMDLINE` + `cmdline_extra`, then `extra`.
fn linux_vm(root: &std::path::Path, cmdline_extra: &str, extra: &[&str]) -> std::process::Command {
    let vmlinux = artefact("BULKHEAD_VMLINUX");
    let disk = format!("{},id=root", root.display());
    let cmdline = format!("{CMDLINE} {cmdline_extra}");
    // For `bulkhead inspect` when a wait runs out (LiveVm::device_states).
    let sock = root.with_file_name("api.sock");
    let mut args = vec![
        "--kernel",
        vmlinux.to_str().expect("utf8"),
        "--disk",
        &disk,
        "--mem",
        "256",
        "--net",
        "tap=bhlinux0,mac=02:00:0a:00:02:02",
        "--cmdline",
        &cmdline,
        "--api-sock",
        sock.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    bulkhead(&args)
}

/// A scratch directory with a private copy of the built root image.
fn root_copy(name: &str) -> (Scratch, std::path::PathBuf) {
    let dir = scratch(name);
    let root = dir.join("rootfs.ext4");
    std::fs::copy(artefact("BULKHEAD_ROOTFS"), &root).expect("copy rootfs");
    (dir, root)
}

#[test]
fn linux_disk_verify_with_block_service_killed() {
    let (dir, root) = root_copy("linux-disk");
    let mounts_before = ext4_mount_count(&root);
    // The random data the guest copies onto its root file system: a second, read-only disk.
    let data = random_bytes(0xd15c_da7a, 16 << 20);
    let src = dir.join("random.bin");
    std::fs::write(&src, &data).expect("write the random source disk");
    let src_disk = format!("{},ro,id=src", src.display());
    let extra_cmdline = format!(
        "netconsole=6665@10.0.2.2/eth0,6666@10.0.2.1/02:00:0a:00:02:01 bulkhead.test=disk-verify \
         bulkhead.size_mib=16 bulkhead.sha256={}",
        sha256_hex(&data)
    );
    let ns = boot_netns();
    let stop = Arc::new(AtomicBool::new(false));
    let (configured_tx, configured) = std::sync::mpsc::channel();
    let udp = ns.run(|| UdpSocket::bind("10.0.2.1:6666").expect("bind UDP listener"));
    let listener = listen(udp, stop.clone(), configured_tx);
    let pings = pinger(&ns, stop.clone(), configured);
    let mut cmd = linux_vm(
        &root,
        &extra_cmdline,
        &[
            "--disk",
            &src_disk,
            "--serial-input",
            "none",
            "--restart-max",
            "1000/10",
            "--restart-burst",
            "1000/1",
            "--fault",
            "block:kill,after=3s,every=2s",
        ],
    );
    let r = wait_bounded(ns.spawn(&mut cmd), Duration::from_secs(900));
    // Datagrams sent just before the reboot may still be in flight.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let udp = listener.join().expect("listener");
    let (pings_sent, pongs) = pings.join().expect("pinger");
    let out = &r.stdout;
    let ctx = || format!("--- console\n{out}\n--- log\n{}", r.stderr);
    // The kernel: banner, disk, root mount, network, init.
    assert!(out.contains("Linux version 6.1"), "no kernel banner on the console\n{}", ctx());
    assert!(r.stderr.contains("service console started as pid"), "{}", ctx());
    assert!(r.stderr.contains("service block-root started as pid"), "{}", ctx());
    assert!(out.contains("virtio_blk virtio0: [vda]"), "the kernel did not find the disk\n{}", ctx());
    assert!(out.contains("VFS: Mounted root (ext4 filesystem)"), "root not mounted\n{}", ctx());
    assert!(out.contains("Run /sbin/init as init process"), "kernel did not reach init\n{}", ctx());
    assert!(r.stderr.contains("service net-net0 started as pid"), "{}", ctx());
    assert!(out.contains("IP-Config: Complete"), "the kernel did not configure eth0\n{}", ctx());
    assert!(out.contains("addr=10.0.2.2"), "eth0 got the wrong address\n{}", ctx());
    assert!(out.contains("netconsole: network logging started"), "netconsole did not start\n{}", ctx());
    // User space: init ran the guest-side test, which passed.
    assert!(out.contains("bulkhead-guest: init running"), "init did not run\n{}", ctx());
    let res = guest_result(out, "disk-verify");
    assert!(res.passed(), "guest test failed: {}\n{}", res.line, ctx());
    assert_eq!(res.fact("size_mib"), "16");
    assert_eq!(res.fact("src"), "/dev/vdb", "{}", res.line);
    assert_eq!(res.fact("source_sha256"), sha256_hex(&data), "{}", res.line);
    assert_eq!(res.fact("read_sha256"), sha256_hex(&data), "{}", res.line);
    assert_eq!(res.fact("io_errors"), "0", "{}", res.line);
    assert_eq!(res.fact("ext4_errors"), "0", "{}", res.line);
    assert!(!out.contains("I/O error") && !out.contains("EXT4-fs error"), "the guest saw the kills\n{}", ctx());
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
    assert!(restarts >= 20, "only {restarts} block restarts during the boot\n{}", ctx());
    eprintln!("disk-verify: {} with {restarts} block service restarts", res.line);
    assert_eq!(r.status.code(), Some(0), "the guest's reboot must end bulkhead cleanly\n{}", ctx());
    assert!(r.stderr.contains("guest stopped"), "{}", ctx());
    // Host side: the guest's writes reached the image, and the file system is consistent.
    let mounts_after = ext4_mount_count(&root);
    assert!(
        mounts_after > mounts_before,
        "the kernel's rw mount must have written the superblock through bulkhead-block: {mounts_before} -> {mounts_after}"
    );
    let (code, fsck) = e2fsck(&root);
    assert_eq!(code, 0, "e2fsck -fn found problems in the image the guest wrote\n{fsck}");
    let on_image = ext4_read_file(&root, "/var/bulkhead-verify.bin", &dir.join("verify.bin"));
    assert!(on_image == data, "the file on the host-side image is not the random data ({} bytes)", on_image.len());
}

/// SIGKILLs the running `service_binary` child of the core `core`; returns its pid.
fn kill_service(core: u32, service_binary: &str) -> u32 {
    let svc = service_child(core, service_binary).unwrap_or_else(|| panic!("no {service_binary} child of {core}"));
    let pid = i32::try_from(svc.pid).expect("pid fits");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child of our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {service_binary}");
    svc.pid
}

/// The data the host serves to the guest: `len` pseudo-random bytes (splitmix64 of `seed`).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8) as u64).flat_map(|i| splitmix64(seed ^ i).to_le_bytes()).take(len).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A reader that calls `midway` once `at` bytes have passed through it.
struct Midway<R> {
    inner: R,
    passed: usize,
    at: usize,
    midway: Option<Box<dyn FnOnce() + Send>>,
}

impl<R: Read> Read for Midway<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.passed += n;
        if self.passed >= self.at {
            if let Some(f) = self.midway.take() {
                f();
            }
        }
        Ok(n)
    }
}

/// What the guest did against [`http_peer`].
#[derive(Debug, Default)]
struct PeerLog {
    /// Bytes of `/data` served.
    served: usize,
    /// What the peer pulled back from the guest's web server, or why it could not.
    pulled: Option<Result<Vec<u8>, String>>,
    /// Requests for anything else.
    other: Vec<String>,
}

/// Reads `url` (the guest's web server, which may still be starting: refused connections are
/// retried for 30 s) through a [`Midway`] reader.
fn pull(url: &str, expected: usize, midway: Box<dyn FnOnce() + Send>) -> Result<Vec<u8>, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(120))
        .build();
    let start = Instant::now();
    let resp = loop {
        match agent.get(url).call() {
            Ok(r) => break r,
            Err(ureq::Error::Transport(_)) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("GET {url}: {e}")),
        }
    };
    let mut body = Midway { inner: resp.into_reader(), passed: 0, at: expected / 4, midway: Some(midway) };
    let mut got = Vec::with_capacity(expected);
    body.read_to_end(&mut got).map_err(|e| format!("reading {url} after {} bytes: {e}", got.len()))?;
    Ok(got)
}

/// The host side of `net-tcp`: an HTTP server on `addr` (bound inside `ns`) that answers `GET
/// /data` with `data`, and on `GET /pull` reads `pull_url` (the guest's own web server) and
/// answers `ok` if that gave back `data`. It calls `midway` a quarter of the way into each
/// transfer, and stops after the pull, when `stop` is set, or after `limit`.
fn http_peer(
    ns: &NetNs,
    addr: &str,
    pull_url: &str,
    data: Arc<Vec<u8>>,
    midway: impl Fn() + Send + Sync + 'static,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> JoinHandle<PeerLog> {
    let server = ns.run(|| tiny_http::Server::http(addr).expect("bind the HTTP peer"));
    // The pulls run on a thread of their own inside the namespace (their sockets must be there).
    type PullJob = (String, usize, Box<dyn FnOnce() + Send>);
    let (pull_tx, pull_rx) = std::sync::mpsc::channel::<PullJob>();
    let (pulled_tx, pulled_rx) = std::sync::mpsc::channel();
    let entry = ns.entry();
    std::thread::spawn(move || {
        entry.enter();
        for (url, expected, midway) in pull_rx {
            let _ = pulled_tx.send(pull(&url, expected, midway));
        }
    });
    let midway = Arc::new(midway);
    let pull_url = pull_url.to_string();
    std::thread::spawn(move || {
        let mut log = PeerLog::default();
        let start = Instant::now();
        while log.pulled.is_none() && !stop.load(Ordering::SeqCst) && start.elapsed() < limit {
            let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(200)) else { continue };
            let m = midway.clone();
            let midway_once: Box<dyn FnOnce() + Send> = Box::new(move || m());
            match (req.method(), req.url()) {
                (tiny_http::Method::Get, "/data") => {
                    let body = Midway {
                        inner: std::io::Cursor::new(data.to_vec()),
                        passed: 0,
                        at: data.len() / 4,
                        midway: Some(midway_once),
                    };
                    let resp = tiny_http::Response::new(200.into(), Vec::new(), body, Some(data.len()), None);
                    if req.respond(resp).is_ok() {
                        log.served = data.len();
                    }
                }
                (tiny_http::Method::Get, "/pull") => {
                    let _ = pull_tx.send((pull_url.clone(), data.len(), midway_once));
                    let got = pulled_rx.recv().unwrap_or_else(|_| Err("pull thread gone".into()));
                    let verdict = match &got {
                        Ok(b) if b[..] == data[..] => "ok",
                        _ => "bad",
                    };
                    log.pulled = Some(got);
                    let _ = req.respond(tiny_http::Response::from_string(verdict));
                }
                (method, url) => {
                    log.other.push(format!("{method} {url}"));
                    let _ = req.respond(tiny_http::Response::empty(404));
                }
            }
        }
        log
    })
}

#[test]
fn linux_shell_console_and_tcp_with_services_killed() {
    const PROMPT: &str = "bulkhead-guest:/# ";
    const BYTES: usize = 4 << 20;
    let (_dir, root) = root_copy("linux-shell");
    let ns = boot_netns();
    let mut cmd = linux_vm(&root, "", &["--restart-max", "100/10"]);
    let mut vm = LiveVm::spawn(&mut cmd, Some(&ns));
    let core = vm.pid();
    let mut at = vm
        .wait_console_from(0, PROMPT, Duration::from_secs(600))
        .unwrap_or_else(|| panic!("no shell prompt on the console\n{}", vm.context()));

    // The serial input path, end to end: typed on stdin, run by the guest's shell, printed back.
    vm.type_line("echo typed-$((6*7))");
    at = vm
        .wait_console_from(at, "typed-42", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the typed command's output did not come back\n{}", vm.context()));
    at = vm.wait_console_from(at, PROMPT, Duration::from_secs(60)).expect("prompt after the first command");
    let old = kill_service(core, "bulkhead-console");
    assert!(
        wait_until(Duration::from_secs(10), || vm.log().contains("service console restarted as pid")),
        "console service {old} was not restarted\n{}",
        vm.context()
    );
    vm.type_line("echo again-$((7*8))");
    at = vm
        .wait_console_from(at, "again-56", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no output after the console service was killed\n{}", vm.context()));
    at = vm.wait_console_from(at, PROMPT, Duration::from_secs(60)).expect("prompt after the second command");

    // TCP both ways through bulkhead-net, killed once in each direction.
    let data = Arc::new(random_bytes(0x7e57_da7a, BYTES));
    let kills = Arc::new(std::sync::Mutex::new(Vec::new()));
    let k = kills.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let peer = http_peer(
        &ns,
        "10.0.2.1:8080",
        "http://10.0.2.2:8081/data.bin",
        data.clone(),
        move || k.lock().expect("kills").push(kill_service(core, "bulkhead-net")),
        stop.clone(),
        Duration::from_secs(900),
    );
    vm.type_line(&format!("bulkhead-test net-tcp bytes={BYTES} sha256={}", sha256_hex(&data)));
    // Both transfers take ~40 s here. Far longer is a stall: every device's state is taken while
    // the guest still waits (its own timeout is 300 s per transfer), and shown if the test fails.
    let mut stalled = String::new();
    let result_at = vm.wait_console_from(at, RESULT_PREFIX, Duration::from_secs(200)).or_else(|| {
        stalled = format!("--- devices after 200 s of net-tcp\n{}", vm.device_states());
        vm.wait_console_from(at, RESULT_PREFIX, Duration::from_secs(700))
    });
    stop.store(true, Ordering::SeqCst);
    at = result_at.unwrap_or_else(|| panic!("no result line from net-tcp\n{}\n{stalled}", vm.context()));
    vm.wait_console_from(at, PROMPT, Duration::from_secs(60)).expect("prompt after net-tcp");
    let peer = peer.join().expect("HTTP peer");
    vm.type_line("reboot");
    let r = vm.finish(Duration::from_secs(300));
    let ctx = || format!("--- console\n{}\n--- log\n{}\n{stalled}", r.stdout, r.stderr);
    assert_eq!(peer.served, BYTES, "host → guest transfer\n{}", ctx());
    assert!(peer.other.is_empty(), "unexpected requests {:?}", peer.other);
    let pulled = peer.pulled.unwrap_or_else(|| panic!("the guest never asked for the pull\n{}", ctx()));
    let pulled = pulled.unwrap_or_else(|e| panic!("guest → host transfer: {e}\n{}", ctx()));
    assert_eq!(pulled.len(), BYTES, "the guest sent back {} bytes\n{}", pulled.len(), ctx());
    assert!(pulled[..] == data[..], "the bytes the guest sent back differ from what it fetched\n{}", ctx());
    let res = guest_result(&r.stdout, "net-tcp");
    assert!(res.passed(), "guest test failed: {}\n{}", res.line, ctx());
    assert_eq!(res.fact("fetched_bytes"), BYTES.to_string());
    assert_eq!(res.fact("fetched_sha256"), sha256_hex(&data));
    assert_eq!(res.fact("pulled"), "ok");
    // Checksum offload and TSO were negotiated on this path (virtio-net feature bits, bit 0 first).
    let features = res.fact("features").as_bytes();
    for (bit, name) in [(0, "CSUM"), (1, "GUEST_CSUM"), (7, "GUEST_TSO4"), (11, "HOST_TSO4")] {
        assert_eq!(features.get(bit), Some(&b'1'), "VIRTIO_NET_F_{name} not negotiated: {}", res.line);
    }
    // The last net instance served the rest of the guest → host transfer: the guest's TSO frames
    // reached it as GSO frames, which it handed to the TAP as such.
    let tx_gso = r
        .stderr
        .lines()
        .rev()
        .find(|l| l.contains("bulkhead-net") && l.contains("stats tx_frames="))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("tx_gso=")?.parse::<u64>().ok()))
        .unwrap_or_else(|| panic!("no stats line from the last bulkhead-net\n{}", ctx()));
    assert!(tx_gso > 0, "no GSO frame from the guest's TSO\n{}", ctx());
    let killed = kills.lock().expect("kills").len();
    assert_eq!(killed, 2, "the net service must have been killed once per direction");
    let net_restarts = r.stderr.lines().filter(|l| l.contains("service net-net0 restarted as pid")).count();
    assert_eq!(net_restarts, 2, "{}", ctx());
    assert_eq!(r.status.code(), Some(0), "`reboot` in the guest must end bulkhead cleanly\n{}", ctx());
    eprintln!("net-tcp: {}", res.line);
    if !stalled.is_empty() {
        eprintln!("net-tcp was slow, but passed:\n{stalled}");
    }
    for l in r
        .stderr
        .lines()
        .filter(|l| l.contains("bulkhead-net") && l.contains("stats") || l.contains("net-net0 restarted"))
    {
        eprintln!("  {l}");
    }
    let (code, fsck) = e2fsck(&root);
    assert_eq!(code, 0, "e2fsck -fn after the shell session\n{fsck}");
}
