//! Fault injection as a user-facing feature: deterministic schedules (`--fault`). Faults on
//! demand go through the API (`PUT /bulkhead/devices/{id}/fault`, `bulkhead fault`).
//!
//! Schedules are time-based: `after=` and `every=` count from the moment the vCPUs start. Every
//! injection is logged (with the logger's timestamp) by [`ServiceRef::inject`], every recovery by
//! the supervisor.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc::control::{FaultAction, ServiceMetrics};

use crate::service::ServiceRef;

/// Errors of the API socket and its client.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Spawning a thread failed.
    #[error("spawning the {0} thread")]
    Thread(&'static str, #[source] io::Error),
}

/// Which schedule kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Always the same fault.
    Fixed(FaultAction),
    /// A fault chosen among kill/crash/abort/segv/hang by a PRNG seeded with this value; the
    /// interval is also randomised, uniformly within ±50 % of `every`.
    Random(u64),
}

/// One `--fault` argument: `DEVICE:ACTION[,after=DUR][,every=DUR][,count=N]`,
/// `DEVICE:random,seed=S,every=DUR[,after=DUR][,count=N]` or `DEVICE:ACTION-after=MS`.
/// DUR is `Nms`, `Ns` or a bare number of ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSchedule {
    /// Device (`console`, `block`, `blockN` or a service name).
    pub device: String,
    /// What to inject.
    pub kind: ScheduleKind,
    /// First injection, after the vCPUs start.
    pub after: Duration,
    /// Interval of repeated injections (`None`: once).
    pub every: Option<Duration>,
    /// Most injections (`None`: unlimited while `every` is set).
    pub count: Option<u64>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let n: u64 = num.parse().map_err(|_| format!("bad duration `{s}` (e.g. 500ms, 2s)"))?;
    let ms = n.checked_mul(mult).filter(|&ms| ms <= 86_400_000).ok_or("duration above a day")?;
    Ok(Duration::from_millis(ms))
}

impl FaultSchedule {
    /// Parses one `--fault` argument (see the type's docs).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (device, rest) = s.split_once(':').ok_or("expected DEVICE:ACTION[,after=DUR][,every=DUR][,count=N]")?;
        if device.is_empty() {
            return Err("empty device name".into());
        }
        let mut parts = rest.split(',');
        let head = parts.next().unwrap_or_default();
        let mut after = Duration::ZERO;
        let (mut kind, mut random) = (None, false);
        if head == "random" {
            random = true;
        } else if let Some((action, ms)) = head.rsplit_once("-after=") {
            kind = Some(ScheduleKind::Fixed(FaultAction::parse(action)?));
            after = parse_duration(ms)?;
        } else {
            kind = Some(ScheduleKind::Fixed(FaultAction::parse(head)?));
        }
        let (mut every, mut count, mut seed) = (None, None, None);
        for opt in parts {
            match opt.split_once('=') {
                Some(("after", v)) => after = parse_duration(v)?,
                Some(("every", v)) => {
                    let d = parse_duration(v)?;
                    if d < Duration::from_millis(1) {
                        return Err("every= must be at least 1 ms".into());
                    }
                    every = Some(d);
                }
                Some(("count", v)) => count = Some(v.parse().map_err(|_| format!("bad count `{v}`"))?),
                Some(("seed", v)) if random => seed = Some(v.parse().map_err(|_| format!("bad seed `{v}`"))?),
                _ => return Err(format!("unknown fault option `{opt}` (after=, every=, count=, seed= for random)")),
            }
        }
        if random {
            let seed = seed.ok_or("random needs seed=S")?;
            if every.is_none() {
                return Err("random needs every=DUR".into());
            }
            kind = Some(ScheduleKind::Random(seed));
        }
        let kind = kind.ok_or("no fault action")?;
        Ok(Self { device: device.to_string(), kind, after, every, count })
    }
}

impl std::fmt::Display for FaultSchedule {
    /// The form [`FaultSchedule::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ScheduleKind::Fixed(action) => write!(f, "{}:{action}", self.device)?,
            ScheduleKind::Random(seed) => write!(f, "{}:random,seed={seed}", self.device)?,
        }
        if !self.after.is_zero() {
            write!(f, ",after={}ms", self.after.as_millis())?;
        }
        if let Some(every) = self.every {
            write!(f, ",every={}ms", every.as_millis())?;
        }
        if let Some(count) = self.count {
            write!(f, ",count={count}")?;
        }
        Ok(())
    }
}

/// A deterministic 64-bit PRNG step (splitmix64).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The faults a random schedule chooses among.
pub const RANDOM_FAULTS: [FaultAction; 5] =
    [FaultAction::Kill, FaultAction::Crash, FaultAction::Abort, FaultAction::Segv, FaultAction::Hang];

/// The `(delay since the previous injection, fault)` sequence of a schedule, bounded by `limit`
/// entries.
pub fn plan(s: &FaultSchedule, limit: usize) -> Vec<(Duration, FaultAction)> {
    let mut out = Vec::new();
    let mut rng = match s.kind {
        ScheduleKind::Random(seed) => seed,
        ScheduleKind::Fixed(_) => 0,
    };
    let n = match (s.every, s.count) {
        (None, _) => 1,
        (Some(_), Some(c)) => usize::try_from(c).unwrap_or(usize::MAX).min(limit),
        (Some(_), None) => limit,
    };
    for i in 0..n {
        let (gap, action) = match s.kind {
            ScheduleKind::Fixed(a) => (if i == 0 { s.after } else { s.every.unwrap_or_default() }, a),
            ScheduleKind::Random(_) => {
                let every = s.every.unwrap_or(Duration::from_secs(1));
                let r = splitmix64(&mut rng);
                let action = RANDOM_FAULTS[usize::try_from(r % 5).unwrap_or(0)];
                let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
                let jitter = Duration::from_millis(ms / 2 + (r >> 32) % ms.max(1));
                (if i == 0 { s.after + jitter } else { jitter }, action)
            }
        };
        out.push((gap, action));
    }
    out
}

/// Longest a scheduled or requested injection waits for a live instance of its service.
const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// The `--fault` schedules, run on a thread of their own (started before the main thread's
/// seccomp filter; it injects through the supervisor's handles). Dropping it stops and joins the
/// thread.
#[derive(Debug)]
pub struct ScheduleThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScheduleThread {
    /// Starts the thread for `schedules`, each with the service of the device it names; `None`
    /// when there is nothing to schedule.
    pub fn start(schedules: Vec<(ServiceRef, FaultSchedule)>, confine: bool) -> Result<Option<Self>, FaultError> {
        if schedules.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("faults".into())
            .spawn(move || {
                if confine {
                    crate::jail::confine_or_abort(bulkhead_policies::Policy::CoreFaults);
                }
                run_schedules(&schedules, &flag)
            })
            .map_err(|e| FaultError::Thread("fault schedule", e))?;
        Ok(Some(Self { stop, thread: Some(thread) }))
    }
}

impl Drop for ScheduleThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_schedules(schedules: &[(ServiceRef, FaultSchedule)], stop: &AtomicBool) {
    let start = Instant::now();
    // (due, schedule index, action), bounded: 100 000 injections per schedule at most.
    let mut due: Vec<(Duration, usize, FaultAction)> = Vec::new();
    for (i, (_, s)) in schedules.iter().enumerate() {
        let mut at = Duration::ZERO;
        for (gap, action) in plan(s, 100_000) {
            at += gap;
            due.push((at, i, action));
        }
    }
    due.sort_by_key(|d| d.0);
    // Per service: the instance the last fatal injection went to.
    let mut doomed: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for (at, i, action) in due {
        // Bounded sleep in 50 ms slices so a stop is seen.
        while start.elapsed() < at {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(at.saturating_sub(start.elapsed()).min(Duration::from_millis(50)));
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (svc, schedule) = &schedules[i];
        let name = &schedule.device;
        if svc.device().is_failed() {
            continue;
        }
        // An injection due while the previous one's restart is under way waits for the new
        // instance (bounded), so every scheduled fault that ends an instance ends a different one.
        let not_pid = doomed.get(svc.name()).copied();
        if !svc.wait_alive(not_pid, HOLD_LIMIT) {
            log::warn!("fault injection ({action}) into {name} skipped: no live instance within {HOLD_LIMIT:?}");
            continue;
        }
        let pid = svc.pid();
        match svc.inject(action) {
            Ok(_) if action.is_fatal() => {
                doomed.insert(svc.name().to_string(), pid);
            }
            Ok(_) => {}
            Err(e) => log::warn!("fault injection ({action}) into {name} failed: {e}"),
        }
    }
}

/// Formats metrics as `bulkhead stats` prints them (one line per service).
pub fn format_metrics(m: &ServiceMetrics) -> String {
    let ms = |us: Option<u64>| us.map_or_else(|| "-".to_string(), |u| format!("{:.2} ms", u as f64 / 1000.0));
    format!(
        "service {} (pid {}): {} restarts (death to serving: last {}, median {}, max {}), {} exits forwarded, \
         {} redone, {} failed, {} device requests redone{}",
        m.name,
        m.pid,
        m.restarts,
        ms(m.last_restart_us),
        ms(m.median_restart_us),
        ms(m.max_restart_us),
        m.exits_forwarded,
        m.exits_redone,
        m.exits_failed,
        m.requests_redone,
        m.failed.as_ref().map_or_else(String::new, |f| format!("; FAILED: {f}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse() {
        let s = FaultSchedule::parse("block:crash-after=1000").expect("parse");
        assert_eq!(s.kind, ScheduleKind::Fixed(FaultAction::Crash));
        assert_eq!((s.after, s.every), (Duration::from_secs(1), None));
        let s = FaultSchedule::parse("console:kill,every=500ms,count=3,after=2s").expect("parse");
        assert_eq!(s.every, Some(Duration::from_millis(500)));
        assert_eq!((s.after, s.count), (Duration::from_secs(2), Some(3)));
        let s = FaultSchedule::parse("block1:random,seed=42,every=200").expect("parse");
        assert_eq!(s.kind, ScheduleKind::Random(42));
        assert_eq!(
            FaultSchedule::parse("block:slow=20").expect("parse").kind,
            ScheduleKind::Fixed(FaultAction::Slow { ms: 20 })
        );
        for bad in [
            "crash",
            ":crash",
            "block:boom",
            "block:random,every=1s",
            "block:random,seed=1",
            "block:crash,every=0",
            "block:crash,seed=3",
            "block:crash,every=99999999s",
        ] {
            assert!(FaultSchedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_are_deterministic_and_bounded() {
        let s = FaultSchedule::parse("block:crash,after=100,every=50,count=3").expect("parse");
        let p = plan(&s, 10);
        let gaps: Vec<u64> = p.iter().map(|(d, _)| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).collect();
        assert_eq!(gaps, [100, 50, 50]);
        assert_eq!(plan(&FaultSchedule::parse("block:crash,every=5").expect("parse"), 7).len(), 7);
        let r = FaultSchedule::parse("block:random,seed=7,every=100").expect("parse");
        let (a, b) = (plan(&r, 50), plan(&r, 50));
        assert_eq!(a, b, "same seed, same plan");
        assert!(a.iter().all(|(d, _)| *d >= Duration::from_millis(50) && *d < Duration::from_millis(150)));
        let kinds: std::collections::HashSet<_> = a.iter().map(|(_, k)| *k).collect();
        assert!(kinds.len() >= 4, "a seeded random schedule mixes faults: {kinds:?}");
        let other = plan(&FaultSchedule::parse("block:random,seed=8,every=100").expect("parse"), 50);
        assert_ne!(a, other);
        for text in [
            "block:crash-after=1000",
            "console:kill,every=500ms,count=3,after=2s",
            "net1:random,seed=7,every=1s",
            "block:slow=20",
        ] {
            let s = FaultSchedule::parse(text).expect("parse");
            assert_eq!(FaultSchedule::parse(&s.to_string()), Ok(s), "{text}");
        }
    }
}
