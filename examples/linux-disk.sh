#!/usr/bin/env bash
# Boot the Linux guest with its root file system on an ext4 image served by bulkhead-block and
# its console on this terminal (what `cargo xtask run` does, spelled out).
# Usage: examples/linux-disk.sh [extra bulkhead run options...]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
eval "$(cargo xtask guest | grep -E '^(vmlinux|rootfs)=')"
disk=target/guest-run/rootfs.ext4
mkdir -p "$(dirname "$disk")"
[ -f "$disk" ] || cp "$rootfs" "$disk"
exec target/release/bulkhead run --kernel "$vmlinux" --mem 256 --disk "$disk,id=root" \
    --cmdline "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw" "$@"
