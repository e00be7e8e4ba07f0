//! The `net-*` tests and the virtio-net driver against [`FakeNet`] on a [`FakeMachine`].

// Test-only: sequence numbers of a few thousand frames.
#![allow(clippy::cast_possible_truncation)]

use super::net_common::{self, Parsed, BROADCAST};
use crate::machine::testing::FakeMachine;
use crate::virtio::fake_net::{FakeNet, FAKE_MAC, PEER_MAC};
use crate::virtio::net::{ACCEPTED, F_MRG_RXBUF, NET_DMA_BYTES};
use crate::virtio::F_VERSION_1;
use crate::{probe_main, Verdict};

const BASE: u64 = 0xd000_0000;

fn run(dev: FakeNet, args: &str) -> (Verdict, String, FakeMachine) {
    let mut m = FakeMachine { tsc_step: 10, dma_len: NET_DMA_BYTES + (4 << 20), ..FakeMachine::default() };
    m.mmio.push((BASE, 0x1000, Box::new(dev)));
    let cmd = format!("console=ttyS0 {args} virtio_mmio.device=4K@0xd0000000:5");
    let v = probe_main(&mut m, cmd.as_bytes());
    let out = m.output();
    (v, out, m)
}

fn dev(m: &FakeMachine) -> &FakeNet {
    m.device_at::<FakeNet>(BASE).expect("fake net")
}

fn field(out: &str, prefix: &str, key: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix}: {out}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn info_reads_mac_link_and_negotiates_only_what_it_accepts() {
    let (v, out, m) = run(FakeNet::default(), "probe.test=net-info");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(
        out.contains("virtio: 0xd0000000 size=0x1000 irq=5 version=2 device=1 vendor=0x554d4551 (selected)"),
        "{out}"
    );
    assert!(out.contains("net: mac=52:54:00:12:34:56 link=up rxq=256 txq=256 features=0x100010020 "), "{out}");
    let d = dev(&m);
    assert_eq!(d.driver_features & !(ACCEPTED | F_VERSION_1), 0);
    assert_eq!(d.driver_features & F_MRG_RXBUF, 0);
    assert_eq!(d.status, 0, "reset at the end");
    // The MAC was read with byte accesses: 6 config reads, plus one 16-bit read for status.
    assert_eq!(d.config_reads, 7);

    let mut down = FakeNet::default();
    down.link = 0;
    down.offered &= !crate::virtio::net::F_MAC;
    let (v, out, _) = run(down, "probe.test=net-info");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(out.contains("net: mac=02:00:00:00:00:01 (default; device offers none) link=down"), "{out}");
}

#[test]
fn echo_against_a_reflecting_device_counts_every_frame_back() {
    let (v, out, m) = run(FakeNet::default(), "probe.test=net-echo probe.n=1000 probe.size=100 probe.window=32");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(out.contains("net-echo: sent=1000 received=1000 lost=0 corrupt=0 dup=0 ooo=0 other=0 stalls=0 "), "{out}");
    let d = dev(&m);
    assert_eq!(d.sent.len(), 1000);
    assert_eq!(d.bad_tx_hdr, 0);
    // Batching: one TX notify per window, not per frame.
    assert!(d.notifies[1] <= 1000 / 16, "{:?}", d.notifies);
    assert_eq!(d.max_tx_batch, 32);
    for (i, f) in d.sent.iter().enumerate() {
        assert_eq!(f.len(), 100);
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[6..12], &FAKE_MAC);
        assert_eq!(net_common::parse(f), Parsed::Intact { seq: i as u32, len: 86 });
    }
}

#[test]
fn rx_refills_skip_the_notify_when_the_device_says_so() {
    let mut d = FakeNet::default();
    d.rx_no_notify = true;
    let (v, out, m) = run(d, "probe.test=net-echo probe.n=500");
    assert_eq!(v, Verdict::Pass, "{out}");
    // Only the initial RX post was notified.
    assert_eq!(dev(&m).notifies[0], 1, "{out}");
    let (_, _, m) = run(FakeNet::default(), "probe.test=net-echo probe.n=500");
    assert!(dev(&m).notifies[0] > 1);
}

#[test]
fn echo_counts_losses_corruption_and_duplicates() {
    let mut d = FakeNet::default();
    d.drop = vec![3, 500];
    d.corrupt = vec![7];
    d.dup = vec![9];
    let (v, out, _) = run(d, "probe.test=net-echo probe.n=600 probe.timeout_ms=1 probe.tsc_khz=100000");
    assert_eq!(v, Verdict::Fail, "{out}");
    assert!(out.contains("net-echo: sent=600 received=597 lost=3 corrupt=1 dup=1 "), "{out}");
    // Losses alone within probe.max_loss pass; with a window of 1 each loss is one stall
    // (the outstanding frame is written off and sending goes on).
    let mut d = FakeNet::default();
    d.drop = vec![10, 20];
    let (v, out, _) = run(
        d,
        "probe.test=net-echo probe.n=100 probe.max_loss=2 probe.window=1 probe.timeout_ms=1 probe.tsc_khz=100000",
    );
    assert_eq!(v, Verdict::Pass, "{out}");
    assert_eq!(field(&out, "net-echo: sent=", "lost="), 2);
    assert_eq!(field(&out, "net-echo: sent=", "stalls="), 2);
}

#[test]
fn echo_without_a_reflector_stops_after_one_timeout() {
    let mut d = FakeNet::default();
    d.reflect = false;
    let (v, out, m) = run(d, "probe.test=net-echo probe.n=1000 probe.timeout_ms=1 probe.tsc_khz=100000");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("net-echo: sent=64 received=0 lost=64 "), "{out}");
    assert!(m.pauses > 0);
}

#[test]
fn echo_to_a_peer_mac_and_bad_arguments() {
    let (v, out, m) = run(FakeNet::default(), "probe.test=net-echo probe.n=10 probe.peer=02:00:00:00:00:99");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(dev(&m).sent.iter().all(|f| f[..6] == PEER_MAC));
    let (v, out, _) = run(FakeNet::default(), "probe.test=net-echo probe.peer=02:00:00");
    assert_eq!(v, Verdict::BadArgs);
    assert!(out.contains("probe: bad argument probe.peer=02:00:00: not a MAC address"), "{out}");
    let (v, out, _) = run(FakeNet::default(), "probe.test=net-echo probe.size=1515");
    assert_eq!(v, Verdict::BadArgs);
    assert!(out.contains("probe.size=1515: out of range"), "{out}");
    let mut m = FakeMachine::default();
    assert_eq!(probe_main(&mut m, b"probe.test=net-echo"), Verdict::Fail);
    assert!(m.output().contains("net: no virtio-net device #0"));
}

#[test]
fn hostile_rx_used_id_is_caught() {
    let mut d = FakeNet::default();
    d.bad_rx_id = true;
    let (v, out, _) = run(d, "probe.test=net-echo probe.n=10");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("net-echo: aborted: device returned unknown descriptor id 1000 on queue 0"), "{out}");
}

#[test]
fn reflect_sends_frames_back_to_their_source() {
    let mut d = FakeNet::default();
    d.reflect = false;
    let other_src = [0x02, 0, 0, 0, 0, 0x42];
    for seq in 0..300u32 {
        let mut f = vec![0u8; 80];
        net_common::build_frame(&mut f, FAKE_MAC, other_src, seq);
        d.backlog.push_back(f);
    }
    // A frame that is not ours is ignored.
    d.backlog.push_front(vec![0u8; 60]);
    let (v, out, m) = run(d, "probe.test=net-reflect probe.n=300");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert!(out.contains("net-reflect: reflected=300 other=1 dropped=0 "), "{out}");
    let d = dev(&m);
    assert_eq!(d.sent.len(), 300);
    for (i, f) in d.sent.iter().enumerate() {
        assert_eq!(&f[..6], &other_src);
        assert_eq!(&f[6..12], &FAKE_MAC);
        assert_eq!(net_common::parse(f), Parsed::Intact { seq: i as u32, len: 66 });
    }
    // Nothing arrives: fail after the timeout.
    let mut d = FakeNet::default();
    d.reflect = false;
    let (v, out, _) = run(d, "probe.test=net-reflect probe.timeout_ms=1 probe.tsc_khz=100000");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("net-reflect: reflected=0 "), "{out}");
}

#[test]
fn bench_reports_both_directions() {
    let mut d = FakeNet::default();
    d.reflect = false;
    for seq in 0..500u32 {
        let mut f = vec![0u8; 1514];
        net_common::build_frame(&mut f, FAKE_MAC, PEER_MAC, seq);
        d.backlog.push_back(f);
    }
    let (v, out, m) = run(d, "probe.test=net-bench probe.n=2000 probe.rx_n=200 probe.tsc_khz=1000");
    assert_eq!(v, Verdict::Pass, "{out}");
    assert_eq!(field(&out, "net-bench: tx ", "frames="), 2000);
    assert_eq!(field(&out, "net-bench: tx ", "bytes="), 2000 * 1514);
    let cycles = field(&out, "net-bench: tx ", "cycles=");
    assert_eq!(field(&out, "net-bench: tx ", "fps="), 2000 * 1_000_000 / cycles);
    assert!(field(&out, "net-bench: tx ", "kicks=") <= 2000 / 128, "{out}");
    // The 256 frames already in the ring are stale; 200 of the rest are counted.
    assert_eq!(field(&out, "net-bench: rx ", "stale="), 256);
    assert_eq!(field(&out, "net-bench: rx ", "frames="), 200);
    // Every transmitted frame is intact although buffers were only built once.
    let d = dev(&m);
    assert_eq!(d.sent.len(), 2000);
    for (i, f) in d.sent.iter().enumerate() {
        assert_eq!(net_common::parse(f), Parsed::Intact { seq: i as u32, len: 1500 }, "frame {i}");
    }
    // No generator: the RX phase fails with a hint.
    let mut d = FakeNet::default();
    d.reflect = false;
    let (v, out, _) = run(d, "probe.test=net-bench probe.n=10 probe.timeout_ms=1 probe.tsc_khz=100000");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("net-bench: rx: only 0 of 10 frames arrived"), "{out}");
}

#[test]
fn silent_tx_times_out() {
    let mut d = FakeNet::default();
    d.silent_tx = true;
    let (v, out, _) = run(d, "probe.test=net-bench probe.n=1000 probe.timeout_ms=1 probe.tsc_khz=100000");
    assert_eq!(v, Verdict::Fail);
    assert!(out.contains("net-bench: tx aborted: device timeout: 256 TX frame(s) unanswered"), "{out}");
}
