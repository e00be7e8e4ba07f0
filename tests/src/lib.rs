//! Helpers for Bulkhead's end-to-end tests: they run the real `bulkhead` binary, which starts the
//! real, sandboxed service processes, exactly as a user would.
//!
//! Artefacts come from the environment `cargo xtask test` sets: `BULKHEAD_PROBE` (the probe guest
//! ELF), `BULKHEAD_VMLINUX` and `BULKHEAD_INITRAMFS` (the Linux guest). The binaries are found in
//! the cargo target directory this test executable was built into.
#![deny(missing_docs)]

pub mod faultfs;
pub mod linux;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The directory holding `bulkhead` and the service binaries (target/<profile>).
pub fn bin_dir() -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    assert!(
        dir.join("bulkhead").is_file() && dir.join("bulkhead-console").is_file(),
        "{} lacks bulkhead or bulkhead-console: run `cargo build --workspace --bins` (cargo xtask test does)",
        dir.display()
    );
    dir
}

/// `bulkhead run` arguments for the probe guest running `cmdline`, its console written to
/// `serial`, no console input, an optional disk, then `extra`.
pub fn probe_vm_args(
    serial: &std::path::Path,
    disk: Option<&std::path::Path>,
    cmdline: &str,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> =
        vec!["--kernel".into(), probe().into(), "--serial-input".into(), "none".into()];
    v.extend(["--serial-output".into(), serial.as_os_str().to_owned()]);
    if let Some(d) = disk {
        v.extend(["--disk".into(), d.as_os_str().to_owned()]);
    }
    v.extend(["--cmdline".into(), cmdline.into()]);
    v.extend(extra.iter().map(Into::into));
    v
}

/// Waits (at most `limit`) until the serial log at `path` contains `needle`.
pub fn wait_for_serial(path: &std::path::Path, needle: &str, limit: Duration) -> bool {
    wait_until(limit, || std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)))
}

/// The process of the VMM `vmm` (the pid a test started) running the service binary `binary`
/// (e.g. `bulkhead-console`): a child of its core, or after the split of a jailed start, of its
/// helper.
pub fn service_child(vmm: u32, binary: &str) -> Option<ProcInfo> {
    descendants_of(vmm).into_iter().find(|p| p.runs(binary))
}

/// A path from the environment, with a message saying how to get it when it is missing.
pub fn artefact(var: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run the tests with `cargo xtask test`, which builds the guests"));
    assert!(p.is_file(), "{var}={} does not exist", p.display());
    p
}

/// The probe guest ELF.
pub fn probe() -> PathBuf {
    artefact("BULKHEAD_PROBE")
}

/// A fresh scratch directory for one test: removed when the test passes, kept (and named on
/// stderr) when it panics, for its logs.
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("bulkhead-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    Scratch(d)
}

/// A test's scratch directory (see [`scratch`]); derefs to its path.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `bulkhead run` with `args`, stdin closed, stdout and stderr piped.
pub fn bulkhead<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(bin_dir().join("bulkhead"));
    cmd.arg("run").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// What a finished run left.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (the guest console unless redirected).
    pub stdout: String,
    /// Everything on stderr (the core's and the services' logs).
    pub stderr: String,
}

/// Waits for `child` for at most `limit`, killing it (and failing the test) past that.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Finished {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!("bulkhead still running after {limit:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() }
}

/// A VMM a test started: killed (SIGKILL) and reaped if the test ends, or panics, without
/// waiting for it, so a failing test leaves no VM running on the machine.
#[derive(Debug)]
pub struct VmChild(Option<Child>);

impl VmChild {
    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(Some(cmd.spawn().expect("spawn bulkhead")))
    }

    /// The VMM's pid (the launcher's, when a jailed core runs in a PID namespace of its own).
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// The core's pid ([`core_of`]).
    pub fn core(&self) -> u32 {
        core_of(self.id())
    }

    /// The process, for its pipes and `try_wait`.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("a running VM")
    }

    /// Waits for the VMM (at most `limit`), as [`wait_bounded`].
    pub fn finish(mut self, limit: Duration) -> Finished {
        wait_bounded(self.0.take().expect("a running VM"), limit)
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `bulkhead run args` to completion within `limit`.
pub fn run_to_end<S: AsRef<std::ffi::OsStr>>(args: &[S], limit: Duration) -> Finished {
    wait_bounded(bulkhead(args).spawn().expect("spawn bulkhead"), limit)
}

/// `curl --unix-socket SOCK -X METHOD http://localhost/PATH [-d BODY]`: (status, body).
pub fn curl(sock: &std::path::Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "30", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-H", "Accept: application/json", "-H", "Content-Type: application/json"])
        .arg(format!("http://localhost{path}"));
    if let Some(b) = body {
        cmd.arg("--data-binary").arg(b);
    }
    let out = cmd.output().expect("run curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The `fault_message` of an error body.
pub fn fault_message(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message in {body}")).to_string()
}

/// `bulkhead ARGS` (any subcommand) with stdin closed: `bulkhead` in Firecracker mode reads stdin.
pub fn bulkhead_cli(args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("bulkhead")).args(args).stdin(Stdio::null()).output().expect("run bulkhead")
}

/// A process as seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// The executable's path.
    pub exe: PathBuf,
    /// The file name of its `argv[0]`: the service it runs when it is the multi-call `bulkhead`
    /// started as `bulkhead-console`, ...
    pub name: String,
}

impl ProcInfo {
    /// Whether it runs `program`: the stand-alone binary of that name, or `bulkhead` started
    /// under it.
    pub fn runs(&self, program: &str) -> bool {
        self.name == program || self.exe.ends_with(program)
    }
}

/// The children of `parent` currently alive.
pub fn children_of(parent: u32) -> Vec<ProcInfo> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return v };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The comm field may hold spaces and parentheses: ppid is the 2nd field after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == parent {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(argv0).rsplit('/').next().unwrap_or_default().to_string();
            v.push(ProcInfo { pid, ppid, exe, name });
        }
    }
    v
}

/// The service processes of the VMM `vmm` (not its core, launcher or privileged helper).
pub fn services_of(vmm: u32) -> Vec<ProcInfo> {
    descendants_of(vmm).into_iter().filter(|p| p.name.starts_with("bulkhead-") && !p.runs("bulkhead-helper")).collect()
}

/// Every live process below `pid` (children, theirs, ...; four levels at most).
pub fn descendants_of(pid: u32) -> Vec<ProcInfo> {
    let mut out = Vec::new();
    let mut level = vec![pid];
    for _ in 0..4 {
        let next: Vec<ProcInfo> = level.iter().flat_map(|p| children_of(*p)).collect();
        level = next.iter().map(|p| p.pid).collect();
        out.extend(next);
    }
    out
}

/// The core of the VMM `vmm` (the pid a test started): `vmm` itself, or, when it started as
/// root with its jail on, the child it split off into a PID namespace of its own (the
/// launcher, `vmm`, stays outside, docs/SECURITY.md). A pid already in a nested namespace is
/// a core.
pub fn core_of(vmm: u32) -> u32 {
    let nspid_depth = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().count()))
            .unwrap_or(0)
    };
    let own = nspid_depth(vmm);
    if own > 1 {
        return vmm;
    }
    let find =
        || children_of(vmm).into_iter().find(|c| c.name == "bulkhead" && nspid_depth(c.pid) > own).map(|c| c.pid);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The split is the launcher's first step.
        wait_until(Duration::from_secs(2), || find().is_some());
    }
    find().unwrap_or(vmm)
}

/// The `(uid, gid)` the core `pid` runs as once its VM is built: as root, the VM's own ids
/// after the core's drop (waited for, at most 10 s); otherwise the caller's.
pub fn core_ids(pid: u32) -> (u32, u32) {
    let pid = core_of(pid);
    let read = || -> Option<(u32, u32)> {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let first = |key: &str| -> Option<u32> {
            st.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
        };
        Some((first("Uid:")?, first("Gid:")?))
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        wait_until(Duration::from_secs(10), || read().is_some_and(|(u, _)| u != 0));
    }
    read().unwrap_or((u32::MAX, u32::MAX))
}

/// The host directory the jailed core of the VM at `sock` sees as its root (`jail_root` of
/// `GET /bulkhead/isolation`), if it has one.
pub fn jail_root(sock: &std::path::Path) -> Option<PathBuf> {
    let (s, body) = curl(sock, "GET", "/bulkhead/isolation", None);
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["jail_root"].as_str().map(PathBuf::from)
}

/// A file given to a VM ([`give_to_vm`]): the path to name in the API; dropping it removes the
/// copy from the jail directory, and the directory once empty (the helper leaves an operator's
/// files, and with them the directory, in place).
#[derive(Debug)]
pub struct Given {
    /// The path the VM's core opens it by.
    pub path: String,
    copy: Option<PathBuf>,
}

impl Drop for Given {
    fn drop(&mut self) {
        if let Some(copy) = &self.copy {
            let _ = std::fs::remove_file(copy);
            if let Some(root) = copy.parent() {
                let _ = std::fs::remove_dir(root.join("proc"));
                if std::fs::remove_dir(root).is_ok() {
                    let _ = root.parent().map(std::fs::remove_dir);
                }
            }
        }
    }
}

/// Makes `file` available to the running VM whose core is `core` (API socket `sock`) as an
/// operator of a jailed VMM does: a copy in its jail directory, owned by the core's uid. Without
/// a jail directory, the file itself, given to the core's uid.
pub fn give_to_vm(sock: &std::path::Path, core: u32, file: &std::path::Path) -> Given {
    let (uid, gid) = core_ids(core);
    match jail_root(sock) {
        Some(root) => {
            let name = file.file_name().expect("a file name");
            let inside = root.join(name);
            std::fs::copy(file, &inside).expect("copy into the jail");
            std::os::unix::fs::chown(&inside, Some(uid), Some(gid)).expect("chown in the jail");
            Given { path: format!("/{}", name.to_string_lossy()), copy: Some(inside) }
        }
        None => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown");
            }
            Given { path: file.to_string_lossy().into_owned(), copy: None }
        }
    }
}

/// Polls `cond` every 20 ms for at most `limit`; returns whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A field of `/proc/<pid>/status` (e.g. `Seccomp`), trimmed; `None` if the process or the field
/// is gone.
pub fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    status_field(&format!("/proc/{pid}/status"), field)
}

/// A field of a thread's status: the thread of process `pid` whose name (`comm`) is `thread`.
pub fn thread_status_field(pid: u32, thread: &str, field: &str) -> Option<String> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for e in rd.flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == thread {
            return status_field(&dir.join("status").to_string_lossy(), field);
        }
    }
    None
}

fn status_field(path: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
}

/// The probe's disk pattern (guests/probe/src/pattern.rs): word `w` of sector `s` is
/// `splitmix64(seed ^ (s << 16) ^ w)`, little-endian.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sectors of `image` that do not hold the probe's pattern for `seed`.
pub fn bad_pattern_sectors(image: &std::path::Path, seed: u64) -> u64 {
    let data = std::fs::read(image).expect("read image");
    let mut bad = 0;
    for (s, sector) in data.chunks_exact(512).enumerate() {
        let s = s as u64;
        let ok = sector.chunks_exact(8).enumerate().all(|(w, b)| {
            let word: [u8; 8] = b.try_into().expect("8 bytes");
            u64::from_le_bytes(word) == splitmix64(seed ^ (s << 16) ^ w as u64)
        });
        bad += u64::from(!ok);
    }
    bad
}

/// A network namespace of its own for one test, so TAPs, bridges and packet sockets never touch
/// the host's (or another test's) network. Created by [`NetNs::new`] with IPv6 off (no router
/// solicitations or MLD reports on the test's links); deleted on drop, also when the test fails.
/// Needs root (CAP_SYS_ADMIN) and `ip` from iproute2.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static NETNS_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl NetNs {
    /// Creates the namespace `bh-<tag>-<pid>-<n>` (unique per test process and call).
    pub fn new(tag: &str) -> Self {
        let n = NETNS_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bh-{tag}-{}-{n}", std::process::id());
        let st = Command::new("ip").args(["netns", "add", &name]).status().expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed (needs root / CAP_SYS_ADMIN)");
        let ns = Self { name };
        ns.run(|| {
            // /proc/sys/net is the namespace of the thread that opens it: this thread's.
            for conf in ["all", "default"] {
                let p = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                // A kernel without IPv6 has no such file, and nothing to silence.
                if std::path::Path::new(&p).exists() {
                    std::fs::write(&p, "1").unwrap_or_else(|e| panic!("write {p}: {e}"));
                }
            }
        });
        ns
    }

    /// The namespace's name (as `ip netns` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> args...` and returns what it printed; fails the test if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").arg("-n").arg(&self.name).args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether a link called `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Creates a persistent TAP `dev` (with a virtio-net header, as `bulkhead run --net` opens
    /// it) and sets it up.
    pub fn add_tap(&self, dev: &str) {
        self.ip(&["tuntap", "add", "dev", dev, "mode", "tap", "vnet_hdr"]);
        self.ip(&["link", "set", dev, "up"]);
    }

    /// Runs `f` on a thread that entered the namespace, and returns its result. Sockets `f`
    /// opens stay in the namespace when used from other threads; processes `f` spawns start in it.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let entry = self.entry();
        std::thread::scope(|s| {
            s.spawn(|| {
                entry.enter();
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    /// A handle that moves the calling thread into this namespace, for threads that live on
    /// (a server's worker); [`NetNs::run`] is the way for one call.
    pub fn entry(&self) -> NetNsEntry {
        NetNsEntry { path: format!("/var/run/netns/{}", self.name) }
    }

    /// Spawns `cmd` inside the namespace.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        self.run(|| cmd.spawn().expect("spawn in netns"))
    }
}

/// See [`NetNs::entry`].
#[derive(Debug, Clone)]
pub struct NetNsEntry {
    path: String,
}

impl NetNsEntry {
    /// Moves the calling thread (only it) into the namespace; fails the test if it cannot.
    pub fn enter(&self) {
        let path = &self.path;
        let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) only reads the descriptor, which `ns` keeps open for the call; it
        // changes the calling thread's network namespace only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Links in it (TAPs, bridges) go with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The host's TSC rate in kHz (what the probe's `probe.tsc_khz=` wants), measured once per test
/// process over 200 ms against the monotonic clock and cached. The guest reads the same TSC.
pub fn tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let t0 = tsc_and_clock();
        std::thread::sleep(Duration::from_millis(200));
        let t1 = tsc_and_clock();
        let ns = t1.1.duration_since(t0.1).as_nanos().max(1);
        // cycles × 10⁶ / ns = cycles per millisecond = kHz.
        let khz = u128::from(t1.0.wrapping_sub(t0.0)) * 1_000_000 / ns;
        let khz = u64::try_from(khz).expect("TSC rate fits in u64");
        assert!(khz > 0, "the TSC did not advance over 200 ms");
        khz
    })
}

/// A TSC reading and the monotonic clock taken together: of 32 tries, the one whose clock read
/// took the fewest cycles (so a preemption between the two reads cannot skew the rate).
fn tsc_and_clock() -> (u64, Instant) {
    let mut best: Option<(u64, u64, Instant)> = None;
    for _ in 0..32 {
        // SAFETY: RDTSC only reads the time-stamp counter; it has no memory effects and exists
        // on every x86-64 CPU.
        let a = unsafe { std::arch::x86_64::_rdtsc() };
        let now = Instant::now();
        // SAFETY: as above.
        let b = unsafe { std::arch::x86_64::_rdtsc() };
        let gap = b.wrapping_sub(a);
        if best.is_none_or(|(g, _, _)| gap < g) {
            best = Some((gap, a / 2 + b / 2, now));
        }
    }
    let (_, tsc, now) = best.expect("at least one try");
    (tsc, now)
}

/// The number in `key=value` on the first line of `text` starting with `prefix`.
pub fn field(text: &str, prefix: &str, key: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}` in:\n{text}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}
