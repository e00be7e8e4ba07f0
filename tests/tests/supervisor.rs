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

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(90);

fn console_of(core: u32) -> Option<ProcInfo> {
    service_child(core, "bulkhead-console")
}

fn ticks(serial: &str) -> Vec<u32> {
    serial.lines().filter_map(|l| l.strip_prefix("tick ")).filter_map(|n| n.trim().parse().ok()).collect()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One test's probe VM: a scratch directory holding its serial log and, optionally, a zeroed
/// disk image.
struct ProbeVm {
    dir: Scratch,
    serial: PathBuf,
    disk: Option<PathBuf>,
}

/// What a finished probe VM left: the core's exit status and log, the guest's serial output and
/// the tail of both for assertion messages.
struct Outcome {
    status: ExitStatus,
    log: String,
    serial: String,
    ctx: String,
}

impl ProbeVm {
    fn new(name: &str) -> Self {
        let dir = scratch(name);
        Self { serial: dir.join("serial.log"), dir, disk: None }
    }

    /// With an 8 MiB disk image.
    fn with_disk(name: &str) -> Self {
        let mut vm = Self::new(name);
        let image = vm.dir.join("disk.img");
        std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
        vm.disk = Some(image);
        vm
    }

    fn args(&self, cmdline: &str, extra: &[&str]) -> Vec<OsString> {
        probe_vm_args(&self.serial, self.disk.as_deref(), cmdline, extra)
    }

    fn spawn(&self, cmdline: &str, extra: &[&str]) -> Child {
        bulkhead(&self.args(cmdline, extra)).spawn().expect("spawn bulkhead")
    }

    /// Runs the VM to its end (at most `limit`).
    fn run(&self, cmdline: &str, extra: &[&str], limit: Duration) -> Outcome {
        self.outcome(run_to_end(&self.args(cmdline, extra), limit))
    }

    /// Waits (at most `limit`) for a VM started with [`ProbeVm::spawn`].
    fn finish(&self, child: Child, limit: Duration) -> Outcome {
        self.outcome(wait_bounded(child, limit))
    }

    fn outcome(&self, r: Finished) -> Outcome {
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let ctx = format!("--- serial (tail)\n{}\n--- log (tail)\n{}", tail(&serial, 60), tail(&r.stderr, 60));
        Outcome { status: r.status, log: r.stderr, serial, ctx }
    }

    fn image(&self) -> &Path {
        self.disk.as_deref().expect("a VM with a disk")
    }

    /// Waits (at most `limit`) for `needle` in the serial log.
    fn wait_serial(&self, needle: &str, limit: Duration) -> bool {
        wait_for_serial(&self.serial, needle, limit)
    }
}

#[test]
fn console_killed_during_output_is_restarted_and_later_ticks_all_appear() {
    let vm = ProbeVm::new("sup-console-kill");
    let child = vm.spawn("probe.test=ticker probe.n=60 probe.delay=5000", &[]);
    let core = child.id();
    assert!(vm.wait_serial("tick 3\n", Duration::from_secs(30)), "guest never printed tick 3");
    let first = console_of(core).expect("console child");
    // SAFETY: kill(2) has no memory-safety preconditions; `first.pid` is our child's child.
    assert_eq!(unsafe { libc::kill(i32::try_from(first.pid).expect("pid"), libc::SIGKILL) }, 0);
    let Outcome { status, log, serial, ctx } = vm.finish(child, LIMIT);
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert!(serial.contains("probe: verdict pass (0)"), "the guest finished through the new instance:\n{ctx}");
    // Every tick after the restart is there, in order; at most the one in flight is torn.
    let t = ticks(&serial);
    let last = *t.last().expect("ticks");
    assert_eq!(last, 60, "{ctx}");
    let missing: Vec<u32> = (1..=60).filter(|n| !t.contains(n)).collect();
    assert!(missing.len() <= 1, "ticks lost beyond the one in flight: {missing:?}\n{ctx}");
    let deaths: Vec<&str> = log.lines().filter(|l| l.contains(&format!("(pid {})", first.pid))).collect();
    assert_eq!(deaths.len(), 1, "one line per death:\n{ctx}");
    assert!(deaths[0].contains("ERROR") && deaths[0].contains("restarting"), "{ctx}");
    let recoveries = log.lines().filter(|l| l.contains("service console restarted as pid")).count();
    assert_eq!(recoveries, 1, "one line per recovery:\n{ctx}");
    assert!(log.contains("service console (pid") && log.contains("1 restarts"), "metrics on exit:\n{ctx}");
}

#[test]
fn restart_cap_marks_the_device_failed_and_the_vm_keeps_running() {
    let vm = ProbeVm::new("sup-cap");
    let Outcome { status, log, serial, ctx } = vm.run(
        "probe.test=ticker probe.n=40 probe.delay=20000",
        &["--restart-max", "3/60", "--fault", "console:kill,after=100ms,every=100ms"],
        LIMIT,
    );
    assert_eq!(status.code(), Some(0), "the guest finishes (its verdict reaches the debug-exit port):\n{ctx}");
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("marked FAILED")).collect();
    assert_eq!(failed.len(), 1, "the failure is said once:\n{ctx}");
    assert!(failed[0].contains("service console") && failed[0].contains("restart cap reached"), "{ctx}");
    assert!(failed[0].contains("cap is 3 restarts per 60s"), "{ctx}");
    assert_eq!(log.matches("service console restarted as pid").count(), 3, "{ctx}");
    assert!(log.contains("guest stopped: guest wrote 0 to the debug-exit port"), "{ctx}");
    assert!(!serial.contains("tick 40"), "a failed console prints nothing:\n{ctx}");
}

#[test]
fn hung_console_misses_its_deadline_and_is_replaced() {
    let vm = ProbeVm::new("sup-hang");
    // A deadline well above any scheduling hiccup of a loaded 2-CPU machine, so only the hang trips it.
    let Outcome { status, log, serial, ctx } = vm.run(
        "probe.test=ticker probe.n=40 probe.delay=5000",
        &["--service-deadline-ms", "1000", "--fault", "console:hang,after=150ms"],
        LIMIT,
    );
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert!(log.contains("fault injection: hang into service console"), "{ctx}");
    assert!(log.lines().any(|l| l.contains("no reply") && l.contains("restarting")), "{ctx}");
    assert!(log.matches("service console restarted as pid").count() >= 1, "{ctx}");
    let first_failure = log.lines().find(|l| l.contains("ERROR") && l.contains("service console")).unwrap_or("");
    assert!(first_failure.contains("no reply to a"), "the hang must be caught by the exit deadline: {first_failure}");
    assert!(serial.contains("tick 40") && serial.contains("probe: verdict pass (0)"), "{ctx}");
    // The read that found the hang, and the byte posted before it (carried to the new ring).
    let redone = log
        .lines()
        .find(|l| l.contains("restarts (death to serving"))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" redone")))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        redone.is_some_and(|n| (1..=17).contains(&n)),
        "the exits in flight were completed by the new instance:\n{ctx}"
    );
}

#[test]
fn bulkhead_fault_crashes_the_console_of_a_running_vm() {
    let vm = ProbeVm::new("sup-cli");
    let sock = vm.dir.join("api.sock");
    let s = sock.to_str().expect("utf8");
    let child = vm.spawn("probe.test=ticker probe.n=60 probe.delay=20000", &["--api-sock", s, "--allow-faults"]);
    assert!(vm.wait_serial("tick 2\n", Duration::from_secs(30)), "guest never printed tick 2");
    let fault = bulkhead_cli(&["fault", s, "console", "crash"]);
    let fault_out = String::from_utf8_lossy(&fault.stdout).into_owned();
    assert!(fault.status.success(), "{fault:?}");
    assert!(fault_out.contains("crash injected into service console"), "{fault_out}");
    assert!(wait_until(Duration::from_secs(10), || {
        let st = bulkhead_cli(&["stats", s]);
        String::from_utf8_lossy(&st.stdout).contains("service console (pid")
            && String::from_utf8_lossy(&st.stdout).contains(": 1 restarts")
    }));
    let bad = bulkhead_cli(&["fault", s, "nosuch", "crash"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no device `nosuch`"), "{bad:?}");
    let Outcome { status, log, serial, ctx } = vm.finish(child, LIMIT);
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert!(serial.contains("tick 60"), "{ctx}");
    assert!(log.contains("exited with status 86; restarting"), "{ctx}");
    assert!(!sock.exists(), "the socket is removed at exit");
}

/// `bulkhead fault <sock> block corrupt-state` while the guest verifies its disk: the core
/// corrupts the block service's state region and kills the instance; the next instance refuses
/// the region and presents DEVICE_NEEDS_RESET instead of guessing, the guest's driver stops with
/// its needs-reset line and the fail verdict (long before its own timeout), the console (a peer)
/// keeps serving and is never restarted, and the VM exits cleanly with the guest's verdict.
#[test]
fn bulkhead_fault_corrupt_state_makes_the_block_device_need_a_reset() {
    let vm = ProbeVm::with_disk("sup-corrupt-state");
    let sock = vm.dir.join("api.sock");
    let s = sock.to_str().expect("utf8");
    // The driver checks the device status every quarter of its 20 s timeout while it waits: it
    // must stop on DEVICE_NEEDS_RESET at such a check, before the timeout.
    let cmdline = "probe.test=blk-verify probe.seed=21 probe.rounds=100000 probe.timeout_ms=20000";
    let child = vm.spawn(cmdline, &["--api-sock", s, "--allow-faults"]);
    assert!(vm.wait_serial("blk-verify: round 3/", Duration::from_secs(30)), "guest never verified round 3");
    let console_before = console_of(child.id()).expect("console child").pid;
    let injected = Instant::now();
    let fault = bulkhead_cli(&["fault", s, "block", "corrupt-state"]);
    let fault_out = String::from_utf8_lossy(&fault.stdout).into_owned();
    assert!(fault.status.success(), "{fault:?}");
    assert!(fault_out.contains("corrupt-state injected into service block-disk0 (pid"), "{fault_out}");
    // The device is not failed: the supervisor restarted it, and the new instance is what says no.
    assert!(
        wait_until(Duration::from_secs(10), || {
            String::from_utf8_lossy(&bulkhead_cli(&["stats", s]).stdout).contains(": 1 restarts")
        }),
        "the block service was not restarted"
    );
    assert_eq!(console_of(child.id()).map(|p| p.pid), Some(console_before), "the console was not touched");
    let Outcome { status, log, serial, ctx } = vm.finish(child, LIMIT);
    let elapsed = injected.elapsed();
    assert_eq!(status.code(), Some(1), "the guest's fail verdict, a clean VM exit\n{ctx}");
    assert!(
        elapsed < Duration::from_secs(20),
        "stopped {elapsed:?} after the fault, not before the guest timeout\n{ctx}"
    );
    // The core: the injection, the instance it killed, one restart, nothing marked failed.
    assert!(log.contains("fault injection: corrupt-state into service block-disk0 (pid"), "{ctx}");
    assert!(log.lines().any(|l| l.contains("service block-disk0 (pid") && l.contains("restarting")), "{ctx}");
    assert_eq!(log.matches("service block-disk0 restarted as pid").count(), 1, "{ctx}");
    assert!(!log.contains("marked FAILED"), "a refused region is the guest's to reset, not a failure:\n{ctx}");
    // The new instance: the region refused, no request redone from it.
    assert!(log.contains("saved device state refused, device needs reset"), "{ctx}");
    assert!(log.lines().any(|l| l.contains("saved state refused (") && l.ends_with("): device needs reset")), "{ctx}");
    assert!(!log.contains("resumed from saved state"), "a corrupt region must not be resumed from:\n{ctx}");
    // The guest: its driver saw DEVICE_NEEDS_RESET (status 0x40, nothing else) with requests
    // unanswered, stopped, summed up and failed; every line reached the serial log in order.
    let lines: Vec<&str> = serial.lines().collect();
    let at = lines.iter().position(|l| *l == "blk: device needs reset").unwrap_or_else(|| panic!("no line\n{ctx}"));
    let aborted = lines[at..]
        .iter()
        .find(|l| l.starts_with("blk-verify: aborted: device needs reset: "))
        .unwrap_or_else(|| panic!("no abort line\n{ctx}"));
    assert!(aborted.ends_with("request(s) unanswered, device status 0x40"), "{aborted}\n{ctx}");
    let summary = lines[at..]
        .iter()
        .find(|l| l.starts_with("blk-verify: sectors="))
        .unwrap_or_else(|| panic!("no summary after the abort\n{ctx}"));
    assert!(summary.contains(" mismatches=0 "), "no data went wrong before the reset: {summary}\n{ctx}");
    assert!(lines[at..].iter().any(|l| l.contains("probe: verdict fail")), "{ctx}");
    let rounds: Vec<u64> = lines[..at]
        .iter()
        .filter_map(|l| l.strip_prefix("blk-verify: round "))
        .filter_map(|l| l.split('/').next()?.parse().ok())
        .collect();
    assert!(rounds.len() >= 3, "{ctx}");
    assert_eq!(rounds, (1..=rounds.len() as u64).collect::<Vec<_>>(), "console output interrupted\n{ctx}");
    assert!(!log.contains("service console restarted"), "{ctx}");
    assert!(log.contains("guest stopped"), "{ctx}");
}

/// At least 100 block-service deaths at staggered points (SIGKILL from the core, `_exit`,
/// `abort()`, a segfault) while the probe writes, flushes and reads back its disk round after
/// round: the guest sees no error and no mismatch, the host finds the last round's pattern on the
/// image, and the console service (a peer) prints every round's line in order, never restarted.
#[test]
fn block_service_killed_over_a_hundred_times_loses_nothing() {
    let (seed, rounds) = (11u64, 300u64);
    let (log, out) = blk_verify_under(
        "block-kills",
        seed,
        rounds,
        &[
            "--fault",
            "block:kill,after=200ms,every=100ms,count=60",
            "--fault",
            "block:crash,after=230ms,every=240ms,count=25",
            "--fault",
            "block:abort,after=260ms,every=240ms,count=25",
            "--fault",
            "block:segv,after=290ms,every=240ms,count=25",
        ],
    );
    let ctx = format!("--- serial (tail)\n{}\n--- log (tail)\n{}", tail(&out, 20), tail(&log, 40));
    let restarts = log.lines().filter(|l| l.contains("service block-disk0 restarted as pid")).count();
    // Each of the 135 scheduled faults ends exactly one instance: one due while the previous
    // restart is under way waits for the new instance.
    assert_eq!(restarts, 60 + 25 + 25 + 25, "restarts\n{ctx}");
    let metrics = log
        .lines()
        .find(|l| l.contains("service block-disk0 (pid") && l.contains(" restarts ("))
        .unwrap_or_else(|| panic!("no metrics line\n{ctx}"));
    eprintln!("{metrics}");
    // The instances' own reports of the requests they found in flight and redid, against the
    // core's total (each instance answers a ping as soon as it has redone them; one killed in
    // the instant between may go uncounted).
    let reported: u64 = log
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
    // The console, a peer, printed every round in order and was never restarted.
    let seen: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("blk-verify: round "))
        .filter_map(|l| l.split('/').next()?.parse().ok())
        .collect();
    assert_eq!(seen, (1..=rounds).collect::<Vec<_>>(), "console output interrupted\n{ctx}");
    assert!(!log.contains("service console restarted"), "{ctx}");
}

/// Runs blk-verify with `faults` on the block service (restarts at once, however often) and
/// checks the guest passed with no error and the host sees the last round's pattern. Returns the
/// core's log and the guest's serial output.
fn blk_verify_under(name: &str, seed: u64, rounds: u64, faults: &[&str]) -> (String, String) {
    let vm = ProbeVm::with_disk(name);
    // The guest's own timeout is far above the liveness deadline and interval.
    let cmdline = format!("probe.test=blk-verify probe.seed={seed} probe.rounds={rounds} probe.timeout_ms=20000");
    // The point is recovery, not the backoff: restart at once however often it fails.
    let mut extra = vec!["--restart-max", "1000/10", "--restart-burst", "1000/1"];
    extra.extend(faults);
    let Outcome { status, log, serial, ctx } = vm.run(&cmdline, &extra, Duration::from_secs(240));
    assert_eq!(status.code(), Some(0), "the guest must pass\n{ctx}");
    let summary =
        serial.lines().find(|l| l.starts_with("blk-verify: sectors=")).unwrap_or_else(|| panic!("no summary\n{ctx}"));
    assert!(summary.contains(" mismatches=0 ioerrs=0 "), "{summary}\n{ctx}");
    assert!(summary.contains(&format!(" final_seed={}", seed + rounds - 1)), "{summary}");
    assert!(!log.contains("marked FAILED"), "{ctx}");
    assert_eq!(bad_pattern_sectors(vm.image(), seed + rounds - 1), 0, "the host sees a different pattern");
    (log, serial)
}

/// A hung block service whose guest only polls memory (no exit in flight) is caught by the
/// liveness check and replaced; the guest never notices. Detection takes between the deadline
/// and deadline + interval after the hang: 100 ms pings with a 500 ms deadline catch each hang
/// before the next one is injected 700 ms later (with the defaults, 250 ms and 1 s, a hang
/// injected into an instance that is already hung would be lost).
#[test]
fn hung_block_service_is_caught_by_the_liveness_check() {
    let (log, _) = blk_verify_under(
        "sup-liveness",
        5,
        300,
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
    // Each hang is caught by the liveness check, or (when the guest happens to read a register
    // of the hung instance, which a loaded machine makes likelier) by that exit's deadline.
    let by_ping = log.lines().filter(|l| l.contains("missed liveness deadline") && l.contains("restarting")).count();
    let by_exit = log.lines().filter(|l| l.contains("no reply to a") && l.contains("restarting")).count();
    assert!(by_ping >= 1 && by_ping + by_exit >= 5, "{by_ping} liveness + {by_exit} deadline restarts:\n{log}");
    let restarts = log.lines().filter(|l| l.contains("service block-disk0 restarted as pid")).count();
    assert!(restarts >= 5, "{log}");
}

/// Seeded random faults (kill, crash, abort, segv and hang) during blk-verify: the guest passes.
#[test]
fn random_block_faults_including_hangs_are_recovered() {
    let (log, _) = blk_verify_under("sup-random", 9, 150, &["--fault", "block:random,seed=7,every=150ms,count=40"]);
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
    let vm = ProbeVm::with_disk("sup-blk-cap");
    // A 60 s guest timeout: the test asserts it stops well before it. The kills start after 1 s,
    // when the guest has long set its driver up even on a loaded machine.
    let cmdline = "probe.test=blk-verify probe.seed=3 probe.rounds=100000 probe.timeout_ms=60000";
    let extra = ["--restart-max", "3/60", "--restart-burst", "1000/1", "--fault", "block:kill,after=1s,every=100ms"];
    let started = Instant::now();
    let Outcome { status, log, serial, ctx } = vm.run(cmdline, &extra, LIMIT);
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Some(1), "the guest's fail verdict, a clean VM exit\n{ctx}");
    assert!(elapsed < Duration::from_secs(45), "stopped after {elapsed:?}, not before the guest timeout\n{ctx}");
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("marked FAILED")).collect();
    assert_eq!(failed.len(), 1, "the failure is said once:\n{ctx}");
    assert!(failed[0].contains("service block-disk0") && failed[0].contains("restart cap reached"), "{ctx}");
    assert!(failed[0].contains("DEVICE_NEEDS_RESET"), "{ctx}");
    assert!(!log.contains("falling back"), "the last instance kept serving:\n{ctx}");
    let lines: Vec<&str> = serial.lines().collect();
    let at = lines.iter().position(|l| *l == "blk: device needs reset").unwrap_or_else(|| panic!("no line\n{ctx}"));
    // The console kept serving: the guest's lines after the failure reached the serial log.
    assert!(lines[at..].iter().any(|l| l.starts_with("blk-verify: sectors=")), "{ctx}");
    assert!(lines[at..].iter().any(|l| l.contains("probe: verdict fail")), "{ctx}");
    assert!(log.contains("guest stopped"), "{ctx}");
}
