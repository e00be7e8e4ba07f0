#!/usr/bin/env python3
"""Host-side peer for the probe's net tests, on a TAP (or any) interface: an AF_PACKET socket
bound to IFACE, EtherType 0x88b5 only.

  net_peer.py reflect IFACE [--count N] [--seconds S]
      For every incoming frame of EtherType 0x88b5 whose payload starts with b"BKNT":
      new dst = its src; new src = its dst if that is unicast, else IFACE's MAC; payload
      unchanged; send it back on IFACE. Frames we sent ourselves (PACKET_OUTGOING) are skipped.
      Stops after N frames or S seconds without traffic; prints "reflected=N".
  net_peer.py blast IFACE --dst MAC [--count N] [--size S]
      Sends N test frames (probe format, see guests/probe/src/suite/net_common.rs) to MAC as
      fast as it can (for net-bench's RX phase); prints "sent=N".

Run it inside the network namespace that holds IFACE.
"""
import argparse
import socket
import struct
import sys

ETH_P = 0x88B5
MAGIC = b"BKNT"
PACKET_OUTGOING = 4


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def build(dst, src, seq, size):
    plen = size - 14
    fill = bytes(((j * 7 + 0x5A) & 0xFF) for j in range(16, plen))
    head = MAGIC + struct.pack("<II", seq, plen)
    csum = fnv1a(fnv1a(0x811C9DC5, fill), head)
    return dst + src + struct.pack(">H", ETH_P) + head + struct.pack("<I", csum) + fill


def mac_bytes(s):
    return bytes(int(x, 16) for x in s.replace("-", ":").split(":"))


def open_sock(iface, timeout=None):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P))
    s.bind((iface, ETH_P))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    if timeout:
        s.settimeout(timeout)
    return s


def reflect(args):
    s = open_sock(args.iface, args.seconds)
    own = s.getsockname()[4][:6]
    n = 0
    print(f"net_peer: reflecting on {args.iface} ({own.hex(':')})", flush=True)
    try:
        while args.count == 0 or n < args.count:
            frame, addr = s.recvfrom(65536)
            if addr[2] == PACKET_OUTGOING or len(frame) < 18 or frame[14:18] != MAGIC:
                continue
            dst, src = frame[0:6], frame[6:12]
            new_src = dst if not (dst[0] & 1) else own
            s.send(src + new_src + frame[12:])
            n += 1
    except socket.timeout:
        pass
    print(f"reflected={n}", flush=True)


def blast(args):
    s = open_sock(args.iface)
    own = s.getsockname()[4][:6]
    dst = mac_bytes(args.dst)
    frames = [build(dst, own, i, args.size) for i in range(256)]
    sent = 0
    for i in range(args.count):
        f = frames[i & 255]
        if i >= 256:
            # Rewrite the sequence number and checksum for i.
            f = build(dst, own, i, args.size) if args.exact else f
        while True:
            try:
                s.send(f)
                break
            except BlockingIOError:
                continue
            except OSError as e:  # ENOBUFS: the TAP queue is full; retry
                if e.errno != 105:
                    raise
        sent += 1
    print(f"sent={sent}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("reflect")
    r.add_argument("iface")
    r.add_argument("--count", type=int, default=0)
    r.add_argument("--seconds", type=float, default=30.0)
    b = sub.add_parser("blast")
    b.add_argument("iface")
    b.add_argument("--dst", required=True)
    b.add_argument("--count", type=int, default=100000)
    b.add_argument("--size", type=int, default=1514)
    b.add_argument("--exact", action="store_true", help="distinct sequence numbers (slower)")
    args = p.parse_args()
    {"reflect": reflect, "blast": blast}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
