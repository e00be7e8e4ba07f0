//! `probe.test=net-info [probe.net=I]`: finds the I-th virtio-net device, sets it up and
//! prints `net: mac=... link=... rxq=R txq=T features=0x.. offered=0x..` (see
//! [`super::net_common::open`]), then resets it. Passes if the device was found and set up.

use super::net_common;
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"net-info", run };

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    match net_common::open(con, params) {
        Ok((mut net, _)) => {
            net.shutdown(con.machine());
            Verdict::Pass
        }
        Err(v) => v,
    }
}
