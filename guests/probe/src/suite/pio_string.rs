//! `probe.test=pio-string probe.n=N [probe.port=0x3f8]`: N `rep outsb` of a 16-byte line to the
//! port, each one exit carrying all 16 bytes (an access wider than any register, which a VMM
//! must refuse without flooding its log). Prints `pio-string: port=0x3f8 n=N bytes=B`.

use super::Test;
use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// Registry entry.
pub const TEST: Test = Test { name: b"pio-string", run };

/// Default N.
pub const DEFAULT_N: u64 = 1000;
/// Default port: COM1's transmitter.
pub const DEFAULT_PORT: u16 = 0x3f8;
/// What each string instruction writes.
const LINE: &[u8; 16] = b"rep-outsb-line.\n";

fn run(con: &mut Console<'_>, params: &Params<'_>) -> Verdict {
    let n = match params.num(b"n", DEFAULT_N, 1, 1 << 24) {
        Ok(n) => n,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    let port = match params.port(b"port", DEFAULT_PORT) {
        Ok(p) => p,
        Err(e) => {
            e.print(con);
            return Verdict::BadArgs;
        }
    };
    let m = con.machine();
    for _ in 0..n {
        m.out_string(port, LINE);
    }
    con.str(b"pio-string: port=").hex(u64::from(port)).str(b" n=").dec(n).str(b" bytes=").dec(n * 16).nl();
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use crate::machine::testing::FakeMachine;
    use crate::{probe_main, Verdict};

    #[test]
    fn writes_n_lines_to_the_port() {
        let mut m = FakeMachine::default();
        let v = probe_main(&mut m, b"probe.test=pio-string probe.n=3 probe.port=0x80");
        assert_eq!(v, Verdict::Pass);
        let line: Vec<u8> = m.outs.iter().filter(|(p, _)| *p == 0x80).map(|(_, b)| *b).collect();
        assert_eq!(line, b"rep-outsb-line.\n".repeat(3));
        assert!(m.output().contains("pio-string: port=0x80 n=3 bytes=48\n"), "{}", m.output());
    }
}
