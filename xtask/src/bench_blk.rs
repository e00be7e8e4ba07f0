//! The block part of `cargo xtask bench`: the probe guest's `blk-bench` through Bulkhead
//! (`bulkhead-block`) against QEMU microvm with its built-in virtio-blk and with
//! `qemu-storage-daemon` serving vhost-user-blk from its own process (the closest peer to
//! Bulkhead's design), and Firecracker when its binary is there. Same probe guest, same image, same page-cache-backed file, runs interleaved;
//! medians per workload and their ratios. Also the CPU time `bulkhead-block` used per request.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::proc_cpu::{run_sampled, ThreadCpu};
use std::time::{Duration, Instant};

use crate::util::{workspace_root, BoxError};

/// One workload's result as the guest measured it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Workload {
    /// Requests completed.
    pub reqs: u64,
    /// Requests per second.
    pub iops: u64,
    /// MiB per second.
    pub mibps: u64,
}

/// The peers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    /// `bulkhead run --disk`.
    Bulkhead,
    /// QEMU microvm, built-in virtio-blk-device.
    QemuBuiltin,
    /// QEMU microvm, vhost-user-blk served by qemu-storage-daemon.
    QemuVhostUser,
    /// Firecracker (`../shared/peers/firecracker`), its virtio-blk in its VMM thread.
    Firecracker,
}

impl Peer {
    /// Human-readable name.
    pub fn label(self) -> &'static str {
        match self {
            Self::Bulkhead => "bulkhead (bulkhead-block process)",
            Self::QemuBuiltin => "QEMU 7.2 microvm, built-in virtio-blk",
            Self::QemuVhostUser => "QEMU 7.2 microvm + qemu-storage-daemon vhost-user-blk",
            Self::Firecracker => "Firecracker, virtio-blk in its VMM thread",
        }
    }
}

/// Parses `blk-bench: NAME reqs=N bytes=B cycles=C iops=I mibps=M` lines.
pub fn parse_blk_bench(out: &str) -> BTreeMap<String, Workload> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let Some(rest) = line.trim().strip_prefix("blk-bench:") else { continue };
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        if name.contains('=') {
            continue;
        }
        let mut w = Workload::default();
        for kv in words {
            match kv.split_once('=') {
                Some(("reqs", v)) => w.reqs = v.parse().unwrap_or(0),
                Some(("iops", v)) => w.iops = v.parse().unwrap_or(0),
                Some(("mibps", v)) => w.mibps = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        m.insert(name.to_string(), w);
    }
    m
}

/// A scratch image filled with non-zero data, so reads cannot be served from holes.
pub fn make_image(path: &Path, mib: u64) -> Result<(), BoxError> {
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Settings of one block benchmark run.
pub struct BlkRun<'a> {
    /// `bulkhead` and services.
    pub bin: &'a Path,
    /// The probe guest.
    pub probe: &'a Path,
    /// The image.
    pub image: &'a Path,
    /// The guest's command line (`probe.test=blk-bench ...`).
    pub cmdline: String,
}

/// Where a run's CPU time went, in ns.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkCpu {
    /// The device's CPU: the `bulkhead-block` process; the VMM's non-vCPU threads (QEMU
    /// built-in, Firecracker); `qemu-storage-daemon` (vhost-user). `None` when the split is
    /// unknown.
    pub device_ns: Option<u64>,
    /// Of the device's CPU, the idle spin waiting for the next request (Bulkhead only; the peers
    /// sleep in their event loops).
    pub spin_ns: Option<u64>,
    /// Every process of the VMM together (rusage; the vCPU thread, where the probe busy-polls
    /// its used ring, included).
    pub all_ns: u64,
    /// Bulkhead: the block service's `(forwarded, mirrored)` exits.
    pub exits: Option<(u64, u64)>,
}

/// Runs the probe's blk-bench under `peer`. Returns the workloads and where the CPU went.
pub fn run_peer(peer: Peer, r: &BlkRun<'_>) -> Result<(BTreeMap<String, Workload>, BlkCpu), BoxError> {
    let limit = Duration::from_secs(300);
    match peer {
        Peer::Bulkhead => {
            let mut cmd = Command::new(r.bin.join("bulkhead"));
            cmd.args(["run", "--serial-input", "none", "--log-level", "info", "--kernel"])
                .arg(r.probe)
                .arg("--disk")
                .arg(r.image)
                .args(["--cmdline", &r.cmdline]);
            let out = run_sampled(&mut cmd, limit, "bulkhead")?;
            if out.code != Some(0) {
                return Err(
                    format!("bulkhead blk-bench failed ({:?}):\n{}\n{}", out.code, out.stdout, out.stderr).into()
                );
            }
            let cpu = crate::util::service_cpu(&out.stderr, "block-");
            Ok((
                parse_blk_bench(&out.stdout),
                BlkCpu {
                    device_ns: cpu.map(|c| c.0),
                    spin_ns: cpu.and_then(|c| c.1),
                    all_ns: out.cpu_ns,
                    exits: crate::util::service_exits(&out.stderr, "block-"),
                },
            ))
        }
        Peer::Firecracker => {
            let fc = crate::bench_api::firecracker().ok_or("Firecracker not found")?;
            let dir = workspace_root().join("target");
            let mut cmd = crate::bench_api::firecracker_command(
                &fc,
                &dir,
                "bench-blk",
                r.probe,
                &r.cmdline,
                128,
                Some(r.image),
                None,
            )?;
            let out = run_sampled(&mut cmd, limit, "firecracker");
            let _ = std::fs::remove_file(dir.join("fc-bench-blk.json"));
            let _ = std::fs::remove_file(dir.join("fc-bench-blk.log"));
            let out = out?;
            // Firecracker drops the probe's verdict port; its i8042 reset ends it with status 0.
            if out.code != Some(0) || !out.stdout.contains("probe: verdict pass") {
                return Err(format!("firecracker blk-bench failed ({:?}):\n{}", out.code, out.stdout).into());
            }
            let device_ns = out.threads.non_vcpu_ns();
            Ok((parse_blk_bench(&out.stdout), BlkCpu { device_ns, spin_ns: None, all_ns: out.cpu_ns, exits: None }))
        }
        Peer::QemuBuiltin | Peer::QemuVhostUser => {
            let mut qemu = Command::new("qemu-system-x86_64");
            qemu.args(crate::util::QEMU_MICROVM_PROBE)
                // Names the vCPU thread `CPU 0/KVM`, so its CPU time can be told apart.
                .args(["-name", "probe,debug-threads=on", "-kernel"])
                .arg(r.probe)
                .args(["-append", &r.cmdline]);
            let mut daemon = None;
            let sock = std::env::temp_dir().join(format!("bulkhead-bench-vub-{}.sock", std::process::id()));
            if peer == Peer::QemuBuiltin {
                qemu.arg("-drive")
                    .arg(format!("id=d,file={},format=raw,if=none", r.image.display()))
                    .args(["-device", "virtio-blk-device,drive=d"]);
            } else {
                let _ = std::fs::remove_file(&sock);
                let d = Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!("driver=file,node-name=file,filename={}", r.image.display()))
                    .args(["--blockdev", "driver=raw,node-name=disk,file=file", "--export"])
                    .arg(format!(
                        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                        sock.display()
                    ))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot start qemu-storage-daemon: {e}"))?;
                daemon = Some(d);
                let start = Instant::now();
                while !sock.exists() && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                qemu.args([
                    "-object",
                    "memory-backend-memfd,id=mem,size=128M,share=on",
                    "-machine",
                    "memory-backend=mem",
                ])
                .arg("-chardev")
                .arg(format!("socket,id=vub,path={}", sock.display()))
                .args(["-device", "vhost-user-blk,chardev=vub,num-queues=1"]);
            }
            let out = run_sampled(&mut qemu, limit, "qemu");
            // The daemon's CPU, read before it is killed (it serves nothing more by now).
            let daemon_ns = daemon.as_ref().map(|d| {
                let mut t = ThreadCpu::default();
                t.sample(d.id());
                t.total_ns()
            });
            if let Some(mut d) = daemon {
                let _ = d.kill();
                let _ = d.wait();
                let _ = std::fs::remove_file(&sock);
            }
            let out = out?;
            // isa-debug-exit: status (v << 1) | 1; the probe's pass verdict is 0.
            if out.code != Some(1) {
                return Err(format!("qemu blk-bench failed ({:?}):\n{}\n{}", out.code, out.stdout, out.stderr).into());
            }
            let cpu = match daemon_ns {
                Some(d) => BlkCpu { device_ns: Some(d), spin_ns: None, all_ns: out.cpu_ns + d, exits: None },
                None => BlkCpu { device_ns: out.threads.non_vcpu_ns(), spin_ns: None, all_ns: out.cpu_ns, exits: None },
            };
            Ok((parse_blk_bench(&out.stdout), cpu))
        }
    }
}

/// Median of `v` (sorted in place); 0 when empty.
pub fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Where the benchmark image lives (inside target/, removed afterwards).
pub fn image_path() -> PathBuf {
    workspace_root().join("target").join("bench-disk.img")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blk_bench_lines() {
        let m = parse_blk_bench(
            "probe: start x\nblk-bench: randread-4k reqs=1000 bytes=4096000 cycles=5 iops=12345 mibps=48\n\
             blk-bench: seqwrite-128k reqs=10 bytes=1 cycles=2 iops=3 mibps=400\njunk\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m["randread-4k"].iops, 12345);
        assert_eq!(m["seqwrite-128k"].mibps, 400);
    }
}
