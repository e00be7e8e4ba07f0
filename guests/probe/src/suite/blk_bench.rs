//! `probe.test=blk-bench [probe.qd=Q] [probe.count=N] [probe.tsc_khz=K]`: N requests each of
//! 4 KiB random reads, 128 KiB sequential reads and 128 KiB sequential writes at queue depth
//! Q. One line per workload:
//! `blk-bench: <name> reqs=N bytes=B cycles=C [iops=I mibps=M] ioerrs=E kicks=K`.
//! Destroys the disk's contents (the writes).

use super::blk_common::{self, arg};
use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::pattern::splitmix64;
use crate::virtio::blk::{Blk, ReqType, Request, MAX_SLOTS};
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"blk-bench", run };

/// Default queue depth.
pub const DEFAULT_QD: u64 = 32;
/// Default requests per workload.
pub const DEFAULT_COUNT: u64 = 2048;
/// Seed of the random-read offsets: request `i` reads 4 KiB block
/// `splitmix64(RAND_SEED + i) % (capacity / 8)`.
pub const RAND_SEED: u64 = 0x6b6c_6b68_6561_6421;

/// One workload.
struct Workload {
    name: &'static [u8],
    bytes: usize,
    ty: ReqType,
    random: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: b"randread-4k", bytes: 4096, ty: ReqType::In, random: true },
    Workload { name: b"seqread-128k", bytes: 128 << 10, ty: ReqType::In, random: false },
    Workload { name: b"seqwrite-128k", bytes: 128 << 10, ty: ReqType::Out, random: false },
];

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let args = (|| {
        Ok::<_, Verdict>((
            arg(con, params, b"qd", DEFAULT_QD, 1, MAX_SLOTS as u64)?,
            arg(con, params, b"count", DEFAULT_COUNT, 1, 1 << 32)?,
            blk_common::tsc_khz(con, params)?,
        ))
    })();
    let (qd, count, khz) = match args {
        Ok(a) => a,
        Err(v) => return v,
    };
    let mut blk = match blk_common::open(con, params) {
        Ok(b) => b,
        Err(v) => return v,
    };
    let verdict = bench(con, &mut blk, usize::try_from(qd).unwrap_or(1), count, khz);
    blk.shutdown(con.machine());
    verdict
}

fn bench(con: &mut Console<'_>, blk: &mut Blk, qd: usize, count: u64, khz: u64) -> Verdict {
    let cap = blk.info().capacity;
    let mut verdict = Verdict::Pass;
    for w in &WORKLOADS {
        let sectors = (w.bytes / 512) as u64;
        let units = cap / sectors;
        if units == 0 {
            con.str(b"blk-bench: ").str(w.name).str(b": disk smaller than one request").nl();
            return Verdict::Fail;
        }
        if let Err(e) = blk.set_slots(qd, w.bytes) {
            blk_common::fail(con, b"blk-bench: probe.qd", e);
            return Verdict::BadArgs;
        }
        let stats = blk.run(
            con.machine(),
            count,
            |i, _buf| {
                let unit = if w.random { splitmix64(RAND_SEED.wrapping_add(i)) % units } else { i % units };
                Request { ty: w.ty, sector: unit * sectors, bytes: w.bytes }
            },
            |_, _, _| {},
        );
        let stats = match stats {
            Ok(s) => s,
            Err(e) => {
                con.str(b"blk-bench: ").str(w.name);
                return blk_common::fail(con, b"", e);
            }
        };
        let bytes = stats.completed.saturating_mul(w.bytes as u64);
        con.str(b"blk-bench: ")
            .str(w.name)
            .str(b" reqs=")
            .dec(stats.completed)
            .str(b" bytes=")
            .dec(bytes)
            .str(b" cycles=")
            .dec(stats.cycles);
        if khz != 0 {
            con.str(b" iops=")
                .dec(blk_common::per_second(stats.completed, khz, stats.cycles))
                .str(b" mibps=")
                .dec(blk_common::per_second(bytes, khz, stats.cycles) >> 20);
        }
        con.str(b" ioerrs=").dec(stats.errors).str(b" kicks=").dec(stats.kicks).nl();
        if stats.errors != 0 {
            verdict = Verdict::Fail;
        }
    }
    verdict
}
