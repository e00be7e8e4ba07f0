//! `probe.test=blk-stall [probe.rounds=N] [probe.delay=D]`: what a driver's interrupt handler
//! meets while the device is busy in a slow disk call. N rounds (default 10) of: a FLUSH
//! submitted and kicked, D reads of port 0x80 (default 2000; the core answers those, ~10 µs each
//! under PVM) so that the device is inside its call, then a read of InterruptStatus and a write
//! of InterruptACK, each timed with the TSC, and then the wait for the flush. Prints per round
//! `blk-stall: round R/N flush_cycles=F isr_cycles=A ack_cycles=B pending=P status=S` (P: 1 if
//! the flush was still in flight after both accesses). Passes if every flush completed OK.

use super::blk_common::{self, arg};
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::blk::{ReqType, Request, S_OK};
use crate::virtio::reg;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"blk-stall", run };

/// Default rounds.
pub const DEFAULT_ROUNDS: u64 = 10;
/// Default delay after the kick, in reads of port 0x80.
pub const DEFAULT_DELAY: u64 = 2000;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"rounds", DEFAULT_ROUNDS, 1, 1 << 20)?,
            arg(con, params, b"delay", DEFAULT_DELAY, 0, 1 << 32)?,
        ))
    })();
    let (rounds, delay) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let mut blk = match blk_common::open(con, params) {
        Ok(b) => b,
        Err(v) => return v,
    };
    if !blk.info().flush() {
        con.str(b"blk-stall: the device offers no FLUSH").nl();
        blk.shutdown(con.machine());
        return Verdict::Fail;
    }
    if let Err(e) = blk.set_slots(1, 4096) {
        blk.shutdown(con.machine());
        return blk_common::fail(con, b"blk-stall", e);
    }
    let mut verdict = Verdict::Pass;
    for round in 1..=rounds {
        let flush = Request { ty: ReqType::Flush, sector: 0, bytes: 0 };
        if let Err(e) = blk.submit(0, flush) {
            verdict = blk_common::fail(con, b"blk-stall: submit", e);
            break;
        }
        let m = con.machine();
        let start = m.tsc();
        blk.kick(m);
        m.in_loop(0x80, delay);
        let t = *blk.transport();
        let t0 = m.tsc();
        let isr = t.read(m, reg::INTERRUPT_STATUS);
        let t1 = m.tsc();
        t.write(m, reg::INTERRUPT_ACK, isr);
        let t2 = m.tsc();
        let pending = match blk.poll() {
            Ok(None) => 1,
            Ok(Some(c)) => {
                report(con, round, rounds, m_cycles(start, t2), [t0, t1, t2], 0, c.status);
                if c.status != S_OK {
                    verdict = Verdict::Fail;
                }
                continue;
            }
            Err(e) => {
                verdict = blk_common::fail(con, b"blk-stall: poll", e);
                break;
            }
        };
        match blk.wait(con.machine()) {
            Ok(c) => {
                let end = con.machine().tsc();
                report(con, round, rounds, m_cycles(start, end), [t0, t1, t2], pending, c.status);
                if c.status != S_OK {
                    verdict = Verdict::Fail;
                }
            }
            Err(e) => {
                verdict = blk_common::fail(con, b"blk-stall: wait", e);
                break;
            }
        }
    }
    blk.shutdown(con.machine());
    verdict
}

fn m_cycles(from: u64, to: u64) -> u64 {
    to.wrapping_sub(from)
}

fn report(con: &mut Console<'_>, round: u64, rounds: u64, flush: u64, t: [u64; 3], pending: u64, status: u8) {
    con.str(b"blk-stall: round ")
        .dec(round)
        .str(b"/")
        .dec(rounds)
        .str(b" flush_cycles=")
        .dec(flush)
        .str(b" isr_cycles=")
        .dec(m_cycles(t[0], t[1]))
        .str(b" ack_cycles=")
        .dec(m_cycles(t[1], t[2]))
        .str(b" pending=")
        .dec(pending)
        .str(b" status=")
        .dec(u64::from(status))
        .nl();
}
