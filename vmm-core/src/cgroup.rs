//! One cgroup per VM: the core and each of its services in child groups of it, so the VM's CPU,
//! memory, process count and I/O can be bounded and weighed against other VMs, and each process's
//! share read apart.
//!
//! Both cgroup versions. **v2** (one unified hierarchy) is used when it offers the `cpu`,
//! `memory` and `pids` controllers where `bulkhead` starts; otherwise **v1**, which needs a
//! hierarchy for each of `cpu`, `cpuacct`, `memory` and `pids` (`blkio` is used when mounted).
//! A host without them is named in one error ([`CgroupError::Missing`]).
//!
//! Layout, under the parent (the cgroup `bulkhead` started in, per hierarchy, or
//! `--cgroup-parent`), never moving any process but the VM's own:
//!
//! ```text
//! <parent>/bulkhead-<id>/          the VM: its limits and weight
//! <parent>/bulkhead-<id>/vmm       the core (v2 lets only leaves hold processes)
//! <parent>/bulkhead-<id>/<service> each service
//! ```
//!
//! The settings are data ([`Resources`]); turning them into file writes is a pure function
//! ([`Resources::writes`]), tested for both versions; [`VmCgroup`] does the writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host lacks what a per-VM cgroup needs.
    #[error("cgroups: {0}")]
    Missing(String),
    /// A setting is out of range or does not fit the VM.
    #[error("cgroup setting: {0}")]
    Invalid(String),
    /// A cgroup file could not be read or written.
    #[error("cgroup {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// Which cgroup version the host gives us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl Version {
    /// `v1` or `v2`, as the API and the log say it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// The smallest and largest CPU weight (cgroup v2's `cpu.weight` range; 100 is the default).
pub const WEIGHT_RANGE: (u32, u32) = (1, 10_000);
/// Memory the VM needs beyond guest RAM (the core, its services, page tables), checked against a
/// memory limit.
pub const MEMORY_OVERHEAD: u64 = 64 << 20;

/// What the VM may use, and its weight against other VMs. `None`: not set (the kernel's default,
/// or unchanged by a live update).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU weight, 1–10000 (100: the default share). v1: `cpu.shares` = weight × 1024 / 100.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// CPU limit: `cpu_quota_us` of CPU time per `cpu_period_us` (both together), e.g.
    /// 50000/100000 for half a CPU.
    #[serde(default)]
    pub cpu_quota_us: Option<u64>,
    /// The period of the CPU limit, 1000–1000000 µs (default 100000).
    #[serde(default)]
    pub cpu_period_us: Option<u64>,
    /// Memory limit in bytes, guest RAM included.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// Most processes and threads.
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// Block I/O weight, 1–10000 (v1 `blkio.weight` 10–1000 scaled; only where the controller
    /// exists).
    #[serde(default)]
    pub io_weight: Option<u32>,
    /// The CPUs each vCPU thread may run on: entry i (a CPU list such as `2`, `0-3` or `0,2`)
    /// for vCPU i, the entries cycled when there are fewer than vCPUs. Not a cgroup setting:
    /// applied to the vCPU threads (`sched_setaffinity`), with or without a cgroup.
    #[serde(default)]
    pub vcpu_affinity: Option<Vec<String>>,
}

/// One write of a setting: the controller it belongs to (for v1, the hierarchy), the file name
/// and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// `cpu`, `memory`, `pids`, `io` (v1: `blkio`).
    pub controller: &'static str,
    /// The file, e.g. `cpu.weight`.
    pub file: &'static str,
    /// What is written.
    pub value: String,
}

impl Resources {
    /// Checks the ranges, and that a memory limit covers `guest_ram` plus [`MEMORY_OVERHEAD`].
    pub fn validate(&self, guest_ram: u64) -> Result<(), CgroupError> {
        let bad = |m: String| Err(CgroupError::Invalid(m));
        if let Some(w) = self.cpu_weight.filter(|w| !(WEIGHT_RANGE.0..=WEIGHT_RANGE.1).contains(w)) {
            return bad(format!("cpu_weight {w} is outside {}–{}", WEIGHT_RANGE.0, WEIGHT_RANGE.1));
        }
        if let Some(w) = self.io_weight.filter(|w| !(WEIGHT_RANGE.0..=WEIGHT_RANGE.1).contains(w)) {
            return bad(format!("io_weight {w} is outside {}–{}", WEIGHT_RANGE.0, WEIGHT_RANGE.1));
        }
        if let Some(p) = self.cpu_period_us.filter(|p| !(1_000..=1_000_000).contains(p)) {
            return bad(format!("cpu_period_us {p} is outside 1000–1000000"));
        }
        if let Some(q) = self.cpu_quota_us.filter(|q| *q < 1_000) {
            return bad(format!("cpu_quota_us {q} is below 1000"));
        }
        if let Some(m) = self.memory_max {
            let need = guest_ram.saturating_add(MEMORY_OVERHEAD);
            if m < need {
                return bad(format!(
                    "memory_max {m} bytes is below what the VM needs: {} MiB of guest RAM plus {} MiB for the \
                     core and its services ({need} bytes)",
                    guest_ram >> 20,
                    MEMORY_OVERHEAD >> 20
                ));
            }
        }
        if self.pids_max == Some(0) {
            return bad("pids_max 0 leaves no room for the VM's own processes".into());
        }
        if let Some(lists) = &self.vcpu_affinity {
            if lists.is_empty() {
                return bad("vcpu_affinity needs at least one CPU list".into());
            }
            for l in lists {
                parse_cpu_list(l).map_err(CgroupError::Invalid)?;
            }
        }
        Ok(())
    }

    /// Whether a field other than `vcpu_affinity` is set (something for the cgroup).
    pub fn sets_cgroup(&self) -> bool {
        Resources { vcpu_affinity: None, ..self.clone() } != Resources::default()
    }

    /// `self` with the fields `update` sets replaced.
    #[must_use]
    pub fn merged(&self, update: &Resources) -> Resources {
        Resources {
            cpu_weight: update.cpu_weight.or(self.cpu_weight),
            cpu_quota_us: update.cpu_quota_us.or(self.cpu_quota_us),
            cpu_period_us: update.cpu_period_us.or(self.cpu_period_us),
            memory_max: update.memory_max.or(self.memory_max),
            pids_max: update.pids_max.or(self.pids_max),
            io_weight: update.io_weight.or(self.io_weight),
            vcpu_affinity: update.vcpu_affinity.clone().or_else(|| self.vcpu_affinity.clone()),
        }
    }

    /// The file writes that apply the fields set, for `version`.
    pub fn writes(&self, version: Version) -> Vec<Write> {
        let w = |controller, file, value: String| Write { controller, file, value };
        let mut out = Vec::new();
        let period = self.cpu_period_us.unwrap_or(100_000);
        match version {
            Version::V2 => {
                if let Some(x) = self.cpu_weight {
                    out.push(w("cpu", "cpu.weight", x.to_string()));
                }
                if self.cpu_quota_us.is_some() || self.cpu_period_us.is_some() {
                    let quota = self.cpu_quota_us.map_or_else(|| "max".to_string(), |q| q.to_string());
                    out.push(w("cpu", "cpu.max", format!("{quota} {period}")));
                }
                if let Some(m) = self.memory_max {
                    out.push(w("memory", "memory.max", m.to_string()));
                    // The OOM killer ends the whole VM, not one of its processes (v1 has no
                    // such switch: the core ends the VM when it sees an OOM kill in its group).
                    out.push(w("memory", "memory.oom.group", "1".into()));
                }
                if let Some(p) = self.pids_max {
                    out.push(w("pids", "pids.max", p.to_string()));
                }
                if let Some(x) = self.io_weight {
                    out.push(w("io", "io.weight", format!("default {x}")));
                }
            }
            Version::V1 => {
                if let Some(x) = self.cpu_weight {
                    // 100 (the v2 default) is 1024 shares (the v1 default); at least 2.
                    let shares = (u64::from(x) * 1024 / 100).max(2);
                    out.push(w("cpu", "cpu.shares", shares.to_string()));
                }
                if self.cpu_quota_us.is_some() || self.cpu_period_us.is_some() {
                    out.push(w("cpu", "cpu.cfs_period_us", period.to_string()));
                    let quota = self.cpu_quota_us.map_or_else(|| "-1".to_string(), |q| q.to_string());
                    out.push(w("cpu", "cpu.cfs_quota_us", quota));
                }
                if let Some(m) = self.memory_max {
                    out.push(w("memory", "memory.limit_in_bytes", m.to_string()));
                }
                if let Some(p) = self.pids_max {
                    out.push(w("pids", "pids.max", p.to_string()));
                }
                if let Some(x) = self.io_weight {
                    // 1–10000 onto blkio's 10–1000.
                    let v = (u64::from(x) / 10).clamp(10, 1000);
                    out.push(w("io", "blkio.weight", v.to_string()));
                }
            }
        }
        out
    }
}

/// A mount of a cgroup file system, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The path inside the hierarchy that is mounted there (`/` normally).
    pub root: String,
    /// `cgroup2`, or for v1 the controllers it carries.
    pub controllers: Vec<String>,
    /// Whether it is the unified (v2) hierarchy.
    pub unified: bool,
}

/// The cgroup mounts in a `mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let right: Vec<&str> = right.split_whitespace().collect();
        let (Some(root), Some(mount_point), Some(fstype)) = (fields.get(3), fields.get(4), right.first()) else {
            continue;
        };
        let options = right.get(2).copied().unwrap_or("");
        let unified = *fstype == "cgroup2";
        if !unified && *fstype != "cgroup" {
            continue;
        }
        let controllers = if unified {
            Vec::new()
        } else {
            options.split(',').filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('=')).map(str::to_string).collect()
        };
        out.push(CgroupMount {
            mount_point: PathBuf::from(unescape(mount_point)),
            root: (*root).to_string(),
            controllers,
            unified,
        });
    }
    out
}

/// `mountinfo` escapes spaces and a few other bytes as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = s.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup per hierarchy, from `/proc/self/cgroup`: the controllers of each line
/// (empty for v2's `0::`) and the path.
pub fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let ctrls = ctrls.split(',').filter(|c| !c.is_empty() && !c.contains('=')).map(str::to_string).collect();
            Some((ctrls, path.to_string()))
        })
        .collect()
}

/// Where each controller the VM uses lives: the directory of the cgroup to create the VM's under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The version in use.
    pub version: Version,
    /// For v2, one entry `""`; for v1, one per controller (`cpu`, `cpuacct`, `memory`, `pids`,
    /// and `blkio` if mounted): the parent directory.
    pub parents: BTreeMap<String, PathBuf>,
}

/// The v1 controllers a VM needs.
const V1_NEEDED: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];
/// The v2 controllers a VM needs.
const V2_NEEDED: [&str; 3] = ["cpu", "memory", "pids"];

impl Layout {
    /// Chooses the version and the parents from the mounts, this process's cgroups and what a
    /// v2 parent offers (`controllers_at(dir)` reads its `cgroup.controllers`). `parent`: a path
    /// inside each hierarchy (`--cgroup-parent`) instead of the one this process is in.
    pub fn detect(
        mounts: &[CgroupMount],
        own: &[(Vec<String>, String)],
        parent: Option<&str>,
        controllers_at: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, CgroupError> {
        let inside = |mount: &CgroupMount, own_path: &str| -> PathBuf {
            let rel = parent.unwrap_or(own_path);
            // The mount shows the hierarchy from `root` down: strip it from the path.
            let rel = rel.strip_prefix(mount.root.trim_end_matches('/')).unwrap_or(rel);
            mount.mount_point.join(rel.trim_start_matches('/'))
        };
        if let Some(m) = mounts.iter().find(|m| m.unified) {
            let own_path = own.iter().find(|(c, _)| c.is_empty()).map_or("/", |(_, p)| p.as_str());
            let dir = inside(m, own_path);
            let offered = controllers_at(&dir).unwrap_or_default();
            let offered: Vec<&str> = offered.split_whitespace().collect();
            if V2_NEEDED.iter().all(|c| offered.contains(c)) {
                return Ok(Self { version: Version::V2, parents: BTreeMap::from([(String::new(), dir)]) });
            }
        }
        let mut parents = BTreeMap::new();
        let mut missing = Vec::new();
        for c in V1_NEEDED.iter().chain(std::iter::once(&"blkio")) {
            let Some(m) = mounts.iter().find(|m| !m.unified && m.controllers.iter().any(|x| x == c)) else {
                if *c != "blkio" {
                    missing.push(*c);
                }
                continue;
            };
            let own_path = own.iter().find(|(cs, _)| cs.iter().any(|x| x == c)).map_or("/", |(_, p)| p.as_str());
            parents.insert((*c).to_string(), inside(m, own_path));
        }
        if !missing.is_empty() {
            return Err(CgroupError::Missing(format!(
                "no cgroup v2 hierarchy offering {} here, and no v1 hierarchy for {} (mount them, or start \
                 bulkhead with --no-cgroup)",
                V2_NEEDED.join(", "),
                missing.join(", ")
            )));
        }
        Ok(Self { version: Version::V1, parents })
    }

    /// Reads this host's mounts and this process's cgroups, and [`detect`](Self::detect)s. A
    /// mount namespace that shows no cgroup file system at all is named as such.
    pub fn of_host(parent: Option<&str>) -> Result<Self, CgroupError> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(io_err(Path::new("/proc/self/mountinfo")))?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
        let mounts = parse_mountinfo(&mountinfo);
        if mounts.is_empty() {
            return Err(CgroupError::Missing(
                "no cgroup file system is mounted in this mount namespace (`ip netns exec` mounts a sysfs of its \
                 own over /sys): enter a network namespace with `nsenter --net=/var/run/netns/NAME` instead, \
                 mount the cgroup hierarchies, or start bulkhead with --no-cgroup"
                    .into(),
            ));
        }
        Self::detect(&mounts, &parse_proc_cgroup(&own), parent, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
        })
    }

    /// The directory of `controller` (`cpu`, `memory`, `pids`, `io`/`blkio`, `cpuacct`) for the
    /// VM group `group`, if the host has it.
    fn dir(&self, controller: &str, group: &Path) -> Option<PathBuf> {
        match self.version {
            Version::V2 => self.parents.get("").map(|p| p.join(group)),
            Version::V1 => {
                let c = if controller == "io" { "blkio" } else { controller };
                self.parents.get(c).map(|p| p.join(group))
            }
        }
    }

    /// Every directory of the VM group `group` (one per hierarchy).
    fn dirs(&self, group: &Path) -> Vec<PathBuf> {
        self.parents.values().map(|p| p.join(group)).collect()
    }
}

/// The id of a VMM started without `--id` (Firecracker's): many may run at once.
pub const ANONYMOUS_ID: &str = "anonymous-instance";

/// The CPUs of a CPU list: comma-separated CPU numbers and ranges (`0-3,8`), each below 1024.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("CPU list {s:?}: expected CPU numbers and ranges such as 2, 0-3 or 0,2-3, each below 1024");
    let mut out = Vec::new();
    for item in s.split(',') {
        let (a, b) = item.trim().split_once('-').unwrap_or((item.trim(), item.trim()));
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a > b || b >= 1024 {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Pins the vCPU threads of this process (named `vcpuN`) to the CPU lists `lists` (vCPU i to
/// `lists[i % len]`), waiting (up to a second) until `expect` of them carry their names: a
/// thread names itself once it runs. Returns how many threads were pinned.
pub fn pin_vcpus_expecting(lists: &[String], expect: usize) -> Result<usize, CgroupError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let n = pin_vcpus(lists)?;
        if n >= expect || std::time::Instant::now() >= deadline {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Pins the vCPU threads of this process (named `vcpuN`) to the CPU lists `lists` (vCPU i to
/// `lists[i % len]`). Returns how many threads were pinned.
pub fn pin_vcpus(lists: &[String]) -> Result<usize, CgroupError> {
    let sets = lists.iter().map(|l| parse_cpu_list(l)).collect::<Result<Vec<_>, _>>().map_err(CgroupError::Invalid)?;
    if sets.is_empty() {
        return Ok(0);
    }
    let tasks = Path::new("/proc/self/task");
    let mut pinned = 0;
    for e in std::fs::read_dir(tasks).map_err(io_err(tasks))?.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else { continue };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let Some(index) = comm.trim().strip_prefix("vcpu").and_then(|n| n.parse::<usize>().ok()) else { continue };
        let mut set = nix::sched::CpuSet::new();
        for &cpu in &sets[index % sets.len()] {
            set.set(cpu).map_err(|e| CgroupError::Invalid(format!("CPU {cpu}: {e}")))?;
        }
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set).map_err(|e| {
            CgroupError::Invalid(format!("pinning vcpu{index} to CPUs {}: {e}", lists[index % lists.len()]))
        })?;
        pinned += 1;
    }
    Ok(pinned)
}

/// The name of the VM's group under the parent: `bulkhead-ID`, and for a VMM without an id of
/// its own (`anonymous-instance`) `bulkhead-anonymous-instance-PID`.
pub fn group_name(vm_id: &str) -> PathBuf {
    group_name_of(vm_id, crate::pidns::host_pid())
}

/// [`group_name`] of the VM whose core is `core` (the helper checks the core's requests so).
pub fn group_name_of(vm_id: &str, core: u32) -> PathBuf {
    // Ids are checked at start (`[A-Za-z0-9_-]`); anything else is replaced, never a path.
    let safe: String =
        vm_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if vm_id == ANONYMOUS_ID {
        return PathBuf::from(format!("bulkhead-{safe}-{core}"));
    }
    PathBuf::from(format!("bulkhead-{safe}"))
}

/// The child group of the core.
pub const CORE_CHILD: &str = "vmm";

/// A VM's cgroup, created and owned by its core. Removing it is the helper's job
/// ([`clean_up_after`]), which runs outside it and outlives the core.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmCgroup {
    layout: Layout,
    group: PathBuf,
    resources: Resources,
}

impl VmCgroup {
    /// Creates the VM's group under the layout's parents, the directories only (fast): a
    /// stale, empty one left by a VM of the same id that crashed is removed first; one holding
    /// processes is refused, and so is one that appears meanwhile (`mkdir` never reuses a
    /// directory). [`settle`](Self::settle) then moves the core in, which the kernel may make
    /// slow.
    fn create(layout: Layout, vm_id: &str, resources: &Resources) -> Result<Self, CgroupError> {
        let group = group_name(vm_id);
        for dir in layout.dirs(&group) {
            if dir.exists() && !remove_group(&dir) {
                return Err(CgroupError::Invalid(format!(
                    "{} exists and holds processes: another VM with id {vm_id} runs on this host",
                    dir.display()
                )));
            }
        }
        let cg = Self { layout, group, resources: resources.clone() };
        let made = cg.layout.dirs(&cg.group).iter().try_for_each(|dir| {
            std::fs::create_dir(dir).map_err(io_err(dir))?;
            let core = dir.join(CORE_CHILD);
            std::fs::create_dir(&core).map_err(io_err(&core))
        });
        match made {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    /// Moves the core out (v1) and removes what was made.
    fn remove(&self) {
        self.leave();
        for dir in self.dirs() {
            remove_group(&dir);
        }
    }

    /// Moves the core into its child group, hands the controllers down (v2) and applies
    /// `resources`.
    fn settle(&self, resources: &Resources) -> Result<(), CgroupError> {
        self.place(CORE_CHILD, std::process::id())?;
        if self.layout.version == Version::V2 {
            let parent = &self.layout.parents[""];
            let offered = std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = ["cpu", "memory", "pids", "io"]
                .iter()
                .filter(|c| offered.split_whitespace().any(|o| o == **c))
                .map(|c| format!("+{c}"))
                .collect();
            let line = enable.join(" ");
            for dir in [parent.clone(), parent.join(&self.group)] {
                let f = dir.join("cgroup.subtree_control");
                std::fs::write(&f, &line).map_err(|source| {
                    if source.raw_os_error() == Some(libc::EBUSY) {
                        CgroupError::Missing(format!(
                            "{} holds other processes, so its controllers cannot be handed down (cgroup v2 \
                             lets only leaves hold processes): give bulkhead a cgroup of its own (systemd \
                             Delegate=yes) or name one with --cgroup-parent",
                            dir.display()
                        ))
                    } else {
                        CgroupError::Io { path: f.clone(), source }
                    }
                })?;
            }
        }
        self.write(resources)
    }

    /// Moves the core back to the parent (v1 only: under v2 a parent with controllers handed
    /// down holds no process, and the helper removes the group once the core is gone).
    fn leave(&self) {
        if self.layout.version == Version::V1 {
            for parent in self.layout.parents.values() {
                let _ = std::fs::write(parent.join("cgroup.procs"), std::process::id().to_string());
            }
        }
    }

    fn write(&self, r: &Resources) -> Result<(), CgroupError> {
        for w in r.writes(self.layout.version) {
            let Some(dir) = self.layout.dir(w.controller, &self.group) else {
                if w.controller == "io" {
                    log::warn!("cgroup: no I/O controller on this host: io_weight is not applied");
                    continue;
                }
                return Err(CgroupError::Missing(format!("no {} controller for {}", w.controller, w.file)));
            };
            let f = dir.join(w.file);
            std::fs::write(&f, &w.value).map_err(io_err(&f))?;
        }
        Ok(())
    }

    /// Creates the child group `name` (a service) and moves `pid` into it.
    pub fn place(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        for dir in self.layout.dirs(&self.group) {
            let child = dir.join(name);
            if !child.exists() {
                std::fs::create_dir(&child).map_err(io_err(&child))?;
            }
            let procs = child.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string()).map_err(io_err(&procs))?;
        }
        Ok(())
    }

    /// Applies `update` live (fields not set stay as they are) after checking the result
    /// against `guest_ram`. Returns the settings now in force.
    pub fn update(&mut self, update: &Resources, guest_ram: u64) -> Result<Resources, CgroupError> {
        let next = self.resources.merged(update);
        next.validate(guest_ram)?;
        self.write(update)?;
        self.resources = next.clone();
        Ok(next)
    }

    /// The settings in force.
    pub fn resources(&self) -> Resources {
        self.resources.clone()
    }

    /// The group's path below the parents (`bulkhead-ID`).
    pub fn group(&self) -> &Path {
        &self.group
    }

    /// The cgroup version in use.
    pub fn version(&self) -> Version {
        self.layout.version
    }

    /// The VM group's directories, one per hierarchy (what the helper removes).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.layout.dirs(&self.group)
    }

    /// CPU time used by the child group `child` (a service, or [`CORE_CHILD`]), or by the whole
    /// VM when `None`, in ns: v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`.
    pub fn cpu_ns(&self, child: Option<&str>) -> Option<u64> {
        let group = child.map_or_else(|| self.group.clone(), |c| self.group.join(c));
        match self.layout.version {
            Version::V2 => {
                let stat = std::fs::read_to_string(self.layout.dir("cpu", &group)?.join("cpu.stat")).ok()?;
                let us: u64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec "))?.trim().parse().ok()?;
                Some(us.saturating_mul(1000))
            }
            Version::V1 => {
                let dir = self.layout.dir("cpuacct", &group)?;
                std::fs::read_to_string(dir.join("cpuacct.usage")).ok()?.trim().parse().ok()
            }
        }
    }

    /// How many processes the kernel's OOM killer has ended in the VM's group (children
    /// included); `None` without a memory controller.
    pub fn oom_kills(&self) -> Option<u64> {
        Some(oom_kills(&self.layout.dir("memory", &self.group)?, self.layout.version))
    }
}

/// A VM's cgroup, its core's side. The VM's helper ([`crate::helper`]) removes it once the core
/// is gone, however it ended (a normal stop, a crash, `kill -9`, the OOM killer), and says so if
/// the OOM killer was involved: the helper is started before the core moves into the group, so
/// it stays where `bulkhead` started. Once the core has dropped its privileges, the moves of
/// restarted services and live setting changes go through the helper too.
#[derive(Debug)]
pub struct KeptCgroup {
    /// `None` until the group exists (and if creating it failed).
    cgroup: std::sync::Mutex<Option<VmCgroup>>,
    /// The core's move into the group, under way on a thread of its own (the first move of a
    /// burst waits for an RCU grace period in the kernel, ~10 ms): start-up goes on meanwhile,
    /// and [`settle`](Self::settle) waits for it before the guest's kernel is loaded.
    settling: std::sync::Mutex<Option<std::thread::JoinHandle<Result<(), CgroupError>>>>,
    /// Services started while the core's move was under way: moved by `settle`, in one burst.
    pending: std::sync::Mutex<Vec<(String, u32)>>,
    helper: std::sync::Arc<crate::helper::Helper>,
}

impl KeptCgroup {
    /// Creates the VM's group ([`VmCgroup::create`]), hands it to the helper (which removes it
    /// once the core is gone) and starts moving the core into it (see `settling`).
    pub fn start(
        layout: Layout,
        vm_id: &str,
        resources: &Resources,
        helper: std::sync::Arc<crate::helper::Helper>,
    ) -> Result<Self, CgroupError> {
        let kept = Self {
            cgroup: std::sync::Mutex::new(None),
            settling: std::sync::Mutex::new(None),
            pending: std::sync::Mutex::new(Vec::new()),
            helper,
        };
        let cg = VmCgroup::create(layout, vm_id, resources)?;
        *kept.lock() = Some(cg.clone());
        // From here on, dropping `kept` removes the group (a start that failed).
        kept.helper.adopt_cgroup(&cg).map_err(|e| CgroupError::Missing(crate::vmm::chain(&e)))?;
        let (mover, r) = (cg, resources.clone());
        let thread = std::thread::Builder::new().name("cgroup-settle".into()).spawn(move || mover.settle(&r));
        match thread {
            Ok(t) => *kept.settling.lock().unwrap_or_else(|e| e.into_inner()) = Some(t),
            // No thread: do it here.
            Err(_) => kept.with(|cg| cg.settle(resources))?,
        }
        Ok(kept)
    }

    /// Waits for the core's move (see `settling`), then moves the services started meanwhile
    /// into their groups. Call before the guest's memory is written (the pages are charged to
    /// the group the writer is in) and before the guest runs.
    pub fn settle(&self) -> Result<(), CgroupError> {
        let handle = self.settling.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.join().map_err(|_| CgroupError::Missing("the thread moving the core into its cgroup died".into()))??;
        }
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, pid) in pending {
            // A core in its own PID namespace holds its services' host pids: the helper, in
            // the host's, moves them.
            if crate::pidns::in_own_pid_namespace() {
                self.helper.place(&name, pid)?;
            } else {
                self.with(|cg| cg.place(&name, pid))?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VmCgroup>> {
        self.cgroup.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(&self, f: impl FnOnce(&mut VmCgroup) -> Result<T, CgroupError>) -> Result<T, CgroupError> {
        match self.lock().as_mut() {
            Some(cg) => f(cg),
            None => Err(CgroupError::Missing("the VM's cgroup was not created".into())),
        }
    }

    /// Moves a service's process into its child group; while the core's own move is under way,
    /// notes it for [`settle`](Self::settle) instead. Otherwise the helper does it: a restart
    /// happens on a supervisor thread, whose filter allows no cgroup writes, and after the drop
    /// the core may not write the cgroup's files anyway.
    pub fn place(&self, name: &str, pid: u32) -> Result<(), CgroupError> {
        if self.settling.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), pid));
            return Ok(());
        }
        self.helper.place(name, pid)
    }

    /// Applies `update` live ([`VmCgroup::update`], done by the helper, which holds the VM's
    /// cgroup; the core only keeps what is in force).
    pub fn update(&self, update: &Resources, guest_ram: u64) -> Result<Resources, CgroupError> {
        let next = self.helper.update(update, guest_ram)?;
        self.with(|cg| {
            cg.resources = next.clone();
            Ok(())
        })?;
        Ok(next)
    }

    /// The settings in force.
    pub fn resources(&self) -> Resources {
        self.lock().as_ref().map(VmCgroup::resources).unwrap_or_default()
    }

    /// CPU time of a child group or the whole VM ([`VmCgroup::cpu_ns`]); read by the helper
    /// once the core is jailed (the cgroup file system is outside its root).
    pub fn cpu_ns(&self, child: Option<&str>) -> Option<u64> {
        if self.helper.is_sealed() {
            return self.helper.cpu_ns(child);
        }
        self.lock().as_ref()?.cpu_ns(child)
    }

    /// OOM kills in the VM's group ([`VmCgroup::oom_kills`]); read by the helper once the core
    /// is jailed.
    pub fn oom_kills(&self) -> Option<u64> {
        if self.helper.is_sealed() {
            return self.helper.oom_kills();
        }
        self.lock().as_ref()?.oom_kills()
    }

    /// The version and the VM group's directories.
    pub fn describe(&self) -> Option<(Version, Vec<PathBuf>)> {
        self.lock().as_ref().map(|cg| (cg.version(), cg.dirs()))
    }
}

impl Drop for KeptCgroup {
    /// Before the helper is sealed (a start that failed): moves the core out and removes the
    /// group (the helper is told to leave it alone). After: nothing (the helper sees the core's
    /// end).
    fn drop(&mut self) {
        if self.helper.is_sealed() {
            return;
        }
        // A move still under way ends first: nothing is removed under it.
        if let Some(h) = self.settling.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
        if let Some(cg) = self.cgroup.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            cg.remove();
        }
    }
}

/// The processes in `dir` and its children (two levels), as the kernel lists them.
fn procs_in(dir: &Path) -> Vec<u32> {
    let read = |d: &Path| -> Vec<u32> {
        std::fs::read_to_string(d.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    };
    let mut out = read(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(read(&e.path()));
            }
        }
    }
    out
}

/// SIGKILLs `pid` if it still is in a cgroup named `group`: checked through a pidfd, so a pid
/// reused meanwhile by another process is never signalled.
fn kill_if_in_group(pid: u32, group: &str) {
    let Ok(p) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is checked and owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) };
    let Ok(fd) = std::os::fd::RawFd::try_from(fd) else { return };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a fresh pidfd this function owns.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // The pidfd pins the process: if /proc shows it in the group now, the signal reaches it.
    let inside = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|t| t.lines().any(|l| l.split('/').any(|part| part == group)));
    if inside {
        let _ = crate::service::pidfd_signal_kill(std::os::fd::AsFd::as_fd(&pidfd));
    }
}

/// The `oom_kill` count of a VM's memory group `memory`. v2 (`memory.events`) counts a kill in
/// the group and every group below it; v1 (`memory.oom_control`) only in the group of the
/// process killed, so there the VM's group and its children (the core's, each service's) are
/// summed.
fn oom_kills(memory: &Path, version: Version) -> u64 {
    let count = |dir: &Path, file: &str| -> u64 {
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
            .unwrap_or(0)
    };
    match version {
        Version::V2 => count(memory, "memory.events"),
        Version::V1 => {
            let children = std::fs::read_dir(memory)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                // Bounded: the core's group and one per service.
                .take(1024)
                .map(|e| count(&e.path(), "memory.oom_control"));
            count(memory, "memory.oom_control").saturating_add(children.fold(0u64, u64::saturating_add))
        }
    }
}

/// What the helper does with the VM's cgroup once the core is gone: waits up to `grace` for the
/// VM's processes to end (services die with the core), kills what is left of the VM's own
/// group, says so if the kernel's OOM killer acted in it, and removes the group. Returns
/// whether the group is gone.
pub fn clean_up_after(vm: &str, cg: &VmCgroup, grace: Duration) -> bool {
    let dirs = cg.dirs();
    let deadline = std::time::Instant::now() + grace;
    while dirs.iter().any(|d| !procs_in(d).is_empty()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let group = cg.group.to_string_lossy().into_owned();
    for d in &dirs {
        for pid in procs_in(d) {
            kill_if_in_group(pid, &group);
        }
    }
    if let Some(m) = cg.layout.dir("memory", &cg.group) {
        let n = oom_kills(&m, cg.version());
        if n > 0 {
            let file = if cg.version() == Version::V2 { "memory.max" } else { "memory.limit_in_bytes" };
            let limit = std::fs::read_to_string(m.join(file)).unwrap_or_default();
            eprintln!(
                "bulkhead: VM {vm}: ended by the kernel's OOM killer in its cgroup ({n} process(es) killed; memory \
                 limit {} bytes)",
                limit.trim()
            );
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let left: Vec<&PathBuf> = dirs.iter().filter(|d| !remove_group(d)).collect();
        if left.is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            for d in left {
                eprintln!("bulkhead-helper: VM {vm}: could not remove {}", d.display());
            }
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM's cgroup as `config` asks for it: `None` when disabled or when not running as root
/// (said in the log); an error naming what the host lacks otherwise.
pub fn for_vm(
    vm_id: &str,
    config: &crate::config::CgroupConfig,
    guest_ram: u64,
    helper: Option<&std::sync::Arc<crate::helper::Helper>>,
) -> Result<Option<KeptCgroup>, CgroupError> {
    config.resources.validate(guest_ram)?;
    if config.disabled {
        log::info!("cgroup: off for this VM (--no-cgroup)");
        return Ok(None);
    }
    let Some(helper) = helper.filter(|_| nix::unistd::geteuid().is_root()) else {
        log::info!("cgroup: not running as root: the VM gets no cgroup of its own");
        return Ok(None);
    };
    let layout = Layout::of_host(config.parent.as_deref())?;
    let kept = KeptCgroup::start(layout, vm_id, &config.resources, helper.clone())?;
    let (version, dirs) = kept.describe().unwrap_or((Version::V1, Vec::new()));
    log::info!(
        "cgroup {}: {}",
        version.name(),
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" ")
    );
    Ok(Some(kept))
}

/// Removes the group `dir` and its children, deepest first; only empty groups can go (the
/// kernel refuses the others). Returns whether `dir` is gone. Bounded: two levels.
pub fn remove_group(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    !dir.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_is_chosen_when_v2_offers_no_controllers() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 7, "{mounts:?}");
        let l = Layout::detect(&mounts, &parse_proc_cgroup(OWN), None, |_| Some(String::new())).expect("layout");
        assert_eq!(l.version, Version::V1);
        assert_eq!(l.parents["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(l.parents["memory"], PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), "where we run");
        assert_eq!(l.parents["blkio"], PathBuf::from("/sys/fs/cgroup/blkio"));
        let g = group_name("vm1");
        assert_eq!(l.dir("io", &g), Some(PathBuf::from("/sys/fs/cgroup/blkio/bulkhead-vm1")));
        // --cgroup-parent replaces where we run, in every hierarchy.
        let l = Layout::detect(&mounts, &parse_proc_cgroup(OWN), Some("/hosting"), |_| None).expect("layout");
        assert_eq!(l.parents["memory"], PathBuf::from("/sys/fs/cgroup/memory/hosting"));
    }

    #[test]
    fn v2_is_chosen_when_it_offers_the_controllers() {
        let mounts = parse_mountinfo("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let own = parse_proc_cgroup("0::/system.slice/bulkhead.service\n");
        let l = Layout::detect(&mounts, &own, None, |d| {
            (d == Path::new("/sys/fs/cgroup/system.slice/bulkhead.service")).then(|| "cpuset cpu io memory pids".into())
        })
        .expect("layout");
        assert_eq!(l.version, Version::V2);
        assert_eq!(
            l.dir("memory", &group_name("a")),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/bulkhead.service/bulkhead-a"))
        );
    }

    #[test]
    fn a_host_without_controllers_is_named_in_one_error() {
        let mounts = parse_mountinfo("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let e = Layout::detect(&mounts, &parse_proc_cgroup("0::/\n"), None, |_| Some("cpu".into())).expect_err("none");
        let m = e.to_string();
        assert!(m.contains("cpu, memory, pids") && m.contains("cpu, cpuacct, memory, pids"), "{m}");
    }

    #[test]
    fn settings_become_the_files_of_each_version() {
        let r = Resources {
            cpu_weight: Some(300),
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            memory_max: Some(256 << 20),
            pids_max: Some(64),
            io_weight: Some(500),
            vcpu_affinity: Some(vec!["1".into()]),
        };
        let v2: Vec<(&str, String)> = r.writes(Version::V2).into_iter().map(|w| (w.file, w.value)).collect();
        assert_eq!(
            v2,
            vec![
                ("cpu.weight", "300".into()),
                ("cpu.max", "50000 100000".into()),
                ("memory.max", (256u64 << 20).to_string()),
                ("memory.oom.group", "1".into()),
                ("pids.max", "64".into()),
                ("io.weight", "default 500".into()),
            ]
        );
        let v1: Vec<(&str, String)> = r.writes(Version::V1).into_iter().map(|w| (w.file, w.value)).collect();
        assert_eq!(
            v1,
            vec![
                ("cpu.shares", "3072".into()),
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", "50000".into()),
                ("memory.limit_in_bytes", (256u64 << 20).to_string()),
                ("pids.max", "64".into()),
                ("blkio.weight", "50".into()),
            ]
        );
        assert!(Resources::default().writes(Version::V2).is_empty(), "nothing set, nothing written");
        let period_only = Resources { cpu_period_us: Some(20_000), ..Resources::default() };
        assert_eq!(period_only.writes(Version::V2)[0].value, "max 20000");
        assert_eq!(period_only.writes(Version::V1)[1].value, "-1");
    }

    #[test]
    fn settings_are_checked_against_the_vm() {
        let ram = 128 << 20;
        assert!(Resources::default().validate(ram).is_ok());
        let low = Resources { memory_max: Some(150 << 20), ..Resources::default() };
        let m = low.validate(ram).expect_err("below RAM + overhead").to_string();
        assert!(m.contains("128 MiB of guest RAM plus 64 MiB"), "{m}");
        assert!(Resources { memory_max: Some(192 << 20), ..Resources::default() }.validate(ram).is_ok());
        for bad in [
            Resources { cpu_weight: Some(0), ..Resources::default() },
            Resources { cpu_weight: Some(10_001), ..Resources::default() },
            Resources { cpu_period_us: Some(999), ..Resources::default() },
            Resources { cpu_quota_us: Some(10), ..Resources::default() },
            Resources { pids_max: Some(0), ..Resources::default() },
            Resources { io_weight: Some(0), ..Resources::default() },
        ] {
            assert!(bad.validate(ram).is_err(), "{bad:?}");
        }
        let merged = Resources { cpu_weight: Some(100), pids_max: Some(10), ..Resources::default() }
            .merged(&Resources { cpu_weight: Some(300), ..Resources::default() });
        assert_eq!((merged.cpu_weight, merged.pids_max), (Some(300), Some(10)));
        for bad in [vec![], vec!["x".to_string()], vec!["3-1".into()], vec!["1024".into()]] {
            assert!(
                Resources { vcpu_affinity: Some(bad.clone()), ..Resources::default() }.validate(ram).is_err(),
                "{bad:?}"
            );
        }
        let pinned = Resources { vcpu_affinity: Some(vec!["0-1".into()]), ..Resources::default() };
        assert!(pinned.validate(ram).is_ok() && !pinned.sets_cgroup());
        assert!(Resources { cpu_weight: Some(5), ..Resources::default() }.sets_cgroup());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("2"), Ok(vec![2]));
        assert_eq!(parse_cpu_list("0-3,8"), Ok(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpu_list(" 1 , 1-2"), Ok(vec![1, 2]));
        assert!(parse_cpu_list("").is_err() && parse_cpu_list("2-").is_err() && parse_cpu_list("-1").is_err());
    }

    #[test]
    fn escaped_mount_points_are_read() {
        let m = parse_mountinfo("41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my cgroups"));
    }
}
