//! Network namespaces for the tasks that run VMs with a `--net` device (`cargo xtask run`, the
//! net benchmark): created with `ip netns add`, deleted on drop with everything in them.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::BoxError;

/// A network namespace of our own, deleted on drop (TAPs in it go with it).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Deletes namespaces `<prefix><pid>` whose process is gone (left by a killed earlier run),
    /// then creates `<prefix><our pid>` with IPv6 off (no router solicitations or MLD reports on
    /// its interfaces) and its loopback up.
    pub fn new(prefix: &str) -> Result<Self, BoxError> {
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                let Some(pid) = name.strip_prefix(prefix) else { continue };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
        let name = format!("{prefix}{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind mount, for `setns`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<(), BoxError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `inner` (program and arguments; nothing else of it is kept) run inside the namespace:
    /// `nsenter --net=/var/run/netns/NAME program args...`, which execs, so the child's pid is
    /// `inner`'s. Only the network namespace changes (`ip netns exec` also mounts a sysfs of its
    /// own over /sys, hiding the cgroup file systems a VMM puts its VM's cgroup in).
    pub fn command(&self, inner: &Command) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(inner.get_program()).args(inner.get_args());
        c
    }

    /// Runs `args` inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String, BoxError> {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(args).output()?;
        if !out.status.success() {
            return Err(format!(
                "ip netns exec {} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that entered the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> Result<R, BoxError> + Send) -> Result<R, BoxError> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| -> Result<R, String> {
                enter(&path).map_err(|e| e.to_string())?;
                f().map_err(|e| e.to_string())
            })
            .join()
            .map_err(|_| "netns thread panicked".to_string())?
            .map_err(Into::into)
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Moves the calling thread into the network namespace at `path` (`/var/run/netns/NAME`).
pub fn enter(path: &str) -> Result<(), BoxError> {
    let ns = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: setns(2) only reads the descriptor, which `ns` keeps open for the call; it changes
    // the calling thread's network namespace and nothing else.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Runs `ip args...`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), BoxError> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()).into());
    }
    Ok(())
}
