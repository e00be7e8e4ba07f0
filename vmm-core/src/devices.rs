//! The few devices that live in the core because they act on the VM itself: the debug-exit port,
//! the i8042 reset line, and the POST-code port. Everything else is a service.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

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
        ipc::ring::fill_access(data, 0);
    }
    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(v) = data.first() {
            self.stop.stop(StopReason::DebugExit(*v));
        }
    }
}

/// The parts of an i8042 keyboard controller a VMM needs: the reset line (command 0xfe on port
/// 0x64 stops the VM) and a keyboard that can only type Ctrl-Alt-Del ([`I8042::ctrl_alt_del`],
/// the API's `SendCtrlAltDel`). The status register's output-buffer-full bit tells whether the
/// data port (0x60) holds a byte; the keyboard's interrupt line (IRQ 1) is raised through an
/// irqfd when bytes are queued. A status read with nothing queued says "no data, input buffer
/// empty", so a driver polling it never spins.
pub struct I8042 {
    stop: StopHandle,
    /// Bytes the guest has not read yet.
    buffer: Mutex<VecDeque<u8>>,
    /// The keyboard interrupt (GSI 1), when wired.
    irq: Option<EventFd>,
}

/// Data port of the i8042.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Command/status port of the i8042.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// The keyboard's interrupt line.
pub const I8042_KBD_GSI: u32 = 1;
const I8042_CMD_RESET: u8 = 0xfe;
/// Status bit: the data port holds a byte.
const I8042_STATUS_OBF: u8 = 0x01;
/// Most bytes queued; more are dropped (a guest that never reads its keyboard).
const I8042_BUFFER_MAX: usize = 64;

/// Ctrl-Alt-Del in scancode set 2 as a PS/2 keyboard sends it (make codes, then break codes),
/// what Firecracker's `SendCtrlAltDel` types: Ctrl (0x14), Alt (0x11), Del (0xe0 0x71).
pub const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

impl I8042 {
    /// An i8042 that stops the VM through `stop` on reset and raises `irq` (if any) when keys
    /// are queued.
    pub fn new(stop: StopHandle, irq: Option<EventFd>) -> Self {
        Self { stop, buffer: Mutex::new(VecDeque::new()), irq }
    }

    /// Types Ctrl-Alt-Del and raises the keyboard interrupt. Returns false if the guest left too
    /// many keys unread (nothing is queued then).
    pub fn ctrl_alt_del(&self) -> bool {
        let keys = &CTRL_ALT_DEL_SET2;
        {
            let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            if b.len() + keys.len() > I8042_BUFFER_MAX {
                return false;
            }
            b.extend(keys.iter());
        }
        if let Some(irq) = &self.irq {
            let _ = irq.write(1);
        }
        true
    }
}

impl BusDevice for I8042 {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        ipc::ring::fill_access(data, 0);
        let Some(first) = data.first_mut() else { return };
        let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if base + offset == I8042_COMMAND_PORT {
            *first = if b.is_empty() { 0 } else { I8042_STATUS_OBF };
        } else if let Some(byte) = b.pop_front() {
            *first = byte;
            // More to read: raise again, as a controller does for each byte.
            if !b.is_empty() {
                if let Some(irq) = &self.irq {
                    let _ = irq.write(1);
                }
            }
        }
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
        ipc::ring::fill_access(data, 0);
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
    fn i8042_types_ctrl_alt_del_and_raises_irq1() {
        let (h, _rx) = StopHandle::new();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let d = I8042::new(h, Some(irq.try_clone().expect("clone")));
        let status = |d: &I8042| {
            let mut b = [0u8];
            d.read(I8042_COMMAND_PORT, 0, &mut b);
            b[0]
        };
        assert_eq!(status(&d), 0, "nothing queued");
        assert!(d.ctrl_alt_del());
        assert_eq!(irq.read().expect("irq raised"), 1);
        let mut got = Vec::new();
        while status(&d) & 1 != 0 {
            let mut b = [0u8];
            d.read(I8042_DATA_PORT, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        // A guest that never reads: the buffer is bounded.
        let n = (0..20).filter(|_| d.ctrl_alt_del()).count();
        assert_eq!(n, I8042_BUFFER_MAX / CTRL_ALT_DEL_SET2.len());
    }

    #[test]
    fn i8042_reset_only_on_command_port() {
        let (h, rx) = StopHandle::new();
        let d = I8042::new(h, None);
        d.write(I8042_DATA_PORT, 0, &[0xfe]);
        assert!(rx.try_recv().is_err());
        d.write(I8042_COMMAND_PORT, 0, &[0x20]);
        assert!(rx.try_recv().is_err());
        d.write(I8042_COMMAND_PORT, 0, &[0xfe]);
        assert_eq!(rx.try_recv().expect("stop"), StopReason::I8042Reset);
    }
}
