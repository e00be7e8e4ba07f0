//! `cargo xtask guest`: builds the Linux guest used by Bulkhead's smoke tests.
//!
//! Output (cached outside the repository, see [`CACHE_ENV`]):
//! - `vmlinux`: an ELF kernel with a PVH note, from Debian's `linux-source-6.1`, `make tinyconfig`
//!   plus `guests/linux/bulkhead.config`, patched with `guests/linux/*.patch`;
//! - `initramfs.cpio`: an uncompressed cpio (newc) archive of a busybox root file system;
//! - `rootfs.ext4`: the same tree as an ext4 image, made with `mkfs.ext4 -d` (no mount).
//!
//! The last three lines of stdout are `vmlinux=…`, `initramfs=…`, `rootfs=…` (absolute paths).
//! A run whose inputs (fragment, patches, rootfs files, kernel and busybox versions) hash to an
//! already built key prints those lines and does nothing else.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the cache directory.
const CACHE_ENV: &str = "BULKHEAD_CACHE";
/// Cache directory used when [`CACHE_ENV`] is unset.
const DEFAULT_CACHE: &str = "/var/cache/bulkhead";
/// Debian package holding the kernel source tarball.
const SOURCE_PKG: &str = "linux-source-6.1";
/// Path of the tarball inside that package.
const SOURCE_TARBALL: &str = "./usr/src/linux-source-6.1.tar.xz";
/// Top directory inside the tarball.
const SOURCE_TOPDIR: &str = "linux-source-6.1";
/// Bumped whenever the build recipe in this file changes what it produces.
const RECIPE: &str = "bulkhead-guest recipe 1: tinyconfig+fragment, ARCH=x86_64, vmlinux; \
                      busybox tree (applet links on ext4 only); newc cpio; ext4 64M";
/// Size of the ext4 image.
const EXT4_SIZE: &str = "64M";
/// Busybox binary installed by `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// Debian packages the build needs.
const PACKAGES: &[&str] = &[
    "make",
    "gcc",
    "libc6-dev",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "xz-utils",
    "patch",
    "busybox-static",
    "e2fsprogs",
];
/// Marker the patch puts into `alternative.c`; checked after patching.
const PATCH_MARKER: &str = "Bulkhead: int3_selftest() is not run";
/// The PVM user-space work-arounds: (file, marker its patch adds), checked after patching.
const WORKAROUND_MARKERS: &[(&str, &str)] = &[
    ("arch/x86/mm/fault.c", "Bulkhead: a SYSCALL that a PVM host left in user mode."),
    ("arch/x86/kernel/fpu/core.c", "Bulkhead: no FWAIT here."),
];
/// The call the patch removes; must not remain after patching.
const SELFTEST_CALL: &str = "\tint3_selftest();";
/// Upper bound for any kernel `make` invocation.
const MAKE_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// Upper bound for waiting on another `cargo xtask guest` holding the cache lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);

/// Errors of `cargo xtask guest`.
#[derive(Debug)]
pub enum GuestError {
    /// A file system operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// An external command could not be started or exited unsuccessfully.
    Command {
        /// The command line, for the message.
        cmd: String,
        /// Exit status or other detail.
        detail: String,
        /// Log file holding the command's output, if any.
        log: Option<PathBuf>,
    },
    /// Options given on the command line are invalid.
    Usage(String),
    /// The kernel configuration does not contain what the fragment asks for.
    Config(Vec<String>),
    /// Any other failed check.
    Check(String),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Io { what, .. } => write!(f, "{what}"),
            GuestError::Command { cmd, detail, log } => {
                write!(f, "`{cmd}` failed: {detail}")?;
                if let Some(log) = log {
                    write!(f, " (log: {})", log.display())?;
                }
                Ok(())
            }
            GuestError::Usage(m) => write!(f, "{m}\n{USAGE}"),
            GuestError::Config(list) => {
                write!(f, "kernel .config does not match guests/linux/bulkhead.config:\n  {}", list.join("\n  "))
            }
            GuestError::Check(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GuestError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, GuestError>;

/// Adds a description to an `io::Result`.
trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| GuestError::Io { what: what(), source })
    }
}

const USAGE: &str = "usage: cargo xtask guest [--print-paths] [--force]\n\
    \x20 (no option)    build what is missing, then print the paths\n\
    \x20 --print-paths  print the paths if already built; fail otherwise; build nothing\n\
    \x20 --force        rebuild from a fresh kernel tree even if cached\n\
    \x20 cache: $BULKHEAD_CACHE or /var/cache/bulkhead";

/// Parsed command-line options.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    print_paths: bool,
    force: bool,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    for a in args {
        match a.as_str() {
            "--print-paths" => o.print_paths = true,
            "--force" => o.force = true,
            "-h" | "--help" => return Err(GuestError::Usage("help requested".into())),
            other => return Err(GuestError::Usage(format!("unknown option `{other}`"))),
        }
    }
    if o.print_paths && o.force {
        return Err(GuestError::Usage("--print-paths and --force exclude each other".into()));
    }
    Ok(o)
}

/// Entry point of `cargo xtask guest`.
pub fn run(args: &[String]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let opts = match parse_options(args) {
        Err(GuestError::Usage(m)) if m == "help requested" => {
            println!("{USAGE}");
            return Ok(());
        }
        other => other?,
    };
    let repo = repo_root();
    let inputs = Inputs::load(&repo.join("guests/linux"))?;
    let cache = cache_dir()?;

    if opts.print_paths {
        let kver = query_candidate_version(SOURCE_PKG)?
            .ok_or_else(|| GuestError::Check(format!("{SOURCE_PKG} is unknown to apt: not built")))?;
        let bver = installed_version("busybox-static")?
            .ok_or_else(|| GuestError::Check("busybox-static is not installed: not built".into()))?;
        let key = inputs.key(&kver, &bver);
        let out = Outputs::in_dir(&cache.join("out").join(&key));
        if !out.complete() {
            return Err(GuestError::Check(format!(
                "guest not built for key {key} (looked in {}); run `cargo xtask guest`",
                out.dir.display()
            ))
            .into());
        }
        out.print()?;
        return Ok(());
    }

    let started = Instant::now();
    step("checking packages");
    let updated = ensure_packages()?;
    let kver = candidate_version(updated)?;
    let bver = installed_version("busybox-static")?
        .ok_or_else(|| GuestError::Check("busybox-static did not install".into()))?;
    let key = inputs.key(&kver, &bver);
    let out_dir = cache.join("out").join(&key);
    let out = Outputs::in_dir(&out_dir);
    if out.complete() && !opts.force {
        eprintln!("[guest] cached (key {key}, {SOURCE_PKG} {kver}, busybox {bver})");
        out.print()?;
        return Ok(());
    }

    fs::create_dir_all(&cache).ctx(|| format!("creating cache directory {}", cache.display()))?;
    let _lock = CacheLock::acquire(&cache)?;
    if out.complete() && !opts.force {
        eprintln!("[guest] built meanwhile by another run (key {key})");
        out.print()?;
        return Ok(());
    }
    clean_stale_temporaries(&cache)?;

    eprintln!("[guest] building key {key}: {SOURCE_PKG} {kver}, busybox {bver}");
    let mut timings = Vec::new();

    let t = Instant::now();
    step("fetching kernel source");
    let deb = fetch_source_deb(&cache, &kver)?;
    let src = prepare_source(&cache, &deb, &kver, &inputs, opts.force)?;
    timings.push(("source", t.elapsed()));

    let obj = cache.join("obj").join(src.file_name().unwrap_or_default());
    if opts.force && obj.exists() {
        fs::remove_dir_all(&obj).ctx(|| format!("removing {}", obj.display()))?;
    }
    fs::create_dir_all(&obj).ctx(|| format!("creating {}", obj.display()))?;
    let logs = cache.join("logs");
    fs::create_dir_all(&logs).ctx(|| format!("creating {}", logs.display()))?;
    let log = logs.join(format!("kernel-{key}.log"));
    File::create(&log).ctx(|| format!("creating {}", log.display()))?;
    eprintln!("[guest] kernel build log: {}", log.display());

    let t = Instant::now();
    step("configuring kernel (tinyconfig + bulkhead.config)");
    configure_kernel(&src, &obj, &inputs.fragment_text, &log)?;
    timings.push(("configure", t.elapsed()));

    let t = Instant::now();
    step("building vmlinux");
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
    kernel_make(&src, &obj, &[&format!("-j{jobs}"), "vmlinux"], &log)?;
    timings.push(("vmlinux", t.elapsed()));

    let t = Instant::now();
    step("building bzImage (optional)");
    let bzimage = match kernel_make(&src, &obj, &[&format!("-j{jobs}"), "bzImage"], &log) {
        Ok(()) => Some(obj.join("arch/x86/boot/bzImage")),
        Err(e) => {
            eprintln!("[guest] warning: bzImage not built ({e}); vmlinux is all that is needed");
            None
        }
    };
    timings.push(("bzImage", t.elapsed()));

    let t = Instant::now();
    step("assembling outputs");
    let tmp = cache.join("out").join(format!(".tmp-{key}-{}", std::process::id()));
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    let staged = Outputs::in_dir(&tmp);
    copy_file(&obj.join("vmlinux"), &staged.vmlinux)?;
    copy_file(&obj.join(".config"), &tmp.join("config"))?;
    if let Some(bz) = bzimage {
        copy_file(&bz, &tmp.join("bzImage"))?;
    }
    let tree = tmp.join("rootfs-tree");
    build_rootfs_tree(&tree, &inputs)?;
    step("packing initramfs.cpio");
    let cpio = cpio_from_tree(&tree)?;
    fs::write(&staged.initramfs, &cpio).ctx(|| format!("writing {}", staged.initramfs.display()))?;
    let links = add_applet_links(&tree)?;
    eprintln!("[guest] rootfs.ext4 gets {links} busybox applet links");
    step("making rootfs.ext4");
    make_ext4(&tree, &staged.rootfs)?;
    fs::remove_dir_all(&tree).ctx(|| format!("removing {}", tree.display()))?;
    timings.push(("rootfs", t.elapsed()));

    let manifest = format!(
        "key={key}\nkernel={SOURCE_PKG} {kver}\nbusybox-static={bver}\nrecipe={RECIPE}\n\
         initramfs_bytes={}\nbuild_seconds={}\n",
        cpio.len(),
        started.elapsed().as_secs()
    );
    fs::write(tmp.join("manifest.txt"), manifest).ctx(|| "writing manifest.txt".into())?;
    publish_dir(&tmp, &out_dir)?;

    let summary: Vec<String> = timings.iter().map(|(n, d)| format!("{n} {:.0}s", d.as_secs_f64())).collect();
    eprintln!("[guest] done in {:.0}s ({})", started.elapsed().as_secs_f64(), summary.join(", "));
    Outputs::in_dir(&out_dir).print()?;
    Ok(())
}

fn step(name: &str) {
    eprintln!("[guest] {name}");
}

/// The workspace root (parent of the xtask crate).
fn repo_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// The cache directory as an absolute path.
fn cache_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(CACHE_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_CACHE),
    };
    if dir.is_absolute() {
        Ok(dir)
    } else {
        let cwd = std::env::current_dir().ctx(|| "reading the current directory".into())?;
        Ok(cwd.join(dir))
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs and the cache key

/// One file of the rootfs overlay (`guests/linux/rootfs`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OverlayFile {
    /// Path relative to the rootfs root, `/`-separated.
    rel: String,
    /// Permission bits.
    mode: u32,
    /// Contents.
    data: Vec<u8>,
}

/// Everything from the repository that goes into the build.
#[derive(Debug, Clone)]
struct Inputs {
    fragment_text: String,
    /// `(file name, contents)` of the patches, in name order.
    patches: Vec<(String, Vec<u8>)>,
    overlay: Vec<OverlayFile>,
}

impl Inputs {
    fn load(dir: &Path) -> Result<Self> {
        let frag = dir.join("bulkhead.config");
        let fragment_text = fs::read_to_string(&frag).ctx(|| format!("reading {}", frag.display()))?;
        parse_fragment(&fragment_text)?;
        let mut patches = Vec::new();
        for entry in fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".patch") {
                let data = fs::read(entry.path()).ctx(|| format!("reading {name}"))?;
                patches.push((name, data));
            }
        }
        patches.sort();
        if patches.is_empty() {
            return Err(GuestError::Check(format!(
                "no *.patch in {} (the int3 selftest patch is required)",
                dir.display()
            )));
        }
        let mut overlay = Vec::new();
        let root = dir.join("rootfs");
        collect_overlay(&root, &root, &mut overlay, 0)?;
        overlay.sort_by(|a, b| a.rel.cmp(&b.rel));
        if !overlay.iter().any(|f| f.rel == "init") {
            return Err(GuestError::Check(format!("{} has no `init`", root.display())));
        }
        Ok(Inputs { fragment_text, patches, overlay })
    }

    /// The cache key: a sha256 over the recipe, the fragment, the patches, the rootfs
    /// overlay and the kernel source and busybox versions (first 16 hex digits).
    fn key(&self, kernel_version: &str, busybox_version: &str) -> String {
        let mut h = Sha256::new();
        let mut field = |name: &str, data: &[u8]| {
            h.update(name.as_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        };
        field("recipe", RECIPE.as_bytes());
        field("kernel", format!("{SOURCE_PKG} {kernel_version}").as_bytes());
        field("busybox", busybox_version.as_bytes());
        field("fragment", self.fragment_text.as_bytes());
        for (name, data) in &self.patches {
            field("patch", name.as_bytes());
            field("patch-data", data);
        }
        for f in &self.overlay {
            field("rootfs", f.rel.as_bytes());
            field("rootfs-mode", &f.mode.to_le_bytes());
            field("rootfs-data", &f.data);
        }
        let digest = h.finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

fn collect_overlay(root: &Path, dir: &Path, out: &mut Vec<OverlayFile>, depth: u32) -> Result<()> {
    if depth > 16 {
        return Err(GuestError::Check(format!("{} nests too deep", dir.display())));
    }
    for entry in fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
        let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).ctx(|| format!("stat {}", path.display()))?;
        if meta.is_dir() {
            collect_overlay(root, &path, out, depth + 1)?;
        } else if meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| GuestError::Check(format!("{} outside rootfs", path.display())))?
                .to_string_lossy()
                .into_owned();
            let data = fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
            out.push(OverlayFile { rel, mode: meta.mode() & 0o7777, data });
        } else {
            return Err(GuestError::Check(format!(
                "{}: only regular files and directories are supported in the rootfs overlay",
                path.display()
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Packages

/// Runs a command to completion with inherited stdio except stdout, which goes to stderr
/// (stdout is reserved for the result paths).
fn run_visible(cmd: &mut Command) -> Result<()> {
    let desc = describe(cmd);
    let stdout = stderr_as_stdio().ctx(|| format!("redirecting output of `{desc}`"))?;
    let status = cmd.stdout(stdout).status().ctx(|| format!("starting `{desc}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(GuestError::Command { cmd: desc, detail: status.to_string(), log: None })
    }
}

/// A duplicate of our stderr, to serve as a child's stdout.
fn stderr_as_stdio() -> io::Result<Stdio> {
    use std::os::fd::AsFd;
    Ok(Stdio::from(io::stderr().as_fd().try_clone_to_owned()?))
}

/// Runs a command and returns its stdout; stderr is inherited.
fn capture(cmd: &mut Command) -> Result<(bool, String)> {
    let desc = describe(cmd);
    let out = cmd.stderr(Stdio::inherit()).output().ctx(|| format!("starting `{desc}`"))?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The installed version of a Debian package, if it is installed.
fn installed_version(pkg: &str) -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", pkg])
        .stderr(Stdio::null())
        .output()
        .ctx(|| "starting dpkg-query".into())?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_once('|') {
        Some((status, version)) if status.starts_with("ii") && !version.is_empty() => {
            Ok(Some(version.trim().to_string()))
        }
        _ => Ok(None),
    }
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive").args(["-q", "-o", "DPkg::Lock::Timeout=900"]);
    c
}

/// Installs the missing packages. Returns whether `apt-get update` ran.
fn ensure_packages() -> Result<bool> {
    let mut missing = Vec::new();
    for p in PACKAGES {
        if installed_version(p)?.is_none() {
            missing.push(*p);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    eprintln!("[guest] installing {}", missing.join(" "));
    run_visible(apt_get().arg("update"))?;
    run_visible(apt_get().args(["install", "-y", "--no-install-recommends"]).args(&missing))?;
    for p in &missing {
        if installed_version(p)?.is_none() {
            return Err(GuestError::Check(format!("package {p} is still not installed")));
        }
    }
    Ok(true)
}

/// The version apt would download, if apt knows the package.
fn query_candidate_version(pkg: &str) -> Result<Option<String>> {
    let (ok, text) = capture(Command::new("apt-cache").args(["show", "--no-all-versions", pkg]).stderr(Stdio::null()))?;
    if !ok {
        return Ok(None);
    }
    Ok(text.lines().find_map(|l| l.strip_prefix("Version:")).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
}

fn candidate_version(updated: bool) -> Result<String> {
    if let Some(v) = query_candidate_version(SOURCE_PKG)? {
        return Ok(v);
    }
    if !updated {
        run_visible(apt_get().arg("update"))?;
        if let Some(v) = query_candidate_version(SOURCE_PKG)? {
            return Ok(v);
        }
    }
    Err(GuestError::Check(format!("apt has no {SOURCE_PKG} (is a bookworm source in /etc/apt/sources.list?)")))
}

// ---------------------------------------------------------------------------------------------
// Cache plumbing

/// An exclusive lock on the cache: a file holding our pid, removed on drop.
struct CacheLock {
    path: PathBuf,
}

impl CacheLock {
    fn acquire(cache: &Path) -> Result<Self> {
        let path = cache.join("lock");
        let start = Instant::now();
        let mut told = false;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).ctx(|| format!("writing {}", path.display()))?;
                    return Ok(CacheLock { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .ok()
                        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive {
                        eprintln!("[guest] removing stale lock {} ({holder:?})", path.display());
                        match fs::remove_file(&path) {
                            Ok(()) => continue,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => {
                                return Err(GuestError::Io {
                                    what: format!("removing stale lock {}", path.display()),
                                    source: e,
                                })
                            }
                        }
                    }
                    if start.elapsed() > LOCK_TIMEOUT {
                        return Err(GuestError::Check(format!(
                            "cache lock {} held by pid {} for too long",
                            path.display(),
                            holder.trim()
                        )));
                    }
                    if !told {
                        eprintln!("[guest] waiting for pid {} (lock {})", holder.trim(), path.display());
                        told = true;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(GuestError::Io { what: format!("creating lock {}", path.display()), source: e }),
            }
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Removes `.tmp-*` leftovers of interrupted runs (called with the lock held).
fn clean_stale_temporaries(cache: &Path) -> Result<()> {
    for sub in ["downloads", "src", "out"] {
        let dir = cache.join(sub);
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let p = entry.path();
                eprintln!("[guest] removing leftover {}", p.display());
                remove_any(&p)?;
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(p).ctx(|| format!("stat {}", p.display()))?;
    if meta.is_dir() {
        fs::remove_dir_all(p).ctx(|| format!("removing {}", p.display()))
    } else {
        fs::remove_file(p).ctx(|| format!("removing {}", p.display()))
    }
}

/// Moves a fully built temporary directory to its final name, replacing an older one.
fn publish_dir(tmp: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        let parent = dest.parent().unwrap_or(Path::new("."));
        let old = parent.join(format!(".tmp-old-{}", std::process::id()));
        fs::rename(dest, &old).ctx(|| format!("moving away {}", dest.display()))?;
        fs::rename(tmp, dest).ctx(|| format!("publishing {}", dest.display()))?;
        fs::remove_dir_all(&old).ctx(|| format!("removing {}", old.display()))?;
    } else {
        fs::rename(tmp, dest).ctx(|| format!("publishing {}", dest.display()))?;
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).map(|_| ()).ctx(|| format!("copying {} to {}", from.display(), to.display()))
}

/// The three published files.
struct Outputs {
    dir: PathBuf,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    rootfs: PathBuf,
}

impl Outputs {
    fn in_dir(dir: &Path) -> Self {
        Outputs {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            rootfs: dir.join("rootfs.ext4"),
        }
    }

    fn complete(&self) -> bool {
        [&self.vmlinux, &self.initramfs, &self.rootfs].iter().all(|p| p.is_file())
    }

    fn print(&self) -> Result<()> {
        let abs = |p: &Path| fs::canonicalize(p).ctx(|| format!("resolving {}", p.display()));
        let text = format!(
            "vmlinux={}\ninitramfs={}\nrootfs={}\n",
            abs(&self.vmlinux)?.display(),
            abs(&self.initramfs)?.display(),
            abs(&self.rootfs)?.display()
        );
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).ctx(|| "writing to stdout".into())
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel source

fn sanitize(v: &str) -> String {
    v.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '+' { c } else { '_' }).collect()
}

/// Downloads `linux-source-6.1` (exact version) into the cache, once.
fn fetch_source_deb(cache: &Path, version: &str) -> Result<PathBuf> {
    let dir = cache.join("downloads");
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let deb = dir.join(format!("{SOURCE_PKG}_{}_all.deb", sanitize(version)));
    if deb.is_file() {
        eprintln!("[guest] have {}", deb.display());
        return Ok(deb);
    }
    let tmp = dir.join(format!(".tmp-dl-{}", std::process::id()));
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    run_visible(
        apt_get()
            .args(["-o", "APT::Sandbox::User=root", "download"])
            .arg(format!("{SOURCE_PKG}={version}"))
            .current_dir(&tmp),
    )?;
    let mut debs = Vec::new();
    for entry in fs::read_dir(&tmp).ctx(|| format!("listing {}", tmp.display()))? {
        let entry = entry.ctx(|| format!("listing {}", tmp.display()))?;
        if entry.file_name().to_string_lossy().ends_with(".deb") {
            debs.push(entry.path());
        }
    }
    let [got] = debs.as_slice() else {
        return Err(GuestError::Check(format!("apt-get download left {} .deb files in {}", debs.len(), tmp.display())));
    };
    fs::rename(got, &deb).ctx(|| format!("moving {} into place", got.display()))?;
    fs::remove_dir_all(&tmp).ctx(|| format!("removing {}", tmp.display()))?;
    Ok(deb)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Extracts the kernel source from the .deb and applies the patches; the patched tree is
/// published under `src/` only once everything succeeded. Returns its path.
fn prepare_source(cache: &Path, deb: &Path, version: &str, inputs: &Inputs, force: bool) -> Result<PathBuf> {
    let mut patch_hash = Sha256::new();
    for (name, data) in &inputs.patches {
        patch_hash.update(name.as_bytes());
        patch_hash.update(sha256_hex(data).as_bytes());
    }
    let ph: String = patch_hash.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let srcroot = cache.join("src");
    fs::create_dir_all(&srcroot).ctx(|| format!("creating {}", srcroot.display()))?;
    let dest = srcroot.join(format!("linux-{}-p{ph}", sanitize(version)));
    if dest.is_dir() && !force {
        eprintln!("[guest] have patched source {}", dest.display());
        verify_patched(&dest)?;
        return Ok(dest);
    }
    let tmp = srcroot.join(format!(".tmp-src-{}", std::process::id()));
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    step("extracting kernel source");
    extract_tarball_from_deb(deb, &tmp)?;
    let tree = tmp.join(SOURCE_TOPDIR);
    if !tree.join("Makefile").is_file() {
        return Err(GuestError::Check(format!("{} has no {SOURCE_TOPDIR}/Makefile", deb.display())));
    }
    for (name, data) in &inputs.patches {
        apply_patch(&tree, name, data)?;
    }
    verify_patched(&tree)?;
    if dest.exists() {
        remove_any(&dest)?;
    }
    fs::rename(&tree, &dest).ctx(|| format!("publishing {}", dest.display()))?;
    fs::remove_dir_all(&tmp).ctx(|| format!("removing {}", tmp.display()))?;
    Ok(dest)
}

/// `dpkg-deb --fsys-tarfile DEB | tar -xO TARBALL | tar -xJ -C DIR`, checking all three.
fn extract_tarball_from_deb(deb: &Path, dir: &Path) -> Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .ctx(|| "starting dpkg-deb".into())?;
    let dpkg_out = dpkg.stdout.take().ok_or_else(|| GuestError::Check("dpkg-deb has no stdout".into()))?;
    let mut tar1 = Command::new("tar")
        .args(["-xO", SOURCE_TARBALL])
        .stdin(Stdio::from(dpkg_out))
        .stdout(Stdio::piped())
        .spawn()
        .ctx(|| "starting tar".into())?;
    let tar1_out = tar1.stdout.take().ok_or_else(|| GuestError::Check("tar has no stdout".into()))?;
    let mut tar2 = Command::new("tar")
        .arg("-xJ")
        .arg("-C")
        .arg(dir)
        .stdin(Stdio::from(tar1_out))
        .spawn()
        .ctx(|| "starting tar".into())?;
    let results = [("dpkg-deb --fsys-tarfile", dpkg.wait()), ("tar -xO", tar1.wait()), ("tar -xJ", tar2.wait())];
    for (name, r) in results {
        let status = r.ctx(|| format!("waiting for {name}"))?;
        if !status.success() {
            return Err(GuestError::Command {
                cmd: format!("{name} ({})", deb.display()),
                detail: status.to_string(),
                log: None,
            });
        }
    }
    Ok(())
}

fn patch_cmd(tree: &Path, patch: &Path, extra: &[&str]) -> Result<bool> {
    let status = Command::new("patch")
        .args(["-p1", "-s", "-f", "--no-backup-if-mismatch", "-i"])
        .arg(patch)
        .args(extra)
        .current_dir(tree)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ctx(|| "starting patch".into())?;
    Ok(status.success())
}

/// Applies one patch unless it is already applied; fails if it applies neither way.
fn apply_patch(tree: &Path, name: &str, data: &[u8]) -> Result<()> {
    let pfile = tree.join(format!(".bulkhead-{name}"));
    fs::write(&pfile, data).ctx(|| format!("writing {}", pfile.display()))?;
    let result = (|| {
        if patch_cmd(tree, &pfile, &["-R", "--dry-run"])? {
            eprintln!("[guest] patch {name}: already applied");
            return Ok(());
        }
        if !patch_cmd(tree, &pfile, &["--forward", "--dry-run"])? {
            return Err(GuestError::Check(format!("patch {name} does not apply to {}", tree.display())));
        }
        if !patch_cmd(tree, &pfile, &["--forward"])? {
            return Err(GuestError::Check(format!("applying patch {name} failed")));
        }
        if !patch_cmd(tree, &pfile, &["-R", "--dry-run"])? {
            return Err(GuestError::Check(format!("patch {name} is not applied after applying it")));
        }
        eprintln!("[guest] patch {name}: applied");
        Ok(())
    })();
    fs::remove_file(&pfile).ctx(|| format!("removing {}", pfile.display()))?;
    result
}

/// Checks the int3 selftest is really disabled in the tree.
fn verify_patched(tree: &Path) -> Result<()> {
    let f = tree.join("arch/x86/kernel/alternative.c");
    let text = fs::read_to_string(&f).ctx(|| format!("reading {}", f.display()))?;
    check_selftest_disabled(&text).map_err(|m| GuestError::Check(format!("{}: {m}", f.display())))?;
    for (file, marker) in WORKAROUND_MARKERS {
        let f = tree.join(file);
        let text = fs::read_to_string(&f).ctx(|| format!("reading {}", f.display()))?;
        if !text.contains(marker) {
            return Err(GuestError::Check(format!("{}: work-around marker `{marker}` missing", f.display())));
        }
    }
    Ok(())
}

fn check_selftest_disabled(alternative_c: &str) -> std::result::Result<(), String> {
    if !alternative_c.contains(PATCH_MARKER) {
        return Err(format!("marker `{PATCH_MARKER}` missing"));
    }
    if alternative_c.lines().any(|l| l == SELFTEST_CALL) {
        return Err("int3_selftest() is still called".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kernel configuration and build

/// What a fragment line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// `CONFIG_X=value`.
    Value(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

/// Parses a Kconfig fragment into `symbol -> wanted value` (symbols without `CONFIG_`).
fn parse_fragment(text: &str) -> Result<BTreeMap<String, Want>> {
    let mut map = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let parsed = if let Some(rest) = line.strip_prefix("# CONFIG_") {
            rest.strip_suffix(" is not set").map(|sym| (sym.to_string(), Want::NotSet))
        } else if let Some(rest) = line.strip_prefix("CONFIG_") {
            match rest.split_once('=') {
                Some((sym, val)) if !val.is_empty() => Some((sym.to_string(), Want::Value(val.to_string()))),
                _ => return Err(GuestError::Check(format!("bulkhead.config line {}: malformed `{line}`", i + 1))),
            }
        } else if line.is_empty() || line.starts_with('#') {
            None
        } else {
            return Err(GuestError::Check(format!("bulkhead.config line {}: not a config line: `{line}`", i + 1)));
        };
        if let Some((sym, want)) = parsed {
            if sym.is_empty() || !sym.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(GuestError::Check(format!("bulkhead.config line {}: bad symbol `{sym}`", i + 1)));
            }
            if let Some(prev) = map.insert(sym.clone(), want.clone()) {
                if prev != want {
                    return Err(GuestError::Check(format!(
                        "bulkhead.config: CONFIG_{sym} given twice with different values"
                    )));
                }
            }
        }
    }
    Ok(map)
}

/// The symbol a `.config` line sets or unsets, if any.
fn config_line_symbol(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix("# CONFIG_") {
        rest.strip_suffix(" is not set")
    } else if let Some(rest) = line.strip_prefix("CONFIG_") {
        rest.split_once('=').map(|(s, _)| s)
    } else {
        None
    }
}

/// Merges a fragment into a `.config` text (what `merge_config.sh -m` does): every line for a
/// symbol of the fragment is dropped, then the fragment's lines are appended.
fn merge_config(base: &str, fragment: &BTreeMap<String, Want>) -> String {
    let mut out = String::with_capacity(base.len() + fragment.len() * 40);
    for line in base.lines() {
        if config_line_symbol(line).is_some_and(|s| fragment.contains_key(s)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("# merged from guests/linux/bulkhead.config\n");
    for (sym, want) in fragment {
        match want {
            Want::Value(v) => out.push_str(&format!("CONFIG_{sym}={v}\n")),
            Want::NotSet => out.push_str(&format!("# CONFIG_{sym} is not set\n")),
        }
    }
    out
}

/// Lists every fragment option the final `.config` does not honour.
fn config_mismatches(config: &str, fragment: &BTreeMap<String, Want>) -> Vec<String> {
    let mut actual: BTreeMap<&str, &str> = BTreeMap::new();
    for line in config.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some((sym, val)) = line.strip_prefix("CONFIG_").and_then(|r| r.split_once('=')) {
            actual.insert(sym, val);
        }
    }
    let mut bad = Vec::new();
    for (sym, want) in fragment {
        let got = actual.get(sym.as_str()).copied();
        match (want, got) {
            (Want::Value(v), Some(g)) if g == v => {}
            (Want::Value(v), Some(g)) => bad.push(format!("CONFIG_{sym}: wanted {v}, got {g}")),
            (Want::Value(v), None) => bad.push(format!("CONFIG_{sym}: wanted {v}, got not set")),
            (Want::NotSet, None) => {}
            (Want::NotSet, Some(g)) => bad.push(format!("CONFIG_{sym}: wanted not set, got {g}")),
        }
    }
    bad
}

fn configure_kernel(src: &Path, obj: &Path, fragment_text: &str, log: &Path) -> Result<()> {
    let fragment = parse_fragment(fragment_text)?;
    kernel_make(src, obj, &["tinyconfig"], log)?;
    let cfg = obj.join(".config");
    let base = fs::read_to_string(&cfg).ctx(|| format!("reading {}", cfg.display()))?;
    fs::write(&cfg, merge_config(&base, &fragment)).ctx(|| format!("writing {}", cfg.display()))?;
    kernel_make(src, obj, &["olddefconfig"], log)?;
    let done = fs::read_to_string(&cfg).ctx(|| format!("reading {}", cfg.display()))?;
    let bad = config_mismatches(&done, &fragment);
    if !bad.is_empty() {
        return Err(GuestError::Config(bad));
    }
    eprintln!("[guest] .config honours all {} options of bulkhead.config", fragment.len());
    Ok(())
}

/// Reads the last non-empty line of a log file (at most the last 4 KiB are read).
fn last_log_line(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_ok() {
            let mut buf = Vec::new();
            if f.take(4096).read_to_end(&mut buf).is_ok() {
                text = String::from_utf8_lossy(&buf).into_owned();
            }
        }
    }
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

fn tail_lines(log: &Path, n: usize) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `make -C SRC O=OBJ ARCH=x86_64 ARGS`, appending all output to `log` and printing a
/// progress line on stderr every 15 s.
fn kernel_make(src: &Path, obj: &Path, args: &[&str], log: &Path) -> Result<()> {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(src).arg(format!("O={}", obj.display())).arg("ARCH=x86_64").args(args);
    let desc = describe(&cmd);
    let mut logf =
        OpenOptions::new().append(true).create(true).open(log).ctx(|| format!("opening {}", log.display()))?;
    writeln!(logf, "\n### {desc}").ctx(|| format!("writing {}", log.display()))?;
    let err = logf.try_clone().ctx(|| format!("opening {}", log.display()))?;
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(err))
        .spawn()
        .ctx(|| format!("starting `{desc}`"))?;
    let mut last_report = Instant::now();
    let status = loop {
        match child.try_wait().ctx(|| format!("waiting for `{desc}`"))? {
            Some(s) => break s,
            None => {
                if start.elapsed() > MAKE_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(GuestError::Command {
                        cmd: desc,
                        detail: format!("timed out after {} s", MAKE_TIMEOUT.as_secs()),
                        log: Some(log.to_path_buf()),
                    });
                }
                if last_report.elapsed() >= Duration::from_secs(15) {
                    last_report = Instant::now();
                    eprintln!("[guest]   {:>4}s  {}", start.elapsed().as_secs(), last_log_line(log));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    eprintln!("[guest] ---- last lines of {} ----", log.display());
    eprintln!("{}", tail_lines(log, 30));
    Err(GuestError::Command { cmd: desc, detail: status.to_string(), log: Some(log.to_path_buf()) })
}

// ---------------------------------------------------------------------------------------------
// Root file system

/// Directories every rootfs has.
const ROOT_DIRS: &[&str] =
    &["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "tmp", "root", "run", "mnt", "var"];

/// Builds the minimal busybox tree: directories, the overlay from `guests/linux/rootfs`,
/// `/bin/busybox`, `/bin/sh` and `/sbin/init -> /init` (for a disk root).
fn build_rootfs_tree(tree: &Path, inputs: &Inputs) -> Result<()> {
    for d in ROOT_DIRS {
        let p = tree.join(d);
        fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
    }
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777)).ctx(|| "chmod tmp".into())?;
    fs::set_permissions(tree.join("root"), fs::Permissions::from_mode(0o700)).ctx(|| "chmod root".into())?;
    for f in &inputs.overlay {
        let p = tree.join(&f.rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&p, &f.data).ctx(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(f.mode)).ctx(|| format!("chmod {}", p.display()))?;
    }
    copy_file(Path::new(BUSYBOX), &tree.join("bin/busybox"))?;
    fs::set_permissions(tree.join("bin/busybox"), fs::Permissions::from_mode(0o755))
        .ctx(|| "chmod bin/busybox".into())?;
    let init_link = tree.join("sbin/init");
    if fs::symlink_metadata(&init_link).is_err() {
        symlink("/init", &init_link).ctx(|| "linking sbin/init".into())?;
    }
    let sh = tree.join("bin/sh");
    if fs::symlink_metadata(&sh).is_err() {
        symlink("/bin/busybox", &sh).ctx(|| "linking bin/sh".into())?;
    }
    Ok(())
}

/// Adds a link to `/bin/busybox` for every applet (`busybox --list-full`) that the tree
/// does not already have. Only for the ext4 image: in an initramfs every entry costs ~30 ms to
/// unpack on PVM (266 links: +13 s), so there `/init` runs `busybox --install -s` instead.
fn add_applet_links(tree: &Path) -> Result<usize> {
    let (ok, list) = capture(Command::new(BUSYBOX).arg("--list-full"))?;
    if !ok {
        return Err(GuestError::Check(format!("`{BUSYBOX} --list-full` failed")));
    }
    let mut links = 0usize;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let rel = Path::new(applet);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(GuestError::Check(format!("odd busybox applet path `{applet}`")));
        }
        let p = tree.join(rel);
        if fs::symlink_metadata(&p).is_ok() {
            continue; // ours (overlay, sbin/init, bin/sh) wins
        }
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        symlink("/bin/busybox", &p).ctx(|| format!("linking {}", p.display()))?;
        links += 1;
    }
    if links < 50 {
        return Err(GuestError::Check(format!("only {links} busybox applets: is {BUSYBOX} the static busybox?")));
    }
    Ok(links)
}

/// One entry of a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CpioEntry {
    name: String,
    /// Full `st_mode` (type and permission bits).
    mode: u32,
    /// File contents or symlink target.
    data: Vec<u8>,
    /// Device numbers for character/block devices.
    rdev: (u32, u32),
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Collects the tree (sorted, parents before children) plus `/dev/console`, which the kernel
/// opens for init's stdio before anything could create it in an initramfs.
fn cpio_from_tree(tree: &Path) -> Result<Vec<u8>> {
    let mut entries = Vec::new();
    collect_cpio(tree, tree, &mut entries, 0)?;
    entries.push(CpioEntry { name: "dev/console".into(), mode: S_IFCHR | 0o600, data: Vec::new(), rdev: (5, 1) });
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    write_newc(&entries)
}

fn collect_cpio(root: &Path, dir: &Path, out: &mut Vec<CpioEntry>, depth: u32) -> Result<()> {
    if depth > 16 {
        return Err(GuestError::Check(format!("{} nests too deep", dir.display())));
    }
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .ctx(|| format!("listing {}", dir.display()))?;
    names.sort();
    for path in names {
        let meta = fs::symlink_metadata(&path).ctx(|| format!("stat {}", path.display()))?;
        let name = path
            .strip_prefix(root)
            .map_err(|_| GuestError::Check(format!("{} outside tree", path.display())))?
            .to_string_lossy()
            .into_owned();
        let perm = meta.mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push(CpioEntry { name, mode: S_IFDIR | perm, data: Vec::new(), rdev: (0, 0) });
            collect_cpio(root, &path, out, depth + 1)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).ctx(|| format!("readlink {}", path.display()))?;
            out.push(CpioEntry {
                name,
                mode: S_IFLNK | 0o777,
                data: target.to_string_lossy().into_owned().into_bytes(),
                rdev: (0, 0),
            });
        } else if ft.is_file() {
            let data = fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
            out.push(CpioEntry { name, mode: S_IFREG | perm, data, rdev: (0, 0) });
        } else {
            return Err(GuestError::Check(format!("{}: unsupported file type in rootfs tree", path.display())));
        }
    }
    Ok(())
}

fn pad4(buf: &mut Vec<u8>) {
    while buf.len() & 3 != 0 {
        buf.push(0);
    }
}

/// Writes a cpio "newc" archive (owner root, mtime 0, one link each), with its trailer.
fn write_newc(entries: &[CpioEntry]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let trailer = CpioEntry { name: "TRAILER!!!".into(), mode: 0, data: Vec::new(), rdev: (0, 0) };
    for (i, e) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let is_trailer = i == entries.len();
        let size =
            u32::try_from(e.data.len()).map_err(|_| GuestError::Check(format!("{}: too large for cpio", e.name)))?;
        let namesize = u32::try_from(e.name.len() + 1).map_err(|_| GuestError::Check("cpio name too long".into()))?;
        let ino = if is_trailer {
            0
        } else {
            u32::try_from(i + 1).map_err(|_| GuestError::Check("too many cpio entries".into()))?
        };
        let nlink = if e.mode & 0o170000 == S_IFDIR { 2 } else { u32::from(!is_trailer) };
        let fields = [ino, e.mode, 0, 0, nlink, 0, size, 0, 0, e.rdev.0, e.rdev.1, namesize, 0];
        buf.extend_from_slice(b"070701");
        for f in fields {
            buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        buf.extend_from_slice(e.name.as_bytes());
        buf.push(0);
        pad4(&mut buf);
        buf.extend_from_slice(&e.data);
        pad4(&mut buf);
    }
    while buf.len() % 512 != 0 {
        buf.push(0);
    }
    Ok(buf)
}

fn make_ext4(tree: &Path, image: &Path) -> Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "bulkhead-root", "-E", "root_owner=0:0", "-d"]).arg(tree).arg(image).arg(EXT4_SIZE);
    run_visible(&mut cmd)?;
    let len = fs::metadata(image).ctx(|| format!("stat {}", image.display()))?.len();
    if len < 16 << 20 {
        return Err(GuestError::Check(format!("{} is only {len} bytes", image.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, rdev) of one archive member.
    type Member = (String, u32, Vec<u8>, (u32, u32));

    /// Minimal newc reader for the tests.
    fn read_newc(mut b: &[u8]) -> Vec<Member> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let total = b.len();
        loop {
            assert!(b.len() >= 110, "truncated header at {off}");
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).expect("hex");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6) as usize, field(9), field(10), field(11) as usize);
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).expect("utf8");
            assert_eq!(b[110 + namesize - 1], 0);
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            off += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.iter().all(|&x| x == 0));
                assert_eq!(total % 512, 0);
                return out;
            }
            out.push((name, mode, data, (rmaj, rmin)));
        }
    }

    #[test]
    fn newc_round_trip() {
        let entries = vec![
            CpioEntry { name: "bin".into(), mode: S_IFDIR | 0o755, data: vec![], rdev: (0, 0) },
            CpioEntry { name: "bin/sh".into(), mode: S_IFLNK | 0o777, data: b"/bin/busybox".to_vec(), rdev: (0, 0) },
            CpioEntry { name: "dev/console".into(), mode: S_IFCHR | 0o600, data: vec![], rdev: (5, 1) },
            CpioEntry {
                name: "init".into(),
                mode: S_IFREG | 0o755,
                data: b"#!/bin/sh\necho hi\n".to_vec(),
                rdev: (0, 0),
            },
        ];
        let bytes = write_newc(&entries).expect("write");
        let back = read_newc(&bytes);
        assert_eq!(back.len(), entries.len());
        for (e, (name, mode, data, rdev)) in entries.iter().zip(back) {
            assert_eq!(e.name, name);
            assert_eq!(e.mode, mode);
            assert_eq!(e.data, data);
            assert_eq!(e.rdev, rdev);
        }
    }

    #[test]
    fn cpio_from_tree_has_console_and_files() {
        let dir = std::env::temp_dir().join(format!("xtask-guest-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("dev")).expect("mkdir");
        fs::write(dir.join("init"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(dir.join("init"), fs::Permissions::from_mode(0o755)).expect("chmod");
        symlink("/init", dir.join("linit")).expect("symlink");
        let bytes = cpio_from_tree(&dir).expect("cpio");
        fs::remove_dir_all(&dir).expect("cleanup");
        let back = read_newc(&bytes);
        let names: Vec<&str> = back.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "linit"]);
        assert_eq!(back[1].1, S_IFCHR | 0o600);
        assert_eq!(back[1].3, (5, 1));
        assert_eq!(back[2].1, S_IFREG | 0o755);
        assert_eq!(back[3].2, b"/init");
    }

    #[test]
    fn fragment_parse_merge_and_verify() {
        let frag = parse_fragment("# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n\n").expect("parse");
        assert_eq!(frag.len(), 3);
        assert_eq!(frag["B"], Want::NotSet);
        let base = "CONFIG_A=n\n# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_D=y\n# CONFIG_C is not set\n";
        let merged = merge_config(base, &frag);
        assert!(merged.contains("CONFIG_D=y\n"));
        assert!(!merged.contains("CONFIG_B=y"));
        assert_eq!(merged.matches("CONFIG_A").count(), 1);
        assert!(config_mismatches(&merged, &frag).is_empty());
        // What olddefconfig does when a dependency is missing: drops or flips options.
        let after = "CONFIG_B=y\nCONFIG_C=\"x y\"\n# CONFIG_A is not set\n";
        let bad = config_mismatches(after, &frag);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].starts_with("CONFIG_A: wanted y"));
        assert!(bad[1].starts_with("CONFIG_B: wanted not set"));
    }

    #[test]
    fn fragment_rejects_garbage_and_conflicts() {
        assert!(parse_fragment("CONFIG_A\n").is_err());
        assert!(parse_fragment("FOO=y\n").is_err());
        assert!(parse_fragment("CONFIG_A=y\n# CONFIG_A is not set\n").is_err());
        assert!(parse_fragment("CONFIG_A-B=y\n").is_err());
    }

    #[test]
    fn repo_fragment_has_the_required_options() {
        let inputs = Inputs::load(&repo_root().join("guests/linux")).expect("load inputs");
        let frag = parse_fragment(&inputs.fragment_text).expect("parse");
        for sym in [
            "64BIT",
            "SMP",
            "PVH",
            "VIRTIO_MMIO",
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "VIRTIO_BLK",
            "SERIAL_8250_CONSOLE",
            "BLK_DEV_INITRD",
            "EXT4_FS",
            "DEVTMPFS_MOUNT",
            "HZ_100",
            "NETCONSOLE",
        ] {
            assert_eq!(frag.get(sym), Some(&Want::Value("y".into())), "{sym}");
        }
        for sym in ["PARAVIRT", "KVM_GUEST", "JUMP_LABEL", "KPROBES", "FTRACE", "PCI", "ACPI"] {
            assert_eq!(frag.get(sym), Some(&Want::NotSet), "{sym}");
        }
        assert!(inputs.overlay.iter().any(|f| f.rel == "init" && f.mode & 0o111 != 0));
        let init = inputs.overlay.iter().find(|f| f.rel == "init").expect("init");
        assert!(String::from_utf8_lossy(&init.data).contains("bulkhead-guest: init running"));
    }

    #[test]
    fn key_changes_with_each_input() {
        let inputs = Inputs::load(&repo_root().join("guests/linux")).expect("load inputs");
        let k = inputs.key("6.1.1-1", "1:1.35");
        assert_eq!(k.len(), 16);
        assert_eq!(k, inputs.key("6.1.1-1", "1:1.35"));
        assert_ne!(k, inputs.key("6.1.2-1", "1:1.35"));
        assert_ne!(k, inputs.key("6.1.1-1", "1:1.36"));
        let mut changed = inputs.clone();
        changed.fragment_text.push_str("CONFIG_X=y\n");
        assert_ne!(k, changed.key("6.1.1-1", "1:1.35"));
        let mut changed = inputs.clone();
        changed.patches[0].1.push(b'\n');
        assert_ne!(k, changed.key("6.1.1-1", "1:1.35"));
        let mut changed = inputs.clone();
        changed.overlay[0].mode ^= 0o100;
        assert_ne!(k, changed.key("6.1.1-1", "1:1.35"));
    }

    #[test]
    fn selftest_check_and_repo_patch_agree() {
        let inputs = Inputs::load(&repo_root().join("guests/linux")).expect("load inputs");
        let patch = String::from_utf8_lossy(&inputs.patches[0].1).into_owned();
        assert!(patch.contains(PATCH_MARKER), "patch must add the marker");
        assert!(patch.lines().any(|l| l == format!("-{SELFTEST_CALL}")), "patch must drop the call");
        assert!(check_selftest_disabled("x\n\tint3_selftest();\n").is_err());
        assert!(check_selftest_disabled(&format!("/* {PATCH_MARKER} */\n\tint3_selftest();\n")).is_err());
        assert!(check_selftest_disabled(&format!("/* {PATCH_MARKER} */\n")).is_ok());
        for (file, marker) in WORKAROUND_MARKERS {
            let patch = inputs
                .patches
                .iter()
                .find(|(_, data)| String::from_utf8_lossy(data).contains(&format!("+++ b/{file}")))
                .unwrap_or_else(|| panic!("no patch for {file}"));
            let text = String::from_utf8_lossy(&patch.1);
            assert!(text.contains(marker), "{} must add `{marker}`", patch.0);
            assert!(text.starts_with("Bulkhead guest: "), "{} needs a header saying what it works around", patch.0);
        }
    }

    #[test]
    fn options() {
        assert_eq!(parse_options(&[]).expect("none"), Options::default());
        let o = parse_options(&["--force".to_string()]).expect("force");
        assert!(o.force && !o.print_paths);
        assert!(parse_options(&["--bogus".to_string()]).is_err());
        assert!(parse_options(&["--force".to_string(), "--print-paths".to_string()]).is_err());
    }
}
