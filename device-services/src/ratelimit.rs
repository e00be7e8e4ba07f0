//! Token-bucket rate limiting of device I/O (bytes and operations per second).
//!
//! A [`TokenBucket`] holds up to `capacity` tokens and gains `rate` tokens per second. Time is
//! passed in by the caller as a monotonic [`Duration`] since an epoch of its choosing, so every
//! function here is deterministic. Arithmetic is integer only: the balance is kept in
//! nano-tokens (tokens × 10⁹), so a refill is exactly `elapsed_ns × rate` with no remainder
//! lost, in `i128`/`u128` (rates and bursts up to `u64::MAX` cannot overflow; sums saturate).
//!
//! Oversized operations: one that needs more tokens than the bucket can ever hold is allowed
//! once the bucket is full, and leaves the bucket in debt (a negative balance) that later
//! operations wait out, so every operation gets through eventually. Over any interval the tokens
//! taken with `try_consume` never exceed `rate × elapsed + max(capacity, largest operation)`;
//! with admission then a forced charge (below), `rate × elapsed + capacity + largest operation`.
//!
//! A [`RateLimiter`] pairs a byte bucket with an operation bucket (all-or-nothing across the
//! two). [`Throttle`] is what a device keeps: a limiter, the clock epoch, whether the device
//! is waiting for tokens and how often it had to. Devices *admit* a request before taking it
//! from its queue (when one byte and one operation are available: nothing is taken out of a
//! queue that cannot be served, so nothing throttled can be lost), then *charge* its real size
//! once it is known, which may put the byte bucket in debt and so delay the next admission.

use std::cell::Cell;
use std::time::{Duration, Instant};

use ipc::control::RateLimit;

/// Nano-tokens per token.
const NANO: u128 = 1_000_000_000;

fn nanos(t: Duration) -> u128 {
    t.as_nanos()
}

/// `n` tokens in nano-tokens (at most `u64::MAX × 10⁹`, well inside `i128`).
fn nano_tokens(n: u64) -> i128 {
    i128::try_from(u128::from(n) * NANO).unwrap_or(i128::MAX)
}

/// A token bucket. `rate == 0` means unlimited: every operation passes and nothing is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens gained per second (0 = unlimited).
    rate: u64,
    /// Most tokens held (at least 1 when limited).
    capacity: u64,
    /// Current balance in nano-tokens; negative while in debt.
    balance: i128,
    /// Time of the last refill, in nanoseconds since the caller's epoch.
    last: u128,
    /// What is left of the one-time burst, in nano-tokens: spent before the balance, never
    /// refilled.
    one_time: i128,
}

impl TokenBucket {
    /// A bucket gaining `rate` tokens per second, holding at most `capacity` (raised to 1), full
    /// at `now`. `rate == 0` makes an unlimited bucket.
    pub fn new(rate: u64, capacity: u64, now: Duration) -> Self {
        let capacity = if rate == 0 { 0 } else { capacity.max(1) };
        Self { rate, capacity, balance: nano_tokens(capacity), last: nanos(now), one_time: 0 }
    }

    /// This bucket with `n` more tokens available once (Firecracker's `one_time_burst`): they are
    /// spent before the refilling balance and never come back.
    pub fn with_one_time(mut self, n: u64) -> Self {
        if !self.is_unlimited() {
            self.one_time = nano_tokens(n);
        }
        self
    }

    /// A bucket that never limits.
    pub fn unlimited() -> Self {
        Self::new(0, 0, Duration::ZERO)
    }

    /// Whether the bucket never limits.
    pub fn is_unlimited(&self) -> bool {
        self.rate == 0
    }

    /// Tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Most tokens held.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The balance (nano-tokens) the bucket would have at `now`. A `now` before the last refill
    /// counts as no time elapsed.
    fn balance_at(&self, now: Duration) -> i128 {
        let elapsed = nanos(now).saturating_sub(self.last);
        let gained = elapsed.saturating_mul(u128::from(self.rate));
        let cap = nano_tokens(self.capacity);
        // balance <= cap always, so the room is non-negative.
        let room = u128::try_from(cap.saturating_sub(self.balance)).unwrap_or(u128::MAX);
        if gained >= room {
            cap
        } else {
            // gained < room <= 2 × i128::MAX: fits once added to the (negative) balance.
            self.balance.saturating_add(i128::try_from(gained).unwrap_or(i128::MAX))
        }
    }

    /// Tokens held at `now`, one-time burst included, rounded down (negative while in debt).
    pub fn tokens(&self, now: Duration) -> i128 {
        self.balance_at(now).saturating_add(self.one_time).div_euclid(NANO as i128)
    }

    /// Takes `amount` nano-tokens, from the one-time burst first.
    fn take(&mut self, amount: i128) {
        let from_burst = amount.min(self.one_time).max(0);
        self.one_time -= from_burst;
        self.balance = self.balance.saturating_sub(amount - from_burst);
    }

    fn refill(&mut self, now: Duration) {
        self.balance = self.balance_at(now);
        self.last = self.last.max(nanos(now));
    }

    /// Balance needed before `n` tokens may be taken: `n` itself, or a full bucket when `n` is
    /// more than the bucket holds.
    fn threshold(&self, n: u64) -> i128 {
        nano_tokens(n).min(nano_tokens(self.capacity).saturating_add(self.one_time))
    }

    /// Takes `n` tokens if available at `now` (see the module doc for oversized `n`); false
    /// leaves the bucket as it was apart from the refill.
    pub fn try_consume(&mut self, n: u64, now: Duration) -> bool {
        if self.is_unlimited() {
            return true;
        }
        self.refill(now);
        if self.balance.saturating_add(self.one_time) < self.threshold(n) {
            return false;
        }
        self.take(nano_tokens(n));
        true
    }

    /// Takes `n` tokens whatever the balance (it may go into debt): charging work whose size was
    /// only known after it was admitted.
    pub fn consume(&mut self, n: u64, now: Duration) {
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        self.take(nano_tokens(n));
    }

    /// How long after `now` taking `n` tokens would succeed; `None` if it would now.
    pub fn wait_time(&self, n: u64, now: Duration) -> Option<Duration> {
        if self.is_unlimited() {
            return None;
        }
        let balance = self.balance_at(now).saturating_add(self.one_time);
        let need = self.threshold(n);
        if balance >= need {
            return None;
        }
        // need > balance, so the deficit is positive; rate > 0.
        let deficit = u128::try_from(need.saturating_sub(balance)).unwrap_or(u128::MAX);
        let ns = deficit.div_ceil(u128::from(self.rate));
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }
}

/// The default burst of `rate`: [`RateLimit::DEFAULT_BURST_MS`] worth of it.
fn default_burst(rate: u64) -> u64 {
    let b = u128::from(rate) * u128::from(RateLimit::DEFAULT_BURST_MS) / 1000;
    u64::try_from(b).unwrap_or(u64::MAX)
}

/// A byte bucket and an operation bucket, used together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimiter {
    bytes: TokenBucket,
    ops: TokenBucket,
}

impl RateLimiter {
    /// A limiter for `limit` (0 rates unlimited, 0 bursts the default), both buckets full at
    /// `now`.
    pub fn new(limit: &RateLimit, now: Duration) -> Self {
        let burst = |rate, burst| if burst == 0 { default_burst(rate) } else { burst };
        Self {
            bytes: TokenBucket::new(limit.bytes_per_sec, burst(limit.bytes_per_sec, limit.bytes_burst), now)
                .with_one_time(limit.bytes_one_time),
            ops: TokenBucket::new(limit.ops_per_sec, burst(limit.ops_per_sec, limit.ops_burst), now)
                .with_one_time(limit.ops_one_time),
        }
    }

    /// A limiter that never limits.
    pub fn unlimited() -> Self {
        Self { bytes: TokenBucket::unlimited(), ops: TokenBucket::unlimited() }
    }

    /// Whether neither bucket limits.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_unlimited() && self.ops.is_unlimited()
    }

    /// The byte bucket.
    pub fn bytes(&self) -> &TokenBucket {
        &self.bytes
    }

    /// The operation bucket.
    pub fn ops(&self) -> &TokenBucket {
        &self.ops
    }

    /// Takes `bytes` and `ops` tokens if both buckets have them at `now`; otherwise takes
    /// nothing and returns false.
    pub fn try_consume(&mut self, bytes: u64, ops: u64, now: Duration) -> bool {
        if self.wait_time(bytes, ops, now).is_some() {
            return false;
        }
        let (b, o) = (self.bytes.try_consume(bytes, now), self.ops.try_consume(ops, now));
        debug_assert!(b && o, "wait_time said both buckets had the tokens");
        true
    }

    /// Takes `bytes` and `ops` tokens whatever the balances (debt allowed).
    pub fn consume(&mut self, bytes: u64, ops: u64, now: Duration) {
        self.bytes.consume(bytes, now);
        self.ops.consume(ops, now);
    }

    /// How long after `now` [`try_consume`](Self::try_consume) of `bytes` and `ops` would
    /// succeed; `None` if it would now.
    pub fn wait_time(&self, bytes: u64, ops: u64, now: Duration) -> Option<Duration> {
        match (self.bytes.wait_time(bytes, now), self.ops.wait_time(ops, now)) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or_default().max(b.unwrap_or_default())),
        }
    }
}

/// A device's rate limiting of one stream of requests: admission before a request is taken,
/// charging once its size is known, and the bookkeeping for waking up.
///
/// A new throttle is *disarmed*: requests are charged but always admitted. The device arms it
/// once the requests found in flight after a restart have been redone (they were admitted by
/// the previous instance and must not be held back: the replay cannot be resumed later).
#[derive(Debug)]
pub struct Throttle {
    limiter: RateLimiter,
    epoch: Instant,
    armed: Cell<bool>,
    /// A request was refused and the device waits for tokens.
    waiting: bool,
    /// Times a request was refused after being admissible (waits started).
    refusals: u64,
}

impl Throttle {
    /// A disarmed throttle for `limit`, buckets full now.
    pub fn new(limit: &RateLimit) -> Self {
        Self {
            limiter: RateLimiter::new(limit, Duration::ZERO),
            epoch: Instant::now(),
            armed: Cell::new(false),
            waiting: false,
            refusals: 0,
        }
    }

    /// A throttle that never limits.
    pub fn unlimited() -> Self {
        Self::new(&RateLimit::default())
    }

    /// The monotonic time this throttle's limiter is driven with.
    pub fn now(&self) -> Duration {
        // Unlimited buckets ignore time: no clock read on the hot path.
        if self.limiter.is_unlimited() {
            return Duration::ZERO;
        }
        self.epoch.elapsed()
    }

    /// Starts refusing requests when the buckets are empty.
    pub fn arm(&self) {
        self.armed.set(true);
    }

    /// Whether a request would be admitted at `now` (one byte and one operation available).
    pub fn admissible(&self, now: Duration) -> bool {
        !self.armed.get() || self.limiter.wait_time(1, 1, now).is_none()
    }

    /// Admits a request at `now`, or records a refusal (counted once per wait).
    pub fn admit(&mut self, now: Duration) -> bool {
        if self.admissible(now) {
            self.waiting = false;
            return true;
        }
        if !self.waiting {
            self.waiting = true;
            self.refusals += 1;
        }
        false
    }

    /// Charges an admitted request of `bytes` and `ops` at `now` (may leave the buckets in debt).
    pub fn charge(&mut self, bytes: u64, ops: u64, now: Duration) {
        self.limiter.consume(bytes, ops, now);
    }

    /// How long until a refused request can be admitted: `None` if none is waiting or it can
    /// be now (the caller then has work to do instead of sleeping).
    pub fn wake_after(&self, now: Duration) -> Option<Duration> {
        if !self.waiting {
            return None;
        }
        self.wait(now)
    }

    /// How long until a request can be admitted, whether or not one is waiting.
    pub fn wait(&self, now: Duration) -> Option<Duration> {
        if !self.armed.get() {
            return None;
        }
        self.limiter.wait_time(1, 1, now)
    }

    /// Forgets a waiting request (the queue was reset).
    pub fn clear_wait(&mut self) {
        self.waiting = false;
    }

    /// Times a request had to wait for tokens.
    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    /// Whether this throttle limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.limiter.is_unlimited()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_starts_full_refills_at_its_rate_and_caps() {
        let mut b = TokenBucket::new(1000, 100, Duration::ZERO);
        assert_eq!(b.tokens(Duration::ZERO), 100);
        assert!(b.try_consume(100, Duration::ZERO));
        assert!(!b.try_consume(1, Duration::ZERO), "empty");
        assert_eq!(b.wait_time(1, Duration::ZERO), Some(ms(1)));
        assert_eq!(b.wait_time(50, Duration::ZERO), Some(ms(50)));
        assert!(!b.try_consume(50, ms(49)));
        assert!(b.try_consume(50, ms(50)));
        // Fractions of a token are kept: 1000/s is one token per ms, half a ms twice is one.
        assert!(!b.try_consume(1, Duration::from_micros(50_500)));
        assert!(b.try_consume(1, Duration::from_micros(51_000)));
        // Never more than the capacity, however long it idles.
        assert_eq!(b.tokens(Duration::from_secs(3600)), 100);
        // Time going backwards gains nothing and loses nothing.
        assert_eq!(b.tokens(ms(1)), 0);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Duration::ZERO;
        // 100 tokens/s, bucket of 10, plus 50 once.
        let mut b = TokenBucket::new(100, 10, t0).with_one_time(50);
        assert_eq!(b.tokens(t0), 60);
        assert!(b.try_consume(55, t0), "more than the bucket, within bucket + burst");
        assert_eq!(b.tokens(t0), 5);
        assert!(!b.try_consume(6, t0));
        assert_eq!(b.wait_time(6, t0), Some(Duration::from_millis(10)));
        // A second later the bucket is full again, the burst is gone for good.
        let t1 = Duration::from_secs(1);
        assert_eq!(b.tokens(t1), 10);
        assert!(!b.try_consume(11, t1) || b.tokens(t1) < 0, "only an oversized op may go into debt");
        let mut u = TokenBucket::unlimited().with_one_time(5);
        assert!(u.try_consume(u64::MAX, t0));
        let limit = RateLimit { ops_per_sec: 10, ops_burst: 1, ops_one_time: 4, ..RateLimit::default() };
        let mut l = RateLimiter::new(&limit, t0);
        for _ in 0..5 {
            assert!(l.try_consume(0, 1, t0), "bucket (1) + one-time burst (4)");
        }
        assert!(!l.try_consume(0, 1, t0));
    }

    #[test]
    fn oversized_operation_waits_for_a_full_bucket_then_goes_into_debt() {
        let mut b = TokenBucket::new(1000, 10, Duration::ZERO);
        assert!(b.try_consume(5, Duration::ZERO));
        assert_eq!(b.wait_time(25, Duration::ZERO), Some(ms(5)), "waits for a full bucket, not 25");
        assert!(!b.try_consume(25, ms(4)));
        assert!(b.try_consume(25, ms(5)));
        assert_eq!(b.tokens(ms(5)), -15);
        // The debt is paid back before anything else passes: 15 ms, plus 1 ms for one token.
        assert_eq!(b.wait_time(1, ms(5)), Some(ms(16)));
        assert!(b.try_consume(1, ms(21)));
    }

    #[test]
    fn forced_consumption_and_unlimited_buckets() {
        let mut b = TokenBucket::new(100, 10, Duration::ZERO);
        b.consume(1000, Duration::ZERO);
        assert_eq!(b.tokens(Duration::ZERO), -990);
        assert_eq!(b.wait_time(1, Duration::ZERO), Some(Duration::from_millis(9910)));
        let mut u = TokenBucket::unlimited();
        assert!(u.is_unlimited());
        assert!(u.try_consume(u64::MAX, Duration::ZERO));
        u.consume(u64::MAX, Duration::ZERO);
        assert_eq!(u.wait_time(u64::MAX, Duration::ZERO), None);
        // A rate too small for the default burst still holds one token.
        let r = RateLimiter::new(&RateLimit { ops_per_sec: 5, ..RateLimit::default() }, Duration::ZERO);
        assert_eq!(r.ops().capacity(), 1);
        assert!(r.bytes().is_unlimited());
    }

    #[test]
    fn extreme_rates_and_times_do_not_overflow() {
        let tib = 1u64 << 40;
        let mut b = TokenBucket::new(tib, u64::MAX, Duration::ZERO);
        assert!(b.try_consume(u64::MAX, Duration::ZERO));
        assert_eq!(b.tokens(Duration::ZERO), 0);
        // Far in the future: full again, no overflow.
        let far = Duration::from_nanos(u64::MAX);
        assert_eq!(b.tokens(far), i128::from(u64::MAX));
        let mut m = TokenBucket::new(u64::MAX, u64::MAX, Duration::ZERO);
        m.consume(u64::MAX, Duration::ZERO);
        m.consume(u64::MAX, Duration::ZERO);
        assert!(m.wait_time(u64::MAX, Duration::ZERO).is_some());
        assert!(m.try_consume(u64::MAX, Duration::MAX));
        // A slow rate with a huge debt: the wait saturates instead of wrapping.
        let mut s = TokenBucket::new(1, 1, Duration::ZERO);
        s.consume(u64::MAX, Duration::ZERO);
        assert_eq!(s.wait_time(1, Duration::ZERO), Some(Duration::from_nanos(u64::MAX)));
        // Default burst of a huge rate.
        let r = RateLimiter::new(&RateLimit { bytes_per_sec: u64::MAX, ..RateLimit::default() }, Duration::ZERO);
        assert_eq!(r.bytes().capacity(), u64::MAX / 100);
    }

    #[test]
    fn limiter_is_all_or_nothing_across_its_buckets() {
        let limit =
            RateLimit { bytes_per_sec: 1000, bytes_burst: 100, ops_per_sec: 10, ops_burst: 2, ..RateLimit::default() };
        let mut r = RateLimiter::new(&limit, Duration::ZERO);
        assert!(r.try_consume(40, 1, Duration::ZERO));
        assert!(r.try_consume(40, 1, Duration::ZERO));
        // Bytes are there (20) but no op: nothing is taken.
        assert!(!r.try_consume(10, 1, Duration::ZERO));
        assert_eq!(r.bytes().tokens(Duration::ZERO), 20);
        assert_eq!(r.wait_time(10, 1, Duration::ZERO), Some(ms(100)), "the op bucket decides");
        assert_eq!(r.wait_time(90, 1, Duration::ZERO), Some(ms(100)), "both: the longer wait");
        assert_eq!(r.wait_time(100, 0, Duration::ZERO), Some(ms(80)));
        assert!(r.try_consume(10, 1, ms(100)));
        assert!(RateLimiter::unlimited().try_consume(u64::MAX, u64::MAX, Duration::ZERO));
    }

    #[test]
    fn throttle_counts_waits_and_is_disarmed_until_armed() {
        let limit = RateLimit { ops_per_sec: 100, ops_burst: 1, ..RateLimit::default() };
        let mut t = Throttle::new(&limit);
        let t0 = Duration::ZERO;
        assert!(t.admit(t0));
        t.charge(0, 1, t0);
        assert!(t.admit(t0), "disarmed: admitted anyway (redo after a restart)");
        t.charge(0, 1, t0);
        t.arm();
        assert!(!t.admit(t0));
        assert!(!t.admit(ms(5)));
        assert_eq!(t.refusals(), 1, "one wait, however often it is asked");
        // One op of debt plus one to admit: 20 ms from the start.
        assert_eq!(t.wake_after(ms(5)), Some(ms(15)));
        assert_eq!(t.wake_after(ms(20)), None, "due: work to do, no sleep");
        assert!(t.admit(ms(20)));
        assert_eq!(t.wake_after(ms(20)), None, "nothing waiting");
        t.charge(0, 1, ms(20));
        assert!(!t.admit(ms(21)));
        assert_eq!(t.refusals(), 2);
        t.clear_wait();
        assert_eq!(t.wake_after(ms(21)), None);
        assert!(Throttle::unlimited().is_unlimited());
    }

    /// One step of a random workload: after `dt_us`, either a `try_consume` of `n` tokens or
    /// an admission followed by a forced charge of `n` (the devices' pattern).
    #[derive(Debug, Clone)]
    struct Step {
        dt_us: u64,
        n: u64,
        forced: bool,
    }

    fn step() -> impl Strategy<Value = Step> {
        (prop_oneof![0u64..10, 0u64..5_000, 0u64..1_000_000], prop_oneof![0u64..10, 0u64..5_000], any::<bool>())
            .prop_map(|(dt_us, n, forced)| Step { dt_us, n, forced })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Over any sequence of consumptions and time steps, what was taken never exceeds
        /// `rate × elapsed + max(capacity, largest operation)`, and what was refused would have
        /// passed after the wait `wait_time` announced.
        #[test]
        fn long_run_rate_is_bounded_and_waits_are_honest(
            rate in 1u64..1_000_000,
            capacity in 0u64..10_000,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let mut b = TokenBucket::new(rate, capacity, Duration::ZERO);
            let cap = b.capacity();
            let mut now = Duration::ZERO;
            let mut taken: u128 = 0;
            let mut largest = 0u64;
            let mut any_forced = false;
            for s in steps {
                now += Duration::from_micros(s.dt_us);
                let passed = if s.forced {
                    // Admission: one token available, then the real size.
                    let ok = b.wait_time(1, now).is_none();
                    if ok {
                        b.consume(s.n, now);
                    }
                    ok
                } else {
                    let wait = b.wait_time(s.n, now);
                    let ok = b.try_consume(s.n, now);
                    prop_assert_eq!(ok, wait.is_none());
                    if let Some(w) = wait {
                        let mut probe = b.clone();
                        prop_assert!(probe.try_consume(s.n, now + w), "passes after the announced wait");
                        if w > Duration::from_nanos(1) {
                            let mut early = b.clone();
                            prop_assert!(!early.try_consume(s.n, now + w - Duration::from_nanos(1)));
                        }
                    }
                    ok
                };
                if passed {
                    taken += u128::from(s.n);
                    largest = largest.max(s.n);
                    any_forced |= s.forced;
                }
                let refilled = now.as_nanos() * u128::from(rate) / NANO;
                let allowed = refilled + u128::from(cap) + u128::from(largest);
                prop_assert!(taken <= allowed, "took {} > {} after {:?}", taken, allowed, now);
                if !any_forced {
                    let tight = refilled + u128::from(cap.max(largest)) + 1;
                    prop_assert!(taken <= tight, "try_consume only: took {} > {}", taken, tight);
                }
            }
        }
    }
}
