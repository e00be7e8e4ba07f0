//! The virtio-net device (id 1): RX queue 0, TX queue 1, a TAP fd the core opened
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, vnet header size 12) as the back end.
//!
//! Features: `VERSION_1`, `MAC`, `STATUS` (link always up), `EVENT_IDX`, and the offloads
//! ([`F_OFFLOADS`]): `CSUM`, `HOST_TSO4/6`, `HOST_ECN` (the guest hands over partial checksums
//! and TCP segments of up to 64 KiB), `GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN` (the TAP hands
//! them over the other way) and `MRG_RXBUF` (a received frame may span several RX buffers).
//! Every frame carries a 12-byte `virtio_net_hdr_v1` ([`NetHdr`]).
//!
//! Offloads: when the driver sets `DRIVER_OK` ([`VirtioDevice::activate`], also run when a new
//! instance restores a running device) the service sets `TUNSETOFFLOAD` on its TAP from what
//! was acknowledged ([`Offloads::tun_flags`]: `TUN_F_CSUM` with `GUEST_CSUM`, `TUN_F_TSO4/6`,
//! `TUN_F_TSO_ECN` with the matching guest TSO features); a reset sets it back to 0. The kernel
//! then checksums and segments TX frames itself, and hands RX frames with partial checksums or
//! GSO only when the driver takes them.
//!
//! Data path, with no copy through the service in the common case:
//! * TX: each chain is parsed by the pure [`parse_tx`]; its header is copied out of guest memory
//!   and checked by the pure [`check_tx_header`] against the negotiated offloads (a header asking
//!   for anything not negotiated or inconsistent with the frame drops the chain, counted); the
//!   frame is sent with one `writev` of the checked copy of the header plus the guest's frame
//!   bytes straight from guest memory.
//! * RX: available RX chains are parsed ([`parse_rx`]) and held; while any is held the TAP fd is
//!   watched. Without `MRG_RXBUF` each frame is `readv`'d straight into the oldest held buffer (a
//!   frame that does not fit is dropped and counted; the buffer is reused). With `MRG_RXBUF` a
//!   frame is `readv`'d straight into as many held buffers as it needs, in order; the part that
//!   does not fit the buffers held waits in a one-frame overflow buffer in the service (the TAP
//!   is then left unread) until the driver posts more, and is copied into them. The header the
//!   TAP wrote is checked ([`check_rx_header`]) and rewritten with `num_buffers`; the frame's
//!   buffers are then completed together in one batch (one interrupt). With no buffer held the
//!   TAP is not read (back-pressure: frames wait in the TAP's queue).
//!
//! The transport raises the interrupt once per `process_queue` batch. In-flight tracking follows
//! [`super::tracked`]: a TX chain in flight when the service died is sent again; held RX buffers
//! are in flight and are simply reused by the next instance. A frame waiting for buffers in the
//! overflow buffer is lost with the instance (a lost frame, as on any Ethernet); the buffers it
//! had filled are still in flight, so the next instance takes them again: none leaks, none is
//! completed twice. A crash in the middle of completing one frame's buffers leaves the first of
//! them published and the rest in flight, reused by the next instance: the driver sees a frame
//! with fewer buffers than `num_buffers` says (Linux drops it as a length error).
//!
//! Hostile chains (zero length, shorter than a header plus an Ethernet header, longer than
//! [`MAX_PACKET`], outside guest RAM, in the wrong direction, looping) are completed with used
//! length 0 and counted in [`NetStats`]; nothing the guest writes makes the service panic.
//!
//! Rate limiting ([`Net::set_rate_limit`]): one [`Throttle`] per direction, each charged the
//! frame bytes (without the header) and one operation per frame. A throttled TX leaves chains
//! in the TX queue; a throttled RX stops reading the TAP (the kernel queues or drops, as for any
//! slow receiver). The service then sleeps until the tokens are due
//! ([`VirtioDevice::wake_after`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use ipc::control::{IoCounters, RateLimit, RateLimitUpdate};

use virtio_bindings::virtio_net as vn;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use super::request::{take_front, Segment};
use super::{DeviceError, QueueCtx, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::footprint::ZeroPages;
use crate::memory::{GuestMem, Inline};
use crate::ratelimit::Throttle;

/// Virtio device ID of a network device.
pub const DEVICE_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Bytes of `virtio_net_hdr_v1` (including `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Bytes of an Ethernet header: the shortest frame the TAP accepts.
pub const ETH_HLEN: usize = 14;
/// Largest packet (header plus frame) accepted on TX or delivered on RX.
pub const MAX_PACKET: usize = 65550;
/// Most descriptors in one chain (with our header, the `writev` stays below `IOV_MAX`).
pub const MAX_DESCRIPTORS: usize = 1022;
/// A header field value from the bindings (all fit a byte: checked at compile time).
const fn byte(v: u32) -> u8 {
    let b = v.to_le_bytes();
    assert!(b[1] == 0 && b[2] == 0 && b[3] == 0);
    b[0]
}
/// Bit `n` of a feature word.
const fn bit(n: u32) -> u64 {
    1 << n
}
/// `VIRTIO_NET_F_CSUM`: the driver may hand over frames with partial checksums.
pub const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes frames with partial checksums.
pub const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
/// `VIRTIO_NET_F_GUEST_ECN`.
pub const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
/// `VIRTIO_NET_F_MAC`.
pub const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
/// `VIRTIO_NET_F_HOST_ECN`.
pub const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several RX buffers.
pub const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
/// `VIRTIO_NET_F_STATUS`.
pub const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
/// Every offload feature offered (checksum, TSO, ECN both ways, mergeable RX buffers).
pub const F_OFFLOADS: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_MRG_RXBUF;
/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;
/// Config space: `mac[6]`, `status: u16`, `max_virtqueue_pairs: u16`.
pub const CONFIG_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = byte(vn::VIRTIO_NET_HDR_F_NEEDS_CSUM);
/// `VIRTIO_NET_HDR_F_DATA_VALID` (device to driver only).
pub const HDR_F_DATA_VALID: u8 = byte(vn::VIRTIO_NET_HDR_F_DATA_VALID);
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const HDR_GSO_NONE: u8 = byte(vn::VIRTIO_NET_HDR_GSO_NONE);
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const HDR_GSO_TCPV4: u8 = byte(vn::VIRTIO_NET_HDR_GSO_TCPV4);
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const HDR_GSO_TCPV6: u8 = byte(vn::VIRTIO_NET_HDR_GSO_TCPV6);
/// `VIRTIO_NET_HDR_GSO_ECN` (or-ed into a TCP GSO type).
pub const HDR_GSO_ECN: u8 = byte(vn::VIRTIO_NET_HDR_GSO_ECN);
/// Most iovecs in one `readv` of a frame spread over several RX buffers.
const MAX_RX_IOV: usize = 1000;
/// Most complaints logged (then silence).
const MAX_COMPLAINTS: u32 = 20;

/// Errors of the net device: bad construction parameters, and why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Queue size unusable.
    #[error("queue size {0} (power of two, 2..=32768)")]
    QueueSize(u16),
    /// The overflow buffer could not be mapped.
    #[error("mapping the overflow buffer: {0}")]
    Overflow(io::ErrorKind),
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain ends in a descriptor that still claims a successor (a loop or a bad index).
    #[error("chain truncated (loop or bad next index)")]
    Truncated,
    /// A device-writable descriptor in a TX chain, or a device-readable one in an RX chain.
    #[error("descriptor in the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest RAM.
    #[error("buffer {addr:#x}+{len:#x} outside guest RAM")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Too short for a header (plus an Ethernet header on TX); zero-length chains included.
    #[error("chain of {0} bytes is too short")]
    TooShort(u64),
    /// A TX packet longer than [`MAX_PACKET`].
    #[error("packet of at least {0} bytes is too long")]
    TooBig(u64),
    /// A `virtio_net_hdr` asking for something not negotiated or inconsistent with its frame.
    #[error("bad virtio-net header: {0}")]
    Header(&'static str),
}

/// The offloads a driver negotiated, each with the features it depends on (a TSO feature
/// without the matching checksum feature, or ECN without TSO, is not used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// TX: `NEEDS_CSUM` accepted (`CSUM`).
    pub tx_csum: bool,
    /// TX: `GSO_TCPV4` accepted (`HOST_TSO4` with `CSUM`).
    pub tx_tso4: bool,
    /// TX: `GSO_TCPV6` accepted (`HOST_TSO6` with `CSUM`).
    pub tx_tso6: bool,
    /// TX: `GSO_ECN` accepted (`HOST_ECN` with a host TSO).
    pub tx_ecn: bool,
    /// RX: partial checksums delivered (`GUEST_CSUM`).
    pub rx_csum: bool,
    /// RX: `GSO_TCPV4` delivered (`GUEST_TSO4` with `GUEST_CSUM`).
    pub rx_tso4: bool,
    /// RX: `GSO_TCPV6` delivered (`GUEST_TSO6` with `GUEST_CSUM`).
    pub rx_tso6: bool,
    /// RX: `GSO_ECN` delivered (`GUEST_ECN` with a guest TSO).
    pub rx_ecn: bool,
    /// RX: frames spread over several buffers (`MRG_RXBUF`).
    pub mrg_rxbuf: bool,
}

impl Offloads {
    /// The offloads usable with `features` acknowledged.
    pub fn from_features(features: u64) -> Self {
        let has = |f: u64| features & f != 0;
        let tx_csum = has(F_CSUM);
        let tx_tso4 = tx_csum && has(F_HOST_TSO4);
        let tx_tso6 = tx_csum && has(F_HOST_TSO6);
        let rx_csum = has(F_GUEST_CSUM);
        let rx_tso4 = rx_csum && has(F_GUEST_TSO4);
        let rx_tso6 = rx_csum && has(F_GUEST_TSO6);
        Self {
            tx_csum,
            tx_tso4,
            tx_tso6,
            tx_ecn: (tx_tso4 || tx_tso6) && has(F_HOST_ECN),
            rx_csum,
            rx_tso4,
            rx_tso6,
            rx_ecn: (rx_tso4 || rx_tso6) && has(F_GUEST_ECN),
            mrg_rxbuf: has(F_MRG_RXBUF),
        }
    }

    /// The `TUNSETOFFLOAD` flags that make the TAP hand over what the driver takes on RX.
    pub fn tun_flags(&self) -> libc::c_uint {
        let mut f = 0;
        if self.rx_csum {
            f |= libc::TUN_F_CSUM;
        }
        if self.rx_tso4 {
            f |= libc::TUN_F_TSO4;
        }
        if self.rx_tso6 {
            f |= libc::TUN_F_TSO6;
        }
        if self.rx_ecn {
            f |= libc::TUN_F_TSO_ECN;
        }
        f
    }
}

/// A `virtio_net_hdr_v1` (12 bytes, little-endian fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `NEEDS_CSUM`, `DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, with `GSO_ECN` or-ed in.
    pub gso_type: u8,
    /// Length of the headers (a hint).
    pub hdr_len: u16,
    /// Segment payload size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where from `csum_start` the checksum goes.
    pub csum_offset: u16,
    /// Buffers this frame spans (RX).
    pub num_buffers: u16,
}

impl NetHdr {
    /// Decodes the 12 bytes of a header.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: w(2),
            gso_size: w(4),
            csum_start: w(6),
            csum_offset: w(8),
            num_buffers: w(10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in
            [self.hdr_len, self.gso_size, self.csum_start, self.csum_offset, self.num_buffers].into_iter().enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Checks the header of a TX frame of `frame_len` bytes against the negotiated offloads and
/// returns the header to hand to the TAP (only what was checked; `num_buffers` 0). Refused:
/// flags other than `NEEDS_CSUM`, a checksum or GSO type not negotiated, a checksum position
/// outside the frame, GSO without `NEEDS_CSUM` or with `gso_size` 0, `hdr_len` past the frame.
pub fn check_tx_header(hdr: &NetHdr, frame_len: u64, off: &Offloads) -> Result<NetHdr, NetError> {
    if hdr.flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(NetError::Header("flags other than NEEDS_CSUM"));
    }
    let mut out = NetHdr::default();
    if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
        if !off.tx_csum {
            return Err(NetError::Header("NEEDS_CSUM without VIRTIO_NET_F_CSUM"));
        }
        let end = u64::from(hdr.csum_start) + u64::from(hdr.csum_offset) + 2;
        if u64::from(hdr.csum_start) < ETH_HLEN as u64 || end > frame_len {
            return Err(NetError::Header("checksum position outside the frame"));
        }
        out.flags = HDR_F_NEEDS_CSUM;
        out.csum_start = hdr.csum_start;
        out.csum_offset = hdr.csum_offset;
    }
    let ecn = hdr.gso_type & HDR_GSO_ECN != 0;
    match hdr.gso_type & !HDR_GSO_ECN {
        HDR_GSO_NONE if ecn => return Err(NetError::Header("GSO_ECN without a GSO type")),
        HDR_GSO_NONE => return Ok(out),
        HDR_GSO_TCPV4 if off.tx_tso4 => {}
        HDR_GSO_TCPV6 if off.tx_tso6 => {}
        _ => return Err(NetError::Header("GSO type not negotiated")),
    }
    if ecn && !off.tx_ecn {
        return Err(NetError::Header("GSO_ECN without VIRTIO_NET_F_HOST_ECN"));
    }
    if out.flags & HDR_F_NEEDS_CSUM == 0 {
        return Err(NetError::Header("GSO without NEEDS_CSUM"));
    }
    if hdr.gso_size == 0 {
        return Err(NetError::Header("GSO with gso_size 0"));
    }
    if u64::from(hdr.hdr_len) > frame_len {
        return Err(NetError::Header("hdr_len past the frame"));
    }
    out.gso_type = hdr.gso_type;
    out.gso_size = hdr.gso_size;
    out.hdr_len = hdr.hdr_len;
    Ok(out)
}

/// Checks the header the TAP put on a received frame against what the driver takes and returns
/// the header for the driver (`num_buffers` still to fill). `DATA_VALID` is passed on only with
/// `GUEST_CSUM` (dropped otherwise: it is a hint); anything else not negotiated refuses the frame
/// (the TAP can still hold frames queued under an earlier driver's offloads).
pub fn check_rx_header(hdr: &NetHdr, off: &Offloads) -> Result<NetHdr, NetError> {
    if hdr.flags & !(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) != 0 {
        return Err(NetError::Header("unknown flags from the TAP"));
    }
    if hdr.flags & HDR_F_NEEDS_CSUM != 0 && !off.rx_csum {
        return Err(NetError::Header("partial checksum without GUEST_CSUM"));
    }
    let mut out = *hdr;
    out.num_buffers = 0;
    if !off.rx_csum {
        out.flags = 0;
    }
    let ecn = hdr.gso_type & HDR_GSO_ECN != 0;
    let ok = match hdr.gso_type & !HDR_GSO_ECN {
        HDR_GSO_NONE => !ecn,
        HDR_GSO_TCPV4 => off.rx_tso4 && (!ecn || off.rx_ecn),
        HDR_GSO_TCPV6 => off.rx_tso6 && (!ecn || off.rx_ecn),
        _ => false,
    };
    if !ok {
        return Err(NetError::Header("GSO type the driver did not negotiate"));
    }
    if hdr.gso_type == HDR_GSO_NONE {
        out.gso_size = 0;
        out.hdr_len = if off.rx_csum { hdr.hdr_len } else { 0 };
    }
    Ok(out)
}

/// A TX chain checked against guest memory: the 12-byte header and the frame after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame {
    /// Where the header is (every range inside guest RAM, readable; 12 bytes in all).
    pub hdr: Inline<Segment>,
    /// The frame's bytes (every range inside guest RAM, readable).
    pub frame: Inline<Segment>,
    /// Total length of `frame`.
    pub len: u64,
}

/// An RX buffer checked against guest memory (capped at [`MAX_PACKET`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    /// Head descriptor index (the used id).
    pub head: u16,
    /// The writable ranges, in order.
    pub segs: Inline<Segment>,
    /// Total length of `segs`.
    pub cap: u64,
}

/// Counters of a net device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Frame bytes written to the TAP (without headers).
    pub tx_bytes: u64,
    /// TX chains refused by [`parse_tx`] (completed, nothing sent).
    pub tx_dropped: u64,
    /// TX frames the TAP refused (`writev` failed).
    pub tx_errors: u64,
    /// Frames delivered into guest RX buffers.
    pub rx_frames: u64,
    /// Frame bytes delivered (without headers).
    pub rx_bytes: u64,
    /// Frames read from the TAP and dropped (did not fit the buffer, or carried offload
    /// metadata that was not negotiated).
    pub rx_dropped: u64,
    /// RX chains refused by [`parse_rx`] (completed with length 0).
    pub rx_bad_chains: u64,
    /// `readv` failures other than "no frame".
    pub rx_errors: u64,
    /// Times TX had to wait for rate-limit tokens.
    pub tx_throttled: u64,
    /// Times RX had to wait for rate-limit tokens (the TAP left unread).
    pub rx_throttled: u64,
    /// TX chains (counted in `tx_dropped` too) whose header asked for an offload not
    /// negotiated or was inconsistent with the frame.
    pub tx_bad_headers: u64,
    /// Frames sent with `NEEDS_CSUM` (the kernel completes the checksum).
    pub tx_csum: u64,
    /// Frames sent with a GSO type (the kernel segments them).
    pub tx_gso: u64,
    /// Frames delivered with `NEEDS_CSUM`.
    pub rx_csum: u64,
    /// Frames delivered with a GSO type.
    pub rx_gso: u64,
    /// Frames delivered over more than one RX buffer (`MRG_RXBUF`).
    pub rx_merged: u64,
    /// Frames that had to wait in the service for more RX buffers (`MRG_RXBUF`).
    pub rx_held_frames: u64,
}

impl std::fmt::Display for NetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tx_frames={} tx_bytes={} tx_dropped={} tx_errors={} rx_frames={} rx_bytes={} rx_dropped={} \
             rx_bad_chains={} rx_errors={} tx_throttled={} rx_throttled={} tx_bad_headers={} tx_csum={} \
             tx_gso={} rx_csum={} rx_gso={} rx_merged={} rx_held_frames={}",
            self.tx_frames,
            self.tx_bytes,
            self.tx_dropped,
            self.tx_errors,
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_bad_chains,
            self.rx_errors,
            self.tx_throttled,
            self.rx_throttled,
            self.tx_bad_headers,
            self.tx_csum,
            self.tx_gso,
            self.rx_csum,
            self.rx_gso,
            self.rx_merged,
            self.rx_held_frames
        )
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Collects the descriptors of a chain in one direction, checking each against guest memory.
/// Returns the non-empty ranges and their total (stopping early past `limit` bytes if `strict`).
fn collect<M, I>(
    mem: &M,
    descs: I,
    writable: bool,
    limit: u64,
    strict: bool,
) -> Result<(Inline<Segment>, u64), NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let perm = if writable { Permissions::Write } else { Permissions::Read };
    let mut segs = Inline::new();
    let mut sum = 0u64;
    let mut last_next = false;
    for (count, d) in descs.into_iter().enumerate() {
        if count == MAX_DESCRIPTORS {
            return Err(NetError::TooLong);
        }
        if d.is_write_only() != writable {
            return Err(NetError::WrongDirection);
        }
        let len = d.len();
        sum = sum.saturating_add(u64::from(len));
        if strict && sum > limit {
            return Err(NetError::TooBig(sum));
        }
        if len > 0 {
            let Ok(ulen) = usize::try_from(len) else {
                return Err(NetError::OutsideMemory { addr: d.addr().0, len });
            };
            if !mem.check_range(d.addr(), ulen, perm) {
                return Err(NetError::OutsideMemory { addr: d.addr().0, len });
            }
            segs.push(Segment { addr: d.addr(), len });
        }
        last_next = d.has_next();
    }
    if last_next {
        return Err(NetError::Truncated);
    }
    Ok((segs, sum))
}

/// Parses a TX chain: only device-readable descriptors, each inside guest RAM, at most
/// [`MAX_DESCRIPTORS`], a 12-byte header plus a frame of at least [`ETH_HLEN`] bytes, at most
/// [`MAX_PACKET`] bytes in all. Pure: reads nothing but the descriptors' ranges' validity.
pub fn parse_tx<M, I>(mem: &M, descs: I) -> Result<TxFrame, NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let (mut segs, sum) = collect(mem, descs, false, MAX_PACKET as u64, true)?;
    if sum < (HDR_LEN + ETH_HLEN) as u64 {
        return Err(NetError::TooShort(sum));
    }
    let hdr = take_front(&mut segs, HDR_LEN as u64);
    Ok(TxFrame { hdr, len: total(&segs), frame: segs })
}

/// Parses an RX chain: only device-writable descriptors, each inside guest RAM, room for at
/// least the header and an Ethernet header. Space beyond [`MAX_PACKET`] is not used.
pub fn parse_rx<M, I>(mem: &M, head: u16, descs: I) -> Result<RxBuffer, NetError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let (mut segs, sum) = collect(mem, descs, true, u64::MAX, false)?;
    if sum < (HDR_LEN + ETH_HLEN) as u64 {
        return Err(NetError::TooShort(sum));
    }
    let segs = take_front(&mut segs, MAX_PACKET as u64);
    Ok(RxBuffer { head, cap: total(&segs), segs })
}

/// Guest slices for `segs` (an error if any is not backed by guest memory).
fn slices<'m>(mem: &'m GuestMem, segs: &[Segment], perm: Permissions) -> io::Result<Inline<VolatileSlice<'m, ()>>> {
    let efault = || io::Error::from_raw_os_error(libc::EFAULT);
    let mut out = Inline::new();
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| efault())?;
        crate::memory::push_slices(mem, s.addr, len, perm, &mut out).map_err(|_| efault())?;
    }
    if out.len() > MAX_DESCRIPTORS + 1 {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    Ok(out)
}

/// Writes `bytes` at the start of the buffer `segs` (which holds at least that many bytes).
fn write_front(mem: &GuestMem, segs: &[Segment], bytes: &[u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - done);
        if mem.write_slice(&bytes[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == bytes.len()
}

/// Reads the first `out.len()` bytes of the buffer `segs`.
fn read_front(mem: &GuestMem, segs: &[Segment], out: &mut [u8]) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - done);
        if mem.read_slice(&mut out[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// A frame read from the TAP that did not fit the RX buffers held (`MRG_RXBUF`): its first
/// part is in the first `fills.len()` held buffers, the rest in `Net::overflow[tail..tail_end]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingFrame {
    /// The header to write into the first buffer (checked; `num_buffers` set at completion).
    hdr: NetHdr,
    /// Bytes written into each held buffer used so far, in order.
    fills: Vec<u32>,
    /// Start of what is still to copy in `overflow`.
    tail: usize,
    /// End of the frame in `overflow`.
    tail_end: usize,
    /// Packet length (header included).
    len: u64,
}

/// A virtio-net device over a TAP fd.
#[derive(Debug)]
pub struct Net {
    tap: OwnedFd,
    config: [u8; CONFIG_LEN],
    queue_size: u16,
    features: u64,
    /// RX buffers taken from the queue and not yet filled (oldest first).
    rx_held: VecDeque<RxBuffer>,
    /// Offloads the driver negotiated (none until `activate`).
    offloads: Offloads,
    /// `TUNSETOFFLOAD` flags last set on the TAP (`None`: unknown, e.g. set by a dead instance).
    tap_offloads: Option<libc::c_uint>,
    /// A received frame waiting for more RX buffers (`MRG_RXBUF`), if any.
    pending: Option<PendingFrame>,
    /// Where the part of a frame beyond the held RX buffers is read (`MAX_PACKET` + 1 bytes;
    /// pages allocated only where a frame spilled).
    overflow: ZeroPages,
    stats: NetStats,
    shared: Rc<Cell<NetStats>>,
    complaints: u32,
    tx_throttle: Throttle,
    rx_throttle: Throttle,
}

impl Net {
    /// A device with MAC `mac` over `tap` (non-blocking, vnet header size 12), with queues of
    /// up to `queue_size` entries.
    pub fn new(tap: OwnedFd, mac: [u8; 6], queue_size: u16) -> Result<Self, NetError> {
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(NetError::QueueSize(queue_size));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            tap,
            config,
            queue_size,
            features: F_VERSION_1 | F_EVENT_IDX | F_MAC | F_STATUS | F_OFFLOADS,
            rx_held: VecDeque::new(),
            offloads: Offloads::default(),
            tap_offloads: None,
            pending: None,
            overflow: ZeroPages::new(MAX_PACKET + 1).map_err(|e| NetError::Overflow(e.kind()))?,
            stats: NetStats::default(),
            shared: Rc::new(Cell::new(NetStats::default())),
            complaints: 0,
            tx_throttle: Throttle::unlimited(),
            rx_throttle: Throttle::unlimited(),
        })
    }

    /// The TAP fd (to keep open in a jail).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// A handle that always shows the latest counters (e.g. to log them after serving ends).
    pub fn stats_handle(&self) -> Rc<Cell<NetStats>> {
        Rc::clone(&self.shared)
    }

    /// RX buffers held, waiting for frames.
    pub fn rx_buffers_held(&self) -> usize {
        self.rx_held.len()
    }

    /// Whether RX reads the TAP when it can: buffers are held and no frame waits for more
    /// buffers (`MRG_RXBUF`).
    pub fn rx_wants_frames(&self) -> bool {
        !self.rx_held.is_empty() && self.pending.is_none()
    }

    /// Whether a received frame waits in the service for more RX buffers.
    pub fn rx_frame_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// The offloads the driver negotiated (none before `DRIVER_OK` and after a reset).
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The `TUNSETOFFLOAD` flags last set on the TAP by this instance (`None`: not set yet).
    pub fn tap_offloads(&self) -> Option<libc::c_uint> {
        self.tap_offloads
    }

    /// Sets the TAP's offloads (`TUNSETOFFLOAD`), unless this instance already set exactly those.
    fn set_tap_offloads(&mut self, flags: libc::c_uint) -> io::Result<()> {
        if self.tap_offloads == Some(flags) {
            return Ok(());
        }
        self.tap_offloads = None;
        // SAFETY: TUNSETOFFLOAD takes the flags by value as the third argument and touches no
        // memory of ours; the fd is the TAP we own.
        let rc = unsafe { libc::ioctl(self.tap.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.tap_offloads = Some(flags);
        Ok(())
    }

    /// Limits what the guest receives to `rx` and what it sends to `tx` (each direction has a
    /// bucket pair). Enforced once [`arm_rate_limit`](Self::arm_rate_limit) is called; frames are
    /// charged from the start.
    pub fn set_rate_limit(&mut self, rx: &RateLimit, tx: &RateLimit) {
        self.tx_throttle = Throttle::new(tx);
        self.rx_throttle = Throttle::new(rx);
    }

    /// Starts enforcing the rate limit: after the chains in flight at a restart were redone
    /// ([`VirtioDevice::serving`] does).
    pub fn arm_rate_limit(&self) {
        self.tx_throttle.arm();
        self.rx_throttle.arm();
    }

    /// Whether RX may read a frame from the TAP now (rate limit).
    pub fn rx_admissible(&self) -> bool {
        self.rx_throttle.admissible(self.rx_throttle.now())
    }

    /// How long until throttled work can go: TX chains waiting, or held RX buffers while the
    /// TAP is left unread. `None`: nothing waits, or it can go now.
    pub fn throttle_wait(&self) -> Option<Duration> {
        let tx = self.tx_throttle.wake_after(self.tx_throttle.now());
        let rx = if self.rx_wants_frames() { self.rx_throttle.wait(self.rx_throttle.now()) } else { None };
        tx.into_iter().chain(rx).min()
    }

    /// Whether TX chains wait for tokens.
    pub fn tx_throttled(&self) -> bool {
        self.tx_throttle.wake_after(self.tx_throttle.now()).is_some()
    }

    fn complain(&mut self, what: &str) {
        if self.complaints < MAX_COMPLAINTS {
            self.complaints += 1;
            eprintln!("virtio-net: {what}");
        }
    }

    /// Sends one parsed frame: `hdr` (checked by [`check_tx_header`], a copy: never the
    /// guest's own bytes), then the guest's frame bytes, in one `writev`.
    fn send(&self, mem: &GuestMem, frame: &TxFrame, hdr: &[u8; HDR_LEN]) -> io::Result<()> {
        let sl = slices(mem, &frame.frame, Permissions::Read)?;
        let guards: Inline<_> = sl.iter().map(|s| s.ptr_guard()).collect();
        let mut iov: Inline<libc::iovec> = Inline::with_capacity(sl.len() + 1);
        iov.push(libc::iovec { iov_base: hdr.as_ptr().cast_mut().cast(), iov_len: HDR_LEN });
        iov.extend(
            guards
                .iter()
                .zip(&sl)
                .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast_mut().cast(), iov_len: s.len() }),
        );
        let cnt = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        for _ in 0..8 {
            // SAFETY: every iovec points at `hdr` (borrowed for this whole function) or into
            // guest memory kept mapped by `guards`, each with its exact length; the kernel only
            // reads them.
            let n = unsafe { libc::writev(self.tap.as_raw_fd(), iov.as_ptr(), cnt) };
            if n >= 0 {
                // A TAP write takes the whole packet or nothing.
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Err(io::Error::from_raw_os_error(libc::EINTR))
    }

    /// Reads one frame (with its vnet header) into `buf`. Returns the packet length the TAP
    /// reported, which exceeds `buf.cap` when the frame did not fit (it is then truncated).
    fn receive(&self, mem: &GuestMem, buf: &RxBuffer) -> io::Result<u64> {
        let sl = slices(mem, &buf.segs, Permissions::Write)?;
        let guards: Inline<_> = sl.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iov: Inline<libc::iovec> = guards
            .iter()
            .zip(&sl)
            .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: s.len() })
            .collect();
        // One byte past the buffer: a frame that reaches it did not fit (the TAP truncates
        // silently on some kernels and reports the full length on others).
        let mut spill = [0u8; 1];
        iov.push(libc::iovec { iov_base: spill.as_mut_ptr().cast(), iov_len: spill.len() });
        let cnt = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        // SAFETY: every iovec points into guest memory kept mapped by `guards`, or at `spill`
        // (alive until the end of this function), with its exact length; the kernel writes at
        // most that much into each, and no Rust reference aliases guest memory (it is only
        // accessed volatilely).
        let n = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), cnt) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        u64::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EIO))
    }

    fn process_tx(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        let mut done = 0;
        for _ in 0..queue.size() {
            if !self.tx_throttle.admit(self.tx_throttle.now()) {
                self.stats.tx_throttled = self.tx_throttle.refusals();
                break;
            }
            let Some(chain) = queue.pop()? else { break };
            let head = chain.head_index();
            let parsed = parse_tx(mem, chain);
            self.tx_throttle.charge(parsed.as_ref().map_or(0, |f| f.len), 1, self.tx_throttle.now());
            let checked = parsed.and_then(|frame| {
                let mut raw = [0u8; HDR_LEN];
                if !read_front(mem, &frame.hdr, &mut raw) {
                    return Err(NetError::OutsideMemory { addr: frame.hdr.first().map_or(0, |s| s.addr.0), len: 0 });
                }
                let hdr = check_tx_header(&NetHdr::from_bytes(&raw), frame.len, &self.offloads)?;
                Ok((frame, hdr))
            });
            match checked {
                Ok((frame, hdr)) => match self.send(mem, &frame, &hdr.to_bytes()) {
                    Ok(()) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame.len;
                        if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
                            self.stats.tx_csum += 1;
                        }
                        if hdr.gso_type != HDR_GSO_NONE {
                            self.stats.tx_gso += 1;
                        }
                    }
                    Err(e) => {
                        self.stats.tx_errors += 1;
                        self.complain(&format!("TX frame of {} bytes refused by the TAP: {e}", frame.len));
                    }
                },
                Err(e) => {
                    self.stats.tx_dropped += 1;
                    if matches!(e, NetError::Header(_)) {
                        self.stats.tx_bad_headers += 1;
                    }
                    self.complain(&format!("TX chain {head} dropped: {e}"));
                }
            }
            queue.add_used(head, 0)?;
            done += 1;
        }
        Ok(done)
    }

    fn process_rx(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        let size = usize::from(queue.size());
        let mut done = 0;
        // Take every available buffer (at most a queue's worth held).
        for _ in 0..size {
            if self.rx_held.len() >= size {
                break;
            }
            let Some(chain) = queue.pop()? else { break };
            let head = chain.head_index();
            match parse_rx(mem, head, chain) {
                Ok(buf) => self.rx_held.push_back(buf),
                Err(e) => {
                    self.stats.rx_bad_chains += 1;
                    self.complain(&format!("RX chain {head} refused: {e}"));
                    queue.add_used(head, 0)?;
                    done += 1;
                }
            }
        }
        // A frame waiting for buffers goes first; the TAP stays unread until it is delivered.
        done += self.continue_pending(queue)?;
        if self.pending.is_some() {
            return Ok(done);
        }
        // Fill the buffers with whatever the TAP has: one frame per buffer, or (MRG_RXBUF) a
        // frame over as many buffers as it needs.
        for _ in 0..size {
            if self.rx_held.is_empty() {
                break;
            }
            if !self.rx_throttle.admit(self.rx_throttle.now()) {
                self.stats.rx_throttled = self.rx_throttle.refusals();
                break;
            }
            let step = if self.offloads.mrg_rxbuf { self.receive_merged(queue)? } else { self.receive_one(queue)? };
            match step {
                RxStep::Done(n) => done += n,
                RxStep::Stop => break,
            }
            if self.pending.is_some() {
                break;
            }
        }
        Ok(done)
    }

    /// What a failed `readv` of the TAP means for the RX loop.
    fn read_failed(&mut self, e: &io::Error) -> RxStep {
        match e.raw_os_error() {
            _ if e.kind() == io::ErrorKind::WouldBlock => RxStep::Stop,
            Some(libc::EFAULT | libc::EINVAL) => {
                // Kernels that fail the read of a frame larger than the buffer (it is consumed).
                self.stats.rx_dropped += 1;
                RxStep::Done(0)
            }
            _ if e.kind() == io::ErrorKind::Interrupted => RxStep::Done(0),
            _ => {
                self.stats.rx_errors += 1;
                self.complain(&format!("reading the TAP: {e}"));
                RxStep::Stop
            }
        }
    }

    /// The header the TAP put in front of a frame, read back from the first held buffer and
    /// checked against what the driver negotiated (`None`: the frame is dropped and counted).
    fn received_header(&mut self, mem: &GuestMem) -> Option<NetHdr> {
        let mut raw = [0u8; HDR_LEN];
        if !self.rx_held.front().is_some_and(|b| read_front(mem, &b.segs, &mut raw)) {
            self.stats.rx_errors += 1;
            return None;
        }
        match check_rx_header(&NetHdr::from_bytes(&raw), &self.offloads) {
            Ok(h) => Some(h),
            Err(e) => {
                self.stats.rx_dropped += 1;
                self.complain(&format!("RX frame dropped: {e}"));
                None
            }
        }
    }

    /// Without `MRG_RXBUF`: one frame into the oldest held buffer.
    fn receive_one(&mut self, queue: &mut QueueCtx<'_>) -> Result<RxStep, DeviceError> {
        let mem = queue.mem();
        let Some(buf) = self.rx_held.front() else { return Ok(RxStep::Stop) };
        let cap = buf.cap;
        let n = match self.receive(mem, buf) {
            Ok(n) => n,
            Err(e) => return Ok(self.read_failed(&e)),
        };
        self.rx_throttle.charge(n.saturating_sub(HDR_LEN as u64), 1, self.rx_throttle.now());
        if n > cap || n < (HDR_LEN + ETH_HLEN) as u64 {
            // Did not fit (it reached the spill byte, or the TAP reported its full length).
            self.stats.rx_dropped += 1;
            return Ok(RxStep::Done(0));
        }
        let Some(hdr) = self.received_header(mem) else { return Ok(RxStep::Done(0)) };
        // n <= cap <= MAX_PACKET, which fits a u32.
        let fill = u32::try_from(n).unwrap_or(u32::MAX);
        Ok(RxStep::Done(self.complete(queue, hdr, &[fill], n)?))
    }

    /// With `MRG_RXBUF`: one frame read straight into as many held buffers as it needs (the
    /// part beyond them into `overflow`, to wait there for more buffers).
    fn receive_merged(&mut self, queue: &mut QueueCtx<'_>) -> Result<RxStep, DeviceError> {
        let mem = queue.mem();
        let mut sl = Vec::new();
        let mut caps = Vec::new();
        let mut cap_sum = 0u64;
        for buf in &self.rx_held {
            if cap_sum > MAX_PACKET as u64 {
                break;
            }
            let s = match slices(mem, &buf.segs, Permissions::Write) {
                Ok(s) => s,
                Err(e) if caps.is_empty() => {
                    self.stats.rx_errors += 1;
                    self.complain(&format!("RX buffer {}: {e}", buf.head));
                    return Ok(RxStep::Stop);
                }
                Err(_) => break,
            };
            if !caps.is_empty() && sl.len() + s.len() > MAX_RX_IOV {
                break;
            }
            sl.extend(s);
            caps.push(buf.cap);
            cap_sum += buf.cap;
        }
        let over = usize::try_from((MAX_PACKET as u64 + 1).saturating_sub(cap_sum)).unwrap_or(MAX_PACKET).max(1);
        let guards: Inline<_> = sl.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iov: Inline<libc::iovec> = guards
            .iter()
            .zip(&sl)
            .map(|(g, s)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: s.len() })
            .collect();
        iov.push(libc::iovec { iov_base: self.overflow.as_mut_ptr().cast(), iov_len: over.min(self.overflow.len()) });
        let cnt = libc::c_int::try_from(iov.len()).map_err(|_| DeviceError::Queue {
            queue: RX_QUEUE,
            what: "too many RX segments".into(),
            source: None,
        })?;
        // SAFETY: every iovec points into guest memory kept mapped by `guards`, or into
        // `self.overflow` (not otherwise borrowed until the call returns), with its exact length;
        // the kernel writes at most that much into each, and no Rust reference aliases guest
        // memory (it is only accessed volatilely).
        let r = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), cnt) };
        drop(guards);
        let n = if r < 0 {
            return Ok(self.read_failed(&io::Error::last_os_error()));
        } else {
            u64::try_from(r).unwrap_or(0)
        };
        self.rx_throttle.charge(n.saturating_sub(HDR_LEN as u64), 1, self.rx_throttle.now());
        if n > MAX_PACKET as u64 || n < (HDR_LEN + ETH_HLEN) as u64 {
            self.stats.rx_dropped += 1;
            return Ok(RxStep::Done(0));
        }
        let Some(hdr) = self.received_header(mem) else { return Ok(RxStep::Done(0)) };
        let mut fills = Vec::new();
        let mut left = n;
        for cap in caps {
            if left == 0 {
                break;
            }
            let f = cap.min(left);
            // f <= cap <= MAX_PACKET.
            fills.push(u32::try_from(f).unwrap_or(u32::MAX));
            left -= f;
        }
        if left == 0 {
            return Ok(RxStep::Done(self.complete(queue, hdr, &fills, n)?));
        }
        // left <= MAX_PACKET: it was read into `overflow`.
        let tail_end = usize::try_from(left).unwrap_or(0).min(self.overflow.len());
        self.pending = Some(PendingFrame { hdr, fills, tail: 0, tail_end, len: n });
        self.stats.rx_held_frames += 1;
        Ok(RxStep::Done(self.continue_pending(queue)?))
    }

    /// Copies the waiting frame's rest into the held buffers after the ones it already uses;
    /// completes it once all of it is in guest memory. Returns the chains completed.
    fn continue_pending(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        let Some(mut p) = self.pending.take() else { return Ok(0) };
        while p.tail < p.tail_end {
            let Some(buf) = self.rx_held.get(p.fills.len()) else {
                self.pending = Some(p);
                return Ok(0);
            };
            let take = (p.tail_end - p.tail).min(usize::try_from(buf.cap).unwrap_or(usize::MAX));
            if take == 0 || !write_front(mem, &buf.segs, &self.overflow[p.tail..p.tail + take]) {
                // Unusable buffer: the frame is lost, the buffers stay held for the next one.
                self.stats.rx_errors += 1;
                return Ok(0);
            }
            // take <= cap <= MAX_PACKET.
            p.fills.push(u32::try_from(take).unwrap_or(u32::MAX));
            p.tail += take;
        }
        self.complete(queue, p.hdr, &p.fills, p.len)
    }

    /// Delivers a frame that fills the first `fills.len()` held buffers: writes its header
    /// (with `num_buffers`) into the first one and completes them in order.
    fn complete(
        &mut self,
        queue: &mut QueueCtx<'_>,
        mut hdr: NetHdr,
        fills: &[u32],
        len: u64,
    ) -> Result<usize, DeviceError> {
        let mem = queue.mem();
        if fills.is_empty() || fills.len() > self.rx_held.len() {
            self.stats.rx_errors += 1;
            return Ok(0);
        }
        hdr.num_buffers = u16::try_from(fills.len()).unwrap_or(u16::MAX);
        if !self.rx_held.front().is_some_and(|b| write_front(mem, &b.segs, &hdr.to_bytes())) {
            self.stats.rx_errors += 1;
            return Ok(0);
        }
        // One used-index update for the whole frame: the driver never sees part of it.
        let mut elems = Vec::with_capacity(fills.len());
        for &fill in fills {
            let Some(buf) = self.rx_held.pop_front() else { break };
            elems.push((buf.head, fill));
        }
        queue.add_used_batch(&elems)?;
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += len - HDR_LEN as u64;
        if fills.len() > 1 {
            self.stats.rx_merged += 1;
        }
        if hdr.flags & HDR_F_NEEDS_CSUM != 0 {
            self.stats.rx_csum += 1;
        }
        if hdr.gso_type != HDR_GSO_NONE {
            self.stats.rx_gso += 1;
        }
        Ok(fills.len())
    }
}

/// What one read of the TAP did: completed this many chains (0: nothing, or a frame dropped;
/// go on), or stop reading for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStep {
    Done(usize),
    Stop,
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> bool {
        super::read_config_bytes(&self.config, offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered).
        false
    }

    fn process_queue(&mut self, queue: &mut QueueCtx<'_>) -> Result<usize, DeviceError> {
        let r = match queue.index() {
            RX_QUEUE => self.process_rx(queue),
            TX_QUEUE => self.process_tx(queue),
            other => Err(DeviceError::Queue { queue: other, what: "no such queue".into(), source: None }),
        };
        self.shared.set(self.stats);
        r
    }

    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        if features & !self.features() != 0 {
            return Err(DeviceError::Activate(format!("features {features:#x} not offered")));
        }
        let off = Offloads::from_features(features);
        let flags = off.tun_flags();
        self.set_tap_offloads(flags).map_err(|e| DeviceError::Activate(format!("TUNSETOFFLOAD {flags:#x}: {e}")))?;
        self.offloads = off;
        Ok(())
    }

    fn report_counts(&self) -> std::collections::BTreeMap<String, u64> {
        let s = self.stats;
        // Whether the TAP has a frame now (a zero-timeout poll; nothing is read).
        let tap_readable = ipc::wait::wait_readable(self.tap.as_fd(), Duration::ZERO).unwrap_or(false);
        [
            ("rx_held".into(), self.rx_held.len() as u64),
            ("rx_frame_waiting".into(), u64::from(self.pending.is_some())),
            ("tap_readable".into(), u64::from(tap_readable)),
            ("rx_frames".into(), s.rx_frames),
            ("tx_frames".into(), s.tx_frames),
            ("tx_throttled".into(), u64::from(self.tx_throttled())),
        ]
        .into()
    }

    fn reset(&mut self) {
        self.rx_held.clear();
        self.pending = None;
        self.offloads = Offloads::default();
        self.tx_throttle.clear_wait();
        if let Err(e) = self.set_tap_offloads(0) {
            self.complain(&format!("TUNSETOFFLOAD 0 after a reset: {e}"));
        }
    }

    fn serving(&self) {
        self.arm_rate_limit();
    }

    fn own_work(&self) -> Option<(RawFd, usize)> {
        // The TAP is read only into RX buffers held, and only while RX tokens allow.
        (self.rx_wants_frames() && self.rx_admissible()).then(|| (self.tap_fd(), usize::from(RX_QUEUE)))
    }

    fn wake_after(&self) -> Option<Duration> {
        self.throttle_wait()
    }

    fn pending_waits_for_tokens(&self) -> bool {
        self.tx_throttled()
    }

    fn update_rate_limit(&mut self, limits: &RateLimitUpdate) -> bool {
        let RateLimitUpdate::Net { rx, tx } = limits else { return false };
        self.set_rate_limit(rx, tx);
        self.arm_rate_limit();
        true
    }

    fn io_counters(&self) -> Option<IoCounters> {
        let s = self.stats();
        Some(IoCounters {
            requests: s.tx_frames + s.rx_frames,
            bytes_to_guest: s.rx_bytes,
            bytes_from_guest: s.tx_bytes,
            throttled: s.tx_throttled + s.rx_throttled,
            errors: s.tx_dropped + s.tx_errors + s.rx_dropped + s.rx_bad_chains + s.rx_errors,
            host_errors: s.tx_errors + s.rx_errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MEM: usize = 0x4000;

    fn guest(bytes: &[u8]) -> GuestMem {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
        m.write_slice(bytes, GuestAddress(0)).expect("fill");
        m
    }

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut f = 0u16;
        if write {
            f |= u16::try_from(VRING_DESC_F_WRITE).expect("flag");
        }
        if next {
            f |= u16::try_from(VRING_DESC_F_NEXT).expect("flag");
        }
        Descriptor::new(addr, len, f, 0)
    }

    /// A pipe standing in for the TAP: the write end is the "TAP" for TX.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        (r, w)
    }

    #[test]
    fn tx_parser_splits_the_header_and_refuses_hostile_chains() {
        let m = guest(&[0u8; MEM]);
        let f = parse_tx(&m, [d(0x100, 8, false, true), d(0x200, 70, false, false)]).expect("valid");
        assert_eq!(f.len, 66);
        assert_eq!(f.frame.as_slice(), [Segment { addr: GuestAddress(0x204), len: 66 }]);
        let cases: Vec<(Vec<Descriptor>, NetError)> = vec![
            (vec![], NetError::TooShort(0)),
            (vec![d(0x100, 0, false, false)], NetError::TooShort(0)),
            (vec![d(0x100, 20, false, false)], NetError::TooShort(20)),
            (vec![d(0x100, 60, true, false)], NetError::WrongDirection),
            (vec![d(0x100, 12, false, true), d(0x200, 60, true, false)], NetError::WrongDirection),
            (vec![d(0x3fff, 60, false, false)], NetError::OutsideMemory { addr: 0x3fff, len: 60 }),
            (vec![d(0x100, 60, false, true)], NetError::Truncated),
        ];
        for (descs, want) in cases {
            assert_eq!(parse_tx(&m, descs.clone()), Err(want), "{descs:?}");
        }
        // More than 64 KiB from in-range descriptors (the same page over and over).
        let many: Vec<Descriptor> = (0..30).map(|_| d(0, 0x1000, false, true)).collect();
        assert_eq!(parse_tx(&m, many), Err(NetError::TooBig(17 * 0x1000)));
        let long: Vec<Descriptor> = (0..=MAX_DESCRIPTORS).map(|_| d(0x100, 1, false, true)).collect();
        assert_eq!(parse_tx(&m, long), Err(NetError::TooLong));
    }

    #[test]
    fn rx_parser_caps_and_refuses() {
        let m = guest(&[0u8; MEM]);
        let b = parse_rx(&m, 3, [d(0x100, 6, true, true), d(0x200, 2042, true, false)]).expect("valid");
        assert_eq!((b.head, b.cap), (3, 2048));
        assert_eq!(parse_rx(&m, 0, [d(0x100, 2048, false, false)]), Err(NetError::WrongDirection));
        assert_eq!(parse_rx(&m, 0, [d(0x100, 20, true, false)]), Err(NetError::TooShort(20)));
        assert!(matches!(parse_rx(&m, 0, [d(0x1_0000, 2048, true, false)]), Err(NetError::OutsideMemory { .. })));
    }

    #[test]
    fn the_transport_serves_the_devices_hooks() {
        use crate::runtime::MmioHandler;
        let (_r, w) = pipe();
        let tap = w.as_raw_fd();
        let n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
        let notify = vec![
            vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
            vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
        ];
        let mut t =
            MmioTransport::new(n, guest(&[0u8; MEM]), notify, vmm_sys_util::eventfd::EventFd::new(0).expect("irqfd"))
                .expect("transport");
        // No driver, no RX buffers: the TAP is not waited on, only the two kicks.
        assert_eq!(t.event_fds().len(), 2);
        assert!(!t.event_fds().contains(&tap));
        assert!(!t.poll().expect("poll"), "nothing to do");
        // Rate limits and counters are the device's.
        let limit = RateLimit { ops_per_sec: 10, ..RateLimit::default() };
        assert!(!t.set_rate_limit(&RateLimitUpdate::Block(limit)), "a NIC has no disk limit");
        assert!(t.set_rate_limit(&RateLimitUpdate::Net { rx: limit, tx: RateLimit::default() }));
        assert_eq!(t.io_counters(), IoCounters::default());
        assert_eq!(t.wake_after(), None, "nothing waits for tokens");
    }

    #[test]
    fn the_net_transport_keeps_an_interrupt_raised_after_a_posted_ack() {
        let (_r, w) = pipe();
        let n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
        let notify = vec![
            vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
            vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
        ];
        let mut t =
            MmioTransport::new(n, guest(&[0u8; MEM]), notify, vmm_sys_util::eventfd::EventFd::new(0).expect("irqfd"))
                .expect("transport");
        crate::virtio::mmio::handler_checks::a_posted_ack_keeps_a_later_interrupt(&mut t);
    }

    #[test]
    fn config_space_reads_at_every_width() {
        let (_r, w) = pipe();
        let n = Net::new(w, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 256).expect("net");
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            assert!(n.read_config(i as u64, &mut one));
            *b = one[0];
        }
        assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let mut two = [0u8; 2];
        assert!(n.read_config(6, &mut two));
        assert_eq!(u16::from_le_bytes(two), S_LINK_UP);
        let mut four = [0u8; 4];
        assert!(n.read_config(0, &mut four));
        assert_eq!(four, [0x52, 0x54, 0, 0x12]);
        assert!(!n.read_config(8, &mut four), "past the end");
        assert_eq!(n.features() & (F_VERSION_1 | F_MAC | F_STATUS), F_VERSION_1 | F_MAC | F_STATUS);
        let (_r2, w2) = pipe();
        assert_eq!(Net::new(w2, [0; 6], 100).err(), Some(NetError::QueueSize(100)));
    }

    fn descriptor() -> impl Strategy<Value = Descriptor> {
        let addr = prop_oneof![0u64..MEM as u64, (MEM as u64 - 64)..(MEM as u64 + 64), any::<u64>()];
        let len = prop_oneof![0u32..64, 0u32..4096, Just(12u32), any::<u32>()];
        (addr, len, 0u16..8, 0u16..20).prop_map(|(a, l, f, n)| Descriptor::new(a, l, f, n))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// The TX parser over random memory and descriptor lists: never panics, and an accepted
        /// frame only names readable guest memory, is at least an Ethernet header and at most
        /// MAX_PACKET with its header.
        #[test]
        fn tx_parser_accepts_only_sound_frames(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            descs in proptest::collection::vec(descriptor(), 0..12),
        ) {
            let m = guest(&bytes);
            if let Ok(f) = parse_tx(&m, descs) {
                prop_assert!(f.len >= ETH_HLEN as u64 && f.len + HDR_LEN as u64 <= MAX_PACKET as u64);
                prop_assert_eq!(total(&f.frame), f.len);
                for s in &f.frame {
                    prop_assert!(s.len > 0);
                    prop_assert!(m.check_range(s.addr, s.len as usize, Permissions::Read));
                }
            }
        }

        /// Whole TX queues of random guest memory through `process_queue` (the TAP is a pipe):
        /// never panics, completes at most what was offered, and every completed chain is
        /// counted as sent, dropped or refused.
        #[test]
        fn tx_queue_survives_random_guest_memory(
            bytes in proptest::collection::vec(any::<u8>(), MEM),
            avail_idx in 0u16..40,
            size_log in 1u32..5,
        ) {
            let m = guest(&bytes);
            let (_r, w) = pipe();
            let mut n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
            let size = 1u16 << size_log;
            let mut q = crate::virtio::test_queue(size);
            m.write_obj(avail_idx, GuestAddress(0x1002)).expect("idx");
            m.write_obj(0u32, GuestAddress(0x2000)).expect("used header");
            match n.process_queue(&mut QueueCtx::untracked(TX_QUEUE, &mut q, &m)) {
                Ok(k) => {
                    prop_assert!(k <= usize::from(size.min(avail_idx)));
                    let used: u16 = m.read_obj(GuestAddress(0x2002)).expect("used");
                    prop_assert_eq!(usize::from(used), k);
                    let s = n.stats();
                    prop_assert_eq!(s.tx_frames + s.tx_dropped + s.tx_errors, k as u64);
                }
                Err(DeviceError::Queue { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    /// A ready queue of `size` at 0 / 0x1000 / 0x2000 in `m`, its used index zeroed.
    fn queue(m: &GuestMem, size: u16) -> Queue {
        let q = crate::virtio::test_queue(size);
        m.write_obj(0u16, GuestAddress(0x2002)).expect("used idx");
        q
    }

    /// Makes descriptor `i` (one buffer, `flags`) available as the `nth` avail entry.
    fn offer(m: &GuestMem, nth: u16, i: u16, addr: u64, len: u32, flags: u16) {
        let at = 16 * u64::from(i);
        m.write_obj(addr, GuestAddress(at)).expect("addr");
        m.write_obj(len, GuestAddress(at + 8)).expect("len");
        m.write_obj(flags, GuestAddress(at + 12)).expect("flags");
        m.write_obj(i, GuestAddress(0x1004 + 2 * u64::from(nth % 16))).expect("ring");
        m.write_obj(nth.wrapping_add(1), GuestAddress(0x1002)).expect("idx");
    }

    fn used(m: &GuestMem, k: u16) -> (u16, u32) {
        let at = 0x2004 + 8 * u64::from(k);
        let id: u32 = m.read_obj(GuestAddress(at)).expect("id");
        (u16::try_from(id).expect("id"), m.read_obj(GuestAddress(at + 4)).expect("len"))
    }

    #[test]
    fn tx_passes_a_checked_copy_of_the_header_and_refuses_the_rest() {
        let m = guest(&[0u8; MEM]);
        let frame: Vec<u8> = (0..60u8).collect();
        m.write_slice(&frame, GuestAddress(0x3000 + HDR_LEN as u64)).expect("frame");
        let (r, w) = pipe();
        let mut n = Net::new(w, [2, 0, 0, 0, 0, 1], 16).expect("net");
        let mut q = queue(&m, 4);
        // Garbage header with nothing negotiated: refused, nothing written.
        m.write_slice(&[0xffu8; HDR_LEN], GuestAddress(0x3000)).expect("guest header");
        offer(&m, 0, 0, 0x3000, 72, 0);
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(TX_QUEUE, &mut q, &m)).expect("tx"), 1);
        assert_eq!((n.stats().tx_dropped, n.stats().tx_bad_headers, n.stats().tx_frames), (1, 1, 0));
        // NEEDS_CSUM with CSUM negotiated: passed on, num_buffers and unchecked fields cleared.
        n.offloads = Offloads::from_features(F_CSUM);
        let hdr =
            NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, num_buffers: 9, ..NetHdr::default() };
        m.write_slice(&hdr.to_bytes(), GuestAddress(0x3000)).expect("guest header");
        offer(&m, 1, 1, 0x3000, 72, 0);
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(TX_QUEUE, &mut q, &m)).expect("tx"), 1);
        let mut got = [0u8; 100];
        let k = nix::unistd::read(r.as_raw_fd(), &mut got).expect("read pipe");
        assert_eq!(k, 72);
        let want = NetHdr { num_buffers: 0, ..hdr };
        assert_eq!(NetHdr::from_bytes(&got[..HDR_LEN].try_into().expect("12")), want);
        assert_eq!(got[HDR_LEN..72], frame[..]);
        assert_eq!((n.stats().tx_frames, n.stats().tx_csum), (1, 1));
        assert_eq!(n.stats_handle().get().tx_bytes, 60);
    }

    #[test]
    fn offloads_follow_their_dependencies() {
        let all = Offloads::from_features(F_OFFLOADS);
        assert!(all.tx_csum && all.tx_tso4 && all.tx_tso6 && all.tx_ecn && all.mrg_rxbuf);
        assert_eq!(all.tun_flags(), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN);
        // TSO without the checksum feature, ECN without TSO: unusable.
        let o = Offloads::from_features(F_HOST_TSO4 | F_GUEST_TSO4 | F_GUEST_ECN | F_HOST_ECN);
        assert_eq!(o, Offloads::default());
        assert_eq!(o.tun_flags(), 0);
        let o = Offloads::from_features(F_GUEST_CSUM | F_GUEST_TSO6);
        assert_eq!(o.tun_flags(), libc::TUN_F_CSUM | libc::TUN_F_TSO6);
        assert!(!o.tx_csum && !o.rx_tso4 && !o.rx_ecn);
        let h = NetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[2..4], [0x34, 0x12]);
    }

    #[test]
    fn tx_headers_are_checked_against_what_was_negotiated() {
        let none = Offloads::default();
        let csum = Offloads::from_features(F_CSUM);
        let tso4 = Offloads::from_features(F_CSUM | F_HOST_TSO4);
        let all = Offloads::from_features(F_OFFLOADS);
        let c =
            |start, off| NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: start, csum_offset: off, ..NetHdr::default() };
        let tso = |ty, size| NetHdr { gso_type: ty, gso_size: size, hdr_len: 54, ..c(34, 16) };
        assert_eq!(check_tx_header(&NetHdr::default(), 60, &none), Ok(NetHdr::default()));
        // gso_size and hdr_len are not passed on without GSO.
        let plain = NetHdr { gso_size: 7, hdr_len: 9, ..NetHdr::default() };
        assert_eq!(check_tx_header(&plain, 60, &none), Ok(NetHdr::default()));
        assert_eq!(check_tx_header(&c(34, 6), 60, &csum), Ok(c(34, 6)));
        assert_eq!(check_tx_header(&c(34, 24), 60, &csum), Ok(c(34, 24)), "the last two bytes of the frame");
        assert_eq!(check_tx_header(&tso(HDR_GSO_TCPV4, 1448), 4398, &tso4), Ok(tso(HDR_GSO_TCPV4, 1448)));
        let ecn = HDR_GSO_TCPV6 | HDR_GSO_ECN;
        assert_eq!(check_tx_header(&tso(ecn, 1428), 4398, &all), Ok(tso(ecn, 1428)));
        for (h, len, off, why) in [
            (c(34, 6), 60, none, "NEEDS_CSUM without CSUM"),
            (NetHdr { flags: HDR_F_DATA_VALID, ..NetHdr::default() }, 60, all, "DATA_VALID from the driver"),
            (NetHdr { flags: 0x80, ..NetHdr::default() }, 60, all, "unknown flag"),
            (c(34, 25), 60, all, "checksum past the end"),
            (c(u16::MAX, u16::MAX), 60, all, "checksum far past the end"),
            (c(4, 2), 60, all, "checksum inside the Ethernet header"),
            (tso(HDR_GSO_TCPV4, 1448), 4398, csum, "TSO4 not negotiated"),
            (tso(HDR_GSO_TCPV6, 1448), 4398, tso4, "TSO6 not negotiated"),
            (tso(HDR_GSO_TCPV4 | HDR_GSO_ECN, 1448), 4398, tso4, "ECN not negotiated"),
            (tso(3 /* UDP */, 1448), 4398, all, "UFO never offered"),
            (tso(5 /* UDP_L4 */, 1448), 4398, all, "USO never offered"),
            (tso(HDR_GSO_ECN, 1448), 4398, all, "ECN alone"),
            (tso(HDR_GSO_TCPV4, 0), 4398, all, "gso_size 0"),
            (NetHdr { flags: 0, ..tso(HDR_GSO_TCPV4, 1448) }, 4398, all, "GSO without NEEDS_CSUM"),
            (NetHdr { hdr_len: 5000, ..tso(HDR_GSO_TCPV4, 1448) }, 4398, all, "hdr_len past the frame"),
        ] {
            assert!(matches!(check_tx_header(&h, len, &off), Err(NetError::Header(_))), "{why}: {h:?}");
        }
    }

    #[test]
    fn rx_headers_from_the_tap_are_checked_too() {
        let none = Offloads::default();
        let csum = Offloads::from_features(F_GUEST_CSUM);
        let all = Offloads::from_features(F_OFFLOADS);
        let partial = NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..NetHdr::default() };
        let gso = NetHdr { gso_type: HDR_GSO_TCPV4, gso_size: 1448, hdr_len: 66, ..partial };
        assert_eq!(check_rx_header(&NetHdr::default(), &none), Ok(NetHdr::default()));
        assert_eq!(check_rx_header(&partial, &csum), Ok(partial));
        assert_eq!(check_rx_header(&gso, &all), Ok(gso));
        let valid = NetHdr { flags: HDR_F_DATA_VALID, ..NetHdr::default() };
        assert_eq!(check_rx_header(&valid, &none), Ok(NetHdr::default()), "the hint is dropped");
        assert_eq!(check_rx_header(&valid, &csum), Ok(valid));
        assert!(check_rx_header(&partial, &none).is_err());
        assert!(check_rx_header(&gso, &csum).is_err());
        assert!(check_rx_header(
            &NetHdr { gso_type: HDR_GSO_TCPV4 | HDR_GSO_ECN, ..gso },
            &Offloads { rx_ecn: false, ..all }
        )
        .is_err());
        assert!(check_rx_header(&NetHdr { gso_type: 3, ..gso }, &all).is_err());
        assert!(check_rx_header(&NetHdr { flags: 4, ..NetHdr::default() }, &all).is_err());
    }

    /// A datagram socket pair standing in for the TAP on RX: one `readv` reads one frame.
    fn dgram() -> (OwnedFd, OwnedFd) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        socketpair(AddressFamily::Unix, SockType::Datagram, None, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
            .expect("socketpair")
    }

    #[test]
    fn mergeable_rx_spreads_a_frame_and_holds_what_does_not_fit_yet() {
        const BIG: usize = 0x10000;
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BIG)]).expect("mem");
        let (dev, host) = dgram();
        let mut n = Net::new(dev, [2, 0, 0, 0, 0, 1], 16).expect("net");
        n.offloads = Offloads::from_features(F_GUEST_CSUM | F_MRG_RXBUF);
        let mut q = queue(&m, 16);
        let hdr = NetHdr { flags: HDR_F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..NetHdr::default() };
        let frame: Vec<u8> = (0..9000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut pkt = hdr.to_bytes().to_vec();
        pkt.extend_from_slice(&frame);
        // Two 4 KiB buffers: not enough for 9012 bytes; the frame waits in the service.
        for i in 0..2u16 {
            offer(&m, i, i, 0x4000 + 0x1000 * u64::from(i), 0x1000, 2);
        }
        nix::sys::socket::send(host.as_raw_fd(), &pkt, nix::sys::socket::MsgFlags::empty()).expect("send");
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(RX_QUEUE, &mut q, &m)).expect("rx"), 0);
        assert!(n.rx_frame_waiting() && !n.rx_wants_frames());
        assert_eq!(n.stats().rx_held_frames, 1);
        // A second frame stays in the socket meanwhile; a third buffer completes the first.
        nix::sys::socket::send(host.as_raw_fd(), &pkt[..HDR_LEN + 100], nix::sys::socket::MsgFlags::empty())
            .expect("send");
        offer(&m, 2, 2, 0x6000, 0x1000, 2);
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(RX_QUEUE, &mut q, &m)).expect("rx"), 3);
        assert!(!n.rx_frame_waiting());
        assert_eq!([used(&m, 0), used(&m, 1), used(&m, 2)], [(0, 0x1000), (1, 0x1000), (2, 9012 - 0x2000)]);
        let mut got = vec![0u8; 3 * 0x1000];
        m.read_slice(&mut got, GuestAddress(0x4000)).expect("read");
        let want = NetHdr { num_buffers: 3, ..hdr };
        assert_eq!(NetHdr::from_bytes(&got[..HDR_LEN].try_into().expect("12")), want);
        assert!(got[HDR_LEN..9012] == frame[..], "frame intact over three buffers");
        assert_eq!((n.stats().rx_frames, n.stats().rx_merged, n.stats().rx_csum), (1, 1, 1));
        // The small frame goes into one buffer with num_buffers 1.
        offer(&m, 3, 3, 0x8000, 0x1000, 2);
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(RX_QUEUE, &mut q, &m)).expect("rx"), 1);
        assert_eq!(used(&m, 3), (3, 112));
        let mut h = [0u8; HDR_LEN];
        m.read_slice(&mut h, GuestAddress(0x8000)).expect("read");
        assert_eq!(NetHdr::from_bytes(&h).num_buffers, 1);
        // A GSO frame the driver did not negotiate: dropped, the buffer kept for the next one.
        let bad = NetHdr { gso_type: HDR_GSO_TCPV4, gso_size: 1448, ..hdr };
        let mut pkt2 = bad.to_bytes().to_vec();
        pkt2.extend_from_slice(&frame[..200]);
        nix::sys::socket::send(host.as_raw_fd(), &pkt2, nix::sys::socket::MsgFlags::empty()).expect("send");
        offer(&m, 4, 4, 0xa000, 0x1000, 2);
        assert_eq!(n.process_queue(&mut QueueCtx::untracked(RX_QUEUE, &mut q, &m)).expect("rx"), 0);
        assert_eq!((n.stats().rx_dropped, n.rx_buffers_held()), (1, 1));
        // A reset forgets held buffers and any waiting frame.
        n.reset();
        assert_eq!((n.rx_buffers_held(), n.rx_frame_waiting(), n.offloads()), (0, false, Offloads::default()));
    }
}
