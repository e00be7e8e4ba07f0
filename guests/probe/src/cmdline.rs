//! Kernel command-line parsing: `probe.test=NAME` and `probe.KEY=VALUE`; other words (a VMM's
//! own parameters) are ignored. Numbers are decimal or `0x` hex. The command line is
//! guest-memory input: every length is bounded and nothing here can panic.

use crate::console::Console;

/// Most `probe.*` parameters kept (besides `probe.test`).
pub const MAX_PARAMS: usize = 16;
/// Prefix of our parameters.
pub const PREFIX: &[u8] = b"probe.";

/// Why a command line or a parameter was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError<'a> {
    /// More than [`MAX_PARAMS`] `probe.*` parameters.
    TooMany,
    /// `probe.KEY=VALUE` where VALUE is not a decimal or `0x` hex u64.
    NotANumber {
        /// The KEY.
        key: &'a [u8],
        /// The VALUE as given.
        value: &'a [u8],
    },
    /// A number outside the range the test accepts.
    OutOfRange {
        /// The KEY.
        key: &'a [u8],
        /// The VALUE as given.
        value: &'a [u8],
    },
}

impl ParamError<'_> {
    /// Prints one `probe: ...` line describing the error.
    pub fn print(&self, con: &mut Console<'_>) {
        match *self {
            ParamError::TooMany => {
                con.str(b"probe: bad arguments: more than ").dec(MAX_PARAMS as u64).str(b" probe.* parameters");
            }
            ParamError::NotANumber { key, value } => {
                con.str(b"probe: bad argument probe.").untrusted(key).str(b"=").untrusted(value).str(b": not a number");
            }
            ParamError::OutOfRange { key, value } => {
                con.str(b"probe: bad argument probe.").untrusted(key).str(b"=").untrusted(value).str(b": out of range");
            }
        }
        con.nl();
    }
}

/// The parsed `probe.*` parameters; slices borrow the command line.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    raw: &'a [u8],
    test: Option<&'a [u8]>,
    entries: [(&'a [u8], &'a [u8]); MAX_PARAMS],
    len: usize,
}

impl<'a> Params<'a> {
    /// Parses a command line. A later duplicate of a key wins.
    pub fn parse(cmdline: &'a [u8]) -> Result<Self, ParamError<'a>> {
        let mut p = Params { raw: cmdline, test: None, entries: [(&[][..], &[][..]); MAX_PARAMS], len: 0 };
        for word in cmdline.split(|b| b.is_ascii_whitespace() || *b == 0) {
            let Some(rest) = word.strip_prefix(PREFIX) else {
                continue;
            };
            let (key, value) = match rest.iter().position(|&b| b == b'=') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            if key == b"test" {
                p.test = Some(value);
                continue;
            }
            let slot = p.entries.get_mut(p.len).ok_or(ParamError::TooMany)?;
            *slot = (key, value);
            p.len += 1;
        }
        Ok(p)
    }

    /// The whole command line (for words that are not `probe.*`, e.g. `virtio_mmio.device=`).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Every whitespace-separated word of the command line.
    pub fn words(&self) -> impl Iterator<Item = &'a [u8]> {
        self.raw.split(|b| b.is_ascii_whitespace() || *b == 0).filter(|w| !w.is_empty())
    }

    /// The `probe.test=` value, if given.
    pub fn test(&self) -> Option<&'a [u8]> {
        self.test
    }

    /// The raw value of `probe.KEY` (the last one if repeated).
    pub fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.entries.get(..self.len)?.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// `probe.KEY` as a number in `min..=max`, or `default` when absent.
    pub fn num(&self, key: &'a [u8], default: u64, min: u64, max: u64) -> Result<u64, ParamError<'a>> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let n = parse_u64(value).ok_or(ParamError::NotANumber { key, value })?;
        if n < min || n > max {
            return Err(ParamError::OutOfRange { key, value });
        }
        Ok(n)
    }

    /// `probe.KEY` as a 16-bit value (an I/O port), or `default` when absent.
    pub fn port(&self, key: &'a [u8], default: u16) -> Result<u16, ParamError<'a>> {
        let n = self.num(key, u64::from(default), 0, u64::from(u16::MAX))?;
        u16::try_from(n).map_err(|_| ParamError::OutOfRange { key, value: self.get(key).unwrap_or(&[]) })
    }
}

/// Parses a decimal or `0x`/`0X` hex u64; `None` on empty input, stray characters or overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16u64),
        _ => (s, 10u64),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        n = n.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// Strips leading and trailing ASCII whitespace and NULs.
pub fn trim(s: &[u8]) -> &[u8] {
    let junk = |b: &u8| b.is_ascii_whitespace() || *b == 0;
    let start = s.iter().position(|b| !junk(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !junk(b)).map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"100000"), Some(100_000));
        assert_eq!(parse_u64(b"0x3fd"), Some(0x3fd));
        assert_eq!(parse_u64(b"0X3FD"), Some(0x3fd));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"0x10000000000000000"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"0x"), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_u64(b"-1"), None);
    }

    #[test]
    fn picks_probe_words_and_ignores_the_rest() {
        let cmd = b"console=ttyS0 reboot=k probe.test=pio-loop  probe.n=100 probe.port=0x80 panic=1";
        let p = Params::parse(cmd).expect("parses");
        assert_eq!(p.test(), Some(&b"pio-loop"[..]));
        assert_eq!(p.num(b"n", 7, 1, u64::MAX), Ok(100));
        assert_eq!(p.num(b"port", 0x3fd, 0, 0xffff), Ok(0x80));
        assert_eq!(p.port(b"port", 0x3fd), Ok(0x80));
        assert_eq!(p.port(b"other", 0x3fd), Ok(0x3fd));
        assert_eq!(p.num(b"delay", 7, 0, 10), Ok(7));
        assert_eq!(p.get(b"console"), None);
    }

    #[test]
    fn last_duplicate_wins_and_errors_name_the_key() {
        let p = Params::parse(b"probe.n=1 probe.n=2 probe.x=zz probe.big=70000").expect("parses");
        assert_eq!(p.num(b"n", 0, 0, 10), Ok(2));
        assert_eq!(p.num(b"x", 0, 0, 10), Err(ParamError::NotANumber { key: b"x", value: b"zz" }));
        assert_eq!(p.num(b"big", 0, 0, 0xffff), Err(ParamError::OutOfRange { key: b"big", value: b"70000" }));
    }

    #[test]
    fn too_many_params_is_an_error() {
        let mut cmd = String::new();
        for i in 0..=MAX_PARAMS {
            cmd.push_str(&format!("probe.k{i}=1 "));
        }
        assert_eq!(Params::parse(cmd.as_bytes()).err(), Some(ParamError::TooMany));
    }

    #[test]
    fn valueless_key_is_empty() {
        let p = Params::parse(b"probe.flag probe.test").expect("parses");
        assert_eq!(p.get(b"flag"), Some(&b""[..]));
        assert_eq!(p.test(), Some(&b""[..]));
    }

    #[test]
    fn trims() {
        assert_eq!(trim(b"  a b \n\0"), b"a b");
        assert_eq!(trim(b"   "), b"");
        assert_eq!(trim(b""), b"");
    }
}
