//! `probe.test=idle`: prints `idle: halting` and halts the vCPU for good, so the VM stays up at no
//! CPU cost until the VMM is told to end it. For footprint and density measurements (memory and
//! idle CPU of a running VM), where the guest must neither exit nor work.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"idle", run };

fn run(con: &mut Console<'_>, _params: &Params<'_>) -> Verdict {
    con.str(b"idle: halting").nl();
    con.machine().halt_forever();
    // Only the test double gets here.
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use crate::machine::testing::FakeMachine;
    use crate::{probe_main, Verdict};

    #[test]
    fn prints_then_halts() {
        let mut m = FakeMachine::default();
        let v = probe_main(&mut m, b"probe.test=idle");
        assert_eq!(v, Verdict::Pass);
        assert!(m.halted);
        assert!(m.output().contains("idle: halting\n"), "{}", m.output());
    }
}
