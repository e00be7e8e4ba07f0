//! The probe guest binary: entry code for both boot protocols, the memory functions, the
//! panic handler, and the hand-off to [`probe::probe_main`].
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use core::panic::PanicInfo;

use probe::boot::{self, CMDLINE_MAX, IDENTITY_MAPPED};
use probe::machine::PortIo;
use probe::{Console, Uart, Verdict};

core::arch::global_asm!(include_str!("entry.s"));
core::arch::global_asm!(include_str!("mem.s"));
core::arch::global_asm!(
    ".section .dma, \"aw\", @nobits",
    ".balign 4096",
    ".global probe_dma_arena",
    "probe_dma_arena:",
    ".zero {size}",
    size = const probe::DMA_ARENA_BYTES,
);

extern "C" {
    /// The DMA arena (section `.dma`, page-aligned, identity-mapped like the whole image).
    static mut probe_dma_arena: [u8; probe::DMA_ARENA_BYTES];
}

/// Called by `_start64` (Linux 64-bit boot protocol) with `rsi` = the zero page.
#[no_mangle]
pub extern "C" fn probe_boot64(boot_params: u64) -> ! {
    // SAFETY: both boot protocols identity-map (at least) the first 1 GiB of guest memory.
    let addr = unsafe { boot::linux64_cmdline_addr(boot_params, IDENTITY_MAPPED) };
    run(addr, probe::Entry::Linux64)
}

/// Called by `_start_pvh` (PVH entry) with `ebx` = `hvm_start_info`.
#[no_mangle]
pub extern "C" fn probe_boot_pvh(start_info: u64) -> ! {
    // SAFETY: `_start_pvh` identity-mapped the first 1 GiB.
    let addr = unsafe { boot::pvh_cmdline_addr(start_info, IDENTITY_MAPPED) };
    run(addr, probe::Entry::Pvh)
}

fn run(cmdline_addr: u64, entry: probe::Entry) -> ! {
    let mut buf = [0u8; CMDLINE_MAX];
    // SAFETY: the first 1 GiB is identity-mapped; the copy never reads at or beyond it.
    let cmdline = unsafe { boot::copy_cmdline(cmdline_addr, IDENTITY_MAPPED, &mut buf) };
    // SAFETY: `run` is called once, so this is the only reference to the arena.
    let dma: &'static mut [u8] = unsafe { &mut *core::ptr::addr_of_mut!(probe_dma_arena) };
    // SAFETY: we are the guest kernel in ring 0 on our only vCPU, identity-mapped; this is the
    // only handle that maps MMIO, and devices only DMA into `dma`, which nothing else uses.
    let mut hw = unsafe { PortIo::with_dma(dma) };
    let verdict = probe::probe_run(&mut hw, cmdline, Some(entry));
    probe::finish(&mut hw, verdict)
}

#[panic_handler]
fn panic(_info: &PanicInfo<'_>) -> ! {
    // SAFETY: as in `run`; this handle only does port I/O (no MMIO mapping, no DMA).
    let mut hw = unsafe { PortIo::new() };
    let mut con = Console::new(&mut hw, Uart::COM1);
    con.str(b"\nprobe: panic\nprobe: verdict fail (1)\n");
    probe::finish(&mut hw, Verdict::Fail)
}

/// Referenced by the precompiled `core` (built with unwinding); never called: the probe is
/// built with `panic = "abort"`.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
