//! x86-64 specifics: the memory map, boot-time CPU state and the tables the guest reads at boot.

pub mod cpu;
pub mod layout;
pub mod mptable;
