//! The request sequences the orchestrators that drive `firecracker` send, replayed against
//! `bulkhead` (docs/ORCHESTRATION.md says where each comes from in their source):
//!
//! - Kata Containers' Go runtime (`virtcontainers/fc.go`): `--version` parsed for a semantic
//!   version, then `--api-sock S --config-file fcConfig.json` (boot source, machine config with
//!   `smt`, logger and metrics FIFOs it reads, a read-only `rootfs` drive and eight empty
//!   placeholder drives, a NIC with empty rate limiters), `GET /` polled every 10 ms until
//!   `Running`, then `PATCH /drives/drive_N` to hot-swap a placeholder, and SIGTERM to stop.
//! - firecracker-go-sdk's default handlers, as firecracker-containerd runs them: `--api-sock
//!   firecracker.sock --id ID` (relative to the VMM's working directory), `GET /machine-config`
//!   polled until the socket answers (the SDK gives up after 3 s), then `PUT /logger`, `PUT
//!   /metrics`, `PUT /machine-config` (with `cpu_template` `T2`) and `GET /machine-config`, `PUT
//!   /boot-source`, `PUT /drives/{id}` (root drive last, relative paths), `PUT
//!   /network-interfaces/1`, `InstanceStart`, `PATCH /vm`, and `SendCtrlAltDel` to stop. Each
//!   request must answer within the SDK's timeouts (500 ms; 250 ms for `PUT /drives`).
//!
//! vsock, which both also configure, is not supported yet: the sequences are replayed without
//! it (and its refusal is checked).

use std::io::BufRead;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_tests::linux::LiveVm;
use bulkhead_tests::*;
use vmm_core::api_client::{request, Answer};

/// One request within `limit` (the client's timeout): the answer and how long it took.
fn timed(sock: &Path, method: &str, path: &str, body: Option<&str>, limit: Duration) -> (Answer, Duration) {
    let t = Instant::now();
    let a = request(sock, method, path, body, limit).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (a, t.elapsed())
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().expect("utf8")).expect("path");
    // SAFETY: mkfifo(3) reads the NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
}

/// Reads a FIFO line by line (as Kata does) on a thread, until the writer closes it.
fn fifo_reader(p: &Path) -> std::thread::JoinHandle<Vec<String>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut r = std::io::BufReader::new(f);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) if !lines.is_empty() => break,
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(20)),
                Ok(_) => lines.push(line.trim_end().to_string()),
            }
        }
        lines
    })
}

/// The probe's pattern for `seed` over `bytes`.
fn pattern_image(path: &Path, seed: u64, bytes: u64) {
    let mut data = Vec::new();
    for s in 0..bytes / 512 {
        for w in 0..64u64 {
            data.extend_from_slice(&splitmix64(seed ^ (s << 16) ^ w).to_le_bytes());
        }
    }
    std::fs::write(path, data).expect("write image");
}

#[test]
fn version_is_what_kata_parses() {
    // Kata: the first line, split on a space, second word, `v` trimmed, strict semver >= 0.21.1.
    let parse = |out: &[u8]| -> (u64, u64, u64) {
        let text = String::from_utf8_lossy(out).into_owned();
        let first = text.lines().next().expect("a line").to_string();
        let word = first.split(' ').nth(1).unwrap_or_else(|| panic!("no second word in `{first}`"));
        let v: Vec<u64> = word.trim().trim_start_matches('v').split('.').map(|n| n.parse().expect("number")).collect();
        assert_eq!(v.len(), 3, "MAJOR.MINOR.PATCH: `{first}`");
        (v[0], v[1], v[2])
    };
    let out = Command::new(bin_dir().join("bulkhead")).arg("--version").output().expect("run");
    assert!(out.status.success());
    let own = parse(&out.stdout);
    assert_eq!(format!("{}.{}.{}", own.0, own.1, own.2), env!("CARGO_PKG_VERSION"));
    // Installed as Kata's `firecracker` (a link), it names the API version it serves.
    let dir = scratch("orch-version");
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(bin_dir().join("bulkhead"), &link).expect("symlink");
    let out = Command::new(&link).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(parse(&out.stdout) >= (0, 21, 1), "Kata needs at least 0.21.1: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn kata_go_runtime_sequence() {
    let dir = scratch("orch-kata");
    let ns = NetNs::new("kata");
    ns.add_tap("tap0_kata");
    let (sock, cfg) = (dir.join("firecracker.socket"), dir.join("fcConfig.json"));
    let (logs, metrics) = (dir.join("logs.fifo"), dir.join("metrics.fifo"));
    mkfifo(&logs);
    mkfifo(&metrics);
    let log_lines = fifo_reader(&logs);
    let metric_lines = fifo_reader(&metrics);
    let rootfs = dir.join("rootfs");
    pattern_image(&rootfs, 5, 1 << 20);
    let mut drives = vec![serde_json::json!({
        "drive_id": "rootfs", "path_on_host": rootfs, "is_read_only": true, "is_root_device": false
    })];
    for i in 0..8 {
        let p = dir.join(format!("drive_{i}"));
        std::fs::File::create(&p).expect("placeholder");
        drives.push(serde_json::json!({
            "drive_id": format!("drive_{i}"), "path_on_host": p, "is_read_only": false,
            "is_root_device": false, "cache_type": "Unsafe"
        }));
    }
    // The guest waits for the first placeholder to hold a disk with pattern 21.
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe(),
            "boot_args": "probe.test=blk-check probe.blk=1 probe.seed=21 probe.tries=20000 probe.delay=2000 \
                          reboot=k panic=1 pci=off"
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128, "smt": false },
        "logger": { "level": "Error", "log_path": logs },
        "metrics": { "metrics_path": metrics },
        "drives": drives,
        "network-interfaces": [{
            "iface_id": "eth0", "host_dev_name": "tap0_kata", "guest_mac": "02:00:00:00:00:42",
            "rx_rate_limiter": {}, "tx_rate_limiter": {}
        }]
    });
    std::fs::write(&cfg, config.to_string()).expect("config");
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.arg("--api-sock").arg(&sock).arg("--config-file").arg(&cfg);
    let vm = LiveVm::spawn(&mut cmd, Some(&ns));
    // GET / every 10 ms until Running, at most 10 s (connection errors retried).
    let start = Instant::now();
    let mut running = false;
    while start.elapsed() < Duration::from_secs(10) && !running {
        if let Ok(a) = request(&sock, "GET", "/", None, Duration::from_secs(1)) {
            let v: serde_json::Value = serde_json::from_str(&a.body).expect("GET / is JSON");
            running = v["state"] == "Running";
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(running, "not Running within 10 s\n{}", vm.context());
    // The guest found the placeholder empty (Kata plugs a disk in only when a container needs it).
    let mut vm = vm;
    assert!(vm.wait_console_from(0, "blk: capacity=0 sectors", Duration::from_secs(30)).is_some(), "{}", vm.context());
    // Hot-plug into the first placeholder.
    let disk = dir.join("container.img");
    pattern_image(&disk, 21, 1 << 20);
    // The jailed core sees its jail directory only, as the VM's uid: Kata puts a jailed VMM's
    // files there and names them relative to it.
    let disk = give_to_vm(&sock, vm.pid(), &disk);
    let body = serde_json::json!({ "drive_id": "drive_0", "path_on_host": disk.path }).to_string();
    let (a, _) = timed(&sock, "PATCH", "/drives/drive_0", Some(&body), Duration::from_secs(5));
    assert_eq!(a.status, 204, "{}", a.body);
    let r = vm.finish(Duration::from_secs(120));
    assert!(r.stdout.contains("blk-check: seed=21 found after"), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("configuration changed since the last instance"), "a media change: {}", r.stderr);
    // The metrics FIFO got JSON lines with Firecracker's `block` object.
    let lines = metric_lines.join().expect("metrics reader");
    let last: serde_json::Value = serde_json::from_str(lines.last().expect("a metrics line")).expect("JSON line");
    assert!(last["block"]["read_bytes"].as_u64().is_some(), "{last}");
    assert!(lines.iter().all(|l| l.len() < 64 << 10), "Kata's reader takes lines under 64 KiB");
    let _ = log_lines.join();
}

#[test]
fn kata_stops_the_vmm_with_sigterm() {
    let dir = scratch("orch-sigterm");
    let sock = dir.join("fc.sock");
    let cfg = dir.join("fcConfig.json");
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": probe(), "boot_args": "probe.test=ticker probe.n=100000 probe.delay=20000" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64, "smt": false }
    });
    std::fs::write(&cfg, config.to_string()).expect("config");
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.arg("--api-sock").arg(&sock).arg("--config-file").arg(&cfg);
    let mut vm = LiveVm::spawn(&mut cmd, None);
    assert!(vm.wait_console_from(0, "tick 1", Duration::from_secs(30)).is_some(), "{}", vm.context());
    let pid = i32::try_from(vm.pid()).expect("pid");
    let t = Instant::now();
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let r = vm.finish(Duration::from_secs(15));
    assert!(t.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}", t.elapsed());
    assert_eq!(r.status.code(), Some(128 + libc::SIGTERM), "{}", r.stderr);
    assert!(!sock.exists(), "the socket is removed");
}

#[test]
fn firecracker_go_sdk_sequence_as_firecracker_containerd_runs_it() {
    let dir = scratch("orch-sdk");
    let ns = NetNs::new("sdk");
    ns.add_tap("tap_sdk");
    // Paths relative to the VMM's working directory, as firecracker-containerd passes them.
    pattern_image(&dir.join("root.img"), 9, 1 << 20);
    std::fs::write(dir.join("stub0"), vec![0u8; 512]).expect("stub");
    std::fs::copy(probe(), dir.join("kernel-image")).expect("kernel");
    mkfifo(&dir.join("fc-logs.fifo"));
    mkfifo(&dir.join("fc-metrics.fifo")); // nobody reads it: must not block the VMM
                                          // The log FIFO is read, as when a user passes firecracker-containerd a LogFifoPath.
    let log = fifo_reader(&dir.join("fc-logs.fifo"));
    let sock = dir.join("firecracker.sock");
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.current_dir(&dir).args(["--api-sock", "firecracker.sock", "--id", "4c9a4b3c-sdk", "--no-seccomp"]);
    let mut vm = LiveVm::spawn(&mut cmd, Some(&ns));
    // waitForSocket: GET /machine-config every 10 ms, 3 s at most.
    let start = Instant::now();
    let mut up = false;
    while start.elapsed() < Duration::from_secs(3) && !up {
        up = sock.exists()
            && request(&sock, "GET", "/machine-config", None, Duration::from_millis(500))
                .is_ok_and(|a| a.status == 200);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(up, "the socket did not answer within the SDK's 3 s\n{}", vm.context());
    let ms500 = Duration::from_millis(500);
    let steps: Vec<(&str, String, serde_json::Value, Duration)> = vec![
        (
            "PUT",
            "/logger".into(),
            serde_json::json!({"log_path": "fc-logs.fifo", "level": "Debug", "show_level": true, "show_log_origin": false}),
            ms500,
        ),
        ("PUT", "/metrics".into(), serde_json::json!({"metrics_path": "fc-metrics.fifo"}), ms500),
        (
            "PUT",
            "/machine-config".into(),
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "cpu_template": "T2", "track_dirty_pages": false}),
            ms500,
        ),
        (
            "PUT",
            "/boot-source".into(),
            serde_json::json!({"kernel_image_path": "kernel-image", "boot_args": "probe.test=kbd console=ttyS0 noapic reboot=k panic=1 pci=off nomodules rw"}),
            ms500,
        ),
        (
            "PUT",
            "/drives/MNZWK3TCGA".into(),
            serde_json::json!({"drive_id": "MNZWK3TCGA", "path_on_host": "stub0", "is_root_device": false, "is_read_only": false}),
            Duration::from_millis(250),
        ),
        (
            "PUT",
            "/drives/root_drive".into(),
            serde_json::json!({"drive_id": "root_drive", "path_on_host": "root.img", "is_root_device": true, "is_read_only": true, "partuuid": null, "rate_limiter": null}),
            Duration::from_millis(250),
        ),
        (
            "PUT",
            "/network-interfaces/1".into(),
            serde_json::json!({"iface_id": "1", "host_dev_name": "tap_sdk", "guest_mac": "02:00:00:00:00:09"}),
            ms500,
        ),
    ];
    for (method, path, body, limit) in &steps {
        let (a, took) = timed(&sock, method, path, Some(&body.to_string()), *limit);
        assert_eq!(a.status, 204, "{method} {path}: {}", a.body);
        assert!(took < *limit, "{method} {path} took {took:?}, the SDK waits {limit:?}");
        if path == "/machine-config" {
            let (g, _) = timed(&sock, "GET", "/machine-config", None, ms500);
            let m: serde_json::Value = serde_json::from_str(&g.body).expect("JSON");
            assert_eq!((m["vcpu_count"].as_u64(), m["cpu_template"].as_str()), (Some(1), Some("T2")), "{}", g.body);
        }
    }
    // vsock comes next in the SDK's chain: refused, for now, with a clear message.
    let (a, _) = timed(
        &sock,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 0, "uds_path": "firecracker.vsock", "vsock_id": "agent_api"}"#),
        ms500,
    );
    assert_eq!(a.status, 400);
    assert!(a.message().contains("vsock is not supported yet"), "{}", a.body);
    let (a, took) =
        timed(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#), Duration::from_secs(5));
    assert_eq!(a.status, 204, "{}", a.body);
    eprintln!("InstanceStart answered in {took:?}");
    let (a, _) = timed(&sock, "GET", "/vm/config", None, ms500);
    let cfg: serde_json::Value = serde_json::from_str(&a.body).expect("JSON");
    assert_eq!(cfg["drives"][0]["drive_id"], "root_drive", "the root drive is first (/dev/vda): {}", a.body);
    assert!(vm.wait_console_from(0, "kbd: waiting", Duration::from_secs(30)).is_some(), "{}", vm.context());
    for state in ["Paused", "Resumed"] {
        let (a, _) = timed(&sock, "PATCH", "/vm", Some(&format!(r#"{{"state": "{state}"}}"#)), Duration::from_secs(5));
        assert_eq!(a.status, 204, "{}", a.body);
    }
    let (a, _) = timed(&sock, "GET", "/", None, ms500);
    assert!(a.body.contains("\"Running\""), "{}", a.body);
    // Machine.Shutdown on x86: SendCtrlAltDel; the guest resets, the VMM exits.
    let (a, _) = timed(&sock, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#), ms500);
    assert_eq!(a.status, 204, "{}", a.body);
    let r = vm.finish(Duration::from_secs(30));
    assert!(r.stdout.contains("kbd: ctrl-alt-del, resetting"), "{}", r.stdout);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let log = log.join().expect("log reader").join("\n");
    assert!(log.contains("cpu_template T2 is not applied"), "{log}");
    assert!(log.contains("VM started") && log.contains("VM paused"), "the log went to the FIFO:\n{log}");
    assert!(!sock.exists());
}
