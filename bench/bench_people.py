"""People benchmark: the cost of clustering one face as the library grows (library/people.py).

Synthetic faces (no model runs): --people random directions in 128 dimensions zero-padded to 512, as the
dlib model stores them, and --faces faces spread over them (same person about 0.1-0.3 cosine distance
apart, different people about 1.0). Each face is stored and clustered as the pipeline's faces step does
(people.store_faces in one transaction, HNSW neighbour lookups), on a fresh embedded PostgreSQL. Prints
the time per face (p50/p95) per slice of the run, and how well the result matches the truth.

    .venv/bin/python bench/bench_people.py [--faces 20000] [--people 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from psycopg import sql as psycopg_sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import people
from library.inference import Face
from library.service import Library
from library.settings import LibrarySettings


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def synthetic_faces(n_faces: int, n_people: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_people, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, n_people, n_faces)
    noise = rng.normal(size=(n_faces, 128)) * rng.uniform(0.02, 0.05, (n_faces, 1))
    vectors = centres[truth] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.hstack([vectors, np.zeros((n_faces, 384))]).astype(np.float32), truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=20000)
    parser.add_argument("--people", type=int, default=1000)
    args = parser.parse_args()
    vectors, truth = synthetic_faces(args.faces, args.people)
    with tempfile.TemporaryDirectory(prefix="bench-people-") as tmp:
        os.environ.pop("LIBRARY_DATABASE_URL", None)
        lib = Library(LibrarySettings(data_dir=Path(tmp), face_model="dlib", database_url=None, workers=0))
        try:
            with lib.db.conn() as conn:
                item_ids = [
                    int(r[0])
                    for r in conn.execute(
                        """INSERT INTO item (sha256, md5, byte_size, width, height, format, source, location)
                           SELECT sha256(i::text::bytea), md5(i::text), 1, 1, 1, 'JPEG', 'upload', 'bench'
                             FROM generate_series(1, %s) AS i RETURNING id""",
                        [args.faces],
                    )
                ]
            slice_size = max(args.faces // 5, 1)
            times: list[float] = []
            print(f"{args.faces} faces of {args.people} people, max distance {people.max_distance(lib.settings)}")
            for n, (item_id, vector) in enumerate(zip(item_ids, vectors, strict=True), start=1):
                face = Face((0.0, 0.0, 10.0, 10.0), 0.9, vector)
                started = time.perf_counter()
                with lib.db.conn() as conn, conn.transaction():
                    people.store_faces(conn, lib.settings, item_id, [face])
                times.append((time.perf_counter() - started) * 1000)
                if n % slice_size == 0:
                    part = times[-slice_size:]
                    print(
                        f"faces {n - slice_size + 1:>7}-{n:<7} per face: p50 {statistics.median(part):6.2f} ms  "
                        f"p95 {pct(part, 0.95):6.2f} ms"
                    )
            with lib.db.conn() as conn, conn.transaction():
                conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")
                face_id, vector = conn.execute(
                    "SELECT id, embedding::text FROM face ORDER BY id DESC LIMIT 1"
                ).fetchone()
                plan = conn.execute(
                    psycopg_sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) ") + people.neighbour_query(512),
                    [
                        vector,
                        "dlib",
                        face_id,
                        vector,
                        lib.settings.people_neighbours,
                        people.max_distance(lib.settings),
                    ],
                ).fetchall()
                print("neighbour query of the last face:\n  " + "\n  ".join(r[0] for r in plan))
                rows = conn.execute("SELECT item_id, person_id FROM face").fetchall()
            index = {item_id: k for k, item_id in enumerate(item_ids)}
            clusters: dict[int, Counter[int]] = {}
            for item_id, person_id in rows:
                if person_id is not None:
                    clusters.setdefault(int(person_id), Counter())[int(truth[index[int(item_id)]])] += 1
            assigned = sum(sum(c.values()) for c in clusters.values())
            majority = sum(c.most_common(1)[0][1] for c in clusters.values())
            real = len(set(truth.tolist()))
            print(
                f"people found {len(clusters)} (true {real}), faces assigned {assigned}/{args.faces}, "
                f"purity {majority / max(assigned, 1):.4f}"
            )
        finally:
            lib.close()


if __name__ == "__main__":
    main()
