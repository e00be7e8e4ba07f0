//! Disk images: opened and locked by the core before any service sees them.
//!
//! A disk image is open in one VM only, as QEMU locks its images: the core takes an open file
//! description lock (`F_OFD_SETLK`, whole file) on every image it opens, exclusive for a
//! writable drive and shared for a read-only one. The lock belongs to the open file
//! description, which the core keeps for the VM's life and passes to every instance of the
//! drive's service, so it holds across service restarts and goes when the VM ends (also when the
//! core is killed). A second writer, or a writer next to readers, is refused with
//! [`ImageError::Locked`] before anything starts: the same path given twice, or an image another
//! VM (Bulkhead, or QEMU, which takes the same kind of lock) holds. Several read-only drives may
//! share one image.
//!
//! An empty file is not locked: it is a drive with no medium yet (Kata's placeholder drives,
//! which several drives may share) and holds no data to lose. The image a `PATCH` gives it later
//! is locked like any other.
//!
//! Files that are not regular files are refused: the core never writes guest data to a device
//! node or a FIFO given by mistake.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image cannot be opened or examined.
    #[error("cannot use disk image {path}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The jailed core may not open the image (after the VM is built it runs as the VM's uid).
    #[error(
        "cannot use disk image {path}: permission denied to the VM's core, which runs as uid {uid} gid {gid} \
         once the VM is built (give that uid access to the file, as with Firecracker's jailer)"
    )]
    Jailed {
        /// The path given.
        path: PathBuf,
        /// The core's uid.
        uid: u32,
        /// The core's gid.
        gid: u32,
    },
    /// The path is not a regular file.
    #[error("cannot use disk image {path}: not a regular file")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// Another open of the image (another VM, or another drive of this one) holds a lock that
    /// conflicts with this drive's access.
    #[error(
        "disk image {path} is in use: another VM (or another drive of this VM) has it open{}; \
         an image may be written by one VM only",
        if *read_only { " for writing" } else { "" }
    )]
    Locked {
        /// The path given.
        path: PathBuf,
        /// The drive asked for read-only access.
        read_only: bool,
    },
}

/// An opened image: the file the drive's service reads and writes, and for a writable drive a
/// second open file description of it, the flush witness. Linux reports a writeback error once
/// per open file description; the witness is synced only to find out whether one happened
/// that a service instance may have taken with it when it died inside a flush.
#[derive(Debug)]
pub struct Image {
    /// The image, read-write (or read-only), locked.
    pub file: File,
    /// The witness (writable drives only), opened read-only.
    pub witness: Option<File>,
}

/// Opens a drive's image ([`open_file`]) and, for a writable drive, its flush witness.
pub fn open(path: &Path, read_only: bool) -> Result<Image, ImageError> {
    let file = open_file(path, read_only)?;
    if read_only {
        return Ok(Image { file, witness: None });
    }
    let err = |source| ImageError::Open { path: path.to_path_buf(), source };
    let witness = File::open(path).map_err(err)?;
    // The path could have been renamed over in between: the witness must be the same file.
    if !same_file(&witness, path) || !same_inode(&file, &witness) {
        return Err(err(io::Error::other("the image changed while it was opened")));
    }
    Ok(Image { file, witness: Some(witness) })
}

fn same_inode(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Opens a drive's image (read-only for a read-only drive): a regular file, locked as the module
/// docs say. Its capacity is its size in whole 512-byte sectors; an empty file is a drive with no
/// medium yet.
pub fn open_file(path: &Path, read_only: bool) -> Result<File, ImageError> {
    let err = |source| ImageError::Open { path: path.to_path_buf(), source };
    let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| {
        let uid = nix::unistd::getuid().as_raw();
        if e.kind() == io::ErrorKind::PermissionDenied && uid != 0 && crate::helper::current().is_some() {
            ImageError::Jailed { path: path.to_path_buf(), uid, gid: nix::unistd::getgid().as_raw() }
        } else {
            err(e)
        }
    })?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile { path: path.to_path_buf() });
    }
    if meta.len() > 0 {
        lock(file.as_fd(), read_only).map_err(|e| match e {
            LockError::Conflict => ImageError::Locked { path: path.to_path_buf(), read_only },
            LockError::Os(source) => err(source),
        })?;
    }
    Ok(file)
}

/// Whether `a` and `b` are the same file (device and inode).
pub fn same_file(a: &File, b: &Path) -> bool {
    match (a.metadata(), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Whether some open of `file` (any process, this one included) holds a lock on it: the file is
/// a VM's disk image. Used to refuse writing a console log over a disk.
pub fn is_locked(file: &File) -> io::Result<bool> {
    let mut fl = whole_file(libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass, which lives across the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

enum LockError {
    Conflict,
    Os(io::Error),
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (pid 0 as F_OFD_* require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The lock types and SEEK_SET are the constants 0..=2, which fit the kernel's short fields.
    #[allow(clippy::cast_possible_truncation)]
    {
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
    }
    fl.l_start = 0;
    fl.l_len = 0;
    fl
}

fn lock(fd: BorrowedFd<'_>, read_only: bool) -> Result<(), LockError> {
    let fl = whole_file(if read_only { libc::F_RDLCK } else { libc::F_WRLCK });
    // SAFETY: F_OFD_SETLK reads the flock we pass, which lives across the call.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Err(LockError::Conflict),
        _ => Err(LockError::Os(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, len: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bulkhead-image-{}-{name}", std::process::id()));
        let f = File::create(&p).expect("create");
        f.set_len(len).expect("size");
        p
    }

    #[test]
    fn a_writable_image_is_open_once() {
        let p = scratch("rw", 4096);
        let first = open(&p, false).expect("first open");
        assert!(first.witness.is_some(), "a writable drive has a witness");
        assert!(matches!(open(&p, false), Err(ImageError::Locked { read_only: false, .. })), "second writer");
        assert!(matches!(open(&p, true), Err(ImageError::Locked { read_only: true, .. })), "reader next to a writer");
        assert!(is_locked(&File::open(&p).expect("open")).expect("getlk"));
        drop(first);
        let again = open(&p, false).expect("free once the first is closed");
        drop(again);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn read_only_images_are_shared_but_not_with_a_writer() {
        let p = scratch("ro", 4096);
        let a = open(&p, true).expect("first reader");
        let b = open(&p, true).expect("second reader");
        assert!(a.witness.is_none(), "nothing to witness on a read-only drive");
        assert!(matches!(open(&p, false), Err(ImageError::Locked { .. })), "a writer next to readers");
        drop((a, b));
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn empty_placeholders_are_not_locked_and_non_files_are_refused() {
        let p = scratch("empty", 0);
        let a = open(&p, false).expect("placeholder").file;
        let b = open(&p, false).expect("shared placeholder");
        assert!(!is_locked(&a).expect("getlk"));
        assert!(same_file(&a, &p));
        drop((a, b));
        let _ = std::fs::remove_file(p);
        assert!(matches!(open(&std::env::temp_dir(), true), Err(ImageError::NotAFile { .. })));
    }
}
