//! Address-range dispatch of port-I/O and MMIO exits.
//!
//! The vCPU run loop knows no device: it hands every port-I/O or MMIO access to a [`Bus`], which
//! looks the address up in its range map and calls the [`BusDevice`] registered there. A device in
//! the core (the debug-exit port, the i8042 reset line) and a device forwarded to a service process
//! look the same from here.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already registered.
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A device that answers accesses inside its address range.
///
/// `base` is the start of the range the device was registered at and `offset` is relative to it,
/// so one implementation can sit at several addresses. `data.len()` is the access size (1, 2, 4 or
/// 8 bytes for the accesses KVM reports). A read must fill all of `data`.
pub trait BusDevice: Send + Sync {
    /// Guest read of `data.len()` bytes at `base + offset`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `base + offset`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A map from address ranges to devices. Built before the vCPUs start, then shared read-only.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Finds the device covering `addr`: its base and the device.
    pub fn resolve(&self, addr: u64) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((base, &entry.device))
    }

    /// Dispatches a read. Returns false (and fills `data` with 0xff, like an open bus) when no
    /// device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.read(base, addr - base, data);
                true
            }
            None => {
                ipc::ring::fill_access(data, 0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false when no device covers `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&self, base: u64, offset: u64, data: &[u8]) {
            self.0.lock().expect("lock").push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let dev = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(dev.0.lock().expect("lock")[0], (0x3f8, 0, vec![b'x']));
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let dev = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(0x10, 0x10, dev.clone()).expect("insert");
        assert!(matches!(bus.insert(0x1f, 1, dev.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x08, 9, dev.clone()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x40, 0, dev.clone()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, dev.clone()), Err(BusError::InvalidRange { .. })));
        bus.insert(0x20, 1, dev).expect("adjacent range is fine");
    }
}
