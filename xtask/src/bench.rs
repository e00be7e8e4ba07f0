//! `cargo xtask bench`: the probe guest's `pio-loop` through `bulkhead`, with the port handled
//! inside the core (0x80, the POST-code port) and forwarded to the console service (0x3fd, the
//! UART's line-status register), interleaved, several runs each; medians and their ratio.
//!
//! Options: `--runs N` (default 7), `--exits N` per run (default 200000).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{build_binaries, probe_elf, BoxError};

struct Sample {
    cycles_per_exit: u64,
}

fn parse_args(args: &[String]) -> Result<(usize, u64), BoxError> {
    let (mut runs, mut exits) = (7usize, 200_000u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let val = || -> Result<&String, BoxError> { Err(format!("{a} needs a value").into()) };
        match a.as_str() {
            "--runs" => runs = it.next().map_or_else(val, Ok)?.parse()?,
            "--exits" => exits = it.next().map_or_else(val, Ok)?.parse()?,
            other => return Err(format!("unknown bench option {other} (--runs N, --exits N)").into()),
        }
    }
    if runs == 0 || exits == 0 {
        return Err("--runs and --exits must be positive".into());
    }
    Ok((runs, exits))
}

fn pio_loop(bin: &Path, probe: &Path, port: u16, exits: u64) -> Result<Sample, BoxError> {
    let out = Command::new(bin.join("bulkhead"))
        .args(["run", "--kernel"])
        .arg(probe)
        .args(["--serial-input", "none", "--log-level", "warn", "--cmdline"])
        .arg(format!("probe.test=pio-loop probe.n={exits} probe.port={port:#x}"))
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "bulkhead failed ({}) for port {port:#x}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let line = stdout.lines().find(|l| l.starts_with("pio-loop:")).ok_or("no pio-loop line in the guest output")?;
    let cycles_per_exit = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cycles_per_exit="))
        .ok_or("no cycles_per_exit in the pio-loop line")?
        .parse()?;
    Ok(Sample { cycles_per_exit })
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
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
    let (runs, exits) = parse_args(args)?;
    let bin = build_binaries(true)?;
    let probe = probe_elf()?;
    let rate = tsc_per_us();
    let (mut core, mut fwd) = (Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("bench: run {}/{runs}", i + 1);
        core.push(pio_loop(&bin, &probe, 0x80, exits)?.cycles_per_exit);
        fwd.push(pio_loop(&bin, &probe, 0x3fd, exits)?.cycles_per_exit);
    }
    let (c, f) = (median(&mut core), median(&mut fwd));
    let ratio = f as f64 / c as f64;
    println!(
        "# pio-loop: {exits} guest `in` instructions per run, {runs} runs each, medians (TSC {rate:.0} cycles/us)"
    );
    println!("| port handled | cycles/exit (median) | us/exit | min..max cycles |");
    println!("|---|---|---|---|");
    println!(
        "| in the core (0x80)              | {c} | {:.2} | {}..{} |",
        c as f64 / rate,
        core.first().copied().unwrap_or(0),
        core.last().copied().unwrap_or(0)
    );
    println!(
        "| forwarded to bulkhead-console (0x3fd) | {f} | {:.2} | {}..{} |",
        f as f64 / rate,
        fwd.first().copied().unwrap_or(0),
        fwd.last().copied().unwrap_or(0)
    );
    println!("exit-forwarding ratio: {ratio:.2}");
    Ok(())
}
