#!/usr/bin/env bash
# Boot the probe guest's `hello` test under bulkhead: its console is served by the separate
# bulkhead-console process; the guest's verdict (0 = pass) becomes bulkhead's exit status.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
probe=$(cargo xtask probe | tail -n 1)
exec target/release/bulkhead run --kernel "$probe" --serial-input none --cmdline "probe.test=hello"
