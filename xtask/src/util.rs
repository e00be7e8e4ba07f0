//! Helpers shared by the xtask commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Boxed error used by every xtask command.
pub type BoxError = Box<dyn std::error::Error>;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command with inherited stdio, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<(), BoxError> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.status().map_err(|e| format!("cannot run {}: {e}", describe(cmd)))?;
    if !status.success() {
        return Err(format!("{} failed with {status}", describe(cmd)).into());
    }
    Ok(())
}

/// Runs this xtask binary with `args` (another xtask command), stderr inherited, and returns its
/// stdout lines.
pub fn xtask_lines(args: &[&str]) -> Result<Vec<String>, BoxError> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .args(args)
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run xtask {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("xtask {} failed with {}", args.join(" "), out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// Builds the probe guest and returns the ELF's path (the last line `cargo xtask probe` prints).
pub fn probe_elf() -> Result<PathBuf, BoxError> {
    let lines = xtask_lines(&["probe"])?;
    let last = lines.last().ok_or("xtask probe printed no path")?;
    Ok(PathBuf::from(last.trim()))
}

/// The Linux guest's artefacts.
pub struct GuestImages {
    /// The ELF vmlinux.
    pub vmlinux: PathBuf,
    /// The uncompressed initramfs.
    pub initramfs: PathBuf,
    /// The ext4 root file system image.
    pub rootfs: PathBuf,
}

/// Builds (or finds cached) the Linux guest and returns its paths (`key=path` lines).
pub fn guest_images() -> Result<GuestImages, BoxError> {
    let lines = xtask_lines(&["guest"])?;
    let get = |key: &str| -> Result<PathBuf, BoxError> {
        lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(PathBuf::from)
            .ok_or_else(|| format!("xtask guest printed no {key}= line").into())
    };
    Ok(GuestImages { vmlinux: get("vmlinux")?, initramfs: get("initramfs")?, rootfs: get("rootfs")? })
}

/// The host's target triple. The workspace's binaries are built for it explicitly: with
/// `--target`, target rustflags apply to the binaries only, not to build scripts and proc-macros,
/// which must stay dynamic. See [`static_build`].
pub const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Makes a `cargo build` or `cargo test` link the workspace's binaries statically (glibc's
/// static PIE: still position independent, so still randomised). Every process of a VM then maps
/// one file instead of the binary plus `ld.so`, libc and libgcc, and the per-process copies of
/// their relocated data go: about 45 KiB of private memory per process (docs/benchmarks.md,
/// footprint). The binaries use nothing that needs glibc's dynamic loading (no NSS, no `dlopen`).
pub fn static_build(cmd: &mut Command) -> &mut Command {
    cmd.args(["--target", HOST_TARGET])
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C target-feature=+crt-static")
}

/// Where [`build_binaries`] puts the binaries of `profile`.
pub fn binaries_dir(release: bool) -> PathBuf {
    workspace_root().join("target").join(HOST_TARGET).join(if release { "release" } else { "debug" })
}

/// Builds the workspace binaries (`bulkhead` and the services) in `profile`, statically linked
/// ([`static_build`]), and returns their directory.
pub fn build_binaries(release: bool) -> Result<PathBuf, BoxError> {
    let mut cmd = Command::new(env!("CARGO"));
    // Not xtask itself: feature unification across the workspace can rebuild it, replacing the
    // running executable that `xtask_lines` starts again.
    cmd.current_dir(workspace_root()).args(["build", "--workspace", "--exclude", "xtask", "--bins"]);
    static_build(&mut cmd);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(binaries_dir(release))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Installs the Debian packages providing `(command, package)` pairs whose command is missing.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<(), BoxError> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends"]).args(&missing))
}

/// The QEMU command-line arguments every comparison boots the probe with: a microvm with KVM,
/// no firmware extras, 128 MiB, the serial console on stdio, the debug-exit port at 0xf4 and
/// modern (non-legacy) virtio-mmio. Callers add their device and `-kernel`.
pub const QEMU_MICROVM_PROBE: &[&str] = &[
    "-M",
    "microvm,x-option-roms=off,rtc=off,acpi=off",
    "-accel",
    "kvm",
    "-cpu",
    "host,arch-capabilities=off",
    "-m",
    "128",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-device",
    "isa-debug-exit,iobase=0xf4,iosize=4",
    "-global",
    "virtio-mmio.force-legacy=false",
];

/// `(forwarded, mirrored)` exits of the service whose name starts with `prefix`, from the core's
/// closing line `service NAME (pid N): F exits forwarded, M reads mirrored, ...` (log level info).
pub fn service_exits(stderr: &str, prefix: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.contains(&format!("service {prefix}")) && l.contains(" reads mirrored"))?;
    let num = |what: &str| -> Option<u64> {
        let i = line.find(what)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    Some((num(" exits forwarded")?, num(" reads mirrored")?))
}

/// `(cpu, idle spin)` in ns of the service whose name starts with `prefix`, from the same closing
/// line (`..., cpu 12.3 ms, idle spin 4.5 ms`); the spin is `None` when the line has none or says
/// `n/a` (the service did not answer its last ping).
pub fn service_cpu(stderr: &str, prefix: &str) -> Option<(u64, Option<u64>)> {
    let line = stderr.lines().find(|l| l.contains(&format!("service {prefix}")) && l.contains(" cpu "))?;
    let ms_after = |key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        let v = rest.split(" ms").next()?.trim();
        v.parse::<f64>().ok().map(ms_to_ns)
    };
    Some((ms_after(" cpu ")?, ms_after(" idle spin ")))
}

/// Milliseconds (as logged, one decimal) to nanoseconds; float-to-int casts saturate in Rust.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

#[cfg(test)]
mod exit_count_tests {
    use super::{service_cpu, service_exits};

    #[test]
    fn parses_cpu_and_spin() {
        let log = "x INFO  service console (pid 6): 5 exits forwarded, 0 reads mirrored, 0 rejected, 0 failures, cpu 1.0 ms, idle spin 0.2 ms\n\
                   x INFO  service block-disk0 (pid 7): 1234 exits forwarded, 99 reads mirrored, 0 rejected, 0 failures, cpu 3.5 ms, idle spin 1.2 ms\n\
                   x INFO  service net-net0 (pid 8): 1 exits forwarded, 0 reads mirrored, 0 rejected, 0 failures, cpu 2.0 ms, idle spin n/a\n";
        assert_eq!(service_cpu(log, "block-"), Some((3_500_000, Some(1_200_000))));
        assert_eq!(service_cpu(log, "net-"), Some((2_000_000, None)));
        assert_eq!(service_cpu("service block-d (pid 1): cpu n/a, idle spin n/a\n", "block-"), None);
    }

    #[test]
    fn parses_the_closing_line() {
        let log = "x INFO  service block-disk0 (pid 7): 1234 exits forwarded, 99 reads mirrored, 0 rejected, 0 failures, cpu 3.0 ms\n";
        assert_eq!(service_exits(log, "block-"), Some((1234, 99)));
        assert_eq!(service_exits(log, "net-"), None);
    }
}
