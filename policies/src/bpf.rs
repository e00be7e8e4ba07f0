//! A small classic-BPF interpreter for seccomp programs, for tests: runs a compiled filter on a
//! `seccomp_data` and returns the action it selects, without loading anything into the kernel.

use seccompiler::sock_filter;

/// The input of a seccomp filter (`struct seccomp_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompData {
    /// Syscall number.
    pub nr: i32,
    /// `AUDIT_ARCH_*` of the calling convention.
    pub arch: u32,
    /// Instruction pointer.
    pub instruction_pointer: u64,
    /// The six arguments.
    pub args: [u64; 6],
}

impl SeccompData {
    /// An x86_64 call of `nr` with `args`.
    pub fn x86_64(nr: i32, args: [u64; 6]) -> Self {
        Self { nr, arch: crate::AUDIT_ARCH_X86_64, instruction_pointer: 0, args }
    }

    fn word(&self, offset: u32) -> Option<u32> {
        let mut bytes = [0u8; 64];
        bytes[0..4].copy_from_slice(&self.nr.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.arch.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.instruction_pointer.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            bytes[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        let o = usize::try_from(offset).ok()?;
        if o % 4 != 0 || o + 4 > bytes.len() {
            return None;
        }
        Some(u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]))
    }
}

/// Why a program could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// An instruction this interpreter (and seccomp) does not accept.
    #[error("unsupported instruction {code:#06x} at {pc}")]
    Unsupported {
        /// Opcode.
        code: u16,
        /// Index.
        pc: usize,
    },
    /// A load outside `seccomp_data` or a misaligned one.
    #[error("bad load offset {offset} at {pc}")]
    BadLoad {
        /// Offset.
        offset: u32,
        /// Index.
        pc: usize,
    },
    /// A jump or fall-through past the end of the program.
    #[error("control left the program at {0}")]
    FellOff(usize),
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_LD_IMM: u16 = 0x00;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_ALU_OR_K: u16 = 0x44;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;
const BPF_RET_A: u16 = 0x16;

/// Runs `prog` on `data`; returns the 32-bit seccomp return value. Classic BPF only jumps
/// forward, so this takes at most `prog.len()` steps.
pub fn evaluate(prog: &[sock_filter], data: &SeccompData) -> Result<u32, EvalError> {
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    while let Some(insn) = prog.get(pc) {
        let next = pc + 1;
        let jump = |taken: bool| next + usize::from(if taken { insn.jt } else { insn.jf });
        pc = match insn.code {
            BPF_LD_W_ABS => {
                acc = data.word(insn.k).ok_or(EvalError::BadLoad { offset: insn.k, pc })?;
                next
            }
            BPF_LD_IMM => {
                acc = insn.k;
                next
            }
            BPF_ALU_AND_K => {
                acc &= insn.k;
                next
            }
            BPF_ALU_OR_K => {
                acc |= insn.k;
                next
            }
            BPF_JMP_JA => next + usize::try_from(insn.k).map_err(|_| EvalError::FellOff(pc))?,
            BPF_JMP_JEQ_K => jump(acc == insn.k),
            BPF_JMP_JGT_K => jump(acc > insn.k),
            BPF_JMP_JGE_K => jump(acc >= insn.k),
            BPF_JMP_JSET_K => jump(acc & insn.k != 0),
            BPF_RET_K => return Ok(insn.k),
            BPF_RET_A => return Ok(acc),
            code => return Err(EvalError::Unsupported { code, pc }),
        };
    }
    Err(EvalError::FellOff(pc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(code: u16, k: u32) -> sock_filter {
        sock_filter { code, jt: 0, jf: 0, k }
    }

    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    #[test]
    fn loads_jumps_and_returns() {
        // if nr == 7 && (arg0 & 4) == 0 then 0x7fff0000 else 0x30000
        let prog = [
            stmt(BPF_LD_W_ABS, 0),
            jump(BPF_JMP_JEQ_K, 7, 0, 3),
            stmt(BPF_LD_W_ABS, 16),
            jump(BPF_JMP_JSET_K, 4, 1, 0),
            stmt(BPF_RET_K, 0x7fff_0000),
            stmt(BPF_RET_K, 0x0003_0000),
        ];
        assert_eq!(evaluate(&prog, &SeccompData::x86_64(7, [3, 0, 0, 0, 0, 0])), Ok(0x7fff_0000));
        assert_eq!(evaluate(&prog, &SeccompData::x86_64(7, [4, 0, 0, 0, 0, 0])), Ok(0x0003_0000));
        assert_eq!(evaluate(&prog, &SeccompData::x86_64(8, [0; 6])), Ok(0x0003_0000));
    }

    #[test]
    fn bad_programs_are_errors() {
        assert_eq!(evaluate(&[stmt(BPF_LD_W_ABS, 0)], &SeccompData::x86_64(0, [0; 6])), Err(EvalError::FellOff(1)));
        assert!(matches!(
            evaluate(&[stmt(BPF_LD_W_ABS, 2)], &SeccompData::x86_64(0, [0; 6])),
            Err(EvalError::BadLoad { offset: 2, pc: 0 })
        ));
        assert!(matches!(
            evaluate(&[stmt(0x61, 0)], &SeccompData::x86_64(0, [0; 6])),
            Err(EvalError::Unsupported { code: 0x61, pc: 0 })
        ));
        // Argument high words are addressable (offset 20 = high half of arg 0).
        let prog = [stmt(BPF_LD_W_ABS, 20), stmt(BPF_RET_A, 0)];
        assert_eq!(evaluate(&prog, &SeccompData::x86_64(0, [0x1234_5678_0000_0000, 0, 0, 0, 0, 0])), Ok(0x1234_5678));
    }
}
