//! `probe.test=net-bench [probe.n=N] [probe.size=S] [probe.rx_n=R] [probe.peer=MAC]
//! [probe.timeout_ms=T] [probe.tsc_khz=K] [probe.tx_rounds=X]`: transmit (X times, one line
//! each: a rate limit changed between rounds shows), then receive, as fast as possible.
//!
//! **TX**: N test frames of S bytes (default 100000 × 1514) to `probe.peer` (default
//! broadcast), the TX ring kept full, one notify per batch; C = TSC cycles from the first
//! submission to the last completion. Each buffer is built in full once; afterwards only
//! the payload header (sequence number, checksum) is rewritten.
//!
//! **RX**: frames already waiting are discarded (`stale=`), then frames of our EtherType and
//! magic are counted until R (default N; 0 skips the phase) have arrived or none arrived for T
//! ms (default 2000). C = cycles from the first counted arrival to the last; rates use the
//! frames after the first. A host-side generator must send them (`tools/net_peer.py blast`).
//!
//! Lines: `net-bench: tx frames=N bytes=B cycles=C [fps=F mibps=M] kicks=K` and
//! `net-bench: rx frames=N bytes=B cycles=C [fps=F mibps=M] kicks=K stale=S other=X`
//! (bytes: Ethernet frame bytes without the virtio header; rates only with `probe.tsc_khz`,
//! integers, MiB = 2²⁰). Passes if all N frames were sent and R received.

use super::blk_common::{arg, per_second};
use super::net_common;
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::net::{Deadline, Net, NetError};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"net-bench", run };

/// Default frames per direction.
pub const DEFAULT_N: u64 = 100_000;
/// Default frame length.
pub const DEFAULT_SIZE: u64 = 1514;

/// The figures of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phase {
    /// Frames counted.
    pub frames: u64,
    /// Their Ethernet bytes.
    pub bytes: u64,
    /// TSC cycles (see the module docs).
    pub cycles: u64,
    /// Notifies sent during the phase.
    pub kicks: u64,
}

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        let n = arg(con, params, b"n", DEFAULT_N, 1, 1 << 32)?;
        Ok::<_, Verdict>((
            n,
            net_common::frame_size(con, params, DEFAULT_SIZE)?,
            arg(con, params, b"rx_n", n, 0, 1 << 40)?,
            net_common::peer(con, params)?,
            net_common::timing(con, params, net_common::DEFAULT_TIMEOUT_MS)?,
            arg(con, params, b"tx_rounds", 1, 1, 1000)?,
        ))
    })();
    let (n, size, rx_n, peer, (timeout, khz), rounds) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let (mut net, _) = match net_common::open(con, params) {
        Ok(x) => x,
        Err(v) => return v,
    };
    let mut verdict = Verdict::Pass;
    for _ in 0..rounds {
        match tx_phase(con, &mut net, n, size, peer, timeout) {
            Ok(p) => print(con, b"tx", &p, khz, None),
            Err((e, p)) => {
                print(con, b"tx", &p, khz, None);
                verdict = net_common::fail(con, b"net-bench: tx aborted", e);
                break;
            }
        }
    }
    if verdict == Verdict::Pass && rx_n != 0 {
        match rx_phase(con, &mut net, rx_n, timeout) {
            Ok((p, extra)) => {
                print(con, b"rx", &p, khz, Some(extra));
                if p.frames < rx_n {
                    con.str(b"net-bench: rx: only ")
                        .dec(p.frames)
                        .str(b" of ")
                        .dec(rx_n)
                        .str(b" frames arrived (is a generator sending frames of EtherType 0x88b5?)")
                        .nl();
                    verdict = Verdict::Fail;
                }
            }
            Err(e) => verdict = net_common::fail(con, b"net-bench: rx aborted", e),
        }
    }
    net.shutdown(con.machine());
    verdict
}

fn print(con: &mut Console<'_>, dir: &[u8], p: &Phase, khz: u64, extra: Option<(u64, u64)>) {
    con.str(b"net-bench: ")
        .str(dir)
        .str(b" frames=")
        .dec(p.frames)
        .str(b" bytes=")
        .dec(p.bytes)
        .str(b" cycles=")
        .dec(p.cycles);
    if khz != 0 {
        // RX rates count the frames after the first (the clock starts at the first arrival).
        let (frames, bytes) = match extra {
            Some(_) if p.frames > 1 => (p.frames - 1, p.bytes - p.bytes / p.frames),
            _ => (p.frames, p.bytes),
        };
        con.str(b" fps=")
            .dec(per_second(frames, khz, p.cycles))
            .str(b" mibps=")
            .dec(per_second(bytes, khz, p.cycles) >> 20);
    }
    con.str(b" kicks=").dec(p.kicks);
    if let Some((stale, other)) = extra {
        con.str(b" stale=").dec(stale).str(b" other=").dec(other);
    }
    con.nl();
}

fn tx_phase(
    con: &mut Console<'_>,
    net: &mut Net,
    n: u64,
    size: usize,
    peer: [u8; 6],
    timeout: u64,
) -> Result<Phase, (NetError, Phase)> {
    let m = con.machine();
    let mac = net.info().mac;
    let fill = net_common::fill_hash(size);
    let kicks0 = net.stats().tx_kicks;
    let done0 = net.stats().tx_done;
    let mut built = [false; crate::virtio::queue::MAX_QUEUE_SIZE as usize];
    let mut sent = 0u64;
    let mut p = Phase::default();
    let start = m.tsc();
    let mut idle = Deadline::new(m, timeout);
    let result = 'run: loop {
        let reclaimed = match net.tx().reclaim() {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        while sent < n {
            let Some(id) = net.tx().next_id() else { break };
            let fresh = built.get(usize::from(id)).is_some_and(|b| !b);
            let seq = u32::try_from(sent & 0xffff_ffff).unwrap_or(0);
            let queued = net.tx().queue(size, |f| {
                if fresh {
                    net_common::write_eth(f, peer, mac);
                    net_common::write_fill(f);
                }
                net_common::write_header(f, seq, Some(fill));
            });
            if let Err(e) = queued {
                break 'run Err(e);
            }
            if let Some(b) = built.get_mut(usize::from(id)) {
                *b = true;
            }
            sent += 1;
        }
        net.flush_tx(m);
        if net.stats().tx_done - done0 >= n {
            break Ok(());
        }
        if reclaimed != 0 {
            idle.restart(m);
        } else if idle.expired(m) {
            break Err(net.timeout(m));
        }
        m.pause();
    };
    p.cycles = m.tsc().wrapping_sub(start);
    p.frames = net.stats().tx_done - done0;
    p.bytes = p.frames.saturating_mul(size as u64);
    p.kicks = net.stats().tx_kicks - kicks0;
    result.map(|()| p).map_err(|e| (e, p))
}

fn rx_phase(con: &mut Console<'_>, net: &mut Net, rx_n: u64, timeout: u64) -> Result<(Phase, (u64, u64)), NetError> {
    let m = con.machine();
    let stale = net.poll_rx(m, usize::MAX, |_, _| {})? as u64;
    let kicks0 = net.stats().rx_kicks;
    let mut p = Phase::default();
    let mut other = 0u64;
    let mut first = 0u64;
    let mut last = 0u64;
    let mut idle = Deadline::new(m, timeout);
    while p.frames < rx_n {
        let room = usize::try_from(rx_n - p.frames).unwrap_or(usize::MAX);
        let before = p.frames;
        net.poll_rx(m, room, |frame, _| {
            if net_common::is_ours(frame) {
                p.frames += 1;
                p.bytes += frame.len() as u64;
            } else {
                other += 1;
            }
        })?;
        if p.frames != before {
            last = m.tsc();
            if before == 0 {
                first = last;
            }
            idle.restart(m);
        } else if idle.expired(m) {
            break;
        }
        m.pause();
    }
    p.cycles = last.wrapping_sub(first);
    p.kicks = net.stats().rx_kicks - kicks0;
    Ok((p, (stale, other)))
}
