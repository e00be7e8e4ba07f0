//! `bulkhead-block`: see [`device_services::mains::block`]. The same service also runs as `bulkhead`
//! started under the name `bulkhead-block` (one multi-call binary, so every process of a VM shares its
//! text pages); this stand-alone binary is for `--service-dir` set-ups.

fn main() -> std::process::ExitCode {
    device_services::mains::block::main()
}
