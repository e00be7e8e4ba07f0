//! vCPU threads: KVM exits become a small enum this crate owns ([`Exit`]), a free function
//! ([`handle_exit`]) dispatches them to the buses, and the run loop is a small state machine
//! (running ⇄ paused → exited, [`next_state`]) that knows no device. Each thread is driven
//! through its [`VcpuHandle`]: a command channel plus a kick signal whose handler sets
//! `immediate_exit`, so no command is missed between the thread's check and its `KVM_RUN`.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::Bus;
use crate::control::{StopHandle, StopReason};

/// Up to 8 bytes of access data, copied out of `kvm_run` before anyone looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessData {
    len: u8,
    bytes: [u8; 8],
}

impl AccessData {
    /// Copies `data`, which KVM bounds to 8 bytes; anything longer is truncated to 8.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut bytes = [0u8; 8];
        // Inline, never libc's memcpy: see `ipc::ring::copy_access`.
        let n = ipc::ring::copy_access(&mut bytes, data);
        Self { len: u8::try_from(n).unwrap_or(8), bytes }
    }

    /// A zeroed buffer of `len` bytes (at most 8).
    pub fn zeroed(len: usize) -> Self {
        Self { len: u8::try_from(len.min(8)).unwrap_or(8), bytes: [0; 8] }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[..usize::from(self.len)]
    }
}

/// A vCPU exit, translated at the KVM boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Port read of `len` bytes.
    PioRead {
        /// Port.
        port: u16,
        /// Access size.
        len: u8,
    },
    /// Port write.
    PioWrite {
        /// Port.
        port: u16,
        /// Data written.
        data: AccessData,
    },
    /// MMIO read of `len` bytes.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access size.
        len: u8,
    },
    /// MMIO write.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Data written.
        data: AccessData,
    },
    /// HLT reached user space (only without an in-kernel irqchip).
    Halt,
    /// Triple fault.
    Shutdown,
    /// A KVM system event (`KVM_SYSTEM_EVENT_*`).
    SystemEvent(u32),
    /// KVM failed to emulate or enter (internal error / failed entry).
    Failure(String),
    /// KVM_RUN was interrupted (a kick): nothing to do but look at the stop flag.
    Interrupted,
    /// Anything else: not expected with our VM set-up.
    Other(String),
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the guest.
    Resume,
    /// Resume the guest, handing it these bytes for its read.
    ResumeWithRead(AccessData),
    /// Stop the VM.
    Stop(StopReason),
}

/// Translates a KVM exit into an [`Exit`], copying its data.
pub fn translate(exit: &VcpuExit<'_>) -> Exit {
    match exit {
        VcpuExit::IoIn(port, data) => Exit::PioRead { port: *port, len: len8(data.len()) },
        VcpuExit::IoOut(port, data) => Exit::PioWrite { port: *port, data: AccessData::from_slice(data) },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr: *addr, len: len8(data.len()) },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr: *addr, data: AccessData::from_slice(data) },
        VcpuExit::Hlt => Exit::Halt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(*kind),
        VcpuExit::InternalError => Exit::Failure("KVM internal error (emulation failure)".into()),
        VcpuExit::FailEntry(reason, cpu) => Exit::Failure(format!("VM entry failed: reason {reason:#x} on cpu {cpu}")),
        VcpuExit::Intr => Exit::Interrupted,
        other => Exit::Other(format!("{other:?}")),
    }
}

fn len8(n: usize) -> u8 {
    u8::try_from(n.min(8)).unwrap_or(8)
}

/// The port-I/O and MMIO buses a vCPU dispatches to.
#[derive(Clone, Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// MMIO.
    pub mmio: Bus,
}

/// Dispatches one exit. Pure apart from the devices it calls: unit-testable with synthetic exits.
pub fn handle_exit(exit: &Exit, buses: &Buses) -> Outcome {
    match exit {
        Exit::PioRead { port, len } => {
            let mut data = AccessData::zeroed(usize::from(*len));
            buses.pio.read(u64::from(*port), data.as_mut_slice());
            Outcome::ResumeWithRead(data)
        }
        Exit::PioWrite { port, data } => {
            buses.pio.write(u64::from(*port), data.as_slice());
            Outcome::Resume
        }
        Exit::MmioRead { addr, len } => {
            let mut data = AccessData::zeroed(usize::from(*len));
            buses.mmio.read(*addr, data.as_mut_slice());
            Outcome::ResumeWithRead(data)
        }
        Exit::MmioWrite { addr, data } => {
            buses.mmio.write(*addr, data.as_slice());
            Outcome::Resume
        }
        Exit::Interrupted => Outcome::Resume,
        Exit::Halt => Outcome::Stop(StopReason::Halted),
        Exit::Shutdown => Outcome::Stop(StopReason::TripleFault),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Outcome::Stop(StopReason::SystemEvent("shutdown")),
        Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET) => Outcome::Stop(StopReason::SystemEvent("reset")),
        Exit::SystemEvent(other) => Outcome::Stop(StopReason::InternalError(format!("unknown system event {other}"))),
        Exit::Failure(why) => Outcome::Stop(StopReason::InternalError(why.clone())),
        Exit::Other(what) => Outcome::Stop(StopReason::InternalError(format!("unexpected exit {what}"))),
    }
}

/// The signal used to kick a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run` page (null on other threads and before the first run). The
    /// kick signal's handler sets `immediate_exit` through it.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the handler for [`kick_signal`]. On a vCPU thread it sets `immediate_exit` in the
/// thread's `kvm_run`: a kick that lands between the thread's look at its commands and its next
/// `KVM_RUN` makes that `KVM_RUN` return at once (EINTR) instead of being lost, and one that lands
/// during `KVM_RUN` interrupts it as any signal does.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let run = KVM_RUN.with(Cell::get);
        if !run.is_null() {
            // SAFETY: `run` is the calling vCPU thread's own kvm_run mapping, published by
            // `RunPage::publish` while its `VcpuFd` is alive and withdrawn (set to null) before
            // the fd is dropped; the handler runs on that same thread, so the mapping is live. A
            // volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    }
    register_signal_handler(kick_signal(), on_kick)
}

/// Publishes a vCPU's `kvm_run` page to the kick handler for as long as it lives.
struct RunPage;

impl RunPage {
    fn publish(vcpu: &mut VcpuFd) -> Self {
        let run: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        Self
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// What a vCPU thread is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and wait for `Resume` or `Exit`.
    Pause,
    /// Run the guest again.
    Resume,
    /// Read the vCPU's state into the report slot ([`crate::vcpu_state`]), then go on as before.
    Report,
    /// End the thread.
    Exit,
}

/// What a vCPU thread reports back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Vcpu `index` is out of `KVM_RUN` and waits.
    Paused(usize),
    /// Vcpu `index` runs the guest again.
    Resumed(usize),
    /// Vcpu `index` put its report in its slot.
    Reported(usize),
    /// Vcpu `index`'s thread has ended.
    Exited(usize),
}

/// State of a vCPU thread: a small state machine driven by [`next_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Out of `KVM_RUN`, waiting for a command.
    Paused,
    /// The thread ends.
    Exited,
}

/// How a vCPU acknowledges a command: the event for its index.
pub type Ack = fn(usize) -> VcpuEvent;

/// The state after `cmd` in `state`, and whether to acknowledge it. Pure: unit-tested.
pub fn next_state(state: VcpuState, cmd: VcpuCommand) -> (VcpuState, Option<Ack>) {
    match (state, cmd) {
        (VcpuState::Exited, _) | (_, VcpuCommand::Exit) => (VcpuState::Exited, None),
        (_, VcpuCommand::Pause) => (VcpuState::Paused, Some(VcpuEvent::Paused)),
        (_, VcpuCommand::Resume) => (VcpuState::Running, Some(VcpuEvent::Resumed)),
        (state, VcpuCommand::Report) => (state, Some(VcpuEvent::Reported)),
    }
}

/// How long a paused vCPU waits for a command before looking at the stop flag again.
const PAUSED_POLL: Duration = Duration::from_millis(100);

/// Runs vCPU `index` until the VM stops or it is told to exit, obeying `commands` and reporting
/// on `events`. Reports why the VM stopped through `stop` when it is the one that stops it.
pub fn run(
    index: usize,
    mut vcpu: VcpuFd,
    buses: Arc<Buses>,
    stop: StopHandle,
    commands: Receiver<VcpuCommand>,
    out: Outbox,
) {
    let Outbox { events, exit_count, reports } = out;
    // The thread's seccomp filter, before its first KVM_RUN: KVM_RUN, the rings' doorbells and
    // little else (policies/json/vcpu.json; a mismatch kills the process). Never run without it.
    if let Err(e) = bulkhead_policies::install(bulkhead_policies::Policy::CoreVcpu) {
        stop.stop(StopReason::InternalError(format!("vcpu{index}: loading its seccomp filter failed: {e}")));
        let _ = events.send(VcpuEvent::Exited(index));
        return;
    }
    let page = RunPage::publish(&mut vcpu);
    let mut state = VcpuState::Running;
    let mut exits: u64 = 0;
    while state != VcpuState::Exited {
        // Commands first: a kick that arrives after this look sets immediate_exit, so the
        // KVM_RUN below returns at once and the loop comes back here.
        let cmd = match state {
            VcpuState::Running => commands.try_recv().ok(),
            _ => commands.recv_timeout(PAUSED_POLL).ok(),
        };
        if let Some(cmd) = cmd {
            if cmd == VcpuCommand::Report {
                let report = crate::vcpu_state::read(&vcpu, index, exits, state == VcpuState::Paused);
                if let Some(slot) = reports.lock().unwrap_or_else(|e| e.into_inner()).get_mut(index) {
                    *slot = Some(report);
                }
            }
            let (next, ack) = next_state(state, cmd);
            state = next;
            if let Some(ack) = ack {
                let _ = events.send(ack(index));
            }
            continue;
        }
        if stop.is_stopping() {
            state = VcpuState::Exited;
            continue;
        }
        if state == VcpuState::Paused {
            continue;
        }
        let outcome = match vcpu.run() {
            Ok(mut exit) => {
                exits += 1;
                exit_count.store(exits, Ordering::Relaxed);
                let translated = translate(&exit);
                let outcome = handle_exit(&translated, &buses);
                if let Outcome::ResumeWithRead(read) = &outcome {
                    match &mut exit {
                        VcpuExit::IoIn(_, data) | VcpuExit::MmioRead(_, data) => {
                            ipc::ring::copy_access(data, read.as_slice());
                        }
                        _ => {}
                    }
                }
                outcome
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Outcome::Resume
            }
            Err(e) => Outcome::Stop(StopReason::InternalError(format!("KVM_RUN failed: {e}"))),
        };
        if let Outcome::Stop(reason) = outcome {
            log::debug!("vcpu{index}: stopping after {exits} exits: {reason}");
            stop.stop(reason);
            state = VcpuState::Exited;
        }
    }
    drop(page);
    drop(vcpu);
    log::debug!("vcpu{index}: thread exits ({exits} exits)");
    let _ = events.send(VcpuEvent::Exited(index));
}

/// Where a vCPU thread reports: acknowledgements, its exit count, its state report.
#[derive(Debug)]
pub struct Outbox {
    /// Acknowledgements of commands.
    pub events: Sender<VcpuEvent>,
    /// Exits handled so far.
    pub exit_count: Arc<AtomicU64>,
    /// The report slots (this thread fills its own).
    pub reports: Reports,
}

/// One report slot per vCPU, filled by its thread on [`VcpuCommand::Report`].
pub type Reports = Arc<std::sync::Mutex<Vec<Option<crate::vcpu_state::VcpuReport>>>>;

/// A running vCPU thread: its command channel and its join handle.
#[derive(Debug)]
pub struct VcpuHandle {
    index: usize,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts vCPU `index` on a thread `vcpuN`.
    pub fn spawn(
        index: usize,
        vcpu: VcpuFd,
        buses: Arc<Buses>,
        stop: StopHandle,
        events: Sender<VcpuEvent>,
        exit_count: Arc<AtomicU64>,
        reports: Reports,
    ) -> std::io::Result<Self> {
        let (commands, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run(index, vcpu, buses, stop, rx, Outbox { events, exit_count, reports }))?;
        Ok(Self { index, commands, thread: Some(thread) })
    }

    /// Sends `cmd` and kicks the thread out of `KVM_RUN` so that it sees it.
    pub fn send(&self, cmd: VcpuCommand) {
        let _ = self.commands.send(cmd);
        self.kick();
    }

    /// Kicks the thread (see [`install_kick_handler`]).
    pub fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Tells the thread to exit and waits for it, kicking it every 10 ms, at most `limit`.
    /// Returns whether it ended (then it is joined).
    pub fn exit(&mut self, limit: Duration) -> bool {
        let _ = self.commands.send(VcpuCommand::Exit);
        let start = std::time::Instant::now();
        while !self.is_finished() && start.elapsed() < limit {
            self.kick();
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.is_finished() {
            log::error!("vcpu{} did not stop within {limit:?}", self.index);
            return false;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        true
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit(Duration::from_secs(2));
    }
}

/// Every vCPU of a VM: pause, resume and exit them together.
#[derive(Debug)]
pub struct VcpuSet {
    handles: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    events_tx: Sender<VcpuEvent>,
    exits: Vec<Arc<AtomicU64>>,
    reports: Reports,
}

/// Errors of [`VcpuSet`].
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU did not acknowledge a command in time.
    #[error("vcpu{0} did not {1} within {2:?}")]
    NoAck(usize, &'static str, Duration),
    /// Spawning a vCPU thread failed.
    #[error("spawning a vCPU thread")]
    Spawn(#[source] std::io::Error),
}

impl Default for VcpuSet {
    fn default() -> Self {
        let (events_tx, events) = crossbeam_channel::unbounded();
        Self { handles: Vec::new(), events, events_tx, exits: Vec::new(), reports: Reports::default() }
    }
}

impl VcpuSet {
    /// Starts the next vCPU.
    pub fn spawn(&mut self, vcpu: VcpuFd, buses: Arc<Buses>, stop: StopHandle) -> Result<(), VcpuError> {
        let index = self.handles.len();
        let count = Arc::new(AtomicU64::new(0));
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).push(None);
        let h =
            VcpuHandle::spawn(index, vcpu, buses, stop, self.events_tx.clone(), count.clone(), self.reports.clone())
                .map_err(VcpuError::Spawn)?;
        self.handles.push(h);
        self.exits.push(count);
        Ok(())
    }

    /// Each vCPU's exit counter (read while the VM runs).
    pub fn exit_counters(&self) -> Vec<Arc<AtomicU64>> {
        self.exits.clone()
    }

    /// How many vCPUs.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Sends `cmd` to every vCPU and waits (at most `limit`) until each acknowledged it with
    /// `want` (or has exited, which also counts: an exited vCPU runs no guest code).
    fn command_all(&self, cmd: VcpuCommand, want: Ack, what: &'static str, limit: Duration) -> Result<(), VcpuError> {
        while self.events.try_recv().is_ok() {}
        for h in &self.handles {
            h.send(cmd);
        }
        let mut pending: Vec<bool> = self.handles.iter().map(|h| !h.is_finished()).collect();
        let deadline = std::time::Instant::now() + limit;
        while let Some(i) = pending.iter().position(|p| *p) {
            match self.events.recv_deadline(deadline) {
                Ok(VcpuEvent::Exited(j)) => {
                    if let Some(p) = pending.get_mut(j) {
                        *p = false;
                    }
                }
                Ok(ev) => {
                    for (j, p) in pending.iter_mut().enumerate() {
                        if ev == want(j) {
                            *p = false;
                        }
                    }
                }
                Err(_) => return Err(VcpuError::NoAck(i, what, limit)),
            }
        }
        Ok(())
    }

    /// Takes every vCPU out of `KVM_RUN`; returns once all wait (or `limit` passed).
    pub fn pause(&self, limit: Duration) -> Result<(), VcpuError> {
        self.command_all(VcpuCommand::Pause, VcpuEvent::Paused, "pause", limit)
    }

    /// Every vCPU's state, each read by its thread between two `KVM_RUN`s (at most `limit` in
    /// all). A vCPU whose thread has ended has no report.
    pub fn report(&self, limit: Duration) -> Result<Vec<crate::vcpu_state::VcpuReport>, VcpuError> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().for_each(|r| *r = None);
        self.command_all(VcpuCommand::Report, VcpuEvent::Reported, "report", limit)?;
        Ok(self.reports.lock().unwrap_or_else(|e| e.into_inner()).iter_mut().filter_map(Option::take).collect())
    }

    /// Lets every vCPU run again.
    pub fn resume(&self, limit: Duration) -> Result<(), VcpuError> {
        self.command_all(VcpuCommand::Resume, VcpuEvent::Resumed, "resume", limit)
    }

    /// Ends every vCPU thread (each bounded to `limit`); returns how many did not stop.
    pub fn exit(&mut self, limit: Duration) -> usize {
        self.handles.iter_mut().map(|h| h.exit(limit)).filter(|ok| !ok).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    struct Echo(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Echo {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from(offset + i as u64).unwrap_or(0xee);
            }
        }
        fn write(&self, base: u64, offset: u64, data: &[u8]) {
            self.0.lock().expect("lock").push((base + offset, data.to_vec()));
        }
    }

    fn buses() -> (Buses, Arc<Echo>) {
        let dev = Arc::new(Echo(Mutex::new(Vec::new())));
        let mut b = Buses::default();
        b.pio.insert(0x3f8, 8, dev.clone()).expect("pio");
        b.mmio.insert(0xd000_0000, 0x1000, dev.clone()).expect("mmio");
        (b, dev)
    }

    #[test]
    fn pio_read_and_write_reach_the_device() {
        let (b, dev) = buses();
        assert_eq!(
            handle_exit(&Exit::PioRead { port: 0x3fa, len: 2 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[2, 3]))
        );
        let out = Exit::PioWrite { port: 0x3f8, data: AccessData::from_slice(b"A") };
        assert_eq!(handle_exit(&out, &b), Outcome::Resume);
        assert_eq!(dev.0.lock().expect("lock")[0], (0x3f8, b"A".to_vec()));
    }

    #[test]
    fn unmapped_port_reads_all_ones() {
        let (b, _) = buses();
        assert_eq!(
            handle_exit(&Exit::PioRead { port: 0x2f8, len: 1 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[0xff]))
        );
        assert_eq!(
            handle_exit(&Exit::PioWrite { port: 0x2f8, data: AccessData::from_slice(&[1]) }, &b),
            Outcome::Resume
        );
    }

    #[test]
    fn mmio_dispatch() {
        let (b, dev) = buses();
        assert_eq!(
            handle_exit(&Exit::MmioRead { addr: 0xd000_0010, len: 4 }, &b),
            Outcome::ResumeWithRead(AccessData::from_slice(&[0x10, 0x11, 0x12, 0x13]))
        );
        handle_exit(&Exit::MmioWrite { addr: 0xd000_0070, data: AccessData::from_slice(&[1, 0, 0, 0]) }, &b);
        assert_eq!(dev.0.lock().expect("lock")[0].0, 0xd000_0070);
    }

    #[test]
    fn stops() {
        let (b, _) = buses();
        assert_eq!(handle_exit(&Exit::Shutdown, &b), Outcome::Stop(StopReason::TripleFault));
        assert_eq!(
            handle_exit(&Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET), &b),
            Outcome::Stop(StopReason::SystemEvent("reset"))
        );
        assert!(matches!(handle_exit(&Exit::Failure("x".into()), &b), Outcome::Stop(StopReason::InternalError(_))));
        assert!(matches!(handle_exit(&Exit::SystemEvent(99), &b), Outcome::Stop(StopReason::InternalError(_))));
        assert_eq!(handle_exit(&Exit::Interrupted, &b), Outcome::Resume);
    }

    #[test]
    fn vcpu_state_machine() {
        use VcpuCommand::*;
        use VcpuState::*;
        assert_eq!(next_state(Running, Pause).0, Paused);
        assert_eq!(next_state(Running, Pause).1.map(|f| f(2)), Some(VcpuEvent::Paused(2)));
        assert_eq!(next_state(Paused, Resume).0, Running);
        assert_eq!(next_state(Paused, Resume).1.map(|f| f(0)), Some(VcpuEvent::Resumed(0)));
        assert_eq!(next_state(Paused, Pause).0, Paused, "pausing twice is harmless");
        assert_eq!(next_state(Running, Resume).0, Running);
        for s in [Running, Paused, Exited] {
            assert_eq!(next_state(s, Exit), (Exited, None));
        }
        for s in [Running, Paused] {
            let (next, ack) = next_state(s, Report);
            assert_eq!((next, ack.map(|f| f(1))), (s, Some(VcpuEvent::Reported(1))), "a report changes no state");
        }
        assert_eq!(next_state(Exited, Report), (Exited, None));
        assert_eq!(next_state(Exited, Resume).0, Exited, "nothing leaves Exited");
    }

    #[test]
    fn access_data_bounds() {
        assert_eq!(AccessData::from_slice(&[1; 12]).as_slice().len(), 8);
        assert_eq!(AccessData::zeroed(3).as_slice(), &[0, 0, 0]);
    }
}
