//! Test support for the `faultfs` binary (see `src/bin/faultfs.rs`): a FUSE mount that passes a
//! directory's files through and injects delays and errors into their WRITEs and FSYNCs.
//!
//! The binary is found, in this order, at `$FAULTFS_BIN`, then in the cargo target directory the
//! running test executable was built into (`target/<profile>/faultfs`, the parent of `deps/`).
//! Cargo builds a package's binaries before it runs that package's integration tests, so
//! `cargo test -p bulkhead-tests --test NAME` needs nothing else; unlike [`crate::bin_dir`], this
//! does not need the other bulkhead binaries.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long [`FaultFs::mount`] waits for the mount to go live.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dropping a [`FaultFs`] waits for the process after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `faultfs` mount; dropping it stops the process and unmounts.
#[derive(Debug)]
pub struct FaultFs {
    child: Child,
    mountpoint: PathBuf,
}

/// The `faultfs` binary.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FAULTFS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> =
        exe.ancestors().skip(1).take(2).map(|d| d.join(format!("faultfs{}", std::env::consts::EXE_SUFFIX))).collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!("no faultfs binary in {candidates:?}: build it with `cargo build -p bulkhead-tests --bin faultfs` or set FAULTFS_BIN")
    })
}

impl FaultFs {
    /// Mounts `backing` at `mountpoint` (both existing directories), with FUSE's writeback cache
    /// when `writeback_cache`, and waits (at most 10 s) until the mount is live. Panics if it
    /// does not come up.
    pub fn mount(backing: &Path, mountpoint: &Path, writeback_cache: bool) -> FaultFs {
        let mut cmd = Command::new(binary());
        cmd.arg(backing).arg(mountpoint).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        if writeback_cache {
            cmd.arg("--writeback-cache");
        }
        let mut child = cmd.spawn().expect("spawn faultfs");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            let _ = lines.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the process never blocks on a full pipe.
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        let fs = FaultFs { child, mountpoint: mountpoint.to_path_buf() };
        match rx.recv_timeout(MOUNT_TIMEOUT) {
            Ok(line) if line.starts_with("faultfs: mounted") => fs,
            Ok(line) => panic!("faultfs did not mount {}: it said {line:?}", mountpoint.display()),
            Err(e) => panic!("faultfs did not mount {} within {MOUNT_TIMEOUT:?}: {e}", mountpoint.display()),
        }
    }

    /// The path of `name` inside the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// Writes one knob line (e.g. `write-error eio`) to the control file. Panics if faultfs
    /// rejects it.
    pub fn set(&self, line: &str) {
        let ctl = self.path(".faultfs");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&ctl)
            .unwrap_or_else(|e| panic!("open {}: {e}", ctl.display()));
        f.write_all(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("faultfs rejected {line:?}: {e}"));
    }

    /// The numeric values of the control file's `key=value` pairs (counters and numeric knobs;
    /// knobs whose value is a name, such as `write_error=eio`, are left out).
    pub fn counters(&self) -> HashMap<String, u64> {
        let ctl = self.path(".faultfs");
        let text = std::fs::read_to_string(&ctl).unwrap_or_else(|e| panic!("read {}: {e}", ctl.display()));
        text.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// Whether the mount point still has a FUSE mount on it (per /proc/self/mountinfo).
    fn mounted(&self) -> bool {
        let Ok(target) = self.mountpoint.canonicalize() else {
            return false;
        };
        let target = target.as_os_str().as_bytes().to_vec();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines().any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let fstype = l.split(" - ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or("");
            fields.get(4).is_some_and(|m| unescape_mountinfo(m) == target) && fstype.starts_with("fuse")
        })
    }

    /// Sends SIGTERM and waits at most `limit` for the process; kills it past that.
    fn stop(&mut self, limit: Duration) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: `pid` is our own child, not yet reaped, so it names that process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mountinfo path field with its octal escapes (`\040` for a space) decoded.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code =
            b.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        self.stop(EXIT_TIMEOUT);
        if self.mounted() {
            let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes()) else {
                return;
            };
            // SAFETY: `c` is a NUL-terminated path that lives for the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
