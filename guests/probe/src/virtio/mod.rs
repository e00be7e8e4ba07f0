//! virtio-mmio devices announced on the command line with Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` words (Bulkhead and QEMU microvm both add
//! them), the version 2 ("modern") register file, and drivers on top of it.
//!
//! Everything read from a device or the command line is hostile: windows must lie in
//! `[1 GiB, 4 GiB)` (see [`crate::machine::mmio_range_ok`]), every wait is bounded.

pub mod blk;
#[cfg(test)]
pub mod fake;
#[cfg(test)]
pub mod fake_net;
pub mod net;
pub mod queue;

use self::queue::{Dma, SplitQueue, MAX_QUEUE_SIZE};
use crate::cmdline::Params;
use crate::console::Console;
use crate::machine::Machine;

/// `virtio_mmio.device=` words kept (more are ignored).
pub const MAX_WINDOWS: usize = 8;
/// The command-line word prefix.
pub const WORD_PREFIX: &[u8] = b"virtio_mmio.device=";
/// MagicValue: "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Smallest window accepted: registers up to 0x100 plus a device config space.
pub const MIN_WINDOW: u64 = 0x200;
/// DeviceID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// DeviceID of a network device.
pub const DEVICE_ID_NET: u32 = 1;

/// virtio-mmio register offsets (version 2).
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC: u64 = 0x000;
    /// Version (R): 2 modern, 1 legacy.
    pub const VERSION: u64 = 0x004;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// DeviceFeatures (R), 32 bits selected by DeviceFeaturesSel.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status (RW).
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (W); High at +4.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// QueueDriverLow (W): the available ring; High at +4.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// QueueDeviceLow (W): the used ring; High at +4.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific config space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: the modern interface (little-endian, separate ring addresses).
pub const F_VERSION_1: u64 = 1 << 32;

/// A device window from a `virtio_mmio.device=` word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Interrupt line (unused: the probe polls).
    pub irq: u32,
    /// Platform device id (the optional `:<id>`).
    pub id: Option<u32>,
}

/// Why a `virtio_mmio.device=` word or a window was rejected, or a device failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioError {
    /// The word does not follow `<size>@<base>:<irq>[:<id>]`.
    Malformed,
    /// The window is not in `[1 GiB, 4 GiB)`, is smaller than 0x200 bytes or misaligned.
    BadWindow,
    /// MagicValue is not "virt".
    NoMagic(u32),
    /// Version is not 2.
    Version(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device did not keep FEATURES_OK.
    FeaturesRejected(u32),
    /// A queue does not exist (QueueNumMax 0) or is already live.
    QueueUnavailable {
        /// The queue index.
        queue: u16,
        /// Its QueueNumMax.
        max: u32,
    },
    /// The DMA arena has no room for a queue at the offset the driver chose.
    QueueMemory,
    /// The device reports DEVICE_NEEDS_RESET (status attached).
    NeedsReset(u32),
    /// A reset did not read back 0 status within the poll bound.
    ResetTimeout(u32),
    /// The config space changed on every read attempt.
    ConfigUnstable,
}

impl VirtioError {
    /// Prints `<what>: <reason>` (no newline).
    pub fn print(&self, con: &mut Console<'_>) {
        match *self {
            VirtioError::Malformed => {
                con.str(b"malformed (want <size>@<base>:<irq>[:<id>])");
            }
            VirtioError::BadWindow => {
                con.str(b"window outside [1 GiB, 4 GiB), under 0x200 bytes or misaligned");
            }
            VirtioError::NoMagic(v) => {
                con.str(b"no virtio magic (read ").hex(u64::from(v)).str(b")");
            }
            VirtioError::Version(v) => {
                con.str(b"virtio-mmio version ")
                    .dec(u64::from(v))
                    .str(b" (only version 2 supported; QEMU: -global virtio-mmio.force-legacy=false)");
            }
            VirtioError::NoVersion1 => {
                con.str(b"device does not offer VIRTIO_F_VERSION_1");
            }
            VirtioError::FeaturesRejected(s) => {
                con.str(b"device rejected our features (status ").hex(u64::from(s)).str(b")");
            }
            VirtioError::QueueUnavailable { queue, max } => {
                con.str(b"queue ")
                    .dec(u64::from(queue))
                    .str(b" unavailable (QueueNumMax ")
                    .dec(u64::from(max))
                    .str(b" or already ready)");
            }
            VirtioError::QueueMemory => {
                con.str(b"no DMA memory for a virtqueue");
            }
            VirtioError::NeedsReset(s) => {
                con.str(b"device needs reset (status ").hex(u64::from(s)).str(b")");
            }
            VirtioError::ResetTimeout(s) => {
                con.str(b"device reset did not complete (status ").hex(u64::from(s)).str(b")");
            }
            VirtioError::ConfigUnstable => {
                con.str(b"config generation never settled");
            }
        }
    }
}

/// Parses a number the way Linux's `memparse` does for sizes: decimal or `0x` hex, then an
/// optional `K`, `M` or `G` suffix (either case). `None` on anything else or overflow.
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = crate::cmdline::parse_u64(digits)?;
    n.checked_mul(1u64 << shift)
}

/// Parses one command-line word: `Ok(None)` if it is not a `virtio_mmio.device=` word.
pub fn parse_word(word: &[u8]) -> Result<Option<Window>, VirtioError> {
    let Some(rest) = word.strip_prefix(WORD_PREFIX) else {
        return Ok(None);
    };
    let at = rest.iter().position(|&b| b == b'@').ok_or(VirtioError::Malformed)?;
    let size = parse_size(&rest[..at]).ok_or(VirtioError::Malformed)?;
    let mut fields = rest[at + 1..].split(|&b| b == b':');
    let base = fields.next().and_then(crate::cmdline::parse_u64).ok_or(VirtioError::Malformed)?;
    let irq = fields
        .next()
        .filter(|f| !f.starts_with(b"0x"))
        .and_then(crate::cmdline::parse_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(VirtioError::Malformed)?;
    let id = match fields.next() {
        None => None,
        Some(f) => {
            Some(crate::cmdline::parse_u64(f).and_then(|n| u32::try_from(n).ok()).ok_or(VirtioError::Malformed)?)
        }
    };
    if fields.next().is_some() {
        return Err(VirtioError::Malformed);
    }
    Ok(Some(Window { base, size, irq, id }))
}

/// The windows announced on the command line, in order (at most [`MAX_WINDOWS`]), and how
/// many words were malformed or did not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    items: [Option<Window>; MAX_WINDOWS],
    len: usize,
    /// Malformed or excess words.
    pub rejected: usize,
}

impl Windows {
    /// Collects every `virtio_mmio.device=` word of `params`' command line.
    pub fn from_params(params: &Params<'_>) -> Self {
        let mut w = Windows { items: [None; MAX_WINDOWS], len: 0, rejected: 0 };
        for word in params.words() {
            match parse_word(word) {
                Ok(None) => {}
                Ok(Some(win)) => match w.items.get_mut(w.len) {
                    Some(slot) => {
                        *slot = Some(win);
                        w.len += 1;
                    }
                    None => w.rejected += 1,
                },
                Err(_) => w.rejected += 1,
            }
        }
        w
    }

    /// The windows, in command-line order.
    pub fn iter(&self) -> impl Iterator<Item = Window> + '_ {
        self.items.iter().take(self.len).flatten().copied()
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a window's identification registers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ident {
    /// Version register.
    pub version: u32,
    /// DeviceID (0: no device behind this transport).
    pub device_id: u32,
    /// VendorID.
    pub vendor_id: u32,
}

/// The register file of one virtio-mmio window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    win: Window,
}

/// How many times a reset is polled for status 0.
pub const RESET_POLLS: u32 = 1000;
/// How many times the config space is re-read while ConfigGeneration changes.
pub const CONFIG_RETRIES: u32 = 16;

impl Transport {
    /// Maps `win` and checks its magic value; returns the transport and its identity.
    pub fn probe(m: &mut dyn Machine, win: Window) -> Result<(Self, Ident), VirtioError> {
        if win.size < MIN_WINDOW || !m.map_mmio(win.base, win.size) {
            return Err(VirtioError::BadWindow);
        }
        let t = Transport { win };
        let magic = t.read(m, reg::MAGIC);
        if magic != MAGIC {
            return Err(VirtioError::NoMagic(magic));
        }
        let ident = Ident {
            version: t.read(m, reg::VERSION),
            device_id: t.read(m, reg::DEVICE_ID),
            vendor_id: t.read(m, reg::VENDOR_ID),
        };
        Ok((t, ident))
    }

    /// The window.
    pub fn window(&self) -> Window {
        self.win
    }

    /// Reads the register at `offset`.
    pub fn read(&self, m: &mut dyn Machine, offset: u64) -> u32 {
        m.mmio_read32(self.win.base + offset)
    }

    /// Writes the register at `offset`.
    pub fn write(&self, m: &mut dyn Machine, offset: u64, value: u32) {
        m.mmio_write32(self.win.base + offset, value);
    }

    /// Writes a 64-bit address to a Low/High register pair.
    pub fn write64(&self, m: &mut dyn Machine, low: u64, value: u64) {
        self.write(m, low, lo32(value));
        self.write(m, low + 4, hi32(value));
    }

    /// Resets the device (status 0) and waits, bounded, until the status reads 0.
    pub fn reset(&self, m: &mut dyn Machine) -> Result<(), VirtioError> {
        self.write(m, reg::STATUS, 0);
        let mut s = 0;
        for _ in 0..RESET_POLLS {
            s = self.read(m, reg::STATUS);
            if s == 0 {
                return Ok(());
            }
            m.pause();
        }
        Err(VirtioError::ResetTimeout(s))
    }

    /// ORs `bits` into the status register.
    pub fn add_status(&self, m: &mut dyn Machine, bits: u32) {
        let s = self.read(m, reg::STATUS);
        self.write(m, reg::STATUS, s | bits);
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self, m: &mut dyn Machine) -> u64 {
        self.write(m, reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(m, reg::DEVICE_FEATURES);
        self.write(m, reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(m, reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes the driver's feature bits, sets FEATURES_OK and checks the device kept it.
    pub fn set_features(&self, m: &mut dyn Machine, features: u64) -> Result<(), VirtioError> {
        self.write(m, reg::DRIVER_FEATURES_SEL, 0);
        self.write(m, reg::DRIVER_FEATURES, lo32(features));
        self.write(m, reg::DRIVER_FEATURES_SEL, 1);
        self.write(m, reg::DRIVER_FEATURES, hi32(features));
        self.add_status(m, status::FEATURES_OK);
        let s = self.read(m, reg::STATUS);
        if s & status::FEATURES_OK == 0 {
            return Err(VirtioError::FeaturesRejected(s));
        }
        Ok(())
    }

    /// The start of every driver: reset, ACKNOWLEDGE, DRIVER, then feature negotiation
    /// (VIRTIO_F_VERSION_1 required; only the bits of `accepted` the device offers are taken;
    /// FEATURES_OK checked). Returns (offered, negotiated).
    pub fn negotiate(&self, m: &mut dyn Machine, accepted: u64) -> Result<(u64, u64), VirtioError> {
        self.reset(m)?;
        self.add_status(m, status::ACKNOWLEDGE);
        self.add_status(m, status::DRIVER);
        let offered = self.device_features(m);
        if offered & F_VERSION_1 == 0 {
            return Err(VirtioError::NoVersion1);
        }
        let features = offered & (accepted | F_VERSION_1);
        self.set_features(m, features)?;
        Ok((offered, features))
    }

    /// Sets up queue `index` in `dma` at offset `off` (page-aligned, [`queue::QUEUE_BYTES`]
    /// long) with the largest power-of-two size ≤ min(QueueNumMax, [`MAX_QUEUE_SIZE`]) and
    /// marks it ready.
    pub fn setup_queue(
        &self,
        m: &mut dyn Machine,
        dma: &mut Dma,
        index: u16,
        off: usize,
    ) -> Result<SplitQueue, VirtioError> {
        self.write(m, reg::QUEUE_SEL, u32::from(index));
        let max = self.read(m, reg::QUEUE_NUM_MAX);
        if max == 0 || self.read(m, reg::QUEUE_READY) != 0 {
            return Err(VirtioError::QueueUnavailable { queue: index, max });
        }
        let mut size = MAX_QUEUE_SIZE;
        while u32::from(size) > max {
            size /= 2;
        }
        let q = SplitQueue::new(dma, off, size).ok_or(VirtioError::QueueMemory)?;
        let (desc, avail, used) = q.addresses(dma);
        self.write(m, reg::QUEUE_NUM, u32::from(size));
        self.write64(m, reg::QUEUE_DESC_LOW, desc);
        self.write64(m, reg::QUEUE_DRIVER_LOW, avail);
        self.write64(m, reg::QUEUE_DEVICE_LOW, used);
        self.write(m, reg::QUEUE_READY, 1);
        Ok(q)
    }

    /// Sets DRIVER_OK and checks the device does not already ask for a reset.
    pub fn driver_ok(&self, m: &mut dyn Machine) -> Result<(), VirtioError> {
        self.add_status(m, status::DRIVER_OK);
        let s = self.read(m, reg::STATUS);
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(VirtioError::NeedsReset(s));
        }
        Ok(())
    }

    /// Notifies the device that queue `index` has new buffers (one MMIO write).
    pub fn notify(&self, m: &mut dyn Machine, index: u16) {
        self.write(m, reg::QUEUE_NOTIFY, u32::from(index));
    }

    /// Reads `N` config-space bytes from config offset `offset` with single-byte accesses
    /// (the width the virtio spec requires for byte fields), retrying while
    /// ConfigGeneration changes under the reads.
    pub fn config_bytes<const N: usize>(&self, m: &mut dyn Machine, offset: u64) -> Result<[u8; N], VirtioError> {
        for _ in 0..CONFIG_RETRIES {
            let before = self.read(m, reg::CONFIG_GENERATION);
            let mut out = [0u8; N];
            for (i, b) in out.iter_mut().enumerate() {
                *b = m.mmio_read8(self.win.base + reg::CONFIG + offset + i as u64);
            }
            if self.read(m, reg::CONFIG_GENERATION) == before {
                return Ok(out);
            }
        }
        Err(VirtioError::ConfigUnstable)
    }

    /// Reads the 16-bit config field at config offset `offset` (2-byte aligned) with one
    /// 16-bit access.
    pub fn config_u16(&self, m: &mut dyn Machine, offset: u64) -> u16 {
        m.mmio_read16(self.win.base + reg::CONFIG + offset)
    }

    /// Reads `N` config-space words starting at config offset `offset` (a multiple of 4),
    /// retrying while ConfigGeneration changes under the reads.
    pub fn config_words<const N: usize>(&self, m: &mut dyn Machine, offset: u64) -> Result<[u32; N], VirtioError> {
        for _ in 0..CONFIG_RETRIES {
            let before = self.read(m, reg::CONFIG_GENERATION);
            let mut out = [0u32; N];
            for (i, w) in out.iter_mut().enumerate() {
                *w = self.read(m, reg::CONFIG + offset + 4 * i as u64);
            }
            if self.read(m, reg::CONFIG_GENERATION) == before {
                return Ok(out);
            }
        }
        Err(VirtioError::ConfigUnstable)
    }
}

/// Low 32 bits.
pub fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// High 32 bits.
pub fn hi32(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

/// Probes every window on the command line, printing one line each
/// (`virtio: 0xBASE size=0xS irq=I version=V device=D vendor=0xV` or the reason it was
/// skipped), and returns the `index`-th (from 0) version-2 device with DeviceID `device_id`.
pub fn find_device(con: &mut Console<'_>, params: &Params<'_>, device_id: u32, index: u64) -> Option<Transport> {
    let windows = Windows::from_params(params);
    if windows.rejected != 0 {
        con.str(b"virtio: ignored ")
            .dec(windows.rejected as u64)
            .str(b" malformed or excess virtio_mmio.device= word(s)")
            .nl();
    }
    let mut seen = 0u64;
    let mut found = None;
    for win in windows.iter() {
        con.str(b"virtio: ").hex(win.base).str(b" size=").hex(win.size).str(b" irq=").dec(u64::from(win.irq));
        match Transport::probe(con.machine(), win) {
            Err(e) => {
                con.str(b": ");
                e.print(con);
            }
            Ok((t, id)) => {
                con.str(b" version=")
                    .dec(u64::from(id.version))
                    .str(b" device=")
                    .dec(u64::from(id.device_id))
                    .str(b" vendor=")
                    .hex(u64::from(id.vendor_id));
                if id.device_id == device_id && found.is_none() {
                    if id.version != 2 {
                        con.str(b": skipped: ");
                        VirtioError::Version(id.version).print(con);
                    } else if seen == index {
                        found = Some(t);
                        con.str(b" (selected)");
                    } else {
                        seen += 1;
                    }
                }
            }
        }
        con.nl();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linux_and_qemu_words() {
        assert_eq!(
            parse_word(b"virtio_mmio.device=4K@0xd0000000:5"),
            Ok(Some(Window { base: 0xd000_0000, size: 4096, irq: 5, id: None }))
        );
        assert_eq!(
            parse_word(b"virtio_mmio.device=512@0xfeb00e00:12"),
            Ok(Some(Window { base: 0xfeb0_0e00, size: 512, irq: 12, id: None }))
        );
        assert_eq!(
            parse_word(b"virtio_mmio.device=1M@0x100000000:3:7"),
            Ok(Some(Window { base: 0x1_0000_0000, size: 1 << 20, irq: 3, id: Some(7) }))
        );
        assert_eq!(parse_word(b"console=ttyS0"), Ok(None));
        for bad in [
            &b"virtio_mmio.device="[..],
            b"virtio_mmio.device=4K",
            b"virtio_mmio.device=4K@0xd0000000",
            b"virtio_mmio.device=4X@0xd0000000:5",
            b"virtio_mmio.device=4K@zz:5",
            b"virtio_mmio.device=4K@0xd0000000:5:1:2",
            b"virtio_mmio.device=4K@0xd0000000:99999999999",
            b"virtio_mmio.device=99999999999G@0xd0000000:5",
        ] {
            assert_eq!(parse_word(bad), Err(VirtioError::Malformed), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size(b"512"), Some(512));
        assert_eq!(parse_size(b"4k"), Some(4096));
        assert_eq!(parse_size(b"0x10M"), Some(16 << 20));
        assert_eq!(parse_size(b"2G"), Some(2 << 30));
        assert_eq!(parse_size(b"K"), None);
    }

    #[test]
    fn collects_windows_and_counts_rejects() {
        let mut cmd = String::from("console=ttyS0 virtio_mmio.device=oops ");
        for i in 0..MAX_WINDOWS + 2 {
            cmd.push_str(&format!("virtio_mmio.device=4K@{:#x}:{} ", 0xd000_0000 + i * 0x1000, i + 5));
        }
        let p = Params::parse(cmd.as_bytes()).expect("parses");
        let w = Windows::from_params(&p);
        assert_eq!(w.len(), MAX_WINDOWS);
        assert_eq!(w.rejected, 3);
        let v: Vec<Window> = w.iter().collect();
        assert_eq!(v[1].base, 0xd000_1000);
        assert_eq!(v[1].irq, 6);
    }

    #[test]
    fn windows_outside_the_mmio_range_are_refused() {
        use crate::machine::testing::FakeMachine;
        let mut m = FakeMachine::default();
        let low = Window { base: 0x10_0000, size: 0x1000, irq: 5, id: None };
        assert_eq!(Transport::probe(&mut m, low).err(), Some(VirtioError::BadWindow));
        let high = Window { base: 0xffff_f000, size: 0x2000, ..low };
        assert_eq!(Transport::probe(&mut m, high).err(), Some(VirtioError::BadWindow));
        let small = Window { base: 0xd000_0000, size: 0x100, ..low };
        assert_eq!(Transport::probe(&mut m, small).err(), Some(VirtioError::BadWindow));
        let empty = Window { base: 0xd000_0000, ..low };
        // Nothing there: reads return all-ones.
        assert_eq!(Transport::probe(&mut m, empty).err(), Some(VirtioError::NoMagic(u32::MAX)));
        assert!(m.mmio_log.iter().all(|&(a, _, _)| a == 0xd000_0000));
    }
}
