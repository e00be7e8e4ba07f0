//! The jail of every running service, seen from outside through /proc: namespaces, empty
//! read-only root, no capabilities, no_new_privs, unprivileged ids, rlimits and exactly the fds it
//! declared. The sandbox is always on here; no test passes `--insecure-no-sandbox`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(120);
const NAMESPACES: [&str; 6] = ["user", "mnt", "pid", "ipc", "uts", "net"];

/// `Key:\tvalue` lines of /proc/PID/status.
fn status(pid: u32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect()
}

/// (soft, hard) of one /proc/PID/limits row, e.g. "Max processes".
fn limit(pid: u32, name: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let row = limits.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{limits}"));
    let mut v = row[name.len()..].split_whitespace();
    (v.next().expect("soft").to_string(), v.next().expect("hard").to_string())
}

/// Targets of /proc/PID/fd, by fd number.
fn fds(pid: u32) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            Some((e.file_name().to_str()?.parse().ok()?, target))
        })
        .collect();
    v.sort();
    v
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every jail property of service `pid` (a child of `core`). `declared` lists the targets of its
/// fds above 3 (memfd names, `anon_inode:[eventfd]`, file paths) in any order; `file_size` is its
/// expected RLIMIT_FSIZE.
fn assert_jailed(core: u32, parent: u32, pid: u32, what: &str, declared: &[String], file_size: u64) {
    let st = status(pid);
    let ctx = format!("{what} (pid {pid}): {st:?}");
    assert_eq!(st["NoNewPrivs"], "1", "{ctx}");
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        assert_eq!(st[cap], "0000000000000000", "{cap} of {ctx}");
    }
    if is_root() {
        // Real, effective, saved and filesystem ids, seen from the host: the VM's service ids,
        // the pair after the jailed core's own (neither root nor the core's).
        let core_st = status(core);
        let core_uid: u32 = core_st["Uid"].split_whitespace().next().and_then(|u| u.parse().ok()).expect("core uid");
        let core_gid: u32 = core_st["Gid"].split_whitespace().next().and_then(|g| g.parse().ok()).expect("core gid");
        assert_ne!(core_uid, 0, "the core still runs as root: {core_st:?}");
        let (uid, gid) = ((core_uid + 1).to_string(), (core_gid + 1).to_string());
        assert_eq!(st["Uid"].split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4], "{ctx}");
        assert_eq!(st["Gid"].split_whitespace().collect::<Vec<_>>(), [gid.as_str(); 4], "{ctx}");
        assert_eq!(st["Groups"], "", "supplementary groups of {ctx}");
    }
    // pid 1 of its own PID namespace, and the child of the process that supervises or reaps it:
    // the core, or after the split of a jailed start the helper (docs/SECURITY.md).
    assert_eq!(st["NSpid"].split_whitespace().collect::<Vec<_>>(), [pid.to_string(), "1".to_string()], "{ctx}");
    assert_eq!(st["PPid"], parent.to_string(), "{ctx}");

    for ns in NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns link");
        let ours = std::fs::read_link(format!("/proc/{core}/ns/{ns}")).expect("ns link");
        assert_ne!(theirs, ours, "{what} shares the core's {ns} namespace");
    }

    let root = std::fs::metadata(format!("/proc/{pid}/root/")).expect("service root");
    let core_root = std::fs::metadata(format!("/proc/{core}/root/")).expect("core root");
    assert_ne!((root.dev(), root.ino()), (core_root.dev(), core_root.ino()), "{what} has the core's root");
    let entries = std::fs::read_dir(format!("/proc/{pid}/root/")).expect("list root").count();
    assert_eq!(entries, 0, "{what}'s root is not empty");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let lines: Vec<&str> = mounts.lines().collect();
    assert_eq!(lines.len(), 1, "{what} sees more than its root:\n{mounts}");
    let f: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(f[4], "/", "{mounts}");
    assert!(f[5].split(',').any(|o| o == "ro"), "root not read-only: {mounts}");
    assert!(["nosuid", "nodev", "noexec"].iter().all(|o| f[5].split(',').any(|x| x == *o)), "{mounts}");
    assert!(lines[0].contains(" - tmpfs "), "{mounts}");

    assert_eq!(limit(pid, "Max processes"), ("0".into(), "0".into()), "{what}");
    assert_eq!(limit(pid, "Max core file size"), ("0".into(), "0".into()), "{what}");
    assert_eq!(limit(pid, "Max open files"), ("64".into(), "64".into()), "{what}");
    assert_eq!(limit(pid, "Max file size"), (file_size.to_string(), file_size.to_string()), "{what}");

    let open = fds(pid);
    let core_stderr = std::fs::read_link(format!("/proc/{core}/fd/2")).expect("core stderr");
    let fixed: Vec<(u32, String)> = open.iter().filter(|(n, _)| *n <= 3).cloned().collect();
    assert_eq!(fixed.len(), 4, "{what}: {open:?}");
    assert_eq!(fixed[0], (0, "/dev/null".into()), "{what}: {open:?}");
    assert_eq!(fixed[1], (1, "/dev/null".into()), "{what}: {open:?}");
    assert_eq!(fixed[2], (2, core_stderr.to_string_lossy().into_owned()), "{what}: {open:?}");
    assert!(fixed[3].1.starts_with("socket:"), "{what}: fd 3 is not the control socket: {open:?}");
    // memfds read as "/memfd:NAME (deleted)".
    let mut rest: Vec<String> = open
        .iter()
        .filter(|(n, _)| *n > 3)
        .map(|(_, t)| t.trim_start_matches('/').trim_end_matches(" (deleted)").to_string())
        .collect();
    let mut want: Vec<String> = declared.iter().map(|t| t.trim_start_matches('/').to_string()).collect();
    rest.sort();
    want.sort();
    assert_eq!(rest, want, "{what}: fds above 3 differ from what it declared ({open:?})");
}

#[test]
fn every_running_service_is_jailed() {
    let dir = scratch("sandbox");
    let out = dir.join("serial.log");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(8 << 20).expect("size");
    let cmdline = "probe.test=ticker probe.n=40 probe.delay=20000";
    let child = bulkhead(&probe_vm_args(&out, Some(&image), cmdline, &[])).spawn().expect("spawn");
    let vmm = child.id();
    assert!(wait_for_serial(&out, "tick 2\n", Duration::from_secs(30)), "guest never printed tick 2");
    let core = core_of(vmm);
    let parent = children_of(vmm).into_iter().find(|p| p.runs("bulkhead-helper")).map_or(core, |p| p.pid);
    let kids = services_of(vmm);
    let console = kids.iter().find(|p| p.runs("bulkhead-console")).expect("console child");
    let block = kids.iter().find(|p| p.runs("bulkhead-block")).expect("block child");
    let eventfd = || "anon_inode:[eventfd]".to_string();
    // Ring memfd, submit and complete doorbells, output file, irqfd (no input: --serial-input none),
    // the state region that carries the UART across restarts.
    let console_fds = vec![
        "memfd:bulkhead-console-ring".to_string(),
        "memfd:bulkhead-console-state".to_string(),
        eventfd(),
        eventfd(),
        eventfd(),
        out.to_string_lossy().into_owned(),
    ];
    assert_jailed(core, parent, console.pid, "console", &console_fds, 1 << 30);
    // Ring memfd, two doorbells, guest RAM memfd, disk image and its flush witness (a second
    // description of the same file), irqfd, one queue ioeventfd, the state region that survives
    // restarts.
    let block_fds = vec![
        "memfd:bulkhead-block-disk0-ring".to_string(),
        "memfd:bulkhead-block-disk0-state".to_string(),
        eventfd(),
        eventfd(),
        "memfd:bulkhead-guest-ram".to_string(),
        image.to_string_lossy().into_owned(),
        image.to_string_lossy().into_owned(),
        eventfd(),
        eventfd(),
    ];
    assert_jailed(core, parent, block.pid, "block", &block_fds, 8 << 20);
    let r = wait_bounded(child, LIMIT);
    assert_eq!(r.status.code(), Some(0), "stderr:\n{}", r.stderr);
    let serial = std::fs::read_to_string(&out).expect("serial log");
    assert!(serial.contains("tick 40"), "the jailed console stopped serving:\n{serial}");
}

/// Runs `bulkhead run` inside a user namespace (`unshare -U -r`) whose own limit on nested user
/// namespaces is 0, so the core cannot create one for its services.
#[test]
fn unavailable_namespace_refuses_to_start_and_names_it() {
    let unshare = ["/usr/bin/unshare", "/bin/unshare"].into_iter().find(|p| Path::new(p).is_file());
    let Some(unshare) = unshare else {
        eprintln!("SKIPPED: util-linux unshare is not installed");
        return;
    };
    let probe = probe();
    let bulkhead = bin_dir().join("bulkhead");
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces || exit 99; exec {} run --kernel {} --serial-input none \
         --cmdline probe.test=hello",
        bulkhead.display(),
        probe.display()
    );
    let child = Command::new(unshare)
        .args(["-U", "-r", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let r = wait_bounded(child, Duration::from_secs(30));
    assert_ne!(r.status.code(), Some(99), "could not limit user namespaces: {}", r.stderr);
    assert_eq!(r.status.code(), Some(78), "must refuse to start:\n{}\n{}", r.stdout, r.stderr);
    let errors: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    assert!(errors[0].contains("user (clone3: No space left on device"), "names the namespace: {}", errors[0]);
    assert!(errors[0].contains("--insecure-no-sandbox"), "{}", errors[0]);
    assert!(!r.stderr.contains("started as pid"), "a service started anyway:\n{}", r.stderr);
    assert!(!r.stdout.contains("probe:"), "the guest ran:\n{}", r.stdout);
}
