//! `cargo xtask run` and `cargo xtask test`.

use std::process::Command;

use crate::util::{build_binaries, guest_images, probe_elf, run, workspace_root, BoxError};

/// The command line the default Linux guest boots with (the core adds the PVM parameters itself
/// when the host needs them).
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux";

/// `cargo xtask run [bulkhead run options]`: builds the release binaries and the Linux guest if
/// missing, then boots it with its console on this terminal.
pub fn run_guest(extra: &[String]) -> Result<(), BoxError> {
    let bin = build_binaries(true)?;
    let images = guest_images()?;
    let mut cmd = Command::new(bin.join("bulkhead"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initrd")
        .arg(&images.initramfs)
        .args(["--cmdline", LINUX_CMDLINE])
        .args(extra);
    let status = cmd.status().map_err(|e| format!("cannot start bulkhead: {e}"))?;
    eprintln!("xtask run: bulkhead exited with {status}");
    Ok(())
}

/// `cargo xtask test`: builds the binaries, the probe guest and the Linux guest, then runs the
/// whole test suite with their paths in the environment.
pub fn test(extra: &[String]) -> Result<(), BoxError> {
    build_binaries(false)?;
    let probe = probe_elf()?;
    let images = guest_images()?;
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
