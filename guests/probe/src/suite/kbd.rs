//! `probe.test=kbd probe.n=N`: waits for Ctrl-Alt-Del on the i8042 keyboard (the API's
//! `SendCtrlAltDel`), polling the controller's status port at most N times, then does what a
//! guest kernel does on Ctrl-Alt-Del: resets the machine through the i8042 (command 0xfe on
//! port 0x64), which ends the VMM with status 0. Prints each scancode it reads.
//!
//! Scancode set 2, as a PS/2 keyboard sends it: Ctrl 0x14, Alt 0x11, Del 0xe0 0x71; a break
//! (release) is prefixed by 0xf0. Ctrl-Alt-Del is all three held down at once.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"kbd", run };

/// Default N: about 30 s of polls under PVM (one exit each).
pub const DEFAULT_POLLS: u64 = 3_000_000;
/// i8042 data port.
const DATA: u16 = 0x60;
/// i8042 status (read) and command (write) port.
const STATUS: u16 = 0x64;
/// Status bit: a byte waits in the data port.
const OBF: u8 = 0x01;
/// Controller command: pulse the reset line.
const RESET: u8 = 0xfe;

/// Which of Ctrl, Alt and Del are held, from a stream of set-2 scancodes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    ctrl: bool,
    alt: bool,
    del: bool,
    extended: bool,
    release: bool,
}

impl Keys {
    /// Takes one scancode byte.
    pub fn feed(&mut self, byte: u8) {
        match byte {
            0xe0 => self.extended = true,
            0xf0 => self.release = true,
            code => {
                let down = !self.release;
                match (self.extended, code) {
                    (_, 0x14) => self.ctrl = down,
                    (_, 0x11) => self.alt = down,
                    (true, 0x71) => self.del = down,
                    _ => {}
                }
                self.extended = false;
                self.release = false;
            }
        }
    }

    /// Whether Ctrl, Alt and Del are all down.
    pub fn ctrl_alt_del(&self) -> bool {
        self.ctrl && self.alt && self.del
    }
}

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let polls = match params.num(b"n", DEFAULT_POLLS, 1, u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    con.str(b"kbd: waiting for ctrl-alt-del").nl();
    let mut keys = Keys::default();
    for _ in 0..polls {
        if con.machine().inb(STATUS) & OBF == 0 {
            continue;
        }
        let byte = con.machine().inb(DATA);
        con.str(b"kbd: scancode ").hex(u64::from(byte)).nl();
        keys.feed(byte);
        if keys.ctrl_alt_del() {
            con.str(b"kbd: ctrl-alt-del, resetting").nl();
            con.machine().outb(STATUS, RESET);
            // The VMM stops at the reset; a VMM without one leaves the probe to fail.
            return Verdict::Fail;
        }
    }
    con.str(b"kbd: no ctrl-alt-del").nl();
    Verdict::Fail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::testing::FakeMachine;
    use crate::probe_main;

    #[test]
    fn ctrl_alt_del_is_recognised_in_set_2() {
        let mut k = Keys::default();
        for b in [0x14, 0x11, 0xe0] {
            k.feed(b);
            assert!(!k.ctrl_alt_del());
        }
        k.feed(0x71);
        assert!(k.ctrl_alt_del());
        // Released, then a plain 0x71 (keypad '.') is not Del.
        for b in [0xe0, 0xf0, 0x71, 0x71] {
            k.feed(b);
        }
        assert!(!k.ctrl_alt_del());
    }

    #[test]
    fn resets_on_ctrl_alt_del() {
        let mut m = FakeMachine {
            kbd: Some([0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71].into_iter().collect()),
            ..FakeMachine::default()
        };
        probe_main(&mut m, b"probe.test=kbd probe.n=100");
        assert!(m.outs.contains(&(0x64, 0xfe)), "reset through the i8042");
        assert!(m.output().contains("kbd: ctrl-alt-del, resetting"));
    }

    #[test]
    fn gives_up_after_n_polls() {
        let mut m = FakeMachine { kbd: Some(Default::default()), ..FakeMachine::default() };
        let v = probe_main(&mut m, b"probe.test=kbd probe.n=50");
        assert_eq!(v, Verdict::Fail);
        assert_eq!(m.ins.iter().filter(|&&p| p == 0x64).count(), 50);
        assert!(!m.outs.contains(&(0x64, 0xfe)));
    }
}
