#!/usr/bin/env python3
"""Host-side check of a disk image written by the probe's blk-verify test (pure Python).

Usage: check_pattern.py IMAGE SEED
Word w (0..63, byte offset 8*w) of 512-byte sector s holds, little-endian,
    splitmix64(SEED ^ (s << 16) ^ w)
with splitmix64(x): z = x + 0x9e3779b97f4a7c15; z = (z ^ z>>30) * 0xbf58476d1ce4e5b9;
z = (z ^ z>>27) * 0x94d049bb133111eb; return z ^ z>>31   (all mod 2^64).
Use the `final_seed=` the probe printed. Exit 0 if every byte matches, 1 otherwise.
"""
import struct
import sys

MASK = (1 << 64) - 1


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def main():
    path, seed = sys.argv[1], int(sys.argv[2], 0)
    sector_words = struct.Struct("<64Q")
    bad = sectors = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(512)
            if len(block) < 512:
                break
            s = sectors
            base = (seed ^ (s << 16)) & MASK
            got = sector_words.unpack(block)
            if any(got[w] != splitmix64(base ^ w) for w in range(64)):
                if bad == 0:
                    print(f"first bad sector {s}")
                bad += 1
            sectors += 1
    print(f"sectors={sectors} bad_sectors={bad} seed={seed}")
    return 0 if bad == 0 and sectors > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
