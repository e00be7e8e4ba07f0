//! Output through a 16550 UART, with bounded polling so a dead or vanished UART never hangs
//! the guest, and integer formatting without `core::fmt` (keeps the binary small and SSE-free).

use crate::machine::Machine;

/// Line status register: transmitter holding register empty.
const LSR_THRE: u8 = 0x20;
/// What a port with no device behind it reads as.
const NO_DEVICE: u8 = 0xff;

/// A 16550-compatible UART at an I/O port base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    base: u16,
}

impl Uart {
    /// COM1 at 0x3f8.
    pub const COM1: Uart = Uart { base: 0x3f8 };
    /// Upper bound of LSR polls waiting for THRE before a byte is written anyway.
    pub const MAX_THRE_POLLS: u32 = 2048;

    /// The I/O port base.
    pub fn base(self) -> u16 {
        self.base
    }

    /// Programs 115200 8N1, FIFOs on, interrupts off.
    pub fn init(self, m: &mut dyn Machine) {
        let b = self.base;
        m.outb(b + 1, 0x00); // IER: no interrupts
        m.outb(b + 3, 0x80); // LCR: DLAB on
        m.outb(b, 0x01); // DLL: divisor 1 = 115200 baud
        m.outb(b + 1, 0x00); // DLM
        m.outb(b + 3, 0x03); // LCR: 8N1, DLAB off
        m.outb(b + 2, 0xc7); // FCR: enable and clear FIFOs
        m.outb(b + 4, 0x03); // MCR: DTR | RTS (OUT2 off: no IRQ)
    }

    /// Writes one byte once the transmitter is ready. Polls LSR at most
    /// [`Self::MAX_THRE_POLLS`] times; an LSR of 0xff means "no device / gone": the byte is
    /// written without waiting (a restarted device gets it, a missing one drops it).
    pub fn put(self, m: &mut dyn Machine, byte: u8) {
        for _ in 0..Self::MAX_THRE_POLLS {
            let lsr = m.inb(self.base + 5);
            if lsr == NO_DEVICE || lsr & LSR_THRE != 0 {
                break;
            }
            m.pause();
        }
        m.outb(self.base, byte);
    }
}

/// A line-oriented writer on a [`Uart`], chainable: `con.str(b"tick ").dec(i).nl();`.
pub struct Console<'m> {
    machine: &'m mut dyn Machine,
    uart: Uart,
}

impl<'m> Console<'m> {
    /// Initialises `uart` and wraps it.
    pub fn new(machine: &'m mut dyn Machine, uart: Uart) -> Self {
        uart.init(machine);
        Console { machine, uart }
    }

    /// The machine, for tests that do their own port I/O.
    pub fn machine(&mut self) -> &mut dyn Machine {
        &mut *self.machine
    }

    /// Writes our own (trusted, printable) text as is.
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.uart.put(self.machine, b);
        }
        self
    }

    /// Writes guest-supplied bytes, replacing anything outside printable ASCII with `?`.
    pub fn untrusted(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            let b = if (0x20..0x7f).contains(&b) { b } else { b'?' };
            self.uart.put(self.machine, b);
        }
        self
    }

    /// Ends the line (`\n` only).
    pub fn nl(&mut self) -> &mut Self {
        self.uart.put(self.machine, b'\n');
        self
    }

    /// Writes `v` in decimal.
    pub fn dec(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let s = format_dec(v, &mut buf);
        self.str(s)
    }

    /// Writes `v` as `0x` followed by lowercase hex digits, no padding.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 16];
        let s = format_hex(v, &mut buf);
        self.str(b"0x").str(s)
    }
}

/// Formats `v` in decimal into the end of `buf`; returns the digits.
pub fn format_dec(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        // `v % 10` < 10, so the cast cannot truncate.
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Formats `v` in lowercase hex (no prefix) into the end of `buf`; returns the digits.
pub fn format_hex(mut v: u64, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::testing::FakeMachine;

    #[test]
    fn formats_numbers() {
        let mut d = [0u8; 20];
        assert_eq!(format_dec(0, &mut d), b"0");
        assert_eq!(format_dec(26_100, &mut d), b"26100");
        assert_eq!(format_dec(u64::MAX, &mut d), b"18446744073709551615");
        let mut h = [0u8; 16];
        assert_eq!(format_hex(0, &mut h), b"0");
        assert_eq!(format_hex(0x3fd, &mut h), b"3fd");
        assert_eq!(format_hex(u64::MAX, &mut h), b"ffffffffffffffff");
    }

    #[test]
    fn busy_uart_is_polled_a_bounded_number_of_times() {
        let mut m = FakeMachine { lsr: 0x00, ..FakeMachine::default() };
        Uart::COM1.put(&mut m, b'x');
        assert_eq!(m.ins.len(), Uart::MAX_THRE_POLLS as usize);
        assert_eq!(m.outs, vec![(0x3f8, b'x')]);
    }

    #[test]
    fn vanished_uart_costs_one_poll_per_byte() {
        let mut m = FakeMachine { lsr: 0xff, ..FakeMachine::default() };
        let mut con = Console::new(&mut m, Uart::COM1);
        con.str(b"ab").nl();
        assert_eq!(m.ins, vec![0x3fd; 3]);
        assert_eq!(m.output(), "ab\n");
    }

    #[test]
    fn ready_uart_is_polled_once() {
        let mut m = FakeMachine::default();
        let mut con = Console::new(&mut m, Uart::COM1);
        con.str(b"x=").hex(0x3fd).str(b" ").dec(42);
        assert_eq!(m.ins.len(), "x=0x3fd 42".len());
        assert_eq!(m.output(), "x=0x3fd 42");
    }
}
