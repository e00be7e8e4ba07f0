//! `bulkhead-launcher CORE_PID ALIVE_FD`: the launcher of a split (`vmm-core/src/pidns.rs`), as
//! a program of its own, small enough that a waiting process costs next to nothing.
//!
//! The launcher is the pid the orchestrator started. Once the core is forked (pid 1 of a PID
//! namespace of its own) and the helper started, all it does is wait: it passes the termination
//! signals on to the core, and when the core ends it ends the same way (its exit code, or the
//! same signal). Run as a fresh image of `bulkhead` it kept ~140 KiB of its own (relocated
//! read-only data, `.data`, `.bss`, a heap and a stack), one more process per VM on a host that
//! runs hundreds. This image is a few pages: no libc, no allocator, no relocations (linked
//! static and position-dependent: it takes no input but its arguments and signals, and its stack
//! is still randomised).
//!
//! `vmm-core/build.rs` compiles it with the same `rustc` (`no_std`, `panic=abort`) and `bulkhead`
//! embeds it; the first image runs it from a sealed memfd (`pidns::launcher`). Where that is not
//! allowed (a host with `vm.memfd_noexec = 2`), a fresh image of `bulkhead` waits instead
//! (`pidns::launcher_main`), and failing that the first image itself, the same way.
//!
//! Signal dispositions the first image set survive the `execve`: SIGPIPE stays ignored (Rust's
//! runtime ignores it), so a message to a closed stderr cannot end the launcher.
//!
//! Contract with the first image, which execs this:
//! - the core is this process's child (checked: `waitid(WNOWAIT)`);
//! - the forwarded signals are blocked across the `execve`, so one sent meanwhile waits and is
//!   forwarded here (read from a signalfd);
//! - `ALIVE_FD` is the write end of the core's liveness pipe: open for this process's life,
//!   never written (the core sees it close when the launcher is gone).
//!
//! What it does, in order: check the arguments and the child; block SIGCHLD as well and open a
//! signalfd on the forwarded signals and SIGCHLD; keep only `CAP_KILL` (bounding, effective,
//! permitted; inheritable empty) and set `no_new_privs`; then read signals: SIGCHLD reaps the
//! core if it ended (`WNOHANG`: another child's end is not the core's), anything else is
//! forwarded to the core. Every wait is the `read` of one signal, and each read is acted on.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

// The entry point: the kernel leaves argc, argv[], NULL, envp[] at the stack pointer.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_RT_SIGACTION: usize = 13;
const SYS_RT_SIGPROCMASK: usize = 14;
const SYS_GETPID: usize = 39;
const SYS_FCNTL: usize = 72;
const SYS_KILL: usize = 62;
const SYS_CAPSET: usize = 126;
const SYS_PRCTL: usize = 157;
const SYS_EXIT_GROUP: usize = 231;
const SYS_WAITID: usize = 247;
const SYS_SIGNALFD4: usize = 289;

const SIGCHLD: usize = 17;
/// The signals the first image forwards (`pidns::FORWARDED`): SIGHUP, SIGINT, SIGQUIT, SIGUSR1,
/// SIGUSR2, SIGTERM.
const FORWARDED: [usize; 6] = [1, 2, 3, 10, 12, 15];

const F_GETFD: usize = 1;
const SIG_BLOCK: usize = 0;
const SIG_UNBLOCK: usize = 1;
const SFD_CLOEXEC: usize = 0o2000000;
const P_PID: usize = 1;
const WEXITED: usize = 4;
const WNOHANG: usize = 1;
const WNOWAIT: usize = 0x0100_0000;
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;
const PR_CAPBSET_DROP: usize = 24;
const PR_SET_NO_NEW_PRIVS: usize = 38;
const EINTR: isize = -4;
const EINVAL: isize = -22;
const CAP_KILL: u32 = 5;
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The exit code of a launcher started wrongly (as `bulkhead`'s usage errors).
const EXIT_USAGE: i32 = 2;
/// The exit code when waiting for the core fails (`EX_SOFTWARE`, as the first image).
const EXIT_SOFTWARE: i32 = 70;

/// A raw system call with up to five arguments. Returns the kernel's value: negative errno on
/// failure.
///
/// # Safety
/// The arguments must be valid for `nr`: any pointer among them must point to memory of the
/// size and kind the call reads or writes, valid for the call.
unsafe fn syscall(nr: usize, a: [usize; 5]) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction clobbers rcx and r11 and returns in rax; the caller
    // vouches for the arguments (this function's contract).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// A system call whose arguments are integers only (no pointer the kernel follows).
fn call(nr: usize, a: [usize; 5]) -> isize {
    // SAFETY: integers only: nothing of this process is read or written through them.
    unsafe { syscall(nr, a) }
}

fn exit(code: i32) -> ! {
    loop {
        call(SYS_EXIT_GROUP, [code as usize, 0, 0, 0, 0]);
    }
}

/// Writes `parts` to stderr, best effort (nothing to do if stderr is gone).
fn say(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: write reads `p.len()` bytes at `p`, a live slice.
        let _ = unsafe { syscall(SYS_WRITE, [2, p.as_ptr() as usize, p.len(), 0, 0]) };
    }
}

fn fail(what: &[u8], code: i32) -> ! {
    say(&[b"bulkhead-launcher: ", what, b"\n"]);
    exit(code)
}

// What the compiler may call without a libc to provide it (at any optimisation level): string
// instructions, so that no loop here can be turned back into a call to itself.

/// # Safety
/// `dst` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: copies `n` bytes forwards (the direction flag is clear, per the ABI), within the
    // ranges the caller vouches for.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` must be valid for `n` bytes.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, byte: i32, n: usize) -> *mut u8 {
    // SAFETY: stores `n` bytes forwards within the range the caller vouches for.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") byte.to_le_bytes()[0], options(nostack, preserves_flags));
    }
    dst
}

/// Never called (`panic=abort`: nothing unwinds); `core`'s unwind tables name it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    fail(b"internal error", EXIT_SOFTWARE)
}

/// The kernel's signal set (64 bits on x86_64).
fn set_of(signals: &[usize]) -> u64 {
    signals.iter().fold(0, |m, s| m | 1u64 << (s - 1))
}

fn sigprocmask(how: usize, set: u64) {
    // SAFETY: rt_sigprocmask reads an 8-byte set at a live local; the old set is not asked for.
    unsafe { syscall(SYS_RT_SIGPROCMASK, [how, &set as *const u64 as usize, 0, 8, 0]) };
}

/// A decimal number from a NUL-terminated argument, or `None` if it is not one.
///
/// # Safety
/// `arg` must point to a NUL-terminated string.
unsafe fn number(arg: *const u8) -> Option<i32> {
    let mut v: i32 = 0;
    let mut p = arg;
    // An i32 has at most 10 digits; a longer argument is refused, so the loop is bounded.
    for _ in 0..11 {
        // SAFETY: `p` stays within the string: each step reads one byte and stops at its NUL.
        let c = unsafe { *p };
        if c == 0 {
            return (p != arg).then_some(v);
        }
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i32::from(c - b'0'))?;
        // SAFETY: `c` was not the NUL, so the next byte is still the string's.
        p = unsafe { p.add(1) };
    }
    None
}

/// `siginfo_t` as `waitid` fills it (128 bytes): signo, errno, code, then for SIGCHLD the
/// child's pid, uid and status.
#[repr(C)]
struct WaitInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    pid: i32,
    uid: u32,
    status: i32,
    _rest: [u32; 25],
}

/// `waitid(P_PID, core, WEXITED | flags)`: `Some(info)` if the core has ended, `None` if it has
/// not (WNOHANG), `Err(errno)` on failure.
fn wait_core(core: i32, flags: usize) -> Result<Option<WaitInfo>, isize> {
    let mut info = WaitInfo { signo: 0, errno: 0, code: 0, _pad: 0, pid: 0, uid: 0, status: 0, _rest: [0; 25] };
    // SAFETY: waitid writes one siginfo_t (128 bytes) to a live local of that size; no rusage.
    let rc =
        unsafe { syscall(SYS_WAITID, [P_PID, core as usize, &mut info as *mut WaitInfo as usize, WEXITED | flags, 0]) };
    match rc {
        0 if info.pid == core => Ok(Some(info)),
        0 => Ok(None),
        e => Err(e),
    }
}

/// Keeps only `CAP_KILL`: out of the bounding set, the effective and the permitted sets, an empty
/// inheritable set; then `no_new_privs`. Reports what it could not do and goes on (the first
/// image does the same).
fn narrow() {
    let mut ok = true;
    for cap in (0..64usize).filter(|c| *c != CAP_KILL as usize) {
        let rc = call(SYS_PRCTL, [PR_CAPBSET_DROP, cap, 0, 0, 0]);
        // EINVAL past the last capability the kernel knows.
        ok &= rc == 0 || rc == EINVAL;
    }
    let header = [CAPABILITY_VERSION_3, 0];
    // Two words (capabilities 0-31, 32-63) of effective, permitted, inheritable.
    let data: [u32; 6] = [1 << CAP_KILL, 1 << CAP_KILL, 0, 0, 0, 0];
    // SAFETY: capset reads a v3 header (8 bytes) and two data words (24 bytes), both live locals.
    ok &= unsafe { syscall(SYS_CAPSET, [header.as_ptr() as usize, data.as_ptr() as usize, 0, 0, 0]) } == 0;
    if !ok {
        say(&[b"bulkhead-launcher: warning: keeps capabilities it does not need\n"]);
    }
    call(SYS_PRCTL, [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0]);
}

/// Ends as the core ended: by the same signal (its default action), or with its exit code.
fn end_as(info: &WaitInfo) -> ! {
    match info.code {
        CLD_KILLED | CLD_DUMPED => {
            let sig = info.status as usize;
            // SIG_DFL (a zero handler, no flags, no restorer, empty mask): a signal this process
            // was started with ignored would otherwise not end it.
            let act = [0u64; 4];
            // SAFETY: rt_sigaction reads a 32-byte kernel sigaction at a live local; the old one
            // is not asked for.
            unsafe { syscall(SYS_RT_SIGACTION, [sig, act.as_ptr() as usize, 0, 8, 0]) };
            sigprocmask(SIG_UNBLOCK, set_of(&[sig]));
            let me = call(SYS_GETPID, [0; 5]);
            call(SYS_KILL, [me as usize, sig, 0, 0, 0]);
            exit(128 + info.status)
        }
        CLD_EXITED => exit(info.status),
        _ => exit(EXIT_SOFTWARE),
    }
}

/// The entry: `stack` is the initial stack pointer (argc, then argv).
///
/// # Safety
/// Called once, by `_start`, with the stack the kernel set up for `execve`.
unsafe extern "C" fn start(stack: *const usize) -> ! {
    // SAFETY: the kernel's initial stack: argc, then argc pointers to NUL-terminated strings.
    let (core, alive) = unsafe {
        let argc = *stack;
        let argv = stack.add(1) as *const *const u8;
        if argc != 3 {
            fail(b"started by bulkhead only (CORE_PID ALIVE_FD)", EXIT_USAGE);
        }
        (number(*argv.add(1)), number(*argv.add(2)))
    };
    let (Some(core), Some(alive)) = (core.filter(|p| *p > 0), alive.filter(|f| *f > 2)) else {
        fail(b"started by bulkhead only (CORE_PID ALIVE_FD)", EXIT_USAGE);
    };
    // Only its own child: signals go nowhere else.
    if wait_core(core, WNOHANG | WNOWAIT).is_err() {
        fail(b"the core is not my child", EXIT_USAGE);
    }
    // The liveness pipe must be open (it stays open until exit).
    if call(SYS_FCNTL, [alive as usize, F_GETFD, 0, 0, 0]) < 0 {
        fail(b"the liveness fd is not open", EXIT_USAGE);
    }
    let set = set_of(&FORWARDED) | set_of(&[SIGCHLD]);
    sigprocmask(SIG_BLOCK, set);
    // SAFETY: signalfd4 reads an 8-byte set at a live local.
    let fd = unsafe { syscall(SYS_SIGNALFD4, [usize::MAX, &set as *const u64 as usize, 8, SFD_CLOEXEC, 0]) };
    if fd < 0 {
        fail(b"signalfd failed", EXIT_SOFTWARE);
    }
    narrow();
    // A SIGCHLD before it was blocked was discarded: look once before the first wait.
    let mut ended = wait_core(core, WNOHANG);
    loop {
        match ended {
            Ok(Some(info)) => end_as(&info),
            Ok(None) => {}
            Err(_) => fail(b"waiting for the core failed", EXIT_SOFTWARE),
        }
        // One `signalfd_siginfo` (128 bytes); the signal number comes first.
        let mut si = [0u32; 32];
        // SAFETY: read writes at most 128 bytes into a live local of 128 bytes.
        let n = unsafe { syscall(SYS_READ, [fd as usize, si.as_mut_ptr() as usize, 128, 0, 0]) };
        if n == EINTR {
            ended = Ok(None);
            continue;
        }
        if n != 128 {
            fail(b"reading signals failed", EXIT_SOFTWARE);
        }
        let sig = si[0] as usize;
        ended = if sig == SIGCHLD {
            wait_core(core, WNOHANG)
        } else {
            if FORWARDED.contains(&sig) {
                call(SYS_KILL, [core as usize, sig, 0, 0, 0]);
            }
            Ok(None)
        };
    }
}
