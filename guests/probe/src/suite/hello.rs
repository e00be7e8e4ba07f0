//! `probe.test=hello`: one line, pass.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"hello", run };

fn run(con: &mut Console<'_>, _params: &Params<'_>) -> Verdict {
    con.str(b"probe: hello from the probe guest").nl();
    Verdict::Pass
}
