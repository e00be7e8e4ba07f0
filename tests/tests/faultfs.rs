//! The `faultfs` test tool itself: pass-through, injected errors and delays, and the writeback
//! errors the kernel reports at fsync once per open file description. Needs root and /dev/fuse,
//! nothing else of bulkhead's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::faultfs::FaultFs;

/// A test's backing directory and mount point, removed on drop (after the mount it outlives).
struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(name: &str) -> Dirs {
        let root = std::env::temp_dir().join(format!("faultfs-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("backing")).expect("backing dir");
        std::fs::create_dir_all(root.join("mnt")).expect("mount point");
        Dirs { root }
    }

    fn backing(&self) -> PathBuf {
        self.root.join("backing")
    }

    fn mount(&self, writeback_cache: bool) -> FaultFs {
        FaultFs::mount(&self.backing(), &self.root.join("mnt"), writeback_cache)
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn errno(r: std::io::Result<()>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn passes_files_through_to_the_backing_dir() {
    let dirs = Dirs::new("passthrough");
    std::fs::write(dirs.backing().join("before.img"), b"already here").expect("write backing");
    let fs = dirs.mount(false);

    std::fs::write(fs.path("a.txt"), b"hello faultfs").expect("write through the mount");
    assert_eq!(std::fs::read(fs.path("a.txt")).expect("read back"), b"hello faultfs");
    assert_eq!(std::fs::read(dirs.backing().join("a.txt")).expect("read backing"), b"hello faultfs");
    assert_eq!(std::fs::read(fs.path("before.img")).expect("read old file"), b"already here");

    let mut names: Vec<String> = std::fs::read_dir(fs.path(""))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".faultfs", "a.txt", "before.img"]);

    std::fs::remove_file(fs.path("a.txt")).expect("unlink");
    assert!(!dirs.backing().join("a.txt").exists(), "unlink reaches the backing dir");
    let c = fs.counters();
    assert!(c["writes"] >= 1 && c["write_bytes"] >= 13, "{c:?}");
}

#[test]
fn the_control_file_rejects_bad_lines() {
    let dirs = Dirs::new("badline");
    let fs = dirs.mount(false);
    for bad in ["write-error eperm\n", "write-delay-ms soon\n", "frobnicate 1\n", "reset now\n"] {
        let mut ctl = OpenOptions::new().write(true).open(fs.path(".faultfs")).expect("open control");
        assert_eq!(errno(ctl.write_all(bad.as_bytes())), Some(libc::EINVAL), "{bad:?}");
    }
    fs.set("write-delay-ms 7");
    assert_eq!(fs.counters()["write_delay_ms"], 7);
    fs.set("reset");
    assert_eq!(fs.counters()["write_delay_ms"], 0);
}

#[test]
fn injected_write_errors_fail_writes_until_cleared() {
    let dirs = Dirs::new("writeerr");
    let fs = dirs.mount(false);
    let path = fs.path("disk.img");
    std::fs::write(&path, b"").expect("create");
    let mut f = open_rw(&path);

    fs.set("write-error eio");
    assert_eq!(errno(f.write_all(&[1; 4096])), Some(libc::EIO));
    assert_eq!(fs.counters()["write_errors"], 1);
    assert_eq!(std::fs::metadata(dirs.backing().join("disk.img")).expect("stat").len(), 0, "nothing written");

    fs.set("write-error none");
    f.write_all(&[2; 4096]).expect("write after clearing the error");
    assert_eq!(std::fs::read(dirs.backing().join("disk.img")).expect("read backing"), vec![2; 4096]);
    let c = fs.counters();
    assert_eq!((c["writes"], c["write_errors"], c["write_bytes"]), (2, 1, 4096), "{c:?}");
}

#[test]
fn a_delayed_fsync_does_not_block_the_control_file() {
    let dirs = Dirs::new("fsyncdelay");
    let fs = dirs.mount(false);
    let path = fs.path("slow.img");
    std::fs::write(&path, [3; 8192]).expect("write");
    std::fs::write(fs.path("other.img"), [6; 8192]).expect("write");
    let f = open_rw(&path);

    fs.set("fsync-delay-ms 1500");
    let syncer = std::thread::spawn(move || {
        let start = Instant::now();
        f.sync_all().expect("fsync");
        start.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let during = fs.counters();
    let control_took = start.elapsed();
    let start = Instant::now();
    let other = std::fs::read(fs.path("other.img")).expect("read another file");
    let other_took = start.elapsed();
    let mut text = String::new();
    File::open(fs.path(".faultfs")).expect("open control").read_to_string(&mut text).expect("read control");
    let fsync_took = syncer.join().expect("fsync thread");

    assert!(control_took < Duration::from_millis(500), "the control file took {control_took:?} during the fsync");
    assert!(other_took < Duration::from_millis(500), "another file took {other_took:?} during the fsync");
    assert_eq!(other, [6; 8192]);
    assert_eq!(during["delayed_now"], 1, "{during:?}");
    assert!(fsync_took >= Duration::from_millis(1400), "fsync took only {fsync_took:?}");
    assert!(text.contains("fsync_delay_ms=1500"), "{text}");
    assert_eq!(fs.counters()["fsyncs"], 1);
}

#[test]
fn a_delayed_write_waits_and_then_lands() {
    let dirs = Dirs::new("writedelay");
    let fs = dirs.mount(false);
    let path = fs.path("slow.img");
    std::fs::write(&path, b"").expect("create");
    let mut f = open_rw(&path);

    fs.set("write-delay-ms 400");
    let start = Instant::now();
    f.write_all(&[7; 4096]).expect("delayed write");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(350), "the write took only {took:?}");
    assert_eq!(std::fs::read(dirs.backing().join("slow.img")).expect("read backing"), vec![7; 4096]);
    assert_eq!(fs.counters()["delayed"], 1);
}

/// Linux reports a writeback error once per open file description: each fd that was open when
/// the WRITE failed sees EIO at its next fsync, and only then.
#[test]
fn writeback_errors_are_reported_once_per_open_file() {
    let dirs = Dirs::new("writeback");
    let fs = dirs.mount(true);
    assert_eq!(fs.counters()["writeback_cache"], 1, "the kernel granted the writeback cache");
    let path = fs.path("wb.img");
    std::fs::write(&path, b"").expect("create");
    let mut a = open_rw(&path);
    let b = open_rw(&path);

    fs.set("write-error eio");
    a.write_all(&[0xab; 4096]).expect("a buffered write succeeds");
    assert_eq!(errno(a.sync_data()), Some(libc::EIO), "first fdatasync on a");
    assert!(fs.counters()["write_errors"] >= 1);
    assert_eq!(errno(a.sync_data()), None, "second fdatasync on a: the error was consumed");
    assert_eq!(errno(b.sync_data()), Some(libc::EIO), "b was open before the failure");
    assert_eq!(errno(b.sync_data()), None, "second fdatasync on b");
    let c = open_rw(&path);
    assert_eq!(errno(c.sync_data()), None, "c was opened after the failure");
    fs.set("write-error none");
    assert_eq!(std::fs::metadata(dirs.backing().join("wb.img")).expect("stat").len(), 0, "the data was lost");
}

#[test]
fn a_full_disk_fails_writes_past_the_limit_with_enospc() {
    let dirs = Dirs::new("full");
    let fs = dirs.mount(false);
    let path = fs.path("full.img");
    std::fs::write(&path, b"").expect("create");
    let mut f = open_rw(&path);

    fs.set("fail-writes-after-bytes 8192");
    let mut written = 0;
    let mut failure = None;
    while written < 16384 {
        match f.write(&[4; 4096]) {
            Ok(n) => written += n,
            Err(e) => {
                failure = e.raw_os_error();
                break;
            }
        }
    }
    assert_eq!(failure, Some(libc::ENOSPC), "after {written} bytes");
    assert!((8192..16384).contains(&written), "failed after {written} bytes");
    assert_eq!(std::fs::metadata(dirs.backing().join("full.img")).expect("stat").len(), 8192);
    fs.set("fail-writes-after-bytes none");
    f.write_all(&[5; 4096]).expect("write once the limit is lifted");
}

/// Processes of another uid (as the sandboxed services are) can use fds root opened on the mount.
#[test]
fn another_uid_reads_and_writes_through_fds_root_opened() {
    let dirs = Dirs::new("otheruid");
    let fs = dirs.mount(false);
    let path = fs.path("shared.img");
    std::fs::write(&path, b"from root\n").expect("write");
    let out = Command::new("sh")
        .args(["-c", "cat; echo from nobody >&2"])
        .stdin(open_rw(&path))
        .stdout(Stdio::piped())
        .stderr(OpenOptions::new().append(true).open(&path).expect("open for append"))
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run sh as uid 65534");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"from root\n");
    assert_eq!(std::fs::read(dirs.backing().join("shared.img")).expect("read"), b"from root\nfrom nobody\n");
}
