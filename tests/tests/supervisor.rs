//! The supervisor end to end (sandbox on, real binaries): a console service killed during output
//! is restarted and the guest's later output all appears; a restart cap marks the device failed
//! while the VM keeps running; `bulkhead fault` against a running VM; a hung service misses its
//! deadline and the exit in flight completes against the next instance; the block service killed
//! over a hundred times (SIGKILL, crash, abort, segfault) while the guest verifies its disk, with
//! no error in the guest, the pattern intact on the host and the console untouched.
//!
//! Output bound: a console write (`THR`) in flight when the service dies is redone against the
//! next instance, so at most that one byte is duplicated; bytes the dead instance had already
//! written are not lost. Ticks printed after the restart all appear.

use std::process::Command;
use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(90);

fn probe_args<'a>(probe: &'a str, out: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec!["--kernel", probe, "--serial-input", "none", "--serial-output", out, "--cmdline", cmdline]
}

fn console_of(core: u32) -> Option<ProcInfo> {
    children_of(core).into_iter().find(|p| p.exe.ends_with("bulkhead-console"))
}

fn ticks(serial: &str) -> Vec<u32> {
    serial.lines().filter_map(|l| l.strip_prefix("tick ")).filter_map(|n| n.trim().parse().ok()).collect()
}

#[test]
fn console_killed_during_output_is_restarted_and_later_ticks_all_appear() {
    let dir = scratch("sup-console-kill");
    let out = dir.join("serial.log");
    let probe = probe();
    let (p, o) = (probe.to_str().expect("utf8"), out.to_str().expect("utf8"));
    let child = bulkhead(&probe_args(p, o, "probe.test=ticker probe.n=60 probe.delay=5000")).spawn().expect("spawn");
    let core = child.id();
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&out).is_ok_and(|s| s.contains("tick 3\n"))),
        "guest never printed tick 3"
    );
    let first = console_of(core).expect("console child");
    // SAFETY: kill(2) has no memory-safety preconditions; `first.pid` is our child's child.
    assert_eq!(unsafe { libc::kill(i32::try_from(first.pid).expect("pid"), libc::SIGKILL) }, 0);
    let r = wait_bounded(child, LIMIT);
    let serial = std::fs::read_to_string(&out).expect("serial log");
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains("probe: verdict pass (0)"), "the guest finished through the new instance:\n{ctx}");
    // Every tick after the restart is there, in order; at most the one in flight is torn.
    let t = ticks(&serial);
    let last = *t.last().expect("ticks");
    assert_eq!(last, 60, "{ctx}");
    let missing: Vec<u32> = (1..=60).filter(|n| !t.contains(n)).collect();
    assert!(missing.len() <= 1, "ticks lost beyond the one in flight: {missing:?}\n{ctx}");
    let deaths: Vec<&str> = r.stderr.lines().filter(|l| l.contains(&format!("(pid {})", first.pid))).collect();
    assert_eq!(deaths.len(), 1, "one line per death:\n{ctx}");
    assert!(deaths[0].contains("ERROR") && deaths[0].contains("restarting"), "{ctx}");
    let recoveries = r.stderr.lines().filter(|l| l.contains("service console restarted as pid")).count();
    assert_eq!(recoveries, 1, "one line per recovery:\n{ctx}");
    assert!(r.stderr.contains("service console (pid") && r.stderr.contains("1 restarts"), "metrics on exit:\n{ctx}");
}

#[test]
fn restart_cap_marks_the_device_failed_and_the_vm_keeps_running() {
    let dir = scratch("sup-cap");
    let out = dir.join("serial.log");
    let probe = probe();
    let (p, o) = (probe.to_str().expect("utf8"), out.to_str().expect("utf8"));
    let mut args = probe_args(p, o, "probe.test=ticker probe.n=40 probe.delay=20000");
    args.extend(["--restart-max", "3/60", "--fault", "console:kill,after=100ms,every=100ms"]);
    let r = run_to_end(&args, LIMIT);
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "the guest finishes (its verdict reaches the debug-exit port):\n{ctx}");
    let failed: Vec<&str> = r.stderr.lines().filter(|l| l.contains("marked FAILED")).collect();
    assert_eq!(failed.len(), 1, "the failure is said once:\n{ctx}");
    assert!(failed[0].contains("service console") && failed[0].contains("restart cap reached"), "{ctx}");
    assert!(failed[0].contains("cap is 3 restarts per 60s"), "{ctx}");
    assert_eq!(r.stderr.matches("service console restarted as pid").count(), 3, "{ctx}");
    assert!(r.stderr.contains("guest stopped: guest wrote 0 to the debug-exit port"), "{ctx}");
    assert!(!serial.contains("tick 40"), "a failed console prints nothing:\n{ctx}");
}

#[test]
fn hung_console_misses_its_deadline_and_is_replaced() {
    let dir = scratch("sup-hang");
    let out = dir.join("serial.log");
    let probe = probe();
    let (p, o) = (probe.to_str().expect("utf8"), out.to_str().expect("utf8"));
    let mut args = probe_args(p, o, "probe.test=ticker probe.n=40 probe.delay=5000");
    // A deadline well above any scheduling hiccup of a loaded 2-CPU machine, so only the hang trips it.
    args.extend(["--service-deadline-ms", "1000", "--fault", "console:hang,after=150ms"]);
    let r = run_to_end(&args, LIMIT);
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(r.stderr.contains("fault injection: hang into service console"), "{ctx}");
    assert!(r.stderr.lines().any(|l| l.contains("no reply") && l.contains("restarting")), "{ctx}");
    assert!(r.stderr.matches("service console restarted as pid").count() >= 1, "{ctx}");
    let first_failure = r.stderr.lines().find(|l| l.contains("ERROR") && l.contains("service console")).unwrap_or("");
    assert!(first_failure.contains("no reply to a"), "the hang must be caught by the exit deadline: {first_failure}");
    assert!(serial.contains("tick 40") && serial.contains("probe: verdict pass (0)"), "{ctx}");
    assert!(r.stderr.contains("1 redone"), "the exit in flight was completed by the new instance:\n{ctx}");
}

#[test]
fn bulkhead_fault_crashes_the_console_of_a_running_vm() {
    let dir = scratch("sup-cli");
    let out = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let probe = probe();
    let (p, o, s) = (probe.to_str().expect("utf8"), out.to_str().expect("utf8"), sock.to_str().expect("utf8"));
    let mut args = probe_args(p, o, "probe.test=ticker probe.n=60 probe.delay=20000");
    args.extend(["--api-sock", s]);
    let child = bulkhead(&args).spawn().expect("spawn");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read_to_string(&out).is_ok_and(|t| t.contains("tick 2\n"))),
        "guest never printed tick 2"
    );
    let fault =
        Command::new(bin_dir().join("bulkhead")).args(["fault", s, "console", "crash"]).output().expect("fault");
    let fault_out = String::from_utf8_lossy(&fault.stdout).into_owned();
    assert!(fault.status.success(), "{fault:?}");
    assert!(fault_out.contains("crash injected into service console"), "{fault_out}");
    assert!(wait_until(Duration::from_secs(10), || {
        let st = Command::new(bin_dir().join("bulkhead")).args(["stats", s]).output().expect("stats");
        String::from_utf8_lossy(&st.stdout).contains("service console (pid")
            && String::from_utf8_lossy(&st.stdout).contains(": 1 restarts")
    }));
    let bad = Command::new(bin_dir().join("bulkhead")).args(["fault", s, "nosuch", "crash"]).output().expect("fault");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no device `nosuch`"), "{bad:?}");
    let r = wait_bounded(child, LIMIT);
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let ctx = format!("serial:\n{serial}\nstderr:\n{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    assert!(serial.contains("tick 60"), "{ctx}");
    assert!(r.stderr.contains("exited with status 86; restarting"), "{ctx}");
    assert!(!sock.exists(), "the socket is removed at exit");
}

/// At least 100 block-service deaths at staggered points (SIGKILL from the core, `_exit`,
/// `abort()`, a segfault) while the probe writes, flushes and reads back its disk round after
/// round: the guest sees no error and no mismatch, the host finds the last round's pattern on the
/// image, and the console service (a peer) prints every round's line in order, never restarted.
#[test]
fn block_service_killed_over_a_hundred_times_loses_nothing() {
    let dir = scratch("block-kills");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
    let serial = dir.join("serial.log");
    let probe = probe();
    let (seed, rounds) = (11u64, 300u64);
    let cmdline = format!("probe.test=blk-verify probe.seed={seed} probe.rounds={rounds} probe.timeout_ms=20000");
    let mut args = probe_args(probe.to_str().expect("utf8"), serial.to_str().expect("utf8"), &cmdline);
    let disk = image.to_str().expect("utf8");
    args.extend([
        "--disk",
        disk,
        "--restart-max",
        "1000/10",
        // The point is recovery, not the backoff: restart at once however often it fails.
        "--restart-burst",
        "1000/1",
        "--fault",
        "block:kill,after=200ms,every=100ms,count=60",
        "--fault",
        "block:crash,after=230ms,every=240ms,count=25",
        "--fault",
        "block:abort,after=260ms,every=240ms,count=25",
        "--fault",
        "block:segv,after=290ms,every=240ms,count=25",
    ]);
    let r = run_to_end(&args, Duration::from_secs(240));
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = format!("--- serial (tail)\n{}\n--- log (tail)\n{}", tail(&out, 20), tail(&r.stderr, 40));
    assert_eq!(r.status.code(), Some(0), "the guest must pass\n{ctx}");
    let summary =
        out.lines().find(|l| l.starts_with("blk-verify: sectors=")).unwrap_or_else(|| panic!("no summary\n{ctx}"));
    assert!(summary.contains(" mismatches=0 ioerrs=0 "), "{summary}\n{ctx}");
    assert!(summary.contains(&format!(" final_seed={}", seed + rounds - 1)), "{summary}");
    let restarts = r.stderr.lines().filter(|l| l.contains("service block-disk0 restarted as pid")).count();
    // Each of the 135 scheduled faults ends exactly one instance: one due while the previous
    // restart is under way waits for the new instance.
    assert_eq!(restarts, 60 + 25 + 25 + 25, "restarts\n{ctx}");
    let metrics = r
        .stderr
        .lines()
        .find(|l| l.contains("service block-disk0 (pid") && l.contains(" restarts ("))
        .unwrap_or_else(|| panic!("no metrics line\n{ctx}"));
    eprintln!("{metrics}");
    // The instances' own reports of the requests they found in flight and redid, against the
    // core's total (each instance answers a ping as soon as it has redone them; one killed in
    // the instant between may go uncounted).
    let reported: u64 = r
        .stderr
        .lines()
        .filter_map(|l| l.split("resumed from saved state, ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    let counted: u64 = metrics
        .split(" failed, ")
        .nth(1)
        .and_then(|t| t.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no device-requests-redone count in {metrics}"));
    eprintln!("requests redone: {counted} counted by the core, {reported} reported by the instances");
    assert!(counted <= reported && counted + 3 >= reported, "{counted} vs {reported}\n{ctx}");
    assert!(!r.stderr.contains("marked FAILED"), "{ctx}");
    // The console, a peer, printed every round in order and was never restarted.
    let seen: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("blk-verify: round "))
        .filter_map(|l| l.split('/').next()?.parse().ok())
        .collect();
    assert_eq!(seen, (1..=rounds).collect::<Vec<_>>(), "console output interrupted\n{ctx}");
    assert!(!r.stderr.contains("service console restarted"), "{ctx}");
    assert_eq!(bad_pattern_sectors(&image, seed + rounds - 1), 0, "the host sees a different pattern");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs blk-verify with `faults` on the block service (restarts at once, however often) and
/// checks the guest passed with no error and the host sees the last round's pattern. Returns the
/// core's log.
fn blk_verify_under(name: &str, seed: u64, rounds: u64, extra: &[&str]) -> String {
    let dir = scratch(name);
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
    let serial = dir.join("serial.log");
    let probe = probe();
    // The guest's own timeout is far above the liveness deadline and interval.
    let cmdline = format!("probe.test=blk-verify probe.seed={seed} probe.rounds={rounds} probe.timeout_ms=20000");
    let mut args = probe_args(probe.to_str().expect("utf8"), serial.to_str().expect("utf8"), &cmdline);
    args.extend(["--disk", image.to_str().expect("utf8"), "--restart-max", "1000/10", "--restart-burst", "1000/1"]);
    args.extend(extra);
    let r = run_to_end(&args, Duration::from_secs(240));
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = format!("--- serial (tail)\n{}\n--- log (tail)\n{}", tail(&out, 20), tail(&r.stderr, 40));
    assert_eq!(r.status.code(), Some(0), "the guest must pass\n{ctx}");
    let summary =
        out.lines().find(|l| l.starts_with("blk-verify: sectors=")).unwrap_or_else(|| panic!("no summary\n{ctx}"));
    assert!(summary.contains(" mismatches=0 ioerrs=0 "), "{summary}\n{ctx}");
    assert!(summary.contains(&format!(" final_seed={}", seed + rounds - 1)), "{summary}");
    assert!(!r.stderr.contains("marked FAILED"), "{ctx}");
    assert_eq!(bad_pattern_sectors(&image, seed + rounds - 1), 0, "the host sees a different pattern");
    let _ = std::fs::remove_dir_all(&dir);
    r.stderr
}

/// A hung block service whose guest only polls memory (no exit in flight) is caught by the
/// liveness check and replaced; the guest never notices. Detection takes between the deadline
/// and deadline + interval after the hang: 100 ms pings with a 500 ms deadline catch each hang
/// before the next one is injected 700 ms later (with the defaults, 250 ms and 1 s, a hang
/// injected into an instance that is already hung would be lost).
#[test]
fn hung_block_service_is_caught_by_the_liveness_check() {
    let log = blk_verify_under(
        "sup-liveness",
        5,
        80,
        &[
            "--service-liveness-ms",
            "100",
            "--service-deadline-ms",
            "500",
            "--fault",
            "block:hang,after=300ms,every=700ms,count=5",
        ],
    );
    let hangs = log.lines().filter(|l| l.contains("fault injection: hang into service block-disk0")).count();
    assert_eq!(hangs, 5, "{log}");
    let caught: Vec<&str> =
        log.lines().filter(|l| l.contains("missed liveness deadline") && l.contains("restarting")).collect();
    assert!(caught.len() >= 5, "only {} liveness restarts:\n{log}", caught.len());
    let restarts = log.lines().filter(|l| l.contains("service block-disk0 restarted as pid")).count();
    assert!(restarts >= 5, "{log}");
}

/// Seeded random faults (kill, crash, abort, segv and hang) during blk-verify: the guest passes.
#[test]
fn random_block_faults_including_hangs_are_recovered() {
    let log = blk_verify_under("sup-random", 9, 150, &["--fault", "block:random,seed=7,every=150ms,count=40"]);
    let injected = log.lines().filter(|l| l.contains("fault injection:") && l.contains("block-disk0")).count();
    assert!(injected >= 10, "{injected} faults injected:\n{log}");
    let restarts = log.lines().filter(|l| l.contains("service block-disk0 restarted as pid")).count();
    assert!(restarts >= 10, "{restarts} restarts:\n{log}");
}

/// Past the block service's restart cap the device is marked FAILED once, a last instance shows
/// DEVICE_NEEDS_RESET to the guest, whose driver stops at once with a clear line and the fail
/// verdict (long before its own timeout); the console keeps serving and the VM exits cleanly.
#[test]
fn block_past_its_cap_presents_needs_reset_and_the_guest_stops_promptly() {
    let dir = scratch("sup-blk-cap");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
    let serial = dir.join("serial.log");
    let probe = probe();
    // A 60 s guest timeout: the test asserts it stops well before it.
    let cmdline = "probe.test=blk-verify probe.seed=3 probe.rounds=100000 probe.timeout_ms=60000";
    let mut args = probe_args(probe.to_str().expect("utf8"), serial.to_str().expect("utf8"), cmdline);
    args.extend(["--disk", image.to_str().expect("utf8"), "--restart-max", "3/60", "--restart-burst", "1000/1"]);
    args.extend(["--fault", "block:kill,after=200ms,every=100ms"]);
    let started = std::time::Instant::now();
    let r = run_to_end(&args, LIMIT);
    let elapsed = started.elapsed();
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let ctx = format!("--- serial (tail)\n{}\n--- log (tail)\n{}", tail(&out, 20), tail(&r.stderr, 40));
    assert_eq!(r.status.code(), Some(1), "the guest's fail verdict, a clean VM exit\n{ctx}");
    assert!(elapsed < Duration::from_secs(45), "stopped after {elapsed:?}, not before the guest timeout\n{ctx}");
    let failed: Vec<&str> = r.stderr.lines().filter(|l| l.contains("marked FAILED")).collect();
    assert_eq!(failed.len(), 1, "the failure is said once:\n{ctx}");
    assert!(failed[0].contains("service block-disk0") && failed[0].contains("restart cap reached"), "{ctx}");
    assert!(failed[0].contains("DEVICE_NEEDS_RESET"), "{ctx}");
    assert!(!r.stderr.contains("falling back"), "the last instance kept serving:\n{ctx}");
    let lines: Vec<&str> = out.lines().collect();
    let at = lines.iter().position(|l| *l == "blk: device needs reset").unwrap_or_else(|| panic!("no line\n{ctx}"));
    // The console kept serving: the guest's lines after the failure reached the serial log.
    assert!(lines[at..].iter().any(|l| l.starts_with("blk-verify: sectors=")), "{ctx}");
    assert!(lines[at..].iter().any(|l| l.contains("probe: verdict fail")), "{ctx}");
    assert!(r.stderr.contains("guest stopped"), "{ctx}");
    let _ = std::fs::remove_dir_all(&dir);
}
