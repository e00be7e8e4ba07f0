//! The `blk-*` tests and the driver against [`FakeBlk`] on a [`FakeMachine`].

use crate::machine::testing::FakeMachine;
use crate::pattern;
use crate::virtio::blk::{ACCEPTED, F_RO};
use crate::virtio::fake::FakeBlk;
use crate::virtio::F_VERSION_1;
use crate::{probe_main, Verdict};

const BASE: u64 = 0xd000_0000;
const DISK: usize = 1 << 20;

fn machine(dev: FakeBlk) -> FakeMachine {
    let mut m =
        FakeMachine { tsc_step: 10, dma_len: crate::virtio::blk::DATA_OFF + (2 << 20), ..FakeMachine::default() };
    m.mmio.push((BASE, 0x1000, Box::new(dev)));
    m
}

fn run(dev: FakeBlk, args: &str) -> (Verdict, String, FakeMachine) {
    let mut m = machine(dev);
    let cmd = format!("console=ttyS0 {args} virtio_mmio.device=4K@0xd0000000:5");
    let v = probe_main(&mut m, cmd.as_bytes());
    let out = m.output();
    (v, out, m)
}

fn dev(m: &FakeMachine) -> &FakeBlk {
    m.device_at::<FakeBlk>(BASE).expect("fake blk")
}

#[test]
fn verify_writes_the_documented_pattern_and_passes() {
    let (v, out, m) = run(FakeBlk::new(DISK), "probe.test=blk-verify probe.seed=9 probe.rounds=2 probe.qd=4");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(out.contains("virtio: 0xd0000000 size=0x1000 irq=5 version=2 device=2"), "{out}");
    assert!(out.contains("blk: capacity=2048 sectors (1 MiB) blk_size=4096 seg_max=128 ro=0 flush=1"), "{out}");
    assert!(
        out.contains("blk-verify: sectors=2048 rounds=2 written=4096 read=4096 mismatches=0 ioerrs=0 final_seed=10 max_wait_cycles="),
        "{out}"
    );
    let d = dev(&m);
    // Final round's seed is on disk, word by word.
    assert_eq!(pattern::check(&d.disk, 10, 0), pattern::CheckResult::default());
    // 16 requests of 64 KiB per pass, two passes per round, two rounds, one flush per round.
    assert_eq!(d.counts, (32, 32, 2, 0));
    // Batching: up to qd requests per notify, so far fewer notifies than requests.
    assert_eq!(d.max_batch, 4);
    assert!(d.notifies <= 2 * (2 * 4 + 1) + 2, "{}", d.notifies);
    // Only accepted features were negotiated, VERSION_1 among them; EVENT_IDX declined.
    assert_eq!(d.driver_features & !ACCEPTED, 0);
    assert_ne!(d.driver_features & F_VERSION_1, 0);
    // The device was reset at the end.
    assert_eq!(d.status, 0);
}

#[test]
fn verify_counts_a_corrupted_sector() {
    let mut d = FakeBlk::new(DISK);
    d.corrupt_read_at = Some(700 * 512 + 17);
    let (v, out, _) = run(d, "probe.test=blk-verify");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("mismatches=1 ioerrs=0 final_seed=1 max_wait_cycles="), "{out}");
    assert!(out.contains("blk-verify: mismatch sector=700 offset=16 "), "{out}");
}

#[test]
fn device_needing_reset_stops_the_test_long_before_its_timeout() {
    let mut d = FakeBlk::new(DISK);
    d.needs_reset_after = Some(1);
    let (v, out, m) = run(d, "probe.test=blk-verify probe.rounds=50 probe.timeout_ms=60000 probe.tsc_khz=1000");
    assert_eq!(v, Verdict::Fail, "{out}");
    assert!(out.contains("blk: device needs reset\n"), "{out}");
    assert!(out.contains("blk-verify: aborted: device needs reset: "), "{out}");
    assert!(!out.contains("device timeout"), "{out}");
    // Stopped at the first status check (1/4 of the timeout), not at the timeout: the wait's
    // poll bound is 60 000 000 / 8 polls.
    assert!(m.pauses <= 60_000_000 / 8 / 3, "{}", m.pauses);
}

#[test]
fn silent_device_times_out_with_a_clear_line() {
    let mut d = FakeBlk::new(DISK);
    d.silent = true;
    let (v, out, m) = run(d, "probe.test=blk-verify probe.timeout_ms=1 probe.tsc_khz=1000");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("blk-verify: aborted: device timeout: 16 request(s) unanswered"), "{out}");
    assert!(m.pauses > 0);
}

#[test]
fn hostile_used_id_is_caught() {
    let mut d = FakeBlk::new(DISK);
    d.bad_used_id = true;
    let (v, out, _) = run(d, "probe.test=blk-verify");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("device returned unknown descriptor id 1"), "{out}");
}

#[test]
fn read_only_disk_rejects_writes() {
    let (v, out, m) = run(FakeBlk::read_only(DISK), "probe.test=blk-ro");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(out.contains("blk-ro: ro=1 write_status=1 read_status=0"), "{out}");
    assert_ne!(dev(&m).driver_features & F_RO, 0);
    assert!(dev(&m).disk.iter().all(|&b| b == 0));
    // A writable disk accepts the write: blk-ro fails.
    let (v, out, _) = run(FakeBlk::new(DISK), "probe.test=blk-ro");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("write_status=0 read_status=0"), "{out}");
}

#[test]
fn bench_prints_rates_from_the_tsc() {
    let (v, out, m) = run(FakeBlk::new(DISK), "probe.test=blk-bench probe.qd=8 probe.count=64 probe.tsc_khz=1000");
    assert_eq!(v, Verdict::Pass, "{out}");
    for name in ["randread-4k", "seqread-128k", "seqwrite-128k"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("blk-bench: {name} reqs=64 ")))
            .unwrap_or_else(|| panic!("{name} missing: {out}"));
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {line}"))
        };
        let cycles = field("cycles=");
        assert!(cycles > 0);
        assert_eq!(field("iops="), 64 * 1_000_000 / cycles, "{line}");
        assert_eq!(field("ioerrs="), 0);
        assert!(field("kicks=") <= 64 / 8 * 2, "{line}");
    }
    let d = dev(&m);
    assert_eq!(d.counts, (128, 64, 0, 0));
    assert_eq!(d.max_batch, 8);
}

#[test]
fn bad_arguments_and_missing_devices() {
    let (v, out, _) = run(FakeBlk::new(DISK), "probe.test=blk-bench probe.qd=86");
    assert_eq!(v, Verdict::BadArgs);
    assert!(out.contains("probe: bad argument probe.qd=86: out of range"), "{out}");
    // qd 64 at 128 KiB needs 8 MiB of buffers; the fake has 2 MiB.
    let (v, out, _) = run(FakeBlk::new(DISK), "probe.test=blk-bench probe.qd=64");
    assert_eq!(v, Verdict::BadArgs);
    assert!(out.contains("blk-bench: probe.qd: queue depth times request size too large (max depth 16)"), "{out}");
    let mut m = FakeMachine::default();
    assert_eq!(probe_main(&mut m, b"probe.test=blk-verify"), Verdict::Fail);
    assert!(m.output().contains("blk: no virtio-blk device #0"));
    let mut legacy = FakeBlk::new(DISK);
    legacy.version = 1;
    let (v, out, _) = run(legacy, "probe.test=blk-verify");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("skipped: virtio-mmio version 1"), "{out}");
    let mut old = FakeBlk::new(DISK);
    old.offered &= !F_VERSION_1;
    let (v, out, m) = run(old, "probe.test=blk-verify");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("blk: set-up failed: device does not offer VIRTIO_F_VERSION_1"), "{out}");
    assert_eq!(dev(&m).status & 128, 128, "driver set FAILED");
}
