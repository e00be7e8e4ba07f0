//! A small logger for the core: one line per record, with the time since start, on stderr or on
//! the file or FIFO `PUT /logger` names (opened once, before the VM starts).

use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

struct Logger {
    start: Instant,
    /// Where lines go instead of stderr.
    sink: Mutex<Option<File>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let line = format!(
            "bulkhead[{}] {:>4}.{:03}s {:<5} {}\n",
            crate::pidns::host_pid(),
            t.as_secs(),
            t.subsec_millis(),
            record.level(),
            record.args()
        );
        // One write per record so lines from several threads do not interleave.
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        match sink.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger { start: Instant::now(), sink: Mutex::new(None) })
}

/// Installs the logger at `level`. Later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(logger());
    log::set_max_level(level);
}

/// Sends every later line to `file` (a regular file or a FIFO, opened for writing) instead of
/// stderr.
pub fn redirect(file: File) {
    *logger().sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

/// Lines one call site may log per [`LineBudget::WINDOW`] before further lines are counted
/// instead of written.
const BURST: u32 = 10;

/// The log budget of one call site whose line a guest or a peer can trigger at will (an odd
/// access per exit, a forged message per millisecond): at most [`BURST`] lines per
/// [`LineBudget::WINDOW`]; the rest are counted, and the next line written says how many were
/// left out. Used through [`warn_limited!`](crate::warn_limited).
#[derive(Debug)]
pub struct LineBudget(Mutex<BudgetState>);

#[derive(Debug)]
struct BudgetState {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LineBudget {
    /// Length of one budget window.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    /// A full budget.
    pub const fn new() -> Self {
        Self(Mutex::new(BudgetState { window_start: None, used: 0, suppressed: 0 }))
    }

    /// Whether a line may be written at `now`: `Some(n)` with the lines left out since the last
    /// one written, or `None` (the line is counted as left out).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.window_start.is_none_or(|t| now.saturating_duration_since(t) >= Self::WINDOW) {
            s.window_start = Some(now);
            s.used = 0;
        }
        if s.used >= BURST {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        s.used += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LineBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` with a per-call-site [`LineBudget`]: for every line a guest, a service or a
/// client can make the core write, so that none of them can flood the host's log.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static BUDGET: $crate::logger::LineBudget = $crate::logger::LineBudget::new();
        if let Some(left_out) = BUDGET.admit(std::time::Instant::now()) {
            if left_out == 0 {
                log::warn!($($arg)+);
            } else {
                log::warn!("{} ({left_out} similar lines left out)", format_args!($($arg)+));
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget_admits_a_burst_per_window_and_counts_the_rest() {
        let b = LineBudget::new();
        let t0 = Instant::now();
        for i in 0..BURST {
            assert_eq!(b.admit(t0 + Duration::from_millis(u64::from(i))), Some(0), "line {i} of the burst");
        }
        for _ in 0..1000 {
            assert_eq!(b.admit(t0 + Duration::from_secs(1)), None, "past the burst");
        }
        // Next window: the first line written reports what was left out, then the count restarts.
        let t1 = t0 + LineBudget::WINDOW;
        assert_eq!(b.admit(t1), Some(1000));
        assert_eq!(b.admit(t1), Some(0));
    }
}
