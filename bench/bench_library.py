"""Library-mode benchmark: ingest throughput, PDQ lookup latency at scale, image search latency.

Runs on a fresh embedded PostgreSQL (pgvector) in a temporary folder:

* **ingest**: N generated photo-like JPEGs (crops of skimage's photos, 1024x768) added by path and
  processed by the in-process pipeline (``LIBRARY_WORKERS`` threads), PDQ only, then with --full PDQ +
  OCR (the bundled RapidOCR model) + faces (the bundled dlib model); with --celery the same on two Celery
  worker processes over a Redis started here (Debian's redis-server); images/min.
* **PDQ lookups at --hashes rows** (default 1 000 000): random 256-bit hashes bulk-loaded with COPY, the
  16 chunk indexes (multi-index hashing, library/search.py) built, then queries of 8 dihedral hashes (as
  a search sends) for planted near-duplicates (10-24 bits away): p50/p95, recall of the planted items,
  and the same query as a sequential scan for comparison; optionally (--hnsw) pgvector's HNSW
  ``bit_hamming_ops`` index on the same rows for comparison (slow to build).
* **image search at --items items** (default 100 000, the first rows of the same table): the full
  ``Library.search_image`` path (decode + PDQ of the query image + lookup), p50/p95.

    .venv/bin/python bench/bench_library.py [--hashes 1000000] [--items 100000] [--ingest 120] [--full]
                                            [--celery] [--hnsw]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import pdq, search
from library.service import Library
from library.settings import LibrarySettings

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_photos(folder: Path, n: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        box = (rng.randint(0, w // 4), rng.randint(0, h // 4), rng.randint(3 * w // 4, w), rng.randint(3 * h // 4, h))
        image = src.crop(box).resize((1024, 768)).rotate(rng.choice([0, 90, 180, 270]), expand=True)
        path = folder / f"p{i:05d}.jpg"
        image.save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


def _run_in_process(lib: Library) -> None:
    threads = [threading.Thread(target=lib.pipeline.run_until_idle) for _ in range(lib.settings.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_on_celery(lib: Library, database_url: str, redis_url: str, folder: Path) -> None:
    env = {
        **os.environ,
        "LIBRARY_DATABASE_URL": database_url,
        "LIBRARY_BROKER_URL": redis_url,
        "LIBRARY_SCHEMA_NAME": lib.settings.schema_name,
        "LIBRARY_TEXT_SCHEMA_NAME": lib.settings.text_schema_name,
        "LIBRARY_DATA_DIR": str(lib.settings.data_dir),
        "LIBRARY_OCR_MODEL": lib.settings.ocr_model or "",
        "LIBRARY_FACE_MODEL": lib.settings.face_model or "",
    }
    env = {k: v for k, v in env.items() if v != "" or not k.startswith("LIBRARY_")}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "library.worker",
                "worker",
                "--concurrency",
                "1",
                "--hostname",
                f"bench{n}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            stdout=(folder / f"w{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for n in range(2)
    ]
    try:
        while True:
            with lib.db.conn() as conn:
                left = conn.execute("SELECT count(*) FROM step WHERE state IN ('pending', 'running')").fetchone()[0]
            if not left:
                return
            time.sleep(0.2)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)


def bench_ingest(settings: LibrarySettings, n: int, label: str, celery: tuple[str, str] | None = None) -> float:
    folder = Path(tempfile.mkdtemp(prefix="bench-lib-photos-"))
    try:
        paths = make_photos(folder, n)
        lib = Library(settings)
        try:
            started = time.perf_counter()
            for path in paths:
                lib.ingestor.add_path(path)
            if celery is None:
                _run_in_process(lib)
            else:
                _run_on_celery(lib, celery[0], celery[1], folder)
            elapsed = time.perf_counter() - started
            with lib.db.conn() as conn:
                states = dict(conn.execute("SELECT state, count(*) FROM step GROUP BY state").fetchall())
        finally:
            lib.close()
        rate = n / elapsed * 60
        where = "2 Celery workers" if celery else f"{settings.workers} in-process workers"
        print(f"ingest {label}: {n} images, {where}, {elapsed:.1f} s -> {rate:.0f} images/min; steps {states}")
        return rate
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


def random_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, (n, 256), dtype=np.uint8)


def to_text(bits: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in bits)


def bench_lookups(lib: Library, n_hashes: int, n_items: int, queries: int, hnsw: bool) -> None:
    rng = np.random.default_rng(42)
    planted_ids = sorted(rng.choice(np.arange(1, n_items + 1), size=queries, replace=False).tolist())
    planted_set = set(planted_ids)
    planted: dict[int, np.ndarray] = {}
    with lib.db.conn() as conn:
        for i in range(16):
            conn.execute(f"DROP INDEX IF EXISTS pdq_c{i}_idx")
        started = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy(
                "COPY item (id, sha256, md5, byte_size, width, height, format, source, location) FROM STDIN"
            ) as cp:
                for i in range(1, n_hashes + 1):
                    cp.write_row((i, i.to_bytes(32, "big"), f"{i:032x}", 1, 1, 1, "JPEG", "path", f"/synthetic/{i}"))
            block = 100_000
            with cur.copy("COPY pdq (item_id, kind, hash, quality) FROM STDIN") as cp:
                for start in range(0, n_hashes, block):
                    bits = random_bits(rng, min(block, n_hashes - start))
                    for offset, row in enumerate(bits):
                        item_id = start + offset + 1
                        if item_id in planted_set:
                            planted[item_id] = row.copy()
                        text = to_text(row)
                        cp.write_row((item_id, "plain", text, 100))
        conn.execute("SELECT setval(pg_get_serial_sequence('item', 'id'), %s)", [n_hashes])
        load_s = time.perf_counter() - started
        conn.execute("SET maintenance_work_mem = '512MB'")
        started = time.perf_counter()
        for i in range(16):
            conn.execute(f"CREATE INDEX pdq_c{i}_idx ON pdq (c{i})")
        build_s = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE pdq")
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_relation_size(indexrelid))) FROM pg_index WHERE indrelid = 'pdq'::regclass"
        ).fetchone()[0]
    print(f"PDQ table: {n_hashes} hashes loaded in {load_s:.1f} s; 16 chunk indexes built in {build_s:.1f} s, {size}")

    def query_for(item_id: int, flip: int) -> list[str]:
        row = planted[item_id].copy()
        for bit in rng.choice(256, size=flip, replace=False):
            row[bit] ^= 1
        variants = [to_text(row)] + [to_text(random_bits(rng, 1)[0]) for _ in range(7)]
        return variants

    latencies, hits = [], 0
    seq_latencies = []
    queries_used = []
    with lib.db.conn() as conn:
        for n, item_id in enumerate(planted_ids):
            q = query_for(item_id, int(rng.integers(10, 25)))
            queries_used.append((item_id, q))
            t = time.perf_counter()
            found = search.pdq_matches(conn, lib.settings, q, threshold=31, limit=20)
            latencies.append((time.perf_counter() - t) * 1000)
            hits += any(m.item_id == item_id for m in found)
            if n < 5:
                t = time.perf_counter()
                exact = conn.execute(
                    """SELECT p.item_id, min(p.hash <~> q.h) d FROM pdq p, unnest(%s::bit(256)[]) q(h)
                       GROUP BY p.item_id HAVING min(p.hash <~> q.h) <= 31""",
                    [q],
                ).fetchall()
                seq_latencies.append((time.perf_counter() - t) * 1000)
                assert {r[0] for r in exact} == {m.item_id for m in found}
    print(
        f"PDQ lookup at {n_hashes} hashes (8 query hashes, threshold 31): p50 {pct(latencies, 0.5):.1f} ms, "
        f"p95 {pct(latencies, 0.95):.1f} ms; planted near-duplicates found {hits}/{len(planted_ids)}; "
        f"sequential scan p50 {statistics.median(seq_latencies):.0f} ms (same results)"
    )
    if hnsw:
        with lib.db.conn() as conn:
            started = time.perf_counter()
            conn.execute("SET maintenance_work_mem = '1GB'")
            conn.execute("CREATE INDEX pdq_hnsw_idx ON pdq USING hnsw (hash bit_hamming_ops)")
            build_s = time.perf_counter() - started
            hnsw_lat, hnsw_hits = [], 0
            for item_id, q in queries_used:
                t = time.perf_counter()
                with conn.transaction():
                    conn.execute("SET LOCAL hnsw.ef_search = 200")
                    rows = conn.execute(
                        """SELECT c.item_id, min(c.d) FROM unnest(%s::bit(256)[]) AS q(h)
                           CROSS JOIN LATERAL (SELECT p.item_id, p.hash <~> q.h AS d FROM pdq p
                                               ORDER BY p.hash <~> q.h LIMIT 21) c
                           WHERE c.d <= 31 GROUP BY c.item_id""",
                        [q],
                    ).fetchall()
                hnsw_lat.append((time.perf_counter() - t) * 1000)
                hnsw_hits += any(r[0] == item_id for r in rows)
            conn.execute("DROP INDEX pdq_hnsw_idx")
        print(
            f"  pgvector HNSW (bit_hamming_ops, ef_search 200) on the same rows: build {build_s:.1f} s, "
            f"p50 {pct(hnsw_lat, 0.5):.1f} ms, p95 {pct(hnsw_lat, 0.95):.1f} ms, found {hnsw_hits}/{len(queries_used)}"
        )


def bench_store_eight(lib: Library, n_items: int, queries: int) -> None:
    """The alternative design: index all 8 dihedral hashes of every item (8 rows each) and query with the
    one hash of the query image. Random rows stand in for the variants (PDQ hashes are ~uniform)."""
    rng = np.random.default_rng(7)
    chunks = ", ".join(
        f"c{i} integer GENERATED ALWAYS AS (substring(hash FROM {16 * i + 1} FOR 16)::bit(16)::integer) STORED"
        for i in range(16)
    )
    with lib.db.conn() as conn:
        conn.execute("DROP TABLE IF EXISTS pdq8")
        conn.execute(
            f"CREATE TABLE pdq8 (item_id bigint NOT NULL, variant smallint NOT NULL, hash bit(256) NOT NULL, {chunks})"
        )
        targets: dict[int, np.ndarray] = {}
        with conn.cursor().copy("COPY pdq8 (item_id, variant, hash) FROM STDIN") as cp:
            for item_id in range(1, n_items + 1):
                rows = random_bits(rng, 8)
                if item_id <= queries:
                    targets[item_id] = rows[3].copy()
                for variant, row in enumerate(rows):
                    cp.write_row((item_id, variant, to_text(row)))
        started = time.perf_counter()
        for i in range(16):
            conn.execute(f"CREATE INDEX ON pdq8 (c{i})")
        build_s = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE pdq8")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('pdq8'))").fetchone()[0]
        latencies, hits = [], 0
        for item_id, row in targets.items():
            row = row.copy()
            for bit in rng.choice(256, size=int(rng.integers(10, 25)), replace=False):
                row[bit] ^= 1
            query = [to_text(row)]
            where, params = search.candidate_filter("p", query, 31)
            t = time.perf_counter()
            found = conn.execute(
                psycopg.sql.SQL(
                    """SELECT p.item_id, min(p.hash <~> %s::bit(256)) AS d FROM pdq8 AS p WHERE {}
                       GROUP BY p.item_id HAVING min(p.hash <~> %s::bit(256)) <= 31 ORDER BY d LIMIT 20"""
                ).format(where),
                [query[0], *params, query[0]],
            ).fetchall()
            latencies.append((time.perf_counter() - t) * 1000)
            hits += any(r[0] == item_id for r in found)
        main_size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('pdq'))").fetchone()[0]
        conn.execute("DROP TABLE pdq8")
    print(
        f"alternative, 8 indexed rows per item ({8 * n_items} rows, {size}, indexes {build_s:.1f} s) queried with "
        f"1 hash: p50 {pct(latencies, 0.5):.1f} ms, p95 {pct(latencies, 0.95):.1f} ms, found {hits}/{len(targets)} "
        f"(the chosen design's table at this point: {main_size})"
    )


def bench_image_search(lib: Library, n_items: int, queries: int) -> None:
    with lib.db.conn() as conn:
        conn.execute("DELETE FROM item WHERE id > %s", [n_items])
        conn.execute("VACUUM ANALYZE pdq")
        count = conn.execute("SELECT count(*) FROM pdq").fetchone()[0]
    sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    blobs = []
    for i in range(queries):
        out = io.BytesIO()
        sources[i % len(sources)].rotate(i % 4 * 90, expand=True).save(out, "JPEG", quality=85)
        blobs.append(out.getvalue())
    latencies = []
    for data in blobs:
        t = time.perf_counter()
        lib.search_image(data, "pdq", None, 20)
        latencies.append((time.perf_counter() - t) * 1000)
    hash_ms = []
    for data in blobs[:10]:
        t = time.perf_counter()
        pdq.hash_image(data, max_pixels=lib.settings.max_image_pixels)
        hash_ms.append((time.perf_counter() - t) * 1000)
    print(
        f"image search at {count} items (JPEG query, decode + PDQ + lookup): p50 {pct(latencies, 0.5):.1f} ms, "
        f"p95 {pct(latencies, 0.95):.1f} ms (decode + hash alone p50 {statistics.median(hash_ms):.1f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--ingest", type=int, default=120)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also measure ingest with PDQ + OCR + faces")
    parser.add_argument("--celery", action="store_true", help="also measure ingest on 2 Celery workers (Redis)")
    parser.add_argument("--hnsw", action="store_true", help="also build and query pgvector's HNSW index")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-library-"))
    try:
        base: dict[str, Any] = {"data_dir": data_dir, "workers": args.workers}
        full = {"ocr_model": "PP-OCRv6_small", "face_model": "dlib"}
        runs: list[tuple[str, dict[str, Any], int]] = []
        if args.ingest:
            runs.append(("PDQ only", {}, args.ingest))
            if args.full:
                runs.append(("PDQ+OCR+faces", full, max(args.ingest // 4, 10)))
        for n, (label, extra, count) in enumerate(runs):
            bench_ingest(
                LibrarySettings(**base, **extra, schema_name=f"ingest{n}", text_schema_name="ingest_text"), count, label
            )
        if args.celery and runs:
            probe = Library(LibrarySettings(**base, schema_name="probe", text_schema_name="ingest_text"))
            database_url = probe.db.dsn
            with redis_server() as redis_url:
                for n, (label, extra, count) in enumerate(runs):
                    settings = LibrarySettings(
                        **base,
                        **extra,
                        schema_name=f"celery{n}",
                        text_schema_name="ingest_text",
                        database_url=database_url,
                    )
                    bench_ingest(settings, count, label, celery=(database_url, redis_url))
            probe.close()
        if args.hashes:
            lib = Library(LibrarySettings(**base, schema_name="scale", text_schema_name="scale_text"))
            try:
                bench_lookups(lib, args.hashes, min(args.items, args.hashes), min(args.queries, args.items), args.hnsw)
                bench_image_search(lib, min(args.items, args.hashes), args.queries)
                bench_store_eight(lib, min(args.items, args.hashes), args.queries)
            finally:
                lib.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
