//! `faultfs`: a FUSE file system that gives the files of a directory slow or failing storage, for
//! end-to-end tests (for instance a disk image whose writes fail with EIO or whose fsync is slow).
//!
//! Usage: `faultfs BACKING_DIR MOUNTPOINT [--writeback-cache]`
//!
//! The mount shows the regular files directly in BACKING_DIR (flat, no subdirectories) as a
//! pass-through: data goes to the backing files with pread/pwrite, fsync does fdatasync/fsync on
//! the backing file. It is mounted with `allow_other` and without `default_permissions`, so
//! processes of any uid (in any user namespace) may use it, in particular through fds root opened.
//! With `--writeback-cache` it asks for FUSE's writeback cache: writes are buffered in the page
//! cache, and a WRITE that fails during writeback becomes a writeback error the kernel reports at
//! fsync.
//!
//! It needs no fusermount: run as root, fuser mounts with mount(2) directly. Once the mount is
//! live it prints `faultfs: mounted MOUNTPOINT` on stdout. SIGTERM or SIGINT unmounts it
//! (umount2 with MNT_DETACH) and ends the process.
//!
//! # Control file
//!
//! `.faultfs` at the root is not a backing file. Writing lines `KEY VALUE` to it sets knobs (blank
//! lines are ignored; a write with a bad line fails with EINVAL and changes nothing):
//!
//! - `write-delay-ms N`: every WRITE waits N ms before it is done.
//! - `fsync-delay-ms N`: every FSYNC waits N ms (FLUSH, sent at close, is not delayed).
//! - `write-error none|eio|enospc|efbig`: every WRITE to a backing file fails with that errno,
//!   and its data is not written.
//! - `fsync-error none|eio`: every FSYNC fails with that errno.
//! - `fail-writes-after-bytes N|none`: the storage fills up. Bytes written after this line are
//!   counted; a WRITE that would take them past N fails with ENOSPC (nothing of it is written),
//!   and WRITEs that stay within N succeed.
//! - `reset` (no value): all knobs off, all counters zero.
//!
//! Knobs that decide an outcome are read when the operation runs, after its delay. Delayed
//! operations never wait in the FUSE loop, which keeps answering (the control file, reads)
//! meanwhile: up to 64 wait on threads of their own, and more queue, in arrival order, on one
//! more thread.
//!
//! Reading `.faultfs` returns one line of space-separated `key=value` pairs:
//!
//! - `writes`: WRITE requests to backing files; `write_bytes`: bytes they wrote;
//!   `write_errors`: WRITEs that failed (injected or real).
//! - `reads`: READ requests to backing files; `read_bytes`: bytes they returned.
//! - `fsyncs`: FSYNC requests to backing files; `fsync_errors`: FSYNCs that failed.
//! - `flushes`: FLUSH requests to backing files (one per close of a file description).
//! - `delayed`: operations that were delayed; `delayed_now`: delayed operations waiting now.
//! - `limit_bytes_used`: bytes counted against `fail-writes-after-bytes`.
//! - knobs: `write_delay_ms`, `fsync_delay_ms`, `write_error` (`none`, `eio`, `enospc`, `efbig`),
//!   `fsync_error` (`none`, `eio`), `fail_writes_after_bytes` (a number or `none`).
//! - `writeback_cache`: 1 when the kernel granted the writeback cache, else 0.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, SessionACL, WriteFlags,
};

/// Inode of the root directory.
const ROOT_INO: u64 = 1;
/// Inode of the control file.
const CTL_INO: u64 = 2;
/// Name of the control file.
const CTL_NAME: &str = ".faultfs";
/// How long the kernel may cache attributes and names of backing files.
const TTL: Duration = Duration::from_secs(1);
/// How many delayed operations may wait on threads of their own at once (more queue up).
const MAX_DELAYED: usize = 64;
/// The largest READ served (the kernel asks for far less).
const MAX_READ: u32 = 16 << 20;
/// FUSE loop threads.
const LOOP_THREADS: usize = 2;

/// An errno a knob injects, with the name the control file uses for it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fault {
    name: &'static str,
    errno: i32,
}

/// The knobs the control file sets.
#[derive(Debug, Default)]
struct Knobs {
    write_delay_ms: u64,
    fsync_delay_ms: u64,
    write_error: Option<Fault>,
    fsync_error: Option<Fault>,
    fail_writes_after_bytes: Option<u64>,
    limit_bytes_used: u64,
}

/// One parsed control line.
#[derive(Debug, PartialEq)]
enum Command {
    WriteDelay(u64),
    FsyncDelay(u64),
    WriteError(Option<Fault>),
    FsyncError(Option<Fault>),
    FailAfter(Option<u64>),
    Reset,
}

/// The counters shown by the control file.
#[derive(Debug, Default)]
struct Counters {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    write_errors: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    fsyncs: AtomicU64,
    fsync_errors: AtomicU64,
    flushes: AtomicU64,
    delayed: AtomicU64,
}

impl Counters {
    /// Each counter with its key in the report.
    fn all(&self) -> [(&'static str, &AtomicU64); 9] {
        [
            ("writes", &self.writes),
            ("write_bytes", &self.write_bytes),
            ("write_errors", &self.write_errors),
            ("reads", &self.reads),
            ("read_bytes", &self.read_bytes),
            ("fsyncs", &self.fsyncs),
            ("fsync_errors", &self.fsync_errors),
            ("flushes", &self.flushes),
            ("delayed", &self.delayed),
        ]
    }
}

/// State shared with the threads that run delayed operations.
#[derive(Debug, Default)]
struct Shared {
    knobs: Mutex<Knobs>,
    counters: Counters,
    delayed_now: AtomicUsize,
    delay_threads: AtomicUsize,
    overflow: OnceLock<mpsc::Sender<(Instant, Job)>>,
    writeback_cache: AtomicBool,
}

/// A delayed operation, ready to run.
type Job = Box<dyn FnOnce() + Send>;

/// Sleeps until `due` (not at all if it has passed).
fn sleep_until(due: Instant) {
    thread::sleep(due.saturating_duration_since(Instant::now()));
}

/// Adds one to a counter.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Locks `m`, carrying on with the data if a thread panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `len` as the u32 a reply carries (requests never exceed it).
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Shared {
    /// Decides whether a WRITE of `len` bytes may go ahead, counting it against the fill limit.
    fn admit_write(&self, len: usize) -> Result<(), Errno> {
        let mut k = lock(&self.knobs);
        if let Some(f) = k.write_error {
            return Err(Errno::from_i32(f.errno));
        }
        if let Some(limit) = k.fail_writes_after_bytes {
            let after = k.limit_bytes_used.saturating_add(len as u64);
            if after > limit {
                return Err(Errno::ENOSPC);
            }
            k.limit_bytes_used = after;
        }
        Ok(())
    }

    /// Does one WRITE at `offset` of a backing file and replies.
    fn do_write(&self, file: &File, offset: u64, data: &[u8], reply: ReplyWrite) {
        let res = self.admit_write(data.len()).and_then(|()| file.write_all_at(data, offset).map_err(Errno::from));
        match res {
            Ok(()) => {
                self.counters.write_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.written(len_u32(data.len()));
            }
            Err(e) => {
                bump(&self.counters.write_errors);
                reply.error(e);
            }
        }
    }

    /// Does one FSYNC of a backing file and replies.
    fn do_fsync(&self, file: &File, datasync: bool, reply: ReplyEmpty) {
        let injected = lock(&self.knobs).fsync_error;
        let res = match injected {
            Some(f) => Err(Errno::from_i32(f.errno)),
            None if datasync => file.sync_data().map_err(Errno::from),
            None => file.sync_all().map_err(Errno::from),
        };
        match res {
            Ok(()) => reply.ok(),
            Err(e) => {
                bump(&self.counters.fsync_errors);
                reply.error(e);
            }
        }
    }

    /// Runs `op` after `ms` milliseconds, never in the calling (FUSE loop) thread: on a thread
    /// of its own while fewer than [`MAX_DELAYED`] wait so, else queued to one more thread that
    /// runs the overflow in arrival order.
    fn after_delay(self: &Arc<Self>, ms: u64, op: impl FnOnce(&Shared) + Send + 'static) {
        if ms == 0 {
            return op(self);
        }
        bump(&self.counters.delayed);
        let due = Instant::now() + Duration::from_millis(ms);
        self.delayed_now.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(self);
        let job: Job = Box::new(move || {
            op(&shared);
            shared.delayed_now.fetch_sub(1, Ordering::SeqCst);
        });
        if self.delay_threads.fetch_add(1, Ordering::SeqCst) >= MAX_DELAYED {
            self.delay_threads.fetch_sub(1, Ordering::SeqCst);
            return self.queue_overflow(due, job);
        }
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new().name("faultfs-delay".into()).spawn(move || {
            sleep_until(due);
            job();
            shared.delay_threads.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The job (and with it the reply) is gone: fuser answers EIO for a dropped reply.
            self.delay_threads.fetch_sub(1, Ordering::SeqCst);
            self.delayed_now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Hands a delayed job to the overflow thread (started on first use); runs it here if that
    /// thread cannot be had.
    fn queue_overflow(&self, due: Instant, job: Job) {
        let tx = self.overflow.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<(Instant, Job)>();
            let _ = thread::Builder::new().name("faultfs-overflow".into()).spawn(move || {
                for (due, job) in rx {
                    sleep_until(due);
                    job();
                }
            });
            tx
        });
        if let Err(mpsc::SendError((due, job))) = tx.send((due, job)) {
            sleep_until(due);
            job();
        }
    }

    /// Applies a whole write to the control file: every line or none.
    fn control(&self, data: &[u8]) -> Result<(), Errno> {
        let text = std::str::from_utf8(data).map_err(|_| Errno::EINVAL)?;
        let cmds: Vec<Command> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(parse_line)
            .collect::<Option<_>>()
            .ok_or(Errno::EINVAL)?;
        for cmd in cmds {
            self.apply(cmd);
        }
        Ok(())
    }

    /// Applies one parsed control line.
    fn apply(&self, cmd: Command) {
        let mut k = lock(&self.knobs);
        match cmd {
            Command::WriteDelay(ms) => k.write_delay_ms = ms,
            Command::FsyncDelay(ms) => k.fsync_delay_ms = ms,
            Command::WriteError(f) => k.write_error = f,
            Command::FsyncError(f) => k.fsync_error = f,
            Command::FailAfter(n) => {
                k.fail_writes_after_bytes = n;
                k.limit_bytes_used = 0;
            }
            Command::Reset => {
                *k = Knobs::default();
                for (_, c) in self.counters.all() {
                    c.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// The line reading the control file returns.
    fn report(&self) -> String {
        let mut out: Vec<String> =
            self.counters.all().iter().map(|(k, v)| format!("{k}={}", v.load(Ordering::Relaxed))).collect();
        out.push(format!("delayed_now={}", self.delayed_now.load(Ordering::SeqCst)));
        let k = lock(&self.knobs);
        let fault = |f: Option<Fault>| f.map_or("none", |f| f.name);
        let limit = k.fail_writes_after_bytes.map_or_else(|| "none".to_string(), |n| n.to_string());
        out.push(format!("limit_bytes_used={}", k.limit_bytes_used));
        out.push(format!("write_delay_ms={} fsync_delay_ms={}", k.write_delay_ms, k.fsync_delay_ms));
        out.push(format!("write_error={} fsync_error={}", fault(k.write_error), fault(k.fsync_error)));
        out.push(format!("fail_writes_after_bytes={limit}"));
        out.push(format!("writeback_cache={}", u8::from(self.writeback_cache.load(Ordering::Relaxed))));
        out.join(" ") + "\n"
    }
}

/// Parses one control line.
fn parse_line(line: &str) -> Option<Command> {
    let mut words = line.split_whitespace();
    let key = words.next()?;
    let value = words.next();
    if words.next().is_some() {
        return None;
    }
    match (key, value) {
        ("reset", None) => Some(Command::Reset),
        ("write-delay-ms", Some(v)) => v.parse().ok().map(Command::WriteDelay),
        ("fsync-delay-ms", Some(v)) => v.parse().ok().map(Command::FsyncDelay),
        ("write-error", Some(v)) => parse_fault(v, &["eio", "enospc", "efbig"]).map(Command::WriteError),
        ("fsync-error", Some(v)) => parse_fault(v, &["eio"]).map(Command::FsyncError),
        ("fail-writes-after-bytes", Some("none")) => Some(Command::FailAfter(None)),
        ("fail-writes-after-bytes", Some(v)) => v.parse().ok().map(|n| Command::FailAfter(Some(n))),
        _ => None,
    }
}

/// Parses `none` or one of the `allowed` errno names.
fn parse_fault(value: &str, allowed: &[&str]) -> Option<Option<Fault>> {
    const ALL: [Fault; 3] = [
        Fault { name: "eio", errno: libc::EIO },
        Fault { name: "enospc", errno: libc::ENOSPC },
        Fault { name: "efbig", errno: libc::EFBIG },
    ];
    if value == "none" {
        return Some(None);
    }
    if !allowed.contains(&value) {
        return None;
    }
    ALL.iter().find(|f| f.name == value).map(|f| Some(*f))
}

/// Inode numbers of backing files, by name (kept for the life of the mount).
#[derive(Debug, Default)]
struct Inodes {
    by_name: HashMap<OsString, u64>,
    by_ino: HashMap<u64, OsString>,
    next: u64,
}

impl Inodes {
    /// The inode of backing file `name`, allocated on first sight.
    fn ino_for(&mut self, name: &OsStr) -> u64 {
        if let Some(&ino) = self.by_name.get(name) {
            return ino;
        }
        let ino = self.next.max(CTL_INO + 1);
        self.next = ino + 1;
        self.by_name.insert(name.to_owned(), ino);
        self.by_ino.insert(ino, name.to_owned());
        ino
    }
}

/// The file system.
#[derive(Debug)]
struct FaultFs {
    backing: PathBuf,
    want_writeback_cache: bool,
    shared: Arc<Shared>,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
    started: SystemTime,
}

/// Whether `name` may name a backing file.
fn valid_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && name != CTL_NAME
}

/// Attributes of a backing file or the backing directory, under inode `ino`.
fn attr_of(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    let kind = if md.is_dir() { FileType::Directory } else { FileType::RegularFile };
    let time = |secs: i64, nsecs: i64| {
        let d = Duration::new(u64::try_from(secs).unwrap_or(0), u32::try_from(nsecs).unwrap_or(0));
        SystemTime::UNIX_EPOCH + d
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.ctime(), md.ctime_nsec()),
        kind,
        perm: u16::try_from(md.mode() & 0o7777).unwrap_or(0o644),
        nlink: u32::try_from(md.nlink()).unwrap_or(1),
        uid: md.uid(),
        gid: md.gid(),
        rdev: 0,
        blksize: u32::try_from(md.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

impl FaultFs {
    /// A file system over the files of `backing`.
    fn new(backing: PathBuf, want_writeback_cache: bool) -> FaultFs {
        FaultFs {
            backing,
            want_writeback_cache,
            shared: Arc::default(),
            inodes: Mutex::default(),
            files: Mutex::default(),
            next_fh: AtomicU64::new(1),
            started: SystemTime::now(),
        }
    }

    /// Attributes of the control file (size 0: it is opened for direct I/O).
    fn ctl_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(CTL_INO),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: 0o666,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Attributes of the root: the backing directory's, under inode 1.
    fn root_attr(&self) -> Result<FileAttr, Errno> {
        let md = std::fs::metadata(&self.backing).map_err(Errno::from)?;
        Ok(attr_of(ROOT_INO, &md))
    }

    /// The backing path of inode `ino`.
    fn path_of(&self, ino: u64) -> Result<PathBuf, Errno> {
        let inodes = lock(&self.inodes);
        inodes.by_ino.get(&ino).map(|n| self.backing.join(n)).ok_or(Errno::ENOENT)
    }

    /// Attributes of a backing file from its open handle when there is one, else by name.
    fn file_attr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let md = match fh.and_then(|fh| self.file(fh)) {
            Some(f) => f.metadata(),
            None => std::fs::symlink_metadata(self.path_of(ino)?),
        }
        .map_err(Errno::from)?;
        if !md.is_file() {
            return Err(Errno::ENOENT);
        }
        Ok(attr_of(ino, &md))
    }

    /// Attributes of any inode.
    fn any_attr(&self, ino: u64, fh: Option<FileHandle>) -> Result<(Duration, FileAttr), Errno> {
        match ino {
            ROOT_INO => Ok((TTL, self.root_attr()?)),
            CTL_INO => Ok((Duration::ZERO, self.ctl_attr())),
            _ => Ok((TTL, self.file_attr(ino, fh)?)),
        }
    }

    /// The backing file open under handle `fh`.
    fn file(&self, fh: FileHandle) -> Option<Arc<File>> {
        lock(&self.files).get(&fh.0).cloned()
    }

    /// Registers an open backing file and returns its new handle.
    fn add_file(&self, file: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(file));
        FileHandle(fh)
    }

    /// Opens a backing file read-write whatever the client asked: with the writeback cache the
    /// kernel reads through write-only handles too, and pwrite needs no O_APPEND.
    fn open_backing(&self, ino: u64) -> Result<File, Errno> {
        let path = self.path_of(ino)?;
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(Errno::from)
    }

    /// The entry for `name` in `parent`: the control file or a regular backing file.
    fn lookup_name(&self, parent: INodeNo, name: &OsStr) -> Result<(Duration, FileAttr), Errno> {
        if parent.0 != ROOT_INO {
            return Err(Errno::ENOENT);
        }
        if name == CTL_NAME {
            return Ok((Duration::ZERO, self.ctl_attr()));
        }
        if !valid_name(name) {
            return Err(Errno::ENOENT);
        }
        let md = std::fs::symlink_metadata(self.backing.join(name)).map_err(Errno::from)?;
        if !md.is_file() {
            return Err(Errno::ENOENT);
        }
        let ino = lock(&self.inodes).ino_for(name);
        Ok((TTL, attr_of(ino, &md)))
    }

    /// Creates backing file `name` read-write (opens it if it exists and O_EXCL is unset).
    fn create_file(&self, parent: INodeNo, name: &OsStr, mode: u32, flags: i32) -> Result<(FileAttr, File), Errno> {
        if parent.0 != ROOT_INO {
            return Err(Errno::ENOENT);
        }
        if name == CTL_NAME {
            return Err(Errno::EEXIST);
        }
        if !valid_name(name) {
            return Err(Errno::EINVAL);
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(mode & 0o7777).custom_flags(libc::O_NOFOLLOW);
        if flags & libc::O_EXCL != 0 {
            opts.create_new(true);
        } else {
            opts.create(true).truncate(flags & libc::O_TRUNC != 0);
        }
        let file = opts.open(self.backing.join(name)).map_err(Errno::from)?;
        let md = file.metadata().map_err(Errno::from)?;
        let ino = lock(&self.inodes).ino_for(name);
        Ok((attr_of(ino, &md), file))
    }

    /// Applies a SETATTR's size and mode to a backing file (other fields are ignored).
    fn set_attr(&self, ino: u64, mode: Option<u32>, size: Option<u64>, fh: Option<FileHandle>) -> Result<(), Errno> {
        if ino == ROOT_INO || ino == CTL_INO || (mode.is_none() && size.is_none()) {
            return Ok(());
        }
        let file = match fh.and_then(|fh| self.file(fh)) {
            Some(f) => f,
            None => Arc::new(self.open_backing(ino)?),
        };
        if let Some(size) = size {
            file.set_len(size).map_err(Errno::from)?;
        }
        if let Some(mode) = mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(Errno::from)?;
        }
        Ok(())
    }

    /// The root's entries: `.`, `..`, the control file and the regular backing files by name.
    fn entries(&self) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.backing).map_err(Errno::from)? {
            let entry = entry.map_err(Errno::from)?;
            if entry.file_type().is_ok_and(|t| t.is_file()) && valid_name(&entry.file_name()) {
                names.push(entry.file_name());
            }
        }
        names.sort();
        let mut out = vec![
            (ROOT_INO, FileType::Directory, OsString::from(".")),
            (ROOT_INO, FileType::Directory, OsString::from("..")),
            (CTL_INO, FileType::RegularFile, OsString::from(CTL_NAME)),
        ];
        let mut inodes = lock(&self.inodes);
        out.extend(names.into_iter().map(|n| (inodes.ino_for(&n), FileType::RegularFile, n)));
        Ok(out)
    }

    /// Reads up to `size` bytes at `offset` from the backing file under `fh` (short at EOF only).
    fn read_file(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = self.file(fh).ok_or(Errno::EBADF)?;
        let mut buf = vec![0u8; size.min(MAX_READ) as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset.saturating_add(done as u64)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// statvfs of the backing directory's file system.
    fn statfs_backing(&self) -> Result<libc::statvfs, Errno> {
        let dir = File::open(&self.backing).map_err(Errno::from)?;
        // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `dir` is an open fd for the whole call and `st` is a valid, writable statvfs.
        let rc = unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(st)
    }
}

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.want_writeback_cache {
            config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| io::Error::other("the kernel does not offer FUSE_WRITEBACK_CACHE"))?;
            self.shared.writeback_cache.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent, name) {
            Ok((ttl, attr)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.any_attr(ino.0, fh) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.set_attr(ino.0, mode, size, fh).and_then(|()| self.any_attr(ino.0, fh)) {
            Ok((ttl, attr)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            // Direct I/O: reads and writes reach us whatever the (zero) size and page cache say.
            CTL_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            ROOT_INO => reply.error(Errno::EISDIR),
            ino => match self.open_backing(ino) {
                Ok(file) => reply.opened(self.add_file(file), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == CTL_INO {
            let report = self.shared.report();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(report.len());
            let end = start.saturating_add(size as usize).min(report.len());
            return reply.data(&report.as_bytes()[start..end]);
        }
        bump(&self.shared.counters.reads);
        match self.read_file(fh, offset, size) {
            Ok(data) => {
                self.shared.counters.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 == CTL_INO {
            return match self.shared.control(data) {
                Ok(()) => reply.written(len_u32(data.len())),
                Err(e) => reply.error(e),
            };
        }
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        bump(&self.shared.counters.writes);
        let delay = lock(&self.shared.knobs).write_delay_ms;
        if delay == 0 {
            return self.shared.do_write(&file, offset, data, reply);
        }
        let data = data.to_vec();
        self.shared.after_delay(delay, move |s| s.do_write(&file, offset, &data, reply));
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        if ino.0 != CTL_INO {
            bump(&self.shared.counters.flushes);
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if ino.0 == CTL_INO {
            return reply.ok();
        }
        let Some(file) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        bump(&self.shared.counters.fsyncs);
        let delay = lock(&self.shared.knobs).fsync_delay_ms;
        self.shared.after_delay(delay, move |s| s.do_fsync(&file, datasync, reply));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = match self.entries() {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match File::open(&self.backing).and_then(|d| d.sync_all()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_backing() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                u32::try_from(st.f_bsize).unwrap_or(4096),
                u32::try_from(st.f_namemax).unwrap_or(255),
                u32::try_from(st.f_frsize).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_file(parent, name, mode & !umask, flags) {
            Ok((attr, file)) => reply.created(&TTL, &attr, Generation(0), self.add_file(file), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT_INO || name == CTL_NAME {
            return reply.error(Errno::EPERM);
        }
        if !valid_name(name) {
            return reply.error(Errno::ENOENT);
        }
        match std::fs::remove_file(self.backing.join(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }
}

/// Writes a diagnostic to stderr, ignoring a closed stderr.
fn say(msg: &str) {
    let _ = writeln!(io::stderr(), "faultfs: {msg}");
}

/// Command-line arguments.
#[derive(Debug)]
struct Args {
    backing: PathBuf,
    mountpoint: PathBuf,
    writeback_cache: bool,
}

/// Parses `BACKING_DIR MOUNTPOINT [--writeback-cache]`.
fn parse_args() -> Result<Args, String> {
    const USAGE: &str = "usage: faultfs BACKING_DIR MOUNTPOINT [--writeback-cache]";
    let mut paths = Vec::new();
    let mut writeback_cache = false;
    for arg in std::env::args_os().skip(1) {
        match arg.to_str() {
            Some("--writeback-cache") => writeback_cache = true,
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    let [backing, mountpoint]: [PathBuf; 2] = paths.try_into().map_err(|_| USAGE.to_string())?;
    if !backing.is_dir() {
        return Err(format!("{} is not a directory", backing.display()));
    }
    Ok(Args { backing, mountpoint, writeback_cache })
}

/// The set of SIGTERM and SIGINT.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread and the threads it starts, to take them with
/// sigtimedwait instead.
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: `set` is an initialised signal set; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits up to `limit` for SIGTERM or SIGINT; true when one came.
fn stop_signal_within(limit: Duration) -> bool {
    let set = stop_signals();
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(limit.as_secs()).unwrap_or(1),
        tv_nsec: libc::c_long::from(limit.subsec_millis()) * 1_000_000,
    };
    // SAFETY: `set` and `ts` are initialised and outlive the call; a null siginfo is allowed.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) > 0 }
}

/// Lazily unmounts `mountpoint`.
fn detach(mountpoint: &Path) {
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a NUL-terminated path that lives for the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            say(&format!("umount2 {}: {e}", mountpoint.display()));
        }
    }
}

/// Mount options: `allow_other`, no `default_permissions`, fuser's defaults `nosuid,nodev`.
fn mount_config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("faultfs".into())];
    config.acl = SessionACL::All;
    config.n_threads = Some(LOOP_THREADS);
    config
}

/// Mounts, serves until SIGTERM/SIGINT (or until the mount goes away), then unmounts.
fn run(args: Args) -> Result<(), String> {
    block_stop_signals();
    let canonical = args.mountpoint.canonicalize().map_err(|e| format!("{}: {e}", args.mountpoint.display()))?;
    let fs = FaultFs::new(args.backing, args.writeback_cache);
    let session = Session::new(fs, &canonical, &mount_config()).map_err(|e| format!("mount: {e}"))?;
    let fuse_loop = thread::Builder::new().name("faultfs-loop".into()).spawn(move || session.run());
    let fuse_loop = fuse_loop.map_err(|e| format!("spawn: {e}"))?;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "faultfs: mounted {}", args.mountpoint.display()).and_then(|()| out.flush());
    drop(out);
    while !fuse_loop.is_finished() {
        if stop_signal_within(Duration::from_millis(200)) {
            detach(&canonical);
            break;
        }
    }
    // Once detached, the loop ends as soon as nothing uses the file system any more. If
    // something still does, exiting closes /dev/fuse, which aborts the connection.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !fuse_loop.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if fuse_loop.is_finished() {
        match fuse_loop.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("FUSE loop: {e}")),
            Err(_) => return Err("FUSE loop panicked".into()),
        }
    }
    Ok(())
}

/// Entry point: exit status 0 after a clean unmount, 1 on any error (said on stderr).
fn main() -> ExitCode {
    let result = parse_args().and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_control_lines() {
        assert_eq!(parse_line("write-delay-ms 20"), Some(Command::WriteDelay(20)));
        assert_eq!(parse_line("  reset "), Some(Command::Reset));
        assert_eq!(parse_line("write-error none"), Some(Command::WriteError(None)));
        assert_eq!(parse_line("fsync-error enospc"), None);
        assert_eq!(parse_line("fail-writes-after-bytes none"), Some(Command::FailAfter(None)));
        assert_eq!(parse_line("fail-writes-after-bytes -1"), None);
        assert_eq!(parse_line("write-delay-ms 1 2"), None);
        assert_eq!(parse_line("reset 1"), None);
        assert_eq!(parse_line("bogus 1"), None);
    }

    #[test]
    fn a_bad_line_changes_nothing() {
        let s = Shared::default();
        assert!(s.control(b"write-delay-ms 5\nwrite-error eio\n").is_ok());
        assert!(s.control(b"write-delay-ms 7\nnope\n").is_err());
        assert_eq!(lock(&s.knobs).write_delay_ms, 5);
        assert!(s.report().contains("write_error=eio"));
        assert!(s.control(&[0xff, b'\n']).is_err());
    }

    #[test]
    fn the_fill_limit_admits_writes_up_to_it() {
        let s = Shared::default();
        assert!(s.control(b"fail-writes-after-bytes 8192").is_ok());
        assert!(s.admit_write(4096).is_ok());
        assert!(s.admit_write(4096).is_ok());
        assert_eq!(s.admit_write(1), Err(Errno::ENOSPC));
    }
}
