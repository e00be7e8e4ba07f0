//! `cargo xtask run` and `cargo xtask test`.

use std::process::Command;

use crate::util::{build_binaries, guest_images, probe_elf, run, workspace_root, BoxError};

/// The command line the default Linux guest boots with (the core adds the PVM parameters itself
/// when the host needs them).
pub const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw";

/// `cargo xtask run [bulkhead run options]`: builds the release binaries and the Linux guest if
/// missing, then boots it with its console on this terminal and its root file system on
/// `target/guest-run/rootfs.ext4` (a copy of the built image, made once and kept between runs, as
/// a VM's disk would be), served by `bulkhead-block`.
pub fn run_guest(extra: &[String]) -> Result<(), BoxError> {
    let bin = build_binaries(true)?;
    let images = guest_images()?;
    let disk_dir = workspace_root().join("target").join("guest-run");
    std::fs::create_dir_all(&disk_dir)?;
    let disk = disk_dir.join("rootfs.ext4");
    if !disk.exists() {
        std::fs::copy(&images.rootfs, &disk).map_err(|e| format!("cannot copy the root image: {e}"))?;
    }
    eprintln!("xtask run: booting {} with root on {}", images.vmlinux.display(), disk.display());
    let mut cmd = Command::new(bin.join("bulkhead"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--disk")
        .arg(format!("{},id=root", disk.display()))
        .args(["--mem", "256", "--cmdline", LINUX_CMDLINE])
        .args(extra);
    let status = cmd.status().map_err(|e| format!("cannot start bulkhead: {e}"))?;
    eprintln!("xtask run: bulkhead exited with {status}");
    Ok(())
}

/// `cargo xtask test`: builds the binaries, the probe guest and the Linux guest, then runs the
/// whole test suite with their paths in the environment.
pub fn test(extra: &[String]) -> Result<(), BoxError> {
    // The net tests make their own network namespaces (`ip netns`); the sandbox test runs the core
    // in a user namespace (`unshare`). Both are on a stock Debian, but a slim image may lack them.
    crate::util::ensure_packages(&[("ip", "iproute2"), ("unshare", "util-linux")])?;
    build_binaries(false)?;
    let probe = probe_elf()?;
    let images = guest_images()?;
    // The probe guest is its own (freestanding) workspace: its logic is unit-tested on the host
    // against a fake machine.
    run(Command::new(env!("CARGO"))
        .current_dir(workspace_root().join("guests").join("probe"))
        .args(["test", "--lib"]))?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace"])
        .args(extra)
        .env("BULKHEAD_PROBE", &probe)
        .env("BULKHEAD_VMLINUX", &images.vmlinux)
        .env("BULKHEAD_INITRAMFS", &images.initramfs)
        .env("BULKHEAD_ROOTFS", &images.rootfs);
    run(&mut cmd)
}
