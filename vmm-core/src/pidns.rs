//! The core's own PID namespace, and the two processes that stay outside it.
//!
//! When `bulkhead` starts as root with its jail on, its very first step (before any thread
//! exists) splits it in three:
//!
//! ```text
//! bulkhead           the launcher: the pid the orchestrator started       host PID namespace
//! ├── bulkhead-helper  the VM's privileged helper                          host PID namespace
//! │   └── bulkhead-console, bulkhead-block, ...  its children, each pid 1 of a namespace of its own
//! └── bulkhead       the core: pid 1 of a PID namespace of its own
//! ```
//!
//! - **The core** sees no other process: its `/proc` (the one its jail mounts) shows only its
//!   own namespace, where it is alone, and a pid it names means nothing outside it. It keeps
//!   its host pid for what operators see (logs, the API, names made from it: [`host_pid`]);
//!   the pids of its services it holds are host pids, used only through the pidfds and the
//!   helper.
//! - **The helper** must outlive the core to clean up after it (a PID namespace's processes all
//!   die with its init), so it is the launcher's child, started once the core is forked, in the
//!   host's namespace again (the launcher `setns`es back to its own). The services are the helper's children, each in a
//!   PID namespace of its own (as before the split: the kernel lets a process that entered
//!   another namespace for its children create no new one, so they are not put in the core's):
//!   it reaps them and tells the core how each ended. They end with the core: their control
//!   channel closes, and the helper kills any left when it sees the core gone.
//! - **The launcher** does nothing but wait: it forwards the termination signals to the core,
//!   and when the core ends, exits as it did (its exit code, or the same signal). It keeps only
//!   `CAP_KILL` (the core runs as another uid after its drop). It waits in a program of its own
//!   ([`LAUNCHER_IMAGE`], `vmm-core/launcher/launcher.rs`): a few KiB, where a fresh image of
//!   `bulkhead` kept ~170 KiB per VM. If the launcher is killed, the
//!   kernel kills the core (`PR_SET_PDEATHSIG`), with it every service, and the helper, seeing
//!   the core's end of its channel close, cleans up as after any end of the core.
//!
//! Without root, or with `--no-jail`, there is no split: one process, as before.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

use ipc::control::ControlChannel;

/// Errors of the split.
#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    /// A system call of the split failed.
    #[error("PID namespace: {step}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper could not be started or told which process is the core.
    #[error("PID namespace: the privileged helper")]
    Helper(#[source] crate::helper::HelperError),
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> PidNsError {
    move |source| PidNsError::Step { step, source }
}

fn check(rc: libc::c_long, name: &'static str) -> Result<libc::c_long, PidNsError> {
    if rc < 0 {
        Err(PidNsError::Step { step: name, source: io::Error::last_os_error() })
    } else {
        Ok(rc)
    }
}

/// The helper the launcher starts for the core: the core's end of its channel.
#[derive(Debug)]
pub struct Prestarted {
    /// The core's end of the helper's channel.
    pub chan: ControlChannel,
}

static PRESTARTED: Mutex<Option<Prestarted>> = Mutex::new(None);
/// The read end of the launcher's liveness pipe (the core of a split).
static LAUNCHER_ALIVE: OnceLock<OwnedFd> = OnceLock::new();
static HOST_PID: OnceLock<u32> = OnceLock::new();
/// The core's pid, for the launcher's signal forwarding.
static CORE: AtomicI32 = AtomicI32::new(0);

/// This process's pid in the host's PID namespace: what logs, the API and names made from a
/// pid use. The core in its own namespace is pid 1 there.
pub fn host_pid() -> u32 {
    HOST_PID.get().copied().unwrap_or_else(std::process::id)
}

/// Whether this process is the core of a split, in a PID namespace of its own.
pub fn in_own_pid_namespace() -> bool {
    HOST_PID.get().is_some()
}

/// The helper the launcher started (once; `None` without a split or once taken).
pub fn take_helper() -> Option<Prestarted> {
    PRESTARTED.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The helper of a split: started before the fork (the launcher may not take its children back
/// to its own PID namespace), or to be started after it, on this end of its channel.
enum HelperStart {
    Started(std::process::Child),
    AfterFork(ControlChannel),
}

/// The split (see the module docs). Returns in the core only; the launcher never returns from
/// here (it exits with the core's status). Call it first, while the process has one thread.
///
/// The core is forked first, so that starting the helper (a `fork` and `execve`) is not on its
/// way: the launcher then takes its children back to the host's PID namespace (`setns` to its
/// own) and starts the helper. The helper's first message ([`crate::helper::Hello::Split`]) is
/// queued before the fork, so it precedes anything the core sends.
pub fn split() -> Result<(), PidNsError> {
    let (core_end, helper_end) = ControlChannel::pair().map_err(|e| step("socketpair")(io::Error::other(e)))?;
    crate::helper::introduce_split(&core_end).map_err(PidNsError::Helper)?;
    let own_ns = std::fs::File::open("/proc/self/ns/pid").map_err(step("opening /proc/self/ns/pid"))?;
    // Whether the launcher may take its children back to its own namespace after the fork (not
    // as root of a user namespace, which does not own the host's PID namespace): a `setns` to
    // where it is changes nothing. If it may not, the helper starts first.
    // SAFETY: setns with an fd we own and a namespace flag.
    let may_return = unsafe { libc::setns(own_ns.as_raw_fd(), libc::CLONE_NEWPID) } == 0;
    let helper = if may_return {
        HelperStart::AfterFork(helper_end)
    } else {
        HelperStart::Started(crate::helper::spawn_process(helper_end).map_err(PidNsError::Helper)?)
    };
    // The launcher holds the write end for its whole life and never writes: the core sees it
    // close when the launcher is gone (the parent-death signal only covers a death after it is
    // set).
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }.into(), "pipe2")?;
    // SAFETY: pipe2 just returned these two fds; nothing else owns them.
    let (alive_r, alive_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: unshare with a namespace flag only: the next child is created in a new PID
    // namespace; this process stays where it is.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }.into(), "unshare(CLONE_NEWPID)")?;
    // SAFETY: the process has one thread (the caller's contract), so the child may go on
    // running Rust code.
    let pid = check(unsafe { libc::fork() }.into(), "fork of the core")?;
    if pid == 0 {
        // The helper, if it started first, is the launcher's to keep (dropping a `Child` neither
        // waits for nor signals it).
        drop((alive_w, helper, own_ns));
        return core_side(alive_r, core_end);
    }
    drop((alive_r, core_end));
    let core = libc::pid_t::try_from(pid).unwrap_or(0);
    // Forward at once: the handlers `bulkhead` installed would keep a signal for this process,
    // and the core is already serving (its API socket may be up before the helper is).
    CORE.store(core, Ordering::SeqCst);
    install_forwarding();
    let helper = match helper {
        HelperStart::Started(h) => Ok(h),
        HelperStart::AfterFork(end) => {
            // SAFETY: setns with an fd we own and a namespace flag: the children this process
            // creates from now on go to its own PID namespace again.
            let rc = unsafe { libc::setns(own_ns.as_raw_fd(), libc::CLONE_NEWPID) };
            check(rc.into(), "setns to the host's PID namespace")
                .and_then(|_| crate::helper::spawn_process(end).map_err(PidNsError::Helper))
        }
    };
    drop(own_ns);
    match helper {
        // The helper outlives the launcher's image: its `Child` is never waited for here.
        Ok(h) => drop(h),
        Err(e) => {
            eprintln!("bulkhead: error: {}", crate::vmm::chain(&e));
            // SAFETY: kill with integers only; the core is our child.
            unsafe { libc::kill(core, libc::SIGKILL) };
        }
    }
    launcher(core, alive_w)
}

/// The core's first steps after the fork: die with the launcher, note the host pid and the
/// helper's channel.
fn core_side(alive: OwnedFd, chan: ControlChannel) -> Result<(), PidNsError> {
    let _ = LAUNCHER_ALIVE.set(alive);
    rearm_parent_death()?;
    // `/proc` is still the host's: its `self` is this process's host pid.
    let host: u32 = std::fs::read_link("/proc/self")
        .map_err(step("readlink /proc/self"))?
        .to_string_lossy()
        .parse()
        .map_err(|_| step("parsing /proc/self")(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let _ = HOST_PID.set(host);
    *PRESTARTED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Prestarted { chan });
    Ok(())
}

/// Sets the core's parent-death signal (SIGKILL when the launcher dies), and ends the core at
/// once if the launcher is already gone. At the split, and again after the core's id change,
/// which clears it. Nothing without a split.
pub fn rearm_parent_death() -> Result<(), PidNsError> {
    let Some(alive) = LAUNCHER_ALIVE.get() else { return Ok(()) };
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into(), "PR_SET_PDEATHSIG")?;
    // The launcher never writes: readable means its end closed, it died before the signal
    // was set.
    if ipc::wait::wait_readable(alive.as_fd(), std::time::Duration::ZERO).unwrap_or(true) {
        // SAFETY: _exit ends this process at once; the helper cleans up after it.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

extern "C" fn forward(sig: libc::c_int) {
    let core = CORE.load(Ordering::Relaxed);
    if core > 0 {
        // SAFETY: kill is async-signal-safe; it takes integers only.
        unsafe { libc::kill(core, sig) };
    }
}

/// The signals the launcher passes on to the core (those the core acts on, and the usual
/// ones a supervisor sends).
const FORWARDED: [libc::c_int; 6] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// `CAP_KILL`: the only capability the launcher keeps.
const CAP_KILL: u64 = 1 << 5;

/// The `argv[0]` the launcher runs under once it has replaced its image.
pub const LAUNCHER_NAME: &str = "bulkhead-launcher";

/// The launcher as a program of its own (`vmm-core/launcher/launcher.rs`, compiled by
/// `build.rs`): a few KiB with no libc and no writable data, which waits as [`wait_for_core`]
/// does. Empty where it is not built.
pub const LAUNCHER_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bulkhead-launcher"));

/// The launcher: waits ([`wait_for_core`]) in a fresh image (`bulkhead-launcher CORE_PID
/// ALIVE_FD`): what `bulkhead` had touched before the split (argument parsing, the configuration)
/// would otherwise stay in its memory for the VM's life. The image is [`LAUNCHER_IMAGE`], run
/// from a sealed memfd (a few pages of its own); where the host does not let a memfd be
/// executed, this executable again ([`launcher_main`], ~140 KiB of its own); if that `execve`
/// fails too, it waits as it is.
fn launcher(core: libc::pid_t, alive: OwnedFd) -> ! {
    // The signals to forward wait, blocked, across the exec (the mask survives it) until the
    // new image reads or handles them; if the exec fails, the handlers installed at the fork
    // take them.
    let blocked = forwarded_set();
    // SAFETY: changing this thread's signal mask with a set we built.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut()) };
    let fd = alive.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC of an fd we own, so the new image keeps it.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0 {
        let args = [LAUNCHER_NAME.to_string(), core.to_string(), fd.to_string()];
        let args: Vec<std::ffi::CString> =
            args.iter().filter_map(|a| std::ffi::CString::new(a.as_str()).ok()).collect();
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        match exec_image(&args) {
            Ok(never) => match never {},
            Err(e) => eprintln!("bulkhead: the launcher runs as bulkhead again: {e}"),
        }
        // SAFETY: execv with a NUL-terminated path and a NULL-terminated argv of C strings that
        // outlive the call (std's exec would clear the signal mask).
        unsafe { libc::execv(c"/proc/self/exe".as_ptr(), argv.as_ptr()) };
        eprintln!("bulkhead: warning: the launcher waits in its first image: execve: {}", io::Error::last_os_error());
    }
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &blocked, std::ptr::null_mut()) };
    wait_for_core(core, alive)
}

/// `MFD_EXEC`: a memfd that may be executed, asked for explicitly (Linux 6.3+; a host with
/// `vm.memfd_noexec = 1` seals memfds against it by default). Not among nix's flags yet.
const MFD_EXEC: libc::c_uint = 0x10;

/// [`LAUNCHER_IMAGE`] in a memfd sealed against any change, opened read-only (no writer left
/// to make an `execve` of it fail with `ETXTBSY`).
fn launcher_memfd() -> io::Result<OwnedFd> {
    if LAUNCHER_IMAGE.is_empty() {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "no launcher image in this build"));
    }
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
    let fd = match memfd_create(c"bulkhead-launcher", flags | MemFdCreateFlag::from_bits_retain(MFD_EXEC)) {
        // A kernel before MFD_EXEC: its memfds are executable.
        Err(nix::errno::Errno::EINVAL) => memfd_create(c"bulkhead-launcher", flags)?,
        r => r?,
    };
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, LAUNCHER_IMAGE)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl(F_ADD_SEALS) on an fd we own, with seal flags.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let ro = std::fs::OpenOptions::new().read(true).open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    Ok(ro.into())
}

/// Runs [`LAUNCHER_IMAGE`] in this process with `args` and an empty environment. Returns only
/// on failure.
fn exec_image(args: &[std::ffi::CString]) -> io::Result<std::convert::Infallible> {
    let image = launcher_memfd()?;
    // The fd is close-on-exec: the kernel holds the file for the new image.
    let none: [&std::ffi::CStr; 0] = [];
    Ok(nix::unistd::execveat(Some(image.as_raw_fd()), c"", args, &none, nix::fcntl::AtFlags::AT_EMPTY_PATH)?)
}

/// `bulkhead-launcher CORE_PID ALIVE_FD`: the launcher's fresh image ([`launcher`]).
pub fn launcher_main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(core), Some(fd), 2) = (
        args.first().and_then(|a| a.parse::<libc::pid_t>().ok()).filter(|p| *p > 0),
        args.get(1).and_then(|a| a.parse::<RawFd>().ok()).filter(|f| *f > 2),
        args.len(),
    ) else {
        eprintln!("{LAUNCHER_NAME}: started by bulkhead only (CORE_PID ALIVE_FD)");
        return std::process::ExitCode::from(2);
    };
    // Only its own child: signals go nowhere else.
    // SAFETY: a siginfo_t is plain data; waitid fills it (WNOWAIT: the child stays as it is).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with a pid, a local siginfo and flags; reaps nothing.
    let rc = unsafe {
        libc::waitid(libc::P_PID, core as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    if rc != 0 {
        eprintln!("{LAUNCHER_NAME}: {core} is not my child");
        return std::process::ExitCode::from(2);
    }
    CORE.store(core, Ordering::SeqCst);
    install_forwarding();
    let blocked = forwarded_set();
    // SAFETY: changing this thread's signal mask with a set we built: what came during the
    // exec is delivered now, to the handlers.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &blocked, std::ptr::null_mut()) };
    // SAFETY: the fd the first image passed, open across the exec and owned by nothing else
    // here; checked to be open first.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        eprintln!("{LAUNCHER_NAME}: fd {fd} is not open");
        return std::process::ExitCode::from(2);
    }
    // SAFETY: as above.
    let alive = unsafe { OwnedFd::from_raw_fd(fd) };
    wait_for_core(core, alive)
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: a sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset/sigaddset on a local set.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

fn install_forwarding() {
    for sig in FORWARDED {
        // SAFETY: a plain handler that only calls kill (async-signal-safe); SA_RESTART keeps
        // waitpid going.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Waits for the core, forwarding signals to it, and exits as it did. Keeps only `CAP_KILL`.
fn wait_for_core(core: libc::pid_t, alive: OwnedFd) -> ! {
    // Narrowed: it only signals the core from here on.
    if let Err(e) = crate::jail::drop_bounding_set(CAP_KILL).and_then(|()| crate::jail::set_capabilities(CAP_KILL)) {
        eprintln!("bulkhead: warning: the launcher keeps its capabilities: {}", crate::vmm::chain(&e));
    }
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    let mut raw = 0;
    loop {
        // SAFETY: waitpid on our own child, writing into a local int.
        let r = unsafe { libc::waitpid(core, &mut raw, 0) };
        if r == core {
            break;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!("bulkhead: error: waiting for the core: {}", io::Error::last_os_error());
            std::process::exit(70);
        }
    }
    drop(alive);
    if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        // Ends as the core did: the same signal, its default action.
        // SAFETY: resetting a disposition, unblocking and raising a signal: integers only.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(libc::WEXITSTATUS(raw));
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    /// The sealed launcher image as a path a child can execute (this process holds the fd).
    fn image() -> (OwnedFd, String) {
        let fd = launcher_memfd().expect("launcher memfd");
        let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
        (fd, path)
    }

    /// A field of `/proc/PID/status`.
    fn status_field(pid: u32, name: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_string()))
    }

    /// `sh` starts `child` in the background and becomes the launcher of it (its parent), with
    /// fd 3 open as the liveness fd; returns once the launcher is waiting (`no_new_privs` is its
    /// last step before its loop).
    fn launch(child: &str) -> (Child, OwnedFd) {
        let (fd, path) = image();
        let script = format!("{child} & exec \"$0\" \"$!\" 3 3</dev/null");
        let launcher = Command::new("sh")
            .args(["-c", &script, &path])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        let t = Instant::now();
        while status_field(launcher.id(), "NoNewPrivs").as_deref() != Some("1") {
            assert!(t.elapsed() < Duration::from_secs(10), "the launcher never got to its wait");
            std::thread::sleep(Duration::from_millis(5));
        }
        (launcher, fd)
    }

    fn signal(child: &Child, sig: libc::c_int) {
        // SAFETY: kill with integers only, to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
    }

    #[test]
    fn the_launcher_image_is_small_and_writes_nothing_of_its_own() {
        assert!(!LAUNCHER_IMAGE.is_empty(), "built for x86_64 Linux");
        assert!(LAUNCHER_IMAGE.len() < 16 << 10, "{} bytes", LAUNCHER_IMAGE.len());
        assert_eq!(&LAUNCHER_IMAGE[..4], b"\x7fELF");
        // ET_EXEC: position-dependent, nothing to relocate.
        assert_eq!(u16::from_le_bytes([LAUNCHER_IMAGE[16], LAUNCHER_IMAGE[17]]), 2);
        // No program header maps anything writable (PT_LOAD with PF_W).
        let phoff = usize::try_from(u64::from_le_bytes(LAUNCHER_IMAGE[32..40].try_into().expect("8"))).expect("fits");
        let phnum = usize::from(u16::from_le_bytes([LAUNCHER_IMAGE[56], LAUNCHER_IMAGE[57]]));
        for i in 0..phnum {
            let ph = &LAUNCHER_IMAGE[phoff + i * 56..phoff + (i + 1) * 56];
            let (kind, flags) = (u32::from_le_bytes(ph[0..4].try_into().expect("4")), ph[4]);
            assert!(!(kind == 1 && flags & 2 != 0), "program header {i} is a writable load");
        }
    }

    #[test]
    fn the_launcher_refuses_what_bulkhead_would_not_pass() {
        let (_fd, path) = image();
        for args in [&[][..], &["1"], &["12", "2"], &["x", "5"], &["99999999999", "5"], &["1", "5", "6"]] {
            let out = Command::new(&path).args(args).stderr(Stdio::piped()).output().expect("run");
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(String::from_utf8_lossy(&out.stderr).starts_with("bulkhead-launcher: "), "{args:?}");
        }
        // A pid that is not its child, and a liveness fd that is not open.
        let out = Command::new(&path).args(["1", "3"]).stderr(Stdio::piped()).output().expect("run");
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not my child"), "{out:?}");
    }

    #[test]
    fn the_launcher_forwards_a_signal_and_exits_as_its_core_did() {
        // The core stands in: it ends with 7 when SIGUSR1 reaches it.
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let core = format!("sh -c 'trap \"kill $p; exit 7\" USR1; sleep 30 & p=$!; : > {}; wait $p'", ready.display());
        let (mut launcher, _fd) = launch(&core);
        let t = Instant::now();
        while !ready.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "the stand-in core never got ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        if nix::unistd::geteuid().is_root() {
            assert_eq!(status_field(launcher.id(), "CapEff").as_deref(), Some("0000000000000020"));
            assert_eq!(status_field(launcher.id(), "CapBnd").as_deref(), Some("0000000000000020"));
            assert_eq!(status_field(launcher.id(), "CapInh").as_deref(), Some("0000000000000000"));
        }
        signal(&launcher, libc::SIGUSR1);
        let status = launcher.wait().expect("wait");
        assert_eq!(status.code(), Some(7), "{status:?}");
    }

    #[test]
    fn the_launcher_ends_by_the_signal_that_ended_its_core() {
        let (mut launcher, _fd) = launch("sleep 30");
        signal(&launcher, libc::SIGTERM);
        let status = launcher.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
        // A signal it does not forward (SIGWINCH) is read and dropped; it goes on waiting.
        let (mut launcher, _fd) = launch("sleep 30");
        signal(&launcher, libc::SIGWINCH);
        std::thread::sleep(Duration::from_millis(50));
        assert!(launcher.try_wait().expect("try_wait").is_none(), "still waiting");
        // (Not SIGINT: `sh` starts a background command with SIGINT ignored.)
        signal(&launcher, libc::SIGHUP);
        assert_eq!(launcher.wait().expect("wait").signal(), Some(libc::SIGHUP));
    }
}
