//! Shared by the integration tests: start a service binary the way the core does (its end of the
//! control socket on fd 3, stdin/stdout on /dev/null), and small fd/number helpers.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use ipc::ControlChannel;

/// Starts `binary` with the child's end of a fresh control channel on fd 3 and `extra_args`;
/// returns the child and the core's end. `quiet` sends its stderr to /dev/null.
pub fn spawn_service(binary: &str, extra_args: &[&str], quiet: bool) -> (Child, ControlChannel) {
    let (ctl, child_end) = ControlChannel::pair().expect("pair");
    let child_fd: OwnedFd = child_end.into_fd();
    let raw = child_fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(extra_args).stdin(Stdio::null()).stdout(Stdio::null());
    if quiet {
        cmd.stderr(Stdio::null());
    }
    // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl) on fds that exist.
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

// ---- Guest-side virtio helpers (rate-limit tests) ----

use std::io::Read;
use std::process::ChildStderr;
use std::time::{Duration, Instant};

use ipc::control::{ControlMsg, ServiceSetup};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::{CoreEndpoint, WaitConfig};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

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
    ctl.send(&ControlMsg::Setup(setup), fds).expect("send setup");
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
    /// 32-bit register read.
    pub fn rd(&self, off: u64) -> u32 {
        let r = self.core.call(&ExitRequest::read(ExitKind::MmioRead, self.base + off, 4), REG_TIMEOUT).expect("read");
        assert_eq!(r.status, Status::Ok, "read {off:#x}");
        u32::from_le_bytes([r.data[0], r.data[1], r.data[2], r.data[3]])
    }

    /// 32-bit register write.
    pub fn wr(&self, off: u64, v: u32) {
        let req = ExitRequest::write(ExitKind::MmioWrite, self.base + off, &v.to_le_bytes()).expect("req");
        let r = self.core.call(&req, REG_TIMEOUT).expect("write");
        assert_eq!(r.status, Status::Ok, "write {off:#x}");
    }

    /// A driver's initialisation: reset, negotiate exactly `features` (which must be offered),
    /// set up `queues` (index = queue number), DRIVER_OK.
    pub fn init(&self, device_id: u32, features: u64, queues: &mut [GuestQueue]) {
        assert_eq!(self.rd(0x000), 0x7472_6976, "magic");
        assert_eq!(self.rd(0x008), device_id, "device id");
        self.wr(0x070, 0);
        self.wr(0x070, 1 | 2);
        self.wr(0x14, 0);
        let lo = self.rd(0x10);
        self.wr(0x14, 1);
        let offered = u64::from(lo) | (u64::from(self.rd(0x10)) << 32);
        assert_eq!(offered & features, features, "features {features:#x} offered");
        self.wr(0x24, 0);
        self.wr(0x20, lo32(features));
        self.wr(0x24, 1);
        self.wr(0x20, lo32(features >> 32));
        self.wr(0x070, 1 | 2 | 8);
        assert_ne!(self.rd(0x070) & 8, 0, "FEATURES_OK accepted");
        for (i, q) in queues.iter_mut().enumerate() {
            self.wr(0x030, u32::try_from(i).expect("queue"));
            assert!(self.rd(0x034) >= u32::from(q.size), "queue {i} max size");
            self.wr(0x038, u32::from(q.size));
            for (reg, addr) in [(0x080, q.desc), (0x090, q.avail), (0x0a0, q.used)] {
                self.wr(reg, lo32(addr));
                self.wr(reg + 4, lo32(addr >> 32));
            }
            self.wr(0x044, 1);
            q.next_avail = 0;
            q.used_seen = 0;
        }
        self.wr(0x070, 1 | 2 | 8 | 4);
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

    /// Publishes `head` in the available ring (the caller kicks).
    pub fn offer(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("ring");
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2)).expect("idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Used entries (id, len) that appeared since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap<()>) -> Vec<(u16, u32)> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("len");
            out.push((u16::try_from(id).expect("used id fits the queue"), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
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
    let (ctl, child_end) = ControlChannel::pair().expect("pair");
    let child_fd: OwnedFd = child_end.into_fd();
    let raw = child_fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
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

/// Sends `Shutdown`, waits (bounded) for a clean exit and returns the child's `stats` counters
/// (the child must have been started with [`spawn_service_piped`]).
pub fn shutdown_with_stats(mut child: Child, ctl: &ControlChannel) -> Vec<(String, u64)> {
    ctl.send(&ControlMsg::Shutdown, &[]).expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "service did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    stats_line(child.stderr.take().expect("piped stderr"))
}
