"""The Immich bridge's own compute: PDQ pairing of a whole library and planning the groups.

``near_pairs`` finds every pair within the threshold by multi-index hashing (16-bit chunks, numpy); this prints
how long it takes at a few sizes, with 5 % of the photos having a near copy (10-24 bits away) planted and 10 %
having a second (trimmed-frame) hash, as real previews do; every planted pair must be found. The
other costs of a run are Immich's: fetching each preview once (later runs use the cached hashes) and PDQ of it
(see bench_library.py's ingest figures).

    .venv/bin/python bench/bench_immich_bridge.py [--sizes 1000,10000,30000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.immich_bridge import near_pairs, plan_groups


def _flip(value: int, bits: int, rng: random.Random) -> int:
    for position in rng.sample(range(256), bits):
        value ^= 1 << position
    return value


def library(size: int, rng: random.Random) -> tuple[dict[uuid.UUID, list[tuple[str, int]]], int]:
    hashes: dict[uuid.UUID, list[tuple[str, int]]] = {}
    planted = 0
    for _ in range(size):
        base = rng.getrandbits(256)
        variants = [(f"{base:064x}", 100)]
        if rng.random() < 0.10:
            variants.append((f"{rng.getrandbits(256):064x}", 90))
        hashes[uuid.uuid4()] = variants
        if rng.random() < 0.05 and len(hashes) < size:
            hashes[uuid.uuid4()] = [(f"{_flip(base, rng.randint(10, 24), rng):064x}", 100)]
            planted += 1
    return hashes, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,30000", help="library sizes (photos), comma-separated")
    args = parser.parse_args()
    rng = random.Random(13)
    print(f"{'photos':>8} {'hash rows':>10} {'pairs':>7} {'planted':>8} {'near_pairs s':>13} {'plan s':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        hashes, planted = library(size, rng)
        started = time.perf_counter()
        pairs = near_pairs(hashes, 31, 50)
        paired = time.perf_counter()
        plan_groups(dict.fromkeys(hashes), pairs, {})
        planned = time.perf_counter()
        rows = sum(len(v) for v in hashes.values())
        assert len(pairs) >= planted, "a planted near copy was not found"
        took = f"{paired - started:>13.2f} {planned - paired:>8.3f}"
        print(f"{len(hashes):>8} {rows:>10} {len(pairs):>7} {planted:>8} {took}")


if __name__ == "__main__":
    main()
