//! The one Linux boot of a test run: a stock-configured kernel through `bulkhead`, its console on
//! `bulkhead-console`. Under PVM it takes about a minute and ends at "Run /init" (guest user space
//! cannot make system calls there, so init panics and `panic=1` reboots, which ends the VMM);
//! on hardware-assisted KVM init runs and reboots the machine itself.

use std::time::Duration;

use bulkhead_tests::*;

#[test]
fn linux_boots_to_init_with_console_service() {
    let vmlinux = artefact("BULKHEAD_VMLINUX");
    let initramfs = artefact("BULKHEAD_INITRAMFS");
    let r = run_to_end(
        &[
            "--kernel",
            vmlinux.to_str().expect("utf8"),
            "--initrd",
            initramfs.to_str().expect("utf8"),
            "--serial-input",
            "none",
            "--mem",
            "256",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux",
        ],
        Duration::from_secs(600),
    );
    let out = &r.stdout;
    assert!(out.contains("Linux version 6.1"), "no kernel banner on the console:\n{out}\n{}", r.stderr);
    assert!(out.contains("Run /init"), "kernel did not reach init:\n{out}\n{}", r.stderr);
    assert!(r.stderr.contains("service console started as pid"), "{}", r.stderr);
    if r.stderr.contains("host KVM is PVM") {
        // Under PVM, user space faults on its first system call; the kernel panics and reboots.
        assert!(out.contains("Kernel panic") || out.contains("bulkhead-guest: init running"), "{out}");
    } else {
        assert!(out.contains("bulkhead-guest: init running"), "{out}");
    }
    assert_eq!(r.status.code(), Some(0), "the reboot must end bulkhead cleanly:\n{}", r.stderr);
    assert!(r.stderr.contains("guest stopped"), "{}", r.stderr);
}
