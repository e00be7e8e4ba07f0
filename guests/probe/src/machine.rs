//! The guest's view of the machine: port I/O, the TSC and `pause`.
//!
//! The tests only talk to the machine through [`Machine`], so the probe never executes a
//! privileged instruction in its work loops, and host unit tests run it against a fake.

/// Port I/O, time stamp counter and spin hint: all the probe needs from the hardware.
pub trait Machine {
    /// `in al, dx`.
    fn inb(&mut self, port: u16) -> u8;
    /// `out dx, al`.
    fn outb(&mut self, port: u16, value: u8);
    /// Reads the time stamp counter (ordered after earlier loads).
    fn tsc(&mut self) -> u64;
    /// Spin-loop hint (`pause`).
    fn pause(&mut self);
    /// `count` back-to-back `in al, dx` from `port`, as tight as possible (one exit each).
    fn in_loop(&mut self, port: u16, count: u64) {
        for _ in 0..count {
            self.inb(port);
        }
    }
}

/// The real machine: x86 port I/O, `rdtsc` and `pause` (none of them privileged at IOPL 0 in
/// ring 0, and all natively executed or emulated under PVM).
#[derive(Debug)]
pub struct PortIo {
    _private: (),
}

impl PortIo {
    /// Creates the handle used to drive the hardware.
    ///
    /// # Safety
    /// Only call this inside the probe guest, running in ring 0 (or with I/O permission for
    /// every port it touches) with no device programmed to DMA into memory the caller does not
    /// own: port writes through the returned handle reach real (virtual) devices.
    pub unsafe fn new() -> Self {
        PortIo { _private: () }
    }
}

impl Machine for PortIo {
    fn inb(&mut self, port: u16) -> u8 {
        let value: u8;
        // SAFETY: `PortIo::new`'s contract: we are the guest kernel, port reads touch no memory.
        unsafe {
            core::arch::asm!("in al, dx", out("al") value, in("dx") port,
                options(nomem, nostack, preserves_flags));
        }
        value
    }

    fn outb(&mut self, port: u16, value: u8) {
        // SAFETY: `PortIo::new`'s contract: we are the guest kernel and no device DMAs into
        // memory we use, so a port write cannot break Rust's memory model.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") value,
                options(nomem, nostack, preserves_flags));
        }
    }

    fn tsc(&mut self) -> u64 {
        let lo: u32;
        let hi: u32;
        // SAFETY: `lfence; rdtsc` only orders earlier loads and reads the TSC into edx:eax.
        // Not `rdtscp`: under PVM the instructions after an exit are emulated, and KVM's
        // emulator has no `rdtscp` (seen: emulation failure); `lfence` works there.
        unsafe {
            core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    }

    fn pause(&mut self) {
        core::hint::spin_loop();
    }

    fn in_loop(&mut self, port: u16, count: u64) {
        if count == 0 {
            return;
        }
        // SAFETY: port reads only (see `inb`); the loop counts `rcx` down from `count` >= 1 to 0.
        unsafe {
            core::arch::asm!(
                "2:",
                "in al, dx",
                "dec rcx",
                "jnz 2b",
                in("dx") port,
                inout("rcx") count => _,
                out("al") _,
                options(nomem, nostack),
            );
        }
    }
}

/// A simulated machine for host unit tests.
#[cfg(test)]
pub mod testing {
    use super::Machine;

    /// Records every port write; reads return `lsr` for COM1's LSR and `other` elsewhere.
    #[derive(Debug)]
    pub struct FakeMachine {
        /// Every `outb` as (port, value).
        pub outs: Vec<(u16, u8)>,
        /// Every `inb` port.
        pub ins: Vec<u16>,
        /// Value read back from port 0x3fd.
        pub lsr: u8,
        /// Value read from any other port.
        pub other: u8,
        /// Next TSC value; advances by `tsc_step` per read and by `tsc_per_in` per `inb`.
        pub tsc_now: u64,
        /// TSC advance per `tsc()` call.
        pub tsc_step: u64,
        /// TSC advance per `inb`.
        pub tsc_per_in: u64,
        /// Number of `pause` calls.
        pub pauses: u64,
    }

    impl Default for FakeMachine {
        fn default() -> Self {
            FakeMachine {
                outs: Vec::new(),
                ins: Vec::new(),
                lsr: 0x60,
                other: 0xff,
                tsc_now: 1000,
                tsc_step: 0,
                tsc_per_in: 0,
                pauses: 0,
            }
        }
    }

    impl FakeMachine {
        /// The bytes written to COM1's data register after the UART set-up, as text.
        /// (Set-up writes to 0x3f8 happen with DLAB set and are skipped.)
        pub fn output(&self) -> String {
            let mut dlab = false;
            let mut bytes = Vec::new();
            for &(port, value) in &self.outs {
                match port {
                    0x3fb => dlab = value & 0x80 != 0,
                    0x3f8 if !dlab => bytes.push(value),
                    _ => {}
                }
            }
            String::from_utf8(bytes).expect("console output is ASCII")
        }
    }

    impl Machine for FakeMachine {
        fn inb(&mut self, port: u16) -> u8 {
            self.ins.push(port);
            self.tsc_now += self.tsc_per_in;
            if port == 0x3fd {
                self.lsr
            } else {
                self.other
            }
        }
        fn outb(&mut self, port: u16, value: u8) {
            self.outs.push((port, value));
        }
        fn tsc(&mut self) -> u64 {
            self.tsc_now += self.tsc_step;
            self.tsc_now
        }
        fn pause(&mut self) {
            self.pauses += 1;
        }
    }
}
