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
//!
//! Past the restart cap a virtio (MMIO) device is marked FAILED in a way the guest can see: the
//! supervisor starts one last instance from the same recipe (state region included) and tells it
//! `ControlMsg::EnterFailed`; that instance presents DEVICE_NEEDS_RESET, refuses FEATURES_OK and
//! never touches its queues again, while its registers keep answering. If that last instance
//! cannot start or dies, the device falls back to failing closed (all-ones). The console (port
//! I/O: a 16550 has no NEEDS_RESET) always fails closed past the cap.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc::control::{
    bounded_reason, BlockConfig, ControlMsg, DeviceConfig, FaultAction, FdRole, ForbiddenAction, MemoryRegion,
    NetConfig, RateLimit, RateLimitUpdate, RingSetup, ServiceFault, ServiceMetrics, ServiceReport, ServiceSetup,
    ServiceStats,
};
use ipc::ring::{ExitKind, ExitRequest, Status};
use ipc::state::{StateRegion, HOT_OFFSET, SLOT_HEADER_LEN, SLOT_LEN};
use ipc::{ControlChannel, ControlError, CoreEndpoint, IpcError, WaitConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub mod spawn;
pub mod supervisor;

pub use spawn::{init_sandbox, probe_sandbox, Namespace, Namespaces, Sandbox, ServiceChild, SpawnError};
pub use supervisor::{Decision, Liveness, LivenessStep, Metrics, RestartPolicy, RestartTracker};

/// Errors starting or managing a service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The instance could not be moved into the VM's cgroup.
    #[error("service {name}: placing it in the VM's cgroup")]
    Cgroup {
        /// Service name.
        name: String,
        /// Why.
        #[source]
        source: crate::cgroup::CgroupError,
    },
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
    /// `corrupt-state` on a device without a state region.
    #[error("service {name} has no state region")]
    NoStateRegion {
        /// Service name.
        name: String,
    },
    /// A change that does not fit this kind of device.
    #[error("service {name}: {what}")]
    Unsupported {
        /// Service name.
        name: String,
        /// What was asked.
        what: &'static str,
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
    /// When a failed instance is replaced (default: never).
    pub restart: RestartPolicy,
    /// Liveness check: the supervisor pings the instance over its control channel this often
    /// and declares it failed ("missed liveness deadline") if the answer takes longer than
    /// [`call_timeout`](Self::call_timeout). Catches a hung service with no exit in flight.
    /// Zero (the library default) disables it; `bulkhead run` uses 250 ms.
    pub liveness_interval: Duration,
    /// How long one I/O call of the service (a disk write or flush, marked in the ring with
    /// [`ipc::IoMarker`]) may take before the service counts as hung. Meanwhile forwarded exits
    /// and pings wait for it rather than failing at [`call_timeout`](Self::call_timeout).
    pub io_deadline: Duration,
    /// The VM's cgroup: every instance is moved into its child group named after the service,
    /// before it is handed its set-up.
    pub cgroup: Option<Arc<crate::cgroup::KeptCgroup>>,
    /// The VM's privileged helper, which creates the instances (with the VM's service ids)
    /// when the core runs as root; `None`: the core creates them itself.
    pub helper: Option<Arc<crate::helper::Helper>>,
    /// Ends the VM when the kernel's OOM killer ended an instance (the VM outgrew its cgroup's
    /// memory limit): the VM ends as a whole rather than lose a device. `None`: the instance is
    /// restarted like any other that died.
    pub stop: Option<crate::control::StopHandle>,
}

impl From<Duration> for ServiceOptions {
    /// The defaults with `call_timeout` set to the given deadline.
    fn from(call_timeout: Duration) -> Self {
        Self { call_timeout, ..Self::default() }
    }
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            ring_capacity: 64,
            call_timeout: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(5),
            core_spin: Duration::from_micros(100),
            service_idle_spin: Duration::from_micros(200),
            restart: RestartPolicy::DISABLED,
            liveness_interval: Duration::ZERO,
            io_deadline: Duration::from_secs(30),
            cgroup: None,
            helper: None,
            stop: None,
        }
    }
}

/// What a service process runs: an executable and the name it is started under (its `argv[0]`).
///
/// Normally the core's own executable, the multi-call `bulkhead`, started as `bulkhead-console`,
/// `bulkhead-block` or `bulkhead-net` (it dispatches on `argv[0]`): then the core and every
/// service of every VM map one file and share its text pages. With `--service-dir`, stand-alone
/// service binaries from that directory, each under its own path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// `argv[0]`.
    pub argv0: std::ffi::OsString,
}

impl Program {
    /// A stand-alone service binary, started under its own path.
    pub fn standalone(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self { argv0: path.clone().into_os_string(), path }
    }

    /// The multi-call binary at `path`, started as `service` (e.g. `bulkhead-console`).
    pub fn multi_call(path: impl Into<PathBuf>, service: &str) -> Self {
        Self { path: path.into(), argv0: service.into() }
    }

    /// `path` or, for the multi-call binary, `path as argv0`, for logs.
    pub fn shown(&self) -> String {
        if self.argv0 == self.path.as_os_str() {
            self.path.display().to_string()
        } else {
            format!("{} as {}", self.path.display(), self.argv0.to_string_lossy())
        }
    }
}

/// What to start.
#[derive(Debug)]
pub struct ServiceSpec {
    /// Instance name, for logs.
    pub name: String,
    /// What the service process runs.
    pub program: Program,
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
    /// Reads answered from the service's read mirror, without a round trip.
    pub mirrored: u64,
    /// Writes posted: queued on the ring without the vCPU waiting for the service (those the
    /// service declares postable, [`ipc::mirror::POSTED_WRITE`]).
    pub posted: u64,
    /// Accesses the service answered with a rejection (reads saw all-ones).
    pub rejected: u64,
    /// Accesses completed with the failure value because the service had failed.
    pub failures: u64,
    /// Accesses that were in flight when an instance failed and were completed against the
    /// next instance.
    pub redone: u64,
}

/// The instance a [`RemoteDevice`] currently forwards to.
#[derive(Debug)]
struct Current {
    ring: Arc<CoreEndpoint>,
    pid: u32,
    generation: u64,
}

/// How the supervisor learns of failures a vCPU saw on the ring (missed deadline, protocol
/// violation): a queue and an eventfd it polls with the instance's pidfd.
#[derive(Debug)]
struct Inbox {
    faults: Mutex<VecDeque<(u64, String)>>,
    wake: EventFd,
}

/// Most failure reports queued; more are dropped (one per generation is enough).
const INBOX_MAX: usize = 64;
/// Times one access is retried against fresh instances before it completes with the failure value.
const MAX_REDO: u32 = 3;

impl Inbox {
    fn new() -> Result<Self, ServiceError> {
        Ok(Self {
            faults: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?,
        })
    }

    fn push(&self, generation: u64, why: String) {
        let mut q = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() < INBOX_MAX {
            q.push_back((generation, why));
        }
        drop(q);
        let _ = self.wake.write(1);
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }

    fn wake_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the EventFd owns this fd and outlives the borrow (tied to `&self`).
        unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) }
    }

    /// The first report about `generation`, discarding the rest (stale ones included).
    fn take_for(&self, generation: u64) -> Option<String> {
        let mut q = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let found = q.iter().find(|(g, _)| *g == generation).map(|(_, w)| w.clone());
        q.clear();
        found
    }
}

/// A device whose accesses are forwarded to a service process over the exit ring.
///
/// The instance behind it may change: when the supervisor restarts the service it swaps in the
/// new instance's ring, and an access that was in flight on the old one waits (bounded by the
/// restart policy's `restart_wait`) and is then completed against the new instance.
#[derive(Debug)]
pub struct RemoteDevice {
    name: String,
    space: AddressSpace,
    current: Mutex<Current>,
    changed: Condvar,
    inbox: Arc<Inbox>,
    restartable: bool,
    restart_wait: Duration,
    /// Longest wait for one forwarded exit, in µs (changed live by `set_supervision`).
    timeout_us: AtomicU64,
    /// [`ServiceOptions::io_deadline`] in µs.
    io_deadline_us: AtomicU64,
    failed: AtomicBool,
    /// The restart cap was reached and a last instance presents the failed device to the guest
    /// (accesses are still forwarded to it).
    given_up: AtomicBool,
    reason: Mutex<Option<String>>,
    forwarded: AtomicU64,
    mirrored: AtomicU64,
    posted: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
    redone: AtomicU64,
}

impl RemoteDevice {
    /// Service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pid of the current service instance.
    pub fn pid(&self) -> u32 {
        self.lock_current().pid
    }

    /// Instance number: 0 for the first, incremented by every restart.
    pub fn generation(&self) -> u64 {
        self.lock_current().generation
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the current instance last published about itself in its ring (asleep, heartbeat).
    pub fn service_activity(&self) -> ipc::ServiceActivity {
        self.lock_current().ring.service_activity()
    }

    /// Counters.
    pub fn stats(&self) -> RemoteStats {
        RemoteStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            mirrored: self.mirrored.load(Ordering::Relaxed),
            posted: self.posted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            redone: self.redone.load(Ordering::Relaxed),
        }
    }

    /// Whether the device has failed for good: either all later accesses fail fast, or (a
    /// virtio device past its restart cap) a last instance answers them as a failed device
    /// showing DEVICE_NEEDS_RESET.
    pub fn is_failed(&self) -> bool {
        self.closed() || self.given_up.load(Ordering::SeqCst)
    }

    /// Whether accesses fail fast (all-ones reads, dropped writes) instead of being forwarded.
    fn closed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Marks a device a last instance now presents as failed (DEVICE_NEEDS_RESET): logged once;
    /// accesses keep being forwarded.
    fn mark_given_up(&self, why: &str) {
        if self.given_up.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
            log::error!(
                "service {} (pid {}) marked FAILED: {why}; the VM keeps running, the guest sees DEVICE_NEEDS_RESET",
                self.name,
                self.pid()
            );
        }
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
        let pid = self.pid();
        if self.failed.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            // The reason the device was given up on stays the one reported.
            if reason.is_none() {
                *reason = Some(why.to_string());
            }
            drop(reason);
            match kind {
                // `why` reads "killed by seccomp: syscall NAME (NR)" (or the signal fallback).
                Failure::Seccomp => log::error!(
                    "service {} (pid {pid}) {why}; its reads now return all-ones and writes are dropped",
                    self.name
                ),
                Failure::Error => log::error!(
                    "service {} (pid {pid}) failed: {why}; its reads now return all-ones and writes are dropped",
                    self.name
                ),
                Failure::GaveUp => log::error!(
                    "service {} (pid {pid}) marked FAILED: {why}; the VM keeps running, the device's reads now \
                     return all-ones and writes are dropped",
                    self.name
                ),
                Failure::Orderly => log::info!("service {} (pid {pid}) stopped: {why}", self.name),
                Failure::OutOfMemory => log::error!("{why}; ending the VM"),
                Failure::LastInstance => log::error!(
                    "service {} (pid {pid}), which presented the failed device, ended: {why}; falling back: its \
                     reads now return all-ones and writes are dropped",
                    self.name
                ),
            }
        }
        let cur = self.lock_current();
        cur.ring.abort();
        drop(cur);
        self.changed.notify_all();
    }

    /// Swaps in a fresh instance and wakes accesses waiting for it.
    fn install(&self, ring: Arc<CoreEndpoint>, pid: u32) {
        let mut cur = self.lock_current();
        cur.ring.abort();
        *cur = Current { ring, pid, generation: cur.generation + 1 };
        drop(cur);
        self.changed.notify_all();
    }

    /// Waits (at most `limit`) until an instance newer than `generation` serves, or the device
    /// failed. Returns whether a newer instance is there.
    fn wait_for_newer(&self, generation: u64, limit: Duration) -> bool {
        let cur = self.lock_current();
        let (cur, _) = self
            .changed
            .wait_timeout_while(cur, limit, |c| c.generation == generation && !self.closed())
            .unwrap_or_else(|e| e.into_inner());
        cur.generation != generation && !self.closed()
    }

    fn forward(&self, kind: ExitKind, addr: u64, req: Option<ExitRequest>, len: usize) -> Option<[u8; 8]> {
        let Some(req) = req else {
            // An access size the ring cannot carry: not the service's fault, complete it locally.
            crate::warn_limited!("service {}: {len}-byte {kind:?} at {addr:#x} not forwarded", self.name);
            return None;
        };
        // Bounded: at most MAX_REDO + 1 attempts, each bounded by the call deadline plus the
        // restart wait.
        for attempt in 0..=MAX_REDO {
            if self.closed() {
                break;
            }
            let (ring, generation) = {
                let cur = self.lock_current();
                (cur.ring.clone(), cur.generation)
            };
            // Counts an access answered by `how`; one answered by a later instance is redone.
            let answered = |how: &AtomicU64| {
                how.fetch_add(1, Ordering::Relaxed);
                if attempt > 0 {
                    self.redone.fetch_add(1, Ordering::Relaxed);
                }
            };
            // A register the service publishes (no read side effect): answered here, as the
            // service would have, with no round trip.
            if let Some(reply) = ring.read_mirror(&req) {
                answered(&self.mirrored);
                return Some(reply.data);
            }
            let timeout = Duration::from_micros(self.timeout_us.load(Ordering::Relaxed));
            let io_deadline = Duration::from_micros(self.io_deadline_us.load(Ordering::Relaxed));
            // A write that changes only the service's own registers (it says which): queued,
            // and the vCPU goes on. Ordered before every later access on this ring, carried to
            // the next instance if this one dies before taking it.
            let posted = if kind.is_read() { Ok(false) } else { ring.post(&req) };
            let result = match posted {
                Ok(true) => {
                    answered(&self.posted);
                    return Some([0; 8]);
                }
                Ok(false) => ring.call_with_io(&req, timeout, io_deadline),
                Err(e) => Err(e),
            };
            match result {
                Ok(reply) => {
                    answered(&self.forwarded);
                    if reply.status == Status::Rejected {
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    return Some(reply.data);
                }
                Err(e) => {
                    let why = match &e {
                        IpcError::Timeout(t) => format!("no reply to a {kind:?} at {addr:#x} within {t:?}"),
                        other => format!("{other} (on a {kind:?} at {addr:#x})"),
                    };
                    if !self.restartable {
                        self.mark_failed(&why, true);
                        break;
                    }
                    // The supervisor kills what is left of this instance and starts a new one;
                    // this access is then completed against it.
                    if !matches!(e, IpcError::Aborted) {
                        self.inbox.push(generation, why);
                    }
                    if !self.wait_for_newer(generation, self.restart_wait) {
                        break;
                    }
                }
            }
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        None
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
                ipc::ring::copy_access(data, &bytes);
            }
            None => {
                ipc::ring::fill_access(data, 0xff);
            }
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
    /// The restart policy gave up (`log::error!`).
    GaveUp,
    /// The last instance, which presented the failed device, ended (`log::error!`).
    LastInstance,
    /// The kernel's OOM killer ended it and the VM ends with it (`log::error!`).
    OutOfMemory,
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

/// The current instance's management side, shared by the handle, [`ServiceRef`]s and the
/// supervisor thread.
#[derive(Debug)]
struct Ctl {
    control: ControlChannel,
    pid: u32,
    pidfd: OwnedFd,
    next_token: u64,
    /// Highest `Pong` token received from this instance (by a stats request or the liveness
    /// check, whoever read it).
    pong_seen: u64,
    /// A `SeccompViolation` report read off the channel before the death was noticed.
    seccomp: Option<(u32, u32)>,
    /// Requests this instance redid from the state region, as its latest `Pong` said.
    redone_seen: u64,
    /// The instance holds a request its error policy stops the VM for (`IoStopped`), not yet
    /// taken up by the VMM.
    io_stop: Option<String>,
}

impl Ctl {
    fn new(control: ControlChannel, pid: u32, pidfd: OwnedFd) -> Self {
        Self { control, pid, pidfd, next_token: 1, pong_seen: 0, seccomp: None, redone_seen: 0, io_stop: None }
    }

    /// Notes what a message read for someone else says about the instance: a `Pong` to a ping
    /// this side sent proves it alive; a seccomp report is kept for the death that follows; an
    /// `IoStopped` waits for the VMM to stop the VM.
    /// Returns whether the message was one of those. A `Pong` with a token never sent is forged
    /// (a service cannot answer a ping it has not received): it is dropped, so a compromised
    /// service cannot answer future pings in advance and hide a hang.
    fn note(&mut self, msg: &ControlMsg) -> bool {
        match *msg {
            ControlMsg::Pong { token, stats } => {
                if token == 0 || token >= self.next_token {
                    crate::warn_limited!(
                        "service (pid {}): dropped a pong for token {token}, never sent (next is {})",
                        self.pid,
                        self.next_token
                    );
                    return true;
                }
                self.pong_seen = self.pong_seen.max(token);
                self.redone_seen = self.redone_seen.max(stats.redone);
                true
            }
            ControlMsg::SeccompViolation { syscall, arch } => {
                self.seccomp = Some((syscall, arch));
                true
            }
            ControlMsg::IoStopped { ref reason } => {
                self.io_stop = Some(ipc::control::bounded_reason(reason).to_string());
                true
            }
            // The late answer to an inspection whose wait ended: dropped.
            ControlMsg::Inspected { token, .. } => token != 0 && token < self.next_token,
            _ => false,
        }
    }

    /// Reads whatever is queued on the control channel without waiting (at most 16 messages),
    /// noting pongs and seccomp reports; anything else is logged and dropped.
    fn drain(&mut self, name: &str) {
        for _ in 0..16 {
            match self.control.recv_now() {
                Ok((msg, _)) => {
                    if !self.note(&msg) {
                        crate::warn_limited!(
                            "service {name} (pid {}): ignoring unexpected control message {msg:?}",
                            self.pid
                        );
                    }
                }
                Err(ControlError::Decode(_) | ControlError::TooManyFds(_)) => continue,
                Err(_) => return,
            }
        }
    }

    /// A fresh token for a request.
    fn next_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Sends a `Ping` and returns its token.
    fn ping(&mut self) -> Result<u64, ControlError> {
        let token = self.next_token();
        self.control.send_now(&ControlMsg::Ping { token }, &[])?;
        Ok(token)
    }

    /// The seccomp report of an instance killed by SIGSYS: kept from an earlier read, or still
    /// queued.
    fn seccomp_report(&mut self) -> Option<(u32, u32)> {
        self.seccomp.take().or_else(|| read_seccomp_report(&self.control))
    }
}

/// What a [`ServiceHandle`] and its [`ServiceRef`]s share with the supervisor thread.
#[derive(Debug)]
struct Shared {
    name: String,
    device: Arc<RemoteDevice>,
    ctl: Mutex<Ctl>,
    stopping: AtomicBool,
    stop_timeout_ms: AtomicU64,
    metrics: Mutex<Metrics>,
    /// The device's state region (for `corrupt-state`), if it has one.
    state: Option<OwnedFd>,
    /// The VM is paused: the service must not serve, and a dead instance is replaced only once
    /// this is cleared.
    paused: AtomicBool,
    /// How new instances are started; changed by live updates (rate limits, a new image) so that
    /// a replacement starts with them too.
    recipe: Mutex<Recipe>,
    /// The supervision options in the recipe changed: the supervisor takes them up.
    options_changed: AtomicBool,
}

impl Shared {
    fn lock_ctl(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The control side if no one else holds it (a poisoned lock is taken over), without
    /// waiting.
    fn try_lock_ctl(&self) -> Option<std::sync::MutexGuard<'_, Ctl>> {
        match self.ctl.try_lock() {
            Ok(c) => Some(c),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn lock_recipe(&self) -> std::sync::MutexGuard<'_, Recipe> {
        self.recipe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the control channel until `want` picks the reply (or `deadline`), noting pongs and
    /// seccomp reports on the way; anything else is an error.
    fn await_reply<T>(
        &self,
        ctl: &mut Ctl,
        deadline: Instant,
        want: impl Fn(&ControlMsg) -> Option<T>,
    ) -> Result<T, ServiceError> {
        // Bounded: each iteration consumes one message or hits the deadline.
        loop {
            let (msg, _) = ctl.control.recv(deadline).map_err(|e| self.control_error(e))?;
            if let Some(reply) = want(&msg) {
                return Ok(reply);
            }
            // Pongs to the liveness check's pings and seccomp reports are noted for it.
            if !ctl.note(&msg) {
                return Err(ServiceError::Unexpected { name: self.name.clone(), msg: format!("{msg:?}") });
            }
        }
    }

    /// Sends `Pause` to the current instance and waits for `Paused`. A device that failed for
    /// good has no instance to pause.
    fn pause_current(&self, timeout: Duration) -> Result<(), ServiceError> {
        if self.device.closed() {
            return Ok(());
        }
        let mut ctl = self.lock_ctl();
        let token = ctl.next_token();
        ctl.control.send_now(&ControlMsg::Pause { token }, &[]).map_err(|e| self.control_error(e))?;
        self.await_reply(&mut ctl, Instant::now() + timeout, |m| {
            matches!(m, ControlMsg::Paused { token: t } if *t == token).then_some(())
        })
    }

    fn control_error(&self, source: ControlError) -> ServiceError {
        ServiceError::Control { name: self.name.clone(), source }
    }

    /// Swaps in the control side of a new instance. The old instance's last answers (read off
    /// its channel first) tell how many requests it redid; that count goes into the metrics.
    fn replace_ctl(&self, new: Ctl) -> std::sync::MutexGuard<'_, Ctl> {
        let mut ctl = self.lock_ctl();
        ctl.drain(&self.name);
        let mut m = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        // Saturating: the count comes from the (untrusted) service.
        m.redone_by_earlier = m.redone_by_earlier.saturating_add(ctl.redone_seen);
        drop(m);
        *ctl = new;
        ctl
    }
}

/// A change of a running service's supervision (`PATCH /bulkhead/devices/{id}`); `None` keeps
/// the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SupervisionUpdate {
    /// Restarts and their window.
    pub restart_max: Option<(u32, Duration)>,
    /// Immediate restarts and their window.
    pub restart_burst: Option<(u32, Duration)>,
    /// Liveness ping interval (zero: off).
    pub liveness_interval: Option<Duration>,
    /// Deadline of a forwarded exit and of a ping.
    pub call_timeout: Option<Duration>,
}

/// The supervision in force for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisionInForce {
    /// Restarts and their window.
    pub restart_max: (u32, Duration),
    /// Immediate restarts and their window.
    pub restart_burst: (u32, Duration),
    /// Liveness ping interval (zero: off).
    pub liveness_interval: Duration,
    /// Deadline of a forwarded exit and of a ping.
    pub call_timeout: Duration,
}

/// What a service is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// An instance serves the device.
    Serving,
    /// The VM is paused, and so is the service.
    Paused,
    /// The instance died and its replacement is not serving yet.
    Restarting,
    /// Past the restart cap: the device failed for good.
    Failed,
}

impl ServiceState {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Paused => "paused",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
        }
    }
}

/// A cloneable reference to a supervised service, for the API socket and fault schedules.
#[derive(Debug, Clone)]
pub struct ServiceRef(Arc<Shared>);

impl ServiceRef {
    /// Service name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Pid of the current instance.
    pub fn pid(&self) -> u32 {
        self.0.lock_ctl().pid
    }

    /// The device this service backs.
    pub fn device(&self) -> &Arc<RemoteDevice> {
        &self.0.device
    }

    /// Sends `SIGKILL` to the current instance (through its pidfd).
    pub fn kill(&self) -> Result<(), ServiceError> {
        let ctl = self.0.lock_ctl();
        kill_service(ctl.pid, ctl.pidfd.as_fd()).map_err(os("pidfd_send_signal"))
    }

    /// Fault injection: tells the current instance to attempt a forbidden action (its filter
    /// then kills it by SIGSYS, which the supervisor logs).
    pub fn attempt_forbidden(&self, action: ForbiddenAction) -> Result<(), ServiceError> {
        self.0
            .lock_ctl()
            .control
            .send_now(&ControlMsg::AttemptForbidden(action), &[])
            .map_err(|e| self.0.control_error(e))
    }

    /// Injects `action` (see [`FaultAction`]) into the current instance; returns what was done.
    /// Logged with a timestamp by the core's logger.
    pub fn inject(&self, action: FaultAction) -> Result<String, ServiceError> {
        let ctl = self.0.lock_ctl();
        let pid = ctl.pid;
        log::warn!("fault injection: {action} into service {} (pid {pid})", self.0.name);
        let send = |msg: ControlMsg| ctl.control.send_now(&msg, &[]).map_err(|e| self.0.control_error(e));
        match action {
            FaultAction::Kill => kill_service(ctl.pid, ctl.pidfd.as_fd()).map_err(os("pidfd_send_signal"))?,
            FaultAction::Crash => send(ControlMsg::InjectFault(ServiceFault::Crash))?,
            FaultAction::Abort => send(ControlMsg::InjectFault(ServiceFault::Abort))?,
            FaultAction::Segv => send(ControlMsg::InjectFault(ServiceFault::Segv))?,
            FaultAction::Hang => send(ControlMsg::InjectFault(ServiceFault::Hang))?,
            FaultAction::Slow { ms } => send(ControlMsg::InjectFault(ServiceFault::Slow { ms }))?,
            FaultAction::SlowIo { ms } => send(ControlMsg::InjectFault(ServiceFault::SlowIo { ms }))?,
            FaultAction::CorruptReply => send(ControlMsg::InjectFault(ServiceFault::CorruptReply))?,
            FaultAction::Leak => send(ControlMsg::InjectFault(ServiceFault::Leak))?,
            FaultAction::Seccomp => send(ControlMsg::AttemptForbidden(ForbiddenAction::Execve))?,
            FaultAction::CorruptState => {
                let Some(state) = &self.0.state else {
                    return Err(ServiceError::NoStateRegion { name: self.0.name.clone() });
                };
                corrupt_state(state.as_fd()).map_err(os("corrupting the state region"))?;
                kill_service(ctl.pid, ctl.pidfd.as_fd()).map_err(os("pidfd_send_signal"))?;
            }
        }
        Ok(format!("{action} injected into service {} (pid {pid})", self.0.name))
    }

    /// Waits (at most `limit`, in 2 ms steps) until the current instance is alive, answers a
    /// ping, and is not `not_pid` (an instance a fatal fault was already sent to): while one
    /// that has died is being replaced, a fault injected into it would be lost. Returns whether
    /// such an instance is there (false if the device failed for good or the wait ran out).
    pub fn wait_alive(&self, not_pid: Option<u32>, limit: Duration) -> bool {
        let start = Instant::now();
        // Bounded: each iteration sleeps 2 ms until `limit`.
        loop {
            if self.0.device.is_failed() {
                return false;
            }
            let exited = {
                let ctl = self.0.lock_ctl();
                // A pidfd turns readable when its process exits.
                Some(ctl.pid) == not_pid || ipc::wait::wait_readable(ctl.pidfd.as_fd(), Duration::ZERO).unwrap_or(true)
            };
            let left = limit.saturating_sub(start.elapsed());
            // Serving means answering: a ping round trip also tells the requests the instance
            // redid at its start before a fault can end it.
            if !exited && self.stats(left.min(Duration::from_secs(1))).is_ok() {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Supervision metrics.
    pub fn metrics(&self) -> ServiceMetrics {
        let m = self.0.metrics.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stats = self.0.device.stats();
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let summary = m.summary();
        ServiceMetrics {
            name: self.0.name.clone(),
            pid: self.pid(),
            restarts: m.restarts,
            last_restart_us: summary.map(|s| us(s.0)),
            median_restart_us: summary.map(|s| us(s.1)),
            max_restart_us: summary.map(|s| us(s.2)),
            exits_forwarded: stats.forwarded,
            exits_mirrored: stats.mirrored,
            exits_posted: stats.posted,
            exits_redone: stats.redone,
            requests_redone: m.redone_by_earlier.saturating_add(self.0.lock_ctl().redone_seen),
            exits_failed: stats.failures,
            failed: m.failed.or_else(|| self.0.device.failure()),
        }
    }

    /// Why the service holds a request and asks for the VM to be stopped (its disk's error
    /// policy, [`ControlMsg::IoStopped`]), once. Reads what the control channel has queued if no
    /// one else is using it; never waits.
    pub fn take_io_stop(&self) -> Option<String> {
        let mut ctl = self.0.try_lock_ctl()?;
        ctl.drain(&self.0.name);
        ctl.io_stop.take()
    }

    /// Asks the current instance for its counters (`Ping`/`Pong`), waiting at most `timeout`.
    pub fn stats(&self, timeout: Duration) -> Result<ServiceStats, ServiceError> {
        let mut ctl = self.0.lock_ctl();
        let token = ctl.ping().map_err(|e| self.0.control_error(e))?;
        let reply = self.0.await_reply(&mut ctl, Instant::now() + timeout, |m| match m {
            ControlMsg::Pong { token: t, stats } if *t == token => Some(*stats),
            _ => None,
        })?;
        Ok(reply)
    }

    /// Pauses the service (see [`ControlMsg::Pause`]), waiting at most `timeout` for the
    /// acknowledgement. Until [`resume`](Self::resume), an instance that dies is not replaced
    /// (its replacement would serve at once), and one that was being started is paused as soon as
    /// it is in place.
    pub fn pause(&self, timeout: Duration) -> Result<(), ServiceError> {
        self.0.paused.store(true, Ordering::SeqCst);
        self.0.pause_current(timeout)
    }

    /// Lets the service serve again; a replacement held back while paused starts now.
    pub fn resume(&self, timeout: Duration) -> Result<(), ServiceError> {
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.device.inbox.wake();
        if self.0.device.closed() {
            return Ok(());
        }
        let mut ctl = self.0.lock_ctl();
        let token = ctl.next_token();
        ctl.control.send_now(&ControlMsg::Resume { token }, &[]).map_err(|e| self.0.control_error(e))?;
        self.0.await_reply(&mut ctl, Instant::now() + timeout, |m| {
            matches!(m, ControlMsg::Resumed { token: t } if *t == token).then_some(())
        })
    }

    /// Whether the service is paused.
    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::SeqCst)
    }

    /// Changes how the service is supervised, from now on: the restart cap and burst, the
    /// liveness interval and the deadline of a forwarded exit or a ping.
    pub fn set_supervision(&self, update: &SupervisionUpdate) {
        {
            let mut recipe = self.0.lock_recipe();
            let o = &mut recipe.options;
            if let Some((max, window)) = update.restart_max {
                o.restart.max_restarts = max;
                o.restart.window = window;
            }
            if let Some((burst, window)) = update.restart_burst {
                o.restart.burst = burst;
                o.restart.burst_window = window;
            }
            if let Some(interval) = update.liveness_interval {
                o.liveness_interval = interval;
            }
            if let Some(deadline) = update.call_timeout {
                o.call_timeout = deadline;
                let us = u64::try_from(deadline.as_micros()).unwrap_or(u64::MAX);
                self.0.device.timeout_us.store(us, Ordering::Relaxed);
            }
        }
        self.0.options_changed.store(true, Ordering::SeqCst);
        self.0.device.inbox.wake();
        log::info!("service {}: supervision now {:?}", self.0.name, self.supervision());
    }

    /// The supervision in force.
    pub fn supervision(&self) -> SupervisionInForce {
        let r = self.0.lock_recipe();
        let o = &r.options;
        SupervisionInForce {
            restart_max: (o.restart.max_restarts, o.restart.window),
            restart_burst: (o.restart.burst, o.restart.burst_window),
            liveness_interval: o.liveness_interval,
            call_timeout: o.call_timeout,
        }
    }

    /// What a service is doing now.
    pub fn state(&self) -> ServiceState {
        if self.0.device.is_failed() {
            return ServiceState::Failed;
        }
        let exited = {
            let ctl = self.0.lock_ctl();
            // A pidfd turns readable when its process exits.
            ipc::wait::wait_readable(ctl.pidfd.as_fd(), Duration::ZERO).unwrap_or(true)
        };
        if exited {
            ServiceState::Restarting
        } else if self.is_paused() {
            ServiceState::Paused
        } else {
            ServiceState::Serving
        }
    }

    /// Death → serving of each restart so far (the last [`supervisor::LATENCY_SAMPLES`]).
    pub fn restart_latencies(&self) -> Vec<Duration> {
        self.0.metrics.lock().unwrap_or_else(|e| e.into_inner()).latencies.iter().copied().collect()
    }

    /// Why the last failed instance failed.
    pub fn last_failure(&self) -> Option<String> {
        self.0.metrics.lock().unwrap_or_else(|e| e.into_inner()).last_failure.clone()
    }

    /// Replaces the device's rate limits: in the recipe (so a replacement starts with them) and
    /// in the current instance, which acknowledges within `timeout`.
    pub fn set_rate_limit(&self, limits: RateLimitUpdate, timeout: Duration) -> Result<(), ServiceError> {
        {
            let mut recipe = self.0.lock_recipe();
            match (&mut recipe.device, limits) {
                (DeviceConfig::Block(b), RateLimitUpdate::Block(l)) => b.rate_limit = l,
                (DeviceConfig::Net(n), RateLimitUpdate::Net { rx, tx }) => {
                    n.rx_rate_limit = rx;
                    n.tx_rate_limit = tx;
                }
                _ => {
                    return Err(ServiceError::Unsupported {
                        name: self.0.name.clone(),
                        what: "these rate limits are for another kind of device",
                    })
                }
            }
        }
        if self.0.device.closed() {
            return Ok(());
        }
        let mut ctl = self.0.lock_ctl();
        let token = ctl.next_token();
        ctl.control.send_now(&ControlMsg::SetRateLimit { token, limits }, &[]).map_err(|e| self.0.control_error(e))?;
        let applied = self.0.await_reply(&mut ctl, Instant::now() + timeout, |m| match m {
            ControlMsg::RateLimitSet { token: t, applied } if *t == token => Some(*applied),
            _ => None,
        })?;
        if !applied {
            return Err(ServiceError::Unsupported {
                name: self.0.name.clone(),
                what: "the service refused the limits",
            });
        }
        Ok(())
    }

    /// The current instance's live state ([`ControlMsg::Inspect`]), answered within `timeout`.
    /// The core relays it as the service wrote it.
    pub fn inspect(&self, timeout: Duration) -> Result<ServiceReport, ServiceError> {
        if self.0.device.closed() {
            return Err(ServiceError::Unsupported {
                name: self.0.name.clone(),
                what: "the device has failed for good",
            });
        }
        let mut ctl = self.0.lock_ctl();
        let token = ctl.next_token();
        ctl.control.send_now(&ControlMsg::Inspect { token }, &[]).map_err(|e| self.0.control_error(e))?;
        self.0.await_reply(&mut ctl, Instant::now() + timeout, |m| match m {
            ControlMsg::Inspected { token: t, report } if *t == token => Some((**report).clone()),
            _ => None,
        })
    }

    /// Gives a block device a new image (`file`, opened by the core): the current instance is
    /// replaced by one serving it, through the restart path, so the guest sees the new medium
    /// (its size included) and no error. Requests in flight are redone against the new image.
    pub fn replace_disk(&self, image: crate::image::Image) -> Result<(), ServiceError> {
        let crate::image::Image { file, witness } = image;
        let size = file.metadata().map_err(os("stat of the new image"))?.len();
        {
            let mut recipe = self.0.lock_recipe();
            let DeviceConfig::Block(b) = &mut recipe.device else {
                return Err(ServiceError::Unsupported { name: self.0.name.clone(), what: "only a disk has an image" });
            };
            b.disk_size = size;
            let Some(slot) = recipe.fds.iter_mut().find(|(role, _)| *role == FdRole::Disk) else {
                return Err(ServiceError::Unsupported { name: self.0.name.clone(), what: "no image fd to replace" });
            };
            slot.1 = OwnedFd::from(file);
            recipe.fds.retain(|(role, _)| *role != FdRole::DiskWitness);
            if let Some(w) = witness {
                recipe.fds.push((FdRole::DiskWitness, OwnedFd::from(w)));
            }
        }
        log::info!("service {}: new image ({size} bytes): replacing the instance", self.0.name);
        self.kill()
    }
}

/// Corrupts the state region: flips the checksum field of both cold-state slots (so a committed
/// slot no longer validates) and the first hot word. Only `corrupt-state` does this; the core
/// never reads the region otherwise.
fn corrupt_state(fd: BorrowedFd<'_>) -> io::Result<()> {
    let file = fs::File::from(fd.try_clone_to_owned()?);
    let checksum = SLOT_HEADER_LEN as u64 - 8;
    for offset in [checksum, SLOT_LEN as u64 + checksum, HOT_OFFSET as u64] {
        let mut buf = [0u8; 8];
        file.read_exact_at(&mut buf, offset)?;
        for b in &mut buf {
            *b ^= 0xa5;
        }
        file.write_all_at(&buf, offset)?;
    }
    Ok(())
}

/// A supervised service: its current instance, the supervisor thread that restarts it per its
/// [`RestartPolicy`], and its control channel.
#[derive(Debug)]
pub struct ServiceHandle {
    shared: Arc<Shared>,
    exit_rx: Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    supervisor: Option<JoinHandle<()>>,
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("ended ({status})"),
    }
}

impl ServiceHandle {
    /// Pid of the current instance.
    pub fn pid(&self) -> u32 {
        self.shared.lock_ctl().pid
    }

    /// Service name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The device this service backs.
    pub fn device(&self) -> &Arc<RemoteDevice> {
        &self.shared.device
    }

    /// A cloneable reference for other threads (API socket, fault schedules).
    pub fn remote(&self) -> ServiceRef {
        ServiceRef(self.shared.clone())
    }

    /// Supervision metrics.
    pub fn metrics(&self) -> ServiceMetrics {
        self.remote().metrics()
    }

    /// Asks the service for its counters (`Ping`/`Pong`), waiting at most `timeout`.
    pub fn stats(&mut self, timeout: Duration) -> Result<ServiceStats, ServiceError> {
        self.remote().stats(timeout)
    }

    /// Fault injection: tells the service to attempt a forbidden action (its filter then kills
    /// it by SIGSYS, which the supervisor logs).
    pub fn attempt_forbidden(&self, action: ForbiddenAction) -> Result<(), ServiceError> {
        self.remote().attempt_forbidden(action)
    }

    /// Sends `SIGKILL` to the current instance (through its pidfd, so never to a recycled pid).
    pub fn kill(&self) -> Result<(), ServiceError> {
        self.remote().kill()
    }

    /// The exit status, once the service ended for good (stopped, or failed with no restart left).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.exit_rx.try_recv().ok();
        }
        self.status
    }

    /// Stops the service: `Shutdown`, up to `timeout` for it to exit, then `SIGKILL`. Always
    /// reaps it (the supervisor does) unless the kernel fails to deliver `SIGKILL` within 5 s.
    /// Returns the exit status, `None` only in that last case (which is logged).
    pub fn shutdown(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.stop(timeout)
    }

    fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            self.join();
            return Some(s);
        }
        self.shared.stop_timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        // A dead or wedged service may not read this; the supervisor's timeout covers it.
        let _ = self.shared.lock_ctl().control.send_now(&ControlMsg::Shutdown, &[]);
        self.shared.device.inbox.wake();
        let status = self.exit_rx.recv_timeout(timeout + Duration::from_secs(5)).ok();
        match status {
            Some(s) => {
                self.status = Some(s);
                self.join();
            }
            None => log::error!("service {} (pid {}) could not be reaped", self.shared.name, self.pid()),
        }
        status
    }

    fn join(&mut self) {
        if let Some(w) = self.supervisor.take() {
            let _ = w.join();
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.stop(Duration::from_millis(500));
        }
    }
}

/// SIGKILLs service `pid` through its pidfd; if this process may not signal it (the jailed
/// core: another uid), through the VM's helper, which created it.
pub(crate) fn kill_service(pid: u32, pidfd: BorrowedFd<'_>) -> io::Result<()> {
    match pidfd_signal_kill(pidfd) {
        // EPERM: another uid; EINVAL: outside the caller's PID namespace (a split's core).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => match crate::helper::current() {
            Some(h) => h.kill(pid),
            None => Err(e),
        },
        r => r,
    }
}

/// SIGKILLs the process of `pidfd` (never a recycled pid); a process already gone is no error.
pub fn pidfd_signal_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
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

/// Everything needed to start (again) an instance of a service. The device fds stay here for
/// the service's lifetime; each instance gets its own copies with its set-up message.
#[derive(Debug)]
struct Recipe {
    name: String,
    program: Program,
    device: DeviceConfig,
    fds: Vec<(FdRole, OwnedFd)>,
    options: ServiceOptions,
}

/// A started, ready instance.
struct Instance {
    child: ServiceChild,
    control: ControlChannel,
    ring: Arc<CoreEndpoint>,
    pidfd: OwnedFd,
    /// Posted writes of the failed instance queued on its ring first.
    adopted: usize,
}

/// Starts one instance of `recipe` with a fresh ring: spawn, set-up, wait for `Ready`. Kills and
/// reaps the child on any failure. `carried`: posted writes a dead instance never took, queued
/// on the new ring before the instance starts, so they are the first requests it serves.
fn start_instance(recipe: &Recipe, carried: &[ExitRequest]) -> Result<Instance, ServiceError> {
    let Recipe { name, program, device, fds, options } = recipe;
    let ring = CoreEndpoint::create(
        &format!("bulkhead-{name}-ring"),
        options.ring_capacity,
        WaitConfig { spin: options.core_spin, ..WaitConfig::default() },
    )?;
    let adopted = ring.adopt(carried);
    if adopted < carried.len() {
        log::warn!("service {name}: {} posted writes of the failed instance dropped", carried.len() - adopted);
    }
    let (control, child_ctl) =
        ControlChannel::pair().map_err(|source| ServiceError::Control { name: name.clone(), source })?;
    let child_ctl = child_ctl.into_fd();
    let spawned = match &options.helper {
        Some(h) => h.spawn(program, child_ctl.as_fd()),
        None => spawn::spawn(program, child_ctl.as_fd()),
    };
    let mut child = spawned.map_err(|source| match source {
        SpawnError::NamespacesUnavailable(_) => ServiceError::Sandbox(source),
        SpawnError::Child { step: "execve", source: ref e, .. }
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EACCES)) =>
        {
            let source = io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::ENOENT));
            ServiceError::BinaryMissing { path: program.path.clone(), source }
        }
        source => ServiceError::Spawn { path: program.path.clone(), source },
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
    // Into the VM's cgroup before it reads anything: a service outside it escapes the VM's limits.
    if let Some(cg) = &options.cgroup {
        if let Err(source) = cg.place(name, pid) {
            return Err(abort(&mut child, ServiceError::Cgroup { name: name.clone(), source }));
        }
    }

    let mut roles = vec![FdRole::Ring, FdRole::SubmitBell, FdRole::CompleteBell];
    let mut borrowed = vec![ring.region_fd(), ring.submit_bell(), ring.complete_bell()];
    for (role, fd) in fds {
        roles.push(*role);
        borrowed.push(fd.as_fd());
    }
    let setup = ServiceSetup {
        name: name.clone(),
        jail: child.jail_plan(),
        ring: RingSetup { capacity: ring.capacity(), region_len: ring.region_len() as u64 },
        fds: roles,
        device: device.clone(),
        idle_spin_us: u32::try_from(options.service_idle_spin.as_micros()).unwrap_or(u32::MAX),
    };
    // SCM_RIGHTS gives the child its own copies of the core's originals.
    if let Err(source) = control.send_now(&ControlMsg::Setup(Box::new(setup)), &borrowed) {
        // EPIPE: the child exited before reading its set-up; it never became ready.
        let e = if matches!(source, ControlError::Send(nix::Error::EPIPE)) {
            ServiceError::NotReady { name: name.clone(), pid, source }
        } else {
            ServiceError::Control { name: name.clone(), source }
        };
        return Err(abort(&mut child, e));
    }
    drop(borrowed);

    let ready = match control.recv(Instant::now() + options.ready_timeout) {
        Ok((ControlMsg::Ready { .. }, _)) => Ok(()),
        Ok((ControlMsg::Failed { reason }, _)) => Err(ServiceError::SetupFailed { name: name.clone(), pid, reason }),
        Ok((other, _)) => Err(ServiceError::Unexpected { name: name.clone(), msg: format!("{other:?}") }),
        Err(source) => Err(ServiceError::NotReady { name: name.clone(), pid, source }),
    };
    if let Err(e) = ready {
        return Err(abort(&mut child, e));
    }
    Ok(Instance { child, control, ring: Arc::new(ring), pidfd, adopted })
}

/// Spawns a service, hands it its ring and fds, waits for `Ready` and starts its supervisor
/// thread, which restarts it per `spec.options.restart` (by default: never; the device then
/// fails closed on the first failure).
pub fn spawn_service(spec: ServiceSpec) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    spawn_service_with_state(spec, None)
}

/// [`spawn_service`] for a device with a state region: `state` is a dup the core keeps for the
/// `corrupt-state` fault (the region itself travels in `spec.fds`).
fn spawn_service_with_state(
    spec: ServiceSpec,
    state: Option<OwnedFd>,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let ServiceSpec { name, program, device, fds, space, options } = spec;
    check_binary(&program.path)?;
    let binary_shown = program.shown();
    let recipe = Recipe { name: name.clone(), program, device, fds, options };
    // The first instance starts on the caller's thread (set-up errors reach the caller); later
    // ones on the supervisor thread (their parent-death signal is tied to it, and it lives as
    // long as the service).
    let Instance { mut child, control, ring, pidfd, .. } = start_instance(&recipe, &[])?;
    let pid = child.id();
    let inbox = match Inbox::new() {
        Ok(i) => Arc::new(i),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let dev = Arc::new(RemoteDevice {
        name: name.clone(),
        space,
        current: Mutex::new(Current { ring, pid, generation: 0 }),
        changed: Condvar::new(),
        inbox,
        restartable: recipe.options.restart.enabled(),
        restart_wait: recipe.options.restart.restart_wait,
        timeout_us: AtomicU64::new(u64::try_from(recipe.options.call_timeout.as_micros()).unwrap_or(u64::MAX)),
        io_deadline_us: AtomicU64::new(u64::try_from(recipe.options.io_deadline.as_micros()).unwrap_or(u64::MAX)),
        failed: AtomicBool::new(false),
        given_up: AtomicBool::new(false),
        reason: Mutex::new(None),
        forwarded: AtomicU64::new(0),
        mirrored: AtomicU64::new(0),
        posted: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        redone: AtomicU64::new(0),
    });
    let shared = Arc::new(Shared {
        name: name.clone(),
        device: dev.clone(),
        ctl: Mutex::new(Ctl::new(control, pid, pidfd)),
        stopping: AtomicBool::new(false),
        stop_timeout_ms: AtomicU64::new(500),
        metrics: Mutex::new(Metrics::default()),
        state,
        paused: AtomicBool::new(false),
        recipe: Mutex::new(recipe),
        options_changed: AtomicBool::new(false),
    });
    let (tx, exit_rx) = sync_channel(1);
    let (sh, kill_fd) = (shared.clone(), shared.lock_ctl().pidfd.try_clone().ok());
    // With a helper creating the instances, the supervisor needs no process creation: it runs
    // under its own filter from its start (without one it clones, and a filter would be
    // inherited by the services it creates).
    let confine = shared.lock_recipe().options.helper.is_some();
    let supervisor = std::thread::Builder::new().name(format!("sup-{name}")).spawn(move || {
        if confine {
            crate::jail::confine_or_abort(bulkhead_policies::Policy::CoreSupervisor);
        }
        supervise(&sh, child, &tx)
    });
    let supervisor = match supervisor {
        Ok(w) => w,
        Err(e) => {
            // The closure (and the child) were dropped with the failed spawn: kill by pidfd.
            if let Some(fd) = kill_fd {
                let _ = kill_service(pid, fd.as_fd());
            }
            return Err(ServiceError::Os { what: "spawning the supervisor thread", source: e });
        }
    };
    log::info!("service {name} started as pid {pid} ({binary_shown})");
    let handle = ServiceHandle { shared, exit_rx, status: None, supervisor: Some(supervisor) };
    Ok((dev, handle))
}

/// How the wait for an instance ended.
enum Ended {
    /// It died on its own (or was killed by someone else).
    Died(ExitStatus),
    /// A vCPU reported a missed deadline or protocol violation, or the instance missed its
    /// liveness deadline; the supervisor killed it.
    Faulted(ExitStatus, String),
    /// The handle asked for a stop.
    Stopped(ExitStatus),
}

/// Longest single sleep of the supervisor (it re-checks the stop flag after each).
const SUPERVISOR_SLICE: Duration = Duration::from_secs(1);

/// Waits until the current instance dies, is reported faulty or misses its liveness deadline
/// (then kills it) or a stop is asked (then gives it the stop timeout and kills it). Always
/// reaps. `liveness` is this instance's check (created when it became ready): its pings go over
/// the control channel only, so they cost nothing on the exit path, and none is sent outside
/// this wait (so never while a restart is in progress).
fn wait_instance(
    shared: &Shared,
    child: &mut ServiceChild,
    restartable: bool,
    liveness: &mut Liveness,
) -> io::Result<Ended> {
    let inbox = &shared.device.inbox;
    let generation = shared.device.generation();
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            let limit = Duration::from_millis(shared.stop_timeout_ms.load(Ordering::SeqCst));
            if !ipc::wait::wait_readable(child.pidfd(), limit)? {
                log::warn!("service {} (pid {}) did not exit within {limit:?}; killing it", shared.name, child.id());
                child.kill()?;
            }
            return Ok(Ended::Stopped(child.wait()?));
        }
        if shared.options_changed.swap(false, Ordering::SeqCst) {
            let o = shared.lock_recipe().options.clone();
            *liveness = liveness_for(&o);
        }
        let sleep = match check_liveness(shared, liveness) {
            Ok(until) => {
                until.map_or(SUPERVISOR_SLICE, |t| t.saturating_duration_since(Instant::now())).min(SUPERVISOR_SLICE)
            }
            Err(why) => {
                child.kill()?;
                return Ok(Ended::Faulted(child.wait()?, why));
            }
        };
        let mut fds = [ipc::wait::readable(child.pidfd()), ipc::wait::readable(inbox.wake_fd())];
        ipc::wait::poll(&mut fds, sleep)?;
        if fds[1].revents != 0 {
            let _ = inbox.wake.read();
        }
        if fds[0].revents != 0 {
            let status = child.wait()?;
            // Exited on the `Shutdown` of a stop that raced this wait: an orderly end.
            if shared.stopping.load(Ordering::SeqCst) {
                return Ok(Ended::Stopped(status));
            }
            return Ok(Ended::Died(status));
        }
        let fault = inbox.take_for(generation);
        if let (Some(why), true) = (fault, restartable) {
            child.kill()?;
            return Ok(Ended::Faulted(child.wait()?, why));
        }
    }
}

/// One round of the liveness check: sends a ping when one is due, looks for the answer to the
/// outstanding one. Returns when to look again (`None`: disabled), or why the instance is
/// declared hung. Never blocks on the control channel's lock: while a stats request holds it,
/// that request reads (and notes) the pongs.
fn check_liveness(shared: &Shared, liveness: &mut Liveness) -> Result<Option<Instant>, String> {
    if !liveness.enabled() {
        return Ok(None);
    }
    let mut ctl = shared.try_lock_ctl();
    let Some(c) = ctl.as_mut() else {
        // A stats request holds the channel (bounded by its timeout) and notes the pongs it
        // reads: decide once it is done.
        return Ok(Some(Instant::now() + supervisor::PONG_CHECK));
    };
    c.drain(&shared.name);
    let pong_seen = c.pong_seen;
    let activity = shared.device.service_activity();
    liveness.note_activity(Instant::now(), activity.asleep, activity.beat);
    liveness.note_io(Instant::now(), activity.io);
    // Bounded: at most two steps (a pong seen, then a ping due at once).
    for _ in 0..2 {
        let now = Instant::now();
        match liveness.step(now, pong_seen) {
            None => return Ok(None),
            Some(LivenessStep::WaitUntil(t)) => return Ok(Some(t)),
            Some(LivenessStep::Missed(why)) => return Err(why),
            Some(LivenessStep::SendPing) => {
                match c.ping() {
                    Ok(token) => liveness.sent(token, now),
                    // Dead already (EPIPE) or failing: the pidfd tells; look again shortly.
                    Err(e) => {
                        log::debug!("service {}: liveness ping not sent: {e}", shared.name);
                        return Ok(Some(now + supervisor::PONG_CHECK));
                    }
                }
            }
        }
    }
    Ok(Some(Instant::now() + supervisor::PONG_CHECK))
}

/// The liveness check `o` asks for, starting now.
fn liveness_for(o: &ServiceOptions) -> Liveness {
    Liveness::new(o.liveness_interval, o.call_timeout, Instant::now()).with_io_deadline(o.io_deadline)
}

/// Whether the kernel's OOM killer ended the instance `pid` (which died by SIGKILL): the VM's
/// cgroup counts an OOM kill. If so the device is marked failed and the VM is told to stop, as
/// a whole (cgroup v2's `memory.oom.group`, done by the core on v1): a VM over its memory limit
/// would only be OOM-killed again. Costs one question to the helper per SIGKILL death.
fn ended_by_oom(shared: &Shared, pid: u32) -> bool {
    let (cgroup, stop) = {
        let recipe = shared.lock_recipe();
        (recipe.options.cgroup.clone(), recipe.options.stop.clone())
    };
    let (Some(cgroup), Some(stop)) = (cgroup, stop) else { return false };
    let Some(kills) = cgroup.oom_kills().filter(|&n| n > 0) else { return false };
    let limit =
        cgroup.resources().memory_max.map_or_else(|| "its parent's".to_string(), |m| format!("{} MiB", m >> 20));
    let why = format!(
        "the kernel's OOM killer ended service {} (pid {pid}): the VM's memory use reached its limit ({limit}; \
         {kills} OOM kill(s) in its cgroup)",
        shared.name
    );
    shared.device.mark_failed_as(&why, Failure::OutOfMemory);
    stop.stop(crate::control::StopReason::OutOfMemory(why));
    true
}

/// The supervisor thread: waits for the instance to fail, then restarts it per the policy.
fn supervise(shared: &Shared, mut child: ServiceChild, exit_tx: &SyncSender<ExitStatus>) {
    let (options, is_console) = {
        let recipe = shared.lock_recipe();
        (recipe.options.clone(), matches!(recipe.device, DeviceConfig::Console { .. }))
    };
    let mut tracker = RestartTracker::new(options.restart);
    let (interval, deadline) = (options.liveness_interval, options.call_timeout);
    let mut liveness = liveness_for(&options);
    let dev = &shared.device;
    let name = &shared.name;
    // Bounded by the restart policy: every iteration is one failure, and the tracker gives up
    // past the cap.
    loop {
        let pid = child.id();
        let restartable = shared.lock_recipe().options.restart.enabled();
        let ended = match wait_instance(shared, &mut child, restartable, &mut liveness) {
            Ok(e) => e,
            Err(e) => {
                dev.mark_failed(&format!("supervising it failed: {e}"), true);
                let _ = child.kill();
                if let Ok(s) = child.wait() {
                    let _ = exit_tx.send(s);
                }
                return;
            }
        };
        let died = Instant::now();
        let (status, why, kind) = match ended {
            Ended::Stopped(status) => {
                let kind = if status.success() { Failure::Orderly } else { Failure::Error };
                dev.mark_failed_as(&describe(status), kind);
                let _ = exit_tx.send(status);
                return;
            }
            Ended::Died(status) if status.signal() == Some(libc::SIGSYS) => {
                let report = shared.lock_ctl().seccomp_report();
                (status, describe_seccomp_death(report), Failure::Seccomp)
            }
            Ended::Died(status) if status.signal() == Some(libc::SIGKILL) && ended_by_oom(shared, pid) => {
                let _ = exit_tx.send(status);
                return;
            }
            Ended::Died(status) => (status, describe(status), Failure::Error),
            Ended::Faulted(status, why) => (status, format!("{why}; killed it"), Failure::Error),
        };
        if !shared.lock_recipe().options.restart.enabled() {
            dev.mark_failed_as(&why, kind);
            let _ = exit_tx.send(status);
            return;
        }
        shared.metrics.lock().unwrap_or_else(|e| e.into_inner()).last_failure = Some(why.clone());
        // Wake accesses blocked on the dead instance's ring: they wait for the next one. The
        // writes posted to it that it never completed go to the next instance.
        let carried = {
            let cur = dev.lock_current();
            cur.ring.abort();
            cur.ring.take_posted()
        };
        let sep = if kind == Failure::Seccomp { "" } else { "failed: " };
        log::error!("service {name} (pid {pid}) {sep}{why}; restarting it");
        // Bounded: each round is one more failure for the tracker, which gives up past the cap.
        loop {
            tracker.set_policy(shared.lock_recipe().options.restart);
            let delay = match tracker.on_failure(Instant::now()) {
                Decision::GiveUp(cap) => {
                    let why = format!("restart cap reached: {cap}; last failure: {why}");
                    shared.metrics.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(why.clone());
                    if !is_console && !shared.stopping.load(Ordering::SeqCst) {
                        match present_failed(shared, &why) {
                            Ok(last) => {
                                let _ = exit_tx.send(serve_failed(shared, last, interval, deadline).unwrap_or(status));
                                return;
                            }
                            Err(e) => log::error!(
                                "service {name}: could not present the failed device to the guest: {e}; failing closed"
                            ),
                        }
                    }
                    dev.mark_failed_as(&why, Failure::GaveUp);
                    let _ = exit_tx.send(status);
                    return;
                }
                Decision::Restart(d) => d,
            };
            if !delay.is_zero() {
                log::warn!("service {name}: repeated failures, backing off {delay:?} before restarting");
                let _ = ipc::wait::wait_readable(dev.inbox.wake_fd(), delay);
            }
            // A paused VM gets no new instance: it would serve at once. Bounded waits, each
            // ending on a resume (which wakes the inbox), a stop or a slice.
            while shared.paused.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst) {
                let _ = ipc::wait::wait_readable(dev.inbox.wake_fd(), SUPERVISOR_SLICE);
                let _ = dev.inbox.wake.read();
            }
            if shared.stopping.load(Ordering::SeqCst) {
                dev.mark_failed_as("stopped while restarting", Failure::Orderly);
                let _ = exit_tx.send(status);
                return;
            }
            let generation = dev.generation() + 1;
            let started = start_instance(&shared.lock_recipe(), &carried);
            match started {
                Ok(inst) => {
                    let new_pid = inst.child.id();
                    {
                        let mut ctl = shared.replace_ctl(Ctl::new(inst.control, new_pid, inst.pidfd));
                        // Ask the new instance at once: it redoes in-flight requests before it
                        // answers, so the count is known even if it dies soon after.
                        if let Err(e) = ctl.ping() {
                            log::debug!("service {name}: first ping of pid {new_pid}: {e}");
                        }
                    }
                    // Metrics and the log line first: an access waiting for the new instance
                    // may look at them as soon as it is installed.
                    let latency = died.elapsed();
                    let n = {
                        let mut m = shared.metrics.lock().unwrap_or_else(|e| e.into_inner());
                        m.record(latency);
                        m.restarts
                    };
                    log::info!(
                        "service {name} restarted as pid {new_pid} (instance {generation}, restart #{n}) {:.2} ms \
                         after the failure of pid {pid}",
                        latency.as_secs_f64() * 1e3
                    );
                    // The carried posted writes are exits in flight at the failure that the new
                    // instance completes.
                    dev.redone.fetch_add(inst.adopted as u64, Ordering::Relaxed);
                    dev.install(inst.ring, new_pid);
                    // Paused while this instance started: pause it too (a pause that came after
                    // the swap above reached it already; pausing twice is harmless).
                    if shared.paused.load(Ordering::SeqCst) {
                        if let Err(e) = shared.pause_current(deadline) {
                            log::warn!("service {name}: pausing pid {new_pid}: {e}");
                        }
                    }
                    child = inst.child;
                    let o = shared.lock_recipe().options.clone();
                    liveness = liveness_for(&o);
                    break;
                }
                Err(e) => log::error!("service {name}: restart failed: {}", crate::vmm::chain(&e)),
            }
        }
    }
}

/// Past the restart cap, for a virtio device: starts one last instance from `recipe` (state
/// region included), tells it to present the failed device (`EnterFailed`), swaps it in and logs
/// the failure once. Returns the instance, or why it could not be done (the child is then reaped).
fn present_failed(shared: &Shared, why: &str) -> Result<ServiceChild, String> {
    // Writes posted to the instance that failed are not carried: the device fails anyway.
    let started = start_instance(&shared.lock_recipe(), &[]);
    let inst = started.map_err(|e| format!("starting a last instance failed: {}", crate::vmm::chain(&e)))?;
    let Instance { mut child, control, ring, pidfd, .. } = inst;
    let pid = child.id();
    let reason = bounded_reason(why).to_string();
    if let Err(e) = control.send_now(&ControlMsg::EnterFailed { reason }, &[]) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("telling pid {pid} to enter the failed state: {e}"));
    }
    drop(shared.replace_ctl(Ctl::new(control, pid, pidfd)));
    shared.device.install(ring, pid);
    shared.device.mark_given_up(why);
    Ok(child)
}

/// Supervises the last instance [`present_failed`] started until it ends: stopped with the VM,
/// or dead (or hung, or misbehaving on the ring), after which the device fails closed. Never
/// restarts it. Returns its exit status (`None` if it could not be reaped).
fn serve_failed(
    shared: &Shared,
    mut child: ServiceChild,
    interval: Duration,
    deadline: Duration,
) -> Option<ExitStatus> {
    let dev = &shared.device;
    let io_deadline = shared.lock_recipe().options.io_deadline;
    let mut liveness = Liveness::new(interval, deadline, Instant::now()).with_io_deadline(io_deadline);
    match wait_instance(shared, &mut child, true, &mut liveness) {
        Ok(Ended::Stopped(status)) => {
            let kind = if status.success() { Failure::Orderly } else { Failure::Error };
            dev.mark_failed_as(&describe(status), kind);
            Some(status)
        }
        Ok(Ended::Died(status)) => {
            dev.mark_failed_as(&describe(status), Failure::LastInstance);
            Some(status)
        }
        Ok(Ended::Faulted(status, why)) => {
            dev.mark_failed_as(&format!("{why}; killed it"), Failure::LastInstance);
            Some(status)
        }
        Err(e) => {
            dev.mark_failed_as(&format!("supervising it failed: {e}"), Failure::LastInstance);
            let _ = child.kill();
            child.wait().ok()
        }
    }
}

/// Starts the console service: a 16550 at ports `base..base + 8` writing to `output`, reading from
/// `input` (if any) and raising its interrupt through `irq` (already registered with KVM as an
/// irqfd). `options` (or just a deadline for each forwarded access) tunes it. Every instance
/// also gets the console's state region (created here, kept for the service's lifetime).
/// Register the returned device on the PIO bus at `base` with length 8.
pub fn spawn_console(
    program: &Program,
    output: OwnedFd,
    input: Option<OwnedFd>,
    irq: EventFd,
    base: u16,
    options: impl Into<ServiceOptions>,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    // SAFETY: the EventFd owns this fd for the duration of the dup.
    let irq_fd = unsafe { BorrowedFd::borrow_raw(irq.as_raw_fd()) }.try_clone_to_owned().map_err(os("dup irqfd"))?;
    let mut fds = vec![(FdRole::Output, output), (FdRole::Irq, irq_fd)];
    fds.extend(input.map(|i| (FdRole::Input, i)));
    let (state, keep) = state_region("console")?;
    fds.push((FdRole::StateRegion, state));
    spawn_service_with_state(
        ServiceSpec {
            name: "console".into(),
            program: program.clone(),
            device: DeviceConfig::Console { base, len: 8 },
            fds,
            space: AddressSpace::Pio,
            options: options.into(),
        },
        Some(keep),
    )
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
    /// The image's flush witness (a writable disk; see [`FdRole::DiskWitness`]).
    pub witness: Option<std::fs::File>,
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
    /// Limit on bytes and requests per second.
    pub rate_limit: RateLimit,
    /// What a host error on a write does.
    pub write_errors: ipc::control::ErrorPolicy,
    /// What a host error on a read does.
    pub read_errors: ipc::control::ErrorPolicy,
}

fn dup_eventfd(e: &EventFd) -> Result<OwnedFd, ServiceError> {
    // SAFETY: the EventFd owns this fd for the duration of the dup.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }.try_clone_to_owned().map_err(os("dup eventfd"))
}

/// Starts a `bulkhead-block` service for `spec`. `options` (or just a deadline for each
/// forwarded access) tunes it.
/// Register the returned device on the MMIO bus at `spec.mmio_base` with length `spec.mmio_len`.
pub fn spawn_block(
    program: &Program,
    spec: BlockSpec,
    options: impl Into<ServiceOptions>,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let BlockSpec {
        id,
        disk,
        witness,
        read_only,
        mmio_base,
        mmio_len,
        gsi,
        memfd,
        memory,
        queue_notify,
        irq,
        queue_size,
        rate_limit,
        write_errors,
        read_errors,
    } = spec;
    let disk_size = disk.metadata().map_err(os("stat of the disk image"))?.len();
    let num_queues = u16::try_from(queue_notify.len()).unwrap_or(u16::MAX);
    let mut fds =
        vec![(FdRole::GuestMemory, memfd), (FdRole::Disk, OwnedFd::from(disk)), (FdRole::Irq, dup_eventfd(&irq)?)];
    if let Some(w) = witness {
        fds.push((FdRole::DiskWitness, OwnedFd::from(w)));
    }
    for (i, e) in queue_notify.iter().enumerate() {
        let i = u16::try_from(i).unwrap_or(u16::MAX);
        fds.push((FdRole::QueueNotify(i), dup_eventfd(e)?));
    }
    let name = if id.is_empty() { "block".to_string() } else { format!("block-{id}") };
    let memory = memory_regions(&memory);
    let device = DeviceConfig::Block(BlockConfig {
        mmio_base,
        mmio_len,
        gsi,
        memory,
        disk_size,
        read_only,
        id,
        num_queues,
        queue_size,
        rate_limit,
        write_errors,
        read_errors,
    });
    spawn_virtio(program, name, device, fds, options.into())
}

/// What the core passes to start a `bulkhead-net` service. The lead creates the eventfds and
/// registers them with KVM first: `rx_notify` as an ioeventfd on `mmio_base + 0x50` (4 bytes,
/// datamatch 0), `tx_notify` likewise with datamatch 1, `irq` as an irqfd on `gsi`.
#[derive(Debug)]
pub struct NetSpec {
    /// Instance name (`net-<id>` in logs and metrics).
    pub id: String,
    /// The TAP device, opened by the core (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
    pub tap: OwnedFd,
    /// The TAP's interface name, for logs.
    pub tap_name: String,
    /// The MAC address the guest reads from config space.
    pub mac: [u8; 6],
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
    /// The RX queue's ioeventfd (datamatch 0).
    pub rx_notify: EventFd,
    /// The TX queue's ioeventfd (datamatch 1).
    pub tx_notify: EventFd,
    /// The irqfd.
    pub irq: EventFd,
    /// Largest queue size offered (power of two, e.g. 256).
    pub queue_size: u16,
    /// Limit on bytes and frames per second the guest receives.
    pub rx_rate_limit: RateLimit,
    /// Limit on bytes and frames per second the guest sends.
    pub tx_rate_limit: RateLimit,
}

/// Starts a `bulkhead-net` service for `spec`. `options` (or just a deadline for each
/// forwarded access) tunes it. Every instance gets the same TAP fd, so frames the TAP queued
/// while an instance was being replaced are delivered by the next one.
/// Register the returned device on the MMIO bus at `spec.mmio_base` with length `spec.mmio_len`.
pub fn spawn_net(
    program: &Program,
    spec: NetSpec,
    options: impl Into<ServiceOptions>,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let NetSpec {
        id,
        tap,
        tap_name,
        mac,
        mmio_base,
        mmio_len,
        gsi,
        memfd,
        memory,
        rx_notify,
        tx_notify,
        irq,
        queue_size,
        rx_rate_limit,
        tx_rate_limit,
    } = spec;
    let fds = vec![
        (FdRole::GuestMemory, memfd),
        (FdRole::Tap, tap),
        (FdRole::Irq, dup_eventfd(&irq)?),
        (FdRole::QueueNotify(0), dup_eventfd(&rx_notify)?),
        (FdRole::QueueNotify(1), dup_eventfd(&tx_notify)?),
    ];
    let name = if id.is_empty() { "net".to_string() } else { format!("net-{id}") };
    let memory = memory_regions(&memory);
    let device = DeviceConfig::Net(NetConfig {
        mmio_base,
        mmio_len,
        gsi,
        memory,
        mac,
        queue_size,
        tap_name,
        rx_rate_limit,
        tx_rate_limit,
    });
    spawn_virtio(program, name, device, fds, options.into())
}

/// Guest RAM ranges `(guest address, length, memfd offset)` as the set-up message carries them.
fn memory_regions(memory: &[(u64, u64, u64)]) -> Vec<MemoryRegion> {
    memory.iter().map(|&(guest_addr, len, file_offset)| MemoryRegion { guest_addr, len, file_offset }).collect()
}

/// Starts a virtio-mmio service `name` for `device` with `fds` and a state region of its own.
fn spawn_virtio(
    program: &Program,
    name: String,
    device: DeviceConfig,
    mut fds: Vec<(FdRole, OwnedFd)>,
    options: ServiceOptions,
) -> Result<(Arc<RemoteDevice>, ServiceHandle), ServiceError> {
    let (state, keep) = state_region(&name)?;
    fds.push((FdRole::StateRegion, state));
    spawn_service_with_state(
        ServiceSpec { name, program: program.clone(), device, fds, space: AddressSpace::Mmio, options },
        Some(keep),
    )
}

/// Creates a device's state region: a zero-filled memfd of [`ipc::state::STATE_REGION_LEN`] bytes sealed
/// against resizing. Returns the fd passed to every instance and a dup the core keeps for
/// `corrupt-state`. The core never interprets it otherwise.
fn state_region(name: &str) -> Result<(OwnedFd, OwnedFd), ServiceError> {
    let region = StateRegion::create(&format!("bulkhead-{name}-state"))
        .map_err(|e| ServiceError::Os { what: "creating the state region", source: io::Error::other(e.to_string()) })?;
    let pass = region.fd().try_clone_to_owned().map_err(os("dup of the state region"))?;
    let keep = region.fd().try_clone_to_owned().map_err(os("dup of the state region"))?;
    Ok((pass, keep))
}

#[cfg(test)]
mod tests;
