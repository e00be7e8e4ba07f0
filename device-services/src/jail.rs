//! Confinement of a service process, entered after set-up and before it touches guest data.
//!
//! The core creates every service with `clone3` in new user, mount, PID, IPC, UTS and network
//! namespaces and writes its uid/gid maps (inside 0 → the core's ids, and inside 65534 → outside
//! 65534 when the core is root). It describes what it did in the set-up message's typed
//! [`JailPlan`] (`Created { namespaces, switch_to }`). [`enter`] then runs these steps, in this
//! order, each failing with the step's name:
//!
//! 1. **fds**: close every fd above 2 the service did not declare ([`close_other_fds`]).
//! 2. **namespaces**: check the ones the core announced (pid 1 in a new PID namespace, a
//!    non-identity uid map in a new user namespace). A service started by something other than
//!    the core (a test harness: [`JailPlan::Standalone`]) `unshare`s user, mount, IPC, UTS and
//!    network namespaces itself and maps only its own ids; only the PID namespace needs the
//!    core's `clone3`.
//! 3. **empty root**: `/` private recursively, a tiny `nosuid,nodev,noexec` tmpfs mounted,
//!    `pivot_root` into it, the old root detached, the tmpfs remounted read-only, `chdir("/")`.
//!    Skipped only when the core announced no mount namespace (`--insecure-no-sandbox`).
//! 4. **capabilities**: the bounding set emptied and the ambient set cleared (while the service
//!    still holds `CAP_SETPCAP` in its user namespace).
//! 5. **ids**: supplementary groups cleared, then gid and uid switched to the announced
//!    unprivileged ids (this needs `CAP_SETUID`/`CAP_SETGID`, so it comes after the bounding set
//!    but before the last capabilities go).
//! 6. **capabilities**: effective, permitted and inheritable sets emptied (`capset`); then
//!    `no_new_privs`. The parent-death signal, which the kernel clears on an id change, is set
//!    again.
//! 7. **rlimits**: no new processes (`RLIMIT_NPROC` 0), a bounded fd table ([`Limits`]), no core
//!    files (`RLIMIT_CORE` 0), a file size bound, a data (heap) bound.
//!
//! The caller installs the seccomp filter after [`enter`] returns, as the last step.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

pub use ipc::control::{JailPlan, NamespaceSet};

/// Size of the empty root tmpfs (one page is the minimum tmpfs accounts).
const ROOT_TMPFS_OPTIONS: &str = "size=4k,nr_inodes=4,mode=0555";
/// Directories the empty root can be mounted on before `pivot_root` (the first one present).
const ROOT_MOUNT_POINTS: [&str; 3] = ["/tmp", "/proc", "/mnt"];
/// Highest capability number probed when emptying the bounding set.
const MAX_CAP: libc::c_ulong = 63;

/// Errors entering the jail. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Listing `/proc/self/fd` failed.
    #[error("list open fds")]
    ListFds(#[source] io::Error),
    /// The core announced a namespace this process is not in.
    #[error("the core announced a new {0} namespace but this process is not in one")]
    NotInNamespace(&'static str),
    /// A step's system call failed.
    #[error("jail step failed: {step}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

fn check(rc: impl Into<i64>, name: &'static str) -> Result<(), JailError> {
    if rc.into() < 0 {
        Err(JailError::Step { step: name, source: io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

/// What the jail does, from the core's [`JailPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Namespaces the process is (or will be put) in.
    pub namespaces: NamespaceSet,
    /// `(uid, gid)` to switch to after `pivot_root`, when the core mapped them.
    pub switch_to: Option<(u32, u32)>,
    /// Not created by the core: the jail unshares user, mount, IPC, UTS and network namespaces
    /// itself (a PID namespace cannot be entered by the caller).
    pub unshare_self: bool,
}

impl From<JailPlan> for Plan {
    fn from(p: JailPlan) -> Self {
        match p {
            JailPlan::Created { namespaces, switch_to } => Self { namespaces, switch_to, unshare_self: false },
            JailPlan::Standalone => Self {
                namespaces: NamespaceSet { pid: false, ..NamespaceSet::ALL },
                switch_to: None,
                unshare_self: true,
            },
        }
    }
}

/// Resource limits of a jailed service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_NOFILE`: highest fd number + 1 the service may hold.
    pub open_files: u64,
    /// `RLIMIT_FSIZE`: largest file offset the service may write (e.g. the disk size).
    pub file_size: u64,
    /// `RLIMIT_DATA`: heap and private writable mappings, in bytes. Shared mappings (guest RAM,
    /// the ring, the state region) do not count, so this bounds what the service itself
    /// allocates: a leak or a hostile guest driving allocations ends in a failed allocation
    /// (the service aborts and is restarted), not in the host's memory.
    pub data: u64,
}

impl Limits {
    /// Default fd bound: a service holds about a dozen fds.
    pub const OPEN_FILES: u64 = 64;
    /// Default data bound. A service's `VmData` is ~200 KiB once it runs (measured on the
    /// block service under `blk-bench`); 16 MiB leaves room for its largest buffers.
    pub const DATA: u64 = 16 << 20;

    /// Limits for a service writing files up to `file_size` bytes.
    pub fn new(file_size: u64) -> Self {
        Self { open_files: Self::OPEN_FILES, file_size, data: Self::DATA }
    }
}

/// Enters the jail: every step of the module docs, in order, keeping the fds in `keep` (and 0-2).
/// On return the process has no capabilities, `no_new_privs`, an empty read-only root and its
/// rlimits; the caller installs its seccomp filter next.
pub fn enter(plan: &Plan, keep: &[RawFd], limits: &Limits) -> Result<(), JailError> {
    close_other_fds(keep)?;
    let pdeathsig = parent_death_signal()?;
    enter_namespaces(plan)?;
    if plan.namespaces.mnt {
        empty_root()?;
    } else {
        eprintln!("jail[{}]: WARNING: no mount namespace, the host file system stays visible", std::process::id());
    }
    drop_bounding_set(plan)?;
    if let Some((uid, gid)) = plan.switch_to {
        switch_ids(uid, gid)?;
    }
    clear_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "prctl(PR_SET_NO_NEW_PRIVS)")?;
    if let Ok(sig @ 1..) = libc::c_ulong::try_from(pdeathsig) {
        // An id change cleared it; the core may have died in between, which the service sees
        // as its control channel closing.
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) };
        check(rc, "prctl(PR_SET_PDEATHSIG)")?;
    }
    set_rlimits(limits)
}

/// Closes every fd above 2 that is not in `keep`. Returns how many were closed.
pub fn close_other_fds(keep: &[RawFd]) -> Result<usize, JailError> {
    // Collect first: closing while iterating would also close the directory's own fd.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(JailError::ListFds)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut closed = 0;
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: `fd` was open in this process and is not one the caller keeps; the
            // service owns no other handle to it that would be used later (the directory handle
            // that listed it is already closed, so EBADF is harmless).
            if unsafe { libc::close(fd) } == 0 {
                closed += 1;
            }
        }
    }
    Ok(closed)
}

fn parent_death_signal() -> Result<libc::c_int, JailError> {
    let mut sig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int to the pointer we pass, which outlives the call.
    let rc = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut libc::c_int, 0, 0, 0) };
    check(rc, "prctl(PR_GET_PDEATHSIG)")?;
    Ok(sig)
}

/// Step 2: checks the namespaces the core created, or creates them (all but PID) itself.
fn enter_namespaces(plan: &Plan) -> Result<(), JailError> {
    if plan.unshare_self {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let n = plan.namespaces;
        let mut flags = 0;
        for (on, flag) in [
            (n.user, libc::CLONE_NEWUSER),
            (n.mnt, libc::CLONE_NEWNS),
            (n.ipc, libc::CLONE_NEWIPC),
            (n.uts, libc::CLONE_NEWUTS),
            (n.net, libc::CLONE_NEWNET),
        ] {
            if on {
                flags |= flag;
            }
        }
        // SAFETY: unshare takes flags only; the process is single-threaded here (services run no
        // threads), as CLONE_NEWUSER requires.
        check(unsafe { libc::unshare(flags) }, "unshare of the user, mount, IPC, UTS and network namespaces")?;
        if n.user {
            // A process may map only its own ids into its new namespace, after denying setgroups.
            std::fs::write("/proc/self/setgroups", "deny").map_err(step("writing /proc/self/setgroups"))?;
            std::fs::write("/proc/self/uid_map", format!("0 {uid} 1\n")).map_err(step("writing /proc/self/uid_map"))?;
            std::fs::write("/proc/self/gid_map", format!("0 {gid} 1\n")).map_err(step("writing /proc/self/gid_map"))?;
        }
        return Ok(());
    }
    // SAFETY: getpid has no preconditions.
    if plan.namespaces.pid && unsafe { libc::getpid() } != 1 {
        return Err(JailError::NotInNamespace("pid"));
    }
    if plan.namespaces.user {
        let map = std::fs::read_to_string("/proc/self/uid_map").map_err(step("reading /proc/self/uid_map"))?;
        let identity = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
        if identity {
            return Err(JailError::NotInNamespace("user"));
        }
    }
    Ok(())
}

fn c(s: &str) -> CString {
    // Only called with the constants of this module, which hold no NUL.
    CString::new(s).unwrap_or_default()
}

/// Step 3: pivot into an empty, read-only tmpfs.
pub fn empty_root() -> Result<(), JailError> {
    let root = c("/");
    let dot = c(".");
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: mount with a valid path and no data; makes every mount in our namespace private so
    // nothing below propagates back to the core's namespace.
    let rc = unsafe { libc::mount(none, root.as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) };
    check(rc, "making / private (mount MS_REC|MS_PRIVATE)")?;
    let point = ROOT_MOUNT_POINTS.iter().find(|p| std::path::Path::new(p).is_dir()).ok_or_else(|| JailError::Step {
        step: "finding a mount point for the empty root",
        source: io::ErrorKind::NotFound.into(),
    })?;
    let point = c(point);
    let (source, fstype, opts) = (c("bulkhead-root"), c("tmpfs"), c(ROOT_TMPFS_OPTIONS));
    // SAFETY: mount with valid C strings; the data string is tmpfs's option list.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            point.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            opts.as_ptr().cast(),
        )
    };
    check(rc, "mounting the empty root tmpfs")?;
    // SAFETY: chdir with a valid path.
    check(unsafe { libc::chdir(point.as_ptr()) }, "chdir into the empty root")?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, then is detached.
    // SAFETY: pivot_root with two valid paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(rc, "pivot_root")?;
    // SAFETY: umount2 with a valid path and a flag.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }, "detaching the old root")?;
    let flags = libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: remount of the mount at "/" with flags only.
    let rc = unsafe { libc::mount(none, root.as_ptr(), none, flags, std::ptr::null()) };
    check(rc, "remounting the empty root read-only")?;
    // SAFETY: chdir with a valid path.
    check(unsafe { libc::chdir(root.as_ptr()) }, "chdir(\"/\")")
}

/// Step 4: empties the bounding set and clears the ambient set.
fn drop_bounding_set(plan: &Plan) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check(rc, "clearing the ambient capabilities")?;
    for cap in 0..=MAX_CAP {
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            // EINVAL: past the kernel's last capability.
            break;
        }
        if present == 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let e = io::Error::last_os_error();
            // Without a user namespace an unprivileged service cannot touch its bounding set; with
            // no_new_privs and no permitted capabilities it cannot gain anything from it either.
            if e.raw_os_error() == Some(libc::EPERM) && !plan.namespaces.user {
                eprintln!(
                    "jail[{}]: WARNING: bounding set kept (no CAP_SETPCAP, no user namespace)",
                    std::process::id()
                );
                return Ok(());
            }
            return Err(JailError::Step { step: "dropping the capability bounding set", source: e });
        }
    }
    Ok(())
}

/// Step 5: clears supplementary groups and switches to `uid`/`gid`.
fn switch_ids(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: setgroups with an empty list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "clearing supplementary groups")?;
    // SAFETY: setresgid/setresuid take plain ids.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3` (64-bit sets as two `CapData`).
const CAP_V3: u32 = 0x2008_0522;

/// Step 6: empties the effective, permitted and inheritable sets.
fn clear_capabilities() -> Result<(), JailError> {
    let mut header = CapHeader { version: CAP_V3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, all valid and #[repr(C)].
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    check(rc, "capset (clearing effective, permitted and inheritable capabilities)")
}

/// Step 7: rlimits (soft and hard).
pub fn set_rlimits(limits: &Limits) -> Result<(), JailError> {
    let set = |res, value: u64, name: &'static str| {
        let rl = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit reads the rlimit we pass.
        check(unsafe { libc::setrlimit(res, &rl) }, name)
    };
    set(libc::RLIMIT_NPROC, 0, "setrlimit(RLIMIT_NPROC)")?;
    set(libc::RLIMIT_NOFILE, limits.open_files, "setrlimit(RLIMIT_NOFILE)")?;
    set(libc::RLIMIT_CORE, 0, "setrlimit(RLIMIT_CORE)")?;
    set(libc::RLIMIT_FSIZE, limits.file_size, "setrlimit(RLIMIT_FSIZE)")?;
    set(libc::RLIMIT_DATA, limits.data, "setrlimit(RLIMIT_DATA)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_from_the_core_is_taken_as_is() {
        let p = Plan::from(JailPlan::Created { namespaces: NamespaceSet::ALL, switch_to: Some((65534, 65534)) });
        assert_eq!(p.namespaces, NamespaceSet::ALL);
        assert_eq!(p.switch_to, Some((65534, 65534)));
        assert!(!p.unshare_self);
        let some = NamespaceSet { mnt: true, net: true, ..NamespaceSet::default() };
        let p = Plan::from(JailPlan::Created { namespaces: some, switch_to: None });
        assert_eq!((p.namespaces, p.switch_to, p.unshare_self), (some, None, false));
    }

    #[test]
    fn standalone_plan_unshares_all_but_pid() {
        let p = Plan::from(JailPlan::Standalone);
        assert!(p.unshare_self && !p.namespaces.pid && p.namespaces.user && p.namespaces.mnt && p.namespaces.net);
        assert_eq!(p.switch_to, None);
    }

    #[test]
    fn step_errors_name_the_step() {
        let e = JailError::Step { step: "pivot_root", source: io::Error::from_raw_os_error(libc::EPERM) };
        assert_eq!(e.to_string(), "jail step failed: pivot_root");
        assert!(std::error::Error::source(&e).is_some());
    }
}
