//! `bulkhead`: the core process.

use std::process::ExitCode;

use clap::Parser;
use ipc::control::{ApiRequest, ApiResponse};
use vmm_core::cli::{Cli, Command};

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// Sends one API request to a running VM and prints the answer.
fn api(vm: &str, req: &ApiRequest) -> ExitCode {
    match vmm_core::faults::request(vm, req) {
        Ok(ApiResponse::Done(msg)) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Ok(ApiResponse::Stats(all)) => {
            for m in &all {
                println!("{}", vmm_core::faults::format_metrics(m));
            }
            ExitCode::SUCCESS
        }
        Ok(ApiResponse::Error(e)) => {
            eprintln!("bulkhead: error: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("bulkhead: error: {}", chain(&e));
            ExitCode::from(69)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            vmm_core::logger::init(args.log_level);
            let config = args.to_config();
            let api = args.api_sock.clone().or_else(|| args.name.as_deref().map(vmm_core::faults::socket_for));
            match vmm_core::launch::run(&config, api.as_deref()) {
                Ok(reason) => ExitCode::from(reason.exit_code()),
                Err(e) => {
                    eprintln!("bulkhead: error: {}", chain(&e));
                    ExitCode::from(78)
                }
            }
        }
        Command::Stats(s) => api(&s.vm, &ApiRequest::Stats),
        Command::Fault(f) => match (f.device.as_str(), f.action) {
            ("stats", None) => api(&f.vm, &ApiRequest::Stats),
            (_, Some(action)) => api(&f.vm, &ApiRequest::Fault { device: f.device.clone(), action }),
            (_, None) => {
                eprintln!("bulkhead: error: missing fault ({})", ipc::control::FaultAction::NAMES);
                ExitCode::from(2)
            }
        },
    }
}
