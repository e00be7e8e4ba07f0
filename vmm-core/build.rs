//! Compiles the launcher (`launcher/launcher.rs`) into `OUT_DIR/bulkhead-launcher`, which
//! `bulkhead` embeds (`pidns::LAUNCHER_IMAGE`).
//!
//! The launcher is a program of its own, built with the same `rustc` as the rest: `no_std`, no
//! libc, `panic=abort`, linked static and position-dependent with no start files. It has no
//! writable data, so a waiting launcher costs its stack page and little else (see the file's
//! docs). Only x86_64 Linux is built for; elsewhere the image is empty and the first image of
//! `bulkhead` waits itself.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("launcher/launcher.rs");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=RUSTC_WORKSPACE_WRAPPER");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("bulkhead-launcher");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !(target.starts_with("x86_64-") && target.contains("-linux-")) {
        std::fs::write(&out, []).expect("writing the empty launcher image");
        return;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // Under `cargo clippy` the launcher is linted too, with the workspace's lints (it is not a
    // module of this crate, so clippy would not see it otherwise).
    let clippy = std::env::var_os("RUSTC_WORKSPACE_WRAPPER")
        .filter(|w| PathBuf::from(w).file_stem().is_some_and(|n| n.to_string_lossy().starts_with("clippy-driver")));
    let mut cmd = match clippy {
        Some(driver) => {
            let mut c = Command::new(driver);
            c.arg(&rustc).args(["-D", "warnings", "-D", "clippy::all", "-D", "clippy::undocumented_unsafe_blocks"]);
            c.args([
                "-D",
                "unsafe_op_in_unsafe_fn",
                "-D",
                "clippy::cast_possible_truncation",
                "-D",
                "clippy::unwrap_used",
            ]);
            c
        }
        None => Command::new(&rustc),
    };
    let status = cmd
        .args(["--edition", "2021", "--crate-type", "bin", "--crate-name", "bulkhead_launcher"])
        .args(["--target", &target])
        .args(["-C", "opt-level=s", "-C", "panic=abort", "-C", "debuginfo=0", "-C", "strip=symbols"])
        // Position-dependent and static: no relocations, so nothing in the image is written.
        .args(["-C", "relocation-model=static", "-C", "target-feature=+crt-static"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("running rustc for the launcher");
    assert!(status.success(), "compiling {} failed", src.display());
}
