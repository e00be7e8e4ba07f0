//! `cargo xtask guest` (being written).

/// Entry point of `cargo xtask guest`.
pub fn run(_args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    Err("not built yet".into())
}
