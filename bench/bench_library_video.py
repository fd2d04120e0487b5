"""Library videos benchmark: ingest speed and screenshot -> video query latency at scale.

Runs on a fresh embedded PostgreSQL (pgvector) in a temporary folder:

* **ingest**: one H.264 MP4 made here from scikit-image's photos (pans and zooms, a cut every 6 s;
  --seconds long, --size, 30 fps), added by path and indexed by the pipeline's 'video' step (keyframes
  with PDQ; decoding uses FFmpeg's threads): seconds of video per second of wall time, keyframes kept.
* **query at --hours of indexed video** (default 100): synthetic keyframe rows (random PDQ hashes, as
  many per hour as the real video got) bulk-loaded with COPY beside the real video, the chunk indexes
  built, then JPEG screenshots (status bar, black bottom band) of random moments of the real video go
  through the full ``Library.search_image`` path (decode, PDQ of 3 variants x 8 dihedral, frame lookup,
  image lookup): p50/p95 and how many found the right video within 2 s.

    .venv/bin/python bench/bench_library_video.py [--seconds 60] [--size 1280x720] [--hours 100] [--queries 30]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.service import Library
from library.settings import LibrarySettings
from tests.video_support import Shot, encode_video, photos, render, screenshot

FPS = 30


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_video(seconds: int, size: tuple[int, int]) -> tuple[bytes, list[np.ndarray]]:
    """Shots of 6 s, each of a different photo while photos last (a repeated shot would make the time of
    a screenshot ambiguous, which is not what this measures)."""
    import skimage.data

    pictures = list(photos().values())
    for name in ("hubble_deep_field", "immunohistochemistry", "retina", "camera", "moon", "brick", "grass", "gravel"):
        image = getattr(skimage.data, name)()
        pictures.append(np.ascontiguousarray(np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]))
    shots = [Shot(pictures[i % len(pictures)], 6, ("pan", "zoom")[i % 2]) for i in range(max(1, seconds // 6))]
    frames = render(shots, FPS, size)
    return encode_video(frames, FPS), frames


def load_synthetic(lib: Library, hours: float, keyframes_per_s: float) -> int:
    """Synthetic videos of one hour each, their keyframes' random hashes; returns the row count."""
    rng = np.random.default_rng(7)
    per_video = max(1, round(3600 * keyframes_per_s))
    videos = max(1, round(hours))
    rows = 0
    with lib.db.conn() as conn:
        for i in range(16):
            conn.execute(f"DROP INDEX IF EXISTS video_frame_c{i}_idx")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY item (sha256, md5, byte_size, width, height, format, source, location, media, duration_s) "
                "FROM STDIN"
            ) as cp:
                for v in range(videos):
                    cp.write_row(
                        (v.to_bytes(32, "big"), f"{v:032x}", 1, 1280, 720, "mp4", "path", f"/syn/{v}", "video", 3600.0)
                    )
            ids = [r[0] for r in conn.execute("SELECT id FROM item WHERE location LIKE '/syn/%%' ORDER BY id")]
            with cur.copy("COPY video_frame (item_id, n, t, kind, hash, quality) FROM STDIN") as cp:
                for item_id in ids:
                    bits = rng.integers(0, 2, (per_video, 256), dtype=np.uint8)
                    for n in range(per_video):
                        cp.write_row((item_id, n, n / keyframes_per_s, "plain", "".join(map(str, bits[n])), 100))
                    rows += per_video
        for i in range(16):
            conn.execute(f"CREATE INDEX video_frame_c{i}_idx ON video_frame (c{i})")
        conn.execute("ANALYZE video_frame")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--hours", type=float, default=100)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    data_dir = Path(tempfile.mkdtemp(prefix="bench-library-video-"))
    try:
        started = time.perf_counter()
        data, frames = make_video(args.seconds, size)  # type: ignore[arg-type]
        path = data_dir / "bench.mp4"
        path.write_bytes(data)
        print(
            f"made a {len(frames) / FPS:.0f} s {args.size} video ({len(data) / 1e6:.1f} MB) in "
            f"{time.perf_counter() - started:.0f} s"
        )
        lib = Library(LibrarySettings(data_dir=data_dir, workers=1, schema_name="video", text_schema_name="vtext"))
        try:
            item = lib.ingestor.add_path(path).item_id
            started = time.perf_counter()
            lib.pipeline.run_until_idle()
            elapsed = time.perf_counter() - started
            with lib.db.conn() as conn:
                kept = conn.execute("SELECT count(DISTINCT n) FROM video_frame WHERE item_id = %s", [item]).fetchone()[
                    0
                ]
            seconds = len(frames) / FPS
            print(
                f"ingest: {seconds:.0f} s of {args.size} H.264 in {elapsed:.1f} s -> {seconds / elapsed:.1f} s of "
                f"video per second; {kept} keyframes ({kept / seconds:.2f}/s)"
            )
            rows = load_synthetic(lib, args.hours, kept / seconds) if args.hours else 0
            rng = random.Random(3)
            latencies, found, right = [], 0, 0
            for _ in range(args.queries):
                t = rng.uniform(0, seconds - 1)
                shot = screenshot(frames[round(t * FPS)])
                began = time.perf_counter()
                _, hits = lib.search_image(shot, "pdq", None, 5)
                latencies.append((time.perf_counter() - began) * 1000)
                found += bool(hits and hits[0].item.id == item)
                right += bool(hits and hits[0].item.id == item and abs((hits[0].t or -99) - t) <= 2)
            print(
                f"screenshot query at {args.hours:g} h of indexed video ({rows + kept} keyframes): "
                f"p50 {pct(latencies, 0.5):.0f} ms, p95 {pct(latencies, 0.95):.0f} ms; right video first "
                f"{found}/{args.queries}, with the time within 2 s {right}/{args.queries}"
            )
        finally:
            lib.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
