//! Shared by the integration tests: start a service binary the way the core does (its end of the
//! control socket on fd 3, stdin/stdout on /dev/null), and small fd/number helpers.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipc::control::{
    BlockConfig, ControlMsg, DeviceConfig, FdRole, JailPlan, MemoryRegion, NetConfig, RateLimit, RingSetup,
    ServiceSetup, ServiceStats,
};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::{ControlChannel, CoreEndpoint, WaitConfig};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// Where a started service's stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StderrTo {
    /// The test's own stderr (its log shows in the test output).
    Inherit,
    /// /dev/null.
    Null,
    /// A pipe (to read its exit `stats` line).
    Pipe,
}

/// Starts `binary` with the child's end of a fresh control channel on fd 3 and `extra_args`;
/// returns the child and the core's end. `quiet` sends its stderr to /dev/null.
pub fn spawn_service(binary: &str, extra_args: &[&str], quiet: bool) -> (Child, ControlChannel) {
    spawn_with(binary, extra_args, if quiet { StderrTo::Null } else { StderrTo::Inherit })
}

/// Starts `binary` as [`spawn_service`] does, its stderr wired to `stderr`.
pub fn spawn_with(binary: &str, extra_args: &[&str], stderr: StderrTo) -> (Child, ControlChannel) {
    let (ctl, child_end) = ControlChannel::pair().expect("pair");
    let child_fd: OwnedFd = child_end.into_fd();
    let raw = child_fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(extra_args).stdin(Stdio::null()).stdout(Stdio::null());
    match stderr {
        StderrTo::Inherit => {}
        StderrTo::Null => {
            cmd.stderr(Stdio::null());
        }
        StderrTo::Pipe => {
            cmd.stderr(Stdio::piped());
        }
    }
    // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl) on fds that exist.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if raw == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(raw, 3) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
    drop(child_fd);
    (child, ctl)
}

/// Borrows the descriptor `fd` owns.
pub fn borrow(fd: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns the descriptor and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// The low 32 bits of `v`.
pub fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

// ---- Guest-side virtio helpers ----

/// Deadline of one register access.
pub const REG_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest RAM of `len` bytes at guest address 0, in a memfd (passed to the service as
/// `GuestMemory`) mapped here too.
pub fn guest_ram(len: usize) -> (OwnedFd, GuestMemoryMmap<()>) {
    let memfd =
        nix::sys::memfd::memfd_create(c"test-guest-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&memfd, i64::try_from(len).expect("len")).expect("truncate");
    let file = std::fs::File::from(memfd.try_clone().expect("dup"));
    let mem =
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::new(file, 0)))]).expect("map");
    (memfd, mem)
}

/// A fresh exit ring for one service instance.
pub fn exit_ring(name: &str) -> CoreEndpoint {
    CoreEndpoint::create(name, 16, WaitConfig::default()).expect("ring")
}

/// Sends `setup` with `fds` and waits (bounded) for `Ready` from `pid`.
pub fn send_setup(ctl: &ControlChannel, setup: ServiceSetup, fds: &[BorrowedFd<'_>], pid: u32) {
    ctl.send(&ControlMsg::Setup(Box::new(setup)), fds).expect("send setup");
    let (msg, _) = ctl.recv(Instant::now() + Duration::from_secs(10)).expect("ready");
    assert_eq!(msg, ControlMsg::Ready { pid });
}

/// The virtio-mmio register file of a device at `base`, reached through the exit ring.
pub struct MmioRegs<'a> {
    /// The core's end of the ring.
    pub core: &'a CoreEndpoint,
    /// Guest physical base of the window.
    pub base: u64,
}

impl MmioRegs<'_> {
    /// A register read of `len` (1, 2 or 4) bytes.
    pub fn read(&self, off: u64, len: u32) -> u32 {
        let r =
            self.core.call(&ExitRequest::read(ExitKind::MmioRead, self.base + off, len), REG_TIMEOUT).expect("read");
        assert_eq!(r.status, Status::Ok, "read {off:#x}/{len}");
        let mut b = [0u8; 4];
        let n = usize::try_from(len).expect("len");
        b[..n].copy_from_slice(&r.data[..n]);
        u32::from_le_bytes(b)
    }

    /// 32-bit register read.
    pub fn rd(&self, off: u64) -> u32 {
        self.read(off, 4)
    }

    /// 32-bit register write.
    pub fn wr(&self, off: u64, v: u32) {
        let req = ExitRequest::write(ExitKind::MmioWrite, self.base + off, &v.to_le_bytes()).expect("req");
        let r = self.core.call(&req, REG_TIMEOUT).expect("write");
        assert_eq!(r.status, Status::Ok, "write {off:#x}");
    }

    /// The 64 feature bits the device offers.
    pub fn features(&self) -> u64 {
        self.wr(0x14, 0);
        let lo = self.rd(0x10);
        self.wr(0x14, 1);
        let hi = self.rd(0x10);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// The start of a driver's initialisation: checks the magic and `device_id`, resets the
    /// device, sets ACKNOWLEDGE | DRIVER; returns the offered features.
    pub fn begin(&self, device_id: u32) -> u64 {
        assert_eq!(self.rd(0x000), 0x7472_6976, "magic");
        assert_eq!(self.rd(0x008), device_id, "device id");
        self.wr(0x070, 0);
        self.wr(0x070, 1 | 2);
        self.features()
    }

    /// Writes the driver's `features` and sets FEATURES_OK, which the device must accept.
    pub fn accept(&self, features: u64) {
        self.wr(0x24, 0);
        self.wr(0x20, lo32(features));
        self.wr(0x24, 1);
        self.wr(0x20, lo32(features >> 32));
        self.wr(0x070, 1 | 2 | 8);
        assert_ne!(self.rd(0x070) & 8, 0, "FEATURES_OK accepted");
    }

    /// Sets up queue `index` as `q` describes (it must not be ready yet, and `q.size` must fit)
    /// and makes it ready; the driver's side of `q` starts over.
    pub fn setup_queue(&self, index: u32, q: &mut GuestQueue) {
        self.wr(0x030, index);
        assert_eq!(self.rd(0x044), 0, "queue {index} not ready yet");
        assert!(self.rd(0x034) >= u32::from(q.size), "queue {index} max size");
        self.wr(0x038, u32::from(q.size));
        for (reg, addr) in [(0x080, q.desc), (0x090, q.avail), (0x0a0, q.used)] {
            self.wr(reg, lo32(addr));
            self.wr(reg + 4, lo32(addr >> 32));
        }
        self.wr(0x044, 1);
        q.next_avail = 0;
        q.used_seen = 0;
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        self.wr(0x070, 1 | 2 | 8 | 4);
    }

    /// A driver's initialisation: reset, negotiate exactly `features` (which must be offered),
    /// set up `queues` (index = queue number), DRIVER_OK.
    pub fn init(&self, device_id: u32, features: u64, queues: &mut [GuestQueue]) {
        let offered = self.begin(device_id);
        assert_eq!(offered & features, features, "features {features:#x} offered");
        self.accept(features);
        for (i, q) in queues.iter_mut().enumerate() {
            self.setup_queue(u32::try_from(i).expect("queue"), q);
        }
        self.driver_ok();
    }
}

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;

/// The driver's side of a split virtqueue in guest memory.
#[derive(Debug, Clone)]
pub struct GuestQueue {
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Queue size.
    pub size: u16,
    /// Next available index to publish.
    pub next_avail: u16,
    /// Used entries consumed so far.
    pub used_seen: u16,
}

impl GuestQueue {
    /// A queue of `size` entries with its three parts at the given addresses (zeroed here).
    pub fn new(mem: &GuestMemoryMmap<()>, desc: u64, avail: u64, used: u64, size: u16) -> Self {
        let n = usize::from(size);
        mem.write_slice(&vec![0u8; 16 * n], GuestAddress(desc)).expect("clear desc");
        mem.write_slice(&vec![0u8; 6 + 2 * n], GuestAddress(avail)).expect("clear avail");
        mem.write_slice(&vec![0u8; 6 + 8 * n], GuestAddress(used)).expect("clear used");
        Self::at(desc, avail, used, size)
    }

    /// A queue at the given addresses, memory left as it is (they need not even be in RAM).
    pub fn at(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Self { desc, avail, used, size, next_avail: 0, used_seen: 0 }
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, mem: &GuestMemoryMmap<()>, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).expect("addr");
        mem.write_obj(len, GuestAddress(at + 8)).expect("len");
        mem.write_obj(flags, GuestAddress(at + 12)).expect("flags");
        mem.write_obj(next, GuestAddress(at + 14)).expect("next");
    }

    /// Puts `head` in the next slot of the available ring without publishing it.
    pub fn push(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("ring");
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes the pushed heads (writes the available index).
    pub fn publish(&self, mem: &GuestMemoryMmap<()>) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2)).expect("idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Publishes `head` in the available ring (the caller kicks).
    pub fn offer(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        self.push(mem, head);
        self.publish(mem);
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// The next used entry (id, len), which the caller knows is there.
    fn pop_used(&mut self, mem: &GuestMemoryMmap<()>) -> (u16, u32) {
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("len");
        self.used_seen = self.used_seen.wrapping_add(1);
        (u16::try_from(id).expect("used id fits the queue"), len)
    }

    /// Used entries (id, len) that appeared since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap<()>) -> Vec<(u16, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            out.push(self.pop_used(mem));
        }
        out
    }

    /// Waits (polling, at most `within`) for `n` more used entries and returns exactly those.
    pub fn wait_used(&mut self, mem: &GuestMemoryMmap<()>, n: u16, within: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + within;
        loop {
            let u = self.used_idx(mem);
            if u.wrapping_sub(self.used_seen) >= n {
                break;
            }
            assert!(Instant::now() < deadline, "used index {u}, waiting for {}", self.used_seen.wrapping_add(n));
            std::thread::sleep(Duration::from_micros(200));
        }
        (0..n).map(|_| self.pop_used(mem)).collect()
    }

    /// Chains offered and not yet used.
    pub fn outstanding(&self) -> u16 {
        self.next_avail.wrapping_sub(self.used_seen)
    }
}

/// Reads a service's stderr to the end and returns the counters of its `: stats ` line.
pub fn stats_line(mut stderr: ChildStderr) -> Vec<(String, u64)> {
    let mut err = String::new();
    stderr.read_to_string(&mut err).expect("read stderr");
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

/// The counter `name` of a stats line.
pub fn stat_of(stats: &[(String, u64)], name: &str) -> u64 {
    stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {name} in {stats:?}"))
}

/// User+system CPU time a process used so far (from /proc).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Like [`spawn_service`], with the child's stderr piped (to read its exit `stats` line).
pub fn spawn_service_piped(binary: &str) -> (Child, ControlChannel) {
    spawn_with(binary, &[], StderrTo::Pipe)
}

/// Sends `Shutdown`, waits (bounded) for a clean exit and returns the child's `stats` counters
/// (the child must have been started with [`spawn_service_piped`]).
pub fn shutdown_with_stats(mut child: Child, ctl: &ControlChannel) -> Vec<(String, u64)> {
    shutdown_clean(&mut child, ctl, Duration::from_secs(5));
    stats_line(child.stderr.take().expect("piped stderr"))
}

/// Waits (at most `within`, in 5 ms steps) for `child` to exit.
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "service did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `Shutdown` and checks the service exits cleanly within `within`.
pub fn shutdown_clean(child: &mut Child, ctl: &ControlChannel, within: Duration) {
    ctl.send(&ControlMsg::Shutdown, &[]).expect("shutdown");
    let st = wait_exit(child, within);
    assert!(st.success(), "exit status {st:?}");
}

/// Serialises the tests of one file (each test binary has its own lock): the services spin
/// while serving, and these 2-core machines run one at a time without distorting timings.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- One service instance, set up as the core does ----

/// Guest physical base of the virtio-mmio window the tests give their devices.
pub const MMIO_BASE: u64 = 0xd000_0000;

/// The `Setup` message for a service on `core`'s ring with fds of `roles` and `device`.
pub fn setup_msg(name: &str, core: &CoreEndpoint, roles: Vec<FdRole>, device: DeviceConfig) -> ServiceSetup {
    ServiceSetup {
        name: name.into(),
        // Started by the test, not by the core's clone3: the jail makes its own namespaces.
        jail: JailPlan::Standalone,
        ring: RingSetup { capacity: core.capacity(), region_len: core.region_len() as u64 },
        fds: roles,
        device,
        idle_spin_us: 200,
    }
}

/// Guest RAM of `len` bytes at guest address 0 as one memory region of a set-up message.
pub fn ram_regions(len: u64) -> Vec<MemoryRegion> {
    vec![MemoryRegion { guest_addr: 0, len, file_offset: 0 }]
}

/// A one-queue block device at [`MMIO_BASE`] (GSI 5) over RAM of `ram` bytes.
pub fn block_device(ram: u64, disk_size: u64, read_only: bool, id: &str, rate_limit: RateLimit) -> DeviceConfig {
    DeviceConfig::Block(BlockConfig {
        mmio_base: MMIO_BASE,
        mmio_len: 0x1000,
        gsi: 5,
        memory: ram_regions(ram),
        disk_size,
        read_only,
        id: id.into(),
        num_queues: 1,
        queue_size: 256,
        rate_limit,
        write_errors: ipc::control::ErrorPolicy::Report,
        read_errors: ipc::control::ErrorPolicy::Report,
    })
}

/// A network device at [`MMIO_BASE`] (GSI 6) over RAM of `ram` bytes.
pub fn net_device(ram: u64, mac: [u8; 6], tap_name: &str, rate_limit: RateLimit) -> DeviceConfig {
    DeviceConfig::Net(NetConfig {
        mmio_base: MMIO_BASE,
        mmio_len: 0x1000,
        gsi: 6,
        memory: ram_regions(ram),
        mac,
        queue_size: 256,
        tap_name: tap_name.into(),
        rx_rate_limit: rate_limit,
        tx_rate_limit: rate_limit,
    })
}

/// A running service instance: the process, the core's end of its control channel and its
/// exit ring. Killed (SIGKILL) and reaped on drop if it is still running.
pub struct Instance {
    /// The service process.
    pub child: Child,
    /// The core's end of the control channel.
    pub ctl: ControlChannel,
    /// The core's end of the exit ring.
    pub core: CoreEndpoint,
}

impl Instance {
    /// Starts `binary` exactly as the core does: a fresh exit ring called `name`, the ring's
    /// memfd and doorbells followed by `device_fds` handed over with the `Setup` message for
    /// `device`; waits (bounded) for `Ready`.
    pub fn start(
        binary: &str,
        name: &str,
        stderr: StderrTo,
        device_fds: &[(FdRole, BorrowedFd<'_>)],
        device: DeviceConfig,
    ) -> Self {
        let (child, ctl) = spawn_with(binary, &[], stderr);
        let instance = Self { child, ctl, core: exit_ring(name) };
        let core = &instance.core;
        let mut roles = vec![FdRole::Ring, FdRole::SubmitBell, FdRole::CompleteBell];
        let mut fds = vec![core.region_fd(), core.submit_bell(), core.complete_bell()];
        for (role, fd) in device_fds {
            roles.push(*role);
            fds.push(*fd);
        }
        send_setup(&instance.ctl, setup_msg(name, core, roles, device), &fds, instance.child.id());
        instance
    }

    /// The virtio-mmio registers of the device at `base`.
    pub fn mmio(&self, base: u64) -> MmioRegs<'_> {
        MmioRegs { core: &self.core, base }
    }

    /// A one-byte port read.
    pub fn inb(&self, port: u64) -> u8 {
        let r = self.core.call(&ExitRequest::read(ExitKind::PioRead, port, 1), REG_TIMEOUT).expect("inb");
        assert_eq!(r.status, Status::Ok, "inb {port:#x}");
        r.data[0]
    }

    /// A one-byte port write.
    pub fn outb(&self, port: u64, v: u8) {
        let req = ExitRequest::write(ExitKind::PioWrite, port, &[v]).expect("req");
        assert_eq!(self.core.call(&req, REG_TIMEOUT).expect("outb").status, Status::Ok, "outb {port:#x}");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait")
    }

    /// Asks for the service's counters (`Ping` with `token`, the matching `Pong` within `within`).
    pub fn ping(&self, token: u64, within: Duration) -> ServiceStats {
        self.ctl.send(&ControlMsg::Ping { token }, &[]).expect("ping");
        match self.ctl.recv(Instant::now() + within).expect("pong").0 {
            ControlMsg::Pong { token: t, stats } if t == token => stats,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends `Shutdown` and checks the service exits cleanly within `within`.
    pub fn shutdown(&mut self, within: Duration) {
        shutdown_clean(&mut self.child, &self.ctl, within);
    }

    /// [`Instance::shutdown`], then the counters of the service's `stats` line (the instance must
    /// have been started with [`StderrTo::Pipe`]).
    pub fn shutdown_with_stats(&mut self, within: Duration) -> Vec<(String, u64)> {
        self.shutdown(within);
        stats_line(self.child.stderr.take().expect("piped stderr"))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads exactly `n` bytes (at least; what one read returns past `n` is kept) from `pipe`,
/// waiting at most `within` in all.
pub fn read_pipe(pipe: &mut File, n: usize, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(ipc::wait::wait_readable(pipe.as_fd(), left).expect("poll"), "output timed out: {got:?}");
        let mut buf = [0u8; 256];
        let k = pipe.read(&mut buf).expect("read output");
        assert!(k > 0, "output closed early");
        got.extend_from_slice(&buf[..k]);
    }
    got
}

/// Writes a virtio-blk request header (`t`, reserved 0, `sector`) at guest address `at`.
pub fn blk_header(mem: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
    mem.write_obj(t, GuestAddress(at)).expect("type");
    mem.write_obj(0u32, GuestAddress(at + 4)).expect("reserved");
    mem.write_obj(sector, GuestAddress(at + 8)).expect("sector");
}

// ---- The host side of a TAP: a network namespace and an AF_PACKET socket ----

/// A network namespace with IPv6 off (no router solicitations or MLD on its links); deleted on
/// drop, also when a test fails. Needs root (CAP_SYS_ADMIN) and `ip`.
pub struct Netns {
    name: String,
}

static NETNS_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `ip args...` and checks it succeeded.
pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} (needs root / CAP_SYS_ADMIN)");
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>`; returns it and `n` (unique in this test binary).
    pub fn new(prefix: &str) -> (Self, u32) {
        let n = NETNS_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = Self { name: format!("{prefix}-{}-{n}", std::process::id()) };
        ip(&["netns", "add", &ns.name]);
        for key in ["all", "default"] {
            ip(&["netns", "exec", &ns.name, "sysctl", "-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")]);
        }
        (ns, n)
    }

    /// Runs `f` on a thread that entered the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    /// Opens (with `open_tap`, the core's own code) the TAP `tap_name` in the namespace, sets it
    /// up and binds an AF_PACKET socket to it; returns the TAP's fd and the socket.
    pub fn tap_and_packet_socket(
        &self,
        tap_name: &str,
        open_tap: impl FnOnce(&str) -> (String, OwnedFd) + Send,
    ) -> (OwnedFd, OwnedFd) {
        self.run(|| {
            let (name, tap) = open_tap(tap_name);
            ip(&["link", "set", &name, "up"]);
            let cname = std::ffi::CString::new(name).expect("name");
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
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
            (tap, sock)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// `PACKET_OUTGOING`: a frame the socket's own host sent.
const PACKET_OUTGOING: u8 = 4;

/// Sends `frame` on the AF_PACKET socket `sock`.
pub fn packet_send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: send reads `frame.len()` bytes from a live slice.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(usize::try_from(n).ok(), Some(frame.len()), "AF_PACKET send: {}", std::io::Error::last_os_error());
}

/// The next queued frame of ethertype `ethertype` that came *from* the link (not one this side
/// sent), if one is queued now; other frames are dropped.
pub fn packet_recv(sock: &OwnedFd, ethertype: [u8; 2]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: sockaddr_ll is plain old data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut flen = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("len");
        // SAFETY: recvfrom writes at most buf.len() bytes into buf and at most flen bytes into
        // `from`, both live for the call.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::addr_of_mut!(from).cast(),
                &mut flen,
            )
        };
        let n = usize::try_from(n).ok()?;
        if from.sll_pkttype != PACKET_OUTGOING && n >= 14 && buf[12..14] == ethertype {
            return Some(buf[..n].to_vec());
        }
    }
}
