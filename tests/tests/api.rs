//! The control plane end to end, through the real processes (sandbox on): `bulkhead` started
//! the way Kata and firecracker-containerd start `firecracker` (`--api-sock`, `--config-file`,
//! `--no-api`), driven with `curl --unix-socket` as Firecracker's getting-started guide does and
//! with the project's own client (`bulkhead ls`, `pause`, `stop`, ...).
//!
//! What is checked: the VM configured through the API boots and runs the probe; every endpoint
//! answers good input as Firecracker does and refuses bad input with a 400 and a
//! `fault_message`, changing nothing (`GET /vm/config` before and after); a paused VM's guest,
//! console, disk and services stand still; Ctrl-Alt-Del reaches the guest; readers are served
//! while another client pauses and resumes; a start that fails late leaves no process or thread
//! behind; several VMs are listed and stopped one at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_tests::linux::LiveVm;
use bulkhead_tests::*;

/// `bulkhead` with no subcommand on `sock` (id `id`), console on a pipe, no console input.
fn api_vmm(sock: &Path, id: &str) -> LiveVm {
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.arg("--api-sock").arg(sock).args(["--id", id]);
    let vm = LiveVm::spawn(&mut cmd, None);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "no API socket at {}", sock.display());
    vm
}

/// The probe's boot source body.
fn boot_source(cmdline: &str) -> String {
    serde_json::json!({ "kernel_image_path": probe(), "boot_args": cmdline }).to_string()
}

#[test]
fn configure_through_the_api_then_start_as_firecrackers_guide_does() {
    let dir = scratch("api-guide");
    let sock = dir.join("fc.sock");
    let vm = api_vmm(&sock, "guide");
    let (s, body) = curl(&sock, "GET", "/", None);
    assert_eq!(s, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(info["id"], "guide");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "Bulkhead");
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)).0, 204);
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot_source("probe.test=hello"))).0, 204);
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 64);
    assert_eq!(cfg["boot-source"]["boot_args"], "probe.test=hello");
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let r = vm.finish(Duration::from_secs(60));
    assert!(r.stdout.contains("probe: hello from the probe guest"), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn config_file_boots_the_same_vm_with_and_without_the_api() {
    let dir = scratch("api-config-file");
    let cfg = dir.join("vm.json");
    let text = serde_json::json!({
        "boot-source": { "kernel_image_path": probe(), "boot_args": "probe.test=hello" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64, "smt": false },
        "drives": [], "network-interfaces": [],
        "vsock": null, "balloon": null, "mmds-config": null
    });
    std::fs::write(&cfg, text.to_string()).expect("config");
    // --no-api: boots at once, no socket.
    let r = wait_bounded(
        Command::new(bin_dir().join("bulkhead"))
            .args(["--no-api", "--config-file"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
        Duration::from_secs(60),
    );
    assert!(r.stdout.contains("probe: hello from the probe guest"), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    // With the API as well: the VM runs (or has run) without an InstanceStart.
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.arg("--api-sock").arg(&sock).arg("--config-file").arg(&cfg);
    let vm = LiveVm::spawn(&mut cmd, None);
    let r = vm.finish(Duration::from_secs(60));
    assert!(r.stdout.contains("probe: hello from the probe guest"), "{}\n{}", r.stdout, r.stderr);
    // A file with a mistake: one clear error, status 78.
    std::fs::write(&cfg, r#"{"boot-source": {"kernel_image_path": "/k"}, "vsock": {"guest_cid": 3}}"#).expect("write");
    let out = bulkhead_cli(&["--no-api", "--config-file", cfg.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vsock is not supported yet"), "{out:?}");
}

#[test]
fn bad_requests_get_a_400_and_change_nothing() {
    let dir = scratch("api-bad");
    let sock = dir.join("api.sock");
    let vm = api_vmm(&sock, "bad");
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 2, "mem_size_mib": 96}"#)).0, 204);
    let config = || curl(&sock, "GET", "/vm/config", None).1;
    let before = config();
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(60_000));
    let missing_kernel = r#"{"kernel_image_path": "/no/such/vmlinux"}"#;
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("PUT", "/boot-source", Some("{not json"), "deserializing the json body"),
        ("PUT", "/boot-source", Some(&big), "larger than the limit of 51200"),
        ("GET", "/nope", None, "Invalid request method and/or path"),
        ("DELETE", "/machine-config", None, "Invalid request method and/or path"),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}"#),
            "unknown field `turbo`",
        ),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#), "vcpu_count must be"),
        ("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 0}"#), "mem_size_mib must be"),
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), "not supported before starting the microVM"),
        ("PUT", "/actions", Some(r#"{"action_type": "FlushMetrics"}"#), "before starting"),
        (
            "PUT",
            "/drives/root",
            Some(r#"{"drive_id": "data", "path_on_host": "/x", "is_root_device": true}"#),
            "does not match",
        ),
        (
            "PUT",
            "/drives/a-b",
            Some(r#"{"drive_id": "a-b", "path_on_host": "/x", "is_root_device": false}"#),
            "invalid drive id",
        ),
        ("PUT", "/network-interfaces/eth0", Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#), "does not match"),
        ("PUT", "/boot-source", Some(missing_kernel), "The kernel file cannot be opened"),
        ("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#), "without kernel configuration"),
        ("PUT", "/vsock", Some(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock", "vsock_id": "v"}"#), "not supported yet"),
        ("PUT", "/snapshot/create", Some("{}"), "not supported yet"),
        ("PUT", "/mmds", Some("{}"), "not planned"),
    ];
    for (method, path, body, want) in cases {
        let (status, answer) = curl(&sock, method, path, body);
        assert_eq!(status, 400, "{method} {path}: {answer}");
        let msg = fault_message(&answer);
        assert!(msg.contains(want), "{method} {path}: `{msg}` lacks `{want}`");
        assert_eq!(config(), before, "{method} {path} changed the configuration");
    }
    // The VMM is alive and the VM still not started.
    assert!(curl(&sock, "GET", "/", None).1.contains("\"Not started\""));
    // Two root devices: the second is refused.
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let drive = |id: &str| {
        serde_json::json!({ "drive_id": id, "path_on_host": img, "is_root_device": true, "is_read_only": true })
            .to_string()
    };
    assert_eq!(curl(&sock, "PUT", "/drives/root", Some(&drive("root"))).0, 204);
    let with_root = config();
    let (s, b) = curl(&sock, "PUT", "/drives/root2", Some(&drive("root2")));
    assert_eq!(s, 400);
    assert!(fault_message(&b).contains("root block device already exists"), "{b}");
    assert_eq!(config(), with_root);
    // After the start, configuration is refused.
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot_source("probe.test=ticker probe.n=100000"))).0, 204);
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#)).0, 204);
    let running = config();
    let (s, b) = curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#));
    assert_eq!((s, fault_message(&b).contains("after starting the microVM")), (400, true), "{b}");
    let (s, _) = curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(s, 400, "a second start");
    assert_eq!(config(), running);
    assert_eq!(curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#)).0, 204);
    let r = vm.finish(Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

/// CPU time of a live process, in ns.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_paused_vm_stands_still_then_finishes() {
    let dir = scratch("api-pause");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
    let cmdline = "probe.test=blk-verify probe.seed=3 probe.rounds=400 probe.timeout_ms=30000";
    let mut args = probe_vm_args(&serial, Some(&image), cmdline, &[]);
    args.extend(["--api-sock".into(), sock.clone().into_os_string()]);
    let child = bulkhead(&args).spawn().expect("spawn");
    let vmm = child.id();
    assert!(wait_for_serial(&serial, "blk-verify: round 3/", Duration::from_secs(60)), "guest never reached round 3");
    // Every vCPU's state, read by its own thread between two runs of the guest.
    let vcpus = || -> serde_json::Value {
        let (st, b) = curl(&sock, "GET", "/bulkhead/vcpus", None);
        assert_eq!(st, 200, "{b}");
        serde_json::from_str(&b).expect("json")
    };
    let running = vcpus();
    assert_eq!(running["vcpus"][0]["state"], "running", "{running}");
    assert_eq!(running["vcpus"][0]["errors"], serde_json::json!([]), "{running}");
    assert!(running["vcpus"][0]["exits"].as_u64().is_some_and(|n| n > 0), "{running}");
    // The I/O APIC: 24 pins, each either routed or masked.
    let io = &running["ioapic"];
    let routed = io["pins"].as_array().map_or(0, Vec::len);
    assert_eq!(routed + io["masked"].as_array().map_or(0, Vec::len), 24, "{running}");
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let paused = vcpus();
    assert_eq!(paused["vcpus"].as_array().map(Vec::len), Some(1), "{paused}");
    let v = &paused["vcpus"][0];
    assert_eq!((v["index"].as_u64(), v["state"].as_str()), (Some(0), Some("paused")), "{paused}");
    assert!(v["rip"].as_u64().is_some_and(|ip| ip > 0) && v["mp_state"].is_string(), "{paused}");
    assert!(v["lapic"]["irr"].is_array() && v["lapic"]["svr"].is_u64(), "the local APIC: {paused}");
    assert_eq!(vcpus()["vcpus"][0]["exits"], v["exits"], "a paused vCPU takes no exit");
    assert!(curl(&sock, "GET", "/", None).1.contains("\"Paused\""));
    let services: Vec<u32> = services_of(vmm).iter().map(|p| p.pid).collect();
    assert_eq!(services.len(), 2, "console and block");
    let snapshot = || (std::fs::read(&image).expect("image"), std::fs::read(&serial).expect("serial"));
    let cpu = || services.iter().map(|&p| cpu_ns(p)).sum::<u64>();
    let (disk0, console0) = snapshot();
    let cpu0 = cpu();
    std::thread::sleep(Duration::from_secs(2));
    let (disk1, console1) = snapshot();
    let used = cpu().saturating_sub(cpu0);
    assert!(disk0 == disk1, "the disk changed while paused");
    assert_eq!(console0, console1, "the console changed while paused");
    // The liveness pings are still answered (a few per second); nothing else runs.
    assert!(used < 50_000_000, "the services used {} ms of CPU in 2 s while paused", used / 1_000_000);
    eprintln!("paused 2 s: services used {:.1} ms of CPU", used as f64 / 1e6);
    // A paused VM's devices hold still: the block service reports its queue drained, its
    // positions equal to the guest's indices in guest memory.
    let (st, b) = curl(&sock, "GET", "/bulkhead/devices/block/state", None);
    assert_eq!(st, 200, "{b}");
    let state: serde_json::Value = serde_json::from_str(&b).expect("json");
    let pid = state["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("pid");
    assert!(services.contains(&pid), "the block service's pid {pid}: {b}");
    let v = &state["report"]["device"]["Virtio"];
    assert_ne!(v["status"].as_u64().expect("status") & 4, 0, "DRIVER_OK: {b}");
    let q = &v["queues"][0];
    assert_eq!(q["ready"], true, "{b}");
    assert_eq!(q["used_idx"], q["next_used"], "the used index in guest memory is the device's: {b}");
    assert_eq!(q["avail_idx"], q["next_avail"], "every request offered was taken: {b}");
    assert!(q["next_used"].as_u64().expect("next_used") > 0, "{b}");
    let ring = &state["report"]["ring"];
    assert_eq!(ring["taken"], ring["submitted"], "no exit waits on the ring of a paused VM: {b}");
    let (st, b) = curl(&sock, "GET", "/bulkhead/devices/console/state", None);
    assert_eq!(st, 200, "{b}");
    let uart: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert_eq!(uart["report"]["device"]["Uart"]["lsr"].as_u64().map(|l| l & 0x60), Some(0x60), "THRE|TEMT: {b}");
    let (st, b) = curl(&sock, "GET", "/bulkhead/devices/nosuch/state", None);
    assert_eq!((st, fault_message(&b).contains("no device `nosuch`")), (400, true), "{b}");
    let out = bulkhead_cli(&["inspect", sock.to_str().expect("utf8"), "--device", "block"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("\"Virtio\"") && text.contains("\"avail_event\""), "{text}");
    assert_eq!(curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0, 204);
    let r = wait_bounded(child, Duration::from_secs(240));
    let serial_text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(r.status.code(), Some(0), "the guest must pass after the resume\n{serial_text}\n{}", r.stderr);
    assert!(serial_text.contains(" mismatches=0 ioerrs=0 "), "{serial_text}");
    assert!(r.stderr.contains("VM paused") && r.stderr.contains("VM resumed"), "{}", r.stderr);
}

#[test]
fn ctrl_alt_del_reaches_the_guest_which_resets() {
    let dir = scratch("api-cad");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let mut args = probe_vm_args(&serial, None, "probe.test=kbd", &[]);
    args.extend(["--api-sock".into(), sock.clone().into_os_string()]);
    let child = bulkhead(&args).spawn().expect("spawn");
    assert!(wait_for_serial(&serial, "kbd: waiting", Duration::from_secs(30)), "guest not waiting");
    assert_eq!(curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#)).0, 204);
    let r = wait_bounded(child, Duration::from_secs(30));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(text.contains("kbd: ctrl-alt-del, resetting"), "{text}");
    assert_eq!(r.status.code(), Some(0), "the guest's reset ends the VMM cleanly\n{}", r.stderr);
    assert!(r.stderr.contains("guest requested a reset through the i8042"), "{}", r.stderr);
}

#[test]
fn readers_are_served_while_another_client_pauses_and_resumes() {
    let dir = scratch("api-readers");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let mut args = probe_vm_args(&serial, None, "probe.test=ticker probe.n=40 probe.delay=20000", &[]);
    args.extend(["--api-sock".into(), sock.clone().into_os_string()]);
    let child = bulkhead(&args).spawn().expect("spawn");
    assert!(wait_for_serial(&serial, "tick 1\n", Duration::from_secs(30)), "guest never ticked");
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let path = if i % 2 == 0 { "/" } else { "/bulkhead/metrics" };
                    let a = vmm_core::api_client::request(&sock, "GET", path, None, Duration::from_secs(10))
                        .unwrap_or_else(|e| panic!("reader {i}: {e}"));
                    assert_eq!(a.status, 200, "reader {i} {path}: {}", a.body);
                    if i % 2 == 0 {
                        let v: serde_json::Value = serde_json::from_str(&a.body).expect("GET / is JSON");
                        assert!(matches!(v["state"].as_str(), Some("Running" | "Paused")), "{}", a.body);
                    } else {
                        assert!(a.body.contains("bulkhead_vcpu_exits_total{"), "{}", a.body);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    for _ in 0..20 {
        for state in ["Paused", "Resumed"] {
            let body = format!(r#"{{"state": "{state}"}}"#);
            let a = vmm_core::api_client::request(&sock, "PATCH", "/vm", Some(&body), Duration::from_secs(10))
                .expect("pause/resume");
            assert_eq!(a.status, 204, "{}", a.body);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let answered: u32 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    assert!(answered >= 40, "only {answered} reads answered");
    let r = wait_bounded(child, Duration::from_secs(120));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(text.contains("tick 40\n") && text.contains("verdict pass"), "{text}");
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    eprintln!("{answered} reads answered during 20 pause/resume cycles");
}

/// The names of a process's threads.
fn threads(pid: u32) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    rd.flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect()
}

/// Threads a VM owns: vCPUs, service supervisors, the fault schedule.
fn vm_threads(pid: u32) -> Vec<String> {
    threads(pid).into_iter().filter(|n| n.starts_with("vcpu") || n.starts_with("sup-") || n == "faults").collect()
}

#[test]
fn a_start_that_fails_late_leaves_nothing_behind() {
    let dir = scratch("api-late-failure");
    let sock = dir.join("api.sock");
    let vm = api_vmm(&sock, "late");
    let (vmm, core) = (vm.pid(), core_of(vm.pid()));
    // An initrd larger than guest RAM: refused after the services started, when it is loaded.
    let initrd = dir.join("initrd.img");
    std::fs::File::create(&initrd).expect("create").set_len(40 << 20).expect("size");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)).0, 204);
    let boot =
        serde_json::json!({ "kernel_image_path": probe(), "initrd_path": initrd, "boot_args": "probe.test=hello" });
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot.to_string())).0, 204);
    let drive = serde_json::json!({ "drive_id": "d", "path_on_host": img, "is_root_device": false });
    assert_eq!(curl(&sock, "PUT", "/drives/d", Some(&drive.to_string())).0, 204);
    // The HTTP server's own pool has grown to what these requests need by now.
    let baseline = threads(core).len();
    let (s, b) = curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(s, 400, "{b}");
    assert!(fault_message(&b).contains("initrd"), "{b}");
    assert!(vm.log().contains("service block-d started as pid"), "the failure came after the services started");
    assert!(
        wait_until(Duration::from_secs(5), || services_of(vmm).is_empty()),
        "service processes left behind: {:?}",
        services_of(vmm)
    );
    assert!(
        wait_until(Duration::from_secs(5), || vm_threads(core).is_empty() && threads(core).len() <= baseline),
        "threads left behind: {:?} (baseline {baseline})",
        threads(core)
    );
    assert!(curl(&sock, "GET", "/", None).1.contains("\"Not started\""), "the VMM is alive, the VM not started");
    assert_eq!(curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#)).0, 204);
    let r = vm.finish(Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

#[test]
fn ls_lists_vms_and_stop_ends_one_of_them() {
    let dir = scratch("api-ls");
    let ids = ["lsa", "lsb", "lsc"];
    let sock = |id: &str| -> PathBuf { dir.join(format!("{id}.sock")) };
    for id in ids {
        let serial = dir.join(format!("{id}.serial"));
        let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
        args.extend(probe_vm_args(&serial, None, "probe.test=ticker probe.n=100000 probe.delay=20000", &[]));
        args.extend(["--id".into(), id.into(), "--api-sock".into(), sock(id).into_os_string(), "--detach".into()]);
        let out = Command::new(bin_dir().join("bulkhead")).args(&args).output().expect("run --detach");
        assert!(out.status.success(), "{out:?}");
    }
    let d = dir.to_str().expect("utf8");
    let ls = bulkhead_cli(&["ls", "--dir", d]);
    let table = String::from_utf8_lossy(&ls.stdout).into_owned();
    for id in ids {
        let line = table.lines().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} not listed:\n{table}"));
        assert!(line.contains("Running"), "{line}");
    }
    let json = bulkhead_cli(&["ls", "--dir", d, "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["vcpus"] == 1 && r["devices"] == 1), "{rows:?}");
    let pause = bulkhead_cli(&["pause", sock("lsa").to_str().expect("utf8")]);
    assert!(pause.status.success(), "{pause:?}");
    // The ticker ignores Ctrl-Alt-Del: `stop` ends it after its timeout.
    let started = Instant::now();
    let stop = bulkhead_cli(&["stop", sock("lsb").to_str().expect("utf8"), "--timeout", "1"]);
    assert!(stop.status.success(), "{stop:?}");
    assert!(started.elapsed() >= Duration::from_secs(1), "stopped before the guest's grace period");
    let table = String::from_utf8_lossy(&bulkhead_cli(&["ls", "--dir", d]).stdout).into_owned();
    assert!(!table.contains("lsb"), "stopped VM still listed:\n{table}");
    assert!(table.lines().any(|l| l.starts_with("lsa") && l.contains("Paused")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("lsc") && l.contains("Running")), "{table}");
    for id in ["lsa", "lsc"] {
        let kill = bulkhead_cli(&["kill", sock(id).to_str().expect("utf8")]);
        assert!(kill.status.success(), "{kill:?}");
    }
    assert!(String::from_utf8_lossy(&bulkhead_cli(&["ls", "--dir", d]).stdout).lines().count() == 1, "only the header");
    let bad = bulkhead_cli(&["pause", dir.join("nosuch.sock").to_str().expect("utf8")]);
    assert_eq!(bad.status.code(), Some(69), "{bad:?}");
}

/// Writes an image of `bytes` holding the probe's pattern for `seed` (tests lib: word `w` of
/// sector `s` is `splitmix64(seed ^ (s << 16) ^ w)`).
fn pattern_image(path: &Path, seed: u64, bytes: u64) {
    let mut data = Vec::with_capacity(usize::try_from(bytes).expect("size"));
    for s in 0..bytes / 512 {
        for w in 0..64u64 {
            data.extend_from_slice(&splitmix64(seed ^ (s << 16) ^ w).to_le_bytes());
        }
    }
    std::fs::write(path, data).expect("write image");
}

#[test]
fn patch_drive_path_swaps_the_image_under_the_running_guest() {
    let dir = scratch("api-swap");
    let (old, new) = (dir.join("old.img"), dir.join("new.img"));
    pattern_image(&old, 11, 1 << 20);
    pattern_image(&new, 12, 1 << 20);
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let disk = format!("{},id=data", old.display());
    let mut args =
        probe_vm_args(&serial, None, "probe.test=blk-check probe.seed=12 probe.tries=5000 probe.delay=2000", &[]);
    args.extend(["--disk".into(), disk.into(), "--api-sock".into(), sock.clone().into_os_string()]);
    let child = bulkhead(&args).spawn().expect("spawn");
    // Let the guest read the old image a few times first.
    std::thread::sleep(Duration::from_millis(500));
    // The jailed core sees only its jail directory and opens files as the VM's uid (as with
    // Firecracker's jailer): a host path is not found there; the operator puts the image in it.
    let on_host = serde_json::json!({ "drive_id": "data", "path_on_host": new }).to_string();
    if jail_root(&sock).is_some() {
        let (s, b) = curl(&sock, "PATCH", "/drives/data", Some(&on_host));
        assert_eq!(s, 400, "{b}");
        assert!(fault_message(&b).contains("cannot use disk image"), "{b}");
    }
    let given = give_to_vm(&sock, child.id(), &new);
    let body = serde_json::json!({ "drive_id": "data", "path_on_host": given.path }).to_string();
    let (s, b) = curl(&sock, "PATCH", "/drives/data", Some(&body));
    assert_eq!(s, 204, "{b}");
    let (_, cfg) = curl(&sock, "GET", "/vm/config", None);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    assert_eq!(cfg["drives"][0]["path_on_host"], given.path.as_str(), "the configuration names the new image");
    // A path that is not an image is refused and changes nothing.
    let bad = serde_json::json!({ "drive_id": "data", "path_on_host": &*dir }).to_string();
    let (s, b) = curl(&sock, "PATCH", "/drives/data", Some(&bad));
    assert_eq!(s, 400, "{b}");
    assert!(fault_message(&b).contains("cannot use disk image"), "{b}");
    let r = wait_bounded(child, Duration::from_secs(120));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(r.status.code(), Some(0), "the guest found the new medium\n{text}\n{}", r.stderr);
    let tries: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("blk-check: seed=12 found after ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pass line:\n{text}"));
    assert!(tries > 1, "the old image was read first:\n{text}");
    assert!(r.stderr.contains("service block-data: new image"), "{}", r.stderr);
    assert_eq!(r.stderr.matches("service block-data restarted as pid").count(), 1, "{}", r.stderr);
}

#[test]
fn patch_device_changes_its_supervision_live() {
    let dir = scratch("api-supervision");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let mut args = probe_vm_args(&serial, None, "probe.test=ticker probe.n=30 probe.delay=20000", &["--allow-faults"]);
    args.extend(["--api-sock".into(), sock.clone().into_os_string()]);
    let child = bulkhead(&args).spawn().expect("spawn");
    assert!(wait_for_serial(&serial, "tick 1\n", Duration::from_secs(30)), "guest never ticked");
    let console = || -> serde_json::Value {
        let (_, b) = curl(&sock, "GET", "/bulkhead/devices", None);
        let all: serde_json::Value = serde_json::from_str(&b).expect("json");
        all.as_array().expect("array").iter().find(|d| d["id"] == "console").expect("console").clone()
    };
    assert_eq!(console()["restart_max"], "20/10", "the default");
    for (body, want) in [
        (r#"{"restart_max": "1/60", "bogus": 1}"#, "unknown field `bogus`"),
        (r#"{"service_deadline_ms": 0}"#, "service_deadline_ms must be"),
        (r#"{"restart_max": "x/1"}"#, "bad restart count"),
    ] {
        let (s, b) = curl(&sock, "PATCH", "/bulkhead/devices/console", Some(body));
        assert_eq!(s, 400, "{body}: {b}");
        assert!(fault_message(&b).contains(want), "{body}: {b}");
    }
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/devices/nosuch", Some(r#"{"restart_max": "1/60"}"#));
    assert_eq!((s, fault_message(&b).contains("no device `nosuch`")), (400, true), "{b}");
    assert_eq!(console()["restart_max"], "20/10", "refused changes change nothing");
    let (s, b) = curl(
        &sock,
        "PATCH",
        "/bulkhead/devices/console",
        Some(r#"{"restart_max": "1/60", "service_deadline_ms": 800}"#),
    );
    assert_eq!(s, 204, "{b}");
    let c = console();
    assert_eq!((c["restart_max"].as_str(), c["service_deadline_ms"].as_u64()), (Some("1/60"), Some(800)));
    // The new cap applies: one restart, then the console fails closed; the VM keeps running.
    let kill = || curl(&sock, "PUT", "/bulkhead/devices/console/fault", Some(r#"{"action": "kill"}"#));
    let (s, b) = kill();
    assert_eq!(s, 200, "{b}");
    assert!(wait_until(Duration::from_secs(10), || console()["restarts"] == 1 && console()["state"] == "serving"));
    let (s, b) = kill();
    assert_eq!(s, 200, "{b}");
    assert!(wait_until(Duration::from_secs(10), || console()["state"] == "failed"), "{:?}", console());
    assert!(console()["failed"].as_str().is_some_and(|f| f.contains("restart cap reached")), "{:?}", console());
    let r = wait_bounded(child, Duration::from_secs(120));
    assert_eq!(r.status.code(), Some(0), "the guest finishes without its console\n{}", r.stderr);
}
