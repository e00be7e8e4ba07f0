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
            std::process::id(),
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
