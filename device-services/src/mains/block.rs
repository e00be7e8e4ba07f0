//! `bulkhead-block`: the virtio-blk service (virtio-mmio transport).
//!
//! Started by the core with its end of the control socket as fd 3 (or `--control-fd N`).
//! Expects a `DeviceConfig::Block` set-up with fds `Ring`, `SubmitBell`, `CompleteBell`,
//! `GuestMemory` (the guest RAM memfd), `Disk` (the image, opened by the core), `Irq` (irqfd) and
//! `QueueNotify(i)` for each queue (ioeventfds; optional: kicks then arrive as forwarded writes),
//! and optionally `StateRegion` (the device's state then survives the process: a new instance
//! resumes from it and redoes the requests that were in flight).
//! The set-up's `rate_limit` caps the disk's bytes and requests per second (all queues together).
//! With `DiskWitness` (writable disks) a FLUSH redone after a restart first asks the witness
//! whether a writeback error happened that the dead instance may have taken with it.
//! Opens nothing itself. On `Shutdown` logs its counters (`bulkhead-block[PID]: stats ok=...`)
//! and exits 0.

use std::fs::File;
use std::process::ExitCode;

use crate::runtime::error_chain;
use crate::virtio::block::Block;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::setup::{check_window, run_service, take_transport_fds, transport, ServiceParts};
use crate::{RuntimeError, Startup};
use bulkhead_policies::Policy;
use ipc::control::{DeviceConfig, FdRole};

fn setup(st: &mut Startup) -> Result<(MmioTransport<Block>, u64, u64), RuntimeError> {
    let DeviceConfig::Block(cfg) = st.setup.device.clone() else {
        return Err(RuntimeError::WrongDevice(format!("{:?} is not a block device", st.setup.device)));
    };
    check_window(cfg.mmio_base, cfg.mmio_len)?;
    let disk = st.take_fd(FdRole::Disk).ok_or(RuntimeError::MissingFd(FdRole::Disk))?;
    let fds = take_transport_fds(st, &cfg.memory, cfg.num_queues)?;
    let mut block = Block::new(File::from(disk), cfg.disk_size, cfg.read_only, &cfg.id, cfg.num_queues, cfg.queue_size)
        .map_err(|e| RuntimeError::Device(error_chain(&e)))?;
    block.set_rate_limit(&cfg.rate_limit);
    block.set_error_policy(cfg.write_errors, cfg.read_errors);
    if let Some(w) = st.take_fd(FdRole::DiskWitness) {
        block.set_flush_witness(File::from(w));
    }
    let (discard, zeroes) = (block.supports_discard(), block.supports_write_zeroes());
    let transport = transport(st, block, fds)?;
    eprintln!(
        "bulkhead-block[{}]: {} at {:#x}+{:#x} gsi {}: {} sectors{}{}{}, {} queue(s) of {}, werror={} rerror={}{}",
        std::process::id(),
        st.setup.name,
        cfg.mmio_base,
        cfg.mmio_len,
        cfg.gsi,
        transport.device().capacity(),
        if cfg.read_only { ", read-only" } else { "" },
        if discard { ", discard" } else { "" },
        if zeroes { ", write-zeroes" } else { "" },
        cfg.num_queues,
        cfg.queue_size,
        cfg.write_errors.name(),
        cfg.read_errors.name(),
        if cfg.rate_limit.is_unlimited() { String::new() } else { format!(", {:?}", cfg.rate_limit) }
    );
    Ok((transport, cfg.mmio_base, cfg.mmio_len))
}

/// The service's entry point (its binary's `main`, or `bulkhead` started under its name).
pub fn main() -> ExitCode {
    run_service(&ServiceParts {
        name: "bulkhead-block",
        policy: Policy::Block,
        redone_what: "request(s)",
        setup,
        backend_fds: Block::disk_fds,
        stats: Block::stats_handle,
    })
}
