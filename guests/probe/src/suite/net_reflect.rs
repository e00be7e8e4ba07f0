//! `probe.test=net-reflect [probe.n=N] [probe.timeout_ms=T] [probe.tsc_khz=K]`: the other end
//! of `net-echo`. Every frame of our EtherType and magic (checked or not, it is sent back as
//! is) goes back to its source: destination = its source, source = our MAC, the rest
//! unchanged. Frames are batched: one RX and one TX notify per batch, and no more frames are
//! taken from the RX ring than there are free TX descriptors. Stops after N frames
//! (default 1000) and passes; fails if no frame arrives for T ms (default 10000: the peer may
//! still be booting). Prints `net-reflect: reflected=R other=X dropped=D cycles=C` (dropped:
//! frames that found no free TX descriptor).

use super::blk_common::arg;
use super::net_common;
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::net::{Deadline, Net, NetError};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"net-reflect", run };

/// Default frames to reflect.
pub const DEFAULT_N: u64 = 1000;
/// Default idle bound, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    reflected: u64,
    other: u64,
    dropped: u64,
}

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"n", DEFAULT_N, 1, 1 << 40)?,
            net_common::timing(con, params, DEFAULT_TIMEOUT_MS)?,
        ))
    })();
    let (n, (timeout, _)) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let (mut net, _) = match net_common::open(con, params) {
        Ok(x) => x,
        Err(v) => return v,
    };
    let start = con.machine().tsc();
    let mut c = Counts::default();
    let result = reflect(con, &mut net, n, timeout, &mut c);
    let cycles = con.machine().tsc().wrapping_sub(start);
    let drained = net.drain_tx(con.machine(), timeout);
    net.shutdown(con.machine());
    con.str(b"net-reflect: reflected=")
        .dec(c.reflected)
        .str(b" other=")
        .dec(c.other)
        .str(b" dropped=")
        .dec(c.dropped)
        .str(b" cycles=")
        .dec(cycles)
        .nl();
    match result.and(drained) {
        Ok(()) if c.reflected >= n => Verdict::Pass,
        Ok(()) => {
            con.str(b"net-reflect: stopped: no frame within probe.timeout_ms").nl();
            Verdict::Fail
        }
        Err(e) => net_common::fail(con, b"net-reflect: aborted", e),
    }
}

fn reflect(con: &mut Console<'_>, net: &mut Net, n: u64, timeout: u64, c: &mut Counts) -> Result<(), NetError> {
    let m = con.machine();
    let mac = net.info().mac;
    let mut idle = Deadline::new(m, timeout);
    while c.reflected < n {
        net.tx().reclaim()?;
        // Take no more frames than there are TX descriptors to send them back in.
        let room = usize::try_from(n - c.reflected).unwrap_or(usize::MAX).min(net.tx().free());
        let before = c.reflected + c.dropped;
        net.poll_rx(m, room, |frame, tx| {
            if !net_common::is_ours(frame) || frame.len() > crate::virtio::net::MAX_FRAME {
                c.other += 1;
                return;
            }
            let dst = net_common::src_mac(frame);
            let queued = tx.queue(frame.len(), |out| {
                // Same length by construction; a zip cannot panic (no formatted panics here).
                for (o, &b) in out.iter_mut().zip(frame) {
                    *o = b;
                }
                net_common::write_eth(out, dst, mac);
            });
            match queued {
                Ok(()) => c.reflected += 1,
                Err(_) => c.dropped += 1,
            }
        })?;
        net.flush_tx(m);
        if c.reflected + c.dropped != before {
            idle.restart(m);
        } else if idle.expired(m) {
            return Ok(());
        }
        m.pause();
    }
    Ok(())
}
