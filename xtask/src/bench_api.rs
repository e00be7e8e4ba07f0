//! `cargo xtask bench --only api`: the control plane against Firecracker's, same host, same
//! probe guest, interleaved runs.
//!
//! Per run and VMM: a fresh VMM in API mode (`bulkhead --api-sock`, `firecracker --api-sock`);
//! 200 `GET /` and 200 `PATCH /machine-config` (before the start, each on its own connection, as
//! `curl` makes them), timed at the client; then `PUT /machine-config`, `PUT /boot-source` (the
//! probe's `hello`) and `PUT /actions InstanceStart`, timed from sending `InstanceStart` to the
//! guest's first console line. Firecracker is `../shared/peers/firecracker` (or
//! `$BULKHEAD_FIRECRACKER`); without it the Bulkhead column stands alone and says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_core::api_client::request;

use crate::util::BoxError;

/// Requests of each kind per run.
const REQUESTS: usize = 200;
/// One request's time limit.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Which VMM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Bulkhead,
    Firecracker,
}

/// One run's figures (µs).
#[derive(Default)]
struct Run {
    get: Vec<f64>,
    patch: Vec<f64>,
    start_ms: f64,
}

/// Where Firecracker is, if it is.
pub fn firecracker() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BULKHEAD_FIRECRACKER").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let p = crate::util::workspace_root().join("../shared/peers/firecracker");
    p.is_file().then_some(p)
}

/// A Firecracker run without its API, as the benchmarks boot the probe: writes `fc-TAG.json` (boot
/// source, 1 vCPU and `mem_mib` MiB, the drive `disk` if any, the NIC `nic` = (host TAP name,
/// guest MAC) as `eth0` if any) and an empty log `fc-TAG.log` in `dir` (its own log stays out of
/// the guest console on stdout), and returns the command with stdin closed; the caller chooses
/// stdout and stderr.
// One parameter per field of the config file the benches vary; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn firecracker_command(
    fc: &Path,
    dir: &Path,
    tag: &str,
    probe: &Path,
    cmdline: &str,
    mem_mib: u64,
    disk: Option<&Path>,
    nic: Option<(&str, &str)>,
) -> Result<Command, BoxError> {
    let cfg = dir.join(format!("fc-{tag}.json"));
    let log = dir.join(format!("fc-{tag}.log"));
    std::fs::File::create(&log)?;
    let drives: Vec<serde_json::Value> = disk
        .map(|d| serde_json::json!({"drive_id": "disk0", "path_on_host": d, "is_root_device": false, "is_read_only": false}))
        .into_iter()
        .collect();
    let nics: Vec<serde_json::Value> = nic
        .map(|(tap, mac)| serde_json::json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}))
        .into_iter()
        .collect();
    let json = serde_json::json!({
        "boot-source": { "kernel_image_path": probe, "boot_args": cmdline },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": mem_mib },
        "drives": drives,
        "network-interfaces": nics,
    });
    std::fs::write(&cfg, json.to_string())?;
    let mut c = Command::new(fc);
    c.args(["--no-api", "--config-file"]).arg(&cfg).args(["--level", "Warning", "--log-path"]).arg(&log);
    c.stdin(Stdio::null());
    Ok(c)
}

fn spawn(vmm: Vmm, exe: &Path, sock: &Path, dir: &Path) -> Result<Child, BoxError> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(exe);
    match vmm {
        Vmm::Bulkhead => {
            cmd.arg("--api-sock").arg(sock).args(["--id", "bench", "--log-level", "warn"]);
        }
        Vmm::Firecracker => {
            let log = dir.join("fc.log");
            std::fs::File::create(&log)?;
            cmd.arg("--api-sock").arg(sock).args(["--id", "bench", "--level", "Warning", "--log-path"]).arg(&log);
        }
    }
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let start = Instant::now();
    while request(sock, "GET", "/", None, TIMEOUT).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{vmm:?}: the API did not come up").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

fn time(sock: &Path, method: &str, path: &str, body: Option<&str>, want: u16) -> Result<f64, BoxError> {
    let t = Instant::now();
    let a = request(sock, method, path, body, TIMEOUT)?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    if a.status != want {
        return Err(format!("{method} {path}: {} {}", a.status, a.body).into());
    }
    Ok(us)
}

fn one_run(vmm: Vmm, exe: &Path, probe: &Path, dir: &Path) -> Result<Run, BoxError> {
    let sock = dir.join(format!("{vmm:?}.sock").to_lowercase());
    let mut child = spawn(vmm, exe, &sock, dir)?;
    let mut run = Run::default();
    let result = (|| -> Result<(), BoxError> {
        for i in 0..REQUESTS {
            run.get.push(time(&sock, "GET", "/", None, 200)?);
            let mem = 128 + 2 * (i % 2);
            let body = format!(r#"{{"mem_size_mib": {mem}}}"#);
            run.patch.push(time(&sock, "PATCH", "/machine-config", Some(&body), 204)?);
        }
        time(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#), 204)?;
        let boot = serde_json::json!({ "kernel_image_path": probe, "boot_args": "probe.test=hello" }).to_string();
        time(&sock, "PUT", "/boot-source", Some(&boot), 204)?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(Instant::now());
        });
        let t = Instant::now();
        time(&sock, "PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#), 204)?;
        let first = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("{vmm:?}: no console line"))?;
        run.start_ms = first.duration_since(t).as_secs_f64() * 1e3;
        Ok(())
    })();
    crate::bench_footprint::kill_vm(&mut child);
    let _ = std::fs::remove_file(&sock);
    result.map(|()| run)
}

/// The `p`-quantile (0..=1, nearest rank) of `v`.
pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let last = v.len().saturating_sub(1);
    // p in 0..=1: the index is within 0..=last, which fits usize.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((last as f64) * p.clamp(0.0, 1.0)).round() as usize;
    v.get(i.min(last)).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark (`runs` interleaved runs per VMM) and prints the report.
pub fn bench(bin: &Path, probe: &Path, runs: usize) -> Result<(), BoxError> {
    let dir = crate::util::workspace_root().join("target/bench-api");
    std::fs::create_dir_all(&dir)?;
    let fc = firecracker();
    let mut vmms = vec![(Vmm::Bulkhead, bin.join("bulkhead"))];
    match &fc {
        Some(p) => vmms.push((Vmm::Firecracker, p.clone())),
        None => println!("# Firecracker not found (../shared/peers/firecracker, $BULKHEAD_FIRECRACKER): Bulkhead only"),
    }
    let mut all: Vec<(Vmm, Vec<Run>)> = vmms.iter().map(|(v, _)| (*v, Vec::new())).collect();
    for r in 0..runs {
        for (i, (vmm, exe)) in vmms.iter().enumerate() {
            let run = one_run(*vmm, exe, probe, &dir)?;
            eprintln!(
                "api run {}/{runs} {vmm:?}: GET / median {:.0} µs, PATCH median {:.0} µs, start {:.1} ms",
                r + 1,
                pct(&mut run.get.clone(), 0.5),
                pct(&mut run.patch.clone(), 0.5),
                run.start_ms
            );
            all[i].1.push(run);
        }
    }
    println!("# API ({REQUESTS} GET / and {REQUESTS} PATCH /machine-config per run, a connection each; {runs} interleaved runs)");
    println!("| VMM | GET / median µs | GET / p99 µs | PATCH median µs | PATCH p99 µs | InstanceStart → first console line, median ms | worst ms |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (vmm, runs) in &all {
        let mut get: Vec<f64> = runs.iter().flat_map(|r| r.get.iter().copied()).collect();
        let mut patch: Vec<f64> = runs.iter().flat_map(|r| r.patch.iter().copied()).collect();
        let mut start: Vec<f64> = runs.iter().map(|r| r.start_ms).collect();
        let row = (
            pct(&mut get, 0.5),
            pct(&mut get, 0.99),
            pct(&mut patch, 0.5),
            pct(&mut patch, 0.99),
            pct(&mut start, 0.5),
            pct(&mut start, 1.0),
        );
        println!(
            "| {vmm:?} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
            row.0, row.1, row.2, row.3, row.4, row.5
        );
        rows.push(row);
    }
    if let [b, f] = rows.as_slice() {
        println!(
            "api ratios Bulkhead/Firecracker: GET median {:.2}, PATCH median {:.2}, start median {:.2}",
            b.0 / f.0,
            b.2 / f.2,
            b.4 / f.4
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
