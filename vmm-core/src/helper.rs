//! The VM's privileged helper: what the jailed core may no longer do itself, done on its
//! behalf by a small process that stays outside the jail, for this VM only.
//!
//! `bulkhead-helper` is the core's own executable (dispatched on `argv[0]`), started by the
//! launcher of a split right after the core's fork ([`crate::pidns`]: it stays outside the core's
//! PID namespace and outlives the core; the launcher's [`Hello::Split`] is queued first),
//! or, without a split, by the core's VMM thread at `InstanceStart` while the core is still
//! root; either way before anything of the VM exists. Its stdin is one end of a `SOCK_SEQPACKET` pair; the core holds the other end and
//! nothing else does. Messages are bincode ([`Request`], [`Reply`]), each with its request's
//! number, one request and one reply at a time (the core serialises callers; a reply that comes
//! after its caller gave up is recognised by its number and dropped), fds travel with
//! `SCM_RIGHTS`.
//!
//! What it does, each checked against what this VM owns:
//! - **Spawn** a service: only a [`Program`] of the set-up's list (the core's own executable, or
//!   the `--service-dir` binaries), in the namespaces the sandbox decided, its unprivileged ids
//!   mapped to the VM's service ids ([`crate::jail::VmIds::service`]), which the core, no longer
//!   root, could not map. After a split the service is the helper's child: the helper **reaps**
//!   it when the core asks ([`Request::Reap`], once its pidfd says it ended). Without one it is
//!   created with `CLONE_PARENT`, so the core is its parent and reaps it.
//! - **Kill** a service it created (the core's uid may not signal the services' uid).
//! - **Place** a process of the VM (a service) in the VM's cgroup, and **update** the
//!   cgroup's settings (the cgroup's files are root's).
//! - **Report** what confines each process of the VM, read from `/proc` (the core may not read
//!   another uid's fds and namespaces).
//! - **Clean up** when the core is gone, however it ended (its end of the socket closes): the
//!   VM's leftover processes killed, an OOM kill reported, the cgroup removed, the API socket
//!   removed (only if it is still the one the core made). `Leave` instead means a start that
//!   failed and cleaned up after itself: the helper exits touching nothing.
//!
//! A request the helper refuses gets [`Reply::Refused`] and changes nothing; a malformed one
//! too. The helper ignores the terminal's signals (a Ctrl-C for the core must not stop the
//! cleanup).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ipc::control::{ControlChannel, ControlError, JailPlan};
use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupError, Resources, VmCgroup};
use crate::isolation::IsolationReport;
use crate::service::spawn::{How, SpawnError};
use crate::service::{Program, ServiceChild};

/// The `argv[0]` the helper runs under.
pub const HELPER_NAME: &str = "bulkhead-helper";
/// Longest wait for one reply (a spawn waits up to 5 s for the child's `execve`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the helper waits for the VM's processes to end after the core is gone, before it
/// kills what is left.
const GRACE: Duration = Duration::from_secs(5);
/// Most live services the helper tracks (restarts are capped far below this).
const MAX_CHILDREN: usize = 256;
/// Longest wait of a [`Request::Reap`] for the service to end (it was killed, or its pidfd
/// already said it ended).
const REAP_LIMIT: Duration = Duration::from_secs(5);

/// Errors talking to the helper.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// Starting the helper process failed.
    #[error("starting the privileged helper")]
    Start(#[source] io::Error),
    /// The channel failed (the helper died, or sent garbage).
    #[error("talking to the privileged helper")]
    Channel(#[source] ControlError),
    /// A message could not be encoded or decoded.
    #[error("helper message")]
    Codec(#[source] bincode::Error),
    /// The helper refused the request.
    #[error("the privileged helper refused: {0}")]
    Refused(String),
    /// The helper answered something else than the request calls for.
    #[error("unexpected answer from the privileged helper")]
    Unexpected,
}

/// What the helper is told once, first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperSetup {
    /// The VM's id (for messages).
    pub vm_id: String,
    /// The ids the services' unprivileged ids map to (`None`: [`crate::service::spawn::SERVICE_ID`]).
    pub service_ids: Option<(u32, u32)>,
    /// The namespaces services get ([`crate::service::Namespaces::flags`]), as the core decided.
    pub namespaces: u64,
    /// Whether services switch to their unprivileged ids (as the core decided).
    pub switch_id: bool,
    /// The only programs it starts.
    pub programs: Vec<Program>,
    /// The core's API socket, removed when the core is gone (if it is still the same file).
    pub api_socket: Option<PathBuf>,
    /// The core's jail directory ([`crate::jail::jail_root`]), removed once the core is gone if
    /// nothing but its `proc` mount point is left in it.
    pub jail_root: Option<PathBuf>,
    /// The core's host pid ([`crate::pidns::host_pid`]; without a split, the helper's parent).
    pub core_pid: u32,
}

/// The helper's first message: from the launcher of a split ([`crate::pidns`]), that the core
/// is in a PID namespace of its own and the services are the helper's to reap; otherwise, or
/// next, the core's set-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Hello {
    /// A split: the core, its host pid in the set-up, is not the helper's parent.
    Split,
    /// The set-up (and the fds the helper holds until it exits attached).
    Setup(Box<HelperSetup>),
}

/// A request of the core.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Start `program` with the attached fd as its control socket.
    Spawn {
        /// One of the set-up's programs.
        program: Program,
    },
    /// SIGKILL a service the helper started.
    Kill {
        /// Its pid.
        pid: u32,
    },
    /// The VM's cgroup, created by the core: the helper removes it when the core is gone.
    Cgroup(VmCgroup),
    /// Move a child of the core into the child group `name` of the VM's cgroup.
    Place {
        /// The child group (a service's name).
        name: String,
        /// The process.
        pid: u32,
    },
    /// Apply `update` to the VM's cgroup, checked against `guest_ram`.
    Update {
        /// The settings to change.
        update: Resources,
        /// The guest's RAM in bytes.
        guest_ram: u64,
    },
    /// What confines the core, the helper and each service (role, pid: children of the core).
    Report {
        /// The VM's id.
        vm: String,
        /// The services.
        services: Vec<(String, u32)>,
    },
    /// CPU time of the child group `child` (a service, or the core's), or of the whole VM.
    CpuNs {
        /// The child group, or `None` for the VM.
        child: Option<String>,
    },
    /// How many processes the kernel's OOM killer ended in the VM's group.
    OomKills,
    /// Wait (at most [`REAP_LIMIT`]) for a service the helper created, as its parent, to end;
    /// reap it and say how it ended (a split: the services are the helper's children).
    Reap {
        /// Its pid.
        pid: u32,
    },
    /// The start failed and the core cleaned up: exit touching nothing.
    Leave,
}

/// The helper's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Done,
    /// The service was created (its pidfd attached).
    Spawned {
        /// Its pid.
        pid: u32,
        /// What it was created in.
        jail: JailPlan,
        /// The helper is its parent and reaps it ([`Request::Reap`]); otherwise the core is.
        reaped_here: bool,
    },
    /// The settings in force.
    Resources(Resources),
    /// The report.
    Report(Box<IsolationReport>),
    /// CPU time in ns, if the group has it.
    CpuNs(Option<u64>),
    /// The OOM kill count (`None`: no memory controller).
    OomKills(Option<u64>),
    /// How the service ended (a raw wait status).
    Reaped {
        /// The status `waitpid` gave.
        status: i32,
    },
    /// Refused or failed; `pid`: a child created and killed meanwhile, for the core to reap.
    Refused {
        /// Why.
        reason: String,
        /// The killed child, if any.
        pid: Option<u32>,
    },
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(ipc::control::MAX_MSG_SIZE as u64)
        .reject_trailing_bytes()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, HelperError> {
    bincode::Options::serialize(codec(), v).map_err(HelperError::Codec)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, HelperError> {
    bincode::Options::deserialize(codec(), b).map_err(HelperError::Codec)
}

/// The core's side: the channel to its helper.
#[derive(Debug)]
pub struct Helper {
    chan: Mutex<Option<ControlChannel>>,
    child: Mutex<Option<std::process::Child>>,
    /// Set once the core dropped its privileges: from then on the helper cleans up alone, when
    /// the core is gone (the channel stays open until then).
    sealed: std::sync::atomic::AtomicBool,
    pid: Option<u32>,
    /// Number of the last request: each reply carries its request's, so a reply that arrives
    /// after its caller gave up waiting is recognised and dropped by the next caller.
    seq: std::sync::atomic::AtomicU64,
}

/// The helper of this process's VM, for the code paths that act on a service without a handle
/// to it (killing one).
static CURRENT: Mutex<Weak<Helper>> = Mutex::new(Weak::new());

/// The current VM's helper, if it has one.
pub fn current() -> Option<Arc<Helper>> {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).upgrade()
}

impl Helper {
    /// Starts the helper (from the VMM thread: services it creates are the core's children, and
    /// die when this thread does) and hands it `setup` and `holds` (fds it keeps until it
    /// exits: the VM's id lease).
    pub fn start(setup: &HelperSetup, holds: &[BorrowedFd<'_>]) -> Result<Arc<Self>, HelperError> {
        let (core, theirs) = ControlChannel::pair().map_err(HelperError::Channel)?;
        let child = spawn_process(theirs)?;
        let pid = child.id();
        Self::set_up(core, Some(child), Some(pid), setup, holds)
    }

    /// The helper the launcher of a split started ([`crate::pidns`]), set up for this VM. It is
    /// not this process's child: the launcher's.
    pub fn prestarted(
        p: crate::pidns::Prestarted,
        setup: &HelperSetup,
        holds: &[BorrowedFd<'_>],
    ) -> Result<Arc<Self>, HelperError> {
        Self::set_up(p.chan, None, None, setup, holds)
    }

    fn set_up(
        chan: ControlChannel,
        child: Option<std::process::Child>,
        pid: Option<u32>,
        setup: &HelperSetup,
        holds: &[BorrowedFd<'_>],
    ) -> Result<Arc<Self>, HelperError> {
        let helper =
            Self { chan: Mutex::new(Some(chan)), child: Mutex::new(child), sealed: false.into(), pid, seq: 0.into() };
        helper.send(&encode(&Hello::Setup(Box::new(setup.clone())))?, holds)?;
        let helper = Arc::new(helper);
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&helper);
        Ok(helper)
    }

    /// The helper's pid, when this process started it (a split's launcher starts it).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), HelperError> {
        let chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let chan = chan.as_ref().ok_or(HelperError::Unexpected)?;
        chan.send_bytes_now(bytes, fds).map_err(HelperError::Channel)
    }

    /// One request and its reply (callers on several threads take turns). Replies to earlier
    /// requests whose callers gave up are dropped; the wait is bounded by [`CALL_TIMEOUT`].
    fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Reply, Vec<OwnedFd>), HelperError> {
        let chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let chan = chan.as_ref().ok_or(HelperError::Unexpected)?;
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        // Never blocking (the helper reads at once; the core's threads' filters allow only
        // non-blocking sends): a full queue is an error.
        chan.send_bytes_now(&encode(&(seq, req))?, fds).map_err(HelperError::Channel)?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        // Bounded: each round takes one queued reply, until ours or the deadline.
        loop {
            let (bytes, fds) = chan.recv_bytes(deadline).map_err(HelperError::Channel)?;
            let (n, reply): (u64, Reply) = decode(&bytes)?;
            match n.cmp(&seq) {
                std::cmp::Ordering::Equal => return Ok((reply, fds)),
                // A late reply to a caller that timed out: its fds close here.
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Greater => return Err(HelperError::Unexpected),
            }
        }
    }

    fn call_done(&self, req: &Request) -> Result<(), HelperError> {
        match self.call(req, &[])?.0 {
            Reply::Done => Ok(()),
            Reply::Refused { reason, .. } => Err(HelperError::Refused(reason)),
            _ => Err(HelperError::Unexpected),
        }
    }

    /// Starts `program` as a service with `ctl` as its control socket (see the module docs).
    pub fn spawn(&self, program: &Program, ctl: BorrowedFd<'_>) -> Result<ServiceChild, SpawnError> {
        let helper = |e: HelperError| SpawnError::Helper(Box::new(e));
        let (reply, mut fds) = self.call(&Request::Spawn { program: program.clone() }, &[ctl]).map_err(helper)?;
        match reply {
            Reply::Spawned { pid, jail, reaped_here } if fds.len() == 1 => {
                let pidfd = fds.remove(0);
                Ok(ServiceChild::adopted(pid, pidfd, jail, reaped_here))
            }
            Reply::Refused { reason, pid } => {
                if let Some(pid) = pid {
                    reap(pid);
                }
                Err(helper(HelperError::Refused(reason)))
            }
            _ => Err(helper(HelperError::Unexpected)),
        }
    }

    /// SIGKILLs a service the helper created.
    pub fn kill(&self, pid: u32) -> io::Result<()> {
        self.call_done(&Request::Kill { pid }).map_err(io::Error::other)
    }

    /// How a service the helper created and reaps ended (see [`Request::Reap`]).
    pub fn reap(&self, pid: u32) -> io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        match self.call(&Request::Reap { pid }, &[]).map_err(io::Error::other)?.0 {
            Reply::Reaped { status } => Ok(std::process::ExitStatus::from_raw(status)),
            Reply::Refused { reason, .. } => Err(io::Error::other(reason)),
            _ => Err(io::Error::other(HelperError::Unexpected)),
        }
    }

    /// Hands the helper the VM's cgroup, which it removes once the core is gone.
    pub fn adopt_cgroup(&self, cg: &VmCgroup) -> Result<(), HelperError> {
        self.call_done(&Request::Cgroup(cg.clone()))
    }

    /// Moves `pid` (a child of the core) into the child group `name`.
    pub fn place(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        self.call_done(&Request::Place { name: name.to_string(), pid })
            .map_err(|e| CgroupError::Missing(crate::vmm::chain(&e)))
    }

    /// Applies `update` to the VM's cgroup; returns the settings in force.
    pub fn update(&self, update: &Resources, guest_ram: u64) -> Result<Resources, CgroupError> {
        match self.call(&Request::Update { update: update.clone(), guest_ram }, &[]) {
            Ok((Reply::Resources(r), _)) => Ok(r),
            Ok((Reply::Refused { reason, .. }, _)) => Err(CgroupError::Invalid(reason)),
            Ok(_) => Err(CgroupError::Missing(HelperError::Unexpected.to_string())),
            Err(e) => Err(CgroupError::Missing(crate::vmm::chain(&e))),
        }
    }

    /// What confines each process of the VM.
    pub fn report(&self, vm: &str, services: &[(String, u32)]) -> Result<IsolationReport, HelperError> {
        match self.call(&Request::Report { vm: vm.to_string(), services: services.to_vec() }, &[])?.0 {
            Reply::Report(r) => Ok(*r),
            Reply::Refused { reason, .. } => Err(HelperError::Refused(reason)),
            _ => Err(HelperError::Unexpected),
        }
    }

    /// CPU time of a child group of the VM's cgroup, or of the whole VM (`None` if unreadable).
    pub fn cpu_ns(&self, child: Option<&str>) -> Option<u64> {
        match self.call(&Request::CpuNs { child: child.map(str::to_string) }, &[]) {
            Ok((Reply::CpuNs(ns), _)) => ns,
            _ => None,
        }
    }

    /// How many processes the kernel's OOM killer ended in the VM's group (`None` if unknown).
    pub fn oom_kills(&self) -> Option<u64> {
        match self.call(&Request::OomKills, &[]) {
            Ok((Reply::OomKills(n), _)) => n,
            _ => None,
        }
    }

    /// The core dropped its privileges: from now on the helper alone cleans up, once the core
    /// is gone.
    pub fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`seal`](Self::seal) was called.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Helper {
    /// Sealed: the channel stays open until the process exits (its end is the helper's signal),
    /// the child is not waited for. Not sealed (a start that failed): `Leave`, and reaped.
    fn drop(&mut self) {
        let chan = self.chan.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if self.is_sealed() {
            std::mem::forget(chan);
            std::mem::forget(child);
            return;
        }
        if let Some(c) = &chan {
            let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if let Ok(bytes) = encode(&(seq, Request::Leave)) {
                let _ = c.send_bytes_now(&bytes, &[]);
            }
        }
        if let Some(mut k) = child {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if !matches!(k.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

/// Starts the helper process (`/proc/self/exe` as [`HELPER_NAME`]) with `chan` as its stdin;
/// it waits for its [`Hello`].
pub fn spawn_process(chan: ControlChannel) -> Result<std::process::Child, HelperError> {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut cmd, HELPER_NAME);
    cmd.stdin(std::process::Stdio::from(chan.into_fd())).stdout(std::process::Stdio::null());
    cmd.spawn().map_err(HelperError::Start)
}

/// The launcher's one message to the helper ([`Hello::Split`]), queued before the core exists.
pub fn introduce_split(chan: &ControlChannel) -> Result<(), HelperError> {
    chan.send_bytes_now(&encode(&Hello::Split)?, &[]).map_err(HelperError::Channel)
}

/// Reaps a child the helper created and killed (bounded: it was SIGKILLed).
fn reap(pid: u32) {
    let Ok(p) = libc::pid_t::try_from(pid) else { return };
    let mut status = 0;
    // SAFETY: waitpid on a child of this process (made so by CLONE_PARENT for the core, or the
    // helper's own after a split), writing into a local int.
    unsafe { libc::waitpid(p, &mut status, 0) };
}

/// Reaps a child that has ended, if it has (never waits).
fn reap_now(pid: u32) {
    let Ok(p) = libc::pid_t::try_from(pid) else { return };
    let mut status = 0;
    // SAFETY: waitpid on a child of this process, not waiting, writing into a local int.
    unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) };
}

/// The parent of `pid` (`PPid:` of its status).
fn parent_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// A service's child group name (`console`, `block-ID`, `net-ID`; ids are `[A-Za-z0-9_-]`):
/// letters, digits, `-` and `_`, at most 80 bytes, never the core's group.
fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 80
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && name != crate::cgroup::CORE_CHILD
}

/// The helper process's state.
struct State {
    setup: HelperSetup,
    core: u32,
    /// The services are this process's children (a split, [`crate::pidns`]): it reaps them.
    reaps: bool,
    cgroup: Option<VmCgroup>,
    /// Pidfds of the services it created, by pid.
    children: BTreeMap<u32, OwnedFd>,
    /// The API socket's device and inode when the helper started.
    socket_id: Option<(u64, u64)>,
}

impl State {
    fn refuse(reason: impl Into<String>) -> Reply {
        Reply::Refused { reason: reason.into(), pid: None }
    }

    /// Checks that `pid` is a process of the VM's: a child of the core, or (a split) a live
    /// service this helper created.
    fn of_core(&self, pid: u32) -> bool {
        if self.reaps {
            return self.children.contains_key(&pid) && parent_of(pid) == Some(std::process::id());
        }
        parent_of(pid) == Some(self.core)
    }

    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> (Reply, Option<OwnedFd>) {
        match req {
            Request::Spawn { program } => self.spawn(&program, fds),
            Request::Kill { pid } => (self.kill(pid), None),
            Request::Cgroup(cg) => {
                if self.cgroup.is_some() {
                    return (Self::refuse("the VM's cgroup is already known"), None);
                }
                let expected = crate::cgroup::group_name_of(&self.setup.vm_id, self.core);
                if cg.group() != expected.as_path() {
                    return (Self::refuse(format!("not this VM's cgroup: {}", cg.group().display())), None);
                }
                self.cgroup = Some(cg);
                (Reply::Done, None)
            }
            Request::Place { name, pid } => {
                let Some(cg) = &self.cgroup else { return (Self::refuse("the VM has no cgroup"), None) };
                if !valid_group_name(&name) || !self.of_core(pid) {
                    return (Self::refuse(format!("{name:?}/{pid}: not a service of this VM")), None);
                }
                match cg.place(&name, pid) {
                    Ok(()) => (Reply::Done, None),
                    Err(e) => (Self::refuse(crate::vmm::chain(&e)), None),
                }
            }
            Request::Update { update, guest_ram } => {
                let Some(cg) = &mut self.cgroup else { return (Self::refuse("the VM has no cgroup"), None) };
                match cg.update(&update, guest_ram) {
                    Ok(r) => (Reply::Resources(r), None),
                    Err(e) => (Self::refuse(e.to_string()), None),
                }
            }
            Request::Report { vm, services } => {
                // Only the core's children are read; a pid that is not (an instance that just
                // died, or a lie) is listed with that error and nothing else.
                let (ours, others): (Vec<_>, Vec<_>) = services.into_iter().partition(|(_, pid)| self.of_core(*pid));
                let mut r = crate::isolation::report_of(&vm, self.core, &ours);
                r.jail_root = self.setup.jail_root.as_ref().map(|p| p.display().to_string());
                r.processes.extend(others.into_iter().map(|(role, pid)| crate::isolation::ProcessReport {
                    role,
                    pid,
                    errors: vec!["not a child of the VM's core (gone, or replaced): not read".into()],
                    ..crate::isolation::ProcessReport::default()
                }));
                let host = crate::isolation::host_namespaces();
                r.processes.insert(1, crate::isolation::inspect("helper", std::process::id(), &host));
                if self.reaps {
                    // After a split, the launcher: its parent and the core's.
                    // SAFETY: getppid has no preconditions.
                    let launcher = u32::try_from(unsafe { libc::getppid() }).unwrap_or(0);
                    r.processes.insert(2, crate::isolation::inspect("launcher", launcher, &host));
                }
                (Reply::Report(Box::new(r)), None)
            }
            Request::CpuNs { child } => {
                if child.as_deref().is_some_and(|c| !valid_group_name(c) && c != crate::cgroup::CORE_CHILD) {
                    return (Self::refuse("not a group of this VM"), None);
                }
                (Reply::CpuNs(self.cgroup.as_ref().and_then(|cg| cg.cpu_ns(child.as_deref()))), None)
            }
            Request::OomKills => (Reply::OomKills(self.cgroup.as_ref().and_then(VmCgroup::oom_kills)), None),
            Request::Reap { pid } => (self.reap(pid), None),
            Request::Leave => (Reply::Done, None),
        }
    }

    fn spawn(&mut self, program: &Program, mut fds: Vec<OwnedFd>) -> (Reply, Option<OwnedFd>) {
        if !self.setup.programs.contains(program) {
            return (Self::refuse(format!("{} is not a service program of this VM", program.shown())), None);
        }
        if fds.len() != 1 {
            return (Self::refuse("a spawn needs exactly its control socket"), None);
        }
        // Forget the services that have exited (their pidfd reads as ready); those this helper
        // reaps are forgotten once reaped, unless the table is full.
        if !self.reaps || self.children.len() >= MAX_CHILDREN {
            let reaps = self.reaps;
            self.children.retain(|&pid, fd| {
                let gone = ipc::wait::wait_readable(fd.as_fd(), Duration::ZERO).unwrap_or(true);
                if gone && reaps {
                    reap_now(pid);
                }
                !gone
            });
        }
        if self.children.len() >= MAX_CHILDREN {
            return (Self::refuse("too many live services"), None);
        }
        let ctl = fds.remove(0);
        let how = How { service_ids: self.setup.service_ids, clone_parent: !self.reaps };
        match crate::service::spawn::spawn_as(program, ctl.as_fd(), how) {
            Ok(child) => {
                let (pid, pidfd, jail) = child.into_parts();
                let Ok(keep) = pidfd.try_clone() else {
                    let _ = crate::service::pidfd_signal_kill(pidfd.as_fd());
                    return (Reply::Refused { reason: "dup of the pidfd".into(), pid: Some(pid) }, None);
                };
                self.children.insert(pid, keep);
                (Reply::Spawned { pid, jail, reaped_here: self.reaps }, Some(pidfd))
            }
            Err(e) => {
                let mut pid = match &e {
                    SpawnError::Child { pid, .. } | SpawnError::ExecTimeout { pid, .. } => Some(*pid),
                    SpawnError::IdMap { pid, .. } => Some(*pid),
                    _ => None,
                };
                // Its parent reaps the killed child: here, or (CLONE_PARENT) the core.
                if self.reaps {
                    if let Some(p) = pid.take() {
                        reap(p);
                    }
                }
                (Reply::Refused { reason: crate::vmm::chain(&e), pid }, None)
            }
        }
    }

    /// [`Request::Reap`]: waits (bounded) for the child's pidfd to say it ended, then reaps it.
    fn reap(&mut self, pid: u32) -> Reply {
        if !self.reaps {
            return Self::refuse("the core reaps its services");
        }
        let Some(fd) = self.children.get(&pid) else {
            return Self::refuse(format!("pid {pid} is not a service this helper started (or was reaped)"));
        };
        if !ipc::wait::wait_readable(fd.as_fd(), REAP_LIMIT).unwrap_or(false) {
            return Self::refuse(format!("pid {pid} has not ended within {REAP_LIMIT:?}"));
        }
        let Ok(p) = libc::pid_t::try_from(pid) else { return Self::refuse("bad pid") };
        let mut status = 0;
        // SAFETY: waitpid on a child of this process that has ended (its pidfd said so; it
        // stays a zombie, its pid not reused, until this call), writing into a local int.
        let r = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG) };
        self.children.remove(&pid);
        if r == p {
            Reply::Reaped { status }
        } else {
            Self::refuse(format!("waitpid({pid}): {}", io::Error::last_os_error()))
        }
    }

    fn kill(&mut self, pid: u32) -> Reply {
        let Some(fd) = self.children.get(&pid) else {
            return Self::refuse(format!("pid {pid} is not a service this helper started"));
        };
        match crate::service::pidfd_signal_kill(fd.as_fd()) {
            Ok(()) => Reply::Done,
            Err(e) => Self::refuse(format!("pidfd_send_signal: {e}")),
        }
    }

    /// After the core is gone: the VM's clean-up (see the module docs).
    fn clean_up(&self) -> ExitCode {
        // A split's services are this helper's children: they leave when their control
        // channel closes; any that has not is killed now (the group's grace below covers a
        // VM with a cgroup, this one a VM without).
        if self.reaps {
            for fd in self.children.values() {
                let _ = crate::service::pidfd_signal_kill(fd.as_fd());
            }
        }
        let mut ok = true;
        if let Some(cg) = &self.cgroup {
            ok &= crate::cgroup::clean_up_after(&self.setup.vm_id, cg, GRACE);
        }
        if let (Some(path), Some(id)) = (&self.setup.api_socket, self.socket_id) {
            if file_id(path) == Some(id) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(root) = &self.setup.jail_root {
            // Only what the core made: an operator's files stay, and so does the directory.
            let _ = std::fs::remove_dir(root.join("proc"));
            match std::fs::remove_dir(root) {
                Ok(()) => {
                    if let Some(parent) = root.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    eprintln!("{HELPER_NAME}: VM {}: jail {} left in place: {e}", self.setup.vm_id, root.display())
                }
            }
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Capabilities the helper keeps (linux/capability.h numbers): `CAP_DAC_OVERRIDE` (a cgroup v1
/// hierarchy's root directory is mode 0555: removing the VM's group from it needs it), `CAP_KILL`
/// (a service, another uid), `CAP_SETGID` and `CAP_SETUID` (a new service's id maps to the VM's
/// service ids),
/// `CAP_SETFCAP` (the kernel asks for it to map uid 0, the helper's own, into a new user
/// namespace: the service's root there until its jail switches ids), `CAP_SYS_PTRACE` (the fds,
/// namespaces and root of the VM's processes, which run as other uids or are not dumpable, for
/// the isolation report). It stays uid 0, which owns the cgroup files.
const KEEP_CAPS: [u32; 6] = [1, 5, 6, 7, 19, 31];

/// Narrows the helper once it has its set-up: every capability but [`KEEP_CAPS`] leaves the
/// bounding, permitted, effective and inheritable sets, then the `helper` seccomp filter (and
/// with it `no_new_privs`) is loaded. Services it creates get a full set inside their own user
/// namespace (the kernel resets it there), and the filter stacks under their own.
fn confine() -> Result<(), String> {
    let keep = KEEP_CAPS.iter().fold(0u64, |m, c| m | (1 << c));
    crate::jail::drop_bounding_set(keep).map_err(|e| crate::vmm::chain(&e))?;
    crate::jail::set_capabilities(keep).map_err(|e| crate::vmm::chain(&e))?;
    bulkhead_policies::install(bulkhead_policies::Policy::Helper).map_err(|e| crate::vmm::chain(&e))
}

/// The helper process: `bulkhead-helper`, its stdin the channel to its core. Returns its exit
/// status.
pub fn helper_main() -> ExitCode {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal's disposition to SIG_IGN; no handler runs.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    crate::logger::init(log::LevelFilter::Info);
    // A mount namespace of its own, a copy of the core's: the core's pivot into its jail moves
    // every process whose root is the core's root, and the helper must keep the host's.
    // SAFETY: unshare with a namespace flag only; the helper is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        eprintln!("{HELPER_NAME}: unshare(CLONE_NEWNS): {}", io::Error::last_os_error());
        return ExitCode::from(2);
    }
    // SAFETY: fd 0 is the channel the core gave us as stdin; nothing else in this process owns it.
    let chan = ControlChannel::from_fd(unsafe { OwnedFd::from_raw_fd(0) });
    let say = |msg: &str| eprintln!("{HELPER_NAME}[{}]: {msg}", std::process::id());
    // A split's launcher speaks first (which process is the core); then, or at once, the
    // core sends the set-up. After a split the set-up may come much later (the API waits for
    // a configuration): the helper confines itself first, and waits for as long as the core
    // lives.
    let mut split = false;
    let (setup, _holds) = loop {
        let deadline = Instant::now() + if split { Duration::from_secs(3600) } else { CALL_TIMEOUT };
        let (bytes, fds) = match chan.recv_bytes(deadline) {
            Ok(m) => m,
            Err(ControlError::Timeout) if split => continue,
            // The core ended before it started a VM: nothing to clean up.
            Err(ControlError::Closed) if split => return ExitCode::SUCCESS,
            Err(e) => {
                say(&format!("no set-up from the core: {e}"));
                return ExitCode::from(2);
            }
        };
        match decode::<Hello>(&bytes) {
            Ok(Hello::Split) if !split && fds.is_empty() => {
                if let Err(e) = confine() {
                    say(&format!("cannot confine myself: {e}"));
                    return ExitCode::from(2);
                }
                split = true;
            }
            Ok(Hello::Setup(setup)) => break (*setup, fds),
            Ok(Hello::Split) => {
                say("a second or malformed introduction of the core");
                return ExitCode::from(2);
            }
            Err(e) => {
                say(&format!("bad set-up: {e}"));
                return ExitCode::from(2);
            }
        }
    };
    crate::service::spawn::adopt_sandbox(setup.namespaces, setup.switch_id);
    if !split {
        if let Err(e) = confine() {
            say(&format!("cannot confine myself: {e}"));
            return ExitCode::from(2);
        }
    }
    let core = setup.core_pid;
    let socket_id = setup.api_socket.as_deref().and_then(file_id);
    let mut state = State { setup, core, reaps: split, cgroup: None, children: BTreeMap::new(), socket_id };
    loop {
        let (bytes, fds) = match chan.recv_bytes(Instant::now() + Duration::from_secs(3600)) {
            Ok(m) => m,
            Err(ControlError::Timeout) => continue,
            Err(ControlError::Closed) => break,
            Err(e) => {
                // A message we cannot read (number 0: no caller waits for it); a dead channel
                // ends the loop.
                if chan.send_bytes(&encode(&(0u64, State::refuse(e.to_string()))).unwrap_or_default(), &[]).is_err() {
                    break;
                }
                continue;
            }
        };
        let (seq, req) = match decode::<(u64, Request)>(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let refused = State::refuse(format!("malformed request: {e}"));
                let _ = chan.send_bytes(&encode(&(0u64, refused)).unwrap_or_default(), &[]);
                continue;
            }
        };
        let leave = matches!(req, Request::Leave);
        let (reply, fd) = state.handle(req, fds);
        let out: Vec<BorrowedFd<'_>> = fd.iter().map(AsFd::as_fd).collect();
        // A failed send means the core is gone mid-reply: the next receive sees the close.
        let _ = encode(&(seq, reply)).and_then(|b| chan.send_bytes(&b, &out).map_err(HelperError::Channel));
        if leave {
            return ExitCode::SUCCESS;
        }
    }
    state.clean_up()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_checked() {
        assert!(valid_group_name("block-disk0"));
        assert!(valid_group_name("block-drive_0"));
        assert!(!valid_group_name("../escape"));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name(crate::cgroup::CORE_CHILD));
        assert!(!valid_group_name(&"a".repeat(81)));
        assert!(!valid_group_name("a.b"));
    }

    #[test]
    fn messages_round_trip() {
        let r = (3u64, Request::Place { name: "console".into(), pid: 7 });
        let back: (u64, Request) = decode(&encode(&r).expect("encode")).expect("decode");
        assert!(matches!(back, (3, Request::Place { ref name, pid: 7 }) if name == "console"));
        let u =
            Request::Update { update: Resources { cpu_weight: Some(300), ..Resources::default() }, guest_ram: 1 << 27 };
        let back: Request = decode(&encode(&u).expect("encode")).expect("decode");
        assert!(matches!(back, Request::Update { ref update, .. } if update.cpu_weight == Some(300)));
        assert!(decode::<Request>(&[0xff; 9]).is_err());
    }
}
