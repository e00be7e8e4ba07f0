//! The core's side of the service boundary: spawning device services, forwarding exits to them
//! ([`RemoteDevice`]) and watching them ([`ServiceHandle`]).
//!
//! A service is a separate process started from its binary with only four fds: `/dev/null` as
//! stdin/stdout, the core's stderr (for its log) and its end of the control socket as fd 3. Every
//! other fd is marked close-on-exec in `pre_exec` (so std's exec-error pipe still works) and the
//! child gets `PR_SET_PDEATHSIG(SIGKILL)`. Note: Linux delivers the parent-death signal when the
//! *thread* that spawned the child exits, so spawn services from a thread that lives as long as the
//! VM (the main thread).
//!
//! The core then sends the set-up message with the ring memfd, the two doorbells and the device's
//! fds, and waits (bounded) for `Ready`. From then on [`RemoteDevice`] forwards every access in its
//! range over the ring without interpreting it. When the service misbehaves or dies, the device
//! fails closed: reads return all-ones, writes are dropped, the failure is logged once and later
//! accesses fail at once without waiting for the deadline.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::control::{
    BlockConfig, ControlMsg, DeviceConfig, FdRole, MemoryRegion, RingSetup, ServiceSetup, ServiceStats,
};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::{ControlChannel, ControlError, CoreEndpoint, IpcError, WaitConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Errors starting or managing a service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The binary does not exist or is not an executable file.
    #[error("service binary {} not found or not executable", path.display())]
    BinaryMissing {
        /// Path tried.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Starting the process failed.
    #[error("spawning service {}", path.display())]
    Spawn {
        /// Path of the binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Creating the ring failed.
    #[error("creating the exit ring")]
    Ring(#[from] IpcError),
    /// A control-channel operation failed.
    #[error("control channel of service {name}")]
    Control {
        /// Service name.
        name: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// The service did not send `Ready` in time (or exited first).
    #[error("service {name} (pid {pid}) did not become ready")]
    NotReady {
        /// Service name.
        name: String,
        /// Its pid.
        pid: u32,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// The service reported that set-up failed.
    #[error("service {name} (pid {pid}) failed set-up: {reason}")]
    SetupFailed {
        /// Service name.
        name: String,
        /// Its pid.
        pid: u32,
        /// The service's explanation.
        reason: String,
    },
    /// The service answered with something else than expected.
    #[error("service {name} sent an unexpected message: {msg}")]
    Unexpected {
        /// Service name.
        name: String,
        /// The message.
        msg: String,
    },
    /// An OS call failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> ServiceError {
    move |source| ServiceError::Os { what, source }
}

/// Which bus a [`RemoteDevice`] sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// Tuning of one service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Ring entries per direction (power of two).
    pub ring_capacity: u32,
    /// Longest wait for one forwarded exit before the service is declared failed.
    pub call_timeout: Duration,
    /// Longest wait for `Ready` after spawning.
    pub ready_timeout: Duration,
    /// How long the core spins on a reply before sleeping on the doorbell.
    pub core_spin: Duration,
    /// How long the service keeps spinning after its last request before sleeping.
    pub service_idle_spin: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            ring_capacity: 64,
            call_timeout: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(5),
            core_spin: Duration::from_micros(100),
            service_idle_spin: Duration::from_micros(200),
        }
    }
}

/// What to start.
#[derive(Debug)]
pub struct ServiceSpec {
    /// Instance name, for logs.
    pub name: String,
    /// The service binary.
    pub binary: PathBuf,
    /// The device's configuration, sent in the set-up message.
    pub device: DeviceConfig,
    /// Device fds passed to the service, with their roles (the ring fds are added here).
    pub fds: Vec<(FdRole, OwnedFd)>,
    /// Bus of the forwarded accesses.
    pub space: AddressSpace,
    /// Tuning.
    pub options: ServiceOptions,
}

/// Counters of a [`RemoteDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Accesses forwarded and answered by the service.
    pub forwarded: u64,
    /// Accesses the service answered with a rejection (reads saw all-ones).
    pub rejected: u64,
    /// Accesses completed with the failure value because the service had failed.
    pub failures: u64,
}

/// A device whose accesses are forwarded to a service process over the exit ring.
#[derive(Debug)]
pub struct RemoteDevice {
    name: String,
    pid: u32,
    space: AddressSpace,
    ring: CoreEndpoint,
    timeout: Duration,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    forwarded: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
}

impl RemoteDevice {
    /// Service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pid of the service process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Counters.
    pub fn stats(&self) -> RemoteStats {
        RemoteStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Whether the device has failed (all later accesses fail fast).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Why the device failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Marks the device failed (first caller wins), logs it once and wakes any access waiting
    /// on the ring. `error` selects `log::error!` (a fault) or `log::info!` (an orderly stop).
    pub fn mark_failed(&self, why: &str, error: bool) {
        if self.failed.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
            if error {
                log::error!(
                    "service {} (pid {}) failed: {why}; its reads now return all-ones and writes are dropped",
                    self.name,
                    self.pid
                );
            } else {
                log::info!("service {} (pid {}) stopped: {why}", self.name, self.pid);
            }
        }
        self.ring.abort();
    }

    fn forward(&self, kind: ExitKind, addr: u64, req: Option<ExitRequest>, len: usize) -> Option<[u8; 8]> {
        if self.is_failed() {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some(req) = req else {
            // An access size the ring cannot carry: not the service's fault, complete it locally.
            log::warn!("service {}: {len}-byte {kind:?} at {addr:#x} not forwarded", self.name);
            return None;
        };
        match self.ring.call(&req, self.timeout) {
            Ok(reply) => {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
                if reply.status == Status::Rejected {
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Some(reply.data)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let why = match &e {
                    IpcError::Timeout(t) => format!("no reply to a {kind:?} at {addr:#x} within {t:?}"),
                    other => format!("{other} (on a {kind:?} at {addr:#x})"),
                };
                self.mark_failed(&why, true);
                None
            }
        }
    }
}

impl BusDevice for RemoteDevice {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        let kind = if self.space == AddressSpace::Pio { ExitKind::PioRead } else { ExitKind::MmioRead };
        let addr = base.wrapping_add(offset);
        let req = u32::try_from(data.len())
            .ok()
            .filter(|l| matches!(l, 1 | 2 | 4 | 8))
            .map(|l| ExitRequest::read(kind, addr, l));
        match self.forward(kind, addr, req, data.len()) {
            Some(bytes) => {
                let n = data.len().min(8);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let kind = if self.space == AddressSpace::Pio { ExitKind::PioWrite } else { ExitKind::MmioWrite };
        let addr = base.wrapping_add(offset);
        let req = ExitRequest::write(kind, addr, data);
        let _ = self.forward(kind, addr, req, data.len());
    }
}

/// A running service: its pid, a watcher that reaps it, and its control channel.
#[derive(Debug)]
pub struct ServiceHandle {
    name: String,
    pid: u32,
    control: ControlChannel,
    pidfd: OwnedFd,
    device: Arc<RemoteDevice>,
    stopping: Arc<AtomicBool>,
    exit_rx: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    watcher: Option<JoinHandle<()>>,
    next_token: u64,
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

impl ServiceHandle {
    /// Pid of the service.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device this service backs.
    pub fn device(&self) -> &Arc<RemoteDevice> {
        &self.device
    }

    /// Asks the service for its counters (`Ping`/`Pong`), waiting at most `timeout`.
    pub fn stats(&mut self, timeout: Duration) -> Result<ServiceStats, ServiceError> {
        let ctl = |source| ServiceError::Control { name: self.name.clone(), source };
        let token = self.next_token;
        self.next_token += 1;
        self.control.send(&ControlMsg::Ping { token }, &[]).map_err(ctl)?;
        let deadline = Instant::now() + timeout;
        // Bounded: each iteration consumes one message or hits the deadline.
        loop {
            let (msg, _) = self
                .control
                .recv(deadline)
                .map_err(|source| ServiceError::Control { name: self.name.clone(), source })?;
            match msg {
                ControlMsg::Pong { token: t, stats } if t == token => return Ok(stats),
                ControlMsg::Pong { .. } => continue,
                other => return Err(ServiceError::Unexpected { name: self.name.clone(), msg: format!("{other:?}") }),
            }
        }
    }

    /// Sends `SIGKILL` to the service (through its pidfd, so never to a recycled pid).
    pub fn kill(&self) -> Result<(), ServiceError> {
        pidfd_kill(self.pidfd.as_fd()).map_err(os("pidfd_send_signal"))
    }

    /// The exit status, once the watcher has reaped the service.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exit_rx.try_recv().ok();
        }
        self.status
    }

    /// Stops the service: `Shutdown`, up to `timeout` for it to exit, then `SIGKILL`. Always
    /// reaps it (the watcher does) unless the kernel fails to deliver `SIGKILL` within 5 s.
    /// Returns the exit status, `None` only in that last case (which is logged).
    pub fn shutdown(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.stop(timeout)
    }

    fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            return Some(s);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // A dead or wedged service may not read this; the timeout covers it.
        let _ = self.control.send(&ControlMsg::Shutdown, &[]);
        let status = match self.exit_rx.recv_timeout(timeout) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                log::warn!("service {} (pid {}) did not exit within {timeout:?}; killing it", self.name, self.pid);
                if let Err(e) = self.kill() {
                    log::warn!("service {} (pid {}): SIGKILL failed: {e}", self.name, self.pid);
                }
                self.exit_rx.recv_timeout(Duration::from_secs(5)).ok()
            }
        };
        match status {
            Some(s) => {
                self.status = Some(s);
                if let Some(w) = self.watcher.take() {
                    let _ = w.join();
                }
            }
            None => log::error!("service {} (pid {}) could not be reaped", self.name, self.pid),
        }
        status
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.stop(Duration::from_millis(500));
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new fd (O_CLOEXEC by default for pidfds); we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // Already dead (reaped): nothing to kill.
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

fn check_binary(path: &Path) -> Result<(), ServiceError> {
    let missing = |source| ServiceError::BinaryMissing { path: path.to_path_buf(), source };
    let meta = fs::metadata(path).map_err(missing)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(missing(io::Error::new(io::ErrorKind::PermissionDenied, "not an executable file")));
    }
    Ok(())
}

/// Upper bound of the fd sweep when `close_range` is unavailable.
fn fd_limit() -> libc::c_int {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    let n = if ok { rl.rlim_cur } else { 1024 };
    libc::c_int::try_from(n.min(65536)).unwrap_or(65536)
}

fn spawn_process(binary: &Path, child_ctl: &OwnedFd) -> Result<std::process::Child, ServiceError> {
    // The child's end must not sit on 0..=2, which Stdio set-up overwrites before pre_exec.
    let moved;
    let mut raw = child_ctl.as_raw_fd();
    if raw < 3 {
        moved = child_ctl.as_fd().try_clone_to_owned().map_err(os("dup control fd"))?;
        // try_clone_to_owned uses F_DUPFD_CLOEXEC with a minimum of 3.
        raw = moved.as_raw_fd();
    }
    let max_fd = fd_limit();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(binary);
    cmd.arg("--control-fd").arg("3").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (dup2, fcntl, close_range, prctl, getppid) on integers captured before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Every fd above 3 goes at exec. CLOEXEC rather than closing now keeps std's
            // exec-error pipe working (it is CLOEXEC itself), so a failed exec is still reported.
            if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
                for fd in 4..max_fd {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The core may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
            ServiceError::BinaryMissing { path: binary.to_path_buf(), source }
        }
        _ => ServiceError::Spawn { path: binary.to_path_buf(), source },
    })
}

/// Spawns a service, hands it its ring and fds, waits for `Ready` and starts its watcher.
pub fn spawn_service(spec: ServiceSpec) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let ServiceSpec { name, binary, device, fds, space, options } = spec;
    check_binary(&binary)?;
    let ring = CoreEndpoint::create(
        &format!("bulkhead-{name}-ring"),
        options.ring_capacity,
        WaitConfig { spin: options.core_spin },
    )?;
    let (control, child_ctl) =
        ControlChannel::pair().map_err(|source| ServiceError::Control { name: name.clone(), source })?;
    let child_ctl = child_ctl.into_fd();
    let mut child = spawn_process(&binary, &child_ctl)?;
    drop(child_ctl);
    let pid = child.id();

    // From here on, any failure must kill and reap the child.
    let abort = |child: &mut std::process::Child, e: ServiceError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    let pidfd = match pidfd_open(pid) {
        Ok(p) => p,
        Err(e) => return Err(abort(&mut child, ServiceError::Os { what: "pidfd_open", source: e })),
    };

    let mut roles = vec![FdRole::Ring, FdRole::SubmitBell, FdRole::CompleteBell];
    let mut borrowed = vec![ring.region_fd(), ring.submit_bell(), ring.complete_bell()];
    for (role, fd) in &fds {
        roles.push(*role);
        borrowed.push(fd.as_fd());
    }
    let setup = ServiceSetup {
        name: name.clone(),
        ring: RingSetup { capacity: ring.capacity(), region_len: ring.region_len() as u64 },
        fds: roles,
        device,
        idle_spin_us: u32::try_from(options.service_idle_spin.as_micros()).unwrap_or(u32::MAX),
    };
    if let Err(source) = control.send(&ControlMsg::Setup(setup), &borrowed) {
        // EPIPE: the child exited before reading its set-up; it never became ready.
        let e = if matches!(source, ControlError::Send(nix::Error::EPIPE)) {
            ServiceError::NotReady { name, pid, source }
        } else {
            ServiceError::Control { name, source }
        };
        return Err(abort(&mut child, e));
    }
    drop(borrowed);
    // The service holds its own copies now.
    drop(fds);

    let ready = match control.recv(Instant::now() + options.ready_timeout) {
        Ok((ControlMsg::Ready { .. }, _)) => Ok(()),
        Ok((ControlMsg::Failed { reason }, _)) => Err(ServiceError::SetupFailed { name: name.clone(), pid, reason }),
        Ok((other, _)) => Err(ServiceError::Unexpected { name: name.clone(), msg: format!("{other:?}") }),
        Err(source) => Err(ServiceError::NotReady { name: name.clone(), pid, source }),
    };
    if let Err(e) = ready {
        return Err(abort(&mut child, e));
    }

    let dev = Arc::new(RemoteDevice {
        name: name.clone(),
        pid,
        space,
        ring,
        timeout: options.call_timeout,
        failed: AtomicBool::new(false),
        reason: Mutex::new(None),
        forwarded: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let (tx, exit_rx) = sync_channel(1);
    let (wdev, wstop) = (dev.clone(), stopping.clone());
    let watcher = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
        // Blocks until the child exits, and reaps it.
        match child.wait() {
            Ok(status) => {
                let orderly = wstop.load(Ordering::SeqCst) && status.success();
                wdev.mark_failed(&describe(status), !orderly);
                let _ = tx.send(status);
            }
            Err(e) => wdev.mark_failed(&format!("waitpid failed: {e}"), true),
        }
    });
    let watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            // The closure (and the child) were dropped with the failed spawn: kill by pidfd.
            let _ = pidfd_kill(pidfd.as_fd());
            return Err(ServiceError::Os { what: "spawning the watcher thread", source: e });
        }
    };
    log::info!("service {name} started as pid {pid} ({})", binary.display());
    let handle = ServiceHandle {
        name,
        pid,
        control,
        pidfd,
        device: dev.clone(),
        stopping,
        exit_rx,
        status: None,
        watcher: Some(watcher),
        next_token: 1,
    };
    Ok((dev, handle))
}

/// Starts the console service: a 16550 at ports `base..base + 8` writing to `output`, reading from
/// `input` (if any) and raising its interrupt through `irq` (already registered with KVM as an
/// irqfd). `deadline` bounds each forwarded access. Register the returned device on the PIO bus at
/// `base` with length 8.
pub fn spawn_console(
    binary: &Path,
    output: OwnedFd,
    input: Option<OwnedFd>,
    irq: EventFd,
    base: u16,
    deadline: Duration,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    // SAFETY: the EventFd owns this fd for the duration of the dup.
    let irq_fd = unsafe { BorrowedFd::borrow_raw(irq.as_raw_fd()) }.try_clone_to_owned().map_err(os("dup irqfd"))?;
    let mut fds = vec![(FdRole::Output, output), (FdRole::Irq, irq_fd)];
    fds.extend(input.map(|i| (FdRole::Input, i)));
    spawn_service(ServiceSpec {
        name: "console".into(),
        binary: binary.to_path_buf(),
        device: DeviceConfig::Console { base, len: 8 },
        fds,
        space: AddressSpace::Pio,
        options: ServiceOptions { call_timeout: deadline, ..ServiceOptions::default() },
    })
}

/// What the core passes to start a `bulkhead-block` service. The lead creates the eventfds and
/// registers them with KVM first: each `queue_notify[i]` as an ioeventfd on
/// `mmio_base + 0x50` (4 bytes, datamatch = `i`), `irq` as an irqfd on `gsi`.
#[derive(Debug)]
pub struct BlockSpec {
    /// Instance name and GET_ID serial (at most 20 bytes are used; empty = default).
    pub id: String,
    /// The disk image, opened by the core (read-only when `read_only`).
    pub disk: std::fs::File,
    /// Read-only disk: `VIRTIO_BLK_F_RO`, writes answered with IOERR.
    pub read_only: bool,
    /// Guest physical address of the device's virtio-mmio window.
    pub mmio_base: u64,
    /// Length of the window (0x1000 normally; at least 0x200).
    pub mmio_len: u64,
    /// GSI the irqfd is registered on.
    pub gsi: u32,
    /// The guest RAM memfd.
    pub memfd: OwnedFd,
    /// Guest RAM as `(guest address, length, memfd offset)`, e.g. `memory::ram_ranges(size)`.
    pub memory: Vec<(u64, u64, u64)>,
    /// One ioeventfd per queue (the number of queues is its length, 1..=8).
    pub queue_notify: Vec<EventFd>,
    /// The irqfd.
    pub irq: EventFd,
    /// Largest queue size offered (power of two, e.g. 256).
    pub queue_size: u16,
}

fn dup_eventfd(e: &EventFd) -> Result<OwnedFd, ServiceError> {
    // SAFETY: the EventFd owns this fd for the duration of the dup.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }.try_clone_to_owned().map_err(os("dup eventfd"))
}

/// Starts a `bulkhead-block` service for `spec`. `deadline` bounds each forwarded access.
/// Register the returned device on the MMIO bus at `spec.mmio_base` with length `spec.mmio_len`.
pub fn spawn_block(
    binary: &Path,
    spec: BlockSpec,
    deadline: Duration,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let BlockSpec { id, disk, read_only, mmio_base, mmio_len, gsi, memfd, memory, queue_notify, irq, queue_size } =
        spec;
    let disk_size = disk.metadata().map_err(os("stat of the disk image"))?.len();
    let num_queues = u16::try_from(queue_notify.len()).unwrap_or(u16::MAX);
    let mut fds =
        vec![(FdRole::GuestMemory, memfd), (FdRole::Disk, OwnedFd::from(disk)), (FdRole::Irq, dup_eventfd(&irq)?)];
    for (i, e) in queue_notify.iter().enumerate() {
        let i = u16::try_from(i).unwrap_or(u16::MAX);
        fds.push((FdRole::QueueNotify(i), dup_eventfd(e)?));
    }
    let name = if id.is_empty() { "block".to_string() } else { format!("block-{id}") };
    spawn_service(ServiceSpec {
        name,
        binary: binary.to_path_buf(),
        device: DeviceConfig::Block(BlockConfig {
            mmio_base,
            mmio_len,
            gsi,
            memory: memory
                .iter()
                .map(|&(guest_addr, len, file_offset)| MemoryRegion { guest_addr, len, file_offset })
                .collect(),
            disk_size,
            read_only,
            id,
            num_queues,
            queue_size,
        }),
        fds,
        space: AddressSpace::Mmio,
        options: ServiceOptions { call_timeout: deadline, ..ServiceOptions::default() },
    })
}

#[cfg(test)]
mod tests;
