//! `probe.test=ticker probe.n=N probe.delay=D`: prints `tick I` for I in 1..=N with D reads of
//! port 0x80 between ticks. Used to kill the console service mid-run: the guest keeps going
//! (the UART's bounded polling never waits on a vanished device) and finishes.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"ticker", run };

/// Default N.
pub const DEFAULT_N: u64 = 10;
/// Default D.
pub const DEFAULT_DELAY: u64 = 1000;
/// The port read between ticks (POST code port: no side effects anywhere).
pub const DELAY_PORT: u16 = 0x80;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let (n, delay) = match (params.num(b"n", DEFAULT_N, 0, u64::MAX), params.num(b"delay", DEFAULT_DELAY, 0, u64::MAX))
    {
        (Ok(n), Ok(d)) => (n, d),
        (Err(e), _) | (_, Err(e)) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    for i in 1..=n {
        con.machine().in_loop(DELAY_PORT, delay);
        con.str(b"tick ").dec(i).nl();
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use crate::machine::testing::FakeMachine;
    use crate::{probe_main, Verdict};

    #[test]
    fn ticks_with_delay_reads() {
        let mut m = FakeMachine::default();
        let v = probe_main(&mut m, b"probe.test=ticker probe.n=3 probe.delay=5");
        assert_eq!(v, Verdict::Pass);
        assert_eq!(m.ins.iter().filter(|&&p| p == 0x80).count(), 15);
        assert!(m.output().contains("tick 1\ntick 2\ntick 3\nprobe: verdict pass (0)\n"));
    }

    #[test]
    fn keeps_going_when_the_uart_vanishes() {
        let mut m = FakeMachine { lsr: 0xff, ..FakeMachine::default() };
        let v = probe_main(&mut m, b"probe.test=ticker probe.n=2 probe.delay=0");
        assert_eq!(v, Verdict::Pass);
        assert_eq!(m.pauses, 0);
        assert!(m.output().ends_with("tick 2\nprobe: verdict pass (0)\n"));
    }
}
