//! Helpers for tests that boot the Linux guest (`guests/linux`): a running VM whose console is
//! read as it arrives and typed into, and the guest-side tests' result lines.
//!
//! A guest-side test (`bulkhead.test=NAME` on the kernel command line, or `bulkhead-test NAME`
//! typed at the guest's shell) ends in one console line:
//!
//! ```text
//! bulkhead-result: test=NAME status=pass|fail|error seconds=N KEY=VALUE ... end
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Finished, NetNs};

/// The prefix of a guest-side test's result line.
pub const RESULT_PREFIX: &str = "bulkhead-result: ";

/// One guest-side test's result line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestResult {
    /// The test's name.
    pub test: String,
    /// `pass`, `fail` or `error`.
    pub status: String,
    /// Every other `KEY=VALUE` of the line.
    pub facts: BTreeMap<String, String>,
    /// The line as printed.
    pub line: String,
}

impl GuestResult {
    /// The fact `key`, or a test failure naming the line.
    pub fn fact(&self, key: &str) -> &str {
        self.facts.get(key).map_or_else(|| panic!("no {key}= in `{}`", self.line), String::as_str)
    }

    /// Whether the test passed.
    pub fn passed(&self) -> bool {
        self.status == "pass"
    }
}

/// Parses one result line (without its `\r`). `None` if it is not one; `Some(Err)` if it starts
/// like one but is damaged (no `end`, a word that is not `KEY=VALUE`, no test or status).
pub fn parse_result_line(line: &str) -> Option<Result<GuestResult, String>> {
    let rest = line.strip_prefix(RESULT_PREFIX)?;
    let mut words: Vec<&str> = rest.split(' ').filter(|w| !w.is_empty()).collect();
    if words.pop() != Some("end") {
        return Some(Err(format!("result line without `end`: `{line}`")));
    }
    let mut facts = BTreeMap::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Some(Err(format!("`{w}` is not KEY=VALUE in `{line}`")));
        };
        facts.insert(k.to_string(), v.to_string());
    }
    let (Some(test), Some(status)) = (facts.remove("test"), facts.remove("status")) else {
        return Some(Err(format!("no test= or status= in `{line}`")));
    };
    Some(Ok(GuestResult { test, status, facts, line: line.to_string() }))
}

/// Every result line of `console` (a guest console transcript), in order.
pub fn guest_results(console: &str) -> Vec<Result<GuestResult, String>> {
    console.lines().filter_map(|l| parse_result_line(l.trim_end_matches('\r'))).collect()
}

/// The result of the guest-side test `test` in `console`: exactly one well-formed line, or a
/// test failure that shows the console.
pub fn guest_result(console: &str, test: &str) -> GuestResult {
    let all = guest_results(console);
    let mine: Vec<&Result<GuestResult, String>> =
        all.iter().filter(|r| r.as_ref().map_or(true, |g| g.test == test)).collect();
    match mine.as_slice() {
        [Ok(r)] => r.clone(),
        [] => panic!("no result line for guest test {test}\n--- console\n{console}"),
        _ => panic!("expected one well-formed result line for guest test {test}, got {mine:?}\n--- console\n{console}"),
    }
}

/// Runs `e2fsck -fn` on `image` and returns its exit status and output (0: clean).
pub fn e2fsck(image: &Path) -> (i32, String) {
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().expect("run e2fsck (e2fsprogs)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The contents of the file `path` inside the ext4 image `image`, read on the host with
/// `debugfs` (e2fsprogs; nothing is mounted) through the scratch file `via`.
pub fn ext4_read_file(image: &Path, path: &str, via: &Path) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", via.display()))
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert!(out.status.success(), "debugfs dump {path}: {}", String::from_utf8_lossy(&out.stderr));
    let data = std::fs::read(via).unwrap_or_else(|e| panic!("debugfs did not dump {path}: {e}"));
    let _ = std::fs::remove_file(via);
    data
}

/// The ext4 superblock's mount count (`s_mnt_count`: u16 at byte 0x34 of the superblock at 1024).
pub fn ext4_mount_count(image: &Path) -> u16 {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(image).expect("open image");
    let mut sb = [0u8; 0x3a];
    f.seek(SeekFrom::Start(1024)).expect("seek");
    f.read_exact(&mut sb).expect("read superblock");
    assert_eq!(u16::from_le_bytes([sb[0x38], sb[0x39]]), 0xef53, "not an ext4 image");
    u16::from_le_bytes([sb[0x34], sb[0x35]])
}

/// A `bulkhead run` in progress whose guest console (stdout) and log (stderr) are collected as
/// they arrive, and whose stdin is the guest's serial input.
pub struct LiveVm {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    /// The VM's API socket, if its command line names one (`--api-sock`, or `--id`).
    api_sock: Option<std::path::PathBuf>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into.lock().expect("console buffer").extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl LiveVm {
    /// Spawns `cmd` (a [`crate::bulkhead`] command) with stdin piped, inside `ns` if given.
    pub fn spawn(cmd: &mut Command, ns: Option<&NetNs>) -> Self {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let after = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let api_sock = after("--api-sock")
            .map(std::path::PathBuf::from)
            .or_else(|| after("--id").map(|id| std::path::PathBuf::from(format!("/run/bulkhead/{id}.sock"))));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match ns {
            Some(ns) => ns.spawn(cmd),
            None => cmd.spawn().expect("spawn bulkhead"),
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout piped"), console.clone()),
            collect(child.stderr.take().expect("stderr piped"), log.clone()),
        ];
        Self { stdin: child.stdin.take(), child, console, log, readers, api_sock }
    }

    /// The core's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().expect("console buffer")).into_owned()
    }

    /// The core's and the services' log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().expect("log buffer")).into_owned()
    }

    /// Both, and (while the VM runs) each device's live state, for assertion messages.
    pub fn context(&self) -> String {
        format!("--- console\n{}\n--- log\n{}\n--- devices\n{}", self.console(), self.log(), self.device_states())
    }

    /// Every vCPU's and device's live state as `bulkhead inspect --vcpus` and `--device` print
    /// them (where the guest was, its pending interrupts, what the services' registers and the
    /// guest's virtqueues held when a wait ran out), or why there is none.
    pub fn device_states(&self) -> String {
        let Some(sock) = self.api_sock.clone().filter(|s| s.exists()) else {
            return format!("(no API socket: {:?})", self.api_sock);
        };
        let (code, body) = crate::curl(&sock, "GET", "/bulkhead/devices", None);
        let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.iter().filter_map(|d| d["id"].as_str().map(String::from)).collect()))
            .unwrap_or_default();
        if code != 200 || ids.is_empty() {
            return format!("(GET /bulkhead/devices: {code} {body})");
        }
        let vm = sock.to_string_lossy().into_owned();
        let inspect = |what: &[&str]| {
            let o = crate::bulkhead_cli(&[&["inspect", vm.as_str()], what].concat());
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        };
        let mut out = format!("vcpus: {}\n", inspect(&["--vcpus"]));
        for id in ids {
            out.push_str(&format!("{id}: {}\n", inspect(&["--device", &id])));
        }
        out
    }

    /// Waits (at most `limit`) until the console holds `needle` after byte `from`; returns the
    /// byte offset just past it. `None` on timeout or if the VM ended first.
    pub fn wait_console_from(&mut self, from: usize, needle: &str, limit: Duration) -> Option<usize> {
        let start = Instant::now();
        loop {
            {
                let buf = self.console.lock().expect("console buffer");
                let hay = buf.get(from..).unwrap_or_default();
                if let Some(at) = hay.windows(needle.len()).position(|w| w == needle.as_bytes()) {
                    return Some(from + at + needle.len());
                }
            }
            if start.elapsed() > limit || self.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Bytes of console output so far.
    pub fn console_len(&self) -> usize {
        self.console.lock().expect("console buffer").len()
    }

    /// Types `line` and a carriage return on the guest's serial input, a byte at a time with a
    /// short pause (a terminal user is not faster, and the UART's FIFO is 64 bytes).
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        for chunk in line.as_bytes().chunks(16).chain(std::iter::once(&b"\r"[..])) {
            stdin.write_all(chunk).expect("write to bulkhead's stdin");
            stdin.flush().expect("flush bulkhead's stdin");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) for the VM to end, closing its input first; kills it and fails
    /// the test past that.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > limit {
                let context = self.context();
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("bulkhead still running after {limit:?}\n{context}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(self.stdin.take());
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished { status, stdout: self.console(), stderr: self.log() }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        // A test that failed half-way must not leave its VM running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse_and_damage_is_reported() {
        let console =
            "noise\r\nbulkhead-result: test=disk-verify status=pass seconds=41 size_mib=16 io_errors=0 end\r\n\
                       bulkhead-result: test=x status=fail reason=checksum_mismatch\n\
                       bulkhead-result: test=y status=pass [ 1.0 ] end\n";
        let all = guest_results(console);
        assert_eq!(all.len(), 3);
        let r = all[0].as_ref().expect("first is well-formed");
        assert_eq!((r.test.as_str(), r.status.as_str()), ("disk-verify", "pass"));
        assert_eq!(r.fact("io_errors"), "0");
        assert_eq!(r.facts.len(), 3);
        assert!(r.passed());
        assert!(all[1].as_ref().is_err_and(|e| e.contains("without `end`")));
        assert!(all[2].as_ref().is_err_and(|e| e.contains("not KEY=VALUE")));
        // A damaged line may be the test's own, so it makes the lookup fail; a clean one is found.
        assert!(std::panic::catch_unwind(|| guest_result(console, "disk-verify")).is_err());
        let clean = "noise\r\nbulkhead-result: test=disk-verify status=pass seconds=41 end\r\n";
        assert_eq!(guest_result(clean, "disk-verify").fact("seconds"), "41");
        assert!(std::panic::catch_unwind(|| guest_result(clean, "net-tcp")).is_err());
        assert!(parse_result_line("bulkhead-result: status=pass end").is_some_and(|r| r.is_err()));
        assert!(parse_result_line("  bulkhead-result: test=a status=pass end").is_none());
    }
}
