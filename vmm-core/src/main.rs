//! `bulkhead`: the core process.

use std::process::ExitCode;

use clap::Parser;
use vmm_core::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            vmm_core::logger::init(args.log_level);
            match vmm_core::launch::run(&args) {
                Ok(reason) => ExitCode::from(reason.exit_code()),
                Err(e) => {
                    let mut msg = format!("bulkhead: error: {e}");
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg.push_str(&format!(": {s}"));
                        src = s.source();
                    }
                    eprintln!("{msg}");
                    ExitCode::from(78)
                }
            }
        }
    }
}
