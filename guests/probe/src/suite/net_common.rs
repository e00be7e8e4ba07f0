//! What the `net-*` tests share: finding the NIC, the test frame format, MAC parsing and
//! printing, and argument helpers.
//!
//! **Frame format.** Ethernet II: destination, source, EtherType [`ETHERTYPE`] (0x88b5, IEEE
//! 802 local experimental), then the payload (frame length − 14 bytes), little-endian:
//!
//! | payload offset | field |
//! |---|---|
//! | 0 | magic [`MAGIC`] (the bytes `BKNT`) |
//! | 4 | sequence number (u32) |
//! | 8 | payload length (u32, = frame length − 14) |
//! | 12 | checksum: FNV-1a 32 over payload bytes 16..len, then bytes 0..12 |
//! | 16.. | fill: byte at payload offset j is `(j * 7 + 0x5a) mod 256` |
//!
//! A frame is *ours* if it has the EtherType and the magic; an ours frame is *intact* if its
//! length field equals its payload length and the checksum matches. Frames may arrive padded
//! (the length field, not the frame length, then decides; bytes past it are ignored).

use super::blk_common::{arg, ASSUMED_TSC_KHZ};
use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::net::{Net, NetError, MAX_FRAME, NET_DMA_BYTES};
use crate::virtio::{self, DEVICE_ID_NET};
use crate::Verdict;

/// Our EtherType (IEEE 802 local experimental 1).
pub const ETHERTYPE: u16 = 0x88b5;
/// Payload magic: the bytes `BKNT`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"BKNT");
/// Ethernet header bytes.
pub const ETH_HDR: usize = 14;
/// Payload header bytes (magic, sequence, length, checksum).
pub const PAYLOAD_HDR: usize = 16;
/// Smallest frame the tests send: the Ethernet minimum without FCS.
pub const MIN_FRAME: usize = 60;
/// The broadcast address.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Default bound on waits in the net tests, in milliseconds (no progress for this long).
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;

/// FNV-1a 32 offset basis.
const FNV_OFFSET: u32 = 0x811c_9dc5;
/// FNV-1a 32 prime.
const FNV_PRIME: u32 = 0x0100_0193;

/// Continues an FNV-1a 32 hash over `bytes`.
pub fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h = (h ^ u32::from(b)).wrapping_mul(FNV_PRIME);
    }
    h
}

/// The fill byte at payload offset `j`.
pub fn fill_byte(j: usize) -> u8 {
    u8::try_from((j.wrapping_mul(7) + 0x5a) & 0xff).unwrap_or(0)
}

/// The checksum of a payload whose header fields are already written (`p.len() >= 16`).
pub fn payload_checksum(p: &[u8]) -> u32 {
    let (head, tail) = p.split_at(PAYLOAD_HDR.min(p.len()));
    fnv1a(fnv1a(FNV_OFFSET, tail), head.get(..12).unwrap_or(head))
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map_or(0, u32::from_le_bytes)
}

/// Writes the Ethernet header of a test frame into `frame[..14]`.
pub fn write_eth(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    if let Some(h) = frame.get_mut(..ETH_HDR) {
        h[..6].copy_from_slice(&dst);
        h[6..12].copy_from_slice(&src);
        h[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    }
}

/// Writes the fill bytes of the payload of `frame` (everything from payload offset 16).
pub fn write_fill(frame: &mut [u8]) {
    if let Some(tail) = frame.get_mut(ETH_HDR + PAYLOAD_HDR..) {
        for (j, b) in tail.iter_mut().enumerate() {
            *b = fill_byte(j + PAYLOAD_HDR);
        }
    }
}

/// Writes the payload header (magic, `seq`, length, checksum) of `frame`, whose fill bytes
/// must already be in place. `fill_hash` is [`fill_hash`] of the frame length (to skip
/// re-hashing the fill), or `None` to hash it here.
pub fn write_header(frame: &mut [u8], seq: u32, fill_hash: Option<u32>) {
    let Some(p) = frame.get_mut(ETH_HDR..) else {
        return;
    };
    let len = u32::try_from(p.len()).unwrap_or(0);
    put_u32(p, 0, MAGIC);
    put_u32(p, 4, seq);
    put_u32(p, 8, len);
    let h = match fill_hash {
        Some(h) => h,
        None => fnv1a(FNV_OFFSET, p.get(PAYLOAD_HDR..).unwrap_or(&[])),
    };
    let c = fnv1a(h, p.get(..12).unwrap_or(&[]));
    put_u32(p, 12, c);
}

/// The FNV-1a state after the fill bytes of a frame of `frame_len` bytes.
pub fn fill_hash(frame_len: usize) -> u32 {
    let mut h = FNV_OFFSET;
    for j in PAYLOAD_HDR..frame_len.saturating_sub(ETH_HDR) {
        h = (h ^ u32::from(fill_byte(j))).wrapping_mul(FNV_PRIME);
    }
    h
}

/// Builds a complete test frame of `frame.len()` bytes.
pub fn build_frame(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], seq: u32) {
    write_eth(frame, dst, src);
    write_fill(frame);
    write_header(frame, seq, None);
}

/// What a received frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not our EtherType or magic.
    Other,
    /// Ours, but the length field or the checksum is wrong (the sequence as read).
    Corrupt(u32),
    /// Ours and intact.
    Intact {
        /// Sequence number.
        seq: u32,
        /// Payload length (from the header, checked).
        len: usize,
    },
}

/// Whether `frame` is one of ours (EtherType and magic), without checking it.
pub fn is_ours(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE.to_be_bytes()[..]) && get_u32(frame, ETH_HDR) == MAGIC
}

/// Classifies a received frame.
pub fn parse(frame: &[u8]) -> Parsed {
    if !is_ours(frame) {
        return Parsed::Other;
    }
    let p = frame.get(ETH_HDR..).unwrap_or(&[]);
    let seq = get_u32(p, 4);
    let len = usize::try_from(get_u32(p, 8)).unwrap_or(usize::MAX);
    if len < PAYLOAD_HDR || len > p.len() {
        return Parsed::Corrupt(seq);
    }
    let p = p.get(..len).unwrap_or(&[]);
    if payload_checksum(p) != get_u32(p, 12) {
        return Parsed::Corrupt(seq);
    }
    Parsed::Intact { seq, len }
}

/// The source MAC of a frame.
pub fn src_mac(frame: &[u8]) -> [u8; 6] {
    frame.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok()).unwrap_or([0; 6])
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), hex digits of either case.
pub fn parse_mac(s: &[u8]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(|&b| b == b':' || b == b'-');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        let mut v = 0u8;
        for &c in part {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return None,
            };
            v = v * 16 + d;
        }
        *byte = v;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Prints a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn print_mac(con: &mut Console<'_>, mac: &[u8; 6]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, &b) in mac.iter().enumerate() {
        if i != 0 {
            con.str(b":");
        }
        let pair = [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]];
        con.str(&pair);
    }
}

/// `probe.peer=MAC` (default broadcast); a malformed value prints an error and is
/// [`Verdict::BadArgs`].
pub fn peer(con: &mut Console<'_>, params: &Params<'_>) -> Result<[u8; 6], Verdict> {
    let Some(v) = params.get(b"peer") else {
        return Ok(BROADCAST);
    };
    parse_mac(v).ok_or_else(|| {
        con.str(b"probe: bad argument probe.peer=")
            .untrusted(v)
            .str(b": not a MAC address (want aa:bb:cc:dd:ee:ff)")
            .nl();
        Verdict::BadArgs
    })
}

/// `probe.size=S`: a frame length in [`MIN_FRAME`]..=[`MAX_FRAME`].
pub fn frame_size(con: &mut Console<'_>, params: &Params<'_>, default: u64) -> Result<usize, Verdict> {
    let s = arg(con, params, b"size", default, MIN_FRAME as u64, MAX_FRAME as u64)?;
    usize::try_from(s).map_err(|_| Verdict::BadArgs)
}

/// `probe.timeout_ms` (default [`DEFAULT_TIMEOUT_MS`]) in TSC cycles at `probe.tsc_khz` (or
/// [`ASSUMED_TSC_KHZ`]), and the `probe.tsc_khz` given (0 if none).
pub fn timing(con: &mut Console<'_>, params: &Params<'_>, default_ms: u64) -> Result<(u64, u64), Verdict> {
    let khz = super::blk_common::tsc_khz(con, params)?;
    let ms = arg(con, params, b"timeout_ms", default_ms, 1, 3_600_000)?;
    let eff = if khz == 0 { ASSUMED_TSC_KHZ } else { khz };
    Ok((ms.saturating_mul(eff), khz))
}

/// Prints `<prefix>: <reason>` and returns [`Verdict::Fail`].
pub fn fail(con: &mut Console<'_>, prefix: &[u8], e: NetError) -> Verdict {
    con.str(prefix).str(b": ");
    e.print(con);
    con.nl();
    Verdict::Fail
}

/// Finds the `probe.net=N`-th (default 0) version 2 virtio-net device, takes the DMA arena,
/// initialises the driver and prints
/// `net: mac=MAC link=up|down|unknown rxq=R txq=T features=0x.. offered=0x..`.
/// Returns the driver and the part of the arena it does not use (scratch memory for the test,
/// not zeroed).
pub fn open(con: &mut Console<'_>, params: &Params<'_>) -> Result<(Net, &'static mut [u8]), Verdict> {
    let index = arg(con, params, b"net", 0, 0, virtio::MAX_WINDOWS as u64)?;
    let Some(t) = virtio::find_device(con, params, DEVICE_ID_NET, index) else {
        con.str(b"net: no virtio-net device #")
            .dec(index)
            .str(b" (needs a virtio_mmio.device= word for a version 2 network device)")
            .nl();
        return Err(Verdict::Fail);
    };
    let Some(dma) = con.machine().take_dma() else {
        return Err(fail(con, b"net", NetError::NoDma));
    };
    if dma.len() < NET_DMA_BYTES {
        return Err(fail(con, b"net", NetError::DmaTooSmall));
    }
    let (mine, scratch) = dma.split_at_mut(NET_DMA_BYTES);
    let net = Net::init(con.machine(), t, mine).map_err(|e| fail(con, b"net: set-up failed", e))?;
    let i = *net.info();
    con.str(b"net: mac=");
    print_mac(con, &i.mac);
    if !i.mac_from_device {
        con.str(b" (default; device offers none)");
    }
    con.str(b" link=");
    let link = net.link_up(con.machine());
    con.str(match link {
        Some(true) => b"up",
        Some(false) => b"down",
        None => b"unknown",
    });
    con.str(b" rxq=")
        .dec(u64::from(i.rx_size))
        .str(b" txq=")
        .dec(u64::from(i.tx_size))
        .str(b" features=")
        .hex(i.features)
        .str(b" offered=")
        .hex(i.offered)
        .nl();
    Ok((net, scratch))
}

/// A bitmap over sequence numbers in caller-provided (scratch) memory.
#[derive(Debug)]
pub struct SeqMap<'a> {
    bits: &'a mut [u8],
}

impl<'a> SeqMap<'a> {
    /// A cleared map for `n` sequence numbers in `mem`; `None` if `mem` is too small.
    pub fn new(mem: &'a mut [u8], n: u64) -> Option<Self> {
        let bytes = usize::try_from(n.div_ceil(8)).ok()?;
        let bits = mem.get_mut(..bytes)?;
        bits.fill(0);
        Some(SeqMap { bits })
    }

    /// Sets bit `seq`; returns whether it was already set (`None` if out of range).
    pub fn test_and_set(&mut self, seq: u32) -> Option<bool> {
        let i = usize::try_from(seq / 8).ok()?;
        let mask = 1u8 << (seq % 8);
        let b = self.bits.get_mut(i)?;
        let was = *b & mask != 0;
        *b |= mask;
        Some(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_seen() {
        for len in [MIN_FRAME, 61, 600, MAX_FRAME] {
            let mut f = vec![0u8; len];
            build_frame(&mut f, BROADCAST, [2, 0, 0, 0, 0, 1], 77);
            assert_eq!(&f[12..14], &[0x88, 0xb5]);
            assert_eq!(&f[14..18], b"BKNT");
            assert_eq!(parse(&f), Parsed::Intact { seq: 77, len: len - 14 });
            // The precomputed fill hash gives the same checksum.
            let mut g = vec![0u8; len];
            write_eth(&mut g, BROADCAST, [2, 0, 0, 0, 0, 1]);
            write_fill(&mut g);
            write_header(&mut g, 77, Some(fill_hash(len)));
            assert_eq!(f, g);
            // Padding after the payload is ignored.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0; 8]);
            assert_eq!(parse(&padded), Parsed::Intact { seq: 77, len: len - 14 });
            // Any flipped payload byte is caught; truncation too.
            for at in [14 + 5, 14 + 9, 14 + 13, len - 1] {
                let mut c = f.clone();
                c[at] ^= 0x10;
                assert!(matches!(parse(&c), Parsed::Corrupt(_)), "len {len} at {at}");
            }
            assert!(matches!(parse(&f[..len - 1]), Parsed::Corrupt(77)));
        }
        let mut other = vec![0u8; 60];
        other[12] = 0x08;
        assert_eq!(parse(&other), Parsed::Other);
        assert_eq!(parse(&[0u8; 3]), Parsed::Other);
    }

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0x811c_9dc5);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xe40c_292c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac(b"52:54:00:12:34:56"), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_mac(b"FF-ff-00-0a-0B-c0"), Some([0xff, 0xff, 0, 0x0a, 0x0b, 0xc0]));
        for bad in [&b""[..], b"52:54:00:12:34", b"52:54:00:12:34:56:78", b"5:54:00:12:34:56", b"zz:54:00:12:34:56"] {
            assert_eq!(parse_mac(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn seq_map_flags_repeats_and_bounds() {
        let mut mem = vec![0xffu8; 16];
        let mut m = SeqMap::new(&mut mem, 100).expect("fits");
        assert_eq!(m.test_and_set(5), Some(false));
        assert_eq!(m.test_and_set(5), Some(true));
        assert_eq!(m.test_and_set(99), Some(false));
        assert_eq!(m.test_and_set(104), None);
        let mut small = vec![0u8; 3];
        assert!(SeqMap::new(&mut small, 100).is_none());
    }
}
