//! Data safety against operator mistakes and a careless host: disk images are locked to one VM,
//! the console log and the API socket never overwrite a file, the API socket is private, fault
//! injection over the API needs the VM's consent, and services start with nothing of the core's
//! environment and a bounded heap. Everything runs the real processes, sandbox on.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

fn image(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create image");
    f.write_all(bytes).expect("write image");
    f.set_len(1 << 20).expect("size image");
}

/// A probe VM that halts until it is stopped, with `disk` and `extra` arguments.
fn idle_vm(serial: &Path, disk: &Path, extra: &[&str]) -> VmChild {
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(serial, Some(disk), "probe.test=idle", extra)));
    assert!(wait_for_serial(serial, "idle: halting", LIMIT), "the idle VM never halted");
    child
}

/// Stops a VM with SIGTERM, as an operator would, and waits for it.
fn stop(child: VmChild) -> Finished {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.finish(LIMIT)
}

/// One VM holds a writable image: a second VM asking for it (writable or read-only), the same
/// image twice in one VM, and a console log pointed at it are all refused before anything
/// starts, and the image is untouched; once the first VM is gone the image is free again.
/// Read-only drives share an image.
#[test]
fn a_disk_image_belongs_to_one_vm_at_a_time() {
    let dir = scratch("safety-lock");
    let disk = dir.join("disk.img");
    image(&disk, b"precious data");
    let before = std::fs::read(&disk).expect("read");
    let first = idle_vm(&dir.join("a.log"), &disk, &[]);

    for (tag, spec) in [("rw", disk.display().to_string()), ("ro", format!("{},ro", disk.display()))] {
        let serial = dir.join(format!("second-{tag}.log"));
        let extra = ["--disk", spec.as_str()];
        let r = run_to_end(&probe_vm_args(&serial, None, "probe.test=hello", &extra), LIMIT);
        assert!(!r.status.success(), "a second VM got the image ({tag})\n{}", r.stderr);
        assert!(r.stderr.contains("is in use"), "{tag}: {}", r.stderr);
        assert!(!serial.exists(), "{tag}: refused before anything started (no console log)");
    }
    // The other VM's disk as a console log.
    let other = dir.join("other.img");
    image(&other, b"other");
    let r = run_to_end(
        &[
            "--kernel".as_ref(),
            probe().as_os_str(),
            "--serial-input".as_ref(),
            "none".as_ref(),
            "--serial-output".as_ref(),
            disk.as_os_str(),
            "--disk".as_ref(),
            other.as_os_str(),
            "--cmdline".as_ref(),
            "probe.test=hello".as_ref(),
        ],
        LIMIT,
    );
    assert!(!r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("it is a disk image"), "{}", r.stderr);
    let _ = stop(first);
    assert_eq!(std::fs::read(&disk).expect("read"), before, "nothing wrote the image");

    // Twice in one VM.
    let serial = dir.join("twice.log");
    let twice = format!("{},id=again", disk.display());
    let extra = ["--disk", twice.as_str()];
    let r = run_to_end(&probe_vm_args(&serial, Some(&disk), "probe.test=hello", &extra), LIMIT);
    assert!(!r.status.success() && r.stderr.contains("is in use"), "{}", r.stderr);

    // Free again, and shared read-only.
    let ro = format!("{},ro", disk.display());
    let a = VmChild::spawn(&mut bulkhead(&probe_vm_args(
        &dir.join("ro-a.log"),
        None,
        "probe.test=idle",
        &["--disk", ro.as_str()],
    )));
    assert!(wait_for_serial(&dir.join("ro-a.log"), "idle: halting", LIMIT), "first reader");
    let r =
        run_to_end(&probe_vm_args(&dir.join("ro-b.log"), None, "probe.test=hello", &["--disk", ro.as_str()]), LIMIT);
    assert_eq!(r.status.code(), Some(0), "a second reader shares the image\n{}", r.stderr);
    let _ = stop(a);
}

/// `--serial-output` never truncates: an existing non-empty file is refused and kept; with
/// `--serial-append` the console goes after its contents; the VM's own disk is refused.
#[test]
fn the_console_log_never_overwrites_a_file() {
    let dir = scratch("safety-serial");
    let log = dir.join("kept.txt");
    std::fs::write(&log, "earlier lines\n").expect("write");
    let r = run_to_end(&probe_vm_args(&log, None, "probe.test=hello", &[]), LIMIT);
    assert!(!r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("exists and is not empty"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&log).expect("read"), "earlier lines\n", "the file is untouched");

    let r = run_to_end(&probe_vm_args(&log, None, "probe.test=hello", &["--serial-append"]), LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let text = std::fs::read_to_string(&log).expect("read");
    assert!(text.starts_with("earlier lines\n") && text.contains("hello from the probe guest"), "{text}");

    // The VM's own disk (its first sectors hold data the guest owns).
    let disk = dir.join("disk.img");
    image(&disk, b"guest data");
    let before = std::fs::read(&disk).expect("read");
    let r = run_to_end(&probe_vm_args(&disk, Some(&disk), "probe.test=hello", &["--serial-append"]), LIMIT);
    assert!(!r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("it is a disk image"), "{}", r.stderr);
    assert_eq!(std::fs::read(&disk).expect("read"), before);
}

/// The API socket: made in a new 0700 directory, itself 0600, never put in place of a file that
/// is not a socket; clients that connect and send nothing do not stall the others; fault
/// injection is refused unless the VM allowed it.
#[test]
fn the_api_socket_is_private_and_guarded() {
    let dir = scratch("safety-api");
    // A regular file where the socket should go is refused and kept.
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, "not a socket").expect("write");
    let serial = dir.join("refused.log");
    let r = run_to_end(
        &probe_vm_args(&serial, None, "probe.test=hello", &["--api-sock", taken.to_str().expect("utf8")]),
        LIMIT,
    );
    assert!(!r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("is not a socket"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&taken).expect("read"), "not a socket");

    let sock = dir.join("run").join("vm").join("api.sock");
    let serial = dir.join("serial.log");
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(
        &serial,
        None,
        "probe.test=ticker probe.n=1000000 probe.delay=20000",
        &["--api-sock", sock.to_str().expect("utf8")],
    )));
    assert!(wait_for_serial(&serial, "tick 1\n", LIMIT), "guest never ticked");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(sock.parent().expect("dir")), 0o700, "the directory the core made");
    assert_eq!(mode(&sock), 0o600, "the socket");

    // Clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..24).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
    let (s, body) = curl(&sock, "GET", "/", None);
    assert_eq!(s, 200, "answered despite {} silent clients: {body}", idle.len());
    drop(idle);

    // An operator loosens the modes: the kernel now lets anyone connect, the server still checks
    // who the peer is (SO_PEERCRED) and answers only root and its own uid.
    for p in [sock.parent().and_then(Path::parent).expect("run"), sock.parent().expect("vm")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-s", "-m", "30", "-o", "-"])
        .args(["-w", "\n%{http_code}", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/")
        .output()
        .expect("run setpriv (util-linux) and curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    assert_eq!(code.trim(), "403", "another user is refused: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(fault_message(body).contains("only root and uid 0"), "{body}");
    let (s, body) = curl(&sock, "GET", "/", None);
    assert_eq!(s, 200, "root still is answered: {body}");

    let (s, body) = curl(&sock, "PUT", "/bulkhead/devices/console/fault", Some(r#"{"action": "kill"}"#));
    assert_eq!(s, 400, "{body}");
    assert!(fault_message(&body).contains("--allow-faults"), "{body}");
    let (_, devices) = curl(&sock, "GET", "/bulkhead/devices", None);
    let devices: serde_json::Value = serde_json::from_str(&devices).expect("json");
    assert_eq!(devices[0]["restarts"], 0, "nothing was injected: {devices}");
    let _ = stop(child);
    assert!(!sock.exists(), "the socket is removed at exit");

    // Bulkhead's own directory of VM sockets (`--id`) is for root only, whoever made it.
    let id = format!("safety-{}", std::process::id());
    let vmm = VmChild::spawn(
        Command::new(bin_dir().join("bulkhead"))
            .args(["--id", &id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let run_sock = Path::new("/run/bulkhead").join(format!("{id}.sock"));
    assert!(wait_until(LIMIT, || run_sock.exists()), "no socket at {}", run_sock.display());
    assert_eq!(mode(Path::new("/run/bulkhead")), 0o700);
    assert_eq!(mode(&run_sock), 0o600);
    let _ = stop(vmm);
    assert!(!run_sock.exists(), "removed at exit");
}

/// Services start with an empty environment (nothing of the core's) and a bounded data size.
#[test]
fn services_get_no_environment_and_a_bounded_heap() {
    let dir = scratch("safety-env");
    let disk = dir.join("disk.img");
    image(&disk, b"");
    let serial = dir.join("serial.log");
    let child = VmChild::spawn(
        bulkhead(&probe_vm_args(&serial, Some(&disk), "probe.test=idle", &[]))
            .env("BULKHEAD_TEST_SECRET", "do-not-leak"),
    );
    assert!(wait_for_serial(&serial, "idle: halting", LIMIT), "the idle VM never halted");
    for binary in ["bulkhead-console", "bulkhead-block"] {
        let svc = service_child(child.id(), binary).unwrap_or_else(|| panic!("no {binary}"));
        let env = std::fs::read(format!("/proc/{}/environ", svc.pid)).expect("environ");
        assert!(env.is_empty(), "{binary} has an environment: {}", String::from_utf8_lossy(&env));
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", svc.pid)).expect("limits");
        let data = limits.lines().find(|l| l.starts_with("Max data size")).expect("data line");
        let soft: u64 = data.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(soft > 0 && soft <= 64 << 20, "{binary}: {data}");
    }
    let _ = stop(child);
}

/// The console's value of a Prometheus counter from `GET /bulkhead/metrics`.
fn console_counter(sock: &Path, name: &str) -> Option<u64> {
    let (s, text) = curl(sock, "GET", "/bulkhead/metrics", None);
    if s != 200 {
        return None;
    }
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("kind=\"console\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The console on a pipe nobody reads: the guest keeps printing (the console's exits keep being
/// served), the console service is never restarted, the bytes it could not deliver are dropped
/// and counted, and what the pipe holds is the start of the output, in order.
#[test]
fn a_stalled_console_reader_never_stalls_the_guest() {
    let dir = scratch("safety-stall");
    let sock = dir.join("api.sock");
    let log = std::fs::File::create(dir.join("core.log")).expect("log");
    let mut child = VmChild::spawn(
        Command::new(bin_dir().join("bulkhead"))
            .arg("run")
            .arg("--kernel")
            .arg(probe())
            .args(["--serial-input", "none", "--api-sock"])
            .arg(&sock)
            .args(["--cmdline", "probe.test=ticker probe.n=100000000 probe.delay=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log),
    );
    let dropped = wait_until(LIMIT, || console_counter(&sock, "bulkhead_device_errors_total").is_some_and(|n| n > 0));
    let ctx = || std::fs::read_to_string(dir.join("core.log")).unwrap_or_default();
    assert!(dropped, "no output dropped for the stalled reader\n{}", ctx());
    // Bytes to THR are posted writes, the rest round trips: both count.
    let accesses = || {
        console_counter(&sock, "bulkhead_exits_forwarded_total").unwrap_or(0)
            + console_counter(&sock, "bulkhead_exits_posted_total").unwrap_or(0)
    };
    let before = accesses();
    std::thread::sleep(Duration::from_secs(1));
    assert!(accesses() > before + 100, "the guest kept printing\n{}", ctx());
    assert_eq!(console_counter(&sock, "bulkhead_device_restarts_total"), Some(0), "{}", ctx());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let mut out = child.child().stdout.take().expect("stdout");
    let mut head = [0u8; 64];
    std::io::Read::read_exact(&mut out, &mut head).expect("the pipe holds the start");
    assert!(head.starts_with(b"probe: start"), "{}", String::from_utf8_lossy(&head));
    drop(out);
    let mut status = None;
    assert!(
        wait_until(LIMIT, || {
            status = child.child().try_wait().ok().flatten();
            status.is_some()
        }),
        "the core did not stop\n{}",
        ctx()
    );
    assert!(status.and_then(|s| s.code()).is_some(), "the core exited on its own: {status:?}\n{}", ctx());
}
