//! `probe.test=pio-loop probe.n=N [probe.port=0x3fd]`: N back-to-back `in al, dx` timed with
//! the TSC. Prints `pio-loop: port=0x3fd n=N cycles=C cycles_per_exit=X`.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"pio-loop", run };

/// Default N.
pub const DEFAULT_N: u64 = 10_000;
/// Default port: COM1's line status register.
pub const DEFAULT_PORT: u16 = 0x3fd;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let n = match params.num(b"n", DEFAULT_N, 1, u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    let port = match params.port(b"port", DEFAULT_PORT) {
        Ok(p) => p,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    let m = con.machine();
    let start = m.tsc();
    m.in_loop(port, n);
    let end = m.tsc();
    let cycles = end.wrapping_sub(start);
    con.str(b"pio-loop: port=")
        .hex(u64::from(port))
        .str(b" n=")
        .dec(n)
        .str(b" cycles=")
        .dec(cycles)
        .str(b" cycles_per_exit=")
        .dec(cycles / n)
        .nl();
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use crate::machine::testing::FakeMachine;
    use crate::{probe_main, Verdict};

    #[test]
    fn times_n_reads_of_the_port() {
        let mut m = FakeMachine { tsc_per_in: 7, tsc_step: 3, ..FakeMachine::default() };
        let v = probe_main(&mut m, b"probe.test=pio-loop probe.n=1000 probe.port=0x80");
        assert_eq!(v, Verdict::Pass);
        assert_eq!(m.ins.iter().filter(|&&p| p == 0x80).count(), 1000);
        assert!(m.output().contains("pio-loop: port=0x80 n=1000 cycles=7003 cycles_per_exit=7\n"), "{}", m.output());
    }

    #[test]
    fn bad_n_is_bad_args() {
        let mut m = FakeMachine::default();
        assert_eq!(probe_main(&mut m, b"probe.test=pio-loop probe.n=0"), Verdict::BadArgs);
        assert!(m.output().contains("probe: bad argument probe.n=0: out of range\n"));
        let mut m = FakeMachine::default();
        assert_eq!(probe_main(&mut m, b"probe.test=pio-loop probe.port=0x10000"), Verdict::BadArgs);
        let mut m = FakeMachine::default();
        assert_eq!(probe_main(&mut m, b"probe.test=pio-loop probe.n=lots"), Verdict::BadArgs);
        assert!(m.output().contains("probe: bad argument probe.n=lots: not a number\n"));
    }
}
