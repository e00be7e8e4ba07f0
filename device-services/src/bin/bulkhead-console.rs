//! `bulkhead-console`: the 16550 UART service.
//!
//! Started by the core with its end of the control socket as fd 3 (or `--control-fd N`). Expects
//! a `DeviceConfig::Console` set-up with fds `Ring`, `SubmitBell`, `CompleteBell`, `Output`, `Irq`
//! and optionally `Input`. Exits 0 on `Shutdown`.

use std::error::Error;
use std::process::ExitCode;

use bulkhead_policies::Policy;
use device_services::console::{Console, UART_PORTS};
use device_services::{RuntimeError, Startup};
use ipc::control::{DeviceConfig, FdRole};

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
    let console = Console::new(output, input, irq);
    st.jail(&console.raw_fds())?;
    // Last step of confinement, before any guest data is read.
    st.seccomp(Policy::Console)?;
    st.serve(console, base, len)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("bulkhead-console[{}]: {e}", std::process::id());
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
