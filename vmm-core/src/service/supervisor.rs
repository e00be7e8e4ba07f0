//! Restart policy and metrics of supervised services.
//!
//! The supervisor thread itself lives in the parent module (it needs the private parts of
//! [`RemoteDevice`](super::RemoteDevice)); this module holds the pure decisions: when to restart,
//! after how long, and when to give up, plus the death → serving latency bookkeeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When and how often a dead, hung or misbehaving service is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Most restarts within [`window`](Self::window); one more failure marks the device failed.
    /// 0 disables supervision: the first failure marks the device failed (fail closed).
    pub max_restarts: u32,
    /// The sliding window of the cap.
    pub window: Duration,
    /// Failures within [`burst_window`](Self::burst_window) tolerated before backing off.
    pub burst: u32,
    /// The window of the burst count.
    pub burst_window: Duration,
    /// First backoff delay; doubles with every further failure in the burst window.
    pub backoff_min: Duration,
    /// Longest backoff delay.
    pub backoff_max: Duration,
    /// How long a vCPU whose exit was in flight waits for the next instance before giving up
    /// (the access then completes with all-ones / is dropped).
    pub restart_wait: Duration,
}

impl RestartPolicy {
    /// No restarts: the first failure marks the device failed.
    pub const DISABLED: Self = Self {
        max_restarts: 0,
        window: Duration::from_secs(10),
        burst: 3,
        burst_window: Duration::from_secs(1),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_secs(1),
        restart_wait: Duration::from_secs(5),
    };

    /// The default of `bulkhead run`: at most 20 restarts per 10 s, immediate restarts for up to
    /// 3 failures per second, then 10 ms, 20 ms, ... up to 1 s of backoff.
    pub fn standard() -> Self {
        Self { max_restarts: 20, ..Self::DISABLED }
    }

    /// A cap of `max` restarts per `window`, the rest as [`standard`](Self::standard).
    pub fn with_cap(max: u32, window: Duration) -> Self {
        Self { max_restarts: max, window, ..Self::standard() }
    }

    /// Whether failures lead to restarts at all.
    pub fn enabled(&self) -> bool {
        self.max_restarts > 0
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self::DISABLED
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a fresh instance after this delay (zero: at once).
    Restart(Duration),
    /// Give up: the device is marked failed, for the reason given.
    GiveUp(String),
}

/// Sliding-window failure count behind [`RestartPolicy`].
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    failures: VecDeque<Instant>,
}

impl RestartTracker {
    /// A tracker for `policy` with no failures yet.
    pub fn new(policy: RestartPolicy) -> Self {
        Self { policy, failures: VecDeque::new() }
    }

    /// Replaces the policy (a live change); the failures seen so far still count.
    pub fn set_policy(&mut self, policy: RestartPolicy) {
        self.policy = policy;
    }

    /// Records a failure at `now` and decides.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        let p = self.policy;
        if !p.enabled() {
            return Decision::GiveUp("restarts are disabled".into());
        }
        self.failures.push_back(now);
        // Bounded: the deque holds at most max_restarts + 1 entries (older ones are dropped).
        while self.failures.front().is_some_and(|&t| now.duration_since(t) > p.window) {
            self.failures.pop_front();
        }
        let max = usize::try_from(p.max_restarts).unwrap_or(usize::MAX);
        if self.failures.len() > max {
            return Decision::GiveUp(format!(
                "{} failures within {:?} (the cap is {} restarts per {:?})",
                self.failures.len(),
                p.window,
                p.max_restarts,
                p.window
            ));
        }
        let recent = self.failures.iter().filter(|&&t| now.duration_since(t) <= p.burst_window).count();
        let burst = usize::try_from(p.burst).unwrap_or(usize::MAX);
        if recent <= burst {
            return Decision::Restart(Duration::ZERO);
        }
        let doublings = u32::try_from(recent - burst - 1).unwrap_or(u32::MAX).min(16);
        Decision::Restart(p.backoff_min.saturating_mul(1 << doublings).min(p.backoff_max))
    }
}

/// Restart metrics of one service.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Instances started after the first.
    pub restarts: u32,
    /// Death (or detection of a hang/violation) → new instance ready, per restart (the last
    /// [`LATENCY_SAMPLES`] kept).
    pub latencies: VecDeque<Duration>,
    /// Why the device was marked failed, once it is.
    pub failed: Option<String>,
    /// Requests found in flight in the state region and redone, summed over the instances
    /// that have been replaced (the current one's count is on its control channel).
    pub redone_by_earlier: u64,
    /// Why the last instance that failed failed.
    pub last_failure: Option<String>,
}

/// Latency samples kept per service.
pub const LATENCY_SAMPLES: usize = 4096;

impl Metrics {
    /// Records one restart that took `latency`.
    pub fn record(&mut self, latency: Duration) {
        self.restarts = self.restarts.saturating_add(1);
        if self.latencies.len() == LATENCY_SAMPLES {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
    }

    /// `(last, median, max)` of the recorded latencies.
    pub fn summary(&self) -> Option<(Duration, Duration, Duration)> {
        let last = *self.latencies.back()?;
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let max = sorted[sorted.len() - 1];
        Some((last, median, max))
    }
}

/// The liveness check of one instance: a `Ping` every [`interval`](Self::new) on the control
/// channel, which must be answered (`Pong`) within the deadline. It catches a hung service that
/// has no exit in flight (a guest that only polls shared memory never forwards one). Pure
/// bookkeeping: the supervisor thread sends the pings and reports the pongs it saw.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    deadline: Duration,
    /// How long one I/O call of the service may take before it counts as hung.
    io_deadline: Duration,
    state: Probe,
    /// The service's heartbeat at the last look.
    last_beat: Option<u64>,
    /// How long the service had been inside an I/O call at the last look.
    in_io: Option<Duration>,
    /// When the service was last inside an I/O call (seen, or as it said when the call ended):
    /// an outstanding ping's deadline counts from there, since it could not answer before.
    io_last_seen: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// No ping outstanding; the next one is due at this time.
    Idle { next: Instant },
    /// Ping `token` was sent at `sent`.
    Waiting { token: u64, sent: Instant },
}

/// What the supervisor should do about liveness now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivenessStep {
    /// Nothing before this time (sleep at most until then).
    WaitUntil(Instant),
    /// Send a ping now and report it with [`Liveness::sent`].
    SendPing,
    /// The outstanding ping was not answered in time: the instance is hung.
    Missed(String),
}

impl Liveness {
    /// A check every `interval` (zero: disabled) with `deadline` for each answer, for an instance
    /// that became ready at `now` (the first ping is due one interval later).
    pub fn new(interval: Duration, deadline: Duration, now: Instant) -> Self {
        Self {
            interval,
            deadline,
            io_deadline: Duration::ZERO,
            state: Probe::Idle { next: now + interval },
            last_beat: None,
            in_io: None,
            io_last_seen: None,
        }
    }

    /// A service inside an I/O call (a slow disk) is not hung until that call has lasted
    /// `io_deadline`: its ping waits for it (zero: no allowance).
    pub fn with_io_deadline(mut self, io_deadline: Duration) -> Self {
        self.io_deadline = io_deadline;
        self
    }

    /// Whether I/O calls buy time at all (an I/O deadline was set).
    fn io_allowed(&self) -> bool {
        !self.io_deadline.is_zero()
    }

    /// Since when an answer to a ping sent at `sent` is due: `sent`, or the end of an I/O call
    /// that kept the service busy after it.
    fn answer_from(&self, sent: Instant) -> Instant {
        match self.io_last_seen {
            Some(t) if self.io_allowed() => t.max(sent),
            _ => sent,
        }
    }

    /// What the ring says at `now` about the service's I/O calls ([`ipc::IoMarker`]).
    pub fn note_io(&mut self, now: Instant, io: ipc::IoState) {
        let seen = match io {
            ipc::IoState::None => None,
            ipc::IoState::Inside(_) => Some(now),
            ipc::IoState::EndedAgo(e) => now.checked_sub(e),
        };
        self.in_io = match io {
            ipc::IoState::Inside(t) => Some(t),
            _ => None,
        };
        if let Some(t) = seen {
            self.io_last_seen = Some(self.io_last_seen.map_or(t, |l| l.max(t)));
        }
    }

    /// What the ring says of the service at `now`: asleep on its doorbell (inside `poll`, woken
    /// by any control message or device event), and its heartbeat. A ping that is due is put off
    /// by one interval when the service is asleep or has beaten since the last look: it is idle
    /// or working, not stuck. A service stuck in a handler does neither, and is pinged. This
    /// spares an idle VM's services (and the core) a wake-up every interval.
    pub fn note_activity(&mut self, now: Instant, asleep: bool, beat: u64) {
        let moved = self.last_beat.is_some_and(|b| b != beat);
        self.last_beat = Some(beat);
        if let Probe::Idle { next } = self.state {
            if now >= next && (asleep || moved) {
                self.state = Probe::Idle { next: now + self.interval };
            }
        }
    }

    /// Whether pings are sent at all.
    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    /// The ping `token` was sent at `now`.
    pub fn sent(&mut self, token: u64, now: Instant) {
        self.state = Probe::Waiting { token, sent: now };
    }

    /// Decides at `now`, given the highest `Pong` token seen from this instance so far (tokens
    /// grow, and a service answers its control messages in order, so a pong with a token at least
    /// the outstanding one proves the ping was handled). `None` if disabled.
    pub fn step(&mut self, now: Instant, pong_seen: u64) -> Option<LivenessStep> {
        if !self.enabled() {
            return None;
        }
        Some(match self.state {
            Probe::Idle { next } if now >= next => LivenessStep::SendPing,
            Probe::Idle { next } => LivenessStep::WaitUntil(next),
            Probe::Waiting { token, sent } if pong_seen >= token => {
                let next = sent + self.interval;
                self.state = Probe::Idle { next };
                if now >= next {
                    LivenessStep::SendPing
                } else {
                    LivenessStep::WaitUntil(next)
                }
            }
            // Inside an I/O call past the I/O deadline: hung, whatever the ping.
            Probe::Waiting { .. } if self.io_allowed() && self.in_io.is_some_and(|t| t >= self.io_deadline) => {
                LivenessStep::Missed(format!(
                    "missed I/O deadline: inside one I/O call for {} ms (limit {} ms)",
                    self.in_io.unwrap_or_default().as_millis(),
                    self.io_deadline.as_millis()
                ))
            }
            // Inside a slow I/O call: the ping is answered once it returns.
            Probe::Waiting { .. } if self.io_allowed() && self.in_io.is_some() => {
                LivenessStep::WaitUntil(now + PONG_CHECK * 10)
            }
            // The deadline counts from the ping, or from the end of an I/O call that kept the
            // service from answering it.
            Probe::Waiting { sent, .. } if now.duration_since(self.answer_from(sent)) >= self.deadline => {
                LivenessStep::Missed(format!(
                    "missed liveness deadline: no answer to a ping within {} ms",
                    self.deadline.as_millis()
                ))
            }
            // Re-check soon: a pong usually comes back within a millisecond or two.
            Probe::Waiting { sent, .. } => {
                LivenessStep::WaitUntil((now + PONG_CHECK).min(self.answer_from(sent) + self.deadline))
            }
        })
    }
}

/// How often the supervisor looks for the answer to an outstanding ping.
pub const PONG_CHECK: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_inside_slow_io_is_not_hung_until_the_io_deadline() {
        let b = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(100), Duration::from_millis(500), b)
            .with_io_deadline(Duration::from_secs(30));
        assert_eq!(l.step(at(b, 100), 0), Some(LivenessStep::SendPing));
        l.sent(1, at(b, 100));
        // Past the ping deadline, but inside a 2 s flush: keep waiting.
        l.note_io(at(b, 700), ipc::IoState::Inside(Duration::from_secs(2)));
        assert!(matches!(l.step(at(b, 700), 0), Some(LivenessStep::WaitUntil(_))));
        // The flush just returned; the service is on its way back to its control socket: the
        // ping's deadline counts from the end of the flush.
        l.note_io(at(b, 2200), ipc::IoState::EndedAgo(Duration::from_millis(10)));
        assert!(matches!(l.step(at(b, 2200), 0), Some(LivenessStep::WaitUntil(_))), "not hung yet");
        // The pong came: alive.
        assert!(matches!(l.step(at(b, 2210), 1), Some(LivenessStep::SendPing | LivenessStep::WaitUntil(_))));
        // No answer for a deadline after the flush ended: hung.
        let mut l2 = Liveness::new(Duration::from_millis(100), Duration::from_millis(500), b)
            .with_io_deadline(Duration::from_secs(30));
        l2.sent(1, b);
        l2.note_io(at(b, 3000), ipc::IoState::EndedAgo(Duration::from_millis(800)));
        assert!(matches!(l2.step(at(b, 3000), 0), Some(LivenessStep::Missed(_))));
        // The next ping meets an I/O call past its own deadline: hung.
        l.sent(2, at(b, 2300));
        l.note_io(at(b, 2900), ipc::IoState::Inside(Duration::from_secs(31)));
        assert!(matches!(l.step(at(b, 2900), 1), Some(LivenessStep::Missed(m)) if m.contains("I/O deadline")));
        // And without any I/O, the ordinary deadline.
        let mut l = Liveness::new(Duration::from_millis(100), Duration::from_millis(500), b);
        l.sent(1, b);
        assert!(matches!(l.step(at(b, 600), 0), Some(LivenessStep::Missed(m)) if m.contains("liveness deadline")));
    }

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn immediate_then_backoff_then_cap() {
        let mut t = RestartTracker::new(RestartPolicy::with_cap(6, Duration::from_secs(10)));
        let b = Instant::now();
        // Three failures in a second: immediate.
        for i in 0..3 {
            assert_eq!(t.on_failure(at(b, i * 10)), Decision::Restart(Duration::ZERO), "failure {i}");
        }
        // Then backoff doubling from 10 ms.
        assert_eq!(t.on_failure(at(b, 40)), Decision::Restart(Duration::from_millis(10)));
        assert_eq!(t.on_failure(at(b, 50)), Decision::Restart(Duration::from_millis(20)));
        // Spaced out again: no backoff (only this failure in the last second).
        assert_eq!(t.on_failure(at(b, 2000)), Decision::Restart(Duration::ZERO));
        // The 7th failure within 10 s exceeds the cap of 6.
        match t.on_failure(at(b, 2100)) {
            Decision::GiveUp(why) => assert!(why.contains("7 failures") && why.contains("cap is 6"), "{why}"),
            d => panic!("expected give-up, got {d:?}"),
        }
    }

    #[test]
    fn window_slides() {
        let mut t = RestartTracker::new(RestartPolicy::with_cap(2, Duration::from_secs(1)));
        let b = Instant::now();
        assert!(matches!(t.on_failure(at(b, 0)), Decision::Restart(_)));
        assert!(matches!(t.on_failure(at(b, 500)), Decision::Restart(_)));
        // The first one left the window.
        assert!(matches!(t.on_failure(at(b, 1200)), Decision::Restart(_)));
        assert!(matches!(t.on_failure(at(b, 1300)), Decision::GiveUp(_)));
    }

    #[test]
    fn backoff_is_capped_and_disabled_gives_up() {
        let p = RestartPolicy { burst: 0, ..RestartPolicy::with_cap(100, Duration::from_secs(10)) };
        let mut t = RestartTracker::new(p);
        let b = Instant::now();
        let mut last = Duration::ZERO;
        for i in 0..20 {
            if let Decision::Restart(d) = t.on_failure(at(b, i)) {
                last = d;
            }
        }
        assert_eq!(last, Duration::from_secs(1));
        let mut off = RestartTracker::new(RestartPolicy::DISABLED);
        assert!(matches!(off.on_failure(b), Decision::GiveUp(_)));
    }

    #[test]
    fn metrics_summary() {
        let mut m = Metrics::default();
        assert!(m.summary().is_none());
        for ms in [5, 1, 9, 3] {
            m.record(Duration::from_millis(ms));
        }
        assert_eq!(m.restarts, 4);
        assert_eq!(m.summary(), Some((Duration::from_millis(3), Duration::from_millis(5), Duration::from_millis(9))));
    }

    #[test]
    fn liveness_pings_on_schedule_and_detects_a_missed_pong() {
        let b = Instant::now();
        let (interval, deadline) = (Duration::from_millis(250), Duration::from_millis(1000));
        let mut l = Liveness::new(interval, deadline, b);
        assert!(l.enabled());
        assert_eq!(l.step(at(b, 0), 0), Some(LivenessStep::WaitUntil(at(b, 250))));
        assert_eq!(l.step(at(b, 250), 0), Some(LivenessStep::SendPing));
        l.sent(1, at(b, 251));
        // Not answered yet: re-check soon, never later than the deadline.
        assert_eq!(l.step(at(b, 252), 0), Some(LivenessStep::WaitUntil(at(b, 252) + PONG_CHECK)));
        assert_eq!(l.step(at(b, 1249), 0), Some(LivenessStep::WaitUntil(at(b, 1251))));
        // Answered: the next ping is one interval after the last one was sent.
        assert_eq!(l.step(at(b, 260), 1), Some(LivenessStep::WaitUntil(at(b, 501))));
        assert_eq!(l.step(at(b, 501), 1), Some(LivenessStep::SendPing));
        l.sent(2, at(b, 501));
        // A stale pong (an older token) proves nothing.
        assert!(matches!(l.step(at(b, 1000), 1), Some(LivenessStep::WaitUntil(_))));
        match l.step(at(b, 1501), 1) {
            Some(LivenessStep::Missed(why)) => {
                assert!(why.contains("missed liveness deadline") && why.contains("1000 ms"), "{why}")
            }
            s => panic!("expected a miss, got {s:?}"),
        }
    }

    /// A service asleep on its doorbell, or beating, is not pinged; one that does neither (stuck
    /// in a handler) is, and a missed answer is still a miss.
    #[test]
    fn liveness_spares_an_idle_or_working_service_and_pings_a_silent_one() {
        let b = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(250), Duration::from_millis(1000), b);
        l.note_activity(at(b, 250), true, 0);
        assert_eq!(l.step(at(b, 250), 0), Some(LivenessStep::WaitUntil(at(b, 500))), "asleep: no ping");
        l.note_activity(at(b, 500), false, 40);
        assert_eq!(l.step(at(b, 500), 0), Some(LivenessStep::WaitUntil(at(b, 750))), "beating: no ping");
        // Awake and the heartbeat stands still: ping, and the answer is awaited as ever.
        l.note_activity(at(b, 750), false, 40);
        assert_eq!(l.step(at(b, 750), 0), Some(LivenessStep::SendPing));
        l.sent(1, at(b, 750));
        // Evidence of life does not excuse a ping already sent.
        l.note_activity(at(b, 1800), true, 41);
        assert!(matches!(l.step(at(b, 1800), 0), Some(LivenessStep::Missed(_))));
        // Not due yet: nothing changes.
        let mut m = Liveness::new(Duration::from_millis(250), Duration::from_millis(1000), b);
        m.note_activity(at(b, 100), true, 0);
        assert_eq!(m.step(at(b, 100), 0), Some(LivenessStep::WaitUntil(at(b, 250))));
    }

    #[test]
    fn liveness_late_answer_pings_at_once_and_newer_pongs_count() {
        let b = Instant::now();
        let mut l = Liveness::new(Duration::from_millis(100), Duration::from_millis(500), b);
        l.sent(3, at(b, 100));
        // A pong to a later request (e.g. a stats request answered after the ping) also proves it.
        assert_eq!(l.step(at(b, 350), 7), Some(LivenessStep::SendPing), "answered after the interval: ping again");
        let mut off = Liveness::new(Duration::ZERO, Duration::from_millis(500), b);
        assert!(!off.enabled());
        assert_eq!(off.step(at(b, 10_000), 0), None);
    }
}
