//! `probe.test=blk-check probe.seed=S [probe.tries=N] [probe.delay=D]`: reads the whole disk
//! (64 KiB at a time, its capacity read again each time) and checks it holds the pattern of
//! seed S; if not (or if it is empty), waits (D reads of port 0x80) and reads it again, at most N
//! times in all. `probe.blk=I` picks the I-th disk. Used to see a disk's backing image
//! replaced under a running guest (`PATCH /drives/{id}` with a new `path_on_host`): the guest's
//! driver keeps going and finds the new medium. Prints
//! `blk-check: seed=S found after T tries` (pass) or `blk-check: seed=S not found in N tries`.

use super::blk_common::{self, arg};
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::pattern;
use crate::virtio::blk::{Blk, BlkError, ReqType, Request, S_OK};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"blk-check", run };

/// Bytes per read.
const CHUNK: usize = 64 << 10;
/// Default tries.
pub const DEFAULT_TRIES: u64 = 1000;
/// Default delay between tries (port reads, ~10 µs each under PVM).
pub const DEFAULT_DELAY: u64 = 10_000;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"seed", 1, 0, u64::MAX)?,
            arg(con, params, b"tries", DEFAULT_TRIES, 1, 1 << 32)?,
            arg(con, params, b"delay", DEFAULT_DELAY, 0, 1 << 40)?,
        ))
    })();
    let (seed, tries, delay) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let mut blk = match blk_common::open(con, params) {
        Ok(b) => b,
        Err(v) => return v,
    };
    let mut verdict = Verdict::Fail;
    for t in 1..=tries {
        match matches(con, &mut blk, seed) {
            Ok(true) => {
                con.str(b"blk-check: seed=").dec(seed).str(b" found after ").dec(t).str(b" tries").nl();
                verdict = Verdict::Pass;
                break;
            }
            Ok(false) => con.machine().in_loop(0x80, delay),
            Err(e) => {
                verdict = blk_common::fail(con, b"blk-check", e);
                break;
            }
        }
        if t == tries {
            con.str(b"blk-check: seed=").dec(seed).str(b" not found in ").dec(tries).str(b" tries").nl();
        }
    }
    blk.shutdown(con.machine());
    verdict
}

/// Whether every sector holds the pattern of `seed`.
fn matches(con: &mut Console<'_>, blk: &mut Blk, seed: u64) -> Result<bool, BlkError> {
    let sectors = (CHUNK / pattern::SECTOR) as u64;
    // The medium may have changed (an empty placeholder filled later): ask again every time.
    let chunks = blk.reread_capacity(con.machine())? / sectors;
    if chunks == 0 {
        return Ok(false);
    }
    blk.set_slots(4, CHUNK)?;
    let mut all = true;
    blk.run(
        con.machine(),
        chunks,
        |i, _| Request { ty: ReqType::In, sector: i * sectors, bytes: CHUNK },
        |i, buf, status| {
            if status != S_OK || pattern::check(buf, seed, i * sectors).bad_sectors != 0 {
                all = false;
            }
        },
    )?;
    Ok(all)
}
