//! The one Linux boot of a test run: a stock-configured kernel through `bulkhead`, its console on
//! `bulkhead-console` and its root file system on an ext4 image served by `bulkhead-block`.
//!
//! Under PVM it takes about two minutes and ends at "Run /sbin/init" (guest user space cannot make
//! system calls there, so init dies, the kernel panics and `panic=1` reboots, which ends the VMM);
//! on hardware-assisted KVM init runs and reboots the machine itself.
//!
//! The block service is killed every 2 s from 3 s on, through the kernel's probe of the disk and
//! the mount of its root: the supervisor restarts it each time and the kernel never sees an I/O
//! error.

use std::time::Duration;

use bulkhead_tests::*;

/// The ext4 superblock's mount count (`s_mnt_count`: u16 at byte 0x34 of the superblock at 1024).
fn ext4_mount_count(image: &std::path::Path) -> u16 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).expect("open image");
    let mut sb = [0u8; 0x3a];
    f.seek(SeekFrom::Start(1024)).expect("seek");
    f.read_exact(&mut sb).expect("read superblock");
    assert_eq!(u16::from_le_bytes([sb[0x38], sb[0x39]]), 0xef53, "not an ext4 image");
    u16::from_le_bytes([sb[0x34], sb[0x35]])
}

#[test]
fn linux_boots_from_bulkhead_block_with_console_service() {
    let vmlinux = artefact("BULKHEAD_VMLINUX");
    let dir = scratch("linux");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(artefact("BULKHEAD_ROOTFS"), &root).expect("copy rootfs");
    let mounts_before = ext4_mount_count(&root);
    let disk = format!("{},id=root", root.display());
    let r = run_to_end(
        &[
            "--kernel",
            vmlinux.to_str().expect("utf8"),
            "--disk",
            &disk,
            "--serial-input",
            "none",
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw",
            "--restart-max",
            "1000/10",
            "--restart-burst",
            "1000/1",
            "--fault",
            "block:kill,after=3s,every=2s",
        ],
        Duration::from_secs(900),
    );
    let out = &r.stdout;
    let ctx = || format!("--- console\n{out}\n--- log\n{}", r.stderr);
    assert!(out.contains("Linux version 6.1"), "no kernel banner on the console\n{}", ctx());
    assert!(r.stderr.contains("service console started as pid"), "{}", ctx());
    assert!(r.stderr.contains("service block-root started as pid"), "{}", ctx());
    assert!(out.contains("virtio_blk virtio0: [vda]"), "the kernel did not find the disk\n{}", ctx());
    assert!(out.contains("VFS: Mounted root (ext4 filesystem)"), "root not mounted\n{}", ctx());
    assert!(out.contains("Run /sbin/init as init process"), "kernel did not reach init\n{}", ctx());
    assert!(!out.contains("I/O error") && !out.contains("EXT4-fs error"), "the guest saw the kills\n{}", ctx());
    let restarts = r.stderr.lines().filter(|l| l.contains("service block-root restarted as pid")).count();
    assert!(restarts >= 5, "only {restarts} block restarts during the boot\n{}", ctx());
    if r.stderr.contains("host KVM is PVM") {
        // Under PVM, user space faults on its first instruction that needs the kernel; the kernel
        // panics and reboots.
        assert!(out.contains("Kernel panic"), "{}", ctx());
    } else {
        assert!(out.contains("bulkhead-guest: init running"), "{}", ctx());
    }
    assert_eq!(r.status.code(), Some(0), "the reboot must end bulkhead cleanly\n{}", ctx());
    assert!(r.stderr.contains("guest stopped"), "{}", ctx());
    let mounts_after = ext4_mount_count(&root);
    assert!(
        mounts_after > mounts_before,
        "the kernel's rw mount must have written the superblock through bulkhead-block: {mounts_before} -> {mounts_after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
