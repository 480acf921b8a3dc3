#!/usr/bin/env python3
"""Print the fault table recorded by the fault tests (make faults)."""

from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path)]
    print("| fault | expected | what happened | time to fail | state lost |")
    print("|---|---|---|---|---|")
    for r in rows:
        happened = r["happened"].replace("|", "/")
        print(f"| {r['fault']} | {r['expected']} | {happened} | {r['seconds']:.2f} s | {r['lost']} |")
    lost = [r for r in rows if r["lost"] != "none"]
    print(f"\n{len(rows)} faults, state lost in {len(lost)}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
