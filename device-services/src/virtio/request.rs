//! Parsing of virtio-blk requests: a pure function over guest memory and a descriptor chain.
//!
//! The chain is hostile: it may loop (the queue crate bounds it and we see the last descriptor
//! still claiming a successor), point outside guest RAM, mix directions, be too long or too short,
//! or name sectors past the end. [`parse_request`] turns it into a [`Request`] whose every guest
//! range was checked, or a [`RequestError`] saying why and where the status byte is (if it can be
//! found) so the device can answer IOERR.

use virtio_bindings::virtio_blk;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::memory::Inline;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Length of the request header (type, reserved, sector).
pub const HEADER_LEN: u64 = 16;
/// Most descriptors accepted in one chain (also bounds the iovecs of one request, <= IOV_MAX).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Length of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_LEN: u64 = 16;

/// Request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write sectors from the guest.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Return the 20-byte device id.
    GetId,
    /// Deallocate a range.
    Discard,
    /// Zero a range.
    WriteZeroes,
    /// Any other type (answered with UNSUPP).
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            virtio_blk::VIRTIO_BLK_T_IN => Self::In,
            virtio_blk::VIRTIO_BLK_T_OUT => Self::Out,
            virtio_blk::VIRTIO_BLK_T_FLUSH => Self::Flush,
            virtio_blk::VIRTIO_BLK_T_GET_ID => Self::GetId,
            virtio_blk::VIRTIO_BLK_T_DISCARD => Self::Discard,
            virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A range of guest memory (checked to be inside guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector (In/Out; 0 otherwise).
    pub sector: u64,
    /// The data buffers: device-writable for In/GetId, device-readable otherwise.
    pub data: Inline<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain ends in a descriptor that still claims a successor (a loop, or a bad index).
    #[error("chain truncated (loop or bad next index)")]
    Truncated,
    /// No device-writable byte at the end for the status.
    #[error("no status byte")]
    NoStatus,
    /// A device-readable descriptor after a writable one, or data in the wrong direction.
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
    /// Fewer than 16 readable bytes for the header.
    #[error("header shorter than 16 bytes")]
    TooShort,
    /// Data length is not a multiple of 512.
    #[error("data length {0} not a multiple of 512")]
    Unaligned(u64),
    /// Sectors past the end of the disk.
    #[error("sectors {sector}+{sectors} past the end ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// Discard / write-zeroes payload is not exactly one segment.
    #[error("discard/write-zeroes payload of {0} bytes (one 16-byte segment expected)")]
    BadSegments(u64),
}

/// A rejected chain: why, and where the status byte is if it could be located.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// Why.
    pub error: ParseError,
    /// The last byte of the last (device-writable) descriptor, when it is in guest RAM.
    pub status: Option<GuestAddress>,
}

/// Splits off the first `n` bytes of `segs` (returned) and leaves the rest in `segs`.
pub(crate) fn take_front(segs: &mut Inline<Segment>, mut n: u64) -> Inline<Segment> {
    let mut front = Inline::new();
    let mut i = 0;
    while n > 0 && i < segs.len() {
        let s = segs[i];
        let take = u64::from(s.len).min(n);
        // take <= s.len, a u32.
        let take32 = u32::try_from(take).unwrap_or(s.len);
        front.push(Segment { addr: s.addr, len: take32 });
        if take32 == s.len {
            i += 1;
        } else {
            segs[i] = Segment { addr: s.addr.unchecked_add(take), len: s.len - take32 };
        }
        n -= take;
    }
    segs.drain(..i);
    front
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Parses one descriptor chain into a request against a disk of `capacity` sectors.
///
/// Never panics and reads at most [`MAX_DESCRIPTORS`] descriptors from `descs` (which, for a
/// `virtio_queue::DescriptorChain`, is itself bounded by the queue size).
pub fn parse_request<M, I>(mem: &M, descs: I, capacity: u64) -> Result<Request, RequestError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut all: Inline<Descriptor> = Inline::new();
    for d in descs {
        if all.len() == MAX_DESCRIPTORS {
            return Err(RequestError { error: ParseError::TooLong, status: None });
        }
        all.push(d);
    }
    // The status byte: last byte of the last descriptor, which must be device-writable.
    let status = all
        .last()
        .filter(|d| d.is_write_only() && d.len() > 0)
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
        .filter(|a| mem.check_range(*a, 1, Permissions::Write));
    let fail = |error| Err(RequestError { error, status });
    let Some(status_addr) = status else {
        return Err(RequestError { error: ParseError::NoStatus, status: None });
    };
    if all.last().is_some_and(|d| d.has_next()) {
        return fail(ParseError::Truncated);
    }
    let mut readable = Inline::new();
    let mut writable = Inline::new();
    for d in &all {
        let len = d.len();
        let perm = if d.is_write_only() { Permissions::Write } else { Permissions::Read };
        if d.is_write_only() {
            if len > 0 {
                writable.push(Segment { addr: d.addr(), len });
            }
        } else if !writable.is_empty() {
            return fail(ParseError::WrongDirection);
        } else if len > 0 {
            readable.push(Segment { addr: d.addr(), len });
        }
        let Ok(ulen) = usize::try_from(len) else { return fail(ParseError::OutsideMemory { addr: d.addr().0, len }) };
        if len > 0 && !mem.check_range(d.addr(), ulen, perm) {
            return fail(ParseError::OutsideMemory { addr: d.addr().0, len });
        }
    }
    if total(&readable) < HEADER_LEN {
        return fail(ParseError::TooShort);
    }
    let mut header = [0u8; 16];
    const _: () = assert!(HEADER_LEN == 16);
    let mut filled = 0usize;
    for s in take_front(&mut readable, HEADER_LEN) {
        let n = s.len as usize;
        if mem.read_slice(&mut header[filled..filled + n], s.addr).is_err() {
            return fail(ParseError::OutsideMemory { addr: s.addr.0, len: s.len });
        }
        filled += n;
    }
    // The status byte is the last writable byte; the rest of the writable part is data.
    let wtotal = total(&writable);
    let mut status_seg = writable;
    let wdata = take_front(&mut status_seg, wtotal.saturating_sub(1));
    let rdata = readable;

    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    let kind = RequestType::from_raw(u32::from_le_bytes([t0, t1, t2, t3]));
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let range_check = |len: u64| -> Result<(), ParseError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(ParseError::Unaligned(len));
        }
        let sectors = len / SECTOR;
        match sector.checked_add(sectors) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(ParseError::OutOfRange { sector, sectors, capacity }),
        }
    };
    let (data, sector) = match kind {
        RequestType::In => {
            if !rdata.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            if let Err(e) = range_check(total(&wdata)) {
                return fail(e);
            }
            (wdata, sector)
        }
        RequestType::Out => {
            if !wdata.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            if let Err(e) = range_check(total(&rdata)) {
                return fail(e);
            }
            (rdata, sector)
        }
        RequestType::GetId => {
            if !rdata.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            (wdata, 0)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if !wdata.is_empty() {
                return fail(ParseError::WrongDirection);
            }
            let len = total(&rdata);
            if len != DISCARD_SEGMENT_LEN {
                return fail(ParseError::BadSegments(len));
            }
            (rdata, 0)
        }
        RequestType::Flush | RequestType::Unsupported(_) => (Inline::new(), 0),
    };
    let data_len = total(&data);
    Ok(Request { kind, sector, data, data_len, status: status_addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const CAP: u64 = 128;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem")
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).expect("t");
        m.write_obj(sector, GuestAddress(at + 8)).expect("s");
    }

    fn d(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut f = 0;
        if write {
            f |= u16::try_from(VRING_DESC_F_WRITE).expect("flag");
        }
        if next {
            f |= u16::try_from(VRING_DESC_F_NEXT).expect("flag");
        }
        Descriptor::new(addr, len, f, 0)
    }

    #[test]
    fn read_request_with_split_header_and_shared_status() {
        let m = mem();
        header(&m, 0x100, virtio_blk::VIRTIO_BLK_T_IN, 3);
        // Header split over two descriptors; status byte at the end of the data descriptor.
        let descs = [d(0x100, 10, false, true), d(0x10a, 6, false, true), d(0x1000, 1025, true, false)];
        let r = parse_request(&m, descs, CAP).expect("valid");
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 3);
        assert_eq!(r.data.as_slice(), [Segment { addr: GuestAddress(0x1000), len: 1024 }]);
        assert_eq!(r.status, GuestAddress(0x1400));
    }

    #[test]
    fn hostile_chains_are_refused_with_a_reason() {
        let m = mem();
        header(&m, 0x100, virtio_blk::VIRTIO_BLK_T_IN, 0);
        let st = Some(GuestAddress(0x2000));
        let cases: Vec<(Vec<Descriptor>, ParseError, Option<GuestAddress>)> = vec![
            (vec![d(0x100, 16, false, false)], ParseError::NoStatus, None),
            (
                vec![d(0x100, 16, false, true), d(0x1000, 512, true, true), d(0x2000, 1, true, true)],
                ParseError::Truncated,
                st,
            ),
            (
                vec![d(0x1000, 512, true, true), d(0x100, 16, false, true), d(0x2000, 1, true, false)],
                ParseError::WrongDirection,
                st,
            ),
            (
                vec![d(0x100, 16, false, true), d(0xfff_ff00, 512, true, true), d(0x2000, 1, true, false)],
                ParseError::OutsideMemory { addr: 0xfff_ff00, len: 512 },
                st,
            ),
            (vec![d(0x100, 8, false, true), d(0x2000, 1, true, false)], ParseError::TooShort, st),
            (
                vec![d(0x100, 16, false, true), d(0x1000, 100, true, true), d(0x2000, 1, true, false)],
                ParseError::Unaligned(100),
                st,
            ),
            (vec![d(0x100, 16, false, true), d(0xffff, 2, true, false)], ParseError::NoStatus, None),
        ];
        for (descs, want, status) in cases {
            let e = parse_request(&m, descs.clone(), CAP).expect_err("must be refused");
            assert_eq!((e.error, e.status), (want, status), "{descs:?}");
        }
        header(&m, 0x100, virtio_blk::VIRTIO_BLK_T_IN, CAP - 1);
        let e =
            parse_request(&m, [d(0x100, 16, false, true), d(0x1000, 1024, true, true), d(0x2000, 1, true, false)], CAP)
                .expect_err("past the end");
        assert_eq!(e.error, ParseError::OutOfRange { sector: CAP - 1, sectors: 2, capacity: CAP });
        header(&m, 0x100, virtio_blk::VIRTIO_BLK_T_IN, u64::MAX);
        let e =
            parse_request(&m, [d(0x100, 16, false, true), d(0x1000, 512, true, true), d(0x2000, 1, true, false)], CAP)
                .expect_err("overflowing sector");
        assert!(matches!(e.error, ParseError::OutOfRange { .. }));
        let long: Vec<Descriptor> = (0..MAX_DESCRIPTORS + 1).map(|_| d(0x100, 16, false, true)).collect();
        assert_eq!(parse_request(&m, long, CAP).expect_err("long").error, ParseError::TooLong);
    }

    #[test]
    fn write_with_writable_data_is_wrong_direction() {
        let m = mem();
        header(&m, 0x100, virtio_blk::VIRTIO_BLK_T_OUT, 0);
        let e = parse_request(&m, [d(0x100, 16, false, true), d(0x1000, 513, true, false)], CAP).expect_err("dir");
        assert_eq!(e.error, ParseError::WrongDirection);
        let ok =
            parse_request(&m, [d(0x100, 16, false, true), d(0x1000, 512, false, true), d(0x2000, 1, true, false)], CAP)
                .expect("valid write");
        assert_eq!((ok.kind, ok.data_len), (RequestType::Out, 512));
        header(&m, 0x100, 99, 0);
        let u =
            parse_request(&m, [d(0x100, 16, false, true), d(0x2000, 1, true, false)], CAP).expect("unsupported parses");
        assert_eq!(u.kind, RequestType::Unsupported(99));
    }
}
