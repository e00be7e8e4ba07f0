//! `cargo xtask bench --only pio`: the cost of one guest `in`, by who answers it.
//!
//! The probe's `pio-loop` (back-to-back `in al, dx`, TSC-timed inside the guest) runs on
//! - port 0x80 under Bulkhead: answered inside the core (the POST-code port), the floor;
//! - port 0x3fd under Bulkhead: the UART's line-status register, which `bulkhead-console`
//!   publishes in its read mirror, so the core answers it without a round trip;
//! - port 0x3fa under Bulkhead: the UART's interrupt-identification register, which has a read
//!   side effect, so it always makes the full round trip to the console service (the cost of a
//!   forwarded exit); and the same with `--no-jail --no-cgroup`, so what the core's jail and the
//!   VM's cgroup cost an exit is measured in the same run;
//! - port 0x3fd under Firecracker (`../shared/peers/firecracker` or `$BULKHEAD_FIRECRACKER`), whose
//!   UART lives in its own process: the peer's in-process exit.
//!
//! Each case runs on an idle machine and under contention: one CPU hog per core (a busy shell
//! loop at nice 0, started by the bench and killed after the run), as on a hosting machine whose
//! CPUs are all busy. Runs are interleaved (every case once per round); the report gives the
//! median and the worst run of each.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::BoxError;

/// One measured configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    /// Bulkhead, port 0x80 (in the core).
    Core,
    /// Bulkhead, port 0x3fd (the console service's read mirror).
    MirroredLsr,
    /// Bulkhead, port 0x3fa (forwarded, read side effect).
    RoundTripIir,
    /// The same with `--no-jail --no-cgroup`: what the core's jail and the VM's cgroup cost a
    /// forwarded exit, same run.
    RoundTripIirBare,
    /// Firecracker, port 0x3fd (in its process).
    Firecracker,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Self::Core => "Bulkhead, in the core (0x80)",
            Self::MirroredLsr => "Bulkhead, UART LSR from the console's read mirror (0x3fd)",
            Self::RoundTripIir => "Bulkhead, UART IIR round trip to bulkhead-console (0x3fa)",
            Self::RoundTripIirBare => "same, --no-jail --no-cgroup",
            Self::Firecracker => "Firecracker, UART LSR in-process (0x3fd)",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Core => 0x80,
            Self::MirroredLsr | Self::Firecracker => 0x3fd,
            Self::RoundTripIir | Self::RoundTripIirBare => 0x3fa,
        }
    }
}

/// What a benchmark run needs.
pub struct PioRun<'a> {
    /// Directory of the release `bulkhead` binaries.
    pub bin: &'a Path,
    /// The probe ELF.
    pub probe: &'a Path,
    /// Runs per case and condition.
    pub runs: usize,
    /// Exits per run on an idle machine.
    pub exits: u64,
    /// Exits per run under contention (each costs more, and the worst runs far more).
    pub contended_exits: u64,
    /// TSC cycles per microsecond.
    pub rate: f64,
}

/// CPU hogs, one per online CPU, killed on drop.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start() -> Result<Self, BoxError> {
        let n = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(Command::new("sh").args(["-c", "while :; do :; done"]).stdin(Stdio::null()).spawn()?);
        }
        // Let the scheduler spread them before measuring.
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(Self(v))
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn parse_cycles(stdout: &str) -> Result<u64, BoxError> {
    let line = stdout.lines().find(|l| l.starts_with("pio-loop:")).ok_or("no pio-loop line in the guest output")?;
    Ok(line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cycles_per_exit="))
        .ok_or("no cycles_per_exit in the pio-loop line")?
        .parse()?)
}

fn cmdline(port: u16, exits: u64) -> String {
    format!("probe.test=pio-loop probe.n={exits} probe.port={port:#x}")
}

fn bulkhead(r: &PioRun<'_>, port: u16, exits: u64, bare: bool) -> Result<u64, BoxError> {
    let mut cmd = Command::new(r.bin.join("bulkhead"));
    cmd.args(["run", "--kernel"])
        .arg(r.probe)
        .args(["--serial-input", "none", "--log-level", "warn", "--cmdline"])
        .arg(cmdline(port, exits));
    if bare {
        cmd.args(["--no-jail", "--no-cgroup"]);
    }
    let out = cmd.stdin(Stdio::null()).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "bulkhead failed ({}) for port {port:#x}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    parse_cycles(&stdout)
}

fn firecracker(fc: &Path, r: &PioRun<'_>, dir: &Path, port: u16, exits: u64) -> Result<u64, BoxError> {
    let out = crate::bench_api::firecracker_command(fc, dir, "pio", r.probe, &cmdline(port, exits), 64, None, None)?
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_cycles(&stdout).map_err(|e| format!("firecracker ({}): {e}:\n{stdout}", out.status).into())
}

/// Median (upper) of `v`, left in run order for the report.
fn median(v: &[u64]) -> u64 {
    crate::bench_blk::median(&mut v.to_vec())
}

/// Runs the benchmark and prints its report.
pub fn bench(r: &PioRun<'_>) -> Result<(), BoxError> {
    let dir = crate::util::workspace_root().join("target/bench-pio");
    std::fs::create_dir_all(&dir)?;
    let fc: Option<PathBuf> = crate::bench_api::firecracker();
    let mut cases = vec![Case::Core, Case::MirroredLsr, Case::RoundTripIir, Case::RoundTripIirBare];
    match &fc {
        Some(_) => cases.push(Case::Firecracker),
        None => println!(
            "# Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): its rows are left out"
        ),
    }
    for contended in [false, true] {
        let exits = if contended { r.contended_exits } else { r.exits };
        let mut samples: Vec<Vec<u64>> = vec![Vec::new(); cases.len()];
        let hogs = if contended { Some(Hogs::start()?) } else { None };
        for i in 0..r.runs {
            for (k, case) in cases.iter().enumerate() {
                eprintln!(
                    "bench: pio {} run {}/{}: {}",
                    if contended { "contended" } else { "idle" },
                    i + 1,
                    r.runs,
                    case.label()
                );
                let c = match (case, &fc) {
                    (Case::Firecracker, Some(fc)) => firecracker(fc, r, &dir, case.port(), exits)?,
                    _ => bulkhead(r, case.port(), exits, *case == Case::RoundTripIirBare)?,
                };
                samples[k].push(c);
            }
        }
        drop(hogs);
        let condition = if contended { "one CPU hog per core (nice 0)" } else { "idle machine" };
        println!(
            "# pio-loop, {condition}: {exits} guest `in` per run, {} interleaved runs per row (TSC {:.0} cycles/us)",
            r.runs, r.rate
        );
        println!("| who answers | cycles/exit median | us/exit | worst run | all runs |");
        println!("|---|---|---|---|---|");
        for (k, case) in cases.iter().enumerate() {
            let m = median(&samples[k]);
            let worst = samples[k].iter().copied().max().unwrap_or(0);
            let all: Vec<String> = samples[k].iter().map(u64::to_string).collect();
            println!("| {} | {m} | {:.2} | {worst} | {} |", case.label(), m as f64 / r.rate, all.join(" "));
        }
        let tag = if contended { "contended" } else { "idle" };
        let med = |c: Case| cases.iter().position(|x| *x == c).map(|k| median(&samples[k]));
        let worst = |c: Case| cases.iter().position(|x| *x == c).and_then(|k| samples[k].iter().copied().max());
        if let (Some(f), Some(c)) = (med(Case::RoundTripIir), med(Case::Core)) {
            println!("pio {tag}: forwarded round trip (IIR) / in-core exit: {:.2}", f as f64 / c as f64);
        }
        if let (Some(j), Some(b)) = (med(Case::RoundTripIir), med(Case::RoundTripIirBare)) {
            println!(
                "pio {tag}: forwarded exit with the jail and cgroup / without (--no-jail --no-cgroup): {:.3} ({:+.1}%)",
                j as f64 / b as f64,
                (j as f64 / b as f64 - 1.0) * 100.0
            );
        }
        if let (Some(b), Some(f)) = (med(Case::MirroredLsr), med(Case::Firecracker)) {
            let wb = worst(Case::MirroredLsr).unwrap_or(0);
            println!(
                "pio {tag}: UART LSR Bulkhead / Firecracker: median {:.2}, worst run {:.2} of Firecracker's median",
                b as f64 / f as f64,
                wb as f64 / f as f64
            );
        }
        if let (Some(b), Some(f)) = (med(Case::RoundTripIir), med(Case::Firecracker)) {
            println!("pio {tag}: UART IIR round trip Bulkhead / Firecracker LSR: median {:.2}", b as f64 / f as f64);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
