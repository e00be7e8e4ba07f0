//! `cargo xtask`: build helpers for Bulkhead.
//!
//! - `cargo xtask probe`  builds the freestanding probe guest; last line: the ELF's path.
//! - `cargo xtask guest`  builds the Linux guest (kernel + rootfs); last lines: their paths.

mod guest;
mod probe;

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: cargo xtask <probe|guest> [options]\n\
     \x20 probe   build the probe guest ELF\n\
     \x20 guest   build the Linux guest kernel and root file systems"
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_str() {
        "probe" => probe::run(&rest),
        "guest" => guest::run(&rest),
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(())
        }
        other => Err(format!("unknown xtask command `{other}`\n{}", usage()).into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
