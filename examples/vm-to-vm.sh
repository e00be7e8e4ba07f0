#!/usr/bin/env bash
# Two bulkhead VMs on one Linux bridge, each NIC served by its own sandboxed bulkhead-net.
# See usage() below, or run with -h.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") [--keep] [-h] [NETNS]

Creates the network namespace NETNS (default: bulkhead-demo; it must not exist yet), a bridge
and two persistent TAPs attached to it inside it, all up; starts two 'bulkhead run' in the
namespace, one per TAP, with fixed MACs; waits for both; prints both serial outputs and logs.
Exits non-zero if either VM failed. Removes the namespace (and the bridge and TAPs with it)
on exit unless --keep is given.

By default VM A runs the probe's net-reflect and VM B its net-echo aimed at A's MAC:
B sends FRAMES test frames, A sends each back, B checks every one came back intact.

Options:
  --keep     leave the namespace, bridge and TAPs in place (delete: ip netns del NETNS)
  -h, --help this text

Environment (defaults in brackets):
  BULKHEAD        the bulkhead binary [target/release/bulkhead]
  BULKHEAD_PROBE  the probe guest [target/guests/probe.elf; 'cargo xtask probe' builds it]
  FRAMES          frames B sends and A reflects [1000]
  MAC_A, MAC_B    the VMs' MACs [02:b4:de:00:00:0a, 02:b4:de:00:00:0b]
  KERNEL_A/_B     kernel of each VM [\$BULKHEAD_PROBE]
  CMDLINE_A       [probe.test=net-reflect probe.n=\$FRAMES]
  CMDLINE_B       [probe.test=net-echo probe.n=\$FRAMES probe.peer=\$MAC_A]
  ARGS_A, ARGS_B  extra 'bulkhead run' arguments, split on spaces (e.g. "--mem 256") []
  READY_A         B starts once A's console shows this text (empty: at once) [net: mac=]
  TIMEOUT         seconds to wait for both VMs before stopping them [120]
EOF
}

keep=0
netns="bulkhead-demo"
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --keep) keep=1 ;;
        -*) echo "vm-to-vm: unknown option $1 (see -h)" >&2; exit 2 ;;
        *) netns=$1 ;;
    esac
    shift
done

root=$(cd "$(dirname "$0")/.." && pwd)
bulkhead=${BULKHEAD:-$root/target/release/bulkhead}
probe=${BULKHEAD_PROBE:-$root/target/guests/probe.elf}
frames=${FRAMES:-1000}
mac_a=${MAC_A:-02:b4:de:00:00:0a}
mac_b=${MAC_B:-02:b4:de:00:00:0b}
kernel_a=${KERNEL_A:-$probe}
kernel_b=${KERNEL_B:-$probe}
cmdline_a=${CMDLINE_A:-probe.test=net-reflect probe.n=$frames}
cmdline_b=${CMDLINE_B:-probe.test=net-echo probe.n=$frames probe.peer=$mac_a}
read -r -a args_a <<<"${ARGS_A:-}"
read -r -a args_b <<<"${ARGS_B:-}"
ready_a=${READY_A-net: mac=}
timeout=${TIMEOUT:-120}

for f in "$bulkhead" "$kernel_a" "$kernel_b"; do
    [ -f "$f" ] || { echo "vm-to-vm: $f not found (build: cargo build --release --workspace --bins; cargo xtask probe)" >&2; exit 2; }
done
if ip netns list | awk '{print $1}' | grep -qxF "$netns"; then
    echo "vm-to-vm: network namespace $netns already exists; pick another name (or: ip netns del $netns)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vm-to-vm.XXXXXX")
pid_a=
pid_b=
created=0

cleanup() {
    local rc=$?
    for p in $pid_a $pid_b; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "$created" = 1 ]; then
        if [ "$keep" = 1 ]; then
            echo "vm-to-vm: kept namespace $netns (bridge br0, TAPs tap-a, tap-b); logs in $work"
        else
            ip netns del "$netns" || true
            rm -rf "$work"
        fi
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$netns"
created=1
# No IPv6 chatter (router solicitations, MLD) on the links the guests see.
ip netns exec "$netns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
ip -n "$netns" link add br0 type bridge forward_delay 0
for t in tap-a tap-b; do
    ip -n "$netns" tuntap add dev "$t" mode tap vnet_hdr
    ip -n "$netns" link set "$t" master br0 up
done
ip -n "$netns" link set br0 up
echo "vm-to-vm: namespace $netns: bridge br0 with tap-a ($mac_a) and tap-b ($mac_b)"

start=$(date +%s%N)
nsenter --net="/var/run/netns/$netns" "$bulkhead" run --kernel "$kernel_a" --serial-input none --serial-output "$work/a.serial" \
    --net "tap=tap-a,mac=$mac_a" --cmdline "$cmdline_a" "${args_a[@]}" </dev/null >"$work/a.log" 2>&1 &
pid_a=$! # nsenter execs bulkhead: this is bulkhead's pid
if [ -n "$ready_a" ]; then
    for _ in $(seq 1 200); do
        grep -qF "$ready_a" "$work/a.serial" 2>/dev/null && break
        kill -0 "$pid_a" 2>/dev/null || break
        sleep 0.05
    done
fi
nsenter --net="/var/run/netns/$netns" "$bulkhead" run --kernel "$kernel_b" --serial-input none --serial-output "$work/b.serial" \
    --net "tap=tap-b,mac=$mac_b" --cmdline "$cmdline_b" "${args_b[@]}" </dev/null >"$work/b.log" 2>&1 &
pid_b=$!

# Wait for both, stopping them past the timeout.
deadline=$(($(date +%s) + timeout))
while kill -0 "$pid_a" 2>/dev/null || kill -0 "$pid_b" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "vm-to-vm: still running after ${timeout}s; stopping both" >&2
        kill "$pid_a" "$pid_b" 2>/dev/null || true
        break
    fi
    sleep 0.1
done
rc_a=0
wait "$pid_a" || rc_a=$?
rc_b=0
wait "$pid_b" || rc_b=$?
pid_a=
pid_b=
elapsed_ms=$((($(date +%s%N) - start) / 1000000))

for vm in a b; do
    upper=${vm^^}
    echo "=== VM $upper serial ==="
    cat "$work/$vm.serial" 2>/dev/null || true
    echo "=== VM $upper log ==="
    cat "$work/$vm.log"
done
echo "vm-to-vm: VM A exit $rc_a, VM B exit $rc_b, ${elapsed_ms} ms"
if [ "$rc_a" -ne 0 ] || [ "$rc_b" -ne 0 ]; then
    echo "vm-to-vm: FAILED" >&2
    exit 1
fi
echo "vm-to-vm: both VMs passed"
