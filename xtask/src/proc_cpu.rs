//! CPU time of a peer's processes while a benchmark runs: per thread from
//! `/proc/PID/task/*/schedstat` (sampled, so a thread's figure is its last sample), split into
//! vCPU threads and the rest (the device work of a VMM that runs its devices in-process), and the
//! whole process from `wait4`'s rusage when it is reaped.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::BoxError;

/// Whether a thread name is a vCPU's: QEMU's `CPU 0/KVM` (with `-name ...,debug-threads=on`),
/// Firecracker's `fc_vcpu 0`.
pub fn is_vcpu_thread(comm: &str) -> bool {
    comm.contains("/KVM") || comm.starts_with("fc_vcpu")
}

/// The latest CPU time seen per thread of the processes sampled.
#[derive(Debug, Default, Clone)]
pub struct ThreadCpu {
    /// `(pid, tid)` -> (is a vCPU thread, ns).
    seen: HashMap<(u32, String), (bool, u64)>,
}

impl ThreadCpu {
    /// Samples every thread of `pid` (nothing if it is gone).
    pub fn sample(&mut self, pid: u32) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
        for e in dir.flatten() {
            let p = e.path();
            let tid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()));
            // kvm-nx-lpage-recovery is a kernel worker KVM attaches to the VM's process.
            if let (Some(ns), false) = (ns, comm.starts_with("kvm-nx")) {
                self.seen.insert((pid, tid), (is_vcpu_thread(comm.trim()), ns));
            }
        }
    }

    /// CPU of the threads that are not vCPUs, or `None` if no vCPU thread was recognised (then
    /// the split is unknown, and nothing is better than the whole process under another name).
    pub fn non_vcpu_ns(&self) -> Option<u64> {
        self.seen
            .values()
            .any(|(vcpu, _)| *vcpu)
            .then(|| self.seen.values().filter(|(vcpu, _)| !vcpu).map(|(_, ns)| ns).sum())
    }

    /// CPU of every thread sampled.
    pub fn total_ns(&self) -> u64 {
        self.seen.values().map(|(_, ns)| ns).sum()
    }
}

/// Reaps `pid` if it exited (`block`: waits), returning its wait status and CPU time in ns
/// (its own and that of the children it reaped).
pub fn reap(pid: libc::pid_t, block: bool) -> Result<Option<(i32, u64)>, BoxError> {
    let mut status = 0i32;
    // SAFETY: rusage is plain data; all-zero is valid and the kernel overwrites it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `ru` are live, writable and of the types wait4 expects; `pid` is our
    // own child, not yet reaped (only this function reaps it).
    let rc = unsafe { libc::wait4(pid, &raw mut status, if block { 0 } else { libc::WNOHANG }, &raw mut ru) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(None);
        }
        return Err(format!("wait4 {pid}: {e}").into());
    }
    if rc == 0 {
        return Ok(None);
    }
    let tv = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0).saturating_mul(1_000_000_000)
            + u64::try_from(t.tv_usec).unwrap_or(0) * 1000
    };
    Ok(Some((status, tv(ru.ru_utime) + tv(ru.ru_stime))))
}

/// Reads `r` to its end on a thread of its own, returning all of it; each line is also sent on
/// `lines`, if given, as it arrives.
pub fn drain<R: Read + Send + 'static>(
    r: R,
    lines: Option<std::sync::mpsc::Sender<String>>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
        all
    })
}

/// A finished run.
#[derive(Debug)]
pub struct Finished {
    /// The exit code, `None` if a signal ended it.
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// Its whole CPU time (rusage) in ns.
    pub cpu_ns: u64,
    /// Its threads, sampled every 10 ms while it ran.
    pub threads: ThreadCpu,
}

/// Runs `cmd` (stdout and stderr captured) for at most `limit`, sampling its threads; `what`
/// names it in errors.
pub fn run_sampled(cmd: &mut Command, limit: Duration, what: &str) -> Result<Finished, BoxError> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let pid = child.id();
    let cpid = libc::pid_t::try_from(pid)?;
    let out = drain(child.stdout.take().ok_or("no stdout")?, None);
    let err = drain(child.stderr.take().ok_or("no stderr")?, None);
    let mut threads = ThreadCpu::default();
    let start = Instant::now();
    let (status, cpu_ns) = loop {
        threads.sample(pid);
        if let Some(done) = reap(cpid, false)? {
            break done;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = reap(cpid, true);
            let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            return Err(format!("{what} still running after {limit:?}\n{stdout}\n{stderr}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().map_err(|_| "stdout reader panicked")?;
    let stderr = err.join().map_err(|_| "stderr reader panicked")?;
    let code = if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None };
    Ok(Finished { code, stdout, stderr, cpu_ns, threads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_vcpu_threads() {
        assert!(is_vcpu_thread("CPU 0/KVM"));
        assert!(is_vcpu_thread("fc_vcpu 0"));
        assert!(!is_vcpu_thread("firecracker"));
        assert!(!is_vcpu_thread("qemu-system-x86"));
    }

    #[test]
    fn runs_and_samples_a_process() {
        let f = run_sampled(
            Command::new("sh").args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done; exit 3"]),
            Duration::from_secs(30),
            "sh",
        )
        .expect("run");
        assert_eq!(f.code, Some(3));
        assert_eq!(f.stdout, "done\n");
        assert!(f.cpu_ns > 0);
        // No vCPU thread in a shell: the split is unknown.
        assert_eq!(f.threads.non_vcpu_ns(), None);
    }
}
