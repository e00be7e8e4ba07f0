//! A stand-in for a compromised device service, for tests of the core's supervision: the real
//! core starts it (through `--service-dir`, under a service's name) exactly as it starts a
//! service, it takes its set-up and jails itself with the real jail and seccomp filter, says
//! `Ready`, and then attacks the core over the control channel:
//!
//! 1. answers the first liveness ping with its real token but counters at `u64::MAX`;
//! 2. sends a `Pong` with a token the core never sent (`u64::MAX`), which, if believed, would
//!    answer every future ping in advance;
//! 3. sends a message carrying far more fds than the protocol allows;
//! 4. floods the channel with messages until its queue is full and the send blocks;
//! 5. that, or a sleep of at most two minutes, is a hang: it answers nothing more.
//!
//! Usage: `hostile-service MODE --control-fd N`; the only mode is `control-attack`. Started as
//! `bulkhead-block` (a test links it under that name into a `--service-dir`, since the core
//! passes no arguments of its own choosing and an empty environment) the mode is implied.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_policies::Policy;
use device_services::Startup;
use ipc::control::{ControlMsg, IoCounters, ServiceStats};

/// How long the hang lasts at most (the core is expected to kill it long before).
const HANG: Duration = Duration::from_secs(120);
/// Messages sent in the flood, at most.
const FLOOD: usize = 100_000;

fn huge_stats() -> ServiceStats {
    let m = u64::MAX;
    ServiceStats {
        requests: m,
        rejected: m,
        sleeps: m,
        redone: m,
        idle_spin_ns: m,
        io: IoCounters { requests: m, bytes_to_guest: m, bytes_from_guest: m, throttled: m, errors: m, host_errors: m },
    }
}

fn attack(st: &Startup) -> Result<(), String> {
    let control = st.control();
    let deadline = Instant::now() + Duration::from_secs(30);
    // 1. The first ping, answered with its own token and absurd counters.
    let token = loop {
        match control.recv(deadline).map_err(|e| format!("no ping: {e}"))? {
            (ControlMsg::Ping { token }, _) => break token,
            _ => continue,
        }
    };
    // Its seccomp filter allows only blocking sends (`MSG_NOSIGNAL`), as for any service.
    let send = |msg: &ControlMsg, fds: &[BorrowedFd<'_>]| control.send(msg, fds);
    send(&ControlMsg::Pong { token, stats: huge_stats() }, &[]).map_err(|e| e.to_string())?;
    // 2. A pong for a ping never sent.
    send(&ControlMsg::Pong { token: u64::MAX, stats: huge_stats() }, &[]).map_err(|e| e.to_string())?;
    // 3. Far more fds than the protocol takes: the same fd, 200 times (raw sendmsg, as `send`
    //    refuses more than the protocol's cap).
    many_fds(control.as_fd())?;
    eprintln!("hostile-service[{}]: attack sent; flooding, then hanging", std::process::id());
    // 4. A flood; once the core's queue is full the send blocks, which is a hang already.
    for _ in 0..FLOOD {
        if send(&ControlMsg::Pong { token: u64::MAX - 1, stats: huge_stats() }, &[]).is_err() {
            break;
        }
    }
    // 5. Hang: read nothing, answer nothing.
    let until = Instant::now() + HANG;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn many_fds(control: BorrowedFd<'_>) -> Result<(), String> {
    let bytes = ipc::control::encode(&ControlMsg::Pong { token: 1, stats: ServiceStats::default() })
        .map_err(|e| e.to_string())?;
    let fds = vec![control.as_raw_fd(); 200];
    let rights = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(&bytes)];
    nix::sys::socket::sendmsg::<()>(control.as_raw_fd(), &iov, &rights, nix::sys::socket::MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| format!("sendmsg with 200 fds: {e}"))?;
    Ok(())
}

fn run() -> Result<(), String> {
    // Started by the core from a service directory under a service's name (a link to this
    // binary: the services inherit the VM helper's filter, which runs no shell), the mode is
    // `control-attack`; otherwise it comes first.
    let argv0 = std::env::args().next().unwrap_or_default();
    let as_service = std::path::Path::new(&argv0).file_name().is_some_and(|n| n == "bulkhead-block");
    let mut args = std::env::args().skip(1).peekable();
    let mode = match args.peek() {
        Some(m) if m != "--control-fd" => args.next().unwrap_or_default(),
        _ if as_service => "control-attack".to_string(),
        _ => return Err("usage: hostile-service control-attack --control-fd N".into()),
    };
    if mode != "control-attack" {
        return Err(format!("unknown mode {mode}"));
    }
    let mut st = Startup::from_args(args).map_err(|e| e.to_string())?;
    let policy = match st.setup.device {
        ipc::control::DeviceConfig::Console { .. } => Policy::Console,
        ipc::control::DeviceConfig::Block(_) => Policy::Block,
        _ => Policy::Net,
    };
    st.jail(&[]).map_err(|e| e.to_string())?;
    st.seccomp(policy).map_err(|e| e.to_string())?;
    st.control().send(&ControlMsg::Ready { pid: std::process::id() }, &[]).map_err(|e| e.to_string())?;
    attack(&st)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostile-service[{}]: {e}", std::process::id());
            ExitCode::FAILURE
        }
    }
}
