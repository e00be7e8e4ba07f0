//! `bulkhead-console`: the 16550 UART service.
//!
//! Started by the core with its end of the control socket as fd 3 (or `--control-fd N`). Expects
//! a `DeviceConfig::Console` set-up with fds `Ring`, `SubmitBell`, `CompleteBell`, `Output`, `Irq`
//! and optionally `Input` and `StateRegion`. With a state region the UART's registers, receive
//! FIFO and pending input survive the process: a new instance restores them (an invalid region is
//! logged and cleared, and the UART starts fresh). Exits 0 on `Shutdown`.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use crate::console::{Console, Restore, UART_PORTS};
use crate::runtime::error_chain;
use crate::{RuntimeError, Startup};
use bulkhead_policies::Policy;
use ipc::control::{DeviceConfig, FdRole};
use ipc::state::StateRegion;

fn run() -> Result<(), RuntimeError> {
    let mut st = Startup::from_args(std::env::args().skip(1))?;
    let DeviceConfig::Console { base, len } = st.setup.device.clone() else {
        let e = RuntimeError::WrongDevice(format!("{:?} is not a console", st.setup.device));
        st.report_failure(&e.to_string());
        return Err(e);
    };
    if len != UART_PORTS || base.checked_add(len).is_none() {
        let e = RuntimeError::WrongDevice(format!("console at {base:#x}+{len} (a 16550 decodes 8 ports)"));
        st.report_failure(&e.to_string());
        return Err(e);
    }
    let (Some(output), Some(irq)) = (st.take_fd(FdRole::Output), st.take_eventfd(FdRole::Irq)) else {
        let e = RuntimeError::MissingFd(FdRole::Output);
        st.report_failure("console needs Output and Irq fds");
        return Err(e);
    };
    let input = st.take_fd(FdRole::Input);
    let pid = std::process::id();
    let region = match st.take_fd(FdRole::StateRegion).map(StateRegion::from_fd) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            // Serving output matters more than surviving the next restart.
            eprintln!("bulkhead-console[{pid}]: state region unusable, state will not survive: {}", error_chain(&e));
            None
        }
    };
    let mut keep = vec![output.as_raw_fd(), irq.as_raw_fd()];
    keep.extend(input.as_ref().map(AsRawFd::as_raw_fd));
    keep.extend(region.as_ref().map(|r| r.fd().as_raw_fd()));
    st.jail(&keep)?;
    // Last step of confinement, before any guest data is read: the saved state, which an
    // earlier instance (driven by the guest) wrote, is decoded only after it.
    st.seccomp(Policy::Console)?;
    let console = match region {
        None => Console::new(output, input, irq),
        Some(region) => {
            let (console, restore) = Console::with_state(output, input, irq, region).map_err(|e| {
                st.report_failure(&error_chain(&e));
                RuntimeError::Device(error_chain(&e))
            })?;
            log_restore(pid, &restore);
            console
        }
    };
    st.serve(console, base, len)?;
    Ok(())
}

fn log_restore(pid: u32, restore: &Restore) {
    match restore {
        Restore::Fresh => {}
        Restore::Restored { generation, fifo, pending, irq_raised } => eprintln!(
            "bulkhead-console[{pid}]: restored UART state generation {generation}: {fifo} byte(s) in the FIFO, \
             {pending} pending{}",
            if *irq_raised { ", interrupt re-raised" } else { "" }
        ),
        Restore::Invalid(e) => {
            eprintln!("bulkhead-console[{pid}]: saved state rejected, starting a fresh UART: {}", error_chain(e))
        }
    }
}

/// The service's entry point (its binary's `main`, or `bulkhead` started under its name).
pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-console[{}]: {}", std::process::id(), error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
