#!/usr/bin/env python3
"""Which stdlib codec the XML carrier uses: speed and ratio on helper-like states.

Three 3 MiB states: a connection table (binary records, like conntrack), a
text table (like a slirp or agent dump) and random bytes (encrypted or already
compressed state).  Baseline: zlib level 1, the XML carrier's first choice,
run on the same bytes in the same process.

    make bench      (or: .venv/bin/python benchmarks/codecs.py)
"""

from __future__ import annotations

import bz2
import lzma
import os
import random
import struct
import time
import zlib
from typing import Callable, Dict, Tuple
from stamp import stamp  # noqa: E402

MiB = 1024 * 1024
SIZE = 3 * MiB

Codec = Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]
CODECS: Dict[str, Codec] = {
    "zlib -1": (lambda d: zlib.compress(d, 1), zlib.decompress),
    "zlib -6": (lambda d: zlib.compress(d, 6), zlib.decompress),
    "lzma -0": (lambda d: lzma.compress(d, preset=0), lzma.decompress),
    "bz2 -9": (lambda d: bz2.compress(d, 9), bz2.decompress),
}


def states() -> Dict[str, bytes]:
    rng = random.Random(1)
    records = b"".join(
        struct.pack(">IIHHBBHIIQQ", 0x0A000002, rng.choice([0x08080808, 0x01010101,
                                                           0xC0A80001 + rng.randrange(50)]),
                    rng.randrange(30000, 61000), rng.choice([80, 443, 53, 22]), 6, rng.randrange(4),
                    0, rng.randrange(1000), 0, rng.randrange(1 << 20), 0)
        for _ in range(SIZE // 48 + 1))[:SIZE]
    text = b"".join(b"10.0.2.%03d:%05d -> 93.184.%03d.%03d:443 established %08d\n"
                    % (rng.randrange(256), rng.randrange(65536), rng.randrange(256),
                       rng.randrange(256), rng.randrange(10 ** 8))
                    for _ in range(SIZE // 50 + 1))[:SIZE]
    return {"binary records": records, "text table": text, "random": os.urandom(SIZE)}


def main() -> None:
    print(stamp())
    print(f"{'state (3 MiB)':<16} {'codec':<8} {'size':>7} {'compress':>12} {'decompress':>12} "
          f"{'time vs zlib -1':>16}")
    for name, data in states().items():
        base = None
        for codec, (pack, unpack) in CODECS.items():
            t0 = time.perf_counter()
            packed = pack(data)
            t1 = time.perf_counter()
            assert unpack(packed) == data
            t2 = time.perf_counter()
            total = max(t2 - t0, 1e-6)
            base = base or total
            print(f"{name:<16} {codec:<8} {len(packed) / len(data):7.1%} "
                  f"{len(data) / MiB / max(t1 - t0, 1e-6):7.0f} MiB/s "
                  f"{len(data) / MiB / max(t2 - t1, 1e-6):7.0f} MiB/s "
                  f"{total / base:15.2f}x")


if __name__ == "__main__":
    main()
