//! Finding the command line from either boot protocol, treating guest memory as hostile:
//! every address is range-checked against the identity-mapped window and every loop bounded.

/// Physical memory the probe may touch: both boot paths identity-map at least the first 1 GiB.
pub const IDENTITY_MAPPED: u64 = 1 << 30;
/// Longest command line copied (bytes); the rest is ignored.
pub const CMDLINE_MAX: usize = 4096;

/// Linux boot protocol: offset of `cmd_line_ptr` (u32) in `boot_params`.
pub const BP_CMD_LINE_PTR: u64 = 0x228;
/// Linux boot protocol: offset of `ext_cmd_line_ptr` (u32, high half) in `boot_params`.
pub const BP_EXT_CMD_LINE_PTR: u64 = 0x0c8;
/// Size of the `boot_params` zero page.
pub const BOOT_PARAMS_SIZE: u64 = 4096;

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Offset of `hvm_start_info.cmdline_paddr` (u64).
pub const PVH_CMDLINE_PADDR: u64 = 24;
/// Bytes of `hvm_start_info` the probe reads.
pub const PVH_START_INFO_READ: u64 = 32;

/// Whether `[addr, addr + len)` is non-null and inside `limit`.
fn in_window(addr: u64, len: u64, limit: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= limit)
}

/// Reads a little-endian u32 byte by byte (no alignment assumption).
///
/// # Safety
/// `addr..addr + 4` must be readable.
unsafe fn read_u32(addr: u64) -> u32 {
    let mut v = 0u32;
    for i in 0..4u64 {
        // SAFETY: the caller guarantees the 4 bytes from `addr` are readable.
        let b = unsafe { core::ptr::read_volatile((addr + i) as *const u8) };
        v |= u32::from(b) << (8 * i);
    }
    v
}

/// The command-line address from a Linux `boot_params` zero page at `boot_params`
/// (`cmd_line_ptr | ext_cmd_line_ptr << 32`), or 0 if the zero page is outside `limit`.
///
/// # Safety
/// Every address below `limit` must be readable memory.
pub unsafe fn linux64_cmdline_addr(boot_params: u64, limit: u64) -> u64 {
    if !in_window(boot_params, BOOT_PARAMS_SIZE, limit) {
        return 0;
    }
    // SAFETY: the zero page lies inside `limit`, readable per the caller's contract.
    let (lo, hi) = unsafe { (read_u32(boot_params + BP_CMD_LINE_PTR), read_u32(boot_params + BP_EXT_CMD_LINE_PTR)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The command-line address from a PVH `hvm_start_info` at `start_info`, or 0 if the structure
/// is outside `limit` or its magic is wrong.
///
/// # Safety
/// Every address below `limit` must be readable memory.
pub unsafe fn pvh_cmdline_addr(start_info: u64, limit: u64) -> u64 {
    if !in_window(start_info, PVH_START_INFO_READ, limit) {
        return 0;
    }
    // SAFETY: the structure lies inside `limit`, readable per the caller's contract.
    unsafe {
        if read_u32(start_info) != PVH_MAGIC {
            return 0;
        }
        let lo = read_u32(start_info + PVH_CMDLINE_PADDR);
        let hi = read_u32(start_info + PVH_CMDLINE_PADDR + 4);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

/// Copies the NUL-terminated command line at `addr` into `buf` (at most `buf.len()` bytes,
/// never reading at or beyond `limit`) and returns the copied bytes, without the NUL.
/// An address of 0 or outside `limit` gives an empty command line.
///
/// # Safety
/// Every address below `limit` must be readable memory.
pub unsafe fn copy_cmdline(addr: u64, limit: u64, buf: &mut [u8]) -> &[u8] {
    if !in_window(addr, 1, limit) {
        return &[];
    }
    let mut len = 0;
    for slot in buf.iter_mut() {
        let a = addr + len as u64;
        if a >= limit {
            break;
        }
        // SAFETY: `a < limit`, readable per the caller's contract.
        let b = unsafe { core::ptr::read_volatile(a as *const u8) };
        if b == 0 {
            break;
        }
        *slot = b;
        len += 1;
    }
    buf.get(..len).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_of(b: &[u8]) -> u64 {
        b.as_ptr() as u64
    }

    #[test]
    fn linux64_reads_both_halves() {
        let mut zero_page = vec![0u8; 4096];
        zero_page[0x228..0x22c].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        zero_page[0xc8..0xcc].copy_from_slice(&1u32.to_le_bytes());
        // SAFETY: the whole zero page is a live allocation; `limit` is its end.
        let a = unsafe { linux64_cmdline_addr(addr_of(&zero_page), addr_of(&zero_page) + 4096) };
        assert_eq!(a, 0x1_0002_0000);
        let base = addr_of(&zero_page);
        // SAFETY: an out-of-window pointer is rejected before any read.
        let short = unsafe { linux64_cmdline_addr(base, base + 100) };
        assert_eq!(short, 0);
        // SAFETY: a null pointer is rejected before any read.
        assert_eq!(unsafe { linux64_cmdline_addr(0, u64::MAX) }, 0);
    }

    #[test]
    fn pvh_checks_magic() {
        let mut info = [0u8; 32];
        info[..4].copy_from_slice(&PVH_MAGIC.to_le_bytes());
        info[24..32].copy_from_slice(&0x1234_5678u64.to_le_bytes());
        let base = addr_of(&info);
        // SAFETY: `info` is live; `limit` is its end.
        assert_eq!(unsafe { pvh_cmdline_addr(base, base + 32) }, 0x1234_5678);
        info[0] ^= 1;
        let base = addr_of(&info);
        // SAFETY: as above.
        assert_eq!(unsafe { pvh_cmdline_addr(base, base + 32) }, 0);
    }

    #[test]
    fn copy_stops_at_nul_buffer_end_and_limit() {
        let src = b"probe.test=hello\0garbage";
        let base = addr_of(src);
        let end = base + src.len() as u64;
        let mut buf = [0u8; 64];
        // SAFETY: reads stay within `src` (limit = its end).
        let whole = unsafe { copy_cmdline(base, end, &mut buf) };
        assert_eq!(whole, b"probe.test=hello");
        let mut small = [0u8; 5];
        // SAFETY: as above.
        assert_eq!(unsafe { copy_cmdline(base, end, &mut small) }, b"probe");
        // SAFETY: as above; the limit cuts the read after 3 bytes.
        assert_eq!(unsafe { copy_cmdline(base, base + 3, &mut buf) }, b"pro");
        // SAFETY: null is rejected before any read.
        assert_eq!(unsafe { copy_cmdline(0, u64::MAX, &mut buf) }, b"");
    }
}
