//! Opening a TAP device for a net service: the core holds the privilege (`CAP_NET_ADMIN`, or an
//! existing persistent TAP owned by its user), opens the device and passes the fd to the service,
//! which opens nothing itself.
//!
//! The fd is opened `O_RDWR | O_NONBLOCK | O_CLOEXEC` on `/dev/net/tun`, attached with
//! `TUNSETIFF` as `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (every frame carries a
//! `virtio_net_hdr_v1`), with `TUNSETVNETHDRSZ` = 12 and `TUNSETOFFLOAD` set to the offloads the
//! service will negotiate (none today: the kernel then hands over fully checksummed frames).

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device.
pub const TUN_PATH: &CStr = c"/dev/net/tun";
/// `TUNSETIFF` = `_IOW('T', 202, int)`.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD` = `_IOW('T', 208, unsigned int)`.
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` = `_IOW('T', 216, int)`.
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `IFF_TAP`.
pub const IFF_TAP: libc::c_short = 0x0002;
/// `IFF_NO_PI`.
pub const IFF_NO_PI: libc::c_short = 0x1000;
/// `IFF_VNET_HDR`.
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header on every frame.
pub const VNET_HDR_LEN: libc::c_int = 12;
/// `TUN_F_CSUM`: the guest can take / give partial checksums.
pub const TUN_F_CSUM: libc::c_uint = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: libc::c_uint = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: libc::c_uint = 0x04;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// Every offload bit [`open_tap`] accepts.
pub const TUN_F_ALL: libc::c_uint = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
/// Longest interface name (without the NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or contains a NUL or '/'.
    #[error("bad TAP name {0:?} (1..={MAX_NAME} bytes, no NUL or '/')")]
    Name(String),
    /// Offload bits outside [`TUN_F_ALL`], or TSO without checksum offload.
    #[error("bad offload flags {0:#x}")]
    Offloads(libc::c_uint),
    /// Opening `/dev/net/tun` failed.
    #[error("open /dev/net/tun")]
    Open(#[source] io::Error),
    /// `TUNSETIFF` failed (no permission, name in use by a non-TAP, ...).
    #[error("TUNSETIFF {name}")]
    SetIff {
        /// The name asked for.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel kept different flags than asked for (no vnet header support).
    #[error("TAP {name} has flags {flags:#x}, not IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    Flags {
        /// The name.
        name: String,
        /// Flags reported.
        flags: libc::c_short,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("TUNSETVNETHDRSZ {VNET_HDR_LEN}")]
    VnetHdrSize(#[source] io::Error),
    /// `TUNSETOFFLOAD` failed.
    #[error("TUNSETOFFLOAD {flags:#x}")]
    Offload {
        /// Flags asked for.
        flags: libc::c_uint,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    /// The fd to pass to the net service ([`ipc::control::FdRole::Tap`]).
    pub fd: OwnedFd,
    /// The interface name the kernel attached (as asked, or filled in from a `%d` pattern).
    pub name: String,
}

/// Opens (creating if needed) the TAP interface `name` for a net service, with `offloads`
/// (`TUN_F_*`, 0 for none) enabled. The fd is non-blocking and close-on-exec.
pub fn open_tap(name: &str, offloads: libc::c_uint) -> Result<Tap, TapError> {
    if name.is_empty() || name.len() > MAX_NAME || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(TapError::Name(name.to_string()));
    }
    if offloads & !TUN_F_ALL != 0 || (offloads & !TUN_F_CSUM != 0 && offloads & TUN_F_CSUM == 0) {
        return Err(TapError::Offloads(offloads));
    }
    let path = TUN_PATH.to_str().map_err(|_| TapError::Name(name.to_string()))?;
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(TapError::Open)?;
    // SAFETY: `ifreq` is plain old data; all-zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, alive for the call;
    // the fd is ours.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
        return Err(TapError::SetIff { name: name.to_string(), source: io::Error::last_os_error() });
    }
    // SAFETY: the kernel wrote a NUL-terminated name into the IFNAMSIZ array (it zeroed the rest).
    let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: reading the flags member of the union the kernel filled for TUNSETIFF.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if flags & want != want {
        return Err(TapError::Flags { name: actual, flags });
    }
    let hdr: libc::c_int = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr`.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(TapError::VnetHdrSize(io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes the flags by value as the third argument.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(offloads)) } < 0 {
        return Err(TapError::Offload { flags: offloads, source: io::Error::last_os_error() });
    }
    Ok(Tap { fd: file.into(), name: actual })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // _IOW(type, nr, size) = (1 << 30) | (size << 16) | (type << 8) | nr
        let iow = |nr: libc::c_ulong| (1 << 30) | (4 << 16) | ((b'T' as libc::c_ulong) << 8) | nr;
        assert_eq!(TUNSETIFF, iow(202));
        assert_eq!(TUNSETOFFLOAD, iow(208));
        assert_eq!(TUNSETVNETHDRSZ, iow(216));
    }

    #[test]
    fn bad_names_and_offloads_are_refused_before_any_syscall() {
        assert!(matches!(open_tap("", 0), Err(TapError::Name(_))));
        assert!(matches!(open_tap("a-name-that-is-too-long", 0), Err(TapError::Name(_))));
        assert!(matches!(open_tap("a/b", 0), Err(TapError::Name(_))));
        assert!(matches!(open_tap("tap0", 0x100), Err(TapError::Offloads(0x100))));
        assert!(matches!(open_tap("tap0", TUN_F_TSO4), Err(TapError::Offloads(_))));
    }
}
