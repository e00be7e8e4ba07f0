//! The services' entry points, one per device kind.
//!
//! Each is the `main` of its stand-alone binary (`bulkhead-console`, `bulkhead-block`,
//! `bulkhead-net`) and of the multi-call `bulkhead` binary started under that name: the core
//! spawns its own executable with `argv[0]` naming the service, so the core and every service of
//! every VM on a host map one file and share its text pages.

use std::process::ExitCode;

pub mod block;
pub mod console;
pub mod net;

/// The service whose binary is called `name` (the file name of `argv[0]`), if it is one.
pub fn by_name(name: &str) -> Option<fn() -> ExitCode> {
    match name {
        "bulkhead-console" => Some(console::main),
        "bulkhead-block" => Some(block::main),
        "bulkhead-net" => Some(net::main),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_service_is_found_by_its_binary_name_and_nothing_else() {
        for n in ["bulkhead-console", "bulkhead-block", "bulkhead-net"] {
            assert!(super::by_name(n).is_some(), "{n}");
        }
        for n in ["bulkhead", "firecracker", "bulkhead-console2", ""] {
            assert!(super::by_name(n).is_none(), "{n}");
        }
    }
}
