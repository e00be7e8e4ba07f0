//! The probe's tests and their registry. To add one: write a module with a
//! `pub const TEST: Test` and list it in [`TESTS`].

mod blk_bench;
mod blk_check;
pub mod blk_common;
mod blk_ro;
mod blk_stall;
#[cfg(test)]
mod blk_tests;
mod blk_verify;
mod hello;
mod idle;
mod kbd;
mod net_bench;
pub mod net_common;
mod net_echo;
mod net_info;
mod net_reflect;
#[cfg(test)]
mod net_tests;
mod pio_loop;
mod pio_string;
mod spin;
mod ticker;

use crate::cmdline::Params;
use crate::console::Console;
use crate::Verdict;

/// A test selectable with `probe.test=NAME`.
pub struct Test {
    /// The NAME in `probe.test=NAME`.
    pub name: &'static [u8],
    /// Runs the test; prints its own lines, not the verdict line.
    pub run: fn(&mut Console<'_>, &Params<'_>) -> Verdict,
}

/// Every test, in the order listed by `probe: tests:`.
pub static TESTS: &[Test] = &[
    hello::TEST,
    pio_loop::TEST,
    pio_string::TEST,
    ticker::TEST,
    blk_verify::TEST,
    blk_ro::TEST,
    blk_bench::TEST,
    blk_check::TEST,
    blk_stall::TEST,
    net_info::TEST,
    net_echo::TEST,
    net_reflect::TEST,
    net_bench::TEST,
    kbd::TEST,
    idle::TEST,
    spin::TEST,
];

/// The test called `name`.
pub fn find(name: &[u8]) -> Option<&'static Test> {
    TESTS.iter().find(|t| t.name == name)
}

/// Prints ` NAME` for every test.
pub fn print_names(con: &mut Console<'_>) {
    for t in TESTS {
        con.str(b" ").str(t.name);
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, t) in TESTS.iter().enumerate() {
            assert!(TESTS[i + 1..].iter().all(|u| u.name != t.name));
            assert!(core::ptr::eq(find(t.name).expect("listed"), t));
        }
        assert!(find(b"hello").is_some());
        assert!(find(b"nope").is_none());
    }
}
