//! The VMM: one VM's life, `NotStarted → Running ⇄ Paused → Stopped`, owned by one thread (the
//! process's main thread) that applies [`VmmAction`]s in the order they arrive: from the API
//! (`crate::api`), from a configuration file, from the command line. Which action is allowed in
//! which state is a pure function ([`check`]); the VM itself is a [`RunningVm`] built from the
//! [`VmConfig`] at `InstanceStart`.
//!
//! Readers (the API's `GET`s, `bulkhead ls`) never wait for this thread: it publishes a
//! [`VmmView`] after every action, and the devices' counters are read live from the registry.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

use crate::config::{
    BootSource, ConfigError, DriveConfig, DriveUpdate, LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig,
    NetworkInterface, NetworkInterfaceUpdate, VmConfig,
};
use crate::control::StopReason;
use crate::launch::{DeviceRegistry, LaunchError, RunningVm};

/// What the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Being configured; `InstanceStart` builds and starts it.
    NotStarted,
    /// The vCPUs run.
    Running,
    /// The vCPUs and the services are paused.
    Paused,
    /// The guest stopped (or was stopped); the VMM is ending.
    Stopped,
}

impl VmState {
    /// The name Firecracker's `GET /` uses.
    pub fn api_name(self) -> &'static str {
        match self {
            Self::NotStarted => "Not started",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Stopped => "Stopped",
        }
    }
}

/// Something asked of the VMM.
#[derive(Debug)]
pub enum VmmAction {
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`, with the new image already opened by the API thread.
    PatchDrive(DriveUpdate, Option<crate::image::Image>),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// `PUT /logger`, with the log file already opened.
    PutLogger(LoggerConfig, Option<File>),
    /// `PUT /metrics`, with the metrics file already opened.
    PutMetrics(MetricsConfig, File),
    /// `PUT /actions` `InstanceStart`.
    InstanceStart,
    /// `PUT /actions` `SendCtrlAltDel`.
    SendCtrlAltDel,
    /// `PUT /actions` `FlushMetrics`.
    FlushMetrics,
    /// `PATCH /vm` `Paused`.
    Pause,
    /// `PATCH /vm` `Resumed`.
    Resume,
    /// `bulkhead stop`: Ctrl-Alt-Del, then a hard stop after `grace`.
    Stop {
        /// How long the guest gets to stop itself.
        grace: Duration,
    },
    /// `bulkhead kill`: stop now.
    Kill,
    /// `PATCH /bulkhead/resources` before the start: the VM's cgroup settings (a running VM's
    /// are changed live by the API thread).
    PatchResources(crate::cgroup::Resources),
    /// `GET /bulkhead/vcpus`: every vCPU's state, sent on the channel given.
    InspectVcpus(Sender<crate::vcpu_state::CpuReport>),
}

impl VmmAction {
    /// Whether the action changes the VM's description (allowed only before the start).
    fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::PutBootSource(_)
                | Self::PutMachineConfig(_)
                | Self::PatchMachineConfig(_)
                | Self::PutDrive(_)
                | Self::PutNetworkInterface(_)
                | Self::PutLogger(..)
                | Self::PutMetrics(..)
                | Self::PatchResources(_)
        )
    }
}

/// Why an action was refused or failed; the API answers 400 with this as `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// Not in this state.
    #[error("The requested operation is not supported {0}.")]
    WrongState(&'static str),
    /// A bad description.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building or starting the VM failed.
    #[error("Start microvm error: {0}")]
    Start(String),
    /// Something the running VM could not do.
    #[error("{0}")]
    Failed(String),
    /// A device the VM does not have.
    #[error("no device `{device}` (have: {have})")]
    NoDevice {
        /// The name given.
        device: String,
        /// The names there are.
        have: String,
    },
}

/// Whether `action` may run in `state`: a pure function of the two, unit-tested.
pub fn check(state: VmState, action: &VmmAction) -> Result<(), ActionError> {
    use VmState::*;
    match (state, action) {
        (Stopped, _) => Err(ActionError::WrongState("after the microVM stopped")),
        (Running | Paused, a) if a.is_configuration() => Err(ActionError::WrongState("after starting the microVM")),
        (Running | Paused, VmmAction::InstanceStart) => Err(ActionError::WrongState("after starting the microVM")),
        (NotStarted, VmmAction::Stop { .. } | VmmAction::Kill) => Ok(()),
        (
            NotStarted,
            VmmAction::Pause
            | VmmAction::Resume
            | VmmAction::SendCtrlAltDel
            | VmmAction::FlushMetrics
            | VmmAction::PatchDrive(..)
            | VmmAction::PatchNetworkInterface(_),
        ) => Err(ActionError::WrongState("before starting the microVM")),
        (Paused, VmmAction::SendCtrlAltDel) => Err(ActionError::WrongState("while the microVM is paused")),
        _ => Ok(()),
    }
}

/// What readers see of the VMM, published after every action.
#[derive(Debug, Clone)]
pub struct VmmView {
    /// The VM's id (`--id`).
    pub id: String,
    /// Its state.
    pub state: VmState,
    /// Its description.
    pub config: VmConfig,
    /// Its devices, once started.
    pub devices: Option<DeviceRegistry>,
    /// When it started (wall clock and monotonic).
    pub started: Option<(SystemTime, Instant)>,
    /// The core's pid.
    pub pid: u32,
    /// Each vCPU's exit counter, once started.
    pub vcpu_exits: Vec<Arc<std::sync::atomic::AtomicU64>>,
    /// Why Bulkhead paused the VM itself (a disk's error policy), while it stays paused.
    pub paused_by: Option<String>,
    /// The running VM's cgroup, if it has one.
    pub cgroup: Option<Arc<crate::cgroup::KeptCgroup>>,
}

/// The shared, read-mostly view.
pub type SharedView = Arc<RwLock<VmmView>>;

/// One action and where its answer goes.
#[derive(Debug)]
pub struct ApiCall {
    /// The action.
    pub action: VmmAction,
    /// The answer.
    pub reply: Sender<Result<(), ActionError>>,
}

/// How often an idle VMM looks at signals and a disk's request held by its error policy. Its
/// deadlines (an injection, the stop deadline, the metrics timer) wake it when they are due:
/// [`Vmm::next_tick`]. A wake-up costs the idle VM's core ~90 µs of CPU here: at 50 ms it was
/// two thirds of everything an idle VM spent.
const TICK: Duration = Duration::from_millis(250);
/// How often metrics are written to the metrics file while the VM runs (Firecracker: 60 s).
const METRICS_PERIOD: Duration = Duration::from_secs(60);
/// Longest wait for every vCPU and service to acknowledge a pause or a resume.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// The VMM: the description, the running VM once started, and the outputs configured for it.
pub struct Vmm {
    config: VmConfig,
    state: VmState,
    vm: Option<RunningVm>,
    view: SharedView,
    metrics: Option<File>,
    metrics_due: Instant,
    stop_deadline: Option<Instant>,
    /// A termination signal that came before the VM started.
    signalled: Option<i32>,
    /// The logger's output was set (`PUT /logger`).
    logger_opened: bool,
    /// Why Bulkhead paused the VM itself, while it stays paused.
    paused_by: Option<String>,
}

impl Vmm {
    /// A VMM for the VM `config` describes (not started), known as `id`.
    pub fn new(id: &str, config: VmConfig) -> Self {
        let view = Arc::new(RwLock::new(VmmView {
            id: id.to_string(),
            state: VmState::NotStarted,
            config: config.clone(),
            devices: None,
            started: None,
            pid: crate::pidns::host_pid(),
            vcpu_exits: Vec::new(),
            paused_by: None,
            cgroup: None,
        }));
        Self {
            config,
            state: VmState::NotStarted,
            vm: None,
            view,
            metrics: None,
            metrics_due: Instant::now(),
            stop_deadline: None,
            signalled: None,
            logger_opened: false,
            paused_by: None,
        }
    }

    /// The view readers share.
    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    /// The state.
    pub fn state(&self) -> VmState {
        self.state
    }

    fn publish(&self) {
        let mut v = self.view.write().unwrap_or_else(|e| e.into_inner());
        v.state = self.state;
        v.config = self.config.clone();
        v.devices = self.vm.as_ref().map(|vm| vm.registry().clone());
        v.vcpu_exits = self.vm.as_ref().map(RunningVm::vcpu_exits).unwrap_or_default();
        v.paused_by = self.paused_by.clone();
        v.cgroup = self.vm.as_ref().and_then(|vm| vm.cgroup().cloned());
        if v.started.is_none() && self.vm.is_some() {
            v.started = Some((SystemTime::now(), Instant::now()));
        }
    }

    /// Applies one action (checked against the state first; nothing changes when it fails).
    pub fn handle(&mut self, action: VmmAction) -> Result<(), ActionError> {
        check(self.state, &action)?;
        let result = self.apply(action);
        self.publish();
        result
    }

    fn apply(&mut self, action: VmmAction) -> Result<(), ActionError> {
        match action {
            VmmAction::PutBootSource(b) => {
                std::fs::File::open(&b.kernel_image_path).map_err(|e| {
                    ActionError::Failed(format!("Boot source error: The kernel file cannot be opened: {e}"))
                })?;
                if let Some(initrd) = &b.initrd_path {
                    std::fs::File::open(initrd).map_err(|e| {
                        ActionError::Failed(format!("Boot source error: The initrd file cannot be opened: {e}"))
                    })?;
                }
                let args = b.boot_args().len();
                if args > crate::config::MAX_CMDLINE {
                    return Err(ConfigError::CmdlineTooLong(args).into());
                }
                self.config.boot_source = Some(b);
            }
            VmmAction::PutMachineConfig(m) => {
                m.validate()?;
                self.config.machine_config = m;
            }
            VmmAction::PatchMachineConfig(u) => {
                let m = self.config.machine_config.updated(&u);
                m.validate()?;
                self.config.machine_config = m;
            }
            VmmAction::PatchResources(r) => {
                let next = self.config.bulkhead.cgroup.resources.merged(&r);
                next.validate(self.config.machine_config.mem_size_mib.saturating_mul(1 << 20))
                    .map_err(|e| ActionError::Failed(e.to_string()))?;
                self.config.bulkhead.cgroup.resources = next;
            }
            VmmAction::PutDrive(d) => self.config.put_drive(d)?,
            VmmAction::PutNetworkInterface(n) => self.config.put_network_interface(n)?,
            VmmAction::PutLogger(cfg, file) => {
                self.logger_opened = true;
                if let Some(level) = cfg.level {
                    log::set_max_level(level.filter());
                }
                if let Some(f) = file {
                    crate::logger::redirect(f);
                }
                self.config.logger = Some(cfg);
            }
            VmmAction::PutMetrics(cfg, file) => {
                self.metrics = Some(file);
                self.config.metrics = Some(cfg);
            }
            VmmAction::InstanceStart => self.start()?,
            VmmAction::InspectVcpus(out) => {
                let reports = self.running()?.cpu_report(PAUSE_LIMIT).map_err(|e| ActionError::Failed(chain(&e)))?;
                let _ = out.send(reports);
            }
            VmmAction::Pause => {
                if self.state == VmState::Running {
                    self.running()?.pause(PAUSE_LIMIT).map_err(|e| ActionError::Failed(chain(&e)))?;
                    self.state = VmState::Paused;
                    log::info!("VM paused");
                }
            }
            VmmAction::Resume => {
                if self.state == VmState::Paused {
                    let vm = self.running()?;
                    // A hold reported while the VM was paused already is retried by this resume:
                    // it must not pause the VM again on the next tick.
                    if let Some(stale) = vm.take_io_stop() {
                        log::info!("resuming: {stale} (held request retried)");
                    }
                    vm.resume(PAUSE_LIMIT).map_err(|e| ActionError::Failed(chain(&e)))?;
                    self.state = VmState::Running;
                    self.paused_by = None;
                    log::info!("VM resumed");
                }
            }
            VmmAction::SendCtrlAltDel => {
                if !self.running()?.ctrl_alt_del() {
                    return Err(ActionError::Failed(
                        "the guest has not read its keyboard: Ctrl-Alt-Del not sent".into(),
                    ));
                }
                log::info!("sent Ctrl-Alt-Del to the guest");
            }
            VmmAction::FlushMetrics => self.flush_metrics()?,
            VmmAction::Stop { grace } => match self.state {
                VmState::NotStarted => self.state = VmState::Stopped,
                _ => {
                    if self.state == VmState::Paused {
                        self.running()?.resume(PAUSE_LIMIT).map_err(|e| ActionError::Failed(chain(&e)))?;
                        self.state = VmState::Running;
                    }
                    let sent = self.running()?.ctrl_alt_del();
                    log::info!(
                        "stop requested: {}; stopping it in {grace:?} if it has not",
                        if sent { "sent Ctrl-Alt-Del to the guest" } else { "the guest's keyboard is full" }
                    );
                    self.stop_deadline = Some(Instant::now() + grace);
                }
            },
            VmmAction::Kill => match &self.vm {
                Some(vm) => vm.stop(StopReason::Requested("killed on request".into())),
                None => self.state = VmState::Stopped,
            },
            VmmAction::PatchDrive(update, file) => {
                let vm = self.running()?;
                let index = self.config.drives.iter().position(|d| d.drive_id == update.drive_id).ok_or_else(|| {
                    ActionError::NoDevice { device: update.drive_id.clone(), have: vm.registry().names() }
                })?;
                vm.patch_drive(index, &update, file).map_err(|e| ActionError::Failed(chain(&e)))?;
                let d = &mut self.config.drives[index];
                if let Some(p) = update.path_on_host {
                    d.path_on_host = Some(p);
                }
                if let Some(r) = update.rate_limiter {
                    d.rate_limiter = Some(r);
                }
            }
            VmmAction::PatchNetworkInterface(update) => {
                let vm = self.running()?;
                let index =
                    self.config.network_interfaces.iter().position(|n| n.iface_id == update.iface_id).ok_or_else(
                        || ActionError::NoDevice { device: update.iface_id.clone(), have: vm.registry().names() },
                    )?;
                vm.patch_net(index, &update, &self.config.network_interfaces[index])
                    .map_err(|e| ActionError::Failed(chain(&e)))?;
                let n = &mut self.config.network_interfaces[index];
                if update.rx_rate_limiter.is_some() {
                    n.rx_rate_limiter = update.rx_rate_limiter;
                }
                if update.tx_rate_limiter.is_some() {
                    n.tx_rate_limiter = update.tx_rate_limiter;
                }
            }
        }
        Ok(())
    }

    fn running(&self) -> Result<&RunningVm, ActionError> {
        self.vm.as_ref().ok_or(ActionError::WrongState("before starting the microVM"))
    }

    fn start(&mut self) -> Result<(), ActionError> {
        if self.config.boot_source.is_none() {
            return Err(ActionError::Start("Cannot start microvm without kernel configuration.".into()));
        }
        // A configuration file names its log and metrics outputs without a PUT: open them now,
        // before this thread's system calls are narrowed.
        if self.metrics.is_none() {
            if let Some(m) = &self.config.metrics {
                let f = open_output(&m.metrics_path).map_err(|e| ActionError::Start(format!("Metrics error: {e}")))?;
                self.metrics = Some(f);
            }
        }
        if !self.logger_opened {
            if let Some(l) = self.config.logger.clone() {
                let file = l.log_path.as_deref().map(open_output).transpose();
                let file = file.map_err(|e| ActionError::Start(format!("Logger error: {e}")))?;
                self.apply(VmmAction::PutLogger(l, file))?;
            }
        }
        let id = self.view.read().unwrap_or_else(|e| e.into_inner()).id.clone();
        let vm = crate::launch::build(&id, &self.config).map_err(|e| match e {
            LaunchError::Config(c) => ActionError::Config(c),
            other => ActionError::Start(chain(&other)),
        })?;
        // From here on this thread only applies actions to the running VM: waits, control
        // messages, kicks, metrics. It gets the narrow `core-main` filter, installed after the
        // vCPU threads exist (a thread inherits its creator's filter, and theirs need KVM_RUN);
        // the supervisor, fault and API threads confined themselves when they started
        // (docs/SECURITY.md). What needs more (opening a new image) is done by the API thread.
        // The filter allows no cgroup file writes: from now on the helper removes the VM's
        // cgroup, once this process has exited.
        vm.seal_helper();
        if let Err(e) = bulkhead_policies::install(bulkhead_policies::Policy::CoreMain) {
            vm.stop(StopReason::InternalError(format!("cannot install the main thread's seccomp filter: {e}")));
        }
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.metrics_due = Instant::now() + METRICS_PERIOD;
        // Start-up's temporary allocations (the parsed configuration's scratch, loader buffers,
        // the services' set-up messages) are freed by now; hand their pages back instead of
        // keeping them resident for the VM's life (~30 KiB of the core's heap; footprint bench).
        // SAFETY: malloc_trim only returns free heap pages to the kernel (MADV_DONTNEED and a
        // shrinking brk, both allowed by the core-main filter); no allocation is touched.
        unsafe { libc::malloc_trim(0) };
        // Likewise the main thread's stack below this frame (start-up went deep once; the
        // action loop does not): nothing when this runs on another thread.
        device_services::footprint::trim_main_stack();
        log::info!("VM started");
        Ok(())
    }

    /// Writes one line of metrics (JSON) to the metrics file, if one is configured.
    fn flush_metrics(&mut self) -> Result<(), ActionError> {
        let line = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            crate::api::metrics_json(&view)
        };
        if let Some(f) = &mut self.metrics {
            f.write_all(format!("{line}\n").as_bytes())
                .map_err(|e| ActionError::Failed(format!("writing the metrics file: {e}")))?;
        }
        self.metrics_due = Instant::now() + METRICS_PERIOD;
        Ok(())
    }

    /// Runs until the VM stops (or, not started, until asked to stop): applies the calls as
    /// they come, looks after the running VM between them. Returns why it stopped.
    pub fn run(&mut self, calls: &Receiver<ApiCall>) -> StopReason {
        let no_calls = crossbeam_channel::never();
        let no_stop = crossbeam_channel::never();
        let mut calls_open = true;
        loop {
            if self.state == VmState::Stopped && self.vm.is_none() {
                return match self.signalled {
                    Some(sig) => StopReason::Signal(sig),
                    None => StopReason::Requested("stopped before it started".into()),
                };
            }
            let api = if calls_open { calls } else { &no_calls };
            let stopped = self.vm.as_ref().map_or(&no_stop, RunningVm::stopped);
            crossbeam_channel::select! {
                recv(api) -> call => match call {
                    Ok(call) => {
                        let result = self.handle(call.action);
                        let _ = call.reply.send(result);
                    }
                    Err(_) => calls_open = false,
                },
                recv(stopped) -> reason => {
                    let reason = reason.unwrap_or_else(|_| StopReason::InternalError("every vCPU thread is gone".into()));
                    return self.finish(reason);
                }
                default(self.next_tick()) => self.tick(),
            }
        }
    }

    /// How long the loop may wait for a call before its next look: [`TICK`], or less when a
    /// deadline comes sooner.
    fn next_tick(&self) -> Duration {
        let now = Instant::now();
        let injection = self.vm.as_ref().and_then(RunningVm::next_injection);
        [self.stop_deadline, self.metrics_deadline(), injection]
            .into_iter()
            .flatten()
            .map(|d| d.saturating_duration_since(now))
            .fold(TICK, Duration::min)
    }

    /// When the metrics file is written next: only while a VM runs and one is configured.
    fn metrics_deadline(&self) -> Option<Instant> {
        (self.metrics.is_some() && self.vm.is_some()).then_some(self.metrics_due)
    }

    /// Between calls: signals, due injections, the stop deadline, the metrics timer.
    fn tick(&mut self) {
        let signal = crate::launch::take_signal();
        self.stop_on_io_error();
        match &mut self.vm {
            Some(vm) => {
                vm.tick();
                if let Some(sig) = signal {
                    vm.stop(StopReason::Signal(sig));
                }
                if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                    self.stop_deadline = None;
                    log::warn!("the guest did not stop itself: stopping it");
                    vm.stop(StopReason::Requested("stopped on request".into()));
                }
            }
            None => {
                if let Some(sig) = signal {
                    log::info!("signal {sig} before the VM started: exiting");
                    self.signalled = Some(sig);
                    self.state = VmState::Stopped;
                }
            }
        }
        if self.metrics_deadline().is_some_and(|d| Instant::now() >= d) {
            if let Err(e) = self.flush_metrics() {
                log::warn!("{e}");
            }
        }
    }

    /// Pauses a running VM whose disk holds a request by its error policy (`werror=stop`,
    /// ...), so the operator can free space or fix the storage and resume with nothing lost.
    fn stop_on_io_error(&mut self) {
        if self.state != VmState::Running {
            return;
        }
        let Some(vm) = &self.vm else { return };
        let Some(why) = vm.take_io_stop() else { return };
        match vm.pause(PAUSE_LIMIT) {
            Ok(()) => {
                log::error!(
                    "VM paused: {why}; free space or repair the storage, then resume it (PATCH /vm Resumed, \
                     bulkhead resume): the request is retried and nothing is lost"
                );
                self.state = VmState::Paused;
                self.paused_by = Some(why);
            }
            // The disk's requests stay held (the guest waits on them) until a resume.
            Err(e) => log::error!("{why}; pausing the VM failed: {}", chain(&e)),
        }
        self.publish();
    }

    fn finish(&mut self, reason: StopReason) -> StopReason {
        self.state = VmState::Stopped;
        self.publish();
        if self.metrics.is_some() {
            let _ = self.flush_metrics();
        }
        match self.vm.take() {
            Some(vm) => vm.shut_down(reason),
            None => reason,
        }
    }
}

/// Opens a log or metrics destination for appending: a regular file (created if missing) or a
/// FIFO. Read-write and non-blocking, as Firecracker opens them: a FIFO nobody reads yet opens
/// (firecracker-containerd creates them and never reads), and a reader that stalls costs lines,
/// never the VMM.
pub fn open_output(path: &std::path::Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
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

    fn boot() -> VmmAction {
        VmmAction::PutBootSource(BootSource { kernel_image_path: "/k".into(), initrd_path: None, boot_args: None })
    }

    #[test]
    fn actions_per_state() {
        use VmState::*;
        let ok = |s, a: &VmmAction| check(s, a).is_ok();
        // Before the start: configuration and start; nothing that needs a running guest.
        assert!(ok(NotStarted, &boot()));
        assert!(ok(NotStarted, &VmmAction::InstanceStart));
        assert!(ok(NotStarted, &VmmAction::Kill));
        for a in [VmmAction::Pause, VmmAction::Resume, VmmAction::SendCtrlAltDel, VmmAction::FlushMetrics] {
            let e = check(NotStarted, &a).expect_err("refused");
            assert_eq!(e.to_string(), "The requested operation is not supported before starting the microVM.");
        }
        // After the start: no more configuration, no second start.
        for s in [Running, Paused] {
            assert!(!ok(s, &boot()));
            assert!(!ok(s, &VmmAction::InstanceStart));
            assert!(!ok(s, &VmmAction::PatchMachineConfig(MachineConfigUpdate::default())));
            assert!(ok(s, &VmmAction::Pause) && ok(s, &VmmAction::Resume), "pause and resume are idempotent");
            assert!(ok(s, &VmmAction::FlushMetrics));
            assert!(ok(s, &VmmAction::PatchDrive(DriveUpdate::default(), None)));
        }
        assert_eq!(
            check(Running, &boot()).expect_err("refused").to_string(),
            "The requested operation is not supported after starting the microVM."
        );
        assert!(ok(Running, &VmmAction::SendCtrlAltDel));
        assert!(!ok(Paused, &VmmAction::SendCtrlAltDel), "a paused guest cannot read its keyboard");
        assert!(!ok(Stopped, &VmmAction::Resume));
    }

    #[test]
    fn the_loop_waits_a_tick_or_until_the_next_deadline() {
        let mut vmm = Vmm::new("t", VmConfig::default());
        assert_eq!(vmm.next_tick(), TICK, "nothing due: a whole tick");
        vmm.stop_deadline = Some(Instant::now() + Duration::from_millis(40));
        let wait = vmm.next_tick();
        assert!(wait <= Duration::from_millis(40) && wait > Duration::ZERO, "{wait:?}");
        vmm.stop_deadline = Some(Instant::now() + 10 * TICK);
        assert_eq!(vmm.next_tick(), TICK, "a far deadline: a whole tick");
        vmm.stop_deadline = Instant::now().checked_sub(Duration::from_millis(5));
        assert_eq!(vmm.next_tick(), Duration::ZERO, "overdue: at once");
        // The metrics timer counts only while a VM runs.
        vmm.stop_deadline = None;
        vmm.metrics_due = Instant::now();
        assert_eq!(vmm.next_tick(), TICK);
    }

    #[test]
    fn refused_configuration_changes_nothing() {
        let mut vmm = Vmm::new("t", VmConfig::default());
        let before = vmm.view().read().expect("view").config.clone();
        let bad = MachineConfig { vcpu_count: 0, ..MachineConfig::default() };
        assert!(vmm.handle(VmmAction::PutMachineConfig(bad)).is_err());
        assert!(vmm
            .handle(VmmAction::PutBootSource(BootSource {
                kernel_image_path: "/no/such/kernel".into(),
                initrd_path: None,
                boot_args: None
            }))
            .is_err());
        assert_eq!(vmm.view().read().expect("view").config, before);
        let e = vmm.handle(VmmAction::InstanceStart).expect_err("no kernel");
        assert!(e.to_string().contains("without kernel configuration"), "{e}");
        assert_eq!(vmm.state(), VmState::NotStarted);
        vmm.handle(VmmAction::PatchMachineConfig(MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        }))
        .expect("patch");
        assert_eq!(vmm.view().read().expect("view").config.machine_config.mem_size_mib, 256);
    }
}
