//! The services' seccomp filters, end to end with the real binaries and the sandbox on: each
//! service told to attempt a forbidden action (`--inject-forbidden`) dies by SIGSYS, the core logs
//! the syscall by name, the guest keeps running and the other service keeps serving. Also: every
//! running service and the core's vCPU thread report `Seccomp: 2`.

use std::path::Path;
use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(120);
/// Where `WriteOutsideRoot` would write if it were not stopped.
const ESCAPE: &str = "/tmp/bulkhead-escape";

/// Action flag value and the syscall it must be stopped at, with its x86_64 number.
const ACTIONS: [(&str, &str, u32); 7] = [
    ("open-host-file", "openat", 257),
    ("execve", "execve", 59),
    ("inet-socket", "socket", 41),
    ("ptrace", "ptrace", 101),
    ("mount", "mount", 165),
    ("write-outside-root", "openat", 257),
    ("signal-all", "kill", 62),
];

fn action(name: &str) -> (&'static str, &'static str, u32) {
    *ACTIONS.iter().find(|a| a.0 == name).expect("known action")
}

/// The single log line saying `service` was killed by seccomp; asserts there is exactly one
/// error line about it and that it names the syscall.
fn assert_seccomp_line(stderr: &str, service: &str, syscall: &str, nr: u32) {
    let errors: Vec<&str> =
        stderr.lines().filter(|l| l.contains("ERROR") && l.contains(&format!("service {service} "))).collect();
    assert_eq!(errors.len(), 1, "want one error line about {service}:\n{stderr}");
    assert!(
        errors[0].contains("killed by seccomp: ") && errors[0].contains(&format!(": syscall {syscall} ({nr})")),
        "{:?} does not name {syscall} ({nr})",
        errors[0]
    );
    let pid_part = errors[0].split(&format!("service {service} (pid ")).nth(1).expect("pid");
    assert!(pid_part.split(')').next().is_some_and(|p| p.parse::<u32>().is_ok()), "{}", errors[0]);
}

/// The console is told to attempt `name` while the guest does block I/O: the console dies by
/// SIGSYS, the block service keeps serving and the guest finishes every round (its verdict is
/// the exit status and covers every byte read back).
fn console_attempts(name: &str) {
    let (flag, syscall, nr) = action(name);
    let dir = scratch(&format!("seccomp-console-{flag}"));
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(64 << 20).expect("size");
    let serial = dir.join("serial.log");
    let inject = format!("console:{flag}@150");
    // Enough rounds that the guest is still busy when the injection lands (~150 ms after boot).
    let (seed, rounds) = (7u64, 16u64);
    let cmdline = format!("probe.test=blk-verify probe.seed={seed} probe.rounds={rounds}");
    // The sandbox's own behaviour: a service killed by seccomp stays dead (restarts are tested in
    // supervisor.rs).
    let extra = ["--inject-forbidden", &inject, "--restart-max", "0/10"];
    let r = run_to_end(&probe_vm_args(&serial, Some(&image), &cmdline, &extra), LIMIT);
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = format!("--- serial\n{out}\n--- log\n{}", r.stderr);
    assert_seccomp_line(&r.stderr, "console", syscall, nr);
    assert_eq!(r.status.code(), Some(0), "the guest must finish and pass:\n{ctx}");
    assert!(r.stderr.contains("guest stopped: guest wrote 0 to the debug-exit port"), "{ctx}");
    assert!(!out.contains("blk-verify: sectors="), "the console died before the guest's summary:\n{ctx}");
    // The block service kept serving after the console died: the image holds the last round.
    assert_eq!(bad_pattern_sectors(&image, seed + rounds - 1), 0, "{ctx}");
    assert!(!r.stderr.lines().any(|l| l.contains("ERROR") && l.contains("service block")), "{ctx}");
    assert!(!Path::new(ESCAPE).exists(), "{ESCAPE} was written");
}

/// The block service is told to attempt `name` while the guest prints through the console: the
/// block service dies by SIGSYS, the console keeps serving, the guest ticks to the end.
fn block_attempts(name: &str) {
    let (flag, syscall, nr) = action(name);
    let dir = scratch(&format!("seccomp-block-{flag}"));
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(1 << 20).expect("size");
    let serial = dir.join("serial.log");
    let inject = format!("block:{flag}@200");
    let extra = ["--inject-forbidden", &inject, "--restart-max", "0/10"];
    let cmdline = "probe.test=ticker probe.n=25 probe.delay=5000";
    let r = run_to_end(&probe_vm_args(&serial, Some(&image), cmdline, &extra), LIMIT);
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = format!("--- serial\n{out}\n--- log\n{}", r.stderr);
    assert_seccomp_line(&r.stderr, "block-disk0", syscall, nr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    // The console kept serving after the block service died, to the guest's last line.
    assert!(out.contains("tick 25\n") && out.contains("probe: verdict pass (0)"), "{ctx}");
    let kill_at = r.stderr.find("killed by seccomp").expect("logged");
    assert!(r.stderr[..kill_at].contains("fault injection: telling service block-disk0"), "{ctx}");
    assert!(!r.stderr.lines().any(|l| l.contains("ERROR") && l.contains("service console")), "{ctx}");
    assert!(!Path::new(ESCAPE).exists(), "{ESCAPE} was written");
}

macro_rules! per_action {
    ($($console:ident, $block:ident: $name:literal;)*) => {$(
        #[test]
        fn $console() {
            console_attempts($name);
        }
        #[test]
        fn $block() {
            block_attempts($name);
        }
    )*};
}

per_action! {
    console_open_host_file, block_open_host_file: "open-host-file";
    console_execve, block_execve: "execve";
    console_inet_socket, block_inet_socket: "inet-socket";
    console_ptrace, block_ptrace: "ptrace";
    console_mount, block_mount: "mount";
    console_write_outside_root, block_write_outside_root: "write-outside-root";
    console_signal_all, block_signal_all: "signal-all";
}

#[test]
fn running_services_and_vcpu_threads_are_filtered() {
    let dir = scratch("seccomp-status");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(1 << 20).expect("size");
    let serial = dir.join("serial.log");
    let cmdline = "probe.test=ticker probe.n=200 probe.delay=5000";
    let child = bulkhead(&probe_vm_args(&serial, Some(&image), cmdline, &[])).spawn().expect("spawn");
    let vmm = child.id();
    assert!(wait_for_serial(&serial, "tick 2\n", Duration::from_secs(30)), "guest never printed tick 2");
    let core = core_of(vmm);
    let kids = services_of(vmm);
    let mut seen = Vec::new();
    for name in ["bulkhead-console", "bulkhead-block"] {
        let svc = kids.iter().find(|p| p.runs(name)).unwrap_or_else(|| panic!("no {name} child"));
        assert_eq!(proc_status_field(svc.pid, "Seccomp").as_deref(), Some("2"), "{name} is not filtered");
        assert_eq!(proc_status_field(svc.pid, "NoNewPrivs").as_deref(), Some("1"), "{name}");
        seen.push(name);
    }
    assert_eq!(thread_status_field(core, "vcpu0", "Seccomp").as_deref(), Some("2"), "vcpu0 is not filtered");
    // The main thread runs under `core-main` once the vCPUs run (docs/SECURITY.md).
    assert_eq!(proc_status_field(core, "Seccomp").as_deref(), Some("2"), "the core's main thread is not filtered");
    let _ = unsafe_kill(core);
    let r = wait_bounded(child, LIMIT);
    // SIGTERM is handled under the main thread's filter: a clean stop, services shut down.
    assert_eq!(r.status.code(), Some(128 + libc::SIGTERM), "{}", r.stderr);
    assert!(r.stderr.contains("guest stopped: VMM received signal 15"), "{}", r.stderr);
    assert_eq!(seen.len(), 2);
}

fn unsafe_kill(pid: u32) -> i32 {
    let pid = i32::try_from(pid).expect("pid fits");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) }
}
