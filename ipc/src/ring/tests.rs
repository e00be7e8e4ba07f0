use super::*;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::thread;

use proptest::prelude::*;

fn eventfd_of(fd: BorrowedFd<'_>) -> EventFd {
    let owned = fd.try_clone_to_owned().expect("dup");
    // SAFETY: `owned` is a fresh dup of an eventfd; EventFd takes sole ownership of it.
    unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) }
}

fn pair(cap: u32, spin: Duration) -> (CoreEndpoint, ServiceEndpoint) {
    let core = CoreEndpoint::create("test-ring", cap, WaitConfig { spin, ..WaitConfig::default() }).expect("create");
    let svc = ServiceEndpoint::attach(
        core.region_fd().try_clone_to_owned().expect("dup"),
        core.region_len() as u64,
        cap,
        eventfd_of(core.submit_bell()),
        eventfd_of(core.complete_bell()),
    )
    .expect("attach");
    (core, svc)
}

/// A second raw mapping of the core's region, for writing hostile bytes.
fn raw_view(core: &CoreEndpoint) -> SharedRegion {
    SharedRegion::from_fd(core.region_fd().try_clone_to_owned().expect("dup"), core.region_len() as u64).expect("map")
}

/// Echo device: reads return `addr + len` as bytes, writes are checked by the caller.
fn echo(req: &ExitRequest) -> ExitReply {
    if req.kind.is_read() {
        ExitReply::ok(&(req.addr.wrapping_add(u64::from(req.len))).to_le_bytes())
    } else {
        ExitReply::ok(&[])
    }
}

fn spawn_service(mut svc: ServiceEndpoint, stop: Arc<AtomicBool>, spin: Duration) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += svc.serve_for(spin, Duration::from_millis(20), echo).expect("serve");
        }
        n
    })
}

fn expect_echo(reply: &ExitReply, addr: u64, len: u32) {
    assert_eq!(reply.status, Status::Ok);
    let want = addr.wrapping_add(u64::from(len)).to_le_bytes();
    assert_eq!(&reply.data[..len as usize], &want[..len as usize]);
}

#[test]
fn capacity_validation() {
    assert!(matches!(region_size(0), Err(IpcError::InvalidCapacity(0))));
    assert!(matches!(region_size(3), Err(IpcError::InvalidCapacity(3))));
    assert!(matches!(region_size(MAX_CAPACITY * 2), Err(IpcError::InvalidCapacity(_))));
    assert_eq!(region_size(1).expect("size"), 4096);
    assert_eq!(region_size(256).expect("size"), (512 + 256 * 56usize).div_ceil(4096) * 4096);
}

#[test]
fn round_trip_and_wrap_around() {
    let (core, svc) = pair(4, Duration::from_micros(50));
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(svc, stop.clone(), Duration::from_micros(200));
    for i in 0..2000u64 {
        let len = [1, 2, 4, 8][(i % 4) as usize];
        let r = core.call(&ExitRequest::read(ExitKind::PioRead, 0x3f8 + i, len), Duration::from_secs(2)).expect("call");
        expect_echo(&r, 0x3f8 + i, len);
        let w = ExitRequest::write(ExitKind::MmioWrite, i, &[1, 2]).expect("write");
        let r = core.call(&w, Duration::from_secs(2)).expect("call");
        assert_eq!(r.status, Status::Ok);
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(h.join().expect("join"), 4000);
}

#[test]
fn no_lost_wakeups_when_both_sides_sleep() {
    // Zero spin on both sides: every request and every reply goes through the sleep/doorbell
    // path, so a lost wake-up would show as a timeout.
    let (core, svc) = pair(8, Duration::ZERO);
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(svc, stop.clone(), Duration::ZERO);
    for i in 0..3000u64 {
        let r = core.call(&ExitRequest::read(ExitKind::PioRead, i, 1), Duration::from_secs(2)).expect("call");
        expect_echo(&r, i, 1);
    }
    stop.store(true, Ordering::SeqCst);
    h.join().expect("join");
}

#[test]
fn concurrent_callers() {
    let (core, svc) = pair(16, Duration::from_micros(20));
    let core = Arc::new(core);
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(svc, stop.clone(), Duration::from_micros(100));
    let callers: Vec<_> = (0..4u64)
        .map(|t| {
            let core = core.clone();
            thread::spawn(move || {
                for i in 0..500u64 {
                    let addr = t << 32 | i;
                    let r = core
                        .call(&ExitRequest::read(ExitKind::MmioRead, addr, 8), Duration::from_secs(5))
                        .expect("call");
                    expect_echo(&r, addr, 8);
                }
            })
        })
        .collect();
    for c in callers {
        c.join().expect("caller");
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(h.join().expect("join"), 2000);
}

#[test]
fn silent_peer_times_out_then_broken() {
    let (core, _svc) = pair(4, Duration::from_micros(100));
    let t = Instant::now();
    let r = core.call(&ExitRequest::read(ExitKind::PioRead, 1, 1), Duration::from_millis(50));
    assert!(matches!(r, Err(IpcError::Timeout(_))), "{r:?}");
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(50) && el < Duration::from_millis(500), "{el:?}");
    let t = Instant::now();
    assert!(matches!(
        core.call(&ExitRequest::read(ExitKind::PioRead, 1, 1), Duration::from_secs(5)),
        Err(IpcError::Broken)
    ));
    assert!(t.elapsed() < Duration::from_millis(10));
}

#[test]
fn abort_wakes_blocked_caller() {
    let (core, _svc) = pair(4, Duration::from_micros(10));
    let core = Arc::new(core);
    let c2 = core.clone();
    let h = thread::spawn(move || {
        let t = Instant::now();
        let r = c2.call(&ExitRequest::read(ExitKind::PioRead, 1, 1), Duration::from_secs(10));
        (r, t.elapsed())
    });
    thread::sleep(Duration::from_millis(30));
    core.abort();
    let (r, el) = h.join().expect("join");
    assert!(matches!(r, Err(IpcError::Aborted)), "{r:?}");
    assert!(el < Duration::from_secs(1), "{el:?}");
    assert!(matches!(
        core.call(&ExitRequest::read(ExitKind::PioRead, 1, 1), Duration::from_secs(10)),
        Err(IpcError::Aborted)
    ));
}

#[test]
fn invalid_request_size() {
    let (core, _svc) = pair(4, Duration::ZERO);
    assert!(matches!(
        core.call(&ExitRequest::read(ExitKind::PioRead, 1, 3), Duration::from_millis(1)),
        Err(IpcError::InvalidRequest(3))
    ));
    assert!(ExitRequest::write(ExitKind::PioWrite, 0, &[0; 3]).is_none());
}

/// Drives one call with a hand-written "service" that answers with `rec` (and optionally a
/// bogus producer index) and returns the core's result.
fn answer_with(
    rec_for: impl FnOnce(&ExitRecord) -> (CompletionRecord, u64) + Send + 'static,
) -> Result<ExitReply, IpcError> {
    let (core, _svc) = pair(4, Duration::from_micros(10));
    let raw = raw_view(&core);
    let bell = eventfd_of(core.complete_bell());
    let h = thread::spawn(move || {
        let prod = RingView::new(raw, 4).expect("view");
        let deadline = Instant::now() + Duration::from_secs(2);
        while prod.u64_at(OFF_SUB_PROD).load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::hint::spin_loop();
        }
        // SAFETY: test peer reading slot 0 of its own mapping.
        let req = unsafe { prod.sub_ptr(0).read_volatile() };
        let (c, idx) = rec_for(&req);
        // SAFETY: test peer writing slot 0 of its own mapping.
        unsafe { prod.comp_ptr(0).write_volatile(c) };
        prod.u64_at(OFF_COMP_PROD).store(idx, Ordering::Release);
        fence(Ordering::SeqCst);
        bell.write(1).expect("ring");
    });
    let r = core.call(&ExitRequest::read(ExitKind::PioRead, 0x10, 2), Duration::from_millis(300));
    h.join().expect("peer");
    r
}

type Answer = Box<dyn FnOnce(&ExitRecord) -> (CompletionRecord, u64) + Send>;

#[test]
fn hostile_completions_are_protocol_errors() {
    let ok = answer_with(|r| (CompletionRecord { seq: r.seq, status: 0, len: r.len, data: [7; 8] }, 1));
    assert_eq!(ok.expect("honest answer").data[..2], [7, 7]);
    let cases: Vec<(&str, Answer)> = vec![
        (
            "wrong seq",
            Box::new(|r: &ExitRecord| (CompletionRecord { seq: r.seq + 1, status: 0, len: r.len, data: [0; 8] }, 1)),
        ),
        ("wrong len", Box::new(|r: &ExitRecord| (CompletionRecord { seq: r.seq, status: 0, len: 4, data: [0; 8] }, 1))),
        (
            "bad status",
            Box::new(|r: &ExitRecord| (CompletionRecord { seq: r.seq, status: 9, len: r.len, data: [0; 8] }, 1)),
        ),
        (
            "index too far",
            Box::new(|r: &ExitRecord| (CompletionRecord { seq: r.seq, status: 0, len: r.len, data: [0; 8] }, 2)),
        ),
        (
            "index wrapped",
            Box::new(|r: &ExitRecord| (CompletionRecord { seq: r.seq, status: 0, len: r.len, data: [0; 8] }, u64::MAX)),
        ),
    ];
    for (name, f) in cases {
        let r = answer_with(f);
        assert!(matches!(r, Err(IpcError::Protocol { .. })), "{name}: {r:?}");
    }
}

#[test]
fn rejected_reads_are_all_ones() {
    let r = answer_with(|r| (CompletionRecord { seq: r.seq, status: 1, len: r.len, data: [0; 8] }, 1)).expect("reply");
    assert_eq!(r.status, Status::Rejected);
    assert_eq!(r.data, [0xff; 8]);
}

#[test]
fn service_rejects_bad_header_and_sizes() {
    let core = CoreEndpoint::create("hdr", 4, WaitConfig::default()).expect("create");
    let attach = |len: u64, cap: u32| {
        ServiceEndpoint::attach(
            core.region_fd().try_clone_to_owned().expect("dup"),
            len,
            cap,
            eventfd_of(core.submit_bell()),
            eventfd_of(core.complete_bell()),
        )
    };
    assert!(matches!(attach(core.region_len() as u64, 8), Err(IpcError::Protocol { .. })));
    assert!(matches!(attach(1 << 20, 4), Err(IpcError::Protocol { .. })));
    let raw = raw_view(&core);
    // SAFETY: corrupting the magic of our own test mapping.
    unsafe { raw.as_ptr().cast::<u64>().write_volatile(0xdead) };
    assert!(matches!(attach(core.region_len() as u64, 4), Err(IpcError::Protocol { .. })));
}

#[test]
fn service_validates_submissions() {
    let (core, mut svc) = pair(4, Duration::ZERO);
    let raw = raw_view(&core);
    let v = RingView::new(raw, 4).expect("view");
    // A record with a bogus kind and size is handed out as malformed, to be rejected.
    // SAFETY: writing slot 0 of our own mapping.
    unsafe { v.sub_ptr(0).write_volatile(ExitRecord { seq: 9, kind: 77, len: 3, addr: 1, data: [0; 8] }) };
    v.u64_at(OFF_SUB_PROD).store(1, Ordering::Release);
    let inc = svc.next_request().expect("next").expect("some");
    assert_eq!((inc.seq, inc.len, inc.request), (9, 3, None));
    svc.complete(&inc, &ExitReply::rejected()).expect("complete");
    // A producer index far ahead is a protocol error.
    v.u64_at(OFF_SUB_PROD).store(100, Ordering::Release);
    assert!(matches!(svc.next_request(), Err(IpcError::Protocol { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn random_requests_round_trip(reqs in proptest::collection::vec((0u64..u64::MAX, 0usize..4, any::<bool>(), any::<[u8; 8]>()), 1..200)) {
        let (core, svc) = pair(8, Duration::from_micros(50));
        let stop = Arc::new(AtomicBool::new(false));
        let h = spawn_service(svc, stop.clone(), Duration::from_micros(100));
        for (addr, l, is_read, data) in &reqs {
            let len = [1u32, 2, 4, 8][*l];
            if *is_read {
                let r = core.call(&ExitRequest::read(ExitKind::PioRead, *addr, len), Duration::from_secs(2)).expect("call");
                expect_echo(&r, *addr, len);
            } else {
                let w = ExitRequest::write(ExitKind::PioWrite, *addr, &data[..len as usize]).expect("write");
                prop_assert_eq!(w.bytes(), &data[..len as usize]);
                let r = core.call(&w, Duration::from_secs(2)).expect("call");
                prop_assert_eq!(r.status, Status::Ok);
            }
        }
        stop.store(true, Ordering::SeqCst);
        prop_assert_eq!(h.join().expect("join"), reqs.len());
    }

    #[test]
    fn core_survives_garbage_in_shared_page(
        writes in proptest::collection::vec((0usize..4096, any::<u64>()), 0..32),
        prod in any::<u64>(),
    ) {
        let (core, _svc) = pair(4, Duration::ZERO);
        let raw = raw_view(&core);
        let v = RingView::new(raw, 4).expect("view");
        // Garbage everywhere the service could write (and more), then a random producer index.
        for (off, val) in &writes {
            let off = off & !7;
            if (OFF_SUB_PROD..OFF_SUB_PROD + 8).contains(&off) { continue; }
            v.u64_at_test(off).store(*val, Ordering::SeqCst);
        }
        v.u64_at(OFF_COMP_PROD).store(prod, Ordering::SeqCst);
        let t = Instant::now();
        let r = core.call(&ExitRequest::read(ExitKind::PioRead, 0x3f8, 1), Duration::from_millis(5));
        prop_assert!(t.elapsed() < Duration::from_millis(500));
        match r {
            Ok(reply) => prop_assert!(reply.status == Status::Ok || reply.data == [0xff; 8]),
            Err(IpcError::Protocol { .. } | IpcError::Timeout(_)) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn service_survives_garbage_in_shared_page(
        writes in proptest::collection::vec((0usize..4096, any::<u64>()), 0..64),
        prod in 0u64..16,
    ) {
        let (core, mut svc) = pair(4, Duration::ZERO);
        let raw = raw_view(&core);
        let v = RingView::new(raw, 4).expect("view");
        for (off, val) in &writes {
            v.u64_at_test(off & !7).store(*val, Ordering::SeqCst);
        }
        v.u64_at(OFF_SUB_PROD).store(prod, Ordering::SeqCst);
        for _ in 0..32 {
            match svc.next_request() {
                Ok(Some(inc)) => {
                    if let Some(req) = inc.request {
                        prop_assert!(matches!(req.len, 1 | 2 | 4 | 8));
                    }
                    if svc.complete(&inc, &ExitReply::rejected()).is_err() { break; }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

impl RingView {
    /// Any 8-aligned offset in the first page (tests only).
    fn u64_at_test(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= PAGE && off + 8 <= self.region.len());
        // SAFETY: bounds and alignment asserted above; the mapping lives as long as `self`.
        unsafe { &*self.region.as_ptr().add(off).cast::<AtomicU64>() }
    }
}

/// A core waiting with a long spin budget on a service whose heartbeat stands still (taken the
/// request, then preempted or busy) stops spinning and sleeps: the service sees the core's
/// sleeping flag, which a pure spinner would never set within its 10 s budget.
#[test]
fn core_sleeps_when_the_service_heartbeat_stands_still() {
    let (core, mut svc) = pair(4, Duration::from_secs(10));
    let core = Arc::new(core);
    let c = core.clone();
    let caller = thread::spawn(move || c.call(&ExitRequest::read(ExitKind::PioRead, 0x20, 1), Duration::from_secs(20)));
    let deadline = Instant::now() + Duration::from_secs(5);
    let inc = loop {
        if let Some(inc) = svc.next_request().expect("take") {
            break inc;
        }
        assert!(Instant::now() < deadline, "no request");
        std::hint::spin_loop();
    };
    // No beat from here on: wait for the core to give up spinning.
    let flag = svc.view.u32_at(OFF_CORE_SLEEPING);
    while flag.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the core kept spinning on a silent service");
        std::thread::sleep(Duration::from_micros(50));
    }
    svc.complete(&inc, &echo(&inc.request.expect("valid"))).expect("complete");
    let reply = caller.join().expect("caller").expect("reply");
    expect_echo(&reply, 0x20, 1);
}

/// The core's spin decision, on synthetic time: spin while the heartbeat moves and the service is
/// elsewhere; stop once it stands still for `stale`, or at once when the service last ran on the
/// core's own CPU; a service that was rung gets `wake_grace` to show up.
#[test]
fn core_spins_only_while_the_service_is_on_another_cpu_and_beating() {
    let (core, mut svc) = pair(4, Duration::from_secs(10));
    let view = RingView::new(raw_view(&core), 4).expect("view");
    let cfg = WaitConfig {
        spin: Duration::from_secs(10),
        stale: Duration::from_micros(20),
        wake_grace: Duration::from_micros(60),
    };
    let t0 = Instant::now();
    let us = |n| t0 + Duration::from_micros(n);
    let (mine, other) = (7, 9);
    view.u32_at(OFF_SERVICE_CPU).store(other, Ordering::SeqCst);

    let mut w = PeerWatch::new(&view, t0, false);
    assert!(w.worth_spinning(&view, us(10), mine, &cfg), "fresh watch, service elsewhere");
    assert!(!w.worth_spinning(&view, us(25), mine, &cfg), "no beat for 25 us");
    svc.beat();
    view.u32_at(OFF_SERVICE_CPU).store(other, Ordering::SeqCst);
    assert!(w.worth_spinning(&view, us(30), mine, &cfg), "beating again");
    assert!(w.worth_spinning(&view, us(45), mine, &cfg), "beat 15 us ago");

    // Parked on our CPU: stop spinning as soon as it has not beaten since.
    view.u32_at(OFF_SERVICE_CPU).store(mine, Ordering::SeqCst);
    assert!(!w.worth_spinning(&view, us(47), mine, &cfg), "service waits for our CPU");
    assert!(w.worth_spinning(&view, us(47), 0, &cfg), "own CPU unknown: the heartbeat rule alone");

    // Rung awake: spin for the grace, then sleep, unless it beats.
    let mut w = PeerWatch::new(&view, t0, true);
    view.u32_at(OFF_SERVICE_SLEEPING).store(1, Ordering::SeqCst);
    assert!(w.worth_spinning(&view, us(50), mine, &cfg), "within the wake grace");
    assert!(!w.worth_spinning(&view, us(61), mine, &cfg), "past the wake grace");
    view.u32_at(OFF_SERVICE_SLEEPING).store(0, Ordering::SeqCst);
    view.u32_at(OFF_SERVICE_CPU).store(other, Ordering::SeqCst);
    svc.beat();
    assert!(w.worth_spinning(&view, us(70), mine, &cfg), "woke up and beats");
}

/// After ringing a sleeping core, the service stops its idle spin as soon as it knows the core is
/// off a CPU: the core last ran on this very CPU, or it has not woken within the grace.
#[test]
fn service_notices_a_core_that_stays_off_cpu() {
    let (core, mut svc) = pair(4, Duration::from_micros(10));
    let raw = RingView::new(raw_view(&core), 4).expect("view");
    // Nothing rung yet: nothing to notice.
    assert!(!svc.core_off_cpu(Instant::now(), Duration::from_secs(1)));
    // A request, and the core asleep on a CPU this thread is not on (cpu index far away).
    raw.u64_at(OFF_SUB_PROD).store(1, Ordering::SeqCst);
    // SAFETY: test peer writing slot 0 of its own mapping.
    unsafe { raw.sub_ptr(0).write_volatile(ExitRecord { seq: 1, kind: 1, len: 1, addr: 0x40, data: [0; 8] }) };
    raw.u32_at(OFF_CORE_SLEEPING).store(1, Ordering::SeqCst);
    raw.u32_at(OFF_CORE_CPU).store(10_000, Ordering::SeqCst);
    let inc = svc.next_request().expect("take").expect("one");
    svc.complete(&inc, &ExitReply::ok(&[1])).expect("complete");
    let now = Instant::now();
    assert!(!svc.core_off_cpu(now, Duration::from_secs(1)), "within the grace, elsewhere");
    assert!(svc.core_off_cpu(now + Duration::from_secs(2), Duration::from_secs(1)), "past the grace");
    // On this thread's CPU: at once.
    raw.u32_at(OFF_CORE_CPU).store(current_cpu(), Ordering::SeqCst);
    assert!(svc.core_off_cpu(now, Duration::from_secs(1)) || current_cpu() == 0);
    // Awake again: nothing to notice, and the watch ends.
    raw.u32_at(OFF_CORE_SLEEPING).store(0, Ordering::SeqCst);
    assert!(!svc.core_off_cpu(now + Duration::from_secs(2), Duration::from_secs(1)));
    assert!(svc.rang_core_at.is_none());
}

#[test]
fn copy_access_copies_every_size_up_to_eight() {
    let src = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
    for n in 0..=9usize {
        let mut dst = [0xeeu8; 9];
        let got = copy_access(&mut dst[..n], &src);
        assert_eq!(got, n.min(8));
        assert_eq!(&dst[..n.min(8)], &src[..n.min(8)], "size {n}");
        assert!(dst[n.min(8)..].iter().all(|&b| b == 0xee), "size {n} wrote past its end");
    }
    // The shorter side bounds the copy.
    let mut dst = [0u8; 8];
    assert_eq!(copy_access(&mut dst, &src[..3]), 3);
    assert_eq!(dst, [1, 2, 3, 0, 0, 0, 0, 0]);
    let mut dst = [0u8; 5];
    fill_access(&mut dst, 0xff);
    assert_eq!(dst, [0xff; 5]);
}

/// A service inside a marked I/O call (a slow flush) keeps the core's call waiting past its
/// timeout, up to the I/O deadline; the same wait without the mark times out; and a call whose
/// I/O outlasts the I/O deadline times out too.
#[test]
fn a_marked_io_call_extends_the_wait_up_to_the_io_deadline() {
    let (core, mut svc) = pair(4, Duration::from_micros(50));
    let marker = svc.io_marker();
    assert_eq!(core.service_in_io(), None);
    let h = thread::spawn(move || {
        {
            let _io = marker.begin();
            thread::sleep(Duration::from_millis(300));
        }
        svc.serve_for(Duration::from_millis(50), Duration::from_millis(500), echo).expect("serve")
    });
    thread::sleep(Duration::from_millis(50));
    assert!(core.service_in_io().is_some_and(|t| t < Duration::from_secs(1)), "the mark is visible");
    let req = ExitRequest::read(ExitKind::PioRead, 0x10, 1);
    let r = core.call_with_io(&req, Duration::from_millis(100), Duration::from_secs(5)).expect("waited for the I/O");
    expect_echo(&r, 0x10, 1);
    assert_eq!(h.join().expect("join"), 1);
    assert_eq!(core.service_in_io(), None, "the mark ends with its guard");

    // No mark: the ordinary timeout.
    let (core, _svc) = pair(4, Duration::from_micros(50));
    let err = core.call_with_io(&req, Duration::from_millis(100), Duration::from_secs(5)).expect_err("times out");
    assert!(matches!(err, IpcError::Timeout(_)));

    // An I/O call longer than the I/O deadline.
    let (core, svc) = pair(4, Duration::from_micros(50));
    let marker = svc.io_marker();
    let _io = marker.begin();
    let start = Instant::now();
    let err = core.call_with_io(&req, Duration::from_millis(50), Duration::from_millis(200)).expect_err("times out");
    assert!(matches!(err, IpcError::Timeout(_)));
    assert!(start.elapsed() < Duration::from_secs(2), "bounded by the I/O deadline: {:?}", start.elapsed());
}

/// Serves whatever is queued right now (no waiting), with `echo`; returns the requests seen.
fn serve_queued(svc: &mut ServiceEndpoint) -> Vec<ExitRequest> {
    let mut seen = Vec::new();
    while let Some(inc) = svc.next_request().expect("next") {
        let req = inc.request.expect("valid");
        svc.complete(&inc, &echo(&req)).expect("complete");
        seen.push(req);
    }
    seen
}

fn ack(v: u8) -> ExitRequest {
    ExitRequest::write(ExitKind::MmioWrite, 0x1064, &[v, 0, 0, 0]).expect("write")
}

#[test]
fn only_declared_writes_are_posted_and_a_later_call_waits_for_them() {
    let (core, mut svc) = pair(64, Duration::from_micros(50));
    assert!(!core.post(&ack(1)).expect("post"), "nothing declared: not posted");
    svc.mirror().publish(&[
        crate::mirror::MirrorEntry::posted_write(0x1064, 4),
        crate::mirror::MirrorEntry::new(0x1060, &[5, 0, 0, 0]),
    ]);
    assert!(!core.post(&ExitRequest::read(ExitKind::MmioRead, 0x1064, 4)).expect("post"), "reads are never posted");
    assert!(!core.post(&ExitRequest::write(ExitKind::MmioWrite, 0x1064, &[1, 0]).expect("w")).expect("post"));
    let read = ExitRequest::read(ExitKind::MmioRead, 0x1060, 4);
    assert!(core.read_mirror(&read).is_some(), "nothing outstanding: the mirror answers");
    // Posted: returns at once although nobody serves the ring.
    assert!(core.post(&ack(1)).expect("post"));
    assert!(core.post(&ack(2)).expect("post"));
    assert_eq!(core.posted_outstanding(), 2);
    assert!(core.read_mirror(&read).is_none(), "a posted write outstanding: reads are forwarded");
    // The service takes them in order; the mirror answers again once their completions are in.
    let seen = serve_queued(&mut svc);
    assert_eq!(seen.iter().map(|r| r.data[0]).collect::<Vec<_>>(), vec![1, 2]);
    assert!(core.read_mirror(&read).is_some(), "completions consumed by the mirror read");
    assert_eq!(core.posted_outstanding(), 0);
    // A call behind posted writes gets its own completion, after theirs.
    assert!(core.post(&ack(3)).expect("post"));
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(svc, stop.clone(), Duration::from_micros(200));
    let r = core.call(&ExitRequest::read(ExitKind::MmioRead, 0x2000, 4), Duration::from_secs(5)).expect("call");
    expect_echo(&r, 0x2000, 4);
    assert_eq!(core.posted_outstanding(), 0);
    stop.store(true, Ordering::SeqCst);
    assert_eq!(h.join().expect("join"), 2);
}

#[test]
fn posted_writes_are_bounded_and_carried_to_the_next_ring_in_order() {
    let (core, svc) = pair(64, Duration::from_micros(50));
    svc.mirror().publish(&[crate::mirror::MirrorEntry::posted_write(0x1064, 4)]);
    let mut posted = 0u8;
    for v in 0..40u8 {
        if core.post(&ack(v)).expect("post") {
            posted += 1;
        }
    }
    assert_eq!(usize::from(posted), MAX_POSTED, "at most MAX_POSTED outstanding; the rest are calls");
    // The instance dies: what it never completed goes to the next ring, first in line.
    core.abort();
    assert!(matches!(core.post(&ack(99)), Err(IpcError::Aborted)));
    let carried = core.take_posted();
    assert_eq!(carried.len(), MAX_POSTED);
    drop(svc);
    let (next, mut next_svc) = pair(64, Duration::from_micros(50));
    assert_eq!(next.adopt(&carried), MAX_POSTED);
    let seen = serve_queued(&mut next_svc);
    assert_eq!(seen.iter().map(|r| r.data[0]).collect::<Vec<_>>(), (0..16u8).collect::<Vec<_>>());
    // Their completions are consumed before a later call's.
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_service(next_svc, stop.clone(), Duration::from_micros(200));
    let r = next.call(&ExitRequest::read(ExitKind::MmioRead, 0x10, 2), Duration::from_secs(5)).expect("call");
    expect_echo(&r, 0x10, 2);
    stop.store(true, Ordering::SeqCst);
    h.join().expect("join");
}

#[test]
fn posted_writes_the_dead_instance_completed_are_not_carried() {
    let (core, mut svc) = pair(64, Duration::from_micros(50));
    svc.mirror().publish(&[crate::mirror::MirrorEntry::posted_write(0x1064, 4)]);
    for v in 1..=3 {
        assert!(core.post(&ack(v)).expect("post"));
    }
    // The instance serves the first two (their effects happened, their completions are in the
    // ring, not consumed yet), then dies before the third.
    for _ in 0..2 {
        let inc = svc.next_request().expect("next").expect("queued");
        svc.complete(&inc, &ExitReply::ok(&[])).expect("complete");
    }
    core.abort();
    let carried = core.take_posted();
    assert_eq!(carried.iter().map(|r| r.data[0]).collect::<Vec<_>>(), vec![3], "only the write it never finished");
    assert_eq!(core.posted_outstanding(), 0);
}

#[test]
fn a_forged_completion_of_a_posted_write_breaks_the_ring() {
    let (core, mut svc) = pair(64, Duration::from_micros(50));
    svc.mirror().publish(&[crate::mirror::MirrorEntry::posted_write(0x1064, 4)]);
    assert!(core.post(&ack(1)).expect("post"));
    let inc = svc.next_request().expect("next").expect("queued");
    let forged = Incoming { seq: inc.seq.wrapping_add(7), ..inc };
    svc.complete(&forged, &ExitReply::ok(&[])).expect("complete");
    let read = ExitRequest::read(ExitKind::MmioRead, 0x1060, 4);
    assert!(core.read_mirror(&read).is_none());
    assert!(matches!(core.call(&read, Duration::from_millis(100)), Err(IpcError::Broken)));
    assert!(matches!(core.post(&ack(2)), Err(IpcError::Broken)));
}
