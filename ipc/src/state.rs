//! The state region: device state that survives the service process.
//!
//! The core creates one zero-filled, sealed memfd of [`STATE_REGION_LEN`] bytes per device
//! ([`StateRegion::create`]), keeps it for the VM's lifetime and hands a dup to every instance of
//! the device's service ([`crate::control::FdRole::StateRegion`]). The service writes its state
//! there whenever it changes; a fresh instance validates it and carries on where the dead one
//! stopped. A region that is all zeros means "fresh device"; one that fails validation makes a
//! virtio device signal `DEVICE_NEEDS_RESET` instead of guessing.
//!
//! # Layout (all little-endian)
//!
//! ```text
//! 0x0000  slot A (SLOT_LEN = 4 KiB)   cold state, checksummed   } written alternately,
//! 0x1000  slot B (SLOT_LEN = 4 KiB)   cold state, checksummed   } newest valid one wins
//! 0x2000  hot words: HOT_QUEUE_WORDS (8) × u64, one per virtqueue
//! 0x2040  in-flight entries: u64 each, queue q's entry for head h at index q * stride + h
//! 0x10000 end
//! ```
//!
//! **Cold slot** (changes on register writes): a 32-byte header — `magic` u32 ([`STATE_MAGIC`]),
//! `version` u16 ([`LAYOUT_VERSION`]), `kind` u16 ([`DeviceKind`]), `generation` u64, `len` u32
//! (payload bytes), `commit` u32 ([`COMMIT_WRITING`] / [`COMMIT_DONE`]), `checksum` u64 (FNV-1a 64
//! over header bytes 0..20 and the payload) — then a bincode payload ([`VirtioState`] or
//! [`UartState`]). A writer picks the slot that does *not* hold the newest committed state,
//! marks it `WRITING`, writes header and payload, then marks it `DONE` with a fence before each
//! marker store. A crash mid-write therefore leaves the slot `WRITING` (a torn update, skipped:
//! the other slot still holds the previous state), never a half-written `DONE` slot. A `DONE` slot
//! whose checksum, magic, version, kind or length is wrong was corrupted after the fact: the whole
//! region is refused ([`Loaded`] is then an error).
//!
//! **Hot words** (change per request): each is one aligned `u64`, written with a single atomic
//! store, whose top byte is a CRC-8 of the low seven bytes ([`seal`]/[`unseal`]), so any single
//! corrupted byte is detected; the all-zero word means "empty". A queue word is a [`QueueWord`]
//! (next available index, used index, the head being published); an in-flight entry is an
//! [`InflightEntry`] (avail-ring position and an order counter).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::region::{RegionError, SharedRegion};

/// Page size the region's layout assumes (every x86_64 Linux).
const PAGE: usize = 4096;
const _: () = assert!(HOT_OFFSET.is_multiple_of(PAGE) && STATE_REGION_LEN.is_multiple_of(PAGE));
/// Size of the state region in bytes.
pub const STATE_REGION_LEN: usize = 64 * 1024;
/// Length of one cold-state slot.
pub const SLOT_LEN: usize = 4096;
/// Length of a slot header.
pub const SLOT_HEADER_LEN: usize = 32;
/// Largest cold-state payload.
pub const MAX_PAYLOAD: usize = SLOT_LEN - SLOT_HEADER_LEN;
/// "BHST" little-endian.
pub const STATE_MAGIC: u32 = 0x5453_4842;
/// Version of this layout.
pub const LAYOUT_VERSION: u16 = 1;
/// Commit marker of a slot being written.
pub const COMMIT_WRITING: u32 = 0x5752_4954;
/// Commit marker of a completely written slot.
pub const COMMIT_DONE: u32 = 0x444f_4e45;
/// Offset of the hot words.
pub const HOT_OFFSET: usize = 2 * SLOT_LEN;
/// Number of per-queue hot words (the most queues a device can track).
pub const HOT_QUEUE_WORDS: usize = 8;
/// Offset of the in-flight entries.
pub const ENTRIES_OFFSET: usize = HOT_OFFSET + 8 * HOT_QUEUE_WORDS;
/// Number of in-flight entries the region holds (over all queues).
pub const MAX_ENTRIES: usize = (STATE_REGION_LEN - ENTRIES_OFFSET) / 8;
/// Most pending console input bytes kept in a [`UartState`] (the console stops reading its input
/// while this many are buffered).
pub const MAX_UART_PENDING: usize = 2048;
/// Size of the 16550's receive FIFO (`vm_superio::Serial`'s).
pub const MAX_UART_FIFO: usize = 64;

const _: () = assert!(ENTRIES_OFFSET.is_multiple_of(8) && MAX_ENTRIES >= 4096);
// A full UartState (9 registers, two length prefixes, both buffers full) fits in one slot.
const _: () = assert!(9 + 16 + MAX_UART_FIFO + MAX_UART_PENDING <= MAX_PAYLOAD);

/// Errors of the state region.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Creating or mapping the memfd failed (or it has the wrong size).
    #[error("state region memfd")]
    Region(#[source] RegionError),
    /// A committed slot failed validation.
    #[error("state slot {slot}: {what}")]
    Corrupt {
        /// Slot index (0 or 1).
        slot: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// The slots are empty or torn but other parts of the region are not.
    #[error("state region inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The payload does not decode.
    #[error("state payload")]
    Decode(#[source] bincode::Error),
    /// An in-flight entry is corrupt (or its index out of range).
    #[error("in-flight entry {0} corrupt")]
    BadEntry(usize),
    /// The payload does not encode (or exceeds [`MAX_PAYLOAD`]).
    #[error("encode state payload")]
    Encode(#[source] bincode::Error),
}

/// What a state slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The 16550 console.
    Uart,
    /// A virtio device (its virtio device id).
    Virtio(u8),
}

impl DeviceKind {
    fn code(self) -> u16 {
        match self {
            Self::Uart => 1,
            Self::Virtio(id) => 0x100 | u16::from(id),
        }
    }
}

/// The newest valid cold state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// Nothing was ever committed (a fresh device).
    Fresh,
    /// The payload of the newest committed slot.
    Saved {
        /// Its generation.
        generation: u64,
        /// The payload bytes.
        payload: Vec<u8>,
    },
}

/// Per-queue registers of a virtio device, as the driver wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Queue size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

/// Cold state of a virtio-mmio device. The per-request state (next available index, used index,
/// requests in flight) lives in the hot words instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus (as of the last register write; the VRING bit may be newer).
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// In-flight entries per queue in the entry table (the device's maximum queue size).
    pub entry_stride: u16,
    /// Queues.
    pub queues: Vec<QueueRegs>,
    /// A digest of the device's configuration space: an instance that finds it different (a
    /// disk whose image was replaced) tells the driver with a configuration-change interrupt.
    pub config_digest: u64,
}

/// Cold state of the 16550 console: the registers of `vm_superio::Serial` (its `SerialState`),
/// its receive FIFO and the service's own input bytes not yet in the FIFO. The service validates
/// every field against the UART model before restoring it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// Interrupt enable register.
    pub ier: u8,
    /// Interrupt identification register (without the FIFO bits added on read).
    pub iir: u8,
    /// Line control register.
    pub lcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Receive FIFO, oldest byte first (at most [`MAX_UART_FIFO`]).
    pub fifo: Vec<u8>,
    /// Input bytes read by the service but not yet in the FIFO, oldest first (at most
    /// [`MAX_UART_PENDING`]).
    pub pending: Vec<u8>,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_fixint_encoding().with_limit(MAX_PAYLOAD as u64).reject_trailing_bytes()
}

/// Encodes a payload (bounded by [`MAX_PAYLOAD`]).
pub fn encode_payload<T: Serialize>(v: &T) -> Result<Vec<u8>, StateError> {
    codec().serialize(v).map_err(StateError::Encode)
}

/// Decodes a payload (bounded, trailing bytes refused).
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    codec().deserialize(bytes).map_err(StateError::Decode)
}

/// FNV-1a, 64 bits.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn crc8(v: u64) -> u8 {
    let mut crc: u8 = 0;
    for b in &v.to_le_bytes()[..7] {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 { (crc << 1) ^ 0x07 } else { crc << 1 };
        }
    }
    crc ^ 0x5a
}

const LOW56: u64 = (1 << 56) - 1;

/// Seals a 56-bit value into a self-checking word (0 stays 0: "empty").
pub fn seal(v: u64) -> u64 {
    let v = v & LOW56;
    if v == 0 {
        0
    } else {
        (u64::from(crc8(v)) << 56) | v
    }
}

/// The 56-bit value of a sealed word, or `None` if its check byte does not match.
pub fn unseal(w: u64) -> Option<u64> {
    if w == 0 {
        return Some(0);
    }
    let v = w & LOW56;
    (v != 0 && (w >> 56) as u8 == crc8(v)).then_some(v)
}

/// The hot word of one virtqueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueWord {
    /// The queue is tracked (set when it became ready).
    pub active: bool,
    /// A used entry for `last_head` is being published.
    pub publishing: bool,
    /// Next avail-ring position the device will take.
    pub next_avail: u16,
    /// Used index the device last published (and cleared the in-flight entry of).
    pub used_idx: u16,
    /// Head whose used entry is being published.
    pub last_head: u16,
}

impl QueueWord {
    /// The 56-bit encoding.
    pub fn encode(self) -> u64 {
        let flags = u64::from(self.active) | (u64::from(self.publishing) << 1);
        u64::from(self.next_avail)
            | (u64::from(self.used_idx) << 16)
            | (u64::from(self.last_head) << 32)
            | (flags << 48)
    }

    /// Decodes a 56-bit value; `None` for unknown flags or a word without `active`.
    pub fn decode(v: u64) -> Option<Self> {
        if v == 0 {
            return Some(Self::default());
        }
        let flags = (v >> 48) & 0xff;
        if flags & !3 != 0 || flags & 1 == 0 {
            return None;
        }
        Some(Self {
            active: true,
            publishing: flags & 2 != 0,
            next_avail: (v & 0xffff) as u16,
            used_idx: ((v >> 16) & 0xffff) as u16,
            last_head: ((v >> 32) & 0xffff) as u16,
        })
    }
}

/// A request taken from the avail ring and not yet published in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightEntry {
    /// Avail-ring position (free-running index) it was taken from.
    pub pos: u16,
    /// Order counter (per queue, increasing).
    pub order: u32,
}

impl InflightEntry {
    /// The 56-bit encoding (bit 48 marks the entry in flight).
    pub fn encode(self) -> u64 {
        u64::from(self.pos) | (u64::from(self.order) << 16) | (1 << 48)
    }

    /// Decodes a 56-bit value: `Some(None)` for an empty entry, `None` for garbage.
    pub fn decode(v: u64) -> Option<Option<Self>> {
        if v == 0 {
            return Some(None);
        }
        if (v >> 48) != 1 {
            return None;
        }
        Some(Some(Self { pos: (v & 0xffff) as u16, order: ((v >> 16) & 0xffff_ffff) as u32 }))
    }
}

/// The state region, mapped.
#[derive(Debug)]
pub struct StateRegion {
    region: SharedRegion,
    /// Slot and generation of the newest committed state, once known.
    newest: Option<(usize, u64)>,
}

impl StateRegion {
    /// Creates a zero-filled, sealed region (the core's side).
    pub fn create(name: &str) -> Result<Self, StateError> {
        let region = SharedRegion::create(name, STATE_REGION_LEN).map_err(StateError::Region)?;
        Ok(Self { region, newest: None })
    }

    /// Maps a region received from the core (must be [`STATE_REGION_LEN`] bytes).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, StateError> {
        let region = SharedRegion::from_fd(fd, STATE_REGION_LEN as u64).map_err(StateError::Region)?;
        Ok(Self { region, newest: None })
    }

    /// The memfd (to dup for a service).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= STATE_REGION_LEN, "state word offset {offset}");
        // SAFETY: the mapping is page-aligned and STATE_REGION_LEN long, so `offset` (checked
        // 8-aligned and in bounds) is a valid, aligned u64 location for the mapping's lifetime,
        // which `&self` bounds. Both processes only access it atomically or volatilely.
        unsafe { &*self.region.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= STATE_REGION_LEN);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above); a volatile read of shared memory another process
            // may write: the value is only used after validation.
            *b = unsafe { self.region.as_ptr().add(offset + i).read_volatile() };
        }
    }

    fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= STATE_REGION_LEN);
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: in bounds (checked above); a volatile store into our shared mapping.
            unsafe { self.region.as_ptr().add(offset + i).write_volatile(*b) };
        }
    }

    fn slot_header(&self, slot: usize) -> [u8; SLOT_HEADER_LEN] {
        let mut h = [0u8; SLOT_HEADER_LEN];
        self.read_bytes(slot * SLOT_LEN, &mut h);
        h
    }

    /// Reads and validates the cold state of a device of `kind`.
    pub fn load(&mut self, kind: DeviceKind) -> Result<Loaded, StateError> {
        let mut best: Option<(usize, u64, Vec<u8>)> = None;
        for slot in 0..2 {
            let h = self.slot_header(slot);
            let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            let commit = le32(20);
            if commit == COMMIT_WRITING {
                continue;
            }
            if commit != COMMIT_DONE {
                if h.iter().all(|&b| b == 0) {
                    continue;
                }
                return Err(StateError::Corrupt { slot, what: "bad commit marker" });
            }
            let corrupt = |what| Err(StateError::Corrupt { slot, what });
            if le32(0) != STATE_MAGIC {
                return corrupt("bad magic");
            }
            if u16::from_le_bytes([h[4], h[5]]) != LAYOUT_VERSION {
                return corrupt("unknown layout version");
            }
            if u16::from_le_bytes([h[6], h[7]]) != kind.code() {
                return corrupt("state of another kind of device");
            }
            let len = le32(16) as usize;
            if len > MAX_PAYLOAD {
                return corrupt("payload length");
            }
            let mut payload = vec![0u8; len];
            self.read_bytes(slot * SLOT_LEN + SLOT_HEADER_LEN, &mut payload);
            let sum = u64::from_le_bytes(h[24..32].try_into().unwrap_or([0; 8]));
            if fnv1a(&[&h[..20], &payload]) != sum {
                return corrupt("checksum mismatch");
            }
            let generation = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
            match &best {
                Some((_, g, _)) if *g == generation => return corrupt("two slots with one generation"),
                Some((_, g, _)) if *g > generation => {}
                _ => best = Some((slot, generation, payload)),
            }
        }
        match best {
            Some((slot, generation, payload)) => {
                self.newest = Some((slot, generation));
                Ok(Loaded::Saved { generation, payload })
            }
            None => {
                if !self.hot_is_zero() {
                    return Err(StateError::Inconsistent("no committed state but requests are tracked"));
                }
                self.newest = None;
                Ok(Loaded::Fresh)
            }
        }
    }

    /// Whether the page holding `offset` may hold non-zero bytes: `false` only for a hole of the
    /// memfd, which reads as zeros. Touching a hole of a shared memfd mapping, even to read it,
    /// allocates a page, so the scans and clears below skip holes: a device's region then costs
    /// only the pages it has written (one for a queue's in-flight entries, not all sixteen).
    /// Errors other than "no data after this offset" count as data, which is always safe.
    fn page_has_data(&self, offset: usize) -> bool {
        let page = offset - offset % PAGE;
        let Ok(at) = libc::off_t::try_from(page) else { return true };
        // SAFETY: lseek on the region's own memfd touches no memory; the file offset it moves is
        // used by nobody (the region is only ever mapped).
        let r = unsafe { libc::lseek(self.region.fd().as_raw_fd(), at, libc::SEEK_DATA) };
        if r < 0 {
            return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
        }
        usize::try_from(r).map_or(true, |data| data < page + PAGE)
    }

    /// The 8-byte word offsets in `range` that lie on pages holding data (see
    /// [`page_has_data`](Self::page_has_data)); `range` starts page-aligned.
    fn words_with_data(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
        debug_assert!(range.start.is_multiple_of(PAGE));
        let end = range.end;
        range
            .step_by(PAGE)
            .filter(|&page| self.page_has_data(page))
            .flat_map(move |page| (page..(page + PAGE).min(end)).step_by(8))
    }

    /// Whether every hot word and in-flight entry is zero.
    pub fn hot_is_zero(&self) -> bool {
        self.words_with_data(HOT_OFFSET..STATE_REGION_LEN).all(|o| self.word(o).load(Ordering::Acquire) == 0)
    }

    /// Commits `payload` as the new cold state of a device of `kind` (torn-write safe: see the
    /// module documentation). Returns the new generation.
    pub fn store(&mut self, kind: DeviceKind, payload: &[u8]) -> Result<u64, StateError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(StateError::Encode(Box::new(bincode::ErrorKind::SizeLimit)));
        }
        let (slot, generation) = match self.newest {
            Some((s, g)) => (1 - s, g.wrapping_add(1)),
            None => (0, 1),
        };
        let base = slot * SLOT_LEN;
        let marker = self.word(base + 16);
        // Bytes 16..24 are `len` and `commit`: one atomic store marks the slot as being written.
        marker.store(u64::from(COMMIT_WRITING) << 32, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let mut head = [0u8; 20];
        head[0..4].copy_from_slice(&STATE_MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        head[6..8].copy_from_slice(&kind.code().to_le_bytes());
        head[8..16].copy_from_slice(&generation.to_le_bytes());
        head[16..20].copy_from_slice(&len.to_le_bytes());
        self.write_bytes(base, &head[..16]);
        self.write_bytes(base + SLOT_HEADER_LEN, payload);
        self.word(base + 24).store(fnv1a(&[&head, payload]), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        marker.store(u64::from(len) | (u64::from(COMMIT_DONE) << 32), Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.newest = Some((slot, generation));
        Ok(generation)
    }

    /// Forgets every committed state and tracked request: the region reads as fresh again.
    pub fn clear(&mut self) {
        for o in self.words_with_data(0..STATE_REGION_LEN) {
            self.word(o).store(0, Ordering::SeqCst);
        }
        self.newest = None;
    }

    /// Loads the hot word of queue `q` (`None` if `q` is out of range or the word is corrupt).
    pub fn queue_word(&self, q: usize) -> Option<QueueWord> {
        if q >= HOT_QUEUE_WORDS {
            return None;
        }
        QueueWord::decode(unseal(self.word(HOT_OFFSET + 8 * q).load(Ordering::Acquire))?)
    }

    /// Stores the hot word of queue `q` (ignored if out of range).
    pub fn set_queue_word(&self, q: usize, w: QueueWord) {
        if q < HOT_QUEUE_WORDS {
            // Release: the tracking protocol needs only program order between its stores
            // (device-services' `tracked`), and a sequentially consistent store is a full
            // fence on every request.
            self.word(HOT_OFFSET + 8 * q).store(seal(w.encode()), Ordering::Release);
        }
    }

    /// Loads in-flight entry `index` (`Err` if corrupt or out of range).
    pub fn entry(&self, index: usize) -> Result<Option<InflightEntry>, StateError> {
        if index >= MAX_ENTRIES {
            return Err(StateError::BadEntry(index));
        }
        unseal(self.word(ENTRIES_OFFSET + 8 * index).load(Ordering::Acquire))
            .and_then(InflightEntry::decode)
            .ok_or(StateError::BadEntry(index))
    }

    /// Stores (or with `None` clears) in-flight entry `index` (ignored if out of range).
    pub fn set_entry(&self, index: usize, e: Option<InflightEntry>) {
        if index < MAX_ENTRIES {
            // Release, as in `set_queue_word`.
            self.word(ENTRIES_OFFSET + 8 * index).store(e.map_or(0, |e| seal(e.encode())), Ordering::Release);
        }
    }

    /// Clears the hot words and in-flight entries only.
    pub fn clear_hot(&self) {
        for o in self.words_with_data(HOT_OFFSET..STATE_REGION_LEN) {
            self.word(o).store(0, Ordering::SeqCst);
        }
    }

    /// Flips the bits `mask` of byte `offset` (fault injection and tests: a corrupted region).
    pub fn corrupt_byte(&self, offset: usize, mask: u8) {
        if offset < STATE_REGION_LEN {
            let mut b = [0u8];
            self.read_bytes(offset, &mut b);
            self.write_bytes(offset, &[b[0] ^ mask]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: DeviceKind = DeviceKind::Virtio(2);

    fn reopen(r: &StateRegion) -> StateRegion {
        StateRegion::from_fd(r.fd().try_clone_to_owned().expect("dup")).expect("map")
    }

    /// Pages the region's memfd has allocated.
    fn pages(r: &StateRegion) -> i64 {
        let st = nix::sys::stat::fstat(r.fd().as_raw_fd()).expect("fstat");
        st.st_blocks * 512 / PAGE as i64
    }

    #[test]
    fn scans_and_clears_allocate_no_pages() {
        let mut r = StateRegion::create("t").expect("create");
        assert_eq!(pages(&r), 0);
        assert!(r.hot_is_zero());
        r.clear_hot();
        r.clear();
        assert_eq!(reopen(&r).load(KIND).expect("load"), Loaded::Fresh);
        // Reading two slot headers may allocate their two pages, never the hot area's fourteen.
        assert!(pages(&r) <= 2, "{} pages allocated", pages(&r));
        // One entry far into the area allocates its page only; the scan still sees it.
        let far = MAX_ENTRIES - 1;
        r.set_entry(far, Some(InflightEntry { pos: 1, order: 2 }));
        assert!(pages(&r) <= 3, "{} pages allocated", pages(&r));
        assert!(!r.hot_is_zero());
        r.clear_hot();
        assert!(r.hot_is_zero());
        assert_eq!(r.entry(far).expect("entry"), None);
        assert!(pages(&r) <= 3, "{} pages allocated", pages(&r));
    }

    #[test]
    fn fresh_then_saved_alternating_slots() {
        let mut r = StateRegion::create("t").expect("create");
        assert_eq!(reopen(&r).load(KIND).expect("load"), Loaded::Fresh);
        assert_eq!(r.store(KIND, b"one").expect("store"), 1);
        assert_eq!(r.store(KIND, b"two!").expect("store"), 2);
        assert_eq!(reopen(&r).load(KIND).expect("load"), Loaded::Saved { generation: 2, payload: b"two!".to_vec() });
        // A second instance continues the generations.
        let mut r2 = reopen(&r);
        r2.load(KIND).expect("load");
        assert_eq!(r2.store(KIND, b"three").expect("store"), 3);
        assert_eq!(reopen(&r).load(KIND).expect("load"), Loaded::Saved { generation: 3, payload: b"three".to_vec() });
        assert!(
            matches!(reopen(&r).load(DeviceKind::Uart), Err(StateError::Corrupt { what, .. }) if what.contains("kind"))
        );
    }

    #[test]
    fn torn_write_falls_back_to_the_previous_state() {
        let mut r = StateRegion::create("t").expect("create");
        r.store(KIND, b"old").expect("store");
        r.store(KIND, b"new").expect("store");
        // Simulate a crash in the middle of writing generation 3 into slot 0: marker WRITING,
        // payload half written.
        r.word(16).store(u64::from(COMMIT_WRITING) << 32, Ordering::SeqCst);
        r.write_bytes(SLOT_HEADER_LEN, b"ga");
        assert_eq!(reopen(&r).load(KIND).expect("load"), Loaded::Saved { generation: 2, payload: b"new".to_vec() });
    }

    #[test]
    fn any_flipped_byte_of_a_committed_slot_is_detected() {
        for offset in (0..SLOT_HEADER_LEN + 6).chain([SLOT_LEN + 3, SLOT_LEN + SLOT_HEADER_LEN + 1]) {
            let mut r = StateRegion::create("t").expect("create");
            r.store(KIND, b"state1").expect("store");
            r.store(KIND, b"state2").expect("store");
            r.corrupt_byte(offset, 0x10);
            assert!(reopen(&r).load(KIND).is_err(), "flip at {offset} undetected");
        }
    }

    #[test]
    fn hot_words_detect_corruption() {
        let r = StateRegion::create("t").expect("create");
        let w = QueueWord { active: true, publishing: true, next_avail: 7, used_idx: 5, last_head: 3 };
        r.set_queue_word(1, w);
        assert_eq!(r.queue_word(1), Some(w));
        r.set_entry(10, Some(InflightEntry { pos: 6, order: 99 }));
        assert_eq!(r.entry(10).expect("entry"), Some(InflightEntry { pos: 6, order: 99 }));
        assert_eq!(r.entry(11).expect("entry"), None);
        assert!(r.entry(MAX_ENTRIES).is_err());
        for byte in 0..8 {
            let r2 = reopen(&r);
            r2.corrupt_byte(HOT_OFFSET + 8 + byte, 0x01);
            assert_eq!(r2.queue_word(1), None, "queue word byte {byte}");
            r2.corrupt_byte(HOT_OFFSET + 8 + byte, 0x01);
            r2.corrupt_byte(ENTRIES_OFFSET + 80 + byte, 0x80);
            assert!(r2.entry(10).is_err(), "entry byte {byte}");
            r2.corrupt_byte(ENTRIES_OFFSET + 80 + byte, 0x80);
        }
        // Tracked requests without committed cold state: inconsistent.
        assert!(matches!(reopen(&r).load(KIND), Err(StateError::Inconsistent(_))));
        let mut r3 = reopen(&r);
        r3.clear();
        assert_eq!(r3.load(KIND).expect("load"), Loaded::Fresh);
    }

    #[test]
    fn payloads_round_trip_and_are_bounded() {
        let s = VirtioState {
            status: 15,
            driver_features: 1 << 32,
            entry_stride: 256,
            queues: vec![QueueRegs { size: 16, ready: true, desc: 0x1000, driver: 0x2000, device: 0x3000 }],
            config_digest: 7,
            ..Default::default()
        };
        let b = encode_payload(&s).expect("encode");
        assert_eq!(decode_payload::<VirtioState>(&b).expect("decode"), s);
        let big = UartState { pending: vec![0; MAX_PAYLOAD], ..Default::default() };
        assert!(encode_payload(&big).is_err());
        let full = UartState {
            lcr: 3,
            fifo: vec![1; MAX_UART_FIFO],
            pending: vec![2; MAX_UART_PENDING],
            ..Default::default()
        };
        let b = encode_payload(&full).expect("a full UART state fits");
        assert!(b.len() <= MAX_PAYLOAD);
        assert_eq!(decode_payload::<UartState>(&b).expect("decode"), full);
        let mut evil = vec![0u8; 40];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_payload::<VirtioState>(&evil).is_err());
    }
}
