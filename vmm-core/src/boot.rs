//! Loading the guest: kernel (ELF `vmlinux` or bzImage) through linux-loader, initrd, command
//! line, and what the kernel's entry reads: an `hvm_start_info` with its memory map and module
//! list for PVH (an ELF with a PVH note, as Firecracker and Cloud Hypervisor choose), else the
//! boot_params zero page with its e820 map for the Linux 64-bit boot protocol.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::GuestRam;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel image {path}")]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a bootable kernel (ELF: {elf}; bzImage: {bzimage})")]
    BadKernel {
        /// The path given.
        path: PathBuf,
        /// Why the ELF loader refused it.
        elf: loader::Error,
        /// Why the bzImage loader refused it.
        bzimage: loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    OpenInitrd {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of usable memory.
        limit: u64,
    },
    /// Writing something into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    GuestWrite(&'static str),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The boot parameters could not be written.
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `ebx` = the `hvm_start_info` address
    /// ([`PVH_INFO_START`]). Chosen whenever the ELF carries a PVH note.
    Pvh,
    /// The Linux 64-bit boot protocol: long mode on an identity map, `rsi` = the zero page.
    Linux64,
}

impl BootProtocol {
    /// The name the log uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pvh => "PVH",
            Self::Linux64 => "Linux 64-bit",
        }
    }
}

/// What the vCPU needs to start the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Entry point (32-bit for PVH, 64-bit otherwise).
    pub entry: u64,
    /// How to enter it.
    pub protocol: BootProtocol,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, when the kernel is a bzImage.
    pub setup_header: Option<setup_header>,
}

/// Loads `path` into guest memory: an ELF vmlinux first (entered through PVH when it has a PVH
/// note, else through its 64-bit entry), else a bzImage (64-bit entry).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || File::open(path).map_err(|source| BootError::OpenKernel { path: path.to_owned(), source });
    let mut file = open()?;
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match loader::elf::Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let (entry, protocol) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (a.0, BootProtocol::Pvh),
                PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
                    (r.kernel_load.0, BootProtocol::Linux64)
                }
            };
            return Ok(LoadedKernel { entry, protocol, end: r.kernel_end, setup_header: None });
        }
        Err(e) => e,
    };
    let mut file = open()?;
    match loader::bzimage::BzImage::load(mem, None, &mut file, himem) {
        // The 64-bit entry of a bzImage's protected-mode part is 0x200 bytes in.
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0 + 0x200,
            protocol: BootProtocol::Linux64,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bzimage) => Err(BootError::BadKernel { path: path.to_owned(), elf, bzimage }),
    }
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Chooses where an initrd of `size` bytes goes: page aligned, as high as possible below
/// `low_end`, above `kernel_end`.
pub fn initrd_placement(size: u64, kernel_end: u64, low_end: u64) -> Option<u64> {
    let addr = low_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end && size > 0).then_some(addr)
}

/// Copies the initrd at `path` to the top of low guest memory.
pub fn load_initrd(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<InitrdRegion, BootError> {
    let err = |source| BootError::OpenInitrd { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let limit = ram.low_end();
    let addr = initrd_placement(size, kernel_end, limit).ok_or(BootError::InitrdTooBig { size, limit })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size, limit })?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::GuestWrite("initrd"))?;
    Ok(InitrdRegion { addr, size })
}

/// Builds the guest command line from the user's and the extra words the core adds.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let c =
        |e: linux_loader::cmdline::Error| BootError::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX_SIZE - 1));
    if !user.trim().is_empty() {
        cmdline.insert_str(user.trim()).map_err(c)?;
    }
    for word in extra {
        cmdline.insert_str(word).map_err(c)?;
    }
    Ok(cmdline)
}

/// The e820 map for `ram`: conventional memory below the EBDA, then RAM from 1 MiB, then RAM
/// above the MMIO gap if there is any.
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    let mut map = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    let low_end = ram_size.min(crate::arch::layout::MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(boot_e820_entry { addr: HIMEM_START, size: low_end - HIMEM_START, r#type: E820_RAM });
    }
    if ram_size > low_end {
        map.push(boot_e820_entry { addr: MMIO_GAP_END, size: ram_size - low_end, r#type: E820_RAM });
    }
    map
}

/// `hvm_start_info.magic` (Xen's `XEN_HVM_START_MAGIC_VALUE`).
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// Writes the command line and what the kernel's entry reads for its protocol: the PVH start
/// info or the zero page.
pub fn write_boot_params(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
) -> Result<(), BootError> {
    loader::load_cmdline(ram.memory(), GuestAddress(CMDLINE_START), cmdline)
        .map_err(|_| BootError::GuestWrite("command line"))?;
    match kernel.protocol {
        BootProtocol::Pvh => write_pvh_start_info(ram, initrd),
        BootProtocol::Linux64 => write_zero_page(ram, kernel, cmdline, initrd),
    }
}

/// The PVH start info at [`PVH_INFO_START`]: the command line, the memory map (the same ranges
/// as the e820 map) at [`PVH_MEMMAP_START`] and the initrd as the one module at
/// [`PVH_MODLIST_START`].
fn write_pvh_start_info(ram: &GuestRam, initrd: Option<InitrdRegion>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(ram.size())
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.r#type, reserved: 0 })
        .collect();
    let modules: Vec<hvm_modlist_entry> =
        initrd.iter().map(|rd| hvm_modlist_entry { paddr: rd.addr, size: rd.size, ..Default::default() }).collect();
    let info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len()).map_err(|_| BootError::GuestWrite("PVH memory map"))?,
        nr_modules: u32::try_from(modules.len()).map_err(|_| BootError::GuestWrite("PVH module list"))?,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST_START },
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory()).map_err(BootError::BootParams)
}

/// The zero page at [`ZERO_PAGE_START`] for the Linux 64-bit boot protocol.
fn write_zero_page(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
) -> Result<(), BootError> {
    let cmdline_len = cmdline.as_cstring().map_err(|e| BootError::Cmdline(e.to_string()))?.as_bytes().len();
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).map_err(|_| BootError::GuestWrite("command line"))?;
    params.hdr.cmdline_size = u32::try_from(cmdline_len).map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = u32::try_from(rd.addr).map_err(|_| BootError::GuestWrite("initrd"))?;
        params.hdr.ramdisk_size = u32::try_from(rd.size).map_err(|_| BootError::GuestWrite("initrd"))?;
    }
    let map = e820_map(ram.size());
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| BootError::GuestWrite("e820 map"))?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), ram.memory())
        .map_err(BootError::BootParams)?;
    // Read it back as a check that the zero page landed in RAM.
    let _: u16 =
        ram.memory().read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).map_err(|_| BootError::GuestWrite("zero page"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_aligned() {
        assert_eq!(initrd_placement(0x1800, 0x20_0000, 0x800_0000), Some(0x800_0000 - 0x2000));
        assert_eq!(initrd_placement(0x800_0000, 0x20_0000, 0x800_0000), None);
        assert_eq!(initrd_placement(0, 0x20_0000, 0x800_0000), None);
    }

    #[test]
    fn e820_covers_ram_around_gap() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 2);
        let (addr, size) = (m[1].addr, m[1].size);
        assert_eq!(addr + size, 128 << 20);
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 3);
        let addr = m[2].addr;
        assert_eq!(addr, MMIO_GAP_END);
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(build_cmdline(&long, &[]), Err(BootError::Cmdline(_))));
        let c = build_cmdline("console=ttyS0", &["noxsave".to_string()]).expect("cmdline");
        assert_eq!(c.as_cstring().expect("cstr").to_str().expect("utf8"), "console=ttyS0 noxsave");
    }

    /// A minimal bzImage: a setup header that the loader accepts, then a payload.
    fn synthetic_bzimage() -> Vec<u8> {
        let mut img = vec![0u8; 64 << 10];
        img[0x1f1] = 4; // setup_sects: (4 + 1) * 512 bytes of real-mode setup
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
        for b in &mut img[5 * 512..] {
            *b = 0x90;
        }
        img
    }

    #[test]
    fn bzimage_loads_at_code32_start() {
        let ram = GuestRam::new(16).expect("ram");
        let path = std::env::temp_dir().join(format!("bulkhead-bzimage-test-{}", std::process::id()));
        std::fs::write(&path, synthetic_bzimage()).expect("write");
        let k = load_kernel(ram.memory(), &path).expect("bzImage accepted");
        let _ = std::fs::remove_file(&path);
        assert_eq!(k.entry, HIMEM_START + 0x200, "64-bit entry is 0x200 into the protected-mode kernel");
        let hdr = k.setup_header.expect("setup header kept for the zero page");
        let version = hdr.version;
        assert_eq!(version, 0x020f);
        let first: u8 = ram.memory().read_obj(GuestAddress(HIMEM_START)).expect("read");
        assert_eq!(first, 0x90);
    }

    #[test]
    fn missing_and_garbage_kernels() {
        let ram = GuestRam::new(16).expect("ram");
        let e = load_kernel(ram.memory(), Path::new("/nonexistent/vmlinux")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
        let dir = std::env::temp_dir().join(format!("bulkhead-boot-test-{}", std::process::id()));
        std::fs::write(&dir, b"definitely not a kernel").expect("write");
        let e = load_kernel(ram.memory(), &dir).expect_err("garbage");
        assert!(e.to_string().contains("not a bootable kernel"), "{e}");
        let _ = std::fs::remove_file(&dir);
    }
}
