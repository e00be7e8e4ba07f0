//! The service-side runtime shared by all device services.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use bulkhead_policies::{Policy, PolicyError, Report};
use ipc::control::{
    bounded_reason, seccomp_report, ControlMsg, DeviceConfig, DeviceReport, FdRole, ForbiddenAction, IoCounters,
    RateLimitUpdate, RingReport, ServiceFault, ServiceReport, ServiceSetup, ServiceStats, FAULT_CRASH_STATUS,
    FAULT_SLOW_MAX_MS,
};
use ipc::ring::{ExitKind, ExitReply, ExitRequest, Incoming, ServiceEndpoint};
use ipc::{ControlChannel, ControlError, IpcError, Mirror, MirrorEntry};
use vmm_sys_util::eventfd::EventFd;

use crate::jail::{self, JailError};

/// How long a service waits for its set-up message.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the service sleeps in one `poll` before re-checking (bounds every wait).
const SLEEP_SLICE: Duration = Duration::from_secs(1);
/// While spinning, how often the control socket and device fds are polled (without blocking).
const SIDE_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How long the idle spin goes on after a completion rang the sleeping core, for the core to get
/// back on a CPU; past that the core is preempted and spinning for its next exit is wasted.
const CORE_WAKE_GRACE: Duration = Duration::from_micros(30);
/// Longest idle spin the core may ask for.
const MAX_IDLE_SPIN: Duration = Duration::from_millis(10);
/// `RLIMIT_FSIZE` of services that write no disk image: bounds a console log file (1 GiB).
pub const CONSOLE_FILE_LIMIT: u64 = 1 << 30;

/// The ring's I/O marker, once serving: devices mark their back-end calls with [`io_call`].
static IO_MARKER: std::sync::OnceLock<ipc::IoMarker> = std::sync::OnceLock::new();
/// Extra time the next back-end call takes ([`ServiceFault::SlowIo`]), in ms.
static SLOW_IO_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs one back-end I/O call of a device (a disk read, write or flush: anything that may be
/// slow) marked in the ring as I/O ([`ipc::IoMarker`]), so that the core waits for it up to its
/// I/O deadline instead of taking the service for hung. An injected `slow-io` fault makes this
/// call that much longer.
pub fn io_call<T>(f: impl FnOnce() -> T) -> T {
    let _guard = IO_MARKER.get().map(ipc::IoMarker::begin);
    let extra = SLOW_IO_MS.swap(0, std::sync::atomic::Ordering::Relaxed);
    if extra > 0 {
        std::thread::sleep(Duration::from_millis(extra));
    }
    f()
}

/// Errors of the service runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Bad command line.
    #[error("usage: {0}")]
    Usage(String),
    /// The control fd is not open.
    #[error("control fd {0} is not open")]
    BadControlFd(RawFd),
    /// Control channel failure.
    #[error("control channel")]
    Control(#[from] ControlError),
    /// The first message was not a set-up.
    #[error("expected a set-up message, got {0}")]
    NotSetup(String),
    /// The set-up's fd roles do not match the fds received.
    #[error("set-up names {roles} fds with duplicates or missing ring fds, {fds} received")]
    BadFds {
        /// Roles named.
        roles: usize,
        /// Fds received.
        fds: usize,
    },
    /// Ring failure (attach or protocol violation by the core).
    #[error("exit ring")]
    Ring(#[from] IpcError),
    /// The set-up's device configuration is not for this service.
    #[error("wrong device configuration: {0}")]
    WrongDevice(String),
    /// An fd the device needs is missing.
    #[error("missing fd for role {0:?}")]
    MissingFd(FdRole),
    /// Device-specific failure.
    #[error("device: {0}")]
    Device(String),
    /// Entering the jail failed.
    #[error("jail")]
    Jail(#[from] JailError),
    /// Polling failed.
    #[error("poll")]
    Poll(#[source] std::io::Error),
    /// The core closed the control channel (it exited).
    #[error("core closed the control channel")]
    CoreGone,
    /// Loading the seccomp filter or its SIGSYS reporter failed.
    #[error("seccomp")]
    Seccomp(#[from] PolicyError),
}

/// A port-I/O device served by the runtime. Offsets are relative to the device's base port and
/// already checked to lie inside its range.
pub trait PioHandler {
    /// Guest read of `data.len()` bytes at `offset`. Returns false to reject the access (the
    /// guest then reads all-ones).
    fn read(&mut self, offset: u16, data: &mut [u8]) -> bool;
    /// Guest write of `data` at `offset`. Returns false to reject it.
    fn write(&mut self, offset: u16, data: &[u8]) -> bool;
    /// Device fds to watch for readability (re-queried every loop iteration).
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Device fds to watch for writability (re-queried every loop iteration): output waiting
    /// for a reader that did not take it yet.
    fn write_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of [`event_fds`](Self::event_fds) is readable or hung up, or one of
    /// [`write_fds`](Self::write_fds) is writable or failed.
    fn on_event(&mut self, _fd: RawFd) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// The device's counters, reported in every `Pong`.
    fn io_counters(&self) -> IoCounters {
        IoCounters::default()
    }
    /// Registers whose read has no side effect, with the value a read returns now, for the read
    /// mirror ([`ipc::mirror`]): the core answers those reads itself. Addresses are offsets into
    /// the device's ports. Asked after every access and event; the default mirrors nothing.
    fn mirrored(&mut self, _out: &mut Vec<MirrorEntry>) {}
    /// The read mirror, given once before serving: code that changes a mirrored value outside an
    /// access (input arriving) must [`invalidate`](Mirror::invalidate) it before raising the
    /// interrupt that could make the guest read.
    fn attach_mirror(&mut self, _mirror: Mirror) {}
    /// The device's live state, for [`ControlMsg::Inspect`] (read-only).
    fn report(&mut self) -> DeviceReport {
        DeviceReport::Opaque
    }
}

/// A memory-mapped device served by the runtime (e.g. a virtio-mmio transport). Offsets are
/// relative to the device's window and already checked to lie inside it.
pub trait MmioHandler {
    /// Guest load of `data.len()` bytes at `offset`. Returns false to reject the access (the
    /// guest then reads all-ones).
    fn read(&mut self, offset: u64, data: &mut [u8]) -> bool;
    /// Guest store of `data` at `offset`. Returns false to reject it.
    fn write(&mut self, offset: u64, data: &[u8]) -> bool;
    /// Device fds to watch for readability (e.g. queue ioeventfds); re-queried every iteration.
    fn event_fds(&self) -> Vec<RawFd>;
    /// One of [`event_fds`](Self::event_fds) is readable or hung up.
    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError>;
    /// Called on every iteration while the service spins: look for work in shared memory (no
    /// blocking). Returns true if it did any, which keeps the service spinning.
    fn poll(&mut self) -> Result<bool, RuntimeError>;
    /// The service is about to sleep: re-arm notifications. Returns true if work arrived
    /// meanwhile (the service then keeps spinning instead).
    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError>;
    /// Requests this instance found in flight in the state region and redone
    /// ([`ServiceStats::redone`]).
    fn redone(&self) -> u64;
    /// Why the device holds a request and wants the VM stopped (its error policy), once per
    /// hold: the runtime sends [`ControlMsg::IoStopped`].
    fn take_stop(&mut self) -> Option<String>;
    /// The core resumed the service ([`ControlMsg::Resume`]): a held request is retried.
    fn resumed(&mut self);
    /// The request about to be served sits at `index` in the submission ring. With
    /// [`work_done`](Self::work_done) this orders a posted write against the interrupts the
    /// device raised: see `virtio::mmio` (an acknowledgement submitted before an interrupt
    /// must not clear it).
    fn at_request(&mut self, index: u64);
    /// Interrupts raised since the last call happened before the core had submitted
    /// `submitted` requests (the count is read after the work).
    fn work_done(&mut self, submitted: u64);
    /// The core gave up on this device ([`ControlMsg::EnterFailed`]): go to a permanent failed
    /// state the guest can see. Returns false if the device has no such state (the message is
    /// then ignored).
    fn enter_failed(&mut self, reason: &str) -> bool;
    /// Work deferred until a deadline (e.g. a request waiting for rate-limit tokens): how long
    /// the service may sleep at most before [`poll`](Self::poll) can make progress. Asked
    /// right before [`prepare_sleep`](Self::prepare_sleep); `None` = no deadline.
    fn wake_after(&self) -> Option<Duration>;
    /// The core replaced the rate limits ([`ControlMsg::SetRateLimit`]). Returns false if this
    /// device has no limits of that kind.
    fn set_rate_limit(&mut self, limits: &RateLimitUpdate) -> bool;
    /// The device's counters, for the core's metrics.
    fn io_counters(&self) -> IoCounters;
    /// Registers whose read has no side effect, with the value a read returns now, for the read
    /// mirror ([`ipc::mirror`]), at offsets into the window, and the registers whose writes may
    /// be posted ([`MirrorEntry::posted_write`]: writes that change nothing but the device's own
    /// registers). Asked after every access, event and poll that did work.
    fn mirrored(&mut self, out: &mut Vec<MirrorEntry>);
    /// The read mirror, given once before serving: before raising an interrupt that follows a
    /// change of a mirrored value made outside an access, rewrite the value in place
    /// ([`Mirror::update`], at its offset into the window) or invalidate the table.
    fn attach_mirror(&mut self, mirror: Mirror);
    /// The device's live state, for [`ControlMsg::Inspect`] (read-only).
    fn report(&mut self) -> DeviceReport;
}

/// What the serve loop needs from a device, whatever its bus.
trait Dispatch {
    fn access(&mut self, req: &ExitRequest) -> Option<ExitReply>;
    /// The ring position of the request about to be served ([`MmioHandler::at_request`]).
    fn at_request(&mut self, _index: u64) {}
    /// Device work may have raised interrupts; `submitted` is the core's submission count now
    /// ([`MmioHandler::work_done`]).
    fn work_done(&mut self, _submitted: u64) {}
    fn event_fds(&self) -> Vec<RawFd>;
    fn write_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError>;
    fn poll(&mut self) -> Result<bool, RuntimeError>;
    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError>;
    fn wake_after(&self) -> Option<Duration> {
        None
    }
    fn take_stop(&mut self) -> Option<String> {
        None
    }
    fn resumed(&mut self) {}
    fn redone(&self) -> u64 {
        0
    }
    fn enter_failed(&mut self, _reason: &str) -> bool {
        false
    }
    fn set_rate_limit(&mut self, _limits: &RateLimitUpdate) -> bool {
        false
    }
    fn io_counters(&self) -> IoCounters {
        IoCounters::default()
    }
    /// Mirrored registers with absolute addresses.
    fn mirrored(&mut self, _out: &mut Vec<MirrorEntry>) {}
    fn attach_mirror(&mut self, _mirror: Mirror) {}
    fn report(&mut self) -> DeviceReport;
}

/// Turns the mirrored entries from `start` on, given as offsets into the window `[base, base +
/// len)`, into absolute addresses, dropping any that do not lie inside it or have a size a read
/// cannot have.
fn to_window(out: &mut Vec<MirrorEntry>, start: usize, base: u64, len: u64) {
    let mut i = start;
    while i < out.len() {
        let e = out[i];
        let inside =
            matches!(e.len, 1 | 2 | 4 | 8) && e.addr.checked_add(u64::from(e.len)).is_some_and(|end| end <= len);
        match base.checked_add(e.addr).filter(|_| inside) {
            Some(addr) => {
                out[i].addr = addr;
                i += 1;
            }
            None => {
                out.remove(i);
            }
        }
    }
}

struct PioDispatch<H> {
    handler: H,
    base: u16,
    len: u16,
}

impl<H: PioHandler> Dispatch for PioDispatch<H> {
    fn access(&mut self, req: &ExitRequest) -> Option<ExitReply> {
        let offset = req.addr.checked_sub(u64::from(self.base))?;
        let end = offset.checked_add(u64::from(req.len))?;
        if end > u64::from(self.len) {
            return None;
        }
        let offset = u16::try_from(offset).ok()?;
        let n = usize::try_from(req.len).ok()?.min(8);
        match req.kind {
            ExitKind::PioRead => {
                let mut data = [0u8; 8];
                self.handler.read(offset, &mut data[..n]).then(|| ExitReply::ok(&data[..n]))
            }
            ExitKind::PioWrite => self.handler.write(offset, &req.data[..n]).then(|| ExitReply::ok(&[])),
            ExitKind::MmioRead | ExitKind::MmioWrite => None,
        }
    }
    fn event_fds(&self) -> Vec<RawFd> {
        self.handler.event_fds()
    }
    fn write_fds(&self) -> Vec<RawFd> {
        self.handler.write_fds()
    }
    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        self.handler.on_event(fd)
    }
    fn io_counters(&self) -> IoCounters {
        self.handler.io_counters()
    }
    fn mirrored(&mut self, out: &mut Vec<MirrorEntry>) {
        let start = out.len();
        self.handler.mirrored(out);
        to_window(out, start, u64::from(self.base), u64::from(self.len));
    }
    fn attach_mirror(&mut self, mirror: Mirror) {
        self.handler.attach_mirror(mirror.based(u64::from(self.base)));
    }
    fn report(&mut self) -> DeviceReport {
        self.handler.report()
    }
    fn poll(&mut self) -> Result<bool, RuntimeError> {
        Ok(false)
    }
    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError> {
        Ok(false)
    }
}

struct MmioDispatch<H> {
    handler: H,
    base: u64,
    len: u64,
}

impl<H: MmioHandler> Dispatch for MmioDispatch<H> {
    fn access(&mut self, req: &ExitRequest) -> Option<ExitReply> {
        let offset = req.addr.checked_sub(self.base)?;
        let end = offset.checked_add(u64::from(req.len))?;
        if end > self.len {
            return None;
        }
        let n = usize::try_from(req.len).ok()?.min(8);
        match req.kind {
            ExitKind::MmioRead => {
                let mut data = [0u8; 8];
                self.handler.read(offset, &mut data[..n]).then(|| ExitReply::ok(&data[..n]))
            }
            ExitKind::MmioWrite => self.handler.write(offset, &req.data[..n]).then(|| ExitReply::ok(&[])),
            ExitKind::PioRead | ExitKind::PioWrite => None,
        }
    }
    fn event_fds(&self) -> Vec<RawFd> {
        self.handler.event_fds()
    }
    fn on_event(&mut self, fd: RawFd) -> Result<(), RuntimeError> {
        self.handler.on_event(fd)
    }
    fn take_stop(&mut self) -> Option<String> {
        self.handler.take_stop()
    }
    fn resumed(&mut self) {
        self.handler.resumed();
    }
    fn poll(&mut self) -> Result<bool, RuntimeError> {
        self.handler.poll()
    }
    fn at_request(&mut self, index: u64) {
        self.handler.at_request(index);
    }
    fn work_done(&mut self, submitted: u64) {
        self.handler.work_done(submitted);
    }
    fn prepare_sleep(&mut self) -> Result<bool, RuntimeError> {
        self.handler.prepare_sleep()
    }
    fn mirrored(&mut self, out: &mut Vec<MirrorEntry>) {
        let start = out.len();
        self.handler.mirrored(out);
        to_window(out, start, self.base, self.len);
    }
    fn attach_mirror(&mut self, mirror: Mirror) {
        self.handler.attach_mirror(mirror.based(self.base));
    }
    fn report(&mut self) -> DeviceReport {
        self.handler.report()
    }
    fn wake_after(&self) -> Option<Duration> {
        self.handler.wake_after()
    }
    fn redone(&self) -> u64 {
        self.handler.redone()
    }
    fn enter_failed(&mut self, reason: &str) -> bool {
        self.handler.enter_failed(reason)
    }
    fn set_rate_limit(&mut self, limits: &RateLimitUpdate) -> bool {
        self.handler.set_rate_limit(limits)
    }
    fn io_counters(&self) -> IoCounters {
        self.handler.io_counters()
    }
}

/// Parses `--control-fd N` (default 3) from the arguments after the program name.
pub fn parse_control_fd<I: IntoIterator<Item = String>>(args: I) -> Result<RawFd, RuntimeError> {
    let mut fd = 3;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let val = if a == "--control-fd" {
            it.next().ok_or_else(|| RuntimeError::Usage("--control-fd needs a value".into()))?
        } else if let Some(v) = a.strip_prefix("--control-fd=") {
            v.to_string()
        } else {
            return Err(RuntimeError::Usage(format!("unknown argument {a:?}; expected [--control-fd N]")));
        };
        fd = val
            .parse::<RawFd>()
            .ok()
            .filter(|&f| f >= 0)
            .ok_or_else(|| RuntimeError::Usage(format!("bad fd {val:?}")))?;
    }
    Ok(fd)
}

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: `fd` is an owned fd received over the control socket; EventFd takes sole ownership.
    // A non-eventfd fd only makes later reads/writes fail with an error, never UB.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// A service after set-up: configuration, the fds for its device, the ring and the control socket.
pub struct Startup {
    /// The set-up message.
    pub setup: ServiceSetup,
    fds: HashMap<FdRole, OwnedFd>,
    control: ControlChannel,
    ring: ServiceEndpoint,
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Startup").field("setup", &self.setup).finish_non_exhaustive()
    }
}

impl Startup {
    /// Parses the arguments (without the program name), takes the control fd and completes set-up.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, RuntimeError> {
        let raw = parse_control_fd(args)?;
        // SAFETY: F_GETFD only queries the fd table.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(RuntimeError::BadControlFd(raw));
        }
        // SAFETY: the fd is open (checked above) and was handed to this process for its sole
        // use as the control socket; nothing else in the process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Do not leak the control socket into anything the service might exec.
        // SAFETY: F_SETFD with an int flag on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Self::from_control(ControlChannel::from_fd(fd))
    }

    /// Completes set-up over an already-open control channel.
    pub fn from_control(control: ControlChannel) -> Result<Self, RuntimeError> {
        let (msg, fds) = control.recv(Instant::now() + SETUP_TIMEOUT)?;
        let ControlMsg::Setup(setup) = msg else {
            return Err(RuntimeError::NotSetup(format!("{msg:?}")));
        };
        let nfds = fds.len();
        let bad = || RuntimeError::BadFds { roles: setup.fds.len(), fds: nfds };
        if setup.fds.len() != fds.len() {
            return Err(bad());
        }
        let mut by_role = HashMap::new();
        for (role, fd) in setup.fds.iter().zip(fds) {
            if by_role.insert(*role, fd).is_some() {
                return Err(bad());
            }
        }
        let (Some(region), Some(sub), Some(comp)) =
            (by_role.remove(&FdRole::Ring), by_role.remove(&FdRole::SubmitBell), by_role.remove(&FdRole::CompleteBell))
        else {
            return Err(bad());
        };
        let ring =
            ServiceEndpoint::attach(region, setup.ring.region_len, setup.ring.capacity, eventfd(sub), eventfd(comp))?;
        // From here on the device's back-end calls are marked (the redo after a restart too).
        let _ = IO_MARKER.set(ring.io_marker());
        Ok(Self { setup: *setup, fds: by_role, control, ring })
    }

    /// Takes the device fd passed in `role`, if any.
    pub fn take_fd(&mut self, role: FdRole) -> Option<OwnedFd> {
        self.fds.remove(&role)
    }

    /// Takes an EventFd passed in `role` (e.g. the irqfd).
    pub fn take_eventfd(&mut self, role: FdRole) -> Option<EventFd> {
        self.take_fd(role).map(eventfd)
    }

    /// The control channel to the core. The runtime speaks on it once serving; a test's
    /// stand-in for a compromised service speaks on it directly.
    pub fn control(&self) -> &ControlChannel {
        &self.control
    }

    /// Tells the core set-up failed (best effort) before the service exits.
    pub fn report_failure(&self, reason: &str) {
        let _ = self.control.send(&ControlMsg::Failed { reason: reason.to_string() }, &[]);
    }

    /// Enters the jail ([`jail::enter`]): closes every fd except stdio, the runtime's own and
    /// `device_fds` (fds not taken with [`take_fd`](Self::take_fd) are closed too), checks the
    /// namespaces the core created (or unshares them when started without the core's plan),
    /// pivots into an empty read-only root, drops every capability, sets `no_new_privs`, switches
    /// to the unprivileged ids the core mapped and sets the rlimits. The file size bound is the
    /// disk size for a block device and [`CONSOLE_FILE_LIMIT`] otherwise. The caller installs the
    /// seccomp filter right after, as the last step.
    pub fn jail(&mut self, device_fds: &[RawFd]) -> Result<(), RuntimeError> {
        self.fds.clear();
        let mut keep = device_fds.to_vec();
        keep.push(self.control.as_fd().as_raw_fd());
        keep.extend(self.ring.raw_fds());
        let file_size = match &self.setup.device {
            DeviceConfig::Block(b) => b.disk_size,
            _ => CONSOLE_FILE_LIMIT,
        };
        jail::enter(&jail::Plan::from(self.setup.jail), &keep, &jail::Limits::new(file_size))?;
        Ok(())
    }

    /// Loads the service's seccomp filter: the last step of confinement, right after
    /// [`jail`](Self::jail) and before any guest data is read. First installs the SIGSYS
    /// reporter, which writes a `SeccompViolation` report on the control socket and lets the
    /// process die by SIGSYS when the filter traps a syscall.
    pub fn seccomp(&self, policy: Policy) -> Result<(), RuntimeError> {
        bulkhead_policies::install_sigsys_reporter(self.control.as_fd().as_raw_fd(), encode_report)?;
        bulkhead_policies::install(policy)?;
        Ok(())
    }

    /// Sends `Ready` and serves the ring with `handler` for the ports `[base, base + len)` until
    /// the core sends `Shutdown` (returns `Ok`) or something fails.
    pub fn serve<H: PioHandler>(self, handler: H, base: u16, len: u16) -> Result<ServiceStats, RuntimeError> {
        self.serve_dispatch(PioDispatch { handler, base, len })
    }

    /// Sends `Ready` and serves the ring with `handler` for the MMIO window `[base, base + len)`
    /// until the core sends `Shutdown` (returns `Ok`) or something fails. Between exits the
    /// handler's [`poll`](MmioHandler::poll) runs on every spin iteration and its event fds are
    /// watched, so queue work never waits for a register access.
    pub fn serve_mmio<H: MmioHandler>(self, handler: H, base: u64, len: u64) -> Result<ServiceStats, RuntimeError> {
        if base.checked_add(len).is_none() || len == 0 {
            return Err(RuntimeError::WrongDevice(format!("MMIO window {base:#x}+{len:#x}")));
        }
        self.serve_dispatch(MmioDispatch { handler, base, len })
    }

    fn serve_dispatch<D: Dispatch>(self, handler: D) -> Result<ServiceStats, RuntimeError> {
        let idle_spin = Duration::from_micros(u64::from(self.setup.idle_spin_us)).min(MAX_IDLE_SPIN);
        let mut server = Server {
            ring: self.ring,
            control: self.control,
            handler,
            stats: ServiceStats::default(),
            faults: Faults::default(),
            paused: false,
            mirror_now: Vec::new(),
            mirror_published: Vec::new(),
            mirror_generation: u64::MAX,
            spin: SpinClock::default(),
        };
        let mirror = server.ring.mirror().clone();
        server.handler.attach_mirror(mirror);
        server.publish_mirror();
        server.control.send(&ControlMsg::Ready { pid: std::process::id() }, &[])?;
        // Set-up is over: the serve loop stays shallow.
        crate::footprint::trim_main_stack();
        server.run(idle_spin)
    }
}

enum Flow {
    Continue,
    Stop,
}

/// Faults injected into this instance that change how it answers the ring.
#[derive(Debug, Default)]
struct Faults {
    /// Delay before every answer.
    slow: Duration,
    /// Answer the next request with a wrong sequence number.
    corrupt_next: bool,
    /// Memory the `leak` fault allocated and keeps.
    leaked: Vec<Vec<u8>>,
}

/// Step of the `leak` fault.
const LEAK_CHUNK: usize = 1 << 20;
/// Most steps of one `leak` fault (4 GiB): the data bound normally ends it far sooner.
const LEAK_MAX_CHUNKS: usize = 4096;

/// Allocates and touches memory [`LEAK_CHUNK`] at a time until an allocation fails (the data
/// bound, `RLIMIT_DATA`) or [`LEAK_MAX_CHUNKS`], appending it to `kept`. Returns the bytes added.
fn leak(kept: &mut Vec<Vec<u8>>) -> usize {
    let mut added = 0;
    for _ in 0..LEAK_MAX_CHUNKS {
        let mut chunk = Vec::new();
        if chunk.try_reserve_exact(LEAK_CHUNK).is_err() || kept.try_reserve(1).is_err() {
            break;
        }
        // Written, so every page is really allocated (and charged to the cgroup).
        chunk.resize(LEAK_CHUNK, 0xa5);
        kept.push(chunk);
        added += LEAK_CHUNK;
    }
    added
}

struct Server<H> {
    ring: ServiceEndpoint,
    control: ControlChannel,
    handler: H,
    stats: ServiceStats,
    faults: Faults,
    /// Paused by the core: only the control channel is served.
    paused: bool,
    /// Scratch for the mirrored registers.
    mirror_now: Vec<MirrorEntry>,
    /// What the read mirror holds when it is valid (a fresh ring's zeroed table holds none).
    mirror_published: Vec<MirrorEntry>,
    /// The table's generation right after that publish: a device that rewrote a value in place
    /// since ([`Mirror::update`]) moved it, and the table is published again.
    mirror_generation: u64,
    /// The idle spin's time, reported apart from request work.
    spin: SpinClock,
}

/// Accounts the idle spin: the wall time from the first empty turn of the loop after work to the
/// last empty turn before the next work or sleep (one clock read per turn, which the loop takes
/// anyway; reading the thread's CPU clock would be a system call on the exit path).
#[derive(Debug, Default)]
struct SpinClock {
    /// First and latest empty turn of the current spin.
    turns: Option<(Instant, Instant)>,
    /// Spins ended so far, in ns.
    total_ns: u64,
}

impl SpinClock {
    /// A turn of the loop that found nothing to do and goes on spinning.
    fn idle(&mut self, now: Instant) {
        let first = self.turns.map_or(now, |(first, _)| first);
        self.turns = Some((first, now));
    }

    /// The spin ended (work arrived, or the service goes to sleep): adds it to the total.
    fn end(&mut self) {
        if let Some((first, last)) = self.turns.take() {
            let ns = u64::try_from(last.saturating_duration_since(first).as_nanos()).unwrap_or(u64::MAX);
            self.total_ns = self.total_ns.saturating_add(ns);
        }
    }
}

impl<H: Dispatch> Server<H> {
    fn run(&mut self, idle_spin: Duration) -> Result<ServiceStats, RuntimeError> {
        let mut last_active = Instant::now();
        let mut last_side_poll = last_active;
        loop {
            if self.paused {
                // Nothing but the control channel: no ring request is taken (the core pauses the
                // vCPUs first, so none should come), no device fd is watched, no queue polled.
                match self.poll_side(SLEEP_SLICE, None)? {
                    (Flow::Stop, _) => return Ok(self.current_stats()),
                    (Flow::Continue, _) => {
                        last_active = Instant::now();
                        last_side_poll = last_active;
                        continue;
                    }
                }
            }
            self.ring.beat();
            let mut did = self.serve_queued()?;
            let polled = self.handler.poll()?;
            self.handler.work_done(self.ring.submitted());
            if polled {
                self.publish_mirror();
                did = true;
            }
            if let Some(reason) = self.handler.take_stop() {
                self.control.send(&ControlMsg::IoStopped { reason }, &[])?;
            }
            let now = Instant::now();
            if did {
                last_active = now;
                self.spin.end();
            } else {
                self.spin.idle(now);
            }
            if now.duration_since(last_active) < idle_spin && !self.ring.core_off_cpu(now, CORE_WAKE_GRACE) {
                if now.duration_since(last_side_poll) >= SIDE_POLL_INTERVAL {
                    last_side_poll = now;
                    match self.poll_side(Duration::ZERO, None)? {
                        (Flow::Stop, _) => return Ok(self.current_stats()),
                        (Flow::Continue, true) => {
                            last_active = Instant::now();
                            self.spin.end();
                        }
                        (Flow::Continue, false) => {}
                    }
                }
                std::hint::spin_loop();
                continue;
            }
            self.spin.end();
            // Asked first: tokens only accrue with time, so a deadline seen now is still valid
            // after prepare_sleep, and none seen means the handler's work is not deferred.
            let slice = self.handler.wake_after().map_or(SLEEP_SLICE, |w| w.min(SLEEP_SLICE));
            if self.handler.prepare_sleep()? {
                last_active = Instant::now();
                continue;
            }
            if !self.ring.prepare_sleep() {
                continue;
            }
            self.stats.sleeps += 1;
            let bell = self.ring.bell_fd().as_raw_fd();
            let flow = self.poll_side(slice, Some(bell));
            last_side_poll = Instant::now();
            match flow? {
                (Flow::Stop, _) => return Ok(self.current_stats()),
                // Device work woke us: spin again, more is likely to follow.
                (Flow::Continue, true) => last_active = last_side_poll,
                (Flow::Continue, false) => {}
            }
        }
    }

    /// The counters as reported: the loop's own, the handler's and the idle spins ended so far.
    fn current_stats(&mut self) -> ServiceStats {
        self.stats.redone = self.handler.redone();
        self.stats.io = self.handler.io_counters();
        self.stats.idle_spin_ns = self.spin.total_ns;
        self.stats
    }

    /// Polls the control socket, the device fds and (when sleeping) the doorbell, and handles
    /// whatever is ready. The flag says whether a device fd was ready.
    fn poll_side(&mut self, timeout: Duration, bell: Option<RawFd>) -> Result<(Flow, bool), RuntimeError> {
        let (read_fds, write_fds) =
            if self.paused { (Vec::new(), Vec::new()) } else { (self.handler.event_fds(), self.handler.write_fds()) };
        let dev_fds = read_fds.len() + write_fds.len();
        let mut pfds = Vec::with_capacity(dev_fds + 2);
        pfds.push(libc::pollfd { fd: self.control.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 });
        pfds.extend(read_fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
        pfds.extend(write_fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }));
        if let Some(b) = bell {
            pfds.push(libc::pollfd { fd: b, events: libc::POLLIN, revents: 0 });
        }
        let polled = ipc::wait::poll(&mut pfds, timeout);
        if bell.is_some() {
            // Awake: withdraw the sleep announcement before any handler runs (a handler stuck
            // with it set would look idle to the core's liveness check).
            self.ring.end_sleep();
        }
        if polled.map_err(RuntimeError::Poll)? == 0 {
            return Ok((Flow::Continue, false));
        }
        let mut dev_ready = false;
        for p in &pfds[1..=dev_fds] {
            if p.revents != 0 {
                dev_ready = true;
                self.handler.on_event(p.fd)?;
                self.handler.work_done(self.ring.submitted());
            }
        }
        if dev_ready {
            self.publish_mirror();
        }
        if pfds[0].revents != 0 {
            return Ok((self.on_control()?, dev_ready));
        }
        Ok((Flow::Continue, dev_ready))
    }

    fn on_control(&mut self) -> Result<Flow, RuntimeError> {
        let (msg, _fds) = match self.control.recv_now() {
            Ok(m) => m,
            Err(ControlError::Closed) => return Err(RuntimeError::CoreGone),
            Err(ControlError::Timeout) => return Ok(Flow::Continue),
            Err(e @ (ControlError::Decode(_) | ControlError::TooLarge | ControlError::TooManyFds(_))) => {
                // A malformed management message is not fatal: report and carry on serving.
                eprintln!("{}: ignoring bad control message: {e}", self.name());
                return Ok(Flow::Continue);
            }
            Err(e) => return Err(e.into()),
        };
        match msg {
            ControlMsg::Shutdown => Ok(Flow::Stop),
            ControlMsg::Ping { token } => {
                let stats = self.current_stats();
                self.control.send(&ControlMsg::Pong { token, stats }, &[])?;
                Ok(Flow::Continue)
            }
            ControlMsg::InjectFault(fault) => {
                self.inject(fault);
                Ok(Flow::Continue)
            }
            ControlMsg::Pause { token } => {
                // Called between iterations of the serve loop: the work in hand is done and the
                // state region records it. The core paused the vCPUs first, so what is left on
                // the ring is posted writes: applied now, so the paused state includes them.
                self.serve_queued()?;
                self.paused = true;
                self.control.send(&ControlMsg::Paused { token }, &[])?;
                Ok(Flow::Continue)
            }
            ControlMsg::Resume { token } => {
                self.paused = false;
                self.handler.resumed();
                self.control.send(&ControlMsg::Resumed { token }, &[])?;
                Ok(Flow::Continue)
            }
            ControlMsg::SetRateLimit { token, limits } => {
                let applied = self.handler.set_rate_limit(&limits);
                self.control.send(&ControlMsg::RateLimitSet { token, applied }, &[])?;
                Ok(Flow::Continue)
            }
            ControlMsg::Inspect { token } => {
                let ring = RingReport {
                    submitted: self.ring.submitted(),
                    taken: self.ring.taken(),
                    mirror_valid: self.ring.mirror().is_valid(),
                    sleeps: self.stats.sleeps,
                };
                let report = Box::new(ServiceReport { ring, device: self.handler.report() });
                self.control.send(&ControlMsg::Inspected { token, report }, &[])?;
                Ok(Flow::Continue)
            }
            ControlMsg::EnterFailed { reason } => {
                let reason = bounded_reason(&reason);
                if self.handler.enter_failed(reason) {
                    eprintln!("{}: device marked failed by the core ({reason}): DEVICE_NEEDS_RESET", self.name());
                } else {
                    eprintln!("{}: ignoring EnterFailed: this device has no failed state", self.name());
                }
                Ok(Flow::Continue)
            }
            ControlMsg::AttemptForbidden(action) => {
                // Under the filter this does not return: the service dies by SIGSYS.
                let result = attempt_forbidden(action);
                eprintln!("{}: forbidden action {action:?} was not stopped: {result:?}", self.name());
                Ok(Flow::Continue)
            }
            other => {
                eprintln!("{}: ignoring unexpected control message {other:?}", self.name());
                Ok(Flow::Continue)
            }
        }
    }

    fn name(&self) -> String {
        format!("service[{}]", std::process::id())
    }

    /// Brings the read mirror up to date (rewritten only when a value changed or it was
    /// invalidated). An injected `slow` or `corrupt` fault empties it: every access then meets the
    /// fault, as it would in a service that misbehaves.
    fn publish_mirror(&mut self) {
        let mirror = self.ring.mirror();
        self.mirror_now.clear();
        if self.faults.slow.is_zero() && !self.faults.corrupt_next {
            self.handler.mirrored(&mut self.mirror_now);
        }
        if mirror.generation() == self.mirror_generation && self.mirror_published == self.mirror_now {
            return;
        }
        mirror.publish(&self.mirror_now);
        self.mirror_generation = mirror.generation();
        // The two buffers trade places: no allocation per publish.
        std::mem::swap(&mut self.mirror_published, &mut self.mirror_now);
    }

    /// Serves the requests queued on the ring, in order; returns whether there were any. A
    /// request taken from the ring is always answered, each after the mirror shows its effect.
    fn serve_queued(&mut self) -> Result<bool, RuntimeError> {
        let mut did = false;
        while let Some(inc) = self.ring.next_request()? {
            self.handler.at_request(inc.index);
            let reply = self.dispatch(&inc);
            self.handler.work_done(self.ring.submitted());
            // Before the completion: a read the core answers from the mirror afterwards must
            // see this access's effect.
            self.publish_mirror();
            self.answer(&inc, &reply)?;
            did = true;
        }
        Ok(did)
    }

    /// Completes `inc` with `reply`, applying the injected `slow` and `corrupt-reply` faults.
    fn answer(&mut self, inc: &Incoming, reply: &ExitReply) -> Result<(), RuntimeError> {
        if !self.faults.slow.is_zero() {
            // A bounded sleep: poll with no fds for the configured delay (at most a minute).
            ipc::wait::poll(&mut [], self.faults.slow).map_err(RuntimeError::Poll)?;
        }
        if std::mem::take(&mut self.faults.corrupt_next) {
            let wrong = Incoming { seq: inc.seq ^ (1 << 63), ..*inc };
            return Ok(self.ring.complete(&wrong, reply)?);
        }
        Ok(self.ring.complete(inc, reply)?)
    }

    /// Executes an injected fault (see [`ServiceFault`]). Crash, abort, segv and hang do not
    /// return.
    fn inject(&mut self, fault: ServiceFault) {
        eprintln!("{}: injecting fault {fault:?}", self.name());
        match fault {
            ServiceFault::Crash => {
                // SAFETY: _exit ends the process at once; nothing in this process needs cleanup
                // (the core owns every resource the service uses).
                unsafe { libc::_exit(FAULT_CRASH_STATUS) }
            }
            ServiceFault::Abort => std::process::abort(),
            ServiceFault::Segv => segv(),
            ServiceFault::Hang => hang(),
            ServiceFault::Slow { ms } => {
                self.faults.slow = Duration::from_millis(u64::from(ms.min(FAULT_SLOW_MAX_MS)));
            }
            ServiceFault::CorruptReply => self.faults.corrupt_next = true,
            ServiceFault::SlowIo { ms } => {
                SLOW_IO_MS.store(u64::from(ms.min(FAULT_SLOW_MAX_MS)), std::sync::atomic::Ordering::Relaxed);
            }
            ServiceFault::Leak => {
                let added = leak(&mut self.faults.leaked);
                eprintln!("{}: leaked {} MiB, serving on", self.name(), added >> 20);
            }
        }
        self.publish_mirror();
    }

    fn dispatch(&mut self, inc: &Incoming) -> ExitReply {
        self.stats.requests += 1;
        let reply = match inc.request {
            Some(req) => self.handler.access(&req),
            None => None,
        };
        reply.unwrap_or_else(|| {
            self.stats.rejected += 1;
            ExitReply::rejected()
        })
    }
}

/// Dies by SIGSEGV, from a store to address 0 (a forced, synchronous fault that
/// kills even pid 1 of a PID namespace).
fn segv() -> ! {
    // SAFETY: the store targets address 0, which is never mapped (mmap_min_addr); the CPU faults
    // and the kernel kills the process with SIGSEGV before the asm block completes. The asm is
    // opaque to the compiler, so no Rust-level null dereference exists.
    unsafe { std::arch::asm!("mov byte ptr [{0}], 1", in(reg) 0usize, options(nostack)) };
    // Unreachable in practice; if address 0 were mapped, exit the way a crash would.
    // SAFETY: _exit ends the process at once.
    unsafe { libc::_exit(FAULT_CRASH_STATUS) }
}

/// Stops answering anything, forever: blocks in `poll` with no fds, one second at a time (the
/// core's supervisor kills the process when a forwarded exit misses its deadline).
fn hang() -> ! {
    loop {
        let _ = ipc::wait::poll(&mut [], Duration::from_secs(1));
    }
}

/// The SIGSYS reporter's encoder: a `ControlMsg::SeccompViolation` in its wire form.
fn encode_report(syscall: u32, arch: u32) -> Report {
    let mut bytes = [0u8; 32];
    let r = seccomp_report(syscall, arch);
    bytes[..r.len()].copy_from_slice(&r);
    Report { bytes, len: r.len() }
}

/// Performs a forbidden action (fault injection for the sandbox). Returns what the last system
/// call returned, which only happens when no filter stopped it.
pub fn attempt_forbidden(action: ForbiddenAction) -> std::io::Result<libc::c_long> {
    let check = |rc: libc::c_long| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) };
    match action {
        ForbiddenAction::OpenHostFile => {
            // SAFETY: openat with a NUL-terminated static path and integer flags.
            check(unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) })
        }
        ForbiddenAction::Execve => {
            let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: execve with a NUL-terminated path and NULL-terminated argv/envp arrays that
            // outlive the call.
            check(unsafe { libc::syscall(libc::SYS_execve, c"/bin/sh".as_ptr(), argv.as_ptr(), envp.as_ptr()) })
        }
        ForbiddenAction::InetSocket => {
            // SAFETY: socket takes integers only.
            check(unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) })
        }
        ForbiddenAction::Ptrace => {
            // Pid 1: the service itself inside its PID namespace, init outside one. (No getppid
            // first: the filter would stop that call instead.)
            // SAFETY: ptrace(PTRACE_ATTACH) takes integers (addr and data are unused).
            check(unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_ATTACH, 1, 0, 0) })
        }
        ForbiddenAction::Mount => {
            // SAFETY: mount with NUL-terminated static strings and no data.
            check(unsafe {
                libc::syscall(
                    libc::SYS_mount,
                    c"none".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null::<libc::c_void>(),
                )
            })
        }
        ForbiddenAction::SignalAll => {
            // SAFETY: kill takes integers only.
            check(unsafe { libc::syscall(libc::SYS_kill, -1, libc::SIGKILL) })
        }
        ForbiddenAction::WriteOutsideRoot => {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
            // SAFETY: openat with a NUL-terminated static path, integer flags and mode.
            let fd = check(unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/tmp/bulkhead-escape".as_ptr(), flags, 0o600)
            })?;
            let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: the kernel just returned this fd; we own it and close it here.
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: writes 7 bytes of a static buffer to an fd we own.
            check(unsafe { libc::syscall(libc::SYS_write, file.as_raw_fd(), c"escaped".as_ptr(), 7) })
        }
    }
}

/// `e` and its `source()` chain on one line, `: `-separated (what a service reports to the core
/// when its set-up fails).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_encoder_matches_the_wire_format() {
        let r = encode_report(59, bulkhead_policies::AUDIT_ARCH_X86_64);
        let msg = ipc::control::decode(&r.bytes[..r.len]).expect("decode");
        assert_eq!(msg, ControlMsg::SeccompViolation { syscall: 59, arch: bulkhead_policies::AUDIT_ARCH_X86_64 });
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn control_fd_args() {
        assert_eq!(parse_control_fd(args(&[])).expect("default"), 3);
        assert_eq!(parse_control_fd(args(&["--control-fd", "7"])).expect("fd"), 7);
        assert_eq!(parse_control_fd(args(&["--control-fd=9"])).expect("fd"), 9);
        assert!(matches!(parse_control_fd(args(&["--control-fd"])), Err(RuntimeError::Usage(_))));
        assert!(matches!(parse_control_fd(args(&["--control-fd", "-1"])), Err(RuntimeError::Usage(_))));
        assert!(matches!(parse_control_fd(args(&["--bogus"])), Err(RuntimeError::Usage(_))));
    }

    #[test]
    fn spin_clock_counts_empty_turns_only() {
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        let mut c = SpinClock::default();
        // Work, then empty turns at 10, 20 and 50 µs, then work again: 40 µs of spinning.
        c.end();
        c.idle(at(10));
        c.idle(at(20));
        c.idle(at(50));
        c.end();
        assert_eq!(c.total_ns, 40_000);
        // A sleep is no spin: an episode ends before it, and the next starts after it.
        c.idle(at(1_000));
        c.end();
        c.idle(at(900_000));
        c.idle(at(900_005));
        c.end();
        c.end();
        assert_eq!(c.total_ns, 45_000);
    }

    #[test]
    fn bad_control_fd() {
        let r = Startup::from_args(args(&["--control-fd", "999999"]));
        assert!(matches!(r, Err(RuntimeError::BadControlFd(999999))), "{r:?}");
    }
}
