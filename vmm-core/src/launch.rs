//! `bulkhead run`: puts the pieces together. Guest RAM, the VM, the kernel, the device services
//! and their bus entries, the vCPU threads, then waits for a stop and tears everything down.
//!
//! Every step that can fail on user input (kernel path, memory size, command line, a missing
//! service binary) fails before any vCPU runs, with one error naming the problem; services already
//! started are shut down by their handles' `Drop`, and die with the core anyway (PDEATHSIG).

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpu, mptable};
use crate::boot;
use crate::bus::{BusDevice, BusError};
use crate::cli::{DiskSpec, InjectSpec, InjectTarget, NetSpec, RunArgs};
use crate::control::{StopHandle, StopReason};
use crate::devices::{
    DebugExit, PostCode, DEBUG_EXIT_PORT, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, POST_CODE_PORT,
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
    #[error("cannot use disk image {path}")]
    Disk {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A TAP device cannot be opened.
    #[error("cannot open TAP device for --net tap={name}")]
    Tap {
        /// The interface name given.
        name: String,
        /// Cause.
        #[source]
        source: crate::tap::TapError,
    },
    /// Two `--net` name the same TAP.
    #[error("TAP {0} is given to two --net devices")]
    DuplicateTap(String),
    /// The virtio-mmio address map.
    #[error(transparent)]
    Mmio(#[from] crate::mmio::MmioError),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {path}")]
    SerialOutput {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The API socket or the fault schedule could not start.
    #[error("fault injection")]
    Api(#[source] Box<crate::faults::FaultError>),
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

/// Where service binaries are looked up.
pub fn service_dir(args: &RunArgs) -> PathBuf {
    args.service_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    })
}

fn service_binary(dir: &Path, name: &str) -> Result<PathBuf, LaunchError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(LaunchError::MissingService(p))
    }
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

fn serial_fds(args: &RunArgs) -> Result<(OwnedFd, Option<OwnedFd>), LaunchError> {
    let output: OwnedFd = if args.serial_output == "stdout" {
        std::io::stdout().lock().as_fd_owned().map_err(os("dup(stdout)"))?
    } else {
        let path = PathBuf::from(&args.serial_output);
        OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| LaunchError::SerialOutput { path, source })?
            .into()
    };
    let input = if args.serial_input == "stdin" {
        Some(std::io::stdin().as_fd_owned().map_err(os("dup(stdin)"))?)
    } else {
        None
    };
    Ok((output, input))
}

trait DupOwned {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd>;
}

impl<T: std::os::fd::AsFd> DupOwned for T {
    fn as_fd_owned(&self) -> std::io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}

fn register_in_core_devices(buses: &mut Buses, stop: &StopHandle) -> Result<Arc<PostCode>, LaunchError> {
    buses.pio.insert(DEBUG_EXIT_PORT, 1, Arc::new(DebugExit::new(stop.clone())))?;
    let i8042: Arc<dyn BusDevice> = Arc::new(I8042::new(stop.clone()));
    buses.pio.insert(I8042_DATA_PORT, 1, i8042.clone())?;
    buses.pio.insert(I8042_COMMAND_PORT, 1, i8042)?;
    let post = Arc::new(PostCode::default());
    buses.pio.insert(POST_CODE_PORT, 1, post.clone())?;
    Ok(post)
}

/// One `--disk`, opened and placed in the guest's address map, before its service starts.
struct PlannedDisk {
    spec: DiskSpec,
    file: File,
    slot: MmioSlot,
}

/// Opens every disk image (read-only ones read-only) and gives each a virtio-mmio slot.
fn plan_disks(args: &RunArgs, mmio: &mut MmioAllocator) -> Result<Vec<PlannedDisk>, LaunchError> {
    let mut planned = Vec::new();
    for spec in &args.disks {
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.path)
            .map_err(|source| LaunchError::Disk { path: spec.path.clone(), source })?;
        let meta = file.metadata().map_err(|source| LaunchError::Disk { path: spec.path.clone(), source })?;
        if !meta.is_file() || meta.len() < 512 {
            return Err(LaunchError::Disk {
                path: spec.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file of at least one 512-byte sector",
                ),
            });
        }
        planned.push(PlannedDisk { spec: spec.clone(), file, slot: mmio.allocate()? });
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

fn start_disk(
    args: &RunArgs,
    vm: &VmFd,
    ram: &GuestRam,
    buses: &mut Buses,
    index: usize,
    disk: PlannedDisk,
) -> Result<service::ServiceHandle, LaunchError> {
    let binary = service_binary(&service_dir(args), "bulkhead-block")?;
    let PlannedDisk { spec, file, slot } = disk;
    let (irq, queue_notify) = wire_slot(vm, &slot, BLOCK_QUEUES)?;
    let spec = service::BlockSpec {
        id: spec.id.clone().unwrap_or_else(|| format!("disk{index}")),
        disk: file,
        read_only: spec.read_only,
        mmio_base: slot.base,
        mmio_len: slot.len,
        gsi: slot.gsi,
        memfd: ram.memfd().try_clone_to_owned().map_err(os("dup of the guest memory memfd"))?,
        memory: ram_ranges(ram.size()),
        queue_notify,
        irq,
        queue_size: BLOCK_QUEUE_SIZE,
        rate_limit: spec.rate_limit,
    };
    let (device, handle) = service::spawn_block(&binary, spec, service_options(args))?;
    buses.mmio.insert(slot.base, slot.len, device)?;
    log::info!(
        "disk{index}: {}{} at {:#x} (GSI {}) served by pid {}",
        args.disks[index].path.display(),
        if args.disks[index].read_only { " (read-only)" } else { "" },
        slot.base,
        slot.gsi,
        handle.pid()
    );
    Ok(handle)
}

/// One `--net`, its TAP opened and placed in the guest's address map, before its service starts.
struct PlannedNet {
    spec: NetSpec,
    tap: crate::tap::Tap,
    slot: MmioSlot,
}

/// Opens (or creates) every `--net` TAP and gives each a virtio-mmio slot.
fn plan_nets(args: &RunArgs, mmio: &mut MmioAllocator) -> Result<Vec<PlannedNet>, LaunchError> {
    // Every check before any TAP is opened (opening may create one).
    for (i, spec) in args.nets.iter().enumerate() {
        if args.nets[..i].iter().any(|p| p.tap == spec.tap) {
            return Err(LaunchError::DuplicateTap(spec.tap.clone()));
        }
    }
    let mut planned = Vec::new();
    for spec in &args.nets {
        let tap =
            crate::tap::open_tap(&spec.tap, 0).map_err(|source| LaunchError::Tap { name: spec.tap.clone(), source })?;
        planned.push(PlannedNet { spec: spec.clone(), tap, slot: mmio.allocate()? });
    }
    Ok(planned)
}

/// The MAC a `--net` without `mac=` gets: locally administered, unicast, made from the core's
/// pid and the device's index, so two VMs on one bridge differ.
fn default_mac(index: usize) -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [0x02, 0xb4, pid[1], pid[2], pid[3], u8::try_from(index & 0xff).unwrap_or(0)]
}

fn start_net(
    args: &RunArgs,
    vm: &VmFd,
    ram: &GuestRam,
    buses: &mut Buses,
    index: usize,
    net: PlannedNet,
) -> Result<service::ServiceHandle, LaunchError> {
    let binary = service_binary(&service_dir(args), "bulkhead-net")?;
    let PlannedNet { spec, tap, slot } = net;
    // RX (0) and TX (1).
    let (irq, mut kicks) = wire_slot(vm, &slot, 2)?;
    let tx_notify = kicks.pop();
    let (Some(rx_notify), Some(tx_notify)) = (kicks.pop(), tx_notify) else {
        unreachable!("wire_slot returns one eventfd per queue")
    };
    let mac = spec.mac.unwrap_or_else(|| default_mac(index));
    let crate::tap::Tap { fd, name: tap_name } = tap;
    let net_spec = service::NetSpec {
        id: spec.id.clone().unwrap_or_else(|| format!("net{index}")),
        tap: fd,
        tap_name: tap_name.clone(),
        mac,
        mmio_base: slot.base,
        mmio_len: slot.len,
        gsi: slot.gsi,
        memfd: ram.memfd().try_clone_to_owned().map_err(os("dup of the guest memory memfd"))?,
        memory: ram_ranges(ram.size()),
        rx_notify,
        tx_notify,
        irq,
        queue_size: NET_QUEUE_SIZE,
        rate_limit: spec.rate_limit,
    };
    let (device, handle) = service::spawn_net(&binary, net_spec, service_options(args))?;
    buses.mmio.insert(slot.base, slot.len, device)?;
    log::info!(
        "net{index}: TAP {tap_name}, MAC {} at {:#x} (GSI {}) served by pid {}",
        ipc::control::mac_string(&mac),
        slot.base,
        slot.gsi,
        handle.pid()
    );
    Ok(handle)
}

fn start_console(args: &RunArgs, vm: &VmFd, buses: &mut Buses) -> Result<service::ServiceHandle, LaunchError> {
    let binary = service_binary(&service_dir(args), "bulkhead-console")?;
    let (output, input) = serial_fds(args)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?;
    vm.register_irqfd(&irq, COM1_GSI).map_err(|source| LaunchError::Kvm { what: "KVM_IRQFD", source })?;
    let (device, handle) = service::spawn_console(&binary, output, input, irq, COM1_BASE, service_options(args))?;
    buses.pio.insert(u64::from(COM1_BASE), COM1_LEN, device)?;
    Ok(handle)
}

/// Service tuning from the command line: the per-exit deadline, the liveness check and the
/// restart policy.
fn service_options(args: &RunArgs) -> service::ServiceOptions {
    service::ServiceOptions {
        call_timeout: Duration::from_millis(args.service_deadline_ms),
        liveness_interval: Duration::from_millis(args.service_liveness_ms),
        restart: service::RestartPolicy {
            burst: args.restart_burst.max,
            burst_window: args.restart_burst.window,
            ..service::RestartPolicy::with_cap(args.restart_max.max, args.restart_max.window)
        },
        ..service::ServiceOptions::default()
    }
}

/// Time until the earliest pending injection is due (zero if one is overdue).
fn next_injection(pending: &[InjectSpec], started: std::time::Instant) -> Option<Duration> {
    pending.iter().map(|i| i.delay.saturating_sub(started.elapsed())).min()
}

/// Sends every `--inject-forbidden` that is due to its service, and forgets it.
fn inject_due(
    pending: &mut Vec<InjectSpec>,
    started: std::time::Instant,
    services: &[service::ServiceHandle],
    disks: usize,
) {
    let elapsed = started.elapsed();
    pending.retain(|inj| {
        if inj.delay > elapsed {
            return true;
        }
        // services[0] is the console, then one block service per --disk in order, then one net
        // service per --net.
        let index = match inj.target {
            InjectTarget::Console => Some(0),
            InjectTarget::Disk(n) if n < disks => n.checked_add(1),
            InjectTarget::Net(n) => n.checked_add(1).and_then(|i| i.checked_add(disks)),
            InjectTarget::Disk(_) => None,
        };
        match index.and_then(|i| services.get(i)) {
            Some(svc) => {
                log::warn!(
                    "fault injection: telling service {} (pid {}) to attempt {:?}",
                    svc.name(),
                    svc.pid(),
                    inj.action
                );
                if let Err(e) = svc.attempt_forbidden(inj.action) {
                    log::warn!("fault injection to service {} failed: {e}", svc.name());
                }
            }
            None => log::warn!("fault injection: no service {:?} to send {:?} to", inj.target, inj.action),
        }
        false
    });
}

/// Runs a VM per `args` until it stops. Returns why it stopped.
pub fn run(args: &RunArgs) -> Result<StopReason, LaunchError> {
    // Cheap checks on user input first, so nothing is created when they fail.
    std::fs::File::open(&args.kernel)
        .map_err(|source| boot::BootError::OpenKernel { path: args.kernel.clone(), source })?;
    service_binary(&service_dir(args), "bulkhead-console")?;
    if !args.disks.is_empty() {
        service_binary(&service_dir(args), "bulkhead-block")?;
    }
    if !args.nets.is_empty() {
        service_binary(&service_dir(args), "bulkhead-net")?;
    }
    // Which namespaces services get: refuses to go on if one is unavailable, unless the user
    // passed --insecure-no-sandbox (then warns loudly). Probed before guest RAM exists.
    service::init_sandbox(args.insecure_no_sandbox).map_err(service::ServiceError::Sandbox)?;
    let mut mmio = MmioAllocator::default();
    let disks = plan_disks(args, &mut mmio)?;
    let nets = plan_nets(args, &mut mmio)?;

    let host = HostKvm::detect();
    let mut extra = host.extra_kernel_params(&args.cmdline);
    extra.extend(disks.iter().map(|d| d.slot.cmdline_word()));
    extra.extend(nets.iter().map(|n| n.slot.cmdline_word()));
    let cmdline = boot::build_cmdline(&args.cmdline, &extra)?;
    if host == HostKvm::Pvm {
        log::info!(
            "host KVM is PVM (no VMX/SVM): guest runs under shadow paging; added kernel parameters: {}",
            if extra.is_empty() { "(none needed, already present)".to_string() } else { extra.join(" ") }
        );
    }

    let ram = GuestRam::new(args.mem)?;
    let kvm = vm::open_kvm()?;
    let vm = vm::create_vm(&kvm, &ram)?;
    let kernel = boot::load_kernel(ram.memory(), &args.kernel)?;
    let initrd = match &args.initrd {
        Some(p) => Some(boot::load_initrd(&ram, p, kernel.end)?),
        None => None,
    };
    boot::write_boot_params(&ram, &kernel, &cmdline, initrd)?;
    mptable::setup(ram.memory(), args.vcpus)?;
    cpu::write_boot_tables(ram.memory())?;
    log::info!(
        "guest: {} MiB, {} vCPU(s), kernel {} entry {:#x}, cmdline \"{}\"",
        args.mem,
        args.vcpus,
        args.kernel.display(),
        kernel.entry,
        cmdline.as_cstring().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    );

    let (stop, stopped) = StopHandle::new();
    let mut buses = Buses::default();
    let post = register_in_core_devices(&mut buses, &stop)?;
    let console = start_console(args, &vm, &mut buses)?;
    let mut services = vec![console];
    for (i, disk) in disks.into_iter().enumerate() {
        services.push(start_disk(args, &vm, &ram, &mut buses, i, disk)?);
    }
    for (i, net) in nets.into_iter().enumerate() {
        services.push(start_net(args, &vm, &ram, &mut buses, i, net)?);
    }

    // Fault schedules and the API socket run on their own threads, created before the main
    // thread's seccomp filter (they kill, signal and accept connections).
    let refs: Vec<service::ServiceRef> = services.iter().map(service::ServiceHandle::remote).collect();
    let api_path = args.api_sock.clone().or_else(|| args.name.as_deref().map(crate::faults::socket_for));
    let api = match &api_path {
        Some(p) => Some(crate::faults::ApiServer::start(p, refs.clone()).map_err(|e| LaunchError::Api(Box::new(e)))?),
        None => None,
    };
    let faults_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fault_thread = crate::faults::start_schedules(args.faults.clone(), refs.clone(), faults_stop.clone())
        .map_err(|e| LaunchError::Api(Box::new(e)))?;

    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| LaunchError::Kvm { what: "KVM_GET_SUPPORTED_CPUID", source })?;
    let mut vcpus = Vec::new();
    for i in 0..args.vcpus {
        let fd = vm.create_vcpu(u64::from(i)).map_err(|source| LaunchError::Kvm { what: "KVM_CREATE_VCPU", source })?;
        cpu::configure_vcpu(&fd, cpuid.clone(), i, args.vcpus, kernel.entry)?;
        vcpus.push(fd);
    }

    vcpu::install_kick_handler()
        .map_err(|e| LaunchError::Os { what: "installing the vCPU kick handler", source: e.into() })?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| LaunchError::Os { what: "installing signal handlers", source: e.into() })?;
    }
    let terminal = if args.serial_input == "stdin" { RawTerminal::enter() } else { RawTerminal(None) };

    let buses = Arc::new(buses);
    let mut threads = Vec::new();
    for (i, fd) in vcpus.into_iter().enumerate() {
        let (b, s) = (buses.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu::run(i, fd, b, s))
            .map_err(os("spawning a vCPU thread"))?;
        threads.push(t);
    }

    // From here on the main thread only waits for a stop, sends control messages, kicks vCPUs and
    // reads metrics, so it gets the narrow `core-main` filter. It is installed after the vCPU
    // threads exist (a thread inherits its creator's filter, and theirs need KVM_RUN); the
    // services' supervisor threads were created during set-up and stay unfiltered, because
    // processes they start would inherit a filter too (docs/SECURITY.md).
    if let Err(e) = bulkhead_policies::install(bulkhead_policies::Policy::CoreMain) {
        stop.stop(StopReason::InternalError(format!("cannot install the main thread's seccomp filter: {e}")));
    }
    let started = std::time::Instant::now();
    let mut injections = args.inject_forbidden.clone();
    let reason = loop {
        let tick = next_injection(&injections, started)
            .map_or(Duration::from_millis(50), |d| d.min(Duration::from_millis(50)));
        match stopped.recv_timeout(tick) {
            Ok(r) => break r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                inject_due(&mut injections, started, &services, args.disks.len());
                let sig = SIGNALLED.load(Ordering::SeqCst);
                if sig != 0 {
                    stop.stop(StopReason::Signal(sig));
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                break StopReason::InternalError("every vCPU thread is gone".into())
            }
        }
    };
    drop(terminal);
    faults_stop.store(true, Ordering::SeqCst);
    if let Some(t) = fault_thread {
        let _ = t.join();
    }
    let stuck = vcpu::kick_and_join(threads, 200);
    if stuck > 0 {
        log::error!("{stuck} vCPU thread(s) did not stop within 2 s");
    }
    for mut service in services {
        // Refreshes the current instance's counters (its redone requests) for the metrics line;
        // a dead or hung instance just leaves the last known ones.
        let _ = service.stats(Duration::from_millis(200));
        let stats = service.device().stats();
        let cpu =
            service_cpu_ns(service.pid()).map_or_else(|| "n/a".to_string(), |ns| format!("{:.1} ms", ns as f64 / 1e6));
        log::info!(
            "service {} (pid {}): {} exits forwarded, {} rejected, {} failures, cpu {cpu}",
            service.name(),
            service.pid(),
            stats.forwarded,
            stats.rejected,
            stats.failures
        );
        log::info!("{}", crate::faults::format_metrics(&service.metrics()));
        service.shutdown(Duration::from_secs(2));
    }
    drop(api);
    log::info!("guest stopped: {reason}");
    log::info!("port 0x80 accesses: {}", post.accesses());
    drop(vm);
    drop(ram);
    Ok(reason)
}
