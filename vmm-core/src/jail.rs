//! The core's own jail: the ids a VM runs under, and the drop of the core's privileges once the
//! VM is built.
//!
//! Started as root, every VM gets two uid/gid pairs of its own ([`VmIds`]): one for its core,
//! one for its services. They come from the operator (`--uid/--gid`: the services then get
//! `uid+1/gid+1`) or from a range (`--id-range FIRST-LAST`, default [`DEFAULT_RANGE`]), taken in
//! blocks of two. A uid is held by binding an abstract Unix socket named after it
//! ([`IdLease`]): the kernel frees the name when the last holder (the core, then the helper that
//! cleans up after it) is gone, so a crash leaves nothing to clean and two VMs on one host never
//! share an id. So a compromised service of one VM cannot signal or trace another VM's
//! processes, nor its own core (signals need a matching uid; tracing needs it too, and the core
//! is not dumpable).
//!
//! At its start, before any thread exists, the core enters mount and IPC namespaces of its own
//! ([`enter_own_namespaces`]). [`drop_privileges`] runs on the VMM thread at the end of
//! `launch::build`, after everything that needs root (the cgroup, TAPs, disk images,
//! `/dev/kvm`) and before the vCPU threads exist, in this order, each failing with the step's
//! name:
//!
//! 0. [`pivot`] into the VM's jail directory ([`jail_root`]): a fresh `/proc` and whatever the
//!    operator put there; the host's file system detached.
//! 1. rlimits: no core dumps (`RLIMIT_CORE` 0; guest RAM is also `MADV_DONTDUMP`), a bounded fd
//!    table and task count ([`CoreLimits`]).
//! 2. the capability bounding set emptied (this thread; the threads it creates later inherit
//!    it).
//! 3. supplementary groups cleared, then gid and uid switched to the core's ([`VmIds::core`])
//!    for every thread (glibc broadcasts the change to all threads of the process). Leaving
//!    uid 0 clears every capability (permitted, effective, ambient) of every thread.
//! 4. not dumpable (`PR_SET_DUMPABLE` 0: no ptrace, no core, `/proc/PID` owned by root), and
//!    `no_new_privs` (this thread and what it creates).
//! 5. checked: the effective capability set read back is empty, and so are the ids.
//!
//! The seccomp filter of the VMM thread comes later (`vmm`), when the VM runs.

use std::io;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

/// The default range VM ids are taken from: far above the ids of people and system accounts
/// and of the usual `/etc/subuid` ranges.
pub const DEFAULT_RANGE: IdRange = IdRange { first: 1_500_000_000, last: 1_500_999_999 };

/// Errors of the core's jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// An id given by the operator or the range is unusable.
    #[error("jail ids: {0}")]
    Ids(String),
    /// The id is used by another VM on this host.
    #[error("uid {0} is in use by another VM on this host")]
    InUse(u32),
    /// Every id of the range is in use.
    #[error("every uid of the range {0} is in use")]
    RangeFull(IdRange),
    /// A step of the drop failed.
    #[error("jail step failed: {step}")]
    Step {
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The drop did not leave the core without privileges.
    #[error("after the drop the core still has {0}")]
    NotDropped(String),
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

fn check(rc: libc::c_long, name: &'static str) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Step { step: name, source: io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

/// A range of ids, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// The first id.
    pub first: u32,
    /// The last id.
    pub last: u32,
}

impl IdRange {
    /// Parses `FIRST-LAST`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
        let first: u32 = a.trim().parse().map_err(|_| format!("{a:?} is not a uid"))?;
        let last: u32 = b.trim().parse().map_err(|_| format!("{b:?} is not a uid"))?;
        let r = Self { first, last };
        r.validate().map_err(|e| e.to_string())?;
        Ok(r)
    }

    /// A range holds at least one block of two ids, none of them 0 or the overflow id.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.first == 0 || self.last < self.first.saturating_add(1) || self.last >= u32::MAX - 1 {
            return Err(JailError::Ids(format!("{self}: needs at least two ids, none of them 0 or {}", u32::MAX)));
        }
        if (self.first..=self.last).contains(&crate::service::spawn::SERVICE_ID) {
            return Err(JailError::Ids(format!("{self} holds {}, the overflow id", crate::service::spawn::SERVICE_ID)));
        }
        Ok(())
    }
}

impl std::fmt::Display for IdRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The jail of the core (the `bulkhead.jail` section of a configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The core keeps root and every capability (`--no-jail`; loud in the log).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// The core's uid (its services get `uid+1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The core's gid (its services get `gid+1`; default: the uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Where ids are taken from when no uid is given (default [`DEFAULT_RANGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_range: Option<IdRange>,
}

impl JailConfig {
    /// Whether nothing is set.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the ids given.
    pub fn validate(&self) -> Result<(), JailError> {
        if let Some(r) = &self.id_range {
            r.validate()?;
        }
        if self.gid.is_some() && self.uid.is_none() {
            return Err(JailError::Ids("a gid needs a uid".into()));
        }
        for (what, id) in [("uid", self.uid), ("gid", self.gid)] {
            if let Some(id) = id {
                let overflow = crate::service::spawn::SERVICE_ID;
                if id == 0 || (overflow - 1..=overflow).contains(&id) {
                    return Err(JailError::Ids(format!(
                        "{what} {id}: not 0, and neither it nor {what}+1 may be the overflow id {}",
                        crate::service::spawn::SERVICE_ID
                    )));
                }
                if id >= u32::MAX - 2 {
                    return Err(JailError::Ids(format!("{what} {id} is too large")));
                }
            }
        }
        Ok(())
    }
}

/// The ids of one VM's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIds {
    /// The core's `(uid, gid)`.
    pub core: (u32, u32),
    /// Every service's `(uid, gid)`, outside its user namespace.
    pub service: (u32, u32),
}

/// A VM's ids, held for as long as this value or a dup of its fds lives (see the module docs).
#[derive(Debug)]
pub struct IdLease {
    /// The ids.
    pub ids: VmIds,
    /// The sockets bound to the names of the core's and the services' uids.
    pub holds: Vec<OwnedFd>,
}

/// Binds the abstract socket `bulkhead-uid-<uid>`: `Ok(None)` if another process holds it.
fn claim(uid: u32) -> Result<Option<OwnedFd>, JailError> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| JailError::Step { step: "socket for the uid claim", source: e.into() })?;
    let addr = UnixAddr::new_abstract(format!("bulkhead-uid-{uid}").as_bytes())
        .map_err(|e| JailError::Step { step: "naming the uid claim", source: e.into() })?;
    match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => Ok(Some(fd)),
        Err(nix::Error::EADDRINUSE) => Ok(None),
        Err(e) => Err(JailError::Step { step: "binding the uid claim", source: e.into() }),
    }
}

/// Takes the VM's ids: the operator's, or the first free block of two in the range.
pub fn lease(config: &JailConfig) -> Result<IdLease, JailError> {
    config.validate()?;
    let pair = |uid: u32, gid: u32| VmIds { core: (uid, gid), service: (uid + 1, gid + 1) };
    let both = |uid: u32| -> Result<Option<Vec<OwnedFd>>, JailError> {
        let Some(a) = claim(uid)? else { return Ok(None) };
        let Some(b) = claim(uid + 1)? else { return Ok(None) };
        Ok(Some(vec![a, b]))
    };
    if let Some(uid) = config.uid {
        let gid = config.gid.unwrap_or(uid);
        return match both(uid)? {
            Some(holds) => Ok(IdLease { ids: pair(uid, gid), holds }),
            None => Err(JailError::InUse(uid)),
        };
    }
    let range = config.id_range.unwrap_or(DEFAULT_RANGE);
    range.validate()?;
    let mut uid = range.first;
    // Bounded by the range: one claim (two binds) per block of two ids.
    while uid < range.last {
        if let Some(holds) = both(uid)? {
            return Ok(IdLease { ids: pair(uid, uid), holds });
        }
        uid += 2;
    }
    Err(JailError::RangeFull(range))
}

/// Bounds the core keeps after the drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreLimits {
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// `RLIMIT_NPROC`: tasks (threads count) of the core's uid, which only this VM's core uses.
    pub tasks: u64,
}

impl CoreLimits {
    /// Bounds for a VM of `vcpus` vCPUs and `services` services: each service holds about ten
    /// fds in the core and a supervisor thread; the API serves at most 64 connections, each on a
    /// thread.
    pub fn for_vm(vcpus: u64, services: u64) -> Self {
        Self { open_files: 1024 + 16 * services, tasks: 128 + vcpus + 2 * services }
    }
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64, name: &'static str) -> Result<(), JailError> {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads the struct we pass, which outlives the call.
    check(unsafe { libc::setrlimit(resource, &lim) }.into(), name)
}

/// Set once this process entered mount and IPC namespaces of its own ([`enter_own_namespaces`]).
static OWN_NAMESPACES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`enter_own_namespaces`] succeeded in this process.
pub fn in_own_namespaces() -> bool {
    OWN_NAMESPACES.load(std::sync::atomic::Ordering::SeqCst)
}

/// The core's first step, when it starts as root with its jail on, before any thread exists
/// (namespaces belong to each thread; threads created later share these): mount and IPC
/// namespaces of its own, every mount made private, so nothing it mounts reaches the host and
/// it can later [`pivot`] into its jail. Until then it sees the host's file system as it was
/// when it started.
pub fn enter_own_namespaces() -> Result<(), JailError> {
    // SAFETY: unshare with namespace flags only; the process is single-threaded here.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) };
    check(rc.into(), "unshare(CLONE_NEWNS|CLONE_NEWIPC)")?;
    // SAFETY: mount with a static NUL-terminated path and no source, type or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc.into(), "mount(/, MS_REC|MS_PRIVATE)")?;
    OWN_NAMESPACES.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Where VM `vm_id`'s core is jailed: `/run/bulkhead/jail/<id>/root` (for the anonymous id,
/// `<id>-<pid>`). A host directory, so an operator can put in it what the VM is to open after
/// its start (a new disk image), as with Firecracker's jailer; the helper removes it when it is
/// empty once the core is gone.
pub fn jail_root(vm_id: &str) -> std::path::PathBuf {
    let group = crate::cgroup::group_name(vm_id);
    let name = group.to_string_lossy();
    let name = name.strip_prefix("bulkhead-").unwrap_or(&name);
    std::path::Path::new(crate::api_client::RUNTIME_DIR).join("jail").join(name).join("root")
}

fn cpath(p: &std::path::Path, what: &'static str) -> Result<std::ffi::CString, JailError> {
    std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()))
        .map_err(|_| JailError::Step { step: what, source: io::Error::from_raw_os_error(libc::EINVAL) })
}

/// Moves every thread of the core into `root` (in its own mount namespace,
/// [`enter_own_namespaces`]): `root` is created if missing (owned by `owner`, mode 0700, so the
/// core can create the files API requests name there), bind-mounted on itself, a fresh `proc`
/// mounted in it (`nosuid,nodev,noexec`: the core reads its own and its services' status),
/// then `pivot_root` into it and the old root detached. From then on the core sees nothing of
/// the host's file system but what is in `root`.
pub fn pivot(root: &std::path::Path, owner: (u32, u32)) -> Result<(), JailError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(step("creating the jail directory"))?;
    std::os::unix::fs::chown(root, Some(owner.0), Some(owner.1)).map_err(step("chown of the jail directory"))?;
    let proc_dir = root.join("proc");
    if !proc_dir.is_dir() {
        std::fs::DirBuilder::new().mode(0o555).create(&proc_dir).map_err(step("creating the jail's /proc"))?;
    }
    let (croot, cproc) = (cpath(root, "the jail path")?, cpath(&proc_dir, "the jail path")?);
    // SAFETY: mount with NUL-terminated paths that outlive the call; a bind of a directory on
    // itself, which makes it a mount point pivot_root accepts.
    let rc = unsafe { libc::mount(croot.as_ptr(), croot.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    check(rc.into(), "mount --bind of the jail directory")?;
    // SAFETY: as above: a new proc instance of this PID namespace, no data.
    let rc = unsafe {
        libc::mount(
            c"proc".as_ptr(),
            cproc.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    check(rc.into(), "mount of the jail's /proc")?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(croot.as_ptr()) }.into(), "chdir into the jail")?;
    // `pivot_root(".", ".")` stacks the old root on the new one; detaching "." then leaves the
    // new root alone (the old one goes once nothing uses it).
    // SAFETY: pivot_root with two NUL-terminated static paths.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) }, "pivot_root")?;
    // SAFETY: umount2 with a static NUL-terminated path.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }.into(), "detaching the host's root")?;
    // SAFETY: chdir to a static NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }.into(), "chdir(/)")
}

/// Drops the core's privileges (see the module docs). Call on the VMM thread, before the vCPU
/// threads exist. `root`: the jail directory to [`pivot`] into first (when the core entered
/// namespaces of its own at its start).
pub fn drop_privileges(ids: &VmIds, limits: &CoreLimits, root: Option<&std::path::Path>) -> Result<(), JailError> {
    if let Some(root) = root {
        pivot(root, ids.core)?;
    }
    set_rlimit(libc::RLIMIT_CORE, 0, "setrlimit(RLIMIT_CORE)")?;
    set_rlimit(libc::RLIMIT_NOFILE, limits.open_files, "setrlimit(RLIMIT_NOFILE)")?;
    set_rlimit(libc::RLIMIT_NPROC, limits.tasks, "setrlimit(RLIMIT_NPROC)")?;
    drop_bounding_set(0)?;
    let (uid, gid) = ids.core;
    // SAFETY: setgroups with a zero-length list and a null pointer, as the man page allows.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }.into(), "setgroups")?;
    // SAFETY: setresgid/setresuid with plain ids (glibc applies them to every thread).
    check(unsafe { libc::setresgid(gid, gid, gid) }.into(), "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }.into(), "setresuid")?;
    // The id change cleared the parent-death signal of a core in its own PID namespace.
    crate::pidns::rearm_parent_death()
        .map_err(|e| JailError::Step { step: "the launcher's death signal", source: io::Error::other(e) })?;
    // Leaving uid 0 emptied the effective and permitted sets; the inheritable one survives an
    // id change.
    set_capabilities(0)?;
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }.into(), "prctl(PR_SET_DUMPABLE)")?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check(rc.into(), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")?;
    // SAFETY: as above.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into(), "prctl(PR_SET_NO_NEW_PRIVS)")?;
    verify(ids)
}

/// Removes from this thread's bounding set every capability not in `keep` (a mask of
/// capability numbers). Needs `CAP_SETPCAP`; numbers past the kernel's last capability are
/// skipped (EINVAL).
pub fn drop_bounding_set(keep: u64) -> Result<(), JailError> {
    for cap in (0..=63u32).filter(|c| keep & (1 << c) == 0) {
        // SAFETY: prctl with integer arguments only; EINVAL past the last capability is expected.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(step("prctl(PR_CAPBSET_DROP)")(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Sets this thread's effective and permitted capability sets to `keep` (a mask of capability
/// numbers) and empties its inheritable set (`capset`, version 3).
pub fn set_capabilities(keep: u64) -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let (lo, hi) = ((keep & 0xffff_ffff) as u32, (keep >> 32) as u32);
    let word = |w: u32| Data { effective: w, permitted: w, inheritable: 0 };
    // _LINUX_CAPABILITY_VERSION_3: two Data words, low capabilities first.
    let mut header = Header { version: 0x2008_0522, pid: 0 };
    let data = [word(lo), word(hi)];
    // SAFETY: capset reads a v3 header and two data words, both valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    check(rc, "capset")
}

/// Reads back what the kernel says of this thread: no capability in any set, the core's ids.
fn verify(ids: &VmIds) -> Result<(), JailError> {
    let status =
        std::fs::read_to_string("/proc/thread-self/status").map_err(step("reading /proc/thread-self/status"))?;
    let t = crate::isolation::parse_status(&status);
    let zero = |set: &str| u64::from_str_radix(set, 16) == Ok(0);
    if ![&t.cap_effective, &t.cap_permitted, &t.cap_bounding, &t.cap_ambient, &t.cap_inheritable]
        .iter()
        .all(|s| zero(s))
    {
        return Err(JailError::NotDropped(format!(
            "capabilities (effective {}, permitted {}, bounding {})",
            t.cap_effective, t.cap_permitted, t.cap_bounding
        )));
    }
    if t.uid.iter().any(|u| *u != ids.core.0) || t.gid.iter().any(|g| *g != ids.core.1) {
        return Err(JailError::NotDropped(format!("uids {:?} gids {:?}", t.uid, t.gid)));
    }
    if !t.no_new_privs {
        return Err(JailError::NotDropped("no no_new_privs".into()));
    }
    Ok(())
}

/// Confines a thread of the core that exists before the drop (or runs outside the VMM thread's
/// lineage): no bounding set (while it still may), `no_new_privs`, and `policy` as its seccomp
/// filter. Each long-lived thread calls it first thing.
pub fn confine_thread(policy: bulkhead_policies::Policy) -> Result<(), JailError> {
    // Best effort: without CAP_SETPCAP (an unprivileged core) the kernel refuses with EPERM and
    // the bounding set stays; the thread's no_new_privs and filter below are what it must have.
    let _ = drop_bounding_set(0);
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into(), "prctl(PR_SET_NO_NEW_PRIVS)")?;
    // The no-clone3 guard first: installing a filter takes a prctl the thread's own policy
    // does not allow.
    let guard =
        if policy == bulkhead_policies::Policy::CoreApi { bulkhead_policies::install_no_clone3() } else { Ok(()) };
    let installed = guard.and_then(|()| bulkhead_policies::install(policy));
    installed
        .map_err(|e| JailError::Step { step: "installing the thread's seccomp filter", source: io::Error::other(e) })
}

/// [`confine_thread`], or the process ends: no thread of the core runs unconfined.
pub fn confine_or_abort(policy: bulkhead_policies::Policy) {
    if let Err(e) = confine_thread(policy) {
        eprintln!(
            "bulkhead: error: thread {:?} cannot be confined ({}): {}",
            std::thread::current().name().unwrap_or("?"),
            policy.name(),
            crate::vmm::chain(&e)
        );
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_ids_are_checked() {
        assert_eq!(IdRange::parse("100-199"), Ok(IdRange { first: 100, last: 199 }));
        assert!(IdRange::parse("100").is_err());
        assert!(IdRange::parse("0-10").is_err());
        assert!(IdRange::parse("10-10").is_err());
        assert!(IdRange::parse("65000-66000").is_err(), "holds the overflow id");
        assert!(JailConfig { uid: Some(0), ..JailConfig::default() }.validate().is_err());
        assert!(JailConfig { uid: Some(65533), ..JailConfig::default() }.validate().is_err());
        assert!(JailConfig { gid: Some(5), ..JailConfig::default() }.validate().is_err());
        assert!(JailConfig { uid: Some(5000), gid: Some(6000), ..JailConfig::default() }.validate().is_ok());
    }

    #[test]
    fn a_leased_id_is_not_leased_twice() {
        let range = IdRange { first: 1_499_000_000, last: 1_499_000_003 };
        let cfg = JailConfig { id_range: Some(range), ..JailConfig::default() };
        let a = lease(&cfg).expect("first");
        let b = lease(&cfg).expect("second");
        assert_eq!(a.ids.core, (1_499_000_000, 1_499_000_000));
        assert_eq!(a.ids.service, (1_499_000_001, 1_499_000_001));
        assert_eq!(b.ids.core.0, 1_499_000_002);
        assert!(matches!(lease(&cfg), Err(JailError::RangeFull(_))));
        let explicit = JailConfig { uid: Some(1_499_000_002), ..JailConfig::default() };
        assert!(matches!(lease(&explicit), Err(JailError::InUse(1_499_000_002))));
        drop(b);
        assert_eq!(lease(&explicit).expect("freed").ids.core, (1_499_000_002, 1_499_000_002));
    }
}
