//! The core's side of the service boundary: spawning device services, forwarding exits to them
//! ([`RemoteDevice`]) and watching them ([`ServiceHandle`]).
//!
//! A service is a separate process created by [`spawn`] with `clone3` in new user, mount, PID,
//! IPC, UTS and network namespaces (pid 1 of its own PID namespace, still the core's direct child,
//! supervised through a pidfd), with only four fds: `/dev/null` as stdin/stdout, the core's stderr
//! (for its log) and its end of the control socket as fd 3, and `PR_SET_PDEATHSIG(SIGKILL)`.
//! Note: Linux delivers the parent-death signal when the *thread* that spawned the child exits, so
//! spawn services from a thread that lives as long as the VM (the main thread). The service then
//! jails itself (empty read-only root, no capabilities, unprivileged ids, rlimits) before it
//! touches guest data; see `device_services::jail`.
//!
//! The core then sends the set-up message with the ring memfd, the two doorbells and the device's
//! fds, and waits (bounded) for `Ready`. From then on [`RemoteDevice`] forwards every access in its
//! range over the ring without interpreting it. When the service misbehaves or dies, the device
//! fails closed: reads return all-ones, writes are dropped, the failure is logged once and later
//! accesses fail at once without waiting for the deadline.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::control::{
    BlockConfig, ControlMsg, DeviceConfig, FdRole, ForbiddenAction, MemoryRegion, RingSetup, ServiceSetup, ServiceStats,
};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::{ControlChannel, ControlError, CoreEndpoint, IpcError, WaitConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub mod spawn;

pub use spawn::{init_sandbox, Namespace, Namespaces, Sandbox, ServiceChild, SpawnError};

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
    /// Starting the process (in its namespaces) failed.
    #[error("spawning service {}", path.display())]
    Spawn {
        /// Path of the binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: SpawnError,
    },
    /// The service sandbox cannot be set up on this host (a namespace is unavailable).
    #[error("service sandbox")]
    Sandbox(#[source] SpawnError),
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
        self.mark_failed_as(why, if error { Failure::Error } else { Failure::Orderly });
    }

    fn mark_failed_as(&self, why: &str, kind: Failure) {
        if self.failed.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
            if kind == Failure::Seccomp {
                // `why` reads "killed by seccomp: syscall NAME (NR)" (or the signal fallback).
                log::error!(
                    "service {} (pid {}) {why}; its reads now return all-ones and writes are dropped",
                    self.name,
                    self.pid
                );
            } else if kind == Failure::Error {
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

/// How a device failure is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A fault (`log::error!`).
    Error,
    /// An orderly stop (`log::info!`).
    Orderly,
    /// Killed by its seccomp filter (`log::error!`, worded for it).
    Seccomp,
}

/// How the core words a service's death by SIGSYS, from the report its SIGSYS handler sent
/// (`(syscall, arch)`) if one arrived.
pub fn describe_seccomp_death(report: Option<(u32, u32)>) -> String {
    match report {
        Some((nr, bulkhead_policies::AUDIT_ARCH_X86_64)) => match bulkhead_policies::syscall_name(i64::from(nr)) {
            Some(name) => format!("killed by seccomp: syscall {name} ({nr})"),
            None => format!("killed by seccomp: syscall {nr} (no such x86_64 syscall)"),
        },
        Some((nr, arch)) => format!("killed by seccomp: syscall {nr} of arch {arch:#x}"),
        None => format!("killed by signal {} (SIGSYS)", libc::SIGSYS),
    }
}

/// Reads the `SeccompViolation` report a service killed by SIGSYS left on its control socket
/// (its handler writes it before dying, so it is queued by the time the child is reaped).
/// Bounded: looks at most at 16 queued messages.
fn read_seccomp_report(control: &ControlChannel) -> Option<(u32, u32)> {
    for _ in 0..16 {
        match control.recv_now() {
            Ok((ControlMsg::SeccompViolation { syscall, arch }, _)) => return Some((syscall, arch)),
            Ok(_) | Err(ControlError::Decode(_) | ControlError::TooManyFds(_)) => continue,
            Err(_) => return None,
        }
    }
    None
}

#[cfg(test)]
mod seccomp_report_tests {
    use super::*;

    #[test]
    fn seccomp_deaths_are_named() {
        let x86 = bulkhead_policies::AUDIT_ARCH_X86_64;
        assert_eq!(describe_seccomp_death(Some((59, x86))), "killed by seccomp: syscall execve (59)");
        assert_eq!(describe_seccomp_death(Some((257, x86))), "killed by seccomp: syscall openat (257)");
        assert_eq!(
            describe_seccomp_death(Some((9999, x86))),
            "killed by seccomp: syscall 9999 (no such x86_64 syscall)"
        );
        assert_eq!(describe_seccomp_death(Some((11, 0x4000_0003))), "killed by seccomp: syscall 11 of arch 0x40000003");
        assert_eq!(describe_seccomp_death(None), "killed by signal 31 (SIGSYS)");
    }

    #[test]
    fn report_is_read_from_the_control_socket() {
        let (core, svc) = ControlChannel::pair().expect("pair");
        svc.send(&ControlMsg::Ping { token: 1 }, &[]).expect("send");
        svc.send_raw(&ipc::control::seccomp_report(41, 0xc000_003e)).expect("send report");
        drop(svc);
        assert_eq!(read_seccomp_report(&core), Some((41, 0xc000_003e)));
        assert_eq!(read_seccomp_report(&core), None, "nothing more queued");
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

    /// Fault injection: tells the service to attempt a forbidden action (its filter then kills
    /// it by SIGSYS, which the watcher logs).
    pub fn attempt_forbidden(&self, action: ForbiddenAction) -> Result<(), ServiceError> {
        self.control
            .send(&ControlMsg::AttemptForbidden(action), &[])
            .map_err(|source| ServiceError::Control { name: self.name.clone(), source })
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
    let mut child = spawn::spawn(&binary, child_ctl.as_fd()).map_err(|source| match source {
        SpawnError::NamespacesUnavailable(_) => ServiceError::Sandbox(source),
        SpawnError::Child { step: "execve", source: ref e, .. }
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EACCES)) =>
        {
            let source = io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ENOENT));
            ServiceError::BinaryMissing { path: binary.clone(), source }
        }
        source => ServiceError::Spawn { path: binary.clone(), source },
    })?;
    drop(child_ctl);
    let pid = child.id();

    // From here on, any failure must kill and reap the child.
    let abort = |child: &mut ServiceChild, e: ServiceError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    let pidfd = match child.pidfd().try_clone_to_owned() {
        Ok(p) => p,
        Err(e) => return Err(abort(&mut child, ServiceError::Os { what: "dup of the pidfd", source: e })),
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
    // The watcher's own handle on the control socket, to collect a SIGSYS report.
    let report_ctl = control.as_fd().try_clone_to_owned().ok().map(ControlChannel::from_fd);
    let watcher = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
        // Blocks until the child exits, and reaps it.
        match child.wait() {
            Ok(status) if status.signal() == Some(libc::SIGSYS) => {
                let report = report_ctl.as_ref().and_then(read_seccomp_report);
                wdev.mark_failed_as(&describe_seccomp_death(report), Failure::Seccomp);
                let _ = tx.send(status);
            }
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
