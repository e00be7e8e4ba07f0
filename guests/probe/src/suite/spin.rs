//! `probe.test=spin [probe.rounds=N]`: prints `spin: spinning`, then keeps its vCPU busy without
//! a single exit (no `pause` either: hardware KVM may exit on pause loops), N rounds of 2^24
//! iterations of arithmetic (default: for ever), printing
//! `spin: round R` after each. A CPU-bound guest, for tests of CPU weights and limits: what it
//! gets is what its VM's cgroup gives it.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"spin", run };

/// Iterations per round.
const ROUND: u64 = 1 << 24;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let rounds = match params.num(b"rounds", u64::MAX, 1, u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    con.str(b"spin: spinning").nl();
    let mut x = 0u64;
    for r in 1..=rounds {
        for i in 0..ROUND {
            x = core::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
        }
        con.str(b"spin: round ").dec(r).nl();
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use crate::machine::testing::FakeMachine;
    use crate::{probe_main, Verdict};

    #[test]
    fn spins_the_rounds_asked_for() {
        let mut m = FakeMachine::default();
        let v = probe_main(&mut m, b"probe.test=spin probe.rounds=2");
        assert_eq!(v, Verdict::Pass);
        assert!(m.output().contains("spin: spinning\nspin: round 1\nspin: round 2\n"), "{}", m.output());
    }
}
