//! The guest's view of the machine: port I/O, MMIO, DMA memory, the TSC and `pause`.
//!
//! The tests only talk to the machine through [`Machine`], so the probe never executes a
//! privileged instruction in its work loops, and host unit tests run it against a fake.
//! The only privileged instructions the probe may run are `lgdt`, `ltr`, `mov cr3` and `iretq`,
//! once, in [`Machine::map_mmio`] the first time a test needs MMIO: it maps 4 GiB and continues
//! in ring 3 (see `enter_ring3` for why).

use core::cell::UnsafeCell;

/// Highest address (exclusive) [`Machine::map_mmio`] can make accessible: 4 GiB.
pub const MMIO_LIMIT: u64 = 1 << 32;
/// The first GiB: identity-mapped by both boot paths, never handed out as MMIO.
pub const LOW_MAPPED: u64 = 1 << 30;

/// Port I/O, time stamp counter and spin hint: all the probe needs from the hardware.
pub trait Machine {
    /// `in al, dx`.
    fn inb(&mut self, port: u16) -> u8;
    /// `out dx, al`.
    fn outb(&mut self, port: u16, value: u8);
    /// Reads the time stamp counter (ordered after earlier loads).
    fn tsc(&mut self) -> u64;
    /// Spin-loop hint (`pause`).
    fn pause(&mut self);
    /// `rep outsb`: all of `bytes` to `port` in one string instruction (one exit that carries
    /// them all, which a VMM must cope with). By default one `out` per byte.
    fn out_string(&mut self, port: u16, bytes: &[u8]) {
        for &b in bytes {
            self.outb(port, b);
        }
    }
    /// `count` back-to-back `in al, dx` from `port`, as tight as possible (one exit each).
    fn in_loop(&mut self, port: u16, count: u64) {
        for _ in 0..count {
            self.inb(port);
        }
    }
    /// One 32-bit MMIO read at `addr` (a single `mov`; one exit). `addr` must have been
    /// accepted by [`Machine::map_mmio`].
    fn mmio_read32(&mut self, addr: u64) -> u32;
    /// One 8-bit MMIO read at `addr` (virtio config fields of one byte must be read so).
    fn mmio_read8(&mut self, addr: u64) -> u8;
    /// One 16-bit MMIO read at `addr` (2-byte aligned; virtio config fields of two bytes).
    fn mmio_read16(&mut self, addr: u64) -> u16;
    /// One 32-bit MMIO write at `addr` (a single `mov`; one exit). Ordered after every
    /// earlier memory write of the probe (a compiler barrier; x86 keeps stores in order).
    fn mmio_write32(&mut self, addr: u64, value: u32);
    /// Makes `[addr, addr + len)` accessible for [`Machine::mmio_read32`]/`mmio_write32`.
    /// On the real machine the first call also switches the probe to ring 3 (IOPL 3) for good.
    /// Returns false for a range the probe will not touch (inside the first GiB, at or above
    /// 4 GiB, empty, or not 4-byte aligned).
    fn map_mmio(&mut self, addr: u64, len: u64) -> bool;
    /// The DMA arena: page-aligned memory whose addresses (as pointers) are the guest-physical
    /// addresses devices use. Handed out once; `None` afterwards or if there is none.
    fn take_dma(&mut self) -> Option<&'static mut [u8]>;
    /// Stops the vCPU for good (`cli; hlt`: with interrupts off it never wakes), so the VM idles
    /// at no CPU cost until the VMM ends it. Returns only on a machine that cannot halt (the
    /// test double).
    fn halt_forever(&mut self);
}

/// Whether `[addr, addr + len)` is a range [`Machine::map_mmio`] accepts.
pub fn mmio_range_ok(addr: u64, len: u64) -> bool {
    len != 0
        && addr.is_multiple_of(4)
        && addr >= LOW_MAPPED
        && addr.checked_add(len).is_some_and(|end| end <= MMIO_LIMIT)
}

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_LARGE: u64 = 1 << 7;
/// GiBs mapped by [`IdentityMap`].
const MAPPED_GIB: usize = 4;

/// Page tables identity-mapping the first 4 GiB with 2 MiB pages (the top GiB, where MMIO
/// windows live, uncached): PML4, PDPT and one page directory per GiB.
#[repr(C, align(4096))]
struct IdentityMap {
    pml4: [u64; 512],
    pdpt: [u64; 512],
    pd: [[u64; 512]; MAPPED_GIB],
}

/// The tables, in `.bss` (physical = virtual: the probe is linked and run identity-mapped).
struct IdentityMapCell(UnsafeCell<IdentityMap>);

// SAFETY: only `PortIo::map_mmio` touches the tables, once, on the probe's single vCPU.
unsafe impl Sync for IdentityMapCell {}

static IDENTITY_MAP: IdentityMapCell =
    IdentityMapCell(UnsafeCell::new(IdentityMap { pml4: [0; 512], pdpt: [0; 512], pd: [[0; 512]; MAPPED_GIB] }));

/// Bytes of an I/O permission bitmap covering all 65,536 ports (a bit each).
const IO_BITMAP_BYTES: usize = 8192;
/// Where the bitmap starts in [`Tss64`]: right after the 104-byte architectural part.
const IO_BITMAP_OFFSET: u16 = 104;

/// A 64-bit TSS whose I/O permission bitmap allows every port: all bits clear, then the 0xff
/// byte the CPU may read past the last port (Intel SDM vol. 1, 19.5.2). Never written by the CPU
/// in long mode (no task switches), so it can be immutable.
#[repr(C, packed)]
struct Tss64 {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    io_bitmap: [u8; IO_BITMAP_BYTES + 1],
}

const fn open_io_bitmap() -> [u8; IO_BITMAP_BYTES + 1] {
    let mut b = [0u8; IO_BITMAP_BYTES + 1];
    b[IO_BITMAP_BYTES] = 0xff;
    b
}

const _: () = assert!(core::mem::offset_of!(Tss64, io_bitmap) == IO_BITMAP_OFFSET as usize);

static RING3_TSS: Tss64 = Tss64 {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: IO_BITMAP_OFFSET,
    io_bitmap: open_io_bitmap(),
};

/// Number of 8-byte GDT slots: null, four code/data descriptors, and the TSS's 16-byte one.
const RING3_GDT_SLOTS: usize = 7;
/// The TSS selector (slots 5 and 6).
const RING3_TSS_SELECTOR: u16 = 0x28;

/// GDT for ring 3: null, kernel code64 (0x08), kernel data (0x10), user data (0x18, RPL 3:
/// 0x1b), user code64 (0x20, RPL 3: 0x23), the TSS (0x28). Filled in by [`enter_ring3`] (the
/// TSS descriptor holds the TSS's address) and written by the CPU (`ltr` marks it busy).
struct GdtCell(UnsafeCell<[u64; RING3_GDT_SLOTS]>);

// SAFETY: only `enter_ring3` touches it, once, on the probe's single vCPU.
unsafe impl Sync for GdtCell {}

static RING3_GDT: GdtCell = GdtCell(UnsafeCell::new([0; RING3_GDT_SLOTS]));

/// The ring-3 GDT's contents with the TSS at `tss` (physical = virtual).
fn ring3_gdt(tss: u64) -> [u64; RING3_GDT_SLOTS] {
    let limit = (core::mem::size_of::<Tss64>() - 1) as u64;
    // Available 64-bit TSS (type 9), present, DPL 0, byte granularity.
    let low = (limit & 0xffff)
        | ((tss & 0x00ff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((tss >> 24) & 0xff) << 56);
    [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0x00cf_f200_0000_ffff, 0x00af_fa00_0000_ffff, low, tss >> 32]
}

/// The operand of `lgdt`.
#[repr(C, packed)]
struct Gdtr {
    limit: u16,
    base: u64,
}

/// Loads [`RING3_GDT`], a TSS whose I/O bitmap allows every port, and `cr3`, and continues in
/// ring 3 with IOPL 3 (port I/O still allowed, interrupts off) on the same stack: `lgdt`, `ltr`,
/// `mov cr3`, `iretq`, four privileged instructions, once.
///
/// Both IOPL 3 and the bitmap: a CPU honours IOPL 3 alone, but PVM (which runs guest ring 3 in
/// host user mode) checks a ring-3 `in`/`out` against the TSS's I/O bitmap. Without a TSS of
/// our own, the probe depended on the one the VMM left in TR: the 64-bit boot protocol's 4 GiB
/// TSS at address 0 happened to read as "allowed" from zeroed low memory; PVH's 104-byte TSS
/// has no bitmap, so the first port access faulted and the guest triple-faulted.
///
/// Why: under PVM only guest user-mode code runs natively; guest kernel-mode code is emulated
/// instruction by instruction (measured here: a `dec; jnz` loop costs ~1,700 cycles per
/// iteration in ring 0 and ~1 in ring 3), which made filling and checking a disk's worth of
/// data impossible. Port I/O from ring 3 costs more per exit than from ring 0 under PVM, so
/// only tests that need MMIO (the virtio drivers) switch; `pio-loop` stays in ring 0.
///
/// # Safety
/// `cr3` must identity-map, user-accessible, everything the probe touches; no exception or
/// interrupt may be taken afterwards (there is no TSS or IDT for ring 3 → ring 0 transitions).
unsafe fn enter_ring3(cr3: u64) {
    let gdt = RING3_GDT.0.get();
    // SAFETY: called once on the only vCPU: nothing else references the GDT.
    unsafe { *gdt = ring3_gdt(core::ptr::addr_of!(RING3_TSS) as u64) };
    let gdtr = Gdtr {
        limit: u16::try_from(RING3_GDT_SLOTS * 8 - 1).unwrap_or(0),
        base: gdt as u64,
    };
    // SAFETY: the caller's contract for CR3; the GDT is static and valid, its slot 5 an
    // available TSS descriptor for a static TSS (`ltr` marks it busy); `iretq` returns to label 2
    // with the stack pointer it had before the pushes, CS 0x23, SS 0x1b, RFLAGS IOPL 3 and IF 0.
    unsafe {
        core::arch::asm!(
            "lgdt [{gdtr}]",
            "ltr {tss:x}",
            "mov cr3, {cr3}",
            "mov {tmp}, rsp",
            "push 0x1b",
            "push {tmp}",
            "push 0x3002",
            "push 0x23",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            gdtr = in(reg) &gdtr,
            tss = in(reg) RING3_TSS_SELECTOR,
            cr3 = in(reg) cr3,
            tmp = out(reg) _,
        );
    }
}

/// Fills `t` with the 4 GiB identity map; `base` is `t`'s physical address.
fn build_identity_map(t: &mut IdentityMap, base: u64) {
    let pdpt = base + 4096;
    t.pml4[0] = pdpt | PTE_PRESENT | PTE_WRITE | PTE_USER;
    for (g, pd) in t.pd.iter_mut().enumerate() {
        let pd_phys = base + 8192 + 4096 * g as u64;
        t.pdpt[g] = pd_phys | PTE_PRESENT | PTE_WRITE | PTE_USER;
        let uncached = if g == MAPPED_GIB - 1 { PTE_PCD | PTE_PWT } else { 0 };
        for (i, e) in pd.iter_mut().enumerate() {
            let phys = ((g as u64) << 30) | ((i as u64) << 21);
            *e = phys | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_LARGE | uncached;
        }
    }
}

/// The real machine: x86 port I/O, `rdtsc` and `pause` (none of them privileged at IOPL 0 in
/// ring 0, and all natively executed or emulated under PVM).
#[derive(Debug)]
pub struct PortIo {
    dma: Option<&'static mut [u8]>,
    high_mapped: bool,
}

impl PortIo {
    /// Creates the handle used to drive the hardware, with no DMA arena.
    ///
    /// # Safety
    /// Only call this inside the probe guest, running in ring 0 (or with I/O permission for
    /// every port it touches), identity-mapped, on its only vCPU, with no device programmed to
    /// DMA into memory the caller does not own: port and MMIO writes through the returned
    /// handle reach real (virtual) devices. At most one handle may call
    /// [`Machine::map_mmio`].
    pub unsafe fn new() -> Self {
        PortIo { dma: None, high_mapped: false }
    }

    /// Like [`PortIo::new`], handing out `dma` through [`Machine::take_dma`].
    ///
    /// # Safety
    /// As [`PortIo::new`]; in addition `dma` must be page-aligned, identity-mapped memory
    /// (its addresses are the guest-physical addresses given to devices) that nothing else
    /// uses.
    pub unsafe fn with_dma(dma: &'static mut [u8]) -> Self {
        PortIo { dma: Some(dma), high_mapped: false }
    }
}

impl Machine for PortIo {
    fn halt_forever(&mut self) {
        if self.high_mapped {
            // Ring 3 (after map_mmio) may not halt: idle as cheaply as a spin can.
            loop {
                core::hint::spin_loop();
            }
        }
        loop {
            // SAFETY: ring 0 (map_mmio was never called, so no switch to ring 3 happened);
            // `cli; hlt` touches no memory and stops this, the only, vCPU.
            unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
        }
    }

    fn inb(&mut self, port: u16) -> u8 {
        let value: u8;
        // SAFETY: `PortIo::new`'s contract: we are the guest kernel, port reads touch no memory.
        unsafe {
            core::arch::asm!("in al, dx", out("al") value, in("dx") port,
                options(nomem, nostack, preserves_flags));
        }
        value
    }

    fn outb(&mut self, port: u16, value: u8) {
        // SAFETY: `PortIo::new`'s contract: we are the guest kernel and no device DMAs into
        // memory we use, so a port write cannot break Rust's memory model.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") value,
                options(nomem, nostack, preserves_flags));
        }
    }

    fn out_string(&mut self, port: u16, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // SAFETY: `rep outsb` only reads `bytes.len()` bytes from `bytes` (the direction flag is
        // clear, as the ABI guarantees) and writes them to the port; see `outb`.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                in("dx") port,
                inout("rsi") bytes.as_ptr() => _,
                inout("rcx") bytes.len() => _,
                options(readonly, nostack, preserves_flags)
            );
        }
    }

    fn tsc(&mut self) -> u64 {
        let lo: u32;
        let hi: u32;
        // SAFETY: `lfence; rdtsc` only orders earlier loads and reads the TSC into edx:eax.
        // Not `rdtscp`: under PVM the instructions after an exit are emulated, and KVM's
        // emulator has no `rdtscp` (seen: emulation failure); `lfence` works there.
        unsafe {
            core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        (u64::from(hi) << 32) | u64::from(lo)
    }

    fn pause(&mut self) {
        core::hint::spin_loop();
    }

    fn mmio_read32(&mut self, addr: u64) -> u32 {
        let value: u32;
        // SAFETY: `addr` was accepted by `map_mmio` (callers' contract), so it is mapped and
        // not RAM the probe uses; the read is a single 32-bit `mov` the VMM traps. No
        // `nomem`: the access must stay ordered with the probe's DMA memory accesses.
        unsafe {
            core::arch::asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                options(nostack, preserves_flags));
        }
        value
    }

    fn mmio_read8(&mut self, addr: u64) -> u8 {
        let value: u8;
        // SAFETY: as in `mmio_read32`: a single byte `mov` from a window `map_mmio` accepted.
        unsafe {
            core::arch::asm!("mov {v}, byte ptr [{a}]", a = in(reg) addr, v = out(reg_byte) value,
                options(nostack, preserves_flags));
        }
        value
    }

    fn mmio_read16(&mut self, addr: u64) -> u16 {
        let value: u16;
        // SAFETY: as in `mmio_read32`: a single 16-bit `mov` from a window `map_mmio` accepted.
        unsafe {
            core::arch::asm!("mov {v:x}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value,
                options(nostack, preserves_flags));
        }
        value
    }

    fn mmio_write32(&mut self, addr: u64, value: u32) {
        // SAFETY: as in `mmio_read32`; the write goes to a device window, not to RAM.
        unsafe {
            core::arch::asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value,
                options(nostack, preserves_flags));
        }
    }

    fn map_mmio(&mut self, addr: u64, len: u64) -> bool {
        if !mmio_range_ok(addr, len) {
            return false;
        }
        if !self.high_mapped {
            let tables = IDENTITY_MAP.0.get();
            // SAFETY: `PortIo::new`'s contract: this is the only handle mapping MMIO and the
            // probe runs on one vCPU, so nothing else references the tables.
            let t = unsafe { &mut *tables };
            let base = tables as u64;
            build_identity_map(t, base);
            // SAFETY: the new tables map the first GiB as both boot paths do (identity,
            // writable; now user-accessible too), so the code, stack and data the probe is
            // using stay where they are; `base` is their physical address.
            unsafe { enter_ring3(base) };
            self.high_mapped = true;
        }
        true
    }

    fn take_dma(&mut self) -> Option<&'static mut [u8]> {
        self.dma.take()
    }

    fn in_loop(&mut self, port: u16, count: u64) {
        if count == 0 {
            return;
        }
        // SAFETY: port reads only (see `inb`); the loop counts `rcx` down from `count` >= 1 to 0.
        unsafe {
            core::arch::asm!(
                "2:",
                "in al, dx",
                "dec rcx",
                "jnz 2b",
                in("dx") port,
                inout("rcx") count => _,
                out("al") _,
                options(nomem, nostack),
            );
        }
    }
}

/// A simulated machine for host unit tests.
#[cfg(test)]
pub mod testing {
    use super::Machine;
    use std::any::Any;

    /// A simulated MMIO device: 32-bit register accesses at offsets inside its window.
    pub trait FakeMmio: std::fmt::Debug {
        /// A read at `offset`.
        fn read(&mut self, offset: u64) -> u32;
        /// A write at `offset`.
        fn write(&mut self, offset: u64, value: u32);
        /// For tests that inspect the device afterwards.
        fn as_any(&self) -> &dyn Any;
    }

    /// Allocates a zeroed, page-aligned, leaked arena of `len` bytes (the fake's DMA memory:
    /// host pointers stand in for guest-physical addresses).
    pub fn leak_dma(len: usize) -> &'static mut [u8] {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null(), "out of memory");
        // SAFETY: `p` points to `layout.size()` >= `len` zeroed bytes, never freed.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }

    /// Records every port write; reads return `lsr` for COM1's LSR and `other` elsewhere.
    #[derive(Debug)]
    pub struct FakeMachine {
        /// Every `outb` as (port, value).
        pub outs: Vec<(u16, u8)>,
        /// Every `inb` port.
        pub ins: Vec<u16>,
        /// Value read back from port 0x3fd.
        pub lsr: u8,
        /// Value read from any other port.
        pub other: u8,
        /// Next TSC value; advances by `tsc_step` per read and by `tsc_per_in` per `inb`.
        pub tsc_now: u64,
        /// TSC advance per `tsc()` call.
        pub tsc_step: u64,
        /// TSC advance per `inb`.
        pub tsc_per_in: u64,
        /// Number of `pause` calls.
        pub pauses: u64,
        /// Whether `halt_forever` was called.
        pub halted: bool,
        /// MMIO devices as (base, length, device).
        pub mmio: Vec<(u64, u64, Box<dyn FakeMmio>)>,
        /// Every MMIO access as (address, value, is_write).
        pub mmio_log: Vec<(u64, u32, bool)>,
        /// Size of the DMA arena `take_dma` hands out (0: none).
        pub dma_len: usize,
        /// Whether the arena was handed out.
        pub dma_taken: bool,
        /// An i8042 whose keyboard has these bytes queued (`None`: ports 0x60/0x64 read
        /// `other` like any port).
        pub kbd: Option<std::collections::VecDeque<u8>>,
    }

    impl Default for FakeMachine {
        fn default() -> Self {
            FakeMachine {
                outs: Vec::new(),
                ins: Vec::new(),
                lsr: 0x60,
                other: 0xff,
                tsc_now: 1000,
                tsc_step: 0,
                tsc_per_in: 0,
                pauses: 0,
                halted: false,
                mmio: Vec::new(),
                mmio_log: Vec::new(),
                dma_len: 1 << 20,
                dma_taken: false,
                kbd: None,
            }
        }
    }

    impl FakeMachine {
        /// The bytes written to COM1's data register after the UART set-up, as text.
        /// (Set-up writes to 0x3f8 happen with DLAB set and are skipped.)
        pub fn output(&self) -> String {
            let mut dlab = false;
            let mut bytes = Vec::new();
            for &(port, value) in &self.outs {
                match port {
                    0x3fb => dlab = value & 0x80 != 0,
                    0x3f8 if !dlab => bytes.push(value),
                    _ => {}
                }
            }
            String::from_utf8(bytes).expect("console output is ASCII")
        }
    }

    impl Machine for FakeMachine {
        fn inb(&mut self, port: u16) -> u8 {
            self.ins.push(port);
            self.tsc_now += self.tsc_per_in;
            match (port, self.kbd.as_mut()) {
                (0x3fd, _) => self.lsr,
                (0x64, Some(k)) => u8::from(!k.is_empty()),
                (0x60, Some(k)) => k.pop_front().unwrap_or(0),
                _ => self.other,
            }
        }
        fn outb(&mut self, port: u16, value: u8) {
            self.outs.push((port, value));
        }
        fn tsc(&mut self) -> u64 {
            self.tsc_now += self.tsc_step;
            self.tsc_now
        }
        fn pause(&mut self) {
            self.pauses += 1;
        }
        fn halt_forever(&mut self) {
            self.halted = true;
        }
        fn mmio_read32(&mut self, addr: u64) -> u32 {
            let v = match self.device(addr) {
                Some((dev, off)) => dev.read(off),
                None => u32::MAX,
            };
            self.mmio_log.push((addr, v, false));
            v
        }
        fn mmio_read8(&mut self, addr: u64) -> u8 {
            let word = self.mmio_read32(addr & !3);
            u8::try_from((word >> (8 * (addr & 3))) & 0xff).unwrap_or(0)
        }
        fn mmio_read16(&mut self, addr: u64) -> u16 {
            let word = self.mmio_read32(addr & !3);
            u16::try_from((word >> (8 * (addr & 2))) & 0xffff).unwrap_or(0)
        }
        fn mmio_write32(&mut self, addr: u64, value: u32) {
            self.mmio_log.push((addr, value, true));
            if let Some((dev, off)) = self.device(addr) {
                dev.write(off, value);
            }
        }
        fn map_mmio(&mut self, addr: u64, len: u64) -> bool {
            super::mmio_range_ok(addr, len)
        }
        fn take_dma(&mut self) -> Option<&'static mut [u8]> {
            if self.dma_taken || self.dma_len == 0 {
                return None;
            }
            self.dma_taken = true;
            Some(leak_dma(self.dma_len))
        }
    }

    impl FakeMachine {
        fn device(&mut self, addr: u64) -> Option<(&mut Box<dyn FakeMmio>, u64)> {
            self.mmio.iter_mut().find(|(base, len, _)| addr >= *base && addr < base + len).map(|(base, _, dev)| {
                let off = addr - *base;
                (dev, off)
            })
        }

        /// The device at `base`, downcast to `T`.
        pub fn device_at<T: 'static>(&self, base: u64) -> Option<&T> {
            self.mmio.iter().find(|(b, _, _)| *b == base).and_then(|(_, _, d)| d.as_any().downcast_ref::<T>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tss_descriptor_points_at_an_open_io_bitmap() {
        let tss = 0x0012_3456_789a_b000u64;
        let g = ring3_gdt(tss);
        let (low, high) = (g[5], g[6]);
        let base = ((low >> 16) & 0x00ff_ffff) | (((low >> 56) & 0xff) << 24) | (high << 32);
        let limit = (low & 0xffff) | (((low >> 48) & 0xf) << 16);
        assert_eq!(base, tss);
        assert_eq!(limit as usize, core::mem::size_of::<Tss64>() - 1);
        assert_eq!((low >> 40) & 0xff, 0x89, "present, DPL 0, available 64-bit TSS");
        assert_eq!(usize::from(RING3_TSS_SELECTOR) / 8, 5);
        let iomap = RING3_TSS.iomap_base;
        assert_eq!(iomap, IO_BITMAP_OFFSET);
        let bitmap = RING3_TSS.io_bitmap;
        assert!(bitmap[..IO_BITMAP_BYTES].iter().all(|&b| b == 0), "every port allowed");
        assert_eq!(bitmap[IO_BITMAP_BYTES], 0xff);
    }
}
