//! `bulkhead`: the core process, and the command-line client of running VMs.
//!
//! - `bulkhead [--api-sock PATH] [--config-file FILE] [--no-api] [--id ID]`: a VMM driven by the
//!   API, as `firecracker` is (Kata Containers and firecracker-containerd start it so).
//! - `bulkhead run ...`: a VMM that boots the VM its arguments describe at once.
//! - `bulkhead ls | pause | resume | stop | kill | fault | stats`: clients of running VMs, through
//!   their API sockets.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vmm_core::api::{ApiServer, VmSummary, VERSION};
use vmm_core::api_client::{self, Answer};
use vmm_core::cli::{Cli, Command, FaultArgs, LsArgs, RunArgs, StopArgs, VmmArgs};
use vmm_core::config::VmConfig;
use vmm_core::vmm::{chain, Vmm, VmmAction};

/// Exit status of a set-up error (bad kernel, missing service binary, refused configuration).
const EX_CONFIG: u8 = 78;
/// Exit status when a running VM cannot be reached.
const EX_UNAVAILABLE: u8 = 69;
/// The id a VMM started without `--id` reports (Firecracker's).
const DEFAULT_ID: &str = "anonymous-instance";
/// How long a client waits for one API answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // Where the main thread's stack is, for trimming it once start-up is over (every role).
    device_services::footprint::note_main_stack();
    // Started as a service (`argv[0]` = `bulkhead-console`, ...): the core spawns its own
    // executable so every process of a VM shares one file's text pages.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name().is_some_and(|n| n == vmm_core::helper::HELPER_NAME) {
        return vmm_core::helper::helper_main();
    }
    if Path::new(&argv0).file_name().is_some_and(|n| n == vmm_core::pidns::LAUNCHER_NAME) {
        return vmm_core::pidns::launcher_main();
    }
    if let Some(service) =
        std::path::Path::new(&argv0).file_name().and_then(|n| n.to_str()).and_then(device_services::mains::by_name)
    {
        return service();
    }
    // One malloc arena for every thread: each extra arena costs ~136 KiB of touched memory per
    // VMM, and nothing on the exit path allocates, so the shared lock is never contended there.
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = Cli::parse();
    match cli.command {
        None => serve_api(&cli.vmm),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Ls(a)) => ls(&a),
        Some(Command::Pause(v)) => simple(&v.vm, "PATCH", "/vm", r#"{"state": "Paused"}"#, "paused"),
        Some(Command::Resume(v)) => simple(&v.vm, "PATCH", "/vm", r#"{"state": "Resumed"}"#, "resumed"),
        Some(Command::Kill(v)) => stop(&v.vm, r#"{"action_type": "Kill"}"#, Duration::from_secs(10)),
        Some(Command::Stop(s)) => stop_gracefully(&s),
        Some(Command::Fault(f)) => fault(&f),
        Some(Command::Stats(v)) => stats(&v.vm),
        Some(Command::Inspect(a)) => match &a.device {
            Some(d) => pretty_json(&a.vm, &format!("/bulkhead/devices/{d}/state")),
            None if a.vcpus => pretty_json(&a.vm, "/bulkhead/vcpus"),
            None => inspect(&a.vm, a.json),
        },
        Some(Command::Set(a)) => match serde_json::to_string(&a.resources.to_resources()) {
            Ok(body) => simple(&a.vm, "PATCH", "/bulkhead/resources", &body, "resources set"),
            Err(e) => {
                eprintln!("bulkhead: error: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// `bulkhead --version`: `Bulkhead vX.Y.Z`. Invoked as `firecracker` (a link Kata's
/// `configuration-fc.toml` points at), the first line names the Firecracker API version whose
/// subset Bulkhead serves, which is what Kata checks.
fn print_version() -> ExitCode {
    let argv0 = std::env::args().next().unwrap_or_default();
    if Path::new(&argv0).file_name().is_some_and(|n| n == "firecracker") {
        println!("Firecracker v{}", vmm_core::api::FIRECRACKER_API_VERSION);
        println!();
        println!(
            "Bulkhead v{VERSION}, serving a subset of Firecracker's API {}",
            vmm_core::api::FIRECRACKER_API_VERSION
        );
    } else {
        println!("Bulkhead v{VERSION}");
        println!();
        println!("Serves a subset of Firecracker's API {} (docs/API.md).", vmm_core::api::FIRECRACKER_API_VERSION);
    }
    ExitCode::SUCCESS
}

/// Installs the termination-signal handlers, before anything narrows this thread's system
/// calls. False (after saying why) if that failed.
fn signal_handlers() -> bool {
    match vmm_core::launch::install_signal_handlers() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("bulkhead: error: {}", chain(&e));
            false
        }
    }
}

/// Serves the API on `sock` (if given), starts the VM at once if `start_now`, and runs `vmm`
/// until its VM stops. Returns the exit status.
///
/// Order matters: the API's threads are created before the VM starts, because starting it
/// narrows this thread's system calls (and a thread inherits its creator's filter).
fn drive(mut vmm: Vmm, sock: Option<&Path>, start_now: bool) -> ExitCode {
    let (tx, rx) = crossbeam_channel::unbounded();
    let api = match sock {
        // Its threads run under their own filter from the start (docs/SECURITY.md).
        Some(p) => match ApiServer::start(p, vmm.view(), tx, Some(bulkhead_policies::Policy::CoreApi)) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("bulkhead: error: {}", chain(&e));
                return ExitCode::from(EX_CONFIG);
            }
        },
        None => {
            drop(tx);
            None
        }
    };
    // Probed now, while the API waits for a configuration, so InstanceStart does not pay for it
    // (start_now: the build below would probe anyway).
    let _ = vmm_core::service::probe_sandbox();
    if start_now {
        if let Err(e) = vmm.handle(VmmAction::InstanceStart) {
            eprintln!("bulkhead: error: {}", e.to_string().trim_start_matches("Start microvm error: "));
            return ExitCode::from(EX_CONFIG);
        }
    }
    let reason = vmm.run(&rx);
    drop(api);
    ExitCode::from(reason.exit_code())
}

/// As root with the jail on, before any thread exists: the core's own PID namespace (the split
/// into launcher, helper and core, `pidns::split`), then its own mount and IPC namespaces
/// (`jail::enter_own_namespaces`). False (after saying why) if that failed.
fn own_namespaces(jail: &vmm_core::jail::JailConfig) -> bool {
    if jail.disabled || !nix::unistd::geteuid().is_root() {
        return true;
    }
    // The launcher stays here (and exits with the core); the core goes on below.
    if let Err(e) = vmm_core::pidns::split() {
        eprintln!("bulkhead: error: {} (start it with --no-jail to run it unjailed)", chain(&e));
        return false;
    }
    match vmm_core::jail::enter_own_namespaces() {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "bulkhead: error: the core's own namespaces: {} (start it with --no-jail to run it unjailed)",
                chain(&e)
            );
            false
        }
    }
}

/// `bulkhead` with no subcommand: the Firecracker way.
fn serve_api(args: &VmmArgs) -> ExitCode {
    if args.version {
        return print_version();
    }
    vmm_core::logger::init(args.log_level);
    if !signal_handlers() {
        return ExitCode::from(EX_CONFIG);
    }
    let id = args.id.clone().unwrap_or_else(|| DEFAULT_ID.to_string());
    let sock =
        if args.no_api { None } else { Some(args.api_sock.clone().unwrap_or_else(|| api_client::socket_for(&id))) };
    let config = match &args.config_file {
        None => VmConfig::default(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|text| VmConfig::from_json(&text).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bulkhead: error: configuration file: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
    };
    let mut config = config;
    config.bulkhead.allow_faults |= args.allow_faults;
    config.bulkhead.cgroup.disabled |= args.cgroup.no_cgroup;
    if args.cgroup.cgroup_parent.is_some() {
        config.bulkhead.cgroup.parent.clone_from(&args.cgroup.cgroup_parent);
    }
    let jail = args.jail.to_config();
    if jail != vmm_core::jail::JailConfig::default() {
        config.bulkhead.jail =
            vmm_core::jail::JailConfig { disabled: jail.disabled || config.bulkhead.jail.disabled, ..jail };
    }
    if !own_namespaces(&config.bulkhead.jail) {
        return ExitCode::from(EX_CONFIG);
    }
    drive(Vmm::new(&id, config), sock.as_deref(), args.config_file.is_some())
}

/// `bulkhead run`: boot the VM the arguments describe, at once.
fn run(args: &RunArgs) -> ExitCode {
    vmm_core::logger::init(args.log_level);
    let sock = args.api_sock.clone().or_else(|| args.id.as_deref().map(api_client::socket_for));
    if args.detach {
        return detach(sock.as_deref());
    }
    if !signal_handlers() {
        return ExitCode::from(EX_CONFIG);
    }
    let id = args.id.clone().unwrap_or_else(|| format!("vm-{}", std::process::id()));
    let config = args.to_config();
    if !own_namespaces(&config.bulkhead.jail) {
        return ExitCode::from(EX_CONFIG);
    }
    drive(Vmm::new(&id, config), sock.as_deref(), true)
}

/// `bulkhead run --detach`: runs the same command without `--detach` in a new session, its
/// stdin and stdout on /dev/null and its log in `SOCKET.log` (next to the API socket), and
/// returns once its API says the VM runs (at most 60 s). Prints the VMM's pid.
fn detach(sock: Option<&Path>) -> ExitCode {
    let Some(sock) = sock else {
        eprintln!("bulkhead: error: --detach needs --id or --api-sock (to know when the VM runs)");
        return ExitCode::from(2);
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bulkhead: error: cannot find my own binary: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    let log_path = sock.with_extension("log");
    let log = match std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bulkhead: error: cannot open the log {}: {e}", log_path.display());
            return ExitCode::from(EX_CONFIG);
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bulkhead: error: cannot start the VMM: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = child.try_wait() {
            eprintln!("bulkhead: error: the VMM exited before the VM ran ({status})");
            return ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1));
        }
        if let Ok(a) = api_client::request(sock, "GET", "/", None, Duration::from_secs(1)) {
            if a.body.contains("\"Running\"") {
                println!("{}", child.id());
                return ExitCode::SUCCESS;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("bulkhead: error: the VM did not start within 60 s");
    ExitCode::from(EX_UNAVAILABLE)
}

/// Sends one request to a VM; prints an error and returns the status on failure.
fn call(vm: &str, method: &str, path: &str, body: Option<&str>) -> Result<Answer, ExitCode> {
    let sock = api_client::socket_for(vm);
    match api_client::request(&sock, method, path, body, CLIENT_TIMEOUT) {
        Ok(a) if a.ok() => Ok(a),
        Ok(a) => {
            eprintln!("bulkhead: error: {}", a.message());
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("bulkhead: error: {}", chain(&e));
            Err(ExitCode::from(EX_UNAVAILABLE))
        }
    }
}

fn simple(vm: &str, method: &str, path: &str, body: &str, done: &str) -> ExitCode {
    match call(vm, method, path, Some(body)) {
        Ok(_) => {
            println!("{vm}: {done}");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Sends a stop or kill and waits (at most `grace` + 10 s) for the VMM to end.
fn stop(vm: &str, body: &str, grace: Duration) -> ExitCode {
    if let Err(code) = call(vm, "PUT", "/bulkhead/actions", Some(body)) {
        return code;
    }
    let sock = api_client::socket_for(vm);
    let start = Instant::now();
    while start.elapsed() < grace + Duration::from_secs(10) {
        if std::os::unix::net::UnixStream::connect(&sock).is_err() {
            println!("{vm}: stopped");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("bulkhead: error: {vm} is still running");
    ExitCode::from(1)
}

fn stop_gracefully(s: &StopArgs) -> ExitCode {
    let body = format!(r#"{{"action_type": "Stop", "timeout_s": {}}}"#, s.timeout);
    stop(&s.vm, &body, Duration::from_secs(s.timeout))
}

/// `bulkhead ls`.
fn ls(a: &LsArgs) -> ExitCode {
    let vms = api_client::list(&a.dir);
    if !a.json {
        println!(
            "{:<24} {:<12} {:>8} {:>9} {:>5} {:>8} {:>7} {:>8}",
            "ID", "STATE", "PID", "UPTIME", "VCPUS", "MEM(MiB)", "DEVICES", "RESTARTS"
        );
    }
    for (id, sock) in vms {
        let Ok(answer) = api_client::request(&sock, "GET", "/bulkhead/vm", None, Duration::from_secs(2)) else {
            continue;
        };
        let Ok(s) = serde_json::from_str::<VmSummary>(&answer.body) else { continue };
        if a.json {
            println!("{}", answer.body);
        } else {
            println!(
                "{:<24} {:<12} {:>8} {:>8}s {:>5} {:>8} {:>7} {:>8}{}",
                id,
                s.state,
                s.pid,
                s.uptime_s,
                s.vcpus,
                s.mem_mib,
                s.devices,
                s.restarts,
                s.state_reason.map_or_else(String::new, |r| format!("  ({r})"))
            );
        }
    }
    ExitCode::SUCCESS
}

/// `bulkhead fault VM DEVICE ACTION` (`DEVICE` `stats`: metrics).
fn fault(f: &FaultArgs) -> ExitCode {
    match (f.device.as_str(), f.action) {
        ("stats", None) => stats(&f.vm),
        (_, Some(action)) => {
            let body = serde_json::json!({ "action": action.to_string() }).to_string();
            match call(&f.vm, "PUT", &format!("/bulkhead/devices/{}/fault", f.device), Some(&body)) {
                Ok(a) => {
                    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
                    println!("{}", v["result"].as_str().unwrap_or(&a.body));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        (_, None) => {
            eprintln!("bulkhead: error: missing fault ({})", ipc::control::FaultAction::NAMES);
            ExitCode::from(2)
        }
    }
}

/// `bulkhead stats VM`: one line per device.
/// `bulkhead inspect ID [--json]`: `GET /bulkhead/isolation`, as JSON or as text.
fn inspect(vm: &str, json: bool) -> ExitCode {
    let answer = match call(vm, "GET", "/bulkhead/isolation", None) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if json {
        println!("{}", answer.body);
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<vmm_core::isolation::IsolationReport>(&answer.body) {
        Ok(r) => {
            print!("{}", vmm_core::isolation::render(&r));
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("bulkhead: error: malformed answer: {}", answer.body);
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// `GET path`, its JSON answer printed indented.
fn pretty_json(vm: &str, path: &str) -> ExitCode {
    let answer = match call(vm, "GET", path, None) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match serde_json::from_str::<serde_json::Value>(&answer.body).and_then(|v| serde_json::to_string_pretty(&v)) {
        Ok(pretty) => {
            println!("{pretty}");
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("bulkhead: error: malformed answer: {}", answer.body);
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

fn stats(vm: &str) -> ExitCode {
    let answer = match call(vm, "GET", "/bulkhead/devices", None) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let Ok(devices) = serde_json::from_str::<Vec<vmm_core::api::DeviceInfo>>(&answer.body) else {
        eprintln!("bulkhead: error: malformed answer: {}", answer.body);
        return ExitCode::from(EX_UNAVAILABLE);
    };
    for d in devices {
        let cpu = d.cpu_ns.map_or_else(String::new, |ns| format!(", cpu {:.1} ms", ns as f64 / 1e6));
        println!(
            "service {} (pid {}): {} restarts, {} exits forwarded, {} device requests redone{cpu}, {}{}",
            d.service,
            d.pid,
            d.restarts,
            d.exits_forwarded,
            d.requests_redone,
            d.state,
            d.failed.map_or_else(String::new, |f| format!("; FAILED: {f}"))
        );
    }
    ExitCode::SUCCESS
}
