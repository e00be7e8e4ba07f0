//! The Bulkhead probe guest: a tiny freestanding x86-64 kernel that any VMM can boot.
//!
//! The library holds everything except the entry code: the port-I/O [`Machine`], the 16550
//! console, the command-line parser, the test registry and [`probe_main`]. It is `no_std` so the
//! guest binary (`src/main.rs`) can use it, and builds with `std` under `cargo test`, where every
//! test runs against a simulated [`Machine`].
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod boot;
pub mod cmdline;
pub mod console;
pub mod machine;
pub mod pattern;
pub mod suite;
pub mod virtio;

pub use cmdline::Params;
pub use console::{Console, Uart};
pub use machine::Machine;

/// The outcome of a run, written to the debug-exit port 0xf4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Verdict {
    /// The test passed (exit byte 0).
    Pass = 0,
    /// The test ran and failed (exit byte 1).
    Fail = 1,
    /// Missing or malformed parameters, or an unknown test (exit byte 2).
    BadArgs = 2,
}

impl Verdict {
    /// The byte written to the debug-exit port.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The word printed in the verdict line.
    pub fn word(self) -> &'static [u8] {
        match self {
            Verdict::Pass => b"pass",
            Verdict::Fail => b"fail",
            Verdict::BadArgs => b"bad-args",
        }
    }
}

/// Size of the DMA arena the guest binary reserves (section `.dma`): the virtio-blk queue and
/// headers plus 8 MiB of data buffers (queue depth 64 at 128 KiB per request).
pub const DMA_ARENA_BYTES: usize = virtio::blk::DATA_OFF + (8 << 20);

// The net driver's queues and buffers fit too (the rest is the tests' scratch memory).
const _: () = assert!(virtio::net::NET_DMA_BYTES < DMA_ARENA_BYTES);

/// QEMU isa-debug-exit port: `out 0xf4, al` with the verdict byte.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 command port; writing [`I8042_RESET`] pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 "pulse reset" command.
pub const I8042_RESET: u8 = 0xfe;

/// Which entry point the VMM started the probe at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// `_start_pvh`: PVH (32-bit, paging off, `hvm_start_info`).
    Pvh,
    /// `_start64`: the Linux 64-bit boot protocol (long mode, zero page).
    Linux64,
}

impl Entry {
    /// The word printed in the `probe: entry` line.
    pub fn word(self) -> &'static [u8] {
        match self {
            Entry::Pvh => b"pvh",
            Entry::Linux64 => b"linux64",
        }
    }
}

/// Runs the probe: prints the start line, parses `cmdline`, runs the selected test and prints
/// the verdict line. Returns the verdict; the caller exits with [`finish`].
pub fn probe_main(machine: &mut dyn Machine, cmdline: &[u8]) -> Verdict {
    probe_run(machine, cmdline, None)
}

/// [`probe_main`], printing `probe: entry pvh|linux64` after the start line when `entry` is
/// known (the real guest knows it; the tests' fake machine does not).
pub fn probe_run(machine: &mut dyn Machine, cmdline: &[u8], entry: Option<Entry>) -> Verdict {
    let mut con = Console::new(machine, Uart::COM1);
    con.str(b"probe: start ").untrusted(cmdline::trim(cmdline)).nl();
    if let Some(e) = entry {
        con.str(b"probe: entry ").str(e.word()).nl();
    }
    let verdict = run_test(&mut con, cmdline);
    con.str(b"probe: verdict ").str(verdict.word()).str(b" (").dec(u64::from(verdict.code())).str(b")").nl();
    verdict
}

fn run_test(con: &mut Console<'_>, cmdline: &[u8]) -> Verdict {
    let params = match Params::parse(cmdline) {
        Ok(p) => p,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    let Some(name) = params.test() else {
        con.str(b"probe: missing probe.test=NAME; tests:");
        suite::print_names(con);
        con.nl();
        return Verdict::BadArgs;
    };
    match suite::find(name) {
        Some(test) => (test.run)(con, &params),
        None => {
            con.str(b"probe: unknown test ").untrusted(name).nl();
            con.str(b"probe: tests:");
            suite::print_names(con);
            con.nl();
            Verdict::BadArgs
        }
    }
}

/// Writes the verdict to the debug-exit port, then asks the i8042 for a reset. Returns if the
/// machine is still running after both (the caller then spins).
pub fn exit_ports(machine: &mut dyn Machine, verdict: Verdict) {
    machine.outb(DEBUG_EXIT_PORT, verdict.code());
    machine.outb(I8042_COMMAND_PORT, I8042_RESET);
}

/// Exits with `verdict` through [`exit_ports`]; if the VM still runs, spins on `pause` forever.
pub fn finish(machine: &mut dyn Machine, verdict: Verdict) -> ! {
    exit_ports(machine, verdict);
    loop {
        machine.pause();
    }
}

#[cfg(test)]
mod lib_tests {
    use super::*;
    use crate::machine::testing::FakeMachine;

    fn run(cmdline: &str) -> (Verdict, String, FakeMachine) {
        let mut m = FakeMachine::default();
        let v = probe_main(&mut m, cmdline.as_bytes());
        let out = m.output();
        (v, out, m)
    }

    #[test]
    fn hello_passes_and_prints_start_and_verdict() {
        let (v, out, _) = run("console=ttyS0 probe.test=hello");
        assert_eq!(v, Verdict::Pass);
        assert_eq!(
            out,
            "probe: start console=ttyS0 probe.test=hello\n\
             probe: hello from the probe guest\n\
             probe: verdict pass (0)\n"
        );
    }

    #[test]
    fn the_entry_is_named_after_the_start_line() {
        let mut m = FakeMachine::default();
        assert_eq!(probe_run(&mut m, b"probe.test=hello", Some(Entry::Pvh)), Verdict::Pass);
        assert!(m.output().starts_with("probe: start probe.test=hello\nprobe: entry pvh\n"), "{}", m.output());
    }

    #[test]
    fn unknown_test_is_bad_args() {
        let (v, out, _) = run("probe.test=nope");
        assert_eq!(v, Verdict::BadArgs);
        assert!(out.contains("probe: unknown test nope\n"), "{out}");
        assert!(out.ends_with("probe: verdict bad-args (2)\n"), "{out}");
    }

    #[test]
    fn missing_test_is_bad_args() {
        let (v, out, _) = run("quiet");
        assert_eq!(v, Verdict::BadArgs);
        assert!(out.contains("probe: missing probe.test=NAME"), "{out}");
    }

    #[test]
    fn hostile_cmdline_is_sanitized() {
        let (v, out, _) = run("probe.test=\x1b[2Jhello\x7f");
        assert_eq!(v, Verdict::BadArgs);
        assert!(out.starts_with("probe: start probe.test=?[2Jhello?\n"), "{out}");
    }

    #[test]
    fn exit_writes_debug_exit_then_reset() {
        let mut m = FakeMachine::default();
        exit_ports(&mut m, Verdict::Fail);
        assert_eq!(m.outs, vec![(0xf4, 1), (0x64, 0xfe)]);
    }
}
