//! `probe.test=blk-ro`: on a read-only disk, writing sector 0 must fail with IOERR (status 1)
//! and reading it must succeed. Prints
//! `blk-ro: ro=R write_status=W read_status=S`.

use super::blk_common;
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::pattern;
use crate::virtio::blk::{Blk, BlkError, ReqType, Request, S_IOERR, S_OK, S_UNWRITTEN};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"blk-ro", run };

/// Seed of the sector the test tries to write.
pub const WRITE_SEED: u64 = 0xdead_beef;

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let mut blk = match blk_common::open(con, params) {
        Ok(b) => b,
        Err(v) => return v,
    };
    let verdict = match check(con, &mut blk) {
        Ok((w, r)) => {
            con.str(b"blk-ro: ro=")
                .dec(u64::from(blk.info().ro()))
                .str(b" write_status=")
                .dec(u64::from(w))
                .str(b" read_status=")
                .dec(u64::from(r))
                .str(b" (want 1 and 0)")
                .nl();
            if w == S_IOERR && r == S_OK {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        }
        Err(e) => blk_common::fail(con, b"blk-ro", e),
    };
    blk.shutdown(con.machine());
    verdict
}

/// One single-sector write, then one read, of sector 0: their status bytes.
fn check(con: &mut Console<'_>, blk: &mut Blk) -> Result<(u8, u8), BlkError> {
    if blk.info().capacity == 0 {
        return Err(BlkError::BadRequest);
    }
    blk.set_slots(1, 512)?;
    let m = con.machine();
    let mut one = |blk: &mut Blk, ty: ReqType| -> Result<u8, BlkError> {
        let mut st = S_UNWRITTEN;
        blk.run(
            m,
            1,
            |_, buf| {
                if ty == ReqType::Out {
                    pattern::fill(buf, WRITE_SEED, 0);
                }
                Request { ty, sector: 0, bytes: 512 }
            },
            |_, _, s| st = s,
        )?;
        Ok(st)
    };
    let w = one(blk, ReqType::Out)?;
    let r = one(blk, ReqType::In)?;
    Ok((w, r))
}
