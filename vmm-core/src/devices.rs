//! The few devices that live in the core because they act on the VM itself: the debug-exit port,
//! the i8042 reset line, and the POST-code port. Everything else is a service.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bus::BusDevice;
use crate::control::{StopHandle, StopReason};

/// QEMU's `isa-debug-exit` port: a guest write of `v` stops the VM, and `bulkhead` exits with
/// status `v` (QEMU exits with `(v << 1) | 1`). Reads return 0.
pub struct DebugExit {
    stop: StopHandle,
}

/// The usual I/O port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

impl DebugExit {
    /// A debug-exit device that stops the VM through `stop`.
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(v) = data.first() {
            self.stop.stop(StopReason::DebugExit(*v));
        }
    }
}

/// The part of an i8042 keyboard controller a guest uses to reset the machine: command 0xfe
/// ("pulse reset line") on port 0x64 stops the VM. Status reads say "no data, input buffer
/// empty" so a driver polling it never spins.
pub struct I8042 {
    stop: StopHandle,
}

/// Data port of the i8042.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Command/status port of the i8042.
pub const I8042_COMMAND_PORT: u64 = 0x64;
const I8042_CMD_RESET: u8 = 0xfe;

impl I8042 {
    /// An i8042 that stops the VM through `stop` on reset.
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        if base + offset == I8042_COMMAND_PORT && data.first() == Some(&I8042_CMD_RESET) {
            self.stop.stop(StopReason::I8042Reset);
        }
    }
}

/// Port 0x80, the POST-code port: writes are counted and dropped, reads return 0. It is also the
/// in-core baseline for the exit-forwarding benchmark.
#[derive(Default)]
pub struct PostCode {
    accesses: AtomicU64,
}

/// The POST-code port.
pub const POST_CODE_PORT: u64 = 0x80;

impl PostCode {
    /// Accesses seen so far.
    pub fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }
}

impl BusDevice for PostCode {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        self.accesses.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_stops_with_value() {
        let (h, rx) = StopHandle::new();
        let d = DebugExit::new(h);
        d.write(DEBUG_EXIT_PORT, 0, &[7]);
        assert_eq!(rx.try_recv().expect("stop"), StopReason::DebugExit(7));
    }

    #[test]
    fn i8042_reset_only_on_command_port() {
        let (h, rx) = StopHandle::new();
        let d = I8042::new(h);
        d.write(I8042_DATA_PORT, 0, &[0xfe]);
        assert!(rx.try_recv().is_err());
        d.write(I8042_COMMAND_PORT, 0, &[0x20]);
        assert!(rx.try_recv().is_err());
        d.write(I8042_COMMAND_PORT, 0, &[0xfe]);
        assert_eq!(rx.try_recv().expect("stop"), StopReason::I8042Reset);
    }
}
