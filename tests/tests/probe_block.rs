//! The probe guest's virtio-blk driver through `bulkhead run --disk`, served by `bulkhead-block`.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use bulkhead_tests::*;

const LIMIT: Duration = Duration::from_secs(300);

/// Runs the probe with `disk` (a `--disk` value) and `cmdline` to its end.
fn run_with_disk(disk: &str, cmdline: &str) -> Finished {
    let probe = probe();
    let args =
        ["--kernel", probe.to_str().expect("utf8"), "--serial-input", "none", "--disk", disk, "--cmdline", cmdline];
    run_to_end(&args, LIMIT)
}

fn field(out: &str, prefix: &str, key: &str) -> Option<u64> {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

#[test]
fn blk_verify_pattern_is_on_the_image() {
    let dir = scratch("blk-verify");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).expect("create").set_len(64 << 20).expect("size");
    let r = run_with_disk(image.to_str().expect("utf8"), "probe.test=blk-verify probe.seed=41 probe.rounds=2");
    let ctx = format!("--- console\n{}\n--- log\n{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(0), "{ctx}");
    let summary = "blk-verify: sectors=";
    assert_eq!(field(&r.stdout, summary, "sectors"), Some(131_072), "{ctx}");
    assert_eq!(field(&r.stdout, summary, "mismatches"), Some(0), "{ctx}");
    assert_eq!(field(&r.stdout, summary, "ioerrs"), Some(0), "{ctx}");
    assert_eq!(field(&r.stdout, summary, "written"), Some(2 * 131_072), "{ctx}");
    let seed = field(&r.stdout, summary, "final_seed").expect("final_seed");
    assert_eq!(seed, 42);
    assert_eq!(bad_pattern_sectors(&image, seed), 0, "the host sees a different pattern than the guest wrote");
    assert_ne!(bad_pattern_sectors(&image, seed + 1), 0, "the checker must be able to fail");
}

fn file_hash(p: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).expect("read").hash(&mut h);
    h.finish()
}

#[test]
fn read_only_disk_rejects_writes() {
    let dir = scratch("blk-ro");
    let image = dir.join("ro.img");
    let content: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &content).expect("write");
    let before = file_hash(&image);
    let r = run_with_disk(&format!("{},ro", image.display()), "probe.test=blk-ro");
    assert!(r.stdout.contains("blk-ro: ro=1 write_status=1 read_status=0"), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(file_hash(&image), before, "a read-only image changed");
}
