//! Builds a running VM from its description ([`VmConfig`]): guest RAM, the VM, the device
//! services and their bus entries, the kernel, the vCPU threads ([`build`] → [`RunningVm`]); then
//! waits for a stop and tears everything down.
//!
//! Every step that can fail on user input (kernel path, memory size, command line, a missing
//! service binary, an image, a TAP) fails before any vCPU runs, with one error naming the problem.
//! Whatever was created up to the failing step is owned by a value whose `Drop` undoes it
//! (services are shut down, vCPU and fault threads stopped and joined, the API socket removed),
//! so a failed build leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::control::{ForbiddenAction, RateLimit, RateLimitUpdate};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpu, mptable};
use crate::boot;
use crate::bus::BusError;
use crate::config::{
    ConfigError, ConsoleConfig, DeviceId, DeviceKind, DevicePlan, DriveConfig, DriveUpdate, NetworkInterface,
    NetworkInterfaceUpdate, PlannedDevice, RateLimiterConfig, VmConfig,
};
use crate::control::{StopHandle, StopReason};
use crate::devices::{
    DebugExit, PostCode, DEBUG_EXIT_PORT, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_KBD_GSI, POST_CODE_PORT,
};
use crate::host::HostKvm;
use crate::memory::{ram_ranges, GuestRam};
use crate::mmio::{MmioAllocator, MmioSlot};
use crate::service;
use crate::vcpu::{self, Buses};
use crate::vm;

/// COM1: the console service's port range.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports in a 16550's register window.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_GSI: u32 = 4;

/// Queues per virtio-blk device.
pub const BLOCK_QUEUES: u16 = 1;
/// Largest queue size a virtio-blk device offers.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Largest queue size a virtio-net device offers (RX and TX).
pub const NET_QUEUE_SIZE: u16 = 256;

/// Errors from `bulkhead run`.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The core's jail.
    #[error("jail")]
    Jail(#[source] crate::jail::JailError),
    /// The VM's privileged helper.
    #[error("privileged helper")]
    Helper(#[source] Box<crate::helper::HelperError>),
    /// The VM's cgroup.
    #[error(transparent)]
    Cgroup(crate::cgroup::CgroupError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Setting up a vCPU.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// A device service.
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    /// The bus map.
    #[error("device map: {0}")]
    Bus(#[from] BusError),
    /// A service binary is missing.
    #[error("service binary {0} not found (build it with `cargo build --release`, or pass --service-dir)")]
    MissingService(PathBuf),
    /// A disk image cannot be used.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// A TAP device cannot be opened.
    #[error("cannot open TAP device for --net tap={name}")]
    Tap {
        /// The interface name given.
        name: String,
        /// Cause.
        #[source]
        source: crate::tap::TapError,
    },
    /// The virtio-mmio address map.
    #[error(transparent)]
    Mmio(#[from] crate::mmio::MmioError),
    /// The serial output path names a file that must not be written.
    #[error("refusing serial output {path}: {why}")]
    SerialOutputRefused {
        /// The path given.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {path}")]
    SerialOutput {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The fault schedule could not start.
    #[error("fault injection")]
    Api(#[source] Box<crate::faults::FaultError>),
    /// The VM description is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A vCPU thread.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Some OS call failed.
    #[error("{what} failed")]
    Os {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A KVM call outside VM creation failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> LaunchError {
    move |source| LaunchError::Os { what, source }
}

/// What a service runs: with `--service-dir`, the stand-alone binary `name` from that directory;
/// otherwise the core's own executable (the multi-call `bulkhead`) started as `name`.
pub fn service_program(config: &VmConfig, name: &str) -> Result<service::Program, LaunchError> {
    let path = match &config.bulkhead.service_dir {
        Some(dir) => dir.join(name),
        None => std::env::current_exe().map_err(os("find the bulkhead executable"))?,
    };
    if !path.is_file() {
        return Err(LaunchError::MissingService(path));
    }
    Ok(if config.bulkhead.service_dir.is_some() {
        service::Program::standalone(path)
    } else {
        service::Program::multi_call(path, name)
    })
}

/// CPU time a live process has used, in ns (`/proc/PID/schedstat`, first field).
pub fn service_cpu_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?.split_whitespace().next()?.parse().ok()
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// Puts the terminal on stdin in raw mode while the guest owns it, and restores it on drop.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self(None);
        }
        let Ok(saved) = tcgetattr(&stdin) else { return Self(None) };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Keep output post-processing so the core's log lines still start at column 0.
        raw.output_flags = saved.output_flags;
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, saved);
        }
    }
}

fn serial_fds(console: &ConsoleConfig, drives: &[DriveConfig]) -> Result<(OwnedFd, Option<OwnedFd>), LaunchError> {
    let output: OwnedFd = if console.output == "stdout" {
        std::io::stdout().lock().as_fd_owned().map_err(os("dup(stdout)"))?
    } else {
        open_serial_output(Path::new(&console.output), console.append, drives)?.into()
    };
    let output = nonblocking_reopen(output);
    let input =
        if console.input == "stdin" { Some(std::io::stdin().as_fd_owned().map_err(os("dup(stdin)"))?) } else { None };
    Ok((output, input))
}
/// The console's output as an open file description of its own in non-blocking mode, where it
/// is a pipe, FIFO or terminal: opened again through `/proc/self/fd`, so `O_NONBLOCK` does not
/// leak into the core's stdout (or whoever shares its description). The console service then
/// never blocks on a reader that stalls (it buffers, then drops and counts). A regular file gets
/// `O_NONBLOCK` (meaningless for it) so the service writes it without `poll`; a socket, which
/// cannot be reopened, is kept as it is, and the service guards its writes with `poll`.
fn nonblocking_reopen(fd: OwnedFd) -> OwnedFd {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = File::from(fd);
    let Ok(meta) = file.metadata() else { return file.into() };
    if meta.is_file() {
        // O_NONBLOCK means nothing to a regular file, whoever shares the description: it only
        // tells the service it may write without `poll`.
        // SAFETY: F_GETFL/F_SETFL on an fd we own; only the status flags change.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        return file.into();
    }
    if !(meta.file_type().is_fifo() || meta.file_type().is_char_device()) {
        return file.into();
    }
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(&path) {
        Ok(f) => f.into(),
        Err(e) => {
            log::warn!("console output stays blocking (cannot reopen it non-blocking: {e})");
            file.into()
        }
    }
}

/// Opens the console's output file without truncating anything: created if missing; an existing
/// regular file must be empty (or `append` given) and must not be a disk image, of this VM
/// (`drives`, empty placeholders included) or of any other (it holds an image lock). FIFOs and
/// character devices are taken as they are.
fn open_serial_output(path: &Path, append: bool, drives: &[DriveConfig]) -> Result<File, LaunchError> {
    let refuse = |why: &str| LaunchError::SerialOutputRefused { path: path.to_path_buf(), why: why.to_string() };
    let io_err = |source| LaunchError::SerialOutput { path: path.to_path_buf(), source };
    let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Ok(file);
    }
    let disk_of_this_vm =
        drives.iter().filter_map(|d| d.path_on_host.as_deref()).any(|p| crate::image::same_file(&file, p));
    if disk_of_this_vm || crate::image::is_locked(&file).map_err(io_err)? {
        return Err(refuse("it is a disk image"));
    }
    if meta.len() > 0 && !append {
        return Err(refuse("it exists and is not empty (remove it, or append with --serial-append)"));
    }
    Ok(file)
}

trait DupOwned {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd>;
}

impl<T: std::os::fd::AsFd> DupOwned for T {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}

/// The devices in the core: what they give the rest of the VMM.
struct InCore {
    post: Arc<PostCode>,
    i8042: Arc<I8042>,
}

fn register_in_core_devices(buses: &mut Buses, stop: &StopHandle, vm: &VmFd) -> Result<InCore, LaunchError> {
    buses.pio.insert(DEBUG_EXIT_PORT, 1, Arc::new(DebugExit::new(stop.clone())))?;
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_GSI).map_err(|source| LaunchError::Kvm { what: "KVM_IRQFD", source })?;
    let i8042 = Arc::new(I8042::new(stop.clone(), Some(kbd_irq)));
    buses.pio.insert(I8042_DATA_PORT, 1, i8042.clone())?;
    buses.pio.insert(I8042_COMMAND_PORT, 1, i8042.clone())?;
    let post = Arc::new(PostCode::default());
    buses.pio.insert(POST_CODE_PORT, 1, post.clone())?;
    Ok(InCore { post, i8042 })
}

/// A drive, its image opened and its place in the guest's address map chosen, before its
/// service starts.
struct PlannedDisk {
    drive: DriveConfig,
    image: crate::image::Image,
    slot: MmioSlot,
}

/// Opens every drive's image and gives each a virtio-mmio slot.
fn plan_disks(config: &VmConfig, mmio: &mut MmioAllocator) -> Result<Vec<PlannedDisk>, LaunchError> {
    let mut planned = Vec::new();
    for drive in &config.drives {
        let path = drive.path_on_host.clone().unwrap_or_default();
        let image = crate::image::open(&path, drive.read_only())?;
        planned.push(PlannedDisk { drive: drive.clone(), image, slot: mmio.allocate()? });
    }
    Ok(planned)
}

/// Creates a virtio-mmio slot's irqfd (registered on its GSI) and one ioeventfd per queue
/// (registered on its QueueNotify register with the queue index as datamatch): a guest kick
/// signals the eventfd inside KVM and never reaches the core.
fn wire_slot(vm: &VmFd, slot: &MmioSlot, queues: u16) -> Result<(EventFd, Vec<EventFd>), LaunchError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?;
    vm.register_irqfd(&irq, slot.gsi).map_err(|source| LaunchError::Kvm { what: "KVM_IRQFD", source })?;
    let mut kicks = Vec::new();
    for queue in 0..queues {
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?;
        vm.register_ioevent(&kick, &IoEventAddress::Mmio(slot.queue_notify_addr()), u32::from(queue))
            .map_err(|source| LaunchError::Kvm { what: "KVM_IOEVENTFD", source })?;
        kicks.push(kick);
    }
    Ok((irq, kicks))
}

/// The limits a service enforces for an optional Firecracker rate limiter (validated already).
fn rate_limit(r: Option<&RateLimiterConfig>) -> RateLimit {
    r.and_then(|r| r.to_rate_limit().ok()).unwrap_or_default()
}

/// What every device start needs from the VM being built.
struct Wiring<'a> {
    config: &'a VmConfig,
    vm: &'a VmFd,
    ram: &'a GuestRam,
    buses: &'a mut Buses,
    cgroup: Option<&'a Arc<crate::cgroup::KeptCgroup>>,
    helper: Option<&'a Arc<crate::helper::Helper>>,
    stop: &'a StopHandle,
}

impl Wiring<'_> {
    fn start_disk(&mut self, index: usize, disk: PlannedDisk) -> Result<service::ServiceHandle, LaunchError> {
        let binary = service_program(self.config, "bulkhead-block")?;
        let PlannedDisk { drive, image, slot } = disk;
        let (irq, queue_notify) = wire_slot(self.vm, &slot, BLOCK_QUEUES)?;
        let spec = service::BlockSpec {
            id: drive.drive_id.clone(),
            disk: image.file,
            witness: image.witness,
            read_only: drive.read_only(),
            mmio_base: slot.base,
            mmio_len: slot.len,
            gsi: slot.gsi,
            memfd: self.ram.memfd().try_clone_to_owned().map_err(os("dup of the guest memory memfd"))?,
            memory: ram_ranges(self.ram.size()),
            queue_notify,
            irq,
            queue_size: BLOCK_QUEUE_SIZE,
            rate_limit: rate_limit(drive.rate_limiter.as_ref()),
            write_errors: drive.werror,
            read_errors: drive.rerror,
        };
        let (device, handle) =
            service::spawn_block(&binary, spec, service_options(self.config, self.cgroup, self.helper, self.stop))?;
        self.buses.mmio.insert(slot.base, slot.len, device)?;
        log::info!(
            "disk{index}: {}{} at {:#x} (GSI {}) served by pid {} (drive {})",
            drive.path_on_host.as_deref().unwrap_or(Path::new("")).display(),
            if drive.read_only() { " (read-only)" } else { "" },
            slot.base,
            slot.gsi,
            handle.pid(),
            drive.drive_id,
        );
        Ok(handle)
    }

    fn start_net(&mut self, index: usize, net: PlannedNet) -> Result<service::ServiceHandle, LaunchError> {
        let binary = service_program(self.config, "bulkhead-net")?;
        let PlannedNet { iface, tap, slot } = net;
        // RX (0) and TX (1).
        let (irq, mut kicks) = wire_slot(self.vm, &slot, 2)?;
        let tx_notify = kicks.pop();
        let (Some(rx_notify), Some(tx_notify)) = (kicks.pop(), tx_notify) else {
            unreachable!("wire_slot returns one eventfd per queue")
        };
        let mac = iface.guest_mac.map_or_else(|| default_mac(index), |m| m.0);
        let crate::tap::Tap { fd, name: tap_name } = tap;
        let net_spec = service::NetSpec {
            id: iface.iface_id.clone(),
            tap: fd,
            tap_name: tap_name.clone(),
            mac,
            mmio_base: slot.base,
            mmio_len: slot.len,
            gsi: slot.gsi,
            memfd: self.ram.memfd().try_clone_to_owned().map_err(os("dup of the guest memory memfd"))?,
            memory: ram_ranges(self.ram.size()),
            rx_notify,
            tx_notify,
            irq,
            queue_size: NET_QUEUE_SIZE,
            rx_rate_limit: rate_limit(iface.rx_rate_limiter.as_ref()),
            tx_rate_limit: rate_limit(iface.tx_rate_limiter.as_ref()),
        };
        let (device, handle) =
            service::spawn_net(&binary, net_spec, service_options(self.config, self.cgroup, self.helper, self.stop))?;
        self.buses.mmio.insert(slot.base, slot.len, device)?;
        log::info!(
            "net{index}: TAP {tap_name}, MAC {} at {:#x} (GSI {}) served by pid {} (interface {})",
            ipc::control::mac_string(&mac),
            slot.base,
            slot.gsi,
            handle.pid(),
            iface.iface_id,
        );
        Ok(handle)
    }

    fn start_console(&mut self) -> Result<service::ServiceHandle, LaunchError> {
        let binary = service_program(self.config, "bulkhead-console")?;
        let (output, input) = serial_fds(&self.config.bulkhead.console, &self.config.drives)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?;
        self.vm.register_irqfd(&irq, COM1_GSI).map_err(|source| LaunchError::Kvm { what: "KVM_IRQFD", source })?;
        let (device, handle) = service::spawn_console(
            &binary,
            output,
            input,
            irq,
            COM1_BASE,
            service_options(self.config, self.cgroup, self.helper, self.stop),
        )?;
        self.buses.pio.insert(u64::from(COM1_BASE), COM1_LEN, device)?;
        Ok(handle)
    }
}

/// A network interface, its TAP opened and its place in the guest's address map chosen, before
/// its service starts.
struct PlannedNet {
    iface: NetworkInterface,
    tap: crate::tap::Tap,
    slot: MmioSlot,
}

/// Opens (or creates) every interface's TAP and gives each a virtio-mmio slot.
fn plan_nets(config: &VmConfig, mmio: &mut MmioAllocator) -> Result<Vec<PlannedNet>, LaunchError> {
    let mut planned = Vec::new();
    for iface in &config.network_interfaces {
        let tap = crate::tap::open_tap(&iface.host_dev_name, 0)
            .map_err(|source| LaunchError::Tap { name: iface.host_dev_name.clone(), source })?;
        planned.push(PlannedNet { iface: iface.clone(), tap, slot: mmio.allocate()? });
    }
    Ok(planned)
}

/// The MAC an interface without `guest_mac` gets: locally administered, unicast, made from the
/// core's pid and the device's index, so two VMs on one bridge differ.
fn default_mac(index: usize) -> [u8; 6] {
    let pid = crate::pidns::host_pid().to_be_bytes();
    [0x02, 0xb4, pid[1], pid[2], pid[3], u8::try_from(index & 0xff).unwrap_or(0)]
}

/// Service tuning from the supervision settings: the per-exit deadline, the liveness check and
/// the restart policy.
fn service_options(
    config: &VmConfig,
    cgroup: Option<&Arc<crate::cgroup::KeptCgroup>>,
    helper: Option<&Arc<crate::helper::Helper>>,
    stop: &StopHandle,
) -> service::ServiceOptions {
    let s = &config.bulkhead.supervision;
    service::ServiceOptions {
        cgroup: cgroup.cloned(),
        helper: helper.cloned(),
        stop: Some(stop.clone()),
        call_timeout: Duration::from_millis(s.service_deadline_ms),
        liveness_interval: Duration::from_millis(s.service_liveness_ms),
        io_deadline: Duration::from_millis(s.service_io_deadline_ms),
        restart: service::RestartPolicy {
            burst: s.restart_burst.max,
            burst_window: s.restart_burst.window,
            ..service::RestartPolicy::with_cap(s.restart_max.max, s.restart_max.window)
        },
        ..service::ServiceOptions::default()
    }
}

/// The VM's devices by the core's [`DeviceId`]: each planned device and the service behind it.
/// Every lookup by a user's name (faults, injections, the API) goes through here.
#[derive(Debug, Clone)]
pub struct DeviceRegistry {
    plan: DevicePlan,
    services: Vec<service::ServiceRef>,
}

impl DeviceRegistry {
    /// Pairs the plan's devices with their services, which must be in the plan's order.
    fn new(plan: DevicePlan, services: Vec<service::ServiceRef>) -> Self {
        assert_eq!(plan.devices().len(), services.len(), "one service per planned device");
        Self { plan, services }
    }

    /// The device a user means by `name` (see [`DevicePlan::resolve`]).
    pub fn resolve(&self, name: &str) -> Option<(&PlannedDevice, &service::ServiceRef)> {
        self.get(self.plan.resolve(name)?)
    }

    /// The device with this id.
    pub fn get(&self, id: DeviceId) -> Option<(&PlannedDevice, &service::ServiceRef)> {
        let i = usize::try_from(id.0).ok()?;
        Some((self.plan.devices().get(i)?, self.services.get(i)?))
    }

    /// Every device, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&PlannedDevice, &service::ServiceRef)> {
        self.plan.devices().iter().zip(&self.services)
    }

    /// The names a user may use, for messages.
    pub fn names(&self) -> String {
        self.plan.names()
    }
}

/// A forbidden action to tell a service to attempt, resolved to its device.
#[derive(Debug, Clone)]
struct PendingInjection {
    device: DeviceId,
    action: ForbiddenAction,
    delay: Duration,
}

/// A running VM and everything it owns. Fields are dropped in declaration order, which is the
/// order teardown needs: the vCPUs stop first, then the fault schedules and the services, and
/// guest RAM goes last, when nothing maps it any more. A VM that failed half-way
/// through [`build`] is torn down the same way by the locals' drops.
pub struct RunningVm {
    vcpus: vcpu::VcpuSet,
    faults: Option<crate::faults::ScheduleThread>,
    services: Vec<service::ServiceHandle>,
    registry: DeviceRegistry,
    injections: Vec<PendingInjection>,
    terminal: RawTerminal,
    post: Arc<PostCode>,
    i8042: Arc<I8042>,
    stop: StopHandle,
    stopped: crossbeam_channel::Receiver<StopReason>,
    started: Instant,
    _buses: Arc<Buses>,
    vm: VmFd,
    _ram: GuestRam,
    /// Dropped once the services are gone and guest RAM is unmapped.
    cgroup: Option<Arc<crate::cgroup::KeptCgroup>>,
    /// The VM's helper: after the drop, its channel stays open until the process exits.
    _helper: Option<Arc<crate::helper::Helper>>,
    /// The VM's ids, held until the process exits (the helper holds them too).
    _lease: Option<crate::jail::IdLease>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm").field("vcpus", &self.vcpus.len()).field("services", &self.services.len()).finish()
    }
}

/// Builds and starts the VM `config` describes (validated here first), known as `id`.
pub fn build(id: &str, config: &VmConfig) -> Result<RunningVm, LaunchError> {
    config.validate()?;
    let boot_source = config.boot_source.as_ref().ok_or(ConfigError::NoBootSource)?;
    // Cheap checks on user input first, so nothing is created when they fail.
    File::open(&boot_source.kernel_image_path)
        .map_err(|source| boot::BootError::OpenKernel { path: boot_source.kernel_image_path.clone(), source })?;
    service_program(config, "bulkhead-console")?;
    if !config.drives.is_empty() {
        service_program(config, "bulkhead-block")?;
    }
    if !config.network_interfaces.is_empty() {
        service_program(config, "bulkhead-net")?;
    }
    // Which namespaces services get: refuses to go on if one is unavailable, unless the user
    // asked for insecure_no_sandbox (then warns loudly). Probed before guest RAM exists.
    let sandbox = service::init_sandbox(config.bulkhead.insecure_no_sandbox).map_err(service::ServiceError::Sandbox)?;
    let plan = config.plan();
    let mut mmio = MmioAllocator::default();
    let disks = plan_disks(config, &mut mmio)?;
    let nets = plan_nets(config, &mut mmio)?;

    let host = HostKvm::detect();
    let user_cmdline = config.kernel_cmdline();
    let mut extra = host.extra_kernel_params(&user_cmdline);
    extra.extend(disks.iter().map(|d| d.slot.cmdline_word()));
    extra.extend(nets.iter().map(|n| n.slot.cmdline_word()));
    let cmdline = boot::build_cmdline(&user_cmdline, &extra)?;
    if host == HostKvm::Pvm {
        log::info!(
            "host KVM is PVM (no VMX/SVM): guest runs under shadow paging; added kernel parameters: {}",
            if extra.is_empty() { "(none needed, already present)".to_string() } else { extra.join(" ") }
        );
    }

    let machine = &config.machine_config;
    if let Some(t) = machine.cpu_template.as_deref().filter(|t| *t != "None") {
        log::warn!("cpu_template {t} is not applied: the guest sees the host's CPU features (minus the PVM masks)");
    }
    // The VM's ids and its privileged helper (as root), which creates its services and keeps
    // its cgroup; then the cgroup, before guest RAM exists, so the RAM is charged to the VM
    // (the services go into it as they start).
    let (lease, helper) = start_helper(id, config, &sandbox)?;
    let cgroup = crate::cgroup::for_vm(
        id,
        &config.bulkhead.cgroup,
        machine.mem_size_mib.saturating_mul(1 << 20),
        helper.as_ref(),
    )
    .map_err(LaunchError::Cgroup)?
    .map(Arc::new);
    let ram = GuestRam::new(machine.mem_size_mib)?;
    let kvm = vm::open_kvm()?;
    let vm = vm::create_vm(&kvm, &ram)?;

    let (stop, stopped) = StopHandle::new();
    let mut buses = Buses::default();
    let in_core = register_in_core_devices(&mut buses, &stop, &vm)?;
    // The services, in the plan's order (console, drives, interfaces): a failure here or later
    // drops those already started, which shuts them down.
    let mut services = Vec::new();
    {
        let mut w = Wiring {
            config,
            vm: &vm,
            ram: &ram,
            buses: &mut buses,
            cgroup: cgroup.as_ref(),
            helper: helper.as_ref(),
            stop: &stop,
        };
        services.push(w.start_console()?);
        for (i, disk) in disks.into_iter().enumerate() {
            services.push(w.start_disk(i, disk)?);
        }
        for (i, net) in nets.into_iter().enumerate() {
            services.push(w.start_net(i, net)?);
        }
    }
    let registry = DeviceRegistry::new(plan, services.iter().map(service::ServiceHandle::remote).collect());
    // The core in its cgroup (the move ran alongside the above) and the services in theirs,
    // before guest memory is written: its pages are charged to the VM.
    if let Some(cg) = &cgroup {
        cg.settle().map_err(LaunchError::Cgroup)?;
    }

    let kernel = boot::load_kernel(ram.memory(), &boot_source.kernel_image_path)?;
    let initrd = match &boot_source.initrd_path {
        Some(p) => Some(boot::load_initrd(&ram, p, kernel.end)?),
        None => None,
    };
    boot::write_boot_params(&ram, &kernel, &cmdline, initrd)?;
    mptable::setup(ram.memory(), machine.vcpu_count)?;
    cpu::write_boot_tables(ram.memory(), kernel.protocol)?;
    log::info!(
        "guest: {} MiB, {} vCPU(s), kernel {} entry {:#x} ({} boot), cmdline \"{}\"",
        machine.mem_size_mib,
        machine.vcpu_count,
        boot_source.kernel_image_path.display(),
        kernel.entry,
        kernel.protocol.name(),
        cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    );

    // Fault schedules run on a thread of their own, created before the main thread's seccomp
    // filter (they kill and signal).
    let schedules = config
        .bulkhead
        .faults
        .iter()
        .filter_map(|f| registry.resolve(&f.device).map(|(_, svc)| (svc.clone(), f.clone())))
        .collect();
    let faults =
        crate::faults::ScheduleThread::start(schedules, helper.is_some()).map_err(|e| LaunchError::Api(Box::new(e)))?;
    let injections = config
        .bulkhead
        .inject_forbidden
        .iter()
        .filter_map(|i| {
            let id = registry.plan.resolve(&i.device)?;
            Some(PendingInjection { device: id, action: i.action, delay: i.delay })
        })
        .collect();

    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| LaunchError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source })?;
    let mut fds = Vec::new();
    for i in 0..machine.vcpu_count {
        let fd = vm.create_vcpu(u64::from(i)).map_err(|source| LaunchError::Kvm { what: "KVM_CREATE_VCPU", source })?;
        cpu::configure_vcpu(&fd, cpuid.clone(), i, machine.vcpu_count, kernel.entry, kernel.protocol)?;
        fds.push(fd);
    }
    vcpu::install_kick_handler()
        .map_err(|e| LaunchError::Os { what: "installing the vCPU kick handler", source: e.into() })?;
    install_signal_handlers()?;
    let terminal = if config.console_reads_stdin() { RawTerminal::enter() } else { RawTerminal(None) };

    // Everything that needs root is done: the core drops it before any vCPU thread exists.
    jail_core(id, config, lease.as_ref(), helper.as_deref(), services.len())?;

    let buses = Arc::new(buses);
    let mut vcpus = vcpu::VcpuSet::default();
    for fd in fds {
        vcpus.spawn(fd, buses.clone(), stop.clone()).map_err(LaunchError::Vcpu)?;
    }
    if let Some(lists) = &config.bulkhead.cgroup.resources.vcpu_affinity {
        let n =
            crate::cgroup::pin_vcpus_expecting(lists, usize::from(machine.vcpu_count)).map_err(LaunchError::Cgroup)?;
        log::info!("vCPU affinity: {n} vCPU thread(s) pinned to CPUs {}", lists.join(";"));
    }
    Ok(RunningVm {
        vcpus,
        faults,
        services,
        registry,
        injections,
        terminal,
        post: in_core.post,
        i8042: in_core.i8042,
        stop,
        stopped,
        started: Instant::now(),
        _buses: buses,
        vm,
        _ram: ram,
        cgroup,
        _helper: helper,
        _lease: lease,
    })
}

/// As root: takes the VM's ids ([`crate::jail::lease`]) and starts its helper
/// ([`crate::helper`]). Otherwise neither (said in the log): the core then creates its services
/// itself, as the user it runs as.
fn start_helper(
    id: &str,
    config: &VmConfig,
    sandbox: &service::Sandbox,
) -> Result<(Option<crate::jail::IdLease>, Option<Arc<crate::helper::Helper>>), LaunchError> {
    if !nix::unistd::geteuid().is_root() {
        log::info!(
            "not started as root: no jail for the core (it keeps the ids it runs with), no per-VM ids for \
             the services, no cgroup"
        );
        return Ok((None, None));
    }
    if config.bulkhead.jail.disabled && config.bulkhead.cgroup.disabled {
        log::warn!(
            "INSECURE (--no-jail): no privileged helper either (--no-cgroup): the core creates its services \
             itself and keeps uid 0 and every capability for its whole life"
        );
        return Ok((None, None));
    }
    let lease = crate::jail::lease(&config.bulkhead.jail).map_err(LaunchError::Jail)?;
    let mut programs = vec![service_program(config, "bulkhead-console")?];
    if !config.drives.is_empty() {
        programs.push(service_program(config, "bulkhead-block")?);
    }
    if !config.network_interfaces.is_empty() {
        programs.push(service_program(config, "bulkhead-net")?);
    }
    // The sandbox decision is the core's (probed while the VMM waited): the helper takes it.
    let setup = crate::helper::HelperSetup {
        vm_id: id.to_string(),
        service_ids: Some(lease.ids.service),
        namespaces: sandbox.namespaces.flags(),
        switch_id: sandbox.switch_id,
        programs,
        api_socket: crate::api::socket_path(),
        core_pid: crate::pidns::host_pid(),
        jail_root: (crate::jail::in_own_namespaces() && !config.bulkhead.jail.disabled)
            .then(|| crate::jail::jail_root(id)),
    };
    let holds: Vec<_> = lease.holds.iter().map(std::os::fd::AsFd::as_fd).collect();
    let helper = match crate::pidns::take_helper() {
        Some(p) => crate::helper::Helper::prestarted(p, &setup, &holds),
        // After a split only the launcher's helper creates services in the core's namespace,
        // and a failed start has sent it away.
        None if crate::pidns::in_own_pid_namespace() => {
            return Err(LaunchError::Jail(crate::jail::JailError::Ids(
                "this bulkhead process's privileged helper left after a failed start: start a new bulkhead".into(),
            )))
        }
        None => crate::helper::Helper::start(&setup, &holds),
    }
    .map_err(|e| LaunchError::Helper(Box::new(e)))?;
    log::info!(
        "jail: VM ids core {}:{} services {}:{}; privileged helper {}",
        lease.ids.core.0,
        lease.ids.core.1,
        lease.ids.service.0,
        lease.ids.service.1,
        helper.pid().map_or_else(|| "started by the launcher".to_string(), |p| format!("pid {p}"))
    );
    Ok((Some(lease), Some(helper)))
}

/// Drops the core's privileges ([`crate::jail::drop_privileges`]) unless the jail is off (then
/// says so loudly), and seals the helper: from now on it alone acts with privileges.
fn jail_core(
    id: &str,
    config: &VmConfig,
    lease: Option<&crate::jail::IdLease>,
    helper: Option<&crate::helper::Helper>,
    services: usize,
) -> Result<(), LaunchError> {
    let (Some(lease), Some(helper)) = (lease, helper) else { return Ok(()) };
    if config.bulkhead.jail.disabled {
        log::warn!(
            "INSECURE (--no-jail): the core keeps uid 0 and every capability for its whole life; a guest \
             that escapes into it owns the host"
        );
        return Ok(());
    }
    let vcpus = u64::from(config.machine_config.vcpu_count);
    let limits = crate::jail::CoreLimits::for_vm(vcpus, services as u64);
    let root = crate::jail::in_own_namespaces().then(|| crate::jail::jail_root(id));
    crate::jail::drop_privileges(&lease.ids, &limits, root.as_deref()).map_err(LaunchError::Jail)?;
    if let Some(r) = &root {
        let pid = if crate::pidns::in_own_pid_namespace() { "PID, " } else { "" };
        log::info!("jail: the core's root is {} (its own {pid}mount and IPC namespaces)", r.display());
    }
    helper.seal();
    log::info!(
        "jail: core runs as {}:{} with no capabilities, no_new_privs, not dumpable, at most {} fds and {} tasks",
        lease.ids.core.0,
        lease.ids.core.1,
        limits.open_files,
        limits.tasks
    );
    Ok(())
}

/// The termination signal (SIGINT, SIGTERM, SIGHUP) received since the handlers were
/// installed, if any.
pub fn take_signal() -> Option<i32> {
    match SIGNALLED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP: they only record the signal, which the
/// main thread turns into a stop.
pub fn install_signal_handlers() -> Result<(), LaunchError> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| LaunchError::Os { what: "installing signal handlers", source: e.into() })?;
    }
    Ok(())
}

impl RunningVm {
    /// From now on this thread may not touch the VM's cgroup files (its seccomp filter): the
    /// helper removes the cgroup once the core has exited ([`crate::helper::Helper::seal`]).
    pub fn seal_helper(&self) {
        if let Some(h) = &self._helper {
            h.seal();
        }
    }

    /// The VM's cgroup, if it has one.
    pub fn cgroup(&self) -> Option<&Arc<crate::cgroup::KeptCgroup>> {
        self.cgroup.as_ref()
    }

    /// The devices.
    pub fn registry(&self) -> &DeviceRegistry {
        &self.registry
    }

    /// Asks the VM to stop.
    pub fn stop(&self, reason: StopReason) {
        self.stop.stop(reason);
    }

    /// Each vCPU's exit counter.
    pub fn vcpu_exits(&self) -> Vec<Arc<std::sync::atomic::AtomicU64>> {
        self.vcpus.exit_counters()
    }

    /// Where the reason for the VM's stop arrives.
    pub fn stopped(&self) -> &crossbeam_channel::Receiver<StopReason> {
        &self.stopped
    }

    /// Sends the injections that are due (call it regularly while the VM runs).
    pub fn tick(&mut self) {
        self.inject_due();
    }

    /// When the next injection is due, if any is left ([`tick`](Self::tick) sends it).
    pub fn next_injection(&self) -> Option<Instant> {
        self.injections.iter().map(|inj| self.started + inj.delay).min()
    }

    /// A disk whose error policy stops the VM holds a request the host failed: which drive and
    /// why (`drive data: write at sector 8: No space left on device`). Asked regularly; each
    /// hold is reported once.
    pub fn take_io_stop(&self) -> Option<String> {
        self.registry
            .iter()
            .filter(|(d, _)| d.kind == DeviceKind::Block)
            .find_map(|(d, svc)| svc.take_io_stop().map(|why| format!("drive {}: {why}", d.user_id)))
    }

    /// Pauses the VM: every vCPU out of `KVM_RUN` first (no new exit reaches a service), then
    /// every service (no chain taken, no interrupt, no TAP read). Each step waits at most
    /// `limit` for its acknowledgement; on a failure whatever was paused is resumed.
    pub fn pause(&self, limit: Duration) -> Result<(), LaunchError> {
        self.vcpus.pause(limit)?;
        for (i, svc) in self.services.iter().enumerate() {
            if let Err(e) = svc.remote().pause(limit) {
                for s in &self.services[..=i] {
                    let _ = s.remote().resume(limit);
                }
                let _ = self.vcpus.resume(limit);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Every vCPU's state ([`crate::vcpu_state`]), each read by its own thread (the guest goes
    /// on at once), and the I/O APIC's.
    pub fn cpu_report(&self, limit: Duration) -> Result<crate::vcpu_state::CpuReport, LaunchError> {
        let vcpus = self.vcpus.report(limit)?;
        let (ioapic, ioapic_error) = match crate::vcpu_state::ioapic(&self.vm) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(format!("KVM_GET_IRQCHIP: {e}"))),
        };
        Ok(crate::vcpu_state::CpuReport { vcpus, ioapic, ioapic_error })
    }

    /// Resumes the VM: the services first, then the vCPUs.
    pub fn resume(&self, limit: Duration) -> Result<(), LaunchError> {
        for svc in &self.services {
            svc.remote().resume(limit)?;
        }
        self.vcpus.resume(limit)?;
        Ok(())
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (the i8042); false if it was not read.
    pub fn ctrl_alt_del(&self) -> bool {
        self.i8042.ctrl_alt_del()
    }

    /// The service of drive `index` (in the description's order).
    fn drive_service(&self, index: usize) -> Option<&service::ServiceRef> {
        let id = self.registry.iter().find(|(d, _)| d.kind == DeviceKind::Block && d.index == index)?.0.id;
        self.registry.get(id).map(|(_, s)| s)
    }

    /// `PATCH /drives/{id}` on drive `index`: a new rate limiter applies at once; a new image
    /// (`file`, opened by the caller) replaces the service instance, so the guest sees the new
    /// medium.
    pub fn patch_drive(
        &self,
        index: usize,
        update: &DriveUpdate,
        image: Option<crate::image::Image>,
    ) -> Result<(), LaunchError> {
        let svc = self.drive_service(index).ok_or(ConfigError::Invalid(format!("no drive {index}")))?;
        if let Some(r) = &update.rate_limiter {
            let limit = r.to_rate_limit()?;
            svc.set_rate_limit(RateLimitUpdate::Block(limit), Duration::from_secs(2))?;
            log::info!("drive {}: rate limit now {limit:?}", update.drive_id);
        }
        if let Some(image) = image {
            svc.replace_disk(image)?;
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{id}` on interface `index`: new rate limiters apply at once
    /// (a direction not given keeps its limiter; `old` holds the current ones).
    pub fn patch_net(
        &self,
        index: usize,
        update: &NetworkInterfaceUpdate,
        old: &NetworkInterface,
    ) -> Result<(), LaunchError> {
        let id = self
            .registry
            .iter()
            .find(|(d, _)| d.kind == DeviceKind::Net && d.index == index)
            .map(|(d, _)| d.id)
            .ok_or(ConfigError::Invalid(format!("no network interface {index}")))?;
        let (_, svc) = self.registry.get(id).ok_or(ConfigError::Invalid(format!("no network interface {index}")))?;
        let rx = update.rx_rate_limiter.or(old.rx_rate_limiter).map(|r| r.to_rate_limit()).transpose()?;
        let tx = update.tx_rate_limiter.or(old.tx_rate_limiter).map(|r| r.to_rate_limit()).transpose()?;
        let (rx, tx) = (rx.unwrap_or_default(), tx.unwrap_or_default());
        svc.set_rate_limit(RateLimitUpdate::Net { rx, tx }, Duration::from_secs(2))?;
        log::info!("interface {}: rate limits now rx {rx:?}, tx {tx:?}", update.iface_id);
        Ok(())
    }

    /// Sends every injection that is due to its service, and forgets it.
    fn inject_due(&mut self) {
        let elapsed = self.started.elapsed();
        let registry = &self.registry;
        self.injections.retain(|inj| {
            if inj.delay > elapsed {
                return true;
            }
            match registry.get(inj.device) {
                Some((dev, svc)) => {
                    log::warn!(
                        "fault injection: telling service {} (pid {}) to attempt {:?}",
                        dev.service,
                        svc.pid(),
                        inj.action
                    );
                    if let Err(e) = svc.attempt_forbidden(inj.action) {
                        log::warn!("fault injection to service {} failed: {e}", dev.service);
                    }
                }
                None => log::warn!("fault injection: no device {} to send {:?} to", inj.device, inj.action),
            }
            false
        });
    }

    /// Stops everything: the vCPUs, the fault schedules, then each service (logging its
    /// metrics), and releases the VM. Returns `reason`.
    pub fn shut_down(mut self, reason: StopReason) -> StopReason {
        self.stop.stop(reason.clone());
        drop(std::mem::replace(&mut self.terminal, RawTerminal(None)));
        let stuck = self.vcpus.exit(Duration::from_secs(2));
        if stuck > 0 {
            log::error!("{stuck} vCPU thread(s) did not stop within 2 s");
        }
        drop(self.faults.take());
        for mut service in std::mem::take(&mut self.services) {
            // Refreshes the current instance's counters (its redone requests) for the metrics line;
            // a dead or hung instance just leaves the last known ones.
            let own = service.stats(Duration::from_millis(200)).ok();
            let stats = service.device().stats();
            // From the service's cgroup if it has one (every instance); else the instance's own
            // figure, which a core in its own PID namespace cannot read (its pid is the host's).
            let cpu = match &self.cgroup {
                Some(cg) => cg.cpu_ns(Some(service.name())),
                None if crate::pidns::in_own_pid_namespace() => None,
                None => service_cpu_ns(service.pid()),
            }
            .map_or_else(|| "n/a".to_string(), |ns| format!("{:.1} ms", ns as f64 / 1e6));
            // The current instance's idle spin (the time it waited for requests on a CPU).
            let spin = own.map_or_else(|| "n/a".to_string(), |s| format!("{:.1} ms", s.idle_spin_ns as f64 / 1e6));
            log::info!(
                "service {} (pid {}): {} exits forwarded, {} reads mirrored, {} writes posted, {} rejected, {} failures, \
                 cpu {cpu}, idle spin {spin}",
                service.name(),
                service.pid(),
                stats.forwarded,
                stats.mirrored,
                stats.posted,
                stats.rejected,
                stats.failures
            );
            log::info!("{}", crate::faults::format_metrics(&service.metrics()));
            service.shutdown(Duration::from_secs(2));
        }
        log::info!("guest stopped: {reason}");
        log::info!("port 0x80 accesses: {}", self.post.accesses());
        reason
    }
}
