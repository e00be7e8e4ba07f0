//! The core's own jail, with the real processes and the sandbox on: once its VM is built the
//! core runs with the VM's own uid, no capability, `no_new_privs`, not dumpable, every thread
//! under a seccomp filter; each VM's services run under ids of their own; a process with one
//! VM's service ids can signal neither another VM's processes nor its own core; and a service
//! told to signal everything it can (`--inject-forbidden ...:signal-all`) dies by SIGSYS while
//! the other VM runs on.

use std::path::Path;
use std::time::Duration;

use bulkhead_tests::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `Key:` of a status file, as text.
fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// A probe VM that ticks for a long time, with a disk and an API socket.
fn ticking_vm(dir: &Path, name: &str, extra: &[&str]) -> (VmChild, std::path::PathBuf) {
    let disk = dir.join(format!("{name}.img"));
    std::fs::File::create(&disk).expect("create").set_len(4 << 20).expect("size");
    let serial = dir.join(format!("{name}.log"));
    let sock = dir.join(format!("{name}.sock"));
    let mut args = vec!["--api-sock", sock.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let cmdline = "probe.test=ticker probe.n=1000000 probe.delay=20000";
    let child = VmChild::spawn(&mut bulkhead(&probe_vm_args(&serial, Some(&disk), cmdline, &args)));
    assert!(wait_for_serial(&serial, "tick 1\n", LIMIT), "{name}: guest never ticked");
    (child, serial)
}

fn kill_vm(sock: &Path, child: VmChild) {
    let (s, b) = curl(sock, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#));
    assert_eq!(s, 204, "{b}");
    let r = child.finish(LIMIT);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

#[test]
fn the_core_drops_to_the_vms_ids_and_every_thread_is_filtered() {
    if !is_root() {
        eprintln!("skipped: the core jails itself only when started as root");
        return;
    }
    let dir = scratch("jail-core");
    let (child, _) = ticking_vm(&dir, "vm", &["--allow-faults"]);
    let vmm = child.id();
    let core = core_of(vmm);
    assert_ne!(core, vmm, "the core runs apart from the launcher, in a PID namespace of its own");
    let (uid, gid) = core_ids(core);
    assert_ne!(uid, 0, "the core kept uid 0");

    // Read back from the kernel: the process, then each of its threads (the VMM thread, vCPU,
    // API acceptor, supervisors).
    let status = std::fs::read_to_string(format!("/proc/{core}/status")).expect("status");
    assert_eq!(field(&status, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"), "{status}");
    assert_eq!(field(&status, "Gid"), format!("{gid}\t{gid}\t{gid}\t{gid}"), "{status}");
    assert_eq!(field(&status, "Groups"), "", "{status}");
    let mut names = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{core}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let Ok(st) = std::fs::read_to_string(task.join("status")) else { continue };
        let name = field(&st, "Name");
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"] {
            assert_eq!(field(&st, set), "0000000000000000", "thread {name}: {set}\n{st}");
        }
        assert_eq!(field(&st, "NoNewPrivs"), "1", "thread {name}\n{st}");
        assert_eq!(field(&st, "Seccomp"), "2", "thread {name} runs unfiltered\n{st}");
        assert_eq!(field(&st, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"), "thread {name}");
        names.push(name);
    }
    for want in ["vcpu0", "api", "sup-console", "sup-block-disk0"] {
        assert!(names.iter().any(|n| n == want), "no thread {want}: {names:?}");
    }
    // Its own PID, mount and IPC namespaces; its root is its jail directory, which holds only
    // the core's /proc mount point.
    let sock = dir.join("vm.sock");
    let root = jail_root(&sock).expect("a jail directory");
    for ns in ["pid", "mnt", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{core}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "the core shares the host's {ns} namespace");
    }
    // Pid 1 of its namespace, alone there: the /proc it sees lists no other process (not its
    // services, its helper or the launcher, which are outside).
    assert_eq!(field(&status, "NSpid"), format!("{core}\t1"), "{status}");
    let visible: Vec<String> = std::fs::read_dir(format!("/proc/{core}/root/proc"))
        .expect("the core's /proc")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    assert_eq!(visible, ["1"], "the core sees other processes");
    // The launcher (the pid started) is root with only CAP_KILL; the helper is its child.
    let launcher = std::fs::read_to_string(format!("/proc/{vmm}/status")).expect("launcher status");
    assert_eq!(field(&launcher, "CapEff"), "0000000000000020", "{launcher}");
    assert_eq!(field(&launcher, "NoNewPrivs"), "1", "{launcher}");
    // It waits in the small image `bulkhead` embeds, run from a sealed memfd (unless the host
    // forbids executing memfds; its memory is in the footprint bench).
    if std::fs::read_to_string("/proc/sys/vm/memfd_noexec").map_or(true, |v| v.trim() != "2") {
        let exe = std::fs::read_link(format!("/proc/{vmm}/exe")).expect("launcher exe");
        assert!(exe.to_string_lossy().starts_with("/memfd:bulkhead-launcher"), "{}", exe.display());
    }
    assert!(children_of(vmm).iter().any(|p| p.runs("bulkhead-helper")), "the helper is the launcher's child");
    use std::os::unix::fs::MetadataExt;
    let seen = std::fs::metadata(format!("/proc/{core}/root/")).expect("the core's root");
    let jail = std::fs::metadata(&root).expect("the jail directory");
    assert_eq!((seen.dev(), seen.ino()), (jail.dev(), jail.ino()), "the core's root is not {}", root.display());
    let inside: Vec<String> = std::fs::read_dir(&root)
        .expect("list the jail")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(inside, ["proc"], "the jail holds more than the core's /proc");
    assert_eq!(jail.uid(), uid, "the jail directory is the core's");
    // Not dumpable: /proc/PID is root's, whoever the process runs as.
    let meta = std::fs::metadata(format!("/proc/{core}/fd")).expect("fd dir");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "the core is dumpable");
    let limits = std::fs::read_to_string(format!("/proc/{core}/limits")).expect("limits");
    let core_line = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core limit");
    assert_eq!(core_line.split_whitespace().nth(4), Some("0"), "{core_line}");

    // The same, through the API's typed report, which also lists the helper.
    let (s, body) = curl(&sock, "GET", "/bulkhead/isolation", None);
    assert_eq!(s, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("json");
    let procs = report["processes"].as_array().expect("processes");
    let role = |r: &str| procs.iter().find(|p| p["role"] == r).unwrap_or_else(|| panic!("no {r}: {report}"));
    let c = role("core");
    assert_eq!(c["status"]["uid"][0], uid, "{c}");
    assert!(
        c["threads"].as_array().expect("threads").iter().all(|t| t["status"]["seccomp"] == "filter"),
        "a core thread runs unfiltered: {c}"
    );
    // The helper stays root but keeps six capabilities (dac_override, kill, setgid, setuid,
    // sys_ptrace, setfcap) and runs under its own filter.
    let helper = role("helper");
    assert!(helper["pid"].as_u64().is_some_and(|p| p != u64::from(core)), "{helper}");
    for set in ["cap_effective", "cap_permitted", "cap_bounding"] {
        assert_eq!(helper["status"][set], "00000000800800e2", "helper {set}: {helper}");
    }
    assert_eq!(helper["status"]["cap_inheritable"], "0000000000000000", "{helper}");
    assert_eq!(helper["status"]["seccomp"], "filter", "{helper}");
    assert_eq!(helper["status"]["no_new_privs"], true, "{helper}");
    // The launcher: the pid started, root with CAP_KILL only; the core's pid in the report is
    // its host pid.
    let launcher = role("launcher");
    assert_eq!(launcher["pid"].as_u64(), Some(u64::from(vmm)), "{launcher}");
    assert_eq!(launcher["status"]["cap_effective"], "0000000000000020", "{launcher}");
    assert_eq!(c["pid"].as_u64(), Some(u64::from(core)), "{c}");
    for svc in ["console", "block-disk0"] {
        let p = role(svc);
        assert_eq!(p["status"]["uid"][1], uid + 1, "{svc} runs as the VM's service uid: {p}");
        assert!(p["errors"].as_array().is_some_and(Vec::is_empty), "the helper reads all of {svc}: {p}");
    }
    // A live setting and a kill fault still work: both go through the helper.
    let (s, b) = curl(&sock, "PATCH", "/bulkhead/resources", Some(r#"{"cpu_weight": 250}"#));
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(&sock, "GET", "/bulkhead/resources", None);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"cpu_weight\":250"), "{b}");
    let before = services_of(vmm).iter().map(|p| p.pid).collect::<Vec<_>>();
    let out = bulkhead_cli(&["fault", sock.to_str().expect("utf8"), "block", "kill"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = services_of(vmm);
            now.len() == before.len() && now.iter().any(|p| !before.contains(&p.pid))
        }),
        "the killed block service was not replaced"
    );
    kill_vm(&sock, child);
    // The helper removes the jail directory the core left empty.
    assert!(wait_until(Duration::from_secs(10), || !root.exists()), "{} left behind", root.display());
}

/// Runs `f` in a forked child that switched to `(uid, gid)`; returns its exit code.
fn as_ids(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork in a test process; the child only makes raw system calls (setgroups,
    // setresgid, setresuid, kill) and _exits, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: in the child, async-signal-safe calls only.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(100);
            }
            libc::_exit(f())
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child status {status}");
    libc::WEXITSTATUS(status)
}

/// `kill(pid, 0)` as seen by the caller: 0 allowed, 1 EPERM, 2 another error.
fn may_signal(pid: u32) -> i32 {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return 2 };
    // SAFETY: kill with signal 0 only checks permission and existence.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return 0;
    }
    // SAFETY: reading errno of this thread.
    if unsafe { *libc::__errno_location() } == libc::EPERM {
        1
    } else {
        2
    }
}

#[test]
fn each_vm_has_ids_of_its_own_and_a_service_reaches_no_other_process() {
    if !is_root() {
        eprintln!("skipped: per-VM ids need root");
        return;
    }
    let dir = scratch("jail-ids");
    let (a, _) = ticking_vm(&dir, "a", &[]);
    // B's block service tries to signal every process it may, 1.5 s in.
    let (b, serial_b) = ticking_vm(&dir, "b", &["--inject-forbidden", "block:signal-all@1500"]);
    let (a_vmm, b_vmm) = (a.id(), b.id());
    let (a_core, b_core) = (core_of(a_vmm), core_of(b_vmm));
    let ids = |vmm: u32| -> (u32, u32, u32) {
        let (uid, gid) = core_ids(vmm);
        let svc = service_child(vmm, "bulkhead-block").map(|p| p.pid).expect("a block service");
        let st = std::fs::read_to_string(format!("/proc/{svc}/status")).expect("service status");
        let svc_uid: u32 = field(&st, "Uid").split_whitespace().next().and_then(|u| u.parse().ok()).expect("uid");
        assert_eq!(gid, uid, "ids from the range come in uid = gid pairs");
        (uid, svc_uid, svc)
    };
    let (a_uid, a_svc_uid, a_svc) = ids(a_vmm);
    let (b_uid, b_svc_uid, b_svc) = ids(b_vmm);
    let all = [a_uid, a_svc_uid, b_uid, b_svc_uid];
    for (i, x) in all.iter().enumerate() {
        assert!(*x != 0 && all.iter().skip(i + 1).all(|y| y != x), "ids are not distinct: {all:?}");
    }

    // With A's service ids: its own service may be signalled (the check works), nothing else.
    let code = as_ids(a_svc_uid, a_svc_uid, || {
        let own = may_signal(a_svc);
        let others = [may_signal(a_core), may_signal(b_core), may_signal(b_svc)];
        if own != 0 {
            return 10;
        }
        match others.iter().position(|r| *r != 1) {
            Some(0) => 20,
            Some(1) => 21,
            Some(_) => 22,
            None => 0,
        }
    });
    assert_eq!(code, 0, "10: cannot signal its own service; 20+i: could signal [A core, B core, B service][i]");
    // With A's core ids: A's services are out of its reach too (the helper kills them).
    let code = as_ids(a_uid, a_uid, || if may_signal(a_svc) == 1 && may_signal(b_core) == 1 { 0 } else { 1 });
    assert_eq!(code, 0, "A's core could signal its service or B's core");

    // B's block service tried: it died by SIGSYS (its filter), and A ticks on.
    assert!(
        wait_until(Duration::from_secs(20), || !services_of(b_vmm).iter().any(|p| p.pid == b_svc)),
        "B's block service did not act"
    );
    assert!(wait_for_serial(&serial_b, "tick 2\n", LIMIT), "B's guest stopped");
    let a_serial = dir.join("a.log");
    let ticks = |p: &Path| std::fs::read_to_string(p).map_or(0, |s| s.matches("tick ").count());
    let before = ticks(&a_serial);
    std::thread::sleep(Duration::from_millis(500));
    assert!(ticks(&a_serial) > before, "A stopped ticking");
    assert!(services_of(a_vmm).iter().any(|p| p.pid == a_svc), "A's service was hit");
    let sock_b = dir.join("b.sock");
    let (s, body) = curl(&sock_b, "GET", "/bulkhead/devices", None);
    assert_eq!(s, 200, "{body}");
    kill_vm(&dir.join("a.sock"), a);
    let (s, b2) = curl(&sock_b, "PUT", "/bulkhead/actions", Some(r#"{"action_type": "Kill"}"#));
    assert_eq!(s, 204, "{b2}");
    let r = b.finish(LIMIT);
    assert!(r.stderr.contains("killed by seccomp") && r.stderr.contains("syscall kill (62)"), "{}", r.stderr);
}
