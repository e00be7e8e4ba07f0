//! A small logger for the core: one line per record on stderr, with the time since start.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

struct Logger {
    start: Instant,
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
            std::process::id(),
            t.as_secs(),
            t.subsec_millis(),
            record.level(),
            record.args()
        );
        // One write per record so lines from several threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`. Later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let logger = LOGGER.get_or_init(|| Logger { start: Instant::now() });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}
