//! `cargo xtask`: build, run, test and benchmark helpers for Bulkhead.
//!
//! - `cargo xtask build`  builds the binaries, statically linked; last line: their directory.
//! - `cargo xtask probe`  builds the freestanding probe guest; last line: the ELF's path.
//! - `cargo xtask guest`  builds the Linux guest (kernel + rootfs); last lines: `key=path`.
//! - `cargo xtask run`    builds what is missing and boots the Linux guest with its services.
//! - `cargo xtask test`   builds everything and runs every test (what CI runs).
//! - `cargo xtask bench`  runs the benchmarks and prints the report.

mod bench;
mod bench_api;
mod bench_blk;
mod bench_density;
mod bench_footprint;
mod bench_net;
mod bench_pio;
mod guest;
mod netns;
mod probe;
mod proc_cpu;
mod tasks;
mod util;

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: cargo xtask <command> [options]\n\
     \x20 build   build the binaries, statically linked (release unless --debug; prints their directory last)\n\
     \x20 probe   build the probe guest ELF (prints its path last)\n\
     \x20 guest   build the Linux guest kernel and root file systems (prints key=path lines last)\n\
     \x20 run     build what is missing, then boot the Linux guest with its device services\n\
     \x20         (extra arguments are passed to `bulkhead run`)\n\
     \x20 test    build everything and run every test\n\
     \x20 bench   run the benchmarks (probe guest; see docs/benchmarks.md)"
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_str() {
        "build" => tasks::build(&rest),
        "probe" => probe::run(&rest),
        "guest" => guest::run(&rest),
        "run" => tasks::run_guest(&rest),
        "test" => tasks::test(&rest),
        "bench" => bench::run(&rest),
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
