//! The network path end to end (sandbox on, real binaries): `bulkhead run --net tap=...` with the
//! probe guest's net tests, every test in a network namespace of its own.
//!
//! - A host-side reflector (an AF_PACKET socket on the TAP, in this test) sends back every frame
//!   of the guest's `net-echo`: all come back intact, and the guest's, the reflector's and the
//!   net service's counts agree.
//! - The test itself sends frames of every length into the TAP and the guest's `net-reflect`
//!   sends them back: each returns intact, addressed to the test, exactly once.
//! - Two VMs on one bridge, set up by `examples/vm-to-vm.sh`: B's echo through A's reflector.
//! - The net service SIGKILLed mid-echo: restarted once, the guest finishes with no corrupt frame
//!   and at most one window of frames lost (those in flight at the moment of death).
//! - Bad `--net` input and a missing `bulkhead-net` fail before any VM or TAP exists.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(90);
const ETHERTYPE: u16 = 0x88b5;
const MAGIC: &[u8; 4] = b"BKNT";
const PACKET_OUTGOING: u8 = 4;
/// The guest's MAC (`--net ...,mac=`).
const GUEST_MAC: [u8; 6] = [0x02, 0xb4, 0x7e, 0x57, 0x00, 0x01];
/// The MAC the test's side of the link uses.
const HOST_MAC: [u8; 6] = [0x02, 0xb4, 0x7e, 0x57, 0x00, 0xfe];

/// One VM at a time: on a 2-CPU machine two would steal each other's time and turn the
/// guests' 2 s no-progress bounds into spurious losses.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// A probe test frame (guests/probe/src/suite/net_common.rs): Ethernet header, then magic,
/// sequence, payload length, FNV-1a checksum and the fill pattern.
fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    assert!((60..=1514).contains(&len));
    let plen = len - 14;
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&u32::try_from(plen).expect("plen").to_le_bytes());
    let fill: Vec<u8> = (16..plen).map(|j| u8::try_from((j * 7 + 0x5a) & 0xff).expect("byte")).collect();
    let csum = fnv1a(fnv1a(0x811c_9dc5, &fill), &f[14..26]);
    f.extend_from_slice(&csum.to_le_bytes());
    f.extend_from_slice(&fill);
    f
}

/// The sequence number of an intact test frame; `None` if it is not one of ours or is damaged.
fn intact_seq(f: &[u8]) -> Option<u32> {
    let p = f.get(14..)?;
    if f.get(12..14)? != ETHERTYPE.to_be_bytes() || p.get(..4)? != MAGIC {
        return None;
    }
    let word = |o: usize| p.get(o..o + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_le_bytes);
    let plen = usize::try_from(word(8)?).ok()?;
    let payload = p.get(..plen)?;
    let csum = fnv1a(fnv1a(0x811c_9dc5, payload.get(16..)?), &payload[..12]);
    (plen >= 16 && csum == word(12)?).then_some(word(4)?)
}

/// The host end of a TAP: an AF_PACKET socket bound to it, our EtherType only.
struct Wire {
    sock: OwnedFd,
}

impl Wire {
    /// Opens it; call inside the namespace (see [`NetNs::run`]).
    fn open(iface: &str) -> Self {
        let proto = i32::from(ETHERTYPE.to_be());
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface).expect("iface");
        // SAFETY: `name` is a live NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {iface}");
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("family");
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("len");
        // SAFETY: bind reads `len` bytes of `sll`, which lives for the call.
        let rc = unsafe { libc::bind(sock.as_raw_fd(), std::ptr::addr_of!(sll).cast(), len) };
        assert_eq!(rc, 0, "bind to {iface}: {}", std::io::Error::last_os_error());
        let big: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            // SAFETY: setsockopt reads one c_int from `big`, which lives for the call.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::addr_of!(big).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("len"),
                )
            };
            assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        Self { sock }
    }

    fn send(&self, frame: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: send reads `frame.len()` bytes from a live slice.
            let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == isize::try_from(frame.len()).expect("len") {
                return;
            }
            let e = std::io::Error::last_os_error();
            // ENOBUFS: the TAP's queue is full; it drains as the service reads.
            assert!(
                n < 0 && e.raw_os_error() == Some(libc::ENOBUFS) && Instant::now() < deadline,
                "AF_PACKET send ({n}): {e}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next frame that came *from* the TAP (the guest's TX), within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = libc::c_int::try_from(left.as_millis().min(1000)).expect("ms");
            // SAFETY: poll reads and writes one pollfd that lives for the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r <= 0 {
                if Instant::now() >= deadline {
                    return None;
                }
                continue;
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut flen = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("len");
            // SAFETY: recvfrom writes at most buf.len() bytes into `buf` and at most `flen` bytes
            // into `from`, both live for the call.
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
            if let Ok(n) = usize::try_from(n) {
                if from.sll_pkttype != PACKET_OUTGOING {
                    return Some(buf[..n].to_vec());
                }
            }
        }
    }
}

/// A reflector on a TAP, on its own thread: every test frame goes back to its source (source
/// address: its destination if unicast, else [`HOST_MAC`]), payload unchanged.
struct Reflector {
    stop: Arc<AtomicBool>,
    reflected: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<u64>,
}

impl Reflector {
    /// Starts reflecting on `wire`; returns once the socket is bound (frames already queue).
    fn start(wire: Wire) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let reflected = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), reflected.clone());
        let thread = std::thread::spawn(move || {
            let mut damaged = 0;
            while !s.load(Ordering::Relaxed) {
                let Some(mut f) = wire.recv(Duration::from_millis(100)) else { continue };
                if f.len() < 18 || &f[14..18] != MAGIC {
                    continue;
                }
                damaged += u64::from(intact_seq(&f).is_none());
                let (dst, src): ([u8; 6], [u8; 6]) = (f[..6].try_into().expect("6"), f[6..12].try_into().expect("6"));
                f[..6].copy_from_slice(&src);
                f[6..12].copy_from_slice(if dst[0] & 1 == 0 { &dst } else { &HOST_MAC });
                wire.send(&f);
                r.fetch_add(1, Ordering::Relaxed);
            }
            damaged
        });
        Self { stop, reflected, thread }
    }

    fn count(&self) -> u64 {
        self.reflected.load(Ordering::Relaxed)
    }

    /// Stops it; returns (frames reflected, damaged frames among them).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let damaged = self.thread.join().expect("reflector thread");
        (self.reflected.load(Ordering::Relaxed), damaged)
    }
}

/// A counter of the net service's exit line (`bulkhead-net[1]: stats tx_frames=...`).
fn stat(stderr: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("bulkhead-net[") && l.contains(" stats "))
        .unwrap_or_else(|| panic!("no stats line from bulkhead-net in:\n{stderr}"));
    let (_, stats) = line.split_once(" stats ").expect("stats");
    field(stats, "", key)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

#[test]
fn echo_through_a_host_reflector_counts_every_frame_both_ways() {
    const N: u64 = 2000;
    let _one = serialize();
    let ns = NetNs::new("echo");
    ns.add_tap("bh0");
    let reflector = Reflector::start(ns.run(|| Wire::open("bh0")));
    let dir = scratch("net-echo");
    let out = dir.join("serial.log");
    let net = format!("tap=bh0,mac={}", mac_str(&GUEST_MAC));
    let args = probe_vm_args(&out, None, &format!("probe.test=net-echo probe.n={N}"), &["--net", &net]);
    let t = Instant::now();
    let r = wait_bounded(ns.spawn(&mut bulkhead(&args)), LIMIT);
    let took = t.elapsed();
    let (reflected, damaged) = reflector.finish();
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains("probe: verdict pass (0)"), "{ctx}");
    let echo = "net-echo: sent=";
    assert!(serial.contains(&format!("net-echo: sent={N} received={N} lost=0 corrupt=0 dup=0 ")), "{ctx}");
    // Host → guest: every frame the guest got back was one the reflector sent.
    assert_eq!(reflected, N, "the reflector saw every frame the guest sent once:\n{ctx}");
    assert_eq!(damaged, 0, "guest → host frames arrived intact:\n{ctx}");
    assert!(r.stderr.contains(&format!("net0: TAP bh0, MAC {}", mac_str(&GUEST_MAC))), "{ctx}");
    // The service counted the same frames.
    assert_eq!(stat(&r.stderr, "tx_frames"), N, "{ctx}");
    assert_eq!(stat(&r.stderr, "tx_bytes"), N * 256, "{ctx}");
    let other = field(&serial, echo, "other");
    assert_eq!(stat(&r.stderr, "rx_frames"), N + other, "{ctx}");
    for k in ["tx_dropped", "tx_errors", "rx_dropped", "rx_bad_chains", "rx_errors"] {
        assert_eq!(stat(&r.stderr, k), 0, "{k}:\n{ctx}");
    }
    eprintln!("net-echo through a host reflector: {N} frames each way in {took:?} (whole VM run)");
}

#[test]
fn host_sent_frames_come_back_intact_from_a_reflecting_guest() {
    const K: u32 = 2000;
    const WINDOW: u32 = 32;
    let _one = serialize();
    let ns = NetNs::new("refl");
    ns.add_tap("bh0");
    let wire = ns.run(|| Wire::open("bh0"));
    let dir = scratch("net-reflect");
    let out = dir.join("serial.log");
    let net = format!("tap=bh0,mac={}", mac_str(&GUEST_MAC));
    let args = probe_vm_args(&out, None, &format!("probe.test=net-reflect probe.n={K}"), &["--net", &net]);
    let child = ns.spawn(&mut bulkhead(&args));
    // Frames sent before the driver is up would wait in the TAP; wait anyway, to time the run.
    assert!(wait_for_serial(&out, "net: mac=", Duration::from_secs(30)), "the guest's NIC never came up");
    // Every length from the minimum to a full frame, so padding or truncation would show.
    let len = |seq: u32| 60 + (seq as usize * 97) % (1514 - 60 + 1);
    let mut back = vec![false; K as usize];
    let (mut next, mut got, mut bytes) = (0u32, 0u32, 0u64);
    let t = Instant::now();
    while got < K {
        while next < K && next - got < WINDOW {
            wire.send(&test_frame(GUEST_MAC, HOST_MAC, next, len(next)));
            bytes += len(next) as u64;
            next += 1;
        }
        let Some(f) = wire.recv(Duration::from_secs(5)) else {
            let _ = wait_bounded(child, Duration::from_secs(1));
            panic!("no frame back for 5 s: {got} of {K} returned ({next} sent)");
        };
        let seq = intact_seq(&f).unwrap_or_else(|| panic!("damaged frame back ({} bytes): {f:02x?}", f.len()));
        assert!(seq < next, "sequence {seq} never sent");
        assert!(!back[seq as usize], "frame {seq} came back twice");
        let want = test_frame(HOST_MAC, GUEST_MAC, seq, len(seq));
        assert_eq!(f, want, "frame {seq}: addressed back to us from the guest, payload unchanged");
        back[seq as usize] = true;
        got += 1;
    }
    let took = t.elapsed();
    let r = wait_bounded(child, LIMIT);
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains("probe: verdict pass (0)"), "{ctx}");
    let line = "net-reflect: reflected=";
    assert_eq!(field(&serial, line, "reflected"), u64::from(K), "{ctx}");
    assert_eq!(field(&serial, line, "dropped"), 0, "{ctx}");
    let other = field(&serial, line, "other");
    assert_eq!(stat(&r.stderr, "rx_frames"), u64::from(K) + other, "{ctx}");
    assert_eq!(stat(&r.stderr, "tx_frames"), u64::from(K), "{ctx}");
    assert_eq!(stat(&r.stderr, "tx_bytes"), bytes, "{ctx}");
    for k in ["tx_dropped", "tx_errors", "rx_dropped", "rx_bad_chains", "rx_errors"] {
        assert_eq!(stat(&r.stderr, k), 0, "{k}:\n{ctx}");
    }
    // No more frames after the K: nothing duplicated late.
    assert!(wire.recv(Duration::from_millis(200)).is_none(), "a frame after all {K} came back");
    eprintln!("host → guest → host: {K} frames ({bytes} bytes each way, 60..=1514 bytes) in {took:?}");
}

/// Deletes a namespace the example script was asked to create, if the script left it behind.
struct ScriptNs(String);

impl Drop for ScriptNs {
    fn drop(&mut self) {
        let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
        if String::from_utf8_lossy(&listed).lines().any(|l| l.split_whitespace().next() == Some(&self.0)) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
}

fn namespace_exists(name: &str) -> bool {
    Path::new("/var/run/netns").join(name).exists()
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("examples").join(name)
}

#[test]
fn two_vms_on_a_bridge_made_by_the_example_script() {
    const N: u64 = 1000;
    let _one = serialize();
    let name = format!("bh-vm2vm-{}", std::process::id());
    let guard = ScriptNs(name.clone());
    assert!(!namespace_exists(&name));
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(example("vm-to-vm.sh"))
        .arg(&name)
        .env("BULKHEAD", bin_dir().join("bulkhead"))
        .env("BULKHEAD_PROBE", probe())
        .env("FRAMES", N.to_string())
        .env("TIMEOUT", "60")
        .output()
        .expect("run examples/vm-to-vm.sh");
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{ctx}");
    let (a, b) = stdout.split_once("=== VM B serial ===").unwrap_or_else(|| panic!("no VM B section:\n{ctx}"));
    assert!(a.contains("=== VM A serial ==="), "{ctx}");
    // A reflected exactly B's frames; B got every one back, intact, from A's MAC.
    assert_eq!(field(a, "net-reflect: reflected=", "reflected"), N, "{ctx}");
    assert!(a.contains("net: mac=02:b4:de:00:00:0a"), "{ctx}");
    assert!(b.contains("net-echo: n=1000 size=256 peer=02:b4:de:00:00:0a"), "{ctx}");
    assert!(b.contains(&format!("net-echo: sent={N} received={N} lost=0 corrupt=0 ")), "{ctx}");
    assert_eq!(a.matches("probe: verdict pass (0)").count() + b.matches("probe: verdict pass (0)").count(), 2);
    assert!(stdout.contains("vm-to-vm: both VMs passed"), "{ctx}");
    assert!(!namespace_exists(&name), "the script removes its namespace:\n{ctx}");
    drop(guard);
    eprintln!("vm-to-vm.sh: {N} frames B → A → B over a bridge, script end to end {took:?}");
}

#[test]
fn the_example_script_refuses_an_existing_namespace_and_explains_itself() {
    let _one = serialize();
    let ns = NetNs::new("taken");
    let out = Command::new("bash")
        .arg(example("vm-to-vm.sh"))
        .arg(ns.name())
        .env("BULKHEAD", bin_dir().join("bulkhead"))
        .env("BULKHEAD_PROBE", probe())
        .output()
        .expect("run examples/vm-to-vm.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(namespace_exists(ns.name()), "someone else's namespace is left alone");
    let help = Command::new("bash").arg(example("vm-to-vm.sh")).arg("-h").output().expect("run -h");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("Usage: vm-to-vm.sh"));
}

/// 100 pauses and resumes through the API while the guest echoes frames through a host
/// reflector: while paused, the frames in flight wait in the TAP and the rings; none is lost,
/// duplicated or damaged, and the guest finishes.
#[test]
fn hundred_pauses_during_echo_lose_no_frame() {
    const N: u64 = 600_000;
    let _one = serialize();
    let ns = NetNs::new("pause");
    ns.add_tap("bh0");
    let reflector = Reflector::start(ns.run(|| Wire::open("bh0")));
    let dir = scratch("net-pause");
    let (out, sock) = (dir.join("serial.log"), dir.join("api.sock"));
    let net = format!("tap=bh0,mac={}", mac_str(&GUEST_MAC));
    let cmdline = format!("probe.test=net-echo probe.n={N} probe.max_loss=0");
    let args = probe_vm_args(&out, None, &cmdline, &["--net", &net, "--api-sock", s(&sock)]);
    let child = ns.spawn(&mut bulkhead(&args));
    assert!(wait_until(Duration::from_secs(30), || reflector.count() >= 500), "traffic never started");
    let at_start = reflector.count();
    for i in 0..100 {
        for state in ["Paused", "Resumed"] {
            let body = format!(r#"{{"state": "{state}"}}"#);
            let a = vmm_core::api_client::request(&sock, "PATCH", "/vm", Some(&body), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("cycle {i} {state}: {}", vmm_core::vmm::chain(&e)));
            assert_eq!(a.status, 204, "cycle {i} {state}: {}", a.body);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let during = reflector.count() - at_start;
    let r = wait_bounded(child, LIMIT);
    let (reflected, damaged) = reflector.finish();
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains(&format!("net-echo: sent={N} received={N} lost=0 corrupt=0 dup=0 ")), "{ctx}");
    assert_eq!(damaged, 0, "{ctx}");
    assert_eq!(reflected, N, "the reflector saw every frame once:\n{ctx}");
    assert_eq!(r.stderr.matches("VM paused").count(), 100, "{ctx}");
    assert!(during > 0, "the guest echoed between the pauses");
    eprintln!("100 pause/resume cycles: {during} frames echoed during them, {N} in all, none lost");
}

#[test]
fn net_service_killed_during_echo_is_restarted_and_the_guest_finishes() {
    const N: u64 = 40_000;
    const MAX_LOSS: u64 = 64; // one window: the frames in flight when the service dies
    let _one = serialize();
    let ns = NetNs::new("kill");
    ns.add_tap("bh0");
    let reflector = Reflector::start(ns.run(|| Wire::open("bh0")));
    let dir = scratch("net-kill");
    let out = dir.join("serial.log");
    let net = format!("tap=bh0,mac={}", mac_str(&GUEST_MAC));
    let cmdline = format!("probe.test=net-echo probe.n={N} probe.max_loss={MAX_LOSS}");
    let args = probe_vm_args(&out, None, &cmdline, &["--net", &net]);
    let child = ns.spawn(&mut bulkhead(&args));
    let core = child.id();
    assert!(wait_until(Duration::from_secs(30), || reflector.count() >= 3000), "traffic never started");
    let first = service_child(core, "bulkhead-net").expect("net service child");
    let at_kill = reflector.count();
    // SAFETY: kill(2) has no memory-safety preconditions; `first.pid` is our child's child.
    assert_eq!(unsafe { libc::kill(i32::try_from(first.pid).expect("pid"), libc::SIGKILL) }, 0);
    let t = Instant::now();
    let r = wait_bounded(child, LIMIT);
    let after = t.elapsed();
    let (reflected, damaged) = reflector.finish();
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains("probe: verdict pass (0)"), "{ctx}");
    let line = "net-echo: sent=";
    assert_eq!(field(&serial, line, "sent"), N, "{ctx}");
    assert_eq!(field(&serial, line, "corrupt"), 0, "{ctx}");
    let lost = field(&serial, line, "lost");
    assert!(lost <= MAX_LOSS, "{ctx}");
    assert_eq!(damaged, 0, "{ctx}");
    assert!(reflected >= N - lost && reflected > at_kill + 1000, "traffic went on after the restart:\n{ctx}");
    let deaths: Vec<&str> = r.stderr.lines().filter(|l| l.contains(&format!("(pid {})", first.pid))).collect();
    assert!(deaths.iter().any(|l| l.contains("ERROR") && l.contains("restarting")), "{ctx}");
    assert_eq!(r.stderr.matches("service net-net0 restarted as pid").count(), 1, "{ctx}");
    assert!(r.stderr.contains(": 1 restarts"), "metrics on exit:\n{ctx}");
    eprintln!(
        "net service killed after {at_kill} frames reflected: restarted once; lost {lost} of {N}, \
         {reflected} reflected, guest done {after:?} after the kill"
    );
}

#[test]
fn bad_net_arguments_fail_before_any_vm_starts() {
    let _one = serialize();
    let ns = NetNs::new("bad");
    let dir = scratch("net-bad");
    let out = dir.join("serial.log");
    // A service directory with the console but no bulkhead-net.
    let services = dir.join("services");
    std::fs::create_dir_all(&services).expect("mkdir");
    std::os::unix::fs::symlink(bin_dir().join("bulkhead-console"), services.join("bulkhead-console")).expect("link");
    let cases: [(&[&str], i32, &str); 5] = [
        (&["--net", "tap="], 2, "bad TAP name"),
        (&["--net", "tap=bhbad", "--net", "tap=bhbad,mac=02:00:00:00:00:09"], 78, "used by two network interfaces"),
        (&["--net", "mac=zz"], 2, "bad MAC address `zz`"),
        (&["--net", "tap=bhbad,mac=01:00:00:00:00:01"], 2, "--net"),
        (&["--net", "tap=bhbad", "--service-dir", s(&services)], 78, "bulkhead-net not found"),
    ];
    for (extra, code, says) in cases {
        let _ = std::fs::remove_file(&out);
        let args = probe_vm_args(&out, None, "probe.test=hello", extra);
        let r = wait_bounded(ns.spawn(&mut bulkhead(&args)), Duration::from_secs(20));
        let ctx = format!("{extra:?}\nstderr:\n{}", r.stderr);
        assert_eq!(r.status.code(), Some(code), "{ctx}");
        let errors: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "one error line:\n{ctx}");
        assert!(errors[0].contains(says), "{ctx}");
        assert!(!r.stderr.contains("service console started"), "no service started:\n{ctx}");
        assert!(!out.exists(), "no guest console:\n{ctx}");
        assert!(!ns.has_link("bhbad"), "no TAP created:\n{ctx}");
    }
}

/// Two NICs and a disk in one VM: each NIC gets its own window, GSI, MAC and service process,
/// after the disk's; the guest finds the second NIC with the MAC given for it, and its frames go
/// out on the second TAP only.
#[test]
fn two_nics_in_one_vm_each_get_their_own_slot_mac_and_service() {
    const N: u64 = 200;
    let _one = serialize();
    let ns = NetNs::new("two");
    ns.add_tap("bha");
    ns.add_tap("bhb");
    let quiet = Reflector::start(ns.run(|| Wire::open("bha")));
    let reflector = Reflector::start(ns.run(|| Wire::open("bhb")));
    let dir = scratch("net-two");
    let out = dir.join("serial.log");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).expect("create").set_len(1 << 20).expect("size");
    let second = [0x02, 0xb4, 0x00, 0x00, 0x00, 0xbb];
    let (a, b) = ("tap=bha,mac=02:b4:00:00:00:aa,id=a".to_string(), format!("tap=bhb,mac={},id=b", mac_str(&second)));
    let cmdline = format!("probe.test=net-echo probe.net=1 probe.n={N}");
    let args = probe_vm_args(&out, Some(&disk), &cmdline, &["--net", &a, "--net", &b]);
    let r = wait_bounded(ns.spawn(&mut bulkhead(&args)), LIMIT);
    let (on_b, damaged) = reflector.finish();
    let (on_a, _) = quiet.finish();
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains(&format!("net: mac={}", mac_str(&second))), "the guest found the second NIC:\n{ctx}");
    assert!(serial.contains(&format!("net-echo: sent={N} received={N} lost=0 corrupt=0 ")), "{ctx}");
    assert_eq!((on_b, damaged, on_a), (N, 0, 0), "frames went out on the second TAP only:\n{ctx}");
    // Slots in order: the disk, then the NICs.
    for (what, base, gsi) in
        [("disk0:", "0xd0000000", 5), ("net0: TAP bha", "0xd0001000", 6), ("net1: TAP bhb", "0xd0002000", 7)]
    {
        let line = r.stderr.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no `{what}` line:\n{ctx}"));
        assert!(line.contains(&format!("at {base} (GSI {gsi})")), "{line}");
    }
    let pid_of = |name: &str| {
        r.stderr
            .lines()
            .find_map(|l| {
                l.split(&format!("service {name} started as pid ")).nth(1)?.split(' ').next()?.parse::<u32>().ok()
            })
            .unwrap_or_else(|| panic!("no start line for {name}:\n{ctx}"))
    };
    assert_ne!(pid_of("net-a"), pid_of("net-b"), "one process per NIC");
}

/// Past its restart cap the net device is failed for good: its last instance presents
/// DEVICE_NEEDS_RESET to the guest (the net handler passes `enter_failed` on to its transport),
/// as its live state shows, and the VM runs on.
#[test]
fn net_past_its_cap_presents_needs_reset() {
    let _one = serialize();
    let ns = NetNs::new("netcap");
    ns.add_tap("bh0");
    let dir = scratch("net-cap");
    let out = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let net = format!("tap=bh0,mac={}", mac_str(&GUEST_MAC));
    let extra = [
        "--net",
        &net,
        "--restart-max",
        "1/60",
        "--restart-burst",
        "1000/1",
        "--fault",
        "net:kill,after=500ms,every=300ms,count=2",
    ];
    let mut args = probe_vm_args(&out, None, "probe.test=idle", &extra);
    args.extend(["--api-sock".into(), sock.clone().into_os_string()]);
    let mut child = ns.spawn(&mut bulkhead(&args));
    let net_state = || -> Result<serde_json::Value, String> {
        let (st, b) = curl(&sock, "GET", "/bulkhead/devices/net0/state", None);
        if st != 200 {
            return Err(format!("{st} {b}"));
        }
        serde_json::from_str(&b).map_err(|e| format!("{e}: {b}"))
    };
    let needs_reset =
        |v: &serde_json::Value| v["report"]["device"]["Virtio"]["status"].as_u64().is_some_and(|s| s & 0x40 != 0);
    let failed = wait_until(Duration::from_secs(30), || net_state().is_ok_and(|v| needs_reset(&v)));
    let (_, devices) = curl(&sock, "GET", "/bulkhead/devices", None);
    let last = net_state();
    let _ = child.kill();
    let _ = child.wait();
    assert!(failed, "the net device never showed DEVICE_NEEDS_RESET: {last:?}\n{devices}");
    let all: serde_json::Value = serde_json::from_str(&devices).expect("json");
    let nic = all.as_array().and_then(|a| a.iter().find(|d| d["id"] == "net0")).expect("net0").clone();
    assert_eq!(nic["state"], "failed", "{devices}");
    assert!(nic["failed"].as_str().is_some_and(|f| f.contains("restart cap reached")), "{devices}");
    let console = all.as_array().and_then(|a| a.iter().find(|d| d["id"] == "console")).expect("console").clone();
    assert_eq!(console["state"], "serving", "the rest of the VM runs on: {devices}");
}
