//! The network part of `cargo xtask bench` (`--only net`): the probe guest's `net-bench` through
//! Bulkhead (`bulkhead run --net tap=...`, the device in its own `bulkhead-net` process) against
//! QEMU microvm's built-in virtio-net on the same TAP (`vhost=off`, and `vhost=on` when
//! `/dev/vhost-net` exists) and Firecracker's virtio-net (in its VMM thread; when
//! `../shared/peers/firecracker` or `$BULKHEAD_FIRECRACKER` is there, else its column is left out
//! and stderr says so). Everything happens in a network namespace of our own, created for the
//! benchmark and deleted afterwards, holding one persistent TAP (with a virtio-net header) that
//! every peer attaches to in turn; Firecracker's config and log files go to `target/bench-net`,
//! removed afterwards.
//!
//! Each run boots the probe once per peer and frame size. **TX**: the guest sends `n` frames into
//! the TAP; nothing reads them on the host side, so the kernel counts them in the TAP's
//! `rx_packets` and drops them (the count is checked against the guest's). **RX**: once the guest
//! printed its TX line, a generator thread inside the namespace sends frames of the probe's
//! format to the guest's MAC through an `AF_PACKET` socket bound to the TAP (`sendmmsg`, 64
//! frames a call, no qdisc) as fast as it can until the guest printed its RX line; the TAP drops
//! what the VMM does not read in time (`tx_dropped`). Rates are the guest's own (TSC, with
//! `probe.tsc_khz`).
//!
//! CPU per frame: frames moved = the TAP's `rx_packets` + `tx_packets` during the run (every
//! frame the VMM wrote or read). Bulkhead: the `bulkhead-net` service's CPU time (the core's exit
//! log line, from `/proc/PID/schedstat`) and all of Bulkhead's processes (`wait4` rusage: core,
//! vCPU thread and reaped services). QEMU and Firecracker: their threads other than the vCPU
//! (QEMU's `CPU 0/KVM`, Firecracker's `fc_vcpu 0`; sampled from `/proc/PID/task/*/schedstat`
//! every 10 ms; with `vhost=on` the kernel's vhost worker does the copying and is not counted;
//! Firecracker's device work is in its VMM thread, which is counted) and the whole process
//! (`wait4` rusage). The whole-process figures include the vCPU thread, where the probe
//! busy-polls its rings, so they are upper bounds.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::bench_blk::median;
use crate::netns::NetNs;
use crate::proc_cpu::{drain, reap, ThreadCpu};
use crate::util::BoxError;

/// EtherType of the probe's test frames (IEEE local experimental).
const ETHERTYPE: u16 = 0x88b5;
/// The guest's MAC, on every peer.
const GUEST_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
/// Where the guest sends its TX frames, and the source of the generator's frames: a unicast
/// address nobody owns, so the host drops the guest's frames without delivering them anywhere.
const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x02];
/// The TAP inside the namespace.
const TAP: &str = "bhnb0";
/// Prefix of our namespaces' names (`bhnb-<pid>`).
const NS_PREFIX: &str = "bhnb-";
/// Frames per `sendmmsg` call.
const BATCH: usize = 64;
/// The generator's pause when the TAP's queue is full.
const BACKOFF: Duration = Duration::from_micros(100);
/// The TAP's queue towards the VMM, in frames.
const TAP_QUEUE: &str = "1000";
/// Distinct frames the generator cycles through.
const DISTINCT: usize = 256;
/// Longest a single VMM run may take.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The guest's memory in MiB (QEMU's `-m 128`, Bulkhead's default).
const MEM_MIB: u64 = 128;

/// The peers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    /// `bulkhead run --net tap=...`.
    Bulkhead,
    /// QEMU microvm, virtio-net-device on the TAP in QEMU's main loop (`vhost=off`).
    Qemu,
    /// QEMU microvm with the kernel's vhost-net (`vhost=on`).
    QemuVhost,
    /// Firecracker (`../shared/peers/firecracker`), its virtio-net in its VMM thread.
    Firecracker,
}

impl Peer {
    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            Self::Bulkhead => "bulkhead",
            Self::Qemu => "QEMU vhost=off",
            Self::QemuVhost => "QEMU vhost=on",
            Self::Firecracker => "Firecracker",
        }
    }
}

/// One direction's figures as the guest printed them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phase {
    /// Frames counted.
    pub frames: u64,
    /// Frames per second.
    pub fps: u64,
    /// MiB per second.
    pub mibps: u64,
}

/// Parses the `net-bench: tx ...` and `net-bench: rx ...` lines; `None` for a missing one.
pub fn parse_net_bench(out: &str) -> (Option<Phase>, Option<Phase>) {
    let (mut tx, mut rx) = (None, None);
    for line in out.lines() {
        let Some(rest) = line.trim().strip_prefix("net-bench:") else { continue };
        let mut words = rest.split_whitespace();
        let slot = match words.next() {
            Some("tx") => &mut tx,
            Some("rx") => &mut rx,
            _ => continue,
        };
        let mut p = Phase::default();
        for kv in words {
            match kv.split_once('=') {
                Some(("frames", v)) => p.frames = v.parse().unwrap_or(0),
                Some(("fps", v)) => p.fps = v.parse().unwrap_or(0),
                Some(("mibps", v)) => p.mibps = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        *slot = Some(p);
    }
    (tx, rx)
}

/// FNV-1a 32 over `bytes`, continuing from `h`.
fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// A test frame in the probe's format (guests/probe/src/suite/net_common.rs): Ethernet II,
/// EtherType 0x88b5; payload magic `BKNT`, sequence, payload length, checksum (FNV-1a 32 over
/// payload bytes 16.. then 0..12), fill bytes `(j * 7 + 0x5a) & 0xff`. `size` ≥ 30.
pub fn build_frame(dst: [u8; 6], src: [u8; 6], seq: u32, size: usize) -> Vec<u8> {
    let plen = size.saturating_sub(14).max(16);
    let mut f = Vec::with_capacity(14 + plen);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    let mut p = vec![0u8; plen];
    p[0..4].copy_from_slice(b"BKNT");
    p[4..8].copy_from_slice(&seq.to_le_bytes());
    p[8..12].copy_from_slice(&u32::try_from(plen).unwrap_or(u32::MAX).to_le_bytes());
    for (j, b) in p.iter_mut().enumerate().skip(16) {
        *b = u8::try_from((j * 7 + 0x5a) & 0xff).unwrap_or(0);
    }
    let csum = fnv1a(fnv1a(0x811c_9dc5, &p[16..]), &p[..12]);
    p[12..16].copy_from_slice(&csum.to_le_bytes());
    f.extend_from_slice(&p);
    f
}

/// The benchmark's namespace: `bhnb-<pid>` with IPv6 off and a persistent TAP.
fn bench_netns() -> Result<NetNs, BoxError> {
    let ns = NetNs::new(NS_PREFIX)?;
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
    ns.ip(&["link", "set", TAP, "txqueuelen", TAP_QUEUE, "up"])?;
    Ok(ns)
}

/// The TAP's counters; fails if the TAP is not up (it would not accept the guest's frames).
fn counters(ns: &NetNs) -> Result<TapCounters, BoxError> {
    let d = format!("/sys/class/net/{TAP}");
    let files = ["flags", "statistics/rx_packets", "statistics/tx_packets", "statistics/tx_dropped"]
        .map(|f| format!("{d}/{f}"));
    let mut args = vec!["cat"];
    args.extend(files.iter().map(String::as_str));
    let out = ns.exec(&args)?;
    let v: Vec<&str> = out.split_whitespace().collect();
    let [flags, rx, tx, drop] = v.as_slice() else {
        return Err(format!("unexpected TAP counters: {out:?}").into());
    };
    let flags = u64::from_str_radix(flags.trim_start_matches("0x"), 16)?;
    if flags & 1 == 0 {
        return Err(format!("{TAP} is not up (flags {flags:#x})").into());
    }
    Ok(TapCounters { rx_packets: rx.parse()?, tx_packets: tx.parse()?, tx_dropped: drop.parse()? })
}

/// Counters of the TAP's host side: `rx` = frames the VMM wrote (the guest's TX), `tx` = frames
/// the VMM read (the guest's RX).
#[derive(Debug, Clone, Copy, Default)]
struct TapCounters {
    rx_packets: u64,
    tx_packets: u64,
    tx_dropped: u64,
}

/// What the generator did.
#[derive(Debug, Clone, Copy, Default)]
struct GenStats {
    sent: u64,
    /// Sends refused because the TAP's queue was full (each followed by a back-off).
    full: u64,
    elapsed: Duration,
}

/// An `AF_PACKET` socket bound to `iface`, sending only (protocol 0: it receives nothing),
/// bypassing the qdisc. Must be called on a thread inside the TAP's namespace.
fn packet_socket(iface: &str) -> Result<OwnedFd, BoxError> {
    let cname = std::ffi::CString::new(iface)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {iface}: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket(AF_PACKET): {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: `fd` is a fresh descriptor we own; OwnedFd closes it exactly once.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value that we fill in below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET)?;
    addr.sll_protocol = 0;
    addr.sll_ifindex = i32::try_from(index)?;
    let addr_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())?;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
    let rc = unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), addr_len) };
    if rc != 0 {
        return Err(format!("bind AF_PACKET to {iface}: {}", std::io::Error::last_os_error()).into());
    }
    for (opt, val) in [(libc::PACKET_QDISC_BYPASS, 1i32), (libc::SO_SNDBUF, 8 << 20)] {
        let level = if opt == libc::SO_SNDBUF { libc::SOL_SOCKET } else { libc::SOL_PACKET };
        let len = libc::socklen_t::try_from(std::mem::size_of::<i32>())?;
        // SAFETY: `val` is a live i32 and the length passed is its size.
        let rc =
            unsafe { libc::setsockopt(sock.as_raw_fd(), level, opt, (&raw const val).cast::<libc::c_void>(), len) };
        if rc != 0 {
            return Err(format!("setsockopt {opt}: {}", std::io::Error::last_os_error()).into());
        }
    }
    Ok(sock)
}

/// Sends frames of `size` bytes to the guest as fast as possible until `stop` is set or `limit`
/// passed. Runs on a thread inside the namespace.
fn generate(size: usize, stop: &AtomicBool, limit: Duration) -> Result<GenStats, BoxError> {
    let sock = packet_socket(TAP)?;
    let frames: Vec<Vec<u8>> =
        (0..DISTINCT).map(|i| build_frame(GUEST_MAC, PEER_MAC, u32::try_from(i).unwrap_or(0), size)).collect();
    let mut iovs: Vec<libc::iovec> =
        frames.iter().map(|f| libc::iovec { iov_base: f.as_ptr().cast_mut().cast(), iov_len: f.len() }).collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr is plain data; all-zero (no name, no control) is valid.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = std::ptr::from_mut(iov);
            hdr.msg_iovlen = 1;
            libc::mmsghdr { msg_hdr: hdr, msg_len: 0 }
        })
        .collect();
    let batch_len = libc::c_uint::try_from(BATCH)?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut full = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        let batch = &mut msgs[next..next + BATCH];
        // SAFETY: `batch` holds BATCH valid mmsghdrs whose iovecs point into `frames`, which
        // outlive the call; the kernel only reads the buffers and writes msg_len.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), batch.as_mut_ptr(), batch_len, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The TAP's queue is full (the frame was dropped): the VMM is the bottleneck.
                // Back off briefly instead of spinning: on 2 CPUs a spinning generator would take
                // the CPU the VMM needs to drain the queue.
                Some(libc::ENOBUFS | libc::EAGAIN) => {
                    full += 1;
                    std::thread::sleep(BACKOFF);
                    continue;
                }
                Some(libc::EINTR) => continue,
                _ => return Err(format!("generator: sendmmsg: {e}").into()),
            }
        }
        sent += u64::try_from(n).unwrap_or(0);
        next = (next + BATCH) % DISTINCT;
    }
    Ok(GenStats { sent, full, elapsed: start.elapsed() })
}

/// The outcome of one VMM run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunResult {
    /// The guest's TX figures.
    pub tx: Phase,
    /// The guest's RX figures.
    pub rx: Phase,
    /// Frames moved through the TAP (host rx + tx packets).
    pub frames_moved: u64,
    /// The device's CPU time in ns: `bulkhead-net`, or QEMU's or Firecracker's non-vCPU threads.
    pub device_cpu_ns: Option<u64>,
    /// Of `device_cpu_ns`, bulkhead-net's idle spin waiting for work (wall time).
    pub device_spin_ns: Option<u64>,
    /// The whole VMM's CPU time in ns (`wait4` rusage, user + system).
    pub process_cpu_ns: u64,
    /// Frames the generator got into the TAP per second while it ran.
    pub gen_fps: u64,
    /// Times the generator found the TAP's queue full (proof the VMM was the bottleneck).
    pub gen_full: u64,
    /// Frames the TAP dropped towards the VMM (it did not read them in time).
    pub tap_dropped: u64,
    /// Bulkhead: the net service's `(forwarded, mirrored)` exits.
    pub exits: Option<(u64, u64)>,
}

/// Where the runs happen: the namespace with the TAP, and Firecracker's binary (if there) and the
/// directory for its config and log files.
struct Site<'a> {
    ns: &'a NetNs,
    fc: Option<&'a Path>,
    dir: &'a Path,
}

/// One benchmark configuration.
pub struct NetRun<'a> {
    /// `bulkhead` and services.
    pub bin: &'a Path,
    /// The probe guest.
    pub probe: &'a Path,
    /// TX frames.
    pub tx_n: u64,
    /// RX frames.
    pub rx_n: u64,
    /// TSC kHz for the guest's rates.
    pub tsc_khz: u64,
}

/// The command that boots the probe's net-bench under `peer` inside the namespace
/// (`nsenter --net=... ...`, which execs: the child's pid is the VMM's).
fn command_for(peer: Peer, r: &NetRun<'_>, site: &Site<'_>, size: usize) -> Result<Command, BoxError> {
    let mac = PEER_MAC.map(|b| format!("{b:02x}")).join(":");
    let cmdline = format!(
        "probe.test=net-bench probe.n={} probe.size={size} probe.rx_n={} probe.peer={mac} probe.tsc_khz={} probe.timeout_ms=3000",
        r.tx_n, r.rx_n, r.tsc_khz
    );
    let guest_mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let inner = match peer {
        Peer::Bulkhead => {
            let mut c = Command::new(r.bin.join("bulkhead"));
            c.args(["run", "--serial-input", "none", "--log-level", "info", "--kernel"])
                .arg(r.probe)
                .arg("--net")
                .arg(format!("tap={TAP},mac={guest_mac}"))
                .args(["--cmdline", &cmdline]);
            c
        }
        Peer::Qemu | Peer::QemuVhost => {
            let vhost = if peer == Peer::QemuVhost { "on" } else { "off" };
            let mut c = Command::new("qemu-system-x86_64");
            c.args(crate::util::QEMU_MICROVM_PROBE)
                // Names the vCPU thread `CPU 0/KVM`, so its CPU time can be told apart.
                .args(["-name", "probe,debug-threads=on", "-netdev"])
                .arg(format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}"))
                .args(["-device", &format!("virtio-net-device,netdev=n0,mac={guest_mac}"), "-kernel"])
                .arg(r.probe)
                .args(["-append", &cmdline]);
            c
        }
        Peer::Firecracker => {
            let fc = site.fc.ok_or("Firecracker not found")?;
            crate::bench_api::firecracker_command(
                fc,
                site.dir,
                "bench-net",
                r.probe,
                &cmdline,
                MEM_MIB,
                None,
                Some((TAP, &guest_mac)),
            )?
        }
    };
    Ok(site.ns.command(&inner))
}

/// `service net-... (pid N): ... cpu 12.3 ms, idle spin 4.5 ms` in the core's log: the net
/// service's CPU and idle spin in ns.
pub fn net_service_cpu_ns(stderr: &str) -> Option<(u64, Option<u64>)> {
    crate::util::service_cpu(stderr, "net-")
}

/// Boots the probe's net-bench under `peer` with `size`-byte frames both ways.
fn run_peer(peer: Peer, r: &NetRun<'_>, site: &Site<'_>, size: usize) -> Result<RunResult, BoxError> {
    let ns = site.ns;
    let before = counters(ns)?;
    let mut child: Child = command_for(peer, r, site, size)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.label()))?;
    let pid = child.id();
    let cpid = libc::pid_t::try_from(pid)?;
    let (line_tx, line_rx) = mpsc::channel();
    let out_reader = drain(child.stdout.take().ok_or("no stdout")?, Some(line_tx));
    let err_reader = drain(child.stderr.take().ok_or("no stderr")?, None);
    let stop = Arc::new(AtomicBool::new(false));
    let mut generator: Option<std::thread::JoinHandle<Result<GenStats, String>>> = None;
    let mut threads = ThreadCpu::default();
    let start = Instant::now();
    let (status, process_cpu_ns) = loop {
        match line_rx.recv_timeout(Duration::from_millis(10)) {
            Ok(line) if line.starts_with("net-bench: tx") && generator.is_none() => {
                let (stop, path) = (Arc::clone(&stop), ns.path());
                generator = Some(std::thread::spawn(move || {
                    crate::netns::enter(&path).map_err(|e| e.to_string())?;
                    generate(size, &stop, RUN_LIMIT).map_err(|e| e.to_string())
                }));
            }
            Ok(line) if line.starts_with("net-bench: rx") || line.starts_with("probe: verdict") => {
                stop.store(true, Ordering::Relaxed);
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if peer != Peer::Bulkhead {
            threads.sample(pid);
        }
        if let Some(done) = reap(cpid, false)? {
            break done;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            stop.store(true, Ordering::Relaxed);
            let _ = reap(cpid, true);
            return Err(format!("{} still running after {RUN_LIMIT:?}", peer.label()).into());
        }
    };
    stop.store(true, Ordering::Relaxed);
    let gen = match generator {
        Some(g) => Some(g.join().map_err(|_| "generator panicked")??),
        None => None,
    };
    let stdout = out_reader.join().map_err(|_| "stdout reader panicked")?;
    let stderr = err_reader.join().map_err(|_| "stderr reader panicked")?;
    let after = counters(ns)?;
    let code = if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None };
    // Bulkhead exits with the probe's verdict (0 = pass); QEMU's isa-debug-exit with (v << 1) | 1.
    // Firecracker drops the probe's verdict port; its i8042 reset ends it with status 0, so the
    // verdict is the console line.
    let passed = match peer {
        Peer::Bulkhead => code == Some(0),
        Peer::Qemu | Peer::QemuVhost => code == Some(1),
        Peer::Firecracker => code == Some(0) && stdout.contains("probe: verdict pass"),
    };
    if !passed {
        return Err(format!(
            "{} net-bench ({size}-byte frames) failed (wait status {status:#x}):\n{stdout}\n{stderr}",
            peer.label()
        )
        .into());
    }
    let (tx, rx) = parse_net_bench(&stdout);
    let (tx, rx) = (tx.ok_or("no net-bench tx line")?, rx.ok_or("no net-bench rx line")?);
    let host_rx = after.rx_packets.saturating_sub(before.rx_packets);
    if host_rx < tx.frames {
        return Err(format!(
            "{}: the guest sent {} frames but the TAP received only {host_rx}",
            peer.label(),
            tx.frames
        )
        .into());
    }
    let exits = if peer == Peer::Bulkhead { crate::util::service_exits(&stderr, "net-") } else { None };
    let (device_cpu_ns, device_spin_ns) = if peer == Peer::Bulkhead {
        net_service_cpu_ns(&stderr).map_or((None, None), |(cpu, spin)| (Some(cpu), spin))
    } else {
        // Without a vCPU thread by name the split is unknown: report nothing rather than the
        // whole process under the device's name.
        (threads.non_vcpu_ns(), None)
    };
    // A rate in the millions at most: the float-to-int cast saturates and the fraction is noise.
    #[allow(clippy::cast_possible_truncation)]
    let gen_fps = gen.map_or(0, |g| (g.sent as f64 / g.elapsed.as_secs_f64().max(1e-9)) as u64);
    Ok(RunResult {
        tx,
        rx,
        frames_moved: host_rx + after.tx_packets.saturating_sub(before.tx_packets),
        device_cpu_ns,
        device_spin_ns,
        process_cpu_ns,
        gen_fps,
        gen_full: gen.map_or(0, |g| g.full),
        exits,
        tap_dropped: after.tx_dropped.saturating_sub(before.tx_dropped),
    })
}

/// The frame sizes measured.
pub const SIZES: [usize; 2] = [64, 1514];

/// Runs the network benchmark and prints its report.
pub fn bench(r: &NetRun<'_>, runs: usize) -> Result<(), BoxError> {
    crate::util::ensure_packages(&[("qemu-system-x86_64", "qemu-system-x86"), ("ip", "iproute2")])?;
    let mut peers = vec![Peer::Bulkhead, Peer::Qemu];
    if Path::new("/dev/vhost-net").exists() {
        peers.push(Peer::QemuVhost);
    } else {
        eprintln!("bench: net: /dev/vhost-net does not exist: skipping QEMU with vhost=on");
    }
    let fc: Option<PathBuf> = crate::bench_api::firecracker();
    if fc.is_some() {
        peers.push(Peer::Firecracker);
    } else {
        eprintln!(
            "bench: net: Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): its column is left out"
        );
    }
    let ns = bench_netns()?;
    // Fails early if the namespace cannot hold a packet socket on the TAP.
    ns.run(|| packet_socket(TAP).map(drop))?;
    let dir = crate::util::workspace_root().join("target/bench-net");
    std::fs::create_dir_all(&dir)?;
    let site = Site { ns: &ns, fc: fc.as_deref(), dir: &dir };
    let started = Instant::now();
    // (peer, size) -> results of every run.
    let measured = (|| -> Result<BTreeMap<(Peer, usize), Vec<RunResult>>, BoxError> {
        let mut results: BTreeMap<(Peer, usize), Vec<RunResult>> = BTreeMap::new();
        for i in 0..runs {
            for size in SIZES {
                for &peer in &peers {
                    let res = run_peer(peer, r, &site, size)?;
                    eprintln!(
                        "bench: net run {}/{runs} {size} B {}: tx {} fps, rx {} fps (generator: {} fps, queue full {} times; TAP dropped {})",
                        i + 1,
                        peer.label(),
                        res.tx.fps,
                        res.rx.fps,
                        res.gen_fps,
                        res.gen_full,
                        res.tap_dropped
                    );
                    results.entry((peer, size)).or_default().push(res);
                }
            }
        }
        Ok(results)
    })();
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    let results = measured?;
    let wall = started.elapsed();
    let med = |peer: Peer, size: usize, f: &dyn Fn(&RunResult) -> Option<u64>| -> u64 {
        let mut v: Vec<u64> = results.get(&(peer, size)).map_or_else(Vec::new, |rs| rs.iter().filter_map(f).collect());
        median(&mut v)
    };
    println!(
        "# net-bench: probe guest, one TAP in a private network namespace, {} frames TX then {} frames RX per boot \
         (host generator: AF_PACKET sendmmsg), {runs} interleaved runs, medians, {:.0} s",
        r.tx_n,
        r.rx_n,
        wall.as_secs_f64()
    );
    let others: Vec<Peer> = peers.iter().copied().filter(|&p| p != Peer::Bulkhead).collect();
    let mut head = String::from("| workload | unit | bulkhead |");
    for p in &others {
        head.push_str(&format!(" {} |", p.label()));
    }
    for p in &others {
        head.push_str(&format!(" bulkhead / {} |", p.label()));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(3 + 2 * others.len()));
    type Pick = fn(&RunResult) -> Option<u64>;
    let metrics: [(&str, &str, Pick); 4] = [
        ("tx", "frames/s", |x| Some(x.tx.fps)),
        ("tx", "MiB/s", |x| Some(x.tx.mibps)),
        ("rx", "frames/s", |x| Some(x.rx.fps)),
        ("rx", "MiB/s", |x| Some(x.rx.mibps)),
    ];
    // Peer -> its frames/s ratios (`tx-64 R`, ...) for the headline lines.
    let mut headlines: BTreeMap<Peer, Vec<String>> = BTreeMap::new();
    for size in SIZES {
        for (dir, unit, pick) in metrics {
            let b = med(Peer::Bulkhead, size, &pick);
            let mut row = format!("| {dir}-{size} | {unit} | {b} |");
            let vals: Vec<u64> = others.iter().map(|&p| med(p, size, &pick)).collect();
            for v in &vals {
                row.push_str(&format!(" {v} |"));
            }
            for (&p, &v) in others.iter().zip(&vals) {
                let ratio = if v == 0 { 0.0 } else { b as f64 / v as f64 };
                row.push_str(&format!(" {ratio:.2} |"));
                if unit == "frames/s" {
                    headlines.entry(p).or_default().push(format!("{dir}-{size} {ratio:.2}"));
                }
            }
            println!("{row}");
        }
    }
    println!();
    println!("# CPU time per frame moved (ns; frames = TAP rx + tx packets of the run; medians)");
    let mut head = String::from("| frame size | bulkhead-net | of which idle spin | bulkhead, all processes |");
    for p in &others {
        head.push_str(&format!(" {} non-vCPU threads | {} whole process |", p.label(), p.label()));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(4 + 2 * others.len()));
    for size in SIZES {
        let per = |x: &RunResult, ns: Option<u64>| ns.and_then(|n| n.checked_div(x.frames_moved));
        let mut row = format!(
            "| {size} B | {} | {} | {} |",
            med(Peer::Bulkhead, size, &|x| per(x, x.device_cpu_ns)),
            med(Peer::Bulkhead, size, &|x| per(x, x.device_spin_ns)),
            med(Peer::Bulkhead, size, &|x| per(x, Some(x.process_cpu_ns)))
        );
        for &p in &others {
            row.push_str(&format!(
                " {} | {} |",
                med(p, size, &|x| per(x, x.device_cpu_ns)),
                med(p, size, &|x| per(x, Some(x.process_cpu_ns)))
            ));
        }
        println!("{row}");
    }
    println!();
    println!("# bulkhead-net exits per 1000 frames moved (interrupt status reads, acks and set-up; medians)");
    println!("| frame size | forwarded round trips | answered from the read mirror |");
    println!("|---|---|---|");
    for size in SIZES {
        let per_k = |x: &RunResult, n: Option<u64>| n.and_then(|n| (n * 1000).checked_div(x.frames_moved));
        println!(
            "| {size} B | {} | {} |",
            med(Peer::Bulkhead, size, &|x| per_k(x, x.exits.map(|e| e.0))),
            med(Peer::Bulkhead, size, &|x| per_k(x, x.exits.map(|e| e.1)))
        );
    }
    for size in SIZES {
        let each: Vec<String> = peers
            .iter()
            .map(|&p| {
                format!(
                    "{}: {} frames/s, queue full {} times",
                    p.label(),
                    med(p, size, &|x| Some(x.gen_fps)),
                    med(p, size, &|x| Some(x.gen_full))
                )
            })
            .collect();
        println!("generator at {size} B (medians): {}", each.join("; "));
    }
    // The headlines: QEMU's main-loop virtio-net, and Firecracker's when it ran.
    for p in [Peer::Qemu, Peer::Firecracker] {
        if let Some(h) = headlines.get(&p) {
            println!("net frames/s ratio bulkhead / {}: {}", p.label(), h.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_matches_the_probe_format() {
        // Reference bytes from guests/probe/tools/net_peer.py's build().
        let f = build_frame(GUEST_MAC, PEER_MAC, 7, 64);
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "02bb0000000102bb0000000288b5424b4e54070000003200000034d3955ecad1d8dfe6edf4fb02\
             0910171e252c333a41484f565d646b727980878e959ca3aab1"
        );
        let f = build_frame(GUEST_MAC, PEER_MAC, 300, 1514);
        assert_eq!(f.len(), 1514);
        assert_eq!(f[26..30], [0x50, 0x3e, 0x73, 0xaf]);
        assert_eq!(f[1510..], [0x42, 0x49, 0x50, 0x57]);
    }

    #[test]
    fn parses_net_bench_lines() {
        let (tx, rx) = parse_net_bench(
            "probe: start\nnet-bench: tx frames=100000 bytes=151400000 cycles=7 fps=329824 mibps=476 kicks=670\n\
             net-bench: rx frames=5000 bytes=1 cycles=2 fps=120000 mibps=7 kicks=3 stale=256 other=0\n",
        );
        assert_eq!(tx, Some(Phase { frames: 100_000, fps: 329_824, mibps: 476 }));
        assert_eq!(rx, Some(Phase { frames: 5000, fps: 120_000, mibps: 7 }));
        assert_eq!(parse_net_bench("net-bench: tx aborted: x\n").0, Some(Phase::default()));
        assert_eq!(parse_net_bench("nothing\n"), (None, None));
    }

    #[test]
    fn finds_the_net_service_cpu() {
        let log = "bulkhead[1] 0.5s INFO  service console (pid 2): 951 exits forwarded, 0 rejected, 0 failures, cpu 65.0 ms\n\
                   bulkhead[1] 0.5s INFO  service net-net0 (pid 3): 57 exits forwarded, 0 rejected, 0 failures, cpu 299.7 ms\n";
        assert_eq!(net_service_cpu_ns(log), Some((299_700_000, None)));
        let log = "x INFO  service net-net0 (pid 8): 1 exits forwarded, 0 reads mirrored, 0 rejected, 0 failures, cpu 2.0 ms, idle spin 0.5 ms\n";
        assert_eq!(net_service_cpu_ns(log), Some((2_000_000, Some(500_000))));
        assert_eq!(net_service_cpu_ns("service net-net0 (pid 3): cpu n/a\n"), None);
    }
}
