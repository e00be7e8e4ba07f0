//! `probe.test=blk-verify [probe.seed=S] [probe.rounds=N] [probe.qd=Q]`: writes the pattern of
//! [`crate::pattern`] for seed S + round over the whole disk in 64 KiB requests, FLUSHes,
//! reads everything back and checks every byte; N rounds. See the README for the lines.

use super::blk_common::{self, arg};
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::pattern::{self, Mismatch};
use crate::virtio::blk::{Blk, BlkError, ReqType, Request, MAX_SLOTS, S_OK};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"blk-verify", run };

/// Sectors per request (64 KiB).
pub const CHUNK_SECTORS: u64 = 128;
/// Bytes per request.
pub const CHUNK_BYTES: usize = 128 * 512;

/// Bytes of `n` sectors (`n` ≤ [`CHUNK_SECTORS`]).
fn bytes_of(n: u64) -> usize {
    usize::try_from(n * 512).unwrap_or(CHUNK_BYTES)
}
/// Default queue depth.
pub const DEFAULT_QD: u64 = 16;
/// Mismatches printed in detail (per run).
pub const MAX_REPORTED: usize = 4;
/// Byte the read buffers are filled with before each read (so a read that transfers nothing
/// cannot pass).
pub const POISON: u8 = 0x5a;

#[derive(Default)]
struct Totals {
    written: u64,
    read: u64,
    mismatches: u64,
    ioerrs: u64,
    /// Longest wait for one completion over every phase of every round (TSC cycles).
    max_wait: u64,
    reported: [Option<Mismatch>; MAX_REPORTED],
    n_reported: usize,
}

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"seed", 1, 0, u64::MAX)?,
            arg(con, params, b"rounds", 1, 1, 1_000_000)?,
            arg(con, params, b"qd", DEFAULT_QD, 1, MAX_SLOTS as u64)?,
        ))
    })();
    let (seed, rounds, qd) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let mut blk = match blk_common::open(con, params) {
        Ok(b) => b,
        Err(v) => return v,
    };
    let verdict = verify(con, &mut blk, seed, rounds, qd);
    blk.shutdown(con.machine());
    verdict
}

fn verify(con: &mut Console<'_>, blk: &mut Blk, seed: u64, rounds: u64, qd: u64) -> Verdict {
    let cap = blk.info().capacity;
    if cap == 0 {
        con.str(b"blk-verify: empty disk").nl();
        return Verdict::Fail;
    }
    if let Err(e) = blk.set_slots(usize::try_from(qd).unwrap_or(1), CHUNK_BYTES) {
        blk_common::fail(con, b"blk-verify: probe.qd", e);
        return Verdict::BadArgs;
    }
    if !blk.info().flush() {
        con.str(b"blk-verify: device offers no FLUSH; writes are not flushed").nl();
    }
    let nreq = cap.div_ceil(CHUNK_SECTORS);
    let span = |i: u64| {
        let sector = i * CHUNK_SECTORS;
        (sector, CHUNK_SECTORS.min(cap - sector))
    };
    let mut t = Totals::default();
    let mut last_seed = seed;
    let mut failure = None;
    for round in 0..rounds {
        let s = seed.wrapping_add(round);
        last_seed = s;
        match one_round(con, blk, s, nreq, &span, &mut t) {
            Ok(r) => {
                con.str(b"blk-verify: round ")
                    .dec(round + 1)
                    .str(b"/")
                    .dec(rounds)
                    .str(b" seed=")
                    .dec(s)
                    .str(b" written=")
                    .dec(r.0)
                    .str(b" read=")
                    .dec(r.1)
                    .str(b" mismatches=")
                    .dec(r.2)
                    .str(b" ioerrs=")
                    .dec(r.3)
                    .str(b" cycles=")
                    .dec(r.4[0])
                    .str(b"+")
                    .dec(r.4[1])
                    .str(b"+")
                    .dec(r.4[2])
                    .nl();
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    for m in t.reported.iter().take(t.n_reported).flatten() {
        con.str(b"blk-verify: mismatch sector=")
            .dec(m.sector)
            .str(b" offset=")
            .dec(m.offset)
            .str(b" expected=")
            .hex(m.expected)
            .str(b" got=")
            .hex(m.got)
            .nl();
    }
    if let Some(e) = failure {
        if matches!(e, BlkError::NeedsReset { .. }) {
            con.str(b"blk: device needs reset").nl();
        }
        blk_common::fail(con, b"blk-verify: aborted", e);
    }
    let expected = cap.saturating_mul(rounds);
    con.str(b"blk-verify: sectors=")
        .dec(cap)
        .str(b" rounds=")
        .dec(rounds)
        .str(b" written=")
        .dec(t.written)
        .str(b" read=")
        .dec(t.read)
        .str(b" mismatches=")
        .dec(t.mismatches)
        .str(b" ioerrs=")
        .dec(t.ioerrs)
        .str(b" final_seed=")
        .dec(last_seed)
        .str(b" max_wait_cycles=")
        .dec(t.max_wait)
        .nl();
    let ok = failure.is_none() && t.mismatches == 0 && t.ioerrs == 0 && t.written == expected && t.read == expected;
    if ok {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

/// One write–flush–read–check pass; returns (written, read, mismatches, ioerrs, cycles of the
/// write, flush and read phases) of this round and adds them to `t`.
fn one_round(
    con: &mut Console<'_>,
    blk: &mut Blk,
    s: u64,
    nreq: u64,
    span: &dyn Fn(u64) -> (u64, u64),
    t: &mut Totals,
) -> Result<(u64, u64, u64, u64, [u64; 3]), BlkError> {
    let (mut written, mut read, mut bad, mut errs) = (0u64, 0u64, 0u64, 0u64);
    let m = con.machine();
    let w = blk.run(
        m,
        nreq,
        |i, buf| {
            let (sector, n) = span(i);
            let bytes = bytes_of(n);
            pattern::fill(buf.get_mut(..bytes).unwrap_or(&mut []), s, sector);
            Request { ty: ReqType::Out, sector, bytes }
        },
        |i, _buf, status| {
            if status == S_OK {
                written += span(i).1;
            }
        },
    )?;
    errs += w.errors;
    let (mut flush_cycles, mut flush_wait) = (0, 0);
    if blk.info().flush() {
        let f = blk.run(m, 1, |_, _| Request { ty: ReqType::Flush, sector: 0, bytes: 0 }, |_, _, _| {})?;
        errs += f.errors;
        flush_cycles = f.cycles;
        flush_wait = f.max_wait;
    }
    let r = blk.run(
        m,
        nreq,
        |i, buf| {
            let (sector, n) = span(i);
            let bytes = bytes_of(n);
            buf.fill(POISON);
            Request { ty: ReqType::In, sector, bytes }
        },
        |i, buf, status| {
            if status != S_OK {
                return;
            }
            let (sector, n) = span(i);
            read += n;
            let c = pattern::check(buf.get(..bytes_of(n)).unwrap_or(&[]), s, sector);
            bad += c.bad_sectors;
            if let Some(mm) = c.first {
                if let Some(slot) = t.reported.get_mut(t.n_reported) {
                    *slot = Some(mm);
                    t.n_reported += 1;
                }
            }
        },
    )?;
    errs += r.errors;
    t.written += written;
    t.read += read;
    t.mismatches += bad;
    t.ioerrs += errs;
    t.max_wait = t.max_wait.max(w.max_wait).max(flush_wait).max(r.max_wait);
    Ok((written, read, bad, errs, [w.cycles, flush_cycles, r.cycles]))
}
