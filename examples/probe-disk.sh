#!/usr/bin/env bash
# Write and verify a pattern over a 64 MiB disk served by bulkhead-block, then show which
# processes served the guest. Usage: examples/probe-disk.sh [IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-$(mktemp --suffix=.img)}
[ -s "$image" ] || truncate -s 64M "$image"
cargo build --release --workspace --bins
probe=$(cargo xtask probe | tail -n 1)
target/release/bulkhead run --kernel "$probe" --serial-input none --disk "$image,id=scratch" \
    --cmdline "probe.test=blk-verify probe.seed=7 probe.rounds=2"
echo "image: $image"
