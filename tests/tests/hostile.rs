//! The core against a compromised service: a stand-in (`hostile-service`, started by the real
//! core as the block service, jailed by the real jail and seccomp filter) forges a pong for a
//! ping never sent, reports counters at `u64::MAX`, sends a message with 200 fds and floods its
//! control channel, then hangs. The core must stay up, see through the forged pong and detect the
//! hang, add the counts without overflowing, keep its API answering, and leave the other service
//! (the console) alone.

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_tests::*;

/// A service directory where `bulkhead-block` is the hostile stand-in and the console is real.
fn hostile_service_dir(dir: &Path) -> std::path::PathBuf {
    let services = dir.join("services");
    std::fs::create_dir_all(&services).expect("mkdir");
    std::os::unix::fs::symlink(bin_dir().join("bulkhead-console"), services.join("bulkhead-console")).expect("link");
    // A link, not a wrapper script: services inherit the VM helper's seccomp filter, which runs
    // no shell; the stand-in takes its mode from the name it is started under.
    let hostile = env!("CARGO_BIN_EXE_hostile-service");
    std::os::unix::fs::symlink(hostile, services.join("bulkhead-block")).expect("link");
    services
}

fn devices(sock: &Path) -> serde_json::Value {
    let (s, b) = curl(sock, "GET", "/bulkhead/devices", None);
    assert_eq!(s, 200, "the API answers: {b}");
    serde_json::from_str(&b).expect("json")
}

fn device<'a>(all: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    all.as_array().expect("array").iter().find(|d| d["kind"] == kind).expect("device")
}

#[test]
fn a_hostile_service_cannot_hide_a_hang_or_break_the_core() {
    let dir = scratch("hostile");
    let services = hostile_service_dir(&dir);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).expect("create").set_len(1 << 20).expect("size");
    let serial = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let extra = [
        "--service-dir",
        services.to_str().expect("utf8"),
        "--api-sock",
        sock.to_str().expect("utf8"),
        "--service-liveness-ms",
        "200",
        "--service-deadline-ms",
        "500",
    ];
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(
        &serial,
        Some(&disk),
        "probe.test=ticker probe.n=1000000 probe.delay=20000",
        &extra,
    )));
    assert!(wait_for_serial(&serial, "tick 1\n", Duration::from_secs(30)), "the guest never ticked");
    // The hang is found through the forged pong, more than once (each new instance attacks too).
    let start = Instant::now();
    let mut seen = serde_json::Value::Null;
    while start.elapsed() < Duration::from_secs(30) {
        seen = devices(&sock);
        if device(&seen, "block")["restarts"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let block = device(&seen, "block");
    assert!(block["restarts"].as_u64().unwrap_or(0) >= 2, "hangs detected: {seen}");
    assert_eq!(block["requests_redone"].as_u64(), Some(u64::MAX), "counts saturate: {seen}");
    // The console, a peer, never noticed; the guest still ticks.
    assert_eq!(device(&seen, "console")["restarts"], 0, "{seen}");
    let ticks = |t: &str| t.matches("tick ").count();
    let before = ticks(&std::fs::read_to_string(&serial).unwrap_or_default());
    assert!(
        wait_until(Duration::from_secs(10), || ticks(&std::fs::read_to_string(&serial).unwrap_or_default()) > before),
        "the guest stopped ticking"
    );
    // Stop it as an operator would; the core exits on its own.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let r = child.finish(Duration::from_secs(60));
    assert!(r.status.code().is_some(), "the core exited (not killed by a signal): {:?}\n{}", r.status, r.stderr);
    assert!(r.stderr.contains("attack sent"), "the stand-in ran its attack:\n{}", r.stderr);
    let hangs = r.stderr.lines().filter(|l| l.contains("missed liveness deadline")).count();
    assert!(hangs >= 2, "the hangs were found by the liveness check despite the forged pong:\n{}", r.stderr);
    assert!(r.stderr.contains("never sent"), "the forged pong was seen and dropped:\n{}", r.stderr);
    let limited = r.stderr.lines().filter(|l| l.contains("never sent")).count();
    assert!(limited <= 40, "{limited} lines about forged pongs: the log is rate-limited");
}
