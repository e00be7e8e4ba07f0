//! `cargo xtask probe`: builds the freestanding probe guest (`guests/probe`) and checks it.
//!
//! 1. `cargo build --release` in `guests/probe` (its own `.cargo/config.toml` sets the target
//!    flags) with `--target-dir target/probe`;
//! 2. validates the ELF: ELF64 x86-64 executable, entry 0x200000, every PT_LOAD with
//!    `p_paddr == p_vaddr`, a PT_NOTE with the PVH note (Xen, type 18) pointing into the image;
//! 3. if `objdump` is installed, disassembles it and fails on any instruction PVM's emulator
//!    cannot run after an exit (SSE/AVX registers, `popcnt`, `xsave`/`xrstor`, `rdtscp`,
//!    `clac`/`stac`, and `int3` other than inter-function padding);
//! 4. copies it to `target/guests/probe.elf` (only when its contents changed).
//!
//! Progress goes to stderr; the last line of stdout is the absolute path of the ELF.

use sha2::{Digest, Sha256};
use std::fmt;
use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Target triple the guest is built for (the only one installed).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// Where the guest is linked and entered (Linux 64-bit boot protocol).
pub const PROBE_ENTRY: u64 = 0x20_0000;
/// Xen ELF note type XEN_ELFNOTE_PHYS32_ENTRY (the PVH entry point).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Environment variables of the outer `cargo run` that must not leak into the guest build.
const SCRUBBED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "RUSTC_WORKSPACE_WRAPPER",
];

/// Why `cargo xtask probe` failed.
#[derive(Debug)]
pub enum ProbeError {
    /// Bad command-line arguments.
    Usage(String),
    /// A command could not be started.
    Spawn {
        /// The command.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    Failed {
        /// The command.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The ELF does not have the expected shape.
    Elf(String),
    /// The disassembly contains instructions the guest must not have.
    Forbidden {
        /// How many offending lines.
        count: usize,
        /// The first few of them.
        sample: String,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Usage(m) => write!(f, "{m}"),
            ProbeError::Spawn { what, .. } => write!(f, "cannot run {what}"),
            ProbeError::Failed { what, status } => write!(f, "{what} failed ({status})"),
            ProbeError::Io { path, .. } => write!(f, "{}", path.display()),
            ProbeError::Elf(m) => write!(f, "bad probe ELF: {m}"),
            ProbeError::Forbidden { count, sample } => {
                write!(f, "probe ELF has {count} instruction(s) PVM cannot emulate after an exit:\n{sample}")
            }
        }
    }
}

impl std::error::Error for ProbeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProbeError::Spawn { source, .. } | ProbeError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask probe\n\
     Builds guests/probe (release), checks it and prints the ELF's absolute path last on stdout."
}

/// Entry point of `cargo xtask probe`.
pub fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(a) = args.first() {
        if a == "-h" || a == "--help" {
            println!("{}", usage());
            return Ok(());
        }
        return Err(ProbeError::Usage(format!("unexpected argument `{a}`\n{}", usage())).into());
    }
    let root = workspace_root();
    let elf = build(&root)?;
    println!("{}", elf.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// Builds, checks and installs the probe; returns the absolute path of the installed ELF.
pub fn build(root: &Path) -> Result<PathBuf, ProbeError> {
    let package = root.join("guests/probe");
    let target_dir = root.join("target/probe");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&package)
        .args(["build", "--release", "--bin", "probe", "--target", TRIPLE, "--target-dir"])
        .arg(&target_dir);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    // Keep stdout for the path alone: cargo's stdout (normally empty) goes to our stderr.
    let stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| ProbeError::Spawn { what: "cargo (dup stderr)".into(), source })?;
    cmd.stdout(Stdio::from(stderr));
    eprintln!("xtask probe: building {} -> {}", package.display(), target_dir.display());
    let what = "cargo build (guests/probe)".to_string();
    let status = cmd.status().map_err(|source| ProbeError::Spawn { what: what.clone(), source })?;
    if !status.success() {
        return Err(ProbeError::Failed { what, status });
    }

    let built = target_dir.join(TRIPLE).join("release/probe");
    let bytes = fs::read(&built).map_err(|source| ProbeError::Io { path: built.clone(), source })?;
    let info = check_elf(&bytes)?;
    eprintln!(
        "xtask probe: ELF ok: entry {:#x}, PVH entry {:#x}, {} bytes loaded at {:#x}",
        info.entry, info.pvh_entry, info.load_size, info.load_start
    );
    check_disassembly(&built)?;

    let out_dir = root.join("target/guests");
    let dest = out_dir.join("probe.elf");
    let digest = hex(&Sha256::digest(&bytes));
    let unchanged = fs::read(&dest).map(|old| old == bytes).unwrap_or(false);
    if unchanged {
        eprintln!("xtask probe: {} up to date (sha256 {digest})", dest.display());
    } else {
        fs::create_dir_all(&out_dir).map_err(|source| ProbeError::Io { path: out_dir.clone(), source })?;
        // Write then rename, so a concurrent reader never sees a half-written ELF.
        let tmp = out_dir.join(format!(".probe.elf.{}", std::process::id()));
        fs::write(&tmp, &bytes).map_err(|source| ProbeError::Io { path: tmp.clone(), source })?;
        fs::rename(&tmp, &dest).map_err(|source| ProbeError::Io { path: dest.clone(), source })?;
        eprintln!("xtask probe: installed {} (sha256 {digest})", dest.display());
    }
    Ok(fs::canonicalize(&dest).unwrap_or(dest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`check_elf`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_entry` (64-bit boot protocol entry).
    pub entry: u64,
    /// The PVH entry from the Xen note.
    pub pvh_entry: u64,
    /// Lowest PT_LOAD address.
    pub load_start: u64,
    /// Bytes spanned by the PT_LOAD segments (memory size).
    pub load_size: u64,
}

fn rd<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], ProbeError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ProbeError::Elf(format!("truncated at offset {off:#x}")))
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, ProbeError> {
    rd::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, ProbeError> {
    rd::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, ProbeError> {
    rd::<8>(b, off).map(u64::from_le_bytes)
}
fn usize_of(v: u64) -> Result<usize, ProbeError> {
    usize::try_from(v).map_err(|_| ProbeError::Elf(format!("offset {v:#x} too large")))
}

/// Checks the ELF shape both boot protocols need (see the module docs).
pub fn check_elf(b: &[u8]) -> Result<ElfInfo, ProbeError> {
    if rd::<4>(b, 0)? != *b"\x7fELF" || rd::<1>(b, 4)? != [2] || rd::<1>(b, 5)? != [1] {
        return Err(ProbeError::Elf("not a little-endian ELF64 file".into()));
    }
    if u16_at(b, 16)? != 2 || u16_at(b, 18)? != 62 {
        return Err(ProbeError::Elf("not an x86-64 executable (ET_EXEC, EM_X86_64)".into()));
    }
    let entry = u64_at(b, 24)?;
    if entry != PROBE_ENTRY {
        return Err(ProbeError::Elf(format!("entry {entry:#x}, expected {PROBE_ENTRY:#x}")));
    }
    let phoff = usize_of(u64_at(b, 32)?)?;
    let phentsize = usize::from(u16_at(b, 54)?);
    let phnum = usize::from(u16_at(b, 56)?);
    if phentsize < 56 {
        return Err(ProbeError::Elf(format!("program header size {phentsize}")));
    }
    let mut loads = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(b, ph)?;
        let offset = u64_at(b, ph + 8)?;
        let vaddr = u64_at(b, ph + 16)?;
        let paddr = u64_at(b, ph + 24)?;
        let filesz = u64_at(b, ph + 32)?;
        let memsz = u64_at(b, ph + 40)?;
        let align = u64_at(b, ph + 48)?;
        match p_type {
            1 => {
                if paddr != vaddr {
                    return Err(ProbeError::Elf(format!("PT_LOAD p_paddr {paddr:#x} != p_vaddr {vaddr:#x}")));
                }
                loads.push((paddr, memsz));
            }
            4 => {
                let start = usize_of(offset)?;
                let notes = start
                    .checked_add(usize_of(filesz)?)
                    .and_then(|end| b.get(start..end))
                    .ok_or_else(|| ProbeError::Elf("PT_NOTE outside the file".into()))?;
                if let Some(e) = find_pvh_note(notes, align)? {
                    pvh_entry = Some(e);
                }
            }
            _ => {}
        }
    }
    let pvh_entry = pvh_entry.ok_or_else(|| ProbeError::Elf("no PVH note (Xen, type 18) in a PT_NOTE".into()))?;
    let load_start = loads.iter().map(|&(a, _)| a).min().ok_or_else(|| ProbeError::Elf("no PT_LOAD".into()))?;
    let load_end = loads.iter().map(|&(a, s)| a.saturating_add(s)).max().unwrap_or(load_start);
    for (what, addr) in [("entry", entry), ("PVH entry", pvh_entry)] {
        if !loads.iter().any(|&(a, s)| addr >= a && addr < a.saturating_add(s)) {
            return Err(ProbeError::Elf(format!("{what} {addr:#x} is outside every PT_LOAD")));
        }
    }
    Ok(ElfInfo { entry, pvh_entry, load_start, load_size: load_end - load_start })
}

/// Finds XEN_ELFNOTE_PHYS32_ENTRY in a note segment (`align` = its p_align, as QEMU reads it).
fn find_pvh_note(notes: &[u8], align: u64) -> Result<Option<u64>, ProbeError> {
    let align = usize_of(align.max(4))?;
    let up = |v: usize| v.div_ceil(align) * align;
    let mut off = 0;
    while off + 12 <= notes.len() {
        let namesz = usize_of(u64::from(u32_at(notes, off)?))?;
        let descsz = usize_of(u64::from(u32_at(notes, off + 4)?))?;
        let ntype = u32_at(notes, off + 8)?;
        let name_off = off + 12;
        let desc_off = name_off + up(namesz);
        let name = notes.get(name_off..name_off + namesz).unwrap_or(&[]);
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = notes
                .get(desc_off..desc_off + descsz)
                .ok_or_else(|| ProbeError::Elf("PVH note descriptor truncated".into()))?;
            return match desc.len() {
                4 => Ok(Some(u64::from(u32_at(desc, 0)?))),
                8 => Ok(Some(u64_at(desc, 0)?)),
                n => Err(ProbeError::Elf(format!("PVH note descriptor of {n} bytes"))),
            };
        }
        off = desc_off + up(descsz);
    }
    Ok(None)
}

/// Mnemonics PVM's (KVM's) emulator cannot run; a guest hitting one right after an exit dies.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "popcnt", "xsave", "xsaveopt", "xsavec", "xsaves", "xrstor", "xrstors", "fxsave", "fxrstor", "rdtscp", "clac",
    "stac",
];
/// Register name prefixes that mean SSE/AVX code.
const FORBIDDEN_REGISTERS: &[&str] = &["xmm", "ymm", "zmm"];

/// Returns the offending lines of an `objdump -d` listing: SSE/AVX registers, forbidden
/// mnemonics, and `int3` that is not alignment padding (padding is a run of `int3` ending right
/// before the next symbol).
pub fn forbidden_lines(listing: &str) -> Vec<String> {
    let lines: Vec<&str> = listing.lines().collect();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // Instruction lines: "  addr:\tbytes\tmnemonic operands".
        let mut cols = line.split('\t');
        let (Some(addr), Some(_bytes), Some(insn)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        if !addr.trim_end().ends_with(':') {
            continue;
        }
        let insn = insn.trim().to_ascii_lowercase();
        let mnemonic = insn.split_whitespace().find(|w| !matches!(*w, "rep" | "repz" | "repnz" | "lock" | "notrack"));
        let Some(mnemonic) = mnemonic else { continue };
        let forbidden = FORBIDDEN_MNEMONICS.contains(&mnemonic)
            || FORBIDDEN_REGISTERS.iter().any(|r| insn.contains(r))
            || (mnemonic == "int3" && !is_padding(&lines[i + 1..]));
        if forbidden {
            bad.push(line.trim().to_string());
        }
    }
    bad
}

/// Whether the lines after an `int3` are only more `int3` up to the next symbol (or the end).
fn is_padding(rest: &[&str]) -> bool {
    for line in rest {
        let t = line.trim();
        if t.is_empty() || t.ends_with(">:") {
            return true;
        }
        if !t.ends_with("int3") {
            return false;
        }
    }
    true
}

/// Disassembles `elf` with `objdump -d` (if installed) and fails on [`forbidden_lines`].
fn check_disassembly(elf: &Path) -> Result<(), ProbeError> {
    let what = format!("objdump -d -M intel {}", elf.display());
    let out = match Command::new("objdump").args(["-d", "-M", "intel"]).arg(elf).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("xtask probe: warning: objdump not installed; instruction check skipped");
            return Ok(());
        }
        Err(source) => return Err(ProbeError::Spawn { what, source }),
    };
    if !out.status.success() {
        return Err(ProbeError::Failed { what, status: out.status });
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let count = listing.lines().filter(|l| l.contains(":\t")).count();
    let bad = forbidden_lines(&listing);
    if !bad.is_empty() {
        let sample = bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n");
        return Err(ProbeError::Forbidden { count: bad.len(), sample });
    }
    eprintln!("xtask probe: objdump: {count} instructions, no SSE/AVX, popcnt, xsave, rdtscp or stray int3");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
0000000000200000 <_start64>:
  200000:\tfc                   \tcld
  200001:\tf3 aa                \trep stos BYTE PTR es:[rdi],al
  200003:\tc3                   \tret
  200004:\tcc                   \tint3
  200005:\tcc                   \tint3

0000000000200010 <f>:
  200010:\t0f 57 c0             \txorps  xmm0,xmm0
  200013:\tf3 0f b8 c0          \tpopcnt eax,eax
  200017:\tcc                   \tint3
  200018:\t90                   \tnop
  200019:\t0f 01 f9             \trdtscp
  20001c:\t0f ae e8             \tlfence
";

    #[test]
    fn objdump_check_flags_sse_popcnt_rdtscp_and_stray_int3_only() {
        let bad = forbidden_lines(LISTING);
        assert_eq!(bad.len(), 4, "{bad:#?}");
        assert!(bad[0].ends_with("xorps  xmm0,xmm0"));
        assert!(bad[1].ends_with("popcnt eax,eax"));
        assert!(bad[2].ends_with("int3") && bad[2].starts_with("200017"));
        assert!(bad[3].ends_with("rdtscp"));
    }

    fn elf_with(entry: u64, paddr: u64, note_type: u32) -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        // PT_LOAD at 0x200000, 0x1000 bytes.
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        b[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes());
        // PT_NOTE at file offset 0x100, 24 bytes, align 4.
        let ph = 64 + 56;
        b[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&24u64.to_le_bytes());
        b[ph + 48..ph + 56].copy_from_slice(&4u64.to_le_bytes());
        let n = 0x100;
        b[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
        b[n + 4..n + 8].copy_from_slice(&8u32.to_le_bytes());
        b[n + 8..n + 12].copy_from_slice(&note_type.to_le_bytes());
        b[n + 12..n + 16].copy_from_slice(b"Xen\0");
        b[n + 16..n + 24].copy_from_slice(&0x20_0040u64.to_le_bytes());
        b
    }

    #[test]
    fn elf_check_accepts_the_expected_shape() {
        let info = check_elf(&elf_with(PROBE_ENTRY, 0x20_0000, 18)).expect("valid");
        assert_eq!(info, ElfInfo { entry: 0x20_0000, pvh_entry: 0x20_0040, load_start: 0x20_0000, load_size: 0x1000 });
    }

    #[test]
    fn elf_check_rejects_wrong_entry_paddr_or_missing_note() {
        assert!(check_elf(&elf_with(0x10_0000, 0x20_0000, 18)).is_err());
        assert!(check_elf(&elf_with(PROBE_ENTRY, 0x30_0000, 18)).is_err());
        assert!(check_elf(&elf_with(PROBE_ENTRY, 0x20_0000, 17)).is_err());
        assert!(check_elf(&elf_with(PROBE_ENTRY, 0x20_0000, 18)[..100]).is_err());
        assert!(check_elf(b"not an elf").is_err());
    }
}
