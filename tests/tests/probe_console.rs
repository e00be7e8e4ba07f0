//! The probe guest through `bulkhead` and `bulkhead-console`: output, process separation, a
//! console service killed mid-run, bad input.

use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn hello_prints_through_the_console_service() {
    let probe = probe();
    let r = run_to_end(
        &["--kernel", probe.to_str().expect("utf8"), "--serial-input", "none", "--cmdline", "probe.test=hello"],
        LIMIT,
    );
    assert!(r.stdout.contains("probe: hello from the probe guest"), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("probe: verdict pass (0)"), "{}", r.stdout);
    assert_eq!(r.status.code(), Some(0), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("service console started as pid"), "{}", r.stderr);
    assert!(r.stdout.contains("probe: entry pvh\n"), "an ELF with a PVH note is entered through PVH:\n{}", r.stdout);
}

/// A guest that writes its console with `rep outsb` (one string instruction per 16-byte line):
/// every byte arrives, in order, none is refused, and the core logs no complaint. (Here PVM
/// hands such an instruction over one byte per exit; a host that batches string I/O hands over
/// several bytes at once, which this test would catch as lost lines.)
#[test]
fn string_port_output_reaches_the_console_in_full() {
    let probe = probe();
    let cmdline = "probe.test=pio-string probe.n=500";
    let r =
        run_to_end(&["--kernel", probe.to_str().expect("utf8"), "--serial-input", "none", "--cmdline", cmdline], LIMIT);
    assert_eq!(r.status.code(), Some(0), "stderr:\n{}", r.stderr);
    assert_eq!(r.stdout.matches("rep-outsb-line.\n").count(), 500, "{}", r.stdout);
    assert!(r.stdout.contains("pio-string: port=0x3f8 n=500 bytes=8000"), "{}", r.stdout);
    assert!(!r.stderr.contains("WARN"), "no complaint: {}", r.stderr);
    let line = r.stderr.lines().find(|l| l.contains("service console (pid") && l.contains("rejected")).unwrap_or("");
    assert!(line.contains(" 0 rejected"), "{line}");
    // The bytes to THR are posted writes: most never make the vCPU wait for the service.
    let posted = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" writes posted"))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(posted >= 1000, "THR writes posted: {line}");
}

/// `(forwarded, mirrored)` of the console from the core's closing metrics line.
fn console_counts(stderr: &str) -> (u64, u64) {
    let line =
        stderr.lines().find(|l| l.contains("service console (pid") && l.contains("exits forwarded")).unwrap_or("");
    let num = |after: &str| -> u64 {
        line.split(", ")
            .find(|p| p.ends_with(after))
            .and_then(|p| p.split_whitespace().rev().nth(after.split_whitespace().count()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (num("exits forwarded"), num("reads mirrored"))
}

/// The UART's line-status register is published in the read mirror: 2,000 guest reads of it are
/// answered by the core, not forwarded; the interrupt-identification register (a read clears an
/// interrupt) always makes the round trip to the service.
#[test]
fn side_effect_free_uart_reads_are_answered_from_the_mirror() {
    let probe = probe();
    let run = |port: &str| {
        let cmdline = format!("probe.test=pio-loop probe.n=2000 probe.port={port}");
        let r = run_to_end(
            &["--kernel", probe.to_str().expect("utf8"), "--serial-input", "none", "--cmdline", &cmdline],
            LIMIT,
        );
        assert_eq!(r.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("pio-loop:"), "{}", r.stdout);
        (console_counts(&r.stderr), r.stderr)
    };
    let ((fwd, mirrored), log) = run("0x3fd");
    assert!(mirrored >= 2000 && mirrored != u64::MAX, "LSR reads mirrored: {mirrored}\n{log}");
    assert!(fwd < 2000, "LSR reads were forwarded: {fwd}\n{log}");
    let ((fwd, mirrored), log) = run("0x3fa");
    assert!(fwd >= 2000 && fwd != u64::MAX, "IIR reads forwarded: {fwd}\n{log}");
    assert!(mirrored < 2000, "IIR reads must not be mirrored: {mirrored}\n{log}");
}

#[test]
fn an_elf_without_a_pvh_note_boots_through_the_64_bit_protocol() {
    let dir = scratch("no-pvh");
    let elf = dir.join("probe-no-pvh.elf");
    let out = std::process::Command::new("objcopy")
        .arg("--remove-section")
        .arg(".note.Xen")
        .arg(probe())
        .arg(&elf)
        .output()
        .expect("run objcopy");
    assert!(out.status.success(), "objcopy: {}", String::from_utf8_lossy(&out.stderr));
    let r = run_to_end(
        &["--kernel", elf.to_str().expect("utf8"), "--serial-input", "none", "--cmdline", "probe.test=hello probe.x=1"],
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("probe: entry linux64\n"), "{}", r.stdout);
    // The command line arrived through the zero page.
    assert!(r.stdout.contains("probe: start probe.test=hello probe.x=1"), "{}", r.stdout);
    assert!(r.stdout.contains("probe: verdict pass (0)"), "{}", r.stdout);
}

#[test]
fn console_is_a_separate_child_process() {
    let dir = scratch("separate");
    let out = dir.join("serial.log");
    let cmdline = "probe.test=ticker probe.n=30 probe.delay=20000";
    let child = bulkhead(&probe_vm_args(&out, None, cmdline, &[])).spawn().expect("spawn");
    let core = child.id();
    let mut console = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            console = service_child(core, "bulkhead-console");
            console.is_some()
        }),
        "no bulkhead-console child of {core}"
    );
    let console = console.expect("found");
    assert_ne!(console.pid, core);
    assert_ne!(console.pid, core_of(core));
    // The core's child, or after the split of a jailed start its helper's (docs/SECURITY.md).
    let helper = children_of(core).into_iter().find(|p| p.runs("bulkhead-helper")).map(|p| p.pid);
    assert!(console.ppid == core || Some(console.ppid) == helper, "{console:?}, helper {helper:?}");
    let r = wait_bounded(child, LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let serial = std::fs::read_to_string(&out).expect("serial log");
    assert!(serial.contains("tick 30"), "{serial}");
    assert!(r.stderr.contains(&format!("pid {}", console.pid)), "{}", r.stderr);
}

#[test]
fn killing_the_console_leaves_the_guest_running() {
    let dir = scratch("kill-console");
    let out = dir.join("serial.log");
    let cmdline = "probe.test=ticker probe.n=200 probe.delay=5000";
    // Restarts off: this is the fail-closed path (supervisor.rs tests the restart).
    let child = bulkhead(&probe_vm_args(&out, None, cmdline, &["--restart-max", "0/10"])).spawn().expect("spawn");
    let core = child.id();
    assert!(wait_for_serial(&out, "tick 3\n", Duration::from_secs(30)), "guest never printed tick 3");
    let console = service_child(core, "bulkhead-console").expect("console child");
    // SAFETY-free: kill(2) through the libc crate on a pid we just read from /proc.
    let rc = unsafe_kill(console.pid);
    assert_eq!(rc, 0, "kill failed");
    let r = wait_bounded(child, LIMIT);
    // The guest ran to its end: the probe's verdict (0 = pass) is the exit status.
    assert_eq!(r.status.code(), Some(0), "stderr:\n{}", r.stderr);
    let serial = std::fs::read_to_string(&out).expect("serial log");
    assert!(!serial.contains("tick 200"), "the console kept printing after SIGKILL?\n{serial}");
    let failures = r.stderr.lines().filter(|l| l.contains("ERROR") && l.contains("console")).count();
    assert_eq!(failures, 1, "the death must be logged exactly once:\n{}", r.stderr);
    assert!(r.stderr.contains("guest stopped: guest wrote 0 to the debug-exit port"), "{}", r.stderr);
}

fn unsafe_kill(pid: u32) -> i32 {
    let pid = i32::try_from(pid).expect("pid fits");
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child of our child.
    unsafe { libc::kill(pid, libc::SIGKILL) }
}

#[test]
fn unknown_probe_test_is_bad_args() {
    let probe = probe();
    let r = run_to_end(
        &["--kernel", probe.to_str().expect("utf8"), "--serial-input", "none", "--cmdline", "probe.test=nope"],
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(2));
    assert!(r.stdout.contains("probe: unknown test nope"), "{}", r.stdout);
}

fn assert_clean_error(args: &[&str], needle: &str) {
    let r = run_to_end(args, Duration::from_secs(20));
    assert!(!r.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line for {args:?}:\n{}", r.stderr);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}

#[test]
fn bad_input_gives_one_clear_error() {
    let probe = probe();
    let p = probe.to_str().expect("utf8");
    assert_clean_error(&["--kernel", "/nonexistent/vmlinux"], "/nonexistent/vmlinux");
    let dir = scratch("bad-input");
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x42u8; 4096]).expect("write");
    assert_clean_error(&["--kernel", junk.to_str().expect("utf8")], "not a bootable kernel");
    let long = "x".repeat(5000);
    assert_clean_error(&["--kernel", p, "--cmdline", &long], "command line");
    assert_clean_error(&["--kernel", p, "--mem", "1048576"], "memory");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    assert_clean_error(&["--kernel", p, "--service-dir", empty.to_str().expect("utf8")], "bulkhead-console");
    assert_clean_error(&["--kernel", p, "--no-such-flag"], "--no-such-flag");
}
