//! `cargo xtask bench --only footprint`: what one running VM costs the host, Bulkhead against
//! Firecracker, same probe guest, interleaved runs.
//!
//! Per run and VMM, for a VM with a console only, one with a console and a disk, and one with a
//! console, a disk and a NIC (a TAP in a network namespace the bench makes and deletes; the VMM
//! runs in it through `nsenter --net`; the row is left out where no namespace can be made):
//! - **start time**: from spawning the VMM process (`bulkhead run ...`, `firecracker --no-api
//!   --config-file ...`) to the guest's first console line, every service spawned and jailed;
//! - **memory**: once the guest (`probe.test=idle`) has halted, the PSS of every process of the VM
//!   (the VMM and its descendants), with guest RAM left out (Bulkhead's `bulkhead-guest-ram` memfd
//!   wherever it is mapped; Firecracker's anonymous mapping of exactly the guest's size), summed
//!   and per process;
//! - **idle CPU**: user + system time of all those processes over 2 s of a halted guest.
//!
//! Bulkhead runs three times per round: as users run it (the core jailed, its helper, the VM's
//! cgroup), with `--no-cgroup`, and with `--no-jail --no-cgroup` (no helper: the core keeps root
//! and creates its services itself), so what the cgroup and the jail cost is measured in the
//! same run.
//!
//! Firecracker is `../shared/peers/firecracker` (or `$BULKHEAD_FIRECRACKER`); without it the
//! Bulkhead rows stand alone and say so.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::netns::NetNs;
use crate::util::BoxError;

/// Guest RAM of every VM measured (MiB).
pub(crate) const MEM_MIB: u64 = 64;
/// How long the idle CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Vmm {
    Bulkhead,
    /// Bulkhead with `--no-cgroup`: what the VM's cgroup costs, same run.
    BulkheadNoCgroup,
    /// Bulkhead with `--no-jail --no-cgroup` (no helper, the core keeps root): what the jail and
    /// the cgroup cost together, same run.
    BulkheadBare,
    Firecracker,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Devices {
    Console,
    ConsoleDisk,
    /// Console, disk and a NIC on a TAP in a network namespace of the bench's own.
    ConsoleDiskNic,
}

impl Devices {
    fn label(self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::ConsoleDisk => "console + disk",
            Self::ConsoleDiskNic => "console + disk + NIC",
        }
    }
}

/// The TAP (in the bench's namespace) that the NIC row's VMs attach to, one VM at a time.
const TAP: &str = "bhfp0";
/// The guest's MAC on that TAP.
const GUEST_MAC: &str = "02:bb:00:00:00:11";

/// A NIC for [`spawn_with`]: the VMM runs inside `ns` and attaches to its TAP `tap` with the
/// guest MAC `mac`.
#[derive(Clone, Copy)]
pub(crate) struct Nic<'a> {
    pub ns: &'a NetNs,
    pub tap: &'a str,
    pub mac: &'a str,
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Sample {
    start_ms: f64,
    pss_kib: u64,
    per_process: Vec<(String, u64)>,
    idle_cpu_ms: f64,
}

/// The processes of the tree rooted at `root` (itself included).
pub(crate) fn tree(root: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(pp) = stat_fields(pid).and_then(|f| f.get(1).and_then(|v| v.parse::<u32>().ok())) {
                parent.push((pid, pp));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name: state is [0], ppid [1].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU time of every thread of `pids`, in ns (`/proc/PID/task/TID/schedstat`, first field).
pub(crate) fn cpu_ns(pids: &[u32]) -> u64 {
    let mut total = 0;
    for p in pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in rd.flatten() {
            total += std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
                .unwrap_or(0);
        }
    }
    total
}

/// PSS in KiB of `pid`, guest RAM left out.
pub(crate) fn pss_without_guest_ram(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_bytes = MEM_MIB << 20;
    let mut total = 0u64;
    let mut skip = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|(lo, _)| lo.chars().all(|c| c.is_ascii_hexdigit())) {
            // A mapping header: "lo-hi perms offset dev inode [path]".
            let size =
                u64::from_str_radix(hi, 16).unwrap_or(0).saturating_sub(u64::from_str_radix(lo, 16).unwrap_or(0));
            let path = line.split_whitespace().nth(5).unwrap_or("");
            skip = path.contains("bulkhead-guest-ram") || (path.is_empty() && size == guest_bytes);
        } else if first == "Pss:" && !skip {
            total += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

/// The file name of the process's `argv[0]` (a Bulkhead service is `bulkhead` started as
/// `bulkhead-console`, ...).
fn comm(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let name = String::from_utf8_lossy(argv0).rsplit('/').next().unwrap_or_default().to_string();
    if name.is_empty() {
        format!("pid {pid}")
    } else {
        name
    }
}

/// One VM as the footprint and density benches start it.
#[derive(Clone, Copy)]
pub(crate) struct VmSpec<'a> {
    /// Which VMM.
    pub vmm: Vmm,
    /// Its executable.
    pub exe: &'a Path,
    /// The probe guest.
    pub probe: &'a Path,
    /// An optional disk image.
    pub disk: Option<&'a Path>,
    /// An optional NIC.
    pub nic: Option<Nic<'a>>,
    /// Where Firecracker's config and log files go.
    pub dir: &'a Path,
}

/// Starts `vm` with `cmdline`, its stdout piped; `tag` names Firecracker's config and log files.
pub(crate) fn spawn_with(vm: VmSpec<'_>, cmdline: &str, tag: &str) -> Result<Child, BoxError> {
    let VmSpec { vmm, exe, probe, disk, nic, dir } = vm;
    let cmd = match vmm {
        Vmm::Bulkhead | Vmm::BulkheadNoCgroup | Vmm::BulkheadBare => {
            let mut c = Command::new(exe);
            c.args(["run", "--serial-input", "none", "--log-level", "warn", "--mem", &MEM_MIB.to_string()])
                .arg("--kernel")
                .arg(probe)
                .args(["--cmdline", cmdline]);
            if let Some(d) = disk {
                c.arg("--disk").arg(d);
            }
            if let Some(n) = nic {
                c.args(["--net", &format!("tap={},mac={}", n.tap, n.mac)]);
            }
            if vmm == Vmm::BulkheadNoCgroup {
                c.arg("--no-cgroup");
            }
            if vmm == Vmm::BulkheadBare {
                c.args(["--no-jail", "--no-cgroup"]);
            }
            c
        }
        Vmm::Firecracker => crate::bench_api::firecracker_command(
            exe,
            dir,
            tag,
            probe,
            cmdline,
            MEM_MIB,
            disk,
            nic.map(|n| (n.tap, n.mac)),
        )?,
    };
    // `nsenter` execs the VMM: the child's pid is the VMM's.
    let mut cmd = match nic {
        Some(n) => n.ns.command(&cmd),
        None => cmd,
    };
    Ok(cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?)
}

fn one_run(vm: VmSpec<'_>) -> Result<Sample, BoxError> {
    let vmm = vm.vmm;
    let t0 = Instant::now();
    let mut child = spawn_with(vm, "probe.test=idle", "footprint")?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let result = (|| -> Result<Sample, BoxError> {
        let limit = Duration::from_secs(30);
        let (first, _) = rx.recv_timeout(limit).map_err(|_| format!("{vmm:?}: no console line"))?;
        let start_ms = first.duration_since(t0).as_secs_f64() * 1e3;
        loop {
            let (_, line) = rx.recv_timeout(limit).map_err(|_| format!("{vmm:?}: the guest never halted"))?;
            if line.contains("idle: halting") {
                break;
            }
        }
        // Let the processes finish starting (lazy allocations, the service's first sleep).
        std::thread::sleep(Duration::from_millis(300));
        let pids = tree(child.id());
        let mut per_process = Vec::new();
        for &p in &pids {
            if let Some(kib) = pss_without_guest_ram(p) {
                per_process.push((comm(p), kib));
            }
        }
        let pss_kib = per_process.iter().map(|(_, k)| k).sum();
        let before = cpu_ns(&pids);
        std::thread::sleep(IDLE_WINDOW);
        let after = cpu_ns(&pids);
        let idle_cpu_ms = after.saturating_sub(before) as f64 / 1e6;
        Ok(Sample { start_ms, pss_kib, per_process, idle_cpu_ms })
    })();
    kill_vm(&mut child);
    result
}

/// SIGKILLs the VMM `child` and waits (at most 5 s) for every process of its VM to be gone: a
/// jailed Bulkhead's launcher goes first, its core, helper and services a moment later (and
/// the next run may open the same disk image, which they hold locked, or the same TAP).
pub(crate) fn kill_vm(child: &mut Child) {
    let all = tree(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while all.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn median_f(v: &[f64]) -> f64 {
    crate::bench_api::pct(&mut v.to_vec(), 0.5)
}

/// Runs the benchmark (`runs` interleaved runs per VMM and device set) and prints the report.
pub fn bench(bin: &Path, probe: &Path, runs: usize) -> Result<(), BoxError> {
    let dir = crate::util::workspace_root().join("target/bench-footprint");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(8 << 20)?;
    let mut vmms: Vec<(Vmm, PathBuf)> = vec![
        (Vmm::Bulkhead, bin.join("bulkhead")),
        (Vmm::BulkheadNoCgroup, bin.join("bulkhead")),
        (Vmm::BulkheadBare, bin.join("bulkhead")),
    ];
    match crate::bench_api::firecracker() {
        Some(p) => vmms.push((Vmm::Firecracker, p)),
        None => println!("# Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): Bulkhead only"),
    }
    // The NIC row needs a TAP in a namespace of our own; without `ip` or namespaces it is left out.
    let ns = crate::util::ensure_packages(&[("ip", "iproute2")]).and_then(|()| {
        let ns = NetNs::new("bhfp-")?;
        ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
        ns.ip(&["link", "set", TAP, "up"])?;
        Ok(ns)
    });
    let mut rows = vec![Devices::Console, Devices::ConsoleDisk];
    match &ns {
        Ok(_) => rows.push(Devices::ConsoleDiskNic),
        Err(e) => println!("# no network namespace for the NIC row ({e}): left out"),
    }
    let mut all: BTreeMap<(Devices, Vmm), Vec<Sample>> = BTreeMap::new();
    for r in 0..runs {
        for &devices in &rows {
            for (vmm, exe) in &vmms {
                let d = (devices != Devices::Console).then_some(disk.as_path());
                let nic = match (&ns, devices) {
                    (Ok(ns), Devices::ConsoleDiskNic) => Some(Nic { ns, tap: TAP, mac: GUEST_MAC }),
                    _ => None,
                };
                let s = one_run(VmSpec { vmm: *vmm, exe, probe, disk: d, nic, dir: &dir })?;
                eprintln!(
                    "footprint run {}/{runs} {vmm:?} {}: start {:.1} ms, PSS {} KiB, idle CPU {:.0} ms",
                    r + 1,
                    devices.label(),
                    s.start_ms,
                    s.pss_kib,
                    s.idle_cpu_ms
                );
                all.entry((devices, *vmm)).or_default().push(s);
            }
        }
    }
    println!(
        "# footprint: probe guest (`idle`), {MEM_MIB} MiB, 1 vCPU, {runs} interleaved runs; PSS of every process of the VM without guest RAM"
    );
    println!("| VMM | devices | start → first console line, median ms | worst ms | PSS median KiB | worst KiB | idle CPU per {} s, median ms |", IDLE_WINDOW.as_secs());
    println!("|---|---|---|---|---|---|---|");
    let mut medians: BTreeMap<(Devices, Vmm), (f64, f64)> = BTreeMap::new();
    for ((devices, vmm), samples) in &all {
        let start: Vec<f64> = samples.iter().map(|s| s.start_ms).collect();
        let pss: Vec<f64> = samples.iter().map(|s| s.pss_kib as f64).collect();
        let cpu: Vec<f64> = samples.iter().map(|s| s.idle_cpu_ms).collect();
        let worst = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "| {vmm:?} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} |",
            devices.label(),
            median_f(&start),
            worst(&start),
            median_f(&pss),
            worst(&pss),
            median_f(&cpu)
        );
        medians.insert((*devices, *vmm), (median_f(&start), median_f(&pss)));
    }
    for &devices in &rows {
        // What one variant costs over another, in start time and PSS.
        for (with, without, what, how) in [
            (Vmm::Bulkhead, Vmm::BulkheadNoCgroup, "the VM's cgroup costs", " (with / without)"),
            (
                Vmm::BulkheadNoCgroup,
                Vmm::BulkheadBare,
                "the core's jail (its helper, ids, drop) costs",
                " (--no-cgroup vs --no-jail --no-cgroup)",
            ),
            (Vmm::Bulkhead, Vmm::BulkheadBare, "jail and cgroup together cost", ""),
        ] {
            if let (Some(a), Some(b)) = (medians.get(&(devices, with)), medians.get(&(devices, without))) {
                println!(
                    "footprint {}: {what} {:+.2} ms of start time and {:+.0} KiB of PSS{how}",
                    devices.label(),
                    a.0 - b.0,
                    a.1 - b.1
                );
            }
        }
        if let (Some(b), Some(f)) = (medians.get(&(devices, Vmm::Bulkhead)), medians.get(&(devices, Vmm::Firecracker)))
        {
            println!(
                "footprint {}: Bulkhead/Firecracker start {:.2}, PSS {:.2}",
                devices.label(),
                b.0 / f.0,
                b.1 / f.1
            );
        }
    }
    println!("# PSS per process (KiB, last run)");
    for ((devices, vmm), samples) in &all {
        if let Some(s) = samples.last() {
            let parts: Vec<String> = s.per_process.iter().map(|(n, k)| format!("{n} {k}")).collect();
            println!("- {vmm:?}, {}: {}", devices.label(), parts.join(", "));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
