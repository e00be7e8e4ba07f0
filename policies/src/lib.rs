//! Bulkhead's seccomp policies.
//!
//! The policies are data: seccompiler JSON files in `json/` (a `common` base merged with one file
//! per service, and one file per core thread kind), compiled to classic BPF by `build.rs` and
//! embedded in every binary that links this crate. Callers name a policy by [`Policy`], never by a
//! string, and [`install`] loads it on the calling thread.
//!
//! Services trap on a mismatch: [`install_sigsys_reporter`] (installed before the filter) writes a
//! small fixed-layout report of the offending syscall to an fd the core reads, then the process
//! dies by SIGSYS. The core's vCPU threads kill the whole process on a mismatch (no handler can
//! run safely in the core).
//!
//! Also here: the x86_64 syscall number→name table ([`syscall_name`]) and a classic-BPF
//! interpreter ([`bpf::evaluate`]) for tests.
#![deny(missing_docs)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

pub use seccompiler::sock_filter;

pub mod bpf;

mod table {
    include!(concat!(env!("OUT_DIR"), "/syscall_names.rs"));
}

/// `AUDIT_ARCH_X86_64`: the arch value of a 64-bit x86 syscall in `seccomp_data`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Errors loading a policy or its reporter.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The embedded program is not a whole number of instructions (a build defect).
    #[error("embedded filter {0} is malformed")]
    Malformed(&'static str),
    /// The kernel refused the filter (or `no_new_privs`).
    #[error("loading seccomp filter {name}")]
    Install {
        /// Policy name.
        name: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// Installing the SIGSYS handler failed.
    #[error("installing the SIGSYS reporter")]
    Reporter(#[source] std::io::Error),
}

/// A seccomp policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The console service (`bulkhead-console`).
    Console,
    /// A block service (`bulkhead-block`).
    Block,
    /// A net service (`bulkhead-net`, to come: TAP fd only).
    Net,
    /// A vCPU thread of the core, from its first `KVM_RUN` on.
    CoreVcpu,
    /// The core's main thread once the VM runs: it waits for a stop, sends control messages,
    /// kicks vCPUs and reads metrics; it creates no thread or process any more (services are
    /// restarted by supervisor threads through the VM's helper).
    CoreMain,
    /// The core's API threads (the acceptor and one per connection), from their start: HTTP on
    /// the API socket, control messages to services and the helper, the output files the API
    /// opens, vCPU pinning; no process creation, no exec.
    CoreApi,
    /// A service's supervisor thread in the core, from its start: rings, doorbells, control
    /// sockets, restarts through the VM's helper (which creates the processes), reaping.
    CoreSupervisor,
    /// The core's fault-schedule thread: control messages and kills of services.
    CoreFaults,
    /// The VM's privileged helper. A filter is inherited by the processes a thread creates, and
    /// the helper creates the services: so this policy is the services' policies merged with
    /// what a service does before its own filter (its jail: `mount`, `pivot_root`, id switches)
    /// and what the helper does (spawning, id maps, cgroup files, `/proc` reads, kills). Still
    /// no `ptrace`, `bpf`, module or `kexec` calls, keys, `io_uring`, `userfaultfd`, file
    /// handles, `setns`, `socket`, `bind`, `connect`. A mismatch fails with `EPERM`.
    Helper,
}

macro_rules! embedded {
    ($name:literal) => {
        (
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bpf")).as_slice(),
            include_str!(concat!(env!("OUT_DIR"), "/", $name, ".json")),
        )
    };
}

impl Policy {
    /// Every policy.
    pub const ALL: [Policy; 9] = [
        Policy::Console,
        Policy::Block,
        Policy::Net,
        Policy::CoreVcpu,
        Policy::CoreMain,
        Policy::CoreApi,
        Policy::CoreSupervisor,
        Policy::CoreFaults,
        Policy::Helper,
    ];

    /// The policy's name (its JSON key).
    pub fn name(self) -> &'static str {
        match self {
            Policy::Console => "console",
            Policy::Block => "block",
            Policy::Net => "net",
            Policy::CoreVcpu => "vcpu",
            Policy::CoreMain => "core-main",
            Policy::CoreApi => "core-api",
            Policy::CoreSupervisor => "core-supervisor",
            Policy::CoreFaults => "core-faults",
            Policy::Helper => "helper",
        }
    }

    fn embedded(self) -> (&'static [u8], &'static str) {
        match self {
            Policy::Console => embedded!("console"),
            Policy::Block => embedded!("block"),
            Policy::Net => embedded!("net"),
            Policy::CoreVcpu => embedded!("vcpu"),
            Policy::CoreMain => embedded!("core-main"),
            Policy::CoreApi => embedded!("core-api"),
            Policy::CoreSupervisor => embedded!("core-supervisor"),
            Policy::CoreFaults => embedded!("core-faults"),
            Policy::Helper => embedded!("helper"),
        }
    }

    /// The merged JSON the program was compiled from.
    pub fn json(self) -> &'static str {
        self.embedded().1
    }

    /// The compiled BPF program.
    pub fn program(self) -> Result<Vec<sock_filter>, PolicyError> {
        decode_program(self.embedded().0, self.name())
    }

    /// What the compiled filter does with `data` (see [`bpf::evaluate`]).
    pub fn evaluate(self, data: &bpf::SeccompData) -> Result<Action, EvalFailure> {
        let prog = self.program().map_err(|_| EvalFailure::Malformed(self.name()))?;
        Ok(Action::from_ret(bpf::evaluate(&prog, data)?))
    }

    /// Names of the syscalls the policy's JSON mentions (allowed at least for some arguments).
    pub fn syscalls(self) -> Vec<String> {
        let mut v: Vec<String> = self
            .json()
            .split("\"syscall\":")
            .skip(1)
            .filter_map(|s| s.trim_start().strip_prefix('"')?.split('"').next().map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Why [`Policy::evaluate`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalFailure {
    /// The embedded program is malformed.
    #[error("embedded filter {0} is malformed")]
    Malformed(&'static str),
    /// The interpreter rejected it.
    #[error("evaluating the filter")]
    Eval(#[from] bpf::EvalError),
}

/// A seccomp filter's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The syscall runs.
    Allow,
    /// SIGSYS is sent to the thread (the service's reporter then ends the process).
    Trap,
    /// The process is killed.
    KillProcess,
    /// The thread is killed.
    KillThread,
    /// The syscall fails with this errno.
    Errno(u16),
    /// Logged and allowed.
    Log,
    /// Anything else (user notification, trace).
    Other(u32),
}

impl Action {
    /// Decodes a `SECCOMP_RET_*` value.
    pub fn from_ret(ret: u32) -> Self {
        let data = u16::try_from(ret & 0xffff).unwrap_or(u16::MAX);
        match ret & 0xffff_0000 {
            0x7fff_0000 => Action::Allow,
            0x0003_0000 => Action::Trap,
            0x8000_0000 => Action::KillProcess,
            0x0000_0000 => Action::KillThread,
            0x0005_0000 => Action::Errno(data),
            0x7ffc_0000 => Action::Log,
            _ => Action::Other(ret),
        }
    }
}

/// Loads `policy` on the calling thread (and sets `no_new_privs`). Threads created afterwards by
/// this thread inherit it; other threads are not affected.
pub fn install(policy: Policy) -> Result<(), PolicyError> {
    let prog = policy.program()?;
    seccompiler::apply_filter(&prog).map_err(|source| PolicyError::Install { name: policy.name(), source })
}

/// Stacks, on the calling thread, a filter that answers `clone3` with `ENOSYS` and allows
/// everything else: glibc then creates threads with `clone(2)`, whose flags a thread's own
/// policy can check (`clone3` passes its flags in memory, which seccomp cannot read). For core
/// threads that create threads after their filter is in place (the API's).
pub fn install_no_clone3() -> Result<(), PolicyError> {
    let prog = no_clone3_program()?;
    seccompiler::apply_filter(&prog).map_err(|source| PolicyError::Install { name: "no-clone3", source })
}

/// The program [`install_no_clone3`] loads.
pub fn no_clone3_program() -> Result<Vec<sock_filter>, PolicyError> {
    decode_program(include_bytes!(concat!(env!("OUT_DIR"), "/no-clone3.bpf")), "no-clone3")
}

/// An embedded program (8 bytes per little-endian `sock_filter`, as `build.rs` writes them).
fn decode_program(bytes: &[u8], name: &'static str) -> Result<Vec<sock_filter>, PolicyError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(PolicyError::Malformed(name));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// Name of x86_64 syscall `nr`, if it has one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    let nr = u32::try_from(nr).ok()?;
    table::SYSCALLS.binary_search_by_key(&nr, |&(n, _)| n).ok().map(|i| table::SYSCALLS[i].1)
}

/// Number of the x86_64 syscall `name`, if it exists.
pub fn syscall_number(name: &str) -> Option<i64> {
    table::SYSCALLS.iter().find(|&&(_, n)| n == name).map(|&(nr, _)| i64::from(nr))
}

/// Every x86_64 syscall as `(number, name)`, sorted by number.
pub fn syscalls() -> &'static [(u32, &'static str)] {
    table::SYSCALLS
}

/// A report written by the SIGSYS handler: `len` bytes of `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The encoded report.
    pub bytes: [u8; 32],
    /// How many bytes of it to write.
    pub len: usize,
}

/// Encodes a report of `(syscall number, arch)`. Runs inside a signal handler: it must not
/// allocate, lock or make system calls.
pub type ReportEncoder = fn(syscall: u32, arch: u32) -> Report;

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
static ENCODER: OnceLock<ReportEncoder> = OnceLock::new();

/// The SIGSYS fields of `siginfo_t` on x86_64: `si_signo`, `si_errno`, `si_code`, padding, then
/// the `_sigsys` union member (`_call_addr`, `_syscall`, `_arch`).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: u64,
    syscall: i32,
    arch: u32,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Async-signal-safe: atomics, a pure encoder, write(2), then a forced SIGSYS.
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for an SA_SIGINFO handler;
        // SigsysInfo is a prefix of its x86_64 layout for SIGSYS, read unaligned-safe by value.
        let si = unsafe { std::ptr::read_unaligned(info.cast::<SigsysInfo>()) };
        let fd = REPORT_FD.load(Ordering::SeqCst);
        if let (true, Some(encode)) = (fd >= 0, ENCODER.get()) {
            let r = encode(u32::from_ne_bytes(si.syscall.to_ne_bytes()), si.arch);
            let len = r.len.min(r.bytes.len());
            // SAFETY: writes `len` bytes of a local buffer to an fd; no other memory is touched.
            unsafe { libc::write(fd, r.bytes.as_ptr().cast(), len) };
        }
    }
    // Die by SIGSYS. The disposition is SIG_DFL again (SA_RESETHAND) and SIGSYS is blocked in
    // the handler; a second forbidden call makes the kernel force SIGSYS through (unblocked,
    // default action), which ends the process even as the init of a PID namespace. reboot(2) is
    // denied by every policy, and with these arguments it would fail anyway.
    // SAFETY: a raw syscall with integer arguments only.
    unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) };
    // Not reached under a filter; without one, end the process the same way a shell reports it.
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(128 + libc::SIGSYS) }
}

/// Installs the SIGSYS handler of a service: on a trapped syscall it writes
/// `encode(syscall, arch)` to `report_fd` and the process then dies by SIGSYS. Also sets
/// `RLIMIT_CORE` to 0 (no core file for that death). Call it once, before [`install`].
pub fn install_sigsys_reporter(report_fd: RawFd, encode: ReportEncoder) -> Result<(), PolicyError> {
    let _ = ENCODER.set(encode);
    REPORT_FD.store(report_fd, Ordering::SeqCst);
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the rlimit we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(PolicyError::Reporter(std::io::Error::last_os_error()));
    }
    // SAFETY: a zeroed sigaction is a valid starting point; every field used is set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler for SIGSYS from a fully initialised sigaction; the handler only
    // makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(PolicyError::Reporter(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_table() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(59), Some("execve"));
        assert_eq!(syscall_name(257), Some("openat"));
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
        assert_eq!(syscall_number("ioctl"), Some(16));
        assert!(syscalls().len() > 300);
    }

    #[test]
    fn programs_are_embedded() {
        for p in Policy::ALL {
            let prog = p.program().expect("program");
            assert!(prog.len() > 10, "{p:?} has {} instructions", prog.len());
            assert!(p.json().contains(&format!("\"{}\"", p.name())), "{p:?}");
            assert!(p.syscalls().iter().any(|s| s == "write"), "{p:?}");
        }
    }

    #[test]
    fn actions_decode() {
        assert_eq!(Action::from_ret(0x7fff_0000), Action::Allow);
        assert_eq!(Action::from_ret(0x0003_0000), Action::Trap);
        assert_eq!(Action::from_ret(0x8000_0000), Action::KillProcess);
        assert_eq!(Action::from_ret(0x0005_0001), Action::Errno(1));
        assert_eq!(Action::from_ret(0x7fc0_0000), Action::Other(0x7fc0_0000));
    }
}
