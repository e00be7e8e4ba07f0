//! `cargo xtask run` and `cargo xtask test`.

use std::process::Command;

use crate::netns::NetNs;
use crate::util::{build_binaries, guest_images, probe_elf, run, workspace_root, BoxError};

/// The command line the default Linux guest boots with (the core adds the PVM parameters itself
/// when the host needs them).
pub const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw";

/// Host side of the guest's network in `cargo xtask run`: the TAP's address and MAC, and the UDP
/// port netconsole sends to.
const RUN_TAP: &str = "bhrun0";
const RUN_HOST_MAC: &str = "02:00:0a:00:02:01";
const RUN_GUEST_MAC: &str = "02:00:0a:00:02:02";
const RUN_NETCONSOLE: &str = "10.0.2.1:6666";

/// `cargo xtask run [--no-net] [bulkhead run options]`: builds the release binaries and the Linux
/// guest if missing, then boots it with its console on this terminal, its root file system on
/// `target/guest-run/rootfs.ext4` (a copy of the built image, made once and kept between runs, as
/// a VM's disk would be) served by `bulkhead-block`, and (unless `--no-net`, or when no network
/// namespace can be made) a NIC served by `bulkhead-net`: the VM runs in a network namespace of
/// its own with a TAP at 10.0.2.1/24, the kernel configures eth0 as 10.0.2.2 (`ip=`) and sends
/// its log with netconsole to 10.0.2.1:6666, where this task counts the lines that arrive.
pub fn run_guest(extra: &[String]) -> Result<(), BoxError> {
    let no_net = extra.iter().any(|a| a == "--no-net");
    let extra: Vec<&String> = extra.iter().filter(|a| *a != "--no-net").collect();
    let bin = build_binaries(true)?;
    let images = guest_images()?;
    let disk_dir = workspace_root().join("target").join("guest-run");
    std::fs::create_dir_all(&disk_dir)?;
    let disk = disk_dir.join("rootfs.ext4");
    if !disk.exists() {
        std::fs::copy(&images.rootfs, &disk).map_err(|e| format!("cannot copy the root image: {e}"))?;
    }
    let ns = if no_net {
        None
    } else {
        match crate::util::ensure_packages(&[("ip", "iproute2")]).and_then(|()| run_netns()) {
            Ok(ns) => Some(ns),
            Err(e) => {
                eprintln!("xtask run: cannot set up the guest's network ({e}); booting without --net");
                None
            }
        }
    };
    let mut cmdline = LINUX_CMDLINE.to_string();
    let mut cmd = match &ns {
        Some(ns) => {
            cmdline.push_str(&format!(
                " ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off netconsole=6665@10.0.2.2/eth0,6666@10.0.2.1/{RUN_HOST_MAC}"
            ));
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]).arg(bin.join("bulkhead"));
            c.arg("run").arg("--net").arg(format!("tap={RUN_TAP},mac={RUN_GUEST_MAC}"));
            c
        }
        None => {
            let mut c = Command::new(bin.join("bulkhead"));
            c.arg("run");
            c
        }
    };
    let listener = match &ns {
        Some(ns) => Some(netconsole_listener(ns)?),
        None => None,
    };
    eprintln!(
        "xtask run: booting {} with root on {}{}",
        images.vmlinux.display(),
        disk.display(),
        if ns.is_some() { format!(", eth0 on TAP {RUN_TAP} (netconsole to {RUN_NETCONSOLE})") } else { String::new() }
    );
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--disk")
        .arg(format!("{},id=root", disk.display()))
        .args(["--mem", "256", "--cmdline", &cmdline])
        .args(extra);
    let status = cmd.status().map_err(|e| format!("cannot start bulkhead: {e}"))?;
    eprintln!("xtask run: bulkhead exited with {status}");
    if let Some((stop, thread)) = listener {
        std::thread::sleep(std::time::Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let lines = thread.join().map_err(|_| "netconsole listener panicked")?;
        let last = lines.last().map(|l| l.trim_end().to_string()).unwrap_or_default();
        eprintln!(
            "xtask run: netconsole: {} log line(s) from the guest arrived at {RUN_NETCONSOLE}{}",
            lines.len(),
            if last.is_empty() { String::new() } else { format!("; the last: {last:?}") }
        );
    }
    Ok(())
}

/// The namespace `cargo xtask run` puts the VM in: a TAP at 10.0.2.1/24 with a fixed MAC.
fn run_netns() -> Result<NetNs, BoxError> {
    let ns = NetNs::new("bulkhead-run-")?;
    ns.ip(&["tuntap", "add", "dev", RUN_TAP, "mode", "tap", "vnet_hdr"])?;
    ns.ip(&["link", "set", RUN_TAP, "address", RUN_HOST_MAC])?;
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", RUN_TAP])?;
    ns.ip(&["link", "set", RUN_TAP, "up"])?;
    Ok(ns)
}

type Listener = (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<Vec<String>>);

/// Collects netconsole datagrams on 10.0.2.1:6666 inside `ns` until told to stop.
fn netconsole_listener(ns: &NetNs) -> Result<Listener, BoxError> {
    let sock = ns.run(|| {
        let s = std::net::UdpSocket::bind(RUN_NETCONSOLE)?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        Ok(s)
    })?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 2048];
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok(n) = sock.recv(&mut buf) {
                lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        lines
    });
    Ok((stop, thread))
}

/// `cargo xtask build [--debug]`: builds the binaries (release unless `--debug`; statically
/// linked, see `util::static_build`) and prints their directory last.
pub fn build(extra: &[String]) -> Result<(), BoxError> {
    let debug = match extra {
        [] => false,
        [d] if d == "--debug" => true,
        _ => return Err("build takes only --debug".into()),
    };
    let dir = build_binaries(!debug)?;
    println!("{}", dir.display());
    Ok(())
}

/// `cargo xtask test`: builds the binaries, the probe guest and the Linux guest, then runs the
/// whole test suite with their paths in the environment.
pub fn test(extra: &[String]) -> Result<(), BoxError> {
    // The net tests make their own network namespaces (`ip netns`); the sandbox test runs the core
    // in a user namespace (`unshare`); the API tests drive it with `curl`; a boot test strips the
    // probe's PVH note (`objcopy`). A slim image may lack any of them.
    crate::util::ensure_packages(&[
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        ("curl", "curl"),
        ("objcopy", "binutils"),
    ])?;
    build_binaries(false)?;
    let probe = probe_elf()?;
    let images = guest_images()?;
    // The probe guest is its own (freestanding) workspace: its logic is unit-tested on the host
    // against a fake machine.
    run(Command::new(env!("CARGO"))
        .current_dir(workspace_root().join("guests").join("probe"))
        .args(["test", "--lib"]))?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args(["test", "--workspace"]);
    // The same statically linked binaries as `build_binaries` (one target directory).
    crate::util::static_build(&mut cmd);
    cmd.args(extra)
        .env("BULKHEAD_PROBE", &probe)
        .env("BULKHEAD_VMLINUX", &images.vmlinux)
        .env("BULKHEAD_INITRAMFS", &images.initramfs)
        .env("BULKHEAD_ROOTFS", &images.rootfs);
    run(&mut cmd)
}
