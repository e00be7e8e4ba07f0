//! `cargo xtask bench`: the block benchmark (see `bench_blk`) and the restart latency of a killed
//! block service.
//!
//! Then the network benchmark (see `bench_net`): the probe's `net-bench` through Bulkhead, QEMU
//! and Firecracker (when its binary is there) on a TAP in a private network namespace.
//!
//! Then the control plane against Firecracker's (see `bench_api`), what one running VM costs
//! (start time, PSS, idle CPU; see `bench_footprint`, `--api-runs` runs), many VMs at once
//! (`bench_density`, `--density 50,100`), and last the cost of one exit
//! by who answers it, idle and with a CPU hog per core (see `bench_pio`).
//!
//! Options: `--runs N` (default 7), `--exits N` per pio run (default 200000; a quarter
//! of that under contention), `--blk-runs N` (default
//! 5), `--net-runs N` (default 5), `--api-runs N` (default 7), `--only pio|blk|restart|net|api|footprint|density`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{build_binaries, probe_elf, BoxError};

// main.rs is not ours to edit: the net benchmark is a child module kept in its own file.

struct Options {
    runs: usize,
    exits: u64,
    blk_runs: usize,
    net_runs: usize,
    api_runs: usize,
    density: Vec<usize>,
    only: Option<String>,
}

fn parse_args(args: &[String]) -> Result<Options, BoxError> {
    let (mut runs, mut exits, mut blk_runs, mut net_runs, mut only) = (7usize, 200_000u64, 5usize, 5usize, None);
    let mut api_runs = 7usize;
    let mut density = vec![50usize, 100];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let val = || -> Result<&String, BoxError> { Err(format!("{a} needs a value").into()) };
        match a.as_str() {
            "--runs" => runs = it.next().map_or_else(val, Ok)?.parse()?,
            "--exits" => exits = it.next().map_or_else(val, Ok)?.parse()?,
            "--blk-runs" => blk_runs = it.next().map_or_else(val, Ok)?.parse()?,
            "--net-runs" => net_runs = it.next().map_or_else(val, Ok)?.parse()?,
            "--api-runs" => api_runs = it.next().map_or_else(val, Ok)?.parse()?,
            "--density" => {
                density = it.next().map_or_else(val, Ok)?.split(',').map(str::parse).collect::<Result<_, _>>()?;
                if density.is_empty() || density.contains(&0) {
                    return Err("--density takes VM counts, e.g. 50,100".into());
                }
            }
            "--only" => {
                let v = it.next().map_or_else(val, Ok)?;
                if !["pio", "blk", "restart", "net", "api", "footprint", "density"].contains(&v.as_str()) {
                    return Err(format!("--only takes pio, blk, restart, net, api, footprint or density, not {v}").into());
                }
                only = Some(v.clone());
            }
            other => {
                return Err(format!(
                    "unknown bench option {other} (--runs N, --exits N, --blk-runs N, --net-runs N, --api-runs N, --density N,M, --only pio|blk|restart|net|api|footprint|density)"
                )
                .into())
            }
        }
    }
    if runs == 0 || exits == 0 || blk_runs == 0 || net_runs == 0 || api_runs == 0 {
        return Err("--runs, --exits, --blk-runs, --net-runs and --api-runs must be positive".into());
    }
    Ok(Options { runs, exits, blk_runs, net_runs, api_runs, density, only })
}

/// The host TSC rate in cycles per microsecond, measured over 200 ms.
fn tsc_per_us() -> f64 {
    // SAFETY: RDTSC has no memory effects; it is available on every x86-64 CPU.
    let t0 = unsafe { std::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let t1 = unsafe { std::arch::x86_64::_rdtsc() };
    let us = start.elapsed().as_secs_f64() * 1e6;
    (t1.wrapping_sub(t0)) as f64 / us
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<(), BoxError> {
    let opts = parse_args(args)?;
    let bin = build_binaries(true)?;
    let probe = probe_elf()?;
    let rate = tsc_per_us();
    let part = |name: &str| opts.only.as_deref().is_none_or(|o| o == name);
    if part("blk") {
        blk(&bin, &probe, rate, opts.blk_runs)?;
    }
    if part("restart") {
        restart(&bin, &probe, rate)?;
    }
    if part("net") {
        // A measured rate in the millions: the float-to-int cast saturates and the fraction is noise.
        #[allow(clippy::cast_possible_truncation)]
        let tsc_khz = (rate * 1000.0).round() as u64;
        let r = crate::bench_net::NetRun { bin: &bin, probe: &probe, tx_n: 200_000, rx_n: 200_000, tsc_khz };
        crate::bench_net::bench(&r, opts.net_runs)?;
    }
    if part("api") {
        crate::bench_api::bench(&bin, &probe, opts.api_runs)?;
    }
    if part("footprint") {
        crate::bench_footprint::bench(&bin, &probe, opts.api_runs)?;
    }
    if part("density") {
        crate::bench_density::bench(&bin, &probe, &opts.density)?;
    }
    if part("pio") {
        let r = crate::bench_pio::PioRun {
            bin: &bin,
            probe: &probe,
            runs: opts.runs,
            exits: opts.exits,
            contended_exits: (opts.exits / 4).max(1),
            rate,
        };
        crate::bench_pio::bench(&r)?;
    }
    Ok(())
}

/// Restart latency: the block service is killed 135 times (SIGKILL from the core, `_exit`,
/// `abort()`, a segfault) while the probe verifies its disk; the core's supervision metrics give
/// the time from each death to the new instance serving (ring and state restored, kicks re-armed).
fn restart(bin: &Path, probe: &Path, rate: f64) -> Result<(), BoxError> {
    let image = workspace_root_target("bench-restart.img");
    std::fs::File::create(&image)?.set_len(8 << 20)?;
    let (seed, rounds) = (5u64, 600u64);
    let started = Instant::now();
    let out = Command::new(bin.join("bulkhead"))
        .args(["run", "--serial-input", "none", "--kernel"])
        .arg(probe)
        .arg("--disk")
        .arg(&image)
        .args(["--restart-max", "1000/10", "--restart-burst", "1000/1"])
        .args(["--fault", "block:kill,after=200ms,every=100ms,count=60"])
        .args(["--fault", "block:crash,after=230ms,every=240ms,count=25"])
        .args(["--fault", "block:abort,after=260ms,every=240ms,count=25"])
        .args(["--fault", "block:segv,after=290ms,every=240ms,count=25"])
        .arg("--cmdline")
        .arg(format!("probe.test=blk-verify probe.seed={seed} probe.rounds={rounds} probe.timeout_ms=20000"))
        .stdin(Stdio::null())
        .output()?;
    let wall = started.elapsed();
    let _ = std::fs::remove_file(&image);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(0) || !stdout.contains(" mismatches=0 ioerrs=0 ") {
        return Err(format!("restart bench: the guest failed ({}):\n{stdout}\n{stderr}", out.status).into());
    }
    let line = stderr
        .lines()
        .find(|l| l.contains("service block-disk0 (pid") && l.contains(" restarts ("))
        .ok_or("no supervision metrics for block-disk0")?;
    println!(
        "# restart latency: block service killed during blk-verify ({rounds} rounds of 8 MiB), release build, {:.1} s",
        wall.as_secs_f64()
    );
    println!("{}", line.split_once("service ").map_or(line, |(_, r)| r));
    let stall = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("max_wait_cycles="))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or("no max_wait_cycles in the guest's summary")?;
    println!(
        "longest guest-visible stall (longest wait for one completion in the guest): {:.2} ms",
        stall as f64 / rate / 1000.0
    );
    Ok(())
}

fn workspace_root_target(name: &str) -> std::path::PathBuf {
    crate::util::workspace_root().join("target").join(name)
}

/// The block benchmark: probe `blk-bench` under Bulkhead, QEMU built-in virtio-blk and QEMU with
/// qemu-storage-daemon's vhost-user-blk, interleaved, medians.
fn blk(bin: &Path, probe: &Path, rate: f64, runs: usize) -> Result<(), BoxError> {
    use crate::bench_blk::{make_image, median as med, run_peer, BlkRun, Peer};
    use std::collections::BTreeMap;
    crate::util::ensure_packages(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let image = crate::bench_blk::image_path();
    make_image(&image, 256)?;
    // A measured rate in the millions: the float-to-int cast saturates and the fraction is noise.
    #[allow(clippy::cast_possible_truncation)]
    let tsc_khz = (rate * 1000.0).round() as u64;
    let (qd, count) = (32, 8192);
    let r = BlkRun {
        bin,
        probe,
        image: &image,
        cmdline: format!("probe.test=blk-bench probe.qd={qd} probe.count={count} probe.tsc_khz={tsc_khz}"),
    };
    let mut peers = vec![Peer::Bulkhead, Peer::QemuVhostUser, Peer::QemuBuiltin];
    let fc = crate::bench_api::firecracker().is_some();
    if fc {
        peers.push(Peer::Firecracker);
    } else {
        println!(
            "# Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): its column is left out"
        );
    }
    // (peer, workload) -> samples of the workload's headline figure (IOPS for 4k, MiB/s else).
    let mut samples: BTreeMap<(Peer, String), Vec<u64>> = BTreeMap::new();
    // (peer, what) -> CPU ns per request of each run: "device", "spin", "work" (device less
    // spin), "all".
    let mut cpu_per_req: BTreeMap<(Peer, &str), Vec<u64>> = BTreeMap::new();
    // Exits per 1,000 requests: forwarded, answered from the read mirror.
    let (mut fwd_per_k, mut mir_per_k): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for &peer in &peers {
            eprintln!("bench: blk run {}/{runs}: {}", i + 1, peer.label());
            let (w, cpu) = run_peer(peer, &r)?;
            if w.is_empty() {
                return Err(format!("{} printed no blk-bench lines", peer.label()).into());
            }
            let reqs: u64 = w.values().map(|x| x.reqs).sum();
            let mut per = |what, ns: Option<u64>| {
                if let Some(v) = ns.and_then(|n| n.checked_div(reqs)) {
                    cpu_per_req.entry((peer, what)).or_default().push(v);
                }
            };
            per("device", cpu.device_ns);
            per("spin", cpu.spin_ns);
            per("work", cpu.device_ns.map(|d| d.saturating_sub(cpu.spin_ns.unwrap_or(0))));
            per("all", Some(cpu.all_ns));
            if let (Some((f, m)), true) = (cpu.exits, reqs > 0) {
                fwd_per_k.push(f * 1000 / reqs);
                mir_per_k.push(m * 1000 / reqs);
            }
            for (name, x) in w {
                let v = if name.contains("4k") { x.iops } else { x.mibps };
                samples.entry((peer, name)).or_default().push(v);
            }
        }
    }
    let _ = std::fs::remove_file(&image);
    let names: Vec<String> = samples.keys().filter(|(p, _)| *p == Peer::Bulkhead).map(|(_, n)| n.clone()).collect();
    println!("# blk-bench: probe guest, 256 MiB raw image (page cache), queue depth {qd}, {count} requests per workload, {runs} interleaved runs, medians");
    if fc {
        println!("| workload | unit | bulkhead | QEMU vhost-user-blk | QEMU built-in | Firecracker | bulkhead / vhost-user | bulkhead / built-in | bulkhead / Firecracker |");
        println!("|---|---|---|---|---|---|---|---|---|");
    } else {
        println!("| workload | unit | bulkhead | QEMU vhost-user-blk | QEMU built-in | bulkhead / vhost-user | bulkhead / built-in |");
        println!("|---|---|---|---|---|---|---|");
    }
    let mut randread_ratio = None;
    for name in &names {
        let mut get = |p: Peer| samples.get_mut(&(p, name.clone())).map_or(0, |v| med(v));
        let (b, v, q, f) =
            (get(Peer::Bulkhead), get(Peer::QemuVhostUser), get(Peer::QemuBuiltin), get(Peer::Firecracker));
        let unit = if name.contains("4k") { "IOPS" } else { "MiB/s" };
        let ratio = |x: u64| if x == 0 { 0.0 } else { b as f64 / x as f64 };
        if fc {
            println!(
                "| {name} | {unit} | {b} | {v} | {q} | {f} | {:.2} | {:.2} | {:.2} |",
                ratio(v),
                ratio(q),
                ratio(f)
            );
        } else {
            println!("| {name} | {unit} | {b} | {v} | {q} | {:.2} | {:.2} |", ratio(v), ratio(q));
        }
        if name.contains("randread") {
            randread_ratio = Some(ratio(v));
        }
    }
    println!();
    println!(
        "# CPU time per request (µs, all workloads, boot included; medians over runs). Device: bulkhead-block, \
         the VMM's non-vCPU threads (QEMU built-in, Firecracker), qemu-storage-daemon (vhost-user). Idle spin: \
         wall time bulkhead-block spun waiting for the next request (the peers sleep in their event loops). \
         All: every process of the VMM, the vCPU thread included (the probe busy-polls its used ring there)."
    );
    println!("| peer | device | of which idle spin | request work (device less spin) | all processes |");
    println!("|---|---|---|---|---|");
    for &peer in &peers {
        let mut cell = |what| {
            cpu_per_req
                .get_mut(&(peer, what))
                .map_or_else(|| "n/a".to_string(), |v| format!("{:.2}", med(v) as f64 / 1000.0))
        };
        let (device, spin, work, all) = (cell("device"), cell("spin"), cell("work"), cell("all"));
        println!("| {} | {device} | {spin} | {work} | {all} |", peer.label());
    }
    if !fwd_per_k.is_empty() {
        println!(
            "bulkhead-block exits per 1000 requests (all workloads, set-up included; median over runs): {} forwarded \
             round trips, {} answered from the read mirror",
            med(&mut fwd_per_k),
            med(&mut mir_per_k)
        );
    }
    if let Some(r) = randread_ratio {
        println!("blk randread-4k IOPS ratio vs vhost-user-blk: {r:.2}");
    }
    Ok(())
}
