//! `cargo xtask bench --only density`: many VMs on one host at once, as a hosting host runs them,
//! Bulkhead against Firecracker.
//!
//! For each count N (`--density 50,100`) and each VMM, every VM with a console, its own 8 MiB
//! disk and its own NIC (a TAP each, all in one network namespace the bench makes; without `ip`
//! or namespaces the NICs are left out and the report says so), 64 MiB of RAM and 1 vCPU:
//! 1. **idle**: N VMs running `probe.test=idle`, spawned back to back; the time from the first
//!    spawn until every VM printed its first console line (VMs that never do within the limit are
//!    counted); then the PSS of all their processes per VM (guest RAM left out, see
//!    `bench_footprint`) and their CPU time per VM over 10 s; then all are killed;
//! 2. **work**: N VMs each running a short `blk-verify` on its disk, all at once; how many pass
//!    (the guest's verdict and exit status 0) within the limit, and how long the last took.
//!
//! Where one breaks (a VM that does not start, a verify that fails), the report says how many.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bench_footprint::{cpu_ns, pss_without_guest_ram, spawn_with, tree, Nic, VmSpec, Vmm};
use crate::netns::NetNs;
use crate::util::BoxError;

/// The VMs' NICs: one TAP per VM in one namespace, with the guest MACs.
struct Nics {
    ns: NetNs,
    taps: Vec<String>,
    macs: Vec<String>,
}

impl Nics {
    /// A namespace with `n` TAPs `bhdn0`, `bhdn1`, ... up.
    fn new(n: usize) -> Result<Self, BoxError> {
        crate::util::ensure_packages(&[("ip", "iproute2")])?;
        let ns = NetNs::new("bhdn-")?;
        let mut taps = Vec::with_capacity(n);
        let mut macs = Vec::with_capacity(n);
        for i in 0..n {
            let tap = format!("bhdn{i}");
            ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])?;
            ns.ip(&["link", "set", &tap, "up"])?;
            taps.push(tap);
            macs.push(format!("02:bd:00:00:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff));
        }
        Ok(Self { ns, taps, macs })
    }

    fn nic(&self, i: usize) -> Option<Nic<'_>> {
        Some(Nic { ns: &self.ns, tap: self.taps.get(i)?, mac: self.macs.get(i)? })
    }
}

/// How long N VMs get to print their first line, or to finish their verify.
const LIMIT: Duration = Duration::from_secs(300);
/// How long the idle CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// One phase's outcome.
#[derive(Debug, Default)]
struct Idle {
    started: usize,
    all_first_line: Option<Duration>,
    pss_kib_per_vm: u64,
    idle_cpu_ms_per_vm: f64,
}

#[derive(Debug, Default)]
struct Work {
    passed: usize,
    last: Duration,
}

/// Console lines of a fleet: `(vm, when, line)`.
type Lines = mpsc::Receiver<(usize, Instant, String)>;

/// Kills and reaps every child on drop.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// The VMs of one phase: which VMM, its executable, the guest, one disk (and NIC) per VM.
#[derive(Clone, Copy)]
struct FleetSpec<'a> {
    vmm: Vmm,
    exe: &'a Path,
    probe: &'a Path,
    disks: &'a [PathBuf],
    nics: Option<&'a Nics>,
    dir: &'a Path,
}

/// Starts one VM per disk of `f`, running `cmdline`; forwards `(vm, when, line)` of their
/// console output to the returned receiver.
fn start(f: FleetSpec<'_>, cmdline: &str) -> Result<(Fleet, Lines), BoxError> {
    let FleetSpec { vmm, exe, probe, disks, nics, dir } = f;
    let (tx, rx) = mpsc::channel();
    let mut fleet = Fleet(Vec::with_capacity(disks.len()));
    for (i, disk) in disks.iter().enumerate() {
        let nic = nics.and_then(|n| n.nic(i));
        let mut child =
            spawn_with(VmSpec { vmm, exe, probe, disk: Some(disk), nic, dir }, cmdline, &format!("density-{i}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((i, Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        fleet.0.push(child);
    }
    Ok((fleet, rx))
}

fn idle(f: FleetSpec<'_>) -> Result<Idle, BoxError> {
    let n = f.disks.len();
    let t0 = Instant::now();
    let (fleet, rx) = start(f, "probe.test=idle")?;
    let mut first = vec![None; n];
    let mut halted = 0;
    let deadline = t0 + LIMIT;
    while halted < n {
        let Ok((i, at, line)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else { break };
        if first[i].is_none() {
            first[i] = Some(at.duration_since(t0));
        }
        if line.contains("idle: halting") {
            halted += 1;
        }
    }
    let started = first.iter().filter(|f| f.is_some()).count();
    let all_first_line = (started == n).then(|| first.iter().flatten().copied().max().unwrap_or_default());
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = fleet.0.iter().flat_map(|c| tree(c.id())).collect();
    let pss: u64 = pids.iter().filter_map(|&p| pss_without_guest_ram(p)).sum();
    let before = cpu_ns(&pids);
    std::thread::sleep(IDLE_WINDOW);
    let cpu = cpu_ns(&pids).saturating_sub(before);
    drop(fleet);
    let per = |x: u64| x / u64::try_from(n.max(1)).unwrap_or(1);
    Ok(Idle { started, all_first_line, pss_kib_per_vm: per(pss), idle_cpu_ms_per_vm: per(cpu) as f64 / 1e6 })
}

fn work(f: FleetSpec<'_>) -> Result<Work, BoxError> {
    let t0 = Instant::now();
    let cmdline = "probe.test=blk-verify probe.seed=3 probe.rounds=1 probe.timeout_ms=60000";
    let (mut fleet, rx) = start(f, cmdline)?;
    let mut passed = 0;
    let mut last = Duration::ZERO;
    let deadline = t0 + LIMIT;
    let mut verdicts = 0;
    while verdicts < f.disks.len() {
        let Ok((_, at, line)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else { break };
        if line.contains("probe: verdict") {
            verdicts += 1;
            last = at.duration_since(t0);
            passed += usize::from(line.contains("verdict pass"));
        }
    }
    // A VM passes only if its VMM also ends well (Firecracker: status 0 after the i8042 reset).
    let mut exited_ok = 0;
    for c in &mut fleet.0 {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                exited_ok += usize::from(st.success());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Work { passed: passed.min(exited_ok), last })
}

/// Runs the benchmark for each count in `counts` and prints the report.
pub fn bench(bin: &Path, probe: &Path, counts: &[usize]) -> Result<(), BoxError> {
    let dir = crate::util::workspace_root().join("target/bench-density");
    std::fs::create_dir_all(&dir)?;
    let mut vmms: Vec<(Vmm, PathBuf)> = vec![(Vmm::Bulkhead, bin.join("bulkhead"))];
    match crate::bench_api::firecracker() {
        Some(p) => vmms.push((Vmm::Firecracker, p)),
        None => println!("# Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): Bulkhead only"),
    }
    let most = counts.iter().copied().max().unwrap_or(0);
    let nics = match Nics::new(most) {
        Ok(n) => Some(n),
        Err(e) => {
            println!("# no network namespace for the VMs' NICs ({e}): console and disk only");
            None
        }
    };
    println!(
        "# density: N VMs at once (console + own 8 MiB disk{}, {} MiB, 1 vCPU each), `idle` then `blk-verify`",
        if nics.is_some() { " + own NIC on its own TAP" } else { "" },
        crate::bench_footprint::MEM_MIB
    );
    println!("| VMM | N | started | all first lines after | PSS per VM KiB | idle CPU per VM per 10 s | blk-verify passed | last verdict after |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in counts {
        let disks: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("disk{i}.img"))).collect();
        for (vmm, exe) in &vmms {
            for d in &disks {
                // Fresh, zeroed images for every phase.
                std::fs::File::create(d)?.set_len(8 << 20)?;
            }
            eprintln!("bench: density {vmm:?} N={n}: idle");
            let fleet = FleetSpec { vmm: *vmm, exe, probe, disks: &disks, nics: nics.as_ref(), dir: &dir };
            let i = idle(fleet)?;
            for d in &disks {
                std::fs::File::create(d)?.set_len(8 << 20)?;
            }
            eprintln!("bench: density {vmm:?} N={n}: blk-verify");
            let w = work(fleet)?;
            println!(
                "| {vmm:?} | {n} | {}/{n} | {} | {} | {:.1} ms | {}/{n} | {:.1} s |",
                i.started,
                i.all_first_line.map_or_else(|| "never".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
                i.pss_kib_per_vm,
                i.idle_cpu_ms_per_vm,
                w.passed,
                w.last.as_secs_f64()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
