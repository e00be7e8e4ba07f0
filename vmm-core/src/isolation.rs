//! What confines each process of a VM, read back from the kernel (`/proc`) rather than from what
//! the core meant to do: user and group ids, capability sets, `no_new_privs`, seccomp mode and
//! filter count, namespaces (and which are the host's), the root directory, rlimits, open fds
//! and what each is, cgroups; for every thread too (a filter or a capability set is per thread).
//! Served as `GET /bulkhead/isolation` and printed by `bulkhead inspect ID`.
//!
//! The parsers are pure functions of the `/proc` text, tested on fixtures; [`inspect`] does the
//! reading. A process that ends while it is read is reported with what could be read and why
//! the rest could not.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The namespaces reported, as named in `/proc/PID/ns`.
pub const NAMESPACES: [&str; 8] = ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"];
/// Most fds listed per process (the count is always exact).
pub const MAX_FDS_LISTED: usize = 256;
/// Most threads listed per process.
pub const MAX_THREADS_LISTED: usize = 256;

/// The whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationReport {
    /// The VM's id.
    pub vm: String,
    /// The host's namespaces (those of pid 1 as the core sees it), by name.
    pub host_namespaces: BTreeMap<String, String>,
    /// The core first, then each device's service.
    pub processes: Vec<ProcessReport>,
    /// The host directory the jailed core's root is (`/run/bulkhead/jail/ID/root`): files an
    /// API request names after the start are looked up in it. `null` when the core is not
    /// jailed in a directory of its own. (Always written: the report also travels as bincode
    /// from the helper, which has no optional fields.)
    #[serde(default)]
    pub jail_root: Option<String>,
}

/// One process.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessReport {
    /// `core`, or the service's name (`console`, `block-disk0`, ...).
    pub role: String,
    /// Pid, as the core sees it.
    pub pid: u32,
    /// What the main thread's status says.
    pub status: TaskStatus,
    /// Namespaces by name: the kernel's identifier and whether it is the host's.
    pub namespaces: BTreeMap<String, Namespace>,
    /// The root directory.
    pub root: Root,
    /// Resource limits by the kernel's name (`Max open files`, ...).
    pub rlimits: BTreeMap<String, Limit>,
    /// Open fds (at most [`MAX_FDS_LISTED`]).
    pub fds: Vec<Fd>,
    /// Open fds in all.
    pub fd_count: usize,
    /// `/proc/PID/cgroup`, one entry per hierarchy.
    pub cgroups: Vec<String>,
    /// Every thread (at most [`MAX_THREADS_LISTED`]), the main one included.
    pub threads: Vec<ThreadReport>,
    /// What could not be read, and why.
    pub errors: Vec<String>,
}

/// The confinement fields of `/proc/PID[/task/TID]/status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskStatus {
    /// `Name:` (the command, 15 characters at most).
    pub name: String,
    /// Real, effective, saved and filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gid: [u32; 4],
    /// Capability sets as the kernel prints them (hex).
    pub cap_inheritable: String,
    /// Permitted.
    pub cap_permitted: String,
    /// Effective.
    pub cap_effective: String,
    /// Bounding.
    pub cap_bounding: String,
    /// Ambient.
    pub cap_ambient: String,
    /// `NoNewPrivs: 1`.
    pub no_new_privs: bool,
    /// `disabled`, `strict` or `filter`.
    pub seccomp: String,
    /// Filters stacked on the task.
    pub seccomp_filters: u32,
    /// The CPUs it may run on (`Cpus_allowed_list`).
    #[serde(default)]
    pub cpus_allowed: String,
}

impl TaskStatus {
    /// Whether the effective capability set is empty.
    pub fn no_capabilities(&self) -> bool {
        u64::from_str_radix(&self.cap_effective, 16) == Ok(0)
    }
}

/// One thread.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ThreadReport {
    /// Thread id.
    pub tid: u32,
    /// Its status.
    pub status: TaskStatus,
}

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Namespace {
    /// The kernel's identifier (`mnt:[4026531841]`).
    pub id: String,
    /// Whether it is the host's.
    pub host: bool,
}

/// The root directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Root {
    /// Where it is, as the core sees it.
    pub path: String,
    /// Whether it is the host's `/` (same device and inode).
    pub host: bool,
}

/// One resource limit; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limit {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
}

/// One open fd.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fd {
    /// Its number.
    pub fd: i32,
    /// What `/proc/PID/fd/N` points at.
    pub target: String,
    /// Its kind: `file`, `directory`, `device`, `memfd`, `socket`, `pipe`, `eventfd`, `pidfd`,
    /// `kvm-vm`, `kvm-vcpu`, `anon` (another anonymous inode) or `unknown`.
    pub kind: String,
}

/// Parses the confinement fields of a `status` file.
pub fn parse_status(text: &str) -> TaskStatus {
    let mut s = TaskStatus { seccomp: "unknown".into(), ..TaskStatus::default() };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        let ids = || {
            let mut out = [u32::MAX; 4];
            for (slot, v) in out.iter_mut().zip(value.split_whitespace()) {
                *slot = v.parse().unwrap_or(u32::MAX);
            }
            out
        };
        match key {
            "Name" => s.name = value.to_string(),
            "Uid" => s.uid = ids(),
            "Gid" => s.gid = ids(),
            "CapInh" => s.cap_inheritable = value.to_string(),
            "CapPrm" => s.cap_permitted = value.to_string(),
            "CapEff" => s.cap_effective = value.to_string(),
            "CapBnd" => s.cap_bounding = value.to_string(),
            "CapAmb" => s.cap_ambient = value.to_string(),
            "NoNewPrivs" => s.no_new_privs = value == "1",
            "Seccomp" => {
                s.seccomp = match value {
                    "0" => "disabled",
                    "1" => "strict",
                    "2" => "filter",
                    _ => "unknown",
                }
                .into();
            }
            "Seccomp_filters" => s.seccomp_filters = value.parse().unwrap_or(0),
            "Cpus_allowed_list" => s.cpus_allowed = value.to_string(),
            _ => {}
        }
    }
    s
}

/// Parses a `limits` file: a header line, then one line per limit whose name takes the first 26
/// columns, followed by the soft and hard limits (`unlimited` or a number) and maybe units.
pub fn parse_limits(text: &str) -> BTreeMap<String, Limit> {
    let value = |v: &str| if v == "unlimited" { None } else { v.parse().ok() };
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let Some((name, rest)) = line.split_at_checked(26.min(line.len())) else { continue };
        let mut cols = rest.split_whitespace();
        let (Some(soft), Some(hard)) = (cols.next(), cols.next()) else { continue };
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        out.insert(name.to_string(), Limit { soft: value(soft), hard: value(hard) });
    }
    out
}

/// The kind of an fd from what its `/proc/PID/fd/N` link says.
pub fn fd_kind(target: &str) -> &'static str {
    match target {
        t if t.starts_with("socket:") => "socket",
        t if t.starts_with("pipe:") => "pipe",
        "anon_inode:[eventfd]" => "eventfd",
        "anon_inode:[pidfd]" => "pidfd",
        "anon_inode:kvm-vm" => "kvm-vm",
        t if t.starts_with("anon_inode:kvm-vcpu") => "kvm-vcpu",
        t if t.starts_with("anon_inode:") => "anon",
        t if t.starts_with("/memfd:") => "memfd",
        t if t.starts_with("/dev/") => "device",
        t if t.starts_with('/') => "file",
        _ => "unknown",
    }
}

/// The namespaces of `proc_dir` (`/proc/PID` or `/proc/PID/task/TID`), by name; those that
/// cannot be read are left out.
fn namespaces_of(proc_dir: &Path) -> BTreeMap<String, String> {
    NAMESPACES
        .iter()
        .filter_map(|ns| {
            let link = std::fs::read_link(proc_dir.join("ns").join(ns)).ok()?;
            Some(((*ns).to_string(), link.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The host's namespaces: pid 1's as this process sees it, or this process's own where pid 1's
/// cannot be read.
pub fn host_namespaces() -> BTreeMap<String, String> {
    let mut ns = namespaces_of(Path::new("/proc/self"));
    ns.extend(namespaces_of(Path::new("/proc/1")));
    ns
}

/// Reads what confines process `pid` (role `role`) from `/proc`. `host` are the host's
/// namespaces ([`host_namespaces`]).
pub fn inspect(role: &str, pid: u32, host: &BTreeMap<String, String>) -> ProcessReport {
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new("/proc").join(pid.to_string());
    let mut r = ProcessReport { role: role.to_string(), pid, ..ProcessReport::default() };
    let mut read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
        Ok(t) => Some(t),
        Err(e) => {
            r.errors.push(format!("{name}: {e}"));
            None
        }
    };
    let status = read("status");
    let limits = read("limits");
    let cgroups = read("cgroup");
    r.status = status.as_deref().map(parse_status).unwrap_or_default();
    r.rlimits = limits.as_deref().map(parse_limits).unwrap_or_default();
    r.cgroups = cgroups.map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default();
    r.namespaces = namespaces_of(&dir)
        .into_iter()
        .map(|(name, id)| {
            let host = host.get(&name) == Some(&id);
            (name, Namespace { id, host })
        })
        .collect();
    let root_host = match (std::fs::metadata(dir.join("root").join("")), std::fs::metadata("/")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        (Err(e), _) | (_, Err(e)) => {
            r.errors.push(format!("root: {e}"));
            false
        }
    };
    let root_path = std::fs::read_link(dir.join("root")).map(|p| p.to_string_lossy().into_owned());
    r.root = Root { path: root_path.unwrap_or_default(), host: root_host };
    match std::fs::read_dir(dir.join("fd")) {
        Ok(entries) => {
            let mut fds: Vec<i32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
            fds.sort_unstable();
            r.fd_count = fds.len();
            r.fds = fds
                .into_iter()
                .take(MAX_FDS_LISTED)
                .map(|fd| {
                    let target = std::fs::read_link(dir.join("fd").join(fd.to_string()))
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_else(|e| format!("(unreadable: {e})"));
                    let kind = fd_kind(&target).to_string();
                    Fd { fd, target, kind }
                })
                .collect();
        }
        Err(e) => r.errors.push(format!("fd: {e}")),
    }
    match std::fs::read_dir(dir.join("task")) {
        Ok(entries) => {
            let mut tids: Vec<u32> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
            tids.sort_unstable();
            r.threads = tids
                .into_iter()
                .take(MAX_THREADS_LISTED)
                .filter_map(|tid| {
                    let text = std::fs::read_to_string(dir.join("task").join(tid.to_string()).join("status")).ok()?;
                    Some(ThreadReport { tid, status: parse_status(&text) })
                })
                .collect();
        }
        Err(e) => r.errors.push(format!("task: {e}")),
    }
    r
}

/// The report of a VM whose core is this process and whose services are `services` (role and
/// pid of each).
pub fn report(vm: &str, services: &[(String, u32)]) -> IsolationReport {
    report_of(vm, crate::pidns::host_pid(), services)
}

/// The report of a VM whose core is `core` and whose services are `services` (what the VM's
/// helper reads, as the jailed core may not read its services' `/proc` entries).
pub fn report_of(vm: &str, core: u32, services: &[(String, u32)]) -> IsolationReport {
    let host = host_namespaces();
    let mut processes = vec![inspect("core", core, &host)];
    processes.extend(services.iter().map(|(role, pid)| inspect(role, *pid, &host)));
    IsolationReport { vm: vm.to_string(), host_namespaces: host, processes, jail_root: None }
}

/// A short text rendering, one block per process (what `bulkhead inspect` prints).
pub fn render(r: &IsolationReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for p in &r.processes {
        let s = &p.status;
        let own: Vec<&str> = p.namespaces.iter().filter(|(_, n)| !n.host).map(|(k, _)| k.as_str()).collect();
        let _ = writeln!(out, "{} (pid {}, {}):", p.role, p.pid, s.name);
        let _ = writeln!(out, "  ids: uid {:?} gid {:?} (real, effective, saved, fs)", s.uid, s.gid);
        let _ = writeln!(
            out,
            "  capabilities: effective {} permitted {} bounding {} ambient {}",
            s.cap_effective, s.cap_permitted, s.cap_bounding, s.cap_ambient
        );
        let _ =
            writeln!(out, "  no_new_privs: {}, seccomp: {} ({} filters)", s.no_new_privs, s.seccomp, s.seccomp_filters);
        let _ = writeln!(
            out,
            "  namespaces of its own: {}",
            if own.is_empty() { "none (all the host's)".to_string() } else { own.join(" ") }
        );
        let _ = writeln!(
            out,
            "  root: {} ({})",
            p.root.path,
            if p.root.host { "the host's /" } else { "not the host's /" }
        );
        let lim = |name: &str| {
            p.rlimits.get(name).map_or_else(
                || "?".to_string(),
                |l| {
                    format!(
                        "{}/{}",
                        l.soft.map_or("unlimited".into(), |v| v.to_string()),
                        l.hard.map_or("unlimited".into(), |v| v.to_string())
                    )
                },
            )
        };
        let _ = writeln!(
            out,
            "  rlimits: open files {}, processes {}, data {}, file size {}, core {}",
            lim("Max open files"),
            lim("Max processes"),
            lim("Max data size"),
            lim("Max file size"),
            lim("Max core file size")
        );
        let _ = writeln!(out, "  cgroups: {}", p.cgroups.join(" "));
        let _ = writeln!(out, "  fds ({}):", p.fd_count);
        for fd in &p.fds {
            let _ = writeln!(out, "    {} {} {}", fd.fd, fd.kind, fd.target);
        }
        let _ = writeln!(out, "  threads ({}):", p.threads.len());
        for t in &p.threads {
            let ts = &t.status;
            let _ = writeln!(
                out,
                "    {} {}: uid {} caps {} no_new_privs {} seccomp {} ({}) cpus {}",
                t.tid,
                ts.name,
                ts.uid[1],
                ts.cap_effective,
                ts.no_new_privs,
                ts.seccomp,
                ts.seccomp_filters,
                ts.cpus_allowed
            );
        }
        for e in &p.errors {
            let _ = writeln!(out, "  unreadable: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tbulkhead-consol\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t100000\t100000\t100000\t100000\n\
Gid:\t100000\t100000\t100000\t100000\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n\
Seccomp:\t2\nSeccomp_filters:\t1\nSpeculation_Store_Bypass:\tthread vulnerable\nCpus_allowed_list:\t0-1\n";

    #[test]
    fn status_fields_are_read() {
        let s = parse_status(STATUS);
        assert_eq!(s.name, "bulkhead-consol");
        assert_eq!(s.uid, [100_000; 4]);
        assert_eq!(s.gid, [100_000; 4]);
        assert!(s.no_capabilities() && s.no_new_privs);
        assert_eq!((s.seccomp.as_str(), s.seccomp_filters), ("filter", 1));
        assert_eq!(s.cpus_allowed, "0-1");
        let root = parse_status("Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\nNoNewPrivs:\t0\nSeccomp:\t0\n");
        assert!(!root.no_capabilities() && !root.no_new_privs);
        assert_eq!((root.uid[1], root.seccomp.as_str()), (0, "disabled"));
        // Garbage never panics and never reads as confined.
        let junk = parse_status("Uid: x\nCapEff: zz\nSeccomp: 9\n");
        assert_eq!(junk.uid[0], u32::MAX);
        assert!(!junk.no_capabilities());
        assert_eq!(junk.seccomp, "unknown");
    }

    #[test]
    fn limits_are_read_by_name() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
Max cpu time              unlimited            unlimited            seconds   \n\
Max data size             16777216             16777216             bytes     \n\
Max processes             0                    0                    processes \n\
Max open files            64                   64                   files     \n\
Max core file size        0                    unlimited            bytes     \n";
        let l = parse_limits(text);
        assert_eq!(l["Max cpu time"], Limit { soft: None, hard: None });
        assert_eq!(l["Max data size"], Limit { soft: Some(16 << 20), hard: Some(16 << 20) });
        assert_eq!(l["Max open files"].soft, Some(64));
        assert_eq!(l["Max processes"].hard, Some(0));
        assert_eq!(l["Max core file size"], Limit { soft: Some(0), hard: None });
        assert_eq!(l.len(), 5);
    }

    #[test]
    fn fd_kinds() {
        for (t, k) in [
            ("socket:[123]", "socket"),
            ("pipe:[9]", "pipe"),
            ("anon_inode:[eventfd]", "eventfd"),
            ("anon_inode:[pidfd]", "pidfd"),
            ("anon_inode:kvm-vm", "kvm-vm"),
            ("anon_inode:kvm-vcpu:0", "kvm-vcpu"),
            ("anon_inode:[timerfd]", "anon"),
            ("/memfd:bulkhead-console-ring (deleted)", "memfd"),
            ("/dev/kvm", "device"),
            ("/tmp/disk.img", "file"),
            ("", "unknown"),
        ] {
            assert_eq!(fd_kind(t), k, "{t}");
        }
    }

    #[test]
    fn this_process_reads_as_itself() {
        let host = host_namespaces();
        let r = inspect("core", std::process::id(), &host);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.status.uid[0], nix::unistd::getuid().as_raw());
        assert!(r.root.host, "a test runs in the host's root");
        assert!(r.namespaces.len() >= 6, "{:?}", r.namespaces);
        assert!(r.namespaces.values().all(|n| n.host), "a test runs in the host's namespaces: {:?}", r.namespaces);
        assert!(r.fd_count >= 3 && r.fds.iter().any(|f| f.fd == 0));
        assert!(r.threads.iter().any(|t| t.tid == r.pid), "the main thread is listed");
        assert!(r.rlimits.contains_key("Max open files"));
        let text =
            render(&IsolationReport { vm: "t".into(), host_namespaces: host, processes: vec![r], jail_root: None });
        assert!(text.starts_with("core (pid ") && text.contains("  threads ("), "{text}");
    }
}
