//! What the `blk-*` tests share: finding the disk, setting up the driver, printing errors, and
//! turning TSC cycles into rates with integer arithmetic.

use crate::cmdline::Params;
use crate::console::Console;
use crate::virtio::blk::{Blk, BlkError};
use crate::virtio::{self, DEVICE_ID_BLOCK};
use crate::Verdict;

/// Default bound on every wait for a completion, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// TSC frequency assumed for the timeout when `probe.tsc_khz` is not given (a high guess, so
/// the real timeout is at least the nominal one on slower clocks).
pub const ASSUMED_TSC_KHZ: u64 = 4_000_000;
/// Largest `probe.tsc_khz` accepted (100 GHz).
pub const MAX_TSC_KHZ: u64 = 100_000_000;

/// Parses `probe.KEY`, printing the error and mapping it to [`Verdict::BadArgs`].
pub fn arg(
    con: &mut Console<'_>,
    params: &Params<'_>,
    key: &'static [u8],
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, Verdict> {
    params.num(key, default, min, max).map_err(|e| {
        e.print(con);
        Verdict::BadArgs
    })
}

/// `probe.tsc_khz` (0 = not given).
pub fn tsc_khz(con: &mut Console<'_>, params: &Params<'_>) -> Result<u64, Verdict> {
    arg(con, params, b"tsc_khz", 0, 0, MAX_TSC_KHZ)
}

/// Prints `<prefix>: <reason>` and returns [`Verdict::Fail`].
pub fn fail(con: &mut Console<'_>, prefix: &[u8], e: BlkError) -> Verdict {
    con.str(prefix).str(b": ");
    e.print(con);
    con.nl();
    Verdict::Fail
}

/// Finds the `probe.blk=N`-th (default 0) version 2 virtio-blk device, takes the DMA arena
/// and initialises the driver (wait bound: `probe.timeout_ms`, default 10000, at
/// `probe.tsc_khz` or [`ASSUMED_TSC_KHZ`]). Prints the device lines and
/// `blk: capacity=... ` on success, the reason otherwise.
pub fn open(con: &mut Console<'_>, params: &Params<'_>) -> Result<Blk, Verdict> {
    let khz = tsc_khz(con, params)?;
    let timeout_ms = arg(con, params, b"timeout_ms", DEFAULT_TIMEOUT_MS, 1, 3_600_000)?;
    let index = arg(con, params, b"blk", 0, 0, virtio::MAX_WINDOWS as u64)?;
    let Some(t) = virtio::find_device(con, params, DEVICE_ID_BLOCK, index) else {
        con.str(b"blk: no virtio-blk device #")
            .dec(index)
            .str(b" (needs a virtio_mmio.device= word for a version 2 block device)")
            .nl();
        return Err(Verdict::Fail);
    };
    let Some(dma) = con.machine().take_dma() else {
        return Err(fail(con, b"blk", BlkError::NoDma));
    };
    let khz = if khz == 0 { ASSUMED_TSC_KHZ } else { khz };
    let blk = Blk::init(con.machine(), t, dma, timeout_ms.saturating_mul(khz))
        .map_err(|e| fail(con, b"blk: set-up failed", e))?;
    let i = *blk.info();
    con.str(b"blk: capacity=")
        .dec(i.capacity)
        .str(b" sectors (")
        .dec(i.capacity >> 11)
        .str(b" MiB) blk_size=")
        .dec(u64::from(i.blk_size))
        .str(b" seg_max=")
        .dec(u64::from(i.seg_max))
        .str(b" ro=")
        .dec(u64::from(i.ro()))
        .str(b" flush=")
        .dec(u64::from(i.flush()))
        .str(b" queue=")
        .dec(u64::from(i.queue_size))
        .str(b" features=")
        .hex(i.features)
        .str(b" offered=")
        .hex(i.offered)
        .nl();
    Ok(blk)
}

/// `n * tsc_khz * 1000 / cycles` (per second) without overflow for any realistic input and
/// without 128-bit division; 0 if `cycles` is 0.
pub fn per_second(n: u64, tsc_khz: u64, cycles: u64) -> u64 {
    if cycles == 0 {
        return 0;
    }
    match n.checked_mul(tsc_khz) {
        Some(x) => match x.checked_mul(1000) {
            Some(y) => y / cycles,
            None => (x / cycles).saturating_mul(1000),
        },
        None => (n / cycles).saturating_mul(tsc_khz).saturating_mul(1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_exact_for_ordinary_figures() {
        // 1000 requests in 2.6e9 cycles at 2.6 GHz = 1 s.
        assert_eq!(per_second(1000, 2_600_000, 2_600_000_000), 1000);
        // 256 MiB in 0.5 s.
        assert_eq!(per_second(256 << 20, 2_000_000, 1_000_000_000) >> 20, 512);
        assert_eq!(per_second(5, 1, 0), 0);
        // Huge inputs degrade gracefully instead of overflowing.
        assert_eq!(per_second(u64::MAX / 2, 4_000_000, 4_000_000_000), u64::MAX / 2 / 4_000_000_000 * 4_000_000_000);
    }
}
