//! `cargo xtask probe` (being written).

/// Entry point of `cargo xtask probe`.
pub fn run(_args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    Err("not built yet".into())
}
