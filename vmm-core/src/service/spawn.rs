//! Creating a service process inside its own namespaces with `clone3`, with only the fds it is
//! given, and with its uid/gid maps written by the core.
//!
//! The core is multi-threaded, so between `clone3` and `execve` the child only makes raw,
//! async-signal-safe system calls on data prepared before the clone (no allocation, no locks, no
//! Rust std I/O). The sequence:
//!
//! 1. Parent: path, argv and envp as C strings; `/dev/null`, the control socket, a release pipe
//!    and an error pipe, all moved to fds ≥ 10 with `O_CLOEXEC`; every signal blocked.
//! 2. `clone3(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS|CLONE_NEWNET|
//!    CLONE_PIDFD)`, `exit_signal = SIGCHLD`: the service is pid 1 of its PID namespace *and* the
//!    core's direct child, supervised by the returned pidfd.
//! 3. Child: signal handlers back to default, mask cleared; fd 0/1 = `/dev/null`, fd 2 = the core's
//!    stderr, fd 3 = control socket, everything above 3 close-on-exec; `PR_SET_PDEATHSIG(SIGKILL)`;
//!    it then blocks on the release pipe (EOF instead of a byte means the core died: it exits), and
//!    `execve`s. A failing step writes `(step, errno)` to the error pipe and exits 127.
//! 4. Parent: restores its signal mask, writes `/proc/PID/uid_map`, `setgroups` and `gid_map`,
//!    releases the child and reads the error pipe: EOF means the `execve` succeeded.
//!
//! uid/gid mapping (user namespace): inside 0 → the core's own uid/gid, so the service's jail
//! set-up has capabilities inside its namespaces only. When the core has `CAP_SETUID` and
//! `CAP_SETGID` (root), inside [`SERVICE_ID`] → outside [`SERVICE_ID`] ("nobody") is mapped too and
//! the service switches to it after `pivot_root`; `setgroups` then stays allowed so the service can
//! drop its supplementary groups. Without those capabilities only the single id is mapped and
//! `setgroups` is denied (the kernel requires it), which the log says once.
//!
//! The core tells the service what it set up in the set-up message's typed [`JailPlan`]
//! ([`ServiceChild::jail_plan`]), which `device_services::jail` checks and completes.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::time::Duration;

use ipc::control::{JailPlan, NamespaceSet};

/// The unprivileged uid and gid ("nobody") a service switches to when the core can map it.
pub const SERVICE_ID: u32 = 65534;
/// How long the core waits for a released child to reach `execve`.
const EXEC_TIMEOUT: Duration = Duration::from_secs(5);
/// Lowest fd number the parent moves the child's fds to, so placing 0..=3 clobbers none of them.
const HIGH_FD: libc::c_int = 10;

/// Errors creating a sandboxed service process.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// One or more namespaces cannot be created on this host and insecure mode was not chosen.
    #[error(
        "namespace(s) unavailable on this host: {0}; refusing to start device services without them \
         (pass --insecure-no-sandbox to run them without the namespaces that failed)"
    )]
    NamespacesUnavailable(UnavailableList),
    /// A path, argument or environment entry contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which string.
        what: &'static str,
    },
    /// Preparing the child (pipes, fds) failed.
    #[error("preparing the child: {what}")]
    Prepare {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `clone3` failed.
    #[error("clone3 with namespaces {namespaces}")]
    Clone {
        /// The namespaces asked for.
        namespaces: Namespaces,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the child's uid/gid maps failed.
    #[error("writing {file} of pid {pid}")]
    IdMap {
        /// Which /proc file.
        file: String,
        /// The child.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The child failed a step before `execve` (or `execve` itself).
    #[error("service {} (pid {pid}): {step} failed in the child", path.display())]
    Child {
        /// The binary.
        path: PathBuf,
        /// The child's pid.
        pid: u32,
        /// The step that failed.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The VM's helper did not create it.
    #[error("creating it through the VM's helper")]
    Helper(#[source] Box<crate::helper::HelperError>),
    /// The child neither exec'ed nor reported an error in time.
    #[error("service {} (pid {pid}) did not reach execve within {EXEC_TIMEOUT:?}", path.display())]
    ExecTimeout {
        /// The binary.
        path: PathBuf,
        /// The child's pid.
        pid: u32,
    },
}

/// One Linux namespace a service is created in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// User namespace (`CLONE_NEWUSER`).
    User,
    /// Mount namespace (`CLONE_NEWNS`).
    Mount,
    /// PID namespace (`CLONE_NEWPID`).
    Pid,
    /// System V IPC / POSIX message queue namespace (`CLONE_NEWIPC`).
    Ipc,
    /// Host and domain name namespace (`CLONE_NEWUTS`).
    Uts,
    /// Network namespace (`CLONE_NEWNET`).
    Net,
}

impl Namespace {
    /// Every namespace, user first (the others may need it when the core is unprivileged).
    pub const ALL: [Namespace; 6] =
        [Namespace::User, Namespace::Mount, Namespace::Pid, Namespace::Ipc, Namespace::Uts, Namespace::Net];

    /// The `clone3` flag.
    pub fn flag(self) -> u64 {
        let f = match self {
            Namespace::User => libc::CLONE_NEWUSER,
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Net => libc::CLONE_NEWNET,
        };
        // The flags are positive bit masks.
        f as u64
    }

    /// The name used in `/proc/PID/ns/` and in the jail plan.
    pub fn name(self) -> &'static str {
        match self {
            Namespace::User => "user",
            Namespace::Mount => "mnt",
            Namespace::Pid => "pid",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
            Namespace::Net => "net",
        }
    }
}

/// A set of namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Namespaces(u64);

impl Namespaces {
    /// All six.
    pub fn all() -> Self {
        Self(Namespace::ALL.iter().fold(0, |f, n| f | n.flag()))
    }

    /// Whether `ns` is in the set.
    pub fn contains(self, ns: Namespace) -> bool {
        self.0 & ns.flag() != 0
    }

    /// The set with `ns` added.
    pub fn with(self, ns: Namespace) -> Self {
        Self(self.0 | ns.flag())
    }

    /// The `clone3` flags.
    pub fn flags(self) -> u64 {
        self.0
    }

    /// Members in [`Namespace::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Namespace> {
        Namespace::ALL.into_iter().filter(move |n| self.contains(*n))
    }
}

impl fmt::Display for Namespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Namespace::name).collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// Namespaces the host refused, each with the `clone3` error.
#[derive(Debug, Clone, Default)]
pub struct UnavailableList(pub Vec<(Namespace, i32)>);

impl fmt::Display for UnavailableList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ns, errno)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} (clone3: {})", ns.name(), io::Error::from_raw_os_error(*errno))?;
        }
        Ok(())
    }
}

/// What services are created with, decided once per core process.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Namespaces every service gets.
    pub namespaces: Namespaces,
    /// Namespaces the host refused (non-empty only in insecure mode).
    pub missing: UnavailableList,
    /// Whether the unprivileged [`SERVICE_ID`] is mapped and switched to.
    pub switch_id: bool,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
static PROBED: OnceLock<(Namespaces, UnavailableList)> = OnceLock::new();

/// Probes which namespaces this host lets the core create: all of them in one child first (the
/// usual case: one `clone3`), and only if that fails one at a time (each on top of those that
/// already worked, so an unprivileged core gets the others inside its user namespace). Each try
/// creates a child that exits at once.
pub fn probe_namespaces() -> (Namespaces, UnavailableList) {
    if try_clone(Namespaces::all()).is_ok() {
        return (Namespaces::all(), UnavailableList::default());
    }
    let mut ok = Namespaces::default();
    let mut missing = UnavailableList::default();
    for ns in Namespace::ALL {
        match try_clone(ok.with(ns)) {
            Ok(()) => ok = ok.with(ns),
            Err(e) => missing.0.push((ns, e.raw_os_error().unwrap_or(libc::EINVAL))),
        }
    }
    (ok, missing)
}

fn try_clone(ns: Namespaces) -> io::Result<()> {
    let mut args = CloneArgs { flags: ns.flags(), exit_signal: libc::SIGCHLD as u64, ..CloneArgs::default() };
    let _blocked = SignalsBlocked::new();
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed; no CLONE_VM,
    // so the child gets a copy of the address space and returns here on its own stack copy.
    let pid = unsafe { clone3(&mut args) };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: _exit is async-signal-safe and ends it at once.
        unsafe { libc::_exit(0) };
    }
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut status = 0;
    // Bounded: the child exits immediately. EINTR cannot happen with every signal blocked.
    // SAFETY: waitpid on our own child, writing into a local int.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Ok(())
}

/// [`probe_namespaces`] once per process, remembered. The VMM calls it while it waits for its
/// configuration, so `InstanceStart` does not pay for the probe's children.
pub fn probe_sandbox() -> &'static (Namespaces, UnavailableList) {
    PROBED.get_or_init(probe_namespaces)
}

/// Decides once which namespaces services get. With every namespace available this is the full
/// set. Otherwise it fails naming the namespaces that failed, unless `insecure` (the user passed
/// `--insecure-no-sandbox`): then it logs a loud warning and services start without them (the
/// rest of the jail still applies). A later call returns the first decision.
pub fn init_sandbox(insecure: bool) -> Result<Sandbox, SpawnError> {
    if let Some(s) = SANDBOX.get() {
        return Ok(s.clone());
    }
    let (namespaces, missing) = probe_sandbox().clone();
    if !missing.0.is_empty() {
        if !insecure {
            return Err(SpawnError::NamespacesUnavailable(missing));
        }
        log::warn!(
            "INSECURE (--insecure-no-sandbox): device services run WITHOUT these namespaces: {missing}; \
             a compromised service has more of the host in reach"
        );
    }
    let switch_id = can_switch_ids();
    if !switch_id {
        log::info!(
            "no CAP_SETUID/CAP_SETGID (or uid/gid {SERVICE_ID} unmapped, or setgroups denied): services \
             keep the core's uid/gid (mapped as 0 in their user namespace, with every capability \
             dropped) instead of switching to uid/gid {SERVICE_ID}"
        );
    }
    let s = Sandbox { namespaces, missing, switch_id };
    Ok(SANDBOX.get_or_init(|| s).clone())
}

/// Takes the decision another process made (the core's, for its helper): `namespaces` as
/// [`Namespaces::flags`], and whether services switch to [`SERVICE_ID`]. Spares the helper the
/// probe (a child in every namespace) on the VM's start path. A decision already made stays.
pub fn adopt_sandbox(namespaces: u64, switch_id: bool) -> Sandbox {
    let namespaces = Namespaces(namespaces & Namespaces::all().flags());
    let s = Sandbox { namespaces, missing: UnavailableList::default(), switch_id };
    SANDBOX.get_or_init(|| s).clone()
}

/// Whether services can be given [`SERVICE_ID`]: the core has CAP_SETUID and CAP_SETGID, that id
/// exists in the core's own user namespace, and setgroups is allowed there (a nested core in a
/// user namespace made by an unprivileged user may have none of these).
fn can_switch_ids() -> bool {
    has_setid_caps()
        && id_mapped("/proc/self/uid_map", SERVICE_ID)
        && id_mapped("/proc/self/gid_map", SERVICE_ID)
        && std::fs::read_to_string("/proc/self/setgroups").map_or(true, |s| s.trim() == "allow")
}

/// Whether `id` is inside one of the ranges of a uid_map/gid_map.
fn id_mapped(file: &str, id: u32) -> bool {
    let Ok(map) = std::fs::read_to_string(file) else { return false };
    map.lines().any(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        matches!(f.as_slice(), [inside, _, len] if (*inside..inside.saturating_add(*len)).contains(&u64::from(id)))
    })
}

/// Whether the core has CAP_SETUID and CAP_SETGID in its effective set.
fn has_setid_caps() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_SETGID = 6, CAP_SETUID = 7 (linux/capability.h).
    let need = (1u64 << 6) | (1u64 << 7);
    eff & need == need
}

/// `struct clone_args` of `clone3(2)` (the first version, 64 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// # Safety
/// `args` must describe a fork-like clone (no `CLONE_VM`, no stack): the child then runs on a
/// copy of the caller's memory and must only make async-signal-safe calls until it execs or exits.
unsafe fn clone3(args: &mut CloneArgs) -> libc::c_long {
    // SAFETY: the caller guarantees the flags; the struct is #[repr(C)] and its size is passed.
    unsafe { libc::syscall(libc::SYS_clone3, args as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) }
}

/// Blocks every signal in the calling thread until dropped (restoring the previous mask).
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask initialise and read it.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            Self(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restoring a mask previously returned by pthread_sigmask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// A service process created by [`spawn`]: its pid and pidfd, reaped by [`wait`](Self::wait).
#[derive(Debug)]
pub struct ServiceChild {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    jail: JailPlan,
    /// The helper is its parent and reaps it ([`crate::pidns`]): [`wait`](Self::wait) asks it.
    helper_reaps: bool,
}

impl ServiceChild {
    /// A child the helper created for this process: its pid, the pidfd the helper passed, the
    /// jail it was created in, and who reaps it: this process (`CLONE_PARENT` made it its own
    /// child) or, after a split ([`crate::pidns`]), the helper, its parent.
    pub fn adopted(pid: u32, pidfd: OwnedFd, jail: JailPlan, helper_reaps: bool) -> Self {
        Self { pid, pidfd, status: None, jail, helper_reaps }
    }

    /// What the child was created in: the plan its set-up message carries.
    pub fn jail_plan(&self) -> JailPlan {
        self.jail
    }

    /// The pid: in the PID namespace of the process that created it (the host's after a split,
    /// where the helper creates services).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The pidfd `clone3` returned.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sends `SIGKILL` through the pidfd (never to a recycled pid); through the helper when this
    /// process may no longer signal it (the jailed core, another uid).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        super::kill_service(self.pid, self.pidfd.as_fd())
    }

    /// Gives up the child without killing or reaping it: its pid and pidfd (the helper hands
    /// them to the core, whose child it is).
    pub fn into_parts(self) -> (u32, OwnedFd, JailPlan) {
        (self.pid, self.pidfd, self.jail)
    }

    /// Waits for the child to exit and reaps it (once; later calls return the same status).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        if self.helper_reaps {
            let helper = crate::helper::current().ok_or_else(|| io::Error::other("the privileged helper is gone"))?;
            let s = helper.reap(self.pid)?;
            self.status = Some(s);
            return Ok(s);
        }
        let pid = libc::pid_t::try_from(self.pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            let mut raw = 0;
            // SAFETY: waitpid on our own, not yet reaped child, writing into a local int.
            let r = unsafe { libc::waitpid(pid, &mut raw, 0) };
            if r == pid {
                let s = ExitStatus::from_raw(raw);
                self.status = Some(s);
                return Ok(s);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Steps of the child between `clone3` and `execve`, reported through the error pipe.
const CHILD_STEPS: [&str; 7] = [
    "dup2 of /dev/null to stdin/stdout",
    "dup2 of the control socket to fd 3",
    "prctl(PR_SET_PDEATHSIG)",
    "closing the release pipe's write end",
    "waiting for the release from the core",
    "reading the release byte (the core died)",
    "execve",
];
const STEP_DUP_NULL: u32 = 0;
const STEP_DUP_CTL: u32 = 1;
const STEP_PDEATHSIG: u32 = 2;
const STEP_CLOSE_RELEASE: u32 = 3;
const STEP_RELEASE: u32 = 4;
const STEP_PARENT_GONE: u32 = 5;
const STEP_EXEC: u32 = 6;

/// Everything the child uses, prepared before the clone.
struct ChildPlan {
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    null: RawFd,
    ctl: RawFd,
    release_rd: RawFd,
    release_wr: RawFd,
    err_wr: RawFd,
    empty_mask: libc::sigset_t,
}

fn cstring(bytes: &[u8], what: &'static str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul { what })
}

/// Duplicates `fd` to a new `O_CLOEXEC` fd ≥ [`HIGH_FD`].
fn dup_high(fd: BorrowedFd<'_>, what: &'static str) -> Result<OwnedFd, SpawnError> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed, open fd returns a new fd or -1.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if n < 0 {
        return Err(SpawnError::Prepare { what, source: io::Error::last_os_error() });
    }
    // SAFETY: the kernel just returned this new fd; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn pipe_high(what: &'static str) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Prepare { what, source: e.into() })?;
    Ok((dup_high(r.as_fd(), what)?, dup_high(w.as_fd(), what)?))
}

/// The jail plan for a service created with `sandbox`.
fn jail_plan(sandbox: &Sandbox) -> JailPlan {
    let n = sandbox.namespaces;
    let namespaces = NamespaceSet {
        user: n.contains(Namespace::User),
        mnt: n.contains(Namespace::Mount),
        pid: n.contains(Namespace::Pid),
        ipc: n.contains(Namespace::Ipc),
        uts: n.contains(Namespace::Uts),
        net: n.contains(Namespace::Net),
    };
    JailPlan::Created { namespaces, switch_to: sandbox.switch_id.then_some((SERVICE_ID, SERVICE_ID)) }
}

/// How a service is created, past what [`init_sandbox`] decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct How {
    /// The `(uid, gid)` outside its user namespace that the service's unprivileged ids map to
    /// (default: [`SERVICE_ID`] itself). The helper gives each VM's services ids of their own.
    pub service_ids: Option<(u32, u32)>,
    /// `CLONE_PARENT`: the child becomes the caller's parent's child (the helper creates
    /// services for its core this way, so the core supervises and reaps them).
    pub clone_parent: bool,
}

/// Creates the service process running `program` (see the module docs), with `ctl` as its fd 3, in the
/// namespaces of the [`init_sandbox`] decision (strict if none was made). Returns once the child
/// has exec'ed.
pub fn spawn(program: &super::Program, ctl: BorrowedFd<'_>) -> Result<ServiceChild, SpawnError> {
    spawn_as(program, ctl, How::default())
}

/// [`spawn`], the way `how` says.
pub fn spawn_as(program: &super::Program, ctl: BorrowedFd<'_>, how: How) -> Result<ServiceChild, SpawnError> {
    let sandbox = init_sandbox(false)?;
    let binary = program.path.as_path();
    let path = cstring(binary.as_os_str().as_bytes(), "the service path")?;
    let argv0 = cstring(program.argv0.as_bytes(), "the service name")?;
    let args = [argv0, cstring(b"--control-fd", "an argument")?, cstring(b"3", "an argument")?];
    // An empty environment: a service reads none, and the core's (paths, tokens, whatever the
    // operator's shell held) is none of its business.
    let env: Vec<CString> = Vec::new();

    let null =
        std::fs::File::open("/dev/null").map_err(|source| SpawnError::Prepare { what: "open /dev/null", source })?;
    let null = dup_high(null.as_fd(), "dup /dev/null")?;
    let ctl = dup_high(ctl, "dup the control socket")?;
    let (release_rd, release_wr) = pipe_high("release pipe")?;
    let (err_rd, err_wr) = pipe_high("error pipe")?;

    let mut plan = ChildPlan {
        path,
        argv: args.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        envp: env.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        null: null.as_raw_fd(),
        ctl: ctl.as_raw_fd(),
        release_rd: release_rd.as_raw_fd(),
        release_wr: release_wr.as_raw_fd(),
        err_wr: err_wr.as_raw_fd(),
        // SAFETY: sigset_t is plain data, initialised by sigemptyset just below.
        empty_mask: unsafe { std::mem::zeroed() },
    };
    // SAFETY: initialising a local sigset_t.
    unsafe { libc::sigemptyset(&mut plan.empty_mask) };

    let mut pidfd: libc::c_int = -1;
    let mut cargs = CloneArgs {
        flags: sandbox.namespaces.flags()
            | libc::CLONE_PIDFD as u64
            | if how.clone_parent { libc::CLONE_PARENT as u64 } else { 0 },
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        // With CLONE_PARENT the kernel takes the caller's own exit signal (SIGCHLD for the
        // helper) and refuses any other.
        exit_signal: if how.clone_parent { 0 } else { libc::SIGCHLD as u64 },
        ..CloneArgs::default()
    };
    let blocked = SignalsBlocked::new();
    // SAFETY: a fork-like clone3 (no CLONE_VM, no stack); the child only runs `child_main`, which
    // makes async-signal-safe system calls on `plan` (prepared above, not modified after) and
    // never returns.
    let pid = unsafe { clone3(&mut cargs) };
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; see child_main's contract.
        unsafe { child_main(&plan) };
    }
    let clone_error = io::Error::last_os_error();
    drop(blocked);
    if pid < 0 {
        return Err(SpawnError::Clone { namespaces: sandbox.namespaces, source: clone_error });
    }
    let pid = u32::try_from(pid).map_err(|_| SpawnError::Clone {
        namespaces: sandbox.namespaces,
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd (O_CLOEXEC) here; we own it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut child = ServiceChild { pid, pidfd, status: None, jail: jail_plan(&sandbox), helper_reaps: false };
    // The child's copies only: the parent keeps release_wr and err_rd.
    drop((null, ctl, release_rd, err_wr));

    let fail = |child: &mut ServiceChild, e: SpawnError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    if sandbox.namespaces.contains(Namespace::User) {
        if let Err(e) = write_id_maps(pid, sandbox.switch_id, how.service_ids) {
            return Err(fail(&mut child, e));
        }
    }
    // Release the child.
    let released = nix::unistd::write(&release_wr, &[1u8]);
    drop(release_wr);
    if let Err(e) = released {
        return Err(fail(
            &mut child,
            SpawnError::Child {
                path: binary.to_path_buf(),
                pid,
                step: CHILD_STEPS[STEP_RELEASE as usize],
                source: e.into(),
            },
        ));
    }
    match read_child_error(&err_rd) {
        Ok(None) => Ok(child),
        Ok(Some((step, errno))) => {
            let step = CHILD_STEPS.get(step as usize).copied().unwrap_or("an unknown step");
            let source = io::Error::from_raw_os_error(errno);
            Err(fail(&mut child, SpawnError::Child { path: binary.to_path_buf(), pid, step, source }))
        }
        Err(()) => Err(fail(&mut child, SpawnError::ExecTimeout { path: binary.to_path_buf(), pid })),
    }
}

/// Writes uid_map, setgroups and gid_map of `pid`'s user namespace: inside 0 → the caller's
/// ids; with `switch_id`, inside [`SERVICE_ID`] → `service` (default [`SERVICE_ID`]).
fn write_id_maps(pid: u32, switch_id: bool, service: Option<(u32, u32)>) -> Result<(), SpawnError> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let (svc_uid, svc_gid) = service.unwrap_or((SERVICE_ID, SERVICE_ID));
    let map = |own: u32, svc: u32| {
        let mut m = format!("0 {own} 1\n");
        if switch_id && own != svc {
            m.push_str(&format!("{SERVICE_ID} {svc} 1\n"));
        }
        m
    };
    let write = |file: &str, data: &str| {
        std::fs::write(format!("/proc/{pid}/{file}"), data).map_err(|source| SpawnError::IdMap {
            file: file.to_string(),
            pid,
            source,
        })
    };
    write("uid_map", &map(uid, svc_uid))?;
    if !switch_id {
        // Required before an unprivileged process may write gid_map.
        write("setgroups", "deny")?;
    }
    write("gid_map", &map(gid, svc_gid))
}

/// Waits (bounded) on the error pipe: `Ok(None)` at EOF (the child exec'ed), `Ok(Some)` with the
/// child's report, `Err` on timeout or a short report.
fn read_child_error(err_rd: &OwnedFd) -> Result<Option<(u32, i32)>, ()> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    let deadline = std::time::Instant::now() + EXEC_TIMEOUT;
    // Bounded: each round reads at least one byte, reaches EOF or hits the deadline.
    while got < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !ipc::wait::wait_readable(err_rd.as_fd(), left).map_err(|_| ())? {
            return Err(());
        }
        match nix::unistd::read(err_rd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(nix::Error::EINTR) => {}
            Err(_) => return Err(()),
        }
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Ok(Some((step, errno)))
}

/// Reports `(step, errno)` on the error pipe and exits.
///
/// # Safety
/// Only in the cloned child, with `err_wr` its error pipe.
unsafe fn child_fail(err_wr: RawFd, step: u32) -> ! {
    // SAFETY: errno location read, write of a local buffer and _exit: all async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        let s = step.to_ne_bytes();
        let e = errno.to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            buf[i] = s[i];
            buf[i + 4] = e[i];
            i += 1;
        }
        libc::write(err_wr, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child between `clone3` and `execve`.
///
/// # Safety
/// Only in the child of a fork-like `clone3`, with every signal blocked. Makes only raw,
/// async-signal-safe system calls on `plan` (no allocation, no locks) and never returns.
unsafe fn child_main(plan: &ChildPlan) -> ! {
    // SAFETY: every call below is an async-signal-safe system call wrapper on fds and memory
    // prepared before the clone (the child's copy of them).
    unsafe {
        // Signal handlers of the core must not run here, nor stay installed; the core's mask
        // (everything blocked around the clone) must not reach the service.
        let mut sig = 1;
        while sig < 65 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if sig != libc::SIGKILL
                && sig != libc::SIGSTOP
                && libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && ((old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN) || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
            sig += 1;
        }
        libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, std::ptr::null_mut());

        if libc::dup2(plan.null, 0) < 0 || libc::dup2(plan.null, 1) < 0 {
            child_fail(plan.err_wr, STEP_DUP_NULL);
        }
        if libc::dup2(plan.ctl, 3) < 0 {
            child_fail(plan.err_wr, STEP_DUP_CTL);
        }
        // Every fd above 3 goes at exec (the pipes are CLOEXEC already and still needed here).
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
            let mut fd = 4;
            while fd < 65536 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                fd += 1;
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            child_fail(plan.err_wr, STEP_PDEATHSIG);
        }
        // Our copy of the write end must go, so that the core's death reads as EOF.
        if libc::close(plan.release_wr) != 0 {
            child_fail(plan.err_wr, STEP_CLOSE_RELEASE);
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(plan.release_rd, (&mut byte as *mut u8).cast(), 1);
            if n == 1 {
                break;
            }
            if n == 0 {
                // The core died before releasing us (PDEATHSIG may have been set too late).
                child_fail(plan.err_wr, STEP_PARENT_GONE);
            }
            if *libc::__errno_location() != libc::EINTR {
                child_fail(plan.err_wr, STEP_RELEASE);
            }
        }
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        child_fail(plan.err_wr, STEP_EXEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_set_display_and_flags() {
        let all = Namespaces::all();
        assert_eq!(all.to_string(), "user,mnt,pid,ipc,uts,net");
        assert_eq!(Namespaces::default().to_string(), "(none)");
        let some = Namespaces::default().with(Namespace::Pid).with(Namespace::User);
        assert_eq!(some.to_string(), "user,pid");
        assert!(some.contains(Namespace::Pid) && !some.contains(Namespace::Net));
        assert_eq!(some.flags(), (libc::CLONE_NEWPID | libc::CLONE_NEWUSER) as u64);
    }

    #[test]
    fn jail_plan_names_namespaces_and_ids() {
        let s = Sandbox { namespaces: Namespaces::all(), missing: UnavailableList::default(), switch_id: true };
        assert_eq!(
            jail_plan(&s),
            JailPlan::Created { namespaces: NamespaceSet::ALL, switch_to: Some((SERVICE_ID, SERVICE_ID)) }
        );
        let some = Namespaces::default().with(Namespace::Pid).with(Namespace::Net);
        let s = Sandbox { namespaces: some, missing: UnavailableList::default(), switch_id: false };
        let want = NamespaceSet { pid: true, net: true, ..NamespaceSet::default() };
        assert_eq!(jail_plan(&s), JailPlan::Created { namespaces: want, switch_to: None });
    }

    #[test]
    fn unavailable_list_names_each_namespace_and_error() {
        let l = UnavailableList(vec![(Namespace::Net, libc::EPERM), (Namespace::User, libc::ENOSPC)]);
        let s = SpawnError::NamespacesUnavailable(l).to_string();
        assert!(s.contains("net (clone3: Operation not permitted"), "{s}");
        assert!(s.contains("user (clone3: No space left on device"), "{s}");
        assert!(s.contains("--insecure-no-sandbox"), "{s}");
    }

    #[test]
    fn this_host_offers_every_namespace() {
        // The project's machines (and CI) support all six; a host that does not is what
        // --insecure-no-sandbox is for, and this test names which one is missing.
        let (ok, missing) = probe_namespaces();
        assert!(missing.0.is_empty(), "unavailable: {missing}");
        assert_eq!(ok, Namespaces::all());
    }
}
