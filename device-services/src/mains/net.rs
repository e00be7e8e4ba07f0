//! `bulkhead-net`: the virtio-net service (virtio-mmio transport, TAP back end).
//!
//! Started by the core with its end of the control socket as fd 3 (or `--control-fd N`).
//! Expects a `DeviceConfig::Net` set-up with fds `Ring`, `SubmitBell`, `CompleteBell`,
//! `GuestMemory` (the guest RAM memfd), `Tap` (opened by the core: `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, vnet header size 12, non-blocking), `Irq` (irqfd) and `QueueNotify(0)` /
//! `QueueNotify(1)` (RX / TX ioeventfds; optional: kicks then arrive as forwarded writes), and
//! optionally `StateRegion` (a new instance then resumes: TX chains in flight are sent again, RX
//! buffers in flight are reused). The set-up's `rate_limit` caps each direction's bytes and frames
//! per second. Opens nothing itself. On `Shutdown` logs its counters
//! (`bulkhead-net[PID]: stats tx_frames=...`) and exits 0.

use std::process::ExitCode;

use crate::runtime::error_chain;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::Net;
use crate::virtio::setup::{check_window, run_service, take_transport_fds, transport, ServiceParts};
use crate::{RuntimeError, Startup};
use bulkhead_policies::Policy;
use ipc::control::{mac_string, DeviceConfig, FdRole, RateLimit};

fn setup(st: &mut Startup) -> Result<(MmioTransport<Net>, u64, u64), RuntimeError> {
    let DeviceConfig::Net(cfg) = st.setup.device.clone() else {
        return Err(RuntimeError::WrongDevice(format!("{:?} is not a net device", st.setup.device)));
    };
    check_window(cfg.mmio_base, cfg.mmio_len)?;
    let tap = st.take_fd(FdRole::Tap).ok_or(RuntimeError::MissingFd(FdRole::Tap))?;
    let fds = take_transport_fds(st, &cfg.memory, 2)?;
    let mut net = Net::new(tap, cfg.mac, cfg.queue_size).map_err(|e| RuntimeError::Device(error_chain(&e)))?;
    net.set_rate_limit(&cfg.rx_rate_limit, &cfg.tx_rate_limit);
    let transport = transport(st, net, fds)?;
    eprintln!(
        "bulkhead-net[{}]: {} at {:#x}+{:#x} gsi {}: tap {:?}, mac {}, queues of {}{}",
        std::process::id(),
        st.setup.name,
        cfg.mmio_base,
        cfg.mmio_len,
        cfg.gsi,
        cfg.tap_name,
        mac_string(&cfg.mac),
        cfg.queue_size,
        rate_limits(&cfg.rx_rate_limit, &cfg.tx_rate_limit)
    );
    Ok((transport, cfg.mmio_base, cfg.mmio_len))
}

/// The rate limits for the start-up line (nothing when there are none).
fn rate_limits(rx: &RateLimit, tx: &RateLimit) -> String {
    match (rx.is_unlimited(), tx.is_unlimited()) {
        (true, true) => String::new(),
        _ if rx == tx => format!(", {rx:?} each way"),
        _ => format!(", rx {rx:?}, tx {tx:?}"),
    }
}

/// The service's entry point (its binary's `main`, or `bulkhead` started under its name).
pub fn main() -> ExitCode {
    run_service(&ServiceParts {
        name: "bulkhead-net",
        policy: Policy::Net,
        redone_what: "chain(s)",
        setup,
        backend_fds: |n: &Net| vec![n.tap_fd()],
        stats: Net::stats_handle,
    })
}
