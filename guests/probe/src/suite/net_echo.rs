//! `probe.test=net-echo [probe.n=N] [probe.size=S] [probe.peer=MAC] [probe.max_loss=L]
//! [probe.window=W] [probe.timeout_ms=T] [probe.tsc_khz=K]`: sends N test frames (see
//! [`super::net_common`]; destination `probe.peer` or broadcast, source our MAC) and expects
//! each back from a reflector (a host-side one on the TAP, or a second probe running
//! `net-reflect`). At most W frames are outstanding (sent, not yet back). When nothing comes
//! back for T ms, the outstanding frames are written off and sending goes on; if nothing at
//! all came back since the previous such stall (or since the start), the test stops.
//!
//! Prints `net-echo: sent=S received=R lost=L corrupt=C dup=D ooo=O other=X cycles=C
//! [fps=F]` (received counts distinct intact sequence numbers; lost = S − R; ooo = intact
//! first arrivals with a lower sequence number than one seen before; other = frames that are
//! not ours) and passes only if all N were sent, L ≤ `probe.max_loss` (default 0) and C = 0.

use super::blk_common::{arg, per_second};
use super::net_common::{self, Parsed, SeqMap};
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::net::{Deadline, Net, NetError};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"net-echo", run };

/// Default frames.
pub const DEFAULT_N: u64 = 1000;
/// Most frames (the sequence bitmap lives in the spare DMA memory).
pub const MAX_N: u64 = 1 << 24;
/// Default frame length.
pub const DEFAULT_SIZE: u64 = 256;
/// Default window of outstanding frames.
pub const DEFAULT_WINDOW: u64 = 64;

/// The counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EchoCounts {
    /// Frames sent.
    pub sent: u64,
    /// Distinct intact sequence numbers received.
    pub received: u64,
    /// Ours with a bad length or checksum, or a sequence number never sent.
    pub corrupt: u64,
    /// Intact repeats of a sequence number already received.
    pub dup: u64,
    /// Intact first arrivals below the highest sequence number seen.
    pub ooo: u64,
    /// Frames that are not ours.
    pub other: u64,
    /// Stalls (no frame back within the timeout while frames were outstanding).
    pub stalls: u64,
}

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"n", DEFAULT_N, 1, MAX_N)?,
            net_common::frame_size(con, params, DEFAULT_SIZE)?,
            net_common::peer(con, params)?,
            arg(con, params, b"max_loss", 0, 0, MAX_N)?,
            arg(con, params, b"window", DEFAULT_WINDOW, 1, 256)?,
            net_common::timing(con, params, net_common::DEFAULT_TIMEOUT_MS)?,
        ))
    })();
    let (n, size, peer, max_loss, window, (timeout, khz)) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let (mut net, scratch) = match net_common::open(con, params) {
        Ok(x) => x,
        Err(v) => return v,
    };
    let Some(mut seen) = SeqMap::new(scratch, n) else {
        con.str(b"net-echo: no memory for the sequence bitmap").nl();
        net.shutdown(con.machine());
        return Verdict::Fail;
    };
    con.str(b"net-echo: n=").dec(n).str(b" size=").dec(size as u64).str(b" peer=");
    net_common::print_mac(con, &peer);
    con.str(b" window=").dec(window).nl();
    let window = usize::try_from(window).unwrap_or(1);
    let start = con.machine().tsc();
    let result = echo(con, &mut net, &mut seen, n, size, peer, window, timeout);
    let cycles = con.machine().tsc().wrapping_sub(start);
    let _ = net.drain_tx(con.machine(), timeout);
    net.shutdown(con.machine());
    let c = match result {
        Ok(c) => c,
        Err((e, c)) => {
            net_common::fail(con, b"net-echo: aborted", e);
            c
        }
    };
    let lost = c.sent.saturating_sub(c.received);
    con.str(b"net-echo: sent=")
        .dec(c.sent)
        .str(b" received=")
        .dec(c.received)
        .str(b" lost=")
        .dec(lost)
        .str(b" corrupt=")
        .dec(c.corrupt)
        .str(b" dup=")
        .dec(c.dup)
        .str(b" ooo=")
        .dec(c.ooo)
        .str(b" other=")
        .dec(c.other)
        .str(b" stalls=")
        .dec(c.stalls)
        .str(b" cycles=")
        .dec(cycles);
    if khz != 0 {
        con.str(b" fps=").dec(per_second(c.received, khz, cycles));
    }
    con.nl();
    if c.sent == n && lost <= max_loss && c.corrupt == 0 {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

/// The send/receive loop. Errors come with the counts so far.
#[allow(clippy::too_many_arguments)]
fn echo(
    con: &mut Console<'_>,
    net: &mut Net,
    seen: &mut SeqMap<'_>,
    n: u64,
    size: usize,
    peer: [u8; 6],
    window: usize,
    timeout: u64,
) -> Result<EchoCounts, (NetError, EchoCounts)> {
    let m = con.machine();
    let mac = net.info().mac;
    let fill = net_common::fill_hash(size);
    let mut c = EchoCounts::default();
    let mut outstanding = 0usize;
    let mut highest: Option<u32> = None;
    let mut back_since_stall = false;
    let mut idle = Deadline::new(m, timeout);
    loop {
        if let Err(e) = net.tx().reclaim() {
            return Err((e, c));
        }
        while c.sent < n && outstanding < window && net.tx().free() > 0 {
            let seq = u32::try_from(c.sent).unwrap_or(u32::MAX);
            let queued = net.tx().queue(size, |f| {
                net_common::write_eth(f, peer, mac);
                net_common::write_fill(f);
                net_common::write_header(f, seq, Some(fill));
            });
            if let Err(e) = queued {
                return Err((e, c));
            }
            c.sent += 1;
            outstanding += 1;
        }
        net.flush_tx(m);
        let mut back = 0usize;
        let got = net.poll_rx(m, usize::MAX, |frame, _| match net_common::parse(frame) {
            Parsed::Other => c.other += 1,
            Parsed::Corrupt(_) => {
                c.corrupt += 1;
                back += 1;
            }
            Parsed::Intact { seq, len } => {
                back += 1;
                if len + net_common::ETH_HDR != size || u64::from(seq) >= c.sent {
                    c.corrupt += 1;
                    return;
                }
                match seen.test_and_set(seq) {
                    Some(false) => {
                        c.received += 1;
                        match highest {
                            Some(h) if seq < h => c.ooo += 1,
                            _ => highest = Some(seq),
                        }
                    }
                    _ => c.dup += 1,
                }
            }
        });
        if let Err(e) = got {
            return Err((e, c));
        }
        if back != 0 {
            outstanding = outstanding.saturating_sub(back);
            back_since_stall = true;
            idle.restart(m);
        }
        if c.sent == n && c.received + c.corrupt >= n {
            return Ok(c);
        }
        if idle.expired(m) {
            if !back_since_stall || c.sent == n {
                return Ok(c);
            }
            c.stalls += 1;
            back_since_stall = false;
            outstanding = 0;
            idle.restart(m);
        }
        m.pause();
    }
}
