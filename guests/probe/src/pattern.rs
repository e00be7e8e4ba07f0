//! The data pattern `blk-verify` writes and checks, shared with the host-side checker.
//!
//! The disk is seen as 512-byte sectors of 64 little-endian u64 words. Word `w` (byte offset
//! `o = 8 * w`) of sector `s` for seed `seed` is
//! `splitmix64(seed ^ (s << 16) ^ w)` (all arithmetic wrapping, `<<` on u64).

/// Bytes per sector (virtio-blk addresses 512-byte sectors whatever the block size).
pub const SECTOR: usize = 512;
/// u64 words per sector.
pub const WORDS_PER_SECTOR: u64 = (SECTOR / 8) as u64;

/// The splitmix64 finaliser (Steele, Lea, Flood 2014): adds the golden-ratio increment, then
/// mixes. Integer only.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `w` (0..64) of sector `sector` for `seed`.
pub fn word(seed: u64, sector: u64, w: u64) -> u64 {
    splitmix64(seed ^ (sector << 16) ^ w)
}

/// Fills `buf` (whole sectors; a trailing partial sector is filled as far as it goes) with the
/// pattern of the sectors starting at `first_sector`.
pub fn fill(buf: &mut [u8], seed: u64, first_sector: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let i = i as u64;
        let v = word(seed, first_sector.wrapping_add(i / WORDS_PER_SECTOR), i % WORDS_PER_SECTOR);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// The first difference found by [`check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Sector number.
    pub sector: u64,
    /// Byte offset of the 8-byte word in the sector.
    pub offset: u64,
    /// The pattern word.
    pub expected: u64,
    /// What the buffer held (little-endian u64).
    pub got: u64,
}

/// Result of [`check`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Sectors with at least one differing byte.
    pub bad_sectors: u64,
    /// The first differing word.
    pub first: Option<Mismatch>,
}

/// Compares `buf` (whole sectors) with the pattern of the sectors from `first_sector`.
pub fn check(buf: &[u8], seed: u64, first_sector: u64) -> CheckResult {
    let mut r = CheckResult::default();
    for (si, sector_bytes) in buf.chunks(SECTOR).enumerate() {
        let sector = first_sector.wrapping_add(si as u64);
        let mut bad = false;
        for (w, chunk) in sector_bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let got = u64::from_le_bytes(b);
            let expected = word(seed, sector, w as u64);
            if got != expected {
                bad = true;
                if r.first.is_none() {
                    r.first = Some(Mismatch { sector, offset: 8 * w as u64, expected, got });
                }
                break;
            }
        }
        if bad {
            r.bad_sectors += 1;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference: the splitmix64 generator seeded with 0 yields these first outputs
        // (state advances by the golden-ratio increment, which `splitmix64(k * gamma)` does).
        let gamma = 0x9e37_79b9_7f4a_7c15u64;
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(gamma), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(splitmix64(gamma.wrapping_mul(2)), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn fill_then_check_is_clean_and_detects_a_flip() {
        let mut buf = vec![0u8; 3 * SECTOR];
        fill(&mut buf, 7, 100);
        assert_eq!(u64::from_le_bytes(buf[SECTOR + 16..SECTOR + 24].try_into().expect("8")), word(7, 101, 2));
        assert_eq!(word(7, 101, 2), splitmix64(7 ^ (101 << 16) ^ 2));
        assert_eq!(check(&buf, 7, 100), CheckResult::default());
        assert_eq!(check(&buf, 8, 100).bad_sectors, 3);
        buf[2 * SECTOR + 9] ^= 0x40;
        let r = check(&buf, 7, 100);
        assert_eq!(r.bad_sectors, 1);
        let m = r.first.expect("mismatch");
        assert_eq!((m.sector, m.offset), (102, 8));
        assert_eq!(m.expected, word(7, 102, 1));
        assert_eq!(m.got, m.expected ^ (0x40 << 8));
    }
}
