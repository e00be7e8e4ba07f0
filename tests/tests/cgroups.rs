//! One cgroup per VM (issue 15): created with the VM's settings, the core and each service in a
//! child of it, changed live, and removed when the VM ends, however it ends. Real processes,
//! real cgroups (v1 on these machines, v2 where the host offers it), sandbox on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// `GET /bulkhead/resources`: the version and the VM group's directories.
fn resources(sock: &Path) -> (String, Vec<PathBuf>, Value) {
    let (s, body) = curl(sock, "GET", "/bulkhead/resources", None);
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let version = v["cgroup"].as_str().unwrap_or_default().to_string();
    let paths = v["paths"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(PathBuf::from)).collect())
        .unwrap_or_default();
    (version, paths, v)
}

/// The value of a controller's file in the VM's group: `v1_file` in the hierarchy whose path
/// has `/v1_hierarchy/` in it, or `v2_file` in the unified one.
fn setting(version: &str, paths: &[PathBuf], v1: (&str, &str), v2_file: &str) -> String {
    let (dir, file) = if version == "v2" {
        (paths.first().cloned(), v2_file)
    } else {
        (paths.iter().find(|p| p.to_string_lossy().contains(&format!("/{}/", v1.0))).cloned(), v1.1)
    };
    let dir = dir.unwrap_or_else(|| panic!("no hierarchy for {v1:?} in {paths:?}"));
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

fn start(dir: &Path, extra: &[&str]) -> (VmChild, PathBuf) {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).expect("create").set_len(4 << 20).expect("size");
    let serial = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let mut args = vec!["--api-sock", sock.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let cmdline = "probe.test=ticker probe.n=1000000 probe.delay=20000";
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(&serial, Some(&disk), cmdline, &args)));
    assert!(wait_for_serial(&serial, "tick 1\n", LIMIT), "guest never ticked");
    (child, sock)
}

#[test]
fn a_vm_runs_in_its_own_cgroup_with_its_settings_changed_live_and_removed_at_the_end() {
    let dir = scratch("cgroup-life");
    let (child, sock) = start(
        &dir,
        &[
            "--cpu-weight",
            "300",
            "--memory-max",
            "512M",
            "--pids-max",
            "256",
            "--cpu-quota-us",
            "150000",
            "--vcpu-affinity",
            "1",
        ],
    );
    let (version, paths, info) = resources(&sock);
    assert!(version == "v1" || version == "v2", "{info}");
    assert!(!paths.is_empty() && paths.iter().all(|p| p.is_dir()), "{info}");
    let weight = |v: &str, p: &[PathBuf]| setting(v, p, ("cpu", "cpu.shares"), "cpu.weight");
    assert_eq!(weight(&version, &paths), if version == "v2" { "300" } else { "3072" });
    assert_eq!(
        setting(&version, &paths, ("memory", "memory.limit_in_bytes"), "memory.max"),
        (512u64 << 20).to_string()
    );
    assert_eq!(setting(&version, &paths, ("pids", "pids.max"), "pids.max"), "256");
    let quota = setting(&version, &paths, ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(quota.starts_with("150000"), "{quota}");
    assert_eq!(info["resources"]["cpu_weight"], 300, "{info}");
    let (vm_cpu, core_cpu) = (info["cpu_ns"].as_u64().unwrap_or(0), info["core_cpu_ns"].as_u64().unwrap_or(0));
    assert!(core_cpu > 0 && vm_cpu >= core_cpu, "CPU of the VM and of its core, from the cgroup: {info}");
    // Each service's CPU, apart, in the device list and in `bulkhead stats`.
    let (_, devices) = curl(&sock, "GET", "/bulkhead/devices", None);
    let devices: Value = serde_json::from_str(&devices).expect("json");
    // Every service has its figure; the console, which prints, has used some CPU in its group
    // (an idle disk's set-up ran before it was moved in).
    let devs = devices.as_array().cloned().unwrap_or_default();
    assert!(devs.len() == 2 && devs.iter().all(|d| d["cpu_ns"].as_u64().is_some()), "{devices}");
    assert!(devs.iter().any(|d| d["kind"] == "console" && d["cpu_ns"].as_u64().is_some_and(|n| n > 0)), "{devices}");
    let out = bulkhead_cli(&["stats", sock.to_str().expect("utf8")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().filter(|l| l.contains(", cpu ") && l.contains(" ms")).count() == 2, "{text}");

    // The core in `vmm`, each service in its own child, as the kernel says.
    let (_, iso) = curl(&sock, "GET", "/bulkhead/isolation", None);
    let iso: Value = serde_json::from_str(&iso).expect("json");
    let group = paths[0].file_name().expect("name").to_string_lossy().into_owned();
    for (role, child_group) in [("core", "vmm"), ("console", "console"), ("block-disk0", "block-disk0")] {
        let p = iso["processes"].as_array().and_then(|ps| ps.iter().find(|p| p["role"] == role)).expect("process");
        let want = format!("/{group}/{child_group}");
        let lines: Vec<&str> = p["cgroups"].as_array().expect("cgroups").iter().filter_map(Value::as_str).collect();
        let used: Vec<&&str> = lines
            .iter()
            .filter(|l| {
                if version == "v2" {
                    l.starts_with("0::")
                } else {
                    [":cpu:", ":cpuacct:", ":memory:", ":pids:"].iter().any(|c| l.contains(c))
                }
            })
            .collect();
        assert!(!used.is_empty() && used.iter().all(|l| l.ends_with(&want)), "{role} not in {want}: {lines:?}");
    }

    // Live: the weight changes, a memory limit below guest RAM is refused and changes nothing.
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"cpu_weight": 100}"#));
    assert_eq!(s, 204, "{b}");
    assert_eq!(weight(&version, &paths), if version == "v2" { "100" } else { "1024" });
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"memory_max": 1048576}"#));
    assert_eq!(s, 400, "{b}");
    assert!(fault_message(&b).contains("below what the VM needs"), "{b}");
    assert_eq!(
        setting(&version, &paths, ("memory", "memory.limit_in_bytes"), "memory.max"),
        (512u64 << 20).to_string()
    );
    let out = bulkhead_cli(&["set", sock.to_str().expect("utf8"), "--cpu-weight", "200"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(weight(&version, &paths), if version == "v2" { "200" } else { "2048" });

    // The vCPU thread's CPUs, at start and live, as the kernel reports them.
    let vcpu_cpus = || {
        let (_, iso) = curl(&sock, "GET", "/bulkhead/isolation", None);
        let iso: Value = serde_json::from_str(&iso).expect("json");
        let core = iso["processes"].as_array().and_then(|ps| ps.iter().find(|p| p["role"] == "core")).cloned();
        let threads = core.map(|c| c["threads"].clone()).unwrap_or_default();
        threads
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["status"]["name"] == "vcpu0"))
            .map(|t| t["status"]["cpus_allowed"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(vcpu_cpus(), "1", "--vcpu-affinity 1");
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"vcpu_affinity": ["0"]}"#));
    assert_eq!(s, 204, "{b}");
    assert_eq!(vcpu_cpus(), "0");
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"vcpu_affinity": ["7-3"]}"#));
    assert_eq!(s, 400, "{b}");
    assert_eq!(vcpu_cpus(), "0", "a refused list changes nothing");
    let out = bulkhead_cli(&["set", sock.to_str().expect("utf8"), "--vcpu-affinity", "0-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(vcpu_cpus(), "0-1");
    assert_eq!(resources(&sock).2["resources"]["vcpu_affinity"], serde_json::json!(["0-1"]));

    let (s, b) = curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#));
    assert_eq!(s, 204, "{b}");
    let r = child.finish(LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    assert!(wait_until(Duration::from_secs(10), || paths.iter().all(|p| !p.exists())), "left behind: {paths:?}");
}

/// `kill -9` of the process started (the launcher, when the core runs in a PID namespace of its
/// own: the core dies with it), then of the core itself (the launcher ends by the same signal):
/// nothing of the core runs to clean up, its helper does.
#[test]
fn the_cgroup_goes_when_the_core_is_killed() {
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch("cgroup-kill");
    let (mut child, sock) = start(&dir, &["--cpu-weight", "50"]);
    let (_, paths, info) = resources(&sock);
    assert!(!paths.is_empty(), "{info}");
    child.child().kill().expect("SIGKILL");
    let _ = child.child().wait();
    assert!(wait_until(Duration::from_secs(15), || paths.iter().all(|p| !p.exists())), "left behind: {paths:?}");

    let dir = dir.join("core");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (mut child, sock) = start(&dir, &["--cpu-weight", "50"]);
    let (_, paths, info) = resources(&sock);
    assert!(!paths.is_empty(), "{info}");
    let core = child.core();
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(i32::try_from(core).expect("pid"), libc::SIGKILL) }, 0);
    let status = child.child().wait().expect("wait");
    if core != child.id() {
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the launcher ends as its core did: {status:?}");
    }
    assert!(wait_until(Duration::from_secs(15), || paths.iter().all(|p| !p.exists())), "left behind: {paths:?}");
}

/// A limit below guest RAM is refused before anything starts; a start that fails late leaves no
/// cgroup (and no keeper) behind.
#[test]
fn a_start_that_fails_leaves_no_cgroup() {
    let dir = scratch("cgroup-fail");
    let serial = dir.join("serial.log");
    let r = run_to_end(&probe_vm_args(&serial, None, "probe.test=hello", &["--memory-max", "100M"]), LIMIT);
    assert!(!r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("below what the VM needs"), "{}", r.stderr);

    // Through the API: an initrd larger than guest RAM fails after the services started.
    let sock = dir.join("api.sock");
    let mut cmd = std::process::Command::new(bin_dir().join("bulkhead"));
    cmd.args(["--api-sock", sock.to_str().expect("utf8"), "--id", &format!("cgfail{}", std::process::id())])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let vm = VmChild::spawn(&mut cmd);
    assert!(wait_until(LIMIT, || sock.exists()), "no API socket");
    let initrd = dir.join("initrd.img");
    std::fs::File::create(&initrd).expect("create").set_len(40 << 20).expect("size");
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#)).0, 204);
    let boot =
        serde_json::json!({ "kernel_image_path": probe(), "initrd_path": initrd, "boot_args": "probe.test=hello" });
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot.to_string())).0, 204);
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"cpu_weight": 10, "pids_max": 100}"#));
    assert_eq!(s, 204, "settings before the start: {b}");
    let (s, b) = curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#));
    assert_eq!(s, 400, "{b}");
    let group = format!("bulkhead-cgfail{}", std::process::id());
    let leftovers = || -> Vec<PathBuf> {
        ["cpu", "memory", "pids", "unified", ""]
            .iter()
            .flat_map(|h| {
                let root = Path::new("/sys/fs/cgroup").join(h);
                let mut found = Vec::new();
                let mut stack = vec![root];
                // Bounded walk: three levels below each hierarchy's root.
                for _ in 0..4 {
                    let mut next = Vec::new();
                    for d in stack {
                        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                            if e.file_type().is_ok_and(|t| t.is_dir()) {
                                if e.file_name().to_string_lossy() == group {
                                    found.push(e.path());
                                }
                                next.push(e.path());
                            }
                        }
                    }
                    stack = next;
                }
                found
            })
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || leftovers().is_empty()), "left behind: {:?}", leftovers());
    assert!(wait_until(Duration::from_secs(5), || services_of(vm.id()).is_empty()), "{:?}", services_of(vm.id()));
    assert_eq!(curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#)).0, 204);
    let r = vm.finish(LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

/// CPU time the VM's group has used, in ns (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
fn cpu_used(version: &str, paths: &[PathBuf]) -> u64 {
    if version == "v2" {
        let stat = std::fs::read_to_string(paths[0].join("cpu.stat")).unwrap_or_default();
        stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
            * 1000
    } else {
        let dir = paths.iter().find(|p| p.to_string_lossy().contains("/cpuacct/")).expect("cpuacct hierarchy");
        std::fs::read_to_string(dir.join("cpuacct.usage")).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

/// How much more CPU time the second VM used than the first over `window`.
fn ratio_b_to_a(a: &(String, Vec<PathBuf>), b: &(String, Vec<PathBuf>), window: Duration) -> f64 {
    let (a0, b0) = (cpu_used(&a.0, &a.1), cpu_used(&b.0, &b.1));
    std::thread::sleep(window);
    let (da, db) = (cpu_used(&a.0, &a.1).saturating_sub(a0), cpu_used(&b.0, &b.1).saturating_sub(b0));
    db as f64 / da.max(1) as f64
}

/// Two CPU-bound VMs on one CPU with weights 100 and 300 share it 1:3 (within 10%); swapped
/// live to 300:100, the shares follow within 2 s. Every thread of both VMs is pinned to CPU 1
/// (`taskset`), so they compete only with each other there.
#[test]
fn cpu_weights_share_a_cpu_by_priority_and_follow_a_live_change() {
    let dir = scratch("cgroup-weights");
    let spin = |name: &str, weight: &str| {
        let serial = dir.join(format!("{name}.serial"));
        let sock = dir.join(format!("{name}.sock"));
        let args = probe_vm_args(
            &serial,
            None,
            "probe.test=spin",
            &["--api-sock", sock.to_str().expect("utf8"), "--cpu-weight", weight],
        );
        let mut cmd = std::process::Command::new("taskset");
        cmd.args(["-c", "1"])
            .arg(bin_dir().join("bulkhead"))
            .arg("run")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = VmChild::spawn(&mut cmd);
        assert!(wait_for_serial(&serial, "spin: spinning", LIMIT), "{name} never spun");
        let (version, paths, _) = resources(&sock);
        (child, sock, (version, paths))
    };
    let (a, sock_a, cg_a) = spin("a", "100");
    let (b, sock_b, cg_b) = spin("b", "300");
    std::thread::sleep(Duration::from_millis(500));
    let before = ratio_b_to_a(&cg_a, &cg_b, Duration::from_secs(5));
    assert!((2.7..=3.3).contains(&before), "weights 100:300: B used {before:.2} times A's CPU (want 3 ± 10%)");
    for (sock, w) in [(&sock_a, 300), (&sock_b, 100)] {
        let (s, body) = curl(sock, "PATCH", "/bulkhead/resources", Some(&format!(r#"{{"cpu_weight": {w}}}"#)));
        assert_eq!(s, 204, "{body}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = 1.0 / ratio_b_to_a(&cg_a, &cg_b, Duration::from_secs(3)).max(f64::MIN_POSITIVE);
    assert!((2.7..=3.3).contains(&after), "weights 300:100: A used {after:.2} times B's CPU (want 3 ± 10%)");
    eprintln!("CPU 1 shared {before:.2}:1 at 100:300 and 1:{after:.2} at 300:100");
    for (child, sock) in [(a, sock_a), (b, sock_b)] {
        assert_eq!(curl(&sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#)).0, 204);
        let _ = child.finish(LIMIT);
    }
}

/// The `oom_kill` count of a VM's memory group: v2 `memory.events` (which counts its children's
/// too); v1 `memory.oom_control` of the group and of each child (each counts its own only).
fn oom_kills(version: &str, paths: &[PathBuf]) -> u64 {
    let count = |text: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).expect("oom_kill")
    };
    if version == "v2" {
        return count(&setting(version, paths, ("memory", ""), "memory.events"));
    }
    let dir = paths.iter().find(|p| p.to_string_lossy().contains("/memory/")).expect("memory hierarchy");
    let mut dirs = vec![dir.clone()];
    dirs.extend(std::fs::read_dir(dir).expect("group").flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    dirs.iter().map(|d| count(&std::fs::read_to_string(d.join("memory.oom_control")).expect("oom_control"))).sum()
}

/// The serial log's last `tick N`.
fn last_tick(serial: &Path) -> u64 {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines().rev().filter_map(|l| l.strip_prefix("tick ")).filter_map(|n| n.trim().parse().ok()).next().unwrap_or(0)
}

/// A VM that outgrows its memory limit ends as a whole: its services leak (each up to its 16 MiB
/// data bound, together more than the 64 MiB of headroom over guest RAM that the smallest
/// accepted limit leaves), the kernel's OOM killer acts in the VM's cgroup, and the core ends
/// the VM (exit status 137) naming the service the kernel chose; its cgroup goes. A second VM on
/// the host, in a group of its own, ticks on with no OOM kill.
#[test]
fn a_vm_over_its_memory_limit_ends_as_a_whole_and_its_neighbour_runs_on() {
    let dir = scratch("cgroup-oom");
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let (b, sock_b) = start(&dir_b, &["--memory-max", "192M"]);
    let (version_b, paths_b, info_b) = resources(&sock_b);
    assert_eq!(oom_kills(&version_b, &paths_b), 0, "{info_b}");

    let extra: Vec<PathBuf> = (1..6).map(|i| dir_a.join(format!("disk{i}.img"))).collect();
    let mut args = vec!["--mem", "16", "--memory-max", "80M", "--allow-faults"];
    for d in &extra {
        std::fs::File::create(d).expect("create").set_len(1 << 20).expect("size");
        args.extend(["--disk", d.to_str().expect("utf8")]);
    }
    let (a, sock_a) = start(&dir_a, &args);
    let (version_a, paths_a, info_a) = resources(&sock_a);
    assert_eq!(
        setting(&version_a, &paths_a, ("memory", "memory.limit_in_bytes"), "memory.max"),
        (80u64 << 20).to_string(),
        "{info_a}"
    );
    if version_a == "v2" {
        assert_eq!(setting(&version_a, &paths_a, ("memory", ""), "memory.oom.group"), "1");
    }
    // Every service leaks; the API answers each injection while the VM still runs (a leak is
    // not fatal by itself), until the VM ends.
    let mut injected = 0;
    for dev in ["console", "block0", "block1", "block2", "block3", "block4", "block5"] {
        let (s, body) = curl(&sock_a, "PUT", &format!("/bulkhead/devices/{dev}/fault"), Some(r#"{"action": "leak"}"#));
        if s == 200 {
            injected += 1;
        } else {
            assert!(injected >= 4, "leak into {dev}: {s} {body}");
            break;
        }
    }
    let r = a.finish(LIMIT);
    assert_eq!(r.status.code(), Some(137), "a VM over its limit ends with 137\n{}", r.stderr);
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("OOM killer ended service ") && l.contains("ending the VM"))
        .unwrap_or_else(|| panic!("no line naming the service\n{}", r.stderr));
    eprintln!("{line}");
    assert!(line.contains("limit (80 MiB"), "{line}");
    assert!(
        ["console", "block-disk"].iter().any(|s| line.contains(&format!("service {s}"))),
        "the service the kernel chose is named: {line}"
    );
    assert!(wait_until(Duration::from_secs(10), || paths_a.iter().all(|p| !p.exists())), "left behind: {paths_a:?}");

    // The neighbour: ticking on, never OOM-killed, its group intact.
    let serial_b = dir_b.join("serial.log");
    let before = last_tick(&serial_b);
    assert!(wait_until(Duration::from_secs(10), || last_tick(&serial_b) > before + 5), "B stopped ticking at {before}");
    assert_eq!(oom_kills(&version_b, &paths_b), 0);
    assert_eq!(curl(&sock_b, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#)).0, 204);
    let r = b.finish(LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}
